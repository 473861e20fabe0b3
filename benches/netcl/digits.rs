//! 20 epochs of training 64-128-10 on the digits data, batch 32: the data
//! loader, the model and Adam, as the main example uses them.

use criterion::Criterion;
use netcl::data::{self, DataLoader, TensorDataset};
use netcl::nn::{Activation, Mlp, Module};
use netcl::optim::{Adam, AdamConfig, Optimizer};
use netcl::train;
use rand::SeedableRng;
use rand::rngs::StdRng;

use crate::common::{iter_in, pool};

fn split() -> (TensorDataset, TensorDataset) {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/data/digits.csv");
    let digits = data::load_digits(path).expect("data/digits.csv");
    let digits = TensorDataset::new(digits.inputs() / 16.0, digits.targets().clone()).unwrap();
    digits.split(0.8, 42).unwrap()
}

/// Trains a fresh model for `epochs` epochs; returns it.
fn train(train_set: &TensorDataset, epochs: u64) -> Mlp {
    let model = Mlp::new(
        &[64, 128, 10],
        Activation::Relu,
        &mut StdRng::seed_from_u64(42),
    );
    let mut optimizer = Adam::new(model.parameters(), AdamConfig::new(2e-3));
    let loader = DataLoader::new(train_set.clone(), 32).shuffle(42);
    for epoch in 0..epochs {
        for batch in loader.epoch(epoch) {
            let batch = batch.unwrap();
            let loss = model
                .forward(&batch.inputs)
                .unwrap()
                .cross_entropy(&batch.targets);
            loss.backward();
            optimizer.step();
            optimizer.zero_grad();
        }
    }
    model
}

pub fn bench(c: &mut Criterion) {
    let (train_set, test_set) = split();
    let accuracy = train::evaluate(&train(&train_set, 20), &test_set, 256)
        .unwrap()
        .accuracy;
    println!("digits: test accuracy after 20 epochs: {accuracy:.4}");
    assert!(accuracy >= 0.96, "20 epochs reach {accuracy}, below 0.96");
    let pool = pool(1);
    let mut group = c.benchmark_group("digits");
    group.sample_size(10);
    group.bench_function("train_20_epochs", |bench| {
        iter_in(bench, &pool, || train(&train_set, 20))
    });
    group.finish();
}
