//! A character-level transformer language model: [`CharTransformer`], its
//! [`Vocab`], and generation with a key/value cache ([`Generator`]).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::ops::ControlFlow;
use std::path::Path;

use rand::rngs::StdRng;
use rand::{Rng, RngExt, SeedableRng};

use crate::error::{Error, Result, or_panic};
use crate::nn::architecture::number_value;
use crate::nn::{
    Architecture, AttentionMasks, BuildContext, Dropout, Embedding, LayerNorm, Linear, Module,
    TorchLayout, TrainingFlag, TransformerBlock, fork_scope, prefixed,
};
use crate::ops::activation::gelu32;
use crate::ops::attention::{lane_dot, softmax_row};
use crate::tensor::Tensor;

/// The characters a language model knows, each with an id: the distinct
/// characters of a corpus, in sorted order (id 0 is the smallest).
///
/// A model carries its vocabulary ([`CharTransformer::with_vocab`]) in
/// its architecture, so that a self-describing checkpoint
/// ([`io::save_model`](crate::io::save_model), and
/// [`CharTransformer::save`]) holds it and a server gets it back from any
/// loaded model with [`Vocab::of_module`].
///
/// # Examples
///
/// ```
/// use netcl::models::Vocab;
///
/// let vocab = Vocab::from_text("hello world");
/// assert_eq!(vocab.len(), 8); // ' ', d, e, h, l, o, r, w
/// let ids = vocab.encode("hold")?;
/// assert_eq!(ids, [3, 5, 4, 1]);
/// assert_eq!(vocab.decode(&ids)?, "hold");
/// assert!(vocab.encode("hex").is_err(), "x is not in the vocabulary");
/// # Ok::<(), netcl::Error>(())
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct Vocab {
    chars: Vec<char>,
    ids: HashMap<char, usize>,
}

impl Vocab {
    /// The distinct characters of `text`, sorted.
    pub fn from_text(text: &str) -> Vocab {
        let mut chars: Vec<char> = text.chars().collect();
        chars.sort_unstable();
        chars.dedup();
        Vocab::from_sorted(chars)
    }

    /// A vocabulary of `chars` in the given order (id `i` is `chars[i]`).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] if `chars` is empty or has a character
    /// twice.
    pub fn from_chars(chars: &str) -> Result<Vocab> {
        let chars: Vec<char> = chars.chars().collect();
        let vocab = Vocab::from_sorted(chars);
        if vocab.ids.len() != vocab.chars.len() || vocab.chars.is_empty() {
            return Err(Error::InvalidArgument {
                op: "Vocab::from_chars",
                message: format!(
                    "the characters must be distinct and at least one, got {} characters of which {} distinct",
                    vocab.chars.len(),
                    vocab.ids.len()
                ),
            });
        }
        Ok(vocab)
    }

    fn from_sorted(chars: Vec<char>) -> Vocab {
        let ids = chars.iter().enumerate().map(|(i, &c)| (c, i)).collect();
        Vocab { chars, ids }
    }

    /// The vocabulary in a `CharTransformer` architecture node (its
    /// `vocab` entry), `None` if it has none.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] if `arch` is not a valid
    /// `CharTransformer` node ([`CharLmConfig::from_architecture`]), or
    /// its `vocab` is not a string of distinct characters, as many as
    /// `vocab_size`.
    pub fn from_architecture(arch: &Architecture) -> Result<Option<Vocab>> {
        let config = CharLmConfig::from_architecture(arch)?;
        if !arch.config().contains_key("vocab") {
            return Ok(None);
        }
        let vocab =
            Vocab::from_chars(arch.str("vocab")?).map_err(|err| Error::InvalidArgument {
                op: "Architecture",
                message: format!(
                    "config `vocab` of `{CHAR_TRANSFORMER}` is not a vocabulary: {err}"
                ),
            })?;
        if vocab.len() != config.vocab_size {
            return Err(Error::InvalidArgument {
                op: "Architecture",
                message: format!(
                    "config `vocab` of `{CHAR_TRANSFORMER}` has {} characters, `vocab_size` is {}",
                    vocab.len(),
                    config.vocab_size
                ),
            });
        }
        Ok(Some(vocab))
    }

    /// The vocabulary of `model`, a [`CharTransformer`] (a model loaded
    /// with [`io::load_model`](crate::io::load_model), a published
    /// [`Version`](crate::nn::Version)'s model, ...), read from its
    /// [architecture](Module::architecture) without knowing its type.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] if `model` is not a `CharTransformer`
    /// (naming its kind) or has no vocabulary.
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::models::{CharLmConfig, CharTransformer, Generator, Vocab};
    /// use netcl::nn::Module;
    ///
    /// let vocab = Vocab::from_text("hello world");
    /// let config = CharLmConfig::new(vocab.len()).with_width(8).with_heads(2).with_blocks(1).with_context(8);
    /// let model = CharTransformer::zeros(config)?.try_with_vocab(vocab.clone())?;
    /// let loaded = netcl::io::load_model_bytes(&netcl::io::model_to_bytes(&model)?)?;
    ///
    /// // A server knows only `Box<dyn Module>`.
    /// assert_eq!(Vocab::of_module(&*loaded)?, vocab);
    /// let generator = Generator::of_module(&*loaded)?;
    /// let text = vocab.decode(&generator.generate(&vocab.encode("he")?, 5, 1.0, None, 1))?;
    /// assert_eq!(text.chars().count(), 5);
    /// # Ok::<(), netcl::Error>(())
    /// ```
    pub fn of_module(model: &dyn Module) -> Result<Vocab> {
        let arch = char_lm_architecture(model, "Vocab::of_module")?;
        Vocab::from_architecture(&arch)?.ok_or_else(|| Error::InvalidArgument {
            op: "Vocab::of_module",
            message: "the CharTransformer has no vocabulary (give it one with \
                      CharTransformer::with_vocab before saving)"
                .to_string(),
        })
    }

    /// The number of characters.
    pub fn len(&self) -> usize {
        self.chars.len()
    }

    /// Whether there is no character.
    pub fn is_empty(&self) -> bool {
        self.chars.is_empty()
    }

    /// The characters in id order, as one string.
    pub fn chars(&self) -> String {
        self.chars.iter().collect()
    }

    /// The id of `c`, if it is in the vocabulary.
    pub fn id(&self, c: char) -> Option<usize> {
        self.ids.get(&c).copied()
    }

    /// The ids of the characters of `text`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] naming the first character that is not in
    /// the vocabulary and its position.
    pub fn encode(&self, text: &str) -> Result<Vec<usize>> {
        text.chars()
            .enumerate()
            .map(|(i, c)| {
                self.id(c).ok_or_else(|| Error::InvalidArgument {
                    op: "Vocab::encode",
                    message: format!("character {c:?} at position {i} is not in the vocabulary"),
                })
            })
            .collect()
    }

    /// The text of `ids`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] naming the first id that is not below
    /// [`len`](Vocab::len).
    pub fn decode(&self, ids: &[usize]) -> Result<String> {
        ids.iter()
            .map(|&id| {
                self.chars
                    .get(id)
                    .copied()
                    .ok_or_else(|| Error::InvalidArgument {
                        op: "Vocab::decode",
                        message: format!("id {id} is not below the vocabulary size {}", self.len()),
                    })
            })
            .collect()
    }
}

impl fmt::Debug for Vocab {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Vocab")
            .field("chars", &self.chars())
            .finish()
    }
}

/// The sizes of a [`CharTransformer`].
///
/// [`new`](CharLmConfig::new) gives the defaults of the example
/// `train_charlm`: width 128, 4 heads, 4 blocks, a context of 64
/// characters, an MLP of width 512 and no dropout.
///
/// # Examples
///
/// ```
/// use netcl::models::CharLmConfig;
///
/// let config = CharLmConfig::new(65).with_blocks(2).with_context(32);
/// assert_eq!((config.vocab_size, config.d_model, config.num_blocks, config.context), (65, 128, 2, 32));
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct CharLmConfig {
    /// The number of characters, [`Vocab::len`].
    pub vocab_size: usize,
    /// The width of every position's features.
    pub d_model: usize,
    /// The attention heads of each block (dividing `d_model`).
    pub num_heads: usize,
    /// The number of transformer blocks.
    pub num_blocks: usize,
    /// The longest sequence the model reads (the positions it embeds).
    pub context: usize,
    /// The width of each block's MLP.
    pub d_ff: usize,
    /// The dropout probability applied to the embeddings in training mode.
    pub dropout: f32,
}

impl CharLmConfig {
    /// The default sizes for a vocabulary of `vocab_size` characters.
    pub fn new(vocab_size: usize) -> CharLmConfig {
        CharLmConfig {
            vocab_size,
            d_model: 128,
            num_heads: 4,
            num_blocks: 4,
            context: 64,
            d_ff: 512,
            dropout: 0.0,
        }
    }

    /// This config with width `d_model` and an MLP of `4·d_model`.
    pub fn with_width(mut self, d_model: usize) -> CharLmConfig {
        self.d_model = d_model;
        self.d_ff = 4 * d_model;
        self
    }

    /// This config with `num_heads` heads.
    pub fn with_heads(mut self, num_heads: usize) -> CharLmConfig {
        self.num_heads = num_heads;
        self
    }

    /// This config with `num_blocks` blocks.
    pub fn with_blocks(mut self, num_blocks: usize) -> CharLmConfig {
        self.num_blocks = num_blocks;
        self
    }

    /// This config with a context of `context` characters.
    pub fn with_context(mut self, context: usize) -> CharLmConfig {
        self.context = context;
        self
    }

    /// This config with dropout probability `dropout`.
    pub fn with_dropout(mut self, dropout: f32) -> CharLmConfig {
        self.dropout = dropout;
        self
    }

    fn check(&self) -> Result<()> {
        let sizes = [
            self.vocab_size,
            self.d_model,
            self.num_heads,
            self.num_blocks,
            self.context,
            self.d_ff,
        ];
        if sizes.contains(&0) || !self.d_model.is_multiple_of(self.num_heads) {
            return Err(Error::InvalidArgument {
                op: "CharTransformer",
                message: format!(
                    "every size must be positive and num_heads must divide d_model, got {self:?}"
                ),
            });
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::InvalidArgument {
                op: "CharTransformer",
                message: format!("dropout must be in [0, 1), got {}", self.dropout),
            });
        }
        Ok(())
    }

    /// The config as checkpoint metadata (string pairs).
    fn to_metadata(self) -> BTreeMap<String, String> {
        [
            ("vocab_size", self.vocab_size.to_string()),
            ("d_model", self.d_model.to_string()),
            ("num_heads", self.num_heads.to_string()),
            ("num_blocks", self.num_blocks.to_string()),
            ("context", self.context.to_string()),
            ("d_ff", self.d_ff.to_string()),
            ("dropout", self.dropout.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    fn from_metadata(meta: &BTreeMap<String, String>, source: &str) -> Result<CharLmConfig> {
        let field = |key: &str| -> Result<&String> {
            meta.get(key).ok_or_else(|| Error::Format {
                op: "CharTransformer::load",
                source_name: source.to_string(),
                format: "a CharTransformer checkpoint",
                message: format!("the metadata has no `{key}`"),
            })
        };
        let bad = |key: &str, value: &str| Error::Format {
            op: "CharTransformer::load",
            source_name: source.to_string(),
            format: "a CharTransformer checkpoint",
            message: format!("metadata `{key}` = {value:?} is not a valid value"),
        };
        let size = |key: &str| -> Result<usize> {
            let value = field(key)?;
            value.parse().map_err(|_| bad(key, value))
        };
        let dropout = field("dropout")?;
        let config = CharLmConfig {
            vocab_size: size("vocab_size")?,
            d_model: size("d_model")?,
            num_heads: size("num_heads")?,
            num_blocks: size("num_blocks")?,
            context: size("context")?,
            d_ff: size("d_ff")?,
            dropout: dropout.parse().map_err(|_| bad("dropout", dropout))?,
        };
        config.check()?;
        Ok(config)
    }
}

/// The kind of a [`CharTransformer`]'s architecture node.
const CHAR_TRANSFORMER: &str = "CharTransformer";

/// The architecture of `model`, if it is a `CharTransformer`'s.
fn char_lm_architecture(model: &dyn Module, op: &'static str) -> Result<Architecture> {
    match model.architecture() {
        Some(arch) if arch.kind() == CHAR_TRANSFORMER => Ok(arch),
        Some(arch) => Err(Error::InvalidArgument {
            op,
            message: format!(
                "the model is a `{}`, not a `{CHAR_TRANSFORMER}`",
                arch.kind()
            ),
        }),
        None => Err(Error::InvalidArgument {
            op,
            message: format!(
                "the model does not describe its architecture, so is not a `{CHAR_TRANSFORMER}`"
            ),
        }),
    }
}

impl CharLmConfig {
    /// The config in a `CharTransformer` architecture node (see
    /// [`CharTransformer`]'s [`Module::architecture`]).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] if `arch` is of another kind, a size is
    /// missing or not a non-negative integer, or the config is invalid (a
    /// size zero, `num_heads` not dividing `d_model`, the dropout not in
    /// `[0, 1)`), naming it.
    pub fn from_architecture(arch: &Architecture) -> Result<CharLmConfig> {
        if arch.kind() != CHAR_TRANSFORMER {
            return Err(Error::InvalidArgument {
                op: "CharLmConfig::from_architecture",
                message: format!(
                    "the architecture is a `{}`, not a `{CHAR_TRANSFORMER}`",
                    arch.kind()
                ),
            });
        }
        let config = CharLmConfig {
            vocab_size: arch.usize("vocab_size")?,
            d_model: arch.usize("d_model")?,
            num_heads: arch.usize("num_heads")?,
            num_blocks: arch.usize("num_blocks")?,
            context: arch.usize("context")?,
            d_ff: arch.usize("d_ff")?,
            dropout: arch.f32("dropout")?,
        };
        config.check()?;
        Ok(config)
    }

    /// The config of `model`, a [`CharTransformer`] of any provenance
    /// (see [`Vocab::of_module`]), read from its architecture.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] if `model` is not a `CharTransformer`,
    /// naming its kind.
    pub fn of_module(model: &dyn Module) -> Result<CharLmConfig> {
        CharLmConfig::from_architecture(&char_lm_architecture(model, "CharLmConfig::of_module")?)
    }
}

/// A character-level transformer language model (GPT-style, pre-norm):
/// token and learned position embeddings, [`TransformerBlock`]s with
/// causal attention, a final [`LayerNorm`] and a [`Linear`] output head
/// giving the logits of the next character at every position.
///
/// Submodules, named as in this PyTorch module, whose `state_dict`
/// [`io::load_torch`](crate::io::load_torch) loads directly
/// (`scripts/charlm_pytorch.py` has it in full):
///
/// ```text
/// class CharTransformer(nn.Module):
///     def __init__(self, vocab, d=128, heads=4, blocks=4, context=64, d_ff=512):
///         self.tok_emb = nn.Embedding(vocab, d)
///         self.pos_emb = nn.Embedding(context, d)
///         self.blocks = nn.ModuleList(Block(d, heads, d_ff) for _ in range(blocks))
///         self.ln_f = nn.LayerNorm(d)
///         self.head = nn.Linear(d, vocab)
/// # Block: ln1 = LayerNorm, attn = nn.MultiheadAttention(batch_first=True),
/// #        ln2 = LayerNorm, mlp = Sequential(Linear(d, d_ff), GELU(), Linear(d_ff, d))
/// ```
///
/// Dropout (if [`CharLmConfig::dropout`] is not 0) applies to the sum of
/// the embeddings in training mode; the blocks have none.
///
/// [`Module::forward`] takes ids `[N, L]` (whole numbers stored as `f32`,
/// `L ≤ context`) and gives logits `[N, L, vocab_size]`;
/// [`loss`](CharTransformer::loss) is the mean cross-entropy against the
/// next characters. [`generate`](CharTransformer::generate) samples text
/// with a key/value cache.
///
/// # Self-describing checkpoints
///
/// The model describes itself ([`Module::architecture`]) as a node of the
/// built-in kind `CharTransformer` whose config holds the
/// [`CharLmConfig`] (`vocab_size`, `d_model`, `num_heads`, `num_blocks`,
/// `context`, `d_ff`, `dropout`) and, if the model has one
/// ([`with_vocab`](CharTransformer::with_vocab)), its vocabulary under
/// `vocab`: the characters in id order, as one string. The vocabulary is
/// part of the architecture, not free metadata, because the model is not
/// usable without it and its size must match the embedding's: it is
/// checked when the model is built, and it travels with the model (forks,
/// published versions). So [`io::save_model`](crate::io::save_model) and
/// [`io::load_model`](crate::io::load_model) round-trip a ready model with
/// no code, and [`Vocab::of_module`], [`CharLmConfig::of_module`] and
/// [`Generator::of_module`] get the rest from a `Box<dyn Module>`.
///
/// # Examples
///
/// ```
/// use netcl::models::{CharLmConfig, CharTransformer, Vocab, lm_batch};
/// use netcl::nn::Module;
/// use netcl::rand::SeedableRng;
///
/// let text = "abracadabra, abracadabra";
/// let vocab = Vocab::from_text(text);
/// let ids = vocab.encode(text)?;
/// let config = CharLmConfig::new(vocab.len()).with_width(16).with_blocks(1).with_context(8);
/// let model = CharTransformer::try_new(config, &mut netcl::rand::rngs::StdRng::seed_from_u64(0))?;
///
/// let (inputs, targets) = lm_batch(&ids, &[0, 5, 11], 8)?;
/// assert_eq!(model.forward(&inputs)?.shape(), &[3, 8, vocab.len()]);
/// let loss = model.loss(&inputs, &targets)?;
/// loss.backward();
///
/// let sample = model.generate(&vocab.encode("ab")?, 10, 1.0, Some(5), 7);
/// assert_eq!(sample.len(), 10);
/// assert_eq!(sample, model.generate(&vocab.encode("ab")?, 10, 1.0, Some(5), 7), "one seed, one text");
/// println!("{}", vocab.decode(&sample)?);
/// # Ok::<(), netcl::Error>(())
/// ```
pub struct CharTransformer {
    config: CharLmConfig,
    tok_emb: Embedding,
    pos_emb: Embedding,
    drop: Dropout,
    blocks: Vec<TransformerBlock>,
    ln_f: LayerNorm,
    head: Linear,
    training: TrainingFlag,
    vocab: Option<Vocab>,
}

impl CharTransformer {
    /// The config keys of a `CharTransformer` node (`vocab` optional).
    pub(crate) const ARCHITECTURE_KEYS: &'static [&'static str] = &[
        "vocab_size",
        "d_model",
        "num_heads",
        "num_blocks",
        "context",
        "d_ff",
        "dropout",
        "vocab",
    ];

    /// A model of `config`'s sizes initialised from `rng` (each layer as
    /// PyTorch initialises it).
    ///
    /// # Panics
    ///
    /// With [`try_new`](CharTransformer::try_new)'s error message, if a
    /// size is zero, `num_heads` does not divide `d_model` or the dropout is
    /// not in `[0, 1)`.
    #[track_caller]
    pub fn new<R: Rng + ?Sized>(config: CharLmConfig, rng: &mut R) -> CharTransformer {
        match CharTransformer::try_new(config, rng) {
            Ok(model) => model,
            Err(err) => panic!("{err}"),
        }
    }

    /// A model of `config`'s sizes initialised from `rng`, or the error
    /// naming the size that is wrong.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] if a size is zero, `num_heads` does not
    /// divide `d_model` or the dropout is not in `[0, 1)`.
    pub fn try_new<R: Rng + ?Sized>(config: CharLmConfig, rng: &mut R) -> Result<CharTransformer> {
        config.check()?;
        let tok_emb = Embedding::try_new(config.vocab_size, config.d_model, rng)?;
        let pos_emb = Embedding::try_new(config.context, config.d_model, rng)?;
        let blocks = (0..config.num_blocks)
            .map(|_| TransformerBlock::try_new(config.d_model, config.num_heads, config.d_ff, rng))
            .collect::<Result<Vec<_>>>()?;
        let head = Linear::try_new(config.d_model, config.vocab_size, rng)?;
        let seed = rng.next_u64();
        CharTransformer::build(config, tok_emb, pos_emb, blocks, head, seed)
    }

    /// A model with every weight zero (the norms' one): the shell to load
    /// a checkpoint into.
    ///
    /// # Errors
    ///
    /// As [`try_new`](CharTransformer::try_new).
    pub fn zeros(config: CharLmConfig) -> Result<CharTransformer> {
        config.check()?;
        let blocks = (0..config.num_blocks)
            .map(|_| TransformerBlock::zeros(config.d_model, config.num_heads, config.d_ff))
            .collect::<Result<Vec<_>>>()?;
        CharTransformer::build(
            config,
            Embedding::zeros(config.vocab_size, config.d_model)?,
            Embedding::zeros(config.context, config.d_model)?,
            blocks,
            Linear::zeros(config.d_model, config.vocab_size)?,
            0,
        )
    }

    fn build(
        config: CharLmConfig,
        tok_emb: Embedding,
        pos_emb: Embedding,
        blocks: Vec<TransformerBlock>,
        head: Linear,
        dropout_seed: u64,
    ) -> Result<CharTransformer> {
        Ok(CharTransformer {
            config,
            tok_emb,
            pos_emb,
            drop: Dropout::try_new(config.dropout, dropout_seed)?,
            blocks,
            ln_f: LayerNorm::try_new(&[config.d_model])?,
            head,
            training: TrainingFlag::new(),
            vocab: None,
        })
    }

    /// This model with vocabulary `vocab`, which its architecture (and so
    /// a checkpoint of it) then holds.
    ///
    /// # Panics
    ///
    /// With [`try_with_vocab`](CharTransformer::try_with_vocab)'s error
    /// message if the sizes differ.
    #[track_caller]
    pub fn with_vocab(self, vocab: Vocab) -> CharTransformer {
        or_panic(self.try_with_vocab(vocab))
    }

    /// This model with vocabulary `vocab`, or an error if its size is not
    /// the model's.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] naming both sizes if `vocab.len()` is not
    /// [`CharLmConfig::vocab_size`].
    pub fn try_with_vocab(mut self, vocab: Vocab) -> Result<CharTransformer> {
        if vocab.len() != self.config.vocab_size {
            return Err(Error::InvalidArgument {
                op: "CharTransformer::with_vocab",
                message: format!(
                    "the vocabulary has {} characters, the model {}",
                    vocab.len(),
                    self.config.vocab_size
                ),
            });
        }
        self.vocab = Some(vocab);
        Ok(self)
    }

    /// The model's vocabulary, if it has one.
    pub fn vocab(&self) -> Option<&Vocab> {
        self.vocab.as_ref()
    }

    /// Builds the `CharTransformer` an architecture node describes (all
    /// weights zero), for the built-in kind table.
    pub(crate) fn build_kind(arch: &Architecture, cx: &BuildContext) -> Result<Box<dyn Module>> {
        let config = CharLmConfig::from_architecture(arch)?;
        let vocab = Vocab::from_architecture(arch)?;
        let (v, d, c, f) = (
            config.vocab_size,
            config.d_model,
            config.context,
            config.d_ff,
        );
        cx.reserve(&[v, d])?;
        cx.reserve(&[c, d])?;
        for _ in 0..config.num_blocks {
            for _ in 0..5 {
                cx.reserve(&[d])?; // the norms, the out-projection's bias
            }
            cx.reserve(&[3, d, d])?;
            cx.reserve(&[3, d])?;
            cx.reserve(&[d, d])?;
            cx.reserve(&[d, f])?;
            cx.reserve(&[f])?;
            cx.reserve(&[f, d])?;
            cx.reserve(&[d])?;
        }
        cx.reserve(&[2, d])?;
        cx.reserve(&[d, v])?;
        cx.reserve(&[v])?;
        let mut model = CharTransformer::zeros(config)?;
        model.vocab = vocab;
        Ok(Box::new(model))
    }

    /// The model's sizes.
    pub fn config(&self) -> &CharLmConfig {
        &self.config
    }

    /// The blocks, `blocks.0`, `blocks.1`, ...
    pub fn blocks(&self) -> &[TransformerBlock] {
        &self.blocks
    }

    /// The logits `[N, L, vocab_size]` of the next character after each
    /// prefix of `ids`, `[N, L]` (`L ≤ context`).
    ///
    /// # Errors
    ///
    /// [`Error::Rank`] if `ids` is not 2-D, [`Error::InvalidArgument`] if
    /// it is longer than the context or empty, and the errors of the
    /// layers (an id that is not a whole number below `vocab_size`).
    pub fn logits(&self, ids: &Tensor) -> Result<Tensor> {
        const OP: &str = "CharTransformer";
        if ids.ndim() != 2 {
            return Err(Error::Rank {
                op: OP,
                expected: "ids of shape [N, L]",
                shape: ids.shape().to_vec(),
            });
        }
        let len = ids.shape()[1];
        if len == 0 || len > self.config.context || ids.shape()[0] == 0 {
            return Err(Error::InvalidArgument {
                op: OP,
                message: format!(
                    "ids {:?} must be non-empty and at most the context ({}) long",
                    ids.shape(),
                    self.config.context
                ),
            });
        }
        let positions = Tensor::try_arange(0.0, len as f32, 1.0)?;
        let x = self
            .tok_emb
            .forward(ids)?
            .try_add(&self.pos_emb.forward(&positions)?)?;
        let mut x = self.drop.forward(&x)?;
        let masks = AttentionMasks::causal();
        for block in &self.blocks {
            x = block.forward_masked(&x, &masks)?;
        }
        self.head.forward(&self.ln_f.forward(&x)?)
    }

    /// The mean cross-entropy (in nats) of the model's predictions for
    /// `inputs`, `[N, L]`, against `targets`, `[N, L]` (the next
    /// characters; see [`lm_batch`]).
    ///
    /// # Errors
    ///
    /// As [`logits`](CharTransformer::logits), and
    /// [`Error::ShapeMismatch`] if `targets` is not the shape of `inputs`.
    pub fn loss(&self, inputs: &Tensor, targets: &Tensor) -> Result<Tensor> {
        if targets.shape() != inputs.shape() {
            return Err(Error::ShapeMismatch {
                op: "CharTransformer::loss",
                lhs: inputs.shape().to_vec(),
                rhs: targets.shape().to_vec(),
            });
        }
        let rows = inputs.numel();
        self.logits(inputs)?
            .try_reshape(&[rows, self.config.vocab_size])?
            .try_cross_entropy(&targets.try_reshape(&[rows])?)
    }

    /// `max_tokens` characters sampled after `prompt` (ids), as
    /// [`Generator::generate`] on a [`generator`](CharTransformer::generator)
    /// of this model.
    ///
    /// # Panics
    ///
    /// As [`try_generate`](CharTransformer::try_generate).
    #[track_caller]
    pub fn generate(
        &self,
        prompt: &[usize],
        max_tokens: usize,
        temperature: f32,
        top_k: Option<usize>,
        seed: u64,
    ) -> Vec<usize> {
        or_panic(self.try_generate(prompt, max_tokens, temperature, top_k, seed))
    }

    /// `max_tokens` characters sampled after `prompt`, as
    /// [`Generator::try_generate`] on a
    /// [`generator`](CharTransformer::generator) of this model (which
    /// copies the weights once; keep a [`Generator`] to generate often).
    ///
    /// # Errors
    ///
    /// As [`Generator::try_generate`].
    pub fn try_generate(
        &self,
        prompt: &[usize],
        max_tokens: usize,
        temperature: f32,
        top_k: Option<usize>,
        seed: u64,
    ) -> Result<Vec<usize>> {
        self.generator()?
            .try_generate(prompt, max_tokens, temperature, top_k, seed)
    }

    /// A [`Generator`] holding a copy of the current weights.
    ///
    /// # Errors
    ///
    /// None in practice (the parameters are the model's own).
    pub fn generator(&self) -> Result<Generator> {
        Generator::from_module(self, &self.config)
    }

    /// Saves the weights, the config and `vocab` to `path`: a
    /// self-describing checkpoint ([`io::save_model`](crate::io::save_model)
    /// of the model with `vocab`), which
    /// [`io::load_model`](crate::io::load_model) loads without code; the
    /// config and the vocabulary are also in the metadata under their own
    /// keys (`vocab_size`, ..., `vocab`), as earlier versions wrote them.
    ///
    /// # Errors
    ///
    /// As [`io::save_model`](crate::io::save_model), and
    /// [`Error::InvalidArgument`] if the vocabulary's size is not the
    /// model's.
    pub fn save(&self, vocab: &Vocab, path: impl AsRef<Path>) -> Result<()> {
        if vocab.len() != self.config.vocab_size {
            return Err(Error::InvalidArgument {
                op: "CharTransformer::save",
                message: format!(
                    "the vocabulary has {} characters, the model {}",
                    vocab.len(),
                    self.config.vocab_size
                ),
            });
        }
        let mut metadata = self.config.to_metadata();
        metadata.insert("vocab".to_string(), vocab.chars());
        let model = self.try_clone()?.try_with_vocab(vocab.clone())?;
        crate::io::save_model_with_metadata(&model, path, &metadata)
    }

    /// A model (holding its vocabulary) and its vocabulary read from a
    /// checkpoint written by [`save`](CharTransformer::save), or by
    /// [`io::save_model`](crate::io::save_model) of a model with a
    /// vocabulary.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if the file cannot be read, [`Error::Format`] if its
    /// metadata is not a config and a vocabulary of the same size, and
    /// the errors of [`io::load`](crate::io::load).
    pub fn load(path: impl AsRef<Path>) -> Result<(CharTransformer, Vocab)> {
        let path = path.as_ref();
        let source = path.display().to_string();
        let meta = crate::io::read_metadata(path)?;
        if !meta.contains_key("vocab_size")
            && let Some(json) = meta.get(crate::io::ARCHITECTURE_KEY)
        {
            let format = |err: Error| Error::Format {
                op: "CharTransformer::load",
                source_name: source.clone(),
                format: "a CharTransformer checkpoint",
                message: err.to_string(),
            };
            let arch = Architecture::from_json_str(json).map_err(format)?;
            let config = CharLmConfig::from_architecture(&arch).map_err(format)?;
            let vocab = Vocab::from_architecture(&arch)
                .map_err(format)?
                .ok_or_else(|| {
                    format(Error::InvalidArgument {
                        op: "CharTransformer::load",
                        message: "the architecture has no `vocab`".to_string(),
                    })
                })?;
            let model = CharTransformer::zeros(config)?.try_with_vocab(vocab.clone())?;
            crate::io::load(&model, path)?;
            return Ok((model, vocab));
        }
        let config = CharLmConfig::from_metadata(&meta, &source)?;
        let vocab = meta
            .get("vocab")
            .map(|chars| Vocab::from_chars(chars))
            .transpose()?
            .filter(|v| v.len() == config.vocab_size)
            .ok_or_else(|| Error::Format {
                op: "CharTransformer::load",
                source_name: source.clone(),
                format: "a CharTransformer checkpoint",
                message: format!(
                    "the metadata has no `vocab` of {} characters",
                    config.vocab_size
                ),
            })?;
        let model = CharTransformer::zeros(config)?.try_with_vocab(vocab.clone())?;
        crate::io::load(&model, path)?;
        Ok((model, vocab))
    }

    /// A fork (see [`Module::try_fork`]).
    ///
    /// # Errors
    ///
    /// None in practice: every layer forks.
    pub fn try_clone(&self) -> Result<CharTransformer> {
        fork_scope(|| {
            Ok(CharTransformer {
                config: self.config,
                tok_emb: self.tok_emb.clone(),
                pos_emb: self.pos_emb.clone(),
                drop: self.drop.clone(),
                blocks: self
                    .blocks
                    .iter()
                    .map(TransformerBlock::try_clone)
                    .collect::<Result<_>>()?,
                ln_f: self.ln_f.clone(),
                head: self.head.clone(),
                training: self.training.clone(),
                vocab: self.vocab.clone(),
            })
        })
    }
}

impl Module for CharTransformer {
    /// [`logits`](CharTransformer::logits).
    ///
    /// # Errors
    ///
    /// As [`logits`](CharTransformer::logits).
    fn forward(&self, input: &Tensor) -> Result<Tensor> {
        self.logits(input)
    }

    fn named_parameters(&self) -> Vec<(String, Tensor)> {
        let mut params = prefixed("tok_emb", self.tok_emb.named_parameters());
        params.extend(prefixed("pos_emb", self.pos_emb.named_parameters()));
        for (i, block) in self.blocks.iter().enumerate() {
            params.extend(prefixed(&format!("blocks.{i}"), block.named_parameters()));
        }
        params.extend(prefixed("ln_f", self.ln_f.named_parameters()));
        params.extend(prefixed("head", self.head.named_parameters()));
        params
    }

    fn torch_layouts(&self) -> Vec<(String, TorchLayout)> {
        let mut layouts = Vec::new();
        for (i, block) in self.blocks.iter().enumerate() {
            layouts.extend(
                block
                    .torch_layouts()
                    .into_iter()
                    .map(|(n, l)| (format!("blocks.{i}.{n}"), l)),
            );
        }
        layouts.push(("head.weight".to_string(), TorchLayout::Transposed));
        layouts
    }

    fn set_training(&self, training: bool) {
        self.training.set(training);
        self.tok_emb.set_training(training);
        self.pos_emb.set_training(training);
        self.drop.set_training(training);
        for block in &self.blocks {
            block.set_training(training);
        }
        self.ln_f.set_training(training);
        self.head.set_training(training);
    }

    fn training_flag(&self) -> Option<&TrainingFlag> {
        Some(&self.training)
    }

    fn try_fork(&self) -> Result<Box<dyn Module>> {
        Ok(Box::new(self.try_clone()?))
    }

    /// A `CharTransformer` node: the config and the vocabulary, if any
    /// (see [Self-describing checkpoints](CharTransformer#self-describing-checkpoints)).
    fn architecture(&self) -> Option<Architecture> {
        let c = &self.config;
        let arch = Architecture::new(CHAR_TRANSFORMER)
            .with("vocab_size", c.vocab_size)
            .with("d_model", c.d_model)
            .with("num_heads", c.num_heads)
            .with("num_blocks", c.num_blocks)
            .with("context", c.context)
            .with("d_ff", c.d_ff)
            .with("dropout", number_value(c.dropout));
        Some(match &self.vocab {
            Some(vocab) => arch.with("vocab", vocab.chars()),
            None => arch,
        })
    }
}

impl fmt::Debug for CharTransformer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CharTransformer")
            .field("config", &self.config)
            .field("vocab", &self.vocab)
            .finish()
    }
}

/// A language-model batch: for each start offset `o` of `offsets`, the
/// input `ids[o..o + len]` and the target `ids[o + 1..o + len + 1]` (the
/// next characters), as `[offsets.len(), len]` tensors of ids.
///
/// # Errors
///
/// [`Error::InvalidArgument`] if an offset leaves fewer than `len + 1`
/// ids, or if `offsets` is empty or `len` is 0.
///
/// # Examples
///
/// ```
/// let (x, y) = netcl::models::lm_batch(&[5, 6, 7, 8], &[0, 1], 2)?;
/// assert_eq!(x.to_vec(), vec![5.0, 6.0, 6.0, 7.0]);
/// assert_eq!(y.to_vec(), vec![6.0, 7.0, 7.0, 8.0]);
/// # Ok::<(), netcl::Error>(())
/// ```
pub fn lm_batch(ids: &[usize], offsets: &[usize], len: usize) -> Result<(Tensor, Tensor)> {
    if offsets.is_empty() || len == 0 {
        return Err(Error::InvalidArgument {
            op: "lm_batch",
            message: format!(
                "need at least one offset and a positive length, got {} offsets of length {len}",
                offsets.len()
            ),
        });
    }
    let mut inputs = Vec::with_capacity(offsets.len() * len);
    let mut targets = Vec::with_capacity(offsets.len() * len);
    for &o in offsets {
        if o.checked_add(len + 1).is_none_or(|end| end > ids.len()) {
            return Err(Error::InvalidArgument {
                op: "lm_batch",
                message: format!("offset {o} + {} runs past the {} ids", len + 1, ids.len()),
            });
        }
        inputs.extend(ids[o..o + len].iter().map(|&i| i as f32));
        targets.extend(ids[o + 1..o + len + 1].iter().map(|&i| i as f32));
    }
    let shape = [offsets.len(), len];
    Ok((
        Tensor::from_vec(inputs, &shape)?,
        Tensor::from_vec(targets, &shape)?,
    ))
}

/// One block's weights, each matrix `[in, out]` (row `i` holds input
/// `i`'s weights to every output).
struct BlockWeights {
    ln1_w: Vec<f32>,
    ln1_b: Vec<f32>,
    /// `[d, 3d]`: the query, key and value projections side by side.
    qkv_w: Vec<f32>,
    qkv_b: Vec<f32>,
    out_w: Vec<f32>,
    out_b: Vec<f32>,
    ln2_w: Vec<f32>,
    ln2_b: Vec<f32>,
    fc1_w: Vec<f32>,
    fc1_b: Vec<f32>,
    fc2_w: Vec<f32>,
    fc2_b: Vec<f32>,
}

/// Text generation from a [`CharTransformer`] with a key/value cache: a
/// frozen copy of the model's weights, laid out for decoding one position
/// at a time.
///
/// Each new character runs the model on that one position: its keys and
/// values are appended to a per-call cache, and its query attends over
/// the cached keys and values of the positions before it, so the prefix is
/// never recomputed. The results are those of the full forward
/// ([`CharTransformer::logits`] of the window, to rounding). The model
/// embeds at most `context` positions: when the window is full, it
/// restarts from its last `context / 2` characters (their keys and values
/// recomputed once), so the cost stays one position per character in
/// amortised terms.
///
/// A generator computes in evaluation mode (no dropout) and records
/// nothing, whatever the calling thread's modes. It is `Send + Sync` and
/// [`generate`](Generator::generate) takes `&self` with all state per
/// call, so any number of threads generate from one generator at once;
/// the result depends only on the weights, the prompt, the sampling
/// parameters and the seed.
///
/// Build one from a model with [`CharTransformer::generator`], or from
/// any module with the same parameter names, such as a served
/// [`Version`](crate::nn::Version), with
/// [`from_module`](Generator::from_module).
///
/// # Examples
///
/// ```
/// use std::sync::Arc;
///
/// use netcl::models::{CharLmConfig, CharTransformer};
/// use netcl::rand::SeedableRng;
///
/// let config = CharLmConfig::new(10).with_width(16).with_blocks(1).with_context(8);
/// let model = CharTransformer::try_new(config, &mut netcl::rand::rngs::StdRng::seed_from_u64(0))?;
/// let generator = Arc::new(model.generator()?);
/// let threads: Vec<_> = (0..4)
///     .map(|seed| {
///         let generator = Arc::clone(&generator);
///         std::thread::spawn(move || generator.generate(&[1, 2], 20, 0.8, None, seed))
///     })
///     .collect();
/// for (seed, thread) in threads.into_iter().enumerate() {
///     assert_eq!(thread.join().unwrap(), generator.generate(&[1, 2], 20, 0.8, None, seed as u64));
/// }
/// # Ok::<(), netcl::Error>(())
/// ```
pub struct Generator {
    config: CharLmConfig,
    /// `[vocab, d]`.
    tok_emb: Vec<f32>,
    /// `[context, d]`.
    pos_emb: Vec<f32>,
    blocks: Vec<BlockWeights>,
    ln_f_w: Vec<f32>,
    ln_f_b: Vec<f32>,
    /// `[d, vocab]`.
    head_w: Vec<f32>,
    head_b: Vec<f32>,
}

/// The per-call state of a generation: the cached keys and values of
/// each block, `[context, d]` each, and scratch buffers.
struct Cache {
    len: usize,
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    x: Vec<f32>,
    normed: Vec<f32>,
    qkv: Vec<f32>,
    attended: Vec<f32>,
    scores: Vec<f32>,
    hidden: Vec<f32>,
    logits: Vec<f32>,
}

impl Generator {
    /// A generator from the parameters of `model`, a [`CharTransformer`]
    /// of `config`'s sizes or any module with the same parameter names
    /// and shapes (a published [`Version`](crate::nn::Version) of one).
    /// The values are copied: later updates of the model do not show.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] if `config` is invalid,
    /// [`Error::ParameterNames`] if a parameter is missing,
    /// [`Error::ParameterMismatch`] if one has another shape.
    pub fn from_module(model: &dyn Module, config: &CharLmConfig) -> Result<Generator> {
        config.check()?;
        let params: HashMap<String, Tensor> = model.named_parameters().into_iter().collect();
        let (d, v, c, f) = (
            config.d_model,
            config.vocab_size,
            config.context,
            config.d_ff,
        );
        let get = |name: &str, shape: &[usize]| -> Result<Vec<f32>> {
            let t = params.get(name).ok_or_else(|| Error::ParameterNames {
                op: "Generator::from_module",
                missing: vec![name.to_string()],
                unexpected: Vec::new(),
            })?;
            if t.shape() != shape {
                return Err(Error::ParameterMismatch {
                    op: "Generator::from_module",
                    name: name.to_string(),
                    expected: shape.to_vec(),
                    found: t.shape().to_vec(),
                    found_dtype: "F32".to_string(),
                });
            }
            Ok(t.to_vec())
        };
        let blocks = (0..config.num_blocks)
            .map(|i| {
                let p = |n: &str| format!("blocks.{i}.{n}");
                // PyTorch's [3d, d] in-projection, transposed to [d, 3d].
                let in_proj = get(&p("attn.in_proj_weight"), &[3 * d, d])?;
                let mut qkv_w = vec![0.0; 3 * d * d];
                for o in 0..3 * d {
                    for i in 0..d {
                        qkv_w[i * 3 * d + o] = in_proj[o * d + i];
                    }
                }
                Ok(BlockWeights {
                    ln1_w: get(&p("ln1.weight"), &[d])?,
                    ln1_b: get(&p("ln1.bias"), &[d])?,
                    qkv_w,
                    qkv_b: get(&p("attn.in_proj_bias"), &[3 * d])?,
                    out_w: get(&p("attn.out_proj.weight"), &[d, d])?,
                    out_b: get(&p("attn.out_proj.bias"), &[d])?,
                    ln2_w: get(&p("ln2.weight"), &[d])?,
                    ln2_b: get(&p("ln2.bias"), &[d])?,
                    fc1_w: get(&p("mlp.0.weight"), &[d, f])?,
                    fc1_b: get(&p("mlp.0.bias"), &[f])?,
                    fc2_w: get(&p("mlp.2.weight"), &[f, d])?,
                    fc2_b: get(&p("mlp.2.bias"), &[d])?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Generator {
            config: *config,
            tok_emb: get("tok_emb.weight", &[v, d])?,
            pos_emb: get("pos_emb.weight", &[c, d])?,
            blocks,
            ln_f_w: get("ln_f.weight", &[d])?,
            ln_f_b: get("ln_f.bias", &[d])?,
            head_w: get("head.weight", &[d, v])?,
            head_b: get("head.bias", &[v])?,
        })
    }

    /// A generator from `model`, a [`CharTransformer`] of any provenance
    /// (loaded with [`io::load_model`](crate::io::load_model), a published
    /// [`Version`](crate::nn::Version)'s model), its config read from its
    /// architecture ([`CharLmConfig::of_module`]): no need to know the
    /// concrete type. See [`Vocab::of_module`] for an example.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] if `model` is not a `CharTransformer`,
    /// and the errors of [`from_module`](Generator::from_module).
    pub fn of_module(model: &dyn Module) -> Result<Generator> {
        Generator::from_module(model, &CharLmConfig::of_module(model)?)
    }

    /// The sizes of the model.
    pub fn config(&self) -> &CharLmConfig {
        &self.config
    }

    /// `max_tokens` character ids sampled after `prompt`.
    ///
    /// # Panics
    ///
    /// As [`try_generate`](Generator::try_generate).
    #[track_caller]
    pub fn generate(
        &self,
        prompt: &[usize],
        max_tokens: usize,
        temperature: f32,
        top_k: Option<usize>,
        seed: u64,
    ) -> Vec<usize> {
        or_panic(self.try_generate(prompt, max_tokens, temperature, top_k, seed))
    }

    /// `max_tokens` character ids sampled one at a time after `prompt`:
    /// each from the softmax of the next-character logits divided by
    /// `temperature`, restricted to the `top_k` most likely characters if
    /// given (ties at the `k`-th logit are kept), with a generator seeded
    /// by `seed`. A `temperature` of 0 takes the most likely character
    /// (the first one on ties) and draws nothing.
    ///
    /// Deterministic: one prompt, sampling parameters and seed give the
    /// same ids every time, on any thread.
    ///
    /// To receive each id as it is drawn, or to stop early, use
    /// [`try_generate_with`](Generator::try_generate_with).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] if `prompt` is empty or has an id not
    /// below `vocab_size`, `temperature` is negative or not finite, or
    /// `top_k` is `Some(0)`.
    pub fn try_generate(
        &self,
        prompt: &[usize],
        max_tokens: usize,
        temperature: f32,
        top_k: Option<usize>,
        seed: u64,
    ) -> Result<Vec<usize>> {
        let mut out = Vec::with_capacity(max_tokens);
        self.try_generate_with(prompt, max_tokens, temperature, top_k, seed, |next| {
            out.push(next);
            ControlFlow::Continue(())
        })?;
        Ok(out)
    }

    /// As [`generate`](Generator::generate), handing each id to `on_token`
    /// as soon as it is drawn instead of collecting them; returns how many
    /// were drawn.
    ///
    /// # Panics
    ///
    /// As [`try_generate_with`](Generator::try_generate_with).
    #[track_caller]
    pub fn generate_with(
        &self,
        prompt: &[usize],
        max_tokens: usize,
        temperature: f32,
        top_k: Option<usize>,
        seed: u64,
        on_token: impl FnMut(usize) -> ControlFlow<()>,
    ) -> usize {
        or_panic(self.try_generate_with(prompt, max_tokens, temperature, top_k, seed, on_token))
    }

    /// As [`try_generate`](Generator::try_generate), handing each id to
    /// `on_token` as soon as it is drawn (before the model runs on it to
    /// draw the next one), and stopping as soon as `on_token` returns
    /// [`ControlFlow::Break`]: the ids handed over are the first ones
    /// `try_generate` returns for the same arguments, bit for bit, and no
    /// model step runs after a `Break`. Returns how many ids were handed
    /// over: `max_tokens`, or fewer if `on_token` stopped it.
    ///
    /// This is the form for streaming (send each character as it comes)
    /// and for cancelling (a client gone, a deadline passed): the check in
    /// `on_token` runs once per character, so a generation stops within
    /// one character of being told to.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::ops::ControlFlow;
    ///
    /// use netcl::models::{CharLmConfig, CharTransformer};
    /// use netcl::rand::SeedableRng;
    ///
    /// let config = CharLmConfig::new(10).with_width(16).with_blocks(1).with_context(8);
    /// let model = CharTransformer::try_new(config, &mut netcl::rand::rngs::StdRng::seed_from_u64(0))?;
    /// let generator = model.generator()?;
    /// // Stop at the first id 3 (or after 50 ids).
    /// let mut received = Vec::new();
    /// let drawn = generator.try_generate_with(&[1, 2], 50, 1.0, None, 7, |id| {
    ///     received.push(id);
    ///     if id == 3 { ControlFlow::Break(()) } else { ControlFlow::Continue(()) }
    /// })?;
    /// assert_eq!(drawn, received.len());
    /// // The same ids as the collecting form, up to where it stopped.
    /// let all = generator.try_generate(&[1, 2], 50, 1.0, None, 7)?;
    /// assert_eq!(received, all[..drawn]);
    /// # Ok::<(), netcl::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// As [`try_generate`](Generator::try_generate), before any id is
    /// drawn.
    pub fn try_generate_with(
        &self,
        prompt: &[usize],
        max_tokens: usize,
        temperature: f32,
        top_k: Option<usize>,
        seed: u64,
        mut on_token: impl FnMut(usize) -> ControlFlow<()>,
    ) -> Result<usize> {
        if !(temperature >= 0.0 && temperature.is_finite()) || top_k == Some(0) {
            return Err(Error::InvalidArgument {
                op: "Generator::generate",
                message: format!(
                    "temperature must be finite and at least 0 and top_k at least 1, got temperature {temperature} and top_k {top_k:?}"
                ),
            });
        }
        let mut rng = StdRng::seed_from_u64(seed);
        self.decode(prompt, max_tokens, |_, logits| {
            let next = sample(logits, temperature, top_k, &mut rng);
            (next, on_token(next))
        })
    }

    /// Decodes up to `max_tokens` tokens after `prompt`: `choose` receives
    /// the window of tokens the logits are for and the logits, and returns
    /// the next token and whether to go on. Returns the number of tokens
    /// chosen; no model step runs after a `Break`.
    fn decode(
        &self,
        prompt: &[usize],
        max_tokens: usize,
        mut choose: impl FnMut(&[usize], &[f32]) -> (usize, ControlFlow<()>),
    ) -> Result<usize> {
        let context = self.config.context;
        check_sampling_ids(prompt, self.config.vocab_size)?;
        if max_tokens == 0 {
            return Ok(0);
        }
        let mut tokens: Vec<usize> = prompt.to_vec();
        let mut cache = self.cache();
        let mut start = tokens.len().saturating_sub(context);
        self.run(&mut cache, &tokens[start..]);
        for i in 0..max_tokens {
            let (next, flow) = choose(&tokens[start..], &cache.logits);
            tokens.push(next);
            if i + 1 == max_tokens || flow.is_break() {
                return Ok(i + 1);
            }
            if cache.len == context {
                // The window is full: restart it from its last half, whose
                // keys and values are recomputed in one pass.
                start = tokens.len() - (context / 2).max(1);
                cache.len = 0;
                self.run(&mut cache, &tokens[start..]);
            } else {
                self.run(&mut cache, &[next]);
            }
        }
        Ok(max_tokens)
    }

    fn cache(&self) -> Cache {
        let CharLmConfig {
            d_model: d,
            context,
            d_ff,
            vocab_size,
            num_blocks,
            ..
        } = self.config;
        Cache {
            len: 0,
            keys: vec![vec![0.0; context * d]; num_blocks],
            values: vec![vec![0.0; context * d]; num_blocks],
            x: vec![0.0; context * d],
            normed: vec![0.0; context * d],
            qkv: vec![0.0; context * 3 * d],
            attended: vec![0.0; context * d],
            scores: vec![0.0; context],
            hidden: vec![0.0; context * d_ff],
            logits: vec![0.0; vocab_size],
        }
    }

    /// Runs the model on `tokens` at positions `cache.len..`, appending
    /// their keys and values to the cache; leaves the logits of the token
    /// after the last one in `cache.logits`. Several tokens (a prompt, a
    /// restarted window) go through each weight matrix together, so the
    /// weights are read once for all of them.
    fn run(&self, cache: &mut Cache, tokens: &[usize]) {
        let d = self.config.d_model;
        let f = self.config.d_ff;
        let (h, dh) = (self.config.num_heads, d / self.config.num_heads);
        let (first, rows) = (cache.len, tokens.len());
        let scale = 1.0 / (dh as f32).sqrt();
        let Cache {
            keys,
            values,
            x,
            normed,
            qkv,
            attended,
            scores,
            hidden,
            logits,
            ..
        } = cache;
        let (x, normed) = (&mut x[..rows * d], &mut normed[..rows * d]);
        let (qkv, attended) = (&mut qkv[..rows * 3 * d], &mut attended[..rows * d]);
        let hidden = &mut hidden[..rows * f];
        for (r, &token) in tokens.iter().enumerate() {
            let pos = first + r;
            for ((xi, t), p) in x[r * d..(r + 1) * d]
                .iter_mut()
                .zip(&self.tok_emb[token * d..(token + 1) * d])
                .zip(&self.pos_emb[pos * d..(pos + 1) * d])
            {
                *xi = t + p;
            }
        }
        for (b, w) in self.blocks.iter().enumerate() {
            layer_norm_rows(x, &w.ln1_w, &w.ln1_b, normed);
            affine(normed, &w.qkv_w, &w.qkv_b, qkv);
            for r in 0..rows {
                let pos = first + r;
                let row = &qkv[r * 3 * d..(r + 1) * 3 * d];
                keys[b][pos * d..(pos + 1) * d].copy_from_slice(&row[d..2 * d]);
                values[b][pos * d..(pos + 1) * d].copy_from_slice(&row[2 * d..]);
            }
            for r in 0..rows {
                let pos = first + r;
                let (k, v) = (&keys[b][..(pos + 1) * d], &values[b][..(pos + 1) * d]);
                for head in 0..h {
                    let q = &qkv[r * 3 * d + head * dh..r * 3 * d + (head + 1) * dh];
                    let scores = &mut scores[..=pos];
                    for (j, s) in scores.iter_mut().enumerate() {
                        let key = &k[j * d + head * dh..j * d + (head + 1) * dh];
                        *s = lane_dot(q, Some(key)) * scale;
                    }
                    softmax_row(scores);
                    let out = &mut attended[r * d + head * dh..r * d + (head + 1) * dh];
                    out.fill(0.0);
                    for (j, &p) in scores.iter().enumerate() {
                        let value = &v[j * d + head * dh..j * d + (head + 1) * dh];
                        for (o, vv) in out.iter_mut().zip(value) {
                            *o += p * vv;
                        }
                    }
                }
            }
            affine_add(attended, &w.out_w, &w.out_b, x);
            layer_norm_rows(x, &w.ln2_w, &w.ln2_b, normed);
            affine(normed, &w.fc1_w, &w.fc1_b, hidden);
            // The kernel of `Tensor::gelu`, so cached generation computes
            // what the model's forward does.
            // (A closure, not the fn item: the fn item's `Fn` shim is not
            // `inline(always)`, and a call per element keeps the loop scalar.)
            crate::ops::vectorized::map_in_place(
                hidden,
                #[allow(clippy::redundant_closure)]
                #[inline(always)]
                |v| gelu32(v),
            );
            affine_add(hidden, &w.fc2_w, &w.fc2_b, x);
        }
        let last = &x[(rows - 1) * d..];
        layer_norm(last, &self.ln_f_w, &self.ln_f_b, &mut normed[..d]);
        affine(&normed[..d], &self.head_w, &self.head_b, logits);
        cache.len += rows;
    }
}

impl fmt::Debug for Generator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Generator")
            .field("config", &self.config)
            .finish()
    }
}

fn check_sampling_ids(prompt: &[usize], vocab_size: usize) -> Result<()> {
    if prompt.is_empty() {
        return Err(Error::InvalidArgument {
            op: "Generator::generate",
            message: "the prompt is empty; give at least one character".to_string(),
        });
    }
    if let Some((i, id)) = prompt.iter().enumerate().find(|(_, id)| **id >= vocab_size) {
        return Err(Error::InvalidArgument {
            op: "Generator::generate",
            message: format!(
                "prompt id {id} at position {i} is not below the vocabulary size {vocab_size}"
            ),
        });
    }
    Ok(())
}

/// The next token drawn from `logits`.
fn sample(logits: &[f32], temperature: f32, top_k: Option<usize>, rng: &mut StdRng) -> usize {
    let argmax = || {
        let mut best = 0;
        for (i, &l) in logits.iter().enumerate() {
            if l > logits[best] {
                best = i;
            }
        }
        best
    };
    if temperature == 0.0 {
        return argmax();
    }
    let threshold = match top_k {
        Some(k) if k < logits.len() => {
            let mut sorted = logits.to_vec();
            sorted.sort_unstable_by(|a, b| b.total_cmp(a));
            sorted[k - 1]
        }
        _ => f32::NEG_INFINITY,
    };
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let weights: Vec<f64> = logits
        .iter()
        .map(|&l| {
            if l >= threshold {
                (((l - max) / temperature) as f64).exp()
            } else {
                0.0
            }
        })
        .collect();
    let total: f64 = weights.iter().sum();
    if !(total > 0.0 && total.is_finite()) {
        // NaN logits: nothing to sample from.
        return argmax();
    }
    let mut u = rng.random::<f64>() * total;
    for (i, w) in weights.iter().enumerate() {
        if u < *w {
            return i;
        }
        u -= w;
    }
    // Rounding left u at the top: the last character with a weight.
    weights.iter().rposition(|w| *w > 0.0).unwrap_or(0)
}

/// `y = x · W + b` for the rows of `x`, `[rows, in]`, with `W` `[in,
/// out]` and `y` `[rows, out]` (`rows` from the lengths of `b` and `y`).
fn affine(x: &[f32], w: &[f32], b: &[f32], y: &mut [f32]) {
    for row in y.chunks_exact_mut(b.len()) {
        row.copy_from_slice(b);
    }
    accumulate(x, w, y, b.len());
}

/// `y += x · W + b`, row by row as [`affine`].
fn affine_add(x: &[f32], w: &[f32], b: &[f32], y: &mut [f32]) {
    for row in y.chunks_exact_mut(b.len()) {
        for (yi, bi) in row.iter_mut().zip(b) {
            *yi += bi;
        }
    }
    accumulate(x, w, y, b.len());
}

/// `y += x · W`, `x` `[rows, in]`, `W` `[in, out]`, `y` `[rows, out]`,
/// by the matrix kernel every matmul uses (vectorised for the CPU it runs
/// on).
fn accumulate(x: &[f32], w: &[f32], y: &mut [f32], out: usize) {
    let rows = y.len() / out;
    let inputs = x.len() / rows;
    let x = ndarray::ArrayView2::from_shape((rows, inputs), x).expect("x is [rows, in]");
    let w = ndarray::ArrayView2::from_shape((inputs, out), w).expect("W is [in, out]");
    let y = ndarray::ArrayViewMut2::from_shape((rows, out), y).expect("y is [rows, out]");
    crate::ops::gemm::gemm_acc_into(x, w, y);
}

/// [`layer_norm`] of each row of `x`, `[rows, w.len()]`.
fn layer_norm_rows(x: &[f32], w: &[f32], b: &[f32], y: &mut [f32]) {
    let n = w.len();
    for (xr, yr) in x.chunks_exact(n).zip(y.chunks_exact_mut(n)) {
        layer_norm(xr, w, b, yr);
    }
}

/// Layer normalisation of `x` (eps 1e-5, as [`LayerNorm`]) into `y`.
fn layer_norm(x: &[f32], w: &[f32], b: &[f32], y: &mut [f32]) {
    let n = x.len() as f32;
    let mean = x.iter().sum::<f32>() / n;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    let inv = 1.0 / (var + 1e-5).sqrt();
    for (((yi, xi), wi), bi) in y.iter_mut().zip(x).zip(w).zip(b) {
        *yi = (xi - mean) * inv * wi + bi;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autograd::no_grad;
    use rand::SeedableRng;

    fn small(context: usize) -> CharTransformer {
        let config = CharLmConfig::new(11)
            .with_width(16)
            .with_heads(2)
            .with_blocks(2)
            .with_context(context);
        let model = CharTransformer::new(config, &mut StdRng::seed_from_u64(3));
        // Non-trivial norms and biases, so that every weight matters.
        let mut rng = StdRng::seed_from_u64(4);
        for (name, p) in model.named_parameters() {
            if name.contains("bias") || name.contains("ln") {
                let noise = Tensor::randn(p.shape(), &mut rng);
                p.with_data_mut(|mut v| v += &(noise.to_array() * 0.3));
            }
        }
        model
    }

    #[test]
    fn cached_logits_equal_a_full_forward_of_the_window() {
        let model = small(8);
        let generator = model.generator().unwrap();
        let _no_grad = no_grad();
        let mut rng = StdRng::seed_from_u64(9);
        let mut steps = 0;
        let mut restarts = 0;
        let mut last_len = 0;
        // 30 tokens with a context of 8: the window restarts several times.
        generator
            .decode(&[1, 2, 3], 30, |window, logits| {
                if window.len() < last_len {
                    restarts += 1;
                }
                last_len = window.len();
                let ids: Vec<f32> = window.iter().map(|&i| i as f32).collect();
                let full = model
                    .logits(&Tensor::from_vec(ids, &[1, window.len()]).unwrap())
                    .unwrap()
                    .to_vec();
                let expected = &full[(window.len() - 1) * 11..];
                let scale = expected.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                for (a, b) in logits.iter().zip(expected) {
                    assert!((a - b).abs() <= 1e-5 * scale.max(1.0), "{a} vs {b}");
                }
                steps += 1;
                (
                    sample(logits, 1.0, None, &mut rng),
                    ControlFlow::Continue(()),
                )
            })
            .unwrap();
        assert_eq!(steps, 30);
        assert!(restarts >= 3, "{restarts} restarts");
    }

    #[test]
    fn generation_is_deterministic_per_seed() {
        let model = small(8);
        let a = model.generate(&[0, 4], 40, 1.0, Some(5), 1);
        assert_eq!(a.len(), 40);
        assert!(a.iter().all(|&i| i < 11));
        assert_eq!(a, model.generate(&[0, 4], 40, 1.0, Some(5), 1));
        let others: Vec<Vec<usize>> = (2..6)
            .map(|seed| model.generate(&[0, 4], 40, 1.0, Some(5), seed))
            .collect();
        assert!(others.iter().any(|o| *o != a), "seeds change the text");
        // Greedy decoding follows the argmax of a full forward.
        let greedy = model.generate(&[0, 4], 5, 0.0, None, 1);
        let mut tokens = vec![0usize, 4];
        for &next in &greedy {
            let ids: Vec<f32> = tokens.iter().map(|&i| i as f32).collect();
            let logits = model
                .logits(&Tensor::from_vec(ids, &[1, tokens.len()]).unwrap())
                .unwrap()
                .to_vec();
            let last = &logits[(tokens.len() - 1) * 11..];
            let best = (0..11).fold(0, |b, i| if last[i] > last[b] { i } else { b });
            assert_eq!(next, best);
            tokens.push(next);
        }
    }

    #[test]
    fn top_k_one_is_greedy_and_top_k_limits_the_choices() {
        let logits = [0.5, 3.0, 2.0, -1.0];
        let mut rng = StdRng::seed_from_u64(0);
        for _ in 0..50 {
            assert_eq!(sample(&logits, 1.0, Some(1), &mut rng), 1);
            assert!([1, 2].contains(&sample(&logits, 5.0, Some(2), &mut rng)));
        }
        assert_eq!(sample(&logits, 0.0, None, &mut rng), 1);
    }

    #[test]
    fn generate_with_hands_over_the_ids_of_generate_and_stops_on_break() {
        let model = small(8);
        let generator = model.generator().unwrap();
        // Context 8 and 30 tokens: the window restarts on the way.
        for (prompt, temperature, top_k, seed) in [
            (&[1, 2, 3][..], 1.0, None, 0),
            (&[4][..], 0.7, Some(3), 5),
            (&[0, 9, 9, 9, 9, 9, 9, 9, 9, 9][..], 0.0, None, 2),
        ] {
            let all = generator.generate(prompt, 30, temperature, top_k, seed);
            let mut streamed = Vec::new();
            let n = generator.generate_with(prompt, 30, temperature, top_k, seed, |id| {
                streamed.push(id);
                ControlFlow::Continue(())
            });
            assert_eq!((n, &streamed), (30, &all));
            // Stopping after k ids: exactly the first k, no call after.
            for k in [1, 2, 7, 8, 29] {
                let mut prefix = Vec::new();
                let n = generator
                    .try_generate_with(prompt, 30, temperature, top_k, seed, |id| {
                        prefix.push(id);
                        if prefix.len() == k {
                            ControlFlow::Break(())
                        } else {
                            ControlFlow::Continue(())
                        }
                    })
                    .unwrap();
                assert_eq!((n, &prefix[..]), (k, &all[..k]), "stopped after {k}");
            }
        }
        // Errors come before any id; zero tokens call nothing.
        let mut calls = 0;
        let mut count = |_| {
            calls += 1;
            ControlFlow::Continue(())
        };
        assert!(
            generator
                .try_generate_with(&[], 3, 1.0, None, 0, &mut count)
                .is_err()
        );
        assert!(
            generator
                .try_generate_with(&[11], 3, 1.0, None, 0, &mut count)
                .is_err()
        );
        assert!(
            generator
                .try_generate_with(&[1], 3, -1.0, None, 0, &mut count)
                .is_err()
        );
        assert_eq!(
            generator
                .try_generate_with(&[1], 0, 1.0, None, 0, &mut count)
                .unwrap(),
            0
        );
        assert_eq!(calls, 0);
    }

    #[test]
    fn bad_requests_are_errors() {
        let model = small(8);
        assert!(model.try_generate(&[], 3, 1.0, None, 0).is_err());
        assert!(model.try_generate(&[11], 3, 1.0, None, 0).is_err());
        assert!(model.try_generate(&[1], 3, -1.0, None, 0).is_err());
        assert!(model.try_generate(&[1], 3, f32::NAN, None, 0).is_err());
        assert!(model.try_generate(&[1], 3, 1.0, Some(0), 0).is_err());
        assert!(
            model
                .try_generate(&[1], 0, 1.0, None, 0)
                .unwrap()
                .is_empty()
        );
        let long = Tensor::zeros(&[1, 9]);
        assert!(model.logits(&long).is_err());
        assert!(model.logits(&Tensor::zeros(&[9])).is_err());
        assert!(model.logits(&Tensor::full(&[1, 2], 11.0)).is_err());
    }

    #[test]
    fn erf_matches_known_values() {
        use crate::ops::activation::erf32 as erf;
        for (x, e) in [
            (0.0f32, 0.0f32),
            (0.5, 0.520_499_9),
            (1.0, 0.842_700_8),
            (-2.0, -0.995_322_3),
        ] {
            assert!((erf(x) - e).abs() < 5e-7, "erf({x}) = {}", erf(x));
        }
        assert!(erf(f32::NAN).is_nan());
    }

    #[test]
    fn a_checkpoint_keeps_the_config_and_the_vocabulary() {
        let model = small(8);
        let vocab = Vocab::from_text("abcdefghijk");
        let path =
            std::env::temp_dir().join(format!("netcl-charlm-{}.safetensors", std::process::id()));
        model.save(&vocab, &path).unwrap();
        let (loaded, loaded_vocab) = CharTransformer::load(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(loaded_vocab, vocab);
        assert_eq!(loaded.config(), model.config());
        let ids = Tensor::from_vec(vec![1.0, 2.0, 3.0], &[1, 3]).unwrap();
        assert_eq!(
            loaded.logits(&ids).unwrap().to_vec(),
            model.logits(&ids).unwrap().to_vec()
        );
        assert!(model.save(&Vocab::from_text("ab"), &path).is_err());
    }

    #[test]
    fn parameter_names_are_pytorchs() {
        let model = small(8);
        let names: Vec<String> = model
            .named_parameters()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(names[0], "tok_emb.weight");
        assert_eq!(names[1], "pos_emb.weight");
        assert!(names.contains(&"blocks.1.attn.in_proj_weight".to_string()));
        assert!(names.contains(&"blocks.0.mlp.2.bias".to_string()));
        assert_eq!(names[names.len() - 2..], ["head.weight", "head.bias"]);
        let bytes = crate::io::to_torch_bytes(&model).unwrap();
        let fresh = CharTransformer::zeros(*model.config()).unwrap();
        crate::io::load_torch_bytes(&fresh, &bytes).unwrap();
        let ids = Tensor::from_vec(vec![4.0, 2.0], &[1, 2]).unwrap();
        assert_eq!(
            fresh.logits(&ids).unwrap().to_vec(),
            model.logits(&ids).unwrap().to_vec()
        );
    }
}
