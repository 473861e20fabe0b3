//! Connection slots, and which connection gives its slot up when they are
//! all taken.
//!
//! The server holds at most [`Config::max_connections`] connections. Before,
//! the accept loop simply stopped accepting when every slot was taken, so a
//! client that opened that many connections and sent nothing (or trickled
//! its headers a byte at a time) locked every other client out until the
//! idle timeout closed them, and could do it again right after.
//!
//! Now, when every slot is taken, the accept loop accepts the next
//! connection anyway and asks the longest-open *idle* connection to close,
//! then takes its slot:
//!
//! - a connection is **busy** from the moment a request reaches the service
//!   (hyper has parsed its headers) until the service's response future
//!   completes, plus [`RESPONSE_GRACE`] so that a response still being
//!   written is not cut; otherwise it is **idle** (waiting for a request's
//!   headers, or for the next request of a keep-alive connection);
//! - idle connections that never delivered a request go first (silent
//!   connections, trickled headers), then idle ones that did; the
//!   longest-open first within each group;
//! - when every connection is busy, the accept loop waits for a slot as it
//!   always did, looking again every [`RETRY`] for one that became idle.
//!
//! One eviction at a time: the accept loop does not choose another until
//! the chosen connection has closed or refused.
//!
//! # Nothing in flight is lost
//!
//! The accept loop's view of a connection can be stale by the time the
//! connection sees the request to close: a request may have arrived in
//! between. So the decision is the connection's own: its task, which is the
//! only one that polls hyper's connection future (and so the only one that
//! calls the service and completes its futures), checks again that it is
//! idle, and only then drops the connection future, which closes the
//! socket; a connection that became busy refuses and goes on serving. A
//! dropped idle connection has no request in the service, so nothing is
//! lost; for the graceful shutdown it is one connection fewer to wait for.
//!
//! [`Config::max_connections`]: crate::Config::max_connections

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

/// How long a connection stays busy after its last response future
/// completed: the response is written after that, and a client reading it
/// should not be cut off. The responses are small (a few KiB), so they are
/// written at once unless the client stops reading, which the stall timeout
/// handles anyway.
pub(crate) const RESPONSE_GRACE: Duration = Duration::from_secs(1);

/// While every connection is busy, how often the accept loop looks again
/// for one that became idle (the grace of a finished response ends without
/// a wake-up).
pub(crate) const RETRY: Duration = Duration::from_millis(100);

/// The open connections, in the order they were accepted.
type Open = BTreeMap<u64, Arc<Activity>>;

/// The connection slots of the accept loop.
pub(crate) struct Slots {
    permits: Arc<Semaphore>,
    open: Arc<Mutex<Open>>,
    epoch: Instant,
    next_id: u64,
}

impl Slots {
    /// `max` slots (at least 1).
    pub(crate) fn new(max: usize) -> Slots {
        Slots {
            permits: Arc::new(Semaphore::new(max.max(1))),
            open: Arc::default(),
            epoch: Instant::now(),
            next_id: 0,
        }
    }

    /// A slot for a connection just accepted: a free one, or the slot of
    /// an idle connection asked to close; if every connection is busy,
    /// waits until one closes or becomes idle. Cancel-safe.
    pub(crate) async fn take(&mut self) -> Slot {
        let permit = loop {
            if let Ok(permit) = Arc::clone(&self.permits).try_acquire_owned() {
                break permit;
            }
            self.evict_one();
            tokio::select! {
                permit = Arc::clone(&self.permits).acquire_owned() => {
                    break permit.expect("the semaphore is never closed");
                }
                () = tokio::time::sleep(RETRY) => {}
            }
        };
        let id = self.next_id;
        self.next_id += 1;
        let activity = Arc::new(Activity {
            epoch: self.epoch,
            in_flight: AtomicU32::new(0),
            last_done: AtomicU64::new(0),
            chosen: AtomicBool::new(false),
            evict: Notify::new(),
        });
        lock(&self.open).insert(id, Arc::clone(&activity));
        Slot {
            id,
            activity,
            open: Arc::clone(&self.open),
            _permit: permit,
        }
    }

    /// Asks the longest-open idle connection to close, those that never
    /// delivered a request first; does nothing while an earlier choice has
    /// not answered yet, or when every connection is busy.
    fn evict_one(&self) {
        let open = lock(&self.open);
        if open.values().any(|c| c.chosen.load(Ordering::Acquire)) {
            return;
        }
        let now = now_ns(self.epoch);
        let chosen = open
            .values()
            .find(|c| c.never_served() && c.idle(now))
            .or_else(|| open.values().find(|c| c.idle(now)));
        if let Some(activity) = chosen {
            activity.chosen.store(true, Ordering::Release);
            activity.evict.notify_one();
        }
    }
}

/// What a connection's slot knows of it: whether a request is in the
/// service, when the last one finished, and whether it was asked to close.
pub(crate) struct Activity {
    epoch: Instant,
    /// Requests in the service (0 or 1 with HTTP/1.1).
    in_flight: AtomicU32,
    /// When the last response future completed, in nanoseconds since the
    /// epoch plus one; 0 while none has.
    last_done: AtomicU64,
    /// Set by the accept loop when it asks this connection to close;
    /// cleared by a connection that refuses (it became busy meanwhile).
    chosen: AtomicBool,
    evict: Notify,
}

impl Activity {
    /// Marks a request as in the service until the returned guard drops
    /// (when the service's future completes, or is dropped).
    pub(crate) fn begin_request(self: &Arc<Self>) -> Busy {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        Busy(Arc::clone(self))
    }

    fn never_served(&self) -> bool {
        self.last_done.load(Ordering::Acquire) == 0
    }

    /// No request in the service, and the last response (if any) finished
    /// at least [`RESPONSE_GRACE`] before `now`.
    fn idle(&self, now: u64) -> bool {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return false;
        }
        let done = self.last_done.load(Ordering::Acquire);
        done == 0 || now.saturating_sub(done) >= nanos(RESPONSE_GRACE)
    }
}

/// A request in the service; dropping it records when it finished.
pub(crate) struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        let activity = &self.0;
        activity
            .last_done
            .store(now_ns(activity.epoch), Ordering::Release);
        activity.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One connection's slot: frees it when dropped.
pub(crate) struct Slot {
    id: u64,
    activity: Arc<Activity>,
    open: Arc<Mutex<Open>>,
    _permit: OwnedSemaphorePermit,
}

impl Slot {
    /// The connection's activity, for its service to mark requests with.
    pub(crate) fn activity(&self) -> Arc<Activity> {
        Arc::clone(&self.activity)
    }

    /// Runs `connection` to its end, or until the accept loop asks this
    /// connection to close while it is idle: then drops it (closing the
    /// socket) and returns `None`.
    pub(crate) async fn run<F: Future>(&self, connection: F) -> Option<F::Output> {
        let activity = &self.activity;
        let mut connection = std::pin::pin!(connection);
        loop {
            tokio::select! {
                output = &mut connection => return Some(output),
                () = activity.evict.notified() => {
                    // Only this task calls the service (by polling
                    // `connection`), so nothing can start between this
                    // check and the drop.
                    if activity.idle(now_ns(activity.epoch)) {
                        return None;
                    }
                    activity.chosen.store(false, Ordering::Release);
                }
            }
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        // Before the permit (a field) is released, so that the accept loop
        // never sees the slot free while the connection is still listed.
        lock(&self.open).remove(&self.id);
    }
}

/// Nanoseconds since `epoch`, plus one (0 means "never").
fn now_ns(epoch: Instant) -> u64 {
    nanos(epoch.elapsed()).saturating_add(1)
}

fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

/// Locks the list of open connections, ignoring poisoning (nothing that
/// holds the lock can panic).
fn lock(open: &Mutex<Open>) -> MutexGuard<'_, Open> {
    open.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_full_server_closes_the_oldest_idle_connection_never_served_first() {
        let mut slots = Slots::new(3);
        let served = slots.take().await;
        drop(served.activity().begin_request());
        let silent = slots.take().await;
        let busy = slots.take().await;
        let _request = busy.activity().begin_request();
        // `served` is within its grace, `busy` has a request in flight:
        // `silent` is the only one that may go.
        let run = |slot: Slot| {
            tokio::spawn(async move {
                // The slot is freed when the task ends.
                slot.run(std::future::pending::<()>()).await.is_none()
            })
        };
        let (served, silent, busy) = (run(served), run(silent), run(busy));
        let fourth = tokio::time::timeout(Duration::from_secs(1), slots.take())
            .await
            .expect("a slot once the silent connection closed");
        assert!(silent.await.unwrap(), "the silent connection was evicted");
        let _fourth_request = fourth.activity().begin_request();
        // Every connection is now busy or within its grace: the next one
        // waits.
        assert!(
            tokio::time::timeout(Duration::from_millis(300), slots.take())
                .await
                .is_err()
        );
        assert!(!served.is_finished() && !busy.is_finished());
        // Past its grace, the served connection goes; the busy one never.
        tokio::time::sleep(RESPONSE_GRACE).await;
        let _fifth = tokio::time::timeout(Duration::from_secs(1), slots.take())
            .await
            .expect("a slot once the served connection closed");
        assert!(served.await.unwrap());
        assert!(!busy.is_finished());
    }

    #[tokio::test]
    async fn a_connection_that_became_busy_refuses_to_close() {
        let mut slots = Slots::new(1);
        let slot = slots.take().await;
        // Chosen while idle...
        slots.evict_one();
        assert!(slot.activity.chosen.load(Ordering::Acquire));
        // ...but a request reached the service before the connection saw
        // the request to close.
        let request = slot.activity().begin_request();
        let ended = tokio::time::timeout(
            Duration::from_millis(100),
            slot.run(std::future::pending::<()>()),
        )
        .await;
        assert!(ended.is_err(), "a busy connection was dropped");
        assert!(!slot.activity.chosen.load(Ordering::Acquire));
        drop(request);
    }
}
