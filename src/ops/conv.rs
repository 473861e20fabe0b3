//! Convolution over NCHW images (`conv2d`) and NCL sequences (`conv1d`),
//! as PyTorch's `F.conv2d` and `F.conv1d`: cross-correlation with stride,
//! zero padding, dilation and groups.
//!
//! # How it computes
//!
//! Each image's group of channels is lowered to a matrix product through
//! the gemm kernel ([`crate::ops::gemm`]): its receptive fields are copied
//! into a column matrix `cols` of `[C/groups · kH · kW, Ho · Wo]` (im2col),
//! and the output is `W_g · cols + b` with `W_g` the group's filters as a
//! `[O/groups, C/groups · kH · kW]` matrix. The work is split into chunks
//! whose column matrix stays in cache ([`BAND`] values, in a per-thread
//! scratch buffer: `thread_local!`, never shared between threads, taken
//! out of its slot while in use so a nested call on the same thread gets
//! its own):
//!
//! - a large image is lowered a band of output rows at a time (the tiling
//!   candle adopted in candle#3119), by row copies;
//! - small images (a CNN on 8x8 digits) are lowered several at a time,
//!   their columns side by side, so one product covers the chunk instead
//!   of one tiny product per image; each entry is gathered through a
//!   table of the input position it reads, built once per geometry and
//!   thread (row copies of 4-8 values cost more than they move).
//!
//! A stride-1 convolution of large images is lowered by padded rows
//! instead ([`Rows`]): one contiguous copy per column-matrix row from a
//! zero-padded image, at the price of `Wp − Wo` junk columns per output
//! row. Where the CPU has AVX-512, those convolutions (and medium ones, of
//! at least 64 taps and 64 output positions) run on kernels of their own
//! that read the padded image in place ([`conv_direct`]); other CPUs and
//! loom builds take the lowerings above.
//!
//! The backward runs the same chunks: `dW_gᵀ += cols · dY_gᵀ` (accumulated
//! over the batch, transposed into `dW` once at the end: the kernel is
//! faster with the output channels as the contiguous axis),
//! `dx = col2im(W_gᵀ · dY_g)`, `db = Σ dY` over the batch and the
//! positions. The input is saved and its columns rebuilt in the backward
//! rather than kept (they are `kH · kW` times the input's size). For
//! stride 1, padding within the kernel's span and no more output channels
//! than input channels per group, `dx` is instead the forward of `dY` with
//! the filters turned 180° and their channel axes swapped
//! ([`Geom::input_gradient`]), which writes `dx` directly where the
//! adjoint's product and scatter-adds move more data.
//!
//! # Departures from PyTorch
//!
//! `padding` is a number (or a pair) of zeros on each side: PyTorch's
//! string forms `"same"` and `"valid"` and its `padding_mode` (a layer
//! option) are not offered; `"valid"` is `padding = 0`.

use ndarray::{ArrayView2, ArrayViewMut2, ShapeBuilder};

use crate::array::{MAX_ELEMENTS, checked_numel};
use crate::autograd::function::{Backprop, GraphGrads, InputGrads, record};
use crate::error::{Error, Result, or_panic};
use crate::ops::conv_direct::{self, Direct};
use crate::ops::gemm::{gemm_acc_into, gemm_into};
use crate::ops::graph::{Offsets, scatter_add, take};
use crate::ops::layout::pad_axis;
use crate::tensor::{Data, Tensor};

/// A length per spatial axis, `(height, width)`, for the `stride`,
/// `padding`, `dilation` and `kernel_size` arguments of the 2-D ops: PyTorch
/// takes an `int` or a pair there, and so does netcl, through `Into<Size2>`
/// (`2`, `[2, 1]` and `(2, 1)` all convert).
///
/// # Examples
///
/// ```
/// use netcl::functional::Size2;
///
/// assert_eq!(Size2::from(3), Size2(3, 3));
/// assert_eq!(Size2::from([3, 1]), Size2(3, 1));
/// assert_eq!(Size2::from((3, 1)), Size2(3, 1));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Size2(
    /// The length along the height axis (rows).
    pub usize,
    /// The length along the width axis (columns).
    pub usize,
);

impl From<usize> for Size2 {
    fn from(both: usize) -> Size2 {
        Size2(both, both)
    }
}

impl From<[usize; 2]> for Size2 {
    fn from([h, w]: [usize; 2]) -> Size2 {
        Size2(h, w)
    }
}

impl From<(usize, usize)> for Size2 {
    fn from((h, w): (usize, usize)) -> Size2 {
        Size2(h, w)
    }
}

impl std::fmt::Display for Size2 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "({}, {})", self.0, self.1)
    }
}

/// The values of `data` in row-major order: itself, or a row-major copy of
/// a view (a permuted tensor).
pub(crate) fn contiguous(data: Data) -> Data {
    if data.as_slice().is_some() {
        data
    } else {
        let shape = data.shape().to_vec();
        data.reshape(&shape)
    }
}

/// `a / b` rounded up, without overflow.
fn ceil_div(a: usize, b: usize) -> usize {
    a / b + usize::from(!a.is_multiple_of(b))
}

/// The output length of a window of `kernel` taps `dilation` apart sliding
/// by `stride` over `len` values padded with `padding` on each side:
/// `(len + 2·padding − dilation·(kernel − 1) − 1) / stride + 1`. `None` if
/// the window does not fit in the padded input. Computed in `u128`, so no
/// argument overflows it; the padded length must be at most
/// [`MAX_ELEMENTS`] (checked here: `Err` with the padded length).
pub(crate) fn window_count(
    len: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
    dilation: usize,
) -> std::result::Result<Option<usize>, u128> {
    let padded = len as u128 + 2 * padding as u128;
    if padded > MAX_ELEMENTS as u128 {
        return Err(padded);
    }
    let span = dilation as u128 * (kernel as u128 - 1) + 1;
    if span > padded {
        return Ok(None);
    }
    // At most `padded`, so it fits.
    Ok(Some(((padded - span) / stride as u128 + 1) as usize))
}

/// The shapes and hyper-parameters of one convolution, as 2-D (a 1-D
/// convolution is one of height 1). Validated by [`Geom::new`]: every
/// product below fits in `usize`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Geom {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    o: usize,
    groups: usize,
    kh: usize,
    kw: usize,
    sh: usize,
    sw: usize,
    ph: usize,
    pw: usize,
    dh: usize,
    dw: usize,
    ho: usize,
    wo: usize,
}

/// How many values a band of the column matrix holds at most (1 MiB): the
/// band stays in the second-level cache while the kernel reads it.
const BAND: usize = 1 << 18;

/// A unit of the lowering: images `n0..n1`, output rows `oy0..oy1` of
/// each. Its column matrix is `[K, (n1 − n0) · (oy1 − oy0) · Wo]`, the
/// columns of each image side by side.
#[derive(Clone, Copy, Debug)]
struct Chunk {
    n0: usize,
    n1: usize,
    oy0: usize,
    oy1: usize,
}

impl Chunk {
    /// Images in the chunk.
    fn images(&self) -> usize {
        self.n1 - self.n0
    }

    /// Columns per image: the band's output positions.
    fn band(&self, g: &Geom) -> usize {
        (self.oy1 - self.oy0) * g.wo
    }

    /// Columns of the chunk's column matrix.
    fn cols(&self, g: &Geom) -> usize {
        self.images() * self.band(g)
    }
}

impl Geom {
    /// Checks the operands of `op` (`"conv1d"`, 1 spatial axis, or
    /// `"conv2d"`, 2) as PyTorch does, and returns the geometry and the
    /// output's shape.
    #[allow(clippy::too_many_arguments)]
    fn new(
        op: &'static str,
        spatial: usize,
        x: &[usize],
        weight: &[usize],
        bias: Option<&[usize]>,
        stride: Size2,
        padding: Size2,
        dilation: Size2,
        groups: usize,
    ) -> Result<(Geom, Vec<usize>)> {
        let (input_rank, weight_rank) = match spatial {
            1 => (
                "a 2-D [C, L] or 3-D [N, C, L] input",
                "a 3-D weight [out_channels, in_channels / groups, kL]",
            ),
            _ => (
                "a 3-D [C, H, W] or 4-D [N, C, H, W] input",
                "a 4-D weight [out_channels, in_channels / groups, kH, kW]",
            ),
        };
        if x.len() != spatial + 1 && x.len() != spatial + 2 {
            return Err(Error::Rank {
                op,
                expected: input_rank,
                shape: x.to_vec(),
            });
        }
        if weight.len() != spatial + 2 {
            return Err(Error::Rank {
                op,
                expected: weight_rank,
                shape: weight.to_vec(),
            });
        }
        let invalid = |message: String| Error::InvalidArgument { op, message };
        if groups == 0 {
            return Err(invalid("groups must be positive, got 0".into()));
        }
        for (name, value) in [("stride", stride), ("dilation", dilation)] {
            if value.0 == 0 || value.1 == 0 {
                let value = if spatial == 1 {
                    value.1.to_string()
                } else {
                    value.to_string()
                };
                return Err(invalid(format!("{name} must be positive, got {value}")));
            }
        }
        let batched = x.len() == spatial + 2;
        let n = if batched { x[0] } else { 1 };
        let rest = &x[usize::from(batched)..];
        let (c, h, w) = if spatial == 1 {
            (rest[0], 1, rest[1])
        } else {
            (rest[0], rest[1], rest[2])
        };
        let (o, cg) = (weight[0], weight[1]);
        let (kh, kw) = if spatial == 1 {
            (1, weight[2])
        } else {
            (weight[2], weight[3])
        };
        if kh == 0 || kw == 0 {
            return Err(invalid(format!("weight {weight:?} has an empty kernel")));
        }
        if o % groups != 0 {
            return Err(invalid(format!(
                "given groups={groups}, expected weight to be divisible by {groups} at dimension 0, but got weight of size {weight:?}"
            )));
        }
        if cg.checked_mul(groups) != Some(c) {
            return Err(invalid(format!(
                "given groups={groups}, weight of size {weight:?}, expected input {x:?} to have {} channels, but got {c} channels",
                cg as u128 * groups as u128
            )));
        }
        if let Some(bias) = bias
            && bias != [o]
        {
            return Err(Error::ShapeMismatch {
                op,
                lhs: vec![o],
                rhs: bias.to_vec(),
            });
        }
        let too_large = |padded: u128| {
            invalid(format!(
                "padding makes a padded input of length {padded}, past the largest tensor"
            ))
        };
        let ho = window_count(h, kh, stride.0, padding.0, dilation.0).map_err(too_large)?;
        let wo = window_count(w, kw, stride.1, padding.1, dilation.1).map_err(too_large)?;
        let (Some(ho), Some(wo)) = (ho, wo) else {
            let span = |k: usize, d: usize| d as u128 * (k as u128 - 1) + 1;
            let padded = |len: usize, p: usize| len as u128 + 2 * p as u128;
            return Err(invalid(if spatial == 1 {
                format!(
                    "calculated padded input size per channel: ({}). Kernel size: ({}). Kernel size can't be greater than actual input size",
                    padded(w, padding.1),
                    span(kw, dilation.1)
                )
            } else {
                format!(
                    "calculated padded input size per channel: ({} x {}). Kernel size: ({} x {}). Kernel size can't be greater than actual input size",
                    padded(h, padding.0),
                    padded(w, padding.1),
                    span(kh, dilation.0),
                    span(kw, dilation.1)
                )
            }));
        };
        let mut out = Vec::with_capacity(x.len());
        if batched {
            out.push(n);
        }
        out.push(o);
        if spatial == 2 {
            out.push(ho);
        }
        out.push(wo);
        let numel = checked_numel(op, &out)?;
        let geom = Geom {
            n,
            c,
            h,
            w,
            o,
            groups,
            kh,
            kw,
            sh: stride.0,
            sw: stride.1,
            ph: padding.0,
            pw: padding.1,
            dh: dilation.0,
            dw: dilation.1,
            ho,
            wo,
        };
        // A computed convolution's column band must fit in memory too
        // (empty outputs and empty kernels compute nothing).
        if numel > 0 && geom.k() > 0 {
            checked_numel(op, &[geom.k(), wo])?;
        }
        Ok((geom, out))
    }

    /// Input channels per group.
    fn cg(&self) -> usize {
        self.c / self.groups
    }

    /// Output channels per group.
    fn og(&self) -> usize {
        self.o / self.groups
    }

    /// Rows of the column matrix: the taps of one group's filter.
    fn k(&self) -> usize {
        self.cg() * self.kh * self.kw
    }

    /// Values of one channel of the zero-padded image.
    fn padded_plane(&self) -> usize {
        (self.h + 2 * self.ph) * (self.w + 2 * self.pw)
    }

    /// Output positions per channel.
    fn p(&self) -> usize {
        self.ho * self.wo
    }

    /// The units of work, each a column matrix of at most [`BAND`] values
    /// (one output row at least): several whole images when one image's
    /// columns are small (so one product covers them all, instead of one
    /// small product per image), else bands of output rows of one image.
    fn chunks(&self) -> Vec<Chunk> {
        let image = self.k() * self.p();
        if image <= BAND / 2 {
            let images = (BAND / image.max(1)).max(1);
            return (0..self.n)
                .step_by(images)
                .map(|n0| Chunk {
                    n0,
                    n1: (n0 + images).min(self.n),
                    oy0: 0,
                    oy1: self.ho,
                })
                .collect();
        }
        let rows = (BAND / (self.k() * self.wo).max(1)).max(1);
        (0..self.n)
            .flat_map(|n| {
                (0..self.ho).step_by(rows).map(move |oy0| Chunk {
                    n0: n,
                    n1: n + 1,
                    oy0,
                    oy1: (oy0 + rows).min(self.ho),
                })
            })
            .collect()
    }

    /// The geometry whose forward computes this convolution's input
    /// gradient, where one exists: for stride 1 and padding at most the
    /// kernel's span `d·(k − 1)` on each axis, `dx = conv(dY, W′)` with
    /// `W′[g·C/g + c, o, i, j] = W[g·O/g + o, c, kH − 1 − i, kW − 1 − j]`
    /// (the filters turned 180° with their channel axes swapped, per
    /// group), padding `d·(k − 1) − p`, the same dilation and groups: tap
    /// `(i, j)` of output `(oy, ox)` reads input `(oy + i·d − p, …)`, so
    /// input `(y, x)` collects `dY[y − i·d + p, …]` through tap `(i, j)`,
    /// which the turned kernel reads at offset `(kH − 1 − i)·d` of a window
    /// padded by `d·(kH − 1) − p`.
    fn input_gradient(&self) -> Option<Geom> {
        let span_h = self.dh * (self.kh - 1);
        let span_w = self.dw * (self.kw - 1);
        (self.sh == 1 && self.sw == 1 && self.ph <= span_h && self.pw <= span_w).then(|| Geom {
            n: self.n,
            c: self.o,
            h: self.ho,
            w: self.wo,
            o: self.c,
            groups: self.groups,
            kh: self.kh,
            kw: self.kw,
            sh: 1,
            sw: 1,
            ph: span_h - self.ph,
            pw: span_w - self.pw,
            dh: self.dh,
            dw: self.dw,
            ho: self.h,
            wo: self.w,
        })
    }

    /// [`input_gradient`](Geom::input_gradient)'s geometry where the
    /// backward computes dx through it. Its column matrix has `O/g · kH ·
    /// kW` rows where the lowering's adjoint makes one of `C/g · kH · kW`
    /// (the product's output): measured (32 images of 32x32, 3x3, padding
    /// 1, one thread, medians of 5-8 alternating runs), the forward takes
    /// 0.63x the adjoint's time with 32 input channels and 16 output,
    /// 0.87x with 32 and 32, and 1.0-1.15x with 16 and 32
    /// (`conv2d_fwd_bwd_1t`), so it is used when `O/g ≤ C/g`, on large
    /// images only (where it was measured). Nor where its band would be
    /// much larger than this convolution's (few output channels of a wide
    /// image, many input channels). Through [`Direct`]'s kernels (no
    /// column matrix) it is used wherever both convolutions are large:
    /// the input gradient of `conv2d_fwd_bwd_1t` then takes about the
    /// forward's time (1.1-1.2 ms, against 2.2 ms for the adjoint).
    fn input_gradient_by_forward(&self) -> Option<Geom> {
        #[cfg(test)]
        if let Some(forced) = tests::FORCE_TURNED.get() {
            return self.input_gradient().filter(|_| forced);
        }
        let band = |g: &Geom| g.k().saturating_mul(g.w + 2 * g.pw);
        self.input_gradient().filter(|tg| {
            let direct = Rows::plan(tg).is_some_and(|rows| rows.direct.is_some());
            Rows::plan(self).is_some()
                && (direct || self.og() <= self.cg() && band(tg) <= BAND.max(band(self)))
        })
    }

    /// The input row read by output row `oy` at kernel row `i`, `None` in
    /// the padding.
    fn input_row(&self, oy: usize, i: usize) -> Option<usize> {
        (oy * self.sh + i * self.dh)
            .checked_sub(self.ph)
            .filter(|&iy| iy < self.h)
    }

    /// The output columns `lo..hi` whose kernel column `j` reads inside
    /// the input (the others read padding), and the input column `lo` reads.
    fn inside_cols(&self, j: usize) -> (usize, usize, usize) {
        let offset = j * self.dw;
        let lo = ceil_div(self.pw.saturating_sub(offset), self.sw).min(self.wo);
        let hi = ceil_div((self.w + self.pw).saturating_sub(offset), self.sw).clamp(lo, self.wo);
        (lo, hi, (lo * self.sw + offset).saturating_sub(self.pw))
    }
}

/// Copies the receptive fields of output rows `oy0..oy1` of one image's
/// group of channels `x` (`[C/groups, H, W]`) into `cols`
/// (`[C/groups · kH · kW, (oy1 − oy0) · Wo]`): row `(c, i, j)`, column
/// `(oy, ox)` holds `x[c, oy·sH + i·dH − pH, ox·sW + j·dW − pW]`, 0 in the
/// padding. Row `r` of `cols` starts at `r · ld` (`ld` at least the
/// band's width: the columns of several images side by side).
fn im2col(g: &Geom, x: &[f32], (oy0, oy1): (usize, usize), cols: &mut [f32], ld: usize) {
    let (wo, plane) = (g.wo, g.h * g.w);
    let width = (oy1 - oy0) * wo;
    let mut row = 0;
    for c in 0..g.cg() {
        let x = &x[c * plane..(c + 1) * plane];
        for i in 0..g.kh {
            for j in 0..g.kw {
                let dst = &mut cols[row * ld..row * ld + width];
                row += 1;
                let (lo, hi, ix) = g.inside_cols(j);
                for (oy, d) in (oy0..oy1).zip(dst.chunks_exact_mut(wo)) {
                    let Some(iy) = g.input_row(oy, i) else {
                        d.fill(0.0);
                        continue;
                    };
                    let src = &x[iy * g.w + ix..];
                    d[..lo].fill(0.0);
                    d[hi..].fill(0.0);
                    if g.sw == 1 {
                        d[lo..hi].copy_from_slice(&src[..hi - lo]);
                    } else {
                        for (v, s) in d[lo..hi].iter_mut().zip(src.iter().step_by(g.sw)) {
                            *v = *s;
                        }
                    }
                }
            }
        }
    }
}

/// `src` into `dst`, both `N` values long when `N` is not 0 (a copy of a
/// fixed size), else of any equal length.
#[inline(always)]
fn copy_run<const N: usize>(src: &[f32], dst: &mut [f32]) {
    if N == 0 {
        dst.copy_from_slice(src);
    } else {
        let (dst, _) = dst[..N].as_chunks_mut::<N>();
        let (src, _) = src[..N].as_chunks::<N>();
        dst[0] = src[0];
    }
}

/// The column matrix of one whole image of a stride-1 convolution from
/// its zero-padded image `padded` (`[C/groups, H + 2pH, W + 2pW]`): row
/// `(c, i, j)`, output row `oy` is the run of `Wo` values of `padded` at
/// `[c, oy·sH + i·dH, j·dW]`. Row `r` starts at `r · ld` of `cols`. `WO`
/// is `Wo` when it is one of the common widths, 0 for any other (see
/// [`copy_run`]). On small images this is a handful of short copies per
/// row where [`im2col`] computes each row's bounds and fills, and where a
/// gather per value (the table) took 22% of the digits CNN's forward.
fn runs<const WO: usize>(g: &Geom, padded: &[f32], cols: &mut [f32], ld: usize) {
    debug_assert!(WO == 0 || WO == g.wo);
    let (plane, wp, wo) = (g.padded_plane(), g.w + 2 * g.pw, g.wo);
    let mut r = 0;
    for c in 0..g.cg() {
        let plane = &padded[c * plane..][..plane];
        for i in 0..g.kh {
            for j in 0..g.kw {
                let dst = &mut cols[r * ld..][..g.ho * wo];
                r += 1;
                for (oy, d) in dst.chunks_exact_mut(wo).enumerate() {
                    copy_run::<WO>(&plane[(oy * g.sh + i * g.dh) * wp + j * g.dw..][..wo], d);
                }
            }
        }
    }
}

/// The adjoint of [`runs`]: adds each run of one image's column-matrix
/// gradient `dcols` (row `r` at `r · ld`) into the zero-padded image
/// gradient `acc` (`[C/groups, H + 2pH, W + 2pW]`) it was copied from, the
/// rows in order (so each position's sum has the order of the gather
/// table's adjoint, and the same bits). `WO` is `Wo` when it is one of the
/// common widths (each run's adds unrolled), 0 for any other.
fn add_runs<const WO: usize>(g: &Geom, dcols: &[f32], ld: usize, acc: &mut [f32]) {
    debug_assert!(WO == 0 || WO == g.wo);
    let (plane, wp, wo) = (g.padded_plane(), g.w + 2 * g.pw, g.wo);
    let mut r = 0;
    for c in 0..g.cg() {
        let plane = &mut acc[c * plane..][..plane];
        for i in 0..g.kh {
            for j in 0..g.kw {
                let src = &dcols[r * ld..][..g.ho * wo];
                r += 1;
                for (oy, s) in src.chunks_exact(wo).enumerate() {
                    let at = (oy * g.sh + i * g.dh) * wp + j * g.dw;
                    let d = &mut plane[at..][..wo];
                    if WO == 0 {
                        for (d, v) in d.iter_mut().zip(s) {
                            *d += *v;
                        }
                    } else {
                        for k in 0..WO {
                            d[k] += s[k];
                        }
                    }
                }
            }
        }
    }
}

/// The adjoint of [`im2col`]: adds each value of `cols` into the input
/// position it was copied from (padding positions are dropped). Row `r`
/// of `cols` starts at `r · ld`.
fn col2im(g: &Geom, cols: &[f32], (oy0, oy1): (usize, usize), x: &mut [f32], ld: usize) {
    let (wo, plane) = (g.wo, g.h * g.w);
    let width = (oy1 - oy0) * wo;
    let mut row = 0;
    for c in 0..g.cg() {
        let x = &mut x[c * plane..(c + 1) * plane];
        for i in 0..g.kh {
            for j in 0..g.kw {
                let src = &cols[row * ld..row * ld + width];
                row += 1;
                let (lo, hi, ix) = g.inside_cols(j);
                for (oy, s) in (oy0..oy1).zip(src.chunks_exact(wo)) {
                    let Some(iy) = g.input_row(oy, i) else {
                        continue;
                    };
                    let dst = &mut x[iy * g.w + ix..];
                    if g.sw == 1 {
                        for (d, v) in dst[..hi - lo].iter_mut().zip(&s[lo..hi]) {
                            *d += *v;
                        }
                    } else {
                        for (d, v) in dst.iter_mut().step_by(g.sw).zip(&s[lo..hi]) {
                            *d += *v;
                        }
                    }
                }
            }
        }
    }
}

/// `Σ values`, in 16 independent partial sums (one dependent add per
/// value would be bound by the add's latency; these vectorise).
fn wide_sum(values: &[f32]) -> f32 {
    let mut partial = [0.0_f32; 16];
    let blocks = values.chunks_exact(16);
    let tail: f32 = blocks.remainder().iter().sum();
    for block in blocks {
        for (p, v) in partial.iter_mut().zip(block) {
            *p += *v;
        }
    }
    partial.iter().sum::<f32>() + tail
}

crate::sync::thread_local_const! {
    /// This thread's column buffer, reused between calls.
    static SCRATCH: std::cell::Cell<Vec<f32>> = std::cell::Cell::new(Vec::new());
}

/// The most values a thread keeps in its scratch buffer between calls
/// (16 MiB); a larger band's buffer is freed after its call.
const KEEP: usize = 1 << 22;

/// A buffer of this thread's, taken out of its slot (a nested call on this
/// thread, from a task stolen while the kernel waits, finds the slot empty
/// and allocates its own); give it back with [`put_scratch`].
fn take_scratch() -> Vec<f32> {
    SCRATCH.with(std::cell::Cell::take)
}

/// The first `len` values of `buffer`, grown if needed (values left from
/// an earlier use are not cleared: every caller overwrites them).
fn first(buffer: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if buffer.len() < len {
        buffer.resize(len, 0.0);
    }
    &mut buffer[..len]
}

/// Returns a buffer taken with [`take_scratch`], keeping the larger one.
fn put_scratch(buffer: Vec<f32>) {
    if buffer.capacity() <= KEEP {
        SCRATCH.with(|slot| {
            let held = slot.take();
            slot.set(if held.capacity() >= buffer.capacity() {
                held
            } else {
                buffer
            });
        });
    }
}

/// How a convolution's column matrices are built. Small images (whole
/// images per chunk, see [`Geom::chunks`]) go through a table of the
/// position each entry of one image's column matrix reads: a gather per
/// entry, where [`im2col`]'s row copies (several short copies and fills
/// per output row) cost more than they move on 8x8 images.
struct Lowering {
    /// `[K, P]`: the position in the image's group of channels
    /// (`[C/groups, H, W]`) each entry reads, `C/groups · H · W` for the
    /// padding; `None` for large images.
    table: Option<std::rc::Rc<[usize]>>,
    /// One image's group of channels and a 0 after it (the padding's
    /// value), or its gradient and a slot the padding's gradient goes to.
    image: Vec<f32>,
    /// Whether `image` holds a zero-padded image of a stride-1
    /// convolution (whose border every later image keeps).
    zeroed: bool,
}

crate::sync::thread_local_const! {
    /// This thread's gather tables of its latest small-image geometries
    /// (each geometry with `n` and `o` set to 0: the table depends on
    /// neither), at most [`TABLES_KEPT`] entries in all, oldest first. A
    /// model's convolutions meet the same few geometries on every call;
    /// building the table was 15% of the digits CNN's forward at batch 8.
    static TABLES: std::cell::RefCell<Vec<(Geom, std::rc::Rc<[usize]>)>> =
        std::cell::RefCell::new(Vec::new());
}

/// The most table entries a thread keeps in [`TABLES`] (512 KiB).
const TABLES_KEPT: usize = 1 << 16;

impl Lowering {
    fn new(g: &Geom) -> Lowering {
        let table = (g.k() * g.p() <= BAND / 2).then(|| {
            let key = Geom { n: 0, o: 0, ..*g };
            let kept = TABLES.with(|tables| {
                let tables = tables.borrow();
                tables
                    .iter()
                    .find(|(k, _)| *k == key)
                    .map(|(_, t)| t.clone())
            });
            kept.unwrap_or_else(|| {
                let table: std::rc::Rc<[usize]> = Lowering::table(g).into();
                if table.len() <= TABLES_KEPT {
                    TABLES.with(|tables| {
                        let mut tables = tables.borrow_mut();
                        while tables.iter().map(|(_, t)| t.len()).sum::<usize>() + table.len()
                            > TABLES_KEPT
                        {
                            tables.remove(0);
                        }
                        tables.push((key, table.clone()));
                    });
                }
                table
            })
        });
        Lowering {
            table,
            image: Vec::new(),
            zeroed: false,
        }
    }

    /// The gather table of `g` (see [`Lowering::table`](field@Lowering::table)).
    fn table(g: &Geom) -> Vec<usize> {
        let (plane, pad) = (g.h * g.w, g.cg() * g.h * g.w);
        let mut table = Vec::with_capacity(g.k() * g.p());
        for c in 0..g.cg() {
            for i in 0..g.kh {
                for j in 0..g.kw {
                    for oy in 0..g.ho {
                        let iy = g.input_row(oy, i);
                        table.extend((0..g.wo).map(|ox| {
                            let ix = (ox * g.sw + j * g.dw)
                                .checked_sub(g.pw)
                                .filter(|&ix| ix < g.w);
                            match (iy, ix) {
                                (Some(iy), Some(ix)) => c * plane + iy * g.w + ix,
                                _ => pad,
                            }
                        }));
                    }
                }
            }
        }
        table
    }

    /// Fills the column matrix of `chunk` for `group` (`[K, chunk
    /// columns]`, row-major, into the first values of `buffer`) and
    /// returns it.
    fn cols<'a>(
        &mut self,
        g: &Geom,
        x: &[f32],
        chunk: Chunk,
        group: usize,
        buffer: &'a mut Vec<f32>,
    ) -> ArrayView2<'a, f32> {
        let (k, ld, band) = (g.k(), chunk.cols(g), chunk.band(g));
        let cols = first(buffer, k * ld);
        let (image, len) = (g.c * g.h * g.w, g.cg() * g.h * g.w);
        for (i, n) in (chunk.n0..chunk.n1).enumerate() {
            let x = &x[n * image + group * len..];
            match &self.table {
                Some(_) if g.sw == 1 => {
                    let padded = first(&mut self.image, g.cg() * g.padded_plane());
                    if !self.zeroed {
                        // The border stays zero: each image writes only
                        // its inside.
                        padded.fill(0.0);
                        self.zeroed = true;
                    }
                    let wp = g.w + 2 * g.pw;
                    for (dst, src) in padded
                        .chunks_exact_mut(g.padded_plane())
                        .zip(x[..len].chunks_exact(g.h * g.w))
                    {
                        copy_rows((&mut dst[g.ph * wp + g.pw..], wp), (src, g.w), g.w, g.h);
                    }
                    let cols = &mut cols[i * band..];
                    match g.wo {
                        4 => runs::<4>(g, padded, cols, ld),
                        8 => runs::<8>(g, padded, cols, ld),
                        16 => runs::<16>(g, padded, cols, ld),
                        _ => runs::<0>(g, padded, cols, ld),
                    }
                }
                Some(table) => {
                    self.zeroed = false;
                    let padded = first(&mut self.image, len + 1);
                    padded[..len].copy_from_slice(&x[..len]);
                    padded[len] = 0.0;
                    let padded = &*padded;
                    let cols = &mut *cols;
                    // Compiled for the widest SIMD (AVX-512 gathers).
                    super::vectorized::dispatch(
                        #[inline(always)]
                        || {
                            for (r, taps) in table.chunks_exact(band).enumerate() {
                                let dst = &mut cols[r * ld + i * band..][..band];
                                for (d, &t) in dst.iter_mut().zip(taps) {
                                    *d = padded[t];
                                }
                            }
                        },
                    );
                }
                None => im2col(g, x, (chunk.oy0, chunk.oy1), &mut cols[i * band..], ld),
            }
        }
        ArrayView2::from_shape((k, ld), &*cols).expect("[K, chunk]")
    }

    /// Adds the column-matrix gradient `dcols` of `chunk` for `group`
    /// (`[K, chunk columns]`, row-major) into `dx`, the adjoint of
    /// [`cols`](Lowering::cols).
    fn add_cols(&mut self, g: &Geom, dcols: &[f32], chunk: Chunk, group: usize, dx: &mut [f32]) {
        let (ld, band) = (chunk.cols(g), chunk.band(g));
        let (image, len) = (g.c * g.h * g.w, g.cg() * g.h * g.w);
        for (i, n) in (chunk.n0..chunk.n1).enumerate() {
            let dx = &mut dx[n * image + group * len..];
            match &self.table {
                Some(_) if g.sw == 1 => {
                    self.zeroed = false;
                    let acc = first(&mut self.image, g.cg() * g.padded_plane());
                    acc.fill(0.0);
                    let dcols = &dcols[i * band..];
                    match g.wo {
                        4 => add_runs::<4>(g, dcols, ld, acc),
                        8 => add_runs::<8>(g, dcols, ld, acc),
                        16 => add_runs::<16>(g, dcols, ld, acc),
                        _ => add_runs::<0>(g, dcols, ld, acc),
                    }
                    // The inside of the padded gradient into `dx`.
                    let wp = g.w + 2 * g.pw;
                    for (plane, dx) in acc
                        .chunks_exact(g.padded_plane())
                        .zip(dx[..len].chunks_exact_mut(g.h * g.w))
                    {
                        let rows = &plane[g.ph * wp..][..g.h * wp];
                        for (row, d) in rows.chunks_exact(wp).zip(dx.chunks_exact_mut(g.w)) {
                            for (d, a) in d.iter_mut().zip(&row[g.pw..g.pw + g.w]) {
                                *d += *a;
                            }
                        }
                    }
                }
                Some(table) => {
                    self.zeroed = false;
                    let acc = first(&mut self.image, len + 1);
                    acc.fill(0.0);
                    for (r, taps) in table.chunks_exact(band).enumerate() {
                        let src = &dcols[r * ld + i * band..][..band];
                        for (&t, &v) in taps.iter().zip(src) {
                            acc[t] += v;
                        }
                    }
                    for (d, a) in dx[..len].iter_mut().zip(&acc[..len]) {
                        *d += *a;
                    }
                }
                None => col2im(g, &dcols[i * band..], (chunk.oy0, chunk.oy1), dx, ld),
            }
        }
    }
}

/// The lowering of a stride-1 convolution of large images ("padded
/// rows"): each image's group of channels is copied once into a zero-padded
/// plane `[C/groups, H + 2pH, W + 2pW]`, and the column matrix of a band
/// of output rows takes the padded width `Wp = W + 2pW` per output row
/// (`Wp − Wo` junk columns after each row's `Wo`): row `(c, i, j)` of it is
/// then one contiguous run of the padded plane, from `(oy0 + i·dH, j·dW)`
/// on, so building it is one copy per row (where [`im2col`] makes one
/// short copy per output row and tap) and its adjoint one long add per row
/// (where [`col2im`] adds per output row). The product gains the junk
/// columns (`Wp / Wo` the work: 6% at 32x32 with padding 1), dropped
/// when the output is written; in the backward they are zeroed before
/// they could reach a gradient (so a NaN or infinity reaches only what it
/// would reach without them). Measured side by side against the
/// row-copy lowering (`compare_pytorch.py --against`, 7 rounds): 0.85x
/// [0.82-0.90] the time of `conv2d_fwd_bwd_1t`, 0.77x [0.71-0.79] of
/// `conv2d_fwd_1t`.
///
/// Where the CPU has AVX-512 the plan computes through [`Direct`]'s
/// kernels instead, which read the padded plane's runs in place (no column
/// matrix, no bands): 0.70-0.74x the time of the above on those two
/// workloads (BENCHMARKS.md, "conv2d through direct kernels").
struct Rows {
    /// Padded height and width.
    hp: usize,
    wp: usize,
    /// Output rows per band.
    rows: usize,
    /// The direct kernels, where this CPU runs them: a whole image per
    /// product, read in place (no column matrix, no bands).
    direct: Option<Direct>,
    /// The values the direct kernels read from a padded image (its planes
    /// and some zeros after them), 0 without them.
    image_len: usize,
}

impl Rows {
    /// The padded-rows plan of `g`, or `None` where it does not apply:
    /// strides other than 1, small images (several per product, see
    /// [`Geom::chunks`]), or padding wider than the kernel's span (whose
    /// junk columns would cost more than they save).
    ///
    /// With [`Direct`]'s kernels, medium images too: at least 64 taps and
    /// 64 output positions per channel. Measured (64 images, 3x3, padding
    /// 1, one thread, best of 30), forward + backward: 16 → 32 channels of
    /// 16x16 0.49x the lowering's time, 32 → 64 of 8x8 0.79x; below
    /// either bound the kernels lost (1 → 16 of 8x8 1.8x, 16 → 32 of 4x4
    /// 1.2x) or traded a slower forward for a faster backward (3 → 16 of
    /// 32x32, 27 taps: 1.43x and 0.74x).
    fn plan(g: &Geom) -> Option<Rows> {
        let direct = Direct::detect();
        #[cfg(test)]
        let direct = direct.filter(|_| !tests::FORCE_GEMM.get());
        let large = g.k() * g.p() > BAND / 2;
        let medium = direct.is_some() && g.k() >= 64 && g.p() >= 64;
        let fits = g.sh == 1
            && g.sw == 1
            && (large || medium)
            && g.ph <= g.dh * (g.kh - 1)
            && g.pw <= g.dw * (g.kw - 1);
        fits.then(|| {
            let (hp, wp) = (g.h + 2 * g.ph, g.w + 2 * g.pw);
            let rows = (BAND / (g.k() * wp).max(1)).clamp(1, g.ho);
            let mut rows = Rows {
                hp,
                wp,
                rows,
                direct,
                image_len: 0,
            };
            if direct.is_some() {
                // The padded rows' vectors reach furthest (the weight
                // gradient's).
                let starts: Vec<usize> = rows.starts(g, 0).collect();
                let vectors = conv_direct::padded_vectors(rows.positions(g));
                rows.image_len = conv_direct::image_len(&starts, &vectors);
            }
            rows
        })
    }

    /// The bands of output rows, `(oy0, oy1)`.
    fn bands(&self, g: &Geom) -> impl Iterator<Item = (usize, usize)> {
        let (rows, ho) = (self.rows, g.ho);
        (0..ho)
            .step_by(rows)
            .map(move |oy0| (oy0, (oy0 + rows).min(ho)))
    }

    /// Copies one image's group of channels `x` (`[C/groups, H, W]`) into
    /// `padded` (`[C/groups, Hp, Wp]`, zeros around).
    ///
    /// The zeros are written when `padded` is new (or of another length);
    /// a buffer padded before for this geometry has them already (every
    /// call writes the same positions).
    fn pad(&self, g: &Geom, x: &[f32], padded: &mut Vec<f32>) {
        let plane = self.hp * self.wp;
        let len = (g.cg() * plane).max(self.image_len);
        if padded.len() != len {
            padded.clear();
            padded.resize(len, 0.0);
        }
        for (dst, src) in padded
            .chunks_exact_mut(plane)
            .zip(x.chunks_exact(g.h * g.w))
        {
            let dst = &mut dst[g.ph * self.wp + g.pw..];
            copy_rows((dst, self.wp), (src, g.w), g.w, g.h);
        }
    }

    /// The columns of one band: `[K, (oy1 − oy0) · Wp]` into the first
    /// values of `buffer`, from the padded image; the junk columns zeroed
    /// when `zero_junk` (else left as they are: a product column depends
    /// on its own column only, and the forward drops them, and the width
    /// rounded up to a multiple of 16 with zero columns: the kernel then
    /// reads the matrix in place, where another width makes it copy the
    /// whole band first, 1.4x the time of the input gradient's product
    /// at `conv2d_fwd_bwd_1t`'s shape).
    fn cols<'a>(
        &self,
        g: &Geom,
        padded: &[f32],
        (oy0, oy1): (usize, usize),
        buffer: &'a mut Vec<f32>,
        zero_junk: bool,
    ) -> ArrayView2<'a, f32> {
        let (k, wp) = (g.k(), self.wp);
        let width = (oy1 - oy0) * wp;
        let ld = if zero_junk {
            width
        } else {
            width.next_multiple_of(16)
        };
        // The last row's junk would read past the plane's end.
        let run = width - (wp - g.wo);
        let cols = first(buffer, k * ld);
        for (row, at) in cols.chunks_exact_mut(ld).zip(self.starts(g, oy0)) {
            row[..run].copy_from_slice(&padded[at..at + run]);
            if zero_junk {
                for junk in row.chunks_exact_mut(wp) {
                    junk[g.wo..].fill(0.0);
                }
            } else {
                row[run..].fill(0.0);
            }
        }
        ArrayView2::from_shape((k, ld), &*cols).expect("[K, band]")
    }

    /// The adjoint of [`cols`](Rows::cols) (junk columns dropped): adds
    /// `dcols` (`[K, (oy1 − oy0) · Wp]`, its junk columns zeroed here
    /// first) into the padded gradient `acc` (`[C/groups, Hp, Wp]`).
    #[inline(always)]
    fn add_cols(&self, g: &Geom, dcols: &mut [f32], (oy0, oy1): (usize, usize), acc: &mut [f32]) {
        let wp = self.wp;
        let width = (oy1 - oy0) * wp;
        let run = width - (wp - g.wo);
        for (row, at) in dcols.chunks_exact_mut(width).zip(self.starts(g, oy0)) {
            for junk in row.chunks_exact_mut(wp) {
                junk[g.wo..].fill(0.0);
            }
            for (d, v) in acc[at..at + run].iter_mut().zip(&row[..run]) {
                *d += *v;
            }
        }
    }

    /// The output positions of an image in the padded width, `Ho · Wp`.
    fn positions(&self, g: &Geom) -> usize {
        g.ho * self.wp
    }

    /// The vectors of output positions [`Direct`]'s kernels compute, and
    /// whether they are the output rows' own (in place, `true`: rows of
    /// whole vectors) or the padded rows' (junk included, `false`).
    fn vectors(&self, g: &Geom) -> (Vec<(usize, usize)>, bool) {
        match conv_direct::row_vectors(g.ho, g.wo, self.wp) {
            Some(rows) => (rows, true),
            None => (conv_direct::padded_vectors(self.positions(g)), false),
        }
    }

    /// [`forward`](Rows::forward) by [`Direct`]'s kernel: each image's
    /// group in one product, the bias its starting value, computed in its
    /// output rows when they are whole vectors (else in padded rows).
    fn forward_direct(
        &self,
        direct: Direct,
        g: &Geom,
        x: &[f32],
        w: &[f32],
        bias: Option<&[f32]>,
        out: &mut Vec<f32>,
    ) {
        let (og, k, p, wp) = (g.og(), g.k(), g.p(), self.wp);
        let (image, len) = (g.c * g.h * g.w, g.cg() * g.h * g.w);
        let starts: Vec<usize> = self.starts(g, 0).collect();
        let (vectors, in_place) = self.vectors(g);
        let packed: Vec<Vec<f32>> = (0..g.groups)
            .map(|group| Direct::pack(og, k, &w[group * og * k..][..og * k]))
            .collect();
        // The images of `range`, appended to `out`: each image's group
        // into a buffer that stays in cache, then appended (writing the
        // output in place would take a zeroing pass over it first, and a
        // second trip to memory).
        let images = |range: std::ops::Range<usize>, out: &mut Vec<f32>| {
            let (mut padded, mut product) = (Vec::new(), Vec::new());
            let ld = conv_direct::row_len(&vectors);
            for n in range {
                for (group, packed) in packed.iter().enumerate() {
                    let bias = bias.map(|b| &b[group * og..][..og]);
                    self.pad(g, &x[n * image + group * len..][..len], &mut padded);
                    if in_place {
                        let y = first(&mut product, og * p);
                        direct.forward(packed, og, bias, &padded, &starts, &vectors, y, p);
                        out.extend_from_slice(y);
                        continue;
                    }
                    let product = first(&mut product, og * ld);
                    direct.forward(packed, og, bias, &padded, &starts, &vectors, product, ld);
                    let at = out.len();
                    out.resize(at + og * p, 0.0);
                    for (dst, src) in out[at..].chunks_exact_mut(p).zip(product.chunks_exact(ld)) {
                        copy_rows((dst, g.wo), (src, wp), g.wo, g.ho);
                    }
                }
            }
        };
        let work = g.n * g.o * k * p;
        let pieces = image_pieces(g.n);
        if pieces.len() > 1 && super::vectorized::should_split(work) {
            // Images are independent: the pieces' outputs side by side.
            let parts = super::vectorized::map_pieces(pieces, work, |range| {
                let mut part = Vec::with_capacity(range.len() * g.o * p);
                images(range, &mut part);
                part
            });
            for part in parts {
                out.extend_from_slice(&part);
            }
        } else {
            images(0..g.n, out);
        }
    }

    /// Where each of the `K` column rows of a band starting at output row
    /// `oy0` starts in the padded image (`[C/groups, Hp, Wp]`): channel,
    /// then kernel row, then kernel column, as the weight's `K` axis.
    #[inline(always)]
    fn starts(&self, g: &Geom, oy0: usize) -> impl Iterator<Item = usize> {
        let (plane, wp) = (self.hp * self.wp, self.wp);
        let (kh, kw, dh, dw) = (g.kh, g.kw, g.dh, g.dw);
        (0..g.cg()).flat_map(move |c| {
            (0..kh)
                .flat_map(move |i| (0..kw).map(move |j| c * plane + (oy0 + i * dh) * wp + j * dw))
        })
    }

    /// The forward of [`conv_forward`] through padded rows, appended to
    /// `out` (`[N, O, Ho·Wo]`: the product plus the bias, every value in
    /// order, with no zeroing pass first). The bands' products of one
    /// image's group go side by side into one `[O/g, Ho·Wp]` buffer, whose
    /// channels are then appended one after the other.
    fn forward(&self, g: &Geom, x: &[f32], w: &[f32], bias: Option<&[f32]>, out: &mut Vec<f32>) {
        let (og, k, wp) = (g.og(), g.k(), self.wp);
        let (image, len) = (g.c * g.h * g.w, g.cg() * g.h * g.w);
        if let Some(direct) = self.direct {
            return self.forward_direct(direct, g, x, w, bias, out);
        }
        let (mut padded, mut cols, mut product) = (Vec::new(), take_scratch(), Vec::new());
        // Room for the last band's columns past `Ho·Wp` (see `cols`).
        let ld = g.ho * wp + 16;
        for n in 0..g.n {
            for group in 0..g.groups {
                self.pad(g, &x[n * image + group * len..][..len], &mut padded);
                let w = ArrayView2::from_shape((og, k), &w[group * og * k..][..og * k])
                    .expect("[O/g, K]");
                let product = first(&mut product, og * ld);
                for band in self.bands(g) {
                    let cols = self.cols(g, &padded, band, &mut cols, false);
                    // Columns past the band's own are overwritten by the
                    // next band's.
                    let y = ArrayViewMut2::from_shape(
                        (og, cols.ncols()).strides((ld, 1)),
                        &mut product[band.0 * wp..],
                    )
                    .expect("[O/g, band] of the product");
                    gemm_into(w, cols, y);
                }
                for (o, src) in product.chunks_exact(ld).enumerate() {
                    let b = bias.map_or(0.0, |b| b[group * og + o]);
                    for row in src[..g.ho * wp].chunks_exact(wp) {
                        out.extend(row[..g.wo].iter().map(|s| *s + b));
                    }
                }
            }
        }
        put_scratch(cols);
    }

    /// The input and weight gradients of [`ConvBackward`] through padded
    /// rows: `dx` (`[N, C, H, W]`, appended in order when `Some`: no
    /// zeroing pass first) and `dwt` (`[groups, K, O/g]`, accumulated,
    /// when `Some`).
    fn backward(
        &self,
        g: &Geom,
        (x, w, dy): (&[f32], &[f32], &[f32]),
        mut dx: Option<&mut Vec<f32>>,
        dwt: Option<&mut [f32]>,
    ) {
        // The weight gradient by the direct kernel where it runs.
        let mut dwt = match (self.direct, dwt) {
            (Some(direct), Some(dwt)) => {
                (!self.weight_grad(direct, g, x, dy, &mut *dwt)).then_some(dwt)
            }
            (_, dwt) => dwt,
        };
        if dx.is_none() && dwt.is_none() {
            return;
        }
        let (og, k, p, wp) = (g.og(), g.k(), g.p(), self.wp);
        let (image, len) = (g.c * g.h * g.w, g.cg() * g.h * g.w);
        let plane = self.hp * wp;
        let (mut padded, mut acc, mut dys) = (Vec::new(), Vec::new(), Vec::new());
        let (mut cols, mut dcols) = (take_scratch(), take_scratch());
        for n in 0..g.n {
            for group in 0..g.groups {
                if dwt.is_some() {
                    self.pad(g, &x[n * image + group * len..][..len], &mut padded);
                }
                if dx.is_some() {
                    first(&mut acc, g.cg() * plane).fill(0.0);
                }
                let w = ArrayView2::from_shape((og, k), &w[group * og * k..][..og * k])
                    .expect("[O/g, K]");
                for band in self.bands(g) {
                    let width = (band.1 - band.0) * wp;
                    // dY of the band in the padded width, junk zeroed.
                    let dyp = first(&mut dys, og * width);
                    for (o, dst) in dyp.chunks_exact_mut(width).enumerate() {
                        let src = &dy[(n * g.o + group * og + o) * p + band.0 * g.wo..];
                        for (d, s) in dst.chunks_exact_mut(wp).zip(src.chunks_exact(g.wo)) {
                            d[..g.wo].copy_from_slice(s);
                            d[g.wo..].fill(0.0);
                        }
                    }
                    let dyp = ArrayView2::from_shape((og, width), &*dyp).expect("[O/g, band]");
                    if let Some(dwt) = dwt.as_deref_mut() {
                        let cols = self.cols(g, &padded, band, &mut cols, true);
                        let dwt = ArrayViewMut2::from_shape(
                            (k, og),
                            &mut dwt[group * og * k..][..og * k],
                        )
                        .expect("[K, O/g]");
                        gemm_acc_into(cols, dyp.t(), dwt);
                    }
                    if dx.is_some() {
                        let dcols = first(&mut dcols, k * width);
                        gemm_into(
                            w.t(),
                            dyp,
                            ArrayViewMut2::from_shape((k, width), &mut *dcols).expect("[K, band]"),
                        );
                        // The adds compiled for the widest SIMD (the
                        // baseline build adds four values at a time).
                        super::vectorized::dispatch(
                            #[inline(always)]
                            || self.add_cols(g, dcols, band, &mut acc),
                        );
                    }
                }
                if let Some(dx) = dx.as_deref_mut() {
                    for src in acc[..g.cg() * plane].chunks_exact(plane) {
                        for s in src[g.ph * wp..].chunks_exact(wp).take(g.h) {
                            dx.extend_from_slice(&s[g.pw..g.pw + g.w]);
                        }
                    }
                }
            }
        }
        put_scratch(cols);
        put_scratch(dcols);
    }

    /// The weight gradient of [`ConvBackward`] by [`Direct`]'s kernel:
    /// `dW_g = Σ_n dY[n, g] · cols(x[n, g])ᵀ`, accumulated into `dwt`
    /// (`[groups, K, O/g]`). `false` (and nothing computed) where the
    /// kernel would read junk positions of an image with a NaN or an
    /// infinity (`0 · ∞` is NaN).
    fn weight_grad(
        &self,
        direct: Direct,
        g: &Geom,
        x: &[f32],
        dy: &[f32],
        dwt: &mut [f32],
    ) -> bool {
        let (og, k, p, wp) = (g.og(), g.k(), g.p(), self.wp);
        let (image, len) = (g.c * g.h * g.w, g.cg() * g.h * g.w);
        let starts: Vec<usize> = self.starts(g, 0).collect();
        // In the padded width (contiguous vectors, junk included: the
        // kernel's loads then need no bounds checks), so not with a NaN or
        // infinity in the image.
        if !finite(x) {
            return false;
        }
        let padded_vectors = conv_direct::padded_vectors(self.positions(g));
        let (vectors, ld) = (padded_vectors.len(), conv_direct::row_len(&padded_vectors));
        // The sums of the images of `range`, `[groups, O/g, K]`.
        let images = |range: std::ops::Range<usize>| -> Vec<f32> {
            let mut padded = Vec::new();
            // dY of one image's group in the padded width: the junk
            // positions and those past the last stay zero, the others are
            // overwritten for each image.
            let mut dyp = vec![0.0; og * ld];
            let mut acc = vec![0.0; g.groups * og * k];
            for n in range {
                for (group, acc) in acc.chunks_exact_mut(og * k).enumerate() {
                    self.pad(g, &x[n * image + group * len..][..len], &mut padded);
                    let dy = &dy[(n * g.o + group * og) * p..][..og * p];
                    for (dst, src) in dyp.chunks_exact_mut(ld).zip(dy.chunks_exact(p)) {
                        copy_rows((dst, wp), (src, g.wo), g.wo, g.ho);
                    }
                    direct.weight_grad(&dyp, og, ld, &padded, &starts, vectors, acc);
                }
            }
            acc
        };
        // Each piece's sums added in order, split across threads or not:
        // the same bits on any thread count.
        let work = g.n * g.o * k * p;
        for acc in super::vectorized::map_pieces(image_pieces(g.n), work, images) {
            for (dwt, acc) in dwt.chunks_exact_mut(og * k).zip(acc.chunks_exact(og * k)) {
                for (o, filter) in acc.chunks_exact(k).enumerate() {
                    for (d, v) in dwt[o..].iter_mut().step_by(og).zip(filter) {
                        *d += *v;
                    }
                }
            }
        }
        true
    }
}

/// The images of a batch of `n` cut into at most 8 consecutive ranges (from
/// the size alone), the pieces the direct kernels split across threads.
fn image_pieces(n: usize) -> Vec<std::ops::Range<usize>> {
    let size = n.div_ceil(8).max(1);
    (0..n)
        .step_by(size)
        .map(|n0| n0..(n0 + size).min(n))
        .collect()
}

/// Copies `rows` rows of `width` values from `src` (rows `src_stride`
/// apart) to `dst` (rows `dst_stride` apart), in blocks of 16 values
/// compiled for the widest SIMD: inline moves, where a `copy_from_slice`
/// per row is a call of `memcpy` (100k calls of 128 bytes in a backward
/// of `conv2d_fwd_bwd_1t`, 7% of its time).
fn copy_rows(
    (dst, dst_stride): (&mut [f32], usize),
    (src, src_stride): (&[f32], usize),
    width: usize,
    rows: usize,
) {
    if width == 0 || rows == 0 {
        return;
    }
    super::vectorized::dispatch(
        #[inline(always)]
        || {
            for r in 0..rows {
                let d = &mut dst[r * dst_stride..][..width];
                let s = &src[r * src_stride..][..width];
                let (db, dt) = d.as_chunks_mut::<16>();
                let (sb, st) = s.as_chunks::<16>();
                for (d, s) in db.iter_mut().zip(sb) {
                    *d = *s;
                }
                for (d, s) in dt.iter_mut().zip(st) {
                    *d = *s;
                }
            }
        },
    )
}

/// Whether every value is finite, in one pass compiled for the widest
/// SIMD (`v · 0` is 0 for a finite `v`, NaN for the others).
fn finite(values: &[f32]) -> bool {
    super::vectorized::dispatch(
        #[inline(always)]
        || {
            let mut acc = [0.0f32; 16];
            let mut chunks = values.chunks_exact(16);
            for chunk in &mut chunks {
                for (a, v) in acc.iter_mut().zip(chunk) {
                    *a += *v * 0.0;
                }
            }
            let tail: f32 = chunks.remainder().iter().map(|v| *v * 0.0).sum();
            (acc.iter().sum::<f32>() + tail) == 0.0
        },
    )
}

/// The forward: `y[n, g] = W_g · cols(x[n, g]) + b`, `x` and `w` row-major,
/// into a new row-major `[N, O, Ho·Wo]` buffer. A chunk of several images
/// is one product into a `[O/groups, images · P]` matrix, added to each
/// image's output.
fn conv_forward(g: &Geom, x: &[f32], w: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
    let (og, k, p) = (g.og(), g.k(), g.p());
    let len = g.n * g.o * p;
    if len > 0
        && k > 0
        && let Some(out) = small_forward(g, x, w, bias)
    {
        return out;
    }
    if len > 0
        && k > 0
        && let Some(rows) = Rows::plan(g)
    {
        let mut out = crate::storage::cache::take(len);
        rows.forward(g, x, w, bias, &mut out);
        debug_assert_eq!(out.len(), len);
        return out;
    }
    let mut out = match bias {
        // Each channel starts as its bias, the product added to it.
        Some(bias) if len > 0 => {
            let mut out = crate::storage::cache::take(len);
            for &b in bias.iter().cycle().take(g.n * g.o) {
                out.extend(std::iter::repeat_n(b, p));
            }
            out
        }
        _ => crate::storage::cache::zeros(len),
    };
    if out.is_empty() || k == 0 {
        return out;
    }
    let (mut cols, mut product) = (take_scratch(), Vec::new());
    let mut lowering = Lowering::new(g);
    for chunk in g.chunks() {
        for group in 0..g.groups {
            let w =
                ArrayView2::from_shape((og, k), &w[group * og * k..][..og * k]).expect("[O/g, K]");
            let cols = lowering.cols(g, x, chunk, group, &mut cols);
            let band = chunk.band(g);
            if chunk.images() == 1 {
                let at = (chunk.n0 * g.o + group * og) * p + chunk.oy0 * g.wo;
                let y = ArrayViewMut2::from_shape((og, band).strides((p, 1)), &mut out[at..])
                    .expect("[O/g, band] of the output");
                gemm_acc_into(w, cols, y);
                continue;
            }
            let product = first(&mut product, og * cols.ncols());
            gemm_into(
                w,
                cols,
                ArrayViewMut2::from_shape((og, cols.ncols()), &mut *product).expect("[O/g, chunk]"),
            );
            let ncols = cols.ncols();
            super::vectorized::dispatch(
                #[inline(always)]
                || {
                    for (i, n) in (chunk.n0..chunk.n1).enumerate() {
                        for o in 0..og {
                            let y = &mut out[(n * g.o + group * og + o) * p..][..p];
                            let src = &product[o * ncols + i * p..][..p];
                            for (y, v) in y.iter_mut().zip(src) {
                                *y += *v;
                            }
                        }
                    }
                },
            );
        }
    }
    put_scratch(cols);
    out
}

/// The fewest output channels per group for [`small_forward`]: its tiles
/// are 16 channels wide, and below 8 most of a tile is idle.
const SMALL_MIN_CHANNELS: usize = 8;

/// The forward of a convolution whose images and outputs have at most 16
/// values per channel (the digits CNN's second layer, 4x4), where the CPU
/// has AVX-512: each channel of an image is one vector and each tap a
/// masked permute of it (see [`SmallTaps`](conv_direct::SmallTaps)), so
/// there is no column matrix to build; `None` elsewhere.
fn small_forward(g: &Geom, x: &[f32], w: &[f32], bias: Option<&[f32]>) -> Option<Vec<f32>> {
    let direct = Direct::detect();
    #[cfg(test)]
    let direct = direct.filter(|_| !tests::FORCE_GEMM.get());
    let direct = direct.filter(|_| g.og() >= SMALL_MIN_CHANNELS)?;
    let taps = conv_direct::SmallTaps::new(
        (g.h, g.w),
        (g.ho, g.wo),
        (g.kh, g.kw),
        (g.sh, g.sw),
        (g.ph, g.pw),
        (g.dh, g.dw),
    )?;
    let (og, cg, k, p, image) = (g.og(), g.cg(), g.k(), g.p(), g.h * g.w);
    let mut out = crate::storage::cache::take(g.n * g.o * p);
    out.resize(g.n * g.o * p, 0.0);
    for group in 0..g.groups {
        direct.small_forward(
            &taps,
            &w[group * og * k..][..og * k],
            (og, cg),
            bias.map(|b| &b[group * og..][..og]),
            g.n,
            (&x[group * cg * image..], g.c * image),
            (&mut out[group * og * p..], g.o * p),
        );
    }
    Some(out)
}

/// The weight of [`Geom::input_gradient`]'s convolution, `[C, O/groups,
/// kH, kW]`, from `w` (`[O, C/groups, kH, kW]`, row-major).
fn turned_weight(g: &Geom, w: &[f32]) -> Vec<f32> {
    let (og, cg, taps) = (g.og(), g.cg(), g.kh * g.kw);
    let mut turned = Vec::with_capacity(w.len());
    for group in 0..g.groups {
        for c in 0..cg {
            for o in 0..og {
                let filter = &w[((group * og + o) * cg + c) * taps..][..taps];
                turned.extend(filter.iter().rev());
            }
        }
    }
    turned
}

/// Backward of `y[n, g] = W_g · cols(x[n, g]) + b`:
/// `dW_g = Σ_n dY[n, g] · cols(x[n, g])ᵀ` (computed transposed),
/// `dx[n, g] = col2im(W_gᵀ · dY[n, g])`, `db = Σ_{n, positions} dY`.
struct ConvBackward {
    geom: Geom,
    /// The input, row-major.
    x: Data,
    /// The weight, row-major.
    w: Data,
}

impl Backprop for ConvBackward {
    fn backward(&self, grad: Data, grads: &mut InputGrads<'_>) {
        let g = &self.geom;
        let grad = contiguous(grad);
        let dy = grad.as_slice().expect("row-major");
        let (need_x, need_w) = (grads.needs_grad(0), grads.needs_grad(1));
        let (x, w) = (
            self.x.as_slice().expect("row-major"),
            self.w.as_slice().expect("row-major"),
        );
        // dx by the forward of the turned filters over dY where that is
        // the faster way (every value written there), else by the adjoint
        // of the lowering below.
        // (Not with a weight NaN or infinite: its taps would multiply the
        // turned convolution's padding, where the adjoint leaves it out.)
        let turned = need_x
            .then(|| g.input_gradient_by_forward())
            .flatten()
            .filter(|_| w.iter().all(|w| w.is_finite()));
        if let Some(tg) = &turned {
            let dx = conv_forward(tg, dy, &turned_weight(g, w), None);
            grads.put(0, Data::from_vec(self.x.shape(), dx));
        }
        let need_x = need_x && turned.is_none();
        // dW_gᵀ = Σ_n cols · dY[n, g]ᵀ, [K, O/g] per group, transposed into
        // dW at the end: the kernel is faster on this shape than on
        // dW_g = dY · colsᵀ (conv2d_fwd_bwd_1t 0.67x the time, measured
        // side by side).
        let mut dwt = crate::storage::cache::zeros(if need_w { self.w.len() } else { 0 });
        let (og, k, p) = (g.og(), g.k(), g.p());
        let computed = !dy.is_empty() && k > 0;
        let rows = Rows::plan(g).filter(|_| computed);
        // Padded rows write every value of dx in order; the chunks below
        // add into it.
        let mut dx = match (need_x, &rows) {
            (false, _) => Vec::new(),
            (true, Some(_)) => crate::storage::cache::take(self.x.len()),
            (true, None) => crate::storage::cache::zeros(self.x.len()),
        };
        if let Some(rows) = rows {
            rows.backward(
                g,
                (x, w, dy),
                need_x.then_some(&mut dx),
                need_w.then_some(&mut dwt[..]),
            );
        } else if (need_x || need_w) && computed {
            let (mut cols, mut dcols, mut dys) = (take_scratch(), take_scratch(), Vec::new());
            let mut lowering = Lowering::new(g);
            for chunk in g.chunks() {
                let (band, width) = (chunk.band(g), chunk.cols(g));
                for group in 0..g.groups {
                    // dY of the chunk's group as a [O/g, chunk] matrix: a
                    // view of one image's band, or the images' planes
                    // gathered side by side.
                    let dy = if chunk.images() == 1 {
                        let at = (chunk.n0 * g.o + group * og) * p + chunk.oy0 * g.wo;
                        ArrayView2::from_shape((og, band).strides((p, 1)), &dy[at..])
                            .expect("[O/g, band] of dY")
                    } else {
                        let gathered = first(&mut dys, og * width);
                        for (i, n) in (chunk.n0..chunk.n1).enumerate() {
                            for o in 0..og {
                                gathered[o * width + i * p..][..p]
                                    .copy_from_slice(&dy[(n * g.o + group * og + o) * p..][..p]);
                            }
                        }
                        ArrayView2::from_shape((og, width), &*gathered).expect("[O/g, chunk]")
                    };
                    let w = ArrayView2::from_shape((og, k), &w[group * og * k..][..og * k])
                        .expect("[O/g, K]");
                    if need_w {
                        let cols = lowering.cols(g, x, chunk, group, &mut cols);
                        let dwt = ArrayViewMut2::from_shape(
                            (k, og),
                            &mut dwt[group * og * k..][..og * k],
                        )
                        .expect("[K, O/g]");
                        gemm_acc_into(cols, dy.t(), dwt);
                    }
                    if need_x {
                        let dcols = first(&mut dcols, k * width);
                        let out =
                            ArrayViewMut2::from_shape((k, width), &mut *dcols).expect("[K, chunk]");
                        gemm_into(w.t(), dy, out);
                        lowering.add_cols(g, dcols, chunk, group, &mut dx);
                    }
                }
            }
            put_scratch(cols);
            put_scratch(dcols);
        }
        if need_x {
            grads.put(0, Data::from_vec(self.x.shape(), dx));
        }
        if need_w {
            let mut dw = crate::storage::cache::take(dwt.len());
            // (An empty weight has no chunks.)
            for dwt in dwt.chunks_exact((og * k).max(1)) {
                for o in 0..og {
                    dw.extend(dwt[o..].iter().step_by(og));
                }
            }
            grads.put(1, Data::from_vec(self.w.shape(), dw));
        }
        if grads.len() > 2 && grads.needs_grad(2) {
            let mut db = vec![0.0; g.o];
            if p > 0 {
                for (channel, d) in dy.chunks_exact(p).zip((0..g.o).cycle()) {
                    db[d] += wide_sum(channel);
                }
            }
            grads.put(2, Data::from_vec(&[g.o], db));
        }
    }

    /// The same gradients in recorded ops, through the column matrices
    /// (`y[n, g] = W_g · cols[n, g]`): the input padded by a recorded
    /// `cat` with zeros, the columns read by a recorded `take` (whose
    /// backward scatter-adds), and batched matmuls;
    /// `dcols = W_gᵀ · dY`, `dx = scatter_add(dcols)` unpadded,
    /// `dW_g = Σ_n dY · colsᵀ`, `db = Σ dY`.
    fn backward_graph(&self, grad: &Tensor, grads: &mut GraphGrads<'_>) -> Result<()> {
        let g = &self.geom;
        let (og, k, p) = (g.og(), g.k(), g.p());
        let (hp, wp) = (g.h + 2 * g.ph, g.w + 2 * g.pw);
        let padded = [g.n, g.c, hp, wp];
        let cols_shape = [g.n, g.groups, k, p];
        let dy = grad.try_reshape(&[g.n, g.groups, og, p])?;
        let offsets = self.column_offsets();
        let w = grads
            .input(1, &self.w)?
            .try_reshape(&[1, g.groups, og, k])?;
        if grads.needs_grad(0) {
            let dcols = w.try_transpose(-1, -2)?.try_matmul(&dy)?;
            let dxp = scatter_add(&dcols, &offsets, &padded)?;
            let dx = dxp
                .try_narrow(2, g.ph as isize, g.h)?
                .try_narrow(3, g.pw as isize, g.w)?
                .try_reshape(self.x.shape())?;
            grads.set(0, dx);
        }
        if grads.needs_grad(1) {
            let x = grads
                .input(0, &self.x)?
                .try_reshape(&[g.n, g.c, g.h, g.w])?;
            let mut xp = x;
            for (axis, pad, len) in [(2, g.ph, hp), (3, g.pw, wp)] {
                if pad > 0 {
                    let mut shape = xp.shape().to_vec();
                    shape[axis] = len;
                    xp = pad_axis(&xp, &shape, axis, pad)?;
                }
            }
            let cols = take(&xp, &offsets, &cols_shape)?;
            let dw = dy
                .try_matmul(&cols.try_transpose(-1, -2)?)?
                .try_sum_axis(0, false)?
                .try_reshape(self.w.shape())?;
            grads.set(1, dw);
        }
        if grads.len() > 2 && grads.needs_grad(2) {
            let db = grad
                .try_reshape(&[g.n, g.o, p])?
                .try_sum_axis(2, false)?
                .try_sum_axis(0, false)?;
            grads.set(2, db);
        }
        Ok(())
    }
}

impl ConvBackward {
    /// The column matrices of the padded input `[N, C, H + 2pH, W + 2pW]`
    /// as flat positions: `[N, G, K, P]`, entry `(n, g, (c, i, j), (oy,
    /// ox))` at `xp[n, g·C/g + c, oy·sH + i·dH, ox·sW + j·dW]`.
    fn column_offsets(&self) -> Offsets {
        let g = &self.geom;
        let (hp, wp) = (g.h + 2 * g.ph, g.w + 2 * g.pw);
        let mut offsets = Vec::with_capacity(g.n * g.groups * g.k() * g.p());
        for n in 0..g.n {
            for group in 0..g.groups {
                for c in 0..g.cg() {
                    let plane = (n * g.c + group * g.cg() + c) * hp * wp;
                    for i in 0..g.kh {
                        for j in 0..g.kw {
                            for oy in 0..g.ho {
                                let row = plane + (oy * g.sh + i * g.dh) * wp;
                                offsets.extend((0..g.wo).map(|ox| row + ox * g.sw + j * g.dw));
                            }
                        }
                    }
                }
            }
        }
        offsets.into()
    }
}

/// The convolution of `op` (1 or 2 spatial axes), validated, computed and
/// recorded.
#[track_caller]
#[allow(clippy::too_many_arguments)]
fn convolution(
    op: &'static str,
    spatial: usize,
    input: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: Size2,
    padding: Size2,
    dilation: Size2,
    groups: usize,
) -> Result<Tensor> {
    let (geom, shape) = Geom::new(
        op,
        spatial,
        input.shape(),
        weight.shape(),
        bias.map(Tensor::shape),
        stride,
        padding,
        dilation,
        groups,
    )?;
    let (x, w) = input.read_pair(weight).into_pair();
    let (x, w) = (contiguous(x), contiguous(w));
    let b = bias.map(|b| contiguous(b.read().into_data()));
    let out = conv_forward(
        &geom,
        x.as_slice().expect("row-major"),
        w.as_slice().expect("row-major"),
        b.as_ref().map(|b| b.as_slice().expect("row-major")),
    );
    let out = Data::from_vec(&shape, out);
    let save = move |_: &Data| ConvBackward { geom, x, w };
    match bias {
        Some(bias) => record(op, &[input, weight, bias], out, save),
        None => record(op, &[input, weight], out, save),
    }
}

/// 2-D convolution, as PyTorch's `F.conv2d`.
///
/// # Panics
///
/// As [`try_conv2d`].
#[track_caller]
pub fn conv2d(
    input: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: impl Into<Size2>,
    padding: impl Into<Size2>,
    dilation: impl Into<Size2>,
    groups: usize,
) -> Tensor {
    or_panic(try_conv2d(
        input, weight, bias, stride, padding, dilation, groups,
    ))
}

/// 2-D convolution (cross-correlation, as in every deep-learning library)
/// of `input` `[N, C, H, W]` with `weight` `[O, C / groups, kH, kW]`, plus
/// `bias` `[O]`: as PyTorch's
/// `F.conv2d(input, weight, bias, stride, padding, dilation, groups)`.
///
/// `y[n, o, oy, ox] = b[o] + Σ_{c, i, j} w[o, c, i, j] ·
/// x[n, g·C/groups + c, oy·sH + i·dH − pH, ox·sW + j·dW − pW]` for `o` in
/// group `g`, with `x` zero outside the image. The output is
/// `[N, O, Ho, Wo]`, `Ho = (H + 2·pH − dH·(kH − 1) − 1) / sH + 1` (and
/// `Wo` likewise). An unbatched `[C, H, W]` input gives `[O, Ho, Wo]`.
/// `stride`, `padding` and `dilation` take a number or a pair
/// ([`Size2`]); `groups = C` is a depthwise convolution.
///
/// Lowered to the gemm kernel (im2col in cache-sized chunks: bands of a
/// large image, or several small images side by side in one product,
/// per group; the backward's input, weight and bias gradients
/// are products and sums too). NaN and infinities propagate as through any
/// sum of products. Departure from PyTorch: `padding` is numbers only (no
/// `"same"`/`"valid"` strings; `"valid"` is 0).
///
/// # Errors
///
/// [`Error::Rank`] if `input` is not 3-D or 4-D or `weight` not 4-D;
/// [`Error::InvalidArgument`] if `groups`, a stride or a dilation is 0, the
/// kernel is empty, `O` is not divisible by `groups`, `input` does not have
/// `weight[1] · groups` channels, or the (dilated) kernel is larger than
/// the padded input; [`Error::ShapeMismatch`] if `bias` is not `[O]`;
/// [`Error::ShapeTooLarge`] if the output could not exist.
///
/// # Examples
///
/// ```
/// use netcl::Tensor;
/// use netcl::functional as F;
///
/// // A 3x3 image, a 2x2 filter summing its window.
/// let x = Tensor::from_vec((1..=9).map(|v| v as f32).collect(), &[1, 1, 3, 3])?
///     .requires_grad_(true);
/// let w = Tensor::ones(&[1, 1, 2, 2]).requires_grad_(true);
/// let b = Tensor::from_vec(vec![0.5], &[1])?.requires_grad_(true);
/// let y = F::try_conv2d(&x, &w, Some(&b), 1, 0, 1, 1)?;
/// assert_eq!(y.shape(), &[1, 1, 2, 2]);
/// assert_eq!(y.to_vec(), vec![12.5, 16.5, 24.5, 28.5]);
///
/// y.sum().backward();
/// // dL/dx counts the windows covering each pixel; dL/dw sums each tap's
/// // inputs over the windows; dL/db counts the outputs.
/// assert_eq!(x.grad().unwrap().to_vec(), vec![1.0, 2.0, 1.0, 2.0, 4.0, 2.0, 1.0, 2.0, 1.0]);
/// assert_eq!(w.grad().unwrap().to_vec(), vec![12.0, 16.0, 24.0, 28.0]);
/// assert_eq!(b.grad().unwrap().to_vec(), vec![4.0]);
///
/// // Stride 2 and padding 1, given as pairs or numbers.
/// let y = F::try_conv2d(&x, &w, None, [2, 2], 1, 1, 1)?;
/// assert_eq!(y.to_vec(), vec![1.0, 5.0, 11.0, 28.0]);
///
/// let err = F::try_conv2d(&x, &Tensor::ones(&[1, 2, 2, 2]), None, 1, 0, 1, 1).unwrap_err();
/// assert_eq!(
///     err.to_string(),
///     "conv2d: given groups=1, weight of size [1, 2, 2, 2], expected input [1, 1, 3, 3] \
///      to have 2 channels, but got 1 channels"
/// );
/// # Ok::<(), netcl::Error>(())
/// ```
#[track_caller]
pub fn try_conv2d(
    input: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: impl Into<Size2>,
    padding: impl Into<Size2>,
    dilation: impl Into<Size2>,
    groups: usize,
) -> Result<Tensor> {
    convolution(
        "conv2d",
        2,
        input,
        weight,
        bias,
        stride.into(),
        padding.into(),
        dilation.into(),
        groups,
    )
}

/// 1-D convolution, as PyTorch's `F.conv1d`.
///
/// # Panics
///
/// As [`try_conv1d`].
#[track_caller]
pub fn conv1d(
    input: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    padding: usize,
    dilation: usize,
    groups: usize,
) -> Tensor {
    or_panic(try_conv1d(
        input, weight, bias, stride, padding, dilation, groups,
    ))
}

/// 1-D convolution of `input` `[N, C, L]` with `weight`
/// `[O, C / groups, kL]`, plus `bias` `[O]`: as PyTorch's
/// `F.conv1d(input, weight, bias, stride, padding, dilation, groups)`.
///
/// The output is `[N, O, Lo]`, `Lo = (L + 2·padding − dilation·(kL − 1) −
/// 1) / stride + 1`; an unbatched `[C, L]` input gives `[O, Lo]`. Computed
/// as [`try_conv2d`] of height 1.
///
/// # Errors
///
/// As [`try_conv2d`], with `input` 2-D or 3-D and `weight` 3-D.
///
/// # Examples
///
/// ```
/// use netcl::Tensor;
/// use netcl::functional as F;
///
/// // A moving difference x[t + 1] - x[t] over two sequences of 4.
/// let x = Tensor::from_vec(vec![1.0, 2.0, 4.0, 8.0, 0.0, 1.0, 0.0, 1.0], &[2, 1, 4])?
///     .requires_grad_(true);
/// let w = Tensor::from_vec(vec![-1.0, 1.0], &[1, 1, 2])?;
/// let y = F::try_conv1d(&x, &w, None, 1, 0, 1, 1)?;
/// assert_eq!(y.shape(), &[2, 1, 3]);
/// assert_eq!(y.to_vec(), vec![1.0, 2.0, 4.0, 1.0, -1.0, 1.0]);
///
/// y.sum().backward();
/// // Σ_t (x[t + 1] - x[t]) = x[3] - x[0].
/// assert_eq!(x.grad().unwrap().to_vec(), vec![-1.0, 0.0, 0.0, 1.0, -1.0, 0.0, 0.0, 1.0]);
/// # Ok::<(), netcl::Error>(())
/// ```
#[track_caller]
pub fn try_conv1d(
    input: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    padding: usize,
    dilation: usize,
    groups: usize,
) -> Result<Tensor> {
    convolution(
        "conv1d",
        1,
        input,
        weight,
        bias,
        Size2(1, stride),
        Size2(0, padding),
        Size2(1, dilation),
        groups,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    std::thread_local! {
        /// Forces the input gradient's path on this thread: by the forward
        /// of the turned filters (`Some(true)`, where it exists) or by the
        /// lowering's adjoint (`Some(false)`).
        pub(super) static FORCE_TURNED: std::cell::Cell<Option<bool>> =
            const { std::cell::Cell::new(None) };
        /// Keeps this thread's convolutions off the direct kernels (on the
        /// lowering onto the `gemm` crate), where this CPU has them.
        pub(super) static FORCE_GEMM: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    /// A convolution's input and weight shapes, stride, padding, dilation
    /// and groups, for the references below.
    #[derive(Clone, Copy)]
    struct Geometry {
        xs: [usize; 4],
        ws: [usize; 4],
        s: [usize; 2],
        p: [usize; 2],
        d: [usize; 2],
        groups: usize,
    }

    /// (input, weight, stride, padding, dilation, groups).
    const fn geometry(
        xs: [usize; 4],
        ws: [usize; 4],
        s: [usize; 2],
        p: [usize; 2],
        d: [usize; 2],
        groups: usize,
    ) -> Geometry {
        Geometry {
            xs,
            ws,
            s,
            p,
            d,
            groups,
        }
    }

    impl Geometry {
        /// The output's shape, `[N, O, Ho, Wo]`.
        fn output(&self) -> [usize; 4] {
            let ([n, _, h, wd], [o, _, kh, kw]) = (self.xs, self.ws);
            let (s, p, d) = (self.s, self.p, self.d);
            let ho = (h + 2 * p[0] - d[0] * (kh - 1) - 1) / s[0] + 1;
            let wo = (wd + 2 * p[1] - d[1] * (kw - 1) - 1) / s[1] + 1;
            [n, o, ho, wo]
        }
    }

    /// Calls `f(y, x, w)` with the flat indices of every output position,
    /// input value and weight the convolution multiplies together (taps in
    /// the padding skipped), in the order of the definition's sums.
    fn each_tap(case: Geometry, mut f: impl FnMut(usize, usize, usize)) {
        let Geometry {
            xs,
            ws,
            s,
            p,
            d,
            groups,
        } = case;
        let [_, c, h, wd] = xs;
        let [_, cg, kh, kw] = ws;
        let [n, o, ho, wo] = case.output();
        let og = o / groups;
        for ni in 0..n {
            for oi in 0..o {
                let g = oi / og;
                for oy in 0..ho {
                    for ox in 0..wo {
                        let yi = ((ni * o + oi) * ho + oy) * wo + ox;
                        for ci in 0..cg {
                            for i in 0..kh {
                                for j in 0..kw {
                                    let iy = (oy * s[0] + i * d[0]) as isize - p[0] as isize;
                                    let ix = (ox * s[1] + j * d[1]) as isize - p[1] as isize;
                                    if iy < 0 || ix < 0 || iy >= h as isize || ix >= wd as isize {
                                        continue;
                                    }
                                    let xc = g * cg + ci;
                                    let xi = ((ni * c + xc) * h + iy as usize) * wd + ix as usize;
                                    f(yi, xi, ((oi * cg + ci) * kh + i) * kw + j);
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// The definition, in f64: `y[n, o, oy, ox] = b[o] + Σ w · x` over the
    /// taps inside the image.
    fn direct(case: Geometry, x: &[f32], w: &[f32], b: &[f32]) -> (Vec<f64>, [usize; 4]) {
        let shape @ [n, o, ho, wo] = case.output();
        let mut y: Vec<f64> = (0..n * o * ho * wo)
            .map(|i| f64::from(b[i / (ho * wo) % o]))
            .collect();
        each_tap(case, |yi, xi, wi| {
            y[yi] += f64::from(x[xi]) * f64::from(w[wi])
        });
        (y, shape)
    }

    fn values(len: usize, seed: f32) -> Vec<f32> {
        (0..len)
            .map(|i| ((i as f32 * 0.618 + seed).fract() - 0.5) * 2.0)
            .collect()
    }

    #[test]
    fn matches_the_definition_across_bands_and_groups() {
        // The first geometry is tall enough to need several bands of the
        // column matrix (144 taps · 64 columns · 28 rows per band).
        let cases = [
            geometry([1, 16, 64, 64], [2, 16, 3, 3], [1, 1], [1, 1], [1, 1], 1),
            geometry([2, 4, 9, 7], [6, 2, 3, 2], [2, 1], [1, 2], [1, 2], 2),
            geometry([1, 3, 6, 6], [3, 1, 3, 3], [1, 3], [2, 0], [2, 1], 3),
            // Padded rows (stride 1, a large image) with dilation and groups.
            geometry([1, 8, 72, 70], [4, 4, 3, 3], [1, 1], [2, 1], [2, 1], 2),
        ];
        for case in cases {
            assert_matches_the_definition(case);
        }
    }

    /// `conv2d` of `case` (with a bias) against the `f64` definition.
    fn assert_matches_the_definition(case: Geometry) {
        let Geometry {
            xs,
            ws,
            s,
            p,
            d,
            groups,
        } = case;
        let x = values(xs.iter().product(), 0.1);
        let w = values(ws.iter().product(), 0.3);
        let b = values(ws[0], 0.7);
        let (want, shape) = direct(case, &x, &w, &b);
        let xt = Tensor::from_vec(x, &xs).unwrap();
        let wt = Tensor::from_vec(w, &ws).unwrap();
        let bt = Tensor::from_vec(b, &[ws[0]]).unwrap();
        let y = try_conv2d(&xt, &wt, Some(&bt), s, p, d, groups).unwrap();
        assert_eq!(y.shape(), shape);
        for (got, want) in y.to_vec().iter().zip(&want) {
            assert!(
                (f64::from(*got) - want).abs() < 1e-4,
                "{xs:?}: {got} vs {want}"
            );
        }
    }

    #[test]
    fn padded_rows_keep_nan_and_infinity_where_they_belong() {
        // Padded rows' junk columns must not carry a NaN weight to input
        // positions its tap does not reach, nor an infinite input to taps
        // that do not read it.
        let xs = [1, 16, 64, 64];
        let mut x = vec![1.0; 16 * 64 * 64];
        x[5 * 64 + 63] = f32::INFINITY; // channel 0, row 5, last column
        let mut w = vec![1.0; 2 * 16 * 9];
        w[8] = f32::NAN; // filter 0, channel 0, tap (2, 2)
        let x = Tensor::from_vec(x, &xs).unwrap().requires_grad_(true);
        let w = Tensor::from_vec(w, &[2, 16, 3, 3])
            .unwrap()
            .requires_grad_(true);
        conv2d(&x, &w, None, 1, 1, 1, 1).sum().backward();
        let dx = x.grad().unwrap().to_vec();
        let at = |c: usize, iy: usize, ix: usize| dx[(c * 64 + iy) * 64 + ix];
        // Tap (2, 2) reaches input (iy, ix) from output (iy − 1, ix − 1).
        assert_eq!(at(0, 0, 0), 8.0);
        assert_eq!(at(0, 0, 40), 12.0);
        assert_eq!(at(0, 40, 0), 12.0);
        assert!(at(0, 5, 5).is_nan());
        assert_eq!(at(1, 5, 5), 18.0);
        let dw = w.grad().unwrap().to_vec();
        // Taps with j = 0 read columns up to 62 only.
        for o in 0..2 {
            for i in 0..3 {
                assert!(dw[o * 144 + i * 3].is_finite(), "dw[{o}, 0, {i}, 0]");
                assert_eq!(dw[o * 144 + i * 3 + 1], f32::INFINITY);
            }
        }
    }

    #[test]
    fn gradients_across_bands_match_the_adjoint() {
        // y = conv(x, w) over several bands; L = Σ y. dL/dx[c, iy, ix]
        // counts the taps of w that reach (iy, ix): with 3x3 ones, padding
        // 1 and stride 1, 9 inside, 6 on an edge, 4 in a corner (times the
        // 2 output channels); dL/dw[o, c, i, j] is the sum of x over the
        // positions tap (i, j) reads; dL/db = Ho·Wo.
        let xs = [1, 16, 64, 64];
        let x = Tensor::ones(&xs).requires_grad_(true);
        let w = Tensor::ones(&[2, 16, 3, 3]).requires_grad_(true);
        let b = Tensor::zeros(&[2]).requires_grad_(true);
        conv2d(&x, &w, Some(&b), 1, 1, 1, 1).sum().backward();
        let dx = x.grad().unwrap().to_vec();
        let at = |c: usize, iy: usize, ix: usize| dx[(c * 64 + iy) * 64 + ix];
        assert_eq!(at(0, 0, 0), 8.0);
        assert_eq!(at(5, 0, 17), 12.0);
        assert_eq!(at(15, 30, 40), 18.0);
        assert_eq!(at(15, 63, 63), 8.0);
        let dw = w.grad().unwrap().to_vec();
        // The centre tap reads all 64x64 cells, a corner tap 63x63.
        assert_eq!(dw[4], 4096.0);
        assert_eq!(dw[0], 63.0 * 63.0);
        assert_eq!(b.grad().unwrap().to_vec(), vec![4096.0, 4096.0]);
    }

    #[test]
    fn errors_name_the_op_and_what_is_wrong() {
        let x = Tensor::zeros(&[2, 4, 5, 5]);
        let err = |w: &[usize], bias: Option<&[usize]>, s: usize, p: usize, groups: usize| {
            let w = Tensor::zeros(w);
            let b = bias.map(Tensor::zeros);
            try_conv2d(&x, &w, b.as_ref(), s, p, 1, groups)
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            err(&[3, 4, 3, 3], None, 1, 0, 2),
            "conv2d: given groups=2, expected weight to be divisible by 2 at dimension 0, \
             but got weight of size [3, 4, 3, 3]"
        );
        assert_eq!(
            err(&[4, 4, 3, 3], None, 1, 0, 2),
            "conv2d: given groups=2, weight of size [4, 4, 3, 3], expected input [2, 4, 5, 5] \
             to have 8 channels, but got 4 channels"
        );
        assert_eq!(
            err(&[4, 4, 7, 3], None, 1, 0, 1),
            "conv2d: calculated padded input size per channel: (5 x 5). Kernel size: (7 x 3). \
             Kernel size can't be greater than actual input size"
        );
        assert_eq!(
            err(&[4, 4, 3, 3], None, 0, 0, 1),
            "conv2d: stride must be positive, got (0, 0)"
        );
        assert_eq!(
            err(&[4, 4, 3, 3], None, 1, 0, 0),
            "conv2d: groups must be positive, got 0"
        );
        assert_eq!(
            err(&[4, 4, 3, 3], Some(&[3]), 1, 0, 1),
            "conv2d: shape mismatch, [4] vs [3]"
        );
        assert_eq!(
            err(&[4, 4, 3], None, 1, 0, 1),
            "conv2d: expected a 4-D weight [out_channels, in_channels / groups, kH, kW], \
             got a tensor of shape [4, 4, 3]"
        );
        assert!(err(&[4, 4, 3, 3], None, 1, usize::MAX, 1).contains("past the largest tensor"));
        let seq = Tensor::zeros(&[4, 5]);
        assert_eq!(
            try_conv1d(&seq, &Tensor::zeros(&[2, 4, 7]), None, 1, 0, 1, 1)
                .unwrap_err()
                .to_string(),
            "conv1d: calculated padded input size per channel: (5). Kernel size: (7). \
             Kernel size can't be greater than actual input size"
        );
    }

    #[test]
    fn nan_reaches_only_the_outputs_whose_window_covers_it() {
        // A NaN at (0, 0) of a 4x4 image: with a 2x2 kernel and no
        // padding only output (0, 0) reads it, through tap (0, 0), so only
        // that tap's gradient Σ x is NaN (the others sum 9 ones).
        let mut values = vec![1.0; 16];
        values[0] = f32::NAN;
        let x = Tensor::from_vec(values, &[1, 1, 4, 4]).unwrap();
        let w = Tensor::ones(&[1, 1, 2, 2]).requires_grad_(true);
        let y = conv2d(&x, &w, None, 1, 0, 1, 1);
        let y_values = y.to_vec();
        assert!(y_values[0].is_nan());
        assert!(y_values[1..].iter().all(|&v| v == 4.0));
        y.sum().backward();
        let dw = w.grad().unwrap().to_vec();
        assert!(dw[0].is_nan());
        assert_eq!(&dw[1..], &[9.0, 9.0, 9.0]);
    }

    #[test]
    fn empty_batch_and_channels_compute_nothing() {
        let x = Tensor::zeros(&[0, 3, 5, 5]).requires_grad_(true);
        let w = Tensor::ones(&[2, 3, 3, 3]).requires_grad_(true);
        let y = conv2d(&x, &w, None, 1, 0, 1, 1);
        assert_eq!(y.shape(), &[0, 2, 3, 3]);
        y.sum().backward();
        assert_eq!(w.grad().unwrap().to_vec(), vec![0.0; 54]);
        // No input channels: the output is the bias.
        let x = Tensor::zeros(&[1, 0, 3, 3]);
        let w = Tensor::zeros(&[2, 0, 2, 2]);
        let b = Tensor::from_vec(vec![1.0, 2.0], &[2]).unwrap();
        let y = conv2d(&x, &w, Some(&b), 1, 0, 1, 1);
        assert_eq!(y.to_vec(), vec![1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 2.0]);
    }

    /// The adjoint of [`direct`] in f64: `dx[n, c, iy, ix] = Σ dy · w`
    /// over the outputs and taps that read `(iy, ix)`.
    fn direct_dx(case: Geometry, dy: &[f32], w: &[f32]) -> Vec<f64> {
        let mut dx = vec![0.0; case.xs.iter().product()];
        each_tap(case, |yi, xi, wi| {
            dx[xi] += f64::from(dy[yi]) * f64::from(w[wi]);
        });
        dx
    }

    /// The input, weight and bias gradients of `Σ r · conv2d(x, w, b)`,
    /// with the input gradient's path forced as `turned` says.
    fn gradients(case: Geometry, x: &[f32], w: &[f32], r: &[f32], turned: bool) -> [Vec<f32>; 3] {
        let Geometry {
            xs,
            ws,
            s,
            p,
            d,
            groups,
        } = case;
        FORCE_TURNED.set(Some(turned));
        let xt = Tensor::from_vec(x.to_vec(), &xs)
            .unwrap()
            .requires_grad_(true);
        let wt = Tensor::from_vec(w.to_vec(), &ws)
            .unwrap()
            .requires_grad_(true);
        let bt = Tensor::zeros(&[ws[0]]).requires_grad_(true);
        let y = conv2d(&xt, &wt, Some(&bt), s, p, d, groups);
        let r = Tensor::from_vec(r.to_vec(), y.shape()).unwrap();
        (&y * &r).sum().backward();
        FORCE_TURNED.set(None);
        [xt.grad(), wt.grad(), bt.grad()].map(|g| g.unwrap().to_vec())
    }

    #[test]
    fn input_gradient_by_the_turned_forward_matches_the_adjoint() {
        // Small images (gathered lowering) and large ones (padded rows),
        // padding 0, dilation, groups, 1x1 and non-square kernels, one row;
        // then the cases the turned path does not cover (padding wider than
        // the kernel's span, stride 2).
        let turned = [
            geometry([2, 4, 9, 7], [6, 2, 3, 3], [1, 1], [1, 1], [1, 1], 2),
            geometry([1, 3, 6, 5], [2, 3, 3, 2], [1, 1], [0, 0], [1, 1], 1),
            geometry([1, 2, 9, 9], [3, 2, 3, 3], [1, 1], [2, 1], [2, 2], 1),
            geometry([2, 5, 4, 4], [3, 5, 1, 1], [1, 1], [0, 0], [1, 1], 1),
            geometry([1, 3, 7, 6], [4, 3, 3, 2], [1, 1], [2, 1], [1, 1], 1),
            geometry([2, 3, 1, 10], [2, 3, 1, 3], [1, 1], [0, 1], [1, 1], 1),
            geometry([1, 32, 40, 36], [16, 32, 3, 3], [1, 1], [1, 1], [1, 1], 1),
            geometry([1, 8, 72, 70], [4, 4, 3, 3], [1, 1], [2, 1], [2, 1], 2),
        ];
        let not_turned = [
            geometry([1, 2, 5, 5], [2, 2, 3, 3], [1, 1], [3, 1], [1, 1], 1),
            geometry([1, 2, 7, 7], [2, 2, 3, 3], [2, 1], [1, 1], [1, 1], 1),
        ];
        let cases = turned
            .map(|case| (case, true))
            .into_iter()
            .chain(not_turned.map(|case| (case, false)));
        for (case, exists) in cases {
            let Geometry {
                xs,
                ws,
                s,
                p,
                d,
                groups,
            } = case;
            let label = format!("{xs:?} * {ws:?}, stride {s:?}, padding {p:?}, dilation {d:?}");
            let (geom, shape) = Geom::new(
                "conv2d",
                2,
                &xs,
                &ws,
                None,
                Size2(s[0], s[1]),
                Size2(p[0], p[1]),
                Size2(d[0], d[1]),
                groups,
            )
            .unwrap();
            assert_eq!(geom.input_gradient().is_some(), exists, "{label}");
            let x = values(xs.iter().product(), 0.1);
            let w = values(ws.iter().product(), 0.3);
            let r = values(shape.iter().product(), 0.7);
            let want = direct_dx(case, &r, &w);
            let turned = gradients(case, &x, &w, &r, true);
            let lowered = gradients(case, &x, &w, &r, false);
            for dx in [&turned[0], &lowered[0]] {
                for (got, want) in dx.iter().zip(&want) {
                    assert!(
                        (f64::from(*got) - want).abs() < 1e-4,
                        "{label}: {got} vs {want}"
                    );
                }
            }
            // The weight and bias gradients do not depend on the path.
            assert_eq!(turned[1..], lowered[1..], "{label}");
        }
    }

    #[test]
    fn gather_tables_kept_per_thread_serve_only_their_own_geometry() {
        // Small images (gathered through a table): geometries that differ
        // in one hyper-parameter each, the same one with another batch
        // size and channel count (which share a table), and one whose
        // table takes most of the thread's room (evicting the others),
        // each run twice in turn; every result against the definition.
        let cases = [
            geometry([2, 3, 8, 8], [4, 3, 3, 3], [1, 1], [1, 1], [1, 1], 1),
            geometry([5, 3, 8, 8], [7, 3, 3, 3], [1, 1], [1, 1], [1, 1], 1),
            geometry([2, 3, 8, 8], [4, 3, 3, 3], [1, 1], [0, 0], [1, 1], 1),
            geometry([2, 3, 8, 8], [4, 3, 3, 3], [2, 1], [1, 1], [1, 1], 1),
            geometry([2, 3, 8, 8], [4, 3, 3, 3], [1, 1], [1, 1], [2, 1], 1),
            geometry([2, 3, 8, 7], [4, 3, 3, 3], [1, 1], [1, 1], [1, 1], 1),
            geometry([1, 16, 20, 20], [2, 16, 3, 3], [1, 1], [1, 1], [1, 1], 1),
        ];
        for _ in 0..2 {
            for case in cases {
                assert_matches_the_definition(case);
            }
        }
        let kept: usize = TABLES.with(|t| t.borrow().iter().map(|(_, t)| t.len()).sum());
        assert!(kept <= TABLES_KEPT, "{kept} entries kept");
    }

    #[test]
    fn small_images_match_the_definition() {
        // Stride-1 small images build their column matrix from runs of the
        // zero-padded image: widths with a run copy of a fixed size (4, 8,
        // 16) and without (5, 7), padding 0, 1 and 2 (the border zeroed
        // once, then kept across the batch's images), a vertical stride,
        // dilation, groups, a one-row image (conv1d's shape).
        let cases = [
            geometry([3, 16, 4, 4], [5, 16, 3, 3], [1, 1], [1, 1], [1, 1], 1),
            geometry([4, 1, 8, 8], [16, 1, 3, 3], [1, 1], [1, 1], [1, 1], 1),
            geometry([2, 2, 16, 16], [3, 2, 3, 3], [1, 1], [1, 1], [1, 1], 1),
            geometry([3, 3, 5, 5], [4, 3, 3, 3], [1, 1], [2, 2], [1, 1], 1),
            geometry([3, 3, 6, 9], [4, 3, 2, 3], [1, 1], [0, 1], [1, 1], 1),
            geometry([2, 4, 8, 8], [4, 2, 3, 3], [2, 1], [1, 1], [1, 1], 2),
            geometry([2, 3, 7, 8], [2, 3, 3, 3], [1, 1], [2, 2], [2, 2], 1),
            geometry([3, 2, 1, 12], [3, 2, 1, 5], [1, 1], [0, 2], [1, 1], 1),
            // One vector per channel (where the CPU has AVX-512), with the
            // bias: a whole tile of 16 filters and a part of one.
            geometry([3, 16, 4, 4], [32, 16, 3, 3], [1, 1], [1, 1], [1, 1], 1),
            geometry([2, 4, 4, 4], [9, 4, 3, 3], [1, 1], [1, 1], [1, 1], 1),
        ];
        for case in cases {
            assert_matches_the_definition(case);
        }
    }

    #[test]
    fn one_vector_images_keep_nan_and_infinity_where_the_lowering_does() {
        // An infinite input value and a NaN weight: every output the
        // column matrix's products make NaN or infinite (a padding tap's
        // 0 · NaN included) is so with the permutes too, and no other.
        let (xs, ws) = ([2, 3, 4, 4], [9, 3, 3, 3]);
        let mut x = values(xs.iter().product(), 0.1);
        x[16 + 5] = f32::INFINITY; // image 0, channel 1, (1, 1)
        let mut w = values(ws.iter().product(), 0.3);
        w[27 * 4 + 9 * 2 + 8] = f32::NAN; // filter 4, channel 2, tap (2, 2)
        let xt = Tensor::from_vec(x, &xs).unwrap();
        let wt = Tensor::from_vec(w, &ws).unwrap();
        let runs: Vec<Vec<f32>> = [false, true]
            .into_iter()
            .map(|gemm| {
                FORCE_GEMM.set(gemm);
                let y = conv2d(&xt, &wt, None, 1, 1, 1, 1).to_vec();
                FORCE_GEMM.set(false);
                y
            })
            .collect();
        let (kernel, lowering) = (&runs[0], &runs[1]);
        assert!(kernel.iter().any(|v| v.is_nan()) && kernel.iter().any(|v| v.is_infinite()));
        for (i, (a, b)) in kernel.iter().zip(lowering).enumerate() {
            assert_eq!(a.is_nan(), b.is_nan(), "output {i}: {a} vs {b}");
            assert_eq!(a.is_infinite(), b.is_infinite(), "output {i}: {a} vs {b}");
            if a.is_finite() {
                assert!((a - b).abs() < 1e-4, "output {i}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn finite_finds_every_nan_and_infinity() {
        for len in [0, 1, 15, 16, 17, 100] {
            let mut values = vec![1.5f32; len];
            assert!(finite(&values));
            for at in 0..len {
                for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                    values[at] = bad;
                    assert!(!finite(&values), "{bad} at {at} of {len}");
                }
                values[at] = f32::MAX;
                assert!(finite(&values));
            }
        }
    }

    #[test]
    fn direct_kernels_match_the_definition_and_the_lowering() {
        // Large images (padded rows): output rows of whole vectors (written
        // in place) and not (through padded rows), fewer than and not a
        // multiple of the forward tile's 8 channels, groups and dilation,
        // and an input gradient by the turned forward.
        let cases = [
            geometry([2, 16, 32, 32], [32, 16, 3, 3], [1, 1], [1, 1], [1, 1], 1),
            geometry([1, 16, 64, 64], [2, 16, 3, 3], [1, 1], [1, 1], [1, 1], 1),
            geometry([1, 4, 70, 48], [9, 4, 3, 3], [1, 1], [1, 1], [1, 1], 1),
            geometry([1, 3, 130, 40], [10, 3, 3, 3], [1, 1], [0, 0], [1, 1], 1),
            geometry([1, 8, 72, 70], [4, 4, 3, 3], [1, 1], [2, 1], [2, 1], 2),
            // One row (conv1d's shape), of whole vectors and not.
            geometry([2, 8, 1, 4000], [6, 8, 1, 5], [1, 1], [0, 2], [1, 1], 1),
            geometry([1, 16, 1, 4001], [6, 8, 1, 5], [1, 1], [0, 4], [1, 2], 2),
            // Medium images (at least 64 taps and 64 positions), of whole
            // vectors and not, with groups.
            geometry([3, 16, 16, 16], [32, 16, 3, 3], [1, 1], [1, 1], [1, 1], 1),
            geometry([2, 32, 8, 8], [64, 32, 3, 3], [1, 1], [1, 1], [1, 1], 1),
            geometry([2, 16, 10, 12], [10, 8, 3, 3], [1, 1], [1, 1], [1, 1], 2),
            // One vector per channel (at most 16 values per image and per
            // output channel): the digits CNN's second layer, a tile of 9
            // filters (fewer than its 16), 1x1 filters past one tile (17),
            // 2x2 with groups, stride 2, dilation 2.
            geometry([3, 16, 4, 4], [32, 16, 3, 3], [1, 1], [1, 1], [1, 1], 1),
            geometry([2, 4, 4, 4], [9, 4, 3, 3], [1, 1], [1, 1], [1, 1], 1),
            geometry([5, 3, 3, 5], [17, 3, 1, 1], [1, 1], [0, 0], [1, 1], 1),
            geometry([2, 6, 4, 4], [24, 3, 2, 2], [1, 1], [0, 0], [1, 1], 2),
            geometry([2, 2, 4, 4], [8, 2, 3, 3], [2, 2], [1, 1], [1, 1], 1),
            geometry([2, 3, 4, 4], [10, 3, 3, 3], [1, 1], [2, 2], [2, 2], 1),
        ];
        for case in cases {
            let Geometry { xs, ws, .. } = case;
            let label = format!("{xs:?} * {ws:?}");
            let x = values(xs.iter().product(), 0.1);
            let w = values(ws.iter().product(), 0.3);
            let y_shape = case.output();
            let r = values(y_shape.iter().product(), 0.7);
            let (want_y, _) = direct(case, &x, &w, &vec![0.0; ws[0]]);
            let want_dx = direct_dx(case, &r, &w);
            let mut want_dw = vec![0.0f64; w.len()];
            each_tap(case, |yi, xi, wi| {
                want_dw[wi] += f64::from(r[yi]) * f64::from(x[xi]);
            });
            let mut runs = Vec::new();
            for gemm in [false, true] {
                FORCE_GEMM.set(gemm);
                let xt = Tensor::from_vec(x.clone(), &xs)
                    .unwrap()
                    .requires_grad_(true);
                let wt = Tensor::from_vec(w.clone(), &ws)
                    .unwrap()
                    .requires_grad_(true);
                let y = conv2d(&xt, &wt, None, case.s, case.p, case.d, case.groups);
                let rt = Tensor::from_vec(r.clone(), y.shape()).unwrap();
                (&y * &rt).sum().backward();
                FORCE_GEMM.set(false);
                let got = [
                    y.to_vec(),
                    xt.grad().unwrap().to_vec(),
                    wt.grad().unwrap().to_vec(),
                ];
                for (name, got, want) in [
                    ("y", &got[0], &want_y),
                    ("dx", &got[1], &want_dx),
                    ("dw", &got[2], &want_dw),
                ] {
                    assert_eq!(got.len(), want.len());
                    for (got, want) in got.iter().zip(want) {
                        let tolerance = 1e-4 * (1.0 + want.abs());
                        assert!(
                            (f64::from(*got) - want).abs() < tolerance,
                            "{label} {name} (gemm {gemm}): {got} vs {want}"
                        );
                    }
                }
                runs.push(got);
            }
            // Not the same bits: the kernels sum in another order.
            assert_eq!(runs[0][0].len(), runs[1][0].len(), "{label}");
        }
    }

    #[test]
    fn input_gradient_by_the_turned_forward_is_the_same_bits_in_parallel_tasks() {
        // Large enough for the kernel to split its product between threads
        // when it may (on the calling thread).
        let (xs, ws) = ([2, 32, 40, 36], [16, 32, 3, 3]);
        let x = values(xs.iter().product(), 0.1);
        let w = values(ws.iter().product(), 0.3);
        let r = values(2 * 16 * 40 * 36, 0.7);
        let case = geometry(xs, ws, [1, 1], [1, 1], [1, 1], 1);
        let run = || gradients(case, &x, &w, &r, true);
        let here = run();
        let there = crate::parallel::map(&[(); 2], |_| run());
        let again = run();
        for other in there.iter().chain([&again]) {
            for (a, b) in here.iter().zip(other) {
                let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(a), bits(b));
            }
        }
    }
}
