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
/// jobs from `jobs`. They stop when every sender is gone or, within 50 ms,
/// when `stop` is set.
#[allow(clippy::too_many_arguments)]
pub(crate) fn spawn(
    threads: usize,
    jobs: &Receiver<Job>,
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
    jobs: &Receiver<Job>,
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
        answer(batch, model, spec, series);
    }
}

/// Runs one forward for `batch` and sends each job its rows.
fn answer(mut batch: Vec<Job>, model: &ModelState, spec: &Spec, series: &ModelSeries) {
    // Requests that timed out meanwhile need no forward.
    batch.retain(|job| !job.reply.is_closed());
    if batch.is_empty() {
        return;
    }
    let rows: usize = batch.iter().map(|job| job.rows).sum();
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| forward(&batch, rows, model, spec)))
        .unwrap_or_else(|_| Err("the forward panicked".to_string()));
    series.record_batch(rows);
    match result {
        Ok(Output {
            classes,
            values,
            width,
            version,
        }) => {
            let mut start = 0;
            for job in batch {
                let end = start + job.rows;
                let prediction = Prediction {
                    classes: classes.get(start..end).unwrap_or_default().to_vec(),
                    values: values[start * width..end * width].to_vec(),
                    width,
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

/// One batch's answer.
struct Output {
    classes: Vec<u32>,
    values: Vec<f32>,
    width: usize,
    version: u64,
}

/// The batch's rows through the preprocessing and the current version,
/// and the output as the spec wants it.
fn forward(batch: &[Job], rows: usize, model: &ModelState, spec: &Spec) -> Result<Output, String> {
    let mut values = Vec::with_capacity(rows * spec.input.width);
    for job in batch {
        values.extend_from_slice(&job.values);
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
