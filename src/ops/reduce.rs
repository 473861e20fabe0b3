//! Reductions: sum and mean (whole tensor or along an axis), max along an
//! axis.

use ndarray::{ArrayD, Axis, Dimension, IxDyn};

use crate::array::normalize_axis;
use crate::autograd::function::{Backprop, GraphGrads, InputGrads, record, record_unary};
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
