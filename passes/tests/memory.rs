use kiln_graph::{Graph, TensorExt, Tracer};
use kiln_ops::{Bindings, DType, Dim, Sym};
use kiln_passes::memory::{check, plan, plan_with_reads, view_root, PlanOptions};
use proptest::prelude::*;

fn chain() -> Graph {
    // x -> exp -> neg -> exp (output): two planned intermediates of 4*64 = 256 bytes.
    let tr = Tracer::new();
    let x = tr.input("x", DType::F32, [64usize]).unwrap();
    let y = x.exp().unwrap().neg().unwrap().exp().unwrap();
    tr.output("y", y).unwrap();
    tr.finish().unwrap()
}

#[test]
fn in_place_reuse_halves_a_chain() {
    let g = chain();
    let b = Bindings::new();
    let p = plan(&g, &b, PlanOptions { alignment: 256, in_place: true }).unwrap();
    assert_eq!(p.naive_bytes, 512);
    assert_eq!(p.arena_bytes, 256, "neg writes over exp's buffer");
    check(&g, &p).unwrap();
    let q = plan(&g, &b, PlanOptions { alignment: 256, in_place: false }).unwrap();
    assert_eq!(q.arena_bytes, 512, "both live at neg's step");
    check(&g, &q).unwrap();
}

#[test]
fn buffers_are_reused_after_they_die() {
    // a = exp(x); b = sin(a); c = cos(b); d = tanh(c) (out); no in-place: a and c can share.
    let tr = Tracer::new();
    let x = tr.input("x", DType::F32, [64usize]).unwrap();
    let y = x.exp().unwrap().sin().unwrap().cos().unwrap().tanh().unwrap();
    tr.output("y", y).unwrap();
    let g = tr.finish().unwrap();
    let p = plan(&g, &Bindings::new(), PlanOptions { alignment: 256, in_place: false }).unwrap();
    assert_eq!((p.naive_bytes, p.arena_bytes), (768, 512));
    check(&g, &p).unwrap();
}

/// A read beyond the graph's operands (a kernel of the last node that also reads `a`,
/// as fused decode attention reads its producers' inputs) keeps `a` live through that
/// node: without it `a`'s bytes go to a later value, with it they are nobody else's.
#[test]
fn extra_reads_keep_a_value_live() {
    // a = exp(x); b = sin(a); c = cos(b); d = tanh(c) (out); no in-place.
    let tr = Tracer::new();
    let x = tr.input("x", DType::F32, [64usize]).unwrap();
    let a = x.exp().unwrap();
    let an = a.value();
    let d = a.sin().unwrap().cos().unwrap().tanh().unwrap();
    tr.output("y", d).unwrap();
    let g = tr.finish().unwrap();
    let order = g.topo_order();
    let cn = *order.iter().rev().nth(1).unwrap();
    let overlaps = |p: &kiln_passes::memory::MemoryPlan| {
        let pa = &p.allocations[&view_root(&g, an)];
        let pc = &p.allocations[&kiln_graph::Value::new(cn, 0)];
        pa.offset < pc.offset + pc.size && pc.offset < pa.offset + pa.size
    };
    let opts = PlanOptions { alignment: 256, in_place: false };
    let p = plan(&g, &Bindings::new(), opts).unwrap();
    assert!(overlaps(&p), "c reuses a's bytes when nothing reads a after b");
    let q = plan_with_reads(&g, &Bindings::new(), opts, &[(an, cn)]).unwrap();
    assert!(!overlaps(&q), "a is live through c's node");
    assert_eq!(q.arena_bytes, 768);
    check(&g, &q).unwrap();
}

#[test]
fn symbolic_sizes_use_the_bindings_and_unbound_symbols_are_errors() {
    let tr = Tracer::new();
    let x = tr.input("x", DType::F16, [Dim::sym("seq"), Dim::fixed(8)]).unwrap();
    tr.output("y", x.exp().unwrap().neg().unwrap()).unwrap();
    let g = tr.finish().unwrap();
    let mut b = Bindings::new();
    b.insert(Sym::new("seq"), 100);
    let p = plan(&g, &b, PlanOptions { alignment: 1, in_place: true }).unwrap();
    assert_eq!(p.naive_bytes, 1600);
    let err = plan(&g, &Bindings::new(), PlanOptions::default()).unwrap_err();
    assert_eq!(err.to_string(), "cannot size `%1`: symbol `seq` has no value");
}

#[test]
fn checker_rejects_overlapping_live_buffers() {
    let tr = Tracer::new();
    let x = tr.input("x", DType::F32, [64usize]).unwrap();
    let a = x.exp().unwrap();
    let b = x.sin().unwrap();
    tr.output("y", (a + b).unwrap()).unwrap();
    let g = tr.finish().unwrap();
    let mut p = plan(&g, &Bindings::new(), PlanOptions::default()).unwrap();
    check(&g, &p).unwrap();
    for a in p.allocations.values_mut() {
        a.offset = 0; // exp and sin are both live at add: must not share
    }
    assert!(check(&g, &p).unwrap_err().contains("overlap while both live"));
}

/// A random graph of elementwise, reduce, movement and matmul ops over `[seq, 8]`.
fn random_graph(steps: &[(u8, usize, usize)]) -> Graph {
    let tr = Tracer::new();
    let x = tr.input("x", DType::F32, [Dim::sym("seq"), Dim::fixed(8)]).unwrap();
    let w = tr.param("w", DType::F32, [8usize, 8]).unwrap();
    let mut pool = vec![x];
    for &(kind, i, j) in steps {
        let a = pool[i % pool.len()];
        let b = pool[j % pool.len()];
        let v = match kind % 6 {
            0 => a.exp().unwrap(),
            1 => (a + b).unwrap(),
            2 => (a * b).unwrap(),
            3 => a.sum(&[-1], true).unwrap().broadcast_to(&a.shape()).unwrap(),
            4 => a.matmul(w).unwrap(),
            _ => a.softmax(-1).unwrap(),
        };
        pool.push(v);
    }
    let last = *pool.last().unwrap();
    tr.output("y", last).unwrap();
    if pool.len() > 3 {
        tr.output("z", pool[pool.len() / 2]).unwrap();
    }
    tr.finish().unwrap()
}

proptest! {
    #[test]
    fn random_plans_are_sound(steps in prop::collection::vec((any::<u8>(), any::<usize>(), any::<usize>()), 1..40),
                              seq in 1usize..33, in_place in any::<bool>()) {
        let g = random_graph(&steps);
        let mut b = Bindings::new();
        b.insert(Sym::new("seq"), seq);
        let p = plan(&g, &b, PlanOptions { alignment: 64, in_place }).unwrap();
        prop_assert!(p.arena_bytes <= p.naive_bytes);
        prop_assert_eq!(check(&g, &p), Ok(()));
    }
}

#[test]
fn reshape_views_share_their_root_and_keep_it_live() {
    // a = exp(x); v = reshape(a); b = sin(x); c = v + reshape(b) … a must stay live until
    // the add that reads its view, so a and b cannot share a buffer.
    let tr = Tracer::new();
    let x = tr.input("x", DType::F32, [64usize]).unwrap();
    let a = x.exp().unwrap();
    let v = a.reshape([8usize, 8]).unwrap();
    let b = x.sin().unwrap().reshape([8usize, 8]).unwrap();
    let c = (v + b).unwrap().tanh().unwrap();
    tr.output("y", c).unwrap();
    let g = tr.finish().unwrap();
    let p = plan(&g, &Bindings::new(), PlanOptions { alignment: 256, in_place: false }).unwrap();
    check(&g, &p).unwrap();
    assert_eq!(p.views.len(), 2);
    let (va, ra) = p.views.iter().find(|(_, r)| g.node(r.node).op.name() == "exp").unwrap();
    assert!(!p.allocations.contains_key(va), "a view has no buffer of its own");
    let rb = p.views.values().find(|r| g.node(r.node).op.name() == "sin").unwrap();
    let (oa, ob) = (p.allocations[ra].offset, p.allocations[rb].offset);
    assert_ne!(oa, ob, "exp's buffer is still live (through its view) when sin writes");
    // exp, sin, add: three 256-byte buffers at most; add can reuse nothing live.
    assert_eq!(p.naive_bytes, 768);
    assert_eq!(p.arena_bytes, 768);
}
