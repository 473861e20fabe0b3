//! The checker: finite differences against both backward paths, the
//! inputs the checks use, and proof that the checker rejects wrong
//! gradients. See the crate docs (`main.rs`) for the method and tolerances.

use netcl::autograd::{self, InputGrads, apply_op};
use netcl::ndarray::ArrayD;
use netcl::{Result, Tensor};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};

/// The finite-difference step.
pub(crate) const STEP: f32 = 1e-2;
/// Absolute tolerance of the gradient comparison (see the module docs).
pub(crate) const ATOL: f64 = 1e-3;
/// Relative tolerance of the gradient comparison (see the module docs).
pub(crate) const RTOL: f64 = 5e-3;
/// Absolute tolerance of the hand-derived expectations.
pub(crate) const HAND_TOL: f32 = 1e-5;

// ---------------------------------------------------------------------------
// The checker
// ---------------------------------------------------------------------------

/// A fresh leaf with `t`'s values (contiguous), requiring grad or not.
pub(crate) fn leaf(t: &Tensor, requires_grad: bool) -> Tensor {
    Tensor::from_vec(t.to_vec(), t.shape())
        .expect("same element count")
        .requires_grad_(requires_grad)
}

/// `Σ_k r_k y_k`, accumulated in `f64`.
pub(crate) fn weighted_sum(y: &Tensor, r: &[f32]) -> f64 {
    let y = y.to_vec();
    assert_eq!(y.len(), r.len(), "output changed size between evaluations");
    y.iter()
        .zip(r)
        .map(|(&y, &r)| f64::from(y) * f64::from(r))
        .sum()
}

/// Compares one analytic gradient with the numeric one, element by element.
pub(crate) fn compare(
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
pub(crate) fn check_grads(
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

    // Analytic, path B: backward from r, accumulating into the leaves.
    let leaves: Vec<Tensor> = inputs.iter().zip(wrt).map(|(t, &w)| leaf(t, w)).collect();
    f(&leaves)
        .try_backward_with_options(&autograd::BackwardOptions::new().grad_output(r.clone()))
        .map_err(|e| format!("backward with grad_output: {e}"))?;

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
pub(crate) fn assert_grads(
    label: &str,
    inputs: &[Tensor],
    wrt: &[bool],
    f: impl Fn(&[Tensor]) -> Tensor,
) {
    if let Err(report) = check_grads(inputs, wrt, f) {
        let shapes: Vec<&[usize]> = inputs.iter().map(Tensor::shape).collect();
        panic!(
            "gradient check failed for {label}, input shapes {shapes:?}, wrt {wrt:?}:\n{report}"
        );
    }
}

/// A differentiable function of one tensor, for tables of cases.
pub(crate) type UnaryFn = fn(&Tensor) -> Tensor;
/// A differentiable function of two tensors, for tables of cases.
pub(crate) type BinaryFn = fn(&Tensor, &Tensor) -> Tensor;

/// The three ways two operands can require grad.
pub(crate) const BOTH_AND_EACH: [[bool; 2]; 3] = [[true, true], [true, false], [false, true]];

// ---------------------------------------------------------------------------
// Inputs
// ---------------------------------------------------------------------------

pub(crate) fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// Standard normal values.
pub(crate) fn normal(shape: &[usize], rng: &mut StdRng) -> Tensor {
    Tensor::randn(shape, rng)
}

/// Values in `[lo, hi)`.
pub(crate) fn uniform(shape: &[usize], lo: f32, hi: f32, rng: &mut StdRng) -> Tensor {
    Tensor::uniform(shape, lo, hi, rng)
}

/// Values with `lo <= |x| < hi` and random signs: away from 0.
pub(crate) fn away_from_zero(shape: &[usize], lo: f32, hi: f32, rng: &mut StdRng) -> Tensor {
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
pub(crate) fn distinct(shape: &[usize], rng: &mut StdRng) -> Tensor {
    let n: usize = shape.iter().product();
    let mut values: Vec<f32> = (0..n).map(|i| 0.25 * i as f32 - 0.125 * n as f32).collect();
    values.shuffle(rng);
    Tensor::from_vec(values, shape).unwrap()
}

/// `[a, b, ...]` as a tensor, for hand-derived tests.
pub(crate) fn tensor(values: &[f32], shape: &[usize]) -> Tensor {
    Tensor::from_vec(values.to_vec(), shape).unwrap()
}

#[track_caller]
pub(crate) fn assert_close(actual: &Tensor, expected: &[f32], shape: &[usize]) {
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
pub(crate) fn cube(x: &Tensor, factor: f32, broken_element: Option<usize>) -> Result<Tensor> {
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
pub(crate) fn checker_accepts_correct_custom_op() {
    let x = normal(&[2, 3], &mut rng(1));
    assert_grads("cube", &[x], &[true], |x| cube(&x[0], 1.0, None).unwrap());
}

#[test]
pub(crate) fn checker_rejects_gradient_off_by_ten_percent() {
    let x = normal(&[2, 3], &mut rng(1));
    let report = check_grads(&[x], &[true], |x| cube(&x[0], 1.1, None).unwrap())
        .expect_err("a backward 10% off must be rejected");
    assert!(report.contains("autograd::grad") && report.contains("backward"));
}

#[test]
pub(crate) fn checker_rejects_gradient_off_by_two_percent() {
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
pub(crate) fn checker_rejects_gradient_wrong_in_one_element() {
    let x = away_from_zero(&[2, 3], 0.5, 1.5, &mut rng(3));
    let report = check_grads(&[x], &[true], |x| cube(&x[0], 1.0, Some(4)).unwrap())
        .expect_err("a backward with one element zeroed must be rejected");
    assert!(report.contains("element 4:"), "{report}");
    assert!(!report.contains("element 3:"), "{report}");
}

#[test]
pub(crate) fn checker_rejects_gradient_sent_to_a_constant_input() {
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

pub(crate) const SCALAR_SHAPES: [&[usize]; 4] = [&[], &[5], &[2, 3], &[2, 3, 2]];

pub(crate) fn check_unary(
    name: &str,
    mut input: impl FnMut(&[usize]) -> Tensor,
    op: impl Fn(&Tensor) -> Tensor,
) {
    for shape in SCALAR_SHAPES {
        assert_grads(name, &[input(shape)], &[true], |t| op(&t[0]));
    }
}

/// `n` class indices in `0..classes`, as `f32`.
pub(crate) fn targets(n: usize, classes: usize, rng: &mut StdRng) -> Tensor {
    let values = (0..n)
        .map(|_| rng.random_range(0..classes) as f32)
        .collect();
    Tensor::from_vec(values, &[n]).unwrap()
}
