//! Online training: a background thread loops over the digits training
//! split with AdamW (Adam with decoupled weight decay) until shutdown,
//! publishing a version every `publish_every` steps.
//!
//! # Background priority
//!
//! On a small machine the trainer competes with serving for cores. With
//! [`TrainPriority::Idle`], the default, the thread moves itself to Linux's
//! `SCHED_IDLE` policy: it runs only on a core nothing else wants, and a
//! serving thread that wakes takes the core from it at once, instead of
//! waiting for the trainer's time slice to end. It also lowers its nice
//! value to 19 (`setpriority` on its thread id), which is all
//! [`TrainPriority::Low`] does, and what remains where `SCHED_IDLE` is
//! refused: under load a nice-19 thread still gets a few percent of a core,
//! and keeps it for a whole slice once it runs. Threads it starts, such as
//! the data loader's, inherit both. Under full serving load `SCHED_IDLE`
//! trains at about a third of the nice-19 rate and serves 9-20% more
//! requests (BENCHMARKS.md); when serving is idle both train at full
//! speed. On top of either, a duty cycle can cap the trainer's share of one
//! core even when the machine is idle (`duty` below 1: it sleeps after
//! each step in proportion to the step's time).
//!
//! # Publishing at normal priority
//!
//! The trainer forks and evaluates each new version itself, but hands it to
//! a publisher thread of normal priority, which makes it current. Loading
//! a [`Published`] version takes no lock, so predictions never wait for a
//! publisher; the server's own record of the current version's details
//! (`GET /v1/model`) is updated under a short lock, which a nice-19 thread
//! could hold for the many milliseconds the scheduler leaves it waiting
//! under load. (Before `Published` became lock-free for readers, that
//! priority inversion reached the predictions themselves: a p99 of
//! 30-45 ms at 40,000 requests/s.)
//!
//! [`Published`]: netcl::nn::Published

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use netcl::autograd::current_tape;
use netcl::nn::{Mlp, Module};
use netcl::optim::{AdamConfig, AdamW};
use netcl::train::Trainer;

use crate::metrics::Metrics;
use crate::model::{BATCH_SIZE, Digits, ModelState, VersionInfo, accuracy};

/// The learning rate of online training: lower than the start-up's, as
/// the model it starts from is already trained.
const ONLINE_LR: f32 = 5e-4;

/// AdamW's decoupled weight decay: training never stops, and the training
/// split is separable, so without a decay the weights grow for as long as
/// it runs. With 0.1, held-out accuracy after a minute of training was
/// 0.980-0.983 against 0.972 without (and 0.972 with 0.01).
const ONLINE_WEIGHT_DECAY: f32 = 0.1;

/// The nice value of the training thread.
pub const TRAINING_NICE: i32 = 19;

/// How the training thread yields the machine to serving.
///
/// ```
/// use netcl_serve::trainer::TrainPriority;
///
/// assert_eq!(TrainPriority::default(), TrainPriority::Idle);
/// assert_eq!("low".parse::<TrainPriority>(), Ok(TrainPriority::Low));
/// assert!("high".parse::<TrainPriority>().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum TrainPriority {
    /// Linux's `SCHED_IDLE` policy, plus nice 19: the trainer runs only on
    /// cores nothing else wants and gives them up the moment a serving
    /// thread wakes. Under a full serving load it trains slowest. Elsewhere
    /// than Linux, or where the policy is refused, the same as
    /// [`TrainPriority::Low`].
    #[default]
    Idle,
    /// Nice 19 only (the behaviour before [`TrainPriority::Idle`]): the
    /// trainer keeps a few percent of a loaded core.
    Low,
}

impl std::str::FromStr for TrainPriority {
    type Err = String;

    /// `idle` or `low`.
    fn from_str(s: &str) -> Result<TrainPriority, String> {
        match s {
            "idle" => Ok(TrainPriority::Idle),
            "low" => Ok(TrainPriority::Low),
            _ => Err(format!("expected idle or low, got {s:?}")),
        }
    }
}

impl std::fmt::Display for TrainPriority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TrainPriority::Idle => "idle",
            TrainPriority::Low => "low",
        })
    }
}

/// How the trainer runs.
#[derive(Debug, Clone, Copy)]
pub struct TrainSettings {
    /// Steps between two published versions.
    pub publish_every: u64,
    /// The fraction of one core the trainer may use (1: no cap).
    pub duty: f64,
    /// Training steps behind the starting model.
    pub start_steps: u64,
    /// The shuffle seed.
    pub seed: u64,
}

/// A version ready to publish.
type Ready = (Box<dyn Module>, VersionInfo);

/// Starts the training thread on a fork of `start`, and the thread that
/// publishes what it trains. Both stop when `stop` is set.
pub(crate) fn spawn(
    start: &Mlp,
    digits: Digits,
    model: &Arc<ModelState>,
    metrics: &Arc<Metrics>,
    settings: TrainSettings,
    priority: TrainPriority,
    stop: &Arc<AtomicBool>,
) -> std::io::Result<Vec<JoinHandle<()>>> {
    let (ready, to_publish) = crossbeam_channel::unbounded::<Ready>();
    let publisher = {
        let model = Arc::clone(model);
        std::thread::Builder::new()
            .name("netcl-publish".to_string())
            .spawn(move || {
                // Ends when the trainer drops its sender.
                for (version, info) in to_publish {
                    model.publish(version, info);
                }
            })?
    };
    let live = start.clone();
    let (metrics, stop) = (Arc::clone(metrics), Arc::clone(stop));
    let trainer = std::thread::Builder::new()
        .name("netcl-train".to_string())
        .spawn(move || {
            lower_priority(priority);
            if let Err(err) = run(live, digits, &ready, &metrics, settings, &stop) {
                tracing::error!("training stopped: {err}");
            }
        })?;
    Ok(vec![trainer, publisher])
}

/// Moves this thread to `SCHED_IDLE` (with [`TrainPriority::Idle`]) and
/// lowers its nice value to [`TRAINING_NICE`].
fn lower_priority(priority: TrainPriority) {
    #[cfg(not(target_os = "linux"))]
    let _ = priority;
    #[cfg(target_os = "linux")]
    {
        if priority == TrainPriority::Idle {
            use thread_priority::unix::{
                NormalThreadSchedulePolicy, ThreadSchedulePolicy, set_thread_priority_and_policy,
                thread_native_id,
            };
            // This also sets the nice value (to 0 for this policy): the nice
            // value is set after it.
            match set_thread_priority_and_policy(
                thread_native_id(),
                thread_priority::ThreadPriority::Min,
                ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Idle),
            ) {
                Ok(()) => tracing::debug!("training thread at SCHED_IDLE"),
                Err(err) => tracing::warn!(
                    "cannot move the training thread to SCHED_IDLE ({err:?}): it runs at nice \
                     {TRAINING_NICE} only"
                ),
            }
        }
        let tid = rustix::thread::gettid();
        match rustix::process::setpriority_process(Some(tid), TRAINING_NICE) {
            Ok(()) => tracing::debug!("training thread at nice {TRAINING_NICE}"),
            Err(err) => tracing::warn!("cannot lower the training thread's priority: {err}"),
        }
    }
}

/// The nice value of the calling thread (Linux), for tests.
#[cfg(target_os = "linux")]
pub fn current_thread_nice() -> std::io::Result<i32> {
    let tid = rustix::thread::gettid();
    Ok(rustix::process::getpriority_process(Some(tid))?)
}

fn run(
    live: Mlp,
    digits: Digits,
    ready: &crossbeam_channel::Sender<Ready>,
    metrics: &Arc<Metrics>,
    settings: TrainSettings,
    stop: &Arc<AtomicBool>,
) -> netcl::Result<()> {
    for p in live.parameters() {
        // A loaded checkpoint's parameters are trainable leaves already;
        // make sure.
        let _ = p.try_requires_grad_(true);
    }
    metrics.set_training_tape(current_tape());
    let test = digits.test.clone();
    let optimizer = AdamW::new(
        live.parameters(),
        AdamConfig::new(ONLINE_LR).weight_decay(ONLINE_WEIGHT_DECAY),
    );
    let publish_every = settings.publish_every.max(1);
    let duty = settings.duty.clamp(0.01, 1.0);
    let mut window = (Instant::now(), 0_u64);
    let mut step_started = Instant::now();
    let hook_ready = ready.clone();
    let hook_metrics = Arc::clone(metrics);
    let hook_stop = Arc::clone(stop);
    let trainer = Trainer::new(live, optimizer, digits.train)
        .batch_size(BATCH_SIZE)
        .seed(settings.seed)
        // It trains until shutdown, one `fit(1)` per epoch: a full history
        // would grow by an epoch's metrics every few dozen steps.
        .history_limit(1)
        .progress(false);
    // Shutdown ends training after the current step, not the epoch.
    let stop_training = trainer.stop_handle();
    let mut trainer = trainer.on_step(move |info, live| {
        if hook_stop.load(Ordering::Relaxed) {
            stop_training.stop();
            return;
        }
        let steps = info.step;
        // Steps per second over windows of about a second.
        let elapsed = window.0.elapsed();
        if elapsed >= Duration::from_secs(1) {
            let rate = (steps - window.1) as f64 / elapsed.as_secs_f64();
            hook_metrics.set_training(steps, rate);
            window = (Instant::now(), steps);
        } else {
            hook_metrics.set_training(steps, hook_metrics.steps_per_second());
        }
        if steps % publish_every == 0 && !hook_stop.load(Ordering::Relaxed) {
            prepare(
                live,
                &test,
                &hook_ready,
                settings.start_steps + steps,
                info.loss,
            );
        }
        if duty < 1.0 {
            let busy = step_started.elapsed();
            std::thread::sleep(busy.mul_f64((1.0 - duty) / duty));
        }
        step_started = Instant::now();
    });
    while !stop.load(Ordering::Relaxed) {
        trainer.fit(1)?;
    }
    Ok(())
}

/// Forks `live`, measures the fork's held-out accuracy, and sends both to
/// the publisher.
fn prepare(
    live: &Mlp,
    test: &netcl::data::TensorDataset,
    ready: &crossbeam_channel::Sender<Ready>,
    steps: u64,
    loss: f32,
) {
    let fork = match live.try_fork() {
        Ok(fork) => fork,
        Err(err) => {
            tracing::error!("cannot fork the model to publish it: {err}");
            return;
        }
    };
    let accuracy = match accuracy(&*fork, test) {
        Ok(accuracy) => accuracy,
        Err(err) => {
            tracing::error!("cannot evaluate the model: {err}");
            return;
        }
    };
    let info = VersionInfo {
        version: 0,
        training_steps: steps,
        last_loss: Some(loss),
        accuracy,
        source: "training",
    };
    // Fails only once the publisher is gone, at shutdown.
    let _ = ready.send((fork, info));
}
