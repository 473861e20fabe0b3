//! Reverse-mode automatic differentiation and the per-thread grad mode.
//!
//! # Grad mode is per thread
//!
//! Whether ops record is a property of the *thread*: [`no_grad`] on one
//! thread never switches off recording on another, so evaluation in one
//! thread cannot silently break a training step in the next. The family:
//!
//! | | |
//! |---|---|
//! | [`is_grad_enabled`] | this thread's mode (on by default) |
//! | [`no_grad`], [`enable_grad`], [`GradGuard::new`] | guards: set the mode until dropped, restore after, also on panic |
//! | [`with_grad_enabled`] | the closure form |
//! | [`set_grad_enabled`] | one-shot switch, returns the previous mode |
//! | [`train_mode`], [`eval_mode`], [`training_mode`] | the thread's training mode (Dropout), over each module's own default |
//! | [`detect_anomaly`] | debugging: the op, input and source line where a NaN or infinity first appears |
//! | [`GradMode`] | a snapshot of the thread's modes and tape, to re-enter in other threads, and in async tasks ([`GradModeFutureExt`]) |
//!
//! Under `no_grad` an op computes the same values at the same speed but
//! records nothing: its output has `requires_grad() == false` and no
//! `grad_fn`, whatever its inputs, and no node is pushed.
//!
//! # Backward passes and higher-order gradients
//!
//! [`Tensor::backward`](crate::Tensor::backward) accumulates into the
//! leaves' `.grad()`; [`grad`] returns the gradients instead. Their options
//! ([`BackwardOptions`]: `retain_graph`, `create_graph`, `grad_output`,
//! `allow_unused`) go to [`Tensor::backward_with_options`](crate::Tensor::backward_with_options)
//! and [`grad_with`]. With `create_graph` the gradients are recorded tensors
//! that can be differentiated again, to any order (Hessian-vector products,
//! gradient penalties): every built-in op has a differentiable backward,
//! and a custom op gets one through [`apply_op_differentiable`].
//!
//! # Examples
//!
//! The evaluation loop of a classifier (the seed library's, in Rust):
//!
//! ```
//! use netcl::{Tensor, autograd};
//!
//! # let w = Tensor::ones(&[4, 3]).requires_grad_(true);
//! # let batches = vec![(Tensor::ones(&[2, 4]), Tensor::from_vec(vec![0.0, 1.0], &[2])?)];
//! let (mut correct, mut total) = (0.0, 0);
//! {
//!     let _guard = autograd::no_grad();
//!     for (x, y) in &batches {
//!         let logits = x.matmul(&w);
//!         let pred = logits.argmax(-1);
//!         correct += pred.eq(y).sum().item();
//!         total += y.shape()[0];
//!     }
//! }
//! println!("accuracy: {:.2}%", 100.0 * correct / total as f32);
//! # Ok::<(), netcl::Error>(())
//! ```

pub(crate) mod engine;
pub(crate) mod engine_api;
pub(crate) mod function;
mod future;
pub(crate) mod mode;
pub(crate) mod tape;

#[allow(deprecated)]
pub use engine_api::grad_retain_graph;
pub use engine_api::{BackwardOptions, grad, grad_with};
pub use function::{
    Backward, DifferentiableBackward, GraphGrads, InputGrads, apply_op, apply_op_differentiable,
};
pub use future::{GradModeFuture, GradModeFutureExt};
pub use mode::{
    AnomalyGuard, GradGuard, GradMode, ModeGuard, TrainingGuard, current_tape, detect_anomaly,
    enable_grad, eval_mode, is_anomaly_enabled, is_grad_enabled, no_grad, set_grad_enabled,
    train_mode, training_mode, with_grad_enabled,
};
pub use tape::{Tape, TapeStats};
