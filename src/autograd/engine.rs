//! The backward pass: a reverse walk over one tape's graph.
//!
//! The graph reachable from the roots is collected under the tape lock in one
//! go ([`Tape::plan`]); then, with no lock held and grad mode off, each node's
//! backward runs in reverse topological order, its input gradients summed in a
//! buffer indexed by plan position, and leaf gradients accumulated into each
//! leaf's grad slot under that leaf's own lock.
//!
//! [`Tape::plan`]: crate::autograd::tape::Tape::plan

use crate::autograd::function::InputGrads;
use crate::autograd::function::non_finite;
use crate::autograd::mode::{GradGuard, is_anomaly_enabled};
use crate::autograd::tape::{NodeId, Plan, PlanEdge, Tape, common_tape};
use crate::error::{Error, Result};
use crate::sync::Arc;
use crate::tensor::{Data, Tensor};

/// Where gradients arriving at leaves (and watched nodes) go.
trait Sink {
    /// Called once the graph is collected: where each watched node sits in
    /// the plan, if it is reachable.
    fn planned(&mut self, _watched: &[Option<usize>]) {}
    fn leaf(&mut self, leaf: &Tensor, grad: Data);
    fn node(&mut self, position: usize, grad: &Data);
}

/// `backward()`: accumulate into every leaf's `.grad()`.
struct Accumulate;

impl Sink for Accumulate {
    fn leaf(&mut self, leaf: &Tensor, grad: Data) {
        leaf.accumulate_grad(grad);
    }

    fn node(&mut self, _: usize, _: &Data) {}
}

/// `autograd::grad()`: keep the gradients of the requested inputs only.
struct Capture<'a> {
    inputs: &'a [&'a Tensor],
    /// The input each watched node belongs to.
    watched_inputs: Vec<usize>,
    /// For each input, its position in the plan if it is a reachable node.
    positions: Vec<Option<usize>>,
    grads: Vec<Option<Data>>,
}

impl Sink for Capture<'_> {
    fn planned(&mut self, watched: &[Option<usize>]) {
        for (&input, &position) in self.watched_inputs.iter().zip(watched) {
            self.positions[input] = position;
        }
    }

    fn leaf(&mut self, leaf: &Tensor, grad: Data) {
        // An input may be given more than once: each mention gets the
        // gradient.
        let mut grad = Some(grad);
        let mut mentions = self
            .inputs
            .iter()
            .enumerate()
            .filter(|(_, input)| input.same(leaf))
            .map(|(i, _)| i)
            .peekable();
        while let Some(i) = mentions.next() {
            let this = if mentions.peek().is_some() {
                grad.clone()
            } else {
                grad.take()
            };
            Data::accumulate(
                &mut self.grads[i],
                this.expect("taken at the last mention only"),
            );
        }
    }

    fn node(&mut self, position: usize, grad: &Data) {
        for (i, input_position) in self.positions.iter().enumerate() {
            if *input_position == Some(position) {
                self.grads[i] = Some(grad.clone());
            }
        }
    }
}

/// A root of a backward pass with the gradient it starts from.
pub(crate) struct Root<'a> {
    pub(crate) tensor: &'a Tensor,
    pub(crate) grad: Data,
}

/// The roots that are recorded nodes, all on one tape; leaf roots go straight
/// to the sink.
struct Split {
    tape: Option<Arc<Tape>>,
    ids: Vec<NodeId>,
    seeds: Vec<Data>,
}

fn split_roots(op: &'static str, roots: Vec<Root<'_>>, sink: &mut impl Sink) -> Result<Split> {
    let mut split = Split {
        tape: None,
        ids: Vec::with_capacity(roots.len()),
        seeds: Vec::with_capacity(roots.len()),
    };
    // Validate every root before any gradient reaches a leaf.
    if roots.iter().any(|root| !root.tensor.requires_grad()) {
        return Err(Error::NoGraph { op });
    }
    split.tape = common_tape(op, roots.iter().map(|root| root.tensor))?.cloned();
    for root in roots {
        match root.tensor.node() {
            Some(node) => {
                split.ids.push(node.id);
                split.seeds.push(root.grad);
            }
            None => sink.leaf(root.tensor, root.grad),
        }
    }
    Ok(split)
}

fn run(
    tape: &Tape,
    ids: &[NodeId],
    seeds: Vec<Data>,
    watch: &[NodeId],
    retain: bool,
    sink: &mut impl Sink,
) -> Result<()> {
    // Anomaly detection as the caller has it (checked before any gradient
    // reaches a leaf, so an anomaly leaves every `.grad()` untouched).
    let anomaly = is_anomaly_enabled();
    if anomaly && let Some(found) = seeds.iter().find_map(|seed| non_finite(seed.view().iter())) {
        return Err(Error::Anomaly {
            op: "backward",
            input: None,
            location: None,
            message: format!("the gradient backward starts from has {found}"),
        });
    }
    // The plan's buffers go back to the thread for its next pass however
    // this one ends.
    struct Recycle(Option<Box<Plan>>);
    impl Drop for Recycle {
        fn drop(&mut self) {
            if let Some(plan) = self.0.take() {
                plan.recycle();
            }
        }
    }
    let mut recycle = Recycle(Some(Plan::take()));
    let plan = recycle.0.as_deref_mut().expect("taken above");
    tape.plan(ids, watch, retain, plan)?;
    sink.planned(&plan.watched);
    // Backward functions compute with plain arrays, but a custom one may call
    // tensor ops: none of them may record.
    let _no_grad = GradGuard::new(false);

    let Plan {
        nodes,
        edges,
        needs,
        roots,
        leaves,
        grads,
        leaf_grads,
        slots,
        ..
    } = plan;
    grads.resize_with(nodes.len(), || None);
    for (&position, seed) in roots.iter().zip(seeds) {
        Data::accumulate(&mut grads[position], seed);
    }
    // Leaf gradients are summed here and reach each leaf once, at the end.
    leaf_grads.resize_with(leaves.len(), || None);

    // Consume the plan node by node, so each node's saved state is released
    // as soon as its backward has run.
    for (position, node) in nodes.drain(..).enumerate() {
        let Some(grad) = grads[position].take() else {
            continue;
        };
        sink.node(position, &grad);
        let needs = &needs[node.edges.clone()];
        // Most ops have at most three inputs: their gradients go to a local
        // array, the rest to the plan's vector.
        let mut local: [Option<Data>; 3] = [None, None, None];
        let slots: &mut [Option<Data>] = if needs.len() <= local.len() {
            &mut local[..needs.len()]
        } else {
            slots.clear();
            slots.resize_with(needs.len(), || None);
            slots
        };
        let mut input_grads = InputGrads::new(needs, slots);
        node.backward.backward(grad, &mut input_grads);
        if let Some(error) = input_grads.take_error() {
            return Err(error);
        }
        if anomaly {
            check_gradients(node.op, node.location, slots)?;
        }
        for (input, (edge, slot)) in edges[node.edges].iter().zip(slots.iter_mut()).enumerate() {
            let slot = slot.take();
            let Some(input_grad) = slot else { continue };
            let sum = match edge {
                PlanEdge::None => continue,
                PlanEdge::Leaf(leaf) => &mut leaf_grads[*leaf],
                PlanEdge::Local(target) => {
                    debug_assert!(*target > position, "plan is not topological");
                    &mut grads[*target]
                }
            };
            let summed = sum.is_some();
            Data::accumulate(sum, input_grad);
            if anomaly && summed {
                // Each gradient was finite (checked above); their sum may
                // still overflow.
                check_sum(node.op, node.location, input, sum.as_ref())?;
            }
        }
    }
    for (leaf, grad) in leaves.iter().zip(leaf_grads.drain(..)) {
        if let Some(grad) = grad {
            sink.leaf(leaf, grad);
        }
    }
    Ok(())
}

/// Anomaly detection's backward check: the first input gradient of a node
/// that holds a NaN or an infinity names the node's op, the input and where
/// the op was recorded.
fn check_gradients(
    op: &'static str,
    location: Option<&'static std::panic::Location<'static>>,
    slots: &[Option<Data>],
) -> Result<()> {
    for (input, slot) in slots.iter().enumerate() {
        let Some(found) = slot
            .as_ref()
            .and_then(|grad| non_finite(grad.view().iter()))
        else {
            continue;
        };
        let recorded = recorded_at(op, location);
        return Err(Error::Anomaly {
            op,
            input: Some(input),
            location: location.map(ToString::to_string),
            message: format!(
                "in backward, the gradient of `{op}` with respect to its input {input} has {found}; {recorded}"
            ),
        });
    }
    Ok(())
}

/// Where a node's op was recorded, for anomaly messages.
fn recorded_at(
    op: &'static str,
    location: Option<&'static std::panic::Location<'static>>,
) -> String {
    match location {
        Some(location) => format!("`{op}` was recorded at {location}"),
        None => {
            format!("`{op}` was recorded with anomaly detection off, so its location is unknown")
        }
    }
}

/// Anomaly detection's check of a gradient sum: finite gradients whose sum
/// overflows name the op whose contribution made it overflow.
fn check_sum(
    op: &'static str,
    location: Option<&'static std::panic::Location<'static>>,
    input: usize,
    sum: Option<&Data>,
) -> Result<()> {
    let Some(found) = sum.and_then(|sum| non_finite(sum.view().iter())) else {
        return Ok(());
    };
    let recorded = recorded_at(op, location);
    Err(Error::Anomaly {
        op,
        input: Some(input),
        location: location.map(ToString::to_string),
        message: format!(
            "in backward, adding the gradient of `{op}` with respect to its input {input} to the other gradients of that input gives {found}, though each was finite; {recorded}"
        ),
    })
}

/// `tensor.backward()` and its variants: accumulate gradients into leaves.
pub(crate) fn backward(roots: Vec<Root<'_>>, retain: bool) -> Result<()> {
    let mut sink = Accumulate;
    let split = split_roots("backward", roots, &mut sink)?;
    if let Some(tape) = split.tape {
        run(&tape, &split.ids, split.seeds, &[], retain, &mut sink)?;
    }
    Ok(())
}

/// `autograd::grad`: the gradients of `inputs`, leaving `.grad()` untouched.
/// An input that no gradient reaches gets `None`.
pub(crate) fn grad(
    roots: Vec<Root<'_>>,
    inputs: &[&Tensor],
    retain: bool,
) -> Result<Vec<Option<Data>>> {
    let mut sink = Capture {
        inputs,
        watched_inputs: Vec::new(),
        positions: vec![None; inputs.len()],
        grads: vec![None; inputs.len()],
    };
    let split = split_roots("grad", roots, &mut sink)?;
    if let Some(tape) = split.tape {
        // An input recorded on another tape cannot be reached from these
        // roots, so it is not watched.
        let mut watch = Vec::new();
        for (i, input) in inputs.iter().enumerate() {
            if let Some(node) = input.node().filter(|node| Arc::ptr_eq(&node.tape, &tape)) {
                sink.watched_inputs.push(i);
                watch.push(node.id);
            }
        }
        run(&tape, &split.ids, split.seeds, &watch, retain, &mut sink)?;
    }
    Ok(sink.grads)
}

/// A root of a `create_graph` backward pass with the gradient it starts
/// from, a tensor (which may itself have a graph).
pub(crate) struct GraphRoot<'a> {
    pub(crate) tensor: &'a Tensor,
    pub(crate) grad: Tensor,
}

/// Adds `grad` into a running sum of recorded gradients (a recorded `add`,
/// so the sum is differentiable too).
fn accumulate_tensor(sum: &mut Option<Tensor>, grad: Tensor) -> Result<()> {
    *sum = Some(match sum.take() {
        None => grad,
        Some(sum) => sum.try_add(&grad)?,
    });
    Ok(())
}

/// `autograd::grad_with` with `create_graph`: the gradients of `inputs` as
/// recorded tensors, computed by each node's differentiable backward
/// ([`Backprop::backward_graph`]) with grad mode on and the graph's tape
/// current, so that they can be differentiated again. An input no gradient
/// reaches gets `None`.
///
/// The walk is the array path's ([`run`]): one plan taken under the lock,
/// then each node in reverse topological order with no lock held; the
/// gradient sums are tensors instead of arrays. Nothing here touches the
/// array path, which keeps its speed.
///
/// [`Backprop::backward_graph`]: crate::autograd::function::Backprop::backward_graph
pub(crate) fn grad_graph(
    roots: Vec<GraphRoot<'_>>,
    inputs: &[&Tensor],
    retain: bool,
) -> Result<Vec<Option<Tensor>>> {
    use crate::autograd::function::{GraphGrads, GraphNode};
    use crate::autograd::mode::GradMode;

    if roots.iter().any(|root| !root.tensor.requires_grad()) {
        return Err(Error::NoGraph { op: "grad" });
    }
    let tape = common_tape("grad", roots.iter().map(|root| root.tensor))?.cloned();
    let mut out: Vec<Option<Tensor>> = vec![None; inputs.len()];
    let capture_leaf = |out: &mut Vec<Option<Tensor>>, leaf: &Tensor, grad: &Tensor| {
        for (slot, input) in out.iter_mut().zip(inputs) {
            if input.same(leaf) {
                accumulate_tensor(slot, grad.clone())?;
            }
        }
        Ok::<(), Error>(())
    };
    let mut ids = Vec::with_capacity(roots.len());
    let mut seeds = Vec::with_capacity(roots.len());
    for root in roots {
        match root.tensor.node() {
            Some(node) => {
                ids.push(node.id);
                seeds.push(root.grad);
            }
            None => capture_leaf(&mut out, root.tensor, &root.grad)?,
        }
    }
    let Some(tape) = tape else {
        return Ok(out);
    };
    let mut watch = Vec::new();
    let mut watched_inputs = Vec::new();
    for (i, input) in inputs.iter().enumerate() {
        if let Some(node) = input.node().filter(|node| Arc::ptr_eq(&node.tape, &tape)) {
            watched_inputs.push(i);
            watch.push(node.id);
        }
    }

    struct Recycle(Option<Box<Plan>>);
    impl Drop for Recycle {
        fn drop(&mut self) {
            if let Some(plan) = self.0.take() {
                plan.recycle();
            }
        }
    }
    let mut recycle = Recycle(Some(Plan::take()));
    let plan = recycle.0.as_deref_mut().expect("taken above");
    plan.want_ids = true;
    tape.plan(&ids, &watch, retain, plan)?;
    // The gradient graph records on the graph's tape, in this thread's
    // other modes.
    let _mode = GradMode::current()
        .with_enabled(true)
        .with_tape(tape.clone())
        .enter();

    let Plan {
        nodes,
        edges,
        needs,
        roots,
        watched,
        leaves,
        ids,
        ..
    } = plan;
    let mut grads: Vec<Option<Tensor>> = vec![None; nodes.len()];
    for (&position, seed) in roots.iter().zip(seeds) {
        accumulate_tensor(&mut grads[position], seed)?;
    }
    let mut leaf_grads: Vec<Option<Tensor>> = vec![None; leaves.len()];
    let mut slots: Vec<Option<Tensor>> = Vec::new();
    for position in 0..nodes.len() {
        let Some(grad) = grads[position].take() else {
            continue;
        };
        for (&input, &at) in watched_inputs.iter().zip(watched.iter()) {
            if at == Some(position) {
                out[input] = Some(grad.clone());
            }
        }
        let node = &nodes[position];
        let range = node.edges.clone();
        slots.clear();
        slots.resize_with(range.len(), || None);
        let mut input_grads = GraphGrads::new(
            node.op,
            &needs[range.clone()],
            &mut slots,
            GraphNode {
                tape: &tape,
                id: ids[position],
                edges: &edges[range.clone()],
                leaves,
                ids,
            },
        );
        node.backward.backward_graph(&grad, &mut input_grads)?;
        drop(grad);
        for (edge, slot) in edges[range].iter().zip(slots.iter_mut()) {
            let Some(input_grad) = slot.take() else {
                continue;
            };
            match edge {
                PlanEdge::None => {}
                PlanEdge::Leaf(leaf) => accumulate_tensor(&mut leaf_grads[*leaf], input_grad)?,
                PlanEdge::Local(target) => {
                    debug_assert!(*target > position, "plan is not topological");
                    accumulate_tensor(&mut grads[*target], input_grad)?;
                }
            }
        }
    }
    for (leaf, grad) in leaves.iter().zip(leaf_grads) {
        if let Some(grad) = grad {
            capture_leaf(&mut out, leaf, &grad)?;
        }
    }
    Ok(out)
}
