//! Indexing and masking, as PyTorch spells them: `index_select` and
//! `gather` (methods), [`embedding`] (`F.embedding`), `masked_fill`
//! (method) and [`where_`] (`torch.where`).
//!
//! Indices and masks are `f32` tensors (netcl has one element type): an
//! index holds an integer in `0..bound`, a mask holds 0 or 1, as the
//! [`functional`](crate::functional) docs say. Every index is checked
//! before anything is computed; a bad one is [`Error::Index`] naming its
//! position (row-major in the index tensor), its value and the bound.
//! Indices and masks take no gradient (they are not differentiable), the
//! values they pick from do: the backward of a selection is a scatter-add,
//! so an index repeated `k` times collects `k` gradients.

use std::borrow::Cow;

use ndarray::{Dimension, Zip};

use crate::array::{broadcast_shape, checked_numel, indices, mask, normalize_axis};
use crate::autograd::function::{
    GraphGrads, InputGrads, record, record_with_constants, with_graph,
};
use crate::error::{Error, Result, or_panic};
use crate::tensor::{Data, Tensor};

use super::binary::reduce_to;
use super::graph::{Offsets, scatter_add, sum_to};

/// The values of `data` in row-major order, borrowed when they are stored
/// that way.
fn contiguous(data: &Data) -> Cow<'_, [f32]> {
    match data.as_slice() {
        Some(values) => Cow::Borrowed(values),
        None => Cow::Owned(data.to_vec()),
    }
}

/// The product of `lengths` (a part of an existing tensor's shape, whose
/// non-zero lengths multiply within bounds): 0 if any is 0.
fn product(lengths: &[usize]) -> usize {
    if lengths.contains(&0) {
        0
    } else {
        lengths.iter().product()
    }
}

/// Selection along an axis: index_select, gather.
impl Tensor {
    /// The slices of axis `dim` at `index`, as `torch.index_select`.
    ///
    /// # Panics
    ///
    /// As [`try_index_select`](Tensor::try_index_select).
    #[track_caller]
    pub fn index_select(&self, dim: isize, index: &Tensor) -> Tensor {
        or_panic(self.try_index_select(dim, index))
    }

    /// The slices of axis `dim` (negative counts from the end) at the
    /// positions `index` holds (a 1-D or 0-D `f32` tensor of integers,
    /// repeats allowed), in that order, as `torch.index_select`: the
    /// result has `self`'s shape with axis `dim` of `index.numel()`
    /// elements. The gradient scatter-adds back, so a repeated index
    /// accumulates. Departure from PyTorch: a 0-dimensional `self` is an
    /// error (PyTorch reads it as one element).
    ///
    /// # Errors
    ///
    /// [`Error::Axis`] if `dim` is out of range; [`Error::Rank`] if `index`
    /// has more than one dimension; [`Error::Index`] if an index is not an
    /// integer in `0..self.shape()[dim]`, naming its position and value;
    /// [`Error::ShapeTooLarge`] if the result could not exist.
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::{Error, Tensor};
    ///
    /// let x = Tensor::from_vec(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[3, 2])?.requires_grad_(true);
    /// let index = Tensor::from_vec(vec![2.0, 0.0, 2.0], &[3])?;
    /// let y = x.try_index_select(0, &index)?;
    /// assert_eq!(y.to_vec(), vec![5.0, 6.0, 1.0, 2.0, 5.0, 6.0]);
    /// y.sum().backward();
    /// // Row 2 was picked twice: its gradient collects both.
    /// assert_eq!(x.grad().unwrap().to_vec(), vec![1.0, 1.0, 0.0, 0.0, 2.0, 2.0]);
    ///
    /// let bad = Tensor::from_vec(vec![0.0, 3.0], &[2])?;
    /// let err = x.try_index_select(0, &bad).unwrap_err();
    /// assert!(matches!(err, Error::Index { position: 1, bound: 3, .. }));
    /// # Ok::<(), netcl::Error>(())
    /// ```
    #[track_caller]
    pub fn try_index_select(&self, dim: isize, index: &Tensor) -> Result<Tensor> {
        const OP: &str = "index_select";
        let axis = normalize_axis(OP, dim, self.ndim())?;
        if index.ndim() > 1 {
            return Err(Error::Rank {
                op: OP,
                expected: "a 1-D index",
                shape: index.shape().to_vec(),
            });
        }
        let input = self.shape().to_vec();
        let len = input[axis];
        let ids = indices(OP, index.read().view().iter().copied(), len)?;
        let mut shape = input.clone();
        shape[axis] = ids.len();
        checked_numel(OP, &shape)?;
        // Blocks of `inner` values, `outer` groups of them per axis element.
        let outer = product(&input[..axis]);
        let inner = product(&input[axis + 1..]);
        let data = self.read();
        let out = if product(&shape) == 0 {
            Data::full(&shape, 0.0)
        } else {
            let xs = contiguous(&data);
            let mut out = Vec::with_capacity(outer * ids.len() * inner);
            for o in 0..outer {
                for &id in &ids {
                    let start = (o * len + id) * inner;
                    out.extend_from_slice(&xs[start..start + inner]);
                }
            }
            Data::from_vec(&shape, out)
        };
        drop(data);
        record(OP, &[self], out, |_| {
            // d y[.., k, ..]/d x[.., ids[k], ..] = 1: scatter-add the
            // gradient's slices back to the rows they were read from.
            // Differentiably, a recorded scatter-add (whose backward
            // selects again).
            with_graph(
                (input, ids),
                move |(input, ids): &(Vec<usize>, Vec<usize>),
                      grad: Data,
                      grads: &mut InputGrads<'_>| {
                    let mut gx = vec![0.0; product(input)];
                    if !gx.is_empty() {
                        let g = contiguous(&grad);
                        let mut blocks = g.chunks_exact(inner.max(1));
                        for o in 0..outer {
                            for &id in ids {
                                let start = (o * len + id) * inner;
                                let block = blocks.next().unwrap_or(&[]);
                                for (x, &g) in gx[start..start + inner].iter_mut().zip(block) {
                                    *x += g;
                                }
                            }
                        }
                    }
                    grads.put(0, Data::from_vec(input, gx));
                },
                move |(input, ids): &(Vec<usize>, Vec<usize>),
                      grad: &Tensor,
                      grads: &mut GraphGrads<'_>| {
                    let offsets: Offsets = (0..outer)
                        .flat_map(|o| {
                            ids.iter().flat_map(move |&id| {
                                let start = (o * len + id) * inner;
                                start..start + inner
                            })
                        })
                        .collect();
                    grads.set(0, scatter_add(grad, &offsets, input)?);
                    Ok(())
                },
            )
        })
    }

    /// The values of `self` along `dim` at the positions in `index`, as
    /// `torch.gather`.
    ///
    /// # Panics
    ///
    /// As [`try_gather`](Tensor::try_gather).
    #[track_caller]
    pub fn gather(&self, dim: isize, index: &Tensor) -> Tensor {
        or_panic(self.try_gather(dim, index))
    }

    /// `out[i][j][k] = self[index[i][j][k]][j][k]` for `dim` 0 (and so on
    /// for other dims; negative counts from the end), as `torch.gather`:
    /// `index` has `self`'s number of dimensions and, on every axis but
    /// `dim`, at most `self`'s length; the result has `index`'s shape. The
    /// gradient scatter-adds back (repeated indices accumulate). Departure
    /// from PyTorch: a 0-dimensional `self` is an error.
    ///
    /// # Errors
    ///
    /// [`Error::Axis`] if `dim` is out of range; [`Error::Rank`] if `index`
    /// has another number of dimensions; [`Error::ShapeMismatch`] if
    /// `index` is longer than `self` on an axis other than `dim`;
    /// [`Error::Index`] if an index is not an integer in
    /// `0..self.shape()[dim]`, naming its position and value.
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::Tensor;
    ///
    /// let x = Tensor::from_vec(vec![1.0, 2.0, 3.0, 4.0], &[2, 2])?.requires_grad_(true);
    /// let index = Tensor::from_vec(vec![0.0, 0.0, 1.0, 0.0], &[2, 2])?;
    /// let y = x.try_gather(1, &index)?;
    /// assert_eq!(y.to_vec(), vec![1.0, 1.0, 4.0, 3.0]);
    /// y.sum().backward();
    /// assert_eq!(x.grad().unwrap().to_vec(), vec![2.0, 0.0, 1.0, 1.0]);
    /// # Ok::<(), netcl::Error>(())
    /// ```
    #[track_caller]
    pub fn try_gather(&self, dim: isize, index: &Tensor) -> Result<Tensor> {
        const OP: &str = "gather";
        let ndim = self.ndim();
        let axis = normalize_axis(OP, dim, ndim)?;
        let input = self.shape().to_vec();
        let shape = index.shape().to_vec();
        if shape.len() != ndim {
            return Err(Error::Rank {
                op: OP,
                expected: "an index with the input's number of dimensions",
                shape,
            });
        }
        if (0..ndim).any(|d| d != axis && shape[d] > input[d]) {
            return Err(Error::ShapeMismatch {
                op: OP,
                lhs: input,
                rhs: shape,
            });
        }
        let ids = indices(OP, index.read().view().iter().copied(), input[axis])?;
        let offsets = gather_offsets(&input, &shape, axis, &ids);
        let data = self.read();
        let xs = contiguous(&data);
        let out = Data::collect(&shape, offsets.iter().map(|&at| xs[at]));
        drop(xs);
        drop(data);
        record(OP, &[self], out, |_| {
            // d out[p]/d x[offsets[p]] = 1: scatter-add the gradient.
            // Differentiably, a recorded scatter-add (whose backward
            // gathers again).
            with_graph(
                (input, offsets),
                |(input, offsets): &(Vec<usize>, Vec<usize>),
                 grad: Data,
                 grads: &mut InputGrads<'_>| {
                    let mut gx = vec![0.0; product(input)];
                    let g = contiguous(&grad);
                    for (&at, &g) in offsets.iter().zip(g.iter()) {
                        gx[at] += g;
                    }
                    grads.put(0, Data::from_vec(input, gx));
                },
                |(input, offsets): &(Vec<usize>, Vec<usize>),
                 grad: &Tensor,
                 grads: &mut GraphGrads<'_>| {
                    let offsets: Offsets = offsets.as_slice().into();
                    grads.set(0, scatter_add(grad, &offsets, input)?);
                    Ok(())
                },
            )
        })
    }
}

/// For each position of an index of `shape` (row-major), the row-major
/// offset in an input of shape `input` that `gather` along `axis` reads:
/// the position itself with its `axis` coordinate replaced by the index.
fn gather_offsets(input: &[usize], shape: &[usize], axis: usize, ids: &[usize]) -> Vec<usize> {
    let mut offsets = Vec::with_capacity(ids.len());
    if ids.is_empty() {
        return offsets;
    }
    // Row-major strides of the input (its lengths are all non-zero here:
    // the index is non-empty and fits inside it but along `axis`, whose
    // length bounds a valid index).
    let mut strides = vec![1; input.len()];
    for d in (0..input.len().saturating_sub(1)).rev() {
        strides[d] = strides[d + 1] * input[d + 1];
    }
    let mut position = vec![0; shape.len()];
    let mut base = 0;
    for &id in ids {
        offsets.push(base + id * strides[axis]);
        // The next position, as an odometer; `base` is the offset of the
        // position without its `axis` coordinate.
        for d in (0..shape.len()).rev() {
            position[d] += 1;
            let stride = if d == axis { 0 } else { strides[d] };
            base += stride;
            if position[d] < shape[d] {
                break;
            }
            base -= stride * shape[d];
            position[d] = 0;
        }
    }
    offsets
}

/// The rows of `weight` at the ids in `input`, as `F.embedding`.
///
/// # Panics
///
/// As [`try_embedding`].
#[track_caller]
pub fn embedding(input: &Tensor, weight: &Tensor) -> Tensor {
    or_panic(try_embedding(input, weight))
}

/// The rows of `weight` (`[num_embeddings, embedding_dim]`) at the ids in
/// `input` (an `f32` tensor of integers, any shape), as
/// `F.embedding(input, weight)`: the result has shape
/// `[*input.shape(), embedding_dim]`. The gradient with respect to
/// `weight` scatter-adds each output row into the row it was read from, so
/// an id repeated `k` times collects `k` gradients; `input` takes none.
/// Departure from PyTorch: no `padding_idx`, `max_norm` or `sparse`
/// (zero a padding row's gradient by masking instead).
///
/// # Errors
///
/// [`Error::Rank`] if `weight` is not 2-D; [`Error::Index`] if an id is
/// not an integer in `0..num_embeddings`, naming its position and value;
/// [`Error::ShapeTooLarge`] if the result could not exist.
///
/// # Examples
///
/// ```
/// use netcl::{Error, Tensor, functional as F};
///
/// let weight = Tensor::from_vec(vec![0.0, 0.5, 1.0, 1.5, 2.0, 2.5], &[3, 2])?.requires_grad_(true);
/// let ids = Tensor::from_vec(vec![2.0, 0.0, 2.0, 2.0], &[2, 2])?;
/// let y = F::try_embedding(&ids, &weight)?;
/// assert_eq!(y.shape(), &[2, 2, 2]);
/// assert_eq!(y.to_vec()[..4], [2.0, 2.5, 0.0, 0.5]);
/// y.sum().backward();
/// // Id 2 appears three times, id 1 never.
/// assert_eq!(weight.grad().unwrap().to_vec(), vec![1.0, 1.0, 0.0, 0.0, 3.0, 3.0]);
///
/// let bad = Tensor::from_vec(vec![1.0, 3.0], &[2])?;
/// let err = F::try_embedding(&bad, &weight).unwrap_err();
/// assert_eq!(
///     err.to_string(),
///     "embedding: index 3 at position 1 is out of range: expected an integer in 0..3"
/// );
/// # Ok::<(), netcl::Error>(())
/// ```
#[track_caller]
pub fn try_embedding(input: &Tensor, weight: &Tensor) -> Result<Tensor> {
    const OP: &str = "embedding";
    if weight.ndim() != 2 {
        return Err(Error::Rank {
            op: OP,
            expected: "a 2-D weight [num_embeddings, embedding_dim]",
            shape: weight.shape().to_vec(),
        });
    }
    let (num, width) = (weight.shape()[0], weight.shape()[1]);
    let ids = indices(OP, input.read().view().iter().copied(), num)?;
    let shape = [input.shape(), &[width]].concat();
    checked_numel(OP, &shape)?;
    let data = weight.read();
    let out = if product(&shape) == 0 {
        Data::full(&shape, 0.0)
    } else {
        let w = contiguous(&data);
        let mut out = Vec::with_capacity(ids.len() * width);
        for &id in &ids {
            out.extend_from_slice(&w[id * width..(id + 1) * width]);
        }
        Data::from_vec(&shape, out)
    };
    drop(data);
    record(OP, &[weight], out, |_| {
        // d out[p, :]/d weight[ids[p], :] = 1: scatter-add each gradient
        // row into its id's row.
        // Differentiably, a recorded scatter-add (whose backward selects
        // the rows again).
        with_graph(
            ids,
            move |ids: &Vec<usize>, grad: Data, grads: &mut InputGrads<'_>| {
                let mut gw = vec![0.0; num * width];
                if width != 0 {
                    let g = contiguous(&grad);
                    for (&id, row) in ids.iter().zip(g.chunks_exact(width)) {
                        for (w, &g) in gw[id * width..(id + 1) * width].iter_mut().zip(row) {
                            *w += g;
                        }
                    }
                }
                grads.put(0, Data::from_vec(&[num, width], gw));
            },
            move |ids: &Vec<usize>, grad: &Tensor, grads: &mut GraphGrads<'_>| {
                let offsets: Offsets = ids
                    .iter()
                    .flat_map(|&id| id * width..(id + 1) * width)
                    .collect();
                grads.set(0, scatter_add(grad, &offsets, &[num, width])?);
                Ok(())
            },
        )
    })
}

/// Masking: masked_fill.
impl Tensor {
    /// `value` where `mask` is 1, `self` elsewhere, as
    /// `torch.Tensor.masked_fill`.
    ///
    /// # Panics
    ///
    /// As [`try_masked_fill`](Tensor::try_masked_fill).
    #[track_caller]
    pub fn masked_fill(&self, mask: &Tensor, value: f32) -> Tensor {
        or_panic(self.try_masked_fill(mask, value))
    }

    /// `value` where `mask` (an `f32` tensor of 0 and 1) is 1, `self`
    /// elsewhere, as `torch.Tensor.masked_fill`: `mask` and `self`
    /// broadcast together (a `[T, T]` causal mask over `[B, H, T, T]`
    /// scores). `value` may be infinite or NaN (`f32::NEG_INFINITY` for
    /// attention). The gradient passes where the mask is 0 and is 0 where
    /// it is 1 (summed back to `self`'s shape).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] if `mask` holds a value other than 0 or
    /// 1, naming its position and value; [`Error::Broadcast`] if the shapes
    /// do not broadcast; [`Error::ShapeTooLarge`] if their broadcast could
    /// not exist. With [anomaly detection](crate::autograd::detect_anomaly)
    /// on, a non-finite `value` is not an anomaly: it is the argument (an
    /// attention mask's `-inf`), not a value the op produced.
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::Tensor;
    ///
    /// let scores = Tensor::from_vec(vec![1.0, 2.0, 3.0, 4.0], &[2, 2])?.requires_grad_(true);
    /// let causal = Tensor::from_vec(vec![0.0, 1.0, 0.0, 0.0], &[2, 2])?;
    /// let y = scores.try_masked_fill(&causal, f32::NEG_INFINITY)?;
    /// assert_eq!(y.to_vec(), vec![1.0, f32::NEG_INFINITY, 3.0, 4.0]);
    /// y.softmax(-1).sum().backward();
    /// assert_eq!(scores.grad().unwrap().to_vec()[1], 0.0);
    /// # Ok::<(), netcl::Error>(())
    /// ```
    #[track_caller]
    pub fn try_masked_fill(&self, mask: &Tensor, value: f32) -> Result<Tensor> {
        const OP: &str = "masked_fill";
        let m = mask.read().into_data();
        crate::array::mask(OP, m.view().iter().copied())?;
        let shape = broadcast_shape(OP, self.shape(), m.shape())?;
        let x = self.read();
        let out = {
            let (xv, mv) = (x.view(), m.view());
            let xv = xv.broadcast(shape.clone()).expect("checked broadcast");
            let mv = mv.broadcast(shape.clone()).expect("checked broadcast");
            Data::build(shape.slice(), |out| {
                Zip::from(out)
                    .and(&xv)
                    .and(&mv)
                    .for_each(|o, &x, &m| *o = if m == 1.0 { value } else { x })
            })
        };
        drop(x);
        let input = self.shape().to_vec();
        record_with_constants(OP, &[self], &[value], out, |_| {
            // d out/dx = 0 where the mask is 1, else 1.
            // Differentiably, the gradient masked by a recorded masked_fill
            // (whose backward masks again).
            with_graph(
                (m, input),
                |(m, input): &(Data, Vec<usize>), grad: Data, grads: &mut InputGrads<'_>| {
                    let g = grad.zip_into(m, |g, m| if m == 1.0 { 0.0 } else { g });
                    grads.put(0, reduce_to(g, input));
                },
                |(m, input): &(Data, Vec<usize>), grad: &Tensor, grads: &mut GraphGrads<'_>| {
                    let mask = Tensor::from_data(m.clone());
                    grads.set(0, sum_to(&grad.try_masked_fill(&mask, 0.0)?, input)?);
                    Ok(())
                },
            )
        })
    }

    /// `self` where `condition` is 1, `other` elsewhere: PyTorch's
    /// `self.where(condition, other)`; the same as
    /// [`where_(condition, self, other)`](where_).
    ///
    /// # Panics
    ///
    /// As [`try_where_`](Tensor::try_where_).
    #[track_caller]
    pub fn where_(&self, condition: &Tensor, other: &Tensor) -> Tensor {
        or_panic(try_where_(condition, self, other))
    }

    /// `self` where `condition` is 1, `other` elsewhere: PyTorch's
    /// `self.where(condition, other)`, the same as
    /// [`try_where_(condition, self, other)`](try_where_).
    ///
    /// # Errors
    ///
    /// As [`try_where_`](try_where_).
    #[track_caller]
    pub fn try_where_(&self, condition: &Tensor, other: &Tensor) -> Result<Tensor> {
        try_where_(condition, self, other)
    }
}

/// `input` where `condition` is 1, `other` elsewhere, as `torch.where`.
///
/// # Panics
///
/// As [`try_where_`].
#[track_caller]
pub fn where_(condition: &Tensor, input: &Tensor, other: &Tensor) -> Tensor {
    or_panic(try_where_(condition, input, other))
}

/// `input` where `condition` (an `f32` tensor of 0 and 1) is 1, `other`
/// elsewhere, as `torch.where(condition, input, other)` (named `where_`:
/// `where` is a Rust keyword). The three broadcast together; each
/// operand's gradient is the output's where it was chosen, 0 elsewhere,
/// summed back to its shape.
///
/// # Errors
///
/// [`Error::InvalidArgument`] if `condition` holds a value other than 0
/// or 1, naming its position and value; [`Error::Broadcast`] if the shapes
/// do not broadcast; [`Error::ShapeTooLarge`] if their broadcast could not
/// exist; [`Error::TapeMismatch`] if `input` and `other` were recorded on
/// different tapes.
///
/// # Examples
///
/// ```
/// use netcl::{Tensor, functional as F};
///
/// let cond = Tensor::from_vec(vec![1.0, 0.0, 1.0], &[3])?;
/// let a = Tensor::from_vec(vec![1.0, 2.0, 3.0], &[3])?.requires_grad_(true);
/// let b = Tensor::scalar(0.0).requires_grad_(true);
/// let y = F::try_where_(&cond, &a, &b)?;
/// assert_eq!(y.to_vec(), vec![1.0, 0.0, 3.0]);
/// y.sum().backward();
/// assert_eq!(a.grad().unwrap().to_vec(), vec![1.0, 0.0, 1.0]);
/// assert_eq!(b.grad().unwrap().item(), 1.0); // chosen once
/// # Ok::<(), netcl::Error>(())
/// ```
#[track_caller]
pub fn try_where_(condition: &Tensor, input: &Tensor, other: &Tensor) -> Result<Tensor> {
    const OP: &str = "where";
    let c = condition.read().into_data();
    mask(OP, c.view().iter().copied())?;
    let shape = broadcast_shape(OP, c.shape(), input.shape())?;
    let shape = broadcast_shape(OP, shape.slice(), other.shape())?;
    let operands = input.read_pair(other);
    let (a, b) = operands.get();
    let out = {
        let (cv, av, bv) = (c.view(), a.view(), b.view());
        let cv = cv.broadcast(shape.clone()).expect("checked broadcast");
        let av = av.broadcast(shape.clone()).expect("checked broadcast");
        let bv = bv.broadcast(shape.clone()).expect("checked broadcast");
        Data::build(shape.slice(), |out| {
            Zip::from(out)
                .and(&cv)
                .and(&av)
                .and(&bv)
                .for_each(|o, &c, &a, &b| *o = if c == 1.0 { a } else { b })
        })
    };
    drop(operands);
    let shapes = (input.shape().to_vec(), other.shape().to_vec());
    record(OP, &[input, other], out, |_| {
        // d out/d input = condition, d out/d other = 1 - condition.
        // Differentiably, the gradient split by a recorded `where` (whose
        // backward splits again).
        with_graph(
            (c, shapes),
            |(c, shapes): &(Data, (Vec<usize>, Vec<usize>)),
             grad: Data,
             grads: &mut InputGrads<'_>| {
                let g_other = grads.needs_grad(1).then(|| {
                    let g = grad
                        .clone()
                        .zip_into(c, |g, c| if c == 1.0 { 0.0 } else { g });
                    reduce_to(g, &shapes.1)
                });
                if grads.needs_grad(0) {
                    let g = grad.zip_into(c, |g, c| if c == 1.0 { g } else { 0.0 });
                    grads.put(0, reduce_to(g, &shapes.0));
                }
                if let Some(g) = g_other {
                    grads.put(1, g);
                }
            },
            |(c, shapes): &(Data, (Vec<usize>, Vec<usize>)),
             grad: &Tensor,
             grads: &mut GraphGrads<'_>| {
                let condition = Tensor::from_data(c.clone());
                let zero = Tensor::zeros(&[]);
                if grads.needs_grad(0) {
                    let g = try_where_(&condition, grad, &zero)?;
                    grads.set(0, sum_to(&g, &shapes.0)?);
                }
                if grads.needs_grad(1) {
                    let g = try_where_(&condition, &zero, grad)?;
                    grads.set(1, sum_to(&g, &shapes.1)?);
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

    #[test]
    fn bad_indices_name_the_position_the_value_and_the_bound() {
        let x = t(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3]);
        for (bad, value) in [(3.0, 3.0), (-1.0, -1.0), (0.5, 0.5), (f32::NAN, f32::NAN)] {
            let index = t(&[0.0, bad], &[2]);
            let err = x.try_index_select(1, &index).unwrap_err();
            match err {
                Error::Index {
                    op: "index_select",
                    position: 1,
                    value: v,
                    bound: 3,
                } => assert!(v == value || (v.is_nan() && value.is_nan())),
                other => panic!("unexpected {other:?}"),
            }
            let gather_index = t(&[0.0, 1.0, bad, 0.0], &[2, 2]);
            assert!(matches!(
                x.try_gather(1, &gather_index),
                Err(Error::Index {
                    op: "gather",
                    position: 2,
                    bound: 3,
                    ..
                })
            ));
            assert!(matches!(
                try_embedding(&index, &x),
                Err(Error::Index {
                    op: "embedding",
                    position: 1,
                    bound: 2,
                    ..
                })
            ));
        }
        let err = x.try_index_select(0, &t(&[7.0], &[1])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "index_select: index 7 at position 0 is out of range: expected an integer in 0..2"
        );
    }

    #[test]
    fn masks_other_than_zero_and_one_are_rejected() {
        let x = t(&[1.0, 2.0], &[2]);
        for bad in [0.5, 2.0, -1.0, f32::NAN] {
            let m = t(&[0.0, bad], &[2]);
            let err = x.try_masked_fill(&m, 0.0).unwrap_err();
            assert!(
                matches!(
                    err,
                    Error::InvalidArgument {
                        op: "masked_fill",
                        ..
                    }
                ),
                "{err}"
            );
            assert!(err.to_string().contains("position 1"), "{err}");
            assert!(matches!(
                try_where_(&m, &x, &x),
                Err(Error::InvalidArgument { op: "where", .. })
            ));
        }
    }

    #[test]
    fn nan_propagates_through_selection_and_masking() {
        // NaN is a value like any other: picked, it stays NaN; masked
        // over, it is replaced (as PyTorch).
        let x = t(&[f32::NAN, 1.0], &[2]);
        let y = x.index_select(0, &t(&[0.0, 0.0], &[2])).to_vec();
        assert!(y.iter().all(|v| v.is_nan()));
        let m = t(&[0.0, 1.0], &[2]);
        let y = x.masked_fill(&m, f32::INFINITY).to_vec();
        assert!(y[0].is_nan() && y[1] == f32::INFINITY);
        let y = where_(&m, &t(&[1.0, f32::NAN], &[2]), &x).to_vec();
        assert!(y[0].is_nan() && y[1].is_nan());
    }

    #[test]
    fn nan_gradient_passes_where_selected() {
        // d(Σ w·gather(x))/dx with w = [NaN, 1]: x[0] collects the NaN.
        let x = t(&[1.0, 2.0], &[2]).requires_grad_(true);
        let y = x.gather(0, &t(&[0.0, 1.0], &[2]));
        (&y * &t(&[f32::NAN, 1.0], &[2])).sum().backward();
        let g = x.grad().unwrap().to_vec();
        assert!(g[0].is_nan() && g[1] == 1.0);
    }

    #[test]
    fn gather_offsets_walk_the_index_in_row_major_order() {
        // input [2, 3], index [2, 2] along axis 1: row r reads r*3 + id.
        let offsets = gather_offsets(&[2, 3], &[2, 2], 1, &[2, 0, 1, 1]);
        assert_eq!(offsets, vec![2, 0, 4, 4]);
        // along axis 0: column c reads id*3 + c.
        let offsets = gather_offsets(&[2, 3], &[1, 3], 0, &[1, 0, 1]);
        assert_eq!(offsets, vec![3, 1, 5]);
    }

    #[test]
    fn embedding_backward_accumulates_repeated_ids() {
        // Σ over outputs of row ids: id k's gradient is its count.
        let w = Tensor::zeros(&[4, 3]).requires_grad_(true);
        let ids = t(&[3.0, 3.0, 3.0, 1.0, 3.0], &[5]);
        embedding(&ids, &w).sum().backward();
        let g = w.grad().unwrap().to_vec();
        assert_eq!(g, [[0.0; 3], [1.0; 3], [0.0; 3], [4.0; 3]].concat());
    }
}
