//! netcl's benchmarks, one module per topic. Every comparison the targets in
//! BENCHMARKS.md name is measured in the same run as its reference.
//!
//! ```text
//! cargo bench --bench netcl                 # everything
//! cargo bench --bench netcl -- tiny         # one topic
//! cargo bench --bench netcl -- hvp          # higher-order gradients
//! ```

use criterion::{Criterion, criterion_group, criterion_main};
use std::time::Duration;

mod chain;
#[allow(
    dead_code,
    reason = "the bench helpers are shared by four bench binaries; each uses a part"
)]
mod common;
mod digits;
mod eval;
mod forward;
mod hvp;
mod matmul;
mod mlp;
mod serving;
mod tiny;

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30)
        .without_plots()
}

criterion_group! {
    name = benches;
    config = config();
    targets = tiny::bench, hvp::bench, chain::bench, matmul::bench, forward::bench, mlp::bench, eval::bench, digits::bench, serving::bench
}
criterion_main!(benches);
