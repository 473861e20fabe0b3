//! Models and data shared by the topics.

use ndarray::{Array1, Array2, ArrayView2, Axis};
use netcl::Tensor;
use rand::SeedableRng;
use rand::rngs::StdRng;

/// An MLP written with netcl tensors: weights `[in, out]`, ReLU between
/// layers, logits out.
pub struct Mlp {
    pub layers: Vec<(Tensor, Tensor)>,
}

impl Mlp {
    pub fn new(sizes: &[usize], seed: u64) -> Mlp {
        let mut rng = StdRng::seed_from_u64(seed);
        let layers = sizes
            .windows(2)
            .map(|w| {
                let bound = 1.0 / (w[0] as f32).sqrt();
                let weight =
                    Tensor::uniform(&[w[0], w[1]], -bound, bound, &mut rng).requires_grad_(true);
                let bias = Tensor::uniform(&[w[1]], -bound, bound, &mut rng).requires_grad_(true);
                (weight, bias)
            })
            .collect();
        Mlp { layers }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let mut h = x.clone();
        for (i, (w, b)) in self.layers.iter().enumerate() {
            h = h.matmul(w).add(b);
            if i + 1 < self.layers.len() {
                h = h.relu();
            }
        }
        h
    }

    /// One SGD step on `(x, y)`; returns the loss.
    pub fn train_step(&self, x: &Tensor, y: &Tensor, lr: f32) -> f32 {
        let loss = self.forward(x).cross_entropy(y);
        loss.backward();
        let _guard = netcl::autograd::no_grad();
        for (w, b) in &self.layers {
            for p in [w, b] {
                let grad = p.grad().expect("used").data();
                p.with_data_mut(|mut v| v.scaled_add(-lr, &grad));
                p.zero_grad();
            }
        }
        loss.item()
    }

    /// The same weights as plain ndarray matrices, for raw baselines.
    pub fn raw(&self) -> Vec<(Array2<f32>, Array1<f32>)> {
        self.layers
            .iter()
            .map(|(w, b)| {
                let w = w.to_array().into_dimensionality().unwrap();
                let b = b.to_array().into_dimensionality().unwrap();
                (w, b)
            })
            .collect()
    }
}

/// The same forward pass in raw ndarray: no tensors, no autograd.
pub fn raw_forward(layers: &[(Array2<f32>, Array1<f32>)], x: ArrayView2<'_, f32>) -> Array2<f32> {
    let mut h = x.dot(&layers[0].0) + layers[0].1.view().insert_axis(Axis(0));
    for (w, b) in &layers[1..] {
        h.mapv_inplace(|v| v.max(0.0));
        h = h.dot(w) + b.view().insert_axis(Axis(0));
    }
    h
}

/// A seeded batch: inputs in [0, 1) and class labels.
pub fn batch(n: usize, features: usize, classes: usize, seed: u64) -> (Tensor, Tensor) {
    let mut rng = StdRng::seed_from_u64(seed);
    let x = Tensor::rand(&[n, features], &mut rng);
    let y = Tensor::from_vec((0..n).map(|i| (i % classes) as f32).collect(), &[n]).unwrap();
    (x, y)
}

/// A rayon pool of `threads` threads.
pub fn pool(threads: usize) -> netcl::parallel::rayon::ThreadPool {
    netcl::parallel::rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap()
}

/// Times `f` with criterion, every iteration running inside `pool` (so the
/// pool's size decides how many threads kernels use), without a cross-thread
/// hand-off per iteration.
pub fn iter_in<R>(
    bench: &mut criterion::Bencher<'_>,
    pool: &netcl::parallel::rayon::ThreadPool,
    f: impl Fn() -> R + Sync,
) {
    bench.iter_custom(|iters| {
        pool.install(|| {
            let start = std::time::Instant::now();
            for _ in 0..iters {
                std::hint::black_box(f());
            }
            start.elapsed()
        })
    });
}
