//! `qfold inspect` and `qfold check` through the binary: reports with real numbers, JSON that
//! parses, and the exit codes 0 (pass), 1 (a check failed), 2 (usage or input error).

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::*;
use qfold::onnx::{load, save, SaveOptions, TensorData};
use serde_json::Value;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn model(case: &str) -> String {
    s(&conformance(case).join("model.onnx")).to_string()
}

/// Runs qfold, asserts the exit code, returns stdout.
fn run(args: &[&str], code: i32) -> String {
    let out = qfold(args);
    let (stdout, stderr) = texts(&out);
    assert_eq!(
        out.status.code(),
        Some(code),
        "{args:?}\nstdout: {stdout}\nstderr: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    stdout
}

fn json(args: &[&str], code: i32) -> Value {
    let out = run(args, code);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}\n{out}"))
}

#[test]
fn inspect_text_reports_counts_and_bytes() {
    let out = run(&["inspect", &model("external_data")], 0);
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines.contains(&"  ir_version 8, opsets ai.onnx 13"),
        "{out}"
    );
    assert!(
        lines.contains(&"  producer qfold tools/make_conformance.py"),
        "{out}"
    );
    assert!(lines.contains(&"  x float [1, 2, 5, 5]"), "{out}");
    assert!(lines.contains(&"  y float [1, 4]"), "{out}");
    assert!(
        lines.contains(&"nodes 3 (0 subgraphs, 0 functions)"),
        "{out}"
    );
    // The op histogram: the lines right after "nodes ...".
    let at = lines.iter().position(|l| l.starts_with("nodes ")).unwrap();
    let hist: BTreeMap<&str, usize> = lines[at + 1..]
        .iter()
        .take_while(|l| l.starts_with("  "))
        .map(|l| {
            let mut w = l.split_whitespace();
            (w.next().unwrap(), w.next().unwrap().parse().unwrap())
        })
        .collect();
    assert_eq!(
        hist,
        BTreeMap::from([("Conv", 1), ("Flatten", 1), ("Gemm", 1)])
    );
    // w 216 + b 12 + gw 1200 + gc 16 bytes, all in weights.bin.
    assert!(
        lines.contains(&"initializers 4 (1444 bytes), 4 external (1444 bytes); 0 Constant nodes"),
        "{out}"
    );
}

#[test]
fn inspect_json_has_the_same_numbers() {
    let v = json(&["inspect", &model("external_data"), "--json"], 0);
    assert_eq!(v["ir_version"], 8);
    assert_eq!(v["schema"], "qfold.inspect/1");
    assert_eq!(
        v["opsets"],
        serde_json::json!([{"domain": "ai.onnx", "version": 13}])
    );
    assert_eq!(v["nodes"], 3);
    assert_eq!(
        v["op_types"],
        serde_json::json!({"Conv": 1, "Flatten": 1, "Gemm": 1})
    );
    assert_eq!(v["initializers"], 4);
    assert_eq!(v["initializer_bytes"], 1444);
    assert_eq!(v["external_initializers"], 4);
    assert_eq!(v["external_bytes"], 1444);
    assert_eq!(v["inputs"][0]["name"], "x");
    assert_eq!(
        v["inputs"][0]["shape"],
        serde_json::json!(["1", "2", "5", "5"])
    );
    assert_eq!(v["outputs"][0]["shape"], serde_json::json!(["1", "4"]));

    let v = json(&["inspect", &model("if_subgraph"), "--json"], 0);
    assert_eq!(v["subgraphs"], 2);
    assert_eq!(v["op_types"], serde_json::json!({"If": 1}));
    assert_eq!(v["inputs"].as_array().unwrap().len(), 2);
    assert_eq!(v["inputs"][1]["elem_type"], "bool");
    assert_eq!(v["inputs"][1]["shape"], serde_json::json!([]));

    let v = json(&["inspect", &model("constant_nodes"), "--json"], 0);
    assert_eq!(v["constant_nodes"], 6);
    assert_eq!(v["initializers"], 0);
    assert_eq!(v["nodes"], 9);
    assert_eq!(v["external_bytes"], 0);
}

#[test]
fn inspect_counts_typed_field_bytes_like_the_decoded_tensors() {
    let path = model("external_data_typed");
    let m = load(&path).unwrap();
    let expected: usize = m
        .graph()
        .initializer
        .iter()
        .map(|t| {
            let d = TensorData::from_proto(t).unwrap();
            d.len() * d.elem_type().size()
        })
        .sum();
    assert!(expected > 0);
    let v = json(&["inspect", &path, "--json"], 0);
    assert_eq!(v["initializer_bytes"], expected);
    assert_eq!(v["initializers"], m.graph().initializer.len());
    assert_eq!(v["external_initializers"], 0);
}

#[test]
fn check_a_model_against_itself_on_random_inputs() {
    let m = model("conv2d_group");
    let out = run(&["check", &m, &m, "--random", "3"], 0);
    assert!(out.starts_with("3 samples"), "{out}");
    assert!(out.trim_end().ends_with("PASS"), "{out}");
    let v = json(&["check", &m, &m, "--random", "3", "--json"], 0);
    assert_eq!(v["samples"], 3);
    assert_eq!(v["passed"], true);
    let o = &v["outputs"][0];
    assert_eq!(o["name"], "y");
    assert_eq!(o["max_abs"], 0.0);
    assert_eq!(o["cosine"], 1.0);
    assert_eq!(
        o["sqnr_db"],
        Value::Null,
        "identical outputs: infinite SQNR"
    );
    assert_eq!(o["violations"], 0);
    assert!(o["elements"].as_u64().unwrap() > 0);
}

#[test]
fn check_a_model_against_its_expected_outputs() {
    let dir = conformance("conv2d_basic");
    let out = run(&["check", &model("conv2d_basic"), "--inputs", s(&dir)], 0);
    assert!(out.starts_with("1 samples"), "{out}");
    assert!(out.contains("  y "), "{out}");
    // A folder of test_data_set_N: if_subgraph has two, one per branch.
    let v = json(
        &[
            "check",
            &model("if_subgraph"),
            "--inputs",
            s(&conformance("if_subgraph")),
            "--json",
        ],
        0,
    );
    assert_eq!(v["samples"], 2);
    // One test_data_set folder directly.
    run(
        &[
            "check",
            &model("if_subgraph"),
            "--inputs",
            s(&conformance("if_subgraph").join("test_data_set_1")),
        ],
        0,
    );
}

#[test]
fn an_altered_expected_output_fails_with_exit_1() {
    let tmp = TempDir::new("cli-altered");
    copy_dir(&conformance("conv2d_basic"), tmp.path());
    let pb = tmp.join("test_data_set_0").join("output_0.pb");
    let (name, y) = qfold::verify::read_tensor_pb(&pb).unwrap();
    let TensorData::F32(mut a) = y else {
        panic!("float output")
    };
    let first = a.iter_mut().next().unwrap();
    *first += 0.5;
    write_proto(&TensorData::F32(a).to_proto(&name), &pb);

    let m = s(&tmp.join("model.onnx")).to_string();
    let out = run(&["check", &m, "--inputs", s(tmp.path())], 1);
    assert!(out.contains("FAIL (1 elements out of tolerance)"), "{out}");
    assert!(out.trim_end().ends_with("FAIL"), "{out}");
    let v = json(&["check", &m, "--inputs", s(tmp.path()), "--json"], 1);
    assert_eq!(v["passed"], false);
    let o = &v["outputs"][0];
    assert_eq!(o["violations"], 1);
    let max_abs = o["max_abs"].as_f64().unwrap();
    assert!((max_abs - 0.5).abs() < 1e-6, "{max_abs}");
    // A loose enough tolerance accepts it.
    run(
        &["check", &m, "--inputs", s(tmp.path()), "--atol", "0.6"],
        0,
    );
}

#[test]
fn min_sqnr_passes_and_fails_on_the_threshold() {
    // B = A with weight and bias scaled by 1.001: every output is scaled by 1.001, so the
    // error is 1e-3 of the reference and the SQNR is 60 dB.
    let tmp = TempDir::new("cli-sqnr");
    let mut b = load(conformance("conv2d_basic").join("model.onnx")).unwrap();
    for t in &mut b.graph_mut().initializer {
        let TensorData::F32(a) = TensorData::from_proto(t).unwrap() else {
            panic!("float initializers")
        };
        *t = TensorData::F32(a.mapv(|v| v * 1.001)).to_proto(&t.name);
    }
    let bp = tmp.join("b.onnx");
    save(&b, &bp, &SaveOptions::default()).unwrap();
    let a = model("conv2d_basic");
    let v = json(
        &[
            "check",
            &a,
            s(&bp),
            "--random",
            "2",
            "--min-sqnr",
            "55",
            "--json",
        ],
        0,
    );
    let sqnr = v["outputs"][0]["sqnr_db"].as_f64().unwrap();
    assert!((sqnr - 60.0).abs() < 0.1, "{sqnr}");
    assert_eq!(v["schema"], "qfold.check/1");
    assert_eq!(
        v["criterion"],
        serde_json::json!({"kind": "min_sqnr", "db": 55.0})
    );
    let out = run(
        &["check", &a, s(&bp), "--random", "2", "--min-sqnr", "65"],
        1,
    );
    assert!(out.contains("SQNR >= 65 dB"), "{out}");
    // The default float tolerance (rel 1e-4) rejects a 1e-3 relative error.
    run(&["check", &a, s(&bp), "--random", "2"], 1);
}

#[test]
fn usage_errors_exit_2() {
    let m = model("relu");
    let d = conformance("relu");
    for args in [
        vec!["frobnicate"],
        vec!["check"],
        vec!["inspect"],
        vec!["check", &m, &m, "--random", "1", "--bogus"],
        vec!["check", &m, &m, "--inputs", s(&d), "--random", "2"],
        vec!["check", &m, &m, "--random", "not-a-number"],
        vec!["check", &m, &m, "--tolerance", "tight"],
        vec!["check", &m, &m, "--atol", "-1"],
        vec!["check", &m, &m, "--input-shape", "x"],
        vec!["check", &m, "--random", "1"],
        vec!["check", &m, &m, "--random", "0"],
    ] {
        let out = qfold(&args);
        let (stdout, stderr) = texts(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stdout}{stderr}");
        assert!(!stderr.is_empty(), "{args:?}: no message");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
    // Models with different outputs cannot be compared.
    let other = s(&models_dir()
        .join("fusion_conv_with_bias")
        .join("model.onnx"))
    .to_string();
    let out = qfold(&["check", &m, &other, "--random", "1"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = texts(&out).1;
    assert!(stderr.contains("different outputs"), "{stderr}");
    // --help is not an error.
    let out = qfold(&["check", "--help"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(texts(&out).0.contains("--min-sqnr"));
}
