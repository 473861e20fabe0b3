//! # netcl
//!
//! A thread-safe autograd engine with per-thread grad mode.
//!
//! - [`Tensor`]: `f32` data in [`ndarray`], cheap to clone, `Send + Sync`,
//!   with reverse-mode automatic differentiation.
//! - Grad mode is a property of each thread ([`autograd`]): `no_grad` in
//!   one thread never switches off recording in another, and
//!   [`GradMode`](autograd::GradMode) carries a caller's mode to the threads
//!   that work for it.
//! - Graphs are recorded on a [`Tape`](autograd::Tape), an arena shared by
//!   `Arc` whose nodes are freed as soon as no tensor reaches them.
//!
//! Around the engine:
//!
//! | module | |
//! |---|---|
//! | [`autograd`] | grad mode, tapes, `autograd::grad` and [`grad_with`](autograd::grad_with) (higher-order gradients with `create_graph`), custom ops ([`apply_op`](autograd::apply_op)) |
//! | [`functional`] | PyTorch's functional API: `cat`, `conv2d`, `embedding`, `layer_norm`, attention, ... |
//! | [`parallel`] | rayon helpers that carry the caller's grad mode into every task |
//! | [`models`] | ready-made models named as their PyTorch twins: [`models::digits_cnn`], [`models::CharTransformer`] |
//! | [`nn`] | `Module`, `Linear`, activations, `Dropout`, `Sequential`, `Mlp` |
//! | [`optim`] | `Sgd`, `Adam`, `AdamW`, learning-rate schedules |
//! | [`data`] | datasets, a prefetching `DataLoader`, CSV loading |
//! | [`train`] | `Trainer` and a parallel, never-recording `evaluate` |
//! | [`io`] | parameters to and from safetensors files |
//!
//! # Quick start
//!
//! Fit `y = 2x + 1` by gradient descent, then evaluate without recording:
//!
//! ```
//! use netcl::{Tensor, autograd};
//!
//! let x = Tensor::from_vec(vec![0.0, 1.0, 2.0, 3.0], &[4, 1])?;
//! let y = Tensor::from_vec(vec![1.0, 3.0, 5.0, 7.0], &[4, 1])?;
//! let w = Tensor::zeros(&[1, 1]).requires_grad_(true);
//! let b = Tensor::zeros(&[1]).requires_grad_(true);
//!
//! for _ in 0..500 {
//!     let loss = (x.matmul(&w) + &b).mse_loss(&y);
//!     loss.backward();
//!     for p in [&w, &b] {
//!         let grad = p.grad().unwrap().data();
//!         p.with_data_mut(|mut v| v.scaled_add(-0.05, &grad));
//!         p.zero_grad();
//!     }
//! }
//!
//! let _guard = autograd::no_grad();
//! let pred = Tensor::from_vec(vec![10.0], &[1, 1])?.matmul(&w) + &b;
//! assert!((pred.item() - 21.0).abs() < 1e-2);
//! assert!(!pred.requires_grad());
//! # Ok::<(), netcl::Error>(())
//! ```

#![deny(missing_docs)]
// Unsafe code is allowed only in the module that documents the invariants
// it relies on: the matrix kernel, src/ops/gemm.rs.
#![deny(unsafe_code)]
#![warn(rust_2018_idioms, unreachable_pub)]

mod array;
pub mod autograd;
pub mod data;
mod error;
pub mod functional;
pub mod io;
pub mod memory;
pub mod models;
pub mod nn;
mod ops;
pub mod optim;
pub mod parallel;
mod storage;
mod sync;
mod tensor;
pub mod train;

pub use autograd::{enable_grad, is_grad_enabled, no_grad, set_grad_enabled};
pub use error::{Error, Result};
pub use tensor::{GradFn, Tensor};

/// The `rand` version netcl's API uses, re-exported so callers can make the
/// generators its constructors take (`&mut impl Rng`: [`Tensor::rand`],
/// [`nn::Linear::new`], [`nn::Mlp::new`]) without adding `rand` themselves
/// or guessing its version.
///
/// # Examples
///
/// ```
/// use netcl::nn::{Activation, Mlp};
/// use netcl::rand::SeedableRng;
/// use netcl::rand::rngs::StdRng;
///
/// let mut rng = StdRng::seed_from_u64(42);
/// let model = Mlp::new(&[4, 8, 2], Activation::Relu, &mut rng);
/// assert_eq!(model.dims(), &[4, 8, 2]);
/// ```
pub use rand;

/// The `ndarray` version netcl's API uses, re-exported so callers can name
/// its types without a version mismatch.
pub use ndarray;

/// The README's examples are compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
