//! The server's metrics, kept in [`prometheus_client`] metric types and
//! rendered by `GET /metrics` in the Prometheus text format (version
//! 0.0.4) by that crate's encoder.
//!
//! Series of a model carry a `model` label (its name); the metric names
//! are those of the hand-written renderer this replaced. The hot path
//! (a response, a batch) costs an atomic add or a short uncontended lock
//! inside a histogram, and a lookup of the label set in a read-locked map.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use netcl::autograd::Tape;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// The content type of [`Metrics::render`]'s text.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// The routes whose requests are counted apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `POST /v1/predict` (the default model's alias).
    Predict,
    /// `GET /v1/model` (the default model's alias).
    Model,
    /// `GET /healthz`.
    Healthz,
    /// `GET /metrics`.
    Metrics,
    /// Anything else (answered 404 or 405).
    Other,
    /// `POST /v1/models/{name}/predict`.
    ModelPredict,
    /// `GET /v1/models` and `GET /v1/models/{name}`.
    Models,
    /// `POST /v1/models/{name}/generate`.
    ModelGenerate,
}

impl Route {
    /// The route of a request path.
    pub fn of_path(path: &str) -> Route {
        match path {
            "/v1/predict" => Route::Predict,
            "/v1/model" => Route::Model,
            "/healthz" => Route::Healthz,
            "/metrics" => Route::Metrics,
            "/v1/models" => Route::Models,
            _ => match path.strip_prefix("/v1/models/") {
                Some(rest) if !rest.contains('/') => Route::Models,
                Some(rest) => match (
                    rest.strip_suffix("/predict"),
                    rest.strip_suffix("/generate"),
                ) {
                    (Some(name), _) if !name.contains('/') => Route::ModelPredict,
                    (_, Some(name)) if !name.contains('/') => Route::ModelGenerate,
                    _ => Route::Other,
                },
                None => Route::Other,
            },
        }
    }

    /// The value of the `route` label.
    pub fn label(self) -> &'static str {
        match self {
            Route::Predict => "/v1/predict",
            Route::Model => "/v1/model",
            Route::Healthz => "/healthz",
            Route::Metrics => "/metrics",
            Route::Other => "other",
            Route::ModelPredict => "/v1/models/{name}/predict",
            Route::Models => "/v1/models",
            Route::ModelGenerate => "/v1/models/{name}/generate",
        }
    }
}

/// Upper bounds of the latency histogram's buckets, in seconds.
const LATENCY_BOUNDS: [f64; 16] = [
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Upper bounds of the batch-size histogram's buckets, in rows.
const BATCH_BOUNDS: [f64; 11] = [
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
];

/// The lowest and highest status codes counted by
/// [`Metrics::responses_with_status`].
const STATUS_RANGE: std::ops::Range<u16> = 100..600;

/// The labels of a response: route, status and the model it was for
/// (empty when none).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: &'static str,
    status: u16,
    model: Arc<String>,
}

/// The labels of a latency: route and model.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: &'static str,
    model: Arc<String>,
}

/// The label of a model's series.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabel {
    model: Arc<String>,
}

/// The labels of a reload.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReloadLabels {
    model: Arc<String>,
    result: &'static str,
}

/// The labels of a finished generation.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GenerationLabels {
    model: Arc<String>,
    finish: &'static str,
}

/// The label of a tape's live nodes.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ThreadLabel {
    thread: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BOUNDS)
}

fn batch_histogram() -> Histogram {
    Histogram::new(BATCH_BOUNDS)
}

/// The server's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: HistogramFamily<RouteLabels>,
    batch_rows: HistogramFamily<ModelLabel>,
    model_version: Family<ModelLabel, Gauge>,
    queue_depth: Family<ModelLabel, Gauge>,
    queue_capacity: Family<ModelLabel, Gauge>,
    open_connections: Gauge,
    connections_evicted: Counter,
    training_enabled: Gauge,
    training_steps: Counter,
    steps_per_second: Gauge<f64, AtomicU64>,
    reloads: Family<ReloadLabels, Counter>,
    generated_tokens: Family<ModelLabel, Counter>,
    generations: Family<GenerationLabels, Counter>,
    tape_nodes: Family<ThreadLabel, Gauge>,
    /// Responses by status over every route, for
    /// [`Metrics::responses_with_status`].
    statuses: Vec<AtomicU64>,
    reloads_ok: AtomicU64,
    reloads_failed: AtomicU64,
    serving_tapes: Mutex<Vec<Arc<Tape>>>,
    training_tape: Mutex<Option<Arc<Tape>>>,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}

/// What a model reports at render time.
#[derive(Debug, Clone)]
pub struct ModelGauges {
    /// The model's name (its `model` label).
    pub name: Arc<String>,
    /// The version serving now.
    pub version: u64,
    /// Requests waiting in its queue.
    pub queue_depth: usize,
    /// Its queue's capacity.
    pub queue_capacity: usize,
}

/// Values read at render time from the rest of the server.
#[derive(Debug, Clone, Default)]
pub struct Gauges {
    /// Every model served.
    pub models: Vec<ModelGauges>,
    /// Whether a training thread runs.
    pub training: bool,
}

/// The series one model's batcher records into, looked up once.
#[derive(Debug, Clone)]
pub struct ModelSeries {
    batch_rows: Histogram,
}

impl ModelSeries {
    /// Counts one forward of `rows` rows.
    pub fn record_batch(&self, rows: usize) {
        self.batch_rows.observe(rows as f64);
    }
}

/// The series one model's generations record into, looked up once per
/// request, so that a character costs one atomic add.
#[derive(Debug, Clone)]
pub struct GenerationSeries {
    model: Arc<String>,
    tokens: Counter,
    generations: Family<GenerationLabels, Counter>,
}

impl GenerationSeries {
    /// Counts one character generated.
    pub fn record_token(&self) {
        self.tokens.inc();
    }

    /// Counts one generation ended for `finish` (`length`, `timeout`,
    /// `cancelled` or `error`).
    pub fn record_generation(&self, finish: &'static str) {
        self.generations
            .get_or_create(&GenerationLabels {
                model: Arc::clone(&self.model),
                finish,
            })
            .inc();
    }
}

/// The series of one route of one model, looked up once, so that a
/// successful request costs no label lookup.
#[derive(Debug, Clone)]
pub struct RequestSeries {
    route: Route,
    model: Arc<String>,
    ok: Counter,
    latency: Histogram,
}

fn as_i64<T: TryInto<i64>>(value: T) -> i64 {
    value.try_into().unwrap_or(i64::MAX)
}

impl Metrics {
    /// All counters at zero.
    pub fn new() -> Metrics {
        let metrics = Metrics {
            registry: Registry::default(),
            requests: Family::default(),
            latency: Family::new_with_constructor(latency_histogram),
            batch_rows: Family::new_with_constructor(batch_histogram),
            model_version: Family::default(),
            queue_depth: Family::default(),
            queue_capacity: Family::default(),
            open_connections: Gauge::default(),
            connections_evicted: Counter::default(),
            training_enabled: Gauge::default(),
            training_steps: Counter::default(),
            steps_per_second: Gauge::default(),
            reloads: Family::default(),
            generated_tokens: Family::default(),
            generations: Family::default(),
            tape_nodes: Family::default(),
            statuses: STATUS_RANGE.map(|_| AtomicU64::new(0)).collect(),
            reloads_ok: AtomicU64::new(0),
            reloads_failed: AtomicU64::new(0),
            serving_tapes: Mutex::new(Vec::new()),
            training_tape: Mutex::new(None),
        };
        let mut registry = Registry::default();
        registry.register(
            "netcl_serve_requests",
            "HTTP responses sent, by route, status and model",
            metrics.requests.clone(),
        );
        registry.register(
            "netcl_serve_request_duration_seconds",
            "Time from a request's arrival to its response, by route and model",
            metrics.latency.clone(),
        );
        registry.register(
            "netcl_serve_batch_rows",
            "Rows per forward of a model's micro-batcher",
            metrics.batch_rows.clone(),
        );
        registry.register(
            "netcl_serve_model_version",
            "The published version of each model serving now",
            metrics.model_version.clone(),
        );
        registry.register(
            "netcl_serve_queue_depth",
            "Predict requests waiting for each model",
            metrics.queue_depth.clone(),
        );
        registry.register(
            "netcl_serve_queue_capacity",
            "Predict requests a model's queue holds before answering 503",
            metrics.queue_capacity.clone(),
        );
        registry.register(
            "netcl_serve_open_connections",
            "Open client connections",
            metrics.open_connections.clone(),
        );
        registry.register(
            "netcl_serve_connections_evicted",
            "Idle connections closed to give their slot to a new connection when every slot was taken",
            metrics.connections_evicted.clone(),
        );
        registry.register(
            "netcl_serve_training_enabled",
            "1 when the online trainer runs",
            metrics.training_enabled.clone(),
        );
        registry.register(
            "netcl_serve_training_steps",
            "Optimizer steps of the online trainer",
            metrics.training_steps.clone(),
        );
        registry.register(
            "netcl_serve_training_steps_per_second",
            "Optimizer steps per second over the last second or so",
            metrics.steps_per_second.clone(),
        );
        registry.register(
            "netcl_serve_reloads",
            "Checkpoints seen by a watched path, by model and result",
            metrics.reloads.clone(),
        );
        registry.register(
            "netcl_serve_generated_tokens",
            "Characters generated by each language model (streamed or not), counted as each is drawn",
            metrics.generated_tokens.clone(),
        );
        registry.register(
            "netcl_serve_generations",
            "Generations ended, by model and finish reason (length, timeout, cancelled: the client went away, error)",
            metrics.generations.clone(),
        );
        registry.register(
            "netcl_serve_tape_live_nodes",
            "Autograd nodes alive on the tapes of serving and training threads (serving stays 0)",
            metrics.tape_nodes.clone(),
        );
        Metrics {
            registry,
            ..metrics
        }
    }

    /// The series of model `name`'s batcher.
    pub fn model_series(&self, name: &Arc<String>) -> ModelSeries {
        ModelSeries {
            batch_rows: self.batch_rows.get_or_create_owned(&ModelLabel {
                model: Arc::clone(name),
            }),
        }
    }

    /// The series of `route` for `model`.
    pub fn request_series(&self, route: Route, model: &Arc<String>) -> RequestSeries {
        RequestSeries {
            route,
            model: Arc::clone(model),
            ok: self.requests.get_or_create_owned(&RequestLabels {
                route: route.label(),
                status: 200,
                model: Arc::clone(model),
            }),
            latency: self.latency.get_or_create_owned(&RouteLabels {
                route: route.label(),
                model: Arc::clone(model),
            }),
        }
    }

    /// The series of model `name`'s generations.
    pub fn generation_series(&self, name: &Arc<String>) -> GenerationSeries {
        GenerationSeries {
            model: Arc::clone(name),
            tokens: self.generated_tokens.get_or_create_owned(&ModelLabel {
                model: Arc::clone(name),
            }),
            generations: self.generations.clone(),
        }
    }

    /// Characters generated so far by model `name` (0 for a model that
    /// generated none).
    pub fn generated_tokens(&self, name: &str) -> u64 {
        self.generated_tokens
            .get(&ModelLabel {
                model: Arc::new(name.to_string()),
            })
            .map_or(0, |counter| counter.get())
    }

    /// Generations of model `name` ended for `finish` so far (`length`,
    /// `timeout`, `cancelled` or `error`).
    pub fn generations(&self, name: &str, finish: &str) -> u64 {
        ["length", "timeout", "cancelled", "error"]
            .into_iter()
            .find(|f| *f == finish)
            .and_then(|finish| {
                self.generations.get(&GenerationLabels {
                    model: Arc::new(name.to_string()),
                    finish,
                })
            })
            .map_or(0, |counter| counter.get())
    }

    /// As [`Metrics::record_response`], for the route and model of `series`.
    pub fn record_in(&self, series: &RequestSeries, status: u16, latency: Duration) {
        if status != 200 {
            return self.record_response(series.route, &series.model, status, latency);
        }
        series.ok.inc();
        self.statuses[usize::from(200 - STATUS_RANGE.start)].fetch_add(1, Ordering::Relaxed);
        series.latency.observe(latency.as_secs_f64());
    }

    /// Counts a response and its latency; `model` is the model it was
    /// for, empty for none.
    pub fn record_response(
        &self,
        route: Route,
        model: &Arc<String>,
        status: u16,
        latency: Duration,
    ) {
        let route = route.label();
        self.requests
            .get_or_create(&RequestLabels {
                route,
                status,
                model: Arc::clone(model),
            })
            .inc();
        if STATUS_RANGE.contains(&status) {
            self.statuses[usize::from(status - STATUS_RANGE.start)].fetch_add(1, Ordering::Relaxed);
        }
        self.latency
            .get_or_create(&RouteLabels {
                route,
                model: Arc::clone(model),
            })
            .observe(latency.as_secs_f64());
    }

    /// The number of responses counted with `status`, over all routes.
    pub fn responses_with_status(&self, status: u16) -> u64 {
        if STATUS_RANGE.contains(&status) {
            self.statuses[usize::from(status - STATUS_RANGE.start)].load(Ordering::Relaxed)
        } else {
            0
        }
    }

    /// Counts a connection opened (`+1`) or closed (`-1`).
    pub fn add_connections(&self, delta: i64) {
        self.open_connections.inc_by(delta);
    }

    /// Open client connections.
    pub fn open_connections(&self) -> i64 {
        self.open_connections.get()
    }

    /// Counts an idle connection closed to give its slot to a new one.
    pub fn record_eviction(&self) {
        self.connections_evicted.inc();
    }

    /// Idle connections closed so far to give their slots to new ones.
    pub fn connections_evicted(&self) -> u64 {
        self.connections_evicted.get()
    }

    /// Sets the training steps taken and the current rate (one trainer
    /// calls it).
    pub fn set_training(&self, steps: u64, steps_per_second: f64) {
        let before = self.training_steps.get();
        self.training_steps.inc_by(steps.saturating_sub(before));
        self.steps_per_second.set(steps_per_second);
    }

    /// Training steps taken by the online trainer.
    pub fn training_steps(&self) -> u64 {
        self.training_steps.get()
    }

    /// Training steps per second over the last measurement window.
    pub fn steps_per_second(&self) -> f64 {
        self.steps_per_second.get()
    }

    /// Counts a hot reload of model `model` that succeeded (`true`) or was
    /// rejected.
    pub fn record_model_reload(&self, model: &Arc<String>, ok: bool) {
        let (counter, result) = if ok {
            (&self.reloads_ok, "ok")
        } else {
            (&self.reloads_failed, "error")
        };
        counter.fetch_add(1, Ordering::Relaxed);
        self.reloads
            .get_or_create(&ReloadLabels {
                model: Arc::clone(model),
                result,
            })
            .inc();
    }

    /// Hot reloads counted so far over every model: (published, rejected).
    pub fn reloads(&self) -> (u64, u64) {
        (
            self.reloads_ok.load(Ordering::Relaxed),
            self.reloads_failed.load(Ordering::Relaxed),
        )
    }

    /// Registers the tape of a serving thread, whose live nodes are
    /// reported (they must stay 0: serving records nothing).
    pub fn add_serving_tape(&self, tape: Arc<Tape>) {
        lock(&self.serving_tapes).push(tape);
    }

    /// Registers the training thread's tape.
    pub fn set_training_tape(&self, tape: Arc<Tape>) {
        *lock(&self.training_tape) = Some(tape);
    }

    /// Live nodes on the serving threads' tapes.
    pub fn serving_tape_nodes(&self) -> usize {
        lock(&self.serving_tapes).iter().map(|t| t.len()).sum()
    }

    /// Live nodes on the training thread's tape (0 without training).
    pub fn training_tape_nodes(&self) -> usize {
        lock(&self.training_tape).as_ref().map_or(0, |t| t.len())
    }

    /// The metrics in the Prometheus text format (version 0.0.4), with the
    /// values of `gauges` read now.
    pub fn render(&self, gauges: &Gauges) -> String {
        for model in &gauges.models {
            let label = ModelLabel {
                model: Arc::clone(&model.name),
            };
            self.model_version
                .get_or_create(&label)
                .set(as_i64(model.version));
            self.queue_depth
                .get_or_create(&label)
                .set(as_i64(model.queue_depth));
            self.queue_capacity
                .get_or_create(&label)
                .set(as_i64(model.queue_capacity));
            // Every model's series show, at 0, before its first batch.
            drop(self.batch_rows.get_or_create(&label));
        }
        self.training_enabled.set(i64::from(gauges.training));
        for (thread, nodes) in [
            ("serving", self.serving_tape_nodes()),
            ("training", self.training_tape_nodes()),
        ] {
            self.tape_nodes
                .get_or_create(&ThreadLabel { thread })
                .set(as_i64(nodes));
        }
        let mut out = String::with_capacity(8 * 1024);
        if let Err(err) =
            prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
        {
            tracing::error!("cannot encode the metrics: {err}");
        }
        out
    }
}

/// Locks `mutex`, ignoring poisoning (the data is a list of tapes).
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gauges(name: &Arc<String>, version: u64) -> Gauges {
        Gauges {
            models: vec![ModelGauges {
                name: Arc::clone(name),
                version,
                queue_depth: 0,
                queue_capacity: 1024,
            }],
            training: false,
        }
    }

    #[test]
    fn histogram_buckets_are_cumulative_with_inf_last() {
        let metrics = Metrics::new();
        let name = Arc::new("digits".to_string());
        let series = metrics.model_series(&name);
        for rows in [1, 3, 3, 64, 5000] {
            series.record_batch(rows);
        }
        metrics.record_eviction();
        metrics.record_eviction();
        let text = metrics.render(&gauges(&name, 7));
        let bucket = |le: &str, n: u64| {
            format!("netcl_serve_batch_rows_bucket{{model=\"digits\",le=\"{le}\"}} {n}\n")
        };
        assert!(text.contains(&bucket("1", 1)), "{text}");
        assert!(text.contains(&bucket("4", 3)), "{text}");
        assert!(text.contains(&bucket("64", 4)), "{text}");
        assert!(text.contains(&bucket("+Inf", 5)), "{text}");
        assert!(text.contains("netcl_serve_batch_rows_sum{model=\"digits\"} 5071.0\n"));
        assert!(text.contains("netcl_serve_model_version{model=\"digits\"} 7\n"));
        assert!(text.contains("netcl_serve_connections_evicted_total 2\n"));
    }

    #[test]
    fn responses_are_counted_by_route_status_and_model() {
        let metrics = Metrics::new();
        let (digits, other) = (Arc::new("digits".to_string()), Arc::new(String::new()));
        metrics.record_response(Route::Predict, &digits, 200, Duration::from_micros(300));
        metrics.record_response(Route::Predict, &digits, 200, Duration::from_millis(3));
        metrics.record_response(Route::Other, &other, 404, Duration::from_micros(10));
        let text = metrics.render(&gauges(&digits, 0));
        assert!(text.contains(
            "netcl_serve_requests_total{route=\"/v1/predict\",status=\"200\",model=\"digits\"} 2\n"
        ));
        assert!(
            text.contains(
                "netcl_serve_requests_total{route=\"other\",status=\"404\",model=\"\"} 1\n"
            )
        );
        assert!(text.contains(
            "netcl_serve_request_duration_seconds_bucket{route=\"/v1/predict\",model=\"digits\",le=\"0.0005\"} 1\n"
        ));
        assert!(text.contains(
            "netcl_serve_request_duration_seconds_bucket{route=\"/v1/predict\",model=\"digits\",le=\"0.005\"} 2\n"
        ));
        assert_eq!(metrics.responses_with_status(200), 2);
        assert_eq!(metrics.responses_with_status(404), 1);
    }

    #[test]
    fn generated_tokens_and_generations_are_counted_by_model() {
        let metrics = Metrics::new();
        let (lm, other) = (Arc::new("lm".to_string()), Arc::new("other".to_string()));
        let series = metrics.generation_series(&lm);
        for _ in 0..5 {
            series.record_token();
        }
        series.record_generation("length");
        series.record_generation("cancelled");
        metrics
            .generation_series(&other)
            .record_generation("timeout");
        assert_eq!(metrics.generated_tokens("lm"), 5);
        assert_eq!(metrics.generated_tokens("other"), 0);
        assert_eq!(metrics.generated_tokens("nope"), 0);
        assert_eq!(metrics.generations("lm", "length"), 1);
        assert_eq!(metrics.generations("lm", "timeout"), 0);
        assert_eq!(metrics.generations("other", "timeout"), 1);
        assert_eq!(metrics.generations("lm", "bogus"), 0);
        let text = metrics.render(&gauges(&lm, 0));
        assert!(
            text.contains("netcl_serve_generated_tokens_total{model=\"lm\"} 5\n"),
            "{text}"
        );
        assert!(
            text.contains("netcl_serve_generations_total{model=\"lm\",finish=\"cancelled\"} 1\n"),
            "{text}"
        );
    }

    #[test]
    fn paths_map_to_their_routes() {
        for (path, route) in [
            ("/v1/predict", Route::Predict),
            ("/v1/models", Route::Models),
            ("/v1/models/digits", Route::Models),
            ("/v1/models/digits/predict", Route::ModelPredict),
            ("/v1/models/a/b", Route::Other),
            ("/v1/models/a/b/predict", Route::Other),
            ("/v1/models/lm/generate", Route::ModelGenerate),
            ("/v1/models/a/b/generate", Route::Other),
            ("/nope", Route::Other),
        ] {
            assert_eq!(Route::of_path(path), route, "{path}");
        }
    }
}
