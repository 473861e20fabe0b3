//! One training step of 784-256-256-10 (ReLU, cross-entropy, SGD) at batch
//! 32 and 128, on 1 and 2 threads (intra-op: parallel matrix products),
//! and data-parallel on 2 threads (two shards, `parallel::backward_shards`).

use criterion::{BenchmarkId, Criterion};
use std::hint::black_box;

use netcl::nn::Module;

use crate::common::{batch, iter_in, mlp, pool, sgd, split_batch, train_step, train_step_sharded};

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
        // Data-parallel over 2 threads: two shards, one worker each.
        let model = mlp(&[784, 256, 256, 10], 4);
        let params = model.parameters();
        let mut optimizer = sgd(&model, 1e-3);
        let shards = split_batch(&x, &y, 2);
        let pool = pool(2);
        group.bench_function(
            BenchmarkId::new(format!("batch{batch_size}"), "2t_shards"),
            |bench| {
                iter_in(bench, &pool, || {
                    train_step_sharded(&model, &mut optimizer, &shards, &params)
                })
            },
        );
    }
    group.finish();
}
