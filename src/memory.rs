//! How netcl reuses memory: the per-thread cache of freed large buffers.
//!
//! When the last tensor holding a large buffer (64 KiB of values or more)
//! is dropped, the buffer goes to a small cache owned by the thread that
//! dropped it, and the next large buffer an op on that thread needs is
//! taken from there instead of from the allocator. A training or serving
//! loop that produces the same shapes every step then reuses its memory
//! instead of giving it back to the system and faulting it in again page
//! by page (with glibc, a rayon worker thread returns large freed blocks
//! to the system at the end of each step: `layer_norm` forward and
//! backward over `[32, 64, 128]` spent most of its time in those page
//! faults).
//!
//! # The bound
//!
//! Each thread keeps at most [`buffer_cache_limit`] bytes, in at most 8
//! buffers, oldest freed first; a buffer larger than the limit is never
//! kept. Nothing is shared between threads and no lock is taken: a thread
//! only ever reuses what it freed itself, and its cache is freed when the
//! thread exits. So the memory a process holds beyond its live tensors is
//! at most the limit times the number of threads that run ops (the
//! caller's threads and the rayon pool's).
//!
//! The limit is, in order: the last value given to
//! [`set_buffer_cache_limit`]; else the environment variable
//! `NETCL_BUFFER_CACHE_BYTES` (a whole number of bytes, read once, at the
//! first large allocation or call here; any other value is ignored); else
//! 16 MiB ([`DEFAULT_BUFFER_CACHE_LIMIT`]). `0` turns the cache off.
//!
//! A buffer taken from the cache never shows its old values: ops receive
//! it empty and write every value they return (zeros where an op starts
//! from zeros).
//!
//! # Examples
//!
//! ```
//! use netcl::{Tensor, memory};
//!
//! // Turn the cache off for the whole process (as
//! // `NETCL_BUFFER_CACHE_BYTES=0` in the environment does).
//! memory::set_buffer_cache_limit(0);
//! let x = Tensor::ones(&[256, 1024]); // 1 MiB
//! drop(x);
//! assert_eq!(memory::thread_buffer_cache_bytes(), 0);
//!
//! // Keep up to 4 MiB per thread.
//! memory::set_buffer_cache_limit(4 << 20);
//! assert_eq!(memory::buffer_cache_limit(), 4 << 20);
//! drop(Tensor::ones(&[256, 1024]));
//! assert_eq!(memory::thread_buffer_cache_bytes(), 1 << 20);
//! // The next 1 MiB tensor on this thread reuses that buffer.
//! let y = Tensor::zeros(&[1024, 256]);
//! assert_eq!(memory::thread_buffer_cache_bytes(), 0);
//! assert!(y.to_vec().iter().all(|&v| v == 0.0));
//!
//! // Give this thread's cached buffers back to the allocator now.
//! drop(y);
//! memory::clear_thread_buffer_cache();
//! assert_eq!(memory::thread_buffer_cache_bytes(), 0);
//! ```

use crate::storage::cache;

/// The limit in bytes per thread when neither [`set_buffer_cache_limit`]
/// nor the environment variable `NETCL_BUFFER_CACHE_BYTES` sets one:
/// 16 MiB.
pub const DEFAULT_BUFFER_CACHE_LIMIT: usize = cache::DEFAULT_LIMIT;

/// The most bytes of freed buffers each thread keeps for reuse (see the
/// [module documentation](self) for where the value comes from).
///
/// # Examples
///
/// ```
/// // 16 MiB unless NETCL_BUFFER_CACHE_BYTES or set_buffer_cache_limit says
/// // otherwise.
/// println!("{} bytes per thread", netcl::memory::buffer_cache_limit());
/// ```
pub fn buffer_cache_limit() -> usize {
    cache::limit()
}

/// Sets the most bytes of freed buffers each thread keeps for reuse, for
/// the whole process (it overrides `NETCL_BUFFER_CACHE_BYTES`); `0` turns
/// the cache off. A thread's cache shrinks to a lowered limit the next
/// time that thread frees or takes a large buffer; use
/// [`clear_thread_buffer_cache`] to empty the calling thread's at once.
///
/// # Examples
///
/// ```
/// netcl::memory::set_buffer_cache_limit(64 << 20);
/// assert_eq!(netcl::memory::buffer_cache_limit(), 64 << 20);
/// ```
pub fn set_buffer_cache_limit(bytes: usize) {
    cache::set_limit(bytes)
}

/// The bytes the calling thread's cache holds now (the capacities of its
/// cached buffers).
///
/// # Examples
///
/// ```
/// use netcl::{Tensor, memory};
///
/// memory::clear_thread_buffer_cache();
/// drop(Tensor::ones(&[8])); // small tensors are never cached
/// assert_eq!(memory::thread_buffer_cache_bytes(), 0);
/// ```
pub fn thread_buffer_cache_bytes() -> usize {
    cache::thread_bytes()
}

/// How many large buffers the calling thread has taken from its cache
/// instead of the allocator, since it started: with
/// [`thread_buffer_cache_bytes`], what tells whether the limit suits a
/// workload (a count that stops growing in a steady loop means its
/// buffers do not fit).
///
/// # Examples
///
/// ```
/// use netcl::{Tensor, memory};
///
/// memory::set_buffer_cache_limit(8 << 20);
/// let before = memory::thread_buffer_cache_reuses();
/// for _ in 0..3 {
///     let x = Tensor::ones(&[512, 512]); // 1 MiB
///     drop(x);
/// }
/// // The second and third tensors reused the first one's buffer.
/// assert_eq!(memory::thread_buffer_cache_reuses() - before, 2);
/// ```
pub fn thread_buffer_cache_reuses() -> u64 {
    cache::thread_reused()
}

/// Frees every buffer the calling thread's cache holds (other threads'
/// caches are theirs: each is freed when its thread exits).
///
/// # Examples
///
/// ```
/// use netcl::{Tensor, memory};
///
/// memory::set_buffer_cache_limit(8 << 20);
/// drop(Tensor::ones(&[1024, 1024])); // 4 MiB, cached
/// memory::clear_thread_buffer_cache();
/// assert_eq!(memory::thread_buffer_cache_bytes(), 0);
/// ```
pub fn clear_thread_buffer_cache() {
    cache::clear_thread()
}
