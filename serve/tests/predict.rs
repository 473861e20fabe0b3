//! Predictions over real HTTP equal the engine's own forward of the same
//! version, and the other endpoints say what they should.

mod common;

use common::{
    Client, classes, digit_rows, engine_predict, probabilities, start, test_config, version,
};
use netcl_serve::Config;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn predictions_equal_the_engine_forward_of_the_same_version() {
    let server = start(Config {
        max_batch: 16,
        ..test_config()
    })
    .await;
    let rows = digit_rows();
    let mut client = Client::connect(server.local_addr()).await;
    let current = server.model().published().load();
    // One row, then a full batch of 16, then a batch of 7 that starts
    // elsewhere in the file.
    for (start, len) in [(0, 1), (100, 16), (1000, 7)] {
        let batch = &rows[start..start + len];
        let reply = client.predict(batch).await;
        assert_eq!(reply.status, 200, "{}", reply.text);
        assert_eq!(reply.content_type, "application/json");
        assert_eq!(version(&reply), current.number());
        let (expected_classes, expected_probabilities) = engine_predict(&**current, batch);
        assert_eq!(classes(&reply), expected_classes);
        // f32 values survive JSON exactly (shortest round-trip form).
        assert_eq!(probabilities(&reply), expected_probabilities);
    }
    server.shutdown();
    server.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_startup_model_classifies_most_digits() {
    let server = start(test_config()).await;
    let rows = digit_rows();
    let mut client = Client::connect(server.local_addr()).await;
    let labels: Vec<u32> = {
        let text = include_str!("../../data/digits.csv");
        text.lines()
            .skip(1)
            .take(64)
            .map(|line| line.rsplit(',').next().unwrap().trim().parse().unwrap())
            .collect()
    };
    let reply = client.predict(&rows[..64]).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    let correct = classes(&reply)
        .iter()
        .zip(&labels)
        .filter(|(a, b)| a == b)
        .count();
    // Two epochs of start-up training already classify most digits.
    assert!(correct >= 48, "{correct} of 64 correct");
    for row in probabilities(&reply).chunks(10) {
        let sum: f32 = row.iter().sum();
        assert!((sum - 1.0).abs() < 1e-4, "probabilities sum to {sum}");
    }
    server.shutdown();
    server.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_health_and_metrics_describe_the_server() {
    let server = start(test_config()).await;
    let addr = server.local_addr();
    let mut client = Client::connect(addr).await;

    let model = client.get("/v1/model").await;
    assert_eq!(model.status, 200);
    assert_eq!(model.json["version"].as_u64(), Some(0));
    assert_eq!(model.json["source"], "startup");
    assert_eq!(model.json["training_steps"].as_u64(), Some(2 * 45));
    let accuracy = model.json["accuracy"].as_f64().unwrap();
    assert!((0.5..=1.0).contains(&accuracy), "accuracy {accuracy}");
    assert!(model.json["last_loss"].as_f64().unwrap() > 0.0);

    let health = client.get("/healthz").await;
    assert_eq!(
        (health.status, health.json["status"].as_str()),
        (200, Some("ok"))
    );

    let reply = client.predict(&digit_rows()[..3]).await;
    assert_eq!(reply.status, 200);
    let metrics = client.get("/metrics").await;
    assert_eq!(metrics.status, 200);
    assert!(
        metrics
            .content_type
            .starts_with("text/plain; version=0.0.4")
    );
    for line in [
        "netcl_serve_requests_total{route=\"/v1/predict\",status=\"200\",model=\"digits\"} 1",
        "netcl_serve_requests_total{route=\"/v1/model\",status=\"200\",model=\"digits\"} 1",
        "netcl_serve_request_duration_seconds_count{route=\"/v1/predict\",model=\"digits\"} 1",
        "netcl_serve_batch_rows_sum{model=\"digits\"} 3.0",
        "netcl_serve_model_version{model=\"digits\"} 0",
        "netcl_serve_tape_live_nodes{thread=\"serving\"} 0",
        "netcl_serve_training_enabled 0",
        "netcl_serve_open_connections 1",
    ] {
        assert!(
            metrics.text.lines().any(|l| l == line),
            "no line {line:?} in\n{}",
            metrics.text
        );
    }
    server.shutdown();
    let summary = server.wait().await.unwrap();
    assert_eq!((summary.version, summary.saved), (0, None));
}
