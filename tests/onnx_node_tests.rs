//! ONNX's own backend node tests for the ops qfold handles (`onnx_models/onnx_node_tests`, from
//! the onnx 1.17 wheel): `qfold check MODEL --inputs DIR` passes on each, parameters given as
//! graph inputs (BatchNormalization statistics, Q/DQ scales) bound as constants for tract.

mod common;

use common::*;

#[test]
fn every_node_test_tract_can_run_passes_qfold_check() {
    let dir = models_dir().join("onnx_node_tests");
    let mut cases: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("model.onnx").exists())
        .collect();
    cases.sort();
    assert_eq!(cases.len(), 64);
    let mut failed = Vec::new();
    for c in &cases {
        let (code, out, err) = run_qfold(&[
            "check",
            c.join("model.onnx").to_str().unwrap(),
            "--inputs",
            c.to_str().unwrap(),
        ]);
        if code != 0 {
            failed.push(format!("{}: exit {code}\n{out}{err}", case_name(c)));
        }
    }
    assert!(failed.is_empty(), "{}", failed.join("\n"));
    // Among them, the ones whose parameters are graph inputs.
    for name in [
        "test_batchnorm_example",
        "test_batchnorm_epsilon",
        "test_quantizelinear",
        "test_quantizelinear_axis",
        "test_dequantizelinear",
        "test_dequantizelinear_axis",
    ] {
        assert!(dir.join(name).exists(), "{name}");
    }
}
