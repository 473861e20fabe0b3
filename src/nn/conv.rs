//! Convolution, pooling, flattening and the GELU / SiLU activation layers.

use std::fmt;

use rand::Rng;

use crate::array::checked_numel;
use crate::error::{Error, Result, or_panic};
use crate::functional::{
    GeluApproximate, Size2, gelu, try_adaptive_avg_pool2d, try_avg_pool2d, try_conv2d,
    try_max_pool2d,
};
use crate::nn::{Module, TrainingFlag};
use crate::tensor::Tensor;

/// A 2-D convolution layer, as PyTorch's `nn.Conv2d`: input `[N, C_in, H,
/// W]`, output `[N, C_out, H_out, W_out]` ([`functional::conv2d`](crate::functional::conv2d)).
///
/// Parameters, named as in a PyTorch `state_dict`: `weight`, `[C_out,
/// C_in / groups, kH, kW]` (PyTorch's OIHW layout, so a checkpoint needs
/// no conversion), and `bias`, `[C_out]`, if the layer has one.
///
/// New layers use PyTorch's default initialisation (Kaiming-uniform with
/// `a = √5`): weight and bias uniform in `[-1/√fan_in, 1/√fan_in)` with
/// `fan_in = C_in / groups · kH · kW`, drawn from the caller's generator.
///
/// Stride, padding and dilation are 1, 0 and 1 unless set with
/// [`with_stride`](Conv2d::with_stride), [`with_padding`](Conv2d::with_padding)
/// and [`with_dilation`](Conv2d::with_dilation); groups are set at
/// construction ([`try_grouped`](Conv2d::try_grouped)), since they shape
/// the weight.
///
/// # Examples
///
/// ```
/// use netcl::Tensor;
/// use netcl::nn::{Conv2d, Module};
/// use netcl::rand::SeedableRng;
/// use netcl::rand::rngs::StdRng;
///
/// let conv = Conv2d::new(3, 8, 3, &mut StdRng::seed_from_u64(0)).with_padding(1);
/// let y = conv.forward(&Tensor::ones(&[2, 3, 5, 5]))?;
/// assert_eq!(y.shape(), &[2, 8, 5, 5]);
/// let names: Vec<String> = conv.named_parameters().into_iter().map(|(n, _)| n).collect();
/// assert_eq!(names, ["weight", "bias"]);
/// assert_eq!(conv.weight().shape(), &[8, 3, 3, 3]);
/// # Ok::<(), netcl::Error>(())
/// ```
pub struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    stride: Size2,
    padding: Size2,
    dilation: Size2,
    groups: usize,
    training: TrainingFlag,
}

impl Conv2d {
    /// A layer from `in_channels` to `out_channels` with a `kernel_size`
    /// kernel and a bias, initialised from `rng`.
    ///
    /// # Panics
    ///
    /// As [`try_new`](Conv2d::try_new).
    #[track_caller]
    pub fn new<R: Rng + ?Sized>(
        in_channels: usize,
        out_channels: usize,
        kernel_size: impl Into<Size2>,
        rng: &mut R,
    ) -> Conv2d {
        or_panic(Conv2d::try_new(in_channels, out_channels, kernel_size, rng))
    }

    /// A layer from `in_channels` to `out_channels` with a `kernel_size`
    /// kernel and a bias, initialised from `rng`.
    ///
    /// # Errors
    ///
    /// As [`try_grouped`](Conv2d::try_grouped).
    pub fn try_new<R: Rng + ?Sized>(
        in_channels: usize,
        out_channels: usize,
        kernel_size: impl Into<Size2>,
        rng: &mut R,
    ) -> Result<Conv2d> {
        Conv2d::try_grouped(in_channels, out_channels, kernel_size, 1, true, rng)
    }

    /// A layer with `groups` groups and a bias if `bias`, initialised
    /// from `rng`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] if a size is zero or `groups` does not
    /// divide both channel counts, [`Error::ShapeTooLarge`] if the weight
    /// would hold more than [`Tensor::MAX_ELEMENTS`] values.
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::nn::{Conv2d, Module};
    /// use netcl::rand::SeedableRng;
    ///
    /// let mut rng = netcl::rand::rngs::StdRng::seed_from_u64(0);
    /// let depthwise = Conv2d::try_grouped(4, 4, 3, 4, false, &mut rng)?;
    /// assert_eq!(depthwise.weight().shape(), &[4, 1, 3, 3]);
    /// assert!(depthwise.bias().is_none());
    /// assert!(Conv2d::try_grouped(4, 6, 3, 4, true, &mut rng).is_err());
    /// # Ok::<(), netcl::Error>(())
    /// ```
    pub fn try_grouped<R: Rng + ?Sized>(
        in_channels: usize,
        out_channels: usize,
        kernel_size: impl Into<Size2>,
        groups: usize,
        bias: bool,
        rng: &mut R,
    ) -> Result<Conv2d> {
        let kernel = kernel_size.into();
        let fan_in = (in_channels / groups.max(1)) * kernel.0 * kernel.1;
        let bound = 1.0 / (fan_in.max(1) as f32).sqrt();
        Conv2d::build_with(in_channels, out_channels, kernel, groups, bias, |shape| {
            Tensor::uniform(shape, -bound, bound, rng)
        })
    }

    /// A layer with a bias, all parameters zero: the shell to load a
    /// checkpoint into.
    ///
    /// # Errors
    ///
    /// As [`try_grouped`](Conv2d::try_grouped).
    pub fn zeros(
        in_channels: usize,
        out_channels: usize,
        kernel_size: impl Into<Size2>,
    ) -> Result<Conv2d> {
        Conv2d::build_with(
            in_channels,
            out_channels,
            kernel_size.into(),
            1,
            true,
            Tensor::zeros,
        )
    }

    fn build_with(
        in_channels: usize,
        out_channels: usize,
        kernel: Size2,
        groups: usize,
        bias: bool,
        mut init: impl FnMut(&[usize]) -> Tensor,
    ) -> Result<Conv2d> {
        let invalid = |message: String| Error::InvalidArgument {
            op: "Conv2d",
            message,
        };
        if in_channels == 0 || out_channels == 0 || kernel.0 == 0 || kernel.1 == 0 || groups == 0 {
            return Err(invalid(format!(
                "sizes must be positive, got {in_channels} -> {out_channels}, kernel {kernel}, groups {groups}"
            )));
        }
        if !in_channels.is_multiple_of(groups) || !out_channels.is_multiple_of(groups) {
            return Err(invalid(format!(
                "groups ({groups}) must divide in_channels ({in_channels}) and out_channels ({out_channels})"
            )));
        }
        let shape = [out_channels, in_channels / groups, kernel.0, kernel.1];
        checked_numel("Conv2d", &shape)?;
        let weight = init(&shape);
        let bias = bias.then(|| init(&[out_channels]));
        Ok(Conv2d {
            weight: weight.requires_grad_(true),
            bias: bias.map(|b| b.requires_grad_(true)),
            stride: Size2(1, 1),
            padding: Size2(0, 0),
            dilation: Size2(1, 1),
            groups,
            training: TrainingFlag::new(),
        })
    }

    /// A layer with the given weight, `[C_out, C_in / groups, kH, kW]`,
    /// and optional bias, `[C_out]`; both are marked as requiring grad.
    ///
    /// # Errors
    ///
    /// [`Error::Rank`] if the weight is not 4-D, [`Error::InvalidArgument`]
    /// if `groups` is zero or does not divide `C_out`,
    /// [`Error::ShapeMismatch`] if the bias is not `[C_out]`,
    /// [`Error::NotLeaf`] if either was computed by a recorded op.
    pub fn from_parts(weight: Tensor, bias: Option<Tensor>, groups: usize) -> Result<Conv2d> {
        const OP: &str = "Conv2d::from_parts";
        if weight.ndim() != 4 {
            return Err(Error::Rank {
                op: OP,
                expected: "a weight of shape [out_channels, in_channels / groups, kh, kw]",
                shape: weight.shape().to_vec(),
            });
        }
        let out = weight.shape()[0];
        if groups == 0 || !out.is_multiple_of(groups) {
            return Err(Error::InvalidArgument {
                op: OP,
                message: format!("groups ({groups}) must divide out_channels ({out})"),
            });
        }
        if let Some(b) = bias.as_ref().filter(|b| b.shape() != [out]) {
            return Err(Error::ShapeMismatch {
                op: OP,
                lhs: vec![out],
                rhs: b.shape().to_vec(),
            });
        }
        Ok(Conv2d {
            weight: weight.try_requires_grad_(true)?,
            bias: bias.map(|b| b.try_requires_grad_(true)).transpose()?,
            stride: Size2(1, 1),
            padding: Size2(0, 0),
            dilation: Size2(1, 1),
            groups,
            training: TrainingFlag::new(),
        })
    }

    /// This layer with stride `stride`.
    pub fn with_stride(mut self, stride: impl Into<Size2>) -> Conv2d {
        self.stride = stride.into();
        self
    }

    /// This layer with zero padding `padding` on each side.
    pub fn with_padding(mut self, padding: impl Into<Size2>) -> Conv2d {
        self.padding = padding.into();
        self
    }

    /// This layer with dilation `dilation`.
    pub fn with_dilation(mut self, dilation: impl Into<Size2>) -> Conv2d {
        self.dilation = dilation.into();
        self
    }

    /// The weight, `[C_out, C_in / groups, kH, kW]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The bias, `[C_out]`, if the layer has one.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// The stride.
    pub fn stride(&self) -> Size2 {
        self.stride
    }

    /// The padding.
    pub fn padding(&self) -> Size2 {
        self.padding
    }

    /// The dilation.
    pub fn dilation(&self) -> Size2 {
        self.dilation
    }

    /// The number of groups.
    pub fn groups(&self) -> usize {
        self.groups
    }
}

impl Clone for Conv2d {
    /// A fork (see [`Module::try_fork`]).
    fn clone(&self) -> Conv2d {
        Conv2d {
            weight: self.weight.fork(),
            bias: self.bias.as_ref().map(Tensor::fork),
            stride: self.stride,
            padding: self.padding,
            dilation: self.dilation,
            groups: self.groups,
            training: self.training.clone(),
        }
    }
}

impl Module for Conv2d {
    /// [`functional::conv2d`](crate::functional::conv2d) with the layer's
    /// parameters and settings.
    ///
    /// # Errors
    ///
    /// As [`try_conv2d`](crate::functional::try_conv2d).
    fn forward(&self, input: &Tensor) -> Result<Tensor> {
        try_conv2d(
            input,
            &self.weight,
            self.bias.as_ref(),
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
        )
    }

    fn named_parameters(&self) -> Vec<(String, Tensor)> {
        super::weight_and_bias(Some(&self.weight), self.bias.as_ref())
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

impl fmt::Debug for Conv2d {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Conv2d")
            .field("weight", &self.weight.shape())
            .field("bias", &self.bias.is_some())
            .field("stride", &self.stride)
            .field("padding", &self.padding)
            .field("dilation", &self.dilation)
            .field("groups", &self.groups)
            .finish()
    }
}

/// Implements `Module` for a parameter-free layer whose forward is
/// `$forward(self, input)`.
macro_rules! stateless_module {
    ($name:ident, |$s:ident, $x:ident| $forward:expr) => {
        impl Module for $name {
            fn forward(&self, $x: &Tensor) -> Result<Tensor> {
                let $s = self;
                $forward
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
    };
}

/// 2-D max pooling, as PyTorch's `nn.MaxPool2d`
/// ([`functional::max_pool2d`](crate::functional::max_pool2d)): the stride
/// defaults to the kernel size, the padding to 0.
///
/// # Examples
///
/// ```
/// use netcl::Tensor;
/// use netcl::nn::{MaxPool2d, Module};
///
/// let x = Tensor::from_vec((0..16).map(|v| v as f32).collect(), &[1, 1, 4, 4])?;
/// let y = MaxPool2d::new(2).forward(&x)?;
/// assert_eq!(y.to_vec(), vec![5.0, 7.0, 13.0, 15.0]);
/// # Ok::<(), netcl::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct MaxPool2d {
    kernel_size: Size2,
    stride: Option<Size2>,
    padding: Size2,
    training: TrainingFlag,
}

impl MaxPool2d {
    /// Max pooling over `kernel_size` windows, stride `kernel_size`, no
    /// padding.
    pub fn new(kernel_size: impl Into<Size2>) -> MaxPool2d {
        MaxPool2d {
            kernel_size: kernel_size.into(),
            stride: None,
            padding: Size2(0, 0),
            training: TrainingFlag::new(),
        }
    }

    /// This layer with stride `stride`.
    pub fn with_stride(mut self, stride: impl Into<Size2>) -> MaxPool2d {
        self.stride = Some(stride.into());
        self
    }

    /// This layer with padding `padding` (by `-inf`).
    pub fn with_padding(mut self, padding: impl Into<Size2>) -> MaxPool2d {
        self.padding = padding.into();
        self
    }
}

stateless_module!(MaxPool2d, |s, x| try_max_pool2d(
    x,
    s.kernel_size,
    s.stride,
    s.padding
));

/// 2-D average pooling, as PyTorch's `nn.AvgPool2d`
/// ([`functional::avg_pool2d`](crate::functional::avg_pool2d)): the stride
/// defaults to the kernel size, the padding to 0, and padded positions
/// count in the divisor (`count_include_pad = True`) unless
/// [`with_count_include_pad`](AvgPool2d::with_count_include_pad) says
/// otherwise.
///
/// # Examples
///
/// ```
/// use netcl::Tensor;
/// use netcl::nn::{AvgPool2d, Module};
///
/// let x = Tensor::from_vec((0..16).map(|v| v as f32).collect(), &[1, 1, 4, 4])?;
/// let y = AvgPool2d::new(2).forward(&x)?;
/// assert_eq!(y.to_vec(), vec![2.5, 4.5, 10.5, 12.5]);
/// # Ok::<(), netcl::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct AvgPool2d {
    kernel_size: Size2,
    stride: Option<Size2>,
    padding: Size2,
    count_include_pad: bool,
    training: TrainingFlag,
}

impl AvgPool2d {
    /// Average pooling over `kernel_size` windows, stride `kernel_size`,
    /// no padding.
    pub fn new(kernel_size: impl Into<Size2>) -> AvgPool2d {
        AvgPool2d {
            kernel_size: kernel_size.into(),
            stride: None,
            padding: Size2(0, 0),
            count_include_pad: true,
            training: TrainingFlag::new(),
        }
    }

    /// This layer with stride `stride`.
    pub fn with_stride(mut self, stride: impl Into<Size2>) -> AvgPool2d {
        self.stride = Some(stride.into());
        self
    }

    /// This layer with zero padding `padding`.
    pub fn with_padding(mut self, padding: impl Into<Size2>) -> AvgPool2d {
        self.padding = padding.into();
        self
    }

    /// This layer counting padded positions in the divisor (`true`, the
    /// default) or not.
    pub fn with_count_include_pad(mut self, count_include_pad: bool) -> AvgPool2d {
        self.count_include_pad = count_include_pad;
        self
    }
}

stateless_module!(AvgPool2d, |s, x| try_avg_pool2d(
    x,
    s.kernel_size,
    s.stride,
    s.padding,
    s.count_include_pad
));

/// 2-D adaptive average pooling to a fixed output size, as PyTorch's
/// `nn.AdaptiveAvgPool2d`
/// ([`functional::adaptive_avg_pool2d`](crate::functional::adaptive_avg_pool2d)).
///
/// # Examples
///
/// ```
/// use netcl::Tensor;
/// use netcl::nn::{AdaptiveAvgPool2d, Module};
///
/// let y = AdaptiveAvgPool2d::new(1).forward(&Tensor::ones(&[2, 3, 5, 7]))?;
/// assert_eq!(y.shape(), &[2, 3, 1, 1]);
/// # Ok::<(), netcl::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct AdaptiveAvgPool2d {
    output_size: Size2,
    training: TrainingFlag,
}

impl AdaptiveAvgPool2d {
    /// Pooling to `output_size` (`[H_out, W_out]`, or one size for both).
    pub fn new(output_size: impl Into<Size2>) -> AdaptiveAvgPool2d {
        AdaptiveAvgPool2d {
            output_size: output_size.into(),
            training: TrainingFlag::new(),
        }
    }
}

stateless_module!(AdaptiveAvgPool2d, |s, x| try_adaptive_avg_pool2d(
    x,
    s.output_size
));

/// Flattens axes `start_dim..=end_dim` into one, as PyTorch's
/// `nn.Flatten` (by default `start_dim = 1`, `end_dim = -1`: every axis
/// but the batch axis).
///
/// # Examples
///
/// ```
/// use netcl::Tensor;
/// use netcl::nn::{Flatten, Module};
///
/// let y = Flatten::new().forward(&Tensor::ones(&[2, 3, 4, 5]))?;
/// assert_eq!(y.shape(), &[2, 60]);
/// let y = Flatten::with_dims(0, 1).forward(&Tensor::ones(&[2, 3, 4]))?;
/// assert_eq!(y.shape(), &[6, 4]);
/// # Ok::<(), netcl::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct Flatten {
    start_dim: isize,
    end_dim: isize,
    training: TrainingFlag,
}

impl Flatten {
    /// Flattens every axis but the first (`start_dim = 1`, `end_dim = -1`).
    pub fn new() -> Flatten {
        Flatten::with_dims(1, -1)
    }

    /// Flattens axes `start_dim..=end_dim` (negative counts from the end).
    pub fn with_dims(start_dim: isize, end_dim: isize) -> Flatten {
        Flatten {
            start_dim,
            end_dim,
            training: TrainingFlag::new(),
        }
    }
}

impl Default for Flatten {
    fn default() -> Flatten {
        Flatten::new()
    }
}

stateless_module!(Flatten, |s, x| x.try_flatten(s.start_dim, s.end_dim));

/// The Gaussian error linear unit as a layer, PyTorch's `nn.GELU`: exact
/// by default, the tanh form with [`Gelu::tanh`]
/// ([`functional::gelu`](crate::functional::gelu)).
///
/// # Examples
///
/// ```
/// use netcl::Tensor;
/// use netcl::nn::{Gelu, Module};
///
/// let y = Gelu::new().forward(&Tensor::from_vec(vec![0.0, 1.0], &[2])?)?.to_vec();
/// assert_eq!(y[0], 0.0);
/// assert!((y[1] - 0.841_344_7).abs() < 1e-6);
/// # Ok::<(), netcl::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct Gelu {
    approximate: GeluApproximate,
    training: TrainingFlag,
}

impl Gelu {
    /// The exact GELU (`approximate='none'`).
    pub fn new() -> Gelu {
        Gelu::with_approximate(GeluApproximate::None)
    }

    /// The tanh approximation (`approximate='tanh'`).
    pub fn tanh() -> Gelu {
        Gelu::with_approximate(GeluApproximate::Tanh)
    }

    /// The GELU computed as `approximate` says.
    pub fn with_approximate(approximate: GeluApproximate) -> Gelu {
        Gelu {
            approximate,
            training: TrainingFlag::new(),
        }
    }
}

impl Default for Gelu {
    fn default() -> Gelu {
        Gelu::new()
    }
}

stateless_module!(Gelu, |s, x| Ok(gelu(x, s.approximate)));

/// `x · sigmoid(x)` element-wise as a layer, PyTorch's `nn.SiLU`.
///
/// # Examples
///
/// ```
/// use netcl::Tensor;
/// use netcl::nn::{Module, Silu};
///
/// let y = Silu::new().forward(&Tensor::from_vec(vec![0.0, 1.0], &[2])?)?.to_vec();
/// assert_eq!(y[0], 0.0);
/// assert!((y[1] - 0.731_058_6).abs() < 1e-6);
/// # Ok::<(), netcl::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct Silu {
    training: TrainingFlag,
}

impl Silu {
    /// A new SiLU layer.
    pub fn new() -> Silu {
        Silu {
            training: TrainingFlag::new(),
        }
    }
}

impl Default for Silu {
    fn default() -> Silu {
        Silu::new()
    }
}

stateless_module!(Silu, |_s, x| Ok(x.silu()));

// Architecture nodes (`Module::architecture`, schema in `nn::architecture`).
use crate::nn::architecture::{Architecture, size2_value};

impl Conv2d {
    pub(crate) fn describe(&self) -> Option<Architecture> {
        let shape = self.weight.shape();
        Some(
            Architecture::new("Conv2d")
                .with("in_channels", shape[1] * self.groups)
                .with("out_channels", shape[0])
                .with("kernel_size", size2_value(Size2(shape[2], shape[3])))
                .with("stride", size2_value(self.stride))
                .with("padding", size2_value(self.padding))
                .with("dilation", size2_value(self.dilation))
                .with("groups", self.groups)
                .with("bias", self.bias.is_some()),
        )
    }
}

/// The node of a pooling layer.
fn pool(kind: &str, kernel_size: Size2, stride: Option<Size2>, padding: Size2) -> Architecture {
    Architecture::new(kind)
        .with("kernel_size", size2_value(kernel_size))
        .with(
            "stride",
            stride.map_or(serde_json::Value::Null, size2_value),
        )
        .with("padding", size2_value(padding))
}

impl MaxPool2d {
    pub(crate) fn describe(&self) -> Option<Architecture> {
        Some(pool(
            "MaxPool2d",
            self.kernel_size,
            self.stride,
            self.padding,
        ))
    }
}

impl AvgPool2d {
    pub(crate) fn describe(&self) -> Option<Architecture> {
        Some(
            pool("AvgPool2d", self.kernel_size, self.stride, self.padding)
                .with("count_include_pad", self.count_include_pad),
        )
    }
}

impl AdaptiveAvgPool2d {
    pub(crate) fn describe(&self) -> Option<Architecture> {
        Some(
            Architecture::new("AdaptiveAvgPool2d")
                .with("output_size", size2_value(self.output_size)),
        )
    }
}

impl Flatten {
    pub(crate) fn describe(&self) -> Option<Architecture> {
        Some(
            Architecture::new("Flatten")
                .with("start_dim", self.start_dim)
                .with("end_dim", self.end_dim),
        )
    }
}

impl Gelu {
    pub(crate) fn describe(&self) -> Option<Architecture> {
        let approximate = match self.approximate {
            GeluApproximate::None => "none",
            GeluApproximate::Tanh => "tanh",
        };
        Some(Architecture::new("Gelu").with("approximate", approximate))
    }
}

impl Silu {
    pub(crate) fn describe(&self) -> Option<Architecture> {
        Some(Architecture::new("Silu"))
    }
}
