//! Models a and b: grad mode is per thread, and a `GradMode` snapshot
//! carries it to another thread.

#![cfg(loom)]

use loom::sync::Arc;
use loom::sync::atomic::{AtomicBool, Ordering};
use loom::thread;
use loom_tests::{check, leaf};
use netcl::autograd::{GradGuard, GradMode, Tape, is_grad_enabled, no_grad};

/// Model a: one thread switches no_grad on and off while another records a
/// training step. The training step never loses a node, in any interleaving.
#[test]
fn toggling_no_grad_in_one_thread_never_loses_a_node_in_another() {
    check("a: per-thread isolation", || {
        let w = leaf(&[1.0, 2.0]);
        let toggler = {
            let w = w.clone();
            thread::spawn(move || {
                // Evaluation on the same parameters, twice, under no_grad.
                for _ in 0..2 {
                    let _guard = no_grad();
                    assert!(!is_grad_enabled());
                    assert!(!(&w * 2.0).requires_grad());
                }
            })
        };
        let y = &w * 2.0;
        assert!(y.requires_grad(), "lost a node");
        y.sum().backward();
        toggler.join().unwrap();
        assert_eq!(w.grad().unwrap().to_vec(), vec![2.0, 2.0]);
    });
}

/// The same scenario against a deliberately process-global flag (the design
/// netcl rejects): every op consults one shared flag that the evaluating
/// thread switches off and back. loom finds the interleaving where the
/// training step's op runs while the flag is off, and the node is lost.
#[test]
#[should_panic(expected = "lost a node")]
fn a_process_global_flag_loses_nodes() {
    check("a': process-global flag (expected to fail)", || {
        let global = Arc::new(AtomicBool::new(true));
        let w = leaf(&[1.0, 2.0]);
        let toggler = {
            let global = global.clone();
            thread::spawn(move || {
                let previous = global.swap(false, Ordering::SeqCst);
                // ... evaluation under "no_grad" ...
                global.store(previous, Ordering::SeqCst);
            })
        };
        // Each op reads the global flag, as a global-flag design does.
        let y = {
            let _mode = GradGuard::new(global.load(Ordering::SeqCst));
            &w * 2.0
        };
        toggler.join().unwrap();
        assert!(y.requires_grad(), "lost a node");
    });
}

/// Model b: a `GradMode` handed to a spawned thread. Its ops record if and
/// only if the caller's mode says so, into the caller's tape, while the
/// thread's own mode is untouched.
#[test]
fn grad_mode_carried_to_a_thread_records_iff_the_caller_would() {
    check("b: GradMode to a spawned thread", || {
        let w = leaf(&[3.0]);
        let tape = Tape::new();
        let on = GradMode::new(true, tape.clone());
        let off = {
            let _guard = no_grad();
            GradMode::current().with_tape(tape.clone())
        };
        assert!(!off.is_enabled());
        let worker = {
            let w = w.clone();
            thread::spawn(move || {
                let recorded = on.run(|| &w * 2.0);
                let plain = off.run(|| &w * 2.0);
                assert!(is_grad_enabled(), "the thread's own mode was restored");
                (recorded, plain)
            })
        };
        // Meanwhile the caller records on its own tape.
        let own = (&w * 5.0).sum();
        let (recorded, plain) = worker.join().unwrap();
        assert!(recorded.requires_grad());
        assert!(std::ptr::eq(&*recorded.tape().unwrap(), &*tape));
        assert!(!plain.requires_grad() && plain.grad_fn().is_none());
        assert_eq!(tape.stats().recorded, 1);
        assert!(!std::ptr::eq(&*own.tape().unwrap(), &*tape));
        recorded.sum().backward();
        assert_eq!(w.grad().unwrap().to_vec(), vec![2.0]);
    });
}
