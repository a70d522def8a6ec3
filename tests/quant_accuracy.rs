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

fn outlier_path(sub: &str) -> String {
    models_dir()
        .join("accuracy_outlier")
        .join(sub)
        .display()
        .to_string()
}

/// The worst output's SQNR in a `qfold quantize --json` report.
fn reported_sqnr(report: &serde_json::Value) -> f64 {
    report["evaluation"]["comparison"]["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| match &o["sqnr_db"] {
            // identical outputs
            serde_json::Value::Null => f64::INFINITY,
            d => d.as_f64().unwrap(),
        })
        .fold(f64::INFINITY, f64::min)
}

/// The nodes a target report (`target` of a `quantize --json` report) left float, in order.
fn fallback_nodes(target: &serde_json::Value) -> Vec<&str> {
    target["fallback"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["node"].as_str().unwrap())
        .collect()
}

fn quantize_outlier(out: &std::path::Path, extra: &[&str]) -> (i32, serde_json::Value, String) {
    let mut args = vec![
        "quantize".to_string(),
        outlier_path("model.onnx"),
        "-o".into(),
        out.display().to_string(),
        "--calib".into(),
        outlier_path("calib"),
        "--eval".into(),
        outlier_path("eval"),
        "--json".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, stdout, stderr) = run_qfold(&refs);
    let v = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}{stderr}"));
    (code, v, stderr)
}

#[test]
fn target_sqnr_recovers_what_minmax_misses_in_tract_and_onnx_runtime() {
    let scratch = TempDir::new("target");
    // plain MinMax: the outlier channel of fc1 sets h1's scale, the others are crushed
    let (code, v, _) = quantize_outlier(&scratch.join("minmax.onnx"), &[]);
    assert_eq!(code, 1); // below the default --min-sqnr 20
    let minmax = reported_sqnr(&v);
    assert!((minmax - 17.96).abs() < 0.05, "{minmax}");
    // the target mode: every method scored, then fc2 and fc1 (with their Relus) left float
    let out = scratch.join("target.onnx");
    // (two of its three Gemms must be left float: allow it)
    let (code, v, stderr) =
        quantize_outlier(&out, &["--target-sqnr", "30", "--min-quantized", "30"]);
    assert_eq!(code, 0, "{stderr}");
    let reached = reported_sqnr(&v);
    assert!(
        reached >= 30.0 && (reached - 34.76).abs() < 0.05,
        "{reached}"
    );
    let t = &v["target"];
    assert_eq!(t["methods"].as_array().unwrap().len(), 5);
    // scored, and judged, on the 4 samples in 3 realizations (as given, inputs x (1 +- 2^-20))
    assert_eq!(
        (t["samples"].as_u64(), t["realizations"].as_u64()),
        (Some(4), Some(3))
    );
    assert_eq!(v["evaluation"]["comparison"]["samples"], 12);
    let left = fallback_nodes(t);
    assert_eq!(left, ["fc2", "fc1"]);
    assert_eq!(
        (t["compute_quantized"].as_u64(), t["compute_nodes"].as_u64()),
        (Some(1), Some(3))
    );
    assert_eq!(t["met"], true);
    // what the two float Gemms cost: float weights, against every node quantized
    let c = &t["cost"];
    assert!(
        c["size"].as_u64().unwrap() > c["size_all_quantized"].as_u64().unwrap(),
        "{c}"
    );
    assert_eq!(
        c["size"].as_u64(),
        std::fs::metadata(&out).ok().map(|m| m.len())
    );
    for k in ["latency_float_ms", "latency_all_quantized_ms", "latency_ms"] {
        let ms = c[k].as_f64().unwrap();
        assert!(ms > 0.0 && ms.is_finite(), "{k}: {c}");
    }
    assert_eq!(c["latency_runs"], 5);
    // the written model is the one evaluated: fc3 quantized, fc1 and fc2 float, Relus kept
    let m = qfold::onnx::load(&out).unwrap();
    assert_eq!(count(&m, "Relu"), 2);
    assert!(count(&m, "QuantizeLinear") >= 2);
    // ONNX Runtime agrees (tools/check_target_ort.py --record wrote these figures)
    let r: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(models_dir().join("accuracy_outlier/ort_reference.json")).unwrap(),
    )
    .unwrap();
    let ort_target = r["target"]["ort_sqnr_db"].as_f64().unwrap();
    let ort_minmax = r["minmax"]["ort_sqnr_db"].as_f64().unwrap();
    assert!(ort_minmax < 30.0 && ort_target >= 30.0);
    assert!((ort_target - reached).abs() < 0.05 && (ort_minmax - minmax).abs() < 0.05);
}

#[test]
fn target_search_scores_the_bias_corrected_model_it_writes() {
    // with --bias-correction every variant the search scores has the biases of its quantized
    // layers corrected, as the model written has: the searched figure is the written one
    // (before, the search ran uncorrected and the correction came after: 34.76 searched,
    // 34.98 written)
    let scratch = TempDir::new("target");
    let out = scratch.join("bc.onnx");
    let (code, v, stderr) = quantize_outlier(
        &out,
        &[
            "--target-sqnr",
            "30",
            "--min-quantized",
            "30",
            "--bias-correction",
        ],
    );
    assert_eq!(code, 0, "{stderr}");
    let t = &v["target"];
    assert_eq!(t["bias_correction"], true);
    assert_eq!(fallback_nodes(t), ["fc2", "fc1"]);
    let searched = t["score"]["sqnr_db"].as_f64().unwrap();
    let written = reported_sqnr(&v);
    assert!((searched - written).abs() < 1e-6, "{searched} {written}");
    // only the layer left quantized is corrected; the float ones keep their biases
    let layers = v["quantization"]["bias_correction"]["layers"]
        .as_array()
        .unwrap();
    let corrected: Vec<&str> = layers.iter().map(|l| l["node"].as_str().unwrap()).collect();
    assert_eq!(corrected, ["fc3"]);
    // and the correction is worth something here: above the uncorrected search's 34.76
    assert!(written > 34.76 + 0.1, "{written}");
}

#[test]
fn unreachable_target_exits_1_and_writes_only_with_write_best() {
    let scratch = TempDir::new("target");
    let out = scratch.join("never.onnx");
    // a cheap search: --samples 1, and a target only the float model reaches, while half of
    // the Gemms must stay quantized (the default --min-quantized 50)
    let (code, v, stderr) = quantize_outlier(&out, &["--target-sqnr", "300", "--samples", "1"]);
    assert_eq!(code, 1, "{stderr}");
    assert!(!out.exists());
    assert!(v["written"].is_null());
    assert_eq!(v["target"]["met"], false);
    assert!(
        stderr.contains("the target (SQNR >= 300 dB) is not reached"),
        "{stderr}"
    );
    let (code, v, _) = quantize_outlier(
        &out,
        &["--target-sqnr", "300", "--samples", "1", "--write-best"],
    );
    assert_eq!(code, 1);
    assert!(out.exists());
    // the best model found leaves one Gemm float, the most the budget allows
    assert_eq!(v["target"]["compute_quantized"], 2);
    assert_eq!(v["target"]["fallback"].as_array().unwrap().len(), 1);
}

#[test]
fn a_target_met_on_the_search_samples_is_checked_on_the_whole_evaluation_data() {
    let scratch = TempDir::new("target");
    // The first evaluation sample meets 36 dB with fc2 and fc1 float (38.20); the four give
    // 34.71. The search checks, raises its goal on that sample by the gap, and goes on: fc3
    // float too. (Without the check this run exited 1 and wrote nothing.)
    let out = scratch.join("checked.onnx");
    let (code, v, stderr) = quantize_outlier(
        &out,
        &[
            "--target-sqnr",
            "36",
            "--min-quantized",
            "0",
            "--samples",
            "1",
        ],
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(out.exists());
    let t = &v["target"];
    assert_eq!(t["met"], true);
    let checks = t["checks"].as_array().unwrap();
    assert_eq!(checks.len(), 2, "{checks:?}");
    let first = &checks[0];
    let (sub, whole) = (
        first["search_score"]["sqnr_db"].as_f64().unwrap(),
        first["score"]["sqnr_db"].as_f64().unwrap(),
    );
    assert!(sub >= 36.0 && whole < 36.0, "{sub} {whole}");
    assert_eq!(first["left_float"], 2);
    // raised by the gap (and 0.1 dB), above what the sample had
    let raised = first["raised_sqnr_db"].as_f64().unwrap();
    assert!((raised - (36.0 + sub - whole + 0.1)).abs() < 1e-9 && raised > sub);
    assert!(checks[1].get("raised_sqnr_db").is_none());
    let mut left = fallback_nodes(t);
    left.sort();
    assert_eq!(left, ["fc1", "fc2", "fc3"]);
    assert!(reported_sqnr(&v) >= 36.0);

    // the search on every sample needs no check (and a target met with nothing left float
    // costs nothing)
    let (code, v, stderr) = quantize_outlier(
        &scratch.join("all.onnx"),
        &[
            "--target-sqnr",
            "30",
            "--min-quantized",
            "30",
            "--samples",
            "0",
        ],
    );
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(v["target"]["checks"].as_array().unwrap().len(), 0);
    let (code, v, stderr) = quantize_outlier(
        &scratch.join("none.onnx"),
        &["--target-sqnr", "10", "--samples", "0"],
    );
    // (the evaluation's criterion is the target: MinMax's 17.96 dB passes it)
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(v["evaluation"]["comparison"]["criterion"]["db"], 10.0);
    assert!(v["target"]["fallback"].as_array().unwrap().is_empty());
    assert!(v["target"].get("cost").is_none());
}

#[test]
fn target_mode_writes_the_searched_model_when_decomposed_hardswish_nodes_stay_float() {
    // quantize presents HardSwish as x * HardSigmoid(x); the search may leave float the
    // HardSigmoid it creates ('/HardSwish/HardSigmoid'), a node the model as given does not
    // have, and the model written must still be the one the search measured
    let scratch = TempDir::new("target");
    let out = scratch.join("best.onnx");
    let model = models_dir().join("real_ops/mbv3_block/model.onnx");
    let args = [
        "quantize",
        model.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--calib-random",
        "2",
        "--target-sqnr",
        "300",
        "--min-quantized",
        "0",
        "--samples",
        "2",
        "--write-best",
        "--json",
    ];
    let (code, stdout, stderr) = run_qfold(&args);
    assert_eq!(code, 1, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let left = fallback_nodes(&v["target"]);
    assert!(
        left.iter()
            .any(|n| n.ends_with("/HardSigmoid") && n.contains("HardSwish")),
        "{left:?}"
    );
    // the written model is the searched one: same figure on the same samples
    let searched = v["target"]["score"]["sqnr_db"].as_f64().unwrap();
    let written = reported_sqnr(&v);
    assert!((searched - written).abs() < 1e-6, "{searched} {written}");
    let m = qfold::onnx::load(&out).unwrap();
    assert!(
        count(&m, "HardSigmoid") >= 4,
        "the HardSwish nodes stay decomposed"
    );
}

/// `y = x W^T` (Gemm "fc", transB) with `w` of shape [m, k], a zero bias, `x` of shape [8, k].
fn gemm_model(w: Vec<f32>, m: usize, k: usize) -> Model {
    use qfold::onnx::{ElemType, TensorData};
    let w = TensorData::F32(ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&[m, k]), w).unwrap());
    let b = TensorData::F32(ndarray::ArrayD::zeros(ndarray::IxDyn(&[m])));
    model_of(
        vec![node_of(
            "Gemm",
            "fc",
            &["x", "w", "b"],
            &["y"],
            vec![int("transB", 1)],
        )],
        vec![("w".into(), w), ("b".into(), b)],
        value_info("x", ElemType::F32, &[8, k]),
        "y",
    )
}

/// [m, k] Gemm weights, row by row: 1.27 first (per-channel scale 0.01), then multiples of
/// 0.01 below 0.4, each moved by `offset` off its grid point.
fn grid_rows(m: usize, k: usize, offset: f32) -> Vec<f32> {
    (0..m * k)
        .map(|i| {
            if i % k == 0 {
                1.27
            } else {
                0.01 * ((i * 7 + i / k * 3) % 40) as f32 + offset
            }
        })
        .collect()
}

/// The next 24 bits of a 64-bit linear congruential generator.
fn lcg(state: &mut u64) -> u64 {
    *state = state
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    *state >> 40
}

#[test]
fn bias_correction_removes_a_systematic_weight_rounding_shift() {
    use qfold::quant::quantize;
    // y = x W^T with 4 output channels: one weight per row is 1.27 (scale 0.01 per channel),
    // the 63 others sit 0.4 step above a grid point, so each rounds down by 0.004: for inputs
    // of mean 1 every output shifts by about -0.25.
    let (k, m) = (64usize, 4usize);
    let w = grid_rows(m, k, 0.004);
    let model = gemm_model(w, m, k);
    let mut state = 7u64;
    let mut case = |_| {
        let v: Vec<f32> = (0..8 * k)
            .map(|_| 0.5 + lcg(&mut state) as f32 / (1u64 << 24) as f32)
            .collect();
        f32_case("x", &[8, k], v)
    };
    let calib: Vec<Case> = (0..8).map(&mut case).collect();
    let eval: Vec<Case> = (0..4).map(&mut case).collect();
    let sqnr = |bias_correction: bool| {
        let opts = QuantizeOptions {
            bias_correction,
            ..QuantizeOptions::default()
        };
        let (q, _, r) = quantize(&model, Calibration::Source(&calib), &opts).unwrap();
        let e = Evaluator::new(&model, eval.clone(), 1).unwrap();
        (e.score(&q).unwrap().db(), r.bias_correction)
    };
    let (plain, none) = sqnr(false);
    let (corrected, report) = sqnr(true);
    assert!(none.is_none());
    let report = report.unwrap();
    assert_eq!(report.layers.len(), 1);
    assert_eq!(report.samples, 8);
    // the shift removed: 0.004 per weight times the mean input (1) times 63 weights
    let shift = report.layers[0].mean_abs_shift;
    assert!((shift - 0.252).abs() < 0.01, "{shift}");
    assert!(plain > 25.0 && plain < 40.0, "{plain}");
    assert!(corrected > plain + 10.0, "{plain} -> {corrected}");
}

#[test]
fn output_bias_correction_removes_the_shift_activation_rounding_causes() {
    use qfold::quant::quantize;
    // y = x W^T, 4 output channels. The weights sit on their grid (row maximum 1.27, the others
    // multiples of 0.01: per-channel scale 0.01), so weight-only correction finds nothing. The
    // input is quantized with range [0, 2.55] (scale 0.01, zero point 0) and its other values
    // sit 0.4 step above a grid point: each rounds down by 0.004, and every output shifts by
    // -0.004 times its row sum. Only a correction measured on the quantized model sees it.
    let (k, m) = (64usize, 4usize);
    let w = grid_rows(m, k, 0.0);
    // the inputs that round: every column but 0 and 1 (0 and 2.55, on the grid)
    let row_sums: Vec<f64> = w
        .chunks(k)
        .map(|r| r[2..].iter().map(|&v| v as f64).sum())
        .collect();
    let model = gemm_model(w, m, k);
    let mut state = 11u64;
    let mut case = |_| {
        let v: Vec<f32> = (0..8 * k)
            .map(|i| match i % k {
                0 => 0.0,
                1 => 2.55,
                _ => 0.004 + 0.01 * (lcg(&mut state) % 200) as f32,
            })
            .collect();
        f32_case("x", &[8, k], v)
    };
    let calib: Vec<Case> = (0..8).map(&mut case).collect();
    let eval: Vec<Case> = (0..4).map(&mut case).collect();
    let run = |bias_correction: bool, output_bias_correction: bool| {
        let opts = QuantizeOptions {
            bias_correction,
            output_bias_correction,
            ..QuantizeOptions::default()
        };
        let (q, _, r) = quantize(&model, Calibration::Source(&calib), &opts).unwrap();
        let e = Evaluator::new(&model, eval.clone(), 1).unwrap();
        (e.score(&q).unwrap().db(), r)
    };
    let (plain, _) = run(false, false);
    let (weights_only, r) = run(true, false);
    let (corrected, r2) = run(false, true);
    // weight-only correction: nothing to correct
    let w_shift = r.bias_correction.unwrap().layers[0].max_abs_shift;
    assert!(w_shift < 1e-4, "{w_shift}");
    assert!((weights_only - plain).abs() < 0.1, "{plain} {weights_only}");
    // the output correction removes -0.004 x the row sum of the rounded columns per channel
    let report = r2.output_bias_correction.unwrap();
    assert_eq!(report.layers.len(), 1);
    assert_eq!(report.samples, 8);
    let mean: f64 = row_sums.iter().map(|s| 0.004 * s).sum::<f64>() / m as f64;
    let got = report.layers[0].mean_abs_shift;
    assert!((got - mean).abs() < 0.01 * mean, "{got} {mean}");
    assert!(plain > 40.0 && plain < 55.0, "{plain}");
    // 47.8 -> 57.1 dB measured; what is left is the output's own rounding (scale ~0.05)
    assert!(corrected > plain + 8.0, "{plain} -> {corrected}");
}

#[test]
fn output_bias_correction_is_refused_where_it_cannot_apply() {
    let scratch = TempDir::new("obc");
    let out = scratch.join("o.onnx");
    let (model, calib) = (outlier_path("model.onnx"), outlier_path("calib"));
    let args = |extra: &[&str]| -> (i32, String) {
        let mut a = vec![
            "quantize",
            &model,
            "-o",
            out.to_str().unwrap(),
            "--calib",
            &calib,
        ];
        a.extend(extra);
        let (code, _, stderr) = run_qfold(&a);
        (code, stderr)
    };
    let (code, err) = args(&["--output-bias-correction", "--target-sqnr", "30"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("--output-bias-correction is not combined"),
        "{err}"
    );
    let (code, _, err) = run_qfold(&[
        "analyze",
        &model,
        "--calib",
        &calib,
        "--output-bias-correction",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("drop --output-bias-correction"), "{err}");
    assert!(!out.exists());
}

/// 1x1 conv 4 -> 8, Clip(0, 6), depthwise 3x3 (group 8), Clip(0, 6), 1x1 conv 8 -> 4, with
/// channel scales spread over two orders of magnitude; input `x` [1, 4, 6, 6], output `y`.
fn dw_relu6_model() -> Model {
    use qfold::onnx::{ElemType, TensorData};
    let mut state = 3u64;
    let mut rnd = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    // spread: channel c scaled by 10^(c % 3 - 1) times `spread` (1: as is, -1: inverted)
    let mut tensor = |shape: &[usize], spread: i32| {
        let n: usize = shape.iter().product();
        let per = n / shape[0];
        let v: Vec<f32> = (0..n)
            .map(|i| rnd() * 10f32.powi(spread * ((i / per) as i32 % 3 - 1)))
            .collect();
        TensorData::F32(ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(shape), v).unwrap())
    };
    let inits = vec![
        ("w1".to_string(), tensor(&[8, 4, 1, 1], 1)),
        ("b1".to_string(), tensor(&[8], 0)),
        ("w2".to_string(), tensor(&[8, 1, 3, 3], -1)),
        ("b2".to_string(), tensor(&[8], 0)),
        ("w3".to_string(), tensor(&[4, 8, 1, 1], 0)),
        (
            "lo".to_string(),
            TensorData::F32(ndarray::arr0(0.0f32).into_dyn()),
        ),
        (
            "hi".to_string(),
            TensorData::F32(ndarray::arr0(6.0f32).into_dyn()),
        ),
    ];
    let pads = || ints("pads", &[1, 1, 1, 1]);
    model_of(
        vec![
            node_of("Conv", "pw1", &["x", "w1", "b1"], &["a"], vec![]),
            node_of("Clip", "relu6a", &["a", "lo", "hi"], &["b"], vec![]),
            node_of(
                "Conv",
                "dw",
                &["b", "w2", "b2"],
                &["c"],
                vec![int("group", 8), pads()],
            ),
            node_of("Clip", "relu6b", &["c", "lo", "hi"], &["d"], vec![]),
            node_of("Conv", "pw2", &["d", "w3"], &["y"], vec![]),
        ],
        inits,
        value_info("x", ElemType::F32, &[1, 4, 6, 6]),
        "y",
    )
}

#[test]
fn equalization_through_depthwise_convs_and_relu6_is_exact() {
    let model = dw_relu6_model();
    let mut eq = model.clone();
    let r = equalize::equalize(&mut eq, &Default::default()).unwrap();
    assert_eq!(r.pairs, ["pw1 -> relu6a -> dw", "dw -> relu6b -> pw2"]);
    assert!(
        r.per_tensor_weight_sqnr_after > r.per_tensor_weight_sqnr_before + 3.0,
        "{r:?}"
    );
    // each ReLU6 became Relu -> Min with a per-channel cap
    assert_eq!(count(&eq, "Clip"), 0);
    assert_eq!(count(&eq, "Min"), 2);
    assert_eq!(count(&eq, "Relu"), 2);
    let mut capped = 0;
    for seed in 0..3 {
        let v: Vec<f32> = (0..144)
            .map(|i| ((i * 37 + seed * 11) % 29) as f32 - 14.0)
            .collect();
        let c = f32_case("x", &[1, 4, 6, 6], v);
        let a = run(&model, &c);
        let b = run(&eq, &c);
        // the caps bind: some values of the first ReLU6 reach 6
        let r = qfold::runtime::Runner::new(&model, &c.inputs, &["b".to_string()]).unwrap();
        let relu6 = r.run(&c.inputs).unwrap()[1].to_f64();
        capped += relu6.iter().filter(|&&v| v == 6.0).count();
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
    assert!(capped > 0);
}

/// Equalization is exact on any model given in `QFOLD_EQUALIZE_MODEL` (e.g. the torchvision
/// exports of tools/export_torchvision.py, outside the repository):
/// `QFOLD_EQUALIZE_MODEL=/tmp/qfold_acc_tv/resnet18/model.onnx cargo test --test quant_accuracy -- --ignored`
#[test]
#[ignore]
fn equalization_is_exact_on_a_given_model() {
    let path = std::env::var("QFOLD_EQUALIZE_MODEL").expect("QFOLD_EQUALIZE_MODEL");
    let m = qfold::onnx::load(&path).unwrap();
    let mut fused = m.clone();
    qfold::fusion::fuse(&mut fused, &Default::default()).unwrap();
    let mut eq = fused.clone();
    let r = equalize::equalize(&mut eq, &Default::default()).unwrap();
    eprintln!(
        "{} spaces, {} sweeps, per-tensor weight SQNR {:.2} -> {:.2} dB",
        r.pairs.len(),
        r.sweeps,
        r.per_tensor_weight_sqnr_before,
        r.per_tensor_weight_sqnr_after
    );
    let cases = verify::random_cases(&m, 2, 5, &Default::default()).unwrap();
    for c in &cases {
        let a = run(&fused, c);
        let b = run(&eq, c);
        let cmp = compare(&a, &b, qfold::verify::Criterion::MinSqnr { db: 0.0 });
        eprintln!(
            "max abs {:e}, sqnr {:?}",
            cmp.outputs[0].max_abs, cmp.outputs[0].sqnr_db
        );
        assert_close(
            &a,
            &b,
            qfold::verify::Criterion::Tolerance {
                atol: 1e-4,
                rtol: 1e-3,
            },
            "equalized",
        );
    }
}

/// Samples of [`dw_relu6_model`]'s input: seeds `range`.
fn dw_relu6_cases(range: std::ops::Range<usize>) -> Vec<Case> {
    range
        .map(|seed| {
            let v: Vec<f32> = (0..144)
                .map(|i| ((i * 37 + seed * 11) % 29) as f32 - 14.0)
                .collect();
            f32_case("x", &[1, 4, 6, 6], v)
        })
        .collect()
}

/// Equalization writes a ReLU6 between scaled channels as Relu -> Min(x, per-channel cap). The
/// Relu's output (absorbed into the conv before it) takes the Min output's parameters, so a
/// value under its cap is rounded once; calibrated on its own range it was rounded twice, the
/// first time on a coarser grid (mobilenet_v2, per-tensor + equalize: 19.47 -> 20.56 dB in ONNX
/// Runtime).
#[test]
fn values_before_a_per_channel_cap_take_the_caps_parameters() {
    use qfold::quant::plan::Source;
    let model = dw_relu6_model();
    let calib = dw_relu6_cases(0..8);
    let eval = dw_relu6_cases(8..12);
    let opts = QuantizeOptions {
        per_channel: false,
        equalize: true,
        equalize_bias_correction: false,
        ..QuantizeOptions::default()
    };
    let prepared = prepare(&model, &opts).unwrap();
    let shared = prepared.plan.clone();
    let mut own = shared.clone();
    for (x, cap) in [("b_relu", "b"), ("d_relu", "d")] {
        assert_eq!(
            shared.activations.get(x),
            Some(&Source::Calibrated(cap.into())),
            "{:?}",
            shared.activations
        );
        own.activations
            .insert(x.into(), Source::Calibrated(x.into()));
    }
    // one calibration observes every value either plan needs
    let both = qfold::quant::Prepared {
        plan: own.clone(),
        ..prepared.clone()
    };
    let (ranges, _) = calibrate_prepared(&both, Calibration::Source(&calib), &opts).unwrap();
    let e = Evaluator::new(&model, eval, 1).unwrap();
    let score = |plan: &qfold::quant::plan::QuantPlan| {
        let (q, _) = qfold::quant::emit(&prepared, plan, &ranges, &opts).unwrap();
        e.score(&q).unwrap().db()
    };
    let (once, twice) = (score(&shared), score(&own));
    eprintln!("rounded once {once:.2} dB, twice {twice:.2} dB");
    assert!(once > twice + 1.0, "{once} vs {twice}");
}

fn quantize_digits(out: &std::path::Path, extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "quantize".to_string(),
        digits_path("model.onnx"),
        "-o".into(),
        out.display().to_string(),
        "--calib".into(),
        digits_path("calib"),
        "--eval".into(),
        digits_path("eval"),
        "--json".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, stdout, stderr) = run_qfold(&refs);
    assert!(code == 0 || code == 1, "{stderr}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}{stderr}"))
}

/// `--equalize` corrects biases too (the paper's pipeline; `--no-bias-correction` turns it
/// off), and the tract preset keeps equalization only where it measures better on the
/// calibration samples: on digits, equalization alone cost 0.9 dB (38.20 -> 37.28 dB), with
/// bias correction it gains.
#[test]
fn equalize_corrects_biases_and_the_tract_preset_measures_it() {
    let scratch = TempDir::new("equalize");
    let out = scratch.join("q.onnx");
    let plain = quantize_digits(&out, &["--per-tensor"]);
    let alone = quantize_digits(
        &out,
        &["--per-tensor", "--equalize", "--no-bias-correction"],
    );
    let dfq = quantize_digits(&out, &["--per-tensor", "--equalize"]);
    assert!(alone["quantization"].get("bias_correction").is_none());
    assert!(dfq["quantization"]["bias_correction"].is_object());
    let (plain, alone, dfq) = (
        reported_sqnr(&plain),
        reported_sqnr(&alone),
        reported_sqnr(&dfq),
    );
    eprintln!("per-tensor {plain:.2}, + equalize alone {alone:.2}, + bias correction {dfq:.2}");
    assert!(
        dfq > plain + 1.0 && dfq > alone + 1.0,
        "{plain} {alone} {dfq}"
    );
    assert!((plain - 38.20).abs() < 0.05 && (dfq - 40.81).abs() < 0.05);

    let tract = quantize_digits(&out, &["--preset", "tract", "--format", "qdq"]);
    let c = &tract["equalize_choice"];
    let (with, without) = (
        c["sqnr_with_db"].as_f64().unwrap(),
        c["sqnr_without_db"].as_f64().unwrap(),
    );
    eprintln!("tract preset on the calibration samples: {with:.2} dB with, {without:.2} without");
    assert_eq!(c["equalized"], true);
    assert!(with > without + 1.0, "{c}");
    assert!(tract["quantization"]["equalization"].is_object());
    // the same model as --per-tensor --equalize, so the same figures
    assert!((reported_sqnr(&tract) - dfq).abs() < 1e-9);
    // an explicit choice is not measured
    for flag in ["--equalize", "--no-equalize"] {
        let v = quantize_digits(&out, &["--preset", "tract", "--format", "qdq", flag]);
        assert!(v.get("equalize_choice").is_none());
        assert_eq!(
            v["quantization"].get("equalization").is_some(),
            flag == "--equalize"
        );
    }
}

/// High-bias absorption after equalization: in [`dw_relu6_model`] with a high bias on the
/// depthwise conv's first channel, the equalized ReLU6 before the 1x1 projection (`Relu ->
/// Min(x, cap)`) gives up each channel's lower bound to `pw2`'s bias, and its cap drops by the
/// same amount; the first ReLU6 feeds a padded depthwise conv and is left as it is. The float
/// model computes the same outputs on the calibration samples, the report says what moved, and
/// the CLI refuses the option with `--ranges` (it measures on calibration samples).
#[test]
fn high_bias_absorption_after_equalization_is_exact_on_the_calibration_data() {
    use qfold::onnx::TensorData;
    let mut model = dw_relu6_model();
    let b2 = model
        .graph_mut()
        .initializer
        .iter_mut()
        .find(|t| t.name == "b2")
        .unwrap();
    let mut v = TensorData::from_proto(b2).unwrap().to_f64();
    v[[0]] = 8.0;
    *b2 = TensorData::from_f64(v, qfold::onnx::ElemType::F32)
        .unwrap()
        .to_proto("b2");
    let calib = dw_relu6_cases(0..8);
    let opts = QuantizeOptions {
        per_channel: false,
        equalize: true,
        high_bias_absorption: true,
        ..QuantizeOptions::default()
    };
    let mut prepared = prepare(&model, &opts).unwrap();
    let before = prepared.float.clone();
    qfold::quant::absorb_prepared(&mut prepared, &calib, &opts).unwrap();
    let r = prepared.absorption.as_ref().unwrap();
    assert_eq!(r.samples, 8);
    assert_eq!(r.activations.len(), 1, "{r:?}");
    let a = &r.activations[0];
    assert!(
        a.chain.starts_with("dw -> ") && a.chain.ends_with("pw2"),
        "{a:?}"
    );
    assert!(a.absorbed >= 1 && a.max_amount > 1.0, "{a:?}");
    for c in &calib {
        assert_close(
            &run(&before, c),
            &run(&prepared.float, c),
            qfold::verify::Criterion::Tolerance {
                atol: 1e-4,
                rtol: 1e-4,
            },
            "absorbed",
        );
    }
    // the plan follows the new bias names
    let b = &qfold::graph::Graph::of_model(&prepared.float);
    let pw2 = b.node(b.node_by_name("pw2").unwrap());
    assert!(prepared
        .plan
        .biases
        .iter()
        .any(|w| w.node == "pw2" && w.tensor == pw2.input[2]));

    // the CLI: refused with --ranges, reported with --calib
    let scratch = TempDir::new("absorb");
    let out = scratch.join("q.onnx");
    let ranges = scratch.join("r.json");
    let saved = quantize_digits(&out, &["--save-ranges", ranges.to_str().unwrap()]);
    assert!(saved["quantization"].get("high_bias_absorption").is_none());
    let (code, _, err) = run_qfold(&[
        "quantize",
        &digits_path("model.onnx"),
        "-o",
        out.to_str().unwrap(),
        "--ranges",
        ranges.to_str().unwrap(),
        "--high-bias-absorption",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("give --calib, not --ranges"), "{err}");
    // (the digits CNN's Relus feed MaxPool or padded convs: nothing to absorb, as reported)
    let v = quantize_digits(&out, &["--high-bias-absorption"]);
    let h = &v["quantization"]["high_bias_absorption"];
    assert!(h["samples"].as_u64().unwrap() > 0, "{h}");
    assert_eq!(h["activations"].as_array().map(Vec::len), Some(0), "{h}");
    assert_eq!(reported_sqnr(&v), reported_sqnr(&saved));
}
