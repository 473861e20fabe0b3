//! Helpers of the differentiable backwards (`create_graph`): the recorded
//! forms of the array helpers the array backwards use.

use ndarray::{Dimension, IxDyn};

use crate::array::{reduce_to_shape, same_shape};
use crate::autograd::function::{GraphGrads, InputGrads, record, with_graph};
use crate::error::Result;
use crate::tensor::{Data, Tensor};

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

/// `grad` broadcast to `shape` (which it broadcasts to: a reduction's
/// input shape), recorded as the op `spread` (the gradient of a reduction;
/// distinct from the public `expand`), whose backward sums back to
/// `grad`'s shape. One pass writing the result (a one-element `grad` is a
/// fill).
pub(crate) fn expand(grad: &Tensor, shape: &[usize]) -> Result<Tensor> {
    if same_shape(grad.shape(), shape) {
        return Ok(grad.clone());
    }
    let values = grad.read();
    let out = if values.len() == 1 {
        Data::full(shape, values.to_vec()[0])
    } else {
        let view = values.view();
        let view = view
            .broadcast(IxDyn(shape))
            .expect("a reduced gradient broadcasts to the reduction's input");
        Data::from_view(view)
    };
    let input = grad.dim();
    record("spread", &[grad], out, |_| {
        with_graph(
            input,
            |input: &IxDyn, grad: Data, grads: &mut InputGrads<'_>| {
                let summed = if same_shape(grad.shape(), input.slice()) {
                    grad
                } else {
                    Data::from_array(reduce_to_shape(grad.into_array(), input.slice()))
                };
                grads.put(0, summed);
            },
            |input: &IxDyn, grad: &Tensor, grads: &mut GraphGrads<'_>| {
                grads.set(0, sum_to(grad, input.slice())?);
                Ok(())
            },
        )
    })
}

/// Flat positions: element `p` (row-major) of a selection's result was
/// read from element `offsets[p]` (row-major) of its input.
pub(crate) type Offsets = std::sync::Arc<[usize]>;

/// The values of `x` (of any shape) at `offsets`, as a tensor of `shape`
/// (`offsets.len()` elements), recorded as `take`: the differentiable
/// backward of a scatter-add ([`scatter_add`]), whose backward is a
/// scatter-add again. The gradient form of `index_select`, `gather` and
/// `embedding`.
pub(crate) fn take(x: &Tensor, offsets: &Offsets, shape: &[usize]) -> Result<Tensor> {
    let values = x.read();
    let xs = values.to_vec();
    drop(values);
    let out = Data::collect(shape, offsets.iter().map(|&at| xs[at]));
    let input = x.shape().to_vec();
    record("take", &[x], out, |_| {
        with_graph(
            (offsets.clone(), input),
            |(offsets, input): &(Offsets, Vec<usize>), grad: Data, grads: &mut InputGrads<'_>| {
                grads.put(0, scatter_values(&grad, offsets, input));
            },
            |(offsets, input): &(Offsets, Vec<usize>),
             grad: &Tensor,
             grads: &mut GraphGrads<'_>| {
                grads.set(0, scatter_add(grad, offsets, input)?);
                Ok(())
            },
        )
    })
}

/// Zeros of `shape` with each value of `grad` (row-major) added at its
/// position in `offsets`.
fn scatter_values(grad: &Data, offsets: &Offsets, shape: &[usize]) -> Data {
    let mut out = vec![0.0; shape.iter().product()];
    for (&at, g) in offsets.iter().zip(grad.to_vec()) {
        out[at] += g;
    }
    Data::from_vec(shape, out)
}

/// Zeros of `shape` with each value of `grad` (row-major) added at its
/// position in `offsets`, recorded as `scatter_add`, whose backward is
/// [`take`]: the differentiable backward of a selection.
pub(crate) fn scatter_add(grad: &Tensor, offsets: &Offsets, shape: &[usize]) -> Result<Tensor> {
    let out = scatter_values(&grad.read().into_data(), offsets, shape);
    let from = grad.shape().to_vec();
    record("scatter_add", &[grad], out, |_| {
        with_graph(
            (offsets.clone(), from),
            |(offsets, from): &(Offsets, Vec<usize>), grad: Data, grads: &mut InputGrads<'_>| {
                let g = grad.to_vec();
                grads.put(0, Data::collect(from, offsets.iter().map(|&at| g[at])));
            },
            |(offsets, from): &(Offsets, Vec<usize>), grad: &Tensor, grads: &mut GraphGrads<'_>| {
                grads.set(0, take(grad, offsets, from)?);
                Ok(())
            },
        )
    })
}
