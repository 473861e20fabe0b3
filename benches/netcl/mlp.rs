//! One training step of 784-256-256-10 (ReLU, cross-entropy, SGD) at batch
//! 32 and 128, on 1 and 2 threads.

use criterion::{BenchmarkId, Criterion};
use std::hint::black_box;

use crate::common::{batch, iter_in, mlp, pool, sgd, train_step};

pub fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("mlp_step");
    for batch_size in [32, 128] {
        let (x, y) = batch(batch_size, 784, 10, 3);
        for threads in [1, 2] {
            let model = mlp(&[784, 256, 256, 10], 4);
            let mut optimizer = sgd(&model, 1e-3);
            let pool = pool(threads);
            group.bench_function(
                BenchmarkId::new(format!("batch{batch_size}"), format!("{threads}t")),
                |bench| {
                    iter_in(bench, &pool, || {
                        train_step(&model, &mut optimizer, black_box(&x), &y)
                    })
                },
            );
        }
    }
    group.finish();
}
