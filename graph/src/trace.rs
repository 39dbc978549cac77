//! Tracing: model code calls ops on [`Tensor`] handles and the [`Tracer`] records them
//! into a [`Graph`], type-checking each op as it is recorded.
//!
//! A `Tensor<'t>` is a small `Copy` handle (a [`Value`] plus a shared reference to its
//! tracer); no raw pointers, no global builder. Scopes give nodes and parameters their
//! module paths, and an op that rejects its inputs returns an error naming that path.

use crate::{Error, Graph, NodeId, Result, Value};
use kiln_ops::functional::{TensorExt, Trace};
use kiln_ops::{DType, Op, Shape, TensorType};
use smallvec::SmallVec;
use std::cell::RefCell;
use std::fmt;

/// Records a graph. Create one, trace a model's `forward` with it, then [`Tracer::finish`].
#[derive(Default)]
pub struct Tracer {
    state: RefCell<State>,
}

#[derive(Default)]
struct State {
    graph: Graph,
    scopes: Vec<String>,
}

/// A traced tensor: one output of one recorded node.
#[derive(Clone, Copy)]
pub struct Tensor<'t> {
    value: Value,
    tracer: &'t Tracer,
}

/// A layer or model: its `forward` records ops on the tracer the input belongs to.
/// Layers with several inputs add their own `forward` methods; this trait covers the
/// common one-in, one-out case so layers compose generically.
pub trait Module {
    fn forward<'t>(&self, x: Tensor<'t>) -> Result<Tensor<'t>>;
}

impl Tracer {
    pub fn new() -> Tracer {
        Tracer::default()
    }

    /// The current module path (`model.layers.0.mlp`).
    pub fn path(&self) -> String {
        self.state.borrow().scopes.join(".")
    }

    fn qualify(&self, name: &str) -> String {
        let p = self.path();
        if p.is_empty() {
            name.to_string()
        } else {
            format!("{p}.{name}")
        }
    }

    /// Runs `f` inside the child scope `name`. Nodes and params recorded in it are
    /// named under `path.name`. Scopes nest.
    pub fn scope<R>(&self, name: &str, f: impl FnOnce() -> Result<R>) -> Result<R> {
        self.state.borrow_mut().scopes.push(name.to_string());
        let r = f();
        self.state.borrow_mut().scopes.pop();
        r
    }

    /// A graph input, fed at run time. Dims may be symbols: `[Dim::sym("seq"), 64.into()]`.
    pub fn input(&self, name: &str, dtype: DType, shape: impl Into<Shape>) -> Result<Tensor<'_>> {
        let n = self.state.borrow_mut().graph.add_input(name, TensorType::new(dtype, shape))?;
        Ok(self.tensor(n.into()))
    }

    /// A parameter named `name` under the current scope (`weight` inside
    /// `model.norm` becomes `model.norm.weight`).
    pub fn param(&self, name: &str, dtype: DType, shape: impl Into<Shape>) -> Result<Tensor<'_>> {
        let full = self.qualify(name);
        let scope = self.path();
        let n = self.state.borrow_mut().graph.add_param(&full, TensorType::new(dtype, shape), &scope)?;
        Ok(self.tensor(n.into()))
    }

    /// Marks `t` as the graph output `name`.
    pub fn output(&self, name: &str, t: Tensor<'_>) -> Result<()> {
        self.check_same(t)?;
        self.state.borrow_mut().graph.set_output(name, t.value)
    }

    /// Records `op` on `inputs` under the current scope and returns its outputs.
    pub fn apply<'t>(&'t self, op: Op, inputs: &[Tensor<'t>]) -> Result<SmallVec<[Tensor<'t>; 2]>> {
        for t in inputs {
            self.check_same(*t)?;
        }
        let values: SmallVec<[Value; 4]> = inputs.iter().map(|t| t.value).collect();
        let path = self.path();
        let n = {
            let mut st = self.state.borrow_mut();
            st.graph.add(op, &values, &path).map_err(|source| Error::Shape { path: path.clone(), source })?
        };
        let outs = self.state.borrow().graph.node(n).outputs.len();
        Ok((0..outs).map(|i| self.tensor(Value::new(n, i as u8))).collect())
    }

    /// Verifies and returns the recorded graph.
    pub fn finish(self) -> Result<Graph> {
        let g = self.state.into_inner().graph;
        g.verify()?;
        Ok(g)
    }

    /// Reads the graph recorded so far.
    pub fn with_graph<R>(&self, f: impl FnOnce(&Graph) -> R) -> R {
        f(&self.state.borrow().graph)
    }

    fn tensor(&self, value: Value) -> Tensor<'_> {
        Tensor { value, tracer: self }
    }

    fn check_same(&self, t: Tensor<'_>) -> Result<()> {
        if !std::ptr::eq(self, t.tracer) {
            return Err(Error::ForeignTensor { path: self.path() });
        }
        Ok(())
    }
}

impl<'t> Tensor<'t> {
    pub fn value(&self) -> Value {
        self.value
    }
    pub fn node(&self) -> NodeId {
        self.value.node
    }
    pub fn tracer(&self) -> &'t Tracer {
        self.tracer
    }
}

impl<'t> Trace for Tensor<'t> {
    type Error = Error;
    fn ty(&self) -> TensorType {
        self.tracer.with_graph(|g| g.value_type(self.value).clone())
    }
    fn record(self, op: Op, inputs: &[Self]) -> Result<SmallVec<[Self; 2]>> {
        self.tracer.apply(op, inputs)
    }
    fn error(self, op: &str, reason: String) -> Error {
        Error::Trace { path: self.tracer.path(), op: op.into(), reason }
    }
}

impl fmt::Debug for Tensor<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "%{}", self.value.node.index())?;
        if self.value.output != 0 {
            write!(f, ".{}", self.value.output)?;
        }
        write!(f, ": {}", self.ty())
    }
}

macro_rules! binop {
    ($tr:ident, $f:ident, $method:ident) => {
        impl<'t> std::ops::$tr for Tensor<'t> {
            type Output = Result<Tensor<'t>>;
            fn $f(self, o: Tensor<'t>) -> Result<Tensor<'t>> {
                TensorExt::$method(self, o)
            }
        }
        impl<'t> std::ops::$tr<f64> for Tensor<'t> {
            type Output = Result<Tensor<'t>>;
            fn $f(self, o: f64) -> Result<Tensor<'t>> {
                TensorExt::$method(self, self.scalar(o)?)
            }
        }
    };
}
binop!(Add, add, add);
binop!(Sub, sub, sub);
binop!(Mul, mul, mul);
binop!(Div, div, div);

impl<'t> std::ops::Neg for Tensor<'t> {
    type Output = Result<Tensor<'t>>;
    fn neg(self) -> Result<Tensor<'t>> {
        TensorExt::neg(self)
    }
}
