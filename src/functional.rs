//! PyTorch's functional API (`torch.*` and `torch.nn.functional.*`), so a
//! PyTorch model translates line by line.
//!
//! Every op here is also reachable as a [`Tensor`](crate::Tensor) method
//! where PyTorch has one (`x.permute(..)`, `x.masked_fill(..)`); the free
//! functions are for the ops PyTorch spells as functions (`torch.cat`,
//! `F.conv2d`, `F.embedding`, `F.scaled_dot_product_attention`). Names,
//! argument order and semantics follow PyTorch; where netcl departs, the
//! op's docs say so. Each op has a panicking form and a `try_` twin that
//! returns [`Result`](crate::Result) and never panics.
//!
//! Two departures hold throughout, because a netcl tensor has one element
//! type (`f32`):
//!
//! - **Indices** (`index_select`, `gather`, `embedding`, class targets) are
//!   `f32` tensors holding integers, exact up to 2^24. Anything else (a
//!   fraction, a negative value, NaN, a value past the dimension) is
//!   [`Error::Index`](crate::Error::Index), naming the position, the value
//!   and the bound.
//! - **Masks** (`masked_fill`, `where_`, boolean attention masks) are `f32`
//!   tensors of 0 (false) and 1 (true), as [`Tensor::eq`](crate::Tensor::eq),
//!   [`gt`](crate::Tensor::gt) and [`lt`](crate::Tensor::lt) return. Any
//!   other value is [`Error::InvalidArgument`](crate::Error::InvalidArgument).
//!
//! Use it as PyTorch code does: `use netcl::functional as F;`.

pub use crate::ops::activation::{GeluApproximate, gelu, silu};
pub use crate::ops::attention::{
    AttnMask, scaled_dot_product_attention, try_scaled_dot_product_attention,
};
pub use crate::ops::conv::{Size2, conv1d, conv2d, try_conv1d, try_conv2d};
pub use crate::ops::index::{embedding, try_embedding, try_where_, where_};
pub use crate::ops::layout::{cat, stack, try_cat, try_stack};
pub use crate::ops::loss::{
    BceWithLogitsOptions, CrossEntropyOptions, NllLossOptions, Reduction,
    binary_cross_entropy_with_logits, cross_entropy, nll_loss,
    try_binary_cross_entropy_with_logits, try_cross_entropy, try_nll_loss,
};
pub use crate::ops::norm::{
    BatchNormOutput, batch_norm, layer_norm, rms_norm, try_batch_norm, try_layer_norm, try_rms_norm,
};
pub use crate::ops::pool::{
    adaptive_avg_pool2d, avg_pool2d, max_pool2d, try_adaptive_avg_pool2d, try_avg_pool2d,
    try_max_pool2d,
};
