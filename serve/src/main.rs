//! The `netcl-serve` binary: the command line over [`netcl_serve::start`].

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use tokio::signal::unix::{Signal, SignalKind, signal};

#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use netcl_serve::{Config, HttpLayout, TrainPriority};

/// Serves models over HTTP (JSON): the built-in digits MLP, optionally
/// training it online, and any number of models from checkpoints.
///
/// Endpoints: GET /v1/models, GET /v1/models/NAME, POST
/// /v1/models/NAME/predict, POST /v1/models/NAME/generate (language
/// models; "stream": true sends server-sent events), POST /v1/predict and GET /v1/model (the default
/// model's), GET /healthz, GET /metrics. Stops gracefully on SIGINT or
/// SIGTERM, saving the digits model's current version to --weights if
/// given. Logs go to stderr; set RUST_LOG (e.g. debug) for more.
#[derive(Debug, Parser)]
#[command(name = "netcl-serve", version, after_long_help = COMBINING)]
struct Cli {
    /// The address to listen on. The default binds the loopback interface only.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Train the model online (AdamW on the digits, at low priority) while serving.
    #[arg(long)]
    train: bool,
    /// A checkpoint (safetensors) loaded at start if it exists (else the model
    /// is trained at start-up), and where the current version is saved on
    /// shutdown, with its version number in the metadata. A directory (or any
    /// PATH with --checkpoint-every) holds numbered versions N.safetensors:
    /// stale temporaries are removed at start, the highest complete version is
    /// loaded, and each save writes the next number.
    #[arg(long, value_name = "PATH")]
    weights: Option<PathBuf>,
    /// With --train and --weights DIR: write the current version into DIR as
    /// a new numbered version every SECONDS (atomic and fsynced), not only at
    /// shutdown. A failed write (a full disk) is logged; training goes on.
    #[arg(long, value_name = "SECONDS", value_parser = parse_seconds)]
    checkpoint_every: Option<Duration>,
    /// Follow a checkpoint: each new version at PATH (a file renamed into
    /// place, or a higher N.safetensors in a directory) is loaded and
    /// published; a bad one is logged and ignored, the previous keeps
    /// serving. PATH follows the digits model; NAME=PATH follows model NAME
    /// (as --model NAME=PATH), which may be combined with --train.
    #[arg(long, value_name = "[NAME=]PATH")]
    watch: Vec<String>,
    /// How often (milliseconds) watched paths (--watch, --model) are checked
    /// for a new version.
    #[arg(long, value_name = "MS", default_value_t = Config::default().watch_interval.as_millis() as u64, value_parser = clap::value_parser!(u64).range(1..))]
    watch_interval_ms: u64,
    /// Serve the checkpoint at PATH as model NAME (repeatable). PATH is a
    /// checkpoint file or a directory of numbered versions (N.safetensors or
    /// N/model.safetensors; the highest that loads is served), followed like
    /// --watch. Self-describing checkpoints (netcl::io::save_model) load as
    /// any model; plain weight files as the digits MLP.
    #[arg(long = "model", value_name = "NAME=PATH", value_parser = parse_model)]
    models: Vec<(String, PathBuf)>,
    /// The model /v1/predict and /v1/model serve (default: digits when it is
    /// served, else the first --model).
    #[arg(long, value_name = "NAME")]
    default_model: Option<String>,
    /// The most rows per request and per batched forward.
    #[arg(long, value_name = "N", default_value_t = Config::default().max_batch as u64, value_parser = clap::value_parser!(u64).range(1..=4096))]
    max_batch: u64,
    /// How long (microseconds) the model waits for more requests to batch
    /// with one it holds. 0: batch only what is already queued.
    #[arg(long, value_name = "N", default_value_t = Config::default().max_wait.as_micros() as u64)]
    max_wait_us: u64,
    /// Training steps between published versions (with --train).
    #[arg(long, value_name = "N", default_value_t = Config::default().publish_every, value_parser = clap::value_parser!(u64).range(1..))]
    publish_every: u64,
    /// Model threads: each runs batched forwards, off the HTTP threads.
    #[arg(long, value_name = "N", default_value_t = Config::default().threads as u64, value_parser = clap::value_parser!(u64).range(1..=256))]
    threads: u64,
    /// Threads serving HTTP connections: connection threads, or runtime
    /// workers with --http-layout shared.
    #[arg(long, value_name = "N", default_value_t = Config::default().http_threads as u64, value_parser = clap::value_parser!(u64).range(1..=256))]
    http_threads: u64,
    /// per-core: each connection lives on one of --http-threads threads,
    /// each with a single-threaded runtime of its own and pinned to its own
    /// CPU, woken once per batch by the model threads. per-thread: the
    /// same, unpinned. shared: every connection is a task of one
    /// multi-threaded runtime of --http-threads workers (the layout before).
    #[arg(long, value_name = "per-core|per-thread|shared", default_value_t = Config::default().http_layout)]
    http_layout: HttpLayout,
    /// Predict requests that may wait for the model; beyond it, 503 at once.
    #[arg(long, value_name = "N", default_value_t = Config::default().queue_capacity as u64, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    queue: u64,
    /// The most open connections. When all are taken, a new one closes the
    /// longest-open idle connection (silent ones first); only when every one
    /// has a request in progress do new ones wait in the listen backlog.
    #[arg(long, value_name = "N", default_value_t = Config::default().max_connections as u64, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    max_connections: u64,
    /// The deadline of a whole request, body included (milliseconds). A
    /// generation stops there with finish_reason "timeout" (what it generated
    /// by then is answered); for a streamed one ("stream": true) it bounds
    /// the whole stream.
    #[arg(long, value_name = "MS", default_value_t = Config::default().request_timeout.as_millis() as u64, value_parser = clap::value_parser!(u64).range(1..))]
    request_timeout_ms: u64,
    /// Close a connection that takes longer than this to send a request's
    /// headers, idles this long between requests, or leaves a reply unread
    /// this long (milliseconds).
    #[arg(long, value_name = "MS", default_value_t = Config::default().idle_timeout.as_millis() as u64, value_parser = clap::value_parser!(u64).range(1..))]
    idle_timeout_ms: u64,
    /// Epochs of the start-up training when there is no checkpoint.
    #[arg(long, value_name = "N", default_value_t = Config::default().startup_epochs as u64)]
    startup_epochs: u64,
    /// The share of one core the trainer may use, in (0, 1], on top of its
    /// low OS priority.
    #[arg(long, value_name = "F", default_value_t = Config::default().train_duty)]
    train_duty: f64,
    /// How the trainer yields the machine to serving: idle (Linux's
    /// SCHED_IDLE plus nice 19: it runs only on cores serving leaves idle)
    /// or low (nice 19 only: it keeps a few percent of a loaded core).
    #[arg(long, value_name = "idle|low", default_value_t = Config::default().train_priority)]
    train_priority: TrainPriority,
    /// The longest prompt (characters) a language model's generate accepts;
    /// beyond it, 400.
    #[arg(long, value_name = "N", default_value_t = Config::default().max_prompt as u64, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    max_prompt: u64,
    /// The most characters one generate request may ask for; beyond it, 400.
    #[arg(long, value_name = "N", default_value_t = Config::default().max_tokens as u64, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    max_tokens: u64,
}

/// How the model flags combine (the end of `--help`).
const COMBINING: &str = "\
How --weights, --watch, --train and --model combine:
  Per model, a process either trains it (and writes its versions) or serves
  a path (and follows it).
  - The built-in model `digits` is served when no --model is given, or when
    --train, --weights or --watch is. It is the default model then.
  - --train trains `digits` online; --weights PATH loads it from PATH at start
    (if PATH exists) and saves it there at shutdown (and every
    --checkpoint-every SECONDS, as numbered versions of the directory PATH).
    --watch PATH follows a trainer's PATH instead (a replica): `digits` is
    trained or followed, so --watch PATH excludes --train.
  - --model NAME=PATH (or --watch NAME=PATH) serves and follows PATH as model
    NAME, never trains it and never writes to it: a process may train
    `digits` and follow other models. NAME must differ from every other
    model's (`digits` included when it is served).
Examples:
  netcl-serve --train --weights digits.safetensors          # train, serve, save
  netcl-serve --watch digits.safetensors                     # a replica of it
  netcl-serve --train --weights ckpt/ --checkpoint-every 10  # a live trainer
  netcl-serve --watch ckpt/ --listen 127.0.0.1:8081          # a replica following it
  netcl-serve --train --watch b=/srv/b                       # train digits, follow b
  netcl-serve --model a=/srv/a --model b=/srv/b.safetensors  # two models, no training
  netcl-serve --train --model b=/srv/b --default-model b     # digits trains beside b";

/// Parses a positive number of seconds (fractions allowed).
fn parse_seconds(text: &str) -> Result<Duration, String> {
    let seconds: f64 = text
        .parse()
        .map_err(|_| format!("expected a number of seconds, got {text:?}"))?;
    if !(seconds > 0.0 && seconds <= 1e9) {
        return Err(format!("expected seconds in (0, 1e9], got {text:?}"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// Parses `NAME=PATH`.
fn parse_model(text: &str) -> Result<(String, PathBuf), String> {
    let (name, path) = text
        .split_once('=')
        .ok_or_else(|| format!("expected NAME=PATH, got {text:?}"))?;
    if name.is_empty() || name.contains('/') || path.is_empty() {
        return Err(format!(
            "expected NAME=PATH with a NAME without '/' and a PATH, got {text:?}"
        ));
    }
    Ok((name.to_string(), PathBuf::from(path)))
}

impl Cli {
    fn config(&self) -> Result<Config, String> {
        if !(self.train_duty > 0.0 && self.train_duty <= 1.0) {
            return Err(format!(
                "--train-duty must be in (0, 1], got {}",
                self.train_duty
            ));
        }
        let mut watch = None;
        let mut models = self.models.clone();
        for spec in &self.watch {
            // NAME=PATH when the part before `=` names a model.
            match spec.split_once('=') {
                Some((name, _)) if !name.is_empty() && !name.contains('/') => {
                    models.push(parse_model(spec)?);
                }
                _ if watch.is_none() => watch = Some(PathBuf::from(spec)),
                _ => return Err("--watch PATH (the digits model) is given twice".to_string()),
            }
        }
        if self.train && watch.is_some() {
            return Err(
                "--train and --watch PATH exclude each other: the digits model is either trained \
                 here or followed from a trainer's checkpoint (--watch NAME=PATH follows another \
                 model beside training)"
                    .to_string(),
            );
        }
        if self.checkpoint_every.is_some() && !(self.train && self.weights.is_some()) {
            return Err(
                "--checkpoint-every needs --train and --weights DIR (where the versions go)"
                    .to_string(),
            );
        }
        let size = |n: u64| usize::try_from(n).map_err(|e| e.to_string());
        Ok(Config {
            listen: self.listen,
            train: self.train,
            weights: self.weights.clone(),
            checkpoint_every: self.checkpoint_every,
            watch,
            models,
            default_model: self.default_model.clone(),
            max_batch: size(self.max_batch)?,
            max_wait: Duration::from_micros(self.max_wait_us),
            publish_every: self.publish_every,
            threads: size(self.threads)?,
            http_threads: size(self.http_threads)?,
            http_layout: self.http_layout,
            queue_capacity: size(self.queue)?,
            max_connections: size(self.max_connections)?,
            request_timeout: Duration::from_millis(self.request_timeout_ms),
            idle_timeout: Duration::from_millis(self.idle_timeout_ms),
            startup_epochs: size(self.startup_epochs)?,
            train_duty: self.train_duty,
            train_priority: self.train_priority,
            watch_interval: Duration::from_millis(self.watch_interval_ms),
            max_prompt: size(self.max_prompt)?,
            max_tokens: size(self.max_tokens)?,
            ..Config::default()
        })
    }
}

/// Turns transparent huge pages off for this process (Linux).
///
/// mimalloc advises its arenas for huge pages (`MADV_HUGEPAGE`), and the
/// kernel's khugepaged then collapses any 2 MiB range with a page in use
/// into a whole huge page: under steady traffic resident memory crept up
/// by 2 MiB at a time for as long as the server ran, with no allocation
/// leaked (a one-hour soak: BENCHMARKS.md, "Soak"). A server of tens of
/// MiB gains nothing measurable from huge pages, and its resident memory
/// should track what it uses, so the process opts out at start-up
/// (`prctl(PR_SET_THP_DISABLE)`, inherited by every thread). A failure is
/// logged and changes nothing else.
fn opt_out_of_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    if let Err(err) = rustix::thread::disable_transparent_huge_pages(true) {
        tracing::warn!("cannot turn transparent huge pages off: {err}");
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    opt_out_of_transparent_huge_pages();
    let config = match cli.config() {
        Ok(config) => config,
        Err(message) => {
            tracing::error!("{message}");
            return ExitCode::from(2);
        }
    };
    // With connection threads, the runtime only accepts, follows
    // checkpoints and waits for signals: one worker is enough.
    let (workers, name) = match config.http_layout {
        HttpLayout::Shared => (config.http_threads, "netcl-http"),
        _ => (1, "netcl-main"),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .thread_name(name)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            tracing::error!("cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> Result<(), netcl_serve::Error> {
    // Listen for the signals before anything else, so that one arriving
    // during start-up is kept and honoured as soon as the server runs,
    // instead of killing the process.
    let signals = Signals::new();
    let server = netcl_serve::start(config).await?;
    let trigger = server.shutdown_trigger();
    tokio::spawn(async move {
        let signal = signals.recv().await;
        tracing::info!("received {signal}: shutting down");
        trigger.shutdown();
    });
    server.wait().await?;
    Ok(())
}

/// SIGINT and SIGTERM, registered when created.
struct Signals {
    interrupt: Option<Signal>,
    terminate: Option<Signal>,
}

impl Signals {
    fn new() -> Signals {
        let register = |kind: SignalKind, name: &str| match signal(kind) {
            Ok(stream) => Some(stream),
            Err(err) => {
                tracing::error!("cannot listen for {name}: {err}");
                None
            }
        };
        Signals {
            interrupt: register(SignalKind::interrupt(), "SIGINT"),
            terminate: register(SignalKind::terminate(), "SIGTERM"),
        }
    }

    /// Waits for either signal and names it.
    async fn recv(mut self) -> &'static str {
        async fn next(stream: Option<&mut Signal>) {
            match stream {
                Some(stream) => {
                    stream.recv().await;
                }
                None => std::future::pending().await,
            }
        }
        tokio::select! {
            () = next(self.interrupt.as_mut()) => "SIGINT",
            () = next(self.terminate.as_mut()) => "SIGTERM",
        }
    }
}
