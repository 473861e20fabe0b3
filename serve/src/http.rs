//! The routes: request parsing and validation, JSON errors, the timeout
//! and metrics middleware.

use std::fmt;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Extension, Path, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use crossbeam_channel::TrySendError;
use serde::Serialize;
use serde::de::{self, DeserializeSeed, Deserializer, SeqAccess, Visitor};
use tokio::sync::oneshot;

use std::collections::HashMap;

use crate::batcher::{Job, Queued};
use crate::generate::Finish;
use crate::http_threads::{self, Inbox};
use crate::metrics::{Gauges, Metrics, ModelGauges, Route};
use crate::service::{Entry, OutputSpec};

/// The largest request body accepted: 1 MiB.
pub const BODY_LIMIT: usize = 1 << 20;

/// The models a router serves.
#[derive(Debug)]
pub(crate) struct Registry {
    pub(crate) by_name: HashMap<String, Arc<Entry>>,
    /// In the order they were added.
    pub(crate) list: Vec<Arc<Entry>>,
    /// The model of `/v1/predict` and `/v1/model`.
    pub(crate) default: Option<Arc<Entry>>,
    /// The empty `model` label of requests for no model.
    pub(crate) none: Arc<String>,
}

impl Registry {
    fn get(&self, name: &str) -> Result<&Arc<Entry>, ApiError> {
        self.by_name.get(name).ok_or_else(|| unknown_model(name))
    }

    fn default(&self) -> Result<&Arc<Entry>, ApiError> {
        self.default
            .as_ref()
            .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "no default model is served"))
    }

    /// The model a request to `path` is for, if a known one (so that
    /// unknown names add no series: their `model` label is empty).
    fn entry_of(&self, path: &str) -> Option<&Arc<Entry>> {
        match path {
            "/v1/predict" | "/v1/model" => self.default.as_ref(),
            _ => path
                .strip_prefix("/v1/models/")
                .map(|rest| rest.split('/').next().unwrap_or(rest))
                .and_then(|name| self.by_name.get(name)),
        }
    }
}

/// A 404 naming the model.
fn unknown_model(name: &str) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, format!("no model named {name:?}")).model(name)
}

/// What the handlers share.
#[derive(Clone)]
pub(crate) struct AppState {
    pub(crate) models: Arc<Registry>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) request_timeout: Duration,
}

/// The router with every route, limit and layer.
pub(crate) fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/predict", post(predict))
        .route("/v1/model", get(model_info))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{name}", get(named_model_info))
        .route("/v1/models/{name}/predict", post(named_predict))
        .route("/v1/models/{name}/generate", post(named_generate))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(middleware::from_fn_with_state(state.clone(), guard))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(
            |_: Box<dyn std::any::Any + Send>| {
                tracing::error!("a handler panicked");
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error").into_response()
            },
        ))
        .with_state(state)
}

/// An error answered as `{"error": "..."}` with its status.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    message: String,
    /// The model the error is about, when one was named.
    model: Option<String>,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            model: None,
        }
    }

    fn model(mut self, name: &str) -> ApiError {
        self.model = Some(name.to_string());
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        #[derive(Serialize)]
        struct Body<'a> {
            error: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            model: Option<&'a str>,
        }
        json_response(
            self.status,
            &Body {
                error: &self.message,
                model: self.model.as_deref(),
            },
        )
    }
}

/// `value` as a JSON response.
fn json_response<T: Serialize>(status: StatusCode, value: &T) -> Response {
    match serde_json::to_vec(value) {
        Ok(body) => {
            let mut response = Response::new(Body::from(body));
            *response.status_mut() = status;
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            response
        }
        Err(err) => {
            tracing::error!("cannot encode a response: {err}");
            let mut response =
                Response::new(Body::from(r#"{"error":"cannot encode the response"}"#));
            *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
            response
        }
    }
}

/// Every request goes through here: a deadline for the whole exchange
/// (body included), and its status and latency counted (for a stream,
/// until its response starts).
async fn guard(State(state): State<AppState>, mut request: Request, next: Next) -> Response {
    let start = Instant::now();
    let route = Route::of_path(request.uri().path());
    let entry = state.models.entry_of(request.uri().path()).cloned();
    // A generation stops at the deadline itself and says so (for a stream,
    // the deadline covers the whole stream; this timeout its first event).
    let limit = match route {
        Route::ModelGenerate => {
            request
                .extensions_mut()
                .insert(Deadline(start + state.request_timeout));
            state.request_timeout + GENERATE_GRACE
        }
        _ => state.request_timeout,
    };
    let response = match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "request not completed within {} ms",
                state.request_timeout.as_millis()
            ),
        )
        .into_response(),
    };
    let status = response.status().as_u16();
    match (route, &entry) {
        (Route::Predict, Some(entry)) => {
            state
                .metrics
                .record_in(&entry.series[0], status, start.elapsed());
        }
        (Route::ModelPredict, Some(entry)) => {
            state
                .metrics
                .record_in(&entry.series[1], status, start.elapsed());
        }
        _ => {
            let model = entry.as_ref().map_or(&state.models.none, |e| &e.name);
            state
                .metrics
                .record_response(route, model, status, start.elapsed());
        }
    }
    response
}

/// Rows of `width` finite values (in the spec's range), parsed straight
/// into one flat buffer.
#[derive(Debug)]
struct Rows {
    count: usize,
    values: Vec<f32>,
}

/// What a row must be.
#[derive(Debug, Clone, Copy)]
struct RowRule {
    width: usize,
    range: Option<(f32, f32)>,
}

/// Parses the body's object, finding `inputs` with [`RowRule`].
struct RequestSeed(RowRule);

impl<'de> DeserializeSeed<'de> for RequestSeed {
    type Value = Rows;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Rows, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for RequestSeed {
    type Value = Rows;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object with inputs")
    }

    fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Rows, A::Error> {
        let mut rows = None;
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            if key == "inputs" {
                if rows.is_some() {
                    return Err(de::Error::duplicate_field("inputs"));
                }
                rows = Some(map.next_value_seed(RowsSeed(self.0))?);
            } else {
                map.next_value::<de::IgnoredAny>()?;
            }
        }
        rows.ok_or_else(|| de::Error::missing_field("inputs"))
    }
}

/// Parses `inputs`.
struct RowsSeed(RowRule);

impl<'de> DeserializeSeed<'de> for RowsSeed {
    type Value = Rows;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Rows, D::Error> {
        deserializer.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for RowsSeed {
    type Value = Rows;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "an array of rows of {} numbers", self.0.width)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Rows, A::Error> {
        let rule = self.0;
        let mut values = Vec::with_capacity(seq.size_hint().unwrap_or(1) * rule.width);
        let mut count = 0;
        while seq
            .next_element_seed(RowSeed {
                row: count,
                rule,
                values: &mut values,
            })?
            .is_some()
        {
            count += 1;
        }
        Ok(Rows { count, values })
    }
}

/// Parses row number `row` onto the end of `values`.
struct RowSeed<'a> {
    row: usize,
    rule: RowRule,
    values: &'a mut Vec<f32>,
}

impl<'de> DeserializeSeed<'de> for RowSeed<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for RowSeed<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "inputs[{}] to be an array of {} numbers",
            self.row, self.rule.width
        )
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let width = self.rule.width;
        let mut column = 0;
        while let Some(value) = seq.next_element_seed(Pixel {
            row: self.row,
            column,
            range: self.rule.range,
        })? {
            if column < width {
                self.values.push(value);
            }
            column += 1;
        }
        if column != width {
            return Err(de::Error::custom(format!(
                "inputs[{}] has {column} values, expected {width}",
                self.row
            )));
        }
        Ok(())
    }
}

/// One value: a finite number in the range, if any.
struct Pixel {
    row: usize,
    column: usize,
    range: Option<(f32, f32)>,
}

impl<'de> DeserializeSeed<'de> for Pixel {
    type Value = f32;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<f32, D::Error> {
        deserializer.deserialize_f64(self)
    }
}

impl Pixel {
    fn check<E: de::Error>(&self, value: f64) -> Result<f32, E> {
        if !value.is_finite() {
            return Err(E::custom(format!(
                "inputs[{}][{}] is not a finite number",
                self.row, self.column
            )));
        }
        if let Some((low, high)) = self.range
            && !(f64::from(low)..=f64::from(high)).contains(&value)
        {
            return Err(E::custom(format!(
                "inputs[{}][{}] is {value}, outside the input range {low}..={high}",
                self.row, self.column
            )));
        }
        Ok(value as f32)
    }
}

impl Visitor<'_> for Pixel {
    type Value = f32;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a number at inputs[{}][{}]", self.row, self.column)
    }

    fn visit_f64<E: de::Error>(self, value: f64) -> Result<f32, E> {
        self.check(value)
    }

    fn visit_u64<E: de::Error>(self, value: u64) -> Result<f32, E> {
        self.check(value as f64)
    }

    fn visit_i64<E: de::Error>(self, value: i64) -> Result<f32, E> {
        self.check(value as f64)
    }
}

/// Parses and validates a predict body.
fn parse_predict(body: &[u8], rule: RowRule, max_batch: usize) -> Result<Rows, ApiError> {
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let request = RequestSeed(rule)
        .deserialize(&mut deserializer)
        .and_then(|rows| deserializer.end().map(|()| rows));
    let rows = request.map_err(|err| {
        let status = match err.classify() {
            serde_json::error::Category::Data => StatusCode::UNPROCESSABLE_ENTITY,
            _ => StatusCode::BAD_REQUEST,
        };
        let what = match err.classify() {
            serde_json::error::Category::Data => "invalid request",
            _ => "malformed JSON",
        };
        ApiError::new(status, format!("{what}: {err}"))
    })?;
    if rows.count == 0 {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "inputs is empty: send 1 or more rows",
        ));
    }
    if rows.count > max_batch {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "inputs has {} rows, at most {max_batch} are allowed",
                rows.count
            ),
        ));
    }
    Ok(rows)
}

/// The body of a predict response with class outputs.
#[derive(Serialize)]
struct PredictResponse<'a> {
    classes: &'a [u32],
    probabilities: Vec<&'a [f32]>,
    version: u64,
}

/// The body of a predict response with other outputs.
#[derive(Serialize)]
struct OutputsResponse<T: Serialize> {
    outputs: Vec<T>,
    version: u64,
}

async fn predict(State(state): State<AppState>, body: Result<Bytes, BytesRejection>) -> Response {
    let result = match state.models.default() {
        Ok(entry) => predict_inner(entry, body).await,
        Err(err) => Err(err),
    };
    result.unwrap_or_else(IntoResponse::into_response)
}

async fn named_predict(
    State(state): State<AppState>,
    Path(name): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let result = match state.models.get(&name) {
        Ok(entry) => predict_inner(entry, body).await,
        Err(err) => Err(err),
    };
    result.unwrap_or_else(IntoResponse::into_response)
}

async fn predict_inner(
    entry: &Entry,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = read_body(body)?;
    if !entry.predicts {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "model {:?} is a language model: POST /v1/models/{}/generate",
                entry.name, entry.name
            ),
        )
        .model(&entry.name));
    }
    let rule = RowRule {
        width: entry.spec.input.width,
        range: entry.spec.input.range,
    };
    let rows = parse_predict(&body, rule, entry.max_batch)?;
    let (reply, answer) = oneshot::channel();
    let job = Queued {
        job: Job {
            rows: rows.count,
            values: rows.values,
            reply,
        },
        inbox: Inbox::current(),
    };
    entry.jobs.try_send(job).map_err(|err| match err {
        TrySendError::Full(_) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "overloaded: {} requests already queued, retry later",
                entry.queue_capacity
            ),
        ),
        TrySendError::Disconnected(_) => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "shutting down")
        }
    })?;
    http_threads::ring(&entry.doorbell);
    let prediction = answer
        .await
        .map_err(|_| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "shutting down"))?
        .map_err(|message| {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, message).model(&entry.name)
        })?;
    let width = prediction.width.max(1);
    let rows = prediction.values.chunks(width);
    Ok(match &entry.spec.output {
        OutputSpec::Classes => json_response(
            StatusCode::OK,
            &PredictResponse {
                classes: &prediction.classes,
                probabilities: rows.collect(),
                version: prediction.version,
            },
        ),
        OutputSpec::Logits => json_response(
            StatusCode::OK,
            &OutputsResponse {
                outputs: rows.collect(),
                version: prediction.version,
            },
        ),
        OutputSpec::Map(map) => json_response(
            StatusCode::OK,
            &OutputsResponse {
                outputs: rows.map(|row| map(row)).collect(),
                version: prediction.version,
            },
        ),
    })
}

/// What a generation's response carries besides its text: the `done`
/// event of a stream, and the rest of a non-streaming response.
#[derive(Serialize)]
struct GenerateSummary {
    /// How many characters were generated.
    tokens: usize,
    /// The version that generated them.
    version: u64,
    /// The seed used.
    seed: u64,
    /// The prompt's length in characters.
    prompt_tokens: usize,
    /// Why it stopped: `length` (max_tokens generated) or `timeout` (the
    /// request deadline passed first).
    finish_reason: Finish,
}

/// The body of a generate response.
#[derive(Serialize)]
struct GenerateResponse {
    /// The characters generated (after the prompt).
    text: String,
    #[serde(flatten)]
    summary: GenerateSummary,
}

/// The body of a stream's `token` event.
#[derive(Serialize)]
struct TokenEvent<'a> {
    text: &'a str,
}

/// Events a stream buffers between its generation and its connection:
/// enough to ride out a slow write, few enough that a generation whose
/// client stopped reading soon waits (and stops when the client is gone).
const STREAM_BUFFER: usize = 16;

/// How long past the request deadline the guard waits for a generate
/// response: the generation itself stops at the deadline (within one
/// character) and answers with `finish_reason: "timeout"`, so the guard's
/// 408 is only for a request that never reached its generation (a slow
/// body).
const GENERATE_GRACE: Duration = Duration::from_secs(1);

/// When the whole request must be done by, set by [`guard`] (a
/// generation stops there).
#[derive(Debug, Clone, Copy)]
struct Deadline(Instant);

/// Sets its flag when dropped: a generation checks it after each
/// character, so that a request whose future was dropped (the client
/// went away, or the guard's timeout fired) stops generating.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// What a streaming generation sends to its response.
enum StreamMessage {
    /// The generator is ready: the response can start.
    Started,
    /// An event for the client.
    Event(Event),
    /// The generation could not start (answered 500).
    Failed(String),
}

/// The events of a streaming generation, as its channel delivers them.
/// Dropping it (the client went away) closes the channel, which stops the
/// generation at its next character.
struct EventStream(tokio::sync::mpsc::Receiver<StreamMessage>);

impl futures_core::Stream for EventStream {
    type Item = Result<Event, std::convert::Infallible>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        loop {
            match std::task::ready!(self.0.poll_recv(cx)) {
                Some(StreamMessage::Event(event)) => {
                    return std::task::Poll::Ready(Some(Ok(event)));
                }
                // Only the first message can be one of these.
                Some(StreamMessage::Started | StreamMessage::Failed(_)) => {}
                None => return std::task::Poll::Ready(None),
            }
        }
    }
}

/// A streamed body holding a value (a connection's busy mark) until it
/// ends or is dropped.
struct Holding<T> {
    body: axum::body::BodyDataStream,
    _held: T,
}

impl<T: Unpin> futures_core::Stream for Holding<T> {
    type Item = Result<Bytes, axum::Error>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        std::pin::Pin::new(&mut self.body).poll_next(cx)
    }
}

/// `response`, holding `busy` until its body is done if it is a stream of
/// server-sent events (a stream's connection is not idle while its
/// generation runs), else dropping it now.
pub(crate) fn busy_while_streaming<T: Send + Unpin + 'static>(
    response: Response,
    busy: T,
) -> Response {
    let streaming = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|value| value.as_bytes() == b"text/event-stream");
    if !streaming {
        return response;
    }
    response.map(|body| {
        Body::from_stream(Holding {
            body: body.into_data_stream(),
            _held: busy,
        })
    })
}

/// A server-sent event named `name` carrying `data` as JSON.
fn json_event(name: &'static str, data: &impl Serialize) -> Event {
    let event = Event::default().event(name);
    match serde_json::to_string(data) {
        Ok(json) => event.data(json),
        Err(err) => event.data(format!("{{\"error\":\"cannot encode the event: {err}\"}}")),
    }
}

async fn named_generate(
    State(state): State<AppState>,
    Path(name): Path<String>,
    deadline: Option<Extension<Deadline>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let deadline = deadline.map_or_else(|| Instant::now() + state.request_timeout, |d| d.0.0);
    let result = match state.models.get(&name) {
        Ok(entry) => generate_inner(&state, entry, deadline, body).await,
        Err(err) => Err(err),
    };
    result.unwrap_or_else(IntoResponse::into_response)
}

async fn generate_inner(
    state: &AppState,
    entry: &Entry,
    deadline: Instant,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = read_body(body)?;
    let Some(generation) = entry.generation.as_ref() else {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "model {:?} is not a language model: it answers POST /v1/models/{}/predict",
                entry.name, entry.name
            ),
        )
        .model(&entry.name));
    };
    let request: crate::generate::GenerateRequest = serde_json::from_slice(&body)
        .map_err(|err| ApiError::new(StatusCode::BAD_REQUEST, format!("invalid request: {err}")))?;
    let sampling = request
        .validate(&generation.lm)
        .map_err(|message| ApiError::new(StatusCode::BAD_REQUEST, message).model(&entry.name))?;
    // At most `threads` generations run at once; the others wait here
    // (until the request deadline), holding no thread.
    let permit = tokio::time::timeout_at(
        deadline.into(),
        Arc::clone(&generation.running).acquire_owned(),
    )
    .await
    .map_err(|_| {
        ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "request not completed within {} ms: every generation thread stayed busy",
                state.request_timeout.as_millis()
            ),
        )
        .model(&entry.name)
    })?
    .map_err(|_| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "shutting down"))?;
    let version = entry.model.published().load();
    let generation = Arc::clone(generation);
    let series = state.metrics.generation_series(&entry.name);
    let (number, seed, prompt_tokens) = (version.number(), sampling.seed, sampling.prompt.len());
    let summary = move |tokens, finish| GenerateSummary {
        tokens,
        version: number,
        seed,
        prompt_tokens,
        finish_reason: finish,
    };
    if request.stream {
        // The generation runs on a blocking thread and sends each event
        // through a bounded channel; the response reads it as an SSE body.
        let (events, mut received) = tokio::sync::mpsc::channel(STREAM_BUFFER);
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let generator = match generation.generator(&version) {
                Ok(generator) => generator,
                Err(message) => {
                    let _ = events.blocking_send(StreamMessage::Failed(message));
                    return;
                }
            };
            if events.blocking_send(StreamMessage::Started).is_err() {
                series.record_generation(Finish::Cancelled.label());
                return;
            }
            let vocab = &generation.lm.vocab;
            let result = crate::generate::run(&generator, &sampling, deadline, &series, |id| {
                let text = vocab.decode(&[id]).unwrap_or_default();
                let event = json_event("token", &TokenEvent { text: &text });
                // Fails once the response is dropped: the client is gone.
                match events.blocking_send(StreamMessage::Event(event)) {
                    Ok(()) => ControlFlow::Continue(()),
                    Err(_) => ControlFlow::Break(()),
                }
            });
            let last = match result {
                Ok((_, Finish::Cancelled)) => return,
                Ok((tokens, finish)) => json_event("done", &summary(tokens, finish)),
                Err(error) => json_event("error", &serde_json::json!({ "error": error })),
            };
            let _ = events.blocking_send(StreamMessage::Event(last));
        });
        // Errors before the first event are still JSON errors.
        return match received.recv().await {
            Some(StreamMessage::Started) => Ok(Sse::new(EventStream(received)).into_response()),
            Some(StreamMessage::Failed(message)) => {
                Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, message).model(&entry.name))
            }
            _ => Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the generation failed",
            )),
        };
    }
    let cancelled = Arc::new(AtomicBool::new(false));
    let _cancel = CancelOnDrop(Arc::clone(&cancelled));
    let done = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        let generator = generation.generator(&version)?;
        let mut ids = Vec::with_capacity(sampling.max_tokens);
        let (tokens, finish) =
            crate::generate::run(&generator, &sampling, deadline, &series, |id| {
                ids.push(id);
                if cancelled.load(Ordering::Relaxed) {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            })?;
        let text = generation
            .lm
            .vocab
            .decode(&ids)
            .map_err(|err| err.to_string())?;
        Ok::<_, String>(GenerateResponse {
            text,
            summary: summary(tokens, finish),
        })
    })
    .await
    .map_err(|_| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "the generation failed"))?;
    let response = done.map_err(|message| {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, message).model(&entry.name)
    })?;
    Ok(json_response(StatusCode::OK, &response))
}

/// The body, or the error of reading it.
fn read_body(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|rejection| {
        let status = rejection.status();
        let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
            format!("request body larger than {BODY_LIMIT} bytes")
        } else {
            format!("cannot read the request body: {}", rejection.body_text())
        };
        ApiError::new(status, message)
    })
}

/// What `GET /v1/model`, `GET /v1/models/{name}` and each item of `GET
/// /v1/models` say of a model.
#[derive(Serialize)]
struct ModelResponse {
    name: String,
    version: u64,
    training_steps: u64,
    last_loss: Option<f32>,
    accuracy: Option<f32>,
    source: &'static str,
    training: bool,
    training_steps_per_second: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    layers: Option<Vec<usize>>,
    input: serde_json::Value,
    output: &'static str,
    /// What the model answers: `predict` and/or `generate`.
    capabilities: Vec<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    generation: Option<serde_json::Value>,
    parameters: usize,
    max_batch: usize,
    queue_capacity: usize,
}

fn describe(entry: &Entry, metrics: &Metrics) -> ModelResponse {
    let info = entry.model.info();
    ModelResponse {
        name: entry.name.to_string(),
        // A library user may publish through `Published` itself.
        version: entry.model.published().version().max(info.version),
        training_steps: info.training_steps,
        last_loss: info.last_loss.filter(|loss| loss.is_finite()),
        accuracy: Some(info.accuracy).filter(|a| a.is_finite()),
        source: info.source,
        training: entry.training,
        training_steps_per_second: if entry.training {
            metrics.steps_per_second()
        } else {
            0.0
        },
        layers: entry.layers.clone(),
        // A language model answering generate only reads no rows.
        input: if entry.predicts {
            entry.spec.input.describe()
        } else {
            serde_json::Value::Null
        },
        output: if entry.predicts {
            entry.spec.output.kind()
        } else {
            "text"
        },
        capabilities: [
            entry.predicts.then_some("predict"),
            entry.generation.is_some().then_some("generate"),
        ]
        .into_iter()
        .flatten()
        .collect(),
        generation: entry.generation.as_ref().map(|g| g.lm.describe()),
        parameters: entry.parameters,
        max_batch: entry.max_batch,
        queue_capacity: entry.queue_capacity,
    }
}

async fn model_info(State(state): State<AppState>) -> Response {
    match state.models.default() {
        Ok(entry) => json_response(StatusCode::OK, &describe(entry, &state.metrics)),
        Err(err) => err.into_response(),
    }
}

async fn named_model_info(State(state): State<AppState>, Path(name): Path<String>) -> Response {
    match state.models.get(&name) {
        Ok(entry) => json_response(StatusCode::OK, &describe(entry, &state.metrics)),
        Err(err) => err.into_response(),
    }
}

async fn list_models(State(state): State<AppState>) -> Response {
    #[derive(Serialize)]
    struct List {
        default: Option<String>,
        models: Vec<ModelResponse>,
    }
    json_response(
        StatusCode::OK,
        &List {
            default: state.models.default.as_ref().map(|e| e.name.to_string()),
            models: state
                .models
                .list
                .iter()
                .map(|e| describe(e, &state.metrics))
                .collect(),
        },
    )
}

async fn healthz(State(state): State<AppState>) -> Response {
    #[derive(Serialize)]
    struct Health {
        status: &'static str,
        version: u64,
    }
    json_response(
        StatusCode::OK,
        &Health {
            status: "ok",
            version: state
                .models
                .default
                .as_ref()
                .map_or(0, |e| e.model.published().version()),
        },
    )
}

async fn metrics(State(state): State<AppState>) -> Response {
    let gauges = Gauges {
        models: state
            .models
            .list
            .iter()
            .map(|e| ModelGauges {
                name: Arc::clone(&e.name),
                version: e.model.published().version(),
                queue_depth: e.jobs.len(),
                queue_capacity: e.queue_capacity,
            })
            .collect(),
        training: state.models.list.iter().any(|e| e.training),
    };
    let text = state.metrics.render(&gauges);
    let mut response = Response::new(Body::from(text));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
    );
    response
}

async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("no route for {method} {}", uri.path()),
    )
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{method} is not allowed on {}", uri.path()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const FEATURES: usize = 64;
    const RULE: RowRule = RowRule {
        width: FEATURES,
        range: Some((0.0, 16.0)),
    };

    fn row(value: &str) -> String {
        vec![value; FEATURES].join(",")
    }

    #[test]
    fn rows_parse_into_one_flat_buffer() {
        let body = format!(r#"{{"inputs": [[{}], [{}]]}}"#, row("16"), row("0.5"));
        let rows = parse_predict(body.as_bytes(), RULE, 4).unwrap();
        assert_eq!(rows.count, 2);
        assert_eq!(rows.values.len(), 2 * FEATURES);
        assert_eq!((rows.values[0], rows.values[FEATURES]), (16.0, 0.5));
    }

    #[test]
    fn each_bad_body_names_its_problem() {
        let short = vec!["1"; FEATURES - 1].join(",");
        let cases = [
            (
                format!(r#"{{"inputs": [[{}], [{short}]]}}"#, row("1")),
                422,
                "inputs[1] has 63 values, expected 64",
            ),
            (
                r#"{"inputs": [["a"]]}"#.to_string(),
                422,
                "a number at inputs[0][0]",
            ),
            (
                format!(r#"{{"inputs": [[{}, 1e999]]}}"#, vec!["1"; 63].join(",")),
                400,
                "malformed JSON",
            ),
            (
                format!(r#"{{"inputs": [[{}, 17]]}}"#, vec!["1"; 63].join(",")),
                422,
                "inputs[0][63] is 17, outside the input range 0..=16",
            ),
            (r#"{"inputs": []}"#.to_string(), 422, "inputs is empty"),
            (
                format!(
                    r#"{{"inputs": [[{}],[{}],[{}]]}}"#,
                    row("1"),
                    row("1"),
                    row("1")
                ),
                422,
                "inputs has 3 rows, at most 2",
            ),
            (r#"{"inputs": [[1,2"#.to_string(), 400, "malformed JSON"),
            (r#"{"rows": []}"#.to_string(), 422, "missing field `inputs`"),
        ];
        for (body, status, message) in cases {
            let err = parse_predict(body.as_bytes(), RULE, 2).unwrap_err();
            assert_eq!(err.status.as_u16(), status, "{body}: {}", err.message);
            assert!(err.message.contains(message), "{body}: {}", err.message);
        }
    }
}
