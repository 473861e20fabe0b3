//! Several models in one server (`Config::models`, the library's
//! `Models`): listed and served by name, the default model behind the
//! aliases, unknown names answered 404 naming them, a directory of
//! numbered versions followed, and one model's stall or failure never
//! stalling another.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{
    Client, PATIENCE, classes, digit_rows, engine_predict, start, test_config, wait_until,
};
use hyper::Method;
use netcl::Tensor;
use netcl::nn::{Mlp, Module, Published};
use netcl_serve::model::{Digits, save_checkpoint, train_startup};
use netcl_serve::{InputSpec, ModelService, Models, OutputSpec};

/// A fresh directory under the system's temporary one.
fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("netcl-serve-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn trained(seed: u64) -> Mlp {
    train_startup(&Digits::load().unwrap(), 1, seed)
        .unwrap()
        .model
}

/// Writes a checkpoint the way a writer must: complete, then renamed.
fn write(model: &Mlp, version: u64, path: &Path) {
    save_checkpoint(model, version, 0, path).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_models_are_listed_served_by_name_and_followed() {
    let dir = temp_dir("models");
    let (a, b3, b7, b10) = (trained(1), trained(2), trained(3), trained(4));
    write(&a, 5, &dir.join("a.safetensors"));
    let versions = dir.join("b");
    std::fs::create_dir_all(versions.join("7")).unwrap();
    write(&b3, 0, &versions.join("3.safetensors"));
    write(&b7, 0, &versions.join("7/model.safetensors"));
    // The highest version does not load: the next one down serves.
    std::fs::write(versions.join("9.safetensors"), b"not a checkpoint").unwrap();
    let server = start(netcl_serve::Config {
        models: vec![
            ("a".to_string(), dir.join("a.safetensors")),
            ("b".to_string(), versions.clone()),
        ],
        ..test_config()
    })
    .await;
    let mut client = Client::connect(server.local_addr()).await;

    let listed = client.get("/v1/models").await;
    assert_eq!(listed.status, 200, "{}", listed.text);
    assert_eq!(listed.json["default"], "a");
    let models = listed.json["models"].as_array().unwrap();
    let names: Vec<_> = models.iter().map(|m| m["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        ["a", "b"],
        "the digits model is not served beside --model alone"
    );
    assert_eq!(models[0]["version"].as_u64(), Some(5));
    assert_eq!(models[1]["version"].as_u64(), Some(7));
    assert_eq!(
        models[1]["parameters"].as_u64(),
        Some(b7.num_parameters() as u64)
    );
    assert_eq!(models[1]["input"]["shape"], serde_json::json!([64]));
    assert_eq!(models[1]["input"]["range"], serde_json::json!([0.0, 16.0]));

    let rows = &digit_rows()[..8];
    let body = serde_json::json!({ "inputs": rows })
        .to_string()
        .into_bytes();
    let by_name = client
        .send(Method::POST, "/v1/models/b/predict", body.clone())
        .await;
    assert_eq!(by_name.status, 200, "{}", by_name.text);
    assert_eq!(classes(&by_name), engine_predict(&b7, rows).0);
    assert_eq!(by_name.json["version"].as_u64(), Some(7));
    let alias = client.predict(rows).await;
    assert_eq!(classes(&alias), engine_predict(&a, rows).0);
    assert_eq!(client.get("/v1/model").await.json["name"], "a");
    assert_eq!(
        client.get("/v1/models/b").await.json["version"].as_u64(),
        Some(7)
    );

    for (method, path) in [
        (Method::GET, "/v1/models/zzz"),
        (Method::POST, "/v1/models/zzz/predict"),
    ] {
        let reply = client.send(method, path, body.clone()).await;
        assert_eq!(reply.status, 404, "{path}: {}", reply.text);
        assert_eq!(reply.json["model"], "zzz", "{path}: {}", reply.text);
        assert!(reply.json["error"].as_str().unwrap().contains("\"zzz\""));
    }

    // A new version renamed into the directory is served.
    write(&b10, 0, &versions.join("10.safetensors"));
    let b = Arc::clone(server.model_named("b").unwrap());
    wait_until(PATIENCE, "model b to serve version 10", || {
        b.published().version() == 10
    })
    .await;
    let after = client
        .send(Method::POST, "/v1/models/b/predict", body.clone())
        .await;
    assert_eq!(after.json["version"].as_u64(), Some(10));
    assert_eq!(classes(&after), engine_predict(&b10, rows).0);
    assert_eq!(server.model_named("a").unwrap().published().version(), 5);

    let metrics = client.get("/metrics").await.text;
    for line in [
        "netcl_serve_model_version{model=\"b\"} 10",
        "netcl_serve_model_version{model=\"a\"} 5",
        "netcl_serve_reloads_total{model=\"b\",result=\"ok\"} 1",
        "netcl_serve_requests_total{route=\"/v1/models/{name}/predict\",status=\"404\",model=\"\"} 1",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "no {line:?} in\n{metrics}"
        );
    }
    server.shutdown();
    server.wait().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_path_that_does_not_load_is_refused_at_start_naming_it() {
    let dir = temp_dir("bad-model");
    let path = dir.join("bad.safetensors");
    std::fs::write(&path, b"garbage").unwrap();
    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    // A NaN weight is refused at load, never served.
    let poisoned = trained(1);
    poisoned.parameters()[0].with_data_mut(|mut w| {
        if let Some(v) = w.iter_mut().next() {
            *v = f32::NAN;
        }
    });
    let nan = dir.join("nan.safetensors");
    write(&poisoned, 1, &nan);
    for (name, path, what) in [
        ("bad", path.clone(), path.display().to_string()),
        ("empty", empty.clone(), "no numbered version".to_string()),
        ("nan", nan.clone(), "holds a non-finite value".to_string()),
    ] {
        let err = netcl_serve::start(netcl_serve::Config {
            models: vec![(name.to_string(), path)],
            ..test_config()
        })
        .await
        .unwrap_err()
        .to_string();
        assert!(err.contains(&format!("model \"{name}\"")), "{err}");
        assert!(err.contains(&what), "{err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Passes its input through, once `open` is set: a model thread that
/// stalls until the test lets it go.
#[derive(Debug)]
struct Gate {
    open: Arc<AtomicBool>,
}

impl Module for Gate {
    fn forward(&self, input: &Tensor) -> netcl::Result<Tensor> {
        while !self.open.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(input.clone())
    }

    fn named_parameters(&self) -> Vec<(String, Tensor)> {
        Vec::new()
    }

    fn try_fork(&self) -> netcl::Result<Box<dyn Module>> {
        Ok(Box::new(Gate {
            open: Arc::clone(&self.open),
        }))
    }
}

/// Fails every forward.
#[derive(Debug)]
struct Broken;

impl Module for Broken {
    fn forward(&self, input: &Tensor) -> netcl::Result<Tensor> {
        input.try_matmul(&Tensor::ones(&[7, 7]))
    }

    fn named_parameters(&self) -> Vec<(String, Tensor)> {
        Vec::new()
    }

    fn try_fork(&self) -> netcl::Result<Box<dyn Module>> {
        Ok(Box::new(Broken))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_models_stall_or_failure_never_stalls_another() {
    let open = Arc::new(AtomicBool::new(false));
    let metrics = Arc::new(netcl_serve::metrics::Metrics::new());
    let service = |name: &str, model: &dyn Module| {
        ModelService::builder(name, Published::new(model).unwrap())
            .input(InputSpec::rows(2))
            .output(OutputSpec::Logits)
            .metrics(&metrics)
            .build()
            .unwrap()
    };
    let slow = service(
        "slow",
        &Gate {
            open: Arc::clone(&open),
        },
    );
    let broken = service("broken", &Broken);
    let fast = service(
        "fast",
        &Gate {
            open: Arc::new(AtomicBool::new(true)),
        },
    );
    let mut models = Models::new(&metrics);
    models
        .add(&slow)
        .unwrap()
        .add(&broken)
        .unwrap()
        .add(&fast)
        .unwrap();
    models.request_timeout(PATIENCE * 2);
    let app = models.router();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });

    let body = br#"{"inputs": [[1, 2]]}"#.to_vec();
    // Requests for the stalled model: one holds its thread, more queue.
    let stalled: Vec<_> = (0..4)
        .map(|_| {
            let body = body.clone();
            tokio::spawn(async move {
                Client::connect(addr)
                    .await
                    .send(Method::POST, "/v1/models/slow/predict", body)
                    .await
            })
        })
        .collect();
    let mut client = Client::connect(addr).await;
    for _ in 0..20 {
        let reply = tokio::time::timeout(
            PATIENCE,
            client.send(Method::POST, "/v1/models/fast/predict", body.clone()),
        )
        .await
        .expect("the fast model answers while the slow one is stalled");
        assert_eq!(reply.status, 200, "{}", reply.text);
        assert_eq!(reply.json["outputs"], serde_json::json!([[1.0, 2.0]]));
        let failed = client
            .send(Method::POST, "/v1/models/broken/predict", body.clone())
            .await;
        assert_eq!(failed.status, 500, "{}", failed.text);
        assert_eq!(failed.json["model"], "broken");
    }
    assert!(stalled.iter().all(|task| !task.is_finished()));
    open.store(true, Ordering::Release);
    for task in stalled {
        let reply = task.await.unwrap();
        assert_eq!(reply.status, 200, "{}", reply.text);
    }
    assert_eq!(metrics.responses_with_status(500), 20);
}
