//! Binary ops with broadcasting, and their scalar forms and operators.

use netcl::Tensor;

use crate::checker::*;

/// Operand shape pairs: same shape, trailing vector, both sides broadcast,
/// a 0-d scalar on either side.
const BROADCAST_PAIRS: [(&[usize], &[usize]); 7] = [
    (&[2, 3], &[2, 3]),
    (&[2, 3], &[3]),
    (&[3], &[2, 3]),
    (&[4, 1, 3], &[2, 1]),
    (&[2, 1], &[4, 1, 3]),
    (&[], &[2, 3]),
    (&[2, 3], &[]),
];

fn check_binary(name: &str, seed: u64, op: BinaryFn, nonzero_rhs: bool) {
    let mut rng = rng(seed);
    for (lhs, rhs) in BROADCAST_PAIRS {
        let a = normal(lhs, &mut rng);
        let b = if nonzero_rhs {
            away_from_zero(rhs, 0.5, 2.0, &mut rng)
        } else {
            normal(rhs, &mut rng)
        };
        for wrt in BOTH_AND_EACH {
            assert_grads(name, &[a.clone(), b.clone()], &wrt, |t| op(&t[0], &t[1]));
        }
    }
}

#[test]
fn should_diff_add_broadcast() {
    check_binary("add", 10, Tensor::add, false);
}

#[test]
fn should_diff_sub_broadcast() {
    check_binary("sub", 11, Tensor::sub, false);
}

#[test]
fn should_diff_mul_broadcast() {
    check_binary("mul", 12, Tensor::mul, false);
}

#[test]
fn should_diff_div_broadcast() {
    check_binary("div", 13, Tensor::div, true);
}

#[test]
fn should_diff_binary_operators() {
    let mut rng = rng(14);
    let a = normal(&[3, 2], &mut rng);
    let b = away_from_zero(&[2], 0.5, 2.0, &mut rng);
    let ops: [(&str, BinaryFn); 4] = [
        ("&a + &b", |a, b| a + b),
        ("&a - &b", |a, b| a - b),
        ("&a * &b", |a, b| a * b),
        ("&a / &b", |a, b| a / b),
    ];
    for (name, op) in ops {
        assert_grads(name, &[a.clone(), b.clone()], &[true, true], |t| {
            op(&t[0], &t[1])
        });
    }
}

#[test]
fn should_diff_operand_used_on_both_sides() {
    // x op x: both edges lead to the same leaf and must be summed.
    let x = away_from_zero(&[2, 3], 0.5, 2.0, &mut rng(15));
    let ops: [(&str, UnaryFn); 4] = [
        ("x + x", |x| x + x),
        ("x - x", |x| x - x),
        ("x * x", |x| x * x),
        ("x / x", |x| x / x),
    ];
    for (name, op) in ops {
        assert_grads(name, std::slice::from_ref(&x), &[true], |t| op(&t[0]));
    }
}

// ---------------------------------------------------------------------------
// Scalar forms
// ---------------------------------------------------------------------------

#[test]
fn should_diff_scalar_methods() {
    let mut rng = rng(20);
    let mut input = |shape: &[usize]| normal(shape, &mut rng);
    check_unary("add_scalar", &mut input, |x| x.add_scalar(1.5));
    check_unary("sub_scalar", &mut input, |x| x.sub_scalar(0.7));
    check_unary("rsub_scalar", &mut input, |x| x.rsub_scalar(2.0));
    check_unary("mul_scalar", &mut input, |x| x.mul_scalar(-1.3));
    check_unary("div_scalar", &mut input, |x| x.div_scalar(2.5));
}

#[test]
fn should_diff_rdiv_scalar() {
    let mut rng = rng(21);
    let input = |shape: &[usize]| away_from_zero(shape, 0.5, 2.0, &mut rng);
    check_unary("rdiv_scalar", input, |x| x.rdiv_scalar(3.0));
}

#[test]
fn should_diff_scalar_operators_on_either_side() {
    let mut rng = rng(22);
    let x = away_from_zero(&[2, 3], 0.5, 2.0, &mut rng);
    let ops: [(&str, UnaryFn); 9] = [
        ("&x + 1.5", |x| x + 1.5),
        ("1.5 + &x", |x| 1.5 + x),
        ("&x - 0.5", |x| x - 0.5),
        ("2.0 - &x", |x| 2.0 - x),
        ("&x * -1.5", |x| x * -1.5),
        ("-1.5 * &x", |x| -1.5 * x),
        ("&x / 3.0", |x| x / 3.0),
        ("3.0 / &x", |x| 3.0 / x),
        ("-&x", |x| -x),
    ];
    for (name, op) in ops {
        assert_grads(name, std::slice::from_ref(&x), &[true], |t| op(&t[0]));
    }
}
