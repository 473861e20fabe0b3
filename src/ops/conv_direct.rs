//! Direct convolution kernels for AVX-512: the products of a stride-1
//! convolution computed straight from its padded image, with no column
//! matrix (an implicit-gemm scheme).
//!
//! A padded image `[C, Hp, Wp]` read in its padded rows makes every row of
//! the column matrix a contiguous run of the image: entry `(k, p)` of the
//! column matrix, for tap `k = (c, i, j)` and position `p = oy · Wp + ox`
//! of the output in the padded width, is `x[starts[k] + p]` with
//! `starts[k] = c · Hp · Wp + i · dH · Wp + j · dW`. The lowering onto the
//! `gemm` crate copies these runs into a column matrix band by band before
//! each product; these kernels read them in place, in register tiles of 8
//! output channels by 3 vectors of 16 positions (the forward, 24
//! accumulators of the 32 registers) and 4 output channels by 6 taps (the
//! weight gradient, summed along the positions), with fused multiply-adds.
//!
//! Which positions a kernel computes is a list of vectors. Where the
//! output's width is a multiple of 16, the forward takes each output row's
//! own vectors and writes them in place, so nothing is computed twice or
//! copied. Otherwise it takes the padded rows' vectors, junk positions
//! (`ox ≥ Wo`, whose windows wrap around a row's end) included, and its
//! caller keeps the others. The weight gradient always runs along the
//! padded rows, whose runs are contiguous (its loads then need no bounds
//! checks), with zeros in the output gradient at the junk positions.
//! Measured in BENCHMARKS.md ("conv2d through direct kernels").
//!
//! Images of at most 16 values per channel whose outputs have at most 16
//! positions (the digits CNN's 4x4 layer) have no rows to run along: each
//! channel of an image is one vector, and each tap of a 1x1, 2x2 or 3x3
//! filter a masked permute of it ([`SmallTaps`]), multiplied into 16
//! output channels' accumulators at a time ([`Direct::small_forward`], the
//! forward alone). Any stride, padding and dilation.
//!
//! All the code here is safe: pulp's [`V4`] token proves AVX-512 is
//! present, its operations are safe functions, and every load is from a
//! checked slice. Only for `x86_64` CPUs with AVX-512 (others, and loom
//! builds, take the lowering); [`Direct::detect`] is the switch.

#[cfg(all(not(loom), target_arch = "x86_64"))]
use pulp::x86::V4;

/// Lanes of a vector.
const LANES: usize = 16;

/// The forward's register tile: output channels, and vectors of
/// positions (8 · 3 = 24 accumulators of the 32 registers).
const MR: usize = 8;
#[cfg(all(not(loom), target_arch = "x86_64"))]
const NR: usize = 3;

/// The weight gradient's register tile: output channels by taps (24
/// accumulators).
#[cfg(all(not(loom), target_arch = "x86_64"))]
const MO: usize = 4;
#[cfg(all(not(loom), target_arch = "x86_64"))]
const MK: usize = 6;

/// Proof that this CPU runs the direct kernels: AVX-512 (F, BW, CD, DQ,
/// VL), checked at run time.
#[derive(Clone, Copy, Debug)]
pub(super) struct Direct {
    #[cfg(all(not(loom), target_arch = "x86_64"))]
    simd: V4,
    #[cfg(any(loom, not(target_arch = "x86_64")))]
    never: std::convert::Infallible,
}

/// Where the kernels read and write each vector of positions: its offset
/// in the padded image (added to a tap's start) and in the output (or
/// output gradient) row of a channel.
pub(super) type Vectors = [(usize, usize)];

/// The vectors of an image whose output rows (`rows` of `width`
/// positions, in padded rows of `padded_width`) are whole vectors: each
/// row's own, read from the padded row and written to the output row
/// in place, no junk. `None` for other widths.
pub(super) fn row_vectors(
    rows: usize,
    width: usize,
    padded_width: usize,
) -> Option<Vec<(usize, usize)>> {
    width.is_multiple_of(LANES).then(|| {
        (0..rows)
            .flat_map(|r| {
                (0..width / LANES)
                    .map(move |v| (r * padded_width + v * LANES, r * width + v * LANES))
            })
            .collect()
    })
}

/// The vectors of `positions` positions in the padded width (junk
/// included, rounded up to whole vectors), at the same offset in the
/// image and the output.
pub(super) fn padded_vectors(positions: usize) -> Vec<(usize, usize)> {
    (0..positions.div_ceil(LANES))
        .map(|v| (v * LANES, v * LANES))
        .collect()
}

/// How many values a padded image must hold for the kernels to read
/// `vectors` from each of `starts`.
pub(super) fn image_len(starts: &[usize], vectors: &Vectors) -> usize {
    let last = vectors.iter().map(|v| v.0).max();
    match (starts.iter().max(), last) {
        (Some(s), Some(v)) => s + v + LANES,
        _ => 0,
    }
}

/// How many values an output row must hold for the kernels to write
/// `vectors` into it.
pub(super) fn row_len(vectors: &Vectors) -> usize {
    vectors.iter().map(|v| v.1 + LANES).max().unwrap_or(0)
}

impl Direct {
    /// The kernels, where this CPU has AVX-512.
    pub(super) fn detect() -> Option<Direct> {
        #[cfg(all(not(loom), target_arch = "x86_64"))]
        {
            V4::try_new().map(|simd| Direct { simd })
        }
        #[cfg(any(loom, not(target_arch = "x86_64")))]
        {
            None
        }
    }

    /// `w` (`[og, K]`, row-major) packed for [`forward`](Direct::forward):
    /// tiles of [`MR`] channels, each `[K, MR]`, the last tile's missing
    /// channels zero.
    pub(super) fn pack(og: usize, k: usize, w: &[f32]) -> Vec<f32> {
        debug_assert_eq!(w.len(), og * k);
        let tiles = og.div_ceil(MR);
        let mut packed = vec![0.0; tiles * k * MR];
        for (o, filter) in w.chunks_exact(k.max(1)).enumerate().take(og) {
            let tile = &mut packed[(o / MR) * k * MR..][..k * MR];
            for (t, v) in filter.iter().enumerate() {
                tile[t * MR + o % MR] = *v;
            }
        }
        packed
    }

    /// `out[o · ld + q] = b[o] + Σ_k w[o, k] · x[starts[k] + p]` for the
    /// `og` channels of `packed` ([`pack`](Direct::pack) of `w`), `b` the
    /// bias (zero without one), and every vector `(p, q)` of `vectors`
    /// (its 16 positions from `p` in the image, from `q` in the output).
    ///
    /// `x` must hold [`image_len`] values and `out` `og` rows of `ld ≥`
    /// [`row_len`] values (checked: a short buffer panics, as an index out
    /// of bounds).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn forward(
        self,
        packed: &[f32],
        og: usize,
        bias: Option<&[f32]>,
        x: &[f32],
        starts: &[usize],
        vectors: &Vectors,
        out: &mut [f32],
        ld: usize,
    ) {
        assert!(ld >= row_len(vectors) && out.len() >= og.saturating_sub(1) * ld);
        #[cfg(all(not(loom), target_arch = "x86_64"))]
        pulp::Simd::vectorize(
            self.simd,
            Forward {
                packed,
                og,
                bias,
                x,
                starts,
                vectors,
                out,
                ld,
            },
        );
        #[cfg(any(loom, not(target_arch = "x86_64")))]
        {
            let _ = (packed, bias, x, starts, out);
            match self.never {}
        }
    }

    /// `acc[o · K + k] += Σ_p dy[o · ld + p] · x[starts[k] + p]` for `o <
    /// og` and the positions `p` of the first `vectors` vectors (from 0,
    /// in the padded width: [`padded_vectors`]): the weight gradient of
    /// [`forward`](Direct::forward) (as `[og, K]`), for one image. `dy`
    /// must be zero at the junk positions (and `x` finite: `0 · ∞` is
    /// NaN).
    ///
    /// `x` must hold [`image_len`] values and `dy` `og` rows of `ld ≥ 16 ·
    /// vectors` values (checked, as in `forward`).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn weight_grad(
        self,
        dy: &[f32],
        og: usize,
        ld: usize,
        x: &[f32],
        starts: &[usize],
        vectors: usize,
        acc: &mut [f32],
    ) {
        assert!(ld >= vectors * LANES && acc.len() == og * starts.len());
        if og == 0 || starts.is_empty() {
            return;
        }
        #[cfg(all(not(loom), target_arch = "x86_64"))]
        pulp::Simd::vectorize(
            self.simd,
            WeightGrad {
                dy,
                og,
                ld,
                x,
                starts,
                vectors,
                acc,
            },
        );
        #[cfg(any(loom, not(target_arch = "x86_64")))]
        {
            let _ = (dy, x);
            match self.never {}
        }
    }

    /// `out[n · out_stride + o · P + p] = b[o] + Σ_{c, t} w[o, c, t] ·
    /// x_{n,c}[tap t at p]` for `images` images, image `n`'s group of
    /// channels (`[cg, H · W]`) at `n · x_stride` of `x`, the `og` filters
    /// `w` (`[og, cg, kH, kW]`, row-major), `b` the bias (zero without
    /// one) and `P` the output positions: one vector per channel, in tiles
    /// of 16 output channels (16 accumulators), each tap a masked permute
    /// of the channel's vector.
    ///
    /// The slices must hold what these offsets reach (checked: a short one
    /// panics, as an index out of bounds).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn small_forward(
        self,
        taps: &SmallTaps,
        w: &[f32],
        (og, cg): (usize, usize),
        bias: Option<&[f32]>,
        images: usize,
        (x, x_stride): (&[f32], usize),
        (out, out_stride): (&mut [f32], usize),
    ) {
        assert!(w.len() == og * cg * taps.masks.len());
        #[cfg(all(not(loom), target_arch = "x86_64"))]
        pulp::Simd::vectorize(
            self.simd,
            SmallForward {
                v4: self.simd,
                taps,
                w,
                og,
                cg,
                bias,
                images,
                x,
                x_stride,
                out,
                out_stride,
            },
        );
        #[cfg(any(loom, not(target_arch = "x86_64")))]
        {
            let _ = (taps, w, og, cg, bias, images, x, x_stride, out, out_stride);
            match self.never {}
        }
    }
}

/// The taps of a convolution over images of at most 16 values per channel
/// whose output has at most 16 positions: each tap `(i, j)` as a permute
/// of the channel's one vector, lane `p = oy · Wo + ox` taking the value at
/// `(oy · sH + i · dH − pH, ox · sW + j · dW − pW)`, zero (masked off) in
/// the padding and past the output's positions.
#[derive(Debug)]
pub(super) struct SmallTaps {
    /// Per tap, the lanes that read inside the image.
    masks: Vec<u16>,
    /// Per tap, the image position each lane reads (0 where masked off).
    index: Vec<[i32; LANES]>,
    /// Values per channel of the image (`H · W ≤ 16`).
    image: usize,
    /// Output positions per channel (`Ho · Wo ≤ 16`).
    positions: usize,
}

impl SmallTaps {
    /// The permutes of a convolution with `image = (H, W)`, output `(Ho,
    /// Wo)`, and `kernel`, `stride`, `padding`, `dilation` as `(rows,
    /// columns)`; `None` when the image or the output has more than 16
    /// values per channel, or the filter other than 1, 4 or 9 taps (the
    /// kernel's register plan).
    pub(super) fn new(
        image: (usize, usize),
        output: (usize, usize),
        kernel: (usize, usize),
        stride: (usize, usize),
        padding: (usize, usize),
        dilation: (usize, usize),
    ) -> Option<SmallTaps> {
        let ((h, w), (ho, wo)) = (image, output);
        if h * w > LANES || ho * wo > LANES || ![1, 4, 9].contains(&(kernel.0 * kernel.1)) {
            return None;
        }
        let mut taps = SmallTaps {
            masks: Vec::with_capacity(kernel.0 * kernel.1),
            index: Vec::with_capacity(kernel.0 * kernel.1),
            image: h * w,
            positions: ho * wo,
        };
        for i in 0..kernel.0 {
            for j in 0..kernel.1 {
                let (mut mask, mut index) = (0u16, [0i32; LANES]);
                for oy in 0..ho {
                    for ox in 0..wo {
                        let iy = (oy * stride.0 + i * dilation.0).checked_sub(padding.0);
                        let ix = (ox * stride.1 + j * dilation.1).checked_sub(padding.1);
                        if let (Some(iy), Some(ix)) = (iy, ix)
                            && iy < h
                            && ix < w
                        {
                            let lane = oy * wo + ox;
                            mask |= 1 << lane;
                            // At most 15: fits.
                            index[lane] = (iy * w + ix) as i32;
                        }
                    }
                }
                taps.masks.push(mask);
                taps.index.push(index);
            }
        }
        Some(taps)
    }
}

// The kernels are `pulp::WithSimd` types, not closures: pulp calls a
// closure through its `FnOnce` shim, which LLVM did not inline into the
// AVX-512 function once the closure grew (it then ran without AVX-512,
// 30-80x slower); `with_simd` is inlined by attribute all the way down.
// They run only with `V4` (16 lanes, 32 registers), which `Direct` holds.

/// [`Direct::forward`]'s operands.
#[cfg(all(not(loom), target_arch = "x86_64"))]
struct Forward<'a> {
    packed: &'a [f32],
    og: usize,
    bias: Option<&'a [f32]>,
    x: &'a [f32],
    starts: &'a [usize],
    vectors: &'a Vectors,
    out: &'a mut [f32],
    ld: usize,
}

#[cfg(all(not(loom), target_arch = "x86_64"))]
impl pulp::WithSimd for Forward<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, simd: S) {
        assert_eq!(S::F32_LANES, LANES);
        let k = self.starts.len();
        // Each tile of channels: its packed weights, first channel, rows
        // and biases (zero without a bias, and for the missing rows).
        let tiles: Vec<(&[f32], usize, usize, [f32; MR])> = self
            .packed
            .chunks_exact((k * MR).max(1))
            .enumerate()
            .map(|(tile, w)| {
                let o0 = tile * MR;
                let rows = (self.og - o0).min(MR);
                let b = std::array::from_fn(|m| match self.bias {
                    Some(b) if m < rows => b[o0 + m],
                    _ => 0.0,
                });
                (w, o0, rows, b)
            })
            .collect();
        for run in self.vectors.chunks(NR) {
            for &(w, o0, rows, b) in &tiles {
                let tile = Tile {
                    w,
                    b,
                    run,
                    o0,
                    rows,
                };
                match run.len() {
                    3 => forward_tile::<S, 3>(simd, &tile, self.x, self.starts, self.out, self.ld),
                    2 => forward_tile::<S, 2>(simd, &tile, self.x, self.starts, self.out, self.ld),
                    _ => forward_tile::<S, 1>(simd, &tile, self.x, self.starts, self.out, self.ld),
                }
            }
        }
    }
}

/// One register tile of [`Direct::forward`]: channels `o0..o0 + rows` of
/// the `MR` whose packed `[K, MR]` weights are `w` and biases `b`, by the
/// vectors of `run`.
#[cfg(all(not(loom), target_arch = "x86_64"))]
struct Tile<'a> {
    w: &'a [f32],
    b: [f32; MR],
    run: &'a Vectors,
    o0: usize,
    rows: usize,
}

/// The vector of `x` at `at`.
#[cfg(all(not(loom), target_arch = "x86_64"))]
#[inline(always)]
fn load<S: pulp::Simd>(x: &[f32], at: usize) -> S::f32s {
    S::as_simd_f32s(&x[at..at + LANES]).0[0]
}

/// [`Tile`] computed, `R` vectors wide.
#[cfg(all(not(loom), target_arch = "x86_64"))]
#[inline(always)]
#[allow(clippy::needless_range_loop)]
fn forward_tile<S: pulp::Simd, const R: usize>(
    simd: S,
    tile: &Tile<'_>,
    x: &[f32],
    starts: &[usize],
    out: &mut [f32],
    ld: usize,
) {
    let mut acc: [[S::f32s; R]; MR] = std::array::from_fn(|m| [simd.splat_f32s(tile.b[m]); R]);
    let xo: [usize; R] = std::array::from_fn(|v| tile.run[v].0);
    // Index loops over the register arrays: iterating them by value (an
    // array's `IntoIter`, or `map`) left the loop outside AVX-512 code.
    for (k, &start) in starts.iter().enumerate() {
        let xs: [S::f32s; R] = std::array::from_fn(|v| load::<S>(x, start + xo[v]));
        let w = &tile.w[k * MR..k * MR + MR];
        for m in 0..MR {
            let w = simd.splat_f32s(w[m]);
            for v in 0..R {
                acc[m][v] = simd.mul_add_f32s(xs[v], w, acc[m][v]);
            }
        }
    }
    for m in 0..tile.rows {
        let row = &mut out[(tile.o0 + m) * ld..];
        for v in 0..R {
            let at = tile.run[v].1;
            S::as_mut_simd_f32s(&mut row[at..at + LANES]).0[0] = acc[m][v];
        }
    }
}

/// [`Direct::weight_grad`]'s operands.
#[cfg(all(not(loom), target_arch = "x86_64"))]
struct WeightGrad<'a> {
    dy: &'a [f32],
    og: usize,
    ld: usize,
    x: &'a [f32],
    starts: &'a [usize],
    vectors: usize,
    acc: &'a mut [f32],
}

#[cfg(all(not(loom), target_arch = "x86_64"))]
impl pulp::WithSimd for WeightGrad<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, simd: S) {
        assert_eq!(S::F32_LANES, LANES);
        let (og, k, n) = (self.og, self.starts.len(), self.vectors);
        // Every run cut to whole vectors once, so the loads of the tiles'
        // loop need no bounds checks (with a check per load the loop was
        // bound by its instructions, not its multiply-adds: 2.2 ms where
        // the forward took 1.3).
        let (dys, xs) = (self.dy, self.x);
        let run = |at: usize, of_dy: bool| -> &[S::f32s] {
            let values = if of_dy { dys } else { xs };
            &S::as_simd_f32s(&values[at..at + n * LANES]).0[..n]
        };
        for k0 in (0..k).step_by(MK) {
            for o0 in (0..og).step_by(MO) {
                // Missing channels and taps repeat the last one; their
                // sums are computed and dropped.
                let dy: [&[S::f32s]; MO] =
                    std::array::from_fn(|m| run((o0 + m).min(og - 1) * self.ld, true));
                let x: [&[S::f32s]; MK] =
                    std::array::from_fn(|t| run(self.starts[(k0 + t).min(k - 1)], false));
                let sums = weight_tile(simd, dy, x, n);
                for (m, row) in sums.iter().enumerate().take(og - o0) {
                    let acc = &mut self.acc[(o0 + m) * k + k0..];
                    for (a, s) in acc.iter_mut().zip(row).take(k - k0) {
                        *a += *s;
                    }
                }
            }
        }
    }
}

/// One register tile of [`Direct::weight_grad`]: the sums over `n`
/// vectors of the `dy` rows times the `x` runs.
#[cfg(all(not(loom), target_arch = "x86_64"))]
#[inline(always)]
#[allow(clippy::needless_range_loop)]
fn weight_tile<S: pulp::Simd>(
    simd: S,
    dy: [&[S::f32s]; MO],
    x: [&[S::f32s]; MK],
    n: usize,
) -> [[f32; MK]; MO] {
    let zero = simd.splat_f32s(0.0);
    let mut acc = [[zero; MK]; MO];
    let dy: [&[S::f32s]; MO] = std::array::from_fn(|m| &dy[m][..n]);
    let x: [&[S::f32s]; MK] = std::array::from_fn(|t| &x[t][..n]);
    for v in 0..n {
        let g: [S::f32s; MO] = std::array::from_fn(|m| dy[m][v]);
        let r: [S::f32s; MK] = std::array::from_fn(|t| x[t][v]);
        for m in 0..MO {
            for t in 0..MK {
                acc[m][t] = simd.mul_add_f32s(g[m], r[t], acc[m][t]);
            }
        }
    }
    let mut sums = [[0.0; MK]; MO];
    for m in 0..MO {
        for t in 0..MK {
            sums[m][t] = simd.reduce_sum_f32s(acc[m][t]);
        }
    }
    sums
}

/// [`Direct::small_forward`]'s operands, and the token for the permutes
/// (an AVX-512 instruction pulp's portable operations do not have).
#[cfg(all(not(loom), target_arch = "x86_64"))]
struct SmallForward<'a> {
    v4: V4,
    taps: &'a SmallTaps,
    w: &'a [f32],
    og: usize,
    cg: usize,
    bias: Option<&'a [f32]>,
    images: usize,
    x: &'a [f32],
    x_stride: usize,
    out: &'a mut [f32],
    out_stride: usize,
}

#[cfg(all(not(loom), target_arch = "x86_64"))]
impl pulp::WithSimd for SmallForward<'_> {
    type Output = ();

    #[inline(always)]
    #[allow(clippy::needless_range_loop)]
    fn with_simd<S: pulp::Simd>(mut self, _: S) {
        use core::arch::x86_64::__m512i;
        let simd = self.v4;
        let taps = self.taps;
        let kk = taps.masks.len();
        let index: Vec<__m512i> = taps.index.iter().map(|i| pulp::cast(*i)).collect();
        match kk {
            9 => small_tiles::<9>(simd, &mut self, &index),
            4 => small_tiles::<4>(simd, &mut self, &index),
            _ => small_tiles::<1>(simd, &mut self, &index),
        }
    }
}

/// [`SmallForward`] with `KK` taps: a channel's `KK` permutes and a tile's
/// 16 accumulators held in registers (25 of the 32 with 9 taps), each
/// filter's `KK` weights for the channel read as one array.
#[cfg(all(not(loom), target_arch = "x86_64"))]
#[inline(always)]
#[allow(clippy::needless_range_loop)]
fn small_tiles<const KK: usize>(
    simd: V4,
    op: &mut SmallForward<'_>,
    index: &[core::arch::x86_64::__m512i],
) {
    use core::arch::x86_64::__m512;
    use pulp::Simd;
    let (hw, p, cg) = (op.taps.image, op.taps.positions, op.cg);
    let masks: &[u16; KK] = op.taps.masks[..].try_into().expect("KK taps");
    let index: &[_; KK] = index.try_into().expect("KK taps");
    // A filter's weights: `cg · KK`.
    let ck = cg * KK;
    // A tile's weights as `[cg, 16, KK]` (channel by channel, zero past the
    // last filter): each multiply-add then reads its weight at a constant
    // offset, and the 16 accumulators stay in registers.
    let mut packed = vec![0.0f32; cg * LANES * KK];
    for o0 in (0..op.og).step_by(LANES) {
        let rows = (op.og - o0).min(LANES);
        if rows < LANES {
            packed.fill(0.0);
        }
        for m in 0..rows {
            let filter = &op.w[(o0 + m) * ck..][..ck];
            for (c, taps) in filter.as_chunks::<KK>().0.iter().enumerate() {
                let (dst, _) = packed[(c * LANES + m) * KK..][..KK].as_chunks_mut::<KK>();
                dst[0] = *taps;
            }
        }
        let bias: [f32; LANES] = std::array::from_fn(|m| match op.bias {
            Some(b) if m < rows => b[o0 + m],
            _ => 0.0,
        });
        for n in 0..op.images {
            let x = &op.x[n * op.x_stride..][..cg * hw];
            let mut acc: [pulp::f32x16; LANES] = std::array::from_fn(|m| simd.splat_f32s(bias[m]));
            for c in 0..cg {
                let image: __m512 = pulp::cast(simd.partial_load_f32s(&x[c * hw..][..hw]));
                let shifted: [pulp::f32x16; KK] = std::array::from_fn(|t| {
                    pulp::cast(
                        simd.avx512f
                            ._mm512_maskz_permutexvar_ps(masks[t], index[t], image),
                    )
                });
                let (weights, _) = packed[c * LANES * KK..][..LANES * KK].as_chunks::<KK>();
                let weights: &[[f32; KK]; LANES] = weights.try_into().expect("16 filters");
                for t in 0..KK {
                    for m in 0..LANES {
                        acc[m] =
                            simd.mul_add_f32s(simd.splat_f32s(weights[m][t]), shifted[t], acc[m]);
                    }
                }
            }
            let out = &mut op.out[n * op.out_stride..];
            for m in 0..rows {
                simd.partial_store_f32s(&mut out[(o0 + m) * p..][..p], acc[m]);
            }
        }
    }
}

#[cfg(all(test, not(loom), target_arch = "x86_64"))]
mod tests {
    use super::*;

    fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len as u32)
            .map(|i| ((i.wrapping_mul(2_654_435_761) ^ seed) % 2001) as f32 / 1000.0 - 1.0)
            .collect()
    }

    /// Random geometries of the kernels' products against `f64` sums:
    /// channel counts around the tiles' sizes, position counts off whole
    /// vectors.
    /// Random geometries of the kernels' products against `f64` sums:
    /// channel counts around the tiles' sizes, vector counts off whole
    /// tiles, in padded rows and in rows of whole vectors.
    #[test]
    fn products_match_their_definitions() {
        let Some(direct) = Direct::detect() else {
            eprintln!("no AVX-512 here: the direct kernels are not used");
            return;
        };
        let cases = [
            (1, 1, 1, 1),
            (8, 9, 3, 16),
            (13, 7, 2, 17),
            (32, 144, 32, 34),
            (5, 13, 5, 32),
        ];
        for (og, k, rows, width) in cases {
            let starts: Vec<usize> = (0..k).map(|t| (t * 37) % 101).collect();
            let padded = padded_vectors(rows * width);
            let aligned = row_vectors(rows, width - width % 16, width);
            for vectors in std::iter::once(padded).chain(aligned) {
                let x = values(image_len(&starts, &vectors), 7);
                let w = values(og * k, 3);
                let b = values(og, 5);
                let ld = row_len(&vectors) + 3;
                let mut out = vec![f32::NAN; og * ld];
                let packed = Direct::pack(og, k, &w);
                direct.forward(&packed, og, Some(&b), &x, &starts, &vectors, &mut out, ld);
                let dy = values(og * ld, 11);
                let mut acc = vec![1.0; og * k];
                let mut dw = vec![1.0f64; og * k];
                if vectors
                    .iter()
                    .enumerate()
                    .all(|(v, &(p, q))| p == 16 * v && q == p)
                {
                    direct.weight_grad(&dy, og, ld, &x, &starts, vectors.len(), &mut acc);
                } else {
                    dw.clear();
                }
                for o in 0..og {
                    for &(p, q) in &vectors {
                        for l in 0..16 {
                            let want: f64 = f64::from(b[o])
                                + (0..k)
                                    .map(|t| {
                                        f64::from(w[o * k + t]) * f64::from(x[starts[t] + p + l])
                                    })
                                    .sum::<f64>();
                            let got = f64::from(out[o * ld + q + l]);
                            assert!(
                                (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                                "forward {og} {k}: {got} vs {want}"
                            );
                            for (t, dw) in dw.iter_mut().skip(o * k).take(k).enumerate() {
                                *dw +=
                                    f64::from(dy[o * ld + q + l]) * f64::from(x[starts[t] + p + l]);
                            }
                        }
                    }
                    for (t, want) in dw.iter().skip(o * k).take(k).enumerate() {
                        let got = f64::from(acc[o * k + t]);
                        assert!(
                            (got - want).abs() < 1e-3 * (1.0 + want.abs()),
                            "weight {og} {k}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
