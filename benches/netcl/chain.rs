//! A 10-op chain on 1-element tensors, forward plus backward.

use criterion::Criterion;
use netcl::Tensor;
use std::hint::black_box;

pub fn bench(c: &mut Criterion) {
    let x = Tensor::full(&[1], 0.5).requires_grad_(true);
    let w = Tensor::full(&[1], 1.01).requires_grad_(true);
    c.bench_function("chain10/forward_backward", |bench| {
        bench.iter(|| {
            let mut y = black_box(&x).clone();
            for i in 0..10 {
                y = if i % 2 == 0 { &y * &w } else { &y + &w };
            }
            y.backward();
            black_box(&y);
        });
        x.zero_grad();
        w.zero_grad();
    });
}
