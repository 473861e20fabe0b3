//! Dispatch for the `conv` family: convolution and pooling over NCHW
//! images (`scripts/fixtures/conv.py`).

use netcl::functional::{self as F, Size2};
use netcl::{Result, Tensor};
use serde_json::Value;

use crate::table::Args;

fn size2(a: &Value, key: &str) -> Size2 {
    let v = a.usizes(key);
    Size2(v[0], v[1])
}

fn stride(a: &Value) -> Option<Size2> {
    a.has("stride").then(|| size2(a, "stride"))
}

pub fn run(op: &str, a: &Value, x: &[Tensor]) -> Option<Result<Vec<Tensor>>> {
    let one = |t: Result<Tensor>| Some(t.map(|t| vec![t]));
    match op {
        "conv2d" => one(F::try_conv2d(
            &x[0],
            &x[1],
            x.get(2),
            size2(a, "stride"),
            size2(a, "padding"),
            size2(a, "dilation"),
            a.usize("groups"),
        )),
        "conv1d" => one(F::try_conv1d(
            &x[0],
            &x[1],
            x.get(2),
            a.usize("stride"),
            a.usize("padding"),
            a.usize("dilation"),
            a.usize("groups"),
        )),
        "max_pool2d" => one(F::try_max_pool2d(
            &x[0],
            size2(a, "kernel"),
            stride(a),
            size2(a, "padding"),
        )),
        "avg_pool2d" => one(F::try_avg_pool2d(
            &x[0],
            size2(a, "kernel"),
            stride(a),
            size2(a, "padding"),
            a.bool("count_include_pad"),
        )),
        "adaptive_avg_pool2d" => one(F::try_adaptive_avg_pool2d(&x[0], size2(a, "output_size"))),
        _ => None,
    }
}
