//! The compute limit of this machine's cores, and how close netcl's matrix
//! product and convolution come to it.
//!
//! ```text
//! cargo bench --bench peak                  # ~1 min
//! cargo bench --bench peak -- --markdown    # the table again, as Markdown
//! cargo bench --bench peak -- --quick       # fewer rounds, 256-1024 only
//! ```
//!
//! **The peak.** A loop of independent fused multiply-add chains at the
//! widest vector width the CPU has (AVX-512: 16 `f32` lanes; else AVX2 +
//! FMA: 8), enough chains in flight to hide the FMA latency on every FMA
//! port, no memory traffic: what the core's arithmetic units can do in
//! `f32`, counting a multiply-add as 2 flops. On AVX-512 CPUs the 256-bit
//! loop runs as well: where 512-bit operations are split in two halves
//! (AMD Zen 4's "double-pumped" units) both widths give the same flops per
//! cycle, on CPUs with full 512-bit units the 512-bit figure is twice the
//! other. The two-thread peak runs the loop on two threads at once.
//!
//! **The kernel.** `a.matmul(&b)` on `n×n` tensors without grad (the
//! `gemm` crate's kernel that netcl's products all go through), `2·n³`
//! flops per product, inside a rayon pool of one or two threads. And the
//! forward of `conv2d_fwd_1t` (`[32, 16, 32, 32]`, 32 filters 3x3, padding
//! 1: 302 MFLOP of multiply-adds) on one thread, through the convolution's
//! own kernel where the CPU has AVX-512.
//!
//! Nothing is timed alone: in each round every row runs a short batch (in
//! one order in even rounds and reversed in odd ones), each product's batch
//! between two batches of the widest peak loop on the same number of
//! threads, and a "fraction of peak" is the median over rounds of the
//! product's GF/s over the mean of those two peak batches, so a drift of
//! the machine's speed cancels out of it. Every figure carries its spread, the
//! interquartile range over rounds.

use std::hint::black_box;
use std::time::Instant;

use netcl::{Tensor, autograd};

#[path = "../netcl/common.rs"]
#[allow(
    dead_code,
    reason = "the bench helpers are shared by several bench binaries; each uses a part"
)]
mod common;

/// Independent FMA chains at one vector width, the only `unsafe` of this
/// benchmark: each loop is compiled for its instruction set
/// (`#[target_feature]`) and called only after run-time detection says the
/// CPU has it.
#[cfg(target_arch = "x86_64")]
mod fma {
    use std::arch::x86_64::{
        __m256, __m512, _mm_add_ps, _mm_cvtss_f32, _mm256_add_ps, _mm256_castps256_ps128,
        _mm256_extractf128_ps, _mm256_fmadd_ps, _mm256_hadd_ps, _mm256_set1_ps, _mm512_fmadd_ps,
        _mm512_reduce_add_ps, _mm512_set1_ps,
    };

    /// Chains per loop: the FMA latency (4 cycles on current cores) times
    /// the FMA ports (2), with room to spare, and few enough that chains
    /// and operands stay in registers (32 zmm registers, 16 ymm).
    const CHAINS_512: usize = 16;
    const CHAINS_256: usize = 12;

    /// The vector widths this CPU can run, widest first, with their `f32`
    /// lanes.
    pub fn widths() -> Vec<(&'static str, usize)> {
        let mut widths = Vec::new();
        if std::arch::is_x86_feature_detected!("avx512f") {
            widths.push(("AVX-512 (512-bit FMA)", 16));
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            widths.push(("AVX2 (256-bit FMA)", 8));
        }
        widths
    }

    /// Runs `iters` iterations of the chains of `lanes`-wide vectors and
    /// returns the flops done (and a value that depends on every chain).
    pub fn run(lanes: usize, iters: u64) -> (f64, f32) {
        match lanes {
            16 => {
                assert!(std::arch::is_x86_feature_detected!("avx512f"));
                // SAFETY: `chains_512` only needs AVX-512F, which the CPU
                // has (checked on the line above).
                let sum = unsafe { chains_512(iters) };
                ((iters * (CHAINS_512 * 16 * 2) as u64) as f64, sum)
            }
            8 => {
                assert!(
                    std::arch::is_x86_feature_detected!("avx2")
                        && std::arch::is_x86_feature_detected!("fma")
                );
                // SAFETY: `chains_256` only needs AVX2 and FMA, which the
                // CPU has (checked on the line above).
                let sum = unsafe { chains_256(iters) };
                ((iters * (CHAINS_256 * 8 * 2) as u64) as f64, sum)
            }
            _ => panic!("no FMA loop of {lanes} lanes"),
        }
    }

    /// `acc = acc · m + c` on each chain (the values converge, so nothing
    /// overflows or goes subnormal).
    #[target_feature(enable = "avx512f")]
    fn chains_512(iters: u64) -> f32 {
        let m = _mm512_set1_ps(0.999_999);
        let c = _mm512_set1_ps(1e-7);
        let mut acc: [__m512; CHAINS_512] = [_mm512_set1_ps(1.0); CHAINS_512];
        for _ in 0..iters {
            for a in &mut acc {
                *a = _mm512_fmadd_ps(*a, m, c);
            }
        }
        acc.iter().map(|&a| _mm512_reduce_add_ps(a)).sum()
    }

    #[target_feature(enable = "avx2,fma")]
    fn chains_256(iters: u64) -> f32 {
        let m = _mm256_set1_ps(0.999_999);
        let c = _mm256_set1_ps(1e-7);
        let mut acc: [__m256; CHAINS_256] = [_mm256_set1_ps(1.0); CHAINS_256];
        for _ in 0..iters {
            for a in &mut acc {
                *a = _mm256_fmadd_ps(*a, m, c);
            }
        }
        // The sum of every lane of every chain.
        let v = acc
            .iter()
            .fold(_mm256_set1_ps(0.0), |s, &a| _mm256_add_ps(s, a));
        let v = _mm256_hadd_ps(v, v);
        let v = _mm256_hadd_ps(v, v);
        _mm_cvtss_f32(_mm_add_ps(
            _mm256_castps256_ps128(v),
            _mm256_extractf128_ps::<1>(v),
        ))
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod fma {
    pub fn widths() -> Vec<(&'static str, usize)> {
        Vec::new()
    }
    pub fn run(_lanes: usize, _iters: u64) -> (f64, f32) {
        unreachable!("no FMA loop on this architecture")
    }
}

/// Median and quartiles.
#[derive(Clone, Copy)]
struct Spread {
    median: f64,
    q1: f64,
    q3: f64,
}

impl Spread {
    fn of(samples: &[f64]) -> Spread {
        let mut s = samples.to_vec();
        s.sort_by(f64::total_cmp);
        let q = |p: f64| {
            let x = p * (s.len() - 1) as f64;
            let (lo, hi) = (x.floor() as usize, x.ceil() as usize);
            s[lo] + (s[hi] - s[lo]) * (x - lo as f64)
        };
        Spread {
            median: q(0.5),
            q1: q(0.25),
            q3: q(0.75),
        }
    }

    fn show(self, unit: &str) -> String {
        format!("{:.1}{unit} [{:.1}-{:.1}]", self.median, self.q1, self.q3)
    }

    fn show_fraction(self) -> String {
        format!("{:.2} [{:.2}-{:.2}]", self.median, self.q1, self.q3)
    }
}

/// One row: GF/s of a batch of work, run on `threads` threads.
struct Row {
    name: String,
    threads: usize,
    /// Runs the batch and returns the flops it did.
    run: Box<dyn FnMut() -> f64>,
    /// Per-round GF/s.
    gflops: Vec<f64>,
    /// The peak row of the same thread count this row is a fraction of.
    peak_of: Option<usize>,
}

/// A peak row: the FMA loop of `lanes` lanes on `threads` threads at once,
/// `iters` iterations each.
fn peak_row(label: &str, lanes: usize, threads: usize, iters: u64) -> Row {
    Row {
        name: format!("FMA peak, {label}"),
        threads,
        run: Box::new(move || {
            std::thread::scope(|scope| {
                let handles: Vec<_> = (1..threads)
                    .map(|_| scope.spawn(move || black_box(fma::run(lanes, black_box(iters))).0))
                    .collect();
                let own = black_box(fma::run(lanes, black_box(iters))).0;
                own + handles.into_iter().map(|h| h.join().unwrap()).sum::<f64>()
            })
        }),
        gflops: Vec::new(),
        peak_of: None,
    }
}

/// A product row: `reps` products of `n×n` matrices in a pool of `threads`.
fn matmul_row(n: usize, threads: usize, reps: usize, peak_of: Option<usize>) -> Row {
    let (a, b) = common::matmul_operands(n, n, n);
    let (a, b) = (Tensor::from_array(a), Tensor::from_array(b));
    let pool = common::pool(threads);
    Row {
        name: format!("netcl matmul {n}x{n}x{n}"),
        threads,
        run: Box::new(move || {
            pool.install(|| {
                let _guard = autograd::no_grad();
                for _ in 0..reps {
                    black_box(black_box(&a).matmul(black_box(&b)));
                }
            });
            (2 * n * n * n * reps) as f64
        }),
        gflops: Vec::new(),
        peak_of,
    }
}

/// The forward of `conv2d_fwd_1t` (`[32, 16, 32, 32]`, 32 filters 3x3,
/// padding 1, with bias; 302 MFLOP), `reps` times, without grad, in a
/// pool of one thread: the convolution's kernel as a fraction of the peak.
fn conv2d_row(reps: usize, peak_of: Option<usize>) -> Row {
    let (x, w, b) = common::conv2d_operands();
    let pool = common::pool(1);
    Row {
        name: "netcl conv2d forward [32,16,32,32] * 32x3x3, pad 1".into(),
        threads: 1,
        run: Box::new(move || {
            pool.install(|| {
                let _guard = autograd::no_grad();
                for _ in 0..reps {
                    black_box(netcl::functional::conv2d(&x, &w, Some(&b), 1, 1, 1, 1));
                }
            });
            // Multiply-adds: 32 images · 32 filters · 32·32 positions · 144
            // taps.
            (2 * 32 * 32 * 32 * 32 * 144 * reps) as f64
        }),
        gflops: Vec::new(),
        peak_of,
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let markdown = args.iter().any(|a| a == "--markdown");
    let quick = args.iter().any(|a| a == "--quick");
    let rounds = if quick { 9 } else { 21 };

    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let widths = fma::widths();
    println!(
        "CPU: {model}; vector widths: {}; {} logical CPUs",
        if widths.is_empty() {
            "none measured".into()
        } else {
            widths.iter().map(|w| w.0).collect::<Vec<_>>().join(", ")
        },
        std::thread::available_parallelism().map_or(0, usize::from)
    );

    // 4 Gflop per thread and batch: 15-40 ms at the peaks of current cores.
    let peak_iters = |lanes: usize| {
        let chains = if lanes == 16 { 16 } else { 12 };
        4_000_000_000 / (lanes as u64 * 2 * chains)
    };
    let mut rows: Vec<Row> = Vec::new();
    let mut widest_peak = [None, None];
    for &(label, lanes) in &widths {
        for threads in [1, 2] {
            if widest_peak[threads - 1].is_none() {
                widest_peak[threads - 1] = Some(rows.len());
            }
            rows.push(peak_row(label, lanes, threads, peak_iters(lanes)));
        }
    }
    let sizes: &[(usize, usize)] = if quick {
        &[(256, 120), (512, 16), (1024, 2)]
    } else {
        &[(256, 120), (512, 16), (1024, 2), (2048, 1)]
    };
    for &(n, reps) in sizes {
        for threads in [1, 2] {
            rows.push(matmul_row(n, threads, reps, widest_peak[threads - 1]));
        }
    }
    rows.push(conv2d_row(if quick { 8 } else { 16 }, widest_peak[0]));

    // Warm-up: one batch of each row (pools started, kernel buffers
    // touched, clocks up).
    for row in &mut rows {
        (row.run)();
    }
    // A product's fraction of peak in a round: its GF/s over the mean of
    // the peak batches run just before and just after it.
    let mut fractions: Vec<Vec<f64>> = vec![Vec::new(); rows.len()];
    let timed = |rows: &mut [Row], i: usize| {
        let row = &mut rows[i];
        let start = Instant::now();
        let flops = (row.run)();
        let gflops = flops / start.elapsed().as_secs_f64() / 1e9;
        row.gflops.push(gflops);
        gflops
    };
    for round in 0..rounds {
        let order: Vec<usize> = if round % 2 == 0 {
            (0..rows.len()).collect()
        } else {
            (0..rows.len()).rev().collect()
        };
        for i in order {
            match rows[i].peak_of {
                Some(p) => {
                    let before = timed(&mut rows, p);
                    let product = timed(&mut rows, i);
                    let after = timed(&mut rows, p);
                    fractions[i].push(product / ((before + after) / 2.0));
                }
                // Peak rows also run on their own, for the rows of the
                // narrower widths.
                None => {
                    timed(&mut rows, i);
                }
            }
        }
    }

    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    println!(
        "{rounds} rounds; load average at the end (1, 5, 15 min): {}",
        load.join(" ")
    );
    let table: Vec<[String; 4]> = rows
        .iter()
        .enumerate()
        .map(|(i, row)| {
            let gf = Spread::of(&row.gflops);
            let fraction = if row.peak_of.is_some() {
                Spread::of(&fractions[i]).show_fraction()
            } else {
                String::new()
            };
            [
                row.name.clone(),
                row.threads.to_string(),
                gf.show(" GF/s"),
                fraction,
            ]
        })
        .collect();
    let header = [
        "row",
        "threads",
        "GF/s [spread]",
        "fraction of peak [spread]",
    ];
    println!(
        "{:<40} {:>7} {:>26} {:>26}",
        header[0], header[1], header[2], header[3]
    );
    for r in &table {
        println!("{:<40} {:>7} {:>26} {:>26}", r[0], r[1], r[2], r[3]);
    }
    if markdown {
        println!();
        println!("| {} |", header.join(" | "));
        println!("|---|---|---|---|");
        for r in &table {
            println!("| {} |", r.join(" | "));
        }
    }
    println!(
        "(fraction of peak: per-round GF/s over the widest FMA peak on as many threads, measured just before and after)"
    );
}
