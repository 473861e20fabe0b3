//! Normalisation: `layer_norm`, `rms_norm` and `batch_norm`, as PyTorch's
//! `F.layer_norm`, `F.rms_norm` and `F.batch_norm`.
//!
//! Each is one fused op (one output buffer, one graph node) whose backward
//! gives the gradient of every input that requires grad: the input, and the
//! weight and bias when given (a fused fast path that drops a gradient is
//! the bug class candle keeps meeting: candle#3011, #3569, #2168). Forward
//! and backward run per row (per channel for `batch_norm`) in one pass over
//! the saved statistics, mean and `rstd = 1 / sqrt(var + eps)`.
//!
//! With `x̂ = (x - mean) · rstd`, `y = x̂ · w + b` and `ĝ = g · w` for the
//! incoming gradient `g`, over a group of `n` values normalised together:
//!
//! - `dx = rstd · (ĝ - mean(ĝ) - x̂ · mean(ĝ · x̂))` (the two mean terms are
//!   the derivative through the group's mean and variance; `rms_norm` has
//!   no mean, so no `mean(ĝ)` term; `batch_norm` in eval mode normalises
//!   with constants, so neither);
//! - `dw = Σ g · x̂`, `db = Σ g` over the rows (or over batch and space).
//!
//! NaN and infinities propagate: a group holding one has a NaN (or
//! infinite) mean or variance, so its whole output and gradient are NaN.

use crate::array::checked_numel;
use crate::autograd::function::{GraphGrads, InputGrads, record, with_graph};
use crate::error::{Error, Result, or_panic};
use crate::tensor::{Data, Tensor};

/// Σ f(a_i, b_i) over two slices of one length, in eight interleaved f32
/// lanes (vectorised by the compiler inside
/// [`dispatch`](super::vectorized::dispatch), and more accurate than one
/// running sum).
#[inline(always)]
fn sum_zip(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut lanes = [0.0_f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (a, b) in ac.zip(bc) {
        for k in 0..8 {
            lanes[k] += f(a[k], b[k]);
        }
    }
    let mut total = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5]))
        + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
    for (&a, &b) in ar.iter().zip(br) {
        total += f(a, b);
    }
    total
}

/// Σ f(a_i) over a slice, as [`sum_zip`].
#[inline(always)]
fn sum_map(a: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    sum_zip(a, a, |a, _| f(a))
}

/// Lanes of the row kernels' sums: one AVX-512 vector, two AVX2 ones, four
/// SSE2 ones. Fixed (not the dispatched vector width), so a row's sums add
/// in the same order, and give the same bits, on every CPU.
const LANES: usize = 16;

/// The sum of `lanes`, added pairwise in a fixed order.
#[inline(always)]
fn lane_total(lanes: [f32; LANES]) -> f32 {
    let mut half = [0.0_f32; LANES / 2];
    for k in 0..LANES / 2 {
        half[k] = lanes[k] + lanes[k + LANES / 2];
    }
    let mut quarter = [0.0_f32; LANES / 4];
    for k in 0..LANES / 4 {
        quarter[k] = half[k] + half[k + LANES / 4];
    }
    (quarter[0] + quarter[2]) + (quarter[1] + quarter[3])
}

/// Σ (v - shift) over `row`, or Σ (v - shift)² with `square`, in
/// [`LANES`] lanes (one vector register each under AVX-512: the eight-lane
/// [`sum_map`] came out as 128-bit shuffles here). `shift = 0` gives the
/// plain sum: `v - 0.0` is `v`, for every `v`.
#[inline(always)]
fn row_sum(row: &[f32], shift: f32, square: bool) -> f32 {
    let (chunks, tail) = row.as_chunks::<LANES>();
    let body = &row[..chunks.len() * LANES];
    #[cfg(not(loom))]
    let lanes = pulp::Arch::new().dispatch(RowSum {
        body,
        shift,
        square,
    });
    #[cfg(loom)]
    let lanes = row_sum_lanes(body, shift, square);
    let mut total = lane_total(lanes);
    for &v in tail {
        let d = v - shift;
        total += if square { d * d } else { d };
    }
    total
}

/// [`row_sum`]'s lanes over `body` (a whole number of [`LANES`] chunks),
/// lane `k` summing the values at `k`, `k + LANES`, ...
#[inline(always)]
fn row_sum_lanes(body: &[f32], shift: f32, square: bool) -> [f32; LANES] {
    let mut lanes = [0.0_f32; LANES];
    for chunk in body.as_chunks::<LANES>().0 {
        for k in 0..LANES {
            let d = chunk[k] - shift;
            lanes[k] += if square { d * d } else { d };
        }
    }
    lanes
}

/// [`row_sum_lanes`] in explicit vectors: the same lanes, added in the
/// same order (so the same bits), held in one AVX-512 register or two AVX2
/// ones. Left to the compiler, the lane array stayed in memory or came out
/// as 128-bit shuffles.
#[cfg(not(loom))]
struct RowSum<'a> {
    body: &'a [f32],
    shift: f32,
    square: bool,
}

#[cfg(not(loom))]
impl pulp::WithSimd for RowSum<'_> {
    type Output = [f32; LANES];

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, simd: S) -> [f32; LANES] {
        let RowSum {
            body,
            shift,
            square,
        } = self;
        let (vectors, _) = S::as_simd_f32s(body);
        let shift_v = simd.splat_f32s(shift);
        let zero = simd.splat_f32s(0.0);
        match LANES / S::F32_LANES {
            1 => {
                let mut a = zero;
                for &v in vectors {
                    a = simd.add_f32s(a, deviation(simd, v, shift_v, square));
                }
                lanes_of::<S>(&[a])
            }
            2 => {
                let (mut a, mut b) = (zero, zero);
                for pair in vectors.as_chunks::<2>().0 {
                    a = simd.add_f32s(a, deviation(simd, pair[0], shift_v, square));
                    b = simd.add_f32s(b, deviation(simd, pair[1], shift_v, square));
                }
                lanes_of::<S>(&[a, b])
            }
            _ => row_sum_lanes(body, shift, square),
        }
    }
}

/// `v - shift`, squared with `square`.
#[cfg(not(loom))]
#[inline(always)]
fn deviation<S: pulp::Simd>(simd: S, v: S::f32s, shift: S::f32s, square: bool) -> S::f32s {
    let d = simd.sub_f32s(v, shift);
    if square { simd.mul_f32s(d, d) } else { d }
}

/// The [`LANES`] values of `vectors` (one AVX-512 or two AVX2 registers).
#[cfg(not(loom))]
#[inline(always)]
fn lanes_of<S: pulp::Simd>(vectors: &[S::f32s]) -> [f32; LANES] {
    let mut lanes = [0.0_f32; LANES];
    lanes.copy_from_slice(pulp::bytemuck::cast_slice(vectors));
    lanes
}

/// One row of `layer_norm` / `rms_norm`'s forward: `out`, a copy of `x`,
/// normalised in place; returns the row's mean (0
/// without `center`) and rstd.
#[inline(always)]
fn forward_row(
    x: &[f32],
    out: &mut [f32],
    weight: Option<&[f32]>,
    bias: Option<&[f32]>,
    eps: f32,
    center: bool,
) -> (f32, f32) {
    let n = x.len() as f32;
    // Two passes (mean, then squared deviations): no cancellation.
    let mean = if center {
        row_sum(x, 0.0, false) / n
    } else {
        0.0
    };
    let var = row_sum(x, mean, true) / n;
    let rstd = 1.0 / (var + eps).sqrt();
    match (weight, bias) {
        (Some(w), Some(b)) => {
            for ((o, &w), &b) in out.iter_mut().zip(w).zip(b) {
                *o = (*o - mean) * rstd * w + b;
            }
        }
        (Some(w), None) => {
            for (o, &w) in out.iter_mut().zip(w) {
                *o = (*o - mean) * rstd * w;
            }
        }
        (None, Some(b)) => {
            for (o, &b) in out.iter_mut().zip(b) {
                *o = (*o - mean) * rstd + b;
            }
        }
        (None, None) => {
            for o in out.iter_mut() {
                *o = (*o - mean) * rstd;
            }
        }
    }
    (mean, rstd)
}

/// One row of `layer_norm` / `rms_norm`'s backward: with
/// `x̂ = (x - mean)·rstd` and `ĝ = g·w`, adds `g·x̂` to `dw` and `g` to
/// `db` (with `want_wb`), and overwrites `g` with
/// `rstd·(ĝ - mean(ĝ) - x̂·mean(ĝ·x̂))` (no `mean(ĝ)` term without
/// `center`). One pass for the two sums (and `dw`, `db`) in [`LANES`]
/// lanes, one for `dx`.
#[allow(
    clippy::too_many_arguments,
    reason = "one row's state, inlined into the dispatched loop"
)]
#[inline(always)]
fn backward_row(
    x: &[f32],
    g: &mut [f32],
    w: &[f32],
    (mean, rstd): (f32, f32),
    center: bool,
    want_wb: bool,
    dw: &mut [f32],
    db: &mut [f32],
) {
    let n = x.len() as f32;
    let (xc, xt) = x.as_chunks::<LANES>();
    let body = xc.len() * LANES;
    let (gt, wt) = (&g[body..], &w[body..]);
    // Σ ĝ and Σ ĝ·(x - mean), lane by lane.
    let sums = RowSums {
        x: &x[..body],
        g: &g[..body],
        w: &w[..body],
        wb: want_wb.then(|| (&mut dw[..body], &mut db[..body])),
        mean,
        rstd,
    };
    #[cfg(not(loom))]
    let (sg, sgx) = pulp::Arch::new().dispatch(sums);
    #[cfg(loom)]
    let (sg, sgx) = sums.lanes();
    let (mut sum_g, mut sum_gx) = (lane_total(sg), lane_total(sgx));
    let (dwt, dbt) = (&mut dw[body..], &mut db[body..]);
    for ((((&x, &g), &w), dw), db) in xt.iter().zip(gt).zip(wt).zip(dwt).zip(dbt) {
        let xm = x - mean;
        sum_g += g * w;
        sum_gx += g * w * xm;
        if want_wb {
            *dw += g * xm * rstd;
            *db += g;
        }
    }
    let a = if center { sum_g / n } else { 0.0 };
    let b = sum_gx * rstd / n;
    for ((g, &w), &x) in g.iter_mut().zip(w).zip(x) {
        *g = rstd * (*g * w - a - (x - mean) * rstd * b);
    }
}

/// The first pass of [`backward_row`] over the whole [`LANES`] chunks of a
/// row: the lanes of Σ ĝ and Σ ĝ·(x - mean), and (with `wb`) `g·x̂` added
/// to `dw` and `g` to `db`.
struct RowSums<'a> {
    x: &'a [f32],
    g: &'a [f32],
    w: &'a [f32],
    wb: Option<(&'a mut [f32], &'a mut [f32])>,
    mean: f32,
    rstd: f32,
}

impl RowSums<'_> {
    /// The pass lane by lane, as plain arrays.
    #[inline(always)]
    fn lanes(self) -> ([f32; LANES], [f32; LANES]) {
        let (mean, rstd) = (self.mean, self.rstd);
        let (mut sg, mut sgx) = ([0.0_f32; LANES], [0.0_f32; LANES]);
        let chunks = self.x.as_chunks::<LANES>().0;
        let chunks = chunks.iter().zip(self.g.as_chunks::<LANES>().0);
        let chunks = chunks.zip(self.w.as_chunks::<LANES>().0);
        match self.wb {
            Some((dw, db)) => {
                let dw = dw.as_chunks_mut::<LANES>().0;
                let db = db.as_chunks_mut::<LANES>().0;
                for (((x, g), w), (dw, db)) in chunks.zip(dw.iter_mut().zip(db)) {
                    for k in 0..LANES {
                        let (xm, gw) = (x[k] - mean, g[k] * w[k]);
                        sg[k] += gw;
                        sgx[k] += gw * xm;
                        dw[k] += g[k] * xm * rstd;
                        db[k] += g[k];
                    }
                }
            }
            None => {
                for ((x, g), w) in chunks {
                    for k in 0..LANES {
                        let (xm, gw) = (x[k] - mean, g[k] * w[k]);
                        sg[k] += gw;
                        sgx[k] += gw * xm;
                    }
                }
            }
        }
        (sg, sgx)
    }
}

/// [`RowSums::lanes`] in explicit vectors (the same lanes in the same
/// order, as [`RowSum`]): the compiler kept the two lane arrays in memory,
/// stored and reloaded on every chunk.
#[cfg(not(loom))]
impl pulp::WithSimd for RowSums<'_> {
    type Output = ([f32; LANES], [f32; LANES]);

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, simd: S) -> Self::Output {
        let per = LANES / S::F32_LANES;
        if per != 1 && per != 2 {
            return self.lanes();
        }
        let (x, _) = S::as_simd_f32s(self.x);
        let (g, _) = S::as_simd_f32s(self.g);
        let (w, _) = S::as_simd_f32s(self.w);
        let (mean, rstd) = (simd.splat_f32s(self.mean), simd.splat_f32s(self.rstd));
        let zero = simd.splat_f32s(0.0);
        // Lanes 0..F32_LANES in `a`, and (AVX2) F32_LANES..16 in `b`.
        let (mut a, mut b) = ((zero, zero), (zero, zero));
        match (self.wb, per) {
            (Some((dw, db)), _) => {
                let (dw, _) = S::as_mut_simd_f32s(dw);
                let (db, _) = S::as_mut_simd_f32s(db);
                if per == 1 {
                    for i in 0..x.len() {
                        let xm;
                        (a, xm) = backward_step(simd, (x[i], g[i], w[i]), mean, a);
                        (dw[i], db[i]) = weight_step(simd, g[i], xm, rstd, (dw[i], db[i]));
                    }
                } else {
                    for i in (0..x.len()).step_by(2) {
                        let (xm0, xm1);
                        (a, xm0) = backward_step(simd, (x[i], g[i], w[i]), mean, a);
                        (b, xm1) = backward_step(simd, (x[i + 1], g[i + 1], w[i + 1]), mean, b);
                        (dw[i], db[i]) = weight_step(simd, g[i], xm0, rstd, (dw[i], db[i]));
                        (dw[i + 1], db[i + 1]) =
                            weight_step(simd, g[i + 1], xm1, rstd, (dw[i + 1], db[i + 1]));
                    }
                }
            }
            (None, 1) => {
                for i in 0..x.len() {
                    a = backward_step(simd, (x[i], g[i], w[i]), mean, a).0;
                }
            }
            (None, _) => {
                for i in (0..x.len()).step_by(2) {
                    a = backward_step(simd, (x[i], g[i], w[i]), mean, a).0;
                    b = backward_step(simd, (x[i + 1], g[i + 1], w[i + 1]), mean, b).0;
                }
            }
        }
        let (sg, sgx) = ([a.0, b.0], [a.1, b.1]);
        (lanes_of::<S>(&sg[..per]), lanes_of::<S>(&sgx[..per]))
    }
}

/// One vector of [`RowSums`]: `(Σ ĝ, Σ ĝ·(x - mean))` updated, and
/// `x - mean`.
#[cfg(not(loom))]
#[inline(always)]
fn backward_step<S: pulp::Simd>(
    simd: S,
    (x, g, w): (S::f32s, S::f32s, S::f32s),
    mean: S::f32s,
    (sg, sgx): (S::f32s, S::f32s),
) -> ((S::f32s, S::f32s), S::f32s) {
    let (xm, gw) = (simd.sub_f32s(x, mean), simd.mul_f32s(g, w));
    let sums = (
        simd.add_f32s(sg, gw),
        simd.add_f32s(sgx, simd.mul_f32s(gw, xm)),
    );
    (sums, xm)
}

/// One vector of [`RowSums`]' `dw += g·(x - mean)·rstd`, `db += g`.
#[cfg(not(loom))]
#[inline(always)]
fn weight_step<S: pulp::Simd>(
    simd: S,
    g: S::f32s,
    xm: S::f32s,
    rstd: S::f32s,
    (dw, db): (S::f32s, S::f32s),
) -> (S::f32s, S::f32s) {
    let dw = simd.add_f32s(dw, simd.mul_f32s(simd.mul_f32s(g, xm), rstd));
    (dw, simd.add_f32s(db, g))
}

/// The values of `data` in row-major order: its own buffer when it has
/// that layout, else a contiguous copy (a transposed input).
fn contiguous(data: Data) -> Data {
    if data.as_slice().is_some() {
        data
    } else {
        Data::from_vec(data.shape(), data.to_vec())
    }
}

/// The values as a slice (the caller made them row-major).
fn slice(data: &Data) -> &[f32] {
    data.as_slice().expect("row-major values")
}

/// Optional weight and bias read once, as row-major vectors.
fn read_opt(t: Option<&Tensor>) -> Option<Vec<f32>> {
    t.map(|t| t.read().to_vec())
}

/// The inputs of a normalisation op, `[input, weight?, bias?]`, with the
/// position of the weight and bias among them.
struct Inputs<'a> {
    tensors: Vec<&'a Tensor>,
    weight: Option<usize>,
    bias: Option<usize>,
}

impl<'a> Inputs<'a> {
    fn new(input: &'a Tensor, weight: Option<&'a Tensor>, bias: Option<&'a Tensor>) -> Self {
        let mut tensors = vec![input];
        let weight = weight.map(|w| {
            tensors.push(w);
            tensors.len() - 1
        });
        let bias = bias.map(|b| {
            tensors.push(b);
            tensors.len() - 1
        });
        Inputs {
            tensors,
            weight,
            bias,
        }
    }
}

fn needs(grads: &InputGrads<'_>, slot: Option<usize>) -> bool {
    slot.is_some_and(|i| grads.needs_grad(i))
}

/// Checks `normalized_shape` against the input's trailing axes and the
/// optional weight and bias; returns `(rows, width)`: the number of groups
/// and the number of values normalised together.
fn check_normalized(
    op: &'static str,
    input: &[usize],
    normalized_shape: &[usize],
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
) -> Result<(usize, usize)> {
    if normalized_shape.is_empty() {
        return Err(Error::InvalidArgument {
            op,
            message: "normalized_shape must have at least one element, got []".into(),
        });
    }
    let k = normalized_shape.len();
    if input.len() < k || input[input.len() - k..] != *normalized_shape {
        return Err(Error::InvalidArgument {
            op,
            message: format!(
                "an input of shape {input:?} does not end with normalized_shape {normalized_shape:?}"
            ),
        });
    }
    for (name, t) in [("weight", weight), ("bias", bias)] {
        if let Some(t) = t
            && t.shape() != normalized_shape
        {
            return Err(Error::InvalidArgument {
                op,
                message: format!(
                    "{name} of shape {:?} must have normalized_shape {normalized_shape:?}",
                    t.shape()
                ),
            });
        }
    }
    // The input exists, so these products fit.
    let width = checked_numel(op, normalized_shape)?;
    let rows = checked_numel(op, &input[..input.len() - k])?;
    Ok((rows, width))
}

/// Rows per block when a row norm's forward or backward splits across the
/// caller's rayon pool. Fixed, so the backward's weight and bias gradients
/// (summed per block, then over the blocks in order) have the same bits on
/// any thread count.
const ROW_BLOCK: usize = 128;

/// A row norm's price per value in simple operations, for
/// [`should_split`](super::vectorized::should_split).
const ROW_COST: usize = 6;

/// The forward of `layer_norm` (`center`) and `rms_norm` (not `center`) over
/// rows of `width` values: the output, and each row's mean (0 for
/// `rms_norm`) and rstd.
fn row_norm_forward(
    x: &[f32],
    width: usize,
    weight: Option<&[f32]>,
    bias: Option<&[f32]>,
    eps: f32,
    center: bool,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    if x.is_empty() || width == 0 {
        return (vec![0.0; x.len()], Vec::new(), Vec::new());
    }
    // Written once, not zeroed first; from this thread's buffer cache.
    let mut out = crate::storage::cache::take(x.len());
    let rows = x.len() / width;
    let (mut means, mut rstds) = (Vec::with_capacity(rows), Vec::with_capacity(rows));
    let work = x.len().saturating_mul(ROW_COST);
    if rows > ROW_BLOCK && super::vectorized::should_split(work) {
        // Blocks of rows on the caller's rayon pool (each row computed
        // alone, so the same bits on any thread count), appended in order.
        let blocks = x.chunks(ROW_BLOCK * width).collect();
        let parts = super::vectorized::map_pieces(blocks, work, |x| {
            let rows = x.len() / width;
            let mut part = (
                Vec::with_capacity(x.len()),
                Vec::with_capacity(rows),
                Vec::with_capacity(rows),
            );
            super::vectorized::dispatch(
                #[inline(always)]
                || {
                    let (out, means, rstds) = &mut part;
                    row_norm_forward_rows(x, width, weight, bias, eps, center, out, means, rstds)
                },
            );
            part
        });
        for (o, m, r) in parts {
            out.extend_from_slice(&o);
            means.extend_from_slice(&m);
            rstds.extend_from_slice(&r);
        }
        return (out, means, rstds);
    }
    // Every row's loops compiled for the widest SIMD extension this CPU has.
    super::vectorized::dispatch(
        #[inline(always)]
        || {
            row_norm_forward_rows(
                x, width, weight, bias, eps, center, &mut out, &mut means, &mut rstds,
            )
        },
    );
    (out, means, rstds)
}

/// The rows of [`row_norm_forward`], appended to `out`, `means` and
/// `rstds`.
#[allow(
    clippy::too_many_arguments,
    reason = "the forward's state, split out to be dispatched"
)]
#[inline(always)]
fn row_norm_forward_rows(
    x: &[f32],
    width: usize,
    weight: Option<&[f32]>,
    bias: Option<&[f32]>,
    eps: f32,
    center: bool,
    out: &mut Vec<f32>,
    means: &mut Vec<f32>,
    rstds: &mut Vec<f32>,
) {
    for x in x.chunks_exact(width) {
        // The row copied, then normalised in place.
        let start = out.len();
        out.extend_from_slice(x);
        let (mean, rstd) = forward_row(x, &mut out[start..], weight, bias, eps, center);
        means.push(mean);
        rstds.push(rstd);
    }
}

/// What a `layer_norm` or `rms_norm` backward saved: the (row-major)
/// input, the weight, and each row's mean and rstd.
struct RowNorm {
    x: Data,
    normalized: Vec<usize>,
    weight: Option<Vec<f32>>,
    means: Vec<f32>,
    rstds: Vec<f32>,
    center: bool,
    eps: f32,
    slots: (Option<usize>, Option<usize>),
}

impl RowNorm {
    /// Per row, with `x̂ = (x - mean)·rstd` and `ĝ = g·w`:
    /// dx = rstd·(ĝ - mean(ĝ) - x̂·mean(ĝ·x̂)) (no `mean(ĝ)` term for
    /// `rms_norm`), dw = Σ_rows g·x̂, db = Σ_rows g.
    fn backward(&self, grad: Data, grads: &mut InputGrads<'_>) {
        let (w_slot, b_slot) = self.slots;
        let (want_x, want_w, want_b) = (
            grads.needs_grad(0),
            needs(grads, w_slot),
            needs(grads, b_slot),
        );
        // dx is written over the incoming gradient when no one shares it
        // (no new buffer), row by row after the row has been read.
        let mut grad = contiguous(grad);
        if grad.view_mut().is_none() {
            grad = Data::from_vec(grad.shape(), grad.to_vec());
        }
        let shape = grad.shape().to_vec();
        let g = grad
            .view_mut()
            .expect("made unique")
            .into_slice()
            .expect("row-major values");
        let x = slice(&self.x);
        let width = self.normalized.iter().product::<usize>();
        let mut dw = vec![0.0; width];
        let mut db = vec![0.0; width];
        if width > 0 && !x.is_empty() {
            let want_wb = want_w || want_b;
            let ones;
            let w = match &self.weight {
                Some(w) => w.as_slice(),
                None => {
                    ones = vec![1.0; width];
                    &ones
                }
            };
            // Blocks of ROW_BLOCK rows, on the caller's rayon pool when
            // large enough: each block's dw and db summed row by row, then
            // the blocks' sums in order (one block: the plain row loop).
            let blocks: Vec<_> = x
                .chunks(ROW_BLOCK * width)
                .zip(g.chunks_mut(ROW_BLOCK * width))
                .enumerate()
                .collect();
            let work = x.len().saturating_mul(ROW_COST);
            let sums = super::vectorized::map_pieces(blocks, work, |(block, (x, g))| {
                let (mut dw, mut db) = (vec![0.0; width], vec![0.0; width]);
                // Every row's loops compiled for the widest SIMD extension.
                super::vectorized::dispatch(
                    #[inline(always)]
                    || {
                        let rows = x.chunks_exact(width).zip(g.chunks_exact_mut(width));
                        for (r, (x, g)) in rows.enumerate() {
                            let r = block * ROW_BLOCK + r;
                            let stats = (self.means[r], self.rstds[r]);
                            backward_row(x, g, w, stats, self.center, want_wb, &mut dw, &mut db);
                        }
                    },
                );
                (dw, db)
            });
            let mut sums = sums.into_iter();
            if let Some((first_w, first_b)) = sums.next() {
                (dw, db) = (first_w, first_b);
                for (block_w, block_b) in sums {
                    dw.iter_mut().zip(&block_w).for_each(|(s, v)| *s += v);
                    db.iter_mut().zip(&block_b).for_each(|(s, v)| *s += v);
                }
            }
        }
        if want_x {
            debug_assert_eq!(shape, self.x.shape());
            grads.put(0, grad);
        }
        if let (true, Some(i)) = (want_w, w_slot) {
            grads.put(i, Data::from_vec(&self.normalized, dw));
        }
        if let (true, Some(i)) = (want_b, b_slot) {
            grads.put(i, Data::from_vec(&self.normalized, db));
        }
    }
}

impl RowNorm {
    /// [`backward`](RowNorm::backward) in recorded ops (`create_graph`):
    /// the statistics recomputed from the input in recorded ops, so that
    /// the gradient is differentiable through them.
    fn backward_graph(&self, grad: &Tensor, grads: &mut GraphGrads<'_>) -> Result<()> {
        let (w_slot, b_slot) = self.slots;
        let width = self.normalized.iter().product::<usize>();
        if width == 0 || self.x.shape().contains(&0) {
            grads.set(0, Tensor::zeros(self.x.shape()));
            for slot in [w_slot, b_slot].into_iter().flatten() {
                grads.set(slot, Tensor::zeros(&self.normalized));
            }
            return Ok(());
        }
        let rows = self.x.len() / width;
        let x = grads.input(0, &self.x)?.try_reshape(&[rows, width])?;
        let g = grad.try_reshape(&[rows, width])?;
        let centered = if self.center {
            x.try_sub(&x.try_mean_axis(1, true)?)?
        } else {
            x
        };
        let eps = self.eps;
        let rstd = centered
            .try_mul(&centered)?
            .try_mean_axis(1, true)?
            .add_scalar(eps)
            .sqrt()
            .rdiv_scalar(1.0);
        let xhat = centered.try_mul(&rstd)?;
        let w = match (w_slot, &self.weight) {
            (Some(slot), Some(w)) => Some(
                grads
                    .input(slot, &Data::from_vec(&self.normalized, w.clone()))?
                    .try_reshape(&[1, width])?,
            ),
            _ => None,
        };
        if grads.needs_grad(0) {
            let ghat = match &w {
                Some(w) => g.try_mul(w)?,
                None => g.clone(),
            };
            let mut inner =
                ghat.try_sub(&xhat.try_mul(&ghat.try_mul(&xhat)?.try_mean_axis(1, true)?)?)?;
            if self.center {
                inner = inner.try_sub(&ghat.try_mean_axis(1, true)?)?;
            }
            grads.set(0, rstd.try_mul(&inner)?.try_reshape(self.x.shape())?);
        }
        if let Some(slot) = w_slot.filter(|&slot| grads.needs_grad(slot)) {
            let dw = g.try_mul(&xhat)?.try_sum_axis(0, false)?;
            grads.set(slot, dw.try_reshape(&self.normalized)?);
        }
        if let Some(slot) = b_slot.filter(|&slot| grads.needs_grad(slot)) {
            grads.set(
                slot,
                g.try_sum_axis(0, false)?.try_reshape(&self.normalized)?,
            );
        }
        Ok(())
    }
}

/// `layer_norm` (`center`) and `rms_norm` (not `center`), validated.
#[track_caller]
fn row_norm(
    op: &'static str,
    input: &Tensor,
    normalized_shape: &[usize],
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f32,
    center: bool,
) -> Result<Tensor> {
    check_normalized(op, input.shape(), normalized_shape, weight, bias)?;
    let x = contiguous(input.read().into_data());
    let (w, b) = (read_opt(weight), read_opt(bias));
    let (out, means, rstds) = row_norm_forward(
        slice(&x),
        checked_numel(op, normalized_shape)?,
        w.as_deref(),
        b.as_deref(),
        eps,
        center,
    );
    let out = Data::from_vec(input.shape(), out);
    let inputs = Inputs::new(input, weight, bias);
    let slots = (inputs.weight, inputs.bias);
    record(op, &inputs.tensors, out, move |_: &Data| {
        let saved = RowNorm {
            x,
            normalized: normalized_shape.to_vec(),
            weight: w,
            means,
            rstds,
            center,
            eps,
            slots,
        };
        with_graph(
            saved,
            |saved: &RowNorm, grad: Data, grads: &mut InputGrads<'_>| saved.backward(grad, grads),
            |saved: &RowNorm, grad: &Tensor, grads: &mut GraphGrads<'_>| {
                saved.backward_graph(grad, grads)
            },
        )
    })
}

/// Layer normalisation over the trailing `normalized_shape` axes.
///
/// # Panics
///
/// As [`try_layer_norm`].
#[track_caller]
pub fn layer_norm(
    input: &Tensor,
    normalized_shape: &[usize],
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f32,
) -> Tensor {
    or_panic(try_layer_norm(input, normalized_shape, weight, bias, eps))
}

/// Layer normalisation, as PyTorch's `F.layer_norm(input,
/// normalized_shape, weight, bias, eps)`: each group of the trailing
/// `normalized_shape` axes of `input` is normalised to mean 0 and variance
/// 1 (the biased variance, with `eps` added under the square root), then
/// scaled by `weight` and shifted by `bias` (each of shape
/// `normalized_shape`, element-wise; `None` for 1 and 0). PyTorch's default
/// `eps` is `1e-5`.
///
/// One fused op: gradients flow to `input`, `weight` and `bias`, whichever
/// require grad. A group holding a NaN or an infinity is NaN.
///
/// # Errors
///
/// [`Error::InvalidArgument`] if `normalized_shape` is empty, if `input`
/// does not end with it, or if `weight` or `bias` does not have it as its
/// shape.
///
/// # Examples
///
/// ```
/// use netcl::Tensor;
/// use netcl::functional as F;
///
/// let x = Tensor::from_vec(vec![1.0, 3.0, 0.0, 4.0], &[2, 2])?.requires_grad_(true);
/// let w = Tensor::from_vec(vec![2.0, 1.0], &[2])?.requires_grad_(true);
/// let b = Tensor::from_vec(vec![0.5, 0.0], &[2])?.requires_grad_(true);
/// let y = F::try_layer_norm(&x, &[2], Some(&w), Some(&b), 0.0)?;
/// // Each row becomes [-1, 1], then times w plus b.
/// assert_eq!(y.to_vec(), vec![-1.5, 1.0, -1.5, 1.0]);
/// (&y * &Tensor::from_vec(vec![1.0, 0.0, 0.0, 0.0], &[2, 2])?).sum().backward();
/// // dL/db is the incoming gradient summed over rows; dL/dw is it times x̂.
/// assert_eq!(b.grad().unwrap().to_vec(), vec![1.0, 0.0]);
/// assert_eq!(w.grad().unwrap().to_vec(), vec![-1.0, 0.0]);
/// // x̂ of two values is ±1 whatever they are: x's gradient is 0 here.
/// assert_eq!(x.grad().unwrap().to_vec(), vec![0.0; 4]);
/// # Ok::<(), netcl::Error>(())
/// ```
#[track_caller]
pub fn try_layer_norm(
    input: &Tensor,
    normalized_shape: &[usize],
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f32,
) -> Result<Tensor> {
    row_norm(
        "layer_norm",
        input,
        normalized_shape,
        weight,
        bias,
        eps,
        true,
    )
}

/// Root-mean-square normalisation over the trailing `normalized_shape`
/// axes.
///
/// # Panics
///
/// As [`try_rms_norm`].
#[track_caller]
pub fn rms_norm(
    input: &Tensor,
    normalized_shape: &[usize],
    weight: Option<&Tensor>,
    eps: Option<f32>,
) -> Tensor {
    or_panic(try_rms_norm(input, normalized_shape, weight, eps))
}

/// RMS normalisation, as PyTorch's `F.rms_norm(input, normalized_shape,
/// weight, eps)`: each group of the trailing `normalized_shape` axes is
/// divided by `sqrt(mean(x²) + eps)` (not centred), then scaled by
/// `weight` (of shape `normalized_shape`; `None` for 1). `eps = None` is
/// PyTorch's default, the machine epsilon of the element type:
/// [`f32::EPSILON`].
///
/// One fused op: gradients flow to `input` and `weight`. A group holding a
/// NaN or an infinity is NaN.
///
/// # Errors
///
/// [`Error::InvalidArgument`] if `normalized_shape` is empty, if `input`
/// does not end with it, or if `weight` does not have it as its shape.
///
/// # Examples
///
/// ```
/// use netcl::Tensor;
/// use netcl::functional as F;
///
/// let x = Tensor::from_vec(vec![3.0, -4.0], &[1, 2])?.requires_grad_(true);
/// let w = Tensor::from_vec(vec![1.0, 2.0], &[2])?.requires_grad_(true);
/// let y = F::try_rms_norm(&x, &[2], Some(&w), Some(0.0))?;
/// // rms([3, -4]) = sqrt(12.5)
/// let rms = 12.5_f32.sqrt();
/// let close = |a: Vec<f32>, b: [f32; 2]| a.iter().zip(b).all(|(a, b)| (a - b).abs() < 1e-6);
/// assert!(close(y.to_vec(), [3.0 / rms, -8.0 / rms]));
/// y.sum().backward();
/// // dL/dw = x / rms
/// assert!(close(w.grad().unwrap().to_vec(), [3.0 / rms, -4.0 / rms]));
/// assert!(x.grad().unwrap().to_vec().iter().all(|g| *g != 0.0));
/// # Ok::<(), netcl::Error>(())
/// ```
#[track_caller]
pub fn try_rms_norm(
    input: &Tensor,
    normalized_shape: &[usize],
    weight: Option<&Tensor>,
    eps: Option<f32>,
) -> Result<Tensor> {
    let eps = eps.unwrap_or(f32::EPSILON);
    row_norm(
        "rms_norm",
        input,
        normalized_shape,
        weight,
        None,
        eps,
        false,
    )
}

/// What [`batch_norm`] returns: the normalised output and, in training mode
/// with running statistics given, their updated values.
///
/// PyTorch's `F.batch_norm` updates `running_mean` and `running_var` in
/// place; netcl's forward writes no shared state (a model served from many
/// threads must not change under its readers), so it returns the new
/// statistics and the caller (the `BatchNorm` layer) stores them.
#[derive(Debug, Clone)]
pub struct BatchNormOutput {
    /// The normalised input, of the input's shape.
    pub output: Tensor,
    /// `(1 - momentum) · running_mean + momentum · batch mean`, in training
    /// mode when a running mean was given; `None` otherwise. It requires no
    /// grad.
    pub running_mean: Option<Tensor>,
    /// `(1 - momentum) · running_var + momentum · unbiased batch variance`,
    /// in training mode when a running variance was given; `None`
    /// otherwise. It requires no grad.
    pub running_var: Option<Tensor>,
}

/// Batch normalisation over the channel axis 1.
///
/// # Panics
///
/// As [`try_batch_norm`].
#[allow(clippy::too_many_arguments)]
#[track_caller]
pub fn batch_norm(
    input: &Tensor,
    running_mean: Option<&Tensor>,
    running_var: Option<&Tensor>,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    training: bool,
    momentum: f32,
    eps: f32,
) -> BatchNormOutput {
    or_panic(try_batch_norm(
        input,
        running_mean,
        running_var,
        weight,
        bias,
        training,
        momentum,
        eps,
    ))
}

/// Batch normalisation, as PyTorch's `F.batch_norm(input, running_mean,
/// running_var, weight, bias, training, momentum, eps)` (PyTorch's defaults:
/// `training = false`, `momentum = 0.1`, `eps = 1e-5`). `input` is
/// `[N, C]`, `[N, C, L]` or `[N, C, H, W]` (any `[N, C, ...]`); each
/// channel `c` is normalised, then scaled by `weight[c]` and shifted by
/// `bias[c]` (`None` for 1 and 0).
///
/// - **Training**: with the mean and the biased variance of the channel
///   over the batch and spatial axes. Gradients flow to `input` through
///   these statistics, and to `weight` and `bias`. The running statistics,
///   if given, are returned updated ([`BatchNormOutput`]): the running
///   variance with the *unbiased* batch variance, as PyTorch does, while
///   the output is normalised with the biased one.
/// - **Eval** (`training = false`): with `running_mean` and `running_var`,
///   constants; gradients flow to `input`, `weight` and `bias`.
///
/// Departures from PyTorch: the running statistics are returned, not
/// updated in place, and `momentum` is a number (PyTorch's `None`, a
/// cumulative average, needs a batch counter the layer keeps). The running
/// statistics are buffers: no gradient flows to them, as in PyTorch.
///
/// # Errors
///
/// [`Error::Rank`] if `input` has fewer than 2 axes;
/// [`Error::InvalidArgument`] if a running statistic, `weight` or `bias` is
/// not of shape `[C]`, if eval mode is missing a running statistic, or if
/// training sees one value per channel (`N · H · W = 1`: no variance to
/// estimate).
///
/// # Examples
///
/// ```
/// use netcl::Tensor;
/// use netcl::functional as F;
///
/// // Two samples of one channel: mean 2, biased variance 1.
/// let x = Tensor::from_vec(vec![1.0, 3.0], &[2, 1])?.requires_grad_(true);
/// let (mean, var) = (Tensor::zeros(&[1]), Tensor::ones(&[1]));
/// let out = F::try_batch_norm(&x, Some(&mean), Some(&var), None, None, true, 0.1, 0.0)?;
/// assert_eq!(out.output.to_vec(), vec![-1.0, 1.0]);
/// // 0.9 · 0 + 0.1 · 2, and 0.9 · 1 + 0.1 · 2 (the unbiased variance).
/// assert_eq!(out.running_mean.unwrap().to_vec(), vec![0.2]);
/// assert!((out.running_var.unwrap().item() - 1.1).abs() < 1e-6);
///
/// // Eval mode normalises with the running statistics.
/// let eval = F::try_batch_norm(&x, Some(&mean), Some(&var), None, None, false, 0.1, 0.0)?;
/// assert_eq!(eval.output.to_vec(), vec![1.0, 3.0]);
/// assert!(eval.running_mean.is_none());
/// # Ok::<(), netcl::Error>(())
/// ```
#[allow(clippy::too_many_arguments)]
#[track_caller]
pub fn try_batch_norm(
    input: &Tensor,
    running_mean: Option<&Tensor>,
    running_var: Option<&Tensor>,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    training: bool,
    momentum: f32,
    eps: f32,
) -> Result<BatchNormOutput> {
    const OP: &str = "batch_norm";
    let shape = input.shape();
    if shape.len() < 2 {
        return Err(Error::Rank {
            op: OP,
            expected: "an input [N, C, ...] of at least 2 dimensions",
            shape: shape.to_vec(),
        });
    }
    let (batch, channels) = (shape[0], shape[1]);
    let spatial = checked_numel(OP, &shape[2..])?;
    for (name, t) in [
        ("running_mean", running_mean),
        ("running_var", running_var),
        ("weight", weight),
        ("bias", bias),
    ] {
        if let Some(t) = t
            && t.shape() != [channels]
        {
            return Err(Error::InvalidArgument {
                op: OP,
                message: format!(
                    "{name} of shape {:?} must be [{channels}], one value per channel of an input of shape {shape:?}",
                    t.shape()
                ),
            });
        }
    }
    let count = batch.saturating_mul(spatial);
    let stats = match (training, running_mean, running_var) {
        (true, ..) => {
            if count <= 1 {
                return Err(Error::InvalidArgument {
                    op: OP,
                    message: format!(
                        "expected more than 1 value per channel when training, got an input of shape {shape:?}"
                    ),
                });
            }
            None
        }
        (false, Some(mean), Some(var)) => Some((mean.read().to_vec(), var.read().to_vec())),
        (false, ..) => {
            return Err(Error::InvalidArgument {
                op: OP,
                message: "running_mean and running_var are needed in eval mode".into(),
            });
        }
    };

    let x = contiguous(input.read().into_data());
    let xs = slice(&x);
    let (w, b) = (read_opt(weight), read_opt(bias));
    // The values of channel c: `spatial` consecutive values per sample.
    let channel =
        |c: usize| (0..batch).map(move |n| &xs[(n * channels + c) * spatial..][..spatial]);
    let mut means = vec![0.0; channels];
    let mut rstds = vec![0.0; channels];
    let mut new_mean = None;
    let mut new_var = None;
    {
        match &stats {
            Some((mean, var)) => {
                for c in 0..channels {
                    means[c] = mean[c];
                    rstds[c] = 1.0 / (var[c] + eps).sqrt();
                }
            }
            None => {
                let n = count as f32;
                let mut unbiased = vec![0.0; channels];
                for c in 0..channels {
                    let mean = channel(c).map(|v| sum_map(v, |v| v)).sum::<f32>() / n;
                    let dev = channel(c)
                        .map(|v| sum_map(v, |v| (v - mean) * (v - mean)))
                        .sum::<f32>();
                    means[c] = mean;
                    rstds[c] = 1.0 / (dev / n + eps).sqrt();
                    unbiased[c] = dev / (n - 1.0);
                }
                // The running statistics, updated as PyTorch does.
                let update = |running: &Tensor, batch: &[f32]| {
                    let old = running.read().to_vec();
                    let new = old
                        .iter()
                        .zip(batch)
                        .map(|(&r, &s)| (1.0 - momentum) * r + momentum * s)
                        .collect();
                    Tensor::from_data(Data::from_vec(&[channels], new))
                };
                new_mean = running_mean.map(|r| update(r, &means));
                new_var = running_var.map(|r| update(r, &unbiased));
            }
        }
    }
    // y = x · scale + shift per channel, scale = rstd·w, shift = b - mean·scale.
    let mut out = crate::storage::cache::zeros(xs.len());
    if !xs.is_empty() {
        // Compiled for the widest SIMD (the baseline build does four
        // values at a time).
        super::vectorized::dispatch(
            #[inline(always)]
            || {
                for c in 0..channels {
                    let scale = rstds[c] * w.as_ref().map_or(1.0, |w| w[c]);
                    let (mean, shift) = (means[c], b.as_ref().map_or(0.0, |b| b[c]));
                    for n in 0..batch {
                        let at = (n * channels + c) * spatial;
                        let (y, x) = (&mut out[at..at + spatial], &xs[at..at + spatial]);
                        for (y, &x) in y.iter_mut().zip(x) {
                            *y = (x - mean) * scale + shift;
                        }
                    }
                }
            },
        );
    }
    let out = Data::from_vec(shape, out);
    let inputs = Inputs::new(input, weight, bias);
    let slots = (inputs.weight, inputs.bias);
    let batch_stats = stats.is_none();
    let output = record(OP, &inputs.tensors, out, move |_: &Data| {
        let saved = ChannelNorm {
            x,
            weight: w,
            means,
            rstds,
            batch_stats,
            eps,
            slots,
        };
        with_graph(
            saved,
            |saved: &ChannelNorm, grad: Data, grads: &mut InputGrads<'_>| {
                saved.backward(grad, grads)
            },
            |saved: &ChannelNorm, grad: &Tensor, grads: &mut GraphGrads<'_>| {
                saved.backward_graph(grad, grads)
            },
        )
    })?;
    Ok(BatchNormOutput {
        output,
        running_mean: new_mean,
        running_var: new_var,
    })
}

/// What a `batch_norm` backward saved: the (row-major) input, the weight,
/// each channel's mean and rstd, and whether these are the batch's.
struct ChannelNorm {
    x: Data,
    weight: Option<Vec<f32>>,
    means: Vec<f32>,
    rstds: Vec<f32>,
    batch_stats: bool,
    eps: f32,
    slots: (Option<usize>, Option<usize>),
}

impl ChannelNorm {
    /// [`backward`](ChannelNorm::backward) in recorded ops (`create_graph`):
    /// with batch statistics, they are recomputed from the input in
    /// recorded ops; in eval mode the running statistics are constants.
    fn backward_graph(&self, grad: &Tensor, grads: &mut GraphGrads<'_>) -> Result<()> {
        let (w_slot, b_slot) = self.slots;
        let shape = self.x.shape().to_vec();
        let (batch, channels) = (shape[0], shape[1]);
        let spatial: usize = shape[2..].iter().product();
        if self.x.len() == 0 {
            grads.set(0, Tensor::zeros(&shape));
            for slot in [w_slot, b_slot].into_iter().flatten() {
                grads.set(slot, Tensor::zeros(&[channels]));
            }
            return Ok(());
        }
        let per_channel = [batch, channels, spatial];
        let column = |values: &[f32]| Tensor::from_vec(values.to_vec(), &[1, channels, 1]);
        // The mean over the batch and space of each channel, kept [1, C, 1].
        let channel_mean =
            |t: &Tensor| -> Result<Tensor> { t.try_mean_axis(0, true)?.try_mean_axis(2, true) };
        let channel_sum = |t: &Tensor| -> Result<Tensor> {
            t.try_sum_axis(0, true)?
                .try_sum_axis(2, true)?
                .try_reshape(&[channels])
        };
        let x = grads.input(0, &self.x)?.try_reshape(&per_channel)?;
        let g = grad.try_reshape(&per_channel)?;
        let (centered, rstd) = if self.batch_stats {
            let centered = x.try_sub(&channel_mean(&x)?)?;
            let rstd = channel_mean(&centered.try_mul(&centered)?)?
                .add_scalar(self.eps)
                .sqrt()
                .rdiv_scalar(1.0);
            (centered, rstd)
        } else {
            (x.try_sub(&column(&self.means)?)?, column(&self.rstds)?)
        };
        let xhat = centered.try_mul(&rstd)?;
        if grads.needs_grad(0) {
            let scale = match (w_slot, &self.weight) {
                (Some(slot), Some(w)) => {
                    let w = grads.input(slot, &Data::from_vec(&[channels], w.clone()))?;
                    rstd.try_mul(&w.try_reshape(&[1, channels, 1])?)?
                }
                (None, Some(w)) => rstd.try_mul(&column(w)?)?,
                _ => rstd.clone(),
            };
            let inner = if self.batch_stats {
                g.try_sub(&channel_mean(&g)?)?
                    .try_sub(&xhat.try_mul(&channel_mean(&g.try_mul(&xhat)?)?)?)?
            } else {
                g.clone()
            };
            grads.set(0, scale.try_mul(&inner)?.try_reshape(&shape)?);
        }
        if let Some(slot) = w_slot.filter(|&slot| grads.needs_grad(slot)) {
            grads.set(slot, channel_sum(&g.try_mul(&xhat)?)?);
        }
        if let Some(slot) = b_slot.filter(|&slot| grads.needs_grad(slot)) {
            grads.set(slot, channel_sum(&g)?);
        }
        Ok(())
    }
    /// Per channel over its n values, with `x̂ = (x - mean)·rstd`:
    /// dw = Σ g·x̂, db = Σ g, and dx = rstd·w·(g - Σg/n - x̂·Σ(g·x̂)/n)
    /// through the batch statistics (training), dx = rstd·w·g with running
    /// ones (eval).
    fn backward(&self, grad: Data, grads: &mut InputGrads<'_>) {
        // dx is written over the incoming gradient (a channel's values
        // once its sums are taken), as in `RowNorm`.
        let mut grad = contiguous(grad);
        if grad.view_mut().is_none() {
            grad = Data::from_vec(grad.shape(), grad.to_vec());
        }
        let want_x = grads.needs_grad(0);
        let x = slice(&self.x);
        let shape = self.x.shape().to_vec();
        let g = grad
            .view_mut()
            .expect("made unique")
            .into_slice()
            .expect("row-major values");
        let (batch, channels) = (shape[0], shape[1]);
        let spatial: usize = shape[2..].iter().product();
        let n = (batch * spatial) as f32;
        let (w_slot, b_slot) = self.slots;
        let mut dw = vec![0.0; channels];
        let mut db = vec![0.0; channels];
        if !x.is_empty() {
            for c in 0..channels {
                let (mean, rstd) = (self.means[c], self.rstds[c]);
                let at = |n: usize| (n * channels + c) * spatial..(n * channels + c + 1) * spatial;
                let (mut sg, mut sgx) = (0.0, 0.0);
                for i in 0..batch {
                    let (x, g) = (&x[at(i)], &g[at(i)]);
                    sg += sum_map(g, |g| g);
                    sgx += sum_zip(g, x, |g, x| g * (x - mean)) * rstd;
                }
                db[c] = sg;
                dw[c] = sgx;
                if !want_x {
                    continue;
                }
                let scale = rstd * self.weight.as_ref().map_or(1.0, |w| w[c]);
                let (a, b) = if self.batch_stats {
                    (sg / n, sgx / n)
                } else {
                    (0.0, 0.0)
                };
                for i in 0..batch {
                    let range = at(i);
                    for (g, &x) in g[range.clone()].iter_mut().zip(&x[range]) {
                        *g = scale * (*g - a - (x - mean) * rstd * b);
                    }
                }
            }
        }
        if want_x {
            grads.put(0, grad);
        }
        if let Some(i) = w_slot {
            grads.put(i, Data::from_vec(&[channels], dw));
        }
        if let Some(i) = b_slot {
            grads.put(i, Data::from_vec(&[channels], db));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(values: &[f32], shape: &[usize]) -> Tensor {
        Tensor::from_vec(values.to_vec(), shape).unwrap()
    }

    fn leaf(values: &[f32], shape: &[usize]) -> Tensor {
        t(values, shape).requires_grad_(true)
    }

    fn assert_close(got: &[f32], want: &[f64]) {
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(want) {
            assert!((f64::from(*g) - w).abs() < 1e-5, "{got:?} vs {want:?}");
        }
    }

    /// The gradients of `L = Σ r·layer_norm(x)` for one row, in f64 from
    /// the formulas: x̂ = (x - μ)/σ, ĝ = r·w,
    /// dx = (ĝ - mean ĝ - x̂·mean(ĝ·x̂))/σ, dw = r·x̂, db = r.
    fn layer_norm_reference(x: &[f64], w: &[f64], r: &[f64]) -> [Vec<f64>; 3] {
        let n = x.len() as f64;
        let mean = x.iter().sum::<f64>() / n;
        let sigma = (x.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n).sqrt();
        let xh: Vec<f64> = x.iter().map(|v| (v - mean) / sigma).collect();
        let gh: Vec<f64> = r.iter().zip(w).map(|(r, w)| r * w).collect();
        let a = gh.iter().sum::<f64>() / n;
        let b = gh.iter().zip(&xh).map(|(g, x)| g * x).sum::<f64>() / n;
        let dx = gh
            .iter()
            .zip(&xh)
            .map(|(g, x)| (g - a - x * b) / sigma)
            .collect();
        let dw = r.iter().zip(&xh).map(|(r, x)| r * x).collect();
        [dx, dw, r.to_vec()]
    }

    // candle#3011, #2168: fused layer/rms norms whose gradients came out
    // zero. Every gradient here is non-zero and matches the formulas.
    #[test]
    fn layer_norm_gradients_reach_input_weight_and_bias() {
        let (xv, wv, rv) = ([1.0, 2.0, 4.0], [1.0, -2.0, 0.5], [0.3, -1.0, 2.0]);
        let (x, w, b) = (leaf(&xv, &[1, 3]), leaf(&wv, &[3]), leaf(&[0.1; 3], &[3]));
        let y = try_layer_norm(&x, &[3], Some(&w), Some(&b), 0.0).unwrap();
        (&y * &t(&rv, &[1, 3])).sum().backward();
        let f = |v: &[f32]| v.iter().map(|&v| f64::from(v)).collect::<Vec<_>>();
        let [dx, dw, db] = layer_norm_reference(&f(&xv), &f(&wv), &f(&rv));
        for (got, want) in [(&x, dx), (&w, dw), (&b, db)] {
            let got = got.grad().unwrap().to_vec();
            assert!(got.iter().all(|&g| g != 0.0), "a zero gradient: {got:?}");
            assert_close(&got, &want);
        }
    }

    // rms_norm: y = x·w/ρ, ρ = sqrt(mean x²): with ĝ = r·w,
    // dx = (ĝ - x/ρ · mean(ĝ·x/ρ))/ρ, dw = r·x/ρ.
    #[test]
    fn rms_norm_gradients_reach_input_and_weight() {
        let (xv, wv, rv) = ([1.0_f64, -2.0, 3.0], [0.5, 2.0, -1.0], [1.0, 0.5, -0.25]);
        let cast = |v: &[f64]| v.iter().map(|&v| v as f32).collect::<Vec<_>>();
        let (x, w) = (leaf(&cast(&xv), &[3]), leaf(&cast(&wv), &[3]));
        let y = try_rms_norm(&x, &[3], Some(&w), Some(0.0)).unwrap();
        (&y * &t(&cast(&rv), &[3])).sum().backward();
        let rho = (xv.iter().map(|v| v * v).sum::<f64>() / 3.0).sqrt();
        let xh: Vec<f64> = xv.iter().map(|v| v / rho).collect();
        let gh: Vec<f64> = rv.iter().zip(&wv).map(|(r, w)| r * w).collect();
        let b = gh.iter().zip(&xh).map(|(g, x)| g * x).sum::<f64>() / 3.0;
        let dx: Vec<f64> = gh.iter().zip(&xh).map(|(g, x)| (g - x * b) / rho).collect();
        let dw: Vec<f64> = rv.iter().zip(&xh).map(|(r, x)| r * x).collect();
        assert_close(&x.grad().unwrap().to_vec(), &dx);
        assert_close(&w.grad().unwrap().to_vec(), &dw);
        assert!(x.grad().unwrap().to_vec().iter().all(|&g| g != 0.0));
    }

    // Training-mode batch norm: dx goes through the batch statistics, so
    // for one channel it is layer_norm's formula over the channel's values.
    #[test]
    fn batch_norm_train_gradient_goes_through_the_batch_statistics() {
        let (xv, rv) = ([1.0, 2.0, 4.0], [0.3, -1.0, 2.0]);
        let x = leaf(&xv, &[3, 1]);
        let (w, b) = (leaf(&[1.5], &[1]), leaf(&[0.0], &[1]));
        let out = try_batch_norm(&x, None, None, Some(&w), Some(&b), true, 0.1, 0.0).unwrap();
        (&out.output * &t(&rv, &[3, 1])).sum().backward();
        let f = |v: &[f32]| v.iter().map(|&v| f64::from(v)).collect::<Vec<_>>();
        let [dx, dw, _] = layer_norm_reference(&f(&xv), &[1.5; 3], &f(&rv));
        assert_close(&x.grad().unwrap().to_vec(), &dx);
        assert_close(&w.grad().unwrap().to_vec(), &[dw.iter().sum()]);
        assert_close(&b.grad().unwrap().to_vec(), &[1.3]);
    }

    #[test]
    fn batch_norm_returns_running_statistics_and_leaves_its_arguments_alone() {
        // Channel 0: [1, 3] (mean 2, unbiased variance 2); channel 1: [0, 0].
        let x = t(&[1.0, 0.0, 3.0, 0.0], &[2, 2]);
        let (mean, var) = (t(&[1.0, 1.0], &[2]), t(&[1.0, 1.0], &[2]));
        let out = try_batch_norm(&x, Some(&mean), Some(&var), None, None, true, 0.5, 1e-5).unwrap();
        assert_eq!(out.running_mean.unwrap().to_vec(), vec![1.5, 0.5]);
        assert_eq!(out.running_var.unwrap().to_vec(), vec![1.5, 0.5]);
        assert_eq!(mean.to_vec(), vec![1.0, 1.0]);
        assert_eq!(var.to_vec(), vec![1.0, 1.0]);
    }

    /// The sums in explicit vectors (AVX-512 or AVX2, whichever this CPU
    /// runs) give the bits of the plain lane arrays, whatever the values.
    #[cfg(not(loom))]
    #[test]
    fn vector_sums_have_the_bits_of_the_lane_arrays() {
        let value = |i: usize, k: f64| ((i as f64 * k).sin() * 3.0).exp() as f32;
        for chunks in [1, 2, 3, 8, 9] {
            let n = chunks * LANES;
            let x: Vec<f32> = (0..n).map(|i| value(i, 0.37) - 1.0).collect();
            let g: Vec<f32> = (0..n).map(|i| value(i, 0.53) - 2.0).collect();
            let w: Vec<f32> = (0..n).map(|i| value(i, 0.71)).collect();
            for (shift, square) in [(0.0, false), (0.7, true), (-1.3, true)] {
                let vector = pulp::Arch::new().dispatch(RowSum {
                    body: &x,
                    shift,
                    square,
                });
                let plain = row_sum_lanes(&x, shift, square);
                assert_eq!(vector.map(f32::to_bits), plain.map(f32::to_bits));
            }
            let (mean, rstd) = (0.3, 1.7);
            let (mut dw1, mut db1) = (vec![0.5; n], vec![-0.25; n]);
            let (mut dw2, mut db2) = (dw1.clone(), db1.clone());
            for with_wb in [true, false] {
                let sums = |dw, db| RowSums {
                    x: &x,
                    g: &g,
                    w: &w,
                    wb: with_wb.then_some((dw, db)),
                    mean,
                    rstd,
                };
                let vector = pulp::Arch::new().dispatch(sums(&mut dw1, &mut db1));
                let plain = sums(&mut dw2, &mut db2).lanes();
                assert_eq!(vector.0.map(f32::to_bits), plain.0.map(f32::to_bits));
                assert_eq!(vector.1.map(f32::to_bits), plain.1.map(f32::to_bits));
                let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&dw1), bits(&dw2));
                assert_eq!(bits(&db1), bits(&db2));
            }
        }
    }

    // Rows wide enough for the row kernels' 16-lane sums, with and
    // without a tail (16, 37 = 2·16 + 5, 128), each row with its own
    // scale and offset: values and all three gradients against the f64
    // formulas, for `layer_norm` and `rms_norm` (its rows have no mean).
    #[test]
    fn wide_rows_match_the_f64_formulas() {
        for (width, rows) in [(16, 3), (37, 4), (128, 5)] {
            let value = |i: usize, k: f64| ((i as f64 * k).sin() * 2.0) as f32;
            let xv: Vec<f32> = (0..rows * width)
                .map(|i| value(i, 0.37) + (i / width) as f32 * 1.5)
                .collect();
            let (wv, bv): (Vec<f32>, Vec<f32>) =
                (0..width).map(|i| (value(i, 0.71), value(i, 1.3))).unzip();
            let rv: Vec<f32> = (0..rows * width).map(|i| value(i, 0.53)).collect();
            let f = |v: &[f32]| v.iter().map(|&v| f64::from(v)).collect::<Vec<_>>();
            for center in [true, false] {
                let x = leaf(&xv, &[rows, width]);
                let (w, b) = (leaf(&wv, &[width]), leaf(&bv, &[width]));
                let y = if center {
                    try_layer_norm(&x, &[width], Some(&w), Some(&b), 0.0).unwrap()
                } else {
                    let y = try_rms_norm(&x, &[width], Some(&w), Some(0.0)).unwrap();
                    &y + &b
                };
                (&y * &t(&rv, &[rows, width])).sum().backward();
                let (y, dx) = (y.to_vec(), x.grad().unwrap().to_vec());
                let (mut dw, mut db) = (vec![0.0; width], vec![0.0; width]);
                for r in 0..rows {
                    let at = r * width..(r + 1) * width;
                    let (xr, gr) = (f(&xv[at.clone()]), f(&rv[at.clone()]));
                    let n = width as f64;
                    let mean = if center {
                        xr.iter().sum::<f64>() / n
                    } else {
                        0.0
                    };
                    let sigma = (xr.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n).sqrt();
                    let xh: Vec<f64> = xr.iter().map(|v| (v - mean) / sigma).collect();
                    let gh: Vec<f64> = gr.iter().zip(f(&wv)).map(|(g, w)| g * w).collect();
                    let a = if center {
                        gh.iter().sum::<f64>() / n
                    } else {
                        0.0
                    };
                    let c = gh.iter().zip(&xh).map(|(g, x)| g * x).sum::<f64>() / n;
                    for k in 0..width {
                        let want_y = xh[k] * f64::from(wv[k]) + f64::from(bv[k]);
                        let want_dx = (gh[k] - a - xh[k] * c) / sigma;
                        for (got, want) in [(y[at.start + k], want_y), (dx[at.start + k], want_dx)]
                        {
                            let tol = 1e-4 * (1.0 + want.abs());
                            assert!(
                                (f64::from(got) - want).abs() < tol,
                                "width {width}, center {center}, row {r}, column {k}: {got} vs {want}"
                            );
                        }
                        dw[k] += gr[k] * xh[k];
                        db[k] += gr[k];
                    }
                }
                for (got, want) in [(&w, dw), (&b, db)] {
                    let got = got.grad().unwrap().to_vec();
                    for (g, w) in got.iter().zip(&want) {
                        let tol = 1e-4 * (1.0 + w.abs());
                        assert!((f64::from(*g) - w).abs() < tol, "{got:?} vs {want:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn a_nan_spoils_its_own_row_only() {
        let x = t(&[1.0, f32::NAN, 3.0, 1.0, 2.0, 3.0], &[2, 3]);
        let y = try_layer_norm(&x, &[3], None, None, 1e-5).unwrap().to_vec();
        assert!(y[..3].iter().all(|v| v.is_nan()));
        assert!(y[3..].iter().all(|v| v.is_finite()));
        let y = try_rms_norm(&x, &[3], None, None).unwrap().to_vec();
        assert!(y[..3].iter().all(|v| v.is_nan()));
        assert!(y[3..].iter().all(|v| v.is_finite()));
    }

    #[test]
    fn errors_name_the_op_and_the_shapes() {
        let x = Tensor::zeros(&[2, 3]);
        let err = try_layer_norm(&x, &[2], None, None, 1e-5).unwrap_err();
        assert_eq!(
            err.to_string(),
            "layer_norm: an input of shape [2, 3] does not end with normalized_shape [2]"
        );
        let err = try_rms_norm(&x, &[], None, None).unwrap_err();
        assert_eq!(
            err.to_string(),
            "rms_norm: normalized_shape must have at least one element, got []"
        );
        let w = Tensor::ones(&[4]);
        let err = try_layer_norm(&x, &[3], Some(&w), None, 1e-5).unwrap_err();
        assert_eq!(
            err.to_string(),
            "layer_norm: weight of shape [4] must have normalized_shape [3]"
        );
        let err = try_batch_norm(&x, None, None, None, None, false, 0.1, 1e-5).unwrap_err();
        assert_eq!(
            err.to_string(),
            "batch_norm: running_mean and running_var are needed in eval mode"
        );
        let one = Tensor::zeros(&[1, 3]);
        let err = try_batch_norm(&one, None, None, None, None, true, 0.1, 1e-5).unwrap_err();
        assert_eq!(
            err.to_string(),
            "batch_norm: expected more than 1 value per channel when training, got an input of shape [1, 3]"
        );
        let bad = Tensor::ones(&[2]);
        let err = try_batch_norm(&x, Some(&bad), None, None, None, true, 0.1, 1e-5).unwrap_err();
        assert!(
            err.to_string()
                .contains("running_mean of shape [2] must be [3]")
        );
        assert!(matches!(
            try_batch_norm(
                &Tensor::zeros(&[3]),
                None,
                None,
                None,
                None,
                true,
                0.1,
                1e-5
            ),
            Err(Error::Rank {
                op: "batch_norm",
                ..
            })
        ));
    }

    #[test]
    fn empty_inputs_give_empty_outputs_and_gradients() {
        let x = Tensor::zeros(&[0, 4]).requires_grad_(true);
        let w = Tensor::ones(&[4]).requires_grad_(true);
        let y = try_layer_norm(&x, &[4], Some(&w), None, 1e-5).unwrap();
        assert_eq!(y.shape(), &[0, 4]);
        y.sum().backward();
        assert_eq!(w.grad().unwrap().to_vec(), vec![0.0; 4]);
        let x = Tensor::zeros(&[3, 0]).requires_grad_(true);
        let y = try_rms_norm(&x, &[0], None, None).unwrap();
        assert_eq!(y.shape(), &[3, 0]);
    }
}
