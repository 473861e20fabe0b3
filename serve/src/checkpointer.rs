//! Periodic checkpoints of a model that trains (`--checkpoint-every`): a
//! thread writes the model's current version into a directory of numbered
//! versions ([`netcl::io::CheckpointDir`]: a temporary file, fsync,
//! rename, fsync of the directory) every period, when it changed.
//!
//! Each write takes the directory's next version number, so the numbers
//! only grow, across restarts too. A write that fails (a full disk) is
//! logged and counted; training goes on and the versions already written
//! stay as they were (the writer removes its temporary); the next period
//! tries again.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use netcl::io::CheckpointDir;
use netcl::nn::Module;

use crate::loader::INPUT_KEY;
use crate::model::{ModelState, STEPS_KEY, VERSION_KEY};

/// Writes `model` (the digits MLP, as the server trains it) as version
/// `version` of `dir`, with its version, training steps and
/// `netcl-serve.input = digits` in the metadata: a self-describing
/// checkpoint that [`crate::loader::CheckpointLoader`] and `--weights`
/// both read.
///
/// # Errors
///
/// The engine's error (a full disk: [`netcl::Error::Io`]).
pub fn write_version<M: Module + ?Sized>(
    dir: &CheckpointDir,
    version: u64,
    steps: u64,
    model: &M,
) -> netcl::Result<PathBuf> {
    let metadata = BTreeMap::from([
        (VERSION_KEY.to_string(), version.to_string()),
        (STEPS_KEY.to_string(), steps.to_string()),
        (INPUT_KEY.to_string(), "digits".to_string()),
    ]);
    dir.save_model_with_metadata(version, model, &metadata)
}

/// Writes `model`'s current version into `dir` as its next version, and
/// returns the version number and file.
///
/// # Errors
///
/// As [`write_version`], and [`netcl::Error::Io`] if the directory cannot
/// be listed.
pub fn write_next(dir: &CheckpointDir, model: &ModelState) -> netcl::Result<(u64, PathBuf)> {
    let current = model.published().load();
    let steps = model.info().training_steps;
    let version = dir.next_version()?;
    let path = write_version(dir, version, steps, &**current)?;
    Ok((version, path))
}

/// Starts the thread that writes `model` into `dir` every `every` while
/// its published version changed, until `stop` is set.
pub(crate) fn spawn(
    dir: CheckpointDir,
    every: Duration,
    model: Arc<ModelState>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("netcl-checkpoint".to_string())
        .spawn(move || {
            let mut written = None;
            let mut next = Instant::now() + every;
            while !stop.load(Ordering::Relaxed) {
                let now = Instant::now();
                if now < next {
                    std::thread::sleep((next - now).min(Duration::from_millis(50)));
                    continue;
                }
                next = now + every;
                let published = model.published().version();
                if written == Some(published) {
                    continue;
                }
                match write_next(&dir, &model) {
                    Ok((version, path)) => {
                        written = Some(published);
                        tracing::info!(
                            version,
                            path = %path.display(),
                            "wrote a checkpoint"
                        );
                    }
                    Err(err) => tracing::error!(
                        dir = %dir.path().display(),
                        "the checkpoint was not written (training goes on, the last \
                         complete version stays): {err}"
                    ),
                }
            }
        })
}
