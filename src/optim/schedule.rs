//! Learning-rate schedules: the learning rate as a function of the epoch,
//! or of the optimisation step (a language model trains for less than an
//! epoch: count steps, and set the rate before each step).

use std::fmt;

use crate::error::{Result, or_panic};
use crate::optim::check;

/// A learning rate for each epoch (counting from 0).
///
/// A schedule is a pure function of the epoch, so it needs no state, can be
/// shared between threads and gives the same rate when training resumes.
/// Apply it with [`Optimizer::set_learning_rate`](crate::optim::Optimizer::set_learning_rate)
/// at the start of each epoch, or hand it to a
/// [`Trainer`](crate::train::Trainer), which does.
///
/// # Examples
///
/// ```
/// use netcl::Tensor;
/// use netcl::optim::{LrSchedule, Optimizer, Sgd, SgdConfig, StepDecay};
///
/// let schedule = StepDecay::new(0.1, 10, 0.5);
/// let mut sgd = Sgd::new([Tensor::zeros(&[1]).requires_grad_(true)], SgdConfig::new(0.1));
/// for epoch in 0..30 {
///     sgd.set_learning_rate(schedule.lr(epoch));
///     // ... train one epoch ...
/// }
/// assert_eq!(sgd.learning_rate(), 0.025);
/// ```
pub trait LrSchedule: Send + Sync + fmt::Debug {
    /// The learning rate for `epoch`.
    fn lr(&self, epoch: usize) -> f32;
}

/// The same learning rate for every epoch.
///
/// # Examples
///
/// ```
/// use netcl::optim::{Constant, LrSchedule};
///
/// assert_eq!(Constant(0.01).lr(1000), 0.01);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Constant(pub f32);

impl LrSchedule for Constant {
    fn lr(&self, _epoch: usize) -> f32 {
        self.0
    }
}

/// Multiplies the learning rate by `gamma` every `step_size` epochs:
/// `lr(epoch) = base_lr · gamma^⌊epoch / step_size⌋` (PyTorch's `StepLR`).
///
/// # Examples
///
/// ```
/// use netcl::optim::{LrSchedule, StepDecay};
///
/// let schedule = StepDecay::new(1.0, 2, 0.1);
/// let rates: Vec<f32> = (0..5).map(|e| schedule.lr(e)).collect();
/// assert_eq!(rates, [1.0, 1.0, 0.1, 0.1, 0.010000001]);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepDecay {
    base_lr: f32,
    step_size: usize,
    gamma: f32,
}

impl StepDecay {
    /// Decay by `gamma` every `step_size` epochs from `base_lr`.
    ///
    /// # Panics
    ///
    /// As [`try_new`](StepDecay::try_new).
    #[track_caller]
    pub fn new(base_lr: f32, step_size: usize, gamma: f32) -> StepDecay {
        or_panic(StepDecay::try_new(base_lr, step_size, gamma))
    }

    /// Decay by `gamma` every `step_size` epochs from `base_lr`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`](crate::Error::InvalidArgument) if `base_lr`
    /// or `gamma` is negative or not finite, or `step_size` is 0.
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::optim::StepDecay;
    ///
    /// let err = StepDecay::try_new(0.1, 0, 0.5).unwrap_err();
    /// assert_eq!(err.to_string(), "StepDecay: step_size must be at least 1, got 0");
    /// ```
    pub fn try_new(base_lr: f32, step_size: usize, gamma: f32) -> Result<StepDecay> {
        check(
            "StepDecay",
            "base_lr",
            base_lr,
            |v| v >= 0.0,
            "finite and >= 0",
        )?;
        check("StepDecay", "gamma", gamma, |v| v >= 0.0, "finite and >= 0")?;
        if step_size == 0 {
            return Err(crate::Error::InvalidArgument {
                op: "StepDecay",
                message: "step_size must be at least 1, got 0".to_string(),
            });
        }
        Ok(StepDecay {
            base_lr,
            step_size,
            gamma,
        })
    }
}

impl LrSchedule for StepDecay {
    fn lr(&self, epoch: usize) -> f32 {
        let decays = i32::try_from(epoch / self.step_size).unwrap_or(i32::MAX);
        self.base_lr * self.gamma.powi(decays)
    }
}

/// Cosine annealing from `base_lr` down to `min_lr` over `epochs` epochs,
/// then `min_lr` (PyTorch's `CosineAnnealingLR` without restarts):
/// `lr(e) = min_lr + (base_lr - min_lr) · (1 + cos(π·e / epochs)) / 2`.
///
/// # Examples
///
/// ```
/// use netcl::optim::{CosineAnnealing, LrSchedule};
///
/// let schedule = CosineAnnealing::new(0.1, 0.0, 10);
/// assert_eq!(schedule.lr(0), 0.1);
/// assert!((schedule.lr(5) - 0.05).abs() < 1e-7);
/// assert_eq!(schedule.lr(10), 0.0);
/// assert_eq!(schedule.lr(50), 0.0);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CosineAnnealing {
    base_lr: f32,
    min_lr: f32,
    epochs: usize,
}

impl CosineAnnealing {
    /// Anneal from `base_lr` to `min_lr` over `epochs` epochs.
    ///
    /// # Panics
    ///
    /// As [`try_new`](CosineAnnealing::try_new).
    #[track_caller]
    pub fn new(base_lr: f32, min_lr: f32, epochs: usize) -> CosineAnnealing {
        or_panic(CosineAnnealing::try_new(base_lr, min_lr, epochs))
    }

    /// Anneal from `base_lr` to `min_lr` over `epochs` epochs.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`](crate::Error::InvalidArgument) if a rate is
    /// negative or not finite, or `epochs` is 0.
    pub fn try_new(base_lr: f32, min_lr: f32, epochs: usize) -> Result<CosineAnnealing> {
        let op = "CosineAnnealing";
        check(op, "base_lr", base_lr, |v| v >= 0.0, "finite and >= 0")?;
        check(op, "min_lr", min_lr, |v| v >= 0.0, "finite and >= 0")?;
        if epochs == 0 {
            return Err(crate::Error::InvalidArgument {
                op,
                message: "epochs must be at least 1, got 0".to_string(),
            });
        }
        Ok(CosineAnnealing {
            base_lr,
            min_lr,
            epochs,
        })
    }
}

impl LrSchedule for CosineAnnealing {
    fn lr(&self, epoch: usize) -> f32 {
        if epoch >= self.epochs {
            return self.min_lr;
        }
        let progress = epoch as f64 / self.epochs as f64;
        let cosine = (1.0 + (std::f64::consts::PI * progress).cos()) / 2.0;
        (f64::from(self.min_lr) + f64::from(self.base_lr - self.min_lr) * cosine) as f32
    }
}

/// A linear warm-up over the first `warmup_steps` indices in front of
/// `schedule`, for schedules indexed by optimisation step:
///
/// - `lr(t) = schedule.lr(0) · (t + 1) / warmup_steps` for `t < warmup_steps`
///   (the first step already moves, the last warm-up step reaches the full
///   rate);
/// - `lr(t) = schedule.lr(t - warmup_steps)` after: the wrapped schedule
///   starts when the warm-up ends (as the warm-up-then-cosine schedules of
///   GPT-style training do).
///
/// Call it with the step count (from 0) before every
/// [`Optimizer::step`](crate::optim::Optimizer::step). Handed to a
/// [`Trainer`](crate::train::Trainer), which applies schedules per epoch,
/// it warms up over epochs instead.
///
/// # Examples
///
/// 4 warm-up steps, then a cosine decay from 1.0 to 0.0 over 10 steps:
///
/// ```
/// use netcl::Tensor;
/// use netcl::optim::{CosineAnnealing, LrSchedule, Optimizer, Sgd, SgdConfig, Warmup};
///
/// let schedule = Warmup::new(4, CosineAnnealing::new(1.0, 0.0, 10));
/// let rates: Vec<f32> = (0..6).map(|t| schedule.lr(t)).collect();
/// assert_eq!(rates, [0.25, 0.5, 0.75, 1.0, 1.0, schedule.lr(5)]);
/// assert!((schedule.lr(9) - 0.5).abs() < 1e-6, "halfway through the cosine");
/// assert_eq!(schedule.lr(14), 0.0);
///
/// let mut sgd = Sgd::new([Tensor::zeros(&[1]).requires_grad_(true)], SgdConfig::new(1.0));
/// for step in 0..6 {
///     sgd.set_learning_rate(schedule.lr(step));
///     // ... forward, backward ...
///     sgd.step();
/// }
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Warmup<S> {
    warmup_steps: usize,
    schedule: S,
}

impl<S: LrSchedule> Warmup<S> {
    /// Warm up linearly over `warmup_steps` steps, then follow `schedule`
    /// (0 steps: `schedule` alone).
    pub fn new(warmup_steps: usize, schedule: S) -> Warmup<S> {
        Warmup {
            warmup_steps,
            schedule,
        }
    }

    /// The number of warm-up steps.
    pub fn warmup_steps(&self) -> usize {
        self.warmup_steps
    }

    /// The schedule that follows the warm-up.
    pub fn schedule(&self) -> &S {
        &self.schedule
    }
}

impl<S: LrSchedule> LrSchedule for Warmup<S> {
    fn lr(&self, step: usize) -> f32 {
        if step < self.warmup_steps {
            let fraction = (step + 1) as f64 / self.warmup_steps as f64;
            (f64::from(self.schedule.lr(0)) * fraction) as f32
        } else {
            self.schedule.lr(step - self.warmup_steps)
        }
    }
}
