//! Models h to k: serving a model while another thread changes it.

#![cfg(loom)]

use loom::sync::Arc;
use loom::thread;
use loom_tests::{check, leaf};
use netcl::Tensor;
use netcl::autograd::{GradMode, eval_mode, no_grad, training_mode};
use netcl::nn::{Dropout, Linear, Module, Published};

/// `y = w·x + b` with one weight and one bias, both `value`.
fn affine(value: f32) -> Linear {
    let w = Tensor::from_vec(vec![value], &[1, 1]).unwrap();
    let b = Tensor::from_vec(vec![value], &[1]).unwrap();
    Linear::from_parts(w, Some(b)).unwrap()
}

/// Model h: a trainer updates both parameters, one after the other, and
/// publishes, twice (w = b = 2, then 3), while a reader loads a version and
/// runs a forward on it, twice. Each forward gives its version's output
/// (w·x + b with w = b = the version's value), never w of one version and b
/// of another, and versions only move forward.
#[test]
fn publish_vs_read_never_mixes_versions() {
    check("h: publish vs read", || {
        let model = Arc::new(affine(1.0));
        let published = Arc::new(Published::new(&*model).unwrap());
        let trainer = {
            let (model, published) = (model.clone(), published.clone());
            thread::spawn(move || {
                for value in [2.0, 3.0] {
                    for p in model.parameters() {
                        p.with_data_mut(|mut v| v.fill(value));
                    }
                    published.publish(&*model).unwrap();
                }
            })
        };
        let x = Tensor::from_vec(vec![10.0], &[1, 1]).unwrap();
        let mut last = 0;
        for _ in 0..2 {
            let version = published.load();
            let value = (version.number() + 1) as f32;
            assert!(version.number() >= last && version.number() <= 2);
            last = version.number();
            assert_eq!(version.predict(&x).unwrap().item(), value * 10.0 + value);
        }
        trainer.join().unwrap();
        assert_eq!(published.version(), 2);
    });
}

/// The same scenario served from the live model instead of a published
/// version (what `Published` exists to prevent): loom finds the
/// interleaving where the forward reads the new weight and the old bias.
#[test]
#[should_panic(expected = "torn read")]
fn serving_the_live_model_tears() {
    check("h': live model (expected to fail)", || {
        let model = Arc::new(affine(1.0));
        let trainer = {
            let model = model.clone();
            thread::spawn(move || {
                for p in model.parameters() {
                    p.with_data_mut(|mut v| v.fill(2.0));
                }
            })
        };
        let x = Tensor::from_vec(vec![10.0], &[1, 1]).unwrap();
        let y = {
            // (Under no_grad no tape is created on this thread: a loom
            // object left in a thread-local cannot be dropped after the
            // expected panic.)
            let _no_grad = no_grad();
            model.forward(&x).unwrap().item()
        };
        trainer.join().unwrap();
        assert!(y == 11.0 || y == 22.0, "torn read: {y}");
    });
}

/// Model i: two writers update one tensor while one of them also reads it:
/// no update is lost, the reads see whole states, and nothing deadlocks.
#[test]
fn writers_beside_a_snapshot_reader_lose_no_write() {
    check("i: writers vs snapshot reader", || {
        let w = Tensor::zeros(&[2]);
        let other = {
            let w = w.clone();
            thread::spawn(move || w.with_data_mut(|mut v| v += 1.0))
        };
        let seen = (&w * 1.0).to_vec();
        assert!(
            seen == [0.0, 0.0] || seen == [1.0, 1.0],
            "torn read {seen:?}"
        );
        w.with_data_mut(|mut v| v += 10.0);
        other.join().unwrap();
        assert_eq!(w.to_vec(), vec![11.0, 11.0], "a write was lost");
    });
}

/// Model j: the stolen-writer shape. A thread holds a snapshot of `w` in the
/// middle of a computation (as a rayon worker blocked inside a product
/// does) and runs a write of `w` (as the job it steals does), while another
/// thread writes `w` too: no one waits on the computation, no write is lost,
/// and the computation keeps the values it started with.
#[test]
fn a_write_inside_a_computation_on_the_same_tensor_never_waits_for_it() {
    check("j: write inside a computation", || {
        let w = leaf(&[1.0]);
        let other = {
            let w = w.clone();
            thread::spawn(move || w.with_data_mut(|mut v| v *= 3.0))
        };
        let product = w.data(); // the product's operand snapshot
        w.with_data_mut(|mut v| v += 1.0); // the stolen job
        let first = product[[0]];
        assert!(
            first == 1.0 || first == 3.0,
            "snapshot changed under a computation"
        );
        other.join().unwrap();
        let end = w.item();
        assert!(
            end == (1.0 + 1.0) * 3.0 || end == 1.0 * 3.0 + 1.0,
            "lost a write: {end}"
        );
    });
}

/// Model k: one layer of Dropout (p = 1, so training mode zeroes its input)
/// is used by a trainer thread in training mode, carried there by a
/// `GradMode`, while this thread evaluates it in eval mode: each side sees
/// only its own mode, whatever the interleaving, and the layer's own flag is
/// never touched.
#[test]
fn training_mode_is_per_thread_and_travels_with_grad_mode() {
    check("k: per-thread training mode", || {
        let dropout = Arc::new(Dropout::new(1.0, 0));
        dropout.eval(); // the layer's own default: evaluation
        let x = Tensor::ones(&[2]);
        let train = GradMode::current().with_training(Some(true));
        let trainer = {
            let (dropout, x) = (dropout.clone(), x.clone());
            thread::spawn(move || {
                train.run(|| {
                    let first = dropout.forward(&x).unwrap().to_vec();
                    thread::yield_now();
                    (
                        first,
                        dropout.forward(&x).unwrap().to_vec(),
                        training_mode(),
                    )
                })
            })
        };
        let _eval = eval_mode();
        assert_eq!(dropout.forward(&x).unwrap().to_vec(), vec![1.0, 1.0]);
        thread::yield_now();
        assert_eq!(dropout.forward(&x).unwrap().to_vec(), vec![1.0, 1.0]);
        let (first, second, mode) = trainer.join().unwrap();
        assert_eq!((first, second), (vec![0.0, 0.0], vec![0.0, 0.0]));
        assert_eq!(mode, Some(true));
        assert!(!dropout.is_training());
    });
}
