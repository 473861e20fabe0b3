//! NaN and ±Inf propagate through the ops as in PyTorch instead of
//! silently becoming numbers (issue 9), and cross-entropy is exact.
//!
//! The tests of defects were written to fail on the code before the fix;
//! the others pin down behaviour that was already right.

use netcl::Tensor;

const NAN: f32 = f32::NAN;
const INF: f32 = f32::INFINITY;

fn tensor(values: &[f32], shape: &[usize]) -> Tensor {
    Tensor::from_vec(values.to_vec(), shape).unwrap()
}

/// Element-wise equality that treats NaN as equal to NaN and tells the
/// signs of infinities and zeros apart only where `==` does.
fn assert_same(got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
    for (g, w) in got.iter().zip(want) {
        assert!(
            (g.is_nan() && w.is_nan()) || g == w,
            "got {got:?}, want {want:?}"
        );
    }
}

#[test]
fn relu_keeps_nan_and_its_gradient_is_nan() {
    let x = tensor(&[NAN, -1.0, 2.0, INF, -INF], &[5]).requires_grad_(true);
    let y = x.relu();
    // PyTorch: relu(NaN) = NaN.
    assert_same(&y.to_vec(), &[NAN, 0.0, 2.0, INF, 0.0]);
    y.sum().backward();
    // The slope at a NaN input is undefined: NaN, not 0.
    assert_same(&x.grad().unwrap().to_vec(), &[NAN, 0.0, 1.0, 1.0, 0.0]);
}

#[test]
fn abs_gradient_at_nan_is_nan() {
    let x = tensor(&[NAN, -2.0, 0.0, 3.0], &[4]).requires_grad_(true);
    x.abs().sum().backward();
    assert_same(&x.grad().unwrap().to_vec(), &[NAN, -1.0, 0.0, 1.0]);
}

#[test]
fn max_axis_and_argmax_return_the_first_nan_of_a_lane() {
    let x = tensor(
        &[
            1.0, NAN, 3.0, NAN, NAN, 0.0, 2.0, 5.0, -1.0, -INF, -INF, -INF,
        ],
        &[4, 3],
    )
    .requires_grad_(true);
    let max = x.max_axis(-1, false);
    assert_same(&max.to_vec(), &[NAN, NAN, 5.0, -INF]);
    assert_eq!(x.argmax(-1).to_vec(), vec![1.0, 0.0, 1.0, 0.0]);
    // Along axis 0: column 0 has a NaN in row 1, column 1 in row 0.
    assert_same(&x.max_axis(0, false).to_vec(), &[NAN, NAN, 3.0]);
    assert_eq!(x.argmax(0).to_vec(), vec![1.0, 0.0, 0.0]);
    // The gradient goes to the position argmax names.
    max.sum().backward();
    let mut want = vec![0.0; 12];
    for (row, col) in [(0, 1), (1, 0), (2, 1), (3, 0)] {
        want[row * 3 + col] = 1.0;
    }
    assert_eq!(x.grad().unwrap().to_vec(), want);
}

#[test]
fn sums_and_means_propagate_nan_and_infinities() {
    let x = tensor(&[1.0, NAN, 2.0, 3.0, INF, 4.0, INF, -INF, 0.0], &[3, 3]);
    assert!(x.sum().item().is_nan());
    assert!(x.mean().item().is_nan());
    assert_same(&x.sum_axis(-1, false).to_vec(), &[NAN, INF, NAN]);
    assert_same(
        &x.mean_axis(-1, false).to_vec(),
        &[NAN, INF, NAN], // (inf + -inf) / 3 is NaN
    );
    assert_same(&x.sum_axis(0, false).to_vec(), &[INF, NAN, 6.0]);
    // The mean of nothing is NaN, as in PyTorch.
    assert!(Tensor::zeros(&[0, 3]).mean().item().is_nan());
    assert_same(
        &Tensor::zeros(&[2, 0]).mean_axis(1, false).to_vec(),
        &[NAN, NAN],
    );
    assert_same(
        &Tensor::zeros(&[2, 0]).sum_axis(1, false).to_vec(),
        &[0.0, 0.0],
    );
}

#[test]
fn softmax_of_a_row_with_nan_is_nan_and_other_rows_are_unchanged() {
    let x = tensor(&[1.0, NAN, 0.0, 0.0, 0.0, 0.0], &[2, 3]);
    let p = x.softmax(-1).to_vec();
    assert!(p[..3].iter().all(|v| v.is_nan()), "{p:?}");
    assert!(
        p[3..].iter().all(|&v| (v - 1.0 / 3.0).abs() < 1e-6),
        "{p:?}"
    );
    let l = x.log_softmax(-1).to_vec();
    assert!(l[..3].iter().all(|v| v.is_nan()), "{l:?}");
    assert!(
        l[3..].iter().all(|&v| (v + 3f32.ln()).abs() < 1e-6),
        "{l:?}"
    );
}

#[test]
fn softmax_with_infinite_logits() {
    // -inf is a class of probability 0 (log-probability -inf); +inf takes
    // all the mass from the finite classes (probability 0, log -inf), and
    // its own value, inf - inf, is undefined: NaN. A row of only -inf has
    // no mass at all: NaN.
    let x = tensor(&[0.0, -INF, 0.0, INF, 1.0, -INF, -INF, -INF, -INF], &[3, 3]);
    let p = x.softmax(-1).to_vec();
    assert_same(&p, &[0.5, 0.0, 0.5, NAN, 0.0, 0.0, NAN, NAN, NAN]);
    let l = x.log_softmax(-1).to_vec();
    let ln_half = -(2f32.ln());
    assert_same(
        &l,
        &[ln_half, -INF, ln_half, NAN, -INF, -INF, NAN, NAN, NAN],
    );
}

#[test]
fn cross_entropy_of_a_nan_logit_is_nan() {
    // Before: a finite 43.8 while every gradient was NaN.
    let logits = tensor(&[NAN, 0.0, 1.0, 2.0], &[2, 2]).requires_grad_(true);
    let targets = tensor(&[1.0, 0.0], &[2]);
    let loss = logits.cross_entropy(&targets);
    assert!(loss.item().is_nan(), "{}", loss.item());
    loss.backward();
    assert!(
        logits.grad().unwrap().to_vec()[..2]
            .iter()
            .all(|g| g.is_nan())
    );
}

#[test]
fn cross_entropy_of_an_infinite_logit_on_another_class_is_infinite() {
    // Before: 87.34 (= -ln f32::MIN_POSITIVE).
    let logits = tensor(&[INF, 0.0], &[1, 2]);
    let loss = logits.cross_entropy(&tensor(&[1.0], &[1]));
    assert_eq!(loss.item(), INF);
    // The class at +inf itself: inf - inf is undefined.
    assert!(logits.cross_entropy(&tensor(&[0.0], &[1])).item().is_nan());
}

#[test]
fn cross_entropy_of_a_confident_mistake_is_exact() {
    // loss = logsumexp(x) - x_t = 200 + ln(1 + e^-200) - 0 = 200 (in f32),
    // where the clamped probability capped it at 87.34.
    let logits = tensor(&[200.0, 0.0, 0.0, 1000.0], &[2, 2]).requires_grad_(true);
    let loss = logits.cross_entropy(&tensor(&[1.0, 0.0], &[2]));
    // Row 0: 200; row 1: 1000; mean 600.
    assert_eq!(loss.item(), 600.0);
    loss.backward();
    // (softmax - onehot) / n: softmax is [1, 0] and [0, 1] to f32 precision.
    assert_eq!(logits.grad().unwrap().to_vec(), vec![0.5, -0.5, -0.5, 0.5]);
}

#[test]
fn cross_entropy_matches_log_softmax_exactly_on_large_logits() {
    let logits = tensor(&[1e4, 1e4 - 50.0, 1e4 - 100.0], &[1, 3]);
    for t in 0..3 {
        let ce = logits.cross_entropy(&tensor(&[t as f32], &[1])).item();
        let reference = -logits.log_softmax(-1).to_vec()[t];
        assert_eq!(ce, reference, "target {t}");
    }
    // ln(1 + e^-50 + e^-100) is below f32's resolution at 100: exactly 100
    // (the clamped probability gave 87.34).
    assert_eq!(logits.cross_entropy(&tensor(&[2.0], &[1])).item(), 100.0);
}

#[test]
fn powf_zero_has_zero_gradient_everywhere() {
    // d/dx x^0 = 0, also at x = 0 where 0 · 0^-1 is NaN (PyTorch gives 0).
    let x = tensor(&[0.0, -0.0, 2.0, -3.0], &[4]).requires_grad_(true);
    let y = x.powf(0.0);
    assert_eq!(y.to_vec(), vec![1.0; 4]);
    y.sum().backward();
    assert_eq!(x.grad().unwrap().to_vec(), vec![0.0; 4]);
}
