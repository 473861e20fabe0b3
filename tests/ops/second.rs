//! Second derivatives over the sample table: for every case where central
//! differences apply, the Hessian-vector product of `L₂ = Σ_k r_k ⊙ y_k²`
//! (a loss whose Hessian involves both the op's first and second
//! derivatives) computed by double backward (`grad_with` with
//! `create_graph`, then the gradient of `∇L₂ · v`), against central
//! differences of the first derivative along `v`,
//! `(∇L₂(x + εv) - ∇L₂(x - εv)) / 2ε`, in f64. An op without a
//! differentiable backward fails here with `Error::NotDifferentiable`: a
//! new op's table entry is also its second-derivative check.
//!
//! The same products are compared with PyTorch's double backward in float64
//! (`tests/fixtures/hvp_<family>.json`, written by
//! `scripts/torch_hvp_fixtures.py` from the committed table, with its own
//! directions `v`).

use std::cell::RefCell;
use std::collections::BTreeSet;

use netcl::autograd::{self, BackwardOptions};
use netcl::{Error, Tensor};
use serde_json::Value;

use super::table::{Case, fixtures_dir, load};
use super::{dispatch, report};

/// The ops of the ops issue whose differentiable backward is not written
/// yet: `create_graph` through them fails with `Error::NotDifferentiable`
/// (never a silent zero), and these checks skip their cases. Each must
/// still fail that way (a listed op that gained a differentiable backward
/// fails [`pending_ops_are_still_pending`] until it leaves the list). The
/// list only shrinks, and is empty now: every op of the table has a
/// differentiable backward, and a new op comes with its own.
const PENDING: &[&str] = &[];

/// Cases whose point sits on a kink of the first derivative (a tie of
/// `minimum`'s operands: `x[1, 0] = y[0] = 0.5`), where the gradient jumps
/// and central differences of it measure the jump (`jump / 2ε`), not a
/// second derivative. Their Hessian-vector products are still compared
/// with PyTorch's, and their first derivatives with differences.
const KINKED: &[&str] = &["elem/minimum"];

thread_local! {
    /// The pending ops this thread's checks found still pending.
    static STILL_PENDING: RefCell<BTreeSet<&'static str>> = const { RefCell::new(BTreeSet::new()) };
}

/// Why a case's double backward gave no product.
enum Skip {
    /// The case has no loss to differentiate (no output with a weighting).
    NoLoss,
    /// An op of [`PENDING`] was reached.
    Pending,
    /// A failure.
    Failed(String),
}

/// Sorts a `create_graph` error: a pending op is skipped (and noted),
/// anything else fails.
fn create_graph_error(error: Error) -> Skip {
    match error {
        Error::NotDifferentiable { op } if PENDING.contains(&op) => {
            STILL_PENDING.with(|seen| seen.borrow_mut().insert(op));
            Skip::Pending
        }
        error => Skip::Failed(format!("backward with create_graph: {error}")),
    }
}

/// `L₂` over the outputs that have a weighting and a graph.
fn squared_loss(case: &Case, outputs: &[Tensor]) -> Option<Tensor> {
    outputs
        .iter()
        .zip(&case.weights)
        .filter_map(|(y, r)| {
            let r = Tensor::from_vec(r.clone()?, y.shape()).expect("weights of the output's shape");
            y.requires_grad().then(|| (&(y * y) * &r).sum())
        })
        .reduce(|a, b| a + b)
}

/// A fixed direction for input `i` of `n` values, in `[-1, 1]`.
fn direction(i: usize, n: usize) -> Vec<f32> {
    (0..n)
        .map(|k| ((k as f32 + 1.0) * 1.618 + i as f32 * 0.7).sin())
        .collect()
}

/// Leaves with the case's values moved by `step · v` along the inputs that
/// require grad.
fn shifted(case: &Case, v: &[Option<Vec<f32>>], step: f32) -> Vec<Tensor> {
    case.inputs
        .iter()
        .zip(v)
        .map(|(input, v)| {
            let values = match v {
                Some(v) => input
                    .data
                    .iter()
                    .zip(v)
                    .map(|(x, v)| x + step * v)
                    .collect(),
                None => input.data.clone(),
            };
            Tensor::from_vec(values, &input.shape)
                .unwrap()
                .requires_grad_(input.requires_grad)
        })
        .collect()
}

/// `∇L₂` (array path) at `leaves`, for the leaves that require grad.
fn gradient(case: &Case, leaves: &[Tensor]) -> Option<Vec<Vec<f32>>> {
    let outputs = dispatch(&case.op, &case.args, &case.prepared(leaves)).ok()?;
    let loss = squared_loss(case, &outputs)?;
    let wrt: Vec<&Tensor> = leaves.iter().filter(|l| l.requires_grad()).collect();
    let grads = autograd::grad(&[&loss], &wrt).ok()?;
    Some(grads.iter().map(Tensor::to_vec).collect())
}

/// The Hessian-vector product by double backward, or why there is none.
fn double_backward(case: &Case, v: &[Option<Vec<f32>>]) -> Result<Vec<Vec<f32>>, Skip> {
    let failed = |what: &str, e: Error| Skip::Failed(format!("{what}: {e}"));
    let leaves = shifted(case, v, 0.0);
    let outputs = dispatch(&case.op, &case.args, &case.prepared(&leaves))
        .map_err(|e| failed("forward", e))?;
    let loss = squared_loss(case, &outputs).ok_or(Skip::NoLoss)?;
    let wrt: Vec<&Tensor> = leaves.iter().filter(|l| l.requires_grad()).collect();
    let create = BackwardOptions::new().create_graph(true);
    let grads = autograd::grad_with(&[&loss], &wrt, &create).map_err(create_graph_error)?;
    let dot = grads
        .iter()
        .zip(v.iter().flatten())
        .map(|(g, v)| {
            let g = g.as_ref().expect("zeros for unused inputs");
            (g * &Tensor::from_vec(v.clone(), g.shape()).unwrap()).sum()
        })
        .reduce(|a, b| a + b)
        .ok_or(Skip::NoLoss)?;
    if !dot.requires_grad() {
        // The gradient does not depend on the inputs: a zero Hessian.
        return Ok(wrt.iter().map(|x| vec![0.0; x.numel()]).collect());
    }
    let hv = autograd::grad(&[&dot], &wrt).map_err(|e| failed("second backward", e))?;
    Ok(hv.iter().map(Tensor::to_vec).collect())
}

#[test]
fn second_derivatives_match_finite_differences() {
    const STEP: f32 = 1e-2;
    const TOL: f64 = 2e-2;
    let cases: Vec<Case> = load()
        .into_iter()
        .filter(|c| c.fd && !KINKED.contains(&c.label().as_str()))
        .collect();
    let mut failures = Vec::new();
    for case in &cases {
        let v: Vec<Option<Vec<f32>>> = case
            .inputs
            .iter()
            .enumerate()
            .map(|(i, input)| input.requires_grad.then(|| direction(i, input.data.len())))
            .collect();
        let analytic = match double_backward(case, &v) {
            Ok(hv) => hv,
            Err(Skip::Failed(e)) => {
                failures.push(format!("{}: {e}", case.label()));
                continue;
            }
            Err(Skip::NoLoss | Skip::Pending) => continue,
        };
        let (Some(plus), Some(minus)) = (
            gradient(case, &shifted(case, &v, STEP)),
            gradient(case, &shifted(case, &v, -STEP)),
        ) else {
            failures.push(format!("{}: finite differences failed", case.label()));
            continue;
        };
        for (i, ((a, p), m)) in analytic.iter().zip(&plus).zip(&minus).enumerate() {
            let numeric: Vec<f64> = p
                .iter()
                .zip(m)
                .map(|(&p, &m)| (f64::from(p) - f64::from(m)) / (2.0 * f64::from(STEP)))
                .collect();
            let scale = numeric.iter().fold(1.0_f64, |s, n| s.max(n.abs()));
            let bad: Vec<String> = a
                .iter()
                .zip(&numeric)
                .enumerate()
                .filter(|&(_, (&a, &n))| (f64::from(a) - n).abs() > TOL * scale)
                .take(4)
                .map(|(k, (a, n))| format!("[{k}] double backward {a}, differences {n}"))
                .collect();
            if !bad.is_empty() {
                failures.push(format!(
                    "{} HVP of grad input {i}: {}",
                    case.label(),
                    bad.join(", ")
                ));
            }
        }
    }
    report(failures, cases.len(), "second derivatives");
}

/// A JSON number, or "inf", "-inf", "nan".
fn number(v: &Value) -> f64 {
    match v {
        Value::String(s) => s.parse().expect("inf, -inf or nan"),
        v => v.as_f64().expect("a number"),
    }
}

fn numbers(v: &Value) -> Option<Vec<f64>> {
    v.as_array().map(|a| a.iter().map(number).collect())
}

#[test]
fn second_derivatives_match_pytorch() {
    const TOL: f64 = 1e-3;
    let table = load();
    let mut failures = Vec::new();
    let mut checked = 0;
    for entry in std::fs::read_dir(fixtures_dir()).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if !(name.starts_with("hvp_") && name.ends_with(".json")) {
            continue;
        }
        let doc: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let family = doc["family"].as_str().expect("family");
        for record in doc["cases"].as_array().expect("cases") {
            let case_name = record["name"].as_str().expect("name");
            let Some(case) = table
                .iter()
                .find(|c| c.family == family && c.name == case_name)
            else {
                failures.push(format!("{family}/{case_name}: not in the table"));
                continue;
            };
            checked += 1;
            let v: Vec<Option<Vec<f32>>> = record["v"]
                .as_array()
                .expect("v")
                .iter()
                .map(|v| numbers(v).map(|v| v.into_iter().map(|x| x as f32).collect()))
                .collect();
            let analytic = match double_backward(case, &v) {
                Ok(hv) => hv,
                Err(Skip::Failed(e)) => {
                    failures.push(format!("{}: {e}", case.label()));
                    continue;
                }
                Err(Skip::NoLoss | Skip::Pending) => continue,
            };
            let torch: Vec<Vec<f64>> = record["hvp"]
                .as_array()
                .expect("hvp")
                .iter()
                .filter_map(numbers)
                .collect();
            for (i, (a, t)) in analytic.iter().zip(&torch).enumerate() {
                let scale = t.iter().fold(1.0_f64, |s, t| s.max(t.abs()));
                let bad: Vec<String> = a
                    .iter()
                    .zip(t)
                    .enumerate()
                    .filter(|&(_, (&a, &t))| (f64::from(a) - t).abs() > TOL * scale)
                    .take(4)
                    .map(|(k, (a, t))| format!("[{k}] netcl {a}, torch {t}"))
                    .collect();
                if !bad.is_empty() {
                    failures.push(format!(
                        "{} HVP of grad input {i}: {}",
                        case.label(),
                        bad.join(", ")
                    ));
                }
            }
        }
    }
    report(failures, checked, "second derivatives against PyTorch");
}

/// The recorded backward (`create_graph`) and the array backward give the
/// same first derivative, on every case of the table.
#[test]
fn recorded_and_array_backwards_agree() {
    let cases = load();
    let mut failures = Vec::new();
    for case in &cases {
        let run = |create_graph: bool| -> Result<Vec<Vec<f32>>, Skip> {
            let leaves = case.leaves(true);
            let outputs = dispatch(&case.op, &case.args, &case.prepared(&leaves))
                .map_err(|e| Skip::Failed(format!("forward: {e}")))?;
            let Some(loss) = super::weighted_loss(case, &outputs) else {
                return Ok(Vec::new());
            };
            let wrt: Vec<&Tensor> = leaves.iter().filter(|l| l.requires_grad()).collect();
            let options = BackwardOptions::new().create_graph(create_graph);
            let grads = autograd::grad_with(&[&loss], &wrt, &options).map_err(|e| {
                if create_graph {
                    create_graph_error(e)
                } else {
                    Skip::Failed(format!("backward: {e}"))
                }
            })?;
            Ok(grads.iter().flatten().map(Tensor::to_vec).collect())
        };
        let (recorded, array) = match (run(true), run(false)) {
            (Ok(r), Ok(a)) => (r, a),
            (Err(Skip::Failed(e)), _) | (_, Err(Skip::Failed(e))) => {
                failures.push(format!("{}: {e}", case.label()));
                continue;
            }
            _ => continue,
        };
        for (i, (r, a)) in recorded.iter().zip(&array).enumerate() {
            let bad = r.iter().zip(a).any(|(&r, &a)| {
                let same_nan = r.is_nan() && a.is_nan();
                !same_nan && r != a && (r - a).abs() > 1e-5 * (1.0 + a.abs())
            });
            if bad {
                failures.push(format!(
                    "{} grad {i}: recorded {r:?}, array {a:?}",
                    case.label()
                ));
            }
        }
    }
    report(failures, cases.len(), "recorded against array backward");
}

/// Every op of [`PENDING`] still has no differentiable backward: one that
/// gained one leaves the list (so that its cases are checked).
#[test]
fn pending_ops_are_still_pending() {
    for case in &load() {
        let leaves = case.leaves(true);
        let Ok(outputs) = dispatch(&case.op, &case.args, &case.prepared(&leaves)) else {
            continue;
        };
        let Some(loss) = squared_loss(case, &outputs) else {
            continue;
        };
        let wrt: Vec<&Tensor> = leaves.iter().filter(|l| l.requires_grad()).collect();
        if let Err(e) =
            autograd::grad_with(&[&loss], &wrt, &BackwardOptions::new().create_graph(true))
        {
            let _ = create_graph_error(e);
        }
    }
    let seen = STILL_PENDING.with(|seen| seen.borrow().clone());
    let done: Vec<&&str> = PENDING.iter().filter(|op| !seen.contains(*op)).collect();
    assert!(
        done.is_empty(),
        "these ops have a differentiable backward now (or no case in the table): remove them from PENDING in tests/ops/second.rs: {done:?}"
    );
}
