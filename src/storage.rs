//! [`Data`]: how a tensor's values are stored, one floor above
//! [`array`](crate::array) and below [`Tensor`](crate::Tensor).
//!
//! # Design
//!
//! An op's result used to be three heap blocks: the `f32` buffer, ndarray's
//! shared header around it (`ArcArray`), and the tensor. Here the values an
//! op computes live in an `Arc<[f32]>`, whose reference counts sit in the
//! same allocation as the values, so a result is two blocks (the values and
//! the tensor). Shape and strides are stored inline for up to four
//! dimensions (`SmallVec`), not in ndarray's dynamic-rank `IxDyn`, whose
//! clone, comparison and drop were a fifth of a small op's instructions.
//!
//! ndarray views are built only inside kernels ([`Data::view`]); the ops on
//! small contiguous operands never build one ([`Data::as_slice`]).
//!
//! Values that arrive as an ndarray array or a `Vec` (constructors, the
//! gradients the backward engine sums) are moved in as they are, without a
//! copy ([`Buf::Vec`]), so a big input or a gradient is never copied to be
//! stored.
//!
//! A large buffer (64 KiB and up) held in a [`Buf::Vec`] goes, when its
//! last handle drops, to the dropping thread's bounded [`cache`] of freed
//! buffers, and the next large buffer an op on that thread asks for
//! ([`cache::take`], [`Data::collect`], [`Data::full`]) is taken from it:
//! see [`cache`] for why, and [`netcl::memory`](crate::memory) for the
//! limit.
//!
//! A `Data` is immutable once shared: cloning it is an O(1) snapshot (one
//! reference-count increment), and writing goes through
//! [`Data::view_mut`], which only succeeds on a buffer no snapshot shares (the copy-on-write of [`Tensor::with_data_mut`] relies on that).
//!
//! [`Tensor::with_data_mut`]: crate::Tensor::with_data_mut

use std::fmt;
use std::sync::Arc;

use ndarray::{
    ArcArray, ArrayD, ArrayView2, ArrayViewD, ArrayViewMut2, ArrayViewMutD, IxDyn, ShapeBuilder,
};

/// The lengths (or strides) of a tensor's axes: inline up to four axes, so
/// that copying a shape is copying 40 bytes, and shared on the heap beyond.
#[derive(Clone, PartialEq, Eq)]
pub(crate) enum Dims {
    /// Up to four axes: the first `len` entries.
    Inline { len: u8, dims: [usize; 4] },
    /// Five axes or more.
    Heap(Arc<[usize]>),
}

impl Dims {
    pub(crate) fn from_slice(dims: &[usize]) -> Dims {
        match dims.len() {
            len @ 0..=4 => {
                let mut inline = [0; 4];
                inline[..len].copy_from_slice(dims);
                Dims::Inline {
                    len: len as u8,
                    dims: inline,
                }
            }
            _ => Dims::Heap(dims.into()),
        }
    }

    /// `value` on each of `len` axes.
    fn from_elem(value: usize, len: usize) -> Dims {
        match len {
            0..=4 => Dims::Inline {
                len: len as u8,
                dims: [value; 4],
            },
            _ => Dims::Heap(vec![value; len].into()),
        }
    }

    fn as_mut_slice(&mut self) -> &mut [usize] {
        if let Dims::Heap(dims) = self {
            *self = Dims::Heap(dims.iter().copied().collect());
        }
        match self {
            Dims::Inline { len, dims } => &mut dims[..*len as usize],
            Dims::Heap(dims) => Arc::get_mut(dims).expect("just made unique"),
        }
    }
}

impl std::ops::Deref for Dims {
    type Target = [usize];

    fn deref(&self) -> &[usize] {
        match self {
            Dims::Inline { len, dims } => &dims[..*len as usize],
            Dims::Heap(dims) => dims,
        }
    }
}

/// How many values a [`Data`] holds inline, without a heap allocation.
const INLINE: usize = 4;

/// The buffer of a [`Data`]: shared, never written once shared.
#[derive(Clone)]
enum Buf {
    /// Up to [`INLINE`] values, copied with the `Data` (scalars, losses,
    /// tiny tensors: no allocation, no reference count).
    Inline { len: u8, values: [f32; INLINE] },
    /// Values computed by an op: counts and values in one allocation.
    Slice(Arc<[f32]>),
    /// Values moved in from a `Vec` (an ndarray array's, a gradient's)
    /// without copying them, and large values an op computed; offered to
    /// the dropping thread's [`cache`] when the last handle drops.
    Vec(Arc<Cached>),
}

/// A `Vec` whose buffer, when dropped, is offered to the dropping thread's
/// [`cache`] instead of going straight back to the allocator.
struct Cached(Vec<f32>);

impl Drop for Cached {
    fn drop(&mut self) {
        // One compare, inlined: a small buffer goes straight back to the
        // allocator (as the `Vec`'s own drop would) without a call into
        // the cache.
        if self.0.capacity() >= cache::MIN_LEN {
            cache::give(std::mem::take(&mut self.0));
        }
    }
}

/// A bounded, per-thread cache of recently freed large `f32` buffers.
///
/// # Why
///
/// A training step that returns fresh large tensors (an op's output, a
/// gradient: a few hundred KiB and up) frees them when the caller drops
/// them, and glibc gives such memory back to the system (`munmap` of an
/// mmapped block, or `madvise` when a thread arena's free top exceeds its
/// trim threshold), so the next step faults the same pages in again, one
/// fault per 4 KiB page: `layer_norm` over `[32, 64, 128]` forward and
/// backward took about 480 page faults per call on a rayon worker, most of
/// its time. Keeping the last few freed buffers per thread turns those
/// faults into reuse, without changing the process's allocator settings (a
/// library must not).
///
/// # Bound
///
/// Each thread keeps at most [`limit`] bytes (the sum of the cached
/// buffers' capacities, [`netcl::memory::buffer_cache_limit`]) in at most
/// [`MAX_BUFFERS`] buffers; the oldest is freed first when a new one would
/// exceed either. A buffer below [`MIN_LEN`] values is never cached (the
/// allocator's free lists serve those well), nor one larger than the
/// limit. A lowered limit applies to a thread's cache the next time that
/// thread frees or takes a buffer.
///
/// # Safety of reuse
///
/// [`take`] hands out an *empty* `Vec` (length 0) with room for the
/// values: old contents are never readable through it, and every caller
/// writes or resizes the values it needs ([`zeros`] fills with zeros).
///
/// # Threads
///
/// A `thread_local!`: a buffer freed on one thread is only ever reused by
/// that thread, no lock is taken, and a thread's cache is freed when the
/// thread exits. Under loom the cache is off (every buffer is freed).
///
/// [`netcl::memory::buffer_cache_limit`]: crate::memory::buffer_cache_limit
pub(crate) mod cache {
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Buffers below this many values (64 KiB) are never cached.
    pub(crate) const MIN_LEN: usize = 16 * 1024;
    /// The most buffers a thread keeps.
    pub(crate) const MAX_BUFFERS: usize = 8;
    /// The limit when neither the environment nor
    /// [`set_limit`] sets one: bytes per thread.
    pub(crate) const DEFAULT_LIMIT: usize = 16 << 20;
    /// The environment variable read once for the limit, in bytes.
    pub(crate) const ENV: &str = "NETCL_BUFFER_CACHE_BYTES";

    /// Not yet read from the environment.
    const UNSET: usize = usize::MAX;
    static LIMIT: AtomicUsize = AtomicUsize::new(UNSET);

    /// The limit in bytes per thread: set by [`set_limit`], else read once
    /// from [`ENV`] (a whole number of bytes; anything else is ignored),
    /// else [`DEFAULT_LIMIT`].
    pub(crate) fn limit() -> usize {
        match LIMIT.load(Ordering::Relaxed) {
            UNSET => {
                let from_env = std::env::var(ENV)
                    .ok()
                    .and_then(|v| v.trim().parse::<usize>().ok())
                    .map_or(DEFAULT_LIMIT, |v| v.min(UNSET - 1));
                // A concurrent `set_limit` wins over the environment.
                match LIMIT.compare_exchange(UNSET, from_env, Ordering::Relaxed, Ordering::Relaxed)
                {
                    Ok(_) => from_env,
                    Err(set) => set,
                }
            }
            limit => limit,
        }
    }

    /// Sets the limit in bytes per thread (saturating below `usize::MAX`).
    pub(crate) fn set_limit(bytes: usize) {
        LIMIT.store(bytes.min(UNSET - 1), Ordering::Relaxed);
    }

    /// One thread's cached buffers, oldest first, and their capacities'
    /// sum in bytes.
    #[cfg_attr(loom, allow(dead_code))]
    #[derive(Default)]
    struct Free {
        buffers: Vec<Vec<f32>>,
        bytes: usize,
        /// How many buffers [`take`] has handed out from the cache.
        reused: u64,
    }

    #[cfg_attr(loom, allow(dead_code))]
    impl Free {
        /// Frees the oldest buffers until at most `limit` bytes and
        /// `buffers` buffers remain.
        fn shrink_to(&mut self, limit: usize, buffers: usize) {
            let mut oldest = 0;
            while oldest < self.buffers.len()
                && (self.bytes > limit || self.buffers.len() - oldest > buffers)
            {
                self.bytes -= bytes_of(&self.buffers[oldest]);
                oldest += 1;
            }
            self.buffers.drain(..oldest);
        }
    }

    fn bytes_of(values: &Vec<f32>) -> usize {
        values.capacity() * size_of::<f32>()
    }

    #[cfg(not(loom))]
    std::thread_local! {
        static FREE: std::cell::RefCell<Free> = const {
            std::cell::RefCell::new(Free { buffers: Vec::new(), bytes: 0, reused: 0 })
        };
    }

    /// Runs `f` on this thread's cache; `None` during thread exit (the
    /// cache already gone) or a re-entrant call, and always under loom.
    #[inline]
    fn with_free<R>(f: impl FnOnce(&mut Free) -> R) -> Option<R> {
        #[cfg(not(loom))]
        {
            FREE.try_with(|free| free.try_borrow_mut().ok().map(|mut free| f(&mut free)))
                .ok()
                .flatten()
        }
        #[cfg(loom)]
        {
            let _ = f;
            None
        }
    }

    /// An empty `Vec` with room for `len` values: the smallest of this
    /// thread's cached buffers holding between `len` and 1.25 `len`
    /// values if there is one, a new allocation otherwise.
    pub(crate) fn take(len: usize) -> Vec<f32> {
        if len >= MIN_LEN {
            let found = with_free(|free| {
                let limit = limit();
                if free.bytes > limit {
                    free.shrink_to(limit, MAX_BUFFERS);
                }
                let (i, _) = free
                    .buffers
                    .iter()
                    .enumerate()
                    .filter(|(_, b)| (len..=len + len / 4).contains(&b.capacity()))
                    .min_by_key(|(_, b)| b.capacity())?;
                let mut values = free.buffers.remove(i);
                free.bytes -= bytes_of(&values);
                free.reused += 1;
                values.clear();
                Some(values)
            })
            .flatten();
            if let Some(values) = found {
                return values;
            }
        }
        Vec::with_capacity(len)
    }

    /// `len` copies of `value`, in a cached buffer when this thread has
    /// one.
    pub(crate) fn filled(len: usize, value: f32) -> Vec<f32> {
        let mut values = take(len);
        values.resize(len, value);
        values
    }

    /// `len` zeros, in a cached buffer when this thread has one.
    pub(crate) fn zeros(len: usize) -> Vec<f32> {
        filled(len, 0.0)
    }

    /// Offers `values`' buffer to this thread's cache: kept if it is large
    /// enough and fits the limit (the oldest buffers freed to make room),
    /// freed otherwise.
    pub(crate) fn give(values: Vec<f32>) {
        if values.capacity() < MIN_LEN {
            return;
        }
        let limit = limit();
        if bytes_of(&values) > limit {
            return;
        }
        // During thread exit or a re-entrant call the buffer is freed.
        with_free(move |free| {
            free.shrink_to(limit - bytes_of(&values), MAX_BUFFERS - 1);
            free.bytes += bytes_of(&values);
            free.buffers.push(values);
        });
    }

    /// The bytes this thread's cache holds.
    pub(crate) fn thread_bytes() -> usize {
        with_free(|free| free.bytes).unwrap_or(0)
    }

    /// How many buffers this thread has taken from its cache.
    pub(crate) fn thread_reused() -> u64 {
        with_free(|free| free.reused).unwrap_or(0)
    }

    /// Frees every buffer of this thread's cache.
    pub(crate) fn clear_thread() {
        let buffers = with_free(|free| {
            free.bytes = 0;
            std::mem::take(&mut free.buffers)
        });
        // Freed outside the borrow.
        drop(buffers);
    }
}

impl Buf {
    fn as_slice(&self) -> &[f32] {
        match self {
            Buf::Inline { len, values } => &values[..*len as usize],
            Buf::Slice(values) => values,
            Buf::Vec(values) => &values.0,
        }
    }

    fn unique_mut(&mut self) -> Option<&mut [f32]> {
        match self {
            Buf::Inline { len, values } => Some(&mut values[..*len as usize]),
            Buf::Slice(values) => Arc::get_mut(values),
            Buf::Vec(values) => Arc::get_mut(values).map(|values| values.0.as_mut_slice()),
        }
    }

    fn is_unique(&self) -> bool {
        match self {
            Buf::Inline { .. } => true,
            Buf::Slice(values) => Arc::strong_count(values) == 1,
            Buf::Vec(values) => Arc::strong_count(values) == 1,
        }
    }
}

/// A tensor's values: a shared buffer and the shape (and, for a view such
/// as a transpose, the strides) it is read with. Cloning is O(1).
///
/// # Invariant
///
/// The layout fits the buffer: with `strides == None` the buffer holds
/// exactly the shape's elements in row-major order; with strides, every
/// index of the shape maps inside the buffer (strides are non-negative:
/// only axis permutations make them).
#[derive(Clone)]
pub(crate) struct Data {
    buf: Buf,
    shape: Dims,
    /// `None` for row-major values (nearly all); boxed, as views are rare.
    strides: Option<Box<Dims>>,
}

/// Lets [`Data::accumulate`] sum into a `Data` held directly or boxed.
impl AsMut<Data> for Data {
    fn as_mut(&mut self) -> &mut Data {
        self
    }
}

impl Data {
    /// Row-major values of `shape`.
    ///
    /// # Panics
    ///
    /// If `values` does not hold the shape's number of elements (callers
    /// check with [`checked_numel`](crate::array::checked_numel)).
    pub(crate) fn from_vec(shape: &[usize], values: Vec<f32>) -> Data {
        assert_eq!(values.len(), numel(shape), "values fit the shape");
        if values.len() <= INLINE {
            return Data::collect(shape, values.into_iter());
        }
        Data {
            buf: Buf::Vec(Arc::new(Cached(values))),
            shape: Dims::from_slice(shape),
            strides: None,
        }
    }

    /// Values of `shape` from an iterator of exactly the shape's element
    /// count, in row-major order, written straight into one new allocation
    /// (for the standard library's exact-size iterators: slices, `map`,
    /// `zip`, `repeat_n`).
    pub(crate) fn collect(shape: &[usize], values: impl ExactSizeIterator<Item = f32>) -> Data {
        let len = values.len();
        assert_eq!(len, numel(shape), "values fit the shape");
        let buf = if len <= INLINE {
            let mut inline = [0.0; INLINE];
            for (slot, value) in inline.iter_mut().zip(values) {
                *slot = value;
            }
            Buf::Inline {
                len: len as u8,
                values: inline,
            }
        } else if len >= cache::MIN_LEN {
            // Large values in a buffer from this thread's cache (and back
            // to it when freed).
            let mut buffer = cache::take(len);
            buffer.extend(values);
            Buf::Vec(Arc::new(Cached(buffer)))
        } else {
            Buf::Slice(values.collect())
        };
        Data {
            buf,
            shape: Dims::from_slice(shape),
            strides: None,
        }
    }

    /// Row-major values of `shape` in a buffer an op has just filled.
    pub(crate) fn from_arc(shape: &[usize], values: Arc<[f32]>) -> Data {
        assert_eq!(values.len(), numel(shape), "values fit the shape");
        Data {
            buf: Buf::Slice(values),
            shape: Dims::from_slice(shape),
            strides: None,
        }
    }

    /// `f` of every element, in a new buffer of the same shape.
    pub(crate) fn map(&self, f: impl Fn(f32) -> f32) -> Data {
        match self.as_slice() {
            Some(values) => Data::collect(&self.shape, values.iter().map(|&v| f(v))),
            None => Data::from_vec(&self.shape, self.to_vec()).map_into(f),
        }
    }

    /// The values mapped by `f`, compiled for the widest SIMD extension
    /// this CPU has ([`vectorized::map`](crate::ops::vectorized::map)):
    /// for `f` among the vectorising kernels (`exp`, `tanh`, ...), where
    /// [`map`](Data::map)'s iterator would stay scalar.
    pub(crate) fn map_simd(&self, f: impl Fn(f32) -> f32) -> Data {
        let Some(values) = self.as_slice() else {
            return self.map(f);
        };
        Data::from_vec(&self.shape, crate::ops::vectorized::map(values, f))
    }

    /// `value` at every element of `shape`.
    pub(crate) fn full(shape: &[usize], value: f32) -> Data {
        let len = numel(shape);
        if len < cache::MIN_LEN {
            return Data::collect(shape, std::iter::repeat_n(value, len));
        }
        Data::from_vec(shape, cache::filled(len, value))
    }

    /// Values of `shape` written by `fill` into a new buffer (zeroed
    /// first), for kernels that write through an ndarray view.
    pub(crate) fn build(shape: &[usize], fill: impl FnOnce(ArrayViewMutD<'_, f32>)) -> Data {
        let mut data = Data::full(shape, 0.0);
        fill(data.view_mut().expect("a new buffer is unique"));
        data
    }

    /// The values of `array`, moved in without a copy when it is in
    /// row-major order (copied into that order otherwise).
    pub(crate) fn from_array(array: ArrayD<f32>) -> Data {
        let shape = Dims::from_slice(array.shape());
        let array = if array.is_standard_layout() {
            array
        } else {
            array.as_standard_layout().into_owned()
        };
        match array.into_raw_vec_and_offset() {
            (values, Some(0) | None) if values.len() == numel(&shape) => Data {
                buf: Buf::Vec(Arc::new(Cached(values))),
                shape,
                strides: None,
            },
            // A sliced array's buffer holds more than its elements.
            (values, offset) => {
                let start = offset.unwrap_or(0);
                Data::collect(&shape, values[start..start + numel(&shape)].iter().copied())
            }
        }
    }

    /// A copy of the elements of `view`, in row-major order.
    pub(crate) fn from_view(view: ArrayViewD<'_, f32>) -> Data {
        match view.as_slice() {
            Some(values) => Data::collect(view.shape(), values.iter().copied()),
            None => Data::from_vec(view.shape(), view_to_vec(&view)),
        }
    }

    /// The length of each axis.
    pub(crate) fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The number of elements.
    pub(crate) fn len(&self) -> usize {
        numel(&self.shape)
    }

    /// The values in row-major order, if that is how they are stored (not a
    /// transposed view).
    pub(crate) fn as_slice(&self) -> Option<&[f32]> {
        self.strides.is_none().then(|| self.buf.as_slice())
    }

    /// An ndarray view of the values.
    pub(crate) fn view(&self) -> ArrayViewD<'_, f32> {
        let values = self.buf.as_slice();
        match &self.strides {
            None => ArrayViewD::from_shape(IxDyn(&self.shape), values),
            Some(strides) => {
                ArrayViewD::from_shape(IxDyn(&self.shape).strides(IxDyn(strides)), values)
            }
        }
        .expect("the layout fits the buffer (the invariant of Data)")
    }

    /// A 2-D view of values of two axes: as [`view`](Data::view), without
    /// the cost of a dynamic-rank view (a matrix product's operands).
    ///
    /// # Panics
    ///
    /// If the values do not have two axes.
    pub(crate) fn view2(&self) -> ArrayView2<'_, f32> {
        assert_eq!(self.shape.len(), 2, "view2 of a tensor of two axes");
        let values = self.buf.as_slice();
        let shape = (self.shape[0], self.shape[1]);
        match &self.strides {
            None => ArrayView2::from_shape(shape, values),
            Some(strides) => {
                ArrayView2::from_shape(shape.strides((strides[0], strides[1])), values)
            }
        }
        .expect("the layout fits the buffer (the invariant of Data)")
    }

    /// New row-major values of shape `[rows, cols]` written by `fill` into
    /// a zeroed buffer, as [`build`](Data::build) with a 2-D view.
    pub(crate) fn build2(
        rows: usize,
        cols: usize,
        fill: impl FnOnce(ArrayViewMut2<'_, f32>),
    ) -> Data {
        let mut data = Data::full(&[rows, cols], 0.0);
        let values = data.buf.unique_mut().expect("a new buffer is unique");
        fill(ArrayViewMut2::from_shape((rows, cols), values).expect("a new buffer fits its shape"));
        data
    }

    /// A mutable view of the values if no snapshot shares the buffer.
    pub(crate) fn view_mut(&mut self) -> Option<ArrayViewMutD<'_, f32>> {
        let shape = IxDyn(&self.shape);
        let strides = self.strides.as_ref().map(|s| IxDyn(s));
        let values = self.buf.unique_mut()?;
        Some(
            match strides {
                None => ArrayViewMutD::from_shape(shape, values),
                Some(strides) => ArrayViewMutD::from_shape(shape.strides(strides), values),
            }
            .expect("the layout fits the buffer (the invariant of Data)"),
        )
    }

    /// True if no other `Data` shares the buffer.
    pub(crate) fn is_unique(&self) -> bool {
        self.buf.is_unique()
    }

    /// The values in row-major order as a new `Vec`.
    pub(crate) fn to_vec(&self) -> Vec<f32> {
        match self.as_slice() {
            Some(values) => {
                let mut out = cache::take(values.len());
                out.extend_from_slice(values);
                out
            }
            None => {
                let strides = self.strides.as_deref().expect("strided: not row-major");
                strided_to_vec(self.buf.as_slice(), &self.shape, strides)
            }
        }
    }

    /// The values as an owned ndarray array: moved out without a copy when
    /// this is the only handle to a buffer moved in from an array or a
    /// `Vec`, copied otherwise.
    pub(crate) fn into_array(self) -> ArrayD<f32> {
        if self.strides.is_none()
            && let Buf::Vec(values) = self.buf
        {
            let values = match Arc::try_unwrap(values) {
                Ok(mut values) => std::mem::take(&mut values.0),
                Err(shared) => shared.0.clone(),
            };
            return ArrayD::from_shape_vec(IxDyn(&self.shape), values)
                .expect("the layout fits the buffer (the invariant of Data)");
        }
        self.to_array()
    }

    /// `f(self[i])` for every element: in place when no snapshot shares the
    /// buffer, into a new buffer otherwise.
    pub(crate) fn map_into(mut self, f: impl Fn(f32) -> f32) -> Data {
        if self.strides.is_none()
            && let Some(values) = self.buf.unique_mut()
        {
            crate::ops::vectorized::map_in_place(values, f);
            return self;
        }
        self.map(f)
    }

    /// `f(self[i], other[i])` for every element, `other` of the same shape
    /// or broadcasting to it: in place when no snapshot shares `self`'s
    /// buffer, into a new buffer otherwise.
    pub(crate) fn zip_into(mut self, other: &Data, f: impl Fn(f32, f32) -> f32) -> Data {
        let same = crate::array::same_shape(&self.shape, &other.shape);
        if same
            && self.strides.is_none()
            && let Some(b) = other.as_slice()
        {
            if let Some(a) = self.buf.unique_mut() {
                crate::ops::vectorized::dispatch(
                    #[inline(always)]
                    || {
                        for (a, &b) in a.iter_mut().zip(b) {
                            *a = f(*a, b);
                        }
                    },
                );
                return self;
            }
            let a = self.buf.as_slice();
            return Data::collect(&self.shape, a.iter().zip(b).map(|(&a, &b)| f(a, b)));
        }
        let other = other.view();
        let other = other
            .broadcast(IxDyn(&self.shape))
            .expect("the operand broadcasts to the gradient's shape");
        match self.view_mut() {
            Some(mut values) => {
                values.zip_mut_with(&other, |a, &b| *a = f(*a, b));
                self
            }
            None => {
                let view = self.view();
                Data::build(&self.shape, |mut out| {
                    ndarray::Zip::from(&mut out)
                        .and(&view)
                        .and(&other)
                        .for_each(|o, &a, &b| *o = f(a, b))
                })
            }
        }
    }

    /// Adds `grad` into an optional running sum: the first gradient becomes
    /// the sum, later ones are added to it (in place when no snapshot shares
    /// it). How every gradient sum of netcl accumulates: the backward
    /// engine's buffers, a leaf's `.grad()`, the per-shard sums of
    /// `parallel::backward_shards`.
    /// The sum may be held boxed (`Option<Box<Data>>`, a leaf's slot).
    pub(crate) fn accumulate<S: AsMut<Data> + From<Data>>(slot: &mut Option<S>, grad: Data) {
        match slot {
            None => *slot = Some(S::from(grad)),
            Some(sum) => sum.as_mut().add_assign(&grad),
        }
    }

    /// Adds `other` (of the same shape) into these values: in place when no
    /// snapshot shares the buffer, into a new buffer otherwise.
    pub(crate) fn add_assign(&mut self, other: &Data) {
        if self.strides.is_none()
            && crate::array::same_shape(&self.shape, &other.shape)
            && let (Some(b), Some(a)) = (other.as_slice(), self.buf.unique_mut())
        {
            for (a, &b) in a.iter_mut().zip(b) {
                *a += b;
            }
            return;
        }
        if self.shape.len() == 2 && crate::array::same_shape(&self.shape, &other.shape) {
            // A matrix and a transposed one (the gradient of a weight used
            // in a product and, transposed, in another: double backward
            // makes these): two-axis views, not the dynamic-rank lanes of
            // the general path below, which are several times slower.
            let (rows, cols) = (self.shape[0], self.shape[1]);
            if self.strides.is_none()
                && let Some(values) = self.buf.unique_mut()
            {
                let mut sum = ArrayViewMut2::from_shape((rows, cols), values)
                    .expect("a row-major buffer of its shape");
                sum.zip_mut_with(&other.view2(), |a, &b| *a += b);
                return;
            }
            let sum = {
                let (a, b) = (self.view2(), other.view2());
                Data::build2(rows, cols, |out| {
                    ndarray::Zip::from(out)
                        .and(&a)
                        .and(&b)
                        .for_each(|o, &a, &b| *o = a + b)
                })
            };
            *self = sum;
            return;
        }
        let empty = Data {
            buf: Buf::Inline {
                len: 0,
                values: [0.0; INLINE],
            },
            shape: Dims::from_slice(&[0]),
            strides: None,
        };
        let sum = std::mem::replace(self, empty);
        *self = sum.zip_into(other, |a, b| a + b);
    }

    /// A copy of the values as an ndarray array.
    pub(crate) fn to_array(&self) -> ArrayD<f32> {
        self.view().to_owned()
    }

    /// A copy of the values as a shared ndarray array.
    pub(crate) fn to_arc_array(&self) -> ArcArray<f32, IxDyn> {
        self.to_array().into_shared()
    }

    /// The same values with axes `a` and `b` swapped: a view sharing the
    /// buffer (O(1)).
    pub(crate) fn swap_axes(&self, a: usize, b: usize) -> Data {
        let mut strides = match &self.strides {
            Some(strides) => (**strides).clone(),
            None => row_major_strides(&self.shape),
        };
        let mut shape = self.shape.clone();
        shape.as_mut_slice().swap(a, b);
        strides.as_mut_slice().swap(a, b);
        let standard = row_major_strides(&shape);
        // A swap of two axes of length 1, or one undone, is row-major again.
        let strides = (!same_layout(&shape, &strides, &standard)).then(|| Box::new(strides));
        Data {
            buf: self.buf.clone(),
            shape,
            strides,
        }
    }

    /// The same values with their axes reordered, axis `i` of the result
    /// being axis `axes[i]` of `self` (a permutation): a view sharing the
    /// buffer (O(1)).
    pub(crate) fn permute(&self, axes: &[usize]) -> Data {
        debug_assert_eq!(axes.len(), self.shape.len());
        let old_strides = match &self.strides {
            Some(strides) => (**strides).clone(),
            None => row_major_strides(&self.shape),
        };
        let mut shape = self.shape.clone();
        let mut strides = old_strides.clone();
        for (i, &a) in axes.iter().enumerate() {
            shape.as_mut_slice()[i] = self.shape[a];
            strides.as_mut_slice()[i] = old_strides[a];
        }
        self.with_strides(shape, strides)
    }

    /// The same values with axes of length 1 inserted or removed: `shape`
    /// is `self`'s shape with only length-1 axes added or dropped. Shares
    /// the buffer, also for a strided view (O(1)).
    pub(crate) fn reshape_unit_axes(&self, shape: &[usize]) -> Data {
        let Some(old) = &self.strides else {
            return self.reshape(shape);
        };
        // The axes longer than 1 keep their order and their strides.
        let mut long = self
            .shape
            .iter()
            .zip(old.iter())
            .filter(|&(&len, _)| len != 1)
            .map(|(_, &stride)| stride);
        let mut strides = Dims::from_elem(1, shape.len());
        for (s, &len) in strides.as_mut_slice().iter_mut().zip(shape) {
            if len != 1 {
                *s = long.next().expect("the same axes longer than 1");
            }
        }
        self.with_strides(Dims::from_slice(shape), strides)
    }

    /// A view of the buffer with `shape` and `strides` (which must fit the
    /// buffer), row-major again when the strides say so.
    fn with_strides(&self, shape: Dims, strides: Dims) -> Data {
        let standard = row_major_strides(&shape);
        let strides = (!same_layout(&shape, &strides, &standard)).then(|| Box::new(strides));
        Data {
            buf: self.buf.clone(),
            shape,
            strides,
        }
    }

    /// The same values with shape `shape` (of the same element count):
    /// sharing the buffer when the values are in row-major order, copied
    /// into that order otherwise.
    pub(crate) fn reshape(&self, shape: &[usize]) -> Data {
        debug_assert_eq!(numel(shape), self.len());
        match self.strides {
            None => Data {
                buf: self.buf.clone(),
                shape: Dims::from_slice(shape),
                strides: None,
            },
            Some(_) => Data::from_vec(shape, self.to_vec()),
        }
    }
}

/// The elements of the layout `shape`/`strides` over `values` (which it
/// fits: the invariant of [`Data`]), copied into a new row-major `Vec`.
///
/// Axes of length 1 are dropped and axes that follow each other in memory
/// merged, then the remaining outer indices are walked with an odometer
/// and each innermost run copied at once: a `copy_from_slice` when it is
/// contiguous (a permute of the outer axes, such as attention's split
/// heads), a strided gather otherwise. The elements are moved bit for bit
/// (NaN payloads kept). Several times faster than ndarray's element
/// iterator over a dynamic-rank view, which tracks a full index per
/// element.
fn strided_to_vec(values: &[f32], shape: &[usize], strides: &[usize]) -> Vec<f32> {
    let len = numel(shape);
    let mut out = cache::take(len);
    if len == 0 {
        return out;
    }
    // (length, stride) of the axes longer than 1, merged where row-major.
    let mut axes: Vec<(usize, usize)> = Vec::with_capacity(shape.len());
    for (&n, &s) in shape.iter().zip(strides) {
        if n == 1 {
            continue;
        }
        if let Some(last) = axes.last_mut()
            && last.1 == s * n
        {
            *last = (last.0 * n, s);
            continue;
        }
        axes.push((n, s));
    }
    let (inner, step) = axes.pop().unwrap_or((1, 1));
    let mut index = vec![0usize; axes.len()];
    let mut base = 0usize;
    loop {
        if step == 1 {
            out.extend_from_slice(&values[base..base + inner]);
        } else {
            out.extend(values[base..].iter().step_by(step).take(inner).copied());
        }
        // The next outer index, last axis fastest.
        let mut axis = axes.len();
        loop {
            if axis == 0 {
                debug_assert_eq!(out.len(), len);
                return out;
            }
            axis -= 1;
            let (n, s) = axes[axis];
            index[axis] += 1;
            base += s;
            if index[axis] < n {
                break;
            }
            index[axis] = 0;
            base -= s * n;
        }
    }
}

/// The elements of any ndarray view in row-major order, copied a
/// last-axis lane at a time (a `copy_from_slice` for contiguous lanes), as
/// [`strided_to_vec`] for views that are not a [`Data`]'s (slices,
/// broadcasts, negative strides).
fn view_to_vec(view: &ArrayViewD<'_, f32>) -> Vec<f32> {
    if let Some(values) = view.as_slice() {
        return values.to_vec();
    }
    let mut out = Vec::with_capacity(view.len());
    if view.ndim() == 0 || view.is_empty() {
        out.extend(view.iter().copied());
        return out;
    }
    for lane in view.lanes(ndarray::Axis(view.ndim() - 1)) {
        match lane.as_slice() {
            Some(run) => out.extend_from_slice(run),
            None => out.extend(lane.iter().copied()),
        }
    }
    out
}

impl fmt::Display for Data {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.view(), f)
    }
}

impl fmt::Debug for Data {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.view(), f)
    }
}

/// The number of elements of `shape` (checked by the caller not to
/// overflow).
pub(crate) fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

/// The strides of a row-major array of `shape`.
fn row_major_strides(shape: &[usize]) -> Dims {
    let mut strides = Dims::from_elem(0, shape.len());
    let mut stride = 1;
    for (s, &len) in strides.as_mut_slice().iter_mut().zip(shape).rev() {
        *s = stride;
        stride *= len.max(1);
    }
    strides
}

/// Whether `strides` address `shape` as the `standard` strides do: equal
/// on every axis longer than 1 (the stride of a length-1 axis is never
/// used).
fn same_layout(shape: &[usize], strides: &[usize], standard: &[usize]) -> bool {
    shape
        .iter()
        .zip(strides.iter().zip(standard))
        .all(|(&len, (s, t))| len <= 1 || s == t)
        || shape.contains(&0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_transpose_shares_the_buffer_and_reads_transposed() {
        let data = Data::collect(&[2, 3], (0..6).map(|v| v as f32));
        assert!(data.is_unique());
        let t = data.swap_axes(0, 1);
        assert_eq!(t.shape(), &[3, 2]);
        assert!(t.as_slice().is_none());
        assert_eq!(t.to_vec(), vec![0.0, 3.0, 1.0, 4.0, 2.0, 5.0]);
        assert!(!data.is_unique(), "shared with the transpose");
        // Swapping back is row-major again.
        let back = t.swap_axes(0, 1);
        assert_eq!(back.as_slice(), Some(&[0.0, 1.0, 2.0, 3.0, 4.0, 5.0][..]));
    }

    #[test]
    fn arrays_move_in_without_a_copy_and_views_copy_into_row_major_order() {
        let array = ArrayD::from_shape_vec(IxDyn(&[2, 2]), vec![1.0, 2.0, 3.0, 4.0]).unwrap();
        let pointer = array.as_ptr();
        let data = Data::from_array(array);
        assert_eq!(data.as_slice().unwrap().as_ptr(), pointer);
        let transposed = Data::from_array(data.to_array().reversed_axes());
        assert_eq!(transposed.as_slice(), Some(&[1.0, 3.0, 2.0, 4.0][..]));
    }

    #[test]
    fn only_an_unshared_buffer_can_be_written() {
        let mut data = Data::full(&[8], 1.0);
        assert!(data.view_mut().is_some());
        let snapshot = data.clone();
        assert!(data.view_mut().is_none());
        drop(snapshot);
        data.view_mut().unwrap()[[0]] = 5.0;
        assert_eq!(data.to_vec()[..3], [5.0, 1.0, 1.0]);
    }

    #[test]
    fn up_to_four_values_are_stored_inline_and_copied() {
        let mut data = Data::collect(&[2, 2], [1.0, 2.0, 3.0, 4.0].into_iter());
        let copy = data.clone();
        assert!(
            data.is_unique() && copy.is_unique(),
            "inline values are never shared"
        );
        data.view_mut().unwrap()[[0, 0]] = 9.0;
        assert_eq!(copy.to_vec(), vec![1.0, 2.0, 3.0, 4.0]);
        assert_eq!(data.swap_axes(0, 1).to_vec(), vec![9.0, 3.0, 2.0, 4.0]);
        assert_eq!(Data::from_vec(&[1], vec![7.0]).to_vec(), vec![7.0]);
    }

    #[test]
    fn permutes_and_unit_axes_share_the_buffer() {
        let data = Data::collect(&[2, 3, 4], (0..24).map(|v| v as f32));
        let p = data.permute(&[2, 0, 1]);
        assert_eq!(p.shape(), &[4, 2, 3]);
        assert!(p.as_slice().is_none());
        assert_eq!(p.to_vec()[..4], [0.0, 4.0, 8.0, 12.0]);
        // Unit axes in and out of a strided view keep its strides.
        let u = p.reshape_unit_axes(&[4, 1, 2, 3, 1]);
        assert_eq!(u.to_vec(), p.to_vec());
        assert_eq!(u.reshape_unit_axes(&[4, 2, 3]).to_vec(), p.to_vec());
        // The inverse permutation is row-major again.
        let back = p.permute(&[1, 2, 0]);
        assert_eq!(back.as_slice(), data.as_slice());
    }

    #[test]
    fn zero_size_and_zero_dimensional_shapes() {
        let empty = Data::full(&[0, 3], 0.0);
        assert_eq!((empty.len(), empty.view().shape()), (0, &[0, 3][..]));
        assert_eq!(empty.swap_axes(0, 1).shape(), &[3, 0]);
        let scalar = Data::full(&[], 2.5);
        assert_eq!((scalar.len(), scalar.to_vec()), (1, vec![2.5]));
    }
}
