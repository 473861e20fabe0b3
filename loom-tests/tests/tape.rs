//! Models c to f: shared tapes, concurrent backward, reclaim.

#![cfg(loom)]

use loom::thread;
use loom_tests::{check, check_bounded, leaf};
use netcl::autograd::{BackwardOptions, GradMode, Tape};

/// Model c: two threads record into one shared tape, then one backward over
/// the combined loss gives the exact gradient.
#[test]
fn two_threads_record_into_one_tape_then_backward_is_exact() {
    check("c: shared tape", || {
        let w = leaf(&[1.0, 2.0]);
        let tape = Tape::new();
        let mode = GradMode::new(true, tape.clone());
        let worker = {
            let (w, mode) = (w.clone(), mode.clone());
            thread::spawn(move || mode.run(|| (&w * 2.0).sum()))
        };
        let mine = mode.run(|| (&w * 3.0).sum());
        let theirs = worker.join().unwrap();
        let loss = &theirs + &mine;
        assert_eq!(tape.len(), 5);
        loss.backward();
        // d/dw (2Σw + 3Σw) = 5
        assert_eq!(w.grad().unwrap().to_vec(), vec![5.0, 5.0]);
        drop((loss, theirs, mine));
        assert_eq!(tape.len(), 0);
    });
}

/// Model d: two backward passes into the same leaf at once lose no update.
#[test]
fn concurrent_backwards_into_one_leaf_lose_no_update() {
    check("d: concurrent backward", || {
        let w = leaf(&[1.0]);
        let first = (&w * 2.0).sum();
        let second = (&w * 3.0).sum();
        let worker = thread::spawn(move || first.backward());
        second.backward();
        worker.join().unwrap();
        assert_eq!(w.grad().unwrap().to_vec(), vec![5.0]);
    });
}

/// Model d, three threads: three backward passes into one leaf, each also
/// recording nothing new; preemption bound 3.
#[test]
fn three_concurrent_backwards_into_one_leaf_lose_no_update() {
    check_bounded("d3: three concurrent backwards", Some(3), || {
        let w = leaf(&[1.0]);
        let losses: Vec<_> = (1..=3).map(|k| (&w * k as f32).sum()).collect();
        let workers: Vec<_> = losses
            .into_iter()
            .map(|loss| thread::spawn(move || loss.backward()))
            .collect();
        for worker in workers {
            worker.join().unwrap();
        }
        assert_eq!(w.grad().unwrap().to_vec(), vec![6.0]);
    });
}

/// Model d, retained graph: two threads walk the same graph at once with
/// `retain_graph`, the first walk converting the node's backward function
/// to a shared one while the other may be collecting the graph. Both see a
/// complete graph; the gradient is counted twice.
#[test]
fn concurrent_retained_backwards_through_one_graph() {
    check("d': concurrent retain-graph backwards", || {
        let w = leaf(&[2.0]);
        let loss = (&w * &w).sum();
        let other = {
            let loss = loss.clone();
            thread::spawn(move || {
                loss.backward_with_options(&BackwardOptions::new().retain_graph(true))
            })
        };
        loss.backward_with_options(&BackwardOptions::new().retain_graph(true));
        other.join().unwrap();
        // d(w²)/dw = 2w = 4, twice.
        assert_eq!(w.grad().unwrap().to_vec(), vec![8.0]);
    });
}

/// Model e: a backward pass on one thread while another records new nodes
/// into the same tape; both graphs stay intact.
#[test]
fn backward_while_another_thread_records_into_the_same_tape() {
    check("e: backward during recording", || {
        let w = leaf(&[1.0]);
        let tape = Tape::new();
        let mode = GradMode::new(true, tape.clone());
        let loss = mode.run(|| (&w * 2.0).sum());
        let recorder = {
            let (w, mode) = (w.clone(), mode.clone());
            thread::spawn(move || mode.run(|| (&w * 3.0).sum()))
        };
        loss.backward();
        let other = recorder.join().unwrap();
        assert_eq!(w.grad().unwrap().to_vec(), vec![2.0]);
        other.backward();
        assert_eq!(w.grad().unwrap().to_vec(), vec![5.0]);
        drop((loss, other));
        assert_eq!(tape.len(), 0);
    });
}

/// Model f: tensors of one graph are dropped on two threads while a third
/// handle backpropagates through the shared node: no node is freed while
/// reachable and none is leaked.
#[test]
fn reclaim_while_tensors_drop_on_two_threads() {
    check("f: reclaim", || {
        let w = leaf(&[0.0]);
        let tape = Tape::new();
        let mode = GradMode::new(true, tape.clone());
        let (shared, a, b) = mode.run(|| {
            let shared = w.exp(); // e^0 = 1
            let a = (&shared * 2.0).sum();
            let b = (&shared * 3.0).sum();
            (shared, a, b)
        });
        assert_eq!(tape.len(), 5);
        let dropper = thread::spawn(move || drop((shared, b)));
        // The shared node stays reachable through `a` whatever the dropper
        // has done so far.
        a.backward();
        dropper.join().unwrap();
        assert_eq!(w.grad().unwrap().to_vec(), vec![2.0]);
        assert_eq!(
            tape.len(),
            3,
            "a, its mul and the shared exp are still reachable"
        );
        drop(a);
        assert_eq!(tape.len(), 0);
    });
}

/// Model g: an optimizer-style in-place update races with a forward and
/// backward on another thread. The forward sees the old or the new values,
/// never a mix, and the gradient uses what the forward saw.
#[test]
fn in_place_update_racing_a_forward_is_never_torn() {
    check("g: update during forward", || {
        let w = leaf(&[1.0, 1.0]);
        let x = leaf(&[2.0, 3.0]);
        let updater = {
            let w = w.clone();
            thread::spawn(move || w.with_data_mut(|mut v| v.fill(10.0)))
        };
        let y = &w * &x;
        let seen = y.to_vec();
        assert!(
            seen == [2.0, 3.0] || seen == [20.0, 30.0],
            "torn read {seen:?}"
        );
        y.sum().backward();
        updater.join().unwrap();
        // d(w·x)/dx = w as the forward saw it.
        let w_seen = seen[0] / 2.0;
        assert_eq!(x.grad().unwrap().to_vec(), vec![w_seen, w_seen]);
        assert_eq!(w.to_vec(), vec![10.0, 10.0]);
    });
}
