//! Peak memory of an inference pass at batch 4096: with grad on, under
//! `no_grad`, and the same forward in raw ndarray.
//!
//! ```text
//! cargo run --release --example memory
//! ```
//!
//! Each measurement runs in a fresh child process, which reads its peak
//! resident set (`VmHWM` in `/proc/self/status`) after a pass and reports
//! it minus the resident set before the pass (model and input already
//! built). It does so for the process's first pass and again for a second
//! pass (after resetting the peak through `/proc/self/clear_refs`): the
//! first pass also pays what a matrix kernel keeps per thread once it has
//! run (the `gemm` crate's packing buffer, one per thread that runs a
//! product, reused by every later product on that thread), the second is
//! what every later pass costs. Tensors of this size are allocated with
//! `mmap` and returned to the system when freed (the children run with
//! glibc's mmap threshold fixed at 128 KiB), so the resident set follows
//! the live tensors, apart from what netcl's per-thread cache of freed
//! buffers keeps for reuse ([`netcl::memory`], at most its limit per
//! thread: 16 MiB by default). That memory is resident before a later
//! pass, so the "later" figure leaves it out; the "kept" row shows it:
//! the resident set after the first pass (its tensors dropped) minus the
//! one before it. Each figure is the median of five processes.
//!
//! ```text
//! NETCL_BUFFER_CACHE_BYTES=0 cargo run --release --example memory   # the cache off
//! ```

use std::process::Command;

use clap::Parser;
use clap::builder::PossibleValuesParser;
use ndarray::{Array1, Array2, ArrayView2, Axis, Ix1, Ix2};
use netcl::nn::{Activation, Mlp, Module};
use netcl::rand::SeedableRng;
use netcl::rand::rngs::StdRng;
use netcl::{Tensor, autograd};

const BATCH: usize = 4096;
const MODELS: &[(&str, &[usize])] = &[
    ("784-256-256-10", &[784, 256, 256, 10]),
    ("784-2048-2048-2048-10", &[784, 2048, 2048, 2048, 10]),
];
const MODES: &[&str] = &["grad", "no_grad", "raw_ndarray"];

/// Peak memory of an inference pass at batch 4096 (with grad on, under
/// no_grad, and the same forward in raw ndarray; a process's first pass and
/// a later one), each figure the median of five child processes.
#[derive(Parser, Debug)]
#[command(name = "memory")]
struct Args {
    /// Child process only: the model to measure in this process.
    #[arg(
        long,
        hide = true,
        requires = "mode",
        value_parser = PossibleValuesParser::new(MODELS.iter().map(|(name, _)| *name)),
    )]
    model: Option<String>,
    /// Child process only: how to run its pass.
    #[arg(long, hide = true, requires = "model", value_parser = PossibleValuesParser::new(MODES))]
    mode: Option<String>,
}

/// A field of `/proc/self/status`, in bytes.
fn status_bytes(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("Linux /proc");
    let line = status
        .lines()
        .find(|line| line.starts_with(field))
        .unwrap_or_else(|| panic!("{field} in /proc/self/status"));
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("a number of kB");
    kib * 1024
}

fn raw_forward(layers: &[(Array2<f32>, Array1<f32>)], x: ArrayView2<'_, f32>) -> Array2<f32> {
    let mut h = x.dot(&layers[0].0) + layers[0].1.view().insert_axis(Axis(0));
    for (w, b) in &layers[1..] {
        h.mapv_inplace(|v| v.max(0.0));
        h = h.dot(w) + b.view().insert_axis(Axis(0));
    }
    h
}

/// Runs two passes in this process and prints the bytes each added at peak.
fn measure(dims: &[usize], mode: &str) {
    let mut rng = StdRng::seed_from_u64(1);
    let model = Mlp::new(dims, Activation::Relu, &mut rng);
    let x = Tensor::rand(&[BATCH, dims[0]], &mut rng);
    let raw: Vec<(Array2<f32>, Array1<f32>)> = model
        .parameters()
        .chunks(2)
        .map(|p| {
            let w = p[0].to_array().into_dimensionality::<Ix2>().unwrap();
            let b = p[1].to_array().into_dimensionality::<Ix1>().unwrap();
            (w, b)
        })
        .collect();
    let x_raw = x.to_array().into_dimensionality::<Ix2>().unwrap();
    let pass = || match mode {
        "grad" => {
            let logits = model.forward(&x).unwrap();
            assert!(logits.requires_grad());
            logits.sum().item()
        }
        "no_grad" => {
            let _guard = autograd::no_grad();
            let logits = model.forward(&x).unwrap();
            assert!(!logits.requires_grad());
            logits.sum().item()
        }
        "raw_ndarray" => raw_forward(&raw, x_raw.view()).sum(),
        other => panic!("unknown mode {other}"),
    };
    let mut line = Vec::new();
    let mut checksum = 0.0;
    let start = status_bytes("VmRSS:");
    let mut kept = 0;
    for i in 0..2 {
        let before = status_bytes("VmRSS:");
        checksum = pass();
        let peak = status_bytes("VmHWM:");
        line.push(peak.saturating_sub(before).to_string());
        if i == 0 {
            kept = status_bytes("VmRSS:").saturating_sub(start);
        }
        // Resets VmHWM to the current resident set (Linux 4.0 and later).
        std::fs::write("/proc/self/clear_refs", "5").expect("reset the peak resident set");
    }
    println!("{} {kept} {checksum}", line.join(" "));
}

fn main() {
    let args = Args::parse();
    if let (Some(model), Some(mode)) = (&args.model, &args.mode) {
        let dims = MODELS
            .iter()
            .find(|(name, _)| name == model)
            .expect("a model name clap checked")
            .1;
        measure(dims, mode);
        return;
    }
    let exe = std::env::current_exe().expect("own path");
    println!(
        "peak memory of an inference pass, batch {BATCH} (MiB above the pre-pass resident set)"
    );
    println!(
        "{:<24} {:<6} {:>8} {:>8} {:>12} {:>16} {:>15}",
        "model", "pass", "grad", "no_grad", "raw_ndarray", "no_grad vs grad", "no_grad vs raw"
    );
    for (name, _) in MODELS {
        // peaks[pass][mode]: the first pass's peak, a later pass's, and
        // what the first pass left resident.
        let mut peaks = [[0.0; 3]; 3];
        let mut checksums = Vec::new();
        for (m, mode) in MODES.iter().enumerate() {
            let mut runs: Vec<([f64; 3], f32)> = (0..5)
                .map(|_| {
                    let out = Command::new(&exe)
                        .args(["--model", name, "--mode", mode])
                        // glibc serves blocks from 128 KiB with mmap, but
                        // raises that threshold when such a block is freed,
                        // after which freed tensors stay resident; fixed,
                        // every tensor's memory returns to the system when
                        // it is freed, in every pass.
                        .env("MALLOC_MMAP_THRESHOLD_", "131072")
                        .output()
                        .expect("run child");
                    assert!(out.status.success(), "{name} {mode}: {out:?}");
                    let text = String::from_utf8(out.stdout).unwrap();
                    let fields: Vec<&str> = text.split_whitespace().collect();
                    let mib = |f: &str| f.parse::<u64>().unwrap() as f64 / (1 << 20) as f64;
                    let checksum = fields[3].parse::<f32>().unwrap();
                    ([mib(fields[0]), mib(fields[1]), mib(fields[2])], checksum)
                })
                .collect();
            for (pass, row) in peaks.iter_mut().enumerate() {
                runs.sort_by(|a, b| a.0[pass].total_cmp(&b.0[pass]));
                row[m] = runs[runs.len() / 2].0[pass];
            }
            checksums.push(runs[0].1);
        }
        // The three passes compute the same logits.
        let tolerance = 1e-3 * checksums[2].abs().max(1.0);
        assert!(
            checksums
                .iter()
                .all(|c| (c - checksums[2]).abs() <= tolerance)
        );
        for (pass, p) in ["first", "later"].iter().zip(&peaks) {
            println!(
                "{:<24} {:<6} {:>8.1} {:>8.1} {:>12.1} {:>15.1}% {:>+14.1}%",
                name,
                pass,
                p[0],
                p[1],
                p[2],
                100.0 * (1.0 - p[1] / p[0]),
                100.0 * (p[1] / p[2] - 1.0),
            );
        }
        let p = &peaks[2];
        println!(
            "{:<24} {:<6} {:>8.1} {:>8.1} {:>12.1}",
            name, "kept", p[0], p[1], p[2]
        );
    }
    println!(
        "(\"no_grad vs grad\": how much lower no_grad's peak is; \"vs raw\": how much above raw ndarray's;"
    );
    println!(
        " \"first\": a process's first pass, which also touches the kernel's per-thread buffers; \"later\": every pass after it;"
    );
    println!(
        " \"kept\": resident after the first pass, its tensors dropped: the kernel's buffers and netcl's cache of freed buffers)"
    );
}

#[cfg(test)]
mod tests {
    use clap::error::ErrorKind;
    use clap::{CommandFactory, Parser};

    use super::{Args, MODELS, MODES};

    #[test]
    fn help_prints_usage_without_the_child_options() {
        Args::command().debug_assert();
        let help = Args::try_parse_from(["memory", "--help"]).unwrap_err();
        assert_eq!(help.kind(), ErrorKind::DisplayHelp);
        let text = help.to_string();
        assert!(text.contains("Usage: memory"), "{text}");
        assert!(!text.contains("--model"), "{text}");
    }

    #[test]
    fn a_child_gets_a_checked_model_and_mode() {
        for (model, _) in MODELS {
            for mode in MODES {
                let args =
                    Args::try_parse_from(["memory", "--model", model, "--mode", mode]).unwrap();
                assert_eq!(
                    (args.model.as_deref(), args.mode.as_deref()),
                    (Some(*model), Some(*mode))
                );
            }
        }
        let parent = Args::try_parse_from(["memory"]).unwrap();
        assert!(parent.model.is_none() && parent.mode.is_none());
    }

    #[test]
    fn unknown_flags_and_bad_child_arguments_are_rejected() {
        let cases: [(&[&str], ErrorKind); 4] = [
            (&["memory", "--batch", "8"], ErrorKind::UnknownArgument),
            (
                &["memory", "--model", "784-10", "--mode", "grad"],
                ErrorKind::InvalidValue,
            ),
            (
                &["memory", "--model", "784-256-256-10"],
                ErrorKind::MissingRequiredArgument,
            ),
            (
                &["memory", "784-256-256-10", "grad"],
                ErrorKind::UnknownArgument,
            ),
        ];
        for (args, kind) in cases {
            let err = Args::try_parse_from(args).unwrap_err();
            assert_eq!(err.kind(), kind, "{args:?}");
        }
    }
}
