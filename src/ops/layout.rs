//! Layout ops, as PyTorch spells them: `permute`, `unsqueeze`, `squeeze`,
//! `flatten`, `expand`/`broadcast_to`, `narrow`, `split`/`chunk`,
//! `select`/`unbind` (methods)
//! and [`cat`]/[`stack`] (free functions, as `torch.cat` and `torch.stack`,
//! re-exported in [`functional`](crate::functional)).
//!
//! `permute`, `unsqueeze` and `squeeze` return views sharing the input's
//! storage (also for a non-contiguous input). `expand`, `broadcast_to`,
//! `narrow`, `split`, `chunk`, `select` and `unbind` copy: netcl's storage has no offset and no
//! zero strides, so where PyTorch returns a view netcl returns the same
//! values in a new buffer (writing into the result never writes into the
//! input, in either library, for the ops' results used as values).
//!
//! Each backward moves the gradient back to the input's layout: permuted
//! back, reshaped back, summed over the expanded axes, or sliced.

use ndarray::{Axis, Slice};

use crate::array::{checked_numel, normalize_axis};
use crate::autograd::function::{GraphGrads, InputGrads, record, with_graph};
use crate::error::{Error, Result, or_panic};
use crate::tensor::{Data, Tensor};

use super::binary::reduce_to;
use super::graph::sum_to;

/// Views: permute, unsqueeze, squeeze, flatten.
impl Tensor {
    /// Reorders the axes: axis `i` of the result is axis `dims[i]` of
    /// `self`, as `torch.permute`.
    ///
    /// # Panics
    ///
    /// As [`try_permute`](Tensor::try_permute).
    #[track_caller]
    pub fn permute(&self, dims: &[isize]) -> Tensor {
        or_panic(self.try_permute(dims))
    }

    /// Reorders the axes: axis `i` of the result is axis `dims[i]` of
    /// `self` (negative counts from the end), as `torch.permute`. The result
    /// shares storage with `self`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] if `dims` does not name every axis exactly
    /// once; [`Error::Axis`] if an entry is out of range.
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::Tensor;
    ///
    /// let x = Tensor::arange(0.0, 6.0, 1.0).reshape(&[1, 2, 3]).requires_grad_(true);
    /// let y = x.try_permute(&[2, 0, -2])?;
    /// assert_eq!(y.shape(), &[3, 1, 2]);
    /// assert_eq!(y.to_vec(), vec![0.0, 3.0, 1.0, 4.0, 2.0, 5.0]);
    /// // The gradient is permuted back: d(Σ w·y)/dx = w permuted back.
    /// let w = Tensor::arange(0.0, 6.0, 1.0).reshape(&[3, 1, 2]);
    /// (&y * &w).sum().backward();
    /// assert_eq!(x.grad().unwrap().to_vec(), vec![0.0, 2.0, 4.0, 1.0, 3.0, 5.0]);
    /// # Ok::<(), netcl::Error>(())
    /// ```
    #[track_caller]
    pub fn try_permute(&self, dims: &[isize]) -> Result<Tensor> {
        let ndim = self.ndim();
        if dims.len() != ndim {
            return Err(Error::InvalidArgument {
                op: "permute",
                message: format!(
                    "dims {dims:?} name {} axes of a tensor with {ndim} dimensions",
                    dims.len()
                ),
            });
        }
        let mut axes = Vec::with_capacity(ndim);
        let mut inverse = vec![usize::MAX; ndim];
        for (i, &d) in dims.iter().enumerate() {
            let axis = normalize_axis("permute", d, ndim)?;
            if inverse[axis] != usize::MAX {
                return Err(Error::InvalidArgument {
                    op: "permute",
                    message: format!("dims {dims:?} name axis {axis} twice"),
                });
            }
            inverse[axis] = i;
            axes.push(axis);
        }
        let out = self.read().permute(&axes);
        record("permute", &[self], out, |_| {
            // d permute(x)/dx: the gradient permuted back (the inverse
            // permutation).
            with_graph(
                inverse,
                |inverse: &Vec<usize>, grad: Data, grads: &mut InputGrads<'_>| {
                    grads.put(0, grad.permute(inverse))
                },
                |inverse: &Vec<usize>, grad: &Tensor, grads: &mut GraphGrads<'_>| {
                    let dims: Vec<isize> = inverse.iter().map(|&d| d as isize).collect();
                    grads.set(0, grad.try_permute(&dims)?);
                    Ok(())
                },
            )
        })
    }

    /// A new axis of length 1 at `dim`, as `torch.unsqueeze`.
    ///
    /// # Panics
    ///
    /// As [`try_unsqueeze`](Tensor::try_unsqueeze).
    #[track_caller]
    pub fn unsqueeze(&self, dim: isize) -> Tensor {
        or_panic(self.try_unsqueeze(dim))
    }

    /// A new axis of length 1 at `dim`, in `-(ndim + 1)..=ndim` (negative
    /// counts from the end of the result's axes), as `torch.unsqueeze`.
    /// The result shares storage with `self`.
    ///
    /// # Errors
    ///
    /// [`Error::Axis`] if `dim` is out of range.
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::Tensor;
    ///
    /// let x = Tensor::zeros(&[2, 3]);
    /// assert_eq!(x.try_unsqueeze(0)?.shape(), &[1, 2, 3]);
    /// assert_eq!(x.try_unsqueeze(-1)?.shape(), &[2, 3, 1]);
    /// # Ok::<(), netcl::Error>(())
    /// ```
    #[track_caller]
    pub fn try_unsqueeze(&self, dim: isize) -> Result<Tensor> {
        let axis = normalize_axis("unsqueeze", dim, self.ndim() + 1)?;
        let mut shape = self.shape().to_vec();
        shape.insert(axis, 1);
        self.unit_axes("unsqueeze", &shape)
    }

    /// Removes axis `dim` if its length is 1, as `torch.squeeze(dim)`.
    ///
    /// # Panics
    ///
    /// As [`try_squeeze`](Tensor::try_squeeze).
    #[track_caller]
    pub fn squeeze(&self, dim: isize) -> Tensor {
        or_panic(self.try_squeeze(dim))
    }

    /// Removes axis `dim` (negative counts from the end) if its length is
    /// 1; as PyTorch, the same shape when it is not (and a 0-dimensional
    /// tensor accepts `dim` 0 and -1). PyTorch's `squeeze()` without a dim
    /// is [`squeeze_all`](Tensor::squeeze_all). The result shares storage
    /// with `self`.
    ///
    /// # Errors
    ///
    /// [`Error::Axis`] if `dim` is out of range.
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::Tensor;
    ///
    /// let x = Tensor::zeros(&[2, 1, 3]);
    /// assert_eq!(x.try_squeeze(1)?.shape(), &[2, 3]);
    /// assert_eq!(x.try_squeeze(0)?.shape(), &[2, 1, 3]); // length 2: unchanged
    /// # Ok::<(), netcl::Error>(())
    /// ```
    #[track_caller]
    pub fn try_squeeze(&self, dim: isize) -> Result<Tensor> {
        let axis = normalize_axis("squeeze", dim, self.ndim().max(1))?;
        let mut shape = self.shape().to_vec();
        if shape.get(axis) == Some(&1) {
            shape.remove(axis);
        }
        self.unit_axes("squeeze", &shape)
    }

    /// Removes every axis of length 1: PyTorch's `squeeze()` without a dim
    /// (Rust has no overloads). The result shares storage with `self`.
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::Tensor;
    ///
    /// let x = Tensor::zeros(&[1, 2, 1, 3, 1]);
    /// assert_eq!(x.squeeze_all().shape(), &[2, 3]);
    /// ```
    #[track_caller]
    pub fn squeeze_all(&self) -> Tensor {
        let shape: Vec<usize> = self.shape().iter().copied().filter(|&l| l != 1).collect();
        or_panic(self.unit_axes("squeeze_all", &shape))
    }

    /// `self` read with `shape`, its shape with axes of length 1 added or
    /// removed: a view, whose gradient is read back with the input's shape.
    #[track_caller]
    fn unit_axes(&self, op: &'static str, shape: &[usize]) -> Result<Tensor> {
        let input = self.shape().to_vec();
        let out = self.read().reshape_unit_axes(shape);
        record(op, &[self], out, |_| {
            // The same values: the gradient reshaped back.
            with_graph(
                input,
                |input: &Vec<usize>, grad: Data, grads: &mut InputGrads<'_>| {
                    grads.put(0, grad.reshape_unit_axes(input))
                },
                |input: &Vec<usize>, grad: &Tensor, grads: &mut GraphGrads<'_>| {
                    grads.set(0, grad.try_reshape(input)?);
                    Ok(())
                },
            )
        })
    }

    /// Merges axes `start_dim..=end_dim` into one, as `torch.flatten`.
    ///
    /// # Panics
    ///
    /// As [`try_flatten`](Tensor::try_flatten).
    #[track_caller]
    pub fn flatten(&self, start_dim: isize, end_dim: isize) -> Tensor {
        or_panic(self.try_flatten(start_dim, end_dim))
    }

    /// Merges axes `start_dim..=end_dim` (negative counts from the end)
    /// into one, as `torch.flatten(x, start_dim, end_dim)`; PyTorch's
    /// defaults are `(0, -1)`. A 0-dimensional tensor becomes shape `[1]`.
    /// Shares storage when `self` is in row-major order, copies otherwise.
    ///
    /// # Errors
    ///
    /// [`Error::Axis`] if a dim is out of range,
    /// [`Error::InvalidArgument`] if `start_dim` comes after `end_dim`.
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::Tensor;
    ///
    /// let x = Tensor::zeros(&[2, 3, 4, 5]);
    /// assert_eq!(x.try_flatten(1, -1)?.shape(), &[2, 60]);
    /// assert_eq!(x.try_flatten(1, 2)?.shape(), &[2, 12, 5]);
    /// # Ok::<(), netcl::Error>(())
    /// ```
    #[track_caller]
    pub fn try_flatten(&self, start_dim: isize, end_dim: isize) -> Result<Tensor> {
        let ndim = self.ndim();
        let start = normalize_axis("flatten", start_dim, ndim.max(1))?;
        let end = normalize_axis("flatten", end_dim, ndim.max(1))?;
        if start > end {
            return Err(Error::InvalidArgument {
                op: "flatten",
                message: format!(
                    "start_dim {start_dim} comes after end_dim {end_dim} for a tensor with {ndim} dimensions"
                ),
            });
        }
        let input = self.shape().to_vec();
        let shape: Vec<usize> = if ndim == 0 {
            vec![1]
        } else {
            let merged = checked_numel("flatten", &input[start..=end])?;
            [&input[..start], &[merged], &input[end + 1..]].concat()
        };
        let out = self.read().reshape(&shape);
        record("flatten", &[self], out, |_| {
            // The same values: the gradient reshaped back.
            with_graph(
                input,
                |input: &Vec<usize>, grad: Data, grads: &mut InputGrads<'_>| {
                    grads.put(0, grad.reshape(input))
                },
                |input: &Vec<usize>, grad: &Tensor, grads: &mut GraphGrads<'_>| {
                    grads.set(0, grad.try_reshape(input)?);
                    Ok(())
                },
            )
        })
    }
}

/// Expanding: expand, broadcast_to.
impl Tensor {
    /// `self` repeated along axes of length 1 and new leading axes, as
    /// `torch.Tensor.expand`.
    ///
    /// # Panics
    ///
    /// As [`try_expand`](Tensor::try_expand).
    #[track_caller]
    pub fn expand(&self, sizes: &[isize]) -> Tensor {
        or_panic(self.try_expand(sizes))
    }

    /// `self` repeated to `sizes`, as `torch.Tensor.expand`: `sizes` has at
    /// least `self.ndim()` entries, aligned from the right; `-1` keeps an
    /// axis's length, an axis of length 1 takes any length, and the extra
    /// leading entries are new axes. Departure from PyTorch: the result is
    /// a copy, not a view with zero strides.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] if `sizes` has too few entries, a
    /// negative entry other than -1 on an existing axis, or -1 on a new
    /// axis; [`Error::Broadcast`] if an axis longer than 1 would change
    /// length; [`Error::ShapeTooLarge`] if the result could not exist.
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::Tensor;
    ///
    /// let x = Tensor::from_vec(vec![1.0, 2.0], &[2, 1])?.requires_grad_(true);
    /// let y = x.try_expand(&[2, -1, 3])?;
    /// assert_eq!(y.shape(), &[2, 2, 3]);
    /// assert_eq!(y.to_vec(), vec![1., 1., 1., 2., 2., 2., 1., 1., 1., 2., 2., 2.]);
    /// // Each input element is used 2·3 times: its gradient sums them.
    /// y.sum().backward();
    /// assert_eq!(x.grad().unwrap().to_vec(), vec![6.0, 6.0]);
    /// # Ok::<(), netcl::Error>(())
    /// ```
    #[track_caller]
    pub fn try_expand(&self, sizes: &[isize]) -> Result<Tensor> {
        let input = self.shape();
        if sizes.len() < input.len() {
            return Err(Error::InvalidArgument {
                op: "expand",
                message: format!(
                    "sizes {sizes:?} have fewer entries than the tensor's {} dimensions",
                    input.len()
                ),
            });
        }
        let lead = sizes.len() - input.len();
        let mut shape = Vec::with_capacity(sizes.len());
        for (i, &size) in sizes.iter().enumerate() {
            let len = match (i.checked_sub(lead).map(|j| input[j]), size) {
                (Some(len), -1) => len,
                (_, size) if size >= 0 => size as usize,
                (Some(_), _) => {
                    return Err(Error::InvalidArgument {
                        op: "expand",
                        message: format!("size {size} at position {i}: sizes are -1 or at least 0"),
                    });
                }
                (None, _) => {
                    return Err(Error::InvalidArgument {
                        op: "expand",
                        message: format!(
                            "size {size} at position {i}: a new leading axis needs a length (not -1)"
                        ),
                    });
                }
            };
            shape.push(len);
        }
        self.expand_to("expand", shape)
    }

    /// `self` broadcast to `shape`, as `torch.broadcast_to`.
    ///
    /// # Panics
    ///
    /// As [`try_broadcast_to`](Tensor::try_broadcast_to).
    #[track_caller]
    pub fn broadcast_to(&self, shape: &[usize]) -> Tensor {
        or_panic(self.try_broadcast_to(shape))
    }

    /// `self` broadcast to `shape` (NumPy rules, aligned from the right),
    /// as `torch.broadcast_to`; the gradient sums over the broadcast axes.
    /// Departure from PyTorch: a copy, not a view, and no `-1` entries
    /// (the lengths are `usize`; use [`try_expand`](Tensor::try_expand)).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] if `shape` has fewer axes than `self`;
    /// [`Error::Broadcast`] if `self` does not broadcast to it;
    /// [`Error::ShapeTooLarge`] if `shape` could not exist.
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::Tensor;
    ///
    /// let x = Tensor::from_vec(vec![1.0, 2.0, 3.0], &[3])?;
    /// assert_eq!(x.try_broadcast_to(&[2, 3])?.to_vec(), vec![1., 2., 3., 1., 2., 3.]);
    /// assert!(x.try_broadcast_to(&[2, 4]).is_err());
    /// # Ok::<(), netcl::Error>(())
    /// ```
    #[track_caller]
    pub fn try_broadcast_to(&self, shape: &[usize]) -> Result<Tensor> {
        if shape.len() < self.ndim() {
            return Err(Error::InvalidArgument {
                op: "broadcast_to",
                message: format!(
                    "shape {shape:?} has fewer axes than the tensor's shape {:?}",
                    self.shape()
                ),
            });
        }
        self.expand_to("broadcast_to", shape.to_vec())
    }

    /// `self` broadcast to `shape` (at least as many axes), a copy.
    #[track_caller]
    fn expand_to(&self, op: &'static str, shape: Vec<usize>) -> Result<Tensor> {
        let input = self.shape().to_vec();
        let lead = shape.len() - input.len();
        if input
            .iter()
            .zip(&shape[lead..])
            .any(|(&from, &to)| from != to && from != 1)
        {
            return Err(Error::Broadcast {
                op,
                lhs: input,
                rhs: shape,
            });
        }
        checked_numel(op, &shape)?;
        let data = self.read();
        let view = data.view();
        let out = Data::from_view(
            view.broadcast(shape.as_slice())
                .expect("checked: the input broadcasts to the shape"),
        );
        record(op, &[self], out, |_| {
            // Each input element feeds every copy of it: its gradient is
            // the sum over the expanded axes.
            with_graph(
                input,
                |input: &Vec<usize>, grad: Data, grads: &mut InputGrads<'_>| {
                    grads.put(0, reduce_to(grad, input))
                },
                |input: &Vec<usize>, grad: &Tensor, grads: &mut GraphGrads<'_>| {
                    grads.set(0, sum_to(grad, input)?);
                    Ok(())
                },
            )
        })
    }
}

/// Slicing: narrow, split, chunk.
impl Tensor {
    /// The `length` elements of axis `dim` from `start`, as `torch.narrow`.
    ///
    /// # Panics
    ///
    /// As [`try_narrow`](Tensor::try_narrow).
    #[track_caller]
    pub fn narrow(&self, dim: isize, start: isize, length: usize) -> Tensor {
        or_panic(self.try_narrow(dim, start, length))
    }

    /// The `length` elements of axis `dim` from `start` (a negative
    /// `start` counts from the end), as `torch.narrow`; the gradient is
    /// zero outside the slice. Departure from PyTorch: a copy, not a view.
    ///
    /// # Errors
    ///
    /// [`Error::Axis`] if `dim` is out of range; [`Error::InvalidArgument`]
    /// if `start` is outside `-len..=len` or `start + length` passes the
    /// axis's length `len`.
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::Tensor;
    ///
    /// let x = Tensor::arange(0.0, 6.0, 1.0).reshape(&[2, 3]).requires_grad_(true);
    /// let y = x.try_narrow(1, -2, 2)?;
    /// assert_eq!(y.to_vec(), vec![1.0, 2.0, 4.0, 5.0]);
    /// y.sum().backward();
    /// assert_eq!(x.grad().unwrap().to_vec(), vec![0.0, 1.0, 1.0, 0.0, 1.0, 1.0]);
    /// # Ok::<(), netcl::Error>(())
    /// ```
    #[track_caller]
    pub fn try_narrow(&self, dim: isize, start: isize, length: usize) -> Result<Tensor> {
        let axis = normalize_axis("narrow", dim, self.ndim())?;
        let len = self.shape()[axis];
        let begin = if start < 0 {
            start.checked_add_unsigned(len)
        } else {
            Some(start)
        }
        .filter(|&b| b >= 0 && b as usize <= len);
        let Some(begin) = begin else {
            return Err(Error::InvalidArgument {
                op: "narrow",
                message: format!(
                    "start {start} is outside -{len}..={len} (the length of axis {axis})"
                ),
            });
        };
        let begin = begin as usize;
        if length > len - begin {
            return Err(Error::InvalidArgument {
                op: "narrow",
                message: format!(
                    "start {begin} + length {length} passes the length {len} of axis {axis}"
                ),
            });
        }
        self.slice_axis("narrow", axis, begin, length)
    }

    /// `length` elements of `axis` from `begin`, checked by the caller.
    #[track_caller]
    fn slice_axis(
        &self,
        op: &'static str,
        axis: usize,
        begin: usize,
        length: usize,
    ) -> Result<Tensor> {
        let range = Slice::from(begin..begin + length);
        let data = self.read();
        let out = Data::from_view(data.view().slice_axis(Axis(axis), range));
        let input = self.shape().to_vec();
        record(op, &[self], out, |_| {
            // d x[begin..begin+length]/dx: the gradient in the slice, zero
            // elsewhere.
            with_graph(
                input,
                move |input: &Vec<usize>, grad: Data, grads: &mut InputGrads<'_>| {
                    let grad = grad.view();
                    grads.put(
                        0,
                        Data::build(input, |mut g| {
                            g.slice_axis_mut(Axis(axis), range).assign(&grad)
                        }),
                    );
                },
                move |input: &Vec<usize>, grad: &Tensor, grads: &mut GraphGrads<'_>| {
                    grads.set(0, pad_axis(grad, input, axis, begin)?);
                    Ok(())
                },
            )
        })
    }

    /// Pieces of `split_size` along `dim`, as `torch.split` with an int.
    ///
    /// # Panics
    ///
    /// As [`try_split`](Tensor::try_split).
    #[track_caller]
    pub fn split(&self, split_size: usize, dim: isize) -> Vec<Tensor> {
        or_panic(self.try_split(split_size, dim))
    }

    /// Pieces of `split_size` elements along `dim` (the last one shorter
    /// when the length does not divide), as `torch.split(x, split_size,
    /// dim)`; PyTorch's list-of-sizes form is
    /// [`try_split_sizes`](Tensor::try_split_sizes). An axis of length 0
    /// gives one empty piece. Each piece is a copy (PyTorch: a view), and
    /// records its own node, whose backward writes a gradient of `self`'s
    /// full shape (zero outside the piece): a backward through all `k`
    /// pieces costs `O(k·n)` for `n` elements (cheap for the few pieces of
    /// a q/k/v split; for many small pieces, select what you need instead).
    /// Unrelated to [`TensorDataset::split`](crate::data::TensorDataset::split).
    ///
    /// # Errors
    ///
    /// [`Error::Axis`] if `dim` is out of range; [`Error::InvalidArgument`]
    /// if `split_size` is 0 on a non-empty axis.
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::Tensor;
    ///
    /// let x = Tensor::arange(0.0, 5.0, 1.0);
    /// let pieces = x.try_split(2, 0)?;
    /// let values: Vec<Vec<f32>> = pieces.iter().map(Tensor::to_vec).collect();
    /// assert_eq!(values, vec![vec![0.0, 1.0], vec![2.0, 3.0], vec![4.0]]);
    /// # Ok::<(), netcl::Error>(())
    /// ```
    #[track_caller]
    pub fn try_split(&self, split_size: usize, dim: isize) -> Result<Vec<Tensor>> {
        let axis = normalize_axis("split", dim, self.ndim())?;
        let len = self.shape()[axis];
        if split_size == 0 && len != 0 {
            return Err(Error::InvalidArgument {
                op: "split",
                message: format!("split_size 0 for axis {axis} of length {len}"),
            });
        }
        let count = len.div_ceil(split_size.max(1)).max(1);
        (0..count)
            .map(|k| {
                let begin = k * split_size;
                self.slice_axis("split", axis, begin, split_size.min(len - begin))
            })
            .collect()
    }

    /// Pieces of the given lengths along `dim`, as `torch.split` with a
    /// list of sizes.
    ///
    /// # Panics
    ///
    /// As [`try_split_sizes`](Tensor::try_split_sizes).
    #[track_caller]
    pub fn split_sizes(&self, sizes: &[usize], dim: isize) -> Vec<Tensor> {
        or_panic(self.try_split_sizes(sizes, dim))
    }

    /// Pieces of lengths `sizes` along `dim`, which must add up to the
    /// axis's length, as `torch.split(x, [..], dim)` (Rust has no
    /// overloads: the int form is [`try_split`](Tensor::try_split)). Each
    /// piece is a copy.
    ///
    /// # Errors
    ///
    /// [`Error::Axis`] if `dim` is out of range; [`Error::InvalidArgument`]
    /// if the sizes do not add up to the axis's length.
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::Tensor;
    ///
    /// let x = Tensor::zeros(&[2, 5]);
    /// let pieces = x.try_split_sizes(&[1, 4], -1)?;
    /// assert_eq!(pieces[0].shape(), &[2, 1]);
    /// assert_eq!(pieces[1].shape(), &[2, 4]);
    /// # Ok::<(), netcl::Error>(())
    /// ```
    #[track_caller]
    pub fn try_split_sizes(&self, sizes: &[usize], dim: isize) -> Result<Vec<Tensor>> {
        let axis = normalize_axis("split_sizes", dim, self.ndim())?;
        let len = self.shape()[axis];
        let total = sizes.iter().try_fold(0_usize, |t, &s| t.checked_add(s));
        if total != Some(len) {
            return Err(Error::InvalidArgument {
                op: "split_sizes",
                message: format!(
                    "sizes {sizes:?} do not add up to the length {len} of axis {axis}"
                ),
            });
        }
        let mut begin = 0;
        sizes
            .iter()
            .map(|&size| {
                let piece = self.slice_axis("split_sizes", axis, begin, size);
                begin += size;
                piece
            })
            .collect()
    }

    /// `chunks` pieces (or fewer) along `dim`, as `torch.chunk`.
    ///
    /// # Panics
    ///
    /// As [`try_chunk`](Tensor::try_chunk).
    #[track_caller]
    pub fn chunk(&self, chunks: usize, dim: isize) -> Vec<Tensor> {
        or_panic(self.try_chunk(chunks, dim))
    }

    /// Splits along `dim` into pieces of `ceil(len / chunks)` elements, as
    /// `torch.chunk`: like PyTorch it can return fewer than `chunks`
    /// pieces (5 elements in 4 chunks are pieces of 2, 2 and 1), and an
    /// axis of length 0 gives `chunks` empty pieces. Each piece is a copy.
    ///
    /// # Errors
    ///
    /// [`Error::Axis`] if `dim` is out of range; [`Error::InvalidArgument`]
    /// if `chunks` is 0.
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::Tensor;
    ///
    /// let x = Tensor::zeros(&[5, 2]);
    /// let lengths: Vec<usize> = x.try_chunk(4, 0)?.iter().map(|t| t.shape()[0]).collect();
    /// assert_eq!(lengths, vec![2, 2, 1]);
    /// # Ok::<(), netcl::Error>(())
    /// ```
    #[track_caller]
    pub fn try_chunk(&self, chunks: usize, dim: isize) -> Result<Vec<Tensor>> {
        let axis = normalize_axis("chunk", dim, self.ndim())?;
        if chunks == 0 {
            return Err(Error::InvalidArgument {
                op: "chunk",
                message: "chunks must be at least 1".to_string(),
            });
        }
        let len = self.shape()[axis];
        if len == 0 {
            return (0..chunks)
                .map(|_| self.slice_axis("chunk", axis, 0, 0))
                .collect();
        }
        self.try_split(len.div_ceil(chunks), axis as isize)
    }
}

/// Picking along an axis: select, unbind.
impl Tensor {
    /// The slice at `index` of axis `dim`, without that axis, as
    /// `torch.select` (PyTorch's `x[i]` is `x.select(0, i)`).
    ///
    /// # Panics
    ///
    /// As [`try_select`](Tensor::try_select).
    #[track_caller]
    pub fn select(&self, dim: isize, index: isize) -> Tensor {
        or_panic(self.try_select(dim, index))
    }

    /// The slice at `index` (negative counts from the end) of axis `dim`,
    /// with that axis removed, as `torch.select`; the gradient is zero
    /// outside the slice. Departure from PyTorch: a copy, not a view.
    ///
    /// # Errors
    ///
    /// [`Error::Axis`] if `dim` is out of range; [`Error::Index`] if
    /// `index` is outside `-len..len` for the axis's length `len`.
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::Tensor;
    ///
    /// let x = Tensor::arange(0.0, 6.0, 1.0).reshape(&[2, 3]).requires_grad_(true);
    /// let y = x.try_select(1, -1)?;
    /// assert_eq!(y.to_vec(), vec![2.0, 5.0]);
    /// y.sum().backward();
    /// assert_eq!(x.grad().unwrap().to_vec(), vec![0.0, 0.0, 1.0, 0.0, 0.0, 1.0]);
    /// # Ok::<(), netcl::Error>(())
    /// ```
    #[track_caller]
    pub fn try_select(&self, dim: isize, index: isize) -> Result<Tensor> {
        let axis = normalize_axis("select", dim, self.ndim())?;
        let len = self.shape()[axis];
        let resolved = if index < 0 {
            index.checked_add_unsigned(len)
        } else {
            Some(index)
        };
        match resolved {
            Some(i) if i >= 0 && (i as usize) < len => self.pick("select", axis, i as usize),
            _ => Err(Error::Index {
                op: "select",
                position: 0,
                value: index as f32,
                bound: len,
            }),
        }
    }

    /// The slices of axis `dim`, each without that axis, as
    /// `torch.unbind`.
    ///
    /// # Panics
    ///
    /// As [`try_unbind`](Tensor::try_unbind).
    #[track_caller]
    pub fn unbind(&self, dim: isize) -> Vec<Tensor> {
        or_panic(self.try_unbind(dim))
    }

    /// Every slice of axis `dim` (negative counts from the end), each with
    /// that axis removed, as `torch.unbind` (`q, k, v = qkv.unbind(0)`).
    /// Each is a copy recording its own node, so, as for
    /// [`try_split`](Tensor::try_split), a backward through all `len`
    /// slices costs `O(len·n)`.
    ///
    /// # Errors
    ///
    /// [`Error::Axis`] if `dim` is out of range.
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::Tensor;
    ///
    /// let x = Tensor::arange(0.0, 6.0, 1.0).reshape(&[3, 2]);
    /// let rows = x.try_unbind(0)?;
    /// assert_eq!(rows.len(), 3);
    /// assert_eq!(rows[2].to_vec(), vec![4.0, 5.0]);
    /// # Ok::<(), netcl::Error>(())
    /// ```
    #[track_caller]
    pub fn try_unbind(&self, dim: isize) -> Result<Vec<Tensor>> {
        let axis = normalize_axis("unbind", dim, self.ndim())?;
        (0..self.shape()[axis])
            .map(|i| self.pick("unbind", axis, i))
            .collect()
    }

    /// The slice at `index` of `axis` without that axis, checked by the
    /// caller.
    #[track_caller]
    fn pick(&self, op: &'static str, axis: usize, index: usize) -> Result<Tensor> {
        let data = self.read();
        let out = Data::from_view(data.view().index_axis(Axis(axis), index));
        let input = self.shape().to_vec();
        record(op, &[self], out, |_| {
            // d x[.., index, ..]/dx: the gradient at `index`, zero elsewhere.
            with_graph(
                input,
                move |input: &Vec<usize>, grad: Data, grads: &mut InputGrads<'_>| {
                    let grad = grad.view();
                    grads.put(
                        0,
                        Data::build(input, |mut g| {
                            g.index_axis_mut(Axis(axis), index).assign(&grad)
                        }),
                    );
                },
                move |input: &Vec<usize>, grad: &Tensor, grads: &mut GraphGrads<'_>| {
                    let grad = grad.try_unsqueeze(axis as isize)?;
                    grads.set(0, pad_axis(&grad, input, axis, index)?);
                    Ok(())
                },
            )
        })
    }
}

/// `grad` placed at `begin` along `axis` of zeros of shape `shape`, in
/// recorded ops (a `cat` with constant zeros, whose backward narrows): the
/// differentiable backward of a slice.
pub(crate) fn pad_axis(
    grad: &Tensor,
    shape: &[usize],
    axis: usize,
    begin: usize,
) -> Result<Tensor> {
    let len = grad.shape()[axis];
    if len == shape[axis] {
        return Ok(grad.clone());
    }
    let zeros = |n: usize| {
        let mut s = shape.to_vec();
        s[axis] = n;
        Tensor::zeros(&s)
    };
    let before = zeros(begin);
    let after = zeros(shape[axis] - begin - len);
    try_cat(&[&before, grad, &after], axis as isize)
}

/// Concatenates `tensors` along `dim`, as `torch.cat`.
///
/// # Panics
///
/// As [`try_cat`].
#[track_caller]
pub fn cat(tensors: &[&Tensor], dim: isize) -> Tensor {
    or_panic(try_cat(tensors, dim))
}

/// Concatenates `tensors` along `dim` (negative counts from the end), as
/// `torch.cat`: every tensor has the same shape except along `dim`, where
/// lengths may differ (0 included). Each input's gradient is its slice of
/// the output's. Departure from PyTorch: its legacy exception that skips
/// 1-D empty tensors of any other shape is not kept.
///
/// # Errors
///
/// [`Error::InvalidArgument`] if `tensors` is empty; [`Error::Axis`] if
/// `dim` is out of range; [`Error::Rank`] or [`Error::ShapeMismatch`] if
/// the shapes differ outside `dim`; [`Error::ShapeTooLarge`] if the result
/// could not exist; [`Error::TapeMismatch`] if inputs were recorded on
/// different tapes.
///
/// # Examples
///
/// ```
/// use netcl::{Tensor, functional as F};
///
/// let a = Tensor::from_vec(vec![1.0, 2.0], &[2, 1])?.requires_grad_(true);
/// let b = Tensor::from_vec(vec![3.0, 4.0, 5.0, 6.0], &[2, 2])?;
/// let y = F::try_cat(&[&a, &b], -1)?;
/// assert_eq!(y.to_vec(), vec![1.0, 3.0, 4.0, 2.0, 5.0, 6.0]);
/// let w = Tensor::from_vec(vec![1.0, 0.0, 0.0, 2.0, 0.0, 0.0], &[2, 3])?;
/// (&y * &w).sum().backward();
/// assert_eq!(a.grad().unwrap().to_vec(), vec![1.0, 2.0]); // w's first column
/// # Ok::<(), netcl::Error>(())
/// ```
#[track_caller]
pub fn try_cat(tensors: &[&Tensor], dim: isize) -> Result<Tensor> {
    let Some(first) = tensors.first() else {
        return Err(Error::InvalidArgument {
            op: "cat",
            message: "no tensors to concatenate".to_string(),
        });
    };
    let ndim = first.ndim();
    let axis = normalize_axis("cat", dim, ndim)?;
    let mut lengths = Vec::with_capacity(tensors.len());
    let mut total = 0_usize;
    for t in tensors {
        if t.ndim() != ndim {
            return Err(Error::Rank {
                op: "cat",
                expected: "tensors of the same number of dimensions",
                shape: t.shape().to_vec(),
            });
        }
        let differs = (0..ndim).any(|d| d != axis && t.shape()[d] != first.shape()[d]);
        if differs {
            return Err(Error::ShapeMismatch {
                op: "cat",
                lhs: first.shape().to_vec(),
                rhs: t.shape().to_vec(),
            });
        }
        let len = t.shape()[axis];
        total = total.checked_add(len).ok_or_else(|| Error::ShapeTooLarge {
            op: "cat",
            shape: first.shape().to_vec(),
            limit: crate::Tensor::MAX_ELEMENTS,
        })?;
        lengths.push(len);
    }
    let mut shape = first.shape().to_vec();
    shape[axis] = total;
    checked_numel("cat", &shape)?;
    let snapshots: Vec<_> = tensors.iter().map(|t| t.read()).collect();
    let out = Data::build(&shape, |mut out| {
        let mut begin = 0;
        for (data, &len) in snapshots.iter().zip(&lengths) {
            out.slice_axis_mut(Axis(axis), Slice::from(begin..begin + len))
                .assign(&data.view());
            begin += len;
        }
    });
    drop(snapshots);
    record("cat", tensors, out, |_| {
        // d cat(x_0, x_1, ..)/dx_i: the output gradient's slice where x_i
        // was placed.
        with_graph(
            lengths,
            move |lengths: &Vec<usize>, grad: Data, grads: &mut InputGrads<'_>| {
                let grad = grad.view();
                let mut begin = 0;
                for (i, &len) in lengths.iter().enumerate() {
                    if grads.needs_grad(i) {
                        let slice = grad.slice_axis(Axis(axis), Slice::from(begin..begin + len));
                        grads.put(i, Data::from_view(slice));
                    }
                    begin += len;
                }
            },
            move |lengths: &Vec<usize>, grad: &Tensor, grads: &mut GraphGrads<'_>| {
                let mut begin = 0;
                for (i, &len) in lengths.iter().enumerate() {
                    if grads.needs_grad(i) {
                        grads.set(i, grad.try_narrow(axis as isize, begin as isize, len)?);
                    }
                    begin += len;
                }
                Ok(())
            },
        )
    })
}

/// Stacks `tensors` along a new axis `dim`, as `torch.stack`.
///
/// # Panics
///
/// As [`try_stack`].
#[track_caller]
pub fn stack(tensors: &[&Tensor], dim: isize) -> Tensor {
    or_panic(try_stack(tensors, dim))
}

/// Stacks `tensors`, all of one shape, along a new axis `dim` (in
/// `-(ndim + 1)..=ndim`), as `torch.stack`. Each input's gradient is its
/// index along the new axis of the output's.
///
/// # Errors
///
/// [`Error::InvalidArgument`] if `tensors` is empty; [`Error::Axis`] if
/// `dim` is out of range; [`Error::ShapeMismatch`] if the shapes differ;
/// [`Error::ShapeTooLarge`] if the result could not exist;
/// [`Error::TapeMismatch`] if inputs were recorded on different tapes.
///
/// # Examples
///
/// ```
/// use netcl::{Tensor, functional as F};
///
/// let a = Tensor::from_vec(vec![1.0, 2.0], &[2])?;
/// let b = Tensor::from_vec(vec![3.0, 4.0], &[2])?;
/// let y = F::try_stack(&[&a, &b], 1)?;
/// assert_eq!(y.shape(), &[2, 2]);
/// assert_eq!(y.to_vec(), vec![1.0, 3.0, 2.0, 4.0]);
/// # Ok::<(), netcl::Error>(())
/// ```
#[track_caller]
pub fn try_stack(tensors: &[&Tensor], dim: isize) -> Result<Tensor> {
    let Some(first) = tensors.first() else {
        return Err(Error::InvalidArgument {
            op: "stack",
            message: "no tensors to stack".to_string(),
        });
    };
    let axis = normalize_axis("stack", dim, first.ndim() + 1)?;
    if let Some(t) = tensors.iter().find(|t| t.shape() != first.shape()) {
        return Err(Error::ShapeMismatch {
            op: "stack",
            lhs: first.shape().to_vec(),
            rhs: t.shape().to_vec(),
        });
    }
    let mut shape = first.shape().to_vec();
    shape.insert(axis, tensors.len());
    checked_numel("stack", &shape)?;
    let snapshots: Vec<_> = tensors.iter().map(|t| t.read()).collect();
    let out = Data::build(&shape, |mut out| {
        for (k, data) in snapshots.iter().enumerate() {
            out.index_axis_mut(Axis(axis), k).assign(&data.view());
        }
    });
    drop(snapshots);
    record("stack", tensors, out, |_| {
        // d stack(x_0, x_1, ..)/dx_i: the output gradient at index i of
        // the new axis.
        with_graph(
            axis,
            |&axis: &usize, grad: Data, grads: &mut InputGrads<'_>| {
                let grad = grad.view();
                for i in 0..grads.len() {
                    if grads.needs_grad(i) {
                        grads.put(i, Data::from_view(grad.index_axis(Axis(axis), i)));
                    }
                }
            },
            |&axis: &usize, grad: &Tensor, grads: &mut GraphGrads<'_>| {
                for i in 0..grads.len() {
                    if grads.needs_grad(i) {
                        grads.set(i, grad.try_select(axis as isize, i as isize)?);
                    }
                }
                Ok(())
            },
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(values: &[f32], shape: &[usize]) -> Tensor {
        Tensor::from_vec(values.to_vec(), shape).unwrap()
    }

    fn arange(shape: &[usize]) -> Tensor {
        let n: usize = shape.iter().product();
        Tensor::arange(0.0, n as f32, 1.0).reshape(shape)
    }

    /// The address of a tensor's first stored value (views have no
    /// offset: a view of a buffer starts where the buffer does).
    fn base(x: &Tensor) -> *const f32 {
        x.read().view().as_ptr()
    }

    #[test]
    fn permute_unsqueeze_and_squeeze_share_storage() {
        let x = arange(&[2, 3, 4]);
        let p = x.permute(&[2, 0, 1]);
        assert_eq!(base(&p), base(&x));
        // Unit axes on a non-contiguous view stay a view with its strides.
        let u = p.unsqueeze(1).unsqueeze(-1);
        assert_eq!(u.shape(), &[4, 1, 2, 3, 1]);
        assert_eq!(base(&u), base(&x));
        assert_eq!(u.to_vec(), p.to_vec());
        let s = u.squeeze_all();
        assert_eq!(s.shape(), &[4, 2, 3]);
        assert_eq!(base(&s), base(&x));
        assert_eq!(s.to_vec(), p.to_vec());
        // Permuting back is row-major again.
        assert_eq!(p.permute(&[1, 2, 0]).to_vec(), x.to_vec());
    }

    #[test]
    fn squeeze_follows_pytorch_on_edge_shapes() {
        let scalar = Tensor::scalar(3.0);
        assert_eq!(scalar.squeeze(0).shape(), &[] as &[usize]);
        assert_eq!(scalar.squeeze(-1).shape(), &[] as &[usize]);
        assert!(scalar.try_squeeze(1).is_err());
        assert_eq!(scalar.unsqueeze(-1).shape(), &[1]);
        assert_eq!(scalar.flatten(0, -1).shape(), &[1]);
        assert_eq!(
            Tensor::zeros(&[1, 1]).squeeze_all().shape(),
            &[] as &[usize]
        );
        assert_eq!(Tensor::zeros(&[0, 1]).squeeze(1).shape(), &[0]);
    }

    #[test]
    fn bad_arguments_are_errors_naming_the_op() {
        let x = arange(&[2, 3]);
        assert!(matches!(
            x.try_permute(&[0, 0]),
            Err(Error::InvalidArgument { op: "permute", .. })
        ));
        assert!(matches!(
            x.try_permute(&[0]),
            Err(Error::InvalidArgument { op: "permute", .. })
        ));
        assert!(matches!(
            x.try_permute(&[0, 2]),
            Err(Error::Axis { op: "permute", .. })
        ));
        assert!(matches!(
            x.try_unsqueeze(3),
            Err(Error::Axis {
                op: "unsqueeze",
                ..
            })
        ));
        assert!(matches!(
            x.try_flatten(1, 0),
            Err(Error::InvalidArgument { op: "flatten", .. })
        ));
        assert!(matches!(
            x.try_expand(&[3]),
            Err(Error::InvalidArgument { op: "expand", .. })
        ));
        assert!(matches!(
            x.try_expand(&[-1, 2, 3]),
            Err(Error::InvalidArgument { op: "expand", .. })
        ));
        assert!(matches!(
            x.try_expand(&[2, 4]),
            Err(Error::Broadcast { op: "expand", .. })
        ));
        assert!(matches!(
            x.try_expand(&[isize::MAX / 2, 2, 3]),
            Err(Error::ShapeTooLarge { op: "expand", .. })
        ));
        let err = x.try_narrow(1, 2, 2).unwrap_err();
        assert_eq!(
            err.to_string(),
            "narrow: start 2 + length 2 passes the length 3 of axis 1"
        );
        assert!(x.try_narrow(1, -4, 0).is_err());
        assert!(x.try_narrow(1, 3, 0).is_ok());
        assert!(matches!(
            x.try_split(0, 0),
            Err(Error::InvalidArgument { op: "split", .. })
        ));
        assert!(matches!(
            x.try_split_sizes(&[1, 1], 1),
            Err(Error::InvalidArgument {
                op: "split_sizes",
                ..
            })
        ));
        assert!(x.try_split_sizes(&[usize::MAX, 4], 1).is_err());
        assert!(matches!(
            x.try_chunk(0, 0),
            Err(Error::InvalidArgument { op: "chunk", .. })
        ));
        assert!(matches!(
            x.try_select(1, 3),
            Err(Error::Index {
                op: "select",
                bound: 3,
                ..
            })
        ));
        assert!(matches!(
            x.try_select(0, -3),
            Err(Error::Index { op: "select", .. })
        ));
        assert_eq!(x.select(0, -2).to_vec(), vec![0.0, 1.0, 2.0]);
        assert!(x.try_unbind(2).is_err());
        assert!(matches!(
            try_cat(&[], 0),
            Err(Error::InvalidArgument { op: "cat", .. })
        ));
        assert!(matches!(
            try_cat(&[&x, &arange(&[3, 3])], 1),
            Err(Error::ShapeMismatch { op: "cat", .. })
        ));
        assert!(matches!(
            try_cat(&[&x, &arange(&[6])], 0),
            Err(Error::Rank { op: "cat", .. })
        ));
        assert!(matches!(
            try_stack(&[&x, &arange(&[3, 2])], 0),
            Err(Error::ShapeMismatch { op: "stack", .. })
        ));
        assert!(matches!(
            try_stack(&[&x], 3),
            Err(Error::Axis { op: "stack", .. })
        ));
    }

    #[test]
    fn cat_and_stack_of_one_tensor_twice_accumulate_its_gradient() {
        // y = cat(x, x): dL/dx = w[first half] + w[second half].
        let x = t(&[1.0, 2.0], &[2]).requires_grad_(true);
        let w = t(&[1.0, 10.0, 100.0, 1000.0], &[4]);
        (&cat(&[&x, &x], 0) * &w).sum().backward();
        assert_eq!(x.grad().unwrap().to_vec(), vec![101.0, 1010.0]);
        let x = t(&[1.0, 2.0], &[2]).requires_grad_(true);
        // stack along 1: y[i, k] = x[i]; dL/dx[i] = w[i, 0] + w[i, 1].
        (&stack(&[&x, &x], 1) * &w.reshape(&[2, 2]))
            .sum()
            .backward();
        assert_eq!(x.grad().unwrap().to_vec(), vec![11.0, 1100.0]);
    }

    #[test]
    fn split_pieces_take_their_slice_of_the_gradient() {
        // pieces of 2 of [0..5): dL/dx[j] = weight of the piece holding j.
        let x = arange(&[5]).requires_grad_(true);
        let pieces = x.split(2, -1);
        assert_eq!(pieces.len(), 3);
        let loss = pieces
            .iter()
            .enumerate()
            .map(|(k, p)| p.sum() * (k as f32 + 1.0))
            .reduce(|a, b| a + b)
            .unwrap();
        loss.backward();
        assert_eq!(x.grad().unwrap().to_vec(), vec![1.0, 1.0, 2.0, 2.0, 3.0]);
    }

    #[test]
    fn nan_and_infinities_pass_through_layout_ops() {
        let x = t(&[f32::NAN, f32::INFINITY, -1.0, f32::NEG_INFINITY], &[2, 2]);
        let y = cat(&[&x.permute(&[1, 0]), &x], 0).expand(&[2, -1, -1]);
        let v = y.to_vec();
        assert!(v[0].is_nan() && v[1] == -1.0 && v[2] == f32::INFINITY);
        assert_eq!(v[7], f32::NEG_INFINITY);
        assert!(v[8].is_nan());
    }

    #[test]
    fn no_grad_layout_ops_record_nothing() {
        let x = arange(&[2, 3]).requires_grad_(true);
        let _guard = crate::autograd::no_grad();
        let outs = [
            x.permute(&[1, 0]),
            x.unsqueeze(0),
            x.flatten(0, -1),
            x.expand(&[2, 2, 3]),
            x.narrow(1, 0, 2),
            cat(&[&x, &x], 0),
            stack(&[&x, &x], 0),
        ];
        assert!(outs.iter().all(|y| y.grad_fn().is_none()));
        assert!(x.chunk(2, 1).iter().all(|y| y.grad_fn().is_none()));
    }
}
