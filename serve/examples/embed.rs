//! netcl-serve as a library: a model type of one's own, served in a few
//! lines inside one's own axum app, with a new version published while it
//! serves.
//!
//! `cargo run --release -p netcl-serve --example embed -- 127.0.0.1:8091`
//! then
//! `curl -s localhost:8091/api/v1/models/norm/predict -d '{"inputs": [[3, 4]]}'`
//! answers `{"outputs":[{"norm":5.0,"scaled":[6.0,8.0]}],"version":0}`,
//! and `GET /api/v1/models` describes the model.
//!
//! The test `tests/embed.rs` runs [`app`] on an ephemeral port and calls
//! it.

use std::io::Write as _;

use axum::Router;
use axum::routing::get;
use netcl::Tensor;
use netcl::nn::{Module, Published};
use netcl_serve::{InputSpec, ModelService, OutputSpec};

/// A model type of one's own: multiplies each row by a factor held as a
/// parameter. Any [`Module`] is served the same way.
#[derive(Debug)]
struct Scale {
    factor: Tensor,
}

impl Module for Scale {
    fn forward(&self, input: &Tensor) -> netcl::Result<Tensor> {
        input.try_mul(&self.factor)
    }

    fn named_parameters(&self) -> Vec<(String, Tensor)> {
        vec![("factor".to_string(), self.factor.clone())]
    }

    fn try_fork(&self) -> netcl::Result<Box<dyn Module>> {
        Ok(Box::new(Scale {
            factor: self.factor.fork(),
        }))
    }
}

/// The app: one's own routes beside the served model, under `/api`.
///
/// # Errors
///
/// The model cannot be published, or the service not started.
pub fn app() -> Result<Router, Box<dyn std::error::Error>> {
    let model = Scale {
        factor: Tensor::from_vec(vec![2.0], &[1])?,
    };

    // The service: rows of 2 finite numbers, the output of each row mapped
    // to a JSON object by a function of one's own.
    let service = ModelService::builder("norm", Published::new(&model)?)
        .input(InputSpec::rows(2))
        .output(OutputSpec::map(|row| {
            let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt() / 2.0;
            serde_json::json!({ "norm": norm, "scaled": row })
        }))
        .build()?;
    let handle = service.handle();
    Ok(Router::new()
        .route("/", get(|| async { "my app\n" }))
        .nest("/api", service.router())
        // Publishes a new version (factor 3) while serving.
        .route(
            "/publish",
            axum::routing::post(move || {
                let handle = handle.clone();
                async move {
                    let next = Scale {
                        factor: Tensor::from_vec(vec![3.0], &[1]).expect("a one-element tensor"),
                    };
                    match handle.publish(&next) {
                        Ok(version) => format!("{version}\n"),
                        Err(err) => format!("error: {err}\n"),
                    }
                }
            }),
        ))
}

#[allow(dead_code)]
#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let listen = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8091".to_string());
    let app = app()?;
    let listener = tokio::net::TcpListener::bind(&listen).await?;
    println!("listening on {}", listener.local_addr()?);
    std::io::stdout().flush()?;
    axum::serve(listener, app).await?;
    Ok(())
}
