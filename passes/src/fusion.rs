//! Operator fusion: groups of elementwise, reduction and index-remapping movement ops
//! become one [`Op::Fused`] node each, which codegen renders as one kernel.
//!
//! The rule is generic (it never looks at scopes or layer names):
//!
//! * **Compute ops** (`Unary`, `Binary`, `Select`, `Cast`, `Reduce`) are what groups are
//!   made of. Every live compute op ends up in a group (a group of one when nothing can
//!   join it), except a reduction that no fused body can express (see below).
//! * **Movement ops** `Reshape`, `Permute`, `Slice`, `Expand` are *free*: they are never
//!   members of a group; a group whose member reads one copies the chain of movement ops
//!   into its body (reading the chain's root as a group input), so a broadcast or a slice
//!   shared by several groups is recomputed by index mapping in each instead of being
//!   materialized. The original node stays only if something outside groups still reads
//!   it. `Concat` joins a group when every operand is produced inside it (a member or a
//!   copied movement chain), as `rotate_half`'s concat does, or when only its *leading*
//!   operand comes from outside: an **append** such as the KV-cache update
//!   `concat(past, rope(k))`, whose group computes the new rows and gives the whole
//!   concat (the GPU engine writes just the new rows into its resident cache). A concat of movement chains only is free
//!   like the other movement ops.
//! * **Never fused**: sources, `MatMul`, `Attention`, `Gather`, `ArgMax`, `TopK`, `Fused`.
//! * Groups grow greedily in topological order: a compute op (or a concat) tries to join
//!   the groups of its operands' producers and to copy its free operands, all at once;
//!   if that is not legal it starts alone and adds them one at a time, in operand order,
//!   keeping each that stays legal. Legal means: the body's [`FusedBody::kind`] is `Ok`
//!   (so every group is one kernel: elementwise, or row reductions over the same trailing
//!   axes), at most [`MAX_BODY_NODES`] body nodes, and no cycle through outside nodes
//!   (merging groups `G…` is refused when a value the merged group reads from outside
//!   depends on one of the `G`).
//! * A member whose value is used outside its group (or is a graph output) is a group
//!   output; values read from outside are group inputs, each once, in order of first use.
//!   The fused node's scope is the longest common module path of its members.
//!
//! The pass first drops dead code (so every group has an output) and, at the end, the
//! nodes the fused ones replaced. Iteration is by topological position and every map is
//! ordered, so the same graph gives the same result.

use crate::pass::removable;
use crate::{Pass, PassError, Spec};
use kiln_graph::{Graph, NodeId, Value};
use kiln_ops::{FusedBody, FusedNode, FusedRef, Op};
use smallvec::SmallVec;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

/// The largest fused body the pass forms (body nodes, copies of movement ops included).
pub const MAX_BODY_NODES: usize = 256;

/// The operator-fusion pass (see the module docs).
pub struct Fuse;

impl Pass for Fuse {
    fn name(&self) -> &'static str {
        "fuse"
    }
    fn spec(&self) -> Spec {
        Spec::Fused
    }
    fn run(&self, g: &mut Graph) -> Result<usize, PassError> {
        let fail = |msg: String| PassError::Failed { pass: "fuse", msg };
        remove_dead(g).map_err(fail)?;
        let groups = Planner::new(g).plan();
        // Values already replaced by a fused node's output (a later group may read them).
        let mut replaced: HashMap<Value, Value> = HashMap::new();
        let mut made = 0;
        for group in groups {
            if let Err(e) = group.body.kind() {
                return Err(fail(format!("formed a group that is no kernel ({e}); this is a bug")));
            }
            let inputs: Vec<Value> = group.inputs.iter().map(|v| replaced.get(v).copied().unwrap_or(*v)).collect();
            let fused =
                g.add(Op::Fused(Box::new(group.body)), &inputs, &group.scope).map_err(|e| fail(e.to_string()))?;
            for (i, &v) in group.outputs.iter().enumerate() {
                let out = u8::try_from(i).map_err(|_| fail("a fused group has more than 255 outputs".into()))?;
                g.replace_all_uses(v, Value::new(fused, out));
                replaced.insert(v, Value::new(fused, out));
            }
            made += 1;
        }
        remove_dead(g).map_err(fail)?;
        Ok(made)
    }
}

/// Removes every node that no output depends on (inputs and params stay).
pub(crate) fn remove_dead(g: &mut Graph) -> Result<(), String> {
    let live = crate::canonicalize::live_nodes(g);
    for n in g.topo_order().into_iter().rev() {
        if !live.contains(&n) && removable(&g.node(n).op) {
            g.remove_node(n).map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}

/// Ops groups are made of.
fn is_compute(op: &Op) -> bool {
    op.is_elementwise() || matches!(op, Op::Reduce { .. })
}

/// Movement ops a group may copy into its body (index remapping only).
fn is_free_movement(op: &Op) -> bool {
    matches!(op, Op::Reshape(_) | Op::Permute(_) | Op::Slice { .. } | Op::Expand(_))
}

/// The body that fusing node `n` alone would give (the node reading the group's inputs
/// in slot order). The fusion spec uses it to tell a reduction no body can express.
pub fn singleton_body(g: &Graph, n: NodeId) -> FusedBody {
    let node = g.node(n);
    let operands = g.operands(n);
    FusedBody {
        inputs: operands.iter().map(|&v| g.value_type(v).clone()).collect(),
        nodes: vec![FusedNode {
            op: node.op.clone(),
            operands: (0..operands.len()).map(|i| FusedRef::Input(i as u16)).collect(),
            outputs: node.outputs.clone(),
        }],
        outputs: (0..node.outputs.len()).map(|k| FusedRef::Node { node: 0, output: k as u8 }).collect(),
    }
}

/// The longest common module path (whole `.`-separated components) of `scopes`.
pub(crate) fn common_scope<'a>(mut scopes: impl Iterator<Item = &'a str>) -> String {
    let Some(first) = scopes.next() else { return String::new() };
    let mut common: Vec<&str> = if first.is_empty() { vec![] } else { first.split('.').collect() };
    for s in scopes {
        let n = common.iter().zip(s.split('.')).take_while(|(a, b)| *a == b).count();
        common.truncate(n);
    }
    common.join(".")
}

/// What a node is to the planner.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    /// Stays a node of its own (sources, structured ops, a barrier concat, …).
    Plain,
    /// A movement op groups copy into their bodies.
    Free,
    /// A member of group `g`.
    Member(usize),
}

/// A group of the plan: members and copied movement nodes, by topological position.
#[derive(Clone, Debug, Default)]
struct Group {
    members: BTreeSet<usize>,
    inlined: BTreeSet<usize>,
    alive: bool,
}

/// A group being considered: its members, copied movement nodes and the existing groups
/// it merges.
#[derive(Clone, Debug, Default)]
struct Cand {
    members: BTreeSet<usize>,
    inlined: BTreeSet<usize>,
    merged: Vec<usize>,
}

/// What a node may bring into its group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Attach {
    Merge(usize),
    Inline(usize),
}

/// A body with the values it reads and the values it gives, as (position, output).
struct Built {
    body: FusedBody,
    inputs: Vec<(usize, u8)>,
    outputs: Vec<(usize, u8)>,
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Unit {
    Node(usize),
    Group(usize),
}

struct Planner<'g> {
    g: &'g Graph,
    /// Topological order; nodes are referred to by their position in it.
    order: Vec<NodeId>,
    operands: Vec<SmallVec<[(usize, u8); 4]>>,
    /// For each node, the (user, output of this node it reads), sorted, deduplicated.
    users: Vec<Vec<(usize, u8)>>,
    /// Values that are graph outputs, and the nodes they belong to.
    graph_outputs: HashSet<(usize, u8)>,
    output_nodes: HashSet<usize>,
    role: Vec<Role>,
    groups: Vec<Group>,
    /// Visit marks of the cycle search (by node position and by group).
    seen_node: Vec<u32>,
    seen_group: Vec<u32>,
    stamp: u32,
}

/// A planned fused node: its body, the values it reads and the values it replaces.
struct Planned {
    body: FusedBody,
    inputs: Vec<Value>,
    outputs: Vec<Value>,
    scope: String,
}

impl<'g> Planner<'g> {
    fn new(g: &'g Graph) -> Planner<'g> {
        let order = g.topo_order();
        let pos: HashMap<NodeId, usize> = order.iter().enumerate().map(|(i, &n)| (n, i)).collect();
        let operands: Vec<SmallVec<[(usize, u8); 4]>> =
            order.iter().map(|&n| g.operands(n).iter().map(|v| (pos[&v.node], v.output)).collect()).collect();
        let mut users: Vec<Vec<(usize, u8)>> = vec![Vec::new(); order.len()];
        for (u, ops) in operands.iter().enumerate() {
            for &(p, k) in ops {
                users[p].push((u, k));
            }
        }
        for u in &mut users {
            u.sort_unstable();
            u.dedup();
        }
        let graph_outputs: HashSet<(usize, u8)> = g.outputs().values().map(|v| (pos[&v.node], v.output)).collect();
        let output_nodes = graph_outputs.iter().map(|&(p, _)| p).collect();
        let n = order.len();
        Planner {
            g,
            order,
            operands,
            users,
            graph_outputs,
            output_nodes,
            role: vec![Role::Plain; n],
            groups: Vec::new(),
            seen_node: vec![0; n],
            seen_group: Vec::new(),
            stamp: 0,
        }
    }

    fn op(&self, p: usize) -> &'g Op {
        &self.g.node(self.order[p]).op
    }

    fn plan(mut self) -> Vec<Planned> {
        for p in 0..self.order.len() {
            let op = self.op(p);
            self.role[p] = if is_compute(op) {
                self.place(p, false)
            } else if matches!(op, Op::Concat { .. }) {
                self.place_concat(p)
            } else if is_free_movement(op) {
                Role::Free
            } else {
                Role::Plain
            };
        }
        let mut groups: Vec<&Group> = self.groups.iter().filter(|g| g.alive).collect();
        groups.sort_by_key(|g| g.members.last().copied());
        groups
            .into_iter()
            .map(|group| {
                let built = self.build(&group.members, &group.inlined);
                let value = |&(p, k): &(usize, u8)| Value::new(self.order[p], k);
                Planned {
                    body: built.body,
                    inputs: built.inputs.iter().map(value).collect(),
                    outputs: built.outputs.iter().map(value).collect(),
                    scope: common_scope(group.members.iter().map(|&p| self.g.node(self.order[p]).scope.as_str())),
                }
            })
            .collect()
    }

    /// A concat joins a group if every operand is a member or a free movement node, or
    /// if only its leading operand comes from outside (an append: the group reads it as
    /// an input and gives the whole concat).
    fn place_concat(&mut self, p: usize) -> Role {
        let roles: Vec<Role> = self.operands[p].iter().map(|&(q, _)| self.role[q]).collect();
        let append = roles.len() >= 2 && roles[0] == Role::Plain && !roles[1..].contains(&Role::Plain);
        if roles.iter().all(|r| *r == Role::Free) {
            Role::Free
        } else if roles.contains(&Role::Plain) && !append {
            Role::Plain
        } else {
            self.place(p, true)
        }
    }

    /// Puts compute node (or all-inside concat) `p` into a group; returns its role.
    fn place(&mut self, p: usize, all_or_nothing: bool) -> Role {
        let attach = self.attachments(p);
        let alone = Cand { members: BTreeSet::from([p]), ..Cand::default() };
        let all = attach.iter().fold(alone.clone(), |c, &a| self.with(c, a));
        let chosen = if self.legal(p, &all) {
            Some(all)
        } else if all_or_nothing {
            // The operands this concat reads directly, without the groups their movement
            // chains start from.
            let direct = attach
                .iter()
                .filter(|a| match a {
                    Attach::Merge(g) => self.operands[p].iter().any(|&(q, _)| self.role[q] == Role::Member(*g)),
                    Attach::Inline(_) => true,
                })
                .fold(alone, |c, &a| self.with(c, a));
            self.legal(p, &direct).then_some(direct)
        } else if self.legal(p, &alone) {
            let mut cand = alone;
            for &a in &attach {
                let next = self.with(cand.clone(), a);
                if self.legal(p, &next) {
                    cand = next;
                }
            }
            Some(cand)
        } else {
            None
        };
        let Some(c) = chosen else { return Role::Plain };
        let id = self.groups.len();
        for &g in &c.merged {
            self.groups[g].alive = false;
        }
        for &m in &c.members {
            self.role[m] = Role::Member(id);
        }
        self.groups.push(Group { members: c.members, inlined: c.inlined, alive: true });
        Role::Member(id)
    }

    /// What node `p` may bring into its group, in operand order, deduplicated: the
    /// groups of its operands, its free operands (movement chains), and the groups those
    /// chains start from.
    fn attachments(&self, p: usize) -> Vec<Attach> {
        let mut out: Vec<Attach> = Vec::new();
        let push = |a: Attach, out: &mut Vec<Attach>| {
            if !out.contains(&a) {
                out.push(a);
            }
        };
        for &(q, _) in &self.operands[p] {
            match self.role[q] {
                Role::Member(g) => push(Attach::Merge(g), &mut out),
                Role::Free => {
                    push(Attach::Inline(q), &mut out);
                    let (_, roots) = self.chain(q);
                    for r in roots {
                        if let Role::Member(g) = self.role[r] {
                            push(Attach::Merge(g), &mut out);
                        }
                    }
                }
                Role::Plain => {}
            }
        }
        out
    }

    /// The free nodes of the movement chain ending at `f` and the nodes it reads.
    fn chain(&self, f: usize) -> (BTreeSet<usize>, BTreeSet<usize>) {
        let (mut nodes, mut roots) = (BTreeSet::new(), BTreeSet::new());
        let mut stack = vec![f];
        while let Some(q) = stack.pop() {
            if self.role[q] == Role::Free {
                if nodes.insert(q) {
                    stack.extend(self.operands[q].iter().map(|&(r, _)| r));
                }
            } else {
                roots.insert(q);
            }
        }
        (nodes, roots)
    }

    fn with(&self, mut c: Cand, a: Attach) -> Cand {
        match a {
            Attach::Merge(g) => {
                if !c.merged.contains(&g) {
                    c.members.extend(self.groups[g].members.iter().copied());
                    c.inlined.extend(self.groups[g].inlined.iter().copied());
                    c.merged.push(g);
                }
            }
            Attach::Inline(f) => c.inlined.extend(self.chain(f).0),
        }
        c
    }

    /// The candidate is one kernel and merging its groups creates no cycle.
    fn legal(&mut self, p: usize, c: &Cand) -> bool {
        if c.members.len() + c.inlined.len() > MAX_BODY_NODES {
            return false;
        }
        let built = self.build(&c.members, &c.inlined);
        if built.outputs.is_empty() || built.inputs.len() > u16::MAX as usize || built.body.kind().is_err() {
            return false;
        }
        c.merged.is_empty() || !self.creates_cycle(p, c, &built.inputs)
    }

    fn unit(&self, q: usize) -> Unit {
        match self.role[q] {
            Role::Member(g) => Unit::Group(g),
            _ => Unit::Node(q),
        }
    }

    /// Whether a value the merged group reads from outside depends on one of the merged
    /// groups, through nodes and groups placed so far (all before `p`; later nodes are
    /// not placed yet and cannot lead back).
    fn creates_cycle(&mut self, p: usize, c: &Cand, inputs: &[(usize, u8)]) -> bool {
        let targets: HashSet<Unit> = inputs.iter().map(|&(q, _)| self.unit(q)).collect();
        self.stamp += 1;
        let stamp = self.stamp;
        self.seen_group.resize(self.groups.len(), 0);
        let mut stack: Vec<usize> = Vec::new();
        for &g in &c.merged {
            for &m in &self.groups[g].members {
                stack.extend(self.users[m].iter().map(|&(u, _)| u));
            }
        }
        while let Some(y) = stack.pop() {
            if y >= p || c.members.contains(&y) {
                continue;
            }
            let unit = self.unit(y);
            let seen = match unit {
                Unit::Node(q) => &mut self.seen_node[q],
                Unit::Group(g) => &mut self.seen_group[g],
            };
            if *seen == stamp {
                continue;
            }
            *seen = stamp;
            if targets.contains(&unit) {
                return true;
            }
            match unit {
                Unit::Node(q) => stack.extend(self.users[q].iter().map(|&(u, _)| u)),
                Unit::Group(g) => {
                    for &m in &self.groups[g].members {
                        stack.extend(self.users[m].iter().map(|&(u, _)| u));
                    }
                }
            }
        }
        false
    }

    /// Whether every use of node `u` (a member or a copied movement node) stays inside
    /// the group, so the group need not give its value.
    fn inside(&self, u: usize, members: &BTreeSet<usize>, inlined: &BTreeSet<usize>) -> bool {
        members.contains(&u)
            || (inlined.contains(&u)
                && !self.output_nodes.contains(&u)
                && self.users[u].iter().all(|&(w, _)| self.inside(w, members, inlined)))
    }

    /// The body of a group: members and copies in topological order.
    fn build(&self, members: &BTreeSet<usize>, inlined: &BTreeSet<usize>) -> Built {
        let all: BTreeSet<usize> = members.union(inlined).copied().collect();
        let index: BTreeMap<usize, u16> = all.iter().enumerate().map(|(i, &p)| (p, i as u16)).collect();
        let mut inputs: Vec<(usize, u8)> = Vec::new();
        let mut input_index: BTreeMap<(usize, u8), u16> = BTreeMap::new();
        let mut nodes = Vec::with_capacity(all.len());
        let mut input_types = Vec::new();
        for &p in &all {
            let operands = self.operands[p]
                .iter()
                .map(|&(q, k)| match index.get(&q) {
                    Some(&node) => FusedRef::Node { node, output: k },
                    None => {
                        let i = *input_index.entry((q, k)).or_insert_with(|| {
                            inputs.push((q, k));
                            input_types.push(self.g.value_type(Value::new(self.order[q], k)).clone());
                            (inputs.len() - 1) as u16
                        });
                        FusedRef::Input(i)
                    }
                })
                .collect();
            let node = self.g.node(self.order[p]);
            nodes.push(FusedNode { op: node.op.clone(), operands, outputs: node.outputs.clone() });
        }
        let mut outputs = Vec::new();
        let mut refs = Vec::new();
        for &m in members {
            for k in 0..self.g.node(self.order[m]).outputs.len() as u8 {
                let used_outside = self.graph_outputs.contains(&(m, k))
                    || self.users[m].iter().any(|&(u, kk)| kk == k && !self.inside(u, members, inlined));
                if used_outside {
                    outputs.push((m, k));
                    refs.push(FusedRef::Node { node: index[&m], output: k });
                }
            }
        }
        Built { body: FusedBody { inputs: input_types, nodes, outputs: refs }, inputs, outputs }
    }
}

/// The fusion phase check: every node is a source, a movement op (`reshape` is a view),
/// a structured op (matmul, attention, gather, argmax, topk) or a fused node whose body
/// is one kernel; no bare elementwise op remains, nor a reduction a fused body could hold.
pub(crate) fn check_fused(g: &Graph) -> Result<(), String> {
    let mut bad = Vec::new();
    for n in g.topo_order() {
        let node = g.node(n);
        let why = match &node.op {
            op if op.is_source() => None,
            Op::Reshape(_) | Op::Permute(_) | Op::Slice { .. } | Op::Expand(_) | Op::Concat { .. } => None,
            Op::MatMul { .. } | Op::Attention(_) | Op::Gather { .. } | Op::ArgMax { .. } | Op::TopK { .. } => None,
            Op::Fused(b) => b.kind().err().map(|e| format!("its body is no kernel: {e}")),
            Op::Reduce { .. } if singleton_body(g, n).kind().is_err() => None,
            op if op.is_elementwise() || matches!(op, Op::Reduce { .. }) => Some("is not fused".to_string()),
            _ => Some("is not allowed after fusion".to_string()),
        };
        if let Some(why) = why {
            bad.push(format!("node {} (`{}` @{}) {why}", n.index(), node.op.name(), node.scope));
        }
    }
    if bad.is_empty() {
        Ok(())
    } else {
        Err(bad.join("; "))
    }
}
