//! Model m: netcl-serve's doorbell (`serve/src/batcher.rs`), the protocol by
//! which a model thread waits for jobs.
//!
//! The model thread never blocks in the queue: it takes what is there and
//! parks when it finds nothing; whoever queues jobs unparks it after them,
//! once per job or once for a burst (a connection thread rings once after
//! all the requests it has just read). The real thread parks with a 50 ms
//! timeout, which would hide a lost wake-up as 50 ms of latency; here it
//! parks without one, so a lost wake-up is a deadlock loom reports.
//!
//! The queue stands for the bounded crossbeam channel (a lock here: what
//! matters is that a job pushed before the ring is seen by a `try_recv`
//! after the park returns, which both give).
//!
//! The model can fail: with a producer that rings before it queues, loom
//! reports `deadlock` (the ring's token spent on an empty queue, the job
//! then left with the model thread parked). That variant is not kept as a
//! `should_panic` test because loom aborts the process on a deadlock.

#![cfg(loom)]

use std::collections::VecDeque;

use loom::sync::{Arc, Mutex};
use loom::thread;
use loom_tests::check_bounded;

/// Model m: two producers, one ringing after each of its two jobs, the
/// other once after both (a burst), and the model thread taking jobs as
/// `batcher::run` does. Every job is taken, none twice, with no timeout to
/// fall back on.
#[test]
fn the_doorbell_loses_no_wake_up() {
    check_bounded("m: doorbell", Some(3), || {
        let queue = Arc::new(Mutex::new(VecDeque::new()));
        let model_thread = {
            let queue = queue.clone();
            thread::spawn(move || {
                let mut taken = Vec::new();
                while taken.len() < 4 {
                    let job = queue.lock().unwrap().pop_front();
                    match job {
                        Some(job) => taken.push(job),
                        // A ring after the check above leaves a token:
                        // the park returns at once.
                        None => thread::park(),
                    }
                }
                taken
            })
        };
        let bell = model_thread.thread().clone();
        let one_by_one = {
            let (queue, bell) = (queue.clone(), bell.clone());
            thread::spawn(move || {
                for job in [1, 2] {
                    queue.lock().unwrap().push_back(job);
                    bell.unpark();
                }
            })
        };
        // A burst: both jobs queued, then one ring.
        for job in [3, 4] {
            queue.lock().unwrap().push_back(job);
        }
        bell.unpark();
        one_by_one.join().unwrap();
        let mut taken = model_thread.join().unwrap();
        taken.sort_unstable();
        assert_eq!(taken, [1, 2, 3, 4]);
    });
}
