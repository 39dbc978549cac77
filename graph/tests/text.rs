//! The IR text format: round trips of hand-written texts and traced graphs, exact
//! error messages with line:col, and the corner cases of the attribute syntax.

use kiln_graph::ops::{ConstValues, DType, Dim, Mask, Op, Shape, TensorType, UnaryOp};
use kiln_graph::text::{parse, print};
use kiln_graph::{Error, Graph, Module, Result, Tensor, TensorExt, Tracer, Value};

/// Parses `text`, checks that it prints back byte for byte, and returns the graph.
fn roundtrip_exact(text: &str) -> Graph {
    let g = parse(text).unwrap_or_else(|e| panic!("parse failed: {e}\n{text}"));
    assert_eq!(print(&g), text);
    g
}

/// `print(parse(print(g))) == print(g)`, and the name maps come back in order.
fn roundtrip_graph(g: &Graph) -> String {
    let text = print(g);
    let back = parse(&text).unwrap_or_else(|e| panic!("parse failed: {e}\n{text}"));
    assert_eq!(print(&back), text);
    assert!(back.inputs().keys().eq(g.inputs().keys()));
    assert!(back.params().keys().eq(g.params().keys()));
    assert!(back.outputs().keys().eq(g.outputs().keys()));
    assert_eq!(back.node_count(), g.node_count());
    text
}

fn parse_err(text: &str) -> String {
    match parse(text) {
        Ok(g) => panic!("expected an error, parsed:\n{}", print(&g)),
        Err(e @ Error::Parse { .. }) => e.to_string(),
        Err(e) => panic!("expected a parse error, got {e:?}"),
    }
}

const EXAMPLE: &str = r#"kiln.graph v1
%0 = input{name="x"} : f32[batch, seq, 64]
%1 = param{name="model.layers.0.mlp.up_proj.weight"} : f32[256, 64]  @model.layers.0.mlp.up_proj
%2 = matmul{transpose_a=false, transpose_b=true}(%0, %1) : f32[batch, seq, 256]  @model.layers.0.mlp.up_proj
%3 = topk{k=4, axis=2}(%2) : (f32[batch, seq, 4], i64[batch, seq, 4])
%4 = const{values=[1.0, 0.5]} : bf16[2]
output "logits" = %2
output "idx" = %3.1
"#;

#[test]
fn example_roundtrips_exactly() {
    let g = roundtrip_exact(EXAMPLE);
    assert_eq!(g.node_count(), 5);
    assert_eq!(g.inputs().keys().collect::<Vec<_>>(), ["x"]);
    assert_eq!(g.params().keys().collect::<Vec<_>>(), ["model.layers.0.mlp.up_proj.weight"]);
    let idx = g.outputs()["idx"];
    assert_eq!(idx.output, 1);
    assert_eq!(g.value_type(idx).to_string(), "i64[batch, seq, 4]");
    let p = g.params()["model.layers.0.mlp.up_proj.weight"];
    assert_eq!(g.node(p).scope, "model.layers.0.mlp.up_proj");
}

#[test]
fn every_attribute_kind_roundtrips() {
    let text = r#"kiln.graph v1
%0 = input{name="x"} : f32[batch, past + seq, 4, 16]
%1 = input{name="ids"} : i64[batch, seq]
%2 = param{name="emb"} : bf16[32000, 64]  @embed
%3 = gather{axis=0}(%2, %1) : bf16[batch, seq, 64]  @embed
%4 = cast{to=f32}(%3) : f32[batch, seq, 64]
%5 = reduce_mean{axes=[2], keep_dims=true}(%4) : f32[batch, seq, 1]
%6 = reduce_sum{axes=[0, 2], keep_dims=false}(%4) : f32[seq]
%7 = reshape{shape=[batch, seq, 4, 16]}(%4) : f32[batch, seq, 4, 16]
%8 = reshape{shape=[64*batch*seq]}(%4) : f32[64*batch*seq]
%9 = permute{perm=[0, 2, 1, 3]}(%7) : f32[batch, 4, seq, 16]
%10 = slice{axis=1, start=past, end=past + seq}(%0) : f32[batch, seq, 4, 16]
%11 = slice{axis=3, start=0, end=8}(%0) : f32[batch, past + seq, 4, 8]
%12 = attention{mask=causal, scale=0.25}(%7, %0, %0) : f32[batch, seq, 4, 16]
%13 = attention{mask=none, scale=1.0}(%7, %0, %0) : f32[batch, seq, 4, 16]
%14 = attention{mask=window(4096), scale=0.125}(%7, %0, %0) : f32[batch, seq, 4, 16]
%15 = arange{start=past, len=seq} : i64[seq]
%16 = arange{start=0, len=2*batch*seq - 1} : i64[2*batch*seq - 1]
%17 = const{values=[1, -2, 3]} : i32[3]
%18 = const{values=[inf, -inf, NaN, -0.0, 1e-45, 3.4028235e38, NaN(0xffc00000)]} : f32[7]
%19 = const{values=[]} : f32[0]
%20 = const{values=[1.0]} : f32[]
%21 = reshape{shape=[]}(%20) : f32[]
%22 = expand{shape=[batch, seq, 64]}(%20) : f32[batch, seq, 64]
%23 = add(%4, %22) : f32[batch, seq, 64]
%24 = lt(%4, %22) : bool[batch, seq, 64]
%25 = select(%24, %4, %22) : f32[batch, seq, 64]
%26 = argmax{axis=2}(%25) : i64[batch, seq]
%27 = concat{axis=1}(%0, %10, %0) : f32[batch, 2*past + 3*seq, 4, 16]
%28 = exp(%23) : f32[batch, seq, 64]
output "y" = %28
output "am" = %26
"#;
    let g = roundtrip_exact(text);
    // f32 bit patterns survive.
    let consts: Vec<&ConstValues> = g
        .petgraph()
        .node_weights()
        .filter_map(|n| match &n.op {
            Op::Constant { values, .. } => Some(values),
            _ => None,
        })
        .collect();
    let ConstValues::Float(v) = consts[1] else { panic!("float constant expected") };
    let bits: Vec<u32> = v.iter().map(|x| x.0).collect();
    assert_eq!(
        bits,
        [
            f32::INFINITY.to_bits(),
            f32::NEG_INFINITY.to_bits(),
            f32::NAN.to_bits(),
            (-0.0f32).to_bits(),
            1,
            f32::MAX.to_bits(),
            0xffc0_0000
        ]
    );
    assert_eq!(consts[0], &ConstValues::Int(vec![1, -2, 3]));
    let masks: Vec<Mask> = g
        .petgraph()
        .node_weights()
        .filter_map(|n| match &n.op {
            Op::Attention(a) => Some(a.mask),
            _ => None,
        })
        .collect();
    assert_eq!(masks, [Mask::Causal, Mask::None, Mask::SlidingWindow(4096)]);
}

#[test]
fn hand_written_text_is_normalised() {
    // Comments, blank lines, spacing, free value names, parenthesised single types,
    // integer spellings of f32 attributes and trailing commas are accepted; the printer
    // renumbers densely.
    let text = r#"
# a comment before the header
kiln.graph v1

%x = input { name = "x" , } : f32[ seq , 2 * 4 ]   # trailing comment
%w=param{name="w"}:(f32[16,8])@"my scope"
%y = matmul{transpose_b=true,transpose_a=false,}(%x,%w,) : f32[seq, 16]
%z = attention{scale=1, mask=causal}(%q, %q, %q) : f32[1, seq, 2, 4]
"#;
    // `%q` is not defined.
    assert_eq!(parse_err(text), "8:38: undefined value `%q`");
    let text = text.replace("%z = attention{scale=1, mask=causal}(%q, %q, %q) : f32[1, seq, 2, 4]\n", "")
        + "output \"y\" = %y\n";
    let g = parse(&text).unwrap();
    assert_eq!(
        print(&g),
        r#"kiln.graph v1
%0 = input{name="x"} : f32[seq, 8]
%1 = param{name="w"} : f32[16, 8]  @"my scope"
%2 = matmul{transpose_a=false, transpose_b=true}(%0, %1) : f32[seq, 16]
output "y" = %2
"#
    );
    roundtrip_graph(&g);

    let g = parse("kiln.graph v1\n%q = input{name=\"q\"} : f32[1, seq, 2, 4]\n%a = attention{scale=1, mask=causal}(%q, %q, %q) : f32[1, seq, 2, 4]\n").unwrap();
    assert!(print(&g).contains("%1 = attention{mask=causal, scale=1.0}(%0, %0, %0) : f32[1, seq, 2, 4]"));
}

#[test]
fn strings_and_scopes_with_odd_characters_roundtrip() {
    let mut g = Graph::new();
    let names =
        ["plain", "with \"quotes\" and \\", "new\nline\ttab\r", "ünïcode ✓", "nul\0bell\u{7}", "# not a comment"];
    let mut last = None;
    for (i, name) in names.iter().enumerate() {
        let x = g.add_input(name, TensorType::new(DType::F32, [4usize])).unwrap();
        let p = g.add_param(&format!("p{i}"), TensorType::new(DType::F32, [4usize]), name).unwrap();
        let s = g.add(Op::Binary(kiln_graph::ops::BinaryOp::Add), &[x.into(), p.into()], name).unwrap();
        g.set_output(name, s.into()).unwrap();
        last = Some(s);
    }
    assert!(last.is_some());
    let text = roundtrip_graph(&g);
    assert!(text.contains(r#"%3 = input{name="with \"quotes\" and \\"} : f32[4]"#), "{text}");
    assert!(text.contains(r#"output "new\nline\ttab\r" = "#), "{text}");
    assert!(text.contains(r#"@"nul\u{0}bell\u{7}""#), "{text}");
    assert!(text.contains(r##"@"# not a comment""##), "{text}");
    let back = parse(&text).unwrap();
    assert!(back.inputs().keys().map(String::as_str).eq(names));
    let scopes: Vec<String> = back.params().values().map(|&n| back.node(n).scope.clone()).collect();
    assert_eq!(scopes, names);
}

struct Linear {
    inp: usize,
    out: usize,
    bias: bool,
}

impl Module for Linear {
    fn forward<'t>(&self, x: Tensor<'t>) -> Result<Tensor<'t>> {
        let tr = x.tracer();
        let w = tr.param("weight", DType::BF16, [self.out, self.inp])?;
        let b = if self.bias { Some(tr.param("bias", DType::BF16, [self.out])?) } else { None };
        x.linear(w, b)
    }
}

#[test]
fn traced_graphs_roundtrip() {
    // A small decoder step: embedding, norm, projection, top-k sampling inputs.
    let tr = Tracer::new();
    let ids = tr.input("ids", DType::I64, [Dim::sym("batch"), Dim::sym("seq")]).unwrap();
    let emb = tr.scope("embed", || tr.param("weight", DType::BF16, [1000usize, 32])).unwrap();
    let h = emb.gather(ids, 0).unwrap();
    let h = tr
        .scope("norm", || {
            let w = tr.param("weight", DType::BF16, [32usize])?;
            h.rms_norm(w, 1e-6)
        })
        .unwrap();
    let h = tr.scope("proj", || Linear { inp: 32, out: 64, bias: true }.forward(h)).unwrap();
    let h = h.gelu_tanh().unwrap().cast(DType::F32).unwrap();
    let probs = h.softmax(-1).unwrap();
    let (vals, idx) = probs.top_k(5, -1).unwrap();
    let last = h.slice(1, Dim::sym("seq") - 1, Dim::sym("seq")).unwrap();
    tr.output("vals", vals).unwrap();
    tr.output("idx", idx).unwrap();
    tr.output("last", last).unwrap();
    tr.output("argmax", h.argmax(-1).unwrap()).unwrap();
    let g = tr.finish().unwrap();
    let text = roundtrip_graph(&g);
    assert!(text.contains("output \"idx\" = %"), "{text}");
    assert!(text.contains(".1\n"), "{text}");
    assert!(text.contains("slice{axis=1, start=seq - 1, end=seq}"), "{text}");
    assert!(text.contains("const{values=[1e-6]} : f32[]"), "{text}");
}

#[test]
fn print_is_deterministic() {
    let build = || {
        let tr = Tracer::new();
        let x = tr.input("x", DType::BF16, [Dim::sym("n"), Dim::fixed(8)]).unwrap();
        let y = tr.scope("a", || Linear { inp: 8, out: 8, bias: true }.forward(x)).unwrap();
        let z = tr.scope("b", || Linear { inp: 8, out: 8, bias: false }.forward(y.silu()?)).unwrap();
        tr.output("z", z).unwrap();
        tr.finish().unwrap()
    };
    let a = print(&build());
    for _ in 0..5 {
        assert_eq!(print(&build()), a);
    }
}

#[test]
fn inputs_are_hoisted_when_topological_order_disagrees_with_their_map() {
    let mut g = Graph::new();
    let t = TensorType::new(DType::F32, [3usize]);
    let a = g.add_input("a", t.clone()).unwrap();
    let e = g.add(Op::Unary(UnaryOp::Exp), &[a.into()], "").unwrap();
    let b = g.add_input("b", t.clone()).unwrap();
    g.remove_node(e).unwrap();
    // The free slot is reused: `c` comes before `b` in the topological order.
    let c = g.add_input("c", t.clone()).unwrap();
    assert!(c < b, "petgraph reuses the freed index");
    let p = g.add_param("p", t.clone(), "s").unwrap();
    let s = g.add(Op::Binary(kiln_graph::ops::BinaryOp::Add), &[c.into(), b.into()], "").unwrap();
    g.set_output("s", s.into()).unwrap();
    g.set_output("p", p.into()).unwrap();
    let text = roundtrip_graph(&g);
    assert_eq!(
        text,
        r#"kiln.graph v1
%0 = input{name="a"} : f32[3]
%1 = input{name="b"} : f32[3]
%2 = input{name="c"} : f32[3]
%3 = param{name="p"} : f32[3]  @s
%4 = add(%2, %1) : f32[3]
output "s" = %4
output "p" = %3
"#
    );
}

#[test]
fn corrupted_graphs_print_without_panicking_and_do_not_parse() {
    // A cycle made with replace_all_uses: x -> a=exp(x) -> b=neg(a); uses of x become b.
    let mut g = Graph::new();
    let x = g.add_input("x", TensorType::new(DType::F32, [3usize])).unwrap();
    let a = g.add(Op::Unary(UnaryOp::Exp), &[x.into()], "").unwrap();
    let b = g.add(Op::Unary(UnaryOp::Neg), &[a.into()], "").unwrap();
    g.set_output("b", b.into()).unwrap();
    g.replace_all_uses(Value::from(x), Value::from(b));
    assert_eq!(g.verify().unwrap_err().to_string(), "graph verification failed: the graph has a cycle");
    let text = print(&g);
    assert_eq!(
        text,
        "kiln.graph v1\n%0 = input{name=\"x\"} : f32[3]\n%1 = exp(%2) : f32[3]\n%2 = neg(%1) : f32[3]\noutput \"b\" = %2\n"
    );
    assert_eq!(parse_err(&text), "3:10: undefined value `%2`");

    // A type mismatch made with replace_all_uses: the rule of `exp` no longer agrees.
    let mut g = Graph::new();
    let x = g.add_input("x", TensorType::new(DType::F32, [3usize])).unwrap();
    let y = g.add_input("y", TensorType::new(DType::F32, [4usize])).unwrap();
    let a = g.add(Op::Unary(UnaryOp::Exp), &[x.into()], "").unwrap();
    g.set_output("a", a.into()).unwrap();
    g.replace_all_uses(Value::from(x), Value::from(y));
    let err = g.verify().unwrap_err().to_string();
    assert!(err.contains("records output types [f32[3]] but its rule gives [f32[4]]"), "{err}");
    assert_eq!(
        parse_err(&print(&g)),
        "4:16: type annotation f32[3] disagrees with the rule of `exp`, which gives f32[4]"
    );
}

#[test]
fn error_messages_point_at_line_and_column() {
    let h = "kiln.graph v1\n%0 = input{name=\"x\"} : f32[seq, 8]\n";
    let cases: &[(&str, &str)] = &[
        ("%1 = frobnicate(%0) : f32[seq, 8]", "3:6: unknown op `frobnicate`"),
        ("%1 = input{name=\"y\"} : f33[seq, 8]", "3:24: unknown dtype `f33`"),
        ("%1 = cast{to=f33}(%0) : f32[seq, 8]", "3:6: attribute `to` of `cast` has the wrong kind: Dim(f33)"),
        (
            "%1 = param{name=\"w\"} : f32[4, 4]\n%2 = matmul{transpose_a=false, transpose_b=false}(%0, %1) : f32[seq, 4]",
            "4:6: matmul: contraction dims differ: 8 vs 4 (inputs: f32[seq, 8], f32[4, 4])",
        ),
        ("%1 = exp(%0) : f32[seq, 9]", "3:16: type annotation f32[seq, 9] disagrees with the rule of `exp`, which gives f32[seq, 8]"),
        ("%1 = topk{k=2, axis=1}(%0) : f32[seq, 2]", "3:30: type annotation f32[seq, 2] disagrees with the rule of `topk`, which gives (f32[seq, 2], i64[seq, 2])"),
        ("%1 = exp(%7) : f32[seq, 8]", "3:10: undefined value `%7`"),
        ("%1 = exp(%0.1) : f32[seq, 8]", "3:10: `%0` has 1 output(s), there is no output 1"),
        ("%1 = input{name=\"x\"} : f32[seq, 8]", "3:17: duplicate input name `x`"),
        ("%1 = param{name=\"w\"} : f32[2]\n%2 = param{name=\"w\"} : f32[3]", "4:17: duplicate param name `w`"),
        ("output \"o\" = %0\noutput \"o\" = %0", "4:8: duplicate output name `o`"),
        ("%0 = exp(%0) : f32[seq, 8]", "3:1: value `%0` is defined twice"),
        ("%1 = matmul{transpose_a=false}(%0, %0) : f32[seq, seq]", "3:6: `matmul` needs attribute `transpose_b`"),
        ("%1 = exp{fast=true}(%0) : f32[seq, 8]", "3:6: `exp` has no attribute `fast`"),
        ("%1 = argmax{axis=1, axis=1}(%0) : i64[seq]", "3:21: attribute `axis` is given twice"),
        ("%1 = argmax{axis=-1}(%0) : i64[seq]", "3:6: attribute `axis` must be >= 0, got -1"),
        ("%1 = exp(%0) : f32[seq, 8] garbage", "3:28: unexpected `garbage` at the end of the statement"),
        ("%1 = exp(%0) : f32[seq, 8]  @scope extra", "3:36: unexpected `extra` at the end of the statement"),
        ("%1 = exp(%0) : f32[seq, 8", "3:26: expected `]`, found the end of the line"),
        ("%1 = exp(%0) f32[seq, 8]", "3:14: expected `:`, found `f32`"),
        ("%1 = exp(%0) : f32[seq * , 8]", "3:26: expected a number or a symbol"),
        ("%1 = exp(%0) : f32[seq ^ 2, 8]", "3:24: unexpected character `^`"),
        ("%1 = input{name=\"y} : f32[1]", "3:17: unterminated string"),
        ("%1 = input{name=\"\\q\"} : f32[1]", "3:18: unknown escape in string"),
        ("%1 = input{name=\"y\"} : f32[99999999999]", "3:28: dimension is too large (the limit is 4294967296)"),
        ("%1 = input{name=\"y\"} : f32[4294967296, 4294967296, 4]", "3:27: shape is too large (the limit is 4611686018427387904 elements)"),
        ("%1 = input{name=\"y\"} : f32[123456789012345678901234567890]", "3:28: integer `123456789012345678901234567890` is too large"),
        ("%1 = reshape{shape=[99999999999]}(%0) : f32[seq, 8]", "3:21: dimension is too large (the limit is 4294967296)"),
        ("%1 = input{name=\"y\"} @s : f32[1]", "3:22: expected `:`, found a scope"),
        ("%1 = input{name=\"y\"} : f32[1]  @s", "3:32: inputs have no scope"),
        ("%1 = exp(%0) : f32[seq, 8]\n%2 = attention{mask=window(-1), scale=1.0}(%1, %1, %1) : f32[seq, 8]", "4:27: expected `+`, `-` or `*`, found `(`"),
        ("output %0", "3:8: expected the output name as a quoted string"),
        ("exp(%0)", "3:1: expected `%name = op…` or `output \"name\" = %value`"),
    ];
    for (body, want) in cases {
        assert_eq!(&parse_err(&format!("{h}{body}\n")), want, "for {body:?}");
    }
    assert_eq!(parse_err(""), "1:1: expected the header `kiln.graph v1`");
    assert_eq!(parse_err("  kiln.graph v2\n"), "1:3: unsupported version `v2` (expected `kiln.graph v1`)");
    assert_eq!(parse_err("\n%0 = input{name=\"x\"} : f32[1]\n"), "2:1: expected the header `kiln.graph v1`");
}

#[test]
fn duplicate_lines_are_hash_consed() {
    let g = parse(
        "kiln.graph v1\n%0 = input{name=\"x\"} : f32[2]\n%1 = exp(%0) : f32[2]\n%2 = exp(%0) : f32[2]\n%3 = add(%1, %2) : f32[2]\noutput \"y\" = %3\n",
    )
    .unwrap();
    assert_eq!(g.node_count(), 3);
    assert_eq!(
        print(&g),
        "kiln.graph v1\n%0 = input{name=\"x\"} : f32[2]\n%1 = exp(%0) : f32[2]\n%2 = add(%1, %1) : f32[2]\noutput \"y\" = %2\n"
    );
}

#[test]
fn dims_parse_as_polynomials() {
    let g = parse(
        "kiln.graph v1\n%0 = input{name=\"x\"} : f32[seq*batch*2 - 1 + past - past, 3*4, -seq + 2*seq, batch*batch]\n",
    )
    .unwrap();
    let t = g.value_type(g.inputs()["x"].into());
    let (b, s) = (Dim::sym("batch"), Dim::sym("seq"));
    assert_eq!(t.shape, Shape::new([&(&(&b * &s) * &Dim::fixed(2)) - &Dim::fixed(1), Dim::fixed(12), s, &b * &b]));
    assert_eq!(print(&g), "kiln.graph v1\n%0 = input{name=\"x\"} : f32[2*batch*seq - 1, 12, seq, batch*batch]\n");
}

#[test]
fn adversarial_inputs_error_without_panicking() {
    let h = "kiln.graph v1\n%0 = input{name=\"x\"} : f32[seq, 8]\n";
    let many_terms: Vec<String> = (0..13).map(|i| format!("a{i} + b{i}")).collect();
    let long_product = vec!["s"; 20_000].join("*");
    let cases = [
        // 2^13 symbolic terms in numel.
        format!("%1 = input{{name=\"y\"}} : f32[{}]", many_terms.join(", ")),
        // numel of 2^64 through a reshape target.
        "%1 = reshape{shape=[4294967296, 4294967296]}(%0) : f32[seq, 8]".into(),
        // k far beyond any axis, on a symbolic axis.
        "%1 = topk{k=9223372036854775807, axis=0}(%0) : (f32[1, 8], i64[1, 8])".into(),
        "%1 = topk{k=9223372036854775808, axis=0}(%0) : (f32[1, 8], i64[1, 8])".into(),
        // A slice longer than any dim.
        "%1 = slice{axis=0, start=-4294967296, end=4294967296}(%0) : f32[seq, 8]".into(),
        // A constant of 2^62 elements must not allocate them.
        "%1 = const{values=[1.0]} : f32[4294967296, 1073741824]".into(),
        "%1 = attention{mask=window(4294967296), scale=1.0}(%0, %0, %0) : f32[seq, 8]".into(),
        "%1 = permute{perm=[9223372036854775807, 0]}(%0) : f32[seq, 8]".into(),
        "%1 = reduce_sum{axes=[-9223372036854775808], keep_dims=true}(%0) : f32[seq, 8]".into(),
        format!("%1 = exp(%0) : f32[{}]", "[".repeat(10_000)),
        format!("%1 = exp{{a={}}}(%0) : f32[seq, 8]", "[".repeat(10_000)),
        format!("%1 = input{{name=\"y\"}} : f32[{long_product}, {long_product}]\n%2 = reshape{{shape=[{long_product}*{long_product}]}}(%1) : f32[8]"),
        format!("%1 = concat{{axis=0}}({}) : f32[seq, 8]", vec!["%0"; 5000].join(", ")),
        "%1 = exp(%0.99999999999999999999999) : f32[seq, 8]".into(),
        "%1 = exp(%0.255) : f32[seq, 8]".into(),
        "%1 = input{name=\"\\u{d800}\"} : f32[1]".into(),
        "%1 = input{name=\"\\u{110000}\"} : f32[1]".into(),
        "%1 = const{values=[NaN(0x100000000)]} : f32[1]".into(),
        format!("%1 = exp{{{}}}(%0) : f32[seq, 8]", (0..20_000).map(|i| format!("a{i}=1")).collect::<Vec<_>>().join(", ")),
    ];
    for body in &cases {
        let text = format!("{h}{body}\n");
        let r = parse(&text);
        assert!(matches!(r, Err(Error::Parse { .. })), "{}: {:?}", &body[..body.len().min(80)], r.map(|g| print(&g)));
    }
}

// ---- fused nodes ---------------------------------------------------------------------

const FUSED: &str = r#"kiln.graph v1
%0 = input{name="x"} : f32[seq, 8]
%1 = input{name="w"} : f32[8]
%2 = fused(%0, %1) : (f32[seq, 8], f32[seq, 1])  @model.norm {
  %0 = expand{shape=[seq, 8]}($1) : f32[seq, 8]
  %1 = mul($0, %0) : f32[seq, 8]
  %2 = reduce_sum{axes=[1], keep_dims=true}(%1) : f32[seq, 1]
  yield %1, %2
}
%3 = exp(%2.1) : f32[seq, 1]
%4 = fused(%0) : (i64[seq, 2], f32[seq, 8], f32[seq, 2]) {
  %0 = topk{k=2, axis=1}($0) : (f32[seq, 2], i64[seq, 2])
  yield %0.1, $0, %0
}
output "y" = %2
output "s" = %3
output "idx" = %4
"#;

#[test]
fn fused_nodes_roundtrip_exactly() {
    use kiln_graph::ops::{FusedKind, FusedRef, Shape};
    let g = roundtrip_exact(FUSED);
    let fused: Vec<_> = g
        .topo_order()
        .into_iter()
        .filter_map(|n| match &g.node(n).op {
            Op::Fused(b) => Some((n, b.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(fused.len(), 2);
    let (n, b) = &fused[0];
    assert_eq!(g.node(*n).scope, "model.norm");
    assert_eq!(b.inputs.iter().map(|t| t.to_string()).collect::<Vec<_>>(), ["f32[seq, 8]", "f32[8]"]);
    let ops: Vec<&str> = b.nodes.iter().map(|n| n.op.name()).collect();
    assert_eq!(ops, ["expand", "mul", "reduce_sum"]);
    assert_eq!(b.nodes[1].operands.as_slice(), [FusedRef::Input(0), FusedRef::Node { node: 0, output: 0 }]);
    assert_eq!(b.outputs, [FusedRef::Node { node: 1, output: 0 }, FusedRef::Node { node: 2, output: 0 }]);
    assert_eq!(
        b.kind(),
        Ok(FusedKind::Rows { rows: Shape::new([Dim::sym("seq")]), cols: Shape::new([Dim::fixed(8)]) })
    );
    // Multi-output body nodes (`%0.1`) and an input passed straight through (`$0`).
    let (n, b) = &fused[1];
    assert_eq!(g.node(*n).scope, "");
    assert_eq!(
        b.outputs,
        [FusedRef::Node { node: 0, output: 1 }, FusedRef::Input(0), FusedRef::Node { node: 0, output: 0 }]
    );
    assert_eq!(g.value_type(g.outputs()["idx"]).to_string(), "i64[seq, 2]");
}

#[test]
fn hand_written_fused_bodies_are_normalised() {
    // Free body names, comments and blank lines inside the body, a quoted scope.
    let text = r#"kiln.graph v1
%x = input{name="x"} : f32[4]
%f = fused(%x, %x) : f32[4]  @"a b" {   # the body follows

    %a = exp($1)   : f32[4]  # comment
    %b = add(%a, $0) : f32[4]
  yield %b
}
output "y" = %f
"#;
    let g = parse(text).unwrap();
    assert_eq!(
        print(&g),
        r#"kiln.graph v1
%0 = input{name="x"} : f32[4]
%1 = fused(%0, %0) : f32[4]  @"a b" {
  %0 = exp($1) : f32[4]
  %1 = add(%0, $0) : f32[4]
  yield %1
}
output "y" = %1
"#
    );
    roundtrip_graph(&g);
    // An identical fused node is hash-consed like any other line.
    let twice = text.replace("output \"y\" = %f\n", "")
        + &text.lines().skip(2).collect::<Vec<_>>().join("\n").replace("%f", "%g");
    let g2 = parse(&twice).unwrap();
    assert_eq!(g2.node_count(), 2);
}

#[test]
fn built_fused_graphs_roundtrip() {
    use kiln_graph::ops::{BinaryOp, FusedBody, FusedNode, FusedRef};
    let mut g = Graph::new();
    let t = TensorType::new(DType::BF16, [Dim::sym("batch"), Dim::fixed(6)]);
    let x = g.add_input("x", t.clone()).unwrap();
    let y = g.add_input("y", t.clone()).unwrap();
    let body = FusedBody {
        inputs: vec![t.clone(), t.clone()],
        nodes: vec![
            FusedNode {
                op: Op::Binary(BinaryOp::Add),
                operands: [FusedRef::Input(0), FusedRef::Input(1)].into_iter().collect(),
                outputs: [t.clone()].into_iter().collect(),
            },
            FusedNode {
                op: Op::Cast(DType::F32),
                operands: [FusedRef::Node { node: 0, output: 0 }].into_iter().collect(),
                outputs: [TensorType::new(DType::F32, t.shape.clone())].into_iter().collect(),
            },
        ],
        outputs: vec![FusedRef::Node { node: 0, output: 0 }, FusedRef::Node { node: 1, output: 0 }],
    };
    let f = g.add(Op::Fused(Box::new(body)), &[x.into(), y.into()], "model.layers.0").unwrap();
    let e = g.add(Op::Unary(UnaryOp::Exp), &[Value::new(f, 1)], "model.layers.0").unwrap();
    g.set_output("h", f.into()).unwrap();
    g.set_output("e", e.into()).unwrap();
    let text = roundtrip_graph(&g);
    assert_eq!(
        text,
        r#"kiln.graph v1
%0 = input{name="x"} : bf16[batch, 6]
%1 = input{name="y"} : bf16[batch, 6]
%2 = fused(%0, %1) : (bf16[batch, 6], f32[batch, 6])  @model.layers.0 {
  %0 = add($0, $1) : bf16[batch, 6]
  %1 = cast{to=f32}(%0) : f32[batch, 6]
  yield %0, %1
}
%3 = exp(%2.1) : f32[batch, 6]  @model.layers.0
output "h" = %2
output "e" = %3
"#
    );
}

#[test]
fn fused_body_errors_point_at_line_and_column() {
    let h = "kiln.graph v1\n%0 = input{name=\"x\"} : f32[seq, 8]\n";
    let open = "%1 = fused(%0) : f32[seq, 8] {\n";
    let cases: &[(&str, &str)] = &[
        ("  %0 = exp($1) : f32[seq, 8]", "4:12: `$1`: the fused node has 1 input(s)"),
        (
            "  %0 = exp(%9) : f32[seq, 8]",
            "4:12: undefined value `%9` in the fused body (the group's inputs are `$0`, `$1`, …)",
        ),
        (
            "  %0 = exp(%0) : f32[seq, 8]",
            "4:12: undefined value `%0` in the fused body (the group's inputs are `$0`, `$1`, …)",
        ),
        (
            "  %0 = exp($0) : f32[seq, 9]",
            "4:18: type annotation f32[seq, 9] disagrees with the rule of `exp`, which gives f32[seq, 8]",
        ),
        ("  %0 = exp($0) : f32[seq, 8]  @s", "4:31: nodes of a fused body have no scope (the fused node has one)"),
        ("  %0 = input{name=\"y\"} : f32[1]", "4:8: `input` cannot be inside a fused body"),
        ("  %0 = fused($0) : f32[seq, 8] {", "4:8: fused groups do not nest"),
        ("  %0 = exp($0) : f32[seq, 8]\n  %0 = neg($0) : f32[seq, 8]", "5:3: value `%0` is defined twice"),
        (
            "  %0 = matmul{transpose_a=false, transpose_b=false}($0, $0) : f32[seq, 8]",
            "4:8: matmul: contraction dims differ: 8 vs seq (inputs: f32[seq, 8], f32[seq, 8])",
        ),
        ("  %0 = exp($) : f32[seq, 8]", "4:12: expected an input index after `$`"),
        ("  %0 = exp($0) : f32[seq, 8]\n}", "5:1: expected `yield` before `}`"),
        (
            "  %0 = exp($0) : f32[seq, 8]\n  yield %0\n  %1 = neg(%0) : f32[seq, 8]",
            "6:3: a fused body ends with `yield` and `}`; nothing may follow `yield`",
        ),
        ("  yield", "4:8: expected a body value such as `$0` or `%3`, found the end of the line"),
        ("  output \"y\" = %0", "4:3: expected `%name = op…`, `yield` or `}` in a fused body"),
        ("  %0 = exp($0) : f32[seq, 8]\n  yield %0\n} extra", "6:3: unexpected `extra` at the end of the statement"),
        // The fused node is checked when `}` closes it, with errors on its header line.
        (
            "  %0 = reduce_sum{axes=[1], keep_dims=false}($0) : f32[seq]\n  yield %0\n}",
            "3:18: type annotation f32[seq, 8] disagrees with the rule of `fused`, which gives f32[seq]",
        ),
        ("  %0 = exp($0) : f32[seq, 8]\n  yield %0", "3:30: the body of `%1` is not closed with `}`"),
    ];
    for (body, want) in cases {
        assert_eq!(&parse_err(&format!("{h}{open}{body}\n")), want, "for {body:?}");
    }
    let top: &[(&str, &str)] = &[
        ("%1 = fused(%0) : f32[seq, 8]", "3:29: expected `{` opening the body of `fused`"),
        ("%1 = fused{x=1}(%0) : f32[seq, 8] {", "3:14: `fused` has no attribute `x`"),
        ("%1 = exp(%0) : f32[seq, 8] {", "3:28: `exp` has no body; only `fused` does"),
        ("yield %0", "3:1: `yield` outside a fused body"),
        ("}", "3:1: `}` outside a fused body"),
        (
            "%1 = fused(%0) : f32[seq, 8] {\n  yield $0\n}\n%2 = exp(%1) : f32[seq, 8] }",
            "6:28: unexpected `}` at the end of the statement",
        ),
    ];
    for (body, want) in top {
        assert_eq!(&parse_err(&format!("{h}{body}\n")), want, "for {body:?}");
    }
}
