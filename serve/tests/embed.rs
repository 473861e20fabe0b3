//! The library example (`examples/embed.rs`): its app, started on an
//! ephemeral port, serves a user-defined module under the user's own
//! routes, and a version published through its handle answers the next
//! request.

#[path = "../examples/embed.rs"]
mod embed;

mod common;

use common::Client;
use hyper::Method;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_example_serves_a_user_module_and_publishes_versions() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = embed::app().expect("the example's app builds");
    tokio::spawn(async move { axum::serve(listener, app).await });
    let mut client = Client::connect(addr).await;

    let own = client.get("/").await;
    assert_eq!((own.status, own.text.as_str()), (200, "my app\n"));

    let body = br#"{"inputs": [[3, 4], [0, -1]]}"#.to_vec();
    let reply = client
        .send(Method::POST, "/api/v1/models/norm/predict", body.clone())
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(reply.json["version"].as_u64(), Some(0));
    let outputs = reply.json["outputs"].as_array().unwrap();
    // factor 2: [3, 4] -> [6, 8], norm 10 / 2 = 5.
    assert_eq!(outputs[0]["scaled"], serde_json::json!([6.0, 8.0]));
    assert_eq!(outputs[0]["norm"].as_f64(), Some(5.0));
    assert_eq!(outputs[1]["scaled"], serde_json::json!([0.0, -2.0]));

    // The alias of the only (so default) model answers the same.
    let alias = client
        .send(Method::POST, "/api/v1/predict", body.clone())
        .await;
    assert_eq!(alias.json["outputs"], reply.json["outputs"]);

    let listed = client.get("/api/v1/models").await;
    assert_eq!(listed.status, 200);
    let model = &listed.json["models"][0];
    assert_eq!(model["name"], "norm");
    assert_eq!(model["parameters"].as_u64(), Some(1));
    assert_eq!(model["input"]["shape"], serde_json::json!([2]));
    assert_eq!(model["output"], "map");

    let published = client.send(Method::POST, "/publish", Vec::new()).await;
    assert_eq!(published.text, "1\n");
    let after = client
        .send(Method::POST, "/api/v1/models/norm/predict", body)
        .await;
    assert_eq!(after.json["version"].as_u64(), Some(1));
    assert_eq!(
        after.json["outputs"][0]["scaled"],
        serde_json::json!([9.0, 12.0])
    );

    // A row of the wrong width is refused, naming what was expected.
    let bad = client
        .send(
            Method::POST,
            "/api/v1/models/norm/predict",
            br#"{"inputs": [[1, 2, 3]]}"#.to_vec(),
        )
        .await;
    assert_eq!(bad.status, 422);
    assert!(
        bad.json["error"]
            .as_str()
            .unwrap()
            .contains("inputs[0] has 3 values, expected 2"),
        "{}",
        bad.text
    );
}
