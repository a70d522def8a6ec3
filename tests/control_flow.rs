//! Models tract cannot run (a Loop, an If on the input data whose branches differ) fail with
//! an error naming the node and its op, exit 2; an If tract can run still runs, and so does an
//! If whose condition the input shapes decide (resolved in the copy tract runs). Models from
//! `tools/make_control_flow.py`, with ONNX Runtime's outputs as references.

mod common;

use common::*;

fn case(name: &str) -> String {
    format!("onnx_models/control_flow/{name}")
}

fn model(name: &str) -> String {
    format!("{}/model.onnx", case(name))
}

#[test]
fn an_if_on_the_input_data_names_the_node_and_the_input() {
    let (code, _, err) = run_qfold(&["check", &model("if_data"), "--inputs", &case("if_data")]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("error: node 'choose' (If): tract cannot run this model: the If condition 'cond' depends on the input data (input 'x')"),
        "{err}"
    );
    assert!(err.contains("same type and shape"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    // quantize fails the same way, before writing anything
    let t = TempDir::new("cf-if");
    let out = t.join("q.onnx");
    let (code, _, err) = run_qfold(&[
        "quantize",
        &model("if_data"),
        "-o",
        out.to_str().unwrap(),
        "--calib",
        &case("if_data"),
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("node 'choose' (If)"), "{err}");
    assert!(t.listing().is_empty(), "{:?}", t.listing());
}

#[test]
fn an_if_whose_branches_agree_runs_and_matches_onnx_runtime() {
    let (code, out, err) = run_qfold(&[
        "check",
        &model("if_data_same"),
        "--inputs",
        &case("if_data_same"),
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    let max_abs = j["outputs"][0]["max_abs"].as_f64().unwrap();
    assert!(max_abs <= 1e-6, "{max_abs}");
}

#[test]
fn a_loop_is_refused_by_name_with_its_trip_count() {
    let (code, _, err) = run_qfold(&["check", &model("loop_data"), "--inputs", &case("loop_data")]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("error: node 'repeat' (Loop): tract cannot run this model: its trip count 'M' depends on the input data (input 'M'); tract has no Loop operator"),
        "{err}"
    );
    let (code, _, err) = run_qfold(&[
        "check",
        &model("loop_const"),
        "--inputs",
        &case("loop_const"),
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains(
            "error: node 'repeat' (Loop): tract cannot run this model: tract has no Loop operator"
        ),
        "{err}"
    );
}

#[test]
fn ifs_decided_by_the_input_shape_are_resolved_for_tract_and_kept_in_the_model() {
    // If(Shape(r)[2] == 1, then: Squeeze, else: If(Shape(r)[0] == 1, then: r, else:
    // Unsqueeze)): tract cannot run either If as it is (its branches differ in rank), but
    // for one run's shapes both conditions are constants. n = 8 takes the outer else and the
    // inner then branch, n = 1 the outer then branch; both match ONNX Runtime exactly.
    let (code, out, err) = run_qfold(&[
        "check",
        &model("if_shape"),
        "--inputs",
        &case("if_shape"),
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(j["samples"], 2);
    let max_abs = j["outputs"][0]["max_abs"].as_f64().unwrap();
    assert!(max_abs <= 1e-6, "{max_abs}");

    // which branches: decided in tract per sample
    let m = qfold::onnx::load(std::path::Path::new(&model("if_shape"))).unwrap();
    for (set, expected) in [
        (
            "test_data_set_0",
            vec!["choose_len (else branch)", "choose_batch (then branch)"],
        ),
        ("test_data_set_1", vec!["choose_len (then branch)"]),
    ] {
        let dir = std::path::PathBuf::from(case("if_shape")).join(set);
        let c = qfold::verify::read_test_data_set(&m, &dir).unwrap();
        let (nodes, resolved) = qfold::graph::inline_if::resolve(&m, &c.inputs)
            .unwrap()
            .expect("resolved");
        assert_eq!(resolved, expected);
        assert!(!nodes.iter().any(|n| n.op_type == "If"));
    }

    // quantize (calibrated at n = 8): the Conv is quantized and evaluated in tract; the model
    // written keeps its Ifs, which stay right for every input length
    let t = TempDir::new("cf-if-shape");
    let q = t.join("q.onnx");
    let calib = format!("{}/test_data_set_0", case("if_shape"));
    let (code, out, err) = run_qfold(&[
        "quantize",
        &model("if_shape"),
        "-o",
        q.to_str().unwrap(),
        "--calib",
        &calib,
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(j["quantization"]["plan"]["quantized"]
        .as_array()
        .unwrap()
        .iter()
        .any(|n| n == "conv"));
    let sqnr = j["evaluation"]["comparison"]["outputs"][0]["sqnr_db"]
        .as_f64()
        .unwrap();
    assert!(sqnr > 30.0, "{sqnr}");
    let written = qfold::onnx::load(&q).unwrap();
    assert_eq!(
        written
            .graph()
            .node
            .iter()
            .filter(|n| n.op_type == "If")
            .count(),
        1
    );
    // calibration samples of two lengths: each length gets its own tract runner, and the
    // samples of the second length count (an n = 1 sample 100 times larger sets the range)
    let mixed = t.join("mixed.onnx");
    let (code, _, err) = run_qfold(&[
        "quantize",
        &model("if_shape"),
        "-o",
        mixed.to_str().unwrap(),
        "--calib",
        &case("if_shape"),
    ]);
    assert_eq!(code, 0, "{err}");
    let m = qfold::onnx::load(std::path::Path::new(&model("if_shape"))).unwrap();
    let set = |k: usize| {
        let dir = std::path::PathBuf::from(case("if_shape")).join(format!("test_data_set_{k}"));
        qfold::verify::read_test_data_set(&m, &dir).unwrap()
    };
    let mut big = set(1);
    if let qfold::onnx::TensorData::F32(a) = &mut big.inputs[0].1 {
        a.mapv_inplace(|v| v.abs() * 100.0);
    }
    let values = vec!["r".to_string()];
    let range = |cases: &[qfold::verify::Case], threads: usize| {
        qfold::quant::calibrate::observe(
            &m,
            &values,
            cases,
            qfold::quant::observe::Method::MinMax,
            threads,
        )
        .unwrap()["r"]
            .min_max()
            .unwrap()
    };
    let small = range(&[set(0)], 1);
    let alone = range(std::slice::from_ref(&big), 1);
    assert!(alone.1 > 10.0 * small.1, "{alone:?} {small:?}");
    for threads in [1, 2] {
        let both = range(&[set(0), big.clone(), set(0)], threads);
        assert_eq!(both.1, alone.1.max(small.1), "{threads} threads");
    }
    // and runs at both lengths, against the float model (45.7 dB)
    let (code, _, err) = run_qfold(&[
        "check",
        &model("if_shape"),
        q.to_str().unwrap(),
        "--inputs",
        &case("if_shape"),
        "--min-sqnr",
        "40",
    ]);
    assert_eq!(code, 0, "{err}");
}
