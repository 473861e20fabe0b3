//! Loss functions: cross-entropy and negative log-likelihood over class
//! indices (with PyTorch's options), binary cross-entropy on logits, and
//! mean squared error.

use ndarray::Axis;

use crate::array::reduce_to_shape;
use crate::autograd::function::{GraphGrads, InputGrads, record, with_graph};
use crate::error::{Error, Result, or_panic};
use crate::ops::graph::{expand, sum_to};
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
                    if let Some(lp) = log_probs.as_slice() {
                        // Row by row, on the caller's rayon pool when there
                        // are enough rows (the same bits on any thread
                        // count); libm's exp is about 10 simple operations.
                        let mut g = vec![0.0_f32; lp.len()];
                        crate::ops::vectorized::par_rows(&mut g, classes, 12, |i, row| {
                            let lp = &lp[i * classes..][..classes];
                            for (g, &l) in row.iter_mut().zip(lp) {
                                *g = l.exp();
                            }
                            row[targets[i]] -= 1.0;
                            for g in row.iter_mut() {
                                *g *= scale;
                            }
                        });
                        grads.put(0, Data::from_vec(&[n, classes], g));
                        return;
                    }
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

/// How a loss combines its per-element values, as PyTorch's `reduction`
/// argument (`'mean'`, `'sum'`, `'none'`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Reduction {
    /// The per-element losses, unreduced (`'none'`).
    None,
    /// Their mean (`'mean'`, the default). For class-index losses with an
    /// `ignore_index`, the mean over the targets not ignored.
    #[default]
    Mean,
    /// Their sum (`'sum'`).
    Sum,
}

/// The options of [`cross_entropy`] (PyTorch's keyword arguments of
/// `F.cross_entropy`; the defaults are PyTorch's).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CrossEntropyOptions {
    /// A target value whose row contributes nothing (neither loss nor
    /// gradient, nor a count in the mean). PyTorch's default is `-100`,
    /// kept here (`Some(-100)`); `None` ignores no target.
    pub ignore_index: Option<i64>,
    /// `ε` in `[0, 1]`: the target distribution is `1 - ε` on the target
    /// class plus `ε / classes` on every class. Default 0.
    pub label_smoothing: f32,
    /// How the per-row losses are combined. Default [`Reduction::Mean`].
    pub reduction: Reduction,
}

impl Default for CrossEntropyOptions {
    fn default() -> Self {
        CrossEntropyOptions {
            ignore_index: Some(-100),
            label_smoothing: 0.0,
            reduction: Reduction::Mean,
        }
    }
}

/// The options of [`nll_loss`] (PyTorch's keyword arguments of
/// `F.nll_loss`; the defaults are PyTorch's).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NllLossOptions {
    /// As [`CrossEntropyOptions::ignore_index`]; default `Some(-100)`.
    pub ignore_index: Option<i64>,
    /// How the per-row losses are combined. Default [`Reduction::Mean`].
    pub reduction: Reduction,
}

impl Default for NllLossOptions {
    fn default() -> Self {
        NllLossOptions {
            ignore_index: Some(-100),
            reduction: Reduction::Mean,
        }
    }
}

/// Reads the targets of a class-index loss over `[n, classes]` inputs: each
/// is `Some(class)`, or `None` where it equals `ignore_index`.
fn targets_of(
    op: &'static str,
    input: &Tensor,
    targets: &Tensor,
    ignore_index: Option<i64>,
) -> Result<Vec<Option<usize>>> {
    if input.ndim() != 2 {
        return Err(Error::Rank {
            op,
            expected: "an input of shape [n, classes]",
            shape: input.shape().to_vec(),
        });
    }
    let (n, classes) = (input.shape()[0], input.shape()[1]);
    if targets.shape() != [n] {
        return Err(Error::ShapeMismatch {
            op,
            lhs: vec![n],
            rhs: targets.shape().to_vec(),
        });
    }
    targets
        .read()
        .to_vec()
        .into_iter()
        .enumerate()
        .map(|(position, value)| match ignore_index {
            Some(ignored) if f64::from(value) == ignored as f64 => Ok(None),
            _ => crate::array::index(op, position, value, classes).map(Some),
        })
        .collect()
}

/// The per-row losses `rows` reduced as `reduction` says (the mean over
/// `count` rows), and the factor that turns the incoming gradient of the
/// result into each row's.
fn reduce_rows(rows: Vec<f32>, count: usize, reduction: Reduction) -> Data {
    match reduction {
        Reduction::None => Data::from_vec(&[rows.len()], rows),
        // The mean over no row is 0/0, NaN, as in PyTorch.
        Reduction::Mean => Data::full(&[], rows.iter().sum::<f32>() / count as f32),
        Reduction::Sum => Data::full(&[], rows.iter().sum::<f32>()),
    }
}

/// The gradient of each row's loss from the gradient of the reduced one.
/// [`row_grads`] in recorded ops, as a column `[n, 1]` (times `rows`, a
/// constant column of 1 for the rows that count and 0 for ignored ones),
/// or `None` when no row counts (a zero gradient).
fn row_grads_graph(
    grad: &Tensor,
    n: usize,
    count: usize,
    reduction: Reduction,
    rows: Vec<f32>,
) -> Result<Option<Tensor>> {
    if count == 0 {
        return Ok(None);
    }
    let scales = match reduction {
        Reduction::None => grad.try_reshape(&[n, 1])?,
        Reduction::Mean => grad.div_scalar(count as f32).try_reshape(&[1, 1])?,
        Reduction::Sum => grad.try_reshape(&[1, 1])?,
    };
    let rows = Tensor::from_vec(rows, &[n, 1])?;
    Ok(Some(scales.try_mul(&rows)?))
}

fn row_grads(grad: &Data, n: usize, count: usize, reduction: Reduction) -> Vec<f32> {
    let g = grad.to_vec();
    match reduction {
        Reduction::None => g,
        Reduction::Mean => vec![g.first().copied().unwrap_or(0.0) / count as f32; n],
        Reduction::Sum => vec![g.first().copied().unwrap_or(0.0); n],
    }
}

impl Tensor {
    /// [`functional::cross_entropy`](crate::functional::cross_entropy) as a
    /// method: cross-entropy of logits `self` with PyTorch's options.
    ///
    /// # Panics
    ///
    /// As [`try_cross_entropy_with`](Tensor::try_cross_entropy_with).
    #[track_caller]
    pub fn cross_entropy_with(&self, targets: &Tensor, options: CrossEntropyOptions) -> Tensor {
        or_panic(try_cross_entropy(self, targets, options))
    }

    /// [`functional::try_cross_entropy`](crate::functional::try_cross_entropy)
    /// as a method: cross-entropy of logits `self` (`[n, classes]`) against
    /// `n` class indices, with `ignore_index`, `label_smoothing` and
    /// `reduction`. With the default options it is
    /// [`try_cross_entropy`](Tensor::try_cross_entropy), except that a
    /// target of `-100` is ignored, as PyTorch's default `ignore_index`
    /// says.
    ///
    /// # Errors
    ///
    /// As [`functional::try_cross_entropy`](crate::functional::try_cross_entropy).
    #[track_caller]
    pub fn try_cross_entropy_with(
        &self,
        targets: &Tensor,
        options: CrossEntropyOptions,
    ) -> Result<Tensor> {
        try_cross_entropy(self, targets, options)
    }
}

/// PyTorch's `F.cross_entropy(input, target, ignore_index=..,
/// label_smoothing=.., reduction=..)` over logits `[n, classes]` and `n`
/// class indices stored as `f32`.
///
/// # Panics
///
/// As [`try_cross_entropy`].
#[track_caller]
pub fn cross_entropy(input: &Tensor, target: &Tensor, options: CrossEntropyOptions) -> Tensor {
    or_panic(try_cross_entropy(input, target, options))
}

/// PyTorch's `F.cross_entropy` with its options, over logits `input` of
/// shape `[n, classes]` and `target`, `n` class indices stored as `f32`.
/// Row `i`'s loss is `-(1 - ε) lp[i, t_i] - ε/classes Σ_c lp[i, c]`, `lp`
/// the log-softmax, `ε` the label smoothing; a row whose target is
/// `ignore_index` contributes nothing. [`Reduction::Mean`] divides by the
/// number of rows not ignored, so a batch whose targets are all ignored
/// has a NaN loss (0/0), as in PyTorch; [`Reduction::None`] gives the `[n]`
/// per-row losses, 0 where ignored.
///
/// The backward is fused: `(softmax - (1 - ε) onehot - ε/classes)` per
/// row, scaled by the row's incoming gradient. netcl takes only the 2-D
/// `[n, classes]` form (PyTorch also takes `[classes]` and
/// `[n, classes, d..]`) and no class weights.
///
/// # Errors
///
/// [`Error::Rank`] if `input` is not 2-D, [`Error::ShapeMismatch`] if
/// `target` is not `[n]`, [`Error::Index`] naming the position, value and
/// bound of the first target that is neither `ignore_index` nor an integer
/// in `0..classes`, [`Error::InvalidArgument`] if `label_smoothing` is not
/// in `[0, 1]`.
///
/// # Examples
///
/// ```
/// use netcl::Tensor;
/// use netcl::functional::{self as F, CrossEntropyOptions, Reduction};
///
/// let logits = Tensor::zeros(&[3, 2]).requires_grad_(true);
/// let targets = Tensor::from_vec(vec![0.0, -100.0, 1.0], &[3])?;
/// let options = CrossEntropyOptions { label_smoothing: 0.1, ..Default::default() };
/// let loss = F::try_cross_entropy(&logits, &targets, options)?;
/// assert!((loss.item() - 2f32.ln()).abs() < 1e-6); // mean over the 2 kept rows
/// loss.backward();
/// // Row 0: softmax 0.5 - 0.9 onehot - 0.05, over 2 rows; row 1 ignored.
/// assert_eq!(
///     logits.grad().unwrap().to_vec(),
///     vec![-0.225, 0.225, 0.0, 0.0, 0.225, -0.225]
/// );
///
/// let none = CrossEntropyOptions { reduction: Reduction::None, ..Default::default() };
/// assert_eq!(F::try_cross_entropy(&logits, &targets, none)?.shape(), &[3]);
/// # Ok::<(), netcl::Error>(())
/// ```
#[track_caller]
pub fn try_cross_entropy(
    input: &Tensor,
    target: &Tensor,
    options: CrossEntropyOptions,
) -> Result<Tensor> {
    let op = "cross_entropy";
    let eps = options.label_smoothing;
    if !(0.0..=1.0).contains(&eps) {
        return Err(Error::InvalidArgument {
            op,
            message: format!("label_smoothing is {eps}, expected a value in [0, 1]"),
        });
    }
    let targets = targets_of(op, input, target, options.ignore_index)?;
    let (n, classes) = (input.shape()[0], input.shape()[1]);
    let mut log_probs = input.read().to_array();
    log_softmax_inplace(log_probs.view_mut(), 1);
    let smooth = eps / classes as f32;
    let rows: Vec<f32> = targets
        .iter()
        .zip(log_probs.axis_iter(Axis(0)))
        .map(|(t, lp)| match t {
            None => 0.0,
            Some(t) if eps == 0.0 => -lp[*t],
            Some(t) => -(1.0 - eps) * lp[*t] - smooth * lp.sum(),
        })
        .collect();
    let count = targets.iter().flatten().count();
    let reduction = options.reduction;
    let out = reduce_rows(rows, count, reduction);
    record(op, &[input], out, |_| {
        // d loss_i / d z_ij = softmax_ij - (1 - ε) [j = t_i] - ε / classes
        // Differentiably: (softmax(z) - (1 - ε) onehot - ε / classes) times
        // the row scales, with the saved log-softmax standing in for the
        // logits (softmax is shift-invariant, see `Tensor::cross_entropy`).
        with_graph(
            (log_probs, targets),
            move |(log_probs, targets): &(ndarray::ArrayD<f32>, Vec<Option<usize>>),
                  grad: Data,
                  grads: &mut InputGrads<'_>| {
                let scales = row_grads(&grad, n, count, reduction);
                let mut g = log_probs.mapv(f32::exp);
                for ((mut row, t), &scale) in g.axis_iter_mut(Axis(0)).zip(targets).zip(&scales) {
                    match t {
                        None => row.fill(0.0),
                        Some(t) => {
                            row[*t] -= 1.0 - eps;
                            row.mapv_inplace(|v| (v - smooth) * scale);
                        }
                    }
                }
                grads.set(0, g);
            },
            move |(log_probs, targets): &(ndarray::ArrayD<f32>, Vec<Option<usize>>),
                  grad: &Tensor,
                  grads: &mut GraphGrads<'_>| {
                let rows = targets.iter().map(|t| f32::from(t.is_some())).collect();
                let Some(scales) = row_grads_graph(grad, n, count, reduction, rows)? else {
                    grads.set(0, Tensor::zeros(log_probs.shape()));
                    return Ok(());
                };
                let x = grads.input(0, &Data::from_view(log_probs.view()))?;
                let mut target = ndarray::ArrayD::from_elem(log_probs.raw_dim(), smooth);
                for (mut row, t) in target.axis_iter_mut(Axis(0)).zip(targets) {
                    if let Some(t) = t {
                        row[*t] += 1.0 - eps;
                    }
                }
                let target = Tensor::from_data(Data::from_array(target));
                let g = x.try_softmax(1)?.try_sub(&target)?;
                grads.set(0, g.try_mul(&scales)?);
                Ok(())
            },
        )
    })
}

/// PyTorch's `F.nll_loss(input, target, ignore_index=.., reduction=..)`
/// over log-probabilities `[n, classes]` and `n` class indices.
///
/// # Panics
///
/// As [`try_nll_loss`].
#[track_caller]
pub fn nll_loss(input: &Tensor, target: &Tensor, options: NllLossOptions) -> Tensor {
    or_panic(try_nll_loss(input, target, options))
}

/// PyTorch's `F.nll_loss`: row `i`'s loss is `-input[i, t_i]` (`input`
/// holds log-probabilities, `[n, classes]`; `target` `n` class indices as
/// `f32`). Reductions and `ignore_index` as [`try_cross_entropy`] (a mean
/// over no kept row is NaN).
///
/// # Errors
///
/// As [`try_cross_entropy`] (without the label smoothing check).
///
/// # Examples
///
/// ```
/// use netcl::Tensor;
/// use netcl::functional as F;
///
/// let log_probs = Tensor::from_vec(vec![-0.5, -1.0, -2.0, -0.1], &[2, 2])?.requires_grad_(true);
/// let targets = Tensor::from_vec(vec![1.0, 0.0], &[2])?;
/// let loss = F::try_nll_loss(&log_probs, &targets, Default::default())?;
/// assert_eq!(loss.item(), 1.5);
/// loss.backward();
/// assert_eq!(log_probs.grad().unwrap().to_vec(), vec![0.0, -0.5, -0.5, 0.0]);
///
/// let bad = Tensor::from_vec(vec![1.0, 2.0], &[2])?;
/// assert_eq!(
///     F::try_nll_loss(&log_probs, &bad, Default::default()).unwrap_err().to_string(),
///     "nll_loss: index 2 at position 1 is out of range: expected an integer in 0..2"
/// );
/// # Ok::<(), netcl::Error>(())
/// ```
#[track_caller]
pub fn try_nll_loss(input: &Tensor, target: &Tensor, options: NllLossOptions) -> Result<Tensor> {
    let op = "nll_loss";
    let targets = targets_of(op, input, target, options.ignore_index)?;
    let n = input.shape()[0];
    let values = input.read().into_data();
    let rows: Vec<f32> = {
        let view = values.view();
        targets
            .iter()
            .enumerate()
            .map(|(i, t)| t.map_or(0.0, |t| -view[[i, t]]))
            .collect()
    };
    let count = targets.iter().flatten().count();
    let reduction = options.reduction;
    let out = reduce_rows(rows, count, reduction);
    let shape = values.shape().to_vec();
    record(op, &[input], out, move |_| {
        // d loss_i / d input_ij = -[j = t_i]
        // Differentiably: minus the one-hot targets times the row scales.
        with_graph(
            (targets, shape),
            move |(targets, shape): &(Vec<Option<usize>>, Vec<usize>),
                  grad: Data,
                  grads: &mut InputGrads<'_>| {
                let scales = row_grads(&grad, n, count, reduction);
                let mut g = ndarray::ArrayD::zeros(ndarray::IxDyn(shape));
                for (i, (t, &scale)) in targets.iter().zip(&scales).enumerate() {
                    if let Some(t) = t {
                        g[[i, *t]] = -scale;
                    }
                }
                grads.set(0, g);
            },
            move |(targets, shape): &(Vec<Option<usize>>, Vec<usize>),
                  grad: &Tensor,
                  grads: &mut GraphGrads<'_>| {
                let rows = targets.iter().map(|t| f32::from(t.is_some())).collect();
                let Some(scales) = row_grads_graph(grad, n, count, reduction, rows)? else {
                    grads.set(0, Tensor::zeros(shape));
                    return Ok(());
                };
                let mut onehot = ndarray::ArrayD::zeros(ndarray::IxDyn(shape));
                for (i, t) in targets.iter().enumerate() {
                    if let Some(t) = t {
                        onehot[[i, *t]] = -1.0;
                    }
                }
                let onehot = Tensor::from_data(Data::from_array(onehot));
                grads.set(0, onehot.try_mul(&scales)?);
                Ok(())
            },
        )
    })
}

/// The options of [`binary_cross_entropy_with_logits`] (PyTorch's keyword
/// arguments; the defaults are PyTorch's).
#[derive(Clone, Debug, Default)]
pub struct BceWithLogitsOptions {
    /// A weight multiplying each element's loss, broadcasting to the
    /// input's shape. Default none (1).
    pub weight: Option<Tensor>,
    /// The weight of the positive term, `p` in
    /// `-(p t log σ(x) + (1 - t) log(1 - σ(x)))`, broadcasting to the
    /// input's shape (usually one per class, `[classes]`). Default none
    /// (1).
    pub pos_weight: Option<Tensor>,
    /// How the element losses are combined. Default [`Reduction::Mean`].
    pub reduction: Reduction,
}

/// PyTorch's `F.binary_cross_entropy_with_logits(input, target, weight=..,
/// reduction=.., pos_weight=..)`.
///
/// # Panics
///
/// As [`try_binary_cross_entropy_with_logits`].
#[track_caller]
pub fn binary_cross_entropy_with_logits(
    input: &Tensor,
    target: &Tensor,
    options: BceWithLogitsOptions,
) -> Tensor {
    or_panic(try_binary_cross_entropy_with_logits(input, target, options))
}

/// PyTorch's `F.binary_cross_entropy_with_logits`: element-wise
/// `-w (p t log σ(x) + (1 - t) log(1 - σ(x)))`, computed as
/// `w ((1 - t) x + (1 + (p - 1) t) softplus(-x))` with
/// `softplus(-x) = log1p(exp(-|x|)) + max(-x, 0)`, finite for any finite
/// logit (±200 included), then reduced. `input` and `target` have one
/// shape (as PyTorch requires); the weight `w` and positive weight `p`
/// (see [`BceWithLogitsOptions`]) broadcast to it. Targets are
/// probabilities. Every tensor is differentiable, as in PyTorch:
/// `∂/∂x = w ((1 - t) - (1 + (p - 1) t) σ(-x))` (`σ(x) - t` without
/// weights), `∂/∂t = w ((p - 1) softplus(-x) - x)`, `∂/∂w` the unweighted
/// loss, `∂/∂p = w t softplus(-x)`.
///
/// # Errors
///
/// [`Error::ShapeMismatch`] if `target`'s shape is not `input`'s,
/// [`Error::Broadcast`] if a weight does not broadcast to it.
///
/// # Examples
///
/// ```
/// use netcl::Tensor;
/// use netcl::functional::{self as F, BceWithLogitsOptions, Reduction};
///
/// let x = Tensor::from_vec(vec![200.0, -200.0, 0.0], &[3])?.requires_grad_(true);
/// let t = Tensor::from_vec(vec![0.0, 0.0, 1.0], &[3])?;
/// let none = BceWithLogitsOptions { reduction: Reduction::None, ..Default::default() };
/// let loss = F::try_binary_cross_entropy_with_logits(&x, &t, none)?;
/// assert_eq!(loss.to_vec(), vec![200.0, 0.0, 2f32.ln()]);
/// loss.sum().backward();
/// assert_eq!(x.grad().unwrap().to_vec(), vec![1.0, 0.0, -0.5]); // σ(x) - t
///
/// // A positive weight of 3 triples the loss of a positive target.
/// let pos_weight = Some(Tensor::full(&[1], 3.0));
/// let weighted = BceWithLogitsOptions { pos_weight, ..Default::default() };
/// let x = Tensor::zeros(&[1]);
/// let one = Tensor::ones(&[1]);
/// let loss = F::try_binary_cross_entropy_with_logits(&x, &one, weighted)?;
/// assert!((loss.item() - 3.0 * 2f32.ln()).abs() < 1e-6);
/// # Ok::<(), netcl::Error>(())
/// ```
#[track_caller]
pub fn try_binary_cross_entropy_with_logits(
    input: &Tensor,
    target: &Tensor,
    options: BceWithLogitsOptions,
) -> Result<Tensor> {
    let op = "binary_cross_entropy_with_logits";
    if input.shape() != target.shape() {
        return Err(Error::ShapeMismatch {
            op,
            lhs: input.shape().to_vec(),
            rhs: target.shape().to_vec(),
        });
    }
    let BceWithLogitsOptions {
        weight,
        pos_weight,
        reduction,
    } = options;
    for w in [&weight, &pos_weight].into_iter().flatten() {
        let shape = crate::array::broadcast_shape(op, input.shape(), w.shape())?;
        if ndarray::Dimension::slice(&shape) != input.shape() {
            return Err(Error::Broadcast {
                op,
                lhs: input.shape().to_vec(),
                rhs: w.shape().to_vec(),
            });
        }
    }
    let (x, t) = input.read_pair(target).into_pair();
    let one = Data::full(&[], 1.0);
    let w = weight
        .as_ref()
        .map_or_else(|| one.clone(), |w| w.read().into_data());
    let p = pos_weight.as_ref().map_or(one, |p| p.read().into_data());
    let shape = ndarray::IxDyn(x.shape());
    let broadcast = |d: &Data| d.view().broadcast(shape.clone()).map(|v| v.to_owned());
    let (wb, pb) = (
        broadcast(&w).expect("checked broadcast"),
        broadcast(&p).expect("checked broadcast"),
    );
    // The unweighted loss (1 - t) x + (1 + (p - 1) t) softplus(-x).
    let unweighted = ndarray::Zip::from(&x.view())
        .and(&t.view())
        .and(&pb)
        .map_collect(|&x, &t, &p| (1.0 - t) * x + (1.0 + (p - 1.0) * t) * softplus_neg(x));
    let elementwise = &unweighted * &wb;
    let n = elementwise.len();
    let out = match reduction {
        Reduction::None => Data::from_array(elementwise),
        Reduction::Mean => Data::full(&[], elementwise.sum() / n as f32),
        Reduction::Sum => Data::full(&[], elementwise.sum()),
    };
    let mut inputs = vec![input, target];
    let w_slot = weight.as_ref().map(|w| {
        inputs.push(w);
        inputs.len() - 1
    });
    let p_slot = pos_weight.as_ref().map(|p| {
        inputs.push(p);
        inputs.len() - 1
    });
    let (w_shape, p_shape) = (w.shape().to_vec(), p.shape().to_vec());
    let saved = (x.clone(), t.clone(), w.clone(), p.clone());
    record(op, &inputs, out, move |_| {
        with_graph(
            saved,
            move |_, grad: Data, grads: &mut InputGrads<'_>| {
                let g = match reduction {
                    Reduction::None => grad.into_array(),
                    Reduction::Mean => {
                        ndarray::ArrayD::from_elem(shape.clone(), grad.to_vec()[0] / n as f32)
                    }
                    Reduction::Sum => ndarray::ArrayD::from_elem(shape.clone(), grad.to_vec()[0]),
                };
                let (x, t) = (x.view(), t.view());
                let each = |f: &dyn Fn(f32, f32, f32, f32) -> f32| {
                    ndarray::Zip::from(&g)
                        .and(&x)
                        .and(&t)
                        .and(&wb)
                        .and(&pb)
                        .map_collect(|&g, &x, &t, &w, &p| g * f(x, t, w, p))
                };
                if grads.needs_grad(0) {
                    // ∂/∂x = w ((1 - t) - (1 + (p - 1) t) σ(-x))
                    let sigmoid_neg = |x: f32| 1.0 / (1.0 + x.exp());
                    grads.set(
                        0,
                        each(&|x, t, w, p| {
                            w * ((1.0 - t) - (1.0 + (p - 1.0) * t) * sigmoid_neg(x))
                        }),
                    );
                }
                if grads.needs_grad(1) {
                    // ∂/∂t = w ((p - 1) softplus(-x) - x)
                    grads.set(1, each(&|x, _, w, p| w * ((p - 1.0) * softplus_neg(x) - x)));
                }
                if let Some(slot) = w_slot.filter(|&slot| grads.needs_grad(slot)) {
                    // ∂/∂w = the unweighted loss
                    let d = &g * &unweighted;
                    grads.set(slot, reduce_to_shape(d, &w_shape));
                }
                if let Some(slot) = p_slot.filter(|&slot| grads.needs_grad(slot)) {
                    // ∂/∂p = w t softplus(-x)
                    let d = each(&|x, t, w, _| w * t * softplus_neg(x));
                    grads.set(slot, reduce_to_shape(d, &p_shape));
                }
            },
            move |(xd, td, wd, pd): &(Data, Data, Data, Data),
                  grad: &Tensor,
                  grads: &mut GraphGrads<'_>| {
                // The same four derivatives in recorded ops, with
                // softplus(-x) = log(1 + e^-|x|) + max(-x, 0) (|x| and the
                // max as x times constant signs, exact also at 0) and
                // σ(-x) = sigmoid(-x).
                let shape = xd.shape().to_vec();
                let g = match reduction {
                    Reduction::None => grad.clone(),
                    Reduction::Mean => expand(&grad.div_scalar(n as f32), &shape)?,
                    Reduction::Sum => expand(grad, &shape)?,
                };
                let x = grads.input(0, xd)?;
                let t = grads.input(1, td)?;
                let w = match w_slot {
                    Some(slot) => grads.input(slot, wd)?,
                    None => Tensor::from_data(wd.clone()),
                };
                let p = match p_slot {
                    Some(slot) => grads.input(slot, pd)?,
                    None => Tensor::from_data(pd.clone()),
                };
                let negative = xd.map(|x| f32::from(x < 0.0));
                let sign = Tensor::from_data(negative.map(|n| 1.0 - 2.0 * n));
                let softplus = x
                    .try_mul(&sign)?
                    .neg()
                    .exp()
                    .add_scalar(1.0)
                    .log()
                    .try_sub(&x.try_mul(&Tensor::from_data(negative))?)?;
                let pt = p.sub_scalar(1.0).try_mul(&t)?.add_scalar(1.0);
                let gw = g.try_mul(&w)?;
                if grads.needs_grad(0) {
                    let d = t
                        .rsub_scalar(1.0)
                        .try_sub(&pt.try_mul(&x.neg().sigmoid())?)?;
                    grads.set(0, gw.try_mul(&d)?);
                }
                if grads.needs_grad(1) {
                    let d = p.sub_scalar(1.0).try_mul(&softplus)?.try_sub(&x)?;
                    grads.set(1, gw.try_mul(&d)?);
                }
                if let Some(slot) = w_slot.filter(|&slot| grads.needs_grad(slot)) {
                    let unweighted = t
                        .rsub_scalar(1.0)
                        .try_mul(&x)?
                        .try_add(&pt.try_mul(&softplus)?)?;
                    grads.set(slot, sum_to(&g.try_mul(&unweighted)?, wd.shape())?);
                }
                if let Some(slot) = p_slot.filter(|&slot| grads.needs_grad(slot)) {
                    let d = gw.try_mul(&t)?.try_mul(&softplus)?;
                    grads.set(slot, sum_to(&d, pd.shape())?);
                }
                Ok(())
            },
        )
    })
}

/// `softplus(-x) = log(1 + e^-x) = -log σ(x)`, without overflow:
/// `log1p(e^-|x|) + max(-x, 0)`. NaN stays NaN (`f32::max` would drop it).
fn softplus_neg(x: f32) -> f32 {
    (-x.abs()).exp().ln_1p() + (-x).max(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor(values: &[f32], shape: &[usize]) -> Tensor {
        Tensor::from_vec(values.to_vec(), shape).unwrap()
    }

    #[test]
    fn class_index_errors_name_position_value_and_bound() {
        let logits = Tensor::zeros(&[3, 4]);
        let targets = tensor(&[0.0, 1.5, 7.0], &[3]);
        let err = try_cross_entropy(&logits, &targets, Default::default()).unwrap_err();
        assert_eq!(
            err,
            Error::Index {
                op: "cross_entropy",
                position: 1,
                value: 1.5,
                bound: 4
            }
        );
        // -100 is ignored by default, but not when nothing is ignored.
        let targets = tensor(&[0.0, -100.0, 3.0], &[3]);
        assert!(try_cross_entropy(&logits, &targets, Default::default()).is_ok());
        let strict = CrossEntropyOptions {
            ignore_index: None,
            ..Default::default()
        };
        let err = try_cross_entropy(&logits, &targets, strict).unwrap_err();
        assert_eq!(
            err.to_string(),
            "cross_entropy: index -100 at position 1 is out of range: expected an integer in 0..4"
        );
        let nan = tensor(&[f32::NAN, 0.0, 0.0], &[3]);
        assert!(matches!(
            try_nll_loss(&logits, &nan, Default::default()),
            Err(Error::Index { position: 0, .. })
        ));
    }

    #[test]
    fn label_smoothing_outside_unit_interval_is_an_error() {
        let logits = Tensor::zeros(&[1, 2]);
        let targets = tensor(&[0.0], &[1]);
        for eps in [-0.1, 1.5, f32::NAN] {
            let options = CrossEntropyOptions {
                label_smoothing: eps,
                ..Default::default()
            };
            let err = try_cross_entropy(&logits, &targets, options).unwrap_err();
            assert!(err.to_string().contains("label_smoothing"), "{err}");
        }
    }

    #[test]
    fn all_targets_ignored_gives_nan_mean_and_zero_gradient() {
        // PyTorch: the mean over no target is 0/0 = NaN; no row passes a
        // gradient.
        let logits = Tensor::zeros(&[2, 3]).requires_grad_(true);
        let targets = tensor(&[-100.0, -100.0], &[2]);
        let loss = try_cross_entropy(&logits, &targets, Default::default()).unwrap();
        assert!(loss.item().is_nan());
        loss.backward();
        assert_eq!(logits.grad().unwrap().to_vec(), vec![0.0; 6]);
    }

    #[test]
    fn cross_entropy_with_defaults_matches_the_plain_method() {
        let logits = tensor(&[0.5, -1.0, 2.0, 0.1, 0.2, 0.3], &[2, 3]);
        let targets = tensor(&[2.0, 0.0], &[2]);
        let plain = logits.cross_entropy(&targets).item();
        let with = cross_entropy(&logits, &targets, Default::default()).item();
        assert_eq!(plain, with);
    }

    #[test]
    fn cross_entropy_propagates_nan_logits() {
        let logits = tensor(&[f32::NAN, 0.0, 0.0, 0.0], &[2, 2]);
        let targets = tensor(&[1.0, 0.0], &[2]);
        let none = CrossEntropyOptions {
            reduction: Reduction::None,
            ..Default::default()
        };
        let rows = cross_entropy(&logits, &targets, none).to_vec();
        assert!(rows[0].is_nan());
        assert!((rows[1] - 2f32.ln()).abs() < 1e-6);
    }

    #[test]
    fn bce_with_logits_is_finite_at_200() {
        // max(x, 0) - x t + log1p(exp(-|x|)): 200 (t = 0) is exactly 200,
        // and the gradients σ(x) - t are exactly 1 and -1.
        let x = tensor(&[200.0, -200.0, 200.0], &[3]).requires_grad_(true);
        let t = tensor(&[0.0, 1.0, 1.0], &[3]).requires_grad_(true);
        let sum = BceWithLogitsOptions {
            reduction: Reduction::Sum,
            ..Default::default()
        };
        let loss = binary_cross_entropy_with_logits(&x, &t, sum);
        assert_eq!(loss.item(), 400.0);
        loss.backward();
        assert_eq!(x.grad().unwrap().to_vec(), vec![1.0, -1.0, 0.0]);
        // ∂/∂t = -x
        assert_eq!(t.grad().unwrap().to_vec(), vec![-200.0, 200.0, -200.0]);
    }

    #[test]
    fn bce_with_logits_rejects_mismatched_shapes_and_propagates_nan() {
        let x = Tensor::zeros(&[2, 3]);
        let err =
            try_binary_cross_entropy_with_logits(&x, &Tensor::zeros(&[3]), Default::default())
                .unwrap_err();
        assert_eq!(
            err.to_string(),
            "binary_cross_entropy_with_logits: shape mismatch, [2, 3] vs [3]"
        );
        let x = tensor(&[f32::NAN, 1.0], &[2]);
        let t = tensor(&[1.0, 0.0], &[2]);
        let none = BceWithLogitsOptions {
            reduction: Reduction::None,
            ..Default::default()
        };
        let loss = binary_cross_entropy_with_logits(&x, &t, none).to_vec();
        assert!(loss[0].is_nan() && loss[1].is_finite());
        // A weight that would enlarge the input is an error, not a broadcast.
        let weighted = BceWithLogitsOptions {
            weight: Some(Tensor::ones(&[3, 2])),
            ..Default::default()
        };
        assert!(matches!(
            try_binary_cross_entropy_with_logits(&x, &t, weighted),
            Err(Error::Broadcast { .. })
        ));
    }
}
