//! One training step of 784-256-256-10 (ReLU, cross-entropy, SGD) at batch
//! 32 and 128, on 1 and 2 threads.

use criterion::{BenchmarkId, Criterion};
use std::hint::black_box;

use crate::common::{Mlp, batch, iter_in, pool};

pub fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("mlp_step");
    for batch_size in [32, 128] {
        let (x, y) = batch(batch_size, 784, 10, 3);
        for threads in [1, 2] {
            let model = Mlp::new(&[784, 256, 256, 10], 4);
            let pool = pool(threads);
            group.bench_function(
                BenchmarkId::new(format!("batch{batch_size}"), format!("{threads}t")),
                |bench| iter_in(bench, &pool, || model.train_step(black_box(&x), &y, 1e-3)),
            );
        }
    }
    group.finish();
}
