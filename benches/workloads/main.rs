//! One named workload, timed for an external driver: the netcl half of
//! `scripts/compare_pytorch.py`, which runs PyTorch's half in its own
//! process and alternates the two round by round.
//!
//! ```text
//! cargo bench --bench workloads --no-run --message-format=json   # finds the binary
//! target/release/deps/workloads-<hash> tiny_add_grad 20000 7
//! target/release/deps/workloads-<hash> list
//! ```
//!
//! `<name> <reps> <rounds>` builds the workload's data, runs one untimed
//! batch of `reps` calls, then `rounds` timed batches of `reps` calls, and
//! prints one JSON line: the median and each batch's nanoseconds per call.
//! The workload runs inside a rayon pool of its thread count, as the target
//! table runs it. `list` prints the names, one a line. Run by `cargo bench`
//! (which passes `--bench`) it prints its usage and exits.

use std::time::Instant;

#[path = "../netcl/common.rs"]
#[allow(
    dead_code,
    reason = "the bench helpers are shared by four bench binaries; each uses a part"
)]
mod common;

fn usage() -> String {
    format!(
        "usage: workloads <name> <reps> <rounds> | workloads list\nworkloads: {}",
        common::WORKLOADS.join(" ")
    )
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["list"] => {
            for name in common::WORKLOADS {
                println!("{name}");
            }
        }
        [name, reps, rounds] => {
            let (Ok(reps), Ok(rounds)) = (reps.parse::<usize>(), rounds.parse::<usize>()) else {
                eprintln!("{}", usage());
                std::process::exit(2);
            };
            if reps == 0 || rounds == 0 {
                eprintln!("reps and rounds must be positive");
                std::process::exit(2);
            }
            let Some(workload) = common::workload(name) else {
                eprintln!("unknown workload {name}\n{}", usage());
                std::process::exit(2);
            };
            let per_call = time(workload, reps, rounds);
            let mut sorted = per_call.clone();
            sorted.sort_by(f64::total_cmp);
            let median = if sorted.len() % 2 == 1 {
                sorted[sorted.len() / 2]
            } else {
                (sorted[sorted.len() / 2 - 1] + sorted[sorted.len() / 2]) / 2.0
            };
            let rounds_ns: Vec<String> = per_call.iter().map(|ns| format!("{ns:.1}")).collect();
            println!(
                "{{\"workload\":\"{name}\",\"reps\":{reps},\"rounds\":{rounds},\"median_ns\":{median:.1},\"rounds_ns\":[{}]}}",
                rounds_ns.join(",")
            );
        }
        // `cargo bench` runs every bench target with `--bench`: nothing to
        // measure without a workload name.
        _ => println!("{}", usage()),
    }
}

/// Nanoseconds per call of each of `rounds` batches of `reps` calls, after
/// one untimed batch, inside a pool of the workload's thread count.
fn time(mut workload: common::Workload, reps: usize, rounds: usize) -> Vec<f64> {
    let pool = common::pool(workload.threads);
    pool.install(|| {
        let run = &mut workload.run;
        for _ in 0..reps {
            run();
        }
        (0..rounds)
            .map(|_| {
                let start = Instant::now();
                for _ in 0..reps {
                    run();
                }
                start.elapsed().as_nanos() as f64 / reps as f64
            })
            .collect()
    })
}
