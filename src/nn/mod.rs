//! Neural-network building blocks: the [`Module`] trait and its layers.
//!
//! | | |
//! |---|---|
//! | [`Linear`] | `x · W + b`, Kaiming-uniform initialised from a seeded RNG |
//! | [`TiedLinear`] | `x · Wᵀ + b` with a shared `[out, in]` weight: an output layer tied to an embedding |
//! | [`ReLU`], [`Sigmoid`], [`Tanh`] | element-wise activations |
//! | [`Conv2d`] | 2-D convolution, PyTorch's OIHW weight |
//! | [`MaxPool2d`], [`AvgPool2d`], [`AdaptiveAvgPool2d`], [`Flatten`] | pooling and flattening |
//! | [`Gelu`], [`Silu`] | the GELU and SiLU activations |
//! | [`BatchNorm1d`], [`BatchNorm2d`] | batch normalisation with running statistics in a [`BufferState`] |
//! | [`LayerNorm`], [`RmsNorm`] | normalisation over the last axes |
//! | [`Embedding`] | a lookup table of vectors |
//! | [`MultiheadAttention`], [`TransformerBlock`] | batch-first attention (PyTorch's names) and a pre-norm block, with [`AttentionMasks`] |
//! | [`Dropout`] | zeroes inputs at random in training mode, seeded |
//! | [`Sequential`] | a chain of modules |
//! | [`Mlp`] | a multi-layer perceptron built from a list of widths |
//! | [`Published`] | the versions of a model served while it trains |
//! | [`BufferState`], [`Buffers`] | a stateful layer's buffers (running statistics), swapped whole |
//! | [`fork_scope`] | forks that keep tied (shared) weights shared |
//! | [`Architecture`], [`register_kind`] | a model's architecture as data, for self-describing checkpoints ([`io::save_model`](crate::io::save_model)) |
//! | [`TorchLayout`] | how a parameter's layout differs from PyTorch's, for [`io::load_torch`](crate::io::load_torch) |
//!
//! # Sharing one model between threads
//!
//! Every module is `Send + Sync` and every method takes `&self`: put a model
//! in an `Arc` and call [`forward`](Module::forward) from as many threads as
//! you like. Three rules keep that correct while the model changes:
//!
//! - **No lock is held while computing.** An op snapshots its operands'
//!   values (O(1), copy-on-write) and computes with no lock held; an
//!   optimizer's update of a parameter is atomic and never waits for a
//!   forward, nor a forward for it.
//! - **Served weights are versions.** An optimizer updates one parameter
//!   at a time, so a forward running beside a training step can see layer
//!   0 after the step and layer 1 before it. Serve from a [`Published`]
//!   model instead: the trainer publishes the whole parameter set as one
//!   immutable version (O(1) per parameter), and readers run each forward
//!   against one version.
//! - **Buffers are snapshots.** A stateful layer's running statistics live
//!   in a [`BufferState`]: a forward reads them from one immutable
//!   snapshot, a training forward installs the next one by
//!   compare-and-swap (no update is lost when threads train one layer at
//!   once), and a [`Published`] version's are frozen.
//! - **Training and evaluation are per thread.** [`eval_mode`] and
//!   [`train_mode`] set the mode of the calling thread only (and travel with
//!   its [`GradMode`](crate::autograd::GradMode) into `netcl::parallel`
//!   tasks); a module's own flag ([`train`](Module::train),
//!   [`eval`](Module::eval)) is only the default for threads that set no
//!   mode. `train::evaluate` and `Trainer` set the thread's mode and never
//!   touch the model's flag, so evaluation on one thread never switches off
//!   [`Dropout`] in another thread's training step.
//!
//! # Examples
//!
//! A classifier for 8x8 images, evaluated by four threads at once:
//!
//! ```
//! use std::sync::Arc;
//!
//! use netcl::nn::{Activation, Mlp, Module};
//! use netcl::{Tensor, autograd};
//! use netcl::rand::SeedableRng;
//! use netcl::rand::rngs::StdRng;
//!
//! let mut rng = StdRng::seed_from_u64(0);
//! let model = Arc::new(Mlp::new(&[64, 128, 10], Activation::Relu, &mut rng));
//! model.eval();
//!
//! let names: Vec<String> = model.named_parameters().into_iter().map(|(n, _)| n).collect();
//! assert_eq!(names, ["layers.0.weight", "layers.0.bias", "layers.2.weight", "layers.2.bias"]);
//!
//! std::thread::scope(|s| {
//!     for _ in 0..4 {
//!         let model = Arc::clone(&model);
//!         s.spawn(move || {
//!             let _guard = autograd::no_grad();
//!             let logits = model.forward(&Tensor::ones(&[2, 64])).unwrap();
//!             assert_eq!(logits.shape(), &[2, 10]);
//!         });
//!     }
//! });
//! ```

mod activation;
pub mod architecture;
mod attention;
mod buffers;
mod conv;
mod dropout;
mod linear;
mod norm;
mod published;
mod sequential;

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

pub use activation::{Activation, ReLU, Sigmoid, Tanh};
pub use architecture::{
    ARCHITECTURE_SCHEMA_VERSION, Architecture, BuildContext, BuildFn, known_kinds, register_kind,
};
pub use attention::{AttentionMasks, MultiheadAttention, TransformerBlock};
pub(crate) use buffers::prefixed_states;
pub use buffers::{BufferState, Buffers};
pub use conv::{AdaptiveAvgPool2d, AvgPool2d, Conv2d, Flatten, Gelu, MaxPool2d, Silu};
pub use dropout::Dropout;
pub use linear::{Linear, TiedLinear};
pub use norm::{BatchNorm1d, BatchNorm2d, Embedding, LayerNorm, RmsNorm};
pub use published::{Published, Version};
pub use sequential::{Mlp, Sequential};

/// The per-thread training mode, also available from [`crate::autograd`].
pub use crate::autograd::{TrainingGuard, eval_mode, train_mode, training_mode};

use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// A layer or a model: a function of a tensor with named, trainable
/// parameters and a training/evaluation mode.
///
/// Modules are `Send + Sync` and every method takes `&self`, so one model can
/// serve many threads (see the [module docs](self)). They are `Debug` too, so
/// a model can be printed.
///
/// Implement [`forward`](Module::forward) and
/// [`named_parameters`](Module::named_parameters); the rest have default
/// implementations. A module that keeps a training/evaluation flag of its
/// own (the default for threads that set no mode) returns it from
/// [`training_flag`](Module::training_flag); a container also overrides
/// [`set_training`](Module::set_training) to pass the mode to its children.
/// Implement [`try_fork`](Module::try_fork) to make the module publishable
/// ([`Published`]).
///
/// # Examples
///
/// A custom module: a learned per-feature scale.
///
/// ```
/// use netcl::nn::{Module, TrainingFlag};
/// use netcl::{Result, Tensor};
///
/// #[derive(Debug, Clone)]
/// struct Scale {
///     gain: Tensor,
///     training: TrainingFlag,
/// }
///
/// impl Module for Scale {
///     fn forward(&self, x: &Tensor) -> Result<Tensor> {
///         x.try_mul(&self.gain)
///     }
///     fn named_parameters(&self) -> Vec<(String, Tensor)> {
///         vec![("gain".to_string(), self.gain.clone())]
///     }
///     fn training_flag(&self) -> Option<&TrainingFlag> {
///         Some(&self.training)
///     }
///     fn try_fork(&self) -> Result<Box<dyn Module>> {
///         let fork = Scale { gain: self.gain.fork(), training: self.training.clone() };
///         Ok(Box::new(fork))
///     }
/// }
///
/// let scale = Scale {
///     gain: Tensor::full(&[3], 2.0).requires_grad_(true),
///     training: TrainingFlag::new(),
/// };
/// let y = scale.forward(&Tensor::ones(&[2, 3]))?;
/// assert_eq!(y.to_vec(), vec![2.0; 6]);
/// assert_eq!(scale.num_parameters(), 3);
/// scale.eval();
/// assert!(!scale.is_training());
/// # Ok::<(), netcl::Error>(())
/// ```
pub trait Module: Send + Sync + fmt::Debug {
    /// Applies the module to `input`.
    ///
    /// Ops record onto the tape when this thread's grad mode is on (and a
    /// parameter requires grad), exactly as the tensor ops they are made of;
    /// run inference under [`no_grad`](crate::autograd::no_grad).
    ///
    /// # Errors
    ///
    /// The error of the first op that fails, typically a shape mismatch
    /// between `input` and the module's parameters.
    fn forward(&self, input: &Tensor) -> Result<Tensor>;

    /// The parameters with their names, in a stable order: a layer's own
    /// parameters by name (`weight`, `bias`), a container's children's
    /// prefixed by the child's position or field name (`0.weight`,
    /// `layers.2.bias`).
    ///
    /// The tensors are handles to the parameters themselves, not copies.
    fn named_parameters(&self) -> Vec<(String, Tensor)>;

    /// The module's buffer states with their names: a stateful layer's
    /// own [`BufferState`] under the empty name `""`, a container's
    /// children's prefixed as in [`named_parameters`](Module::named_parameters)
    /// (`1`, `layers.2`). None by default: implement it in a layer that
    /// keeps buffers (running statistics), so that [`io`](crate::io),
    /// [`try_fork`](Module::try_fork) and [`Published`] carry them.
    ///
    /// # Examples
    ///
    /// A layer that counts the batches it sees in training mode:
    ///
    /// ```
    /// use netcl::nn::{BufferState, Buffers, Module, Published};
    /// use netcl::{Result, Tensor};
    ///
    /// #[derive(Debug)]
    /// struct Counter(BufferState);
    ///
    /// impl Module for Counter {
    ///     fn forward(&self, x: &Tensor) -> Result<Tensor> {
    ///         if self.effective_training() {
    ///             self.0.update(|old| Ok(vec![old.get("seen").unwrap() + 1.0]))?;
    ///         }
    ///         Ok(x.clone())
    ///     }
    ///     fn named_parameters(&self) -> Vec<(String, Tensor)> {
    ///         Vec::new()
    ///     }
    ///     fn named_buffer_states(&self) -> Vec<(String, &BufferState)> {
    ///         vec![(String::new(), &self.0)]
    ///     }
    ///     fn try_fork(&self) -> Result<Box<dyn Module>> {
    ///         Ok(Box::new(Counter(self.0.fork())))
    ///     }
    /// }
    ///
    /// let counter = Counter(BufferState::new(Buffers::new([("seen", Tensor::scalar(0.0))])?));
    /// let published = Published::new(&counter)?;
    /// counter.forward(&Tensor::ones(&[2]))?;
    /// assert_eq!(counter.named_buffers()[0].1.item(), 1.0);
    ///
    /// // The published version's buffers are frozen, even in training mode.
    /// let _train = netcl::nn::train_mode();
    /// published.load().forward(&Tensor::ones(&[2]))?;
    /// assert_eq!(published.load().named_buffers()[0].1.item(), 0.0);
    /// # Ok::<(), netcl::Error>(())
    /// ```
    fn named_buffer_states(&self) -> Vec<(String, &BufferState)> {
        Vec::new()
    }

    /// The buffers with their names (`1.running_mean`), in a stable
    /// order: the current values of every
    /// [`named_buffer_states`](Module::named_buffer_states) entry, each
    /// state read from one snapshot. The tensors are detached copies
    /// (O(1), copy-on-write): writing to them changes nothing in the
    /// module. None for a module without buffers.
    fn named_buffers(&self) -> Vec<(String, Tensor)> {
        self.named_buffer_states()
            .into_iter()
            .flat_map(|(prefix, state)| {
                state
                    .load()
                    .to_vec()
                    .into_iter()
                    .map(move |(name, t)| (buffers::join(&prefix, &name), t))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// The parameters whose layout differs from the PyTorch module this
    /// module mirrors, by name (as in
    /// [`named_parameters`](Module::named_parameters)): `[("weight",
    /// TorchLayout::Transposed)]` for a [`Linear`], which stores `[in,
    /// out]` where `nn.Linear` stores `[out, in]`. None by default.
    ///
    /// [`io::load_torch`](crate::io::load_torch) and
    /// [`io::save_torch`](crate::io::save_torch) convert these parameters,
    /// and only these, between the two layouts; containers prefix their
    /// children's names.
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::nn::{Linear, Module, ReLU, Sequential, TorchLayout};
    ///
    /// let model = Sequential::new().with(Linear::zeros(4, 3)?).with(ReLU::new());
    /// assert_eq!(model.torch_layouts(), [("0.weight".to_string(), TorchLayout::Transposed)]);
    /// # Ok::<(), netcl::Error>(())
    /// ```
    fn torch_layouts(&self) -> Vec<(String, TorchLayout)> {
        Vec::new()
    }

    /// Sets the module's own training (`true`) or evaluation (`false`)
    /// flag, and its children's: the default mode for threads that set
    /// none.
    ///
    /// The default implementation sets the [`training_flag`](Module::training_flag),
    /// if the module has one; containers override it to pass the mode to
    /// their children too.
    fn set_training(&self, training: bool) {
        if let Some(flag) = self.training_flag() {
            flag.set(training);
        }
    }

    /// Whether the module is in training mode: its own flag, the default
    /// for threads that set no mode of their own. New modules are.
    ///
    /// The default implementation reads the
    /// [`training_flag`](Module::training_flag); a module without one is
    /// always in training mode (its forward does not depend on the mode).
    fn is_training(&self) -> bool {
        self.training_flag().is_none_or(TrainingFlag::get)
    }

    /// The module's own training flag, if it keeps one; `None` by default.
    /// Keeping one is all a module needs for [`train`](Module::train),
    /// [`eval`](Module::eval), [`set_training`](Module::set_training) and
    /// [`is_training`](Module::is_training) to work through `&self`.
    fn training_flag(&self) -> Option<&TrainingFlag> {
        None
    }

    /// Whether a forward on *this thread* runs in training mode: the
    /// thread's mode if one is set ([`train_mode`], [`eval_mode`], or a
    /// [`GradMode`](crate::autograd::GradMode) carrying one), else the
    /// module's own flag ([`is_training`](Module::is_training)).
    ///
    /// A module whose forward behaves differently in training (such as
    /// [`Dropout`]) asks this, never `is_training` directly.
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::nn::{Dropout, Module, eval_mode};
    ///
    /// let dropout = Dropout::new(0.5, 0);
    /// assert!(dropout.effective_training());
    /// let _eval = eval_mode();
    /// assert!(!dropout.effective_training());
    /// assert!(dropout.is_training(), "the module's own flag is untouched");
    /// ```
    fn effective_training(&self) -> bool {
        training_mode().unwrap_or_else(|| self.is_training())
    }

    /// A fork of this module: an independent module of the same structure,
    /// settings and training flag, whose parameters are new leaf tensors
    /// starting with this module's current values, without gradients.
    ///
    /// The values are shared copy-on-write ([`Tensor::fork`]), so forking
    /// costs O(1) per parameter; the first update of a shared parameter, on
    /// either side, copies it. Updating the fork never changes this module,
    /// nor the other way round. [`Published`] versions are forks.
    ///
    /// The built-in modules implement it (and `Clone`, which forks). A
    /// custom module implements it by forking its parameters with
    /// [`Tensor::fork`] and returning `Ok(Box::new(copy))`.
    ///
    /// # Errors
    ///
    /// The default implementation returns [`Error::Unsupported`] naming the
    /// type.
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::Tensor;
    /// use netcl::nn::{Module, ReLU, Sequential};
    ///
    /// let model = Sequential::new().with(ReLU::new());
    /// let fork = model.try_fork()?;
    /// assert_eq!(fork.forward(&Tensor::ones(&[2]))?.to_vec(), vec![1.0, 1.0]);
    /// # Ok::<(), netcl::Error>(())
    /// ```
    fn try_fork(&self) -> Result<Box<dyn Module>> {
        Err(Error::Unsupported {
            op: "Module::try_fork",
            message: format!(
                "{} does not implement Module::try_fork",
                std::any::type_name::<Self>()
            ),
        })
    }

    /// The module's architecture: its kind, hyperparameters and children
    /// (the schema of [`nn::architecture`](self::architecture)), what
    /// [`io::save_model`](crate::io::save_model) stores so that
    /// [`io::load_model`](crate::io::load_model) rebuilds the module
    /// without code. `None` by default: a module that cannot be described
    /// (a custom one, or a container holding one) is saved and loaded with
    /// [`io::save`](crate::io::save) and [`io::load`](crate::io::load)
    /// into a model built in code. A custom module implements it with a
    /// kind registered with [`register_kind`].
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::nn::{Dropout, Module};
    ///
    /// let arch = Dropout::new(0.25, 7).architecture().unwrap();
    /// assert_eq!(arch.kind(), "Dropout");
    /// assert_eq!(arch.f32("p")?, 0.25);
    /// assert_eq!(arch.u64("seed")?, 7);
    /// # Ok::<(), netcl::Error>(())
    /// ```
    fn architecture(&self) -> Option<Architecture> {
        None
    }

    /// The parameters, in the order of
    /// [`named_parameters`](Module::named_parameters), each distinct
    /// tensor once: a parameter shared by two layers (a tied weight, see
    /// [`fork_scope`]) appears once.
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::nn::{Linear, Module};
    /// use netcl::rand::SeedableRng;
    ///
    /// let layer = Linear::new(4, 2, &mut netcl::rand::rngs::StdRng::seed_from_u64(0));
    /// let shapes: Vec<Vec<usize>> = layer.parameters().iter().map(|p| p.shape().to_vec()).collect();
    /// assert_eq!(shapes, [vec![4, 2], vec![2]]);
    /// ```
    fn parameters(&self) -> Vec<Tensor> {
        unique_named(self.named_parameters())
            .into_iter()
            .map(|(_, p)| p)
            .collect()
    }

    /// The total number of parameter elements.
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::nn::{Activation, Mlp, Module};
    /// use netcl::rand::SeedableRng;
    ///
    /// let mlp = Mlp::new(&[64, 128, 10], Activation::Relu, &mut netcl::rand::rngs::StdRng::seed_from_u64(0));
    /// assert_eq!(mlp.num_parameters(), 64 * 128 + 128 + 128 * 10 + 10);
    /// ```
    fn num_parameters(&self) -> usize {
        self.parameters().iter().map(Tensor::numel).sum()
    }

    /// Switches to training mode: [`Dropout`] drops.
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::nn::{Dropout, Module};
    ///
    /// let dropout = Dropout::new(0.5, 7);
    /// dropout.eval();
    /// assert!(!dropout.is_training());
    /// dropout.train();
    /// assert!(dropout.is_training());
    /// ```
    fn train(&self) {
        self.set_training(true);
    }

    /// Switches to evaluation mode: [`Dropout`] is the identity.
    fn eval(&self) {
        self.set_training(false);
    }

    /// Clears the gradient of every parameter.
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::Tensor;
    /// use netcl::nn::{Linear, Module};
    /// use netcl::rand::SeedableRng;
    ///
    /// let layer = Linear::new(3, 1, &mut netcl::rand::rngs::StdRng::seed_from_u64(0));
    /// layer.forward(&Tensor::ones(&[2, 3]))?.sum().backward();
    /// assert!(layer.weight().grad().is_some());
    /// layer.zero_grad();
    /// assert!(layer.parameters().iter().all(|p| p.grad().is_none()));
    /// # Ok::<(), netcl::Error>(())
    /// ```
    fn zero_grad(&self) {
        for p in self.parameters() {
            p.zero_grad();
        }
    }
}

/// A model behind a pointer is the model: `Box<dyn Module>`, `Arc<M>` (one
/// model shared by threads) and `&M` forward every method.
macro_rules! forward_module {
    ($($pointer:ty),*) => {$(
        impl<M: Module + ?Sized> Module for $pointer {
            fn forward(&self, input: &Tensor) -> Result<Tensor> {
                (**self).forward(input)
            }
            fn named_parameters(&self) -> Vec<(String, Tensor)> {
                (**self).named_parameters()
            }
            fn named_buffer_states(&self) -> Vec<(String, &BufferState)> {
                (**self).named_buffer_states()
            }
            fn torch_layouts(&self) -> Vec<(String, TorchLayout)> {
                (**self).torch_layouts()
            }
            fn named_buffers(&self) -> Vec<(String, Tensor)> {
                (**self).named_buffers()
            }
            fn set_training(&self, training: bool) {
                (**self).set_training(training)
            }
            fn is_training(&self) -> bool {
                (**self).is_training()
            }
            fn training_flag(&self) -> Option<&TrainingFlag> {
                (**self).training_flag()
            }
            fn effective_training(&self) -> bool {
                (**self).effective_training()
            }
            fn try_fork(&self) -> Result<Box<dyn Module>> {
                (**self).try_fork()
            }
            fn architecture(&self) -> Option<Architecture> {
                (**self).architecture()
            }
        }
    )*};
}

forward_module!(Box<M>, Arc<M>, &M);

/// How a parameter's layout differs from PyTorch's
/// ([`Module::torch_layouts`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TorchLayout {
    /// A 2-D parameter stored as the transpose of PyTorch's: netcl's
    /// [`Linear`] weight is `[in, out]`, `nn.Linear`'s `[out, in]`.
    Transposed,
}

/// A module's own training/evaluation flag: an atomic, so that a shared
/// model can switch its default mode through `&self`
/// ([`Module::training_flag`]). Training (`true`) when new.
///
/// It is only the default for threads that set no mode: a thread's
/// [`train_mode`] or [`eval_mode`] takes precedence
/// ([`Module::effective_training`]).
///
/// # Examples
///
/// ```
/// use netcl::nn::TrainingFlag;
///
/// let flag = TrainingFlag::new();
/// assert!(flag.get());
/// flag.set(false);
/// assert!(!flag.get());
/// assert!(!flag.clone().get(), "a clone starts with the same value");
/// ```
#[derive(Debug)]
pub struct TrainingFlag(AtomicBool);

impl Clone for TrainingFlag {
    /// A new flag with this one's current value.
    fn clone(&self) -> TrainingFlag {
        TrainingFlag(AtomicBool::new(self.get()))
    }
}

impl Default for TrainingFlag {
    fn default() -> TrainingFlag {
        TrainingFlag::new()
    }
}

impl TrainingFlag {
    /// A flag in training mode.
    pub fn new() -> TrainingFlag {
        TrainingFlag(AtomicBool::new(true))
    }

    /// Whether it says training.
    pub fn get(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    /// Sets it to training (`true`) or evaluation (`false`).
    pub fn set(&self, training: bool) {
        self.0.store(training, Ordering::Relaxed);
    }
}

/// Runs `f` (a fork of a model) so that parameters shared between layers
/// stay shared in the fork: inside the scope, [`Tensor::fork`] of a tensor
/// already forked returns that same fork. Nested scopes join the
/// outermost one.
///
/// The built-in containers ([`Sequential`], [`Mlp`]) and [`Published`]
/// fork inside a scope already; a custom container whose
/// [`try_fork`](Module::try_fork) forks several children calls its
/// children's forks inside one, so that its tied weights stay tied.
///
/// # Weight tying
///
/// A parameter is a handle: two layers built from clones of one tensor
/// (`Linear::from_parts(shared.clone(), ..)`) share it, which is weight
/// tying. The shared parameter appears once in
/// [`parameters`](Module::parameters) (and in an optimizer), once in a
/// checkpoint (under its first name in
/// [`named_parameters`](Module::named_parameters); its other names are
/// aliases, optional in a file being loaded), and receives the gradients of
/// both layers. `Clone` and [`try_fork`](Module::try_fork) keep it shared,
/// through this scope. ([`Tensor::fork`] copies: a layer built from a fork
/// of a parameter is untied.)
///
/// # Examples
///
/// Two layers tied by one weight, in a chain:
///
/// ```
/// use netcl::Tensor;
/// use netcl::nn::{Linear, Module, Sequential};
///
/// let w = Tensor::from_vec(vec![2.0], &[1, 1])?;
/// let model = Sequential::new()
///     .with(Linear::from_parts(w.clone(), None)?)
///     .with(Linear::from_parts(w.clone(), None)?);
/// assert_eq!(model.named_parameters().len(), 2, "two names...");
/// assert_eq!(model.parameters().len(), 1, "...one parameter");
///
/// // y = w·(w·x): dy/dw = 2·w·x = 4 at x = 1, from both layers.
/// model.forward(&Tensor::ones(&[1, 1]))?.sum().backward();
/// assert_eq!(w.grad().unwrap().to_vec(), vec![4.0]);
///
/// // A fork (Clone) is tied too: one parameter, shared by its two layers.
/// let fork = model.try_clone()?;
/// assert_eq!(fork.parameters().len(), 1);
/// # Ok::<(), netcl::Error>(())
/// ```
pub fn fork_scope<R>(f: impl FnOnce() -> R) -> R {
    crate::tensor::fork_scope(f)
}

/// The `named_parameters` of a layer with an optional `weight` and an
/// optional `bias` (PyTorch's names), in that order.
pub(crate) fn weight_and_bias(
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
) -> Vec<(String, Tensor)> {
    [("weight", weight), ("bias", bias)]
        .into_iter()
        .filter_map(|(name, t)| Some((name.to_string(), t?.clone())))
        .collect()
}

/// Each distinct tensor of `params` once, in order (the first of a tied
/// parameter's names).
pub(crate) fn unique_named(params: Vec<(String, Tensor)>) -> Vec<(String, Tensor)> {
    // By address: every tensor is alive in `params`, so addresses are
    // distinct for distinct tensors.
    let mut seen = std::collections::HashSet::with_capacity(params.len());
    params
        .into_iter()
        .filter(|(_, p)| seen.insert(p.identity()))
        .collect()
}

/// Prefixes every name of `params` with `prefix.`.
pub(crate) fn prefixed(prefix: &str, params: Vec<(String, Tensor)>) -> Vec<(String, Tensor)> {
    params
        .into_iter()
        .map(|(name, p)| (format!("{prefix}.{name}"), p))
        .collect()
}

const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Linear>();
    assert_send_sync::<TiedLinear>();
    assert_send_sync::<Dropout>();
    assert_send_sync::<Sequential>();
    assert_send_sync::<Mlp>();
    assert_send_sync::<Conv2d>();
    assert_send_sync::<MaxPool2d>();
    assert_send_sync::<AvgPool2d>();
    assert_send_sync::<AdaptiveAvgPool2d>();
    assert_send_sync::<Flatten>();
    assert_send_sync::<Gelu>();
    assert_send_sync::<Silu>();
    assert_send_sync::<BatchNorm1d>();
    assert_send_sync::<BatchNorm2d>();
    assert_send_sync::<LayerNorm>();
    assert_send_sync::<RmsNorm>();
    assert_send_sync::<Embedding>();
    assert_send_sync::<MultiheadAttention>();
    assert_send_sync::<TransformerBlock>();
    assert_send_sync::<Box<dyn Module>>();
};
