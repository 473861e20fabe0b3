//! Matrix multiply throughput at the MLP's shapes and at 1024³: netcl's
//! matmul (no_grad) against ndarray's `dot` (matrixmultiply) and the `gemm`
//! crate called directly, on 1 and 2 threads.
//!
//! matrixmultiply's threads come from `MATMUL_NUM_THREADS`, read once per
//! process; BENCHMARKS.md runs this topic with it set to 1 and to 2.

use criterion::{BenchmarkId, Criterion, Throughput};
use ndarray::Array2;
use netcl::Tensor;
use std::hint::black_box;

use crate::common::{gemm_direct, iter_in, matmul_operands, pool};

/// (m, k, n): the forward and weight-gradient products of 784-256-256-10 at
/// batch 32 and 256, and a large square.
const SHAPES: &[(usize, usize, usize)] = &[
    (32, 784, 256),
    (784, 32, 256),
    (32, 256, 256),
    (256, 784, 256),
    (1024, 1024, 1024),
];

pub fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("matmul");
    for &(m, k, n) in SHAPES {
        let (a, b) = matmul_operands(m, k, n);
        let mut out = Array2::zeros((m, n));
        let (ta, tb) = (Tensor::from_array(a.clone()), Tensor::from_array(b.clone()));
        group.throughput(Throughput::Elements((2 * m * k * n) as u64));
        if m * k * n > 100_000_000 {
            group.sample_size(10);
        }
        let shape = format!("{m}x{k}x{n}");
        for threads in [1, 2] {
            let pool = pool(threads);
            group.bench_function(
                BenchmarkId::new(format!("netcl/{threads}t"), &shape),
                |bench| iter_in(bench, &pool, || black_box(&ta).matmul(black_box(&tb))),
            );
            group.bench_function(
                BenchmarkId::new(format!("gemm/{threads}t"), &shape),
                |bench| bench.iter(|| gemm_direct(black_box(&a), black_box(&b), &mut out, threads)),
            );
        }
        group.bench_function(BenchmarkId::new("matrixmultiply/env", &shape), |bench| {
            bench.iter(|| {
                ndarray::linalg::general_mat_mul(1.0, black_box(&a), black_box(&b), 0.0, &mut out)
            })
        });
    }
    group.finish();
}
