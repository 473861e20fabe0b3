//! Trains the digits CNN of [`netcl::models::digits_cnn`] (conv, batch
//! norm, ReLU, max pooling, twice, then a linear head) on the 8x8
//! handwritten digits in `data/digits.csv` read as `[1, 8, 8]` images, with
//! the same 80/20 split as `train_digits`. Prints the metrics of each epoch;
//! the last line printed is `test accuracy: X%`.
//!
//! Run with `cargo run --release --example train_cnn [-- --seed 3]`
//! (`-- --help` prints the options and trains nothing). The data is found
//! from the crate's directory, so it runs from anywhere; nothing is written
//! unless `--save PATH` is given.
//!
//! `--save digits_cnn.safetensors` writes the trained model as a
//! self-describing checkpoint (`netcl::io::save_model_with_metadata`: the
//! architecture beside the weights) that `netcl-serve --model
//! cnn=digits_cnn.safetensors` serves as it is. Its metadata tells the
//! server what a row is: `netcl-serve.input` = `digits` (64 raw pixels in
//! `0..=16`, divided by 16 by the server as this example divides them) and
//! `netcl-serve.input_shape` = `1,8,8` (the 64 pixels, row-major, as one
//! 1x8x8 image), so a client posts the same rows as to the digits MLP.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;
use netcl::data::{self, TensorDataset};
use netcl::models;
use netcl::nn::Module;
use netcl::optim::{Adam, AdamConfig, CosineAnnealing};
use netcl::train::Trainer;

/// The seed of the 80/20 split: the split `train_digits` uses.
const SPLIT_SEED: u64 = 42;

/// Trains a small CNN (conv-BN-ReLU-pool twice, then a linear head) on the
/// 8x8 handwritten digits of data/digits.csv and prints its test accuracy.
#[derive(Parser, Debug)]
#[command(name = "train_cnn")]
struct Args {
    /// Seed of the initialisation and of the batch order (the train/test
    /// split is fixed).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Training epochs.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    epochs: u64,
    /// Peak learning rate of Adam (annealed along a cosine to 1% of it).
    #[arg(long, default_value_t = 3e-3)]
    lr: f32,
    /// Samples per training batch.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..))]
    batch_size: u64,
    /// Save the trained model to PATH as a self-describing checkpoint that
    /// `netcl-serve --model cnn=PATH` serves (rows of 64 raw pixels, 0..16).
    #[arg(long, value_name = "PATH")]
    save: Option<PathBuf>,
}

/// The metadata key of netcl-serve naming a known input
/// (`netcl_serve::loader::INPUT_KEY`).
const SERVE_INPUT_KEY: &str = "netcl-serve.input";

/// The metadata key of netcl-serve holding one row's shape
/// (`netcl_serve::loader::INPUT_SHAPE_KEY`).
const SERVE_INPUT_SHAPE_KEY: &str = "netcl-serve.input_shape";

/// What netcl-serve needs to serve the CNN: its rows are the digits' raw
/// pixels (scaled by the server as [`digits`] scales them), as 1x8x8
/// images.
fn serve_metadata() -> BTreeMap<String, String> {
    BTreeMap::from([
        (SERVE_INPUT_KEY.to_string(), "digits".to_string()),
        (SERVE_INPUT_SHAPE_KEY.to_string(), "1,8,8".to_string()),
    ])
}

/// Saves `model` to `path` as a checkpoint netcl-serve serves: the
/// architecture, the weights and [`serve_metadata`].
fn save_for_serving<M: Module + ?Sized>(model: &M, path: &Path) -> Result<(), netcl::Error> {
    netcl::io::save_model_with_metadata(model, path, &serve_metadata())
}

fn main() -> ExitCode {
    // `--help` and invalid flags end here, before any work.
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}

/// The digits as `[N, 1, 8, 8]` images in [0, 1], split 80/20 as
/// `train_digits` splits them.
fn digits() -> Result<(TensorDataset, TensorDataset), netcl::Error> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/digits.csv");
    let digits = data::load_digits(&path)?;
    let n = digits.inputs().shape()[0];
    let images = (digits.inputs() / 16.0).try_reshape(&[n, 1, 8, 8])?;
    TensorDataset::new(images, digits.targets().clone())?.split(0.8, SPLIT_SEED)
}

/// A trainer of a fresh CNN on `train_set` with `args`' recipe: Adam, a
/// cosine schedule over the epochs, shuffled batches.
fn trainer(
    args: &Args,
    train_set: TensorDataset,
    eval_set: TensorDataset,
) -> Result<Trainer<netcl::nn::Sequential, Adam>, netcl::Error> {
    let model = models::try_digits_cnn(args.seed)?;
    let optimizer = Adam::new(model.parameters(), AdamConfig::new(args.lr));
    let epochs = usize::try_from(args.epochs).unwrap_or(usize::MAX);
    Ok(Trainer::new(model, optimizer, train_set)
        .batch_size(usize::try_from(args.batch_size).unwrap_or(usize::MAX))
        .seed(args.seed)
        .eval_set(eval_set)
        .schedule(CosineAnnealing::new(args.lr, args.lr * 0.01, epochs)))
}

fn run(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    let (train_set, test_set) = digits()?;
    println!(
        "digits: {} training and {} test images of 1x8x8; seed {}",
        train_set.inputs().shape()[0],
        test_set.inputs().shape()[0],
        args.seed
    );
    let mut trainer = trainer(args, train_set, test_set)?;
    for _ in 0..args.epochs {
        for metrics in trainer.fit(1)? {
            println!("{metrics}");
        }
    }
    let result = trainer.evaluate()?;
    let seconds: f64 = trainer.history().iter().map(|m| m.seconds).sum();
    println!("trained {} epochs in {seconds:.2} s", args.epochs);
    if let Some(path) = &args.save {
        save_for_serving(trainer.model(), path)?;
        println!("saved {}", path.display());
    }
    println!("test accuracy: {:.2}%", 100.0 * result.accuracy);
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::error::ErrorKind;
    use clap::{CommandFactory, Parser};
    use netcl::data::{DataLoader, Dataset};
    use netcl::nn::Module;
    use netcl::optim::{Adam, AdamConfig, Optimizer};

    use super::{Args, SERVE_INPUT_KEY, SERVE_INPUT_SHAPE_KEY, digits, save_for_serving, trainer};

    #[test]
    fn the_command_line_definition_is_consistent() {
        Args::command().debug_assert();
    }

    #[test]
    fn flags_parse_and_defaults_hold() {
        let args = Args::try_parse_from(["train_cnn"]).unwrap();
        assert_eq!((args.seed, args.epochs, args.batch_size), (0, 30, 32));
        let args = Args::try_parse_from(["train_cnn", "--seed", "4", "--epochs", "2"]).unwrap();
        assert_eq!((args.seed, args.epochs), (4, 2));
        assert_eq!(args.save, None);
        let args = Args::try_parse_from(["train_cnn", "--save", "cnn.safetensors"]).unwrap();
        assert_eq!(
            args.save.as_deref(),
            Some(std::path::Path::new("cnn.safetensors"))
        );
    }

    #[test]
    fn help_is_a_usage_message_not_a_run() {
        let err = Args::try_parse_from(["train_cnn", "--help"]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::DisplayHelp);
        let help = err.to_string();
        assert!(help.contains("Usage: train_cnn [OPTIONS]"), "{help}");
        for flag in ["--seed", "--epochs", "--lr", "--batch-size", "--save"] {
            assert!(help.contains(flag), "{flag}: {help}");
        }
    }

    #[test]
    fn bad_flags_are_rejected() {
        for (args, kind) in [
            (&["train_cnn", "--sed", "3"][..], ErrorKind::UnknownArgument),
            (&["train_cnn", "extra"], ErrorKind::UnknownArgument),
            (&["train_cnn", "--epochs", "0"], ErrorKind::ValueValidation),
            (&["train_cnn", "--seed", "-1"], ErrorKind::UnknownArgument),
        ] {
            let err = Args::try_parse_from(args).unwrap_err();
            assert_eq!(err.kind(), kind, "{args:?}");
        }
    }

    #[test]
    fn the_data_are_images_split_as_train_digits_splits_them() {
        let (train, test) = digits().unwrap();
        assert_eq!((train.len(), test.len()), (1437, 360));
        assert_eq!(train.inputs().shape(), &[1437, 1, 8, 8]);
        let pixels = train.inputs().to_vec();
        assert!(pixels.iter().all(|v| (0.0..=1.0).contains(v)));
    }

    #[test]
    fn a_few_steps_on_one_batch_lower_its_loss() {
        // Twenty Adam steps on one batch of 64 images, through the
        // example's model: the batch's loss (training mode, as in
        // training) falls well below its starting value.
        let (train, _) = digits().unwrap();
        let batch = DataLoader::new(train, 64)
            .shuffle(1)
            .epoch(0)
            .next()
            .unwrap()
            .unwrap();
        let model = netcl::models::digits_cnn(1);
        let mut optimizer = Adam::new(model.parameters(), AdamConfig::new(3e-3));
        let _train = netcl::nn::train_mode();
        let loss = || {
            model
                .forward(&batch.inputs)
                .unwrap()
                .cross_entropy(&batch.targets)
        };
        let first = loss().item();
        for _ in 0..20 {
            let l = loss();
            l.backward();
            optimizer.step();
            optimizer.zero_grad();
        }
        let last = loss().item();
        assert!(first.is_finite() && last.is_finite());
        assert!(last < 0.5 * first, "loss {first} -> {last}");
    }

    #[test]
    fn the_saved_checkpoint_loads_as_a_ready_model_that_predicts_the_same_classes() {
        // One epoch of the example's recipe (batch norm's running
        // statistics move, so the buffers matter), saved with --save's
        // function, loaded back with no code: the same architecture, the
        // metadata netcl-serve reads, and the same logits and classes as
        // the model in memory on the held-out images, in eval mode.
        let (train, test) = digits().unwrap();
        let args = Args::try_parse_from(["train_cnn", "--epochs", "1", "--seed", "2"]).unwrap();
        let mut trainer = trainer(&args, train, test.clone()).unwrap();
        trainer.fit(1).unwrap();
        let model = trainer.model();
        let path = std::env::temp_dir().join(format!(
            "netcl-train-cnn-save-{}.safetensors",
            std::process::id()
        ));
        save_for_serving(model, &path).unwrap();

        let checkpoint = netcl::io::load_checkpoint(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(
            Some(&checkpoint.architecture),
            model.architecture().as_ref()
        );
        assert_eq!(checkpoint.metadata[SERVE_INPUT_KEY], "digits");
        assert_eq!(checkpoint.metadata[SERVE_INPUT_SHAPE_KEY], "1,8,8");

        // What the server does to a raw row (64 pixels in 0..=16): divide
        // by 16 and shape it as 1x8x8; that is the example's test image.
        let raw = test.inputs() * 16.0;
        let n = raw.shape()[0];
        let served_input = (&raw.try_reshape(&[n, 64]).unwrap() / 16.0)
            .try_reshape(&[n, 1, 8, 8])
            .unwrap();
        assert_eq!(served_input.to_vec(), test.inputs().to_vec());

        let _no_grad = netcl::autograd::no_grad();
        let _eval = netcl::nn::eval_mode();
        let expected = model.forward(test.inputs()).unwrap();
        let loaded = checkpoint.model.forward(&served_input).unwrap();
        assert_eq!(loaded.to_vec(), expected.to_vec());
        let classes = expected.argmax(-1).to_vec();
        assert_eq!(loaded.argmax(-1).to_vec(), classes);
        // A trained model, not a constant one: several classes predicted,
        // and mostly the right ones.
        let distinct: std::collections::BTreeSet<u32> = classes.iter().map(|&c| c as u32).collect();
        assert!(distinct.len() >= 8, "{distinct:?}");
        let right = classes
            .iter()
            .zip(test.targets().to_vec())
            .filter(|(c, t)| *c == t)
            .count();
        assert!(right * 10 > n * 7, "{right} of {n} right");
    }
}
