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

/// The same forward pass on raw arrays through the kernel netcl's matmul
/// wraps (the gemm crate called directly, one thread): each layer's output
/// starts as its bias repeated over the rows, the product is accumulated
/// into it, and ReLU runs in place between layers. No tensors, no autograd:
/// the work netcl's no_grad forward does, without the engine.
pub fn raw_forward_gemm(layers: &[(Array2<f32>, Array1<f32>)], x: &Array2<f32>) -> Array2<f32> {
    let mut h: Option<Array2<f32>> = None;
    for (i, (w, b)) in layers.iter().enumerate() {
        let input = h.as_ref().unwrap_or(x);
        let mut out = Array2::zeros((input.nrows(), w.ncols()));
        out.assign(b);
        gemm_direct_acc(input, w, &mut out, 1);
        if i + 1 < layers.len() {
            out.mapv_inplace(|v| v.max(0.0));
        }
        h = Some(out);
    }
    h.expect("at least one layer")
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
    gemm_direct_update(a, b, c, threads, false);
}

/// `c += a · b` with the gemm crate called directly, as [`gemm_direct`].
pub fn gemm_direct_acc(a: &Array2<f32>, b: &Array2<f32>, c: &mut Array2<f32>, threads: usize) {
    gemm_direct_update(a, b, c, threads, true);
}

fn gemm_direct_update(
    a: &Array2<f32>,
    b: &Array2<f32>,
    c: &mut Array2<f32>,
    threads: usize,
    accumulate: bool,
) {
    let (m, k) = a.dim();
    let n = b.ncols();
    assert!(a.is_standard_layout() && b.is_standard_layout() && c.is_standard_layout());
    assert_eq!((k, c.dim()), (b.nrows(), (m, n)), "gemm_direct: shapes");
    let par = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: row-major owned matrices of the shapes asserted above; `c` is
    // a distinct allocation (borrowed mutably) whose elements are
    // initialised, so reading them when accumulating is valid.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            1,
            k as isize,
            b.as_ptr(),
            1,
            n as isize,
            // alpha scales the old output (read only when accumulating),
            // beta the product.
            if accumulate { 1.0 } else { 0.0 },
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

/// One named workload, ready to run: what `benches/workloads` times for an
/// external driver (`scripts/compare_pytorch.py`) and what the target table
/// pairs against its references. Each has a PyTorch equivalent.
pub struct Workload {
    /// The size of the rayon pool the workload runs in.
    pub threads: usize,
    /// One call: an operation, a training step, a forward pass...
    pub run: Box<dyn FnMut() + Send>,
}

/// The names [`workload`] knows, in the order a driver runs them.
pub const WORKLOADS: &[&str] = &[
    "tiny_add_grad",
    "tiny_add_no_grad",
    "chain10_fwd_bwd",
    "mlp_step_b32_1t",
    "mlp_step_b128_1t",
    "mlp_step_b128_2t",
    "mlp_step_b128_2t_shards",
    "forward_b1_64_128_10",
    "forward_b8_64_128_10",
    "forward_b32_64_128_10",
    "forward_b64_64_128_10",
    "forward_b256_784",
    "eval_20k_1t",
    "eval_20k_2t",
    "matmul_32x784x256_1t",
    "matmul_32x784x256_2t",
    "matmul_784x32x256_1t",
    "matmul_784x32x256_2t",
    "matmul_32x256x256_1t",
    "matmul_32x256x256_2t",
    "matmul_256x784x256_1t",
    "matmul_256x784x256_2t",
    "bmm_8x4x64x32x64_fwd_bwd_1t",
    "conv2d_fwd_bwd_1t",
    "conv2d_fwd_1t",
    "cnn_step_b64_1t",
    "cnn_eval_20k_1t",
    "cnn_eval_20k_2t",
    "sdpa_causal_fwd_bwd_1t",
    "layer_norm_fwd_bwd_1t",
    "tanh_mlp_fwd_bwd_b32_1t",
    "tanh_mlp_hvp_b32_1t",
    "matmul_1024x1024x1024_1t",
    "matmul_1024x1024x1024_2t",
    "charlm_step_b32_1t",
    "charlm_step_b32_2t",
    "charlm_generate_256_1t",
];

/// The workload called `name` (one of [`WORKLOADS`]), its data built.
///
/// - `tiny_add_grad`: `&a + &b` on 1-element tensors that both require
///   grad; `tiny_add_no_grad`: the same under a no_grad guard taken in
///   each call.
/// - `chain10_fwd_bwd`: five `*` and five `+` alternating on 1-element
///   tensors, then `backward`.
/// - `mlp_step_b{32,128}_{1,2}t`: a training step of 784-256-256-10 (ReLU,
///   cross-entropy, SGD lr 1e-3, zero_grad); `_shards`: the same step at
///   batch 128 data-parallel in two shards.
/// - `forward_b{1,8,32,64}_64_128_10`, `forward_b256_784`: a no_grad
///   forward (guard taken in each call) of 64-128-10 at batch 1 to 64 (the
///   serving shapes) and of 784-256-256-10 at batch 256.
/// - `eval_20k_{1,2}t`: 20,000 samples of 784-256-256-10 in batches of 256
///   through `parallel::map` under no_grad, counting correct predictions.
/// - `matmul_MxKxN_{1,2}t`: `a.matmul(&b)` on tensors without grad.
/// - `bmm_8x4x64x32x64_fwd_bwd_1t`: the batched product
///   `[8, 4, 64, 32] · [8, 4, 32, 64]` of two tensors requiring grad, summed,
///   and the gradients of both (`autograd::grad`, no accumulation).
/// - `conv2d_fwd_bwd_1t`: `F::conv2d` of a [32, 16, 32, 32] input with 32
///   filters 3x3 and a bias, padding 1 (906 MFLOP forward and backward),
///   every input requiring grad, then `y.sum().backward()` and the leaves'
///   gradients cleared; `conv2d_fwd_1t`: the forward alone, no input
///   requiring grad (302 MFLOP).
/// - `cnn_step_b64_1t`: a training step of `models::digits_cnn` (conv,
///   batch norm, ReLU, max pool, twice, then a linear head) on a batch of
///   64 `[1, 8, 8]` images in training mode: forward, cross-entropy,
///   backward, Adam step (lr 1e-3), zero_grad.
/// - `cnn_eval_20k_{1,2}t`: `Trainer::evaluate` of `models::digits_cnn`
///   over 20,000 images (batches of 256, eval mode, no_grad, loss and
///   accuracy), in a pool of 1 or 2 threads.
/// - `sdpa_causal_fwd_bwd_1t`: causal `scaled_dot_product_attention` of
///   q, k, v `[8, 4, 64, 32]` (batch 8, 4 heads, 64 tokens, head size 32),
///   all requiring grad, then the gradients of the output's sum with
///   respect to all three (`autograd::grad`).
/// - `tanh_mlp_fwd_bwd_b32_1t`, `tanh_mlp_hvp_b32_1t`: one forward and
///   backward of the 784-256-256-10 tanh MLP (cross-entropy, batch 32),
///   and its Hessian-vector product by double backward (issue 20's pair).
/// - `layer_norm_fwd_bwd_1t`: `layer_norm` of `[32, 64, 128]` over the last
///   axis with weight and bias, all requiring grad, then the gradients of
///   the output's sum with respect to all three.
/// - `charlm_step_b32_{1,2}t`: a training step of the example
///   `train_charlm`'s language model (`models::CharTransformer`, 63
///   characters, width 128, 4 heads, 4 blocks, context 64: 818k
///   parameters) at batch 32: forward, cross-entropy, backward, AdamW
///   (weight decay 0.1 on the matrices), zero_grad.
/// - `charlm_generate_256_1t`: 256 characters generated by the same model
///   from a one-character prompt with the key/value cache
///   (`models::Generator`, built once), temperature 1.
pub fn workload(name: &str) -> Option<Workload> {
    use netcl::autograd;
    use std::hint::black_box;
    let single = |run: Box<dyn FnMut() + Send>| Some(Workload { threads: 1, run });
    match name {
        "tiny_add_grad" | "tiny_add_no_grad" => {
            let a = Tensor::ones(&[1]).requires_grad_(true);
            let b = Tensor::ones(&[1]).requires_grad_(true);
            if name == "tiny_add_grad" {
                single(Box::new(move || {
                    black_box(black_box(&a) + black_box(&b));
                }))
            } else {
                single(Box::new(move || {
                    let _guard = autograd::no_grad();
                    black_box(black_box(&a) + black_box(&b));
                }))
            }
        }
        "chain10_fwd_bwd" => {
            let x = Tensor::full(&[1], 0.5).requires_grad_(true);
            let w = Tensor::full(&[1], 1.01).requires_grad_(true);
            single(Box::new(move || {
                let mut y = black_box(&x).clone();
                for i in 0..10 {
                    y = if i % 2 == 0 { &y * &w } else { &y + &w };
                }
                y.backward();
                black_box(&y);
            }))
        }
        "mlp_step_b32_1t" | "mlp_step_b128_1t" | "mlp_step_b128_2t" => {
            let (batch_size, threads) = match name {
                "mlp_step_b32_1t" => (32, 1),
                "mlp_step_b128_1t" => (128, 1),
                _ => (128, 2),
            };
            let (x, y) = batch(batch_size, 784, 10, 3);
            let model = mlp(&[784, 256, 256, 10], 4);
            let mut optimizer = sgd(&model, 1e-3);
            Some(Workload {
                threads,
                run: Box::new(move || {
                    black_box(train_step(&model, &mut optimizer, black_box(&x), &y));
                }),
            })
        }
        "mlp_step_b128_2t_shards" => {
            let (x, y) = batch(128, 784, 10, 3);
            let shards = split_batch(&x, &y, 2);
            let model = mlp(&[784, 256, 256, 10], 4);
            let params = model.parameters();
            let mut optimizer = sgd(&model, 1e-3);
            Some(Workload {
                threads: 2,
                run: Box::new(move || {
                    black_box(train_step_sharded(&model, &mut optimizer, &shards, &params));
                }),
            })
        }
        "forward_b1_64_128_10"
        | "forward_b8_64_128_10"
        | "forward_b32_64_128_10"
        | "forward_b64_64_128_10"
        | "forward_b256_784" => {
            let (sizes, rows): (&[usize], usize) = match name {
                "forward_b256_784" => (&[784, 256, 256, 10], 256),
                _ => {
                    let rows = name["forward_b".len()..].split('_').next()?.parse().ok()?;
                    (&[64, 128, 10], rows)
                }
            };
            let model = mlp(sizes, 1);
            let (x, _) = batch(rows, sizes[0], 10, 2);
            single(Box::new(move || {
                let _guard = autograd::no_grad();
                black_box(model.forward(black_box(&x)).unwrap());
            }))
        }
        "eval_20k_1t" | "eval_20k_2t" => {
            let model = mlp(&[784, 256, 256, 10], 5);
            let batches: Vec<_> = (0..20_000usize.div_ceil(256))
                .map(|i| batch((20_000 - i * 256).min(256), 784, 10, 100 + i as u64))
                .collect();
            Some(Workload {
                threads: if name == "eval_20k_1t" { 1 } else { 2 },
                run: Box::new(move || {
                    let _guard = autograd::no_grad();
                    let correct = netcl::parallel::map(&batches, |(x, y)| {
                        model.forward(x).unwrap().argmax(-1).eq(y).sum().item()
                    });
                    black_box(correct);
                }),
            })
        }
        "bmm_8x4x64x32x64_fwd_bwd_1t" => {
            let a = Tensor::from_array(ndarray::ArrayD::from_shape_fn(
                ndarray::IxDyn(&[8, 4, 64, 32]),
                |i| ((i[2] + i[3] + i[1]) % 7) as f32 * 0.1,
            ))
            .requires_grad_(true);
            let b = Tensor::from_array(ndarray::ArrayD::from_shape_fn(
                ndarray::IxDyn(&[8, 4, 32, 64]),
                |i| ((i[2] * i[3] + i[0]) % 5) as f32 * 0.1,
            ))
            .requires_grad_(true);
            single(Box::new(move || {
                let loss = black_box(&a).matmul(black_box(&b)).sum();
                black_box(autograd::grad(&[&loss], &[&a, &b]).unwrap());
            }))
        }
        "conv2d_fwd_bwd_1t" | "conv2d_fwd_1t" => {
            let (x, w, b) = conv2d_operands();
            if name == "conv2d_fwd_1t" {
                return single(Box::new(move || {
                    black_box(netcl::functional::conv2d(&x, &w, Some(&b), 1, 1, 1, 1));
                }));
            }
            let (x, w, b) = (
                x.requires_grad_(true),
                w.requires_grad_(true),
                b.requires_grad_(true),
            );
            single(Box::new(move || {
                let y = netcl::functional::conv2d(&x, &w, Some(&b), 1, 1, 1, 1);
                y.sum().backward();
                for leaf in [&x, &w, &b] {
                    leaf.zero_grad();
                }
            }))
        }
        "cnn_step_b64_1t" => {
            let (x, y) = digit_images(64, 21);
            let model = netcl::models::digits_cnn(22);
            let mut optimizer =
                netcl::optim::Adam::new(model.parameters(), netcl::optim::AdamConfig::new(1e-3));
            single(Box::new(move || {
                let _train = netcl::nn::train_mode();
                let loss = model.forward(black_box(&x)).unwrap().cross_entropy(&y);
                loss.backward();
                optimizer.step();
                optimizer.zero_grad();
                black_box(loss.item());
            }))
        }
        "cnn_eval_20k_1t" | "cnn_eval_20k_2t" => {
            let (x, y) = digit_images(20_000, 23);
            let eval_set = netcl::data::TensorDataset::new(x, y).unwrap();
            let (x, y) = digit_images(64, 24);
            let train_set = netcl::data::TensorDataset::new(x, y).unwrap();
            let model = netcl::models::digits_cnn(25);
            let optimizer =
                netcl::optim::Sgd::new(model.parameters(), netcl::optim::SgdConfig::new(1e-3));
            let trainer = netcl::train::Trainer::new(model, optimizer, train_set)
                .eval_set(eval_set)
                .eval_batch_size(256)
                .progress(false);
            Some(Workload {
                threads: if name == "cnn_eval_20k_1t" { 1 } else { 2 },
                run: Box::new(move || {
                    black_box(trainer.evaluate().unwrap());
                }),
            })
        }
        "sdpa_causal_fwd_bwd_1t" => {
            let mut rng = StdRng::seed_from_u64(11);
            let mut leaf = || Tensor::randn(&[8, 4, 64, 32], &mut rng).requires_grad_(true);
            let (q, k, v) = (leaf(), leaf(), leaf());
            single(Box::new(move || {
                let y = netcl::functional::scaled_dot_product_attention(
                    black_box(&q),
                    black_box(&k),
                    black_box(&v),
                    None,
                    true,
                    None,
                );
                black_box(autograd::grad(&[&y.sum()], &[&q, &k, &v]).unwrap());
            }))
        }
        "tanh_mlp_fwd_bwd_b32_1t" | "tanh_mlp_hvp_b32_1t" => {
            let (x, y) = batch(32, 784, 10, 3);
            let params = tanh_mlp_params(&[784, 256, 256, 10], 4);
            let mut rng = StdRng::seed_from_u64(5);
            let v: Vec<Tensor> = params
                .iter()
                .map(|p| Tensor::randn(p.shape(), &mut rng))
                .collect();
            let hvp = name == "tanh_mlp_hvp_b32_1t";
            single(Box::new(move || {
                if hvp {
                    black_box(tanh_hvp(&params, &v, black_box(&x), &y));
                } else {
                    black_box(tanh_fwd_bwd(&params, black_box(&x), &y));
                }
            }))
        }
        "layer_norm_fwd_bwd_1t" => {
            let mut rng = StdRng::seed_from_u64(12);
            let x = Tensor::randn(&[32, 64, 128], &mut rng).requires_grad_(true);
            let w = Tensor::randn(&[128], &mut rng).requires_grad_(true);
            let b = Tensor::randn(&[128], &mut rng).requires_grad_(true);
            single(Box::new(move || {
                let y =
                    netcl::functional::layer_norm(black_box(&x), &[128], Some(&w), Some(&b), 1e-5);
                black_box(autograd::grad(&[&y.sum()], &[&x, &w, &b]).unwrap());
            }))
        }
        "charlm_step_b32_1t" | "charlm_step_b32_2t" => {
            use netcl::optim::{AdamConfig, AdamW, no_decay_groups};
            let (model, x, y) = charlm();
            let mut adamw = AdamW::with_groups(
                no_decay_groups(model.parameters()),
                AdamConfig::new(2e-3).weight_decay(0.1),
            );
            Some(Workload {
                threads: if name.ends_with("2t") { 2 } else { 1 },
                run: Box::new(move || {
                    let _train = autograd::train_mode();
                    model.loss(black_box(&x), &y).unwrap().backward();
                    adamw.step();
                    adamw.zero_grad();
                }),
            })
        }
        "charlm_generate_256_1t" => {
            let (model, _, _) = charlm();
            let generator = model.generator().unwrap();
            let mut seed = 0;
            single(Box::new(move || {
                seed += 1;
                black_box(generator.generate(black_box(&[0]), 256, 1.0, None, seed));
            }))
        }
        _ => {
            let (shape, threads) = name.strip_prefix("matmul_")?.split_once('_')?;
            let threads = match threads {
                "1t" => 1,
                "2t" => 2,
                _ => return None,
            };
            let dims: Vec<usize> = shape
                .split('x')
                .map(str::parse)
                .collect::<Result<_, _>>()
                .ok()?;
            let &[m, k, n] = dims.as_slice() else {
                return None;
            };
            let (a, b) = matmul_operands(m, k, n);
            let (a, b) = (Tensor::from_array(a), Tensor::from_array(b));
            Some(Workload {
                threads,
                run: Box::new(move || {
                    black_box(black_box(&a).matmul(black_box(&b)));
                }),
            })
        }
    }
}

/// The operands of an m×k by k×n product, as the matmul benchmarks use.
pub fn matmul_operands(m: usize, k: usize, n: usize) -> (Array2<f32>, Array2<f32>) {
    let a = Array2::from_shape_fn((m, k), |(i, j)| ((i + j) % 7) as f32 * 0.1);
    let b = Array2::from_shape_fn((k, n), |(i, j)| ((i * j) % 5) as f32 * 0.1);
    (a, b)
}

/// The operands of the conv2d workloads: input [32, 16, 32, 32], weight
/// [32, 16, 3, 3], bias [32], seeded.
pub fn conv2d_operands() -> (Tensor, Tensor, Tensor) {
    let mut rng = StdRng::seed_from_u64(7);
    (
        Tensor::randn(&[32, 16, 32, 32], &mut rng),
        Tensor::randn(&[32, 16, 3, 3], &mut rng).mul_scalar(0.1),
        Tensor::randn(&[32], &mut rng),
    )
}

/// The language model of the `charlm_*` workloads (the example
/// `train_charlm`'s sizes, 63 characters), seeded, and a batch of 32
/// sequences of 64 random ids with their targets.
pub fn charlm() -> (netcl::models::CharTransformer, Tensor, Tensor) {
    use netcl::models::{CharLmConfig, CharTransformer, lm_batch};
    use rand::RngExt;
    let mut rng = StdRng::seed_from_u64(21);
    let model = CharTransformer::new(CharLmConfig::new(63), &mut rng);
    let ids: Vec<usize> = (0..32 * 65).map(|_| rng.random_range(0..63)).collect();
    let offsets: Vec<usize> = (0..32).map(|i| i * 65).collect();
    let (x, y) = lm_batch(&ids, &offsets, 64).unwrap();
    (model, x, y)
}

/// `n` seeded `[1, 8, 8]` images with values in [0, 1) and labels cycling
/// through the 10 classes, the inputs of the CNN workloads.
pub fn digit_images(n: usize, seed: u64) -> (Tensor, Tensor) {
    let mut rng = StdRng::seed_from_u64(seed);
    let x = Tensor::rand(&[n, 1, 8, 8], &mut rng);
    let y = Tensor::from_vec((0..n).map(|i| (i % 10) as f32).collect(), &[n]).unwrap();
    (x, y)
}

/// The parameters `[w1, b1, w2, b2, w3, b3]` of the tanh MLP of the
/// Hessian-vector-product rows (`benches/netcl/hvp.rs` and the
/// `tanh_mlp_*` workloads), with `[in, out]` weights as netcl's `Linear`.
pub fn tanh_mlp_params(sizes: &[usize], seed: u64) -> Vec<Tensor> {
    let mut rng = StdRng::seed_from_u64(seed);
    sizes
        .windows(2)
        .flat_map(|pair| {
            let scale = 1.0 / (pair[0] as f32).sqrt();
            [
                (Tensor::randn(&[pair[0], pair[1]], &mut rng) * scale).requires_grad_(true),
                Tensor::zeros(&[pair[1]]).requires_grad_(true),
            ]
        })
        .collect()
}

/// The tanh MLP's cross-entropy loss on `(x, y)`.
pub fn tanh_mlp_loss(params: &[Tensor], x: &Tensor, y: &Tensor) -> Tensor {
    let mut h = x.clone();
    let layers = params.len() / 2;
    for (i, layer) in params.chunks(2).enumerate() {
        h = h.linear(&layer[0], Some(&layer[1]));
        if i + 1 < layers {
            h = h.tanh();
        }
    }
    h.cross_entropy(y)
}

/// One forward and backward, the gradients returned.
pub fn tanh_fwd_bwd(params: &[Tensor], x: &Tensor, y: &Tensor) -> Vec<Tensor> {
    let refs: Vec<&Tensor> = params.iter().collect();
    netcl::autograd::grad(&[&tanh_mlp_loss(params, x, y)], &refs).unwrap()
}

/// The Hessian-vector product `H v` by double backward.
pub fn tanh_hvp(params: &[Tensor], v: &[Tensor], x: &Tensor, y: &Tensor) -> Vec<Tensor> {
    let refs: Vec<&Tensor> = params.iter().collect();
    let create = netcl::autograd::BackwardOptions::new().create_graph(true);
    let grads =
        netcl::autograd::grad_with(&[&tanh_mlp_loss(params, x, y)], &refs, &create).unwrap();
    let dot = grads
        .iter()
        .zip(v)
        .map(|(g, v)| (g.as_ref().unwrap() * v).sum())
        .reduce(|a, b| a + b)
        .unwrap();
    netcl::autograd::grad(&[&dot], &refs).unwrap()
}
