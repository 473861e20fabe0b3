//! Hot reload with `watch`: a good checkpoint renamed into place becomes
//! one new version; a bad one is ignored and the current version keeps
//! serving.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{
    Client, classes, digit_rows, engine_predict, probabilities, start, test_config, version,
};
use netcl::nn::{Activation, Mlp};
use netcl_serve::Config;
use netcl_serve::model::{DIMS, save_checkpoint};
use rand::SeedableRng;

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("netcl-serve-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Writes `bytes` beside `path`, then renames them into place.
fn replace_atomically(path: &Path, bytes: &[u8]) {
    let temp = path.with_extension("partial");
    std::fs::write(&temp, bytes).unwrap();
    std::fs::rename(&temp, path).unwrap();
}

/// Waits (a liveness bound) until the server's version is `expected`.
async fn wait_for_version(client: &mut Client, expected: u64) {
    let start = Instant::now();
    loop {
        let reply = client.get("/v1/model").await;
        let v = reply.json["version"].as_u64().unwrap();
        if v == expected {
            return;
        }
        assert!(v < expected, "version {v} went past {expected}");
        assert!(start.elapsed() < common::PATIENCE, "still at version {v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn good_files_are_published_and_bad_files_ignored() {
    let dir = temp_dir("reload");
    let watched = dir.join("model.safetensors");
    let _ = std::fs::remove_file(&watched);
    let server = start(Config {
        watch: Some(watched.clone()),
        ..test_config()
    })
    .await;
    let mut client = Client::connect(server.local_addr()).await;
    let rows = digit_rows();
    let batch = &rows[200..210];
    assert_eq!(version(&client.predict(batch).await), 0);

    // A good checkpoint: a different model, saved atomically by the
    // engine's own writer. It is published under the version stored in
    // it (above the current one), so replicas show the trainer's numbers.
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let first = Mlp::new(&DIMS, Activation::Relu, &mut rng);
    save_checkpoint(&first, 40, 123, &watched).unwrap();
    wait_for_version(&mut client, 40).await;
    let reply = client.predict(batch).await;
    assert_eq!(version(&reply), 40);
    let (expected_classes, expected_probabilities) = engine_predict(&first, batch);
    assert_eq!(classes(&reply), expected_classes);
    assert_eq!(probabilities(&reply), expected_probabilities);
    let info = client.get("/v1/model").await;
    assert_eq!(info.json["source"], "reload");
    assert_eq!(info.json["training_steps"].as_u64(), Some(123));

    // Bad files: garbage, a truncated checkpoint, another model's shapes,
    // non-finite weights. Each is skipped; version 40 keeps serving.
    let good_bytes = std::fs::read(&watched).unwrap();
    let other_shape =
        netcl::io::to_bytes(&Mlp::new(&[64, 32, 10], Activation::Relu, &mut rng)).unwrap();
    let non_finite = {
        let model = Mlp::new(&DIMS, Activation::Relu, &mut rng);
        netcl::nn::Module::parameters(&model)[1].with_data_mut(|mut v| v.fill(f32::NAN));
        netcl::io::to_bytes(&model).unwrap()
    };
    let bad_files: [&[u8]; 4] = [
        b"definitely not safetensors",
        &good_bytes[..good_bytes.len() / 2],
        &other_shape,
        &non_finite,
    ];
    for (i, bytes) in bad_files.iter().enumerate() {
        replace_atomically(&watched, bytes);
        let deadline = Instant::now();
        while server.metrics().reloads().1 < i as u64 + 1 {
            assert!(
                deadline.elapsed() < common::PATIENCE,
                "bad file {i} never seen"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let reply = client.predict(batch).await;
        assert_eq!(reply.status, 200);
        assert_eq!(version(&reply), 40, "bad file {i} was published");
        assert_eq!(classes(&reply), expected_classes);
    }

    // A good file whose stored version is not above the current one: it
    // becomes the next version, so versions still only move forward.
    let second = Mlp::new(&DIMS, Activation::Relu, &mut rng);
    save_checkpoint(&second, 2, 0, &watched).unwrap();
    wait_for_version(&mut client, 41).await;
    let reply = client.predict(batch).await;
    assert_eq!(classes(&reply), engine_predict(&second, batch).0);
    server.shutdown();
    server.wait().await.unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}
