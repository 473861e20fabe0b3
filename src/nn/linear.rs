//! The fully connected layer.

use std::fmt;

use rand::Rng;

use crate::array::checked_numel;
use crate::error::{Error, Result, or_panic};
use crate::nn::{Module, TorchLayout, TrainingFlag};
use crate::tensor::Tensor;

/// A fully connected layer: `y = x · W + b`.
///
/// `W` has shape `[in_features, out_features]` and `b` shape
/// `[out_features]`. The input is `[.., in_features]` (a batch of rows, or
/// any number of leading batch axes) and the output `[.., out_features]`.
///
/// The weight is stored input-major so the forward is one matrix product of
/// two row-major operands with no transpose node on the tape. PyTorch's
/// `nn.Linear` stores the transpose (`[out_features, in_features]`):
/// [`io::load_torch`](crate::io::load_torch) and
/// [`io::save_torch`](crate::io::save_torch) transpose it, in one place,
/// guided by [`Module::torch_layouts`]; [`io::load`](crate::io::load) and
/// [`io::save`](crate::io::save) keep netcl's layout, so every netcl
/// checkpoint still loads.
///
/// New layers use the usual default initialisation (Kaiming-uniform with
/// `a = √5`, as PyTorch's `nn.Linear`): weight and bias drawn uniformly from
/// `[-1/√in_features, 1/√in_features)` with the caller's generator, so a seeded
/// generator gives the same layer every time.
///
/// # Examples
///
/// ```
/// use netcl::Tensor;
/// use netcl::nn::{Linear, Module};
/// use netcl::rand::SeedableRng;
/// use netcl::rand::rngs::StdRng;
///
/// let layer = Linear::new(3, 2, &mut StdRng::seed_from_u64(0));
/// let y = layer.forward(&Tensor::ones(&[5, 3]))?;
/// assert_eq!(y.shape(), &[5, 2]);
///
/// let bound = 1.0 / 3f32.sqrt();
/// assert!(layer.weight().to_vec().iter().all(|w| w.abs() <= bound));
///
/// // Same seed, same layer.
/// let again = Linear::new(3, 2, &mut StdRng::seed_from_u64(0));
/// assert_eq!(layer.weight().to_vec(), again.weight().to_vec());
/// # Ok::<(), netcl::Error>(())
/// ```
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
    training: TrainingFlag,
}

impl Linear {
    /// A layer from `in_features` to `out_features` with a bias, initialised
    /// from `rng`.
    ///
    /// # Panics
    ///
    /// As [`try_new`](Linear::try_new).
    #[track_caller]
    pub fn new<R: Rng + ?Sized>(in_features: usize, out_features: usize, rng: &mut R) -> Linear {
        or_panic(Linear::try_new(in_features, out_features, rng))
    }

    /// A layer from `in_features` to `out_features` with a bias, initialised
    /// from `rng`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] if either size is zero,
    /// [`Error::ShapeTooLarge`] if the weight would hold more than
    /// [`Tensor::MAX_ELEMENTS`] values.
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::nn::Linear;
    /// use netcl::rand::SeedableRng;
    ///
    /// let mut rng = netcl::rand::rngs::StdRng::seed_from_u64(0);
    /// let err = Linear::try_new(0, 4, &mut rng).unwrap_err();
    /// assert_eq!(err.to_string(), "Linear: sizes must be positive, got 0 -> 4");
    /// ```
    pub fn try_new<R: Rng + ?Sized>(
        in_features: usize,
        out_features: usize,
        rng: &mut R,
    ) -> Result<Linear> {
        Linear::build(in_features, out_features, true, rng)
    }

    /// A layer without bias (`y = x · W`), initialised from `rng`.
    ///
    /// # Panics
    ///
    /// If either size is zero.
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::nn::{Linear, Module};
    /// use netcl::rand::SeedableRng;
    ///
    /// let layer = Linear::without_bias(4, 2, &mut netcl::rand::rngs::StdRng::seed_from_u64(0));
    /// assert!(layer.bias().is_none());
    /// assert_eq!(layer.named_parameters().len(), 1);
    /// ```
    #[track_caller]
    pub fn without_bias<R: Rng + ?Sized>(
        in_features: usize,
        out_features: usize,
        rng: &mut R,
    ) -> Linear {
        or_panic(Linear::build(in_features, out_features, false, rng))
    }

    fn build<R: Rng + ?Sized>(
        in_features: usize,
        out_features: usize,
        bias: bool,
        rng: &mut R,
    ) -> Result<Linear> {
        // kaiming_uniform(a = √5): gain √(2 / (1 + 5)) = √(1/3), bound
        // gain · √(3 / fan_in) = 1/√fan_in; the bias uses the same bound.
        let bound = 1.0 / (in_features as f32).sqrt();
        Linear::build_with(in_features, out_features, bias, |shape| {
            Tensor::uniform(shape, -bound, bound, rng)
        })
    }

    /// A layer whose parameters are made by `init` (weight first), after
    /// checking the sizes.
    fn build_with(
        in_features: usize,
        out_features: usize,
        bias: bool,
        mut init: impl FnMut(&[usize]) -> Tensor,
    ) -> Result<Linear> {
        if in_features == 0 || out_features == 0 {
            return Err(Error::InvalidArgument {
                op: "Linear",
                message: format!("sizes must be positive, got {in_features} -> {out_features}"),
            });
        }
        // A weight too large to exist is an error here, not a panic in the
        // constructor that would allocate it.
        checked_numel("Linear", &[in_features, out_features])?;
        let weight = init(&[in_features, out_features]);
        let bias = bias.then(|| init(&[out_features]));
        Ok(Linear {
            weight: weight.requires_grad_(true),
            bias: bias.map(|b| b.requires_grad_(true)),
            training: TrainingFlag::new(),
        })
    }

    /// A layer from `in_features` to `out_features` with a bias, all
    /// parameters zero: the shell to load a checkpoint into (with
    /// [`io::load`](crate::io::load)), no random generator needed.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] if either size is zero,
    /// [`Error::ShapeTooLarge`] if the weight would hold more than
    /// [`Tensor::MAX_ELEMENTS`] values.
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::nn::{Linear, Module};
    ///
    /// let layer = Linear::zeros(3, 2)?;
    /// assert!(layer.parameters().iter().all(|p| p.to_vec().iter().all(|&v| v == 0.0)));
    /// # Ok::<(), netcl::Error>(())
    /// ```
    pub fn zeros(in_features: usize, out_features: usize) -> Result<Linear> {
        Linear::build_with(in_features, out_features, true, Tensor::zeros)
    }

    /// A layer with the given weight, `[in_features, out_features]`, and
    /// optional bias, `[out_features]`. Both are marked as requiring grad.
    ///
    /// # Errors
    ///
    /// [`Error::Rank`] if the weight is not 2-D, [`Error::ShapeMismatch`] if
    /// the bias does not have shape `[out_features]`, [`Error::NotLeaf`] if
    /// either was computed by a recorded op (use
    /// [`detach`](Tensor::detach)).
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::Tensor;
    /// use netcl::nn::{Linear, Module};
    ///
    /// let w = Tensor::from_vec(vec![1.0, 2.0], &[2, 1])?;
    /// let b = Tensor::from_vec(vec![0.5], &[1])?;
    /// let layer = Linear::from_parts(w, Some(b))?;
    /// let x = Tensor::from_vec(vec![3.0, 4.0], &[1, 2])?;
    /// assert_eq!(layer.forward(&x)?.to_vec(), vec![11.5]);
    /// # Ok::<(), netcl::Error>(())
    /// ```
    pub fn from_parts(weight: Tensor, bias: Option<Tensor>) -> Result<Linear> {
        if weight.ndim() != 2 {
            return Err(Error::Rank {
                op: "Linear::from_parts",
                expected: "a weight of shape [in_features, out_features]",
                shape: weight.shape().to_vec(),
            });
        }
        let out_features = weight.shape()[1];
        if let Some(b) = bias.as_ref().filter(|b| b.shape() != [out_features]) {
            return Err(Error::ShapeMismatch {
                op: "Linear::from_parts",
                lhs: vec![out_features],
                rhs: b.shape().to_vec(),
            });
        }
        Ok(Linear {
            weight: weight.try_requires_grad_(true)?,
            bias: bias.map(|b| b.try_requires_grad_(true)).transpose()?,
            training: TrainingFlag::new(),
        })
    }

    /// The weight, `[in_features, out_features]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The bias, `[out_features]`, if the layer has one.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// The size of each input row.
    pub fn in_features(&self) -> usize {
        self.weight.shape()[0]
    }

    /// The size of each output row.
    pub fn out_features(&self) -> usize {
        self.weight.shape()[1]
    }

    /// A layer from `in_features` to `out_features` with a bias, initialised
    /// from a generator seeded with `seed`: the same layer as
    /// `Linear::new(in_features, out_features, &mut StdRng::seed_from_u64(seed))`
    /// with [`netcl::rand`](crate::rand)'s `StdRng`, without naming `rand`.
    ///
    /// The same seed gives the same layer with the same netcl version;
    /// `StdRng`'s algorithm may change when netcl moves to a new `rand`.
    ///
    /// # Panics
    ///
    /// As [`try_new`](Linear::try_new).
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::nn::Linear;
    /// use netcl::rand::SeedableRng;
    /// use netcl::rand::rngs::StdRng;
    ///
    /// let layer = Linear::seeded(3, 2, 42);
    /// let same = Linear::new(3, 2, &mut StdRng::seed_from_u64(42));
    /// assert_eq!(layer.weight().to_vec(), same.weight().to_vec());
    /// assert_ne!(layer.weight().to_vec(), Linear::seeded(3, 2, 43).weight().to_vec());
    /// ```
    #[track_caller]
    pub fn seeded(in_features: usize, out_features: usize, seed: u64) -> Linear {
        use rand::SeedableRng;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        Linear::new(in_features, out_features, &mut rng)
    }
}

impl Clone for Linear {
    /// A fork: an independent layer with this one's training flag and new
    /// parameters that start with this layer's current values (shared
    /// copy-on-write, so cloning copies no values; see
    /// [`Module::try_fork`]).
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::nn::Linear;
    /// use netcl::rand::SeedableRng;
    ///
    /// let layer = Linear::new(2, 2, &mut netcl::rand::rngs::StdRng::seed_from_u64(0));
    /// let fork = layer.clone();
    /// fork.weight().with_data_mut(|mut w| w.fill(0.0));
    /// assert_ne!(layer.weight().to_vec(), fork.weight().to_vec());
    /// ```
    fn clone(&self) -> Linear {
        Linear {
            weight: self.weight.fork(),
            bias: self.bias.as_ref().map(Tensor::fork),
            training: self.training.clone(),
        }
    }
}

impl Module for Linear {
    /// `input · W + b` for `input` of shape `[.., in_features]`, as one
    /// fused op ([`Tensor::try_linear`]).
    ///
    /// # Errors
    ///
    /// [`Error::Rank`] if `input` is 0-dimensional,
    /// [`Error::MatmulShape`] if its last dimension is not `in_features`.
    #[track_caller]
    fn forward(&self, input: &Tensor) -> Result<Tensor> {
        input.try_linear(&self.weight, self.bias.as_ref())
    }

    fn named_parameters(&self) -> Vec<(String, Tensor)> {
        super::weight_and_bias(Some(&self.weight), self.bias.as_ref())
    }

    fn training_flag(&self) -> Option<&TrainingFlag> {
        Some(&self.training)
    }

    fn torch_layouts(&self) -> Vec<(String, TorchLayout)> {
        vec![("weight".to_string(), TorchLayout::Transposed)]
    }

    fn architecture(&self) -> Option<crate::nn::Architecture> {
        self.describe()
    }

    fn try_fork(&self) -> Result<Box<dyn Module>> {
        Ok(Box::new(self.clone()))
    }
}

impl fmt::Debug for Linear {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Linear")
            .field("in_features", &self.in_features())
            .field("out_features", &self.out_features())
            .field("bias", &self.bias.is_some())
            .finish()
    }
}

/// A fully connected layer whose weight is in PyTorch's layout,
/// `[out_features, in_features]`, and usually shared with another layer:
/// `y = x · Wᵀ + b`. It is the output layer tied to an embedding, whose
/// `[vocab, d]` table is exactly such a weight (GPT-style weight tying).
///
/// [`new`](TiedLinear::new) shares the given tensor (a handle, not a
/// copy): the tied parameter appears once in
/// [`parameters`](Module::parameters) and once in a checkpoint (under the
/// name that comes first, usually the embedding's), receives the
/// gradients of both layers, and stays shared in forks (see
/// [`fork_scope`](crate::nn::fork_scope)). Its weight needs no transpose
/// for PyTorch ([`Module::torch_layouts`] lists nothing): in a PyTorch
/// checkpoint it is `nn.Linear.weight` as it is.
///
/// # Examples
///
/// A 3-token vocabulary embedded in 2 dimensions, the output layer tied
/// to the embedding table:
///
/// ```
/// use netcl::Tensor;
/// use netcl::functional::embedding;
/// use netcl::nn::{Module, TiedLinear};
///
/// let table = Tensor::from_vec(vec![1.0, 0.0, 0.0, 1.0, 1.0, 1.0], &[3, 2])?.requires_grad_(true);
/// let head = TiedLinear::new(&table, None);
/// assert_eq!((head.in_features(), head.out_features()), (2, 3));
///
/// let ids = Tensor::from_vec(vec![2.0], &[1])?;
/// let logits = head.forward(&embedding(&ids, &table))?; // e₂ · Eᵀ
/// assert_eq!(logits.to_vec(), vec![1.0, 1.0, 2.0]);
///
/// // One parameter, with the gradients of both uses.
/// assert!(head.weight().same_tensor(&table));
/// logits.sum().backward();
/// // d/dE of sum(e₂ · Eᵀ): every row gets e₂ = (1, 1), and row 2 also gets
/// // the column sums of E, (2, 2).
/// assert_eq!(table.grad().unwrap().to_vec(), vec![1.0, 1.0, 1.0, 1.0, 3.0, 3.0]);
/// # Ok::<(), netcl::Error>(())
/// ```
pub struct TiedLinear {
    weight: Tensor,
    bias: Option<Tensor>,
    training: TrainingFlag,
}

impl TiedLinear {
    /// A layer using `weight`, `[out_features, in_features]` (shared, not
    /// copied), and an optional bias, `[out_features]` (marked as
    /// requiring grad).
    ///
    /// # Panics
    ///
    /// As [`try_new`](TiedLinear::try_new): if the weight is not 2-D, the
    /// bias is not `[out_features]` or was computed by a recorded op.
    #[track_caller]
    pub fn new(weight: &Tensor, bias: Option<Tensor>) -> TiedLinear {
        or_panic(TiedLinear::try_new(weight, bias))
    }

    /// A layer using `weight`, `[out_features, in_features]` (shared, not
    /// copied), and an optional bias, `[out_features]` (marked as
    /// requiring grad).
    ///
    /// # Errors
    ///
    /// [`Error::Rank`] if the weight is not 2-D, [`Error::ShapeMismatch`]
    /// if the bias is not `[out_features]`, [`Error::NotLeaf`] if the bias
    /// was computed by a recorded op.
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::Tensor;
    /// use netcl::nn::TiedLinear;
    ///
    /// let table = Tensor::zeros(&[5, 2]);
    /// let err = TiedLinear::try_new(&table, Some(Tensor::zeros(&[2]))).unwrap_err();
    /// assert_eq!(
    ///     err.to_string(),
    ///     "TiedLinear: shape mismatch, [5] vs [2]"
    /// );
    /// ```
    pub fn try_new(weight: &Tensor, bias: Option<Tensor>) -> Result<TiedLinear> {
        if weight.ndim() != 2 {
            return Err(Error::Rank {
                op: "TiedLinear",
                expected: "a weight of shape [out_features, in_features]",
                shape: weight.shape().to_vec(),
            });
        }
        let out_features = weight.shape()[0];
        if let Some(b) = bias.as_ref().filter(|b| b.shape() != [out_features]) {
            return Err(Error::ShapeMismatch {
                op: "TiedLinear",
                lhs: vec![out_features],
                rhs: b.shape().to_vec(),
            });
        }
        Ok(TiedLinear {
            weight: weight.clone(),
            bias: bias.map(|b| b.try_requires_grad_(true)).transpose()?,
            training: TrainingFlag::new(),
        })
    }

    /// The shared weight, `[out_features, in_features]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The bias, `[out_features]`, if the layer has one.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// The size of each input row.
    pub fn in_features(&self) -> usize {
        self.weight.shape()[1]
    }

    /// The size of each output row.
    pub fn out_features(&self) -> usize {
        self.weight.shape()[0]
    }
}

impl Clone for TiedLinear {
    /// A fork (see [`Module::try_fork`]): still tied to the other layer
    /// only inside one [`fork_scope`](crate::nn::fork_scope) with it, as
    /// when the container holding both is forked.
    fn clone(&self) -> TiedLinear {
        TiedLinear {
            weight: self.weight.fork(),
            bias: self.bias.as_ref().map(Tensor::fork),
            training: self.training.clone(),
        }
    }
}

impl Module for TiedLinear {
    /// `input · Wᵀ + b` for `input` of shape `[.., in_features]`.
    ///
    /// # Errors
    ///
    /// [`Error::Rank`] if `input` is 0-dimensional,
    /// [`Error::MatmulShape`] if its last dimension is not `in_features`.
    fn forward(&self, input: &Tensor) -> Result<Tensor> {
        input.try_linear(&self.weight.try_t()?, self.bias.as_ref())
    }

    fn named_parameters(&self) -> Vec<(String, Tensor)> {
        super::weight_and_bias(Some(&self.weight), self.bias.as_ref())
    }

    fn training_flag(&self) -> Option<&TrainingFlag> {
        Some(&self.training)
    }

    fn try_fork(&self) -> Result<Box<dyn Module>> {
        Ok(Box::new(self.clone()))
    }
}

impl fmt::Debug for TiedLinear {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TiedLinear")
            .field("in_features", &self.in_features())
            .field("out_features", &self.out_features())
            .field("bias", &self.bias.is_some())
            .finish()
    }
}

impl Linear {
    /// The architecture node (`Module::architecture`).
    pub(crate) fn describe(&self) -> Option<crate::nn::Architecture> {
        Some(
            crate::nn::Architecture::new("Linear")
                .with("in_features", self.in_features())
                .with("out_features", self.out_features())
                .with("bias", self.bias.is_some()),
        )
    }
}
