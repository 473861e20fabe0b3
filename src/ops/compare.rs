//! Non-differentiable ops: comparisons and argmax. Their outputs never
//! require grad.

use ndarray::{Axis, Dimension};

use crate::error::{Result, or_panic};
use crate::ops::reduce::argmax_lane;
use crate::tensor::{Data, Tensor};

impl Tensor {
    fn compare(&self, op: &'static str, rhs: &Tensor, f: fn(f32, f32) -> bool) -> Result<Tensor> {
        let operands = self.read_pair(rhs);
        let (a, b) = operands.get();
        let shape = crate::array::broadcast_shape(op, a.shape(), b.shape())?;
        let (a, b) = (a.view(), b.view());
        let a = a.broadcast(shape.clone()).expect("broadcast shape");
        let b = b.broadcast(shape.clone()).expect("broadcast shape");
        let out = Data::build(shape.slice(), |out| {
            ndarray::Zip::from(out)
                .and(&a)
                .and(&b)
                .for_each(|o, &x, &y| *o = if f(x, y) { 1.0 } else { 0.0 })
        });
        Ok(Tensor::from_data(out))
    }

    /// `1.0` where `self == rhs`, else `0.0`, broadcasting.
    ///
    /// # Panics
    ///
    /// As [`try_eq`](Tensor::try_eq).
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::Tensor;
    ///
    /// let pred = Tensor::from_vec(vec![1.0, 2.0, 0.0], &[3])?;
    /// let target = Tensor::from_vec(vec![1.0, 0.0, 0.0], &[3])?;
    /// assert_eq!(pred.eq(&target).sum().item(), 2.0);
    /// # Ok::<(), netcl::Error>(())
    /// ```
    #[track_caller]
    pub fn eq(&self, rhs: &Tensor) -> Tensor {
        or_panic(self.try_eq(rhs))
    }

    /// `1.0` where `self == rhs`, else `0.0`, broadcasting.
    ///
    /// # Errors
    ///
    /// [`Error::Broadcast`](crate::Error::Broadcast) if the shapes are
    /// incompatible, [`Error::ShapeTooLarge`](crate::Error::ShapeTooLarge)
    /// if their broadcast could not exist.
    pub fn try_eq(&self, rhs: &Tensor) -> Result<Tensor> {
        self.compare("eq", rhs, |x, y| x == y)
    }

    /// `1.0` where `self > rhs`, else `0.0`, broadcasting.
    ///
    /// # Panics
    ///
    /// As [`try_gt`](Tensor::try_gt).
    #[track_caller]
    pub fn gt(&self, rhs: &Tensor) -> Tensor {
        or_panic(self.try_gt(rhs))
    }

    /// `1.0` where `self > rhs`, else `0.0`, broadcasting.
    ///
    /// # Errors
    ///
    /// As [`try_eq`](Tensor::try_eq).
    pub fn try_gt(&self, rhs: &Tensor) -> Result<Tensor> {
        self.compare("gt", rhs, |x, y| x > y)
    }

    /// `1.0` where `self < rhs`, else `0.0`, broadcasting.
    ///
    /// # Panics
    ///
    /// As [`try_lt`](Tensor::try_lt).
    #[track_caller]
    pub fn lt(&self, rhs: &Tensor) -> Tensor {
        or_panic(self.try_lt(rhs))
    }

    /// `1.0` where `self < rhs`, else `0.0`, broadcasting.
    ///
    /// # Errors
    ///
    /// As [`try_eq`](Tensor::try_eq).
    pub fn try_lt(&self, rhs: &Tensor) -> Result<Tensor> {
        self.compare("lt", rhs, |x, y| x < y)
    }

    /// Index of the maximum along `axis` (negative counts from the end), as
    /// `f32` values; the axis is removed. Ties go to the first maximum.
    ///
    /// # Panics
    ///
    /// As [`try_argmax`](Tensor::try_argmax).
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::Tensor;
    ///
    /// let logits = Tensor::from_vec(vec![0.1, 0.7, 0.2, 0.9, 0.05, 0.05], &[2, 3])?;
    /// assert_eq!(logits.argmax(-1).to_vec(), vec![1.0, 0.0]);
    /// # Ok::<(), netcl::Error>(())
    /// ```
    #[track_caller]
    pub fn argmax(&self, axis: isize) -> Tensor {
        or_panic(self.try_argmax(axis))
    }

    /// Index of the maximum along `axis`, as `f32` values; the axis is
    /// removed. Ties go to the first maximum, and a lane holding a NaN gives
    /// the index of its first NaN, as in PyTorch.
    ///
    /// # Errors
    ///
    /// [`Error::Axis`](crate::Error::Axis) if `axis` is out of range,
    /// [`Error::InvalidArgument`](crate::Error::InvalidArgument) if it has
    /// length 0.
    pub fn try_argmax(&self, axis: isize) -> Result<Tensor> {
        let axis = self.nonempty_axis("argmax", axis)?;
        let data = self.read();
        let data = data.view();
        let mut out = data.index_axis(Axis(axis), 0).to_owned();
        for (v, lane) in out.iter_mut().zip(data.lanes(Axis(axis))) {
            *v = argmax_lane(lane) as f32;
        }
        Ok(Tensor::from_data(Data::from_view(out.view())))
    }
}
