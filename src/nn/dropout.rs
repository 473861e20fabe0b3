//! Dropout: random zeroing in training mode.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use ndarray::{ArrayD, IxDyn};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use crate::data::mix_seed;
use crate::error::{Error, Result, or_panic};
use crate::nn::{Module, TrainingFlag};
use crate::tensor::Tensor;

/// Zeroes each input element with probability `p` in training mode and
/// scales the others by `1 / (1 - p)`, so the expected value is unchanged;
/// the identity in evaluation mode.
///
/// Which mode applies is decided per thread
/// ([`Module::effective_training`]): the thread's mode if set
/// ([`train_mode`](crate::nn::train_mode),
/// [`eval_mode`](crate::nn::eval_mode)), else the layer's own flag.
///
/// # Determinism
///
/// Masks come from per-thread call counters: the `k`-th training-mode call
/// of this layer *on a thread* (counting from 0, or from the last
/// [`reset`](Dropout::reset)) draws its mask from a generator seeded with
/// `(seed, k)`, with the worker's index in its pool mixed in when the
/// thread is a rayon worker (so tasks running at once on different workers
/// draw different masks). A call in evaluation mode, or with `p` 0 or 1,
/// draws no mask and is not counted.
///
/// Deterministic, for a given seed: the sequence of masks one thread
/// draws. It depends on that thread's own calls only, never on what other
/// threads do with the layer, so a training loop on one thread (as
/// [`Trainer::fit`](crate::train::Trainer::fit) runs its forwards) is
/// reproducible, and a clone or a new layer with the same seed draws the
/// same sequence.
///
/// Not deterministic: the masks of training-mode forwards run as tasks on
/// a thread pool ([`netcl::parallel`](crate::parallel) helpers, or rayon
/// directly). A task draws from the counter of the worker that runs it,
/// and that counter has advanced with every training-mode call of this
/// layer the worker ran before, *whoever's task it was*: two threads
/// running training forwards through one layer with
/// [`parallel::map`](crate::parallel::map) on the global pool change each
/// other's masks. Even a single caller's tasks get different masks from
/// run to run, since rayon's work stealing decides which worker runs which
/// task, and in what order. (Any thread that runs several callers' work,
/// such as an async runtime's worker, shares its counter the same way.)
/// Evaluation ([`train::evaluate`](crate::train::evaluate)) draws no masks,
/// so it is unaffected.
///
/// For reproducible masks, run training-mode forwards on the caller's own
/// thread rather than as pool tasks, or give each caller a dedicated pool
/// of one worker (`rayon::ThreadPoolBuilder::new().num_threads(1)`, entered
/// with [`parallel::install`](crate::parallel::install)): that worker runs
/// only its caller's tasks, one at a time, in the same order each run. A
/// dedicated pool of several workers keeps other callers out, but work
/// stealing still decides which of its workers draws each mask.
///
/// The counter is the worker's, not the caller's:
///
/// ```
/// use netcl::Tensor;
/// use netcl::nn::{Dropout, Module, train_mode};
///
/// let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
/// let layer = Dropout::new(0.5, 7);
/// let x = Tensor::ones(&[1, 64]);
/// let _train = train_mode();
/// // A training-mode forward run as a task on the pool's only worker.
/// let task = || netcl::parallel::install(&pool, || layer.forward(&x).unwrap().to_vec());
///
/// let (first, second) = (task(), task());
/// layer.reset();
/// assert_eq!(task(), first, "the worker's sequence restarts");
/// // Another thread's task on the same worker draws the second mask...
/// std::thread::scope(|s| {
///     s.spawn(|| task());
/// });
/// // ...so this caller's next task draws the third one.
/// assert_ne!(task(), second);
/// ```
///
/// # Examples
///
/// ```
/// use netcl::Tensor;
/// use netcl::nn::{Dropout, Module};
///
/// let dropout = Dropout::new(0.5, 42);
/// let x = Tensor::ones(&[1, 1000]);
///
/// let y = dropout.forward(&x)?.to_vec();
/// // Every element is dropped (0) or scaled by 1 / (1 - p) = 2.
/// assert!(y.iter().all(|&v| v == 0.0 || v == 2.0));
/// let kept = y.iter().filter(|&&v| v == 2.0).count();
/// assert!((400..600).contains(&kept));
///
/// // In evaluation mode it is the identity.
/// dropout.eval();
/// assert_eq!(dropout.forward(&x)?.to_vec(), x.to_vec());
/// # Ok::<(), netcl::Error>(())
/// ```
pub struct Dropout {
    p: f32,
    seed: u64,
    /// Names this layer in the per-thread call counters.
    id: u64,
    /// Bumped by [`reset`](Dropout::reset): a thread's counter from an
    /// older generation restarts at 0.
    generation: AtomicU64,
    training: TrainingFlag,
}

/// Gives every Dropout layer (forks included) its own counters.
static NEXT_ID: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// Per layer, on this thread: the generation the count belongs to and
    /// the number of masks drawn in it. One entry per layer that ran in
    /// training mode on this thread.
    static CALLS: RefCell<HashMap<u64, (u64, u64)>> = RefCell::new(HashMap::new());
}

impl Dropout {
    /// A dropout layer dropping with probability `p`, its masks drawn from
    /// `seed`.
    ///
    /// # Panics
    ///
    /// As [`try_new`](Dropout::try_new).
    #[track_caller]
    pub fn new(p: f32, seed: u64) -> Dropout {
        or_panic(Dropout::try_new(p, seed))
    }

    /// A dropout layer dropping with probability `p`, its masks drawn from
    /// `seed`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] unless `0 <= p <= 1`.
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::nn::Dropout;
    ///
    /// assert!(Dropout::try_new(0.1, 0).is_ok());
    /// assert_eq!(
    ///     Dropout::try_new(1.5, 0).unwrap_err().to_string(),
    ///     "Dropout: drop probability must be in [0, 1], got 1.5"
    /// );
    /// ```
    pub fn try_new(p: f32, seed: u64) -> Result<Dropout> {
        if !(0.0..=1.0).contains(&p) {
            return Err(Error::InvalidArgument {
                op: "Dropout",
                message: format!("drop probability must be in [0, 1], got {p}"),
            });
        }
        Ok(Dropout {
            p,
            seed,
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            generation: AtomicU64::new(0),
            training: TrainingFlag::new(),
        })
    }

    /// The drop probability.
    pub fn p(&self) -> f32 {
        self.p
    }

    /// Restarts the sequence of masks, on every thread: the next
    /// training-mode call on a thread draws the same mask as the first call
    /// after construction.
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::Tensor;
    /// use netcl::nn::{Dropout, Module};
    ///
    /// let dropout = Dropout::new(0.5, 3);
    /// let x = Tensor::ones(&[4, 8]);
    /// let first = dropout.forward(&x)?.to_vec();
    /// dropout.reset();
    /// assert_eq!(dropout.forward(&x)?.to_vec(), first);
    /// # Ok::<(), netcl::Error>(())
    /// ```
    pub fn reset(&self) {
        self.generation.fetch_add(1, Ordering::Relaxed);
    }

    /// The number of this thread's next training-mode call of this layer.
    fn next_call(&self) -> u64 {
        let generation = self.generation.load(Ordering::Relaxed);
        CALLS.with(|calls| {
            let mut calls = calls.borrow_mut();
            let entry = calls.entry(self.id).or_insert((generation, 0));
            if entry.0 != generation {
                *entry = (generation, 0);
            }
            let call = entry.1;
            entry.1 += 1;
            call
        })
    }

    /// The mask of call `call`: 0 where dropped, `1 / (1 - p)` elsewhere.
    fn mask(&self, shape: &[usize], call: u64) -> Tensor {
        let seed = match crate::parallel::worker_index() {
            None => mix_seed(self.seed, call),
            Some(worker) => mix_seed(mix_seed(self.seed, call), worker as u64 + 1),
        };
        let mut rng = StdRng::seed_from_u64(seed);
        let (p, scale) = (self.p, 1.0 / (1.0 - self.p));
        Tensor::from_array(ArrayD::from_shape_simple_fn(IxDyn(shape), || {
            if rng.random::<f32>() < p { 0.0 } else { scale }
        }))
    }
}

impl Clone for Dropout {
    /// A fork: a layer with the same probability, seed and training flag,
    /// whose sequence of masks starts afresh (on every thread).
    fn clone(&self) -> Dropout {
        Dropout {
            p: self.p,
            seed: self.seed,
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            generation: AtomicU64::new(0),
            training: self.training.clone(),
        }
    }
}

impl Module for Dropout {
    /// In training mode (on this thread, see
    /// [`Module::effective_training`]), `input * mask` for a fresh random
    /// mask (recorded as one `mul`, so gradients flow through the kept
    /// elements only); in evaluation mode, or with `p == 0`, `input` itself.
    fn forward(&self, input: &Tensor) -> Result<Tensor> {
        if !self.effective_training() || self.p == 0.0 {
            return Ok(input.clone());
        }
        if self.p == 1.0 {
            return Ok(input.mul_scalar(0.0));
        }
        input.try_mul(&self.mask(input.shape(), self.next_call()))
    }

    /// None: the layer has no parameters.
    fn named_parameters(&self) -> Vec<(String, Tensor)> {
        Vec::new()
    }

    fn training_flag(&self) -> Option<&TrainingFlag> {
        Some(&self.training)
    }

    fn architecture(&self) -> Option<crate::nn::Architecture> {
        self.describe()
    }

    fn try_fork(&self) -> Result<Box<dyn Module>> {
        Ok(Box::new(self.clone()))
    }
}

impl fmt::Debug for Dropout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dropout")
            .field("p", &self.p)
            .field("seed", &self.seed)
            .finish()
    }
}

impl Dropout {
    /// The architecture node (`Module::architecture`).
    pub(crate) fn describe(&self) -> Option<crate::nn::Architecture> {
        Some(
            crate::nn::Architecture::new("Dropout")
                .with("p", crate::nn::architecture::number_value(self.p))
                .with("seed", self.seed),
        )
    }
}
