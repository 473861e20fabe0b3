//! 64 concurrent clients while the server trains: each connection sees
//! versions that never go back, and every response's classes are what its
//! version computes (every response is checked: the test receives every
//! version the server publishes). The trainer runs at background priority; its versions
//! are published by a thread of normal priority.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{
    Client, PATIENCE, classes, digit_rows, engine_predict, probabilities, start, test_config,
    version,
};
use netcl_serve::Config;

const CLIENTS: usize = 64;

/// One response: its version, the rows sent, and the classes and
/// probabilities received.
type Seen = (u64, Vec<f32>, Vec<u32>, Vec<f32>);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_clients_see_monotonic_versions_and_their_forward() {
    let server = start(Config {
        train: true,
        // A new version every 20 steps: several during the run, each
        // answering a good number of requests.
        publish_every: 20,
        max_batch: 8,
        request_timeout: Duration::from_secs(20),
        ..test_config()
    })
    .await;
    let addr = server.local_addr();

    // Every version from now on (the current one, then each published),
    // to check responses against: a version is an Arc, so holding it keeps
    // its weights. No response names an older version: each is computed
    // by the version current when its request was taken, after this.
    let versions = server.model().subscribe();
    // The trainer may have published a few versions already (a fast
    // machine): the clients go on until three more.
    let first_version = server.model().published().version();

    let rows = Arc::new(digit_rows());
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let started = Instant::now();
    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let (rows, seen, server_model) = (
            Arc::clone(&rows),
            Arc::clone(&seen),
            Arc::clone(server.model()),
        );
        clients.push(tokio::spawn(async move {
            let mut client = Client::connect(addr).await;
            let mut last = 0;
            let mut i = 0;
            // At least 8 requests each, and on until the trainer has
            // published a few versions (the test's watchdog fails it if
            // training stalls).
            while i < 8 || server_model.published().version() < first_version + 3 {
                let batch_len = 1 + (c + i) % 3;
                let first = (c * 17 + i * 5) % (rows.len() - batch_len);
                let batch = &rows[first..first + batch_len];
                let reply = client.predict(batch).await;
                assert_eq!(reply.status, 200, "{}", reply.text);
                let v = version(&reply);
                assert!(v >= last, "client {c}: version {v} after {last}");
                last = v;
                seen.lock().unwrap().push((
                    v,
                    batch.iter().flatten().copied().collect(),
                    classes(&reply),
                    probabilities(&reply),
                ));
                i += 1;
                if i >= 8 {
                    // Paced from here, so that the clients leave the nice-19
                    // trainer some of a loaded machine's cores.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }));
    }
    // The trainer runs at nice 19: on a loaded machine it gets a sliver of
    // a core, so it is given as long as it keeps stepping.
    let metrics = Arc::clone(server.metrics());
    let (mut steps, mut progress) = (metrics.training_steps(), Instant::now());
    while !clients.iter().all(|c| c.is_finished()) {
        let now = metrics.training_steps();
        if now != steps {
            (steps, progress) = (now, Instant::now());
        }
        assert!(
            progress.elapsed() < PATIENCE,
            "the training thread made no progress for {PATIENCE:?} ({steps} steps, version {})",
            server.model().published().version()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for client in clients {
        client.await.unwrap();
    }
    println!(
        "clients done after {:?}, {} training steps",
        started.elapsed(),
        metrics.training_steps()
    );

    let versions: BTreeMap<u64, _> = versions.try_iter().map(|v| (v.number(), v)).collect();
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    let mut distinct = std::collections::BTreeSet::new();
    for (v, flat, got_classes, got_probabilities) in seen.iter() {
        distinct.insert(*v);
        let model = versions
            .get(v)
            .unwrap_or_else(|| panic!("version {v} was never published: {:?}", versions.keys()));
        let batch: Vec<Vec<f32>> = flat.chunks(64).map(<[f32]>::to_vec).collect();
        let (expected_classes, expected_probabilities) = engine_predict(&***model, &batch);
        assert_eq!(got_classes, &expected_classes, "version {v}");
        // The server batched these rows with other requests' rows: the
        // matrix kernel's blocking can change the last bits of a row's
        // result with its batch, so probabilities agree to rounding.
        for (got, expected) in got_probabilities.iter().zip(expected_probabilities) {
            assert!(
                (got - expected).abs() <= 1e-5,
                "version {v}: {got} vs {expected}"
            );
        }
    }
    assert!(seen.len() >= CLIENTS * 8);
    assert!(distinct.len() >= 2, "versions seen: {distinct:?}");
    println!(
        "{} responses checked, from {} versions of the {} published",
        seen.len(),
        distinct.len(),
        versions.len()
    );

    // Serving records nothing; the trainer's thread runs at SCHED_IDLE
    // (the default TrainPriority) and nice 19, the others at the policy and
    // nice the test runs at (normal and 0 unless started under `nice`).
    assert_eq!(server.metrics().serving_tape_nodes(), 0);
    assert!(server.metrics().training_steps() > 0);
    assert_eq!(thread_nice("netcl-train"), Some(19));
    assert_eq!(thread_policy("netcl-train"), Some(SCHED_IDLE));
    let own_policy = stat_field(std::path::Path::new("/proc/thread-self"), POLICY);
    assert_ne!(own_policy, Some(SCHED_IDLE));
    assert_eq!(thread_policy("netcl-model-0"), own_policy);
    assert_eq!(thread_policy("netcl-publish"), own_policy);
    let own = stat_field(std::path::Path::new("/proc/thread-self"), NICE);
    assert!(own.is_some());
    assert_eq!(thread_nice("netcl-model-0"), own);
    // Predictions load the current version without a lock (arc-swap), but
    // publishing takes the lock `GET /v1/model` reads the version's details
    // under: a thread of normal priority does it, so that a nice-19 trainer
    // descheduled mid-publish cannot hold that lock.
    assert_eq!(thread_nice("netcl-publish"), own);

    // Requests were batched together: fewer forwards than requests.
    let text = common::get(addr, "/metrics").await.text;
    let forwards: f64 = text
        .lines()
        .find_map(|line| line.strip_prefix("netcl_serve_batch_rows_count{model=\"digits\"} "))
        .expect("the batch histogram")
        .parse()
        .unwrap();
    println!("{} requests in {forwards} forwards", seen.len());
    assert!(forwards >= 1.0 && forwards < seen.len() as f64);

    let info = common::get(addr, "/v1/model").await;
    assert_eq!(info.json["source"], "training");
    assert!(info.json["version"].as_u64().unwrap() >= first_version + 3);
    assert!(info.json["last_loss"].as_f64().unwrap() > 0.0);
    server.shutdown();
    server.wait().await.unwrap();
}

/// Linux's number of the `SCHED_IDLE` policy (`sched.h`).
const SCHED_IDLE: i32 = 5;
/// The nice value's field of `/proc/*/stat` (field 19, counted from 1).
const NICE: usize = 19;
/// The scheduling policy's field of `/proc/*/stat` (field 41).
const POLICY: usize = 41;

/// The nice value of this process's thread named `name` (Linux).
fn thread_nice(name: &str) -> Option<i32> {
    stat_field(&task_named(name)?, NICE)
}

/// The scheduling policy of this process's thread named `name` (Linux).
fn thread_policy(name: &str) -> Option<i32> {
    stat_field(&task_named(name)?, POLICY)
}

/// The `/proc/self/task` directory of this process's thread named `name`.
fn task_named(name: &str) -> Option<std::path::PathBuf> {
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let dir = task.ok()?.path();
        let comm = std::fs::read_to_string(dir.join("comm")).ok()?;
        if comm.trim() == name {
            return Some(dir);
        }
    }
    None
}

/// Field `field` (counted from 1, as in proc(5)) of a `/proc` task
/// directory's `stat`, for the fields after the command name (3 on).
fn stat_field(task: &std::path::Path, field: usize) -> Option<i32> {
    let stat = std::fs::read_to_string(task.join("stat")).ok()?;
    let after_name = &stat[stat.rfind(')')? + 2..];
    after_name.split(' ').nth(field - 3)?.parse().ok()
}
