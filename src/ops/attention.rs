//! Scaled dot-product attention, as PyTorch's
//! `F.scaled_dot_product_attention`: for each batch (and head) index,
//! `softmax(q·kᵀ · scale + mask) · v`, with a real backward to the query,
//! key and value, and to an additive mask that requires grad.
//!
//! Per batch index the scores are one gemm (through
//! [`gemm`](crate::ops::gemm)), scaled and masked in place, turned into
//! probabilities `P` by a stable softmax per row, and multiplied with `v` by
//! a second gemm. `P` is saved for the backward:
//!
//! - `dV = Pᵀ · dO`, `dP = dO · Vᵀ`,
//! - `dS = P ∘ (dP − rowsum(dP ∘ P))` (the softmax's derivative),
//! - `dQ = scale · dS · K`, `dK = scale · dSᵀ · Q`, `dMask = dS`,
//!
//! each summed over the batch axes its operand was broadcast along.
//!
//! Forward and backward split the batch indices into pieces across the
//! caller's rayon pool when there is enough work (each index is computed
//! alone and writes its own matrices, so the bits do not depend on the
//! thread count; see [`vectorized`](super::vectorized)).
//!
//! # Masked rows, NaN and infinities
//!
//! Masking is additive, as PyTorch's: a boolean mask's false entries and
//! the causal mask's hidden entries add `-inf` to the score. So a NaN score
//! stays NaN even where it is masked (PyTorch gives NaN there too), and a
//! `+inf` entry of an additive mask makes its row NaN.
//!
//! A **fully masked row** (every score `-inf` after masking: a padded
//! query) has no key to attend to. netcl's rule: its output is 0 and its
//! gradients are 0. This is what `F.scaled_dot_product_attention` returns
//! in PyTorch 2.15 (CPU, float32 and float64); `nn.MultiheadAttention`
//! returns NaN instead. netcl takes the zeros because padded query rows are
//! ordinary in batched serving: a NaN there would poison every later
//! reduction over the batch (a loss, a pooled output) although the padded
//! rows carry no information. A row holding a NaN is NaN, masked or not.

use ndarray::{ArrayView2, ArrayViewD, ArrayViewMut2, Axis, Dimension, Ix2, IxDyn};

use crate::array::{broadcast_shape, checked_numel, reduce_to_shape};
use crate::autograd::function::{GraphGrads, InputGrads, record, with_graph};
use crate::error::{Error, Result, or_panic};
use crate::ops::gemm::gemm_into;
use crate::ops::graph::sum_to;
use crate::ops::vectorized::{for_each_piece, split_lengths};
use crate::tensor::{Data, Tensor};

/// An attention mask, as PyTorch's `attn_mask` of
/// [`scaled_dot_product_attention`]: broadcast to the scores' shape
/// `[..., L, S]`.
#[derive(Debug, Clone, Copy)]
pub enum AttnMask<'a> {
    /// A boolean mask (netcl's masks are `f32` tensors of 0 and 1): 1 means
    /// the query attends to the key, 0 means it does not, as PyTorch's
    /// `True` and `False`. It has no gradient.
    Bool(&'a Tensor),
    /// A float mask added to the scaled scores (`-inf` hides a key). Its
    /// gradient is computed when it requires grad.
    Additive(&'a Tensor),
}

impl AttnMask<'_> {
    fn tensor(&self) -> &Tensor {
        match self {
            AttnMask::Bool(t) | AttnMask::Additive(t) => t,
        }
    }
}

/// Scaled dot-product attention.
///
/// # Panics
///
/// As [`try_scaled_dot_product_attention`].
#[track_caller]
pub fn scaled_dot_product_attention(
    query: &Tensor,
    key: &Tensor,
    value: &Tensor,
    attn_mask: Option<AttnMask<'_>>,
    is_causal: bool,
    scale: Option<f32>,
) -> Tensor {
    or_panic(try_scaled_dot_product_attention(
        query, key, value, attn_mask, is_causal, scale,
    ))
}

/// Scaled dot-product attention, as PyTorch's
/// `F.scaled_dot_product_attention(query, key, value, attn_mask,
/// is_causal=is_causal, scale=scale)`:
/// `softmax(query · keyᵀ · scale + mask) · value`, with `query`
/// `[..., L, E]`, `key` `[..., S, E]` and `value` `[..., S, Ev]` (the value
/// width may differ from the key width) giving `[..., L, Ev]`. The leading
/// (batch, head) axes broadcast. `scale = None` is `1 / sqrt(E)`.
///
/// - `attn_mask`: [`AttnMask::Bool`] (1 = attend) or
///   [`AttnMask::Additive`] (added to the scores), broadcast to
///   `[..., L, S]`.
/// - `is_causal`: query `i` attends to keys `0..=i`, the top-left aligned
///   lower triangle `ones(L, S).tril()` that PyTorch uses, also when
///   `L ≠ S`.
///
/// Gradients flow to `query`, `key`, `value` and an additive mask, whichever
/// require grad.
///
/// # Masked rows, NaN and infinities
///
/// Masking is additive: a boolean mask's 0 entries and the keys the causal
/// mask hides add `-inf` to their scores.
///
/// - A **fully masked row** (every score `-inf`: a padded query) gives 0,
///   with gradient 0. PyTorch 2.15 is inconsistent here:
///   `F.scaled_dot_product_attention` returns zeros, `nn.MultiheadAttention`
///   NaN. netcl takes the zeros because padded query rows are ordinary in
///   batched serving, and a NaN there would poison every later reduction
///   over the batch (a loss, a pooled output) although the padded rows carry
///   no information.
/// - A **NaN** score makes its row NaN, masked or not (`NaN + -inf` is NaN),
///   as PyTorch's mask paths do; its causal kernels sometimes skip the
///   hidden keys instead, so a NaN hidden by `is_causal` may vanish there.
///   netcl never lets a NaN become a number.
/// - A `+inf` in an additive mask makes its row NaN (`inf - inf`).
///
/// Departures from PyTorch: no `dropout_p` argument (apply dropout to the
/// output or use a separate op: attention here is deterministic) and no
/// `enable_gqa`.
///
/// # Errors
///
/// [`Error::Rank`] if an operand has fewer than 2 axes;
/// [`Error::InvalidArgument`] if the widths of `query` and `key` differ, if
/// `key` and `value` have different lengths, if the mask does not
/// broadcast to `[..., L, S]`, if a boolean mask holds anything but 0 and
/// 1, or if both a mask and `is_causal` are given (as PyTorch);
/// [`Error::Broadcast`] if the batch axes do not broadcast;
/// [`Error::ShapeTooLarge`] if the result could not exist.
///
/// # Examples
///
/// ```
/// use netcl::Tensor;
/// use netcl::functional::{self as F, AttnMask};
///
/// // One query, two keys: with a zero query both keys weigh 1/2.
/// let q = Tensor::zeros(&[1, 1, 2]).requires_grad_(true);
/// let k = Tensor::from_vec(vec![1.0, 0.0, 0.0, 1.0], &[1, 2, 2])?;
/// let v = Tensor::from_vec(vec![2.0, 4.0], &[1, 2, 1])?.requires_grad_(true);
/// let y = F::try_scaled_dot_product_attention(&q, &k, &v, None, false, None)?;
/// assert_eq!(y.to_vec(), vec![3.0]);
/// y.sum().backward();
/// assert_eq!(v.grad().unwrap().to_vec(), vec![0.5, 0.5]); // dV = Pᵀ·dO
/// // dQ = scale · dS · K, dS = P ∘ (V - P·V) = [-0.5, 0.5]
/// let s = 0.5_f32.sqrt();
/// let dq = q.grad().unwrap().to_vec();
/// assert!((dq[0] + 0.5 * s).abs() < 1e-6 && (dq[1] - 0.5 * s).abs() < 1e-6);
///
/// // A boolean mask hiding the second key.
/// let mask = Tensor::from_vec(vec![1.0, 0.0], &[1, 2])?;
/// let y = F::try_scaled_dot_product_attention(&q, &k, &v, Some(AttnMask::Bool(&mask)), false, None)?;
/// assert_eq!(y.to_vec(), vec![2.0]);
/// # Ok::<(), netcl::Error>(())
/// ```
#[track_caller]
pub fn try_scaled_dot_product_attention(
    query: &Tensor,
    key: &Tensor,
    value: &Tensor,
    attn_mask: Option<AttnMask<'_>>,
    is_causal: bool,
    scale: Option<f32>,
) -> Result<Tensor> {
    const OP: &str = "scaled_dot_product_attention";
    let dims = check(query.shape(), key.shape(), value.shape(), attn_mask)?;
    if is_causal && attn_mask.is_some() {
        return Err(Error::InvalidArgument {
            op: OP,
            message: "an explicit attn_mask cannot be given with is_causal = true".into(),
        });
    }
    let scale = scale.unwrap_or(1.0 / (dims.e as f32).sqrt());
    // The mask as additive values of its own shape: a boolean mask's 0
    // becomes -inf.
    let mask = match attn_mask {
        None => None,
        Some(AttnMask::Additive(m)) => Some(m.read().into_data()),
        Some(AttnMask::Bool(m)) => {
            let keep = crate::array::mask(OP, m.read().to_vec())?;
            let additive = keep
                .iter()
                .map(|&k| if k { 0.0 } else { f32::NEG_INFINITY });
            Some(Data::collect(m.shape(), additive))
        }
    };
    let (q, k, v) = (
        query.read().into_data(),
        key.read().into_data(),
        value.read().into_data(),
    );
    let (l, s, ev) = (dims.l, dims.s, dims.ev);
    let batches = dims.batches();
    // P is not saved: the backward recomputes it, one batch index at a
    // time, into one L·S scratch per piece (as this loop does), which
    // keeps the graph L·S values per batch index smaller.
    let mut out = vec![0.0_f32; batches * l * ev];
    {
        let (qv, kv, vv) = (q.view(), k.view(), v.view());
        let (qb, kb, vb) = (
            dims.broadcast(&qv, l, dims.e),
            dims.broadcast(&kv, s, dims.e),
            dims.broadcast(&vv, s, ev),
        );
        let mv = mask.as_ref().map(Data::view);
        let mb = mv.as_ref().map(|m| dims.broadcast(m, l, s));
        if l * s > 0 {
            // Pieces of consecutive batch indices, on the caller's rayon
            // pool when large enough: each index is computed alone, so the
            // same bits on any thread count.
            let ranges = dims.pieces();
            let outs = split_lengths(&mut out, ranges.iter().map(|r| r.len() * l * ev));
            let pieces: Vec<_> = ranges.into_iter().zip(outs).collect();
            for_each_piece(pieces, dims.work(), |(range, out)| {
                let mut probs = vec![0.0_f32; l * s];
                for (j, b) in range.enumerate() {
                    let index = dims.index(b);
                    let mut p = ArrayViewMut2::from_shape((l, s), &mut probs[..])
                        .expect("a slice of L·S values");
                    probs_into(
                        matrix_at(&qb, &index),
                        matrix_at(&kb, &index),
                        mb.as_ref().map(|m| matrix_at(m, &index)),
                        scale,
                        is_causal,
                        p.view_mut(),
                    );
                    let o = ArrayViewMut2::from_shape((l, ev), &mut out[j * l * ev..][..l * ev])
                        .expect("a slice of L·Ev values");
                    gemm_into(p.view(), matrix_at(&vb, &index), o);
                }
            });
        }
    }
    let out = Data::from_vec(&dims.shape(l, ev), out);
    let mut inputs = vec![query, key, value];
    if let Some(AttnMask::Additive(m)) = attn_mask {
        inputs.push(m);
    }
    record(OP, &inputs, out, move |_: &Data| {
        let saved = Saved {
            q,
            k,
            v,
            mask,
            scale,
            causal: is_causal,
            dims,
        };
        with_graph(
            saved,
            |saved: &Saved, grad: Data, grads: &mut InputGrads<'_>| saved.backward(grad, grads),
            |saved: &Saved, grad: &Tensor, grads: &mut GraphGrads<'_>| {
                saved.backward_graph(grad, grads)
            },
        )
    })
}

/// The probabilities `P = softmax(scale·Q·Kᵀ + mask)` of one batch index
/// (`q` `[L, E]`, `k` `[S, E]`, `mask` `[L, S]`) written over `p`
/// `[L, S]`. Forward and backward both call it, so the backward's
/// recomputed `P` has forward's bits.
fn probs_into(
    q: ArrayView2<'_, f32>,
    k: ArrayView2<'_, f32>,
    mask: Option<ArrayView2<'_, f32>>,
    scale: f32,
    causal: bool,
    mut p: ArrayViewMut2<'_, f32>,
) {
    gemm_into(q, k.t(), p.view_mut());
    for (i, mut row) in p.rows_mut().into_iter().enumerate() {
        let row = row.as_slice_mut().expect("a row-major row");
        if causal {
            causal_softmax_row(row, scale, i);
        } else {
            mask_row(row, scale, mask.as_ref().map(|m| m.row(i)), None);
            softmax_row(row);
        }
    }
}

/// Scales a row of scores and adds the mask: the hidden keys of a causal
/// row `causal = Some(i)` (keys past `i`) and a boolean mask's false
/// entries get `-inf` added, so a NaN score stays NaN.
fn mask_row(
    row: &mut [f32],
    scale: f32,
    mask: Option<ndarray::ArrayView1<'_, f32>>,
    causal: Option<usize>,
) {
    row.iter_mut().for_each(|v| *v *= scale);
    if let Some(mask) = mask {
        row.iter_mut().zip(mask).for_each(|(v, m)| *v += m);
    }
    if let Some(i) = causal {
        row.iter_mut()
            .skip(i + 1)
            .for_each(|v| *v += f32::NEG_INFINITY);
    }
}

/// Row `i` of a causal attention's probabilities from its raw scores, in
/// place: as [`mask_row`] with `causal = Some(i)` then [`softmax_row`], with
/// the keys past `i` (probability 0) never exponentiated. They are only
/// scanned: a score there that scales to NaN or `+inf` would have made the
/// masked row NaN (`NaN - inf`, `inf - inf`), and still does.
fn causal_softmax_row(row: &mut [f32], scale: f32, i: usize) {
    let live = (i + 1).min(row.len());
    let (head, hidden) = row.split_at_mut(live);
    let spoiled = super::vectorized::dispatch(
        #[inline(always)]
        || {
            hidden.iter().fold(false, |bad, &v| {
                let v = v * scale;
                bad | v.is_nan() | (v == f32::INFINITY)
            })
        },
    );
    if spoiled {
        row.fill(f32::NAN);
        return;
    }
    hidden.fill(0.0);
    mask_row(head, scale, None, None);
    softmax_row(head);
}

/// Softmax of a row in place, stable (the maximum is subtracted). A row
/// whose maximum is `-inf` is fully masked and becomes 0; a NaN anywhere
/// makes the row NaN; a `+inf` gives the limits of
/// [`softmax`](crate::Tensor::try_softmax) (NaN at the `+inf` entries).
///
/// The maximum, the exponentials and the sum run in SIMD vectors
/// ([`vectorized`](super::vectorized)).
pub(crate) fn softmax_row(row: &mut [f32]) {
    use super::vectorized;
    let max = vectorized::dispatch(
        #[inline(always)]
        || vectorized::max_or_nan(row),
    );
    if max == f32::NEG_INFINITY {
        row.fill(0.0);
        return;
    }
    if !max.is_finite() {
        // NaN, or +inf: exp(v - max) is already the limit (0, or NaN for
        // inf - inf and NaN), -inf entries included.
        vectorized::map_in_place(row, |v| vectorized::exp(v - max));
        return;
    }
    // exp(-inf - max) is exactly 0: masked keys need no test.
    vectorized::softmax_finite_max(row, max);
}

/// Σ a·b over two rows (Σ a without `b`), in eight interleaved lanes.
#[inline(always)]
pub(crate) fn lane_dot(a: &[f32], b: Option<&[f32]>) -> f32 {
    let mut lanes = [0.0_f32; 8];
    let mut total = 0.0;
    match b {
        None => {
            let chunks = a.chunks_exact(8);
            total += chunks.remainder().iter().sum::<f32>();
            for chunk in chunks {
                for k in 0..8 {
                    lanes[k] += chunk[k];
                }
            }
        }
        Some(b) => {
            let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
            for (a, b) in ac.remainder().iter().zip(bc.remainder()) {
                total += a * b;
            }
            for (a, b) in ac.zip(bc) {
                for k in 0..8 {
                    lanes[k] += a[k] * b[k];
                }
            }
        }
    }
    total + lanes.iter().sum::<f32>()
}

/// The values of a new row-major array.
fn row_major(array: &mut ndarray::ArrayD<f32>) -> &mut [f32] {
    array.as_slice_mut().expect("a new row-major array")
}

/// Matrix `j` (`rows × cols`) of consecutive row-major matrices, to write.
fn matrix_mut(values: &mut [f32], j: usize, rows: usize, cols: usize) -> ArrayViewMut2<'_, f32> {
    let values = &mut values[j * rows * cols..][..rows * cols];
    ArrayViewMut2::from_shape((rows, cols), values).expect("a matrix's values")
}

/// The matrix of a broadcast operand at one batch index.
fn matrix_at<'a>(view: &ArrayViewD<'a, f32>, index: &[usize]) -> ArrayView2<'a, f32> {
    let mut view = view.clone();
    for &i in index {
        view = view.index_axis_move(Axis(0), i);
    }
    view.into_dimensionality::<Ix2>()
        .expect("two trailing axes")
}

/// Multiply-adds per piece of a split attention: enough to outweigh the
/// cost of handing a piece to another thread many times over.
const PIECE_WORK: usize = 1 << 18;

/// The validated sizes of an attention: the broadcast batch axes, `L`,
/// `S`, `E` and `Ev`.
struct Dims {
    batch: Vec<usize>,
    l: usize,
    s: usize,
    e: usize,
    ev: usize,
}

impl Dims {
    fn batches(&self) -> usize {
        self.batch.iter().product()
    }

    /// The batch axes followed by `rows, cols`.
    fn shape(&self, rows: usize, cols: usize) -> Vec<usize> {
        let mut shape = self.batch.clone();
        shape.extend([rows, cols]);
        shape
    }

    /// `view` broadcast to `[batch..., rows, cols]`.
    fn broadcast<'a>(
        &self,
        view: &'a ArrayViewD<'_, f32>,
        rows: usize,
        cols: usize,
    ) -> ArrayViewD<'a, f32> {
        view.broadcast(IxDyn(&self.shape(rows, cols)))
            .expect("checked to broadcast")
    }

    /// The batch indices in row-major order.
    fn indices(&self) -> impl Iterator<Item = Vec<usize>> + use<> {
        ndarray::indices(IxDyn(&self.batch))
            .into_iter()
            .map(|index| index.slice().to_vec())
    }

    /// The batch index at position `b` of the row-major order.
    fn index(&self, mut b: usize) -> Vec<usize> {
        let mut index = vec![0; self.batch.len()];
        for (i, &n) in self.batch.iter().enumerate().rev() {
            index[i] = b % n.max(1);
            b /= n.max(1);
        }
        index
    }

    /// Multiply-adds of the forward (two products per batch index).
    fn work(&self) -> usize {
        let per_index = (self.l * self.s).saturating_mul(self.e + self.ev);
        self.batches().saturating_mul(per_index)
    }

    /// Consecutive ranges of batch indices, the pieces a forward or
    /// backward splits into across the caller's rayon pool: about
    /// [`PIECE_WORK`] multiply-adds each, cut from the sizes alone.
    fn pieces(&self) -> Vec<std::ops::Range<usize>> {
        let per_index = (self.l * self.s).saturating_mul(self.e + self.ev).max(1);
        let per_piece = (PIECE_WORK / per_index).max(1);
        let batches = self.batches();
        (0..batches)
            .step_by(per_piece)
            .map(|b| b..(b + per_piece).min(batches))
            .collect()
    }
}

fn check(q: &[usize], k: &[usize], v: &[usize], mask: Option<AttnMask<'_>>) -> Result<Dims> {
    const OP: &str = "scaled_dot_product_attention";
    for (name, shape) in [("query", q), ("key", k), ("value", v)] {
        if shape.len() < 2 {
            return Err(Error::Rank {
                op: OP,
                expected: match name {
                    "query" => "a query [..., L, E] of at least 2 dimensions",
                    "key" => "a key [..., S, E] of at least 2 dimensions",
                    _ => "a value [..., S, Ev] of at least 2 dimensions",
                },
                shape: shape.to_vec(),
            });
        }
    }
    let split = |s: &[usize]| (s[..s.len() - 2].to_vec(), s[s.len() - 2], s[s.len() - 1]);
    let ((qb, l, e), (kb, s, ke), (vb, vs, ev)) = (split(q), split(k), split(v));
    if e != ke {
        return Err(Error::InvalidArgument {
            op: OP,
            message: format!(
                "query {q:?} and key {k:?} must have the same last dimension ({e} vs {ke})"
            ),
        });
    }
    if s != vs {
        return Err(Error::InvalidArgument {
            op: OP,
            message: format!("key {k:?} and value {v:?} must have the same length S ({s} vs {vs})"),
        });
    }
    let batch = broadcast_shape(OP, &qb, &kb)?;
    let batch = broadcast_shape(OP, batch.slice(), &vb)?.slice().to_vec();
    let dims = Dims { batch, l, s, e, ev };
    checked_numel(OP, &dims.shape(l, s))?;
    checked_numel(OP, &dims.shape(l, ev))?;
    if let Some(mask) = mask {
        let scores = dims.shape(l, s);
        let shape = mask.tensor().shape();
        let fits = shape.len() <= scores.len()
            && shape
                .iter()
                .rev()
                .zip(scores.iter().rev())
                .all(|(&m, &s)| m == s || m == 1);
        if !fits {
            return Err(Error::InvalidArgument {
                op: OP,
                message: format!(
                    "attn_mask of shape {shape:?} does not broadcast to the scores' shape {scores:?}"
                ),
            });
        }
    }
    Ok(dims)
}

/// What the backward saved: the operands, the mask and the scale (the
/// probabilities `P` are recomputed from them, one batch index at a time).
struct Saved {
    q: Data,
    k: Data,
    v: Data,
    /// The mask as additive values (a boolean mask's 0 as -inf).
    mask: Option<Data>,
    scale: f32,
    causal: bool,
    dims: Dims,
}

impl Saved {
    /// Per batch index: dV = Pᵀ·dO, dP = dO·Vᵀ,
    /// dS = P ∘ (dP − rowsum(dP ∘ P)), dQ = scale·dS·K, dK = scale·dSᵀ·Q,
    /// dMask = dS; then each summed to its operand's shape.
    fn backward(&self, mut grad: Data, grads: &mut InputGrads<'_>) {
        let Dims { l, s, e, ev, .. } = self.dims;
        let want_mask = grads.len() > 3 && grads.needs_grad(3);
        // dV is written over the incoming gradient when that has dV's shape
        // (L = S, V not broadcast) and is row-major and unshared: one
        // [batch..., S, Ev] buffer less. Batch b's dV goes into a scratch,
        // then over batch b's gradient once that has been read.
        let in_place = l == s
            && self.v.shape() == self.dims.shape(s, ev).as_slice()
            && grad.as_slice().is_some()
            && grad.is_unique();
        let (qv, kv, vv) = (self.q.view(), self.k.view(), self.v.view());
        let (qb, kb, vb) = (
            self.dims.broadcast(&qv, l, e),
            self.dims.broadcast(&kv, s, e),
            self.dims.broadcast(&vv, s, ev),
        );
        let zeros = |rows, cols| ndarray::ArrayD::<f32>::zeros(IxDyn(&self.dims.shape(rows, cols)));
        let (mut dq, mut dk) = (zeros(l, e), zeros(s, e));
        let mut dv = if in_place { zeros(0, 0) } else { zeros(s, ev) };
        let mut dmask = if want_mask { zeros(l, s) } else { zeros(0, 0) };
        let mv = self.mask.as_ref().map(Data::view);
        let mb = mv.as_ref().map(|m| self.dims.broadcast(m, l, s));
        if l * s > 0 {
            // Pieces of consecutive batch indices, on the caller's rayon
            // pool when large enough. Every batch index writes its own
            // matrices of dQ, dK, dV and dMask (of the broadcast shapes;
            // reduced to the operands' after), so the same bits on any
            // thread count.
            let ranges = self.dims.pieces();
            let lengths = |len: usize| ranges.iter().map(move |r| r.len() * len);
            let dqs = split_lengths(row_major(&mut dq), lengths(l * e));
            let dks = split_lengths(row_major(&mut dk), lengths(s * e));
            let dmasks: Vec<Option<&mut [f32]>> = if want_mask {
                split_lengths(row_major(&mut dmask), lengths(l * s))
                    .into_iter()
                    .map(Some)
                    .collect()
            } else {
                ranges.iter().map(|_| None).collect()
            };
            // dV's pieces: of dV, or of the incoming gradient itself.
            let (grad_view, dvs) = if in_place {
                let values = grad.view_mut().expect("checked unique");
                let values = values.into_slice().expect("checked row-major");
                (None, split_lengths(values, lengths(l * ev)))
            } else {
                let dvs = split_lengths(row_major(&mut dv), lengths(s * ev));
                (Some(grad.view()), dvs)
            };
            let pieces: Vec<_> = ranges
                .iter()
                .cloned()
                .zip(dqs)
                .zip(dks)
                .zip(dvs)
                .zip(dmasks)
                .collect();
            let work = self.dims.work().saturating_mul(2);
            for_each_piece(pieces, work, |((((range, dq), dk), dv), mut dmask)| {
                let mut ds = ndarray::Array2::<f32>::zeros((l, s));
                let mut p = ndarray::Array2::<f32>::zeros((l, s));
                let mut dv_scratch =
                    ndarray::Array2::<f32>::zeros(if in_place { (s, ev) } else { (0, 0) });
                for (j, b) in range.enumerate() {
                    let index = self.dims.index(b);
                    let (qi, ki, vi) = (
                        matrix_at(&qb, &index),
                        matrix_at(&kb, &index),
                        matrix_at(&vb, &index),
                    );
                    probs_into(
                        qi,
                        ki,
                        mb.as_ref().map(|m| matrix_at(m, &index)),
                        self.scale,
                        self.causal,
                        p.view_mut(),
                    );
                    let p = p.view();
                    let dv = &mut dv[j * s * ev..][..s * ev];
                    if in_place {
                        // Batch b's dV goes into a scratch, then over batch
                        // b's gradient once that has been read (L = S).
                        let g = ArrayView2::from_shape((l, ev), &*dv).expect("L·Ev values");
                        gemm_into(p.t(), g, dv_scratch.view_mut());
                        gemm_into(g, vi.t(), ds.view_mut());
                        dv.copy_from_slice(dv_scratch.as_slice().expect("a row-major matrix"));
                    } else {
                        let g = matrix_at(grad_view.as_ref().expect("not in place"), &index);
                        let dv = ArrayViewMut2::from_shape((s, ev), dv).expect("S·Ev values");
                        gemm_into(p.t(), g, dv);
                        gemm_into(g, vi.t(), ds.view_mut());
                    }
                    // dS = P ∘ (dP − rowsum(dP ∘ P)), times the scale unless
                    // the mask's gradient (unscaled) is wanted.
                    let scale = if want_mask { 1.0 } else { self.scale };
                    let ds_rows = ds.as_slice_mut().expect("a row-major matrix");
                    let p_rows = p.to_slice().expect("a row-major matrix");
                    super::vectorized::dispatch(
                        #[inline(always)]
                        || {
                            for (ds, p) in ds_rows.chunks_exact_mut(s).zip(p_rows.chunks_exact(s)) {
                                let dot = lane_dot(ds, Some(p));
                                for (d, &p) in ds.iter_mut().zip(p) {
                                    *d = p * (*d - dot) * scale;
                                }
                            }
                        },
                    );
                    if let Some(dmask) = dmask.as_deref_mut() {
                        dmask[j * l * s..][..l * s]
                            .copy_from_slice(ds.as_slice().expect("a row-major matrix"));
                        ds.mapv_inplace(|d| d * self.scale);
                    }
                    gemm_into(ds.view(), ki, matrix_mut(dq, j, l, e));
                    gemm_into(ds.t(), qi, matrix_mut(dk, j, s, e));
                }
            });
        }
        grads.set(0, reduce_to_shape(dq, self.q.shape()));
        grads.set(1, reduce_to_shape(dk, self.k.shape()));
        if in_place {
            grads.put(2, grad);
        } else {
            grads.set(2, reduce_to_shape(dv, self.v.shape()));
        }
        if let (true, Some(mask)) = (want_mask, &self.mask) {
            grads.set(3, reduce_to_shape(dmask, mask.shape()));
        }
    }

    /// Forward's probabilities `P` of every batch index, recomputed
    /// (`[batch..., L, S]`, row-major; `S > 0`).
    fn probs(&self) -> Vec<f32> {
        let Dims { l, s, e, .. } = self.dims;
        let mut probs = vec![0.0_f32; self.dims.batches() * l * s];
        let (qv, kv) = (self.q.view(), self.k.view());
        let (qb, kb) = (
            self.dims.broadcast(&qv, l, e),
            self.dims.broadcast(&kv, s, e),
        );
        let mv = self.mask.as_ref().map(Data::view);
        let mb = mv.as_ref().map(|m| self.dims.broadcast(m, l, s));
        if l * s > 0 {
            for (b, index) in self.dims.indices().enumerate() {
                let p = ArrayViewMut2::from_shape((l, s), &mut probs[b * l * s..][..l * s])
                    .expect("a slice of L·S values");
                probs_into(
                    matrix_at(&qb, &index),
                    matrix_at(&kb, &index),
                    mb.as_ref().map(|m| matrix_at(m, &index)),
                    self.scale,
                    self.causal,
                    p,
                );
            }
        }
        probs
    }

    /// [`backward`](Saved::backward) in recorded ops (`create_graph`), with
    /// `P` recomputed from the operands in recorded ops (a row whose keys
    /// are all hidden is held at 0, as in forward, with no gradient).
    fn backward_graph(&self, grad: &Tensor, grads: &mut GraphGrads<'_>) -> Result<()> {
        let Dims { l, s, .. } = self.dims;
        let q = grads.input(0, &self.q)?;
        let k = grads.input(1, &self.k)?;
        let v = grads.input(2, &self.v)?;
        let mut scores = q
            .try_matmul(&k.try_transpose(-1, -2)?)?
            .mul_scalar(self.scale);
        if let Some(mask) = &self.mask {
            let mask = if grads.len() > 3 {
                grads.input(3, mask)?
            } else {
                Tensor::from_data(mask.clone())
            };
            scores = scores.try_add(&mask)?;
        }
        if self.causal {
            let hidden = (0..l)
                .flat_map(|i| (0..s).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }));
            scores = scores.try_add(&Tensor::from_vec(hidden.collect(), &[l, s])?)?;
        }
        // The rows forward held at 0: all their keys hidden.
        let dead: Vec<f32> = if s == 0 {
            vec![0.0; self.dims.batches() * l]
        } else {
            self.probs()
                .chunks_exact(s)
                .map(|row| f32::from(row.iter().all(|&p| p == 0.0)))
                .collect()
        };
        let p = if dead.contains(&1.0) {
            let dead = Tensor::from_vec(dead, &self.dims.shape(l, 1))?;
            scores
                .try_masked_fill(&dead, 0.0)?
                .try_softmax(-1)?
                .try_masked_fill(&dead, 0.0)?
        } else {
            scores.try_softmax(-1)?
        };
        if grads.needs_grad(2) {
            let dv = p.try_transpose(-1, -2)?.try_matmul(grad)?;
            grads.set(2, sum_to(&dv, self.v.shape())?);
        }
        let dp = grad.try_matmul(&v.try_transpose(-1, -2)?)?;
        let dot = dp.try_mul(&p)?.try_sum_axis(-1, true)?;
        let ds = p.try_mul(&dp.try_sub(&dot)?)?;
        if grads.len() > 3
            && grads.needs_grad(3)
            && let Some(mask) = &self.mask
        {
            grads.set(3, sum_to(&ds, mask.shape())?);
        }
        let ds = ds.mul_scalar(self.scale);
        if grads.needs_grad(0) {
            grads.set(0, sum_to(&ds.try_matmul(&k)?, self.q.shape())?);
        }
        if grads.needs_grad(1) {
            let dk = ds.try_transpose(-1, -2)?.try_matmul(&q)?;
            grads.set(1, sum_to(&dk, self.k.shape())?);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(values: &[f32], shape: &[usize]) -> Tensor {
        Tensor::from_vec(values.to_vec(), shape).unwrap()
    }

    fn sdpa(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: Option<AttnMask<'_>>,
        causal: bool,
    ) -> Result<Tensor> {
        try_scaled_dot_product_attention(q, k, v, mask, causal, None)
    }

    #[test]
    fn a_fully_masked_row_is_zero_with_zero_gradients() {
        let q = t(&[0.5, -1.0, 2.0, 0.25], &[2, 2]).requires_grad_(true);
        let k = t(&[1.0, 0.0, 0.0, 1.0, 1.0, 1.0], &[3, 2]).requires_grad_(true);
        let v = t(&[1.0, 2.0, 3.0], &[3, 1]).requires_grad_(true);
        // Row 1 attends to nothing.
        let mask = t(&[1.0, 0.0, 1.0, 0.0, 0.0, 0.0], &[2, 3]);
        let y = sdpa(&q, &k, &v, Some(AttnMask::Bool(&mask)), false).unwrap();
        let out = y.to_vec();
        assert!(out[0].is_finite() && out[0] != 0.0);
        assert_eq!(out[1], 0.0);
        // Weighting only the masked row: no gradient reaches anything.
        (&y * &t(&[0.0, 1.0], &[2, 1])).sum().backward();
        assert_eq!(q.grad().unwrap().to_vec(), vec![0.0; 4]);
        assert_eq!(k.grad().unwrap().to_vec(), vec![0.0; 6]);
        assert_eq!(v.grad().unwrap().to_vec(), vec![0.0; 3]);
        // The same with an additive mask of -inf.
        let minf = f32::NEG_INFINITY;
        let add = t(&[0.0, minf, 0.0, minf, minf, minf], &[2, 3]);
        let z = sdpa(&q, &k, &v, Some(AttnMask::Additive(&add)), false).unwrap();
        assert_eq!(z.to_vec(), out);
    }

    #[test]
    fn a_nan_propagates_even_where_it_is_masked() {
        let q = t(&[1.0, 0.0], &[1, 2]);
        let k = t(&[1.0, 0.0, f32::NAN, 1.0], &[2, 2]);
        let v = t(&[1.0, 2.0], &[2, 1]);
        let mask = t(&[1.0, 0.0], &[1, 2]);
        let y = sdpa(&q, &k, &v, Some(AttnMask::Bool(&mask)), false).unwrap();
        assert!(y.item().is_nan());
        let q = t(&[f32::NAN, 0.0], &[1, 2]);
        assert!(sdpa(&q, &k, &v, None, true).unwrap().item().is_nan());
    }

    // PyTorch's is_causal: query i sees keys 0..=i (top-left aligned), also
    // when L ≠ S: with L = 2, S = 3 query 0 sees key 0 only, query 1 keys 0
    // and 1, and key 2 is never seen.
    #[test]
    fn causal_is_top_left_aligned() {
        let q = Tensor::zeros(&[2, 4]);
        let k = Tensor::zeros(&[3, 4]);
        let v = t(&[10.0, 20.0, 1000.0], &[3, 1]);
        let y = sdpa(&q, &k, &v, None, true).unwrap();
        assert_eq!(y.to_vec(), vec![10.0, 15.0]);
        // L > S: every later query sees all keys.
        let q = Tensor::zeros(&[4, 4]);
        let y = sdpa(&q, &k, &v, None, true).unwrap();
        assert_eq!(y.to_vec(), vec![10.0, 15.0, 1030.0 / 3.0, 1030.0 / 3.0]);
    }

    // is_causal gives what the same lower-triangular boolean mask gives,
    // values and gradients, with L ≠ S and a NaN hidden by it still
    // spreads.
    #[test]
    fn causal_agrees_with_the_explicit_mask() {
        let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(5);
        let (l, s) = (37, 29);
        let q = Tensor::randn(&[2, l, 8], &mut rng).requires_grad_(true);
        let k = Tensor::randn(&[2, s, 8], &mut rng).requires_grad_(true);
        let v = Tensor::randn(&[2, s, 3], &mut rng).requires_grad_(true);
        let tril: Vec<f32> = (0..l * s)
            .map(|x| if x % s <= x / s { 1.0 } else { 0.0 })
            .collect();
        let tril = t(&tril, &[l, s]);
        let a = sdpa(&q, &k, &v, None, true).unwrap();
        let b = sdpa(&q, &k, &v, Some(AttnMask::Bool(&tril)), false).unwrap();
        let close = |x: Vec<f32>, y: Vec<f32>| x.iter().zip(&y).all(|(x, y)| (x - y).abs() < 1e-5);
        assert!(close(a.to_vec(), b.to_vec()));
        let ga = crate::autograd::grad(&[&a.sum()], &[&q, &k, &v]).unwrap();
        let gb = crate::autograd::grad(&[&b.sum()], &[&q, &k, &v]).unwrap();
        for (ga, gb) in ga.iter().zip(&gb) {
            assert!(close(ga.to_vec(), gb.to_vec()));
        }
        let mut hidden = k.to_vec();
        hidden[(s - 1) * 8] = f32::NAN;
        let k = t(&hidden, &[2, s, 8]);
        assert!(sdpa(&q, &k, &v, None, true).unwrap().to_vec()[0].is_nan());
    }

    #[test]
    fn an_additive_mask_gradient_is_summed_to_its_shape() {
        let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(3);
        let q = Tensor::randn(&[2, 3, 4, 5], &mut rng);
        let k = Tensor::randn(&[2, 3, 6, 5], &mut rng);
        let v = Tensor::randn(&[2, 3, 6, 2], &mut rng);
        let mask = Tensor::randn(&[3, 1, 6], &mut rng).requires_grad_(true);
        let y = sdpa(&q, &k, &v, Some(AttnMask::Additive(&mask)), false).unwrap();
        y.sum().backward();
        let grad = mask.grad().unwrap();
        assert_eq!(grad.shape(), &[3, 1, 6]);
        // Adding a constant to a whole row leaves the softmax unchanged:
        // each row of dMask sums to 0.
        for row in grad.to_vec().chunks(6) {
            assert!(row.iter().sum::<f32>().abs() < 1e-4, "{row:?}");
            assert!(row.iter().any(|&g| g != 0.0));
        }
    }

    #[test]
    fn errors_name_the_op_and_what_was_wrong() {
        let q = Tensor::zeros(&[2, 3, 4]);
        let k = Tensor::zeros(&[2, 5, 4]);
        let v = Tensor::zeros(&[2, 5, 6]);
        let bad_k = Tensor::zeros(&[2, 5, 3]);
        assert_eq!(
            sdpa(&q, &bad_k, &v, None, false).unwrap_err().to_string(),
            "scaled_dot_product_attention: query [2, 3, 4] and key [2, 5, 3] must have the same last dimension (4 vs 3)"
        );
        let bad_v = Tensor::zeros(&[2, 4, 6]);
        assert_eq!(
            sdpa(&q, &k, &bad_v, None, false).unwrap_err().to_string(),
            "scaled_dot_product_attention: key [2, 5, 4] and value [2, 4, 6] must have the same length S (5 vs 4)"
        );
        let mask = t(&[1.0, 0.5, 1.0, 1.0, 1.0], &[1, 5]);
        assert_eq!(
            sdpa(&q, &k, &v, Some(AttnMask::Bool(&mask)), false)
                .unwrap_err()
                .to_string(),
            "scaled_dot_product_attention: mask value 0.5 at position 1: a mask holds 0 (false) or 1 (true)"
        );
        let wide = Tensor::zeros(&[3, 6]);
        assert_eq!(
            sdpa(&q, &k, &v, Some(AttnMask::Additive(&wide)), false)
                .unwrap_err()
                .to_string(),
            "scaled_dot_product_attention: attn_mask of shape [3, 6] does not broadcast to the scores' shape [2, 3, 5]"
        );
        let ok = Tensor::zeros(&[3, 5]);
        assert!(
            sdpa(&q, &k, &v, Some(AttnMask::Additive(&ok)), true)
                .unwrap_err()
                .to_string()
                .contains("cannot be given with is_causal")
        );
        assert!(matches!(
            sdpa(&Tensor::zeros(&[4]), &k, &v, None, false),
            Err(Error::Rank { .. })
        ));
    }
}
