//! Every dense product netcl computes, checked element by element against
//! an `f64` reference with the forward-error bound of a sum of K products
//! in `f32`:
//!
//! ```text
//! |c_ij - ref_ij| <= 4 · K · ε · Σ_p |a_ip| · |b_pj|      (ε = f32::EPSILON)
//! ```
//!
//! (a dot product of length K summed in any order, with or without fused
//! multiply-adds, is within γ_K · Σ|a||b| ≈ K·ε·Σ|a||b| of the exact value;
//! the factor 4 leaves room for the final rounding and a kernel that
//! splits K into blocks.) The shapes are the ones a vectorised kernel gets
//! wrong first: odd sizes, 1×N and N×1, K not a multiple of 16 (the
//! AVX-512 vector width in `f32`), sizes just past a register tile, and
//! products large enough to be packed. Each product runs through the
//! public API: `matmul` forward, both backward products (dA = G·Bᵀ,
//! dB = Aᵀ·G), the batched and broadcast forms, and `linear` forward and
//! backward.
//!
//! `kernel_selected_at_run_time` prints which instruction set the `gemm`
//! crate's run-time detection sees; `scripts/emulated_cpu.sh` runs this
//! file under an emulated CPU without AVX-512 and checks it.

use netcl::Tensor;
use netcl::autograd::BackwardOptions;
use netcl::rand::rngs::StdRng;
use netcl::rand::{RngExt, SeedableRng};
use proptest::prelude::*;

/// Values spread over several orders of magnitude and both signs, so that
/// sums cancel and the bound's Σ|a||b| is far above |Σ a b|.
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let mantissa: f32 = rng.random_range(-1.0..1.0);
            let scale = [1.0, 1.0, 1.0, 1e-3, 1e3][rng.random_range(0..5usize)];
            mantissa * scale
        })
        .collect()
}

fn tensor(shape: &[usize], seed: u64) -> Tensor {
    Tensor::from_vec(values(shape.iter().product(), seed), shape).unwrap()
}

/// Row-major m×k times k×n in `f64`: the exact products and the bound's
/// Σ|a||b|, per element.
fn reference(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> (Vec<f64>, Vec<f64>) {
    let mut exact = vec![0.0; m * n];
    let mut magnitude = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            for p in 0..k {
                let (x, y) = (f64::from(a[i * k + p]), f64::from(b[p * n + j]));
                exact[i * n + j] += x * y;
                magnitude[i * n + j] += (x * y).abs();
            }
        }
    }
    (exact, magnitude)
}

/// Row-major transpose of an r×c matrix.
fn transpose(x: &[f32], r: usize, c: usize) -> Vec<f32> {
    let mut out = vec![0.0; r * c];
    for i in 0..r {
        for j in 0..c {
            out[j * r + i] = x[i * c + j];
        }
    }
    out
}

/// Checks `got` (row-major m×n) against `a·b` (+ `bias` per column) within
/// the bound, with `terms` products summed per element.
fn check(
    what: &str,
    got: &[f32],
    a: &[f32],
    b: &[f32],
    bias: Option<&[f32]>,
    (m, k, n): (usize, usize, usize),
) -> Result<(), TestCaseError> {
    prop_assert_eq!(got.len(), m * n, "{}: length", what);
    let (mut exact, mut magnitude) = reference(a, b, m, k, n);
    let mut terms = k;
    if let Some(bias) = bias {
        terms += 1;
        for i in 0..m {
            for j in 0..n {
                exact[i * n + j] += f64::from(bias[j]);
                magnitude[i * n + j] += f64::from(bias[j]).abs();
            }
        }
    }
    let eps = f64::from(f32::EPSILON);
    for (index, ((&g, &want), &mag)) in got.iter().zip(&exact).zip(&magnitude).enumerate() {
        let bound = 4.0 * terms.max(1) as f64 * eps * mag;
        let err = (f64::from(g) - want).abs();
        prop_assert!(
            err <= bound,
            "{what} {m}x{k}x{n}: element ({}, {}) = {g}, reference {want}, |err| {err:e} > bound {bound:e}",
            index / n,
            index % n
        );
    }
    Ok(())
}

/// `a·b` and both its gradients for a seed gradient `g`, all checked.
fn check_product_and_gradients(
    m: usize,
    k: usize,
    n: usize,
    seed: u64,
) -> Result<(), TestCaseError> {
    let a = tensor(&[m, k], seed).requires_grad_(true);
    let b = tensor(&[k, n], seed ^ 1).requires_grad_(true);
    let g = tensor(&[m, n], seed ^ 2);
    let (av, bv, gv) = (a.to_vec(), b.to_vec(), g.to_vec());
    let c = a.matmul(&b);
    check("matmul", &c.to_vec(), &av, &bv, None, (m, k, n))?;
    c.backward_with_options(&BackwardOptions::default().grad_output(g.clone()));
    // dA = G·Bᵀ: m×n times n×k.
    let bt = transpose(&bv, k, n);
    check(
        "matmul dA = G·Bᵀ",
        &a.grad().unwrap().to_vec(),
        &gv,
        &bt,
        None,
        (m, n, k),
    )?;
    // dB = Aᵀ·G: k×m times m×n.
    let at = transpose(&av, m, k);
    check(
        "matmul dB = Aᵀ·G",
        &b.grad().unwrap().to_vec(),
        &at,
        &gv,
        None,
        (k, m, n),
    )?;

    // The same product on transposed (strided) operands: aᵀᵀ · bᵀᵀ.
    let at_t = Tensor::from_vec(at.clone(), &[k, m]).unwrap();
    let bt_t = Tensor::from_vec(bt.clone(), &[n, k]).unwrap();
    let c = at_t.t().matmul(&bt_t.t());
    check(
        "matmul of transposed views",
        &c.to_vec(),
        &av,
        &bv,
        None,
        (m, k, n),
    )?;

    // linear: x·W + bias, and its gradients (the bias gradient is a sum, not
    // a product, so it is left to the other tests).
    let x = Tensor::from_vec(av.clone(), &[m, k])
        .unwrap()
        .requires_grad_(true);
    let w = Tensor::from_vec(bv.clone(), &[k, n])
        .unwrap()
        .requires_grad_(true);
    let bias = tensor(&[n], seed ^ 3).requires_grad_(true);
    let biasv = bias.to_vec();
    let y = x.linear(&w, Some(&bias));
    check("linear", &y.to_vec(), &av, &bv, Some(&biasv), (m, k, n))?;
    y.backward_with_options(&BackwardOptions::default().grad_output(g.clone()));
    check(
        "linear dX = G·Wᵀ",
        &x.grad().unwrap().to_vec(),
        &gv,
        &bt,
        None,
        (m, n, k),
    )?;
    check(
        "linear dW = Xᵀ·G",
        &w.grad().unwrap().to_vec(),
        &at,
        &gv,
        None,
        (k, m, n),
    )?;
    Ok(())
}

/// A batched product `[batch, m, k] · [k, n]` (the right operand broadcast)
/// and `[m, k] · [batch, k, n]` (the left one broadcast), with gradients:
/// a broadcast operand's gradient is the sum over the batch, i.e. one
/// product with `batch · (inner)` terms.
fn check_batched(
    batch: usize,
    m: usize,
    k: usize,
    n: usize,
    seed: u64,
) -> Result<(), TestCaseError> {
    let a = tensor(&[batch, m, k], seed).requires_grad_(true);
    let b = tensor(&[k, n], seed ^ 1).requires_grad_(true);
    let g = tensor(&[batch, m, n], seed ^ 2);
    let (av, bv, gv) = (a.to_vec(), b.to_vec(), g.to_vec());
    let c = a.matmul(&b);
    // Stacked rows: [batch·m, k] · [k, n].
    check(
        "batched matmul",
        &c.to_vec(),
        &av,
        &bv,
        None,
        (batch * m, k, n),
    )?;
    c.backward_with_options(&BackwardOptions::default().grad_output(g.clone()));
    let bt = transpose(&bv, k, n);
    check(
        "batched dA",
        &a.grad().unwrap().to_vec(),
        &gv,
        &bt,
        None,
        (batch * m, n, k),
    )?;
    // dB = Σ_batch A_iᵀ·G_i = (stacked A)ᵀ · (stacked G).
    let at = transpose(&av, batch * m, k);
    check(
        "broadcast dB",
        &b.grad().unwrap().to_vec(),
        &at,
        &gv,
        None,
        (k, batch * m, n),
    )?;

    // Left operand broadcast, right batched.
    let a = tensor(&[m, k], seed ^ 4).requires_grad_(true);
    let b = tensor(&[batch, k, n], seed ^ 5).requires_grad_(true);
    let (av, bv) = (a.to_vec(), b.to_vec());
    let c = a.matmul(&b);
    let cv = c.to_vec();
    for i in 0..batch {
        let bi = &bv[i * k * n..(i + 1) * k * n];
        let ci = &cv[i * m * n..(i + 1) * m * n];
        check("broadcast-left matmul", ci, &av, bi, None, (m, k, n))?;
    }
    c.backward_with_options(&BackwardOptions::default().grad_output(g.clone()));
    // dA = Σ_i G_i · B_iᵀ = [G_0 .. G_{b-1}] (m × batch·n) · [B_0ᵀ; ..] (batch·n × k).
    let mut g_wide = vec![0.0; m * batch * n];
    let mut bt_tall = Vec::with_capacity(batch * n * k);
    for i in 0..batch {
        for r in 0..m {
            for j in 0..n {
                g_wide[r * batch * n + i * n + j] = gv[i * m * n + r * n + j];
            }
        }
        bt_tall.extend(transpose(&bv[i * k * n..(i + 1) * k * n], k, n));
    }
    check(
        "broadcast-left dA",
        &a.grad().unwrap().to_vec(),
        &g_wide,
        &bt_tall,
        None,
        (m, batch * n, k),
    )?;
    let gradb = b.grad().unwrap().to_vec();
    let at = transpose(&av, m, k);
    for i in 0..batch {
        let gi = &gv[i * m * n..(i + 1) * m * n];
        check(
            "batched dB",
            &gradb[i * k * n..(i + 1) * k * n],
            &at,
            gi,
            None,
            (k, m, n),
        )?;
    }
    Ok(())
}

fn config(cases: u32) -> ProptestConfig {
    let mut config = ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = cases;
    }
    config.failure_persistence = None;
    config
}

/// A length that is often an edge: 1, a multiple of 8 or 16 give or take
/// one, or anything up to `max`.
fn length(max: usize) -> impl Strategy<Value = usize> {
    prop_oneof![
        1 => Just(1usize),
        2 => (1usize..=max / 16).prop_flat_map(|q| (Just(q * 16), -1isize..=1))
            .prop_map(|(base, d)| base.saturating_add_signed(d).max(1)),
        3 => 1usize..=max,
    ]
}

proptest! {
    #![proptest_config(config(48))]

    #[test]
    fn products_and_their_gradients_are_within_the_f32_bound(
        m in length(80), k in length(160), n in length(80), seed in any::<u64>(),
    ) {
        check_product_and_gradients(m, k, n, seed)?;
    }

    #[test]
    fn batched_and_broadcast_products_are_within_the_f32_bound(
        batch in 1usize..4, m in length(40), k in length(72), n in length(40), seed in any::<u64>(),
    ) {
        check_batched(batch, m, k, n, seed)?;
    }
}

/// Shapes past the small-matrix paths: operands packed by the kernel, K
/// split into blocks, 1×N and N×1 with long K, a vector times a matrix.
#[test]
fn large_and_degenerate_shapes_are_within_the_f32_bound() {
    for (i, &(m, k, n)) in [
        (1, 1, 1),
        (1, 1000, 1),
        (1, 300, 257),
        (257, 300, 1),
        (1, 17, 33),
        (33, 17, 1),
        (130, 257, 97),
        (200, 513, 3),
        (97, 1031, 65),
        (256, 784, 256),
    ]
    .iter()
    .enumerate()
    {
        check_product_and_gradients(m, k, n, 1000 + i as u64).unwrap();
    }
    check_batched(3, 65, 130, 49, 7).unwrap();
}

/// The instruction set the `gemm` crate's kernel selection sees (it checks
/// `avx512f`, then `fma`, once per process). With `NETCL_EXPECT_ISA` set
/// (`scripts/emulated_cpu.sh` sets it), the detection must say exactly
/// that; the products above then ran on that kernel, and an AVX-512
/// instruction on a CPU without it would have killed the process (SIGILL)
/// instead of failing a test.
#[test]
fn kernel_selected_at_run_time() {
    #[cfg(target_arch = "x86_64")]
    let isa = if std::arch::is_x86_feature_detected!("avx512f") {
        "avx512f"
    } else if std::arch::is_x86_feature_detected!("fma") {
        "fma"
    } else {
        "scalar"
    };
    #[cfg(not(target_arch = "x86_64"))]
    let isa = "not x86_64";
    println!("gemm kernel selected at run time: {isa}");
    if let Some(expected) = std::env::var_os("NETCL_EXPECT_ISA") {
        assert_eq!(isa, expected.to_str().unwrap(), "run-time CPU detection");
    }
}
