use kiln_graph::ops::{DType, Dim};
use kiln_graph::{Module, Result, Tensor, TensorExt, Tracer};

struct Mlp {
    hidden: usize,
    inner: usize,
}

impl Module for Mlp {
    fn forward<'t>(&self, x: Tensor<'t>) -> Result<Tensor<'t>> {
        let tr = x.tracer();
        let h = tr.scope("up", || {
            let w = tr.param("weight", DType::F32, [self.inner, self.hidden])?;
            x.linear(w, None)
        })?;
        tr.scope("down", || {
            let w = tr.param("weight", DType::F32, [self.hidden, self.hidden])?; // wrong on purpose
            h.silu()?.linear(w, None)
        })
    }
}

#[test]
fn shape_error_names_module_path_op_and_both_shapes() {
    let tr = Tracer::new();
    let x = tr.input("x", DType::F32, [Dim::sym("seq"), Dim::fixed(8)]).unwrap();
    let err = tr.scope("mlp", || Mlp { hidden: 8, inner: 32 }.forward(x)).unwrap_err();
    assert_eq!(
        err.to_string(),
        "in `mlp.down`: matmul: contraction dims differ: 32 vs 8 (inputs: f32[seq, 32], f32[8, 8])"
    );
}

#[test]
fn hash_consing_dedups_identical_ops() {
    let tr = Tracer::new();
    let x = tr.input("x", DType::F32, [4usize]).unwrap();
    let a = x.exp().unwrap();
    let b = x.exp().unwrap();
    assert_eq!(a.node(), b.node());
    let c = (a + b).unwrap();
    tr.output("y", c).unwrap();
    let g = tr.finish().unwrap();
    assert_eq!(g.node_count(), 3);
    let text = kiln_graph::text::print(&g);
    assert_eq!(
        text,
        "kiln.graph v1\n%0 = input{name=\"x\"} : f32[4]\n%1 = exp(%0) : f32[4]\n%2 = add(%1, %1) : f32[4]\noutput \"y\" = %2\n"
    );
    assert_eq!(kiln_graph::text::print(&kiln_graph::text::parse(&text).unwrap()), text);
}
