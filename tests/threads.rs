//! Threads on real hardware: grad mode carried into rayon workers, shared
//! tapes, concurrent backward, and a mixed training/evaluation stress test.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::Instant;

use netcl::autograd::{self, GradMode, Tape, is_grad_enabled};
use netcl::parallel::{self, prelude::*};
use netcl::{Result, Tensor};
use rand::SeedableRng;
use rand::rngs::StdRng;

mod common;

/// A two-layer model on fixed data, trained by plain SGD.
struct Model {
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
}

impl Model {
    fn new(seed: u64) -> Model {
        let mut rng = StdRng::seed_from_u64(seed);
        Model {
            w1: (Tensor::randn(&[4, 8], &mut rng) * 0.5).requires_grad_(true),
            b1: Tensor::zeros(&[8]).requires_grad_(true),
            w2: (Tensor::randn(&[8, 3], &mut rng) * 0.5).requires_grad_(true),
        }
    }

    fn params(&self) -> [&Tensor; 3] {
        [&self.w1, &self.b1, &self.w2]
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        x.matmul(&self.w1).add(&self.b1).tanh().matmul(&self.w2)
    }

    fn step(&self, x: &Tensor, y: &Tensor) -> f32 {
        let loss = self.forward(x).cross_entropy(y);
        loss.backward();
        let _guard = autograd::no_grad();
        for p in self.params() {
            let grad = p.grad().unwrap().data();
            p.with_data_mut(|mut v| v.scaled_add(-0.1, &grad));
            p.zero_grad();
        }
        loss.item()
    }

    fn weights(&self) -> Vec<Vec<f32>> {
        self.params().iter().map(|p| p.to_vec()).collect()
    }
}

fn batch(seed: u64, n: usize) -> (Tensor, Tensor) {
    let mut rng = StdRng::seed_from_u64(seed);
    let x = Tensor::randn(&[n, 4], &mut rng);
    let y = Tensor::from_vec((0..n).map(|i| (i % 3) as f32).collect(), &[n]).unwrap();
    (x, y)
}

/// Waits until `flag` is set, failing the test instead of hanging.
fn wait_for(flag: &AtomicBool, what: &str) {
    common::wait_until(common::PATIENCE, what, || flag.load(Ordering::SeqCst));
}

/// 8 threads for 2,000 iterations each: four train their own model (grad
/// on, their own tapes), four evaluate a shared model under no_grad with a
/// parallel evaluation inside. Evaluation records nothing, training matches
/// the single-thread reference bit for bit, every tape ends empty. The
/// threads start together (a barrier), so they run side by side rather than
/// one after another.
#[test]
fn stress_training_and_parallel_evaluation_side_by_side() {
    const ITERATIONS: usize = 2_000;
    let (x, y) = batch(11, 16);

    // Single-thread reference run.
    let reference = {
        let model = Model::new(5);
        for _ in 0..ITERATIONS {
            model.step(&x, &y);
        }
        model.weights()
    };

    let shared = Arc::new(Model::new(9));
    let eval_batches: Arc<Vec<Tensor>> = Arc::new((0..4).map(|i| batch(100 + i, 8).0).collect());
    let started = Instant::now();
    let barrier = Barrier::new(8);
    let results: Vec<(Vec<Vec<f32>>, u64, usize)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|t| {
                let (x, y, shared, eval_batches) = (&x, &y, &shared, &eval_batches);
                let barrier = &barrier;
                s.spawn(move || {
                    let tape = autograd::current_tape();
                    barrier.wait();
                    if t % 2 == 0 {
                        let model = Model::new(5);
                        for _ in 0..ITERATIONS {
                            model.step(x, y);
                            assert_eq!(tape.len(), 0);
                        }
                        (model.weights(), tape.stats().recorded, tape.len())
                    } else {
                        let _guard = autograd::no_grad();
                        for _ in 0..ITERATIONS {
                            let outputs =
                                parallel::map(eval_batches, |batch| shared.forward(batch));
                            assert!(outputs.iter().all(|o| !o.requires_grad()));
                        }
                        (Vec::new(), tape.stats().recorded, tape.len())
                    }
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    println!(
        "stress: 8 threads x {ITERATIONS} iterations in {:.2?}",
        started.elapsed()
    );
    for (t, (weights, recorded, live)) in results.into_iter().enumerate() {
        assert_eq!(live, 0, "thread {t} left nodes on its tape");
        if t % 2 == 0 {
            assert_eq!(weights, reference, "training thread {t} diverged");
            assert_eq!(recorded, 5 * ITERATIONS as u64);
        } else {
            assert_eq!(recorded, 0, "evaluation thread {t} recorded nodes");
        }
    }
}

/// The steal: a worker blocked in `join` on behalf of a no_grad caller runs
/// a task of another caller whose mode is grad-on. With the mode carried,
/// each task sees its own caller's mode.
#[test]
fn forced_cross_mode_steal_runs_each_task_in_its_callers_mode() {
    let pool = Arc::new(
        rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap(),
    );
    let y_started = Arc::new(AtomicBool::new(false));
    let inject = Arc::new(AtomicBool::new(false));
    let b_done = Arc::new(AtomicBool::new(false));

    // Caller B: grad on, its task recorded into its own tape.
    let b_tape = Tape::new();
    let caller_b = {
        let (pool, inject, b_done, b_tape) =
            (pool.clone(), inject.clone(), b_done.clone(), b_tape.clone());
        std::thread::spawn(move || {
            let w = Tensor::ones(&[2]).requires_grad_(true);
            wait_for(&inject, "caller A to block in join");
            GradMode::current().with_tape(b_tape).run(|| {
                parallel::install(&pool, || {
                    let seen = is_grad_enabled();
                    let y = (&w * 2.0).sum();
                    b_done.store(true, Ordering::SeqCst);
                    (seen, y.requires_grad(), std::thread::current().id())
                })
            })
        })
    };

    // Caller A: no_grad; its join's second half is stolen by the other
    // worker and held there until B's task has run, so A's worker, waiting
    // in join, picks B's task from the pool's queue.
    let (a_seen, a_worker) = {
        let _guard = autograd::no_grad();
        parallel::install(&pool, || {
            let ((), ()) = parallel::join(
                || {
                    assert!(!is_grad_enabled());
                    wait_for(&y_started, "the other worker to steal");
                    inject.store(true, Ordering::SeqCst);
                },
                || {
                    assert!(!is_grad_enabled());
                    y_started.store(true, Ordering::SeqCst);
                    wait_for(&b_done, "caller B's task");
                },
            );
            (is_grad_enabled(), std::thread::current().id())
        })
    };
    let (b_seen, b_recorded, b_worker) = caller_b.join().unwrap();
    assert!(b_seen, "B's task ran in A's no_grad mode");
    assert!(b_recorded);
    assert!(!a_seen, "A's mode was not restored after running B's task");
    assert_eq!(
        b_tape.stats().recorded,
        2,
        "B's task recorded into B's tape"
    );
    // The only worker free to run B's task was A's, waiting in join.
    assert_eq!(a_worker, b_worker, "B's task was not run by A's worker");
}

/// Without netcl's helpers the same steal runs B's task in A's mode: the
/// hazard the helpers exist for.
#[test]
fn plain_rayon_task_sees_the_workers_mode_not_its_callers() {
    let pool = Arc::new(
        rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap(),
    );
    let seen = pool.install(|| {
        let _guard = autograd::no_grad();
        // A nested install from inside the pool runs inline on this worker:
        // the task of a "grad-on caller" sees this worker's no_grad.
        pool.install(is_grad_enabled)
    });
    assert!(!seen);
    let carried = pool.install(|| {
        let mode = GradMode::current(); // grad on
        let _guard = autograd::no_grad();
        mode.run(|| pool.install(is_grad_enabled))
    });
    assert!(carried);
}

/// Data-parallel forward with grad on: workers record into the caller's
/// tape concurrently; one backward on the combined loss gives the gradients
/// of the sequential run. Forward values are identical (same ops, losses
/// summed in shard order); gradients can differ only in the order leaf
/// contributions are added, so they agree to 1e-6 relative.
#[test]
fn data_parallel_forward_matches_the_sequential_gradients() {
    let model = Model::new(21);
    let shards: Vec<(Tensor, Tensor)> = (0..16).map(|i| batch(200 + i, 8)).collect();
    let shard_loss = |(x, y): &(Tensor, Tensor)| model.forward(x).cross_entropy(y);

    let sequential_loss = shards.iter().map(shard_loss).reduce(|a, b| a + b).unwrap();
    sequential_loss.backward();
    let sequential: Vec<Vec<f32>> = model
        .params()
        .iter()
        .map(|p| p.grad().unwrap().to_vec())
        .collect();
    model.params().iter().for_each(|p| p.zero_grad());

    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(4)
        .build()
        .unwrap();
    let tape = Tape::new();
    let losses: Vec<Tensor> = GradMode::current().with_tape(tape.clone()).run(|| {
        parallel::install(&pool, || {
            shards.par_iter().with_grad_mode().map(shard_loss).collect()
        })
    });
    assert!(
        losses
            .iter()
            .all(|l| Arc::ptr_eq(&l.tape().unwrap(), &tape))
    );
    let parallel_loss = losses.into_iter().reduce(|a, b| a + b).unwrap();
    assert_eq!(parallel_loss.item(), sequential_loss.item());
    parallel_loss.backward();
    for (p, want) in model.params().iter().zip(&sequential) {
        for (got, want) in p.grad().unwrap().to_vec().iter().zip(want) {
            assert!(
                (got - want).abs() <= 1e-6 * want.abs().max(1.0),
                "{got} vs {want}"
            );
        }
    }
    drop(parallel_loss);
    assert_eq!(tape.len(), 0);
}

#[test]
fn backward_shards_is_bitwise_identical_across_thread_counts() {
    let model = Model::new(33);
    let shards: Vec<(Tensor, Tensor)> = (0..16).map(|i| batch(300 + i, 8)).collect();
    let loss =
        |(x, y): &(Tensor, Tensor)| -> Result<Tensor> { model.forward(x).try_cross_entropy(y) };
    let mut runs = Vec::new();
    for threads in [1, 2, 4, 8] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let params: Vec<Tensor> = model.params().iter().map(|p| (*p).clone()).collect();
        let losses =
            parallel::install(&pool, || parallel::backward_shards(&shards, &params, loss)).unwrap();
        let grads: Vec<Vec<u32>> = params
            .iter()
            .map(|p| {
                p.grad()
                    .unwrap()
                    .to_vec()
                    .iter()
                    .map(|v| v.to_bits())
                    .collect()
            })
            .collect();
        params.iter().for_each(|p| p.zero_grad());
        runs.push((threads, losses, grads));
    }
    let (_, first_losses, first_grads) = &runs[0];
    for (threads, losses, grads) in &runs[1..] {
        assert_eq!(losses, first_losses, "{threads} threads");
        assert_eq!(grads, first_grads, "{threads} threads: gradients differ");
    }
}

#[test]
fn backward_shards_records_even_when_called_under_no_grad() {
    let w = Tensor::ones(&[2]).requires_grad_(true);
    let shards = vec![1.0f32, 2.0];
    let _guard = autograd::no_grad();
    let losses =
        parallel::backward_shards(&shards, std::slice::from_ref(&w), |s| Ok((&w * *s).sum()))
            .unwrap();
    assert_eq!(losses, vec![2.0, 4.0]);
    assert_eq!(w.grad().unwrap().to_vec(), vec![3.0, 3.0]);
    assert!(!is_grad_enabled());
}

#[test]
fn backward_shards_leaves_unused_parameters_without_grad_as_backward_does() {
    let w = Tensor::ones(&[2]).requires_grad_(true);
    // Takes no part in the loss; a zero gradient would make an optimizer
    // apply weight decay and momentum to it.
    let unused = Tensor::ones(&[3]).requires_grad_(true);
    // Not a trainable tensor at all.
    let constant = Tensor::ones(&[2]);
    let params = [w.clone(), unused.clone(), constant.clone()];
    let shards = vec![1.0f32, 2.0];
    let losses = parallel::backward_shards(&shards, &params, |s| Ok((&w * *s).sum())).unwrap();
    assert_eq!(losses, vec![2.0, 4.0]);
    assert_eq!(w.grad().unwrap().to_vec(), vec![3.0, 3.0]);
    assert!(unused.grad().is_none());
    assert!(constant.grad().is_none());

    // The same loss through backward.
    w.zero_grad();
    for s in &shards {
        (&w * *s).sum().backward();
    }
    assert_eq!(w.grad().unwrap().to_vec(), vec![3.0, 3.0]);
    assert!(unused.grad().is_none() && constant.grad().is_none());
}

#[test]
fn concurrent_backward_into_shared_parameters_loses_no_update() {
    const THREADS: usize = 8;
    const STEPS: usize = 250;
    let w = Tensor::from_vec(vec![1.0, -2.0, 3.0], &[3])
        .unwrap()
        .requires_grad_(true);
    let done = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let (w, done) = (&w, &done);
            s.spawn(move || {
                for _ in 0..STEPS {
                    // d/dw Σ (t+1)·w = t+1, an integer: sums are exact.
                    (w * (t + 1) as f32).sum().backward();
                }
                done.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    assert_eq!(done.load(Ordering::SeqCst), THREADS);
    let expected = (1..=THREADS).sum::<usize>() as f32 * STEPS as f32;
    assert_eq!(w.grad().unwrap().to_vec(), vec![expected; 3]);
}

#[test]
fn join_and_scope_carry_the_mode_and_restore_workers() {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    let w = Tensor::ones(&[2]).requires_grad_(true);
    let _guard = autograd::no_grad();
    parallel::install(&pool, || {
        let (a, b) = parallel::join(|| &w * 1.0, || &w * 2.0);
        assert!(!a.requires_grad() && !b.requires_grad());
        let count = AtomicUsize::new(0);
        parallel::scope(|s| {
            for _ in 0..16 {
                let (w, count) = (&w, &count);
                s.spawn(move |s| {
                    assert!(!(w * 3.0).requires_grad());
                    s.spawn(move |_| {
                        assert!(!is_grad_enabled());
                        count.fetch_add(1, Ordering::SeqCst);
                    });
                });
            }
        });
        assert_eq!(count.load(Ordering::SeqCst), 16);
    });
    // The pool's workers are back in their own (default) mode.
    let modes: Vec<bool> =
        pool.install(|| (0..64).into_par_iter().map(|_| is_grad_enabled()).collect());
    assert!(modes.into_iter().all(|m| m));
}

#[test]
fn with_grad_mode_covers_reduce_and_fold_closures() {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    let w = Tensor::ones(&[2]).requires_grad_(true);
    let items: Vec<f32> = (0..256).map(|i| i as f32).collect();

    // Grad on in the caller, workers forced to no_grad: every closure of the
    // chain, the reduction included, must still record.
    pool.broadcast(|_| autograd::set_grad_enabled(false));
    let loss = parallel::install(&pool, || {
        items
            .par_iter()
            .with_grad_mode()
            .fold(
                || Tensor::scalar(0.0),
                |acc, &v| {
                    assert!(is_grad_enabled());
                    acc + (&w * v).sum()
                },
            )
            .reduce(
                || Tensor::scalar(0.0),
                |a, b| {
                    assert!(is_grad_enabled());
                    a + b
                },
            )
    });
    assert!(loss.requires_grad());
    loss.backward();
    let expected: f32 = items.iter().sum();
    assert_eq!(w.grad().unwrap().to_vec(), vec![expected; 2]);
    // The workers' own (no_grad) mode was restored.
    let modes = pool.broadcast(|_| is_grad_enabled());
    assert!(modes.into_iter().all(|m| !m));
}
