//! JSON export, for web viewers, notebooks and diffing tools.
//!
//! # Schema (version 1)
//!
//! The same schema is in `viz/SCHEMA.md`.
//!
//! ```text
//! {
//!   "version": 1,
//!   "nodes": [                                  // in topological order; nodes[i].id == i
//!     {
//!       "id": 3,                                // dense id: %3 in the IR text format
//!       "op": "matmul",                         // Op::name()
//!       "class": "structured",                  // input | param | constant | elementwise
//!                                               // | reduce | movement | structured | other
//!       "attrs": { "transpose_a": false,        // every attribute of Op::attrs(), see below
//!                  "transpose_b": true },
//!       "outputs": [                            // one per output, in output order
//!         { "type": "f32[seq, 32]",             // as printed by the IR
//!           "dtype": "f32",
//!           "shape": ["seq", 32] }              // fixed dims are numbers, symbolic ones strings
//!       ],
//!       "scope": "mlp.up",                      // module path, "" at the top level
//!       "inputs": [                             // operands, in slot order
//!         { "node": 0, "output": 0 },
//!         { "node": 2, "output": 0 }
//!       ]
//!     }
//!   ],
//!   "inputs":  [ { "name": "x", "node": 0 } ],             // graph inputs, in declaration order
//!   "params":  [ { "name": "mlp.up.weight", "node": 2 } ], // weights, in declaration order
//!   "outputs": [ { "name": "y", "node": 9, "output": 0 } ] // graph outputs, in declaration order
//! }
//! ```
//!
//! Attribute values: integers and booleans as JSON numbers and booleans; `f32` as numbers
//! (`"inf"`, `"-inf"`, `"NaN"` as strings); strings and dtypes as strings; a dim as a
//! number when fixed, else its expression as a string (`"past + seq"`); a shape as an
//! array of dims; integer and float lists as arrays; an attention mask as `"none"`,
//! `"causal"` or `"sliding_window(4096)"`.
//!
//! Several stages (`stages_to_json`): `{ "version": 1, "stages": [ { "name": "traced",
//! "graph": { …as above, without "version"… } } ] }`.
//!
//! Output is deterministic: object keys are sorted and nodes are in topological order.

use crate::model::mask_to_string;
use crate::{Numbering, OpClass, Stage};
use kiln_graph::ops::{Attr, Dim, Shape};
use kiln_graph::{Graph, NodeId};
use serde_json::{json, Map, Value as J};

/// The schema version written in `"version"`.
pub const SCHEMA_VERSION: u64 = 1;

/// One graph as JSON (see the module documentation for the schema).
pub fn to_json(g: &Graph) -> J {
    let mut v = graph_json(g);
    v.as_object_mut().expect("graph is an object").insert("version".into(), json!(SCHEMA_VERSION));
    v
}

/// Several stages as JSON: `{"version": 1, "stages": [{"name": …, "graph": …}]}`.
pub fn stages_to_json(stages: &[Stage]) -> J {
    let stages: Vec<J> = stages.iter().map(|(name, g)| json!({ "name": name, "graph": graph_json(g) })).collect();
    json!({ "version": SCHEMA_VERSION, "stages": stages })
}

fn graph_json(g: &Graph) -> J {
    let num = Numbering::new(g);
    let nodes: Vec<J> = num
        .order()
        .iter()
        .map(|&n| {
            let node = g.node(n);
            let attrs: Map<String, J> =
                node.op.attrs().into_iter().map(|(k, a)| (k.to_string(), attr_json(&a))).collect();
            let outputs: Vec<J> = node
                .outputs
                .iter()
                .map(|t| json!({ "type": t.to_string(), "dtype": t.dtype.name(), "shape": shape_json(&t.shape) }))
                .collect();
            let inputs: Vec<J> =
                g.operands(n).iter().map(|v| json!({ "node": num.id(v.node), "output": v.output })).collect();
            json!({
                "id": num.id(n),
                "op": node.op.name(),
                "class": OpClass::of(&node.op).name(),
                "attrs": attrs,
                "outputs": outputs,
                "scope": node.scope,
                "inputs": inputs,
            })
        })
        .collect();
    fn named<'a>(num: &Numbering, m: impl Iterator<Item = (&'a String, &'a NodeId)>) -> Vec<J> {
        m.map(|(name, &n)| json!({ "name": name, "node": num.id(n) })).collect()
    }
    let outputs: Vec<J> = g
        .outputs()
        .iter()
        .map(|(name, v)| json!({ "name": name, "node": num.id(v.node), "output": v.output }))
        .collect();
    json!({
        "nodes": nodes,
        "inputs": named(&num, g.inputs().iter()),
        "params": named(&num, g.params().iter()),
        "outputs": outputs,
    })
}

fn dim_json(d: &Dim) -> J {
    match d.as_fixed() {
        Some(n) => json!(n),
        None => json!(d.to_string()),
    }
}

fn shape_json(s: &Shape) -> J {
    J::Array(s.dims().iter().map(dim_json).collect())
}

fn f32_json(f: f32) -> J {
    if f.is_finite() {
        // Through the shortest decimal form, so 0.1f32 is written 0.1, not 0.10000000149.
        json!(format!("{f:?}").parse::<f64>().unwrap_or(f as f64))
    } else {
        json!(format!("{f}"))
    }
}

fn attr_json(a: &Attr) -> J {
    match a {
        Attr::Int(i) => json!(i),
        Attr::Bool(b) => json!(b),
        Attr::F32(f) => f32_json(*f),
        Attr::Str(s) => json!(s),
        Attr::DType(d) => json!(d.name()),
        Attr::Dim(d) => dim_json(d),
        Attr::Shape(s) => shape_json(s),
        Attr::Ints(v) => json!(v),
        Attr::Floats(v) => J::Array(v.iter().map(|&f| f32_json(f)).collect()),
        Attr::Mask(m) => json!(mask_to_string(*m)),
    }
}
