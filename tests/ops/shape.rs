//! Dispatch for the `shape` family: layout ops (src/ops/layout.rs) and
//! indexing ops (src/ops/index.rs).

use netcl::functional as F;
use netcl::{Result, Tensor};
use serde_json::Value;

use crate::table::Args;

pub fn run(op: &str, a: &Value, x: &[Tensor]) -> Option<Result<Vec<Tensor>>> {
    let one = |t: Result<Tensor>| Some(t.map(|t| vec![t]));
    let all: Vec<&Tensor> = x.iter().collect();
    match op {
        "permute" => one(x[0].try_permute(&a.isizes("dims"))),
        "unsqueeze" => one(x[0].try_unsqueeze(a.isize("dim"))),
        "squeeze" => one(x[0].try_squeeze(a.isize("dim"))),
        "squeeze_all" => one(Ok(x[0].squeeze_all())),
        "flatten" => one(x[0].try_flatten(a.isize("start"), a.isize("end"))),
        "expand" => one(x[0].try_expand(&a.isizes("sizes"))),
        "broadcast_to" => one(x[0].try_broadcast_to(&a.usizes("shape"))),
        "cat" => one(F::try_cat(&all, a.isize("dim"))),
        "stack" => one(F::try_stack(&all, a.isize("dim"))),
        "narrow" => one(x[0].try_narrow(a.isize("dim"), a.isize("start"), a.usize("length"))),
        "split" => Some(x[0].try_split(a.usize("size"), a.isize("dim"))),
        "split_sizes" => Some(x[0].try_split_sizes(&a.usizes("sizes"), a.isize("dim"))),
        "chunk" => Some(x[0].try_chunk(a.usize("chunks"), a.isize("dim"))),
        "select" => one(x[0].try_select(a.isize("dim"), a.isize("index"))),
        "unbind" => Some(x[0].try_unbind(a.isize("dim"))),
        "index_select" => one(x[0].try_index_select(a.isize("dim"), &x[1])),
        "gather" => one(x[0].try_gather(a.isize("dim"), &x[1])),
        "embedding" => one(F::try_embedding(&x[0], &x[1])),
        "masked_fill" => one(x[0].try_masked_fill(&x[1], a.f32("value"))),
        "where" => one(F::try_where_(&x[0], &x[1], &x[2])),
        "where_method" => one(x[0].try_where_(&x[1], &x[2])),
        _ => None,
    }
}
