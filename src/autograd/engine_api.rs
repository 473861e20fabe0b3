//! The engine's public face: [`Tensor::backward`] and its variants, which
//! accumulate gradients into the leaves, and [`grad`], which returns them.

use crate::autograd::engine::{self, GraphRoot, Root};
use crate::autograd::mode::is_grad_enabled;
use crate::error::{Error, Result, or_panic};
use crate::tensor::{Data, Tensor};

/// The options of a backward pass, for [`Tensor::backward_with_options`]
/// and [`grad_with`], built from [`BackwardOptions::new`] (or `default()`)
/// with its builder methods; new options may be added.
///
/// | option | default | |
/// |---|---|---|
/// | [`retain_graph`](BackwardOptions::retain_graph) | the value of `create_graph` | keep the graph's saved values so it can be walked again |
/// | [`create_graph`](BackwardOptions::create_graph) | `false` | record the gradients' own graph, for higher-order derivatives |
/// | [`grad_output`](BackwardOptions::grad_output) | `1` for each one-element output | the gradient the pass starts from |
/// | [`allow_unused`](BackwardOptions::allow_unused) | `false` | [`grad_with`] gives `None` (not zeros) for an input the outputs do not depend on |
///
/// # Examples
///
/// A Hessian-vector product: the gradient `g = ∇f(x)` recorded with
/// `create_graph`, then the gradient of `g · v`.
///
/// ```
/// use netcl::autograd::{self, BackwardOptions};
/// use netcl::Tensor;
///
/// // f(x) = Σ x³, so ∇f = 3x² and the Hessian is diag(6x).
/// let x = Tensor::from_vec(vec![1.0, 2.0, 3.0], &[3])?.requires_grad_(true);
/// let f = x.powf(3.0).sum();
/// let options = BackwardOptions::new().create_graph(true);
/// let g = autograd::grad_with(&[&f], &[&x], &options)?[0].clone().unwrap();
/// assert_eq!(g.to_vec(), vec![3.0, 12.0, 27.0]);
///
/// let v = Tensor::from_vec(vec![1.0, 0.5, -1.0], &[3])?;
/// let hv = autograd::grad(&[&(&g * &v).sum()], &[&x])?;
/// assert_eq!(hv[0].to_vec(), vec![6.0, 6.0, -18.0]); // 6x · v
/// # Ok::<(), netcl::Error>(())
/// ```
#[derive(Clone, Debug, Default)]
pub struct BackwardOptions {
    retain_graph: Option<bool>,
    create_graph: bool,
    grad_outputs: Option<Vec<Tensor>>,
    allow_unused: bool,
}

impl BackwardOptions {
    /// The defaults: release the graph, no graph for the gradients, start
    /// from `1`, zeros for unused inputs.
    pub fn new() -> BackwardOptions {
        BackwardOptions::default()
    }

    /// Keeps the graph's saved values after the pass, so that it can be
    /// walked again. Defaults to the value of
    /// [`create_graph`](BackwardOptions::create_graph).
    pub fn retain_graph(mut self, retain: bool) -> BackwardOptions {
        self.retain_graph = Some(retain);
        self
    }

    /// Records the backward pass itself: the gradients are tensors with a
    /// graph (on the graph's tape, where this thread's grad mode is on), so
    /// they can be differentiated again, to any order. Every built-in op
    /// has a differentiable backward; a custom op needs
    /// [`apply_op_differentiable`](crate::autograd::apply_op_differentiable),
    /// else the pass fails with
    /// [`Error::NotDifferentiable`](crate::Error::NotDifferentiable).
    ///
    /// Under [`no_grad`](crate::autograd::no_grad) nothing records, so the
    /// gradients are plain tensors, as without this option.
    pub fn create_graph(mut self, create: bool) -> BackwardOptions {
        self.create_graph = create;
        self
    }

    /// The gradient of the loss with respect to the (single) output, of
    /// its shape: the pass starts from it instead of `1`, so the output
    /// may have any shape. With `create_graph` it may itself have a graph.
    pub fn grad_output(self, grad: Tensor) -> BackwardOptions {
        self.grad_outputs(vec![grad])
    }

    /// The gradients the pass starts from, one per output of [`grad_with`],
    /// each of its output's shape.
    pub fn grad_outputs(mut self, grads: Vec<Tensor>) -> BackwardOptions {
        self.grad_outputs = Some(grads);
        self
    }

    /// With `true`, [`grad_with`] gives `None` for an input the outputs do
    /// not depend on, instead of a tensor of zeros.
    pub fn allow_unused(mut self, allow: bool) -> BackwardOptions {
        self.allow_unused = allow;
        self
    }

    /// Whether the graph is kept after the pass.
    pub fn retains_graph(&self) -> bool {
        self.retain_graph.unwrap_or(self.create_graph)
    }

    /// Whether the pass records the gradients' graph.
    pub fn creates_graph(&self) -> bool {
        self.create_graph
    }

    /// The seed gradients of the `outputs`: the given ones (checked against
    /// the outputs' shapes), or `1` for each one-element output.
    fn seeds(&self, op: &'static str, outputs: &[&Tensor]) -> Result<Vec<Tensor>> {
        match &self.grad_outputs {
            None => outputs
                .iter()
                .map(|output| Ok(Tensor::from_data(output.scalar_seed(op)?)))
                .collect(),
            Some(grads) if grads.len() != outputs.len() => Err(Error::InvalidArgument {
                op,
                message: format!(
                    "{} gradients given for {} outputs",
                    grads.len(),
                    outputs.len()
                ),
            }),
            Some(grads) => {
                for (grad, output) in grads.iter().zip(outputs) {
                    if grad.shape() != output.shape() {
                        return Err(Error::ShapeMismatch {
                            op,
                            lhs: output.shape().to_vec(),
                            rhs: grad.shape().to_vec(),
                        });
                    }
                }
                Ok(grads.clone())
            }
        }
    }
}

/// Backward passes.
impl Tensor {
    /// Computes the gradient of this one-element tensor with respect to every
    /// leaf it depends on, accumulating into their [`grad`](Tensor::grad).
    ///
    /// The graph's saved tensors are released: a second backward through it
    /// is an error (see [`retain_graph`](crate::autograd::BackwardOptions::retain_graph)
    /// in [`backward_with_options`](Tensor::backward_with_options)).
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
    /// - [`Error::NotScalar`] if the tensor has more than one element (give
    ///   its gradient with [`grad_output`](crate::autograd::BackwardOptions::grad_output));
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
    #[deprecated(
        since = "0.2.0",
        note = "use `backward_with_options(&BackwardOptions::new().retain_graph(true))`"
    )]
    #[track_caller]
    pub fn backward_retain_graph(&self) {
        or_panic(self.run_backward("backward", None, true))
    }

    /// Like [`try_backward`](Tensor::try_backward), but keeps the graph's
    /// saved tensors so that it can be walked again.
    ///
    /// # Errors
    ///
    /// As [`try_backward`](Tensor::try_backward).
    #[deprecated(
        since = "0.2.0",
        note = "use `try_backward_with_options(&BackwardOptions::new().retain_graph(true))`"
    )]
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
    #[deprecated(
        since = "0.2.0",
        note = "use `backward_with_options(&BackwardOptions::new().grad_output(grad.clone()))`"
    )]
    #[track_caller]
    pub fn backward_from(&self, grad: &Tensor) {
        or_panic(self.run_backward("backward_from", Some(grad), false))
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
    #[deprecated(
        since = "0.2.0",
        note = "use `try_backward_with_options(&BackwardOptions::new().grad_output(grad.clone()))`"
    )]
    pub fn try_backward_from(&self, grad: &Tensor) -> Result<()> {
        self.run_backward("backward_from", Some(grad), false)
    }

    /// Like [`backward_from`](Tensor::backward_from), but keeps the graph's
    /// saved tensors so that it can be walked again.
    ///
    /// # Panics
    ///
    /// As [`try_backward_from_retain_graph`](Tensor::try_backward_from_retain_graph).
    #[deprecated(
        since = "0.2.0",
        note = "use `backward_with_options(&BackwardOptions::new().grad_output(grad.clone()).retain_graph(true))`"
    )]
    #[track_caller]
    pub fn backward_from_retain_graph(&self, grad: &Tensor) {
        or_panic(self.run_backward("backward_from", Some(grad), true))
    }

    /// Like [`try_backward_from`](Tensor::try_backward_from), but keeps the
    /// graph's saved tensors so that it can be walked again.
    ///
    /// # Errors
    ///
    /// As [`try_backward_from`](Tensor::try_backward_from).
    #[deprecated(
        since = "0.2.0",
        note = "use `try_backward_with_options(&BackwardOptions::new().grad_output(grad.clone()).retain_graph(true))`"
    )]
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
        note = "use `backward_with_options(&BackwardOptions::new().grad_output(grad.clone()))`"
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
        note = "use `try_backward_with_options(&BackwardOptions::new().grad_output(grad.clone()).retain_graph(retain_graph))`"
    )]
    pub fn try_backward_with(&self, grad: &Tensor, retain_graph: bool) -> Result<()> {
        self.run_backward("backward_with", Some(grad), retain_graph)
    }

    /// Backward with options: from the gradient
    /// [`grad_output`](BackwardOptions::grad_output) (any shape) or `1` (a
    /// one-element tensor), keeping the graph with
    /// [`retain_graph`](BackwardOptions::retain_graph).
    ///
    /// # Panics
    ///
    /// As [`try_backward_with_options`](Tensor::try_backward_with_options).
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::Tensor;
    /// use netcl::autograd::BackwardOptions;
    ///
    /// let x = Tensor::from_vec(vec![1.0, 2.0], &[2])?.requires_grad_(true);
    /// let y = &x * &x;
    /// let seed = Tensor::from_vec(vec![1.0, 0.5], &[2])?;
    /// let options = BackwardOptions::new().grad_output(seed).retain_graph(true);
    /// y.backward_with_options(&options);
    /// // dy_i/dx_i = 2 x_i, weighted by the incoming gradient.
    /// assert_eq!(x.grad().unwrap().to_vec(), vec![2.0, 2.0]);
    /// y.backward_with_options(&options); // the graph was kept
    /// assert_eq!(x.grad().unwrap().to_vec(), vec![4.0, 4.0]);
    /// # Ok::<(), netcl::Error>(())
    /// ```
    #[track_caller]
    pub fn backward_with_options(&self, options: &BackwardOptions) {
        or_panic(self.try_backward_with_options(options))
    }

    /// Backward with options, accumulating into the leaves'
    /// [`grad`](Tensor::grad): see
    /// [`backward_with_options`](Tensor::backward_with_options).
    ///
    /// A leaf's `.grad()` holds values, not a graph: for gradients that can
    /// be differentiated again, use [`grad_with`] with
    /// [`create_graph`](BackwardOptions::create_graph).
    ///
    /// # Errors
    ///
    /// - [`Error::InvalidArgument`] with `create_graph` (while grad mode is
    ///   on): use [`grad_with`];
    /// - [`Error::ShapeMismatch`] if the given gradient's shape differs
    ///   from this tensor's, [`Error::InvalidArgument`] if more than one
    ///   is given;
    /// - the errors of [`try_backward`](Tensor::try_backward).
    pub fn try_backward_with_options(&self, options: &BackwardOptions) -> Result<()> {
        const OP: &str = "backward";
        if options.create_graph && is_grad_enabled() {
            return Err(Error::InvalidArgument {
                op: OP,
                message: "create_graph: a leaf's .grad() holds values, not a graph; take gradients that can be differentiated again from autograd::grad_with".into(),
            });
        }
        let seed = options.seeds(OP, &[self])?.pop().expect("one output");
        engine::backward(
            vec![Root {
                tensor: self,
                grad: seed.read().into_data(),
            }],
            options.retains_graph(),
        )
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
#[deprecated(
    since = "0.2.0",
    note = "use `grad_with(outputs, inputs, &BackwardOptions::new().retain_graph(true))`"
)]
pub fn grad_retain_graph(outputs: &[&Tensor], inputs: &[&Tensor]) -> Result<Vec<Tensor>> {
    run(outputs, inputs, true)
}

/// The gradients of the sum of `outputs` with respect to each of
/// `inputs`, with [`BackwardOptions`]: returned instead of accumulated (no
/// tensor's [`grad`](Tensor::grad) is touched), one per input, `None` only
/// for an input the outputs do not depend on when
/// [`allow_unused`](BackwardOptions::allow_unused) is set (zeros
/// otherwise). An input given more than once gets its gradient at each
/// position.
///
/// With [`create_graph`](BackwardOptions::create_graph) (and grad mode on
/// for this thread) the gradients are recorded: apply `grad_with` (or any
/// op) to them again, for derivatives of any order.
///
/// # Errors
///
/// [`Error::NotScalar`](crate::Error::NotScalar) if an output has more than
/// one element and no gradient is given for it;
/// [`Error::ShapeMismatch`](crate::Error::ShapeMismatch) if a given
/// gradient's shape differs from its output's;
/// [`Error::NotDifferentiable`](crate::Error::NotDifferentiable) with
/// `create_graph`, naming the first op reached that has no differentiable
/// backward; and the errors of [`Tensor::try_backward`].
///
/// # Examples
///
/// The second derivative of `tanh`: `d/dx tanh = 1 - tanh²`,
/// `d²/dx² = -2 tanh (1 - tanh²)`.
///
/// ```
/// use netcl::autograd::{self, BackwardOptions};
/// use netcl::Tensor;
///
/// let x = Tensor::from_vec(vec![0.5], &[1])?.requires_grad_(true);
/// let y = x.tanh().sum();
/// let create = BackwardOptions::new().create_graph(true);
/// let dy = autograd::grad_with(&[&y], &[&x], &create)?[0].clone().unwrap();
/// let d2y = autograd::grad_with(&[&dy.sum()], &[&x], &create)?[0].clone().unwrap();
/// let t = 0.5_f32.tanh();
/// assert!((d2y.item() - -2.0 * t * (1.0 - t * t)).abs() < 1e-6);
///
/// // An input the output does not depend on.
/// let z = Tensor::ones(&[1]).requires_grad_(true);
/// let unused = BackwardOptions::new().allow_unused(true);
/// assert!(autograd::grad_with(&[&x.exp().sum()], &[&z], &unused)?[0].is_none());
/// # Ok::<(), netcl::Error>(())
/// ```
pub fn grad_with(
    outputs: &[&Tensor],
    inputs: &[&Tensor],
    options: &BackwardOptions,
) -> Result<Vec<Option<Tensor>>> {
    const OP: &str = "grad";
    let seeds = options.seeds(OP, outputs)?;
    let retain = options.retains_graph();
    let grads = if options.create_graph && is_grad_enabled() {
        let roots = outputs
            .iter()
            .zip(seeds)
            .map(|(tensor, grad)| GraphRoot { tensor, grad })
            .collect();
        engine::grad_graph(roots, inputs, retain)?
    } else {
        let roots = outputs
            .iter()
            .zip(&seeds)
            .map(|(tensor, grad)| Root {
                tensor,
                grad: grad.read().into_data(),
            })
            .collect();
        engine::grad(roots, inputs, retain)?
            .into_iter()
            .map(|grad| grad.map(Tensor::from_data))
            .collect()
    };
    Ok(grads
        .into_iter()
        .zip(inputs)
        .map(|(grad, input)| match grad {
            None if !options.allow_unused => Some(Tensor::zeros(input.shape())),
            grad => grad,
        })
        .collect())
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
