//! loom model checks of netcl live in `tests/`; this crate has no library code.
//!
//! Run them with `RUSTFLAGS="--cfg loom" cargo test -p loom-tests --release`.
