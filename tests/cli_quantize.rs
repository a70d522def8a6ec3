//! `qfold quantize` end to end through the binary.

mod common;

use std::path::Path;

use common::{run_qfold, TempDir};

fn digits(sub: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("onnx_models/digits_cnn")
        .join(sub)
        .display()
        .to_string()
}

#[test]
fn readme_main_job_reports_accuracy_and_writes_the_model() {
    let scratch = TempDir::new("quant");
    let out = scratch.join("digits_int8.onnx");
    let (code, stdout, stderr) = run_qfold(&[
        "quantize",
        &digits("model.onnx"),
        "-o",
        out.to_str().unwrap(),
        "--calib",
        &digits("calib"),
        "--eval",
        &digits("eval"),
        "--check",
        "--min-sqnr",
        "35",
    ]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(
        stdout.contains("accuracy on 512 labelled rows: float 99.41%, int8 99.41%"),
        "{stdout}"
    );
    assert!(stdout.contains("4 Relu/Clip absorbed"), "{stdout}");
    let m = qfold::onnx::load(&out).unwrap();
    assert!(m.graph().node.iter().any(|n| n.op_type == "QuantizeLinear"));
    // the written model checks against the float one in tract
    let (code, stdout, _) = run_qfold(&[
        "check",
        &digits("model.onnx"),
        out.to_str().unwrap(),
        "--inputs",
        &digits("eval"),
        "--min-sqnr",
        "35",
    ]);
    assert_eq!(code, 0, "{stdout}");
}

#[test]
fn missed_sqnr_exits_1_and_writes_nothing() {
    let scratch = TempDir::new("quant");
    let out = scratch.join("never.onnx");
    let (code, stdout, stderr) = run_qfold(&[
        "quantize",
        &digits("model.onnx"),
        "-o",
        out.to_str().unwrap(),
        "--calib",
        &digits("calib"),
        "--check",
        "--min-sqnr",
        "80",
    ]);
    assert_eq!(code, 1, "{stdout}{stderr}");
    assert!(stderr.contains("nothing written"));
    assert!(!out.exists());
}

#[test]
fn json_report_and_saved_ranges() {
    let scratch = TempDir::new("quant");
    let out = scratch.join("j.onnx");
    let ranges = scratch.join("ranges.json");
    let (code, stdout, stderr) = run_qfold(&[
        "quantize",
        &digits("model.onnx"),
        "-o",
        out.to_str().unwrap(),
        "--calib",
        &digits("calib"),
        "--eval",
        &digits("eval"),
        "--preset",
        "fbgemm",
        "--save-ranges",
        ranges.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(code, 0, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["quantization"]["options"]["preset"], "fbgemm");
    assert_eq!(v["quantization"]["options"]["reduce_range"], true);
    assert!(
        v["evaluation"]["comparison"]["outputs"][0]["sqnr_db"]
            .as_f64()
            .unwrap()
            > 30.0
    );
    assert!(v["size_after"].as_u64().unwrap() < v["size_before"].as_u64().unwrap());
    // the saved ranges replace calibration
    let out2 = scratch.join("j2.onnx");
    let (code, _, stderr) = run_qfold(&[
        "quantize",
        &digits("model.onnx"),
        "-o",
        out2.to_str().unwrap(),
        "--ranges",
        ranges.to_str().unwrap(),
        "--eval",
        &digits("eval"),
        "--preset",
        "fbgemm",
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&out2).unwrap());
}

#[test]
fn usage_errors_exit_2() {
    let scratch = TempDir::new("quant");
    let out = scratch.join("u.onnx");
    let o = out.to_str().unwrap();
    let m = digits("model.onnx");
    let c = digits("calib");
    for (args, want) in [
        (
            vec![
                "quantize", &m, "-o", o, "--calib", &c, "--format", "qlinear",
            ],
            "[possible values: qdq, qoperator]",
        ),
        (
            vec!["quantize", &m, "-o", o, "--calib", &c, "--preset", "nope"],
            "invalid value 'nope' for '--preset <PRESET>'",
        ),
        (
            vec!["quantize", &m, "-o", o, "--calib", &c, "--method", "median"],
            "invalid value 'median' for '--method <METHOD>'",
        ),
        (vec!["quantize", &m, "-o", o], "give calibration data"),
        (
            vec![
                "quantize",
                &m,
                "-o",
                o,
                "--calib",
                &c,
                "--exclude",
                "nothere",
            ],
            "--exclude 'nothere'",
        ),
        (
            vec![
                "quantize",
                &m,
                "-o",
                o,
                "--calib",
                &c,
                "--op-types",
                "conv,Attention",
            ],
            "--op-types Attention: no node of this op type in the model",
        ),
        (
            vec!["quantize", &m, "-o", o, "--calib", "/no/such/dir"],
            "/no/such/dir",
        ),
    ] {
        let (code, _, stderr) = run_qfold(&args);
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert!(stderr.contains(want), "{args:?}: {stderr}");
        assert!(!out.exists());
    }
}

#[test]
fn tract_preset_writes_qoperator_with_per_tensor_weights() {
    let scratch = TempDir::new("quant");
    let out = scratch.join("tract.onnx");
    let (code, stdout, stderr) = run_qfold(&[
        "quantize",
        &digits("model.onnx"),
        "-o",
        out.to_str().unwrap(),
        "--calib",
        &digits("calib"),
        "--eval",
        &digits("eval"),
        "--preset",
        "tract",
        "--check",
        "--min-sqnr",
        "35",
    ]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(
        stdout.contains("float island: /gap/GlobalAveragePool"),
        "{stdout}"
    );
    let m = qfold::onnx::load(&out).unwrap();
    let qlc: Vec<_> = m
        .graph()
        .node
        .iter()
        .filter(|n| n.op_type == "QLinearConv")
        .collect();
    assert_eq!(qlc.len(), 5);
    for n in qlc {
        let s = m
            .graph()
            .initializer
            .iter()
            .find(|t| t.name == n.input[4])
            .unwrap();
        assert!(s.dims.is_empty(), "per-tensor weight scale");
    }
}

#[test]
fn convert_an_onnx_runtime_qdq_model_and_refuse_a_float_one() {
    let scratch = TempDir::new("quant");
    let out = scratch.join("qop.onnx");
    let ort = Path::new(env!("CARGO_MANIFEST_DIR")).join("onnx_models/ort_qdq_digits_raw");
    let (code, stdout, stderr) = run_qfold(&[
        "convert",
        ort.join("model.onnx").to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--check",
        "--min-sqnr",
        "35",
        "--inputs",
        ort.join("test_data_set_0").to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("bn_to_depthwise 3"), "{stdout}");
    assert!(
        stdout.contains("float island: /gap/GlobalAveragePool"),
        "{stdout}"
    );
    assert!(out.exists());
    let out2 = scratch.join("none.onnx");
    let (code, _, stderr) = run_qfold(&[
        "convert",
        &digits("model.onnx"),
        "-o",
        out2.to_str().unwrap(),
    ]);
    assert_eq!(code, 2);
    assert!(stderr.contains("no QDQ pattern"), "{stderr}");
    assert!(!out2.exists());
}
