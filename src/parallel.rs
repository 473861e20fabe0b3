//! Parallel helpers that carry the caller's grad mode into every task: the
//! only file of netcl that uses rayon.
//!
//! # The bug
//!
//! Grad mode is per thread, and rayon runs closures on its worker threads,
//! which have their own mode (on, by default). A plain parallel evaluation
//! inside `no_grad` therefore records a graph in every worker:
//!
//! ```
//! use netcl::{Tensor, autograd};
//! use rayon::prelude::*;
//!
//! let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
//! let w = Tensor::ones(&[4, 4]).requires_grad_(true);
//! let batches: Vec<Tensor> = (0..8).map(|_| Tensor::ones(&[2, 4])).collect();
//!
//! let _guard = autograd::no_grad();
//! let outputs: Vec<Tensor> =
//!     pool.install(|| batches.par_iter().map(|x| x.matmul(&w)).collect());
//! // The workers never saw the caller's no_grad: every output recorded a
//! // graph (and holds its memory) that the caller asked not to build.
//! assert!(outputs.iter().all(|y| y.requires_grad()));
//! ```
//!
//! Worse, a worker blocked in `join` may steal a task of *another* caller
//! whose mode is the opposite, and run it in the wrong mode; and a closure
//! left unwrapped (a plain `reduce` after a wrapped `map`) silently records,
//! or silently drops gradients.
//!
//! # The fix
//!
//! Every helper here captures the caller's [`GradMode`] (grad flag, training mode and tape) on
//! the calling thread and enters it in every task, restoring the worker's own
//! context afterwards. The mode is entered once per chunk of work, not per
//! item.
//!
//! ```
//! use netcl::parallel::prelude::*;
//! use netcl::{Tensor, autograd};
//!
//! let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
//! let w = Tensor::ones(&[4, 4]).requires_grad_(true);
//! let batches: Vec<Tensor> = (0..8).map(|_| Tensor::ones(&[2, 4])).collect();
//!
//! let _guard = autograd::no_grad();
//! let total: f32 = netcl::parallel::install(&pool, || {
//!     batches
//!     .par_iter()
//!     .with_grad_mode() // everything after this runs in the caller's mode
//!     .map(|x| x.matmul(&w).sum())
//!     .map(|y| {
//!         assert!(!y.requires_grad());
//!         y.item()
//!     })
//!     .sum()
//! });
//! assert_eq!(total, 8.0 * 32.0);
//! ```
//!
//! [`with_grad_mode`](ParallelIteratorExt::with_grad_mode) covers every
//! closure of the chain, the combining closures of `reduce`, `fold` and `sum`
//! included. It returns an unindexed iterator on purpose: adaptors that
//! rayon drives through producers (`zip`, `enumerate`, `chunks`) would run
//! user code outside the mode, so they cannot follow it; put them before it.
//!
//! For whole operations there are [`map`], [`join`], [`scope`], [`install`]
//! and the deterministic data-parallel [`backward_shards`].
//!
//! netcl's own parallel work goes through these helpers: `train::evaluate`
//! maps batches with [`map`], and the data loader's background thread enters
//! the mode captured when its epoch starts. The one exception is the matrix
//! kernel, which splits a large product across the pool's workers: it runs
//! plain arithmetic on buffers, no tensor op, so there is no mode to carry.
//!
//! # Locks
//!
//! Tasks of one parallel operation may record into the same tape
//! concurrently. Each op takes its inputs' read locks, then the tape lock for
//! the push; the tape lock is never held while any other lock is taken or any
//! user code runs, and a tensor's gradient lock is taken alone. So there is
//! no lock-order cycle, whatever the threads do.

use crate::autograd::GradMode;
use crate::error::Result;
use crate::tensor::Tensor;

/// Applies `f` to every item in parallel and returns the results in order.
/// Every call of `f` runs in the caller's mode (grad flag, training mode and tape), entered
/// once per chunk of items on whichever worker runs it.
///
/// # Examples
///
/// ```
/// use netcl::{Tensor, autograd, parallel};
///
/// let w = Tensor::ones(&[3]).requires_grad_(true);
/// let batches: Vec<Tensor> = (0..8).map(|i| Tensor::full(&[3], i as f32)).collect();
/// let _guard = autograd::no_grad();
/// let outputs = parallel::map(&batches, |x| (x * &w).sum());
/// // Every worker ran in the caller's no_grad mode.
/// assert!(outputs.iter().all(|y| !y.requires_grad()));
/// assert_eq!(outputs[2].item(), 6.0);
/// ```
pub fn map<T, R, F>(items: &[T], f: F) -> Vec<R>
where
    T: Sync,
    R: Send,
    F: Fn(&T) -> R + Sync + Send,
{
    let mode = GradMode::current();
    #[cfg(not(loom))]
    {
        use rayon::prelude::*;
        items
            .par_chunks(chunk_len(items.len()))
            .flat_map_iter(|chunk| {
                let _guard = mode.enter();
                let _task = TaskMark::enter();
                chunk.iter().map(&f).collect::<Vec<_>>()
            })
            .collect()
    }
    #[cfg(loom)]
    {
        mode.run(|| items.iter().map(f).collect())
    }
}

#[cfg(not(loom))]
thread_local! {
    /// True while this thread runs a task of a netcl data-parallel operation:
    /// kernels called from it run on one thread, the parallelism being
    /// already taken by the operation.
    static IN_TASK: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Marks this thread as running a data-parallel task until dropped.
#[cfg(not(loom))]
struct TaskMark(bool);

#[cfg(not(loom))]
impl TaskMark {
    fn enter() -> TaskMark {
        TaskMark(IN_TASK.with(|flag| flag.replace(true)))
    }
}

#[cfg(not(loom))]
impl Drop for TaskMark {
    fn drop(&mut self) {
        IN_TASK.with(|flag| flag.set(self.0));
    }
}

/// How many threads an m×k by k×n matrix product should use: one inside a
/// data-parallel task (the parallelism is already taken) and for products
/// too small to pay for waking another worker; otherwise the current pool's.
///
/// The threshold, 16M multiply-adds (about 150 µs on one core), comes from
/// measurement on 2-vCPU virtual machines, where a rayon worker idle for
/// more than ~10 µs is asleep and takes from 20 µs to several hundred to
/// wake: below it, splitting the products of a training step loses more to
/// wake-ups than it gains, although back-to-back products would gain
/// (BENCHMARKS.md).
#[cfg(not(loom))]
pub(crate) fn kernel_threads(m: usize, k: usize, n: usize) -> usize {
    const MIN_PARALLEL_WORK: usize = 1 << 24;
    if m.saturating_mul(n).saturating_mul(k) < MIN_PARALLEL_WORK
        || IN_TASK.with(std::cell::Cell::get)
    {
        1
    } else {
        rayon::current_num_threads()
    }
}

/// The index of the rayon worker running this code in its pool, `None` on
/// a thread that is not a rayon worker (and always under loom).
pub(crate) fn worker_index() -> Option<usize> {
    #[cfg(not(loom))]
    return rayon::current_thread_index();
    #[cfg(loom)]
    return None;
}

/// Items per chunk: about four chunks per worker, so the pool can balance
/// load while the mode is entered once per chunk rather than per item.
#[cfg(not(loom))]
fn chunk_len(len: usize) -> usize {
    let chunks = 4 * rayon::current_num_threads().max(1);
    len.div_ceil(chunks).max(1)
}

/// Runs `a` and `b`, potentially in parallel, both in the caller's grad mode
/// (`rayon::join` with the mode carried).
///
/// # Examples
///
/// ```
/// use netcl::{Tensor, autograd, parallel};
///
/// let w = Tensor::ones(&[2]).requires_grad_(true);
/// let _guard = autograd::no_grad();
/// let (a, b) = parallel::join(|| &w * 2.0, || &w * 3.0);
/// assert!(!a.requires_grad() && !b.requires_grad());
/// ```
pub fn join<A, B, RA, RB>(a: A, b: B) -> (RA, RB)
where
    A: FnOnce() -> RA + Send,
    B: FnOnce() -> RB + Send,
    RA: Send,
    RB: Send,
{
    let mode = GradMode::current();
    #[cfg(not(loom))]
    {
        rayon::join(|| mode.run(a), || mode.run(b))
    }
    #[cfg(loom)]
    {
        (mode.run(a), mode.run(b))
    }
}

/// A scope in which tasks can be spawned, each running in the mode of the
/// thread that spawned it, as it was at the call to
/// [`spawn`](Scope::spawn).
pub struct Scope<'a, 'scope> {
    #[cfg(not(loom))]
    inner: &'a rayon::Scope<'scope>,
    #[cfg(loom)]
    inner: std::marker::PhantomData<&'a &'scope ()>,
}

impl<'scope> Scope<'_, 'scope> {
    /// Spawns `body` into the scope. It runs in the spawning thread's mode
    /// (grad flag, training mode and tape) as it is now, like
    /// [`join`]'s closures: a spawn made after entering `no_grad` inside
    /// the scope runs under `no_grad`. Tasks it spawns inherit its mode the
    /// same way.
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::{Tensor, autograd, parallel};
    /// use std::sync::Mutex;
    ///
    /// let w = Tensor::ones(&[2]).requires_grad_(true);
    /// let recorded = Mutex::new(Vec::new());
    /// parallel::scope(|s| {
    ///     s.spawn(|_| recorded.lock().unwrap().push((&w * 2.0).requires_grad()));
    ///     let _guard = autograd::no_grad();
    ///     s.spawn(|_| recorded.lock().unwrap().push((&w * 2.0).requires_grad()));
    /// });
    /// let mut recorded = recorded.into_inner().unwrap();
    /// recorded.sort();
    /// assert_eq!(recorded, vec![false, true]);
    /// ```
    pub fn spawn<F>(&self, body: F)
    where
        F: for<'a> FnOnce(&Scope<'a, 'scope>) + Send + 'scope,
    {
        let mode = GradMode::current();
        #[cfg(not(loom))]
        self.inner.spawn(move |inner| {
            mode.run(|| body(&Scope { inner }));
        });
        #[cfg(loom)]
        mode.run(|| {
            body(&Scope {
                inner: std::marker::PhantomData,
            })
        });
    }
}

/// Creates a scope for spawning tasks that borrow from the caller, all
/// running in the caller's grad mode (`rayon::scope` with the mode carried).
/// Returns once every spawned task has finished.
///
/// # Examples
///
/// ```
/// use netcl::{Tensor, autograd, parallel};
/// use std::sync::Mutex;
///
/// let w = Tensor::ones(&[2]).requires_grad_(true);
/// let results = Mutex::new(Vec::new());
/// let _guard = autograd::no_grad();
/// parallel::scope(|s| {
///     for i in 0..4 {
///         let (w, results) = (&w, &results);
///         s.spawn(move |_| results.lock().unwrap().push(w * i as f32));
///     }
/// });
/// assert!(results.into_inner().unwrap().iter().all(|y| !y.requires_grad()));
/// ```
pub fn scope<'scope, OP, R>(op: OP) -> R
where
    OP: for<'a> FnOnce(&Scope<'a, 'scope>) -> R + Send,
    R: Send,
{
    let mode = GradMode::current();
    #[cfg(not(loom))]
    {
        rayon::scope(|inner| mode.run(|| op(&Scope { inner })))
    }
    #[cfg(loom)]
    {
        mode.run(|| {
            op(&Scope {
                inner: std::marker::PhantomData,
            })
        })
    }
}

/// Runs `f` inside `pool` (`ThreadPool::install`) in the caller's grad mode,
/// so that rayon work started by `f` (and by netcl's helpers) uses that pool.
///
/// # Examples
///
/// ```
/// use netcl::{Tensor, autograd, parallel};
///
/// let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
/// let w = Tensor::ones(&[2]).requires_grad_(true);
/// let _guard = autograd::no_grad();
/// let y = parallel::install(&pool, || &w * 2.0);
/// assert!(!y.requires_grad());
/// ```
#[cfg(not(loom))]
pub fn install<R, F>(pool: &rayon::ThreadPool, f: F) -> R
where
    F: FnOnce() -> R + Send,
    R: Send,
{
    let mode = GradMode::current();
    pool.install(|| mode.run(f))
}

/// Computes the gradients of a loss split into shards, the shards in
/// parallel, and accumulates them into the parameters' [`grad`] in shard
/// order. Returns each shard's loss.
///
/// Each shard's gradient is computed on its own (with
/// [`autograd::grad`](crate::autograd::grad)) and the sum is formed in shard
/// order, so for a fixed set of shards the accumulated gradients are
/// bitwise identical whatever the number of threads. The shard losses are
/// recorded with grad on, whatever the caller's mode (this helper exists to
/// compute gradients), into the caller's tape; their graphs are released.
/// As with [`Tensor::backward`], a parameter that no shard's loss depends
/// on (or that does not require grad) is left untouched: its `grad()` stays
/// `None` rather than becoming zeros, so an optimizer skips it.
///
/// A shard's loss may itself hold a gradient recorded with `create_graph`
/// (a gradient penalty: [`grad_with`](crate::autograd::grad_with) inside
/// `loss`): each shard's double backward runs on that shard's graph alone,
/// so the same guarantee holds.
///
/// # Errors
///
/// The first error (in shard order) returned by `loss`, or raised while
/// differentiating it (for instance
/// [`Error::NotScalar`](crate::Error::NotScalar) if a shard's loss has more
/// than one element).
///
/// [`grad`]: Tensor::grad
///
/// # Examples
///
/// ```
/// use netcl::{Tensor, parallel};
///
/// let w = Tensor::from_vec(vec![1.0, 2.0], &[2])?.requires_grad_(true);
/// let shards: Vec<Tensor> = (0..4).map(|i| Tensor::full(&[2], i as f32)).collect();
/// let params = [w.clone()];
/// let losses = parallel::backward_shards(&shards, &params, |x| Ok((x * &w).sum()))?;
/// assert_eq!(losses, vec![0.0, 3.0, 6.0, 9.0]);
/// // d/dw Σ_shards Σ x·w = Σ_shards x = 0 + 1 + 2 + 3
/// assert_eq!(w.grad().unwrap().to_vec(), vec![6.0, 6.0]);
/// # Ok::<(), netcl::Error>(())
/// ```
pub fn backward_shards<S, F>(shards: &[S], params: &[Tensor], loss: F) -> Result<Vec<f32>>
where
    S: Sync,
    F: Fn(&S) -> Result<Tensor> + Sync + Send,
{
    let mode = GradMode::current().with_enabled(true);
    let inputs: Vec<&Tensor> = params.iter().collect();
    type Grads = Vec<Option<crate::storage::Data>>;
    let shard_grads = |shard: &S| -> Result<(f32, Grads)> {
        let loss = loss(shard)?;
        let value = loss.try_item()?;
        Ok((
            value,
            crate::autograd::engine_api::reached(&[&loss], &inputs, false)?,
        ))
    };
    let per_shard: Vec<Result<(f32, Grads)>> = mode.run(|| map(shards, shard_grads));

    let mut losses = Vec::with_capacity(shards.len());
    // A parameter no shard's gradient reaches keeps its `grad()` as it
    // was (`None` after `zero_grad`), as with `backward`.
    let mut sums: Grads = vec![None; params.len()];
    for result in per_shard {
        let (value, grads) = result?;
        losses.push(value);
        for (sum, grad) in sums.iter_mut().zip(grads) {
            if let Some(grad) = grad {
                crate::storage::Data::accumulate(sum, grad);
            }
        }
    }
    for (param, sum) in params.iter().zip(sums) {
        if let Some(sum) = sum {
            param.accumulate_grad(sum);
        }
    }
    Ok(losses)
}

/// Data-parallel gradients that can be differentiated again: the
/// [`create_graph`](crate::autograd::BackwardOptions::create_graph) form of
/// [`backward_shards`].
///
/// Runs `loss` on every shard in parallel (in the caller's mode, with grad
/// on), takes each shard's gradients with respect to `params` through
/// [`grad_with`](crate::autograd::grad_with) and `options`, and returns the
/// shard losses and the gradients summed over the shards, in shard order.
/// Nothing is written to `params`' [`grad`](Tensor::grad). With
/// `create_graph` on, the sums are recorded tensors on the caller's tape, so
/// a Hessian-vector product or a gradient penalty can differentiate them
/// again with [`grad_with`](crate::autograd::grad_with) or `backward`.
///
/// The guarantee is [`backward_shards`]'s: each shard's gradient is
/// computed on that shard's graph alone and the sum is formed in shard
/// order, so for a fixed set of shards the losses and the gradients are
/// the same bits whatever the number of threads. A derivative taken
/// through them with `create_graph` (a Hessian-vector product) is not
/// bit-for-bit: its backward walks the shards' graphs, which the threads
/// recorded on one tape at the same time, in the order they were
/// recorded, so the shards' contributions to a parameter are added in an
/// order that can change from run to run (the results agree to float
/// rounding).
///
/// A parameter no shard's loss reaches gets what `options` says for an
/// unused input (zeros by default, `None` with `allow_unused`).
///
/// # Errors
///
/// The first error (in shard order) returned by `loss` or raised while
/// differentiating it, as [`backward_shards`]; and
/// [`Error::NotDifferentiable`](crate::Error::NotDifferentiable) with
/// `create_graph` if an op on the way has no differentiable backward.
///
/// # Examples
///
/// A Hessian-vector product of a loss split over four shards:
///
/// ```
/// use netcl::autograd::{self, BackwardOptions};
/// use netcl::{Tensor, parallel};
///
/// let w = Tensor::from_vec(vec![1.0, 2.0], &[2])?.requires_grad_(true);
/// let shards: Vec<Tensor> = (0..4).map(|i| Tensor::full(&[2], i as f32)).collect();
/// let create = BackwardOptions::new().create_graph(true);
/// // Σ_shards Σ x·w²: the gradient is Σ 2·x·w, the Hessian diag(Σ 2·x) = 12·I.
/// let (losses, grads) =
///     parallel::grad_shards(&shards, &[w.clone()], &create, |x| Ok((x * &w * &w).sum()))?;
/// assert_eq!(losses, vec![0.0, 5.0, 10.0, 15.0]);
/// let g = grads[0].clone().unwrap();
/// assert_eq!(g.to_vec(), vec![12.0, 24.0]);
/// let v = Tensor::from_vec(vec![1.0, -1.0], &[2])?;
/// let hv = autograd::grad(&[&(&g * &v).sum()], &[&w])?;
/// assert_eq!(hv[0].to_vec(), vec![12.0, -12.0]);
/// # Ok::<(), netcl::Error>(())
/// ```
pub fn grad_shards<S, F>(
    shards: &[S],
    params: &[Tensor],
    options: &crate::autograd::BackwardOptions,
    loss: F,
) -> Result<(Vec<f32>, Vec<Option<Tensor>>)>
where
    S: Sync,
    F: Fn(&S) -> Result<Tensor> + Sync + Send,
{
    let mode = GradMode::current().with_enabled(true);
    let inputs: Vec<&Tensor> = params.iter().collect();
    let shard_grads = |shard: &S| -> Result<(f32, Vec<Option<Tensor>>)> {
        let loss = loss(shard)?;
        let value = loss.try_item()?;
        Ok((
            value,
            crate::autograd::grad_with(&[&loss], &inputs, options)?,
        ))
    };
    let per_shard: Vec<Result<(f32, Vec<Option<Tensor>>)>> = mode.run(|| map(shards, shard_grads));

    // The sum in shard order, recorded (with `create_graph`) in the
    // caller's mode.
    mode.run(|| {
        let mut losses = Vec::with_capacity(shards.len());
        let mut sums: Vec<Option<Tensor>> = vec![None; params.len()];
        for result in per_shard {
            let (value, grads) = result?;
            losses.push(value);
            for (sum, grad) in sums.iter_mut().zip(grads) {
                if let Some(grad) = grad {
                    *sum = Some(match sum.take() {
                        None => grad,
                        Some(total) => total.try_add(&grad)?,
                    });
                }
            }
        }
        Ok((losses, sums))
    })
}

/// The extension trait and rayon's prelude, for `use
/// netcl::parallel::prelude::*`.
#[cfg(not(loom))]
pub mod prelude {
    pub use super::ParallelIteratorExt;
    pub use rayon::prelude::*;
}

#[cfg(not(loom))]
pub use iter::{ParallelIteratorExt, WithGradMode};

/// The rayon version netcl is built with, for building thread pools to pass
/// to [`install`].
#[cfg(not(loom))]
pub use rayon;

#[cfg(not(loom))]
mod iter {
    use rayon::iter::ParallelIterator;
    use rayon::iter::plumbing::{Consumer, Folder, Reducer, UnindexedConsumer};

    use crate::autograd::{GradMode, ModeGuard};

    /// Adds [`with_grad_mode`](ParallelIteratorExt::with_grad_mode) to every
    /// rayon parallel iterator.
    pub trait ParallelIteratorExt: ParallelIterator {
        /// Captures this thread's mode (grad flag, training mode and tape) and runs the rest
        /// of the chain in it: every closure after this call, the combining
        /// closures of `reduce`, `fold` and `sum` included, and the folding of
        /// everything before it. The mode is entered once per chunk a worker
        /// processes, and the worker's own mode is restored afterwards.
        ///
        /// Call it on the calling thread, right after the source iterator.
        ///
        /// # Examples
        ///
        /// ```
        /// use netcl::parallel::prelude::*;
        /// use netcl::{Tensor, autograd};
        ///
        /// let w = Tensor::from_vec(vec![1.0, 2.0], &[2])?.requires_grad_(true);
        /// let shards: Vec<Tensor> = (0..4).map(|i| Tensor::full(&[2], i as f32)).collect();
        /// // Data-parallel forward with grad on: workers record into the
        /// // caller's tape, and one backward covers every shard.
        /// let loss = shards
        ///     .par_iter()
        ///     .with_grad_mode()
        ///     .map(|x| (x * &w).sum())
        ///     .reduce(|| Tensor::scalar(0.0), |a, b| a + b);
        /// loss.backward();
        /// assert_eq!(w.grad().unwrap().to_vec(), vec![6.0, 6.0]);
        /// # Ok::<(), netcl::Error>(())
        /// ```
        fn with_grad_mode(self) -> WithGradMode<Self> {
            self.with_mode(GradMode::current())
        }

        /// Runs the rest of the chain in `mode`, as
        /// [`with_grad_mode`](ParallelIteratorExt::with_grad_mode) does with
        /// the current thread's.
        fn with_mode(self, mode: GradMode) -> WithGradMode<Self> {
            WithGradMode { base: self, mode }
        }
    }

    impl<I: ParallelIterator> ParallelIteratorExt for I {}

    /// A parallel iterator whose chain runs in a captured [`GradMode`];
    /// created by [`ParallelIteratorExt::with_grad_mode`].
    ///
    /// Deliberately not an `IndexedParallelIterator`: see the module docs.
    #[derive(Debug, Clone)]
    pub struct WithGradMode<I> {
        base: I,
        mode: GradMode,
    }

    impl<I: ParallelIterator> ParallelIterator for WithGradMode<I> {
        type Item = I::Item;

        fn drive_unindexed<C>(self, consumer: C) -> C::Result
        where
            C: UnindexedConsumer<Self::Item>,
        {
            let consumer = ModeConsumer {
                base: consumer,
                mode: self.mode,
            };
            self.base.drive_unindexed(consumer)
        }

        fn opt_len(&self) -> Option<usize> {
            self.base.opt_len()
        }
    }

    /// Wraps the downstream consumer: its folders hold the mode entered,
    /// its reducers enter it around each reduction.
    struct ModeConsumer<C> {
        base: C,
        mode: GradMode,
    }

    impl<T, C: Consumer<T>> Consumer<T> for ModeConsumer<C> {
        type Folder = ModeFolder<C::Folder>;
        type Reducer = ModeReducer<C::Reducer>;
        type Result = C::Result;

        fn split_at(self, index: usize) -> (Self, Self, Self::Reducer) {
            let (left, right, reducer) = self.base.split_at(index);
            (
                ModeConsumer {
                    base: left,
                    mode: self.mode.clone(),
                },
                ModeConsumer {
                    base: right,
                    mode: self.mode.clone(),
                },
                ModeReducer {
                    base: reducer,
                    mode: self.mode,
                },
            )
        }

        fn into_folder(self) -> Self::Folder {
            // Entered before the downstream folder exists, so its creation
            // (a fold's identity, say) runs in the mode too.
            let guard = self.mode.enter();
            let task = super::TaskMark::enter();
            ModeFolder {
                base: self.base.into_folder(),
                _task: task,
                _guard: guard,
            }
        }

        fn full(&self) -> bool {
            self.base.full()
        }
    }

    impl<T, C: UnindexedConsumer<T>> UnindexedConsumer<T> for ModeConsumer<C> {
        fn split_off_left(&self) -> Self {
            ModeConsumer {
                base: self.base.split_off_left(),
                mode: self.mode.clone(),
            }
        }

        fn to_reducer(&self) -> Self::Reducer {
            ModeReducer {
                base: self.base.to_reducer(),
                mode: self.mode.clone(),
            }
        }
    }

    /// A folder that keeps the mode entered for as long as it exists: one
    /// chunk of work on one thread, marked as a data-parallel task. Field
    /// order matters: the downstream folder (which may hold guards of its
    /// own) drops first, then the task mark, then the guard.
    struct ModeFolder<F> {
        base: F,
        _task: super::TaskMark,
        _guard: ModeGuard,
    }

    impl<T, F: Folder<T>> Folder<T> for ModeFolder<F> {
        type Result = F::Result;

        fn consume(self, item: T) -> Self {
            ModeFolder {
                base: self.base.consume(item),
                _task: self._task,
                _guard: self._guard,
            }
        }

        fn consume_iter<It>(self, iter: It) -> Self
        where
            It: IntoIterator<Item = T>,
        {
            ModeFolder {
                base: self.base.consume_iter(iter),
                _task: self._task,
                _guard: self._guard,
            }
        }

        fn complete(self) -> Self::Result {
            let result = self.base.complete();
            drop(self._task);
            drop(self._guard);
            result
        }

        fn full(&self) -> bool {
            self.base.full()
        }
    }

    struct ModeReducer<R> {
        base: R,
        mode: GradMode,
    }

    impl<T, R: Reducer<T>> Reducer<T> for ModeReducer<R> {
        fn reduce(self, left: T, right: T) -> T {
            let ModeReducer { base, mode } = self;
            mode.run(|| base.reduce(left, right))
        }
    }
}
