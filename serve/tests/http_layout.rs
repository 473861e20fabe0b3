//! Every connection layout answers concurrent clients with the engine's
//! own forward; connection threads exist exactly while their server runs,
//! each pinned to a CPU of its own with `PerCore`, and the requests that arrive together
//! on them are batched together.
//!
//! One test in its own binary: it counts this process's threads by name,
//! which another server running beside it would disturb.

mod common;

use std::time::Duration;

use common::{
    Client, PATIENCE, classes, digit_rows, engine_predict, probabilities, start, test_config,
    version,
};
use netcl_serve::{Config, HttpLayout};

/// How many of this process's threads have a name starting with `prefix`
/// (Linux).
fn threads_named(prefix: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .expect("/proc/self/task")
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.trim().starts_with(prefix))
        .count()
}

/// The CPUs a `/proc` task may run on, from its `Cpus_allowed_list`
/// (`0-3,6`).
fn allowed_cpus(task: &std::path::Path) -> Vec<usize> {
    let status = std::fs::read_to_string(task.join("status")).expect("a task's status");
    let list = status
        .lines()
        .find_map(|line| line.strip_prefix("Cpus_allowed_list:"))
        .expect("Cpus_allowed_list");
    let mut cpus = Vec::new();
    for part in list.trim().split(',') {
        match part.split_once('-') {
            Some((a, b)) => cpus.extend(a.parse::<usize>().unwrap()..=b.parse().unwrap()),
            None => cpus.push(part.parse().unwrap()),
        }
    }
    cpus
}

/// The CPUs each of this process's threads `netcl-http-0`, `-1`, ... may
/// run on.
fn connection_thread_cpus(count: usize) -> Vec<Vec<usize>> {
    let tasks: Vec<_> = std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|task| task.ok().map(|t| t.path()))
        .collect();
    (0..count)
        .map(|i| {
            let name = format!("netcl-http-{i}");
            let task = tasks
                .iter()
                .find(|task| {
                    std::fs::read_to_string(task.join("comm")).is_ok_and(|c| c.trim() == name)
                })
                .unwrap_or_else(|| panic!("no thread {name}"));
            allowed_cpus(task)
        })
        .collect()
}

/// The forwards the server ran for the digits model, from `/metrics`.
async fn forwards(addr: std::net::SocketAddr) -> u64 {
    let text = common::get(addr, "/metrics").await.text;
    let line = text
        .lines()
        .find_map(|line| line.strip_prefix("netcl_serve_batch_rows_count{model=\"digits\"} "))
        .expect("the batch histogram is exported");
    line.trim().parse().expect("a count")
}

/// 8 clients at once, each 40 requests of 1-3 rows: every answer is the
/// engine's forward of the version it names (to a few ulps). Returns the
/// requests sent.
async fn serve_clients(server: &netcl_serve::Server) -> u64 {
    const CLIENTS: usize = 8;
    const REQUESTS: usize = 40;
    let rows = std::sync::Arc::new(digit_rows());
    let model = std::sync::Arc::clone(server.model());
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let rows = std::sync::Arc::clone(&rows);
            let model = std::sync::Arc::clone(&model);
            let addr = server.local_addr();
            tokio::spawn(async move {
                let mut client = Client::connect(addr).await;
                for i in 0..REQUESTS {
                    let start = (c * 97 + i * 13) % (rows.len() - 3);
                    let batch = &rows[start..start + 1 + i % 3];
                    let reply = client.predict(batch).await;
                    assert_eq!(reply.status, 200, "{}", reply.text);
                    // No trainer: the version that answered is the current one.
                    let current = model.published().load();
                    assert_eq!(version(&reply), current.number());
                    let (expected_classes, expected_probabilities) =
                        engine_predict(&**current, batch);
                    assert_eq!(classes(&reply), expected_classes);
                    // Batched with other clients' rows, a row may go through
                    // another product kernel than alone, which sums in
                    // another order: equal to a few ulps, not to the bit.
                    let got = probabilities(&reply);
                    assert_eq!(got.len(), expected_probabilities.len());
                    for (g, e) in got.iter().zip(&expected_probabilities) {
                        assert!(
                            (g - e).abs() <= 1e-6 + 1e-5 * e.abs(),
                            "{got:?} != {expected_probabilities:?}"
                        );
                    }
                }
            })
        })
        .collect();
    for client in clients {
        tokio::time::timeout(PATIENCE, client)
            .await
            .expect("the clients finish")
            .expect("a client panicked");
    }
    (CLIENTS * REQUESTS) as u64
}

/// Stops `server` and waits until its connection threads are gone: joined
/// at shutdown, though a thread's `/proc` entry can outlive its join by a
/// moment.
async fn stop(server: netcl_serve::Server) {
    server.shutdown();
    server.wait().await.unwrap();
    common::wait_until(
        Duration::from_secs(5),
        "the connection threads to end",
        || threads_named("netcl-http-") == 0,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_layout_answers_and_connection_threads_live_with_their_server() {
    assert_eq!(threads_named("netcl-http-"), 0);

    // Connection threads pinned to CPUs (the default): three, as
    // configured, each on one CPU this process may use, as many distinct
    // CPUs as there can be.
    let ours = allowed_cpus(std::path::Path::new("/proc/thread-self"));
    assert_eq!(test_config().http_layout, HttpLayout::PerCore);
    let server = start(Config {
        http_threads: 3,
        ..test_config()
    })
    .await;
    assert_eq!(threads_named("netcl-http-"), 3);
    let pinned = connection_thread_cpus(3);
    for cpus in &pinned {
        assert!(
            cpus.len() == 1 && ours.contains(&cpus[0]),
            "{pinned:?} within {ours:?}"
        );
    }
    let mut distinct: Vec<usize> = pinned.iter().map(|cpus| cpus[0]).collect();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(
        distinct.len(),
        ours.len().min(3),
        "{pinned:?} within {ours:?}"
    );
    let requests = serve_clients(&server).await;
    let ran = forwards(server.local_addr()).await;
    assert!(ran > 0, "no forward recorded");
    assert!(
        ran < requests,
        "{ran} forwards for {requests} requests: nothing was batched"
    );
    stop(server).await;

    // The same threads, not pinned.
    let server = start(Config {
        http_layout: HttpLayout::PerThread,
        ..test_config()
    })
    .await;
    assert_eq!(connection_thread_cpus(2), vec![ours.clone(), ours.clone()]);
    serve_clients(&server).await;
    stop(server).await;

    // Every connection on the caller's runtime: no threads of its own.
    let server = start(Config {
        http_layout: HttpLayout::Shared,
        ..test_config()
    })
    .await;
    assert_eq!(threads_named("netcl-http-"), 0);
    serve_clients(&server).await;
    stop(server).await;
}
