//! The layers of issue 21: each against its functional op, finite-difference
//! gradients of its parameters, forks, and save/load round trips.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use netcl::functional as F;
use netcl::nn::{
    AdaptiveAvgPool2d, AttentionMasks, AvgPool2d, BatchNorm1d, BatchNorm2d, Conv2d, Embedding,
    Flatten, Gelu, LayerNorm, MaxPool2d, Module, MultiheadAttention, Published, RmsNorm, Silu,
    TransformerBlock, eval_mode, train_mode,
};
use netcl::rand::SeedableRng;
use netcl::rand::rngs::StdRng;
use netcl::{Tensor, autograd, io};

fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

fn randn(shape: &[usize], seed: u64) -> Tensor {
    Tensor::randn(shape, &mut rng(seed))
}

fn assert_close(a: &[f32], b: &[f32], tol: f32, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= tol * (1.0 + y.abs()),
            "{what}[{i}]: {x} vs {y}"
        );
    }
}

/// Checks the gradient of `sum(forward(x) · r)` with respect to every
/// parameter of `model` against central finite differences.
fn check_param_grads(model: &dyn Module, x: &Tensor, tol: f32) {
    let out_shape = model.forward(x).unwrap().shape().to_vec();
    let r = randn(&out_shape, 99);
    let loss = |m: &dyn Module| -> f64 {
        let _g = autograd::no_grad();
        let y = m.forward(x).unwrap().to_vec();
        y.iter()
            .zip(r.to_vec())
            .map(|(a, b)| f64::from(*a) * f64::from(b))
            .sum()
    };
    model.zero_grad();
    model
        .forward(x)
        .unwrap()
        .try_mul(&r)
        .unwrap()
        .sum()
        .backward();
    for (name, p) in model.named_parameters() {
        let analytic = p
            .grad()
            .unwrap_or_else(|| panic!("{name} has no grad"))
            .to_vec();
        let n = p.numel();
        // At most 12 coordinates per parameter, spread over it.
        let step = (n / 12).max(1);
        for i in (0..n).step_by(step) {
            let h = 1e-2f32;
            let set = |delta: f32| {
                p.with_data_mut(|mut d| {
                    *d.iter_mut().nth(i).unwrap() += delta;
                })
            };
            set(h);
            let plus = loss(model);
            set(-2.0 * h);
            let minus = loss(model);
            set(h);
            let numeric = ((plus - minus) / (2.0 * f64::from(h))) as f32;
            let a = analytic[i];
            assert!(
                (a - numeric).abs() <= tol * (1.0 + numeric.abs()),
                "{name}[{i}]: analytic {a}, numeric {numeric}"
            );
        }
    }
}

/// A fork computes the same, and changing it leaves the original alone.
fn check_fork(model: &dyn Module, x: &Tensor) {
    let _eval = eval_mode();
    let fork = model.try_fork().unwrap();
    let (a, b) = (model.forward(x).unwrap(), fork.forward(x).unwrap());
    assert_eq!(a.to_vec(), b.to_vec());
    let before: Vec<Vec<f32>> = model.parameters().iter().map(Tensor::to_vec).collect();
    for p in fork.parameters() {
        p.with_data_mut(|mut d| d.fill(0.5));
    }
    let after: Vec<Vec<f32>> = model.parameters().iter().map(Tensor::to_vec).collect();
    assert_eq!(before, after, "a fork shares no parameter");
}

/// `io::to_bytes`/`load_bytes` and `to_torch_bytes`/`load_torch_bytes`
/// into `blank` reproduce `model`'s parameters, buffers and outputs.
fn check_round_trip(model: &dyn Module, blank: &dyn Module, x: &Tensor) {
    let _eval = eval_mode();
    let expected = model.forward(x).unwrap().to_vec();
    for torch in [false, true] {
        let bytes = if torch {
            io::to_torch_bytes(model).unwrap()
        } else {
            io::to_bytes(model).unwrap()
        };
        let fresh = blank.try_fork().unwrap();
        if torch {
            io::load_torch_bytes(&fresh, &bytes).unwrap();
        } else {
            io::load_bytes(&fresh, &bytes).unwrap();
        }
        assert_eq!(
            fresh.forward(x).unwrap().to_vec(),
            expected,
            "torch = {torch}"
        );
        let vals = |m: &dyn Module| -> Vec<(String, Vec<f32>)> {
            m.named_buffers()
                .into_iter()
                .map(|(n, t)| (n, t.to_vec()))
                .collect()
        };
        assert_eq!(vals(&*fresh), vals(model), "buffers, torch = {torch}");
    }
}

#[test]
fn conv2d_matches_functional_and_pytorch_names() {
    let conv = Conv2d::try_grouped(4, 6, (3, 2), 2, true, &mut rng(1))
        .unwrap()
        .with_stride(2)
        .with_padding((1, 0))
        .with_dilation((1, 2));
    let names: Vec<String> = conv
        .named_parameters()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(names, ["weight", "bias"]);
    assert_eq!(conv.weight().shape(), &[6, 2, 3, 2]);
    assert!(conv.torch_layouts().is_empty(), "OIHW is PyTorch's layout");
    // Kaiming-uniform(a = √5): |w| ≤ 1/√fan_in, fan_in = 2·3·2.
    let bound = 1.0 / 12f32.sqrt();
    assert!(conv.weight().to_vec().iter().all(|w| w.abs() <= bound));
    assert!(
        conv.bias()
            .unwrap()
            .to_vec()
            .iter()
            .all(|w| w.abs() <= bound)
    );
    let x = randn(&[2, 4, 7, 8], 2);
    let expected = F::conv2d(&x, conv.weight(), conv.bias(), 2, (1, 0), (1, 2), 2);
    assert_eq!(conv.forward(&x).unwrap().to_vec(), expected.to_vec());
}

#[test]
fn conv2d_gradients_fork_and_round_trip() {
    let conv = Conv2d::new(2, 3, 3, &mut rng(3)).with_padding(1);
    let x = randn(&[2, 2, 4, 4], 4);
    check_param_grads(&conv, &x, 2e-2);
    check_fork(&conv, &x);
    check_round_trip(&conv, &Conv2d::zeros(2, 3, 3).unwrap().with_padding(1), &x);
    let clone = conv.clone();
    assert!(!clone.weight().same_tensor(conv.weight()));
}

#[test]
fn pools_flatten_and_activations_match_functional() {
    let x = randn(&[2, 3, 6, 5], 5);
    let y = MaxPool2d::new(3)
        .with_stride(2)
        .with_padding(1)
        .forward(&x)
        .unwrap();
    assert_eq!(
        y.to_vec(),
        F::max_pool2d(&x, 3, Some(F::Size2(2, 2)), 1).to_vec()
    );
    let avg = AvgPool2d::new(2)
        .with_padding(1)
        .with_count_include_pad(false);
    assert_eq!(
        avg.forward(&x).unwrap().to_vec(),
        F::avg_pool2d(&x, 2, None, 1, false).to_vec()
    );
    let ada = AdaptiveAvgPool2d::new((2, 3)).forward(&x).unwrap();
    assert_eq!(ada.to_vec(), F::adaptive_avg_pool2d(&x, (2, 3)).to_vec());
    assert_eq!(Flatten::new().forward(&x).unwrap().shape(), &[2, 90]);
    assert_eq!(
        Flatten::with_dims(1, 2).forward(&x).unwrap().shape(),
        &[2, 18, 5]
    );
    assert_eq!(
        Gelu::new().forward(&x).unwrap().to_vec(),
        F::gelu(&x, F::GeluApproximate::None).to_vec()
    );
    assert_eq!(
        Gelu::tanh().forward(&x).unwrap().to_vec(),
        F::gelu(&x, F::GeluApproximate::Tanh).to_vec()
    );
    assert_eq!(
        Silu::new().forward(&x).unwrap().to_vec(),
        F::silu(&x).to_vec()
    );
    let layers: Vec<Box<dyn Module>> = vec![
        Box::new(MaxPool2d::new(2)),
        Box::new(AvgPool2d::new(2)),
        Box::new(AdaptiveAvgPool2d::new(1)),
        Box::new(Flatten::new()),
        Box::new(Gelu::new()),
        Box::new(Silu::new()),
    ];
    for layer in &layers {
        assert!(layer.named_parameters().is_empty());
        check_fork(layer, &x);
    }
}

#[test]
fn batch_norm_training_mirrors_pytorch() {
    let bn = BatchNorm2d::new(3);
    let names: Vec<String> = bn.named_parameters().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["weight", "bias"]);
    bn.weight().unwrap().with_data_mut(|mut d| {
        d.iter_mut().zip([0.5, 1.5, 2.0]).for_each(|(a, b)| *a = b);
    });
    let x = randn(&[4, 3, 3, 2], 6);
    let _train = train_mode();
    let y = bn.forward(&x).unwrap();
    let (zeros, ones) = (Tensor::zeros(&[3]), Tensor::ones(&[3]));
    let expected = F::batch_norm(
        &x,
        Some(&zeros),
        Some(&ones),
        bn.weight(),
        bn.bias(),
        true,
        0.1,
        1e-5,
    );
    assert_eq!(y.to_vec(), expected.output.to_vec());
    let buffers = bn.named_buffers();
    assert_close(
        &buffers[0].1.to_vec(),
        &expected.running_mean.unwrap().to_vec(),
        1e-6,
        "running_mean",
    );
    assert_close(
        &buffers[1].1.to_vec(),
        &expected.running_var.unwrap().to_vec(),
        1e-6,
        "running_var",
    );
    assert_eq!(buffers[2].1.item(), 1.0);
    // A second batch: (1 - 0.1)·old + 0.1·batch, as PyTorch.
    let x2 = randn(&[4, 3, 3, 2], 7);
    let (m1, v1) = (buffers[0].1.clone(), buffers[1].1.clone());
    bn.forward(&x2).unwrap();
    let e2 = F::batch_norm(&x2, Some(&m1), Some(&v1), None, None, true, 0.1, 1e-5);
    let now = bn.named_buffers();
    assert_close(
        &now[0].1.to_vec(),
        &e2.running_mean.unwrap().to_vec(),
        1e-6,
        "mean 2",
    );
    assert_close(
        &now[1].1.to_vec(),
        &e2.running_var.unwrap().to_vec(),
        1e-6,
        "var 2",
    );
    assert_eq!(now[2].1.item(), 2.0);
    // Eval: the running statistics, nothing updated.
    drop(_train);
    let _eval = eval_mode();
    let ye = bn.forward(&x).unwrap();
    let (m2, v2) = (now[0].1.clone(), now[1].1.clone());
    let ee = F::batch_norm(
        &x,
        Some(&m2),
        Some(&v2),
        bn.weight(),
        bn.bias(),
        false,
        0.1,
        1e-5,
    );
    assert_eq!(ye.to_vec(), ee.output.to_vec());
    assert_eq!(bn.named_buffers()[2].1.item(), 2.0);
    // Wrong ranks are errors.
    assert!(bn.forward(&Tensor::ones(&[2, 3])).is_err());
    assert!(
        BatchNorm1d::new(3)
            .forward(&Tensor::ones(&[2, 3, 4, 4]))
            .is_err()
    );
}

#[test]
fn batch_norm_gradients_fork_and_round_trip() {
    let bn = BatchNorm1d::new(3);
    let x = randn(&[5, 3, 2], 8);
    {
        let _train = train_mode();
        bn.forward(&x).unwrap();
        bn.forward(&randn(&[5, 3, 2], 9)).unwrap();
    }
    {
        let _eval = eval_mode();
        check_param_grads(&bn, &x, 2e-2);
    }
    check_fork(&bn, &x);
    // The fork's buffers are its own.
    let fork = bn.clone();
    {
        let _train = train_mode();
        fork.forward(&x).unwrap();
    }
    assert_eq!(fork.named_buffers()[2].1.item(), 3.0);
    assert_eq!(bn.named_buffers()[2].1.item(), 2.0);
    check_round_trip(&bn, &BatchNorm1d::new(3), &x);
}

/// Whether one eval forward of `bn` (2 channels, updated only with the
/// batch of `batch_norm_concurrent_trainers_lose_no_update`) used a mean
/// and a variance of different updates. From a constant input x the output
/// is (x - mean)/√(var + eps): x = 0 and x = 1 recover the snapshot, and
/// after k updates from (0, 1) mean = m·(1 - 0.9^k), var = 1 + (v - 1)·(1 -
/// 0.9^k): a consistent snapshot has one k for both.
fn torn_snapshot(bn: &BatchNorm2d) -> bool {
    let _eval = eval_mode();
    let _g = autograd::no_grad();
    let probe = Tensor::from_vec(vec![0.0, 0.0, 1.0, 1.0], &[2, 2, 1, 1]).unwrap();
    let y = bn.forward(&probe).unwrap().to_vec();
    (0..2).any(|c| {
        let inv_std = y[2 + c] - y[c];
        let mean = -y[c] / inv_std;
        let var = 1.0 / (inv_std * inv_std) - 1e-5;
        let target = [(1.0, 32.0 / 7.0), (3.0, 128.0 / 7.0)][c];
        let f_mean = mean / target.0;
        let f_var = (var - 1.0) / (target.1 - 1.0);
        (f_mean - f_var).abs() > 1e-3
    })
}

#[test]
fn the_torn_snapshot_detector_detects() {
    let bn = BatchNorm2d::new(2);
    assert!(!torn_snapshot(&bn));
    // One update's mean (k = 1) with the initial variance (k = 0).
    let mean = Tensor::from_vec(vec![0.1, 0.3], &[2]).unwrap();
    bn.buffer_state()
        .store(vec![mean, Tensor::ones(&[2]), Tensor::scalar(1.0)])
        .unwrap();
    assert!(torn_snapshot(&bn));
    // k = 1 for both: consistent.
    let var = Tensor::from_vec(
        vec![
            1.0 + 0.1 * (32.0 / 7.0 - 1.0),
            1.0 + 0.1 * (128.0 / 7.0 - 1.0),
        ],
        &[2],
    )
    .unwrap();
    let mean = Tensor::from_vec(vec![0.1, 0.3], &[2]).unwrap();
    bn.buffer_state()
        .store(vec![mean, var, Tensor::scalar(1.0)])
        .unwrap();
    assert!(!torn_snapshot(&bn));
}

/// Two trainers update one BatchNorm2d while readers evaluate beside them:
/// no update is lost, and every eval forward uses one consistent snapshot.
#[test]
fn batch_norm_concurrent_trainers_lose_no_update() {
    const STEPS: usize = 1000;
    let bn = Arc::new(BatchNorm2d::new(2));
    let published = Published::new(&*bn).unwrap();
    // Every batch has channel means 1 and 3 and unbiased variances 32/7
    // and 128/7. With the same batch every time, after k updates mean =
    // m·(1 - 0.9^k) and var = 1 + (v - 1)·(1 - 0.9^k): a consistent
    // snapshot has one k for its mean and its variance.
    let batch = {
        // Channel 0: values 1 ± 2·s, channel 1: 3 ± 4·s, s = ±1 alternating.
        let mut v = Vec::new();
        for n in 0..2 {
            for c in 0..2 {
                for i in 0..4 {
                    let s = if (i + n) % 2 == 0 { 1.0 } else { -1.0 };
                    v.push(if c == 0 { 1.0 + 2.0 * s } else { 3.0 + 4.0 * s });
                }
            }
        }
        Tensor::from_vec(v, &[2, 2, 2, 2]).unwrap()
    };
    let stop = AtomicBool::new(false);
    let reads = AtomicUsize::new(0);
    let inconsistent = AtomicUsize::new(0);
    std::thread::scope(|s| {
        let mut trainers = Vec::new();
        for _ in 0..2 {
            let (bn, batch, reads) = (Arc::clone(&bn), batch.clone(), &reads);
            trainers.push(s.spawn(move || {
                // Start once the readers run, so that they overlap.
                while reads.load(Ordering::Relaxed) < 2 {
                    std::thread::yield_now();
                }
                let _train = train_mode();
                let _g = autograd::no_grad();
                for _ in 0..STEPS {
                    bn.forward(&batch).unwrap();
                }
            }));
        }
        for _ in 0..2 {
            let (bn, stop, reads, inconsistent) = (&bn, &stop, &reads, &inconsistent);
            s.spawn(move || {
                let _eval = eval_mode();
                let _g = autograd::no_grad();
                while !stop.load(Ordering::Relaxed) {
                    if torn_snapshot(bn) {
                        inconsistent.fetch_add(1, Ordering::Relaxed);
                    }
                    reads.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        for t in trainers {
            t.join().unwrap();
        }
        stop.store(true, Ordering::Relaxed);
    });
    let buffers = bn.named_buffers();
    let tracked = buffers[2].1.item();
    let reads = reads.load(Ordering::Relaxed);
    let inconsistent = inconsistent.load(Ordering::Relaxed);
    println!(
        "BatchNorm2d: {} training forwards on 2 threads, num_batches_tracked = {tracked}, \
         {reads} eval forwards beside them, {inconsistent} inconsistent",
        2 * STEPS
    );
    assert_eq!(tracked, (2 * STEPS) as f32, "no update lost");
    assert_eq!(inconsistent, 0);
    assert!(reads >= 2);
    // After 2000 identical updates the running statistics are 1 - 0.9^2000 ≈ 1
    // of the way to the batch statistics, each exactly once.
    assert_close(&buffers[0].1.to_vec(), &[1.0, 3.0], 1e-4, "running_mean");
    assert_close(
        &buffers[1].1.to_vec(),
        &[32.0 / 7.0, 128.0 / 7.0],
        1e-4,
        "running_var",
    );
    // The published version never changed.
    let version = published.load();
    assert_eq!(version.named_buffers()[2].1.item(), 0.0);
    assert_eq!(version.named_buffers()[0].1.to_vec(), vec![0.0, 0.0]);
}

/// Sets every parameter of `model` to random values (so that a norm's
/// ones and zeros do not hide a mistake).
fn randomise(model: &dyn Module, seed: u64) {
    for (i, p) in model.parameters().iter().enumerate() {
        let values = randn(p.shape(), seed + i as u64).to_vec();
        p.with_data_mut(|mut d| d.iter_mut().zip(values).for_each(|(a, b)| *a = b));
    }
}

#[test]
fn layer_norm_and_rms_norm_match_functional() {
    let ln = LayerNorm::new(&[3, 4]).with_eps(1e-4);
    randomise(&ln, 10);
    let x = randn(&[2, 5, 3, 4], 11);
    let expected = F::layer_norm(&x, &[3, 4], ln.weight(), ln.bias(), 1e-4);
    assert_eq!(ln.forward(&x).unwrap().to_vec(), expected.to_vec());
    let names: Vec<String> = ln.named_parameters().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["weight", "bias"]);
    check_param_grads(&ln, &x, 2e-2);
    check_fork(&ln, &x);
    check_round_trip(&ln, &LayerNorm::new(&[3, 4]).with_eps(1e-4), &x);

    let rms = RmsNorm::new(&[4]);
    randomise(&rms, 12);
    let expected = F::rms_norm(&x, &[4], rms.weight(), None);
    assert_eq!(rms.forward(&x).unwrap().to_vec(), expected.to_vec());
    assert_eq!(rms.named_parameters()[0].0, "weight");
    check_param_grads(&rms, &x, 2e-2);
    check_fork(&rms, &x);
    check_round_trip(&rms, &RmsNorm::new(&[4]), &x);
    assert!(LayerNorm::try_new(&[]).is_err());
}

#[test]
fn embedding_matches_functional() {
    let emb = Embedding::new(7, 3, &mut rng(13));
    assert_eq!(emb.weight().shape(), &[7, 3]);
    let ids = Tensor::from_vec(vec![0.0, 6.0, 2.0, 2.0, 5.0, 1.0], &[2, 3]).unwrap();
    let y = emb.forward(&ids).unwrap();
    assert_eq!(y.shape(), &[2, 3, 3]);
    assert_eq!(y.to_vec(), F::embedding(&ids, emb.weight()).to_vec());
    assert!(
        emb.forward(&Tensor::from_vec(vec![7.0], &[1]).unwrap())
            .is_err()
    );
    check_param_grads(&emb, &ids, 2e-2);
    check_fork(&emb, &ids);
    check_round_trip(&emb, &Embedding::zeros(7, 3).unwrap(), &ids);
}

/// Multi-head attention written out with the functional ops, from the
/// PyTorch-layout parameters.
fn attention_by_hand(
    attn: &MultiheadAttention,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    causal: bool,
) -> Tensor {
    let d = attn.embed_dim();
    let h = attn.num_heads();
    let named: std::collections::HashMap<String, Tensor> =
        attn.named_parameters().into_iter().collect();
    let w = named["in_proj_weight"].detach().to_vec();
    let b = named["in_proj_bias"].detach().to_vec();
    let part = |i: usize| {
        (
            Tensor::from_vec(w[i * d * d..(i + 1) * d * d].to_vec(), &[d, d])
                .unwrap()
                .t(),
            Tensor::from_vec(b[i * d..(i + 1) * d].to_vec(), &[d]).unwrap(),
        )
    };
    let heads = |x: &Tensor, i: usize| {
        let (wi, bi) = part(i);
        let (n, l) = (x.shape()[0], x.shape()[1]);
        x.linear(&wi, Some(&bi))
            .reshape(&[n, l, h, d / h])
            .permute(&[0, 2, 1, 3])
    };
    let o = F::scaled_dot_product_attention(
        &heads(q, 0),
        &heads(k, 1),
        &heads(v, 2),
        None,
        causal,
        None,
    );
    let (n, l) = (q.shape()[0], q.shape()[1]);
    let o = o.permute(&[0, 2, 1, 3]).reshape(&[n, l, d]);
    o.linear(
        &named["out_proj.weight"].detach(),
        Some(&named["out_proj.bias"].detach()),
    )
}

#[test]
fn multihead_attention_matches_functional() {
    let attn = MultiheadAttention::new(8, 2, &mut rng(20));
    randomise(&attn, 21);
    let names: Vec<String> = attn
        .named_parameters()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(
        names,
        [
            "in_proj_weight",
            "in_proj_bias",
            "out_proj.weight",
            "out_proj.bias"
        ]
    );
    assert_eq!(attn.in_proj_weight().shape(), &[24, 8]);
    assert_eq!(attn.torch_layouts().len(), 1);
    let x = randn(&[2, 5, 8], 22);
    let kv = randn(&[2, 3, 8], 23);
    assert_close(
        &attn.forward(&x).unwrap().to_vec(),
        &attention_by_hand(&attn, &x, &x, &x, false).to_vec(),
        1e-5,
        "self",
    );
    let causal = attn.forward_masked(&x, &AttentionMasks::causal()).unwrap();
    assert_close(
        &causal.to_vec(),
        &attention_by_hand(&attn, &x, &x, &x, true).to_vec(),
        1e-5,
        "causal",
    );
    let cross = attn
        .attend(&x, &kv, &kv, &AttentionMasks::default())
        .unwrap();
    assert_close(
        &cross.to_vec(),
        &attention_by_hand(&attn, &x, &kv, &kv, false).to_vec(),
        1e-5,
        "cross",
    );
    // Key padding: masking the last key equals dropping it.
    let pad = Tensor::from_vec(vec![0.0, 0.0, 1.0, 0.0, 0.0, 1.0], &[2, 3]).unwrap();
    let padded = attn
        .attend(
            &x,
            &kv,
            &kv,
            &AttentionMasks::default().with_key_padding_mask(pad.clone()),
        )
        .unwrap();
    let short = kv.narrow(1, 0, 2);
    assert_close(
        &padded.to_vec(),
        &attention_by_hand(&attn, &x, &short, &short, false).to_vec(),
        1e-5,
        "padding",
    );
    // Causal and padding together: the self-attention of the first 4
    // positions, with position 4 padded, is the causal attention of those 4.
    let pad5 = Tensor::from_vec(
        vec![0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0],
        &[2, 5],
    )
    .unwrap();
    let both = attn
        .forward_masked(&x, &AttentionMasks::causal().with_key_padding_mask(pad5))
        .unwrap();
    let x4 = x.narrow(1, 0, 4);
    let expected = attention_by_hand(&attn, &x4, &x4, &x4, true).to_vec();
    let got: Vec<f32> = both.narrow(1, 0, 4).to_vec();
    assert_close(&got, &expected, 1e-5, "causal + padding");
    assert!(
        attn.attend(
            &x,
            &kv,
            &kv,
            &AttentionMasks::default().with_key_padding_mask(Tensor::zeros(&[2, 5]))
        )
        .is_err()
    );
    check_param_grads(&attn, &x, 2e-2);
    check_fork(&attn, &x);
    check_round_trip(&attn, &MultiheadAttention::zeros(8, 2).unwrap(), &x);
    // In a PyTorch checkpoint out_proj.weight is [out, in]: the transpose.
    let path = std::env::temp_dir().join(format!("netcl-mha-{}.safetensors", std::process::id()));
    io::save_torch(&attn, &path).unwrap();
    let tensors: std::collections::HashMap<String, Tensor> =
        io::read_tensors(&path).unwrap().into_iter().collect();
    std::fs::remove_file(&path).unwrap();
    assert_eq!(
        tensors["out_proj.weight"].to_vec(),
        attn.out_proj().weight().t().to_vec()
    );
    assert_eq!(
        tensors["in_proj_weight"].to_vec(),
        attn.in_proj_weight().to_vec()
    );
}

#[test]
fn transformer_block_matches_its_parts() {
    let block = TransformerBlock::new(8, 2, 16, &mut rng(30));
    randomise(&block, 31);
    let names: Vec<String> = block
        .named_parameters()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(
        names,
        [
            "ln1.weight",
            "ln1.bias",
            "attn.in_proj_weight",
            "attn.in_proj_bias",
            "attn.out_proj.weight",
            "attn.out_proj.bias",
            "ln2.weight",
            "ln2.bias",
            "mlp.0.weight",
            "mlp.0.bias",
            "mlp.2.weight",
            "mlp.2.bias",
        ]
    );
    let layouts: Vec<String> = block.torch_layouts().into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        layouts,
        ["attn.out_proj.weight", "mlp.0.weight", "mlp.2.weight"]
    );
    let x = randn(&[2, 4, 8], 32);
    let a = block.ln1().forward(&x).unwrap();
    let h = &x + &attention_by_hand(block.attn(), &a, &a, &a, true);
    let expected = &h
        + &block
            .mlp()
            .forward(&block.ln2().forward(&h).unwrap())
            .unwrap();
    let got = block.forward_masked(&x, &AttentionMasks::causal()).unwrap();
    assert_close(&got.to_vec(), &expected.to_vec(), 1e-5, "block");
    check_param_grads(&block, &x, 2e-2);
    check_fork(&block, &x);
    check_round_trip(&block, &TransformerBlock::zeros(8, 2, 16).unwrap(), &x);
}
