//! Unary ops.

use netcl::Tensor;

use crate::checker::*;

#[test]
fn should_diff_neg() {
    let mut rng = rng(30);
    check_unary("neg", |s| normal(s, &mut rng), Tensor::neg);
}

#[test]
fn should_diff_powf_integer_exponents_any_sign() {
    let mut rng = rng(31);
    let mut input = |s: &[usize]| uniform(s, -1.5, 1.5, &mut rng);
    check_unary("powf(2)", &mut input, |x| x.powf(2.0));
    check_unary("powf(3)", &mut input, |x| x.powf(3.0));
    check_unary("powf(1)", &mut input, |x| x.powf(1.0));
}

#[test]
fn should_diff_powf_fractional_and_negative_exponents_on_positive_inputs() {
    let mut rng = rng(32);
    let mut input = |s: &[usize]| uniform(s, 0.5, 2.0, &mut rng);
    check_unary("powf(0.5)", &mut input, |x| x.powf(0.5));
    check_unary("powf(2.5)", &mut input, |x| x.powf(2.5));
    check_unary("powf(-1)", &mut input, |x| x.powf(-1.0));
    check_unary("powf(-0.5)", &mut input, |x| x.powf(-0.5));
}

#[test]
fn should_diff_exp() {
    let mut rng = rng(33);
    check_unary("exp", |s| uniform(s, -2.0, 2.0, &mut rng), Tensor::exp);
}

#[test]
fn should_diff_log_on_positive_inputs() {
    let mut rng = rng(34);
    check_unary("log", |s| uniform(s, 0.5, 3.0, &mut rng), Tensor::log);
}

#[test]
fn should_diff_sqrt_on_positive_inputs() {
    let mut rng = rng(35);
    check_unary("sqrt", |s| uniform(s, 0.5, 3.0, &mut rng), Tensor::sqrt);
}

#[test]
fn should_diff_abs_away_from_zero() {
    let mut rng = rng(36);
    let input = |s: &[usize]| away_from_zero(s, 0.2, 2.0, &mut rng);
    check_unary("abs", input, Tensor::abs);
}

#[test]
fn should_diff_relu_away_from_zero() {
    let mut rng = rng(37);
    let input = |s: &[usize]| away_from_zero(s, 0.2, 2.0, &mut rng);
    check_unary("relu", input, Tensor::relu);
}

#[test]
fn should_diff_sigmoid() {
    let mut rng = rng(38);
    check_unary(
        "sigmoid",
        |s| uniform(s, -3.0, 3.0, &mut rng),
        Tensor::sigmoid,
    );
}

#[test]
fn should_diff_tanh() {
    let mut rng = rng(39);
    check_unary("tanh", |s| uniform(s, -2.0, 2.0, &mut rng), Tensor::tanh);
}

#[test]
fn should_diff_unary_ops_on_transposed_input() {
    // A non-contiguous input: the backward's gradient must keep the layout
    // of the input's logical indices.
    let x = uniform(&[3, 4], 0.5, 2.0, &mut rng(40));
    let ops: [(&str, UnaryFn); 6] = [
        ("t().exp()", |x| x.t().exp()),
        ("t().log()", |x| x.t().log()),
        ("t().sqrt()", |x| x.t().sqrt()),
        ("t().powf(3)", |x| x.t().powf(3.0)),
        ("t().tanh()", |x| x.t().tanh()),
        ("t().rdiv_scalar(2)", |x| x.t().rdiv_scalar(2.0)),
    ];
    for (name, op) in ops {
        assert_grads(name, std::slice::from_ref(&x), &[true], |t| op(&t[0]));
    }
}
