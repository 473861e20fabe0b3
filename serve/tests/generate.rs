//! Generation (`POST /v1/models/{name}/generate`): a character language
//! model served from a `CharTransformer::save` checkpoint answers what the
//! engine's own generator gives for the same prompt, sampling parameters,
//! seed and version, also when requests run concurrently; limits, unknown
//! characters, classifiers and unknown models get clear errors; a new
//! version gets its own generator.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;

use axum::body::Body;
use common::lm::requests;
use common::{Client, get, start, test_config};
use http_body_util::BodyExt;
use hyper::Method;
use netcl::models::{CharTransformer, Vocab};
use netcl::nn::{Linear, Published};
use netcl_serve::ModelService;
use netcl_serve::generate::LanguageModel;
use serde_json::{Value, json};
use tower::ServiceExt;

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("netcl-serve-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A small random language model over `common::lm::TEXT`'s characters.
fn language_model(seed: u64) -> (CharTransformer, Vocab) {
    common::lm::language_model(seed, 16, 1)
}

/// What the engine generates for one request.
fn expected(model: &CharTransformer, vocab: &Vocab, request: &Value) -> String {
    common::lm::expected(model, vocab, request, None)
}

/// A server with the language model `lm` (limits: 40 prompt characters,
/// 30 tokens) and a classifier `clf`.
async fn serve_lm(
    dir: &std::path::Path,
    model: &CharTransformer,
    vocab: &Vocab,
) -> netcl_serve::Server {
    let config = netcl_serve::Config {
        threads: 2,
        max_prompt: 40,
        max_tokens: 30,
        ..test_config()
    };
    common::lm::serve_lm(dir, model, vocab, config).await
}

async fn generate(client: &mut Client, name: &str, body: &Value) -> common::Reply {
    client
        .send(
            Method::POST,
            &format!("/v1/models/{name}/generate"),
            body.to_string().into_bytes(),
        )
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_generations_equal_the_same_requests_one_at_a_time_and_the_engine() {
    let dir = temp_dir("generate");
    let (model, vocab) = language_model(7);
    let server = serve_lm(&dir, &model, &vocab).await;
    let addr = server.local_addr();
    let requests = requests();

    // One at a time, on one connection.
    let mut client = Client::connect(addr).await;
    let mut one_at_a_time = Vec::new();
    for request in &requests {
        let reply = generate(&mut client, "lm", request).await;
        assert_eq!(reply.status, 200, "{}", reply.text);
        assert_eq!(reply.json["version"], 0);
        let text = reply.json["text"].as_str().unwrap().to_string();
        assert_eq!(text, expected(&model, &vocab, request), "{request}");
        assert_eq!(
            reply.json["tokens"].as_u64().unwrap(),
            request["max_tokens"].as_u64().unwrap()
        );
        one_at_a_time.push(text);
    }
    // Seeds matter: not every sampled text is the same.
    let sampled: std::collections::HashSet<_> = one_at_a_time.iter().collect();
    assert!(sampled.len() > 6, "{one_at_a_time:?}");

    // All at once, three times over, each on its own connection.
    let tasks: Vec<_> = (0..3)
        .flat_map(|_| requests.iter().cloned().enumerate())
        .map(|(i, request)| {
            tokio::spawn(async move {
                let mut client = Client::connect(addr).await;
                let reply = generate(&mut client, "lm", &request).await;
                assert_eq!(reply.status, 200, "{}", reply.text);
                (i, reply.json["text"].as_str().unwrap().to_string())
            })
        })
        .collect();
    for task in tasks {
        let (i, text) = task.await.unwrap();
        assert_eq!(text, one_at_a_time[i], "request {i} answered differently");
    }
    server.shutdown();
    server.wait().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_generate_requests_get_errors_naming_the_problem() {
    let dir = temp_dir("generate-errors");
    let (model, vocab) = language_model(1);
    let server = serve_lm(&dir, &model, &vocab).await;
    let mut client = Client::connect(server.local_addr()).await;
    let long_prompt = "a".repeat(41);
    let cases = [
        (
            "lm",
            json!({"prompt": long_prompt}),
            400,
            "at most 40 are allowed (--max-prompt)",
        ),
        (
            "lm",
            json!({"prompt": "the", "max_tokens": 31}),
            400,
            "at most 30 are allowed (--max-tokens)",
        ),
        (
            "lm",
            json!({"prompt": "the Q"}),
            400,
            "'Q' (U+0051) at position 4 is not in the model's vocabulary",
        ),
        ("lm", json!({"prompt": ""}), 400, "prompt is empty"),
        (
            "lm",
            json!({"prompt": "the", "temperature": -0.5}),
            400,
            "temperature is -0.5",
        ),
        (
            "lm",
            json!({"prompt": "the", "top_k": 0}),
            400,
            "top_k is 0",
        ),
        (
            "lm",
            json!({"prompt": "the", "max_token": 3}),
            400,
            "unknown field `max_token`",
        ),
        ("lm", json!({}), 400, "missing field `prompt`"),
        (
            "clf",
            json!({"prompt": "the"}),
            400,
            "model \"clf\" is not a language model",
        ),
        (
            "nope",
            json!({"prompt": "the"}),
            404,
            "no model named \"nope\"",
        ),
    ];
    for (name, body, status, message) in cases {
        let reply = generate(&mut client, name, &body).await;
        assert_eq!(reply.status, status, "{name} {body}: {}", reply.text);
        let error = reply.json["error"].as_str().unwrap_or_default();
        assert!(error.contains(message), "{name} {body}: {error}");
        assert_eq!(reply.content_type, "application/json");
    }
    // The model is named in the errors about it.
    let reply = generate(&mut client, "clf", &json!({"prompt": "x"})).await;
    assert_eq!(reply.json["model"], "clf");
    // Malformed JSON.
    let reply = client
        .send(
            Method::POST,
            "/v1/models/lm/generate",
            b"{\"prompt\": ".to_vec(),
        )
        .await;
    assert_eq!(reply.status, 400, "{}", reply.text);
    // Predict on a language model says to generate.
    let reply = client
        .send(
            Method::POST,
            "/v1/models/lm/predict",
            json!({"inputs": [[1.0]]}).to_string().into_bytes(),
        )
        .await;
    assert_eq!(reply.status, 400, "{}", reply.text);
    assert!(
        reply.text.contains("POST /v1/models/lm/generate"),
        "{}",
        reply.text
    );
    // The limits hold at the edge.
    let reply = generate(
        &mut client,
        "lm",
        &json!({"prompt": "a".repeat(40), "max_tokens": 30}),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(reply.json["text"].as_str().unwrap().chars().count(), 30);
    server.shutdown();
    server.wait().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_model_list_says_which_models_generate() {
    let dir = temp_dir("generate-list");
    let (model, vocab) = language_model(2);
    let server = serve_lm(&dir, &model, &vocab).await;
    let reply = get(server.local_addr(), "/v1/models").await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    let models = reply.json["models"].as_array().unwrap();
    let lm = models.iter().find(|m| m["name"] == "lm").unwrap();
    let clf = models.iter().find(|m| m["name"] == "clf").unwrap();
    assert_eq!(lm["capabilities"], json!(["generate"]));
    assert_eq!(
        (&lm["input"], &lm["output"]),
        (&Value::Null, &json!("text"))
    );
    assert_eq!(
        lm["generation"],
        json!({"vocab_size": vocab.len(), "context": 16, "max_prompt": 40, "max_tokens": 30})
    );
    assert_eq!(
        lm["parameters"].as_u64().unwrap() as usize,
        netcl::nn::Module::num_parameters(&model)
    );
    assert_eq!(clf["capabilities"], json!(["predict"]));
    assert!(clf.get("generation").is_none());
    server.shutdown();
    server.wait().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Sends a generate request to a router and parses the reply.
async fn call(router: &axum::Router, body: &Value) -> (u16, Value) {
    let request = axum::http::Request::post("/v1/models/lm/generate")
        .body(Body::from(body.to_string()))
        .unwrap();
    let response = router.clone().oneshot(request).await.unwrap();
    let status = response.status().as_u16();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_published_version_generates_with_its_own_weights() {
    let (first, vocab) = language_model(3);
    let (second, _) = language_model(4);
    let first = first.try_with_vocab(vocab.clone()).unwrap();
    let service = ModelService::builder("lm", Published::new(&first).unwrap())
        .language_model(LanguageModel::of_module(&first).unwrap())
        .build()
        .unwrap();
    let router = service.router();
    let handle = service.handle();
    let request = json!({"prompt": "the ", "max_tokens": 20, "temperature": 1.0, "seed": 5});
    let with = |model: &CharTransformer| {
        expected(
            model,
            &vocab,
            &json!({"prompt": "the ", "max_tokens": 20, "temperature": 1.0, "seed": 5}),
        )
    };
    assert_ne!(with(&first), with(&second), "the two models should differ");
    for _ in 0..2 {
        let (status, body) = call(&router, &request).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            (body["text"].as_str().unwrap(), &body["version"]),
            (with(&first).as_str(), &json!(0))
        );
    }
    assert_eq!(handle.publish(&second).unwrap(), 1);
    let (status, body) = call(&router, &request).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (body["text"].as_str().unwrap(), &body["version"]),
        (with(&second).as_str(), &json!(1))
    );
    // A version that is not a language model of these sizes is a 500
    // naming the version, not a panic; the model keeps its name.
    assert_eq!(handle.publish(&Linear::zeros(2, 2).unwrap()).unwrap(), 2);
    let (status, body) = call(&router, &request).await;
    assert_eq!(status, 500, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("version 2 is not a language model"),
        "{body}"
    );
    assert_eq!(body["model"], "lm");
    service.stop().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_followed_language_model_takes_new_versions_of_its_vocabulary_only() {
    let dir = temp_dir("generate-follow");
    let versions = dir.join("lm");
    std::fs::create_dir_all(&versions).unwrap();
    let (first, vocab) = language_model(5);
    first.save(&vocab, versions.join("1.safetensors")).unwrap();
    let server = start(netcl_serve::Config {
        models: vec![("lm".to_string(), versions.clone())],
        ..test_config()
    })
    .await;
    let state = std::sync::Arc::clone(server.model_named("lm").unwrap());
    let mut client = Client::connect(server.local_addr()).await;
    let request = json!({"prompt": "the ", "max_tokens": 12, "temperature": 1.0, "seed": 3});
    let reply = generate(&mut client, "lm", &request).await;
    assert_eq!(
        (reply.status, &reply.json["version"]),
        (200, &json!(1)),
        "{}",
        reply.text
    );
    assert_eq!(reply.json["text"], expected(&first, &vocab, &request));

    // Another vocabulary (same sizes, '!' for '.'): logged and skipped.
    let other_vocab = Vocab::from_text("abcdefghijklmnopqrstuvwxyz !\n");
    assert_eq!(other_vocab.len(), vocab.len(), "the sizes should match");
    let (other, _) = language_model(6);
    other
        .save(&other_vocab, versions.join("2.safetensors"))
        .unwrap();
    common::wait_until(common::PATIENCE, "the reload failure", || {
        server.metrics().reloads().1 == 1
    })
    .await;
    assert_eq!(state.published().version(), 1);

    // The same vocabulary: published, and generated from.
    let (third, _) = language_model(7);
    third.save(&vocab, versions.join("3.safetensors")).unwrap();
    common::wait_until(common::PATIENCE, "version 3", || {
        state.published().version() == 3
    })
    .await;
    let reply = generate(&mut client, "lm", &request).await;
    assert_eq!(
        (reply.status, &reply.json["version"]),
        (200, &json!(3)),
        "{}",
        reply.text
    );
    assert_eq!(reply.json["text"], expected(&third, &vocab, &request));
    server.shutdown();
    server.wait().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_of_the_older_plain_metadata_layout_is_served_too() {
    let dir = temp_dir("generate-legacy");
    let (model, vocab) = language_model(8);
    // As `CharTransformer::save` wrote before checkpoints described the
    // architecture: the sizes and the vocabulary as plain metadata keys.
    let c = *model.config();
    let metadata: BTreeMap<String, String> = [
        ("vocab_size", c.vocab_size.to_string()),
        ("d_model", c.d_model.to_string()),
        ("num_heads", c.num_heads.to_string()),
        ("num_blocks", c.num_blocks.to_string()),
        ("context", c.context.to_string()),
        ("d_ff", c.d_ff.to_string()),
        ("dropout", c.dropout.to_string()),
        ("vocab", vocab.chars()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let path = dir.join("old.safetensors");
    netcl::io::save_with_metadata(&model, &path, &metadata).unwrap();
    let server = start(netcl_serve::Config {
        models: vec![("lm".to_string(), path)],
        ..test_config()
    })
    .await;
    let mut client = Client::connect(server.local_addr()).await;
    let request =
        json!({"prompt": "lazy ", "max_tokens": 15, "temperature": 0.9, "top_k": 4, "seed": 11});
    let reply = generate(&mut client, "lm", &request).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(reply.json["text"], expected(&model, &vocab, &request));
    server.shutdown();
    server.wait().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
