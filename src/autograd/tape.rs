//! The tape: an arena of graph nodes behind one lock.
//!
//! # Design
//!
//! A node is one recorded op: its backward function (which owns the saved
//! tensors), its input edges and a sequence number. Nodes live in `slots`, a
//! `Vec` reused through a free list, so a steady training loop allocates no
//! node storage after its first step.
//!
//! A node is reference counted *inside* the arena: one count for the tensor
//! the op produced, one for each later node that consumes that tensor. When a
//! count reaches zero the slot is freed at once and its inputs are released
//! in turn (iteratively, so dropping a 100,000-node chain needs no deep
//! stack). Everything a freed node owned (backward closures, leaf handles) is
//! dropped *after* the lock is released, because dropping it may release
//! nodes again.
//!
//! Slots are reused, so index order is not creation order: the sequence
//! number is. A node's inputs always exist before it, so sorting by sequence
//! number gives a topological order.
//!
//! The lock is held for a push, a release or a backward's graph collection,
//! never while user code or a backward function runs, and never while a
//! tensor's own locks are taken. The lock order is therefore trivial: a tape
//! lock is always innermost.

use std::cell::{Cell, RefCell};
use std::cmp::Reverse;
use std::fmt;
use std::sync::atomic::AtomicU64 as IdCounter;

use smallvec::SmallVec;

use crate::autograd::function::Backward;
use crate::error::{Error, Result};
use crate::sync::{Arc, Mutex, thread_local_const};
use crate::tensor::Tensor;

/// Tape ids only label tapes in errors and `Debug`; a plain std counter is
/// enough (loom atomics cannot live in statics).
static NEXT_TAPE_ID: IdCounter = IdCounter::new(1);

/// The arena that records the graph of operations, shared by `Arc`.
///
/// Each thread records into its *current* tape, created lazily on first use
/// ([`current_tape`](crate::autograd::current_tape)); a [`GradMode`]
/// snapshot carries it to other threads so that parallel workers record into
/// their caller's tape. An op whose inputs already belong to a tape records on
/// that tape, whichever thread runs it.
///
/// Nodes are freed as soon as no tensor can reach them, and their storage is
/// reused: in a training loop whose tensors die at the end of each step,
/// [`len`](Tape::len) returns to 0 after every step. A tensor kept alive
/// across steps that still holds its graph keeps that graph on the tape, which
/// is how [`stats`](Tape::stats) reveals a forgotten `no_grad`.
///
/// [`GradMode`]: crate::autograd::GradMode
///
/// # Examples
///
/// ```
/// use netcl::{Tensor, autograd};
///
/// let tape = autograd::current_tape();
/// let w = Tensor::ones(&[3]).requires_grad_(true);
/// {
///     let loss = (&w * 2.0).sum();
///     assert_eq!(tape.len(), 2); // mul_scalar and sum
///     loss.backward();
/// }
/// // The step's tensors are gone, and so are its nodes.
/// assert_eq!(tape.len(), 0);
/// assert_eq!(w.grad().unwrap().to_vec(), vec![2.0; 3]);
/// ```
pub struct Tape {
    id: u64,
    arena: Mutex<Arena>,
}

/// Counters describing a [`Tape`], from [`Tape::stats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct TapeStats {
    /// Nodes currently reachable from some tensor.
    pub live_nodes: usize,
    /// The most nodes that were live at once.
    pub peak_live_nodes: usize,
    /// Node slots allocated (live plus free for reuse).
    pub capacity: usize,
    /// Nodes recorded since the tape was created.
    pub recorded: u64,
}

/// Names a node in one tape's arena. The generation tells a reused slot from
/// the node that held it before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct NodeId {
    index: u32,
    generation: u32,
}

/// Where the gradient of one input of a node goes.
pub(crate) enum Edge {
    /// The input does not require grad.
    None,
    /// The input is a leaf that requires grad: accumulate into its `.grad()`.
    Leaf(Tensor),
    /// The input was computed by another node of the same tape.
    Node(NodeId),
}

/// A node's input edges, inline for up to two inputs.
pub(crate) type Edges = SmallVec<[Edge; 2]>;

struct Slot {
    /// Counts the tensor the node produced and the nodes consuming it; 0 when
    /// the slot is free.
    refs: u32,
    generation: u32,
    seq: u64,
    op: &'static str,
    /// `None` once a backward without `retain_graph` has released it.
    backward: Option<std::sync::Arc<dyn Backward>>,
    edges: Edges,
    /// Scratch for [`Tape::plan`]: the backward that last visited this node,
    /// and the node's position in that backward's plan.
    mark: u64,
    local: u32,
}

#[derive(Default)]
struct Arena {
    slots: Vec<Slot>,
    free: Vec<u32>,
    live: usize,
    peak_live: usize,
    next_seq: u64,
    next_epoch: u64,
    recorded: u64,
}

/// What a release drops once the lock is released. The values are only held,
/// never read: dropping them is the point.
#[allow(dead_code)]
enum Garbage {
    Backward(std::sync::Arc<dyn Backward>),
    Leaf(Tensor),
}

type GarbageList = SmallVec<[Garbage; 4]>;

/// A backward pass's view of the graph, taken under the lock in one go.
pub(crate) struct Plan {
    /// Reachable nodes in reverse topological order (latest first).
    pub(crate) nodes: Vec<PlannedNode>,
    /// The position in `nodes` of each root passed to [`Tape::plan`].
    pub(crate) roots: Vec<usize>,
    /// The position in `nodes` of each watched node, `None` if unreachable.
    pub(crate) watched: Vec<Option<usize>>,
}

pub(crate) struct PlannedNode {
    pub(crate) backward: std::sync::Arc<dyn Backward>,
    pub(crate) edges: SmallVec<[PlanEdge; 2]>,
}

/// An [`Edge`] with node inputs translated to positions in the plan.
pub(crate) enum PlanEdge {
    None,
    Leaf(Tensor),
    Local(usize),
}

impl Tape {
    /// Creates an empty tape.
    ///
    /// Most code never calls this: every thread gets a tape of its own on
    /// first use. A separate tape is useful to isolate a computation's graph,
    /// entered with [`GradMode::with_tape`](crate::autograd::GradMode::with_tape).
    pub fn new() -> Arc<Tape> {
        Arc::new(Tape {
            id: NEXT_TAPE_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            arena: Mutex::new(Arena::default()),
        })
    }

    /// A process-unique number naming this tape in errors and `Debug`.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The number of live nodes: nodes some tensor can still reach.
    pub fn len(&self) -> usize {
        self.arena.lock().live
    }

    /// True when no node is live.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A snapshot of the tape's counters.
    pub fn stats(&self) -> TapeStats {
        let arena = self.arena.lock();
        TapeStats {
            live_nodes: arena.live,
            peak_live_nodes: arena.peak_live,
            capacity: arena.slots.len(),
            recorded: arena.recorded,
        }
    }

    /// Records a node. Each `Edge::Node` input gains a reference; the new node
    /// starts with one, owned by the tensor the op returns.
    pub(crate) fn push(
        &self,
        op: &'static str,
        edges: Edges,
        backward: std::sync::Arc<dyn Backward>,
    ) -> NodeId {
        let mut arena = self.arena.lock();
        let arena = &mut *arena;
        for edge in &edges {
            if let Edge::Node(input) = edge {
                let slot = &mut arena.slots[input.index as usize];
                debug_assert_eq!(slot.generation, input.generation, "input node was freed");
                slot.refs += 1;
            }
        }
        let seq = arena.next_seq;
        arena.next_seq += 1;
        arena.recorded += 1;
        arena.live += 1;
        arena.peak_live = arena.peak_live.max(arena.live);
        let index = match arena.free.pop() {
            Some(index) => {
                let slot = &mut arena.slots[index as usize];
                slot.refs = 1;
                slot.seq = seq;
                slot.op = op;
                slot.backward = Some(backward);
                // Keep the slot's edge storage if it spilled to the heap.
                slot.edges.clear();
                slot.edges.extend(edges);
                index
            }
            None => {
                let index = u32::try_from(arena.slots.len()).expect("more than 2^32 live nodes");
                arena.slots.push(Slot {
                    refs: 1,
                    generation: 0,
                    seq,
                    op,
                    backward: Some(backward),
                    edges,
                    mark: 0,
                    local: 0,
                });
                index
            }
        };
        NodeId {
            index,
            generation: arena.slots[index as usize].generation,
        }
    }

    /// Drops one reference to `id`, freeing it and, transitively, every input
    /// node nothing else reaches.
    pub(crate) fn release(&self, id: NodeId) {
        let mut garbage = GarbageList::new();
        {
            let mut arena = self.arena.lock();
            let arena = &mut *arena;
            let mut pending: SmallVec<[u32; 8]> = SmallVec::new();
            pending.push(id.index);
            debug_assert_eq!(arena.slots[id.index as usize].generation, id.generation);
            while let Some(index) = pending.pop() {
                let slot = &mut arena.slots[index as usize];
                slot.refs -= 1;
                if slot.refs > 0 {
                    continue;
                }
                slot.generation = slot.generation.wrapping_add(1);
                if let Some(backward) = slot.backward.take() {
                    garbage.push(Garbage::Backward(backward));
                }
                for edge in slot.edges.drain(..) {
                    match edge {
                        Edge::Node(input) => pending.push(input.index),
                        Edge::Leaf(leaf) => garbage.push(Garbage::Leaf(leaf)),
                        Edge::None => {}
                    }
                }
                arena.free.push(index);
                arena.live -= 1;
            }
        }
        dispose(garbage);
    }

    /// Collects everything reachable from `roots` for one backward pass:
    /// backward functions (taken out of the nodes unless `retain`, which
    /// releases the saved tensors once the pass drops them) and edges, in
    /// reverse topological order. `watch` names nodes whose gradient the
    /// caller wants to read; the plan says where they are, if reachable.
    ///
    /// # Errors
    ///
    /// [`Error::GraphReleased`] if a reachable node was released by an
    /// earlier backward. Nothing is taken in that case.
    pub(crate) fn plan(&self, roots: &[NodeId], watch: &[NodeId], retain: bool) -> Result<Plan> {
        let mut arena = self.arena.lock();
        let arena = &mut *arena;
        arena.next_epoch += 1;
        let epoch = arena.next_epoch;

        // Iterative depth-first search: a deep graph cannot overflow the stack.
        let mut order: Vec<u32> = Vec::new();
        let mut stack: Vec<u32> = roots.iter().map(|id| id.index).collect();
        while let Some(index) = stack.pop() {
            let slot = &mut arena.slots[index as usize];
            if slot.mark == epoch {
                continue;
            }
            slot.mark = epoch;
            if slot.backward.is_none() {
                return Err(Error::GraphReleased { node: slot.op });
            }
            order.push(index);
            stack.extend(slot.edges.iter().filter_map(|edge| match edge {
                Edge::Node(input) => Some(input.index),
                _ => None,
            }));
        }

        order.sort_unstable_by_key(|&index| Reverse(arena.slots[index as usize].seq));
        for (position, &index) in order.iter().enumerate() {
            arena.slots[index as usize].local = position as u32;
        }

        let mut nodes = Vec::with_capacity(order.len());
        for &index in &order {
            let slot = &arena.slots[index as usize];
            let edges = slot
                .edges
                .iter()
                .map(|edge| match edge {
                    Edge::None => PlanEdge::None,
                    Edge::Leaf(leaf) => PlanEdge::Leaf(leaf.clone()),
                    Edge::Node(input) => {
                        PlanEdge::Local(arena.slots[input.index as usize].local as usize)
                    }
                })
                .collect();
            let slot = &mut arena.slots[index as usize];
            let backward = if retain {
                slot.backward.clone()
            } else {
                slot.backward.take()
            };
            nodes.push(PlannedNode {
                backward: backward.expect("checked during the search"),
                edges,
            });
        }
        let roots = roots
            .iter()
            .map(|id| arena.slots[id.index as usize].local as usize)
            .collect();
        let watched = watch
            .iter()
            .map(|id| {
                let slot = &arena.slots[id.index as usize];
                (slot.generation == id.generation && slot.refs > 0 && slot.mark == epoch)
                    .then_some(slot.local as usize)
            })
            .collect();
        Ok(Plan {
            nodes,
            roots,
            watched,
        })
    }
}

impl fmt::Debug for Tape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let stats = self.stats();
        f.debug_struct("Tape")
            .field("id", &self.id)
            .field("live_nodes", &stats.live_nodes)
            .field("capacity", &stats.capacity)
            .finish()
    }
}

thread_local_const! {
    /// True while this thread is dropping a release's garbage.
    static DISPOSING: Cell<bool> = Cell::new(false);
}
thread_local_const! {
    /// Garbage produced by releases that ran inside another release's drop.
    static DEFERRED: RefCell<Vec<Garbage>> = RefCell::new(Vec::new());
}

/// Drops a release's garbage without recursing: a backward closure that owns
/// a tensor releases that tensor's node when dropped, which may free another
/// closure owning another tensor, and so on along a chain. Nested releases
/// queue their garbage here and the outermost one drains the queue.
fn dispose(garbage: GarbageList) {
    if garbage.is_empty() {
        return;
    }
    let nested = DISPOSING
        .try_with(|disposing| disposing.replace(true))
        // Thread-locals are being torn down: drop in place.
        .unwrap_or(false);
    if nested {
        let queued = DEFERRED.try_with(|deferred| {
            deferred.borrow_mut().extend(garbage);
        });
        debug_assert!(queued.is_ok());
        return;
    }

    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            let _ = DISPOSING.try_with(|disposing| disposing.set(false));
        }
    }
    let _reset = Reset;
    drop(garbage);
    loop {
        let batch = DEFERRED
            .try_with(|deferred| std::mem::take(&mut *deferred.borrow_mut()))
            .unwrap_or_default();
        if batch.is_empty() {
            break;
        }
        drop(batch);
    }
}
