//! The synchronisation shim: the only file that names `parking_lot` or `loom`.
//!
//! Normal builds use `parking_lot` locks and `std` atomics. Under `--cfg loom`
//! every primitive here is loom's, so the model checker in `loom-tests/` sees
//! (and permutes) each lock acquisition and atomic access the crate makes.
//! `lock()` returns a guard directly in both (loom's returns a
//! `LockResult`, which is unwrapped here; netcl never poisons a lock because
//! no user code runs while one of its locks is held). [`AtomicArc`] is
//! `arc_swap::ArcSwap` normally and a reader-writer lock under loom.
//!
//! # What goes through here, and what does not
//!
//! Every primitive that takes part in a protocol the loom models check goes
//! through `crate::sync`: a tensor's values, its writer lock and gradient,
//! the tape's arena and `Arc`, the thread context, published model
//! versions (an [`AtomicArc`]). The crate names `std::sync` and
//! `std::thread` directly in three kinds of place, on purpose:
//!
//! - **public types**: `Arc<M>` is a `Module` and `Arc<D>` a `Dataset`
//!   (`nn`, `data`), and `Trainer` and `DataLoader` hold datasets in the
//!   caller's `Arc`: users pass `std::sync::Arc`, so that is what these name;
//! - **OS threads a model cannot host**: the data loader's background thread
//!   and its stop flag (`data/loader.rs`); loom models run none of it;
//! - **counters and flags with no ordering duty**: tape ids, Dropout's layer
//!   ids and generations, a module's own training flag, `Trainer`'s stop
//!   flag (`train::StopHandle`; all `Relaxed`, read for their value alone);
//! - **immutable shared values that loom's `Arc` cannot hold** (it does not
//!   coerce to unsized types): the shared form of a backward function in the
//!   tape (`Arc<dyn Backward>`), and a tensor's value buffer (`Arc<[f32]>` in
//!   `storage.rs`, filled by `ops/gemm.rs` before it is shared). A buffer is
//!   never written once shared. A writer reuses a buffer only through
//!   `Arc::get_mut` (which synchronises with the drops of every other
//!   handle) on the spare it swapped out under the tensor's locks; those
//!   locks go through here, so the models see the protocol around the
//!   buffer, not the buffer's own reference count.

#[cfg(not(loom))]
pub(crate) use std::sync::Arc;
#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicBool, Ordering};

#[cfg(loom)]
pub(crate) use loom::sync::Arc;
#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicBool, Ordering};

/// A mutual-exclusion lock (`parking_lot::Mutex`, or loom's under `cfg(loom)`).
pub(crate) struct Mutex<T>(
    #[cfg(not(loom))] parking_lot::Mutex<T>,
    #[cfg(loom)] loom::sync::Mutex<T>,
);

/// The guard of [`Mutex`].
#[cfg(not(loom))]
pub(crate) type MutexGuard<'a, T> = parking_lot::MutexGuard<'a, T>;
/// The guard of [`Mutex`].
#[cfg(loom)]
pub(crate) type MutexGuard<'a, T> = loom::sync::MutexGuard<'a, T>;

impl<T> Mutex<T> {
    pub(crate) fn new(value: T) -> Self {
        #[cfg(not(loom))]
        return Self(parking_lot::Mutex::new(value));
        #[cfg(loom)]
        return Self(loom::sync::Mutex::new(value));
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, T> {
        #[cfg(not(loom))]
        return self.0.lock();
        #[cfg(loom)]
        return self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
    }
}

/// A shared `Arc` that readers load without taking any lock and writers
/// replace whole (read-copy-update): `arc_swap::ArcSwap`, or under loom an
/// `RwLock<Arc<T>>` held only to clone or swap the `Arc`, which loom can
/// model (arc-swap's own atomics are invisible to it).
pub(crate) struct AtomicArc<T>(
    #[cfg(not(loom))] arc_swap::ArcSwap<T>,
    #[cfg(loom)] loom::sync::RwLock<Arc<T>>,
);

impl<T> AtomicArc<T> {
    pub(crate) fn new(value: Arc<T>) -> Self {
        #[cfg(not(loom))]
        return Self(arc_swap::ArcSwap::new(value));
        #[cfg(loom)]
        return Self(loom::sync::RwLock::new(value));
    }

    /// The current value. Never waits: a writer replacing the value at the
    /// same time leaves this reader with the old value or the new one.
    pub(crate) fn load(&self) -> Arc<T> {
        #[cfg(not(loom))]
        return self.0.load_full();
        #[cfg(loom)]
        return self
            .0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
    }

    /// Replaces the value and returns the old one (dropped by the caller,
    /// outside any lock).
    pub(crate) fn swap(&self, value: Arc<T>) -> Arc<T> {
        #[cfg(not(loom))]
        return self.0.swap(value);
        #[cfg(loom)]
        return std::mem::replace(
            &mut *self
                .0
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
            value,
        );
    }
}

impl<T> AtomicArc<T> {
    /// Replaces the value with `new` if it is still `current` (the same
    /// allocation): `Ok(())`, or `Err` with the value found instead (and
    /// `new` dropped). Never waits for a computation: the caller computes
    /// `new` from `current` before, with no lock held, and retries on `Err`.
    /// Holding `current` keeps its allocation alive, so a pointer match
    /// cannot be an ABA coincidence.
    pub(crate) fn compare_and_swap(&self, current: &Arc<T>, new: Arc<T>) -> Result<(), Arc<T>> {
        #[cfg(not(loom))]
        {
            let found = self.0.compare_and_swap(current, new);
            if Arc::ptr_eq(&found, current) {
                Ok(())
            } else {
                Err(arc_swap::Guard::into_inner(found))
            }
        }
        #[cfg(loom)]
        {
            let mut slot = self
                .0
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if Arc::ptr_eq(&slot, current) {
                let old = std::mem::replace(&mut *slot, new);
                drop(slot);
                drop(old);
                Ok(())
            } else {
                let found = slot.clone();
                drop(slot);
                drop(new);
                Err(found)
            }
        }
    }
}

/// Declares a thread-local. std's form takes a `const` initialiser (no lazy
/// init check on access); loom's has none and gives every modelled thread its
/// own copy.
macro_rules! thread_local_const {
    ($(#[$attr:meta])* static $name:ident: $ty:ty = $init:expr;) => {
        #[cfg(not(loom))]
        std::thread_local! { $(#[$attr])* static $name: $ty = const { $init }; }
        #[cfg(loom)]
        loom::thread_local! { $(#[$attr])* static $name: $ty = $init; }
    };
}
pub(crate) use thread_local_const;
