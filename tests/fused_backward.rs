//! The fused differentiable backwards: tanh's backward recorded as one
//! `tanh_backward` op, and the transposed products `matmul_nt`/`matmul_tn`
//! that the differentiable backwards of `matmul` and `linear` record.
//!
//! Each is checked through second derivatives (double backward against
//! central finite differences of the array-path gradient) and third
//! derivatives (triple backward against central finite differences of the
//! double-backward Hessian-vector product), along random directions, the
//! differences in f64. The inputs all require grad, so every input slot of
//! every fused op is exercised (a batch input `x` makes `linear`'s `dx`
//! recorded too).

use netcl::Tensor;
use netcl::autograd::{self, BackwardOptions};
use rand::SeedableRng;
use rand::rngs::StdRng;

type Loss = dyn Fn(&[Tensor]) -> Tensor;

fn create() -> BackwardOptions {
    BackwardOptions::new().create_graph(true)
}

fn leaves(inputs: &[Tensor]) -> Vec<Tensor> {
    inputs
        .iter()
        .map(|x| x.detach().requires_grad_(true))
        .collect()
}

/// `Σ_i a_i · b_i` over matching lists of tensors.
fn dot(a: &[Tensor], b: &[Tensor]) -> Tensor {
    a.iter()
        .zip(b)
        .map(|(a, b)| (a * b).sum())
        .reduce(|s, t| s + t)
        .expect("at least one input")
}

/// The gradient of `f` by the array path (no graph).
fn gradient(f: &Loss, inputs: &[Tensor]) -> Vec<Vec<f32>> {
    let xs = leaves(inputs);
    let refs: Vec<&Tensor> = xs.iter().collect();
    autograd::grad(&[&f(&xs)], &refs)
        .expect("backward")
        .iter()
        .map(Tensor::to_vec)
        .collect()
}

/// `H v` by double backward.
fn hvp(f: &Loss, inputs: &[Tensor], v: &[Tensor]) -> Vec<Vec<f32>> {
    let xs = leaves(inputs);
    let refs: Vec<&Tensor> = xs.iter().collect();
    let g = autograd::grad_with(&[&f(&xs)], &refs, &create()).expect("first backward");
    let g: Vec<Tensor> = g.into_iter().map(Option::unwrap).collect();
    autograd::grad(&[&dot(&g, v)], &refs)
        .expect("second backward")
        .iter()
        .map(Tensor::to_vec)
        .collect()
}

/// `T(v, v)`, the third derivative along `v` twice, by triple backward.
fn third(f: &Loss, inputs: &[Tensor], v: &[Tensor]) -> Vec<Vec<f32>> {
    let xs = leaves(inputs);
    let refs: Vec<&Tensor> = xs.iter().collect();
    let g = autograd::grad_with(&[&f(&xs)], &refs, &create()).expect("first backward");
    let g: Vec<Tensor> = g.into_iter().map(Option::unwrap).collect();
    let hv = autograd::grad_with(&[&dot(&g, v)], &refs, &create()).expect("second backward");
    let hv: Vec<Tensor> = hv.into_iter().map(Option::unwrap).collect();
    autograd::grad(&[&dot(&hv, v)], &refs)
        .expect("third backward")
        .iter()
        .map(Tensor::to_vec)
        .collect()
}

/// Central differences of `d` along `v`: `(d(x + εv) - d(x - εv)) / 2ε`.
fn directional(
    d: impl Fn(&[Tensor]) -> Vec<Vec<f32>>,
    inputs: &[Tensor],
    v: &[Tensor],
) -> Vec<Vec<f64>> {
    let eps = 1e-2_f32;
    let shifted = |sign: f32| -> Vec<Vec<f32>> {
        let xs: Vec<Tensor> = inputs
            .iter()
            .zip(v)
            .map(|(x, v)| x + &(v * (sign * eps)))
            .collect();
        d(&xs)
    };
    let (plus, minus) = (shifted(1.0), shifted(-1.0));
    plus.iter()
        .zip(&minus)
        .map(|(p, m)| {
            p.iter()
                .zip(m)
                .map(|(&p, &m)| (f64::from(p) - f64::from(m)) / (2.0 * f64::from(eps)))
                .collect()
        })
        .collect()
}

fn assert_close(name: &str, what: &str, analytic: &[Vec<f32>], numeric: &[Vec<f64>]) {
    assert_eq!(analytic.len(), numeric.len());
    for (i, (a, n)) in analytic.iter().zip(numeric).enumerate() {
        assert_eq!(
            a.len(),
            n.len(),
            "{name}: {what} of input {i} has the wrong size"
        );
        let scale = n.iter().fold(1.0_f64, |s, n| s.max(n.abs()));
        for (k, (&a, &n)) in a.iter().zip(n).enumerate() {
            let err = (f64::from(a) - n).abs();
            assert!(
                err <= 2e-2 * scale,
                "{name}: {what} of input {i} [{k}]: autograd {a}, finite differences {n} (scale {scale})"
            );
        }
    }
}

/// Second and third derivatives of `f` at `inputs` along a random
/// direction, against finite differences.
fn check(name: &str, f: &Loss, inputs: &[Tensor], seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let v: Vec<Tensor> = inputs
        .iter()
        .map(|x| Tensor::randn(x.shape(), &mut rng))
        .collect();
    let second = hvp(f, inputs, &v);
    assert!(
        second.iter().flatten().any(|&h| h != 0.0),
        "{name}: a zero HVP checks nothing"
    );
    assert_close(
        name,
        "HVP",
        &second,
        &directional(|xs| gradient(f, xs), inputs, &v),
    );
    let third_order = third(f, inputs, &v);
    assert_close(
        name,
        "third derivative",
        &third_order,
        &directional(|xs| hvp(f, xs, &v), inputs, &v),
    );
}

fn randn(shape: &[usize], rng: &mut StdRng) -> Tensor {
    Tensor::randn(shape, rng).mul_scalar(0.7)
}

#[test]
fn tanh_backward_has_the_second_and_third_derivatives_of_tanh() {
    // tanh's own derivatives through the fused backward, weighted so that
    // no symmetry hides an error; and through a product, so that the
    // fused op's gradient input `g` depends on the inputs too.
    let mut rng = StdRng::seed_from_u64(1);
    let w = Tensor::randn(&[3, 4], &mut rng);
    let weighted = move |xs: &[Tensor]| (xs[0].tanh() * &w).sum();
    check("tanh", &weighted, &[randn(&[3, 4], &mut rng)], 2);
    let nested = |xs: &[Tensor]| (xs[0].tanh() * &xs[1]).tanh().powf(2.0).sum();
    check(
        "tanh(tanh(x) y)²",
        &nested,
        &[randn(&[3, 4], &mut rng), randn(&[3, 4], &mut rng)],
        3,
    );
}

#[test]
fn transposed_products_differentiate_to_every_order() {
    // A 2-D matrix product records matmul_nt and matmul_tn in its
    // differentiable backward, and they record each other.
    let mut rng = StdRng::seed_from_u64(4);
    let c = Tensor::randn(&[3, 5], &mut rng);
    let f = move |xs: &[Tensor]| (xs[0].matmul(&xs[1]).tanh() * &c).sum();
    check(
        "tanh(a·b)",
        &f,
        &[randn(&[3, 4], &mut rng), randn(&[4, 5], &mut rng)],
        5,
    );
}

#[test]
fn a_tanh_mlp_with_cross_entropy_differentiates_to_every_order() {
    // The HVP workload's shape of model, small: linear, tanh, linear,
    // cross-entropy, with the batch input requiring grad too.
    let mut rng = StdRng::seed_from_u64(6);
    let targets = Tensor::from_vec(vec![0.0, 2.0, 1.0, 2.0], &[4]).unwrap();
    let f = move |xs: &[Tensor]| {
        let h = xs[0].linear(&xs[1], Some(&xs[2])).tanh();
        h.linear(&xs[3], Some(&xs[4])).cross_entropy(&targets)
    };
    let inputs = [
        randn(&[4, 5], &mut rng),
        randn(&[5, 6], &mut rng),
        randn(&[6], &mut rng),
        randn(&[6, 3], &mut rng),
        randn(&[3], &mut rng),
    ];
    check("tanh MLP", &f, &inputs, 7);
}

#[test]
fn linear_of_a_batch_of_sequences_differentiates_to_every_order() {
    // A 3-D input: linear's differentiable backward reshapes around the
    // transposed products.
    let mut rng = StdRng::seed_from_u64(8);
    let c = Tensor::randn(&[2, 3, 4], &mut rng);
    let f = move |xs: &[Tensor]| (xs[0].linear(&xs[1], None).tanh() * &c).sum();
    check(
        "linear 3-D",
        &f,
        &[randn(&[2, 3, 5], &mut rng), randn(&[5, 4], &mut rng)],
        9,
    );
}

#[test]
fn fused_backwards_give_the_unfused_gradients() {
    // The recorded first derivative (through the fused ops) against the
    // array path, which shares none of their code.
    let mut rng = StdRng::seed_from_u64(10);
    let x = randn(&[4, 5], &mut rng);
    let w = randn(&[5, 3], &mut rng);
    let f = |xs: &[Tensor]| xs[0].matmul(&xs[1]).tanh().linear(&xs[2], None).sum();
    let inputs = [x, w, randn(&[3, 2], &mut rng)];
    let array = gradient(&f, &inputs);
    let xs = leaves(&inputs);
    let refs: Vec<&Tensor> = xs.iter().collect();
    let g = autograd::grad_with(&[&f(&xs)], &refs, &create()).unwrap();
    for (a, b) in g.iter().zip(&array) {
        let a = a.as_ref().unwrap().to_vec();
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "{x} vs {y}");
        }
    }
}
