//! Element-wise activation layers.

use std::fmt;

use crate::error::Result;
use crate::nn::{Module, TrainingFlag};
use crate::tensor::Tensor;

macro_rules! activation_layer {
    ($(#[$doc:meta])* $name:ident, $method:ident, $label:literal) => {
        $(#[$doc])*
        pub struct $name {
            training: TrainingFlag,
        }

        impl $name {
            #[doc = concat!("A new `", $label, "` layer.")]
            pub fn new() -> $name {
                $name {
                    training: TrainingFlag::new(),
                }
            }
        }

        impl Clone for $name {
            /// A new layer with this one's training flag.
            fn clone(&self) -> $name {
                $name {
                    training: self.training.clone(),
                }
            }
        }

        impl Default for $name {
            fn default() -> $name {
                $name::new()
            }
        }

        impl Module for $name {
            #[track_caller]
            fn forward(&self, input: &Tensor) -> Result<Tensor> {
                Ok(input.$method())
            }

            /// None: the layer has no parameters.
            fn named_parameters(&self) -> Vec<(String, Tensor)> {
                Vec::new()
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

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str($label)
            }
        }
    };
}

activation_layer!(
    /// `max(x, 0)` element-wise, as a layer.
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::Tensor;
    /// use netcl::nn::{Module, ReLU};
    ///
    /// let x = Tensor::from_vec(vec![-1.0, 2.0], &[1, 2])?;
    /// assert_eq!(ReLU::new().forward(&x)?.to_vec(), vec![0.0, 2.0]);
    /// # Ok::<(), netcl::Error>(())
    /// ```
    ReLU,
    relu,
    "ReLU"
);

activation_layer!(
    /// `1 / (1 + e^-x)` element-wise, as a layer.
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::Tensor;
    /// use netcl::nn::{Module, Sigmoid};
    ///
    /// let y = Sigmoid::new().forward(&Tensor::zeros(&[1, 2]))?;
    /// assert_eq!(y.to_vec(), vec![0.5, 0.5]);
    /// # Ok::<(), netcl::Error>(())
    /// ```
    Sigmoid,
    sigmoid,
    "Sigmoid"
);

activation_layer!(
    /// The hyperbolic tangent element-wise, as a layer.
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::Tensor;
    /// use netcl::nn::{Module, Tanh};
    ///
    /// let y = Tanh::new().forward(&Tensor::zeros(&[1, 2]))?;
    /// assert_eq!(y.to_vec(), vec![0.0, 0.0]);
    /// # Ok::<(), netcl::Error>(())
    /// ```
    Tanh,
    tanh,
    "Tanh"
);

/// The activation between the layers of an [`Mlp`](crate::nn::Mlp).
///
/// # Examples
///
/// ```
/// use netcl::Tensor;
/// use netcl::nn::{Activation, Module};
///
/// let layer = Activation::Tanh.layer();
/// assert_eq!(format!("{layer:?}"), "Tanh");
/// assert_eq!(layer.forward(&Tensor::zeros(&[1, 1]))?.item(), 0.0);
/// # Ok::<(), netcl::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Activation {
    /// [`ReLU`].
    Relu,
    /// [`Sigmoid`].
    Sigmoid,
    /// [`Tanh`].
    Tanh,
}

impl Activation {
    /// A new layer computing this activation.
    pub fn layer(self) -> Box<dyn Module> {
        match self {
            Activation::Relu => Box::new(ReLU::new()),
            Activation::Sigmoid => Box::new(Sigmoid::new()),
            Activation::Tanh => Box::new(Tanh::new()),
        }
    }

    /// Applies the activation to `x` directly.
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::Tensor;
    /// use netcl::nn::Activation;
    ///
    /// let x = Tensor::from_vec(vec![-1.0, 1.0], &[2])?;
    /// assert_eq!(Activation::Relu.apply(&x).to_vec(), vec![0.0, 1.0]);
    /// # Ok::<(), netcl::Error>(())
    /// ```
    pub fn apply(self, x: &Tensor) -> Tensor {
        match self {
            Activation::Relu => x.relu(),
            Activation::Sigmoid => x.sigmoid(),
            Activation::Tanh => x.tanh(),
        }
    }
}

/// The architecture node of an activation layer: its kind, no config.
macro_rules! describe_activation {
    ($($name:ident),*) => {$(
        impl $name {
            pub(crate) fn describe(&self) -> Option<crate::nn::Architecture> {
                Some(crate::nn::Architecture::new(stringify!($name)))
            }
        }
    )*};
}

describe_activation!(ReLU, Sigmoid, Tanh);
