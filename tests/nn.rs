//! Layers and containers: forward values, initialisation, parameter names,
//! train/eval mode, dropout determinism and sharing one model between
//! threads.

use std::collections::BTreeSet;
use std::sync::Arc;

use netcl::nn::{Activation, Dropout, Linear, Mlp, Module, ReLU, Sequential, Sigmoid, Tanh};
use netcl::{Error, Tensor, autograd};
use rand::SeedableRng;
use rand::rngs::StdRng;

fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

fn names(module: &dyn Module) -> Vec<String> {
    module
        .named_parameters()
        .into_iter()
        .map(|(name, _)| name)
        .collect()
}

#[test]
fn models_are_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Linear>();
    assert_send_sync::<Dropout>();
    assert_send_sync::<Sequential>();
    assert_send_sync::<Mlp>();
    assert_send_sync::<Arc<dyn Module>>();
}

#[test]
fn linear_forward_is_x_times_w_plus_b() -> netcl::Result<()> {
    // W = [[1, 2], [3, 4], [5, 6]] (3 inputs, 2 outputs), b = [0.5, -1]
    // x = [[1, 0, -1], [2, 1, 0]]
    // x·W = [[1 - 5, 2 - 6], [2 + 3, 4 + 4]] = [[-4, -4], [5, 8]]
    let w = Tensor::from_vec(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[3, 2])?;
    let b = Tensor::from_vec(vec![0.5, -1.0], &[2])?;
    let layer = Linear::from_parts(w, Some(b))?;
    assert_eq!((layer.in_features(), layer.out_features()), (3, 2));
    let x = Tensor::from_vec(vec![1.0, 0.0, -1.0, 2.0, 1.0, 0.0], &[2, 3])?;
    let y = layer.forward(&x)?;
    assert_eq!(y.shape(), &[2, 2]);
    assert_eq!(y.to_vec(), vec![-3.5, -5.0, 5.5, 7.0]);
    Ok(())
}

#[test]
fn linear_gradients_match_hand_derivation() -> netcl::Result<()> {
    // loss = sum(x·W + b): dW[i, j] = sum_n x[n, i], db[j] = n.
    let layer = Linear::new(3, 2, &mut rng(0));
    let x = Tensor::from_vec(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3])?;
    layer.forward(&x)?.sum().backward();
    let dw = layer.weight().grad().expect("weight grad").to_vec();
    assert_eq!(dw, vec![5.0, 5.0, 7.0, 7.0, 9.0, 9.0]);
    let db = layer.bias().unwrap().grad().expect("bias grad").to_vec();
    assert_eq!(db, vec![2.0, 2.0]);
    Ok(())
}

#[test]
fn linear_init_is_seeded_and_kaiming_uniform() {
    let fan_in = 64;
    let bound = 1.0 / (fan_in as f32).sqrt();
    let a = Linear::new(fan_in, 128, &mut rng(3));
    let b = Linear::new(fan_in, 128, &mut rng(3));
    let c = Linear::new(fan_in, 128, &mut rng(4));
    assert_eq!(a.weight().to_vec(), b.weight().to_vec());
    assert_eq!(a.bias().unwrap().to_vec(), b.bias().unwrap().to_vec());
    assert_ne!(a.weight().to_vec(), c.weight().to_vec());

    let w = a.weight().to_vec();
    assert!(w.iter().all(|v| v.abs() <= bound));
    // Uniform on [-bound, bound): the extremes are nearly reached and the
    // variance is bound² / 3.
    let max = w.iter().fold(0.0_f32, |m, v| m.max(v.abs()));
    assert!(max > 0.99 * bound, "max |w| = {max}, bound = {bound}");
    let var = w.iter().map(|v| v * v).sum::<f32>() / w.len() as f32;
    let expected = bound * bound / 3.0;
    assert!((var - expected).abs() < 0.05 * expected, "variance {var}");
    assert!(a.bias().unwrap().to_vec().iter().all(|v| v.abs() <= bound));
    // Parameters are leaves that require grad.
    assert!(
        a.parameters()
            .iter()
            .all(|p| p.is_leaf() && p.requires_grad())
    );
}

#[test]
fn linear_reports_a_wrong_input_width() {
    let layer = Linear::new(4, 2, &mut rng(0));
    let err = layer.forward(&Tensor::zeros(&[3, 5])).unwrap_err();
    assert!(matches!(
        err,
        Error::MatmulShape {
            lhs_inner: 5,
            rhs_inner: 4,
            ..
        }
    ));
    assert!(matches!(
        Linear::try_new(4, 0, &mut rng(0)),
        Err(Error::InvalidArgument { op: "Linear", .. })
    ));
}

#[test]
fn activations_compute_their_functions() -> netcl::Result<()> {
    let x = Tensor::from_vec(vec![-2.0, 0.0, 3.0], &[1, 3])?;
    assert_eq!(ReLU::new().forward(&x)?.to_vec(), vec![0.0, 0.0, 3.0]);
    let s = Sigmoid::new().forward(&x)?.to_vec();
    let t = Tanh::new().forward(&x)?.to_vec();
    for (i, v) in [-2.0_f32, 0.0, 3.0].into_iter().enumerate() {
        assert!((s[i] - 1.0 / (1.0 + (-v).exp())).abs() < 1e-6);
        assert!((t[i] - v.tanh()).abs() < 1e-6);
    }
    Ok(())
}

#[test]
fn parameter_names_are_stable_and_prefixed() {
    let mut r = rng(0);
    let inner = Sequential::new()
        .with(Linear::new(2, 3, &mut r))
        .with(Tanh::new());
    let model = Sequential::new()
        .with(Linear::new(4, 2, &mut r))
        .with(inner)
        .with(Dropout::new(0.1, 0))
        .with(Linear::without_bias(3, 1, &mut r));
    assert_eq!(
        names(&model),
        ["0.weight", "0.bias", "1.0.weight", "1.0.bias", "3.weight"]
    );
    // The same model lists its parameters in the same order every time.
    assert_eq!(names(&model), names(&model));
    assert_eq!(model.parameters().len(), 5);

    let mlp = Mlp::new(&[64, 128, 10], Activation::Relu, &mut r);
    assert_eq!(
        names(&mlp),
        [
            "layers.0.weight",
            "layers.0.bias",
            "layers.2.weight",
            "layers.2.bias"
        ]
    );
    let shapes: Vec<Vec<usize>> = mlp
        .parameters()
        .iter()
        .map(|p| p.shape().to_vec())
        .collect();
    assert_eq!(shapes, [vec![64, 128], vec![128], vec![128, 10], vec![10]]);
}

#[test]
fn named_parameters_are_handles_not_copies() {
    let layer = Linear::new(2, 2, &mut rng(0));
    let (_, w) = layer.named_parameters().remove(0);
    w.with_data_mut(|mut v| v.fill(7.0));
    assert_eq!(layer.weight().to_vec(), vec![7.0; 4]);
}

#[test]
fn mlp_rejects_bad_widths() {
    for dims in [&[][..], &[4], &[4, 0, 2]] {
        let err = Mlp::try_new(dims, Activation::Tanh, &mut rng(0)).unwrap_err();
        assert!(
            matches!(err, Error::InvalidArgument { op: "Mlp", .. }),
            "{err}"
        );
    }
}

#[test]
fn mlp_is_linear_activation_linear() -> netcl::Result<()> {
    let mlp = Mlp::new(&[3, 4, 2], Activation::Sigmoid, &mut rng(5));
    let layers = mlp.layers();
    assert_eq!(layers.len(), 3);
    let x = Tensor::rand(&[5, 3], &mut rng(6));
    let by_hand = {
        let h = layers.get(0).unwrap().forward(&x)?.sigmoid();
        layers.get(2).unwrap().forward(&h)?
    };
    assert_eq!(mlp.forward(&x)?.to_vec(), by_hand.to_vec());
    Ok(())
}

#[test]
fn train_and_eval_reach_every_child() {
    let model = Sequential::new()
        .with(Linear::new(2, 2, &mut rng(0)))
        .with(Sequential::new().with(Dropout::new(0.5, 0)));
    assert!(model.is_training());
    model.eval();
    assert!(!model.is_training());
    assert!(model.iter().all(|layer| !layer.is_training()));
    let nested = model.get(1).unwrap();
    assert!(!nested.is_training());
    model.train();
    assert!(model.iter().all(|layer| layer.is_training()));
}

#[test]
fn zero_grad_clears_every_parameter() -> netcl::Result<()> {
    let mlp = Mlp::new(&[3, 4, 2], Activation::Relu, &mut rng(1));
    mlp.forward(&Tensor::ones(&[2, 3]))?.sum().backward();
    assert!(mlp.parameters().iter().all(|p| p.grad().is_some()));
    mlp.zero_grad();
    assert!(mlp.parameters().iter().all(|p| p.grad().is_none()));
    Ok(())
}

#[test]
fn dropout_differs_between_train_and_eval() -> netcl::Result<()> {
    let dropout = Dropout::new(0.25, 11);
    let x = Tensor::rand(&[8, 64], &mut rng(2)) + 1.0; // no zeros in x
    let xs = x.to_vec();

    let train = dropout.forward(&x)?.to_vec();
    assert_ne!(train, xs);
    let mut dropped = 0;
    for (y, x) in train.iter().zip(&xs) {
        if *y == 0.0 {
            dropped += 1;
        } else {
            // Kept values are scaled by 1 / (1 - p).
            assert!((y - x / 0.75).abs() < 1e-6);
        }
    }
    // 512 draws with p = 0.25: 128 expected, far from 0 and 512.
    assert!((80..180).contains(&dropped), "dropped {dropped}");

    dropout.eval();
    assert_eq!(dropout.forward(&x)?.to_vec(), xs);
    Ok(())
}

#[test]
fn dropout_gradient_flows_through_kept_elements_only() -> netcl::Result<()> {
    let dropout = Dropout::new(0.5, 3);
    let x = Tensor::ones(&[4, 16]).requires_grad_(true);
    let y = dropout.forward(&x)?;
    let mask = y.to_vec();
    y.sum().backward();
    // d sum(x * mask) / dx = mask.
    assert_eq!(x.grad().unwrap().to_vec(), mask);
    Ok(())
}

#[test]
fn dropout_is_deterministic_for_a_seed() -> netcl::Result<()> {
    let x = Tensor::ones(&[4, 32]);
    let a = Dropout::new(0.5, 99);
    let b = Dropout::new(0.5, 99);
    let c = Dropout::new(0.5, 100);
    let a1 = a.forward(&x)?.to_vec();
    let a2 = a.forward(&x)?.to_vec();
    assert_eq!(a1, b.forward(&x)?.to_vec());
    assert_eq!(a2, b.forward(&x)?.to_vec());
    assert_ne!(a1, a2, "successive calls draw new masks");
    assert_ne!(a1, c.forward(&x)?.to_vec(), "another seed, another mask");
    a.reset();
    assert_eq!(a.forward(&x)?.to_vec(), a1);
    Ok(())
}

#[test]
fn dropout_masks_on_a_thread_do_not_depend_on_other_threads() {
    // Each thread numbers its own calls of the layer, so a thread draws the
    // masks of calls 0..n of the seed whatever the other threads do with
    // the same layer at the same time.
    let threads = 4;
    let per_thread = 25;
    let bits = |y: Tensor| y.to_vec().iter().map(|v| v.to_bits()).collect::<Vec<u32>>();
    let x = Tensor::ones(&[2, 16]);
    let alone: Vec<Vec<u32>> = {
        let fresh = Dropout::new(0.5, 5);
        std::thread::scope(|s| {
            s.spawn(|| {
                (0..per_thread)
                    .map(|_| bits(fresh.forward(&x).unwrap()))
                    .collect()
            })
            .join()
            .unwrap()
        })
    };
    let shared = Dropout::new(0.5, 5);
    // The threads start together, so their calls interleave.
    let barrier = std::sync::Barrier::new(threads);
    let concurrent: Vec<Vec<Vec<u32>>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    barrier.wait();
                    (0..per_thread)
                        .map(|_| bits(shared.forward(&x).unwrap()))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for sequence in &concurrent {
        assert_eq!(sequence, &alone);
    }
    let distinct: BTreeSet<_> = alone.iter().collect();
    assert!(distinct.len() > 20, "masks should differ between calls");
}

#[test]
fn one_model_serves_many_threads() -> netcl::Result<()> {
    let model = Arc::new(Mlp::new(&[8, 16, 3], Activation::Tanh, &mut rng(9)));
    model.eval();
    let inputs: Vec<Tensor> = (0..8).map(|i| Tensor::rand(&[4, 8], &mut rng(i))).collect();
    let expected: Vec<Vec<f32>> = inputs
        .iter()
        .map(|x| model.forward(x).map(|y| y.to_vec()))
        .collect::<netcl::Result<_>>()?;
    let tape = autograd::current_tape();
    let recorded = tape.stats().recorded;
    std::thread::scope(|s| {
        for (x, want) in inputs.iter().zip(&expected) {
            let model = Arc::clone(&model);
            s.spawn(move || {
                let _guard = autograd::no_grad();
                let y = model.forward(x).unwrap();
                assert!(!y.requires_grad());
                assert_eq!(&y.to_vec(), want);
            });
        }
    });
    // The worker threads recorded nothing anywhere, this thread's tape included.
    assert_eq!(tape.stats().recorded, recorded);
    Ok(())
}

#[test]
fn boxed_and_shared_modules_are_modules() -> netcl::Result<()> {
    let layer: Box<dyn Module> = Box::new(Linear::new(2, 3, &mut rng(0)));
    let shared: Arc<dyn Module> = Arc::new(ReLU::new());
    let chain = Sequential::new().with(layer).with(shared);
    assert_eq!(chain.forward(&Tensor::ones(&[1, 2]))?.shape(), &[1, 3]);
    assert_eq!(format!("{:?}", chain.get(1).unwrap()), "ReLU");
    Ok(())
}

mod weight_tying {
    use netcl::Tensor;
    use netcl::nn::{Linear, Module, Published, Sequential, fork_scope};

    /// `Linear(1→1, w) → Linear(1→1, w)` sharing `w`, second with bias 0.5.
    fn tied(w: f32) -> (Tensor, Sequential) {
        let w = Tensor::from_vec(vec![w], &[1, 1]).unwrap();
        let b = Tensor::from_vec(vec![0.5], &[1]).unwrap();
        let model = Sequential::new()
            .with(Linear::from_parts(w.clone(), None).unwrap())
            .with(Linear::from_parts(w.clone(), Some(b)).unwrap());
        (w, model)
    }

    #[test]
    fn a_tied_weight_is_one_parameter_with_both_layers_gradients() {
        let (w, model) = tied(3.0);
        let names: Vec<String> = model
            .named_parameters()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(names, ["0.weight", "1.weight", "1.bias"]);
        assert_eq!(model.parameters().len(), 2);
        assert_eq!(model.num_parameters(), 2);
        // y = w·(w·x) + b at x = 2: dy/dw = 2·w·x = 12 (6 from each layer).
        let y = model.forward(&Tensor::full(&[1, 1], 2.0)).unwrap();
        assert_eq!(y.item(), 18.5);
        y.sum().backward();
        assert_eq!(w.grad().unwrap().to_vec(), [12.0]);
    }

    #[test]
    fn a_tied_weight_is_saved_once_and_loads_without_its_alias() {
        let (_, model) = tied(3.0);
        let path = std::env::temp_dir().join(format!("netcl-tied-{}.st", std::process::id()));
        netcl::io::save(&model, &path).unwrap();
        let names: Vec<String> = netcl::io::read_tensors(&path)
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(names, ["0.weight", "1.bias"]);
        let (w, fresh) = tied(0.0);
        netcl::io::load(&fresh, &path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(w.to_vec(), [3.0], "both layers read the loaded weight");
        let y = fresh.forward(&Tensor::ones(&[1, 1])).unwrap();
        assert_eq!(y.item(), 9.5);
    }

    #[test]
    fn a_tied_weight_loads_from_any_of_its_names() {
        // Only the second name (as PyTorch's save_model may keep): read
        // from it.
        let w = Tensor::from_vec(vec![4.0], &[1, 1]).unwrap();
        let b = Tensor::from_vec(vec![0.5], &[1]).unwrap();
        let second_only = Sequential::new()
            .with(netcl::nn::ReLU::new())
            .with(Linear::from_parts(w, Some(b)).unwrap());
        let bytes = netcl::io::to_bytes(&second_only).unwrap();
        let (w, model) = tied(0.0);
        netcl::io::load_bytes(&model, &bytes).unwrap();
        assert_eq!(w.to_vec(), [4.0]);

        // Both names (an untied model's file): the first name wins.
        let both = Sequential::new()
            .with(Linear::from_parts(Tensor::full(&[1, 1], 2.0), None).unwrap())
            .with(
                Linear::from_parts(Tensor::full(&[1, 1], 3.0), Some(Tensor::zeros(&[1]))).unwrap(),
            );
        netcl::io::load_bytes(&model, &netcl::io::to_bytes(&both).unwrap()).unwrap();
        assert_eq!(w.to_vec(), [2.0]);

        // Neither: missing under its first name.
        let neither = netcl::io::to_bytes(&Linear::zeros(1, 1).unwrap()).unwrap();
        match netcl::io::load_bytes(&model, &neither).unwrap_err() {
            netcl::Error::ParameterNames { missing, .. } => {
                assert_eq!(missing, ["0.weight", "1.bias"])
            }
            other => panic!("{other}"),
        }
    }

    #[test]
    fn clones_forks_and_versions_keep_the_tie() {
        let (w, model) = tied(3.0);
        let fork = model.try_clone().unwrap();
        assert_eq!(fork.parameters().len(), 2, "still tied");
        let shared = &fork.parameters()[0];
        shared.with_data_mut(|mut v| v.fill(1.0));
        let x = Tensor::ones(&[1, 1]);
        assert_eq!(
            fork.forward(&x).unwrap().item(),
            1.5,
            "both layers of the fork changed"
        );
        assert_eq!(w.to_vec(), [3.0], "the original did not");

        let published = Published::new(&model).unwrap();
        assert_eq!(published.load().parameters().len(), 2);

        // Outside a scope, two forks of one tensor are two tensors; inside,
        // one.
        let (a, b) = fork_scope(|| (w.fork(), w.fork()));
        a.with_data_mut(|mut v| v.fill(7.0));
        assert_eq!(b.to_vec(), [7.0]);
        let (c, d) = (w.fork(), w.fork());
        c.with_data_mut(|mut v| v.fill(7.0));
        assert_eq!(d.to_vec(), [3.0]);
    }
}

/// An output layer tied to an embedding table ([vocab, d], PyTorch's
/// layout for both), in a custom container as a language model holds them.
mod tied_embedding_head {
    use netcl::functional::embedding;
    use netcl::nn::{Module, TiedLinear, fork_scope};
    use netcl::{Result, Tensor};

    #[derive(Debug)]
    struct TinyLm {
        table: Tensor,
        head: TiedLinear,
    }

    impl TinyLm {
        fn new(values: Vec<f32>) -> TinyLm {
            let table = Tensor::from_vec(values, &[3, 2])
                .unwrap()
                .requires_grad_(true);
            let head = TiedLinear::new(&table, Some(Tensor::zeros(&[3])));
            TinyLm { table, head }
        }
    }

    impl Module for TinyLm {
        fn forward(&self, ids: &Tensor) -> Result<Tensor> {
            self.head.forward(&embedding(ids, &self.table))
        }
        fn named_parameters(&self) -> Vec<(String, Tensor)> {
            let mut params = vec![("embed.weight".to_string(), self.table.clone())];
            for (name, p) in self.head.named_parameters() {
                params.push((format!("head.{name}"), p));
            }
            params
        }
        fn try_fork(&self) -> Result<Box<dyn Module>> {
            // One scope: the head's fork of the table is the table's fork.
            fork_scope(|| {
                let table = self.table.fork();
                let head = self.head.clone();
                assert!(head.weight().same_tensor(&table));
                Ok(Box::new(TinyLm { table, head }) as Box<dyn Module>)
            })
        }
    }

    #[test]
    fn the_head_shares_the_table_in_training_checkpoints_and_forks() {
        let lm = TinyLm::new(vec![1.0, 0.0, 0.0, 1.0, 1.0, 1.0]);
        assert_eq!(lm.parameters().len(), 2, "the table once, the head's bias");
        let path = std::env::temp_dir().join(format!("netcl-tiedlm-{}.st", std::process::id()));
        netcl::io::save_torch(&lm, &path).unwrap();
        let names: Vec<String> = netcl::io::read_tensors(&path)
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(names, ["embed.weight", "head.bias"]);
        let fresh = TinyLm::new(vec![0.0; 6]);
        netcl::io::load_torch(&fresh, &path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(fresh.head.weight().to_vec(), lm.table.to_vec());

        let fork = lm.try_fork().unwrap();
        fork.parameters()[0].with_data_mut(|mut t| t.fill(0.0));
        let ids = Tensor::from_vec(vec![2.0], &[1]).unwrap();
        assert_eq!(fork.forward(&ids).unwrap().to_vec(), [0.0; 3]);
        assert_eq!(lm.forward(&ids).unwrap().to_vec(), [1.0, 1.0, 2.0]);
    }
}
