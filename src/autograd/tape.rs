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
//! stack). What a freed node owned is dropped at once when that cannot touch
//! a tape: its handles to leaves (a leaf has no node to release) and a
//! built-in op's backward (it owns plain values, never tensors). A custom
//! op's backward may own tensors, whose drop may release nodes again: it is
//! dropped *after* the lock is released.
//!
//! Slots are reused, so index order is not creation order: the sequence
//! number is. A node's inputs always exist before it, so sorting by sequence
//! number gives a topological order.
//!
//! The lock is held for a push, a release or a backward's graph collection,
//! never while user code or a backward function runs. It is always the
//! innermost lock: nothing takes another lock while holding it (an op takes
//! it for the push holding no lock at all, its operands being snapshots;
//! the leaf handles and built-in backward state dropped under it take no
//! lock either), so no lock-order cycle can form.

use std::cell::{Cell, RefCell};
use std::cmp::Reverse;
use std::fmt;
use std::panic::Location;
use std::sync::atomic::AtomicU64 as IdCounter;

use crate::autograd::function::{Backprop, InputGrads};
use crate::error::{Error, Result};
use crate::storage::Data;
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

struct Slot {
    /// Counts the tensor the node produced and the nodes consuming it; 0 when
    /// the slot is free.
    refs: u32,
    generation: u32,
    seq: u64,
    op: &'static str,
    /// Where the op was called, if recorded with anomaly detection on.
    location: Option<&'static Location<'static>>,
    /// Whether the backward function may own tensors (a custom op's):
    /// dropping it may release nodes, so it is dropped outside the lock.
    /// A built-in op's backward owns plain values only.
    holds_tensors: bool,
    /// `None` once a backward without `retain_graph` has released it.
    backward: Option<BackwardFn>,
    /// Empty while the slot is free; its capacity is kept for the next node.
    edges: Vec<Edge>,
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

/// A node's backward function: owned by the node until a retain-graph
/// backward first needs to run it while the node keeps it, then shared.
/// (A box of a stateless backward does not allocate; an `Arc` always would.)
pub(crate) enum BackwardFn {
    Unique(Box<dyn Backprop>),
    Shared(std::sync::Arc<dyn Backprop>),
}

impl BackwardFn {
    /// A handle to run while the node keeps the function.
    fn share(&mut self) -> BackwardFn {
        let shared = match self {
            BackwardFn::Shared(shared) => shared.clone(),
            BackwardFn::Unique(_) => {
                // Swap in a stateless placeholder (its box does not allocate).
                let BackwardFn::Unique(owned) =
                    std::mem::replace(self, BackwardFn::Unique(Box::new(NoBackward)))
                else {
                    unreachable!("matched above")
                };
                let shared: std::sync::Arc<dyn Backprop> = std::sync::Arc::from(owned);
                *self = BackwardFn::Shared(shared.clone());
                shared
            }
        };
        BackwardFn::Shared(shared)
    }
}

impl std::ops::Deref for BackwardFn {
    type Target = dyn Backprop;

    fn deref(&self) -> &(dyn Backprop + 'static) {
        match self {
            BackwardFn::Unique(owned) => &**owned,
            BackwardFn::Shared(shared) => &**shared,
        }
    }
}

/// Placeholder while a backward function changes hands.
struct NoBackward;

impl Backprop for NoBackward {
    fn backward(&self, _: crate::storage::Data, _: &mut InputGrads<'_>) {}
}

/// A backward pass's view of the graph, taken under the lock in one go,
/// and the engine's buffers for the pass. Its vectors are reused from one
/// backward pass to the next on a thread ([`Plan::take`],
/// [`Plan::recycle`]), so a steady training loop's backward allocates none
/// of them.
#[derive(Default)]
pub(crate) struct Plan {
    /// Reachable nodes in reverse topological order (latest first).
    pub(crate) nodes: Vec<PlannedNode>,
    /// Every node's input edges, back to back; a node's are `edges[node.edges]`.
    pub(crate) edges: Vec<PlanEdge>,
    /// Whether each edge's input needs a gradient (`edges[i]` is not `None`).
    pub(crate) needs: Vec<bool>,
    /// With [`want_ids`](Plan::want_ids), the id of each node of `nodes`
    /// (a `create_graph` backward rebuilds tensors from them).
    pub(crate) ids: Vec<NodeId>,
    /// Whether [`Tape::plan`] fills [`ids`](Plan::ids); off for the array
    /// path, which never needs them.
    pub(crate) want_ids: bool,
    /// The position in `nodes` of each root passed to [`Tape::plan`].
    pub(crate) roots: Vec<usize>,
    /// The position in `nodes` of each watched node, `None` if unreachable.
    pub(crate) watched: Vec<Option<usize>>,
    /// The distinct leaves the graph reaches; `PlanEdge::Leaf` indexes it.
    pub(crate) leaves: Vec<Tensor>,
    /// The engine's gradient sums, one per node.
    pub(crate) grads: Vec<Option<Data>>,
    /// The engine's gradient sums, one per leaf.
    pub(crate) leaf_grads: Vec<Option<Data>>,
    /// The input gradients of the node being run.
    pub(crate) slots: Vec<Option<Data>>,
    /// The search's own buffers.
    order: Vec<u32>,
    stack: Vec<u32>,
}

thread_local_const! {
    /// The buffers of this thread's last backward pass, for the next.
    static PLANS: Cell<Option<Box<Plan>>> = Cell::new(None);
}

impl Plan {
    /// This thread's spare buffers, or new ones (during a backward inside
    /// a backward, for instance).
    pub(crate) fn take() -> Box<Plan> {
        PLANS
            .try_with(Cell::take)
            .ok()
            .flatten()
            .unwrap_or_default()
    }

    /// Empties the buffers (dropping what they hold) and keeps them for the
    /// thread's next backward pass.
    pub(crate) fn recycle(mut self: Box<Plan>) {
        self.nodes.clear();
        self.edges.clear();
        self.needs.clear();
        self.ids.clear();
        self.want_ids = false;
        self.roots.clear();
        self.watched.clear();
        self.leaves.clear();
        self.grads.clear();
        self.leaf_grads.clear();
        self.slots.clear();
        self.order.clear();
        self.stack.clear();
        let _ = PLANS.try_with(|plans| plans.set(Some(self)));
    }
}

pub(crate) struct PlannedNode {
    pub(crate) op: &'static str,
    pub(crate) location: Option<&'static Location<'static>>,
    pub(crate) backward: BackwardFn,
    pub(crate) edges: std::ops::Range<usize>,
}

/// An [`Edge`] with node inputs translated to positions in the plan and
/// leaves to positions in [`Plan::leaves`].
pub(crate) enum PlanEdge {
    None,
    Leaf(usize),
    Local(usize),
}

/// Gives each distinct leaf of a plan one position, so that a leaf used by
/// many nodes has its gradient summed locally and accumulated (under its
/// lock) once per backward pass.
struct LeafIndex<'a> {
    leaves: &'a mut Vec<Tensor>,
    /// Used once there are too many leaves for a linear scan.
    map: Option<std::collections::HashMap<*const (), usize>>,
}

impl LeafIndex<'_> {
    const LINEAR_SCAN: usize = 32;

    fn position(&mut self, leaf: &Tensor) -> usize {
        let key = leaf.identity();
        if let Some(map) = &mut self.map {
            return *map.entry(key).or_insert_with(|| {
                self.leaves.push(leaf.clone());
                self.leaves.len() - 1
            });
        }
        if let Some(i) = self.leaves.iter().position(|l| l.identity() == key) {
            return i;
        }
        self.leaves.push(leaf.clone());
        if self.leaves.len() > Self::LINEAR_SCAN {
            let map = self
                .leaves
                .iter()
                .enumerate()
                .map(|(i, l)| (l.identity(), i))
                .collect();
            self.map = Some(map);
        }
        self.leaves.len() - 1
    }
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

    /// Records a node for op `op` applied to `inputs`. Each input computed by
    /// a node gains a reference; the new node starts with one, owned by the
    /// tensor the op returns. Every input node must be on this tape.
    pub(crate) fn push(
        &self,
        op: &'static str,
        inputs: &[&Tensor],
        backward: Box<dyn Backprop>,
        location: Option<&'static Location<'static>>,
        holds_tensors: bool,
    ) -> NodeId {
        let edge = |input: &&Tensor| match input.node() {
            Some(node) => Edge::Node(node.id),
            None if input.requires_grad() => Edge::Leaf((*input).clone()),
            None => Edge::None,
        };
        let mut arena = self.arena.lock();
        let arena = &mut *arena;
        for input in inputs {
            if let Some(node) = input.node() {
                let slot = &mut arena.slots[node.id.index as usize];
                debug_assert_eq!(slot.generation, node.id.generation, "input node was freed");
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
                slot.location = location;
                slot.holds_tensors = holds_tensors;
                slot.backward = Some(BackwardFn::Unique(backward));
                // Reuses the edge storage of the slot's previous node.
                slot.edges.extend(inputs.iter().map(edge));
                index
            }
            None => {
                let index = u32::try_from(arena.slots.len()).expect("more than 2^32 live nodes");
                arena.slots.push(Slot {
                    refs: 1,
                    generation: 0,
                    seq,
                    op,
                    location,
                    holds_tensors,
                    backward: Some(BackwardFn::Unique(backward)),
                    edges: inputs.iter().map(edge).collect(),
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

    /// Adds one reference to the live node `id`, for a new tensor naming it
    /// (a `create_graph` backward rebuilding a node's input or output), and
    /// returns the node's op.
    pub(crate) fn retain(&self, id: NodeId) -> &'static str {
        let mut arena = self.arena.lock();
        let slot = &mut arena.slots[id.index as usize];
        debug_assert!(slot.generation == id.generation && slot.refs > 0);
        slot.refs += 1;
        slot.op
    }

    /// Drops one reference to `id`, freeing it and, transitively, every input
    /// node nothing else reaches.
    pub(crate) fn release(&self, id: NodeId) {
        // Nearly always nothing is queued (only a custom op's backward is),
        // so the thread's queue is touched only when something was.
        let mut garbage = Vec::new();
        if self.free(id, &mut garbage) {
            let queued = GARBAGE.try_with(|queue| queue.queue.borrow_mut().append(&mut garbage));
            if queued.is_ok() {
                dispose();
            }
            // Otherwise thread-locals are being torn down: `garbage` drops
            // here, in place.
        }
    }

    /// The locked part of [`release`](Tape::release). What the freed nodes
    /// owned is dropped here, under the lock, when dropping it cannot touch
    /// a tape (leaf tensors, which have no node; a built-in op's backward,
    /// which owns plain values); a backward that may own tensors goes to
    /// `garbage`, to be dropped after the lock is released. Returns whether
    /// anything was queued.
    fn free(&self, id: NodeId, garbage: &mut Vec<BackwardFn>) -> bool {
        let queued = garbage.len();
        let mut arena = self.arena.lock();
        let arena = &mut *arena;
        debug_assert_eq!(arena.slots[id.index as usize].generation, id.generation);
        let mut index = id.index;
        let mut pending: Vec<u32> = Vec::new();
        loop {
            let slot = &mut arena.slots[index as usize];
            slot.refs -= 1;
            if slot.refs == 0 {
                slot.generation = slot.generation.wrapping_add(1);
                if let Some(backward) = slot.backward.take()
                    && slot.holds_tensors
                {
                    garbage.push(backward);
                }
                for edge in slot.edges.drain(..) {
                    if let Edge::Node(input) = edge {
                        pending.push(input.index);
                    }
                }
                arena.free.push(index);
                arena.live -= 1;
            }
            match pending.pop() {
                Some(next) => index = next,
                None => break,
            }
        }
        garbage.len() > queued
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
    pub(crate) fn plan(
        &self,
        roots: &[NodeId],
        watch: &[NodeId],
        retain: bool,
        plan: &mut Plan,
    ) -> Result<()> {
        let mut arena = self.arena.lock();
        let arena = &mut *arena;
        arena.next_epoch += 1;
        let epoch = arena.next_epoch;
        let Plan {
            nodes,
            edges,
            needs,
            roots: root_positions,
            watched,
            leaves,
            order,
            stack,
            ids,
            want_ids,
            ..
        } = plan;

        // Iterative depth-first search: a deep graph cannot overflow the stack.
        stack.extend(roots.iter().map(|id| id.index));
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

        // A chain's search already visits in reverse order of recording.
        let seq = |index: &u32| Reverse(arena.slots[*index as usize].seq);
        if !order.is_sorted_by_key(seq) {
            order.sort_unstable_by_key(seq);
        }
        for (position, &index) in order.iter().enumerate() {
            arena.slots[index as usize].local = position as u32;
        }

        nodes.reserve(order.len());
        edges.reserve(2 * order.len());
        let mut leaves = LeafIndex { leaves, map: None };
        for &index in order.iter() {
            let start = edges.len();
            for edge in &arena.slots[index as usize].edges {
                edges.push(match edge {
                    Edge::None => PlanEdge::None,
                    Edge::Leaf(leaf) => PlanEdge::Leaf(leaves.position(leaf)),
                    Edge::Node(input) => {
                        PlanEdge::Local(arena.slots[input.index as usize].local as usize)
                    }
                });
            }
            let slot = &mut arena.slots[index as usize];
            if *want_ids {
                ids.push(NodeId {
                    index,
                    generation: slot.generation,
                });
            }
            let backward = if retain {
                slot.backward.as_mut().map(BackwardFn::share)
            } else {
                slot.backward.take()
            };
            nodes.push(PlannedNode {
                op: slot.op,
                location: slot.location,
                backward: backward.expect("checked during the search"),
                edges: start..edges.len(),
            });
        }
        needs.extend(edges.iter().map(|e| !matches!(e, PlanEdge::None)));
        root_positions.extend(
            roots
                .iter()
                .map(|id| arena.slots[id.index as usize].local as usize),
        );
        watched.extend(watch.iter().map(|id| {
            let slot = &arena.slots[id.index as usize];
            (slot.generation == id.generation && slot.refs > 0 && slot.mark == epoch)
                .then_some(slot.local as usize)
        }));
        Ok(())
    }
}

/// The tape the recorded ones among `tensors` live on (`None` if all are
/// leaves): a graph lives on one tape, so an op's inputs, or a backward's
/// roots, recorded on two tapes cannot meet.
///
/// # Errors
///
/// [`Error::TapeMismatch`] naming `op` and the first two tapes found.
pub(crate) fn common_tape<'a>(
    op: &'static str,
    tensors: impl IntoIterator<Item = &'a Tensor>,
) -> Result<Option<&'a Arc<Tape>>> {
    let mut tape: Option<&Arc<Tape>> = None;
    for node in tensors.into_iter().filter_map(Tensor::node) {
        match tape {
            None => tape = Some(&node.tape),
            Some(first) if !Arc::ptr_eq(first, &node.tape) => {
                return Err(Error::TapeMismatch {
                    op,
                    first: first.id(),
                    second: node.tape.id(),
                });
            }
            Some(_) => {}
        }
    }
    Ok(tape)
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

/// What releases on this thread freed, waiting to be dropped outside the
/// tape lock.
struct GarbageQueue {
    queue: RefCell<Vec<BackwardFn>>,
    disposing: Cell<bool>,
}

thread_local_const! {
    static GARBAGE: GarbageQueue = GarbageQueue {
        queue: RefCell::new(Vec::new()),
        disposing: Cell::new(false),
    };
}

/// Drops this thread's queued garbage, one item at a time and without
/// recursing: a backward closure that owns a tensor releases that tensor's
/// node when dropped, which may free another closure owning another tensor,
/// and so on along a chain. A release inside that drop only queues its
/// garbage; the outermost call drains the queue.
fn dispose() {
    let _ = GARBAGE.try_with(|garbage| {
        if garbage.disposing.replace(true) {
            return;
        }
        struct Reset<'a>(&'a Cell<bool>);
        impl Drop for Reset<'_> {
            fn drop(&mut self) {
                self.0.set(false);
            }
        }
        let _reset = Reset(&garbage.disposing);
        loop {
            let next = garbage.queue.borrow_mut().pop();
            match next {
                Some(item) => drop(item),
                None => break,
            }
        }
    });
}
