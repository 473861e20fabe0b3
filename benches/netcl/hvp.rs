//! Higher-order gradients: a Hessian-vector product of the 784-256-256-10
//! tanh MLP (cross-entropy) at batch 32 by double backward
//! (`grad_with(create_graph)`, then the gradient of `g · v`), beside one
//! forward+backward of the same model: the target is
//! `hvp ≤ 3.5 × fwd_bwd` (PyTorch 2.15 measured 3.3x). One thread.

use criterion::Criterion;
use std::hint::black_box;

use netcl::Tensor;
use netcl::rand::SeedableRng;
use netcl::rand::rngs::StdRng;

use crate::common::{
    batch, iter_in, pool, tanh_fwd_bwd as fwd_bwd, tanh_hvp as hvp, tanh_mlp_params as params,
};

pub fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("hvp");
    let (x, y) = batch(32, 784, 10, 3);
    let params = params(&[784, 256, 256, 10], 4);
    let mut rng = StdRng::seed_from_u64(5);
    let v: Vec<Tensor> = params
        .iter()
        .map(|p| Tensor::randn(p.shape(), &mut rng))
        .collect();
    let pool = pool(1);
    group.bench_function("fwd_bwd_b32_1t", |bench| {
        iter_in(bench, &pool, || fwd_bwd(&params, black_box(&x), &y))
    });
    group.bench_function("hvp_b32_1t", |bench| {
        iter_in(bench, &pool, || hvp(&params, &v, black_box(&x), &y))
    });
    group.finish();
}
