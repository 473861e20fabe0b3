//! [`Tensor`]: an n-dimensional array of `f32` with reverse-mode autograd.

use std::fmt;

use ndarray::{ArcArray, Array, ArrayD, ArrayViewD, ArrayViewMutD, Dimension, IxDyn};
use rand::{Rng, RngExt};

use crate::array::checked_numel;
use crate::autograd::tape::{NodeId, Tape};
use crate::error::{Error, Result, or_panic};
use crate::sync::{Arc, AtomicBool, Mutex, Ordering, thread_local_const};

pub(crate) use crate::storage::Data;
use crate::storage::Dims;

/// An n-dimensional array of `f32` that can record the operations applied to
/// it and compute gradients by reverse-mode automatic differentiation.
///
/// A `Tensor` is a handle: `clone` is cheap and shares the values, the
/// gradient and the graph. It is `Send + Sync`; tensors can be shared by any
/// number of threads.
///
/// Leaves are tensors created directly (not computed by a recorded op). Mark
/// a leaf with [`requires_grad_`](Tensor::requires_grad_) and every op applied
/// to it, while grad mode is on for the thread, records a node; calling
/// [`backward`](Tensor::backward) on a scalar result accumulates gradients
/// into the leaves' [`grad`](Tensor::grad).
///
/// Every op comes as a `try_` method returning [`Result`] and a plain method
/// that panics with the same message.
///
/// # Examples
///
/// ```
/// use netcl::Tensor;
///
/// // y = sum(w * x + 1), so dy/dw = x.
/// let x = Tensor::from_vec(vec![1.0, 2.0, 3.0], &[3])?;
/// let w = Tensor::from_vec(vec![0.5, -1.0, 2.0], &[3])?.requires_grad_(true);
/// let y = (&w * &x + 1.0).sum();
/// assert_eq!(y.item(), 7.5);
/// y.backward();
/// assert_eq!(w.grad().unwrap().to_vec(), vec![1.0, 2.0, 3.0]);
/// # Ok::<(), netcl::Error>(())
/// ```
#[derive(Clone)]
pub struct Tensor(pub(crate) Arc<Inner>);

pub(crate) struct Inner {
    /// The current values.
    ///
    /// # Invariant: no lock is held while computing
    ///
    /// This lock is only ever held for O(1) work: a reader clones the
    /// [`Data`] (a reference-count bump) and computes on that snapshot
    /// with no lock held; a writer prepares the new values in a buffer of
    /// its own and swaps it in. So a reader never waits for a computation
    /// or a writer's update, a writer never waits for a reader's
    /// computation, and no thread can wait on a lock held lower on its own
    /// stack (a rayon worker blocked in `join` that steals a job touching
    /// this tensor takes this lock for a clone or a swap, never while
    /// holding it).
    data: Mutex<Data>,
    /// Serialises the writers of this tensor (so concurrent updates are
    /// never lost), and keeps the buffer the last write replaced, reused by
    /// the next write if no snapshot holds it by then. Readers never take
    /// this lock.
    writer: Mutex<Option<Box<Data>>>,
    shape: Dims,
    /// The leaf flag; tensors computed by a recorded op require grad through
    /// their node instead.
    requires_grad: AtomicBool,
    /// Accumulated gradient of a leaf, under the leaf's own lock.
    grad: Mutex<Option<Box<Data>>>,
    node: Option<NodeRef>,
}

/// An O(1) snapshot of a tensor's values, taken by [`Tensor::read`]: ops
/// compute on it with no lock held, and later updates of the tensor do not
/// show through it.
pub(crate) struct Snapshot(Data);

impl Snapshot {
    pub(crate) fn into_data(self) -> Data {
        self.0
    }
}

impl std::ops::Deref for Snapshot {
    type Target = Data;

    fn deref(&self) -> &Data {
        &self.0
    }
}

/// Snapshots of two operands that may be one tensor; see
/// [`Tensor::read_pair`].
pub(crate) struct Operands {
    first: Data,
    second: Option<Data>,
}

impl Operands {
    /// The two operands' values, in the order given.
    pub(crate) fn get(&self) -> (&Data, &Data) {
        (&self.first, self.second.as_ref().unwrap_or(&self.first))
    }

    /// The two snapshots themselves, to keep (for a backward).
    pub(crate) fn into_pair(self) -> (Data, Data) {
        match self.second {
            Some(second) => (self.first, second),
            None => (self.first.clone(), self.first),
        }
    }
}

/// The graph node that computed a tensor. It holds one reference to the node,
/// released when the tensor's last handle drops.
pub(crate) struct NodeRef {
    pub(crate) tape: Arc<Tape>,
    pub(crate) id: NodeId,
    pub(crate) op: &'static str,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(node) = self.node.take() {
            node.tape.release(node.id);
        }
    }
}

const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Tensor>();
};

thread_local_const! {
    /// The tensors this thread is writing, innermost last.
    static WRITING: std::cell::RefCell<Vec<usize>> = std::cell::RefCell::new(Vec::new());
}

thread_local_const! {
    /// Inside a fork scope: every tensor this thread forked so far, with its
    /// fork (the source is kept alive, so no other tensor can take its
    /// place while the scope lasts).
    static FORKS: std::cell::RefCell<Option<Vec<(Tensor, Tensor)>>> = std::cell::RefCell::new(None);
}

/// Runs `f` in a fork scope on this thread (see [`crate::nn::fork_scope`]);
/// nested scopes join the outermost one.
pub(crate) fn fork_scope<R>(f: impl FnOnce() -> R) -> R {
    /// Ends the scope, even if `f` panics.
    struct End;
    impl Drop for End {
        fn drop(&mut self) {
            let forks = FORKS.with(|forks| forks.borrow_mut().take());
            drop(forks);
        }
    }
    let outermost = FORKS.with(|forks| {
        let mut forks = forks.borrow_mut();
        let outermost = forks.is_none();
        if outermost {
            *forks = Some(Vec::new());
        }
        outermost
    });
    // (Built only when outermost: an `End` dropped at once would end the
    // enclosing scope.)
    let _end = if outermost { Some(End) } else { None };
    f()
}

/// Marks a tensor as being written by this thread until dropped, so that a
/// nested write of the same tensor (which would wait for itself forever) is
/// a clear panic instead of a hang.
struct WriteMark(usize);

impl WriteMark {
    #[track_caller]
    fn enter(tensor: &Tensor) -> WriteMark {
        let id = tensor.identity() as usize;
        WRITING.with(|writing| {
            let mut writing = writing.borrow_mut();
            assert!(
                !writing.contains(&id),
                "with_data_mut: this thread is already updating this tensor; an update inside its own update would wait for itself"
            );
            writing.push(id);
        });
        WriteMark(id)
    }
}

impl Drop for WriteMark {
    fn drop(&mut self) {
        let _ = WRITING.try_with(|writing| {
            let mut writing = writing.borrow_mut();
            if let Some(i) = writing.iter().rposition(|&id| id == self.0) {
                writing.remove(i);
            }
        });
    }
}

/// Names the op that computed a tensor; returned by [`Tensor::grad_fn`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GradFn {
    name: &'static str,
    tape: u64,
}

impl GradFn {
    /// The op's name, such as `"matmul"` or a custom op's name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The id of the tape the node was recorded on.
    pub fn tape_id(&self) -> u64 {
        self.tape
    }
}

impl fmt::Display for GradFn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.name)
    }
}

/// Construction.
impl Tensor {
    /// The most elements a tensor can have: `isize::MAX / 4`, the number of
    /// `f32` values the largest allocation Rust permits can hold.
    ///
    /// A shape is valid when the product of its non-zero lengths is at most
    /// this, so a zero-size shape is valid only if its other axes could
    /// exist too (ndarray computes strides from them). Constructors and
    /// ops that would create a larger shape return
    /// [`Error::ShapeTooLarge`] (their `try_` forms) or panic.
    pub const MAX_ELEMENTS: usize = crate::array::MAX_ELEMENTS;

    fn with_parts(data: Data, requires_grad: bool, node: Option<NodeRef>) -> Tensor {
        Tensor(Arc::new(Inner {
            shape: Dims::from_slice(data.shape()),
            data: Mutex::new(data),
            writer: Mutex::new(None),
            requires_grad: AtomicBool::new(requires_grad),
            grad: Mutex::new(None),
            node,
        }))
    }

    /// A leaf holding `data`, not requiring grad.
    pub(crate) fn from_data(data: Data) -> Tensor {
        Tensor::with_parts(data, false, None)
    }

    /// The output of a recorded op.
    pub(crate) fn from_node(data: Data, node: NodeRef) -> Tensor {
        Tensor::with_parts(data, false, Some(node))
    }

    /// A tensor of the given shape from values in row-major order.
    ///
    /// # Errors
    ///
    /// [`Error::ShapeTooLarge`] if the shape has more than
    /// [`MAX_ELEMENTS`](Tensor::MAX_ELEMENTS) elements (or, for a zero-size
    /// shape, its non-zero lengths multiply to more),
    /// [`Error::ElementCount`] if `values.len()` is not the product of `shape`.
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::Tensor;
    ///
    /// let t = Tensor::from_vec(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3])?;
    /// assert_eq!(t.shape(), &[2, 3]);
    /// assert!(Tensor::from_vec(vec![1.0; 5], &[2, 3]).is_err());
    /// # Ok::<(), netcl::Error>(())
    /// ```
    pub fn from_vec(values: Vec<f32>, shape: &[usize]) -> Result<Tensor> {
        let expected = checked_numel("from_vec", shape)?;
        if values.len() != expected {
            return Err(Error::ElementCount {
                op: "from_vec",
                shape: shape.to_vec(),
                expected,
                len: values.len(),
            });
        }
        Ok(Tensor::from_data(Data::from_vec(shape, values)))
    }

    /// A leaf tensor owning `array` (also available as `From`).
    ///
    /// # Panics
    ///
    /// If the array is empty with axes whose non-zero lengths multiply past
    /// [`MAX_ELEMENTS`](Tensor::MAX_ELEMENTS) (ndarray accepts an empty
    /// `[0, 2^62]`; netcl's shapes cannot hold it, see
    /// [`try_from_array`](Tensor::try_from_array)).
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::Tensor;
    /// use ndarray::array;
    ///
    /// let t = Tensor::from_array(array![[1.0, 2.0], [3.0, 4.0]]);
    /// assert_eq!(t.shape(), &[2, 2]);
    /// let u: Tensor = array![5.0_f32, 6.0].into();
    /// assert_eq!(u.to_vec(), vec![5.0, 6.0]);
    /// ```
    #[track_caller]
    pub fn from_array<D: Dimension>(array: Array<f32, D>) -> Tensor {
        or_panic(Tensor::try_from_array(array))
    }

    /// A leaf tensor owning `array`, or an error for a shape netcl cannot
    /// hold.
    ///
    /// # Errors
    ///
    /// [`Error::ShapeTooLarge`] if the product of the array's non-zero
    /// lengths exceeds [`MAX_ELEMENTS`](Tensor::MAX_ELEMENTS) (only an
    /// empty array can have such a shape).
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::{Error, Tensor};
    /// use ndarray::ArrayD;
    ///
    /// let empty = ArrayD::<f32>::zeros(vec![0, 1 << 62]);
    /// assert!(matches!(
    ///     Tensor::try_from_array(empty),
    ///     Err(Error::ShapeTooLarge { op: "from_array", .. })
    /// ));
    /// let t = Tensor::try_from_array(ndarray::array![1.0_f32, 2.0])?;
    /// assert_eq!(t.to_vec(), vec![1.0, 2.0]);
    /// # Ok::<(), netcl::Error>(())
    /// ```
    pub fn try_from_array<D: Dimension>(array: Array<f32, D>) -> Result<Tensor> {
        checked_numel("from_array", array.shape())?;
        Ok(Tensor::from_data(Data::from_array(array.into_dyn())))
    }

    /// A tensor of zeros.
    ///
    /// # Panics
    ///
    /// As [`full`](Tensor::full).
    #[track_caller]
    pub fn zeros(shape: &[usize]) -> Tensor {
        Tensor::full(shape, 0.0)
    }

    /// A tensor of ones.
    ///
    /// # Panics
    ///
    /// As [`full`](Tensor::full).
    #[track_caller]
    pub fn ones(shape: &[usize]) -> Tensor {
        Tensor::full(shape, 1.0)
    }

    /// A tensor with every element equal to `value`.
    ///
    /// # Panics
    ///
    /// With [`Error::ShapeTooLarge`]'s message if the shape has more than
    /// [`MAX_ELEMENTS`](Tensor::MAX_ELEMENTS) elements (or, for a zero-size
    /// shape, its non-zero lengths multiply to more). Like any allocation,
    /// a shape that fits the limit but not the memory aborts the process.
    #[track_caller]
    pub fn full(shape: &[usize], value: f32) -> Tensor {
        or_panic(checked_numel("full", shape));
        Tensor::from_data(Data::full(shape, value))
    }

    /// A zero-dimensional tensor holding `value`.
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::Tensor;
    ///
    /// let s = Tensor::scalar(2.5);
    /// assert_eq!(s.ndim(), 0);
    /// assert_eq!(s.item(), 2.5);
    /// ```
    pub fn scalar(value: f32) -> Tensor {
        Tensor::full(&[], value)
    }

    /// The 1-D tensor `start, start + step, ...` up to but excluding `end`.
    ///
    /// # Panics
    ///
    /// As [`try_arange`](Tensor::try_arange).
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::Tensor;
    ///
    /// assert_eq!(Tensor::arange(0.0, 4.0, 1.0).to_vec(), vec![0.0, 1.0, 2.0, 3.0]);
    /// assert_eq!(Tensor::arange(1.0, 0.0, -0.5).to_vec(), vec![1.0, 0.5]);
    /// ```
    #[track_caller]
    pub fn arange(start: f32, end: f32, step: f32) -> Tensor {
        or_panic(Tensor::try_arange(start, end, step))
    }

    /// The 1-D tensor `start, start + step, ...` up to but excluding `end`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] if `step` is zero, any argument is not
    /// finite, the range holds more than
    /// [`MAX_ELEMENTS`](Tensor::MAX_ELEMENTS) elements, or the memory for
    /// them cannot be allocated.
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::{Error, Tensor};
    ///
    /// assert_eq!(Tensor::try_arange(0.0, 1.0, 0.25)?.numel(), 4);
    /// let err = Tensor::try_arange(0.0, 1e10, 1e-10).unwrap_err();
    /// assert!(matches!(err, Error::InvalidArgument { op: "arange", .. }));
    /// # Ok::<(), netcl::Error>(())
    /// ```
    pub fn try_arange(start: f32, end: f32, step: f32) -> Result<Tensor> {
        let invalid = |message: String| Error::InvalidArgument {
            op: "arange",
            message,
        };
        if step == 0.0 || !(start.is_finite() && end.is_finite() && step.is_finite()) {
            return Err(invalid(format!(
                "need finite bounds and a non-zero finite step, got start {start}, end {end}, step {step}"
            )));
        }
        // In f64, where neither the difference nor the quotient of finite
        // f32 values overflows.
        let count = ((f64::from(end) - f64::from(start)) / f64::from(step))
            .ceil()
            .max(0.0);
        if count > Tensor::MAX_ELEMENTS as f64 {
            return Err(invalid(format!(
                "start {start}, end {end}, step {step} would give {count:e} elements, more than the limit of {} (Tensor::MAX_ELEMENTS)",
                Tensor::MAX_ELEMENTS
            )));
        }
        let count = count as usize;
        let mut values = Vec::new();
        values.try_reserve_exact(count).map_err(|err| {
            invalid(format!(
                "cannot allocate {count} elements for start {start}, end {end}, step {step}: {err}"
            ))
        })?;
        values.extend((0..count).map(|i| start + i as f32 * step));
        Tensor::from_vec(values, &[count])
    }

    /// A tensor of values drawn uniformly from `[0, 1)` with `rng`.
    ///
    /// Seed the generator for reproducible values.
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::Tensor;
    /// use netcl::rand::SeedableRng;
    /// use netcl::rand::rngs::StdRng;
    ///
    /// let a = Tensor::rand(&[2, 3], &mut StdRng::seed_from_u64(7));
    /// let b = Tensor::rand(&[2, 3], &mut StdRng::seed_from_u64(7));
    /// assert_eq!(a.to_vec(), b.to_vec());
    /// assert!(a.to_vec().iter().all(|v| (0.0..1.0).contains(v)));
    /// ```
    ///
    /// # Panics
    ///
    /// As [`full`](Tensor::full).
    #[track_caller]
    pub fn rand<R: Rng + ?Sized>(shape: &[usize], rng: &mut R) -> Tensor {
        let count = or_panic(checked_numel("rand", shape));
        let values = (0..count).map(|_| rng.random::<f32>()).collect();
        Tensor::from_data(Data::from_vec(shape, values))
    }

    /// A tensor of values drawn uniformly from `[low, high)` with `rng`.
    ///
    /// # Panics
    ///
    /// As [`full`](Tensor::full).
    #[track_caller]
    pub fn uniform<R: Rng + ?Sized>(shape: &[usize], low: f32, high: f32, rng: &mut R) -> Tensor {
        let count = or_panic(checked_numel("uniform", shape));
        let values = (0..count)
            .map(|_| low + (high - low) * rng.random::<f32>())
            .collect();
        Tensor::from_data(Data::from_vec(shape, values))
    }

    /// A tensor of values drawn from the standard normal distribution with
    /// `rng` (Box-Muller transform).
    ///
    /// # Panics
    ///
    /// As [`full`](Tensor::full).
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::Tensor;
    /// use netcl::rand::SeedableRng;
    /// use netcl::rand::rngs::StdRng;
    ///
    /// let t = Tensor::randn(&[10_000], &mut StdRng::seed_from_u64(1));
    /// let mean = t.mean().item();
    /// let var = (&t - mean).powf(2.0).mean().item();
    /// assert!(mean.abs() < 0.05 && (var - 1.0).abs() < 0.05);
    /// ```
    #[track_caller]
    pub fn randn<R: Rng + ?Sized>(shape: &[usize], rng: &mut R) -> Tensor {
        let count = or_panic(checked_numel("randn", shape));
        let mut values = Vec::with_capacity(count + 1);
        while values.len() < count {
            // 1 - u lies in (0, 1], so the logarithm is finite.
            let u1 = 1.0 - rng.random::<f64>();
            let u2 = rng.random::<f64>();
            let radius = (-2.0 * u1.ln()).sqrt();
            let angle = std::f64::consts::TAU * u2;
            values.push((radius * angle.cos()) as f32);
            values.push((radius * angle.sin()) as f32);
        }
        values.truncate(count);
        Tensor::from_vec(values, shape).expect("count matches the shape")
    }
}

impl<D: Dimension> From<Array<f32, D>> for Tensor {
    fn from(array: Array<f32, D>) -> Tensor {
        Tensor::from_array(array)
    }
}

/// Reading values.
impl Tensor {
    /// The length of each dimension.
    pub fn shape(&self) -> &[usize] {
        &self.0.shape
    }

    /// The shape as an ndarray dimension.
    pub(crate) fn dim(&self) -> IxDyn {
        IxDyn(&self.0.shape)
    }

    /// The number of dimensions.
    pub fn ndim(&self) -> usize {
        self.0.shape.len()
    }

    /// The number of elements.
    pub fn numel(&self) -> usize {
        crate::storage::numel(&self.0.shape)
    }

    /// The value of a one-element tensor.
    ///
    /// # Panics
    ///
    /// As [`try_item`](Tensor::try_item).
    #[track_caller]
    pub fn item(&self) -> f32 {
        or_panic(self.try_item())
    }

    /// The value of a one-element tensor.
    ///
    /// # Errors
    ///
    /// [`Error::NotScalar`] if the tensor has more or fewer than one element.
    pub fn try_item(&self) -> Result<f32> {
        if self.numel() != 1 {
            return Err(Error::NotScalar {
                op: "item",
                shape: self.shape().to_vec(),
            });
        }
        Ok(self.read().to_vec()[0])
    }

    /// The values in row-major order.
    pub fn to_vec(&self) -> Vec<f32> {
        self.read().to_vec()
    }

    /// A copy of the values as a shared ndarray, which later updates of the
    /// tensor do not show through.
    ///
    /// The values are copied: netcl stores them in a buffer of its own, not
    /// in an ndarray. [`to_array`](Tensor::to_array) gives an owned array
    /// the same way; [`to_vec`](Tensor::to_vec) the values alone. For a
    /// snapshot that copies nothing, take [`detach`](Tensor::detach): a
    /// tensor sharing the values copy-on-write, which later updates of
    /// this one do not show through.
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::Tensor;
    ///
    /// let t = Tensor::ones(&[2, 2]);
    /// let data = t.data();
    /// assert_eq!(data.sum(), 4.0);
    /// t.with_data_mut(|mut v| v.fill(3.0));
    /// // The snapshot keeps the values it was taken with.
    /// assert_eq!(data.sum(), 4.0);
    /// assert_eq!(t.data().sum(), 12.0);
    ///
    /// // The same, without copying the values.
    /// let snapshot = t.detach();
    /// t.with_data_mut(|mut v| v.fill(5.0));
    /// assert_eq!(snapshot.to_vec(), vec![3.0; 4]);
    /// ```
    pub fn data(&self) -> ArcArray<f32, IxDyn> {
        self.read().to_arc_array()
    }

    /// The values as an owned ndarray (a copy).
    pub fn to_array(&self) -> ArrayD<f32> {
        self.read().to_array()
    }

    /// Updates the values in place, as optimizers do; the shape cannot
    /// change. The update is not recorded, and graphs recorded before keep
    /// the values they saw.
    ///
    /// # Threads
    ///
    /// The update is atomic: other threads see the values from before or
    /// after it, never a mix, and never wait for it. `f` works on a private
    /// buffer holding the current values, which replaces the tensor's values
    /// in one O(1) step when `f` returns (if `f` panics, the tensor keeps
    /// its old values). Meanwhile readers, this thread included, see the old
    /// values. Writers of one tensor take turns, so concurrent updates are
    /// never lost.
    ///
    /// The cost of never blocking readers is a copy of the values into the
    /// private buffer. The buffer the previous update replaced is reused
    /// when no snapshot ([`data`](Tensor::data), a recorded graph, a
    /// published model version) still holds it, so a steady training loop
    /// allocates nothing.
    ///
    /// # Panics
    ///
    /// If `f` calls `with_data_mut` on this same tensor (the inner update
    /// would wait for the outer one forever), and if `f` panics.
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::Tensor;
    ///
    /// let w = Tensor::ones(&[3]);
    /// w.with_data_mut(|mut values| values *= 0.5);
    /// assert_eq!(w.to_vec(), vec![0.5; 3]);
    /// ```
    pub fn with_data_mut<R>(&self, f: impl FnOnce(ArrayViewMutD<'_, f32>) -> R) -> R {
        self.write(
            |current| Data::from_view(current.view()),
            |current, mut next| {
                next.assign(&current);
                f(next)
            },
        )
    }

    /// Replaces the values with new ones computed from the current values:
    /// `f(current, next)` must write every element of `next`, a buffer of
    /// the tensor's shape whose contents are unspecified (a recycled
    /// buffer). As [`with_data_mut`](Tensor::with_data_mut) without its
    /// copy: the optimizers' update path.
    pub(crate) fn update<R>(
        &self,
        f: impl FnOnce(ArrayViewD<'_, f32>, ArrayViewMutD<'_, f32>) -> R,
    ) -> R {
        self.write(|current| Data::full(current.shape(), 0.0), f)
    }

    /// Replaces the values with `values`, of the tensor's shape, in one
    /// O(1) step: nothing is copied.
    pub(crate) fn replace_data(&self, values: Data) {
        debug_assert_eq!(values.shape(), self.shape(), "replace_data keeps the shape");
        let _writing = WriteMark::enter(self);
        let mut spare = self.0.writer.lock();
        let old = std::mem::replace(&mut *self.0.data.lock(), values);
        *spare = Some(Box::new(old));
    }

    /// The write path. Under this tensor's writer lock (readers never take
    /// it), `f` computes the next values from a snapshot of the current ones
    /// into a private buffer: the spare if no snapshot shares it any more,
    /// else a new one made by `fresh`. The buffer then replaces the values
    /// in one swap under the data lock, and the replaced buffer becomes the
    /// spare.
    fn write<R>(
        &self,
        fresh: impl FnOnce(&Data) -> Data,
        f: impl FnOnce(ArrayViewD<'_, f32>, ArrayViewMutD<'_, f32>) -> R,
    ) -> R {
        let _writing = WriteMark::enter(self);
        let mut spare = self.0.writer.lock();
        let current = self.read().into_data();
        let mut next = match spare.take() {
            Some(buffer) if buffer.is_unique() => *buffer,
            _ => fresh(&current),
        };
        let view = next
            .view_mut()
            .expect("a spare no snapshot shares, or a new buffer");
        let result = f(current.view(), view);
        let old = std::mem::replace(&mut *self.0.data.lock(), next);
        drop(current);
        *spare = Some(Box::new(old));
        result
    }

    /// A snapshot of the values: O(1) under the data lock (see the
    /// invariant on `Inner::data`).
    pub(crate) fn read(&self) -> Snapshot {
        Snapshot(self.0.data.lock().clone())
    }

    /// Snapshots of two operands, one snapshot when they are the same
    /// tensor (`x * x`).
    pub(crate) fn read_pair(&self, other: &Tensor) -> Operands {
        let first = self.read().into_data();
        let second = (!self.same(other)).then(|| other.read().into_data());
        Operands { first, second }
    }

    /// True if both handles name the same tensor.
    pub(crate) fn same(&self, other: &Tensor) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    /// An address naming this tensor, for identity maps.
    pub(crate) fn identity(&self) -> *const () {
        Arc::as_ptr(&self.0).cast()
    }
}

/// Autograd.
impl Tensor {
    /// Marks a leaf as requiring grad (or not) and returns it, for use as a
    /// builder: `Tensor::zeros(&[3]).requires_grad_(true)`.
    ///
    /// The flag belongs to the tensor, so every handle sees the change.
    ///
    /// # Panics
    ///
    /// As [`try_requires_grad_`](Tensor::try_requires_grad_).
    #[track_caller]
    pub fn requires_grad_(self, requires_grad: bool) -> Tensor {
        or_panic(self.try_requires_grad_(requires_grad))
    }

    /// Marks a leaf as requiring grad (or not) and returns it.
    ///
    /// # Errors
    ///
    /// [`Error::NotLeaf`] if the tensor was computed by a recorded op.
    pub fn try_requires_grad_(self, requires_grad: bool) -> Result<Tensor> {
        if let Some(node) = &self.0.node {
            return Err(Error::NotLeaf { op: node.op });
        }
        self.0.requires_grad.store(requires_grad, Ordering::Relaxed);
        Ok(self)
    }

    /// Whether gradients flow to this tensor: a leaf marked with
    /// [`requires_grad_`](Tensor::requires_grad_), or the output of a
    /// recorded op.
    pub fn requires_grad(&self) -> bool {
        self.0.node.is_some() || self.0.requires_grad.load(Ordering::Relaxed)
    }

    /// True unless the tensor was computed by a recorded op.
    pub fn is_leaf(&self) -> bool {
        self.0.node.is_none()
    }

    /// The op that computed this tensor, if it was recorded.
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::Tensor;
    ///
    /// let x = Tensor::ones(&[2]).requires_grad_(true);
    /// assert!(x.grad_fn().is_none());
    /// assert_eq!(x.exp().grad_fn().unwrap().name(), "exp");
    /// ```
    pub fn grad_fn(&self) -> Option<GradFn> {
        self.0.node.as_ref().map(|node| GradFn {
            name: node.op,
            tape: node.tape.id(),
        })
    }

    /// The tape this tensor's node is on, if it was recorded.
    pub fn tape(&self) -> Option<Arc<Tape>> {
        self.0.node.as_ref().map(|node| node.tape.clone())
    }

    pub(crate) fn node(&self) -> Option<&NodeRef> {
        self.0.node.as_ref()
    }

    /// The gradient accumulated into this leaf by backward passes, as a new
    /// leaf tensor (sharing storage until either is modified).
    pub fn grad(&self) -> Option<Tensor> {
        self.grad_data().map(Tensor::from_data)
    }

    /// A snapshot of the accumulated gradient (O(1)).
    pub(crate) fn grad_data(&self) -> Option<Data> {
        self.0.grad.lock().as_deref().cloned()
    }

    /// Clears the accumulated gradient (`grad()` becomes `None`).
    pub fn zero_grad(&self) {
        let old = self.0.grad.lock().take();
        drop(old);
    }

    /// Adds `grad` into this leaf's gradient, under the leaf's own lock.
    /// Multiplies the gradient, if any, by `factor` (in place when no
    /// snapshot shares it).
    pub(crate) fn scale_grad(&self, factor: f32) {
        let mut slot = self.0.grad.lock();
        if let Some(grad) = slot.take() {
            *slot = Some(Box::new((*grad).map_into(|g| g * factor)));
        }
    }

    pub(crate) fn accumulate_grad(&self, grad: Data) {
        // In place, unless a snapshot (`grad()`) shares the sum.
        Data::accumulate(&mut *self.0.grad.lock(), grad);
    }

    /// A leaf sharing this tensor's values, outside any graph.
    ///
    /// The values are shared copy-on-write: detaching copies nothing, and
    /// a later update of either tensor (`with_data_mut`, an optimizer step)
    /// writes a buffer of its own, so the other keeps the values it had.
    /// This is the O(1) snapshot of a tensor's values.
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::Tensor;
    ///
    /// let x = Tensor::ones(&[2]).requires_grad_(true);
    /// let y = x.exp().detach();
    /// assert!(y.is_leaf() && !y.requires_grad());
    /// ```
    pub fn detach(&self) -> Tensor {
        Tensor::from_data(self.read().into_data())
    }

    /// True if both handles name the same tensor: a clone of a handle, or a
    /// parameter shared by two layers (a tied weight). A
    /// [`fork`](Tensor::fork) or a [`detach`](Tensor::detach) is another
    /// tensor, even while it shares the values.
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::Tensor;
    ///
    /// let w = Tensor::ones(&[2]);
    /// assert!(w.same_tensor(&w.clone()));
    /// assert!(!w.same_tensor(&w.fork()));
    /// ```
    pub fn same_tensor(&self, other: &Tensor) -> bool {
        self.same(other)
    }

    /// A new leaf with this tensor's current values and its
    /// [`requires_grad`](Tensor::requires_grad) flag, without gradient or
    /// graph: an independent copy of a parameter.
    ///
    /// The values are shared copy-on-write, so forking copies nothing; an
    /// update of either tensor (such as an optimizer step) never shows in
    /// the other. This is how [`Module::try_fork`](crate::nn::Module::try_fork)
    /// copies a model.
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::Tensor;
    ///
    /// let w = Tensor::ones(&[2]).requires_grad_(true);
    /// let fork = w.fork();
    /// assert!(fork.requires_grad() && fork.is_leaf());
    /// w.with_data_mut(|mut v| v.fill(5.0));
    /// assert_eq!(fork.to_vec(), vec![1.0, 1.0]);
    /// ```
    ///
    /// Inside a [`fork_scope`](crate::nn::fork_scope) a tensor forked twice
    /// gives the same fork both times, so that a parameter shared by two
    /// layers (a tied weight) stays shared in the forked model.
    pub fn fork(&self) -> Tensor {
        let fresh = || Tensor::with_parts(self.read().into_data(), self.requires_grad(), None);
        FORKS.with(|forks| {
            let mut forks = forks.borrow_mut();
            let Some(forks) = forks.as_mut() else {
                return fresh();
            };
            if let Some((_, fork)) = forks.iter().find(|(source, _)| source.same(self)) {
                return fork.clone();
            }
            let fork = fresh();
            forks.push((self.clone(), fork.clone()));
            fork
        })
    }
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = f.debug_struct("Tensor");
        s.field("shape", &self.shape());
        s.field("data", &format_args!("{}", &*self.read()));
        s.field("requires_grad", &self.requires_grad());
        if let Some(grad_fn) = self.grad_fn() {
            s.field("grad_fn", &grad_fn.name());
        }
        s.finish()
    }
}

impl fmt::Display for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&*self.read(), f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buffer(t: &Tensor) -> *const f32 {
        t.read().as_slice().expect("row-major").as_ptr()
    }

    #[test]
    fn a_fork_shares_the_values_until_either_side_writes() {
        let w = Tensor::ones(&[8]);
        let fork = w.fork();
        assert_eq!(buffer(&w), buffer(&fork));
        fork.with_data_mut(|mut v| v.fill(2.0));
        assert_ne!(buffer(&w), buffer(&fork));
        assert_eq!(w.to_vec(), vec![1.0; 8]);
    }

    #[test]
    fn snapshots_and_detached_leaves_share_the_values() {
        let w = Tensor::ones(&[8]);
        assert_eq!(buffer(&w), buffer(&w.detach()));
        let op_result = &w + &w;
        assert_eq!(buffer(&op_result), buffer(&op_result.detach()));
    }
}
