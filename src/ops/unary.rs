//! Element-wise functions of one tensor. Each forward sits beside its
//! derivative, written as `grad_in = df(grad_out, saved)` where `saved` is the
//! input or the output, whichever the derivative is cheaper from.

use crate::autograd::function::{
    Backprop, GraphGrads, InputGrads, record, record_unary, with_graph,
};
use crate::error::Result;
use crate::tensor::{Data, Tensor};

/// Which value the derivative reads.
#[derive(Clone, Copy)]
enum Saved {
    Input,
    Output,
}

/// Backward of an element-wise op: `grad_in[i] = df(grad_out[i], saved[i])`,
/// computed in place in the incoming gradient; differentiably,
/// `dg(grad_out, saved)` in tensor ops, `saved` rebuilt as the input or the
/// output tensor.
struct Elementwise<F, G> {
    saved: Data,
    kind: Saved,
    /// `df`'s price in simple operations (see [`map_op`]).
    cost: usize,
    df: F,
    dg: G,
}

impl<F, G> Backprop for Elementwise<F, G>
where
    F: Fn(f32, f32) -> f32 + Send + Sync + 'static,
    G: Fn(&Tensor, &Tensor) -> Result<Tensor> + Send + Sync + 'static,
{
    fn backward(&self, grad: Data, grads: &mut InputGrads<'_>) {
        let df = &self.df;
        grads.put(
            0,
            super::vectorized::zip_data(
                grad,
                &self.saved,
                self.cost,
                #[inline(always)]
                |g, s| (*df)(g, s),
            ),
        );
    }

    fn backward_graph(&self, grad: &Tensor, grads: &mut GraphGrads<'_>) -> Result<()> {
        let saved = match self.kind {
            Saved::Input => grads.input(0, &self.saved)?,
            Saved::Output => grads.output(&self.saved),
        };
        let g = (self.dg)(grad, &saved)?;
        grads.set(0, g);
        Ok(())
    }
}

/// Records `f` of each element of `x` with the backward `df(grad, saved)`.
/// `cost` is `f`'s price in simple operations: forward and backward split
/// across the caller's rayon pool when the tensor is large enough
/// ([`par_map`](super::vectorized::par_map); the same bits on any thread
/// count).
#[track_caller]
fn map_op<F, G>(
    x: &Tensor,
    op: &'static str,
    cost: usize,
    f: impl Fn(f32) -> f32 + Send + Sync,
    saved: Saved,
    df: F,
    dg: G,
) -> Tensor
where
    F: Fn(f32, f32) -> f32 + Send + Sync + 'static,
    G: Fn(&Tensor, &Tensor) -> Result<Tensor> + Send + Sync + 'static,
{
    let input = x.read().into_data();
    let out = super::vectorized::map_data(&input, cost, f);
    record_unary(op, x, out, move |out| Elementwise {
        saved: match saved {
            Saved::Input => input,
            Saved::Output => out.clone(),
        },
        kind: saved,
        cost,
        df,
        dg,
    })
}

/// A constant (no graph) computed element-wise from `t`'s values: the
/// derivative of a piecewise-linear op, whose own derivative is 0.
fn constant(t: &Tensor, f: impl Fn(f32) -> f32) -> Tensor {
    Tensor::from_data(t.read().map(f))
}

impl Tensor {
    /// `-self` element-wise (also the `-` operator).
    #[allow(clippy::should_implement_trait)]
    #[track_caller]
    pub fn neg(&self) -> Tensor {
        let out = self.read().map(|x| -x);
        record_unary("neg", self, out, |_| {
            with_graph(
                (),
                |_, grad: Data, grads: &mut InputGrads<'_>| grads.put(0, grad.map_into(|g| -g)),
                |_, grad: &Tensor, grads: &mut GraphGrads<'_>| {
                    grads.set(0, grad.neg());
                    Ok(())
                },
            )
        })
    }

    /// `self` raised to the power `exponent`, element-wise. A negative base
    /// with a non-integer exponent gives NaN, as in NumPy.
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::Tensor;
    ///
    /// let x = Tensor::from_vec(vec![2.0, 3.0], &[2])?.requires_grad_(true);
    /// let y = x.powf(3.0);
    /// assert_eq!(y.to_vec(), vec![8.0, 27.0]);
    /// y.sum().backward();
    /// assert_eq!(x.grad().unwrap().to_vec(), vec![12.0, 27.0]); // 3x²
    /// # Ok::<(), netcl::Error>(())
    /// ```
    #[track_caller]
    pub fn powf(&self, exponent: f32) -> Tensor {
        // d(x^p)/dx = p x^(p-1); for p = 0 the derivative is 0 everywhere,
        // also at x = 0, where p x^(p-1) would be 0 · inf = NaN (PyTorch
        // gives 0 too). An incoming NaN or infinite gradient stays NaN.
        map_op(
            self,
            "powf",
            8,
            |x| x.powf(exponent),
            Saved::Input,
            move |g, x| {
                if exponent == 0.0 {
                    g * 0.0
                } else {
                    g * exponent * x.powf(exponent - 1.0)
                }
            },
            move |g, x| {
                if exponent == 0.0 {
                    Ok(g.mul_scalar(0.0))
                } else {
                    g.try_mul(&x.powf(exponent - 1.0).mul_scalar(exponent))
                }
            },
        )
    }

    /// `e^self` element-wise.
    #[track_caller]
    pub fn exp(&self) -> Tensor {
        // d(e^x)/dx = e^x, the output
        map_op(
            self,
            "exp",
            4,
            super::vectorized::exp,
            Saved::Output,
            |g, y| g * y,
            |g, y| g.try_mul(y),
        )
    }

    /// Natural logarithm element-wise (NaN below 0, -inf at 0).
    #[track_caller]
    pub fn log(&self) -> Tensor {
        // d(ln x)/dx = 1/x
        map_op(
            self,
            "log",
            4,
            f32::ln,
            Saved::Input,
            |g, x| g / x,
            |g, x| g.try_div(x),
        )
    }

    /// Square root element-wise (NaN below 0).
    #[track_caller]
    pub fn sqrt(&self) -> Tensor {
        // d(√x)/dx = 1/(2√x), from the output
        map_op(
            self,
            "sqrt",
            2,
            f32::sqrt,
            Saved::Output,
            |g, y| g / (2.0 * y),
            |g, y| g.try_div(&y.mul_scalar(2.0)),
        )
    }

    /// Absolute value element-wise; its gradient at 0 is taken as 0, at NaN
    /// it is NaN.
    #[track_caller]
    pub fn abs(&self) -> Tensor {
        // d|x|/dx = sign(x), 0 at 0; NaN's sign is NaN.
        map_op(
            self,
            "abs",
            1,
            f32::abs,
            Saved::Input,
            |g, x| if x == 0.0 { 0.0 } else { g * x.signum() },
            |g, x| g.try_mul(&constant(x, |x| if x == 0.0 { 0.0 } else { x.signum() })),
        )
    }

    /// `max(self, 0)` element-wise; its gradient at 0 is taken as 0.
    ///
    /// NaN stays NaN, as in PyTorch. Its gradient at a NaN input is NaN:
    /// the slope there is undefined. (PyTorch passes the incoming gradient
    /// through unchanged at NaN; netcl does not let NaN become a number.)
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::Tensor;
    ///
    /// let x = Tensor::from_vec(vec![-1.0, 0.0, 2.0, f32::NAN], &[4])?;
    /// let y = x.relu().to_vec();
    /// assert_eq!(y[..3], [0.0, 0.0, 2.0]);
    /// assert!(y[3].is_nan());
    /// # Ok::<(), netcl::Error>(())
    /// ```
    #[track_caller]
    pub fn relu(&self) -> Tensor {
        // d relu(x)/dx = 1 if x > 0 else 0 (NaN at NaN), read from the
        // output
        map_op(
            self,
            "relu",
            1,
            |x| if x > 0.0 || x.is_nan() { x } else { 0.0 },
            Saved::Output,
            |g, y| {
                if y > 0.0 {
                    g
                } else if y.is_nan() {
                    f32::NAN
                } else {
                    0.0
                }
            },
            |g, y| {
                let slope = |y: f32| {
                    if y > 0.0 {
                        1.0
                    } else if y.is_nan() {
                        f32::NAN
                    } else {
                        0.0
                    }
                };
                g.try_mul(&constant(y, slope))
            },
        )
    }

    /// The logistic function `1 / (1 + e^-x)` element-wise.
    #[track_caller]
    pub fn sigmoid(&self) -> Tensor {
        // dσ/dx = σ(1 - σ)
        map_op(
            self,
            "sigmoid",
            5,
            super::vectorized::sigmoid,
            Saved::Output,
            |g, y| g * y * (1.0 - y),
            |g, y| g.try_mul(&y.mul(&y.rsub_scalar(1.0))),
        )
    }

    /// Hyperbolic tangent element-wise.
    #[track_caller]
    pub fn tanh(&self) -> Tensor {
        // d tanh/dx = 1 - tanh²
        map_op(
            self,
            "tanh",
            5,
            super::vectorized::tanh,
            Saved::Output,
            |g, y| g * (1.0 - y * y),
            |g, y| tanh_backward(y, g),
        )
    }
}

/// `g · (1 - y²)`, the backward of tanh (`y` its output, `g` the gradient
/// of its output), recorded as one op `tanh_backward` (where the unfused
/// form records three and allocates three arrays): the differentiable
/// backward of tanh. Its own derivatives, by hand: `d/dy = -2 y g` and
/// `d/dg = 1 - y²`, so its backward is one pass for each input, and its
/// differentiable backward records `tanh_backward` again for `g`.
pub(crate) fn tanh_backward(y: &Tensor, g: &Tensor) -> Result<Tensor> {
    if y.shape() != g.shape() {
        return Err(crate::Error::ShapeMismatch {
            op: "tanh_backward",
            lhs: y.shape().to_vec(),
            rhs: g.shape().to_vec(),
        });
    }
    let (ys, gs) = y.read_pair(g).into_pair();
    let out = gs.clone().zip_into(&ys, |g, y| g * (1.0 - y * y));
    record("tanh_backward", &[y, g], out, |_| {
        with_graph(
            (ys, gs),
            |(ys, gs): &(Data, Data), grad: Data, grads: &mut InputGrads<'_>| {
                if grads.needs_grad(0) {
                    let dy = grad.clone().zip_into(gs, |o, g| o * g);
                    grads.put(0, dy.zip_into(ys, |og, y| -2.0 * y * og));
                }
                grads.put(1, grad.zip_into(ys, |o, y| o * (1.0 - y * y)));
            },
            |(ys, gs): &(Data, Data), grad: &Tensor, grads: &mut GraphGrads<'_>| {
                let y = grads.input(0, ys)?;
                if grads.needs_grad(0) {
                    let g = grads.input(1, gs)?;
                    let dy = grad.try_mul(&g)?.try_mul(&y)?.mul_scalar(-2.0);
                    grads.set(0, dy);
                }
                if grads.needs_grad(1) {
                    grads.set(1, tanh_backward(&y, grad)?);
                }
                Ok(())
            },
        )
    })
}
