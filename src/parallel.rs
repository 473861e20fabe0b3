//! Parallel helpers that carry the caller's grad mode into every task: the
//! only file that uses rayon.

use crate::autograd::GradMode;

/// Applies `f` to every item in parallel and returns the results in order.
/// Every call of `f` runs in the caller's grad mode (flag and tape), entered
/// once per chunk of items on whichever worker runs it.
///
/// # Examples
///
/// ```
/// use netcl::{Tensor, autograd, parallel};
///
/// let w = Tensor::ones(&[3]).requires_grad_(true);
/// let batches: Vec<Tensor> = (0..8).map(|i| Tensor::full(&[3], i as f32)).collect();
/// let _guard = autograd::no_grad();
/// let outputs = parallel::map(&batches, |x| (x * &w).sum());
/// // Every worker ran in the caller's no_grad mode.
/// assert!(outputs.iter().all(|y| !y.requires_grad()));
/// assert_eq!(outputs[2].item(), 6.0);
/// ```
pub fn map<T, R, F>(items: &[T], f: F) -> Vec<R>
where
    T: Sync,
    R: Send,
    F: Fn(&T) -> R + Sync + Send,
{
    let mode = GradMode::current();
    #[cfg(not(loom))]
    {
        use rayon::prelude::*;
        items
            .par_chunks(chunk_len(items.len()))
            .flat_map_iter(|chunk| {
                let _guard = mode.enter();
                chunk.iter().map(&f).collect::<Vec<_>>()
            })
            .collect()
    }
    #[cfg(loom)]
    {
        mode.run(|| items.iter().map(f).collect())
    }
}

/// Items per chunk: about four chunks per worker, so the pool can balance
/// load while the mode is entered once per chunk rather than per item.
#[cfg(not(loom))]
fn chunk_len(len: usize) -> usize {
    let chunks = 4 * rayon::current_num_threads().max(1);
    len.div_ceil(chunks).max(1)
}
