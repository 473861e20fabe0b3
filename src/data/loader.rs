//! The prefetching [`DataLoader`].

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;

use crossbeam::channel::{self, Receiver};

use crate::autograd::GradMode;
use crate::data::{Batch, Dataset, mix_seed, permutation};
use crate::error::{Error, Result, or_panic};

/// Iterates over a [`Dataset`] in batches, preparing the next batches on a
/// background thread while the caller trains on the current one.
///
/// Each epoch ([`epoch`](DataLoader::epoch) or [`iter`](DataLoader::iter))
/// spawns one thread that reads batches with
/// [`Dataset::get_batch`] and hands them over through a bounded channel of
/// [`prefetch`](DataLoader::prefetch) batches. The thread:
///
/// - runs in the grad mode of the thread that created the epoch iterator
///   (captured as a [`GradMode`]), so a dataset that computes with tensors
///   records exactly when the caller would;
/// - stops as soon as the [`EpochIter`] is dropped, even mid-epoch: the drop
///   signals it and waits for it to end, so no thread outlives its iterator;
/// - stops at the first error, which the iterator yields as its last item.
///
/// With [`shuffle`](DataLoader::shuffle) the order of each epoch is a
/// permutation drawn from `(seed, epoch)`: the same seed gives the same
/// batches, every sample appears exactly once per epoch, and epochs differ.
/// Without it samples come in dataset order.
///
/// # Examples
///
/// ```
/// use netcl::Tensor;
/// use netcl::data::{DataLoader, TensorDataset};
///
/// let ds = TensorDataset::new(Tensor::arange(0.0, 10.0, 1.0), Tensor::zeros(&[10]))?;
/// let loader = DataLoader::new(ds, 4).shuffle(42).drop_last(true);
/// assert_eq!(loader.len(), 2);
///
/// let epoch0: Vec<Vec<f32>> = loader
///     .epoch(0)
///     .map(|batch| batch.map(|b| b.inputs.to_vec()))
///     .collect::<Result<_, _>>()?;
/// assert_eq!(epoch0.len(), 2);
/// assert!(epoch0.iter().all(|b| b.len() == 4));
///
/// // The same epoch of the same seed is the same; the next one differs.
/// let again: Vec<Vec<f32>> = loader.epoch(0).map(|b| b.unwrap().inputs.to_vec()).collect();
/// assert_eq!(epoch0, again);
/// # Ok::<(), netcl::Error>(())
/// ```
pub struct DataLoader<D: Dataset + 'static> {
    dataset: Arc<D>,
    batch_size: usize,
    shuffle: Option<u64>,
    drop_last: bool,
    prefetch: usize,
    /// The epoch [`iter`](DataLoader::iter) gives next.
    next_epoch: AtomicU64,
}

impl<D: Dataset + 'static> DataLoader<D> {
    /// A loader of `dataset` in batches of `batch_size`, in order, keeping
    /// the last short batch, prefetching 2 batches.
    ///
    /// `dataset` is a dataset or an `Arc` of one (`Arc<dyn Dataset>`
    /// included), to keep a handle to it.
    ///
    /// # Panics
    ///
    /// As [`try_new`](DataLoader::try_new).
    #[track_caller]
    pub fn new(dataset: D, batch_size: usize) -> DataLoader<D> {
        or_panic(DataLoader::try_new(dataset, batch_size))
    }

    /// A loader of `dataset` in batches of `batch_size`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] if `batch_size` is 0.
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::Tensor;
    /// use netcl::data::{DataLoader, TensorDataset};
    ///
    /// let ds = TensorDataset::new(Tensor::zeros(&[3, 2]), Tensor::zeros(&[3]))?;
    /// let err = DataLoader::try_new(ds, 0).unwrap_err();
    /// assert_eq!(err.to_string(), "DataLoader: batch_size must be at least 1");
    /// # Ok::<(), netcl::Error>(())
    /// ```
    pub fn try_new(dataset: D, batch_size: usize) -> Result<DataLoader<D>> {
        if batch_size == 0 {
            return Err(Error::InvalidArgument {
                op: "DataLoader",
                message: "batch_size must be at least 1".to_string(),
            });
        }
        Ok(DataLoader {
            dataset: Arc::new(dataset),
            batch_size,
            shuffle: None,
            drop_last: false,
            prefetch: 2,
            next_epoch: AtomicU64::new(0),
        })
    }

    /// Shuffles every epoch with a permutation drawn from `seed` and the
    /// epoch number.
    #[must_use]
    pub fn shuffle(mut self, seed: u64) -> DataLoader<D> {
        self.shuffle = Some(seed);
        self
    }

    /// Drops the last batch of an epoch if it is shorter than the batch
    /// size (off by default).
    #[must_use]
    pub fn drop_last(mut self, drop_last: bool) -> DataLoader<D> {
        self.drop_last = drop_last;
        self
    }

    /// How many batches the background thread prepares ahead (2 by default).
    /// With 0 it prepares one batch and hands it over when asked.
    #[must_use]
    pub fn prefetch(mut self, batches: usize) -> DataLoader<D> {
        self.prefetch = batches;
        self
    }

    /// The dataset (shared with the threads of running epochs).
    pub fn dataset(&self) -> &Arc<D> {
        &self.dataset
    }

    /// The batch size.
    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    /// The number of batches in an epoch.
    pub fn len(&self) -> usize {
        let n = self.dataset.len();
        if self.drop_last {
            n / self.batch_size
        } else {
            n.div_ceil(self.batch_size)
        }
    }

    /// True if an epoch has no batch.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The sample indices of epoch `epoch`, in the order they are served.
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::Tensor;
    /// use netcl::data::{DataLoader, TensorDataset};
    ///
    /// let ds = TensorDataset::new(Tensor::zeros(&[5, 1]), Tensor::zeros(&[5]))?;
    /// assert_eq!(DataLoader::new(ds.clone(), 2).order(3), vec![0, 1, 2, 3, 4]);
    /// let mut shuffled = DataLoader::new(ds, 2).shuffle(9).order(3);
    /// shuffled.sort();
    /// assert_eq!(shuffled, vec![0, 1, 2, 3, 4]);
    /// # Ok::<(), netcl::Error>(())
    /// ```
    pub fn order(&self, epoch: u64) -> Vec<usize> {
        let n = self.dataset.len();
        match self.shuffle {
            Some(seed) => permutation(n, mix_seed(seed, epoch)),
            None => (0..n).collect(),
        }
    }

    /// The batches of epoch `epoch` (its shuffle depends on the number),
    /// prepared on a background thread that runs in this thread's grad mode.
    ///
    /// # Examples
    ///
    /// Stopping early is just dropping the iterator; its thread ends with it.
    ///
    /// ```
    /// use netcl::Tensor;
    /// use netcl::data::{DataLoader, TensorDataset};
    ///
    /// let ds = TensorDataset::new(Tensor::zeros(&[1000, 4]), Tensor::zeros(&[1000]))?;
    /// let loader = DataLoader::new(ds, 10).shuffle(0);
    /// for (i, batch) in loader.epoch(0).enumerate() {
    ///     assert_eq!(batch?.inputs.shape(), &[10, 4]);
    ///     if i == 2 {
    ///         break;
    ///     }
    /// }
    /// // Only the loader itself still holds the dataset.
    /// assert_eq!(std::sync::Arc::strong_count(loader.dataset()), 1);
    /// # Ok::<(), netcl::Error>(())
    /// ```
    pub fn epoch(&self, epoch: u64) -> EpochIter {
        let order = self.order(epoch);
        let batch_size = self.batch_size;
        let batches = self.len();
        let dataset = Arc::clone(&self.dataset);
        let (sender, receiver) = channel::bounded(self.prefetch);
        let stop = Arc::new(AtomicBool::new(false));
        let mode = GradMode::current();
        let stop_flag = Arc::clone(&stop);
        let spawned = std::thread::Builder::new()
            .name("netcl-data-loader".to_string())
            .spawn(move || {
                let _mode = mode.enter();
                for indices in order.chunks(batch_size).take(batches) {
                    if stop_flag.load(Ordering::Relaxed) {
                        return;
                    }
                    let batch = dataset.get_batch(indices);
                    let failed = batch.is_err();
                    // Fails only when the iterator was dropped.
                    if sender.send(batch).is_err() || failed {
                        return;
                    }
                }
            });
        match spawned {
            Ok(handle) => EpochIter {
                receiver: Some(receiver),
                handle: Some(handle),
                stop,
                remaining: batches,
                error: None,
            },
            Err(err) => EpochIter {
                receiver: None,
                handle: None,
                stop,
                remaining: 0,
                error: Some(Error::ThreadSpawn {
                    op: "DataLoader::epoch",
                    kind: err.kind(),
                    message: err.to_string(),
                }),
            },
        }
    }

    /// The batches of the next epoch: the first call gives epoch 0, the
    /// next epoch 1, and so on (so each call reshuffles).
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::Tensor;
    /// use netcl::data::{DataLoader, TensorDataset};
    ///
    /// let ds = TensorDataset::new(Tensor::arange(0.0, 6.0, 1.0), Tensor::zeros(&[6]))?;
    /// let loader = DataLoader::new(ds, 4);
    /// for _epoch in 0..3 {
    ///     let sizes: Vec<usize> = loader.iter().map(|b| b.unwrap().len()).collect();
    ///     assert_eq!(sizes, [4, 2]);
    /// }
    /// # Ok::<(), netcl::Error>(())
    /// ```
    pub fn iter(&self) -> EpochIter {
        self.epoch(self.next_epoch.fetch_add(1, Ordering::Relaxed))
    }
}

impl<D: Dataset + 'static> fmt::Debug for DataLoader<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DataLoader")
            .field("samples", &self.dataset.len())
            .field("batch_size", &self.batch_size)
            .field("shuffle", &self.shuffle)
            .field("drop_last", &self.drop_last)
            .field("prefetch", &self.prefetch)
            .finish()
    }
}

impl<D: Dataset + 'static> IntoIterator for &DataLoader<D> {
    type Item = Result<Batch>;
    type IntoIter = EpochIter;

    fn into_iter(self) -> EpochIter {
        self.iter()
    }
}

/// The batches of one epoch of a [`DataLoader`], read from its background
/// thread.
///
/// Yields `Ok(batch)` for each batch, or an `Err` as the last item if the
/// dataset failed. Dropping it (also mid-epoch) stops the thread and waits
/// for it to end. If the dataset panics on the thread, the panic resumes in
/// the thread calling [`next`](Iterator::next).
pub struct EpochIter {
    receiver: Option<Receiver<Result<Batch>>>,
    handle: Option<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    remaining: usize,
    error: Option<Error>,
}

impl EpochIter {
    /// Stops the thread and waits for it; returns its panic payload if it
    /// panicked.
    fn shut_down(&mut self) -> Option<Box<dyn std::any::Any + Send + 'static>> {
        self.stop.store(true, Ordering::Relaxed);
        // Closing the channel wakes a thread blocked on a full channel.
        drop(self.receiver.take());
        self.handle.take().and_then(|handle| handle.join().err())
    }
}

impl Iterator for EpochIter {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Result<Batch>> {
        if let Some(err) = self.error.take() {
            return Some(Err(err));
        }
        let received = self.receiver.as_ref()?.recv();
        match received {
            Ok(Ok(batch)) => {
                self.remaining = self.remaining.saturating_sub(1);
                Some(Ok(batch))
            }
            Ok(Err(err)) => {
                self.remaining = 0;
                self.shut_down();
                Some(Err(err))
            }
            Err(_) => {
                // The thread finished: the epoch is over, or it panicked.
                self.remaining = 0;
                if let Some(panic) = self.shut_down() {
                    std::panic::resume_unwind(panic);
                }
                None
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let extra = usize::from(self.error.is_some());
        (0, Some(self.remaining + extra))
    }
}

impl Drop for EpochIter {
    fn drop(&mut self) {
        // A panic of the thread is dropped here: resuming it in a destructor
        // could abort the process.
        drop(self.shut_down());
    }
}

impl fmt::Debug for EpochIter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EpochIter")
            .field("remaining", &self.remaining)
            .field("running", &self.handle.is_some())
            .finish()
    }
}
