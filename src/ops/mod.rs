//! The built-in ops, one family per file: each op's forward, then its
//! backward, with its docs. Every op records through
//! [`record`](crate::autograd::function::record) (ops of one input through
//! [`record_unary`](crate::autograd::function::record_unary)); the shape and
//! array helpers they share are in [`crate::array`].

mod binary;
mod compare;
// The one module with unsafe code: calls into the gemm crate, under the
// contract written on `gemm::kernel`.
#[allow(unsafe_code)]
pub(crate) mod gemm;
mod graph;
mod loss;
mod matmul;
mod reduce;
mod shape;
mod softmax;
mod unary;
