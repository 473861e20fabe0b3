//! Graceful shutdown: in-flight requests are answered; the binary stops on
//! SIGTERM within 10 s and saves a checkpoint that reloads to the same
//! predictions, and a restart carries on counting versions from it.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    Client, classes, digit_rows, engine_predict, probabilities, start, test_config, version,
};
use netcl_serve::Config;
use netcl_serve::model::read_checkpoint;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_requests_are_answered_then_connections_refused() {
    let server = start(Config {
        max_wait: Duration::from_millis(300),
        max_batch: 64,
        ..test_config()
    })
    .await;
    let addr = server.local_addr();
    let rows = digit_rows();
    // The model thread holds these for up to 300 ms to batch them, so
    // they are in flight when the shutdown starts.
    let mut in_flight = Vec::new();
    for i in 0..8 {
        let batch = rows[i..i + 2].to_vec();
        in_flight.push(tokio::spawn(async move {
            Client::connect(addr).await.predict(&batch).await
        }));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    server.shutdown();
    for request in in_flight {
        let reply = request.await.unwrap();
        assert_eq!(reply.status, 200, "{}", reply.text);
    }
    let summary = server.wait().await.unwrap();
    assert!(summary.drained);
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
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

/// Sends SIGTERM and waits (at most 10 s) for a clean exit.
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
            start.elapsed() < Duration::from_secs(10),
            "still running 10 s after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
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
    // Wait until training has published a few versions.
    let start = Instant::now();
    while version(&client.predict(&batch[..1]).await) < 3 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no training progress"
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
    // Mid-way through the start-up training (a debug build takes a second
    // or more), well after the signal handlers are installed.
    std::thread::sleep(Duration::from_millis(300));
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
    ] {
        assert!(help.contains(flag), "{flag} missing from\n{help}");
    }
    assert!(help.contains("[default: 127.0.0.1:8080]"), "{help}");
}
