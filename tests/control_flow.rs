//! Models tract cannot run (a Loop, an If whose branches differ) fail with an error naming the
//! node and its op, exit 2; an If tract can run still runs. Models from
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
