//! The Trainer: it learns the digits, is deterministic for a seed, and its
//! evaluation records nothing, weights by sample and switches the model to
//! eval mode only while it runs.

use std::sync::Mutex;

use netcl::autograd::{self, GradMode, Tape};
use netcl::data::{self, Dataset, TensorDataset};
use netcl::nn::{Activation, Dropout, Linear, Mlp, Module, Sequential};
use netcl::optim::{Adam, AdamConfig, Sgd, SgdConfig, StepDecay};
use netcl::train::{self, Trainer};
use netcl::{Error, Result, Tensor};
use rand::SeedableRng;
use rand::rngs::StdRng;

mod common;

/// The digits scaled to [0, 1], split 80/20 with seed 42.
fn digits() -> (TensorDataset, TensorDataset) {
    let path = format!("{}/data/digits.csv", env!("CARGO_MANIFEST_DIR"));
    let all = data::load_digits(path).unwrap();
    let all = TensorDataset::new(all.inputs() / 16.0, all.targets().clone()).unwrap();
    all.split(0.8, 42).unwrap()
}

fn digits_trainer(seed: u64) -> Trainer<Mlp, Adam> {
    let (train, test) = digits();
    let model = Mlp::new(
        &[64, 32, 10],
        Activation::Relu,
        &mut StdRng::seed_from_u64(seed),
    );
    let optimizer = Adam::new(model.parameters(), AdamConfig::new(1e-2));
    Trainer::new(model, optimizer, train)
        .batch_size(32)
        .seed(seed)
        .eval_set(test)
        .progress(false)
}

#[test]
fn an_mlp_learns_the_digits_in_a_few_epochs() -> Result<()> {
    let mut trainer = digits_trainer(0);
    let before = trainer.evaluate()?;
    // Ten classes: an untrained model is near chance.
    assert!(
        before.accuracy < 0.3,
        "untrained accuracy {}",
        before.accuracy
    );

    let history = trainer.fit(4)?;
    assert_eq!(history.len(), 4);
    for (i, epoch) in history.iter().enumerate() {
        assert_eq!(epoch.epoch, i);
        assert!(epoch.seconds > 0.0);
        assert_eq!(epoch.eval.unwrap().samples, 360);
    }
    assert!(history[3].train_loss < history[0].train_loss);
    let after = trainer.evaluate()?;
    // The last epoch's evaluation is the model's current one.
    assert_eq!(Some(after), history[3].eval);
    assert!(
        after.accuracy >= 0.93,
        "accuracy after 4 epochs: {}",
        after.accuracy
    );
    assert!(after.loss < before.loss / 5.0);
    Ok(())
}

#[test]
fn fit_is_deterministic_for_a_seed() -> Result<()> {
    let mut a = digits_trainer(7);
    let mut b = digits_trainer(7);
    let mut c = digits_trainer(8);
    let ha = a.fit(2)?;
    let hb = b.fit(2)?;
    let hc = c.fit(2)?;
    let losses = |h: &[train::EpochMetrics]| -> Vec<(u32, u32)> {
        h.iter()
            .map(|m| (m.train_loss.to_bits(), m.eval.unwrap().loss.to_bits()))
            .collect()
    };
    assert_eq!(losses(&ha), losses(&hb));
    assert_ne!(losses(&ha), losses(&hc));
    for (p, q) in a.model().parameters().iter().zip(b.model().parameters()) {
        assert_eq!(p.to_vec(), q.to_vec());
    }
    Ok(())
}

#[test]
fn fit_in_pieces_equals_fit_at_once() -> Result<()> {
    let mut once = digits_trainer(3);
    let mut pieces = digits_trainer(3);
    once.fit(2)?;
    pieces.fit(1)?;
    pieces.fit(1)?;
    assert_eq!(pieces.history().len(), 2);
    assert_eq!(pieces.history()[1].epoch, 1);
    assert_eq!(
        once.history()[1].train_loss.to_bits(),
        pieces.history()[1].train_loss.to_bits()
    );
    Ok(())
}

#[test]
fn fit_trains_even_when_called_under_no_grad() -> Result<()> {
    let mut trainer = digits_trainer(1);
    let _guard = autograd::no_grad();
    let history = trainer.fit(1)?;
    assert!(history[0].eval_accuracy().unwrap() > 0.5);
    assert!(
        !autograd::is_grad_enabled(),
        "the caller's mode is restored"
    );
    Ok(())
}

#[test]
fn evaluate_records_nothing_even_with_grad_on() -> Result<()> {
    let trainer = digits_trainer(2);
    // This thread's own tape, grad on.
    assert!(autograd::is_grad_enabled());
    let tape = autograd::current_tape();
    let before = tape.stats().recorded;
    trainer.evaluate()?;
    assert_eq!(tape.stats().recorded, before);

    // A fresh mode with its own tape: the rayon workers enter the caller's
    // mode, so anything they recorded would land on this tape.
    let fresh = Tape::new();
    GradMode::new(true, fresh.clone()).run(|| -> Result<()> {
        trainer.evaluate()?;
        train::evaluate(trainer.model(), &digits().1, 7)?;
        assert!(autograd::is_grad_enabled());
        Ok(())
    })?;
    assert_eq!(fresh.stats().recorded, 0);
    assert_eq!(fresh.stats().peak_live_nodes, 0);
    // A control: the same forward outside evaluate does record there.
    GradMode::new(true, fresh.clone()).run(|| {
        let _ = trainer.model().forward(&Tensor::zeros(&[1, 64]));
    });
    assert!(fresh.stats().recorded > 0);
    Ok(())
}

/// Wraps a module and records the training flag it sees in each forward.
#[derive(Debug)]
struct ModeSpy<M> {
    inner: M,
    seen: Mutex<Vec<bool>>,
}

impl<M: Module> Module for ModeSpy<M> {
    fn forward(&self, input: &Tensor) -> Result<Tensor> {
        self.seen
            .lock()
            .unwrap()
            .push(self.inner.effective_training());
        self.inner.forward(input)
    }
    fn named_parameters(&self) -> Vec<(String, Tensor)> {
        self.inner.named_parameters()
    }
    fn set_training(&self, training: bool) {
        self.inner.set_training(training);
    }
    fn is_training(&self) -> bool {
        self.inner.is_training()
    }
}

#[test]
fn evaluate_and_fit_set_the_threads_mode_and_never_the_models() -> Result<()> {
    let (train, test) = digits();
    let mut rng = StdRng::seed_from_u64(4);
    let spy = ModeSpy {
        inner: Sequential::new()
            .with(Linear::new(64, 10, &mut rng))
            .with(Dropout::new(0.5, 1)),
        seen: Mutex::new(Vec::new()),
    };
    let optimizer = Sgd::new(spy.parameters(), SgdConfig::new(0.1));
    let mut trainer = Trainer::new(spy, optimizer, train)
        .batch_size(256)
        .eval_set(test)
        .progress(false);

    // The model's own flag says training; evaluation runs in eval mode on
    // its threads without changing that flag.
    assert!(trainer.model().is_training());
    let first = trainer.evaluate()?;
    assert!(trainer.model().is_training());
    let seen: Vec<bool> = trainer.model().seen.lock().unwrap().drain(..).collect();
    assert!(!seen.is_empty() && seen.iter().all(|&t| !t), "{seen:?}");
    // Dropout is off in eval mode, so evaluation is repeatable.
    assert_eq!(trainer.evaluate()?, first);

    // Eval mode before: still eval after.
    trainer.model().eval();
    trainer.evaluate()?;
    assert!(!trainer.model().is_training());

    // fit trains in training mode and evaluates in eval mode, whatever the
    // model's own flag, and leaves that flag alone.
    trainer.model().seen.lock().unwrap().clear();
    trainer.fit(1)?;
    assert!(!trainer.model().is_training());
    let seen = trainer.model().seen.lock().unwrap().clone();
    let (train_batches, eval_batches) = (6, 2); // 1437 / 256, 360 / 256, rounded up
    assert_eq!(seen.len(), train_batches + eval_batches);
    assert!(seen[..train_batches].iter().all(|&t| t));
    assert!(seen[train_batches..].iter().all(|&t| !t));
    Ok(())
}

#[test]
fn evaluation_is_weighted_by_sample() -> Result<()> {
    // One input feature, logits [-x, x]: predicts class 1 when x > 0.
    let w = Tensor::from_vec(vec![-1.0, 1.0], &[1, 2])?;
    let model = Linear::from_parts(w, None)?;
    let x = Tensor::from_vec(vec![1.0, 2.0, 3.0, 4.0, 5.0], &[5, 1])?;
    // Right, right | wrong, wrong | wrong.
    let y = Tensor::from_vec(vec![1.0, 1.0, 0.0, 0.0, 0.0], &[5])?;
    let ds = TensorDataset::new(x.clone(), y.clone())?;
    let result = train::evaluate(&model, &ds, 2)?;
    // By sample: 2 of 5. (A mean of batch accuracies would give 1/3.)
    assert_eq!(result.samples, 5);
    assert!((result.accuracy - 0.4).abs() < 1e-6);
    let whole = {
        let _guard = autograd::no_grad();
        model.forward(&x)?.cross_entropy(&y).item()
    };
    assert!(
        (result.loss - whole).abs() < 1e-5,
        "{} vs {whole}",
        result.loss
    );
    // Any batch size gives the same result.
    for batch_size in [1, 3, 5, 100] {
        let other = train::evaluate(&model, &ds, batch_size)?;
        assert!((other.accuracy - 0.4).abs() < 1e-6);
        assert!((other.loss - whole).abs() < 1e-5);
    }
    Ok(())
}

#[test]
fn a_schedule_sets_each_epochs_learning_rate() -> Result<()> {
    let (train, _) = digits();
    let train = train.subset(&(0..128).collect::<Vec<_>>())?;
    let model = Mlp::new(&[64, 10], Activation::Relu, &mut StdRng::seed_from_u64(0));
    let optimizer = Sgd::new(model.parameters(), SgdConfig::new(1.0));
    let mut trainer = Trainer::new(model, optimizer, train)
        .schedule(StepDecay::new(0.2, 2, 0.5))
        .progress(false);
    let history = trainer.fit(5)?;
    let rates: Vec<f32> = history.iter().map(|m| m.lr).collect();
    assert_eq!(rates, [0.2, 0.2, 0.1, 0.1, 0.05]);
    assert!(history.iter().all(|m| m.eval.is_none()));
    Ok(())
}

/// A trainer that keeps only its last epochs' metrics trains exactly as one
/// that keeps them all: the epoch count behind the schedule and the data
/// order goes on past what the history holds.
#[test]
fn a_history_limit_keeps_the_last_epochs_and_trains_the_same() -> Result<()> {
    let (train, _) = digits();
    let train = train.subset(&(0..128).collect::<Vec<_>>())?;
    let trainer = |limit: Option<usize>| {
        let model = Mlp::new(&[64, 10], Activation::Relu, &mut StdRng::seed_from_u64(0));
        let optimizer = Sgd::new(model.parameters(), SgdConfig::new(1.0));
        let trainer = Trainer::new(model, optimizer, train.clone())
            .seed(3)
            .schedule(StepDecay::new(0.2, 2, 0.5))
            .progress(false);
        match limit {
            Some(limit) => trainer.history_limit(limit),
            None => trainer,
        }
    };
    let (mut all, mut last_two, mut none) = (trainer(None), trainer(Some(2)), trainer(Some(0)));
    let mut returned = Vec::new();
    for _ in 0..6 {
        all.fit(1)?;
        returned.extend(last_two.fit(1)?);
        none.fit(1)?;
    }
    for trainer in [&last_two, &none] {
        assert_eq!(trainer.epochs_done(), 6);
    }
    assert_eq!(all.history().len(), 6);
    assert_eq!(last_two.history().len(), 2);
    assert!(none.history().is_empty());
    // fit returned every epoch; the history keeps the last two.
    let epochs: Vec<usize> = returned.iter().map(|m| m.epoch).collect();
    assert_eq!(epochs, [0, 1, 2, 3, 4, 5]);
    let without_time = |history: &[train::EpochMetrics]| -> Vec<(usize, f32, f32)> {
        history
            .iter()
            .map(|m| (m.epoch, m.lr, m.train_loss))
            .collect()
    };
    assert_eq!(
        without_time(last_two.history()),
        without_time(&all.history()[4..])
    );
    let rates: Vec<f32> = returned.iter().map(|m| m.lr).collect();
    assert_eq!(rates, [0.2, 0.2, 0.1, 0.1, 0.05, 0.05]);
    for other in [&last_two, &none] {
        for (a, b) in all
            .model()
            .parameters()
            .iter()
            .zip(other.model().parameters())
        {
            assert_eq!(a.to_vec(), b.to_vec());
        }
    }
    // Lowering the limit later trims at once.
    let all = all.history_limit(1);
    assert_eq!(all.history().len(), 1);
    assert_eq!(all.history()[0].epoch, 5);
    Ok(())
}

#[test]
fn misuse_gives_clear_errors() -> Result<()> {
    let (train, test) = digits();
    let model = Mlp::new(&[64, 10], Activation::Relu, &mut StdRng::seed_from_u64(0));
    let optimizer = Sgd::new(model.parameters(), SgdConfig::new(0.1));
    let mut trainer = Trainer::new(model, optimizer, train.clone()).batch_size(0);
    assert!(matches!(
        trainer.fit(1),
        Err(Error::InvalidArgument {
            op: "Trainer::fit",
            ..
        })
    ));
    let err = trainer.evaluate().unwrap_err();
    assert_eq!(
        err.to_string(),
        "Trainer::evaluate: no evaluation set; add one with Trainer::eval_set"
    );

    // A model whose output does not fit the targets.
    let wrong = Linear::new(64, 3, &mut StdRng::seed_from_u64(0));
    let err = train::evaluate(&wrong, &test, 64).unwrap_err();
    assert!(matches!(err, Error::InvalidTarget { .. }), "{err}");
    let empty = train.subset(&[])?;
    assert!(empty.is_empty());
    assert!(train::evaluate(&wrong, &empty, 64).is_err());
    Ok(())
}

/// The realistic NaN: z-scoring the digits divides constant pixel columns
/// by a standard deviation of 0, so 0/0 puts NaN in every sample. Training
/// used to report a finite loss and ruin the weights silently; now the
/// first step stops with an error naming it, and the weights are untouched.
#[test]
fn z_scored_digits_with_constant_columns_stop_training_at_the_first_step() -> Result<()> {
    let digits = data::load_digits(concat!(env!("CARGO_MANIFEST_DIR"), "/data/digits.csv"))?;
    let x = digits.inputs();
    let mean = x.mean_axis(0, true);
    let std = (x - &mean).powf(2.0).mean_axis(0, true).sqrt();
    let z = (x - &mean) / &std;
    assert!(
        z.to_vec().iter().any(|v| v.is_nan()),
        "some columns are constant"
    );
    let data = TensorDataset::new(z, digits.targets().clone())?;
    let model = Mlp::new(
        &[64, 32, 10],
        Activation::Relu,
        &mut StdRng::seed_from_u64(0),
    );
    let before: Vec<Vec<f32>> = model.parameters().iter().map(Tensor::to_vec).collect();
    let optimizer = Adam::new(model.parameters(), AdamConfig::new(1e-3));
    let mut trainer = Trainer::new(model, optimizer, data).progress(false);
    let err = trainer.fit(1).unwrap_err();
    assert!(
        matches!(err, Error::NonFiniteLoss { epoch: 0, batch: 0, step: 1, loss } if loss.is_nan()),
        "{err}"
    );
    assert!(
        err.to_string().contains("epoch 0, batch 0 (step 1)"),
        "{err}"
    );
    let after: Vec<Vec<f32>> = trainer
        .model()
        .parameters()
        .iter()
        .map(Tensor::to_vec)
        .collect();
    assert_eq!(before, after, "the non-finite step was not taken");
    assert_eq!(trainer.steps_done(), 0);
    Ok(())
}

#[test]
fn skipping_non_finite_losses_trains_on_the_finite_batches() -> Result<()> {
    let (train_set, test_set) = digits();
    // Poison one sample in eight with a NaN pixel.
    let mut x = train_set.inputs().to_array();
    for (i, mut row) in x.outer_iter_mut().enumerate() {
        if i % 8 == 3 {
            row[0] = f32::NAN;
        }
    }
    let poisoned = TensorDataset::new(Tensor::from_array(x), train_set.targets().clone())?;
    let model = Mlp::new(
        &[64, 32, 10],
        Activation::Relu,
        &mut StdRng::seed_from_u64(0),
    );
    let optimizer = Adam::new(model.parameters(), AdamConfig::new(1e-2));
    let mut trainer = Trainer::new(model, optimizer, poisoned)
        .batch_size(1)
        .eval_set(test_set)
        .progress(false)
        .on_non_finite(train::NonFinite::Skip);
    let history = trainer.fit(1)?;
    let n = train_set.len() as u64;
    // The indices i < n with i % 8 == 3.
    let poisoned = (n + 4) / 8;
    assert_eq!(trainer.skipped_steps(), poisoned);
    assert_eq!(trainer.steps_done(), n - poisoned);
    assert!(history[0].train_loss.is_finite());
    assert!(history[0].eval_accuracy().unwrap() > 0.8);
    Ok(())
}

#[test]
fn a_stop_handle_ends_fit_after_the_current_step_from_another_thread() -> Result<()> {
    let (train_set, _) = digits();
    let model = Mlp::new(
        &[64, 16, 10],
        Activation::Relu,
        &mut StdRng::seed_from_u64(0),
    );
    let optimizer = Sgd::new(model.parameters(), SgdConfig::new(0.1));
    let trainer = Trainer::new(model, optimizer, train_set)
        .batch_size(8)
        .progress(false);
    let stop = trainer.stop_handle();
    // Another thread asks for the stop once training has started: the
    // first step tells it, and waits for the request, so the request
    // arrives during that step whatever the scheduler does.
    let (started, step_started) = std::sync::mpsc::channel();
    let mut first = true;
    let mut trainer = trainer.on_step({
        let stop = stop.clone();
        move |_, _| {
            if std::mem::take(&mut first) {
                started.send(()).unwrap();
                common::wait_until(common::PATIENCE, "the stop request", || stop.is_stopped());
            }
        }
    });
    let stopper = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            step_started
                .recv_timeout(common::PATIENCE)
                .expect("training started");
            stop.stop();
        })
    };
    let history = trainer.fit(1_000)?;
    stopper.join().unwrap();
    let steps = trainer.steps_done();
    assert_eq!(steps, 1, "fit ends after the step the request came in");
    assert_eq!(history.len(), trainer.history().len());
    // The request was consumed: the next fit trains a whole epoch.
    assert!(!stop.is_stopped());
    let more = trainer.fit(1)?;
    assert_eq!(more.len(), 1);
    assert_eq!(
        trainer.steps_done(),
        steps + 180,
        "1437 samples in batches of 8"
    );
    Ok(())
}

#[test]
fn a_step_schedule_sets_every_steps_rate_and_overrides_the_epoch_schedule() {
    use netcl::optim::{Constant, LrSchedule, Warmup};
    // 16 samples in batches of 4: 4 steps per epoch, 3 epochs. Warm-up over
    // 6 steps to 0.6: 0.1, 0.2, ..., 0.6, then 0.6; the per-epoch schedule
    // (constant 9) is ignored.
    let model = Linear::zeros(2, 2).unwrap();
    let optimizer = Sgd::new(model.parameters(), SgdConfig::new(1.0));
    let data = TensorDataset::new(Tensor::ones(&[16, 2]), Tensor::zeros(&[16])).unwrap();
    let rates = std::sync::Arc::new(Mutex::new(Vec::new()));
    let log = std::sync::Arc::clone(&rates);
    let schedule = Warmup::new(6, Constant(0.6));
    let mut trainer = Trainer::new(model, optimizer, data)
        .batch_size(4)
        .progress(false)
        .schedule(Constant(9.0))
        .step_schedule(schedule)
        .on_step(move |info, _| log.lock().unwrap().push((info.step, info.lr)));
    trainer.fit(3).unwrap();
    let rates = rates.lock().unwrap();
    assert_eq!(rates.len(), 12);
    for &(step, lr) in rates.iter() {
        let expected = schedule.lr(step as usize - 1);
        assert!(
            (lr - expected).abs() < 1e-7,
            "step {step}: {lr} vs {expected}"
        );
    }
    assert!((rates[0].1 - 0.1).abs() < 1e-7 && rates[11].1 == 0.6);
    let epoch_rates: Vec<f32> = trainer.history().iter().map(|m| m.lr).collect();
    assert!((epoch_rates[0] - 0.1).abs() < 1e-7, "the first step's rate");
    assert!((epoch_rates[1] - 0.5).abs() < 1e-7, "step 5's rate");
}

#[test]
fn a_non_finite_gradient_norm_stops_or_skips_the_step() {
    use netcl::train::NonFinite;
    // loss = sqrt(0 · sum(output)) = 0 is finite, but its gradient is
    // 0 · 1/(2·√0) = 0 · ∞ = NaN: the clipped step must not be taken.
    let data = TensorDataset::new(Tensor::ones(&[4, 2]), Tensor::zeros(&[4])).unwrap();
    let nan_grad = |out: &Tensor, _: &Tensor| Ok((out.sum() * 0.0).sqrt());
    let trainer = |policy| {
        let model = Linear::from_parts(Tensor::ones(&[2, 2]), None).unwrap();
        let optimizer = Sgd::new(model.parameters(), SgdConfig::new(0.1));
        Trainer::new(model, optimizer, data.clone())
            .batch_size(2)
            .progress(false)
            .loss_fn(nan_grad)
            .clip_grad_norm(1.0)
            .on_non_finite(policy)
    };
    let mut stopping = trainer(NonFinite::Error);
    match stopping.fit(1).unwrap_err() {
        Error::NonFiniteGradient {
            epoch: 0,
            batch: 0,
            step: 1,
            norm,
        } => assert!(norm.is_nan()),
        other => panic!("{other}"),
    }
    assert_eq!(stopping.model().weight().to_vec(), [1.0; 4]);

    let mut skipping = trainer(NonFinite::Skip);
    skipping.fit(1).unwrap();
    assert_eq!((skipping.steps_done(), skipping.skipped_steps()), (0, 2));
    assert_eq!(skipping.model().weight().to_vec(), [1.0; 4]);
}
