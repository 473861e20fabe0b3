//! Complete models built from the layers of [`nn`](crate::nn), each
//! mirroring a PyTorch module of the same structure, so that
//! [`io::load_torch`](crate::io::load_torch) loads that module's
//! `state_dict` directly.
//!
//! | | |
//! |---|---|
//! | [`digits_cnn`] | a small CNN for 8x8 grey images (the bundled digits), a `Sequential` named as PyTorch's `nn.Sequential` |
//! | [`CharTransformer`] | a character-level transformer language model, with [`Vocab`] and key/value-cached generation ([`Generator`]) |

mod charlm;
mod cnn;

pub use charlm::{CharLmConfig, CharTransformer, Generator, Vocab, lm_batch};
pub use cnn::{DIGITS_CNN_CHANNELS, digits_cnn, try_digits_cnn};
