//! Any model from a self-describing checkpoint: served with the input its
//! architecture (or its `netcl-serve.input_shape` metadata) gives, refused
//! at start-up with an error naming the model and the problem, and, when
//! watched, a bad new version is logged and the previous keeps serving.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{Client, PATIENCE, start, test_config, wait_until};
use hyper::Method;
use netcl::nn::{Conv2d, Flatten, Linear, Module, ReLU, Sequential};
use netcl::{Tensor, autograd};
use netcl_serve::Config;
use netcl_serve::loader::INPUT_SHAPE_KEY;
use rand::SeedableRng;

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("netcl-serve-ckpt-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn tiny(seed: u64) -> Sequential {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    Sequential::new()
        .with(Linear::new(4, 8, &mut rng))
        .with(ReLU::new())
        .with(Linear::new(8, 3, &mut rng))
}

fn cnn(seed: u64) -> Sequential {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    Sequential::new()
        .with(Conv2d::new(1, 2, 3, &mut rng))
        .with(ReLU::new())
        .with(Flatten::new())
        .with(Linear::new(2 * 6 * 6, 3, &mut rng))
}

/// The classes `model` gives `rows` (each of `shape`), by the engine.
fn engine_classes(model: &dyn Module, rows: &[Vec<f32>], shape: &[usize]) -> Vec<u64> {
    let _no_grad = autograd::no_grad();
    let mut full = vec![rows.len()];
    full.extend_from_slice(shape);
    let x = Tensor::from_vec(rows.concat(), &full).unwrap();
    let out = model.forward(&x).unwrap().to_vec();
    out.chunks(3)
        .map(|row| {
            (0..3)
                .max_by(|&a, &b| row[a].partial_cmp(&row[b]).unwrap())
                .unwrap() as u64
        })
        .collect()
}

fn rows(width: usize, n: usize) -> Vec<Vec<f32>> {
    (0..n)
        .map(|r| {
            (0..width)
                .map(|i| (((r * 31 + i * 7) % 13) as f32 - 6.0) / 3.0)
                .collect()
        })
        .collect()
}

async fn predict(client: &mut Client, name: &str, rows: &[Vec<f32>]) -> common::Reply {
    let body = serde_json::json!({ "inputs": rows })
        .to_string()
        .into_bytes();
    client
        .send(Method::POST, &format!("/v1/models/{name}/predict"), body)
        .await
}

fn classes_of(reply: &common::Reply) -> Vec<u64> {
    reply.json["classes"]
        .as_array()
        .unwrap_or_else(|| panic!("no classes in {}", reply.text))
        .iter()
        .map(|c| c.as_u64().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_self_describing_model_is_served_with_its_input() {
    let dir = temp_dir("any");
    let mlp_path = dir.join("tiny.safetensors");
    netcl::io::save_model(&tiny(1), &mlp_path).unwrap();
    let cnn_path = dir.join("cnn.safetensors");
    let metadata = BTreeMap::from([(INPUT_SHAPE_KEY.to_string(), "1,8,8".to_string())]);
    netcl::io::save_model_with_metadata(&cnn(2), &cnn_path, &metadata).unwrap();
    let server = start(Config {
        models: vec![
            ("tiny".to_string(), mlp_path.clone()),
            ("cnn".to_string(), cnn_path.clone()),
        ],
        ..test_config()
    })
    .await;
    let mut client = Client::connect(server.local_addr()).await;
    let listed = client.get("/v1/models/tiny").await;
    assert_eq!(listed.status, 200, "{}", listed.text);
    assert_eq!(
        listed.json["input"]["shape"],
        serde_json::json!([4]),
        "{}",
        listed.text
    );
    let listed = client.get("/v1/models/cnn").await;
    assert_eq!(
        listed.json["input"]["shape"],
        serde_json::json!([1, 8, 8]),
        "{}",
        listed.text
    );

    let tiny_rows = rows(4, 6);
    let reply = predict(&mut client, "tiny", &tiny_rows).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    let saved = netcl::io::load_model(&mlp_path).unwrap();
    assert_eq!(
        classes_of(&reply),
        engine_classes(&*saved, &tiny_rows, &[4])
    );

    let cnn_rows = rows(64, 5);
    let reply = predict(&mut client, "cnn", &cnn_rows).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    let saved = netcl::io::load_model(&cnn_path).unwrap();
    assert_eq!(
        classes_of(&reply),
        engine_classes(&*saved, &cnn_rows, &[1, 8, 8])
    );

    // A row of the wrong width is the client's error.
    let reply = predict(&mut client, "cnn", &rows(4, 1)).await;
    assert!((400..500).contains(&reply.status), "{}", reply.text);
    server.shutdown();
    server.wait().await.unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Replaces the first `from` in the safetensors header of `bytes` by `to`
/// (of the same length).
fn edit_header(bytes: &mut [u8], from: &str, to: &str) {
    assert_eq!(from.len(), to.len());
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = &mut bytes[8..8 + n];
    let at = header
        .windows(from.len())
        .position(|w| w == from.as_bytes())
        .unwrap_or_else(|| panic!("{from:?} not in {}", String::from_utf8_lossy(header)));
    header[at..at + from.len()].copy_from_slice(to.as_bytes());
}

/// Spoils a checkpoint's bytes.
type Corruption = Box<dyn Fn(&mut Vec<u8>)>;

async fn start_error(name: &str, path: &Path) -> String {
    let err = netcl_serve::start(Config {
        models: vec![(name.to_string(), path.to_path_buf())],
        ..test_config()
    })
    .await
    .expect_err("the server refuses the checkpoint");
    err.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_checkpoint_is_refused_at_start_naming_the_model_and_the_problem() {
    let dir = temp_dir("bad");
    let good = netcl::io::model_to_bytes(&tiny(3)).unwrap();
    let path = dir.join("m.safetensors");
    let cases: Vec<(&str, Corruption, &str)> = vec![
        (
            "unknown-kind",
            Box::new(|b| edit_header(b, "Linear", "Linxar")),
            "Linxar",
        ),
        (
            "mis-shaped",
            Box::new(|b| edit_header(b, "in_features\\\":4", "in_features\\\":5")),
            "shape",
        ),
        (
            "nan",
            Box::new(|b| {
                let len = b.len();
                b[len - 4..].copy_from_slice(&f32::NAN.to_le_bytes());
            }),
            "NaN",
        ),
        (
            "newer-schema",
            Box::new(|b| {
                edit_header(
                    b,
                    "\"netcl.schema_version\":\"1\"",
                    "\"netcl.schema_version\":\"9\"",
                )
            }),
            "newer",
        ),
    ];
    for (name, corrupt, problem) in cases {
        let mut bytes = good.clone();
        corrupt(&mut bytes);
        std::fs::write(&path, &bytes).unwrap();
        let message = start_error(name, &path).await;
        assert!(message.contains(name), "{name}: {message}");
        assert!(message.contains(problem), "{name}: {message}");
    }
    // A model whose input the server cannot tell is refused, too.
    netcl::io::save_model(&cnn(4), &path).unwrap();
    let message = start_error("conv", &path).await;
    assert!(
        message.contains("conv") && message.contains("Conv2d") && message.contains(INPUT_SHAPE_KEY),
        "{message}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_watched_version_is_logged_and_the_previous_keeps_serving() {
    let dir = temp_dir("watched");
    let versions = netcl::io::CheckpointDir::create(&dir).unwrap();
    versions.save_model(1, &tiny(5)).unwrap();
    let server = start(Config {
        models: vec![("tiny".to_string(), dir.clone())],
        ..test_config()
    })
    .await;
    let mut client = Client::connect(server.local_addr()).await;
    let probe = rows(4, 8);
    let first = predict(&mut client, "tiny", &probe).await;
    assert_eq!(first.json["version"], 1, "{}", first.text);

    // Version 2 names an unknown layer kind: counted as a failed reload.
    let mut bad = netcl::io::model_to_bytes(&tiny(6)).unwrap();
    edit_header(&mut bad, "Linear", "Linxar");
    let temp = dir.join("2.partial");
    std::fs::write(&temp, &bad).unwrap();
    std::fs::rename(&temp, dir.join("2.safetensors")).unwrap();
    let metrics = std::sync::Arc::clone(server.metrics());
    wait_until(PATIENCE, "the bad version to be rejected", || {
        metrics.reloads().1 >= 1
    })
    .await;
    let still = predict(&mut client, "tiny", &probe).await;
    assert_eq!(still.status, 200, "{}", still.text);
    assert_eq!(still.json["version"], 1, "{}", still.text);
    assert_eq!(classes_of(&still), classes_of(&first));

    // Version 3 loads, but takes rows of 5: every request would fail.
    let mut rng = rand::rngs::StdRng::seed_from_u64(8);
    versions
        .save_model(3, &Linear::new(5, 3, &mut rng))
        .unwrap();
    wait_until(PATIENCE, "the other-shaped version to be rejected", || {
        metrics.reloads().1 >= 2
    })
    .await;
    let still = predict(&mut client, "tiny", &probe).await;
    assert_eq!(still.json["version"], 1, "{}", still.text);

    // Version 4 is good: served, under its number.
    versions.save_model(4, &tiny(7)).unwrap();
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        let reply = predict(&mut client, "tiny", &probe).await;
        let v = reply.json["version"].as_u64().unwrap();
        assert!(v == 1 || v == 4, "{}", reply.text);
        if v == 4 {
            let saved = netcl::io::load_model(dir.join("4.safetensors")).unwrap();
            assert_eq!(classes_of(&reply), engine_classes(&*saved, &probe, &[4]));
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "version 4 never served"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.shutdown();
    server.wait().await.unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}
