//! Every kind of bad request gets its 4xx status with a JSON error naming
//! the problem; an overloaded queue answers 503 at once. The server keeps
//! serving after each.

mod common;

use std::time::{Duration, Instant};

use common::{Client, digit_rows, start, test_config};
use hyper::Method;
use netcl_serve::{BODY_LIMIT, Config};

fn row(value: &str, len: usize) -> String {
    format!("[{}]", vec![value; len].join(","))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_request_gets_its_status_and_a_named_error() {
    let server = start(Config {
        max_batch: 4,
        ..test_config()
    })
    .await;
    let mut client = Client::connect(server.local_addr()).await;
    let good = row("3", 64);
    let huge = format!(
        r#"{{"inputs": [{}]}}"#,
        vec![good.as_str(); BODY_LIMIT / good.len() + 1].join(",")
    );
    let cases: Vec<(Method, &str, String, u16, &str)> = vec![
        (
            Method::POST,
            "/v1/predict",
            format!(r#"{{"inputs": [{good}, {}]}}"#, row("3", 63)),
            422,
            "inputs[1] has 63 values, expected 64",
        ),
        (
            Method::POST,
            "/v1/predict",
            format!(r#"{{"inputs": [{}]}}"#, row("3", 65)),
            422,
            "inputs[0] has 65 values",
        ),
        (
            Method::POST,
            "/v1/predict",
            format!(r#"{{"inputs": [[{}, "7"]]}}"#, vec!["1"; 63].join(",")),
            422,
            "expected a number at inputs[0][63]",
        ),
        (
            Method::POST,
            "/v1/predict",
            format!(r#"{{"inputs": [[{}, null]]}}"#, vec!["1"; 63].join(",")),
            422,
            "expected a number at inputs[0][63]",
        ),
        (
            Method::POST,
            "/v1/predict",
            format!(r#"{{"inputs": [[{}, 1e400]]}}"#, vec!["1"; 63].join(",")),
            400,
            "number out of range",
        ),
        (
            Method::POST,
            "/v1/predict",
            format!(r#"{{"inputs": [[{}, NaN]]}}"#, vec!["1"; 63].join(",")),
            400,
            "malformed JSON",
        ),
        (
            Method::POST,
            "/v1/predict",
            format!(r#"{{"inputs": [[{}, -1]]}}"#, vec!["1"; 63].join(",")),
            422,
            "inputs[0][63] is -1, outside the input range 0..=16",
        ),
        (
            Method::POST,
            "/v1/predict",
            r#"{"inputs": []}"#.to_string(),
            422,
            "inputs is empty",
        ),
        (
            Method::POST,
            "/v1/predict",
            format!(r#"{{"inputs": [{}]}}"#, [good.as_str(); 5].join(",")),
            422,
            "inputs has 5 rows, at most 4 are allowed",
        ),
        (
            Method::POST,
            "/v1/predict",
            r#"{"inputs": [[1, 2,"#.to_string(),
            400,
            "malformed JSON",
        ),
        (
            Method::POST,
            "/v1/predict",
            "not json".to_string(),
            400,
            "malformed JSON",
        ),
        (
            Method::POST,
            "/v1/predict",
            String::new(),
            400,
            "malformed JSON",
        ),
        (
            Method::POST,
            "/v1/predict",
            r#"{"rows": []}"#.to_string(),
            422,
            "missing field `inputs`",
        ),
        (
            Method::POST,
            "/v1/predict",
            r#"{"inputs": "all of them"}"#.to_string(),
            422,
            "expected an array of rows of 64 numbers",
        ),
        (
            Method::POST,
            "/v1/predict",
            huge,
            413,
            "request body larger than 1048576 bytes",
        ),
        (
            Method::GET,
            "/v2/predict",
            String::new(),
            404,
            "no route for GET /v2/predict",
        ),
        (
            Method::GET,
            "/v1/predict",
            String::new(),
            405,
            "GET is not allowed on /v1/predict",
        ),
        (
            Method::DELETE,
            "/v1/model",
            String::new(),
            405,
            "DELETE is not allowed on /v1/model",
        ),
    ];
    for (method, path, body, status, message) in cases {
        let shown: String = body.chars().take(60).collect();
        // A connection the server closed (after a 413, say) is replaced.
        let mut fresh = Client::connect(server.local_addr()).await;
        let reply = fresh.send(method.clone(), path, body.into_bytes()).await;
        assert_eq!(
            reply.status, status,
            "{method} {path} {shown}: {}",
            reply.text
        );
        assert_eq!(reply.content_type, "application/json");
        let error = reply.json["error"]
            .as_str()
            .unwrap_or_else(|| panic!("{method} {path} {shown}: no JSON error in {}", reply.text));
        assert!(error.contains(message), "{method} {path} {shown}: {error}");
        // And the server still serves.
        let ok = client.predict(&digit_rows()[..1]).await;
        assert_eq!(ok.status, 200, "{}", ok.text);
    }
    assert_eq!(server.metrics().responses_with_status(500), 0);
    server.shutdown();
    server.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_503_at_once() {
    // No model thread: the first two requests fill the queue and wait
    // there (until their timeout); the third finds it full.
    let server = start(Config {
        threads: 0,
        queue_capacity: 2,
        request_timeout: Duration::from_secs(3),
        ..test_config()
    })
    .await;
    let addr = server.local_addr();
    let rows = digit_rows();
    let mut waiting = Vec::new();
    for _ in 0..2 {
        let rows = rows[..1].to_vec();
        waiting.push(tokio::spawn(async move {
            Client::connect(addr).await.predict(&rows).await
        }));
    }
    let queued = Instant::now();
    while server.metrics().responses_with_status(503) == 0 {
        let reply = Client::connect(addr).await.predict(&rows[..1]).await;
        if reply.status == 503 {
            assert!(
                reply.json["error"].as_str().unwrap().contains("overloaded"),
                "{}",
                reply.text
            );
            break;
        }
        assert!(queued.elapsed() < common::PATIENCE, "no 503");
    }
    // The queued ones time out with a JSON 408.
    for task in waiting {
        let reply = task.await.unwrap();
        assert!(
            [408, 503].contains(&reply.status),
            "{}: {}",
            reply.status,
            reply.text
        );
        assert!(reply.json["error"].is_string());
    }
    server.shutdown();
    server.wait().await.unwrap();
}
