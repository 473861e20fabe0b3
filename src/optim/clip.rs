//! Gradient clipping by global norm.

use crate::error::{Error, Result, or_panic};
use crate::tensor::Tensor;

/// Scales the gradients of `params` so that their global norm is at most
/// `max_norm`, and returns the global norm before clipping: PyTorch's
/// `torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)` with
/// `error_if_nonfinite=False`.
///
/// The global norm is the `norm_type`-norm of the vector of every gradient
/// element (`f32::INFINITY`: the largest absolute value), computed in
/// `f64`. Parameters without a gradient are skipped, and a parameter given
/// twice (a tied weight) counts once. Every gradient is multiplied by
/// `min(1, max_norm / (total + 1e-6))`, so gradients below the limit are
/// left exactly as they are.
///
/// A non-finite total (a gradient holding `inf` or `NaN`) is returned as
/// it is, and, as PyTorch does without `error_if_nonfinite`, the gradients
/// are still scaled by that coefficient: `0` for an infinite total (finite
/// elements become 0, infinite ones NaN), NaN for a NaN total. Check the
/// returned norm with `is_finite()` and skip the optimizer step if it is
/// not.
///
/// # Panics
///
/// As [`try_clip_grad_norm`].
///
/// # Examples
///
/// Gradients (3, 4) have norm 5; clipped to norm 1 they become
/// (3, 4) · 1 / (5 + 1e-6):
///
/// ```
/// use netcl::Tensor;
/// use netcl::optim::clip_grad_norm;
///
/// let w = Tensor::zeros(&[2]).requires_grad_(true);
/// (&w * &Tensor::from_vec(vec![3.0, 4.0], &[2])?).sum().backward();
/// let norm = clip_grad_norm(&[w.clone()], 1.0, 2.0);
/// assert_eq!(norm, 5.0);
/// let g = w.grad().unwrap().to_vec();
/// assert!((g[0] - 0.6).abs() < 1e-6 && (g[1] - 0.8).abs() < 1e-6);
/// # Ok::<(), netcl::Error>(())
/// ```
#[track_caller]
pub fn clip_grad_norm(params: &[Tensor], max_norm: f32, norm_type: f32) -> f32 {
    or_panic(try_clip_grad_norm(params, max_norm, norm_type))
}

/// [`clip_grad_norm`], returning an error instead of panicking.
///
/// # Errors
///
/// [`Error::InvalidArgument`] if `max_norm` is negative or NaN, or
/// `norm_type` is not positive (`f32::INFINITY` is allowed). Nothing
/// changes then.
///
/// # Examples
///
/// ```
/// use netcl::optim::try_clip_grad_norm;
///
/// let err = try_clip_grad_norm(&[], -1.0, 2.0).unwrap_err();
/// assert_eq!(err.to_string(), "clip_grad_norm: max_norm must be >= 0, got -1");
/// ```
pub fn try_clip_grad_norm(params: &[Tensor], max_norm: f32, norm_type: f32) -> Result<f32> {
    const OP: &str = "clip_grad_norm";
    if max_norm.is_nan() || max_norm < 0.0 {
        return Err(Error::InvalidArgument {
            op: OP,
            message: format!("max_norm must be >= 0, got {max_norm}"),
        });
    }
    if norm_type.is_nan() || norm_type <= 0.0 {
        return Err(Error::InvalidArgument {
            op: OP,
            message: format!("norm_type must be > 0 (or infinity), got {norm_type}"),
        });
    }
    let mut unique: Vec<&Tensor> = Vec::new();
    for p in params {
        if !unique.iter().any(|q| q.same(p)) {
            unique.push(p);
        }
    }
    let grads: Vec<(&Tensor, crate::storage::Data)> = unique
        .into_iter()
        .filter_map(|p| p.grad_data().map(|g| (p, g)))
        .collect();
    if grads.is_empty() {
        return Ok(0.0);
    }
    let p = f64::from(norm_type);
    let mut acc = 0.0f64;
    for (_, g) in &grads {
        for &v in g.view().iter() {
            let a = f64::from(v).abs();
            if norm_type.is_infinite() {
                // NaN propagates, as torch.max does.
                acc = if a.is_nan() || acc.is_nan() {
                    f64::NAN
                } else {
                    acc.max(a)
                };
            } else {
                acc += a.powf(p);
            }
        }
    }
    let total = if norm_type.is_infinite() {
        acc
    } else {
        acc.powf(1.0 / p)
    } as f32;
    let coef = (f64::from(max_norm) / (f64::from(total) + 1e-6)) as f32;
    // clamp(max=1) keeps NaN, as torch.clamp does.
    let coef = if coef.is_nan() { coef } else { coef.min(1.0) };
    if coef != 1.0 {
        for (param, _) in &grads {
            param.scale_grad(coef);
        }
    }
    Ok(total)
}
