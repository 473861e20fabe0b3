//! A fixed amount of one small op, for instruction counts under callgrind
//! (`scripts/callgrind_ops.sh`): instructions, unlike seconds, repeat
//! exactly whatever else the machine is doing.
//!
//! ```text
//! cargo bench --bench instructions --no-run
//! valgrind --tool=callgrind <binary> add_recorded 100000
//! ```
//!
//! Workloads: `add_recorded` (1-element `&a + &b`, both requiring grad),
//! `add_no_grad` (the same with a no_grad guard taken per op) and
//! `add_raw_ndarray` (ndarray's `&x + &y` on 1-element dynamic-rank arrays,
//! the reference of the target table) and `chain10` (five `*` and five `+`
//! on 1-element tensors, then `backward`).
//!
//! The per-op cost is the difference between a run of `n` ops and a run of
//! 0, divided by `n`.

use std::hint::black_box;

use netcl::{Tensor, autograd};

#[path = "../netcl/common.rs"]
#[allow(
    dead_code,
    reason = "the bench helpers are shared by four bench binaries; each uses a part"
)]
mod common;

fn main() {
    const USAGE: &str = "usage: instructions <add_recorded|add_no_grad|add_raw_ndarray|chain10|mlp_forward_batch1|mlp_forward_batch1_raw> <count>";
    let args: Vec<String> = std::env::args().skip(1).collect();
    // `cargo bench` runs every bench target with `--bench` alone: nothing
    // to count, and not an error.
    if args.iter().map(String::as_str).eq(["--bench"]) {
        println!("{USAGE}");
        return;
    }
    let [workload, n] = args.as_slice() else {
        eprintln!("{USAGE}");
        std::process::exit(2);
    };
    let n: usize = n.parse().expect("count is a number");
    let a = Tensor::from_vec(vec![1.0], &[1])
        .unwrap()
        .requires_grad_(true);
    let b = Tensor::from_vec(vec![2.0], &[1])
        .unwrap()
        .requires_grad_(true);
    // Create this thread's tape outside the measured ops.
    drop(black_box(&a + &b));
    match workload.as_str() {
        "add_recorded" => {
            for _ in 0..n {
                drop(black_box(&a + &b));
            }
        }
        "add_no_grad" => {
            for _ in 0..n {
                let _guard = autograd::no_grad();
                drop(black_box(&a + &b));
            }
        }
        "chain10" => {
            // The 10-op chain of the target table, forward and backward.
            let x = Tensor::full(&[1], 0.5).requires_grad_(true);
            let w = Tensor::full(&[1], 1.01).requires_grad_(true);
            for _ in 0..n {
                let mut y = black_box(&x).clone();
                for i in 0..10 {
                    y = if i % 2 == 0 { &y * &w } else { &y + &w };
                }
                y.backward();
                drop(black_box(y));
            }
        }
        "mlp_forward_batch1" => {
            // The digits MLP, 64-128-10, on one sample under no_grad.
            use netcl::nn::Module;
            let model = common::mlp(&[64, 128, 10], 0);
            let x = Tensor::ones(&[1, 64]);
            let _guard = autograd::no_grad();
            for _ in 0..n {
                drop(black_box(model.forward(black_box(&x)).unwrap()));
            }
        }
        "mlp_forward_batch1_raw" => {
            // The same forward on ndarray arrays through the same gemm
            // kernel, no tensor.
            let layers = common::raw(&common::mlp(&[64, 128, 10], 0));
            let x = ndarray::Array2::<f32>::ones((1, 64));
            for _ in 0..n {
                drop(black_box(common::raw_forward_gemm(&layers, black_box(&x))));
            }
        }
        "add_raw_ndarray" => {
            // The yardstick of the target table: ndarray's own `&x + &y` on
            // 1-element dynamic-rank arrays.
            let x = ndarray::ArrayD::<f32>::ones(ndarray::IxDyn(&[1]));
            let y = ndarray::ArrayD::<f32>::ones(ndarray::IxDyn(&[1]));
            for _ in 0..n {
                drop(black_box(black_box(&x) + black_box(&y)));
            }
        }
        other => {
            eprintln!("unknown workload {other}");
            std::process::exit(2);
        }
    }
}
