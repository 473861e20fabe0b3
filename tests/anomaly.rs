//! Anomaly detection: per thread, off by default, and when on it names the
//! op, the input and the source line where a NaN or an infinity first
//! appears, in forward and in backward.

use netcl::autograd::{self, GradMode};
use netcl::{Error, Tensor, parallel};

fn leaf(values: &[f32]) -> Tensor {
    Tensor::from_vec(values.to_vec(), &[values.len()])
        .unwrap()
        .requires_grad_(true)
}

/// `file:line` of the line before the one calling this macro.
macro_rules! previous_line {
    () => {
        format!("{}:{}:", file!(), line!() - 1)
    };
}

#[test]
fn a_nan_gradient_names_the_op_the_input_and_the_forward_line() {
    // d/dx sqrt(x) = 1 / (2 sqrt(x)) is infinite at 0, and times the
    // incoming gradient 0 it is NaN.
    let x = leaf(&[4.0, 0.0]);
    let _anomaly = autograd::detect_anomaly();
    let root = x.sqrt();
    let at = previous_line!();
    let loss = (root * 0.0).sum();
    let err = loss.try_backward().unwrap_err();
    let Error::Anomaly {
        op,
        input,
        location,
        ..
    } = &err
    else {
        panic!("{err}")
    };
    assert_eq!((*op, *input), ("sqrt", Some(0)));
    assert!(
        location.as_ref().unwrap().starts_with(&at),
        "{location:?} vs {at}"
    );
    assert_eq!(
        err.to_string(),
        format!(
            "anomaly detected: in backward, the gradient of `sqrt` with respect to its input 0 has NaN; `sqrt` was recorded at {}",
            location.as_ref().unwrap()
        )
    );
    // Nothing reached the leaf.
    assert!(x.grad().is_none());
}

#[test]
fn the_panicking_backward_panics_with_the_same_message() {
    let x = leaf(&[0.0]);
    let _anomaly = autograd::detect_anomaly();
    let loss = (x.sqrt() * 0.0).sum();
    let expected = loss.clone();
    let panic =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| loss.backward())).unwrap_err();
    let message = panic.downcast_ref::<String>().unwrap();
    assert!(message.starts_with("anomaly detected: in backward, the gradient of `sqrt`"));
    drop(expected);
}

#[test]
fn forward_names_the_op_that_made_a_nan_from_finite_inputs() {
    let a = Tensor::from_vec(vec![1.0, 0.0], &[2]).unwrap();
    let b = Tensor::from_vec(vec![2.0, 0.0], &[2]).unwrap();
    let _anomaly = autograd::detect_anomaly();
    let err = a.try_div(&b).unwrap_err();
    let at = previous_line!();
    assert!(
        matches!(
            err,
            Error::Anomaly {
                op: "div",
                input: None,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains(&at), "{err} vs {at}");
    assert!(
        err.to_string().contains("produced NaN from finite inputs"),
        "{err}"
    );
    // Infinities count too: 1 / 0.
    let err = Tensor::ones(&[1])
        .try_div(&Tensor::zeros(&[1]))
        .unwrap_err();
    assert!(
        err.to_string().contains("produced an infinite value"),
        "{err}"
    );
    // An input that is already NaN is not this op's doing.
    let nan = Tensor::from_vec(vec![f32::NAN], &[1]).unwrap();
    assert!(nan.try_div(&Tensor::ones(&[1])).unwrap().item().is_nan());
}

#[test]
#[should_panic(expected = "anomaly detected: in forward, `log`")]
fn an_op_without_a_try_form_panics_with_the_anomaly() {
    let x = Tensor::from_vec(vec![-1.0], &[1]).unwrap();
    let _anomaly = autograd::detect_anomaly();
    let _ = x.log();
}

#[test]
fn off_by_default_and_nans_flow_as_values() {
    assert!(!autograd::is_anomaly_enabled());
    let x = leaf(&[0.0]);
    let y = Tensor::from_vec(vec![-1.0], &[1]).unwrap().log();
    assert!(y.item().is_nan());
    (x.sqrt() * 0.0).sum().backward();
    assert!(x.grad().unwrap().item().is_nan());
}

#[test]
fn anomaly_detection_is_per_thread_and_travels_with_grad_mode() {
    let _anomaly = autograd::detect_anomaly();
    let x = Tensor::from_vec(vec![-1.0], &[1]).unwrap();
    // Another thread is unaffected...
    let other = std::thread::spawn(move || {
        assert!(!autograd::is_anomaly_enabled());
        x.log().item()
    })
    .join()
    .unwrap();
    assert!(other.is_nan());
    // ...unless it enters this thread's mode, as netcl::parallel's tasks do.
    let inputs: Vec<Tensor> = (0..4)
        .map(|_| Tensor::from_vec(vec![0.0], &[1]).unwrap())
        .collect();
    let results = parallel::map(&inputs, |x| x.try_div(x));
    assert!(
        results
            .iter()
            .all(|r| matches!(r, Err(Error::Anomaly { op: "div", .. })))
    );
    let mode = GradMode::current();
    assert!(mode.anomaly());
    assert!(!mode.with_anomaly(false).run(autograd::is_anomaly_enabled));
}

/// The realistic case: z-scoring the digits divides the constant pixel
/// columns by a standard deviation of 0. Anomaly detection stops at the
/// division, naming this file's line.
#[test]
fn z_scoring_constant_columns_is_caught_at_the_division() {
    let digits =
        netcl::data::load_digits(concat!(env!("CARGO_MANIFEST_DIR"), "/data/digits.csv")).unwrap();
    let x = digits.inputs();
    let _anomaly = autograd::detect_anomaly();
    let mean = x.mean_axis(0, true);
    let std = (x - &mean).powf(2.0).mean_axis(0, true).sqrt();
    let err = (x - &mean).try_div(&std).unwrap_err();
    let at = previous_line!();
    println!("{err}");
    assert!(matches!(err, Error::Anomaly { op: "div", .. }));
    assert!(err.to_string().contains(&at));
}

/// A layer called directly reports the caller's line, not one inside netcl.
#[test]
fn a_layer_forward_reports_the_callers_line() {
    use netcl::nn::{Linear, Module};
    let layer = Linear::zeros(2, 1).unwrap();
    layer.weight().with_data_mut(|mut w| w.fill(1e30));
    // Finite inputs whose product overflows to infinity.
    let x = Tensor::from_vec(vec![1e30, 1e30], &[1, 2]).unwrap();
    let _anomaly = autograd::detect_anomaly();
    let err = layer.forward(&x).unwrap_err();
    let at = previous_line!();
    assert!(matches!(err, Error::Anomaly { op: "linear", .. }), "{err}");
    assert!(err.to_string().contains(&at), "{err}");
}

/// Two finite gradients whose sum overflows: the second contribution is
/// named.
#[test]
fn a_gradient_sum_that_overflows_is_caught() {
    // Finite values all through the forward (x is tiny), but
    // d/dx (3e38·x + 3e38·x) = 3e38 + 3e38 = inf.
    let x = Tensor::from_vec(vec![1e-30], &[1])
        .unwrap()
        .requires_grad_(true);
    let _anomaly = autograd::detect_anomaly();
    let a = &x * 3e38;
    let b = &x * 3e38;
    let err = (&a + &b).sum().try_backward().unwrap_err();
    println!("{err}");
    assert!(
        matches!(err, Error::Anomaly { input: Some(0), .. }),
        "{err}"
    );
    assert!(err.to_string().contains("though each was finite"), "{err}");
    assert!(x.grad().is_none(), "an anomaly leaves .grad() untouched");
}

#[test]
fn a_deliberate_minus_infinity_mask_is_not_an_anomaly_but_a_produced_one_is() {
    // masked_fill(mask, -inf) puts its argument in the output: the -inf of
    // an attention mask is what the caller asked for. softmax over the
    // masked scores is finite, and so is every gradient.
    let scores = Tensor::from_vec(vec![1.0, 2.0, 3.0, 4.0], &[2, 2])
        .unwrap()
        .requires_grad_(true);
    let causal = Tensor::from_vec(vec![0.0, 1.0, 0.0, 0.0], &[2, 2]).unwrap();
    let _anomaly = autograd::detect_anomaly();
    let masked = scores.try_masked_fill(&causal, f32::NEG_INFINITY).unwrap();
    let loss = masked
        .softmax(-1)
        .sum_axis(0, false)
        .mul(&leaf(&[1.0, 2.0]))
        .sum();
    loss.try_backward().unwrap();
    assert!(
        scores
            .grad()
            .unwrap()
            .to_vec()
            .iter()
            .all(|g| g.is_finite())
    );

    // A non-finite value an op computes from finite inputs is still one.
    let err = scores.try_div(&Tensor::zeros(&[2, 2])).unwrap_err();
    assert!(matches!(err, Error::Anomaly { op: "div", .. }), "{err}");
}
