//! Self-describing checkpoints: the architecture beside the weights.

use std::collections::BTreeMap;
use std::path::Path;

use safetensors::{Dtype, SafeTensors};

use super::{FORMAT, Layout, encode, io_error, load_layout_as, metadata_of, write_atomically};
use crate::error::{Error, Result};
use crate::nn::architecture::{self, BuildContext};
use crate::nn::{ARCHITECTURE_SCHEMA_VERSION, Architecture, Module};

/// The metadata key holding the architecture schema's version (decimal).
pub const SCHEMA_VERSION_KEY: &str = "netcl.schema_version";

/// The metadata key holding the architecture, as the JSON of
/// [`Architecture::to_json_string`].
pub const ARCHITECTURE_KEY: &str = "netcl.architecture";

/// The prefix of the metadata keys netcl reserves.
const RESERVED_PREFIX: &str = "netcl.";

/// The `format` of the errors about a self-describing checkpoint.
const CHECKPOINT: &str = "netcl checkpoint";

/// A loaded self-describing checkpoint: the model, the architecture it was
/// built from and the file's other metadata.
#[derive(Debug)]
#[non_exhaustive]
pub struct Checkpoint {
    /// The model, with the checkpoint's values, in evaluation mode.
    pub model: Box<dyn Module>,
    /// The architecture it was built from.
    pub architecture: Architecture,
    /// The metadata saved with it, without netcl's own keys.
    pub metadata: BTreeMap<String, String>,
}

/// The model's architecture, or an error naming it.
fn architecture_of<M: Module + ?Sized>(op: &'static str, model: &M) -> Result<Architecture> {
    model.architecture().ok_or_else(|| {
        let mut name = format!("{model:?}");
        if name.len() > 120 {
            let cut = (0..=120)
                .rev()
                .find(|&i| name.is_char_boundary(i))
                .unwrap_or(0);
            name.truncate(cut);
            name.push_str("...");
        }
        Error::Unsupported {
            op,
            message: format!(
                "the model {name} does not describe its architecture (Module::architecture \
                 returns None for it or for one of its layers): save it with io::save and load \
                 it into a model built in code, or implement Module::architecture with a kind \
                 registered with nn::register_kind"
            ),
        }
    })
}

/// The metadata of a self-describing checkpoint: `metadata`, and netcl's
/// keys.
fn full_metadata<M: Module + ?Sized>(
    op: &'static str,
    model: &M,
    metadata: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>> {
    if let Some(key) = metadata.keys().find(|k| k.starts_with(RESERVED_PREFIX)) {
        return Err(Error::InvalidArgument {
            op,
            message: format!(
                "metadata key `{key}` starts with `{RESERVED_PREFIX}`, which netcl reserves"
            ),
        });
    }
    let mut full = metadata.clone();
    full.insert(
        SCHEMA_VERSION_KEY.to_string(),
        ARCHITECTURE_SCHEMA_VERSION.to_string(),
    );
    full.insert(
        ARCHITECTURE_KEY.to_string(),
        architecture_of(op, model)?.to_json_string(),
    );
    Ok(full)
}

/// The model's parameters, buffers and architecture in safetensors form: a
/// self-describing checkpoint, which [`load_model_bytes`] turns back into
/// a ready model without code.
///
/// The tensors are [`to_bytes`](super::to_bytes)'s; the header's metadata
/// holds [`SCHEMA_VERSION_KEY`] and [`ARCHITECTURE_KEY`] (the schema of
/// [`nn::architecture`](crate::nn::architecture)), so any safetensors
/// reader opens the file and [`load`](super::load) still loads it into a
/// model built in code.
///
/// # Errors
///
/// [`Error::Unsupported`] if the model does not describe its architecture
/// ([`Module::architecture`] is `None`: a custom layer, or a
/// [`TiedLinear`](crate::nn::TiedLinear)), and the errors of
/// [`to_bytes`](super::to_bytes).
///
/// # Examples
///
/// ```
/// use netcl::nn::{Conv2d, Flatten, Linear, MaxPool2d, Module, ReLU, Sequential};
/// use netcl::rand::SeedableRng;
/// use netcl::{Tensor, autograd};
///
/// let mut rng = netcl::rand::rngs::StdRng::seed_from_u64(0);
/// let cnn = Sequential::new()
///     .with(Conv2d::new(1, 4, 3, &mut rng))
///     .with(ReLU::new())
///     .with(MaxPool2d::new(2))
///     .with(Flatten::new())
///     .with(Linear::new(4 * 3 * 3, 10, &mut rng));
/// let bytes = netcl::io::model_to_bytes(&cnn)?;
///
/// // No code needed to rebuild it.
/// let loaded = netcl::io::load_model_bytes(&bytes)?;
/// let x = Tensor::ones(&[2, 1, 8, 8]);
/// let _no_grad = autograd::no_grad();
/// assert_eq!(loaded.forward(&x)?.to_vec(), cnn.forward(&x)?.to_vec());
/// # Ok::<(), netcl::Error>(())
/// ```
pub fn model_to_bytes<M: Module + ?Sized>(model: &M) -> Result<Vec<u8>> {
    model_to_bytes_with_metadata(model, &BTreeMap::new())
}

/// [`model_to_bytes`] with `metadata` (string pairs: a version number, a
/// language model's vocabulary, ...) in the header beside netcl's keys;
/// [`load_checkpoint`] gives it back.
///
/// # Errors
///
/// [`Error::InvalidArgument`] if a key of `metadata` starts with
/// `netcl.` (reserved), and the errors of [`model_to_bytes`].
///
/// # Examples
///
/// ```
/// use std::collections::BTreeMap;
///
/// use netcl::nn::{Embedding, Module};
///
/// let model = Embedding::zeros(3, 2)?;
/// let metadata = BTreeMap::from([("vocab".to_string(), r#"["a","b","c"]"#.to_string())]);
/// let bytes = netcl::io::model_to_bytes_with_metadata(&model, &metadata)?;
/// let checkpoint = netcl::io::load_checkpoint_bytes(&bytes)?;
/// assert_eq!(checkpoint.metadata, metadata);
/// assert_eq!(checkpoint.architecture.kind(), "Embedding");
/// # Ok::<(), netcl::Error>(())
/// ```
pub fn model_to_bytes_with_metadata<M: Module + ?Sized>(
    model: &M,
    metadata: &BTreeMap<String, String>,
) -> Result<Vec<u8>> {
    let full = full_metadata("io::model_to_bytes", model, metadata)?;
    encode(model, Some(&full), Layout::Netcl)
}

/// Saves a self-describing checkpoint ([`model_to_bytes`]) to `path`,
/// atomically and durably as [`save`](super::save) does: written to a
/// temporary file beside `path`, flushed, renamed over `path`, and the
/// directory flushed. A crash at any point leaves either the old file or
/// the new one whole, and at most a temporary
/// ([`remove_stale_temporaries`](super::remove_stale_temporaries)).
///
/// # Errors
///
/// [`Error::Io`] if the file cannot be written (a full disk: the previous
/// file at `path` is then intact and no temporary is left), and the errors
/// of [`model_to_bytes`].
///
/// # Examples
///
/// ```
/// use netcl::nn::{Activation, Mlp, Module};
///
/// let mlp = Mlp::seeded(&[4, 8, 2], Activation::Tanh, 0);
/// let path = std::env::temp_dir().join(format!("netcl-doc-save-model-{}.safetensors", std::process::id()));
/// netcl::io::save_model(&mlp, &path)?;
/// let loaded = netcl::io::load_model(&path)?;
/// assert_eq!(loaded.architecture(), mlp.architecture());
/// # std::fs::remove_file(&path).unwrap();
/// # Ok::<(), netcl::Error>(())
/// ```
pub fn save_model<M: Module + ?Sized>(model: &M, path: impl AsRef<Path>) -> Result<()> {
    save_model_with_metadata(model, path, &BTreeMap::new())
}

/// [`save_model`] with metadata ([`model_to_bytes_with_metadata`]).
///
/// # Errors
///
/// As [`save_model`] and [`model_to_bytes_with_metadata`].
pub fn save_model_with_metadata<M: Module + ?Sized>(
    model: &M,
    path: impl AsRef<Path>,
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let path = path.as_ref();
    let full = full_metadata("io::save_model", model, metadata)?;
    let bytes = encode(model, Some(&full), Layout::Netcl)?;
    write_atomically(path, &bytes).map_err(|err| io_error("io::save_model", path, &err))
}

/// Loads the self-describing checkpoint at `path` as a ready model (see
/// [`load_model_bytes`]).
///
/// # Errors
///
/// [`Error::Io`] if the file cannot be read, and the errors of
/// [`load_model_bytes`].
pub fn load_model(path: impl AsRef<Path>) -> Result<Box<dyn Module>> {
    Ok(load_checkpoint(path)?.model)
}

/// Builds the model a self-describing checkpoint ([`model_to_bytes`])
/// describes and loads its values: a ready model, in evaluation mode, with
/// no code. Layers of a kind of your own load once the kind is registered
/// ([`nn::register_kind`](crate::nn::register_kind)).
///
/// Everything is checked before the model is returned; on error nothing is
/// returned (no half-loaded model), and nothing panics whatever the bytes.
///
/// # Errors
///
/// - [`Error::Format`] if `bytes` is not a valid safetensors file, has no
///   architecture (a plain [`to_bytes`](super::to_bytes) checkpoint: load
///   it with [`load`](super::load)), its architecture is malformed JSON or
///   not of the schema, names an unknown layer kind, has sizes a layer
///   refuses or larger than the file's tensors (each naming the layer by
///   its position), or a tensor holds a NaN or an infinity (naming it);
/// - [`Error::Unsupported`] if its schema version is newer than this
///   netcl's ([`ARCHITECTURE_SCHEMA_VERSION`]), naming both;
/// - [`Error::ParameterNames`] naming the tensors the architecture needs
///   and the file lacks (and those it has and the architecture does not);
/// - [`Error::ParameterMismatch`] naming a tensor whose shape is not the
///   one the architecture gives it, with both shapes.
///
/// # Examples
///
/// ```
/// use std::collections::BTreeMap;
///
/// use netcl::Error;
/// use netcl::nn::{Linear, Module};
///
/// let bytes = netcl::io::model_to_bytes(&Linear::zeros(3, 2)?)?;
/// let model = netcl::io::load_model_bytes(&bytes)?;
/// assert_eq!(model.num_parameters(), 8);
/// assert!(!model.is_training());
///
/// // A plain checkpoint has no architecture.
/// let plain = netcl::io::to_bytes(&Linear::zeros(3, 2)?)?;
/// let err = netcl::io::load_model_bytes(&plain).unwrap_err();
/// assert!(err.to_string().contains("no `netcl.schema_version`"), "{err}");
/// # Ok::<(), netcl::Error>(())
/// ```
pub fn load_model_bytes(bytes: &[u8]) -> Result<Box<dyn Module>> {
    Ok(load_checkpoint_bytes(bytes)?.model)
}

/// [`load_model`], with the architecture and the metadata.
///
/// # Errors
///
/// As [`load_model`].
pub fn load_checkpoint(path: impl AsRef<Path>) -> Result<Checkpoint> {
    const OP: &str = "io::load_model";
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|err| io_error(OP, path, &err))?;
    load_from(OP, &bytes, &path.display().to_string())
}

/// [`load_model_bytes`], with the architecture and the metadata.
///
/// # Errors
///
/// As [`load_model_bytes`].
pub fn load_checkpoint_bytes(bytes: &[u8]) -> Result<Checkpoint> {
    load_from("io::load_model", bytes, "the given bytes")
}

fn load_from(op: &'static str, bytes: &[u8], source_name: &str) -> Result<Checkpoint> {
    let error = |format: &'static str, message: String| Error::Format {
        op,
        source_name: source_name.to_string(),
        format,
        message,
    };
    let mut metadata = metadata_of(op, bytes, source_name)?;
    let version = metadata.remove(SCHEMA_VERSION_KEY).ok_or_else(|| {
        error(
            CHECKPOINT,
            format!(
                "no `{SCHEMA_VERSION_KEY}` in its metadata: not a self-describing checkpoint \
                 (io::save_model writes one; load a plain checkpoint with io::load into a model \
                 built in code)"
            ),
        )
    })?;
    let version: u32 = version.parse().ok().filter(|&v| v > 0).ok_or_else(|| {
        error(
            CHECKPOINT,
            format!("`{SCHEMA_VERSION_KEY}` is `{version}`, not a positive version number"),
        )
    })?;
    if version > ARCHITECTURE_SCHEMA_VERSION {
        return Err(Error::Unsupported {
            op,
            message: format!(
                "{source_name}: the architecture's schema version is {version}, newer than \
                 version {ARCHITECTURE_SCHEMA_VERSION}, the newest this netcl reads (upgrade netcl)"
            ),
        });
    }
    let json = metadata.remove(ARCHITECTURE_KEY).ok_or_else(|| {
        error(
            CHECKPOINT,
            format!("`{ARCHITECTURE_KEY}` is missing from its metadata"),
        )
    })?;
    metadata.retain(|key, _| !key.starts_with(RESERVED_PREFIX));
    let architecture = architecture::parse(op, source_name, &json)?;

    // Every weight finite, and the budget of values the model may have.
    let file = SafeTensors::deserialize(bytes).map_err(|err| error(FORMAT, err.to_string()))?;
    let mut budget: usize = 0;
    let mut tensors = file.tensors();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, view) in &tensors {
        let elements = view
            .shape()
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .ok_or_else(|| {
                error(
                    FORMAT,
                    format!("tensor `{name}` has shape {:?}, too large", view.shape()),
                )
            })?;
        budget = budget.saturating_add(elements);
        if view.dtype() == Dtype::F32 {
            let bad = view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .enumerate()
                .find(|(_, v)| !v.is_finite());
            if let Some((index, value)) = bad {
                return Err(error(
                    CHECKPOINT,
                    format!(
                        "tensor `{name}` holds {value} at index {index}: a checkpoint with a \
                         non-finite weight is refused"
                    ),
                ));
            }
        }
    }
    // Twice the file's values and 4 MiB more: room for an architecture
    // that lies by a little (the mismatch is then reported by tensor name
    // below), and a bound on what a lying file makes the loader allocate.
    let budget = budget.saturating_mul(2).saturating_add(1 << 20);
    let model = BuildContext::new(op, source_name, budget).build_root(&architecture)?;
    load_layout_as(op, &model, bytes, source_name, Layout::Netcl)?;
    model.eval();
    Ok(Checkpoint {
        model,
        architecture,
        metadata,
    })
}
