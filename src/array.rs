//! The ground floor: pure ndarray helpers on shapes and `f32` arrays that
//! every floor above uses (ops, the backward engine, tensors, parallel
//! gradient sums). Nothing here knows about [`Tensor`](crate::Tensor),
//! tapes or modes.

use ndarray::{ArrayD, Axis, IxDyn};

use crate::error::{Error, Result};

/// The most elements a tensor can have: `isize::MAX / 4`, the number of
/// `f32` values the largest allocation Rust permits can hold. Public as
/// [`Tensor::MAX_ELEMENTS`](crate::Tensor::MAX_ELEMENTS).
pub(crate) const MAX_ELEMENTS: usize = isize::MAX as usize / std::mem::size_of::<f32>();

/// The number of elements of `shape`, checking that the shape can exist:
/// the product of its non-zero lengths is at most
/// [`MAX_ELEMENTS`] (computed without overflow).
///
/// # Errors
///
/// [`Error::ShapeTooLarge`] naming `op` if it is not.
pub(crate) fn checked_numel(op: &'static str, shape: &[usize]) -> Result<usize> {
    match nonzero_product(shape.iter().copied()) {
        Some(_) if shape.contains(&0) => Ok(0),
        Some(product) => Ok(product),
        None => Err(Error::ShapeTooLarge {
            op,
            shape: shape.to_vec(),
            limit: MAX_ELEMENTS,
        }),
    }
}

/// The product of the non-zero `lengths`, or `None` if it exceeds
/// [`MAX_ELEMENTS`] (computed without overflow): whether a shape of these
/// lengths can exist, for callers that have not built the shape.
pub(crate) fn nonzero_product(lengths: impl IntoIterator<Item = usize>) -> Option<usize> {
    lengths
        .into_iter()
        .filter(|&len| len != 0)
        .try_fold(1_usize, |product, len| {
            product
                .checked_mul(len)
                .filter(|&product| product <= MAX_ELEMENTS)
        })
}

/// `a == b` for two shapes, without the call to `memcmp` that slice
/// equality makes (a small op compares shapes of one or two axes).
#[inline]
pub(crate) fn same_shape(a: &[usize], b: &[usize]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x == y)
}

/// Resolves a possibly negative `axis` (`-1` is the last) for a tensor of
/// `ndim` dimensions.
pub(crate) fn normalize_axis(op: &'static str, axis: isize, ndim: usize) -> Result<usize> {
    let resolved = if axis < 0 { axis + ndim as isize } else { axis };
    if resolved < 0 || resolved >= ndim as isize {
        return Err(Error::Axis { op, axis, ndim });
    }
    Ok(resolved as usize)
}

/// Reads the index tensors of the indexing ops (`index_select`, `gather`,
/// `embedding`, ...): netcl keeps one element type, so an index is an `f32`
/// holding an integer (exact up to 2^24), checked here against `bound`.
///
/// # Errors
///
/// [`Error::Index`] naming `op`, the position and the value if `values`
/// holds anything but an integer in `0..bound` (NaN and infinities
/// included).
#[allow(dead_code)] // the indexing ops (ops issue) are its users
pub(crate) fn indices(
    op: &'static str,
    values: impl IntoIterator<Item = f32>,
    bound: usize,
) -> Result<Vec<usize>> {
    values
        .into_iter()
        .enumerate()
        .map(|(position, value)| index(op, position, value, bound))
        .collect()
}

/// One index of [`indices`].
#[allow(dead_code)] // the indexing ops (ops issue) are its users
pub(crate) fn index(op: &'static str, position: usize, value: f32, bound: usize) -> Result<usize> {
    // `value < bound` compared in f64: every usize below 2^53 is exact there.
    if value >= 0.0 && value.fract() == 0.0 && f64::from(value) < bound as f64 {
        Ok(value as usize)
    } else {
        Err(Error::Index {
            op,
            position,
            value,
            bound,
        })
    }
}

/// Reads a mask (`masked_fill`, `where_`, attention masks): netcl keeps one
/// element type, so a mask is an `f32` tensor of 0 (false) and 1 (true),
/// as the comparison ops (`eq`, `gt`, `lt`) return.
///
/// # Errors
///
/// [`Error::InvalidArgument`] naming `op`, the position and the value if
/// any value is not exactly 0 or 1 (a NaN in a mask is an error, never
/// silently true or false).
#[allow(dead_code)] // the masking ops (ops issue) are its users
pub(crate) fn mask(op: &'static str, values: impl IntoIterator<Item = f32>) -> Result<Vec<bool>> {
    values
        .into_iter()
        .enumerate()
        .map(|(position, value)| {
            if value == 1.0 {
                Ok(true)
            } else if value == 0.0 {
                Ok(false)
            } else {
                Err(Error::InvalidArgument {
                    op,
                    message: format!(
                        "mask value {value} at position {position}: a mask holds 0 (false) or 1 (true)"
                    ),
                })
            }
        })
        .collect()
}

/// The NumPy broadcast of two shapes: aligned from the right, each pair of
/// lengths equal or one of them 1. The result must be a shape that can
/// exist ([`checked_numel`]): two empty operands can broadcast to a shape
/// whose non-zero lengths overflow.
pub(crate) fn broadcast_shape(op: &'static str, lhs: &[usize], rhs: &[usize]) -> Result<IxDyn> {
    let ndim = lhs.len().max(rhs.len());
    let mut shape = vec![0; ndim];
    for (i, out) in shape.iter_mut().enumerate() {
        let l = (i + lhs.len()).checked_sub(ndim).map_or(1, |j| lhs[j]);
        let r = (i + rhs.len()).checked_sub(ndim).map_or(1, |j| rhs[j]);
        *out = match (l, r) {
            (l, r) if l == r => l,
            (1, r) => r,
            (l, 1) => l,
            _ => {
                return Err(Error::Broadcast {
                    op,
                    lhs: lhs.to_vec(),
                    rhs: rhs.to_vec(),
                });
            }
        };
    }
    checked_numel(op, &shape)?;
    Ok(IxDyn(&shape))
}

/// Sums a gradient of a broadcast result back to the shape of the operand
/// that was broadcast: over the leading axes it lacked and over the axes
/// where it had length 1.
pub(crate) fn reduce_to_shape(grad: ArrayD<f32>, shape: &[usize]) -> ArrayD<f32> {
    if grad.shape() == shape {
        return grad;
    }
    if grad.is_empty() {
        // Nothing to sum, and summing would build the intermediate shapes:
        // an empty gradient can have axes of 2^40 whose partial sums do not
        // fit in memory. The target is an existing tensor's shape, so it fits.
        return ArrayD::zeros(IxDyn(shape));
    }
    let mut grad = grad;
    while grad.ndim() > shape.len() {
        grad = grad.sum_axis(Axis(0));
    }
    for (axis, &len) in shape.iter().enumerate() {
        if len == 1 && grad.shape()[axis] != 1 {
            grad = grad.sum_axis(Axis(axis)).insert_axis(Axis(axis));
        }
    }
    grad
}

/// `array` in standard (row-major) layout with the given shape, copying only
/// if its layout is not already standard.
pub(crate) fn reshape_owned(array: ArrayD<f32>, shape: &[usize]) -> ArrayD<f32> {
    let array = if array.is_standard_layout() {
        array
    } else {
        array.as_standard_layout().into_owned()
    };
    array
        .into_shape_with_order(IxDyn(shape))
        .expect("element count checked by the caller")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broadcast_shape_follows_numpy_rules() {
        assert_eq!(broadcast_shape("t", &[2, 3], &[3]).unwrap(), IxDyn(&[2, 3]));
        assert_eq!(
            broadcast_shape("t", &[4, 1, 3], &[2, 1]).unwrap(),
            IxDyn(&[4, 2, 3])
        );
        assert_eq!(broadcast_shape("t", &[], &[5]).unwrap(), IxDyn(&[5]));
        assert!(matches!(
            broadcast_shape("t", &[2, 3], &[2]),
            Err(Error::Broadcast { op: "t", .. })
        ));
    }

    #[test]
    fn reduce_to_shape_sums_broadcast_axes() {
        let grad = ArrayD::from_elem(IxDyn(&[4, 2, 3]), 1.0_f32);
        let reduced = reduce_to_shape(grad, &[2, 1]);
        assert_eq!(reduced.shape(), &[2, 1]);
        // Each element collects 4 (leading axis) * 3 (length-1 axis) ones.
        assert!(reduced.iter().all(|&v| v == 12.0));
    }

    #[test]
    fn negative_axes_count_from_the_end() {
        assert_eq!(normalize_axis("t", -1, 3).unwrap(), 2);
        assert_eq!(normalize_axis("t", 0, 3).unwrap(), 0);
        assert_eq!(
            normalize_axis("t", 3, 3),
            Err(Error::Axis {
                op: "t",
                axis: 3,
                ndim: 3
            })
        );
        assert!(normalize_axis("t", -4, 3).is_err());
    }
}
