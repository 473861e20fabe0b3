//! Trains a character-level transformer language model
//! ([`netcl::models::CharTransformer`]: 4 blocks, width 128, 4 heads, a
//! context of 64 characters) on the King James Bible in `data/kjv.txt`
//! (public domain except in the UK, where Crown copyright applies; see
//! `data/kjv.LICENSE`), with AdamW. It prints the training and validation
//! loss in bits per character, a generated sample, and saves the model with
//! its vocabulary to `charlm.safetensors`.
//!
//! Run with `cargo run --release --example train_charlm [-- --steps 2000]`
//! (`-- --help` lists the options). The first 90% of the text trains, the
//! rest validates (256 fixed windows spread over it). Each step trains on
//! 32 windows of 65 characters at random offsets (from `--seed`), or at the
//! offsets listed in a file given with `--batch-order` (one line per step,
//! as `data/charlm_batches.txt`, written by `scripts/charlm_batches.py`).
//! `--init` starts from a PyTorch `state_dict` (safetensors) instead of a
//! random initialisation: `scripts/charlm_pytorch.py` trains the same model
//! in PyTorch from the same file and batch order, to compare the losses.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use netcl::models::{CharLmConfig, CharTransformer, Vocab, lm_batch};
use netcl::nn::Module;
use netcl::optim::{AdamConfig, AdamW, Optimizer, clip_grad_norm, no_decay_groups};
use netcl::rand::rngs::StdRng;
use netcl::rand::{RngExt, SeedableRng};
use netcl::{Tensor, autograd, io};

/// The hyperparameters shared with scripts/charlm_pytorch.py.
const LR: f32 = 2e-3;
const BETAS: (f32, f32) = (0.9, 0.99);
const WEIGHT_DECAY: f32 = 0.1;
const CLIP: f32 = 1.0;
const VAL_WINDOWS: usize = 256;
const EVAL_BATCH: usize = 64;
const PROMPT: &str = "And God said";

/// Trains a character-level transformer on data/kjv.txt and prints the
/// training and validation loss in bits per character and a sample.
#[derive(Parser, Debug)]
#[command(name = "train_charlm")]
struct Args {
    /// Optimisation steps (AdamW, one batch each).
    #[arg(long, default_value_t = 1000)]
    steps: usize,
    /// Seed of the initialisation, the batch order and the sample.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Read each step's batch offsets from FILE (one line per step) instead
    /// of drawing them.
    #[arg(long, value_name = "FILE")]
    batch_order: Option<PathBuf>,
    /// Start from this PyTorch state_dict (safetensors) instead of a random
    /// initialisation.
    #[arg(long, value_name = "FILE")]
    init: Option<PathBuf>,
    /// Sequences per batch.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Dropout on the embeddings.
    #[arg(long, default_value_t = 0.0)]
    dropout: f32,
    /// Where to save the trained model.
    #[arg(long, value_name = "FILE", default_value = "charlm.safetensors")]
    out: PathBuf,
    /// Characters to generate after training.
    #[arg(long, default_value_t = 300)]
    sample_len: usize,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}

type BoxResult<T> = Result<T, Box<dyn std::error::Error>>;

/// The corpus as ids: (vocabulary, training ids, validation ids).
fn corpus() -> BoxResult<(Vocab, Vec<usize>, Vec<usize>)> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/kjv.txt");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let vocab = Vocab::from_text(&text);
    let ids = vocab.encode(&text)?;
    let split = ids.len() * 9 / 10;
    Ok((vocab, ids[..split].to_vec(), ids[split..].to_vec()))
}

/// The start offsets of the validation windows: `VAL_WINDOWS` evenly spaced.
fn val_offsets(val_len: usize, context: usize) -> Vec<usize> {
    let stride = (val_len - context - 1) / VAL_WINDOWS;
    (0..VAL_WINDOWS).map(|i| i * stride).collect()
}

/// The batch order of a file: one line per step, whitespace-separated
/// offsets; lines starting with `#` are comments.
fn read_batch_order(path: &Path, batch: usize, max_offset: usize) -> BoxResult<Vec<Vec<usize>>> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut steps = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let offsets = line
            .split_whitespace()
            .map(|w| w.parse::<usize>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("{}:{}: {e}", path.display(), n + 1))?;
        if offsets.len() != batch || offsets.iter().any(|&o| o > max_offset) {
            return Err(format!(
                "{}:{}: expected {batch} offsets of at most {max_offset}, got {line:?}",
                path.display(),
                n + 1
            )
            .into());
        }
        steps.push(offsets);
    }
    Ok(steps)
}

/// The mean loss, in nats per character, over the windows at `offsets`.
fn evaluate(model: &CharTransformer, ids: &[usize], offsets: &[usize]) -> BoxResult<f32> {
    let _no_grad = autograd::no_grad();
    let _eval = autograd::eval_mode();
    let context = model.config().context;
    let mut total = 0.0;
    for chunk in offsets.chunks(EVAL_BATCH) {
        let (x, y) = lm_batch(ids, chunk, context)?;
        total += model.loss(&x, &y)?.item() * chunk.len() as f32;
    }
    Ok(total / offsets.len() as f32)
}

/// One AdamW step on the batch at `offsets`; returns the loss in nats.
fn train_step(
    model: &CharTransformer,
    optimizer: &mut AdamW,
    params: &[Tensor],
    ids: &[usize],
    offsets: &[usize],
) -> BoxResult<f32> {
    let (x, y) = lm_batch(ids, offsets, model.config().context)?;
    let loss = model.loss(&x, &y)?;
    loss.try_backward()?;
    clip_grad_norm(params, CLIP, 2.0);
    optimizer.step();
    optimizer.zero_grad();
    Ok(loss.item())
}

fn optimizer(model: &CharTransformer) -> AdamW {
    AdamW::with_groups(
        no_decay_groups(model.parameters()),
        AdamConfig::new(LR)
            .betas(BETAS.0, BETAS.1)
            .weight_decay(WEIGHT_DECAY),
    )
}

fn bits(nats: f32) -> f32 {
    nats / std::f32::consts::LN_2
}

fn run(args: &Args) -> BoxResult<()> {
    let (vocab, train, val) = corpus()?;
    let config = CharLmConfig::new(vocab.len()).with_dropout(args.dropout);
    let context = config.context;
    println!(
        "data/kjv.txt: {} characters for training, {} for validation, {} distinct",
        train.len(),
        val.len(),
        vocab.len()
    );
    let mut rng = StdRng::seed_from_u64(args.seed);
    let model = CharTransformer::try_new(config, &mut rng)?;
    if let Some(init) = &args.init {
        io::load_torch(&model, init)?;
        println!("initial weights from {}", init.display());
    }
    println!(
        "model: {} blocks, width {}, {} heads, context {}: {} parameters",
        config.num_blocks,
        config.d_model,
        config.num_heads,
        context,
        model.num_parameters()
    );
    let max_offset = train.len() - context - 1;
    let order = match &args.batch_order {
        Some(path) => {
            let order = read_batch_order(path, args.batch_size, max_offset)?;
            if order.len() < args.steps {
                return Err(format!(
                    "{} lists {} steps, fewer than --steps {}",
                    path.display(),
                    order.len(),
                    args.steps
                )
                .into());
            }
            Some(order)
        }
        None => None,
    };
    let val_at = val_offsets(val.len(), context);

    let mut optimizer = optimizer(&model);
    let params = model.parameters();
    let bar = ProgressBar::new(args.steps as u64).with_style(
        ProgressStyle::with_template("[{bar:30}] {pos}/{len} steps, {msg} ({elapsed}, eta {eta})")
            .map(|s| s.progress_chars("=> "))
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let start = Instant::now();
    let mut recent = Vec::new();
    let mut offsets = vec![0; args.batch_size];
    for step in 0..args.steps {
        match &order {
            Some(order) => offsets.copy_from_slice(&order[step]),
            None => {
                for o in offsets.iter_mut() {
                    *o = rng.random_range(0..=max_offset);
                }
            }
        }
        let loss = {
            let _train = autograd::train_mode();
            train_step(&model, &mut optimizer, &params, &train, &offsets)?
        };
        recent.push(loss);
        if recent.len() > 50 {
            recent.remove(0);
        }
        let mean = recent.iter().sum::<f32>() / recent.len() as f32;
        bar.set_message(format!("train {:.3} bits/char", bits(mean)));
        bar.inc(1);
    }
    bar.finish_and_clear();
    let seconds = start.elapsed().as_secs_f64();
    println!(
        "trained {} steps of {} sequences in {seconds:.1} s ({:.1} ms per step)",
        args.steps,
        args.batch_size,
        1e3 * seconds / args.steps.max(1) as f64
    );
    if let Some(last) = recent.last() {
        println!(
            "train loss: {:.4} bits per character (last step), {:.4} (mean of the last {})",
            bits(*last),
            bits(recent.iter().sum::<f32>() / recent.len() as f32),
            recent.len()
        );
    }
    let val_loss = evaluate(&model, &val, &val_at)?;
    println!(
        "validation loss: {:.4} bits per character ({val_loss:.4} nats)",
        bits(val_loss)
    );

    model.save(&vocab, &args.out)?;
    println!("saved {}", args.out.display());
    let prompt = vocab.encode(PROMPT)?;
    let sample = model.try_generate(&prompt, args.sample_len, 0.8, None, args.seed)?;
    println!("sample:\n{PROMPT}{}", vocab.decode(&sample)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::error::ErrorKind;
    use clap::{CommandFactory, Parser};
    use netcl::models::{CharLmConfig, CharTransformer};
    use netcl::rand::SeedableRng;
    use netcl::rand::rngs::StdRng;

    use super::{Args, evaluate, optimizer, train_step};

    #[test]
    fn the_command_line_definition_is_consistent() {
        Args::command().debug_assert();
    }

    #[test]
    fn help_is_a_usage_message_not_a_run() {
        let err = Args::try_parse_from(["train_charlm", "--help"]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::DisplayHelp);
        let help = err.to_string();
        for flag in ["--steps", "--seed", "--batch-order"] {
            assert!(help.contains(flag), "{help}");
        }
        let args = Args::try_parse_from(["train_charlm", "--steps", "3", "--seed", "1"]).unwrap();
        assert_eq!((args.steps, args.seed), (3, 1));
        let err = Args::try_parse_from(["train_charlm", "--epochs", "3"]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::UnknownArgument);
    }

    /// A few steps on a small model and a short text: the loss on the
    /// training windows goes down.
    #[test]
    fn a_few_steps_lower_the_loss() {
        let text = "In the beginning God created the heaven and the earth. ".repeat(20);
        let vocab = netcl::models::Vocab::from_text(&text);
        let ids = vocab.encode(&text).unwrap();
        let config = CharLmConfig::new(vocab.len())
            .with_width(32)
            .with_blocks(2)
            .with_context(16);
        let model = CharTransformer::new(config, &mut StdRng::seed_from_u64(0));
        let mut adamw = optimizer(&model);
        let params = netcl::nn::Module::parameters(&model);
        let offsets: Vec<usize> = (0..8).map(|i| i * 37).collect();
        let before = evaluate(&model, &ids, &offsets).unwrap();
        for _ in 0..15 {
            train_step(&model, &mut adamw, &params, &ids, &offsets).unwrap();
        }
        let after = evaluate(&model, &ids, &offsets).unwrap();
        assert!(after < 0.8 * before, "loss {before} -> {after}");
    }
}
