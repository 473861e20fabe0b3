//! Helpers of the differentiable backwards (`create_graph`): the recorded
//! forms of the array helpers the array backwards use.

use crate::error::Result;
use crate::tensor::Tensor;

/// `grad`, the gradient of a broadcast result, summed back to the shape of
/// the operand that was broadcast (as
/// [`reduce_to_shape`](crate::array::reduce_to_shape), in recorded ops).
pub(crate) fn sum_to(grad: &Tensor, shape: &[usize]) -> Result<Tensor> {
    let mut grad = grad.clone();
    while grad.ndim() > shape.len() {
        grad = grad.try_sum_axis(0, false)?;
    }
    for (axis, &len) in shape.iter().enumerate() {
        if len == 1 && grad.shape()[axis] != 1 {
            grad = grad.try_sum_axis(axis as isize, true)?;
        }
    }
    Ok(grad)
}

/// `grad` broadcast to `shape`, recorded (`zeros + grad`, whose backward
/// sums back to `grad`'s shape).
pub(crate) fn expand(grad: &Tensor, shape: &[usize]) -> Result<Tensor> {
    if grad.shape() == shape {
        return Ok(grad.clone());
    }
    Tensor::zeros(shape).try_add(grad)
}
