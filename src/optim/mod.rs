//! Optimizers that update parameters from their gradients, and
//! learning-rate schedules.
//!
//! | | |
//! |---|---|
//! | [`Sgd`] | stochastic gradient descent, with momentum, Nesterov momentum and weight decay |
//! | [`Adam`] | Adam, with L2 weight decay added to the gradient |
//! | [`AdamW`] | Adam with decoupled weight decay |
//! | [`StepDecay`], [`CosineAnnealing`] | learning rate as a function of the epoch (or of the step) |
//! | [`Warmup`] | linear warm-up in front of any schedule, per optimisation step |
//! | [`clip_grad_norm`] | scales gradients to a global norm, as PyTorch's `clip_grad_norm_` |
//! | [`ParamGroup`], [`no_decay_groups`] | per-group weight decay: norms and biases skip it |
//!
//! Every [`step`](Optimizer::step) runs under
//! [`no_grad`](crate::autograd::no_grad) whatever the caller's mode, updates
//! the parameters in place (through
//! [`Tensor::with_data_mut`](crate::Tensor::with_data_mut)) and skips
//! parameters that have no gradient. The update formulas are PyTorch's, so
//! hyper-parameters carry over.
//!
//! # Examples
//!
//! One training step:
//!
//! ```
//! use netcl::Tensor;
//! use netcl::nn::{Activation, Mlp, Module};
//! use netcl::optim::{Adam, AdamConfig, Optimizer};
//! use netcl::rand::SeedableRng;
//!
//! let mut rng = netcl::rand::rngs::StdRng::seed_from_u64(0);
//! let model = Mlp::new(&[4, 8, 3], Activation::Relu, &mut rng);
//! let mut optimizer = Adam::new(model.parameters(), AdamConfig::new(1e-2));
//!
//! let x = Tensor::rand(&[16, 4], &mut rng);
//! let y = Tensor::from_vec((0..16).map(|i| (i % 3) as f32).collect(), &[16])?;
//! let before = model.forward(&x)?.cross_entropy(&y).item();
//! for _ in 0..20 {
//!     let loss = model.forward(&x)?.try_cross_entropy(&y)?;
//!     optimizer.zero_grad();
//!     loss.try_backward()?;
//!     optimizer.step();
//! }
//! assert!(model.forward(&x)?.cross_entropy(&y).item() < before);
//! # Ok::<(), netcl::Error>(())
//! ```

mod adam;
mod clip;
mod groups;
mod schedule;
mod sgd;

pub use adam::{Adam, AdamConfig, AdamW};
pub use clip::{clip_grad_norm, try_clip_grad_norm};
pub use groups::{ParamGroup, no_decay_groups};
pub use schedule::{Constant, CosineAnnealing, LrSchedule, StepDecay, Warmup};
pub use sgd::{Sgd, SgdConfig};

use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// Updates a set of parameters from their accumulated gradients.
///
/// The usual step is `zero_grad`, forward, `backward`, `step`.
///
/// # Examples
///
/// ```
/// use netcl::Tensor;
/// use netcl::optim::{Optimizer, Sgd, SgdConfig};
///
/// // Minimise (w - 3)² from w = 0.
/// let w = Tensor::zeros(&[1]).requires_grad_(true);
/// let mut optimizer = Sgd::new([w.clone()], SgdConfig::new(0.1));
/// for _ in 0..100 {
///     optimizer.zero_grad();
///     (&w - 3.0).powf(2.0).sum().backward();
///     optimizer.step();
/// }
/// assert!((w.item() - 3.0).abs() < 1e-4);
/// ```
pub trait Optimizer: Send {
    /// Updates every parameter that has a gradient, in place. Runs under
    /// [`no_grad`](crate::autograd::no_grad): nothing is recorded, whatever
    /// the caller's grad mode.
    fn step(&mut self);

    /// Clears the gradient of every parameter.
    fn zero_grad(&self);

    /// The current learning rate.
    fn learning_rate(&self) -> f32;

    /// Sets the learning rate used by the following steps (for example from
    /// an [`LrSchedule`]).
    fn set_learning_rate(&mut self, lr: f32);
}

impl<O: Optimizer + ?Sized> Optimizer for Box<O> {
    fn step(&mut self) {
        (**self).step()
    }
    fn zero_grad(&self) {
        (**self).zero_grad()
    }
    fn learning_rate(&self) -> f32 {
        (**self).learning_rate()
    }
    fn set_learning_rate(&mut self, lr: f32) {
        (**self).set_learning_rate(lr)
    }
}

/// Collects the parameters an optimizer updates: each distinct tensor once,
/// in order; each must be a leaf.
fn collect_params(
    op: &'static str,
    params: impl IntoIterator<Item = Tensor>,
) -> Result<Vec<Tensor>> {
    let mut unique: Vec<Tensor> = Vec::new();
    for (i, p) in params.into_iter().enumerate() {
        if let Some(grad_fn) = p.grad_fn() {
            return Err(Error::InvalidArgument {
                op,
                message: format!(
                    "parameter {i} was computed by `{}`; optimizers update leaf tensors",
                    grad_fn.name()
                ),
            });
        }
        if !unique.iter().any(|q| q.same(&p)) {
            unique.push(p);
        }
    }
    Ok(unique)
}

/// Checks that a hyper-parameter is finite and within `range`.
fn check(
    op: &'static str,
    name: &str,
    value: f32,
    ok: impl FnOnce(f32) -> bool,
    expected: &str,
) -> Result<()> {
    if value.is_finite() && ok(value) {
        Ok(())
    } else {
        Err(Error::InvalidArgument {
            op,
            message: format!("{name} must be {expected}, got {value}"),
        })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_steady_training_loop_alternates_between_two_buffers_per_parameter() {
        // An update writes the new values into a buffer of its own and swaps it
        // in, so readers never wait for it (see `Tensor::with_data_mut`). After
        // backward has released the graph nothing else holds the replaced
        // buffer, so the next update reuses it: from the second step on, each
        // parameter alternates between the same two buffers and the loop
        // allocates no parameter storage.
        use crate::Tensor;
        use crate::nn::{Linear, Module};
        use crate::optim::{Adam, AdamConfig, Optimizer};
        use rand::SeedableRng;

        let layer = Linear::new(8, 4, &mut rand::rngs::StdRng::seed_from_u64(0));
        let mut adam = Adam::new(layer.parameters(), AdamConfig::new(1e-2));
        let x = Tensor::ones(&[5, 8]);
        let storage = || -> Vec<usize> {
            layer
                .parameters()
                .iter()
                .map(|p| p.read().as_slice().unwrap().as_ptr() as usize)
                .collect()
        };
        let mut seen = vec![storage()];
        for _ in 0..6 {
            let loss = layer.forward(&x).unwrap().powf(2.0).mean();
            adam.zero_grad();
            loss.backward();
            let before = layer.weight().to_vec();
            adam.step();
            assert_ne!(layer.weight().to_vec(), before);
            seen.push(storage());
        }
        for step in 2..seen.len() {
            assert_eq!(
                seen[step],
                seen[step - 2],
                "step {step} reuses the buffer of step {}",
                step - 2
            );
            assert_ne!(seen[step], seen[step - 1]);
        }
    }
}
