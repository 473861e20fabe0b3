//! The kernels that split their work across the caller's rayon pool
//! (attention, softmax, layer norm, GELU and the other element maps, the
//! cross-entropy, AdamW, conv2d on large images) give the same bits on any
//! thread count: each test runs one computation inside pools of 1, 2 and 3
//! threads and compares every value bit for bit. The sizes are those of
//! the example language model's training step (batch 32, width 128,
//! context 64), large enough for every split to happen.

use netcl::Tensor;
use netcl::functional::{self as F, AttnMask};
use netcl::models::{CharLmConfig, CharTransformer, lm_batch};
use netcl::nn::Module;
use netcl::optim::{AdamConfig, AdamW, Optimizer, no_decay_groups};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

/// `f` run inside a rayon pool of `threads` threads.
fn on_pool<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> R {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("a thread pool")
        .install(f)
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.to_vec().iter().map(|v| v.to_bits()).collect()
}

/// `f` on pools of 1, 2 and 3 threads; every result must have the
/// one-thread result's bits. Each named result is a list of tensors' bits.
fn same_bits_on_1_2_3_threads(what: &str, f: impl Fn() -> Vec<(String, Vec<u32>)> + Sync) {
    let one = on_pool(1, &f);
    assert!(!one.is_empty());
    for threads in [2, 3] {
        let many = on_pool(threads, &f);
        assert_eq!(one.len(), many.len(), "{what}: result count");
        for ((name, a), (_, b)) in one.iter().zip(&many) {
            assert_eq!(
                a.len(),
                b.len(),
                "{what}: {name} length on {threads} threads"
            );
            if let Some(i) = a.iter().zip(b).position(|(a, b)| a != b) {
                panic!(
                    "{what}: {name}[{i}] is {} on 1 thread but {} on {threads} threads",
                    f32::from_bits(a[i]),
                    f32::from_bits(b[i]),
                );
            }
        }
    }
}

fn randn(shape: &[usize], seed: u64) -> Tensor {
    Tensor::randn(shape, &mut StdRng::seed_from_u64(seed)).requires_grad_(true)
}

/// Gradients of `Σ r·y` (with a fixed random `r`, so that every output
/// element gets a different upstream gradient) with respect to `inputs`.
fn grads_of(y: &Tensor, inputs: &[&Tensor], seed: u64) -> Vec<(String, Vec<u32>)> {
    let r = Tensor::randn(y.shape(), &mut StdRng::seed_from_u64(seed));
    let loss = y.mul(&r).sum();
    let grads = netcl::autograd::grad(&[&loss], inputs).expect("gradients");
    let mut out = vec![
        ("output".to_string(), bits(y)),
        ("loss".to_string(), bits(&loss)),
    ];
    for (i, g) in grads.iter().enumerate() {
        out.push((format!("grad {i}"), bits(g)));
    }
    out
}

#[test]
fn charlm_adamw_step_has_the_same_bits_on_1_2_and_3_threads() {
    same_bits_on_1_2_3_threads("charlm step", || {
        let mut rng = StdRng::seed_from_u64(21);
        let model = CharTransformer::new(CharLmConfig::new(63), &mut rng);
        let ids: Vec<usize> = (0..32 * 65).map(|_| rng.random_range(0..63)).collect();
        let offsets: Vec<usize> = (0..32).map(|i| i * 65).collect();
        let (x, y) = lm_batch(&ids, &offsets, 64).unwrap();
        let params = model.parameters();
        let mut adamw = AdamW::with_groups(
            no_decay_groups(params.clone()),
            AdamConfig::new(2e-3).weight_decay(0.1),
        );
        let mut out = Vec::new();
        let _train = netcl::autograd::train_mode();
        for step in 0..2 {
            let loss = model.loss(&x, &y).unwrap();
            out.push((format!("loss {step}"), bits(&loss)));
            loss.backward();
            for (i, p) in params.iter().enumerate() {
                let g = p.grad().expect("every parameter has a gradient");
                out.push((format!("step {step} grad of parameter {i}"), bits(&g)));
            }
            adamw.step();
            adamw.zero_grad();
            for (i, p) in params.iter().enumerate() {
                out.push((format!("step {step} parameter {i}"), bits(p)));
            }
        }
        out
    });
}

#[test]
fn attention_has_the_same_bits_on_1_2_and_3_threads() {
    same_bits_on_1_2_3_threads("causal attention", || {
        let (q, k, v) = (
            randn(&[32, 4, 64, 32], 1),
            randn(&[32, 4, 64, 32], 2),
            randn(&[32, 4, 64, 32], 3),
        );
        let y = F::scaled_dot_product_attention(&q, &k, &v, None, true, None);
        grads_of(&y, &[&q, &k, &v], 4)
    });
    same_bits_on_1_2_3_threads("attention with a broadcast additive mask", || {
        // Key and value broadcast along the heads, the mask along the batch:
        // their gradients are sums over the broadcast axes.
        let (q, k, v) = (
            randn(&[16, 4, 48, 32], 5),
            randn(&[16, 1, 40, 32], 6),
            randn(&[16, 1, 40, 24], 7),
        );
        let mask = randn(&[4, 48, 40], 8);
        let y = F::scaled_dot_product_attention(
            &q,
            &k,
            &v,
            Some(AttnMask::Additive(&mask)),
            false,
            None,
        );
        grads_of(&y, &[&q, &k, &v, &mask], 9)
    });
}

#[test]
fn softmax_and_cross_entropy_have_the_same_bits_on_1_2_and_3_threads() {
    same_bits_on_1_2_3_threads("softmax", || {
        let x = randn(&[512, 1000], 10);
        let mut out = grads_of(&x.softmax(-1), &[&x], 11);
        out.extend(grads_of(&x.log_softmax(-1), &[&x], 12));
        out
    });
    same_bits_on_1_2_3_threads("cross_entropy", || {
        let x = randn(&[4096, 63], 13);
        let t: Vec<f32> = (0..4096).map(|i| ((i * 17) % 63) as f32).collect();
        let t = Tensor::from_vec(t, &[4096]).unwrap();
        let loss = x.cross_entropy(&t);
        let g = netcl::autograd::grad(&[&loss], &[&x]).unwrap();
        vec![("loss".into(), bits(&loss)), ("grad".into(), bits(&g[0]))]
    });
}

#[test]
fn conv2d_has_the_same_bits_on_1_2_and_3_threads() {
    // Large and medium images (the convolution's own kernels on AVX-512
    // CPUs, which split the batch's images across the pool): whole-vector
    // rows, and rows that are not (with groups); 11 images, not a multiple
    // of the pieces.
    for (x_shape, w_shape, groups) in [
        ([11, 16, 32, 32], [32, 16, 3, 3], 1),
        ([11, 16, 48, 50], [6, 8, 3, 3], 2),
        ([11, 32, 8, 8], [64, 32, 3, 3], 1),
    ] {
        same_bits_on_1_2_3_threads("conv2d", || {
            let x = randn(&x_shape, 31);
            let w = randn(&w_shape, 32);
            let b = randn(&[w_shape[0]], 33);
            let y = F::conv2d(&x, &w, Some(&b), 1, 1, 1, groups);
            grads_of(&y, &[&x, &w, &b], 34)
        });
    }
}

#[test]
fn layer_norm_has_the_same_bits_on_1_2_and_3_threads() {
    same_bits_on_1_2_3_threads("layer_norm", || {
        let (x, w, b) = (
            randn(&[32, 64, 128], 14),
            randn(&[128], 15),
            randn(&[128], 16),
        );
        let y = F::layer_norm(&x, &[128], Some(&w), Some(&b), 1e-5);
        grads_of(&y, &[&x, &w, &b], 17)
    });
}

#[test]
fn element_maps_have_the_same_bits_on_1_2_and_3_threads() {
    same_bits_on_1_2_3_threads("element maps", || {
        let x = randn(&[512, 512], 18);
        let y = randn(&[512, 512], 19);
        let row = randn(&[512], 20);
        let mut out = Vec::new();
        let unary = [
            ("gelu", x.gelu()),
            ("gelu_tanh", x.gelu_tanh()),
            ("silu", x.silu()),
            ("tanh", x.tanh()),
            ("sigmoid", x.sigmoid()),
            ("exp", x.exp()),
            ("relu", x.relu()),
            ("x * 3 + 1", x.mul_scalar(3.0).add_scalar(1.0)),
        ];
        for (name, z) in unary {
            for (part, b) in grads_of(&z, &[&x], 21) {
                out.push((format!("{name}: {part}"), b));
            }
        }
        for (name, z) in [("x + y", x.add(&y)), ("x * y", x.mul(&y))] {
            for (part, b) in grads_of(&z, &[&x, &y], 22) {
                out.push((format!("{name}: {part}"), b));
            }
        }
        for (name, z) in [("x - row", x.sub(&row)), ("x / e^row", x.div(&row.exp()))] {
            for (part, b) in grads_of(&z, &[&x, &row], 23) {
                out.push((format!("{name}: {part}"), b));
            }
        }
        out
    });
}
