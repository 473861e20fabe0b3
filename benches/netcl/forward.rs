//! A no_grad forward of 784-256-256-10 at batch 256 against the same
//! forward in raw ndarray, on one thread.

use criterion::Criterion;
use netcl::autograd;
use netcl::nn::Module;
use std::hint::black_box;

use crate::common::{batch, iter_in, mlp, pool, raw, raw_forward};

pub fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("forward");
    let model = mlp(&[784, 256, 256, 10], 1);
    let raw = raw(&model);
    let (x, _) = batch(256, 784, 10, 2);
    let x_raw = x.to_array().into_dimensionality::<ndarray::Ix2>().unwrap();
    let pool = pool(1);
    group.bench_function("mlp784_b256/no_grad", |bench| {
        iter_in(bench, &pool, || {
            let _guard = autograd::no_grad();
            model.forward(black_box(&x)).unwrap()
        })
    });
    group.bench_function("mlp784_b256/raw_ndarray", |bench| {
        iter_in(bench, &pool, || raw_forward(&raw, black_box(x_raw.view())))
    });
    group.finish();
}
