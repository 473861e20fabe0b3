//! Dispatch for the `core` family: the ops netcl had before the ops issue.

use netcl::{Result, Tensor};
use serde_json::Value;

use crate::table::Args;

pub fn run(op: &str, a: &Value, x: &[Tensor]) -> Option<Result<Vec<Tensor>>> {
    let one = |t: Result<Tensor>| Some(t.map(|t| vec![t]));
    match op {
        "exp" => one(Ok(x[0].exp())),
        "tanh" => one(Ok(x[0].tanh())),
        "sigmoid" => one(Ok(x[0].sigmoid())),
        "neg" => one(Ok(x[0].neg())),
        "log" => one(Ok(x[0].log())),
        "relu" => one(Ok(x[0].relu())),
        "powf" => one(Ok(x[0].powf(a.f32("exponent")))),
        "add" => one(x[0].try_add(&x[1])),
        "mul" => one(x[0].try_mul(&x[1])),
        "div" => one(x[0].try_div(&x[1])),
        "matmul" => one(x[0].try_matmul(&x[1])),
        "linear" => one(x[0].try_linear(&x[1], x.get(2))),
        "sum_axis" => one(x[0].try_sum_axis(a.isize("axis"), a.bool("keepdim"))),
        "mean_axis" => one(x[0].try_mean_axis(a.isize("axis"), a.bool("keepdim"))),
        "max_axis" => one(x[0].try_max_axis(a.isize("axis"), a.bool("keepdim"))),
        "softmax" => one(x[0].try_softmax(a.isize("axis"))),
        "log_softmax" => one(x[0].try_log_softmax(a.isize("axis"))),
        "cross_entropy" => one(x[0].try_cross_entropy(&x[1])),
        "mse_loss" => one(x[0].try_mse_loss(&x[1])),
        _ => None,
    }
}
