//! Shape ops.

use netcl::Tensor;

use crate::checker::*;

#[test]
fn should_diff_reshape() {
    let mut rng = rng(80);
    let x = normal(&[2, 3, 4], &mut rng);
    for shape in [&[24][..], &[6, 4], &[4, 6], &[2, 2, 6], &[1, 24, 1]] {
        assert_grads("reshape", std::slice::from_ref(&x), &[true], |t| {
            t[0].reshape(shape)
        });
    }
    // Scalar to and from shape [1, 1].
    let s = normal(&[], &mut rng);
    assert_grads("reshape [] -> [1, 1]", &[s], &[true], |t| {
        t[0].reshape(&[1, 1])
    });
}

#[test]
fn should_diff_reshape_of_non_contiguous_input() {
    let x = normal(&[3, 4], &mut rng(81));
    // The transposed view is not row-major: reshape must copy in logical
    // order and its backward must undo exactly that.
    for shape in [&[12][..], &[2, 6], &[6, 2]] {
        assert_grads("t().reshape", std::slice::from_ref(&x), &[true], |t| {
            t[0].t().reshape(shape)
        });
    }
}

#[test]
fn should_diff_transpose_and_t() {
    let mut rng = rng(82);
    let x = normal(&[2, 3, 4], &mut rng);
    for (a, b) in [(0, 2), (1, -1), (0, 1), (-3, -2), (1, 1)] {
        let label = format!("transpose({a}, {b})");
        assert_grads(&label, std::slice::from_ref(&x), &[true], |t| {
            t[0].transpose(a, b)
        });
    }
    let m = normal(&[3, 5], &mut rng);
    assert_grads("t", std::slice::from_ref(&m), &[true], |t| t[0].t());
    assert_grads("t().t()", std::slice::from_ref(&m), &[true], |t| {
        t[0].t().t()
    });
}

#[test]
fn should_diff_binary_ops_on_transposed_operands() {
    // Element-wise ops whose operands are non-contiguous views with the same
    // logical shape, and broadcast against one.
    let mut rng = rng(83);
    // Every operand is a denominator somewhere: keep all away from 0.
    let a = away_from_zero(&[4, 3], 0.5, 2.0, &mut rng);
    let b = away_from_zero(&[3, 4], 0.5, 2.0, &mut rng);
    let c = away_from_zero(&[4], 0.5, 2.0, &mut rng);
    let ops: [(&str, BinaryFn); 4] = [
        ("add", Tensor::add),
        ("sub", Tensor::sub),
        ("mul", Tensor::mul),
        ("div", Tensor::div),
    ];
    for (name, op) in ops {
        assert_grads(name, &[a.clone(), b.clone()], &[true, true], |t| {
            op(&t[0].t(), &t[1])
        });
        assert_grads(name, &[a.clone(), c.clone()], &[true, true], |t| {
            op(&t[0].t(), &t[1])
        });
        assert_grads(name, &[b.clone(), a.clone()], &[true, true], |t| {
            op(&t[0], &t[1].t())
        });
    }
}
