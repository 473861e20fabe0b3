//! Dispatch for the `elem` family: activations, element-wise extrema,
//! reductions, matmul's 1-D rules (through `core`'s `matmul`) and losses.

use netcl::functional::{self as F, CrossEntropyOptions, NllLossOptions, Reduction};
use netcl::{Result, Tensor};
use serde_json::Value;

use crate::table::Args;

fn reduction(a: &Value) -> Reduction {
    match a["reduction"].as_str().unwrap_or("mean") {
        "none" => Reduction::None,
        "sum" => Reduction::Sum,
        "mean" => Reduction::Mean,
        other => panic!("reduction {other:?}"),
    }
}

fn ignore_index(a: &Value) -> Option<i64> {
    a["ignore_index"].as_i64()
}

fn flag(a: &Value, key: &str) -> bool {
    a[key].as_bool().unwrap_or(false)
}

fn bound(a: &Value, key: &str) -> Option<f32> {
    a.has(key).then(|| a.f32(key))
}

pub fn run(op: &str, a: &Value, x: &[Tensor]) -> Option<Result<Vec<Tensor>>> {
    let one = |t: Result<Tensor>| Some(t.map(|t| vec![t]));
    match op {
        "gelu" => one(Ok(x[0].gelu())),
        "gelu_tanh" => one(Ok(x[0].gelu_tanh())),
        "silu" => one(Ok(x[0].silu())),
        "erf" => one(Ok(x[0].erf())),
        "clamp" => one(x[0].try_clamp(bound(a, "min"), bound(a, "max"))),
        "maximum" => one(x[0].try_maximum(&x[1])),
        "minimum" => one(x[0].try_minimum(&x[1])),
        "logsumexp" => one(x[0].try_logsumexp(a.isize("axis"), a.bool("keepdim"))),
        "var" => one(x[0].try_var(a.isize("axis"), a.bool("unbiased"), a.bool("keepdim"))),
        "std" => one(x[0].try_std(a.isize("axis"), a.bool("unbiased"), a.bool("keepdim"))),
        "min_axis" => one(x[0].try_min_axis(a.isize("axis"), a.bool("keepdim"))),
        "cross_entropy_opts" => one(F::try_cross_entropy(
            &x[0],
            &x[1],
            CrossEntropyOptions {
                ignore_index: ignore_index(a),
                label_smoothing: a.f32("label_smoothing"),
                reduction: reduction(a),
            },
        )),
        "cross_entropy_with" => one(x[0].try_cross_entropy_with(
            &x[1],
            CrossEntropyOptions {
                ignore_index: ignore_index(a),
                label_smoothing: a.f32("label_smoothing"),
                reduction: reduction(a),
            },
        )),
        "nll_loss" => one(F::try_nll_loss(
            &x[0],
            &x[1],
            NllLossOptions {
                ignore_index: ignore_index(a),
                reduction: reduction(a),
            },
        )),
        "bce_logits" => one(F::try_binary_cross_entropy_with_logits(
            &x[0],
            &x[1],
            F::BceWithLogitsOptions {
                // Optional inputs after input and target, in this order.
                weight: flag(a, "weight").then(|| x[2].clone()),
                pos_weight: flag(a, "pos_weight").then(|| x[x.len() - 1].clone()),
                reduction: reduction(a),
            },
        )),
        _ => None,
    }
}
