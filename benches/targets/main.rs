//! The performance targets of BENCHMARKS.md, each measured in one run.
//!
//! ```text
//! MATMUL_NUM_THREADS=1 cargo bench --bench targets
//! MATMUL_NUM_THREADS=1 cargo bench --bench targets -- --markdown   # the table again, as Markdown
//! ```
//!
//! The machines this runs on are shared and noisy (their speed drifts 1.5-2x
//! within a day), so nothing is measured alone. The workloads of a group run
//! *interleaved*: in each round every workload runs a short batch of calls,
//! in one order in even rounds and in the reverse order in odd rounds, so a
//! burst of load slows all sides of the rounds it hits instead of skewing
//! one side. A ratio row is the median over rounds of the per-round ratio of
//! its two sides (both from the same round), so a drift of the machine
//! cancels out of it; a time row (no reference to divide by) is the median
//! over rounds of the per-round time, and drifts with the machine.
//!
//! Every row prints its median and its *spread*: the interquartile range of
//! the per-round figures, `[25th percentile - 75th percentile]`. Half the
//! rounds fall inside it. Two runs whose medians differ by less than the
//! spread do not show a difference.
//!
//! Only netcl's public API is used, so the table measures any storage
//! underneath. The PyTorch comparison is `scripts/compare_pytorch.py`, which
//! runs the same workloads (`benches/workloads`) beside PyTorch's.

use std::hint::black_box;
use std::time::Instant;

use ndarray::{Array2, ArrayD, IxDyn};
use netcl::parallel::rayon::ThreadPool;

#[path = "../netcl/common.rs"]
#[allow(
    dead_code,
    reason = "the bench helpers are shared by four bench binaries; each uses a part"
)]
mod common;

use common::{
    batch, digits_split, gemm_direct, matmul_operands, mlp, pool, raw, raw_forward,
    raw_forward_gemm, train_digits, workload,
};

/// Median and quartiles of per-round figures.
#[derive(Clone, Copy)]
struct Spread {
    median: f64,
    q1: f64,
    q3: f64,
}

impl Spread {
    fn of(samples: &[f64]) -> Spread {
        let mut sorted = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        Spread {
            median: quantile(&sorted, 0.5),
            q1: quantile(&sorted, 0.25),
            q3: quantile(&sorted, 0.75),
        }
    }

    /// `median [q1-q3]` with `digits` decimals and a unit suffix.
    fn show(&self, digits: usize, unit: &str) -> String {
        format!(
            "{:.digits$}{unit} [{:.digits$}-{:.digits$}]",
            self.median, self.q1, self.q3
        )
    }
}

/// The `q` quantile of sorted samples, interpolated between neighbours.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    let position = q * (sorted.len() - 1) as f64;
    let (low, high) = (position.floor() as usize, position.ceil() as usize);
    sorted[low] + (sorted[high] - sorted[low]) * (position - low as f64)
}

/// One side of an interleaved measurement: `reps` calls of `run` per round,
/// inside `pool` (whose size sets the threads netcl's kernels use).
struct Side<'a> {
    pool: &'a ThreadPool,
    reps: usize,
    run: Box<dyn FnMut() + Send + 'a>,
}

fn side<'a>(pool: &'a ThreadPool, reps: usize, run: impl FnMut() + Send + 'a) -> Side<'a> {
    Side {
        pool,
        reps,
        run: Box::new(run),
    }
}

/// A named workload of `benches/workloads` as a side, in its own pool.
fn workload_side<'a>(name: &str, pools: &'a [ThreadPool; 2], reps: usize) -> Side<'a> {
    let workload = workload(name).expect("a known workload");
    Side {
        pool: &pools[workload.threads - 1],
        reps,
        run: workload.run,
    }
}

/// Runs the sides interleaved for `rounds` rounds after one untimed round;
/// each round runs them in order in even rounds, in reverse order in odd
/// ones. Returns each side's nanoseconds per call, round by round.
fn interleaved(rounds: usize, sides: &mut [Side<'_>]) -> Vec<Vec<f64>> {
    fn batch_ns(side: &mut Side<'_>) -> f64 {
        let (reps, run) = (side.reps, &mut side.run);
        side.pool.install(|| {
            let start = Instant::now();
            for _ in 0..reps {
                run();
            }
            start.elapsed().as_nanos() as f64 / reps as f64
        })
    }
    for side in sides.iter_mut() {
        batch_ns(side);
    }
    let mut per_round = vec![Vec::with_capacity(rounds); sides.len()];
    let mut order: Vec<usize> = (0..sides.len()).collect();
    for _ in 0..rounds {
        for &i in &order {
            per_round[i].push(batch_ns(&mut sides[i]));
        }
        order.reverse();
    }
    per_round
}

/// Per-round `f(a, b)` of two sides' per-round figures.
fn per_round(a: &[f64], b: &[f64], f: impl Fn(f64, f64) -> f64) -> Vec<f64> {
    a.iter().zip(b).map(|(&a, &b)| f(a, b)).collect()
}

struct Row {
    target: String,
    measured: String,
    goal: String,
    /// `None` for a row without a goal.
    met: Option<bool>,
    detail: String,
}

#[derive(Default)]
struct Report {
    rows: Vec<Row>,
}

impl Report {
    fn add(
        &mut self,
        target: &str,
        measured: String,
        goal: &str,
        met: Option<bool>,
        detail: String,
    ) {
        let status = match met {
            Some(true) => "met",
            Some(false) => "MISSED",
            None => "-",
        };
        println!("{target:<58} {measured:>30} {goal:>12} {status:>6}  {detail}");
        self.rows.push(Row {
            target: target.to_string(),
            measured,
            goal: goal.to_string(),
            met,
            detail,
        });
    }

    fn markdown(&self) {
        println!("\n| target | median [spread] | goal | status | detail |");
        println!("|---|---|---|---|---|");
        for row in &self.rows {
            let status = match row.met {
                Some(true) => "met",
                Some(false) => "**missed**",
                None => "-",
            };
            println!(
                "| {} | {} | {} | {} | {} |",
                row.target, row.measured, row.goal, status, row.detail
            );
        }
    }
}

fn main() {
    // `cargo bench` passes `--bench`; `-- --markdown` adds a Markdown copy
    // of the table. A filter argument is not supported.
    let markdown = std::env::args().any(|arg| arg == "--markdown");
    load_average("start");
    println!(
        "every row: median over rounds [spread = interquartile range of the per-round figures]"
    );
    println!(
        "ratio rows: per-round ratio of two sides run interleaved in the same round; time rows: per-round time"
    );
    println!(
        "{:<58} {:>30} {:>12} {:>6}  detail",
        "target", "median [spread]", "goal", "status"
    );
    let mut report = Report::default();
    let pools = [pool(1), pool(2)];
    let one = &pools[0];

    tiny_ops(&mut report, &pools);
    mlp_steps(&mut report, &pools);
    evaluation(&mut report, &pools);
    forward(&mut report, &pools);
    matmul(&mut report, &pools);

    // Digits: 20 epochs of 64-128-10 at batch 32. No reference: a time row.
    {
        let seconds = one.install(digits_20_epochs);
        let spread = Spread::of(&seconds);
        report.add(
            "digits 64-128-10, batch 32, 20 epochs of training",
            spread.show(3, " s"),
            "<= 0.050 s",
            Some(spread.median <= 0.05),
            format!("{} rounds", seconds.len()),
        );
    }

    wake_latency(&pools[1]);
    load_average("end");

    let with_goal: Vec<_> = report.rows.iter().filter_map(|row| row.met).collect();
    let missed = with_goal.iter().filter(|met| !**met).count();
    println!(
        "{} rows, {} with a goal: {} met, {} missed",
        report.rows.len(),
        with_goal.len(),
        with_goal.len() - missed,
        missed
    );
    if markdown {
        report.markdown();
    }
}

/// A 1-element add (recorded, under no_grad, raw ndarray) and the 10-op
/// chain, in one interleaved group.
fn tiny_ops(report: &mut Report, pools: &[ThreadPool; 2]) {
    // ndarray's own `&x + &y` on 1-element dynamic-rank arrays built once.
    let x = ArrayD::<f32>::ones(IxDyn(&[1]));
    let y = ArrayD::<f32>::ones(IxDyn(&[1]));
    let rounds = 61;
    let t = interleaved(
        rounds,
        &mut [
            side(&pools[0], 20_000, || {
                black_box(black_box(&x) + black_box(&y));
            }),
            workload_side("tiny_add_grad", pools, 20_000),
            workload_side("tiny_add_no_grad", pools, 20_000),
            workload_side("chain10_fwd_bwd", pools, 1_000),
        ],
    );
    let (raw, grad, no_grad, chain) = (&t[0], &t[1], &t[2], &t[3]);
    let ns = |samples: &[f64]| Spread::of(samples).median;
    let row = |report: &mut Report, target: &str, ratios: Vec<f64>, goal: f64, detail| {
        let spread = Spread::of(&ratios);
        report.add(
            target,
            spread.show(2, "x"),
            &format!("<= {goal:.2}x"),
            Some(spread.median <= goal),
            detail,
        );
    };
    row(
        report,
        "recorded 1-element a + b (grad on) / raw ndarray add",
        per_round(grad, raw, |a, b| a / b),
        0.80,
        format!("{:.0} ns vs {:.0} ns, {rounds} rounds", ns(grad), ns(raw)),
    );
    row(
        report,
        "no_grad 1-element a + b (guard per call) / raw ndarray",
        per_round(no_grad, raw, |a, b| a / b),
        0.60,
        format!("{:.0} ns vs {:.0} ns", ns(no_grad), ns(raw)),
    );
    row(
        report,
        "10-op chain, forward + backward / one recorded add",
        per_round(chain, grad, |a, b| a / b),
        14.0,
        format!("{:.0} ns vs {:.0} ns", ns(chain), ns(grad)),
    );
    let overhead = Spread::of(&per_round(grad, no_grad, |a, b| a - b));
    report.add(
        "recording overhead (grad on - no_grad)",
        overhead.show(0, " ns"),
        "<= 60 ns",
        Some(overhead.median <= 60.0),
        String::new(),
    );
    for (target, samples) in [
        ("recorded 1-element a + b, time", grad),
        ("no_grad 1-element a + b, time", no_grad),
        ("raw ndarray 1-element add, time", raw),
    ] {
        report.add(
            target,
            Spread::of(samples).show(0, " ns"),
            "-",
            None,
            String::new(),
        );
    }
    report.add(
        "10-op chain, forward + backward, time",
        Spread::of(&chain.iter().map(|ns| ns / 1e3).collect::<Vec<_>>()).show(2, " us"),
        "-",
        None,
        String::new(),
    );
}

/// The 784-256-256-10 training step (ReLU, cross-entropy, SGD): batch 32
/// and 128 on one thread, batch 128 on two (parallel products) and
/// data-parallel on two (two shards), interleaved.
fn mlp_steps(report: &mut Report, pools: &[ThreadPool; 2]) {
    let rounds = 21;
    let names = [
        (
            "MLP 784-256-256-10 step, batch 32, 1 thread",
            "mlp_step_b32_1t",
            20,
        ),
        ("MLP step, batch 128, 1 thread", "mlp_step_b128_1t", 6),
        (
            "MLP step, batch 128, 2 threads, intra-op",
            "mlp_step_b128_2t",
            8,
        ),
        (
            "MLP step, batch 128, 2 threads, 2 shards",
            "mlp_step_b128_2t_shards",
            8,
        ),
    ];
    let mut sides: Vec<_> = names
        .iter()
        .map(|&(_, name, reps)| workload_side(name, pools, reps))
        .collect();
    let t = interleaved(rounds, &mut sides);
    for ((target, _, _), samples) in names.iter().zip(&t) {
        let us: Vec<f64> = samples.iter().map(|ns| ns / 1e3).collect();
        report.add(
            target,
            Spread::of(&us).show(0, " us"),
            "-",
            None,
            format!("{rounds} rounds"),
        );
    }
}

/// Parallel evaluation of 20,000 samples: 2 threads against 1, and the
/// 2-thread throughput.
fn evaluation(report: &mut Report, pools: &[ThreadPool; 2]) {
    let rounds = 15;
    let t = interleaved(
        rounds,
        &mut [
            workload_side("eval_20k_1t", pools, 1),
            workload_side("eval_20k_2t", pools, 1),
        ],
    );
    let speedup = Spread::of(&per_round(&t[0], &t[1], |one, two| one / two));
    report.add(
        "parallel evaluation, 2 threads vs 1 (20k samples, b256)",
        speedup.show(2, "x"),
        ">= 1.85x",
        Some(speedup.median >= 1.85),
        format!(
            "{:.1} ms vs {:.1} ms, {rounds} rounds",
            Spread::of(&t[0]).median / 1e6,
            Spread::of(&t[1]).median / 1e6
        ),
    );
    let throughput: Vec<f64> = t[1].iter().map(|ns| 20_000.0 / (ns / 1e9)).collect();
    let throughput = Spread::of(&throughput);
    report.add(
        "parallel evaluation throughput, 2 threads",
        throughput.show(0, "/s"),
        ">= 280000/s",
        Some(throughput.median >= 280_000.0),
        "samples per second".to_string(),
    );
}

/// no_grad forwards against the same computation without netcl: batch 256
/// of 784-256-256-10 against raw ndarray (`dot`), batch 1 of 64-128-10
/// against raw arrays through the gemm crate, netcl's kernel.
fn forward(report: &mut Report, pools: &[ThreadPool; 2]) {
    let one = &pools[0];
    {
        // The same weights as the workload's model (same seed).
        let raw = raw(&mlp(&[784, 256, 256, 10], 1));
        let (x, _) = batch(256, 784, 10, 2);
        let x = x.to_array().into_dimensionality::<ndarray::Ix2>().unwrap();
        let rounds = 41;
        let t = interleaved(
            rounds,
            &mut [
                workload_side("forward_b256_784", pools, 5),
                side(one, 5, || {
                    black_box(raw_forward(&raw, black_box(x.view())));
                }),
            ],
        );
        let ratio = Spread::of(&per_round(&t[0], &t[1], |a, b| a / b));
        report.add(
            "no_grad forward vs raw ndarray, time (b256, 1 thread)",
            ratio.show(3, "x"),
            "<= 1.03x",
            Some(ratio.median <= 1.03),
            format!(
                "{:.0} us vs {:.0} us, {rounds} rounds",
                Spread::of(&t[0]).median / 1e3,
                Spread::of(&t[1]).median / 1e3
            ),
        );
    }
    {
        let raw = raw(&mlp(&[64, 128, 10], 1));
        let (x, _) = batch(1, 64, 10, 2);
        let x = x.to_array().into_dimensionality::<ndarray::Ix2>().unwrap();
        let rounds = 41;
        let t = interleaved(
            rounds,
            &mut [
                workload_side("forward_b1_64_128_10", pools, 2_000),
                side(one, 2_000, || {
                    black_box(raw_forward_gemm(&raw, black_box(&x)));
                }),
            ],
        );
        let ratio = Spread::of(&per_round(&t[0], &t[1], |a, b| a / b));
        report.add(
            "no_grad forward 64-128-10, batch 1 / raw arrays + gemm",
            ratio.show(2, "x"),
            "<= 1.50x",
            Some(ratio.median <= 1.5),
            format!(
                "{:.0} ns vs {:.0} ns, {rounds} rounds",
                Spread::of(&t[0]).median,
                Spread::of(&t[1]).median
            ),
        );
    }
}

/// matmul against the fastest Rust GEMM available: the gemm crate called
/// directly (ndarray's matrixmultiply is slower at every shape here; see
/// the criterion topic `matmul`). Both sides return a new matrix.
fn matmul(report: &mut Report, pools: &[ThreadPool; 2]) {
    let rounds = 41;
    for &(m, k, n) in &[
        (32, 784, 256),
        (784, 32, 256),
        (32, 256, 256),
        (256, 784, 256),
    ] {
        let (a, b) = matmul_operands(m, k, n);
        for threads in [1, 2] {
            let name = format!("matmul_{m}x{k}x{n}_{threads}t");
            let (a, b) = (&a, &b);
            let t = interleaved(
                rounds,
                &mut [
                    workload_side(&name, pools, 10),
                    side(&pools[threads - 1], 10, move || {
                        // A fresh output, as any matmul returning a matrix
                        // allocates; the kernel writes every element.
                        let mut c = Array2::zeros((m, n));
                        gemm_direct(a, b, &mut c, threads);
                        black_box(c);
                    }),
                ],
            );
            let ratio = Spread::of(&per_round(&t[0], &t[1], |a, b| a / b));
            report.add(
                &format!("matmul {m}x{k}x{n}, {threads} thread(s), vs gemm crate"),
                ratio.show(3, "x"),
                "<= 1.05x",
                Some(ratio.median <= 1.05),
                format!("{:.1} us", Spread::of(&t[0]).median / 1e3),
            );
        }
    }
}

/// Wall time in seconds of 20 epochs of digits training (data loader,
/// model, Adam), 11 rounds, after checking the run reaches 96% test
/// accuracy.
fn digits_20_epochs() -> Vec<f64> {
    let (train_set, test_set) = digits_split();
    let accuracy = netcl::train::evaluate(&train_digits(&train_set, 20), &test_set, 256)
        .unwrap()
        .accuracy;
    assert!(accuracy >= 0.96, "20 epochs reach {accuracy}, below 0.96");
    (0..11)
        .map(|_| {
            let start = Instant::now();
            black_box(train_digits(&train_set, 20));
            start.elapsed().as_secs_f64()
        })
        .collect()
}

/// Context for the 2-thread figures (not a target): how long `join` of two
/// 20 µs tasks takes when the pool's other worker has been idle for a while.
/// 20 µs means the two ran in parallel; 40 µs means the caller ran both
/// because the other worker was asleep and did not wake in time.
fn wake_latency(pool: &ThreadPool) {
    use std::time::Duration;
    fn spin(duration: Duration) {
        let start = Instant::now();
        while start.elapsed() < duration {}
    }
    println!("context: rayon join of two 20 us tasks on 2 threads, after the other worker idled");
    for idle_us in [0u64, 10, 50, 200] {
        let samples: Vec<f64> = pool.install(|| {
            (0..200)
                .map(|_| {
                    spin(Duration::from_micros(idle_us));
                    let start = Instant::now();
                    netcl::parallel::rayon::join(
                        || spin(Duration::from_micros(20)),
                        || spin(Duration::from_micros(20)),
                    );
                    start.elapsed().as_secs_f64() * 1e6
                })
                .collect()
        });
        println!(
            "  idle {idle_us:>3} us: {}",
            Spread::of(&samples).show(1, " us")
        );
    }
}

/// Context for the whole table (not a target): the machine's load average
/// (Linux), which tells whether other work shared the cores during the run.
fn load_average(when: &str) {
    if let Ok(load) = std::fs::read_to_string("/proc/loadavg") {
        let fields: Vec<&str> = load.split_whitespace().take(3).collect();
        println!(
            "context: load average at {when} (1, 5, 15 min): {}, on {} cores",
            fields.join(" "),
            std::thread::available_parallelism().map_or(0, usize::from)
        );
    }
}
