//! The crate's error type.
//!
//! Every fallible operation has a `try_` method returning [`Result`]; its plain
//! twin panics with the same message (the `Display` of the [`Error`]).

/// A specialised `Result` whose error is [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in netcl, each variant naming the operation
/// and the shapes, axes or values at fault.
///
/// # Examples
///
/// ```
/// use netcl::{Error, Tensor};
///
/// let a = Tensor::zeros(&[2, 3]);
/// let b = Tensor::zeros(&[4]);
/// let err = a.try_add(&b).unwrap_err();
/// assert!(matches!(err, Error::Broadcast { op: "add", .. }));
/// assert_eq!(
///     err.to_string(),
///     "add: shapes [2, 3] and [4] cannot be broadcast together"
/// );
/// ```
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Two shapes that must be broadcast together are incompatible.
    #[error("{op}: shapes {lhs:?} and {rhs:?} cannot be broadcast together")]
    Broadcast {
        /// The operation.
        op: &'static str,
        /// Shape of the left operand.
        lhs: Vec<usize>,
        /// Shape of the right operand.
        rhs: Vec<usize>,
    },

    /// Two shapes that must be equal differ.
    #[error("{op}: shape mismatch, {lhs:?} vs {rhs:?}")]
    ShapeMismatch {
        /// The operation.
        op: &'static str,
        /// The first shape.
        lhs: Vec<usize>,
        /// The second shape.
        rhs: Vec<usize>,
    },

    /// The inner dimensions of a matrix product do not agree.
    #[error(
        "matmul: cannot multiply {lhs:?} by {rhs:?} (inner dimensions {lhs_inner} and {rhs_inner} differ)"
    )]
    MatmulShape {
        /// Shape of the left operand.
        lhs: Vec<usize>,
        /// Shape of the right operand.
        rhs: Vec<usize>,
        /// Last dimension of the left operand.
        lhs_inner: usize,
        /// Second-to-last dimension of the right operand.
        rhs_inner: usize,
    },

    /// An operation needs a tensor with a different number of dimensions.
    #[error("{op}: expected {expected}, got a tensor of shape {shape:?}")]
    Rank {
        /// The operation.
        op: &'static str,
        /// What was expected, in words (for example "at least 2 dimensions").
        expected: &'static str,
        /// The shape that was given.
        shape: Vec<usize>,
    },

    /// An axis is out of range for a tensor of `ndim` dimensions.
    #[error("{op}: axis {axis} is out of range for a tensor with {ndim} dimensions")]
    Axis {
        /// The operation.
        op: &'static str,
        /// The axis that was given (negative counts from the end).
        axis: isize,
        /// The number of dimensions of the tensor.
        ndim: usize,
    },

    /// A shape is too large to exist: the product of its non-zero lengths
    /// exceeds [`Tensor::MAX_ELEMENTS`](crate::Tensor::MAX_ELEMENTS), the
    /// most `f32` values one allocation can hold (zero-size shapes
    /// included, since their strides are computed from that product).
    #[error(
        "{op}: shape {shape:?} is too large: the product of its non-zero lengths must be at most {limit}"
    )]
    ShapeTooLarge {
        /// The operation.
        op: &'static str,
        /// The shape that was requested or would result.
        shape: Vec<usize>,
        /// The limit, [`Tensor::MAX_ELEMENTS`](crate::Tensor::MAX_ELEMENTS).
        limit: usize,
    },

    /// A number of elements does not fit a shape.
    #[error("{op}: {len} elements cannot have shape {shape:?} ({expected} elements)")]
    ElementCount {
        /// The operation.
        op: &'static str,
        /// The requested shape.
        shape: Vec<usize>,
        /// The number of elements that shape holds.
        expected: usize,
        /// The number of elements given.
        len: usize,
    },

    /// An operation needs a tensor with exactly one element.
    #[error("{op}: expected a tensor with one element, got shape {shape:?}")]
    NotScalar {
        /// The operation.
        op: &'static str,
        /// The shape that was given.
        shape: Vec<usize>,
    },

    /// `backward` (or `autograd::grad`) was called on a tensor that has no
    /// graph to walk.
    #[error(
        "{op}: tensor does not require grad and has no grad_fn (was it computed under no_grad, or from inputs that do not require grad?)"
    )]
    NoGraph {
        /// The operation.
        op: &'static str,
    },

    /// A backward pass reached a node whose saved tensors were already
    /// released by an earlier backward.
    #[error(
        "backward through node `{node}` a second time: its saved tensors were released by the first backward; use the retain-graph variant for the first call if you need to backward twice"
    )]
    GraphReleased {
        /// The op that recorded the node.
        node: &'static str,
    },

    /// Inputs of one operation were recorded on different tapes.
    #[error(
        "{op}: inputs were recorded on different tapes (tape {first} and tape {second}); record a graph on one tape, for example by entering the first tape's GradMode"
    )]
    TapeMismatch {
        /// The operation.
        op: &'static str,
        /// Id of the first tape.
        first: u64,
        /// Id of the second tape.
        second: u64,
    },

    /// `requires_grad_` was called on a tensor computed by an op.
    #[error(
        "requires_grad_: only leaf tensors can change requires_grad; this tensor was computed by `{op}` (use detach() to get a leaf)"
    )]
    NotLeaf {
        /// The op that computed the tensor.
        op: &'static str,
    },

    /// A custom op's backward returned a gradient of the wrong shape.
    #[error(
        "{op}: backward returned a gradient of shape {got:?} for input {input} of shape {expected:?}"
    )]
    GradShape {
        /// The op.
        op: &'static str,
        /// The input position.
        input: usize,
        /// The input's shape.
        expected: Vec<usize>,
        /// The gradient's shape.
        got: Vec<usize>,
    },

    /// A class-index target is not an integer in `0..classes`.
    #[error("{op}: target {index} is {value}, expected a class index in 0..{classes}")]
    InvalidTarget {
        /// The operation.
        op: &'static str,
        /// Position of the target in the batch.
        index: usize,
        /// The value found.
        value: f32,
        /// The number of classes.
        classes: usize,
    },

    /// An index (an element of an index tensor, or an index argument) is
    /// not an integer in `0..bound`. Index tensors hold integer values in
    /// `f32`, as the class targets of `cross_entropy` do.
    #[error(
        "{op}: index {value} at position {position} is out of range: expected an integer in 0..{bound}"
    )]
    Index {
        /// The operation.
        op: &'static str,
        /// Position of the index in the index tensor, in row-major order
        /// (0 for a scalar index argument).
        position: usize,
        /// The value found.
        value: f32,
        /// The length of the dimension indexed.
        bound: usize,
    },

    /// An argument is outside the values an operation accepts.
    #[error("{op}: {message}")]
    InvalidArgument {
        /// The operation.
        op: &'static str,
        /// What was wrong.
        message: String,
    },

    /// Anomaly detection ([`detect_anomaly`](crate::autograd::detect_anomaly))
    /// found a NaN or an infinite value where an op produced it.
    #[error("anomaly detected: {message}")]
    Anomaly {
        /// The op that produced the value: the op whose forward output, or
        /// whose backward's gradient, holds it.
        op: &'static str,
        /// In backward, the input whose gradient holds it; `None` in
        /// forward.
        input: Option<usize>,
        /// Where the op was called (`file:line:column`), if it was recorded
        /// with anomaly detection on.
        location: Option<String>,
        /// The whole description.
        message: String,
    },

    /// A training step's loss was NaN or infinite; see
    /// [`Trainer::on_non_finite`](crate::train::Trainer::on_non_finite).
    #[error(
        "Trainer::fit: the loss of epoch {epoch}, batch {batch} (step {step}) is {loss}; the step was not taken (look for NaN or infinite inputs, a too-high learning rate, or run with autograd::detect_anomaly)"
    )]
    NonFiniteLoss {
        /// The epoch, counting from 0.
        epoch: usize,
        /// The batch within the epoch, counting from 0.
        batch: usize,
        /// The step it would have been, counting from 1 over the trainer's
        /// life.
        step: u64,
        /// The loss.
        loss: f32,
    },

    /// The global gradient norm of a training step was NaN or infinite
    /// ([`Trainer::clip_grad_norm`](crate::train::Trainer::clip_grad_norm)).
    #[error(
        "Trainer::fit: the gradient norm of epoch {epoch}, batch {batch} (step {step}) is {norm}; the step was not taken (look for NaN or infinite inputs, a too-high learning rate, or run with autograd::detect_anomaly)"
    )]
    NonFiniteGradient {
        /// The epoch, counting from 0.
        epoch: usize,
        /// The batch within the epoch, counting from 0.
        batch: usize,
        /// The step it would have been, counting from 1 over the trainer's
        /// life.
        step: u64,
        /// The global 2-norm of the gradients.
        norm: f32,
    },

    /// An operation is not available for this value, such as forking a
    /// custom module that does not implement
    /// [`Module::try_fork`](crate::nn::Module::try_fork).
    #[error("{op}: {message}")]
    Unsupported {
        /// The operation.
        op: &'static str,
        /// What is not supported, and what to do instead.
        message: String,
    },

    /// Reading or writing a file failed.
    #[error("{op}: {path}: {message}")]
    Io {
        /// The operation.
        op: &'static str,
        /// The file.
        path: String,
        /// The kind of I/O error.
        kind: std::io::ErrorKind,
        /// The I/O error's message.
        message: String,
    },

    /// A thread could not be started (the operating system refused it).
    #[error("{op}: cannot start a thread: {message}")]
    ThreadSpawn {
        /// The operation.
        op: &'static str,
        /// The kind of I/O error the spawn failed with.
        kind: std::io::ErrorKind,
        /// The I/O error's message.
        message: String,
    },

    /// A line of a text data file (CSV) is malformed.
    #[error("{source_name}:{line}: {message}")]
    Parse {
        /// The file name, or a description of the source that was read.
        source_name: String,
        /// The line number, counting from 1 (the header is line 1).
        line: usize,
        /// What is wrong with the line.
        message: String,
    },

    /// A file is not valid in the format it is read as (truncated, garbage,
    /// an inconsistent header).
    #[error("{op}: {source_name} is not a valid {format} file: {message}")]
    Format {
        /// The operation.
        op: &'static str,
        /// The file name, or a description of the bytes that were read.
        source_name: String,
        /// The expected format, such as `"safetensors"`.
        format: &'static str,
        /// What is wrong.
        message: String,
    },

    /// The tensors stored in a checkpoint are not the parameters of the model
    /// it is loaded into: names are missing or unexpected.
    #[error(
        "{op}: checkpoint does not match the model's parameters (missing: {missing:?}; unexpected: {unexpected:?})"
    )]
    ParameterNames {
        /// The operation.
        op: &'static str,
        /// Parameters of the model absent from the checkpoint.
        missing: Vec<String>,
        /// Tensors of the checkpoint that the model has no parameter for.
        unexpected: Vec<String>,
    },

    /// A stored tensor's shape or element type does not match the model's
    /// parameter of the same name (netcl parameters are `F32`).
    #[error(
        "{op}: parameter `{name}` is stored as {found_dtype} {found:?}, the model expects F32 {expected:?}"
    )]
    ParameterMismatch {
        /// The operation.
        op: &'static str,
        /// The parameter's name.
        name: String,
        /// The model's shape for it.
        expected: Vec<usize>,
        /// The stored shape.
        found: Vec<usize>,
        /// The stored element type, such as `"F32"` or `"F16"`.
        found_dtype: String,
    },

    /// A backward with `create_graph` reached an op that has no
    /// differentiable backward (a custom op given only an array backward,
    /// through [`apply_op`](crate::autograd::apply_op)): its gradient
    /// cannot be recorded, so no higher-order derivative through it exists.
    #[error(
        "create_graph: op `{op}` has no differentiable backward, so its gradient cannot be recorded for a higher-order derivative (a custom op gives one with autograd::apply_op_differentiable)"
    )]
    NotDifferentiable {
        /// The op without a differentiable backward.
        op: &'static str,
    },
}

/// Unwraps `result`, panicking with the error's message: the plain (non-`try_`)
/// methods are this applied to their `try_` twin.
#[track_caller]
pub(crate) fn or_panic<T>(result: Result<T>) -> T {
    match result {
        Ok(value) => value,
        Err(err) => panic!("{err}"),
    }
}
