//! Models l and m: a stateful layer's buffers (`nn::BufferState`) updated
//! by two training threads at once, and frozen by a publisher.

#![cfg(loom)]

use loom::sync::Arc;
use loom::thread;
use loom_tests::check;
use netcl::Tensor;
use netcl::nn::{BufferState, Buffers};

/// A count and a sum that every update raises together by one: any
/// snapshot with `sum != count` is a torn state.
fn tally() -> BufferState {
    BufferState::new(
        Buffers::new([("sum", Tensor::zeros(&[2])), ("count", Tensor::scalar(0.0))]).unwrap(),
    )
}

fn add_one(state: &BufferState) -> bool {
    state
        .update(|old| {
            Ok(vec![
                old.get("sum").unwrap() + 1.0,
                old.get("count").unwrap() + 1.0,
            ])
        })
        .unwrap()
}

/// (count, sum) of one snapshot, checked whole.
fn read(state: &BufferState) -> f32 {
    let snapshot = state.load();
    let count = snapshot.get("count").unwrap().item();
    let sum = snapshot.get("sum").unwrap().to_vec();
    assert!(
        sum.iter().all(|&v| v == count),
        "torn state: {sum:?} vs {count}"
    );
    count
}

/// Model l: two threads update one state at once (compare-and-swap with
/// retry) while this one reads it between its own update: every snapshot
/// is whole, counts only move forward, and neither update is lost.
#[test]
fn concurrent_buffer_updates_lose_nothing_and_reads_are_whole() {
    check("l: concurrent buffer updates", || {
        let state = Arc::new(tally());
        let other = {
            let state = state.clone();
            thread::spawn(move || assert!(add_one(&state)))
        };
        let first = read(&state);
        assert!(add_one(&state));
        let second = read(&state);
        assert!(second >= first.max(1.0) && second <= 2.0);
        other.join().unwrap();
        assert_eq!(read(&state), 2.0, "an update was lost");
    });
}

/// Model m: a publisher freezes the state (a published version's) while a
/// trainer updates it: the update lands before the freeze or not at all,
/// and once `freeze` has returned the state never changes.
#[test]
fn an_update_racing_a_freeze_lands_before_it_or_not_at_all() {
    check("m: update vs freeze", || {
        let state = Arc::new(tally());
        let trainer = {
            let state = state.clone();
            thread::spawn(move || add_one(&state))
        };
        state.freeze();
        let frozen = read(&state);
        let applied = trainer.join().unwrap();
        assert_eq!(read(&state), frozen, "a frozen state changed");
        assert_eq!(frozen, if applied { 1.0 } else { 0.0 });
        assert!(!add_one(&state));
    });
}
