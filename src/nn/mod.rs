//! Neural-network building blocks: the [`Module`] trait and its layers.
//!
//! | | |
//! |---|---|
//! | [`Linear`] | `x · W + b`, Kaiming-uniform initialised from a seeded RNG |
//! | [`ReLU`], [`Sigmoid`], [`Tanh`] | element-wise activations |
//! | [`Dropout`] | zeroes inputs at random in training mode, seeded |
//! | [`Sequential`] | a chain of modules |
//! | [`Mlp`] | a multi-layer perceptron built from a list of widths |
//!
//! # Sharing one model between threads
//!
//! Every module is `Send + Sync` and every method takes `&self`: put a model
//! in an `Arc` and call [`forward`](Module::forward) from as many threads as
//! you like. Parameters are [`Tensor`]s, updated in place by an optimizer;
//! the training/evaluation flag is an atomic, so [`train`](Module::train) and
//! [`eval`](Module::eval) need no `&mut` either. The flag is a property of
//! the *model*, not of the thread: switch it around a phase (training,
//! evaluation), not per request. For inference alone the flag does not
//! matter unless the model has [`Dropout`]; put the model in eval mode once
//! and leave it there.
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
//! use rand::SeedableRng;
//! use rand::rngs::StdRng;
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
mod dropout;
mod linear;
mod sequential;

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

pub use activation::{Activation, ReLU, Sigmoid, Tanh};
pub use dropout::Dropout;
pub use linear::Linear;
pub use sequential::{Mlp, Sequential};

use crate::error::Result;
use crate::tensor::Tensor;

/// A layer or a model: a function of a tensor with named, trainable
/// parameters and a training/evaluation mode.
///
/// Modules are `Send + Sync` and every method takes `&self`, so one model can
/// serve many threads (see the [module docs](self)). They are `Debug` too, so
/// a model can be printed.
///
/// Implement [`forward`](Module::forward),
/// [`named_parameters`](Module::named_parameters),
/// [`set_training`](Module::set_training) and
/// [`is_training`](Module::is_training); the rest have default
/// implementations.
///
/// # Examples
///
/// A custom module: a learned per-feature scale.
///
/// ```
/// use std::sync::atomic::{AtomicBool, Ordering};
///
/// use netcl::nn::Module;
/// use netcl::{Result, Tensor};
///
/// #[derive(Debug)]
/// struct Scale {
///     gain: Tensor,
///     training: AtomicBool,
/// }
///
/// impl Module for Scale {
///     fn forward(&self, x: &Tensor) -> Result<Tensor> {
///         x.try_mul(&self.gain)
///     }
///     fn named_parameters(&self) -> Vec<(String, Tensor)> {
///         vec![("gain".to_string(), self.gain.clone())]
///     }
///     fn set_training(&self, training: bool) {
///         self.training.store(training, Ordering::Relaxed);
///     }
///     fn is_training(&self) -> bool {
///         self.training.load(Ordering::Relaxed)
///     }
/// }
///
/// let scale = Scale {
///     gain: Tensor::full(&[3], 2.0).requires_grad_(true),
///     training: AtomicBool::new(true),
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

    /// Switches the module and all its children to training (`true`) or
    /// evaluation (`false`) mode.
    fn set_training(&self, training: bool);

    /// Whether the module is in training mode. New modules are.
    fn is_training(&self) -> bool;

    /// The parameters, in the order of
    /// [`named_parameters`](Module::named_parameters).
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::nn::{Linear, Module};
    /// use rand::SeedableRng;
    ///
    /// let layer = Linear::new(4, 2, &mut rand::rngs::StdRng::seed_from_u64(0));
    /// let shapes: Vec<Vec<usize>> = layer.parameters().iter().map(|p| p.shape().to_vec()).collect();
    /// assert_eq!(shapes, [vec![4, 2], vec![2]]);
    /// ```
    fn parameters(&self) -> Vec<Tensor> {
        self.named_parameters()
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
    /// use rand::SeedableRng;
    ///
    /// let mlp = Mlp::new(&[64, 128, 10], Activation::Relu, &mut rand::rngs::StdRng::seed_from_u64(0));
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
    /// use rand::SeedableRng;
    ///
    /// let layer = Linear::new(3, 1, &mut rand::rngs::StdRng::seed_from_u64(0));
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
            fn set_training(&self, training: bool) {
                (**self).set_training(training)
            }
            fn is_training(&self) -> bool {
                (**self).is_training()
            }
        }
    )*};
}

forward_module!(Box<M>, Arc<M>, &M);

/// The training/evaluation flag of one layer: an atomic, so that a shared
/// model can switch mode through `&self`.
#[derive(Debug)]
pub(crate) struct TrainingFlag(AtomicBool);

impl TrainingFlag {
    pub(crate) fn new() -> TrainingFlag {
        TrainingFlag(AtomicBool::new(true))
    }

    pub(crate) fn get(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    pub(crate) fn set(&self, training: bool) {
        self.0.store(training, Ordering::Relaxed);
    }
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
    assert_send_sync::<Dropout>();
    assert_send_sync::<Sequential>();
    assert_send_sync::<Mlp>();
    assert_send_sync::<Box<dyn Module>>();
};
