//! Multi-head attention and a pre-norm transformer block.

use std::fmt;

use rand::Rng;

use crate::error::{Error, Result, or_panic};
use crate::functional::{AttnMask, try_scaled_dot_product_attention};
use crate::nn::{
    Gelu, LayerNorm, Linear, Module, Sequential, TorchLayout, TrainingFlag, fork_scope, prefixed,
};
use crate::tensor::Tensor;

/// The masks of an attention forward
/// ([`MultiheadAttention::attend`], [`TransformerBlock::forward_masked`]).
///
/// # Examples
///
/// ```
/// use netcl::Tensor;
/// use netcl::nn::AttentionMasks;
///
/// let none = AttentionMasks::default();
/// assert!(!none.causal && none.key_padding_mask.is_none());
/// // Causal, and the last of 3 keys of the one sequence is padding.
/// let masks = AttentionMasks::causal()
///     .with_key_padding_mask(Tensor::from_vec(vec![0.0, 0.0, 1.0], &[1, 3])?);
/// assert!(masks.causal);
/// # Ok::<(), netcl::Error>(())
/// ```
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct AttentionMasks {
    /// Whether query `i` attends only to keys `j ≤ i` (PyTorch's
    /// `is_causal`, a top-left aligned lower triangle).
    pub causal: bool,
    /// `[N, S]`, 1 where a key is padding and is ignored, 0 where it is
    /// attended to: PyTorch's boolean `key_padding_mask` (`True` ignores),
    /// as netcl's 0/1 masks.
    pub key_padding_mask: Option<Tensor>,
}

impl AttentionMasks {
    /// A causal mask, no padding.
    pub fn causal() -> AttentionMasks {
        AttentionMasks {
            causal: true,
            key_padding_mask: None,
        }
    }

    /// These masks with the key padding mask `mask`, `[N, S]`.
    pub fn with_key_padding_mask(mut self, mask: Tensor) -> AttentionMasks {
        self.key_padding_mask = Some(mask);
        self
    }
}

/// Multi-head attention, batch-first, as PyTorch's
/// `nn.MultiheadAttention(embed_dim, num_heads, batch_first=True)`:
/// inputs and output `[N, L, embed_dim]`.
///
/// Parameters, with PyTorch's names and layouts:
///
/// | name | shape | |
/// |---|---|---|
/// | `in_proj_weight` | `[3·d, d]` | the query, key and value projections stacked, PyTorch's layout |
/// | `in_proj_bias` | `[3·d]` | |
/// | `out_proj.weight` | `[d, d]` | a [`Linear`]: netcl's `[in, out]`, transposed by [`io::load_torch`](crate::io::load_torch) ([`Module::torch_layouts`]) |
/// | `out_proj.bias` | `[d]` | |
///
/// Initialised as PyTorch: `in_proj_weight` Xavier-uniform, the biases
/// zero, `out_proj.weight` as a [`Linear`]'s.
///
/// [`Module::forward`] is self-attention without masks;
/// [`forward_masked`](MultiheadAttention::forward_masked) adds masks and
/// [`attend`](MultiheadAttention::attend) takes a separate key and value.
///
/// # Examples
///
/// ```
/// use netcl::Tensor;
/// use netcl::nn::{AttentionMasks, Module, MultiheadAttention};
/// use netcl::rand::SeedableRng;
///
/// let attn = MultiheadAttention::new(8, 2, &mut netcl::rand::rngs::StdRng::seed_from_u64(0));
/// let x = Tensor::ones(&[3, 5, 8]);
/// assert_eq!(attn.forward(&x)?.shape(), &[3, 5, 8]);
/// assert_eq!(attn.forward_masked(&x, &AttentionMasks::causal())?.shape(), &[3, 5, 8]);
/// let names: Vec<String> = attn.named_parameters().into_iter().map(|(n, _)| n).collect();
/// assert_eq!(names, ["in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"]);
/// # Ok::<(), netcl::Error>(())
/// ```
pub struct MultiheadAttention {
    in_proj_weight: Tensor,
    in_proj_bias: Tensor,
    out_proj: Linear,
    num_heads: usize,
    training: TrainingFlag,
}

impl MultiheadAttention {
    /// Attention over `embed_dim` features in `num_heads` heads,
    /// initialised from `rng`.
    ///
    /// # Panics
    ///
    /// As [`try_new`](MultiheadAttention::try_new): if a size is zero or
    /// `num_heads` does not divide `embed_dim`.
    #[track_caller]
    pub fn new<R: Rng + ?Sized>(
        embed_dim: usize,
        num_heads: usize,
        rng: &mut R,
    ) -> MultiheadAttention {
        or_panic(MultiheadAttention::try_new(embed_dim, num_heads, rng))
    }

    /// Attention over `embed_dim` features in `num_heads` heads,
    /// initialised from `rng`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] if a size is zero or `num_heads` does
    /// not divide `embed_dim`, [`Error::ShapeTooLarge`] if the
    /// projections would hold more than [`Tensor::MAX_ELEMENTS`] values.
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::nn::MultiheadAttention;
    /// use netcl::rand::SeedableRng;
    ///
    /// let mut rng = netcl::rand::rngs::StdRng::seed_from_u64(0);
    /// let err = MultiheadAttention::try_new(10, 4, &mut rng).unwrap_err();
    /// assert_eq!(
    ///     err.to_string(),
    ///     "MultiheadAttention: num_heads (4) must be positive and divide embed_dim (10)"
    /// );
    /// ```
    pub fn try_new<R: Rng + ?Sized>(
        embed_dim: usize,
        num_heads: usize,
        rng: &mut R,
    ) -> Result<MultiheadAttention> {
        check_heads(embed_dim, num_heads)?;
        // xavier_uniform_ over [3d, d]: bound √(6 / (d + 3d)).
        let bound = (6.0 / (4 * embed_dim) as f32).sqrt();
        let in_proj_weight = Tensor::uniform(&[3 * embed_dim, embed_dim], -bound, bound, rng);
        let out_proj = Linear::try_new(embed_dim, embed_dim, rng)?;
        if let Some(b) = out_proj.bias() {
            b.with_data_mut(|mut d| d.fill(0.0));
        }
        MultiheadAttention::from_parts(
            in_proj_weight,
            Tensor::zeros(&[3 * embed_dim]),
            out_proj,
            num_heads,
        )
    }

    /// Attention with every parameter zero: the shell to load a
    /// checkpoint into.
    ///
    /// # Errors
    ///
    /// As [`try_new`](MultiheadAttention::try_new).
    pub fn zeros(embed_dim: usize, num_heads: usize) -> Result<MultiheadAttention> {
        check_heads(embed_dim, num_heads)?;
        MultiheadAttention::from_parts(
            Tensor::zeros(&[3 * embed_dim, embed_dim]),
            Tensor::zeros(&[3 * embed_dim]),
            Linear::zeros(embed_dim, embed_dim)?,
            num_heads,
        )
    }

    fn from_parts(
        in_proj_weight: Tensor,
        in_proj_bias: Tensor,
        out_proj: Linear,
        num_heads: usize,
    ) -> Result<MultiheadAttention> {
        Ok(MultiheadAttention {
            in_proj_weight: in_proj_weight.try_requires_grad_(true)?,
            in_proj_bias: in_proj_bias.try_requires_grad_(true)?,
            out_proj,
            num_heads,
            training: TrainingFlag::new(),
        })
    }

    /// `d`, the size of each position's features.
    pub fn embed_dim(&self) -> usize {
        self.in_proj_weight.shape()[1]
    }

    /// The number of heads.
    pub fn num_heads(&self) -> usize {
        self.num_heads
    }

    /// The stacked query, key and value projections, `[3·d, d]`.
    pub fn in_proj_weight(&self) -> &Tensor {
        &self.in_proj_weight
    }

    /// Their biases, `[3·d]`.
    pub fn in_proj_bias(&self) -> &Tensor {
        &self.in_proj_bias
    }

    /// The output projection.
    pub fn out_proj(&self) -> &Linear {
        &self.out_proj
    }

    /// Self-attention of `x`, `[N, L, d]`, with `masks`.
    ///
    /// # Errors
    ///
    /// As [`attend`](MultiheadAttention::attend).
    pub fn forward_masked(&self, x: &Tensor, masks: &AttentionMasks) -> Result<Tensor> {
        self.attend(x, x, x, masks)
    }

    /// Attention of `query`, `[N, L, d]`, to `key` and `value`, `[N, S,
    /// d]`, with `masks`: the output is `[N, L, d]`. A query whose keys
    /// are all masked gets NaN, as in PyTorch.
    ///
    /// # Errors
    ///
    /// [`Error::Rank`] if an input is not 3-D, [`Error::InvalidArgument`]
    /// if the shapes do not agree or the key padding mask is not `[N, S]`
    /// of 0s and 1s, and the errors of the ops it is made of.
    pub fn attend(
        &self,
        query: &Tensor,
        key: &Tensor,
        value: &Tensor,
        masks: &AttentionMasks,
    ) -> Result<Tensor> {
        const OP: &str = "MultiheadAttention";
        let d = self.embed_dim();
        for t in [query, key, value] {
            if t.ndim() != 3 {
                return Err(Error::Rank {
                    op: OP,
                    expected: "a batch-first input [N, L, embed_dim]",
                    shape: t.shape().to_vec(),
                });
            }
        }
        let (n, l) = (query.shape()[0], query.shape()[1]);
        let s = key.shape()[1];
        if key.shape()[0] != n || value.shape()[..2] != [n, s] {
            return Err(Error::InvalidArgument {
                op: OP,
                message: format!(
                    "query {:?}, key {:?} and value {:?} must be [N, L, d], [N, S, d], [N, S, d]",
                    query.shape(),
                    key.shape(),
                    value.shape()
                ),
            });
        }
        let (h, dh) = (self.num_heads, d / self.num_heads);
        let weights = self.in_proj_weight.try_split(d, 0)?;
        let biases = self.in_proj_bias.try_split(d, 0)?;
        let project = |x: &Tensor, i: usize, len: usize| -> Result<Tensor> {
            x.try_linear(&weights[i].try_t()?, Some(&biases[i]))?
                .try_reshape(&[n, len, h, dh])?
                .try_permute(&[0, 2, 1, 3])
        };
        let (q, k, v) = (
            project(query, 0, l)?,
            project(key, 1, s)?,
            project(value, 2, s)?,
        );
        let mask = match &masks.key_padding_mask {
            None => None,
            Some(padding) => {
                if padding.shape() != [n, s] {
                    return Err(Error::InvalidArgument {
                        op: OP,
                        message: format!(
                            "key_padding_mask must be [N, S] = {:?}, got {:?}",
                            [n, s],
                            padding.shape()
                        ),
                    });
                }
                // 1 where attended: [N, 1, 1, S], times the causal triangle.
                let keep = (padding.detach() * -1.0 + 1.0).try_reshape(&[n, 1, 1, s])?;
                Some(if masks.causal {
                    keep.try_mul(&causal_mask(l, s)?)?
                } else {
                    keep
                })
            }
        };
        let causal = masks.causal && mask.is_none();
        let out = try_scaled_dot_product_attention(
            &q,
            &k,
            &v,
            mask.as_ref().map(AttnMask::Bool),
            causal,
            None,
        )?;
        let out = out.try_permute(&[0, 2, 1, 3])?.try_reshape(&[n, l, d])?;
        self.out_proj.forward(&out)
    }
}

/// `[L, S]`, 1 where `j ≤ i`.
fn causal_mask(l: usize, s: usize) -> Result<Tensor> {
    let values = (0..l)
        .flat_map(|i| (0..s).map(move |j| if j <= i { 1.0 } else { 0.0 }))
        .collect();
    Tensor::from_vec(values, &[l, s])
}

fn check_heads(embed_dim: usize, num_heads: usize) -> Result<()> {
    if embed_dim == 0 || num_heads == 0 || !embed_dim.is_multiple_of(num_heads) {
        return Err(Error::InvalidArgument {
            op: "MultiheadAttention",
            message: format!(
                "num_heads ({num_heads}) must be positive and divide embed_dim ({embed_dim})"
            ),
        });
    }
    // `in_proj_weight` is [3·d, d]; a size whose product overflows is an
    // error here, not a panic in the allocation.
    let rows = embed_dim.saturating_mul(3);
    crate::array::checked_numel("MultiheadAttention", &[rows, embed_dim])?;
    Ok(())
}

impl Clone for MultiheadAttention {
    /// A fork (see [`Module::try_fork`]).
    fn clone(&self) -> MultiheadAttention {
        MultiheadAttention {
            in_proj_weight: self.in_proj_weight.fork(),
            in_proj_bias: self.in_proj_bias.fork(),
            out_proj: self.out_proj.clone(),
            num_heads: self.num_heads,
            training: self.training.clone(),
        }
    }
}

impl Module for MultiheadAttention {
    /// Self-attention of `input`, `[N, L, d]`, without masks.
    ///
    /// # Errors
    ///
    /// As [`attend`](MultiheadAttention::attend).
    fn forward(&self, input: &Tensor) -> Result<Tensor> {
        self.forward_masked(input, &AttentionMasks::default())
    }

    fn named_parameters(&self) -> Vec<(String, Tensor)> {
        let mut params = vec![
            ("in_proj_weight".to_string(), self.in_proj_weight.clone()),
            ("in_proj_bias".to_string(), self.in_proj_bias.clone()),
        ];
        params.extend(prefixed("out_proj", self.out_proj.named_parameters()));
        params
    }

    fn torch_layouts(&self) -> Vec<(String, TorchLayout)> {
        vec![("out_proj.weight".to_string(), TorchLayout::Transposed)]
    }

    fn set_training(&self, training: bool) {
        self.training.set(training);
        self.out_proj.set_training(training);
    }

    fn training_flag(&self) -> Option<&TrainingFlag> {
        Some(&self.training)
    }

    fn architecture(&self) -> Option<crate::nn::Architecture> {
        self.describe()
    }

    fn try_fork(&self) -> Result<Box<dyn Module>> {
        Ok(Box::new(self.clone()))
    }
}

impl fmt::Debug for MultiheadAttention {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MultiheadAttention")
            .field("embed_dim", &self.embed_dim())
            .field("num_heads", &self.num_heads)
            .finish()
    }
}

/// A pre-norm transformer block: `h = x + attn(ln1(x))`, then `h +
/// mlp(ln2(h))`, with a GELU MLP.
///
/// Submodules, named as in a typical PyTorch block (so its `state_dict`
/// loads with [`io::load_torch`](crate::io::load_torch)):
///
/// | name | module |
/// |---|---|
/// | `ln1` | [`LayerNorm`] over `d_model` |
/// | `attn` | [`MultiheadAttention`] (`attn.in_proj_weight`, `attn.out_proj.weight`, ...) |
/// | `ln2` | [`LayerNorm`] over `d_model` |
/// | `mlp` | [`Sequential`]: `mlp.0` [`Linear`] `d_model → d_ff`, `mlp.1` [`Gelu`], `mlp.2` [`Linear`] `d_ff → d_model` |
///
/// [`Module::forward`] runs without masks;
/// [`forward_masked`](TransformerBlock::forward_masked) takes
/// [`AttentionMasks`].
///
/// # Examples
///
/// ```
/// use netcl::Tensor;
/// use netcl::nn::{AttentionMasks, Module, TransformerBlock};
/// use netcl::rand::SeedableRng;
///
/// let block = TransformerBlock::new(8, 2, 32, &mut netcl::rand::rngs::StdRng::seed_from_u64(0));
/// let x = Tensor::ones(&[2, 4, 8]);
/// let y = block.forward_masked(&x, &AttentionMasks::causal())?;
/// assert_eq!(y.shape(), &[2, 4, 8]);
/// let names: Vec<String> = block.named_parameters().into_iter().map(|(n, _)| n).collect();
/// assert_eq!(names[..2], ["ln1.weight", "ln1.bias"]);
/// assert_eq!(names[names.len() - 1], "mlp.2.bias");
/// # Ok::<(), netcl::Error>(())
/// ```
pub struct TransformerBlock {
    ln1: LayerNorm,
    attn: MultiheadAttention,
    ln2: LayerNorm,
    mlp: Sequential,
    training: TrainingFlag,
}

impl TransformerBlock {
    /// A block over `d_model` features with `num_heads` heads and an MLP
    /// of width `d_ff`, initialised from `rng`.
    ///
    /// # Panics
    ///
    /// As [`try_new`](TransformerBlock::try_new): if a size is zero or
    /// `num_heads` does not divide `d_model`.
    #[track_caller]
    pub fn new<R: Rng + ?Sized>(
        d_model: usize,
        num_heads: usize,
        d_ff: usize,
        rng: &mut R,
    ) -> TransformerBlock {
        or_panic(TransformerBlock::try_new(d_model, num_heads, d_ff, rng))
    }

    /// A block over `d_model` features with `num_heads` heads and an MLP
    /// of width `d_ff`, initialised from `rng`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] if a size is zero or `num_heads` does
    /// not divide `d_model`, [`Error::ShapeTooLarge`] if a weight would
    /// hold more than [`Tensor::MAX_ELEMENTS`] values.
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::nn::TransformerBlock;
    /// use netcl::rand::SeedableRng;
    ///
    /// let mut rng = netcl::rand::rngs::StdRng::seed_from_u64(0);
    /// let err = TransformerBlock::try_new(8, 2, 0, &mut rng).unwrap_err();
    /// assert_eq!(err.to_string(), "Linear: sizes must be positive, got 8 -> 0");
    /// ```
    pub fn try_new<R: Rng + ?Sized>(
        d_model: usize,
        num_heads: usize,
        d_ff: usize,
        rng: &mut R,
    ) -> Result<TransformerBlock> {
        let attn = MultiheadAttention::try_new(d_model, num_heads, rng)?;
        let mlp = Sequential::new()
            .with(Linear::try_new(d_model, d_ff, rng)?)
            .with(Gelu::new())
            .with(Linear::try_new(d_ff, d_model, rng)?);
        TransformerBlock::build(d_model, attn, mlp)
    }

    /// A block with every linear parameter zero (the norms' weights one):
    /// the shell to load a checkpoint into.
    ///
    /// # Errors
    ///
    /// As [`try_new`](TransformerBlock::try_new).
    pub fn zeros(d_model: usize, num_heads: usize, d_ff: usize) -> Result<TransformerBlock> {
        let attn = MultiheadAttention::zeros(d_model, num_heads)?;
        let mlp = Sequential::new()
            .with(Linear::zeros(d_model, d_ff)?)
            .with(Gelu::new())
            .with(Linear::zeros(d_ff, d_model)?);
        TransformerBlock::build(d_model, attn, mlp)
    }

    fn build(
        d_model: usize,
        attn: MultiheadAttention,
        mlp: Sequential,
    ) -> Result<TransformerBlock> {
        Ok(TransformerBlock {
            ln1: LayerNorm::try_new(&[d_model])?,
            attn,
            ln2: LayerNorm::try_new(&[d_model])?,
            mlp,
            training: TrainingFlag::new(),
        })
    }

    /// The block on `x`, `[N, L, d_model]`, with `masks` for the
    /// attention.
    ///
    /// # Errors
    ///
    /// As [`MultiheadAttention::attend`].
    pub fn forward_masked(&self, x: &Tensor, masks: &AttentionMasks) -> Result<Tensor> {
        let a = self.ln1.forward(x)?;
        let h = x.try_add(&self.attn.attend(&a, &a, &a, masks)?)?;
        h.try_add(&self.mlp.forward(&self.ln2.forward(&h)?)?)
    }

    /// The first norm, `ln1`.
    pub fn ln1(&self) -> &LayerNorm {
        &self.ln1
    }

    /// The attention, `attn`.
    pub fn attn(&self) -> &MultiheadAttention {
        &self.attn
    }

    /// The second norm, `ln2`.
    pub fn ln2(&self) -> &LayerNorm {
        &self.ln2
    }

    /// The MLP, `mlp`.
    pub fn mlp(&self) -> &Sequential {
        &self.mlp
    }

    /// A fork (see [`Module::try_fork`]).
    ///
    /// # Errors
    ///
    /// None in practice: the MLP's layers all fork.
    pub fn try_clone(&self) -> Result<TransformerBlock> {
        fork_scope(|| {
            Ok(TransformerBlock {
                ln1: self.ln1.clone(),
                attn: self.attn.clone(),
                ln2: self.ln2.clone(),
                mlp: self.mlp.try_clone()?,
                training: self.training.clone(),
            })
        })
    }
}

impl Module for TransformerBlock {
    /// The block without masks.
    ///
    /// # Errors
    ///
    /// As [`MultiheadAttention::attend`].
    fn forward(&self, input: &Tensor) -> Result<Tensor> {
        self.forward_masked(input, &AttentionMasks::default())
    }

    fn named_parameters(&self) -> Vec<(String, Tensor)> {
        let mut params = prefixed("ln1", self.ln1.named_parameters());
        params.extend(prefixed("attn", self.attn.named_parameters()));
        params.extend(prefixed("ln2", self.ln2.named_parameters()));
        params.extend(prefixed("mlp", self.mlp.named_parameters()));
        params
    }

    fn torch_layouts(&self) -> Vec<(String, TorchLayout)> {
        let mut layouts: Vec<(String, TorchLayout)> = self
            .attn
            .torch_layouts()
            .into_iter()
            .map(|(n, l)| (format!("attn.{n}"), l))
            .collect();
        layouts.extend(
            self.mlp
                .torch_layouts()
                .into_iter()
                .map(|(n, l)| (format!("mlp.{n}"), l)),
        );
        layouts
    }

    fn set_training(&self, training: bool) {
        self.training.set(training);
        self.ln1.set_training(training);
        self.attn.set_training(training);
        self.ln2.set_training(training);
        self.mlp.set_training(training);
    }

    fn training_flag(&self) -> Option<&TrainingFlag> {
        Some(&self.training)
    }

    fn architecture(&self) -> Option<crate::nn::Architecture> {
        self.describe()
    }

    fn try_fork(&self) -> Result<Box<dyn Module>> {
        Ok(Box::new(self.try_clone()?))
    }
}

impl fmt::Debug for TransformerBlock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TransformerBlock")
            .field("ln1", &self.ln1)
            .field("attn", &self.attn)
            .field("ln2", &self.ln2)
            .field("mlp", &self.mlp)
            .finish()
    }
}

impl MultiheadAttention {
    /// The architecture node (`Module::architecture`).
    pub(crate) fn describe(&self) -> Option<crate::nn::Architecture> {
        Some(
            crate::nn::Architecture::new("MultiheadAttention")
                .with("embed_dim", self.embed_dim())
                .with("num_heads", self.num_heads),
        )
    }
}

impl TransformerBlock {
    /// The architecture node (`Module::architecture`).
    pub(crate) fn describe(&self) -> Option<crate::nn::Architecture> {
        // mlp.0 is the `[d_model, d_ff]` Linear.
        let d_ff = *self.mlp.named_parameters().first()?.1.shape().get(1)?;
        Some(
            crate::nn::Architecture::new("TransformerBlock")
                .with("d_model", self.attn.embed_dim())
                .with("num_heads", self.attn.num_heads)
                .with("d_ff", d_ff),
        )
    }
}
