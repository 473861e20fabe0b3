//! Products of a few rows by a matrix, `c (+)= a · b` with `a` of at most
//! [`MAX_ROWS`] rows: the shape of a model answering one request or a
//! small batch (a linear layer at batch 1-8, a language model's step).
//!
//! The `gemm` crate packs its operands into blocks before its kernels run;
//! with a few rows the packing and its bookkeeping are most of the time
//! (BENCHMARKS.md). Here each output row block stays in registers
//! while the rows of `b` stream past once: for each `k`, a few vectors of
//! `b`'s row `k`, times `a[r, k]` broadcast, are added to the accumulators
//! of every row `r`. Each output element is `c` (or 0) plus the products in
//! the order of `k`, so the result does not depend on the block sizes.
//!
//! All the code is safe: pulp picks the widest instruction set the CPU has
//! (AVX-512, AVX2 + FMA, or scalar) and proves it is there.

use ndarray::{ArrayView2, ArrayViewMut2};

/// The most rows of `a` this kernel takes; more go to the `gemm` crate.
pub(crate) const MAX_ROWS: usize = 8;

/// The most values of `b` this kernel takes (512 KiB, within one core's
/// L2): it reads `b` a column block at a time, down all its rows, which
/// the `gemm` crate's packing beats once `b` comes from farther away
/// (1.2-1.9x its time at 512x2048, 2048x512 and 1024x4096 in
/// BENCHMARKS.md).
pub(crate) const MAX_B: usize = 1 << 17;

/// Vectors per row in the main column blocks: 4 rows by 4 vectors keep 16
/// accumulators, and 4 more registers for `b`, within AVX2's 16 and
/// AVX-512's 32.
const BLOCK: usize = 4;

/// Vectors in the main column blocks of a single row: each vector's sum is
/// a chain of dependent multiply-adds, and 8 chains keep the FMA units
/// busy where 4 would wait on their latency.
const ONE_ROW_BLOCK: usize = 8;

/// `c = a · b`, or `c += a · b` when `accumulate`, if the shapes suit this
/// kernel: `a` of 1 to [`MAX_ROWS`] rows (any strides), `b` of at most
/// [`MAX_B`] values, `b` and `c` row-major and contiguous. Returns whether
/// it ran (`false`: nothing was written).
pub(crate) fn try_small_rows(
    a: ArrayView2<'_, f32>,
    b: ArrayView2<'_, f32>,
    c: &mut ArrayViewMut2<'_, f32>,
    accumulate: bool,
) -> bool {
    let (m, k) = a.dim();
    let n = b.ncols();
    if m == 0
        || m > MAX_ROWS
        || k == 0
        || n == 0
        || k.saturating_mul(n) > MAX_B
        || b.nrows() != k
        || c.dim() != (m, n)
    {
        return false;
    }
    let Some(b) = b.as_slice() else {
        return false;
    };
    let Some(c) = c.as_slice_mut() else {
        return false;
    };
    // `a` is small: a row-major copy, where it is not row-major already,
    // makes its reads plain indexing.
    let a = a.as_slice().map_or_else(
        || std::borrow::Cow::Owned(a.iter().copied().collect()),
        std::borrow::Cow::Borrowed,
    );
    pulp::Arch::new().dispatch(SmallRows {
        a: &a,
        m,
        k,
        b,
        n,
        c,
        accumulate,
    });
    true
}

/// The operands of [`try_small_rows`], all row-major: `a` is `m × k`, `b`
/// `k × n`, `c` `m × n`.
///
/// A `pulp::WithSimd` type rather than a closure, so that the kernel is
/// inlined into pulp's target-feature function (see `conv_direct`).
struct SmallRows<'a> {
    a: &'a [f32],
    m: usize,
    k: usize,
    b: &'a [f32],
    n: usize,
    c: &'a mut [f32],
    accumulate: bool,
}

impl pulp::WithSimd for SmallRows<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, simd: S) {
        match self.m {
            1 => rows::<S, 1>(simd, self),
            2 => rows::<S, 2>(simd, self),
            3 => rows::<S, 3>(simd, self),
            4 => rows::<S, 4>(simd, self),
            5 => rows::<S, 5>(simd, self),
            6 => rows::<S, 6>(simd, self),
            7 => rows::<S, 7>(simd, self),
            _ => rows::<S, 8>(simd, self),
        }
    }
}

/// All of `c`, `R` rows, in column blocks of [`BLOCK`] vectors, then
/// single vectors, then a partial vector.
#[inline(always)]
fn rows<S: pulp::Simd, const R: usize>(simd: S, op: SmallRows<'_>) {
    let lanes = S::F32_LANES;
    let SmallRows {
        a,
        k,
        b,
        n,
        c,
        accumulate,
        ..
    } = op;
    let mut j = 0;
    if R == 1 {
        while j + ONE_ROW_BLOCK * lanes <= n {
            block::<S, R, ONE_ROW_BLOCK>(simd, a, k, b, n, c, j, lanes, accumulate);
            j += ONE_ROW_BLOCK * lanes;
        }
    }
    if R <= 4 {
        while j + BLOCK * lanes <= n {
            block::<S, R, BLOCK>(simd, a, k, b, n, c, j, lanes, accumulate);
            j += BLOCK * lanes;
        }
    } else {
        while j + 2 * lanes <= n {
            block::<S, R, 2>(simd, a, k, b, n, c, j, lanes, accumulate);
            j += 2 * lanes;
        }
    }
    while j + lanes <= n {
        block::<S, R, 1>(simd, a, k, b, n, c, j, lanes, accumulate);
        j += lanes;
    }
    if j < n {
        block::<S, R, 1>(simd, a, k, b, n, c, j, n - j, accumulate);
    }
}

/// Columns `j..j + (V - 1) * lanes + width` of `R` rows of `c`: `V` vectors,
/// the last `width` lanes wide (partial when `width < lanes`, then `V` is
/// 1).
#[inline(always)]
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
fn block<S: pulp::Simd, const R: usize, const V: usize>(
    simd: S,
    a: &[f32],
    k: usize,
    b: &[f32],
    n: usize,
    c: &mut [f32],
    j: usize,
    width: usize,
    accumulate: bool,
) {
    let lanes = S::F32_LANES;
    let span = (V - 1) * lanes + width;
    let load = |x: &[f32], at: usize, v: usize| -> S::f32s {
        let at = at + v * lanes;
        if width == lanes {
            S::as_simd_f32s(&x[at..at + lanes]).0[0]
        } else {
            simd.partial_load_f32s(&x[at..at + width])
        }
    };
    let zero = simd.splat_f32s(0.0);
    let mut acc: [[S::f32s; V]; R] = [[zero; V]; R];
    if accumulate {
        for r in 0..R {
            for v in 0..V {
                acc[r][v] = load(c, r * n + j, v);
            }
        }
    }
    // Index loops over the register arrays: iterating them by value left
    // the loop outside the target-feature code in `conv_direct`.
    for kk in 0..k {
        let row = &b[kk * n + j..kk * n + j + span];
        let mut bs = [zero; V];
        for v in 0..V {
            bs[v] = load(row, 0, v);
        }
        for r in 0..R {
            let s = simd.splat_f32s(a[r * k + kk]);
            for v in 0..V {
                acc[r][v] = simd.mul_add_f32s(s, bs[v], acc[r][v]);
            }
        }
    }
    for r in 0..R {
        let out = &mut c[r * n + j..r * n + j + span];
        for v in 0..V {
            if width == lanes {
                S::as_mut_simd_f32s(&mut out[v * lanes..(v + 1) * lanes]).0[0] = acc[r][v];
            } else {
                simd.partial_store_f32s(&mut out[..width], acc[r][v]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{Array2, s};

    /// The product by its definition, in f64.
    fn reference(a: &Array2<f32>, b: &Array2<f32>, c0: Option<&Array2<f32>>) -> Array2<f64> {
        let (m, k) = a.dim();
        let n = b.ncols();
        Array2::from_shape_fn((m, n), |(i, j)| {
            let start = c0.map_or(0.0, |c| f64::from(c[[i, j]]));
            (0..k).fold(start, |s, t| {
                s + f64::from(a[[i, t]]) * f64::from(b[[t, j]])
            })
        })
    }

    fn matrix(rows: usize, cols: usize, seed: u32) -> Array2<f32> {
        Array2::from_shape_fn((rows, cols), |(i, j)| {
            let x = (i as u32 * 7919 + j as u32 * 104_729 + seed * 31) % 2003;
            x as f32 / 1001.0 - 1.0
        })
    }

    #[test]
    fn matches_the_definition_for_every_row_count_and_ragged_widths() {
        for m in 1..=MAX_ROWS {
            for (k, n) in [
                (1, 1),
                (3, 5),
                (64, 128),
                (17, 33),
                (5, 100),
                (128, 10),
                (9, 257),
            ] {
                let a = matrix(m, k, 1);
                let b = matrix(k, n, 2);
                let c0 = matrix(m, n, 3);
                for accumulate in [false, true] {
                    let mut c = if accumulate {
                        c0.clone()
                    } else {
                        Array2::from_elem((m, n), f32::NAN)
                    };
                    assert!(try_small_rows(
                        a.view(),
                        b.view(),
                        &mut c.view_mut(),
                        accumulate
                    ));
                    let want = reference(&a, &b, accumulate.then_some(&c0));
                    for ((i, j), got) in c.indexed_iter() {
                        let tol = 1e-5 * (k as f64 + 1.0);
                        assert!(
                            (f64::from(*got) - want[[i, j]]).abs() <= tol,
                            "m {m} k {k} n {n} accumulate {accumulate} at ({i}, {j}): {got} vs {}",
                            want[[i, j]]
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn sums_in_the_order_of_k_whatever_the_column_block() {
        // Column j of a wide product equals the same column computed alone
        // (a partial vector), to the bit: no block changes the order.
        let (m, k, n) = (3, 70, 77);
        let a = matrix(m, k, 4);
        let b = matrix(k, n, 5);
        let mut c = Array2::zeros((m, n));
        assert!(try_small_rows(a.view(), b.view(), &mut c.view_mut(), false));
        for j in 0..n {
            let column = b.slice(s![.., j..j + 1]).to_owned();
            let mut one = Array2::zeros((m, 1));
            assert!(try_small_rows(
                a.view(),
                column.view(),
                &mut one.view_mut(),
                false
            ));
            for i in 0..m {
                assert_eq!(one[[i, 0]].to_bits(), c[[i, j]].to_bits(), "({i}, {j})");
            }
        }
    }

    #[test]
    fn nan_and_infinity_propagate() {
        let mut a = matrix(2, 8, 6);
        let b = matrix(8, 20, 7);
        a[[0, 3]] = f32::NAN;
        a[[1, 5]] = f32::INFINITY;
        let mut c = Array2::zeros((2, 20));
        assert!(try_small_rows(a.view(), b.view(), &mut c.view_mut(), false));
        assert!(c.row(0).iter().all(|x| x.is_nan()));
        for (j, x) in c.row(1).iter().enumerate() {
            // inf · w is ±inf, but inf · 0 is NaN.
            if b[[5, j]] == 0.0 {
                assert!(x.is_nan(), "column {j}: {x}");
            } else {
                assert!(x.is_infinite(), "column {j}: {x}");
            }
        }
    }

    #[test]
    fn declines_what_it_does_not_take() {
        let a = matrix(1, MAX_B / 8 + 1, 1);
        let b = matrix(MAX_B / 8 + 1, 8, 2);
        let mut c = Array2::from_elem((1, 8), 7.0_f32);
        assert!(!try_small_rows(
            a.view(),
            b.view(),
            &mut c.view_mut(),
            false
        ));
        let a = matrix(MAX_ROWS + 1, 4, 1);
        let b = matrix(4, 8, 2);
        let mut c = Array2::from_elem((MAX_ROWS + 1, 8), 7.0_f32);
        assert!(!try_small_rows(
            a.view(),
            b.view(),
            &mut c.view_mut(),
            false
        ));
        // A transposed (column-major) b.
        let a = matrix(2, 4, 1);
        let bt = matrix(8, 4, 2);
        let mut c = Array2::from_elem((2, 8), 7.0_f32);
        assert!(!try_small_rows(a.view(), bt.t(), &mut c.view_mut(), false));
        assert!(c.iter().all(|&x| x == 7.0), "nothing written when declined");
        // A strided a is fine: it is copied.
        let wide = matrix(2, 8, 1);
        let a = wide.slice(s![.., ..;2]);
        let b = matrix(4, 8, 2);
        let mut c = Array2::zeros((2, 8));
        assert!(try_small_rows(a, b.view(), &mut c.view_mut(), false));
        let want = reference(&a.to_owned(), &b, None);
        for ((i, j), got) in c.indexed_iter() {
            assert!((f64::from(*got) - want[[i, j]]).abs() < 1e-5);
        }
    }
}
