//! Replicas that follow a live trainer, with real processes: one
//! `netcl-serve --train --weights DIR --checkpoint-every` and two
//! `netcl-serve --watch DIR`. Versions grow on both replicas and never
//! decrease; a trainer killed (SIGKILL) while it writes, at chosen points
//! (paused there by `NETCL_CHECKPOINT_FAULT`, the `fault-injection`
//! feature) or at random moments, never leaves a file a replica loads
//! half, and its restart continues above the last complete version.
//!
//! The kill test runs `NETCL_KILL_ROUNDS` rounds of each kind (default 20,
//! the count: 60 kills, about 15 s in a debug build; set it lower
//! on a slow machine).

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rand::{RngExt, SeedableRng};

/// How long anything may take before the test fails (a bound on
/// liveness on a loaded machine, not on speed).
const PATIENCE: Duration = Duration::from_secs(60);

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("netcl-serve-live-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A running `netcl-serve` and the lines of its stderr.
struct Proc {
    child: Child,
    addr: SocketAddr,
    lines: Receiver<String>,
    log: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    /// Starts the binary with `args` (and `fault` as
    /// `NETCL_CHECKPOINT_FAULT`), waiting until it serves.
    fn start(args: &[&str], fault: Option<&str>) -> Proc {
        let mut command = Command::new(env!("CARGO_BIN_EXE_netcl-serve"));
        command
            .args(["--listen", "127.0.0.1:0", "--startup-epochs", "1"])
            .args(args)
            .env("RUST_LOG", "info")
            .env_remove("NETCL_CHECKPOINT_FAULT")
            .current_dir(std::env::temp_dir())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(fault) = fault {
            command.env("NETCL_CHECKPOINT_FAULT", fault);
        }
        let mut child = command.spawn().expect("the binary starts");
        let stderr = child.stderr.take().unwrap();
        let (send, lines) = std::sync::mpsc::channel();
        let log = Arc::new(Mutex::new(Vec::new()));
        let keep = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                keep.lock().unwrap().push(line.clone());
                let _ = send.send(line);
            }
        });
        let mut proc = Proc {
            child,
            addr: "127.0.0.1:0".parse().unwrap(),
            lines,
            log,
        };
        let line = proc.wait_for_line("netcl-serve started");
        let start = line.find("addr=").expect("the address is logged") + 5;
        let end = line[start..].find(' ').map_or(line.len(), |e| start + e);
        proc.addr = line[start..end].parse().expect("a socket address");
        proc
    }

    /// Waits (within [`PATIENCE`]) for a stderr line containing `text`.
    fn wait_for_line(&mut self, text: &str) -> String {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(text) => return line,
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => panic!(
                    "no line with {text:?} within {PATIENCE:?}; log:\n{}",
                    self.log.lock().unwrap().join("\n")
                ),
                Err(RecvTimeoutError::Disconnected) => panic!(
                    "the process ended before a line with {text:?}; log:\n{}",
                    self.log.lock().unwrap().join("\n")
                ),
            }
        }
    }

    /// SIGKILL, and reap.
    fn kill(mut self) -> Vec<String> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.log.lock().map(|log| log.clone()).unwrap_or_default()
    }
}

/// One HTTP/1.1 request on a new connection: the status and the body.
fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
    stream.set_read_timeout(Some(Duration::from_secs(20)))?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply)?;
    let status = reply
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not HTTP: {reply:?}")))?;
    let body = reply
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, b)| b.to_string());
    Ok((status, body))
}

/// The version that answers a prediction now.
fn predicted_version(addr: SocketAddr) -> Result<u64, String> {
    let row = serde_json::json!({ "inputs": [vec![3.0_f32; 64]] }).to_string();
    let (status, body) = request(addr, "POST", "/v1/predict", &row).map_err(|e| e.to_string())?;
    if status != 200 {
        return Err(format!("status {status}: {body}"));
    }
    let json: serde_json::Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
    json["version"]
        .as_u64()
        .ok_or_else(|| format!("no version in {body}"))
}

/// Polls a replica every 20 ms until stopped: every version it answers
/// with, in order, and every failure to answer.
struct Poller {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<(Vec<u64>, Vec<String>)>,
    seen: Arc<Mutex<BTreeSet<u64>>>,
}

impl Poller {
    fn start(addr: SocketAddr) -> Poller {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(BTreeSet::new()));
        let (flag, record) = (Arc::clone(&stop), Arc::clone(&seen));
        let thread = std::thread::spawn(move || {
            let (mut versions, mut failures) = (Vec::new(), Vec::new());
            while !flag.load(Ordering::Relaxed) {
                match predicted_version(addr) {
                    Ok(v) => {
                        versions.push(v);
                        record.lock().unwrap().insert(v);
                    }
                    Err(err) => failures.push(err),
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            (versions, failures)
        });
        Poller { stop, thread, seen }
    }

    fn distinct(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    fn max(&self) -> u64 {
        self.seen.lock().unwrap().last().copied().unwrap_or(0)
    }

    /// Stops; asserts the replica always answered, with versions that
    /// never decrease; returns them.
    fn finish(self, name: &str) -> Vec<u64> {
        self.stop.store(true, Ordering::Relaxed);
        let (versions, failures) = self.thread.join().unwrap();
        assert!(failures.is_empty(), "{name} failed to answer: {failures:?}");
        assert!(
            versions.windows(2).all(|w| w[0] <= w[1]),
            "{name}'s version decreased: {versions:?}"
        );
        versions
    }
}

fn latest(dir: &Path) -> u64 {
    netcl::io::latest_complete_version(dir)
        .unwrap()
        .map_or(0, |(v, _)| v)
}

/// Polls `condition` every 10 ms; panics naming `what` after [`PATIENCE`].
fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let start = Instant::now();
    while !condition() {
        assert!(start.elapsed() < PATIENCE, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn trainer_args(dir: &Path) -> Vec<String> {
    [
        "--train",
        "--publish-every",
        "5",
        "--checkpoint-every",
        "0.1",
        "--weights",
    ]
    .iter()
    .map(ToString::to_string)
    .chain([dir.display().to_string()])
    .collect()
}

fn replica(dir: &Path) -> Proc {
    let dir = dir.display().to_string();
    Proc::start(&["--watch", &dir, "--watch-interval-ms", "20"], None)
}

/// Every `N.safetensors` in `dir` is a whole checkpoint that loads.
fn assert_every_version_whole(dir: &Path) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if name.ends_with(".safetensors") && !name.starts_with('.') {
            netcl_serve::model::read_checkpoint(&entry.path())
                .unwrap_or_else(|e| panic!("{name} is not whole: {e}"));
        }
    }
}

/// The temporaries in `dir`.
fn temporaries(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().ends_with(".netcl-tmp"))
        .collect()
}

/// The version in a `netcl-checkpoint-paused STAGE DIR/N.safetensors` line.
fn paused_version(line: &str) -> u64 {
    let path = line.rsplit(' ').next().unwrap();
    let file = Path::new(path).file_name().unwrap().to_string_lossy();
    file.strip_suffix(".safetensors").unwrap().parse().unwrap()
}

/// The version in a `resuming from a checkpoint version=N` line.
fn resumed_version(line: &str) -> u64 {
    let start = line.find("version=").unwrap() + 8;
    let end = line[start..].find(' ').map_or(line.len(), |e| start + e);
    line[start..end].parse().unwrap()
}

#[test]
fn two_replicas_follow_a_live_trainer() {
    let dir = temp_dir("follow");
    let args = trainer_args(&dir);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let trainer = Proc::start(&args, None);
    wait_until("the trainer's first version", || latest(&dir) >= 1);
    let (a, b) = (replica(&dir), replica(&dir));
    let (poll_a, poll_b) = (Poller::start(a.addr), Poller::start(b.addr));
    wait_until("both replicas to see 4 versions", || {
        poll_a.distinct() >= 4 && poll_b.distinct() >= 4
    });
    let versions_a = poll_a.finish("replica a");
    let versions_b = poll_b.finish("replica b");
    let written = latest(&dir);
    for versions in [&versions_a, &versions_b] {
        // Every version served is one the trainer wrote.
        assert!(
            versions.iter().all(|&v| v >= 1 && v <= written),
            "{versions:?}"
        );
    }
    trainer.kill();
    for replica in [a, b] {
        let log = replica.kill();
        assert!(
            !log.iter()
                .any(|l| l.contains("ignored the watched checkpoint")),
            "{}",
            log.join("\n")
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn killed_trainers_never_corrupt_what_replicas_load() {
    let rounds: usize = std::env::var("NETCL_KILL_ROUNDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(20);
    let dir = temp_dir("kill");
    let args = trainer_args(&dir);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let first = Proc::start(&args, None);
    wait_until("the trainer's first version", || latest(&dir) >= 1);
    first.kill();
    let (a, b) = (replica(&dir), replica(&dir));
    let (poll_a, poll_b) = (Poller::start(a.addr), Poller::start(b.addr));
    let mut rng = rand::rngs::StdRng::seed_from_u64(22);
    let mut kills = 0;
    let mut left_behind: Vec<PathBuf> = Vec::new();
    let mut plan = Vec::new();
    for _ in 0..rounds {
        plan.extend([Some("before-rename"), Some("before-dir-sync"), None]);
    }
    for stage in plan {
        let complete = latest(&dir);
        let fault = stage.map(|s| format!("{s}:pause"));
        let mut trainer = Proc::start(&args, fault.as_deref());
        // It resumed from the last complete version, and removed what the
        // last kill left behind.
        let resumed = trainer
            .log
            .lock()
            .unwrap()
            .iter()
            .find(|l| l.contains("resuming from a checkpoint"))
            .map(|l| resumed_version(l));
        assert_eq!(
            resumed,
            Some(complete),
            "{}",
            trainer.log.lock().unwrap().join("\n")
        );
        for stale in left_behind.drain(..) {
            assert!(!stale.exists(), "{} survived a restart", stale.display());
        }
        match stage {
            Some(stage) => {
                let line = trainer.wait_for_line("netcl-checkpoint-paused");
                assert!(line.contains(stage), "{line}");
                let writing = paused_version(&line);
                assert!(writing > complete, "writes {writing} after {complete}");
                trainer.kill();
                if stage == "before-rename" {
                    assert_eq!(latest(&dir), complete, "a version appeared unrenamed");
                    left_behind = temporaries(&dir);
                    assert!(
                        !left_behind.is_empty(),
                        "the paused write left its temporary"
                    );
                } else {
                    assert_eq!(latest(&dir), writing, "the renamed version is complete");
                }
            }
            None => {
                let after = Duration::from_millis(rng.random_range(0..600));
                std::thread::sleep(after);
                trainer.kill();
                assert!(latest(&dir) >= complete);
                left_behind = temporaries(&dir);
            }
        }
        kills += 1;
        assert_every_version_whole(&dir);
    }
    // The replicas caught up with the last complete version, answering
    // all along.
    let last = latest(&dir);
    wait_until("the replicas to reach the last version", || {
        poll_a.max() == last && poll_b.max() == last
    });
    poll_a.finish("replica a");
    poll_b.finish("replica b");
    for replica in [a, b] {
        let log = replica.kill();
        assert!(
            !log.iter()
                .any(|l| l.contains("ignored the watched checkpoint")),
            "a replica met a bad file:\n{}",
            log.join("\n")
        );
    }
    eprintln!("{kills} kills, last complete version {last}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The training steps behind the version a server serves.
fn training_steps(addr: SocketAddr) -> u64 {
    let (status, body) = request(addr, "GET", "/v1/model", "").unwrap();
    assert_eq!(status, 200, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    json["training_steps"]
        .as_u64()
        .unwrap_or_else(|| panic!("no training_steps in {body}"))
}

#[test]
fn a_full_disk_is_logged_and_training_goes_on() {
    let dir = temp_dir("full");
    let args = trainer_args(&dir);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let first = Proc::start(&args, None);
    wait_until("the trainer's first version", || latest(&dir) >= 1);
    first.kill();
    let good = latest(&dir);
    let good_file = dir.join(format!("{good}.safetensors"));
    let good_bytes = std::fs::read(&good_file).unwrap();
    // Every write fails as on a full disk.
    let mut trainer = Proc::start(&args, Some("write:fail"));
    let steps = training_steps(trainer.addr);
    for _ in 0..3 {
        let line = trainer.wait_for_line("the checkpoint was not written");
        assert!(line.contains("injected failure"), "{line}");
    }
    wait_until("training to go on", || training_steps(trainer.addr) > steps);
    assert_eq!(latest(&dir), good);
    assert_eq!(std::fs::read(&good_file).unwrap(), good_bytes);
    assert!(temporaries(&dir).is_empty(), "{:?}", temporaries(&dir));
    trainer.kill();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_trainer_follows_other_models_and_watching_digits_excludes_training() {
    let dir = temp_dir("beside");
    let other = dir.join("other");
    let versions = netcl::io::CheckpointDir::create(&other).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let model = netcl::nn::Linear::new(5, 2, &mut rng);
    versions.save_model(1, &model).unwrap();
    let weights = dir.join("digits");
    let follow = format!("other={}", other.display());
    let mut trainer = Proc::start(
        &[
            "--train",
            "--weights",
            &weights.display().to_string(),
            "--checkpoint-every",
            "0.1",
            "--watch",
            &follow,
        ],
        None,
    );
    let body = serde_json::json!({ "inputs": [[1.0, 2.0, 3.0, 4.0, 5.0]] }).to_string();
    let (status, reply) = request(trainer.addr, "POST", "/v1/models/other/predict", &body).unwrap();
    assert_eq!(status, 200, "{reply}");
    versions.save_model(2, &model).unwrap();
    trainer.wait_for_line("reloaded the watched checkpoint");
    wait_until("the trainer's first version", || latest(&weights) >= 1);
    trainer.kill();

    // `digits` is trained or followed, not both; --checkpoint-every needs
    // a trainer.
    let bin = env!("CARGO_BIN_EXE_netcl-serve");
    for (args, expected) in [
        (
            vec!["--train", "--watch", "/tmp/x"],
            "--train and --watch PATH",
        ),
        (vec!["--checkpoint-every", "1"], "--checkpoint-every needs"),
        (vec!["--train", "--checkpoint-every", "0"], "seconds"),
    ] {
        let output = Command::new(bin).args(&args).output().unwrap();
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
