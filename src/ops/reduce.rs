//! Reductions: sum and mean (whole tensor or along an axis), max along an
//! axis.

use ndarray::{ArrayD, Axis, Dimension, IxDyn};

use crate::array::normalize_axis;
use crate::autograd::function::{
    Backprop, GraphGrads, InputGrads, record, record_unary, with_graph,
};
use crate::error::{Result, or_panic};
use crate::ops::graph::expand;
use crate::tensor::{Data, Tensor};

/// Sums and means.
impl Tensor {
    /// The sum of all elements, as a 0-dimensional tensor.
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::Tensor;
    ///
    /// let t = Tensor::from_vec(vec![1.0, 2.0, 3.0, 4.0], &[2, 2])?;
    /// assert_eq!(t.sum().item(), 10.0);
    /// assert_eq!(t.sum().shape(), &[] as &[usize]);
    /// # Ok::<(), netcl::Error>(())
    /// ```
    #[track_caller]
    pub fn sum(&self) -> Tensor {
        self.reduce_all("sum", 1.0)
    }

    /// The mean of all elements, as a 0-dimensional tensor (NaN when empty).
    /// Like [`sum`](Tensor::sum) and the axis forms, it propagates NaN and
    /// infinities by IEEE arithmetic (`inf + -inf` is NaN), as PyTorch does.
    #[track_caller]
    pub fn mean(&self) -> Tensor {
        self.reduce_all("mean", 1.0 / self.numel() as f32)
    }

    #[track_caller]
    fn reduce_all(&self, op: &'static str, scale: f32) -> Tensor {
        let total = self.read().view().sum() * scale;
        let out = Data::full(&[], total);
        record_unary(op, self, out, |_| SumBackward {
            input: self.dim(),
            axis: None,
            scale,
        })
    }

    /// Sum along `axis` (negative counts from the end).
    ///
    /// # Panics
    ///
    /// As [`try_sum_axis`](Tensor::try_sum_axis).
    #[track_caller]
    pub fn sum_axis(&self, axis: isize, keepdim: bool) -> Tensor {
        or_panic(self.try_sum_axis(axis, keepdim))
    }

    /// Sum along `axis` (negative counts from the end); with `keepdim` the
    /// axis stays, with length 1.
    ///
    /// # Errors
    ///
    /// [`Error::Axis`](crate::Error::Axis) if `axis` is out of range.
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::Tensor;
    ///
    /// let t = Tensor::from_vec(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3])?;
    /// assert_eq!(t.try_sum_axis(0, false)?.to_vec(), vec![5.0, 7.0, 9.0]);
    /// assert_eq!(t.try_sum_axis(-1, true)?.shape(), &[2, 1]);
    /// # Ok::<(), netcl::Error>(())
    /// ```
    #[track_caller]
    pub fn try_sum_axis(&self, axis: isize, keepdim: bool) -> Result<Tensor> {
        self.reduce_axis("sum_axis", axis, keepdim, false)
    }

    /// Mean along `axis` (negative counts from the end).
    ///
    /// # Panics
    ///
    /// As [`try_mean_axis`](Tensor::try_mean_axis).
    #[track_caller]
    pub fn mean_axis(&self, axis: isize, keepdim: bool) -> Tensor {
        or_panic(self.try_mean_axis(axis, keepdim))
    }

    /// Mean along `axis` (negative counts from the end); with `keepdim` the
    /// axis stays, with length 1.
    ///
    /// # Errors
    ///
    /// [`Error::Axis`](crate::Error::Axis) if `axis` is out of range.
    #[track_caller]
    pub fn try_mean_axis(&self, axis: isize, keepdim: bool) -> Result<Tensor> {
        self.reduce_axis("mean_axis", axis, keepdim, true)
    }

    #[track_caller]
    fn reduce_axis(
        &self,
        op: &'static str,
        axis: isize,
        keepdim: bool,
        mean: bool,
    ) -> Result<Tensor> {
        let axis = normalize_axis(op, axis, self.ndim())?;
        let scale = if mean {
            1.0 / self.shape()[axis] as f32
        } else {
            1.0
        };
        let data = self.read();
        let data = data.view();
        let mut out = if data.is_empty() {
            // The sum of nothing, without visiting every (possibly very
            // many) empty lane as ndarray's sum_axis does.
            ArrayD::zeros(ndarray::RemoveAxis::remove_axis(
                &data.raw_dim(),
                Axis(axis),
            ))
        } else {
            data.sum_axis(Axis(axis))
        };
        if mean {
            out.mapv_inplace(|v| v * scale);
        }
        if keepdim {
            out = out.insert_axis(Axis(axis));
        }
        record(op, &[self], Data::from_view(out.view()), |_| SumBackward {
            input: self.dim(),
            axis: Some(axis),
            scale,
        })
    }
}

/// Backward of a sum (scaled by `scale` for a mean) over all axes or one:
/// the gradient is spread back over the reduced axis.
struct SumBackward {
    input: IxDyn,
    /// The reduced axis, or `None` for all of them.
    axis: Option<usize>,
    scale: f32,
}

impl Backprop for SumBackward {
    fn backward(&self, grad: Data, grads: &mut InputGrads<'_>) {
        if grad.len() == 1 && self.axis.is_none() {
            // The gradient of a sum of all elements: one value, spread.
            let g = grad.to_vec()[0] * self.scale;
            grads.put(0, Data::full(self.input.slice(), g));
            return;
        }
        let grad = grad.into_array();
        let grad = match self.axis {
            // With or without keepdim, the gradient has the reduced axis
            // removed or of length 1; restore it as length 1.
            Some(axis) if grad.ndim() < self.input.ndim() => grad.insert_axis(Axis(axis)),
            _ => grad,
        };
        let spread = if grad.ndim() == 0 {
            let g = grad.first().copied().unwrap_or(0.0) * self.scale;
            ArrayD::from_elem(self.input.clone(), g)
        } else {
            let mut spread = grad
                .broadcast(self.input.clone())
                .expect("reduced shape broadcasts to input")
                .to_owned();
            if self.scale != 1.0 {
                spread.mapv_inplace(|v| v * self.scale);
            }
            spread
        };
        grads.set(0, spread);
    }

    fn backward_graph(&self, grad: &Tensor, grads: &mut GraphGrads<'_>) -> Result<()> {
        // Scaled before it is spread: the reduced gradient is the small one.
        let mut grad = self.keepdim(grad)?;
        if self.scale != 1.0 {
            grad = grad.mul_scalar(self.scale);
        }
        grads.set(0, expand(&grad, self.input.slice())?);
        Ok(())
    }
}

impl SumBackward {
    /// The gradient of the reduced result with the reduced axis restored
    /// as length 1 (recorded), so that it broadcasts to the input.
    fn keepdim(&self, grad: &Tensor) -> Result<Tensor> {
        keepdim(grad, self.axis, self.input.slice())
    }
}

/// `grad`, the gradient of a reduction of a tensor of shape `input` along
/// `axis` (all axes for `None`), with the reduced axis restored as length
/// 1, recorded.
fn keepdim(grad: &Tensor, axis: Option<usize>, input: &[usize]) -> Result<Tensor> {
    match axis {
        Some(axis) if grad.ndim() < input.len() => {
            let mut shape = grad.shape().to_vec();
            shape.insert(axis, 1);
            grad.try_reshape(&shape)
        }
        _ => Ok(grad.clone()),
    }
}

/// Maxima.
impl Tensor {
    /// Maximum along `axis`.
    ///
    /// # Panics
    ///
    /// As [`try_max_axis`](Tensor::try_max_axis).
    #[track_caller]
    pub fn max_axis(&self, axis: isize, keepdim: bool) -> Tensor {
        or_panic(self.try_max_axis(axis, keepdim))
    }

    /// Maximum along `axis` (negative counts from the end); with `keepdim`
    /// the axis stays, with length 1. The gradient flows to the first
    /// maximal element of each lane.
    ///
    /// A lane holding a NaN has a NaN maximum (and its gradient flows to
    /// the first NaN), as PyTorch's `max` and `amax` do; `f32::max` would
    /// skip it.
    ///
    /// # Errors
    ///
    /// [`Error::Axis`](crate::Error::Axis) if `axis` is out of range,
    /// [`Error::InvalidArgument`](crate::Error::InvalidArgument) if the axis
    /// has length 0.
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::Tensor;
    ///
    /// let t = Tensor::from_vec(vec![1.0, 5.0, 3.0, 4.0], &[2, 2])?;
    /// assert_eq!(t.try_max_axis(-1, false)?.to_vec(), vec![5.0, 4.0]);
    /// # Ok::<(), netcl::Error>(())
    /// ```
    #[track_caller]
    pub fn try_max_axis(&self, axis: isize, keepdim: bool) -> Result<Tensor> {
        let axis = self.nonempty_axis("max_axis", axis)?;
        let data = self.read();
        let data = data.view();
        let argmax: Vec<usize> = data
            .lanes(Axis(axis))
            .into_iter()
            .map(argmax_lane)
            .collect();
        let mut out = data.index_axis(Axis(axis), 0).to_owned();
        for (v, (lane, &position)) in out
            .iter_mut()
            .zip(data.lanes(Axis(axis)).into_iter().zip(&argmax))
        {
            *v = lane[position];
        }
        if keepdim {
            out = out.insert_axis(Axis(axis));
        }
        record("max_axis", &[self], Data::from_view(out.view()), |_| {
            MaxBackward {
                input: self.dim(),
                axis,
                argmax,
            }
        })
    }

    /// Resolves `axis`, which must have at least one element.
    pub(crate) fn nonempty_axis(&self, op: &'static str, axis: isize) -> Result<usize> {
        let axis = normalize_axis(op, axis, self.ndim())?;
        if self.shape()[axis] == 0 {
            return Err(crate::Error::InvalidArgument {
                op,
                message: format!("axis {axis} of shape {:?} is empty", self.shape()),
            });
        }
        Ok(axis)
    }
}

/// Backward of max along an axis: the gradient goes to the position of the
/// maximum (the first, on ties).
struct MaxBackward {
    input: IxDyn,
    axis: usize,
    /// Position of the maximum in each lane, lanes in row-major order.
    argmax: Vec<usize>,
}

impl Backprop for MaxBackward {
    fn backward(&self, grad: Data, grads: &mut InputGrads<'_>) {
        let grad = grad.view();
        let mut out = ArrayD::zeros(self.input.clone());
        for ((mut lane, &position), &g) in out
            .lanes_mut(Axis(self.axis))
            .into_iter()
            .zip(&self.argmax)
            .zip(grad.iter())
        {
            lane[position] = g;
        }
        grads.set(0, out);
    }

    fn backward_graph(&self, grad: &Tensor, grads: &mut GraphGrads<'_>) -> Result<()> {
        // The gradient, spread over each lane, times the constant one-hot
        // mask of the lane's maximum.
        let mut mask = ArrayD::zeros(self.input.clone());
        for (mut lane, &position) in mask
            .lanes_mut(Axis(self.axis))
            .into_iter()
            .zip(&self.argmax)
        {
            lane[position] = 1.0;
        }
        let grad = keepdim(grad, Some(self.axis), self.input.slice())?;
        let spread = expand(&grad, self.input.slice())?;
        grads.set(
            0,
            spread.try_mul(&Tensor::from_data(Data::from_array(mask)))?,
        );
        Ok(())
    }
}

/// Position of the largest value in `lane` (the first, on ties; NaN wins, so
/// a NaN input is visible in the result).
pub(crate) fn argmax_lane<'a>(lane: impl IntoIterator<Item = &'a f32>) -> usize {
    let mut best = (0, f32::NEG_INFINITY);
    for (i, &v) in lane.into_iter().enumerate() {
        if i == 0 || v > best.1 || (v.is_nan() && !best.1.is_nan()) {
            best = (i, v);
        }
    }
    best.0
}

/// Minima, and the index forms of both extrema.
impl Tensor {
    /// Minimum along `axis`.
    ///
    /// # Panics
    ///
    /// As [`try_min_axis`](Tensor::try_min_axis).
    #[track_caller]
    pub fn min_axis(&self, axis: isize, keepdim: bool) -> Tensor {
        or_panic(self.try_min_axis(axis, keepdim))
    }

    /// Minimum along `axis` (negative counts from the end; PyTorch's
    /// `x.amin(dim, keepdim)`, the values of `x.min(dim, keepdim)`); with
    /// `keepdim` the axis stays, with length 1. The gradient flows to the
    /// first minimal element of each lane; a lane holding a NaN has a NaN
    /// minimum, as [`try_max_axis`](Tensor::try_max_axis).
    ///
    /// # Errors
    ///
    /// [`Error::Axis`](crate::Error::Axis) if `axis` is out of range,
    /// [`Error::InvalidArgument`](crate::Error::InvalidArgument) if the axis
    /// has length 0.
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::Tensor;
    ///
    /// let t = Tensor::from_vec(vec![1.0, 5.0, 3.0, 4.0], &[2, 2])?.requires_grad_(true);
    /// let m = t.try_min_axis(-1, true)?;
    /// assert_eq!((m.to_vec(), m.shape()), (vec![1.0, 3.0], &[2, 1][..]));
    /// m.sum().backward();
    /// assert_eq!(t.grad().unwrap().to_vec(), vec![1.0, 0.0, 1.0, 0.0]);
    /// # Ok::<(), netcl::Error>(())
    /// ```
    #[track_caller]
    pub fn try_min_axis(&self, axis: isize, keepdim: bool) -> Result<Tensor> {
        let axis = self.nonempty_axis("min_axis", axis)?;
        let data = self.read();
        let data = data.view();
        let argmin: Vec<usize> = data
            .lanes(Axis(axis))
            .into_iter()
            .map(argmin_lane)
            .collect();
        let mut out = data.index_axis(Axis(axis), 0).to_owned();
        for (v, (lane, &position)) in out
            .iter_mut()
            .zip(data.lanes(Axis(axis)).into_iter().zip(&argmin))
        {
            *v = lane[position];
        }
        if keepdim {
            out = out.insert_axis(Axis(axis));
        }
        // d min/dx = 1 at the (first) minimum, 0 elsewhere: MaxBackward's
        // routing by position.
        record("min_axis", &[self], Data::from_view(out.view()), |_| {
            MaxBackward {
                input: self.dim(),
                axis,
                argmax: argmin,
            }
        })
    }

    /// Index of the maximum along `axis`, keeping the axis (length 1) with
    /// `keepdim`: PyTorch's `x.argmax(dim, keepdim)`.
    ///
    /// # Panics
    ///
    /// As [`try_argmax_keepdim`](Tensor::try_argmax_keepdim).
    #[track_caller]
    pub fn argmax_keepdim(&self, axis: isize, keepdim: bool) -> Tensor {
        or_panic(self.try_argmax_keepdim(axis, keepdim))
    }

    /// [`try_argmax`](Tensor::try_argmax) with PyTorch's `keepdim`: with it
    /// the axis stays, with length 1. (netcl's `argmax(axis)` predates the
    /// argument and keeps its signature.)
    ///
    /// # Errors
    ///
    /// As [`try_argmax`](Tensor::try_argmax).
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::Tensor;
    ///
    /// let t = Tensor::from_vec(vec![0.1, 0.7, 0.9, 0.2], &[2, 2])?;
    /// let i = t.try_argmax_keepdim(-1, true)?;
    /// assert_eq!((i.to_vec(), i.shape()), (vec![1.0, 0.0], &[2, 1][..]));
    /// # Ok::<(), netcl::Error>(())
    /// ```
    #[track_caller]
    pub fn try_argmax_keepdim(&self, axis: isize, keepdim: bool) -> Result<Tensor> {
        let index = self.try_argmax(axis)?;
        if !keepdim {
            return Ok(index);
        }
        let axis = normalize_axis("argmax", axis, self.ndim())?;
        let mut shape = index.shape().to_vec();
        shape.insert(axis, 1);
        Ok(Tensor::from_data(index.read().reshape(&shape)))
    }

    /// Index of the minimum along `axis`.
    ///
    /// # Panics
    ///
    /// As [`try_argmin`](Tensor::try_argmin).
    #[track_caller]
    pub fn argmin(&self, axis: isize, keepdim: bool) -> Tensor {
        or_panic(self.try_argmin(axis, keepdim))
    }

    /// Index of the minimum along `axis` (PyTorch's `x.argmin(dim,
    /// keepdim)`), as `f32` values; ties go to the first minimum, a lane
    /// holding a NaN gives its first NaN. Not differentiable (the result
    /// never requires grad).
    ///
    /// # Errors
    ///
    /// [`Error::Axis`](crate::Error::Axis) if `axis` is out of range,
    /// [`Error::InvalidArgument`](crate::Error::InvalidArgument) if it has
    /// length 0.
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::Tensor;
    ///
    /// let t = Tensor::from_vec(vec![0.1, 0.7, 0.9, 0.2], &[2, 2])?;
    /// assert_eq!(t.try_argmin(-1, false)?.to_vec(), vec![0.0, 1.0]);
    /// # Ok::<(), netcl::Error>(())
    /// ```
    #[track_caller]
    pub fn try_argmin(&self, axis: isize, keepdim: bool) -> Result<Tensor> {
        let axis = self.nonempty_axis("argmin", axis)?;
        let data = self.read();
        let data = data.view();
        let mut out = data.index_axis(Axis(axis), 0).to_owned();
        for (v, lane) in out.iter_mut().zip(data.lanes(Axis(axis))) {
            *v = argmin_lane(lane) as f32;
        }
        if keepdim {
            out = out.insert_axis(Axis(axis));
        }
        Ok(Tensor::from_data(Data::from_view(out.view())))
    }
}

/// Standard deviation along an axis.
impl Tensor {
    /// Standard deviation along `axis`.
    ///
    /// # Panics
    ///
    /// As [`try_std`](Tensor::try_std).
    #[track_caller]
    pub fn std(&self, axis: isize, unbiased: bool, keepdim: bool) -> Tensor {
        or_panic(self.try_std(axis, unbiased, keepdim))
    }

    /// Standard deviation along `axis` (PyTorch's `x.std(dim, unbiased,
    /// keepdim)`): the square root of [`try_var`](Tensor::try_var). Its
    /// gradient `(x - mean) / ((n - correction) std)` is taken as 0 in a
    /// lane whose values are all equal (std 0), as PyTorch does.
    ///
    /// # Errors
    ///
    /// As [`try_var`](Tensor::try_var).
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::Tensor;
    ///
    /// let x = Tensor::from_vec(vec![1.0, 3.0, 5.0, 7.0], &[2, 2])?;
    /// assert_eq!(x.try_std(1, false, false)?.to_vec(), vec![1.0, 1.0]);
    /// # Ok::<(), netcl::Error>(())
    /// ```
    #[track_caller]
    pub fn try_std(&self, axis: isize, unbiased: bool, keepdim: bool) -> Result<Tensor> {
        self.spread_op("std", axis, unbiased, keepdim)
    }
}

/// Position of the smallest value in `lane` (the first, on ties; NaN wins).
fn argmin_lane<'a>(lane: impl IntoIterator<Item = &'a f32>) -> usize {
    let mut best = (0, f32::INFINITY);
    for (i, &v) in lane.into_iter().enumerate() {
        if i == 0 || v < best.1 || (v.is_nan() && !best.1.is_nan()) {
            best = (i, v);
        }
    }
    best.0
}

/// The largest value of `lane`, NaN if it holds one; `-inf` when empty.
fn lane_max<'a>(lane: impl IntoIterator<Item = &'a f32>) -> f32 {
    lane.into_iter().fold(
        f32::NEG_INFINITY,
        |m, &v| {
            if m.is_nan() || v <= m { m } else { v }
        },
    )
}

/// `f` of each lane along `axis` of `x`, into the reduced shape (the axis
/// kept with length 1 when `keepdim`).
fn reduce_lanes(
    x: &Data,
    axis: usize,
    keepdim: bool,
    f: impl Fn(ndarray::ArrayView1<'_, f32>) -> f32,
) -> Data {
    let view = x.view();
    let mut shape = view.shape().to_vec();
    shape[axis] = 1;
    let mut out = ArrayD::zeros(IxDyn(&shape));
    if !out.is_empty() {
        for (v, lane) in out.iter_mut().zip(view.lanes(Axis(axis))) {
            *v = f(lane);
        }
    }
    if !keepdim {
        out = out.remove_axis(Axis(axis));
    }
    Data::from_array(out)
}

/// A reduced value or gradient, broadcast back over the reduced axis.
fn spread(reduced: &Data, axis: usize, input: &[usize]) -> ArrayD<f32> {
    let mut reduced = reduced.to_array();
    if reduced.ndim() < input.len() {
        reduced = reduced.insert_axis(Axis(axis));
    }
    reduced
        .broadcast(IxDyn(input))
        .expect("reduced shape broadcasts to input")
        .to_owned()
}

/// Log-sum-exp and variance along an axis.
impl Tensor {
    /// `log Σ exp(x)` along `axis`.
    ///
    /// # Panics
    ///
    /// As [`try_logsumexp`](Tensor::try_logsumexp).
    #[track_caller]
    pub fn logsumexp(&self, axis: isize, keepdim: bool) -> Tensor {
        or_panic(self.try_logsumexp(axis, keepdim))
    }

    /// `log Σ exp(x)` along `axis` (PyTorch's `torch.logsumexp(x, dim,
    /// keepdim)`; negative axes count from the end), computed as
    /// `m + log Σ exp(x - m)` with `m` the lane's maximum, so it never
    /// overflows. With `keepdim` the axis stays, with length 1.
    ///
    /// As in PyTorch: a lane of only `-inf` (or an empty lane) gives
    /// `-inf`, a lane with `+inf` gives `+inf`, a lane with NaN gives NaN.
    /// The gradient is `exp(x - logsumexp)` (the softmax of the lane),
    /// which is NaN throughout a lane of only `-inf` and at the `+inf`
    /// entries of a lane, as PyTorch's.
    ///
    /// # Errors
    ///
    /// [`Error::Axis`](crate::Error::Axis) if `axis` is out of range.
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::Tensor;
    ///
    /// let x = Tensor::from_vec(vec![1000.0, 1000.0, 0.0, f32::NEG_INFINITY], &[2, 2])?;
    /// let y = x.try_logsumexp(-1, false)?;
    /// assert_eq!(y.to_vec(), vec![1000.0 + 2f32.ln(), 0.0]); // no overflow
    ///
    /// let x = Tensor::from_vec(vec![1.0, 1.0, 0.0, f32::NEG_INFINITY], &[2, 2])?
    ///     .requires_grad_(true);
    /// x.try_logsumexp(-1, true)?.sum().backward();
    /// // d/dx_i = exp(x_i - logsumexp(x)), the softmax of the lane
    /// let g = x.grad().unwrap().to_vec();
    /// assert!((g[0] - 0.5).abs() < 1e-6 && (g[1] - 0.5).abs() < 1e-6);
    /// assert_eq!(g[2..], [1.0, 0.0]);
    /// # Ok::<(), netcl::Error>(())
    /// ```
    #[track_caller]
    pub fn try_logsumexp(&self, axis: isize, keepdim: bool) -> Result<Tensor> {
        let axis = normalize_axis("logsumexp", axis, self.ndim())?;
        let x = self.read().into_data();
        let out = reduce_lanes(&x, axis, keepdim, |lane| {
            let m = lane_max(lane);
            if !m.is_finite() {
                // -inf (all -inf, or empty), +inf, or NaN: the limit.
                return m;
            }
            m + lane.fold(0.0, |s, &v| s + (v - m).exp()).ln()
        });
        record("logsumexp", &[self], out, |y: &Data| {
            // d/dx_i logsumexp(x) = exp(x_i - logsumexp(x))
            with_graph(
                (x, y.clone()),
                move |(x, y): &(Data, Data), grad: Data, grads: &mut InputGrads<'_>| {
                    let mut d = spread(&grad, axis, x.shape());
                    let y = spread(y, axis, x.shape());
                    ndarray::Zip::from(&mut d)
                        .and(&x.view())
                        .and(&y)
                        .for_each(|d, &x, &y| *d *= (x - y).exp());
                    grads.set(0, d);
                },
                move |(x, y): &(Data, Data), grad: &Tensor, grads: &mut GraphGrads<'_>| {
                    let xt = grads.input(0, x)?;
                    let yt = grads.output(y);
                    let (g, yt) = if keepdim {
                        (grad.clone(), yt)
                    } else {
                        let a = axis as isize;
                        (grad.try_unsqueeze(a)?, yt.try_unsqueeze(a)?)
                    };
                    let d = expand(&g, x.shape())?.try_mul(&xt.try_sub(&yt)?.exp())?;
                    grads.set(0, d);
                    Ok(())
                },
            )
        })
    }

    /// Variance along `axis`.
    ///
    /// # Panics
    ///
    /// As [`try_var`](Tensor::try_var).
    #[track_caller]
    pub fn var(&self, axis: isize, unbiased: bool, keepdim: bool) -> Tensor {
        or_panic(self.try_var(axis, unbiased, keepdim))
    }

    /// Variance along `axis` (PyTorch's `x.var(dim, unbiased, keepdim)`):
    /// `Σ (x - mean)² / (n - 1)` with `unbiased` (Bessel's correction),
    /// `/ n` without. With `keepdim` the axis stays, with length 1.
    ///
    /// When `n - 1` (or `n`) is 0, the result is NaN, as in PyTorch (which
    /// also warns); NaN and infinities propagate.
    ///
    /// # Errors
    ///
    /// [`Error::Axis`](crate::Error::Axis) if `axis` is out of range.
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::Tensor;
    ///
    /// let x = Tensor::from_vec(vec![1.0, 2.0, 3.0, 4.0], &[1, 4])?.requires_grad_(true);
    /// let v = x.try_var(1, true, false)?;
    /// assert!((v.item() - 5.0 / 3.0).abs() < 1e-6);
    /// v.sum().backward();
    /// // d/dx_i = 2 (x_i - mean) / (n - 1)
    /// let g = x.grad().unwrap().to_vec();
    /// assert!((g[0] + 1.0).abs() < 1e-6 && (g[3] - 1.0).abs() < 1e-6);
    /// # Ok::<(), netcl::Error>(())
    /// ```
    #[track_caller]
    pub fn try_var(&self, axis: isize, unbiased: bool, keepdim: bool) -> Result<Tensor> {
        self.spread_op("var", axis, unbiased, keepdim)
    }

    /// Variance (`op` "var") or standard deviation ("std") along `axis`.
    #[track_caller]
    fn spread_op(
        &self,
        op: &'static str,
        axis: isize,
        unbiased: bool,
        keepdim: bool,
    ) -> Result<Tensor> {
        let axis = normalize_axis(op, axis, self.ndim())?;
        let root = op == "std";
        let x = self.read().into_data();
        let n = x.shape()[axis];
        let denom = n.saturating_sub(usize::from(unbiased)) as f32;
        let mean = reduce_lanes(&x, axis, true, |lane| lane.sum() / n as f32);
        let out = reduce_lanes(&x, axis, keepdim, |lane| {
            let m = lane.sum() / n as f32;
            let var = lane.fold(0.0, |s, &v| s + (v - m) * (v - m)) / denom;
            if root { var.sqrt() } else { var }
        });
        record(op, &[self], out, move |y: &Data| {
            // d var/dx_i = 2 (x_i - mean) / (n - correction);
            // d std/dx_i = (x_i - mean) / ((n - correction) std), taken as 0
            // where std is 0 (every value of the lane equal), as PyTorch
            // (differentiably, with the mean and the std recorded)
            with_graph(
                (x, mean, y.clone()),
                move |(x, mean, y): &(Data, Data, Data), grad: Data, grads: &mut InputGrads<'_>| {
                    let mut d = spread(&grad, axis, x.shape());
                    let mean = spread(mean, axis, x.shape());
                    if root {
                        let std = spread(y, axis, x.shape());
                        ndarray::Zip::from(&mut d)
                            .and(&x.view())
                            .and(&mean)
                            .and(&std)
                            .for_each(|d, &x, &m, &s| {
                                *d = if s == 0.0 {
                                    0.0
                                } else {
                                    *d * (x - m) / (denom * s)
                                }
                            });
                    } else {
                        ndarray::Zip::from(&mut d)
                            .and(&x.view())
                            .and(&mean)
                            .for_each(|d, &x, &m| *d *= 2.0 * (x - m) / denom);
                    }
                    grads.set(0, d);
                },
                move |(x, _, y): &(Data, Data, Data), grad: &Tensor, grads: &mut GraphGrads<'_>| {
                    let a = axis as isize;
                    let xt = grads.input(0, x)?;
                    let centered = xt.try_sub(&xt.try_mean_axis(a, true)?)?;
                    let g = if keepdim {
                        grad.clone()
                    } else {
                        grad.try_unsqueeze(a)?
                    };
                    let g = expand(&g, x.shape())?;
                    let d = if root {
                        let yt = grads.output(y);
                        let s = if keepdim { yt } else { yt.try_unsqueeze(a)? };
                        let zero = Tensor::from_data(s.read().map(|s| f32::from(s == 0.0)));
                        let safe = s.try_masked_fill(&zero, 1.0)?.mul_scalar(denom);
                        g.try_mul(&centered)?
                            .try_div(&safe)?
                            .try_masked_fill(&zero, 0.0)?
                    } else {
                        g.try_mul(&centered)?.mul_scalar(2.0 / denom)
                    };
                    grads.set(0, d);
                    Ok(())
                },
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::Tensor;

    fn tensor(values: &[f32], shape: &[usize]) -> Tensor {
        Tensor::from_vec(values.to_vec(), shape).unwrap()
    }

    #[test]
    fn logsumexp_of_empty_lanes_is_minus_infinity() {
        // log Σ over nothing = log 0, as PyTorch.
        let x = Tensor::zeros(&[3, 0]);
        let y = x.logsumexp(1, false);
        assert_eq!(y.shape(), &[3]);
        assert_eq!(y.to_vec(), vec![f32::NEG_INFINITY; 3]);
        assert_eq!(x.logsumexp(0, true).shape(), &[1, 0]);
    }

    #[test]
    fn logsumexp_keeps_nan_and_infinities() {
        let x = tensor(
            &[f32::NAN, 0.0, f32::INFINITY, 0.0, f32::NEG_INFINITY, 3.0],
            &[3, 2],
        );
        let y = x.logsumexp(-1, false).to_vec();
        assert!(y[0].is_nan());
        assert_eq!(y[1], f32::INFINITY);
        assert_eq!(y[2], 3.0);
    }

    #[test]
    fn var_propagates_nan_and_is_nan_without_degrees_of_freedom() {
        let x = tensor(&[1.0, f32::NAN, 2.0, 4.0], &[2, 2]);
        let v = x.var(1, false, false).to_vec();
        assert!(v[0].is_nan());
        assert_eq!(v[1], 1.0); // ((2-3)² + (4-3)²) / 2
        // One sample with Bessel's correction: 0/0.
        assert!(tensor(&[5.0], &[1, 1]).var(1, true, false).item().is_nan());
        assert!(matches!(
            x.try_var(2, true, false),
            Err(crate::Error::Axis { op: "var", .. })
        ));
    }

    #[test]
    fn min_axis_and_argmin_agree_and_nan_wins() {
        let x = tensor(&[3.0, 1.0, 1.0, 2.0, f32::NAN, 0.0], &[2, 3]);
        let m = x.min_axis(1, false).to_vec();
        assert_eq!(m[0], 1.0);
        assert!(m[1].is_nan());
        assert_eq!(x.argmin(1, false).to_vec(), vec![1.0, 1.0]);
        assert_eq!(x.argmin(1, true).shape(), &[2, 1]);
        assert_eq!(x.argmax_keepdim(0, true).shape(), &[1, 3]);
        assert_eq!(x.argmax_keepdim(0, false).to_vec(), x.argmax(0).to_vec());
        let err = Tensor::zeros(&[2, 0]).try_min_axis(1, false).unwrap_err();
        assert_eq!(err.to_string(), "min_axis: axis 1 of shape [2, 0] is empty");
    }
}
