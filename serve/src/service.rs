//! The library API: serve any [`Module`] held in a [`Published`] over HTTP.
//!
//! A [`ModelService`] is one model with its own bounded queue and model
//! threads (the micro-batcher of [`crate::batcher`]), an [`InputSpec`]
//! saying what a row is, and an [`OutputSpec`] saying what a response
//! carries. [`ModelService::router`] gives an axum [`Router`] to nest in an
//! application; [`Models`] puts several services behind one router
//! (`/v1/models`, `/v1/models/{name}`, `/v1/models/{name}/predict`, with
//! `/v1/predict` and `/v1/model` the default model's aliases);
//! [`ModelHandle`] publishes new versions while it serves.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use axum::Router;
use netcl::Tensor;
use netcl::nn::{Module, Published};

use crate::batcher::{self, BatchSettings, Doorbell, Queued};
use crate::generate::{Generation, LanguageModel};
use crate::metrics::{Metrics, RequestSeries, Route};
use crate::model::{ModelState, VersionInfo};
use crate::{Config, Error};

/// A function applied to each batch of rows before the forward (scaling,
/// say): it gets the rows as a `[rows, shape...]` tensor.
pub type Preprocess = Arc<dyn Fn(&Tensor) -> netcl::Result<Tensor> + Send + Sync>;

/// A function of one row's output (its values, flattened) to the JSON
/// value answered for that row.
pub type RowMap = Arc<dyn Fn(&[f32]) -> serde_json::Value + Send + Sync>;

/// What one input row is: its shape (sent flattened, as one JSON array of
/// that many numbers), the range its values must be in, and a
/// preprocessing applied to the batch before the forward.
#[derive(Clone)]
pub struct InputSpec {
    pub(crate) shape: Vec<usize>,
    pub(crate) width: usize,
    pub(crate) range: Option<(f32, f32)>,
    pub(crate) preprocess: Option<Preprocess>,
}

impl fmt::Debug for InputSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InputSpec")
            .field("shape", &self.shape)
            .field("range", &self.range)
            .field("preprocess", &self.preprocess.is_some())
            .finish()
    }
}

impl InputSpec {
    /// Rows of `width` numbers: the model sees `[rows, width]`.
    pub fn rows(width: usize) -> InputSpec {
        InputSpec::shape(&[width])
    }

    /// Rows of shape `shape` (`[1, 8, 8]` for one-channel 8x8 images, say),
    /// each sent as `shape`'s product of numbers, row-major: the model sees
    /// `[rows, shape...]`.
    pub fn shape(shape: &[usize]) -> InputSpec {
        InputSpec {
            shape: shape.to_vec(),
            width: shape.iter().product(),
            range: None,
            preprocess: None,
        }
    }

    /// Refuses (422) a value outside `low..=high`. Values must be finite
    /// in any case.
    pub fn range(mut self, low: f32, high: f32) -> InputSpec {
        self.range = Some((low, high));
        self
    }

    /// Applies `f` to each batch before the forward.
    pub fn preprocess(
        mut self,
        f: impl Fn(&Tensor) -> netcl::Result<Tensor> + Send + Sync + 'static,
    ) -> InputSpec {
        self.preprocess = Some(Arc::new(f));
        self
    }

    /// The shape of one row.
    pub fn row_shape(&self) -> &[usize] {
        &self.shape
    }

    /// The numbers in one row.
    pub fn width(&self) -> usize {
        self.width
    }

    /// What `GET /v1/models` shows of it.
    pub(crate) fn describe(&self) -> serde_json::Value {
        serde_json::json!({
            "shape": self.shape,
            "range": self.range.map(|(low, high)| [low, high]),
            "preprocessed": self.preprocess.is_some(),
        })
    }
}

/// What a predict response carries for each row (besides the version that
/// computed it).
#[derive(Clone)]
pub enum OutputSpec {
    /// `"classes"` (the arg-max of the output's last axis) and
    /// `"probabilities"` (its softmax): for a classifier returning
    /// `[rows, classes]` logits.
    Classes,
    /// `"outputs"`: each row's output values, as they come.
    Logits,
    /// `"outputs"`: a function of each row's output values (flattened).
    Map(RowMap),
}

impl fmt::Debug for OutputSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.kind())
    }
}

impl OutputSpec {
    /// A [`OutputSpec::Map`] of `f`.
    pub fn map(f: impl Fn(&[f32]) -> serde_json::Value + Send + Sync + 'static) -> OutputSpec {
        OutputSpec::Map(Arc::new(f))
    }

    pub(crate) fn kind(&self) -> &'static str {
        match self {
            OutputSpec::Classes => "classes",
            OutputSpec::Logits => "logits",
            OutputSpec::Map(_) => "map",
        }
    }
}

/// What a model's batcher and handlers need to know about it.
#[derive(Debug)]
pub(crate) struct Spec {
    pub(crate) input: InputSpec,
    pub(crate) output: OutputSpec,
}

/// One model as the router sees it: its queue and what it serves.
#[derive(Debug)]
pub(crate) struct Entry {
    pub(crate) name: Arc<String>,
    pub(crate) jobs: crossbeam_channel::Sender<Queued>,
    /// Rung after a job is queued.
    pub(crate) doorbell: Arc<Doorbell>,
    pub(crate) queue_capacity: usize,
    pub(crate) model: Arc<ModelState>,
    pub(crate) spec: Arc<Spec>,
    pub(crate) max_batch: usize,
    pub(crate) parameters: usize,
    /// The digits MLP's layer widths (`GET /v1/model`'s `layers`).
    pub(crate) layers: Option<Vec<usize>>,
    /// Whether a trainer publishes its versions.
    pub(crate) training: bool,
    /// The request series of `/v1/predict` (when it is the default) and of
    /// `/v1/models/{name}/predict`.
    pub(crate) series: [RequestSeries; 2],
    /// For a language model: how to generate from it.
    pub(crate) generation: Option<Arc<Generation>>,
    /// Whether it answers predict (a language model served without an
    /// [`InputSpec`] does not).
    pub(crate) predicts: bool,
}

/// Builds a [`ModelService`]; from [`ModelService::builder`].
#[must_use]
pub struct ModelServiceBuilder {
    name: String,
    state: Arc<ModelState>,
    input: Option<InputSpec>,
    output: OutputSpec,
    threads: usize,
    queue_capacity: usize,
    batch: BatchSettings,
    metrics: Option<Arc<Metrics>>,
    layers: Option<Vec<usize>>,
    training: bool,
    language_model: Option<LanguageModel>,
}

impl fmt::Debug for ModelServiceBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ModelServiceBuilder")
            .field("name", &self.name)
            .field("input", &self.input)
            .field("output", &self.output)
            .finish_non_exhaustive()
    }
}

impl ModelServiceBuilder {
    /// What an input row is. Required, except for a language model
    /// ([`ModelServiceBuilder::language_model`]) that answers generate only.
    pub fn input(mut self, input: InputSpec) -> Self {
        self.input = Some(input);
        self
    }

    /// What a response carries (default [`OutputSpec::Classes`]).
    pub fn output(mut self, output: OutputSpec) -> Self {
        self.output = output;
        self
    }

    /// Model threads, each running batched forwards (default 1; 0 starts
    /// none, so requests wait until they time out: only to test overload).
    pub fn threads(mut self, threads: usize) -> Self {
        self.threads = threads;
        self
    }

    /// Requests that may wait in this model's queue; one more is answered
    /// 503 at once (default 1024).
    pub fn queue_capacity(mut self, capacity: usize) -> Self {
        self.queue_capacity = capacity.max(1);
        self
    }

    /// The most rows in one request and one forward (default 64), and how
    /// long a model thread holding a request waits for more (default 0:
    /// batch only what is queued).
    pub fn batching(mut self, max_batch: usize, max_wait: Duration) -> Self {
        self.batch = BatchSettings {
            max_batch: max_batch.max(1),
            max_wait,
        };
        self
    }

    /// The metrics to record into (shared by the models of one
    /// [`Models`]); a new set by default.
    pub fn metrics(mut self, metrics: &Arc<Metrics>) -> Self {
        self.metrics = Some(Arc::clone(metrics));
        self
    }

    /// Serves the model as a character language model too: `POST
    /// /v1/models/{name}/generate` (see [`crate::generate`]), with at most
    /// [`threads`](ModelServiceBuilder::threads) generations running at
    /// once. Without an [`input`](ModelServiceBuilder::input), the model
    /// answers generate only (predict is refused with a 400 saying so).
    ///
    /// # Examples
    ///
    /// ```
    /// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use axum::body::Body;
    /// use axum::http::Request;
    /// use http_body_util::BodyExt;
    /// use netcl::models::{CharLmConfig, CharTransformer, Vocab};
    /// use netcl::nn::Published;
    /// use netcl_serve::ModelService;
    /// use netcl_serve::generate::LanguageModel;
    /// use tower::ServiceExt;
    ///
    /// let vocab = Vocab::from_text("hello world");
    /// let config = CharLmConfig::new(vocab.len()).with_width(8).with_heads(2).with_blocks(1).with_context(16);
    /// let model = CharTransformer::zeros(config)?;
    /// let service = ModelService::builder("lm", Published::new(&model)?)
    ///     .language_model(LanguageModel::new(vocab, config))
    ///     .build()?;
    ///
    /// let request = Request::post("/v1/models/lm/generate")
    ///     .body(Body::from(r#"{"prompt": "hello", "max_tokens": 5, "seed": 1}"#))?;
    /// let response = service.router().oneshot(request).await?;
    /// assert_eq!(response.status(), 200);
    /// let body: serde_json::Value =
    ///     serde_json::from_slice(&response.into_body().collect().await?.to_bytes())?;
    /// assert_eq!(body["text"].as_str().unwrap().chars().count(), 5);
    /// assert_eq!(body["version"], 0);
    /// # Ok(()) }
    /// ```
    pub fn language_model(mut self, lm: LanguageModel) -> Self {
        self.language_model = Some(lm);
        self
    }

    pub(crate) fn layers(mut self, layers: Vec<usize>) -> Self {
        self.layers = Some(layers);
        self
    }

    pub(crate) fn training(mut self, training: bool) -> Self {
        self.training = training;
        self
    }

    /// Starts the model threads and returns the service.
    ///
    /// # Errors
    ///
    /// [`Error::Model`] without an [`InputSpec`], with a row shape of no
    /// numbers or an empty name; [`Error::Thread`] if a thread cannot start.
    pub fn build(self) -> Result<ModelService, Error> {
        let predicts = self.input.is_some();
        let input = match (self.input, &self.language_model) {
            (Some(input), _) => input,
            // Predict is refused before a row is read: any spec will do.
            (None, Some(_)) => InputSpec::rows(1),
            (None, None) => {
                return Err(Error::Model(format!(
                    "model {:?}: no input spec (ModelServiceBuilder::input) and not a language \
                     model (ModelServiceBuilder::language_model)",
                    self.name
                )));
            }
        };
        if input.width == 0 {
            return Err(Error::Model(format!(
                "model {:?}: the input row shape {:?} holds no numbers",
                self.name, input.shape
            )));
        }
        if self.name.is_empty() || self.name.contains('/') {
            return Err(Error::Model(format!(
                "model name {:?}: expected a non-empty name without '/'",
                self.name
            )));
        }
        let metrics = self.metrics.unwrap_or_default();
        let name = Arc::new(self.name);
        let spec = Arc::new(Spec {
            input,
            output: self.output,
        });
        let parameters = self.state.published().load().num_parameters();
        let (jobs, queue) = crossbeam_channel::bounded(self.queue_capacity);
        let stop = Arc::new(AtomicBool::new(false));
        let generation = self
            .language_model
            .map(|lm| Arc::new(Generation::new(lm, self.threads)));
        let threads = batcher::spawn(
            if predicts { self.threads } else { 0 },
            &queue,
            &self.state,
            &spec,
            &metrics,
            &name,
            self.batch,
            &stop,
        )
        .map_err(|err| Error::Thread(err.to_string()))?;
        let doorbell = Arc::new(Doorbell::new(&threads));
        let series =
            [Route::Predict, Route::ModelPredict].map(|route| metrics.request_series(route, &name));
        Ok(ModelService {
            entry: Arc::new(Entry {
                series,
                name,
                jobs,
                doorbell,
                queue_capacity: self.queue_capacity,
                model: self.state,
                spec,
                max_batch: self.batch.max_batch,
                parameters,
                layers: self.layers,
                training: self.training,
                generation,
                predicts,
            }),
            metrics,
            threads,
            stop,
            _queue: queue,
        })
    }
}

/// A model served over HTTP: its queue, its model threads, and what its
/// requests and responses are. Dropping it stops its model threads once no
/// router holds its queue any more; [`ModelService::stop`] stops them now.
///
/// # Examples
///
/// A model of one's own (any [`Module`]) served in a few lines:
///
/// ```
/// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use axum::body::Body;
/// use axum::http::Request;
/// use http_body_util::BodyExt;
/// use netcl::Tensor;
/// use netcl::nn::{Linear, Published};
/// use netcl_serve::{InputSpec, ModelService, OutputSpec};
/// use tower::ServiceExt;
///
/// let model = Linear::from_parts(Tensor::from_vec(vec![1.0, 0.0, 0.0, 1.0], &[2, 2])?, None)?;
/// let service = ModelService::builder("double", Published::new(&model)?)
///     .input(InputSpec::rows(2).preprocess(|x| Ok(x * 2.0)))
///     .output(OutputSpec::Logits)
///     .build()?;
/// let handle = service.handle();
/// // Nest it in an app of one's own, then serve `app` with axum::serve.
/// let app = axum::Router::new().nest("/api", service.router());
///
/// let request = Request::post("/api/v1/models/double/predict")
///     .body(Body::from(r#"{"inputs": [[1, 2]]}"#))?;
/// let response = app.clone().oneshot(request).await?;
/// let body = response.into_body().collect().await?.to_bytes();
/// assert_eq!(&body[..], br#"{"outputs":[[2.0,4.0]],"version":0}"#);
///
/// handle.publish(&model)?; // version 1 answers from now on
/// assert_eq!(handle.version(), 1);
/// # Ok(()) }
/// ```
pub struct ModelService {
    entry: Arc<Entry>,
    metrics: Arc<Metrics>,
    threads: Vec<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    /// Kept so that the queue stays open even without model threads.
    _queue: crossbeam_channel::Receiver<Queued>,
}

impl fmt::Debug for ModelService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ModelService")
            .field("name", &self.entry.name)
            .field("spec", &self.entry.spec)
            .finish_non_exhaustive()
    }
}

impl ModelService {
    /// Serves the versions of `published` as model `name` (a path segment:
    /// non-empty, no `/`).
    pub fn builder(name: impl Into<String>, published: Published) -> ModelServiceBuilder {
        let info = VersionInfo {
            version: published.version(),
            training_steps: 0,
            last_loss: None,
            accuracy: f32::NAN,
            source: "library",
        };
        ModelServiceBuilder::from_state(name, ModelState::from_published(published, info))
    }

    /// The model's name.
    pub fn name(&self) -> &str {
        &self.entry.name
    }

    /// Publishes new versions of the model while it serves.
    pub fn handle(&self) -> ModelHandle {
        ModelHandle {
            state: Arc::clone(&self.entry.model),
        }
    }

    /// The metrics it records into.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// A router serving this model alone, as the default model: `POST
    /// /v1/models/{name}/predict`, `GET /v1/models/{name}`, `GET
    /// /v1/models`, the aliases `POST /v1/predict` and `GET /v1/model`, and
    /// `GET /metrics`, with a 5 s request deadline.
    pub fn router(&self) -> Router {
        let mut models = Models::new(&self.metrics);
        models
            .add(self)
            .expect("one model has no name taken by another");
        models.router()
    }

    /// Stops the model threads (requests still queued are answered 503)
    /// and waits for them.
    ///
    /// # Errors
    ///
    /// [`Error::Thread`] if a model thread panicked.
    pub fn stop(self) -> Result<(), Error> {
        let (stop, threads) = self.into_threads();
        stop.store(true, Ordering::Relaxed);
        let panicked = threads
            .into_iter()
            .map(JoinHandle::join)
            .filter(Result::is_err)
            .count();
        if panicked > 0 {
            return Err(Error::Thread(format!("{panicked} model threads panicked")));
        }
        Ok(())
    }

    /// Its stop flag and threads, for the server's shutdown.
    pub(crate) fn into_threads(self) -> (Arc<AtomicBool>, Vec<JoinHandle<()>>) {
        (self.stop, self.threads)
    }

    pub(crate) fn entry(&self) -> &Arc<Entry> {
        &self.entry
    }
}

impl ModelServiceBuilder {
    pub(crate) fn from_state(name: impl Into<String>, state: Arc<ModelState>) -> Self {
        let config = Config::default();
        ModelServiceBuilder {
            name: name.into(),
            state,
            input: None,
            output: OutputSpec::Classes,
            threads: config.threads,
            queue_capacity: config.queue_capacity,
            batch: BatchSettings {
                max_batch: config.max_batch,
                max_wait: config.max_wait,
            },
            metrics: None,
            layers: None,
            training: false,
            language_model: None,
        }
    }
}

/// Publishes new versions of a served model; cheap to clone. Loading a
/// version for a batch takes no lock, so publishing never stalls a request.
#[derive(Debug, Clone)]
pub struct ModelHandle {
    state: Arc<ModelState>,
}

impl ModelHandle {
    /// Forks `model` and publishes the fork as the next version; returns
    /// its number. Requests received after it returns are answered by it
    /// or a later version.
    ///
    /// # Errors
    ///
    /// The error of [`Module::try_fork`].
    pub fn publish<M: Module + ?Sized>(&self, model: &M) -> netcl::Result<u64> {
        let fork = netcl::nn::fork_scope(|| model.try_fork())?;
        Ok(self.publish_model(fork))
    }

    /// Publishes `model` (already a fork nobody else trains) as the next
    /// version; returns its number.
    pub fn publish_model(&self, model: Box<dyn Module>) -> u64 {
        let info = self.state.info();
        self.state.publish(
            model,
            VersionInfo {
                source: "library",
                last_loss: None,
                accuracy: f32::NAN,
                ..info
            },
        )
    }

    /// The version serving now.
    pub fn version(&self) -> u64 {
        self.state.published().version()
    }

    /// The published versions and what is known of the current one.
    pub fn state(&self) -> &Arc<ModelState> {
        &self.state
    }
}

/// Several [`ModelService`]s behind one router: each keeps its own queue
/// and model threads, so one model's load or failure never stalls
/// another's.
#[derive(Debug)]
pub struct Models {
    entries: Vec<Arc<Entry>>,
    default: Option<usize>,
    metrics: Arc<Metrics>,
    request_timeout: Duration,
}

impl Models {
    /// No models yet; `/metrics` renders `metrics`.
    pub fn new(metrics: &Arc<Metrics>) -> Models {
        Models {
            entries: Vec::new(),
            default: None,
            metrics: Arc::clone(metrics),
            request_timeout: Config::default().request_timeout,
        }
    }

    /// Serves `service` too (the first one added is the default until
    /// [`Models::set_default`]).
    ///
    /// # Errors
    ///
    /// [`Error::Model`] if a model of that name is served already.
    pub fn add(&mut self, service: &ModelService) -> Result<&mut Models, Error> {
        let entry = service.entry();
        if self.entries.iter().any(|e| e.name == entry.name) {
            return Err(Error::Model(format!(
                "two models are named {:?}",
                entry.name.as_str()
            )));
        }
        self.entries.push(Arc::clone(entry));
        if self.default.is_none() {
            self.default = Some(self.entries.len() - 1);
        }
        Ok(self)
    }

    /// Makes model `name` the one `/v1/predict` and `/v1/model` serve.
    ///
    /// # Errors
    ///
    /// [`Error::Model`] if no model has that name.
    pub fn set_default(&mut self, name: &str) -> Result<&mut Models, Error> {
        let index = self
            .entries
            .iter()
            .position(|e| e.name.as_str() == name)
            .ok_or_else(|| Error::Model(format!("no model named {name:?} to make the default")))?;
        self.default = Some(index);
        Ok(self)
    }

    /// The deadline of a whole request, body included (408 after it).
    pub fn request_timeout(&mut self, timeout: Duration) -> &mut Models {
        self.request_timeout = timeout;
        self
    }

    /// The router of every model added so far.
    pub fn router(&self) -> Router {
        let by_name: HashMap<String, Arc<Entry>> = self
            .entries
            .iter()
            .map(|e| (e.name.to_string(), Arc::clone(e)))
            .collect();
        crate::http::router(crate::http::AppState {
            models: Arc::new(crate::http::Registry {
                by_name,
                list: self.entries.clone(),
                default: self.default.map(|i| Arc::clone(&self.entries[i])),
                none: Arc::new(String::new()),
            }),
            metrics: Arc::clone(&self.metrics),
            request_timeout: self.request_timeout,
        })
    }
}
