//! Hot reload: polls a [`VersionSource`] (a checkpoint file, or a
//! directory of numbered versions, see [`crate::source`]) and publishes
//! each new version found there.
//!
//! A writer replaces the file by renaming a complete one into place
//! (`netcl::io::save*` do), so each change of the path's identity (inode,
//! size, modification time) is one complete file. A file that does not
//! load (garbage, truncated, another model's shapes, non-finite values) is
//! logged and skipped, and the current version keeps serving; the same
//! file is not tried again, the next one is. So is a version whose rows
//! differ from the served model's (the server keeps its input spec).
//!
//! A numbered version is published under its number, and only when that
//! is above the served one: a replica's version only ever grows, and
//! equals the trainer's.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::generate::LanguageModel;
use crate::loader::ModelLoader;
use crate::metrics::Metrics;
use crate::model::{ModelState, VersionInfo};
use crate::source::{Offer, VersionSource};

/// Watches `source` every `interval` until `shutdown` turns true,
/// publishing each new version it offers as a version of model `name`.
/// `at_start` is what the source offered before the server loaded the
/// model: it counts as seen (the server loaded it already or chose not
/// to), and anything offered since is new.
pub(crate) async fn run(
    (source, at_start): (Arc<dyn VersionSource>, Option<Offer>),
    interval: Duration,
    loader: Arc<dyn ModelLoader>,
    (row_shape, lm): (Vec<usize>, Option<LanguageModel>),
    model: Arc<ModelState>,
    (metrics, name): (Arc<Metrics>, Arc<String>),
    mut shutdown: watch::Receiver<bool>,
) {
    let mut seen = at_start.map(|offer| (offer.file, offer.identity));
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
        let probe = Arc::clone(&source);
        let Ok(Some(offer)) = tokio::task::spawn_blocking(move || probe.latest()).await else {
            continue;
        };
        let (file, number) = (offer.file.clone(), offer.number);
        if seen.as_ref() == Some(&(offer.file, offer.identity.clone())) {
            continue;
        }
        seen = Some((file.clone(), offer.identity));
        // A numbered version not above the one served is not news (the
        // server loaded it at start, say): republishing it would give it
        // a number of its own, no longer the source's.
        if let Some(n) = number
            && n <= model.published().version()
        {
            continue;
        }
        let (loader, model) = (Arc::clone(&loader), Arc::clone(&model));
        let expected = (row_shape.clone(), lm.clone());
        let loaded = tokio::task::spawn_blocking(move || {
            reload(
                &file,
                number,
                &*loader,
                (&expected.0, expected.1.as_ref()),
                &model,
            )
        })
        .await;
        match loaded {
            Ok(Ok((version, stored))) => {
                metrics.record_model_reload(&name, true);
                tracing::info!(
                    model = name.as_str(),
                    version,
                    stored_version = stored,
                    "reloaded the watched checkpoint"
                );
            }
            Ok(Err(err)) => {
                metrics.record_model_reload(&name, false);
                tracing::error!(
                    model = name.as_str(),
                    "ignored the watched checkpoint: {err}"
                );
            }
            Err(err) => {
                metrics.record_model_reload(&name, false);
                tracing::error!(model = name.as_str(), "the reload task failed: {err}");
            }
        }
    }
}

/// Loads the checkpoint at `file` and publishes it if its rows are of
/// `row_shape` (and, for a language model, it reads the same characters
/// with the same sizes), under the version
/// stored in the file (or its directory entry's `number`) when that is
/// above the current one (so replicas following one trainer show its
/// numbers), else as the next version; returns the version it got and the
/// version stored.
fn reload(
    file: &std::path::Path,
    number: Option<u64>,
    loader: &dyn ModelLoader,
    (row_shape, lm): (&[usize], Option<&LanguageModel>),
    model: &ModelState,
) -> Result<(u64, u64), String> {
    let loaded = loader.load(file).map_err(|e| e.to_string())?;
    // A language model's requests are read with the vocabulary it started
    // with: a version of another vocabulary or sizes would misread them.
    match (lm, &loaded.generation) {
        (Some(served), Some(new)) if !served.same_model(new) => {
            return Err(format!(
                "{}: its vocabulary or sizes ({:?}, {:?}) differ from the served language \
                 model's ({:?}, {:?})",
                file.display(),
                new.vocab(),
                new.config(),
                served.vocab(),
                served.config()
            ));
        }
        (Some(_), None) => {
            return Err(format!(
                "{}: not a language model, the served model is one",
                file.display()
            ));
        }
        (None, Some(_)) => {
            return Err(format!(
                "{}: a language model, the served model is not one",
                file.display()
            ));
        }
        _ => {}
    }
    // The server answers with the input spec it started with: a version
    // taking other rows would fail every request.
    if loaded.input.row_shape() != row_shape {
        return Err(format!(
            "{}: its rows are of shape {:?}, the served model's {row_shape:?}",
            file.display(),
            loaded.input.row_shape()
        ));
    }
    let stored = number.unwrap_or(loaded.version);
    let version = model.publish_as(
        loaded.model,
        stored,
        VersionInfo {
            version: 0,
            training_steps: loaded.steps,
            last_loss: None,
            accuracy: loaded.accuracy.unwrap_or(f32::NAN),
            source: "reload",
        },
    );
    Ok((version, stored))
}
