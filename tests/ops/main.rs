//! Every op against one sample table, as PyTorch's OpInfo does: the cases
//! of `tests/fixtures/ops_*.json` (written once with PyTorch in float64 by
//! `scripts/torch_fixtures.py`, committed, read here without torch) are run
//! by each check below.
//!
//! - [`values_and_gradients_match_pytorch`]: outputs, and the gradients of
//!   `L = Σ r·y` for the fixture's weighting `r`, against PyTorch's within
//!   the case's tolerance `|netcl - torch| <= atol + rtol·|torch|`
//!   (default `1e-4 + 1e-4·|torch|`: netcl computes in `f32`).
//! - [`gradients_match_finite_differences`]: the same gradients against
//!   central differences of `L` (step 1e-2, accumulated in `f64`), for the
//!   cases without ties or kinks nearby (`fd`).
//! - [`no_grad_records_nothing_and_computes_the_same`]: under `no_grad` the
//!   outputs are bitwise the same and no node is recorded.
//! - [`try_forms_never_panic_on_bad_shapes`]: every op's `try_` form, fed
//!   each case's inputs with their shapes mangled, returns (a result or an
//!   error) and never panics.
//! - [`ops_in_parallel_tasks_give_the_same_bits`]: each case run inside
//!   `netcl::parallel` tasks gives the same outputs and gradients, bit for
//!   bit, as on the calling thread.
//! - `second::second_derivatives_match_finite_differences`: Hessian-vector
//!   products by double backward (`create_graph`) against central
//!   differences of the first derivative (`tests/ops/second.rs`).
//!
//! Adding an op: its case(s) in the family's `scripts/fixtures/<family>.py`,
//! one line in the family's dispatch here (`tests/ops/<family>.rs`), and
//! the fixtures regenerated.

mod table;

mod conv;
mod core;
mod elem;
mod norm;
mod shape;

// The second-derivative check (`create_graph`), over the same table.
mod second;

use netcl::autograd::{self, GradMode, Tape};
use netcl::{Result, Tensor};
use serde_json::Value;

use table::{Case, load};

/// The registration point: each family's dispatch, tried in turn. A family
/// returns `None` for an op it does not know. Every dispatch calls the
/// `try_` form of its op (or an op that cannot fail).
fn dispatch(op: &str, args: &Value, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
    type Family = fn(&str, &Value, &[Tensor]) -> Option<Result<Vec<Tensor>>>;
    const FAMILIES: &[Family] = &[core::run, shape::run, elem::run, conv::run, norm::run];
    FAMILIES
        .iter()
        .find_map(|family| family(op, args, inputs))
        .unwrap_or_else(|| panic!("no family dispatches op {op:?}: add it to tests/ops/"))
}

/// Runs a case on fresh leaves (requiring grad as the case says when `grad`).
fn run(case: &Case, grad: bool) -> (Vec<Tensor>, Vec<Tensor>) {
    let leaves = case.leaves(grad);
    let outputs = dispatch(&case.op, &case.args, &case.prepared(&leaves))
        .unwrap_or_else(|e| panic!("{}: {e}", case.label()));
    (leaves, outputs)
}

/// `L = Σ_k r_k y_k` over the outputs that have a weighting, as a tensor.
fn weighted_loss(case: &Case, outputs: &[Tensor]) -> Option<Tensor> {
    outputs
        .iter()
        .zip(&case.weights)
        .filter_map(|(y, r)| {
            let r = Tensor::from_vec(r.clone()?, y.shape()).expect("weights of the output's shape");
            y.requires_grad().then(|| (y * &r).sum())
        })
        .reduce(|a, b| a + b)
}

/// `L` in f64 from plain values, for finite differences.
fn weighted_value(case: &Case, outputs: &[Tensor]) -> f64 {
    outputs
        .iter()
        .zip(&case.weights)
        .filter_map(|(y, r)| {
            let r = r.as_ref()?;
            Some(
                y.to_vec()
                    .iter()
                    .zip(r)
                    .map(|(&y, &r)| f64::from(y) * f64::from(r))
                    .sum::<f64>(),
            )
        })
        .sum()
}

/// The gradient of `L` with respect to each leaf that requires grad.
fn gradients(case: &Case) -> Vec<Option<Vec<f32>>> {
    let (leaves, outputs) = run(case, true);
    let Some(loss) = weighted_loss(case, &outputs) else {
        return vec![None; leaves.len()];
    };
    let wrt: Vec<&Tensor> = leaves.iter().filter(|l| l.requires_grad()).collect();
    let mut grads = autograd::grad(&[&loss], &wrt)
        .unwrap_or_else(|e| panic!("{}: backward: {e}", case.label()))
        .into_iter();
    leaves
        .iter()
        .map(|l| {
            l.requires_grad()
                .then(|| grads.next().expect("one per leaf").to_vec())
        })
        .collect()
}

fn close(got: f64, want: f64, atol: f64, rtol: f64) -> bool {
    if want.is_nan() {
        return got.is_nan();
    }
    if want.is_infinite() {
        return got == want;
    }
    (got - want).abs() <= atol + rtol * want.abs()
}

fn compare(
    what: &str,
    got: &[f32],
    got_shape: &[usize],
    want: &table::Expected,
    atol: f64,
    rtol: f64,
) -> Option<String> {
    if got_shape != want.shape.as_slice() {
        return Some(format!(
            "{what}: shape {got_shape:?}, PyTorch {:?}",
            want.shape
        ));
    }
    let bad: Vec<String> = got
        .iter()
        .zip(&want.data)
        .enumerate()
        .filter(|&(_, (&g, &w))| !close(f64::from(g), w, atol, rtol))
        .take(4)
        .map(|(i, (g, w))| format!("[{i}] netcl {g} torch {w}"))
        .collect();
    (!bad.is_empty()).then(|| format!("{what}: {}", bad.join(", ")))
}

fn report(failures: Vec<String>, checked: usize, what: &str) {
    println!("{what}: {checked} cases checked");
    assert!(
        failures.is_empty(),
        "{} of {checked} cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(checked > 0, "{what}: no case checked");
}

#[test]
fn fixtures_record_their_provenance() {
    for entry in std::fs::read_dir(table::fixtures_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "json") {
            let doc: Value =
                serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            for key in ["torch_version", "generator_sha256", "family_sha256"] {
                assert!(doc[key].is_string(), "{}: no {key}", path.display());
            }
        }
    }
}

#[test]
fn values_and_gradients_match_pytorch() {
    let cases = load();
    let mut failures = Vec::new();
    for case in &cases {
        let (_, outputs) = run(case, true);
        if outputs.len() != case.outputs.len() {
            failures.push(format!(
                "{}: {} outputs, PyTorch {}",
                case.label(),
                outputs.len(),
                case.outputs.len()
            ));
            continue;
        }
        for (k, (y, want)) in outputs.iter().zip(&case.outputs).enumerate() {
            if let Some(f) = compare(
                &format!("{} output {k}", case.label()),
                &y.to_vec(),
                y.shape(),
                want,
                case.atol,
                case.rtol,
            ) {
                failures.push(f);
            }
        }
        for (i, (got, want)) in gradients(case).iter().zip(&case.grads).enumerate() {
            match (got, want) {
                (Some(g), Some(w)) => {
                    if let Some(f) = compare(
                        &format!("{} grad {i}", case.label()),
                        g,
                        &case.inputs[i].shape,
                        w,
                        case.atol,
                        case.rtol,
                    ) {
                        failures.push(f);
                    }
                }
                (None, None) => {}
                _ => failures.push(format!(
                    "{}: input {i} has a gradient on one side only",
                    case.label()
                )),
            }
        }
    }
    report(failures, cases.len(), "PyTorch comparison");
}

#[test]
fn gradients_match_finite_differences() {
    const STEP: f32 = 1e-2;
    const ATOL: f64 = 1e-3;
    const RTOL: f64 = 5e-3;
    let cases: Vec<Case> = load().into_iter().filter(|c| c.fd).collect();
    let mut failures = Vec::new();
    for case in &cases {
        let analytic = gradients(case);
        let _guard = autograd::no_grad();
        for (i, grad) in analytic.iter().enumerate() {
            let Some(grad) = grad else { continue };
            let eval = |j: usize, v: f32| {
                let mut leaves = case.leaves(false);
                let mut values = case.inputs[i].data.clone();
                values[j] = v;
                leaves[i] = Tensor::from_vec(values, &case.inputs[i].shape).unwrap();
                let outputs = dispatch(&case.op, &case.args, &case.prepared(&leaves)).unwrap();
                weighted_value(case, &outputs)
            };
            for (j, &a) in grad.iter().enumerate() {
                let x = case.inputs[i].data[j];
                if !x.is_finite() {
                    // No difference quotient at an infinite input (an
                    // additive mask's -inf): x ± step is x.
                    continue;
                }
                let (plus, minus) = (x + STEP, x - STEP);
                let numeric =
                    (eval(j, plus) - eval(j, minus)) / (f64::from(plus) - f64::from(minus));
                if !close(f64::from(a), numeric, ATOL, RTOL) {
                    failures.push(format!(
                        "{} input {i} element {j}: analytic {a}, numeric {numeric}",
                        case.label()
                    ));
                }
            }
        }
    }
    report(failures, cases.len(), "finite differences");
}

#[test]
fn no_grad_records_nothing_and_computes_the_same() {
    let cases = load();
    let mut failures = Vec::new();
    for case in &cases {
        let tape = Tape::new();
        GradMode::current().with_tape(tape.clone()).run(|| {
            let (leaves, with_grad) = run(case, true);
            let recorded = tape.len();
            let _guard = autograd::no_grad();
            let outputs = dispatch(&case.op, &case.args, &case.prepared(&leaves)).unwrap();
            if tape.len() != recorded {
                failures.push(format!(
                    "{}: recorded {} nodes under no_grad",
                    case.label(),
                    tape.len() - recorded
                ));
            }
            for (k, (a, b)) in outputs.iter().zip(&with_grad).enumerate() {
                if a.requires_grad() || a.grad_fn().is_some() {
                    failures.push(format!(
                        "{}: output {k} has a graph under no_grad",
                        case.label()
                    ));
                }
                let same = a.shape() == b.shape()
                    && a.to_vec()
                        .iter()
                        .zip(b.to_vec())
                        .all(|(x, y)| x.to_bits() == y.to_bits());
                if !same {
                    failures.push(format!(
                        "{}: output {k} differs under no_grad",
                        case.label()
                    ));
                }
            }
        });
    }
    report(failures, cases.len(), "no_grad");
}

/// Shapes near each input's: one axis fewer, one more, a length changed,
/// and empty. A `try_` form must return for every one of them.
fn mangled_shapes(shape: &[usize]) -> Vec<Vec<usize>> {
    let mut out = vec![vec![], shape.to_vec()];
    if !shape.is_empty() {
        out.push(shape[1..].to_vec());
        let mut zero = shape.to_vec();
        zero[0] = 0;
        out.push(zero);
        let mut longer = shape.to_vec();
        *longer.last_mut().unwrap() += 1;
        out.push(longer);
    }
    out.push([&[2][..], shape].concat());
    out
}

#[test]
fn try_forms_never_panic_on_bad_shapes() {
    let cases = load();
    let mut failures = Vec::new();
    let mut calls = 0;
    for case in &cases {
        for i in 0..case.inputs.len() {
            for shape in mangled_shapes(&case.inputs[i].shape) {
                let mut leaves = case.leaves(true);
                let n: usize = shape.iter().product();
                // Values that are valid indices and mask entries (0, 1)
                // reach past the shape checks into the op itself.
                let values = (0..n).map(|k| (k % 2) as f32).collect();
                leaves[i] = Tensor::from_vec(values, &shape)
                    .unwrap()
                    .requires_grad_(case.inputs[i].requires_grad);
                calls += 1;
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    dispatch(&case.op, &case.args, &leaves).map(|outputs| {
                        if let Some(loss) = weighted_loss_any(&outputs) {
                            let _ = loss.try_backward();
                        }
                    })
                }));
                if result.is_err() {
                    failures.push(format!(
                        "{}: panicked with input {i} of shape {shape:?}",
                        case.label()
                    ));
                }
            }
        }
    }
    println!("{calls} calls with mangled shapes");
    report(failures, cases.len(), "try_ forms");
}

/// `Σ y` over the outputs that require grad (for the mangled-shape check,
/// whose outputs have no fixture weighting).
fn weighted_loss_any(outputs: &[Tensor]) -> Option<Tensor> {
    outputs
        .iter()
        .filter(|y| y.requires_grad())
        .map(Tensor::sum)
        .reduce(|a, b| a + b)
}

#[test]
fn ops_in_parallel_tasks_give_the_same_bits() {
    let cases = load();
    let here: Vec<Vec<Vec<u32>>> = cases.iter().map(bits).collect();
    let there: Vec<Vec<Vec<u32>>> = netcl::parallel::map(&cases, bits);
    let failures: Vec<String> = cases
        .iter()
        .zip(here.iter().zip(&there))
        .filter(|(_, (a, b))| a != b)
        .map(|(c, _)| format!("{}: differs in a parallel task", c.label()))
        .collect();
    report(failures, cases.len(), "parallel tasks");
}

/// The bits of a case's outputs and gradients.
fn bits(case: &Case) -> Vec<Vec<u32>> {
    let (_, outputs) = run(case, true);
    let mut all: Vec<Vec<u32>> = outputs
        .iter()
        .map(|y| y.to_vec().iter().map(|v| v.to_bits()).collect())
        .collect();
    for g in gradients(case).into_iter().flatten() {
        all.push(g.iter().map(|v| v.to_bits()).collect());
    }
    all
}
