//! Inline forwards: the runtime's own threads run the batched forwards,
//! instead of model threads ([`ModelServiceBuilder::inline_forwards`]).
//!
//! # Why
//!
//! With model threads (the default, [`crate::batcher`]) every request
//! crosses threads twice: the handler wakes a model thread through the
//! queue, and the model thread wakes the handler's task with its reply.
//! On a machine with few cores those hand-offs (futex wake-ups, task
//! switches) cost more than a small model's forward. Here the handler that
//! queues a job runs the forward itself when a turn is free, so the
//! request that finds the model idle crosses no thread at all.
//!
//! # How
//!
//! A handler queues its job, then, when fewer than `runners` forwards are
//! under way, takes a turn: it takes what is queued (in arrival order, up
//! to `max_batch` rows, its own job among them), runs one forward for it
//! as a model thread would (one version, `no_grad`, evaluation mode, a
//! serving tape of its own), answers every job of it, and repeats until
//! its own job has been answered. If jobs are still queued then, it hands
//! its turn to a new runtime task that runs batches until the queue is
//! empty, yielding to the runtime between them, so its own response goes
//! out at once and the runtime's other tasks are not starved.
//!
//! The queue and the count of turns share one mutex, held to push or to
//! take a batch, never across a forward. A turn ends only under that
//! mutex, when the queue is empty, so no job is ever left without a
//! runner: whoever queues it either takes a turn or sees `runners` turns
//! under way, each of which looks at the queue again before it ends.
//!
//! As with model threads, every row of a batch comes from one version, and
//! a job is taken only after its request arrived, so the version a
//! connection sees never goes back.
//!
//! [`ModelServiceBuilder::inline_forwards`]: crate::ModelServiceBuilder::inline_forwards

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, MutexGuard};

use netcl::autograd::{GradMode, Tape};

use crate::batcher::{self, Job};
use crate::metrics::{Metrics, ModelSeries};
use crate::model::ModelState;
use crate::service::Spec;

/// Why a job was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// `capacity` jobs are already waiting.
    Full,
    /// The model service was stopped.
    Closed,
}

/// One model's queue when its forwards run inline.
pub(crate) struct Inline {
    waiting: Mutex<Waiting>,
    /// Jobs that may wait at most.
    capacity: usize,
    /// Forwards under way at most.
    runners: usize,
    max_batch: usize,
    model: Arc<ModelState>,
    spec: Arc<Spec>,
    series: ModelSeries,
    /// No recording, evaluation mode, on a tape of the service's own.
    mode: GradMode,
}

impl std::fmt::Debug for Inline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inline")
            .field("capacity", &self.capacity)
            .field("runners", &self.runners)
            .field("max_batch", &self.max_batch)
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Waiting {
    jobs: VecDeque<(u64, Job)>,
    /// The ticket of the next job queued.
    next: u64,
    /// Turns under way.
    running: usize,
    closed: bool,
}

impl Inline {
    /// A queue of `capacity` jobs whose forwards run on at most `runners`
    /// threads at once, `max_batch` rows each. Its serving tape is
    /// reported to `metrics`.
    pub(crate) fn new(
        capacity: usize,
        runners: usize,
        max_batch: usize,
        model: &Arc<ModelState>,
        spec: &Arc<Spec>,
        metrics: &Metrics,
        name: &Arc<String>,
    ) -> Inline {
        let tape = Tape::new();
        metrics.add_serving_tape(Arc::clone(&tape));
        Inline {
            waiting: Mutex::new(Waiting::default()),
            capacity: capacity.max(1),
            runners,
            max_batch: max_batch.max(1),
            model: Arc::clone(model),
            spec: Arc::clone(spec),
            series: metrics.model_series(name),
            mode: GradMode::new(false, tape).with_training(Some(false)),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Waiting> {
        // Nothing panics while the lock is held; recover anyway.
        self.waiting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Jobs waiting.
    pub(crate) fn len(&self) -> usize {
        self.lock().jobs.len()
    }

    /// Refuses every job from now on; those queued are still answered.
    pub(crate) fn close(&self) {
        self.lock().closed = true;
    }

    /// Queues `job` and, when a turn is free, runs forwards on this thread
    /// until `job` is answered (see the module's docs). Called from a task
    /// of a tokio runtime, which any jobs left over are handed to.
    pub(crate) fn submit(self: &Arc<Self>, job: Job) -> Result<(), Refused> {
        let ticket = {
            let mut waiting = self.lock();
            if waiting.closed {
                return Err(Refused::Closed);
            }
            if waiting.jobs.len() >= self.capacity {
                return Err(Refused::Full);
            }
            let ticket = waiting.next;
            waiting.next += 1;
            waiting.jobs.push_back((ticket, job));
            if waiting.running >= self.runners {
                return Ok(());
            }
            waiting.running += 1;
            ticket
        };
        while let Some((last, batch)) = self.take() {
            self.answer(batch);
            if last >= ticket {
                self.hand_off();
                break;
            }
        }
        Ok(())
    }

    /// The next batch and the last ticket in it; or, when nothing is
    /// queued, `None`, and the caller's turn is over.
    fn take(&self) -> Option<(u64, Vec<Job>)> {
        let mut waiting = self.lock();
        let mut batch = Vec::new();
        let mut rows = 0;
        let mut last = 0;
        while let Some((ticket, job)) = waiting.jobs.front() {
            if !batch.is_empty() && rows + job.rows > self.max_batch {
                break;
            }
            rows += job.rows;
            last = *ticket;
            let (_, job) = waiting.jobs.pop_front()?;
            batch.push(job);
        }
        if batch.is_empty() {
            waiting.running -= 1;
            return None;
        }
        Some((last, batch))
    }

    /// Ends the caller's turn if nothing is queued; else passes it to a new
    /// runtime task that runs batches until the queue is empty.
    fn hand_off(self: &Arc<Self>) {
        {
            let mut waiting = self.lock();
            if waiting.jobs.is_empty() {
                waiting.running -= 1;
                return;
            }
        }
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                let this = Arc::clone(self);
                runtime.spawn(async move {
                    while let Some((_, batch)) = this.take() {
                        this.answer(batch);
                        tokio::task::yield_now().await;
                    }
                });
            }
            // Not on a runtime: finish here.
            Err(_) => {
                while let Some((_, batch)) = self.take() {
                    self.answer(batch);
                }
            }
        }
    }

    /// One forward for `batch`, answering each job. A panic is contained
    /// here (its jobs' requests get a 503), so that a turn always ends.
    fn answer(&self, batch: Vec<Job>) {
        let _mode = self.mode.enter();
        let answered = std::panic::catch_unwind(AssertUnwindSafe(|| {
            batcher::answer(batch, &self.model, &self.spec, &self.series);
        }));
        if answered.is_err() {
            tracing::error!("answering a batch panicked");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batcher::Prediction;
    use crate::service::OutputSpec;
    use crate::{InputSpec, model::VersionInfo};
    use netcl::Tensor;
    use netcl::nn::{Linear, Module};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::sync::oneshot;

    /// Passes its input through, counting the forwards under way and the
    /// most at once, and the largest batch.
    #[derive(Debug, Default)]
    struct Counting {
        now: Arc<AtomicUsize>,
        most: Arc<AtomicUsize>,
        largest: Arc<AtomicUsize>,
    }

    impl Module for Counting {
        fn forward(&self, input: &Tensor) -> netcl::Result<Tensor> {
            let now = self.now.fetch_add(1, Ordering::SeqCst) + 1;
            self.most.fetch_max(now, Ordering::SeqCst);
            self.largest.fetch_max(input.shape()[0], Ordering::SeqCst);
            // Long enough for the other threads to queue behind it.
            std::thread::sleep(std::time::Duration::from_micros(200));
            self.now.fetch_sub(1, Ordering::SeqCst);
            Ok(input.clone())
        }

        fn named_parameters(&self) -> Vec<(String, Tensor)> {
            Vec::new()
        }

        fn try_fork(&self) -> netcl::Result<Box<dyn Module>> {
            Ok(Box::new(Counting {
                now: Arc::clone(&self.now),
                most: Arc::clone(&self.most),
                largest: Arc::clone(&self.largest),
            }))
        }
    }

    fn queue(capacity: usize, runners: usize, max_batch: usize) -> Arc<Inline> {
        queue_of(&Linear::zeros(2, 2).unwrap(), capacity, runners, max_batch)
    }

    fn queue_of(
        model: &dyn Module,
        capacity: usize,
        runners: usize,
        max_batch: usize,
    ) -> Arc<Inline> {
        let info = VersionInfo {
            version: 0,
            training_steps: 0,
            last_loss: None,
            accuracy: f32::NAN,
            source: "test",
        };
        let state = ModelState::new(model, info).unwrap();
        let spec = Arc::new(Spec {
            input: InputSpec::rows(2),
            output: OutputSpec::Logits,
        });
        let metrics = Metrics::new();
        Arc::new(Inline::new(
            capacity,
            runners,
            max_batch,
            &state,
            &spec,
            &metrics,
            &Arc::new("m".to_string()),
        ))
    }

    fn job(rows: usize) -> (Job, oneshot::Receiver<Result<Prediction, String>>) {
        let (reply, answer) = oneshot::channel();
        let values = (0..rows * 2).map(|i| i as f32).collect();
        (
            Job {
                rows,
                values,
                reply,
            },
            answer,
        )
    }

    #[test]
    fn a_job_on_an_idle_queue_is_answered_before_submit_returns() {
        let inline = queue(4, 1, 8);
        let (job, mut answer) = job(3);
        inline.submit(job).unwrap();
        let prediction = answer.try_recv().unwrap().unwrap();
        assert_eq!(prediction.values.len(), 3 * 2);
        assert_eq!(inline.len(), 0);
        assert_eq!(inline.lock().running, 0);
    }

    #[test]
    fn with_every_turn_taken_jobs_wait_and_a_full_queue_refuses() {
        let inline = queue(2, 1, 8);
        // A turn under way elsewhere.
        inline.lock().running = 1;
        let (first, mut first_answer) = job(1);
        let (second, _) = job(1);
        let (third, _) = job(1);
        inline.submit(first).unwrap();
        inline.submit(second).unwrap();
        assert_eq!(inline.submit(third).unwrap_err(), Refused::Full);
        assert!(first_answer.try_recv().is_err(), "answered without a turn");
        // The turn under way looks at the queue before it ends: it takes
        // both jobs in one batch.
        let (last, batch) = inline.take().unwrap();
        assert_eq!((last, batch.len()), (1, 2));
        inline.answer(batch);
        assert!(inline.take().is_none());
        assert_eq!(inline.lock().running, 0);
        assert_eq!(first_answer.try_recv().unwrap().unwrap().values.len(), 2);
    }

    #[test]
    fn a_batch_stops_at_max_batch_rows_but_always_takes_one_job() {
        let inline = queue(8, 1, 4);
        inline.lock().running = 1;
        let mut answers = Vec::new();
        for rows in [3, 2, 6, 1] {
            let (job, answer) = job(rows);
            inline.submit(job).unwrap();
            answers.push(answer);
        }
        let sizes: Vec<usize> = std::iter::from_fn(|| inline.take())
            .map(|(_, batch)| batch.iter().map(|job| job.rows).sum())
            .collect();
        assert_eq!(sizes, [3, 2, 6, 1]);
    }

    #[test]
    fn a_closed_queue_refuses() {
        let inline = queue(4, 1, 8);
        inline.close();
        assert_eq!(inline.submit(job(1).0).unwrap_err(), Refused::Closed);
    }

    /// Threads submitting at once, with no runtime to hand left-over jobs
    /// to (the turn finishes them itself): every job is answered with its
    /// own rows, no batch exceeds `max_batch` rows, at most `runners`
    /// forwards run at once, and some batches hold several requests.
    #[test]
    fn jobs_submitted_from_many_threads_are_all_answered_within_the_turns() {
        for runners in [1, 2] {
            let model = Counting::default();
            let (most, largest) = (Arc::clone(&model.most), Arc::clone(&model.largest));
            let inline = queue_of(&model, 1024, runners, 6);
            let answered = AtomicUsize::new(0);
            std::thread::scope(|scope| {
                for t in 0..8usize {
                    let inline = Arc::clone(&inline);
                    let answered = &answered;
                    scope.spawn(move || {
                        for i in 0..50usize {
                            let rows = 1 + (t + i) % 3;
                            let (reply, mut answer) = oneshot::channel();
                            let values: Vec<f32> = (0..rows * 2)
                                .map(|v| (t * 1000 + i * 10 + v) as f32)
                                .collect();
                            let job = Job {
                                rows,
                                values: values.clone(),
                                reply,
                            };
                            inline.submit(job).unwrap();
                            // Answered by this thread's turn, or by the turn
                            // under way, which finishes the queue.
                            let prediction = loop {
                                match answer.try_recv() {
                                    Ok(prediction) => break prediction.unwrap(),
                                    Err(oneshot::error::TryRecvError::Empty) => {
                                        std::thread::yield_now();
                                    }
                                    Err(err) => panic!("job dropped: {err}"),
                                }
                            };
                            assert_eq!(prediction.values, values);
                            answered.fetch_add(1, Ordering::Relaxed);
                        }
                    });
                }
            });
            let most = most.load(Ordering::SeqCst);
            assert!((1..=runners).contains(&most), "{most} forwards at once");
            let largest = largest.load(Ordering::SeqCst);
            assert!(largest <= 6, "a batch of {largest} rows");
            assert!(largest > 3, "no batch held two requests");
            assert_eq!(answered.load(Ordering::Relaxed), 8 * 50);
            assert_eq!(inline.len(), 0);
            assert_eq!(inline.lock().running, 0);
        }
    }
}
