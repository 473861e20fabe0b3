//! Pooling over NCHW images, as PyTorch's `F.max_pool2d`, `F.avg_pool2d`
//! and `F.adaptive_avg_pool2d`: each channel of each image on its own.
//!
//! Inputs are `[N, C, H, W]`, or unbatched `[C, H, W]` (the output then has
//! no batch axis either). As in PyTorch, `C`, `H` and `W` must be non-zero
//! (`N` may be 0).
//!
//! # Departures from PyTorch
//!
//! The output length is always rounded down: PyTorch's `ceil_mode` is not
//! offered. `max_pool2d` has no `dilation` or `return_indices` and
//! `avg_pool2d` no `divisor_override`.

use crate::array::checked_numel;
use crate::autograd::function::{GraphGrads, InputGrads, record, with_graph};
use crate::error::{Error, Result, or_panic};
use crate::ops::conv::{Size2, contiguous, window_count};
use crate::ops::graph::{Offsets, scatter_add, take};
use crate::tensor::{Data, Tensor};

/// The window of one output position: input rows `y0..y1` and columns
/// `x0..x1`, clipped to the image (never empty).
#[derive(Clone, Copy)]
struct Window {
    y0: usize,
    y1: usize,
    x0: usize,
    x1: usize,
}

/// The planes (images × channels) of a pooling and their windows.
struct Planes {
    count: usize,
    h: usize,
    w: usize,
    /// The windows of one plane's outputs, row-major.
    windows: Vec<Window>,
}

/// Checks a pooling input, `[N, C, H, W]` or `[C, H, W]` with `C`, `H`,
/// `W` non-zero; returns the plane count, `H`, `W` and the output shape
/// for spatial lengths `ho`, `wo` (unchecked).
fn planes_of(op: &'static str, x: &[usize]) -> Result<(usize, usize, usize)> {
    if x.len() != 3 && x.len() != 4 {
        return Err(Error::Rank {
            op,
            expected: "a 3-D [C, H, W] or 4-D [N, C, H, W] input",
            shape: x.to_vec(),
        });
    }
    let image = &x[x.len() - 3..];
    if image.contains(&0) {
        return Err(Error::InvalidArgument {
            op,
            message: format!("expected non-empty channels, height and width, got input {x:?}"),
        });
    }
    // The input exists, so the product of its lengths fits.
    let count = x[..x.len() - 2].iter().product();
    Ok((count, image[1], image[2]))
}

/// The output shape: `x`'s with the last two lengths replaced.
fn out_shape(op: &'static str, x: &[usize], ho: usize, wo: usize) -> Result<Vec<usize>> {
    let mut shape = x.to_vec();
    let n = shape.len();
    shape[n - 2] = ho;
    shape[n - 1] = wo;
    checked_numel(op, &shape)?;
    Ok(shape)
}

/// The sliding windows of `max_pool2d` and `avg_pool2d`, checked as
/// PyTorch does.
fn sliding(
    op: &'static str,
    x: &[usize],
    kernel: Size2,
    stride: Option<Size2>,
    padding: Size2,
) -> Result<(Planes, Vec<usize>)> {
    let (count, h, w) = planes_of(op, x)?;
    let stride = stride.unwrap_or(kernel);
    let invalid = |message: String| Error::InvalidArgument { op, message };
    if kernel.0 == 0 || kernel.1 == 0 {
        return Err(invalid(format!(
            "kernel_size must be positive, got {kernel}"
        )));
    }
    if stride.0 == 0 || stride.1 == 0 {
        return Err(invalid(format!("stride must be positive, got {stride}")));
    }
    if padding.0 > kernel.0 / 2 || padding.1 > kernel.1 / 2 {
        return Err(invalid(format!(
            "pad should be at most half of kernel size, but got pad={padding} and kernel_size={kernel}"
        )));
    }
    // padding ≤ kernel / 2 and the input exists: the padded lengths fit.
    let ho = window_count(h, kernel.0, stride.0, padding.0, 1).expect("padded length fits");
    let wo = window_count(w, kernel.1, stride.1, padding.1, 1).expect("padded length fits");
    let (Some(ho), Some(wo)) = (ho, wo) else {
        return Err(invalid(format!(
            "kernel_size {kernel} is larger than the padded input ({} x {}): output size is too small",
            h + 2 * padding.0,
            w + 2 * padding.1
        )));
    };
    let shape = out_shape(op, x, ho, wo)?;
    // Each window overlaps the image (padding ≤ kernel / 2), so clipped it
    // is never empty.
    let span = |o: usize, s: usize, k: usize, p: usize, len: usize| {
        let start = o * s;
        (start.saturating_sub(p), (start + k - p).min(len))
    };
    let windows = if shape.contains(&0) {
        Vec::new()
    } else {
        (0..ho)
            .flat_map(|oy| (0..wo).map(move |ox| (oy, ox)))
            .map(|(oy, ox)| {
                let (y0, y1) = span(oy, stride.0, kernel.0, padding.0, h);
                let (x0, x1) = span(ox, stride.1, kernel.1, padding.1, w);
                Window { y0, y1, x0, x1 }
            })
            .collect()
    };
    Ok((
        Planes {
            count,
            h,
            w,
            windows,
        },
        shape,
    ))
}

/// Calls `f(plane's values, windows of the plane)` for each plane of `x`
/// (row-major), collecting one value per output.
fn pool_map(
    planes: &Planes,
    x: &[f32],
    mut f: impl FnMut(usize, &[f32], &Window) -> f32,
) -> Vec<f32> {
    let plane = planes.h * planes.w;
    let mut out = crate::storage::cache::take(planes.count * planes.windows.len());
    if planes.windows.is_empty() {
        return out;
    }
    for (p, values) in x.chunks_exact(plane).enumerate() {
        out.extend(planes.windows.iter().map(|win| f(p * plane, values, win)));
    }
    out
}

/// Max pooling without padding (every window inside the image), as
/// PyTorch scans each window: row-major, a value wins if greater than the
/// best so far or NaN. Computed a whole output row at a time, kernel tap
/// by kernel tap (branch-free selects over the row). With `argmax`, also
/// pushes each output's winning position in `x`.
fn unpadded_max(
    planes: &Planes,
    x: &[f32],
    kernel: Size2,
    stride: Size2,
    mut argmax: Option<&mut Vec<usize>>,
) -> Vec<f32> {
    let (h, w) = (planes.h, planes.w);
    // The first output row's windows start at row 0.
    let wo = planes.windows.iter().take_while(|win| win.y0 == 0).count();
    let ho = planes.windows.len().checked_div(wo).unwrap_or(0);
    let mut out = crate::storage::cache::take(planes.count * ho * wo);
    if ho == 0 {
        return out;
    }
    if kernel == Size2(2, 2) && stride == Size2(2, 2) {
        // Compiled for the widest SIMD.
        super::vectorized::dispatch(
            #[inline(always)]
            || max_2x2(x, h, w, (ho, wo), &mut out, argmax),
        );
        return out;
    }
    let mut best = vec![f32::NEG_INFINITY; wo];
    let mut index = vec![0usize; wo];
    for (p, plane) in x.chunks_exact(h * w).enumerate() {
        for oy in 0..ho {
            best.fill(f32::NEG_INFINITY);
            if argmax.is_some() {
                // The first cell wins if every value is -inf.
                for (ox, at) in index.iter_mut().enumerate() {
                    *at = p * h * w + oy * stride.0 * w + ox * stride.1;
                }
            }
            for i in 0..kernel.0 {
                let y = oy * stride.0 + i;
                let row = &plane[y * w..(y + 1) * w];
                for j in 0..kernel.1 {
                    let taps = row[j..].iter().step_by(stride.1);
                    if argmax.is_some() {
                        let at = p * h * w + y * w + j;
                        for (ox, ((b, i), &v)) in
                            best.iter_mut().zip(index.iter_mut()).zip(taps).enumerate()
                        {
                            // Branch-free: which value wins is data.
                            let take = v > *b || v.is_nan();
                            *b = if take { v } else { *b };
                            let mask = usize::from(take).wrapping_neg();
                            *i ^= (*i ^ (at + ox * stride.1)) & mask;
                        }
                    } else {
                        for (b, &v) in best.iter_mut().zip(taps) {
                            *b = if v > *b || v.is_nan() { v } else { *b };
                        }
                    }
                }
            }
            out.extend_from_slice(&best);
            if let Some(argmax) = argmax.as_mut() {
                argmax.extend_from_slice(&index);
            }
        }
    }
    out
}

/// PyTorch's scan step: `v` wins over the best so far `b` if greater or
/// NaN.
#[inline(always)]
fn wins(v: f32, b: f32) -> bool {
    v > b || v.is_nan()
}

/// [`unpadded_max`] for the most common pooling, 2x2 windows at stride 2:
/// the four cells of each window read directly, the winner chosen by
/// selects rather than branches.
#[inline(always)]
fn max_2x2(
    x: &[f32],
    h: usize,
    w: usize,
    (ho, wo): (usize, usize),
    out: &mut Vec<f32>,
    argmax: Option<&mut Vec<usize>>,
) {
    let Some(argmax) = argmax else {
        max_2x2_values(x, h, w, (ho, wo), out);
        return;
    };
    for (p, plane) in x.chunks_exact(h * w).enumerate() {
        for oy in 0..ho {
            let top = &plane[2 * oy * w..][..2 * wo];
            let bottom = &plane[(2 * oy + 1) * w..][..2 * wo];
            let pairs = top.chunks_exact(2).zip(bottom.chunks_exact(2));
            let at = p * h * w + 2 * oy * w;
            for (ox, (t, b)) in pairs.enumerate() {
                // The first cell is the winner before any scan (it stays
                // so if all are -inf).
                let (mut best, mut offset) = (t[0], 0);
                for (v, o) in [(t[1], 1), (b[0], w), (b[1], w + 1)] {
                    let take = wins(v, best);
                    best = if take { v } else { best };
                    offset = if take { o } else { offset };
                }
                out.push(best);
                argmax.push(at + 2 * ox + offset);
            }
        }
    }
}

/// [`max_2x2`]'s maxima alone, all planes' at once: first the larger of
/// each row's horizontal pairs, for the whole tensor in one loop (pairs
/// never straddle rows when the width is even), then the larger of each
/// window's top and bottom pair. Scanning the top pair, then the bottom
/// one, and keeping the top's winner on a tie is PyTorch's scan order
/// (top-left, top-right, bottom-left, bottom-right; the first maximum, or
/// the last NaN), so every bit matches the per-window scan. Per-row loops
/// with rows of 4 or 8 values cost 0.4 ns a value, twice this.
#[inline(always)]
fn max_2x2_values(x: &[f32], h: usize, w: usize, (ho, wo): (usize, usize), out: &mut Vec<f32>) {
    let pairs = |row: &[f32], dst: &mut [f32]| {
        for (d, p) in dst.iter_mut().zip(row.chunks_exact(2)) {
            *d = if wins(p[1], p[0]) { p[1] } else { p[0] };
        }
    };
    let start = out.len();
    let planes = x.len() / (h * w);
    out.resize(start + planes * ho * wo, 0.0);
    let out = &mut out[start..];
    // The horizontal winners, [planes, h, wo] (an odd last column dropped).
    let mut across = crate::storage::cache::take(planes * h * wo);
    across.resize(planes * h * wo, 0.0);
    if w.is_multiple_of(2) {
        pairs(x, &mut across);
    } else {
        for (row, dst) in x.chunks_exact(w).zip(across.chunks_exact_mut(wo)) {
            pairs(row, dst);
        }
    }
    // Each window's top winner against its bottom one (an odd last row
    // dropped). With an even height the row pairs are the whole tensor's
    // consecutive pairs of rows.
    if h.is_multiple_of(2) {
        // The common widths unrolled: a loop per row of 2 or 4 values is
        // mostly the loop's own instructions.
        match wo {
            2 => vertical_pairs_of::<2>(&across, out),
            4 => vertical_pairs_of::<4>(&across, out),
            8 => vertical_pairs_of::<8>(&across, out),
            16 => vertical_pairs_of::<16>(&across, out),
            _ => vertical_pairs(&across, out, wo),
        }
    } else {
        for (plane, dst) in across
            .chunks_exact(h * wo)
            .zip(out.chunks_exact_mut(ho * wo))
        {
            vertical_pairs(&plane[..2 * ho * wo], dst, wo);
        }
    }
    crate::storage::cache::give(across);
}

/// `dst`'s rows of `wo` values: the winners of `rows`' consecutive pairs
/// of rows, the top one keeping a tie.
#[inline(always)]
fn vertical_pairs(rows: &[f32], dst: &mut [f32], wo: usize) {
    for (pair, d) in rows.chunks_exact(2 * wo).zip(dst.chunks_exact_mut(wo)) {
        let (top, bottom) = pair.split_at(wo);
        for ((d, &t), &b) in d.iter_mut().zip(top).zip(bottom) {
            *d = if wins(b, t) { b } else { t };
        }
    }
}

/// [`vertical_pairs`] for rows of `N` values.
#[inline(always)]
fn vertical_pairs_of<const N: usize>(rows: &[f32], dst: &mut [f32]) {
    for (pair, d) in rows.chunks_exact(2 * N).zip(dst.chunks_exact_mut(N)) {
        for j in 0..N {
            let (t, b) = (pair[j], pair[N + j]);
            d[j] = if wins(b, t) { b } else { t };
        }
    }
}

/// Max pooling, as PyTorch's `F.max_pool2d`.
///
/// # Panics
///
/// As [`try_max_pool2d`].
#[track_caller]
pub fn max_pool2d(
    input: &Tensor,
    kernel_size: impl Into<Size2>,
    stride: Option<Size2>,
    padding: impl Into<Size2>,
) -> Tensor {
    or_panic(try_max_pool2d(input, kernel_size, stride, padding))
}

/// Max pooling of `input` `[N, C, H, W]` (or `[C, H, W]`) over windows of
/// `kernel_size` sliding by `stride` (`None`: by `kernel_size`, as
/// PyTorch's default), the image padded with `padding` cells of `-inf` on
/// each side: as PyTorch's `F.max_pool2d(input, kernel_size, stride,
/// padding)`. The output is `[N, C, Ho, Wo]`,
/// `Ho = (H + 2·padding − kernel) / stride + 1`.
///
/// The gradient of each output flows to the first maximum of its window
/// (row-major order), as PyTorch routes it; overlapping windows add up. A
/// window holding a NaN gives NaN (its gradient flows to the NaN: the last
/// one, as in PyTorch). Departures from PyTorch: no `dilation`,
/// `ceil_mode` (the output length is rounded down) or `return_indices`.
///
/// # Errors
///
/// [`Error::Rank`] if `input` is not 3-D or 4-D;
/// [`Error::InvalidArgument`] if its channels, height or width are 0, the
/// kernel or stride has a 0, the padding is more than half the kernel, or
/// the kernel is larger than the padded image; [`Error::ShapeTooLarge`] if
/// the output could not exist.
///
/// # Examples
///
/// ```
/// use netcl::Tensor;
/// use netcl::functional as F;
///
/// let x = Tensor::from_vec(
///     vec![1.0, 2.0, 5.0, 0.0, 3.0, 4.0, 1.0, 1.0, 0.0, 9.0, 2.0, 2.0, 8.0, 7.0, 2.0, 2.0],
///     &[1, 1, 4, 4],
/// )?
/// .requires_grad_(true);
/// let y = F::try_max_pool2d(&x, 2, None, 0)?;
/// assert_eq!(y.to_vec(), vec![4.0, 5.0, 9.0, 2.0]);
///
/// y.sum().backward();
/// // Each window's gradient goes to its maximum; the bottom-right window
/// // is a four-way tie, won by its first cell.
/// assert_eq!(
///     x.grad().unwrap().to_vec(),
///     vec![0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
/// );
///
/// // Padding cells are -inf: a 3x3 window at stride 2 with padding 1.
/// let y = F::try_max_pool2d(&x, 3, Some(2.into()), 1)?;
/// assert_eq!(y.to_vec(), vec![4.0, 5.0, 9.0, 9.0]);
/// # Ok::<(), netcl::Error>(())
/// ```
#[track_caller]
pub fn try_max_pool2d(
    input: &Tensor,
    kernel_size: impl Into<Size2>,
    stride: Option<Size2>,
    padding: impl Into<Size2>,
) -> Result<Tensor> {
    let (kernel, padding) = (kernel_size.into(), padding.into());
    let stride = stride.unwrap_or(kernel);
    let (planes, shape) = sliding("max_pool2d", input.shape(), kernel, Some(stride), padding)?;
    let x = contiguous(input.read().into_data());
    let w = planes.w;
    // Without padding every window lies inside the image: whole output
    // rows at a time, the maxima without their positions (found only if
    // the op is recorded).
    let unpadded = padding == Size2(0, 0);
    let (out, argmax) = if unpadded {
        let values = x.as_slice().expect("row-major");
        if crate::autograd::is_grad_enabled() && input.requires_grad() {
            // The op will be recorded: the positions in the same pass.
            let mut argmax = Vec::with_capacity(planes.count * planes.windows.len());
            let out = unpadded_max(&planes, values, kernel, stride, Some(&mut argmax));
            (out, Some(argmax))
        } else {
            (unpadded_max(&planes, values, kernel, stride, None), None)
        }
    } else {
        // The position of each output's maximum, in `x`.
        let mut argmax = Vec::with_capacity(planes.count * planes.windows.len());
        let out = pool_map(&planes, x.as_slice().expect("row-major"), |at, v, win| {
            // PyTorch's scan: a value wins if greater or NaN; the first
            // cell of the window wins if all are -inf.
            let (mut best, mut index) = (f32::NEG_INFINITY, win.y0 * w + win.x0);
            for iy in win.y0..win.y1 {
                for ix in win.x0..win.x1 {
                    let value = v[iy * w + ix];
                    if value > best || value.is_nan() {
                        (best, index) = (value, iy * w + ix);
                    }
                }
            }
            argmax.push(at + index);
            best
        });
        (out, Some(argmax))
    };
    let in_shape = x.shape().to_vec();
    let out = Data::from_vec(&shape, out);
    record("max_pool2d", &[input], out, move |_| {
        let argmax = argmax.unwrap_or_else(|| {
            let mut argmax = Vec::with_capacity(planes.count * planes.windows.len());
            let values = x.as_slice().expect("row-major");
            unpadded_max(&planes, values, kernel, stride, Some(&mut argmax));
            argmax
        });
        // dx[argmax[i]] += dy[i]; differentiably, a recorded scatter-add
        // (whose backward picks the maxima again)
        with_graph(
            (argmax, in_shape),
            |(argmax, in_shape): &(Vec<usize>, Vec<usize>),
             grad: Data,
             grads: &mut InputGrads<'_>| {
                let grad = contiguous(grad);
                let mut dx = crate::storage::cache::zeros(in_shape.iter().product());
                for (&i, &g) in argmax.iter().zip(grad.as_slice().expect("row-major")) {
                    dx[i] += g;
                }
                grads.put(0, Data::from_vec(in_shape, dx));
            },
            |(argmax, in_shape): &(Vec<usize>, Vec<usize>),
             grad: &Tensor,
             grads: &mut GraphGrads<'_>| {
                let offsets: Offsets = argmax.as_slice().into();
                grads.set(0, scatter_add(grad, &offsets, in_shape)?);
                Ok(())
            },
        )
    })
}

/// Backward of a mean over each output's window: each cell of the window
/// gets `dy / divisor[i]` (`divisors` one per window of a plane).
fn mean_backward(
    (planes, divisors, in_shape): &(Planes, Vec<f32>, Vec<usize>),
    grad: Data,
    grads: &mut InputGrads<'_>,
) {
    // y = Σ_window x / d  =>  dx[cell] += dy / d for each window holding it
    let grad = contiguous(grad);
    let dy = grad.as_slice().expect("row-major");
    let (plane, w) = (planes.h * planes.w, planes.w);
    let mut dx = crate::storage::cache::zeros(in_shape.iter().product());
    if !planes.windows.is_empty() {
        for (dx, dy) in dx
            .chunks_exact_mut(plane)
            .zip(dy.chunks_exact(planes.windows.len()))
        {
            for ((win, &d), &g) in planes.windows.iter().zip(divisors.iter()).zip(dy) {
                let g = g / d;
                for iy in win.y0..win.y1 {
                    for v in &mut dx[iy * w + win.x0..iy * w + win.x1] {
                        *v += g;
                    }
                }
            }
        }
    }
    grads.put(0, Data::from_vec(in_shape, dx));
}

/// [`mean_backward`] in recorded ops: each output's gradient taken once
/// per cell of its window (a recorded `take`), divided by the window's
/// divisor, and scatter-added to the cells (a recorded `scatter_add`).
fn mean_backward_graph(
    (planes, divisors, in_shape): &(Planes, Vec<f32>, Vec<usize>),
    grad: &Tensor,
    grads: &mut GraphGrads<'_>,
) -> Result<()> {
    let (plane, w, n) = (planes.h * planes.w, planes.w, planes.windows.len());
    let (mut outputs, mut cells, mut divide) = (Vec::new(), Vec::new(), Vec::new());
    if n != 0 {
        for p in 0..planes.count {
            for (k, (win, &d)) in planes
                .windows
                .iter()
                .zip(divisors.iter().cycle())
                .enumerate()
            {
                for iy in win.y0..win.y1 {
                    for ix in win.x0..win.x1 {
                        outputs.push(p * n + k);
                        cells.push(p * plane + iy * w + ix);
                        divide.push(d);
                    }
                }
            }
        }
    }
    let pairs = [outputs.len()];
    let outputs: Offsets = outputs.into();
    let cells: Offsets = cells.into();
    let spread = take(grad, &outputs, &pairs)?.try_div(&Tensor::from_vec(divide, &pairs)?)?;
    grads.set(0, scatter_add(&spread, &cells, in_shape)?);
    Ok(())
}

/// The mean of each window of `planes` over `input`, recorded as `op`.
#[track_caller]
fn mean_pool(
    op: &'static str,
    input: &Tensor,
    planes: Planes,
    divisors: Vec<f32>,
    shape: &[usize],
) -> Result<Tensor> {
    let x = contiguous(input.read().into_data());
    let w = planes.w;
    let mut k = 0;
    let out = pool_map(&planes, x.as_slice().expect("row-major"), |_, v, win| {
        let sum: f32 = (win.y0..win.y1)
            .map(|iy| v[iy * w + win.x0..iy * w + win.x1].iter().sum::<f32>())
            .sum();
        let d = divisors[k];
        k = (k + 1) % divisors.len();
        sum / d
    });
    let in_shape = x.shape().to_vec();
    let out = Data::from_vec(shape, out);
    record(op, &[input], out, move |_| {
        with_graph(
            (planes, divisors, in_shape),
            mean_backward,
            mean_backward_graph,
        )
    })
}

/// Average pooling, as PyTorch's `F.avg_pool2d`.
///
/// # Panics
///
/// As [`try_avg_pool2d`].
#[track_caller]
pub fn avg_pool2d(
    input: &Tensor,
    kernel_size: impl Into<Size2>,
    stride: Option<Size2>,
    padding: impl Into<Size2>,
    count_include_pad: bool,
) -> Tensor {
    or_panic(try_avg_pool2d(
        input,
        kernel_size,
        stride,
        padding,
        count_include_pad,
    ))
}

/// Average pooling of `input` `[N, C, H, W]` (or `[C, H, W]`) over windows
/// of `kernel_size` sliding by `stride` (`None`: by `kernel_size`), the
/// image padded with `padding` zeros on each side: as PyTorch's
/// `F.avg_pool2d(input, kernel_size, stride, padding,
/// count_include_pad=count_include_pad)`. Each output is its window's sum
/// divided by the window's size (`count_include_pad`) or by the number of
/// its cells inside the image (padding not counted). PyTorch's default is
/// `count_include_pad = true`.
///
/// The gradient of each output is shared among its window's cells in the
/// image, each getting `dy / divisor`. Departures from PyTorch: no
/// `ceil_mode` (the output length is rounded down) or `divisor_override`.
///
/// # Errors
///
/// As [`try_max_pool2d`].
///
/// # Examples
///
/// ```
/// use netcl::Tensor;
/// use netcl::functional as F;
///
/// let x = Tensor::from_vec(vec![1.0, 2.0, 3.0, 4.0], &[1, 1, 2, 2])?.requires_grad_(true);
/// let y = F::try_avg_pool2d(&x, 2, None, 0, true)?;
/// assert_eq!(y.to_vec(), vec![2.5]);
///
/// // 2x2 windows at stride 1 over the image padded with 1: the corner
/// // windows hold one cell of the image.
/// let y = F::try_avg_pool2d(&x, 2, Some(1.into()), 1, true)?;
/// assert_eq!(y.shape(), &[1, 1, 3, 3]);
/// assert_eq!(y.to_vec()[..3], [0.25, 0.75, 0.5]);
/// let y = F::try_avg_pool2d(&x, 2, Some(1.into()), 1, false)?;
/// assert_eq!(y.to_vec()[..3], [1.0, 1.5, 2.0]);
///
/// y.sum().backward();
/// // Each cell is in 4 windows: one of 1 cell, two of 2, one of 4.
/// assert_eq!(x.grad().unwrap().to_vec(), vec![2.25; 4]);
/// # Ok::<(), netcl::Error>(())
/// ```
#[track_caller]
pub fn try_avg_pool2d(
    input: &Tensor,
    kernel_size: impl Into<Size2>,
    stride: Option<Size2>,
    padding: impl Into<Size2>,
    count_include_pad: bool,
) -> Result<Tensor> {
    let kernel = kernel_size.into();
    let (planes, shape) = sliding("avg_pool2d", input.shape(), kernel, stride, padding.into())?;
    let divisors = planes
        .windows
        .iter()
        .map(|win| {
            if count_include_pad {
                (kernel.0 * kernel.1) as f32
            } else {
                ((win.y1 - win.y0) * (win.x1 - win.x0)) as f32
            }
        })
        .collect();
    mean_pool("avg_pool2d", input, planes, divisors, &shape)
}

/// Adaptive average pooling, as PyTorch's `F.adaptive_avg_pool2d`.
///
/// # Panics
///
/// As [`try_adaptive_avg_pool2d`].
#[track_caller]
pub fn adaptive_avg_pool2d(input: &Tensor, output_size: impl Into<Size2>) -> Tensor {
    or_panic(try_adaptive_avg_pool2d(input, output_size))
}

/// Average pooling of `input` `[N, C, H, W]` (or `[C, H, W]`) to an output
/// of `output_size` `(Ho, Wo)`, as PyTorch's
/// `F.adaptive_avg_pool2d(input, output_size)`: output row `i` averages
/// input rows `⌊i·H/Ho⌋ .. ⌈(i+1)·H/Ho⌉` (and columns likewise), so windows
/// overlap when `Ho` does not divide `H`. PyTorch's `None` entries in
/// `output_size` (keep the input's length) are not offered.
///
/// # Errors
///
/// [`Error::Rank`] if `input` is not 3-D or 4-D;
/// [`Error::InvalidArgument`] if its channels, height or width are 0;
/// [`Error::ShapeTooLarge`] if the output could not exist.
///
/// # Examples
///
/// ```
/// use netcl::Tensor;
/// use netcl::functional as F;
///
/// // 5 columns to 3: windows 0..2, 1..4, 3..5 (the middle ones overlap).
/// let x = Tensor::from_vec(vec![1.0, 2.0, 3.0, 4.0, 5.0], &[1, 1, 5])?.requires_grad_(true);
/// let y = F::try_adaptive_avg_pool2d(&x, [1, 3])?;
/// assert_eq!(y.to_vec(), vec![1.5, 3.0, 4.5]);
///
/// y.sum().backward();
/// assert_eq!(
///     x.grad().unwrap().to_vec(),
///     vec![0.5, 0.5 + 1.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0 + 0.5, 0.5]
/// );
///
/// // Global average pooling.
/// let y = F::try_adaptive_avg_pool2d(&x, 1)?;
/// assert_eq!(y.to_vec(), vec![3.0]);
/// # Ok::<(), netcl::Error>(())
/// ```
#[track_caller]
pub fn try_adaptive_avg_pool2d(input: &Tensor, output_size: impl Into<Size2>) -> Result<Tensor> {
    const OP: &str = "adaptive_avg_pool2d";
    let x = input.shape();
    let (count, h, w) = planes_of(OP, x)?;
    let Size2(ho, wo) = output_size.into();
    let shape = out_shape(OP, x, ho, wo)?;
    // Window i of n over len: ⌊i·len/n⌋ .. ⌈(i+1)·len/n⌉, in u128 (the
    // products may pass usize), each bound at most len.
    let span = |i: usize, n: usize, len: usize| {
        let (i, n, len) = (i as u128, n as u128, len as u128);
        let end = (i + 1) * len;
        (
            (i * len / n) as usize,
            (end / n + u128::from(end % n != 0)) as usize,
        )
    };
    let windows: Vec<Window> = if shape.contains(&0) {
        Vec::new()
    } else {
        (0..ho)
            .flat_map(|oy| (0..wo).map(move |ox| (oy, ox)))
            .map(|(oy, ox)| {
                let (y0, y1) = span(oy, ho, h);
                let (x0, x1) = span(ox, wo, w);
                Window { y0, y1, x0, x1 }
            })
            .collect()
    };
    let divisors = windows
        .iter()
        .map(|win| ((win.y1 - win.y0) * (win.x1 - win.x0)) as f32)
        .collect();
    let planes = Planes {
        count,
        h,
        w,
        windows,
    };
    mean_pool(OP, input, planes, divisors, &shape)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(values: Vec<f32>, h: usize, w: usize) -> Tensor {
        Tensor::from_vec(values, &[1, 1, h, w])
            .unwrap()
            .requires_grad_(true)
    }

    /// PyTorch's scan, window by window over the padded image (`-inf`
    /// outside): the maxima and the winners' positions in `x`.
    fn scan(
        x: &[f32],
        [planes, h, w]: [usize; 3],
        k: (usize, usize),
        s: (usize, usize),
        pad: (usize, usize),
    ) -> (Vec<f32>, Vec<usize>) {
        let ho = (h + 2 * pad.0 - k.0) / s.0 + 1;
        let wo = (w + 2 * pad.1 - k.1) / s.1 + 1;
        let (mut values, mut positions) = (Vec::new(), Vec::new());
        for p in 0..planes {
            for oy in 0..ho {
                for ox in 0..wo {
                    let (mut best, mut at) = (f32::NEG_INFINITY, None);
                    for i in 0..k.0 {
                        for j in 0..k.1 {
                            let (iy, ix) = (
                                (oy * s.0 + i) as isize - pad.0 as isize,
                                (ox * s.1 + j) as isize - pad.1 as isize,
                            );
                            if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                continue;
                            }
                            let index = p * h * w + iy as usize * w + ix as usize;
                            at.get_or_insert(index);
                            if x[index] > best || x[index].is_nan() {
                                (best, at) = (x[index], Some(index));
                            }
                        }
                    }
                    values.push(best);
                    positions.push(at.unwrap());
                }
            }
        }
        (values, positions)
    }

    #[test]
    fn max_pool_paths_agree_with_pytorchs_scan() {
        // Values drawn from a few levels (ties everywhere), with NaNs,
        // -inf, and both zeros; 2x2 at stride 2 (its own path), other
        // unpadded windows (overlapping, uneven), and padded ones.
        let levels = [0.0, -0.0, 1.0, 1.0, 2.0, f32::NEG_INFINITY, f32::NAN, -3.0];
        let all = [
            ((2, 2), (2, 2), (0, 0)),
            ((3, 2), (1, 2), (0, 0)),
            ((2, 3), (3, 1), (0, 0)),
            ((3, 3), (2, 2), (1, 1)),
        ];
        // 2x2 windows alone on more sizes: odd and even heights and widths,
        // output rows of 2, 4, 8 and 16 (unrolled) and 3 and 5 values.
        let sizes = [
            (7, 9),
            (8, 8),
            (4, 4),
            (8, 9),
            (7, 8),
            (6, 32),
            (2, 4),
            (5, 6),
            (4, 10),
        ];
        for (n, &(h, w)) in sizes.iter().enumerate() {
            let planes = 6;
            let mut x: Vec<f32> = (0..planes * h * w)
                .map(|i| levels[(i * 7 + i / 5) % levels.len()])
                .collect();
            // All -inf in one plane: the first cell of each window wins.
            x[..h * w].fill(f32::NEG_INFINITY);
            for &(k, s, pad) in if n == 0 { &all[..] } else { &all[..1] } {
                let (want, positions) = scan(&x, [planes, h, w], k, s, pad);
                let t = Tensor::from_vec(x.clone(), &[2, 3, h, w]).unwrap();
                for grad in [false, true] {
                    let t = t.clone().requires_grad_(grad);
                    let y = max_pool2d(&t, k, Some(s.into()), pad);
                    let got = y.to_vec();
                    assert_eq!(got.len(), want.len());
                    for (g, e) in got.iter().zip(&want) {
                        assert!(
                            g.to_bits() == e.to_bits() || (g.is_nan() && e.is_nan()),
                            "{h}x{w} {k:?} {s:?}: {g} vs {e}"
                        );
                    }
                    if grad {
                        // A distinct gradient per output shows where each went.
                        let dy: Vec<f32> = (0..got.len()).map(|i| 1.0 + i as f32).collect();
                        let dy = Tensor::from_vec(dy.clone(), y.shape()).unwrap();
                        (&y * &dy).sum().backward();
                        let mut expected = vec![0.0; x.len()];
                        for (i, &at) in positions.iter().enumerate() {
                            expected[at] += 1.0 + i as f32;
                        }
                        assert_eq!(t.grad().unwrap().to_vec(), expected, "{k:?} {s:?} {pad:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn max_pool_ties_route_the_gradient_to_the_first_maximum() {
        // [[1, 3, 3],
        //  [3, 2, 1]]: the 2x2 windows at stride 1 are tied at 3; each
        // sends its gradient to its first 3 in row-major order: window 0
        // to (0, 1), window 1 to (0, 1) as well.
        let x = image(vec![1.0, 3.0, 3.0, 3.0, 2.0, 1.0], 2, 3);
        let y = max_pool2d(&x, 2, Some(1.into()), 0);
        assert_eq!(y.to_vec(), vec![3.0, 3.0]);
        y.sum().backward();
        assert_eq!(
            x.grad().unwrap().to_vec(),
            vec![0.0, 2.0, 0.0, 0.0, 0.0, 0.0]
        );
    }

    #[test]
    fn max_pool_nan_wins_and_takes_the_gradient() {
        let x = image(vec![1.0, f32::NAN, 5.0, 2.0], 2, 2);
        let y = max_pool2d(&x, 2, None, 0);
        assert!(y.to_vec()[0].is_nan());
        y.sum().backward();
        assert_eq!(x.grad().unwrap().to_vec(), vec![0.0, 1.0, 0.0, 0.0]);
    }

    #[test]
    fn max_pool_padding_is_never_the_maximum() {
        // All values negative: a padded window's maximum is still a value
        // of the image, never the padding's -inf (nor a 0).
        let x = image(vec![-4.0, -3.0, -2.0, -1.0], 2, 2);
        let y = max_pool2d(&x, 2, Some(1.into()), 1);
        assert_eq!(y.shape(), &[1, 1, 3, 3]);
        assert_eq!(
            y.to_vec(),
            vec![-4.0, -3.0, -3.0, -2.0, -1.0, -1.0, -2.0, -1.0, -1.0]
        );
    }

    #[test]
    fn avg_pool_divisor_with_and_without_padding() {
        // One 3x3 window at padding 1 over a 2x2 image of ones: 4 cells
        // inside, 9 in the window.
        let x = image(vec![1.0; 4], 2, 2);
        let counted = avg_pool2d(&x, 3, None, 1, true);
        assert_eq!(counted.to_vec(), vec![4.0 / 9.0]);
        let inside = avg_pool2d(&x, 3, None, 1, false);
        assert_eq!(inside.to_vec(), vec![1.0]);
        inside.sum().backward();
        assert_eq!(x.grad().unwrap().to_vec(), vec![0.25; 4]);
    }

    #[test]
    fn avg_pool_propagates_nan_to_its_windows_only() {
        let x = image(vec![f32::NAN, 1.0, 2.0, 3.0, 4.0, 5.0], 2, 3);
        let y = avg_pool2d(&x, [2, 1], None, 0, true);
        let y = y.to_vec();
        assert!(y[0].is_nan());
        assert_eq!(&y[1..], &[2.5, 3.5]);
    }

    #[test]
    fn adaptive_windows_overlap_as_pytorch_computes_them() {
        // 5 -> 3: windows ⌊i·5/3⌋..⌈(i+1)·5/3⌉ = 0..2, 1..4, 3..5.
        let x = image(vec![1.0, 2.0, 3.0, 4.0, 5.0], 5, 1);
        let y = adaptive_avg_pool2d(&x, [3, 1]);
        assert_eq!(y.to_vec(), vec![1.5, 3.0, 4.5]);
        // 2 -> 3 (larger output): windows 0..1, 0..2, 1..2.
        let x = image(vec![2.0, 4.0], 1, 2);
        let y = adaptive_avg_pool2d(&x, [1, 3]);
        assert_eq!(y.to_vec(), vec![2.0, 3.0, 4.0]);
    }

    #[test]
    fn errors_name_the_op_and_what_is_wrong() {
        let x = Tensor::zeros(&[1, 2, 4, 4]);
        let msg = |r: Result<Tensor>| r.unwrap_err().to_string();
        assert_eq!(
            msg(try_max_pool2d(&x, 3, None, 2)),
            "max_pool2d: pad should be at most half of kernel size, but got pad=(2, 2) and kernel_size=(3, 3)"
        );
        assert_eq!(
            msg(try_avg_pool2d(&x, [5, 2], None, 0, true)),
            "avg_pool2d: kernel_size (5, 2) is larger than the padded input (4 x 4): output size is too small"
        );
        assert_eq!(
            msg(try_max_pool2d(&x, 2, Some(Size2(0, 1)), 0)),
            "max_pool2d: stride must be positive, got (0, 1)"
        );
        assert_eq!(
            msg(try_max_pool2d(&Tensor::zeros(&[1, 0, 4, 4]), 2, None, 0)),
            "max_pool2d: expected non-empty channels, height and width, got input [1, 0, 4, 4]"
        );
        assert_eq!(
            msg(try_adaptive_avg_pool2d(&Tensor::zeros(&[4, 4]), 2)),
            "adaptive_avg_pool2d: expected a 3-D [C, H, W] or 4-D [N, C, H, W] input, got a tensor of shape [4, 4]"
        );
        // An empty batch is fine.
        let y = try_avg_pool2d(&Tensor::zeros(&[0, 2, 4, 4]), 2, None, 0, true).unwrap();
        assert_eq!(y.shape(), &[0, 2, 2, 2]);
    }
}
