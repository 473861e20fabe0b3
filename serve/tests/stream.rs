//! Streaming generation (`"stream": true` on `POST
//! /v1/models/{name}/generate`): the characters arrive as server-sent
//! events, the same ones the engine's generator gives (also with many
//! streams at once), then a `done` event with the summary; a client that
//! disconnects stops its generation within one character; the request
//! deadline stops a generation with finish reason `"timeout"`; errors
//! before the stream starts are JSON.
//!
//! The client here is a raw TCP connection reading the chunked SSE body by
//! hand, so that "disconnect" is exactly one `close` of its socket.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::lm::{expected, language_model, requests, serve_lm};
use common::{Client, PATIENCE, test_config};
use hyper::Method;
use netcl::nn::{Linear, Published};
use netcl_serve::ModelService;
use netcl_serve::generate::LanguageModel;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// The tests of this file run one at a time. The disconnect test counts
/// the characters generated after a client leaves, which measures the
/// server only while its runtime has a core: beside another test's dozens
/// of streams on a two-core machine, noticing the closed connection could
/// take longer than a character (it failed once so in CI).
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("netcl-stream-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// One server-sent event: its name and its data parsed as JSON.
#[derive(Debug, Clone)]
struct SseEvent {
    name: String,
    data: Value,
}

/// A response read off a raw connection: the status and headers first,
/// then the body's events one at a time.
struct Stream {
    reader: BufReader<TcpStream>,
    status: u16,
    content_type: String,
    chunked: bool,
    /// Body bytes received and not yet parsed into events.
    pending: Vec<u8>,
    /// The body ended (the last chunk came).
    ended: bool,
}

impl Stream {
    /// Sends `body` to `POST /v1/models/{name}/generate` on a new
    /// connection and reads the response's head.
    async fn open(addr: std::net::SocketAddr, name: &str, body: &Value) -> Stream {
        let mut socket = TcpStream::connect(addr).await.unwrap();
        socket.set_nodelay(true).unwrap();
        let body = body.to_string();
        let request = format!(
            "POST /v1/models/{name}/generate HTTP/1.1\r\nhost: {addr}\r\ncontent-type: \
             application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        socket.write_all(request.as_bytes()).await.unwrap();
        let mut reader = BufReader::new(socket);
        let mut line = String::new();
        reader.read_line(&mut line).await.unwrap();
        let status = line.split(' ').nth(1).unwrap().parse().unwrap();
        let (mut content_type, mut chunked, mut length) = (String::new(), false, 0);
        loop {
            line.clear();
            reader.read_line(&mut line).await.unwrap();
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            let (key, value) = line.split_once(':').unwrap();
            let value = value.trim();
            match key.to_ascii_lowercase().as_str() {
                "content-type" => content_type = value.to_string(),
                "transfer-encoding" => chunked = value.eq_ignore_ascii_case("chunked"),
                "content-length" => length = value.parse().unwrap(),
                _ => {}
            }
        }
        let mut pending = Vec::new();
        if !chunked {
            pending.resize(length, 0);
            reader.read_exact(&mut pending).await.unwrap();
        }
        Stream {
            reader,
            status,
            content_type,
            chunked,
            pending,
            ended: !chunked,
        }
    }

    /// A non-streamed body, as JSON.
    fn json(&self) -> Value {
        assert!(!self.chunked, "a streamed body");
        serde_json::from_slice(&self.pending).unwrap()
    }

    /// The next event, or `None` at the end of the body.
    async fn next(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(end) = self.pending.windows(2).position(|w| w == b"\n\n") {
                let raw = String::from_utf8(self.pending.drain(..end + 2).collect()).unwrap();
                let (mut name, mut data) = (String::new(), String::new());
                for line in raw.lines() {
                    if let Some(value) = line.strip_prefix("event: ") {
                        name = value.to_string();
                    } else if let Some(value) = line.strip_prefix("data: ") {
                        data.push_str(value);
                    }
                }
                let data = serde_json::from_str(&data).unwrap();
                return Some(SseEvent { name, data });
            }
            if self.ended {
                assert!(self.pending.is_empty(), "a partial event at the end");
                return None;
            }
            // One chunk: its size in hex, CRLF, the bytes, CRLF.
            let mut line = String::new();
            self.reader.read_line(&mut line).await.unwrap();
            let size = usize::from_str_radix(line.trim_end(), 16).unwrap();
            let start = self.pending.len();
            self.pending.resize(start + size, 0);
            self.reader
                .read_exact(&mut self.pending[start..])
                .await
                .unwrap();
            let mut crlf = [0; 2];
            self.reader.read_exact(&mut crlf).await.unwrap();
            assert_eq!(&crlf, b"\r\n");
            self.ended = size == 0;
        }
    }

    /// Every event left, and the text of the `token` events among them.
    async fn rest(&mut self) -> (String, Vec<SseEvent>) {
        let (mut text, mut others) = (String::new(), Vec::new());
        while let Some(event) = self.next().await {
            if event.name == "token" {
                text.push_str(event.data["text"].as_str().unwrap());
            } else {
                others.push(event);
            }
        }
        (text, others)
    }
}

/// Streams `request` to `lm`: the text and the `done` event's data.
async fn stream(addr: std::net::SocketAddr, request: &Value) -> (String, Value) {
    let mut body = request.clone();
    body["stream"] = json!(true);
    let mut stream = Stream::open(addr, "lm", &body).await;
    assert_eq!(stream.status, 200);
    assert_eq!(stream.content_type, "text/event-stream");
    let (text, others) = stream.rest().await;
    assert_eq!(others.len(), 1, "{others:?}");
    assert_eq!(others[0].name, "done", "{others:?}");
    (text, others[0].data.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_tokens_equal_the_engine_and_the_json_answer_one_at_a_time_and_at_once() {
    let _one = ONE_AT_A_TIME.lock().await;
    let dir = temp_dir("equal");
    let (model, vocab) = language_model(7, 16, 1);
    let server = serve_lm(
        &dir,
        &model,
        &vocab,
        netcl_serve::Config {
            threads: 2,
            max_tokens: 30,
            ..test_config()
        },
    )
    .await;
    let addr = server.local_addr();
    let requests = requests();
    let mut client = Client::connect(addr).await;
    let mut one_at_a_time = Vec::new();
    for request in &requests {
        let (text, done) = stream(addr, request).await;
        assert_eq!(text, expected(&model, &vocab, request, None), "{request}");
        let max_tokens = request["max_tokens"].as_u64().unwrap();
        let prompt_tokens = request["prompt"].as_str().unwrap().chars().count();
        assert_eq!(
            done,
            json!({
                "tokens": max_tokens, "version": 0, "seed": request["seed"],
                "prompt_tokens": prompt_tokens, "finish_reason": "length",
            })
        );
        // The same request without streaming answers the same.
        let reply = client
            .send(
                Method::POST,
                "/v1/models/lm/generate",
                request.to_string().into_bytes(),
            )
            .await;
        assert_eq!(reply.status, 200, "{}", reply.text);
        assert_eq!(reply.json["text"], text.as_str());
        assert_eq!(reply.json["finish_reason"], "length");
        one_at_a_time.push(text);
    }
    let sampled: std::collections::HashSet<_> = one_at_a_time.iter().collect();
    assert!(sampled.len() > 6, "seeds matter: {one_at_a_time:?}");

    // All at once, three times over, each on its own connection.
    let tasks: Vec<_> = (0..3)
        .flat_map(|_| requests.iter().cloned().enumerate())
        .map(|(i, request)| tokio::spawn(async move { (i, stream(addr, &request).await.0) }))
        .collect();
    for task in tasks {
        let (i, text) = task.await.unwrap();
        assert_eq!(text, one_at_a_time[i], "stream {i} answered differently");
    }
    let tokens: u64 = requests
        .iter()
        .map(|r| r["max_tokens"].as_u64().unwrap())
        .sum();
    // One stream, one JSON answer, then three streams of each request.
    assert_eq!(server.metrics().generated_tokens("lm"), 5 * tokens);
    assert_eq!(server.metrics().generations("lm", "length"), 5 * 12);
    let metrics = client.get("/metrics").await.text;
    assert!(
        metrics.contains(&format!(
            "netcl_serve_generated_tokens_total{{model=\"lm\"}} {}\n",
            5 * tokens
        )),
        "{metrics}"
    );
    server.shutdown();
    server.wait().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// The most characters a generation may add after its client disconnects.
/// The server checks for the disconnect after every character, so it adds
/// at most the one being drawn when it notices. Noticing takes the runtime
/// a wake-up: on a two-core machine whose cores both run the generation's
/// matrix products, that can take a scheduler tick, longer than one of
/// these characters (it did, twice in CI, with 2). A generation that did
/// not stop would run on towards its million characters.
const AFTER_DISCONNECT: u64 = 2;

/// Waits until model `lm` has ended `n` generations for `finish`.
async fn wait_for_generations(server: &netcl_serve::Server, finish: &str, n: u64) {
    common::wait_until(
        PATIENCE,
        &format!("{n} generations ending {finish}"),
        || server.metrics().generations("lm", finish) >= n,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_stops_its_generation_within_one_token() {
    let _one = ONE_AT_A_TIME.lock().await;
    let dir = temp_dir("disconnect");
    // Wide enough that a character takes a while (a millisecond or more),
    // so that the disconnect lands while one is being drawn.
    let (model, vocab) = language_model(3, 512, 4);
    let server = serve_lm(
        &dir,
        &model,
        &vocab,
        netcl_serve::Config {
            threads: 2,
            max_tokens: 1_000_000,
            request_timeout: Duration::from_secs(600),
            ..test_config()
        },
    )
    .await;
    let addr = server.local_addr();
    let metrics = std::sync::Arc::clone(server.metrics());
    let request = json!({"prompt": "the ", "max_tokens": 1_000_000, "temperature": 1.0, "seed": 1});
    let expected_start = expected(&model, &vocab, &request, Some(5));
    for round in 0..3u64 {
        // A stream: read five characters, then close the connection.
        let mut body = request.clone();
        body["stream"] = json!(true);
        let mut stream = Stream::open(addr, "lm", &body).await;
        assert_eq!(stream.status, 200);
        let mut text = String::new();
        for _ in 0..5 {
            let event = stream.next().await.unwrap();
            assert_eq!(event.name, "token");
            text.push_str(event.data["text"].as_str().unwrap());
        }
        assert_eq!(text, expected_start);
        let before = metrics.generated_tokens("lm");
        drop(stream);
        wait_for_generations(&server, "cancelled", 2 * round + 1).await;
        let after = metrics.generated_tokens("lm") - before;
        println!("stream, round {round}: {after} characters after the disconnect");
        assert!(
            after <= AFTER_DISCONNECT,
            "{after} characters generated after the disconnect"
        );

        // Without streaming: wait until it has generated a few, then close.
        let started = metrics.generated_tokens("lm");
        let mut plain = TcpStream::connect(addr).await.unwrap();
        let body = request.to_string();
        plain
            .write_all(
                format!(
                    "POST /v1/models/lm/generate HTTP/1.1\r\nhost: {addr}\r\n\
                     content-length: {}\r\n\r\n{body}",
                    body.len()
                )
                .as_bytes(),
            )
            .await
            .unwrap();
        common::wait_until(PATIENCE, "a few characters", || {
            metrics.generated_tokens("lm") >= started + 5
        })
        .await;
        let before = metrics.generated_tokens("lm");
        drop(plain);
        wait_for_generations(&server, "cancelled", 2 * round + 2).await;
        let after = metrics.generated_tokens("lm") - before;
        println!("plain, round {round}: {after} characters after the disconnect");
        assert!(
            after <= AFTER_DISCONNECT,
            "{after} characters generated after the disconnect"
        );
    }
    assert_eq!(metrics.generations("lm", "length"), 0);
    server.shutdown();
    server.wait().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generation_past_the_request_deadline_stops_with_finish_reason_timeout() {
    let _one = ONE_AT_A_TIME.lock().await;
    let dir = temp_dir("deadline");
    let (model, vocab) = language_model(4, 16, 1);
    let timeout = Duration::from_millis(800);
    let server = serve_lm(
        &dir,
        &model,
        &vocab,
        netcl_serve::Config {
            threads: 2,
            // Far more than fits in the deadline.
            max_tokens: 1_000_000,
            request_timeout: timeout,
            ..test_config()
        },
    )
    .await;
    let addr = server.local_addr();
    let request = json!({"prompt": "lazy ", "max_tokens": 1_000_000, "temperature": 0.9,
                         "top_k": 4, "seed": 11});
    // Streamed.
    let start = Instant::now();
    let (text, done) = stream(addr, &request).await;
    let elapsed = start.elapsed();
    assert_eq!(done["finish_reason"], "timeout", "{done}");
    let tokens = done["tokens"].as_u64().unwrap() as usize;
    assert!(tokens > 0 && tokens < 1_000_000, "{done}");
    assert_eq!(text.chars().count(), tokens);
    assert_eq!(text, expected(&model, &vocab, &request, Some(tokens)));
    assert!(
        elapsed >= timeout,
        "stopped after {elapsed:?}, before the deadline"
    );
    // Not streamed: a 200 with what was generated by the deadline.
    let body = Stream::open(addr, "lm", &request).await;
    assert_eq!(body.status, 200);
    let reply = body.json();
    assert_eq!(reply["finish_reason"], "timeout", "{reply}");
    let tokens = reply["tokens"].as_u64().unwrap() as usize;
    assert!(tokens > 0 && tokens < 1_000_000, "{reply}");
    assert_eq!(
        reply["text"],
        expected(&model, &vocab, &request, Some(tokens))
    );
    assert_eq!(server.metrics().generations("lm", "timeout"), 2);
    server.shutdown();
    server.wait().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_before_the_stream_starts_are_json() {
    let _one = ONE_AT_A_TIME.lock().await;
    let dir = temp_dir("errors");
    let (model, vocab) = language_model(1, 16, 1);
    let server = serve_lm(
        &dir,
        &model,
        &vocab,
        netcl_serve::Config {
            max_prompt: 40,
            max_tokens: 30,
            ..test_config()
        },
    )
    .await;
    let addr = server.local_addr();
    let cases = [
        (
            "lm",
            json!({"prompt": "the", "max_tokens": 31}),
            400,
            "at most 30 are allowed",
        ),
        (
            "lm",
            json!({"prompt": "the Q"}),
            400,
            "'Q' (U+0051) at position 4",
        ),
        (
            "clf",
            json!({"prompt": "the"}),
            400,
            "is not a language model",
        ),
        (
            "nope",
            json!({"prompt": "the"}),
            404,
            "no model named \"nope\"",
        ),
    ];
    for (name, mut body, status, message) in cases {
        body["stream"] = json!(true);
        let reply = Stream::open(addr, name, &body).await;
        assert_eq!(reply.status, status, "{name} {body}");
        assert_eq!(reply.content_type, "application/json");
        let error = reply.json()["error"].as_str().unwrap().to_string();
        assert!(error.contains(message), "{name} {body}: {error}");
    }
    server.shutdown();
    server.wait().await.unwrap();

    // A version that is not a language model: a JSON 500 naming it, before
    // any event.
    let (first, vocab) = language_model(3, 16, 1);
    let first = first.try_with_vocab(vocab).unwrap();
    let service = ModelService::builder("lm", Published::new(&first).unwrap())
        .language_model(LanguageModel::of_module(&first).unwrap())
        .build()
        .unwrap();
    service
        .handle()
        .publish(&Linear::zeros(2, 2).unwrap())
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = service.router();
    let serving = tokio::spawn(async move { axum::serve(listener, router).await });
    let reply = Stream::open(
        addr,
        "lm",
        &json!({"prompt": "the", "max_tokens": 3, "stream": true}),
    )
    .await;
    assert_eq!(reply.status, 500);
    assert_eq!(reply.content_type, "application/json");
    let body = reply.json();
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("version 1 is not a language model"),
        "{body}"
    );
    assert_eq!(body["model"], "lm");
    serving.abort();
    service.stop().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
