//! Element-wise arithmetic with NumPy broadcasting: add, sub, mul, div, their
//! scalar forms and the `std::ops` operators.

use std::ops::{Add, Div, Mul, Neg, Sub};

use ndarray::{Dimension, IxDyn, Zip};

use crate::array::{broadcast_shape, reduce_to_shape, same_shape};
use crate::autograd::function::{
    Backprop, GraphGrads, InputGrads, record, record_unary, with_graph,
};
use crate::error::{Result, or_panic};
use crate::ops::graph::sum_to;
use crate::tensor::{Data, Tensor};

/// `f(a, b)` element-wise over the broadcast of `a` and `b`. Two large
/// row-major operands of one shape split across the caller's rayon pool
/// ([`par_zip`](super::vectorized::par_zip); the same bits on any thread
/// count).
fn zip_broadcast(
    op: &'static str,
    a: &Data,
    b: &Data,
    f: impl Fn(f32, f32) -> f32 + Send + Sync,
) -> Result<Data> {
    if same_shape(a.shape(), b.shape()) {
        if let (Some(x), Some(y)) = (a.as_slice(), b.as_slice()) {
            // One compare of the length first: a tiny op pays nothing more.
            if super::vectorized::should_split(x.len()) {
                return Ok(Data::from_vec(
                    a.shape(),
                    super::vectorized::par_zip(x, y, 1, f),
                ));
            }
            // The small-op path: two slices in, one allocation out.
            return Ok(Data::collect(
                a.shape(),
                x.iter().zip(y).map(|(&x, &y)| f(x, y)),
            ));
        }
        let (a, b) = (a.view(), b.view());
        return Ok(Data::build(a.shape(), |out| {
            Zip::from(out)
                .and(&a)
                .and(&b)
                .for_each(|o, &x, &y| *o = f(x, y))
        }));
    }
    let shape = broadcast_shape(op, a.shape(), b.shape())?;
    let (a, b) = (a.view(), b.view());
    let a = a
        .broadcast(shape.clone())
        .expect("shape is a broadcast of a");
    let b = b
        .broadcast(shape.clone())
        .expect("shape is a broadcast of b");
    Ok(Data::build(shape.slice(), |out| {
        Zip::from(out)
            .and(&a)
            .and(&b)
            .for_each(|o, &x, &y| *o = f(x, y))
    }))
}

/// Sums and differences.
impl Tensor {
    /// Element-wise `self + rhs`, broadcasting as NumPy does.
    ///
    /// # Panics
    ///
    /// As [`try_add`](Tensor::try_add).
    #[track_caller]
    pub fn add(&self, rhs: &Tensor) -> Tensor {
        or_panic(self.try_add(rhs))
    }

    /// Element-wise `self + rhs`, broadcasting as NumPy does.
    ///
    /// # Errors
    ///
    /// [`Error::Broadcast`](crate::Error::Broadcast) if the shapes cannot be
    /// broadcast together; [`Error::ShapeTooLarge`](crate::Error::ShapeTooLarge)
    /// if their broadcast could not exist (empty operands with large axes);
    /// [`Error::TapeMismatch`](crate::Error::TapeMismatch) if the operands
    /// were recorded on different tapes.
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::Tensor;
    ///
    /// let a = Tensor::from_vec(vec![1.0, 2.0, 3.0, 4.0], &[2, 2])?;
    /// let b = Tensor::from_vec(vec![10.0, 20.0], &[2])?;
    /// assert_eq!(a.try_add(&b)?.to_vec(), vec![11.0, 22.0, 13.0, 24.0]);
    /// # Ok::<(), netcl::Error>(())
    /// ```
    #[track_caller]
    pub fn try_add(&self, rhs: &Tensor) -> Result<Tensor> {
        linear_op("add", self, rhs, |a, b| a + b, 1.0)
    }

    /// Element-wise `self - rhs`, broadcasting as NumPy does.
    ///
    /// # Panics
    ///
    /// As [`try_sub`](Tensor::try_sub).
    #[track_caller]
    pub fn sub(&self, rhs: &Tensor) -> Tensor {
        or_panic(self.try_sub(rhs))
    }

    /// Element-wise `self - rhs`, broadcasting as NumPy does.
    ///
    /// # Errors
    ///
    /// As [`try_add`](Tensor::try_add).
    #[track_caller]
    pub fn try_sub(&self, rhs: &Tensor) -> Result<Tensor> {
        linear_op("sub", self, rhs, |a, b| a - b, -1.0)
    }
}

/// Records a binary op whose backward needs only the operands' shapes.
#[track_caller]
fn linear_op(
    op: &'static str,
    a: &Tensor,
    b: &Tensor,
    f: impl Fn(f32, f32) -> f32 + Send + Sync,
    sign_b: f32,
) -> Result<Tensor> {
    let operands = a.read_pair(b);
    let (x, y) = operands.get();
    let out = zip_broadcast(op, x, y, f)?;
    if same_shape(x.shape(), y.shape()) {
        return if sign_b == 1.0 {
            record(op, &[a, b], out, |_| SameShapeSum::<false>)
        } else {
            record(op, &[a, b], out, |_| SameShapeSum::<true>)
        };
    }
    record(op, &[a, b], out, |_| AddBackward {
        shapes: (a.dim(), b.dim()),
        sign_b,
    })
}

/// d(a ± b)/da = 1, d(a ± b)/db = ±1 for operands of one shape. Stateless,
/// so recording it allocates nothing.
struct SameShapeSum<const SUB: bool>;

impl<const SUB: bool> Backprop for SameShapeSum<SUB> {
    fn backward(&self, grad: Data, grads: &mut InputGrads<'_>) {
        let grad_b = grads
            .needs_grad(1)
            .then(|| if SUB { grad.map(|g| -g) } else { grad.clone() });
        if grads.needs_grad(0) {
            grads.put(0, grad);
        }
        if let Some(g) = grad_b {
            grads.put(1, g);
        }
    }

    fn backward_graph(&self, grad: &Tensor, grads: &mut GraphGrads<'_>) -> Result<()> {
        grads.set(0, grad.clone());
        grads.set(1, if SUB { grad.neg() } else { grad.clone() });
        Ok(())
    }
}

/// d(a ± b)/da = 1, d(a ± b)/db = ±1, summed over broadcast axes.
struct AddBackward {
    shapes: (IxDyn, IxDyn),
    sign_b: f32,
}

impl Backprop for AddBackward {
    fn backward(&self, grad: Data, grads: &mut InputGrads<'_>) {
        let grad_b = grads.needs_grad(1).then(|| {
            let g = reduce_to(grad.clone(), self.shapes.1.slice());
            if self.sign_b != 1.0 {
                g.map_into(|v| v * self.sign_b)
            } else {
                g
            }
        });
        if grads.needs_grad(0) {
            grads.put(0, reduce_to(grad, self.shapes.0.slice()));
        }
        if let Some(g) = grad_b {
            grads.put(1, g);
        }
    }

    fn backward_graph(&self, grad: &Tensor, grads: &mut GraphGrads<'_>) -> Result<()> {
        if grads.needs_grad(0) {
            grads.set(0, sum_to(grad, self.shapes.0.slice())?);
        }
        if grads.needs_grad(1) {
            let g = sum_to(grad, self.shapes.1.slice())?;
            grads.set(1, if self.sign_b != 1.0 { g.neg() } else { g });
        }
        Ok(())
    }
}

/// A gradient of a broadcast result summed back to the shape of an operand
/// (see [`reduce_to_shape`]); as it is when the shapes agree.
pub(crate) fn reduce_to(grad: Data, shape: &[usize]) -> Data {
    if same_shape(grad.shape(), shape) {
        return grad;
    }
    Data::from_array(reduce_to_shape(grad.into_array(), shape))
}

/// Products.
impl Tensor {
    /// Element-wise `self * rhs`, broadcasting as NumPy does.
    ///
    /// # Panics
    ///
    /// As [`try_mul`](Tensor::try_mul).
    #[track_caller]
    pub fn mul(&self, rhs: &Tensor) -> Tensor {
        or_panic(self.try_mul(rhs))
    }

    /// Element-wise `self * rhs`, broadcasting as NumPy does.
    ///
    /// # Errors
    ///
    /// As [`try_add`](Tensor::try_add).
    #[track_caller]
    pub fn try_mul(&self, rhs: &Tensor) -> Result<Tensor> {
        let (a, b) = self.read_pair(rhs).into_pair();
        let out = zip_broadcast("mul", &a, &b, |x, y| x * y)?;
        record("mul", &[self, rhs], out, move |_| MulBackward { a, b })
    }
}

/// `grad * factor` (element-wise, `factor` broadcasting to `grad`), summed
/// back to `shape`.
fn scaled(grad: Data, factor: &Data, shape: &[usize]) -> Data {
    reduce_to(
        super::vectorized::zip_data(grad, factor, 1, |g, f| g * f),
        shape,
    )
}

/// d(a*b)/da = b, d(a*b)/db = a.
struct MulBackward {
    a: Data,
    b: Data,
}

impl Backprop for MulBackward {
    fn backward(&self, grad: Data, grads: &mut InputGrads<'_>) {
        let grad_b = grads
            .needs_grad(1)
            .then(|| scaled(grad.clone(), &self.a, self.b.shape()));
        if grads.needs_grad(0) {
            grads.put(0, scaled(grad, &self.b, self.a.shape()));
        }
        if let Some(g) = grad_b {
            grads.put(1, g);
        }
    }

    fn backward_graph(&self, grad: &Tensor, grads: &mut GraphGrads<'_>) -> Result<()> {
        if grads.needs_grad(0) {
            let b = grads.input(1, &self.b)?;
            grads.set(0, sum_to(&grad.try_mul(&b)?, self.a.shape())?);
        }
        if grads.needs_grad(1) {
            let a = grads.input(0, &self.a)?;
            grads.set(1, sum_to(&grad.try_mul(&a)?, self.b.shape())?);
        }
        Ok(())
    }
}

/// Quotients.
impl Tensor {
    /// Element-wise `self / rhs`, broadcasting as NumPy does.
    ///
    /// # Panics
    ///
    /// As [`try_div`](Tensor::try_div).
    #[track_caller]
    pub fn div(&self, rhs: &Tensor) -> Tensor {
        or_panic(self.try_div(rhs))
    }

    /// Element-wise `self / rhs`, broadcasting as NumPy does. Division by
    /// zero follows IEEE 754 (infinities and NaN), as in NumPy.
    ///
    /// # Errors
    ///
    /// As [`try_add`](Tensor::try_add).
    #[track_caller]
    pub fn try_div(&self, rhs: &Tensor) -> Result<Tensor> {
        let (a, b) = self.read_pair(rhs).into_pair();
        let out = zip_broadcast("div", &a, &b, |x, y| x / y)?;
        record("div", &[self, rhs], out, move |_| DivBackward { a, b })
    }
}

/// d(a/b)/da = 1/b, d(a/b)/db = -a/b².
struct DivBackward {
    a: Data,
    b: Data,
}

impl Backprop for DivBackward {
    fn backward(&self, grad: Data, grads: &mut InputGrads<'_>) {
        if grads.needs_grad(1) {
            let g = grad.view();
            let shape = g.raw_dim();
            let (a, b) = (self.a.view(), self.b.view());
            let a = a.broadcast(shape.clone()).expect("broadcast in forward");
            let b = b.broadcast(shape).expect("broadcast in forward");
            let g = Zip::from(&g)
                .and(&a)
                .and(&b)
                .map_collect(|&g, &a, &b| -g * a / (b * b));
            grads.put(1, reduce_to(Data::from_array(g), self.b.shape()));
        }
        if grads.needs_grad(0) {
            let g = super::vectorized::zip_data(grad, &self.b, 1, |g, b| g / b);
            grads.put(0, reduce_to(g, self.a.shape()));
        }
    }

    fn backward_graph(&self, grad: &Tensor, grads: &mut GraphGrads<'_>) -> Result<()> {
        let b = grads.input(1, &self.b)?;
        if grads.needs_grad(1) {
            // -g a / b²
            let a = grads.input(0, &self.a)?;
            let g = grad.try_mul(&a)?.try_div(&(&b * &b))?.neg();
            grads.set(1, sum_to(&g, self.b.shape())?);
        }
        if grads.needs_grad(0) {
            grads.set(0, sum_to(&grad.try_div(&b)?, self.a.shape())?);
        }
        Ok(())
    }
}

/// Scalar forms: infallible, one input.
impl Tensor {
    #[track_caller]
    fn scalar_op<B: Backprop>(
        &self,
        op: &'static str,
        f: impl Fn(f32) -> f32,
        save: impl FnOnce(Data) -> B,
    ) -> Tensor {
        let x = self.read().into_data();
        let out = x.map(f);
        record_unary(op, self, out, move |_| save(x))
    }

    /// `self + value` element-wise.
    #[track_caller]
    pub fn add_scalar(&self, value: f32) -> Tensor {
        self.scalar_op("add_scalar", |x| x + value, |_| identity())
    }

    /// `self - value` element-wise.
    #[track_caller]
    pub fn sub_scalar(&self, value: f32) -> Tensor {
        self.scalar_op("sub_scalar", |x| x - value, |_| identity())
    }

    /// `value - self` element-wise.
    #[track_caller]
    pub fn rsub_scalar(&self, value: f32) -> Tensor {
        self.scalar_op(
            "rsub_scalar",
            |x| value - x,
            |_| {
                with_graph(
                    (),
                    |_, grad: Data, grads: &mut InputGrads<'_>| grads.put(0, grad.map_into(|g| -g)),
                    |_, grad: &Tensor, grads: &mut GraphGrads<'_>| {
                        grads.set(0, grad.neg());
                        Ok(())
                    },
                )
            },
        )
    }

    /// `self * value` element-wise.
    #[track_caller]
    pub fn mul_scalar(&self, value: f32) -> Tensor {
        self.scalar_op(
            "mul_scalar",
            |x| x * value,
            |_| {
                with_graph(
                    value,
                    |&value, grad: Data, grads: &mut InputGrads<'_>| {
                        grads.put(0, grad.map_into(|g| g * value))
                    },
                    |&value, grad: &Tensor, grads: &mut GraphGrads<'_>| {
                        grads.set(0, grad.mul_scalar(value));
                        Ok(())
                    },
                )
            },
        )
    }

    /// `self / value` element-wise.
    #[track_caller]
    pub fn div_scalar(&self, value: f32) -> Tensor {
        self.scalar_op(
            "div_scalar",
            |x| x / value,
            |_| {
                with_graph(
                    value,
                    |&value, grad: Data, grads: &mut InputGrads<'_>| {
                        grads.put(0, grad.map_into(|g| g / value))
                    },
                    |&value, grad: &Tensor, grads: &mut GraphGrads<'_>| {
                        grads.set(0, grad.div_scalar(value));
                        Ok(())
                    },
                )
            },
        )
    }

    /// `value / self` element-wise.
    #[track_caller]
    pub fn rdiv_scalar(&self, value: f32) -> Tensor {
        // d(v/x)/dx = -v/x²
        self.scalar_op(
            "rdiv_scalar",
            |x| value / x,
            |x| {
                with_graph(
                    x,
                    move |x: &Data, grad: Data, grads: &mut InputGrads<'_>| {
                        grads.put(0, grad.zip_into(x, |g, x| g * (-value / (x * x))));
                    },
                    move |x: &Data, grad: &Tensor, grads: &mut GraphGrads<'_>| {
                        let x = grads.input(0, x)?;
                        grads.set(0, grad.try_mul(&(&x * &x).rdiv_scalar(-value))?);
                        Ok(())
                    },
                )
            },
        )
    }
}

/// The backward of `x ± constant`: the gradient passes unchanged.
fn identity() -> impl Backprop {
    with_graph(
        (),
        |_, grad: Data, grads: &mut InputGrads<'_>| grads.put(0, grad),
        |_, grad: &Tensor, grads: &mut GraphGrads<'_>| {
            grads.set(0, grad.clone());
            Ok(())
        },
    )
}

// `std::ops` for every combination of `Tensor`, `&Tensor` and `f32`. Tensor
// operands broadcast; an incompatible pair panics like the plain method.
macro_rules! tensor_operator {
    ($trait:ident, $method:ident, $tensor_fn:ident, $scalar_fn:ident, $rscalar_fn:ident) => {
        impl $trait<&Tensor> for &Tensor {
            type Output = Tensor;
            #[track_caller]
            fn $method(self, rhs: &Tensor) -> Tensor {
                Tensor::$tensor_fn(self, rhs)
            }
        }
        impl $trait<Tensor> for &Tensor {
            type Output = Tensor;
            #[track_caller]
            fn $method(self, rhs: Tensor) -> Tensor {
                Tensor::$tensor_fn(self, &rhs)
            }
        }
        impl $trait<&Tensor> for Tensor {
            type Output = Tensor;
            #[track_caller]
            fn $method(self, rhs: &Tensor) -> Tensor {
                Tensor::$tensor_fn(&self, rhs)
            }
        }
        impl $trait<Tensor> for Tensor {
            type Output = Tensor;
            #[track_caller]
            fn $method(self, rhs: Tensor) -> Tensor {
                Tensor::$tensor_fn(&self, &rhs)
            }
        }
        impl $trait<f32> for &Tensor {
            type Output = Tensor;
            #[track_caller]
            fn $method(self, rhs: f32) -> Tensor {
                self.$scalar_fn(rhs)
            }
        }
        impl $trait<f32> for Tensor {
            type Output = Tensor;
            #[track_caller]
            fn $method(self, rhs: f32) -> Tensor {
                self.$scalar_fn(rhs)
            }
        }
        impl $trait<&Tensor> for f32 {
            type Output = Tensor;
            #[track_caller]
            fn $method(self, rhs: &Tensor) -> Tensor {
                rhs.$rscalar_fn(self)
            }
        }
        impl $trait<Tensor> for f32 {
            type Output = Tensor;
            #[track_caller]
            fn $method(self, rhs: Tensor) -> Tensor {
                rhs.$rscalar_fn(self)
            }
        }
    };
}

tensor_operator!(Add, add, add, add_scalar, add_scalar);
tensor_operator!(Sub, sub, sub, sub_scalar, rsub_scalar);
tensor_operator!(Mul, mul, mul, mul_scalar, mul_scalar);
tensor_operator!(Div, div, div, div_scalar, rdiv_scalar);

impl Neg for &Tensor {
    type Output = Tensor;
    #[track_caller]
    fn neg(self) -> Tensor {
        Tensor::neg(self)
    }
}

impl Neg for Tensor {
    type Output = Tensor;
    #[track_caller]
    fn neg(self) -> Tensor {
        Tensor::neg(&self)
    }
}
