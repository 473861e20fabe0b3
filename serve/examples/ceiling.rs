//! The benchmark's ceiling: a bare axum server on netcl-serve's routes that
//! parses the same JSON body and answers a fixed prediction, computing
//! nothing. No micro-batching, no model, no limits: what HTTP and JSON
//! alone cost on this machine (scripts/bench_serve.sh).
//!
//! `cargo run --release -p netcl-serve --example ceiling -- 127.0.0.1:8090`

use axum::Json;
use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::post;
use serde::Deserialize;

/// The body netcl-serve takes.
#[derive(Deserialize)]
struct PredictRequest {
    inputs: Vec<Vec<f32>>,
}

/// A fixed answer of the size of a one-row prediction.
const ANSWER: &str = r#"{"classes":[0],"probabilities":[[0.99716514,1.2716417e-7,1.4127384e-5,2.2317085e-6,3.4196095e-5,1.4592707e-4,3.6432326e-5,1.0591258e-6,2.5861896e-3,1.4832006e-5]],"version":1}"#;

async fn predict(Json(request): Json<PredictRequest>) -> impl IntoResponse {
    // Keep the parse from being optimised away.
    std::hint::black_box(&request.inputs);
    ([(header::CONTENT_TYPE, "application/json")], ANSWER)
}

fn main() -> std::io::Result<()> {
    let listen = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8090".to_string());
    let threads = std::env::args()
        .nth(2)
        .and_then(|n| n.parse().ok())
        .unwrap_or(2);
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()?
        .block_on(async {
            let listener = tokio::net::TcpListener::bind(&listen).await?;
            eprintln!("ceiling listening on {}", listener.local_addr()?);
            let app = Router::new()
                .route("/v1/predict", post(predict))
                .route("/v1/models/{name}/predict", post(predict));
            axum::serve(listener, app).await
        })
}
