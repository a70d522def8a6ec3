//! `Patch`: validate everything, then apply; a refused patch leaves the graph untouched. A
//! valid one re-sorts the nodes and sweeps what nothing uses. `Names::fresh` is deterministic.

mod common;

use common::*;
use qfold::graph::{Graph, Names, Patch};
use qfold::onnx::proto::{GraphProto, NodeProto, ValueInfoProto};
use qfold::onnx::{load, TensorData};

/// `constant_nodes` with names: six Constant nodes (`k_w`, `k_b`, `k_s`, `k_bb`, `k_mean`,
/// `k_var`), then `conv` (x, w, b -> c), `bn` (c, ... -> n), `relu` (n -> y); value_info for
/// c and n.
fn chain() -> GraphProto {
    let model = load(conformance("constant_nodes").join("model.onnx")).unwrap();
    let mut g = model.graph().clone();
    let names = [
        "k_w", "k_b", "k_s", "k_bb", "k_mean", "k_var", "conv", "bn", "relu",
    ];
    for (n, name) in g.node.iter_mut().zip(names) {
        n.name = name.into();
    }
    for v in ["c", "n"] {
        let mut vi = ValueInfoProto::new();
        vi.name = v.into();
        g.value_info.push(vi);
    }
    Graph::new(&g).check().unwrap();
    g
}

fn node(name: &str, op: &str, inputs: &[&str], outputs: &[&str]) -> NodeProto {
    let mut n = NodeProto::new();
    n.name = name.into();
    n.op_type = op.into();
    n.input = inputs.iter().map(|s| s.to_string()).collect();
    n.output = outputs.iter().map(|s| s.to_string()).collect();
    n
}

fn index(g: &GraphProto, name: &str) -> usize {
    g.node.iter().position(|n| n.name == name).unwrap()
}

/// Applies `p` to a copy of `g`, expects a refusal naming every `needles`, and checks the copy
/// is unchanged.
fn refused(g: &GraphProto, p: Patch, needles: &[&str]) {
    let mut h = g.clone();
    let e = p.apply(&mut h).unwrap_err().to_string();
    for n in needles {
        assert!(e.contains(n), "'{n}' not in: {e}");
    }
    assert_eq!(&h, g, "a refused patch changed the graph ({e})");
}

#[test]
fn dangling_input_is_refused() {
    let g = chain();
    let mut p = Patch::new("dangle");
    p.replace_node(index(&g, "relu"), node("relu", "Relu", &["ghost"], &["y"]));
    refused(&g, p, &["dangle", "relu", "ghost"]);
}

#[test]
fn duplicate_producer_is_refused() {
    let g = chain();
    let mut p = Patch::new("dup");
    p.add_node(node("relu2", "Relu", &["c"], &["n"]));
    refused(&g, p, &["'n'", "bn", "relu2"]);
    // Producing a graph input or an initializer name is a second producer too.
    let mut p = Patch::new("dup-input");
    p.add_node(node("shadow", "Relu", &["c"], &["x"]));
    refused(&g, p, &["'x'", "shadow"]);
}

#[test]
fn cycle_is_refused() {
    let g = chain();
    let mut p = Patch::new("loop");
    // conv now reads relu's output: conv -> bn -> relu -> conv.
    p.replace_node(
        index(&g, "conv"),
        node("conv", "Conv", &["y", "w", "b"], &["c"]),
    );
    refused(&g, p, &["cycle"]);
}

#[test]
fn removing_a_graph_output_is_refused() {
    let g = chain();
    let mut p = Patch::new("drop-output");
    p.remove_node(index(&g, "relu"));
    refused(&g, p, &["graph output 'y'"]);
}

#[test]
fn duplicate_initializer_and_node_names_are_refused() {
    let model = load(conformance("conv2d_basic").join("model.onnx")).unwrap();
    let g = model.graph().clone();
    let one = TensorData::F32(ndarray::ArrayD::zeros(ndarray::IxDyn(&[1])));
    let mut p = Patch::new("dup-init");
    p.add_initializer(one.to_proto("w"));
    refused(&g, p, &["initializer name 'w'"]);
    // An initializer named like a node output.
    let mut p = Patch::new("dup-init-output");
    p.add_initializer(one.to_proto("y"));
    refused(&g, p, &["initializer name 'y'"]);

    let g = chain();
    let mut p = Patch::new("dup-node");
    p.add_node(node("bn", "Relu", &["y"], &["z"]));
    refused(&g, p, &["two nodes would be named 'bn'"]);
    let mut p = Patch::new("both");
    p.remove_node(0)
        .replace_node(0, node("k_w", "Identity", &["x"], &["w"]));
    refused(&g, p, &["both removed and replaced"]);
    let mut p = Patch::new("range");
    p.remove_node(99);
    refused(&g, p, &["99"]);
}

#[test]
fn valid_patch_removes_bn_and_sweeps_its_constants_and_value_info() {
    let mut g = chain();
    let mut p = Patch::new("drop bn");
    p.remove_node(index(&g, "bn"))
        .replace_node(index(&g, "relu"), node("relu", "Relu", &["c"], &["y"]));
    p.apply(&mut g).unwrap();
    let names: Vec<&str> = g.node.iter().map(|n| n.name.as_str()).collect();
    // The four BN parameter Constants went with BN; value_info of the removed value too.
    assert_eq!(names, ["k_w", "k_b", "conv", "relu"]);
    let vi: Vec<&str> = g.value_info.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(vi, ["c"]);
    Graph::new(&g).check().unwrap();
}

#[test]
fn valid_patch_is_sorted_and_unused_initializers_are_swept() {
    let model = load(conformance("conv2d_basic").join("model.onnx")).unwrap();
    let mut g = model.graph().clone();
    g.node[0].name = "conv".into();
    let w = TensorData::from_proto(&g.initializer[0]).unwrap();
    let doubled = match w {
        TensorData::F32(a) => TensorData::F32(a.mapv(|v| 2.0 * v)),
        other => panic!("{other:?}"),
    };
    let mut p = Patch::new("pre-relu and new weight");
    // Added nodes go to the end of the list; the sort must put `pre` before `conv`.
    p.add_node(node("pre", "Relu", &["x"], &["x_relu"]))
        .replace_node(0, node("conv", "Conv", &["x_relu", "w2", "b"], &["y"]))
        .add_initializer(doubled.to_proto("w2"));
    p.apply(&mut g).unwrap();
    let names: Vec<&str> = g.node.iter().map(|n| n.name.as_str()).collect();
    assert_eq!(names, ["pre", "conv"]);
    let inits: Vec<&str> = g.initializer.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(inits, ["b", "w2"], "the old weight 'w' is swept");
    Graph::new(&g).check().unwrap();
}

#[test]
fn sweep_keeps_initializers_read_only_inside_subgraphs() {
    let model = load(conformance("if_subgraph").join("model.onnx")).unwrap();
    let mut g = model.graph().clone();
    let mut p = Patch::new("add identity");
    p.add_node(node("copy", "Identity", &["x"], &["x_copy"]));
    p.apply(&mut g).unwrap();
    assert_eq!(g.node.len(), 2);
    let inits: Vec<&str> = g.initializer.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(inits, ["outer_w"]);
}

#[test]
fn check_finds_a_dangling_read_inside_a_subgraph() {
    let model = load(conformance("if_subgraph").join("model.onnx")).unwrap();
    let mut g = model.graph().clone();
    let then = g.node[0]
        .attribute
        .iter_mut()
        .find(|a| a.name == "then_branch")
        .unwrap();
    then.g.as_mut().unwrap().node[0].input[1] = "ghost".into();
    let e = Graph::new(&g).check().unwrap_err().to_string();
    assert!(e.contains("ghost"), "{e}");
}

#[test]
fn fresh_names_are_deterministic_and_avoid_collisions() {
    let g = chain();
    let run = || {
        let mut names = Names::new(&g);
        vec![
            names.fresh("conv"),
            names.fresh("conv"),
            names.fresh("n"),
            names.fresh("k_w"),
            names.fresh("fused"),
            names.fresh("fused"),
            names.fresh(""),
        ]
    };
    let a = run();
    assert_eq!(
        a,
        ["conv_1", "conv_2", "n_1", "k_w_1", "fused", "fused_1", "_1"]
    );
    assert_eq!(run(), a);
    // A name made by appending a suffix can itself be taken.
    let mut g2 = g.clone();
    g2.node[6].output[0] = "conv_1".into();
    g2.node[7].input[0] = "conv_1".into();
    let mut names = Names::new(&g2);
    assert_eq!(names.fresh("conv"), "conv_2");
    // Names inside subgraphs count as used.
    let model = load(conformance("if_subgraph").join("model.onnx")).unwrap();
    let mut names = Names::new(model.graph());
    assert!(names.is_used("then_out"));
    assert_eq!(names.fresh("then_out"), "then_out_1");
}
