//! The served model: the digits MLP, its data, its checkpoints, and the
//! record of what the current version is.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc;

use netcl::Tensor;
use netcl::autograd::{eval_mode, no_grad};
use netcl::data::{TensorDataset, parse_labeled_csv};
use netcl::nn::{Activation, Mlp, Module, Published, Version};
use netcl::optim::{Adam, AdamConfig, CosineAnnealing};
use netcl::train::Trainer;
use sync::Mutex;

/// The width of one input row: an 8x8 image.
pub const FEATURES: usize = 64;
/// The number of classes: the digits 0 to 9.
pub const CLASSES: usize = 10;
/// The largest raw pixel value; the model sees `pixel / PIXEL_MAX`.
pub const PIXEL_MAX: f32 = 16.0;
/// The layer widths of the served MLP.
pub const DIMS: [usize; 3] = [FEATURES, 128, CLASSES];
/// The metadata key under which a checkpoint stores its version number.
pub const VERSION_KEY: &str = "version";

/// The seed of the train/test split, the same as the digits example's.
const SPLIT_SEED: u64 = 42;
/// The learning rate of the start-up training (cosine-annealed).
const STARTUP_LR: f32 = 2e-3;
/// The batch size of every training step.
pub(crate) const BATCH_SIZE: usize = 32;

/// The digits, compiled into the binary so that it runs from any directory.
static DIGITS_CSV: &str = include_str!("../../data/digits.csv");

mod sync {
    //! `std::sync::Mutex` without poisoning: a panic elsewhere must not
    //! turn every later request into an error.
    pub(crate) struct Mutex<T>(std::sync::Mutex<T>);

    impl<T> Mutex<T> {
        pub(crate) fn new(value: T) -> Mutex<T> {
            Mutex(std::sync::Mutex::new(value))
        }

        pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, T> {
            self.0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        }
    }
}

/// The digits split as in training: 80% to train on, 20% held out, pixels
/// scaled to `[0, 1]`.
#[derive(Debug, Clone)]
pub struct Digits {
    /// The training split (1,437 samples).
    pub train: TensorDataset,
    /// The held-out split (360 samples) on which accuracy is measured.
    pub test: TensorDataset,
}

impl Digits {
    /// Parses the embedded digits and splits them.
    ///
    /// # Errors
    ///
    /// An engine error if the embedded data does not parse (it always does).
    pub fn load() -> netcl::Result<Digits> {
        let raw = parse_labeled_csv(DIGITS_CSV.as_bytes(), "digits.csv", FEATURES, CLASSES)?;
        let scaled = TensorDataset::new(scale(raw.inputs()), raw.targets().clone())?;
        let (train, test) = scaled.split(0.8, SPLIT_SEED)?;
        Ok(Digits { train, test })
    }
}

/// Scales raw pixels (`0..=16`) to the model's input range, with the same
/// op as the training data.
pub fn scale(raw: &Tensor) -> Tensor {
    raw / PIXEL_MAX
}

/// The fraction of `data` that `model` classifies correctly, computed in
/// one forward on this thread (no thread pool), under `no_grad` and in
/// evaluation mode.
///
/// # Errors
///
/// The error of the forward.
pub fn accuracy<M: Module + ?Sized>(model: &M, data: &TensorDataset) -> netcl::Result<f32> {
    let _no_grad = no_grad();
    let _eval = eval_mode();
    let logits = model.forward(data.inputs())?;
    let predicted = classes_of(&logits.try_argmax(-1)?);
    let targets = data.targets().to_vec();
    let correct = predicted
        .iter()
        .zip(&targets)
        .filter(|&(&p, &t)| p as f32 == t)
        .count();
    Ok(correct as f32 / targets.len().max(1) as f32)
}

/// The class indices of [`Tensor::argmax`]'s result (exact small whole
/// numbers held as `f32`) as integers.
pub fn classes_of(indices: &Tensor) -> Vec<u32> {
    indices.to_vec().into_iter().map(|i| i as u32).collect()
}

/// What a start-up training produced.
#[derive(Debug)]
pub struct Trained {
    /// The trained model.
    pub model: Mlp,
    /// Optimizer steps taken.
    pub steps: u64,
    /// The loss of the last step.
    pub loss: f32,
}

/// Trains the digits MLP from a seeded initialisation for `epochs` epochs
/// (Adam, cosine-annealed learning rate, batches of 32): the model served
/// when there is no checkpoint. 30 epochs take about 0.1 s in a release
/// build and reach about 0.97 held-out accuracy.
///
/// # Errors
///
/// The first error of the training.
pub fn train_startup(digits: &Digits, epochs: usize, seed: u64) -> netcl::Result<Trained> {
    use rand::SeedableRng;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let model = Mlp::new(&DIMS, Activation::Relu, &mut rng);
    let optimizer = Adam::new(model.parameters(), AdamConfig::new(STARTUP_LR));
    let mut trainer = Trainer::new(model, optimizer, digits.train.clone())
        .batch_size(BATCH_SIZE)
        .seed(seed)
        .schedule(CosineAnnealing::new(STARTUP_LR, 1e-5, epochs.max(1)))
        .progress(false);
    let mut loss = f32::NAN;
    let mut steps = 0;
    if epochs > 0 {
        trainer.fit(epochs)?;
        steps = trainer.steps_done();
        loss = trainer.history().last().map_or(f32::NAN, |m| m.train_loss);
    }
    let (model, _) = trainer.into_parts();
    Ok(Trained { model, steps, loss })
}

/// Why a checkpoint could not be used.
#[derive(Debug)]
pub struct CheckpointError(pub String);

impl std::fmt::Display for CheckpointError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CheckpointError {}

/// The metadata key under which a checkpoint stores the training steps
/// behind it.
pub const STEPS_KEY: &str = "training_steps";

/// A checkpoint read from disk.
#[derive(Debug)]
pub struct Checkpoint {
    /// The model.
    pub model: Mlp,
    /// The version number stored in its metadata (0 if none).
    pub version: u64,
    /// The training steps stored in its metadata (0 if none).
    pub steps: u64,
}

/// Reads a checkpoint of the digits MLP: its parameters, and the version
/// number and training steps stored in its metadata.
///
/// # Errors
///
/// A [`CheckpointError`] naming the file and the problem: unreadable, not
/// safetensors, wrong parameter names or shapes, non-finite values, or
/// metadata that is not a number.
pub fn read_checkpoint(path: &Path) -> Result<Checkpoint, CheckpointError> {
    let bytes =
        std::fs::read(path).map_err(|err| CheckpointError(format!("{}: {err}", path.display())))?;
    checkpoint_from_bytes(&bytes)
        .map_err(|err| CheckpointError(format!("{}: {err}", path.display())))
}

/// As [`read_checkpoint`], from the file's bytes.
///
/// # Errors
///
/// As [`read_checkpoint`].
pub fn checkpoint_from_bytes(bytes: &[u8]) -> Result<Checkpoint, CheckpointError> {
    let model = Mlp::zeros(&DIMS, Activation::Relu).map_err(|e| CheckpointError(e.to_string()))?;
    netcl::io::load_bytes(&model, bytes).map_err(|e| CheckpointError(e.to_string()))?;
    for (name, p) in model.named_parameters() {
        if p.to_vec().iter().any(|v| !v.is_finite()) {
            return Err(CheckpointError(format!(
                "parameter {name} holds a non-finite value"
            )));
        }
    }
    let metadata =
        netcl::io::metadata_from_bytes(bytes).map_err(|e| CheckpointError(e.to_string()))?;
    let number = |key: &str| match metadata.get(key) {
        None => Ok(0),
        Some(text) => text
            .parse()
            .map_err(|_| CheckpointError(format!("metadata {key} = {text:?} is not a number"))),
    };
    Ok(Checkpoint {
        version: number(VERSION_KEY)?,
        steps: number(STEPS_KEY)?,
        model,
    })
}

/// Saves `model` to `path` atomically (a temporary file, then a rename),
/// with its version number and training steps in the metadata.
///
/// # Errors
///
/// The engine's I/O error.
pub fn save_checkpoint<M: Module + ?Sized>(
    model: &M,
    version: u64,
    steps: u64,
    path: &Path,
) -> netcl::Result<()> {
    let metadata = BTreeMap::from([
        (VERSION_KEY.to_string(), version.to_string()),
        (STEPS_KEY.to_string(), steps.to_string()),
    ]);
    netcl::io::save_with_metadata(model, path, &metadata)
}

/// What `GET /v1/model` reports about the current version.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct VersionInfo {
    /// The version number.
    pub version: u64,
    /// Training steps behind this version (over this process's life, plus
    /// the start-up training).
    pub training_steps: u64,
    /// The loss of the last training step before it was published, if it
    /// was trained here.
    pub last_loss: Option<f32>,
    /// Its accuracy on the held-out digits.
    pub accuracy: f32,
    /// Where it came from: `startup`, `checkpoint`, `training` or `reload`.
    pub source: &'static str,
}

/// The published versions and what is known about the current one.
///
/// Every publish goes through [`ModelState::publish`], which updates the
/// published model and its [`VersionInfo`] under one lock, so a reader of
/// [`ModelState::info`] never sees the information of another version
/// than the one it names. Predictions never take that lock: they
/// [`load`](Published::load) a version.
pub struct ModelState {
    published: Published,
    current: Mutex<Current>,
}

/// What [`ModelState`] updates under its lock with each publish.
struct Current {
    info: VersionInfo,
    /// Where each new version is sent ([`ModelState::subscribe`]).
    subscribers: Vec<mpsc::Sender<Arc<Version>>>,
}

impl std::fmt::Debug for ModelState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelState")
            .field("info", &self.current.lock().info)
            .finish()
    }
}

impl ModelState {
    /// Publishes `model` as version `info.version`.
    ///
    /// # Errors
    ///
    /// The engine's error if the model cannot be forked.
    pub fn new<M: Module + ?Sized>(model: &M, info: VersionInfo) -> netcl::Result<Arc<ModelState>> {
        Ok(ModelState::from_published(
            Published::with_version(model, info.version)?,
            info,
        ))
    }

    /// Serves the versions of `published`, the current one described by
    /// `info` (whose version field is set to the current number).
    pub fn from_published(published: Published, mut info: VersionInfo) -> Arc<ModelState> {
        info.version = published.version();
        Arc::new(ModelState {
            published,
            current: Mutex::new(Current {
                info,
                subscribers: Vec::new(),
            }),
        })
    }

    /// The published versions.
    pub fn published(&self) -> &Published {
        &self.published
    }

    /// Publishes `model` as the next version, with `info` (whose version
    /// field is set to the new number), and returns that number.
    pub fn publish(&self, model: Box<dyn Module>, mut info: VersionInfo) -> u64 {
        let mut current = self.current.lock();
        let number = self.published.publish_model(model);
        info.version = number;
        self.published_under(&mut current, info);
        number
    }

    /// Publishes `model` as version `number` if that is above the current
    /// one (a checkpoint's stored version, so that replicas show the
    /// trainer's numbers), else as the next version; returns the number it
    /// got.
    pub fn publish_as(&self, model: Box<dyn Module>, number: u64, mut info: VersionInfo) -> u64 {
        let mut current = self.current.lock();
        let number = if number > self.published.version() {
            self.published
                .publish_model_as(model, number)
                .expect("checked above the current version under the publish lock")
        } else {
            self.published.publish_model(model)
        };
        info.version = number;
        self.published_under(&mut current, info);
        number
    }

    /// Records `info` as the current version's, and sends the version just
    /// published to the subscribers; `current` is the lock every publish
    /// holds, so nothing was published since.
    fn published_under(&self, current: &mut Current, info: VersionInfo) {
        current.info = info;
        if !current.subscribers.is_empty() {
            let version = self.published.load();
            current
                .subscribers
                .retain(|subscriber| subscriber.send(Arc::clone(&version)).is_ok());
        }
    }

    /// Every version from now on: the current one at once, then each
    /// version as it is published, in order, none missed (for a test or an
    /// audit that checks responses against the version that computed them:
    /// a response never names a version older than the one current when it
    /// was received). Each version received is kept, weights and all, until
    /// the receiver drops it; dropping the receiver ends the subscription
    /// at the next publish.
    pub fn subscribe(&self) -> mpsc::Receiver<Arc<Version>> {
        let (sender, receiver) = mpsc::channel();
        let mut current = self.current.lock();
        let _ = sender.send(self.published.load());
        current.subscribers.push(sender);
        receiver
    }

    /// What is known about the current version.
    pub fn info(&self) -> VersionInfo {
        self.current.lock().info
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(source: &'static str) -> VersionInfo {
        VersionInfo {
            version: 0,
            training_steps: 0,
            last_loss: None,
            accuracy: 0.0,
            source,
        }
    }

    fn zeros() -> Box<dyn Module> {
        Box::new(Mlp::zeros(&DIMS, Activation::Relu).unwrap())
    }

    #[test]
    fn a_subscriber_gets_the_current_version_then_every_one_published() {
        let state = ModelState::new(
            &Mlp::zeros(&DIMS, Activation::Relu).unwrap(),
            info("startup"),
        )
        .unwrap();
        state.publish(zeros(), info("training"));
        let versions = state.subscribe();
        state.publish(zeros(), info("training"));
        state.publish_as(zeros(), 7, info("reload"));
        let dropped = state.subscribe();
        drop(dropped);
        state.publish(zeros(), info("training"));
        let numbers: Vec<u64> = versions.try_iter().map(|v| v.number()).collect();
        assert_eq!(numbers, [1, 2, 7, 8]);
        // The dropped receiver's sender went at the publish after it.
        assert_eq!(state.current.lock().subscribers.len(), 1);
        assert_eq!(state.info().version, 8);
    }
}
