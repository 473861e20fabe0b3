//! An input-gradient penalty (double backward): trains two 64-64-10 tanh
//! MLPs on the 8x8 digits of `data/digits.csv` from the same start, one on
//! the cross-entropy alone and one on
//!
//! ```text
//! loss = CE + λ · mean_b ‖∂ℓ_b/∂x_b‖²
//! ```
//!
//! where `ℓ_b` is sample `b`'s cross-entropy and `x_b` its pixels. The
//! penalty is a function of a gradient, so its own gradient (with respect
//! to the weights) needs the first gradient recorded: `grad_with` with
//! `create_graph`. The penalty makes the model less sensitive to its input;
//! the program prints, for both models, the test accuracy and the mean
//! input-gradient norm `‖∂ℓ/∂x‖` over the test set.
//!
//! Run with `cargo run --release --example gradient_penalty`.

use std::path::Path;

use netcl::autograd::{self, BackwardOptions};
use netcl::data::{self, DataLoader, TensorDataset};
use netcl::nn::{Activation, Mlp, Module};
use netcl::optim::{Adam, AdamConfig, Optimizer};
use netcl::rand::SeedableRng;
use netcl::rand::rngs::StdRng;
use netcl::{Result, Tensor};

const SEED: u64 = 7;
const EPOCHS: u64 = 8;
const BATCH_SIZE: usize = 32;
const LAMBDA: f32 = 0.1;

/// Per-sample input gradients `∂ℓ_b/∂x_b` of the cross-entropy: the batch
/// mean's gradient times the batch size. With `create_graph` they are
/// recorded, so a loss can be built from them.
fn input_gradients(model: &Mlp, x: &Tensor, y: &Tensor, create_graph: bool) -> Result<Tensor> {
    let x = x.detach().requires_grad_(true);
    let n = x.shape()[0] as f32;
    let loss = model.forward(&x)?.try_cross_entropy(y)? * n;
    let options = BackwardOptions::new().create_graph(create_graph);
    let grads = autograd::grad_with(&[&loss], &[&x], &options)?;
    Ok(grads.into_iter().next().flatten().expect("one input"))
}

/// Trains `model` for [`EPOCHS`], with the input-gradient penalty if
/// `lambda > 0`.
fn train(model: &Mlp, train_set: &TensorDataset, lambda: f32) -> Result<()> {
    let mut optimizer = Adam::new(model.parameters(), AdamConfig::new(2e-3));
    let loader = DataLoader::new(train_set.clone(), BATCH_SIZE).shuffle(SEED);
    for epoch in 0..EPOCHS {
        let (mut total, mut penalty_total, mut batches) = (0.0, 0.0, 0);
        for batch in loader.epoch(epoch) {
            let batch = batch?;
            let (x, y) = (&batch.inputs, &batch.targets);
            let mut loss = model.forward(x)?.try_cross_entropy(y)?;
            if lambda > 0.0 {
                let g = input_gradients(model, x, y, true)?;
                let penalty = (&g * &g).sum_axis(1, false).mean();
                penalty_total += penalty.item();
                loss = loss + penalty * lambda;
            }
            total += loss.item();
            batches += 1;
            optimizer.zero_grad();
            loss.try_backward()?;
            optimizer.step();
        }
        println!(
            "  epoch {:2}: loss {:.4} (penalty {:.4})",
            epoch + 1,
            total / batches as f32,
            penalty_total / batches as f32
        );
    }
    Ok(())
}

/// Test accuracy and the mean of `‖∂ℓ_b/∂x_b‖` over the test set.
fn evaluate(model: &Mlp, test_set: &TensorDataset) -> Result<(f32, f32)> {
    let (x, y) = (test_set.inputs(), test_set.targets());
    let accuracy = {
        let _guard = autograd::no_grad();
        model.forward(x)?.argmax(-1).eq(y).mean().item()
    };
    let g = input_gradients(model, x, y, false)?;
    let norm = (&g * &g).sum_axis(1, false).sqrt().mean().item();
    Ok((accuracy, norm))
}

fn main() -> std::result::Result<(), Box<dyn std::error::Error>> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/digits.csv");
    let digits = data::load_digits(&path)?;
    let digits = TensorDataset::new(digits.inputs() / 16.0, digits.targets().clone())?;
    let (train_set, test_set) = digits.split(0.8, SEED)?;

    let mut results = Vec::new();
    for (name, lambda) in [("plain", 0.0), ("penalised", LAMBDA)] {
        println!("{name} (λ = {lambda}):");
        // The same initial weights for both.
        let model = Mlp::new(
            &[64, 64, 10],
            Activation::Tanh,
            &mut StdRng::seed_from_u64(SEED),
        );
        train(&model, &train_set, lambda)?;
        let (accuracy, norm) = evaluate(&model, &test_set)?;
        results.push((name, lambda, accuracy, norm));
    }
    println!();
    println!("model      λ     test accuracy   mean ‖∂ℓ/∂x‖ (test)");
    for (name, lambda, accuracy, norm) in &results {
        println!("{name:<10} {lambda:<5} {accuracy:<15.4} {norm:.4}");
    }
    let (plain, penalised) = (results[0].3, results[1].3);
    println!(
        "the penalty divides the input-gradient norm by {:.1}",
        plain / penalised
    );
    Ok(())
}
