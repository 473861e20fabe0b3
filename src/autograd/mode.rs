//! Grad mode: the per-thread recording context, its guards and its snapshot.
//!
//! Each thread has its own context: a flag (on by default) saying whether ops
//! record, a training/evaluation mode (unset by default: each module's own
//! flag decides), and a current tape, created on first use. Nothing here is
//! shared between threads, so one thread's `no_grad` or `eval_mode` can never
//! change what another thread computes. The price is that a new thread, or a
//! rayon worker, does not see its caller's mode: [`GradMode`] is the snapshot
//! that carries it there explicitly.

use std::cell::{Cell, RefCell};
use std::fmt;
use std::marker::PhantomData;

use crate::autograd::tape::Tape;
use crate::sync::{Arc, thread_local_const};

struct Context {
    enabled: Cell<bool>,
    /// The thread's training mode, if a guard set one; `None` leaves each
    /// module's own flag in charge.
    training: Cell<Option<bool>>,
    /// Anomaly detection: off by default.
    anomaly: Cell<bool>,
    tape: RefCell<Option<Arc<Tape>>>,
    /// Number of live guards on this thread, to check they drop in LIFO order.
    depth: Cell<u32>,
}

thread_local_const! {
    static CONTEXT: Context = Context {
        enabled: Cell::new(true),
        training: Cell::new(None),
        anomaly: Cell::new(false),
        tape: RefCell::new(None),
        depth: Cell::new(0),
    };
}

/// Returns whether ops on this thread record onto the tape.
///
/// True by default on every thread, including threads a pool spawns: a worker
/// only sees its caller's mode if the caller's [`GradMode`] is entered there,
/// as every parallel helper of netcl does.
///
/// # Examples
///
/// ```
/// use netcl::autograd::{is_grad_enabled, no_grad};
///
/// assert!(is_grad_enabled());
/// {
///     let _guard = no_grad();
///     assert!(!is_grad_enabled());
/// }
/// assert!(is_grad_enabled());
/// ```
pub fn is_grad_enabled() -> bool {
    // During thread teardown the context is gone; nothing records then.
    CONTEXT
        .try_with(|context| context.enabled.get())
        .unwrap_or(false)
}

/// This thread's grad flag and anomaly-detection flag, in one thread-local
/// access: what every op asks before recording.
pub(crate) fn recording_flags() -> (bool, bool) {
    CONTEXT
        .try_with(|context| (context.enabled.get(), context.anomaly.get()))
        .unwrap_or((false, false))
}

/// Whether anomaly detection is on for this thread; see [`detect_anomaly`].
pub fn is_anomaly_enabled() -> bool {
    CONTEXT
        .try_with(|context| context.anomaly.get())
        .unwrap_or(false)
}

/// Switches anomaly detection on for this thread until the returned guard
/// drops: a debugging mode that finds the op where a NaN or an infinity
/// first appears.
///
/// While it is on:
///
/// - every op checks its output: an op that produces a NaN or an infinite
///   value from finite inputs fails with [`Error::Anomaly`] (its `try_`
///   form returns it, the plain form and ops without a `try_` form panic
///   with its message);
/// - every recorded node keeps the source location (file:line:column) of
///   the op call that recorded it;
/// - a backward pass on this thread checks every gradient it computes (and
///   every sum of an input's gradients, which can overflow though each part
///   is finite), and stops at the first one holding a NaN or an infinity:
///   [`try_backward`](crate::Tensor::try_backward) returns an
///   [`Error::Anomaly`] naming the op, the input and the location of the
///   forward call that recorded it, and `backward` panics with the same
///   message.
///
/// Off (the default), it costs one flag read per op. It is per thread like
/// grad mode (PyTorch's switch is process-global): other threads are
/// unaffected, and a [`GradMode`] carries it into `netcl::parallel` tasks.
///
/// [`Error::Anomaly`]: crate::Error::Anomaly
///
/// # Examples
///
/// `sqrt` at 0 has an infinite derivative, so the gradient of `sqrt(x)·0`
/// is `∞·0 = NaN`:
///
/// ```
/// use netcl::{Error, Tensor, autograd};
///
/// let x = Tensor::from_vec(vec![4.0, 0.0], &[2])?.requires_grad_(true);
/// let _anomaly = autograd::detect_anomaly();
/// let loss = (x.sqrt() * 0.0).sum();
/// let err = loss.try_backward().unwrap_err();
/// assert!(matches!(err, Error::Anomaly { op: "sqrt", input: Some(0), .. }));
/// // "anomaly detected: in backward, the gradient of `sqrt` with respect to
/// // its input 0 has NaN; `sqrt` was recorded at src/main.rs:7:13"
/// assert!(err.to_string().contains("the gradient of `sqrt` with respect to its input 0 has NaN"));
/// # Ok::<(), netcl::Error>(())
/// ```
pub fn detect_anomaly() -> AnomalyGuard {
    AnomalyGuard::new(true)
}

/// Restores this thread's previous anomaly-detection flag when dropped;
/// returned by [`detect_anomaly`] and [`AnomalyGuard::new`].
///
/// Like [`GradGuard`]: `#[must_use]`, `!Send`, restored also while
/// unwinding, and guards drop in reverse order of creation.
#[must_use = "anomaly detection is switched back as soon as the guard drops; bind it with `let _guard = ...`"]
pub struct AnomalyGuard {
    previous: bool,
    depth: u32,
    _not_send: PhantomData<*const ()>,
}

impl AnomalyGuard {
    /// Sets this thread's anomaly detection to `enabled` until the guard
    /// drops.
    pub fn new(enabled: bool) -> AnomalyGuard {
        let previous = CONTEXT.with(|context| context.anomaly.replace(enabled));
        AnomalyGuard {
            previous,
            depth: push_guard(),
            _not_send: PhantomData,
        }
    }
}

impl Drop for AnomalyGuard {
    fn drop(&mut self) {
        let _ = CONTEXT.try_with(|context| context.anomaly.set(self.previous));
        pop_guard(self.depth);
    }
}

impl fmt::Debug for AnomalyGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AnomalyGuard")
            .field("previous", &self.previous)
            .finish()
    }
}

/// Sets this thread's grad mode and returns the previous value.
///
/// A one-shot switch: it lasts until changed again. Prefer a guard
/// ([`no_grad`], [`enable_grad`], [`GradGuard::new`]) or
/// [`with_grad_enabled`], which restore the previous mode when the scope
/// ends, also on panic. A guard that is alive when this is called restores its
/// own previous value when it drops, overriding this call.
///
/// # Examples
///
/// ```
/// use netcl::autograd::{is_grad_enabled, set_grad_enabled};
///
/// let previous = set_grad_enabled(false);
/// assert!(previous);
/// assert!(!is_grad_enabled());
/// assert!(!set_grad_enabled(previous));
/// assert!(is_grad_enabled());
/// ```
pub fn set_grad_enabled(enabled: bool) -> bool {
    CONTEXT.with(|context| context.enabled.replace(enabled))
}

/// Switches recording off on this thread until the returned guard drops.
///
/// Ops computed meanwhile give the same values as with grad on, but record
/// nothing: their outputs have `requires_grad() == false` and no `grad_fn`,
/// whatever their inputs. Use it for evaluation and weight updates.
///
/// # Examples
///
/// ```
/// use netcl::{Tensor, autograd};
///
/// let w = Tensor::ones(&[2]).requires_grad_(true);
/// let y = {
///     let _guard = autograd::no_grad();
///     &w * 3.0
/// };
/// assert!(!y.requires_grad());
/// assert!(y.grad_fn().is_none());
/// assert_eq!(y.to_vec(), vec![3.0, 3.0]);
/// ```
pub fn no_grad() -> GradGuard {
    GradGuard::new(false)
}

/// Switches recording on for this thread until the returned guard drops, for
/// example to record one computation inside a `no_grad` region.
///
/// # Examples
///
/// ```
/// use netcl::{Tensor, autograd};
///
/// let w = Tensor::ones(&[2]).requires_grad_(true);
/// let _outer = autograd::no_grad();
/// let y = {
///     let _inner = autograd::enable_grad();
///     &w * 3.0
/// };
/// assert!(y.requires_grad());
/// assert!(!autograd::is_grad_enabled());
/// ```
pub fn enable_grad() -> GradGuard {
    GradGuard::new(true)
}

/// Runs `f` with this thread's grad mode set to `enabled`, restoring the
/// previous mode afterwards, also if `f` panics.
///
/// # Examples
///
/// ```
/// use netcl::autograd::{is_grad_enabled, with_grad_enabled};
///
/// let inside = with_grad_enabled(false, is_grad_enabled);
/// assert!(!inside);
/// assert!(is_grad_enabled());
/// ```
pub fn with_grad_enabled<R>(enabled: bool, f: impl FnOnce() -> R) -> R {
    let _guard = GradGuard::new(enabled);
    f()
}

/// This thread's training mode, if a [`train_mode`] or [`eval_mode`] guard
/// (or an entered [`GradMode`] carrying one) set it; `None` otherwise, in
/// which case each module's own flag ([`Module::is_training`]) decides.
///
/// Modules read it through [`Module::effective_training`]: that is how
/// [`Dropout`] knows whether to drop.
///
/// [`Module::is_training`]: crate::nn::Module::is_training
/// [`Module::effective_training`]: crate::nn::Module::effective_training
/// [`Dropout`]: crate::nn::Dropout
///
/// # Examples
///
/// ```
/// use netcl::autograd::{eval_mode, training_mode};
///
/// assert_eq!(training_mode(), None);
/// let _eval = eval_mode();
/// assert_eq!(training_mode(), Some(false));
/// ```
pub fn training_mode() -> Option<bool> {
    CONTEXT
        .try_with(|context| context.training.get())
        .unwrap_or(None)
}

/// Runs this thread's forwards in training mode until the returned guard
/// drops: [`Dropout`](crate::nn::Dropout) drops, whatever the model's own
/// flag. Other threads are unaffected.
///
/// # Examples
///
/// ```
/// use netcl::autograd::train_mode;
/// use netcl::nn::{Dropout, Module};
///
/// let dropout = Dropout::new(0.5, 1);
/// dropout.eval(); // the model's own default: evaluation
/// let _train = train_mode();
/// assert!(dropout.effective_training());
/// ```
pub fn train_mode() -> TrainingGuard {
    TrainingGuard::new(true)
}

/// Runs this thread's forwards in evaluation mode until the returned guard
/// drops: [`Dropout`](crate::nn::Dropout) is the identity, whatever the
/// model's own flag. Other threads are unaffected: this is how evaluation
/// and serving threads use a model that another thread is training.
///
/// # Examples
///
/// ```
/// use std::sync::Arc;
///
/// use netcl::Tensor;
/// use netcl::autograd::eval_mode;
/// use netcl::nn::{Dropout, Module};
///
/// let dropout = Arc::new(Dropout::new(0.5, 1)); // training by default
/// let x = Tensor::ones(&[1, 100]);
/// std::thread::scope(|s| {
///     s.spawn(|| {
///         let _eval = eval_mode();
///         // Identity on this thread...
///         assert_eq!(dropout.forward(&x).unwrap().to_vec(), x.to_vec());
///     });
/// });
/// // ...while this thread still drops.
/// assert!(dropout.forward(&x)?.to_vec().contains(&0.0));
/// # Ok::<(), netcl::Error>(())
/// ```
pub fn eval_mode() -> TrainingGuard {
    TrainingGuard::new(false)
}

/// Restores this thread's previous training mode when dropped; returned by
/// [`train_mode`], [`eval_mode`] and [`TrainingGuard::new`].
///
/// Like [`GradGuard`]: `#[must_use]`, `!Send`, restored also while
/// unwinding, and guards drop in reverse order of creation.
///
/// ```compile_fail
/// fn assert_send<T: Send>(_: T) {}
/// assert_send(netcl::autograd::eval_mode());
/// ```
#[must_use = "the training mode is restored as soon as the guard drops; bind it with `let _guard = ...`"]
pub struct TrainingGuard {
    previous: Option<bool>,
    depth: u32,
    _not_send: PhantomData<*const ()>,
}

impl TrainingGuard {
    /// Sets this thread's training mode to `training` until the guard drops.
    pub fn new(training: bool) -> TrainingGuard {
        let previous = CONTEXT.with(|context| context.training.replace(Some(training)));
        TrainingGuard {
            previous,
            depth: push_guard(),
            _not_send: PhantomData,
        }
    }

    /// The mode this guard restores when it drops (`None`: unset).
    pub fn previous(&self) -> Option<bool> {
        self.previous
    }
}

impl Drop for TrainingGuard {
    fn drop(&mut self) {
        let _ = CONTEXT.try_with(|context| context.training.set(self.previous));
        pop_guard(self.depth);
    }
}

impl fmt::Debug for TrainingGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrainingGuard")
            .field("previous", &self.previous)
            .finish()
    }
}

/// Returns this thread's current tape, creating it on first use.
///
/// Ops whose inputs are all leaves record here; ops with recorded inputs
/// record on their inputs' tape.
pub fn current_tape() -> Arc<Tape> {
    CONTEXT.with(|context| {
        context
            .tape
            .borrow_mut()
            .get_or_insert_with(Tape::new)
            .clone()
    })
}

fn push_guard() -> u32 {
    CONTEXT.with(|context| {
        let depth = context.depth.get() + 1;
        context.depth.set(depth);
        depth
    })
}

/// Pops a guard of depth `depth`, checking (in debug builds, and never while
/// already panicking) that guards drop in the reverse order of creation.
fn pop_guard(depth: u32) {
    let _ = CONTEXT.try_with(|context| {
        let current = context.depth.get();
        context.depth.set(current.saturating_sub(1));
        if cfg!(debug_assertions) && current != depth && !std::thread::panicking() {
            panic!(
                "grad-mode guards dropped out of order: a guard created at depth {depth} dropped at depth {current}; drop guards in the reverse order they were created"
            );
        }
    });
}

/// Restores this thread's previous grad mode when dropped.
///
/// Returned by [`no_grad`], [`enable_grad`] and [`GradGuard::new`]. The
/// previous mode is read when the guard is created, and put back when it
/// drops, including while unwinding from a panic. Guards nest and must drop
/// in reverse order of creation (they do when they are scoped locals; debug
/// builds check it).
///
/// A guard belongs to the thread that made it: it is `!Send`, so it cannot
/// restore a mode on a thread it never changed.
///
/// ```compile_fail
/// fn assert_send<T: Send>(_: T) {}
/// assert_send(netcl::autograd::no_grad());
/// ```
///
/// # Examples
///
/// ```
/// use netcl::autograd::{GradGuard, is_grad_enabled};
///
/// let outer = GradGuard::new(false);
/// {
///     let _inner = GradGuard::new(true);
///     assert!(is_grad_enabled());
/// }
/// assert!(!is_grad_enabled());
/// drop(outer);
/// assert!(is_grad_enabled());
/// ```
#[must_use = "the grad mode is restored as soon as the guard drops; bind it with `let _guard = ...`"]
pub struct GradGuard {
    previous: bool,
    depth: u32,
    _not_send: PhantomData<*const ()>,
}

impl GradGuard {
    /// Sets this thread's grad mode to `enabled` until the guard drops.
    pub fn new(enabled: bool) -> GradGuard {
        let previous = set_grad_enabled(enabled);
        GradGuard {
            previous,
            depth: push_guard(),
            _not_send: PhantomData,
        }
    }

    /// The mode this guard restores when it drops.
    pub fn previous(&self) -> bool {
        self.previous
    }
}

impl Drop for GradGuard {
    fn drop(&mut self) {
        let _ = CONTEXT.try_with(|context| context.enabled.set(self.previous));
        pop_guard(self.depth);
    }
}

impl fmt::Debug for GradGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GradGuard")
            .field("previous", &self.previous)
            .finish()
    }
}

/// A snapshot of a thread's context (grad flag, training mode and current
/// tape) that can be carried to other threads and re-entered there.
///
/// Grad mode is per thread, so work handed to another thread runs in *that*
/// thread's mode unless it enters the caller's. Capture with
/// [`GradMode::current`] on the calling thread, then [`run`](GradMode::run)
/// (or [`enter`](GradMode::enter)) in the worker: its ops then record exactly
/// when the caller's would, into the caller's tape, and the worker's own
/// context is restored afterwards. The helpers in `netcl::parallel` do this
/// for every task they run.
///
/// # Examples
///
/// ```
/// use netcl::{Tensor, autograd};
/// use netcl::autograd::GradMode;
///
/// let w = Tensor::ones(&[2]).requires_grad_(true);
/// let _guard = autograd::no_grad();
/// let mode = GradMode::current();
///
/// std::thread::scope(|s| {
///     s.spawn(|| {
///         // A fresh thread starts with grad on...
///         assert!(autograd::is_grad_enabled());
///         // ...and inside the caller's mode it records nothing.
///         let y = mode.run(|| &w * 2.0);
///         assert!(!y.requires_grad());
///     });
/// });
/// ```
#[derive(Clone)]
pub struct GradMode {
    enabled: bool,
    training: Option<bool>,
    anomaly: bool,
    tape: Arc<Tape>,
}

impl GradMode {
    /// Captures this thread's grad flag, training mode and current tape
    /// (creating the tape if the thread has none yet).
    pub fn current() -> GradMode {
        GradMode {
            enabled: is_grad_enabled(),
            training: training_mode(),
            anomaly: is_anomaly_enabled(),
            tape: current_tape(),
        }
    }

    /// A mode that records (or not) into `tape`, with no training mode set
    /// (each module's own flag decides) and anomaly detection off.
    pub fn new(enabled: bool, tape: Arc<Tape>) -> GradMode {
        GradMode {
            enabled,
            training: None,
            anomaly: false,
            tape,
        }
    }

    /// The same mode with anomaly detection on or off (see
    /// [`detect_anomaly`]).
    #[must_use]
    pub fn with_anomaly(mut self, enabled: bool) -> GradMode {
        self.anomaly = enabled;
        self
    }

    /// Whether this mode has anomaly detection on.
    pub fn anomaly(&self) -> bool {
        self.anomaly
    }

    /// The same mode with the training mode set to `training` (`None`:
    /// each module's own flag decides).
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::autograd::{GradMode, training_mode};
    ///
    /// let eval = GradMode::current().with_training(Some(false));
    /// assert_eq!(eval.run(training_mode), Some(false));
    /// assert_eq!(training_mode(), None);
    /// ```
    #[must_use]
    pub fn with_training(mut self, training: Option<bool>) -> GradMode {
        self.training = training;
        self
    }

    /// The training mode this mode sets when entered.
    pub fn training(&self) -> Option<bool> {
        self.training
    }

    /// The same mode with the flag set to `enabled`.
    #[must_use]
    pub fn with_enabled(mut self, enabled: bool) -> GradMode {
        self.enabled = enabled;
        self
    }

    /// The same mode recording into `tape`.
    #[must_use]
    pub fn with_tape(mut self, tape: Arc<Tape>) -> GradMode {
        self.tape = tape;
        self
    }

    /// Whether ops record in this mode.
    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    /// The tape ops record into in this mode.
    pub fn tape(&self) -> &Arc<Tape> {
        &self.tape
    }

    /// Makes this the current thread's context until the guard drops, then
    /// restores the thread's own flag, training mode and tape (also while
    /// unwinding).
    pub fn enter(&self) -> ModeGuard {
        let (enabled, training, anomaly, tape) = CONTEXT.with(|context| {
            let enabled = context.enabled.replace(self.enabled);
            let training = context.training.replace(self.training);
            let anomaly = context.anomaly.replace(self.anomaly);
            let tape = context.tape.replace(Some(self.tape.clone()));
            (enabled, training, anomaly, tape)
        });
        ModeGuard {
            previous_enabled: enabled,
            previous_training: training,
            previous_anomaly: anomaly,
            previous_tape: tape,
            depth: push_guard(),
            _not_send: PhantomData,
        }
    }

    /// Runs `f` in this mode on the current thread and restores the thread's
    /// own context afterwards, also if `f` panics.
    pub fn run<R>(&self, f: impl FnOnce() -> R) -> R {
        let _guard = self.enter();
        f()
    }
}

impl fmt::Debug for GradMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GradMode")
            .field("enabled", &self.enabled)
            .field("training", &self.training)
            .field("anomaly", &self.anomaly)
            .field("tape", &self.tape.id())
            .finish()
    }
}

/// Restores a thread's own grad flag, training mode and tape when dropped; returned by
/// [`GradMode::enter`]. `!Send`, like [`GradGuard`].
///
/// ```compile_fail
/// fn assert_send<T: Send>(_: T) {}
/// assert_send(netcl::autograd::GradMode::current().enter());
/// ```
#[must_use = "the thread's own mode is restored as soon as the guard drops; bind it with `let _guard = ...`"]
pub struct ModeGuard {
    previous_enabled: bool,
    previous_training: Option<bool>,
    previous_anomaly: bool,
    previous_tape: Option<Arc<Tape>>,
    depth: u32,
    _not_send: PhantomData<*const ()>,
}

impl Drop for ModeGuard {
    fn drop(&mut self) {
        let tape = self.previous_tape.take();
        let replaced = CONTEXT.try_with(|context| {
            context.enabled.set(self.previous_enabled);
            context.training.set(self.previous_training);
            context.anomaly.set(self.previous_anomaly);
            context.tape.replace(tape)
        });
        pop_guard(self.depth);
        // The entered mode's tape handle is dropped here, outside the borrow.
        drop(replaced);
    }
}

impl fmt::Debug for ModeGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ModeGuard")
            .field("previous_enabled", &self.previous_enabled)
            .finish()
    }
}
