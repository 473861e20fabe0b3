//! The engine's public face: [`Tensor::backward`] and its variants, which
//! accumulate gradients into the leaves, and [`grad`], which returns them.

use crate::autograd::engine::{self, Root};
use crate::error::{Error, Result, or_panic};
use crate::tensor::{Data, Tensor};

/// Backward passes.
impl Tensor {
    /// Computes the gradient of this one-element tensor with respect to every
    /// leaf it depends on, accumulating into their [`grad`](Tensor::grad).
    ///
    /// The graph's saved tensors are released: a second backward through it
    /// is an error (see
    /// [`backward_retain_graph`](Tensor::backward_retain_graph)).
    ///
    /// # Panics
    ///
    /// As [`try_backward`](Tensor::try_backward).
    #[track_caller]
    pub fn backward(&self) {
        or_panic(self.try_backward())
    }

    /// Computes the gradient of this one-element tensor with respect to every
    /// leaf it depends on, accumulating into their [`grad`](Tensor::grad).
    ///
    /// # Errors
    ///
    /// - [`Error::NotScalar`] if the tensor has more than one element (use
    ///   [`try_backward_from`](Tensor::try_backward_from));
    /// - [`Error::NoGraph`] if it does not require grad;
    /// - [`Error::GraphReleased`] if the graph was released by an earlier
    ///   backward;
    /// - [`Error::Anomaly`] if anomaly detection is on and a gradient is
    ///   not finite (see [`detect_anomaly`](crate::autograd::detect_anomaly)).
    ///
    /// On error no leaf's gradient has changed.
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::{Error, Tensor};
    ///
    /// let x = Tensor::ones(&[2]).requires_grad_(true);
    /// let y = x.exp();
    /// assert!(matches!(y.try_backward(), Err(Error::NotScalar { .. })));
    /// let loss = y.sum();
    /// loss.try_backward()?;
    /// assert!(matches!(loss.try_backward(), Err(Error::GraphReleased { .. })));
    /// # Ok::<(), netcl::Error>(())
    /// ```
    pub fn try_backward(&self) -> Result<()> {
        self.run_backward("backward", None, false)
    }

    /// Like [`backward`](Tensor::backward), but keeps the graph's saved
    /// tensors so that it can be walked again.
    ///
    /// # Panics
    ///
    /// As [`try_backward_retain_graph`](Tensor::try_backward_retain_graph).
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::Tensor;
    ///
    /// let x = Tensor::ones(&[2]).requires_grad_(true);
    /// let loss = (&x * 3.0).sum();
    /// loss.backward_retain_graph();
    /// loss.backward();
    /// assert_eq!(x.grad().unwrap().to_vec(), vec![6.0, 6.0]);
    /// ```
    #[track_caller]
    pub fn backward_retain_graph(&self) {
        or_panic(self.try_backward_retain_graph())
    }

    /// Like [`try_backward`](Tensor::try_backward), but keeps the graph's
    /// saved tensors so that it can be walked again.
    ///
    /// # Errors
    ///
    /// As [`try_backward`](Tensor::try_backward).
    pub fn try_backward_retain_graph(&self) -> Result<()> {
        self.run_backward("backward", None, true)
    }

    /// Backward from a tensor of any shape, given `grad`, the gradient of
    /// the loss with respect to it (of this tensor's shape). The graph is
    /// released afterwards.
    ///
    /// # Panics
    ///
    /// As [`try_backward_from`](Tensor::try_backward_from).
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::Tensor;
    ///
    /// let x = Tensor::from_vec(vec![1.0, 2.0], &[2])?.requires_grad_(true);
    /// let y = &x * &x;
    /// y.backward_from(&Tensor::from_vec(vec![1.0, 0.5], &[2])?);
    /// // dy_i/dx_i = 2 x_i, weighted by the incoming gradient.
    /// assert_eq!(x.grad().unwrap().to_vec(), vec![2.0, 2.0]);
    /// # Ok::<(), netcl::Error>(())
    /// ```
    #[track_caller]
    pub fn backward_from(&self, grad: &Tensor) {
        or_panic(self.try_backward_from(grad))
    }

    /// Backward from a tensor of any shape, given `grad`, the gradient of
    /// the loss with respect to it. The graph is released afterwards.
    ///
    /// # Errors
    ///
    /// [`Error::ShapeMismatch`] if `grad`'s shape differs from this tensor's,
    /// and the errors of [`try_backward`](Tensor::try_backward).
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::{Error, Tensor};
    ///
    /// let y = Tensor::ones(&[2]).requires_grad_(true).exp();
    /// let err = y.try_backward_from(&Tensor::ones(&[3])).unwrap_err();
    /// assert!(matches!(err, Error::ShapeMismatch { op: "backward_from", .. }));
    /// ```
    pub fn try_backward_from(&self, grad: &Tensor) -> Result<()> {
        self.run_backward("backward_from", Some(grad), false)
    }

    /// Like [`backward_from`](Tensor::backward_from), but keeps the graph's
    /// saved tensors so that it can be walked again.
    ///
    /// # Panics
    ///
    /// As [`try_backward_from_retain_graph`](Tensor::try_backward_from_retain_graph).
    #[track_caller]
    pub fn backward_from_retain_graph(&self, grad: &Tensor) {
        or_panic(self.try_backward_from_retain_graph(grad))
    }

    /// Like [`try_backward_from`](Tensor::try_backward_from), but keeps the
    /// graph's saved tensors so that it can be walked again.
    ///
    /// # Errors
    ///
    /// As [`try_backward_from`](Tensor::try_backward_from).
    pub fn try_backward_from_retain_graph(&self, grad: &Tensor) -> Result<()> {
        self.run_backward("backward_from", Some(grad), true)
    }

    /// The old name of [`backward_from`](Tensor::backward_from).
    ///
    /// # Panics
    ///
    /// As [`try_backward_from`](Tensor::try_backward_from).
    #[deprecated(
        since = "0.2.0",
        note = "use `backward_from` (or `backward_from_retain_graph`), whose `try_` twin takes the same parameters"
    )]
    #[track_caller]
    pub fn backward_with(&self, grad: &Tensor) {
        or_panic(self.run_backward("backward_with", Some(grad), false))
    }

    /// Backward from a tensor of any shape, given the gradient of the loss
    /// with respect to it; `retain_graph` keeps the graph for another pass.
    ///
    /// # Errors
    ///
    /// As [`try_backward_from`](Tensor::try_backward_from).
    #[deprecated(
        since = "0.2.0",
        note = "use `try_backward_from(grad)`, or `try_backward_from_retain_graph(grad)` to keep the graph"
    )]
    pub fn try_backward_with(&self, grad: &Tensor, retain_graph: bool) -> Result<()> {
        self.run_backward("backward_with", Some(grad), retain_graph)
    }

    /// Every backward variant: from `grad`, or from the gradient 1 of a
    /// one-element tensor.
    fn run_backward(&self, op: &'static str, grad: Option<&Tensor>, retain: bool) -> Result<()> {
        let seed = match grad {
            None => self.scalar_seed(op)?,
            Some(grad) if grad.shape() != self.shape() => {
                return Err(Error::ShapeMismatch {
                    op,
                    lhs: self.shape().to_vec(),
                    rhs: grad.shape().to_vec(),
                });
            }
            Some(grad) => grad.read().into_data(),
        };
        engine::backward(
            vec![Root {
                tensor: self,
                grad: seed,
            }],
            retain,
        )
    }

    /// The gradient `1` that starts a backward pass from this tensor, which
    /// must have one element.
    pub(crate) fn scalar_seed(&self, op: &'static str) -> Result<Data> {
        if self.numel() != 1 {
            return Err(Error::NotScalar {
                op,
                shape: self.shape().to_vec(),
            });
        }
        Ok(Data::full(self.shape(), 1.0))
    }
}

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
            Tensor::from_data(grad.unwrap_or_else(|| Data::full(input.shape(), 0.0)))
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
) -> Result<Vec<Option<Data>>> {
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
