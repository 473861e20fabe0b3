//! The one path every op records through: [`apply_op`] and the [`Backward`]
//! trait.

use ndarray::{ArrayD, Dimension, IxDyn};

use std::panic::Location;

use crate::autograd::mode::{current_tape, recording_flags};
use crate::autograd::tape::{NodeId, PlanEdge, Tape, common_tape};
use crate::error::{Error, Result};
use crate::sync::Arc;
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
/// [`apply_op`]. An op whose gradient must itself be differentiable
/// (`create_graph`, see [`BackwardOptions`](crate::autograd::BackwardOptions))
/// also implements [`DifferentiableBackward`] and records through
/// [`apply_op_differentiable`].
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
///
/// # Two backwards: arrays, and recorded tensors
///
/// [`backward`](Backprop::backward) is the fast path every ordinary
/// backward pass takes: arrays in, arrays out, grad mode off.
/// [`backward_graph`](Backprop::backward_graph) is the same derivative
/// written in recorded tensor ops, run (with grad mode on) by a backward
/// with `create_graph`, so that the gradients it returns have a graph of
/// their own and can be differentiated again. The node keeps nothing extra
/// for it: the engine rebuilds the node's inputs and output as tensors
/// from the snapshots the op saved anyway and from the node's edges
/// ([`GraphGrads::input`], [`GraphGrads::output`]). An op that does not
/// override it makes a `create_graph` backward fail with
/// [`Error::NotDifferentiable`] naming the op: never a silent zero.
pub(crate) trait Backprop: Send + Sync + 'static {
    /// As [`Backward::backward`], storing gradients with
    /// [`InputGrads::put`].
    fn backward(&self, grad: Data, grads: &mut InputGrads<'_>);

    /// The differentiable backward: `grad` is the gradient with respect to
    /// the output as a tensor (possibly with a graph), and the input
    /// gradients are stored with [`GraphGrads::set`] as tensors computed by
    /// recorded ops. Runs with grad mode on.
    fn backward_graph(&self, _grad: &Tensor, grads: &mut GraphGrads<'_>) -> Result<()> {
        Err(grads.unsupported())
    }
}

/// A [`Backprop`] from two functions of one saved state: the array
/// backward and the differentiable one, side by side (the state is saved
/// once, for both).
pub(crate) struct WithGraph<S, F, G> {
    state: S,
    array: F,
    graph: G,
}

/// Pairs an array backward with its differentiable form over one saved
/// `state`.
pub(crate) fn with_graph<S, F, G>(state: S, array: F, graph: G) -> WithGraph<S, F, G>
where
    S: Send + Sync + 'static,
    F: Fn(&S, Data, &mut InputGrads<'_>) + Send + Sync + 'static,
    G: Fn(&S, &Tensor, &mut GraphGrads<'_>) -> Result<()> + Send + Sync + 'static,
{
    WithGraph {
        state,
        array,
        graph,
    }
}

impl<S, F, G> Backprop for WithGraph<S, F, G>
where
    S: Send + Sync + 'static,
    F: Fn(&S, Data, &mut InputGrads<'_>) + Send + Sync + 'static,
    G: Fn(&S, &Tensor, &mut GraphGrads<'_>) -> Result<()> + Send + Sync + 'static,
{
    fn backward(&self, grad: Data, grads: &mut InputGrads<'_>) {
        (self.array)(&self.state, grad, grads)
    }

    fn backward_graph(&self, grad: &Tensor, grads: &mut GraphGrads<'_>) -> Result<()> {
        (self.graph)(&self.state, grad, grads)
    }
}

/// Where a differentiable backward puts the gradients of its op's inputs,
/// as tensors (one slot per input, in the order the inputs were given),
/// during a backward pass with `create_graph`.
///
/// See [`apply_op_differentiable`].
pub struct GraphGrads<'a> {
    op: &'static str,
    needs: &'a [bool],
    slots: &'a mut [Option<Tensor>],
    node: GraphNode<'a>,
}

/// What the engine knows of the node being run, to rebuild its inputs and
/// output as tensors connected to the graph.
pub(crate) struct GraphNode<'a> {
    pub(crate) tape: &'a Arc<Tape>,
    /// The node itself.
    pub(crate) id: NodeId,
    /// Its input edges, in the plan's terms.
    pub(crate) edges: &'a [PlanEdge],
    /// The plan's leaves and node ids, which `edges` index.
    pub(crate) leaves: &'a [Tensor],
    pub(crate) ids: &'a [NodeId],
}

impl<'a> GraphGrads<'a> {
    pub(crate) fn new(
        op: &'static str,
        needs: &'a [bool],
        slots: &'a mut [Option<Tensor>],
        node: GraphNode<'a>,
    ) -> Self {
        debug_assert_eq!(needs.len(), slots.len());
        GraphGrads {
            op,
            needs,
            slots,
            node,
        }
    }

    /// The number of inputs.
    pub fn len(&self) -> usize {
        self.needs.len()
    }

    /// True for an op without inputs.
    pub fn is_empty(&self) -> bool {
        self.needs.is_empty()
    }

    /// Whether input `input`'s gradient is used.
    ///
    /// # Panics
    ///
    /// If `input` is not an input position.
    pub fn needs_grad(&self, input: usize) -> bool {
        self.needs[input]
    }

    /// Stores the gradient of input `input`, a tensor of that input's shape
    /// computed with tensor ops (so that it is recorded).
    ///
    /// # Panics
    ///
    /// If `input` is not an input position.
    pub fn set(&mut self, input: usize, grad: Tensor) {
        assert!(
            input < self.slots.len(),
            "GraphGrads::set: input {input} out of range for an op with {} inputs",
            self.slots.len()
        );
        if self.needs[input] {
            self.slots[input] = Some(grad);
        }
    }

    pub(crate) fn get(&self, input: usize) -> Option<&Tensor> {
        self.slots[input].as_ref()
    }

    /// The error of an op without a differentiable backward.
    pub(crate) fn unsupported(&self) -> Error {
        Error::NotDifferentiable { op: self.op }
    }

    /// Input `input` as a tensor holding `saved` (the snapshot of its
    /// values the op took in forward, or a stand-in with the same
    /// derivatives) and connected to the graph: its gradient flows where
    /// the input's did. An input that needs no gradient is a constant; a
    /// computed input is a new handle on its node; a leaf is a recorded
    /// identity (`snapshot`) of the saved values, so the differentiable
    /// backward sees what the array backward sees even if the leaf was
    /// updated since (or is being updated now).
    pub(crate) fn input(&self, input: usize, saved: &Data) -> Result<Tensor> {
        match &self.node.edges[input] {
            PlanEdge::None => Ok(Tensor::from_data(saved.clone())),
            PlanEdge::Local(position) => Ok(self.rebuild(self.node.ids[*position], saved)),
            // Never the leaf itself, even while it holds the saved values:
            // an update (an optimizer step, a publish) may replace them
            // between that check and the ops reading the leaf (loom model l
            // found it). A recorded identity holding the snapshot keeps the
            // values fixed and passes the gradient to the leaf.
            PlanEdge::Leaf(leaf) => record(
                "snapshot",
                &[&self.node.leaves[*leaf]],
                saved.clone(),
                |_| Identity,
            ),
        }
    }

    /// The op's output as a tensor holding `saved` (the output values the
    /// op saved), connected to this node: differentiating it runs this
    /// node's backward again.
    pub(crate) fn output(&self, saved: &Data) -> Tensor {
        self.rebuild(self.node.id, saved)
    }

    fn rebuild(&self, id: NodeId, saved: &Data) -> Tensor {
        let tape = self.node.tape;
        let op = tape.retain(id);
        Tensor::from_node(
            saved.clone(),
            NodeRef {
                tape: tape.clone(),
                id,
                op,
            },
        )
    }
}

/// The identity, recorded when a differentiable backward needs a leaf's
/// saved values (see [`GraphGrads::input`]).
struct Identity;

impl Backprop for Identity {
    fn backward(&self, grad: Data, grads: &mut InputGrads<'_>) {
        grads.put(0, grad);
    }

    fn backward_graph(&self, grad: &Tensor, grads: &mut GraphGrads<'_>) -> Result<()> {
        grads.set(0, grad.clone());
        Ok(())
    }
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
/// The backward is an array function, so it cannot be differentiated: a
/// backward with `create_graph` that reaches the op fails with
/// [`Error::NotDifferentiable`] naming it. Give a differentiable backward
/// with [`apply_op_differentiable`].
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

/// A custom op's backward that can also be differentiated: beside the array
/// [`Backward::backward`] (the fast path of every ordinary backward pass),
/// [`backward_graph`](DifferentiableBackward::backward_graph) computes the
/// same gradients with tensor ops, which a backward with `create_graph`
/// records so that they can be differentiated again. Give it to
/// [`apply_op_differentiable`].
pub trait DifferentiableBackward: Backward {
    /// Computes input gradients from `grad`, the gradient with respect to
    /// the output, using tensor ops on `grad`, `inputs` (the op's inputs,
    /// holding the values they had in forward) and `output` (the op's
    /// output), and stores them with [`GraphGrads::set`]. Runs with grad
    /// mode on, so the ops record and the gradients carry a graph.
    ///
    /// # Errors
    ///
    /// Whatever the tensor ops it calls return; the backward pass fails
    /// with it.
    fn backward_graph(
        &self,
        grad: &Tensor,
        inputs: &[Tensor],
        output: &Tensor,
        grads: &mut GraphGrads<'_>,
    ) -> Result<()>;
}

/// [`apply_op`] for an op whose backward can be differentiated, so that
/// `create_graph` (see
/// [`BackwardOptions`](crate::autograd::BackwardOptions)) works through it.
/// A custom op defined with [`apply_op`] has an array backward only, and a
/// backward with `create_graph` that reaches it fails with
/// [`Error::NotDifferentiable`] naming the op.
///
/// When recording, the node also keeps O(1) snapshots of the inputs' and
/// the output's values (for the differentiable backward); as with
/// [`apply_op`], nothing is saved when nothing records.
///
/// # Errors
///
/// As [`apply_op`].
///
/// # Examples
///
/// `cube(x) = x³`, twice differentiable: `d/dx = 3x²`, `d²/dx² = 6x`.
///
/// ```
/// use netcl::autograd::{
///     self, BackwardOptions, Backward, DifferentiableBackward, GraphGrads, InputGrads,
/// };
/// use netcl::{Result, Tensor};
/// use ndarray::ArrayD;
///
/// struct Cube(ArrayD<f32>);
///
/// impl Backward for Cube {
///     fn backward(&self, grad: ArrayD<f32>, grads: &mut InputGrads<'_>) {
///         grads.set(0, grad * self.0.mapv(|v| 3.0 * v * v));
///     }
/// }
///
/// impl DifferentiableBackward for Cube {
///     fn backward_graph(
///         &self,
///         grad: &Tensor,
///         inputs: &[Tensor],
///         _output: &Tensor,
///         grads: &mut GraphGrads<'_>,
///     ) -> Result<()> {
///         let x = &inputs[0];
///         grads.set(0, grad * (x * x * 3.0));
///         Ok(())
///     }
/// }
///
/// fn cube(x: &Tensor) -> Result<Tensor> {
///     let input = x.to_array();
///     let output = input.mapv(|v| v * v * v);
///     autograd::apply_op_differentiable("cube", &[x], output, move || Cube(input))
/// }
///
/// let x = Tensor::from_vec(vec![1.0, -2.0], &[2])?.requires_grad_(true);
/// let y = cube(&x)?.sum();
/// let options = BackwardOptions::new().create_graph(true);
/// let dx = autograd::grad_with(&[&y], &[&x], &options)?[0].clone().unwrap();
/// assert_eq!(dx.to_vec(), vec![3.0, 12.0]);
/// let ddx = autograd::grad(&[&dx.sum()], &[&x])?;
/// assert_eq!(ddx[0].to_vec(), vec![6.0, -12.0]);
/// # Ok::<(), netcl::Error>(())
/// ```
#[track_caller]
pub fn apply_op_differentiable<B: DifferentiableBackward>(
    op: &'static str,
    inputs: &[&Tensor],
    output: ArrayD<f32>,
    save: impl FnOnce() -> B,
) -> Result<Tensor> {
    let checked = |output: &Data| Differentiable {
        checked: Checked {
            op,
            shapes: inputs.iter().map(|input| input.dim()).collect(),
            inner: save(),
        },
        inputs: inputs
            .iter()
            .map(|input| input.read().into_data())
            .collect(),
        output: output.clone(),
    };
    crate::array::checked_numel(op, output.shape())?;
    record_node(op, inputs, &[], Data::from_array(output), checked, true)
}

/// A custom differentiable backward with the snapshots its
/// differentiable form rebuilds the inputs and output from.
struct Differentiable<B> {
    checked: Checked<B>,
    inputs: Vec<Data>,
    output: Data,
}

impl<B: DifferentiableBackward> Backprop for Differentiable<B> {
    fn backward(&self, grad: Data, grads: &mut InputGrads<'_>) {
        self.checked.backward(grad, grads)
    }

    fn backward_graph(&self, grad: &Tensor, grads: &mut GraphGrads<'_>) -> Result<()> {
        let inputs = self
            .inputs
            .iter()
            .enumerate()
            .map(|(i, saved)| grads.input(i, saved))
            .collect::<Result<Vec<_>>>()?;
        let output = grads.output(&self.output);
        self.checked
            .inner
            .backward_graph(grad, &inputs, &output, grads)?;
        for (input, expected) in self.checked.shapes.iter().enumerate() {
            if let Some(got) = grads.get(input)
                && got.shape() != expected.slice()
            {
                return Err(Error::GradShape {
                    op: self.checked.op,
                    input,
                    expected: expected.slice().to_vec(),
                    got: got.shape().to_vec(),
                });
            }
        }
        Ok(())
    }
}
