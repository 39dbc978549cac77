//! The verifier: callable after any change (and by every pass in checked builds).

use crate::{Error, Graph, Result};
use kiln_ops::Op;
use petgraph::visit::EdgeRef;
use petgraph::Direction;

pub(crate) fn verify(graph: &Graph) -> Result<()> {
    let g = graph.petgraph();
    let fail = |msg: String| Err(Error::Verify(msg));
    if petgraph::algo::is_cyclic_directed(g) {
        return fail("the graph has a cycle".into());
    }
    for n in g.node_indices() {
        let node = &g[n];
        let mut slots: Vec<u16> = g.edges_directed(n, Direction::Incoming).map(|e| e.weight().slot).collect();
        slots.sort_unstable();
        if slots.iter().enumerate().any(|(i, &s)| s as usize != i) {
            return fail(format!("node %{} ({}) has input slots {slots:?}", n.index(), node.op.name()));
        }
        for e in g.edges_directed(n, Direction::Incoming) {
            let src = &g[e.source()];
            if e.weight().output as usize >= src.outputs.len() {
                return fail(format!(
                    "node %{} reads output {} of %{} which has {}",
                    n.index(),
                    e.weight().output,
                    e.source().index(),
                    src.outputs.len()
                ));
            }
        }
        let operands = graph.operands(n);
        let types: Vec<_> = operands.iter().map(|v| graph.value_type(*v).clone()).collect();
        match node.op.infer(&types) {
            Ok(out) if out == node.outputs => {}
            Ok(out) => {
                return fail(format!(
                    "node %{} ({}) records output types {:?} but its rule gives {:?}",
                    n.index(),
                    node.op.name(),
                    node.outputs,
                    out
                ))
            }
            Err(e) => return fail(format!("node %{}: {e}", n.index())),
        }
    }
    for (kind, map) in [("input", graph.inputs()), ("param", graph.params())] {
        for (name, &n) in map {
            let ok = graph.contains(n)
                && match &graph.node(n).op {
                    Op::Input { name: m, .. } => kind == "input" && m == name,
                    Op::Param { name: m, .. } => kind == "param" && m == name,
                    _ => false,
                };
            if !ok {
                return fail(format!("{kind} `{name}` does not point at its {kind} node"));
            }
        }
    }
    for n in g.node_indices() {
        match &g[n].op {
            Op::Input { name, .. } if graph.inputs().get(name) != Some(&n) => {
                return fail(format!("input node `{name}` is not registered"))
            }
            Op::Param { name, .. } if graph.params().get(name) != Some(&n) => {
                return fail(format!("param node `{name}` is not registered"))
            }
            _ => {}
        }
    }
    for (name, v) in graph.outputs() {
        if !graph.contains(v.node) || v.output as usize >= graph.node(v.node).outputs.len() {
            return fail(format!("output `{name}` dangles"));
        }
    }
    Ok(())
}
