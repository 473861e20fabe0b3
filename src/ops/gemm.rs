//! The matrix-multiply kernel every matmul (forward and backward) goes
//! through, so the GEMM backend is chosen in one place.

use ndarray::{Array2, ArrayView2, ArrayViewMut2};

/// `c = a · b` for 2-D views of any strides (transposed views included).
pub(crate) fn gemm_into(
    a: ArrayView2<'_, f32>,
    b: ArrayView2<'_, f32>,
    mut c: ArrayViewMut2<'_, f32>,
) {
    debug_assert_eq!(a.ncols(), b.nrows());
    debug_assert_eq!((c.nrows(), c.ncols()), (a.nrows(), b.ncols()));
    ndarray::linalg::general_mat_mul(1.0, &a, &b, 0.0, &mut c);
}

/// `a · b` into a new row-major matrix.
pub(crate) fn gemm(a: ArrayView2<'_, f32>, b: ArrayView2<'_, f32>) -> Array2<f32> {
    let mut c = Array2::zeros((a.nrows(), b.ncols()));
    gemm_into(a, b, c.view_mut());
    c
}
