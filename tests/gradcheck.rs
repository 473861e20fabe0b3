//! Gradient checks: every differentiable op of [`Tensor`] against central
//! finite differences, plus hand-derived gradients of small composite graphs.
//!
//! # The checker
//!
//! [`check_grads`] reduces an op's output `y = f(x)` to the scalar
//! `L = Σ_k r_k y_k` with a fixed, seeded Gaussian weighting `r`, so that
//! every row of the Jacobian is exercised (with `r = 1` an error that sums to
//! zero over the outputs would go unseen). It computes `∂L/∂x` two ways:
//!
//! - `autograd::grad` of `(f(x) * r).sum()`, and
//! - `f(x).backward_with(r)` followed by `.grad()` on the leaves (which also
//!   checks that leaves not requiring grad receive nothing);
//!
//! and compares both with the central difference
//! `(L(x + h e_j) - L(x - h e_j)) / (x_j⁺ - x_j⁻)` of every element `j` of
//! every input requiring grad. The perturbed inputs are built with
//! `Tensor::from_vec` and evaluated under `autograd::no_grad()`. `L` is
//! accumulated in `f64` from the `f32` outputs, and the denominator is the
//! step actually taken after rounding `x_j ± h` to `f32`, so the only errors
//! left are those of the op itself.
//!
//! # Step and tolerances
//!
//! Step `h = 1e-2` ([`STEP`]); an analytic value `a` passes against the
//! numeric `n` when `|a - n| <= ATOL + RTOL * |n|` with [`ATOL`] `= 1e-3` and
//! [`RTOL`] `= 5e-3`. Why:
//!
//! - *Rounding.* Only the outputs that depend on `x_j` change between the two
//!   evaluations; the others are computed identically and cancel exactly. The
//!   changed outputs carry an `f32` rounding error of a few `ε = 2⁻²⁴ ≈ 6e-8`
//!   relative to the magnitudes summed inside the op (a dot product of
//!   length `k`, a softmax lane, a whole-tensor mean). For the inputs used
//!   here (`|x| <~ 3`, at most a few dozen terms per output, `|r| <~ 3`)
//!   that is below `~5e-6` absolute in `L⁺ - L⁻`, i.e. below `~2.5e-4` after
//!   dividing by `2h = 0.02`. `ATOL = 1e-3` leaves a factor of 4 of margin.
//!   (With `h = 1e-3` this term would grow tenfold to `~2.5e-3`, which is why
//!   the larger step is used.)
//! - *Truncation.* The central difference errs by `h²/6 · f'''`, relative
//!   `h²/6 · |f'''/f'|`. The worst case here is `1/x` at `|x| = 0.5`
//!   (`|f'''/f'| = 6/x² = 24`): `4e-4`; for `exp`, `tanh`, `sigmoid`,
//!   softmax it is below `1e-4`. Where `f'` itself is near 0 (`x³` near 0)
//!   the absolute error `h² |f'''|/6 <= 1e-4` falls under `ATOL`.
//!   `RTOL = 5e-3` is ten times the worst relative truncation error.
//! - *Kinks.* `relu`, `abs` and `max_axis` are only differentiable away from
//!   their kinks: their inputs keep `|x| >= 0.2` (resp. the values of a lane
//!   at least `0.25` apart), far more than `h`, so no difference straddles a
//!   kink.
//!
//! These bounds are tight enough to matter: a gradient off by 2 % fails as
//! soon as `|n| > ~0.07`, which holds for most elements of every check, and
//! [`checker_rejects_gradient_off_by_two_percent`] proves it with a custom op
//! whose backward is deliberately wrong. Measured over every check in this
//! file, the largest `|a - n| / (ATOL + RTOL |n|)` is about 0.14 (`x³` near
//! 0, pure truncation), so correct ops pass with a wide margin while 1 %
//! errors in sigmoid, log_softmax or matmul backward were seen to fail.
//!
//! Hand-derived tests compare with values computed from the math in the
//! comment above each (exact rationals where possible), with an absolute
//! tolerance of `1e-5`: a few `f32` roundings of numbers of order 1.

use netcl::autograd::{self, InputGrads, apply_op};
use netcl::ndarray::ArrayD;
use netcl::{Result, Tensor};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};

/// The finite-difference step.
const STEP: f32 = 1e-2;
/// Absolute tolerance of the gradient comparison (see the module docs).
const ATOL: f64 = 1e-3;
/// Relative tolerance of the gradient comparison (see the module docs).
const RTOL: f64 = 5e-3;
/// Absolute tolerance of the hand-derived expectations.
const HAND_TOL: f32 = 1e-5;

// ---------------------------------------------------------------------------
// The checker
// ---------------------------------------------------------------------------

/// A fresh leaf with `t`'s values (contiguous), requiring grad or not.
fn leaf(t: &Tensor, requires_grad: bool) -> Tensor {
    Tensor::from_vec(t.to_vec(), t.shape())
        .expect("same element count")
        .requires_grad_(requires_grad)
}

/// `Σ_k r_k y_k`, accumulated in `f64`.
fn weighted_sum(y: &Tensor, r: &[f32]) -> f64 {
    let y = y.to_vec();
    assert_eq!(y.len(), r.len(), "output changed size between evaluations");
    y.iter()
        .zip(r)
        .map(|(&y, &r)| f64::from(y) * f64::from(r))
        .sum()
}

/// Compares one analytic gradient with the numeric one, element by element.
fn compare(
    what: &str,
    input: usize,
    shape: &[usize],
    analytic: &[f32],
    numeric: &[f64],
) -> std::result::Result<(), String> {
    if analytic.len() != numeric.len() {
        return Err(format!(
            "{what}: input {input} of shape {shape:?} got a gradient with {} elements, expected {}",
            analytic.len(),
            numeric.len()
        ));
    }
    let mut failures = Vec::new();
    for (j, (&a, &n)) in analytic.iter().zip(numeric).enumerate() {
        let a = f64::from(a);
        let bound = ATOL + RTOL * n.abs();
        // Written so that a NaN on either side fails.
        let within = (a - n).abs() <= bound;
        if !within {
            failures.push(format!(
                "  input {input} {shape:?} element {j}: analytic {a:.6}, numeric {n:.6}, |diff| {:.2e} > {bound:.2e}",
                (a - n).abs()
            ));
        }
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(format!("{what}:\n{}", failures.join("\n")))
    }
}

/// Checks the gradients of `f` at `inputs` against central differences.
///
/// `wrt[i]` says whether input `i` requires grad; inputs that do not are
/// constants of `f` (and must receive no gradient). Returns a description
/// of every mismatching element.
fn check_grads(
    inputs: &[Tensor],
    wrt: &[bool],
    f: impl Fn(&[Tensor]) -> Tensor,
) -> std::result::Result<(), String> {
    assert_eq!(inputs.len(), wrt.len(), "one wrt flag per input");
    assert!(wrt.iter().any(|&w| w), "nothing to check");

    // The fixed weighting r, of the output's shape.
    let out_shape = {
        let _guard = autograd::no_grad();
        f(inputs).shape().to_vec()
    };
    let mut rng = StdRng::seed_from_u64(0x0005_EED0_F0A7);
    let r = Tensor::randn(&out_shape, &mut rng);
    let r_values = r.to_vec();

    // Analytic, path A: autograd::grad of (f(x) * r).sum().
    let leaves: Vec<Tensor> = inputs.iter().zip(wrt).map(|(t, &w)| leaf(t, w)).collect();
    let out = f(&leaves);
    if out.shape() != out_shape.as_slice() {
        return Err(format!(
            "output shape {:?} with grad on, {out_shape:?} under no_grad",
            out.shape()
        ));
    }
    let loss = (&out * &r).sum();
    let targets: Vec<&Tensor> = leaves
        .iter()
        .zip(wrt)
        .filter_map(|(t, &w)| w.then_some(t))
        .collect();
    let grads_a = autograd::grad(&[&loss], &targets).map_err(|e| format!("autograd::grad: {e}"))?;

    // Analytic, path B: backward_with(r) accumulating into the leaves.
    let leaves: Vec<Tensor> = inputs.iter().zip(wrt).map(|(t, &w)| leaf(t, w)).collect();
    f(&leaves)
        .try_backward_with(&r, false)
        .map_err(|e| format!("backward_with: {e}"))?;

    let mut errors = Vec::new();
    let mut next_a = grads_a.iter();
    for (i, (x, &w)) in inputs.iter().zip(wrt).enumerate() {
        let grad_b = leaves[i].grad();
        if !w {
            if grad_b.is_some() {
                errors.push(format!("input {i} does not require grad but got one"));
            }
            continue;
        }
        let grad_a = next_a.next().expect("one gradient per target");

        // Numeric: central differences, element by element.
        let base = x.to_vec();
        let mut numeric = Vec::with_capacity(base.len());
        {
            let _guard = autograd::no_grad();
            for j in 0..base.len() {
                let eval = |v: f32| {
                    let mut values = base.clone();
                    values[j] = v;
                    let mut args = inputs.to_vec();
                    args[i] = Tensor::from_vec(values, x.shape()).expect("same shape");
                    weighted_sum(&f(&args), &r_values)
                };
                let (plus, minus) = (base[j] + STEP, base[j] - STEP);
                let taken = f64::from(plus) - f64::from(minus);
                numeric.push((eval(plus) - eval(minus)) / taken);
            }
        }

        for (what, grad) in [
            ("autograd::grad", Some(grad_a.clone())),
            ("backward", grad_b),
        ] {
            match grad {
                None => errors.push(format!("{what}: input {i} got no gradient")),
                Some(g) if g.shape() != x.shape() => errors.push(format!(
                    "{what}: input {i} has shape {:?}, its gradient {:?}",
                    x.shape(),
                    g.shape()
                )),
                Some(g) => {
                    if let Err(e) = compare(what, i, x.shape(), &g.to_vec(), &numeric) {
                        errors.push(e);
                    }
                }
            }
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("\n"))
    }
}

/// Panics with the checker's report if the gradients of `f` are wrong.
#[track_caller]
fn assert_grads(label: &str, inputs: &[Tensor], wrt: &[bool], f: impl Fn(&[Tensor]) -> Tensor) {
    if let Err(report) = check_grads(inputs, wrt, f) {
        let shapes: Vec<&[usize]> = inputs.iter().map(Tensor::shape).collect();
        panic!(
            "gradient check failed for {label}, input shapes {shapes:?}, wrt {wrt:?}:\n{report}"
        );
    }
}

/// A differentiable function of one tensor, for tables of cases.
type UnaryFn = fn(&Tensor) -> Tensor;
/// A differentiable function of two tensors, for tables of cases.
type BinaryFn = fn(&Tensor, &Tensor) -> Tensor;

/// The three ways two operands can require grad.
const BOTH_AND_EACH: [[bool; 2]; 3] = [[true, true], [true, false], [false, true]];

// ---------------------------------------------------------------------------
// Inputs
// ---------------------------------------------------------------------------

fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// Standard normal values.
fn normal(shape: &[usize], rng: &mut StdRng) -> Tensor {
    Tensor::randn(shape, rng)
}

/// Values in `[lo, hi)`.
fn uniform(shape: &[usize], lo: f32, hi: f32, rng: &mut StdRng) -> Tensor {
    Tensor::uniform(shape, lo, hi, rng)
}

/// Values with `lo <= |x| < hi` and random signs: away from 0.
fn away_from_zero(shape: &[usize], lo: f32, hi: f32, rng: &mut StdRng) -> Tensor {
    let n = shape.iter().product();
    let values = (0..n)
        .map(|_| {
            let magnitude = rng.random_range(lo..hi);
            if rng.random_bool(0.5) {
                magnitude
            } else {
                -magnitude
            }
        })
        .collect();
    Tensor::from_vec(values, shape).unwrap()
}

/// Pairwise distinct values, at least 0.25 apart, in random order.
fn distinct(shape: &[usize], rng: &mut StdRng) -> Tensor {
    let n: usize = shape.iter().product();
    let mut values: Vec<f32> = (0..n).map(|i| 0.25 * i as f32 - 0.125 * n as f32).collect();
    values.shuffle(rng);
    Tensor::from_vec(values, shape).unwrap()
}

/// `[a, b, ...]` as a tensor, for hand-derived tests.
fn tensor(values: &[f32], shape: &[usize]) -> Tensor {
    Tensor::from_vec(values.to_vec(), shape).unwrap()
}

#[track_caller]
fn assert_close(actual: &Tensor, expected: &[f32], shape: &[usize]) {
    assert_eq!(actual.shape(), shape, "shape");
    let actual = actual.to_vec();
    for (j, (&a, &e)) in actual.iter().zip(expected).enumerate() {
        assert!(
            (a - e).abs() <= HAND_TOL,
            "element {j}: got {a}, expected {e} (all: {actual:?}, expected {expected:?})"
        );
    }
}

// ---------------------------------------------------------------------------
// The checker is strict enough: it rejects wrong gradients.
// ---------------------------------------------------------------------------

/// `x³` as a custom op whose backward returns `factor · 3x²` (correct for
/// `factor == 1`) and, if `broken_element` is set, 0 at that element.
fn cube(x: &Tensor, factor: f32, broken_element: Option<usize>) -> Result<Tensor> {
    let input = x.data();
    let output = input.mapv(|v| v * v * v);
    apply_op("cube", &[x], output, move || {
        move |grad: ArrayD<f32>, grads: &mut InputGrads<'_>| {
            let mut g = grad * input.mapv(|v| factor * 3.0 * v * v);
            if let Some(j) = broken_element {
                g.as_slice_mut().expect("contiguous")[j] = 0.0;
            }
            grads.set(0, g);
        }
    })
}

#[test]
fn checker_accepts_correct_custom_op() {
    let x = normal(&[2, 3], &mut rng(1));
    assert_grads("cube", &[x], &[true], |x| cube(&x[0], 1.0, None).unwrap());
}

#[test]
fn checker_rejects_gradient_off_by_ten_percent() {
    let x = normal(&[2, 3], &mut rng(1));
    let report = check_grads(&[x], &[true], |x| cube(&x[0], 1.1, None).unwrap())
        .expect_err("a backward 10% off must be rejected");
    assert!(report.contains("autograd::grad") && report.contains("backward"));
}

#[test]
fn checker_rejects_gradient_off_by_two_percent() {
    // |3x²| >= 0.75 here, so a 2% error (>= 0.015) exceeds
    // ATOL + RTOL * 3x² for every element.
    let x = away_from_zero(&[2, 3], 0.5, 1.5, &mut rng(2));
    let report = check_grads(&[x], &[true], |x| cube(&x[0], 1.02, None).unwrap())
        .expect_err("a backward 2% off must be rejected");
    assert_eq!(
        report.lines().filter(|l| l.contains("element")).count(),
        12,
        "every element of both paths is reported:\n{report}"
    );
}

#[test]
fn checker_rejects_gradient_wrong_in_one_element() {
    let x = away_from_zero(&[2, 3], 0.5, 1.5, &mut rng(3));
    let report = check_grads(&[x], &[true], |x| cube(&x[0], 1.0, Some(4)).unwrap())
        .expect_err("a backward with one element zeroed must be rejected");
    assert!(report.contains("element 4:"), "{report}");
    assert!(!report.contains("element 3:"), "{report}");
}

#[test]
fn checker_rejects_gradient_sent_to_a_constant_input() {
    // mul_scalar by hand, with a gradient "computed" for a second input that
    // the output does not depend on.
    let x = normal(&[3], &mut rng(4));
    let c = normal(&[3], &mut rng(5));
    let report = check_grads(&[x, c], &[true, true], |t| {
        let output = t[0].data().mapv(|v| 2.0 * v);
        apply_op("leaky", &[&t[0], &t[1]], output, || {
            |grad: ArrayD<f32>, grads: &mut InputGrads<'_>| {
                grads.set(0, &grad * 2.0);
                grads.set(1, grad);
            }
        })
        .unwrap()
    })
    .expect_err("a gradient for an input the output ignores must be rejected");
    assert!(report.contains("input 1"), "{report}");
    assert!(!report.contains("input 0"), "{report}");
}

// ---------------------------------------------------------------------------
// Binary ops with broadcasting
// ---------------------------------------------------------------------------

/// Operand shape pairs: same shape, trailing vector, both sides broadcast,
/// a 0-d scalar on either side.
const BROADCAST_PAIRS: [(&[usize], &[usize]); 7] = [
    (&[2, 3], &[2, 3]),
    (&[2, 3], &[3]),
    (&[3], &[2, 3]),
    (&[4, 1, 3], &[2, 1]),
    (&[2, 1], &[4, 1, 3]),
    (&[], &[2, 3]),
    (&[2, 3], &[]),
];

fn check_binary(name: &str, seed: u64, op: BinaryFn, nonzero_rhs: bool) {
    let mut rng = rng(seed);
    for (lhs, rhs) in BROADCAST_PAIRS {
        let a = normal(lhs, &mut rng);
        let b = if nonzero_rhs {
            away_from_zero(rhs, 0.5, 2.0, &mut rng)
        } else {
            normal(rhs, &mut rng)
        };
        for wrt in BOTH_AND_EACH {
            assert_grads(name, &[a.clone(), b.clone()], &wrt, |t| op(&t[0], &t[1]));
        }
    }
}

#[test]
fn should_diff_add_broadcast() {
    check_binary("add", 10, Tensor::add, false);
}

#[test]
fn should_diff_sub_broadcast() {
    check_binary("sub", 11, Tensor::sub, false);
}

#[test]
fn should_diff_mul_broadcast() {
    check_binary("mul", 12, Tensor::mul, false);
}

#[test]
fn should_diff_div_broadcast() {
    check_binary("div", 13, Tensor::div, true);
}

#[test]
fn should_diff_binary_operators() {
    let mut rng = rng(14);
    let a = normal(&[3, 2], &mut rng);
    let b = away_from_zero(&[2], 0.5, 2.0, &mut rng);
    let ops: [(&str, BinaryFn); 4] = [
        ("&a + &b", |a, b| a + b),
        ("&a - &b", |a, b| a - b),
        ("&a * &b", |a, b| a * b),
        ("&a / &b", |a, b| a / b),
    ];
    for (name, op) in ops {
        assert_grads(name, &[a.clone(), b.clone()], &[true, true], |t| {
            op(&t[0], &t[1])
        });
    }
}

#[test]
fn should_diff_operand_used_on_both_sides() {
    // x op x: both edges lead to the same leaf and must be summed.
    let x = away_from_zero(&[2, 3], 0.5, 2.0, &mut rng(15));
    let ops: [(&str, UnaryFn); 4] = [
        ("x + x", |x| x + x),
        ("x - x", |x| x - x),
        ("x * x", |x| x * x),
        ("x / x", |x| x / x),
    ];
    for (name, op) in ops {
        assert_grads(name, std::slice::from_ref(&x), &[true], |t| op(&t[0]));
    }
}

// ---------------------------------------------------------------------------
// Scalar forms
// ---------------------------------------------------------------------------

const SCALAR_SHAPES: [&[usize]; 4] = [&[], &[5], &[2, 3], &[2, 3, 2]];

fn check_unary(
    name: &str,
    mut input: impl FnMut(&[usize]) -> Tensor,
    op: impl Fn(&Tensor) -> Tensor,
) {
    for shape in SCALAR_SHAPES {
        assert_grads(name, &[input(shape)], &[true], |t| op(&t[0]));
    }
}

#[test]
fn should_diff_scalar_methods() {
    let mut rng = rng(20);
    let mut input = |shape: &[usize]| normal(shape, &mut rng);
    check_unary("add_scalar", &mut input, |x| x.add_scalar(1.5));
    check_unary("sub_scalar", &mut input, |x| x.sub_scalar(0.7));
    check_unary("rsub_scalar", &mut input, |x| x.rsub_scalar(2.0));
    check_unary("mul_scalar", &mut input, |x| x.mul_scalar(-1.3));
    check_unary("div_scalar", &mut input, |x| x.div_scalar(2.5));
}

#[test]
fn should_diff_rdiv_scalar() {
    let mut rng = rng(21);
    let input = |shape: &[usize]| away_from_zero(shape, 0.5, 2.0, &mut rng);
    check_unary("rdiv_scalar", input, |x| x.rdiv_scalar(3.0));
}

#[test]
fn should_diff_scalar_operators_on_either_side() {
    let mut rng = rng(22);
    let x = away_from_zero(&[2, 3], 0.5, 2.0, &mut rng);
    let ops: [(&str, UnaryFn); 9] = [
        ("&x + 1.5", |x| x + 1.5),
        ("1.5 + &x", |x| 1.5 + x),
        ("&x - 0.5", |x| x - 0.5),
        ("2.0 - &x", |x| 2.0 - x),
        ("&x * -1.5", |x| x * -1.5),
        ("-1.5 * &x", |x| -1.5 * x),
        ("&x / 3.0", |x| x / 3.0),
        ("3.0 / &x", |x| 3.0 / x),
        ("-&x", |x| -x),
    ];
    for (name, op) in ops {
        assert_grads(name, std::slice::from_ref(&x), &[true], |t| op(&t[0]));
    }
}

// ---------------------------------------------------------------------------
// Unary ops
// ---------------------------------------------------------------------------

#[test]
fn should_diff_neg() {
    let mut rng = rng(30);
    check_unary("neg", |s| normal(s, &mut rng), Tensor::neg);
}

#[test]
fn should_diff_powf_integer_exponents_any_sign() {
    let mut rng = rng(31);
    let mut input = |s: &[usize]| uniform(s, -1.5, 1.5, &mut rng);
    check_unary("powf(2)", &mut input, |x| x.powf(2.0));
    check_unary("powf(3)", &mut input, |x| x.powf(3.0));
    check_unary("powf(1)", &mut input, |x| x.powf(1.0));
}

#[test]
fn should_diff_powf_fractional_and_negative_exponents_on_positive_inputs() {
    let mut rng = rng(32);
    let mut input = |s: &[usize]| uniform(s, 0.5, 2.0, &mut rng);
    check_unary("powf(0.5)", &mut input, |x| x.powf(0.5));
    check_unary("powf(2.5)", &mut input, |x| x.powf(2.5));
    check_unary("powf(-1)", &mut input, |x| x.powf(-1.0));
    check_unary("powf(-0.5)", &mut input, |x| x.powf(-0.5));
}

#[test]
fn should_diff_exp() {
    let mut rng = rng(33);
    check_unary("exp", |s| uniform(s, -2.0, 2.0, &mut rng), Tensor::exp);
}

#[test]
fn should_diff_log_on_positive_inputs() {
    let mut rng = rng(34);
    check_unary("log", |s| uniform(s, 0.5, 3.0, &mut rng), Tensor::log);
}

#[test]
fn should_diff_sqrt_on_positive_inputs() {
    let mut rng = rng(35);
    check_unary("sqrt", |s| uniform(s, 0.5, 3.0, &mut rng), Tensor::sqrt);
}

#[test]
fn should_diff_abs_away_from_zero() {
    let mut rng = rng(36);
    let input = |s: &[usize]| away_from_zero(s, 0.2, 2.0, &mut rng);
    check_unary("abs", input, Tensor::abs);
}

#[test]
fn should_diff_relu_away_from_zero() {
    let mut rng = rng(37);
    let input = |s: &[usize]| away_from_zero(s, 0.2, 2.0, &mut rng);
    check_unary("relu", input, Tensor::relu);
}

#[test]
fn should_diff_sigmoid() {
    let mut rng = rng(38);
    check_unary(
        "sigmoid",
        |s| uniform(s, -3.0, 3.0, &mut rng),
        Tensor::sigmoid,
    );
}

#[test]
fn should_diff_tanh() {
    let mut rng = rng(39);
    check_unary("tanh", |s| uniform(s, -2.0, 2.0, &mut rng), Tensor::tanh);
}

#[test]
fn should_diff_unary_ops_on_transposed_input() {
    // A non-contiguous input: the backward's gradient must keep the layout
    // of the input's logical indices.
    let x = uniform(&[3, 4], 0.5, 2.0, &mut rng(40));
    let ops: [(&str, UnaryFn); 6] = [
        ("t().exp()", |x| x.t().exp()),
        ("t().log()", |x| x.t().log()),
        ("t().sqrt()", |x| x.t().sqrt()),
        ("t().powf(3)", |x| x.t().powf(3.0)),
        ("t().tanh()", |x| x.t().tanh()),
        ("t().rdiv_scalar(2)", |x| x.t().rdiv_scalar(2.0)),
    ];
    for (name, op) in ops {
        assert_grads(name, std::slice::from_ref(&x), &[true], |t| op(&t[0]));
    }
}

// ---------------------------------------------------------------------------
// Matmul
// ---------------------------------------------------------------------------

fn check_matmul(name: &str, seed: u64, lhs: &[usize], rhs: &[usize]) {
    let mut rng = rng(seed);
    let a = normal(lhs, &mut rng);
    let b = normal(rhs, &mut rng);
    for wrt in BOTH_AND_EACH {
        assert_grads(name, &[a.clone(), b.clone()], &wrt, |t| t[0].matmul(&t[1]));
    }
}

#[test]
fn should_diff_matmul_2d() {
    check_matmul("matmul", 50, &[3, 4], &[4, 5]);
    check_matmul("matmul", 51, &[1, 4], &[4, 1]);
    check_matmul("matmul", 52, &[4, 1], &[1, 3]);
}

#[test]
fn should_diff_matmul_batched() {
    check_matmul("matmul", 53, &[2, 3, 4], &[2, 4, 5]);
}

#[test]
fn should_diff_matmul_batched_broadcast() {
    check_matmul("matmul", 54, &[3, 4], &[2, 4, 5]);
    check_matmul("matmul", 55, &[2, 3, 4], &[4, 5]);
    check_matmul("matmul", 56, &[2, 1, 3, 4], &[5, 4, 2]);
    check_matmul("matmul", 57, &[1, 3, 2], &[4, 2, 3]);
}

/// The fused affine map `x · W + b`, over every subset of inputs requiring
/// grad, against finite differences and against the unfused ops.
fn check_linear(seed: u64, x_shape: &[usize], in_features: usize, out_features: usize) {
    let mut rng = rng(seed);
    let x = normal(x_shape, &mut rng);
    let w = normal(&[in_features, out_features], &mut rng);
    let b = normal(&[out_features], &mut rng);
    for wrt in [
        [true, true, true],
        [true, false, false],
        [false, true, false],
        [false, false, true],
    ] {
        assert_grads("linear", &[x.clone(), w.clone(), b.clone()], &wrt, |t| {
            t[0].linear(&t[1], Some(&t[2]))
        });
    }
    for wrt in BOTH_AND_EACH {
        assert_grads("linear without bias", &[x.clone(), w.clone()], &wrt, |t| {
            t[0].linear(&t[1], None)
        });
    }
    if x_shape.len() >= 2 {
        let fused = x.linear(&w, Some(&b)).to_vec();
        let unfused = x.matmul(&w).add(&b).to_vec();
        for (f, u) in fused.iter().zip(&unfused) {
            assert!((f - u).abs() <= 1e-5 * (1.0 + u.abs()), "{f} vs {u}");
        }
    }
}

#[test]
fn should_diff_linear() {
    check_linear(70, &[4, 3], 3, 5);
    check_linear(71, &[1, 6], 6, 1);
    check_linear(72, &[2, 3, 4], 4, 2);
    check_linear(73, &[3], 3, 4);
}

#[test]
fn should_diff_linear_of_a_transposed_input() {
    let mut rng = rng(74);
    let x = normal(&[3, 4], &mut rng);
    let w = normal(&[3, 2], &mut rng);
    let b = normal(&[2], &mut rng);
    assert_grads("linear of xᵀ", &[x, w, b], &[true, true, true], |t| {
        t[0].t().linear(&t[1], Some(&t[2]))
    });
}

#[test]
fn should_diff_matmul_through_transposed_operands() {
    let mut rng = rng(58);
    let a = normal(&[4, 3], &mut rng);
    let b = normal(&[4, 5], &mut rng);
    let c = normal(&[5, 4], &mut rng);
    for wrt in BOTH_AND_EACH {
        // aᵀ · b: [3, 4] · [4, 5]
        assert_grads("a.t().matmul(b)", &[a.clone(), b.clone()], &wrt, |t| {
            t[0].t().matmul(&t[1])
        });
        // aᵀ · cᵀ: [3, 4] · [4, 5]
        assert_grads("a.t().matmul(c.t())", &[a.clone(), c.clone()], &wrt, |t| {
            t[0].t().matmul(&t[1].t())
        });
        // bᵀ · cᵀ: [5, 4] · [4, 5], both operands non-contiguous
        assert_grads("b.t().matmul(c.t())", &[b.clone(), c.clone()], &wrt, |t| {
            t[0].t().matmul(&t[1].t())
        });
    }
}

#[test]
fn should_diff_matmul_batched_transposed_operands() {
    let mut rng = rng(59);
    let a = normal(&[2, 4, 3], &mut rng);
    let b = normal(&[2, 5, 4], &mut rng);
    for wrt in BOTH_AND_EACH {
        // [2, 3, 4] · [2, 4, 5]
        assert_grads("batched transposed", &[a.clone(), b.clone()], &wrt, |t| {
            t[0].transpose(-1, -2).matmul(&t[1].transpose(1, 2))
        });
    }
    // The batch axis moved: [4, 2, 3] -> [2, 4, 3] -> transposed [2, 3, 4].
    let c = normal(&[4, 2, 3], &mut rng);
    let d = normal(&[4, 5], &mut rng);
    assert_grads("batch axis swapped", &[c, d], &[true, true], |t| {
        t[0].transpose(0, 1).transpose(1, 2).matmul(&t[1])
    });
}

// ---------------------------------------------------------------------------
// Reductions
// ---------------------------------------------------------------------------

#[test]
fn should_diff_sum_and_mean() {
    let mut rng = rng(60);
    for shape in [&[][..], &[5], &[2, 3], &[2, 3, 4]] {
        let x = normal(shape, &mut rng);
        assert_grads("sum", std::slice::from_ref(&x), &[true], |t| t[0].sum());
        assert_grads("mean", std::slice::from_ref(&x), &[true], |t| t[0].mean());
    }
}

#[test]
fn should_diff_sum_axis_and_mean_axis_every_axis_and_keepdim() {
    let mut rng = rng(61);
    for shape in [&[5][..], &[2, 3], &[2, 3, 4]] {
        let x = normal(shape, &mut rng);
        let ndim = shape.len() as isize;
        for axis in -ndim..ndim {
            for keepdim in [false, true] {
                let label = format!("sum_axis({axis}, {keepdim})");
                assert_grads(&label, std::slice::from_ref(&x), &[true], |t| {
                    t[0].sum_axis(axis, keepdim)
                });
                let label = format!("mean_axis({axis}, {keepdim})");
                assert_grads(&label, std::slice::from_ref(&x), &[true], |t| {
                    t[0].mean_axis(axis, keepdim)
                });
            }
        }
    }
}

#[test]
fn should_diff_max_axis_with_unique_maximum() {
    let mut rng = rng(62);
    for shape in [&[6][..], &[3, 4], &[2, 3, 4]] {
        let x = distinct(shape, &mut rng);
        let ndim = shape.len() as isize;
        for axis in -ndim..ndim {
            for keepdim in [false, true] {
                let label = format!("max_axis({axis}, {keepdim})");
                assert_grads(&label, std::slice::from_ref(&x), &[true], |t| {
                    t[0].max_axis(axis, keepdim)
                });
            }
        }
    }
}

#[test]
fn should_diff_reductions_of_transposed_input() {
    let mut rng = rng(63);
    let x = distinct(&[3, 4], &mut rng);
    for axis in [0, 1] {
        assert_grads("t().sum_axis", std::slice::from_ref(&x), &[true], |t| {
            t[0].t().sum_axis(axis, false)
        });
        assert_grads("t().mean_axis", std::slice::from_ref(&x), &[true], |t| {
            t[0].t().mean_axis(axis, true)
        });
        assert_grads("t().max_axis", std::slice::from_ref(&x), &[true], |t| {
            t[0].t().max_axis(axis, false)
        });
    }
}

// ---------------------------------------------------------------------------
// Softmax
// ---------------------------------------------------------------------------

#[test]
fn should_diff_softmax_every_axis() {
    let mut rng = rng(70);
    for shape in [&[5][..], &[3, 4], &[2, 3, 4]] {
        let x = normal(shape, &mut rng).mul_scalar(1.5);
        let ndim = shape.len() as isize;
        for axis in -ndim..ndim {
            let label = format!("softmax({axis})");
            assert_grads(&label, std::slice::from_ref(&x), &[true], |t| {
                t[0].softmax(axis)
            });
        }
    }
}

#[test]
fn should_diff_log_softmax_every_axis() {
    let mut rng = rng(71);
    for shape in [&[5][..], &[3, 4], &[2, 3, 4]] {
        let x = normal(shape, &mut rng).mul_scalar(1.5);
        let ndim = shape.len() as isize;
        for axis in -ndim..ndim {
            let label = format!("log_softmax({axis})");
            assert_grads(&label, std::slice::from_ref(&x), &[true], |t| {
                t[0].log_softmax(axis)
            });
        }
    }
}

#[test]
fn should_diff_softmax_of_transposed_input() {
    let x = normal(&[3, 4], &mut rng(72));
    for axis in [0, 1, -1] {
        assert_grads("t().softmax", std::slice::from_ref(&x), &[true], |t| {
            t[0].t().softmax(axis)
        });
        assert_grads("t().log_softmax", std::slice::from_ref(&x), &[true], |t| {
            t[0].t().log_softmax(axis)
        });
    }
}

// ---------------------------------------------------------------------------
// Shape ops
// ---------------------------------------------------------------------------

#[test]
fn should_diff_reshape() {
    let mut rng = rng(80);
    let x = normal(&[2, 3, 4], &mut rng);
    for shape in [&[24][..], &[6, 4], &[4, 6], &[2, 2, 6], &[1, 24, 1]] {
        assert_grads("reshape", std::slice::from_ref(&x), &[true], |t| {
            t[0].reshape(shape)
        });
    }
    // Scalar to and from shape [1, 1].
    let s = normal(&[], &mut rng);
    assert_grads("reshape [] -> [1, 1]", &[s], &[true], |t| {
        t[0].reshape(&[1, 1])
    });
}

#[test]
fn should_diff_reshape_of_non_contiguous_input() {
    let x = normal(&[3, 4], &mut rng(81));
    // The transposed view is not row-major: reshape must copy in logical
    // order and its backward must undo exactly that.
    for shape in [&[12][..], &[2, 6], &[6, 2]] {
        assert_grads("t().reshape", std::slice::from_ref(&x), &[true], |t| {
            t[0].t().reshape(shape)
        });
    }
}

#[test]
fn should_diff_transpose_and_t() {
    let mut rng = rng(82);
    let x = normal(&[2, 3, 4], &mut rng);
    for (a, b) in [(0, 2), (1, -1), (0, 1), (-3, -2), (1, 1)] {
        let label = format!("transpose({a}, {b})");
        assert_grads(&label, std::slice::from_ref(&x), &[true], |t| {
            t[0].transpose(a, b)
        });
    }
    let m = normal(&[3, 5], &mut rng);
    assert_grads("t", std::slice::from_ref(&m), &[true], |t| t[0].t());
    assert_grads("t().t()", std::slice::from_ref(&m), &[true], |t| {
        t[0].t().t()
    });
}

#[test]
fn should_diff_binary_ops_on_transposed_operands() {
    // Element-wise ops whose operands are non-contiguous views with the same
    // logical shape, and broadcast against one.
    let mut rng = rng(83);
    // Every operand is a denominator somewhere: keep all away from 0.
    let a = away_from_zero(&[4, 3], 0.5, 2.0, &mut rng);
    let b = away_from_zero(&[3, 4], 0.5, 2.0, &mut rng);
    let c = away_from_zero(&[4], 0.5, 2.0, &mut rng);
    let ops: [(&str, BinaryFn); 4] = [
        ("add", Tensor::add),
        ("sub", Tensor::sub),
        ("mul", Tensor::mul),
        ("div", Tensor::div),
    ];
    for (name, op) in ops {
        assert_grads(name, &[a.clone(), b.clone()], &[true, true], |t| {
            op(&t[0].t(), &t[1])
        });
        assert_grads(name, &[a.clone(), c.clone()], &[true, true], |t| {
            op(&t[0].t(), &t[1])
        });
        assert_grads(name, &[b.clone(), a.clone()], &[true, true], |t| {
            op(&t[0], &t[1].t())
        });
    }
}

// ---------------------------------------------------------------------------
// Losses
// ---------------------------------------------------------------------------

/// `n` class indices in `0..classes`, as `f32`.
fn targets(n: usize, classes: usize, rng: &mut StdRng) -> Tensor {
    let values = (0..n)
        .map(|_| rng.random_range(0..classes) as f32)
        .collect();
    Tensor::from_vec(values, &[n]).unwrap()
}

#[test]
fn should_diff_cross_entropy() {
    let mut rng = rng(90);
    for (n, classes) in [(4, 3), (1, 5), (6, 2), (3, 7)] {
        let logits = normal(&[n, classes], &mut rng).mul_scalar(2.0);
        let y = targets(n, classes, &mut rng);
        assert_grads("cross_entropy", &[logits], &[true], |t| {
            t[0].cross_entropy(&y)
        });
    }
}

#[test]
fn should_diff_cross_entropy_of_transposed_logits() {
    let mut rng = rng(91);
    let logits = normal(&[3, 5], &mut rng);
    let y = targets(5, 3, &mut rng);
    assert_grads("t().cross_entropy", &[logits], &[true], |t| {
        t[0].t().cross_entropy(&y)
    });
}

#[test]
fn should_diff_mse_loss() {
    let mut rng = rng(92);
    for shape in [&[5][..], &[3, 4], &[2, 2, 2], &[]] {
        let pred = normal(shape, &mut rng);
        let target = normal(shape, &mut rng);
        for wrt in BOTH_AND_EACH {
            assert_grads("mse_loss", &[pred.clone(), target.clone()], &wrt, |t| {
                t[0].mse_loss(&t[1])
            });
        }
    }
}

// ---------------------------------------------------------------------------
// Composite graphs against finite differences
// ---------------------------------------------------------------------------

#[test]
fn should_diff_two_layer_classifier() {
    // cross_entropy(relu(x W1 + b1) W2 + b2), every parameter and the input.
    let mut rng = rng(100);
    let x = normal(&[4, 3], &mut rng);
    let w1 = normal(&[3, 5], &mut rng);
    let b1 = normal(&[5], &mut rng);
    let w2 = normal(&[5, 2], &mut rng);
    let b2 = normal(&[2], &mut rng);
    let y = targets(4, 2, &mut rng);
    // relu's inputs must stay away from its kink. Moving one element of x,
    // W1 or b1 by h moves a pre-activation z = x W1 + b1 by at most
    // h · max(|x|, |W1|, 1); require twice that margin, so that no central
    // difference straddles the kink.
    {
        let _guard = autograd::no_grad();
        let z = x.matmul(&w1) + &b1;
        let closest = z.to_vec().iter().fold(f32::INFINITY, |m, v| m.min(v.abs()));
        let largest = [&x, &w1]
            .iter()
            .flat_map(|t| t.to_vec())
            .fold(1.0_f32, |m, v| m.max(v.abs()));
        let margin = 2.0 * STEP * largest;
        assert!(
            closest > margin,
            "pre-activation {closest} within {margin} of relu's kink"
        );
    }
    assert_grads(
        "mlp",
        &[x, w1, b1, w2, b2],
        &[true, true, true, true, true],
        |t| {
            let h = (t[0].matmul(&t[1]) + &t[2]).relu();
            (h.matmul(&t[3]) + &t[4]).cross_entropy(&y)
        },
    );
}

#[test]
fn should_diff_smooth_chain_with_reuse() {
    // f(x, w) = mean(log_softmax(tanh(x w) * sigmoid(x w), -1) * x w)
    //         + sqrt(exp(x w) + 1).sum(): shared subexpression x w used four
    // times.
    let mut rng = rng(101);
    let x = normal(&[3, 4], &mut rng);
    let w = normal(&[4, 2], &mut rng).mul_scalar(0.5);
    assert_grads("chain", &[x, w], &[true, true], |t| {
        let z = t[0].matmul(&t[1]);
        let s = (z.tanh() * z.sigmoid()).log_softmax(-1);
        (s * &z).mean() + (z.exp() + 1.0).sqrt().sum()
    });
}

#[test]
fn should_diff_normalisation_with_broadcast_statistics() {
    // (x - mean(x, -1)) / sqrt(var(x, -1) + 1): keepdim reductions broadcast
    // back against their input.
    let x = normal(&[3, 5], &mut rng(102));
    assert_grads("layer norm", &[x], &[true], |t| {
        let centered = &t[0] - t[0].mean_axis(-1, true);
        let var = centered.powf(2.0).mean_axis(-1, true);
        centered / (var + 1.0).sqrt()
    });
}

// ---------------------------------------------------------------------------
// Hand-derived gradients
// ---------------------------------------------------------------------------

/// Linear layer, relu and mean squared error on fixed numbers.
///
/// x = [[1, 2], [3, -1]], W = [[0.5, -1], [0.25, 1]], b = [0.1, -0.2],
/// target t = [[1, 0], [2, 1]].
///
/// z = x W + b:
///   row 0: [1·0.5 + 2·0.25, 1·(-1) + 2·1] + b = [1.0, 1.0] + b = [1.1, 0.8]
///   row 1: [3·0.5 - 0.25, -3 - 1] + b = [1.25, -4] + b = [1.35, -4.2]
/// h = relu(z) = [[1.1, 0.8], [1.35, 0]]
/// d = h - t = [[0.1, 0.8], [-0.65, -1]]
/// L = mean(d²) = (0.01 + 0.64 + 0.4225 + 1) / 4 = 0.518125
/// dL/dh = 2 d / 4 = [[0.05, 0.4], [-0.325, -0.5]]
/// dL/dz = dL/dh · [z > 0] = [[0.05, 0.4], [-0.325, 0]]
/// dW = xᵀ dz = [[1·0.05 + 3·(-0.325), 1·0.4 + 3·0],
///               [2·0.05 + (-1)(-0.325), 2·0.4 + 0]]
///    = [[-0.925, 0.4], [0.425, 0.8]]
/// db = Σ_rows dz = [0.05 - 0.325, 0.4 + 0] = [-0.275, 0.4]
/// dx = dz Wᵀ = [[0.05·0.5 + 0.4·(-1), 0.05·0.25 + 0.4·1],
///               [-0.325·0.5 + 0, -0.325·0.25 + 0]]
///    = [[-0.375, 0.4125], [-0.1625, -0.08125]]
#[test]
fn linear_relu_mse_gradients_match_hand_derivation() {
    let x = tensor(&[1.0, 2.0, 3.0, -1.0], &[2, 2]).requires_grad_(true);
    let w = tensor(&[0.5, -1.0, 0.25, 1.0], &[2, 2]).requires_grad_(true);
    let b = tensor(&[0.1, -0.2], &[2]).requires_grad_(true);
    let target = tensor(&[1.0, 0.0, 2.0, 1.0], &[2, 2]);

    let loss = (x.matmul(&w) + &b).relu().mse_loss(&target);
    assert!((loss.item() - 0.518125).abs() <= HAND_TOL);
    loss.backward();

    assert_close(&w.grad().unwrap(), &[-0.925, 0.4, 0.425, 0.8], &[2, 2]);
    assert_close(&b.grad().unwrap(), &[-0.275, 0.4], &[2]);
    assert_close(
        &x.grad().unwrap(),
        &[-0.375, 0.4125, -0.1625, -0.08125],
        &[2, 2],
    );
    assert!(target.grad().is_none());
}

/// One tensor used twice: y = Σ (x·x + x), so dy/dx = 2x + 1 — the
/// contributions of both factors of x·x and of the + x edge must add up.
/// x = [-1.5, 0, 2] gives [-2, 1, 5].
#[test]
fn reused_tensor_accumulates_all_paths() {
    let x = tensor(&[-1.5, 0.0, 2.0], &[3]).requires_grad_(true);
    let y = (&x * &x + &x).sum();
    assert!((y.item() - (0.75 + 0.0 + 6.0)).abs() <= HAND_TOL);
    y.backward();
    assert_close(&x.grad().unwrap(), &[-2.0, 1.0, 5.0], &[3]);

    // A second backward through a fresh graph adds to the leaf's gradient:
    // z = Σ 3x, dz/dx = 3, so the slot holds (2x + 1) + 3 = [1, 4, 8].
    (&x * 3.0).sum().backward();
    assert_close(&x.grad().unwrap(), &[1.0, 4.0, 8.0], &[3]);
}

/// A value reused through a longer diamond: u = exp(x), y = Σ (u·u + 2u),
/// dy/dx = (2u + 2)·u = 2e^{2x} + 2e^{x}. At x = [0, ln 2]: u = [1, 2],
/// dy/dx = [2 + 2, 8 + 4] = [4, 12].
#[test]
fn reused_intermediate_accumulates_before_its_backward() {
    let x = tensor(&[0.0, 2f32.ln()], &[2]).requires_grad_(true);
    let u = x.exp();
    let y = (&u * &u + &u * 2.0).sum();
    y.backward();
    assert_close(&x.grad().unwrap(), &[4.0, 12.0], &[2]);
}

/// Cross-entropy of 2×3 logits. Row 0 = [0, ln 2, ln 5] has softmax
/// [1, 2, 5] / 8; row 1 = [0, 0, 0] has softmax [1/3, 1/3, 1/3].
/// Targets [2, 0]:
/// L = -(ln(5/8) + ln(1/3)) / 2 = ln(24/5) / 2 = ln(4.8) / 2
/// dL/dlogits = (softmax - onehot) / n, n = 2:
///   row 0: ([1/8, 2/8, 5/8] - [0, 0, 1]) / 2 = [1/16, 1/8, -3/16]
///   row 1: ([1/3, 1/3, 1/3] - [1, 0, 0]) / 2 = [-1/3, 1/6, 1/6]
/// The gradient, checked by the two tests below.
const CE_EXAMPLE_GRAD: [f32; 6] = [
    1.0 / 16.0,
    1.0 / 8.0,
    -3.0 / 16.0,
    -1.0 / 3.0,
    1.0 / 6.0,
    1.0 / 6.0,
];

#[test]
fn cross_entropy_gradient_is_softmax_minus_onehot_over_n() {
    let logits = tensor(&[0.0, 2f32.ln(), 5f32.ln(), 0.0, 0.0, 0.0], &[2, 3]).requires_grad_(true);
    let targets = tensor(&[2.0, 0.0], &[2]);
    let loss = logits.cross_entropy(&targets);
    assert!((loss.item() - 4.8f32.ln() / 2.0).abs() <= HAND_TOL);
    loss.backward();
    assert_close(&logits.grad().unwrap(), &CE_EXAMPLE_GRAD, &[2, 3]);
}

/// The same example through the unfused graph -mean(onehot · log_softmax):
/// the gradient must agree with the fused op's formula.
#[test]
fn unfused_cross_entropy_matches_the_same_formula() {
    let logits = tensor(&[0.0, 2f32.ln(), 5f32.ln(), 0.0, 0.0, 0.0], &[2, 3]).requires_grad_(true);
    let onehot = tensor(&[0.0, 0.0, 1.0, 1.0, 0.0, 0.0], &[2, 3]);
    // Σ over classes, mean over the 2 rows.
    let loss = -((logits.log_softmax(-1) * &onehot).sum() / 2.0);
    assert!((loss.item() - 4.8f32.ln() / 2.0).abs() <= HAND_TOL);
    loss.backward();
    assert_close(&logits.grad().unwrap(), &CE_EXAMPLE_GRAD, &[2, 3]);
}

/// A bias broadcast over a batch receives the sum over the batch.
/// x = [[1, 2, 3], [4, 5, 6], [7, 8, 9], [10, 11, 12]], b = [0.5, -1, 2],
/// L = ½ Σ_ij (x_ij + b_j)², so dL/db_j = Σ_i (x_ij + b_j)
///   = (column sum of x)_j + 4 b_j = [22 + 2, 26 - 4, 30 + 8] = [24, 22, 38]
/// and dL/dx_ij = x_ij + b_j.
#[test]
fn broadcast_bias_gradient_sums_over_the_batch() {
    let x_values: Vec<f32> = (1..=12).map(|v| v as f32).collect();
    let x = tensor(&x_values, &[4, 3]).requires_grad_(true);
    for bias_shape in [&[3][..], &[1, 3]] {
        x.zero_grad();
        let b = tensor(&[0.5, -1.0, 2.0], bias_shape).requires_grad_(true);
        let loss = (&x + &b).powf(2.0).sum() * 0.5;
        loss.backward();
        assert_close(&b.grad().unwrap(), &[24.0, 22.0, 38.0], bias_shape);
        let expected_x: Vec<f32> = x_values
            .iter()
            .enumerate()
            .map(|(k, v)| v + [0.5, -1.0, 2.0][k % 3])
            .collect();
        assert_close(&x.grad().unwrap(), &expected_x, &[4, 3]);
    }
}

/// A scalar-shaped ([]) operand broadcast against [2, 3] receives the sum of
/// all six upstream gradients: L = Σ s·x, dL/ds = Σ x = 21, dL/dx = s = 2.
#[test]
fn scalar_operand_gradient_sums_every_element() {
    let s = Tensor::scalar(2.0).requires_grad_(true);
    let x = tensor(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3]).requires_grad_(true);
    (&s * &x).sum().backward();
    assert_close(&s.grad().unwrap(), &[21.0], &[]);
    assert_close(&x.grad().unwrap(), &[2.0; 6], &[2, 3]);
}

/// Mean over an axis spreads 1/len: L = Σ_j r_j · mean_i x_ij with x [4, 2]
/// and r = [1, -2] gives dL/dx_ij = r_j / 4 = [0.25, -0.5] on every row.
#[test]
fn mean_axis_gradient_is_spread_evenly() {
    let x = Tensor::zeros(&[4, 2]).requires_grad_(true);
    let r = tensor(&[1.0, -2.0], &[2]);
    (x.mean_axis(0, false) * &r).sum().backward();
    assert_close(&x.grad().unwrap(), &[0.25f32, -0.5].repeat(4), &[4, 2]);
}
