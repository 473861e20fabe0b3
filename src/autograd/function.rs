//! The one path every op records through: [`apply_op`] and the [`Backward`]
//! trait.

use ndarray::{ArrayD, Dimension, IxDyn};

use std::panic::Location;

use crate::autograd::mode::{current_tape, recording_flags};
use crate::autograd::tape::common_tape;
use crate::error::{Error, Result};
use crate::tensor::{Data, NodeRef, Tensor};

/// The backward function of a recorded op: given the gradient of the loss
/// with respect to the op's output, it computes the gradients with respect to
/// the op's inputs.
///
/// The saved state an op needs (input values, its output) is data owned by
/// the implementing type, and is dropped when the node is released: after a
/// backward without `retain_graph`, or when no tensor reaches the node any
/// more. Save arrays (`ArcArray` clones are cheap), not [`Tensor`]s.
///
/// `backward` runs with grad mode off on the calling thread and no lock held.
///
/// Closures `Fn(ArrayD<f32>, &mut InputGrads<'_>)` implement this trait; see
/// [`apply_op`].
pub trait Backward: Send + Sync + 'static {
    /// Computes input gradients from `grad`, the gradient with respect to the
    /// output (it has the output's shape), and stores them with
    /// [`InputGrads::set`]. Inputs for which [`InputGrads::needs_grad`] is
    /// false may be skipped.
    fn backward(&self, grad: ArrayD<f32>, grads: &mut InputGrads<'_>);
}

impl<F> Backward for F
where
    F: Fn(ArrayD<f32>, &mut InputGrads<'_>) + Send + Sync + 'static,
{
    fn backward(&self, grad: ArrayD<f32>, grads: &mut InputGrads<'_>) {
        self(grad, grads)
    }
}

/// The backward function the engine runs: [`Backward`] on netcl's own
/// storage. The built-in ops implement it directly (a gradient of a few
/// values lives inline, without an allocation); a custom op's [`Backward`]
/// runs through it, on ndarray arrays ([`apply_op`]).
pub(crate) trait Backprop: Send + Sync + 'static {
    /// As [`Backward::backward`], storing gradients with
    /// [`InputGrads::put`].
    fn backward(&self, grad: Data, grads: &mut InputGrads<'_>);
}

impl<F> Backprop for F
where
    F: Fn(Data, &mut InputGrads<'_>) + Send + Sync + 'static,
{
    fn backward(&self, grad: Data, grads: &mut InputGrads<'_>) {
        self(grad, grads)
    }
}

/// Where a [`Backward`] puts the gradients of its op's inputs, one slot per
/// input in the order the inputs were given to [`apply_op`].
pub struct InputGrads<'a> {
    needs: &'a [bool],
    slots: &'a mut [Option<Data>],
    error: Option<Error>,
}

impl<'a> InputGrads<'a> {
    pub(crate) fn new(needs: &'a [bool], slots: &'a mut [Option<Data>]) -> Self {
        debug_assert_eq!(needs.len(), slots.len());
        InputGrads {
            needs,
            slots,
            error: None,
        }
    }

    /// The error a checked backward reported, if any.
    pub(crate) fn take_error(&mut self) -> Option<Error> {
        self.error.take()
    }

    /// The number of inputs.
    pub fn len(&self) -> usize {
        self.needs.len()
    }

    /// True for an op without inputs.
    pub fn is_empty(&self) -> bool {
        self.needs.is_empty()
    }

    /// Whether input `input`'s gradient is used. Computing it when this is
    /// false is wasted work (it is discarded).
    ///
    /// # Panics
    ///
    /// If `input` is not an input position.
    pub fn needs_grad(&self, input: usize) -> bool {
        self.needs[input]
    }

    /// Stores the gradient of input `input`, which must have that input's
    /// shape.
    ///
    /// # Panics
    ///
    /// If `input` is not an input position.
    pub fn set(&mut self, input: usize, grad: ArrayD<f32>) {
        assert!(
            input < self.slots.len(),
            "InputGrads::set: input {input} out of range for an op with {} inputs",
            self.slots.len()
        );
        if self.needs[input] {
            self.slots[input] = Some(Data::from_array(grad));
        }
    }

    /// [`set`](InputGrads::set) for the built-in ops' gradients.
    pub(crate) fn put(&mut self, input: usize, grad: Data) {
        if self.needs[input] {
            self.slots[input] = Some(grad);
        }
    }

    pub(crate) fn get(&self, input: usize) -> Option<&Data> {
        self.slots[input].as_ref()
    }
}

/// Records `output` as the result of op `op` applied to `inputs`: the path
/// every op takes, built-in ops directly (or through [`record_unary`]) and
/// custom ops through [`apply_op`].
///
/// A node is pushed only when grad mode is on for this thread and some input
/// requires grad; `save` (which gathers the backward's state) runs only then.
/// Otherwise the output is a plain tensor: the tape is not touched (no lock,
/// no node) and nothing is saved.
///
/// With anomaly detection on, the output is checked (see
/// [`detect_anomaly`](crate::autograd::detect_anomaly)) and the node keeps
/// the location of the op call: every public op passes its caller's
/// location down with `#[track_caller]`.
#[track_caller]
pub(crate) fn record<B: Backprop>(
    op: &'static str,
    inputs: &[&Tensor],
    output: Data,
    save: impl FnOnce(&Data) -> B,
) -> Result<Tensor> {
    record_node(op, inputs, &[], output, save, false)
}

/// [`record`] for an op with scalar arguments that are values of its
/// output (`masked_fill`'s fill value): a non-finite argument, such as the
/// `-inf` of an attention mask, explains a non-finite output, so anomaly
/// detection does not report it.
#[track_caller]
pub(crate) fn record_with_constants<B: Backprop>(
    op: &'static str,
    inputs: &[&Tensor],
    constants: &[f32],
    output: Data,
    save: impl FnOnce(&Data) -> B,
) -> Result<Tensor> {
    record_node(op, inputs, constants, output, save, false)
}

/// [`record`], saying whether the backward may own tensors (a custom op's
/// may; a built-in op's owns plain values).
#[track_caller]
fn record_node<B: Backprop>(
    op: &'static str,
    inputs: &[&Tensor],
    constants: &[f32],
    output: Data,
    save: impl FnOnce(&Data) -> B,
    holds_tensors: bool,
) -> Result<Tensor> {
    let (enabled, anomaly) = recording_flags();
    let location = if anomaly {
        let location = Location::caller();
        if non_finite(constants).is_none() {
            check_forward(op, inputs, &output, location)?;
        }
        Some(location)
    } else {
        None
    };
    if !enabled || !inputs.iter().any(|input| input.requires_grad()) {
        return Ok(Tensor::from_data(output));
    }

    // A graph lives on one tape: the one the inputs were recorded on, else
    // the current thread's.
    let tape = match common_tape(op, inputs.iter().copied())? {
        Some(tape) => tape.clone(),
        None => current_tape(),
    };

    let backward: Box<dyn Backprop> = Box::new(save(&output));
    let id = tape.push(op, inputs, backward, location, holds_tensors);
    Ok(Tensor::from_node(output, NodeRef { tape, id, op }))
}

/// [`record`] for an op of one input, which cannot fail: its input is on
/// at most one tape. (With anomaly detection on, an op that makes a NaN or
/// an infinity from finite input panics with the anomaly's message; ops of
/// one input without a `try_` form have no other way to report it.)
#[track_caller]
pub(crate) fn record_unary<B: Backprop>(
    op: &'static str,
    input: &Tensor,
    output: Data,
    save: impl FnOnce(&Data) -> B,
) -> Tensor {
    crate::error::or_panic(record(op, &[input], output, save))
}

/// What a non-finite array holds, for anomaly messages: `None` if every
/// value is finite.
pub(crate) fn non_finite<'a, I>(values: I) -> Option<&'static str>
where
    I: IntoIterator<Item = &'a f32>,
    I::IntoIter: Clone,
{
    let values = values.into_iter();
    if values.clone().any(|v| v.is_nan()) {
        Some("NaN")
    } else if values.into_iter().any(|v| v.is_infinite()) {
        Some("an infinite value")
    } else {
        None
    }
}

/// Anomaly detection's forward check: an op whose output is not finite
/// while its inputs all are is where a NaN or infinity first appears.
fn check_forward(
    op: &'static str,
    inputs: &[&Tensor],
    output: &Data,
    location: &'static Location<'static>,
) -> Result<()> {
    let Some(found) = non_finite(output.view().iter()) else {
        return Ok(());
    };
    if inputs
        .iter()
        .any(|input| non_finite(input.read().view().iter()).is_some())
    {
        return Ok(());
    }
    Err(Error::Anomaly {
        op,
        input: None,
        location: Some(location.to_string()),
        message: format!("in forward, `{op}` at {location} produced {found} from finite inputs"),
    })
}

/// Defines a differentiable op: records `output` as the result of `op`
/// applied to `inputs`, with the backward function that `save` returns.
///
/// Custom ops record exactly as the built-in ones do (through the same
/// internal path): when grad mode is off on this thread or no input
/// requires grad, `save` is not called and the output is a plain tensor;
/// otherwise `save` runs once, and what it returns is the node's backward,
/// holding whatever state it captured until the node is released. Unlike
/// a built-in op's, a custom backward's gradients are checked against the
/// inputs' shapes.
///
/// # Errors
///
/// [`Error::TapeMismatch`] if inputs were recorded on different tapes;
/// [`Error::ShapeTooLarge`] if `output` is an empty array whose non-zero
/// lengths multiply past [`Tensor::MAX_ELEMENTS`];
/// [`Error::Anomaly`] with anomaly detection on, if `output` is not finite
/// while the inputs are. A backward that sets a gradient of the wrong shape
/// makes the backward pass fail with [`Error::GradShape`].
///
/// # Examples
///
/// `cube(x) = x³`, whose derivative `3x²` needs the input saved:
///
/// ```
/// use netcl::autograd::{InputGrads, apply_op};
/// use netcl::{Result, Tensor};
/// use ndarray::ArrayD;
///
/// fn cube(x: &Tensor) -> Result<Tensor> {
///     let input = x.data();
///     let output = input.mapv(|v| v * v * v);
///     apply_op("cube", &[x], output, move || {
///         move |grad: ArrayD<f32>, grads: &mut InputGrads<'_>| {
///             grads.set(0, grad * input.mapv(|v| 3.0 * v * v));
///         }
///     })
/// }
///
/// let x = Tensor::from_vec(vec![1.0, -2.0, 0.5], &[3])?.requires_grad_(true);
/// let y = cube(&x)?;
/// assert_eq!(y.grad_fn().unwrap().name(), "cube");
/// y.sum().backward();
/// // d/dx x³ = 3x²
/// assert_eq!(x.grad().unwrap().to_vec(), vec![3.0, 12.0, 0.75]);
/// # Ok::<(), netcl::Error>(())
/// ```
#[track_caller]
pub fn apply_op<B: Backward>(
    op: &'static str,
    inputs: &[&Tensor],
    output: ArrayD<f32>,
    save: impl FnOnce() -> B,
) -> Result<Tensor> {
    let checked = |_: &Data| Checked {
        op,
        shapes: inputs.iter().map(|input| input.dim()).collect(),
        inner: save(),
    };
    // An empty output can have a shape too large for a tensor.
    crate::array::checked_numel(op, output.shape())?;
    // A custom backward may own tensors.
    record_node(op, inputs, &[], Data::from_array(output), checked, true)
}

/// A user-defined backward whose gradients are checked against the inputs'
/// shapes before the engine uses them.
struct Checked<B> {
    op: &'static str,
    shapes: Vec<IxDyn>,
    inner: B,
}

impl<B: Backward> Backprop for Checked<B> {
    fn backward(&self, grad: Data, grads: &mut InputGrads<'_>) {
        self.inner.backward(grad.into_array(), grads);
        for (input, expected) in self.shapes.iter().enumerate() {
            if let Some(got) = grads.get(input)
                && got.shape() != expected.slice()
            {
                let error = Error::GradShape {
                    op: self.op,
                    input,
                    expected: expected.slice().to_vec(),
                    got: got.shape().to_vec(),
                };
                grads.error.get_or_insert(error);
            }
        }
    }
}
