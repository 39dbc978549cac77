//! Property tests of the text format and the verifier:
//! (a) the parser never panics, on arbitrary strings, token soups and mutations of valid
//!     IR texts; whatever it accepts round-trips;
//! (b) random traced graphs verify and round-trip through the text format;
//! (c) corrupted graphs are rejected by the verifier, and corrupted texts by the parser
//!     on the corrupted line.

use kiln_graph::ops::{DType, Dim, Op, ReduceOp, TensorType, UnaryOp};
use kiln_graph::text::{parse, print};
use kiln_graph::{Error, Graph, Tensor, TensorExt, Tracer, Value};
use proptest::prelude::*;

/// A valid text exercising every attribute kind.
const SEED: &str = r#"kiln.graph v1
%0 = input{name="x"} : f32[batch, past + seq, 4, 16]
%1 = input{name="ids"} : i64[batch, seq]
%2 = param{name="emb"} : f32[1000, 64]  @model.embed
%3 = gather{axis=0}(%2, %1) : f32[batch, seq, 64]  @"model embed"
%4 = reduce_mean{axes=[2], keep_dims=true}(%3) : f32[batch, seq, 1]
%5 = reshape{shape=[batch, seq, 4, 16]}(%3) : f32[batch, seq, 4, 16]
%6 = permute{perm=[0, 2, 1, 3]}(%5) : f32[batch, 4, seq, 16]
%7 = slice{axis=1, start=past, end=past + seq}(%0) : f32[batch, seq, 4, 16]
%8 = attention{mask=window(4096), scale=0.125}(%5, %0, %0) : f32[batch, seq, 4, 16]
%9 = arange{start=past, len=2*batch*seq - 1} : i64[2*batch*seq - 1]
%10 = const{values=[inf, -inf, NaN, -0.0, 1e-45, NaN(0xffc00000)]} : f32[6]
%11 = const{values=[1, -2]} : i32[2]
%12 = topk{k=2, axis=3}(%8) : (f32[batch, seq, 4, 2], i64[batch, seq, 4, 2])
%13 = cast{to=bf16}(%12) : bf16[batch, seq, 4, 2]
%14 = concat{axis=1}(%0, %7) : f32[batch, past + 2*seq, 4, 16]
%15 = matmul{transpose_a=false, transpose_b=true}(%3, %2) : f32[batch, seq, 1000]
%16 = fused(%3, %4) : (f32[batch, seq, 64], f32[batch, seq, 1], i64[batch, seq, 2])  @model.norm {
  %0 = expand{shape=[batch, seq, 64]}($1) : f32[batch, seq, 64]
  %1 = sub($0, %0) : f32[batch, seq, 64]
  %2 = topk{k=2, axis=2}(%1) : (f32[batch, seq, 2], i64[batch, seq, 2])
  %3 = reduce_max{axes=[2], keep_dims=true}(%1) : f32[batch, seq, 1]
  yield %1, %3, %2.1
}
output "y" = %15
output "idx" = %12.1
output "kv" = %14
output "f" = %16.1
"#;

#[test]
fn the_seed_parses_and_roundtrips() {
    let g = parse(SEED).unwrap();
    assert_eq!(print(&g), SEED);
}

/// Fragments for token soups: enough structure to get past the lexer.
const FRAGMENTS: &[&str] = &[
    "kiln.graph v1\n",
    "\n",
    "%0",
    "%1",
    "%2.1",
    "%x",
    " = ",
    "=",
    "input",
    "param",
    "const",
    "arange",
    "exp",
    "add",
    "matmul",
    "topk",
    "reshape",
    "concat",
    "attention",
    "slice",
    "fused",
    "yield",
    "$0",
    "$1",
    "  %0 = exp($0) : f32[2]\n",
    "{",
    "}",
    "(",
    ")",
    "[",
    "]",
    ",",
    ":",
    " : ",
    "name=",
    "\"x\"",
    "\"",
    "\\",
    "f32",
    "i64",
    "bool",
    "batch",
    "seq",
    "past",
    "+",
    "-",
    "*",
    "0",
    "1",
    "16",
    "4294967296",
    "99999999999999999999",
    "1.5",
    "1e-45",
    "NaN(0x1)",
    "inf",
    "window(",
    "causal",
    "none",
    "true",
    "false",
    "axis=",
    "k=",
    "perm=",
    "shape=",
    "values=",
    "mask=",
    "scale=",
    "transpose_a=",
    "transpose_b=",
    "to=",
    "start=",
    "len=",
    "end=",
    "axes=",
    "keep_dims=",
    "@s",
    "@\"q\"",
    "output ",
    "# c",
    " ",
    "\r\n",
    "é",
    "\u{0}",
];

/// Parses; if the text is accepted, it must round-trip.
fn check_parse(text: &str) {
    if let Ok(g) = parse(text) {
        let printed = print(&g);
        let back =
            parse(&printed).unwrap_or_else(|e| panic!("{e}\n--- accepted ---\n{text}\n--- printed ---\n{printed}"));
        assert_eq!(print(&back), printed);
    }
}

#[derive(Clone, Debug)]
enum Mutation {
    /// Replace the char at a position.
    Replace(usize, char),
    Insert(usize, &'static str),
    Delete(usize, usize),
    Truncate(usize),
    /// Duplicate a line after itself.
    DupLine(usize),
    SwapLines(usize, usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), any::<char>()).prop_map(|(i, c)| Mutation::Replace(i, c)),
        (any::<usize>(), prop::sample::select(FRAGMENTS)).prop_map(|(i, s)| Mutation::Insert(i, s)),
        (any::<usize>(), 1..8usize).prop_map(|(i, n)| Mutation::Delete(i, n)),
        any::<usize>().prop_map(Mutation::Truncate),
        any::<usize>().prop_map(Mutation::DupLine),
        (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Mutation::SwapLines(a, b)),
    ]
}

fn apply(text: &str, muts: &[Mutation]) -> String {
    let mut chars: Vec<char> = text.chars().collect();
    for m in muts {
        let n = chars.len().max(1);
        match *m {
            Mutation::Replace(i, c) => {
                if let Some(x) = chars.get_mut(i % n) {
                    *x = c;
                }
            }
            Mutation::Insert(i, s) => {
                let at = (i % (chars.len() + 1)).min(chars.len());
                chars.splice(at..at, s.chars());
            }
            Mutation::Delete(i, k) => {
                let at = (i % n).min(chars.len());
                let end = (at + k).min(chars.len());
                chars.drain(at..end);
            }
            Mutation::Truncate(i) => chars.truncate(i % n),
            Mutation::DupLine(i) | Mutation::SwapLines(i, _) => {
                let s: String = chars.iter().collect();
                let mut lines: Vec<&str> = s.split('\n').collect();
                let a = i % lines.len();
                match *m {
                    Mutation::SwapLines(_, j) => {
                        let b = j % lines.len();
                        lines.swap(a, b);
                    }
                    _ => lines.insert(a, lines[a]),
                }
                chars = lines.join("\n").chars().collect();
            }
        }
    }
    chars.into_iter().collect()
}

// ---- random traced graphs --------------------------------------------------------------

#[derive(Clone, Debug)]
struct Recipe {
    dims: Vec<u8>,
    dtype_bf16: bool,
    steps: Vec<(u8, u8, u8)>,
    outputs: Vec<u8>,
}

fn recipe() -> impl Strategy<Value = Recipe> {
    (
        prop::collection::vec(0u8..8, 1..=4),
        any::<bool>(),
        prop::collection::vec((0u8..14, any::<u8>(), any::<u8>()), 0..24),
        prop::collection::vec(any::<u8>(), 0..4),
    )
        .prop_map(|(dims, dtype_bf16, steps, outputs)| Recipe { dims, dtype_bf16, steps, outputs })
}

fn pick_dim(c: u8) -> Dim {
    match c {
        0 => Dim::sym("batch"),
        1 => Dim::sym("seq"),
        2 => Dim::sym("past") + Dim::sym("seq"),
        3 => Dim::fixed(2),
        4 => Dim::fixed(3),
        5 => Dim::fixed(4),
        6 => Dim::fixed(8),
        _ => Dim::sym("seq") * 2usize - Dim::fixed(1),
    }
}

/// Applies one step; errors (an op rejecting its inputs) are skipped by the caller.
fn step<'t>(
    tr: &'t Tracer,
    vals: &[Tensor<'t>],
    i: usize,
    (op, a, b): (u8, u8, u8),
) -> kiln_graph::Result<Vec<Tensor<'t>>> {
    let t = vals[a as usize % vals.len()];
    let u = vals[b as usize % vals.len()];
    let rank = t.rank();
    let axis = if rank == 0 { 0 } else { b as usize % rank };
    let one = |x: kiln_graph::Result<Tensor<'t>>| x.map(|x| vec![x]);
    match op {
        0 => one(t.unary([UnaryOp::Exp, UnaryOp::Neg, UnaryOp::Tanh, UnaryOp::Sqrt][b as usize % 4])),
        1 => one(t.add(u)),
        2 => one(t.mul_scalar(f64::from(b) * 0.5 - 3.0)),
        3 => {
            let op = [ReduceOp::Sum, ReduceOp::Max, ReduceOp::Mean][a as usize % 3];
            one(t.reduce(op, &[axis as isize], b % 2 == 0))
        }
        4 if rank >= 2 => {
            let d = t.shape();
            let mut dims: Vec<Dim> = d.dims()[..rank - 2].to_vec();
            dims.push(d.dim(rank - 2) * d.dim(rank - 1));
            one(t.reshape(dims))
        }
        4 => one(t.unsqueeze(0)),
        5 => {
            let mut perm: Vec<usize> = (0..rank).collect();
            perm.rotate_left(axis);
            if b % 2 == 1 {
                perm.reverse();
            }
            one(t.permute(&perm))
        }
        6 if rank >= 1 => {
            let n = [4usize, 8][b as usize % 2];
            let last = t.dim(-1)?;
            let w = tr.scope(&format!("lin{i}"), || tr.param("weight", t.dtype(), [Dim::fixed(n), last]))?;
            let bias = if a % 2 == 0 {
                Some(tr.scope(&format!("lin{i}"), || tr.param("bias", t.dtype(), [n]))?)
            } else {
                None
            };
            tr.scope(&format!("lin{i}"), || one(t.linear(w, bias)))
        }
        7 if rank >= 1 => {
            let d = t.shape().dim(axis).clone();
            match d.as_fixed() {
                Some(n) if n >= 2 => one(t.slice(axis as isize, n / 2, n)),
                _ => one(t.slice(axis as isize, 0, d)),
            }
        }
        8 if rank >= 1 => one(t.concat(&[t, u], axis as isize)),
        9 if rank >= 1 => one(t.softmax(-1)),
        10 => one(t.cast(if b % 2 == 0 { DType::BF16 } else { DType::F32 })),
        11 if rank >= 1 => {
            let (v, idx) = t.top_k(1, axis as isize)?;
            Ok(vec![v, idx])
        }
        12 if rank >= 2 => one(t.matmul_t(u, false, true)),
        13 => one(t.argmax(-1)),
        _ => Ok(vec![]),
    }
}

fn build(r: &Recipe) -> Graph {
    let tr = Tracer::new();
    let dims: Vec<Dim> = r.dims.iter().map(|&c| pick_dim(c)).collect();
    let dt = if r.dtype_bf16 { DType::BF16 } else { DType::F32 };
    let x = tr.input("x", dt, dims.clone()).unwrap();
    let y = tr.input("y", dt, dims).unwrap();
    let mut vals = vec![x, y];
    for (i, &s) in r.steps.iter().enumerate() {
        if let Ok(out) = step(&tr, &vals, i, s) {
            vals.extend(out);
        }
    }
    let last = *vals.last().unwrap();
    tr.output("out", last).unwrap();
    for (i, &o) in r.outputs.iter().enumerate() {
        tr.output(&format!("o{i}"), vals[o as usize % vals.len()]).unwrap();
    }
    tr.finish().expect("a traced graph verifies")
}

/// A non-source node of `g`, chosen by `k`.
fn non_source(g: &Graph, k: usize) -> Option<kiln_graph::NodeId> {
    let nodes: Vec<_> = g.topo_order().into_iter().filter(|&n| !g.node(n).op.is_source()).collect();
    (!nodes.is_empty()).then(|| nodes[k % nodes.len()])
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn parser_never_panics_on_arbitrary_strings(s in any::<String>()) {
        check_parse(&s);
        check_parse(&format!("kiln.graph v1\n{s}"));
    }

    #[test]
    fn parser_never_panics_on_token_soup(parts in prop::collection::vec(prop::sample::select(FRAGMENTS), 0..60)) {
        check_parse(&format!("kiln.graph v1\n{}", parts.concat()));
    }

    #[test]
    fn parser_never_panics_on_mutated_text(muts in prop::collection::vec(mutation(), 1..6)) {
        check_parse(&apply(SEED, &muts));
    }

    #[test]
    fn parser_never_panics_on_bytes(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        check_parse(&String::from_utf8_lossy(&bytes));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_graphs_verify_and_roundtrip(r in recipe()) {
        let g = build(&r);
        prop_assert!(g.verify().is_ok());
        let text = print(&g);
        let back = parse(&text).map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
        prop_assert_eq!(print(&back), text.clone());
        prop_assert_eq!(back.node_count(), g.node_count());
        prop_assert!(back.inputs().keys().eq(g.inputs().keys()));
        prop_assert!(back.params().keys().eq(g.params().keys()));
        prop_assert!(back.outputs().keys().eq(g.outputs().keys()));
        for (name, &v) in g.outputs() {
            prop_assert_eq!(back.value_type(back.outputs()[name]), g.value_type(v));
        }
        for (name, &n) in g.params() {
            prop_assert_eq!(&back.node(back.params()[name]).scope, &g.node(n).scope);
        }
    }

    #[test]
    fn mutated_graphs_still_roundtrip(r in recipe(), muts in prop::collection::vec(mutation(), 1..4)) {
        check_parse(&apply(&print(&build(&r)), &muts));
    }

    #[test]
    fn verifier_rejects_retyped_uses(r in recipe(), k in any::<usize>()) {
        let mut g = build(&r);
        let Some(n) = non_source(&g, k) else { return Ok(()) };
        let v = Value::from(n);
        let ty = g.value_type(v).clone();
        // A consumer whose recorded type depends on the operand's shape.
        let c = g.add(Op::Cast(DType::F32), &[v], "").unwrap();
        g.set_output("probe", c.into()).unwrap();
        let mut dims = ty.shape.dims().to_vec();
        dims.push(Dim::fixed(7));
        let z = g.add_input("z", TensorType::new(ty.dtype, dims)).unwrap();
        g.replace_all_uses(v, z.into());
        prop_assert!(g.verify().is_err());
        prop_assert!(parse(&print(&g)).is_err());
    }

    #[test]
    fn verifier_rejects_cycles(r in recipe(), k in any::<usize>()) {
        let mut g = build(&r);
        let Some(n) = non_source(&g, k) else { return Ok(()) };
        let operand = g.operands(n)[0];
        g.replace_all_uses(operand, n.into());
        let err = g.verify().unwrap_err();
        prop_assert_eq!(err.to_string(), "graph verification failed: the graph has a cycle");
        prop_assert!(parse(&print(&g)).is_err());
    }

    #[test]
    fn parser_rejects_a_wrong_annotation_on_its_line(r in recipe(), k in any::<usize>(), dtype in any::<bool>()) {
        let g = build(&r);
        let text = print(&g);
        let mut lines: Vec<String> = text.lines().map(String::from).collect();
        let targets: Vec<usize> = lines
            .iter()
            .enumerate()
            .filter(|(_, l)| l.starts_with('%') && l.contains(") : "))
            .map(|(i, _)| i)
            .collect();
        if targets.is_empty() {
            return Ok(());
        }
        let i = targets[k % targets.len()];
        let line = &mut lines[i];
        let ann = line.find(") : ").unwrap() + 4;
        if dtype {
            // Swap the first dtype for another one.
            let end = ann + line[ann..].find('[').unwrap();
            let start = if line[ann..].starts_with('(') { ann + 1 } else { ann };
            let new = if &line[start..end] == "i64" { "i32" } else { "i64" };
            line.replace_range(start..end, new);
        } else {
            // Add a dim to the first type.
            let open = ann + line[ann..].find('[').unwrap() + 1;
            line.insert_str(open, "7, ");
        }
        let corrupted = lines.join("\n") + "\n";
        match parse(&corrupted) {
            Err(Error::Parse { line, .. }) => prop_assert_eq!(line, i + 1, "{}", corrupted),
            other => prop_assert!(false, "expected a parse error on line {}, got {:?}\n{}", i + 1, other.err(), corrupted),
        }
    }
}

/// Guards against a degenerate generator: across many recipes, every op family the
/// graph properties rely on shows up.
#[test]
fn random_graphs_cover_the_op_families() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let mut seen = std::collections::BTreeSet::new();
    let mut nodes = 0;
    for _ in 0..200 {
        let g = build(&recipe().new_tree(&mut runner).unwrap().current());
        nodes += g.node_count();
        seen.extend(g.petgraph().node_weights().map(|n| n.op.name()));
    }
    for op in [
        "matmul",
        "reshape",
        "permute",
        "reduce_sum",
        "reduce_mean",
        "concat",
        "topk",
        "slice",
        "cast",
        "expand",
        "const",
        "param",
        "argmax",
        "add",
        "exp",
    ] {
        assert!(seen.contains(op), "no `{op}` in 200 random graphs: {seen:?}");
    }
    assert!(nodes / 200 >= 10, "random graphs are too small: {} nodes on average", nodes / 200);
}
