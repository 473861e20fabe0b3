//! Shape ops: reshape and transpose. Both share the input's storage when its
//! layout allows (no copy).

use ndarray::Dimension;

use crate::array::checked_numel;
use crate::array::normalize_axis;
use crate::autograd::function::{GraphGrads, InputGrads, record, with_graph};
use crate::error::{Error, Result, or_panic};
use crate::tensor::{Data, Tensor};

impl Tensor {
    /// The same values with a new shape, in row-major order.
    ///
    /// # Panics
    ///
    /// As [`try_reshape`](Tensor::try_reshape).
    #[track_caller]
    pub fn reshape(&self, shape: &[usize]) -> Tensor {
        or_panic(self.try_reshape(shape))
    }

    /// The same values with a new shape, in row-major order.
    ///
    /// # Errors
    ///
    /// [`Error::ShapeTooLarge`] if `shape` cannot exist (see
    /// [`Tensor::MAX_ELEMENTS`]), [`Error::ElementCount`] if it holds a
    /// different number of elements.
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::Tensor;
    ///
    /// let t = Tensor::arange(0.0, 6.0, 1.0);
    /// assert_eq!(t.try_reshape(&[2, 3])?.shape(), &[2, 3]);
    /// assert!(t.try_reshape(&[4, 2]).is_err());
    /// # Ok::<(), netcl::Error>(())
    /// ```
    #[track_caller]
    pub fn try_reshape(&self, shape: &[usize]) -> Result<Tensor> {
        let expected = checked_numel("reshape", shape)?;
        if expected != self.numel() {
            return Err(Error::ElementCount {
                op: "reshape",
                shape: shape.to_vec(),
                expected,
                len: self.numel(),
            });
        }
        // A view of the same buffer when the values are in row-major order.
        let out = self.read().reshape(shape);
        let input = self.dim();
        record("reshape", &[self], out, |_| {
            with_graph(
                input,
                |input, grad: Data, grads: &mut InputGrads<'_>| {
                    grads.put(0, grad.reshape(input.slice()));
                },
                |input, grad: &Tensor, grads: &mut GraphGrads<'_>| {
                    grads.set(0, grad.try_reshape(input.slice())?);
                    Ok(())
                },
            )
        })
    }

    /// Swaps axes `axis0` and `axis1`.
    ///
    /// # Panics
    ///
    /// As [`try_transpose`](Tensor::try_transpose).
    #[track_caller]
    pub fn transpose(&self, axis0: isize, axis1: isize) -> Tensor {
        or_panic(self.try_transpose(axis0, axis1))
    }

    /// Swaps axes `axis0` and `axis1` (negative counts from the end). The
    /// result shares storage with `self`.
    ///
    /// # Errors
    ///
    /// [`Error::Axis`] if an axis is out of range.
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::Tensor;
    ///
    /// let t = Tensor::from_vec(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3])?;
    /// let u = t.try_transpose(0, -1)?;
    /// assert_eq!(u.shape(), &[3, 2]);
    /// assert_eq!(u.to_vec(), vec![1.0, 4.0, 2.0, 5.0, 3.0, 6.0]);
    /// # Ok::<(), netcl::Error>(())
    /// ```
    #[track_caller]
    pub fn try_transpose(&self, axis0: isize, axis1: isize) -> Result<Tensor> {
        let a = normalize_axis("transpose", axis0, self.ndim())?;
        let b = normalize_axis("transpose", axis1, self.ndim())?;
        let out = self.read().swap_axes(a, b);
        record("transpose", &[self], out, |_| {
            with_graph(
                (a, b),
                |&(a, b), grad: Data, grads: &mut InputGrads<'_>| {
                    grads.put(0, grad.swap_axes(a, b));
                },
                |&(a, b), grad: &Tensor, grads: &mut GraphGrads<'_>| {
                    grads.set(0, grad.try_transpose(a as isize, b as isize)?);
                    Ok(())
                },
            )
        })
    }

    /// The transpose of a 2-D tensor.
    ///
    /// # Panics
    ///
    /// As [`try_t`](Tensor::try_t).
    #[track_caller]
    pub fn t(&self) -> Tensor {
        or_panic(self.try_t())
    }

    /// The transpose of a 2-D tensor.
    ///
    /// # Errors
    ///
    /// [`Error::Rank`] if the tensor is not 2-D.
    #[track_caller]
    pub fn try_t(&self) -> Result<Tensor> {
        if self.ndim() != 2 {
            return Err(Error::Rank {
                op: "t",
                expected: "a 2-D tensor",
                shape: self.shape().to_vec(),
            });
        }
        self.try_transpose(0, 1)
    }
}
