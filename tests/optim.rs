//! Optimizers against hand-computed updates, their guarantees (no
//! recording, skipping parameters without gradient) and the learning-rate
//! schedules.
//!
//! Most tests minimise `loss(w) = w² + w` from `w = 1`, whose gradient is
//! `g = 2w + 1`, so the gradient changes from step to step.

use approx::assert_relative_eq;
use netcl::autograd::{self, GradMode, Tape};
use netcl::optim::{
    Adam, AdamConfig, AdamW, CosineAnnealing, LrSchedule, Optimizer, Sgd, SgdConfig, StepDecay,
};
use netcl::{Error, Tensor};

/// Runs `steps` steps of `optimizer` on `loss(w) = sum(w² + w)` and returns
/// `w` after each step.
fn trajectory(w: &Tensor, optimizer: &mut dyn Optimizer, steps: usize) -> Vec<f32> {
    (0..steps)
        .map(|_| {
            optimizer.zero_grad();
            (w * w + w).sum().backward();
            optimizer.step();
            w.item()
        })
        .collect()
}

fn start() -> Tensor {
    Tensor::from_vec(vec![1.0], &[1])
        .unwrap()
        .requires_grad_(true)
}

fn assert_close(got: &[f32], want: &[f64]) {
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(want) {
        assert_relative_eq!(*g as f64, *w, max_relative = 1e-5, epsilon = 1e-6);
    }
}

#[test]
fn sgd_plain_step_is_w_minus_lr_g() {
    // g = 2w + 1, lr = 0.1:
    // w1 = 1 - 0.1·3 = 0.7; w2 = 0.7 - 0.1·2.4 = 0.46; w3 = 0.46 - 0.1·1.92 = 0.268
    let w = start();
    let mut sgd = Sgd::new([w.clone()], SgdConfig::new(0.1));
    assert_close(&trajectory(&w, &mut sgd, 3), &[0.7, 0.46, 0.268]);
}

#[test]
fn sgd_momentum_accumulates_a_velocity() {
    // μ = 0.9: b1 = 3, w1 = 1 - 0.3 = 0.7
    // g2 = 2.4, b2 = 0.9·3 + 2.4 = 5.1, w2 = 0.7 - 0.51 = 0.19
    // g3 = 1.38, b3 = 0.9·5.1 + 1.38 = 5.97, w3 = 0.19 - 0.597 = -0.407
    let w = start();
    let mut sgd = Sgd::new([w.clone()], SgdConfig::new(0.1).momentum(0.9));
    assert_close(&trajectory(&w, &mut sgd, 3), &[0.7, 0.19, -0.407]);
}

#[test]
fn sgd_nesterov_looks_ahead() {
    // Nesterov: d = g + μ·b after updating b.
    // b1 = 3, d1 = 3 + 2.7 = 5.7, w1 = 1 - 0.57 = 0.43
    // g2 = 1.86, b2 = 2.7 + 1.86 = 4.56, d2 = 1.86 + 4.104 = 5.964, w2 = 0.43 - 0.5964 = -0.1664
    // g3 = 0.6672, b3 = 4.104 + 0.6672 = 4.7712, d3 = 0.6672 + 4.29408 = 4.96128,
    // w3 = -0.1664 - 0.496128 = -0.662528
    let w = start();
    let mut sgd = Sgd::new(
        [w.clone()],
        SgdConfig::new(0.1).momentum(0.9).nesterov(true),
    );
    assert_close(&trajectory(&w, &mut sgd, 3), &[0.43, -0.1664, -0.662528]);
}

#[test]
fn sgd_weight_decay_adds_lambda_w_to_the_gradient() {
    // λ = 0.1 without momentum: d = 2w + 1 + 0.1w = 2.1w + 1.
    // w1 = 1 - 0.1·3.1 = 0.69; w2 = 0.69 - 0.1·2.449 = 0.4451
    let w = start();
    let mut sgd = Sgd::new([w.clone()], SgdConfig::new(0.1).weight_decay(0.1));
    assert_close(&trajectory(&w, &mut sgd, 2), &[0.69, 0.4451]);

    // With Nesterov momentum too: d1 = 3.1, b1 = 3.1, w1 = 1 - 0.1·(3.1 + 2.79) = 0.411
    // d2 = 2.1·0.411 + 1 = 1.8631, b2 = 2.79 + 1.8631 = 4.6531,
    // w2 = 0.411 - 0.1·(1.8631 + 4.18779) = -0.194089
    let w = start();
    let config = SgdConfig::new(0.1)
        .momentum(0.9)
        .nesterov(true)
        .weight_decay(0.1);
    let mut sgd = Sgd::new([w.clone()], config);
    assert_close(
        &trajectory(&w, &mut sgd, 3),
        &[0.411, -0.194089, -0.683_548_589],
    );
}

#[test]
fn adam_matches_the_reference_update() {
    // t = 1: g = 3, m = 0.3, v = 0.009, m̂ = 3, v̂ = 9, w1 = 1 - 0.1·3/(3 + 1e-8) ≈ 0.9
    // Later steps, from the same formulas in f64:
    let w = start();
    let mut adam = Adam::new([w.clone()], AdamConfig::new(0.1));
    assert_close(
        &trajectory(&w, &mut adam, 3),
        &[0.900_000_000_3, 0.800_239_062_3, 0.700_902_870_5],
    );
}

#[test]
fn adam_weight_decay_is_an_l2_term_in_the_gradient() {
    // λ = 0.5: d = 2w + 1 + 0.5w. Adam is scale-invariant, so the effect is
    // small but visible after the first step.
    let w = start();
    let mut adam = Adam::new([w.clone()], AdamConfig::new(0.1).weight_decay(0.5));
    let got = trajectory(&w, &mut adam, 3);
    assert_close(&got, &[0.900_000_000_3, 0.800_261_470_0, 0.700_990_025_5]);
    assert!((got[2] - 0.700_903).abs() > 5e-5, "differs from plain Adam");
}

#[test]
fn adamw_decays_weights_before_the_adam_step() {
    // λ = 0.5: w ← w·(1 - 0.1·0.5) = 0.95 w, then the Adam step on g = 2w + 1
    // (the gradient at the undecayed w): w1 = 0.95 - 0.1 = 0.85.
    let w = start();
    let mut adamw = AdamW::new([w.clone()], AdamConfig::new(0.1).weight_decay(0.5));
    assert_close(
        &trajectory(&w, &mut adamw, 3),
        &[0.850_000_000_3, 0.707_912_228_3, 0.573_649_670_5],
    );
}

#[test]
fn updates_are_element_wise_on_matrices() {
    // Two independent coordinates with different gradients: each follows
    // its own scalar trajectory.
    let w = Tensor::from_vec(vec![1.0, 1.0, 1.0, 1.0], &[2, 2])
        .unwrap()
        .requires_grad_(true);
    let scale = Tensor::from_vec(vec![1.0, 2.0, 3.0, 4.0], &[2, 2]).unwrap();
    let mut sgd = Sgd::new([w.clone()], SgdConfig::new(0.1).momentum(0.5));
    for _ in 0..2 {
        sgd.zero_grad();
        (&w * &scale).sum().backward();
        sgd.step();
    }
    // g = scale every step: b1 = s, b2 = 1.5 s, w2 = 1 - 0.1·2.5 s
    let got = w.to_vec();
    for (g, s) in got.iter().zip([1.0_f32, 2.0, 3.0, 4.0]) {
        assert!((g - (1.0 - 0.25 * s)).abs() < 1e-6);
    }
}

#[test]
fn step_records_nothing_even_with_grad_on() {
    let tape = Tape::new();
    GradMode::new(true, tape.clone()).run(|| {
        let w = Tensor::ones(&[3]).requires_grad_(true);
        let mut optimizers: Vec<Box<dyn Optimizer>> = vec![
            Box::new(Sgd::new(
                [w.clone()],
                SgdConfig::new(0.1).momentum(0.9).weight_decay(0.1),
            )),
            Box::new(Adam::new([w.clone()], AdamConfig::new(0.1))),
            Box::new(AdamW::new(
                [w.clone()],
                AdamConfig::new(0.1).weight_decay(0.1),
            )),
        ];
        for optimizer in &mut optimizers {
            optimizer.zero_grad();
            (&w * &w).sum().backward();
            let before = tape.stats().recorded;
            assert!(before > 0, "the forward recorded on this tape");
            assert!(autograd::is_grad_enabled());
            optimizer.step();
            assert_eq!(tape.stats().recorded, before, "step recorded a node");
            assert!(autograd::is_grad_enabled(), "the caller's mode is restored");
            assert!(w.is_leaf() && w.requires_grad() && w.grad_fn().is_none());
        }
    });
    assert!(tape.is_empty());
}

#[test]
fn parameters_without_gradient_are_left_alone() {
    let used = Tensor::ones(&[2]).requires_grad_(true);
    let unused = Tensor::ones(&[2]).requires_grad_(true);
    let mut adam = Adam::new([used.clone(), unused.clone()], AdamConfig::new(0.1));
    (&used * 2.0).sum().backward();
    adam.step();
    assert_ne!(used.to_vec(), vec![1.0, 1.0]);
    assert_eq!(unused.to_vec(), vec![1.0, 1.0]);
}

#[test]
fn a_parameter_listed_twice_is_updated_once() {
    let w = start();
    let mut sgd = Sgd::new([w.clone(), w.clone()], SgdConfig::new(0.1));
    assert_eq!(sgd.params().len(), 1);
    assert_close(&trajectory(&w, &mut sgd, 1), &[0.7]);
}

#[test]
fn zero_grad_clears_the_gradients() {
    let w = start();
    let sgd = Sgd::new([w.clone()], SgdConfig::new(0.1));
    (&w * 3.0).sum().backward();
    assert!(w.grad().is_some());
    sgd.zero_grad();
    assert!(w.grad().is_none());
}

#[test]
fn invalid_hyper_parameters_are_reported() {
    let w = || vec![Tensor::zeros(&[1]).requires_grad_(true)];
    let cases: Vec<(Error, &str)> = vec![
        (
            Sgd::try_new(w(), SgdConfig::new(-0.1)).unwrap_err(),
            "Sgd: lr must be finite and >= 0, got -0.1",
        ),
        (
            Sgd::try_new(w(), SgdConfig::new(0.1).momentum(1.0)).unwrap_err(),
            "Sgd: momentum must be in [0, 1), got 1",
        ),
        (
            Adam::try_new(w(), AdamConfig::new(f32::NAN)).unwrap_err(),
            "Adam: lr must be finite and >= 0, got NaN",
        ),
        (
            AdamW::try_new(w(), AdamConfig::new(0.1).eps(0.0)).unwrap_err(),
            "AdamW: eps must be finite and > 0, got 0",
        ),
    ];
    for (err, message) in cases {
        assert_eq!(err.to_string(), message);
    }
    // A computed tensor is not a parameter.
    let computed = Tensor::ones(&[1]).requires_grad_(true).exp();
    let err = Sgd::try_new([computed], SgdConfig::new(0.1)).unwrap_err();
    assert!(err.to_string().contains("computed by `exp`"), "{err}");
}

#[test]
fn set_learning_rate_changes_the_next_steps() {
    let w = start();
    let mut sgd = Sgd::new([w.clone()], SgdConfig::new(0.1));
    sgd.set_learning_rate(0.0);
    assert_eq!(sgd.learning_rate(), 0.0);
    assert_close(&trajectory(&w, &mut sgd, 2), &[1.0, 1.0]);
    sgd.set_learning_rate(0.1);
    assert_close(&trajectory(&w, &mut sgd, 1), &[0.7]);
}

#[test]
fn step_decay_multiplies_every_step_size_epochs() {
    let schedule = StepDecay::new(0.1, 3, 0.5);
    let rates: Vec<f32> = (0..8).map(|e| schedule.lr(e)).collect();
    assert_eq!(rates, [0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.025, 0.025]);
    assert!(StepDecay::try_new(0.1, 0, 0.5).is_err());
    assert!(StepDecay::try_new(0.1, 1, -1.0).is_err());
}

#[test]
fn cosine_annealing_follows_half_a_cosine() {
    // lr(e) = min + (base - min)·(1 + cos(π e / T)) / 2, T = 4
    let schedule = CosineAnnealing::new(1.0, 0.2, 4);
    let expected = [
        1.0,
        0.2 + 0.8 * 0.853_553_4,
        0.6,
        0.2 + 0.8 * 0.146_446_6,
        0.2,
    ];
    for (epoch, want) in expected.iter().enumerate() {
        assert!((schedule.lr(epoch) - want).abs() < 1e-6, "epoch {epoch}");
    }
    assert_eq!(schedule.lr(100), 0.2);
    assert!(CosineAnnealing::try_new(1.0, 0.0, 0).is_err());
}

mod clipping_groups_and_warmup {
    use netcl::Tensor;
    use netcl::optim::{
        AdamConfig, AdamW, CosineAnnealing, LrSchedule, Optimizer, ParamGroup, Sgd, SgdConfig,
        StepDecay, Warmup, clip_grad_norm, no_decay_groups, try_clip_grad_norm,
    };

    /// A leaf of `values` whose gradient is `grad` (from sum(w · grad)).
    fn with_grad(values: &[f32], grad: &[f32]) -> Tensor {
        let w = Tensor::from_vec(values.to_vec(), &[values.len()])
            .unwrap()
            .requires_grad_(true);
        let g = Tensor::from_vec(grad.to_vec(), &[grad.len()]).unwrap();
        (&w * &g).sum().backward();
        w
    }

    fn close(a: &[f32], b: &[f32]) -> bool {
        a.len() == b.len()
            && a.iter()
                .zip(b)
                .all(|(x, y)| (x - y).abs() <= 1e-6 * y.abs().max(1.0))
    }

    #[test]
    fn clip_grad_norm_scales_to_the_global_norm_as_pytorch() {
        // Gradients (3, 4) and (12): global 2-norm √(9 + 16 + 144) = 13.
        // torch.nn.utils.clip_grad_norm_([a, b], 6.5) returns 13.0 and
        // scales by 6.5 / (13 + 1e-6): a.grad = (1.5, 2.0), b.grad = (6.0)
        // up to 1e-7 relative.
        let a = with_grad(&[0.0, 0.0], &[3.0, 4.0]);
        let b = with_grad(&[0.0], &[12.0]);
        let unused = Tensor::zeros(&[3]).requires_grad_(true);
        let params = [a.clone(), b.clone(), unused.clone(), a.clone()];
        assert_eq!(
            clip_grad_norm(&params, 6.5, 2.0),
            13.0,
            "a tied parameter counts once"
        );
        let coef = (6.5f64 / (13.0 + 1e-6)) as f32;
        assert!(close(
            &a.grad().unwrap().to_vec(),
            &[3.0 * coef, 4.0 * coef]
        ));
        assert!(close(&b.grad().unwrap().to_vec(), &[12.0 * coef]));
        assert!(unused.grad().is_none(), "no gradient: skipped");

        // Below the limit: untouched, bit for bit.
        let c = with_grad(&[0.0, 0.0], &[0.3, 0.4]);
        assert!((clip_grad_norm(std::slice::from_ref(&c), 1.0, 2.0) - 0.5).abs() < 1e-7);
        assert_eq!(c.grad().unwrap().to_vec(), [0.3, 0.4]);
    }

    #[test]
    fn clip_grad_norm_takes_the_one_and_infinity_norms() {
        // 1-norm: 3 + 4 + 12 = 19; ∞-norm: max |g| = 12, and a limit of 6
        // halves every gradient (6 / (12 + 1e-6)).
        let a = with_grad(&[0.0, 0.0], &[3.0, -4.0]);
        let b = with_grad(&[0.0], &[12.0]);
        assert_eq!(clip_grad_norm(&[a.clone(), b.clone()], 100.0, 1.0), 19.0);
        assert_eq!(
            clip_grad_norm(&[a.clone(), b.clone()], 6.0, f32::INFINITY),
            12.0
        );
        assert!(close(&a.grad().unwrap().to_vec(), &[1.5, -2.0]));
        assert!(close(&b.grad().unwrap().to_vec(), &[6.0]));
        assert_eq!(clip_grad_norm(&[], 1.0, 2.0), 0.0);
    }

    #[test]
    fn a_non_finite_total_is_returned_and_scales_as_pytorch_without_error_if_nonfinite() {
        // total = inf, coefficient 1 / (inf + 1e-6) = 0: finite elements
        // become 0, the infinite one inf · 0 = NaN.
        let a = with_grad(&[0.0, 0.0], &[f32::INFINITY, 2.0]);
        let b = with_grad(&[0.0], &[5.0]);
        let total = clip_grad_norm(&[a.clone(), b.clone()], 1.0, 2.0);
        assert_eq!(total, f32::INFINITY);
        let g = a.grad().unwrap().to_vec();
        assert!(g[0].is_nan() && g[1] == 0.0);
        assert_eq!(b.grad().unwrap().to_vec(), [0.0]);

        // A NaN gradient: the total is NaN and so is every gradient.
        let c = with_grad(&[0.0], &[f32::NAN]);
        let d = with_grad(&[0.0], &[1.0]);
        assert!(clip_grad_norm(&[c, d.clone()], 1.0, 2.0).is_nan());
        assert!(d.grad().unwrap().item().is_nan());

        let err = try_clip_grad_norm(&[], 1.0, 0.0).unwrap_err();
        assert_eq!(
            err.to_string(),
            "clip_grad_norm: norm_type must be > 0 (or infinity), got 0"
        );
    }

    #[test]
    fn groups_without_decay_are_not_decayed() {
        // Zero gradients: Adam's step is 0/(0 + ε) = 0, so AdamW only
        // shrinks: w ← w · (1 - lr · λ) = 1 · (1 - 0.1 · 0.1) = 0.99 in the
        // decayed group; the group with decay 0 keeps 1. SGD:
        // w ← w - lr · (g + λ · w) = 1 - 0.1 · 0.1 = 0.99 likewise.
        let matrix = Tensor::ones(&[2, 2]).requires_grad_(true);
        let bias = Tensor::ones(&[2]).requires_grad_(true);
        let backward = || {
            ((&matrix * 0.0).sum() + (&bias * 0.0).sum()).backward();
        };
        let [decay, no_decay] = no_decay_groups([matrix.clone(), bias.clone()]);
        let mut adamw =
            AdamW::with_groups([decay, no_decay], AdamConfig::new(0.1).weight_decay(0.1));
        backward();
        adamw.step();
        assert!(close(&matrix.to_vec(), &[0.99; 4]));
        assert_eq!(bias.to_vec(), [1.0, 1.0]);

        adamw.zero_grad();
        let mut sgd = Sgd::with_groups(
            [
                ParamGroup::new([matrix.clone()]).weight_decay(0.0),
                ParamGroup::new([bias.clone()]),
            ],
            SgdConfig::new(0.1).weight_decay(0.1),
        );
        backward();
        sgd.step();
        assert!(
            close(&matrix.to_vec(), &[0.99; 4]),
            "the matrix kept its value"
        );
        assert!(close(&bias.to_vec(), &[0.99, 0.99]));

        let twice = AdamW::try_with_groups(
            [
                ParamGroup::new([bias.clone()]),
                ParamGroup::new([bias.clone()]),
            ],
            AdamConfig::new(0.1),
        )
        .unwrap_err();
        assert_eq!(
            twice.to_string(),
            "AdamW: a parameter of group 1 is in an earlier group too"
        );
        let negative = Sgd::try_with_groups(
            [ParamGroup::new([bias]).weight_decay(-1.0)],
            SgdConfig::new(0.1),
        )
        .unwrap_err();
        assert!(negative.to_string().contains("weight_decay"), "{negative}");
    }

    #[test]
    fn warmup_ramps_per_step_then_hands_over() {
        // 3 warm-up steps at base 0.3: 0.1, 0.2, 0.3, then StepDecay from
        // its own step 0: 0.3, 0.3, 0.03 (halving ×0.1 every 2 steps).
        let schedule = Warmup::new(3, StepDecay::new(0.3, 2, 0.1));
        let rates: Vec<f32> = (0..6).map(|t| schedule.lr(t)).collect();
        assert!(close(&rates, &[0.1, 0.2, 0.3, 0.3, 0.3, 0.03]), "{rates:?}");
        let none = Warmup::new(0, CosineAnnealing::new(1.0, 0.0, 4));
        assert_eq!(none.lr(0), 1.0);
        assert_eq!(none.lr(4), 0.0);
    }
}
