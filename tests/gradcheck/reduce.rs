//! Reductions.

use crate::checker::*;

#[test]
fn should_diff_sum_and_mean() {
    let mut rng = rng(60);
    for shape in [&[][..], &[5], &[2, 3], &[2, 3, 4]] {
        let x = normal(shape, &mut rng);
        assert_grads("sum", std::slice::from_ref(&x), &[true], |t| t[0].sum());
        assert_grads("mean", std::slice::from_ref(&x), &[true], |t| t[0].mean());
    }
}

#[test]
fn should_diff_sum_axis_and_mean_axis_every_axis_and_keepdim() {
    let mut rng = rng(61);
    for shape in [&[5][..], &[2, 3], &[2, 3, 4]] {
        let x = normal(shape, &mut rng);
        let ndim = shape.len() as isize;
        for axis in -ndim..ndim {
            for keepdim in [false, true] {
                let label = format!("sum_axis({axis}, {keepdim})");
                assert_grads(&label, std::slice::from_ref(&x), &[true], |t| {
                    t[0].sum_axis(axis, keepdim)
                });
                let label = format!("mean_axis({axis}, {keepdim})");
                assert_grads(&label, std::slice::from_ref(&x), &[true], |t| {
                    t[0].mean_axis(axis, keepdim)
                });
            }
        }
    }
}

#[test]
fn should_diff_max_axis_with_unique_maximum() {
    let mut rng = rng(62);
    for shape in [&[6][..], &[3, 4], &[2, 3, 4]] {
        let x = distinct(shape, &mut rng);
        let ndim = shape.len() as isize;
        for axis in -ndim..ndim {
            for keepdim in [false, true] {
                let label = format!("max_axis({axis}, {keepdim})");
                assert_grads(&label, std::slice::from_ref(&x), &[true], |t| {
                    t[0].max_axis(axis, keepdim)
                });
            }
        }
    }
}

#[test]
fn should_diff_reductions_of_transposed_input() {
    let mut rng = rng(63);
    let x = distinct(&[3, 4], &mut rng);
    for axis in [0, 1] {
        assert_grads("t().sum_axis", std::slice::from_ref(&x), &[true], |t| {
            t[0].t().sum_axis(axis, false)
        });
        assert_grads("t().mean_axis", std::slice::from_ref(&x), &[true], |t| {
            t[0].t().mean_axis(axis, true)
        });
        assert_grads("t().max_axis", std::slice::from_ref(&x), &[true], |t| {
            t[0].t().max_axis(axis, false)
        });
    }
}
