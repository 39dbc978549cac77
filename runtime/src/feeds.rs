//! Weight and feed checks and symbol binding, shared by every executor (so a graph fails
//! the same way on every backend).

use crate::error::{Mismatch, RuntimeError};
use indexmap::IndexMap;
use kiln_graph::Graph;
use kiln_ops::{Bindings, Dim, HostTensor, Shape, Sym, TensorType};
use std::collections::HashMap;

fn describe(t: &HostTensor) -> String {
    TensorType::new(t.dtype(), Shape::fixed(t.shape())).to_string()
}

/// Every param supplied with exactly its dtype and (fixed) shape, and nothing else.
pub(crate) fn check_weights(graph: &Graph, weights: &IndexMap<String, HostTensor>) -> Result<(), RuntimeError> {
    let (mut missing, mut mismatched) = (Vec::new(), Vec::new());
    for (name, &n) in graph.params() {
        let ty = &graph.node(n).outputs[0];
        let Some(shape) = ty.shape.as_fixed() else {
            return Err(RuntimeError::SymbolicParam { name: name.clone(), ty: ty.to_string() });
        };
        match weights.get(name) {
            None => missing.push(name.clone()),
            Some(w) if w.dtype() != ty.dtype || w.shape() != shape.as_slice() => {
                mismatched.push(Mismatch { name: name.clone(), expected: ty.clone(), got: describe(w) })
            }
            Some(_) => {}
        }
    }
    let unexpected: Vec<String> = weights.keys().filter(|k| !graph.params().contains_key(*k)).cloned().collect();
    if !(missing.is_empty() && unexpected.is_empty() && mismatched.is_empty()) {
        return Err(RuntimeError::Weights { missing, unexpected, mismatched });
    }
    Ok(())
}

/// Checks the feeds and binds the symbols from input dims that are a single symbol.
pub(crate) fn bind(graph: &Graph, feeds: &IndexMap<String, HostTensor>) -> Result<Bindings, RuntimeError> {
    let (mut missing, mut mismatched) = (Vec::new(), Vec::new());
    for (name, &n) in graph.inputs() {
        let ty = &graph.node(n).outputs[0];
        match feeds.get(name) {
            None => missing.push(name.clone()),
            Some(f) if f.dtype() != ty.dtype || f.rank() != ty.rank() => {
                mismatched.push(Mismatch { name: name.clone(), expected: ty.clone(), got: describe(f) })
            }
            Some(_) => {}
        }
    }
    let unexpected: Vec<String> = feeds.keys().filter(|k| !graph.inputs().contains_key(*k)).cloned().collect();
    if !(missing.is_empty() && unexpected.is_empty() && mismatched.is_empty()) {
        return Err(RuntimeError::Feeds { missing, unexpected, mismatched });
    }
    let mut b = Bindings::new();
    let mut origin: HashMap<Sym, (&str, usize)> = HashMap::new();
    for (name, &n) in graph.inputs() {
        let ty = &graph.node(n).outputs[0];
        for (axis, (d, &got)) in ty.shape.dims().iter().zip(feeds[name].shape()).enumerate() {
            let syms = d.symbols();
            let [s] = syms.as_slice() else { continue };
            if *d != Dim::from(*s) {
                continue;
            }
            match b.get(s) {
                Some(&bound) if bound != got => {
                    let (bound_input, bound_axis) = origin[s];
                    return Err(RuntimeError::SymbolConflict {
                        input: name.clone(),
                        axis,
                        sym: s.to_string(),
                        value: got,
                        bound,
                        bound_input: bound_input.to_string(),
                        bound_axis,
                    });
                }
                Some(_) => {}
                None => {
                    b.insert(*s, got);
                    origin.insert(*s, (name.as_str(), axis));
                }
            }
        }
    }
    for (name, &n) in graph.inputs() {
        let ty = &graph.node(n).outputs[0];
        for (axis, (d, &got)) in ty.shape.dims().iter().zip(feeds[name].shape()).enumerate() {
            match d.eval(&b) {
                Ok(expected) if expected == got => {}
                Ok(expected) => {
                    return Err(RuntimeError::DimMismatch {
                        input: name.clone(),
                        axis,
                        dim: d.to_string(),
                        expected,
                        got,
                    })
                }
                Err(reason) => {
                    return Err(RuntimeError::UnboundDim { input: name.clone(), axis, dim: d.to_string(), reason })
                }
            }
        }
    }
    Ok(b)
}
