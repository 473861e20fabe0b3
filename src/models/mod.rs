//! Complete models built from the layers of [`nn`](crate::nn), each
//! mirroring a PyTorch module of the same structure, so that
//! [`io::load_torch`](crate::io::load_torch) loads that module's
//! `state_dict` directly.
//!
//! | | |
//! |---|---|
//! | [`CharTransformer`] | a character-level transformer language model, with [`Vocab`] and key/value-cached generation ([`Generator`]) |

mod charlm;

pub use charlm::{CharLmConfig, CharTransformer, Generator, Vocab, lm_batch};
