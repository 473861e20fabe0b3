//! loom model checks of netcl: the models live in `tests/`, this library
//! holds their shared helpers.
//!
//! Run them with
//!
//! ```text
//! RUSTFLAGS="--cfg loom" cargo test -p loom-tests --release
//! ```
//!
//! Under `cfg(loom)` netcl builds on loom's locks, atomics, `Arc` and
//! thread-locals (see netcl's `src/sync.rs`), compiles neither parking_lot
//! nor rayon, and runs its parallel helpers sequentially; the models spawn
//! `loom::thread`s and carry a `GradMode` into them by hand.

#![cfg(loom)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use netcl::Tensor;

/// A 1-D leaf tensor that requires grad.
pub fn leaf(values: &[f32]) -> Tensor {
    Tensor::from_vec(values.to_vec(), &[values.len()])
        .expect("shape matches")
        .requires_grad_(true)
}

/// Runs a loom model and reports how many executions loom explored and how
/// long it took, as `loom model <name>: <n> iterations in <t>`. Two-thread
/// models run unbounded (every interleaving) unless `LOOM_MAX_PREEMPTIONS`
/// is set.
pub fn check(name: &str, model: impl Fn() + Sync + Send + 'static) {
    check_bounded(name, None, model)
}

/// [`check`] with at most `bound` preemptions per execution, for models of
/// three or more threads whose full state space is too large.
pub fn check_bounded(name: &str, bound: Option<usize>, model: impl Fn() + Sync + Send + 'static) {
    static ITERATIONS: AtomicUsize = AtomicUsize::new(0);
    ITERATIONS.store(0, Ordering::SeqCst);
    let started = Instant::now();

    /// Reports the iteration at which a model failed.
    struct OnFailure<'a>(&'a str, Instant);
    impl Drop for OnFailure<'_> {
        fn drop(&mut self) {
            if std::thread::panicking() {
                println!(
                    "loom model {}: failed at iteration {} after {:.2?}",
                    self.0,
                    ITERATIONS.load(Ordering::SeqCst),
                    self.1.elapsed()
                );
            }
        }
    }
    let _report = OnFailure(name, started);
    let mut builder = loom::model::Builder::new();
    if bound.is_some() {
        builder.preemption_bound = bound;
    }
    let bound = builder
        .preemption_bound
        .map_or_else(|| "unbounded".to_string(), |b| b.to_string());
    builder.check(move || {
        ITERATIONS.fetch_add(1, Ordering::SeqCst);
        model();
    });
    println!(
        "loom model {name}: {} iterations in {:.2?} (preemption bound {bound})",
        ITERATIONS.load(Ordering::SeqCst),
        started.elapsed(),
    );
}
