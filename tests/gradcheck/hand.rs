//! Hand-derived gradients.

use netcl::Tensor;

use crate::checker::*;

/// Linear layer, relu and mean squared error on fixed numbers.
///
/// x = [[1, 2], [3, -1]], W = [[0.5, -1], [0.25, 1]], b = [0.1, -0.2],
/// target t = [[1, 0], [2, 1]].
///
/// z = x W + b:
///   row 0: [1·0.5 + 2·0.25, 1·(-1) + 2·1] + b = [1.0, 1.0] + b = [1.1, 0.8]
///   row 1: [3·0.5 - 0.25, -3 - 1] + b = [1.25, -4] + b = [1.35, -4.2]
/// h = relu(z) = [[1.1, 0.8], [1.35, 0]]
/// d = h - t = [[0.1, 0.8], [-0.65, -1]]
/// L = mean(d²) = (0.01 + 0.64 + 0.4225 + 1) / 4 = 0.518125
/// dL/dh = 2 d / 4 = [[0.05, 0.4], [-0.325, -0.5]]
/// dL/dz = dL/dh · [z > 0] = [[0.05, 0.4], [-0.325, 0]]
/// dW = xᵀ dz = [[1·0.05 + 3·(-0.325), 1·0.4 + 3·0],
///               [2·0.05 + (-1)(-0.325), 2·0.4 + 0]]
///    = [[-0.925, 0.4], [0.425, 0.8]]
/// db = Σ_rows dz = [0.05 - 0.325, 0.4 + 0] = [-0.275, 0.4]
/// dx = dz Wᵀ = [[0.05·0.5 + 0.4·(-1), 0.05·0.25 + 0.4·1],
///               [-0.325·0.5 + 0, -0.325·0.25 + 0]]
///    = [[-0.375, 0.4125], [-0.1625, -0.08125]]
#[test]
fn linear_relu_mse_gradients_match_hand_derivation() {
    let x = tensor(&[1.0, 2.0, 3.0, -1.0], &[2, 2]).requires_grad_(true);
    let w = tensor(&[0.5, -1.0, 0.25, 1.0], &[2, 2]).requires_grad_(true);
    let b = tensor(&[0.1, -0.2], &[2]).requires_grad_(true);
    let target = tensor(&[1.0, 0.0, 2.0, 1.0], &[2, 2]);

    let loss = (x.matmul(&w) + &b).relu().mse_loss(&target);
    assert!((loss.item() - 0.518125).abs() <= HAND_TOL);
    loss.backward();

    assert_close(&w.grad().unwrap(), &[-0.925, 0.4, 0.425, 0.8], &[2, 2]);
    assert_close(&b.grad().unwrap(), &[-0.275, 0.4], &[2]);
    assert_close(
        &x.grad().unwrap(),
        &[-0.375, 0.4125, -0.1625, -0.08125],
        &[2, 2],
    );
    assert!(target.grad().is_none());
}

/// One tensor used twice: y = Σ (x·x + x), so dy/dx = 2x + 1 — the
/// contributions of both factors of x·x and of the + x edge must add up.
/// x = [-1.5, 0, 2] gives [-2, 1, 5].
#[test]
fn reused_tensor_accumulates_all_paths() {
    let x = tensor(&[-1.5, 0.0, 2.0], &[3]).requires_grad_(true);
    let y = (&x * &x + &x).sum();
    assert!((y.item() - (0.75 + 0.0 + 6.0)).abs() <= HAND_TOL);
    y.backward();
    assert_close(&x.grad().unwrap(), &[-2.0, 1.0, 5.0], &[3]);

    // A second backward through a fresh graph adds to the leaf's gradient:
    // z = Σ 3x, dz/dx = 3, so the slot holds (2x + 1) + 3 = [1, 4, 8].
    (&x * 3.0).sum().backward();
    assert_close(&x.grad().unwrap(), &[1.0, 4.0, 8.0], &[3]);
}

/// A value reused through a longer diamond: u = exp(x), y = Σ (u·u + 2u),
/// dy/dx = (2u + 2)·u = 2e^{2x} + 2e^{x}. At x = [0, ln 2]: u = [1, 2],
/// dy/dx = [2 + 2, 8 + 4] = [4, 12].
#[test]
fn reused_intermediate_accumulates_before_its_backward() {
    let x = tensor(&[0.0, 2f32.ln()], &[2]).requires_grad_(true);
    let u = x.exp();
    let y = (&u * &u + &u * 2.0).sum();
    y.backward();
    assert_close(&x.grad().unwrap(), &[4.0, 12.0], &[2]);
}

/// Cross-entropy of 2×3 logits. Row 0 = [0, ln 2, ln 5] has softmax
/// [1, 2, 5] / 8; row 1 = [0, 0, 0] has softmax [1/3, 1/3, 1/3].
/// Targets [2, 0]:
/// L = -(ln(5/8) + ln(1/3)) / 2 = ln(24/5) / 2 = ln(4.8) / 2
/// dL/dlogits = (softmax - onehot) / n, n = 2:
///   row 0: ([1/8, 2/8, 5/8] - [0, 0, 1]) / 2 = [1/16, 1/8, -3/16]
///   row 1: ([1/3, 1/3, 1/3] - [1, 0, 0]) / 2 = [-1/3, 1/6, 1/6]
/// The gradient, checked by the two tests below.
const CE_EXAMPLE_GRAD: [f32; 6] = [
    1.0 / 16.0,
    1.0 / 8.0,
    -3.0 / 16.0,
    -1.0 / 3.0,
    1.0 / 6.0,
    1.0 / 6.0,
];

#[test]
fn cross_entropy_gradient_is_softmax_minus_onehot_over_n() {
    let logits = tensor(&[0.0, 2f32.ln(), 5f32.ln(), 0.0, 0.0, 0.0], &[2, 3]).requires_grad_(true);
    let targets = tensor(&[2.0, 0.0], &[2]);
    let loss = logits.cross_entropy(&targets);
    assert!((loss.item() - 4.8f32.ln() / 2.0).abs() <= HAND_TOL);
    loss.backward();
    assert_close(&logits.grad().unwrap(), &CE_EXAMPLE_GRAD, &[2, 3]);
}

/// The same example through the unfused graph -mean(onehot · log_softmax):
/// the gradient must agree with the fused op's formula.
#[test]
fn unfused_cross_entropy_matches_the_same_formula() {
    let logits = tensor(&[0.0, 2f32.ln(), 5f32.ln(), 0.0, 0.0, 0.0], &[2, 3]).requires_grad_(true);
    let onehot = tensor(&[0.0, 0.0, 1.0, 1.0, 0.0, 0.0], &[2, 3]);
    // Σ over classes, mean over the 2 rows.
    let loss = -((logits.log_softmax(-1) * &onehot).sum() / 2.0);
    assert!((loss.item() - 4.8f32.ln() / 2.0).abs() <= HAND_TOL);
    loss.backward();
    assert_close(&logits.grad().unwrap(), &CE_EXAMPLE_GRAD, &[2, 3]);
}

/// A bias broadcast over a batch receives the sum over the batch.
/// x = [[1, 2, 3], [4, 5, 6], [7, 8, 9], [10, 11, 12]], b = [0.5, -1, 2],
/// L = ½ Σ_ij (x_ij + b_j)², so dL/db_j = Σ_i (x_ij + b_j)
///   = (column sum of x)_j + 4 b_j = [22 + 2, 26 - 4, 30 + 8] = [24, 22, 38]
/// and dL/dx_ij = x_ij + b_j.
#[test]
fn broadcast_bias_gradient_sums_over_the_batch() {
    let x_values: Vec<f32> = (1..=12).map(|v| v as f32).collect();
    let x = tensor(&x_values, &[4, 3]).requires_grad_(true);
    for bias_shape in [&[3][..], &[1, 3]] {
        x.zero_grad();
        let b = tensor(&[0.5, -1.0, 2.0], bias_shape).requires_grad_(true);
        let loss = (&x + &b).powf(2.0).sum() * 0.5;
        loss.backward();
        assert_close(&b.grad().unwrap(), &[24.0, 22.0, 38.0], bias_shape);
        let expected_x: Vec<f32> = x_values
            .iter()
            .enumerate()
            .map(|(k, v)| v + [0.5, -1.0, 2.0][k % 3])
            .collect();
        assert_close(&x.grad().unwrap(), &expected_x, &[4, 3]);
    }
}

/// A scalar-shaped ([]) operand broadcast against [2, 3] receives the sum of
/// all six upstream gradients: L = Σ s·x, dL/ds = Σ x = 21, dL/dx = s = 2.
#[test]
fn scalar_operand_gradient_sums_every_element() {
    let s = Tensor::scalar(2.0).requires_grad_(true);
    let x = tensor(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3]).requires_grad_(true);
    (&s * &x).sum().backward();
    assert_close(&s.grad().unwrap(), &[21.0], &[]);
    assert_close(&x.grad().unwrap(), &[2.0; 6], &[2, 3]);
}

/// Mean over an axis spreads 1/len: L = Σ_j r_j · mean_i x_ij with x [4, 2]
/// and r = [1, -2] gives dL/dx_ij = r_j / 4 = [0.25, -0.5] on every row.
#[test]
fn mean_axis_gradient_is_spread_evenly() {
    let x = Tensor::zeros(&[4, 2]).requires_grad_(true);
    let r = tensor(&[1.0, -2.0], &[2]);
    (x.mean_axis(0, false) * &r).sum().backward();
    assert_close(&x.grad().unwrap(), &[0.25f32, -0.5].repeat(4), &[4, 2]);
}
