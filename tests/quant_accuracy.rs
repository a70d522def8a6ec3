//! Accuracy tools (issue 11): the per-tensor analyzer, cross-layer equalization, bias
//! correction and the target mode, on numbers.

mod common;

use common::*;
use qfold::onnx::Model;
use qfold::quant::analyze::{self, Evaluator, TensorKind};
use qfold::quant::{calibrate_prepared, equalize, prepare, Calibration, QuantizeOptions};
use qfold::verify::{self, Case};

fn digits() -> (Model, Vec<Case>, Vec<Case>) {
    let dir = models_dir().join("digits_cnn");
    let m = qfold::onnx::load(dir.join("model.onnx")).unwrap();
    let calib = verify::read_dataset(&m, &dir.join("calib")).unwrap();
    let eval = verify::read_dataset(&m, &dir.join("eval")).unwrap();
    (m, calib, eval)
}

fn digits_path(sub: &str) -> String {
    models_dir()
        .join("digits_cnn")
        .join(sub)
        .display()
        .to_string()
}

/// SQNR (dB) of `q` against `w`, per-channel symmetric int8 on axis 0, computed here by hand.
fn per_channel_sqnr(w: &ndarray::ArrayD<f64>) -> f64 {
    let (mut s, mut e) = (0.0, 0.0);
    for c in w.outer_iter() {
        let absmax = c.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        let scale = (2.0 * absmax / 254.0) as f32;
        for &x in c.iter() {
            let q = ((x as f32 / scale) as f64)
                .round_ties_even()
                .clamp(-127.0, 127.0) as f32
                * scale;
            s += x * x;
            e += (x - q as f64).powi(2);
        }
    }
    10.0 * (s / e).log10()
}

#[test]
fn analyzer_on_digits_gives_consistent_real_numbers() {
    let (m, calib, eval) = digits();
    let opts = QuantizeOptions::default();
    let prepared = prepare(&m, &opts).unwrap();
    let (ranges, _) = calibrate_prepared(&prepared, Calibration::Source(&calib), &opts).unwrap();
    let evaluator = Evaluator::new(&m, eval, 2).unwrap();
    let a = analyze::analyze(&prepared, &ranges, &opts, &evaluator, "eval".into()).unwrap();
    assert_eq!(a.samples, 8);
    // every tensor quantized: the README's figure (39.42 dB, accuracy unchanged)
    let all = a.quantized.sqnr_db.unwrap();
    assert!((all - 39.42).abs() < 0.05, "{all}");
    assert_eq!(a.float_accuracy, a.quantized.accuracy);
    // 7 activation groups (pool and flatten share their inputs' parameters) and 5 weights
    let kinds = |k| a.tensors.iter().filter(|t| t.kind == k).count();
    assert_eq!(kinds(TensorKind::Activation), 7);
    assert_eq!(kinds(TensorKind::Weight), 5);
    // sorted by the SQNR of the model with only that tensor quantized
    for w in a.tensors.windows(2) {
        assert!(w[0].only_quantized.db() <= w[1].only_quantized.db());
    }
    // one tensor quantized always costs less than all of them
    for t in &a.tensors {
        assert!(
            t.only_quantized.db() > all + 1.0,
            "{}: {:?}",
            t.tensor,
            t.only_quantized
        );
        assert!(t.only_float.db() > all - 1.0 && t.only_float.db() < all + 3.0);
    }
    // the most sensitive tensor is the model's output; quantizing only it, the model's SQNR is
    // the tensor's own
    let first = &a.tensors[0];
    assert_eq!(first.tensor, "logits");
    let own = first.sqnr_db.unwrap();
    assert!(
        (first.only_quantized.db() - own).abs() < 0.01,
        "{own} vs {:?}",
        first.only_quantized
    );
    // the eval set reaches past the calibrated range of the logits: some values are clipped
    assert!(
        first.clipped > 0.0 && first.clipped < 0.01,
        "{}",
        first.clipped
    );
    // a weight's own SQNR is its per-channel quantization error, computed here independently
    let g = qfold::graph::Graph::of_model(&prepared.float);
    let conv1 = a
        .tensors
        .iter()
        .find(|t| t.nodes == ["/conv1/Conv"])
        .unwrap();
    let w = g.constant(&conv1.tensor).unwrap().unwrap().to_f64();
    let by_hand = per_channel_sqnr(&w);
    assert!(
        (conv1.sqnr_db.unwrap() - by_hand).abs() < 1e-6,
        "{:?} {by_hand}",
        conv1.sqnr_db
    );
    let spread = conv1.channel_range_spread.unwrap();
    let r: Vec<f64> = w
        .outer_iter()
        .map(|c| c.iter().fold(0.0f64, |m, v| m.max(v.abs())))
        .collect();
    let want =
        r.iter().cloned().fold(0.0, f64::max) / r.iter().cloned().fold(f64::INFINITY, f64::min);
    assert!((spread - want).abs() < 1e-9);
    // post-Relu activations start at 0 and clip almost nothing
    let relu1 = a
        .tensors
        .iter()
        .find(|t| t.tensor == "/relu1/Relu_output_0")
        .unwrap();
    assert_eq!(relu1.range_min, 0.0);
    assert!(relu1.clipped < 1e-3);
}

#[test]
fn analyze_cli_prints_the_table_and_json() {
    let (code, stdout, stderr) = run_qfold(&[
        "analyze",
        &digits_path("model.onnx"),
        "--calib",
        &digits_path("calib"),
        "--eval",
        &digits_path("eval"),
        "--samples",
        "2",
        "--json",
    ]);
    assert_eq!(code, 0, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["schema"], "qfold.analyze/1");
    assert_eq!(v["analysis"]["samples"], 2);
    let t = v["analysis"]["tensors"].as_array().unwrap();
    assert_eq!(t.len(), 12);
    assert_eq!(t[0]["tensor"], "logits");
    assert!(t[0]["only_float"]["sqnr_db"].as_f64().unwrap() > 30.0);

    let scratch = TempDir::new("analyze");
    let out = scratch.join("q.onnx");
    let (code, stdout, stderr) = run_qfold(&[
        "quantize",
        &digits_path("model.onnx"),
        "-o",
        out.to_str().unwrap(),
        "--calib",
        &digits_path("calib"),
        "--report-layers",
        "--samples",
        "1",
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("per-tensor analysis on 1 samples"),
        "{stdout}"
    );
    assert!(stdout.contains("conv2.weight (/conv2/Conv)"), "{stdout}");
}

#[test]
fn equalization_is_exact_in_float_and_evens_the_channel_ranges() {
    let (m, _, eval) = digits();
    let mut fused = m.clone();
    qfold::fusion::fuse(&mut fused, &Default::default()).unwrap();
    let mut eq = fused.clone();
    let r = equalize::equalize(&mut eq, &Default::default()).unwrap();
    assert_eq!(
        r.pairs,
        [
            "/conv1/Conv -> /relu1/Relu -> /conv2/Conv",
            "/conv2/Conv -> /relu2/Relu -> /pool/MaxPool -> /conv3/Conv",
            "/fc1/Gemm -> /relu4/Relu -> /fc2/Gemm"
        ],
        "{r:?}"
    );
    assert!(r.sweeps > 1 && r.sweeps < 100, "{}", r.sweeps);
    eprintln!("{r:?}");
    assert!(
        r.per_tensor_weight_sqnr_after > r.per_tensor_weight_sqnr_before + 0.5,
        "{r:?}"
    );
    for c in &eval[..2] {
        let a = run(&m, c);
        let b = run(&eq, c);
        assert_close(
            &a,
            &b,
            qfold::verify::Criterion::Tolerance {
                atol: 1e-4,
                rtol: 1e-4,
            },
            "equalized",
        );
    }
}
