//! Connection threads: single-threaded runtimes of the server's own, each
//! serving the connections handed to it, and woken once per batch by the
//! model threads.
//!
//! # Why
//!
//! On one multi-threaded runtime (the layout of [`HttpLayout::Shared`]),
//! every reply of a model thread wakes a runtime worker (a futex or an
//! event-fd write each time), a socket's readiness is reported to whichever
//! worker polls the driver, and three busy threads (two workers and the
//! model thread) share two cores with the load; measured in BENCHMARKS.md
//! ("Connection threads"), that layout served the digits route at about
//! 0.75x the throughput of a bare axum server and at 2-3x its p99.
//!
//! # Design
//!
//! [`HttpThreads`] starts [`Config::http_threads`] threads, each running
//! one current-thread runtime that owns its connections outright: their
//! sockets are registered with its driver, their timers are in its wheel,
//! their tasks run on it and on no other thread. The accept loop hands each
//! new connection, as a std socket, to the thread with the fewest open
//! connections. With [`HttpLayout::PerCore`] each thread is pinned to its
//! own CPU: left to the scheduler, two connection threads sometimes share
//! one core for seconds while the other runs the load or the model
//! thread, and their requests wait out each other's time slices (p99 2-4x
//! that of the pinned layout in the same runs, BENCHMARKS.md).
//!
//! Each thread has an [`Inbox`]. A request that came in on a connection
//! thread queues its job with that inbox; the model thread that answers a
//! batch puts each reply in its request's inbox, then wakes each inbox it
//! touched once. The inbox's task, on the connection thread, completes the
//! replies, which wakes the handlers within the thread at no cost. So a
//! batch of `n` requests from one thread costs one cross-thread wake
//! instead of `n`. Requests that come in on other runtimes (a router
//! nested in an application of one's own) have no inbox and are answered
//! directly, as before.
//!
//! The other way round, a handler that queued a job does not wake the
//! model thread itself: [`ring`] leaves the model's doorbell to the
//! thread's ringing task, which a local wake puts behind every task already
//! ready, so the model thread wakes once, to all the requests the thread
//! has just read, instead of to the first of them.
//!
//! [`Config::http_threads`]: crate::Config::http_threads
//! [`HttpLayout::Shared`]: crate::HttpLayout::Shared
//! [`HttpLayout::PerCore`]: crate::HttpLayout::PerCore

use std::cell::RefCell;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};
use tokio::sync::{Notify, oneshot};

use crate::batcher::{Doorbell, Prediction};

/// A reply and where it goes.
type Reply = (
    oneshot::Sender<Result<Prediction, String>>,
    Result<Prediction, String>,
);

thread_local! {
    /// The inbox of the connection thread this is, if it is one.
    static CURRENT: RefCell<Option<Arc<Inbox>>> = const { RefCell::new(None) };
    /// The doorbells a connection thread rings at the end of its burst.
    static OUTBOX: RefCell<Option<Outbox>> = const { RefCell::new(None) };
}

/// The doorbells to ring once the requests ready on a connection thread
/// have all been queued.
struct Outbox {
    pending: Vec<Arc<Doorbell>>,
    /// Wakes the task that rings them.
    flush: Arc<Notify>,
}

/// Rings `doorbell` after a job was queued: at once, or on a connection
/// thread, once the other tasks ready on it have run.
///
/// A connection thread serves the requests that arrived together one after
/// the other; ringing at the first would wake the model thread to a batch
/// of one while the rest are still being parsed. The ringing task is woken
/// locally (no system call) and runs behind every task already ready, so
/// the model thread wakes once, to all of them.
pub(crate) fn ring(doorbell: &Arc<Doorbell>) {
    let deferred = OUTBOX.with(|outbox| match &mut *outbox.borrow_mut() {
        Some(outbox) => {
            if outbox.pending.is_empty() {
                outbox.flush.notify_one();
            }
            if !outbox.pending.iter().any(|d| Arc::ptr_eq(d, doorbell)) {
                outbox.pending.push(Arc::clone(doorbell));
            }
            true
        }
        None => false,
    });
    if !deferred {
        doorbell.ring();
    }
}

/// The connection thread's ringing task.
async fn flush(notify: Arc<Notify>) {
    loop {
        notify.notified().await;
        let pending = OUTBOX.with(|outbox| {
            outbox
                .borrow_mut()
                .as_mut()
                .map(|outbox| std::mem::take(&mut outbox.pending))
        });
        for doorbell in pending.into_iter().flatten() {
            doorbell.ring();
        }
    }
}

/// The replies waiting for one connection thread, and its wake-up.
#[derive(Debug)]
pub(crate) struct Inbox {
    sender: Sender<Reply>,
    receiver: Receiver<Reply>,
    notify: Notify,
    stop: AtomicBool,
}

impl Inbox {
    fn new() -> Inbox {
        let (sender, receiver) = crossbeam_channel::unbounded();
        Inbox {
            sender,
            receiver,
            notify: Notify::new(),
            stop: AtomicBool::new(false),
        }
    }

    /// The calling thread's inbox, when it is a connection thread.
    pub(crate) fn current() -> Option<Arc<Inbox>> {
        CURRENT.with(|current| current.borrow().clone())
    }

    /// Queues a reply; it is sent at the next [`Inbox::wake`].
    pub(crate) fn push(
        &self,
        reply: oneshot::Sender<Result<Prediction, String>>,
        result: Result<Prediction, String>,
    ) {
        // Cannot fail: the inbox holds the receiver.
        let _ = self.sender.send((reply, result));
    }

    /// Has the connection thread send every queued reply. One wake for any
    /// number of pushes before it.
    pub(crate) fn wake(&self) {
        self.notify.notify_one();
    }

    /// Sends what is queued until [`Inbox::stop`].
    async fn run(&self) {
        loop {
            // A wake before this point leaves a permit: none is lost.
            self.notify.notified().await;
            for (reply, result) in self.receiver.try_iter() {
                // The handler may have timed out since: nothing to do.
                let _ = reply.send(result);
            }
            if self.stop.load(Ordering::Acquire) {
                return;
            }
        }
    }

    fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        self.notify.notify_one();
    }
}

/// One connection thread.
struct HttpThread {
    handle: tokio::runtime::Handle,
    inbox: Arc<Inbox>,
    /// Its open connections.
    open: Arc<AtomicUsize>,
    join: JoinHandle<()>,
}

/// The connection threads of a server ([`HttpLayout::PerCore`],
/// [`HttpLayout::PerThread`]).
///
/// [`HttpLayout::PerCore`]: crate::HttpLayout::PerCore
/// [`HttpLayout::PerThread`]: crate::HttpLayout::PerThread
pub(crate) struct HttpThreads {
    threads: Vec<HttpThread>,
}

impl HttpThreads {
    /// Starts `count` (at least 1) threads named `netcl-http-{i}`; with
    /// `pin`, each pins itself to a CPU of its own ([`Claims`]) where the
    /// OS allows it.
    pub(crate) fn start(count: usize, pin: bool) -> std::io::Result<HttpThreads> {
        let claims = pin.then(|| Arc::new(Claims::new(allowed_cpus())));
        let mut threads = Vec::with_capacity(count.max(1));
        for i in 0..count.max(1) {
            let claims = claims.clone();
            let mut builder = tokio::runtime::Builder::new_current_thread();
            builder.enable_all();
            if let Some(claims) = &claims {
                // A thread inherits its creator's affinity: the runtime's
                // blocking threads (generations run there) get back every
                // CPU the process may use, not the one of their thread.
                let allowed = claims.allowed.clone();
                builder.on_thread_start(move || set_affinity(&allowed, "a blocking thread"));
            }
            let runtime = builder.build()?;
            let handle = runtime.handle().clone();
            let inbox = Arc::new(Inbox::new());
            let own = Arc::clone(&inbox);
            let spawned = std::thread::Builder::new()
                .name(format!("netcl-http-{i}"))
                .spawn(move || {
                    if let Some(cpu) = claims.and_then(|claims| claims.claim()) {
                        set_affinity(&[cpu], "a connection thread");
                    }
                    CURRENT.with(|current| *current.borrow_mut() = Some(Arc::clone(&own)));
                    let notify = Arc::new(Notify::new());
                    OUTBOX.with(|outbox| {
                        *outbox.borrow_mut() = Some(Outbox {
                            pending: Vec::new(),
                            flush: Arc::clone(&notify),
                        })
                    });
                    // A task like the connections', queued behind them.
                    runtime.spawn(flush(notify));
                    runtime.block_on(own.run());
                    // Dropping the runtime here cancels what is left on it
                    // (connections the drain gave up on).
                });
            let join = match spawned {
                Ok(join) => join,
                Err(err) => {
                    // Stop those already started before reporting.
                    for thread in (HttpThreads { threads }).stop() {
                        let _ = thread.join();
                    }
                    return Err(err);
                }
            };
            threads.push(HttpThread {
                handle,
                inbox,
                open: Arc::default(),
                join,
            });
        }
        Ok(HttpThreads { threads })
    }

    /// Runs `serve` for a connection on the thread with the fewest open
    /// connections, its socket registered with that thread's runtime. A
    /// socket that cannot be registered is closed and logged.
    pub(crate) fn spawn<F, Fut>(&self, stream: std::net::TcpStream, serve: F)
    where
        F: FnOnce(tokio::net::TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let Some(thread) = self
            .threads
            .iter()
            .min_by_key(|thread| thread.open.load(Ordering::Relaxed))
        else {
            return;
        };
        let open = OpenGuard::new(&thread.open);
        thread.handle.spawn(async move {
            let _open = open;
            match tokio::net::TcpStream::from_std(stream) {
                Ok(stream) => serve(stream).await,
                Err(err) => tracing::error!("cannot register a connection: {err}"),
            }
        });
    }

    /// Stops every thread once it has sent the replies queued so far, and
    /// returns them to join. Connections still open on them are dropped.
    pub(crate) fn stop(mut self) -> Vec<JoinHandle<()>> {
        std::mem::take(&mut self.threads)
            .into_iter()
            .map(|thread| {
                thread.inbox.stop();
                thread.join
            })
            .collect()
    }
}

impl Drop for HttpThreads {
    /// Threads not stopped with [`HttpThreads::stop`] (a start-up that
    /// failed after them) are stopped without waiting.
    fn drop(&mut self) {
        for thread in &self.threads {
            thread.inbox.stop();
        }
    }
}

/// Which CPU each connection thread of one server pins itself to.
///
/// A thread takes the CPU the OS started it on, unless a sibling took it
/// first, and else the least taken of the CPUs the process may use. Not
/// simply the `i`-th: the OS starts a new thread on an idle CPU where it
/// can, so the servers sharing a machine (a trainer and its replicas, say)
/// spread over its CPUs instead of all pinning to the first ones.
struct Claims {
    allowed: Vec<usize>,
    /// Threads pinned to each of `allowed`.
    taken: std::sync::Mutex<Vec<usize>>,
}

impl Claims {
    fn new(allowed: Vec<usize>) -> Claims {
        let taken = std::sync::Mutex::new(vec![0; allowed.len()]);
        Claims { allowed, taken }
    }

    /// The calling thread's CPU (none when no CPU is known).
    fn claim(&self) -> Option<usize> {
        self.claim_from(current_cpu())
    }

    fn claim_from(&self, here: Option<usize>) -> Option<usize> {
        let mut taken = self
            .taken
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let free_here = here
            .and_then(|cpu| self.allowed.iter().position(|&c| c == cpu))
            .filter(|&i| taken[i] == 0);
        let pick = free_here.or_else(|| (0..taken.len()).min_by_key(|&i| taken[i]))?;
        taken[pick] += 1;
        Some(self.allowed[pick])
    }
}

/// The CPU the calling thread runs on.
#[cfg(target_os = "linux")]
fn current_cpu() -> Option<usize> {
    Some(rustix::thread::sched_getcpu())
}

#[cfg(not(target_os = "linux"))]
fn current_cpu() -> Option<usize> {
    None
}

/// The CPUs the calling thread may run on, in order (none where that
/// cannot be known).
#[cfg(target_os = "linux")]
fn allowed_cpus() -> Vec<usize> {
    use rustix::thread::{CpuSet, sched_getaffinity};
    match sched_getaffinity(None) {
        Ok(set) => (0..CpuSet::MAX_CPU)
            .filter(|&cpu| set.is_set(cpu))
            .collect(),
        Err(err) => {
            tracing::warn!("cannot read the CPU affinity, connection threads not pinned: {err}");
            Vec::new()
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn allowed_cpus() -> Vec<usize> {
    tracing::debug!("connection threads are pinned on Linux only");
    Vec::new()
}

/// Lets the calling thread (`what`) run on `cpus` only; logs if refused
/// (and it runs where it did).
#[cfg(target_os = "linux")]
fn set_affinity(cpus: &[usize], what: &str) {
    use rustix::thread::{CpuSet, sched_setaffinity};
    let mut set = CpuSet::new();
    for &cpu in cpus {
        set.set(cpu);
    }
    if let Err(err) = sched_setaffinity(None, &set) {
        tracing::warn!(?cpus, "cannot set the CPUs of {what}: {err}");
    }
}

#[cfg(not(target_os = "linux"))]
fn set_affinity(_cpus: &[usize], _what: &str) {}

/// Counts a connection as open on its thread while it lives.
struct OpenGuard(Arc<AtomicUsize>);

impl OpenGuard {
    fn new(open: &Arc<AtomicUsize>) -> OpenGuard {
        open.fetch_add(1, Ordering::Relaxed);
        OpenGuard(Arc::clone(open))
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn prediction(version: u64) -> Prediction {
        Prediction {
            classes: vec![1],
            values: vec![0.25, 0.75],
            width: 2,
            version,
        }
    }

    /// Stopping sends what was queued before the stop, then the thread
    /// ends; a ring off the connection threads wakes the model thread at
    /// once.
    #[test]
    fn stop_sends_what_is_queued_and_rings_elsewhere_are_immediate() {
        let threads = HttpThreads::start(1, false).unwrap();
        let inbox = Arc::clone(&threads.threads[0].inbox);
        let (sender, mut receiver) = oneshot::channel();
        inbox.push(sender, Ok(prediction(7)));
        for thread in threads.stop() {
            thread.join().unwrap();
        }
        assert_eq!(receiver.try_recv().unwrap().unwrap().version, 7);

        // This test's thread has no outbox: the ring is not deferred, so
        // the parked thread wakes without any task to run it.
        let parked = std::thread::spawn(std::thread::park);
        let doorbell = Arc::new(Doorbell::new(std::slice::from_ref(&parked)));
        ring(&doorbell);
        parked.join().unwrap();
    }

    /// A client socket connected to `listener`, and the server's side of
    /// it, non-blocking as the accept loop hands it over.
    fn connection(listener: &std::net::TcpListener) -> (std::net::TcpStream, std::net::TcpStream) {
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        server.set_nonblocking(true).unwrap();
        (client, server)
    }

    /// The CPUs the calling thread may run on, from `/proc`.
    #[cfg(target_os = "linux")]
    fn own_cpus() -> String {
        let status = std::fs::read_to_string("/proc/thread-self/status").unwrap();
        status
            .lines()
            .find_map(|line| line.strip_prefix("Cpus_allowed_list:"))
            .unwrap()
            .trim()
            .to_string()
    }

    /// A pinned connection thread runs on one CPU, but the blocking threads
    /// its runtime starts (which inherit its affinity) get back every CPU
    /// the process may use.
    #[cfg(target_os = "linux")]
    #[test]
    fn blocking_threads_of_a_pinned_thread_run_anywhere() {
        let ours = own_cpus();
        let threads = HttpThreads::start(1, true).unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let (client, server) = connection(&listener);
        let (tx, rx) = std::sync::mpsc::channel();
        threads.spawn(server, move |_stream| async move {
            let pinned = own_cpus();
            let blocking = tokio::task::spawn_blocking(own_cpus).await.unwrap();
            tx.send((pinned, blocking)).unwrap();
        });
        let (pinned, blocking) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert!(pinned.parse::<usize>().is_ok(), "pinned to {pinned:?}");
        assert_eq!(blocking, ours);
        drop(client);
        for thread in threads.stop() {
            thread.join().unwrap();
        }
    }

    /// Replies pushed from another thread arrive after one wake, each to
    /// its own receiver, on the connection thread.
    #[test]
    fn one_wake_sends_every_reply_queued_before_it() {
        let threads = HttpThreads::start(1, false).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        // A task on the connection thread awaits ten replies.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let (client, server) = connection(&listener);
        threads.spawn(server, move |_stream| async move {
            let inbox = Inbox::current().expect("a connection thread has an inbox");
            let (senders, receivers): (Vec<_>, Vec<_>) =
                (0..10).map(|_| oneshot::channel()).unzip();
            let name = std::thread::current().name().map(str::to_string);
            // Queue every reply from a thread of its own, then wake once.
            let pusher = std::thread::spawn(move || {
                for (i, sender) in senders.into_iter().enumerate() {
                    inbox.push(sender, Ok(prediction(i as u64)));
                }
                inbox.wake();
            });
            let mut versions = Vec::new();
            for receiver in receivers {
                versions.push(receiver.await.unwrap().unwrap().version);
            }
            pusher.join().unwrap();
            tx.send((versions, name)).unwrap();
        });
        let (versions, name) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(versions, (0..10).collect::<Vec<u64>>());
        assert_eq!(name.as_deref(), Some("netcl-http-0"));
        drop(client);
        for thread in threads.stop() {
            thread.join().unwrap();
        }
    }

    /// A thread keeps the CPU it started on unless a sibling has it; then
    /// it takes the least taken; nothing to claim without known CPUs.
    #[test]
    fn claims_spread_threads_over_the_allowed_cpus() {
        let claims = Claims::new(vec![2, 3, 5]);
        assert_eq!(claims.claim_from(Some(3)), Some(3));
        // Taken: the least taken, the first of them.
        assert_eq!(claims.claim_from(Some(3)), Some(2));
        // Not allowed, or unknown: the least taken.
        assert_eq!(claims.claim_from(Some(7)), Some(5));
        assert_eq!(claims.claim_from(None), Some(2));
        assert_eq!(claims.claim_from(Some(5)), Some(3));
        assert_eq!(*claims.taken.lock().unwrap(), [2, 2, 1]);
        assert_eq!(Claims::new(Vec::new()).claim_from(Some(0)), None);
    }

    /// New connections go to the thread with the fewest open, and a
    /// thread's count falls when its connection ends.
    #[test]
    fn connections_go_to_the_least_busy_thread() {
        let threads = HttpThreads::start(2, false).unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let (names_tx, names_rx) = std::sync::mpsc::channel();
        let mut ends = Vec::new();
        let mut clients = Vec::new();
        for _ in 0..4 {
            let (client, server) = connection(&listener);
            clients.push(client);
            let (end, ended) = oneshot::channel::<()>();
            ends.push(end);
            let names_tx = names_tx.clone();
            threads.spawn(server, move |_stream| async move {
                let name = std::thread::current().name().unwrap().to_string();
                names_tx.send(name).unwrap();
                let _ = ended.await;
            });
            // The count is taken at spawn, so no need to wait for the task.
        }
        let mut names: Vec<String> = (0..4)
            .map(|_| names_rx.recv_timeout(Duration::from_secs(10)).unwrap())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "netcl-http-0",
                "netcl-http-0",
                "netcl-http-1",
                "netcl-http-1"
            ]
        );
        let open: Vec<usize> = threads
            .threads
            .iter()
            .map(|t| t.open.load(Ordering::Relaxed))
            .collect();
        assert_eq!(open, [2, 2]);
        // Each count falls back as its connections end.
        drop(ends);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while threads
            .threads
            .iter()
            .any(|t| t.open.load(Ordering::Relaxed) != 0)
        {
            assert!(
                std::time::Instant::now() < deadline,
                "connections never ended"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        drop(clients);
        for thread in threads.stop() {
            thread.join().unwrap();
        }
    }
}
