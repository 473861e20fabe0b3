//! A training loop for classifiers: [`Trainer`] fits a model with an
//! optimizer and records per-epoch metrics; [`evaluate`] measures loss and
//! accuracy on a dataset in parallel, recording nothing.
//!
//! # Examples
//!
//! Train a small MLP on the digits for a few epochs:
//!
//! ```
//! use netcl::data::{self, TensorDataset};
//! use netcl::nn::{Activation, Mlp, Module};
//! use netcl::optim::{Adam, AdamConfig};
//! use netcl::train::Trainer;
//! use netcl::rand::SeedableRng;
//!
//! let digits = data::load_digits(concat!(env!("CARGO_MANIFEST_DIR"), "/data/digits.csv"))?;
//! let digits = TensorDataset::new(digits.inputs() / 16.0, digits.targets().clone())?;
//! let (train, test) = digits.split(0.8, 42)?;
//!
//! let mut rng = netcl::rand::rngs::StdRng::seed_from_u64(0);
//! let model = Mlp::new(&[64, 32, 10], Activation::Relu, &mut rng);
//! let optimizer = Adam::new(model.parameters(), AdamConfig::new(1e-2));
//! let mut trainer = Trainer::new(model, optimizer, train)
//!     .batch_size(64)
//!     .seed(1)
//!     .eval_set(test)
//!     .progress(false);
//!
//! let history = trainer.fit(3)?;
//! assert_eq!(history.len(), 3);
//! assert!(history[2].train_loss < history[0].train_loss);
//! let result = trainer.evaluate()?;
//! assert!(result.accuracy > 0.8);
//! # Ok::<(), netcl::Error>(())
//! ```

use std::fmt;
use std::io::IsTerminal;
use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};

use crate::autograd::{enable_grad, eval_mode, no_grad, train_mode};
use crate::data::{DataLoader, Dataset};
use crate::error::{Error, Result};
use crate::nn::Module;
use crate::optim::{LrSchedule, Optimizer};
use crate::parallel;
use crate::tensor::Tensor;

/// A loss function of a model's output and the targets, returning a scalar
/// (the mean over the batch).
pub type LossFn = dyn Fn(&Tensor, &Tensor) -> Result<Tensor> + Send + Sync;

/// The metrics of one training epoch, as recorded by [`Trainer::fit`].
///
/// # Examples
///
/// ```
/// use netcl::train::{EpochMetrics, Evaluation};
///
/// let metrics = EpochMetrics {
///     epoch: 3,
///     lr: 1e-3,
///     train_loss: 0.1234,
///     eval: Some(Evaluation { loss: 0.1, accuracy: 0.97, samples: 360 }),
///     seconds: 0.12,
/// };
/// assert_eq!(metrics.eval_accuracy(), Some(0.97));
/// assert_eq!(
///     metrics.to_string(),
///     "epoch   3: train loss 0.1234, eval loss 0.1000, eval accuracy 0.9700, lr 1.000e-3, 0.12 s"
/// );
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EpochMetrics {
    /// The epoch, counting from 0 over the trainer's life.
    pub epoch: usize,
    /// The learning rate used during the epoch.
    pub lr: f32,
    /// Mean training loss over the epoch's samples (each batch's mean loss
    /// weighted by its size), with the weights as they were during the
    /// epoch.
    pub train_loss: f32,
    /// Loss and accuracy on the evaluation set after the epoch, if the
    /// trainer has one.
    pub eval: Option<Evaluation>,
    /// Wall-clock seconds the epoch took, evaluation included.
    pub seconds: f64,
}

impl EpochMetrics {
    /// The evaluation loss, if there was an evaluation.
    pub fn eval_loss(&self) -> Option<f32> {
        self.eval.map(|e| e.loss)
    }

    /// The evaluation accuracy, if there was an evaluation.
    pub fn eval_accuracy(&self) -> Option<f32> {
        self.eval.map(|e| e.accuracy)
    }
}

impl fmt::Display for EpochMetrics {
    /// One line: `epoch   3: train loss 0.1234, eval loss 0.1000, eval
    /// accuracy 0.9700, lr 0.001, 0.12 s`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "epoch {:3}: train loss {:.4}",
            self.epoch, self.train_loss
        )?;
        if let Some(eval) = &self.eval {
            write!(
                f,
                ", eval loss {:.4}, eval accuracy {:.4}",
                eval.loss, eval.accuracy
            )?;
        }
        write!(f, ", lr {:.3e}, {:.2} s", self.lr, self.seconds)
    }
}

/// The result of [`evaluate`]: mean loss and accuracy over a dataset.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Evaluation {
    /// Mean loss per sample.
    pub loss: f32,
    /// Fraction of samples whose highest logit is the target class.
    pub accuracy: f32,
    /// The number of samples evaluated.
    pub samples: usize,
}

/// What one training step did, passed to the hooks of
/// [`Trainer::on_step`].
///
/// # Examples
///
/// A hook that keeps every step's info:
///
/// ```
/// use std::sync::{Arc, Mutex};
///
/// use netcl::Tensor;
/// use netcl::data::TensorDataset;
/// use netcl::nn::{Linear, Module};
/// use netcl::optim::{Sgd, SgdConfig};
/// use netcl::train::{StepInfo, Trainer};
///
/// // 10 samples in batches of 4: batches of 4, 4 and 2 each epoch.
/// let data = TensorDataset::new(Tensor::ones(&[10, 2]), Tensor::zeros(&[10]))?;
/// let model = Linear::zeros(2, 3)?;
/// let optimizer = Sgd::new(model.parameters(), SgdConfig::new(0.1));
/// let log: Arc<Mutex<Vec<StepInfo>>> = Arc::default();
/// let mut trainer = Trainer::new(model, optimizer, data).batch_size(4).progress(false).on_step({
///     let log = Arc::clone(&log);
///     move |info, _model| log.lock().unwrap().push(*info)
/// });
/// trainer.fit(2)?;
///
/// let log = log.lock().unwrap();
/// assert_eq!(log.len(), 6);
/// let last = log[5];
/// assert_eq!((last.epoch, last.batch, last.step, last.samples), (1, 2, 6, 2));
/// assert_eq!(last.lr, 0.1);
/// // Zero weights give equal logits for the 3 classes: the first loss is ln 3.
/// assert!((log[0].loss - 3f32.ln()).abs() < 1e-6);
/// assert!(last.loss < log[0].loss);
/// # Ok::<(), netcl::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct StepInfo {
    /// The epoch, counting from 0 over the trainer's life.
    pub epoch: usize,
    /// The batch within the epoch, counting from 0.
    pub batch: usize,
    /// Steps taken over the trainer's life, this one included (the first
    /// step is 1).
    pub step: u64,
    /// The batch's loss.
    pub loss: f32,
    /// The number of samples in the batch.
    pub samples: usize,
    /// The learning rate of the step.
    pub lr: f32,
    /// The global 2-norm of the gradients before clipping, when the
    /// trainer clips ([`Trainer::clip_grad_norm`]).
    pub grad_norm: Option<f32>,
}

/// What [`Trainer::fit`] does when a batch's loss is NaN or infinite; see
/// [`Trainer::on_non_finite`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum NonFinite {
    /// Stop with [`Error::NonFiniteLoss`] (or [`Error::NonFiniteGradient`]
    /// for a gradient norm, see [`Trainer::clip_grad_norm`]) naming the
    /// epoch and step (the default). The step is not taken, so the parameters are those of
    /// the last finite step.
    #[default]
    Error,
    /// Skip the batch (no backward, no optimizer step), print a warning to
    /// stderr and go on; [`Trainer::skipped_steps`] counts them.
    Skip,
}

/// The rate of a step schedule after `steps` steps.
fn step_lr(schedule: &dyn LrSchedule, steps: u64) -> f32 {
    schedule.lr(usize::try_from(steps).unwrap_or(usize::MAX))
}

/// Stops a [`Trainer`]'s [`fit`](Trainer::fit) after its current step,
/// from any thread; made by [`Trainer::stop_handle`]. Cheap to clone.
///
/// # Examples
///
/// Train until another thread says stop (here, a hook after 10 steps):
///
/// ```
/// use netcl::Tensor;
/// use netcl::data::TensorDataset;
/// use netcl::nn::{Linear, Module};
/// use netcl::optim::{Sgd, SgdConfig};
/// use netcl::train::Trainer;
/// use netcl::rand::SeedableRng;
///
/// let model = Linear::new(2, 3, &mut netcl::rand::rngs::StdRng::seed_from_u64(0));
/// let optimizer = Sgd::new(model.parameters(), SgdConfig::new(0.1));
/// let data = TensorDataset::new(Tensor::ones(&[64, 2]), Tensor::zeros(&[64]))?;
/// let mut trainer = Trainer::new(model, optimizer, data).batch_size(8).progress(false);
/// let stop = trainer.stop_handle();
/// let mut trainer = trainer.on_step(move |info, _| {
///     if info.step == 10 {
///         stop.stop();
///     }
/// });
/// let history = trainer.fit(1_000)?;
/// assert_eq!(trainer.steps_done(), 10);
/// assert_eq!(history.len(), 1, "epoch 0 (8 steps) completed, epoch 1 stopped");
/// # Ok::<(), netcl::Error>(())
/// ```
#[derive(Debug, Clone, Default)]
pub struct StopHandle(Arc<std::sync::atomic::AtomicBool>);

impl StopHandle {
    /// Asks the trainer to stop after its current step. A `fit` running
    /// (or the next one) returns then, and the request is consumed.
    ///
    /// # Examples
    ///
    /// A stop requested before `fit` ends the next `fit` after its first
    /// step; the `fit` after that runs normally:
    ///
    /// ```
    /// use netcl::Tensor;
    /// use netcl::data::TensorDataset;
    /// use netcl::nn::{Linear, Module};
    /// use netcl::optim::{Sgd, SgdConfig};
    /// use netcl::train::Trainer;
    ///
    /// let model = Linear::zeros(2, 3)?;
    /// let optimizer = Sgd::new(model.parameters(), SgdConfig::new(0.1));
    /// let data = TensorDataset::new(Tensor::ones(&[64, 2]), Tensor::zeros(&[64]))?;
    /// let mut trainer = Trainer::new(model, optimizer, data).batch_size(8).progress(false);
    ///
    /// let stop = trainer.stop_handle();
    /// std::thread::spawn(move || stop.stop()).join().unwrap();
    /// assert!(trainer.stop_handle().is_stopped());
    ///
    /// let history = trainer.fit(10)?;
    /// assert!(history.is_empty(), "the stopped epoch is not recorded");
    /// assert_eq!(trainer.steps_done(), 1);
    /// assert!(!trainer.stop_handle().is_stopped(), "the request is consumed");
    ///
    /// assert_eq!(trainer.fit(1)?.len(), 1);
    /// assert_eq!(trainer.steps_done(), 1 + 8);
    /// # Ok::<(), netcl::Error>(())
    /// ```
    pub fn stop(&self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether a stop is requested and not yet consumed.
    pub fn is_stopped(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn take(&self) -> bool {
        self.0.swap(false, std::sync::atomic::Ordering::Relaxed)
    }
}

/// A hook called after every optimizer step; see [`Trainer::on_step`].
type StepHook<M> = Box<dyn FnMut(&StepInfo, &M) + Send>;

fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    logits.try_cross_entropy(targets)
}

/// Evaluates a classifier on `dataset` with the cross-entropy loss: batches
/// of `batch_size` run in parallel, and the result is weighted by sample.
///
/// Always runs under [`no_grad`] and in evaluation mode
/// ([`eval_mode`]) on this thread and the workers it uses, whatever the
/// caller's modes, so nothing is recorded and [`Dropout`](crate::nn::Dropout)
/// is off. The model's own flag is never touched: other threads training or
/// evaluating the same model at the same time are unaffected, and
/// evaluations of one model can run concurrently. The model's output must
/// be logits `[batch, classes]`, the targets class indices `[batch]`.
///
/// # Errors
///
/// [`Error::InvalidArgument`] if `dataset` is empty or `batch_size` is 0,
/// and the first error of reading a batch, the forward or the loss.
///
/// # Examples
///
/// ```
/// use netcl::Tensor;
/// use netcl::data::TensorDataset;
/// use netcl::nn::Linear;
///
/// // A fixed linear classifier: class 1 if x > 0.
/// let w = Tensor::from_vec(vec![-1.0, 1.0], &[1, 2])?;
/// let model = Linear::from_parts(w, None)?;
/// let x = Tensor::from_vec(vec![-2.0, -1.0, 1.0, 2.0], &[4, 1])?;
/// let y = Tensor::from_vec(vec![0.0, 0.0, 1.0, 0.0], &[4])?;
/// let result = netcl::train::evaluate(&model, &TensorDataset::new(x, y)?, 2)?;
/// assert_eq!((result.accuracy, result.samples), (0.75, 4));
/// # Ok::<(), netcl::Error>(())
/// ```
pub fn evaluate<M, D>(model: &M, dataset: &D, batch_size: usize) -> Result<Evaluation>
where
    M: Module + ?Sized,
    D: Dataset + ?Sized,
{
    evaluate_with(model, dataset, batch_size, &cross_entropy)
}

fn evaluate_with<M, D>(
    model: &M,
    dataset: &D,
    batch_size: usize,
    loss_fn: &LossFn,
) -> Result<Evaluation>
where
    M: Module + ?Sized,
    D: Dataset + ?Sized,
{
    let n = dataset.len();
    if n == 0 || batch_size == 0 {
        return Err(Error::InvalidArgument {
            op: "evaluate",
            message: format!(
                "need a non-empty dataset and a positive batch size, got {n} samples and batch size {batch_size}"
            ),
        });
    }
    let _no_grad = no_grad();
    let _eval = eval_mode();
    let ranges: Vec<Range<usize>> = (0..n)
        .step_by(batch_size)
        .map(|start| start..(start + batch_size).min(n))
        .collect();
    // Each worker enters this thread's (no_grad) mode: nothing records.
    let per_batch = parallel::map(&ranges, |range| -> Result<(f64, f64, usize)> {
        let indices: Vec<usize> = range.clone().collect();
        let batch = dataset.get_batch(&indices)?;
        let logits = model.forward(&batch.inputs)?;
        let loss = loss_fn(&logits, &batch.targets)?.try_item()?;
        let correct = logits
            .try_argmax(-1)?
            .try_eq(&batch.targets)?
            .sum()
            .try_item()?;
        let len = batch.len();
        Ok((f64::from(loss) * len as f64, f64::from(correct), len))
    });
    // Summed in batch order, so the result does not depend on scheduling.
    let (mut loss, mut correct, mut samples) = (0.0, 0.0, 0);
    for result in per_batch {
        let (l, c, len) = result?;
        loss += l;
        correct += c;
        samples += len;
    }
    Ok(Evaluation {
        loss: (loss / samples as f64) as f32,
        accuracy: (correct / samples as f64) as f32,
        samples,
    })
}

/// Trains a classifier: each epoch shuffles the training set (seeded),
/// takes one optimizer step per batch, then evaluates on the evaluation set
/// if there is one.
///
/// - Deterministic for a given seed: the shuffle of epoch `e` is drawn from
///   `(seed, e)`, batches are processed in order, and evaluation sums its
///   per-batch results in order. (Seed the model's initialisation and any
///   [`Dropout`](crate::nn::Dropout) too.)
/// - Training steps record whatever the caller's grad mode (they need a
///   graph); evaluation never records.
/// - A progress bar is drawn on stderr during [`fit`](Trainer::fit) when
///   both stdout and stderr are terminals, unless turned off with
///   [`progress(false)`](Trainer::progress).
///
/// The default loss is [`cross_entropy`](Tensor::cross_entropy) on logits
/// `[batch, classes]` and class-index targets `[batch]`; accuracy compares
/// the arg-max of the logits with the targets.
///
/// # Examples
///
/// Fit `y = class of x` for two well separated clusters, with SGD and a
/// cosine schedule:
///
/// ```
/// use netcl::Tensor;
/// use netcl::data::TensorDataset;
/// use netcl::nn::{Linear, Module};
/// use netcl::optim::{CosineAnnealing, Sgd, SgdConfig};
/// use netcl::train::Trainer;
/// use netcl::rand::SeedableRng;
///
/// let x = Tensor::from_vec(vec![-2.0, -1.5, -1.0, 1.0, 1.5, 2.0], &[6, 1])?;
/// let y = Tensor::from_vec(vec![0.0, 0.0, 0.0, 1.0, 1.0, 1.0], &[6])?;
/// let data = TensorDataset::new(x, y)?;
///
/// let model = Linear::new(1, 2, &mut netcl::rand::rngs::StdRng::seed_from_u64(0));
/// let optimizer = Sgd::new(model.parameters(), SgdConfig::new(0.5).momentum(0.9));
/// let mut trainer = Trainer::new(model, optimizer, data.clone())
///     .batch_size(2)
///     .seed(3)
///     .eval_set(data)
///     .schedule(CosineAnnealing::new(0.5, 0.01, 20))
///     .progress(false);
/// let history = trainer.fit(20)?;
/// assert_eq!(history[19].eval_accuracy(), Some(1.0));
/// assert!(history[19].train_loss < history[0].train_loss);
/// # Ok::<(), netcl::Error>(())
/// ```
///
/// The [module docs](self) train an MLP on the digits.
pub struct Trainer<M: Module, O: Optimizer> {
    model: M,
    optimizer: O,
    train_set: Arc<dyn Dataset>,
    eval_set: Option<Arc<dyn Dataset>>,
    batch_size: usize,
    eval_batch_size: usize,
    seed: u64,
    schedule: Option<Box<dyn LrSchedule>>,
    step_schedule: Option<Box<dyn LrSchedule>>,
    clip: Option<f32>,
    loss_fn: Box<LossFn>,
    progress: bool,
    history: Vec<EpochMetrics>,
    history_limit: Option<usize>,
    epochs: usize,
    steps: u64,
    stop: StopHandle,
    skipped: u64,
    non_finite: NonFinite,
    hooks: Vec<StepHook<M>>,
}

impl<M: Module, O: Optimizer> Trainer<M, O> {
    /// A trainer of `model` by `optimizer` (built on the model's
    /// parameters) on `train_set`, with batch size 32, evaluation batch size
    /// 256, seed 0, no evaluation set, no schedule and the progress bar on
    /// (when on a terminal).
    pub fn new(model: M, optimizer: O, train_set: impl Dataset + 'static) -> Trainer<M, O> {
        Trainer {
            model,
            optimizer,
            train_set: Arc::new(train_set),
            eval_set: None,
            batch_size: 32,
            eval_batch_size: 256,
            seed: 0,
            schedule: None,
            step_schedule: None,
            clip: None,
            loss_fn: Box::new(cross_entropy),
            progress: true,
            history: Vec::new(),
            history_limit: None,
            epochs: 0,
            steps: 0,
            stop: StopHandle::default(),
            skipped: 0,
            non_finite: NonFinite::Error,
            hooks: Vec::new(),
        }
    }

    /// Sets the training batch size.
    #[must_use]
    pub fn batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size;
        self
    }

    /// Sets the batch size of evaluation (which needs no graph memory, so
    /// it can be larger).
    #[must_use]
    pub fn eval_batch_size(mut self, batch_size: usize) -> Self {
        self.eval_batch_size = batch_size;
        self
    }

    /// Sets the seed of the training shuffle.
    #[must_use]
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Sets the dataset evaluated after each epoch and by
    /// [`evaluate`](Trainer::evaluate).
    #[must_use]
    pub fn eval_set(mut self, eval_set: impl Dataset + 'static) -> Self {
        self.eval_set = Some(Arc::new(eval_set));
        self
    }

    /// Sets a learning-rate schedule, applied at the start of each epoch.
    #[must_use]
    pub fn schedule(mut self, schedule: impl LrSchedule + 'static) -> Self {
        self.schedule = Some(Box::new(schedule));
        self
    }

    /// Sets a learning-rate schedule indexed by optimisation step, applied
    /// before every step: the step's rate is `schedule.lr(n)` with `n` the
    /// steps taken before it over the trainer's life (0 for the first), so
    /// a [`Warmup`](crate::optim::Warmup) warms up over steps, as a model
    /// that trains for less than an epoch needs. It takes precedence over
    /// a per-epoch [`schedule`](Trainer::schedule). [`StepInfo::lr`] is the
    /// step's rate and [`EpochMetrics::lr`] the rate of the epoch's first
    /// step.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::sync::{Arc, Mutex};
    ///
    /// use netcl::Tensor;
    /// use netcl::data::TensorDataset;
    /// use netcl::nn::{Linear, Module};
    /// use netcl::optim::{Constant, Sgd, SgdConfig, Warmup};
    /// use netcl::train::Trainer;
    ///
    /// let model = Linear::zeros(2, 3)?;
    /// let optimizer = Sgd::new(model.parameters(), SgdConfig::new(0.1));
    /// let data = TensorDataset::new(Tensor::ones(&[32, 2]), Tensor::zeros(&[32]))?;
    /// let rates = Arc::new(Mutex::new(Vec::new()));
    /// let log = Arc::clone(&rates);
    /// let mut trainer = Trainer::new(model, optimizer, data)
    ///     .batch_size(8)
    ///     .progress(false)
    ///     .step_schedule(Warmup::new(4, Constant(0.1)))
    ///     .on_step(move |info, _| log.lock().unwrap().push(info.lr));
    /// trainer.fit(2)?;
    /// let expected = [0.025, 0.05, 0.075, 0.1, 0.1, 0.1, 0.1, 0.1];
    /// let rates = rates.lock().unwrap();
    /// assert!(rates.iter().zip(expected).all(|(r, e)| (r - e).abs() < 1e-7), "{rates:?}");
    /// assert_eq!(trainer.history()[1].lr, 0.1);
    /// # Ok::<(), netcl::Error>(())
    /// ```
    #[must_use]
    pub fn step_schedule(mut self, schedule: impl LrSchedule + 'static) -> Self {
        self.step_schedule = Some(Box::new(schedule));
        self
    }

    /// Clips the gradients to a global 2-norm of at most `max_norm` before
    /// every optimizer step ([`optim::clip_grad_norm`](crate::optim::clip_grad_norm),
    /// as PyTorch training loops call `clip_grad_norm_`); each step's norm
    /// before clipping is in [`StepInfo::grad_norm`].
    ///
    /// A step whose norm is NaN or infinite is not taken: [`fit`](Trainer::fit)
    /// stops with [`Error::NonFiniteGradient`], or skips the batch under
    /// [`NonFinite::Skip`] (counted by [`skipped_steps`](Trainer::skipped_steps)),
    /// as for a non-finite loss.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::sync::{Arc, Mutex};
    ///
    /// use netcl::Tensor;
    /// use netcl::data::TensorDataset;
    /// use netcl::nn::{Linear, Module};
    /// use netcl::optim::{Sgd, SgdConfig};
    /// use netcl::train::Trainer;
    ///
    /// let model = Linear::zeros(2, 3)?;
    /// let optimizer = Sgd::new(model.parameters(), SgdConfig::new(0.1));
    /// let data = TensorDataset::new(Tensor::full(&[8, 2], 100.0), Tensor::zeros(&[8]))?;
    /// let norms = Arc::new(Mutex::new(Vec::new()));
    /// let log = Arc::clone(&norms);
    /// let mut trainer = Trainer::new(model, optimizer, data)
    ///     .batch_size(8)
    ///     .progress(false)
    ///     .clip_grad_norm(1.0)
    ///     .on_step(move |info, _| log.lock().unwrap().push(info.grad_norm.unwrap()));
    /// trainer.fit(1)?;
    /// assert!(norms.lock().unwrap()[0] > 1.0, "the gradient was larger...");
    /// let w = trainer.model().weight().to_vec();
    /// let b = trainer.model().bias().unwrap().to_vec();
    /// let step = w.iter().chain(&b).map(|v| v * v).sum::<f32>().sqrt();
    /// assert!((step - 0.1).abs() < 1e-5, "...the step is lr · 1: {step}");
    /// # Ok::<(), netcl::Error>(())
    /// ```
    #[must_use]
    pub fn clip_grad_norm(mut self, max_norm: f32) -> Self {
        self.clip = Some(max_norm);
        self
    }

    /// Replaces the loss (cross-entropy by default).
    ///
    /// # Examples
    ///
    /// ```
    /// # use netcl::nn::{Linear, Module};
    /// # use netcl::optim::{Sgd, SgdConfig};
    /// # use netcl::data::TensorDataset;
    /// # use netcl::Tensor;
    /// # use netcl::rand::SeedableRng;
    /// # let model = Linear::new(2, 3, &mut netcl::rand::rngs::StdRng::seed_from_u64(0));
    /// # let optimizer = Sgd::new(model.parameters(), SgdConfig::new(0.1));
    /// # let train = TensorDataset::new(Tensor::zeros(&[4, 2]), Tensor::zeros(&[4]))?;
    /// use netcl::train::Trainer;
    ///
    /// // Cross-entropy plus a penalty on large logits.
    /// let trainer = Trainer::new(model, optimizer, train).loss_fn(|logits, targets| {
    ///     let penalty = logits.powf(2.0).mean() * 1e-3;
    ///     Ok(logits.try_cross_entropy(targets)? + penalty)
    /// });
    /// # Ok::<(), netcl::Error>(())
    /// ```
    #[must_use]
    pub fn loss_fn(
        mut self,
        loss_fn: impl Fn(&Tensor, &Tensor) -> Result<Tensor> + Send + Sync + 'static,
    ) -> Self {
        self.loss_fn = Box::new(loss_fn);
        self
    }

    /// Adds a hook called after every optimizer step of
    /// [`fit`](Trainer::fit), on the training thread, with what the step
    /// did and the model. Hooks run in the order they were added.
    ///
    /// The model is between two steps when a hook runs, so this is the
    /// place to publish it for serving ([`Published::publish`]), every step
    /// or every `n` (`info.step % n == 0`).
    ///
    /// [`Published::publish`]: crate::nn::Published::publish
    ///
    /// # Examples
    ///
    /// Publish a version every 10 steps while training:
    ///
    /// ```
    /// use std::sync::Arc;
    ///
    /// use netcl::Tensor;
    /// use netcl::data::TensorDataset;
    /// use netcl::nn::{Linear, Module, Published};
    /// use netcl::optim::{Sgd, SgdConfig};
    /// use netcl::train::Trainer;
    /// use netcl::rand::SeedableRng;
    ///
    /// let model = Linear::new(2, 3, &mut netcl::rand::rngs::StdRng::seed_from_u64(0));
    /// let published = Arc::new(Published::new(&model)?);
    /// let optimizer = Sgd::new(model.parameters(), SgdConfig::new(0.1));
    /// let data = TensorDataset::new(Tensor::ones(&[64, 2]), Tensor::zeros(&[64]))?;
    /// let mut trainer = Trainer::new(model, optimizer, data).batch_size(8).progress(false).on_step({
    ///     let published = Arc::clone(&published);
    ///     move |info, model| {
    ///         if info.step % 10 == 0 {
    ///             published.publish(model).unwrap();
    ///         }
    ///     }
    /// });
    /// trainer.fit(5)?; // 40 steps
    /// assert_eq!(published.version(), 4);
    /// # Ok::<(), netcl::Error>(())
    /// ```
    #[must_use]
    pub fn on_step(mut self, hook: impl FnMut(&StepInfo, &M) + Send + 'static) -> Self {
        self.hooks.push(Box::new(hook));
        self
    }

    /// Optimizer steps taken so far, over the trainer's life.
    pub fn steps_done(&self) -> u64 {
        self.steps
    }

    /// A handle that stops [`fit`](Trainer::fit) after its current step,
    /// from any thread (a server's shutdown, a hook). See [`StopHandle`].
    ///
    /// Every handle of a trainer shares one stop request.
    ///
    /// # Examples
    ///
    /// Another thread stops a long `fit` once it has seen 20 steps:
    ///
    /// ```
    /// use std::sync::Arc;
    /// use std::sync::atomic::{AtomicU64, Ordering};
    ///
    /// use netcl::Tensor;
    /// use netcl::data::TensorDataset;
    /// use netcl::nn::{Linear, Module};
    /// use netcl::optim::{Sgd, SgdConfig};
    /// use netcl::train::Trainer;
    ///
    /// let model = Linear::zeros(2, 3)?;
    /// let optimizer = Sgd::new(model.parameters(), SgdConfig::new(0.1));
    /// let data = TensorDataset::new(Tensor::ones(&[64, 2]), Tensor::zeros(&[64]))?;
    /// let seen = Arc::new(AtomicU64::new(0));
    /// let mut trainer = Trainer::new(model, optimizer, data).batch_size(8).progress(false).on_step({
    ///     let seen = Arc::clone(&seen);
    ///     move |info, _| seen.store(info.step, Ordering::Relaxed)
    /// });
    ///
    /// let stop = trainer.stop_handle();
    /// let watcher = std::thread::spawn(move || {
    ///     while seen.load(Ordering::Relaxed) < 20 {
    ///         std::thread::yield_now();
    ///     }
    ///     stop.stop();
    /// });
    /// let history = trainer.fit(1_000_000)?;
    /// watcher.join().unwrap();
    /// assert!(trainer.steps_done() >= 20);
    /// assert!(history.len() < 1_000_000);
    /// # Ok::<(), netcl::Error>(())
    /// ```
    pub fn stop_handle(&self) -> StopHandle {
        self.stop.clone()
    }

    /// Sets what [`fit`](Trainer::fit) does when a batch's loss is NaN or
    /// infinite: stop with an error (the default) or skip the batch.
    ///
    /// A non-finite loss means the gradients would be too: one such step
    /// would spread NaN into every parameter and silently ruin the model.
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::Tensor;
    /// use netcl::data::TensorDataset;
    /// use netcl::nn::{Linear, Module};
    /// use netcl::optim::{Sgd, SgdConfig};
    /// use netcl::train::{NonFinite, Trainer};
    /// use netcl::rand::SeedableRng;
    ///
    /// // One sample out of four has a NaN feature.
    /// let x = Tensor::from_vec(vec![1.0, 2.0, f32::NAN, 4.0], &[4, 1])?;
    /// let data = TensorDataset::new(x, Tensor::zeros(&[4]))?;
    /// let model = || Linear::new(1, 2, &mut netcl::rand::rngs::StdRng::seed_from_u64(0));
    ///
    /// let layer = model();
    /// let optimizer = Sgd::new(layer.parameters(), SgdConfig::new(0.1));
    /// let mut trainer = Trainer::new(layer, optimizer, data.clone()).batch_size(1).progress(false);
    /// let err = trainer.fit(1).unwrap_err();
    /// assert!(matches!(err, netcl::Error::NonFiniteLoss { epoch: 0, batch: 2, step: 3, .. }));
    /// // The parameters are those of the last finite step.
    /// assert!(trainer.model().weight().to_vec().iter().all(|w| w.is_finite()));
    ///
    /// let layer = model();
    /// let optimizer = Sgd::new(layer.parameters(), SgdConfig::new(0.1));
    /// let mut trainer = Trainer::new(layer, optimizer, data)
    ///     .batch_size(1)
    ///     .progress(false)
    ///     .on_non_finite(NonFinite::Skip);
    /// trainer.fit(1)?;
    /// assert_eq!((trainer.steps_done(), trainer.skipped_steps()), (3, 1));
    /// # Ok::<(), netcl::Error>(())
    /// ```
    #[must_use]
    pub fn on_non_finite(mut self, policy: NonFinite) -> Self {
        self.non_finite = policy;
        self
    }

    /// Batches skipped so far because their loss was not finite (with
    /// [`NonFinite::Skip`]).
    pub fn skipped_steps(&self) -> u64 {
        self.skipped
    }

    /// Keeps the metrics of at most the last `epochs` epochs in
    /// [`history`](Trainer::history) (the default keeps every epoch's).
    ///
    /// A trainer that runs without end, such as a server's online training
    /// calling [`fit(1)`](Trainer::fit) in a loop, would otherwise grow its
    /// history by one [`EpochMetrics`] per epoch for as long as it runs.
    /// [`fit`](Trainer::fit) still returns the metrics of every epoch it
    /// trained, and [`epochs_done`](Trainer::epochs_done) still counts every
    /// epoch.
    ///
    /// ```
    /// use netcl::Tensor;
    /// use netcl::data::TensorDataset;
    /// use netcl::nn::{Linear, Module};
    /// use netcl::optim::{Sgd, SgdConfig};
    /// use netcl::train::Trainer;
    ///
    /// let data = TensorDataset::new(Tensor::ones(&[10, 2]), Tensor::zeros(&[10]))?;
    /// let model = Linear::zeros(2, 3)?;
    /// let optimizer = Sgd::new(model.parameters(), SgdConfig::new(0.1));
    /// let mut trainer = Trainer::new(model, optimizer, data).history_limit(2).progress(false);
    /// for _ in 0..5 {
    ///     trainer.fit(1)?;
    /// }
    /// assert_eq!(trainer.epochs_done(), 5);
    /// let kept: Vec<usize> = trainer.history().iter().map(|m| m.epoch).collect();
    /// assert_eq!(kept, [3, 4]);
    /// # Ok::<(), netcl::Error>(())
    /// ```
    #[must_use]
    pub fn history_limit(mut self, epochs: usize) -> Self {
        self.history_limit = Some(epochs);
        self.trim_history();
        self
    }

    fn trim_history(&mut self) {
        if let Some(limit) = self.history_limit
            && self.history.len() > limit
        {
            let excess = self.history.len() - limit;
            self.history.drain(..excess);
        }
    }

    /// Shows (`true`, the default; only on a terminal) or hides the
    /// progress bar.
    #[must_use]
    pub fn progress(mut self, show: bool) -> Self {
        self.progress = show;
        self
    }

    /// The model.
    pub fn model(&self) -> &M {
        &self.model
    }

    /// The optimizer.
    pub fn optimizer(&self) -> &O {
        &self.optimizer
    }

    /// The optimizer, to change its settings between calls to
    /// [`fit`](Trainer::fit).
    pub fn optimizer_mut(&mut self) -> &mut O {
        &mut self.optimizer
    }

    /// The metrics of every epoch trained so far, oldest first (of the last
    /// ones only, with a [`history_limit`](Trainer::history_limit)).
    pub fn history(&self) -> &[EpochMetrics] {
        &self.history
    }

    /// The number of epochs trained so far (the number of the next epoch).
    pub fn epochs_done(&self) -> usize {
        self.epochs
    }

    /// The model and the optimizer.
    pub fn into_parts(self) -> (M, O) {
        (self.model, self.optimizer)
    }

    /// Trains `epochs` more epochs and returns their metrics (also appended
    /// to [`history`](Trainer::history)). Calling `fit(1)` repeatedly
    /// trains exactly as one `fit(n)` does.
    ///
    /// A [`StopHandle`] ends it after the current step: the epochs
    /// completed before are returned (and kept in the history), the
    /// stopped one is not; its steps stay taken.
    ///
    /// Each epoch runs in training mode ([`train_mode`]) and its evaluation
    /// in evaluation mode, set for the training thread (and the loader's
    /// and evaluation's workers) only: the model's own flag is never
    /// changed, and other threads using the model are unaffected.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] if the batch size is 0 or the training set
    /// is empty; [`Error::NonFiniteLoss`] if a batch's loss is NaN or
    /// infinite (unless [`on_non_finite`](Trainer::on_non_finite) says to
    /// skip it); the first error of reading a batch, the forward, the loss
    /// or the backward. Epochs completed before an error stay in the
    /// history.
    pub fn fit(&mut self, epochs: usize) -> Result<Vec<EpochMetrics>> {
        if self.batch_size == 0 || self.train_set.is_empty() {
            return Err(Error::InvalidArgument {
                op: "Trainer::fit",
                message: format!(
                    "need a non-empty training set and a positive batch size, got {} samples and batch size {}",
                    self.train_set.len(),
                    self.batch_size
                ),
            });
        }
        let loader =
            DataLoader::new(Arc::clone(&self.train_set), self.batch_size).shuffle(self.seed);
        let bar = self.progress_bar((epochs * loader.len()) as u64);
        let mut trained = Vec::with_capacity(epochs.min(1024));
        for _ in 0..epochs {
            match self.train_epoch(&loader, &bar)? {
                Some(metrics) => {
                    self.epochs += 1;
                    trained.push(metrics);
                    self.history.push(metrics);
                    self.trim_history();
                }
                None => break,
            }
        }
        bar.finish_and_clear();
        Ok(trained)
    }

    fn progress_bar(&self, steps: u64) -> ProgressBar {
        let on_terminal = std::io::stdout().is_terminal() && std::io::stderr().is_terminal();
        if !self.progress || !on_terminal {
            return ProgressBar::hidden();
        }
        let style = ProgressStyle::with_template(
            "{prefix} [{bar:30}] {pos}/{len} batches, {msg} ({elapsed}, eta {eta})",
        )
        .map(|style| style.progress_chars("=> "))
        .unwrap_or_else(|_| ProgressStyle::default_bar());
        ProgressBar::new(steps).with_style(style)
    }

    fn train_epoch(
        &mut self,
        loader: &DataLoader<Arc<dyn Dataset>>,
        bar: &ProgressBar,
    ) -> Result<Option<EpochMetrics>> {
        let start = Instant::now();
        let epoch = self.epochs;
        if let Some(schedule) = &self.step_schedule {
            self.optimizer
                .set_learning_rate(step_lr(&**schedule, self.steps));
        } else if let Some(schedule) = &self.schedule {
            self.optimizer.set_learning_rate(schedule.lr(epoch));
        }
        let lr = self.optimizer.learning_rate();
        if !bar.is_hidden() {
            bar.set_prefix(format!("epoch {epoch}"));
        }
        let (mut loss_sum, mut samples) = (0.0_f64, 0_usize);
        {
            // Training needs a graph and training behaviour (Dropout),
            // whatever the caller's modes; the loader thread takes these
            // modes too.
            let _grad = enable_grad();
            let _train = train_mode();
            for (index, batch) in loader.epoch(epoch as u64).enumerate() {
                let batch = batch?;
                let output = self.model.forward(&batch.inputs)?;
                let loss = (self.loss_fn)(&output, &batch.targets)?;
                let value = loss.try_item()?;
                if !value.is_finite() {
                    let error = Error::NonFiniteLoss {
                        epoch,
                        batch: index,
                        step: self.steps + 1,
                        loss: value,
                    };
                    match self.non_finite {
                        NonFinite::Error => return Err(error),
                        NonFinite::Skip => {
                            eprintln!("netcl: warning: {error}; skipped");
                            self.skipped += 1;
                            continue;
                        }
                    }
                }
                self.optimizer.zero_grad();
                loss.try_backward()?;
                let grad_norm = match self.clip {
                    Some(max_norm) => {
                        let params = self.model.parameters();
                        let norm = crate::optim::try_clip_grad_norm(&params, max_norm, 2.0)?;
                        if !norm.is_finite() {
                            let error = Error::NonFiniteGradient {
                                epoch,
                                batch: index,
                                step: self.steps + 1,
                                norm,
                            };
                            match self.non_finite {
                                NonFinite::Error => return Err(error),
                                NonFinite::Skip => {
                                    eprintln!("netcl: warning: {error}; skipped");
                                    self.optimizer.zero_grad();
                                    self.skipped += 1;
                                    continue;
                                }
                            }
                        }
                        Some(norm)
                    }
                    None => None,
                };
                if let Some(schedule) = &self.step_schedule {
                    self.optimizer
                        .set_learning_rate(step_lr(&**schedule, self.steps));
                }
                let lr = self.optimizer.learning_rate();
                self.optimizer.step();
                loss_sum += f64::from(value) * batch.len() as f64;
                samples += batch.len();
                self.steps += 1;
                let info = StepInfo {
                    epoch,
                    batch: index,
                    step: self.steps,
                    loss: value,
                    samples: batch.len(),
                    lr,
                    grad_norm,
                };
                for hook in &mut self.hooks {
                    hook(&info, &self.model);
                }
                if self.stop.take() {
                    return Ok(None);
                }
                bar.inc(1);
                if !bar.is_hidden() {
                    bar.set_message(format!("loss {value:.4}"));
                }
            }
        }
        let eval = match &self.eval_set {
            Some(eval_set) => Some(evaluate_with(
                &self.model,
                &**eval_set,
                self.eval_batch_size,
                &*self.loss_fn,
            )?),
            None => None,
        };
        Ok(Some(EpochMetrics {
            epoch,
            lr,
            train_loss: (loss_sum / samples.max(1) as f64) as f32,
            eval,
            seconds: start.elapsed().as_secs_f64(),
        }))
    }

    /// Evaluates the model on the evaluation set: as the free function
    /// [`evaluate`] (no recording and evaluation mode on this thread,
    /// whatever the caller's modes; batches in parallel), with this
    /// trainer's loss and evaluation batch size.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] if the trainer has no evaluation set, and
    /// the errors of [`evaluate`].
    pub fn evaluate(&self) -> Result<Evaluation> {
        let eval_set = self
            .eval_set
            .as_ref()
            .ok_or_else(|| Error::InvalidArgument {
                op: "Trainer::evaluate",
                message: "no evaluation set; add one with Trainer::eval_set".to_string(),
            })?;
        self.evaluate_on(&**eval_set)
    }

    /// Evaluates the model on `dataset`, as [`evaluate`](Trainer::evaluate).
    ///
    /// # Errors
    ///
    /// As the free function [`evaluate`].
    pub fn evaluate_on<D: Dataset + ?Sized>(&self, dataset: &D) -> Result<Evaluation> {
        evaluate_with(&self.model, dataset, self.eval_batch_size, &*self.loss_fn)
    }
}

impl<M: Module, O: Optimizer + fmt::Debug> fmt::Debug for Trainer<M, O> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Trainer")
            .field("model", &self.model)
            .field("optimizer", &self.optimizer)
            .field("train_samples", &self.train_set.len())
            .field("eval_samples", &self.eval_set.as_ref().map(|set| set.len()))
            .field("batch_size", &self.batch_size)
            .field("seed", &self.seed)
            .field("epochs_done", &self.epochs)
            .finish()
    }
}
