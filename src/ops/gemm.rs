//! The matrix-multiply kernel every matmul (forward and backward) goes
//! through, so the GEMM backend is chosen in one place.
//!
//! The backend is the `gemm` crate, chosen by measurement over ndarray's
//! `matrixmultiply` (see BENCHMARKS.md): equal on one core, faster on two,
//! and its thread count is chosen per call, so a matmul inside a parallel
//! evaluation task runs on one thread while a large matmul on the caller's
//! thread uses the pool. Under `cfg(loom)` ndarray's kernel runs instead.
//! A product of at most eight rows by a matrix that fits in L2 (a layer
//! answering one request or a small batch) runs the register-blocked kernel
//! of `gemm_small` instead, which does without the crate's packing.
//!
//! # Unsafe code
//!
//! This is the only module of netcl allowed `unsafe` (the crate root denies
//! it). Its one unsafe function, `kernel`, states its contract under
//! `# Safety`: the output pointer and strides describe an m×n matrix valid
//! for writes, disjoint from the operands; each call site says with a
//! `SAFETY` comment why the contract holds there.

use ndarray::{Array2, ArrayView2, ArrayViewMut2};

use crate::storage::Data;

/// `c = a · b` for 2-D views of any strides (transposed and broadcast views
/// included).
pub(crate) fn gemm_into(a: ArrayView2<'_, f32>, b: ArrayView2<'_, f32>, c: ArrayViewMut2<'_, f32>) {
    gemm_update(a, b, c, false);
}

/// `c += a · b`.
pub(crate) fn gemm_acc_into(
    a: ArrayView2<'_, f32>,
    b: ArrayView2<'_, f32>,
    c: ArrayViewMut2<'_, f32>,
) {
    gemm_update(a, b, c, true);
}

/// `c = a · b`, or `c += a · b` when `accumulate`.
fn gemm_update(
    a: ArrayView2<'_, f32>,
    b: ArrayView2<'_, f32>,
    mut c: ArrayViewMut2<'_, f32>,
    accumulate: bool,
) {
    let (m, k) = a.dim();
    let n = b.ncols();
    assert_eq!(k, b.nrows(), "gemm: inner dimensions differ");
    assert_eq!(c.dim(), (m, n), "gemm: output shape");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c.fill(0.0);
        }
        return;
    }
    #[cfg(loom)]
    ndarray::linalg::general_mat_mul(1.0, &a, &b, if accumulate { 1.0 } else { 0.0 }, &mut c);
    #[cfg(not(loom))]
    {
        if crate::parallel::kernel_threads(m, k, n) == 1
            && super::gemm_small::try_small_rows(a, b, &mut c, accumulate)
        {
            return;
        }
        let (c_rs, c_cs) = (c.strides()[0], c.strides()[1]);
        // SAFETY: `c` is a mutable view of an m×n matrix with these strides
        // (checked above), its elements initialised, alive for the call and
        // not aliasing `a` or `b`; see `kernel`.
        unsafe { kernel(a, b, c.as_mut_ptr(), c_rs, c_cs, accumulate) }
    }
}

/// `a · b` into new row-major tensor values of shape `shape` (`[m, n]`, or
/// any shape of `m·n` elements), written by the kernel straight into the
/// buffer the values live in.
pub(crate) fn gemm_data(a: ArrayView2<'_, f32>, b: ArrayView2<'_, f32>, shape: &[usize]) -> Data {
    let (m, n) = (a.nrows(), b.ncols());
    debug_assert_eq!(m * n, shape.iter().product::<usize>());
    // A few rows go through `gemm_update` (the small-rows kernel), on a
    // zeroed buffer.
    #[cfg(not(loom))]
    if a.ncols() > 0 && m > super::gemm_small::MAX_ROWS && n > 0 {
        assert_eq!(a.ncols(), b.nrows(), "gemm: inner dimensions differ");
        // Not zeroed first, as in `gemm`.
        let mut values = std::sync::Arc::<[f32]>::new_uninit_slice(m * n);
        let out = std::sync::Arc::get_mut(&mut values).expect("a new allocation is unique");
        let n_isize = isize::try_from(n).expect("a row fits in memory");
        // SAFETY: `out` is a fresh allocation of m·n `MaybeUninit<f32>`
        // (the layout of `f32`), uniquely borrowed for the call and not
        // aliasing `a` or `b`; element (i, j) is at `i * n + j` (row
        // stride n, column stride 1). With `accumulate` false and k > 0
        // the kernel writes every one of the m·n elements and reads none,
        // so all are initialised when `assume_init` runs.
        let values = unsafe {
            kernel(a, b, out.as_mut_ptr().cast::<f32>(), n_isize, 1, false);
            values.assume_init()
        };
        return Data::from_arc(shape, values);
    }
    Data::build(shape, |out| {
        let out = out
            .into_shape_with_order((m, n))
            .expect("a new row-major buffer takes any shape of its size");
        gemm_into(a, b, out);
    })
}

/// `a · b` into a new row-major matrix.
pub(crate) fn gemm(a: ArrayView2<'_, f32>, b: ArrayView2<'_, f32>) -> Array2<f32> {
    let (m, n) = (a.nrows(), b.ncols());
    #[cfg(not(loom))]
    if a.ncols() > 0 && m > super::gemm_small::MAX_ROWS && n > 0 {
        assert_eq!(a.ncols(), b.nrows(), "gemm: inner dimensions differ");
        // The output is written without being zeroed first: on large
        // matrices the zeroing pass costs 5-7% of a one-thread product.
        let mut c = Array2::<f32>::uninit((m, n));
        let (c_rs, c_cs) = (c.strides()[0], c.strides()[1]);
        // SAFETY: `c` owns an m×n allocation with these strides, not
        // aliasing `a` or `b`; `MaybeUninit<f32>` has the layout of `f32`.
        // With `accumulate` false and k > 0 the kernel only writes the
        // output and writes every one of its m×n elements, so all are
        // initialised when `assume_init` runs.
        unsafe {
            kernel(a, b, c.as_mut_ptr().cast::<f32>(), c_rs, c_cs, false);
            return c.assume_init();
        }
    }
    let mut c = Array2::zeros((m, n));
    gemm_into(a, b, c.view_mut());
    c
}

/// The `gemm` crate's kernel on ndarray operands and a raw output.
///
/// # Safety
///
/// `c` must point to an m×n matrix (m = `a.nrows()`, n = `b.ncols()`, with
/// `a.ncols() == b.nrows()`) whose element (i, j) is at
/// `c + i * c_rs + j * c_cs`, valid for writes (and for reads of
/// initialised values when `accumulate`), distinct for distinct (i, j), and
/// not overlapping `a` or `b` for the duration of the call.
#[cfg(not(loom))]
unsafe fn kernel(
    a: ArrayView2<'_, f32>,
    b: ArrayView2<'_, f32>,
    c: *mut f32,
    c_rs: isize,
    c_cs: isize,
    accumulate: bool,
) {
    let (m, k) = a.dim();
    let n = b.ncols();
    let threads = crate::parallel::kernel_threads(m, k, n);
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: `gemm` reads an m×k matrix at `a` and a k×n matrix at `b`,
    // each element at `ptr + row * row_stride + col * col_stride`: the
    // pointers and strides come from ndarray views of exactly those shapes,
    // alive for this call, so every address read is inside them (zero
    // strides of broadcast views included). It writes the m×n output at `c`
    // as the caller guarantees is valid. `alpha` = 1 keeps the output's old
    // values when `accumulate` (read_dst), `beta` = 1 scales the product.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c,
            c_cs,
            c_rs,
            accumulate,
            a.as_ptr(),
            a.strides()[1],
            a.strides()[0],
            b.as_ptr(),
            b.strides()[1],
            b.strides()[0],
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{Array2, s};

    /// The plain triple loop, in f64.
    fn reference(a: ArrayView2<'_, f32>, b: ArrayView2<'_, f32>) -> Array2<f32> {
        Array2::from_shape_fn((a.nrows(), b.ncols()), |(i, j)| {
            (0..a.ncols())
                .map(|p| f64::from(a[[i, p]]) * f64::from(b[[p, j]]))
                .sum::<f64>() as f32
        })
    }

    fn filled(rows: usize, cols: usize, seed: f32) -> Array2<f32> {
        Array2::from_shape_fn((rows, cols), |(i, j)| ((i * 7 + j * 3) as f32 * seed).sin())
    }

    fn assert_close(got: &Array2<f32>, want: &Array2<f32>) {
        assert_eq!(got.dim(), want.dim());
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() <= 1e-4 * (1.0 + w.abs()), "{g} vs {w}");
        }
    }

    #[test]
    fn matches_the_triple_loop_for_every_layout() {
        for &(m, k, n) in &[
            (1, 1, 1),
            (3, 5, 2),
            (17, 33, 9),
            (64, 128, 40),
            (200, 300, 150),
        ] {
            let a = filled(m, k, 0.37);
            let b = filled(k, n, 0.11);
            let want = reference(a.view(), b.view());
            assert_close(&gemm(a.view(), b.view()), &want);
            // Transposed (column-major) operands.
            let at = a.t().to_owned();
            let bt = b.t().to_owned();
            assert_close(&gemm(at.t(), bt.t()), &want);
            // A strided output.
            let mut big = Array2::zeros((m, 2 * n));
            gemm_into(a.view(), b.view(), big.slice_mut(s![.., ..;2]));
            assert_close(&big.slice(s![.., ..;2]).to_owned(), &want);
        }
    }

    #[test]
    fn broadcast_operands_with_zero_strides() {
        let row = filled(1, 6, 0.5);
        let a = row.broadcast((4, 6)).unwrap();
        let b = filled(6, 3, 0.2);
        assert_close(&gemm(a, b.view()), &reference(a, b.view()));
    }

    #[test]
    fn accumulating_adds_the_product_to_the_output() {
        let a = filled(5, 7, 0.3);
        let b = filled(7, 4, 0.7);
        let start = filled(5, 4, 0.9);
        let mut c = start.clone();
        gemm_acc_into(a.view(), b.view(), c.view_mut());
        assert_close(&c, &(&start + &reference(a.view(), b.view())));
    }

    #[test]
    fn empty_inner_dimension_gives_zeros() {
        let a = Array2::<f32>::zeros((3, 0));
        let b = Array2::<f32>::zeros((0, 2));
        let mut c = Array2::from_elem((3, 2), 9.0);
        gemm_into(a.view(), b.view(), c.view_mut());
        assert!(c.iter().all(|&v| v == 0.0));
    }
}
