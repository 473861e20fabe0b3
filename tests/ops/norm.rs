//! Dispatch for the `norm` family: layer_norm, rms_norm, batch_norm and
//! scaled_dot_product_attention (`scripts/fixtures/norm.py`).

use netcl::functional::{self as F, AttnMask};
use netcl::{Result, Tensor};
use serde_json::Value;

use crate::table::Args;

/// The optional `f32` argument `key` (JSON null is `None`).
fn opt_f32(a: &Value, key: &str) -> Option<f32> {
    a.has(key).then(|| a.f32(key))
}

pub fn run(op: &str, a: &Value, x: &[Tensor]) -> Option<Result<Vec<Tensor>>> {
    let one = |t: Result<Tensor>| Some(t.map(|t| vec![t]));
    // The optional weight and bias follow the fixed inputs, in that order.
    let affine = |first: usize| {
        let weight = a.bool("weight").then(|| &x[first]);
        let bias =
            (a.has("bias") && a.bool("bias")).then(|| &x[first + usize::from(weight.is_some())]);
        (weight, bias)
    };
    match op {
        "layer_norm" => {
            let (w, b) = affine(1);
            one(F::try_layer_norm(
                &x[0],
                &a.usizes("normalized_shape"),
                w,
                b,
                a.f32("eps"),
            ))
        }
        "rms_norm" => {
            let (w, _) = affine(1);
            one(F::try_rms_norm(
                &x[0],
                &a.usizes("normalized_shape"),
                w,
                opt_f32(a, "eps"),
            ))
        }
        "batch_norm" => {
            let (w, b) = affine(3);
            let running = a.bool("running");
            let out = F::try_batch_norm(
                &x[0],
                running.then(|| &x[1]),
                running.then(|| &x[2]),
                w,
                b,
                a.bool("training"),
                a.f32("momentum"),
                a.f32("eps"),
            );
            Some(out.map(|out| {
                [Some(out.output), out.running_mean, out.running_var]
                    .into_iter()
                    .flatten()
                    .collect()
            }))
        }
        "sdpa" => {
            let mask = match a["mask"].as_str() {
                Some("bool") => Some(AttnMask::Bool(&x[3])),
                Some("additive") => Some(AttnMask::Additive(&x[3])),
                _ => None,
            };
            one(F::try_scaled_dot_product_attention(
                &x[0],
                &x[1],
                &x[2],
                mask,
                a.bool("causal"),
                opt_f32(a, "scale"),
            ))
        }
        _ => None,
    }
}
