//! The conformance corpus: tract's outputs against the stored outputs of ONNX's reference
//! evaluator, the graph index on every committed model, and subgraph captures.

mod common;

use common::*;
use qfold::graph::{implicit_inputs, ConstSource, Graph};
use qfold::onnx::load;
use qfold::verify::{compare_expected, read_cases, tolerance};
use qfold::Error;

/// Cases tract 0.23.9 cannot run, with the reason and a piece of its error message. The test
/// below asserts that each still fails this way, so the list cannot go stale silently.
const TRACT_CANNOT_RUN: &[(&str, &str, &str)] = &[
    (
        "dtypes_bfloat16",
        "tract has no bfloat16 tensor type",
        "Bfloat16",
    ),
    (
        "loop_subgraph",
        "tract-onnx 0.23.9 has no Loop operator (If and Scan it has); qfold refuses it by name",
        "tract cannot run this model: tract has no Loop operator",
    ),
];

#[test]
fn every_case_tract_supports_matches_the_reference_outputs() {
    let dirs = conformance_dirs();
    assert!(dirs.len() >= 44, "{} conformance cases", dirs.len());
    let mut failures = Vec::new();
    let mut checked = 0;
    let mut elements = 0;
    for dir in &dirs {
        let name = case_name(dir);
        if TRACT_CANNOT_RUN.iter().any(|(n, _, _)| *n == name) {
            continue;
        }
        let model = load(dir.join("model.onnx")).unwrap_or_else(|e| panic!("{name}: {e}"));
        let cases = read_cases(&model, dir).unwrap_or_else(|e| panic!("{name}: {e}"));
        let sets = std::fs::read_dir(dir)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with("test_data_set_")
            })
            .count();
        assert_eq!(cases.len(), sets, "{name}: every test_data_set is read");
        match compare_expected(&model, &cases, tolerance::FLOAT) {
            Ok(c) if c.passed => {
                assert_eq!(c.samples, sets);
                assert!(c.outputs.iter().all(|o| o.elements > 0));
                elements += c.outputs.iter().map(|o| o.elements).sum::<usize>();
                checked += 1;
            }
            Ok(c) => failures.push(format!("{name}: {:?}", c.outputs)),
            Err(e) => failures.push(format!("{name}: {e}")),
        }
    }
    assert!(failures.is_empty(), "failed:\n{}", failures.join("\n"));
    assert_eq!(checked, dirs.len() - TRACT_CANNOT_RUN.len());
    assert!(elements > 1000, "{elements} output elements compared");
}

#[test]
fn cases_tract_cannot_run_fail_with_a_tract_error() {
    for (name, why, needle) in TRACT_CANNOT_RUN {
        let dir = conformance(name);
        // qfold itself reads them: it is tract that refuses.
        let model = load(dir.join("model.onnx")).unwrap();
        Graph::of_model(&model).check().unwrap();
        let cases = read_cases(&model, &dir).unwrap();
        match compare_expected(&model, &cases, tolerance::FLOAT) {
            Err(e @ (Error::Runtime { .. } | Error::Node { .. })) => {
                let msg = e.to_string();
                assert!(msg.contains(needle), "{name} ({why}): {msg}");
            }
            Err(e) => panic!("{name}: expected a tract error, got: {e}"),
            Ok(c) => panic!(
                "{name} now runs in tract (passed: {}): update the list",
                c.passed
            ),
        }
    }
}

#[test]
fn graph_check_passes_on_every_committed_model() {
    let dirs = all_case_dirs();
    for dir in &dirs {
        let name = case_name(dir);
        let model = load(dir.join("model.onnx")).unwrap();
        let g = Graph::of_model(&model);
        g.check().unwrap_or_else(|e| panic!("{name}: {e}"));
        let order = g.topo_order().unwrap();
        assert_eq!(
            order,
            (0..g.nodes().len()).collect::<Vec<_>>(),
            "{name}: stored order is topological, so it is kept"
        );
        // Every node input is produced, an input, or a constant.
        for n in g.nodes() {
            for i in n.input.iter().filter(|i| !i.is_empty()) {
                assert!(
                    g.producer(i).is_some() || g.is_input(i) || g.initializer(i).is_some(),
                    "{name}: '{i}'"
                );
            }
        }
    }
}

#[test]
fn subgraph_captures_count_as_uses_of_the_owning_node() {
    let model = load(conformance("if_subgraph").join("model.onnx")).unwrap();
    let g = Graph::of_model(&model);
    assert_eq!(g.nodes().len(), 1);
    let if_node = g.node(0);
    assert_eq!(if_node.op_type, "If");
    assert_eq!(if_node.input, ["cond"]);
    // Both branches read x and outer_w from the main graph.
    assert_eq!(implicit_inputs(if_node), ["x", "outer_w"]);
    assert_eq!(g.consumers("outer_w"), [0]);
    assert_eq!(g.consumers("x"), [0]);
    assert_eq!(g.consumers("cond"), [0]);
    assert_eq!(g.const_source("outer_w"), Some(ConstSource::Initializer(0)));
    assert_eq!(g.subgraph_count(), 2);

    let model = load(conformance("loop_subgraph").join("model.onnx")).unwrap();
    let g = Graph::of_model(&model);
    let lp = g.nodes().iter().position(|n| n.op_type == "Loop").unwrap();
    assert!(implicit_inputs(g.node(lp)).contains(&"outer_b"));
    assert_eq!(g.consumers("outer_b"), [lp]);
    assert_eq!(g.subgraph_count(), 1);
}

#[test]
fn constant_nodes_count_as_constants() {
    let model = load(conformance("constant_nodes").join("model.onnx")).unwrap();
    let g = Graph::of_model(&model);
    assert!(g.proto().initializer.is_empty());
    let conv = g.nodes().iter().position(|n| n.op_type == "Conv").unwrap();
    let w = &g.node(conv).input[1];
    let Some(ConstSource::ConstantNode(p)) = g.const_source(w) else {
        panic!("Conv weight '{w}' is not a Constant node");
    };
    assert_eq!(g.node(p).op_type, "Constant");
    let value = g.constant(w).unwrap().unwrap();
    assert_eq!(value.shape().len(), 4);
    // The graph input is not a constant.
    let x = &g.real_inputs()[0].name;
    assert_eq!(g.const_source(x), None);

    let model = load(conformance("constant_attr_forms").join("model.onnx")).unwrap();
    let g = Graph::of_model(&model);
    let mut forms = Vec::new();
    for (i, n) in g.nodes().iter().enumerate() {
        if n.op_type == "Constant" {
            assert_eq!(
                g.const_source(&n.output[0]),
                Some(ConstSource::ConstantNode(i))
            );
            let v = g.constant(&n.output[0]).unwrap().unwrap();
            forms.push((n.attribute[0].name.clone(), v.shape().to_vec()));
        }
    }
    forms.sort();
    assert!(forms
        .iter()
        .any(|(a, s)| a == "value_float" && s.is_empty()));
    assert!(forms
        .iter()
        .any(|(a, s)| a == "value_floats" && s.len() == 1));
    assert!(forms.iter().any(|(a, s)| a == "value_ints" && s == &[2]));
}
