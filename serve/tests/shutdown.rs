//! Graceful shutdown: in-flight requests are answered; the binary stops on
//! SIGTERM and saves a checkpoint that reloads to the same
//! predictions, and a restart carries on counting versions from it.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    Client, PATIENCE, classes, digit_rows, engine_predict, probabilities, start, test_config,
    version,
};
use netcl_serve::model::read_checkpoint;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends the headers of a predict of `rows` with `expect: 100-continue`
/// and waits for the server's `100 Continue`, which hyper sends when the
/// handler starts reading the body: the request is then in the service,
/// in flight. Returns the connection and the body, still to be sent.
async fn start_predict(addr: SocketAddr, rows: &[Vec<f32>]) -> (TcpStream, Vec<u8>) {
    let body = serde_json::json!({ "inputs": rows })
        .to_string()
        .into_bytes();
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let head = format!(
        "POST /v1/predict HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
         expect: 100-continue\r\nconnection: close\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let want = b"HTTP/1.1 100 Continue\r\n\r\n";
    let mut got = vec![0; want.len()];
    tokio::time::timeout(PATIENCE, stream.read_exact(&mut got))
        .await
        .expect("no 100 Continue: the request did not reach the service")
        .unwrap();
    assert_eq!(got, want, "{}", String::from_utf8_lossy(&got));
    (stream, body)
}

/// Sends the rest of a request started by [`start_predict`] and reads the
/// response until the server closes the connection.
async fn finish_predict(mut stream: TcpStream, body: Vec<u8>) -> String {
    stream.write_all(&body).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut response))
        .await
        .expect("no response")
        .unwrap();
    String::from_utf8_lossy(&response).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_requests_are_answered_then_connections_refused() {
    let server = start(test_config()).await;
    let addr = server.local_addr();
    let rows = digit_rows();
    // 8 requests in the service when the shutdown starts (their bodies
    // come after it): each is answered.
    let mut in_flight = Vec::new();
    for i in 0..8 {
        in_flight.push(start_predict(addr, &rows[i..i + 2]).await);
    }
    server.shutdown();
    let replies: Vec<_> = in_flight
        .into_iter()
        .map(|(stream, body)| tokio::spawn(finish_predict(stream, body)))
        .collect();
    for reply in replies {
        let text = reply.await.unwrap();
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(text.contains("\"classes\":["), "{text}");
    }
    let summary = server.wait().await.unwrap();
    assert!(summary.drained);
    assert!(TcpStream::connect(addr).await.is_err());
}

/// The binary, started with `args`; returns it and the address it logged.
fn spawn_binary(args: &[&str]) -> (Child, SocketAddr, std::thread::JoinHandle<Vec<String>>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_netcl-serve"))
        .args(args)
        .env("RUST_LOG", "info")
        // Not the crate's directory: the binary must not need it.
        .current_dir(std::env::temp_dir())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary starts");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut log = Vec::new();
    let addr = loop {
        let line = lines
            .next()
            .expect("the binary logs its start")
            .expect("utf-8 logs");
        log.push(line.clone());
        if line.contains("netcl-serve started") {
            let start = line.find("addr=").expect("the address is logged") + 5;
            let end = line[start..].find(' ').map_or(line.len(), |e| start + e);
            break line[start..end].parse().expect("a socket address");
        }
    };
    let rest = std::thread::spawn(move || {
        log.extend(lines.map_while(Result::ok));
        log
    });
    (child, addr, rest)
}

/// Sends SIGTERM and waits for a clean exit (failing after a minute: a
/// bound against a hang, with room for a loaded machine; the binary's own
/// drain timeout is 5 s).
fn terminate(child: &mut Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success());
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "exit status {status}");
            return;
        }
        assert!(
            start.elapsed() < 2 * PATIENCE,
            "still running {:?} after SIGTERM",
            2 * PATIENCE
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until process `pid` catches SIGTERM (its handler is installed, so
/// the signal no longer kills it): on Linux, bit 15 of the `SigCgt` mask in
/// `/proc/<pid>/status`; elsewhere, a pause.
fn wait_for_sigterm_handler(pid: u32) {
    if cfg!(not(target_os = "linux")) {
        std::thread::sleep(Duration::from_millis(300));
        return;
    }
    let start = Instant::now();
    loop {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let caught = status
            .lines()
            .find_map(|line| line.strip_prefix("SigCgt:"))
            .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
            .expect("a SigCgt line");
        if caught & (1 << (15 - 1)) != 0 {
            return;
        }
        assert!(
            start.elapsed() < PATIENCE,
            "the binary installed no SIGTERM handler within {PATIENCE:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn weights_path(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!(
        "netcl-serve-{name}-{}.safetensors",
        std::process::id()
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_saves_weights_that_reload_to_the_same_predictions() {
    let weights = weights_path("sigterm");
    let _ = std::fs::remove_file(&weights);
    let weights_arg = weights.to_str().unwrap();
    let (mut child, addr, log) = spawn_binary(&[
        "--listen",
        "127.0.0.1:0",
        "--train",
        "--publish-every",
        "5",
        "--startup-epochs",
        "2",
        "--weights",
        weights_arg,
    ]);
    let rows = digit_rows();
    let batch = &rows[300..332];
    let mut client = Client::connect(addr).await;
    // Wait until training has published a few versions. The trainer runs
    // at nice 19, slowly on a loaded machine: it is given as long as it
    // keeps stepping.
    let (mut steps, mut progress) = (0, Instant::now());
    while version(&client.predict(&batch[..1]).await) < 3 {
        let now = client.get("/v1/model").await.json["training_steps"]
            .as_u64()
            .unwrap();
        if now != steps {
            (steps, progress) = (now, Instant::now());
        }
        assert!(
            progress.elapsed() < PATIENCE,
            "no training progress for {PATIENCE:?} ({steps} steps)"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(client);
    terminate(&mut child);
    let log = log.join().unwrap();
    let stopped = log
        .iter()
        .find(|line| line.contains("netcl-serve stopped"))
        .unwrap_or_else(|| panic!("no shutdown line in {log:#?}"));
    assert!(!log.iter().any(|line| line.contains("ERROR")), "{log:#?}");

    let saved = read_checkpoint(&weights).expect("a complete checkpoint");
    assert!(saved.version >= 3);
    assert!(
        stopped.contains(&format!("version={}", saved.version)),
        "{stopped}"
    );
    assert!(saved.steps > 0);
    let leftovers: Vec<_> = std::fs::read_dir(weights.parent().unwrap())
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(weights.file_name().unwrap().to_str().unwrap())
        })
        .map(|e| e.file_name())
        .collect();
    assert_eq!(leftovers.len(), 1, "temporary files left: {leftovers:?}");

    // Restart from the checkpoint, without training: the same model at the
    // saved version, answering what the saved weights compute.
    let (mut child, addr, log) =
        spawn_binary(&["--listen", "127.0.0.1:0", "--weights", weights_arg]);
    let mut client = Client::connect(addr).await;
    let reply = client.predict(batch).await;
    assert_eq!(reply.status, 200);
    assert_eq!(version(&reply), saved.version);
    let (expected_classes, expected_probabilities) = engine_predict(&saved.model, batch);
    assert_eq!(classes(&reply), expected_classes);
    assert_eq!(probabilities(&reply), expected_probabilities);
    let info = client.get("/v1/model").await;
    assert_eq!(info.json["source"], "checkpoint");
    assert_eq!(info.json["training_steps"].as_u64(), Some(saved.steps));
    drop(client);
    terminate(&mut child);
    let _ = log.join();
    // Saved again on this shutdown, at the same version.
    assert_eq!(read_checkpoint(&weights).unwrap().version, saved.version);
    std::fs::remove_file(&weights).unwrap();
}

#[test]
fn sigterm_during_startup_still_stops_cleanly_and_saves() {
    let weights = weights_path("early");
    let _ = std::fs::remove_file(&weights);
    let mut child = Command::new(env!("CARGO_BIN_EXE_netcl-serve"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--startup-epochs",
            "8",
            "--weights",
        ])
        .arg(&weights)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Once the signal handlers are installed: during the start-up training
    // (a debug build takes a second or more).
    wait_for_sigterm_handler(child.id());
    terminate(&mut child);
    let mut log = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut log).unwrap();
    assert!(log.contains("received SIGTERM"), "{log}");
    assert!(log.contains("netcl-serve stopped"), "{log}");
    assert_eq!(read_checkpoint(&weights).unwrap().version, 0);
    std::fs::remove_file(&weights).unwrap();
}

#[test]
fn a_bad_checkpoint_at_start_is_refused() {
    let weights = weights_path("bad");
    std::fs::write(&weights, b"not a checkpoint").unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_netcl-serve"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--weights",
            weights.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains(weights.to_str().unwrap()), "{stderr}");
    // The bad file is left as it was.
    assert_eq!(std::fs::read(&weights).unwrap(), b"not a checkpoint");
    std::fs::remove_file(&weights).unwrap();
}

#[test]
fn help_lists_every_flag() {
    let output = Command::new(env!("CARGO_BIN_EXE_netcl-serve"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(output.status.success());
    let help = String::from_utf8_lossy(&output.stdout);
    for flag in [
        "--listen",
        "--train",
        "--weights",
        "--watch",
        "--max-batch",
        "--max-wait-us",
        "--publish-every",
        "--threads",
        "--checkpoint-every",
        "--watch-interval-ms",
    ] {
        assert!(help.contains(flag), "{flag} missing from\n{help}");
    }
    assert!(help.contains("[default: 127.0.0.1:8080]"), "{help}");
}
