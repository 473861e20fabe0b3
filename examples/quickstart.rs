//! Trains a tiny two-layer network on a synthetic two-class problem (points
//! inside or outside a circle) with plain tensors and hand-written SGD, then
//! evaluates it under `no_grad`.
//!
//! Run with `cargo run --release --example quickstart`.

use clap::Parser;
use netcl::rand::rngs::StdRng;
use netcl::rand::{RngExt, SeedableRng};
use netcl::{Tensor, autograd};

/// Trains a two-layer network to tell points inside a circle from points
/// outside it, with plain tensors and hand-written SGD, then evaluates it
/// under no_grad.
#[derive(Parser, Debug)]
#[command(name = "quickstart")]
struct Args {}

/// Points uniform in [-1, 1]², labelled 1 inside the circle of radius 0.7.
fn circle_data(n: usize, rng: &mut StdRng) -> (Tensor, Tensor) {
    let mut points = Vec::with_capacity(2 * n);
    let mut labels = Vec::with_capacity(n);
    for _ in 0..n {
        let (x, y) = (
            rng.random_range(-1.0..1.0_f32),
            rng.random_range(-1.0..1.0_f32),
        );
        points.extend([x, y]);
        labels.push(if x * x + y * y < 0.49 { 1.0 } else { 0.0 });
    }
    (
        Tensor::from_vec(points, &[n, 2]).expect("2 values per point"),
        Tensor::from_vec(labels, &[n]).expect("one label per point"),
    )
}

fn main() -> netcl::Result<()> {
    Args::parse();
    let mut rng = StdRng::seed_from_u64(42);
    let (train_x, train_y) = circle_data(512, &mut rng);
    let (test_x, test_y) = circle_data(256, &mut rng);

    let hidden = 32;
    let w1 = (Tensor::randn(&[2, hidden], &mut rng) * 0.5).requires_grad_(true);
    let b1 = Tensor::zeros(&[hidden]).requires_grad_(true);
    let w2 = (Tensor::randn(&[hidden, 2], &mut rng) * 0.5).requires_grad_(true);
    let b2 = Tensor::zeros(&[2]).requires_grad_(true);
    let params = [&w1, &b1, &w2, &b2];
    let forward = |x: &Tensor| -> netcl::Result<Tensor> {
        x.try_matmul(&w1)?
            .try_add(&b1)?
            .tanh()
            .try_matmul(&w2)?
            .try_add(&b2)
    };

    for epoch in 0..300 {
        let loss = forward(&train_x)?.try_cross_entropy(&train_y)?;
        loss.try_backward()?;
        // The update itself must not be recorded.
        let _guard = autograd::no_grad();
        for p in params {
            let grad = p.grad().expect("every parameter is used").data();
            p.with_data_mut(|mut value| value.scaled_add(-0.5, &grad));
            p.zero_grad();
        }
        if epoch % 50 == 0 {
            println!("epoch {epoch:3}: train loss {:.4}", loss.item());
        }
    }

    // Evaluation records nothing: no graph, no memory held for backward.
    let tape = autograd::current_tape();
    let accuracy = {
        let _guard = autograd::no_grad();
        let pred = forward(&test_x)?.argmax(-1);
        pred.try_eq(&test_y)?.mean().item()
    };
    assert_eq!(tape.len(), 0, "evaluation recorded nothing");
    println!("test accuracy: {accuracy:.4}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::error::ErrorKind;
    use clap::{CommandFactory, Parser};

    use super::Args;

    #[test]
    fn help_prints_usage_and_unknown_flags_are_rejected() {
        Args::command().debug_assert();
        assert!(Args::try_parse_from(["quickstart"]).is_ok());
        let help = Args::try_parse_from(["quickstart", "--help"]).unwrap_err();
        assert_eq!(help.kind(), ErrorKind::DisplayHelp);
        assert!(help.to_string().contains("Usage: quickstart"), "{help}");
        let err = Args::try_parse_from(["quickstart", "--fast"]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::UnknownArgument);
    }
}
