//! The digits CNN served from its checkpoint by the real `netcl-serve`
//! binary, as the README's walk-through does it: a CNN trained as
//! `examples/train_cnn.rs` trains it, saved as `train_cnn --save PATH`
//! saves it (a self-describing checkpoint with the metadata keys
//! `netcl-serve.input` = `digits` and `netcl-serve.input_shape` =
//! `1,8,8`), served with `netcl-serve --model cnn=PATH`. Clients post the
//! digits' raw pixels (0..16, 64 per row) exactly as to the MLP route and
//! get the classes the model in memory predicts; a row of the wrong shape
//! is a 4xx naming what was expected and what was found.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use common::digit_rows;
use netcl::Tensor;
use netcl::data::TensorDataset;
use netcl::nn::{Module, Sequential};
use netcl::optim::{Adam, AdamConfig};
use netcl::train::Trainer;
use netcl_serve::loader::{CheckpointLoader, INPUT_KEY, INPUT_SHAPE_KEY, ModelLoader};
use netcl_serve::model::{Digits, PIXEL_MAX};
use serde_json::Value;

/// How long the binary may take to start or answer before the test fails
/// (a bound on liveness on a loaded machine, not on speed).
const PATIENCE: Duration = Duration::from_secs(60);

/// The digits split as `Digits` splits them (the example's split), read as
/// `[N, 1, 8, 8]` images in `[0, 1]`.
fn images(data: &TensorDataset) -> TensorDataset {
    let n = data.inputs().shape()[0];
    let images = data.inputs().try_reshape(&[n, 1, 8, 8]).unwrap();
    TensorDataset::new(images, data.targets().clone()).unwrap()
}

/// One epoch of `train_cnn`'s recipe (Adam at 3e-3, batches of 32) from
/// seed `seed`: a trained model whose batch norm's running statistics
/// have moved, so the checkpoint's buffers matter.
fn trained_cnn(digits: &Digits, seed: u64) -> Sequential {
    let model = netcl::models::digits_cnn(seed);
    let optimizer = Adam::new(model.parameters(), AdamConfig::new(3e-3));
    let mut trainer = Trainer::new(model, optimizer, images(&digits.train))
        .batch_size(32)
        .seed(seed);
    trainer.fit(1).unwrap();
    trainer.into_parts().0
}

/// Saves `model` as `train_cnn --save PATH` does.
fn save_as_the_example_does(model: &Sequential, path: &Path) {
    let metadata = BTreeMap::from([
        (INPUT_KEY.to_string(), "digits".to_string()),
        (INPUT_SHAPE_KEY.to_string(), "1,8,8".to_string()),
    ]);
    netcl::io::save_model_with_metadata(model, path, &metadata).unwrap();
}

/// The model's logits for raw rows (64 pixels in 0..=16), computed in
/// memory: scaled as the example scales its data, shaped as 1x8x8 images.
fn logits_in_memory(model: &Sequential, rows: &[Vec<f32>]) -> Tensor {
    let flat: Vec<f32> = rows.iter().flatten().copied().collect();
    let x = Tensor::from_vec(flat, &[rows.len(), 1, 8, 8]).unwrap() / PIXEL_MAX;
    let _no_grad = netcl::autograd::no_grad();
    let _eval = netcl::nn::eval_mode();
    model.forward(&x).unwrap()
}

fn argmax_rows(logits: &Tensor) -> Vec<u64> {
    logits
        .argmax(-1)
        .to_vec()
        .iter()
        .map(|&c| c as u64)
        .collect()
}

fn temp_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "netcl-serve-cnn-{name}-{}.safetensors",
        std::process::id()
    ))
}

/// A running `netcl-serve`, killed when dropped.
struct Proc {
    child: Child,
    addr: SocketAddr,
}

impl Proc {
    /// Starts the binary with `args`, waiting (within [`PATIENCE`]) until
    /// it logs the address it serves on.
    fn start(args: &[&str]) -> Proc {
        let mut child = Command::new(env!("CARGO_BIN_EXE_netcl-serve"))
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the binary starts");
        let stderr = child.stderr.take().unwrap();
        let (send, lines): (_, Receiver<String>) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = send.send(line);
            }
        });
        let deadline = Instant::now() + PATIENCE;
        let mut log = Vec::new();
        let line = loop {
            match lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) if line.contains("netcl-serve started") => break line,
                Ok(line) => log.push(line),
                Err(RecvTimeoutError::Timeout) => {
                    let _ = child.kill();
                    panic!("not started within {PATIENCE:?}; log:\n{}", log.join("\n"))
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let _ = child.wait();
                    panic!("the binary ended before serving; log:\n{}", log.join("\n"))
                }
            }
        };
        let start = line.find("addr=").expect("the address is logged") + 5;
        let end = line[start..].find(' ').map_or(line.len(), |e| start + e);
        let addr = line[start..end].parse().expect("a socket address");
        Proc { child, addr }
    }

    /// One HTTP/1.1 request on a new connection: the status and the body
    /// parsed as JSON (and as text).
    fn request(&self, method: &str, path: &str, body: &str) -> (u16, Value, String) {
        let mut stream = TcpStream::connect_timeout(&self.addr, PATIENCE).unwrap();
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nhost: {}\r\ncontent-type: application/json\r\n\
             content-length: {}\r\nconnection: close\r\n\r\n{body}",
            self.addr,
            body.len()
        )
        .unwrap();
        let mut reply = String::new();
        stream.read_to_string(&mut reply).unwrap();
        let status = reply[9..12].parse().expect("an HTTP status");
        let text = reply
            .split_once("\r\n\r\n")
            .map_or(String::new(), |(_, b)| b.to_string());
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::Null),
            text,
        )
    }

    fn predict(&self, path: &str, rows: &[Vec<f32>]) -> (u16, Value, String) {
        let body = serde_json::json!({ "inputs": rows }).to_string();
        self.request("POST", path, &body)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn classes_of(reply: &Value, text: &str) -> Vec<u64> {
    reply["classes"]
        .as_array()
        .unwrap_or_else(|| panic!("no classes in {text}"))
        .iter()
        .map(|c| c.as_u64().expect("an integer class"))
        .collect()
}

#[test]
fn the_example_checkpoint_loads_with_the_digits_rows_as_images() {
    // In process, through the binary's loader: the input is the digits'
    // raw pixels (range 0..16, scaled) as 1x8x8 images, and the accuracy
    // measured at load is the model's own on the held-out images.
    let digits = Digits::load().unwrap();
    let model = trained_cnn(&digits, 3);
    let path = temp_path("loader");
    save_as_the_example_does(&model, &path);
    let loaded = CheckpointLoader::new(digits.clone()).load(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    assert_eq!(loaded.input.row_shape(), [1, 8, 8]);
    assert_eq!(loaded.input.width(), 64);
    assert!(loaded.generation.is_none());
    let test = images(&digits.test);
    let expected = netcl::train::evaluate(&model, &test, 360).unwrap().accuracy;
    assert_eq!(loaded.accuracy, Some(expected));
    assert!(
        expected > 0.7,
        "one epoch gives a trained model: {expected}"
    );
}

#[test]
fn a_digits_input_with_a_shape_of_other_than_64_pixels_is_refused_naming_both() {
    let digits = Digits::load().unwrap();
    let path = temp_path("bad-shape");
    let metadata = BTreeMap::from([
        (INPUT_KEY.to_string(), "digits".to_string()),
        (INPUT_SHAPE_KEY.to_string(), "1,8,7".to_string()),
    ]);
    netcl::io::save_model_with_metadata(&netcl::models::digits_cnn(0), &path, &metadata).unwrap();
    let err = CheckpointLoader::new(digits).load(&path).unwrap_err();
    std::fs::remove_file(&path).unwrap();
    let message = err.to_string();
    for part in ["\"1,8,7\"", "56 numbers", "64 pixels", INPUT_SHAPE_KEY] {
        assert!(message.contains(part), "{part} not in {message}");
    }
}

#[test]
fn the_binary_serves_the_cnn_checkpoint_with_the_models_classes() {
    let digits = Digits::load().unwrap();
    let model = trained_cnn(&digits, 5);
    let path = temp_path("binary");
    save_as_the_example_does(&model, &path);
    let server = Proc::start(&["--model", &format!("cnn={}", path.display())]);

    // The first 40 digits of the file, raw pixels, as a client sends them
    // to the MLP route.
    let rows: Vec<Vec<f32>> = digit_rows().into_iter().take(40).collect();
    let logits = logits_in_memory(&model, &rows);
    let expected = argmax_rows(&logits);
    let distinct: std::collections::BTreeSet<_> = expected.iter().collect();
    assert!(distinct.len() >= 5, "a trained model: {expected:?}");
    let probabilities = logits.softmax(-1).to_vec();

    // The CNN's own route, and /v1/predict (it is the only model, so the
    // default one).
    for route in ["/v1/models/cnn/predict", "/v1/predict"] {
        let (status, reply, text) = server.predict(route, &rows);
        assert_eq!(status, 200, "{route}: {text}");
        assert_eq!(classes_of(&reply, &text), expected, "{route}");
        let served: Vec<f64> = reply["probabilities"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|row| row.as_array().unwrap().clone())
            .map(|p| p.as_f64().unwrap())
            .collect();
        assert_eq!(served.len(), probabilities.len());
        for (s, p) in served.iter().zip(&probabilities) {
            assert!((s - f64::from(*p)).abs() < 1e-5, "{route}: {s} vs {p}");
        }
    }
    // One row at a time (batched by the server with whatever else is
    // queued): the same classes.
    for (row, class) in rows.iter().zip(&expected).take(10) {
        let (status, reply, text) =
            server.predict("/v1/models/cnn/predict", std::slice::from_ref(row));
        assert_eq!(status, 200, "{text}");
        assert_eq!(classes_of(&reply, &text), [*class]);
    }

    // The model's description: the row shape, the pixel range, the
    // accuracy measured at load.
    let (status, info, text) = server.request("GET", "/v1/models/cnn", "");
    assert_eq!(status, 200, "{text}");
    assert_eq!(
        info["input"]["shape"],
        serde_json::json!([1, 8, 8]),
        "{text}"
    );
    assert_eq!(
        info["input"]["range"],
        serde_json::json!([0.0, 16.0]),
        "{text}"
    );
    let test = images(&digits.test);
    let accuracy = netcl::train::evaluate(&model, &test, 360).unwrap().accuracy;
    // (An f32 written as JSON reads back as the same f32.)
    let served = info["accuracy"].as_f64().map(|a| a as f32);
    assert_eq!(served, Some(accuracy), "{text}");

    // A row of the wrong shape (63 pixels, or an 8x8 image sent nested)
    // is the client's error, naming what was expected and what was found.
    let (status, _, text) = server.predict("/v1/models/cnn/predict", &[vec![0.0; 63]]);
    assert!((400..500).contains(&status), "{status}: {text}");
    assert!(
        text.contains("63 values") && text.contains("expected 64"),
        "{text}"
    );
    let image = vec![vec![0.0_f32; 8]; 8];
    let nested = serde_json::json!({ "inputs": [image] }).to_string();
    let (status, _, text) = server.request("POST", "/v1/models/cnn/predict", &nested);
    assert!((400..500).contains(&status), "{status}: {text}");
    assert!(
        text.contains("sequence")
            && text.contains("expected a number")
            && text.contains("inputs[0][0]"),
        "{text}"
    );
    // So is a pixel outside 0..16, as on the MLP route.
    let mut bright = rows[0].clone();
    bright[10] = 17.0;
    let (status, _, text) = server.predict("/v1/models/cnn/predict", &[bright]);
    assert!((400..500).contains(&status), "{status}: {text}");
    // And the server still answers.
    let (status, reply, text) = server.predict("/v1/models/cnn/predict", &rows[..1]);
    assert_eq!(status, 200, "{text}");
    assert_eq!(classes_of(&reply, &text), expected[..1]);
    drop(server);
    std::fs::remove_file(&path).unwrap();
}
