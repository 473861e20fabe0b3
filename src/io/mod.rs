//! Saving and loading a model's parameters in the
//! [safetensors](https://github.com/huggingface/safetensors) format.
//!
//! Parameters and buffers are stored by the names of
//! [`Module::named_parameters`] (`layers.0.weight`, ...) and
//! [`Module::named_buffers`] (`1.running_mean`); a parameter shared by two
//! layers (a tied weight, see [`fork_scope`](crate::nn::fork_scope)) is
//! stored once, under its first name; a file being loaded needs it under
//! one of its names (the first if present, else any other: PyTorch's
//! `save_model` keeps either). Values are
//! little-endian
//! `F32` tensors in row-major order, so files open with any safetensors
//! reader. Loading checks the file against the model before changing
//! anything: names (missing and unexpected), element type and shapes, and
//! the file's own consistency (truncation, garbage). Any problem is an
//! [`Error`] naming what is wrong; the model is then left untouched, and
//! nothing panics whatever the bytes.
//!
//! # Self-describing checkpoints
//!
//! [`save_model`] stores the model's architecture
//! ([`Module::architecture`], the versioned schema of
//! [`nn::architecture`](crate::nn::architecture)) in the file's metadata
//! beside the weights, and [`load_model`] rebuilds the model from it with
//! no code: a server loads any built-in model, or a model of a kind
//! registered with [`nn::register_kind`](crate::nn::register_kind). Extra
//! string metadata (a language model's vocabulary, a training step)
//! travels with [`save_model_with_metadata`] and comes back from
//! [`load_checkpoint`].
//!
//! # Atomic writes and version directories
//!
//! Every save ([`save`], [`save_model`], [`save_torch`], ...) writes a
//! temporary file beside the target, flushes it, renames it over the
//! target and flushes the directory: a crash leaves the old file or the
//! new one, whole, and at most a temporary named `.NAME.XXXXXX.netcl-tmp`,
//! which [`remove_stale_temporaries`] clears. A [`CheckpointDir`] holds
//! numbered versions (`DIR/<version>.safetensors`), and
//! [`latest_complete_version`] finds the newest whole one, for a server
//! that follows a trainer.
//!
//! # Examples
//!
//! ```
//! use netcl::nn::{Activation, Mlp, Module};
//! use netcl::io;
//! use netcl::rand::SeedableRng;
//! use netcl::rand::rngs::StdRng;
//!
//! let model = Mlp::new(&[4, 8, 2], Activation::Relu, &mut StdRng::seed_from_u64(1));
//! let path = std::env::temp_dir().join(format!("netcl-doc-io-{}.safetensors", std::process::id()));
//! io::save(&model, &path)?;
//!
//! // A model of the same architecture, initialised differently...
//! let fresh = Mlp::new(&[4, 8, 2], Activation::Relu, &mut StdRng::seed_from_u64(2));
//! io::load(&fresh, &path)?;
//! // ...now has exactly the saved values.
//! for ((_, a), (_, b)) in model.named_parameters().iter().zip(fresh.named_parameters()) {
//!     assert_eq!(a.to_vec(), b.to_vec());
//! }
//! # std::fs::remove_file(&path).unwrap();
//! # Ok::<(), netcl::Error>(())
//! ```

mod checkpoint;
mod model;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use checkpoint::write_atomically;
pub use checkpoint::{
    CheckpointDir, STALE_TEMPORARY_SUFFIX, fault, latest_complete_version, remove_stale_temporaries,
};
pub use model::{
    ARCHITECTURE_KEY, Checkpoint, SCHEMA_VERSION_KEY, load_checkpoint, load_checkpoint_bytes,
    load_model, load_model_bytes, model_to_bytes, model_to_bytes_with_metadata, save_model,
    save_model_with_metadata,
};

use safetensors::{Dtype, SafeTensors, tensor::TensorView};

use crate::error::{Error, Result};
use crate::nn::{Module, TorchLayout};
use crate::tensor::Tensor;

const FORMAT: &str = "safetensors";

fn io_error(op: &'static str, path: &Path, err: &std::io::Error) -> Error {
    Error::Io {
        op,
        path: path.display().to_string(),
        kind: err.kind(),
        message: err.to_string(),
    }
}

/// The parameters by name, checking that names are unique. A parameter
/// shared by several layers (a tied weight) is listed under its first name
/// only.
fn parameters_by_name<M: Module + ?Sized>(
    op: &'static str,
    model: &M,
) -> Result<BTreeMap<String, Tensor>> {
    Ok(parameters_and_aliases(op, model)?.0)
}

/// The parameters by (first) name, and the other names of tied parameters
/// (alias -> first name).
fn parameters_and_aliases<M: Module + ?Sized>(
    op: &'static str,
    model: &M,
) -> Result<(BTreeMap<String, Tensor>, BTreeMap<String, String>)> {
    let mut params: BTreeMap<String, Tensor> = BTreeMap::new();
    let mut aliases = BTreeMap::new();
    for (name, p) in model.named_parameters() {
        if params.contains_key(&name) || aliases.contains_key(&name) {
            return Err(Error::InvalidArgument {
                op,
                message: format!("the model has two parameters named `{name}`"),
            });
        }
        match params.iter().find(|(_, q)| q.same(&p)) {
            Some((first, _)) => {
                aliases.insert(name, first.clone());
            }
            None => {
                params.insert(name, p);
            }
        }
    }
    Ok((params, aliases))
}

/// The parameters and buffers by name (the buffers' current values), checking
/// that names are unique across both.
fn tensors_by_name<M: Module + ?Sized>(
    op: &'static str,
    model: &M,
) -> Result<BTreeMap<String, Tensor>> {
    let mut tensors = parameters_by_name(op, model)?;
    for (name, b) in model.named_buffers() {
        if tensors.contains_key(&name) {
            return Err(Error::InvalidArgument {
                op,
                message: format!("the model has two parameters or buffers named `{name}`"),
            });
        }
        tensors.insert(name, b);
    }
    Ok(tensors)
}

/// The buffers by full name: (index of the state, position in it, shape).
type BufferSlots = BTreeMap<String, (usize, usize, Vec<usize>)>;

/// The model's buffer states and where each named buffer lives in them.
fn buffer_slots<'a, M: Module + ?Sized>(
    op: &'static str,
    model: &'a M,
    params: &BTreeMap<String, Tensor>,
) -> Result<(Vec<(String, &'a crate::nn::BufferState)>, BufferSlots)> {
    let states = model.named_buffer_states();
    let mut slots = BTreeMap::new();
    for (i, (prefix, state)) in states.iter().enumerate() {
        let snapshot = state.load();
        for (j, (name, t)) in snapshot.to_vec().into_iter().enumerate() {
            let full = if prefix.is_empty() {
                name
            } else {
                format!("{prefix}.{name}")
            };
            if params.contains_key(&full) || slots.contains_key(&full) {
                return Err(Error::InvalidArgument {
                    op,
                    message: format!("the model has two parameters or buffers named `{full}`"),
                });
            }
            slots.insert(full, (i, j, t.shape().to_vec()));
        }
    }
    Ok((states, slots))
}

/// The model's parameters in safetensors form.
///
/// # Errors
///
/// [`Error::InvalidArgument`] if two parameters have the same name (a bug
/// in a custom [`Module`]), [`Error::Format`] if the safetensors encoder
/// fails.
///
/// # Examples
///
/// ```
/// use netcl::nn::Linear;
/// use netcl::rand::SeedableRng;
///
/// let layer = Linear::new(3, 2, &mut netcl::rand::rngs::StdRng::seed_from_u64(0));
/// let bytes = netcl::io::to_bytes(&layer)?;
/// // An 8-byte header length, the JSON header, then 4 bytes per value.
/// let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
/// assert_eq!(bytes.len(), 8 + header + 4 * (3 * 2 + 2));
/// # Ok::<(), netcl::Error>(())
/// ```
pub fn to_bytes<M: Module + ?Sized>(model: &M) -> Result<Vec<u8>> {
    encode(model, None, Layout::Netcl)
}

/// The model's parameters in safetensors form, with `metadata` (string
/// pairs, such as a version number) in the file's header, where any
/// safetensors reader finds it (`__metadata__`).
///
/// # Errors
///
/// As [`to_bytes`].
///
/// # Examples
///
/// ```
/// use std::collections::BTreeMap;
///
/// use netcl::nn::Linear;
/// use netcl::rand::SeedableRng;
///
/// let layer = Linear::new(3, 2, &mut netcl::rand::rngs::StdRng::seed_from_u64(0));
/// let metadata = BTreeMap::from([("version".to_string(), "7".to_string())]);
/// let bytes = netcl::io::to_bytes_with_metadata(&layer, &metadata)?;
/// assert_eq!(netcl::io::metadata_from_bytes(&bytes)?, metadata);
/// # Ok::<(), netcl::Error>(())
/// ```
pub fn to_bytes_with_metadata<M: Module + ?Sized>(
    model: &M,
    metadata: &BTreeMap<String, String>,
) -> Result<Vec<u8>> {
    encode(model, Some(metadata), Layout::Netcl)
}

/// Which layout a file holds: netcl's own, or PyTorch's (the parameters
/// of [`Module::torch_layouts`] converted).
#[derive(Clone, Copy, PartialEq)]
enum Layout {
    Netcl,
    Torch,
}

/// The names of the parameters stored transposed in `layout`.
fn transposed<M: Module + ?Sized>(model: &M, layout: Layout) -> BTreeSet<String> {
    match layout {
        Layout::Netcl => BTreeSet::new(),
        Layout::Torch => model
            .torch_layouts()
            .into_iter()
            .filter(|(_, l)| *l == TorchLayout::Transposed)
            .map(|(name, _)| name)
            .collect(),
    }
}

/// The transpose of the row-major `[rows, cols]` matrix `values`.
fn transpose(values: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; values.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = values[r * cols + c];
        }
    }
    out
}

fn encode<M: Module + ?Sized>(
    model: &M,
    metadata: Option<&BTreeMap<String, String>>,
    layout: Layout,
) -> Result<Vec<u8>> {
    let op = match layout {
        Layout::Netcl => "io::to_bytes",
        Layout::Torch => "io::to_torch_bytes",
    };
    let params = tensors_by_name(op, model)?;
    let transposed = transposed(model, layout);
    let encoded: Vec<(String, Vec<usize>, Vec<u8>)> = params
        .into_iter()
        .map(|(name, p)| {
            let (shape, values) = match p.shape() {
                &[rows, cols] if transposed.contains(&name) => {
                    (vec![cols, rows], transpose(&p.to_vec(), rows, cols))
                }
                shape => (shape.to_vec(), p.to_vec()),
            };
            let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            (name, shape, bytes)
        })
        .collect();
    let format_error = |message: String| Error::Format {
        op,
        source_name: "the model".to_string(),
        format: FORMAT,
        message,
    };
    let views = encoded
        .iter()
        .map(|(name, shape, bytes)| {
            TensorView::new(Dtype::F32, shape.clone(), bytes)
                .map(|view| (name.as_str(), view))
                .map_err(|err| format_error(err.to_string()))
        })
        .collect::<Result<Vec<_>>>()?;
    let metadata = metadata.map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect());
    safetensors::serialize(views, metadata).map_err(|err| format_error(err.to_string()))
}

/// Saves the model's parameters to `path` in safetensors format.
///
/// The file is written to a temporary file of a unique name in `path`'s
/// directory (`.NAME.XXXXXX.netcl-tmp`, see
/// [`remove_stale_temporaries`]), flushed to disk and atomically renamed
/// over `path`, and the directory is flushed too (so the rename survives a
/// power cut): a reader never sees a half-written file and an existing
/// file is replaced only by a complete one. Concurrent saves to one path (from threads or
/// processes) each succeed, and the file then holds exactly one of them,
/// whole. On error no temporary file is left behind.
///
/// # Errors
///
/// [`Error::Io`] if the file cannot be written, and the errors of
/// [`to_bytes`].
///
/// # Examples
///
/// ```
/// use netcl::Error;
/// use netcl::nn::Linear;
/// use netcl::rand::SeedableRng;
///
/// let layer = Linear::new(2, 2, &mut netcl::rand::rngs::StdRng::seed_from_u64(0));
/// let path = std::env::temp_dir().join(format!("netcl-doc-save-{}.safetensors", std::process::id()));
/// netcl::io::save(&layer, &path)?;
/// assert!(path.exists());
/// # std::fs::remove_file(&path).unwrap();
///
/// let err = netcl::io::save(&layer, "/no/such/dir/layer.safetensors").unwrap_err();
/// assert!(matches!(err, Error::Io { op: "io::save", .. }));
/// # Ok::<(), netcl::Error>(())
/// ```
pub fn save<M: Module + ?Sized>(model: &M, path: impl AsRef<Path>) -> Result<()> {
    let path = path.as_ref();
    let bytes = to_bytes(model)?;
    write_atomically(path, &bytes).map_err(|err| io_error("io::save", path, &err))
}

/// Saves the model's parameters to `path` as [`save`] does, with
/// `metadata` in the file's header (see [`to_bytes_with_metadata`]); read
/// it back with [`read_metadata`].
///
/// # Errors
///
/// As [`save`].
///
/// # Examples
///
/// ```
/// use std::collections::BTreeMap;
///
/// use netcl::nn::Linear;
/// use netcl::rand::SeedableRng;
///
/// let layer = Linear::new(2, 2, &mut netcl::rand::rngs::StdRng::seed_from_u64(0));
/// let path = std::env::temp_dir().join(format!("netcl-doc-meta-{}.safetensors", std::process::id()));
/// let metadata = BTreeMap::from([("version".to_string(), "12".to_string())]);
/// netcl::io::save_with_metadata(&layer, &path, &metadata)?;
/// assert_eq!(netcl::io::read_metadata(&path)?["version"], "12");
/// # std::fs::remove_file(&path).unwrap();
/// # Ok::<(), netcl::Error>(())
/// ```
pub fn save_with_metadata<M: Module + ?Sized>(
    model: &M,
    path: impl AsRef<Path>,
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let path = path.as_ref();
    let bytes = to_bytes_with_metadata(model, metadata)?;
    write_atomically(path, &bytes).map_err(|err| io_error("io::save", path, &err))
}

/// Loads parameters saved by [`save`] (or any safetensors file with the
/// same names, shapes and `F32` values) into `model`, in place.
///
/// # Errors
///
/// [`Error::Io`] if the file cannot be read, and the errors of
/// [`load_bytes`]. On error the model is unchanged.
///
/// # Examples
///
/// ```
/// use netcl::Error;
/// use netcl::nn::Linear;
/// use netcl::rand::SeedableRng;
///
/// let layer = Linear::new(2, 2, &mut netcl::rand::rngs::StdRng::seed_from_u64(0));
/// let err = netcl::io::load(&layer, "missing.safetensors").unwrap_err();
/// assert!(matches!(err, Error::Io { kind: std::io::ErrorKind::NotFound, .. }));
/// assert!(err.to_string().starts_with("io::load: missing.safetensors: "));
/// ```
pub fn load<M: Module + ?Sized>(model: &M, path: impl AsRef<Path>) -> Result<()> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|err| io_error("io::load", path, &err))?;
    load_named(model, &bytes, &path.display().to_string())
}

/// Loads parameters in safetensors form from `bytes` into `model`, in place.
///
/// Every check is done before any parameter changes, so on error the model
/// is unchanged.
///
/// # Errors
///
/// - [`Error::Format`] if `bytes` is not a valid safetensors file
///   (truncated, garbage, an inconsistent header);
/// - [`Error::ParameterNames`] listing the model's parameters absent from
///   the file and the file's tensors the model has no parameter for;
/// - [`Error::ParameterMismatch`] for the first parameter whose stored
///   element type is not `F32` or whose shape differs from the model's;
/// - [`Error::InvalidArgument`] if two parameters of the model have the same
///   name.
///
/// # Examples
///
/// ```
/// use netcl::Error;
/// use netcl::nn::Linear;
/// use netcl::rand::SeedableRng;
///
/// let mut rng = netcl::rand::rngs::StdRng::seed_from_u64(0);
/// let bytes = netcl::io::to_bytes(&Linear::new(3, 2, &mut rng))?;
///
/// let wider = Linear::new(3, 4, &mut rng);
/// let err = netcl::io::load_bytes(&wider, &bytes).unwrap_err();
/// assert!(matches!(err, Error::ParameterMismatch { .. }));
///
/// let err = netcl::io::load_bytes(&wider, &bytes[..bytes.len() - 1]).unwrap_err();
/// assert!(matches!(err, Error::Format { .. }));
/// # Ok::<(), netcl::Error>(())
/// ```
pub fn load_bytes<M: Module + ?Sized>(model: &M, bytes: &[u8]) -> Result<()> {
    load_named(model, bytes, "the given bytes")
}

fn load_named<M: Module + ?Sized>(model: &M, bytes: &[u8], source_name: &str) -> Result<()> {
    load_layout(model, bytes, source_name, Layout::Netcl)
}

fn load_layout<M: Module + ?Sized>(
    model: &M,
    bytes: &[u8],
    source_name: &str,
    layout: Layout,
) -> Result<()> {
    let op = match layout {
        Layout::Netcl => "io::load",
        Layout::Torch => "io::load_torch",
    };
    load_layout_as(op, model, bytes, source_name, layout)
}

/// [`load_layout`], its errors naming `op`.
fn load_layout_as<M: Module + ?Sized>(
    op: &'static str,
    model: &M,
    bytes: &[u8],
    source_name: &str,
    layout: Layout,
) -> Result<()> {
    let transposed = transposed(model, layout);
    let file = SafeTensors::deserialize(bytes).map_err(|err| Error::Format {
        op,
        source_name: source_name.to_string(),
        format: FORMAT,
        message: err.to_string(),
    })?;
    let (params, aliases) = parameters_and_aliases(op, model)?;
    let (states, slots) = buffer_slots(op, model, &params)?;
    if let Some((name, _)) = states.iter().find(|(_, state)| state.is_frozen()) {
        return Err(Error::InvalidArgument {
            op,
            message: format!("the buffers `{name}` are frozen (a published version never changes)"),
        });
    }
    let stored: BTreeSet<&str> = file.names().into_iter().collect();
    // Where each parameter is read from: its first name, or else the first
    // of its other names (a tied weight) that the file has.
    let source = |name: &String| -> Option<String> {
        if stored.contains(name.as_str()) {
            return Some(name.clone());
        }
        aliases
            .iter()
            .find(|(alias, first)| *first == name && stored.contains(alias.as_str()))
            .map(|(alias, _)| alias.clone())
    };
    let missing: Vec<String> = params
        .keys()
        .filter(|name| source(name).is_none())
        .chain(slots.keys().filter(|name| !stored.contains(name.as_str())))
        .cloned()
        .collect();
    let unexpected: Vec<String> = stored
        .iter()
        .filter(|name| {
            !params.contains_key(**name)
                && !slots.contains_key(**name)
                && !aliases.contains_key(**name)
        })
        .map(|name| name.to_string())
        .collect();
    if !missing.is_empty() || !unexpected.is_empty() {
        return Err(Error::ParameterNames {
            op,
            missing,
            unexpected,
        });
    }
    let mut updates = Vec::with_capacity(params.len());
    for (first, param) in &params {
        let name = &source(first).expect("checked above: every parameter has a source");
        let view = file.tensor(name).map_err(|err| Error::Format {
            op,
            source_name: source_name.to_string(),
            format: FORMAT,
            message: err.to_string(),
        })?;
        // The shape the file should hold: PyTorch's `[out, in]` for a
        // transposed parameter.
        let flip = param.ndim() == 2 && transposed.contains(name);
        let mut expected = param.shape().to_vec();
        if flip {
            expected.reverse();
        }
        if view.dtype() != Dtype::F32 || view.shape() != expected.as_slice() {
            return Err(Error::ParameterMismatch {
                op,
                name: name.clone(),
                expected,
                found: view.shape().to_vec(),
                found_dtype: view.dtype().to_string(),
            });
        }
        // deserialize checked that the data has shape · 4 bytes.
        let mut values: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        if flip {
            values = transpose(&values, expected[0], expected[1]);
        }
        updates.push((param, crate::storage::Data::from_vec(param.shape(), values)));
    }
    let mut buffer_values: Vec<Vec<Option<Tensor>>> = states
        .iter()
        .map(|(_, state)| vec![None; state.load().len()])
        .collect();
    for (name, (i, j, shape)) in &slots {
        let view = file.tensor(name).map_err(|err| Error::Format {
            op,
            source_name: source_name.to_string(),
            format: FORMAT,
            message: err.to_string(),
        })?;
        // PyTorch stores `num_batches_tracked` as I64: buffers accept it.
        let values: Option<Vec<f32>> = match view.dtype() {
            Dtype::F32 => Some(
                view.data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            ),
            Dtype::I64 => Some(
                view.data()
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")) as f32)
                    .collect(),
            ),
            _ => None,
        };
        match values {
            Some(values) if view.shape() == shape.as_slice() => {
                buffer_values[*i][*j] = Some(Tensor::from_vec(values, shape)?);
            }
            _ => {
                return Err(Error::ParameterMismatch {
                    op,
                    name: name.clone(),
                    expected: shape.clone(),
                    found: view.shape().to_vec(),
                    found_dtype: view.dtype().to_string(),
                });
            }
        }
    }
    // Every check passed: each parameter now takes its new values in one
    // O(1) swap, and each layer's buffers in one swap of the whole state.
    // (Readers of the live model may still see some parameters before and
    // some after; serve a `nn::Published` version to avoid that.)
    for (param, values) in updates {
        param.replace_data(values);
    }
    for ((_, state), values) in states.iter().zip(buffer_values) {
        // Every slot was filled: the names matched. A state frozen since
        // the check above is left as it is.
        let values: Vec<Tensor> = values.into_iter().flatten().collect();
        let _ = state.store(values);
    }
    Ok(())
}

/// The model's parameters and buffers in safetensors form, in the layout of
/// the PyTorch model it mirrors: what `torch.nn.Module.state_dict()` saved
/// with `safetensors.torch.save_file` holds.
///
/// The names are netcl's ([`Module::named_parameters`],
/// [`Module::named_buffers`]), which the layers choose to match PyTorch's
/// attributes (a [`Sequential`](crate::nn::Sequential)'s `0.weight` is
/// `nn.Sequential`'s). The parameters listed by
/// [`Module::torch_layouts`] are converted, and only those: a
/// [`Linear`](crate::nn::Linear) weight, `[in, out]` in netcl, is stored
/// transposed, `[out, in]`, as `nn.Linear.weight`. This (with
/// [`load_torch_bytes`]) is the one place where netcl's layouts meet
/// PyTorch's; [`to_bytes`] and [`load`] keep netcl's own.
///
/// An [`Mlp`](crate::nn::Mlp)'s names start with `layers.` (a PyTorch
/// module holding `self.layers = nn.Sequential(..)`); save
/// [`Mlp::layers`](crate::nn::Mlp::layers) instead for a bare
/// `nn.Sequential`'s names (`0.weight`).
///
/// # Errors
///
/// As [`to_bytes`].
///
/// # Examples
///
/// ```
/// use netcl::Tensor;
/// use netcl::nn::Linear;
///
/// // netcl's weight [in = 2, out = 3]; PyTorch's nn.Linear(2, 3).weight is [3, 2].
/// let layer = Linear::from_parts(Tensor::from_vec(vec![1., 2., 3., 4., 5., 6.], &[2, 3])?, None)?;
/// let bytes = netcl::io::to_torch_bytes(&layer)?;
///
/// let fresh = Linear::from_parts(Tensor::zeros(&[2, 3]), None)?;
/// netcl::io::load_torch_bytes(&fresh, &bytes)?;
/// assert_eq!(fresh.weight().to_vec(), layer.weight().to_vec());
///
/// // netcl's own layout is not PyTorch's: loading one as the other fails,
/// // naming the parameter with the shape expected in the file.
/// let err = netcl::io::load_torch_bytes(&fresh, &netcl::io::to_bytes(&layer)?).unwrap_err();
/// assert_eq!(
///     err.to_string(),
///     "io::load_torch: parameter `weight` is stored as F32 [2, 3], the model expects F32 [3, 2]"
/// );
/// # Ok::<(), netcl::Error>(())
/// ```
pub fn to_torch_bytes<M: Module + ?Sized>(model: &M) -> Result<Vec<u8>> {
    encode(model, None, Layout::Torch)
}

/// Saves the model in PyTorch's layout ([`to_torch_bytes`]) to `path`,
/// atomically as [`save`] does: a file `safetensors.torch.load_file`
/// reads and `load_state_dict` accepts.
///
/// # Errors
///
/// As [`save`].
pub fn save_torch<M: Module + ?Sized>(model: &M, path: impl AsRef<Path>) -> Result<()> {
    let path = path.as_ref();
    let bytes = to_torch_bytes(model)?;
    write_atomically(path, &bytes).map_err(|err| io_error("io::save_torch", path, &err))
}

/// Loads a PyTorch `state_dict` saved as safetensors (for example with
/// `safetensors.torch.save_file(model.state_dict(), path)`) into a netcl
/// model that mirrors the PyTorch one, in place: the names must match
/// (see [`to_torch_bytes`]) and the parameters of
/// [`Module::torch_layouts`] are converted from PyTorch's layout.
///
/// # Errors
///
/// [`Error::Io`] if the file cannot be read, and the errors of
/// [`load_torch_bytes`]. On error the model is unchanged.
pub fn load_torch<M: Module + ?Sized>(model: &M, path: impl AsRef<Path>) -> Result<()> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|err| io_error("io::load_torch", path, &err))?;
    load_layout(model, &bytes, &path.display().to_string(), Layout::Torch)
}

/// [`load_torch`] from bytes in memory.
///
/// # Errors
///
/// As [`load_bytes`], with [`Error::ParameterMismatch`] giving the shape
/// expected in PyTorch's layout (`[out, in]` for a `Linear` weight).
pub fn load_torch_bytes<M: Module + ?Sized>(model: &M, bytes: &[u8]) -> Result<()> {
    load_layout(model, bytes, "the given bytes", Layout::Torch)
}

/// Reads every tensor of a safetensors file of `F32` tensors, by name (in
/// name order), to inspect a checkpoint without a model.
///
/// # Errors
///
/// [`Error::Io`] if the file cannot be read, [`Error::Format`] if it is not
/// a valid safetensors file or declares a shape too large to exist (see
/// [`Tensor::MAX_ELEMENTS`]), [`Error::ParameterMismatch`] for a tensor
/// that is not `F32`.
///
/// # Examples
///
/// ```
/// use netcl::nn::{Linear, Module};
/// use netcl::rand::SeedableRng;
///
/// let layer = Linear::new(3, 2, &mut netcl::rand::rngs::StdRng::seed_from_u64(0));
/// let path = std::env::temp_dir().join(format!("netcl-doc-read-{}.safetensors", std::process::id()));
/// netcl::io::save(&layer, &path)?;
/// let tensors = netcl::io::read_tensors(&path)?;
/// let names: Vec<&str> = tensors.iter().map(|(name, _)| name.as_str()).collect();
/// assert_eq!(names, ["bias", "weight"]);
/// assert_eq!(tensors[1].1.to_vec(), layer.weight().to_vec());
/// # std::fs::remove_file(&path).unwrap();
/// # Ok::<(), netcl::Error>(())
/// ```
pub fn read_tensors(path: impl AsRef<Path>) -> Result<Vec<(String, Tensor)>> {
    const OP: &str = "io::read_tensors";
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|err| io_error(OP, path, &err))?;
    let file = SafeTensors::deserialize(&bytes).map_err(|err| Error::Format {
        op: OP,
        source_name: path.display().to_string(),
        format: FORMAT,
        message: err.to_string(),
    })?;
    let mut tensors: Vec<(String, Tensor)> = Vec::with_capacity(file.len());
    for (name, view) in file.iter() {
        if view.dtype() != Dtype::F32 {
            return Err(Error::ParameterMismatch {
                op: OP,
                name: name.to_string(),
                expected: view.shape().to_vec(),
                found: view.shape().to_vec(),
                found_dtype: view.dtype().to_string(),
            });
        }
        // safetensors accepts any shape whose byte size matches the data,
        // zero-size shapes whose other axes overflow included.
        crate::array::checked_numel(OP, view.shape()).map_err(|err| Error::Format {
            op: OP,
            source_name: path.display().to_string(),
            format: FORMAT,
            message: format!("tensor `{name}`: {err}"),
        })?;
        let values = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        tensors.push((name.to_string(), Tensor::from_vec(values, view.shape())?));
    }
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(tensors)
}

/// The metadata (string pairs) in the header of the safetensors file at
/// `path`; empty if it has none.
///
/// # Errors
///
/// [`Error::Io`] if the file cannot be read, [`Error::Format`] if its
/// header is not valid safetensors.
///
/// # Examples
///
/// ```
/// use std::collections::BTreeMap;
///
/// use netcl::Error;
/// use netcl::nn::Linear;
///
/// let layer = Linear::zeros(2, 2)?;
/// let path = std::env::temp_dir().join(format!("netcl-doc-read-metadata-{}.safetensors", std::process::id()));
/// netcl::io::save(&layer, &path)?;
/// assert!(netcl::io::read_metadata(&path)?.is_empty());
///
/// let metadata = BTreeMap::from([
///     ("version".to_string(), "3".to_string()),
///     ("run".to_string(), "warm start".to_string()),
/// ]);
/// netcl::io::save_with_metadata(&layer, &path, &metadata)?;
/// assert_eq!(netcl::io::read_metadata(&path)?, metadata);
/// # std::fs::remove_file(&path).unwrap();
///
/// let err = netcl::io::read_metadata("/no/such/dir/layer.safetensors").unwrap_err();
/// assert!(matches!(err, Error::Io { op: "io::read_metadata", .. }));
/// # Ok::<(), netcl::Error>(())
/// ```
pub fn read_metadata(path: impl AsRef<Path>) -> Result<BTreeMap<String, String>> {
    const OP: &str = "io::read_metadata";
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|err| io_error(OP, path, &err))?;
    metadata_of(OP, &bytes, &path.display().to_string())
}

/// The metadata (string pairs) in the header of safetensors `bytes`; empty
/// if it has none.
///
/// # Errors
///
/// [`Error::Format`] if the header is not valid safetensors.
///
/// # Examples
///
/// ```
/// use std::collections::BTreeMap;
///
/// use netcl::Error;
/// use netcl::nn::Linear;
///
/// let layer = Linear::zeros(2, 2)?;
/// assert!(netcl::io::metadata_from_bytes(&netcl::io::to_bytes(&layer)?)?.is_empty());
///
/// let metadata = BTreeMap::from([("version".to_string(), "41".to_string())]);
/// let bytes = netcl::io::to_bytes_with_metadata(&layer, &metadata)?;
/// let version: u64 = netcl::io::metadata_from_bytes(&bytes)?["version"].parse().unwrap();
/// assert_eq!(version, 41);
///
/// let err = netcl::io::metadata_from_bytes(b"not a safetensors file").unwrap_err();
/// assert!(matches!(err, Error::Format { op: "io::metadata_from_bytes", .. }));
/// # Ok::<(), netcl::Error>(())
/// ```
pub fn metadata_from_bytes(bytes: &[u8]) -> Result<BTreeMap<String, String>> {
    metadata_of("io::metadata_from_bytes", bytes, "the given bytes")
}

fn metadata_of(
    op: &'static str,
    bytes: &[u8],
    source_name: &str,
) -> Result<BTreeMap<String, String>> {
    let (_, metadata) = SafeTensors::read_metadata(bytes).map_err(|err| Error::Format {
        op,
        source_name: source_name.to_string(),
        format: FORMAT,
        message: err.to_string(),
    })?;
    Ok(metadata
        .metadata()
        .as_ref()
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default())
}
