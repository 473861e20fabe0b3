//! Gradient checks: every differentiable op of [`Tensor`] against central
//! finite differences, plus hand-derived gradients of small composite graphs.
//!
//! # The checker
//!
//! [`check_grads`] reduces an op's output `y = f(x)` to the scalar
//! `L = Σ_k r_k y_k` with a fixed, seeded Gaussian weighting `r`, so that
//! every row of the Jacobian is exercised (with `r = 1` an error that sums to
//! zero over the outputs would go unseen). It computes `∂L/∂x` two ways:
//!
//! - `autograd::grad` of `(f(x) * r).sum()`, and
//! - `f(x)`'s backward from `r` (`grad_output`) followed by `.grad()` on the leaves (which also
//!   checks that leaves not requiring grad receive nothing);
//!
//! and compares both with the central difference
//! `(L(x + h e_j) - L(x - h e_j)) / (x_j⁺ - x_j⁻)` of every element `j` of
//! every input requiring grad. The perturbed inputs are built with
//! `Tensor::from_vec` and evaluated under `autograd::no_grad()`. `L` is
//! accumulated in `f64` from the `f32` outputs, and the denominator is the
//! step actually taken after rounding `x_j ± h` to `f32`, so the only errors
//! left are those of the op itself.
//!
//! # Step and tolerances
//!
//! Step `h = 1e-2` ([`STEP`]); an analytic value `a` passes against the
//! numeric `n` when `|a - n| <= ATOL + RTOL * |n|` with [`ATOL`] `= 1e-3` and
//! [`RTOL`] `= 5e-3`. Why:
//!
//! - *Rounding.* Only the outputs that depend on `x_j` change between the two
//!   evaluations; the others are computed identically and cancel exactly. The
//!   changed outputs carry an `f32` rounding error of a few `ε = 2⁻²⁴ ≈ 6e-8`
//!   relative to the magnitudes summed inside the op (a dot product of
//!   length `k`, a softmax lane, a whole-tensor mean). For the inputs used
//!   here (`|x| <~ 3`, at most a few dozen terms per output, `|r| <~ 3`)
//!   that is below `~5e-6` absolute in `L⁺ - L⁻`, i.e. below `~2.5e-4` after
//!   dividing by `2h = 0.02`. `ATOL = 1e-3` leaves a factor of 4 of margin.
//!   (With `h = 1e-3` this term would grow tenfold to `~2.5e-3`, which is why
//!   the larger step is used.)
//! - *Truncation.* The central difference errs by `h²/6 · f'''`, relative
//!   `h²/6 · |f'''/f'|`. The worst case here is `1/x` at `|x| = 0.5`
//!   (`|f'''/f'| = 6/x² = 24`): `4e-4`; for `exp`, `tanh`, `sigmoid`,
//!   softmax it is below `1e-4`. Where `f'` itself is near 0 (`x³` near 0)
//!   the absolute error `h² |f'''|/6 <= 1e-4` falls under `ATOL`.
//!   `RTOL = 5e-3` is ten times the worst relative truncation error.
//! - *Kinks.* `relu`, `abs` and `max_axis` are only differentiable away from
//!   their kinks: their inputs keep `|x| >= 0.2` (resp. the values of a lane
//!   at least `0.25` apart), far more than `h`, so no difference straddles a
//!   kink.
//!
//! These bounds are tight enough to matter: a gradient off by 2 % fails as
//! soon as `|n| > ~0.07`, which holds for most elements of every check, and
//! [`checker_rejects_gradient_off_by_two_percent`] proves it with a custom op
//! whose backward is deliberately wrong. Measured over every check in this
//! file, the largest `|a - n| / (ATOL + RTOL |n|)` is about 0.14 (`x³` near
//! 0, pure truncation), so correct ops pass with a wide margin while 1 %
//! errors in sigmoid, log_softmax or matmul backward were seen to fail.
//!
//! Hand-derived tests compare with values computed from the math in the
//! comment above each (exact rationals where possible), with an absolute
//! tolerance of `1e-5`: a few `f32` roundings of numbers of order 1.

mod checker;

mod binary;
mod composite;
mod hand;
mod loss;
mod matmul;
mod reduce;
mod shape;
mod softmax;
mod unary;
