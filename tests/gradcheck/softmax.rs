//! Softmax and log-softmax.

use crate::checker::*;

#[test]
fn should_diff_softmax_every_axis() {
    let mut rng = rng(70);
    for shape in [&[5][..], &[3, 4], &[2, 3, 4]] {
        let x = normal(shape, &mut rng).mul_scalar(1.5);
        let ndim = shape.len() as isize;
        for axis in -ndim..ndim {
            let label = format!("softmax({axis})");
            assert_grads(&label, std::slice::from_ref(&x), &[true], |t| {
                t[0].softmax(axis)
            });
        }
    }
}

#[test]
fn should_diff_log_softmax_every_axis() {
    let mut rng = rng(71);
    for shape in [&[5][..], &[3, 4], &[2, 3, 4]] {
        let x = normal(shape, &mut rng).mul_scalar(1.5);
        let ndim = shape.len() as isize;
        for axis in -ndim..ndim {
            let label = format!("log_softmax({axis})");
            assert_grads(&label, std::slice::from_ref(&x), &[true], |t| {
                t[0].log_softmax(axis)
            });
        }
    }
}

#[test]
fn should_diff_softmax_of_transposed_input() {
    let x = normal(&[3, 4], &mut rng(72));
    for axis in [0, 1, -1] {
        assert_grads("t().softmax", std::slice::from_ref(&x), &[true], |t| {
            t[0].t().softmax(axis)
        });
        assert_grads("t().log_softmax", std::slice::from_ref(&x), &[true], |t| {
            t[0].t().log_softmax(axis)
        });
    }
}
