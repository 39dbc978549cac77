//! Memory planning: every intermediate gets an offset in one arena.
//!
//! The schedule is [`Graph::topo_order`]. A value is live from the step that defines it
//! to the last step that reads it. Buffers are placed greedily, largest first, at the
//! lowest offset that does not overlap any already placed buffer whose live range
//! intersects (the "greedy by size" strategy of TFLite's arena planner). An elementwise
//! node may write its output *in place* over an operand of the same byte size that dies
//! at that node: the two values then share one buffer.
//!
//! Sources (inputs, params, constants) and graph outputs are not planned: they live in
//! their own buffers owned by the runtime. A `reshape` is a *view*: it gets no buffer of
//! its own but shares its operand's (its root's), so the root stays live until the last
//! use of any view of it (to the end of the schedule when a view is a graph output).
//! [`check`] re-derives liveness independently and proves that no two simultaneously
//! live buffers overlap.

use indexmap::IndexMap;
use kiln_graph::{Graph, NodeId, Value};
use kiln_ops::{Bindings, Op};
use std::collections::HashMap;

/// Where one value lives in the arena.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Allocation {
    pub offset: usize,
    pub size: usize,
    /// The value whose buffer this one reuses in place, if any.
    pub in_place_of: Option<Value>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct MemoryPlan {
    /// The schedule the plan is valid for.
    pub order: Vec<NodeId>,
    /// Every planned value, in schedule order.
    pub allocations: IndexMap<Value, Allocation>,
    /// Bytes of the arena (peak).
    pub arena_bytes: usize,
    /// Bytes if every intermediate had its own buffer.
    pub naive_bytes: usize,
    /// Views (reshape outputs) and the value whose buffer each one shares (never itself
    /// a view). A view of a source or graph output has no allocation either.
    pub views: IndexMap<Value, Value>,
}

/// The value whose buffer `v` shares: `v` itself unless it is a reshape (a view).
pub fn view_root(g: &Graph, mut v: Value) -> Value {
    while matches!(g.node(v.node).op, Op::Reshape(_)) {
        v = g.operands(v.node)[0];
    }
    v
}

#[derive(Clone, Copy, Debug)]
pub struct PlanOptions {
    /// Offsets and sizes are multiples of this (256 suits CUDA).
    pub alignment: usize,
    pub in_place: bool,
}

impl Default for PlanOptions {
    fn default() -> Self {
        PlanOptions { alignment: 256, in_place: true }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PlanError {
    #[error("cannot size `{what}`: {msg}")]
    Size { what: String, msg: String },
}

/// Values the plan covers: outputs of non-source, non-view nodes that are not graph
/// outputs.
fn planned_values(g: &Graph) -> Vec<Value> {
    let outputs: Vec<Value> = g.outputs().values().copied().collect();
    g.topo_order()
        .into_iter()
        .filter(|&n| {
            !matches!(g.node(n).op, Op::Input { .. } | Op::Param { .. } | Op::Constant { .. } | Op::Reshape(_))
        })
        .flat_map(|n| (0..g.node(n).outputs.len()).map(move |i| Value::new(n, i as u8)))
        .filter(|v| !outputs.contains(v))
        .collect()
}

/// (definition step, last step that reads it) of every value, by schedule position; a
/// view's reads count as reads of its root, and a root with a view that is a graph
/// output stays live to the end.
fn live_ranges(g: &Graph, order: &[NodeId]) -> HashMap<Value, (usize, usize)> {
    let mut ranges = direct_ranges(g, order);
    let end = order.len().saturating_sub(1);
    let outputs: Vec<Value> = g.outputs().values().copied().collect();
    for &n in order {
        if matches!(g.node(n).op, Op::Reshape(_)) {
            let v = Value::new(n, 0);
            let root = view_root(g, v);
            let last = if outputs.contains(&v) { end } else { ranges[&v].1 };
            let r = ranges.get_mut(&root).expect("root defined");
            r.1 = r.1.max(last);
        }
    }
    ranges
}

fn direct_ranges(g: &Graph, order: &[NodeId]) -> HashMap<Value, (usize, usize)> {
    let step: HashMap<NodeId, usize> = order.iter().enumerate().map(|(i, &n)| (n, i)).collect();
    let mut ranges = HashMap::new();
    for (i, &n) in order.iter().enumerate() {
        for o in 0..g.node(n).outputs.len() {
            ranges.insert(Value::new(n, o as u8), (i, i));
        }
    }
    for &n in order {
        for v in g.operands(n) {
            let r = ranges.get_mut(&v).expect("operand defined");
            r.1 = r.1.max(step[&n]);
        }
    }
    ranges
}

fn bytes(g: &Graph, v: Value, b: &Bindings, align: usize) -> Result<usize, PlanError> {
    let ty = g.value_type(v);
    let dims = ty.shape.eval(b).map_err(|msg| PlanError::Size { what: format!("%{}", v.node.index()), msg })?;
    let n: usize = dims.iter().product();
    Ok(ty.dtype.bytes_for(n).div_ceil(align) * align)
}

/// Plans the arena for the given symbol values (use the largest sizes the plan must
/// serve, e.g. `seq = max_tokens`).
pub fn plan(g: &Graph, b: &Bindings, opts: PlanOptions) -> Result<MemoryPlan, PlanError> {
    plan_with_reads(g, b, opts, &[])
}

/// [`plan`] for an executor that also reads value `v` at node `n` for each `(v, n)` of
/// `reads` (beyond the graph's operands: a kernel of `n` that computes one of its
/// operands from `v` itself), so `v` (its buffer, for a view) stays live through `n`.
pub fn plan_with_reads(
    g: &Graph,
    b: &Bindings,
    opts: PlanOptions,
    reads: &[(Value, NodeId)],
) -> Result<MemoryPlan, PlanError> {
    let align = opts.alignment.max(1);
    let order = g.topo_order();
    let mut ranges = live_ranges(g, &order);
    for &(v, n) in reads {
        let at = order.iter().position(|&m| m == n);
        if let (Some(at), Some(r)) = (at, ranges.get_mut(&view_root(g, v))) {
            r.1 = r.1.max(at);
        }
    }
    let values = planned_values(g);
    let mut size = HashMap::new();
    for &v in &values {
        size.insert(v, bytes(g, v, b, align)?);
    }
    let naive_bytes = size.values().sum();

    // In-place groups: an elementwise output joins the group of an operand that dies here.
    let mut group_of: HashMap<Value, usize> = HashMap::new();
    let mut groups: Vec<(Vec<Value>, usize, usize, usize)> = Vec::new(); // (members, size, start, end)
    let mut in_place_of: HashMap<Value, Value> = HashMap::new();
    for &v in &values {
        let (def, last) = ranges[&v];
        let mut joined = None;
        if opts.in_place && g.node(v.node).op.is_elementwise() {
            for x in g.operands(v.node) {
                let Some(&gi) = group_of.get(&x) else { continue };
                if ranges[&x].1 == def && size[&x] == size[&v] && groups[gi].2 <= def && groups[gi].3 == def {
                    joined = Some((gi, x));
                    break;
                }
            }
        }
        match joined {
            Some((gi, x)) => {
                groups[gi].0.push(v);
                groups[gi].3 = last;
                group_of.insert(v, gi);
                in_place_of.insert(v, x);
            }
            None => {
                group_of.insert(v, groups.len());
                groups.push((vec![v], size[&v], def, last));
            }
        }
    }

    // Greedy by size: largest first, then earliest start; lowest fitting offset.
    let mut idx: Vec<usize> = (0..groups.len()).collect();
    idx.sort_by(|&a, &b| groups[b].1.cmp(&groups[a].1).then(groups[a].2.cmp(&groups[b].2)).then(a.cmp(&b)));
    let mut placed: Vec<(usize, usize, usize, usize)> = Vec::new(); // (offset, size, start, end)
    let mut offset_of = vec![0usize; groups.len()];
    let mut arena_bytes = 0;
    for gi in idx {
        let (_, sz, s, e) = groups[gi];
        let mut busy: Vec<(usize, usize)> =
            placed.iter().filter(|p| p.2 <= e && s <= p.3).map(|p| (p.0, p.0 + p.1)).collect();
        busy.sort();
        let mut off = 0;
        for (bs, be) in busy {
            if off + sz <= bs {
                break;
            }
            off = off.max(be);
        }
        offset_of[gi] = off;
        placed.push((off, sz, s, e));
        arena_bytes = arena_bytes.max(off + sz);
    }

    let allocations = values
        .iter()
        .map(|&v| {
            let gi = group_of[&v];
            (v, Allocation { offset: offset_of[gi], size: size[&v], in_place_of: in_place_of.get(&v).copied() })
        })
        .collect();
    let views = order
        .iter()
        .filter(|&&n| matches!(g.node(n).op, Op::Reshape(_)))
        .map(|&n| (Value::new(n, 0), view_root(g, Value::new(n, 0))))
        .collect();
    Ok(MemoryPlan { order, allocations, arena_bytes, naive_bytes, views })
}

/// Proves the plan sound: every intermediate is planned, fits in the arena, and two
/// values whose live ranges intersect never overlap — unless the later one is an
/// elementwise output written in place over an operand that dies at its definition
/// (legal because each element is read before it is written).
pub fn check(g: &Graph, p: &MemoryPlan) -> Result<(), String> {
    let ranges = live_ranges(g, &p.order);
    for v in planned_values(g) {
        if !p.allocations.contains_key(&v) {
            return Err(format!("%{}.{} is not planned", v.node.index(), v.output));
        }
    }
    for (v, root) in &p.views {
        if *root != view_root(g, *v) || p.allocations.contains_key(v) {
            return Err(format!("view %{} must share the buffer of %{}", v.node.index(), root.node.index()));
        }
    }
    let allocs: Vec<(&Value, &Allocation)> = p.allocations.iter().collect();
    for (v, a) in &allocs {
        if a.offset + a.size > p.arena_bytes {
            return Err(format!("%{} ends past the arena", v.node.index()));
        }
        if let Some(x) = a.in_place_of {
            let legal = g.node(v.node).op.is_elementwise()
                && g.operands(v.node).contains(&x)
                && ranges[&x].1 == ranges[v].0
                && p.allocations.get(&x).map(|ax| ax.offset == a.offset && ax.size == a.size) == Some(true);
            if !legal {
                return Err(format!("%{} is not a legal in-place reuse of %{}", v.node.index(), x.node.index()));
            }
        }
    }
    // Values chained in place share a buffer; everything else must be disjoint while live.
    let root = |mut v: Value| {
        while let Some(x) = p.allocations[&v].in_place_of {
            v = x;
        }
        v
    };
    for i in 0..allocs.len() {
        for j in i + 1..allocs.len() {
            let (va, a) = allocs[i];
            let (vb, b) = allocs[j];
            let (ra, rb) = (ranges[va], ranges[vb]);
            let live_together = ra.0 <= rb.1 && rb.0 <= ra.1;
            let overlap = a.offset < b.offset + b.size && b.offset < a.offset + a.size;
            if live_together && overlap && root(*va) != root(*vb) {
                return Err(format!(
                    "%{} [{}, {}) and %{} [{}, {}) overlap while both live",
                    va.node.index(),
                    a.offset,
                    a.offset + a.size,
                    vb.node.index(),
                    b.offset,
                    b.offset + b.size
                ));
            }
        }
    }
    Ok(())
}
