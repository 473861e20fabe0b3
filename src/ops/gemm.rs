//! The matrix-multiply kernel every matmul (forward and backward) goes
//! through, so the GEMM backend is chosen in one place.
//!
//! The backend is the `gemm` crate, chosen by measurement over ndarray's
//! `matrixmultiply` (see BENCHMARKS.md): equal on one core, faster on two,
//! and its thread count is chosen per call, so a matmul inside a parallel
//! evaluation task runs on one thread while a large matmul on the caller's
//! thread uses the pool. Under `cfg(loom)` ndarray's kernel runs instead.

use ndarray::{Array2, ArrayView2, ArrayViewMut2};

/// `c = a · b` for 2-D views of any strides (transposed and broadcast views
/// included).
pub(crate) fn gemm_into(
    a: ArrayView2<'_, f32>,
    b: ArrayView2<'_, f32>,
    mut c: ArrayViewMut2<'_, f32>,
) {
    let (m, k) = a.dim();
    let n = b.ncols();
    assert_eq!(k, b.nrows(), "gemm: inner dimensions differ");
    assert_eq!(c.dim(), (m, n), "gemm: output shape");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        c.fill(0.0);
        return;
    }
    #[cfg(loom)]
    ndarray::linalg::general_mat_mul(1.0, &a, &b, 0.0, &mut c);
    #[cfg(not(loom))]
    {
        let threads = crate::parallel::kernel_threads(m * n * k);
        let parallelism = if threads > 1 {
            gemm::Parallelism::Rayon(threads)
        } else {
            gemm::Parallelism::None
        };
        let (a_rs, a_cs) = (a.strides()[0], a.strides()[1]);
        let (b_rs, b_cs) = (b.strides()[0], b.strides()[1]);
        let (c_rs, c_cs) = (c.strides()[0], c.strides()[1]);
        // SAFETY: `gemm` reads an m×k matrix at `a` and a k×n matrix at `b`
        // and writes an m×n matrix at `c`, each element at
        // `ptr + row * row_stride + col * col_stride`. The pointers and
        // strides come from ndarray views of exactly those shapes (checked
        // above), so every such address is inside the views' memory; the
        // views' lifetimes cover this call. `c` is a mutable view, so it
        // cannot alias `a` or `b`, and ndarray never gives a mutable view
        // overlapping strides. With `read_dst` false the output is only
        // written (`alpha` is ignored), `beta` = 1 scales the product.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                c.as_mut_ptr(),
                c_cs,
                c_rs,
                false,
                a.as_ptr(),
                a_cs,
                a_rs,
                b.as_ptr(),
                b_cs,
                b_rs,
                0.0,
                1.0,
                false,
                false,
                false,
                parallelism,
            );
        }
    }
}

/// `a · b` into a new row-major matrix.
pub(crate) fn gemm(a: ArrayView2<'_, f32>, b: ArrayView2<'_, f32>) -> Array2<f32> {
    let mut c = Array2::zeros((a.nrows(), b.ncols()));
    gemm_into(a, b, c.view_mut());
    c
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
    fn empty_inner_dimension_gives_zeros() {
        let a = Array2::<f32>::zeros((3, 0));
        let b = Array2::<f32>::zeros((0, 2));
        let mut c = Array2::from_elem((3, 2), 9.0);
        gemm_into(a.view(), b.view(), c.view_mut());
        assert!(c.iter().all(|&v| v == 0.0));
    }
}
