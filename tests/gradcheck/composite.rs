//! Composite graphs against finite differences.

use netcl::autograd::{self};

use crate::checker::*;

#[test]
fn should_diff_two_layer_classifier() {
    // cross_entropy(relu(x W1 + b1) W2 + b2), every parameter and the input.
    let mut rng = rng(100);
    let x = normal(&[4, 3], &mut rng);
    let w1 = normal(&[3, 5], &mut rng);
    let b1 = normal(&[5], &mut rng);
    let w2 = normal(&[5, 2], &mut rng);
    let b2 = normal(&[2], &mut rng);
    let y = targets(4, 2, &mut rng);
    // relu's inputs must stay away from its kink. Moving one element of x,
    // W1 or b1 by h moves a pre-activation z = x W1 + b1 by at most
    // h · max(|x|, |W1|, 1); require twice that margin, so that no central
    // difference straddles the kink.
    {
        let _guard = autograd::no_grad();
        let z = x.matmul(&w1) + &b1;
        let closest = z.to_vec().iter().fold(f32::INFINITY, |m, v| m.min(v.abs()));
        let largest = [&x, &w1]
            .iter()
            .flat_map(|t| t.to_vec())
            .fold(1.0_f32, |m, v| m.max(v.abs()));
        let margin = 2.0 * STEP * largest;
        assert!(
            closest > margin,
            "pre-activation {closest} within {margin} of relu's kink"
        );
    }
    assert_grads(
        "mlp",
        &[x, w1, b1, w2, b2],
        &[true, true, true, true, true],
        |t| {
            let h = (t[0].matmul(&t[1]) + &t[2]).relu();
            (h.matmul(&t[3]) + &t[4]).cross_entropy(&y)
        },
    );
}

#[test]
fn should_diff_smooth_chain_with_reuse() {
    // f(x, w) = mean(log_softmax(tanh(x w) * sigmoid(x w), -1) * x w)
    //         + sqrt(exp(x w) + 1).sum(): shared subexpression x w used four
    // times.
    let mut rng = rng(101);
    let x = normal(&[3, 4], &mut rng);
    let w = normal(&[4, 2], &mut rng).mul_scalar(0.5);
    assert_grads("chain", &[x, w], &[true, true], |t| {
        let z = t[0].matmul(&t[1]);
        let s = (z.tanh() * z.sigmoid()).log_softmax(-1);
        (s * &z).mean() + (z.exp() + 1.0).sqrt().sum()
    });
}

#[test]
fn should_diff_normalisation_with_broadcast_statistics() {
    // (x - mean(x, -1)) / sqrt(var(x, -1) + 1): keepdim reductions broadcast
    // back against their input.
    let x = normal(&[3, 5], &mut rng(102));
    assert_grads("layer norm", &[x], &[true], |t| {
        let centered = &t[0] - t[0].mean_axis(-1, true);
        let var = centered.powf(2.0).mean_axis(-1, true);
        centered / (var + 1.0).sqrt()
    });
}
