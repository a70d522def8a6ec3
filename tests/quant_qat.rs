//! `convert` on real PyTorch QAT exports (tools/export_qat_model.py): eager-mode QAT with the
//! x86 per-channel qconfig, exported by torch.onnx (TorchScript, opset 13).
//! - qat_convbn_folded: fused ConvBnReLU2d, exported as
//!   `Q/DQ(w) -> Conv -> Div -> Add -> BatchNormalization -> Relu -> Q -> Clip -> DQ`;
//! - qat_bn_left_in: Conv and BN not fused, `DQ(w, axis 0) -> Conv -> BatchNormalization -> Relu -> Q`.
//!
//! In both the weights are float initializers quantized in the graph, zero points reach their
//! Q/DQ through the exporter's Identity nodes, and every activation Q is followed by the
//! `Clip(max 127)` of reduce_range. The references are the QDQ models' own outputs in
//! onnxruntime with graph optimizations disabled.

mod common;

use common::*;
use qfold::graph::Graph;
use qfold::onnx::{ElemType, Model, TensorData};
use qfold::quant::qoperator::{convert, ConvertReport};
use qfold::runtime::Runner;
use qfold::verify::{random_cases, Case, Comparer, Criterion};
use std::collections::HashMap;

const CASES: [&str; 2] = ["qat_convbn_folded", "qat_bn_left_in"];
const RANDOM_BATCHES: usize = 32;

fn sqnr(reference: &[TensorData], actual: &[TensorData]) -> f64 {
    compare(reference, actual, Criterion::MinSqnr { db: 0.0 }).outputs[0]
        .sqnr_db
        .unwrap_or(f64::INFINITY)
}

/// Largest difference between two outputs in units of `step`.
fn steps(a: &TensorData, b: &TensorData, step: f64) -> f64 {
    let (a, b) = (a.to_f64(), b.to_f64());
    assert_eq!(a.shape(), b.shape());
    a.iter()
        .zip(b.iter())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
        / step
}

/// The scale of the DequantizeLinear producing the graph's output: one output step.
fn output_step(m: &Model) -> f64 {
    let g = Graph::of_model(m);
    let out = &m.graph().output[0].name;
    let dq = g.node(g.producer(out).expect("output has a producer"));
    assert_eq!(dq.op_type, "DequantizeLinear", "the output is dequantized");
    let s = constant(m, &dq.input[1]);
    assert_eq!(s.len(), 1, "per-tensor output scale");
    s.to_f64().iter().copied().next().unwrap()
}

/// A constant by name, looking through Identity (the exporter's deduplicated initializers).
fn constant(m: &Model, name: &str) -> TensorData {
    let g = Graph::of_model(m);
    let mut name = name.to_string();
    loop {
        if let Some(t) = g.constant(&name).unwrap() {
            return t;
        }
        let p = g.node(g.producer(&name).expect("constant or Identity"));
        assert_eq!(p.op_type, "Identity", "{name} is not a constant");
        name = p.input[0].clone();
    }
}

/// The 8-bit activations of the QDQ graph: every `QuantizeLinear -> Clip` output (reduce_range).
/// The converted graph keeps these names: QLinearConv takes over the Q's output.
fn eight_bit_values(m: &Model) -> Vec<String> {
    let g = Graph::of_model(m);
    m.graph()
        .node
        .iter()
        .filter(|n| n.op_type == "Clip")
        .filter(|n| {
            g.producer(&n.input[0])
                .is_some_and(|p| g.node(p).op_type == "QuantizeLinear")
        })
        .map(|n| n.output[0].clone())
        .collect()
}

/// Graph output then `extra` values, in tract.
fn run_with(m: &Model, case: &Case, extra: &[String]) -> Vec<TensorData> {
    let r = Runner::new(m, &case.inputs, extra).expect("tract loads the model");
    r.run(&case.inputs).expect("tract runs the model")
}

fn names_of(m: &Model, op: &str) -> Vec<String> {
    m.graph()
        .node
        .iter()
        .filter(|n| n.op_type == op)
        .map(|n| n.name.clone())
        .collect()
}

fn rule_count(r: &ConvertReport, rule: &str) -> usize {
    r.converted.iter().filter(|(k, _)| k == rule).count()
}

#[test]
fn exports_have_the_documented_structure() {
    for case in CASES {
        let rc = load_case(case);
        let m = &rc.model;
        let g = Graph::of_model(m);
        assert_eq!(count(m, "BatchNormalization"), 2, "{case}");
        assert_eq!(count(m, "Conv"), 2, "{case}");
        assert_eq!(count(m, "Gemm"), 1, "{case}");
        for (i, n) in m.graph().node.iter().enumerate() {
            if n.op_type != "Conv" {
                continue;
            }
            // weight: float initializer -> QuantizeLinear -> DequantizeLinear(axis 0, per channel)
            let dq = g.node(g.producer(&n.input[1]).unwrap());
            assert_eq!(dq.op_type, "DequantizeLinear", "{case} {}", n.name);
            let axis = dq.attribute.iter().find(|a| a.name == "axis").map(|a| a.i);
            assert_eq!(axis, Some(0), "{case} {}", n.name);
            assert_eq!(constant(m, &dq.input[1]).len(), 8, "{case}: per-channel");
            let zp = constant(m, &dq.input[2]);
            assert_eq!(zp.elem_type(), ElemType::I8);
            assert!(zp.to_f64().iter().all(|&z| z == 0.0), "{case}: symmetric");
            let q = g.node(g.producer(&dq.input[0]).unwrap());
            assert_eq!(
                q.op_type, "QuantizeLinear",
                "{case}: weight quantized in the graph"
            );
            assert_eq!(constant(m, &q.input[0]).elem_type(), ElemType::F32);
            let readers: Vec<&str> = g
                .consumers(&n.output[0])
                .iter()
                .map(|&c| g.node(c).op_type.as_str())
                .collect();
            let want = if case == "qat_bn_left_in" {
                "BatchNormalization"
            } else {
                "Div"
            };
            assert_eq!(readers, [want], "{case}: node {i} {}", n.name);
        }
        assert_eq!(
            rc.provenance["op_counts"]["BatchNormalization"],
            serde_json::json!(2)
        );
    }
}

#[test]
fn tract_runs_the_qdq_exports_like_onnx_runtime() {
    for case in CASES {
        let rc = load_case(case);
        let want = expected(&rc.case);
        let got = run(&rc.model, &rc.case);
        let step = output_step(&rc.model);
        let s = steps(&want[0], &got[0], step);
        eprintln!("{case}: tract QDQ vs ORT QDQ: {s} steps (step {step:.6})");
        assert!(s <= 1.0 + 1e-3, "{case}: {s} steps from ORT");
    }
}

/// Converts `case` and checks structure and numbers; returns the report.
fn convert_case(case: &str) -> ConvertReport {
    let rc = load_case(case);
    let mut q = rc.model.clone();
    let r = convert(&mut q).unwrap();
    eprintln!("{case}: before {:?}", op_counts(&rc.model));
    eprintln!("{case}: after  {:?}", op_counts(&q));
    eprintln!("{case}: converted {:?}", r.converted);
    eprintln!("{case}: float islands {:?}", r.float_islands);

    // structure: both Conv -> [Div -> Add ->] BN -> Relu -> Q became QLinearConv
    for op in [
        "Conv",
        "BatchNormalization",
        "Relu",
        "Div",
        "Add",
        "Identity",
    ] {
        assert_eq!(count(&q, op), 0, "{case}: {op} left");
    }
    assert_eq!(count(&q, "QLinearConv"), 2, "{case}");
    // one fold_qat_bn per BN, naming it (and, in the fused export, the Div and Add before it)
    assert_eq!(rule_count(&r, "fold_qat_bn"), 2, "{case}: {r:?}");
    let folded: Vec<&String> = r
        .converted
        .iter()
        .filter(|(k, _)| k == "fold_qat_bn")
        .flat_map(|(_, nodes)| nodes)
        .collect();
    for bn in names_of(&rc.model, "BatchNormalization") {
        assert!(folded.contains(&&bn), "{case}: {bn} not folded: {r:?}");
    }
    let chain = if case == "qat_convbn_folded" { 4 } else { 2 };
    for (k, nodes) in &r.converted {
        if k == "fold_qat_bn" {
            assert_eq!(nodes.len(), chain, "{case}: {nodes:?}");
        }
    }
    assert_eq!(rule_count(&r, "conv"), 2, "{case}");
    // the one inexact step is reported: -128 weights of a channel whose BN factor is negative
    if case == "qat_bn_left_in" {
        assert_eq!(r.inexact.len(), 1, "{:?}", r.inexact);
        assert!(
            r.inexact[0].contains("/conv2/Conv") && r.inexact[0].contains("channel 1: 3"),
            "{:?}",
            r.inexact
        );
    }
    // 3 weights quantized in the graph, plus the exporter's Identity nodes
    let identities = count(&rc.model, "Identity");
    assert_eq!(rule_count(&r, "constant"), 3 + identities, "{case}");
    // weights: int8 initializers with 8 per-channel scales
    let g = Graph::of_model(&q);
    for n in q.graph().node.iter().filter(|n| n.op_type == "QLinearConv") {
        assert_eq!(g.constant_type(&n.input[3]), Some(ElemType::I8), "{case}");
        assert_eq!(constant(&q, &n.input[4]).len(), 8, "{case}");
        assert_eq!(constant(&q, &n.input[8]).elem_type(), ElemType::I32);
    }
    // the classifier reads GlobalAveragePool -> Flatten in float (the exporter writes no Q
    // before it): Gemm has no quantized input and stays, as does the pool
    assert_eq!(count(&q, "Gemm"), 1, "{case}");
    let islands: Vec<&str> = r.float_islands.iter().map(|(_, op)| op.as_str()).collect();
    assert_eq!(islands, ["GlobalAveragePool", "Gemm"], "{case}");
    assert!(r.skipped.is_empty(), "{case}: {:?}", r.skipped);

    // numbers on the stored batch: against ORT's QDQ output
    let want = expected(&rc.case);
    let step = output_step(&rc.model);
    let got = run(&q, &rc.case);
    let s = steps(&want[0], &got[0], step);
    let db = sqnr(&want, &got);
    eprintln!("{case}: QOperator vs ORT QDQ, stored batch: {s} output steps, SQNR {db:.2} dB");
    assert!(
        s <= 2.0 + 1e-3,
        "{case}: {s} output steps from the QDQ model"
    );
    assert!(db > 30.0, "{case}: SQNR {db:.2} dB");

    // on random batches (standard normal, as in training), both models in tract: the output
    // and every 8-bit activation
    let acts = eight_bit_values(&rc.model);
    let mut names = vec!["output".to_string()];
    names.extend(acts.iter().cloned());
    let mut cmp = Comparer::new(&names, Criterion::MinSqnr { db: 0.0 });
    let cases = random_cases(&rc.model, RANDOM_BATCHES, 7, &HashMap::new()).unwrap();
    let mut act_steps = vec![0.0f64; acts.len()];
    for c in &cases {
        let a = run_with(&rc.model, c, &acts);
        let b = run_with(&q, c, &acts);
        for k in 0..acts.len() {
            act_steps[k] = act_steps[k].max(steps(&a[k + 1], &b[k + 1], 1.0));
        }
        cmp.add(&a, &b);
    }
    let out = &cmp.finish().outputs[0];
    let (s, db) = (out.max_abs / step, out.sqnr_db.unwrap_or(f64::INFINITY));
    eprintln!(
        "{case}: QOperator vs QDQ in tract, {RANDOM_BATCHES} random batches: {s:.3} output steps, \
         SQNR {db:.2} dB"
    );
    assert!(
        s <= 2.0 + 1e-3,
        "{case}: {s} output steps from the QDQ model"
    );
    assert!(db > 30.0, "{case}: SQNR {db:.2} dB");
    for (name, d) in acts.iter().zip(&act_steps) {
        eprintln!("{case}: 8-bit {name}: {d} steps");
        assert!(*d <= 1.0, "{case}: {name} differs by {d} steps");
    }
    r
}

#[test]
fn fused_qat_convbn_export_converts() {
    convert_case("qat_convbn_folded");
}

#[test]
fn qat_export_with_bn_left_in_converts() {
    convert_case("qat_bn_left_in");
}
