//! Where `--model NAME=PATH` models come from: a [`ModelLoader`] turns a
//! checkpoint file into a ready model and says what its rows are, and
//! [`candidates`] finds the files of a PATH that is a checkpoint or a
//! directory of numbered versions.
//!
//! [`CheckpointLoader`], the binary's loader, reads any model from a
//! self-describing checkpoint (`netcl::io::save_model`: the architecture
//! in the metadata) and falls back to the digits MLP's layout
//! ([`DigitsMlpLoader`], as `--weights` reads) for plain weight files.
//!
//! # The input of a loaded model
//!
//! A self-describing checkpoint says what the model is, not what its rows
//! are; [`CheckpointLoader`] finds them in this order:
//!
//! 1. the metadata key [`INPUT_KEY`] (`netcl-serve.input`) = `digits`: the
//!    digits MLP's rows (64 raw pixels in `0..=16`, scaled by the server to
//!    `[0, 1]` by dividing by 16; held-out accuracy measured at load). The
//!    trainer writes it. With [`INPUT_SHAPE_KEY`] beside it (64 numbers in
//!    all, such as `1,8,8`), the model sees those pixels in that shape: a
//!    client posts the same 64 raw pixels, and the digits CNN
//!    (`cargo run --release --example train_cnn -- --save PATH` writes both
//!    keys) gets them as `[rows, 1, 8, 8]` images.
//! 2. the metadata key [`INPUT_SHAPE_KEY`] (`netcl-serve.input_shape`):
//!    one row's shape as comma-separated sizes (`64`, or `1,8,8` for
//!    one-channel 8x8 images), written beside the architecture with
//!    `netcl::io::save_model_with_metadata`;
//! 3. else the architecture's first layer (through `Sequential`s): a
//!    `Linear`'s `in_features` or an `Mlp`'s first size give rows of that
//!    width. Any other first layer (a `Conv2d`, say) needs the key of 2:
//!    the loader refuses the file and says so.
//!
//! Responses carry classes and probabilities ([`OutputSpec::Classes`]).
//!
//! # Language models
//!
//! A checkpoint of a `CharTransformer` (written by `CharTransformer::save`
//! or `netcl::io::save_model` with its vocabulary, as `cargo run --release
//! --example train_charlm` writes `charlm.safetensors`; or by an older
//! `CharTransformer::save`, the sizes and vocabulary as plain metadata
//! keys) loads as a language model:
//! [`Loaded::generation`] holds its vocabulary and sizes, and it answers
//! `POST /v1/models/{name}/generate` only (see [`crate::generate`]).
//!
//! # A directory of versions
//!
//! PATH may be a directory holding versions named by number, TF Serving
//! style: `PATH/7.safetensors` or `PATH/7/model.safetensors`. The highest
//! one that loads is served; a lower one is tried when a higher one does
//! not load (say it is still being written by hand), and anything else in
//! the directory (`7.safetensors.tmp`, `notes.txt`) is ignored. The
//! version served is the directory entry's number.

use std::fmt;
use std::path::{Path, PathBuf};

use netcl::data::TensorDataset;
use netcl::nn::Module;

use crate::generate::LanguageModel;
use crate::model::{
    CheckpointError, Digits, FEATURES, PIXEL_MAX, STEPS_KEY, VERSION_KEY, accuracy,
    read_checkpoint, scale,
};
use crate::service::{InputSpec, OutputSpec};

/// A model read from a checkpoint, ready to serve.
pub struct Loaded {
    /// The model.
    pub model: Box<dyn Module>,
    /// The version stored with it (0 if none).
    pub version: u64,
    /// The training steps stored with it (0 if none).
    pub steps: u64,
    /// Its held-out accuracy, if the loader can measure one.
    pub accuracy: Option<f32>,
    /// What one of its input rows is.
    pub input: InputSpec,
    /// What its responses carry.
    pub output: OutputSpec,
    /// For a language model: its vocabulary and sizes (it then answers
    /// generate, not predict).
    pub generation: Option<LanguageModel>,
}

impl fmt::Debug for Loaded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Loaded")
            .field("version", &self.version)
            .field("steps", &self.steps)
            .field("accuracy", &self.accuracy)
            .field("input", &self.input)
            .field("output", &self.output)
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

/// Turns a checkpoint file into a model to serve.
pub trait ModelLoader: Send + Sync + fmt::Debug {
    /// Reads the checkpoint at `path`.
    ///
    /// # Errors
    ///
    /// A [`CheckpointError`] naming the file and what is wrong with it.
    fn load(&self, path: &Path) -> Result<Loaded, CheckpointError>;
}

/// Reads checkpoints of the digits MLP (64 raw pixels in `0..=16` per row,
/// scaled by the server; 10 classes), measuring each one's held-out
/// accuracy.
#[derive(Debug, Clone)]
pub struct DigitsMlpLoader {
    digits: Digits,
}

impl DigitsMlpLoader {
    /// A loader measuring accuracy on `digits`' held-out split.
    pub fn new(digits: Digits) -> DigitsMlpLoader {
        DigitsMlpLoader { digits }
    }

    /// What a digits row is: 64 raw pixels in `0..=16`, scaled to `[0, 1]`
    /// before the forward.
    pub fn input() -> InputSpec {
        InputSpec::rows(FEATURES)
            .range(0.0, PIXEL_MAX)
            .preprocess(|raw| Ok(scale(raw)))
    }
}

impl ModelLoader for DigitsMlpLoader {
    fn load(&self, path: &Path) -> Result<Loaded, CheckpointError> {
        let checkpoint = read_checkpoint(path)?;
        let accuracy = accuracy(&checkpoint.model, &self.digits.test)
            .map_err(|e| CheckpointError(format!("{}: {e}", path.display())))?;
        Ok(Loaded {
            model: Box::new(checkpoint.model),
            version: checkpoint.version,
            steps: checkpoint.steps,
            accuracy: Some(accuracy),
            input: DigitsMlpLoader::input(),
            output: OutputSpec::Classes,
            generation: None,
        })
    }
}

/// The metadata key naming a known input (only `digits` for now): see the
/// [module docs](self).
pub const INPUT_KEY: &str = "netcl-serve.input";

/// The metadata key holding one input row's shape, comma-separated (`64`,
/// `1,8,8`): see the [module docs](self).
pub const INPUT_SHAPE_KEY: &str = "netcl-serve.input_shape";

/// Reads any self-describing checkpoint (`netcl::io::save_model`) as a
/// ready model, and a plain weight file (no architecture in its metadata)
/// as the digits MLP. See the [module docs](self) for its input spec.
///
/// # Examples
///
/// ```
/// use std::collections::BTreeMap;
///
/// use netcl::nn::Linear;
/// use netcl_serve::loader::{CheckpointLoader, INPUT_SHAPE_KEY, ModelLoader};
/// use netcl_serve::model::Digits;
///
/// let path = std::env::temp_dir().join(format!("netcl-serve-doc-{}.safetensors", std::process::id()));
/// let metadata = BTreeMap::from([(INPUT_SHAPE_KEY.to_string(), "3".to_string())]);
/// netcl::io::save_model_with_metadata(&Linear::zeros(3, 2)?, &path, &metadata)?;
///
/// let loader = CheckpointLoader::new(Digits::load()?);
/// let loaded = loader.load(&path).unwrap();
/// assert_eq!(loaded.input.row_shape(), [3]);
/// assert_eq!(loaded.model.num_parameters(), 8);
/// # std::fs::remove_file(&path).unwrap();
/// # Ok::<(), netcl::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct CheckpointLoader {
    digits: DigitsMlpLoader,
}

impl CheckpointLoader {
    /// A loader measuring digits models' accuracy on `digits`' held-out
    /// split.
    pub fn new(digits: Digits) -> CheckpointLoader {
        CheckpointLoader {
            digits: DigitsMlpLoader::new(digits),
        }
    }
}

/// The input rows an architecture's first layer takes, if it says.
fn input_of(architecture: &netcl::nn::Architecture) -> Option<usize> {
    let config = architecture.config();
    match architecture.kind() {
        "Linear" => config.get("in_features")?.as_u64()?.try_into().ok(),
        "Mlp" => config.get("dims")?.get(0)?.as_u64()?.try_into().ok(),
        "Sequential" => input_of(architecture.children().first()?),
        _ => None,
    }
}

/// The first layer's kind, through `Sequential`s.
fn first_kind(architecture: &netcl::nn::Architecture) -> &str {
    match (architecture.kind(), architecture.children().first()) {
        ("Sequential", Some(first)) => first_kind(first),
        (kind, _) => kind,
    }
}

impl ModelLoader for CheckpointLoader {
    fn load(&self, path: &Path) -> Result<Loaded, CheckpointError> {
        let fail = |message: String| CheckpointError(format!("{}: {message}", path.display()));
        let bytes = std::fs::read(path).map_err(|e| fail(e.to_string()))?;
        let metadata = netcl::io::metadata_from_bytes(&bytes).map_err(|e| fail(e.to_string()))?;
        if !metadata.contains_key(netcl::io::SCHEMA_VERSION_KEY)
            && metadata.contains_key("vocab")
            && metadata.contains_key("vocab_size")
        {
            // A `CharTransformer::save` checkpoint: a language model.
            return load_char_lm(path, &metadata);
        }
        if !metadata.contains_key(netcl::io::SCHEMA_VERSION_KEY) {
            // A plain weight file: the digits MLP's layout, as --weights.
            return self.digits.load(path);
        }
        let checkpoint =
            netcl::io::load_checkpoint_bytes(&bytes).map_err(|e| fail(e.to_string()))?;
        let number = |key: &str| match checkpoint.metadata.get(key) {
            None => Ok(0),
            Some(text) => text
                .parse()
                .map_err(|_| fail(format!("metadata {key} = {text:?} is not a number"))),
        };
        let (version, steps) = (number(VERSION_KEY)?, number(STEPS_KEY)?);
        if checkpoint.architecture.kind() == CHAR_TRANSFORMER {
            // A language model: it answers generate, with the vocabulary
            // and sizes its architecture carries.
            let lm = language_model_of(&*checkpoint.model).map_err(fail)?;
            return Ok(Loaded {
                version,
                steps,
                accuracy: None,
                input: InputSpec::rows(lm.config().context),
                output: OutputSpec::Logits,
                generation: Some(lm),
                model: checkpoint.model,
            });
        }
        let mut accuracy_on_digits = None;
        let input = match (
            checkpoint.metadata.get(INPUT_KEY).map(String::as_str),
            checkpoint.metadata.get(INPUT_SHAPE_KEY),
        ) {
            (Some("digits"), shape) => {
                let input = match shape {
                    None => DigitsMlpLoader::input(),
                    Some(shape) => {
                        let sizes = row_shape(shape).map_err(fail)?;
                        let numbers: usize = sizes.iter().product();
                        if numbers != FEATURES {
                            return Err(fail(format!(
                                "metadata {INPUT_SHAPE_KEY} = {shape:?} holds {numbers} numbers \
                                 per row, but {INPUT_KEY} = \"digits\" rows are {FEATURES} pixels"
                            )));
                        }
                        InputSpec::shape(&sizes)
                            .range(0.0, PIXEL_MAX)
                            .preprocess(|raw| Ok(scale(raw)))
                    }
                };
                let test = &self.digits.digits.test;
                let n = test.inputs().shape().first().copied().unwrap_or(0);
                let mut shape = vec![n];
                shape.extend_from_slice(input.row_shape());
                let measured = test
                    .inputs()
                    .try_reshape(&shape)
                    .and_then(|images| {
                        accuracy(
                            &*checkpoint.model,
                            &TensorDataset::new(images, test.targets().clone())?,
                        )
                    })
                    .map_err(|e| fail(format!("the digits model does not run: {e}")))?;
                accuracy_on_digits = Some(measured);
                input
            }
            (Some(other), _) => {
                return Err(fail(format!(
                    "metadata {INPUT_KEY} = {other:?}: the known inputs are \"digits\""
                )));
            }
            (None, Some(shape)) => InputSpec::shape(&row_shape(shape).map_err(fail)?),
            (None, None) => match input_of(&checkpoint.architecture) {
                Some(width) => InputSpec::rows(width),
                None => {
                    return Err(fail(format!(
                        "cannot tell the input of a model whose first layer is a {}: save it \
                         with the metadata key {INPUT_SHAPE_KEY} (one row's shape, such as \
                         \"1,8,8\")",
                        first_kind(&checkpoint.architecture)
                    )));
                }
            },
        };
        Ok(Loaded {
            model: checkpoint.model,
            version,
            steps,
            accuracy: accuracy_on_digits,
            input,
            output: OutputSpec::Classes,
            generation: None,
        })
    }
}

/// The sizes of the row shape `text` (the value of [`INPUT_SHAPE_KEY`]),
/// or what is wrong with it.
fn row_shape(text: &str) -> Result<Vec<usize>, String> {
    let sizes: Option<Vec<usize>> = text
        .split(',')
        .map(|s| s.trim().parse().ok().filter(|&n: &usize| n > 0))
        .collect();
    match sizes {
        Some(sizes) if !sizes.is_empty() => Ok(sizes),
        _ => Err(format!(
            "metadata {INPUT_SHAPE_KEY} = {text:?} is not a row shape \
             (positive sizes separated by commas, such as \"1,8,8\")"
        )),
    }
}

/// The architecture kind of `netcl::models::CharTransformer`.
const CHAR_TRANSFORMER: &str = "CharTransformer";

/// The vocabulary and sizes of a loaded `CharTransformer`.
fn language_model_of(model: &dyn Module) -> Result<LanguageModel, String> {
    LanguageModel::of_module(model).map_err(|e| e.to_string())
}

/// Loads a `CharTransformer::save` checkpoint of before self-describing
/// checkpoints (the sizes and vocabulary in plain metadata keys) as a
/// language model.
fn load_char_lm(
    path: &Path,
    metadata: &std::collections::BTreeMap<String, String>,
) -> Result<Loaded, CheckpointError> {
    let fail = |message: String| CheckpointError(format!("{}: {message}", path.display()));
    let (model, vocab) =
        netcl::models::CharTransformer::load(path).map_err(|e| fail(e.to_string()))?;
    // A NaN weight would generate garbage forever: refuse it at load.
    for (name, tensor) in model.named_parameters() {
        if tensor.to_vec().iter().any(|v| !v.is_finite()) {
            return Err(fail(format!("parameter {name} holds a non-finite value")));
        }
    }
    let number = |key: &str| match metadata.get(key) {
        None => Ok(0),
        Some(text) => text
            .parse()
            .map_err(|_| fail(format!("metadata {key} = {text:?} is not a number"))),
    };
    let config = *model.config();
    Ok(Loaded {
        version: number(VERSION_KEY)?,
        steps: number(STEPS_KEY)?,
        accuracy: None,
        input: InputSpec::rows(config.context),
        output: OutputSpec::Logits,
        generation: Some(LanguageModel::new(vocab, config)),
        model: Box::new(model),
    })
}

/// One file a PATH offers, with the version its place gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// The checkpoint file.
    pub file: PathBuf,
    /// The number of its directory entry (`None` when PATH is a file).
    pub number: Option<u64>,
}

/// The checkpoint files PATH offers, best first: PATH itself when it is a
/// file (or does not exist yet), else its numbered versions, highest first.
///
/// # Errors
///
/// A [`CheckpointError`] if PATH is a directory that cannot be read.
pub fn candidates(path: &Path) -> Result<Vec<Candidate>, CheckpointError> {
    if !path.is_dir() {
        return Ok(vec![Candidate {
            file: path.to_path_buf(),
            number: None,
        }]);
    }
    let entries =
        std::fs::read_dir(path).map_err(|e| CheckpointError(format!("{}: {e}", path.display())))?;
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let entry_path = entry.path();
        let (number, file) = if entry_path.is_dir() {
            (name.parse::<u64>(), entry_path.join("model.safetensors"))
        } else if let Some(stem) = name.strip_suffix(".safetensors") {
            (stem.parse::<u64>(), entry_path)
        } else {
            continue;
        };
        if let Ok(number) = number
            && file.is_file()
        {
            found.push(Candidate {
                file,
                number: Some(number),
            });
        }
    }
    found.sort_by_key(|c| std::cmp::Reverse(c.number));
    Ok(found)
}

/// Loads the best of PATH's [`candidates`] that loads, with the candidate
/// it came from. A candidate's number, when it has one, is the version.
///
/// # Errors
///
/// A [`CheckpointError`] naming PATH when none loads (with the first
/// candidate's error), or when a directory holds no version.
pub fn load_latest(
    loader: &dyn ModelLoader,
    path: &Path,
) -> Result<(Candidate, Loaded), CheckpointError> {
    let found = candidates(path)?;
    let mut first_error = None;
    for candidate in found {
        match loader.load(&candidate.file) {
            Ok(mut loaded) => {
                if let Some(number) = candidate.number {
                    loaded.version = number;
                }
                return Ok((candidate, loaded));
            }
            Err(err) => {
                tracing::warn!("skipped {}: {err}", candidate.file.display());
                first_error.get_or_insert(err);
            }
        }
    }
    Err(first_error.unwrap_or_else(|| {
        CheckpointError(format!(
            "{}: no numbered version (N.safetensors or N/model.safetensors) in the directory",
            path.display()
        ))
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_offers_its_numbered_versions_highest_first() {
        let dir =
            std::env::temp_dir().join(format!("netcl-serve-candidates-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("12")).unwrap();
        std::fs::create_dir_all(dir.join("30")).unwrap(); // no model inside: skipped
        std::fs::write(dir.join("12/model.safetensors"), b"x").unwrap();
        std::fs::write(dir.join("3.safetensors"), b"x").unwrap();
        std::fs::write(dir.join("40.safetensors.tmp"), b"x").unwrap();
        std::fs::write(dir.join("latest.safetensors"), b"x").unwrap();
        let found = candidates(&dir).unwrap();
        let numbers: Vec<_> = found.iter().map(|c| c.number).collect();
        assert_eq!(numbers, [Some(12), Some(3)]);
        assert_eq!(found[0].file, dir.join("12/model.safetensors"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
