//! Models and data shared by the topics.

use ndarray::{Array1, Array2, ArrayView2, Axis, Ix1, Ix2};
use netcl::Tensor;
use netcl::nn::{Activation, Mlp, Module};
use netcl::optim::{Optimizer, Sgd, SgdConfig};
use rand::SeedableRng;
use rand::rngs::StdRng;

/// The library's MLP (Linear + ReLU layers), seeded.
pub fn mlp(sizes: &[usize], seed: u64) -> Mlp {
    Mlp::new(sizes, Activation::Relu, &mut StdRng::seed_from_u64(seed))
}

/// A training step as a user writes it: forward, cross-entropy, backward,
/// SGD step, zero_grad. Returns the loss.
pub fn train_step(model: &Mlp, optimizer: &mut Sgd, x: &Tensor, y: &Tensor) -> f32 {
    let loss = model.forward(x).unwrap().cross_entropy(y);
    loss.backward();
    optimizer.step();
    optimizer.zero_grad();
    loss.item()
}

/// The same step data-parallel: the batch split into `shards` equal parts
/// whose gradients `parallel::backward_shards` computes on the pool's
/// workers (one thread each) and sums in shard order. Each shard's mean
/// loss is scaled by its share, so the summed gradient is the full batch's.
pub fn train_step_sharded(
    model: &Mlp,
    optimizer: &mut Sgd,
    shards: &[(Tensor, Tensor)],
    params: &[Tensor],
) -> f32 {
    let share = 1.0 / shards.len() as f32;
    let losses = netcl::parallel::backward_shards(shards, params, |(x, y)| {
        Ok(model.forward(x)?.try_cross_entropy(y)? * share)
    })
    .unwrap();
    optimizer.step();
    optimizer.zero_grad();
    losses.iter().sum()
}

/// `(x, y)` split into `shards` batches of consecutive rows.
pub fn split_batch(x: &Tensor, y: &Tensor, shards: usize) -> Vec<(Tensor, Tensor)> {
    let (n, features) = (x.shape()[0], x.shape()[1]);
    let rows = n / shards;
    let (xs, ys) = (x.to_vec(), y.to_vec());
    (0..shards)
        .map(|s| {
            let xs = xs[s * rows * features..(s + 1) * rows * features].to_vec();
            let ys = ys[s * rows..(s + 1) * rows].to_vec();
            (
                Tensor::from_vec(xs, &[rows, features]).unwrap(),
                Tensor::from_vec(ys, &[rows]).unwrap(),
            )
        })
        .collect()
}

/// Plain SGD over the model's parameters.
pub fn sgd(model: &Mlp, lr: f32) -> Sgd {
    Sgd::new(model.parameters(), SgdConfig::new(lr))
}

/// The model's weights as plain ndarray matrices, for raw baselines.
pub fn raw(model: &Mlp) -> Vec<(Array2<f32>, Array1<f32>)> {
    model
        .parameters()
        .chunks(2)
        .map(|p| {
            let w = p[0].to_array().into_dimensionality::<Ix2>().unwrap();
            let b = p[1].to_array().into_dimensionality::<Ix1>().unwrap();
            (w, b)
        })
        .collect()
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
    mut f: impl FnMut() -> R + Send,
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

/// `c = a · b` with the gemm crate called directly on row-major matrices:
/// the kernel netcl's matmul wraps, as a reference.
pub fn gemm_direct(a: &Array2<f32>, b: &Array2<f32>, c: &mut Array2<f32>, threads: usize) {
    let (m, k) = a.dim();
    let n = b.ncols();
    let par = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: row-major owned matrices of the stated shapes; `c` is a
    // distinct allocation.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.as_ptr(),
            1,
            k as isize,
            b.as_ptr(),
            1,
            n as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            par,
        )
    }
}

/// The digits data, inputs scaled to [0, 1], split 80/20 with seed 42.
pub fn digits_split() -> (netcl::data::TensorDataset, netcl::data::TensorDataset) {
    use netcl::data::{self, TensorDataset};
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/data/digits.csv");
    let digits = data::load_digits(path).expect("data/digits.csv");
    let digits = TensorDataset::new(digits.inputs() / 16.0, digits.targets().clone()).unwrap();
    digits.split(0.8, 42).unwrap()
}

/// Trains a fresh 64-128-10 MLP on `train_set` for `epochs` epochs at batch
/// 32 with Adam (lr 2e-3), through the shuffling data loader, as the main
/// example does.
pub fn train_digits(train_set: &netcl::data::TensorDataset, epochs: u64) -> Mlp {
    use netcl::data::DataLoader;
    use netcl::optim::{Adam, AdamConfig};
    let model = mlp(&[64, 128, 10], 42);
    let mut optimizer = Adam::new(model.parameters(), AdamConfig::new(2e-3));
    let loader = DataLoader::new(train_set.clone(), 32).shuffle(42);
    for epoch in 0..epochs {
        for batch in loader.epoch(epoch) {
            let batch = batch.unwrap();
            let loss = model
                .forward(&batch.inputs)
                .unwrap()
                .cross_entropy(&batch.targets);
            loss.backward();
            optimizer.step();
            optimizer.zero_grad();
        }
    }
    model
}
