//! `netcl-serve`: the reference HTTP server of netcl, and a library that
//! serves any [`netcl::nn::Module`] over HTTP/1.1 + JSON.
//!
//! As a library, [`ModelService::builder`] serves a module held in a
//! [`netcl::nn::Published`] with an [`InputSpec`] and an [`OutputSpec`],
//! and returns a router to nest in one's own axum app and a
//! [`ModelHandle`] that publishes new versions; [`Models`] serves several
//! behind one router. Each model has its own bounded queue and model
//! threads ([`batcher`]).
//!
//! As a server ([`start`], the binary), it serves the digits MLP while
//! (optionally) training it, publishing each new version through
//! [`netcl::nn::Published`], and any number of models from checkpoints
//! ([`Config::models`], [`loader`]):
//!
//! - `POST /v1/models/{name}/predict`, and `POST /v1/predict` for the
//!   default model: 1 to `max_batch` rows (64 raw pixels for the digits),
//!   the classes and probabilities (or outputs), and the version that
//!   computed them;
//! - `POST /v1/models/{name}/generate` for a language model ([`generate`]):
//!   text sampled after a prompt, deterministic per seed and version;
//! - `GET /v1/models`, `GET /v1/models/{name}`, and `GET /v1/model` for the
//!   default model: version, input spec, parameter count, training steps,
//!   last loss and held-out accuracy;
//! - `GET /healthz`, `GET /metrics` (Prometheus text format).
//!
//! The binary is a thin command line over [`start`]; tests start servers
//! in-process on port 0 with a [`Config`] of small timeouts.
//!
//! # Threads
//!
//! | thread | does | priority |
//! |---|---|---|
//! | `netcl-http-*` ([`Config::http_threads`], unless [`HttpLayout::Shared`]) | each runs a single-threaded runtime owning the connections handed to it: parse HTTP and JSON, answer | normal |
//! | the caller's runtime | accept, follow checkpoints; with [`HttpLayout::Shared`], the connections too | normal |
//! | `netcl-model-*` ([`Config::threads`]) | micro-batched forwards, off the runtime | normal |
//! | `netcl-train` (with [`Config::train`]) | AdamW steps on the digits; forks and evaluates a version every [`Config::publish_every`] steps | `SCHED_IDLE` and nice 19 ([`Config::train_priority`]), optional duty cycle |
//! | `netcl-publish` (with [`Config::train`]) | publishes the trainer's versions | normal |
//! | `netcl-checkpoint` (with [`Config::checkpoint_every`]) | writes the current version into the [`Config::weights`] directory ([`checkpointer`]) | normal |
//!
//! # Examples
//!
//! ```no_run
//! # #[tokio::main] async fn main() -> Result<(), netcl_serve::Error> {
//! let server = netcl_serve::start(netcl_serve::Config {
//!     listen: "127.0.0.1:0".parse().unwrap(),
//!     train: true,
//!     ..netcl_serve::Config::default()
//! })
//! .await?;
//! println!("listening on {}", server.local_addr());
//! server.shutdown();
//! let summary = server.wait().await?;
//! println!("stopped at version {}", summary.version);
//! # Ok(()) }
//! ```

#![deny(missing_docs)]

pub mod batcher;
pub mod checkpointer;
mod conns;
pub mod generate;
mod http;
mod http_threads;
pub mod loader;
pub mod metrics;
pub mod model;
mod service;
pub mod source;
mod stall;
pub mod trainer;
mod watch;

pub use service::{
    InputSpec, ModelHandle, ModelService, ModelServiceBuilder, Models, OutputSpec, Preprocess,
    RowMap,
};

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch as signal;
use tower::ServiceExt;

pub use http::BODY_LIMIT;

use crate::loader::{CheckpointLoader, DigitsMlpLoader, ModelLoader, load_latest};
use crate::metrics::Metrics;
use crate::model::{Digits, ModelState, VersionInfo, accuracy, read_checkpoint, train_startup};
use crate::service::ModelServiceBuilder as Builder;
use crate::source::PathSource;
pub use crate::trainer::TrainPriority;
use crate::trainer::TrainSettings;

/// Where a server started by [`start`] runs its connections.
///
/// ```
/// use netcl_serve::HttpLayout;
///
/// assert_eq!(HttpLayout::default(), HttpLayout::PerCore);
/// assert_eq!("shared".parse::<HttpLayout>(), Ok(HttpLayout::Shared));
/// assert_eq!(HttpLayout::PerThread.to_string(), "per-thread");
/// assert!("pooled".parse::<HttpLayout>().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum HttpLayout {
    /// [`HttpLayout::PerThread`], with each connection thread pinned to a
    /// CPU of its own among those the process may use: the one the OS
    /// started it on unless another connection thread of the server took
    /// it, else the least taken (so servers sharing a machine spread over
    /// it). On Linux; a refusal is logged and the thread runs anywhere. The
    /// model threads, the trainer, the caller's runtime and the blocking
    /// threads a connection thread starts (generations run there) are not
    /// pinned.
    /// Measured on the digits route beside the other layouts: the most
    /// requests served and the lowest p99 (BENCHMARKS.md, "Connection
    /// threads"). For a machine the server does not share with other busy
    /// processes; there, [`HttpLayout::PerThread`].
    #[default]
    PerCore,
    /// [`Config::http_threads`] threads named `netcl-http-{i}`, each running
    /// a single-threaded async runtime that owns the connections handed to
    /// it (to the thread with the fewest open): their sockets, timers and
    /// tasks never move between threads. A connection thread wakes a model
    /// thread once for the burst of requests it has just read, and a model
    /// thread wakes each connection thread once per batch for all its
    /// replies. The accept loop, the watchers and the checkpoints stay on
    /// the caller's runtime. The threads run wherever the OS puts them.
    PerThread,
    /// Every connection is a task of the runtime [`start`] is called on
    /// (the layout before the connection threads): for a caller whose
    /// runtime should do all the work.
    Shared,
}

impl std::str::FromStr for HttpLayout {
    type Err = String;

    /// `per-core`, `per-thread` or `shared`.
    fn from_str(s: &str) -> Result<HttpLayout, String> {
        match s {
            "per-core" => Ok(HttpLayout::PerCore),
            "per-thread" => Ok(HttpLayout::PerThread),
            "shared" => Ok(HttpLayout::Shared),
            _ => Err(format!(
                "expected per-core, per-thread or shared, got {s:?}"
            )),
        }
    }
}

impl fmt::Display for HttpLayout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HttpLayout::PerCore => "per-core",
            HttpLayout::PerThread => "per-thread",
            HttpLayout::Shared => "shared",
        })
    }
}

/// The name of the built-in digits MLP (the model of `--weights`,
/// `--watch` and `--train`).
pub const DEFAULT_MODEL: &str = "digits";

/// Everything the server can be told. [`Config::default`] holds the
/// defaults of the command line, tuned with `wrk` (BENCHMARKS.md).
#[derive(Debug, Clone)]
pub struct Config {
    /// The address to listen on (default `127.0.0.1:8080`: loopback only).
    pub listen: SocketAddr,
    /// Train online while serving.
    pub train: bool,
    /// A checkpoint loaded at start when it exists, and where the current
    /// version is saved on shutdown. When it is a directory, or
    /// [`Config::checkpoint_every`] is set, it is a directory of numbered
    /// versions ([`netcl::io::CheckpointDir`]): its stale temporaries are
    /// removed at start, its highest complete version is loaded, and each
    /// version written takes the next number.
    pub weights: Option<PathBuf>,
    /// With [`Config::train`] and [`Config::weights`]: write the current
    /// version into the `weights` directory this often (when it changed),
    /// not only at shutdown ([`checkpointer`]).
    pub checkpoint_every: Option<Duration>,
    /// A checkpoint path to follow: each file renamed into place there is
    /// published as a new version.
    pub watch: Option<PathBuf>,
    /// More models, by name: each path is a checkpoint or a directory of
    /// numbered versions (see [`loader`]), loaded at start and followed
    /// like [`Config::watch`]. The built-in digits model is served beside
    /// them when this is empty or `train`, `weights` or `watch` is set.
    pub models: Vec<(String, PathBuf)>,
    /// The model of `/v1/predict` and `/v1/model`: by default the digits
    /// model when served, else the first of [`Config::models`].
    pub default_model: Option<String>,
    /// The most rows in one request, and in one forward.
    pub max_batch: usize,
    /// How long a model thread holding a request waits for more to batch.
    pub max_wait: Duration,
    /// Training steps between published versions.
    pub publish_every: u64,
    /// Model threads: each runs batched forwards. 0 starts none, so
    /// requests wait in the queue until they time out: only useful to test
    /// overload.
    pub threads: usize,
    /// Threads serving HTTP connections. With [`HttpLayout::PerCore`] (the
    /// default) and [`HttpLayout::PerThread`], [`start`] runs this many
    /// connection threads of its own (at least 1). With
    /// [`HttpLayout::Shared`], the worker threads of the async runtime the
    /// binary builds ([`start`] ignores it then).
    pub http_threads: usize,
    /// Where connections run: threads of the server's own, or the runtime
    /// [`start`] is called on.
    pub http_layout: HttpLayout,
    /// Predict requests that may wait for the model; one more is answered
    /// 503 at once.
    pub queue_capacity: usize,
    /// Open connections at most. When every one is taken, a new connection
    /// is accepted anyway and the longest-open idle connection (no request
    /// in progress; those that never sent one first) is closed to make room;
    /// only when every connection has a request in progress do new ones
    /// wait in the listen backlog. So clients that open connections and
    /// send nothing, or trickle their headers, cannot lock others out.
    pub max_connections: usize,
    /// The deadline of a whole request, body included (408 after it).
    pub request_timeout: Duration,
    /// How long a connection may take to send a request's headers, stay
    /// idle between requests, or leave a reply unread (a write to it
    /// waiting on a full socket), before it is closed.
    pub idle_timeout: Duration,
    /// How long shutdown waits for in-flight requests.
    pub drain_timeout: Duration,
    /// Epochs of the start-up training when there is no checkpoint.
    pub startup_epochs: usize,
    /// How often the `watch` path is checked.
    pub watch_interval: Duration,
    /// The share of one core the trainer may use, in `(0, 1]` (on top of
    /// its low OS priority).
    pub train_duty: f64,
    /// How the trainer yields the machine to serving (default
    /// [`TrainPriority::Idle`]: Linux's `SCHED_IDLE`, plus nice 19).
    pub train_priority: TrainPriority,
    /// The seed of the start-up model and of the training shuffle.
    pub seed: u64,
    /// The longest prompt a language model accepts, in characters (400
    /// beyond it).
    pub max_prompt: usize,
    /// The most characters one generate request may ask for (400 beyond
    /// it).
    pub max_tokens: usize,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            train: false,
            weights: None,
            checkpoint_every: None,
            watch: None,
            models: Vec::new(),
            default_model: None,
            max_batch: 64,
            max_wait: Duration::from_micros(0),
            publish_every: 10,
            threads: 1,
            http_threads: 2,
            http_layout: HttpLayout::PerCore,
            queue_capacity: 1024,
            max_connections: 512,
            request_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(5),
            startup_epochs: 30,
            watch_interval: Duration::from_millis(250),
            train_duty: 1.0,
            train_priority: TrainPriority::Idle,
            seed: 42,
            max_prompt: generate::DEFAULT_MAX_PROMPT,
            max_tokens: generate::DEFAULT_MAX_TOKENS,
        }
    }
}

/// Why the server could not start or stop cleanly.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// The listening socket could not be bound.
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The system's error.
        source: std::io::Error,
    },
    /// The start-up model could not be loaded or trained.
    Model(String),
    /// A thread could not be started, or failed.
    Thread(String),
    /// The checkpoint could not be saved on shutdown.
    Save(String),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Bind { addr, source } => write!(f, "cannot listen on {addr}: {source}"),
            Error::Model(message) => write!(f, "model: {message}"),
            Error::Thread(message) => write!(f, "thread: {message}"),
            Error::Save(message) => write!(f, "saving the checkpoint: {message}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Bind { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// What a stopped server did.
#[derive(Debug, Clone)]
pub struct Summary {
    /// The version serving when it stopped.
    pub version: u64,
    /// Where that version was saved, if `weights` was given.
    pub saved: Option<PathBuf>,
    /// Whether every in-flight request finished within the drain timeout.
    pub drained: bool,
}

/// A running server: its address, its model, and the way to stop it.
#[derive(Debug)]
pub struct Server {
    addr: SocketAddr,
    shutdown: Arc<signal::Sender<bool>>,
    model: Arc<ModelState>,
    models: Vec<(String, Arc<ModelState>)>,
    metrics: Arc<Metrics>,
    task: tokio::task::JoinHandle<Result<Summary, Error>>,
}

/// Stops a server from anywhere (a signal handler, a test); cheap to clone.
#[derive(Debug, Clone)]
pub struct ShutdownTrigger(Arc<signal::Sender<bool>>);

impl ShutdownTrigger {
    /// Starts a graceful shutdown: stop accepting, drain in-flight
    /// requests, stop training, save the checkpoint. Idempotent.
    pub fn shutdown(&self) {
        self.0.send_replace(true);
    }
}

impl Server {
    /// The address the server listens on (with the real port when
    /// [`Config::listen`] asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The default model's published versions and what is known of the
    /// current one.
    pub fn model(&self) -> &Arc<ModelState> {
        &self.model
    }

    /// Model `name`'s published versions, if it is served.
    pub fn model_named(&self, name: &str) -> Option<&Arc<ModelState>> {
        self.models.iter().find(|(n, _)| n == name).map(|(_, m)| m)
    }

    /// The server's metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// A handle that starts the shutdown.
    pub fn shutdown_trigger(&self) -> ShutdownTrigger {
        ShutdownTrigger(Arc::clone(&self.shutdown))
    }

    /// Starts a graceful shutdown (see [`ShutdownTrigger::shutdown`]).
    pub fn shutdown(&self) {
        self.shutdown.send_replace(true);
    }

    /// Waits until the server has stopped (after a shutdown was started)
    /// and says what it did.
    ///
    /// # Errors
    ///
    /// [`Error::Save`] if the checkpoint could not be written,
    /// [`Error::Thread`] if a thread panicked.
    pub async fn wait(self) -> Result<Summary, Error> {
        self.task
            .await
            .map_err(|err| Error::Thread(format!("the server task failed: {err}")))?
    }
}

/// The model to serve first, where it came from, and the steps behind it.
fn initial_model(config: &Config, digits: &Digits) -> Result<(netcl::nn::Mlp, VersionInfo), Error> {
    let info = |version, steps, loss, source| VersionInfo {
        version,
        training_steps: steps,
        last_loss: loss,
        accuracy: 0.0,
        source,
    };
    if let Some(dir) = versions_dir(config)? {
        match dir.remove_stale_temporaries() {
            Ok(removed) if !removed.is_empty() => {
                tracing::info!(?removed, "removed stale temporary checkpoint files");
            }
            Ok(_) => {}
            Err(err) => tracing::warn!("cannot remove stale temporary files: {err}"),
        }
        let latest = dir.latest().map_err(|e| Error::Model(e.to_string()))?;
        if let Some((version, path)) = latest {
            // The highest complete version must load: better to refuse to
            // start than to train from scratch beside it.
            let checkpoint = read_checkpoint(&path).map_err(|e| Error::Model(e.to_string()))?;
            tracing::info!(version, path = %path.display(), "resuming from a checkpoint");
            let steps = checkpoint.steps;
            return Ok((checkpoint.model, info(version, steps, None, "checkpoint")));
        }
    } else if let Some(path) = config.weights.as_ref().filter(|p| p.exists()) {
        // A checkpoint the operator named must load: better to refuse to
        // start than to serve (and later overwrite it with) another model.
        let checkpoint = read_checkpoint(path).map_err(|e| Error::Model(e.to_string()))?;
        let steps = checkpoint.steps;
        return Ok((
            checkpoint.model,
            info(checkpoint.version, steps, None, "checkpoint"),
        ));
    }
    if let Some(path) = config.watch.as_ref().filter(|p| p.exists()) {
        // The best version the path offers that loads (a file, or the
        // highest of a directory's numbered versions).
        for candidate in loader::candidates(path).unwrap_or_default() {
            match read_checkpoint(&candidate.file) {
                Ok(checkpoint) => {
                    let steps = checkpoint.steps;
                    let version = candidate.number.unwrap_or(checkpoint.version);
                    return Ok((checkpoint.model, info(version, steps, None, "checkpoint")));
                }
                Err(err) => tracing::error!("ignored the watched checkpoint at start: {err}"),
            }
        }
    }
    let trained = train_startup(digits, config.startup_epochs, config.seed)
        .map_err(|e| Error::Model(e.to_string()))?;
    Ok((
        trained.model,
        info(0, trained.steps, Some(trained.loss), "startup"),
    ))
}

/// The directory of numbered versions [`Config::weights`] names, if it
/// names one (a directory, or any path with [`Config::checkpoint_every`]),
/// created if missing.
fn versions_dir(config: &Config) -> Result<Option<netcl::io::CheckpointDir>, Error> {
    match &config.weights {
        Some(path) if path.is_dir() || config.checkpoint_every.is_some() => {
            netcl::io::CheckpointDir::create(path)
                .map(Some)
                .map_err(|e| Error::Model(e.to_string()))
        }
        _ => Ok(None),
    }
}

/// Whether `config` serves the built-in digits model.
fn serves_digits(config: &Config) -> bool {
    config.models.is_empty() || config.train || config.weights.is_some() || config.watch.is_some()
}

/// A `--model` model loaded at start: its name and first version.
struct Extra {
    name: String,
    loaded: loader::Loaded,
}

/// Starts a server on the current tokio runtime: loads or trains the
/// start-up model, loads each of [`Config::models`], binds
/// [`Config::listen`], starts each model's threads, the trainer (with
/// [`Config::train`]) and the watchers (with [`Config::watch`] and for
/// each of [`Config::models`]), and returns once it accepts connections.
///
/// # Errors
///
/// [`Error::Bind`] if the address cannot be bound, [`Error::Model`] if the
/// checkpoint at [`Config::weights`] exists but does not load, a path of
/// [`Config::models`] offers nothing that loads, two models share a name
/// or [`Config::default_model`] names none, and [`Error::Thread`] if a
/// thread cannot be started.
pub async fn start(config: Config) -> Result<Server, Error> {
    let started = Instant::now();
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| Error::Bind {
            addr: config.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| Error::Bind {
        addr: config.listen,
        source,
    })?;
    let http_threads = match config.http_layout {
        HttpLayout::Shared => None,
        layout => Some(
            http_threads::HttpThreads::start(config.http_threads, layout == HttpLayout::PerCore)
                .map_err(|err| {
                    Error::Thread(format!("cannot start the connection threads: {err}"))
                })?,
        ),
    };

    let with_digits = serves_digits(&config);
    // What each followed place offers before its model is loaded: the
    // watchers take anything offered after this as new (see `watch::run`).
    let sources = {
        let config = config.clone();
        tokio::task::spawn_blocking(move || {
            let offer = |path: &PathBuf| {
                let source: Arc<dyn source::VersionSource> = Arc::new(PathSource::new(path));
                let offer = source.latest();
                (source, offer)
            };
            let digits = config.watch.as_ref().map(offer);
            let models: Vec<_> = config.models.iter().map(|(_, path)| offer(path)).collect();
            (digits, models)
        })
        .await
        .map_err(|err| Error::Thread(err.to_string()))?
    };
    let (digits_source, mut model_sources) = (sources.0, sources.1.into_iter());
    let prepared = {
        let config = config.clone();
        tokio::task::spawn_blocking(move || -> Result<_, Error> {
            let digits = Digits::load().map_err(|e| Error::Model(e.to_string()))?;
            let first = if with_digits {
                let (model, mut info) = initial_model(&config, &digits)?;
                info.accuracy =
                    accuracy(&model, &digits.test).map_err(|e| Error::Model(e.to_string()))?;
                Some((model, info))
            } else {
                None
            };
            let loader = CheckpointLoader::new(digits.clone());
            let mut extras = Vec::new();
            for (name, path) in &config.models {
                let (_, loaded) = load_latest(&loader, path)
                    .map_err(|e| Error::Model(format!("model {name:?}: {e}")))?;
                extras.push(Extra {
                    name: name.clone(),
                    loaded,
                });
            }
            Ok((digits, first, extras))
        })
        .await
        .map_err(|err| Error::Thread(err.to_string()))??
    };
    let (digits, first, extras) = prepared;
    let metrics = Arc::new(Metrics::new());
    let loader: Arc<dyn ModelLoader> = Arc::new(CheckpointLoader::new(digits.clone()));
    let versions = versions_dir(&config)?;
    let configure = |builder: Builder| {
        builder
            .threads(config.threads)
            .queue_capacity(config.queue_capacity.max(1))
            .batching(config.max_batch.max(1), config.max_wait)
            .metrics(&metrics)
    };
    let (shutdown, shutdown_rx) = signal::channel(false);
    let shutdown = Arc::new(shutdown);
    let mut services = Vec::new();
    let mut states = Vec::new();
    let mut threads = Vec::new();
    let mut watchers = Vec::new();
    let mut first_info = None;
    let trainer_stop = Arc::new(AtomicBool::new(false));
    if let Some((live, info)) = first {
        let model = ModelState::new(&live, info).map_err(|e| Error::Model(e.to_string()))?;
        let service = configure(Builder::from_state(DEFAULT_MODEL, Arc::clone(&model)))
            .input(DigitsMlpLoader::input())
            .output(OutputSpec::Classes)
            .layers(crate::model::DIMS.to_vec())
            .training(config.train)
            .build()?;
        if config.train {
            let settings = TrainSettings {
                publish_every: config.publish_every,
                duty: config.train_duty,
                start_steps: info.training_steps,
                seed: config.seed,
            };
            threads.extend(
                trainer::spawn(
                    &live,
                    digits.clone(),
                    &model,
                    &metrics,
                    settings,
                    config.train_priority,
                    &trainer_stop,
                )
                .map_err(|err| Error::Thread(err.to_string()))?,
            );
            if let (Some(dir), Some(every)) = (versions.clone(), config.checkpoint_every) {
                threads.push(
                    checkpointer::spawn(dir, every, Arc::clone(&model), Arc::clone(&trainer_stop))
                        .map_err(|err| Error::Thread(err.to_string()))?,
                );
            }
        }
        if let Some(source) = digits_source {
            // The digits model follows digits checkpoints only.
            watchers.push(tokio::spawn(watch::run(
                source,
                config.watch_interval,
                Arc::new(DigitsMlpLoader::new(digits.clone())),
                (DigitsMlpLoader::input().row_shape().to_vec(), None),
                Arc::clone(&model),
                (Arc::clone(&metrics), Arc::new(DEFAULT_MODEL.to_string())),
                shutdown_rx.clone(),
            )));
        }
        first_info = Some(info);
        states.push((DEFAULT_MODEL.to_string(), model));
        services.push(service);
    }
    for extra in extras {
        let loaded = extra.loaded;
        let info = VersionInfo {
            version: loaded.version,
            training_steps: loaded.steps,
            last_loss: None,
            accuracy: loaded.accuracy.unwrap_or(f32::NAN),
            source: "checkpoint",
        };
        let model =
            ModelState::new(&*loaded.model, info).map_err(|e| Error::Model(e.to_string()))?;
        let row_shape = loaded.input.row_shape().to_vec();
        let lm = loaded.generation.map(|lm| {
            lm.max_prompt(config.max_prompt)
                .max_tokens(config.max_tokens)
        });
        let mut builder = configure(Builder::from_state(extra.name.clone(), Arc::clone(&model)))
            .output(loaded.output);
        builder = match &lm {
            // A language model answers generate only.
            Some(lm) => builder.language_model(lm.clone()),
            None => builder.input(loaded.input),
        };
        let service = builder.build()?;
        watchers.push(tokio::spawn(watch::run(
            model_sources
                .next()
                .ok_or_else(|| Error::Model(format!("no source for model {:?}", extra.name)))?,
            config.watch_interval,
            Arc::clone(&loader),
            (row_shape, lm),
            Arc::clone(&model),
            (Arc::clone(&metrics), Arc::new(extra.name.clone())),
            shutdown_rx.clone(),
        )));
        states.push((extra.name, model));
        services.push(service);
    }
    let mut models = Models::new(&metrics);
    models.request_timeout(config.request_timeout);
    for service in &services {
        models.add(service)?;
    }
    if let Some(name) = &config.default_model {
        models.set_default(name)?;
    }
    let router = models.router();
    let default = config
        .default_model
        .as_deref()
        .and_then(|name| states.iter().find(|(n, _)| n == name))
        .or_else(|| states.first())
        .map(|(_, m)| Arc::clone(m))
        .ok_or_else(|| Error::Model("no model to serve".to_string()))?;
    let version = default.info();
    tracing::info!(
        %addr,
        version = version.version,
        source = version.source,
        accuracy = first_info.map_or(f32::NAN, |i| i.accuracy),
        models = ?states.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
        train = config.train,
        watch = ?config.watch,
        weights = ?config.weights,
        max_batch = config.max_batch,
        max_wait_us = config.max_wait.as_micros() as u64,
        threads = config.threads,
        seconds = started.elapsed().as_secs_f64(),
        "netcl-serve started"
    );
    let task = tokio::spawn(serve(Serving {
        listener,
        http_threads,
        router,
        config,
        shutdown: shutdown_rx,
        default: Arc::clone(&default),
        digits_model: states
            .iter()
            .find(|(n, _)| with_digits && n == DEFAULT_MODEL)
            .map(|(_, m)| Arc::clone(m)),
        trainer_stop,
        versions,
        metrics: Arc::clone(&metrics),
        services,
        threads,
        watchers,
    }));
    Ok(Server {
        addr,
        shutdown,
        model: default,
        models: states,
        metrics,
        task,
    })
}

/// What the accept loop owns.
struct Serving {
    listener: TcpListener,
    /// The connection threads, unless [`HttpLayout::Shared`].
    http_threads: Option<http_threads::HttpThreads>,
    router: axum::Router,
    config: Config,
    shutdown: signal::Receiver<bool>,
    /// The default model.
    default: Arc<ModelState>,
    /// The digits model, whose versions go to `weights` at shutdown.
    digits_model: Option<Arc<ModelState>>,
    metrics: Arc<Metrics>,
    /// Every model's queue and model threads.
    services: Vec<ModelService>,
    trainer_stop: Arc<AtomicBool>,
    /// The directory of numbered versions `weights` names, if it does.
    versions: Option<netcl::io::CheckpointDir>,
    /// The trainer's threads.
    threads: Vec<JoinHandle<()>>,
    watchers: Vec<tokio::task::JoinHandle<()>>,
}

/// One accepted connection, to be served where the layout says.
struct Connection {
    http: hyper::server::conn::http1::Builder,
    router: axum::Router,
    slot: conns::Slot,
    watcher: hyper_util::server::graceful::Watcher,
    metrics: Arc<Metrics>,
    idle_timeout: Duration,
}

impl Connection {
    /// Serves the connection to its end (or its eviction), on the runtime
    /// that polls this future.
    async fn run(self, stream: tokio::net::TcpStream) {
        let Connection {
            http,
            router,
            slot,
            watcher,
            metrics,
            idle_timeout,
        } = self;
        // The connection is busy (not to be evicted) from when hyper hands
        // a request to the router until the router's future completes, or
        // a streamed response's body ends.
        let activity = slot.activity();
        let service = hyper::service::service_fn(move |request| {
            let busy = activity.begin_request();
            let response = router.clone().oneshot(request);
            async move {
                let response = response.await;
                response.map(|response| http::busy_while_streaming(response, busy))
            }
        });
        let connection = http.serve_connection(
            TokioIo::new(stall::StallTimeout::new(stream, idle_timeout)),
            service,
        );
        let connection = watcher.watch(connection);
        metrics.add_connections(1);
        match slot.run(connection).await {
            Some(Ok(())) => {}
            Some(Err(err)) => tracing::debug!("connection closed: {err}"),
            None => {
                metrics.record_eviction();
                tracing::debug!("closed an idle connection to make room for a new one");
            }
        }
        metrics.add_connections(-1);
        drop(slot);
    }
}

/// Accepts connections until shutdown, then drains, stops the threads and
/// saves the checkpoint.
async fn serve(serving: Serving) -> Result<Summary, Error> {
    let Serving {
        listener,
        http_threads,
        router,
        config,
        mut shutdown,
        default,
        digits_model,
        metrics,
        services,
        trainer_stop,
        versions,
        mut threads,
        watchers,
    } = serving;
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(config.idle_timeout)
        .keep_alive(true);
    let graceful = GracefulShutdown::new();
    let mut slots = conns::Slots::new(config.max_connections);
    loop {
        // Accept first, then find a slot: when all are taken, an idle
        // connection gives its slot up (see `conns`).
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.wait_for(|stop| *stop) => break,
        };
        let stream = match accepted {
            Ok((stream, _peer)) => stream,
            Err(err) => {
                // Out of file descriptors, say: wait, then retry.
                tracing::error!("accept failed: {err}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let slot = tokio::select! {
            slot = slots.take() => slot,
            _ = shutdown.wait_for(|stop| *stop) => break,
        };
        let _ = stream.set_nodelay(true);
        let connection = Connection {
            http: http.clone(),
            router: router.clone(),
            slot,
            watcher: graceful.watcher(),
            metrics: Arc::clone(&metrics),
            idle_timeout: config.idle_timeout,
        };
        match &http_threads {
            // Handed over as a std socket, to be registered with the
            // connection thread's own runtime.
            Some(pool) => match stream.into_std() {
                Ok(stream) => pool.spawn(stream, move |stream| connection.run(stream)),
                Err(err) => tracing::error!("cannot hand a connection over: {err}"),
            },
            None => {
                tokio::spawn(connection.run(stream));
            }
        }
    }
    drop(listener);
    tracing::debug!("no longer accepting connections");
    let drained = tokio::time::timeout(config.drain_timeout, graceful.shutdown())
        .await
        .is_ok();
    if !drained {
        tracing::error!(
            "in-flight requests still running after {} ms; stopping anyway",
            config.drain_timeout.as_millis()
        );
    }
    trainer_stop.store(true, Ordering::Relaxed);
    if let Some(pool) = http_threads {
        threads.extend(pool.stop());
    }
    for service in services {
        let (stop, model_threads) = service.into_threads();
        stop.store(true, Ordering::Relaxed);
        threads.extend(model_threads);
    }
    for watcher in watchers {
        let _ = watcher.await;
    }
    let joined = tokio::task::spawn_blocking(move || {
        // Join every thread, even after one that panicked.
        let panicked = threads
            .into_iter()
            .map(JoinHandle::join)
            .filter(Result::is_err)
            .count();
        panicked == 0
    })
    .await
    .unwrap_or(false);
    if !joined {
        tracing::error!("a model or training thread panicked");
    }
    let mut saved = None;
    // A directory of versions gets a new version at shutdown when the
    // model trained here (or was trained at start-up into an empty one).
    let versioned = versions.is_some();
    let write_dir = versions.filter(|dir| config.train || matches!(dir.latest(), Ok(None)));
    if let (Some(dir), Some(model)) = (write_dir, digits_model.as_ref()) {
        let model = Arc::clone(model);
        let (_, path) = tokio::task::spawn_blocking(move || checkpointer::write_next(&dir, &model))
            .await
            .map_err(|err| Error::Save(err.to_string()))?
            .map_err(|err| Error::Save(err.to_string()))?;
        saved = Some(path);
    } else if let (false, Some(path), Some(model)) = (versioned, config.weights, digits_model) {
        let current = model.published().load();
        let steps = model.info().training_steps;
        let version = current.number();
        let path_for_save = path.clone();
        tokio::task::spawn_blocking(move || {
            model::save_checkpoint(&**current, version, steps, &path_for_save)
        })
        .await
        .map_err(|err| Error::Save(err.to_string()))?
        .map_err(|err| Error::Save(err.to_string()))?;
        saved = Some(path);
    }
    let version = default.published().version();
    tracing::info!(version, drained, saved = ?saved, "netcl-serve stopped");
    Ok(Summary {
        version,
        saved,
        drained,
    })
}
