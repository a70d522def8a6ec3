//! Every subcommand's `--json` is one object with a `"schema"` key, named fields and the CLI's
//! spellings; errors under `--json` are objects too. Options are case-insensitive `ValueEnum`s,
//! a quantized model below the criterion never exits 0, and `-q` / `-v` control stderr.

mod common;

use std::path::Path;

use common::{run_qfold, TempDir};
use serde_json::{json, Value};

fn digits(sub: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("onnx_models/digits_cnn")
        .join(sub)
        .display()
        .to_string()
}

fn parse(args: &[&str], code: i32) -> (Value, String) {
    let (c, stdout, stderr) = run_qfold(args);
    assert_eq!(c, code, "{args:?}\n{stdout}\n{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let v: Value =
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{args:?}: {e}\n{stdout}"));
    assert!(v.is_object(), "{stdout}");
    (v, stderr)
}

#[test]
fn every_command_prints_one_object_with_its_schema() {
    let scratch = TempDir::new("reports");
    let m = digits("model.onnx");

    let (v, _) = parse(&["inspect", &m, "--json"], 0);
    assert_eq!(v["schema"], "qfold.inspect/1");
    assert_eq!(v["opsets"], json!([{"domain": "ai.onnx", "version": 13}]));

    let fused = scratch.join("f.onnx");
    let (v, _) = parse(
        &[
            "fuse",
            &m,
            "-o",
            fused.to_str().unwrap(),
            "--check",
            "--json",
        ],
        0,
    );
    assert_eq!(v["schema"], "qfold.fuse/1");
    let kinds: Vec<&str> = v["fusion"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["kind"].as_str().unwrap())
        .collect();
    // PyTorch's module names, as the text output prints them
    assert_eq!(
        kinds,
        ["ConvBnReLU", "ConvBnReLU", "ConvBnReLU", "LinearReLU"]
    );
    assert_eq!(v["check"]["criterion"]["kind"], "tolerance");
    assert_eq!(v["written"], fused.to_str().unwrap());

    let q = scratch.join("q.onnx");
    let (v, _) = parse(
        &[
            "quantize",
            &m,
            "-o",
            q.to_str().unwrap(),
            "--calib",
            &digits("calib"),
            "--eval",
            &digits("eval"),
            "--method",
            "percentile",
            "--percentile",
            "99.9",
            "--json",
        ],
        0,
    );
    assert_eq!(v["schema"], "qfold.quantize/1");
    let o = &v["quantization"]["options"];
    assert_eq!(o["preset"], "qfold");
    assert_eq!(
        o["method"],
        json!({"name": "percentile", "percentile": 99.9})
    );
    assert_eq!(o["activation"], "u8");
    let p = &v["quantization"]["qdq"]["activation_params"]["input"];
    assert!(p["scale"].as_f64().unwrap() > 0.0, "{p}");
    assert!(p["zero_point"].is_i64(), "{p}");
    let sources = &v["quantization"]["plan"]["activations"];
    assert_eq!(sources["input"], json!({"calibrated": "input"}));
    assert_eq!(
        sources["/pool/MaxPool_output_0"],
        json!({"shared_with": "/relu2/Relu_output_0"})
    );
    assert_eq!(
        v["evaluation"]["comparison"]["criterion"],
        json!({"kind": "min_sqnr", "db": 20.0})
    );
    // a stable key: present when the data needed no note
    assert_eq!(v["notes"], json!([]));

    let qop = scratch.join("qop.onnx");
    let (v, _) = parse(
        &[
            "convert",
            q.to_str().unwrap(),
            "-o",
            qop.to_str().unwrap(),
            "--json",
        ],
        0,
    );
    assert_eq!(v["schema"], "qfold.convert/1");
    let first = &v["convert"]["converted"][0];
    assert!(first["rule"].is_string(), "{first}");
    assert!(first["nodes"].is_array(), "{first}");

    let (v, _) = parse(
        &[
            "check",
            &m,
            q.to_str().unwrap(),
            "--inputs",
            &digits("eval"),
            "--min-sqnr",
            "20",
            "--json",
        ],
        0,
    );
    assert_eq!(v["schema"], "qfold.check/1");
    assert_eq!(v["passed"], true);

    let old = Path::new(env!("CARGO_MANIFEST_DIR")).join("onnx_models/upgrade/clip_6/model.onnx");
    let up = scratch.join("up.onnx");
    let (v, _) = parse(
        &[
            "upgrade",
            old.to_str().unwrap(),
            "-o",
            up.to_str().unwrap(),
            "--json",
        ],
        0,
    );
    assert_eq!(v["schema"], "qfold.upgrade/1");
    assert_eq!(
        (v["upgrade"]["from"].as_i64(), v["upgrade"]["to"].as_i64()),
        (Some(10), Some(13))
    );
    assert_eq!(v["upgrade"]["by_op"]["Clip"], 2);
}

#[test]
fn errors_under_json_are_objects_too() {
    let scratch = TempDir::new("reports");
    let out = scratch.join("x.onnx");
    let (v, stderr) = parse(
        &[
            "fuse",
            "/no/such/model.onnx",
            "-o",
            out.to_str().unwrap(),
            "--json",
        ],
        2,
    );
    assert_eq!(v["schema"], "qfold.error/1");
    assert_eq!(v["command"], "fuse");
    assert_eq!(v["exit_code"], 2);
    assert_eq!(v["kind"], "io");
    assert_eq!(v["subject"], "/no/such/model.onnx");
    assert!(stderr.contains("error: /no/such/model.onnx"), "{stderr}");
    let (v, _) = parse(
        &[
            "quantize",
            &digits("model.onnx"),
            "-o",
            out.to_str().unwrap(),
            "--calib",
            &digits("calib"),
            "--exclude",
            "nothere",
            "--json",
        ],
        2,
    );
    assert_eq!(v["kind"], "usage");
    assert!(v["message"]
        .as_str()
        .unwrap()
        .contains("--exclude 'nothere'"));
    assert!(!out.exists());
}

#[test]
fn options_are_case_insensitive_and_listed_in_help() {
    let scratch = TempDir::new("reports");
    let out = scratch.join("q.onnx");
    let (v, _) = parse(
        &[
            "quantize",
            &digits("model.onnx"),
            "-o",
            out.to_str().unwrap(),
            "--calib",
            &digits("calib"),
            "--preset",
            "ORT",
            "--method",
            "MinMax",
            "--op-types",
            "gemm",
            "--json",
        ],
        0,
    );
    let o = &v["quantization"]["options"];
    assert_eq!(o["preset"], "ort");
    assert_eq!(o["per_channel"], false);
    // lowercase `gemm` left both Gemm nodes float
    let float: Vec<&str> = v["quantization"]["plan"]["float"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["node"].as_str().unwrap())
        .collect();
    assert!(
        float.contains(&"/fc1/Gemm") && float.contains(&"/fc2/Gemm"),
        "{float:?}"
    );

    let (code, help, _) = run_qfold(&["quantize", "--help"]);
    assert_eq!(code, 0);
    for values in [
        "qfold:",
        "ort:",
        "fbgemm:",
        "tensorrt:",
        "tract:",
        "minmax:",
        "moving-average:",
        "percentile:",
        "entropy:",
        "l2:",
        "qdq:",
        "qoperator:",
    ] {
        assert!(
            help.contains(values),
            "{values} missing from --help:\n{help}"
        );
    }
    let (code, help, _) = run_qfold(&["fuse", "--help"]);
    assert_eq!(code, 0);
    for values in ["exact:", "float:", "half:", "loose:"] {
        assert!(
            help.contains(values),
            "{values} missing from --help:\n{help}"
        );
    }
}

#[test]
fn below_the_criterion_is_never_success() {
    let scratch = TempDir::new("reports");
    let out = scratch.join("q.onnx");
    let (code, stdout, stderr) = run_qfold(&[
        "quantize",
        &digits("model.onnx"),
        "-o",
        out.to_str().unwrap(),
        "--calib",
        &digits("calib"),
        "--min-sqnr",
        "80",
    ]);
    // without --check the model is written, and the run still fails
    assert_eq!(code, 1, "{stdout}{stderr}");
    assert!(out.exists());
    assert!(stdout.contains("FAIL (SQNR below 80 dB)"), "{stdout}");
    assert!(!stdout.contains("out of tolerance"), "{stdout}");
    assert!(stderr.contains("SQNR below 80 dB"), "{stderr}");
    assert!(stderr.contains("use --check"), "{stderr}");
}

#[test]
fn quiet_and_verbose_control_stderr() {
    let scratch = TempDir::new("reports");
    let out = scratch.join("f.onnx");
    let m = digits("model.onnx");
    let o = out.to_str().unwrap();
    // not a terminal: one line per phase
    let (code, _, stderr) = run_qfold(&["fuse", &m, "-o", o, "--check"]);
    assert_eq!(code, 0, "{stderr}");
    for phase in [
        "qfold: loading",
        "qfold: fusing",
        "qfold: running both models",
        "qfold: saving",
    ] {
        assert!(stderr.contains(phase), "{phase}:\n{stderr}");
    }
    let (code, _, stderr) = run_qfold(&["fuse", &m, "-o", o, "-q"]);
    assert_eq!(code, 0);
    assert_eq!(stderr, "");
    let (code, _, stderr) = run_qfold(&["-v", "fuse", &m, "-o", o]);
    assert_eq!(code, 0);
    let timed = stderr
        .lines()
        .find(|l| l.starts_with("qfold: fusing: "))
        .unwrap_or_else(|| panic!("{stderr}"));
    assert!(timed.ends_with(" s"), "{timed}");
    // errors are printed even when quiet
    let (code, _, stderr) = run_qfold(&["fuse", "/no/such.onnx", "-o", o, "-q"]);
    assert_eq!(code, 2);
    assert_eq!(
        stderr.lines().next(),
        Some("error: /no/such.onnx: No such file or directory (os error 2)")
    );
}

#[test]
fn bad_outputs_and_option_combinations_fail_before_loading() {
    let scratch = TempDir::new("reports");
    let out = scratch.join("q.onnx");
    let o = out.to_str().unwrap();
    let m = digits("model.onnx");
    let c = digits("calib");
    let nodir = scratch.join("nodir/r.json");
    for (args, want) in [
        (
            vec!["quantize", &m, "-o", "/no/such/dir/q.onnx", "--calib", &c],
            "the output folder '/no/such/dir' does not exist",
        ),
        (
            vec![
                "quantize",
                &m,
                "-o",
                o,
                "--calib",
                &c,
                "--save-ranges",
                nodir.to_str().unwrap(),
            ],
            "nodir' does not exist",
        ),
        (
            vec![
                "quantize",
                &m,
                "-o",
                o,
                "--calib",
                &c,
                "--percentile",
                "99.9",
            ],
            "--percentile 99.9 applies to --method percentile; the method is minmax",
        ),
        (
            vec![
                "quantize",
                &m,
                "-o",
                o,
                "--calib",
                &c,
                "--allow-contrib-ops",
            ],
            "--allow-contrib-ops needs --format qoperator",
        ),
        (
            vec!["quantize", &m, "-o", &m, "--calib", &c],
            "qfold never replaces its input",
        ),
    ] {
        let (code, _, stderr) = run_qfold(&args);
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert!(stderr.contains(want), "{args:?}: {stderr}");
        assert!(!stderr.contains("qfold: loading"), "{args:?}: {stderr}");
        assert!(!out.exists());
    }
}

#[cfg(unix)]
#[test]
fn a_closed_pipe_ends_quietly() {
    use std::process::{Command, Stdio};
    let mut child = Command::new(env!("CARGO_BIN_EXE_qfold"))
        .args(["inspect", &digits("model.onnx"), "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // the reader goes away before qfold prints (as `| head -0` would)
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_ne!(out.status.code(), Some(101), "{stderr}");
}
