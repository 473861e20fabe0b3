//! Normalisation layers (BatchNorm with running statistics, LayerNorm,
//! RmsNorm) and the embedding table.

use std::fmt;

use crate::error::{Error, Result, or_panic};
use crate::functional::try_batch_norm;
use crate::nn::{BufferState, Buffers, Module, TrainingFlag};
use crate::tensor::Tensor;

/// The layer behind [`BatchNorm1d`] and [`BatchNorm2d`].
struct BatchNormCore {
    weight: Option<Tensor>,
    bias: Option<Tensor>,
    state: BufferState,
    num_features: usize,
    eps: f32,
    momentum: f32,
    training: TrainingFlag,
}

impl BatchNormCore {
    fn new(op: &'static str, num_features: usize, affine: bool) -> Result<BatchNormCore> {
        if num_features == 0 {
            return Err(Error::InvalidArgument {
                op,
                message: format!("num_features must be positive, got {num_features}"),
            });
        }
        crate::array::checked_numel(op, &[num_features])?;
        let state = BufferState::new(Buffers::new([
            ("running_mean", Tensor::zeros(&[num_features])),
            ("running_var", Tensor::ones(&[num_features])),
            ("num_batches_tracked", Tensor::scalar(0.0)),
        ])?);
        Ok(BatchNormCore {
            weight: affine.then(|| Tensor::ones(&[num_features]).requires_grad_(true)),
            bias: affine.then(|| Tensor::zeros(&[num_features]).requires_grad_(true)),
            state,
            num_features,
            eps: 1e-5,
            momentum: 0.1,
            training: TrainingFlag::new(),
        })
    }

    fn fork(&self) -> BatchNormCore {
        BatchNormCore {
            weight: self.weight.as_ref().map(Tensor::fork),
            bias: self.bias.as_ref().map(Tensor::fork),
            state: self.state.fork(),
            num_features: self.num_features,
            eps: self.eps,
            momentum: self.momentum,
            training: self.training.clone(),
        }
    }

    fn forward(&self, input: &Tensor, training: bool) -> Result<Tensor> {
        if training {
            // The batch's share of the new running statistics, `momentum ·
            // batch statistic`, from running statistics of zero; the update
            // below adds `(1 - momentum) · old` to it from whichever
            // snapshot is current when it lands (compare-and-swap), so
            // concurrent trainers lose no update.
            let zeros = Tensor::zeros(&[self.num_features]);
            let out = try_batch_norm(
                input,
                Some(&zeros),
                Some(&zeros),
                self.weight.as_ref(),
                self.bias.as_ref(),
                true,
                self.momentum,
                self.eps,
            )?;
            let (Some(mean_share), Some(var_share)) = (out.running_mean, out.running_var) else {
                unreachable!("batch_norm returns running statistics in training mode when given")
            };
            let keep = 1.0 - self.momentum;
            self.state.update(|old| {
                let get = |name| old.get(name).expect("BatchNorm's buffers");
                Ok(vec![
                    get("running_mean") * keep + &mean_share,
                    get("running_var") * keep + &var_share,
                    get("num_batches_tracked") + 1.0,
                ])
            })?;
            Ok(out.output)
        } else {
            // One snapshot: mean and variance of the same update.
            let snapshot = self.state.load();
            let mean = snapshot.get("running_mean").expect("BatchNorm's buffers");
            let var = snapshot.get("running_var").expect("BatchNorm's buffers");
            Ok(try_batch_norm(
                input,
                Some(&mean),
                Some(&var),
                self.weight.as_ref(),
                self.bias.as_ref(),
                false,
                self.momentum,
                self.eps,
            )?
            .output)
        }
    }

    fn named_parameters(&self) -> Vec<(String, Tensor)> {
        super::weight_and_bias(self.weight.as_ref(), self.bias.as_ref())
    }
}

macro_rules! batch_norm_layer {
    ($(#[$doc:meta])* $name:ident, $label:literal, $ranks:expr, $expected:literal) => {
        $(#[$doc])*
        pub struct $name(BatchNormCore);

        impl $name {
            /// A layer over `num_features` channels with PyTorch's
            /// defaults: `eps = 1e-5`, `momentum = 0.1`, an affine
            /// `weight` (ones) and `bias` (zeros), running statistics
            /// tracked (mean zeros, variance ones).
            ///
            /// # Panics
            ///
            #[doc = concat!("As [`try_new`](", $label, "::try_new): if `num_features` is zero.")]
            #[track_caller]
            pub fn new(num_features: usize) -> $name {
                or_panic($name::try_new(num_features))
            }

            /// A layer over `num_features` channels with PyTorch's
            #[doc = concat!("defaults, as [`new`](", $label, "::new).")]
            ///
            /// # Errors
            ///
            /// [`Error::InvalidArgument`] if `num_features` is zero,
            /// [`Error::ShapeTooLarge`] if it is above
            /// [`Tensor::MAX_ELEMENTS`].
            ///
            /// # Examples
            ///
            /// ```
            #[doc = concat!("use netcl::nn::", $label, ";")]
            ///
            #[doc = concat!("let err = ", $label, "::try_new(0).unwrap_err();")]
            #[doc = concat!("assert_eq!(err.to_string(), \"", $label, ": num_features must be positive, got 0\");")]
            /// ```
            pub fn try_new(num_features: usize) -> Result<$name> {
                BatchNormCore::new($label, num_features, true).map($name)
            }

            /// A layer without `weight` and `bias` (PyTorch's
            /// `affine=False`).
            ///
            /// # Panics
            ///
            #[doc = concat!("As [`try_without_affine`](", $label, "::try_without_affine): if `num_features` is zero.")]
            #[track_caller]
            pub fn without_affine(num_features: usize) -> $name {
                or_panic($name::try_without_affine(num_features))
            }

            /// A layer without `weight` and `bias` (PyTorch's
            /// `affine=False`).
            ///
            /// # Errors
            ///
            /// [`Error::InvalidArgument`] if `num_features` is zero,
            /// [`Error::ShapeTooLarge`] if it is above
            /// [`Tensor::MAX_ELEMENTS`].
            pub fn try_without_affine(num_features: usize) -> Result<$name> {
                BatchNormCore::new($label, num_features, false).map($name)
            }

            /// This layer with `eps` added to the variance.
            pub fn with_eps(mut self, eps: f32) -> $name {
                self.0.eps = eps;
                self
            }

            /// This layer with running-statistics momentum `momentum`
            /// (`new = (1 - momentum) · old + momentum · batch`).
            pub fn with_momentum(mut self, momentum: f32) -> $name {
                self.0.momentum = momentum;
                self
            }

            /// The number of channels.
            pub fn num_features(&self) -> usize {
                self.0.num_features
            }

            /// `eps`.
            pub fn eps(&self) -> f32 {
                self.0.eps
            }

            /// The momentum of the running statistics.
            pub fn momentum(&self) -> f32 {
                self.0.momentum
            }

            /// The scale, `[num_features]`, if the layer is affine.
            pub fn weight(&self) -> Option<&Tensor> {
                self.0.weight.as_ref()
            }

            /// The shift, `[num_features]`, if the layer is affine.
            pub fn bias(&self) -> Option<&Tensor> {
                self.0.bias.as_ref()
            }

            /// The buffers (`running_mean`, `running_var`,
            /// `num_batches_tracked`), one snapshot.
            pub fn buffer_state(&self) -> &BufferState {
                &self.0.state
            }
        }

        impl Clone for $name {
            /// A fork (see [`Module::try_fork`]): parameters and buffers
            /// start from this layer's and are updated on their own.
            fn clone(&self) -> $name {
                $name(self.0.fork())
            }
        }

        impl Module for $name {
            #[doc = concat!("Normalises `input`, ", $expected, ", over its channel axis 1.")]
            ///
            /// In training mode (this thread's, as
            /// [`effective_training`](Module::effective_training) says)
            /// with the batch's statistics, installing the new running
            /// statistics and `num_batches_tracked + 1` with one
            /// [`BufferState::update`] (skipped if the state is frozen);
            /// in evaluation mode with the running statistics, read from
            /// one snapshot.
            ///
            /// # Errors
            ///
            /// [`Error::Rank`] for an input of another rank, and the errors
            /// of [`try_batch_norm`](crate::functional::try_batch_norm).
            fn forward(&self, input: &Tensor) -> Result<Tensor> {
                if !$ranks.contains(&input.ndim()) {
                    return Err(Error::Rank {
                        op: $label,
                        expected: $expected,
                        shape: input.shape().to_vec(),
                    });
                }
                self.0.forward(input, self.effective_training())
            }

            fn named_parameters(&self) -> Vec<(String, Tensor)> {
                self.0.named_parameters()
            }

            fn named_buffer_states(&self) -> Vec<(String, &BufferState)> {
                vec![(String::new(), &self.0.state)]
            }

            fn training_flag(&self) -> Option<&TrainingFlag> {
                Some(&self.0.training)
            }

            fn architecture(&self) -> Option<crate::nn::Architecture> {
                self.describe()
            }

            fn try_fork(&self) -> Result<Box<dyn Module>> {
                Ok(Box::new(self.clone()))
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_struct($label)
                    .field("num_features", &self.0.num_features)
                    .field("eps", &self.0.eps)
                    .field("momentum", &self.0.momentum)
                    .field("affine", &self.0.weight.is_some())
                    .field("buffers", &self.0.state)
                    .finish()
            }
        }
    };
}

batch_norm_layer!(
    /// Batch normalisation of `[N, C]` or `[N, C, L]` inputs, as PyTorch's
    /// `nn.BatchNorm1d`.
    ///
    /// Parameters `weight` and `bias` (`[C]`); buffers `running_mean`,
    /// `running_var` (`[C]`) and `num_batches_tracked` (a scalar), in one
    /// [`BufferState`], under PyTorch's names, so a `state_dict` loads
    /// with [`io::load_torch`](crate::io::load_torch).
    ///
    /// # Sharing between threads
    ///
    /// The running statistics are one immutable snapshot (see
    /// [`BufferState`]): a training forward computes its batch's share
    /// with no lock held and installs `(1 - momentum) · old + share` by
    /// compare-and-swap, recomputed from the newer snapshot if another
    /// thread got there first, so `n` training forwards from any threads
    /// add exactly `n` to `num_batches_tracked` and every batch is in the
    /// running statistics once. An evaluation forward reads mean and
    /// variance from one snapshot. A [`Published`](crate::nn::Published)
    /// version's buffers are frozen: it normalises a training batch with
    /// the batch's statistics but never changes its own.
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::Tensor;
    /// use netcl::nn::{BatchNorm1d, Module, eval_mode};
    ///
    /// let bn = BatchNorm1d::new(2);
    /// let x = Tensor::from_vec(vec![1.0, 10.0, 3.0, 30.0], &[2, 2])?;
    /// let y = bn.forward(&x)?; // training mode: the batch's statistics
    /// assert!((y.to_vec()[0] + 1.0).abs() < 1e-4);
    /// let names: Vec<String> = bn.named_buffers().into_iter().map(|(n, _)| n).collect();
    /// assert_eq!(names, ["running_mean", "running_var", "num_batches_tracked"]);
    /// assert_eq!(bn.named_buffers()[0].1.to_vec(), vec![0.2, 2.0]);
    /// assert_eq!(bn.named_buffers()[2].1.item(), 1.0);
    ///
    /// let _eval = eval_mode(); // the running statistics, nothing updated
    /// bn.forward(&x)?;
    /// assert_eq!(bn.named_buffers()[2].1.item(), 1.0);
    /// # Ok::<(), netcl::Error>(())
    /// ```
    BatchNorm1d,
    "BatchNorm1d",
    [2usize, 3],
    "[N, C] or [N, C, L]"
);

batch_norm_layer!(
    /// Batch normalisation of `[N, C, H, W]` inputs, as PyTorch's
    /// `nn.BatchNorm2d`.
    ///
    /// Parameters `weight` and `bias` (`[C]`); buffers `running_mean`,
    /// `running_var` (`[C]`) and `num_batches_tracked` (a scalar), as
    /// [`BatchNorm1d`], with the same semantics between threads.
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::Tensor;
    /// use netcl::nn::{BatchNorm2d, Module, Published, train_mode};
    ///
    /// let bn = BatchNorm2d::new(3);
    /// let published = Published::new(&bn)?;
    /// let _train = train_mode();
    /// let x = Tensor::ones(&[2, 3, 4, 4]);
    /// bn.forward(&x)?;
    /// assert_eq!(bn.named_buffers()[2].1.item(), 1.0);
    /// // The published version's statistics are frozen.
    /// published.load().forward(&x)?;
    /// assert_eq!(published.load().named_buffers()[2].1.item(), 0.0);
    /// # Ok::<(), netcl::Error>(())
    /// ```
    BatchNorm2d,
    "BatchNorm2d",
    [4usize],
    "[N, C, H, W]"
);

/// Checks a `normalized_shape`.
fn check_normalized_shape(op: &'static str, shape: &[usize]) -> Result<()> {
    if shape.is_empty() || shape.contains(&0) {
        return Err(Error::InvalidArgument {
            op,
            message: format!("normalized_shape must be non-empty and positive, got {shape:?}"),
        });
    }
    crate::array::checked_numel(op, shape)?;
    Ok(())
}

/// Layer normalisation over the last axes, as PyTorch's `nn.LayerNorm`
/// ([`functional::layer_norm`](crate::functional::layer_norm)).
///
/// Parameters, named as in a PyTorch `state_dict`: `weight` (ones) and
/// `bias` (zeros), of shape `normalized_shape`; `eps` is `1e-5` unless
/// set with [`with_eps`](LayerNorm::with_eps).
///
/// # Examples
///
/// ```
/// use netcl::Tensor;
/// use netcl::nn::{LayerNorm, Module};
///
/// let ln = LayerNorm::new(&[2]);
/// let y = ln.forward(&Tensor::from_vec(vec![1.0, 3.0], &[1, 2])?)?.to_vec();
/// assert!((y[0] + 1.0).abs() < 1e-4 && (y[1] - 1.0).abs() < 1e-4);
/// let names: Vec<String> = ln.named_parameters().into_iter().map(|(n, _)| n).collect();
/// assert_eq!(names, ["weight", "bias"]);
/// # Ok::<(), netcl::Error>(())
/// ```
pub struct LayerNorm {
    normalized_shape: Vec<usize>,
    weight: Option<Tensor>,
    bias: Option<Tensor>,
    eps: f32,
    training: TrainingFlag,
}

impl LayerNorm {
    /// A layer normalising over the last axes, of shape
    /// `normalized_shape`, with an elementwise affine `weight` and `bias`.
    ///
    /// # Panics
    ///
    /// As [`try_new`](LayerNorm::try_new): if `normalized_shape` is empty
    /// or has a zero.
    #[track_caller]
    pub fn new(normalized_shape: &[usize]) -> LayerNorm {
        or_panic(LayerNorm::try_new(normalized_shape))
    }

    /// A layer normalising over the last axes, of shape
    /// `normalized_shape`, with an elementwise affine `weight` and `bias`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] if `normalized_shape` is empty or has a
    /// zero, [`Error::ShapeTooLarge`] if it holds more than
    /// [`Tensor::MAX_ELEMENTS`] values.
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::nn::LayerNorm;
    ///
    /// let err = LayerNorm::try_new(&[4, 0]).unwrap_err();
    /// assert_eq!(
    ///     err.to_string(),
    ///     "LayerNorm: normalized_shape must be non-empty and positive, got [4, 0]"
    /// );
    /// ```
    pub fn try_new(normalized_shape: &[usize]) -> Result<LayerNorm> {
        LayerNorm::build(normalized_shape, true)
    }

    /// A layer without `weight` and `bias` (`elementwise_affine=False`).
    ///
    /// # Panics
    ///
    /// As [`try_without_affine`](LayerNorm::try_without_affine).
    #[track_caller]
    pub fn without_affine(normalized_shape: &[usize]) -> LayerNorm {
        or_panic(LayerNorm::try_without_affine(normalized_shape))
    }

    /// A layer without `weight` and `bias` (`elementwise_affine=False`).
    ///
    /// # Errors
    ///
    /// As [`try_new`](LayerNorm::try_new).
    pub fn try_without_affine(normalized_shape: &[usize]) -> Result<LayerNorm> {
        LayerNorm::build(normalized_shape, false)
    }

    fn build(normalized_shape: &[usize], affine: bool) -> Result<LayerNorm> {
        check_normalized_shape("LayerNorm", normalized_shape)?;
        Ok(LayerNorm {
            normalized_shape: normalized_shape.to_vec(),
            weight: affine.then(|| Tensor::ones(normalized_shape).requires_grad_(true)),
            bias: affine.then(|| Tensor::zeros(normalized_shape).requires_grad_(true)),
            eps: 1e-5,
            training: TrainingFlag::new(),
        })
    }

    /// This layer with `eps` added to the variance.
    pub fn with_eps(mut self, eps: f32) -> LayerNorm {
        self.eps = eps;
        self
    }

    /// The normalised shape.
    pub fn normalized_shape(&self) -> &[usize] {
        &self.normalized_shape
    }

    /// `eps`.
    pub fn eps(&self) -> f32 {
        self.eps
    }

    /// The scale, if the layer is affine.
    pub fn weight(&self) -> Option<&Tensor> {
        self.weight.as_ref()
    }

    /// The shift, if the layer is affine.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
}

impl Clone for LayerNorm {
    /// A fork (see [`Module::try_fork`]).
    fn clone(&self) -> LayerNorm {
        LayerNorm {
            normalized_shape: self.normalized_shape.clone(),
            weight: self.weight.as_ref().map(Tensor::fork),
            bias: self.bias.as_ref().map(Tensor::fork),
            eps: self.eps,
            training: self.training.clone(),
        }
    }
}

impl Module for LayerNorm {
    /// [`try_layer_norm`](crate::functional::try_layer_norm) with the
    /// layer's parameters.
    ///
    /// # Errors
    ///
    /// As [`try_layer_norm`](crate::functional::try_layer_norm).
    fn forward(&self, input: &Tensor) -> Result<Tensor> {
        crate::functional::try_layer_norm(
            input,
            &self.normalized_shape,
            self.weight.as_ref(),
            self.bias.as_ref(),
            self.eps,
        )
    }

    fn named_parameters(&self) -> Vec<(String, Tensor)> {
        super::weight_and_bias(self.weight.as_ref(), self.bias.as_ref())
    }

    fn training_flag(&self) -> Option<&TrainingFlag> {
        Some(&self.training)
    }

    fn architecture(&self) -> Option<crate::nn::Architecture> {
        self.describe()
    }

    fn try_fork(&self) -> Result<Box<dyn Module>> {
        Ok(Box::new(self.clone()))
    }
}

impl fmt::Debug for LayerNorm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LayerNorm")
            .field("normalized_shape", &self.normalized_shape)
            .field("eps", &self.eps)
            .field("affine", &self.weight.is_some())
            .finish()
    }
}

/// Root-mean-square normalisation over the last axes, as PyTorch's
/// `nn.RMSNorm` ([`functional::rms_norm`](crate::functional::rms_norm)):
/// parameter `weight` (ones) of shape `normalized_shape`; `eps` is
/// PyTorch's default (`None`: `f32::EPSILON`) unless set with
/// [`with_eps`](RmsNorm::with_eps).
///
/// # Examples
///
/// ```
/// use netcl::Tensor;
/// use netcl::nn::{Module, RmsNorm};
///
/// let norm = RmsNorm::new(&[2]);
/// let y = norm.forward(&Tensor::from_vec(vec![3.0, 4.0], &[1, 2])?)?.to_vec();
/// let rms = (12.5f32).sqrt();
/// assert!((y[0] - 3.0 / rms).abs() < 1e-5);
/// assert_eq!(norm.named_parameters()[0].0, "weight");
/// # Ok::<(), netcl::Error>(())
/// ```
pub struct RmsNorm {
    normalized_shape: Vec<usize>,
    weight: Option<Tensor>,
    eps: Option<f32>,
    training: TrainingFlag,
}

impl RmsNorm {
    /// A layer normalising over the last axes, of shape
    /// `normalized_shape`, with an elementwise `weight`.
    ///
    /// # Panics
    ///
    /// As [`try_new`](RmsNorm::try_new): if `normalized_shape` is empty or
    /// has a zero.
    #[track_caller]
    pub fn new(normalized_shape: &[usize]) -> RmsNorm {
        or_panic(RmsNorm::try_new(normalized_shape))
    }

    /// A layer normalising over the last axes, of shape
    /// `normalized_shape`, with an elementwise `weight`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] if `normalized_shape` is empty or has a
    /// zero, [`Error::ShapeTooLarge`] if it holds more than
    /// [`Tensor::MAX_ELEMENTS`] values.
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::nn::RmsNorm;
    ///
    /// let err = RmsNorm::try_new(&[]).unwrap_err();
    /// assert_eq!(
    ///     err.to_string(),
    ///     "RmsNorm: normalized_shape must be non-empty and positive, got []"
    /// );
    /// ```
    pub fn try_new(normalized_shape: &[usize]) -> Result<RmsNorm> {
        check_normalized_shape("RmsNorm", normalized_shape)?;
        Ok(RmsNorm {
            normalized_shape: normalized_shape.to_vec(),
            weight: Some(Tensor::ones(normalized_shape).requires_grad_(true)),
            eps: None,
            training: TrainingFlag::new(),
        })
    }

    /// A layer without `weight` (`elementwise_affine=False`).
    ///
    /// # Panics
    ///
    /// As [`try_without_affine`](RmsNorm::try_without_affine).
    #[track_caller]
    pub fn without_affine(normalized_shape: &[usize]) -> RmsNorm {
        or_panic(RmsNorm::try_without_affine(normalized_shape))
    }

    /// A layer without `weight` (`elementwise_affine=False`).
    ///
    /// # Errors
    ///
    /// As [`try_new`](RmsNorm::try_new).
    pub fn try_without_affine(normalized_shape: &[usize]) -> Result<RmsNorm> {
        let mut norm = RmsNorm::try_new(normalized_shape)?;
        norm.weight = None;
        Ok(norm)
    }

    /// This layer with `eps` added to the mean square.
    pub fn with_eps(mut self, eps: f32) -> RmsNorm {
        self.eps = Some(eps);
        self
    }

    /// The normalised shape.
    pub fn normalized_shape(&self) -> &[usize] {
        &self.normalized_shape
    }

    /// The scale, if the layer is affine.
    pub fn weight(&self) -> Option<&Tensor> {
        self.weight.as_ref()
    }
}

impl Clone for RmsNorm {
    /// A fork (see [`Module::try_fork`]).
    fn clone(&self) -> RmsNorm {
        RmsNorm {
            normalized_shape: self.normalized_shape.clone(),
            weight: self.weight.as_ref().map(Tensor::fork),
            eps: self.eps,
            training: self.training.clone(),
        }
    }
}

impl Module for RmsNorm {
    /// [`try_rms_norm`](crate::functional::try_rms_norm) with the layer's
    /// weight.
    ///
    /// # Errors
    ///
    /// As [`try_rms_norm`](crate::functional::try_rms_norm).
    fn forward(&self, input: &Tensor) -> Result<Tensor> {
        crate::functional::try_rms_norm(
            input,
            &self.normalized_shape,
            self.weight.as_ref(),
            self.eps,
        )
    }

    fn named_parameters(&self) -> Vec<(String, Tensor)> {
        self.weight
            .iter()
            .map(|w| ("weight".to_string(), w.clone()))
            .collect()
    }

    fn training_flag(&self) -> Option<&TrainingFlag> {
        Some(&self.training)
    }

    fn architecture(&self) -> Option<crate::nn::Architecture> {
        self.describe()
    }

    fn try_fork(&self) -> Result<Box<dyn Module>> {
        Ok(Box::new(self.clone()))
    }
}

impl fmt::Debug for RmsNorm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RmsNorm")
            .field("normalized_shape", &self.normalized_shape)
            .field("eps", &self.eps)
            .field("affine", &self.weight.is_some())
            .finish()
    }
}

/// A lookup table of `num_embeddings` vectors of `embedding_dim`, as
/// PyTorch's `nn.Embedding`: input ids (an `f32` tensor of whole numbers,
/// any shape), output `[.., embedding_dim]`
/// ([`functional::embedding`](crate::functional::embedding)).
///
/// Parameter `weight`, `[num_embeddings, embedding_dim]` (PyTorch's
/// layout), initialised from N(0, 1) as PyTorch does.
///
/// # Examples
///
/// ```
/// use netcl::Tensor;
/// use netcl::nn::{Embedding, Module};
/// use netcl::rand::SeedableRng;
///
/// let emb = Embedding::new(10, 4, &mut netcl::rand::rngs::StdRng::seed_from_u64(0));
/// let ids = Tensor::from_vec(vec![1.0, 7.0, 7.0], &[3])?;
/// let y = emb.forward(&ids)?;
/// assert_eq!(y.shape(), &[3, 4]);
/// assert_eq!(y.to_vec()[4..8], y.to_vec()[8..12]);
/// assert_eq!(emb.named_parameters()[0].0, "weight");
/// # Ok::<(), netcl::Error>(())
/// ```
pub struct Embedding {
    weight: Tensor,
    training: TrainingFlag,
}

impl Embedding {
    /// A table of `num_embeddings` vectors of `embedding_dim`, drawn from
    /// N(0, 1) with `rng`.
    ///
    /// # Panics
    ///
    /// As [`try_new`](Embedding::try_new): if a size is zero or the table
    /// would be too large.
    #[track_caller]
    pub fn new<R: rand::Rng + ?Sized>(
        num_embeddings: usize,
        embedding_dim: usize,
        rng: &mut R,
    ) -> Embedding {
        or_panic(Embedding::try_new(num_embeddings, embedding_dim, rng))
    }

    /// A table of `num_embeddings` vectors of `embedding_dim`, drawn from
    /// N(0, 1) with `rng`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] if a size is zero,
    /// [`Error::ShapeTooLarge`] if the table would hold more than
    /// [`Tensor::MAX_ELEMENTS`] values.
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::nn::Embedding;
    /// use netcl::rand::SeedableRng;
    ///
    /// let mut rng = netcl::rand::rngs::StdRng::seed_from_u64(0);
    /// let err = Embedding::try_new(10, 0, &mut rng).unwrap_err();
    /// assert_eq!(err.to_string(), "Embedding: sizes must be positive, got 10 x 0");
    /// ```
    pub fn try_new<R: rand::Rng + ?Sized>(
        num_embeddings: usize,
        embedding_dim: usize,
        rng: &mut R,
    ) -> Result<Embedding> {
        Embedding::build(num_embeddings, embedding_dim, |s| Tensor::randn(s, rng))
    }

    /// A table of zeros: the shell to load a checkpoint into.
    ///
    /// # Errors
    ///
    /// As [`try_new`](Embedding::try_new).
    pub fn zeros(num_embeddings: usize, embedding_dim: usize) -> Result<Embedding> {
        Embedding::build(num_embeddings, embedding_dim, Tensor::zeros)
    }

    fn build(num: usize, dim: usize, init: impl FnOnce(&[usize]) -> Tensor) -> Result<Embedding> {
        if num == 0 || dim == 0 {
            return Err(Error::InvalidArgument {
                op: "Embedding",
                message: format!("sizes must be positive, got {num} x {dim}"),
            });
        }
        crate::array::checked_numel("Embedding", &[num, dim])?;
        Ok(Embedding {
            weight: init(&[num, dim]).requires_grad_(true),
            training: TrainingFlag::new(),
        })
    }

    /// A layer using `weight`, `[num_embeddings, embedding_dim]` (marked
    /// as requiring grad).
    ///
    /// # Errors
    ///
    /// [`Error::Rank`] if the weight is not 2-D, [`Error::NotLeaf`] if it
    /// was computed by a recorded op.
    pub fn from_weight(weight: Tensor) -> Result<Embedding> {
        if weight.ndim() != 2 {
            return Err(Error::Rank {
                op: "Embedding::from_weight",
                expected: "a weight of shape [num_embeddings, embedding_dim]",
                shape: weight.shape().to_vec(),
            });
        }
        Ok(Embedding {
            weight: weight.try_requires_grad_(true)?,
            training: TrainingFlag::new(),
        })
    }

    /// The table, `[num_embeddings, embedding_dim]`: share it with a
    /// [`TiedLinear`](crate::nn::TiedLinear) to tie an output layer to it.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The number of vectors.
    pub fn num_embeddings(&self) -> usize {
        self.weight.shape()[0]
    }

    /// The size of each vector.
    pub fn embedding_dim(&self) -> usize {
        self.weight.shape()[1]
    }
}

impl Clone for Embedding {
    /// A fork (see [`Module::try_fork`]).
    fn clone(&self) -> Embedding {
        Embedding {
            weight: self.weight.fork(),
            training: self.training.clone(),
        }
    }
}

impl Module for Embedding {
    /// The rows of the table at the ids of `input`.
    ///
    /// # Errors
    ///
    /// As [`try_embedding`](crate::functional::try_embedding): an id that
    /// is not a whole number in `0..num_embeddings`.
    fn forward(&self, input: &Tensor) -> Result<Tensor> {
        crate::functional::try_embedding(input, &self.weight)
    }

    fn named_parameters(&self) -> Vec<(String, Tensor)> {
        vec![("weight".to_string(), self.weight.clone())]
    }

    fn training_flag(&self) -> Option<&TrainingFlag> {
        Some(&self.training)
    }

    fn architecture(&self) -> Option<crate::nn::Architecture> {
        self.describe()
    }

    fn try_fork(&self) -> Result<Box<dyn Module>> {
        Ok(Box::new(self.clone()))
    }
}

impl fmt::Debug for Embedding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Embedding")
            .field("num_embeddings", &self.num_embeddings())
            .field("embedding_dim", &self.embedding_dim())
            .finish()
    }
}

// Architecture nodes (`Module::architecture`, schema in `nn::architecture`).
use crate::nn::architecture::number_value;

impl BatchNormCore {
    fn describe(&self, kind: &str) -> Option<crate::nn::Architecture> {
        Some(
            crate::nn::Architecture::new(kind)
                .with("num_features", self.num_features)
                .with("eps", number_value(self.eps))
                .with("momentum", number_value(self.momentum))
                .with("affine", self.weight.is_some()),
        )
    }
}

impl BatchNorm1d {
    pub(crate) fn describe(&self) -> Option<crate::nn::Architecture> {
        self.0.describe("BatchNorm1d")
    }
}

impl BatchNorm2d {
    pub(crate) fn describe(&self) -> Option<crate::nn::Architecture> {
        self.0.describe("BatchNorm2d")
    }
}

impl LayerNorm {
    pub(crate) fn describe(&self) -> Option<crate::nn::Architecture> {
        // Weight and bias come together (`new`) or not at all.
        Some(
            crate::nn::Architecture::new("LayerNorm")
                .with("normalized_shape", self.normalized_shape.clone())
                .with("eps", number_value(self.eps))
                .with("affine", self.weight.is_some()),
        )
    }
}

impl RmsNorm {
    pub(crate) fn describe(&self) -> Option<crate::nn::Architecture> {
        Some(
            crate::nn::Architecture::new("RmsNorm")
                .with("normalized_shape", self.normalized_shape.clone())
                .with(
                    "eps",
                    self.eps.map_or(serde_json::Value::Null, number_value),
                )
                .with("affine", self.weight.is_some()),
        )
    }
}

impl Embedding {
    pub(crate) fn describe(&self) -> Option<crate::nn::Architecture> {
        Some(
            crate::nn::Architecture::new("Embedding")
                .with("num_embeddings", self.num_embeddings())
                .with("embedding_dim", self.embedding_dim()),
        )
    }
}
