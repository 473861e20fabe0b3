//! Datasets and batching: the [`Dataset`] trait, the in-memory
//! [`TensorDataset`], a prefetching [`DataLoader`] and CSV loading.
//!
//! # Examples
//!
//! Load the digits, scale the pixels to `[0, 1]`, split 80/20 and iterate
//! over shuffled batches:
//!
//! ```
//! use netcl::data::{self, DataLoader, Dataset, TensorDataset};
//!
//! let path = concat!(env!("CARGO_MANIFEST_DIR"), "/data/digits.csv");
//! let digits = data::load_digits(path)?;
//! assert_eq!((digits.len(), digits.inputs().shape()[1]), (1797, 64));
//!
//! let digits = TensorDataset::new(digits.inputs() / 16.0, digits.targets().clone())?;
//! let (train, test) = digits.split(0.8, 42)?;
//! assert_eq!((train.len(), test.len()), (1437, 360));
//!
//! let loader = DataLoader::new(train, 32).shuffle(7);
//! let mut seen = 0;
//! for batch in loader.epoch(0) {
//!     let batch = batch?;
//!     assert_eq!(batch.inputs.shape()[1], 64);
//!     seen += batch.len();
//! }
//! assert_eq!(seen, 1437);
//! # Ok::<(), netcl::Error>(())
//! ```

mod csv;
mod loader;

use ndarray::Axis;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

pub use self::csv::{LabeledCsv, load_digits, load_labeled_csv, parse_labeled_csv};
pub use loader::{DataLoader, EpochIter};

use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// A batch of samples: inputs and targets, stacked along a first (batch)
/// axis of the same length.
#[derive(Debug, Clone)]
pub struct Batch {
    /// The inputs, `[batch, ..]`.
    pub inputs: Tensor,
    /// The targets, `[batch, ..]` (class indices as `f32` for
    /// classification).
    pub targets: Tensor,
}

impl Batch {
    /// The number of samples.
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::Tensor;
    /// use netcl::data::Batch;
    ///
    /// let batch = Batch { inputs: Tensor::zeros(&[3, 4]), targets: Tensor::zeros(&[3]) };
    /// assert_eq!(batch.len(), 3);
    /// ```
    pub fn len(&self) -> usize {
        self.inputs.shape().first().copied().unwrap_or(0)
    }

    /// True for a batch without samples.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A collection of samples that can be read by index, from any thread.
///
/// Implement [`len`](Dataset::len) and [`get_batch`](Dataset::get_batch);
/// reading a whole batch at once lets an in-memory dataset gather rows with
/// one copy, and a computed one (augmentation, decoding) work batch-wise.
///
/// # Examples
///
/// A dataset computed on the fly: `x` and its square.
///
/// ```
/// use netcl::data::{Batch, Dataset};
/// use netcl::{Result, Tensor};
///
/// struct Squares(usize);
///
/// impl Dataset for Squares {
///     fn len(&self) -> usize {
///         self.0
///     }
///     fn get_batch(&self, indices: &[usize]) -> Result<Batch> {
///         let x: Vec<f32> = indices.iter().map(|&i| i as f32).collect();
///         let y = x.iter().map(|v| v * v).collect();
///         Ok(Batch {
///             inputs: Tensor::from_vec(x, &[indices.len(), 1])?,
///             targets: Tensor::from_vec(y, &[indices.len(), 1])?,
///         })
///     }
/// }
///
/// let batch = Squares(10).get_batch(&[3, 4])?;
/// assert_eq!(batch.targets.to_vec(), vec![9.0, 16.0]);
/// # Ok::<(), netcl::Error>(())
/// ```
pub trait Dataset: Send + Sync {
    /// The number of samples.
    fn len(&self) -> usize;

    /// The samples at `indices`, in that order, stacked into one batch.
    ///
    /// # Errors
    ///
    /// Implementations return [`Error::InvalidArgument`] for an index out of
    /// range, and whatever error reading a sample can give.
    fn get_batch(&self, indices: &[usize]) -> Result<Batch>;

    /// True if the dataset has no samples.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The sample at `index`, as a batch of one.
    ///
    /// # Errors
    ///
    /// As [`get_batch`](Dataset::get_batch).
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::Tensor;
    /// use netcl::data::{Dataset, TensorDataset};
    ///
    /// let ds = TensorDataset::new(Tensor::ones(&[3, 2]), Tensor::zeros(&[3]))?;
    /// let sample = ds.get(2)?;
    /// assert_eq!(sample.inputs.shape(), &[1, 2]);
    /// # Ok::<(), netcl::Error>(())
    /// ```
    fn get(&self, index: usize) -> Result<Batch> {
        self.get_batch(&[index])
    }
}

impl<D: Dataset + ?Sized> Dataset for std::sync::Arc<D> {
    fn len(&self) -> usize {
        (**self).len()
    }
    fn get_batch(&self, indices: &[usize]) -> Result<Batch> {
        (**self).get_batch(indices)
    }
}

/// An in-memory dataset: sample `i` is row `i` of `inputs` and of `targets`.
///
/// Clones share the rows; [`get_batch`](Dataset::get_batch) gathers the
/// requested rows into a new batch (one copy).
///
/// # Examples
///
/// ```
/// use netcl::Tensor;
/// use netcl::data::{Dataset, TensorDataset};
///
/// let inputs = Tensor::from_vec((0..8).map(|v| v as f32).collect(), &[4, 2])?;
/// let targets = Tensor::from_vec(vec![0.0, 1.0, 0.0, 1.0], &[4])?;
/// let ds = TensorDataset::new(inputs, targets)?;
/// let batch = ds.get_batch(&[3, 0])?;
/// assert_eq!(batch.inputs.to_vec(), vec![6.0, 7.0, 0.0, 1.0]);
/// assert_eq!(batch.targets.to_vec(), vec![1.0, 0.0]);
/// # Ok::<(), netcl::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct TensorDataset {
    inputs: Tensor,
    targets: Tensor,
}

impl TensorDataset {
    /// A dataset of the rows of `inputs` and `targets` (detached from any
    /// graph).
    ///
    /// # Errors
    ///
    /// [`Error::Rank`] if either is 0-dimensional, [`Error::ShapeMismatch`]
    /// if their first dimensions differ.
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::Tensor;
    /// use netcl::data::TensorDataset;
    ///
    /// let err = TensorDataset::new(Tensor::zeros(&[4, 2]), Tensor::zeros(&[3])).unwrap_err();
    /// assert_eq!(err.to_string(), "TensorDataset: shape mismatch, [4, 2] vs [3]");
    /// ```
    pub fn new(inputs: Tensor, targets: Tensor) -> Result<TensorDataset> {
        for t in [&inputs, &targets] {
            if t.ndim() == 0 {
                return Err(Error::Rank {
                    op: "TensorDataset",
                    expected: "at least 1 dimension (the sample axis)",
                    shape: t.shape().to_vec(),
                });
            }
        }
        if inputs.shape()[0] != targets.shape()[0] {
            return Err(Error::ShapeMismatch {
                op: "TensorDataset",
                lhs: inputs.shape().to_vec(),
                rhs: targets.shape().to_vec(),
            });
        }
        Ok(TensorDataset {
            inputs: inputs.detach(),
            targets: targets.detach(),
        })
    }

    /// All inputs, `[len, ..]`.
    pub fn inputs(&self) -> &Tensor {
        &self.inputs
    }

    /// All targets, `[len, ..]`.
    pub fn targets(&self) -> &Tensor {
        &self.targets
    }

    /// The samples at `indices`, in that order, as a new dataset.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] if an index is out of range.
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::Tensor;
    /// use netcl::data::{Dataset, TensorDataset};
    ///
    /// let ds = TensorDataset::new(Tensor::arange(0.0, 5.0, 1.0), Tensor::zeros(&[5]))?;
    /// let first_two = ds.subset(&[0, 1])?;
    /// assert_eq!(first_two.len(), 2);
    /// assert!(ds.subset(&[5]).is_err());
    /// # Ok::<(), netcl::Error>(())
    /// ```
    pub fn subset(&self, indices: &[usize]) -> Result<TensorDataset> {
        let batch = self.get_batch(indices)?;
        Ok(TensorDataset {
            inputs: batch.inputs,
            targets: batch.targets,
        })
    }

    /// Splits the samples at random into two datasets, the first with
    /// `⌊fraction · len⌋` samples and the second with the rest (so 0.8 of
    /// 1797 samples is 1437 and 360, as scikit-learn's `train_test_split`
    /// gives); the same `seed` gives the same split. Each part keeps the
    /// dataset's order among its samples.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] unless `0 <= fraction <= 1`.
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::Tensor;
    /// use netcl::data::{Dataset, TensorDataset};
    ///
    /// let ds = TensorDataset::new(Tensor::arange(0.0, 10.0, 1.0), Tensor::zeros(&[10]))?;
    /// let (train, test) = ds.split(0.8, 1)?;
    /// assert_eq!((train.len(), test.len()), (8, 2));
    /// let mut all = [train.inputs().to_vec(), test.inputs().to_vec()].concat();
    /// all.sort_by(f32::total_cmp);
    /// assert_eq!(all, ds.inputs().to_vec());
    /// # Ok::<(), netcl::Error>(())
    /// ```
    pub fn split(&self, fraction: f64, seed: u64) -> Result<(TensorDataset, TensorDataset)> {
        if !(0.0..=1.0).contains(&fraction) {
            return Err(Error::InvalidArgument {
                op: "TensorDataset::split",
                message: format!("fraction must be in [0, 1], got {fraction}"),
            });
        }
        let n = self.len();
        // The epsilon keeps products such as 0.29 · 100 = 28.999... at 29.
        let first_len = (((n as f64) * fraction + 1e-9).floor() as usize).min(n);
        let order = permutation(n, seed);
        let (mut first, mut second) = (order[..first_len].to_vec(), order[first_len..].to_vec());
        first.sort_unstable();
        second.sort_unstable();
        Ok((self.subset(&first)?, self.subset(&second)?))
    }
}

impl Dataset for TensorDataset {
    fn len(&self) -> usize {
        self.inputs.shape()[0]
    }

    fn get_batch(&self, indices: &[usize]) -> Result<Batch> {
        let len = self.len();
        if let Some(&bad) = indices.iter().find(|&&i| i >= len) {
            return Err(Error::InvalidArgument {
                op: "TensorDataset::get_batch",
                message: format!("index {bad} is out of range for a dataset of {len} samples"),
            });
        }
        let gather = |t: &Tensor| Tensor::from_array(t.read().view().select(Axis(0), indices));
        Ok(Batch {
            inputs: gather(&self.inputs),
            targets: gather(&self.targets),
        })
    }
}

/// A permutation of `0..n` drawn with a generator seeded by `seed`
/// (Fisher-Yates).
pub(crate) fn permutation(n: usize, seed: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = StdRng::seed_from_u64(seed);
    for i in (1..n).rev() {
        let j = rng.random_range(0..=i);
        order.swap(i, j);
    }
    order
}

/// One 64-bit seed from a base seed and a stream number (an epoch, a call),
/// through the SplitMix64 finaliser, so neighbouring streams get unrelated
/// generators.
pub(crate) fn mix_seed(seed: u64, stream: u64) -> u64 {
    let mut z = seed ^ stream.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
