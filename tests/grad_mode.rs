//! Grad mode: the per-thread flag, its guards, and the `GradMode` snapshot.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};

use netcl::autograd::{
    self, GradGuard, GradMode, Tape, enable_grad, is_grad_enabled, no_grad, set_grad_enabled,
    with_grad_enabled,
};
use netcl::{Error, Tensor};

mod common;
use common::{PATIENCE, leaf, on_fresh_tape, watch_progress};

#[test]
fn grad_is_enabled_by_default_on_every_thread() {
    assert!(is_grad_enabled());
    std::thread::spawn(|| assert!(is_grad_enabled()))
        .join()
        .unwrap();
}

#[test]
fn no_grad_output_has_no_grad_fn() {
    let w = leaf(&[1.0, -2.0, 3.0]);
    let with_grad = (&w * 2.0).exp().sum();
    let without = {
        let _guard = no_grad();
        (&w * 2.0).exp().sum()
    };
    assert!(with_grad.requires_grad());
    assert_eq!(with_grad.grad_fn().unwrap().name(), "sum");
    assert!(!without.requires_grad());
    assert!(without.grad_fn().is_none());
    assert!(without.is_leaf());
    // Same values either way.
    assert_eq!(with_grad.item().to_bits(), without.item().to_bits());
    // And a no_grad output cannot be backpropagated.
    assert!(matches!(without.try_backward(), Err(Error::NoGraph { .. })));
}

#[test]
fn no_grad_forward_pushes_no_node() {
    on_fresh_tape(|tape| {
        let x = leaf(&[0.5, 1.5]);
        let w = Tensor::ones(&[2, 2]).requires_grad_(true);
        {
            let _guard = no_grad();
            let y = x.reshape(&[1, 2]).matmul(&w).relu().softmax(-1).sum();
            assert!(!y.requires_grad());
        }
        assert_eq!(tape.stats().recorded, 0);
        // The same forward with grad on records every op.
        let y = x.reshape(&[1, 2]).matmul(&w).relu().softmax(-1).sum();
        assert_eq!(tape.stats().recorded, 5);
        assert_eq!(tape.len(), 5);
        drop(y);
        assert_eq!(tape.len(), 0);
    });
}

#[test]
fn ops_on_inputs_without_grad_record_nothing() {
    on_fresh_tape(|tape| {
        let x = Tensor::ones(&[3]);
        let y = (&x * 2.0).exp();
        assert!(!y.requires_grad());
        assert_eq!(tape.stats().recorded, 0);
    });
}

#[test]
fn enable_grad_inside_no_grad_records() {
    let w = leaf(&[2.0]);
    let _outer = no_grad();
    let (y, loss) = {
        let _inner = enable_grad();
        assert!(is_grad_enabled());
        let y = &w * &w;
        let loss = y.sum();
        (y, loss)
    };
    assert!(!is_grad_enabled());
    assert_eq!(y.grad_fn().unwrap().name(), "mul");
    // Back under no_grad: this op is not recorded.
    assert!(!y.sum().requires_grad());
    loss.backward();
    // d(w²)/dw = 2w
    assert_eq!(w.grad().unwrap().to_vec(), vec![4.0]);
}

#[test]
fn set_grad_enabled_returns_previous_value() {
    assert!(set_grad_enabled(false));
    assert!(!is_grad_enabled());
    assert!(!set_grad_enabled(false));
    assert!(!set_grad_enabled(true));
    assert!(set_grad_enabled(true));
    assert!(is_grad_enabled());
}

#[test]
fn guard_reads_the_previous_mode_when_created() {
    // The seed library's class read the previous mode when constructed rather
    // than when entered. Here a guard reads it when created: a mode changed
    // between two guards is what the second one restores.
    let first = no_grad();
    set_grad_enabled(true);
    let second = GradGuard::new(false);
    assert!(second.previous());
    drop(second);
    assert!(is_grad_enabled());
    drop(first);
    assert!(is_grad_enabled());
}

#[test]
fn nested_guards_restore_in_lifo_order() {
    {
        let _a = no_grad();
        {
            let _b = enable_grad();
            {
                let _c = GradGuard::new(false);
                assert!(!is_grad_enabled());
            }
            assert!(is_grad_enabled());
        }
        assert!(!is_grad_enabled());
    }
    assert!(is_grad_enabled());
}

#[test]
fn guard_restores_mode_when_unwinding_from_a_panic() {
    let result = catch_unwind(|| {
        let _guard = no_grad();
        assert!(!is_grad_enabled());
        panic!("evaluation failed");
    });
    assert!(result.is_err());
    assert!(is_grad_enabled());

    let result = catch_unwind(|| with_grad_enabled(false, || panic!("inside closure")));
    assert!(result.is_err());
    assert!(is_grad_enabled());
}

#[test]
fn tape_stays_usable_after_a_panic_mid_forward() {
    on_fresh_tape(|tape| {
        let w = leaf(&[1.0, 2.0]);
        let result = catch_unwind(AssertUnwindSafe(|| {
            let _guard = enable_grad();
            let y = &w * 3.0;
            let _ = y.matmul(&w.sum()); // 0-D matmul: panics with a clear message
        }));
        let message = *result.unwrap_err().downcast::<String>().unwrap();
        assert!(
            message.contains("matmul: expected at least 1 dimension"),
            "{message}"
        );
        // The half-built graph was freed while unwinding; recording goes on.
        assert_eq!(tape.len(), 0);
        let loss = (&w * &w).sum();
        loss.backward();
        assert_eq!(w.grad().unwrap().to_vec(), vec![2.0, 4.0]);
    });
}

#[test]
#[cfg(debug_assertions)]
#[should_panic(expected = "grad-mode guards dropped out of order")]
fn out_of_order_guard_drop_is_caught_in_debug_builds() {
    let a = no_grad();
    let b = enable_grad();
    drop(a);
    drop(b);
}

#[test]
fn a_guard_in_one_thread_never_changes_another() {
    let barrier = Arc::new(Barrier::new(2));
    let other = {
        let barrier = barrier.clone();
        std::thread::spawn(move || {
            let _guard = no_grad();
            barrier.wait(); // main thread checks its mode now
            barrier.wait();
            is_grad_enabled()
        })
    };
    barrier.wait();
    assert!(is_grad_enabled(), "the other thread's no_grad leaked here");
    let _guard = enable_grad();
    barrier.wait();
    assert!(!other.join().unwrap());
}

/// The bug the per-thread flag exists to prevent: one thread toggling
/// no_grad in a loop while another records training steps. With a
/// process-global flag the training thread loses nodes; here it never does.
///
/// The two threads must really overlap, whatever the scheduler does: the
/// trainer keeps stepping (at least `MIN_STEPS` steps) until at least
/// `MIN_OVERLAP` toggles were made between its first and its last step. A
/// watchdog fails the test, naming the side, if either makes no progress
/// for [`PATIENCE`].
#[test]
fn training_thread_never_loses_nodes_while_another_toggles_no_grad() {
    const MIN_STEPS: u64 = 2_000;
    const MIN_OVERLAP: u64 = 100;
    let stop = Arc::new(AtomicBool::new(false));
    let toggles = Arc::new(AtomicU64::new(0));
    let steps = Arc::new(AtomicU64::new(0));
    let toggler = {
        let (stop, toggles) = (stop.clone(), toggles.clone());
        std::thread::spawn(move || {
            let x = leaf(&[1.0, 2.0]);
            while !stop.load(Ordering::SeqCst) {
                let _guard = no_grad();
                let y = (&x * 2.0).sum();
                assert!(!y.requires_grad());
                toggles.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    let trainer = {
        let (toggles, steps) = (toggles.clone(), steps.clone());
        std::thread::spawn(move || {
            let w = leaf(&[0.5, -0.5]);
            let before_first = toggles.load(Ordering::SeqCst);
            let (mut done, mut overlap) = (0u64, 0u64);
            while done < MIN_STEPS || overlap < MIN_OVERLAP {
                let loss = (&w * &w).sum();
                assert!(loss.requires_grad());
                assert_eq!(loss.grad_fn().unwrap().name(), "sum");
                loss.backward();
                done += 1;
                steps.store(done, Ordering::SeqCst);
                overlap = toggles.load(Ordering::SeqCst) - before_first;
            }
            (w.grad().unwrap().to_vec(), done, overlap)
        })
    };
    let watched = catch_unwind(AssertUnwindSafe(|| {
        watch_progress(
            &[
                ("the training thread", &steps),
                ("the toggling thread", &toggles),
            ],
            PATIENCE,
            || trainer.is_finished(),
        )
    }));
    stop.store(true, Ordering::SeqCst);
    if let Err(stalled) = watched {
        // The stalled thread is left running: joining it could hang.
        std::panic::resume_unwind(stalled);
    }
    let (grad, steps, overlap) = trainer.join().unwrap();
    toggler.join().unwrap();
    println!("{steps} training steps, {overlap} no_grad toggles made meanwhile");
    assert!(steps >= MIN_STEPS && overlap >= MIN_OVERLAP);
    // d(Σw²)/dw = 2w per step, accumulated over every step: exact in f32
    // (2·0.5 = 1 per step, and steps < 2^24).
    let expected: Vec<f32> = [0.5f32, -0.5]
        .iter()
        .map(|w| 2.0 * w * steps as f32)
        .collect();
    assert_eq!(grad, expected);
}

#[test]
fn grad_mode_snapshot_carries_flag_and_tape_to_another_thread() {
    let w = leaf(&[1.0, 2.0]);
    let tape = Tape::new();
    let mode = GradMode::current().with_tape(tape.clone());

    let recorded = std::thread::scope(|s| {
        s.spawn(|| {
            let y = mode.run(|| (&w * 2.0).sum());
            // Recorded into the caller's tape, not the thread's own.
            assert!(Arc::ptr_eq(&y.tape().unwrap(), &tape));
            assert!(!Arc::ptr_eq(&autograd::current_tape(), &tape));
            y
        })
        .join()
        .unwrap()
    });
    recorded.backward();
    assert_eq!(w.grad().unwrap().to_vec(), vec![2.0, 2.0]);

    let off = mode.clone().with_enabled(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            let y = off.run(|| &w * 2.0);
            assert!(!y.requires_grad());
            // The thread's own mode is back after run.
            assert!(is_grad_enabled());
        });
    });
    assert_eq!(tape.stats().recorded, 2);
}

#[test]
fn mode_guard_restores_the_threads_own_flag_and_tape() {
    let own = autograd::current_tape();
    let other = Tape::new();
    {
        let _guard = GradMode::new(false, other.clone()).enter();
        assert!(!is_grad_enabled());
        assert!(Arc::ptr_eq(&autograd::current_tape(), &other));
    }
    assert!(is_grad_enabled());
    assert!(Arc::ptr_eq(&autograd::current_tape(), &own));
}

#[test]
fn requires_grad_cannot_be_changed_on_a_computed_tensor() {
    let x = leaf(&[1.0]);
    let y = x.exp();
    assert_eq!(
        y.try_requires_grad_(false).unwrap_err(),
        Error::NotLeaf { op: "exp" }
    );
    // On a leaf, every handle sees the change.
    let handle = x.clone();
    let x = x.requires_grad_(false);
    assert!(!handle.requires_grad() && !x.requires_grad());
}
