//! Parallel evaluation under no_grad: 20,000 samples of 784-256-256-10 in
//! batches of 256 through `netcl::parallel::map`, on 1 and 2 threads.

use criterion::{BenchmarkId, Criterion, Throughput};
use netcl::nn::Module;
use netcl::{autograd, parallel};

use crate::common::{batch, iter_in, mlp, pool};

pub fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("eval");
    let model = mlp(&[784, 256, 256, 10], 5);
    let batches: Vec<_> = (0..20_000usize.div_ceil(256))
        .map(|i| {
            let n = (20_000 - i * 256).min(256);
            batch(n, 784, 10, 100 + i as u64)
        })
        .collect();
    group.throughput(Throughput::Elements(20_000));
    group.sample_size(10);
    for threads in [1, 2] {
        let pool = pool(threads);
        group.bench_function(
            BenchmarkId::new("mlp784_20k", format!("{threads}t")),
            |bench| {
                iter_in(bench, &pool, || {
                    let _guard = autograd::no_grad();
                    let correct: Vec<f32> = parallel::map(&batches, |(x, y)| {
                        model.forward(x).unwrap().argmax(-1).eq(y).sum().item()
                    });
                    correct.iter().sum::<f32>()
                })
            },
        );
    }
    group.finish();
}
