//! Matrix product: 2-D, and batched over leading dimensions that broadcast.

use std::borrow::Cow;

use ndarray::{ArrayD, ArrayViewD, ArrayViewMutD, Axis, Dimension, Ix2, Ix3, IxDyn};

use crate::array::checked_numel;
use crate::array::{broadcast_shape, reduce_to_shape, reshape_owned};
use crate::autograd::function::{Backprop, GraphGrads, InputGrads, record};
use crate::error::{Error, Result, or_panic};
use crate::ops::gemm::{gemm, gemm_acc_into, gemm_data, gemm_into};
use crate::ops::graph::sum_to;
use crate::tensor::{Data, Tensor};

/// The matrices of a batched operand at one batch index.
fn matrix_at<'a>(mut view: ArrayViewD<'a, f32>, index: &[usize]) -> ndarray::ArrayView2<'a, f32> {
    for &i in index {
        view = view.index_axis_move(Axis(0), i);
    }
    view.into_dimensionality::<Ix2>()
        .expect("two trailing axes")
}

/// `a · b` over the last two axes, broadcasting the leading (batch) axes.
/// Shapes have been validated by [`check_shapes`].
fn batched_matmul(a: ArrayViewD<'_, f32>, b: ArrayViewD<'_, f32>) -> ArrayD<f32> {
    let (an, bn) = (a.ndim(), b.ndim());
    if an == 2 && bn == 2 {
        let a = a.into_dimensionality::<Ix2>().expect("2-D");
        let b = b.into_dimensionality::<Ix2>().expect("2-D");
        return gemm(a, b).into_dyn();
    }
    batched(a, b)
}

/// The same product into new tensor values; a 2-D product is written by
/// the kernel straight into them.
fn matmul_data(a: &Data, b: &Data) -> Data {
    if a.shape().len() == 2 && b.shape().len() == 2 {
        let shape = [a.shape()[0], b.shape()[1]];
        return gemm_data(a.view2(), b.view2(), &shape);
    }
    Data::build(&product_shape(a.shape(), b.shape()), |out| {
        batched_into(a.view(), b.view(), out)
    })
}

/// `x` as a matrix of rows, from its values: a 2-D view for a matrix (the
/// common case, without a dynamic-rank view), else as [`as_rows`].
fn rows_of(x: &Data) -> ndarray::CowArray<'_, f32, Ix2> {
    if x.shape().len() == 2 {
        return x.view2().into();
    }
    as_rows(x.view())
}

/// The shape of the product of operands of shapes `a` and `b` (validated
/// by [`check_shapes`]).
fn product_shape(a: &[usize], b: &[usize]) -> Vec<usize> {
    let (an, bn) = (a.len(), b.len());
    let batch =
        broadcast_shape("matmul", &a[..an - 2], &b[..bn - 2]).expect("validated in forward");
    let mut shape = batch.slice().to_vec();
    shape.extend([a[an - 2], b[bn - 1]]);
    shape
}

/// [`batched_matmul`] with at least one operand of more than 2 axes.
fn batched(a: ArrayViewD<'_, f32>, b: ArrayViewD<'_, f32>) -> ArrayD<f32> {
    let mut out = ArrayD::zeros(IxDyn(&product_shape(a.shape(), b.shape())));
    batched_into(a, b, out.view_mut());
    out
}

/// [`batched`] into `out`, of the product's shape and zeroed.
fn batched_into(a: ArrayViewD<'_, f32>, b: ArrayViewD<'_, f32>, mut out: ArrayViewMutD<'_, f32>) {
    let (an, bn) = (a.ndim(), b.ndim());
    let batch = broadcast_shape("matmul", &a.shape()[..an - 2], &b.shape()[..bn - 2])
        .expect("validated in forward");
    let (m, k, n) = (a.shape()[an - 2], a.shape()[an - 1], b.shape()[bn - 1]);
    let with = |rows, cols| {
        let mut shape = batch.slice().to_vec();
        shape.extend([rows, cols]);
        IxDyn(&shape)
    };
    let a = a.broadcast(with(m, k)).expect("batch axes broadcast");
    let b = b.broadcast(with(k, n)).expect("batch axes broadcast");
    if out.is_empty() || k == 0 {
        // Zeros, without visiting every (possibly very many) empty batch
        // entry.
        return;
    }
    // The common case, batch axes whose strides allow it (no broadcast
    // along a batch axis, any layout of the matrices): one batch axis,
    // walked without building a dynamic-rank index per matrix.
    if let (Some(a3), Some(b3), Some(c3)) = (
        merged_batch(a.view()),
        merged_batch(b.view()),
        merged_batch(out.view_mut()),
    ) {
        let mut c3 = c3;
        for ((a, b), c) in a3
            .outer_iter()
            .zip(b3.outer_iter())
            .zip(c3.outer_iter_mut())
        {
            gemm_into(a, b, c);
        }
        return;
    }
    for index in ndarray::indices(batch.clone()) {
        let index = index.slice();
        let mut c = out.view_mut();
        for &i in index {
            c = c.index_axis_move(Axis(0), i);
        }
        let c = c.into_dimensionality::<Ix2>().expect("two trailing axes");
        gemm_into(matrix_at(a.view(), index), matrix_at(b.view(), index), c);
    }
}

/// `view` (`[.., rows, cols]`, at least 3 axes) as `[batch, rows, cols]`
/// with its batch axes merged into one, if their strides allow it without
/// a copy.
fn merged_batch<S>(mut view: ndarray::ArrayBase<S, IxDyn>) -> Option<ndarray::ArrayBase<S, Ix3>>
where
    S: ndarray::RawData<Elem = f32>,
{
    let batch_axes = view.ndim().checked_sub(2)?;
    for axis in 1..batch_axes {
        // Merges axis - 1 (outer) into axis (inner): axis - 1 is left with
        // length 1.
        if !view.merge_axes(Axis(axis - 1), Axis(axis)) {
            return None;
        }
    }
    for _ in 1..batch_axes {
        view = view.index_axis_move(Axis(0), 0);
    }
    view.into_dimensionality::<Ix3>().ok()
}

fn check_shapes(a: &[usize], b: &[usize]) -> Result<()> {
    for shape in [a, b] {
        if shape.len() < 2 {
            return Err(Error::Rank {
                op: "matmul",
                expected: "at least 2 dimensions",
                shape: shape.to_vec(),
            });
        }
    }
    let (lhs_inner, rhs_inner) = (a[a.len() - 1], b[b.len() - 2]);
    if lhs_inner != rhs_inner {
        return Err(Error::MatmulShape {
            lhs: a.to_vec(),
            rhs: b.to_vec(),
            lhs_inner,
            rhs_inner,
        });
    }
    let batch =
        broadcast_shape("matmul", &a[..a.len() - 2], &b[..b.len() - 2]).map_err(
            |err| match err {
                Error::Broadcast { .. } => Error::Broadcast {
                    op: "matmul",
                    lhs: a.to_vec(),
                    rhs: b.to_vec(),
                },
                other => other,
            },
        )?;
    // The product of empty operands can have a shape too large to exist.
    let mut out = batch.slice().to_vec();
    out.extend([a[a.len() - 2], b[b.len() - 1]]);
    checked_numel("matmul", &out)?;
    Ok(())
}

/// The view with its last two axes swapped (no copy).
fn transposed(array: &Data) -> ArrayViewD<'_, f32> {
    let mut view = array.view();
    let n = view.ndim();
    view.swap_axes(n - 2, n - 1);
    view
}

impl Tensor {
    /// Matrix product.
    ///
    /// # Panics
    ///
    /// As [`try_matmul`](Tensor::try_matmul).
    #[track_caller]
    pub fn matmul(&self, rhs: &Tensor) -> Tensor {
        or_panic(self.try_matmul(rhs))
    }

    /// Matrix product over the last two axes: `[.., m, k] · [.., k, n]` gives
    /// `[.., m, n]`, the leading (batch) axes broadcasting as NumPy does.
    ///
    /// A 1-D operand follows PyTorch's `torch.matmul`: two vectors give
    /// their dot product (a 0-D tensor); a vector on the left is a row
    /// `[1, k]` and on the right a column `[k, 1]`, whose added axis is
    /// removed from the result (`[k] · [.., k, n]` is `[.., n]`,
    /// `[.., m, k] · [k]` is `[.., m]`). Every form runs through the same
    /// matrix kernel.
    ///
    /// # Errors
    ///
    /// [`Error::Rank`] if an operand is 0-dimensional,
    /// [`Error::MatmulShape`] if the inner dimensions differ,
    /// [`Error::Broadcast`] if the batch axes are incompatible,
    /// [`Error::ShapeTooLarge`] if the result could not exist (products of
    /// empty operands only: see [`Tensor::MAX_ELEMENTS`]).
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::Tensor;
    ///
    /// let a = Tensor::from_vec(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3])?;
    /// let b = Tensor::ones(&[3, 1]);
    /// assert_eq!(a.try_matmul(&b)?.to_vec(), vec![6.0, 15.0]);
    ///
    /// // A batch of 4 matrices times one shared matrix.
    /// let batch = Tensor::ones(&[4, 2, 3]);
    /// assert_eq!(batch.try_matmul(&b)?.shape(), &[4, 2, 1]);
    ///
    /// let err = a.try_matmul(&a).unwrap_err();
    /// assert_eq!(
    ///     err.to_string(),
    ///     "matmul: cannot multiply [2, 3] by [2, 3] (inner dimensions 3 and 2 differ)"
    /// );
    /// # Ok::<(), netcl::Error>(())
    /// ```
    #[track_caller]
    pub fn try_matmul(&self, rhs: &Tensor) -> Result<Tensor> {
        if self.ndim() < 2 || rhs.ndim() < 2 {
            return self.matmul_vector(rhs);
        }
        check_shapes(self.shape(), rhs.shape())?;
        let (a, b) = self.read_pair(rhs).into_pair();
        let out = matmul_data(&a, &b);
        record("matmul", &[self, rhs], out, move |_| MatmulBackward {
            a,
            b,
        })
    }
}

impl Tensor {
    /// [`try_matmul`](Tensor::try_matmul) with a 1-D operand: the vector is
    /// made a row (left) or a column (right), multiplied as matrices, and
    /// the added axis removed; the reshapes are recorded, so the backward
    /// is the matrix product's.
    #[track_caller]
    fn matmul_vector(&self, rhs: &Tensor) -> Result<Tensor> {
        let (a, b) = (self.shape(), rhs.shape());
        for shape in [a, b] {
            if shape.is_empty() {
                return Err(Error::Rank {
                    op: "matmul",
                    expected: "at least 1 dimension",
                    shape: shape.to_vec(),
                });
            }
        }
        let (lhs_inner, rhs_inner) = (a[a.len() - 1], b[b.len().saturating_sub(2)]);
        if lhs_inner != rhs_inner {
            return Err(Error::MatmulShape {
                lhs: a.to_vec(),
                rhs: b.to_vec(),
                lhs_inner,
                rhs_inner,
            });
        }
        let lhs = if a.len() == 1 {
            self.try_reshape(&[1, a[0]])?
        } else {
            self.clone()
        };
        let rhs2 = if b.len() == 1 {
            rhs.try_reshape(&[b[0], 1])?
        } else {
            rhs.clone()
        };
        let product = lhs.try_matmul(&rhs2)?;
        // Remove the added axes: -2 for a row on the left, -1 for a column
        // on the right.
        let mut shape = product.shape().to_vec();
        let n = shape.len();
        if b.len() == 1 {
            shape.remove(n - 1);
        }
        if a.len() == 1 {
            shape.remove(n - 2);
        }
        product.try_reshape(&shape)
    }
}

/// d(a·b)/da = grad · bᵀ, d(a·b)/db = aᵀ · grad, each summed over the batch
/// axes its operand was broadcast along.
struct MatmulBackward {
    a: Data,
    b: Data,
}

impl Backprop for MatmulBackward {
    fn backward(&self, grad: Data, grads: &mut InputGrads<'_>) {
        let grad = grad.view();
        if grads.needs_grad(0) {
            let g = batched_matmul(grad.clone(), transposed(&self.b));
            grads.set(0, reduce_to_shape(g, self.a.shape()));
        }
        if grads.needs_grad(1) {
            let g = batched_matmul(transposed(&self.a), grad);
            grads.set(1, reduce_to_shape(g, self.b.shape()));
        }
    }

    fn backward_graph(&self, grad: &Tensor, grads: &mut GraphGrads<'_>) -> Result<()> {
        if self.a.shape().len() == 2 && self.b.shape().len() == 2 {
            // dA = G · Bᵀ, dB = Aᵀ · G, each one op with row-major results.
            if grads.needs_grad(0) {
                let b = grads.input(1, &self.b)?;
                grads.set(0, matmul_t(grad, &b, Transposed::Rhs)?);
            }
            if grads.needs_grad(1) {
                let a = grads.input(0, &self.a)?;
                grads.set(1, matmul_t(&a, grad, Transposed::Lhs)?);
            }
            return Ok(());
        }
        if grads.needs_grad(0) {
            let b = grads.input(1, &self.b)?;
            let g = grad.try_matmul(&b.try_transpose(-2, -1)?)?;
            grads.set(0, sum_to(&g, self.a.shape())?);
        }
        if grads.needs_grad(1) {
            let a = grads.input(0, &self.a)?;
            let g = a.try_transpose(-2, -1)?.try_matmul(grad)?;
            grads.set(1, sum_to(&g, self.b.shape())?);
        }
        Ok(())
    }
}

/// Which operand of a [`matmul_t`] product is read transposed.
#[derive(Clone, Copy)]
pub(crate) enum Transposed {
    /// `aᵀ · b`.
    Lhs,
    /// `a · bᵀ`.
    Rhs,
}

/// `aᵀ · b` or `a · bᵀ` of 2-D tensors, recorded as one op
/// (`matmul_tn`, `matmul_nt`): the differentiable backward of a matrix
/// product and of `linear`. The kernel reads the transposed operand in
/// place, and the gradients are row-major products too:
/// for `C = A · Bᵀ`, `dA = G · B` and `dB = Gᵀ · A`; for `C = Aᵀ · B`,
/// `dA = B · Gᵀ` and `dB = A · G`. Their differentiable forms are a plain
/// product and `matmul_t` again, so every order of derivative stays in
/// these two ops.
pub(crate) fn matmul_t(a: &Tensor, b: &Tensor, which: Transposed) -> Result<Tensor> {
    let op = match which {
        Transposed::Lhs => "matmul_tn",
        Transposed::Rhs => "matmul_nt",
    };
    for shape in [a.shape(), b.shape()] {
        if shape.len() != 2 {
            return Err(Error::Rank {
                op,
                expected: "a 2-D tensor",
                shape: shape.to_vec(),
            });
        }
    }
    let (sa, sb) = (a.shape(), b.shape());
    let (lhs_inner, rhs_inner, m, n) = match which {
        Transposed::Lhs => (sa[0], sb[0], sa[1], sb[1]),
        Transposed::Rhs => (sa[1], sb[1], sa[0], sb[0]),
    };
    if lhs_inner != rhs_inner {
        return Err(Error::MatmulShape {
            lhs: sa.to_vec(),
            rhs: sb.to_vec(),
            lhs_inner,
            rhs_inner,
        });
    }
    checked_numel(op, &[m, n])?;
    let (av, bv) = a.read_pair(b).into_pair();
    let out = match which {
        Transposed::Lhs => gemm_data(av.view2().reversed_axes(), bv.view2(), &[m, n]),
        Transposed::Rhs => gemm_data(av.view2(), bv.view2().reversed_axes(), &[m, n]),
    };
    record(op, &[a, b], out, move |_| MatmulTBackward {
        a: av,
        b: bv,
        which,
    })
}

/// Backward of [`matmul_t`].
struct MatmulTBackward {
    a: Data,
    b: Data,
    which: Transposed,
}

impl Backprop for MatmulTBackward {
    fn backward(&self, grad: Data, grads: &mut InputGrads<'_>) {
        let g = grad.view2();
        let (a, b) = (self.a.view2(), self.b.view2());
        if grads.needs_grad(0) {
            let da = match self.which {
                Transposed::Lhs => gemm_data(b, g.view().reversed_axes(), self.a.shape()),
                Transposed::Rhs => gemm_data(g.view(), b, self.a.shape()),
            };
            grads.put(0, da);
        }
        if grads.needs_grad(1) {
            let db = match self.which {
                Transposed::Lhs => gemm_data(a, g.view(), self.b.shape()),
                Transposed::Rhs => gemm_data(g.view().reversed_axes(), a, self.b.shape()),
            };
            grads.put(1, db);
        }
    }

    fn backward_graph(&self, grad: &Tensor, grads: &mut GraphGrads<'_>) -> Result<()> {
        if grads.needs_grad(0) {
            let b = grads.input(1, &self.b)?;
            let da = match self.which {
                Transposed::Lhs => matmul_t(&b, grad, Transposed::Rhs)?,
                Transposed::Rhs => grad.try_matmul(&b)?,
            };
            grads.set(0, da);
        }
        if grads.needs_grad(1) {
            let a = grads.input(0, &self.a)?;
            let db = match self.which {
                Transposed::Lhs => a.try_matmul(grad)?,
                Transposed::Rhs => matmul_t(grad, &a, Transposed::Lhs)?,
            };
            grads.set(1, db);
        }
        Ok(())
    }
}

/// The number of rows of `shape` seen as a matrix of rows: the product of
/// all its lengths but the last. Counted from the shape, not from the
/// element count, which is 0 for every row count when the last axis is.
fn row_count(shape: &[usize]) -> usize {
    shape[..shape.len().saturating_sub(1)].iter().product()
}

/// `x` as a matrix of rows: its last axis against all the others (a view
/// when `x` is in row-major order, a copy otherwise).
fn as_rows(x: ArrayViewD<'_, f32>) -> ndarray::CowArray<'_, f32, Ix2> {
    let cols = x.shape().last().copied().unwrap_or(1);
    let shape = (row_count(x.shape()), cols);
    if x.is_standard_layout() {
        return x
            .into_shape_with_order(shape)
            .expect("element count matches")
            .into();
    }
    x.as_standard_layout()
        .into_owned()
        .into_shape_with_order(shape)
        .expect("element count matches")
        .into()
}

fn check_linear(x: &[usize], weight: &[usize], bias: Option<&[usize]>) -> Result<()> {
    if x.is_empty() {
        return Err(Error::Rank {
            op: "linear",
            expected: "an input with at least 1 dimension",
            shape: x.to_vec(),
        });
    }
    if weight.len() != 2 {
        return Err(Error::Rank {
            op: "linear",
            expected: "a 2-D weight [in, out]",
            shape: weight.to_vec(),
        });
    }
    if x[x.len() - 1] != weight[0] {
        return Err(Error::MatmulShape {
            lhs: x.to_vec(),
            rhs: weight.to_vec(),
            lhs_inner: x[x.len() - 1],
            rhs_inner: weight[0],
        });
    }
    if let Some(bias) = bias
        && bias != [weight[1]]
    {
        return Err(Error::ShapeMismatch {
            op: "linear",
            lhs: vec![weight[1]],
            rhs: bias.to_vec(),
        });
    }
    // The result's shape, x's with the last length replaced, must exist
    // (empty inputs can have huge axes); checked without building it.
    let lengths = x[..x.len() - 1].iter().copied().chain([weight[1]]);
    if crate::array::nonzero_product(lengths).is_none() {
        let mut out = x.to_vec();
        *out.last_mut().expect("checked non-empty") = weight[1];
        checked_numel("linear", &out)?;
    }
    Ok(())
}

impl Tensor {
    /// The affine map `self · weight + bias`.
    ///
    /// # Panics
    ///
    /// As [`try_linear`](Tensor::try_linear).
    #[track_caller]
    pub fn linear(&self, weight: &Tensor, bias: Option<&Tensor>) -> Tensor {
        or_panic(self.try_linear(weight, bias))
    }

    /// The affine map `self · weight + bias` of a fully connected layer,
    /// fused: one output array and one graph node, where
    /// `self.matmul(weight).add(bias)` makes two of each. `self` is
    /// `[.., in]`, `weight` `[in, out]`, `bias` `[out]`; the result is
    /// `[.., out]`.
    ///
    /// # Errors
    ///
    /// [`Error::Rank`] if `self` is 0-dimensional or `weight` is not 2-D,
    /// [`Error::MatmulShape`] if `self`'s last dimension is not `weight`'s
    /// first, [`Error::ShapeMismatch`] if `bias` is not `[out]`,
    /// [`Error::ShapeTooLarge`] if the result could not exist.
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::Tensor;
    ///
    /// let x = Tensor::from_vec(vec![1.0, 2.0], &[1, 2])?;
    /// let w = Tensor::from_vec(vec![1.0, 0.0, 1.0, 0.0, 1.0, 1.0], &[2, 3])?;
    /// let b = Tensor::from_vec(vec![10.0, 20.0, 30.0], &[3])?;
    /// let y = x.try_linear(&w, Some(&b))?;
    /// assert_eq!(y.to_vec(), x.matmul(&w).add(&b).to_vec());
    /// assert_eq!(y.to_vec(), vec![11.0, 22.0, 33.0]);
    /// # Ok::<(), netcl::Error>(())
    /// ```
    #[track_caller]
    pub fn try_linear(&self, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        check_linear(self.shape(), weight.shape(), bias.map(Tensor::shape))?;
        let (x, w) = self.read_pair(weight).into_pair();
        let out = {
            let rows = rows_of(&x);
            let w2 = w.view2();
            let out_features = w2.ncols();
            let out = match bias {
                Some(bias) => {
                    let b = bias.read();
                    let b = b
                        .as_slice()
                        .map_or_else(|| b.to_vec().into(), Cow::Borrowed);
                    Data::build2(rows.nrows(), out_features, |mut out| {
                        if !out.is_empty() {
                            for mut row in out.rows_mut() {
                                row.as_slice_mut()
                                    .expect("a new buffer is row-major")
                                    .copy_from_slice(&b);
                            }
                        }
                        gemm_acc_into(rows.view(), w2, out);
                    })
                }
                None => gemm_data(rows.view(), w2, &[rows.nrows(), out_features]),
            };
            if self.ndim() == 2 {
                out
            } else {
                let mut shape = self.shape().to_vec();
                *shape.last_mut().expect("checked non-empty") = out_features;
                out.reshape(&shape)
            }
        };
        let save = move |_: &Data| LinearBackward { x, weight: w };
        match bias {
            Some(bias) => record("linear", &[self, weight, bias], out, save),
            None => record("linear", &[self, weight], out, save),
        }
    }
}

/// Backward of `x · W + b` over rows `X` (x with its leading axes
/// flattened): dX = G · Wᵀ, dW = Xᵀ · G, db = Σ_rows G.
struct LinearBackward {
    x: Data,
    weight: Data,
}

impl Backprop for LinearBackward {
    fn backward(&self, grad: Data, grads: &mut InputGrads<'_>) {
        let out_features = self.weight.shape()[1];
        let rows = row_count(self.x.shape());
        let grad = grad.reshape(&[rows, out_features]);
        let grad = grad.view2();
        let weight = self.weight.view2();
        if grads.needs_grad(0) {
            let dx = gemm(grad.view(), weight.t());
            grads.set(0, reshape_owned(dx.into_dyn(), self.x.shape()));
        }
        if grads.needs_grad(1) {
            let x = rows_of(&self.x);
            grads.set(1, gemm(x.t(), grad.view()).into_dyn());
        }
        if grads.len() > 2 && grads.needs_grad(2) {
            grads.set(2, grad.sum_axis(Axis(0)).into_dyn());
        }
    }

    fn backward_graph(&self, grad: &Tensor, grads: &mut GraphGrads<'_>) -> Result<()> {
        let (in_features, out_features) = (self.weight.shape()[0], self.weight.shape()[1]);
        let rows = row_count(self.x.shape());
        // Reshapes only where the input had more than two axes, and the
        // transposed products as single ops (`matmul_t`): no transpose
        // nodes, whose gradients would be strided views that every later
        // reshape and accumulation copies element by element.
        let flat = self.x.shape().len() == 2;
        let grad = if flat {
            grad.clone()
        } else {
            grad.try_reshape(&[rows, out_features])?
        };
        if grads.needs_grad(0) {
            let weight = grads.input(1, &self.weight)?;
            let dx = matmul_t(&grad, &weight, Transposed::Rhs)?;
            grads.set(
                0,
                if flat {
                    dx
                } else {
                    dx.try_reshape(self.x.shape())?
                },
            );
        }
        if grads.needs_grad(1) {
            let x = grads.input(0, &self.x)?;
            let x = if flat {
                x
            } else {
                x.try_reshape(&[rows, in_features])?
            };
            grads.set(1, matmul_t(&x, &grad, Transposed::Lhs)?);
        }
        if grads.len() > 2 && grads.needs_grad(2) {
            grads.set(2, grad.try_sum_axis(0, false)?);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::{Error, Tensor};

    fn tensor(values: &[f32], shape: &[usize]) -> Tensor {
        Tensor::from_vec(values.to_vec(), shape).unwrap()
    }

    #[test]
    fn vectors_give_a_dot_product_with_gradients() {
        let a = tensor(&[1.0, 2.0, 3.0], &[3]).requires_grad_(true);
        let b = tensor(&[4.0, 5.0, 6.0], &[3]).requires_grad_(true);
        let y = a.matmul(&b);
        assert_eq!(y.shape(), &[] as &[usize]);
        assert_eq!(y.item(), 32.0);
        y.backward();
        // d(a·b)/da = b, d(a·b)/db = a
        assert_eq!(a.grad().unwrap().to_vec(), vec![4.0, 5.0, 6.0]);
        assert_eq!(b.grad().unwrap().to_vec(), vec![1.0, 2.0, 3.0]);
    }

    #[test]
    fn vector_forms_drop_the_added_axis() {
        let v = Tensor::ones(&[4]);
        assert_eq!(v.matmul(&Tensor::ones(&[4, 3])).shape(), &[3]);
        assert_eq!(Tensor::ones(&[3, 4]).matmul(&v).shape(), &[3]);
        assert_eq!(v.matmul(&Tensor::ones(&[2, 5, 4, 3])).shape(), &[2, 5, 3]);
        assert_eq!(Tensor::ones(&[2, 5, 3, 4]).matmul(&v).shape(), &[2, 5, 3]);
    }

    #[test]
    fn vector_errors_name_the_original_shapes() {
        let err = Tensor::ones(&[3])
            .try_matmul(&Tensor::ones(&[4]))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "matmul: cannot multiply [3] by [4] (inner dimensions 3 and 4 differ)"
        );
        let err = Tensor::ones(&[2, 3])
            .try_matmul(&Tensor::ones(&[2]))
            .unwrap_err();
        assert!(matches!(
            err,
            Error::MatmulShape {
                lhs_inner: 3,
                rhs_inner: 2,
                ..
            }
        ));
        let err = Tensor::ones(&[])
            .try_matmul(&Tensor::ones(&[2]))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "matmul: expected at least 1 dimension, got a tensor of shape []"
        );
    }
}
