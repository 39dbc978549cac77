//! The IR text format: a deterministic, line-oriented, diffable dump of a [`Graph`]
//! ([`print()`]) and its parser ([`parse`]); `print(&parse(&print(g))?) == print(g)`.
//!
//! ```text
//! kiln.graph v1
//! %0 = input{name="x"} : f32[batch, seq, 64]
//! %1 = param{name="model.up.weight"} : f32[256, 64]  @model.up
//! %2 = matmul{transpose_a=false, transpose_b=true}(%0, %1) : f32[batch, seq, 256]  @model.up
//! %3 = topk{k=4, axis=2}(%2) : (f32[batch, seq, 4], i64[batch, seq, 4])
//! %4 = const{values=[1.0, 0.5]} : bf16[2]
//! output "logits" = %2
//! output "idx" = %3.1
//! ```
//!
//! * The first line is the header `kiln.graph v1`. Blank lines and `#` comments (to the
//!   end of the line, outside strings) are ignored everywhere.
//! * A node line is `%N = op{attrs}(operands) : types  @scope`. The attribute block is
//!   left out when the op has none, the operand list for sources (`input`, `param`,
//!   `const`, `arange`); `types` is one tensor type, or `(t0, t1)` for several outputs;
//!   `@scope` (the module path, bare or as a quoted string) is left out when empty.
//!   `%N.k` names output `k` of node `%N` (`%N` alone is output 0).
//! * Attributes come generically from [`Op::attrs`] and are rebuilt with
//!   [`Op::from_parts`]. Values: integers, `true`/`false`, f32 in Rust's shortest
//!   round-trip form (`0.25`, `1e-6`, `-0.0`, `inf`, `-inf`, `NaN`, or `NaN(0x7fc00001)`
//!   for other NaN bit patterns), strings with escapes (`\"`, `\\`, `\n`, `\r`, `\t`,
//!   `\u{7f}`), dtypes by name, dims as sums and differences of products of integers and
//!   symbols (`2*batch*seq - 1`), shapes `[d, d]`, lists `[1, 2]` / `[1.0, 0.5]` and
//!   masks `none`, `causal`, `window(4096)`. Where the syntax alone is ambiguous (`0` may
//!   be an integer, a dim or an f32; `[2, 3]` a list or a shape) the parser picks the kind
//!   the op accepts.
//! * `output "name" = %N.k` lines list the graph outputs in order.
//! * A fused node ([`Op::Fused`]) is a node line ending in `{`, then its body, one
//!   statement a line (printed indented by two spaces), then a line `}`:
//!
//!   ```text
//!   %7 = fused(%3, %5) : (bf16[batch, seq, 64], f32[batch, seq, 1])  @model.layers.0 {
//!     %0 = add($0, $1) : bf16[batch, seq, 64]
//!     %1 = cast{to=f32}(%0) : f32[batch, seq, 64]
//!     %2 = reduce_mean{axes=[2], keep_dims=true}(%1) : f32[batch, seq, 1]
//!     yield %0, %2
//!   }
//!   ```
//!
//!   `$i` is input `i` of the group (operand `i` of the fused node), `%j` (`%j.k`) a
//!   body node, numbered from 0 in each body (names are local to the body; the parser
//!   accepts any name as for graph values). Body nodes have no scope; sources and nested
//!   `fused` nodes are not allowed in a body. `yield` lists the outputs and is the last
//!   statement before `}`. Each body line is type-checked like a node line; the fused
//!   node itself (the body's checks, its output types) is checked when `}` closes it,
//!   with errors on its header line.
//!
//! Printed order: nodes in [`Graph::topo_order`], renumbered densely `%0, %1, …`;
//! outputs in their map's order. Since parsing re-registers inputs and params in textual
//! order, that order must list them as their maps do; in the rare graph where the
//! topological order does not (after passes that reused node slots), all inputs are
//! hoisted to the top in map order, then all params in map order, then the other nodes
//! in topological order. Nodes that no topological order reaches (a cycle in a corrupted
//! graph) are printed last, in index order, so the parser rejects them.
//!
//! The parser rebuilds the graph through [`Graph::add_input`], [`Graph::add_param`],
//! [`Graph::add`] (which re-checks each op's shape rule; an annotation that disagrees
//! with the rule is an error on that line) and [`Graph::set_output`], then runs
//! [`Graph::verify`]. Errors are [`Error::Parse`] with a 1-based line and column
//! (columns count characters). Like `add`, the parser hash-conses: a line identical to
//! an earlier one (same op, same operands) names the earlier node.
//!
//! The parser never panics. To keep the op rules' dim arithmetic from overflowing, each
//! dim in the text may have coefficients summing (in absolute value) to at most 2^32, a
//! shape's product of those sums may be at most 2^62, and its product of term counts at
//! most 4096.

use crate::{Error, Graph, NodeId, Result, Value};
use indexmap::IndexMap;
use kiln_ops::{Attr, DType, Dim, FusedBody, FusedNode, FusedRef, Mask, Op, Shape, Sym, TensorType};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;

/// The first line of every IR text.
pub const HEADER: &str = "kiln.graph v1";

/// Largest sum of absolute coefficients of one dim in the text.
const DIM_LIMIT: u64 = 1 << 32;
/// Largest product of those sums over one shape.
const SHAPE_LIMIT: u64 = 1 << 62;
/// Largest product of term counts over one shape (bounds the expansion of `numel`).
const TERMS_LIMIT: u64 = 4096;
/// Largest number of attribute-kind combinations tried for one line.
const COMBO_LIMIT: usize = 256;

// ---- printer ---------------------------------------------------------------------------

/// Prints `g` in the text format (see the module docs). Deterministic: the same graph
/// gives the same bytes. Never panics, even on a graph that fails verification.
pub fn print(g: &Graph) -> String {
    let order = print_order(g);
    let number: HashMap<NodeId, usize> = order.iter().enumerate().map(|(i, &n)| (n, i)).collect();
    let value = |v: Value| -> String {
        match number.get(&v.node) {
            Some(i) if v.output == 0 => format!("%{i}"),
            Some(i) => format!("%{i}.{}", v.output),
            None => "%dangling".to_string(),
        }
    };
    let pg = g.petgraph();
    let mut out = String::new();
    out.push_str(HEADER);
    out.push('\n');
    for (i, &n) in order.iter().enumerate() {
        let Some(node) = pg.node_weight(n) else { continue };
        let _ = write!(out, "%{i} = ");
        let operands: Vec<String> = g.operands(n).iter().map(|&v| value(v)).collect();
        print_op(&mut out, &node.op, &operands, &node.outputs);
        if !node.scope.is_empty() {
            out.push_str("  @");
            print_scope(&mut out, &node.scope);
        }
        if let Op::Fused(body) = &node.op {
            print_body(&mut out, body);
        }
        out.push('\n');
    }
    for (name, &v) in g.outputs() {
        out.push_str("output ");
        print_str(&mut out, name);
        let _ = writeln!(out, " = {}", value(v));
    }
    out
}

/// `op{attrs}(operands) : types` (the attribute block left out when empty, the operand
/// list for sources without operands).
fn print_op(out: &mut String, op: &Op, operands: &[String], outputs: &[TensorType]) {
    out.push_str(op.name());
    let attrs = op.attrs();
    if !attrs.is_empty() {
        out.push('{');
        for (j, (k, a)) in attrs.iter().enumerate() {
            if j > 0 {
                out.push_str(", ");
            }
            let _ = write!(out, "{k}=");
            print_attr(out, a);
        }
        out.push('}');
    }
    if !op.is_source() || !operands.is_empty() {
        let _ = write!(out, "({})", operands.join(", "));
    }
    let _ = write!(out, " : {}", fmt_types(outputs));
}

/// ` {`, the body's nodes (`%j` = body node `j`, `$i` = input `i`), `yield` and `}`.
fn print_body(out: &mut String, body: &FusedBody) {
    let r = |r: &FusedRef| match *r {
        FusedRef::Input(i) => format!("${i}"),
        FusedRef::Node { node, output: 0 } => format!("%{node}"),
        FusedRef::Node { node, output } => format!("%{node}.{output}"),
    };
    out.push_str(" {\n");
    for (j, n) in body.nodes.iter().enumerate() {
        let _ = write!(out, "  %{j} = ");
        let operands: Vec<String> = n.operands.iter().map(r).collect();
        print_op(out, &n.op, &operands, &n.outputs);
        out.push('\n');
    }
    let outs: Vec<String> = body.outputs.iter().map(r).collect();
    let _ = write!(out, "  yield {}\n}}", outs.join(", "));
}

/// The printing order: topological, with inputs and params hoisted when that is needed
/// to reproduce their maps' order (see the module docs).
fn print_order(g: &Graph) -> Vec<NodeId> {
    let mut order = g.topo_order();
    if order.len() < g.node_count() {
        let seen: HashSet<NodeId> = order.iter().copied().collect();
        let mut rest: Vec<NodeId> = g.petgraph().node_indices().filter(|n| !seen.contains(n)).collect();
        rest.sort();
        order.extend(rest);
    }
    let listed = |map: &IndexMap<String, NodeId>| -> bool {
        let members: HashSet<NodeId> = map.values().copied().collect();
        let in_order: Vec<NodeId> = order.iter().copied().filter(|n| members.contains(n)).collect();
        in_order.iter().eq(map.values())
    };
    if listed(g.inputs()) && listed(g.params()) {
        return order;
    }
    let mut hoisted: Vec<NodeId> = Vec::with_capacity(order.len());
    let mut done: HashSet<NodeId> = HashSet::new();
    for &n in g.inputs().values().chain(g.params().values()) {
        if g.contains(n) && done.insert(n) {
            hoisted.push(n);
        }
    }
    hoisted.extend(order.into_iter().filter(|n| !done.contains(n)));
    hoisted
}

fn fmt_types(types: &[TensorType]) -> String {
    match types {
        [t] => t.to_string(),
        _ => format!("({})", types.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(", ")),
    }
}

fn print_attr(out: &mut String, a: &Attr) {
    match a {
        Attr::Int(i) => {
            let _ = write!(out, "{i}");
        }
        Attr::Bool(b) => {
            let _ = write!(out, "{b}");
        }
        Attr::F32(f) => out.push_str(&fmt_f32(*f)),
        Attr::Str(s) => print_str(out, s),
        Attr::DType(d) => out.push_str(d.name()),
        Attr::Dim(d) => {
            let _ = write!(out, "{d}");
        }
        Attr::Shape(s) => {
            let _ = write!(out, "{s}");
        }
        Attr::Ints(v) => {
            let list: Vec<String> = v.iter().map(|x| x.to_string()).collect();
            let _ = write!(out, "[{}]", list.join(", "));
        }
        Attr::Floats(v) => {
            let list: Vec<String> = v.iter().map(|&x| fmt_f32(x)).collect();
            let _ = write!(out, "[{}]", list.join(", "));
        }
        Attr::Mask(m) => match m {
            Mask::None => out.push_str("none"),
            Mask::Causal => out.push_str("causal"),
            Mask::SlidingWindow(w) => {
                let _ = write!(out, "window({w})");
            }
        },
    }
}

/// An f32 that parses back to the same bits: Rust's shortest round-trip form, with
/// non-canonical NaNs spelled by their bit pattern.
fn fmt_f32(v: f32) -> String {
    if v.is_nan() {
        if v.to_bits() == f32::NAN.to_bits() {
            "NaN".to_string()
        } else {
            format!("NaN(0x{:08x})", v.to_bits())
        }
    } else {
        format!("{v:?}")
    }
}

fn print_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn is_bare_scope_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-' | '/' | ':')
}

fn print_scope(out: &mut String, s: &str) {
    if s.chars().all(is_bare_scope_char) {
        out.push_str(s);
    } else {
        print_str(out, s);
    }
}

// ---- lexer -----------------------------------------------------------------------------

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Ident(String),
    /// A non-negative integer literal (decimal, or hex with `0x`).
    Int(u64),
    /// A literal with a fraction or an exponent.
    Float(f32),
    Str(String),
    /// `%name` or `%name.k`.
    Ref(String, Option<u64>),
    /// `$i`: input `i` of a fused body.
    Input(u64),
    /// `@path` or `@"path"`.
    Scope(String),
    Punct(char),
}

#[derive(Clone, Debug)]
struct Token {
    tok: Tok,
    col: usize,
}

fn describe(t: &Tok) -> String {
    match t {
        Tok::Ident(s) => format!("`{s}`"),
        Tok::Int(n) => format!("`{n}`"),
        Tok::Float(f) => format!("`{}`", fmt_f32(*f)),
        Tok::Str(_) => "a string".into(),
        Tok::Ref(n, None) => format!("`%{n}`"),
        Tok::Ref(n, Some(k)) => format!("`%{n}.{k}`"),
        Tok::Input(i) => format!("`${i}`"),
        Tok::Scope(_) => "a scope".into(),
        Tok::Punct(c) => format!("`{c}`"),
    }
}

type PErr = (usize, String);

fn lex(line: &[char]) -> std::result::Result<Vec<Token>, PErr> {
    let mut toks = Vec::new();
    let mut i = 0;
    let at = |i: usize| line.get(i).copied();
    while let Some(c) = at(i) {
        let col = i + 1;
        if c.is_whitespace() {
            i += 1;
            continue;
        }
        if c == '#' {
            break;
        }
        let tok = if c.is_ascii_alphabetic() || c == '_' {
            let s = take_while(line, &mut i, |c| c.is_ascii_alphanumeric() || c == '_');
            Tok::Ident(s)
        } else if c.is_ascii_digit() {
            lex_number(line, &mut i)?
        } else if c == '"' {
            Tok::Str(lex_string(line, &mut i)?)
        } else if c == '%' {
            i += 1;
            let name = take_while(line, &mut i, |c| c.is_ascii_alphanumeric() || c == '_');
            if name.is_empty() {
                return Err((col, "expected a value name after `%`".into()));
            }
            let mut output = None;
            if at(i) == Some('.') && at(i + 1).is_some_and(|c| c.is_ascii_digit()) {
                i += 1;
                let kcol = i + 1;
                let digits = take_while(line, &mut i, |c| c.is_ascii_digit());
                output = Some(digits.parse::<u64>().map_err(|_| (kcol, "output index too large".to_string()))?);
            }
            Tok::Ref(name, output)
        } else if c == '$' {
            i += 1;
            let digits = take_while(line, &mut i, |c| c.is_ascii_digit());
            if digits.is_empty() {
                return Err((col, "expected an input index after `$`".into()));
            }
            Tok::Input(digits.parse::<u64>().map_err(|_| (col, "input index too large".to_string()))?)
        } else if c == '@' {
            i += 1;
            if at(i) == Some('"') {
                Tok::Scope(lex_string(line, &mut i)?)
            } else {
                let s = take_while(line, &mut i, |c| !c.is_whitespace() && c != '#');
                if s.is_empty() {
                    return Err((col, "expected a scope after `@`".into()));
                }
                Tok::Scope(s)
            }
        } else if "={}()[],:*+-.".contains(c) {
            i += 1;
            Tok::Punct(c)
        } else {
            return Err((col, format!("unexpected character `{}`", c.escape_debug())));
        };
        toks.push(Token { tok, col });
    }
    Ok(toks)
}

fn take_while(line: &[char], i: &mut usize, f: impl Fn(char) -> bool) -> String {
    let start = *i;
    while line.get(*i).is_some_and(|&c| f(c)) {
        *i += 1;
    }
    line.get(start..*i).unwrap_or_default().iter().collect()
}

fn lex_number(line: &[char], i: &mut usize) -> std::result::Result<Tok, PErr> {
    let col = *i + 1;
    let at = |i: usize| line.get(i).copied();
    if at(*i) == Some('0') && matches!(at(*i + 1), Some('x' | 'X')) {
        *i += 2;
        let digits = take_while(line, i, |c| c.is_ascii_alphanumeric());
        return u64::from_str_radix(&digits, 16)
            .map(Tok::Int)
            .map_err(|_| (col, format!("bad hexadecimal literal `0x{digits}`")));
    }
    let mut s = take_while(line, i, |c| c.is_ascii_digit());
    let mut is_float = false;
    if at(*i) == Some('.') && at(*i + 1).is_some_and(|c| c.is_ascii_digit()) {
        *i += 1;
        s.push('.');
        s.push_str(&take_while(line, i, |c| c.is_ascii_digit()));
        is_float = true;
    }
    if matches!(at(*i), Some('e' | 'E')) {
        let sign = matches!(at(*i + 1), Some('+' | '-'));
        let first_digit = if sign { *i + 2 } else { *i + 1 };
        if at(first_digit).is_some_and(|c| c.is_ascii_digit()) {
            s.push('e');
            if sign {
                s.push(at(*i + 1).unwrap_or('+'));
            }
            *i = first_digit;
            s.push_str(&take_while(line, i, |c| c.is_ascii_digit()));
            is_float = true;
        }
    }
    if is_float {
        s.parse::<f32>().map(Tok::Float).map_err(|_| (col, format!("bad number `{s}`")))
    } else {
        s.parse::<u64>().map(Tok::Int).map_err(|_| (col, format!("integer `{s}` is too large")))
    }
}

/// A quoted string starting at `line[*i] == '"'`.
fn lex_string(line: &[char], i: &mut usize) -> std::result::Result<String, PErr> {
    let open = *i + 1;
    *i += 1;
    let mut s = String::new();
    loop {
        let Some(c) = line.get(*i).copied() else {
            return Err((open, "unterminated string".into()));
        };
        let col = *i + 1;
        *i += 1;
        match c {
            '"' => return Ok(s),
            '\\' => {
                let e = line.get(*i).copied();
                *i += 1;
                match e {
                    Some('"') => s.push('"'),
                    Some('\\') => s.push('\\'),
                    Some('n') => s.push('\n'),
                    Some('r') => s.push('\r'),
                    Some('t') => s.push('\t'),
                    Some('0') => s.push('\0'),
                    Some('u') if line.get(*i) == Some(&'{') => {
                        *i += 1;
                        let hex = take_while(line, i, |c| c.is_ascii_hexdigit());
                        if line.get(*i) != Some(&'}') || hex.is_empty() || hex.len() > 6 {
                            return Err((col, "bad `\\u{…}` escape".into()));
                        }
                        *i += 1;
                        let ch = u32::from_str_radix(&hex, 16).ok().and_then(char::from_u32);
                        s.push(ch.ok_or_else(|| (col, format!("`\\u{{{hex}}}` is not a character")))?);
                    }
                    _ => return Err((col, "unknown escape in string".into())),
                }
            }
            c => s.push(c),
        }
    }
}

// ---- values ----------------------------------------------------------------------------

/// A dim being parsed: monomial (sorted symbols) → coefficient.
struct DimInfo {
    dim: Dim,
    /// Sum of the absolute coefficients.
    l1: u64,
    terms: u64,
}

/// Parses a dim expression: sums/differences of products of integers and symbols.
fn parse_dim(toks: &[Token], end_col: usize) -> std::result::Result<DimInfo, PErr> {
    let mut poly: BTreeMap<Vec<Sym>, i64> = BTreeMap::new();
    let mut pos = 0;
    let mut negative = false;
    let too_big = |col: usize| (col, format!("dimension is too large (the limit is {DIM_LIMIT})"));
    if let Some(Token { tok: Tok::Punct('-'), .. }) = toks.first() {
        negative = true;
        pos = 1;
    }
    loop {
        let mut coeff: i64 = if negative { -1 } else { 1 };
        let mut syms: Vec<Sym> = Vec::new();
        loop {
            let Some(t) = toks.get(pos) else {
                return Err((end_col, "expected a number or a symbol".into()));
            };
            match &t.tok {
                Tok::Int(n) if *n <= DIM_LIMIT => {
                    coeff =
                        coeff.checked_mul(*n as i64).filter(|c| c.unsigned_abs() <= DIM_LIMIT).ok_or(too_big(t.col))?
                }
                Tok::Int(_) => return Err(too_big(t.col)),
                Tok::Ident(s) => syms.push(Sym::new(s)),
                other => return Err((t.col, format!("expected a number or a symbol, found {}", describe(other)))),
            }
            pos += 1;
            match toks.get(pos) {
                Some(Token { tok: Tok::Punct('*'), .. }) => pos += 1,
                _ => break,
            }
        }
        syms.sort();
        let col = toks.get(pos.saturating_sub(1)).map_or(end_col, |t| t.col);
        let e = poly.entry(syms).or_insert(0);
        *e = e.checked_add(coeff).filter(|c| c.unsigned_abs() <= DIM_LIMIT).ok_or(too_big(col))?;
        match toks.get(pos) {
            None => break,
            Some(Token { tok: Tok::Punct('+'), .. }) => negative = false,
            Some(Token { tok: Tok::Punct('-'), .. }) => negative = true,
            Some(t) => return Err((t.col, format!("expected `+`, `-` or `*`, found {}", describe(&t.tok)))),
        }
        pos += 1;
    }
    let mut dim = Dim::fixed(0);
    let mut l1: u64 = 0;
    let mut terms: u64 = 0;
    for (syms, c) in poly {
        if c == 0 {
            continue;
        }
        l1 = l1.saturating_add(c.unsigned_abs());
        terms += 1;
        let mut factors: Vec<Dim> = syms.into_iter().map(Dim::from).collect();
        factors.push(Dim::fixed(c.unsigned_abs() as usize));
        let t = product(factors);
        dim = if c < 0 { &dim - &t } else { &dim + &t };
    }
    if l1 > DIM_LIMIT {
        return Err(too_big(toks.first().map_or(end_col, |t| t.col)));
    }
    Ok(DimInfo { dim, l1, terms })
}

/// The product of `factors`, multiplied as a balanced tree so that a long monomial
/// (`s*s*…*s`) costs O(n log² n) rather than O(n²).
fn product(mut factors: Vec<Dim>) -> Dim {
    while factors.len() > 1 {
        let mut next = Vec::with_capacity(factors.len().div_ceil(2));
        let mut it = factors.into_iter();
        while let Some(a) = it.next() {
            next.push(match it.next() {
                Some(b) => &a * &b,
                None => a,
            });
        }
        factors = next;
    }
    factors.pop().unwrap_or_else(|| Dim::fixed(1))
}

/// Builds a shape from parsed dims, checking the size limits.
fn make_shape(dims: Vec<DimInfo>, col: usize) -> std::result::Result<Shape, PErr> {
    let mut size: u64 = 1;
    let mut terms: u64 = 1;
    for d in &dims {
        size = size.saturating_mul(d.l1.max(1));
        terms = terms.saturating_mul(d.terms.max(1));
    }
    if size > SHAPE_LIMIT {
        return Err((col, format!("shape is too large (the limit is {SHAPE_LIMIT} elements)")));
    }
    if terms > TERMS_LIMIT {
        return Err((col, format!("shape has too many symbolic terms (the limit is {TERMS_LIMIT})")));
    }
    Ok(Shape::new(dims.into_iter().map(|d| d.dim)))
}

/// The interpretations of one scalar attribute value.
#[derive(Default)]
struct Scalar {
    int: Option<i64>,
    dim: Option<std::result::Result<DimInfo, PErr>>,
    f32: Option<f32>,
    /// Keyword kinds (bool, mask, dtype), preferred over the others.
    other: Option<Attr>,
}

fn parse_scalar(toks: &[Token], end_col: usize) -> Scalar {
    let mut s = Scalar::default();
    let tok = |i: usize| toks.get(i).map(|t| &t.tok);
    match (tok(0), tok(1), tok(2), tok(3), toks.len()) {
        (Some(Tok::Int(n)), _, _, _, 1) => {
            s.int = i64::try_from(*n).ok();
            s.f32 = Some(*n as f32);
        }
        (Some(Tok::Punct('-')), Some(Tok::Int(n)), _, _, 2) => {
            s.int = i64::try_from(-i128::from(*n)).ok();
            s.f32 = Some(-(*n as f32));
        }
        (Some(Tok::Float(f)), _, _, _, 1) => {
            s.f32 = Some(*f);
            return s;
        }
        (Some(Tok::Punct('-')), Some(Tok::Float(f)), _, _, 2) => {
            s.f32 = Some(-*f);
            return s;
        }
        (Some(Tok::Punct('-')), Some(Tok::Ident(i)), _, _, 2) if i == "inf" => s.f32 = Some(f32::NEG_INFINITY),
        (Some(Tok::Ident(i)), _, _, _, 1) => match i.as_str() {
            "true" => s.other = Some(Attr::Bool(true)),
            "false" => s.other = Some(Attr::Bool(false)),
            "none" => s.other = Some(Attr::Mask(Mask::None)),
            "causal" => s.other = Some(Attr::Mask(Mask::Causal)),
            "inf" => s.f32 = Some(f32::INFINITY),
            "NaN" => s.f32 = Some(f32::NAN),
            name => s.other = DType::from_name(name).map(Attr::DType),
        },
        (Some(Tok::Ident(i)), Some(Tok::Punct('(')), Some(Tok::Int(n)), Some(Tok::Punct(')')), 4) => {
            if i == "window" {
                s.other = u32::try_from(*n).ok().map(|w| Attr::Mask(Mask::SlidingWindow(w)));
            } else if i == "NaN" {
                s.f32 = u32::try_from(*n).ok().map(f32::from_bits);
            }
            return s;
        }
        _ => {}
    }
    s.dim = Some(parse_dim(toks, end_col));
    s
}

/// The candidate interpretations of one attribute value, preferred first, and an error
/// to report if none is accepted.
struct Cands {
    list: Vec<Attr>,
    err: Option<PErr>,
}

fn scalar_cands(s: Scalar, col: usize) -> Cands {
    let mut c = Cands { list: Vec::new(), err: None };
    c.list.extend(s.other);
    c.list.extend(s.int.map(Attr::Int));
    match s.dim {
        Some(Ok(d)) => c.list.push(Attr::Dim(d.dim)),
        Some(Err(e)) => c.err = Some(e),
        None => {}
    }
    c.list.extend(s.f32.map(Attr::F32));
    if c.list.is_empty() && c.err.is_none() {
        c.err = Some((col, "cannot read this value".into()));
    }
    c
}

fn list_cands(elems: Vec<Scalar>, col: usize) -> Cands {
    let mut c = Cands { list: Vec::new(), err: None };
    if let Some(ints) = elems.iter().map(|s| s.int).collect::<Option<Vec<i64>>>() {
        c.list.push(Attr::Ints(ints));
    }
    let floats = elems.iter().map(|s| s.f32).collect::<Option<Vec<f32>>>();
    let mut dims = Vec::with_capacity(elems.len());
    for s in elems {
        match s.dim {
            Some(Ok(d)) => dims.push(d),
            Some(Err(e)) => {
                c.err.get_or_insert(e);
                dims.clear();
                break;
            }
            None => {
                dims.clear();
                break;
            }
        }
    }
    if c.err.is_none() {
        match make_shape(dims, col) {
            Ok(shape) => c.list.push(Attr::Shape(shape)),
            Err(e) => c.err = Some(e),
        }
    }
    c.list.extend(floats.map(Attr::Floats));
    if c.list.is_empty() && c.err.is_none() {
        c.err = Some((col, "cannot read this list".into()));
    }
    c
}

// ---- parser ----------------------------------------------------------------------------

struct Line<'a> {
    toks: &'a [Token],
    pos: usize,
    end_col: usize,
}

impl<'a> Line<'a> {
    fn peek(&self) -> Option<&'a Tok> {
        self.toks.get(self.pos).map(|t| &t.tok)
    }
    fn col(&self) -> usize {
        self.toks.get(self.pos).map_or(self.end_col, |t| t.col)
    }
    fn next(&mut self) -> Option<&'a Token> {
        let t = self.toks.get(self.pos);
        if t.is_some() {
            self.pos += 1;
        }
        t
    }
    fn found(&self) -> String {
        self.peek().map_or("the end of the line".into(), describe)
    }
    fn eat(&mut self, c: char) -> bool {
        if self.peek() == Some(&Tok::Punct(c)) {
            self.pos += 1;
            true
        } else {
            false
        }
    }
    fn expect(&mut self, c: char) -> std::result::Result<(), PErr> {
        if self.eat(c) {
            Ok(())
        } else {
            Err((self.col(), format!("expected `{c}`, found {}", self.found())))
        }
    }
    fn expect_end(&self) -> std::result::Result<(), PErr> {
        match self.peek() {
            None => Ok(()),
            Some(t) => Err((self.col(), format!("unexpected {} at the end of the statement", describe(t)))),
        }
    }
    /// The tokens up to (not including) the first of `stops` at this level.
    fn until(&mut self, stops: &[char]) -> &'a [Token] {
        let start = self.pos;
        while let Some(t) = self.toks.get(self.pos) {
            match t.tok {
                Tok::Punct(c) if stops.contains(&c) => break,
                _ => self.pos += 1,
            }
        }
        self.toks.get(start..self.pos).unwrap_or_default()
    }
    /// A comma-separated list of items closed by `close` (the opener already eaten).
    fn list<T>(
        &mut self,
        close: char,
        mut item: impl FnMut(&mut Self) -> std::result::Result<T, PErr>,
    ) -> std::result::Result<Vec<T>, PErr> {
        let mut v = Vec::new();
        loop {
            if self.eat(close) {
                return Ok(v);
            }
            v.push(item(self)?);
            if !self.eat(',') {
                self.expect(close)?;
                return Ok(v);
            }
        }
    }

    fn scalar(&mut self, stops: &[char]) -> std::result::Result<Scalar, PErr> {
        let col = self.col();
        let toks = self.until(stops);
        if toks.is_empty() {
            return Err((col, format!("expected a value, found {}", self.found())));
        }
        Ok(parse_scalar(toks, self.col()))
    }

    fn dim(&mut self) -> std::result::Result<DimInfo, PErr> {
        let col = self.col();
        let toks = self.until(&[',', ']']);
        if toks.is_empty() {
            return Err((col, format!("expected a dimension, found {}", self.found())));
        }
        parse_dim(toks, self.col())
    }

    fn tensor_type(&mut self) -> std::result::Result<TensorType, PErr> {
        let col = self.col();
        let dtype = match self.next().map(|t| &t.tok) {
            Some(Tok::Ident(name)) => DType::from_name(name).ok_or_else(|| (col, format!("unknown dtype `{name}`")))?,
            _ => return Err((col, "expected a tensor type such as `f32[batch, 64]`".into())),
        };
        let scol = self.col();
        self.expect('[')?;
        let dims = self.list(']', |l| l.dim())?;
        Ok(TensorType::new(dtype, make_shape(dims, scol)?))
    }

    fn types(&mut self) -> std::result::Result<Vec<TensorType>, PErr> {
        if self.eat('(') {
            self.list(')', |l| l.tensor_type())
        } else {
            Ok(vec![self.tensor_type()?])
        }
    }
}

struct Parser {
    graph: Graph,
    values: HashMap<String, NodeId>,
}

/// The parts of an op statement after `%name =`, with columns for errors.
struct OpLine<T> {
    op_name: String,
    op_col: usize,
    attrs: Vec<(String, Cands, usize)>,
    operands: Vec<T>,
    ty_col: usize,
    types: Vec<TensorType>,
    scope: String,
    scope_col: Option<usize>,
    /// The column of a `{` that opens a fused body.
    open: Option<usize>,
}

/// Reads `op{attrs}(operands) : types  @scope {` (everything after `=`), with `operand`
/// reading one operand.
fn op_line<T>(
    l: &mut Line<'_>,
    mut operand: impl FnMut(&mut Line<'_>) -> std::result::Result<T, PErr>,
) -> std::result::Result<OpLine<T>, PErr> {
    let op_col = l.col();
    let op_name = match l.next().map(|t| &t.tok) {
        Some(Tok::Ident(s)) => s.clone(),
        _ => return Err((op_col, format!("expected an op name, found {}", describe_opt(l, op_col)))),
    };
    // Attributes.
    let mut attrs: Vec<(String, Cands, usize)> = Vec::new();
    if l.eat('{') {
        let parsed = l.list('}', |l| {
            let kcol = l.col();
            let key = match l.next().map(|t| &t.tok) {
                Some(Tok::Ident(k)) => k.clone(),
                _ => return Err((kcol, "expected an attribute name".to_string())),
            };
            l.expect('=')?;
            let vcol = l.col();
            let cands = match l.peek() {
                Some(Tok::Str(s)) => {
                    l.pos += 1;
                    Cands { list: vec![Attr::Str(s.clone())], err: None }
                }
                Some(Tok::Punct('[')) => {
                    l.pos += 1;
                    let elems = l.list(']', |l| l.scalar(&[',', ']']))?;
                    list_cands(elems, vcol)
                }
                _ => scalar_cands(l.scalar(&[',', '}'])?, vcol),
            };
            Ok((key, cands, vcol, kcol))
        })?;
        let mut keys = HashSet::new();
        for (key, cands, vcol, kcol) in parsed {
            if !keys.insert(key.clone()) {
                return Err((kcol, format!("attribute `{key}` is given twice")));
            }
            attrs.push((key, cands, vcol));
        }
    }
    // Operands.
    let mut operands = Vec::new();
    if l.eat('(') {
        operands = l.list(')', &mut operand)?;
    }
    l.expect(':')?;
    let ty_col = l.col();
    let types = l.types()?;
    let mut scope = String::new();
    let mut scope_col = None;
    if let Some(Tok::Scope(s)) = l.peek() {
        scope_col = Some(l.col());
        scope = s.clone();
        l.pos += 1;
    }
    let open_col = l.col();
    let open = l.eat('{').then_some(open_col);
    l.expect_end()?;
    Ok(OpLine { op_name, op_col, attrs, operands, ty_col, types, scope, scope_col, open })
}

/// A fused node whose body is being read: its header line and the body so far.
struct OpenBody {
    name: String,
    line: usize,
    op_col: usize,
    ty_col: usize,
    open_col: usize,
    operands: Vec<Value>,
    /// The operands' types: the body's input types.
    input_types: Vec<TensorType>,
    types: Vec<TensorType>,
    scope: String,
    /// Body value names → body nodes.
    names: HashMap<String, u16>,
    nodes: Vec<FusedNode>,
    outputs: Option<Vec<FusedRef>>,
}

/// An error on a given line (for errors reported on a fused node's header line).
type LErr = (usize, usize, String);

/// Parses the text format back into a verified [`Graph`] (see the module docs).
/// Errors are [`Error::Parse`] with the 1-based line and column; never panics.
pub fn parse(text: &str) -> Result<Graph> {
    let mut p = Parser { graph: Graph::new(), values: HashMap::new() };
    let mut header = false;
    let mut open: Option<OpenBody> = None;
    for (i, raw) in text.split('\n').enumerate() {
        let lineno = i + 1;
        let raw = raw.strip_suffix('\r').unwrap_or(raw);
        let err = |(col, msg): PErr| Error::Parse { line: lineno, col, msg };
        if !header {
            let t = raw.trim();
            if t.is_empty() || t.starts_with('#') {
                continue;
            }
            if t != HEADER {
                let col = raw.chars().take_while(|c| c.is_whitespace()).count() + 1;
                let msg = match t.strip_prefix("kiln.graph ") {
                    Some(v) => format!("unsupported version `{}` (expected `{HEADER}`)", v.trim()),
                    None => format!("expected the header `{HEADER}`"),
                };
                return Err(err((col, msg)));
            }
            header = true;
            continue;
        }
        let chars: Vec<char> = raw.chars().collect();
        let toks = lex(&chars).map_err(err)?;
        if toks.is_empty() {
            continue;
        }
        let mut line = Line { toks: &toks, pos: 0, end_col: chars.len() + 1 };
        match open.take() {
            Some(mut body) => {
                if body.statement(&mut line).map_err(err)? {
                    p.close(body).map_err(|(line, col, msg)| Error::Parse { line, col, msg })?;
                } else {
                    open = Some(body);
                }
            }
            None => open = p.statement(&mut line, lineno).map_err(err)?,
        }
    }
    if !header {
        return Err(Error::Parse { line: 1, col: 1, msg: format!("expected the header `{HEADER}`") });
    }
    if let Some(b) = open {
        let msg = format!("the body of `%{}` is not closed with `}}`", b.name);
        return Err(Error::Parse { line: b.line, col: b.open_col, msg });
    }
    p.graph.verify()?;
    Ok(p.graph)
}

impl Parser {
    /// One top-level statement; a fused node's header line returns its open body.
    fn statement(&mut self, l: &mut Line<'_>, lineno: usize) -> std::result::Result<Option<OpenBody>, PErr> {
        let col = l.col();
        match l.next().map(|t| &t.tok) {
            Some(Tok::Ident(kw)) if kw == "output" => self.output(l).map(|()| None),
            Some(Tok::Ident(kw)) if kw == "yield" => Err((col, "`yield` outside a fused body".into())),
            Some(Tok::Punct('}')) => Err((col, "`}` outside a fused body".into())),
            Some(Tok::Ref(name, None)) => self.node(l, name, col, lineno),
            Some(Tok::Ref(name, Some(k))) => {
                Err((col, format!("`%{name}.{k}` names an output; define the node as `%{name}`")))
            }
            _ => Err((col, "expected `%name = op…` or `output \"name\" = %value`".into())),
        }
    }

    fn output(&mut self, l: &mut Line<'_>) -> std::result::Result<(), PErr> {
        let col = l.col();
        let Some(Tok::Str(name)) = l.next().map(|t| &t.tok) else {
            return Err((col, "expected the output name as a quoted string".into()));
        };
        l.expect('=')?;
        let v = self.value(l)?;
        l.expect_end()?;
        self.graph.set_output(name, v).map_err(|e| (col, e.to_string()))
    }

    /// A use of a defined value: `%name` or `%name.k`.
    fn value(&self, l: &mut Line<'_>) -> std::result::Result<Value, PErr> {
        let col = l.col();
        let Some(Tok::Ref(name, k)) = l.next().map(|t| &t.tok) else {
            return Err((col, format!("expected a value such as `%3`, found {}", describe_opt(l, col))));
        };
        let Some(&n) = self.values.get(name) else {
            return Err((col, format!("undefined value `%{name}`")));
        };
        let outs = self.graph.node(n).outputs.len();
        let k = k.unwrap_or(0);
        match u8::try_from(k) {
            Ok(k8) if (k as usize) < outs => Ok(Value::new(n, k8)),
            _ => Err((col, format!("`%{name}` has {outs} output(s), there is no output {k}"))),
        }
    }

    fn node(
        &mut self,
        l: &mut Line<'_>,
        name: &str,
        def_col: usize,
        lineno: usize,
    ) -> std::result::Result<Option<OpenBody>, PErr> {
        if self.values.contains_key(name) {
            return Err((def_col, format!("value `%{name}` is defined twice")));
        }
        l.expect('=')?;
        let OpLine { op_name, op_col, attrs, operands, ty_col, types, scope, scope_col, open } =
            op_line(l, |l| self.value(l))?;
        if op_name == "fused" {
            if let Some((key, _, col)) = attrs.first() {
                return Err((*col, format!("`fused` has no attribute `{key}`")));
            }
            let Some(open_col) = open else {
                return Err((l.end_col, "expected `{` opening the body of `fused`".into()));
            };
            return Ok(Some(OpenBody {
                name: name.to_string(),
                line: lineno,
                op_col,
                ty_col,
                open_col,
                input_types: operands.iter().map(|&v| self.graph.value_type(v).clone()).collect(),
                operands,
                types,
                scope,
                names: HashMap::new(),
                nodes: Vec::new(),
                outputs: None,
            }));
        }
        if let Some(col) = open {
            return Err((col, format!("`{op_name}` has no body; only `fused` does")));
        }
        let op = resolve_op(&op_name, &attrs, types.first()).map_err(|(c, m)| (c.unwrap_or(op_col), m))?;
        let name_col = attrs.iter().find(|(k, _, _)| k == "name").map_or(op_col, |a| a.2);
        let n = match &op {
            Op::Input { .. } | Op::Param { .. } if !operands.is_empty() => {
                return Err((op_col, format!("`{op_name}` takes no operands")));
            }
            Op::Input { name, ty } => {
                if let Some(c) = scope_col {
                    return Err((c, "inputs have no scope".into()));
                }
                self.graph.add_input(name, ty.clone()).map_err(|e| (name_col, e.to_string()))?
            }
            Op::Param { name, ty } => {
                self.graph.add_param(name, ty.clone(), &scope).map_err(|e| (name_col, e.to_string()))?
            }
            _ => self.graph.add(op, &operands, &scope).map_err(|e| (op_col, e.to_string()))?,
        };
        self.check_types(n, &op_name, &types, ty_col)?;
        self.values.insert(name.to_string(), n);
        Ok(None)
    }

    /// The type annotation must be what the op's rule gave.
    fn check_types(&self, n: NodeId, op_name: &str, types: &[TensorType], col: usize) -> std::result::Result<(), PErr> {
        let got = &self.graph.node(n).outputs;
        if got.as_slice() != types {
            return Err((
                col,
                format!(
                    "type annotation {} disagrees with the rule of `{op_name}`, which gives {}",
                    fmt_types(types),
                    fmt_types(got)
                ),
            ));
        }
        Ok(())
    }

    /// Adds the fused node whose body just closed; errors point at its header line.
    fn close(&mut self, b: OpenBody) -> std::result::Result<(), LErr> {
        let at = |(col, msg): PErr| (b.line, col, msg);
        let body = FusedBody { inputs: b.input_types, nodes: b.nodes, outputs: b.outputs.unwrap_or_default() };
        let n = self
            .graph
            .add(Op::Fused(Box::new(body)), &b.operands, &b.scope)
            .map_err(|e| at((b.op_col, e.to_string())))?;
        self.check_types(n, "fused", &b.types, b.ty_col).map_err(at)?;
        self.values.insert(b.name, n);
        Ok(())
    }
}

impl OpenBody {
    /// One statement of the body: `%name = op…`, `yield refs` or the closing `}` (then
    /// returns true).
    fn statement(&mut self, l: &mut Line<'_>) -> std::result::Result<bool, PErr> {
        let col = l.col();
        let first = l.next().map(|t| &t.tok);
        if self.outputs.is_some() && first != Some(&Tok::Punct('}')) {
            return Err((col, "a fused body ends with `yield` and `}`; nothing may follow `yield`".into()));
        }
        match first {
            Some(Tok::Punct('}')) => {
                l.expect_end()?;
                if self.outputs.is_none() {
                    return Err((col, "expected `yield` before `}`".into()));
                }
                Ok(true)
            }
            Some(Tok::Ident(kw)) if kw == "yield" => {
                let mut outs = vec![self.fref(l)?];
                while l.eat(',') {
                    outs.push(self.fref(l)?);
                }
                l.expect_end()?;
                self.outputs = Some(outs);
                Ok(false)
            }
            Some(Tok::Ref(name, None)) => {
                self.node(l, name, col)?;
                Ok(false)
            }
            Some(Tok::Ref(name, Some(k))) => {
                Err((col, format!("`%{name}.{k}` names an output; define the node as `%{name}`")))
            }
            _ => Err((col, "expected `%name = op…`, `yield` or `}` in a fused body".into())),
        }
    }

    /// A value of the body: `$i` (input `i`) or `%name` / `%name.k` (a body node).
    fn fref(&self, l: &mut Line<'_>) -> std::result::Result<FusedRef, PErr> {
        let col = l.col();
        match l.next().map(|t| &t.tok) {
            Some(Tok::Input(i)) => match u16::try_from(*i) {
                Ok(i16) if (*i as usize) < self.input_types.len() => Ok(FusedRef::Input(i16)),
                _ => Err((col, format!("`${i}`: the fused node has {} input(s)", self.input_types.len()))),
            },
            Some(Tok::Ref(name, k)) => {
                let Some(&n) = self.names.get(name) else {
                    return Err((
                        col,
                        format!("undefined value `%{name}` in the fused body (the group's inputs are `$0`, `$1`, …)"),
                    ));
                };
                let outs = self.nodes[n as usize].outputs.len();
                let k = k.unwrap_or(0);
                match u8::try_from(k) {
                    Ok(k8) if (k as usize) < outs => Ok(FusedRef::Node { node: n, output: k8 }),
                    _ => Err((col, format!("`%{name}` has {outs} output(s), there is no output {k}"))),
                }
            }
            _ => Err((col, format!("expected a body value such as `$0` or `%3`, found {}", describe_opt(l, col)))),
        }
    }

    fn ty(&self, r: FusedRef) -> TensorType {
        match r {
            FusedRef::Input(i) => self.input_types[i as usize].clone(),
            FusedRef::Node { node, output } => self.nodes[node as usize].outputs[output as usize].clone(),
        }
    }

    fn node(&mut self, l: &mut Line<'_>, name: &str, def_col: usize) -> std::result::Result<(), PErr> {
        if self.names.contains_key(name) {
            return Err((def_col, format!("value `%{name}` is defined twice")));
        }
        if self.nodes.len() >= u16::MAX as usize {
            return Err((def_col, "a fused body has too many nodes".into()));
        }
        l.expect('=')?;
        let line = op_line(l, |l| self.fref(l))?;
        if let Some(col) = line.scope_col {
            return Err((col, "nodes of a fused body have no scope (the fused node has one)".into()));
        }
        if line.op_name == "fused" || line.open.is_some() {
            return Err((line.op_col, "fused groups do not nest".into()));
        }
        let op = resolve_op(&line.op_name, &line.attrs, line.types.first())
            .map_err(|(c, m)| (c.unwrap_or(line.op_col), m))?;
        if op.is_source() {
            return Err((line.op_col, format!("`{}` cannot be inside a fused body", line.op_name)));
        }
        let in_types: Vec<TensorType> = line.operands.iter().map(|&r| self.ty(r)).collect();
        let outputs = op.infer(&in_types).map_err(|e| (line.op_col, e.to_string()))?;
        if outputs.as_slice() != line.types.as_slice() {
            return Err((
                line.ty_col,
                format!(
                    "type annotation {} disagrees with the rule of `{}`, which gives {}",
                    fmt_types(&line.types),
                    line.op_name,
                    fmt_types(&outputs)
                ),
            ));
        }
        self.names.insert(name.to_string(), self.nodes.len() as u16);
        self.nodes.push(FusedNode { op, operands: line.operands.into_iter().collect(), outputs });
        Ok(())
    }
}

fn describe_opt(l: &Line<'_>, col: usize) -> String {
    // The token just consumed (if any) sits at `col`.
    l.toks.iter().find(|t| t.col == col).map_or("the end of the line".into(), |t| describe(&t.tok))
}

/// Rebuilds the op with [`Op::from_parts`], trying the attribute interpretations in
/// preference order until the op accepts one combination. On failure the error is the
/// one for the preferred interpretation (or a value's own error, at its column).
fn resolve_op(
    name: &str,
    attrs: &[(String, Cands, usize)],
    out: Option<&TensorType>,
) -> std::result::Result<Op, (Option<usize>, String)> {
    if let Some((_, c, _)) = attrs.iter().find(|(_, c, _)| c.list.is_empty()) {
        let (col, msg) = c.err.clone().unwrap_or((0, "cannot read this value".into()));
        return Err((Some(col), msg));
    }
    let total = attrs.iter().try_fold(1usize, |acc, (_, c, _)| acc.checked_mul(c.list.len()));
    let combos = match total {
        Some(t) if t <= COMBO_LIMIT => t,
        _ => 1,
    };
    let mut first_err = None;
    let mut idx = vec![0usize; attrs.len()];
    for _ in 0..combos {
        let parts: Vec<(String, Attr)> = attrs
            .iter()
            .zip(&idx)
            .filter_map(|((k, c, _), &i)| c.list.get(i).map(|a| (k.clone(), a.clone())))
            .collect();
        match Op::from_parts(name, &parts, out) {
            Ok(op) => return Ok(op),
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
        // Next combination (first attribute fastest).
        for (i, (_, c, _)) in idx.iter_mut().zip(attrs) {
            *i += 1;
            if *i < c.list.len() {
                break;
            }
            *i = 0;
        }
    }
    let first_err = first_err.unwrap_or_else(|| format!("cannot build `{name}`"));
    // A value that could not be read in one of its forms explains the failure better,
    // when the op's complaint is about that attribute.
    for (key, c, _) in attrs {
        if let Some((col, msg)) = &c.err {
            if first_err.contains(&format!("`{key}`")) {
                return Err((Some(*col), msg.clone()));
            }
        }
    }
    Err((None, first_err))
}
