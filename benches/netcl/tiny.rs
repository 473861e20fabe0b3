//! Latency of one op on 1-element tensors: recorded, under no_grad, and the
//! same addition in raw ndarray.

use criterion::Criterion;
use ndarray::{ArrayD, IxDyn};
use netcl::{Tensor, autograd};
use std::hint::black_box;

pub fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("tiny");
    let a = Tensor::ones(&[1]).requires_grad_(true);
    let b = Tensor::ones(&[1]).requires_grad_(true);
    group.bench_function("add/grad", |bench| {
        bench.iter(|| black_box(&a) + black_box(&b))
    });
    group.bench_function("add/no_grad", |bench| {
        let _guard = autograd::no_grad();
        bench.iter(|| black_box(&a) + black_box(&b))
    });
    let x = ArrayD::<f32>::ones(IxDyn(&[1]));
    let y = ArrayD::<f32>::ones(IxDyn(&[1]));
    group.bench_function("add/raw_ndarray", |bench| {
        bench.iter(|| black_box(&x) + black_box(&y))
    });
    group.finish();
}
