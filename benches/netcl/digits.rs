//! 20 epochs of training 64-128-10 on the digits data, batch 32: the data
//! loader, the model and Adam, as the main example uses them.

use criterion::Criterion;
use netcl::train;

use crate::common::{digits_split, iter_in, pool, train_digits};

pub fn bench(c: &mut Criterion) {
    let (train_set, test_set) = digits_split();
    let accuracy = train::evaluate(&train_digits(&train_set, 20), &test_set, 256)
        .unwrap()
        .accuracy;
    println!("digits: test accuracy after 20 epochs: {accuracy:.4}");
    assert!(accuracy >= 0.96, "20 epochs reach {accuracy}, below 0.96");
    let pool = pool(1);
    let mut group = c.benchmark_group("digits");
    group.sample_size(10);
    group.bench_function("train_20_epochs", |bench| {
        iter_in(bench, &pool, || train_digits(&train_set, 20))
    });
    group.finish();
}
