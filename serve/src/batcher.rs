//! Micro-batching: requests wait in a bounded queue; model threads gather
//! what is queued into one forward against one published version.
//!
//! # Design
//!
//! A handler on the async runtime parses its rows, then
//! [`try_send`](crossbeam_channel::Sender::try_send)s a [`Job`] into a
//! bounded channel, answering 503 at once when it is full, and awaits a
//! oneshot reply. The forwards run on dedicated model threads, never on the
//! runtime's threads. The handler rings the model's doorbell (at once, or
//! on a connection thread once its burst of requests is queued); a model
//! thread parks until then, takes a first job and whatever else is queued,
//! up to `max_batch` rows, waiting at most `max_wait` for more. It loads
//! the current version once, runs one forward of all the rows under
//! `no_grad` and evaluation mode on its own serving tape, and answers every
//! job from that one result: directly, or for a request on a connection
//! thread through that thread's inbox, woken once per batch. So every row
//! of a response, and of a batch, comes from one version; and a job is
//! dequeued only after its request arrived, so the version a connection
//! sees never goes back.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, TryRecvError};
use netcl::Tensor;
use netcl::autograd::{GradMode, Tape};
use tokio::sync::oneshot;

use crate::http_threads::Inbox;
use crate::metrics::{Metrics, ModelSeries};
use crate::model::{ModelState, classes_of};
use crate::service::{OutputSpec, Spec};

/// One request's rows, waiting for the model.
#[derive(Debug)]
pub struct Job {
    /// The number of rows.
    pub rows: usize,
    /// `rows * width` input values (the model's row width), row-major.
    pub values: Vec<f32>,
    /// Where the result goes.
    pub reply: oneshot::Sender<Result<Prediction, String>>,
}

/// A job in a model's queue, and the inbox of the connection thread its
/// request came in on ([`crate::http_threads`]), if it came in on one.
#[derive(Debug)]
pub(crate) struct Queued {
    pub(crate) job: Job,
    pub(crate) inbox: Option<Arc<Inbox>>,
}

/// Wakes a model's threads for jobs just queued.
///
/// The model threads never block in the queue itself: they take what is
/// there, and park when it is empty. Whoever queues a job rings the bell
/// after it: at once, or, on a connection thread, once at the end of the
/// burst of requests the thread is serving ([`crate::http_threads`]), so
/// that a model thread wakes to the whole burst, not to its first request.
#[derive(Debug)]
pub(crate) struct Doorbell {
    threads: Vec<std::thread::Thread>,
}

impl Doorbell {
    /// The bell of `threads` (the model threads [`spawn`] started).
    pub(crate) fn new(threads: &[JoinHandle<()>]) -> Doorbell {
        Doorbell {
            threads: threads.iter().map(|t| t.thread().clone()).collect(),
        }
    }

    /// Wakes every model thread that is parked (one that is not gets a
    /// token, so its next park returns at once).
    pub(crate) fn ring(&self) {
        for thread in &self.threads {
            thread.unpark();
        }
    }
}

/// The model's answer for one request's rows.
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    /// The class of each row (the arg-max of its output) with
    /// [`OutputSpec::Classes`], else empty.
    pub classes: Vec<u32>,
    /// `rows * width` values: the probabilities (the softmax of the
    /// output) with [`OutputSpec::Classes`], else the output as it came.
    pub values: Vec<f32>,
    /// The values per row.
    pub width: usize,
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

/// Starts `threads` model threads (none for 0) of model `name` taking
/// jobs from `jobs`, woken by a [`Doorbell`] of them. They stop within
/// 50 ms when every sender is gone or `stop` is set.
#[allow(clippy::too_many_arguments)]
pub(crate) fn spawn(
    threads: usize,
    jobs: &Receiver<Queued>,
    model: &Arc<ModelState>,
    spec: &Arc<Spec>,
    metrics: &Arc<Metrics>,
    name: &Arc<String>,
    settings: BatchSettings,
    stop: &Arc<AtomicBool>,
) -> std::io::Result<Vec<JoinHandle<()>>> {
    (0..threads)
        .map(|i| {
            let (jobs, model, spec, metrics, stop) = (
                jobs.clone(),
                Arc::clone(model),
                Arc::clone(spec),
                Arc::clone(metrics),
                Arc::clone(stop),
            );
            let series = metrics.model_series(name);
            // The digits model keeps the thread names it always had.
            let thread = if name.as_str() == crate::DEFAULT_MODEL {
                format!("netcl-model-{i}")
            } else {
                format!("netcl-model-{name}-{i}")
            };
            std::thread::Builder::new()
                .name(thread)
                .spawn(move || run(&jobs, &model, &spec, &metrics, &series, settings, &stop))
        })
        .collect()
}

/// How often an idle model thread checks the stop flag.
const IDLE_POLL: Duration = Duration::from_millis(50);

fn run(
    jobs: &Receiver<Queued>,
    model: &ModelState,
    spec: &Spec,
    metrics: &Metrics,
    series: &ModelSeries,
    settings: BatchSettings,
    stop: &AtomicBool,
) {
    // A tape of its own, with recording off and evaluation mode on, for the
    // thread's whole life: its live nodes are reported and must stay 0.
    let tape = Tape::new();
    metrics.add_serving_tape(Arc::clone(&tape));
    let mode = GradMode::new(false, tape).with_training(Some(false));
    let _mode = mode.enter();
    let mut carried: Option<Queued> = None;
    loop {
        let first = match carried.take() {
            Some(job) => job,
            None => match jobs.try_recv() {
                Ok(job) => job,
                Err(TryRecvError::Empty) if !stop.load(Ordering::Relaxed) => {
                    // A ring after the check above leaves a token: the
                    // park returns at once.
                    std::thread::park_timeout(IDLE_POLL);
                    continue;
                }
                Err(_) => return,
            },
        };
        let mut rows = first.job.rows;
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
                    std::thread::park_timeout(left);
                    continue;
                }
            };
            if rows + next.job.rows > settings.max_batch {
                carried = Some(next);
                break;
            }
            rows += next.job.rows;
            batch.push(next);
        }
        answer(batch, model, spec, series);
    }
}

/// Runs one forward for `batch` and sends each job its rows: directly, or
/// through its inbox, each inbox woken once for the batch.
fn answer(mut batch: Vec<Queued>, model: &ModelState, spec: &Spec, series: &ModelSeries) {
    // Requests that timed out meanwhile need no forward.
    batch.retain(|queued| !queued.job.reply.is_closed());
    if batch.is_empty() {
        return;
    }
    let rows: usize = batch.iter().map(|queued| queued.job.rows).sum();
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| forward(&batch, rows, model, spec)))
        .unwrap_or_else(|_| Err("the forward panicked".to_string()));
    series.record_batch(rows);
    let mut woken: Vec<Arc<Inbox>> = Vec::new();
    let mut send = |queued: Queued, result: Result<Prediction, String>| match queued.inbox {
        Some(inbox) => {
            inbox.push(queued.job.reply, result);
            if !woken.iter().any(|seen| Arc::ptr_eq(seen, &inbox)) {
                woken.push(inbox);
            }
        }
        // The receiver may have timed out since: nothing to do.
        None => drop(queued.job.reply.send(result)),
    };
    match result {
        Ok(Output {
            classes,
            values,
            width,
            version,
        }) => {
            let mut start = 0;
            for queued in batch {
                let end = start + queued.job.rows;
                let prediction = Prediction {
                    classes: classes.get(start..end).unwrap_or_default().to_vec(),
                    values: values[start * width..end * width].to_vec(),
                    width,
                    version,
                };
                start = end;
                send(queued, Ok(prediction));
            }
        }
        Err(message) => {
            tracing::error!(rows, "forward failed: {message}");
            for queued in batch {
                send(queued, Err(message.clone()));
            }
        }
    }
    for inbox in woken {
        inbox.wake();
    }
}

/// One batch's answer.
struct Output {
    classes: Vec<u32>,
    values: Vec<f32>,
    width: usize,
    version: u64,
}

/// The batch's rows through the preprocessing and the current version,
/// and the output as the spec wants it.
fn forward(
    batch: &[Queued],
    rows: usize,
    model: &ModelState,
    spec: &Spec,
) -> Result<Output, String> {
    let mut values = Vec::with_capacity(rows * spec.input.width);
    for queued in batch {
        values.extend_from_slice(&queued.job.values);
    }
    let mut shape = Vec::with_capacity(1 + spec.input.shape.len());
    shape.push(rows);
    shape.extend_from_slice(&spec.input.shape);
    let mut input = Tensor::from_vec(values, &shape).map_err(|e| e.to_string())?;
    if let Some(preprocess) = &spec.input.preprocess {
        input = preprocess(&input).map_err(|e| format!("preprocessing: {e}"))?;
    }
    let version = model.published().load();
    let output = version.predict(&input).map_err(|e| e.to_string())?;
    if output.shape().first() != Some(&rows) {
        return Err(format!(
            "the model's output has shape {:?}, expected {rows} rows first",
            output.shape()
        ));
    }
    let width = output.numel() / rows;
    let (classes, values) = match spec.output {
        OutputSpec::Classes => {
            if output.ndim() != 2 {
                return Err(format!(
                    "the model's output has shape {:?}, expected [rows, classes] for class outputs",
                    output.shape()
                ));
            }
            let probabilities = output.try_softmax(-1).map_err(|e| e.to_string())?;
            let classes = output.try_argmax(-1).map_err(|e| e.to_string())?;
            (classes_of(&classes), probabilities.to_vec())
        }
        OutputSpec::Logits | OutputSpec::Map(_) => (Vec::new(), output.to_vec()),
    };
    Ok(Output {
        classes,
        values,
        width,
        version: version.number(),
    })
}
