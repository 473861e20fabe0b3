//! Softmax and log-softmax along an axis, numerically stable (the lane's
//! maximum is subtracted before exponentiating).
//!
//! # NaN and infinities
//!
//! A lane holding a NaN is NaN throughout, as in PyTorch (the lane's
//! maximum is taken so that NaN wins; `f32::max` would skip it). With
//! infinities, each output is its limit where that exists: a `-inf` entry
//! has probability 0 (log-probability `-inf`); a `+inf` entry takes all the
//! mass, so the finite entries of its lane get probability 0 (`-inf`) and
//! the `+inf` entries themselves, `inf - inf`, are NaN; a lane of only
//! `-inf` has no mass to share and is NaN.

use ndarray::{ArrayView1, ArrayViewMut1, ArrayViewMutD, Axis, Zip};

use crate::autograd::function::{GraphGrads, InputGrads, record, with_graph};
use crate::error::{Result, or_panic};
use crate::tensor::{Data, Tensor};

use super::vectorized;

/// The largest value of `lane`, or NaN if it holds one (`f32::max` would
/// skip it); `-inf` for an empty lane.
fn lane_max(lane: ArrayView1<'_, f32>) -> f32 {
    lane.fold(
        f32::NEG_INFINITY,
        |m, &v| {
            if m.is_nan() || v <= m { m } else { v }
        },
    )
}

/// Softmax of one contiguous lane in place, in SIMD vectors.
#[inline]
fn softmax_row(row: &mut [f32]) {
    let max = vectorized::dispatch(
        #[inline(always)]
        || vectorized::max_or_nan(row),
    );
    if max.is_finite() {
        vectorized::softmax_finite_max(row, max);
    } else {
        vectorized::map_in_place(row, |v| vectorized::exp(v - max));
    }
}

/// Log-softmax of one lane in place (see [`log_softmax_inplace`]).
fn log_softmax_lane(mut lane: ArrayViewMut1<'_, f32>) {
    let max = lane_max(lane.view());
    if !max.is_finite() {
        // v - max is the limit: -inf, or NaN for inf - inf and NaN.
        lane.mapv_inplace(|v| v - max);
        return;
    }
    let log_sum = lane.fold(0.0, |s, &v| s + (v - max).exp()).ln();
    lane.mapv_inplace(|v| (v - max) - log_sum);
}

/// The rows of `x` if `axis` is its last axis and its values are
/// row-major: then the lanes are rows of one slice, which
/// [`par_rows`](vectorized::par_rows) splits across the caller's rayon pool
/// when there are enough of them (each row computed alone: the same bits
/// on any thread count).
fn rows<'a>(x: &'a mut ArrayViewMutD<'_, f32>, axis: usize) -> Option<(&'a mut [f32], usize)> {
    let width = *x.shape().last()?;
    if axis + 1 != x.ndim() {
        return None;
    }
    Some((x.as_slice_mut()?, width))
}

/// `softmax` of each lane along `axis` of `x`, in place.
pub(crate) fn softmax_inplace(mut x: ArrayViewMutD<'_, f32>, axis: usize) {
    if x.is_empty() {
        // Nothing to compute, but maybe very many empty lanes to visit
        // (an empty axis beside a long one).
        return;
    }
    if let Some((values, width)) = rows(&mut x, axis) {
        vectorized::par_rows(values, width, 6, |_, row| softmax_row(row));
        return;
    }
    for mut lane in x.lanes_mut(Axis(axis)) {
        if let Some(row) = lane.as_slice_mut() {
            // A contiguous lane (the last axis): in SIMD vectors.
            softmax_row(row);
            continue;
        }
        let max = lane_max(lane.view());
        if !max.is_finite() {
            // NaN, or infinities: see the module docs. exp(v - max) is
            // already the limit (0, or NaN for inf - inf and NaN).
            lane.mapv_inplace(|v| vectorized::exp(v - max));
            continue;
        }
        let mut sum = 0.0;
        lane.mapv_inplace(|v| {
            let e = vectorized::exp(v - max);
            sum += e;
            e
        });
        lane.mapv_inplace(|e| e / sum);
    }
}

/// `log_softmax` of each lane along `axis` of `x`, in place: the exact
/// `(x - max) - ln Σ exp(x - max)`, from which cross-entropy is taken.
pub(crate) fn log_softmax_inplace(mut x: ArrayViewMutD<'_, f32>, axis: usize) {
    if x.is_empty() {
        // Nothing to compute, but maybe very many empty lanes to visit
        // (an empty axis beside a long one).
        return;
    }
    if let Some((values, width)) = rows(&mut x, axis) {
        // libm's scalar exp per value: about 10 simple operations.
        vectorized::par_rows(values, width, 10, |_, row| {
            log_softmax_lane(ArrayViewMut1::from(row));
        });
        return;
    }
    for lane in x.lanes_mut(Axis(axis)) {
        log_softmax_lane(lane);
    }
}

impl Tensor {
    /// Softmax along `axis`.
    ///
    /// # Panics
    ///
    /// As [`try_softmax`](Tensor::try_softmax).
    #[track_caller]
    pub fn softmax(&self, axis: isize) -> Tensor {
        or_panic(self.try_softmax(axis))
    }

    /// Softmax along `axis` (negative counts from the end): each lane is
    /// exponentiated and normalised to sum to 1. Stable for large inputs.
    ///
    /// A lane holding a NaN is NaN throughout, as in PyTorch. With
    /// infinities each output is its limit where one exists: a `-inf` entry
    /// gets 0; in a lane with `+inf` the finite entries get 0 and the `+inf`
    /// entries, `inf - inf`, NaN; a lane of only `-inf` is NaN.
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
    /// let x = Tensor::from_vec(vec![1000.0, 1000.0, 0.0, 0.0], &[2, 2])?;
    /// assert_eq!(x.try_softmax(-1)?.to_vec(), vec![0.5, 0.5, 0.5, 0.5]);
    /// # Ok::<(), netcl::Error>(())
    /// ```
    #[track_caller]
    pub fn try_softmax(&self, axis: isize) -> Result<Tensor> {
        let axis = crate::array::normalize_axis("softmax", axis, self.ndim())?;
        let mut out = Data::from_view(self.read().view());
        softmax_inplace(out.view_mut().expect("a new buffer"), axis);
        // dx = y * (g - Σ g·y) along the axis
        record("softmax", &[self], out, |y: &Data| {
            with_graph(
                y.clone(),
                move |y: &Data, grad: Data, grads: &mut InputGrads<'_>| {
                    let mut grad = grad.into_array();
                    let y = y.view();
                    for (mut g, y) in grad
                        .lanes_mut(Axis(axis))
                        .into_iter()
                        .zip(y.lanes(Axis(axis)))
                        // An empty gradient may have very many empty lanes.
                        .take(if y.is_empty() { 0 } else { usize::MAX })
                    {
                        let dot = Zip::from(&g).and(&y).fold(0.0, |s, &g, &y| s + g * y);
                        g.zip_mut_with(&y, |g, &y| *g = y * (*g - dot));
                    }
                    grads.set(0, grad);
                },
                move |y: &Data, grad: &Tensor, grads: &mut GraphGrads<'_>| {
                    let y = grads.output(y);
                    let dot = grad.try_mul(&y)?.try_sum_axis(axis as isize, true)?;
                    grads.set(0, y.try_mul(&grad.try_sub(&dot)?)?);
                    Ok(())
                },
            )
        })
    }

    /// Log-softmax along `axis`.
    ///
    /// # Panics
    ///
    /// As [`try_log_softmax`](Tensor::try_log_softmax).
    #[track_caller]
    pub fn log_softmax(&self, axis: isize) -> Tensor {
        or_panic(self.try_log_softmax(axis))
    }

    /// Log-softmax along `axis` (negative counts from the end):
    /// `x - log Σ exp(x)` per lane, computed without overflow.
    ///
    /// NaN and infinities as [`try_softmax`](Tensor::try_softmax): a lane
    /// with a NaN is NaN, the finite entries of a lane with `+inf` are
    /// `-inf`.
    ///
    /// # Errors
    ///
    /// [`Error::Axis`](crate::Error::Axis) if `axis` is out of range.
    #[track_caller]
    pub fn try_log_softmax(&self, axis: isize) -> Result<Tensor> {
        let axis = crate::array::normalize_axis("log_softmax", axis, self.ndim())?;
        let mut out = Data::from_view(self.read().view());
        log_softmax_inplace(out.view_mut().expect("a new buffer"), axis);
        // dx = g - softmax · Σ g along the axis, softmax = exp(y)
        record("log_softmax", &[self], out, |y: &Data| {
            with_graph(
                y.clone(),
                move |y: &Data, grad: Data, grads: &mut InputGrads<'_>| {
                    let mut grad = grad.into_array();
                    let y = y.view();
                    for (mut g, y) in grad
                        .lanes_mut(Axis(axis))
                        .into_iter()
                        .zip(y.lanes(Axis(axis)))
                        // An empty gradient may have very many empty lanes.
                        .take(if y.is_empty() { 0 } else { usize::MAX })
                    {
                        let total = g.sum();
                        g.zip_mut_with(&y, |g, &y| *g -= y.exp() * total);
                    }
                    grads.set(0, grad);
                },
                move |y: &Data, grad: &Tensor, grads: &mut GraphGrads<'_>| {
                    let y = grads.output(y);
                    let total = grad.try_sum_axis(axis as isize, true)?;
                    grads.set(0, grad.try_sub(&y.exp().try_mul(&total)?)?);
                    Ok(())
                },
            )
        })
    }
}
