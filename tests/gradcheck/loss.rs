//! Losses.

use crate::checker::*;

#[test]
fn should_diff_cross_entropy() {
    let mut rng = rng(90);
    for (n, classes) in [(4, 3), (1, 5), (6, 2), (3, 7)] {
        let logits = normal(&[n, classes], &mut rng).mul_scalar(2.0);
        let y = targets(n, classes, &mut rng);
        assert_grads("cross_entropy", &[logits], &[true], |t| {
            t[0].cross_entropy(&y)
        });
    }
}

#[test]
fn should_diff_cross_entropy_of_transposed_logits() {
    let mut rng = rng(91);
    let logits = normal(&[3, 5], &mut rng);
    let y = targets(5, 3, &mut rng);
    assert_grads("t().cross_entropy", &[logits], &[true], |t| {
        t[0].t().cross_entropy(&y)
    });
}

#[test]
fn should_diff_mse_loss() {
    let mut rng = rng(92);
    for shape in [&[5][..], &[3, 4], &[2, 2, 2], &[]] {
        let pred = normal(shape, &mut rng);
        let target = normal(shape, &mut rng);
        for wrt in BOTH_AND_EACH {
            assert_grads("mse_loss", &[pred.clone(), target.clone()], &wrt, |t| {
                t[0].mse_loss(&t[1])
            });
        }
    }
}
