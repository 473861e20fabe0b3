//! Stochastic gradient descent.

use std::fmt;

use ndarray::{ArrayD, Zip};

use crate::autograd::no_grad;
use crate::error::{Error, Result, or_panic};
use crate::optim::groups::{ParamGroup, flatten};
use crate::optim::{Optimizer, check};
use crate::tensor::Tensor;

/// The hyper-parameters of [`Sgd`], built from the learning rate.
///
/// # Examples
///
/// ```
/// use netcl::optim::SgdConfig;
///
/// let config = SgdConfig::new(0.1).momentum(0.9).nesterov(true).weight_decay(5e-4);
/// assert_eq!(config.lr, 0.1);
/// assert!(config.nesterov);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SgdConfig {
    /// The learning rate, `>= 0`.
    pub lr: f32,
    /// The momentum factor `μ` in `[0, 1)`; 0 (the default) for plain SGD.
    pub momentum: f32,
    /// Nesterov momentum (needs `momentum > 0`).
    pub nesterov: bool,
    /// L2 penalty `λ >= 0`, added to the gradient as `λ·w`.
    pub weight_decay: f32,
}

impl SgdConfig {
    /// Plain SGD with learning rate `lr`.
    pub fn new(lr: f32) -> SgdConfig {
        SgdConfig {
            lr,
            momentum: 0.0,
            nesterov: false,
            weight_decay: 0.0,
        }
    }

    /// Sets the momentum factor.
    #[must_use]
    pub fn momentum(mut self, momentum: f32) -> SgdConfig {
        self.momentum = momentum;
        self
    }

    /// Switches Nesterov momentum on or off.
    #[must_use]
    pub fn nesterov(mut self, nesterov: bool) -> SgdConfig {
        self.nesterov = nesterov;
        self
    }

    /// Sets the L2 penalty.
    #[must_use]
    pub fn weight_decay(mut self, weight_decay: f32) -> SgdConfig {
        self.weight_decay = weight_decay;
        self
    }

    fn validate(&self) -> Result<()> {
        check("Sgd", "lr", self.lr, |v| v >= 0.0, "finite and >= 0")?;
        check(
            "Sgd",
            "momentum",
            self.momentum,
            |v| (0.0..1.0).contains(&v),
            "in [0, 1)",
        )?;
        check(
            "Sgd",
            "weight_decay",
            self.weight_decay,
            |v| v >= 0.0,
            "finite and >= 0",
        )?;
        if self.nesterov && self.momentum == 0.0 {
            return Err(Error::InvalidArgument {
                op: "Sgd",
                message: "Nesterov momentum needs a momentum > 0".to_string(),
            });
        }
        Ok(())
    }
}

/// Stochastic gradient descent with optional momentum, Nesterov momentum and
/// weight decay (PyTorch's `torch.optim.SGD` without dampening).
///
/// For each parameter `w` with gradient `g`, learning rate `η`, momentum `μ`
/// and weight decay `λ`, one step is:
///
/// ```text
/// d = g + λ·w
/// b = μ·b + d               (b starts at 0, so the first b is d)
/// d = d + μ·b  if Nesterov, else  d = b      (only with μ > 0)
/// w = w - η·d
/// ```
///
/// The momentum buffers are allocated at the first step and reused; a step
/// allocates no parameter-sized memory.
///
/// # Examples
///
/// ```
/// use netcl::Tensor;
/// use netcl::optim::{Optimizer, Sgd, SgdConfig};
///
/// let w = Tensor::from_vec(vec![1.0], &[1])?.requires_grad_(true);
/// let mut sgd = Sgd::new([w.clone()], SgdConfig::new(0.1).momentum(0.9));
///
/// // loss = 2w, so g = 2 at every step.
/// (&w * 2.0).sum().backward();
/// sgd.step(); // b = 2, w = 1 - 0.1·2 = 0.8
/// sgd.zero_grad();
/// (&w * 2.0).sum().backward();
/// sgd.step(); // b = 0.9·2 + 2 = 3.8, w = 0.8 - 0.38 = 0.42
/// assert!((w.item() - 0.42).abs() < 1e-6);
/// # Ok::<(), netcl::Error>(())
/// ```
pub struct Sgd {
    params: Vec<Tensor>,
    /// Each parameter's group weight decay; `None`: the config's.
    decay: Vec<Option<f32>>,
    /// Momentum buffers, one per parameter, allocated at its first step.
    buffers: Vec<Option<ArrayD<f32>>>,
    config: SgdConfig,
}

impl Sgd {
    /// An optimizer for `params` with the given hyper-parameters.
    ///
    /// # Panics
    ///
    /// As [`try_new`](Sgd::try_new).
    #[track_caller]
    pub fn new(params: impl IntoIterator<Item = Tensor>, config: SgdConfig) -> Sgd {
        or_panic(Sgd::try_new(params, config))
    }

    /// An optimizer for `params` (each distinct tensor is updated once) with
    /// the given hyper-parameters.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] if a hyper-parameter is out of range (a
    /// negative or non-finite learning rate, momentum outside `[0, 1)`,
    /// Nesterov without momentum) or a parameter is not a leaf tensor.
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::Tensor;
    /// use netcl::optim::{Sgd, SgdConfig};
    ///
    /// let w = Tensor::zeros(&[2]).requires_grad_(true);
    /// let err = Sgd::try_new([w], SgdConfig::new(0.1).nesterov(true)).unwrap_err();
    /// assert_eq!(err.to_string(), "Sgd: Nesterov momentum needs a momentum > 0");
    /// ```
    pub fn try_new(params: impl IntoIterator<Item = Tensor>, config: SgdConfig) -> Result<Sgd> {
        Sgd::try_with_groups([ParamGroup::new(params)], config)
    }

    /// An optimizer over parameter groups, each with the config's weight
    /// decay or its own ([`ParamGroup::weight_decay`]).
    ///
    /// # Panics
    ///
    /// As [`try_with_groups`](Sgd::try_with_groups).
    #[track_caller]
    pub fn with_groups(groups: impl IntoIterator<Item = ParamGroup>, config: SgdConfig) -> Sgd {
        or_panic(Sgd::try_with_groups(groups, config))
    }

    /// An optimizer over parameter groups, each with the config's weight
    /// decay or its own ([`ParamGroup::weight_decay`]).
    ///
    /// # Errors
    ///
    /// As [`try_new`](Sgd::try_new), and [`Error::InvalidArgument`] if a
    /// group's weight decay is negative or not finite, or a parameter is
    /// in two groups.
    pub fn try_with_groups(
        groups: impl IntoIterator<Item = ParamGroup>,
        config: SgdConfig,
    ) -> Result<Sgd> {
        config.validate()?;
        let (params, decay) = flatten("Sgd", groups)?;
        Ok(Sgd {
            buffers: vec![None; params.len()],
            params,
            decay,
            config,
        })
    }

    /// The hyper-parameters (the learning rate as last set).
    pub fn config(&self) -> &SgdConfig {
        &self.config
    }

    /// The parameters this optimizer updates.
    pub fn params(&self) -> &[Tensor] {
        &self.params
    }
}

impl Optimizer for Sgd {
    fn step(&mut self) {
        let _guard = no_grad();
        let SgdConfig {
            lr,
            momentum,
            nesterov,
            weight_decay: wd,
        } = self.config;
        for ((param, buffer), decay) in self.params.iter().zip(&mut self.buffers).zip(&self.decay) {
            let wd = decay.unwrap_or(wd);
            let Some(grad) = param.grad_data() else {
                continue;
            };
            let grad = grad.view();
            // The new values go to a buffer of their own, swapped in at the
            // end: a forward reading the parameter meanwhile sees the old
            // values whole (see `Tensor::with_data_mut`).
            param.update(|w, mut next| {
                if momentum == 0.0 {
                    Zip::from(&mut next)
                        .and(&w)
                        .and(&grad)
                        .for_each(|n, &w, &g| {
                            *n = w - lr * (g + wd * w);
                        });
                    return;
                }
                let buffer = buffer.get_or_insert_with(|| ArrayD::zeros(w.raw_dim()));
                Zip::from(&mut next)
                    .and(&w)
                    .and(&grad)
                    .and(buffer)
                    .for_each(|n, &w, &g, b| {
                        let d = g + wd * w;
                        *b = momentum * *b + d;
                        let d = if nesterov { d + momentum * *b } else { *b };
                        *n = w - lr * d;
                    });
            });
        }
    }

    fn zero_grad(&self) {
        for p in &self.params {
            p.zero_grad();
        }
    }

    fn learning_rate(&self) -> f32 {
        self.config.lr
    }

    fn set_learning_rate(&mut self, lr: f32) {
        self.config.lr = lr;
    }
}

impl fmt::Debug for Sgd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sgd")
            .field("params", &self.params.len())
            .field("config", &self.config)
            .finish()
    }
}
