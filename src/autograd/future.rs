//! Grad mode for async tasks: a future adaptor that enters a [`GradMode`]
//! on every poll.
//!
//! A thread-local mode does not follow a future across `.await`: a task
//! suspended on one worker thread of a multi-threaded runtime may resume on
//! another, whose mode is its own. And the `!Send` guards rightly refuse to
//! be held across an `.await` in a task that may move. [`GradModeFuture`]
//! makes the mode part of the task instead, as `tracing::Instrument` does
//! for spans: every `poll` enters the task's mode on whichever thread runs
//! it, and restores that thread's own mode afterwards.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use crate::autograd::mode::GradMode;

pin_project_lite::pin_project! {
    /// A future that runs in a [`GradMode`] (grad flag, training mode and
    /// tape) on every poll; created by
    /// [`GradModeFutureExt::with_grad_mode`] or [`GradMode::scope`].
    ///
    /// Each `poll` enters the task's mode on the polling thread and restores
    /// the thread's own mode when it returns. A mode the task changes
    /// itself between two `.await`s (with
    /// [`set_grad_enabled`](crate::autograd::set_grad_enabled), say) is
    /// kept for its next poll: the mode travels with the task, not with the
    /// thread.
    #[must_use = "futures do nothing unless polled or awaited"]
    #[derive(Debug)]
    pub struct GradModeFuture<F> {
        #[pin]
        inner: F,
        mode: GradMode,
    }
}

impl<F: Future> Future for GradModeFuture<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let _guard = this.mode.enter();
        let poll = this.inner.poll(cx);
        // What the task left its mode as, for its next poll.
        *this.mode = GradMode::current();
        poll
    }
}

/// Adds [`with_grad_mode`](GradModeFutureExt::with_grad_mode) to every
/// future.
///
/// # Holding a guard across `.await` does not compile
///
/// A guard ([`no_grad`](crate::autograd::no_grad) and the others) is
/// `!Send`: it restores the mode of the thread that made it, and after an
/// `.await` the task may be running on another thread. So a task that a
/// multi-threaded runtime may move cannot hold one across an `.await`;
/// `tokio::spawn` rejects it with "future cannot be sent between threads
/// safely", noting that `_guard` "has type `GradGuard` which is not
/// `Send`" and pointing at the `.await` it is held across:
///
/// <!-- Plain `compile_fail`, no error code: rustc (1.95) reports this
///      error without one, so `compile_fail,E0277` fails wherever rustdoc
///      checks codes (nightly, or RUSTC_BOOTSTRAP=1). -->
///
/// ```compile_fail
/// # async fn fetch_batch() -> netcl::Tensor { netcl::Tensor::ones(&[1, 2]) }
/// # #[tokio::main] async fn main() {
/// let w = netcl::Tensor::ones(&[2, 1]).requires_grad_(true);
/// tokio::spawn(async move {
///     let _guard = netcl::autograd::no_grad();
///     let x = fetch_batch().await; // the guard lives across this await
///     x.matmul(&w)
/// });
/// # }
/// ```
///
/// The fix is to give the whole task its mode:
///
/// ```
/// use netcl::autograd::{self, GradMode, GradModeFutureExt};
///
/// # async fn fetch_batch() -> netcl::Tensor { netcl::Tensor::ones(&[1, 2]) }
/// # #[tokio::main] async fn main() {
/// let w = netcl::Tensor::ones(&[2, 1]).requires_grad_(true);
/// let no_grad = GradMode::current().with_enabled(false);
/// let y = tokio::spawn(
///     async move {
///         let x = fetch_batch().await;
///         assert!(!autograd::is_grad_enabled()); // on whichever thread resumed it
///         x.matmul(&w)
///     }
///     .with_grad_mode(no_grad),
/// )
/// .await
/// .unwrap();
/// assert!(!y.requires_grad());
/// # }
/// ```
///
/// (or to drop the guard before the `.await`: a guard inside a block that
/// ends before it is fine).
pub trait GradModeFutureExt: Future + Sized {
    /// Runs this future in `mode` on every poll, whichever thread polls it.
    fn with_grad_mode(self, mode: GradMode) -> GradModeFuture<Self> {
        GradModeFuture { inner: self, mode }
    }

    /// Runs this future in the mode of the current thread as it is now
    /// ([`GradMode::current`]), whichever thread polls it later.
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::autograd::{self, GradModeFutureExt};
    ///
    /// # #[tokio::main(flavor = "multi_thread", worker_threads = 2)] async fn main() {
    /// let task = {
    ///     let _guard = autograd::no_grad();
    ///     // Captures no_grad now; the guard is gone before any await.
    ///     async { autograd::is_grad_enabled() }.in_current_grad_mode()
    /// };
    /// assert!(!tokio::spawn(task).await.unwrap());
    /// # }
    /// ```
    fn in_current_grad_mode(self) -> GradModeFuture<Self> {
        self.with_grad_mode(GradMode::current())
    }
}

impl<F: Future> GradModeFutureExt for F {}

impl GradMode {
    /// Wraps `future` so that it runs in this mode on every poll: the same
    /// as `future.with_grad_mode(mode.clone())`
    /// ([`GradModeFutureExt::with_grad_mode`]).
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::autograd::{self, GradMode};
    ///
    /// # #[tokio::main(flavor = "multi_thread", worker_threads = 2)] async fn main() {
    /// let eval = GradMode::current().with_enabled(false).with_training(Some(false));
    /// let (grad, training) = tokio::spawn(eval.scope(async {
    ///     tokio::task::yield_now().await;
    ///     (autograd::is_grad_enabled(), autograd::training_mode())
    /// }))
    /// .await
    /// .unwrap();
    /// assert_eq!((grad, training), (false, Some(false)));
    /// # }
    /// ```
    pub fn scope<F: Future>(&self, future: F) -> GradModeFuture<F> {
        future.with_grad_mode(self.clone())
    }
}
