//! What the tests share: a server on an ephemeral port with small timeouts,
//! an HTTP/1.1 client over one TCP connection (hyper's client), the digits
//! rows, and the engine's own forward to compare with.

#![allow(dead_code)]

pub mod lm;

use std::net::SocketAddr;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request};
use netcl::Tensor;
use netcl::data::parse_labeled_csv;
use netcl::nn::Module;
use netcl_serve::model::{CLASSES, FEATURES, classes_of, scale};
use netcl_serve::{Config, Server};
use serde_json::Value;
use tokio::net::TcpStream;

/// A configuration for tests: port 0, a fast start-up model, short
/// timeouts.
pub fn test_config() -> Config {
    Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        startup_epochs: 2,
        request_timeout: Duration::from_secs(5),
        idle_timeout: Duration::from_secs(2),
        drain_timeout: Duration::from_secs(5),
        watch_interval: Duration::from_millis(25),
        ..Config::default()
    }
}

/// How long a test waits for the server (or another task) to make progress
/// before it fails: long enough for a loaded CI machine, short enough to
/// beat a hang. A bound on liveness, not on speed.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// Polls `condition` every 5 ms until it holds; panics naming `what` if it
/// does not within `limit`.
pub async fn wait_until(limit: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !condition() {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Starts a server with `config`.
pub async fn start(config: Config) -> Server {
    netcl_serve::start(config).await.expect("the server starts")
}

/// One client connection.
pub struct Client {
    sender: SendRequest<Full<Bytes>>,
    addr: SocketAddr,
}

/// A response: status and body parsed as JSON (`Value::Null` if it is not
/// JSON).
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub json: Value,
    pub text: String,
    pub content_type: String,
}

impl Client {
    /// Opens a connection to `addr`.
    pub async fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect(addr).await.expect("connect");
        let (sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .expect("handshake");
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Client { sender, addr }
    }

    /// Whether this connection has ended: the server closed it (and the
    /// client's connection task has read that).
    pub fn is_closed(&self) -> bool {
        self.sender.is_closed()
    }

    /// Sends a request and reads the whole response.
    pub async fn send(&mut self, method: Method, path: &str, body: Vec<u8>) -> Reply {
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header("host", self.addr.to_string())
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        self.sender.ready().await.expect("connection ready");
        let response = self.sender.send_request(request).await.expect("response");
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap_or_default().to_string())
            .unwrap_or_default();
        let bytes = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Reply {
            status,
            json,
            text,
            content_type,
        }
    }

    /// `GET path`.
    pub async fn get(&mut self, path: &str) -> Reply {
        self.send(Method::GET, path, Vec::new()).await
    }

    /// `POST /v1/predict` with these rows.
    pub async fn predict(&mut self, rows: &[Vec<f32>]) -> Reply {
        let body = serde_json::json!({ "inputs": rows });
        self.send(Method::POST, "/v1/predict", body.to_string().into_bytes())
            .await
    }
}

/// One request on a fresh connection.
pub async fn get(addr: SocketAddr, path: &str) -> Reply {
    Client::connect(addr).await.get(path).await
}

/// The digits' raw rows (pixels 0..=16), in file order.
pub fn digit_rows() -> Vec<Vec<f32>> {
    let text = include_str!("../../../data/digits.csv");
    let data = parse_labeled_csv(text.as_bytes(), "digits.csv", FEATURES, CLASSES).unwrap();
    data.inputs()
        .to_vec()
        .chunks(FEATURES)
        .map(<[f32]>::to_vec)
        .collect()
}

/// The engine's own answer for raw `rows`: classes and probabilities.
pub fn engine_predict<M: Module + ?Sized>(model: &M, rows: &[Vec<f32>]) -> (Vec<u32>, Vec<f32>) {
    let flat: Vec<f32> = rows.iter().flatten().copied().collect();
    let x = Tensor::from_vec(flat, &[rows.len(), FEATURES]).unwrap();
    let _no_grad = netcl::autograd::no_grad();
    let _eval = netcl::autograd::eval_mode();
    let logits = model.forward(&scale(&x)).unwrap();
    let probabilities = logits.softmax(-1).to_vec();
    (classes_of(&logits.argmax(-1)), probabilities)
}

/// The `classes` of a predict reply.
pub fn classes(reply: &Reply) -> Vec<u32> {
    reply.json["classes"]
        .as_array()
        .expect("classes")
        .iter()
        .map(|c| u32::try_from(c.as_u64().expect("an integer class")).unwrap())
        .collect()
}

/// The `probabilities` of a predict reply, flattened.
pub fn probabilities(reply: &Reply) -> Vec<f32> {
    reply.json["probabilities"]
        .as_array()
        .expect("probabilities")
        .iter()
        .flat_map(|row| {
            let row = row.as_array().expect("a row of probabilities");
            assert_eq!(row.len(), CLASSES);
            row.iter()
                .map(|p| p.as_f64().expect("a number") as f32)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The `version` of a reply, which must be a JSON integer.
pub fn version(reply: &Reply) -> u64 {
    reply.json["version"]
        .as_u64()
        .unwrap_or_else(|| panic!("an integer version in {}", reply.text))
}
