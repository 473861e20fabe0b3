//! The server's counters, rendered by `GET /metrics` in the Prometheus text
//! format (version 0.0.4).
//!
//! Every counter is a relaxed atomic: recording a request costs a few
//! uncontended atomic adds and no lock.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use netcl::autograd::Tape;

/// The routes whose requests are counted apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `POST /v1/predict`.
    Predict,
    /// `GET /v1/model`.
    Model,
    /// `GET /healthz`.
    Healthz,
    /// `GET /metrics`.
    Metrics,
    /// Anything else (answered 404 or 405).
    Other,
}

impl Route {
    const ALL: [Route; 5] = [
        Route::Predict,
        Route::Model,
        Route::Healthz,
        Route::Metrics,
        Route::Other,
    ];

    /// The route of a request path.
    pub fn of_path(path: &str) -> Route {
        match path {
            "/v1/predict" => Route::Predict,
            "/v1/model" => Route::Model,
            "/healthz" => Route::Healthz,
            "/metrics" => Route::Metrics,
            _ => Route::Other,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Route::Predict => "/v1/predict",
            Route::Model => "/v1/model",
            Route::Healthz => "/healthz",
            Route::Metrics => "/metrics",
            Route::Other => "other",
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

/// A histogram with fixed bucket bounds; each observation lands in one
/// bucket (made cumulative when rendered).
#[derive(Debug)]
struct Histogram {
    bounds: &'static [f64],
    /// One count per bound, plus one for `+Inf`.
    buckets: Vec<AtomicU64>,
    /// The sum of observations, in the unit of `scale` (1e-9 for
    /// nanoseconds, 1 for rows).
    sum: AtomicU64,
    scale: f64,
}

impl Histogram {
    fn new(bounds: &'static [f64], scale: f64) -> Histogram {
        Histogram {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0),
            scale,
        }
    }

    /// Records one observation of `units` (in the histogram's unit).
    fn observe(&self, units: u64) {
        let value = units as f64 * self.scale;
        let index = self.bounds.partition_point(|&bound| bound < value);
        self.buckets[index].fetch_add(1, Ordering::Relaxed);
        self.sum.fetch_add(units, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0;
        let sep = if labels.is_empty() { "" } else { "," };
        for (i, bucket) in self.buckets.iter().enumerate() {
            cumulative += bucket.load(Ordering::Relaxed);
            let le = match self.bounds.get(i) {
                Some(bound) => format!("{bound}"),
                None => "+Inf".to_string(),
            };
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {cumulative}"
            );
        }
        let sum = self.sum.load(Ordering::Relaxed) as f64 * self.scale;
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {sum}");
        let _ = writeln!(out, "{name}_count{braces} {cumulative}");
    }
}

/// The lowest and highest status codes counted.
const STATUS_RANGE: std::ops::Range<u16> = 100..600;

/// The server's metrics.
#[derive(Debug)]
pub struct Metrics {
    /// Responses by route and status: `Route::ALL.len()` rows of
    /// `STATUS_RANGE.len()` counters.
    responses: Vec<AtomicU64>,
    latency: Vec<Histogram>,
    batch_rows: Histogram,
    connections: AtomicI64,
    connections_evicted: AtomicU64,
    training_steps: AtomicU64,
    /// `f64` bits.
    steps_per_second: AtomicU64,
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

/// Values read at render time from the rest of the server.
#[derive(Debug, Clone, Copy)]
pub struct Gauges {
    /// The current model version.
    pub version: u64,
    /// Requests waiting in the queue.
    pub queue_depth: usize,
    /// The queue's capacity.
    pub queue_capacity: usize,
    /// Whether a training thread runs.
    pub training: bool,
}

impl Metrics {
    /// All counters at zero.
    pub fn new() -> Metrics {
        let statuses = STATUS_RANGE.len();
        Metrics {
            responses: (0..Route::ALL.len() * statuses)
                .map(|_| AtomicU64::new(0))
                .collect(),
            latency: Route::ALL
                .iter()
                .map(|_| Histogram::new(&LATENCY_BOUNDS, 1e-9))
                .collect(),
            batch_rows: Histogram::new(&BATCH_BOUNDS, 1.0),
            connections: AtomicI64::new(0),
            connections_evicted: AtomicU64::new(0),
            training_steps: AtomicU64::new(0),
            steps_per_second: AtomicU64::new(0f64.to_bits()),
            reloads_ok: AtomicU64::new(0),
            reloads_failed: AtomicU64::new(0),
            serving_tapes: Mutex::new(Vec::new()),
            training_tape: Mutex::new(None),
        }
    }

    /// Counts a response and its latency.
    pub fn record_response(&self, route: Route, status: u16, latency: Duration) {
        let route_index = Route::ALL.iter().position(|r| *r == route).unwrap_or(4);
        if STATUS_RANGE.contains(&status) {
            let index = route_index * STATUS_RANGE.len() + usize::from(status - STATUS_RANGE.start);
            self.responses[index].fetch_add(1, Ordering::Relaxed);
        }
        let nanos = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        self.latency[route_index].observe(nanos);
    }

    /// The number of responses counted with `status`, over all routes.
    pub fn responses_with_status(&self, status: u16) -> u64 {
        if !STATUS_RANGE.contains(&status) {
            return 0;
        }
        let offset = usize::from(status - STATUS_RANGE.start);
        (0..Route::ALL.len())
            .map(|r| self.responses[r * STATUS_RANGE.len() + offset].load(Ordering::Relaxed))
            .sum()
    }

    /// Counts one forward of `rows` rows.
    pub fn record_batch(&self, rows: usize) {
        self.batch_rows.observe(rows as u64);
    }

    /// Counts a connection opened (`+1`) or closed (`-1`).
    pub fn add_connections(&self, delta: i64) {
        self.connections.fetch_add(delta, Ordering::Relaxed);
    }

    /// Open client connections.
    pub fn open_connections(&self) -> i64 {
        self.connections.load(Ordering::Relaxed)
    }

    /// Counts an idle connection closed to give its slot to a new one.
    pub fn record_eviction(&self) {
        self.connections_evicted.fetch_add(1, Ordering::Relaxed);
    }

    /// Idle connections closed so far to give their slots to new ones.
    pub fn connections_evicted(&self) -> u64 {
        self.connections_evicted.load(Ordering::Relaxed)
    }

    /// Sets the training steps taken and the current rate.
    pub fn set_training(&self, steps: u64, steps_per_second: f64) {
        self.training_steps.store(steps, Ordering::Relaxed);
        self.steps_per_second
            .store(steps_per_second.to_bits(), Ordering::Relaxed);
    }

    /// Training steps taken by the online trainer.
    pub fn training_steps(&self) -> u64 {
        self.training_steps.load(Ordering::Relaxed)
    }

    /// Training steps per second over the last measurement window.
    pub fn steps_per_second(&self) -> f64 {
        f64::from_bits(self.steps_per_second.load(Ordering::Relaxed))
    }

    /// Counts a hot reload that succeeded (`true`) or was rejected.
    pub fn record_reload(&self, ok: bool) {
        let counter = if ok {
            &self.reloads_ok
        } else {
            &self.reloads_failed
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Hot reloads counted so far: (published, rejected).
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

    /// The metrics in the Prometheus text format.
    pub fn render(&self, gauges: Gauges) -> String {
        let mut out = String::with_capacity(8 * 1024);
        out.push_str(
            "# HELP netcl_serve_requests_total HTTP responses sent, by route and status.\n\
             # TYPE netcl_serve_requests_total counter\n",
        );
        for (r, route) in Route::ALL.iter().enumerate() {
            for status in STATUS_RANGE {
                let index = r * STATUS_RANGE.len() + usize::from(status - STATUS_RANGE.start);
                let count = self.responses[index].load(Ordering::Relaxed);
                if count > 0 {
                    let _ = writeln!(
                        out,
                        "netcl_serve_requests_total{{route=\"{}\",status=\"{status}\"}} {count}",
                        route.label()
                    );
                }
            }
        }
        out.push_str(
            "# HELP netcl_serve_request_duration_seconds Time from a request's arrival to its response, by route.\n\
             # TYPE netcl_serve_request_duration_seconds histogram\n",
        );
        for (r, route) in Route::ALL.iter().enumerate() {
            let labels = format!("route=\"{}\"", route.label());
            self.latency[r].render(&mut out, "netcl_serve_request_duration_seconds", &labels);
        }
        out.push_str(
            "# HELP netcl_serve_batch_rows Rows per forward of the micro-batcher.\n\
             # TYPE netcl_serve_batch_rows histogram\n",
        );
        self.batch_rows
            .render(&mut out, "netcl_serve_batch_rows", "");
        let gauge = |out: &mut String, name: &str, help: &str, kind: &str, value: String| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        };
        gauge(
            &mut out,
            "netcl_serve_model_version",
            "The published model version serving now.",
            "gauge",
            gauges.version.to_string(),
        );
        gauge(
            &mut out,
            "netcl_serve_queue_depth",
            "Predict requests waiting for the model.",
            "gauge",
            gauges.queue_depth.to_string(),
        );
        gauge(
            &mut out,
            "netcl_serve_queue_capacity",
            "Predict requests the queue holds before answering 503.",
            "gauge",
            gauges.queue_capacity.to_string(),
        );
        gauge(
            &mut out,
            "netcl_serve_open_connections",
            "Open client connections.",
            "gauge",
            self.open_connections().to_string(),
        );
        gauge(
            &mut out,
            "netcl_serve_connections_evicted_total",
            "Idle connections closed to give their slot to a new connection when every slot was taken.",
            "counter",
            self.connections_evicted().to_string(),
        );
        gauge(
            &mut out,
            "netcl_serve_training_enabled",
            "1 when the online trainer runs.",
            "gauge",
            u8::from(gauges.training).to_string(),
        );
        gauge(
            &mut out,
            "netcl_serve_training_steps_total",
            "Optimizer steps of the online trainer.",
            "counter",
            self.training_steps().to_string(),
        );
        gauge(
            &mut out,
            "netcl_serve_training_steps_per_second",
            "Optimizer steps per second over the last second or so.",
            "gauge",
            format!("{:.1}", self.steps_per_second()),
        );
        let _ = writeln!(
            out,
            "# HELP netcl_serve_reloads_total Checkpoints seen by --watch, by result.\n\
             # TYPE netcl_serve_reloads_total counter\n\
             netcl_serve_reloads_total{{result=\"ok\"}} {}\n\
             netcl_serve_reloads_total{{result=\"error\"}} {}",
            self.reloads_ok.load(Ordering::Relaxed),
            self.reloads_failed.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP netcl_serve_tape_live_nodes Autograd nodes alive on the tapes of serving and training threads (serving stays 0).\n\
             # TYPE netcl_serve_tape_live_nodes gauge\n\
             netcl_serve_tape_live_nodes{{thread=\"serving\"}} {}\n\
             netcl_serve_tape_live_nodes{{thread=\"training\"}} {}",
            self.serving_tape_nodes(),
            self.training_tape_nodes()
        );
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

    #[test]
    fn histogram_buckets_are_cumulative_with_inf_last() {
        let metrics = Metrics::new();
        for rows in [1, 3, 3, 64, 5000] {
            metrics.record_batch(rows);
        }
        metrics.record_eviction();
        metrics.record_eviction();
        let text = metrics.render(Gauges {
            version: 7,
            queue_depth: 0,
            queue_capacity: 1024,
            training: false,
        });
        assert!(text.contains("netcl_serve_batch_rows_bucket{le=\"1\"} 1\n"));
        assert!(text.contains("netcl_serve_batch_rows_bucket{le=\"4\"} 3\n"));
        assert!(text.contains("netcl_serve_batch_rows_bucket{le=\"64\"} 4\n"));
        assert!(text.contains("netcl_serve_batch_rows_bucket{le=\"+Inf\"} 5\n"));
        assert!(text.contains("netcl_serve_batch_rows_sum 5071\n"));
        assert!(text.contains("netcl_serve_model_version 7\n"));
        assert!(text.contains("netcl_serve_connections_evicted_total 2\n"));
    }

    #[test]
    fn responses_are_counted_by_route_and_status() {
        let metrics = Metrics::new();
        metrics.record_response(Route::Predict, 200, Duration::from_micros(300));
        metrics.record_response(Route::Predict, 200, Duration::from_millis(3));
        metrics.record_response(Route::Other, 404, Duration::from_micros(10));
        let text = metrics.render(Gauges {
            version: 0,
            queue_depth: 0,
            queue_capacity: 1,
            training: false,
        });
        assert!(
            text.contains("netcl_serve_requests_total{route=\"/v1/predict\",status=\"200\"} 2\n")
        );
        assert!(text.contains("netcl_serve_requests_total{route=\"other\",status=\"404\"} 1\n"));
        assert!(text.contains(
            "netcl_serve_request_duration_seconds_bucket{route=\"/v1/predict\",le=\"0.0005\"} 1\n"
        ));
        assert!(text.contains(
            "netcl_serve_request_duration_seconds_bucket{route=\"/v1/predict\",le=\"0.005\"} 2\n"
        ));
        assert_eq!(metrics.responses_with_status(200), 2);
    }
}
