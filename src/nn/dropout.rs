//! Dropout: random zeroing in training mode.

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
/// # Randomness and threads
///
/// The masks are deterministic for a given seed: call `k` (counting from 0,
/// or from the last [`reset`](Dropout::reset)) draws its mask from a
/// generator seeded with `(seed, k)`. The call counter is an atomic, so
/// several threads can run the same layer at once, each call getting its own
/// independent mask; which thread gets which call number then depends on
/// scheduling, so bit-exact runs need the calls in a fixed order (as a
/// training loop on one thread has).
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
    calls: AtomicU64,
    training: TrainingFlag,
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
            calls: AtomicU64::new(0),
            training: TrainingFlag::new(),
        })
    }

    /// The drop probability.
    pub fn p(&self) -> f32 {
        self.p
    }

    /// Restarts the sequence of masks: the next training-mode call draws the
    /// same mask as the first call after construction.
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
        self.calls.store(0, Ordering::Relaxed);
    }

    /// The mask of call `call`: 0 where dropped, `1 / (1 - p)` elsewhere.
    fn mask(&self, shape: &[usize], call: u64) -> Tensor {
        let mut rng = StdRng::seed_from_u64(mix_seed(self.seed, call));
        let (p, scale) = (self.p, 1.0 / (1.0 - self.p));
        Tensor::from_array(ArrayD::from_shape_simple_fn(IxDyn(shape), || {
            if rng.random::<f32>() < p { 0.0 } else { scale }
        }))
    }
}

impl Module for Dropout {
    /// In training mode, `input * mask` for a fresh random mask (recorded as
    /// one `mul`, so gradients flow through the kept elements only); in
    /// evaluation mode, or with `p == 0`, `input` itself.
    fn forward(&self, input: &Tensor) -> Result<Tensor> {
        if !self.is_training() || self.p == 0.0 {
            return Ok(input.clone());
        }
        if self.p == 1.0 {
            return Ok(input.mul_scalar(0.0));
        }
        let call = self.calls.fetch_add(1, Ordering::Relaxed);
        input.try_mul(&self.mask(input.shape(), call))
    }

    /// None: the layer has no parameters.
    fn named_parameters(&self) -> Vec<(String, Tensor)> {
        Vec::new()
    }

    fn set_training(&self, training: bool) {
        self.training.set(training);
    }

    fn is_training(&self) -> bool {
        self.training.get()
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
