//! Loss functions: cross-entropy over class indices and mean squared error.

use ndarray::Axis;

use crate::autograd::function::{GraphGrads, InputGrads, record, with_graph};
use crate::error::{Error, Result, or_panic};
use crate::ops::softmax::log_softmax_inplace;
use crate::tensor::{Data, Tensor};

/// Reads class indices from a 1-D tensor of `n` integral values in
/// `0..classes`.
fn class_indices(targets: &Tensor, n: usize, classes: usize) -> Result<Vec<usize>> {
    if targets.shape() != [n] {
        return Err(Error::ShapeMismatch {
            op: "cross_entropy",
            lhs: vec![n],
            rhs: targets.shape().to_vec(),
        });
    }
    targets
        .read()
        .to_vec()
        .into_iter()
        .enumerate()
        .map(|(index, value)| {
            if value >= 0.0 && value.fract() == 0.0 && (value as usize) < classes {
                Ok(value as usize)
            } else {
                Err(Error::InvalidTarget {
                    op: "cross_entropy",
                    index,
                    value,
                    classes,
                })
            }
        })
        .collect()
}

impl Tensor {
    /// Mean cross-entropy of `logits` against class-index `targets`.
    ///
    /// # Panics
    ///
    /// As [`try_cross_entropy`](Tensor::try_cross_entropy).
    #[track_caller]
    pub fn cross_entropy(&self, targets: &Tensor) -> Tensor {
        or_panic(self.try_cross_entropy(targets))
    }

    /// Mean cross-entropy of `self`, logits of shape `[n, classes]`, against
    /// `targets`, `n` class indices stored as `f32`:
    /// `-mean_i log_softmax(self)[i, targets[i]]`. Fused: the backward is
    /// `(softmax - onehot) / n`, with no intermediate graph.
    ///
    /// The loss is computed from the log-softmax, so it is exact however
    /// confident a wrong prediction is (a logit gap of 200 costs 200), and
    /// NaN and infinities propagate: a row with a NaN logit has a NaN loss,
    /// a `+inf` logit on a class other than the target an infinite one, a
    /// `+inf` logit on the target itself NaN (`inf - inf`; see
    /// [`try_log_softmax`](Tensor::try_log_softmax)). An empty batch has a
    /// NaN loss, the mean of nothing, as in PyTorch.
    ///
    /// # Errors
    ///
    /// [`Error::Rank`] if the logits are not 2-D, [`Error::ShapeMismatch`] if
    /// `targets` is not of shape `[n]`, [`Error::InvalidTarget`] naming the
    /// first target that is not an integer in `0..classes`.
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::Tensor;
    ///
    /// let logits = Tensor::from_vec(vec![0.0, 0.0, 0.0, 0.0], &[2, 2])?;
    /// let targets = Tensor::from_vec(vec![0.0, 1.0], &[2])?;
    /// let loss = logits.try_cross_entropy(&targets)?;
    /// assert!((loss.item() - 2f32.ln()).abs() < 1e-6);
    ///
    /// let bad = Tensor::from_vec(vec![0.0, 2.0], &[2])?;
    /// assert_eq!(
    ///     logits.try_cross_entropy(&bad).unwrap_err().to_string(),
    ///     "cross_entropy: target 1 is 2, expected a class index in 0..2"
    /// );
    /// # Ok::<(), netcl::Error>(())
    /// ```
    #[track_caller]
    pub fn try_cross_entropy(&self, targets: &Tensor) -> Result<Tensor> {
        if self.ndim() != 2 {
            return Err(Error::Rank {
                op: "cross_entropy",
                expected: "logits of shape [n, classes]",
                shape: self.shape().to_vec(),
            });
        }
        let (n, classes) = (self.shape()[0], self.shape()[1]);
        let targets = class_indices(targets, n, classes)?;
        // From log-softmax, never from a clamped probability: exact for
        // confident mistakes, and NaN and infinities carry through.
        let mut log_probs = self.read().to_array();
        log_softmax_inplace(log_probs.view_mut(), 1);
        let total: f32 = targets
            .iter()
            .enumerate()
            .map(|(i, &t)| -log_probs[[i, t]])
            .sum();
        let out = Data::full(&[], total / n as f32);
        record("cross_entropy", &[self], out, |_| {
            with_graph(
                (log_probs, targets),
                move |(log_probs, targets), grad: Data, grads: &mut InputGrads<'_>| {
                    let scale = grad.to_vec().first().copied().unwrap_or(0.0) / n as f32;
                    let mut g = log_probs.mapv(f32::exp);
                    for (mut row, &t) in g.axis_iter_mut(Axis(0)).zip(targets) {
                        row[t] -= 1.0;
                        row.mapv_inplace(|v| v * scale);
                    }
                    grads.set(0, g);
                },
                move |(log_probs, targets), grad: &Tensor, grads: &mut GraphGrads<'_>| {
                    // (softmax(x) - onehot) · g / n. The logits were not
                    // saved, but their log-softmax was, and softmax is
                    // shift-invariant: softmax(log_softmax(x)) = softmax(x),
                    // and so are all its derivatives. So the log-softmax
                    // stands in for x's values, with x's place in the graph.
                    let x = grads.input(0, &Data::from_view(log_probs.view()))?;
                    let mut onehot = ndarray::ArrayD::zeros(log_probs.raw_dim());
                    for (mut row, &t) in onehot.axis_iter_mut(Axis(0)).zip(targets) {
                        row[t] = 1.0;
                    }
                    let onehot = Tensor::from_data(Data::from_array(onehot));
                    let g = x.try_softmax(1)?.try_sub(&onehot)?;
                    grads.set(0, g.try_mul(&grad.div_scalar(n as f32))?);
                    Ok(())
                },
            )
        })
    }

    /// Mean squared error between `self` and `target`.
    ///
    /// # Panics
    ///
    /// As [`try_mse_loss`](Tensor::try_mse_loss).
    #[track_caller]
    pub fn mse_loss(&self, target: &Tensor) -> Tensor {
        or_panic(self.try_mse_loss(target))
    }

    /// Mean squared error `mean((self - target)²)`; both tensors must have
    /// the same shape (no broadcasting, which usually hides a bug here).
    ///
    /// # Errors
    ///
    /// [`Error::ShapeMismatch`] if the shapes differ.
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::Tensor;
    ///
    /// let pred = Tensor::from_vec(vec![1.0, 2.0], &[2])?;
    /// let target = Tensor::from_vec(vec![1.0, 4.0], &[2])?;
    /// assert_eq!(pred.try_mse_loss(&target)?.item(), 2.0);
    /// # Ok::<(), netcl::Error>(())
    /// ```
    #[track_caller]
    pub fn try_mse_loss(&self, target: &Tensor) -> Result<Tensor> {
        if self.shape() != target.shape() {
            return Err(Error::ShapeMismatch {
                op: "mse_loss",
                lhs: self.shape().to_vec(),
                rhs: target.shape().to_vec(),
            });
        }
        let operands = self.read_pair(target);
        let (pred, target_values) = operands.get();
        let diff = &pred.view() - &target_values.view();
        let n = diff.len() as f32;
        let loss = diff.iter().map(|d| d * d).sum::<f32>() / n;
        let out = Data::full(&[], loss);
        // d/dpred = 2 (pred - target) / n, d/dtarget = its negation
        record("mse_loss", &[self, target], out, |_| {
            with_graph(
                diff,
                move |diff, grad: Data, grads: &mut InputGrads<'_>| {
                    let scale = 2.0 * grad.to_vec().first().copied().unwrap_or(0.0) / n;
                    let g = diff.mapv(|d| d * scale);
                    if grads.needs_grad(1) {
                        grads.set(1, -&g);
                    }
                    grads.set(0, g);
                },
                move |diff, grad: &Tensor, grads: &mut GraphGrads<'_>| {
                    // Only pred - target was saved: it stands in for pred
                    // (and zeros for target), which gives the same
                    // difference, connected to both inputs, and the same
                    // derivatives (the gradient is linear in both).
                    let pred = grads.input(0, &Data::from_view(diff.view()))?;
                    let target = grads.input(1, &Data::full(diff.shape(), 0.0))?;
                    let g = pred.try_sub(&target)?.try_mul(&grad.mul_scalar(2.0 / n))?;
                    if grads.needs_grad(1) {
                        grads.set(1, g.neg());
                    }
                    grads.set(0, g);
                    Ok(())
                },
            )
        })
    }
}
