//! `autograd::grad`: gradients returned rather than accumulated.

use crate::autograd::engine::{self, Root};
use crate::error::Result;
use crate::tensor::Tensor;

/// The gradients of the sum of `outputs` with respect to each of `inputs`,
/// returned instead of accumulated: no tensor's [`grad`](Tensor::grad) is
/// touched. Each output must have one element. An input the outputs do not
/// depend on gets a gradient of zeros; an input given more than once gets
/// its gradient at each position. The graph is released afterwards.
///
/// # Errors
///
/// [`Error::NotScalar`](crate::Error::NotScalar) if an output has more than
/// one element, and the errors of [`Tensor::try_backward`].
///
/// # Examples
///
/// ```
/// use netcl::{Tensor, autograd};
///
/// let x = Tensor::from_vec(vec![1.0, 2.0], &[2])?.requires_grad_(true);
/// let y = Tensor::from_vec(vec![3.0, 4.0], &[2])?.requires_grad_(true);
/// let out = (&x * &y).sum();
/// let grads = autograd::grad(&[&out], &[&x, &y])?;
/// assert_eq!(grads[0].to_vec(), vec![3.0, 4.0]); // d/dx = y
/// assert_eq!(grads[1].to_vec(), vec![1.0, 2.0]); // d/dy = x
/// assert!(x.grad().is_none());
/// # Ok::<(), netcl::Error>(())
/// ```
pub fn grad(outputs: &[&Tensor], inputs: &[&Tensor]) -> Result<Vec<Tensor>> {
    run(outputs, inputs, false)
}

/// Like [`grad`], but keeps the graph so it can be walked again.
///
/// # Errors
///
/// As [`grad`].
pub fn grad_retain_graph(outputs: &[&Tensor], inputs: &[&Tensor]) -> Result<Vec<Tensor>> {
    run(outputs, inputs, true)
}

fn run(outputs: &[&Tensor], inputs: &[&Tensor], retain: bool) -> Result<Vec<Tensor>> {
    let grads = reached(outputs, inputs, retain)?;
    Ok(grads
        .into_iter()
        .zip(inputs)
        .map(|(grad, input)| {
            Tensor::from_array(grad.unwrap_or_else(|| ndarray::ArrayD::zeros(input.dim())))
        })
        .collect())
}

/// The gradients of the sum of `outputs` with respect to each of `inputs`,
/// `None` for an input that no gradient reached (where [`grad`] gives
/// zeros, and [`Tensor::backward`] leaves `.grad()` untouched).
pub(crate) fn reached(
    outputs: &[&Tensor],
    inputs: &[&Tensor],
    retain: bool,
) -> Result<Vec<Option<ndarray::ArrayD<f32>>>> {
    let roots = outputs
        .iter()
        .map(|output| {
            Ok(Root {
                tensor: output,
                grad: output.scalar_seed("grad")?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    engine::grad(roots, inputs, retain)
}
