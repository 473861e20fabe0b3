//! Containers: [`Sequential`] and the [`Mlp`] built on it.

use std::fmt;

use rand::Rng;

use crate::error::{Error, Result, or_panic};
use crate::nn::{
    Activation, BufferState, Linear, Module, TorchLayout, TrainingFlag, fork_scope, prefixed,
    prefixed_states,
};
use crate::tensor::Tensor;

/// A chain of modules, each applied to the output of the one before.
///
/// Parameter names are the layer's position followed by its own names
/// (`0.weight`, `2.bias`). An empty `Sequential` is the identity.
///
/// # Examples
///
/// ```
/// use netcl::Tensor;
/// use netcl::nn::{Linear, Module, ReLU, Sequential};
/// use netcl::rand::SeedableRng;
///
/// let mut rng = netcl::rand::rngs::StdRng::seed_from_u64(0);
/// let model = Sequential::new()
///     .with(Linear::new(4, 8, &mut rng))
///     .with(ReLU::new())
///     .with(Linear::new(8, 2, &mut rng));
/// assert_eq!(model.len(), 3);
/// assert_eq!(model.forward(&Tensor::ones(&[3, 4]))?.shape(), &[3, 2]);
///
/// let names: Vec<String> = model.named_parameters().into_iter().map(|(n, _)| n).collect();
/// assert_eq!(names, ["0.weight", "0.bias", "2.weight", "2.bias"]);
/// # Ok::<(), netcl::Error>(())
/// ```
pub struct Sequential {
    layers: Vec<Box<dyn Module>>,
    training: TrainingFlag,
}

impl Sequential {
    /// An empty chain.
    pub fn new() -> Sequential {
        Sequential {
            layers: Vec::new(),
            training: TrainingFlag::new(),
        }
    }

    /// The chain with `layer` appended, for use as a builder.
    #[must_use]
    pub fn with(mut self, layer: impl Module + 'static) -> Sequential {
        self.push(layer);
        self
    }

    /// Appends `layer`. It takes the chain's current training mode.
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::nn::{Module, ReLU, Sequential};
    ///
    /// let mut model = Sequential::new();
    /// model.eval();
    /// model.push(ReLU::new());
    /// assert!(!model.get(0).unwrap().is_training());
    /// ```
    pub fn push(&mut self, layer: impl Module + 'static) {
        self.push_boxed(Box::new(layer));
    }

    /// Appends an already boxed `layer`.
    pub fn push_boxed(&mut self, layer: Box<dyn Module>) {
        layer.set_training(self.training.get());
        self.layers.push(layer);
    }

    /// The number of layers.
    pub fn len(&self) -> usize {
        self.layers.len()
    }

    /// True if the chain has no layer.
    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }

    /// The layer at `index`, if any.
    pub fn get(&self, index: usize) -> Option<&dyn Module> {
        self.layers.get(index).map(|layer| &**layer)
    }

    /// The layers in order.
    pub fn iter(&self) -> impl Iterator<Item = &dyn Module> + '_ {
        self.layers.iter().map(|layer| &**layer)
    }

    /// A fork of the chain: every layer forked with [`Module::try_fork`]
    /// (new parameters sharing the current values copy-on-write), the
    /// training flags kept.
    ///
    /// # Errors
    ///
    /// [`Error::Unsupported`] naming the first layer that cannot be forked
    /// (a custom module that does not implement [`Module::try_fork`]).
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::nn::{Linear, Module, ReLU, Sequential};
    /// use netcl::rand::SeedableRng;
    ///
    /// let mut rng = netcl::rand::rngs::StdRng::seed_from_u64(0);
    /// let model = Sequential::new().with(Linear::new(3, 2, &mut rng)).with(ReLU::new());
    /// let fork = model.try_clone()?;
    /// assert_eq!(fork.len(), 2);
    /// let (a, b) = (&model.parameters()[0], &fork.parameters()[0]);
    /// assert_eq!(a.to_vec(), b.to_vec());
    /// b.with_data_mut(|mut w| w.fill(0.0));
    /// assert_ne!(a.to_vec(), b.to_vec());
    /// # Ok::<(), netcl::Error>(())
    /// ```
    pub fn try_clone(&self) -> Result<Sequential> {
        // In one fork scope: a weight shared by two layers stays shared.
        let layers = fork_scope(|| {
            self.layers
                .iter()
                .enumerate()
                .map(|(i, layer)| {
                    layer.try_fork().map_err(|err| Error::Unsupported {
                        op: "Sequential::try_clone",
                        message: format!("layer {i}: {err}"),
                    })
                })
                .collect::<Result<Vec<_>>>()
        })?;
        Ok(Sequential {
            layers,
            training: self.training.clone(),
        })
    }
}

impl Default for Sequential {
    fn default() -> Sequential {
        Sequential::new()
    }
}

impl FromIterator<Box<dyn Module>> for Sequential {
    fn from_iter<I: IntoIterator<Item = Box<dyn Module>>>(layers: I) -> Sequential {
        let mut chain = Sequential::new();
        for layer in layers {
            chain.push_boxed(layer);
        }
        chain
    }
}

impl Module for Sequential {
    fn forward(&self, input: &Tensor) -> Result<Tensor> {
        let Some((first, rest)) = self.layers.split_first() else {
            return Ok(input.clone());
        };
        let mut x = first.forward(input)?;
        for layer in rest {
            x = layer.forward(&x)?;
        }
        Ok(x)
    }

    fn named_parameters(&self) -> Vec<(String, Tensor)> {
        self.layers
            .iter()
            .enumerate()
            .flat_map(|(i, layer)| prefixed(&i.to_string(), layer.named_parameters()))
            .collect()
    }

    fn torch_layouts(&self) -> Vec<(String, TorchLayout)> {
        self.layers
            .iter()
            .enumerate()
            .flat_map(|(i, layer)| {
                let prefix = i.to_string();
                layer
                    .torch_layouts()
                    .into_iter()
                    .map(move |(name, layout)| (format!("{prefix}.{name}"), layout))
            })
            .collect()
    }

    fn named_buffer_states(&self) -> Vec<(String, &BufferState)> {
        self.layers
            .iter()
            .enumerate()
            .flat_map(|(i, layer)| prefixed_states(&i.to_string(), layer.named_buffer_states()))
            .collect()
    }

    fn set_training(&self, training: bool) {
        self.training.set(training);
        for layer in &self.layers {
            layer.set_training(training);
        }
    }

    fn training_flag(&self) -> Option<&TrainingFlag> {
        Some(&self.training)
    }

    fn architecture(&self) -> Option<crate::nn::Architecture> {
        self.describe()
    }

    fn try_fork(&self) -> Result<Box<dyn Module>> {
        Ok(Box::new(self.try_clone()?))
    }
}

impl fmt::Debug for Sequential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(&self.layers).finish()
    }
}

/// A multi-layer perceptron: [`Linear`] layers of the given widths with an
/// [`Activation`] between them (none after the last).
///
/// `Mlp::new(&[64, 128, 10], Activation::Relu, &mut rng)` is
/// `Linear(64, 128) → ReLU → Linear(128, 10)`, with parameters named
/// `layers.0.weight`, `layers.0.bias`, `layers.2.weight`, `layers.2.bias`.
///
/// # Examples
///
/// ```
/// use netcl::Tensor;
/// use netcl::nn::{Activation, Mlp, Module};
/// use netcl::rand::SeedableRng;
///
/// let mut rng = netcl::rand::rngs::StdRng::seed_from_u64(0);
/// let mlp = Mlp::new(&[64, 128, 10], Activation::Relu, &mut rng);
/// assert_eq!(mlp.dims(), &[64, 128, 10]);
/// let logits = mlp.forward(&Tensor::zeros(&[32, 64]))?;
/// assert_eq!(logits.shape(), &[32, 10]);
/// # Ok::<(), netcl::Error>(())
/// ```
pub struct Mlp {
    layers: Sequential,
    dims: Vec<usize>,
    activation: Activation,
}

impl Mlp {
    /// An MLP with layer widths `dims` (input first, output last).
    ///
    /// # Panics
    ///
    /// As [`try_new`](Mlp::try_new).
    #[track_caller]
    pub fn new<R: Rng + ?Sized>(dims: &[usize], activation: Activation, rng: &mut R) -> Mlp {
        or_panic(Mlp::try_new(dims, activation, rng))
    }

    /// An MLP with layer widths `dims` (input first, output last), its
    /// layers initialised from `rng` in order.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] if `dims` has fewer than two widths or a
    /// zero width, [`Error::ShapeTooLarge`] if a layer's weight would hold
    /// more than [`Tensor::MAX_ELEMENTS`](crate::Tensor::MAX_ELEMENTS)
    /// values.
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::nn::{Activation, Mlp};
    /// use netcl::rand::SeedableRng;
    ///
    /// let mut rng = netcl::rand::rngs::StdRng::seed_from_u64(0);
    /// let err = Mlp::try_new(&[64], Activation::Relu, &mut rng).unwrap_err();
    /// assert_eq!(
    ///     err.to_string(),
    ///     "Mlp: need at least an input and an output width, got [64]"
    /// );
    /// ```
    pub fn try_new<R: Rng + ?Sized>(
        dims: &[usize],
        activation: Activation,
        rng: &mut R,
    ) -> Result<Mlp> {
        Mlp::build(dims, activation, |input, output| {
            Linear::try_new(input, output, rng)
        })
    }

    /// An MLP with layer widths `dims` whose parameters are all zero: the
    /// shell to load a checkpoint into (with [`io::load`](crate::io::load)),
    /// no random generator needed.
    ///
    /// # Errors
    ///
    /// As [`try_new`](Mlp::try_new).
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::nn::{Activation, Mlp, Module};
    /// use netcl::rand::SeedableRng;
    ///
    /// let trained = Mlp::new(&[4, 8, 2], Activation::Relu, &mut netcl::rand::rngs::StdRng::seed_from_u64(0));
    /// let bytes = netcl::io::to_bytes(&trained)?;
    ///
    /// let restored = Mlp::zeros(&[4, 8, 2], Activation::Relu)?;
    /// netcl::io::load_bytes(&restored, &bytes)?;
    /// assert_eq!(restored.parameters()[0].to_vec(), trained.parameters()[0].to_vec());
    /// # Ok::<(), netcl::Error>(())
    /// ```
    pub fn zeros(dims: &[usize], activation: Activation) -> Result<Mlp> {
        Mlp::build(dims, activation, Linear::zeros)
    }

    fn build(
        dims: &[usize],
        activation: Activation,
        mut linear: impl FnMut(usize, usize) -> Result<Linear>,
    ) -> Result<Mlp> {
        if dims.len() < 2 || dims.contains(&0) {
            let problem = if dims.len() < 2 {
                "need at least an input and an output width"
            } else {
                "widths must be positive"
            };
            return Err(Error::InvalidArgument {
                op: "Mlp",
                message: format!("{problem}, got {dims:?}"),
            });
        }
        let mut layers = Sequential::new();
        for (i, pair) in dims.windows(2).enumerate() {
            if i > 0 {
                layers.push_boxed(activation.layer());
            }
            layers.push(linear(pair[0], pair[1])?);
        }
        Ok(Mlp {
            layers,
            dims: dims.to_vec(),
            activation,
        })
    }

    /// The layer widths, input first.
    pub fn dims(&self) -> &[usize] {
        &self.dims
    }

    /// The activation between layers.
    pub fn activation(&self) -> Activation {
        self.activation
    }

    /// The underlying chain of layers.
    pub fn layers(&self) -> &Sequential {
        &self.layers
    }

    /// An MLP with layer widths `dims`, initialised from a generator seeded
    /// with `seed`: the same model as
    /// `Mlp::new(dims, activation, &mut StdRng::seed_from_u64(seed))` with
    /// [`netcl::rand`](crate::rand)'s `StdRng`, without naming `rand`.
    ///
    /// The same seed gives the same model with the same netcl version;
    /// `StdRng`'s algorithm may change when netcl moves to a new `rand`.
    ///
    /// # Panics
    ///
    /// As [`try_new`](Mlp::try_new).
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::Tensor;
    /// use netcl::nn::{Activation, Mlp, Module};
    ///
    /// let mlp = Mlp::seeded(&[4, 8, 3], Activation::Tanh, 7);
    /// let x = Tensor::ones(&[2, 4]);
    /// let again = Mlp::seeded(&[4, 8, 3], Activation::Tanh, 7);
    /// assert_eq!(mlp.forward(&x)?.to_vec(), again.forward(&x)?.to_vec());
    /// # Ok::<(), netcl::Error>(())
    /// ```
    #[track_caller]
    pub fn seeded(dims: &[usize], activation: Activation, seed: u64) -> Mlp {
        use rand::SeedableRng;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        Mlp::new(dims, activation, &mut rng)
    }
}

impl Clone for Mlp {
    /// A fork: an independent MLP with new parameters that start with this
    /// one's current values (shared copy-on-write, so cloning copies no
    /// values; see [`Module::try_fork`]).
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::Tensor;
    /// use netcl::nn::{Activation, Mlp, Module};
    /// use netcl::rand::SeedableRng;
    ///
    /// let mlp = Mlp::new(&[4, 8, 2], Activation::Relu, &mut netcl::rand::rngs::StdRng::seed_from_u64(0));
    /// let fork = mlp.clone();
    /// let x = Tensor::ones(&[1, 4]);
    /// assert_eq!(mlp.forward(&x)?.to_vec(), fork.forward(&x)?.to_vec());
    /// # Ok::<(), netcl::Error>(())
    /// ```
    fn clone(&self) -> Mlp {
        Mlp {
            layers: self
                .layers
                .try_clone()
                .expect("an Mlp holds only built-in layers, which all fork"),
            dims: self.dims.clone(),
            activation: self.activation,
        }
    }
}

impl Module for Mlp {
    fn forward(&self, input: &Tensor) -> Result<Tensor> {
        self.layers.forward(input)
    }

    fn named_parameters(&self) -> Vec<(String, Tensor)> {
        prefixed("layers", self.layers.named_parameters())
    }

    fn named_buffer_states(&self) -> Vec<(String, &BufferState)> {
        prefixed_states("layers", self.layers.named_buffer_states())
    }

    fn torch_layouts(&self) -> Vec<(String, TorchLayout)> {
        self.layers
            .torch_layouts()
            .into_iter()
            .map(|(name, layout)| (format!("layers.{name}"), layout))
            .collect()
    }

    fn set_training(&self, training: bool) {
        self.layers.set_training(training);
    }

    fn training_flag(&self) -> Option<&TrainingFlag> {
        self.layers.training_flag()
    }

    fn architecture(&self) -> Option<crate::nn::Architecture> {
        self.describe()
    }

    fn try_fork(&self) -> Result<Box<dyn Module>> {
        Ok(Box::new(self.clone()))
    }
}

impl fmt::Debug for Mlp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Mlp")
            .field("dims", &self.dims)
            .field("activation", &self.activation)
            .finish()
    }
}

impl Sequential {
    /// The architecture node (`Module::architecture`): `None` if a layer
    /// has none.
    pub(crate) fn describe(&self) -> Option<crate::nn::Architecture> {
        self.layers
            .iter()
            .try_fold(crate::nn::Architecture::new("Sequential"), |arch, layer| {
                Some(arch.with_child(layer.architecture()?))
            })
    }
}

impl Mlp {
    /// The architecture node (`Module::architecture`).
    pub(crate) fn describe(&self) -> Option<crate::nn::Architecture> {
        let activation = match self.activation {
            Activation::Relu => "relu",
            Activation::Sigmoid => "sigmoid",
            Activation::Tanh => "tanh",
        };
        Some(
            crate::nn::Architecture::new("Mlp")
                .with("dims", self.dims.clone())
                .with("activation", activation),
        )
    }
}
