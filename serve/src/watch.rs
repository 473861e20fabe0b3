//! Hot reload: polls a checkpoint path and publishes each new file found
//! there as one new version.
//!
//! A writer replaces the file by renaming a complete one into place
//! (`netcl::io::save*` do), so each change of the path's identity (inode,
//! size, modification time) is one complete file. A file that does not
//! load (garbage, truncated, another model's shapes, non-finite values) is
//! logged and skipped, and the current version keeps serving; the same
//! file is not tried again, the next one is.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::model::{Digits, ModelState, VersionInfo, accuracy, read_checkpoint};

/// What identifies one file at the path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i128,
}

fn file_id(path: &std::path::Path) -> Option<FileId> {
    let meta = std::fs::metadata(path).ok()?;
    Some(FileId {
        dev: meta.dev(),
        ino: meta.ino(),
        len: meta.len(),
        mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
    })
}

/// Watches `path` every `interval` until `shutdown` turns true. The file
/// present at start (if any) counts as seen: the server loaded it already
/// or chose not to.
pub(crate) async fn run(
    path: PathBuf,
    interval: Duration,
    digits: Digits,
    model: Arc<ModelState>,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut seen = file_id(&path);
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
        let current = file_id(&path);
        if current.is_none() || current == seen {
            continue;
        }
        seen = current;
        let (path, digits, model) = (path.clone(), digits.clone(), Arc::clone(&model));
        let loaded = tokio::task::spawn_blocking(move || reload(&path, &digits, &model)).await;
        match loaded {
            Ok(Ok((version, stored))) => {
                metrics.record_reload(true);
                tracing::info!(
                    version,
                    stored_version = stored,
                    "reloaded the watched checkpoint"
                );
            }
            Ok(Err(err)) => {
                metrics.record_reload(false);
                tracing::error!("ignored the watched checkpoint: {err}");
            }
            Err(err) => {
                metrics.record_reload(false);
                tracing::error!("the reload task failed: {err}");
            }
        }
    }
}

/// Loads the checkpoint at `path` and publishes it, under the version
/// stored in the file when that is above the current one (so replicas
/// following one trainer show its numbers), else as the next version;
/// returns the version it got and the version stored in the file.
fn reload(
    path: &std::path::Path,
    digits: &Digits,
    model: &ModelState,
) -> Result<(u64, u64), String> {
    let checkpoint = read_checkpoint(path).map_err(|e| e.to_string())?;
    let accuracy = accuracy(&checkpoint.model, &digits.test).map_err(|e| e.to_string())?;
    let stored = checkpoint.version;
    let version = model.publish_as(
        Box::new(checkpoint.model),
        stored,
        VersionInfo {
            version: 0,
            training_steps: checkpoint.steps,
            last_loss: None,
            accuracy,
            source: "reload",
        },
    );
    Ok((version, stored))
}
