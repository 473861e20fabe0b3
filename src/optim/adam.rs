//! Adam and AdamW.

use std::fmt;

use ndarray::{ArrayD, Zip};

use crate::autograd::no_grad;
use crate::error::{Result, or_panic};
use crate::optim::groups::{ParamGroup, flatten};
use crate::optim::{Optimizer, check};
use crate::tensor::Tensor;

/// The hyper-parameters of [`Adam`] and [`AdamW`], built from the learning
/// rate; the defaults are PyTorch's (`betas = (0.9, 0.999)`, `eps = 1e-8`,
/// no weight decay).
///
/// # Examples
///
/// ```
/// use netcl::optim::AdamConfig;
///
/// let config = AdamConfig::new(1e-3).betas(0.9, 0.99).weight_decay(0.01);
/// assert_eq!((config.beta1, config.beta2, config.eps), (0.9, 0.99, 1e-8));
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamConfig {
    /// The learning rate, `>= 0`.
    pub lr: f32,
    /// Decay of the running mean of gradients, in `[0, 1)`.
    pub beta1: f32,
    /// Decay of the running mean of squared gradients, in `[0, 1)`.
    pub beta2: f32,
    /// Added to the denominator for numerical stability, `> 0`.
    pub eps: f32,
    /// Weight decay `λ >= 0`: an L2 penalty added to the gradient in
    /// [`Adam`], a decoupled shrinkage `w -= η·λ·w` in [`AdamW`].
    pub weight_decay: f32,
}

impl AdamConfig {
    /// PyTorch's defaults with learning rate `lr`.
    pub fn new(lr: f32) -> AdamConfig {
        AdamConfig {
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }

    /// Sets both decay rates.
    #[must_use]
    pub fn betas(mut self, beta1: f32, beta2: f32) -> AdamConfig {
        self.beta1 = beta1;
        self.beta2 = beta2;
        self
    }

    /// Sets `eps`.
    #[must_use]
    pub fn eps(mut self, eps: f32) -> AdamConfig {
        self.eps = eps;
        self
    }

    /// Sets the weight decay.
    #[must_use]
    pub fn weight_decay(mut self, weight_decay: f32) -> AdamConfig {
        self.weight_decay = weight_decay;
        self
    }

    fn validate(&self, op: &'static str) -> Result<()> {
        let unit = |v: f32| (0.0..1.0).contains(&v);
        check(op, "lr", self.lr, |v| v >= 0.0, "finite and >= 0")?;
        check(op, "beta1", self.beta1, unit, "in [0, 1)")?;
        check(op, "beta2", self.beta2, unit, "in [0, 1)")?;
        check(op, "eps", self.eps, |v| v > 0.0, "finite and > 0")?;
        check(
            op,
            "weight_decay",
            self.weight_decay,
            |v| v >= 0.0,
            "finite and >= 0",
        )
    }
}

/// The running moments of one parameter.
struct Moments {
    /// Steps taken by this parameter.
    step: i32,
    m: ArrayD<f32>,
    v: ArrayD<f32>,
}

/// What Adam and AdamW share: parameters, moments and the update.
struct AdamCore {
    params: Vec<Tensor>,
    /// Each parameter's group weight decay; `None`: the config's.
    decay: Vec<Option<f32>>,
    moments: Vec<Option<Moments>>,
    config: AdamConfig,
}

impl AdamCore {
    fn new(
        op: &'static str,
        params: impl IntoIterator<Item = Tensor>,
        config: AdamConfig,
    ) -> Result<AdamCore> {
        AdamCore::with_groups(op, [ParamGroup::new(params)], config)
    }

    fn with_groups(
        op: &'static str,
        groups: impl IntoIterator<Item = ParamGroup>,
        config: AdamConfig,
    ) -> Result<AdamCore> {
        config.validate(op)?;
        let (params, decay) = flatten(op, groups)?;
        Ok(AdamCore {
            moments: params.iter().map(|_| None).collect(),
            params,
            decay,
            config,
        })
    }

    /// One step; `decoupled` selects AdamW's weight decay.
    ///
    /// The parameters are updated independently, on the caller's rayon
    /// pool when there are enough values to pay for it (each one on a
    /// single thread, under its own writer lock and nothing else, so the
    /// result never depends on the thread count).
    fn step(&mut self, decoupled: bool) {
        let _guard = no_grad();
        let config = self.config;
        let values: usize = self.params.iter().map(Tensor::numel).sum();
        let jobs: Vec<_> = self
            .params
            .iter()
            .zip(&mut self.moments)
            .zip(&self.decay)
            .collect();
        crate::ops::vectorized::for_each_piece(
            jobs,
            values.saturating_mul(UPDATE_COST),
            |((param, moments), decay)| {
                update(
                    param,
                    moments,
                    decay.unwrap_or(config.weight_decay),
                    config,
                    decoupled,
                );
            },
        );
    }

    fn zero_grad(&self) {
        for p in &self.params {
            p.zero_grad();
        }
    }
}

/// The price of one value's update in simple operations (a square root
/// and a division among them), for [`should_split`](crate::ops::vectorized::should_split).
const UPDATE_COST: usize = 4;

/// One parameter's Adam (AdamW if `decoupled`) update with weight decay
/// `wd`, on this thread.
fn update(
    param: &Tensor,
    moments: &mut Option<Moments>,
    wd: f32,
    config: AdamConfig,
    decoupled: bool,
) {
    let AdamConfig {
        lr,
        beta1,
        beta2,
        eps,
        ..
    } = config;
    // Adam adds λ·w to the gradient; AdamW shrinks w by (1 - η·λ) first.
    let (l2, shrink) = if decoupled {
        (0.0, 1.0 - lr * wd)
    } else {
        (wd, 1.0)
    };
    let Some(grad) = param.grad_data() else {
        return;
    };
    let grad = grad.view();
    // The new values go to a buffer of their own, swapped in at the
    // end (see `Tensor::with_data_mut`).
    param.update(|w, mut next| {
        let state = moments.get_or_insert_with(|| Moments {
            step: 0,
            m: ArrayD::zeros(w.raw_dim()),
            v: ArrayD::zeros(w.raw_dim()),
        });
        state.step += 1;
        // Bias corrections in f64, as PyTorch computes them.
        let bc1 = 1.0 - f64::from(beta1).powi(state.step);
        let bc2 = 1.0 - f64::from(beta2).powi(state.step);
        let step_size = (f64::from(lr) / bc1) as f32;
        let bc2_sqrt = bc2.sqrt() as f32;
        let rule = Rule {
            shrink,
            l2,
            beta1,
            beta2,
            step_size,
            bc2_sqrt,
            eps,
        };
        // Row-major operands (the usual case): one loop in the widest
        // SIMD extension (the same arithmetic, so the same bits).
        if let (Some(n), Some(w), Some(g), Some(m), Some(v)) = (
            next.as_slice_mut(),
            w.as_slice(),
            grad.as_slice(),
            state.m.as_slice_mut(),
            state.v.as_slice_mut(),
        ) {
            crate::ops::vectorized::dispatch(
                #[inline(always)]
                || {
                    for ((((n, &w), &g), m), v) in n
                        .iter_mut()
                        .zip(w)
                        .zip(g)
                        .zip(m.iter_mut())
                        .zip(v.iter_mut())
                    {
                        rule.apply(n, w, g, m, v);
                    }
                },
            );
            return;
        }
        Zip::from(&mut next)
            .and(&w)
            .and(&grad)
            .and(&mut state.m)
            .and(&mut state.v)
            .for_each(|n, &w, &g, m, v| rule.apply(n, w, g, m, v));
    });
}

/// The coefficients of one parameter's update at one step.
struct Rule {
    shrink: f32,
    l2: f32,
    beta1: f32,
    beta2: f32,
    step_size: f32,
    bc2_sqrt: f32,
    eps: f32,
}

impl Rule {
    /// The update of one value `w` with gradient `g` and moments `m`, `v`
    /// (updated in place), written to `n`.
    #[inline(always)]
    fn apply(&self, n: &mut f32, w: f32, g: f32, m: &mut f32, v: &mut f32) {
        let w = w * self.shrink;
        let d = g + self.l2 * w;
        *m = self.beta1 * *m + (1.0 - self.beta1) * d;
        *v = self.beta2 * *v + (1.0 - self.beta2) * d * d;
        *n = w - self.step_size * *m / (v.sqrt() / self.bc2_sqrt + self.eps);
    }
}

/// Adam (Kingma & Ba, 2015), as PyTorch's `torch.optim.Adam`: weight decay
/// is an L2 penalty added to the gradient.
///
/// For each parameter `w` with gradient `g`, at its step `t` (from 1):
///
/// ```text
/// d = g + λ·w
/// m = β1·m + (1 - β1)·d
/// v = β2·v + (1 - β2)·d²
/// w = w - η/(1 - β1^t) · m / (√v / √(1 - β2^t) + ε)
/// ```
///
/// The moment buffers are allocated at a parameter's first step and reused.
///
/// # Examples
///
/// ```
/// use netcl::Tensor;
/// use netcl::optim::{Adam, AdamConfig, Optimizer};
///
/// let w = Tensor::from_vec(vec![1.0, -1.0], &[2])?.requires_grad_(true);
/// let mut adam = Adam::new([w.clone()], AdamConfig::new(0.1));
/// (&w * &w).sum().backward();
/// adam.step();
/// // The first Adam step moves each weight by about lr against its gradient's sign.
/// let w1 = w.to_vec();
/// assert!((w1[0] - 0.9).abs() < 1e-5 && (w1[1] + 0.9).abs() < 1e-5);
/// # Ok::<(), netcl::Error>(())
/// ```
pub struct Adam(AdamCore);

/// The parts of [`Adam`] and [`AdamW`] that differ only in name and in
/// whether weight decay is decoupled.
macro_rules! adam_variant {
    ($name:ident, $decoupled:literal) => {
        impl $name {
            /// An optimizer for `params` with the given hyper-parameters.
            ///
            /// # Panics
            ///
            #[doc = concat!("As [`try_new`](", stringify!($name), "::try_new).")]
            #[track_caller]
            pub fn new(params: impl IntoIterator<Item = Tensor>, config: AdamConfig) -> $name {
                or_panic($name::try_new(params, config))
            }

            /// An optimizer for `params` (each distinct tensor is updated
            /// once) with the given hyper-parameters.
            ///
            /// # Errors
            ///
            /// [`Error::InvalidArgument`](crate::Error::InvalidArgument) if a
            /// hyper-parameter is out of range or a parameter is not a leaf
            /// tensor.
            ///
            /// # Examples
            ///
            /// ```
            #[doc = concat!("use netcl::optim::{AdamConfig, ", stringify!($name), "};")]
            ///
            /// let config = AdamConfig::new(1e-3).betas(0.9, 1.0);
            #[doc = concat!("let err = ", stringify!($name), "::try_new(Vec::new(), config).unwrap_err();")]
            #[doc = concat!("assert_eq!(err.to_string(), \"", stringify!($name), ": beta2 must be in [0, 1), got 1\");")]
            /// ```
            pub fn try_new(
                params: impl IntoIterator<Item = Tensor>,
                config: AdamConfig,
            ) -> Result<$name> {
                AdamCore::new(stringify!($name), params, config).map($name)
            }

            /// An optimizer over parameter groups, each with the config's
            /// weight decay or its own ([`ParamGroup::weight_decay`]).
            ///
            /// # Panics
            ///
            #[doc = concat!("As [`try_with_groups`](", stringify!($name), "::try_with_groups).")]
            #[track_caller]
            pub fn with_groups(
                groups: impl IntoIterator<Item = ParamGroup>,
                config: AdamConfig,
            ) -> $name {
                or_panic($name::try_with_groups(groups, config))
            }

            /// An optimizer over parameter groups, each with the config's
            /// weight decay or its own ([`ParamGroup::weight_decay`]).
            ///
            /// # Errors
            ///
            #[doc = concat!("As [`try_new`](", stringify!($name), "::try_new), and")]
            /// [`Error::InvalidArgument`](crate::Error::InvalidArgument) if
            /// a group's weight decay is negative or not finite, or a
            /// parameter is in two groups.
            pub fn try_with_groups(
                groups: impl IntoIterator<Item = ParamGroup>,
                config: AdamConfig,
            ) -> Result<$name> {
                AdamCore::with_groups(stringify!($name), groups, config).map($name)
            }

            /// The hyper-parameters (the learning rate as last set).
            pub fn config(&self) -> &AdamConfig {
                &self.0.config
            }

            /// The parameters this optimizer updates.
            pub fn params(&self) -> &[Tensor] {
                &self.0.params
            }
        }

        impl Optimizer for $name {
            fn step(&mut self) {
                self.0.step($decoupled);
            }

            fn zero_grad(&self) {
                self.0.zero_grad();
            }

            fn learning_rate(&self) -> f32 {
                self.0.config.lr
            }

            fn set_learning_rate(&mut self, lr: f32) {
                self.0.config.lr = lr;
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_struct(stringify!($name))
                    .field("params", &self.0.params.len())
                    .field("config", &self.0.config)
                    .finish()
            }
        }
    };
}

adam_variant!(Adam, false);

/// Adam with decoupled weight decay (Loshchilov & Hutter, 2019), as
/// PyTorch's `torch.optim.AdamW`: each step first shrinks the weights,
/// `w = w·(1 - η·λ)`, then takes an Adam step on the plain gradient.
///
/// PyTorch's default weight decay for AdamW is 0.01; [`AdamConfig::new`]
/// starts from 0, so set it explicitly.
///
/// # Examples
///
/// ```
/// use netcl::Tensor;
/// use netcl::optim::{AdamConfig, AdamW, Optimizer};
///
/// let w = Tensor::from_vec(vec![2.0], &[1])?.requires_grad_(true);
/// let mut adamw = AdamW::new([w.clone()], AdamConfig::new(0.1).weight_decay(0.5));
/// // A zero gradient: only the decay acts, w = 2·(1 - 0.1·0.5) = 1.9.
/// (&w * 0.0).sum().backward();
/// adamw.step();
/// assert!((w.item() - 1.9).abs() < 1e-6);
/// # Ok::<(), netcl::Error>(())
/// ```
pub struct AdamW(AdamCore);

adam_variant!(AdamW, true);
