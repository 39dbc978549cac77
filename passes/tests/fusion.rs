//! The fusion pass: which groups form on hand-built graphs (norms, RoPE, SiLU·up,
//! softmax), the KV-cache append fused with its new rows, what must stay outside (matmul, attention, pure
//! movement), no cycles, determinism, and, on random graphs, that the fused graph passes
//! the fusion spec, round-trips through the text format and computes bit for bit what the
//! original did (evaluated op by op with the reference semantics).

use indexmap::IndexMap;
use kiln_graph::text::{parse, print};
use kiln_graph::{Graph, Tensor, TensorExt, Tracer};
use kiln_ops::{Bindings, DType, Dim, FusedKind, HostTensor, Mask, Op, ReduceOp, Shape, Sym, UnaryOp};
use kiln_passes::{Fuse, FuseEpilogue, FuseMatVec, Pass, PassError, PassManager, Spec};
use proptest::prelude::*;

/// Runs the fusion pass alone, verifying the graph and the fusion spec afterwards.
fn fuse(g: Graph) -> Graph {
    PassManager::new(vec![Box::new(Fuse)]).verify(true).run(g).unwrap().graph
}

fn ops_of(g: &Graph) -> Vec<&'static str> {
    g.topo_order().into_iter().map(|n| g.node(n).op.name()).collect()
}

/// What a fused node holds.
#[derive(Debug)]
struct Group {
    ops: Vec<&'static str>,
    inputs: usize,
    outputs: usize,
    kind: Result<FusedKind, String>,
    scope: String,
}

fn groups(g: &Graph) -> Vec<Group> {
    g.topo_order()
        .into_iter()
        .filter_map(|n| match &g.node(n).op {
            Op::Fused(b) => Some(Group {
                ops: b.nodes.iter().map(|n| n.op.name()).collect(),
                inputs: b.inputs.len(),
                outputs: b.outputs.len(),
                kind: b.kind(),
                scope: g.node(n).scope.clone(),
            }),
            _ => None,
        })
        .collect()
}

fn sorted(mut v: Vec<&'static str>) -> Vec<&'static str> {
    v.sort_unstable();
    v
}

fn shape(dims: &[Dim]) -> Shape {
    Shape::new(dims.iter().cloned())
}

// ---- the groups that form -------------------------------------------------------------

#[test]
fn rms_norm_is_one_row_group() {
    let tr = Tracer::new();
    let x = tr.input("x", DType::BF16, [Dim::sym("seq"), Dim::fixed(64)]).unwrap();
    let w = tr.scope("norm", || tr.param("weight", DType::BF16, [64usize])).unwrap();
    let y = tr.scope("norm", || x.rms_norm(w, 1e-5)).unwrap();
    tr.output("y", y).unwrap();
    let g = fuse(tr.finish().unwrap());
    assert_eq!(ops_of(&g), ["input", "param", "const", "fused"]);
    let [grp] = <[Group; 1]>::try_from(groups(&g)).unwrap();
    assert_eq!(
        grp.ops,
        ["cast", "mul", "reduce_mean", "expand", "add", "rsqrt", "expand", "mul", "cast", "expand", "mul"]
    );
    // x, the eps constant and the weight; the broadcasts of eps and weight are copied in.
    assert_eq!((grp.inputs, grp.outputs), (3, 1));
    assert_eq!(grp.kind, Ok(FusedKind::Rows { rows: shape(&[Dim::sym("seq")]), cols: Shape::fixed(&[64]) }));
    assert_eq!(grp.scope, "norm");
}

#[test]
fn residual_add_and_norm_are_one_group_with_two_outputs() {
    let tr = Tracer::new();
    let x = tr.input("x", DType::F32, [3usize, 16]).unwrap();
    let a = tr.input("a", DType::F32, [3usize, 16]).unwrap();
    let w = tr.param("w", DType::F32, [16usize]).unwrap();
    let wo = tr.param("wo", DType::F32, [16usize, 16]).unwrap();
    let h = (x + a).unwrap();
    let n = h.rms_norm(w, 1e-6).unwrap();
    let out = (h + n.linear(wo, None).unwrap()).unwrap();
    tr.output("out", out).unwrap();
    let g = fuse(tr.finish().unwrap());
    // add+norm, the matmul, the second residual add.
    assert_eq!(ops_of(&g), ["input", "input", "param", "param", "const", "fused", "matmul", "fused"]);
    let gs = groups(&g);
    assert_eq!(gs[0].ops, ["add", "mul", "reduce_mean", "expand", "add", "rsqrt", "expand", "mul", "expand", "mul"]);
    assert_eq!(gs[0].outputs, 2, "h and norm(h)");
    assert!(matches!(gs[0].kind, Ok(FusedKind::Rows { .. })));
    assert_eq!((gs[1].ops.clone(), gs[1].outputs), (vec!["add"], 1));
    // The second add reads output 0 (h) of the first group and the matmul.
    let last = g.topo_order().into_iter().last().unwrap();
    let operands: Vec<_> = g.operands(last).iter().map(|v| (g.node(v.node).op.name(), v.output)).collect();
    assert_eq!(operands, [("fused", 0), ("matmul", 0)]);
}

/// `q`/`k` heads from a fused qkv projection, with RoPE from `[seq, d]` tables.
fn rope_graph<'t>(tr: &'t Tracer) -> (Tensor<'t>, Tensor<'t>, Tensor<'t>, Tensor<'t>) {
    let (heads, kv, d) = (4usize, 2usize, 8usize);
    let seq = Dim::sym("seq");
    let qkv = tr.input("qkv", DType::BF16, [Dim::fixed(1), seq.clone(), Dim::fixed((heads + 2 * kv) * d)]).unwrap();
    let cos = tr.input("cos", DType::BF16, [seq.clone(), Dim::fixed(d)]).unwrap();
    let sin = tr.input("sin", DType::BF16, [seq.clone(), Dim::fixed(d)]).unwrap();
    let past = tr.input("past", DType::BF16, [Dim::fixed(1), Dim::sym("past"), Dim::fixed(kv), Dim::fixed(d)]).unwrap();
    let heads_of = |t: Tensor<'t>, n: usize| t.reshape([Dim::fixed(1), seq.clone(), Dim::fixed(n), Dim::fixed(d)]);
    let q = heads_of(qkv.slice(-1, 0, heads * d).unwrap(), heads).unwrap().rope(cos, sin).unwrap();
    let k = heads_of(qkv.slice(-1, heads * d, (heads + kv) * d).unwrap(), kv).unwrap().rope(cos, sin).unwrap();
    let v = heads_of(qkv.slice(-1, (heads + kv) * d, (heads + 2 * kv) * d).unwrap(), kv).unwrap();
    (q, k, v, past)
}

#[test]
fn rope_with_its_slices_reshape_and_concat_is_one_group() {
    let tr = Tracer::new();
    let (q, _, _, _) = rope_graph(&tr);
    tr.output("q", q).unwrap();
    let g = fuse(tr.finish().unwrap());
    assert_eq!(ops_of(&g), ["input", "input", "input", "input", "fused"]);
    let [grp] = <[Group; 1]>::try_from(groups(&g)).unwrap();
    assert_eq!(
        sorted(grp.ops),
        sorted(vec![
            "slice", "reshape", "slice", "slice", "neg", "concat", // q heads, rotate_half
            "reshape", "expand", "mul", "reshape", "expand", "mul", "add", // · cos + rot · sin
        ])
    );
    assert_eq!((grp.inputs, grp.outputs), (3, 1), "qkv, cos, sin");
    let domain = shape(&[Dim::fixed(1), Dim::sym("seq"), Dim::fixed(4), Dim::fixed(8)]);
    assert_eq!(grp.kind, Ok(FusedKind::Elementwise { domain }));
}

#[test]
fn the_kv_cache_append_fuses_with_the_rows_it_appends() {
    let tr = Tracer::new();
    let (q, k, v, past) = rope_graph(&tr);
    let keys = past.concat(&[k], 1).unwrap();
    let values = past.concat(&[v], 1).unwrap();
    tr.output("y", q.attention(keys, values, Mask::Causal, 0.5).unwrap()).unwrap();
    tr.output("present", keys).unwrap();
    let g = fuse(tr.finish().unwrap());
    // No bare concat is left: each append is the only output of the group that computes
    // its new rows (k: RoPE; v: the slice of the projection), reading the cache as an
    // input; the RoPE of q is a group of its own.
    assert!(!ops_of(&g).contains(&"concat"), "{:?}", ops_of(&g));
    let gs = groups(&g);
    let names: Vec<Vec<&str>> = gs.iter().map(|grp| sorted(grp.ops.clone())).collect();
    let rope = vec![
        "slice", "reshape", "slice", "slice", "neg", "concat", "reshape", "expand", "mul", "reshape", "expand", "mul",
        "add",
    ];
    let mut rope_append = rope.clone();
    rope_append.push("concat");
    assert_eq!(names, [sorted(rope), sorted(rope_append), sorted(vec!["slice", "reshape", "concat"])]);
    let appends: Vec<_> = g
        .topo_order()
        .into_iter()
        .filter_map(|n| match &g.node(n).op {
            Op::Fused(b) => {
                let [kiln_ops::FusedRef::Node { node, .. }] = b.outputs[..] else { return None };
                let last = &b.nodes[node as usize];
                match (&last.op, &last.operands[..]) {
                    (Op::Concat { axis: 1 }, &[kiln_ops::FusedRef::Input(i), _]) => {
                        Some(g.node(g.operands(n)[i as usize].node).op.name())
                    }
                    _ => None,
                }
            }
            _ => None,
        })
        .collect();
    assert_eq!(appends, ["input", "input"], "both appends read the cache input `past` first");
    // The appended rows are computed from the coordinate, never materialized: no slice
    // outside the groups; attention is never fused.
    assert_eq!(ops_of(&g).iter().filter(|&&o| o == "slice").count(), 0);
    assert_eq!(ops_of(&g).iter().filter(|&&o| o == "attention").count(), 1);
}

#[test]
fn silu_times_up_with_the_gate_up_slices_is_one_group() {
    let tr = Tracer::new();
    let x = tr.input("x", DType::BF16, [Dim::sym("seq"), Dim::fixed(16)]).unwrap();
    let w = tr.param("gate_up", DType::BF16, [64usize, 16]).unwrap();
    let down = tr.param("down", DType::BF16, [16usize, 32]).unwrap();
    let gu = x.linear(w, None).unwrap();
    let (gate, up) = (gu.slice(-1, 0, 32).unwrap(), gu.slice(-1, 32, 64).unwrap());
    let y = gate.silu().unwrap().mul(up).unwrap().linear(down, None).unwrap();
    tr.output("y", y).unwrap();
    let g = fuse(tr.finish().unwrap());
    assert_eq!(ops_of(&g), ["input", "param", "param", "matmul", "const", "fused", "matmul"]);
    let [grp] = <[Group; 1]>::try_from(groups(&g)).unwrap();
    assert_eq!(grp.ops, ["slice", "slice", "neg", "exp", "expand", "add", "div", "mul"]);
    assert_eq!((grp.inputs, grp.outputs), (2, 1), "the projection and the constant 1");
}

#[test]
fn softmax_is_one_group_with_two_reductions() {
    let tr = Tracer::new();
    let x = tr.input("x", DType::F32, [Dim::sym("seq"), Dim::fixed(32)]).unwrap();
    tr.output("p", x.softmax(-1).unwrap()).unwrap();
    let g = fuse(tr.finish().unwrap());
    assert_eq!(ops_of(&g), ["input", "fused"]);
    let [grp] = <[Group; 1]>::try_from(groups(&g)).unwrap();
    assert_eq!(grp.ops, ["reduce_max", "expand", "sub", "exp", "reduce_sum", "expand", "div"]);
    assert_eq!(grp.kind, Ok(FusedKind::Rows { rows: shape(&[Dim::sym("seq")]), cols: Shape::fixed(&[32]) }));
}

#[test]
fn a_concat_of_two_groups_joins_them() {
    let tr = Tracer::new();
    let x = tr.input("x", DType::F32, [4usize, 8]).unwrap();
    let y = x.exp().unwrap().concat(&[x.neg().unwrap()], 1).unwrap().sqrt().unwrap();
    tr.output("y", y).unwrap();
    let g = fuse(tr.finish().unwrap());
    assert_eq!(ops_of(&g), ["input", "fused"]);
    assert_eq!(groups(&g)[0].ops, ["exp", "neg", "concat", "sqrt"]);
}

// ---- what stays outside -----------------------------------------------------------------

#[test]
fn no_group_reaches_around_a_matmul() {
    // exp → matmul → add(exp, matmul): fusing exp and add would need the matmul inside.
    let tr = Tracer::new();
    let x = tr.input("x", DType::F32, [4usize, 8]).unwrap();
    let w = tr.param("w", DType::F32, [8usize, 8]).unwrap();
    let a = x.exp().unwrap();
    let y = (a + a.matmul(w).unwrap()).unwrap();
    tr.output("y", y).unwrap();
    let g = fuse(tr.finish().unwrap());
    assert_eq!(ops_of(&g), ["input", "param", "fused", "matmul", "fused"]);
    assert_eq!(groups(&g).iter().map(|grp| grp.ops.clone()).collect::<Vec<_>>(), [vec!["exp"], vec!["add"]]);

    // Merging two groups through a matmul between them: exp(x) feeds a matmul that feeds
    // neg; add(exp, neg) may join one of them, not both.
    let tr = Tracer::new();
    let x = tr.input("x", DType::F32, [4usize, 8]).unwrap();
    let w = tr.param("w", DType::F32, [8usize, 8]).unwrap();
    let a = x.exp().unwrap();
    let b = a.matmul(w).unwrap().neg().unwrap();
    tr.output("y", (a + b).unwrap()).unwrap();
    let g = fuse(tr.finish().unwrap());
    assert_eq!(ops_of(&g), ["input", "param", "fused", "matmul", "fused"]);
    assert_eq!(groups(&g).iter().map(|grp| grp.ops.clone()).collect::<Vec<_>>(), [vec!["exp"], vec!["neg", "add"]]);
}

#[test]
fn matmul_attention_gather_and_topk_are_never_fused() {
    let tr = Tracer::new();
    let ids = tr.input("ids", DType::I64, [1usize, 4]).unwrap();
    let emb = tr.param("emb", DType::F32, [10usize, 8]).unwrap();
    let h = emb.gather(ids, 0).unwrap().exp().unwrap();
    let q = h.reshape([1usize, 4, 2, 4]).unwrap();
    let a = q.attention(q, q, Mask::Causal, 0.5).unwrap().reshape([1usize, 4, 8]).unwrap();
    let logits = a.matmul_t(emb, false, true).unwrap().tanh().unwrap();
    let (vals, idx) = logits.top_k(2, -1).unwrap();
    tr.output("vals", vals.neg().unwrap()).unwrap();
    tr.output("idx", idx).unwrap();
    tr.output("am", logits.argmax(-1).unwrap()).unwrap();
    let before = tr.finish().unwrap();
    let g = fuse(before.clone());
    for op in ["gather", "attention", "matmul", "topk", "argmax"] {
        assert_eq!(ops_of(&g).iter().filter(|&&o| o == op).count(), 1, "{op}");
    }
    let gs = groups(&g);
    assert_eq!(gs.iter().map(|grp| grp.ops.clone()).collect::<Vec<_>>(), [vec!["exp"], vec!["tanh"], vec!["neg"]]);
}

#[test]
fn pure_movement_is_left_alone() {
    let tr = Tracer::new();
    let x = tr.input("x", DType::F32, [4usize, 6]).unwrap();
    let y = x.reshape([2usize, 2, 6]).unwrap().permute(&[2, 0, 1]).unwrap().slice(0, 0, 3).unwrap();
    let z = x.slice(1, 0, 3).unwrap().concat(&[x.slice(1, 3, 6).unwrap()], 0).unwrap();
    tr.output("y", y).unwrap();
    tr.output("z", z).unwrap();
    let before = tr.finish().unwrap();
    let text = print(&before);
    let mut g = before;
    assert_eq!(Fuse.run(&mut g).unwrap(), 0);
    assert_eq!(print(&g), text);
}

#[test]
fn a_lone_elementwise_op_is_wrapped_and_a_leading_axis_reduction_is_not() {
    let tr = Tracer::new();
    let x = tr.input("x", DType::F32, [4usize, 6]).unwrap();
    let s = x.sum(&[0], false).unwrap(); // over the leading axis: no fused body expresses it
    tr.output("s", s.exp().unwrap()).unwrap();
    let g = fuse(tr.finish().unwrap());
    assert_eq!(ops_of(&g), ["input", "reduce_sum", "fused"]);
    assert_eq!(groups(&g)[0].ops, ["exp"]);
}

#[test]
fn the_fusion_spec_rejects_bare_compute_ops() {
    struct Nothing;
    impl Pass for Nothing {
        fn name(&self) -> &'static str {
            "nothing"
        }
        fn run(&self, _: &mut Graph) -> Result<usize, PassError> {
            Ok(0)
        }
        fn spec(&self) -> Spec {
            Spec::Fused
        }
    }
    let tr = Tracer::new();
    let x = tr.input("x", DType::F32, [4usize, 6]).unwrap();
    tr.output("y", tr.scope("blk", || x.exp()).unwrap()).unwrap();
    let err = PassManager::new(vec![Box::new(Nothing)]).verify(true).run(tr.finish().unwrap()).unwrap_err();
    assert_eq!(err.to_string(), "after pass `nothing`: phase check failed: node 1 (`exp` @blk) is not fused");
}

// ---- a decoder block: determinism, groups, values ----------------------------------------

/// A pre-norm decoder block with GQA attention, RoPE, a KV cache and a gated MLP, in f32
/// or bf16, with fixed sizes except `seq` and `past`.
fn block(dt: DType) -> Graph {
    let (h, heads, kv, d, ff) = (16usize, 2usize, 1usize, 8usize, 32usize);
    let tr = Tracer::new();
    let seq = Dim::sym("seq");
    let x = tr.input("x", dt, [Dim::fixed(1), seq.clone(), Dim::fixed(h)]).unwrap();
    let cos = tr.input("cos", dt, [seq.clone(), Dim::fixed(d)]).unwrap();
    let sin = tr.input("sin", dt, [seq.clone(), Dim::fixed(d)]).unwrap();
    let cache = [Dim::fixed(1), Dim::sym("past"), Dim::fixed(kv), Dim::fixed(d)];
    let (pk, pv) = (tr.input("pk", dt, cache.clone()).unwrap(), tr.input("pv", dt, cache).unwrap());
    let p = |name: &str, s: &[usize]| tr.param(name, dt, Shape::fixed(s)).unwrap();
    let hn = tr.scope("attn_norm", || x.rms_norm(p("n1", &[h]), 1e-5)).unwrap();
    let qkv = hn.linear(p("qkv", &[(heads + 2 * kv) * d, h]), None).unwrap();
    let split = |a: usize, b: usize, n: usize| {
        qkv.slice(-1, a * d, b * d).unwrap().reshape([Dim::fixed(1), seq.clone(), Dim::fixed(n), Dim::fixed(d)])
    };
    let q = split(0, heads, heads).unwrap().rope(cos, sin).unwrap();
    let k = split(heads, heads + kv, kv).unwrap().rope(cos, sin).unwrap();
    let v = split(heads + kv, heads + 2 * kv, kv).unwrap();
    let (keys, values) = (pk.concat(&[k], 1).unwrap(), pv.concat(&[v], 1).unwrap());
    let a = q.attention(keys, values, Mask::Causal, 0.3).unwrap();
    let a = a.reshape([Dim::fixed(1), seq.clone(), Dim::fixed(heads * d)]).unwrap();
    let hid = (x + a.linear(p("o", &[h, heads * d]), None).unwrap()).unwrap();
    let n2 = tr.scope("mlp_norm", || hid.rms_norm(p("n2", &[h]), 1e-5)).unwrap();
    let gu = n2.linear(p("gate_up", &[2 * ff, h]), None).unwrap();
    let act = gu.slice(-1, 0, ff).unwrap().silu().unwrap().mul(gu.slice(-1, ff, 2 * ff).unwrap()).unwrap();
    let out = (hid + act.linear(p("down", &[h, ff]), None).unwrap()).unwrap();
    tr.output("out", out.softmax(-1).unwrap()).unwrap();
    tr.output("keys", keys).unwrap();
    tr.output("values", values).unwrap();
    tr.finish().unwrap()
}

#[test]
fn a_decoder_block_fuses_into_the_expected_groups() {
    let g = fuse(block(DType::BF16));
    let gs = groups(&g);
    let names: Vec<Vec<&str>> = gs.iter().map(|grp| sorted(grp.ops.clone())).collect();
    let norm =
        sorted(vec!["cast", "mul", "reduce_mean", "expand", "add", "rsqrt", "expand", "mul", "cast", "expand", "mul"]);
    let mut add_norm = norm.clone();
    add_norm.push("add");
    let add_norm = sorted(add_norm);
    let rope = sorted(vec![
        "slice", "reshape", "slice", "slice", "neg", "concat", "reshape", "expand", "mul", "reshape", "expand", "mul",
        "add",
    ]);
    let mut rope_append = rope.clone();
    rope_append.push("concat");
    let v_append = sorted(vec!["slice", "reshape", "concat"]);
    let silu_up = sorted(vec!["slice", "slice", "neg", "exp", "expand", "add", "div", "mul"]);
    let add_softmax = sorted(vec!["add", "reduce_max", "expand", "sub", "exp", "reduce_sum", "expand", "div"]);
    let got: std::collections::BTreeSet<_> = names.iter().cloned().collect();
    let want: std::collections::BTreeSet<_> =
        [norm, rope, sorted(rope_append), v_append, add_norm.clone(), silu_up, add_softmax].into_iter().collect();
    assert_eq!(names.len(), 7, "{names:?}");
    assert_eq!(got, want);
    let residual = gs.iter().position(|grp| sorted(grp.ops.clone()) == add_norm).unwrap();
    assert_eq!(gs[residual].outputs, 2, "the residual and its norm");
    assert_eq!(gs[0].scope, "attn_norm");
    // Kernels: 7 groups (2 of them the appends), 4 matmuls, attention.
    let kernels = ops_of(&g).into_iter().filter(|o| !matches!(*o, "input" | "param" | "const" | "reshape")).count();
    assert_eq!(kernels, 12);
}

#[test]
fn fusion_is_deterministic() {
    let a = print(&fuse(block(DType::BF16)));
    let g = block(DType::BF16);
    assert_eq!(print(&fuse(g.clone())), a);
    assert_eq!(print(&fuse(g)), a);
    // Fusing again finds nothing to do; the text round-trips.
    let mut again = parse(&a).unwrap();
    assert_eq!(Fuse.run(&mut again).unwrap(), 0);
    assert_eq!(print(&again), a);
}

/// Deterministic pseudo-random values in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Evaluates `g` op by op with the reference semantics ([`Op::eval`]); inputs and params
/// get pseudo-random values by name. Returns the outputs in order.
fn evaluate(g: &Graph, syms: &Bindings) -> Vec<(String, HostTensor)> {
    let mut vals: IndexMap<kiln_graph::NodeId, Vec<HostTensor>> = IndexMap::new();
    for n in g.topo_order() {
        let node = g.node(n);
        let out = match &node.op {
            Op::Input { name, ty } | Op::Param { name, ty } => {
                let shape = ty.shape.eval(syms).unwrap();
                let seed = name.bytes().fold(7u64, |a, b| a.wrapping_mul(31).wrapping_add(u64::from(b)));
                let v = values(shape.iter().product(), seed);
                vec![match ty.dtype {
                    DType::I64 => HostTensor::from_i64(&shape, v.iter().map(|x| ((x + 1.0) * 4.0) as i64).collect()),
                    dt => HostTensor::from_f32_as(dt, &shape, v),
                }]
            }
            op => {
                let ins: Vec<&HostTensor> = g.operands(n).iter().map(|v| &vals[&v.node][v.output as usize]).collect();
                op.eval(&ins, syms).unwrap()
            }
        };
        vals.insert(n, out);
    }
    g.outputs().iter().map(|(k, v)| (k.clone(), vals[&v.node][v.output as usize].clone())).collect()
}

fn assert_same_values(a: &Graph, b: &Graph, syms: &Bindings) {
    let (x, y) = (evaluate(a, syms), evaluate(b, syms));
    assert_eq!(x.len(), y.len());
    for ((name, s), (name2, t)) in x.iter().zip(&y) {
        assert_eq!(name, name2);
        assert_eq!(s.shape(), t.shape(), "{name}");
        assert_eq!(s.dtype(), t.dtype(), "{name}");
        let bits = |t: &HostTensor| t.to_f32_vec().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert!(bits(s) == bits(t), "{name} differs");
    }
}

/// Fused, and with the matrix-vector prologues too (`fuse_matvec`, below).
#[test]
fn a_fused_decoder_block_computes_bit_for_bit_what_the_original_did() {
    for dt in [DType::F32, DType::BF16] {
        let g = block(dt);
        for f in [fuse(g.clone()), fuse_matvec(g.clone())] {
            for (seq, past) in [(3, 0), (1, 4)] {
                let syms = Bindings::from([(Sym::new("seq"), seq), (Sym::new("past"), past)]);
                assert_same_values(&g, &f, &syms);
            }
        }
    }
}

// ---- matrix-vector prologues ------------------------------------------------------------

/// Fusion, then the matrix-vector prologue pass, verifying after each.
fn fuse_matvec(g: Graph) -> Graph {
    PassManager::new(vec![Box::new(Fuse), Box::new(FuseMatVec)]).verify(true).run(g).unwrap().graph
}

/// The decoder block: each norm joins the projection after it, SiLU·up joins down; the
/// o projection (its x is attention's output) and the groups feeding attention stay.
#[test]
fn norms_and_silu_up_become_the_prologues_of_their_projections() {
    let g = fuse_matvec(block(DType::BF16));
    let matvec: Vec<(String, &'static str, usize)> = g
        .topo_order()
        .into_iter()
        .filter_map(|n| match &g.node(n).op {
            Op::Fused(b) => match b.kind() {
                Ok(FusedKind::MatVec { prologue, .. }) => {
                    let Op::Param { name, .. } = &g.node(g.operands(n).last()?.node).op else { return None };
                    let form = if matches!(*prologue, FusedKind::Rows { .. }) { "rows" } else { "elementwise" };
                    Some((name.clone(), form, b.outputs.len()))
                }
                _ => None,
            },
            _ => None,
        })
        .collect();
    let want = [("qkv", "rows", 2), ("gate_up", "rows", 3), ("down", "elementwise", 2)];
    let want: Vec<(String, &str, usize)> = want.iter().map(|(n, f, o)| (n.to_string(), *f, *o)).collect();
    assert_eq!(matvec, want, "(weight, prologue form, outputs: the prologue's, x among them, then y)");
    // Kernels: 12 after fusion, 3 matmuls absorbed.
    let kernels = ops_of(&g).into_iter().filter(|o| !matches!(*o, "input" | "param" | "const" | "reshape")).count();
    assert_eq!(kernels, 9);
    assert_eq!(ops_of(&g).iter().filter(|&&o| o == "matmul").count(), 1, "o_proj stays a matmul");
}

#[test]
fn matvec_fusion_is_deterministic_and_idempotent() {
    let g = block(DType::BF16);
    let text = print(&fuse_matvec(g.clone()));
    assert_eq!(print(&fuse_matvec(g)), text);
    let mut again = parse(&text).unwrap();
    assert_eq!(FuseMatVec.run(&mut again).unwrap(), 0);
    assert_eq!(print(&again), text);
}

/// What stays a plain matmul: x read by another matmul too, x a graph output, an
/// activation (not a param) as the weight, and no transpose.
#[test]
fn matvec_prologues_only_where_the_gemv_takes_them() {
    let build = |case: usize| {
        let tr = Tracer::new();
        let x = tr.input("x", DType::F32, [Dim::sym("seq"), Dim::fixed(8)]).unwrap();
        let h = x.rms_norm(tr.param("n", DType::F32, Shape::fixed(&[8])).unwrap(), 1e-5).unwrap();
        let w = tr.param("w", DType::F32, Shape::fixed(&[4, 8])).unwrap();
        let y = match case {
            3 => h.matmul_t(x.slice(0, 0, 4).unwrap().exp().unwrap(), false, true),
            4 => h.matmul(tr.param("wt", DType::F32, Shape::fixed(&[8, 4])).unwrap()),
            _ => h.linear(w, None),
        }
        .unwrap();
        tr.output("y", y).unwrap();
        match case {
            0 => tr
                .output("h2", h.linear(tr.param("w2", DType::F32, Shape::fixed(&[4, 8])).unwrap(), None).unwrap())
                .unwrap(),
            1 => tr.output("h", h).unwrap(),
            _ => {}
        }
        tr.finish().unwrap()
    };
    for case in [0, 1, 3, 4] {
        let g = fuse_matvec(build(case));
        let n = groups(&g).iter().filter(|grp| matches!(grp.kind, Ok(FusedKind::MatVec { .. }))).count();
        assert_eq!(n, 0, "case {case}: {}", print(&g));
        assert!(ops_of(&g).contains(&"matmul"), "case {case}");
    }
    // The control: a norm feeding only a linear does fuse.
    let g = fuse_matvec({
        let tr = Tracer::new();
        let x = tr.input("x", DType::F32, [Dim::sym("seq"), Dim::fixed(8)]).unwrap();
        let h = x.rms_norm(tr.param("n", DType::F32, Shape::fixed(&[8])).unwrap(), 1e-5).unwrap();
        tr.output("y", h.linear(tr.param("w", DType::F32, Shape::fixed(&[4, 8])).unwrap(), None).unwrap()).unwrap();
        tr.finish().unwrap()
    });
    assert!(!ops_of(&g).contains(&"matmul"));
}

/// A matrix-vector body's form is checked: the matmul must be last, read the last input
/// as its weight (and nothing else may), and y must be the last output.
#[test]
fn matvec_bodies_are_checked() {
    let g = fuse_matvec(block(DType::F32));
    let n = g
        .topo_order()
        .into_iter()
        .find(|&n| matches!(&g.node(n).op, Op::Fused(b) if matches!(b.kind(), Ok(FusedKind::MatVec { .. }))))
        .unwrap();
    let Op::Fused(b) = &g.node(n).op else { unreachable!() };
    assert!(b.prologue().is_some());
    let mut swapped = (**b).clone();
    let k = swapped.outputs.len();
    swapped.outputs.swap(0, k - 1);
    assert!(swapped.kind().unwrap_err().contains("y must be the last output"), "{:?}", swapped.kind());
    let mut no_x = (**b).clone();
    let x = match no_x.kind() {
        Ok(FusedKind::MatVec { x, .. }) => x,
        other => panic!("{other:?}"),
    };
    no_x.outputs.retain(|&r| r != x);
    assert!(no_x.kind().unwrap_err().contains("x must be an output"));
}

// ---- matrix-vector epilogues -------------------------------------------------------------

/// The body of the graph's (first) matrix-vector group with an epilogue.
fn epilogue_body(g: &Graph) -> Option<kiln_ops::FusedBody> {
    g.topo_order().into_iter().find_map(|n| match &g.node(n).op {
        Op::Fused(b) if matches!(b.kind(), Ok(FusedKind::MatVec { epilogue: Some(_), .. })) => Some((**b).clone()),
        _ => None,
    })
}

/// Fusion, the matrix-vector prologues, then the epilogues (the default pipeline's end).
fn fuse_epilogue(g: Graph) -> Graph {
    PassManager::new(vec![Box::new(Fuse), Box::new(FuseMatVec), Box::new(FuseEpilogue)])
        .verify(true)
        .run(g)
        .unwrap()
        .graph
}

/// SiLU·up moves from down's prologue into gate_up as its epilogue (y read through two
/// 32-column slices, at 0 and 32); down becomes a plain matmul; the kernel count stays;
/// every output is bit-identical to the unfused block's on the CPU.
#[test]
fn silu_up_becomes_the_epilogue_of_gate_up() {
    for dt in [DType::F32, DType::BF16] {
        let g = block(dt);
        let f = fuse_epilogue(g.clone());
        for (seq, past) in [(3, 0), (1, 4)] {
            let syms = Bindings::from([(Sym::new("seq"), seq), (Sym::new("past"), past)]);
            assert_same_values(&g, &f, &syms);
        }
        let epilogues: Vec<(usize, Vec<usize>)> = groups(&f)
            .iter()
            .filter_map(|grp| match &grp.kind {
                Ok(FusedKind::MatVec { epilogue: Some(e), .. }) => Some((e.width, e.offsets.to_vec())),
                _ => None,
            })
            .collect();
        assert_eq!(epilogues, [(32, vec![0, 32])], "{}", print(&f));
        let kernels = |g: &Graph| {
            ops_of(g).into_iter().filter(|o| !matches!(*o, "input" | "param" | "const" | "reshape")).count()
        };
        assert_eq!(kernels(&f), kernels(&fuse_matvec(g.clone())), "a group in, a group out");
        assert_eq!(ops_of(&f).iter().filter(|&&o| o == "matmul").count(), 2, "o_proj and down");
        // The gate_up group's outputs: the residual, x, then SiLU·up, then y.
        let b = epilogue_body(&f).unwrap();
        let shapes: Vec<String> = b.outputs.iter().map(|&r| b.ty(r).unwrap().shape.to_string()).collect();
        assert_eq!(shapes, ["[1, seq, 16]", "[1, seq, 16]", "[1, seq, 32]", "[1, seq, 64]"]);
        let epi = b.epilogue().unwrap();
        assert!(matches!(epi.kind(), Ok(FusedKind::Elementwise { .. })));
        assert_eq!(b.prologue().unwrap().outputs.len(), 2);
    }
    // Deterministic, and a second run finds nothing more to move.
    let text = print(&fuse_epilogue(block(DType::BF16)));
    assert_eq!(print(&fuse_epilogue(block(DType::BF16))), text);
    let mut again = parse(&text).unwrap();
    assert_eq!(FuseEpilogue.run(&mut again).unwrap(), 0);
}

/// What does not become an epilogue: a prologue that reads y along its rows (a sum over
/// y's columns is no elementwise epilogue), one whose y has another reader, and one
/// reading y through a slice narrower than its domain; the epilogue's form is checked.
#[test]
fn epilogues_only_where_the_gemv_takes_them() {
    let build = |case: usize| {
        let tr = Tracer::new();
        let x = tr.input("x", DType::F32, [Dim::sym("seq"), Dim::fixed(8)]).unwrap();
        let h = x.rms_norm(tr.param("n", DType::F32, Shape::fixed(&[8])).unwrap(), 1e-5).unwrap();
        let y = h.linear(tr.param("w", DType::F32, Shape::fixed(&[16, 8])).unwrap(), None).unwrap();
        let z = match case {
            0 => y.slice(1, 0, 8).unwrap().silu().unwrap().mul(y.slice(1, 8, 16).unwrap()).unwrap(),
            1 => y.exp().unwrap(),
            2 => y.slice(1, 0, 8).unwrap().exp().unwrap(),
            3 => y.permute(&[1, 0]).unwrap().exp().unwrap().permute(&[1, 0]).unwrap(),
            // One column of y broadcast over the row: no column-wise read.
            5 => {
                let one =
                    y.slice(1, 8, 9).unwrap().broadcast_to(&Shape::new([Dim::sym("seq"), Dim::fixed(8)])).unwrap();
                y.slice(1, 0, 8).unwrap().mul(one).unwrap()
            }
            _ => y.slice(1, 0, 8).unwrap().exp().unwrap(),
        };
        let cols = if case == 1 || case == 3 { 16 } else { 8 };
        let out = z.linear(tr.param("w2", DType::F32, Shape::fixed(&[4, cols])).unwrap(), None).unwrap();
        tr.output("out", out).unwrap();
        if case == 4 {
            tr.output("y", y).unwrap();
        }
        tr.finish().unwrap()
    };
    let epilogue = |g: &Graph| {
        groups(g).iter().find_map(|grp| match &grp.kind {
            Ok(FusedKind::MatVec { epilogue: Some(e), .. }) => Some((e.width, e.offsets.to_vec())),
            _ => None,
        })
    };
    let syms = Bindings::from([(Sym::new("seq"), 2)]);
    for (case, want) in
        [(0, Some((8, vec![0, 8]))), (1, Some((16, vec![0]))), (2, Some((8, vec![0]))), (3, None), (4, None), (5, None)]
    {
        let (g, f) = (build(case), fuse_epilogue(build(case)));
        assert_eq!(epilogue(&f), want, "case {case}: {}", print(&f));
        assert_same_values(&g, &f, &syms);
    }
    // The kind check names a slice of y narrower than the epilogue's columns (the body
    // edited after fusion: the slice reads 4 columns where its output has 8).
    let mut narrow = epilogue_body(&fuse_epilogue(build(0))).unwrap();
    let p = narrow.matmul_node().unwrap();
    let slice = narrow.nodes.iter_mut().skip(p + 1).find(|n| matches!(n.op, Op::Slice { .. })).unwrap();
    let Op::Slice { start, end, .. } = &mut slice.op else { unreachable!() };
    (*start, *end) = (Dim::fixed(0), Dim::fixed(4));
    let e = narrow.kind().unwrap_err();
    assert!(e.contains("a slice of y must be 8 columns wide"), "{e}");
}

// ---- random graphs ---------------------------------------------------------------------

#[derive(Clone, Debug)]
struct Recipe {
    bf16: bool,
    steps: Vec<(u8, u8, u8)>,
    outputs: Vec<u8>,
}

fn recipe() -> impl Strategy<Value = Recipe> {
    (
        any::<bool>(),
        prop::collection::vec((0u8..15, any::<u8>(), any::<u8>()), 1..24),
        prop::collection::vec(any::<u8>(), 0..3),
    )
        .prop_map(|(bf16, steps, outputs)| Recipe { bf16, steps, outputs })
}

fn step<'t>(tr: &'t Tracer, vals: &[Tensor<'t>], i: usize, (op, a, b): (u8, u8, u8)) -> kiln_graph::Result<Tensor<'t>> {
    let t = vals[a as usize % vals.len()];
    let u = vals[b as usize % vals.len()];
    let rank = t.rank();
    let axis = if rank == 0 { 0 } else { b as usize % rank };
    match op {
        0 => t.unary([UnaryOp::Exp, UnaryOp::Neg, UnaryOp::Tanh, UnaryOp::Sin][b as usize % 4]),
        1 => t.add(u),
        2 => t.mul_scalar(f64::from(b % 7) * 0.5 - 1.0),
        3 => t.reduce([ReduceOp::Sum, ReduceOp::Max, ReduceOp::Mean][a as usize % 3], &[axis as isize], b % 2 == 0),
        4 if rank >= 1 => t.softmax(-1),
        5 if rank >= 1 => {
            let w = tr.param(&format!("norm{i}"), t.dtype(), [t.dim(-1)?])?;
            t.rms_norm(w, 1e-5)
        }
        6 if rank >= 1 => {
            let d = t.shape().dim(axis).clone();
            match d.as_fixed() {
                Some(n) if n >= 2 => t.slice(axis as isize, n / 2, n),
                _ => t.slice(axis as isize, 0, d),
            }
        }
        7 if rank >= 1 => t.concat(&[u], axis as isize),
        8 if rank >= 2 => {
            let d = t.shape();
            let mut dims: Vec<Dim> = d.dims()[..rank - 2].to_vec();
            dims.push(d.dim(rank - 2) * d.dim(rank - 1));
            t.reshape(dims)
        }
        9 if rank >= 2 => {
            let mut perm: Vec<usize> = (0..rank).collect();
            perm.rotate_left(axis);
            t.permute(&perm)
        }
        10 if rank >= 1 => {
            let w = tr.param(&format!("w{i}"), t.dtype(), [Dim::fixed(4), t.dim(-1)?])?;
            t.linear(w, None)
        }
        11 => t.cast(if b % 2 == 0 { DType::BF16 } else { DType::F32 }),
        // A KV-style append of an input.
        12 if rank >= 1 => vals[0].concat(&[t], axis as isize),
        13 if rank >= 1 => {
            let cos = t.slice(-1, 0, t.dim(-1)?)?.exp()?;
            t.mul(cos)?.add(u)
        }
        14 => t.maximum(u)?.sqrt(),
        _ => Ok(t),
    }
}

fn build(r: &Recipe) -> Graph {
    let tr = Tracer::new();
    let dt = if r.bf16 { DType::BF16 } else { DType::F32 };
    let x = tr.input("x", dt, [Dim::fixed(2), Dim::sym("seq"), Dim::fixed(4)]).unwrap();
    let y = tr.input("y", dt, [Dim::fixed(2), Dim::sym("seq"), Dim::fixed(4)]).unwrap();
    let mut vals = vec![x, y];
    for (i, &s) in r.steps.iter().enumerate() {
        if let Ok(t) = tr.scope(&format!("s{}", i % 3), || step(&tr, &vals, i, s)) {
            vals.push(t);
        }
    }
    tr.output("out", *vals.last().unwrap()).unwrap();
    for (i, &o) in r.outputs.iter().enumerate() {
        tr.output(&format!("o{i}"), vals[o as usize % vals.len()]).unwrap();
    }
    tr.finish().unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Fusion passes its spec (checked by the manager), keeps values bit for bit, prints
    /// and parses back, and is deterministic.
    #[test]
    fn random_graphs_fuse_soundly(r in recipe()) {
        let g = build(&r);
        let f = PassManager::new(vec![Box::new(Fuse)]).verify(true).run(g.clone())
            .map_err(|e| TestCaseError::fail(format!("{e}\n{}", print(&g))))?.graph;
        let text = print(&f);
        prop_assert_eq!(print(&parse(&text).unwrap()), text.clone());
        prop_assert_eq!(print(&fuse(g.clone())), text);
        let syms = Bindings::from([(Sym::new("seq"), 3)]);
        assert_same_values(&g, &f, &syms);
    }
}

/// Guards against a degenerate generator: random graphs form row and elementwise groups,
/// multi-output groups and groups with copied movement ops, and keep input appends bare.
#[test]
fn random_graphs_exercise_fusion() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let (mut rows, mut elementwise, mut multi, mut copies, mut appends) = (0, 0, 0, 0, 0);
    for _ in 0..200 {
        let g = fuse(build(&recipe().new_tree(&mut runner).unwrap().current()));
        for grp in groups(&g) {
            match grp.kind {
                Ok(FusedKind::Rows { .. }) => rows += 1,
                Ok(FusedKind::Elementwise { .. }) => elementwise += 1,
                Ok(FusedKind::MatVec { .. }) => panic!("the fuse pass forms no matrix-vector group"),
                Err(e) => panic!("{e}"),
            }
            multi += usize::from(grp.outputs > 1);
            copies += usize::from(grp.ops.iter().any(|o| matches!(*o, "slice" | "reshape" | "permute" | "expand")));
        }
        appends += g
            .topo_order()
            .into_iter()
            .filter(|&n| matches!(g.node(n).op, Op::Concat { .. }) && g.operands(n)[0].node == g.inputs()["x"])
            .count();
    }
    assert!(
        rows >= 50 && elementwise >= 50 && multi >= 10 && copies >= 50 && appends >= 10,
        "rows {rows}, elementwise {elementwise}, multi-output {multi}, with copies {copies}, appends {appends}"
    );
}
