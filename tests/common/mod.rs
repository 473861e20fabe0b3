//! Helpers shared by the integration tests.
//!
//! Tests that run real threads never assume a thread was scheduled: they
//! wait for the condition they need ([`wait_until`]) or watch both sides'
//! progress counters ([`watch_progress`]), and fail with a message naming
//! what did not happen, after [`PATIENCE`] without progress, instead of
//! hanging or asserting a count the scheduler decides.

#![allow(dead_code)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

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

/// How long a test waits for another thread to make progress before it
/// fails: long enough for a loaded CI machine, short enough to beat a hang.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// Polls `condition` until it holds; panics naming `what` if it does not
/// within `limit`. Spins briefly, then sleeps 1 ms between polls, so a
/// waiting thread leaves the cores to the threads it waits for.
pub fn wait_until(limit: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    let mut polls = 0u32;
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        if polls < 100 {
            std::thread::yield_now();
        } else {
            std::thread::sleep(Duration::from_millis(1));
        }
        polls += 1;
    }
}

/// A liveness watchdog over progress counters, run on the calling thread
/// until `done()` holds: panics naming the side whose counter has not moved
/// for `stall` (with every side's count), so a test that needs both sides
/// to run says which one did not.
pub fn watch_progress(
    sides: &[(&str, &AtomicU64)],
    stall: Duration,
    mut done: impl FnMut() -> bool,
) {
    let now = Instant::now();
    let mut last: Vec<(u64, Instant)> = sides
        .iter()
        .map(|(_, count)| (count.load(Ordering::SeqCst), now))
        .collect();
    while !done() {
        let now = Instant::now();
        for ((name, count), (seen, since)) in sides.iter().zip(&mut last) {
            let count = count.load(Ordering::SeqCst);
            if count != *seen {
                (*seen, *since) = (count, now);
            } else if now.duration_since(*since) > stall {
                let counts: Vec<String> = sides
                    .iter()
                    .map(|(name, c)| format!("{name}: {}", c.load(Ordering::SeqCst)))
                    .collect();
                panic!(
                    "{name} made no progress for {stall:?} ({})",
                    counts.join(", ")
                );
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Sets its flag when dropped, also while unwinding: a scoped test whose
/// checking thread panics still stops the threads looping on the flag, so
/// the scope can join them and report the panic instead of hanging.
pub struct StopOnDrop<'a>(pub &'a std::sync::atomic::AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}
