//! Higher-order gradients: a Hessian-vector product of the 784-256-256-10
//! tanh MLP (cross-entropy) at batch 32 by double backward
//! (`grad_with(create_graph)`, then the gradient of `g · v`), beside one
//! forward+backward of the same model: the target is
//! `hvp ≤ 3.5 × fwd_bwd` (PyTorch 2.15 measured 3.3x). One thread.

use criterion::Criterion;
use std::hint::black_box;

use netcl::Tensor;
use netcl::autograd::{self, BackwardOptions};
use netcl::rand::SeedableRng;
use netcl::rand::rngs::StdRng;

use crate::common::{batch, iter_in, pool};

/// The parameters `[w1, b1, w2, b2, w3, b3]` of a tanh MLP (`[in, out]`
/// weights, as netcl's `Linear`).
fn params(sizes: &[usize], seed: u64) -> Vec<Tensor> {
    let mut rng = StdRng::seed_from_u64(seed);
    sizes
        .windows(2)
        .flat_map(|pair| {
            let scale = 1.0 / (pair[0] as f32).sqrt();
            [
                (Tensor::randn(&[pair[0], pair[1]], &mut rng) * scale).requires_grad_(true),
                Tensor::zeros(&[pair[1]]).requires_grad_(true),
            ]
        })
        .collect()
}

fn loss(params: &[Tensor], x: &Tensor, y: &Tensor) -> Tensor {
    let mut h = x.clone();
    let layers = params.len() / 2;
    for (i, layer) in params.chunks(2).enumerate() {
        h = h.linear(&layer[0], Some(&layer[1]));
        if i + 1 < layers {
            h = h.tanh();
        }
    }
    h.cross_entropy(y)
}

/// One forward and backward, the gradients returned.
pub fn fwd_bwd(params: &[Tensor], x: &Tensor, y: &Tensor) -> Vec<Tensor> {
    let refs: Vec<&Tensor> = params.iter().collect();
    autograd::grad(&[&loss(params, x, y)], &refs).unwrap()
}

/// The Hessian-vector product `H v` by double backward.
pub fn hvp(params: &[Tensor], v: &[Tensor], x: &Tensor, y: &Tensor) -> Vec<Tensor> {
    let refs: Vec<&Tensor> = params.iter().collect();
    let create = BackwardOptions::new().create_graph(true);
    let grads = autograd::grad_with(&[&loss(params, x, y)], &refs, &create).unwrap();
    let dot = grads
        .iter()
        .zip(v)
        .map(|(g, v)| (g.as_ref().unwrap() * v).sum())
        .reduce(|a, b| a + b)
        .unwrap();
    autograd::grad(&[&dot], &refs).unwrap()
}

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
