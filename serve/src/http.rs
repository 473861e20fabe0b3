//! The routes: request parsing and validation, JSON errors, the timeout
//! and metrics middleware.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use crossbeam_channel::{Sender, TrySendError};
use serde::de::{self, DeserializeSeed, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::batcher::Job;
use crate::metrics::{Gauges, Metrics, Route};
use crate::model::{CLASSES, FEATURES, ModelState, PIXEL_MAX};

/// The largest request body accepted: 1 MiB.
pub const BODY_LIMIT: usize = 1 << 20;

/// What the handlers share.
#[derive(Clone)]
pub(crate) struct AppState {
    pub(crate) jobs: Sender<Job>,
    pub(crate) queue_capacity: usize,
    pub(crate) model: Arc<ModelState>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) max_batch: usize,
    pub(crate) request_timeout: Duration,
    pub(crate) training: bool,
}

/// The router with every route, limit and layer.
pub(crate) fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/predict", post(predict))
        .route("/v1/model", get(model_info))
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
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        #[derive(Serialize)]
        struct Body<'a> {
            error: &'a str,
        }
        json_response(
            self.status,
            &Body {
                error: &self.message,
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
/// (body included), and its status and latency counted.
async fn guard(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let start = Instant::now();
    let route = Route::of_path(request.uri().path());
    let response = match tokio::time::timeout(state.request_timeout, next.run(request)).await {
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
    state
        .metrics
        .record_response(route, response.status().as_u16(), start.elapsed());
    response
}

/// The body of `POST /v1/predict`.
#[derive(Debug, Deserialize)]
struct PredictRequest {
    inputs: Rows,
}

/// Rows of `FEATURES` finite pixel values in `0..=PIXEL_MAX`, parsed
/// straight into one flat buffer.
#[derive(Debug)]
struct Rows {
    count: usize,
    pixels: Vec<f32>,
}

impl<'de> Deserialize<'de> for Rows {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Rows, D::Error> {
        struct RowsVisitor;

        impl<'de> Visitor<'de> for RowsVisitor {
            type Value = Rows;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "an array of rows of {FEATURES} numbers")
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Rows, A::Error> {
                let mut pixels = Vec::with_capacity(seq.size_hint().unwrap_or(1) * FEATURES);
                let mut count = 0;
                while seq
                    .next_element_seed(RowSeed {
                        row: count,
                        pixels: &mut pixels,
                    })?
                    .is_some()
                {
                    count += 1;
                }
                Ok(Rows { count, pixels })
            }
        }

        deserializer.deserialize_seq(RowsVisitor)
    }
}

/// Parses row number `row` onto the end of `pixels`.
struct RowSeed<'a> {
    row: usize,
    pixels: &'a mut Vec<f32>,
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
            "inputs[{}] to be an array of {FEATURES} numbers",
            self.row
        )
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut column = 0;
        while let Some(value) = seq.next_element_seed(Pixel {
            row: self.row,
            column,
        })? {
            if column < FEATURES {
                self.pixels.push(value);
            }
            column += 1;
        }
        if column != FEATURES {
            return Err(de::Error::custom(format!(
                "inputs[{}] has {column} values, expected {FEATURES}",
                self.row
            )));
        }
        Ok(())
    }
}

/// One pixel: a finite number in `0..=PIXEL_MAX`.
struct Pixel {
    row: usize,
    column: usize,
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
        if !(0.0..=f64::from(PIXEL_MAX)).contains(&value) {
            return Err(E::custom(format!(
                "inputs[{}][{}] is {value}, outside the pixel range 0..={PIXEL_MAX}",
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
fn parse_predict(body: &[u8], max_batch: usize) -> Result<Rows, ApiError> {
    let request: PredictRequest = serde_json::from_slice(body).map_err(|err| {
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
    let rows = request.inputs;
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

/// The body of a predict response.
#[derive(Serialize)]
struct PredictResponse<'a> {
    classes: &'a [u32],
    probabilities: Vec<&'a [f32]>,
    version: u64,
}

async fn predict(State(state): State<AppState>, body: Result<Bytes, BytesRejection>) -> Response {
    match predict_inner(&state, body).await {
        Ok(response) => response,
        Err(err) => err.into_response(),
    }
}

async fn predict_inner(
    state: &AppState,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(|rejection| {
        let status = rejection.status();
        let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
            format!("request body larger than {BODY_LIMIT} bytes")
        } else {
            format!("cannot read the request body: {}", rejection.body_text())
        };
        ApiError::new(status, message)
    })?;
    let rows = parse_predict(&body, state.max_batch)?;
    let (reply, answer) = oneshot::channel();
    let job = Job {
        rows: rows.count,
        pixels: rows.pixels,
        reply,
    };
    state.jobs.try_send(job).map_err(|err| match err {
        TrySendError::Full(_) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "overloaded: {} requests already queued, retry later",
                state.queue_capacity
            ),
        ),
        TrySendError::Disconnected(_) => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "shutting down")
        }
    })?;
    let prediction = answer
        .await
        .map_err(|_| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "shutting down"))?
        .map_err(|message| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, message))?;
    Ok(json_response(
        StatusCode::OK,
        &PredictResponse {
            classes: &prediction.classes,
            probabilities: prediction.probabilities.chunks(CLASSES).collect(),
            version: prediction.version,
        },
    ))
}

/// The body of `GET /v1/model`.
#[derive(Serialize)]
struct ModelResponse {
    version: u64,
    training_steps: u64,
    last_loss: Option<f32>,
    accuracy: f32,
    source: &'static str,
    training: bool,
    training_steps_per_second: f64,
    layers: [usize; 3],
}

async fn model_info(State(state): State<AppState>) -> Response {
    let info = state.model.info();
    json_response(
        StatusCode::OK,
        &ModelResponse {
            version: info.version,
            training_steps: info.training_steps,
            last_loss: info.last_loss.filter(|loss| loss.is_finite()),
            accuracy: info.accuracy,
            source: info.source,
            training: state.training,
            training_steps_per_second: state.metrics.steps_per_second(),
            layers: crate::model::DIMS,
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
            version: state.model.published().version(),
        },
    )
}

async fn metrics(State(state): State<AppState>) -> Response {
    let text = state.metrics.render(Gauges {
        version: state.model.published().version(),
        queue_depth: state.jobs.len(),
        queue_capacity: state.queue_capacity,
        training: state.training,
    });
    let mut response = Response::new(Body::from(text));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
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

    fn row(value: &str) -> String {
        vec![value; FEATURES].join(",")
    }

    #[test]
    fn rows_parse_into_one_flat_buffer() {
        let body = format!(r#"{{"inputs": [[{}], [{}]]}}"#, row("16"), row("0.5"));
        let rows = parse_predict(body.as_bytes(), 4).unwrap();
        assert_eq!(rows.count, 2);
        assert_eq!(rows.pixels.len(), 2 * FEATURES);
        assert_eq!((rows.pixels[0], rows.pixels[FEATURES]), (16.0, 0.5));
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
                "inputs[0][63] is 17, outside the pixel range",
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
            let err = parse_predict(body.as_bytes(), 2).unwrap_err();
            assert_eq!(err.status.as_u16(), status, "{body}: {}", err.message);
            assert!(err.message.contains(message), "{body}: {}", err.message);
        }
    }
}
