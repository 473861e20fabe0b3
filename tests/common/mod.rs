//! Helpers shared by the integration tests.

use netcl::Tensor;
use netcl::autograd::{GradMode, Tape};

/// A 1-D leaf that requires grad.
pub fn leaf(values: &[f32]) -> Tensor {
    Tensor::from_vec(values.to_vec(), &[values.len()])
        .unwrap()
        .requires_grad_(true)
}

/// Runs `f` recording on a tape of its own, so its counts are not disturbed
/// by other tests that share this thread.
pub fn on_fresh_tape<R>(f: impl FnOnce(&Tape) -> R) -> R {
    let tape = Tape::new();
    GradMode::current().with_tape(tape.clone()).run(|| f(&tape))
}
