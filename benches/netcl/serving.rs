//! Serving while training: the cost of publishing a model version (a fork:
//! O(1) per parameter) and of a training step that publishes after every
//! step (its next update writes each parameter into a new buffer, as the
//! published version holds the old one), beside the same step alone.

use criterion::{BenchmarkId, Criterion};
use std::hint::black_box;

use netcl::nn::Published;

use crate::common::{batch, mlp, sgd, train_step};

pub fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("publish");
    for (name, sizes) in [
        ("64-128-10", &[64, 128, 10][..]),
        ("784-256-256-10", &[784, 256, 256, 10][..]),
    ] {
        let model = mlp(sizes, 1);
        let published = Published::new(&model).unwrap();
        group.bench_function(BenchmarkId::new("publish", name), |bench| {
            bench.iter(|| published.publish(black_box(&model)).unwrap())
        });
        let (x, y) = batch(32, sizes[0], 10, 2);
        let mut optimizer = sgd(&model, 1e-3);
        group.bench_function(BenchmarkId::new("step", name), |bench| {
            bench.iter(|| train_step(&model, &mut optimizer, black_box(&x), &y))
        });
        group.bench_function(BenchmarkId::new("step_and_publish", name), |bench| {
            bench.iter(|| {
                let loss = train_step(&model, &mut optimizer, black_box(&x), &y);
                published.publish(&model).unwrap();
                loss
            })
        });
    }
    group.finish();
}
