//! Serving a model from many threads while another thread changes it: the
//! three rules of "Sharing a model across threads" (DESIGN.md), each tested
//! with readers and writers at once on real threads.
//!
//! - no lock is held while computing: writers make progress beside looping
//!   readers, and a writer stolen by a worker blocked inside a product never
//!   waits on that product;
//! - served weights are published versions: no forward ever mixes two;
//! - modes are per thread: evaluation never switches off another thread's
//!   Dropout, and async tasks keep their mode across `.await`.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use netcl::autograd::{self, GradMode, GradModeFutureExt};
use netcl::data::TensorDataset;
use netcl::nn::{Activation, Dropout, Linear, Mlp, Module, Published, Sequential};
use netcl::optim::{Adam, AdamConfig, Optimizer, Sgd, SgdConfig};
use netcl::train::{self, Trainer};
use netcl::{Tensor, parallel};
use rand::SeedableRng;
use rand::rngs::StdRng;

mod common;
use common::{PATIENCE, StopOnDrop, wait_until};

/// Fails the test (instead of hanging it) if `done` is not set within
/// `limit`: the liveness watchdog of the progress tests.
struct Watchdog {
    done: Arc<AtomicBool>,
    /// Milliseconds from `start` to the last [`tick`](Watchdog::tick).
    last_tick: Arc<AtomicU64>,
    start: Instant,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watchdog {
    /// Aborts the process if `limit` passes without a [`tick`](Watchdog::tick)
    /// (or, without ticks, before the watchdog is dropped).
    fn start(what: &'static str, limit: Duration) -> Watchdog {
        let done = Arc::new(AtomicBool::new(false));
        let last_tick = Arc::new(AtomicU64::new(0));
        let start = Instant::now();
        let thread = {
            let done = Arc::clone(&done);
            let last_tick = Arc::clone(&last_tick);
            std::thread::spawn(move || {
                while !done.load(Ordering::SeqCst) {
                    let since =
                        start.elapsed() - Duration::from_millis(last_tick.load(Ordering::SeqCst));
                    if since > limit {
                        eprintln!("watchdog: {what} made no progress for {limit:?}");
                        std::process::abort();
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
        };
        Watchdog {
            done,
            last_tick,
            start,
            thread: Some(thread),
        }
    }

    /// Records progress: the limit counts from here.
    fn tick(&self) {
        let now = self.start.elapsed().as_millis() as u64;
        self.last_tick.fetch_max(now, Ordering::SeqCst);
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.done.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Sets every parameter of `model` to `value`, one parameter at a time (as
/// an optimizer step does), yielding between parameters to widen the
/// window in which a reader of the live model could see a mix.
fn set_all(model: &dyn Module, value: f32) {
    for p in model.parameters() {
        p.with_data_mut(|mut v| v.fill(value));
        std::thread::yield_now();
    }
}

fn flip_model() -> Mlp {
    Mlp::new(
        &[8, 16, 16, 4],
        Activation::Relu,
        &mut StdRng::seed_from_u64(0),
    )
}

fn outputs(model: &dyn Module, x: &Tensor) -> Vec<u32> {
    let _guard = autograd::no_grad();
    let y = model.forward(x).unwrap();
    y.to_vec().iter().map(|v| v.to_bits()).collect()
}

/// The torn-read detector: a model whose parameters are all 1 or all 2
/// gives one of two known outputs; anything else mixed the two states.
struct Detector {
    x: Tensor,
    expected: [Vec<u32>; 2],
}

impl Detector {
    fn new(model: &dyn Module) -> Detector {
        let x = Tensor::full(&[2, 8], 0.1);
        set_all(model, 2.0);
        let twos = outputs(model, &x);
        set_all(model, 1.0);
        let ones = outputs(model, &x);
        assert_ne!(ones, twos);
        Detector {
            x,
            expected: [ones, twos],
        }
    }

    /// Which state an output comes from, `None` for a torn read.
    fn state(&self, output: &[u32]) -> Option<usize> {
        self.expected.iter().position(|e| e == output)
    }
}

#[test]
fn the_detector_sees_a_model_caught_between_two_states() {
    let model = flip_model();
    let detector = Detector::new(&model);
    assert_eq!(detector.state(&outputs(&model, &detector.x)), Some(0));
    // Half an update, as a forward beside an optimizer step can see it.
    model.parameters()[0].with_data_mut(|mut v| v.fill(2.0));
    assert_eq!(detector.state(&outputs(&model, &detector.x)), None);
}

/// 8 serving threads run forwards against published versions while a
/// trainer flips every parameter between 1 and 2, one at a time, and
/// publishes after each flip, for 2 s and until every reader has seen a
/// new version: no forward sees a mix of versions, and each output is the
/// one of the version it was computed with.
#[test]
fn published_versions_are_never_torn() {
    const READERS: u64 = 8;
    let model = flip_model();
    let detector = Detector::new(&model);
    let published = Published::new(&model).unwrap();
    let stop = AtomicBool::new(false);
    let (forwards, torn, publishes) = (AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0));
    let live_torn = AtomicU64::new(0);
    let live_forwards = AtomicU64::new(0);
    // Readers that have seen a version published after their first load.
    let saw_a_publish = AtomicU64::new(0);
    let mut readers_stalled = None;
    std::thread::scope(|s| {
        let _stop = StopOnDrop(&stop);
        for reader in 0..READERS {
            let (detector, published, model) = (&detector, &published, &model);
            let (stop, forwards, torn) = (&stop, &forwards, &torn);
            let (live_torn, live_forwards) = (&live_torn, &live_forwards);
            let saw_a_publish = &saw_a_publish;
            s.spawn(move || {
                let _no_grad = autograd::no_grad();
                let first = published.load().number();
                let mut last = first;
                while !stop.load(Ordering::Relaxed) {
                    let version = published.load();
                    assert!(version.number() >= last, "versions go forward");
                    if last == first && version.number() > first {
                        saw_a_publish.fetch_add(1, Ordering::Relaxed);
                    }
                    last = version.number();
                    let y = version.predict(&detector.x).unwrap();
                    let bits: Vec<u32> = y.to_vec().iter().map(|v| v.to_bits()).collect();
                    // Version 0 holds ones, and each publish flips.
                    let want = (version.number() % 2) as usize;
                    if detector.state(&bits) != Some(want) {
                        torn.fetch_add(1, Ordering::Relaxed);
                    }
                    forwards.fetch_add(1, Ordering::Relaxed);
                    // One reader in eight also reads the live model, for
                    // comparison: that one can be torn.
                    if reader == 0 {
                        let bits = outputs(model, &detector.x);
                        if detector.state(&bits).is_none() {
                            live_torn.fetch_add(1, Ordering::Relaxed);
                        }
                        live_forwards.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
        let start = Instant::now();
        let mut value = 1.0;
        // When the readers' count last moved (a liveness watchdog).
        let mut progress = (0, Instant::now());
        while start.elapsed() < Duration::from_secs(2)
            || publishes.load(Ordering::Relaxed) < 100
            || forwards.load(Ordering::Relaxed) < 10_000
            || saw_a_publish.load(Ordering::Relaxed) < READERS
        {
            value = 3.0 - value;
            set_all(&model, value);
            published.publish(&model).unwrap();
            publishes.fetch_add(1, Ordering::Relaxed);
            let n = forwards.load(Ordering::Relaxed);
            if n != progress.0 {
                progress = (n, Instant::now());
            } else if progress.1.elapsed() > PATIENCE {
                readers_stalled = Some(n);
                break;
            }
        }
    });
    let (n, torn) = (forwards.into_inner(), torn.into_inner());
    let saw_a_publish = saw_a_publish.into_inner();
    println!(
        "torn reads: {torn} of {n} forwards on published versions, {} publishes, \
         {saw_a_publish} of {READERS} readers saw a new version \
         (the live model, read beside them: {} of {} torn)",
        publishes.into_inner(),
        live_torn.into_inner(),
        live_forwards.into_inner()
    );
    assert_eq!(
        readers_stalled, None,
        "the readers made no progress for {PATIENCE:?} (forwards so far)"
    );
    assert_eq!(torn, 0);
    assert!(n >= 10_000);
    assert_eq!(saw_a_publish, READERS);
}

/// Hot reload: a checkpoint loaded into a fresh model and published is one
/// new version; readers never see it half loaded. Each reload waits until a
/// reader has run a forward on the version before, so every version is
/// read while the next one is being loaded and published.
#[test]
fn a_reloaded_checkpoint_is_published_whole() {
    let model = flip_model();
    let detector = Detector::new(&model);
    set_all(&model, 2.0);
    let twos = netcl::io::to_bytes(&model).unwrap();
    set_all(&model, 1.0);
    let published = Published::new(&model).unwrap();
    let stop = AtomicBool::new(false);
    let torn = AtomicU64::new(0);
    let forwards = AtomicU64::new(0);
    // The newest version a reader has run a forward on.
    let newest_read = AtomicU64::new(0);
    std::thread::scope(|s| {
        let _stop = StopOnDrop(&stop);
        for _ in 0..4 {
            s.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    let version = published.load();
                    let y = version.predict(&detector.x).unwrap();
                    let bits: Vec<u32> = y.to_vec().iter().map(|v| v.to_bits()).collect();
                    if detector.state(&bits) != Some((version.number() % 2) as usize) {
                        torn.fetch_add(1, Ordering::Relaxed);
                    }
                    forwards.fetch_add(1, Ordering::Relaxed);
                    newest_read.fetch_max(version.number(), Ordering::Relaxed);
                }
            });
        }
        for round in 0..50 {
            wait_until(PATIENCE, "a reader to run a forward", || {
                newest_read.load(Ordering::Relaxed) == published.version()
            });
            let reloaded = Mlp::zeros(&[8, 16, 16, 4], Activation::Relu).unwrap();
            let bytes = if round % 2 == 0 {
                twos.clone()
            } else {
                netcl::io::to_bytes(&model).unwrap()
            };
            netcl::io::load_bytes(&reloaded, &bytes).unwrap();
            published.publish_model(Box::new(reloaded));
        }
    });
    let (forwards, torn) = (forwards.into_inner(), torn.into_inner());
    println!("torn reads: {torn} of {forwards} forwards beside 50 reloads");
    assert_eq!(published.version(), 50);
    assert_eq!(torn, 0);
}

/// The shape of a matmul big enough (2^24 multiply-adds or more) to be
/// split across the pool's workers.
fn big_operands() -> (Tensor, Tensor) {
    let mut rng = StdRng::seed_from_u64(1);
    (
        Tensor::rand(&[64, 512], &mut rng),
        Tensor::rand(&[512, 512], &mut rng),
    )
}

/// 4 threads loop large products reading `w` while another thread makes 20
/// updates of `w`: every update completes, and none waits for the readers'
/// computations (a watchdog fails the test if one write waits 10 s). Each
/// write waits until the readers have completed a product since the one
/// before, so the writes really are interleaved with the products.
#[test]
fn writers_make_progress_beside_looping_readers() {
    let (x, w) = big_operands();
    let stop = AtomicBool::new(false);
    let products = AtomicU64::new(0);
    let mut waits = Vec::new();
    std::thread::scope(|s| {
        let _stop = StopOnDrop(&stop);
        for _ in 0..4 {
            s.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    let y = x.matmul(&w);
                    assert_eq!(y.shape(), &[64, 512]);
                    products.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        // Let the readers get going.
        wait_until(PATIENCE, "the readers' first products", || {
            products.load(Ordering::Relaxed) >= 4
        });
        for i in 0..20 {
            let before = products.load(Ordering::Relaxed);
            wait_until(PATIENCE, "the readers to complete a product", || {
                products.load(Ordering::Relaxed) > before
            });
            let _watchdog = Watchdog::start(
                "a write of w beside looping products",
                Duration::from_secs(10),
            );
            let start = Instant::now();
            w.with_data_mut(|mut v| v.fill(i as f32));
            waits.push(start.elapsed());
        }
    });
    assert_eq!(waits.len(), 20);
    assert!(w.to_vec().iter().all(|&v| v == 19.0));
    let worst = waits.iter().max().unwrap();
    let mean = waits.iter().sum::<Duration>() / waits.len() as u32;
    println!(
        "writer beside 4 looping readers: 20 of 20 writes, mean wait {mean:?}, worst {worst:?} ({} products meanwhile)",
        products.into_inner()
    );
}

/// The deadlock of a lock held across a parallel product: a worker blocked
/// in the product's `join` steals a job that writes the product's operand.
/// Two threads share a 2-worker pool, one looping products on `w`, the
/// other updating `w`, in each form a product or an update can take. With no
/// lock held while computing, 100 rounds of each complete.
#[test]
fn a_writer_stolen_by_a_worker_inside_a_product_never_waits_for_it() {
    let pool = parallel::rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    let (x, w) = big_operands();
    let bias = Tensor::zeros(&[512]);
    type Read<'a> = Box<dyn Fn() -> Vec<usize> + Sync + 'a>;
    let readers: Vec<(&str, Read<'_>)> = vec![
        ("matmul", Box::new(|| x.matmul(&w).shape().to_vec())),
        (
            "linear",
            Box::new(|| x.linear(&w, Some(&bias)).shape().to_vec()),
        ),
        (
            "parallel::map",
            Box::new(|| {
                parallel::map(&[0, 1], |_| x.matmul(&w))
                    .iter()
                    .map(|y| y.numel())
                    .collect()
            }),
        ),
        (
            "parallel::join",
            Box::new(|| {
                let (a, b) = parallel::join(|| x.matmul(&w), || x.matmul(&w));
                vec![a.numel(), b.numel()]
            }),
        ),
    ];
    for (form, read) in &readers {
        // Fails the test if any write (or product) takes over 10 s.
        let watchdog = Watchdog::start(
            "the stolen-writer deadlock scenario",
            Duration::from_secs(10),
        );
        let rounds = 100;
        let writes = AtomicUsize::new(0);
        let worst = Mutex::new(Duration::ZERO);
        std::thread::scope(|s| {
            s.spawn(|| {
                for _ in 0..rounds {
                    assert!(!parallel::install(&pool, read).is_empty());
                    watchdog.tick();
                }
            });
            s.spawn(|| {
                for i in 0..rounds {
                    let started = Instant::now();
                    parallel::install(&pool, || {
                        // A job of the pool, as a stolen optimizer step would be.
                        parallel::join(
                            || w.with_data_mut(|mut v| v[[0, 0]] = i as f32),
                            || writes.fetch_add(1, Ordering::Relaxed),
                        )
                    });
                    let waited = started.elapsed();
                    let mut worst = worst.lock().unwrap();
                    *worst = (*worst).max(waited);
                    watchdog.tick();
                }
            });
        });
        assert_eq!(writes.into_inner(), rounds, "{form}");
        assert_eq!(w.to_vec()[0], (rounds - 1) as f32);
        println!(
            "stolen-writer scenario, {form}: {rounds} writes beside {rounds} products, worst write {:?}",
            worst.into_inner().unwrap()
        );
    }
}

#[test]
#[should_panic(expected = "already updating this tensor")]
fn a_write_inside_its_own_write_panics_instead_of_hanging() {
    let w = Tensor::ones(&[2]);
    w.with_data_mut(|_| w.with_data_mut(|mut v| v.fill(0.0)));
}

#[test]
fn a_write_sees_the_old_values_from_inside_and_a_panic_leaves_them() {
    let w = Tensor::ones(&[3]);
    w.with_data_mut(|mut v| {
        v.fill(5.0);
        // Readers (this thread included) see the old values until the
        // update completes.
        assert_eq!(w.to_vec(), vec![1.0; 3]);
    });
    assert_eq!(w.to_vec(), vec![5.0; 3]);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        w.with_data_mut(|mut v| {
            v.fill(7.0);
            panic!("update failed half way");
        })
    }));
    assert!(result.is_err());
    assert_eq!(w.to_vec(), vec![5.0; 3], "a failed update changes nothing");
}

fn digits() -> (TensorDataset, TensorDataset) {
    let digits =
        netcl::data::load_digits(concat!(env!("CARGO_MANIFEST_DIR"), "/data/digits.csv")).unwrap();
    let digits = TensorDataset::new(digits.inputs() / 16.0, digits.targets().clone()).unwrap();
    digits.split(0.8, 42).unwrap()
}

/// The trainer's step time alone and with 8 threads serving published
/// versions of the same model (a benchmark figure, printed, not asserted:
/// the machine is shared and a debug build).
#[test]
fn trainer_step_time_alone_and_beside_8_serving_threads() {
    let (train, _) = digits();
    let x = train.inputs().clone();
    let n = 32;
    let batch_x = Tensor::from_array(x.data().slice(ndarray::s![..n, ..]).to_owned());
    let batch_y = Tensor::from_array(train.targets().data().slice(ndarray::s![..n]).to_owned());
    let model = Mlp::new(
        &[64, 128, 10],
        Activation::Relu,
        &mut StdRng::seed_from_u64(3),
    );
    let mut adam = Adam::new(model.parameters(), AdamConfig::new(1e-3));
    let published = Published::new(&model).unwrap();
    let mut step = |publish: bool| {
        let start = Instant::now();
        let loss = model.forward(&batch_x).unwrap().cross_entropy(&batch_y);
        adam.zero_grad();
        loss.backward();
        adam.step();
        if publish {
            published.publish(&model).unwrap();
        }
        start.elapsed()
    };
    let steps = 100;
    for _ in 0..10 {
        step(true);
    }
    let alone: Duration = (0..steps).map(|_| step(true)).sum::<Duration>() / steps;
    let stop = AtomicBool::new(false);
    let served = AtomicU64::new(0);
    let beside = std::thread::scope(|s| {
        let _stop = StopOnDrop(&stop);
        for _ in 0..8 {
            s.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    let y = published.load().predict(&batch_x).unwrap();
                    assert_eq!(y.shape(), &[n, 10]);
                    served.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        wait_until(PATIENCE, "the serving threads' first forward", || {
            served.load(Ordering::Relaxed) > 0
        });
        (0..steps).map(|_| step(true)).sum::<Duration>() / steps
    });
    println!(
        "trainer step (64-128-10, batch 32, Adam, publish every step): {alone:?} alone, \
         {beside:?} beside 8 serving threads ({} forwards served meanwhile)",
        served.into_inner()
    );

    // The optimizer step alone, beside 8 threads looping forwards on the
    // *live* model (the writer-starvation scenario): it waits for no
    // forward, so its time is its own work plus its share of the cores.
    let loss = model.forward(&batch_x).unwrap().cross_entropy(&batch_y);
    loss.backward();
    let time_steps = |adam: &mut Adam| {
        let times: Vec<Duration> = (0..50)
            .map(|_| {
                let start = Instant::now();
                adam.step();
                start.elapsed()
            })
            .collect();
        (
            times.iter().sum::<Duration>() / 50,
            *times.iter().max().unwrap(),
        )
    };
    let (alone_mean, alone_worst) = time_steps(&mut adam);
    let stop = AtomicBool::new(false);
    let looped = AtomicU64::new(0);
    let (beside_mean, beside_worst) = std::thread::scope(|s| {
        let _stop = StopOnDrop(&stop);
        for _ in 0..8 {
            s.spawn(|| {
                let _no_grad = autograd::no_grad();
                while !stop.load(Ordering::Relaxed) {
                    model.forward(&batch_x).unwrap();
                    looped.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        wait_until(PATIENCE, "the looping threads' first forward", || {
            looped.load(Ordering::Relaxed) > 0
        });
        time_steps(&mut adam)
    });
    println!(
        "optimizer step: mean {alone_mean:?}, worst {alone_worst:?} alone; \
         mean {beside_mean:?}, worst {beside_worst:?} beside 8 threads looping forwards on the live model"
    );
}

/// A model with Dropout trains on one thread (with a learning rate of 0, so
/// its weights stay put) while four threads evaluate it at once, each twice:
/// every evaluation equals the sequential one (Dropout off for them, and
/// nothing the trainer does leaks in), and the trainer's forwards drop. The
/// evaluations start once the trainer has made a step, and the trainer goes
/// on until they are all done, so they overlap whatever the scheduler does.
#[test]
fn concurrent_evaluations_of_a_training_model_match_a_sequential_one() {
    let (train_set, test_set) = digits();
    let mut rng = StdRng::seed_from_u64(5);
    let model = Arc::new(
        Sequential::new()
            .with(Linear::new(64, 32, &mut rng))
            .with(Dropout::new(0.5, 9))
            .with(Linear::new(32, 10, &mut rng)),
    );
    let sequential = train::evaluate(&*model, &test_set, 64).unwrap();
    let dropped = Arc::new(Mutex::new(Vec::new()));
    let optimizer = Sgd::new(model.parameters(), SgdConfig::new(0.0));
    let mut trainer = Trainer::new(Arc::clone(&model), optimizer, train_set.clone())
        .batch_size(64)
        .progress(false)
        .on_step({
            let dropped = Arc::clone(&dropped);
            let x = test_set.inputs().clone();
            move |_, model| {
                // The trainer's thread is in training mode: the same input
                // gives a different output from the evaluation one.
                let _no_grad = autograd::no_grad();
                let y = model.forward(&x).unwrap().to_vec();
                dropped.lock().unwrap().push(y);
            }
        });
    let done = AtomicBool::new(false);
    let results = std::thread::scope(|s| {
        let _done = StopOnDrop(&done);
        let evaluators: Vec<_> = (0..4)
            .map(|_| {
                s.spawn(|| {
                    wait_until(PATIENCE, "the trainer's first step", || {
                        !dropped.lock().unwrap().is_empty()
                    });
                    (0..2)
                        .map(|_| train::evaluate(&*model, &test_set, 64).unwrap())
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        s.spawn(|| {
            while !done.load(Ordering::Relaxed) {
                trainer.fit(1).unwrap();
            }
        });
        evaluators
            .into_iter()
            .flat_map(|e| e.join().unwrap())
            .collect::<Vec<_>>()
    });
    for result in results {
        assert_eq!(result, sequential);
    }
    let eval_output = {
        let _no_grad = autograd::no_grad();
        let _eval = autograd::eval_mode();
        model.forward(test_set.inputs()).unwrap().to_vec()
    };
    let dropped = dropped.lock().unwrap();
    assert!(!dropped.is_empty());
    assert!(
        dropped.iter().all(|y| *y != eval_output),
        "Dropout was active while training"
    );
    assert!(model.is_training(), "nobody changed the model's own flag");
}

/// Tasks on a 4-worker multi-threaded runtime, each in its own mode, await
/// between ops: each resumes in its own mode on whichever worker polls it,
/// and the workers' own modes are untouched afterwards.
#[test]
fn async_tasks_keep_their_mode_across_awaits_on_any_worker() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_time()
        .build()
        .unwrap();
    let w = Tensor::ones(&[4, 4]).requires_grad_(true);
    let migrations = Arc::new(AtomicUsize::new(0));
    runtime.block_on(async {
        let tasks: Vec<_> = (0..64)
            .map(|i| {
                let w = w.clone();
                let migrations = Arc::clone(&migrations);
                let (grad, training) = (i % 2 == 0, Some(i % 4 < 2));
                let mode = GradMode::current()
                    .with_enabled(grad)
                    .with_training(training);
                tokio::spawn(
                    async move {
                        let mut thread = std::thread::current().id();
                        for round in 0..20 {
                            let y = (&w * 2.0).sum();
                            assert_eq!(y.requires_grad(), grad, "task {i}, round {round}");
                            assert_eq!(autograd::training_mode(), training);
                            if round % 3 == 0 {
                                tokio::time::sleep(Duration::from_micros(50)).await;
                            } else {
                                tokio::task::yield_now().await;
                            }
                            let now = std::thread::current().id();
                            if now != thread {
                                migrations.fetch_add(1, Ordering::Relaxed);
                                thread = now;
                            }
                        }
                    }
                    .with_grad_mode(mode),
                )
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
    });
    // Every worker is back in its own (default) mode.
    let modes = runtime.block_on(async {
        let checks: Vec<_> = (0..16)
            .map(|_| {
                tokio::spawn(async {
                    tokio::task::yield_now().await;
                    (autograd::is_grad_enabled(), autograd::training_mode())
                })
            })
            .collect();
        let mut modes = Vec::new();
        for check in checks {
            modes.push(check.await.unwrap());
        }
        modes
    });
    assert!(modes.iter().all(|&m| m == (true, None)), "{modes:?}");
    println!(
        "async tasks resumed on another worker {} times",
        migrations.load(Ordering::Relaxed)
    );
}

/// A mode the task changes itself between awaits is kept for its next poll.
#[test]
fn an_async_task_that_changes_its_own_mode_keeps_it_across_awaits() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    let task = async {
        let before = autograd::is_grad_enabled();
        autograd::set_grad_enabled(false);
        tokio::task::yield_now().await;
        (before, autograd::is_grad_enabled())
    }
    .in_current_grad_mode();
    let result = runtime.block_on(async { tokio::spawn(task).await.unwrap() });
    assert_eq!(result, (true, false));
}

#[test]
fn parallel_scope_spawns_run_in_the_mode_at_spawn_time() {
    let w = Tensor::ones(&[2]).requires_grad_(true);
    let seen = Mutex::new(Vec::new());
    parallel::scope(|s| {
        s.spawn(|_| {
            seen.lock()
                .unwrap()
                .push(("grad", (&w * 2.0).requires_grad()))
        });
        let _no_grad = autograd::no_grad();
        let _eval = autograd::eval_mode();
        s.spawn(|inner| {
            seen.lock()
                .unwrap()
                .push(("no_grad", (&w * 2.0).requires_grad()));
            assert_eq!(autograd::training_mode(), Some(false));
            // A nested spawn inherits the spawning task's mode.
            inner.spawn(|_| {
                seen.lock()
                    .unwrap()
                    .push(("nested", (&w * 2.0).requires_grad()))
            });
        });
    });
    let mut seen = seen.into_inner().unwrap();
    seen.sort();
    assert_eq!(
        seen,
        vec![("grad", true), ("nested", false), ("no_grad", false)]
    );
}

#[test]
fn forks_are_independent_and_cost_no_copy() {
    let model = flip_model();
    let fork = model.clone();
    // (That the fork shares the values' storage until one side writes is
    // checked by the unit tests of `Tensor::fork`.)
    set_all(&model, 3.0);
    assert!(
        fork.parameters()
            .iter()
            .all(|p| p.to_vec().iter().all(|&v| v != 3.0))
    );
    // A custom module without try_fork says so.
    #[derive(Debug)]
    struct Opaque;
    impl Module for Opaque {
        fn forward(&self, input: &Tensor) -> netcl::Result<Tensor> {
            Ok(input.clone())
        }
        fn named_parameters(&self) -> Vec<(String, Tensor)> {
            Vec::new()
        }
        fn set_training(&self, _: bool) {}
        fn is_training(&self) -> bool {
            true
        }
    }
    let chain = Sequential::new().with(ReLU_layer()).with(Opaque);
    let err = Published::new(&chain).unwrap_err();
    assert!(
        err.to_string().contains("layer 1") && err.to_string().contains("Opaque"),
        "{err}"
    );
}

#[allow(non_snake_case)]
fn ReLU_layer() -> netcl::nn::ReLU {
    netcl::nn::ReLU::new()
}

#[test]
fn a_published_version_records_nothing_and_never_drops() {
    let mut rng = StdRng::seed_from_u64(2);
    let model = Sequential::new()
        .with(Linear::new(4, 8, &mut rng))
        .with(Dropout::new(0.5, 1));
    let published = Published::new(&model).unwrap();
    let tape = autograd::current_tape();
    let before = tape.stats().recorded;
    let x = Tensor::ones(&[3, 4]);
    let version = published.load();
    // Grad on and no mode set on this thread: still nothing recorded, and
    // the version's own flag (evaluation) keeps Dropout off.
    let y = version.forward(&x).unwrap();
    assert!(!y.requires_grad());
    assert_eq!(y.to_vec(), version.forward(&x).unwrap().to_vec());
    assert_eq!(tape.stats().recorded, before);
    assert!(
        model.is_training(),
        "publishing does not touch the live model"
    );
}
