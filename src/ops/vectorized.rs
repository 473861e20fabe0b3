//! Element kernels that vectorise: `exp`, `tanh` and `sigmoid` written in
//! plain `f32` arithmetic (no table, no branch the compiler cannot turn
//! into a blend), and [`dispatch`], which compiles a loop for the widest
//! SIMD extension this CPU has.
//!
//! Nothing sets a target CPU for the crate, so a loop compiles for SSE2
//! unless it runs inside [`dispatch`] (pulp's run-time choice of AVX-512,
//! AVX2 + FMA or SSE2). The arithmetic is the same in every variant (no
//! fused multiply-add is written), so results do not depend on the CPU.
//! libm's `expf`/`tanhf` are scalar calls: in attention's softmax and the
//! tanh MLP of the Hessian-vector-product benchmark they were the largest
//! single cost after the matrix products.
//!
//! Accuracy, checked against `f64` over dense sweeps in the tests below:
//! [`exp`] within 2 ulp for results in the normal range (absolute error
//! below 2⁻¹⁴⁹ · 2 in the subnormal range), [`tanh`] within 3 ulp,
//! [`sigmoid`] within 4 ulp. NaN gives NaN; `exp(+inf) = +inf`,
//! `exp(-inf) = 0`, `tanh(±inf) = ±1`, `sigmoid(±inf)` = 1 / 0, and
//! `tanh(-0.0) = -0.0`.
//!
//! # Splitting across threads
//!
//! Large element maps, row loops and per-batch kernels split across the
//! caller's rayon pool (the pool the op is called in: a user's, or rayon's
//! global one outside any) through [`should_split`], [`for_each_piece`]
//! and the `par_` helpers. The pieces are cut from the sizes alone, and a
//! sum across pieces adds them in a fixed order, so an op gives the same
//! bits on any thread count. Small tensors stay on the calling thread (see
//! [`MIN_PARALLEL_WORK`]), as does all work inside a task of a netcl
//! data-parallel operation and everything under loom. A task runs plain
//! arithmetic on buffers: no tensor op (so nothing records on a tape from
//! a worker thread), and no lock is taken.

use crate::storage::Data;

/// Runs `f` compiled for the widest SIMD extension this CPU has (AVX-512,
/// AVX2 + FMA, or the baseline SSE2), chosen at run time by
/// [`pulp::Arch::dispatch`]: `f`'s loops, inlined into each variant,
/// auto-vectorise for it (mark closures `#[inline(always)]`). Under loom
/// (no pulp) `f` runs as it is.
#[inline(always)]
pub(crate) fn dispatch<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(not(loom))]
    {
        pulp::Arch::new().dispatch(f)
    }
    #[cfg(loom)]
    {
        f()
    }
}

/// `f` of each value of `src` in a new `Vec` (written once, not zeroed
/// first), compiled for the widest SIMD extension (see [`dispatch`]); `f`
/// should be one of this module's kernels or plain arithmetic, inlined.
#[inline(always)]
pub(crate) fn map(src: &[f32], f: impl Fn(f32) -> f32) -> Vec<f32> {
    // A copy mapped in place: LLVM vectorises this loop at the dispatched
    // width, where `Vec::extend` over a mapped iterator kept a heavy body
    // (exact GELU) at four lanes.
    // The copy in a buffer from this thread's cache of freed buffers (an
    // activation's output reuses the one freed before it).
    let mut out = crate::storage::cache::take(src.len());
    out.extend_from_slice(src);
    map_in_place(&mut out, f);
    out
}

/// `values[i] = f(values[i])` in place, as [`map`].
#[inline(always)]
pub(crate) fn map_in_place(values: &mut [f32], f: impl Fn(f32) -> f32) {
    dispatch(
        #[inline(always)]
        || {
            for v in values.iter_mut() {
                *v = f(*v);
            }
        },
    );
}

/// Work, in element operations (about a nanosecond each on one core),
/// below which a kernel stays on the calling thread: splitting less would
/// cost more in waking a sleeping pool worker (20 µs to several hundred on
/// the 2-vCPU machines measured, see [`parallel`](crate::parallel)) than
/// the second thread saves.
pub(crate) const MIN_PARALLEL_WORK: usize = 1 << 17;

/// Elements per piece of a split element map: a fixed size, so the pieces
/// never depend on the thread count.
const MAP_PIECE: usize = 1 << 14;

/// Whether a kernel of `work` element operations should split across the
/// caller's rayon pool (the current one: a user's pool, or the global one
/// outside any): it is large enough, the pool has more than one thread,
/// and this thread is not running a task of a netcl data-parallel
/// operation, whose parallelism is already taken. Never under loom.
///
/// Kernels that split compute on plain buffers only: no tensor op runs in
/// a task, so nothing records on a tape from a worker thread, and no lock
/// is held while the pieces run.
#[inline(always)]
pub(crate) fn should_split(work: usize) -> bool {
    #[cfg(not(loom))]
    {
        // The matrix kernel's thread count for a product past its own
        // threshold: the pool's threads, or 1 inside a data-parallel task.
        work >= MIN_PARALLEL_WORK && crate::parallel::kernel_threads(usize::MAX, 1, 1) > 1
    }
    #[cfg(loom)]
    {
        let _ = work;
        false
    }
}

/// `f` of every piece: on the caller's rayon pool when [`should_split`]
/// says so for `work`, in order on this thread otherwise. The caller cuts
/// the pieces (chunks of an output with their inputs) from the sizes
/// alone, so what each call computes never depends on the thread count.
pub(crate) fn for_each_piece<T: Send>(pieces: Vec<T>, work: usize, f: impl Fn(T) + Sync + Send) {
    if pieces.len() > 1 && should_split(work) {
        // (Never under loom: `should_split` is false there.)
        #[cfg(not(loom))]
        {
            use rayon::prelude::*;
            pieces.into_par_iter().for_each(f);
            return;
        }
    }
    pieces.into_iter().for_each(f);
}

/// `f` of every piece, in order, computed as [`for_each_piece`] does.
pub(crate) fn map_pieces<T: Send, R: Send>(
    pieces: Vec<T>,
    work: usize,
    f: impl Fn(T) -> R + Sync + Send,
) -> Vec<R> {
    if pieces.len() > 1 && should_split(work) {
        // (Never under loom: `should_split` is false there.)
        #[cfg(not(loom))]
        {
            use rayon::prelude::*;
            return pieces.into_par_iter().map(f).collect();
        }
    }
    pieces.into_iter().map(f).collect()
}

/// `slice` cut into consecutive parts of the given lengths (which must add
/// up to at most its length; zero lengths allowed).
pub(crate) fn split_lengths<T>(
    mut slice: &mut [T],
    lengths: impl IntoIterator<Item = usize>,
) -> Vec<&mut [T]> {
    lengths
        .into_iter()
        .map(|len| {
            let (head, tail) = std::mem::take(&mut slice).split_at_mut(len);
            slice = tail;
            head
        })
        .collect()
}

/// [`map`], split across the caller's pool when `src.len() · cost` element
/// operations are worth it ([`should_split`]); `cost` is `f`'s price in
/// simple operations (1 for an add, about 10 for exact GELU). The same
/// bits on any thread count: each value is `f` of its input alone.
#[inline(always)]
pub(crate) fn par_map(src: &[f32], cost: usize, f: impl Fn(f32) -> f32 + Sync + Send) -> Vec<f32> {
    let work = src.len().saturating_mul(cost);
    if !should_split(work) {
        return map(src, f);
    }
    // From this thread's cache of freed buffers, as `map`'s.
    let mut out = crate::storage::cache::zeros(src.len());
    let pieces: Vec<_> = out
        .chunks_mut(MAP_PIECE)
        .zip(src.chunks(MAP_PIECE))
        .collect();
    for_each_piece(pieces, work, |(out, src)| {
        dispatch(
            #[inline(always)]
            || {
                for (o, &s) in out.iter_mut().zip(src) {
                    *o = f(s);
                }
            },
        );
    });
    out
}

/// `a[i] = f(a[i], b[i])` in place (`b` as long as `a`), in the widest SIMD
/// extension and split as [`par_map`].
#[inline(always)]
pub(crate) fn par_zip_in_place(
    a: &mut [f32],
    b: &[f32],
    cost: usize,
    f: impl Fn(f32, f32) -> f32 + Sync + Send,
) {
    assert_eq!(a.len(), b.len(), "zip_in_place: operands of one length");
    let zip = |a: &mut [f32], b: &[f32]| {
        dispatch(
            #[inline(always)]
            || {
                for (a, &b) in a.iter_mut().zip(b) {
                    *a = f(*a, b);
                }
            },
        );
    };
    let work = a.len().saturating_mul(cost);
    if !should_split(work) {
        return zip(a, b);
    }
    let pieces: Vec<_> = a.chunks_mut(MAP_PIECE).zip(b.chunks(MAP_PIECE)).collect();
    for_each_piece(pieces, work, |(a, b)| zip(a, b));
}

/// `f(a[i], b[i])` into a new `Vec` (`b` as long as `a`), in the widest
/// SIMD extension and split as [`par_map`].
#[inline(always)]
pub(crate) fn par_zip(
    a: &[f32],
    b: &[f32],
    cost: usize,
    f: impl Fn(f32, f32) -> f32 + Sync + Send,
) -> Vec<f32> {
    assert_eq!(a.len(), b.len(), "zip: operands of one length");
    let zip = |out: &mut [f32], a: &[f32], b: &[f32]| {
        dispatch(
            #[inline(always)]
            || {
                for ((o, &a), &b) in out.iter_mut().zip(a).zip(b) {
                    *o = f(a, b);
                }
            },
        );
    };
    let mut out = crate::storage::cache::zeros(a.len());
    let work = a.len().saturating_mul(cost);
    if !should_split(work) {
        zip(&mut out, a, b);
        return out;
    }
    let pieces: Vec<_> = out
        .chunks_mut(MAP_PIECE)
        .zip(a.chunks(MAP_PIECE))
        .zip(b.chunks(MAP_PIECE))
        .collect();
    for_each_piece(pieces, work, |((out, a), b)| zip(out, a, b));
    out
}

/// `f(i, row)` for every row `i` of `width` values of `values`: in blocks of
/// rows on the caller's rayon pool when `values.len() · cost` element
/// operations are worth it ([`should_split`]), in order on this thread
/// otherwise. Each row is computed alone, so the same bits on any thread
/// count.
pub(crate) fn par_rows(
    values: &mut [f32],
    width: usize,
    cost: usize,
    f: impl Fn(usize, &mut [f32]) + Sync + Send,
) {
    if width == 0 {
        return;
    }
    let work = values.len().saturating_mul(cost);
    if !should_split(work) {
        values
            .chunks_mut(width)
            .enumerate()
            .for_each(|(i, row)| f(i, row));
        return;
    }
    let block = (MAP_PIECE / width).max(1);
    let pieces: Vec<_> = values.chunks_mut(block * width).enumerate().collect();
    for_each_piece(pieces, work, |(b, rows)| {
        for (i, row) in rows.chunks_mut(width).enumerate() {
            f(b * block + i, row);
        }
    });
}

/// `data.map_simd(f)`, split as [`par_map`] when the values are row-major
/// and the work is worth it.
#[inline(always)]
pub(crate) fn map_data(data: &Data, cost: usize, f: impl Fn(f32) -> f32 + Sync + Send) -> Data {
    match data.as_slice() {
        Some(values) if should_split(values.len().saturating_mul(cost)) => {
            Data::from_vec(data.shape(), par_map(values, cost, f))
        }
        _ => data.map_simd(f),
    }
}

/// `grad.zip_into(other, f)` (in place when no snapshot shares `grad`),
/// split as [`par_zip_in_place`] when both are row-major values of one
/// shape and the work is worth it.
#[inline(always)]
pub(crate) fn zip_data(
    mut grad: Data,
    other: &Data,
    cost: usize,
    f: impl Fn(f32, f32) -> f32 + Sync + Send,
) -> Data {
    // The size first (one compare for a tiny gradient), then the shapes
    // without `==` on slices (a `memcmp` call: 2% of a 10-op chain).
    if should_split(grad.len().saturating_mul(cost))
        && crate::array::same_shape(grad.shape(), other.shape())
        && let (Some(_), Some(b)) = (grad.as_slice(), other.as_slice())
    {
        if grad.is_unique() {
            {
                let a = grad.view_mut().expect("a unique buffer");
                let a = a.into_slice().expect("row-major values");
                par_zip_in_place(a, b, cost, f);
            }
            return grad;
        }
        let a = grad.as_slice().expect("row-major values");
        return Data::from_vec(grad.shape(), par_zip(a, b, cost, f));
    }
    grad.zip_into(other, f)
}

/// The largest value of `values`, or NaN if one is NaN (`f32::max` would
/// skip it); `-inf` for an empty slice. In sixteen lanes: call it inside
/// [`dispatch`].
#[inline(always)]
pub(crate) fn max_or_nan(values: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 16];
    let mut nan = [false; 16];
    let chunks = values.chunks_exact(16);
    for &v in chunks.remainder() {
        lanes[0] = if v > lanes[0] { v } else { lanes[0] };
        nan[0] |= v.is_nan();
    }
    for chunk in chunks {
        for k in 0..16 {
            lanes[k] = if chunk[k] > lanes[k] {
                chunk[k]
            } else {
                lanes[k]
            };
            nan[k] |= chunk[k].is_nan();
        }
    }
    if nan.iter().any(|&n| n) {
        return f32::NAN;
    }
    lanes.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v))
}

/// Σ values in sixteen interleaved lanes (more accurate than one running
/// sum); call it inside [`dispatch`] to vectorise.
#[inline(always)]
pub(crate) fn sum(values: &[f32]) -> f32 {
    let mut lanes = [0.0_f32; 16];
    let chunks = values.chunks_exact(16);
    let mut total = chunks.remainder().iter().sum::<f32>();
    for chunk in chunks {
        for k in 0..16 {
            lanes[k] += chunk[k];
        }
    }
    let mut width = 8;
    while width > 0 {
        for k in 0..width {
            lanes[k] += lanes[k + width];
        }
        width /= 2;
    }
    total += lanes[0];
    total
}

/// Softmax of a row whose maximum `max` is finite, in place:
/// `e^(v - max) / Σ`, the exponentials in SIMD vectors (a `-inf` entry
/// gives exactly 0).
pub(crate) fn softmax_finite_max(row: &mut [f32], max: f32) {
    dispatch(
        #[inline(always)]
        || {
            for v in row.iter_mut() {
                *v = exp(*v - max);
            }
            let total = sum(row);
            for v in row.iter_mut() {
                *v /= total;
            }
        },
    );
}

/// `1.5 · 2²³`: adding it rounds an `f32` below 2²² in magnitude to the
/// nearest integer (ties to even), which its low mantissa bits then hold.
const ROUND: f32 = 12_582_912.0;

/// `e^x` (see the module's accuracy note).
///
/// `x = n·ln2 + r` with `n` an integer and `|r| ≤ ln2/2`; `e^r` by its
/// Taylor polynomial of degree 7 (truncation error below 6·10⁻⁹ relative),
/// then scaled by `2^n` in two steps so that results down in the
/// subnormal range and up to overflow come out right.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 in two parts: the high one has 9 significant bits, so n · LN2_HI
    // is exact for |n| ≤ 2¹⁵.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Below -104 the result is 0, above 89 +inf; NaN stays NaN (clamp
    // keeps it).
    let x = x.clamp(-104.0, 89.0);
    let shifted = x * LOG2E + ROUND;
    let n = shifted - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    // n ∈ [-150, 129] from its bits; 2^n = 2^(n/2) · 2^(n - n/2), each a
    // normal number. (A NaN input gives garbage here, but NaN · anything
    // is NaN.)
    let n = (shifted.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let n = n.clamp(-160, 160);
    let half = n >> 1;
    let s1 = f32::from_bits(((half + 127) as u32) << 23);
    let s2 = f32::from_bits(((n - half + 127) as u32) << 23);
    p * s1 * s2
}

/// Coefficients of `P` in `tanh(a) ≈ a + a³·P(a²)` on `[0, 0.625]`,
/// least-squares fitted to the relative error (below 10⁻⁹ before f32
/// rounding).
const TANH_SMALL: [f32; 6] = [
    -0.333_333_3,
    0.133_332_27,
    -0.053_949_397,
    0.021_715_553,
    -0.008_214_972,
    0.002_178_023_6,
];

/// `tanh(x)` (see the module's accuracy note): the odd polynomial above
/// for `|x| < 0.625`, `1 - 2 / (e^{2|x|} + 1)` above (no cancellation
/// there: the subtracted term is at most 0.45 of 1), with `x`'s sign.
#[inline(always)]
pub(crate) fn tanh(x: f32) -> f32 {
    let a = x.abs();
    let s = a * a;
    let [c0, c1, c2, c3, c4, c5] = TANH_SMALL;
    let small = a + a * s * (c0 + s * (c1 + s * (c2 + s * (c3 + s * (c4 + s * c5)))));
    let big = 1.0 - 2.0 / (exp(2.0 * a) + 1.0);
    // A NaN fails the comparison and takes `big`, which is NaN.
    let t = if a < 0.625 { small } else { big };
    t.copysign(x)
}

/// The logistic function `1 / (1 + e^-x)` (see the module's accuracy
/// note).
#[inline(always)]
pub(crate) fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The distance in units in the last place between an f32 result and
    /// the exact value rounded to f32 (both finite, same sign).
    fn ulps(got: f32, want: f64) -> u32 {
        let want = want as f32;
        if got == want {
            return 0;
        }
        assert!(
            got.is_finite() && want.is_finite() && (got >= 0.0) == (want >= 0.0),
            "{got} vs {want}"
        );
        (got.to_bits() as i64 - want.to_bits() as i64).unsigned_abs() as u32
    }

    /// Every `step`-th f32 between `lo` and `hi` (by bit pattern, both
    /// signs handled by the caller).
    fn sweep(lo: f32, hi: f32, count: u32) -> impl Iterator<Item = f32> {
        (0..=count).map(move |i| lo + (hi - lo) * (i as f32 / count as f32))
    }

    #[test]
    fn exp_is_within_2_ulp_of_f64_over_its_normal_range() {
        let mut worst = (0, 0.0);
        for x in sweep(-87.3, 88.7, 2_000_000).chain(sweep(-1e-3, 1e-3, 10_000)) {
            let want = f64::from(x).exp();
            let got = exp(x);
            let u = ulps(got, want);
            if u > worst.0 {
                worst = (u, x);
            }
        }
        assert!(worst.0 <= 2, "exp: {} ulp at {}", worst.0, worst.1);
    }

    #[test]
    fn exp_underflows_gradually_and_overflows_to_inf() {
        for x in sweep(-104.0, -87.4, 100_000) {
            let want = f64::from(x).exp();
            let got = f64::from(exp(x));
            assert!(
                (got - want).abs() <= 2.0 * 2f64.powi(-149),
                "exp({x}) = {got}, want {want}"
            );
        }
        assert_eq!(exp(-104.5), 0.0);
        assert_eq!(exp(-1e30), 0.0);
        assert_eq!(exp(88.8), f32::INFINITY);
        assert_eq!(exp(1e30), f32::INFINITY);
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-0.0), 1.0);
    }

    #[test]
    fn exp_propagates_nan_and_takes_the_limits_at_infinity() {
        assert!(exp(f32::NAN).is_nan());
        assert!(exp(-f32::NAN).is_nan());
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
    }

    #[test]
    fn tanh_is_within_3_ulp_of_f64() {
        let mut worst = (0, 0.0);
        let xs = sweep(-20.0, 20.0, 2_000_000)
            .chain(sweep(-1.0, 1.0, 1_000_000))
            .chain(sweep(-1e-6, 1e-6, 10_000))
            .chain([1e-30, -1e-30, 1e-40, 0.625, -0.625, 0.624_999_94]);
        for x in xs {
            let want = f64::from(x).tanh();
            let u = ulps(tanh(x), want);
            if u > worst.0 {
                worst = (u, x);
            }
        }
        assert!(worst.0 <= 3, "tanh: {} ulp at {}", worst.0, worst.1);
    }

    #[test]
    fn tanh_propagates_nan_and_keeps_signs() {
        assert!(tanh(f32::NAN).is_nan());
        assert_eq!(tanh(f32::INFINITY), 1.0);
        assert_eq!(tanh(f32::NEG_INFINITY), -1.0);
        assert_eq!(tanh(1e30), 1.0);
        assert_eq!(tanh(0.0).to_bits(), 0.0_f32.to_bits());
        assert_eq!(tanh(-0.0).to_bits(), (-0.0_f32).to_bits());
    }

    #[test]
    fn sigmoid_is_within_4_ulp_of_f64() {
        let mut worst = (0, 0.0);
        for x in sweep(-87.0, 40.0, 2_000_000) {
            let want = 1.0 / (1.0 + (-f64::from(x)).exp());
            let u = ulps(sigmoid(x), want);
            if u > worst.0 {
                worst = (u, x);
            }
        }
        assert!(worst.0 <= 4, "sigmoid: {} ulp at {}", worst.0, worst.1);
        assert!(sigmoid(f32::NAN).is_nan());
        assert_eq!(sigmoid(f32::INFINITY), 1.0);
        assert_eq!(sigmoid(f32::NEG_INFINITY), 0.0);
    }

    #[test]
    fn max_or_nan_and_sum_cover_every_lane_and_the_tail() {
        for len in [0, 1, 15, 16, 17, 40] {
            let values: Vec<f32> = (0..len).map(|i| ((i * 7) % 11) as f32 - 3.0).collect();
            let want_max = values.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            assert_eq!(max_or_nan(&values), want_max, "len {len}");
            let want_sum: f32 = values.iter().sum();
            assert_eq!(
                sum(&values),
                want_sum,
                "len {len} (small integers add exactly)"
            );
            for at in 0..len {
                let mut with_nan = values.clone();
                with_nan[at] = f32::NAN;
                assert!(max_or_nan(&with_nan).is_nan(), "len {len}, NaN at {at}");
                assert!(sum(&with_nan).is_nan(), "len {len}, NaN at {at}");
            }
        }
    }

    #[test]
    fn softmax_rows_sum_to_one_and_hidden_entries_are_zero() {
        let mut row: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin() * 5.0).collect();
        row[3] = f32::NEG_INFINITY;
        let max = max_or_nan(&row);
        let want: Vec<f64> = {
            let e: Vec<f64> = row
                .iter()
                .map(|&v| (f64::from(v) - f64::from(max)).exp())
                .collect();
            let total: f64 = e.iter().sum();
            e.iter().map(|e| e / total).collect()
        };
        softmax_finite_max(&mut row, max);
        assert_eq!(row[3], 0.0);
        for (&got, &want) in row.iter().zip(&want) {
            assert!(
                (f64::from(got) - want).abs() <= 1e-6 * want.max(1e-30),
                "{got} vs {want}"
            );
        }
    }

    #[test]
    fn the_dispatched_loops_give_the_scalar_kernels_bits() {
        let src: Vec<f32> = sweep(-30.0, 30.0, 999).collect();
        let dst = map(&src, tanh);
        for (&x, &y) in src.iter().zip(&dst) {
            assert_eq!(y.to_bits(), tanh(x).to_bits(), "at {x}");
        }
        let mut values = src.clone();
        map_in_place(&mut values, exp);
        for (&x, &y) in src.iter().zip(&values) {
            assert_eq!(y.to_bits(), exp(x).to_bits(), "at {x}");
        }
    }
}
