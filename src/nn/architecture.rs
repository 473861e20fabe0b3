//! A model's architecture as data: what [`io::save_model`](crate::io::save_model)
//! stores beside the weights so that [`io::load_model`](crate::io::load_model)
//! rebuilds the model without code.
//!
//! # The schema (version 1)
//!
//! An architecture is a tree of nodes. Each node is a JSON object:
//!
//! ```json
//! {"kind": "Linear", "config": {"in_features": 4, "out_features": 2, "bias": true}}
//! ```
//!
//! - `kind` (string, required): the layer's kind, the name of its Rust
//!   type for the built-in layers, or a kind registered with
//!   [`register_kind`];
//! - `config` (object, optional, empty if absent): the hyperparameters;
//! - `children` (array of nodes, optional, empty if absent): the
//!   sub-modules of a container, in order.
//!
//! No other field is allowed, nor, in a built-in kind's config, any key
//! but those below. Sizes are non-negative integers, `[h, w]`
//! pairs are arrays of two integers, `eps`, `momentum` and `p` are numbers
//! (written with enough digits to give back the same `f32`). The built-in
//! kinds and their configs:
//!
//! | kind | config | children |
//! |---|---|---|
//! | `Linear` | `in_features`, `out_features`, `bias` (bool) | |
//! | `Sequential` | | the layers |
//! | `Mlp` | `dims` (array of widths), `activation` (`"relu"`, `"sigmoid"`, `"tanh"`) | |
//! | `ReLU`, `Sigmoid`, `Tanh`, `Silu` | | |
//! | `Gelu` | `approximate` (`"none"` or `"tanh"`) | |
//! | `Dropout` | `p`, `seed` | |
//! | `Conv2d` | `in_channels`, `out_channels`, `kernel_size`, `stride`, `padding`, `dilation` (pairs), `groups`, `bias` | |
//! | `MaxPool2d` | `kernel_size`, `stride` (pair or `null`: the kernel size), `padding` | |
//! | `AvgPool2d` | as `MaxPool2d`, and `count_include_pad` (bool) | |
//! | `AdaptiveAvgPool2d` | `output_size` (pair) | |
//! | `Flatten` | `start_dim`, `end_dim` (integers, negative from the end) | |
//! | `BatchNorm1d`, `BatchNorm2d` | `num_features`, `eps`, `momentum`, `affine` (bool) | |
//! | `LayerNorm` | `normalized_shape` (array), `eps`, `affine` (bool) | |
//! | `RmsNorm` | `normalized_shape`, `eps` (number or `null`: machine epsilon), `affine` | |
//! | `Embedding` | `num_embeddings`, `embedding_dim` | |
//! | `MultiheadAttention` | `embed_dim`, `num_heads` | |
//! | `TransformerBlock` | `d_model`, `num_heads`, `d_ff` | |
//! | `CharTransformer` | `vocab_size`, `d_model`, `num_heads`, `num_blocks`, `context`, `d_ff`, `dropout`, and `vocab` (optional: the characters in id order, a string of `vocab_size` distinct characters) | |
//!
//! [`TiedLinear`](crate::nn::TiedLinear) shares its weight with another
//! layer, which a tree of independent layers cannot say: it has no
//! architecture of its own; a model that ties weights registers a kind for
//! the whole model (see below).
//!
//! The version of this schema, [`ARCHITECTURE_SCHEMA_VERSION`], is stored
//! beside it; a reader refuses a newer version, naming both. A new
//! *kind* does not change the version (an older reader refuses it as an
//! unknown kind, naming it); a new config key, or a change in the meaning
//! of an existing kind or key, does.
//!
//! # Models of your own
//!
//! A module type of your own describes itself by implementing
//! [`Module::architecture`] (returning a node of a kind of your choosing,
//! whose config may hold anything JSON holds: a language model's
//! vocabulary, say), and becomes loadable by registering that kind with
//! [`register_kind`]: a function that builds the module, with parameters of
//! the right shapes (their values are then loaded from the checkpoint),
//! from a node. Model-level facts that are not hyperparameters can also
//! travel as plain string metadata: see
//! [`io::save_model_with_metadata`](crate::io::save_model_with_metadata).
//!
//! # Examples
//!
//! ```
//! use netcl::nn::{Architecture, Linear, Module, ReLU, Sequential};
//!
//! let model = Sequential::new().with(Linear::zeros(4, 3)?).with(ReLU::new());
//! let arch = model.architecture().unwrap();
//! assert_eq!(arch.kind(), "Sequential");
//! assert_eq!(arch.children()[0].usize("in_features")?, 4);
//! assert_eq!(
//!     arch.to_json_string(),
//!     r#"{"children":[{"config":{"bias":true,"in_features":4,"out_features":3},"kind":"Linear"},{"kind":"ReLU"}],"kind":"Sequential"}"#
//! );
//!
//! // The same architecture, parsed back and built (all parameters zero).
//! let parsed = Architecture::from_json_str(&arch.to_json_string())?;
//! assert_eq!(parsed, arch);
//! let shell = parsed.build()?;
//! assert_eq!(shell.num_parameters(), 4 * 3 + 3);
//! # Ok::<(), netcl::Error>(())
//! ```

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::sync::{OnceLock, RwLock};

use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::functional::{GeluApproximate, Size2};
use crate::nn::{
    Activation, AdaptiveAvgPool2d, AvgPool2d, BatchNorm1d, BatchNorm2d, Conv2d, Dropout, Embedding,
    Flatten, Gelu, LayerNorm, Linear, MaxPool2d, Mlp, Module, MultiheadAttention, ReLU, RmsNorm,
    Sequential, Sigmoid, Silu, Tanh, TransformerBlock,
};
use crate::tensor::Tensor;

/// The version of the architecture schema this netcl writes, and the
/// newest it reads (see the [module docs](self)).
pub const ARCHITECTURE_SCHEMA_VERSION: u32 = 1;

/// The `format` of the errors about an architecture.
pub(crate) const FORMAT: &str = "netcl architecture";

/// One node of a model's architecture: a layer's kind, its hyperparameters
/// and its children (see the [module docs](self) for the schema).
///
/// # Examples
///
/// ```
/// use netcl::nn::{Architecture, Linear, Module};
///
/// let arch = Architecture::new("Linear")
///     .with("in_features", 3)
///     .with("out_features", 2)
///     .with("bias", false);
/// let layer = arch.build()?;
/// assert_eq!(layer.architecture(), Some(arch));
/// assert_eq!(layer.num_parameters(), 6);
/// # Ok::<(), netcl::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Architecture {
    kind: String,
    config: Map<String, Value>,
    children: Vec<Architecture>,
}

impl Architecture {
    /// A node of kind `kind`, without config or children.
    pub fn new(kind: impl Into<String>) -> Architecture {
        Architecture {
            kind: kind.into(),
            config: Map::new(),
            children: Vec::new(),
        }
    }

    /// This node with config entry `key` set to `value`.
    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Architecture {
        self.config.insert(key.to_string(), value.into());
        self
    }

    /// This node with `child` appended to its children.
    pub fn with_child(mut self, child: Architecture) -> Architecture {
        self.children.push(child);
        self
    }

    /// The kind (`"Linear"`).
    pub fn kind(&self) -> &str {
        &self.kind
    }

    /// The hyperparameters.
    pub fn config(&self) -> &Map<String, Value> {
        &self.config
    }

    /// The children, in order.
    pub fn children(&self) -> &[Architecture] {
        &self.children
    }

    /// This node (and its children) as a JSON value.
    pub fn to_json(&self) -> Value {
        let mut node = Map::new();
        node.insert("kind".to_string(), Value::from(self.kind.clone()));
        if !self.config.is_empty() {
            node.insert("config".to_string(), Value::Object(self.config.clone()));
        }
        if !self.children.is_empty() {
            let children = self.children.iter().map(Architecture::to_json).collect();
            node.insert("children".to_string(), Value::Array(children));
        }
        Value::Object(node)
    }

    /// This node as compact JSON text (keys sorted).
    pub fn to_json_string(&self) -> String {
        self.to_json().to_string()
    }

    /// Parses a node from JSON text.
    ///
    /// # Errors
    ///
    /// [`Error::Format`] if `json` is not JSON or not a node of the schema
    /// (a missing `kind`, a field that is not `kind`, `config` or
    /// `children`, a value of the wrong type), naming where.
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::nn::Architecture;
    ///
    /// let err = Architecture::from_json_str(r#"{"kind": "ReLU", "colour": "red"}"#).unwrap_err();
    /// assert_eq!(
    ///     err.to_string(),
    ///     "Architecture::from_json: the given JSON is not a valid netcl architecture file: \
    ///      node `(root)`: unknown field `colour` (a node has `kind`, `config` and `children`)"
    /// );
    /// ```
    pub fn from_json_str(json: &str) -> Result<Architecture> {
        parse("Architecture::from_json", "the given JSON", json)
    }

    /// Builds the module this node describes, its parameters zero (or the
    /// layer's neutral values: a norm's weight one): the shell a
    /// checkpoint's values are loaded into.
    ///
    /// # Errors
    ///
    /// [`Error::Format`] naming the node (by its position, `0.2` for the
    /// third child of the first child) for an unknown kind, a missing or
    /// ill-typed config entry, or sizes the layer refuses.
    pub fn build(&self) -> Result<Box<dyn Module>> {
        BuildContext::new("Architecture::build", "the architecture", usize::MAX).build_root(self)
    }

    fn value(&self, key: &str) -> Result<&Value> {
        self.config
            .get(key)
            .ok_or_else(|| self.config_error(key, "is missing"))
    }

    fn config_error(&self, key: &str, problem: &str) -> Error {
        Error::InvalidArgument {
            op: "Architecture",
            message: format!("config `{key}` of `{}` {problem}", self.kind),
        }
    }

    fn expected(&self, key: &str, what: &str) -> Error {
        let found = self
            .config
            .get(key)
            .map(Value::to_string)
            .unwrap_or_default();
        self.config_error(key, &format!("should be {what}, found {found}"))
    }

    /// Config entry `key` as a size.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] naming the key and what was found if it
    /// is missing or not a non-negative integer.
    pub fn usize(&self, key: &str) -> Result<usize> {
        self.value(key)?
            .as_u64()
            .and_then(|v| usize::try_from(v).ok())
            .ok_or_else(|| self.expected(key, "a non-negative integer"))
    }

    /// Config entry `key` as an unsigned 64-bit integer (a seed).
    ///
    /// # Errors
    ///
    /// As [`usize`](Architecture::usize).
    pub fn u64(&self, key: &str) -> Result<u64> {
        self.value(key)?
            .as_u64()
            .ok_or_else(|| self.expected(key, "a non-negative integer"))
    }

    /// Config entry `key` as a signed integer.
    ///
    /// # Errors
    ///
    /// As [`usize`](Architecture::usize), for an integer.
    pub fn isize(&self, key: &str) -> Result<isize> {
        self.value(key)?
            .as_i64()
            .and_then(|v| isize::try_from(v).ok())
            .ok_or_else(|| self.expected(key, "an integer"))
    }

    /// Config entry `key` as an `f32`.
    ///
    /// # Errors
    ///
    /// As [`usize`](Architecture::usize), for a number.
    pub fn f32(&self, key: &str) -> Result<f32> {
        self.value(key)?
            .as_f64()
            .map(|v| v as f32)
            .ok_or_else(|| self.expected(key, "a number"))
    }

    /// Config entry `key` as a boolean.
    ///
    /// # Errors
    ///
    /// As [`usize`](Architecture::usize), for a boolean.
    pub fn bool(&self, key: &str) -> Result<bool> {
        self.value(key)?
            .as_bool()
            .ok_or_else(|| self.expected(key, "true or false"))
    }

    /// Config entry `key` as a string.
    ///
    /// # Errors
    ///
    /// As [`usize`](Architecture::usize), for a string.
    pub fn str(&self, key: &str) -> Result<&str> {
        self.value(key)?
            .as_str()
            .ok_or_else(|| self.expected(key, "a string"))
    }

    /// Config entry `key` as a list of sizes.
    ///
    /// # Errors
    ///
    /// As [`usize`](Architecture::usize), for an array of non-negative
    /// integers.
    pub fn usizes(&self, key: &str) -> Result<Vec<usize>> {
        self.value(key)?
            .as_array()
            .and_then(|items| {
                items
                    .iter()
                    .map(|v| v.as_u64().and_then(|v| usize::try_from(v).ok()))
                    .collect::<Option<Vec<usize>>>()
            })
            .ok_or_else(|| self.expected(key, "an array of non-negative integers"))
    }

    fn size2(&self, key: &str) -> Result<Size2> {
        match self.usizes(key)?.as_slice() {
            &[h, w] => Ok(Size2(h, w)),
            _ => Err(self.expected(key, "a pair [h, w]")),
        }
    }

    fn optional_size2(&self, key: &str) -> Result<Option<Size2>> {
        match self.config.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(_) => self.size2(key).map(Some),
        }
    }
}

fn size2(s: Size2) -> Value {
    Value::from(vec![s.0, s.1])
}

/// An `f32` as a JSON number (`null` if not finite): its shortest decimal
/// form (`1e-5`, not `9.999999747378752e-6`), which parses back to the
/// same `f32`.
fn number(v: f32) -> Value {
    Value::from(v.to_string().parse::<f64>().unwrap_or(f64::NAN))
}

/// Parses the JSON text of an architecture, errors from `op` on
/// `source_name`.
pub(crate) fn parse(op: &'static str, source_name: &str, json: &str) -> Result<Architecture> {
    let error = |message: String| Error::Format {
        op,
        source_name: source_name.to_string(),
        format: FORMAT,
        message,
    };
    // serde_json refuses nesting deeper than 128 levels with an error
    // (no stack overflow on a hostile file).
    let value: Value =
        serde_json::from_str(json).map_err(|err| error(format!("malformed JSON: {err}")))?;
    from_value(&value, &mut Vec::new()).map_err(error)
}

fn from_value(value: &Value, path: &mut Vec<usize>) -> std::result::Result<Architecture, String> {
    let at = || format!("node `{}`", path_name(path));
    let node = value
        .as_object()
        .ok_or_else(|| format!("{}: expected an object, found {value}", at()))?;
    if let Some(key) = node
        .keys()
        .find(|k| !["kind", "config", "children"].contains(&k.as_str()))
    {
        return Err(format!(
            "{}: unknown field `{key}` (a node has `kind`, `config` and `children`)",
            at()
        ));
    }
    let kind = match node.get("kind") {
        Some(Value::String(kind)) => kind.clone(),
        Some(other) => {
            return Err(format!(
                "{}: `kind` should be a string, found {other}",
                at()
            ));
        }
        None => return Err(format!("{}: `kind` is missing", at())),
    };
    let config = match node.get("config") {
        None => Map::new(),
        Some(Value::Object(config)) => config.clone(),
        Some(other) => {
            return Err(format!(
                "{} ({kind}): `config` should be an object, found {other}",
                at()
            ));
        }
    };
    let children = match node.get("children") {
        None => Vec::new(),
        Some(Value::Array(items)) => {
            let mut children = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                path.push(i);
                let child = from_value(item, path);
                path.pop();
                children.push(child?);
            }
            children
        }
        Some(other) => {
            return Err(format!(
                "{} ({kind}): `children` should be an array, found {other}",
                at()
            ));
        }
    };
    Ok(Architecture {
        kind,
        config,
        children,
    })
}

fn path_name(path: &[usize]) -> String {
    if path.is_empty() {
        "(root)".to_string()
    } else {
        path.iter()
            .map(usize::to_string)
            .collect::<Vec<_>>()
            .join(".")
    }
}

/// Builds a module of a registered kind from its node: see
/// [`register_kind`].
pub type BuildFn = fn(&Architecture, &BuildContext) -> Result<Box<dyn Module>>;

fn registry() -> &'static RwLock<BTreeMap<String, BuildFn>> {
    static REGISTRY: OnceLock<RwLock<BTreeMap<String, BuildFn>>> = OnceLock::new();
    REGISTRY.get_or_init(|| RwLock::new(BTreeMap::new()))
}

const BATCH_NORM: &[&str] = &["num_features", "eps", "momentum", "affine"];

/// The built-in kinds, in the order of the module docs' table, with their
/// config keys (no other is accepted: a misspelt key is an error, not a
/// default silently taken) and their builders.
#[allow(clippy::type_complexity)]
const BUILT_IN: &[(&str, &[&str], BuildFn)] = &[
    (
        "Linear",
        &["in_features", "out_features", "bias"],
        build_linear,
    ),
    ("Sequential", &[], build_sequential),
    ("Mlp", &["dims", "activation"], build_mlp),
    ("ReLU", &[], |_, _| Ok(Box::new(ReLU::new()))),
    ("Sigmoid", &[], |_, _| Ok(Box::new(Sigmoid::new()))),
    ("Tanh", &[], |_, _| Ok(Box::new(Tanh::new()))),
    ("Silu", &[], |_, _| Ok(Box::new(Silu::new()))),
    ("Gelu", &["approximate"], build_gelu),
    ("Dropout", &["p", "seed"], |a, _| {
        Ok(Box::new(Dropout::try_new(a.f32("p")?, a.u64("seed")?)?))
    }),
    (
        "Conv2d",
        &[
            "in_channels",
            "out_channels",
            "kernel_size",
            "stride",
            "padding",
            "dilation",
            "groups",
            "bias",
        ],
        build_conv2d,
    ),
    (
        "MaxPool2d",
        &["kernel_size", "stride", "padding"],
        build_max_pool2d,
    ),
    (
        "AvgPool2d",
        &["kernel_size", "stride", "padding", "count_include_pad"],
        build_avg_pool2d,
    ),
    ("AdaptiveAvgPool2d", &["output_size"], |a, _| {
        Ok(Box::new(AdaptiveAvgPool2d::new(a.size2("output_size")?)))
    }),
    ("Flatten", &["start_dim", "end_dim"], |a, _| {
        Ok(Box::new(Flatten::with_dims(
            a.isize("start_dim")?,
            a.isize("end_dim")?,
        )))
    }),
    ("BatchNorm1d", BATCH_NORM, build_batch_norm1d),
    ("BatchNorm2d", BATCH_NORM, build_batch_norm2d),
    (
        "LayerNorm",
        &["normalized_shape", "eps", "affine"],
        build_layer_norm,
    ),
    (
        "RmsNorm",
        &["normalized_shape", "eps", "affine"],
        build_rms_norm,
    ),
    (
        "Embedding",
        &["num_embeddings", "embedding_dim"],
        build_embedding,
    ),
    (
        "MultiheadAttention",
        &["embed_dim", "num_heads"],
        build_attention,
    ),
    (
        "TransformerBlock",
        &["d_model", "num_heads", "d_ff"],
        build_transformer_block,
    ),
    (
        "CharTransformer",
        crate::models::CharTransformer::ARCHITECTURE_KEYS,
        crate::models::CharTransformer::build_kind,
    ),
];

/// Makes `kind` loadable: [`io::load_model`](crate::io::load_model) (and
/// [`Architecture::build`]) build a node of that kind with `build`, which
/// returns the module with parameters of the right shapes (their values
/// are loaded afterwards). A module type whose
/// [`Module::architecture`] returns nodes of `kind` registers it once,
/// before loading (at start-up, say). Registering a kind again replaces its
/// function.
///
/// `build` reads the node's config with the typed readers
/// ([`Architecture::usize`], ...), builds children with
/// [`BuildContext::build_child`], and declares the shape of every tensor it
/// allocates with [`BuildContext::reserve`] *before* allocating it: a
/// checkpoint's architecture is untrusted input, and `reserve` refuses
/// sizes larger than the checkpoint's tensors, so a lying file cannot make
/// the loader allocate terabytes.
///
/// # Errors
///
/// [`Error::InvalidArgument`] if `kind` is a built-in kind.
///
/// # Examples
///
/// ```
/// use netcl::nn::{Architecture, BuildContext, Module, register_kind};
/// use netcl::{Result, Tensor};
///
/// /// Multiplies its input by a learned scale per feature.
/// #[derive(Debug)]
/// struct Scale(Tensor);
///
/// impl Module for Scale {
///     fn forward(&self, x: &Tensor) -> Result<Tensor> {
///         x.try_mul(&self.0)
///     }
///     fn named_parameters(&self) -> Vec<(String, Tensor)> {
///         vec![("gain".to_string(), self.0.clone())]
///     }
///     fn architecture(&self) -> Option<Architecture> {
///         Some(Architecture::new("example.Scale").with("features", self.0.numel()))
///     }
/// }
///
/// fn build_scale(arch: &Architecture, cx: &BuildContext) -> Result<Box<dyn Module>> {
///     let features = arch.usize("features")?;
///     cx.reserve(&[features])?;
///     Ok(Box::new(Scale(Tensor::zeros(&[features]).requires_grad_(true))))
/// }
///
/// register_kind("example.Scale", build_scale)?;
/// let model = Scale(Tensor::from_vec(vec![1.0, 2.0, 3.0], &[3])?);
/// let bytes = netcl::io::model_to_bytes(&model)?;
/// let loaded = netcl::io::load_model_bytes(&bytes)?;
/// assert_eq!(loaded.forward(&Tensor::ones(&[3]))?.to_vec(), vec![1.0, 2.0, 3.0]);
///
/// assert!(register_kind("Linear", build_scale).is_err(), "built-in kinds stay");
/// # Ok::<(), netcl::Error>(())
/// ```
pub fn register_kind(kind: &str, build: BuildFn) -> Result<()> {
    if BUILT_IN.iter().any(|(name, _, _)| *name == kind) {
        return Err(Error::InvalidArgument {
            op: "nn::register_kind",
            message: format!("`{kind}` is a built-in kind and cannot be replaced"),
        });
    }
    registry()
        .write()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .insert(kind.to_string(), build);
    Ok(())
}

/// Every kind that can be built: the built-in ones, then the registered
/// ones (sorted).
///
/// # Examples
///
/// ```
/// let kinds = netcl::nn::known_kinds();
/// assert_eq!(kinds[0], "Linear");
/// assert!(kinds.iter().any(|k| k == "TransformerBlock"));
/// ```
pub fn known_kinds() -> Vec<String> {
    let registered = registry()
        .read()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    BUILT_IN
        .iter()
        .map(|(name, _, _)| name.to_string())
        .chain(registered.keys().cloned())
        .collect()
}

fn lookup(kind: &str) -> Option<(Option<&'static [&'static str]>, BuildFn)> {
    if let Some((_, keys, build)) = BUILT_IN.iter().find(|(name, _, _)| *name == kind) {
        return Some((Some(keys), *build));
    }
    registry()
        .read()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .get(kind)
        .map(|build| (None, *build))
}

/// What a [`BuildFn`] builds with: children, and a budget of tensor
/// elements that the tensors it allocates must fit in.
///
/// When a checkpoint is loaded, the budget is twice the number of values
/// the checkpoint's tensors hold, plus 2^20: a model whose parameters and
/// buffers are all in the file never needs more, and an architecture that
/// claims more is refused before anything is allocated.
#[derive(Debug)]
pub struct BuildContext {
    op: &'static str,
    source_name: String,
    budget: Cell<usize>,
    path: RefCell<Vec<String>>,
}

impl BuildContext {
    pub(crate) fn new(op: &'static str, source_name: &str, budget: usize) -> BuildContext {
        BuildContext {
            op,
            source_name: source_name.to_string(),
            budget: Cell::new(budget),
            path: RefCell::new(Vec::new()),
        }
    }

    pub(crate) fn build_root(&self, arch: &Architecture) -> Result<Box<dyn Module>> {
        self.build_at(arch)
    }

    /// Builds `child`, the sub-module named `name` (its position, or the
    /// prefix of its parameters' names), with this context's budget.
    ///
    /// # Errors
    ///
    /// The error of building `child`, an [`Error::Format`] naming the node.
    pub fn build_child(&self, name: &str, child: &Architecture) -> Result<Box<dyn Module>> {
        self.path.borrow_mut().push(name.to_string());
        let result = self.build_at(child);
        self.path.borrow_mut().pop();
        result
    }

    fn build_at(&self, arch: &Architecture) -> Result<Box<dyn Module>> {
        let result = match lookup(&arch.kind) {
            Some((Some(keys), build)) => {
                match arch.config.keys().find(|k| !keys.contains(&k.as_str())) {
                    Some(key) => Err(Error::InvalidArgument {
                        op: self.op,
                        message: format!(
                            "unknown config key `{key}` (`{}` has {})",
                            arch.kind,
                            if keys.is_empty() {
                                "none".to_string()
                            } else {
                                keys.iter()
                                    .map(|k| format!("`{k}`"))
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            }
                        ),
                    }),
                    None => build(arch, self),
                }
            }
            Some((_, build)) => build(arch, self),
            None => Err(Error::Unsupported {
                op: self.op,
                message: format!(
                    "unknown layer kind `{}` (known: {}; a kind of your own is registered with nn::register_kind)",
                    arch.kind,
                    known_kinds().join(", ")
                ),
            }),
        };
        result.map_err(|err| match err {
            // Already names the (deeper) node.
            Error::Format { format: FORMAT, .. } => err,
            err => {
                let message = match &err {
                    Error::Unsupported { message, .. } => message.clone(),
                    err => err.to_string(),
                };
                Error::Format {
                    op: self.op,
                    source_name: self.source_name.clone(),
                    format: FORMAT,
                    message: format!("layer `{}` ({}): {message}", self.here(), arch.kind),
                }
            }
        })
    }

    fn here(&self) -> String {
        let path = self.path.borrow();
        if path.is_empty() {
            "(root)".to_string()
        } else {
            path.join(".")
        }
    }

    /// Declares a tensor of `shape` about to be allocated, taking its
    /// elements from the budget.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] if the shape's element count overflows
    /// or exceeds what is left of the budget.
    pub fn reserve(&self, shape: &[usize]) -> Result<()> {
        let elements = shape
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .filter(|&n| n <= self.budget.get())
            .ok_or_else(|| Error::InvalidArgument {
                op: self.op,
                message: format!(
                    "a tensor of shape {shape:?} is larger than the checkpoint's remaining {} values",
                    self.budget.get()
                ),
            })?;
        self.budget.set(self.budget.get() - elements);
        Ok(())
    }
}

fn zeros(cx: &BuildContext, shape: &[usize]) -> Result<Tensor> {
    cx.reserve(shape)?;
    Ok(Tensor::zeros(shape).requires_grad_(true))
}

fn build_linear(a: &Architecture, cx: &BuildContext) -> Result<Box<dyn Module>> {
    let (i, o) = (a.usize("in_features")?, a.usize("out_features")?);
    let weight = zeros(cx, &[i, o])?;
    let bias = if a.bool("bias")? {
        Some(zeros(cx, &[o])?)
    } else {
        None
    };
    Ok(Box::new(Linear::from_parts(weight, bias)?))
}

fn build_sequential(a: &Architecture, cx: &BuildContext) -> Result<Box<dyn Module>> {
    let mut model = Sequential::new();
    for (i, child) in a.children.iter().enumerate() {
        model.push_boxed(cx.build_child(&i.to_string(), child)?);
    }
    Ok(Box::new(model))
}

fn build_mlp(a: &Architecture, cx: &BuildContext) -> Result<Box<dyn Module>> {
    let dims = a.usizes("dims")?;
    let activation = match a.str("activation")? {
        "relu" => Activation::Relu,
        "sigmoid" => Activation::Sigmoid,
        "tanh" => Activation::Tanh,
        _ => return Err(a.expected("activation", "\"relu\", \"sigmoid\" or \"tanh\"")),
    };
    for w in dims.windows(2) {
        cx.reserve(&[w[0], w[1]])?;
        cx.reserve(&[w[1]])?;
    }
    Ok(Box::new(Mlp::zeros(&dims, activation)?))
}

fn build_gelu(a: &Architecture, _: &BuildContext) -> Result<Box<dyn Module>> {
    let approximate = match a.str("approximate")? {
        "none" => GeluApproximate::None,
        "tanh" => GeluApproximate::Tanh,
        _ => return Err(a.expected("approximate", "\"none\" or \"tanh\"")),
    };
    Ok(Box::new(Gelu::with_approximate(approximate)))
}

fn build_conv2d(a: &Architecture, cx: &BuildContext) -> Result<Box<dyn Module>> {
    let (i, o, groups) = (
        a.usize("in_channels")?,
        a.usize("out_channels")?,
        a.usize("groups")?,
    );
    if groups == 0 || !i.is_multiple_of(groups) {
        return Err(a.expected(
            "groups",
            &format!("a positive divisor of in_channels ({i})"),
        ));
    }
    let Size2(kh, kw) = a.size2("kernel_size")?;
    let weight = zeros(cx, &[o, i / groups, kh, kw])?;
    let bias = if a.bool("bias")? {
        Some(zeros(cx, &[o])?)
    } else {
        None
    };
    Ok(Box::new(
        Conv2d::from_parts(weight, bias, groups)?
            .with_stride(a.size2("stride")?)
            .with_padding(a.size2("padding")?)
            .with_dilation(a.size2("dilation")?),
    ))
}

fn build_max_pool2d(a: &Architecture, _: &BuildContext) -> Result<Box<dyn Module>> {
    let mut pool = MaxPool2d::new(a.size2("kernel_size")?).with_padding(a.size2("padding")?);
    if let Some(stride) = a.optional_size2("stride")? {
        pool = pool.with_stride(stride);
    }
    Ok(Box::new(pool))
}

fn build_avg_pool2d(a: &Architecture, _: &BuildContext) -> Result<Box<dyn Module>> {
    let mut pool = AvgPool2d::new(a.size2("kernel_size")?)
        .with_padding(a.size2("padding")?)
        .with_count_include_pad(a.bool("count_include_pad")?);
    if let Some(stride) = a.optional_size2("stride")? {
        pool = pool.with_stride(stride);
    }
    Ok(Box::new(pool))
}

/// Reserves a batch norm's parameters and buffers.
fn reserve_batch_norm(a: &Architecture, cx: &BuildContext) -> Result<(usize, bool)> {
    let (n, affine) = (a.usize("num_features")?, a.bool("affine")?);
    let tensors = if affine { 4 } else { 2 };
    for _ in 0..tensors {
        cx.reserve(&[n])?;
    }
    cx.reserve(&[])?;
    Ok((n, affine))
}

fn build_batch_norm1d(a: &Architecture, cx: &BuildContext) -> Result<Box<dyn Module>> {
    let (n, affine) = reserve_batch_norm(a, cx)?;
    let norm = if affine {
        BatchNorm1d::try_new(n)?
    } else {
        BatchNorm1d::try_without_affine(n)?
    };
    Ok(Box::new(
        norm.with_eps(a.f32("eps")?)
            .with_momentum(a.f32("momentum")?),
    ))
}

fn build_batch_norm2d(a: &Architecture, cx: &BuildContext) -> Result<Box<dyn Module>> {
    let (n, affine) = reserve_batch_norm(a, cx)?;
    let norm = if affine {
        BatchNorm2d::try_new(n)?
    } else {
        BatchNorm2d::try_without_affine(n)?
    };
    Ok(Box::new(
        norm.with_eps(a.f32("eps")?)
            .with_momentum(a.f32("momentum")?),
    ))
}

fn build_layer_norm(a: &Architecture, cx: &BuildContext) -> Result<Box<dyn Module>> {
    let shape = a.usizes("normalized_shape")?;
    let norm = if a.bool("affine")? {
        cx.reserve(&shape)?;
        cx.reserve(&shape)?;
        LayerNorm::try_new(&shape)?
    } else {
        LayerNorm::try_without_affine(&shape)?
    };
    Ok(Box::new(norm.with_eps(a.f32("eps")?)))
}

fn build_rms_norm(a: &Architecture, cx: &BuildContext) -> Result<Box<dyn Module>> {
    let shape = a.usizes("normalized_shape")?;
    let affine = a.bool("affine")?;
    // RmsNorm::new allocates its weight even when it is dropped after.
    cx.reserve(&shape)?;
    let mut norm = if affine {
        RmsNorm::try_new(&shape)?
    } else {
        RmsNorm::try_without_affine(&shape)?
    };
    if !affine {
        // Give the unused share of the budget back.
        cx.budget
            .set(cx.budget.get() + shape.iter().product::<usize>());
    }
    match a.config.get("eps") {
        None | Some(Value::Null) => {}
        Some(_) => norm = norm.with_eps(a.f32("eps")?),
    }
    Ok(Box::new(norm))
}

fn build_embedding(a: &Architecture, cx: &BuildContext) -> Result<Box<dyn Module>> {
    let (n, d) = (a.usize("num_embeddings")?, a.usize("embedding_dim")?);
    cx.reserve(&[n, d])?;
    Ok(Box::new(Embedding::zeros(n, d)?))
}

/// Reserves a `MultiheadAttention`'s parameters.
fn reserve_attention(cx: &BuildContext, d: usize) -> Result<()> {
    let three_d = d.checked_mul(3).ok_or_else(|| Error::InvalidArgument {
        op: cx.op,
        message: format!("embed_dim {d} is too large"),
    })?;
    cx.reserve(&[three_d, d])?;
    cx.reserve(&[three_d])?;
    cx.reserve(&[d, d])?;
    cx.reserve(&[d])
}

fn build_attention(a: &Architecture, cx: &BuildContext) -> Result<Box<dyn Module>> {
    let (d, heads) = (a.usize("embed_dim")?, a.usize("num_heads")?);
    reserve_attention(cx, d)?;
    Ok(Box::new(MultiheadAttention::zeros(d, heads)?))
}

fn build_transformer_block(a: &Architecture, cx: &BuildContext) -> Result<Box<dyn Module>> {
    let (d, heads, ff) = (a.usize("d_model")?, a.usize("num_heads")?, a.usize("d_ff")?);
    for _ in 0..4 {
        cx.reserve(&[d])?; // the norms
    }
    reserve_attention(cx, d)?;
    cx.reserve(&[d, ff])?;
    cx.reserve(&[ff])?;
    cx.reserve(&[ff, d])?;
    cx.reserve(&[d])?;
    Ok(Box::new(TransformerBlock::zeros(d, heads, ff)?))
}

pub(crate) fn size2_value(s: Size2) -> Value {
    size2(s)
}

pub(crate) fn number_value(v: f32) -> Value {
    number(v)
}
