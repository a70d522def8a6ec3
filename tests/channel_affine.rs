//! Channel-affine folding: Conv / ConvTranspose / Gemm followed by Add, Sub, Mul or Div by a
//! per-output-channel constant (Paddle's ConvTranspose -> Add -> BN, TF's BN written as
//! Sub / Mul / Add) folds into the weights and bias, and a BN after the chain folds too.

mod common;

use common::*;
use ndarray::{ArrayD, IxDyn};
use qfold::fusion::{fuse, FuseOptions, GroupKind};
use qfold::onnx::proto::NodeProto;
use qfold::onnx::{ElemType, Model, TensorData};

fn f32s(shape: &[usize], values: &[f32]) -> TensorData {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|k| values[k % values.len()]).collect();
    TensorData::F32(ArrayD::from_shape_vec(IxDyn(shape), v).unwrap())
}

fn sample(shape: &[usize]) -> qfold::verify::Case {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|k| ((k * 37) % 23) as f32 / 11.0 - 1.0)
        .collect();
    f32_case("x", shape, v)
}

fn bn(input: &str, output: &str) -> NodeProto {
    node_of(
        "BatchNormalization",
        "bn",
        &[input, "s", "bb", "m", "v"],
        &[output],
        vec![],
    )
}

fn bn_params() -> Vec<(String, TensorData)> {
    vec![
        ("s".into(), f32s(&[4], &[1.5, 0.7, 1.1, -0.4])),
        ("bb".into(), f32s(&[4], &[0.1, 0.0, -0.1, 0.3])),
        ("m".into(), f32s(&[4], &[0.2, -0.3, 0.05, 0.1])),
        ("v".into(), f32s(&[4], &[0.9, 1.3, 0.4, 2.0])),
    ]
}

/// Fuses `m`; asserts the ops left and equality with the original in tract.
fn folds(m: &Model, input: &[usize], left: &[(&str, usize)]) -> qfold::fusion::FuseReport {
    let mut fused = m.clone();
    let r = fuse(&mut fused, &FuseOptions::default()).unwrap();
    for (op, n) in left {
        assert_eq!(count(&fused, op), *n, "{op}: {:?}", r.skipped);
    }
    let case = sample(input);
    assert_close(
        &run(m, &case),
        &run(&fused, &case),
        qfold::verify::tolerance::FLOAT,
        "fused against original",
    );
    r
}

#[test]
fn paddle_conv_transpose_then_bias_add_then_bn() {
    let mut inits = bn_params();
    inits.push((
        "w".into(),
        f32s(&[2, 2, 3, 3], &[0.3, -0.2, 0.1, 0.05, 0.4]),
    ));
    inits.push(("bias".into(), f32s(&[1, 4, 1, 1], &[0.5, -0.5, 0.25, 1.0])));
    let m = model_of(
        vec![
            node_of(
                "ConvTranspose",
                "ct",
                &["x", "w"],
                &["t"],
                vec![int("group", 2)],
            ),
            node_of("Add", "add", &["t", "bias"], &["u"], vec![]),
            bn("u", "y"),
        ],
        inits,
        value_info("x", ElemType::F32, &[1, 2, 4, 4]),
        "y",
    );
    let r = folds(
        &m,
        &[1, 2, 4, 4],
        &[("Add", 0), ("BatchNormalization", 0), ("ConvTranspose", 1)],
    );
    assert_eq!(r.groups[0].kind, GroupKind::ConvAffine);
    assert_eq!(r.groups[1].kind, GroupKind::ConvTransposeBn);
}

#[test]
fn tf_batch_norm_as_sub_mul_add_after_conv() {
    let m = model_of(
        vec![
            node_of(
                "Conv",
                "conv",
                &["x", "w"],
                &["t"],
                vec![ints("pads", &[1, 1, 1, 1])],
            ),
            node_of("Sub", "sub", &["t", "mean"], &["a"], vec![]),
            node_of("Mul", "mul", &["scale", "a"], &["b"], vec![]),
            node_of("Add", "add", &["b", "shift"], &["y"], vec![]),
        ],
        vec![
            (
                "w".into(),
                f32s(&[4, 3, 3, 3], &[0.2, -0.1, 0.05, 0.3, -0.25]),
            ),
            ("mean".into(), f32s(&[4, 1, 1], &[0.1, -0.2, 0.3, 0.0])),
            ("scale".into(), f32s(&[1, 4, 1, 1], &[1.5, -0.5, 2.0, 0.75])),
            ("shift".into(), f32s(&[4, 1, 1], &[0.5, 0.25, -0.5, 0.1])),
        ],
        value_info("x", ElemType::F32, &[1, 3, 5, 5]),
        "y",
    );
    let r = folds(
        &m,
        &[1, 3, 5, 5],
        &[("Sub", 0), ("Mul", 0), ("Add", 0), ("Conv", 1)],
    );
    assert_eq!(r.groups.len(), 3);
}

#[test]
fn constant_minus_conv_and_division_and_gemm_columns() {
    // k - Conv(x) then / d
    let m = model_of(
        vec![
            node_of("Conv", "conv", &["x", "w", "b"], &["t"], vec![]),
            node_of("Sub", "sub", &["k", "t"], &["a"], vec![]),
            node_of("Div", "div", &["a", "d"], &["y"], vec![]),
        ],
        vec![
            (
                "w".into(),
                f32s(&[4, 3, 1, 1], &[0.2, -0.1, 0.05, 0.3, -0.25]),
            ),
            ("b".into(), f32s(&[4], &[0.1, 0.2, 0.3, 0.4])),
            ("k".into(), f32s(&[], &[0.5])),
            ("d".into(), f32s(&[4, 1, 1], &[2.0, -4.0, 0.5, 1.0])),
        ],
        value_info("x", ElemType::F32, &[1, 3, 5, 5]),
        "y",
    );
    folds(&m, &[1, 3, 5, 5], &[("Sub", 0), ("Div", 0)]);
    // Gemm (transB = 1, beta = 2) * per-column k
    let m = model_of(
        vec![
            node_of(
                "Gemm",
                "gemm",
                &["x", "B", "C"],
                &["t"],
                vec![int("transB", 1), float("beta", 2.0)],
            ),
            node_of("Mul", "mul", &["t", "k"], &["y"], vec![]),
        ],
        vec![
            ("B".into(), f32s(&[4, 3], &[0.2, -0.1, 0.05, 0.3, -0.25])),
            ("C".into(), f32s(&[4], &[0.1, 0.2, 0.3, 0.4])),
            ("k".into(), f32s(&[4], &[1.5, -0.5, 2.0, 0.75])),
        ],
        value_info("x", ElemType::F32, &[2, 3]),
        "y",
    );
    folds(&m, &[2, 3], &[("Mul", 0), ("Gemm", 1)]);
}

#[test]
fn operands_that_are_not_per_channel_or_shared_outputs_stay() {
    // [C] on a Conv output broadcasts along the width, not the channels; k / T is not affine.
    let m = model_of(
        vec![
            node_of("Conv", "conv", &["x", "w"], &["t"], vec![]),
            node_of("Add", "add", &["t", "row"], &["a"], vec![]),
            node_of("Div", "div", &["k", "a"], &["y"], vec![]),
        ],
        vec![
            ("w".into(), f32s(&[4, 3, 1, 1], &[0.2, -0.1])),
            ("row".into(), f32s(&[5], &[0.1, 0.2, 0.3, 0.4, 0.5])),
            ("k".into(), f32s(&[], &[2.0])),
        ],
        value_info("x", ElemType::F32, &[1, 3, 5, 5]),
        "y",
    );
    let r = folds(&m, &[1, 3, 5, 5], &[("Add", 1), ("Div", 1)]);
    assert!(
        r.skipped
            .iter()
            .any(|s| s.reason.contains("per output channel")),
        "{:?}",
        r.skipped
    );
    // the Conv output read twice: not folded
    let m = model_of(
        vec![
            node_of("Conv", "conv", &["x", "w"], &["t"], vec![]),
            node_of("Mul", "mul", &["t", "k"], &["a"], vec![]),
            node_of("Add", "add", &["t", "a"], &["y"], vec![]),
        ],
        vec![
            ("w".into(), f32s(&[4, 3, 1, 1], &[0.2, -0.1])),
            ("k".into(), f32s(&[4, 1, 1], &[2.0, 3.0])),
        ],
        value_info("x", ElemType::F32, &[1, 3, 5, 5]),
        "y",
    );
    folds(&m, &[1, 3, 5, 5], &[("Mul", 1)]);
}

/// Conv -> BN -> Mul by a scalar -> Add a scalar (PP-LCNetV3's learnable affine block).
fn conv_bn_scalar_affine() -> Model {
    let mut inits = bn_params();
    inits.push(("w".into(), f32s(&[4, 3, 3, 3], &[0.2, -0.1, 0.05, 0.3])));
    inits.push(("k".into(), f32s(&[1], &[1.9])));
    inits.push(("c".into(), f32s(&[1], &[0.8])));
    model_of(
        vec![
            node_of("Conv", "conv", &["x", "w"], &["t"], vec![]),
            bn("t", "u"),
            node_of("Mul", "mul", &["k", "u"], &["a"], vec![]),
            node_of("Add", "add", &["a", "c"], &["y"], vec![]),
        ],
        inits,
        value_info("x", ElemType::F32, &[1, 3, 6, 6]),
        "y",
    )
}

#[test]
fn no_affine_folding_keeps_the_scalar_chain_and_still_folds_bn() {
    let m = conv_bn_scalar_affine();
    // by default the whole chain folds into the Conv
    folds(
        &m,
        &[1, 3, 6, 6],
        &[("BatchNormalization", 0), ("Mul", 0), ("Add", 0)],
    );
    let mut kept = m.clone();
    let opts = FuseOptions {
        no_affine_folding: true,
        ..FuseOptions::default()
    };
    let r = fuse(&mut kept, &opts).unwrap();
    assert_eq!(
        (
            count(&kept, "BatchNormalization"),
            count(&kept, "Mul"),
            count(&kept, "Add")
        ),
        (0, 1, 1)
    );
    assert!(
        r.groups.iter().all(|g| g.kind != GroupKind::ConvAffine),
        "{:?}",
        r.groups
    );
    let case = sample(&[1, 3, 6, 6]);
    assert_close(
        &run(&m, &case),
        &run(&kept, &case),
        qfold::verify::tolerance::FLOAT,
        "fused without affine folding against original",
    );
}

#[test]
fn no_affine_folding_on_the_command_line() {
    let dir = TempDir::new("no-affine");
    let model = dir.join("m.onnx");
    qfold::onnx::save(&conv_bn_scalar_affine(), &model, &Default::default()).unwrap();
    let model = model.to_str().unwrap();
    let fused = dir.join("f.onnx");
    let (code, out, err) = run_qfold(&[
        "fuse",
        model,
        "-o",
        fused.to_str().unwrap(),
        "--no-affine-folding",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    let kinds: Vec<&str> = j["fusion"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["ConvBn"]);
    // quantize: the Mul and the Add stay, each between DequantizeLinear and QuantizeLinear
    let q = dir.join("q.onnx");
    let (code, out, err) = run_qfold(&[
        "quantize",
        model,
        "-o",
        q.to_str().unwrap(),
        "--calib-random",
        "4",
        "--no-affine-folding",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        j["quantization"]["options"]["no_affine_folding"], true,
        "{j}"
    );
    let q = qfold::onnx::load(&q).unwrap();
    assert_eq!((count(&q, "Mul"), count(&q, "Add")), (1, 1));
    let reads_dq = |op: &str| {
        let g = q.graph();
        let n = g.node.iter().find(|n| n.op_type == op).unwrap();
        n.input.iter().any(|i| {
            g.node
                .iter()
                .any(|p| p.op_type == "DequantizeLinear" && p.output.first() == Some(i))
        })
    };
    assert!(reads_dq("Mul") && reads_dq("Add"));
    // and without the flag both are folded away
    let (code, _, err) = run_qfold(&[
        "quantize",
        model,
        "-o",
        dir.join("q2.onnx").to_str().unwrap(),
        "--calib-random",
        "4",
    ]);
    assert_eq!(code, 0, "{err}");
    let q2 = qfold::onnx::load(dir.join("q2.onnx")).unwrap();
    assert_eq!((count(&q2, "Mul"), count(&q2, "Add")), (0, 0));
}

/// `quantize` measures the channel-affine folds: it quantizes with and without them, scores
/// both on the calibration samples, keeps the folds unless leaving them out scores strictly
/// better (PP-OCRv4 det: kept on real document scans, 11.18 against 6.50 dB; left out on
/// synthetic pages, 10.34 against 11.46), reports both figures and writes the model it chose.
/// Only the single-value folds are measured (PP-LCNetV3's learnable affine blocks, which ONNX
/// Runtime's pre-processing leaves); the per-channel ones are made either way.
/// `--affine-folding` and `--no-affine-folding` decide without measuring; a model with no such
/// fold measures nothing.
#[test]
fn quantize_measures_the_affine_folds_and_writes_the_one_it_chose() {
    use qfold::quant::{analyze::Evaluator, quantize, Calibration, QuantizeOptions};
    let m = conv_bn_scalar_affine();
    let cases: Vec<qfold::verify::Case> =
        qfold::verify::random_cases(&m, 4, 7, &Default::default()).unwrap();
    let opts = QuantizeOptions::default();
    let c = qfold::quant::choose_affine_folding(&m, &cases, &opts)
        .unwrap()
        .unwrap();
    // the Mul and the Add by single values, each a fold
    assert_eq!((c.folds, c.samples), (2, 4), "{c:?}");
    // each figure is that variant's, quantized and scored on the same samples
    let e = Evaluator::new(&m, cases.clone(), 1).unwrap();
    for (no_scalar, got) in [(false, c.sqnr_with_db), (true, c.sqnr_without_db)] {
        let o = QuantizeOptions {
            no_scalar_affine_folding: no_scalar,
            ..QuantizeOptions::default()
        };
        let (q, _, _) = quantize(&m, Calibration::Source(&cases), &o).unwrap();
        let want = e.score(&q).unwrap().sqnr_db.unwrap();
        let got = got.unwrap();
        assert!((got - want).abs() < 0.01, "{got} {want}");
    }
    let (with, without) = (c.sqnr_with_db.unwrap(), c.sqnr_without_db.unwrap());
    assert_eq!(c.folded, with >= without, "{c:?}");
    assert!(
        with != without,
        "the two forms should round differently: {c:?}"
    );
    // a per-channel fold (Paddle's bias Add) is made either way: only the single values count
    let bias_then_scale = model_of(
        vec![
            node_of("Conv", "conv", &["x", "w"], &["t"], vec![]),
            node_of("Add", "bias", &["t", "b"], &["u"], vec![]),
            node_of("Mul", "scale", &["u", "k"], &["y"], vec![]),
        ],
        vec![
            ("w".into(), f32s(&[4, 3, 3, 3], &[0.2, -0.1, 0.05, 0.3])),
            ("b".into(), f32s(&[4, 1, 1], &[0.1, -0.2, 0.3, 0.05])),
            ("k".into(), f32s(&[], &[1.7])),
        ],
        value_info("x", ElemType::F32, &[1, 3, 6, 6]),
        "y",
    );
    let per_channel_only = QuantizeOptions {
        no_scalar_affine_folding: true,
        ..QuantizeOptions::default()
    };
    let p = qfold::quant::prepare(&bias_then_scale, &per_channel_only).unwrap();
    assert_eq!((count(&p.float, "Add"), count(&p.float, "Mul")), (0, 1));
    let c = qfold::quant::choose_affine_folding(&bias_then_scale, &cases, &opts)
        .unwrap()
        .unwrap();
    assert_eq!(c.folds, 1, "{c:?}");
    // nothing to choose where fusion makes no channel-affine fold
    let plain = model_of(
        vec![node_of("Conv", "conv", &["x", "w"], &["y"], vec![])],
        vec![("w".into(), f32s(&[4, 3, 3, 3], &[0.2, -0.1, 0.05, 0.3]))],
        value_info("x", ElemType::F32, &[1, 3, 6, 6]),
        "y",
    );
    assert!(qfold::quant::choose_affine_folding(&plain, &cases, &opts)
        .unwrap()
        .is_none());

    // the command line: the choice in the report, the model written as chosen
    let dir = TempDir::new("affine-choice");
    let model = dir.join("m.onnx");
    qfold::onnx::save(&m, &model, &Default::default()).unwrap();
    let model = model.to_str().unwrap();
    let quantize_cli = |extra: &[&str]| {
        let q = dir.join("q.onnx");
        let mut args = vec![
            "quantize",
            model,
            "-o",
            q.to_str().unwrap(),
            "--calib-random",
            "4",
            "--json",
        ];
        args.extend_from_slice(extra);
        let (code, out, err) = run_qfold(&args);
        assert_eq!(code, 0, "{err}");
        let j: serde_json::Value = serde_json::from_str(&out).unwrap();
        (j, count(&qfold::onnx::load(&q).unwrap(), "Mul"))
    };
    let (j, muls) = quantize_cli(&[]);
    let ch = &j["affine_folding_choice"];
    assert_eq!(ch["folds"], 2, "{j}");
    let folded = ch["folded"].as_bool().unwrap();
    assert_eq!(
        folded,
        ch["sqnr_with_db"].as_f64().unwrap() >= ch["sqnr_without_db"].as_f64().unwrap()
    );
    assert_eq!(muls, usize::from(!folded));
    for (flag, want_muls) in [("--affine-folding", 0), ("--no-affine-folding", 1)] {
        let (j, muls) = quantize_cli(&[flag]);
        assert!(j.get("affine_folding_choice").is_none(), "{flag}: {j}");
        assert_eq!(muls, want_muls, "{flag}");
    }
}
