//! `qfold fuse` end to end: exit codes, nothing written on failure, JSON report.

mod common;

use std::path::Path;

use common::{run_qfold, TempDir};

fn model(case: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("onnx_models")
        .join(case)
        .join("model.onnx")
        .display()
        .to_string()
}

#[test]
fn fuse_check_writes_a_model_that_passes() {
    let scratch = TempDir::new("fuse");
    let out = scratch.join("seq.onnx");
    let (code, stdout, stderr) = run_qfold(&[
        "fuse",
        &model("fusion_sequential"),
        "-o",
        out.to_str().unwrap(),
        "--check",
    ]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("BatchNormalization 3 -> 0"), "{stdout}");
    assert!(stdout.contains("PASS"));
    let m = qfold::onnx::load(&out).unwrap();
    assert!(m
        .graph()
        .node
        .iter()
        .all(|n| n.op_type != "BatchNormalization"));
    // and the written model matches PyTorch's fused outputs
    let data =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("onnx_models/fusion_sequential/test_data_set_0");
    let (code, stdout, _) = run_qfold(&[
        "check",
        out.to_str().unwrap(),
        "--inputs",
        data.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stdout}");
}

#[test]
fn failed_check_exits_1_and_writes_nothing() {
    let scratch = TempDir::new("fuse");
    let out = scratch.join("f16.onnx");
    let (code, stdout, stderr) = run_qfold(&[
        "fuse",
        &model("trap_f16"),
        "-o",
        out.to_str().unwrap(),
        "--check",
        "--tolerance",
        "exact",
    ]);
    assert_eq!(code, 1, "{stdout}{stderr}");
    assert!(stdout.contains("FAIL"));
    assert!(stderr.contains("nothing written"));
    assert!(!out.exists());
}

#[test]
fn explicit_list_errors_exit_2_and_write_nothing() {
    let scratch = TempDir::new("fuse");
    let out = scratch.join("bad.onnx");
    let (code, _, stderr) = run_qfold(&[
        "fuse",
        &model("fusion_model_for_fusion"),
        "-o",
        out.to_str().unwrap(),
        "--only",
        "conv1,relu1",
    ]);
    assert_eq!(code, 2);
    assert!(stderr.contains("not a chain"), "{stderr}");
    assert!(!out.exists());
    let (code, _, stderr) = run_qfold(&[
        "fuse",
        &model("trap_bn_graph_output"),
        "-o",
        out.to_str().unwrap(),
        "--only",
        "conv,bn",
    ]);
    assert_eq!(code, 2);
    assert!(stderr.contains("graph output"), "{stderr}");
    assert!(!out.exists());
}

#[test]
fn module_paths_and_json_report() {
    let scratch = TempDir::new("fuse");
    let out = scratch.join("mff.onnx");
    let (code, stdout, stderr) = run_qfold(&[
        "fuse",
        &model("fusion_model_for_fusion"),
        "-o",
        out.to_str().unwrap(),
        "--only",
        "conv1,bn1,relu1",
        "--only",
        "sub1.conv,sub1.bn",
        "--json",
    ]);
    assert_eq!(code, 0, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let groups = v["fusion"]["groups"].as_array().unwrap();
    assert_eq!(groups.len(), 2);
    assert_eq!(groups[0]["kind"], "ConvBnReLU");
    assert_eq!(groups[1]["nodes"][0], "/sub1/conv/Conv");
    assert_eq!(v["fusion"]["bn_after"], 1);
}

#[test]
fn qat_mode_folds_nothing() {
    let scratch = TempDir::new("fuse");
    let out = scratch.join("qat.onnx");
    let (code, stdout, _) = run_qfold(&[
        "fuse",
        &model("fusion_conv_with_bias"),
        "-o",
        out.to_str().unwrap(),
        "--qat",
        "--check",
        "--tolerance",
        "exact",
    ]);
    assert_eq!(code, 0, "{stdout}");
    assert!(stdout.contains("BatchNormalization 2 -> 2"), "{stdout}");
}

#[test]
fn inspect_lists_candidates_and_reasons() {
    let (code, stdout, _) = run_qfold(&["inspect", &model("trap_conv_relu_bn")]);
    assert_eq!(code, 0);
    assert!(stdout.contains("ConvReLU"), "{stdout}");
    assert!(stdout.contains("no backward fold"), "{stdout}");
}

#[test]
fn external_data_threshold_writes_a_data_file_that_reloads() {
    let scratch = TempDir::new("fuse");
    let out = scratch.join("ext.onnx");
    let (code, _, stderr) = run_qfold(&[
        "fuse",
        &model("fusion_sequential"),
        "-o",
        out.to_str().unwrap(),
        "--external-data-threshold",
        "256",
    ]);
    assert_eq!(code, 0, "{stderr}");
    let data = scratch.join("ext.onnx.data");
    assert!(std::fs::metadata(&data).unwrap().len() > 1000);
    let m = qfold::onnx::load(&out).unwrap();
    assert!(!m.external.is_empty());
    let inputs =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("onnx_models/fusion_sequential/test_data_set_0");
    let (code, stdout, _) = run_qfold(&[
        "check",
        out.to_str().unwrap(),
        "--inputs",
        inputs.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stdout}");
}
