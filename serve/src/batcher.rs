//! Micro-batching: requests wait in a bounded queue; model threads gather
//! what is queued into one forward against one published version.
//!
//! # Design
//!
//! A handler on the async runtime parses its rows, then
//! [`try_send`](crossbeam_channel::Sender::try_send)s a [`Job`] into a
//! bounded channel, answering 503 at once when it is full, and awaits a
//! oneshot reply. The forwards run on dedicated model threads, never on the
//! runtime's threads. A model thread blocks for a first job, then takes
//! whatever else is queued, up to `max_batch` rows, waiting at most
//! `max_wait` for more; it loads the current version once, runs one
//! forward of all the rows under `no_grad` and evaluation mode on its own
//! serving tape, and answers every job from that one result. So every row
//! of a response, and of a batch, comes from one version; and a job is
//! dequeued only after its request arrived, so the version a connection
//! sees never goes back.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, TryRecvError};
use netcl::Tensor;
use netcl::autograd::{GradMode, Tape};
use tokio::sync::oneshot;

use crate::metrics::Metrics;
use crate::model::{CLASSES, FEATURES, ModelState, classes_of, scale};

/// One request's rows, waiting for the model.
#[derive(Debug)]
pub struct Job {
    /// The number of rows.
    pub rows: usize,
    /// `rows * FEATURES` raw pixels, row-major.
    pub pixels: Vec<f32>,
    /// Where the result goes.
    pub reply: oneshot::Sender<Result<Prediction, String>>,
}

/// The model's answer for one request's rows.
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    /// The class of each row (the arg-max of its logits).
    pub classes: Vec<u32>,
    /// `rows * CLASSES` probabilities (the softmax of the logits).
    pub probabilities: Vec<f32>,
    /// The version that computed every row.
    pub version: u64,
}

/// How the model threads gather batches.
#[derive(Debug, Clone, Copy)]
pub struct BatchSettings {
    /// The most rows in one forward.
    pub max_batch: usize,
    /// How long a model thread waits for more rows once it holds a job.
    pub max_wait: Duration,
}

/// Starts `threads` model threads (none for 0) taking jobs from `jobs`. They stop when
/// every sender is gone or, within 50 ms, when `stop` is set.
pub(crate) fn spawn(
    threads: usize,
    jobs: &Receiver<Job>,
    model: &Arc<ModelState>,
    metrics: &Arc<Metrics>,
    settings: BatchSettings,
    stop: &Arc<AtomicBool>,
) -> std::io::Result<Vec<JoinHandle<()>>> {
    (0..threads)
        .map(|i| {
            let (jobs, model, metrics, stop) = (
                jobs.clone(),
                Arc::clone(model),
                Arc::clone(metrics),
                Arc::clone(stop),
            );
            std::thread::Builder::new()
                .name(format!("netcl-model-{i}"))
                .spawn(move || run(&jobs, &model, &metrics, settings, &stop))
        })
        .collect()
}

/// How often an idle model thread checks the stop flag.
const IDLE_POLL: Duration = Duration::from_millis(50);

fn run(
    jobs: &Receiver<Job>,
    model: &ModelState,
    metrics: &Metrics,
    settings: BatchSettings,
    stop: &AtomicBool,
) {
    // A tape of its own, with recording off and evaluation mode on, for the
    // thread's whole life: its live nodes are reported and must stay 0.
    let tape = Tape::new();
    metrics.add_serving_tape(Arc::clone(&tape));
    let mode = GradMode::new(false, tape).with_training(Some(false));
    let _mode = mode.enter();
    let mut carried: Option<Job> = None;
    loop {
        let first = match carried.take() {
            Some(job) => job,
            None => match jobs.recv_timeout(IDLE_POLL) {
                Ok(job) => job,
                Err(RecvTimeoutError::Timeout) if !stop.load(Ordering::Relaxed) => continue,
                Err(_) => return,
            },
        };
        let mut rows = first.rows;
        let mut batch = vec![first];
        let deadline = Instant::now() + settings.max_wait;
        while rows < settings.max_batch {
            let next = match jobs.try_recv() {
                Ok(job) => job,
                Err(TryRecvError::Disconnected) => break,
                Err(TryRecvError::Empty) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    match jobs.recv_timeout(left) {
                        Ok(job) => job,
                        Err(_) => break,
                    }
                }
            };
            if rows + next.rows > settings.max_batch {
                carried = Some(next);
                break;
            }
            rows += next.rows;
            batch.push(next);
        }
        answer(batch, model, metrics);
    }
}

/// Runs one forward for `batch` and sends each job its rows.
fn answer(mut batch: Vec<Job>, model: &ModelState, metrics: &Metrics) {
    // Requests that timed out meanwhile need no forward.
    batch.retain(|job| !job.reply.is_closed());
    if batch.is_empty() {
        return;
    }
    let rows: usize = batch.iter().map(|job| job.rows).sum();
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| forward(&batch, rows, model)))
        .unwrap_or_else(|_| Err("the forward panicked".to_string()));
    metrics.record_batch(rows);
    match result {
        Ok((classes, probabilities, version)) => {
            let mut start = 0;
            for job in batch {
                let end = start + job.rows;
                let prediction = Prediction {
                    classes: classes[start..end].to_vec(),
                    probabilities: probabilities[start * CLASSES..end * CLASSES].to_vec(),
                    version,
                };
                start = end;
                // The receiver may have timed out since: nothing to do.
                let _ = job.reply.send(Ok(prediction));
            }
        }
        Err(message) => {
            tracing::error!(rows, "forward failed: {message}");
            for job in batch {
                let _ = job.reply.send(Err(message.clone()));
            }
        }
    }
}

/// The predicted class of each of the batch's rows, their probabilities
/// (`rows * CLASSES`), and the version that computed them.
fn forward(
    batch: &[Job],
    rows: usize,
    model: &ModelState,
) -> Result<(Vec<u32>, Vec<f32>, u64), String> {
    let mut pixels = Vec::with_capacity(rows * FEATURES);
    for job in batch {
        pixels.extend_from_slice(&job.pixels);
    }
    let input = Tensor::from_vec(pixels, &[rows, FEATURES]).map_err(|e| e.to_string())?;
    let version = model.published().load();
    let logits = version.predict(&scale(&input)).map_err(|e| e.to_string())?;
    let probabilities = logits.try_softmax(-1).map_err(|e| e.to_string())?;
    let classes = logits.try_argmax(-1).map_err(|e| e.to_string())?;
    Ok((
        classes_of(&classes),
        probabilities.to_vec(),
        version.number(),
    ))
}
