//! The built-in ops, one family per file: each op's forward, then its
//! backward, with its docs. Every op records through
//! [`record`](crate::autograd::function::record) (ops of one input through
//! [`record_unary`](crate::autograd::function::record_unary)); the shape and
//! array helpers they share are in [`crate::array`].

pub(crate) mod activation;
pub(crate) mod attention;
mod binary;
mod compare;
pub(crate) mod conv;
mod conv_direct;
// The one module with unsafe code: calls into the gemm crate, under the
// contract written on `gemm::kernel`.
#[allow(unsafe_code)]
pub(crate) mod gemm;
#[cfg(not(loom))]
mod gemm_small;
mod graph;
pub(crate) mod index;
pub(crate) mod layout;
pub(crate) mod loss;
mod matmul;
pub(crate) mod norm;
pub(crate) mod pool;
mod reduce;
mod shape;
mod softmax;
mod unary;
pub(crate) mod vectorized;
