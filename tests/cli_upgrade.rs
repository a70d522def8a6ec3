//! `qfold upgrade` end to end: exit codes, nothing written on refusal or failed check, the JSON
//! report, and the written model against ONNX Runtime's outputs at the old opset.

mod common;

use common::*;
use qfold::onnx::ElemType;

fn case(name: &str) -> String {
    models_dir()
        .join("upgrade")
        .join(name)
        .join("model.onnx")
        .display()
        .to_string()
}

fn data(name: &str) -> String {
    models_dir()
        .join("upgrade")
        .join(name)
        .join("test_data_set_0")
        .display()
        .to_string()
}

#[test]
fn upgrade_writes_the_model_at_the_new_opset_and_reports_per_op() {
    let scratch = TempDir::new("upgrade");
    let out = scratch.join("cnn.onnx");
    let (code, stdout, stderr) = run_qfold(&[
        "upgrade",
        &case("cnn_8"),
        "-o",
        out.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    let r: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(r["upgrade"]["from"], 8);
    assert_eq!(r["upgrade"]["to"], 13);
    assert_eq!(r["upgrade"]["by_op"]["Upsample"], 1);
    assert_eq!(r["upgrade"]["rewritten"].as_array().unwrap().len(), 6);
    assert_eq!(r["written"], out.to_str().unwrap());
    let m = qfold::onnx::load(&out).unwrap();
    assert_eq!(m.opset(), Some(13));
    assert_eq!(count(&m, "Upsample"), 0);
    assert_eq!(count(&m, "Resize"), 1);
    // The written model reproduces ONNX Runtime's outputs of the opset-8 original.
    let (code, stdout, stderr) =
        run_qfold(&["check", out.to_str().unwrap(), "--inputs", &data("cnn_8")]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    // Text report.
    let out2 = scratch.join("clip.onnx");
    let (code, stdout, _) = run_qfold(&[
        "upgrade",
        &case("clip_6"),
        "-o",
        out2.to_str().unwrap(),
        "--opset",
        "11",
    ]);
    assert_eq!(code, 0);
    assert!(
        stdout.contains("opset 10 -> 11; 2 nodes rewritten"),
        "{stdout}"
    );
    assert!(stdout.contains("wrote"), "{stdout}");
}

#[test]
fn upgrade_check_passes_where_tract_runs_both_and_refuses_to_write_on_a_mismatch() {
    let scratch = TempDir::new("upgrade");
    let out = scratch.join("softmax.onnx");
    let (code, stdout, stderr) = run_qfold(&[
        "upgrade",
        &case("softmax_11"),
        "-o",
        out.to_str().unwrap(),
        "--check",
        "--inputs",
        &data("softmax_11"),
    ]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("PASS"), "{stdout}");
    assert!(out.exists());
    // tract runs opset-10 nearest Resize with other rounding than ONNX Runtime, which the
    // upgraded model follows: the check sees a difference, and nothing is written.
    let out = scratch.join("resize.onnx");
    let (code, stdout, stderr) = run_qfold(&[
        "upgrade",
        &case("resize_10"),
        "-o",
        out.to_str().unwrap(),
        "--check",
    ]);
    assert_eq!(code, 1, "{stdout}{stderr}");
    assert!(stderr.contains("nothing written"), "{stderr}");
    assert!(!out.exists());
    assert_eq!(
        scratch.listing(),
        ["softmax.onnx"],
        "no temporary file left"
    );
}

#[test]
fn an_op_without_adapter_exits_2_naming_the_node() {
    let scratch = TempDir::new("upgrade");
    let mut m = model_of(
        vec![
            node_of("Relu", "relu", &["x"], &["r"], vec![]),
            node_of(
                "ImageScaler",
                "prep",
                &["r"],
                &["y"],
                vec![float("scale", 0.5)],
            ),
        ],
        vec![],
        value_info("x", ElemType::F32, &[1, 3, 2, 2]),
        "y",
    );
    m.proto.opset_import[0].version = 8;
    let input = scratch.join("old.onnx");
    qfold::onnx::save(&m, &input, &Default::default()).unwrap();
    let out = scratch.join("new.onnx");
    let (code, _, stderr) = run_qfold(&[
        "upgrade",
        input.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("node 'prep' (ImageScaler)") && stderr.contains("adapters for"),
        "{stderr}"
    );
    assert!(!out.exists());
}

#[test]
fn downgrade_and_output_equal_to_input_exit_2() {
    let scratch = TempDir::new("upgrade");
    let out = scratch.join("down.onnx");
    let (code, _, stderr) = run_qfold(&[
        "upgrade",
        &case("softmax_11"),
        "-o",
        out.to_str().unwrap(),
        "--opset",
        "10",
    ]);
    assert_eq!(code, 2);
    assert!(stderr.contains("downgrade"), "{stderr}");
    assert!(!out.exists());
    // -o naming the input itself
    let input = scratch.join("m.onnx");
    std::fs::copy(case("clip_6"), &input).unwrap();
    let before = std::fs::read(&input).unwrap();
    let (code, _, stderr) = run_qfold(&[
        "upgrade",
        input.to_str().unwrap(),
        "-o",
        input.to_str().unwrap(),
    ]);
    assert_eq!(code, 2, "{stderr}");
    assert_eq!(
        std::fs::read(&input).unwrap(),
        before,
        "the input is not modified"
    );
    // a target past what qfold adapts
    let (code, _, stderr) = run_qfold(&[
        "upgrade",
        &case("clip_6"),
        "-o",
        out.to_str().unwrap(),
        "--opset",
        "21",
    ]);
    assert_eq!(code, 2);
    assert!(stderr.contains("opset 18 at most"), "{stderr}");
}
