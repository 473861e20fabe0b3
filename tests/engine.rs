//! The tape and the backward engine: memory, deep graphs, released graphs,
//! `autograd::grad`, custom ops and tapes.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use ndarray::ArrayD;
use netcl::autograd::{
    self, BackwardOptions, GradMode, InputGrads, Tape, apply_op, is_grad_enabled,
};
use netcl::{Error, Tensor};
use rand::SeedableRng;
use rand::rngs::StdRng;

mod common;
use common::{leaf, on_fresh_tape};

/// A 10,000-step training loop of a small MLP: the tape's live nodes return
/// to 0 after every step and its storage stops growing after the first.
#[test]
fn training_loop_of_10000_steps_keeps_the_tape_bounded() {
    on_fresh_tape(|tape| {
        let mut rng = StdRng::seed_from_u64(3);
        let x = Tensor::randn(&[8, 4], &mut rng);
        let y = Tensor::from_vec((0..8).map(|i| (i % 3) as f32).collect(), &[8]).unwrap();
        let w1 = (Tensor::randn(&[4, 16], &mut rng) * 0.3).requires_grad_(true);
        let b1 = Tensor::zeros(&[16]).requires_grad_(true);
        let w2 = (Tensor::randn(&[16, 3], &mut rng) * 0.3).requires_grad_(true);
        let params = [&w1, &b1, &w2];

        let mut capacity_after_first_step = 0;
        let mut first_loss = 0.0;
        let mut last_loss = 0.0;
        for step in 0..10_000 {
            let loss = x.matmul(&w1).add(&b1).relu().matmul(&w2).cross_entropy(&y);
            assert_eq!(tape.len(), 5);
            loss.backward();
            let value = loss.item();
            drop(loss);
            assert_eq!(tape.len(), 0, "step {step} left nodes on the tape");
            {
                let _guard = autograd::no_grad();
                for p in params {
                    let grad = p.grad().unwrap().data();
                    p.with_data_mut(|mut v| v.scaled_add(-0.05, &grad));
                    p.zero_grad();
                }
            }
            if step == 0 {
                capacity_after_first_step = tape.stats().capacity;
                first_loss = value;
            }
            last_loss = value;
        }
        let stats = tape.stats();
        println!(
            "after 10,000 steps: live nodes {}, peak {}, capacity {}, recorded {}",
            stats.live_nodes, stats.peak_live_nodes, stats.capacity, stats.recorded
        );
        assert_eq!(stats.live_nodes, 0);
        assert_eq!(stats.recorded, 50_000);
        assert_eq!(stats.peak_live_nodes, 5);
        assert_eq!(stats.capacity, capacity_after_first_step);
        assert!(last_loss < first_loss / 4.0, "{first_loss} -> {last_loss}");
    });
}

/// A tensor kept across steps with its graph shows up in the stats: the
/// "forgot no_grad" leak is visible.
#[test]
fn a_tensor_holding_its_graph_is_visible_in_tape_stats() {
    on_fresh_tape(|tape| {
        let w = leaf(&[1.0, 2.0]);
        let mut history = Vec::new();
        for _ in 0..10 {
            let loss = (&w * 2.0).sum();
            history.push(loss); // kept with its graph
        }
        assert_eq!(tape.len(), 20);
        history.clear();
        assert_eq!(tape.len(), 0);
    });
}

#[test]
fn chain_of_100000_ops_backpropagates_without_overflowing_the_stack() {
    on_fresh_tape(|tape| {
        let x = leaf(&[1.0]);
        let mut y = x.clone();
        for _ in 0..100_000 {
            y = &y * 1.0;
        }
        assert_eq!(tape.len(), 100_000);
        y.sum().backward();
        assert_eq!(x.grad().unwrap().to_vec(), vec![1.0]);
        drop(y);
        assert_eq!(tape.len(), 0);
    });
}

#[test]
fn dropping_a_chain_of_100000_ops_frees_it_iteratively() {
    on_fresh_tape(|tape| {
        let x = leaf(&[1.0]);
        let mut y = x.exp();
        for _ in 0..100_000 {
            y = y.add_scalar(0.0);
        }
        assert_eq!(tape.len(), 100_001);
        drop(y);
        assert_eq!(tape.len(), 0);
    });
}

#[test]
fn second_backward_through_a_released_graph_is_an_error() {
    let x = leaf(&[1.0, 2.0]);
    let loss = x.exp().sum();
    loss.backward();
    let err = loss.try_backward().unwrap_err();
    assert_eq!(err, Error::GraphReleased { node: "sum" });
    assert!(err.to_string().contains("retain"), "{err}");
    // The gradient of the first pass is intact.
    let expected: Vec<f32> = [1.0f32, 2.0].iter().map(|v| v.exp()).collect();
    assert_eq!(x.grad().unwrap().to_vec(), expected);
}

#[test]
fn retained_graph_can_be_walked_twice_and_gradients_accumulate() {
    let x = leaf(&[3.0]);
    let loss = (&x * &x).sum();
    let retain = BackwardOptions::new().retain_graph(true);
    loss.backward_with_options(&retain);
    loss.try_backward_with_options(&retain).unwrap();
    loss.backward();
    // d(x²)/dx = 2x = 6, three times.
    assert_eq!(x.grad().unwrap().to_vec(), vec![18.0]);
    x.zero_grad();
    assert!(x.grad().is_none());
}

#[test]
#[allow(deprecated)]
fn the_deprecated_retain_graph_forms_still_work() {
    let x = leaf(&[3.0]);
    let loss = (&x * &x).sum();
    loss.backward_retain_graph();
    loss.try_backward_retain_graph().unwrap();
    loss.backward();
    // d(x²)/dx = 2x = 6, three times.
    assert_eq!(x.grad().unwrap().to_vec(), vec![18.0]);
    x.zero_grad();
    assert!(x.grad().is_none());
}

#[test]
fn backward_needs_a_scalar_or_an_explicit_gradient() {
    let x = leaf(&[1.0, 2.0]);
    let y = &x * 3.0;
    assert_eq!(
        y.try_backward().unwrap_err(),
        Error::NotScalar {
            op: "backward",
            shape: vec![2]
        }
    );
    let bad = BackwardOptions::new().grad_output(Tensor::ones(&[3]));
    assert!(matches!(
        y.try_backward_with_options(&bad),
        Err(Error::ShapeMismatch { op: "backward", .. })
    ));
    let seed = Tensor::from_vec(vec![1.0, 10.0], &[2]).unwrap();
    let from = BackwardOptions::new().grad_output(seed);
    y.backward_with_options(&from.clone().retain_graph(true));
    y.backward_with_options(&from);
    // d(3x)/dx weighted by the seed, twice.
    assert_eq!(x.grad().unwrap().to_vec(), vec![6.0, 60.0]);
    assert!(matches!(
        y.try_backward_with_options(&from),
        Err(Error::GraphReleased { .. })
    ));
}

#[test]
#[allow(deprecated)]
fn the_deprecated_backward_from_forms_still_work() {
    let x = leaf(&[1.0, 2.0]);
    let y = &x * 3.0;
    assert_eq!(
        y.try_backward().unwrap_err(),
        Error::NotScalar {
            op: "backward",
            shape: vec![2]
        }
    );
    let bad = Tensor::ones(&[3]);
    assert!(matches!(
        y.try_backward_from(&bad),
        Err(Error::ShapeMismatch {
            op: "backward_from",
            ..
        })
    ));
    let seed = Tensor::from_vec(vec![1.0, 10.0], &[2]).unwrap();
    y.try_backward_from_retain_graph(&seed).unwrap();
    y.backward_from_retain_graph(&seed);
    y.backward_from(&seed);
    // d(3x)/dx weighted by the seed, three times.
    assert_eq!(x.grad().unwrap().to_vec(), vec![9.0, 90.0]);
    assert!(matches!(
        y.try_backward_from(&seed),
        Err(Error::GraphReleased { .. })
    ));
}

#[test]
#[allow(deprecated)]
fn the_deprecated_backward_with_forms_still_work() {
    let x = leaf(&[1.0, 2.0]);
    let y = &x * 3.0;
    let seed = Tensor::from_vec(vec![1.0, 10.0], &[2]).unwrap();
    assert!(matches!(
        y.try_backward_with(&Tensor::ones(&[3]), false),
        Err(Error::ShapeMismatch {
            op: "backward_with",
            ..
        })
    ));
    y.try_backward_with(&seed, true).unwrap();
    y.backward_with(&seed);
    assert_eq!(x.grad().unwrap().to_vec(), vec![6.0, 60.0]);
    assert!(matches!(
        y.try_backward_with(&seed, false),
        Err(Error::GraphReleased { .. })
    ));
}

#[test]
#[should_panic(expected = "backward: expected a tensor with one element, got shape [2]")]
fn plain_backward_panics_with_the_error_message() {
    let x = leaf(&[1.0, 2.0]);
    (&x * 3.0).backward();
}

#[test]
fn backward_on_a_tensor_without_graph_is_an_error() {
    let x = Tensor::ones(&[1]);
    assert!(matches!(x.try_backward(), Err(Error::NoGraph { .. })));
}

#[test]
fn backward_on_a_leaf_accumulates_one() {
    let x = leaf(&[5.0]);
    x.backward();
    assert_eq!(x.grad().unwrap().to_vec(), vec![1.0]);
}

#[test]
fn autograd_grad_returns_gradients_without_touching_grad() {
    let x = leaf(&[1.0, 2.0]);
    let unused = leaf(&[7.0]);
    let h = x.exp();
    let loss = (&h * &x).sum();
    let grads = autograd::grad(&[&loss], &[&x, &h, &unused]).unwrap();
    // loss = Σ x e^x: d/dx = e^x (1 + x); d/dh = x (h as an intermediate)
    let expected: Vec<f32> = [1.0f32, 2.0].iter().map(|v| v.exp() * (1.0 + v)).collect();
    for (got, want) in grads[0].to_vec().iter().zip(&expected) {
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
    }
    assert_eq!(grads[1].to_vec(), vec![1.0, 2.0]);
    assert_eq!(grads[2].to_vec(), vec![0.0]);
    assert!(x.grad().is_none() && unused.grad().is_none());
    // The graph was released.
    assert!(matches!(
        autograd::grad(&[&loss], &[&x]),
        Err(Error::GraphReleased { .. })
    ));
}

#[test]
fn autograd_grad_of_several_outputs_sums_them() {
    let x = leaf(&[2.0]);
    let a = (&x * 3.0).sum();
    let b = (&x * &x).sum();
    let retain = BackwardOptions::new().retain_graph(true);
    let grads = autograd::grad_with(&[&a, &b], &[&x], &retain).unwrap();
    // d(3x + x²)/dx = 3 + 2x = 7
    assert_eq!(grads[0].as_ref().unwrap().to_vec(), vec![7.0]);
    // retained: a second call works
    assert_eq!(autograd::grad(&[&b], &[&x]).unwrap()[0].to_vec(), vec![4.0]);
}

#[test]
#[allow(deprecated)]
fn the_deprecated_grad_retain_graph_still_works() {
    let x = leaf(&[2.0]);
    let a = (&x * 3.0).sum();
    let b = (&x * &x).sum();
    let grads = autograd::grad_retain_graph(&[&a, &b], &[&x]).unwrap();
    // d(3x + x²)/dx = 3 + 2x = 7
    assert_eq!(grads[0].to_vec(), vec![7.0]);
    // retained: a second call works
    assert_eq!(autograd::grad(&[&b], &[&x]).unwrap()[0].to_vec(), vec![4.0]);
}

#[test]
fn grad_of_an_input_given_twice_is_returned_twice() {
    let x = Tensor::from_vec(vec![1.0, 2.0, 3.0], &[3])
        .unwrap()
        .requires_grad_(true);
    // d/dx Σ x² = 2x, for each mention of x.
    let grads = autograd::grad(&[&(&x * &x).sum()], &[&x, &x]).unwrap();
    assert_eq!(grads[0].to_vec(), vec![2.0, 4.0, 6.0]);
    assert_eq!(grads[1].to_vec(), vec![2.0, 4.0, 6.0]);

    // A leaf root given twice as input: d s / d s = 1.
    let s = Tensor::scalar(3.0).requires_grad_(true);
    let grads = autograd::grad(&[&s], &[&s, &x, &s]).unwrap();
    assert_eq!(grads[0].item(), 1.0);
    assert_eq!(grads[1].to_vec(), vec![0.0; 3]);
    assert_eq!(grads[2].item(), 1.0);
}

/// Counts drops of a backward's saved state.
struct DropCounter(Arc<AtomicUsize>);

impl Drop for DropCounter {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

fn scaled(x: &Tensor, factor: f32, drops: &Arc<AtomicUsize>) -> Tensor {
    let counter = DropCounter(drops.clone());
    apply_op("scaled", &[x], x.to_array() * factor, move || {
        move |grad: ArrayD<f32>, grads: &mut InputGrads<'_>| {
            let _ = &counter;
            assert!(!is_grad_enabled(), "backward runs with grad mode off");
            grads.set(0, grad * factor);
        }
    })
    .unwrap()
}

#[test]
fn saved_state_is_released_by_backward_and_kept_by_retain_graph() {
    let drops = Arc::new(AtomicUsize::new(0));
    let x = leaf(&[1.0, 2.0]);
    let y = scaled(&x, 3.0, &drops).sum();
    y.backward_with_options(&BackwardOptions::new().retain_graph(true));
    assert_eq!(drops.load(Ordering::SeqCst), 0);
    y.backward();
    assert_eq!(drops.load(Ordering::SeqCst), 1, "released by backward");
    assert_eq!(x.grad().unwrap().to_vec(), vec![6.0, 6.0]);
}

#[test]
fn saved_state_is_released_when_the_graph_dies_without_backward() {
    let drops = Arc::new(AtomicUsize::new(0));
    let x = leaf(&[1.0]);
    let y = scaled(&x, 2.0, &drops);
    assert_eq!(drops.load(Ordering::SeqCst), 0);
    drop(y);
    assert_eq!(drops.load(Ordering::SeqCst), 1);
}

#[test]
fn custom_op_under_no_grad_saves_nothing() {
    let x = leaf(&[1.0]);
    let called = Arc::new(AtomicUsize::new(0));
    let y = {
        let _guard = autograd::no_grad();
        let called = called.clone();
        apply_op("probe", &[&x], x.to_array(), move || {
            called.fetch_add(1, Ordering::SeqCst);
            |grad: ArrayD<f32>, grads: &mut InputGrads<'_>| grads.set(0, grad)
        })
        .unwrap()
    };
    assert_eq!(called.load(Ordering::SeqCst), 0);
    assert!(!y.requires_grad());
}

#[test]
fn custom_backward_returning_a_wrong_shape_is_an_error() {
    let x = leaf(&[1.0, 2.0]);
    let y = apply_op("broken", &[&x], x.to_array(), || {
        |_grad: ArrayD<f32>, grads: &mut InputGrads<'_>| grads.set(0, ArrayD::zeros(vec![3]))
    })
    .unwrap();
    let err = y.sum().try_backward().unwrap_err();
    assert_eq!(
        err,
        Error::GradShape {
            op: "broken",
            input: 0,
            expected: vec![2],
            got: vec![3]
        }
    );
}

#[test]
fn panic_in_a_custom_backward_leaves_mode_and_tape_usable() {
    on_fresh_tape(|tape| {
        let x = leaf(&[1.0]);
        let y = apply_op("explodes", &[&x], x.to_array(), || {
            |_: ArrayD<f32>, _: &mut InputGrads<'_>| panic!("backward failed")
        })
        .unwrap();
        let loss = y.sum();
        let result = catch_unwind(AssertUnwindSafe(|| loss.backward()));
        assert!(result.is_err());
        assert!(is_grad_enabled(), "grad mode restored after the panic");
        drop((y, loss));
        assert_eq!(tape.len(), 0);
        let loss = (&x * 4.0).sum();
        loss.backward();
        assert_eq!(x.grad().unwrap().to_vec(), vec![4.0]);
    });
}

#[test]
fn gradients_use_the_values_seen_in_forward_even_after_an_in_place_update() {
    let w = leaf(&[2.0]);
    let x = leaf(&[5.0]);
    let loss = (&w * &x).sum();
    // An optimizer-style update between forward and backward.
    w.with_data_mut(|mut v| v.fill(100.0));
    loss.backward();
    // d(wx)/dx = w as it was in the forward.
    assert_eq!(x.grad().unwrap().to_vec(), vec![2.0]);
    assert_eq!(w.to_vec(), vec![100.0]);
}

#[test]
fn detach_cuts_the_graph() {
    let x = leaf(&[3.0]);
    let y = &x * &x;
    let z = (&y.detach() * &x).sum();
    z.backward();
    // Only the direct use of x counts: d(y·x)/dx with y constant = y = 9.
    assert_eq!(x.grad().unwrap().to_vec(), vec![9.0]);
}

#[test]
fn an_op_may_record_on_its_inputs_tape_from_another_thread() {
    let x = leaf(&[1.0, 2.0]);
    let h = x.exp();
    let h_tape = h.tape().unwrap();
    let y = std::thread::scope(|s| s.spawn(|| (&h * 2.0).sum()).join().unwrap());
    assert!(Arc::ptr_eq(&y.tape().unwrap(), &h_tape));
    y.backward();
    let expected: Vec<f32> = [1.0f32, 2.0].iter().map(|v| 2.0 * v.exp()).collect();
    assert_eq!(x.grad().unwrap().to_vec(), expected);
}

#[test]
fn inputs_recorded_on_different_tapes_are_an_error() {
    let x = leaf(&[1.0]);
    let a = GradMode::current().with_tape(Tape::new()).run(|| x.exp());
    let b = GradMode::current().with_tape(Tape::new()).run(|| x.exp());
    let err = a.try_add(&b).unwrap_err();
    assert!(matches!(err, Error::TapeMismatch { op: "add", .. }));
    assert!(err.to_string().contains("different tapes"), "{err}");
    // Under no_grad the same op is fine: nothing is recorded.
    let _guard = autograd::no_grad();
    assert_eq!(a.add(&b).to_vec(), vec![2.0 * 1f32.exp()]);
}

#[test]
fn tensors_are_shared_between_threads() {
    let w = leaf(&[1.0, 2.0, 3.0]);
    let losses: Vec<f32> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|i| {
                let w = &w;
                s.spawn(move || {
                    let loss = (w * i as f32).sum();
                    loss.backward();
                    loss.item()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(losses, vec![0.0, 6.0, 12.0, 18.0]);
    // Σ_i i = 6 for each element: no update lost.
    assert_eq!(w.grad().unwrap().to_vec(), vec![6.0; 3]);
}
