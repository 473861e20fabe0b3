//! Parameter groups: per-group weight decay.

use crate::error::{Error, Result};
use crate::optim::{check, collect_params};
use crate::tensor::Tensor;

/// A group of parameters with a weight decay of its own, for optimizers
/// built with `with_groups` ([`AdamW::with_groups`](crate::optim::AdamW::with_groups),
/// [`Sgd::with_groups`](crate::optim::Sgd::with_groups), ...): PyTorch's
/// parameter groups, for the one setting that differs between them in
/// practice. Biases and normalisation gains usually skip weight decay;
/// [`no_decay_groups`] splits a model's parameters so.
///
/// # Examples
///
/// ```
/// use netcl::nn::{Linear, Module};
/// use netcl::optim::{AdamConfig, AdamW, ParamGroup};
///
/// let layer = Linear::zeros(3, 2)?;
/// let groups = [
///     ParamGroup::new([layer.weight().clone()]),               // the config's decay
///     ParamGroup::new(layer.bias().cloned()).weight_decay(0.0), // none
/// ];
/// let adamw = AdamW::with_groups(groups, AdamConfig::new(1e-3).weight_decay(0.1));
/// assert_eq!(adamw.params().len(), 2);
/// # Ok::<(), netcl::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct ParamGroup {
    pub(crate) params: Vec<Tensor>,
    pub(crate) weight_decay: Option<f32>,
}

impl ParamGroup {
    /// A group of `params` using the optimizer's configured weight decay.
    pub fn new(params: impl IntoIterator<Item = Tensor>) -> ParamGroup {
        ParamGroup {
            params: params.into_iter().collect(),
            weight_decay: None,
        }
    }

    /// The group with its own weight decay (`0.0`: none).
    #[must_use]
    pub fn weight_decay(mut self, weight_decay: f32) -> ParamGroup {
        self.weight_decay = Some(weight_decay);
        self
    }

    /// The group's parameters.
    pub fn params(&self) -> &[Tensor] {
        &self.params
    }

    /// The group's own weight decay, if it has one.
    pub fn own_weight_decay(&self) -> Option<f32> {
        self.weight_decay
    }
}

/// Splits `params` into two groups: the parameters of two or more
/// dimensions (weight matrices, embeddings, convolution kernels) with the
/// optimizer's weight decay, and the rest (biases, normalisation gains and
/// shifts) with none, as GPT-style training does.
///
/// # Examples
///
/// ```
/// use netcl::nn::{Activation, Mlp, Module};
/// use netcl::optim::{AdamConfig, AdamW, no_decay_groups};
///
/// let mlp = Mlp::seeded(&[4, 8, 2], Activation::Relu, 0);
/// let [decay, no_decay] = no_decay_groups(mlp.parameters());
/// assert_eq!((decay.params().len(), no_decay.params().len()), (2, 2));
/// assert_eq!(no_decay.own_weight_decay(), Some(0.0));
/// let adamw = AdamW::with_groups([decay, no_decay], AdamConfig::new(1e-3).weight_decay(0.1));
/// ```
pub fn no_decay_groups(params: impl IntoIterator<Item = Tensor>) -> [ParamGroup; 2] {
    let (decay, no_decay): (Vec<Tensor>, Vec<Tensor>) =
        params.into_iter().partition(|p| p.ndim() >= 2);
    [
        ParamGroup::new(decay),
        ParamGroup::new(no_decay).weight_decay(0.0),
    ]
}

/// The parameters of `groups`, each once, with its group's weight decay
/// (`None`: the config's).
pub(crate) fn flatten(
    op: &'static str,
    groups: impl IntoIterator<Item = ParamGroup>,
) -> Result<(Vec<Tensor>, Vec<Option<f32>>)> {
    let mut params: Vec<Tensor> = Vec::new();
    let mut decay = Vec::new();
    for (g, group) in groups.into_iter().enumerate() {
        if let Some(wd) = group.weight_decay {
            check(
                op,
                "a group's weight_decay",
                wd,
                |v| v >= 0.0,
                "finite and >= 0",
            )?;
        }
        for p in collect_params(op, group.params)? {
            if params.iter().any(|q| q.same(&p)) {
                return Err(Error::InvalidArgument {
                    op,
                    message: format!("a parameter of group {g} is in an earlier group too"),
                });
            }
            params.push(p);
            decay.push(group.weight_decay);
        }
    }
    Ok((params, decay))
}
