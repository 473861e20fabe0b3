//! Activations and element-wise extrema: `gelu` (exact and tanh forms),
//! `silu`, `erf`, `clamp`, and the broadcasting `maximum`/`minimum`. Each
//! forward sits beside its derivative.

use ndarray::{ArrayD, IxDyn, Zip};

use crate::array::{broadcast_shape, reduce_to_shape};
use crate::autograd::function::{GraphGrads, InputGrads, record, record_unary, with_graph};
use crate::error::{Error, Result, or_panic};
use crate::tensor::{Data, Tensor};

use super::graph::sum_to;
use super::vectorized;

/// `1/√2`.
const FRAC_1_SQRT_2: f64 = std::f64::consts::FRAC_1_SQRT_2;
/// `1/√(2π)`, the standard normal density at 0.
const INV_SQRT_2PI: f64 = 0.398_942_280_401_432_7;
/// `√(2/π)`, the scale inside the tanh form of GELU.
const SQRT_2_OVER_PI: f32 = 0.797_884_6;
/// The cubic coefficient of the tanh form of GELU.
const GELU_CUBIC: f32 = 0.044_715;

/// The complementary error function `erfc(x) = 1 - erf(x)`, in `f64`, with
/// a relative error below 1.2e-7 everywhere (the Chebyshev fit of Numerical
/// Recipes' `erfcc`): exact to `f32` precision after rounding, including in
/// the tails, where `1 - erf` would cancel. NaN gives NaN, `±inf` gives 0
/// and 2.
fn erfc64(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98
                                + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let tail = t * poly.exp();
    if x >= 0.0 {
        tail
    } else if x < 0.0 {
        2.0 - tail
    } else {
        f64::NAN
    }
}

/// `erf(x)` for `f32`, via [`erfc64`] (absolute error below 1.2e-7 before
/// rounding to `f32`).
pub(crate) fn erf32(x: f32) -> f32 {
    let x = f64::from(x);
    if x.abs() < 0.5 {
        // Near 0 a Taylor series keeps the relative accuracy that
        // `1 - erfc` loses: erf(x) = 2/√π Σ (-1)^n x^(2n+1) / (n! (2n+1)).
        let x2 = x * x;
        let mut term = x;
        let mut sum = x;
        for n in 1..12 {
            term *= -x2 / f64::from(n);
            sum += term / f64::from(2 * n + 1);
        }
        return (sum * std::f64::consts::FRAC_2_SQRT_PI) as f32;
    }
    (1.0 - erfc64(x)) as f32
}

/// Below this `|x|`, [`normal_cdf_and_gauss`] takes `Φ` from its Taylor
/// series.
const NORMAL_CDF_SWITCH: f32 = 1.0;

/// `(-1)^n / (2^n n! (2n+1))` for `n = 1..=9`: the coefficients of `x²ⁿ`
/// in `(Φ(x) - 1/2) √(2π) / x` (truncation error below 2·10⁻¹¹ for
/// `|x| < 1`).
const NORMAL_CDF_SERIES: [f32; 9] = [
    -0.166_666_67,
    0.025,
    -0.002_976_190_5,
    0.000_289_351_85,
    -2.367_424_2e-5,
    1.669_337_6e-6,
    -1.033_399_5e-7,
    5.698_894e-9,
    -2.832_783_6e-10,
];

/// `(Φ(x), e^(-x²/2))` in `f32`, branch-free so that a loop over it
/// vectorises (inside [`vectorized::dispatch`]).
///
/// The tail `Φ(-|x|) = erfc(|x|/√2) / 2` uses the same Chebyshev fit as
/// [`erfc64`], `erfc(z) = t e^(-z² + P(t))` with `t = 1/(1 + z/2)`, but
/// takes `e^(-z²) = e^(-x²/2)` apart from `e^P`: `x²` is split exactly
/// into `hi + lo` (Dekker's product of `|x|`'s upper and lower halves), so
/// the rounding of `x²` (up to 6·10⁻⁶ relative in `e^(-x²/2)` at
/// `|x| = 10`) never reaches the result: `e^(-x²/2) = e^(-hi/2) (1 - lo/2)`.
/// `|x|` is capped at 16, where the tail is 0 in `f32` already. Then
/// `Φ(x)` is the tail for `x < 0` and `1 - tail` otherwise (no
/// cancellation: the tail is at most 1/2). NaN gives NaN in both.
#[inline(always)]
fn normal_cdf_and_gauss(x: f32) -> (f32, f32) {
    let a = x.abs();
    // NaN fails the comparison and stays NaN.
    let a = if a > 16.0 { 16.0 } else { a };
    let a_hi = f32::from_bits(a.to_bits() & 0xffff_f000);
    let a_lo = a - a_hi;
    let hi = a * a;
    let lo = ((a_hi * a_hi - hi) + 2.0 * a_hi * a_lo) + a_lo * a_lo;
    let gauss = vectorized::exp(-0.5 * hi) * (1.0 - 0.5 * lo);
    let t = 1.0 / (1.0 + a * (0.5 * FRAC_1_SQRT_2 as f32));
    let poly = -1.265_512_2
        + t * (1.000_023_7
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_204
                                + t * (1.488_515_9 + t * (-0.822_152_2 + t * 0.170_872_77))))))));
    let tail = 0.5 * t * gauss * vectorized::exp(poly);
    let far = if x < 0.0 { tail } else { 1.0 - tail };
    // Near 0 the fit's rounding shows against Φ ≈ 1/2: the Taylor series
    // Φ(x) = 1/2 + x/√(2π) Σ (-1)^n (x²/2)^n / (n! (2n+1)) instead.
    let [c1, c2, c3, c4, c5, c6, c7, c8, c9] = NORMAL_CDF_SERIES;
    let series = 1.0
        + hi * (c1
            + hi * (c2
                + hi * (c3 + hi * (c4 + hi * (c5 + hi * (c6 + hi * (c7 + hi * (c8 + hi * c9))))))));
    let near = 0.5 + x * (INV_SQRT_2PI as f32 * series);
    let cdf = if a < NORMAL_CDF_SWITCH { near } else { far };
    (cdf, gauss)
}

/// Exact GELU `x Φ(x)` in `f32` (see [`normal_cdf_and_gauss`]).
#[inline(always)]
pub(crate) fn gelu32(x: f32) -> f32 {
    x * normal_cdf_and_gauss(x).0
}

/// The slope of exact GELU, `Φ(x) + x φ(x)`, in `f32`.
#[inline(always)]
fn gelu_slope32(x: f32) -> f32 {
    let (cdf, gauss) = normal_cdf_and_gauss(x);
    cdf + x * (INV_SQRT_2PI as f32 * gauss)
}

/// Records `f` of each element of `x` with the derivative `df(grad, x)`,
/// saving the input; differentiably, `dg(grad, x)` in recorded tensor ops.
/// `cost` is `f`'s price in simple operations: forward and backward split
/// across the caller's rayon pool when the tensor is large enough
/// ([`vectorized::par_map`]; the same bits on any thread count).
#[track_caller]
fn map_input_op<F, G>(
    x: &Tensor,
    op: &'static str,
    cost: usize,
    f: impl Fn(f32) -> f32 + Send + Sync,
    df: F,
    dg: G,
) -> Tensor
where
    F: Fn(f32, f32) -> f32 + Send + Sync + 'static,
    G: Fn(&Tensor, &Tensor) -> Result<Tensor> + Send + Sync + 'static,
{
    let input = x.read().into_data();
    let out = vectorized::map_data(&input, cost, f);
    record_unary(op, x, out, move |_| {
        with_graph(
            (input, df, dg),
            move |(input, df, _), grad: Data, grads: &mut InputGrads<'_>| {
                // `(*df)`, not `df`: `&F`'s `Fn` shim is not inlined into
                // the loop, which then stays scalar.
                grads.put(
                    0,
                    vectorized::zip_data(
                        grad,
                        input,
                        cost,
                        #[inline(always)]
                        |g, x| (*df)(g, x),
                    ),
                )
            },
            |(input, _, dg), grad: &Tensor, grads: &mut GraphGrads<'_>| {
                let x = grads.input(0, input)?;
                grads.set(0, dg(grad, &x)?);
                Ok(())
            },
        )
    })
}

/// A constant (no graph) computed element-wise from `t`'s values: the
/// derivative of a piecewise-linear op, whose own derivative is 0.
fn constant(t: &Tensor, f: impl Fn(f32) -> f32) -> Tensor {
    Tensor::from_data(t.read().map(f))
}

/// Which form of GELU [`gelu`] computes, as PyTorch's `approximate`
/// argument (`'none'` or `'tanh'`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GeluApproximate {
    /// The exact `x Φ(x)`, with the normal CDF from `erf`
    /// (`approximate='none'`, the default).
    #[default]
    None,
    /// The tanh approximation `x/2 (1 + tanh(√(2/π) (x + 0.044715 x³)))`
    /// (`approximate='tanh'`).
    Tanh,
}

/// PyTorch's `F.gelu(input, approximate=...)`: [`Tensor::gelu`] or
/// [`Tensor::gelu_tanh`].
///
/// # Examples
///
/// ```
/// use netcl::Tensor;
/// use netcl::functional as F;
///
/// let x = Tensor::from_vec(vec![-1.0, 0.0, 1.0], &[3])?;
/// let exact = F::gelu(&x, F::GeluApproximate::None).to_vec();
/// let tanh = F::gelu(&x, F::GeluApproximate::Tanh).to_vec();
/// assert!((exact[2] - 0.841_344_7).abs() < 1e-6);
/// assert!((tanh[2] - 0.841_192).abs() < 1e-6);
/// # Ok::<(), netcl::Error>(())
/// ```
#[track_caller]
pub fn gelu(input: &Tensor, approximate: GeluApproximate) -> Tensor {
    match approximate {
        GeluApproximate::None => input.gelu(),
        GeluApproximate::Tanh => input.gelu_tanh(),
    }
}

/// PyTorch's `F.silu(input)`: [`Tensor::silu`].
#[track_caller]
pub fn silu(input: &Tensor) -> Tensor {
    input.silu()
}

/// Activations.
impl Tensor {
    /// The Gaussian error linear unit `x Φ(x)`, exact (PyTorch's
    /// `F.gelu(x)`, `approximate='none'`), with `Φ` the standard normal
    /// CDF. Computed in vectorised `f32` arithmetic: within 6 ulp of the
    /// exact value, the slope within 3·10⁻⁷ · (`Φ(x) + |x| φ(x)`). See
    /// [`gelu_tanh`](Tensor::gelu_tanh) for the tanh form, and
    /// [`functional::gelu`](crate::functional::gelu) for PyTorch's
    /// `approximate` argument.
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::Tensor;
    ///
    /// let x = Tensor::from_vec(vec![-1.0, 0.0, 1.0], &[3])?.requires_grad_(true);
    /// let y = x.gelu();
    /// let v = y.to_vec();
    /// assert!((v[0] + 0.158_655_3).abs() < 1e-6 && v[1] == 0.0);
    /// y.sum().backward();
    /// // d/dx x Φ(x) = Φ(x) + x φ(x): 0.5 at 0
    /// assert!((x.grad().unwrap().to_vec()[1] - 0.5).abs() < 1e-6);
    /// # Ok::<(), netcl::Error>(())
    /// ```
    #[track_caller]
    pub fn gelu(&self) -> Tensor {
        // d/dx x Φ(x) = Φ(x) + x φ(x), φ(x) = e^(-x²/2) / √(2π)
        map_input_op(
            self,
            "gelu",
            12,
            // `inline(always)`: a call per element would keep the loops
            // scalar.
            // (A closure, not the fn item: its `Fn` shim is not
            // `inline(always)`.)
            #[allow(clippy::redundant_closure)]
            #[inline(always)]
            |x| gelu32(x),
            #[inline(always)]
            |g, x| g * gelu_slope32(x),
            |g, x| {
                let cdf = x
                    .mul_scalar(FRAC_1_SQRT_2 as f32)
                    .erf()
                    .add_scalar(1.0)
                    .mul_scalar(0.5);
                let density = x
                    .try_mul(x)?
                    .mul_scalar(-0.5)
                    .exp()
                    .mul_scalar(INV_SQRT_2PI as f32);
                g.try_mul(&cdf.try_add(&x.try_mul(&density)?)?)
            },
        )
    }

    /// GELU in its tanh form, `x/2 (1 + tanh(√(2/π) (x + 0.044715 x³)))`
    /// (PyTorch's `F.gelu(x, approximate='tanh')`).
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::Tensor;
    ///
    /// let x = Tensor::from_vec(vec![1.0], &[1])?;
    /// assert!((x.gelu_tanh().item() - 0.841_192).abs() < 1e-6);
    /// # Ok::<(), netcl::Error>(())
    /// ```
    #[track_caller]
    pub fn gelu_tanh(&self) -> Tensor {
        // y = x/2 (1 + t), t = tanh(u), u = √(2/π) (x + c x³):
        // dy/dx = (1 + t)/2 + x/2 (1 - t²) √(2/π) (1 + 3c x²)
        map_input_op(
            self,
            "gelu_tanh",
            8,
            |x| 0.5 * x * (1.0 + vectorized::tanh(SQRT_2_OVER_PI * (x + GELU_CUBIC * x * x * x))),
            |g, x| {
                let t = vectorized::tanh(SQRT_2_OVER_PI * (x + GELU_CUBIC * x * x * x));
                let du = SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_CUBIC * x * x);
                g * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du)
            },
            |g, x| {
                let x2 = x.try_mul(x)?;
                let t = x
                    .try_add(&x2.try_mul(x)?.mul_scalar(GELU_CUBIC))?
                    .mul_scalar(SQRT_2_OVER_PI)
                    .tanh();
                let du = x2
                    .mul_scalar(3.0 * GELU_CUBIC)
                    .add_scalar(1.0)
                    .mul_scalar(SQRT_2_OVER_PI);
                let sech2 = t.try_mul(&t)?.rsub_scalar(1.0);
                let slope = t
                    .add_scalar(1.0)
                    .mul_scalar(0.5)
                    .try_add(&x.try_mul(&sech2)?.try_mul(&du)?.mul_scalar(0.5))?;
                g.try_mul(&slope)
            },
        )
    }

    /// The sigmoid linear unit (swish) `x σ(x)` (PyTorch's `F.silu`).
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::Tensor;
    ///
    /// let x = Tensor::from_vec(vec![0.0, 2.0], &[2])?.requires_grad_(true);
    /// let y = x.silu();
    /// assert!((y.to_vec()[1] - 1.761_594_2).abs() < 1e-6);
    /// y.sum().backward();
    /// assert_eq!(x.grad().unwrap().to_vec()[0], 0.5); // σ(0) (1 + 0)
    /// # Ok::<(), netcl::Error>(())
    /// ```
    #[track_caller]
    pub fn silu(&self) -> Tensor {
        // d/dx x σ(x) = σ(x) (1 + x (1 - σ(x)))
        map_input_op(
            self,
            "silu",
            6,
            |x| x / (1.0 + vectorized::exp(-x)),
            |g, x| {
                let s = vectorized::sigmoid(x);
                g * s * (1.0 + x * (1.0 - s))
            },
            |g, x| {
                let s = x.sigmoid();
                let slope = s.try_mul(&x.try_mul(&s.rsub_scalar(1.0))?.add_scalar(1.0))?;
                g.try_mul(&slope)
            },
        )
    }

    /// The error function `erf(x) = 2/√π ∫₀ˣ e^(-t²) dt`, element-wise
    /// (PyTorch's `torch.erf`), accurate to `f32` precision.
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::Tensor;
    ///
    /// let x = Tensor::from_vec(vec![0.0, 1.0, -2.0], &[3])?;
    /// let y = x.erf().to_vec();
    /// assert_eq!(y[0], 0.0);
    /// assert!((y[1] - 0.842_700_8).abs() < 1e-7);
    /// assert!((y[2] + 0.995_322_3).abs() < 1e-7);
    /// # Ok::<(), netcl::Error>(())
    /// ```
    #[track_caller]
    pub fn erf(&self) -> Tensor {
        // d erf(x)/dx = 2/√π e^(-x²)
        map_input_op(
            self,
            "erf",
            12,
            erf32,
            |g, x| g * std::f32::consts::FRAC_2_SQRT_PI * (-x * x).exp(),
            |g, x| {
                let slope = x
                    .try_mul(x)?
                    .neg()
                    .exp()
                    .mul_scalar(std::f32::consts::FRAC_2_SQRT_PI);
                g.try_mul(&slope)
            },
        )
    }

    /// Clamps every element into `[min, max]`.
    ///
    /// # Panics
    ///
    /// As [`try_clamp`](Tensor::try_clamp).
    #[track_caller]
    pub fn clamp(&self, min: Option<f32>, max: Option<f32>) -> Tensor {
        or_panic(self.try_clamp(min, max))
    }

    /// Clamps every element into `[min, max]` (PyTorch's
    /// `x.clamp(min, max)`): `min(max(x, min), max)`, so when `min > max`
    /// every element is `max`, as in PyTorch. Either bound may be `None`.
    ///
    /// The gradient is 1 strictly inside the bounds and 0 at and beyond
    /// them, as PyTorch 2.15 computes it for scalar bounds (a bound hit
    /// exactly passes no gradient). NaN stays NaN; its gradient is NaN,
    /// where PyTorch gives 0 (netcl does not let NaN become a number, as
    /// [`relu`](Tensor::relu)). A NaN bound makes every output NaN, as in
    /// PyTorch.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] if both bounds are `None` (as PyTorch).
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::Tensor;
    ///
    /// let x = Tensor::from_vec(vec![-1.0, 0.0, 0.5, 1.0, 2.0], &[5])?.requires_grad_(true);
    /// let y = x.try_clamp(Some(0.0), Some(1.0))?;
    /// assert_eq!(y.to_vec(), vec![0.0, 0.0, 0.5, 1.0, 1.0]);
    /// y.sum().backward();
    /// assert_eq!(x.grad().unwrap().to_vec(), vec![0.0, 0.0, 1.0, 0.0, 0.0]);
    /// # Ok::<(), netcl::Error>(())
    /// ```
    #[track_caller]
    pub fn try_clamp(&self, min: Option<f32>, max: Option<f32>) -> Result<Tensor> {
        if min.is_none() && max.is_none() {
            return Err(Error::InvalidArgument {
                op: "clamp",
                message: "at least one of min and max must be given".into(),
            });
        }
        let clamp = move |x: f32| {
            let mut y = x;
            if let Some(lo) = min {
                // NaN in x stays (the comparison is false), a NaN bound wins.
                if y < lo || lo.is_nan() {
                    y = lo;
                }
            }
            if let Some(hi) = max
                && (y > hi || hi.is_nan())
            {
                y = hi;
            }
            y
        };
        // d clamp/dx = 1 if min < x < max (strictly), else 0; NaN at NaN
        let slope = move |x: f32| {
            if x.is_nan() {
                f32::NAN
            } else if min.is_none_or(|lo| x > lo) && max.is_none_or(|hi| x < hi) {
                1.0
            } else {
                0.0
            }
        };
        // (selecting, not multiplying: an infinite gradient outside the
        // bounds still gives 0)
        // Differentiably: a recorded `where` of constant masks (a
        // piecewise-linear op has a zero second derivative).
        Ok(map_input_op(
            self,
            "clamp",
            1,
            clamp,
            move |g, x| {
                let s = slope(x);
                if s == 1.0 { g } else { s }
            },
            move |g, x| {
                // The gradient where the slope is 1, else the slope (0, or
                // NaN at NaN), selected as forward does (an infinite
                // gradient outside the bounds still gives 0).
                let inside = constant(x, |x| f32::from(slope(x) == 1.0));
                let outside = constant(x, |x| {
                    let s = slope(x);
                    if s == 1.0 { 0.0 } else { s }
                });
                crate::ops::index::try_where_(&inside, g, &outside)
            },
        ))
    }
}

/// `f(a, b)` over the broadcast of `a` and `b` (shapes already checked).
fn zip_broadcast(shape: &IxDyn, a: &Data, b: &Data, f: impl Fn(f32, f32) -> f32) -> ArrayD<f32> {
    let (a, b) = (a.view(), b.view());
    let a = a.broadcast(shape.clone()).expect("checked broadcast");
    let b = b.broadcast(shape.clone()).expect("checked broadcast");
    Zip::from(&a).and(&b).map_collect(|&x, &y| f(x, y))
}

/// The larger of `a` and `b`, NaN if either is (`f32::max` would drop it).
fn max_nan(a: f32, b: f32) -> f32 {
    if a.is_nan() || b.is_nan() {
        f32::NAN
    } else if b > a {
        b
    } else {
        a
    }
}

/// The smaller of `a` and `b`, NaN if either is.
fn min_nan(a: f32, b: f32) -> f32 {
    -max_nan(-a, -b)
}

/// The share of the gradient of `maximum(a, b)` that goes to `a`: all of
/// it where `a` wins, half on a tie, none where `b` wins; all of it where
/// either is NaN (both sides get it, as in PyTorch).
fn max_share(a: f32, b: f32) -> f32 {
    if a < b {
        0.0
    } else if a == b {
        0.5
    } else {
        1.0
    }
}

#[track_caller]
fn extremum(
    op: &'static str,
    a: &Tensor,
    b: &Tensor,
    pick: fn(f32, f32) -> f32,
    // The share of the gradient going to the first operand.
    share: fn(f32, f32) -> f32,
) -> Result<Tensor> {
    let shape = broadcast_shape(op, a.shape(), b.shape())?;
    let (x, y) = a.read_pair(b).into_pair();
    let out = Data::from_array(zip_broadcast(&shape, &x, &y, pick));
    record(op, &[a, b], out, move |_| {
        // d/da = g · share(a, b), d/db = g · share(b, a), each summed over
        // the axes its operand was broadcast along
        // Differentiably: the gradient times the shares as constants (a
        // piecewise-linear op has a zero second derivative).
        with_graph(
            (x, y, shape),
            move |(x, y, _), grad: Data, grads: &mut InputGrads<'_>| {
                let g = grad.view();
                for (i, (first, second)) in [(x, y), (y, x)].into_iter().enumerate() {
                    if grads.needs_grad(i) {
                        let (p, q) = (first.view(), second.view());
                        let p = p.broadcast(g.raw_dim()).expect("checked broadcast");
                        let q = q.broadcast(g.raw_dim()).expect("checked broadcast");
                        let d = Zip::from(&g)
                            .and(&p)
                            .and(&q)
                            .map_collect(|&g, &p, &q| g * share(p, q));
                        grads.set(i, reduce_to_shape(d, first.shape()));
                    }
                }
            },
            move |(x, y, shape), grad: &Tensor, grads: &mut GraphGrads<'_>| {
                for (i, (first, second)) in [(x, y), (y, x)].into_iter().enumerate() {
                    if grads.needs_grad(i) {
                        let shares = Tensor::from_data(Data::from_array(zip_broadcast(
                            shape, first, second, share,
                        )));
                        let d = grad.try_mul(&shares)?;
                        grads.set(i, sum_to(&d, first.shape())?);
                    }
                }
                Ok(())
            },
        )
    })
}

/// Element-wise maxima and minima of two tensors.
impl Tensor {
    /// Element-wise maximum of `self` and `other`, broadcasting.
    ///
    /// # Panics
    ///
    /// As [`try_maximum`](Tensor::try_maximum).
    #[track_caller]
    pub fn maximum(&self, other: &Tensor) -> Tensor {
        or_panic(self.try_maximum(other))
    }

    /// Element-wise maximum of `self` and `other`, broadcasting as NumPy
    /// does (PyTorch's `torch.maximum`). NaN in either operand gives NaN.
    ///
    /// The gradient goes to the larger operand; on a tie each side gets
    /// half of it, and where either is NaN both get all of it, as PyTorch
    /// does.
    ///
    /// # Errors
    ///
    /// [`Error::Broadcast`] if the shapes cannot be broadcast together,
    /// [`Error::ShapeTooLarge`] if their broadcast could not exist,
    /// [`Error::TapeMismatch`] if the operands were recorded on different
    /// tapes.
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::Tensor;
    ///
    /// let a = Tensor::from_vec(vec![1.0, 2.0, 3.0], &[3])?.requires_grad_(true);
    /// let b = Tensor::from_vec(vec![2.0, 2.0, 0.0], &[3])?.requires_grad_(true);
    /// let y = a.try_maximum(&b)?;
    /// assert_eq!(y.to_vec(), vec![2.0, 2.0, 3.0]);
    /// y.sum().backward();
    /// assert_eq!(a.grad().unwrap().to_vec(), vec![0.0, 0.5, 1.0]); // tie: half
    /// assert_eq!(b.grad().unwrap().to_vec(), vec![1.0, 0.5, 0.0]);
    /// # Ok::<(), netcl::Error>(())
    /// ```
    #[track_caller]
    pub fn try_maximum(&self, other: &Tensor) -> Result<Tensor> {
        extremum("maximum", self, other, max_nan, max_share)
    }

    /// Element-wise minimum of `self` and `other`, broadcasting.
    ///
    /// # Panics
    ///
    /// As [`try_minimum`](Tensor::try_minimum).
    #[track_caller]
    pub fn minimum(&self, other: &Tensor) -> Tensor {
        or_panic(self.try_minimum(other))
    }

    /// Element-wise minimum of `self` and `other`, broadcasting as NumPy
    /// does (PyTorch's `torch.minimum`); NaN and gradients as
    /// [`try_maximum`](Tensor::try_maximum), with the smaller operand
    /// winning.
    ///
    /// # Errors
    ///
    /// As [`try_maximum`](Tensor::try_maximum).
    #[track_caller]
    pub fn try_minimum(&self, other: &Tensor) -> Result<Tensor> {
        extremum("minimum", self, other, min_nan, |a, b| max_share(-a, -b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erf_matches_reference_values() {
        // erf values from mpmath, 20 digits
        let reference = [
            (0.0_f32, 0.0_f64),
            (1e-4, 1.128_379_163_334_249e-4),
            (0.1, 0.112_462_916_018_284_9),
            (0.5, 0.520_499_877_813_046_5),
            (1.0, 0.842_700_792_949_714_9),
            (2.0, 0.995_322_265_018_952_7),
            (3.0, 0.999_977_909_503_001_4),
            (-0.7, -0.677_801_193_837_418_5),
        ];
        for (x, want) in reference {
            let got = f64::from(erf32(x));
            assert!(
                (got - want).abs() <= 2e-7 * want.abs().max(1e-3),
                "erf({x}) = {got}, want {want}"
            );
        }
        assert!(erf32(f32::NAN).is_nan());
        assert_eq!(erf32(f32::INFINITY), 1.0);
        assert_eq!(erf32(f32::NEG_INFINITY), -1.0);
    }

    #[test]
    fn erfc_keeps_relative_accuracy_in_the_tail() {
        // erfc(5) = 1.5374597944280348e-12
        let got = erfc64(5.0);
        assert!(
            (got / 1.537_459_794_428_034_8e-12 - 1.0).abs() < 2e-7,
            "{got}"
        );
    }

    #[test]
    fn clamp_without_bounds_is_an_error() {
        let x = Tensor::from_vec(vec![1.0], &[1]).unwrap();
        let err = x.try_clamp(None, None).unwrap_err();
        assert_eq!(
            err.to_string(),
            "clamp: at least one of min and max must be given"
        );
    }

    #[test]
    fn clamp_propagates_nan_in_value_and_gradient() {
        let x = Tensor::from_vec(vec![f32::NAN, 0.5], &[2])
            .unwrap()
            .requires_grad_(true);
        let y = x.clamp(Some(0.0), Some(1.0));
        assert!(y.to_vec()[0].is_nan());
        y.sum().backward();
        let g = x.grad().unwrap().to_vec();
        assert!(g[0].is_nan());
        assert_eq!(g[1], 1.0);
        // A NaN bound: every output NaN, as PyTorch.
        assert!(
            x.clamp(Some(f32::NAN), None)
                .to_vec()
                .iter()
                .all(|v| v.is_nan())
        );
    }

    #[test]
    fn maximum_propagates_nan_from_either_side() {
        let a = Tensor::from_vec(vec![f32::NAN, 1.0], &[2]).unwrap();
        let b = Tensor::from_vec(vec![1.0, f32::NAN], &[2]).unwrap();
        assert!(a.maximum(&b).to_vec().iter().all(|v| v.is_nan()));
        assert!(a.minimum(&b).to_vec().iter().all(|v| v.is_nan()));
    }

    #[test]
    fn maximum_names_itself_in_broadcast_errors() {
        let a = Tensor::zeros(&[2, 3]);
        let b = Tensor::zeros(&[2]);
        let err = a.try_maximum(&b).unwrap_err();
        assert!(err.to_string().starts_with("maximum:"), "{err}");
    }

    /// `Φ(x)` by its series `1/2 + φ(x) Σ x^(2n+1) / (2n+1)!!`, in `f64`
    /// (about 1e-14 relative for `|x| ≤ 5`).
    fn normal_cdf_series(x: f64) -> f64 {
        let (mut term, mut sum) = (x, x);
        for n in 1..400 {
            term *= x * x / f64::from(2 * n + 1);
            sum += term;
            if term.abs() <= 1e-18 * sum.abs() {
                break;
            }
        }
        0.5 + (-0.5 * x * x).exp() * INV_SQRT_2PI * sum
    }

    /// `Φ(-a)` for `a ≥ 4` by the continued fraction of the Mills ratio,
    /// `φ(a) / (a + 1/(a + 2/(a + 3/(a + ...))))`, in `f64`.
    fn normal_tail_fraction(a: f64) -> f64 {
        let mut f = a;
        for k in (1..=400).rev() {
            f = a + f64::from(k) / f;
        }
        (-0.5 * a * a).exp() * INV_SQRT_2PI / f
    }

    /// `Φ(x)` in `f64` to about 1e-14 relative: the series for `|x| < 4`,
    /// the continued fraction beyond.
    fn normal_cdf_reference(x: f64) -> f64 {
        if x.abs() < 4.0 {
            return normal_cdf_series(x);
        }
        let tail = normal_tail_fraction(x.abs());
        if x < 0.0 { tail } else { 1.0 - tail }
    }

    /// Every 1000th f32 (by bit pattern) in [-10, 10], plus values where
    /// the kernel's parts meet.
    fn gelu_sweep() -> impl Iterator<Item = f32> {
        let top = 10.0_f32.to_bits();
        (0..=top)
            .step_by(1000)
            .map(f32::from_bits)
            .flat_map(|x| [x, -x])
            .chain([0.5, -0.5, 1.0, -1.0, 4.0, -4.0, -0.751_791_5, 1e-30, -1e-30])
    }

    #[test]
    fn normal_cdf_reference_agrees_across_its_switch() {
        for a in [3.0_f64, 3.5, 4.0] {
            let (series, fraction) = (normal_cdf_series(-a), normal_tail_fraction(a));
            assert!(
                (series / fraction - 1.0).abs() < 1e-11,
                "{a}: {series} vs {fraction}"
            );
        }
        // Φ(-5) = 2.866515718791939e-7 (mpmath)
        let at = normal_cdf_reference(-5.0);
        assert!((at / 2.866_515_718_791_939e-7 - 1.0).abs() < 1e-10, "{at}");
    }

    #[test]
    fn gelu_f32_kernel_is_within_a_few_ulp_of_f64() {
        let mut worst = (0_u32, 0.0_f32);
        for x in gelu_sweep() {
            let want = (f64::from(x) * normal_cdf_reference(f64::from(x))) as f32;
            let got = gelu32(x);
            let ulps = if got == want {
                0
            } else {
                assert_eq!(got.is_sign_negative(), want.is_sign_negative(), "gelu({x})");
                (got.to_bits() as i64 - want.to_bits() as i64).unsigned_abs() as u32
            };
            if ulps > worst.0 {
                worst = (ulps, x);
            }
        }
        assert!(worst.0 <= 6, "gelu: {} ulp at {}", worst.0, worst.1);
    }

    #[test]
    fn gelu_f32_slope_is_within_bound_of_f64() {
        // |error| ≤ 3e-7 (Φ(x) + |x| φ(x)): relative to the two terms'
        // size, so absolute (below 1.5e-7) where they cancel near the
        // slope's zero at x ≈ -0.75 and relative in the tails.
        let mut worst = (0.0_f64, 0.0_f32);
        for x in gelu_sweep() {
            let xd = f64::from(x);
            let cdf = normal_cdf_reference(xd);
            let x_density = xd * (-0.5 * xd * xd).exp() * INV_SQRT_2PI;
            let want = cdf + x_density;
            let got = f64::from(gelu_slope32(x));
            let err = (got - want).abs() / (cdf + x_density.abs());
            if err > worst.0 {
                worst = (err, x);
            }
        }
        assert!(
            worst.0 <= 3e-7,
            "gelu slope: error {:e} at {}",
            worst.0,
            worst.1
        );
    }

    #[test]
    fn gelu_f32_kernels_propagate_nan_and_take_the_limits() {
        assert!(gelu32(f32::NAN).is_nan());
        assert!(gelu_slope32(f32::NAN).is_nan());
        assert_eq!(gelu32(f32::INFINITY), f32::INFINITY);
        assert_eq!(gelu32(1e30), 1e30);
        assert_eq!(gelu32(-1e30), 0.0);
        assert_eq!(gelu_slope32(1e30), 1.0);
        assert_eq!(gelu_slope32(-1e30), 0.0);
        assert_eq!(gelu32(0.0), 0.0);
        assert_eq!(gelu_slope32(0.0), 0.5);
        // As the f64 form: -inf · Φ(-inf) = -inf · 0 and inf · φ(inf).
        assert!(gelu32(f32::NEG_INFINITY).is_nan());
        assert!(gelu_slope32(f32::INFINITY).is_nan());
    }

    #[test]
    fn gelu_dispatched_loops_give_the_scalar_kernels_bits() {
        let xs: Vec<f32> = (0..=999).map(|i| -12.0 + 24.0 * i as f32 / 999.0).collect();
        let y = Tensor::from_vec(xs.clone(), &[xs.len()])
            .unwrap()
            .requires_grad_(true);
        let out = y.gelu();
        out.sum().backward();
        let grad = y.grad().unwrap().to_vec();
        for ((&x, &v), &g) in xs.iter().zip(&out.to_vec()).zip(&grad) {
            assert_eq!(v.to_bits(), gelu32(x).to_bits(), "gelu({x})");
            assert_eq!(g.to_bits(), gelu_slope32(x).to_bits(), "gelu'({x})");
        }
    }

    #[test]
    fn gelu_tail_is_relatively_exact() {
        // gelu(-5) = -5 Φ(-5) = -1.43325785934e-6 (PyTorch, float64)
        let y = Tensor::from_vec(vec![-5.0], &[1]).unwrap().gelu().item();
        assert!(
            (f64::from(y) / -1.433_257_859_34e-6 - 1.0).abs() < 1e-6,
            "{y}"
        );
    }
}
