//! Where a training step spends its time, for `switchyard bench`.
//!
//! Off by default: every hook is then a relaxed atomic load and nothing else (no graph
//! node, no clock read). When enabled, forward sections are timed with the wall clock —
//! burn's `flex` CPU backend is eager (each op has finished when it returns), so the time
//! around a call is the time of its ops. Backward time is taken with identity marker
//! nodes: a region (the attention block, the MoE layer, and inside it dispatch, experts
//! and combine) is bracketed by a start marker on its input and an end marker on its
//! output. burn's backward runs node depth by depth, deepest first, and a region's nodes
//! lie between its markers' depths, so the region's backward time is the time from its end
//! marker's backward step to its start marker's. Nodes of a parallel branch at the same
//! depths (the router's, inside the MoE layer) are counted with the region that is open;
//! they are small next to the experts. The router row is the MoE layer minus its three
//! inner regions ([`Profile::table`]).
//!
//! The accumulator is process-global (timing is a measurement of the process, and the
//! backward pass has no handle to pass it through); `bench` enables it, runs its timed
//! steps, and takes the totals.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::{Autodiff, Flex};
use burn::tensor::Tensor;

/// What the time of a step is attributed to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// The attention block (norm, projections, RoPE, attention core), a region.
    AttentionBlock,
    /// The MoE layer as a whole (router + dispatch + experts + combine + extras), a region.
    MoeLayer,
    /// Gathering the token rows into expert order (region).
    Dispatch,
    /// The routed experts' GEMMs and activation (region).
    Experts,
    /// Weighted scatter of expert outputs back to token order (region).
    Combine,
    /// Gradient norm, clipping, AdamW.
    Optimizer,
}

const PARTS: usize = 6;

impl Part {
    fn index(self) -> usize {
        self as usize
    }
}

static ENABLED: AtomicBool = AtomicBool::new(false);
static STATE: Mutex<State> = Mutex::new(State {
    seconds: [0.0; PARTS],
    open: Vec::new(),
});

struct State {
    seconds: [f64; PARTS],
    /// Backward end-marker timestamps of the regions being walked, innermost last.
    open: Vec<(Part, Instant)>,
}

fn state() -> std::sync::MutexGuard<'static, State> {
    STATE.lock().unwrap_or_else(|p| p.into_inner())
}

/// Turns timing on or off and clears the totals.
pub fn enable(on: bool) {
    let mut s = state();
    s.seconds = [0.0; PARTS];
    s.open.clear();
    ENABLED.store(on, Ordering::Relaxed);
}

pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Adds `seconds` to `part`.
pub fn add(part: Part, seconds: f64) {
    if enabled() {
        state().seconds[part.index()] += seconds;
    }
}

/// Runs `f`, adding its wall time to `part` when timing is on.
pub fn time<R>(part: Part, f: impl FnOnce() -> R) -> R {
    if !enabled() {
        return f();
    }
    let started = Instant::now();
    let out = f();
    add(part, started.elapsed().as_secs_f64());
    out
}

/// Totals since `enable(true)`, in seconds.
#[derive(Debug, Clone, Copy, Default)]
pub struct Profile {
    seconds: [f64; PARTS],
}

/// Takes the totals so far (timing stays on).
pub fn snapshot() -> Profile {
    Profile {
        seconds: state().seconds,
    }
}

impl Profile {
    pub fn seconds(&self, part: Part) -> f64 {
        self.seconds[part.index()]
    }

    /// The step broken into the parts of the benchmark table, given the total wall time
    /// of the profiled steps: (name, seconds), summing to `total`. The router row is the
    /// MoE layer minus its custom ops (routing, capacity, auxiliary losses, extra and
    /// shared experts); "other" is everything outside the timed parts (embedding, final
    /// norm, LM head, loss, residual adds, gradient collection).
    pub fn table(&self, total: f64) -> Vec<(&'static str, f64)> {
        let s = |p: Part| self.seconds(p);
        let router =
            (s(Part::MoeLayer) - s(Part::Dispatch) - s(Part::Experts) - s(Part::Combine)).max(0.0);
        let rows = vec![
            ("attention", s(Part::AttentionBlock)),
            ("router", router),
            ("dispatch/permute", s(Part::Dispatch)),
            ("expert GEMMs", s(Part::Experts)),
            ("combine", s(Part::Combine)),
            ("optimizer", s(Part::Optimizer)),
        ];
        let known: f64 = rows.iter().map(|(_, t)| t).sum();
        let mut rows = rows;
        rows.push(("other", (total - known).max(0.0)));
        rows
    }
}

/// Marks the start of a region on its input: identity forward; in the backward pass, the
/// end of the region's backward time. No-op (no graph node) when timing is off.
pub fn region_start<const D: usize>(x: Tensor<D>, part: Part) -> Tensor<D> {
    marker(x, part, Edge::Start)
}

/// Marks the end of a region on its output: identity forward; in the backward pass, the
/// start of the region's backward time.
pub fn region_end<const D: usize>(x: Tensor<D>, part: Part) -> Tensor<D> {
    marker(x, part, Edge::End)
}

#[derive(Debug, Clone, Copy)]
enum Edge {
    Start,
    End,
}

fn marker<const D: usize>(x: Tensor<D>, part: Part, edge: Edge) -> Tensor<D> {
    if !enabled() || !x.device().is_autodiff() {
        return x;
    }
    let Ok(primitive) = x.clone().try_into_primitive::<Autodiff<Flex>>() else {
        // Another autodiff backend: regions are not timed there.
        return x;
    };
    let (inner, guard) = primitive.into_parts();
    let tracked = match Marker
        .prepare::<NoCheckpointing>([guard])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish((part, edge), inner),
        OpsKind::UnTracked(prep) => prep.finish(inner),
    };
    Tensor::from_primitive::<Autodiff<Flex>>(tracked)
}

/// Backward of a marker: passes the gradient through and stamps the clock.
#[derive(Debug)]
struct Marker;

impl Backward<Flex, 1> for Marker {
    type State = (Part, Edge);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<Flex>(&ops.node);
        let [parent] = ops.parents;
        if let Some(parent) = parent {
            grads.register::<Flex>(parent.id, grad);
        }
        let (part, edge) = ops.state;
        let now = Instant::now();
        let mut s = state();
        match edge {
            Edge::End => s.open.push((part, now)),
            Edge::Start => {
                if let Some(at) = s.open.iter().rposition(|(p, _)| *p == part) {
                    let (_, began) = s.open.remove(at);
                    s.seconds[part.index()] += now.duration_since(began).as_secs_f64();
                }
            }
        }
    }
}
