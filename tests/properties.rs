//! Property tests of every op family against a straightforward reference
//! written here (index loops, `f64` where order of summation matters), on
//! random shapes (zero-size dimensions included), broadcasts, axes
//! (negative and out of range included) and values (NaN and ±Inf
//! included); the `try_` forms must never panic, and return `Err` exactly
//! when the reference says the arguments are invalid. Gradients are
//! checked against central differences on random finite inputs.
//!
//! `cargo test --test properties` runs a few seconds of cases. For a long
//! run set `PROPTEST_CASES` (cases per property), in release mode:
//!
//! ```sh
//! PROPTEST_CASES=20000 cargo test --release --test properties
//! ```

use netcl::{Error, Tensor, autograd};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

/// `cases` per property unless `PROPTEST_CASES` says otherwise; failures
/// are reported (shrunk), not written to regression files.
fn config(cases: u32) -> ProptestConfig {
    let mut config = ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = cases;
    }
    config.failure_persistence = None;
    config
}

// ---------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------

/// A value any op must handle: mostly moderate finite numbers, often
/// exactly 0, NaN or an infinity.
fn value() -> impl Strategy<Value = f32> {
    prop_oneof![
        12 => -8.0f32..8.0,
        1 => Just(0.0f32),
        1 => Just(f32::NAN),
        1 => Just(f32::INFINITY),
        1 => Just(f32::NEG_INFINITY),
    ]
}

fn shape(max_ndim: usize, max_len: usize) -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(0..=max_len, 0..=max_ndim)
}

fn tensor_of(shape: Vec<usize>) -> impl Strategy<Value = Tensor> {
    let n: usize = shape.iter().product();
    prop::collection::vec(value(), n).prop_map(move |v| Tensor::from_vec(v, &shape).unwrap())
}

fn any_tensor() -> impl Strategy<Value = Tensor> {
    shape(3, 4).prop_flat_map(tensor_of)
}

/// Two shapes that usually broadcast: one derived from the other by
/// setting lengths to 1 and dropping leading axes, sometimes spoiled.
fn broadcast_shapes() -> impl Strategy<Value = (Vec<usize>, Vec<usize>)> {
    (
        shape(3, 4),
        prop::collection::vec(0..3u8, 3),
        0..=3usize,
        any::<bool>(),
        0..8u8,
    )
        .prop_map(|(base, modes, drop, swap, spoil)| {
            let mut other: Vec<usize> = base
                .iter()
                .zip(&modes)
                .map(|(&len, &mode)| if mode == 0 { 1 } else { len })
                .collect();
            other.drain(..drop.min(other.len()));
            if spoil == 0 && !other.is_empty() {
                other[0] += 2;
            }
            if swap { (other, base) } else { (base, other) }
        })
}

fn tensor_pair(shapes: (Vec<usize>, Vec<usize>)) -> impl Strategy<Value = (Tensor, Tensor)> {
    (tensor_of(shapes.0), tensor_of(shapes.1))
}

// ---------------------------------------------------------------------------
// Reference helpers
// ---------------------------------------------------------------------------

fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

/// The multi-index of row-major position `i`.
fn unravel(mut i: usize, shape: &[usize]) -> Vec<usize> {
    let mut index = vec![0; shape.len()];
    for (axis, &len) in shape.iter().enumerate().rev() {
        index[axis] = i % len;
        i /= len;
    }
    index
}

/// The row-major position of `index`.
fn ravel(index: &[usize], shape: &[usize]) -> usize {
    index
        .iter()
        .zip(shape)
        .fold(0, |acc, (&i, &len)| acc * len + i)
}

/// The position in an operand of `shape` broadcast to `out_index`.
fn broadcast_position(out_index: &[usize], shape: &[usize]) -> usize {
    let skip = out_index.len() - shape.len();
    let index: Vec<usize> = shape
        .iter()
        .enumerate()
        .map(|(axis, &len)| if len == 1 { 0 } else { out_index[skip + axis] })
        .collect();
    ravel(&index, shape)
}

fn ref_broadcast(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let ndim = a.len().max(b.len());
    (0..ndim)
        .map(|i| {
            let l = (i + a.len()).checked_sub(ndim).map_or(1, |j| a[j]);
            let r = (i + b.len()).checked_sub(ndim).map_or(1, |j| b[j]);
            match (l, r) {
                (l, r) if l == r => Some(l),
                (1, r) => Some(r),
                (l, 1) => Some(l),
                _ => None,
            }
        })
        .collect()
}

fn ref_axis(axis: isize, ndim: usize) -> Option<usize> {
    let resolved = if axis < 0 { axis + ndim as isize } else { axis };
    (0..ndim as isize)
        .contains(&resolved)
        .then_some(resolved as usize)
}

/// `got` equals `want` bit for bit, or both are NaN.
fn same(got: f32, want: f32) -> bool {
    (got.is_nan() && want.is_nan()) || got == want
}

/// `got` is within rounding of `want` (computed in f64); NaN and
/// infinities must match exactly.
fn close(got: f32, want: f64) -> bool {
    if want.is_nan() {
        return got.is_nan();
    }
    if want.is_infinite() {
        return f64::from(got) == want;
    }
    (f64::from(got) - want).abs() <= 1e-4 * (1.0 + want.abs())
}

fn check_all(what: &str, got: &Tensor, shape: &[usize], want: &[f64]) -> Result<(), TestCaseError> {
    prop_assert_eq!(got.shape(), shape, "{}: shape", what);
    let values = got.to_vec();
    for (k, (&g, &w)) in values.iter().zip(want).enumerate() {
        prop_assert!(
            close(g, w),
            "{}: element {} is {}, expected {}",
            what,
            k,
            g,
            w
        );
    }
    Ok(())
}

/// As [`check_exact`], but each finite value may differ from `want` by up
/// to `ulps` steps between adjacent f32 values (NaN, infinities and the
/// sign still exact).
fn check_ulps(
    what: &str,
    got: &Tensor,
    shape: &[usize],
    want: &[f32],
    ulps: u32,
) -> Result<(), TestCaseError> {
    prop_assert_eq!(got.shape(), shape, "{}: shape", what);
    let values = got.to_vec();
    for (k, (&g, &w)) in values.iter().zip(want).enumerate() {
        let near = same(g, w)
            || (g.is_finite()
                && w.is_finite()
                && (g.is_sign_negative() == w.is_sign_negative())
                && g.to_bits().abs_diff(w.to_bits()) <= ulps)
            || (g.is_infinite() != w.is_infinite()
                && g.is_sign_negative() == w.is_sign_negative()
                && g.to_bits().abs_diff(w.to_bits()) <= ulps);
        prop_assert!(
            near,
            "{}: element {} is {}, expected {} within {} ulp",
            what,
            k,
            g,
            w,
            ulps
        );
    }
    Ok(())
}

fn check_exact(
    what: &str,
    got: &Tensor,
    shape: &[usize],
    want: &[f32],
) -> Result<(), TestCaseError> {
    prop_assert_eq!(got.shape(), shape, "{}: shape", what);
    let values = got.to_vec();
    for (k, (&g, &w)) in values.iter().zip(want).enumerate() {
        prop_assert!(
            same(g, w),
            "{}: element {} is {}, expected {}",
            what,
            k,
            g,
            w
        );
    }
    Ok(())
}

/// The lanes along `axis`: for each position of the other axes (row-major),
/// the row-major positions of the lane's elements.
fn lanes(shape: &[usize], axis: usize) -> Vec<Vec<usize>> {
    let mut outer = shape.to_vec();
    outer[axis] = 1;
    (0..numel(&outer))
        .map(|o| {
            let mut index = unravel(o, &outer);
            (0..shape[axis])
                .map(|i| {
                    index[axis] = i;
                    ravel(&index, shape)
                })
                .collect()
        })
        .collect()
}

fn reduced_shape(shape: &[usize], axis: usize, keepdim: bool) -> Vec<usize> {
    let mut out = shape.to_vec();
    if keepdim {
        out[axis] = 1;
    } else {
        out.remove(axis);
    }
    out
}

/// Log-softmax of one lane in f64 with netcl's documented semantics: NaN
/// anywhere makes the lane NaN; beside `+inf` the finite entries are `-inf`
/// and the `+inf` ones NaN; a lane of only `-inf` is NaN.
fn ref_log_softmax(lane: &[f32]) -> Vec<f64> {
    let n = lane.len();
    if lane.iter().any(|v| v.is_nan()) {
        return vec![f64::NAN; n];
    }
    let max = lane
        .iter()
        .fold(f64::NEG_INFINITY, |m, &v| m.max(f64::from(v)));
    if max == f64::INFINITY {
        return lane
            .iter()
            .map(|&v| {
                if v == f32::INFINITY {
                    f64::NAN
                } else {
                    f64::NEG_INFINITY
                }
            })
            .collect();
    }
    if max == f64::NEG_INFINITY {
        return vec![f64::NAN; n];
    }
    let lse = max
        + lane
            .iter()
            .map(|&v| (f64::from(v) - max).exp())
            .sum::<f64>()
            .ln();
    lane.iter().map(|&v| f64::from(v) - lse).collect()
}

// ---------------------------------------------------------------------------
// Forward properties: every op against its reference
// ---------------------------------------------------------------------------

type Binary = fn(&Tensor, &Tensor) -> netcl::Result<Tensor>;
/// An op's name, its result and the reference for one element.
type BinaryCase = (&'static str, Binary, fn(f32, f32) -> f32);
type UnaryCase = (&'static str, Tensor, fn(f32) -> f32);
type ScalarCase = (&'static str, Tensor, fn(f32, f32) -> f32);

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn binary_ops_broadcast_like_the_reference((a, b) in broadcast_shapes().prop_flat_map(tensor_pair)) {
        let ops: [BinaryCase; 7] = [
            ("add", Tensor::try_add, |x, y| x + y),
            ("sub", Tensor::try_sub, |x, y| x - y),
            ("mul", Tensor::try_mul, |x, y| x * y),
            ("div", Tensor::try_div, |x, y| x / y),
            ("eq", Tensor::try_eq, |x, y| f32::from(u8::from(x == y))),
            ("gt", Tensor::try_gt, |x, y| f32::from(u8::from(x > y))),
            ("lt", Tensor::try_lt, |x, y| f32::from(u8::from(x < y))),
        ];
        let (av, bv) = (a.to_vec(), b.to_vec());
        for (name, op, f) in ops {
            let result = op(&a, &b);
            match ref_broadcast(a.shape(), b.shape()) {
                None => prop_assert!(
                    matches!(result, Err(Error::Broadcast { .. })),
                    "{}: {:?}", name, result
                ),
                Some(shape) => {
                    let got = result.map_err(|e| TestCaseError::fail(format!("{name}: {e}")))?;
                    let want: Vec<f32> = (0..numel(&shape))
                        .map(|i| {
                            let index = unravel(i, &shape);
                            f(
                                av[broadcast_position(&index, a.shape())],
                                bv[broadcast_position(&index, b.shape())],
                            )
                        })
                        .collect();
                    check_exact(name, &got, &shape, &want)?;
                }
            }
        }
    }

    #[test]
    fn unary_and_scalar_ops_match_the_reference(x in any_tensor(), p in prop_oneof![
        Just(0.0f32), Just(1.0), Just(2.0), Just(3.0), Just(0.5), Just(-1.0), Just(-2.5)
    ], s in value()) {
        let xs = x.to_vec();
        let unary: [UnaryCase; 9] = [
            ("exp", x.exp(), f32::exp),
            ("log", x.log(), f32::ln),
            ("sqrt", x.sqrt(), f32::sqrt),
            ("abs", x.abs(), f32::abs),
            ("neg", x.neg(), |v| -v),
            ("relu", x.relu(), |v| if v > 0.0 || v.is_nan() { v } else { 0.0 }),
            ("sigmoid", x.sigmoid(), |v| 1.0 / (1.0 + (-v).exp())),
            ("tanh", x.tanh(), f32::tanh),
            ("powf", x.powf(p), |v| v),
        ];
        for (name, got, f) in unary {
            let want: Vec<f32> = if name == "powf" {
                xs.iter().map(|v| v.powf(p)).collect()
            } else {
                xs.iter().map(|&v| f(v)).collect()
            };
            if matches!(name, "exp" | "sigmoid" | "tanh") {
                // Vectorised kernels: within 3 ulp of the exact value
                // (src/ops/vectorized.rs), so within 4 of libm's f32.
                check_ulps(name, &got, x.shape(), &want, 4)?;
            } else {
                check_exact(name, &got, x.shape(), &want)?;
            }
        }
        let scalar: [ScalarCase; 6] = [
            ("add_scalar", x.add_scalar(s), |v, s| v + s),
            ("sub_scalar", x.sub_scalar(s), |v, s| v - s),
            ("rsub_scalar", x.rsub_scalar(s), |v, s| s - v),
            ("mul_scalar", x.mul_scalar(s), |v, s| v * s),
            ("div_scalar", x.div_scalar(s), |v, s| v / s),
            ("rdiv_scalar", x.rdiv_scalar(s), |v, s| s / v),
        ];
        for (name, got, f) in scalar {
            let want: Vec<f32> = xs.iter().map(|&v| f(v, s)).collect();
            check_exact(name, &got, x.shape(), &want)?;
        }
    }

    #[test]
    fn reductions_match_the_reference(x in any_tensor(), axis in -4isize..4, keepdim in any::<bool>()) {
        let xs = x.to_vec();
        let total: f64 = xs.iter().map(|&v| f64::from(v)).sum();
        check_all("sum", &x.sum(), &[], &[total])?;
        check_all("mean", &x.mean(), &[], &[total / xs.len() as f64])?;

        let results = [
            ("sum_axis", x.try_sum_axis(axis, keepdim)),
            ("mean_axis", x.try_mean_axis(axis, keepdim)),
            ("max_axis", x.try_max_axis(axis, keepdim)),
            ("argmax", x.try_argmax(axis)),
        ];
        let Some(ax) = ref_axis(axis, x.ndim()) else {
            for (name, result) in results {
                prop_assert!(matches!(result, Err(Error::Axis { .. })), "{}: {:?}", name, result);
            }
            return Ok(());
        };
        let lanes = lanes(x.shape(), ax);
        let shape = reduced_shape(x.shape(), ax, keepdim);
        let sums: Vec<f64> = lanes.iter().map(|l| l.iter().map(|&i| f64::from(xs[i])).sum()).collect();
        let means: Vec<f64> = lanes.iter().zip(&sums).map(|(l, s)| s / l.len() as f64).collect();
        // PyTorch's rule: the first NaN of a lane, else the first maximum.
        let argmax: Vec<usize> = lanes
            .iter()
            .map(|l| {
                let mut best = 0;
                for (k, &i) in l.iter().enumerate() {
                    let (v, b) = (xs[i], xs[l[best]]);
                    if !b.is_nan() && (v.is_nan() || v > b) {
                        best = k;
                    }
                }
                best
            })
            .collect();
        for (name, result) in results {
            if x.shape()[ax] == 0 && (name == "max_axis" || name == "argmax") {
                prop_assert!(
                    matches!(result, Err(Error::InvalidArgument { .. })),
                    "{}: {:?}", name, result
                );
                continue;
            }
            let got = result.map_err(|e| TestCaseError::fail(format!("{name}: {e}")))?;
            match name {
                "sum_axis" => check_all(name, &got, &shape, &sums)?,
                "mean_axis" => check_all(name, &got, &shape, &means)?,
                "max_axis" => {
                    let want: Vec<f32> = lanes.iter().zip(&argmax).map(|(l, &k)| xs[l[k]]).collect();
                    check_exact(name, &got, &shape, &want)?;
                }
                _ => {
                    let want: Vec<f32> = argmax.iter().map(|&k| k as f32).collect();
                    check_exact(name, &got, &reduced_shape(x.shape(), ax, false), &want)?;
                }
            }
        }
    }

    #[test]
    fn softmax_and_log_softmax_match_the_reference(x in any_tensor(), axis in -4isize..4) {
        let soft = x.try_softmax(axis);
        let log = x.try_log_softmax(axis);
        let Some(ax) = ref_axis(axis, x.ndim()) else {
            prop_assert!(matches!(soft, Err(Error::Axis { .. })), "{:?}", soft);
            prop_assert!(matches!(log, Err(Error::Axis { .. })), "{:?}", log);
            return Ok(());
        };
        let xs = x.to_vec();
        let mut want_log = vec![0.0; xs.len()];
        for lane in lanes(x.shape(), ax) {
            let values: Vec<f32> = lane.iter().map(|&i| xs[i]).collect();
            for (&i, v) in lane.iter().zip(ref_log_softmax(&values)) {
                want_log[i] = v;
            }
        }
        let want_soft: Vec<f64> = want_log.iter().map(|v| v.exp()).collect();
        check_all("softmax", &soft.unwrap(), x.shape(), &want_soft)?;
        check_all("log_softmax", &log.unwrap(), x.shape(), &want_log)?;
    }

    #[test]
    fn cross_entropy_matches_the_reference(
        logits in prop_oneof![
            4 => (0..4usize, 0..4usize).prop_flat_map(|(n, c)| tensor_of(vec![n, c])),
            1 => any_tensor(),
        ],
        targets in prop::collection::vec(
            prop_oneof![
                8 => (0..4u8).prop_map(f32::from),
                1 => Just(-1.0f32),
                1 => Just(0.5f32),
                1 => Just(f32::NAN),
            ],
            0..5,
        ),
    ) {
        let t = Tensor::from_vec(targets.clone(), &[targets.len()]).unwrap();
        let result = logits.try_cross_entropy(&t);
        if logits.ndim() != 2 {
            prop_assert!(matches!(result, Err(Error::Rank { .. })), "{:?}", result);
            return Ok(());
        }
        let (n, c) = (logits.shape()[0], logits.shape()[1]);
        if targets.len() != n {
            prop_assert!(matches!(result, Err(Error::ShapeMismatch { .. })), "{:?}", result);
            return Ok(());
        }
        if let Some(index) = targets
            .iter()
            .position(|&v| !(v >= 0.0 && v.fract() == 0.0 && (v as usize) < c))
        {
            prop_assert!(
                matches!(result, Err(Error::InvalidTarget { index: i, .. }) if i == index),
                "{:?}", result
            );
            return Ok(());
        }
        let xs = logits.to_vec();
        let total: f64 = (0..n)
            .map(|i| -ref_log_softmax(&xs[i * c..(i + 1) * c])[targets[i] as usize])
            .sum();
        check_all("cross_entropy", &result.unwrap(), &[], &[total / n as f64])?;
    }

    #[test]
    fn mse_loss_matches_the_reference((a, b) in broadcast_shapes().prop_flat_map(tensor_pair)) {
        let result = a.try_mse_loss(&b);
        if a.shape() != b.shape() {
            prop_assert!(matches!(result, Err(Error::ShapeMismatch { .. })), "{:?}", result);
            return Ok(());
        }
        let (av, bv) = (a.to_vec(), b.to_vec());
        // The difference in f32 (as netcl and PyTorch take it), squared and
        // summed in f64.
        let sum: f64 = av.iter().zip(&bv).map(|(&x, &y)| f64::from(x - y).powi(2)).sum();
        check_all("mse_loss", &result.unwrap(), &[], &[sum / av.len() as f64])?;
    }

    #[test]
    fn matmul_and_linear_match_the_reference(
        (batch_a, batch_b) in broadcast_shapes().prop_map(|(a, b)| {
            (a.into_iter().take(2).collect::<Vec<_>>(), b.into_iter().take(2).collect::<Vec<_>>())
        }),
        (m, k, n) in (0..4usize, 0..4usize, 0..4usize),
        spoil in 0..10u8,
        rank in 0..8u8,
        seed in any::<u64>(),
    ) {
        let k_b = if spoil == 0 { k + 1 } else { k };
        let mut shape_a = batch_a.clone();
        shape_a.extend([m, k]);
        let mut shape_b = batch_b.clone();
        shape_b.extend([k_b, n]);
        if rank == 0 {
            // A vector: PyTorch's 1-D rule, a row [1, k] whose axis the
            // result drops.
            shape_a = vec![k];
        }
        let a = filled(&shape_a, seed);
        let b = filled(&shape_b, seed ^ 1);
        let result = a.try_matmul(&b);
        let batch = ref_broadcast(&batch_a, &batch_b);
        if rank == 0 && k_b == k {
            let (av, bv) = (a.to_vec(), b.to_vec());
            let mut shape = batch_b.clone();
            shape.push(n);
            let want: Vec<f64> = (0..numel(&shape))
                .map(|pos| {
                    let index = unravel(pos, &shape);
                    let (bi, j) = (&index[..batch_b.len()], index[batch_b.len()]);
                    (0..k)
                        .map(|p| {
                            let mut ib = bi.to_vec();
                            ib.extend([p, j]);
                            f64::from(av[p]) * f64::from(bv[broadcast_position(&ib, &shape_b)])
                        })
                        .sum()
                })
                .collect();
            let got = result.map_err(|e| TestCaseError::fail(format!("matmul: {e}")))?;
            check_all("matmul", &got, &shape, &want)?;
        } else if k_b != k {
            prop_assert!(matches!(result, Err(Error::MatmulShape { .. })), "{:?}", result);
        } else if let Some(batch) = batch {
            let mut shape = batch.clone();
            shape.extend([m, n]);
            let (av, bv) = (a.to_vec(), b.to_vec());
            let want: Vec<f64> = (0..numel(&shape))
                .map(|pos| {
                    let index = unravel(pos, &shape);
                    let (bi, (i, j)) = (&index[..batch.len()], (index[batch.len()], index[batch.len() + 1]));
                    (0..k)
                        .map(|p| {
                            let mut ia = bi.to_vec();
                            ia.extend([i, p]);
                            let mut ib = bi.to_vec();
                            ib.extend([p, j]);
                            f64::from(av[broadcast_position(&ia, &shape_a)])
                                * f64::from(bv[broadcast_position(&ib, &shape_b)])
                        })
                        .sum()
                })
                .collect();
            check_all("matmul", &result.unwrap(), &shape, &want)?;
        } else {
            prop_assert!(matches!(result, Err(Error::Broadcast { .. })), "{:?}", result);
        }

        // linear: x [batch_a.., m, k] · w [k_b, n] + bias [n], bias sometimes
        // of the wrong length.
        let x = filled(&{ let mut s = batch_a.clone(); s.extend([m, k]); s }, seed ^ 2);
        let w = filled(&[k_b, n], seed ^ 3);
        let bias_len = if spoil == 1 { n + 1 } else { n };
        let bias = (rank % 2 == 1).then(|| filled(&[bias_len], seed ^ 4));
        let result = x.try_linear(&w, bias.as_ref());
        if k_b != k {
            prop_assert!(matches!(result, Err(Error::MatmulShape { .. })), "{:?}", result);
        } else if bias.is_some() && bias_len != n {
            prop_assert!(matches!(result, Err(Error::ShapeMismatch { .. })), "{:?}", result);
        } else {
            let got = result.map_err(|e| TestCaseError::fail(format!("linear: {e}")))?;
            let mut want = x.matmul(&w);
            if let Some(bias) = &bias {
                want = want.add(bias);
            }
            let want: Vec<f64> = want.to_vec().into_iter().map(f64::from).collect();
            check_all("linear", &got, &want_shape(&x, n), &want)?;
        }
    }

    #[test]
    fn reshape_and_transpose_move_values_like_the_reference(
        x in any_tensor(),
        target in shape(4, 6),
        (axis0, axis1) in (-4isize..4, -4isize..4),
    ) {
        let xs = x.to_vec();
        let result = x.try_reshape(&target);
        if numel(&target) == xs.len() {
            check_exact("reshape", &result.unwrap(), &target, &xs)?;
        } else {
            prop_assert!(matches!(result, Err(Error::ElementCount { .. })), "{:?}", result);
        }
        let result = x.try_transpose(axis0, axis1);
        match (ref_axis(axis0, x.ndim()), ref_axis(axis1, x.ndim())) {
            (Some(a), Some(b)) => {
                let mut shape = x.shape().to_vec();
                shape.swap(a, b);
                let want: Vec<f32> = (0..xs.len())
                    .map(|pos| {
                        let mut index = unravel(pos, &shape);
                        index.swap(a, b);
                        xs[ravel(&index, x.shape())]
                    })
                    .collect();
                check_exact("transpose", &result.unwrap(), &shape, &want)?;
            }
            _ => prop_assert!(matches!(result, Err(Error::Axis { .. })), "{:?}", result),
        }
    }
}

/// The shape of `x.linear(w)` with `n` output features.
fn want_shape(x: &Tensor, n: usize) -> Vec<usize> {
    let mut shape = x.shape().to_vec();
    *shape.last_mut().unwrap() = n;
    shape
}

/// A tensor of `shape` with values in [-2, 2) from a cheap generator, and
/// now and then a NaN or an infinity.
fn filled(shape: &[usize], seed: u64) -> Tensor {
    let mut state = seed | 1;
    let values = (0..numel(shape))
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            match state % 64 {
                0 => f32::NAN,
                1 => f32::INFINITY,
                2 => f32::NEG_INFINITY,
                r => (r as f32 - 32.0) / 16.0,
            }
        })
        .collect();
    Tensor::from_vec(values, shape).unwrap()
}

// ---------------------------------------------------------------------------
// Shapes at the limits: errors, never panics
// ---------------------------------------------------------------------------

fn extreme_len() -> impl Strategy<Value = usize> {
    prop_oneof![
        Just(0usize),
        Just(1),
        Just(3),
        Just(1 << 31),
        Just(1 << 40),
        Just(1 << 62),
        Just((1 << 63) + 1),
        Just(usize::MAX),
    ]
}

/// The product of the non-zero lengths, if it fits netcl's limit.
fn fits(shape: &[usize]) -> bool {
    shape
        .iter()
        .filter(|&&len| len != 0)
        .try_fold(1usize, |p, &len| p.checked_mul(len))
        .is_some_and(|p| p <= Tensor::MAX_ELEMENTS)
}

proptest! {
    #![proptest_config(config(256))]

    /// Empty tensors with huge axes: every `try_` op returns, `Ok` exactly
    /// when its result's shape can exist. (Results with elements are only
    /// computed when small: a valid shape that the memory cannot hold
    /// aborts, as any allocation does.)
    #[test]
    fn extreme_shapes_are_errors_not_panics(
        a in prop::collection::vec(extreme_len(), 1..4),
        b in prop::collection::vec(extreme_len(), 1..4),
        axis in -4isize..4,
    ) {
        let mut a = a;
        a[0] = 0; // zero elements, so the values fit in memory whatever the shape
        let ta = Tensor::from_vec(vec![], &a);
        prop_assert_eq!(ta.is_ok(), fits(&a), "from_vec {:?}: {:?}", a, ta);
        let Ok(ta) = ta else { return Ok(()) };
        let reshaped = ta.try_reshape(&b);
        let b_numel = b.iter().try_fold(1usize, |p, &l| p.checked_mul(l));
        prop_assert_eq!(reshaped.is_ok(), fits(&b) && b_numel == Some(0), "reshape {:?}: {:?}", b, reshaped);
        let _ = ta.try_transpose(axis, 0);
        let _ = ta.try_softmax(axis);
        let _ = ta.try_log_softmax(axis);
        let mut zb = b.clone();
        *zb.last_mut().unwrap() = 0;
        if let Ok(tb) = Tensor::from_vec(vec![], &zb) {
            for (name, result) in [("add", ta.try_add(&tb)), ("mul", ta.try_mul(&tb)), ("gt", ta.try_gt(&tb))] {
                match ref_broadcast(&a, &zb) {
                    None => prop_assert!(matches!(result, Err(Error::Broadcast { .. })), "{}", name),
                    Some(shape) => prop_assert_eq!(result.is_ok(), fits(&shape), "{} {:?}", name, shape),
                }
            }
            if a.len() >= 2 && zb.len() >= 2 {
                let batch = ref_broadcast(&a[..a.len() - 2], &zb[..zb.len() - 2]);
                let inner_ok = a[a.len() - 1] == zb[zb.len() - 2];
                if let (Some(mut out), true) = (batch, inner_ok) {
                    out.extend([a[a.len() - 2], zb[zb.len() - 1]]);
                    if !fits(&out) || numel(&out) <= 1 << 16 {
                        prop_assert_eq!(ta.try_matmul(&tb).is_ok(), fits(&out), "matmul {:?}", out);
                    }
                } else {
                    prop_assert!(ta.try_matmul(&tb).is_err());
                }
            }
        }
        if let Some(ax) = ref_axis(axis, a.len()) {
            let out = reduced_shape(&a, ax, false);
            if numel(&out) <= 1 << 16 {
                prop_assert!(ta.try_sum_axis(axis, true).is_ok());
                prop_assert!(ta.try_mean_axis(axis, false).is_ok());
                prop_assert_eq!(ta.try_max_axis(axis, false).is_ok(), a[ax] != 0);
                prop_assert_eq!(ta.try_argmax(axis).is_ok(), a[ax] != 0);
            }
        } else {
            prop_assert!(ta.try_sum_axis(axis, false).is_err());
        }
        prop_assert!(ta.mean().item().is_nan());
        prop_assert_eq!(ta.sum().item(), 0.0);
    }

    #[test]
    fn arange_returns_or_errs_never_panics(
        start in prop_oneof![-1e3f32..1e3, Just(f32::MAX), Just(f32::MIN), Just(f32::NAN), Just(0.0)],
        end in prop_oneof![-1e3f32..1e3, Just(f32::MAX), Just(f32::MIN), Just(f32::INFINITY), Just(0.0)],
        step in prop_oneof![-10f32..10.0, Just(0.0), Just(1e-30), Just(-1e-30), Just(f32::MIN_POSITIVE)],
    ) {
        let count = (f64::from(end) - f64::from(start)) / f64::from(step);
        let small = count.is_finite() && count.ceil() <= 1e6;
        match Tensor::try_arange(start, end, step) {
            Ok(t) => {
                prop_assert!(small, "{} elements", t.numel());
                prop_assert_eq!(t.numel() as f64, count.ceil().max(0.0));
            }
            Err(e) => {
                prop_assert!(matches!(e, Error::InvalidArgument { op: "arange", .. }), "{:?}", e);
                prop_assert!(!small || step == 0.0, "{}", e);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Gradients: central differences on random finite inputs
// ---------------------------------------------------------------------------

/// Finite-difference step and tolerances, as in tests/gradcheck.rs (whose
/// module docs derive them); inputs here are as small and as bounded.
const STEP: f32 = 1e-2;
const ATOL: f64 = 1e-3;
const RTOL: f64 = 5e-3;

/// Checks the gradients of `f` with respect to every input against central
/// differences of `L = Σ r_k f(x)_k` with a fixed weighting `r`.
fn gradcheck(inputs: &[Tensor], f: impl Fn(&[Tensor]) -> Tensor) -> Result<(), TestCaseError> {
    let out_shape = {
        let _guard = autograd::no_grad();
        f(inputs).shape().to_vec()
    };
    let r: Vec<f32> = (0..numel(&out_shape))
        .map(|k| ((k as f32) * 0.7 + 0.3).sin() * 1.5)
        .collect();
    let r_tensor = Tensor::from_vec(r.clone(), &out_shape).unwrap();
    let leaves: Vec<Tensor> = inputs
        .iter()
        .map(|t| {
            Tensor::from_vec(t.to_vec(), t.shape())
                .unwrap()
                .requires_grad_(true)
        })
        .collect();
    let loss = (f(&leaves) * &r_tensor).sum();
    let targets: Vec<&Tensor> = leaves.iter().collect();
    let grads =
        autograd::grad(&[&loss], &targets).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let weighted = |args: &[Tensor]| -> f64 {
        f(args)
            .to_vec()
            .iter()
            .zip(&r)
            .map(|(&y, &r)| f64::from(y) * f64::from(r))
            .sum()
    };
    let _guard = autograd::no_grad();
    for (i, (x, grad)) in inputs.iter().zip(&grads).enumerate() {
        prop_assert_eq!(grad.shape(), x.shape());
        let base = x.to_vec();
        let analytic = grad.to_vec();
        for j in 0..base.len() {
            let eval = |v: f32| {
                let mut values = base.clone();
                values[j] = v;
                let mut args = inputs.to_vec();
                args[i] = Tensor::from_vec(values, x.shape()).unwrap();
                weighted(&args)
            };
            let (plus, minus) = (base[j] + STEP, base[j] - STEP);
            let numeric = (eval(plus) - eval(minus)) / f64::from(plus - minus);
            let a = f64::from(analytic[j]);
            prop_assert!(
                (a - numeric).abs() <= ATOL + RTOL * numeric.abs(),
                "input {} {:?} element {}: analytic {}, numeric {}",
                i,
                x.shape(),
                j,
                a,
                numeric
            );
        }
    }
    Ok(())
}

fn finite_tensor(shape: Vec<usize>, lo: f32, hi: f32) -> impl Strategy<Value = Tensor> {
    let n = numel(&shape);
    prop::collection::vec(lo..hi, n).prop_map(move |v| Tensor::from_vec(v, &shape).unwrap())
}

/// Values at least 0.2 from 0 (no difference straddles a kink at 0).
fn away_from_zero(shape: Vec<usize>) -> impl Strategy<Value = Tensor> {
    let n = numel(&shape);
    prop::collection::vec((0.2f32..2.0, any::<bool>()), n).prop_map(move |v| {
        let values = v
            .into_iter()
            .map(|(m, neg)| if neg { -m } else { m })
            .collect();
        Tensor::from_vec(values, &shape).unwrap()
    })
}

/// Distinct values 0.3 apart, shuffled: every lane has a unique maximum
/// far from the others.
fn distinct(shape: Vec<usize>) -> impl Strategy<Value = Tensor> {
    let n = numel(&shape);
    Just((0..n).map(|i| i as f32 * 0.3 - 1.5).collect::<Vec<_>>())
        .prop_shuffle()
        .prop_map(move |v| Tensor::from_vec(v, &shape).unwrap())
}

fn small_shape() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(1..=3usize, 1..=3)
}

fn grad_pair() -> impl Strategy<Value = (Tensor, Tensor)> {
    broadcast_shapes()
        .prop_filter("compatible, non-empty", |(a, b)| {
            ref_broadcast(a, b).is_some() && numel(a) > 0 && numel(b) > 0 && numel(a) <= 27
        })
        .prop_flat_map(|(a, b)| (finite_tensor(a, -2.0, 2.0), away_from_zero(b)))
}

proptest! {
    #![proptest_config(config(64))]

    #[test]
    fn unary_gradients_match_finite_differences(
        x in small_shape().prop_flat_map(|s| finite_tensor(s, -2.0, 2.0)),
        pos in small_shape().prop_flat_map(|s| finite_tensor(s, 0.5, 3.0)),
        kinked in small_shape().prop_flat_map(away_from_zero),
        p in prop_oneof![Just(0.0f32), Just(1.0), Just(2.0), Just(3.0)],
        q in prop_oneof![Just(0.5f32), Just(-1.0), Just(-2.5), Just(1.5)],
    ) {
        gradcheck(std::slice::from_ref(&x), |a| a[0].exp())?;
        gradcheck(std::slice::from_ref(&x), |a| a[0].tanh())?;
        gradcheck(std::slice::from_ref(&x), |a| a[0].sigmoid())?;
        gradcheck(std::slice::from_ref(&x), |a| a[0].powf(p))?;
        gradcheck(std::slice::from_ref(&x), |a| a[0].neg())?;
        gradcheck(std::slice::from_ref(&x), |a| (&a[0] * 1.5 + 2.0 - 0.5) / 3.0)?;
        gradcheck(std::slice::from_ref(&pos), |a| a[0].log())?;
        gradcheck(std::slice::from_ref(&pos), |a| a[0].sqrt())?;
        gradcheck(std::slice::from_ref(&pos), |a| a[0].powf(q))?;
        gradcheck(std::slice::from_ref(&pos), |a| 2.0 / &a[0])?;
        gradcheck(std::slice::from_ref(&kinked), |a| a[0].relu())?;
        gradcheck(std::slice::from_ref(&kinked), |a| a[0].abs())?;
    }

    #[test]
    fn binary_gradients_match_finite_differences((a, b) in grad_pair(), swap in any::<bool>()) {
        let inputs = if swap { [b.clone(), a.clone()] } else { [a.clone(), b.clone()] };
        gradcheck(&inputs, |t| t[0].add(&t[1]))?;
        gradcheck(&inputs, |t| t[0].sub(&t[1]))?;
        gradcheck(&inputs, |t| t[0].mul(&t[1]))?;
        // Denominator away from 0.
        gradcheck(&[a.clone(), b.clone()], |t| t[0].div(&t[1]))?;
        if a.shape() == b.shape() {
            gradcheck(&[a, b], |t| t[0].mse_loss(&t[1]))?;
        }
    }

    #[test]
    fn reduction_and_softmax_gradients_match_finite_differences(
        x in small_shape().prop_flat_map(|s| finite_tensor(s, -2.0, 2.0)),
        d in small_shape().prop_flat_map(distinct),
        axis in -3isize..3,
        keepdim in any::<bool>(),
    ) {
        gradcheck(std::slice::from_ref(&x), |a| a[0].sum())?;
        gradcheck(std::slice::from_ref(&x), |a| a[0].mean())?;
        if ref_axis(axis, x.ndim()).is_some() {
            gradcheck(std::slice::from_ref(&x), |a| a[0].sum_axis(axis, keepdim))?;
            gradcheck(std::slice::from_ref(&x), |a| a[0].mean_axis(axis, keepdim))?;
            gradcheck(std::slice::from_ref(&x), |a| a[0].softmax(axis))?;
            gradcheck(std::slice::from_ref(&x), |a| a[0].log_softmax(axis))?;
            gradcheck(std::slice::from_ref(&x), |a| a[0].transpose(axis, 0))?;
        }
        if ref_axis(axis, d.ndim()).is_some() {
            gradcheck(std::slice::from_ref(&d), |a| a[0].max_axis(axis, keepdim))?;
        }
        let n = x.numel();
        gradcheck(std::slice::from_ref(&x), |a| a[0].reshape(&[n, 1]))?;
    }

    #[test]
    fn matmul_linear_and_loss_gradients_match_finite_differences(
        (batch_a, batch_b) in broadcast_shapes()
            .prop_map(|(a, b)| (a.into_iter().take(2).map(|l| l.clamp(1, 2)).collect::<Vec<_>>(),
                                b.into_iter().take(2).map(|l| l.clamp(1, 2)).collect::<Vec<_>>()))
            .prop_filter("batch axes broadcast", |(a, b)| ref_broadcast(a, b).is_some()),
        (m, k, n) in (1..=3usize, 1..=3usize, 1..=3usize),
        seed in any::<u64>(),
        targets in prop::collection::vec(0..3u8, 3),
    ) {
        let values = |shape: &[usize], salt: u64| {
            let mut state = (seed ^ salt) | 1;
            let v = (0..numel(shape)).map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state % 4001) as f32 / 1000.0 - 2.0
            }).collect();
            Tensor::from_vec(v, shape).unwrap()
        };
        let a = values(&[batch_a.clone(), vec![m, k]].concat(), 1);
        let b = values(&[batch_b.clone(), vec![k, n]].concat(), 2);
        gradcheck(&[a.clone(), b], |t| t[0].matmul(&t[1]))?;
        let w = values(&[k, n], 3);
        let bias = values(&[n], 4);
        gradcheck(&[a, w, bias], |t| t[0].linear(&t[1], Some(&t[2])))?;
        let logits = values(&[3, n.max(2)], 5);
        let classes = n.max(2);
        let t = Tensor::from_vec(
            targets.iter().map(|&c| f32::from(c % classes as u8)).collect(),
            &[3],
        ).unwrap();
        gradcheck(&[logits], |l| l[0].cross_entropy(&t))?;
    }
}
