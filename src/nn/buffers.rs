//! Buffers: a module's named, non-trained state (BatchNorm's running
//! statistics), kept as immutable snapshots swapped whole.
//!
//! The semantics are documented on [`BufferState`].

use std::fmt;

use crate::autograd::no_grad;
use crate::error::{Error, Result};
use crate::sync::{Arc, AtomicArc};
use crate::tensor::Tensor;

/// One immutable state of a layer's buffers: named tensors that change
/// together. Read it from [`BufferState::load`].
///
/// # Examples
///
/// ```
/// use netcl::Tensor;
/// use netcl::nn::Buffers;
///
/// let buffers = Buffers::new([
///     ("running_mean", Tensor::zeros(&[3])),
///     ("running_var", Tensor::ones(&[3])),
/// ])?;
/// assert_eq!(buffers.names().collect::<Vec<_>>(), ["running_mean", "running_var"]);
/// assert_eq!(buffers.get("running_var").unwrap().to_vec(), vec![1.0; 3]);
/// assert!(buffers.get("missing").is_none());
/// # Ok::<(), netcl::Error>(())
/// ```
pub struct Buffers {
    entries: Vec<(String, Tensor)>,
    frozen: bool,
}

impl Buffers {
    /// Named buffers, in the given order (the order of
    /// [`Module::named_buffers`](crate::nn::Module::named_buffers)). The
    /// tensors' current values are taken (O(1), copy-on-write): writing
    /// to the given tensors afterwards does not change the buffers.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] if a name is empty or appears twice.
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::Tensor;
    /// use netcl::nn::Buffers;
    ///
    /// let err = Buffers::new([("a", Tensor::zeros(&[1])), ("a", Tensor::zeros(&[1]))]).unwrap_err();
    /// assert_eq!(err.to_string(), "Buffers::new: two buffers named `a`");
    /// ```
    pub fn new<S: Into<String>>(entries: impl IntoIterator<Item = (S, Tensor)>) -> Result<Buffers> {
        let mut checked: Vec<(String, Tensor)> = Vec::new();
        for (name, tensor) in entries {
            let name = name.into();
            let problem = if name.is_empty() {
                Some("a buffer name is empty".to_string())
            } else if checked.iter().any(|(n, _)| *n == name) {
                Some(format!("two buffers named `{name}`"))
            } else {
                None
            };
            if let Some(message) = problem {
                return Err(Error::InvalidArgument {
                    op: "Buffers::new",
                    message,
                });
            }
            checked.push((name, tensor.detach()));
        }
        Ok(Buffers {
            entries: checked,
            frozen: false,
        })
    }

    /// The buffer named `name`, detached (O(1); writing to it changes only
    /// the returned tensor).
    pub fn get(&self, name: &str) -> Option<Tensor> {
        self.entries
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t.detach())
    }

    /// The names, in order.
    pub fn names(&self) -> impl Iterator<Item = &str> + '_ {
        self.entries.iter().map(|(n, _)| n.as_str())
    }

    /// Every buffer with its name, in order, detached.
    pub fn to_vec(&self) -> Vec<(String, Tensor)> {
        self.entries
            .iter()
            .map(|(n, t)| (n.clone(), t.detach()))
            .collect()
    }

    /// The shape of every buffer, in order.
    pub fn shapes(&self) -> Vec<Vec<usize>> {
        self.entries
            .iter()
            .map(|(_, t)| t.shape().to_vec())
            .collect()
    }

    /// The number of buffers.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True if there is no buffer.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether this state belongs to a frozen [`BufferState`] (a published
    /// version's): no update follows it.
    pub fn is_frozen(&self) -> bool {
        self.frozen
    }

    /// The next state: these names with `values` (in order), checked.
    fn with_values(&self, op: &'static str, values: Vec<Tensor>) -> Result<Buffers> {
        if values.len() != self.entries.len() {
            return Err(Error::InvalidArgument {
                op,
                message: format!(
                    "expected {} buffer values ({:?}), got {}",
                    self.entries.len(),
                    self.names().collect::<Vec<_>>(),
                    values.len()
                ),
            });
        }
        let mut entries = Vec::with_capacity(values.len());
        for ((name, old), new) in self.entries.iter().zip(values) {
            if new.shape() != old.shape() {
                return Err(Error::ParameterMismatch {
                    op,
                    name: name.clone(),
                    expected: old.shape().to_vec(),
                    found: new.shape().to_vec(),
                    found_dtype: "F32".to_string(),
                });
            }
            entries.push((name.clone(), new.detach()));
        }
        Ok(Buffers {
            entries,
            frozen: self.frozen,
        })
    }

    /// A copy sharing the (never written) tensors.
    fn share(&self, frozen: bool) -> Buffers {
        Buffers {
            entries: self.entries.clone(),
            frozen,
        }
    }
}

impl fmt::Debug for Buffers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut map = f.debug_map();
        for (name, t) in &self.entries {
            map.entry(name, &t.shape());
        }
        map.finish()
    }
}

/// The buffers of a stateful layer: the current [`Buffers`] snapshot,
/// loaded without a lock and replaced whole by compare-and-swap.
///
/// A layer keeps one, returns it from
/// [`Module::named_buffer_states`](crate::nn::Module::named_buffer_states)
/// (so that `io`, forks and [`Published`](crate::nn::Published) versions
/// carry its buffers), reads it once per forward, and updates it from a
/// training forward.
///
/// # Semantics under concurrent training
///
/// The state is a pointer to one immutable [`Buffers`] snapshot (every
/// buffer of the layer, together), replaced whole by read-copy-update:
///
/// - **A forward reads one consistent state.** It loads the snapshot once
///   ([`BufferState::load`], no lock, never waits) and reads every buffer
///   from it: never a mean of one update with a variance of another.
/// - **An update never holds a lock while computing.** A training forward
///   computes its new statistics (the functional op returns them) and calls
///   [`BufferState::update`], which computes the next snapshot from the
///   current one with no lock held and installs it with one
///   compare-and-swap. If another thread installed a snapshot in between,
///   the swap fails and the update is recomputed from the newer snapshot.
/// - **Concurrent updates are never lost.** Two threads training one layer
///   at once see their updates applied one after the other, each exactly
///   once, in some order (updates are linearizable): with a count buffer,
///   `n` updates from any threads add exactly `n`. (Running averages with
///   momentum depend on that order, as they depend on batch order in one
///   thread.) Updates are lock-free, not wait-free: an update retries only
///   because another one succeeded.
/// - **A served version never changes.** [`Published`](crate::nn::Published)
///   versions freeze their buffer states ([`BufferState::freeze`]): a
///   forward in training mode on a version still normalises with its batch,
///   but its update is skipped (`Ok(false)`), and loading a checkpoint into
///   it is an error. Freezing is itself a swap, so no update can land after
///   `freeze` returns.
/// - **Forks are independent.** [`BufferState::fork`] starts from the same
///   snapshot (O(1): the values are shared copy-on-write) and is updated on
///   its own from then on; [`Module::try_fork`](crate::nn::Module::try_fork)
///   forks a layer's buffer states as it forks its parameters.
///
/// The tensors inside a snapshot are never written: [`Buffers::get`] hands
/// out detached tensors (O(1), copy-on-write), so writing to one changes
/// only the caller's copy.
///
/// # Examples
///
/// A running mean with a batch count, as BatchNorm keeps (momentum 0.1):
///
/// ```
/// use netcl::Tensor;
/// use netcl::nn::{BufferState, Buffers};
///
/// let state = BufferState::new(Buffers::new([
///     ("running_mean", Tensor::zeros(&[2])),
///     ("num_batches_tracked", Tensor::scalar(0.0)),
/// ])?);
///
/// // A training forward computed this batch's mean, then:
/// let batch_mean = Tensor::from_vec(vec![1.0, 2.0], &[2])?;
/// let applied = state.update(|old| {
///     let mean = old.get("running_mean").unwrap() * 0.9 + &batch_mean * 0.1;
///     let count = old.get("num_batches_tracked").unwrap() + 1.0;
///     Ok(vec![mean, count])
/// })?;
/// assert!(applied);
///
/// // A forward reads one snapshot: both buffers from the same update.
/// let now = state.load();
/// assert_eq!(now.get("running_mean").unwrap().to_vec(), vec![0.1, 0.2]);
/// assert_eq!(now.get("num_batches_tracked").unwrap().item(), 1.0);
///
/// // A frozen state (a published version's) is never updated.
/// state.freeze();
/// assert!(!state.update(|old| Ok(old.to_vec().into_iter().map(|(_, t)| t + 1.0).collect()))?);
/// assert_eq!(state.load().get("num_batches_tracked").unwrap().item(), 1.0);
/// # Ok::<(), netcl::Error>(())
/// ```
pub struct BufferState {
    current: AtomicArc<Buffers>,
}

impl BufferState {
    /// A state holding `buffers`, not frozen.
    pub fn new(buffers: Buffers) -> BufferState {
        let buffers = buffers.share(false);
        BufferState {
            current: AtomicArc::new(Arc::new(buffers)),
        }
    }

    /// The current snapshot, without taking any lock. Read every buffer a
    /// forward needs from this one snapshot.
    pub fn load(&self) -> Arc<Buffers> {
        self.current.load()
    }

    /// Replaces the buffers with `next(current)`, atomically, and returns
    /// `Ok(true)`; or returns `Ok(false)` without calling `next` if the
    /// state is frozen.
    ///
    /// `next` returns the new value of every buffer, in order, with the
    /// same shapes; it runs under [`no_grad`] with no lock held. If another
    /// thread replaced the buffers meanwhile, `next` is called again with
    /// the newer snapshot (compare-and-swap retry), so every update is
    /// applied exactly once, after the ones it raced with: no update is
    /// lost. Keep `next` a short function of the snapshot and of values
    /// computed beforehand (such as a batch's statistics), since it may
    /// run more than once.
    ///
    /// # Errors
    ///
    /// The error `next` returns, [`Error::InvalidArgument`] if it returns
    /// the wrong number of values, [`Error::ParameterMismatch`] naming the
    /// buffer whose new value has the wrong shape. Nothing changes then.
    pub fn update(&self, mut next: impl FnMut(&Buffers) -> Result<Vec<Tensor>>) -> Result<bool> {
        let _no_grad = no_grad();
        let mut current = self.current.load();
        loop {
            if current.frozen {
                return Ok(false);
            }
            let values = next(&current)?;
            let new = Arc::new(current.with_values("BufferState::update", values)?);
            match self.current.compare_and_swap(&current, new) {
                Ok(()) => return Ok(true),
                Err(found) => current = found,
            }
        }
    }

    /// Replaces every buffer with `values` (in order), atomically: loading
    /// a checkpoint.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] if the state is frozen (a published
    /// version never changes) or `values` has the wrong length,
    /// [`Error::ParameterMismatch`] naming the buffer of the wrong shape.
    /// Nothing changes then.
    pub fn store(&self, values: Vec<Tensor>) -> Result<()> {
        const OP: &str = "BufferState::store";
        let mut current = self.current.load();
        loop {
            if current.frozen {
                return Err(Error::InvalidArgument {
                    op: OP,
                    message: "the buffers are frozen (a published version never changes)"
                        .to_string(),
                });
            }
            let new = Arc::new(current.with_values(OP, values.clone())?);
            match self.current.compare_and_swap(&current, new) {
                Ok(()) => return Ok(()),
                Err(found) => current = found,
            }
        }
    }

    /// Freezes the state: no update or store changes it from now on
    /// ([`Published`](crate::nn::Published) freezes its versions'). An
    /// update racing with `freeze` either lands before it or not at all.
    pub fn freeze(&self) {
        let mut current = self.current.load();
        while !current.frozen {
            let frozen = Arc::new(current.share(true));
            match self.current.compare_and_swap(&current, frozen) {
                Ok(()) => return,
                Err(found) => current = found,
            }
        }
    }

    /// Whether the state is frozen.
    pub fn is_frozen(&self) -> bool {
        self.current.load().frozen
    }

    /// An independent state starting from the current snapshot (values
    /// shared copy-on-write, O(1) per buffer), not frozen.
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::Tensor;
    /// use netcl::nn::{BufferState, Buffers};
    ///
    /// let state = BufferState::new(Buffers::new([("count", Tensor::scalar(0.0))])?);
    /// let fork = state.fork();
    /// fork.update(|old| Ok(vec![old.get("count").unwrap() + 1.0]))?;
    /// assert_eq!(fork.load().get("count").unwrap().item(), 1.0);
    /// assert_eq!(state.load().get("count").unwrap().item(), 0.0);
    /// # Ok::<(), netcl::Error>(())
    /// ```
    pub fn fork(&self) -> BufferState {
        BufferState {
            current: AtomicArc::new(Arc::new(self.current.load().share(false))),
        }
    }
}

impl fmt::Debug for BufferState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let current = self.load();
        f.debug_struct("BufferState")
            .field("buffers", &*current)
            .field("frozen", &current.frozen)
            .finish()
    }
}

/// Prefixes every buffer state's name with `prefix` (an empty name, a
/// layer's own state, becomes `prefix`).
pub(crate) fn prefixed_states<'a>(
    prefix: &str,
    states: Vec<(String, &'a BufferState)>,
) -> Vec<(String, &'a BufferState)> {
    states
        .into_iter()
        .map(|(name, s)| (join(prefix, &name), s))
        .collect()
}

/// `prefix.name`, or either alone if the other is empty.
pub(crate) fn join(prefix: &str, name: &str) -> String {
    match (prefix.is_empty(), name.is_empty()) {
        (true, _) => name.to_string(),
        (_, true) => prefix.to_string(),
        _ => format!("{prefix}.{name}"),
    }
}
