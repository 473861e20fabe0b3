//! Higher-order gradients: `create_graph` through every built-in op.
//!
//! Each op's second derivative is checked as a Hessian-vector product
//! computed by double backward (`grad_with(create_graph)`, then the
//! gradient of `g · v`) against central finite differences of the *first*
//! derivative, `(∇f(x + εv) - ∇f(x - εv)) / 2ε`, the differences and the
//! comparison in f64. The first derivative there comes from the array path,
//! so the two paths are also checked against each other.

// The checks list their inputs as `&[x.clone()]` alike for one input and
// several; the op table's boxed closures are its one complex type.
#![allow(clippy::cloned_ref_to_slice_refs, clippy::type_complexity)]

use netcl::autograd::{
    self, Backward, BackwardOptions, DifferentiableBackward, GraphGrads, InputGrads, apply_op,
    apply_op_differentiable,
};
use netcl::{Error, Result, Tensor};
use rand::SeedableRng;
use rand::rngs::StdRng;

mod common;
use common::{leaf, on_fresh_tape};

fn create() -> BackwardOptions {
    BackwardOptions::new().create_graph(true)
}

fn randn(shape: &[usize], rng: &mut StdRng) -> Tensor {
    Tensor::randn(shape, rng)
}

/// Positive values in `[0.5, 2)`, for log, sqrt, powf and div.
fn positive(shape: &[usize], rng: &mut StdRng) -> Tensor {
    Tensor::uniform(shape, 0.5, 2.0, rng)
}

/// The Hessian-vector product of `f` at `inputs` along `v`, by double
/// backward; also returns the first derivative from the recorded path.
fn hvp(
    f: &dyn Fn(&[Tensor]) -> Tensor,
    inputs: &[Tensor],
    v: &[Tensor],
) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
    let leaves: Vec<Tensor> = inputs
        .iter()
        .map(|x| x.detach().requires_grad_(true))
        .collect();
    let refs: Vec<&Tensor> = leaves.iter().collect();
    let out = f(&leaves);
    let grads = autograd::grad_with(&[&out], &refs, &create()).expect("first backward");
    let grads: Vec<Tensor> = grads.into_iter().map(Option::unwrap).collect();
    let mut dot: Option<Tensor> = None;
    for (g, v) in grads.iter().zip(v) {
        let term = (g * v).sum();
        dot = Some(match dot {
            None => term,
            Some(d) => d + term,
        });
    }
    let dot = dot.unwrap();
    let first = grads.iter().map(Tensor::to_vec).collect();
    if !dot.requires_grad() {
        // The gradient does not depend on the inputs: a zero Hessian.
        let zeros = inputs.iter().map(|x| vec![0.0; x.numel()]).collect();
        return (first, zeros);
    }
    let hv = autograd::grad(&[&dot], &refs).expect("second backward");
    (first, hv.iter().map(Tensor::to_vec).collect())
}

/// The first derivative by the array path.
fn gradient(f: &dyn Fn(&[Tensor]) -> Tensor, inputs: &[Tensor]) -> Vec<Vec<f32>> {
    let leaves: Vec<Tensor> = inputs
        .iter()
        .map(|x| x.detach().requires_grad_(true))
        .collect();
    let refs: Vec<&Tensor> = leaves.iter().collect();
    let out = f(&leaves);
    autograd::grad(&[&out], &refs)
        .expect("backward")
        .iter()
        .map(Tensor::to_vec)
        .collect()
}

/// Checks the HVP of `f` against central differences of its gradient along
/// a random direction, and the recorded first derivative against the array
/// one.
fn check(name: &str, f: impl Fn(&[Tensor]) -> Tensor, inputs: &[Tensor], seed: u64) {
    let f: &dyn Fn(&[Tensor]) -> Tensor = &f;
    let mut rng = StdRng::seed_from_u64(seed);
    let v: Vec<Tensor> = inputs.iter().map(|x| randn(x.shape(), &mut rng)).collect();
    let (first, analytic) = hvp(f, inputs, &v);

    let array_first = gradient(f, inputs);
    for (i, (a, b)) in first.iter().zip(&array_first).enumerate() {
        for (k, (&a, &b)) in a.iter().zip(b).enumerate() {
            let tol = 1e-5 * (1.0 + b.abs());
            assert!(
                (a - b).abs() <= tol,
                "{name}: recorded gradient of input {i} [{k}] = {a}, array path {b}"
            );
        }
    }

    let eps = 1e-2_f32;
    let shifted = |sign: f32| -> Vec<Vec<f32>> {
        let xs: Vec<Tensor> = inputs
            .iter()
            .zip(&v)
            .map(|(x, v)| x + &(v * (sign * eps)))
            .collect();
        gradient(f, &xs)
    };
    let (plus, minus) = (shifted(1.0), shifted(-1.0));
    for (i, analytic) in analytic.iter().enumerate() {
        let numeric: Vec<f64> = plus[i]
            .iter()
            .zip(&minus[i])
            .map(|(&p, &m)| (f64::from(p) - f64::from(m)) / (2.0 * f64::from(eps)))
            .collect();
        let scale = numeric.iter().fold(1.0_f64, |s, n| s.max(n.abs()));
        for (k, (&a, &n)) in analytic.iter().zip(&numeric).enumerate() {
            let err = (f64::from(a) - n).abs();
            assert!(
                err <= 2e-2 * scale,
                "{name}: HVP of input {i} [{k}]: double backward {a}, finite differences {n} (scale {scale})"
            );
        }
    }
}

/// `Σ w ⊙ y²`: a scalar with a non-zero Hessian through any `y`, weighted
/// so that no symmetry hides an error.
fn weighted_square(y: &Tensor, seed: u64) -> Tensor {
    let w = Tensor::randn(y.shape(), &mut StdRng::seed_from_u64(seed));
    (&(y * y) * &w).sum()
}

#[test]
fn should_double_diff_unary_ops() {
    let mut rng = StdRng::seed_from_u64(1);
    let x = randn(&[3, 4], &mut rng);
    let p = positive(&[3, 4], &mut rng);
    let cases: Vec<(&str, Box<dyn Fn(&Tensor) -> Tensor>, &Tensor)> = vec![
        ("neg", Box::new(|x| x.neg()), &x),
        ("exp", Box::new(|x| x.exp()), &x),
        ("log", Box::new(|x| x.log()), &p),
        ("sqrt", Box::new(|x| x.sqrt()), &p),
        ("powf 3", Box::new(|x| x.powf(3.0)), &x),
        ("powf -1.5", Box::new(|x| x.powf(-1.5)), &p),
        ("powf 0", Box::new(|x| x.powf(0.0)), &x),
        ("abs", Box::new(|x| x.abs()), &x),
        ("relu", Box::new(|x| x.relu()), &x),
        ("sigmoid", Box::new(|x| x.sigmoid()), &x),
        ("tanh", Box::new(|x| x.tanh()), &x),
    ];
    for (i, (name, op, input)) in cases.into_iter().enumerate() {
        // The op alone (its own second derivative) and under a square
        // (its first derivative inside a product).
        check(
            name,
            |xs| (&op(&xs[0]) * &Tensor::full(xs[0].shape(), 0.7)).sum(),
            &[input.clone()],
            10 + i as u64,
        );
        check(
            name,
            |xs| weighted_square(&op(&xs[0]), 7),
            &[input.clone()],
            30 + i as u64,
        );
    }
}

#[test]
fn should_double_diff_binary_ops_with_broadcasting() {
    let mut rng = StdRng::seed_from_u64(2);
    let shapes: [(&[usize], &[usize]); 4] = [
        (&[3, 4], &[3, 4]),
        (&[3, 4], &[4]),
        (&[2, 1, 4], &[3, 1]),
        (&[], &[2, 3]),
    ];
    for (i, (sa, sb)) in shapes.into_iter().enumerate() {
        let a = randn(sa, &mut rng);
        let b = randn(sb, &mut rng);
        let bp = positive(sb, &mut rng);
        let seed = 100 + 10 * i as u64;
        check(
            "add",
            |x| weighted_square(&(&x[0] + &x[1]), 1),
            &[a.clone(), b.clone()],
            seed,
        );
        check(
            "sub",
            |x| weighted_square(&(&x[0] - &x[1]), 2),
            &[a.clone(), b.clone()],
            seed + 1,
        );
        check(
            "mul",
            |x| weighted_square(&(&x[0] * &x[1]), 3),
            &[a.clone(), b.clone()],
            seed + 2,
        );
        check(
            "mul alone",
            |x| (&x[0] * &x[1]).sum(),
            &[a.clone(), b.clone()],
            seed + 3,
        );
        check(
            "div",
            |x| weighted_square(&(&x[0] / &x[1]), 4),
            &[a.clone(), bp.clone()],
            seed + 4,
        );
        check(
            "div alone",
            |x| (&x[0] / &x[1]).sum(),
            &[a.clone(), bp.clone()],
            seed + 5,
        );
    }
    // One tensor on both sides: x * x, x / x.
    let x = positive(&[5], &mut rng);
    check(
        "mul self",
        |x| (&x[0] * &x[0]).exp().sum(),
        &[x.clone()],
        150,
    );
    check(
        "div self",
        |x| weighted_square(&(&x[0] / &x[0]), 5),
        &[x],
        151,
    );
}

#[test]
fn should_double_diff_scalar_forms() {
    let mut rng = StdRng::seed_from_u64(3);
    let x = randn(&[2, 3], &mut rng);
    let p = positive(&[2, 3], &mut rng);
    check(
        "add_scalar",
        |x| weighted_square(&(&x[0] + 1.5), 1),
        &[x.clone()],
        200,
    );
    check(
        "sub_scalar",
        |x| weighted_square(&(&x[0] - 1.5), 2),
        &[x.clone()],
        201,
    );
    check(
        "rsub_scalar",
        |x| weighted_square(&(1.5 - &x[0]), 3),
        &[x.clone()],
        202,
    );
    check(
        "mul_scalar",
        |x| weighted_square(&(&x[0] * -2.5), 4),
        &[x.clone()],
        203,
    );
    check(
        "div_scalar",
        |x| weighted_square(&(&x[0] / 4.0), 5),
        &[x.clone()],
        204,
    );
    check("rdiv_scalar", |x| (2.0 / &x[0]).sum(), &[p.clone()], 205);
    check(
        "rdiv_scalar squared",
        |x| weighted_square(&(2.0 / &x[0]), 6),
        &[p],
        206,
    );
}

#[test]
fn should_double_diff_matmul_in_every_batch_form() {
    let mut rng = StdRng::seed_from_u64(4);
    let shapes: [(&[usize], &[usize]); 4] = [
        (&[3, 4], &[4, 2]),
        (&[2, 3, 4], &[4, 2]),
        (&[3, 4], &[2, 4, 5]),
        (&[2, 1, 3, 4], &[3, 4, 2]),
    ];
    for (i, (sa, sb)) in shapes.into_iter().enumerate() {
        let a = randn(sa, &mut rng);
        let b = randn(sb, &mut rng);
        check(
            "matmul",
            |x| weighted_square(&x[0].matmul(&x[1]), 1),
            &[a, b],
            300 + i as u64,
        );
    }
}

#[test]
fn should_double_diff_linear() {
    let mut rng = StdRng::seed_from_u64(5);
    let w = randn(&[4, 3], &mut rng);
    let b = randn(&[3], &mut rng);
    for (i, shape) in [&[5, 4][..], &[2, 3, 4], &[4]].into_iter().enumerate() {
        let x = randn(shape, &mut rng);
        check(
            "linear with bias",
            |x| weighted_square(&x[0].linear(&x[1], Some(&x[2])).tanh(), 2),
            &[x.clone(), w.clone(), b.clone()],
            400 + i as u64,
        );
        check(
            "linear",
            |x| weighted_square(&x[0].linear(&x[1], None), 3),
            &[x, w.clone()],
            410 + i as u64,
        );
    }
}

#[test]
fn should_double_diff_reductions() {
    let mut rng = StdRng::seed_from_u64(6);
    let x = randn(&[3, 4], &mut rng);
    check("sum", |x| x[0].exp().sum().powf(2.0), &[x.clone()], 500);
    check("mean", |x| x[0].exp().mean().powf(2.0), &[x.clone()], 501);
    for (i, keepdim) in [false, true].into_iter().enumerate() {
        let seed = 510 + 10 * i as u64;
        check(
            "sum_axis 0",
            |x| weighted_square(&x[0].sum_axis(0, keepdim), 1),
            &[x.clone()],
            seed,
        );
        check(
            "sum_axis -1",
            |x| weighted_square(&x[0].sum_axis(-1, keepdim), 2),
            &[x.clone()],
            seed + 1,
        );
        check(
            "mean_axis 1",
            |x| weighted_square(&x[0].mean_axis(1, keepdim), 3),
            &[x.clone()],
            seed + 2,
        );
        check(
            "max_axis 1",
            |x| weighted_square(&x[0].max_axis(1, keepdim), 4),
            &[x.clone()],
            seed + 3,
        );
        check(
            "max_axis 0",
            |x| weighted_square(&x[0].max_axis(0, keepdim), 5),
            &[x.clone()],
            seed + 4,
        );
    }
}

#[test]
fn should_double_diff_softmax_family_and_losses() {
    let mut rng = StdRng::seed_from_u64(7);
    let x = randn(&[3, 5], &mut rng);
    for (i, axis) in [-1_isize, 0].into_iter().enumerate() {
        let seed = 600 + 10 * i as u64;
        check(
            "softmax",
            |x| weighted_square(&x[0].softmax(axis), 1),
            &[x.clone()],
            seed,
        );
        check(
            "softmax alone",
            |x| (&x[0].softmax(axis) * &Tensor::arange(0.0, 15.0, 1.0).reshape(&[3, 5])).sum(),
            &[x.clone()],
            seed + 1,
        );
        check(
            "log_softmax",
            |x| weighted_square(&x[0].log_softmax(axis), 2),
            &[x.clone()],
            seed + 2,
        );
        check(
            "log_softmax alone",
            |x| (&x[0].log_softmax(axis) * &Tensor::arange(0.0, 15.0, 1.0).reshape(&[3, 5])).sum(),
            &[x.clone()],
            seed + 3,
        );
    }
    let targets = Tensor::from_vec(vec![0.0, 4.0, 2.0], &[3]).unwrap();
    check(
        "cross_entropy",
        |x| x[0].cross_entropy(&targets),
        &[x.clone()],
        620,
    );
    check(
        "cross_entropy squared",
        |x| x[0].cross_entropy(&targets).powf(2.0),
        &[x.clone()],
        621,
    );
    let t = randn(&[3, 5], &mut rng);
    check(
        "mse_loss",
        |x| x[0].mse_loss(&x[1]),
        &[x.clone(), t.clone()],
        630,
    );
    check(
        "mse_loss squared",
        |x| x[0].tanh().mse_loss(&x[1]).powf(2.0),
        &[x.clone(), t.clone()],
        631,
    );
    check(
        "mse_loss constant target",
        |x| x[0].tanh().mse_loss(&t),
        &[x.clone()],
        632,
    );
}

#[test]
fn should_double_diff_shape_ops() {
    let mut rng = StdRng::seed_from_u64(8);
    let x = randn(&[2, 3, 4], &mut rng);
    check(
        "reshape",
        |x| weighted_square(&x[0].reshape(&[6, 4]), 1),
        &[x.clone()],
        700,
    );
    check(
        "transpose",
        |x| weighted_square(&x[0].transpose(0, -1), 2),
        &[x.clone()],
        701,
    );
    let m = randn(&[3, 4], &mut rng);
    check(
        "t",
        |x| weighted_square(&x[0].t().matmul(&x[0]), 3),
        &[m],
        702,
    );
}

/// Third derivatives through the recorded gradients of selections and
/// slices (the internal `take`/`scatter_add` pair, `narrow`'s backward as a
/// `cat` with zeros and back, `select`/`stack`): for `f = Σ_k sel(x)_k³`,
/// where `sel` reads `x_i` `c_i` times, the third derivative along the
/// all-ones direction is `6 c_i`.
#[test]
fn third_derivatives_through_selections_and_slices() {
    let x = Tensor::from_vec(vec![0.5, -1.5, 2.0, 0.25], &[4])
        .unwrap()
        .requires_grad_(true);
    let index = Tensor::from_vec(vec![2.0, 0.0, 2.0], &[3]).unwrap();
    let selections: [(&str, Box<dyn Fn(&Tensor) -> Tensor>, [f32; 4]); 4] = [
        (
            "gather",
            Box::new(|x| x.gather(0, &index)),
            [1.0, 0.0, 2.0, 0.0],
        ),
        (
            "index_select",
            Box::new(|x| x.index_select(0, &index)),
            [1.0, 0.0, 2.0, 0.0],
        ),
        (
            "narrow and cat",
            Box::new(|x| netcl::functional::cat(&[&x.narrow(0, 1, 2), x], 0)),
            [1.0, 2.0, 2.0, 1.0],
        ),
        (
            "select and stack",
            Box::new(|x| netcl::functional::stack(&[&x.select(0, 3), &x.select(0, 3)], 0)),
            [0.0, 0.0, 0.0, 2.0],
        ),
    ];
    for (name, sel, counts) in &selections {
        let y = sel(&x).powf(3.0).sum();
        let d1 = autograd::grad_with(&[&y], &[&x], &create()).unwrap()[0]
            .clone()
            .unwrap();
        let d2 = autograd::grad_with(&[&d1.sum()], &[&x], &create()).unwrap()[0]
            .clone()
            .unwrap();
        let d3 = autograd::grad_with(&[&d2.sum()], &[&x], &create()).unwrap()[0]
            .clone()
            .unwrap();
        let want: Vec<f32> = counts.iter().map(|c| 6.0 * c).collect();
        assert_eq!(d3.to_vec(), want, "third derivative through {name}");
    }
}

/// The third derivative of tanh by three recorded backwards, against its
/// closed form: with t = tanh x, t' = 1 - t², t'' = -2t(1 - t²),
/// t''' = -2(1 - t²)(1 - 3t²).
#[test]
fn third_derivative_of_tanh_matches_its_closed_form() {
    let values = [-2.0_f32, -0.7, 0.0, 0.3, 1.1, 2.5];
    let x = Tensor::from_vec(values.to_vec(), &[values.len()])
        .unwrap()
        .requires_grad_(true);
    let y = x.tanh().sum();
    let d1 = autograd::grad_with(&[&y], &[&x], &create()).unwrap()[0]
        .clone()
        .unwrap();
    let d2 = autograd::grad_with(&[&d1.sum()], &[&x], &create()).unwrap()[0]
        .clone()
        .unwrap();
    let d3 = autograd::grad_with(&[&d2.sum()], &[&x], &create()).unwrap()[0]
        .clone()
        .unwrap();
    for (i, &v) in values.iter().enumerate() {
        let t = f64::from(v).tanh();
        let expected = [
            1.0 - t * t,
            -2.0 * t * (1.0 - t * t),
            -2.0 * (1.0 - t * t) * (1.0 - 3.0 * t * t),
        ];
        for (order, (got, want)) in [&d1, &d2, &d3].iter().zip(expected).enumerate() {
            let got = f64::from(got.to_vec()[i]);
            assert!(
                (got - want).abs() <= 1e-6 * (1.0 + want.abs()),
                "tanh derivative {} at {v}: {got}, closed form {want}",
                order + 1
            );
        }
    }
}

/// A 2-layer tanh MLP, `f(W1, W2) = ½ Σ_b (Σ_j W2_j tanh(x_b · W1_:j) - t_b)²`,
/// its Hessian derived by hand in f64 (a = tanh z, a' = 1 - a²,
/// a'' = -2 a a', r_b the residual):
///
/// - ∂²f/∂W2_j∂W2_l = Σ_b a_bj a_bl
/// - ∂²f/∂W2_l∂W1_ij = Σ_b (a_bl W2_j a'_bj x_bi + r_b δ_jl a'_bj x_bi)
/// - ∂²f/∂W1_ij∂W1_kl = Σ_b (W2_l a'_bl x_bk W2_j a'_bj x_bi
///   + δ_jl r_b W2_j a''_bj x_bi x_bk)
#[test]
fn hvp_of_a_two_layer_tanh_mlp_matches_its_explicit_hessian() {
    let (batch, d, h) = (5, 4, 3);
    let mut rng = StdRng::seed_from_u64(9);
    let x = randn(&[batch, d], &mut rng);
    let t = randn(&[batch, 1], &mut rng);
    let w1 = (randn(&[d, h], &mut rng) * 0.7).requires_grad_(true);
    let w2 = randn(&[h, 1], &mut rng).requires_grad_(true);
    let v1 = randn(&[d, h], &mut rng);
    let v2 = randn(&[h, 1], &mut rng);

    let y = x.matmul(&w1).tanh().matmul(&w2);
    let f = ((&y - &t).powf(2.0) * 0.5).sum();
    let g = autograd::grad_with(&[&f], &[&w1, &w2], &create()).unwrap();
    let (g1, g2) = (g[0].clone().unwrap(), g[1].clone().unwrap());
    let dot = (&g1 * &v1).sum() + (&g2 * &v2).sum();
    let hv = autograd::grad(&[&dot], &[&w1, &w2]).unwrap();

    // The explicit Hessian, in f64.
    let f64s = |t: &Tensor| t.to_vec().into_iter().map(f64::from).collect::<Vec<_>>();
    let (xs, ts, w1s, w2s, v1s, v2s) = (
        f64s(&x),
        f64s(&t),
        f64s(&w1),
        f64s(&w2),
        f64s(&v1),
        f64s(&v2),
    );
    let n = d * h + h;
    // Parameter p < d*h is W1[i, j] with p = i*h + j; then W2[j].
    let mut hess = vec![vec![0.0_f64; n]; n];
    for b in 0..batch {
        let z: Vec<f64> = (0..h)
            .map(|j| (0..d).map(|i| xs[b * d + i] * w1s[i * h + j]).sum())
            .collect();
        let a: Vec<f64> = z.iter().map(|z| z.tanh()).collect();
        let a1: Vec<f64> = a.iter().map(|a| 1.0 - a * a).collect();
        let a2: Vec<f64> = a.iter().zip(&a1).map(|(a, a1)| -2.0 * a * a1).collect();
        let r = (0..h).map(|j| w2s[j] * a[j]).sum::<f64>() - ts[b];
        let xb = &xs[b * d..(b + 1) * d];
        for j in 0..h {
            for l in 0..h {
                hess[d * h + j][d * h + l] += a[j] * a[l];
            }
        }
        for l in 0..h {
            for i in 0..d {
                for j in 0..h {
                    let mut v = a[l] * w2s[j] * a1[j] * xb[i];
                    if j == l {
                        v += r * a1[j] * xb[i];
                    }
                    hess[d * h + l][i * h + j] += v;
                    hess[i * h + j][d * h + l] += v;
                }
            }
        }
        for i in 0..d {
            for j in 0..h {
                for k in 0..d {
                    for l in 0..h {
                        let mut v = w2s[l] * a1[l] * xb[k] * w2s[j] * a1[j] * xb[i];
                        if j == l {
                            v += r * w2s[j] * a2[j] * xb[i] * xb[k];
                        }
                        hess[i * h + j][k * h + l] += v;
                    }
                }
            }
        }
    }
    let v: Vec<f64> = v1s.iter().chain(&v2s).copied().collect();
    let expected: Vec<f64> = hess
        .iter()
        .map(|row| row.iter().zip(&v).map(|(h, v)| h * v).sum())
        .collect();
    let got: Vec<f64> = f64s(&hv[0]).into_iter().chain(f64s(&hv[1])).collect();
    let scale = expected.iter().fold(1.0_f64, |s, e| s.max(e.abs()));
    for (p, (got, want)) in got.iter().zip(&expected).enumerate() {
        assert!(
            (got - want).abs() <= 1e-5 * scale,
            "HVP[{p}]: double backward {got}, explicit Hessian {want}"
        );
    }
}

#[test]
fn create_graph_gradients_have_a_graph_and_plain_ones_do_not() {
    let x = Tensor::from_vec(vec![1.0, 2.0], &[2])
        .unwrap()
        .requires_grad_(true);
    let y = x.powf(3.0).sum();
    let g = autograd::grad_with(&[&y], &[&x], &create()).unwrap()[0]
        .clone()
        .unwrap();
    assert!(g.requires_grad());
    // retain_graph defaults to create_graph: the first graph is still there.
    let again = autograd::grad(&[&y], &[&x]).unwrap();
    assert_eq!(again[0].to_vec(), vec![3.0, 12.0]);
    let plain = autograd::grad(&[&x.powf(3.0).sum()], &[&x]).unwrap();
    assert!(!plain[0].requires_grad());
}

#[test]
fn double_backward_under_no_grad_records_nothing() {
    on_fresh_tape(|tape| {
        let x = Tensor::from_vec(vec![0.5, -1.0], &[2])
            .unwrap()
            .requires_grad_(true);
        let y = x.tanh().sum();
        let before = tape.stats().recorded;
        let g = {
            let _guard = autograd::no_grad();
            autograd::grad_with(&[&y], &[&x], &create()).unwrap()[0]
                .clone()
                .unwrap()
        };
        assert_eq!(tape.stats().recorded, before, "no node recorded");
        assert!(!g.requires_grad());
        // The values are the first derivative's.
        let t: Vec<f32> = [0.5_f32, -1.0].iter().map(|v| v.tanh()).collect();
        let expected: Vec<f32> = t.iter().map(|t| 1.0 - t * t).collect();
        for (a, b) in g.to_vec().iter().zip(&expected) {
            assert!((a - b).abs() < 1e-6);
        }
        // ...and the gradients computed with a graph can be used under
        // no_grad without recording.
        let g = autograd::grad_with(&[&y], &[&x], &create()).unwrap()[0]
            .clone()
            .unwrap();
        let recorded = tape.stats().recorded;
        let _guard = autograd::no_grad();
        let norm = (&g * &g).sum();
        assert!(!norm.requires_grad());
        assert_eq!(tape.stats().recorded, recorded);
    });
}

#[test]
fn the_gradient_graph_is_freed_with_the_gradients() {
    on_fresh_tape(|tape| {
        let x = Tensor::from_vec(vec![0.5, -1.0, 2.0], &[3])
            .unwrap()
            .requires_grad_(true);
        {
            let y = x.tanh().exp().sum();
            let g = autograd::grad_with(&[&y], &[&x], &create()).unwrap()[0]
                .clone()
                .unwrap();
            let hv = autograd::grad(&[&g.sum()], &[&x]).unwrap();
            assert_eq!(hv[0].shape(), &[3]);
            assert!(!tape.is_empty());
        }
        assert_eq!(tape.len(), 0, "every node released");
    });
}

/// A graph saves snapshots of its inputs: a parameter updated in place
/// after the forward pass (as an optimizer does) leaves both the array
/// and the recorded backward with the values the forward saw.
#[test]
fn create_graph_differentiates_at_the_values_the_forward_saw() {
    let w = Tensor::from_vec(vec![1.0, 2.0], &[2])
        .unwrap()
        .requires_grad_(true);
    let y = w.powf(3.0).sum();
    w.with_data_mut(|mut values| values.fill(10.0));
    let g = autograd::grad_with(&[&y], &[&w], &create()).unwrap()[0]
        .clone()
        .unwrap();
    assert_eq!(g.to_vec(), vec![3.0, 12.0]); // 3w², at w = (1, 2)
    let hv = autograd::grad(&[&g.sum()], &[&w]).unwrap();
    assert_eq!(hv[0].to_vec(), vec![6.0, 12.0]); // 6w
}

#[test]
fn allow_unused_gives_none_and_the_default_gives_zeros() {
    let x = Tensor::ones(&[2]).requires_grad_(true);
    let z = Tensor::ones(&[3]).requires_grad_(true);
    let y = x.exp().sum();
    for create_graph in [false, true] {
        let options = BackwardOptions::new()
            .create_graph(create_graph)
            .retain_graph(true);
        let grads = autograd::grad_with(&[&y], &[&x, &z], &options).unwrap();
        assert_eq!(grads[1].as_ref().unwrap().to_vec(), vec![0.0; 3]);
        let grads =
            autograd::grad_with(&[&y], &[&x, &z], &options.clone().allow_unused(true)).unwrap();
        assert!(grads[0].is_some());
        assert!(grads[1].is_none());
    }
}

#[test]
fn grad_output_seeds_a_non_scalar_output_and_may_have_a_graph() {
    let x = Tensor::from_vec(vec![1.0, 2.0], &[2])
        .unwrap()
        .requires_grad_(true);
    let s = Tensor::from_vec(vec![3.0, 4.0], &[2])
        .unwrap()
        .requires_grad_(true);
    let y = &x * &x;
    let options = create().grad_output(s.clone());
    let g = autograd::grad_with(&[&y], &[&x], &options).unwrap()[0]
        .clone()
        .unwrap();
    assert_eq!(g.to_vec(), vec![6.0, 16.0]); // 2x · s
    // The gradient depends on the seed: d(Σ 2xs)/ds = 2x.
    let ds = autograd::grad(&[&g.sum()], &[&s]).unwrap();
    assert_eq!(ds[0].to_vec(), vec![2.0, 4.0]);
    let wrong = create().grad_output(Tensor::ones(&[3]));
    assert!(matches!(
        autograd::grad_with(&[&y], &[&x], &wrong),
        Err(Error::ShapeMismatch { op: "grad", .. })
    ));
}

#[test]
fn backward_with_options_refuses_create_graph() {
    let x = Tensor::ones(&[2]).requires_grad_(true);
    let y = x.exp().sum();
    assert!(matches!(
        y.try_backward_with_options(&create()),
        Err(Error::InvalidArgument { op: "backward", .. })
    ));
    assert!(x.grad().is_none());
    y.backward();
    assert!(x.grad().is_some());
}

/// A custom op given only an array backward: `create_graph` through it
/// fails naming the op, never a silent zero second derivative.
#[test]
fn create_graph_through_an_array_only_custom_op_fails_naming_it() {
    let x = Tensor::from_vec(vec![1.0, 2.0], &[2])
        .unwrap()
        .requires_grad_(true);
    let input = x.data();
    let y = apply_op("cube", &[&x], input.mapv(|v| v * v * v), move || {
        move |grad: ndarray::ArrayD<f32>, grads: &mut InputGrads<'_>| {
            grads.set(0, grad * input.mapv(|v| 3.0 * v * v));
        }
    })
    .unwrap()
    .sum();
    let err = autograd::grad_with(&[&y], &[&x], &create()).unwrap_err();
    assert_eq!(err, Error::NotDifferentiable { op: "cube" });
    assert!(err.to_string().contains("`cube`"), "{err}");
    // The array path still works.
    assert_eq!(
        autograd::grad(&[&y], &[&x]).unwrap()[0].to_vec(),
        vec![3.0, 12.0]
    );
}

/// Double backward inside `netcl::parallel` tasks gives the bits one thread
/// gives.
#[test]
fn double_backward_in_parallel_tasks_matches_one_thread_bit_for_bit() {
    let mut rng = StdRng::seed_from_u64(11);
    let w = (randn(&[6, 5], &mut rng) * 0.5).requires_grad_(true);
    let inputs: Vec<(Tensor, Tensor)> = (0..16)
        .map(|_| (randn(&[4, 6], &mut rng), randn(&[6, 5], &mut rng)))
        .collect();
    let hvp = |(x, v): &(Tensor, Tensor)| -> Vec<f32> {
        let f = x.matmul(&w).tanh().powf(2.0).sum();
        let g = autograd::grad_with(&[&f], &[&w], &create()).unwrap()[0]
            .clone()
            .unwrap();
        autograd::grad(&[&(&g * v).sum()], &[&w]).unwrap()[0].to_vec()
    };
    let one_thread: Vec<Vec<f32>> = inputs.iter().map(hvp).collect();
    let parallel = netcl::parallel::map(&inputs, hvp);
    for (a, b) in one_thread.iter().zip(&parallel) {
        let a: Vec<u32> = a.iter().map(|v| v.to_bits()).collect();
        let b: Vec<u32> = b.iter().map(|v| v.to_bits()).collect();
        assert_eq!(a, b);
    }
}

/// `x³` with a differentiable backward that can be made wrong: `right`
/// gives `3x²`, else `3x · x₀` with `x₀` a constant (the right first
/// derivative, the wrong second).
struct Cube {
    input: ndarray::ArrayD<f32>,
    right: bool,
}

impl Backward for Cube {
    fn backward(&self, grad: ndarray::ArrayD<f32>, grads: &mut InputGrads<'_>) {
        grads.set(0, grad * self.input.mapv(|v| 3.0 * v * v));
    }
}

impl DifferentiableBackward for Cube {
    fn backward_graph(
        &self,
        grad: &Tensor,
        inputs: &[Tensor],
        _output: &Tensor,
        grads: &mut GraphGrads<'_>,
    ) -> Result<()> {
        let x = &inputs[0];
        let other = if self.right { x.clone() } else { x.detach() };
        grads.set(0, grad * &(x * &other * 3.0));
        Ok(())
    }
}

fn cube(x: &Tensor, right: bool) -> Tensor {
    let input = x.to_array();
    let output = input.mapv(|v| v * v * v);
    apply_op_differentiable("cube", &[x], output, move || Cube { input, right }).unwrap()
}

#[test]
fn a_custom_differentiable_op_double_diffs_and_the_check_catches_a_wrong_one() {
    let x = leaf(&[0.5, -1.5, 2.0]).detach();
    check(
        "cube",
        |x| weighted_square(&cube(&x[0], true), 1),
        &[x.clone()],
        800,
    );
    check("cube alone", |x| cube(&x[0], true).sum(), &[x.clone()], 801);
    let wrong = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        check(
            "wrong cube",
            |x| cube(&x[0], false).sum(),
            &[x.clone()],
            802,
        )
    }));
    assert!(
        wrong.is_err(),
        "the check accepted a wrong second derivative"
    );
}

#[test]
fn a_custom_differentiable_backward_of_the_wrong_shape_is_an_error() {
    struct Bad;
    impl Backward for Bad {
        fn backward(&self, grad: ndarray::ArrayD<f32>, grads: &mut InputGrads<'_>) {
            grads.set(0, grad);
        }
    }
    impl DifferentiableBackward for Bad {
        fn backward_graph(
            &self,
            _grad: &Tensor,
            _inputs: &[Tensor],
            _output: &Tensor,
            grads: &mut GraphGrads<'_>,
        ) -> Result<()> {
            grads.set(0, Tensor::ones(&[5]));
            Ok(())
        }
    }
    let x = leaf(&[1.0, 2.0]);
    let y = apply_op_differentiable("bad", &[&x], x.to_array(), || Bad)
        .unwrap()
        .sum();
    assert!(matches!(
        autograd::grad_with(&[&y], &[&x], &create()),
        Err(Error::GradShape {
            op: "bad",
            input: 0,
            ..
        })
    ));
}

/// Data-parallel gradients of a loss with a double backward inside
/// (a gradient penalty per shard): `parallel::backward_shards` computes
/// each shard's gradient on its own and sums them in shard order, so the
/// bits are the same whatever the thread count, create_graph included.
#[test]
fn backward_shards_through_a_gradient_penalty_gives_the_same_bits_on_any_pool() {
    use netcl::parallel;
    let mut rng = StdRng::seed_from_u64(12);
    let w = (randn(&[6, 4], &mut rng) * 0.5).requires_grad_(true);
    let shards: Vec<(Tensor, Tensor)> = (0..6)
        .map(|s| {
            let x = randn(&[3, 6], &mut rng);
            let y = Tensor::from_vec(vec![(s % 4) as f32, 1.0, 2.0], &[3]).unwrap();
            (x, y)
        })
        .collect();
    let params = [w.clone()];
    let run = |threads: usize| -> (Vec<f32>, Vec<u32>) {
        let pool = parallel::rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        w.zero_grad();
        let losses = parallel::install(&pool, || {
            parallel::backward_shards(&shards, &params, |(x, y)| {
                let x = x.detach().requires_grad_(true);
                let ce = x.matmul(&w).tanh().try_cross_entropy(y)?;
                let g = autograd::grad_with(&[&ce], &[&x], &create())?[0]
                    .clone()
                    .unwrap();
                Ok(ce + (&g * &g).sum())
            })
        })
        .unwrap();
        let grad = w.grad().unwrap().to_vec();
        (losses, grad.iter().map(|v| v.to_bits()).collect())
    };
    let one = run(1);
    assert!(one.1.iter().any(|&bits| f32::from_bits(bits) != 0.0));
    for threads in [2, 3] {
        assert_eq!(run(threads), one, "{threads} threads");
    }
}

/// `create_graph` without `retain_graph` releases the first graph, which
/// the gradient's graph reaches: differentiating the gradient is then an
/// error naming the released node, never a silently wrong derivative.
#[test]
fn create_graph_without_retain_graph_cannot_differentiate_through_the_released_graph() {
    let x = Tensor::from_vec(vec![0.5, -1.0], &[2])
        .unwrap()
        .requires_grad_(true);
    let y = x.tanh().sum();
    let options = create().retain_graph(false);
    let g = autograd::grad_with(&[&y], &[&x], &options).unwrap()[0]
        .clone()
        .unwrap();
    assert!(g.requires_grad());
    assert!(matches!(
        autograd::grad(&[&g.sum()], &[&x]),
        Err(Error::GraphReleased { node: "tanh" })
    ));
}

/// `parallel::grad_shards` with `create_graph`: the summed gradients can be
/// differentiated again, the Hessian-vector product through them equals the
/// one of the whole batch's loss, and both are the same bits on one thread
/// and on two (the shards' sum is formed in shard order).
#[test]
fn grad_shards_with_create_graph_gives_the_same_gradient_bits_on_any_thread_count() {
    use netcl::parallel;

    let mut rng = StdRng::seed_from_u64(91);
    let w1 = randn(&[6, 5], &mut rng).requires_grad_(true);
    let w2 = randn(&[5, 3], &mut rng).requires_grad_(true);
    let params = [w1.clone(), w2.clone()];
    let v = [randn(&[6, 5], &mut rng), randn(&[5, 3], &mut rng)];
    let shards: Vec<(Tensor, Tensor)> = (0..4)
        .map(|_| (randn(&[3, 6], &mut rng), randn(&[3, 3], &mut rng)))
        .collect();
    let loss = |(x, y): &(Tensor, Tensor)| -> Result<Tensor> {
        Ok(x.matmul(&w1).tanh().matmul(&w2).mse_loss(y) * 0.25)
    };
    type Run = (Vec<f32>, Vec<Vec<f32>>, Vec<Vec<f32>>);
    let hvp_with = |threads: usize| -> Run {
        let pool = parallel::rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let (losses, grads) = parallel::install(&pool, || {
            parallel::grad_shards(&shards, &params, &create(), loss)
        })
        .unwrap();
        let grads: Vec<Tensor> = grads.into_iter().map(Option::unwrap).collect();
        assert!(
            grads.iter().all(Tensor::requires_grad),
            "create_graph gradients have a graph"
        );
        let dot = (&grads[0] * &v[0]).sum() + (&grads[1] * &v[1]).sum();
        let hv = autograd::grad(&[&dot], &[&w1, &w2]).unwrap();
        (
            losses,
            grads.iter().map(Tensor::to_vec).collect(),
            hv.iter().map(Tensor::to_vec).collect(),
        )
    };
    let (losses_1, grads_1, hv_1) = hvp_with(1);
    let (losses_2, grads_2, hv_2) = hvp_with(2);
    assert_eq!(losses_1, losses_2);
    // The gradients are summed in shard order: the same bits.
    for (a, b) in grads_1.iter().flatten().zip(grads_2.iter().flatten()) {
        assert_eq!(a.to_bits(), b.to_bits(), "one thread and two differ");
    }
    // A derivative taken through them walks graphs that two threads
    // recorded at once, in recording order: equal up to the order of the
    // shards' float sums (documented on `grad_shards`).
    for (a, b) in hv_1.iter().flatten().zip(hv_2.iter().flatten()) {
        assert!((a - b).abs() <= 1e-6 * (1.0 + a.abs()), "{a} vs {b}");
    }

    // The same HVP from one loss over all the shards.
    let total = shards
        .iter()
        .map(|shard| loss(shard).unwrap())
        .reduce(|a, b| a + b)
        .unwrap();
    let grads = autograd::grad_with(&[&total], &[&w1, &w2], &create()).unwrap();
    let dot =
        (grads[0].as_ref().unwrap() * &v[0]).sum() + (grads[1].as_ref().unwrap() * &v[1]).sum();
    let whole = autograd::grad(&[&dot], &[&w1, &w2]).unwrap();
    for (got, want) in hv_1
        .iter()
        .flatten()
        .zip(whole.iter().flat_map(Tensor::to_vec))
    {
        assert!(
            (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
            "{got} vs {want}"
        );
    }
    // Nothing was written to the parameters' grad.
    assert!(w1.grad().is_none() && w2.grad().is_none());
}
