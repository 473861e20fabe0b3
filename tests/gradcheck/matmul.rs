//! Matrix products and the fused linear op.

use crate::checker::*;

fn check_matmul(name: &str, seed: u64, lhs: &[usize], rhs: &[usize]) {
    let mut rng = rng(seed);
    let a = normal(lhs, &mut rng);
    let b = normal(rhs, &mut rng);
    for wrt in BOTH_AND_EACH {
        assert_grads(name, &[a.clone(), b.clone()], &wrt, |t| t[0].matmul(&t[1]));
    }
}

#[test]
fn should_diff_matmul_2d() {
    check_matmul("matmul", 50, &[3, 4], &[4, 5]);
    check_matmul("matmul", 51, &[1, 4], &[4, 1]);
    check_matmul("matmul", 52, &[4, 1], &[1, 3]);
}

#[test]
fn should_diff_matmul_batched() {
    check_matmul("matmul", 53, &[2, 3, 4], &[2, 4, 5]);
}

#[test]
fn should_diff_matmul_batched_broadcast() {
    check_matmul("matmul", 54, &[3, 4], &[2, 4, 5]);
    check_matmul("matmul", 55, &[2, 3, 4], &[4, 5]);
    check_matmul("matmul", 56, &[2, 1, 3, 4], &[5, 4, 2]);
    check_matmul("matmul", 57, &[1, 3, 2], &[4, 2, 3]);
}

/// The fused affine map `x · W + b`, over every subset of inputs requiring
/// grad, against finite differences and against the unfused ops.
fn check_linear(seed: u64, x_shape: &[usize], in_features: usize, out_features: usize) {
    let mut rng = rng(seed);
    let x = normal(x_shape, &mut rng);
    let w = normal(&[in_features, out_features], &mut rng);
    let b = normal(&[out_features], &mut rng);
    for wrt in [
        [true, true, true],
        [true, false, false],
        [false, true, false],
        [false, false, true],
    ] {
        assert_grads("linear", &[x.clone(), w.clone(), b.clone()], &wrt, |t| {
            t[0].linear(&t[1], Some(&t[2]))
        });
    }
    for wrt in BOTH_AND_EACH {
        assert_grads("linear without bias", &[x.clone(), w.clone()], &wrt, |t| {
            t[0].linear(&t[1], None)
        });
    }
    if x_shape.len() >= 2 {
        let fused = x.linear(&w, Some(&b)).to_vec();
        let unfused = x.matmul(&w).add(&b).to_vec();
        for (f, u) in fused.iter().zip(&unfused) {
            assert!((f - u).abs() <= 1e-5 * (1.0 + u.abs()), "{f} vs {u}");
        }
    }
}

#[test]
fn should_diff_linear() {
    check_linear(70, &[4, 3], 3, 5);
    check_linear(71, &[1, 6], 6, 1);
    check_linear(72, &[2, 3, 4], 4, 2);
    check_linear(73, &[3], 3, 4);
}

#[test]
fn should_diff_linear_of_a_transposed_input() {
    let mut rng = rng(74);
    let x = normal(&[3, 4], &mut rng);
    let w = normal(&[3, 2], &mut rng);
    let b = normal(&[2], &mut rng);
    assert_grads("linear of xᵀ", &[x, w, b], &[true, true, true], |t| {
        t[0].t().linear(&t[1], Some(&t[2]))
    });
}

#[test]
fn should_diff_matmul_through_transposed_operands() {
    let mut rng = rng(58);
    let a = normal(&[4, 3], &mut rng);
    let b = normal(&[4, 5], &mut rng);
    let c = normal(&[5, 4], &mut rng);
    for wrt in BOTH_AND_EACH {
        // aᵀ · b: [3, 4] · [4, 5]
        assert_grads("a.t().matmul(b)", &[a.clone(), b.clone()], &wrt, |t| {
            t[0].t().matmul(&t[1])
        });
        // aᵀ · cᵀ: [3, 4] · [4, 5]
        assert_grads("a.t().matmul(c.t())", &[a.clone(), c.clone()], &wrt, |t| {
            t[0].t().matmul(&t[1].t())
        });
        // bᵀ · cᵀ: [5, 4] · [4, 5], both operands non-contiguous
        assert_grads("b.t().matmul(c.t())", &[b.clone(), c.clone()], &wrt, |t| {
            t[0].t().matmul(&t[1].t())
        });
    }
}

#[test]
fn should_diff_matmul_batched_transposed_operands() {
    let mut rng = rng(59);
    let a = normal(&[2, 4, 3], &mut rng);
    let b = normal(&[2, 5, 4], &mut rng);
    for wrt in BOTH_AND_EACH {
        // [2, 3, 4] · [2, 4, 5]
        assert_grads("batched transposed", &[a.clone(), b.clone()], &wrt, |t| {
            t[0].transpose(-1, -2).matmul(&t[1].transpose(1, 2))
        });
    }
    // The batch axis moved: [4, 2, 3] -> [2, 4, 3] -> transposed [2, 3, 4].
    let c = normal(&[4, 2, 3], &mut rng);
    let d = normal(&[4, 5], &mut rng);
    assert_grads("batch axis swapped", &[c, d], &[true, true], |t| {
        t[0].transpose(0, 1).transpose(1, 2).matmul(&t[1])
    });
}
