//! Ready-made models built from the layers of [`nn`](crate::nn), named as
//! the PyTorch `nn.Sequential` (or module) they mirror, so a PyTorch
//! `state_dict` of the same model loads with
//! [`io::load_torch`](crate::io::load_torch).
//!
//! - [`digits_cnn`]: a small CNN for 8x8 grey images (the bundled digits).

mod cnn;

pub use cnn::{DIGITS_CNN_CHANNELS, digits_cnn, try_digits_cnn};
