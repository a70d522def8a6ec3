//! QDQ -> QOperator: each rule on structure and numbers; conversion of ONNX Runtime's QDQ
//! output; QOperator against QDQ (within one quantization step) and against float (SQNR within
//! 0.5 dB of the QDQ model's).

mod common;

use common::*;
use qfold::onnx::{ElemType, Model, TensorData};
use qfold::quant::qoperator::convert;
use qfold::quant::{quantize, Calibration, QuantizeOptions};
use qfold::verify::{self, Case, Criterion};

fn sqnr(reference: &[TensorData], actual: &[TensorData]) -> f64 {
    compare(reference, actual, Criterion::MinSqnr { db: 0.0 }).outputs[0]
        .sqnr_db
        .unwrap_or(f64::INFINITY)
}

fn digits_cases(sub: &str) -> (Model, Vec<Case>) {
    let dir = models_dir().join("digits_cnn");
    let m = qfold::onnx::load(dir.join("model.onnx")).unwrap();
    let cases = verify::read_dataset(&m, &dir.join(sub)).unwrap();
    (m, cases)
}

/// Largest difference between two runs, in units of the output's quantization step.
fn steps(a: &[TensorData], b: &[TensorData], step: f32) -> f64 {
    let cmp = compare(a, b, Criterion::MinSqnr { db: 0.0 });
    cmp.outputs[0].max_abs / step as f64
}

#[test]
fn digits_qoperator_matches_qdq_and_keeps_sqnr() {
    let (m, calib) = digits_cases("calib");
    let (_, eval) = digits_cases("eval");
    let s: Vec<_> = calib.iter().map(|c| c.inputs.clone()).collect();
    let (qdq, _, report) =
        quantize(&m, Calibration::Samples(&s), &QuantizeOptions::default()).unwrap();
    let mut qop = qdq.clone();
    let r = convert(&mut qop).unwrap();
    assert_eq!(
        count(&qop, "QLinearConv"),
        5,
        "3 Conv + 2 Gemm as 1-D QLinearConv"
    );
    for op in ["Conv", "Gemm", "Relu", "MatMul"] {
        assert_eq!(count(&qop, op), 0, "{op} left");
    }
    assert_eq!(
        r.float_islands,
        [(
            "/gap/GlobalAveragePool".to_string(),
            "GlobalAveragePool".to_string()
        )]
    );
    // MaxPool and Flatten run on the 8-bit tensor: their input is no longer dequantized
    for op in ["MaxPool", "Flatten"] {
        let n = qop.graph().node.iter().find(|n| n.op_type == op).unwrap();
        let p = qop
            .graph()
            .node
            .iter()
            .find(|p| p.output.contains(&n.input[0]))
            .unwrap();
        assert_ne!(p.op_type, "DequantizeLinear", "{op} reads {}", p.op_type);
    }
    let step = report.qdq.activation_params["logits"].0;
    let (mut worst, mut s_qdq, mut s_qop) = (0.0f64, vec![], vec![]);
    for c in &eval {
        let f = run(&m, c);
        let a = run(&qdq, c);
        let b = run(&qop, c);
        worst = worst.max(steps(&a, &b, step));
        s_qdq.push(sqnr(&f, &a));
        s_qop.push(sqnr(&f, &b));
    }
    assert!(
        worst <= 1.0 + 1e-4,
        "QOperator differs from QDQ by {worst} quantization steps"
    );
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    assert!(
        (mean(&s_qdq) - mean(&s_qop)).abs() <= 0.5,
        "{} vs {}",
        mean(&s_qdq),
        mean(&s_qop)
    );
}

#[test]
fn convert_onnx_runtime_qdq_output() {
    for (case, bn_rules) in [("ort_qdq_digits_prep", 0), ("ort_qdq_digits_raw", 3)] {
        let rc = load_case(case);
        let mut m = rc.model.clone();
        let r = convert(&mut m).unwrap();
        let depthwise = r
            .converted
            .iter()
            .filter(|(rule, _)| rule == "bn_to_depthwise")
            .count();
        assert_eq!(depthwise, bn_rules, "{case}");
        assert_eq!(count(&m, "BatchNormalization"), 0, "{case}");
        assert_eq!(count(&m, "Conv") + count(&m, "Gemm"), 0, "{case}");
        assert_eq!(count(&m, "QLinearConv"), 5 + bn_rules, "{case}");
        let want = expected(&rc.case);
        let got = run(&m, &rc.case);
        // ORT's output scale is about 0.097 per step
        let step = 0.0975;
        let s = steps(&want, &got, step);
        let limit = if bn_rules > 0 { 3.0 } else { 1.0 };
        assert!(s <= limit, "{case}: {s} steps from ORT's QDQ output");
        assert!(sqnr(&want, &got) > 40.0, "{case}");
    }
}

#[test]
fn sequential_model_ends_as_quantized_conv_relu_and_linear_relu() {
    // PyTorch's convert turns ConvReLU2d and LinearReLU into quantized fused modules:
    // here every Conv and the classifier become QLinearConv and no Relu is left.
    let rc = load_case("fusion_sequential");
    // calibrated on the reference input (uniform [0, 1) like the test's img_data_2d)
    let s = vec![rc.case.inputs.clone()];
    let (qdq, _, _) = quantize(
        &rc.model,
        Calibration::Samples(&s),
        &QuantizeOptions::default(),
    )
    .unwrap();
    let mut q = qdq.clone();
    convert(&mut q).unwrap();
    assert_eq!(count(&q, "Relu"), 0);
    assert_eq!(count(&q, "Conv"), 0);
    assert_eq!(count(&q, "Gemm"), 0);
    assert_eq!(
        count(&q, "QLinearConv"),
        5,
        "conv1, features.0-2 and classifier.0"
    );
    let f = run(&rc.model, &rc.case);
    let s_qdq = sqnr(&f, &run(&qdq, &rc.case));
    let s_qop = sqnr(&f, &run(&q, &rc.case));
    assert!(
        (s_qdq - s_qop).abs() <= 0.5 && s_qop > 20.0,
        "QDQ {s_qdq:.2} dB, QOperator {s_qop:.2} dB"
    );
}

/// x -> Q -> DQ -> Conv(DQ(w per channel)) -> [BN] -> [Relu] -> Q(zp) -> DQ -> y
fn qdq_conv(bn: bool, relu: bool, zp: u8) -> (Model, Case) {
    let mut nodes = vec![
        node_of("QuantizeLinear", "qx", &["x", "xs", "xz"], &["xq"], vec![]),
        node_of(
            "DequantizeLinear",
            "dqx",
            &["xq", "xs", "xz"],
            &["xd"],
            vec![],
        ),
        node_of(
            "DequantizeLinear",
            "dqw",
            &["wq", "ws", "wz"],
            &["wd"],
            vec![int("axis", 0)],
        ),
        node_of("Conv", "conv", &["xd", "wd"], &["c"], vec![]),
    ];
    let mut last = "c".to_string();
    if bn {
        nodes.push(node_of(
            "BatchNormalization",
            "bn",
            &["c", "g", "b", "m", "v"],
            &["n"],
            vec![],
        ));
        last = "n".into();
    }
    if relu {
        nodes.push(node_of("Relu", "relu", &[&last], &["r"], vec![]));
        last = "r".into();
    }
    nodes.push(node_of(
        "QuantizeLinear",
        "qy",
        &[&last, "ys", "yz"],
        &["yq"],
        vec![],
    ));
    nodes.push(node_of(
        "DequantizeLinear",
        "dqy",
        &["yq", "ys", "yz"],
        &["y"],
        vec![],
    ));
    let f = |v: Vec<f32>| TensorData::F32(ndarray::Array1::from(v).into_dyn());
    let w: Vec<i8> = (0..3 * 2 * 3 * 3)
        .map(|i| ((i * 37) % 200 - 100) as i8)
        .collect();
    let mut inits = vec![
        (
            "xs".to_string(),
            TensorData::F32(ndarray::arr0(0.02f32).into_dyn()),
        ),
        ("xz".into(), TensorData::U8(ndarray::arr0(128u8).into_dyn())),
        (
            "wq".into(),
            TensorData::I8(
                ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&[3, 2, 3, 3]), w).unwrap(),
            ),
        ),
        ("ws".into(), f(vec![0.01, 0.02, 0.005])),
        (
            "wz".into(),
            TensorData::I8(ndarray::ArrayD::zeros(ndarray::IxDyn(&[3]))),
        ),
        (
            "ys".into(),
            TensorData::F32(ndarray::arr0(0.05f32).into_dyn()),
        ),
        ("yz".into(), TensorData::U8(ndarray::arr0(zp).into_dyn())),
    ];
    if bn {
        inits.push(("g".into(), f(vec![1.5, -0.7, 0.9])));
        inits.push(("b".into(), f(vec![0.1, -0.2, 0.3])));
        inits.push(("m".into(), f(vec![0.05, 0.1, -0.1])));
        inits.push(("v".into(), f(vec![0.5, 1.2, 0.8])));
    }
    let m = model_of(
        nodes,
        inits,
        value_info("x", ElemType::F32, &[1, 2, 5, 5]),
        "y",
    );
    let x: Vec<f32> = (0..50)
        .map(|i| ((i * 13) % 29) as f32 * 0.08 - 1.1)
        .collect();
    let case = f32_case("x", &[1, 2, 5, 5], x);
    (m, case)
}

#[test]
fn conv_relu_fuses_only_when_zero_point_is_qmin() {
    let (m, case) = qdq_conv(false, true, 0);
    let mut q = m.clone();
    convert(&mut q).unwrap();
    assert_eq!(count(&q, "QLinearConv"), 1);
    assert_eq!(count(&q, "Relu"), 0);
    assert!(steps(&run(&m, &case), &run(&q, &case), 0.05) <= 1.0 + 1e-4);
    // zero point 128: Relu is not implied by the output range, so nothing converts
    let (m, _) = qdq_conv(false, true, 128);
    let mut q = m.clone();
    let r = convert(&mut q).unwrap();
    assert_eq!(count(&q, "Relu"), 1);
    assert_eq!(count(&q, "QLinearConv"), 0);
    assert!(r.float_islands.iter().any(|(n, _)| n == "conv"));
}

#[test]
fn qat_bn_folds_into_per_channel_scales_with_negative_factors() {
    let (m, case) = qdq_conv(true, false, 128);
    let mut q = m.clone();
    let r = convert(&mut q).unwrap();
    assert!(
        r.converted.iter().any(|(rule, _)| rule == "fold_qat_bn"),
        "{r:?}"
    );
    assert_eq!(count(&q, "BatchNormalization"), 0);
    assert_eq!(count(&q, "QLinearConv"), 1);
    // gamma[1] < 0: that channel's weights were negated, its scale stays positive
    let qc = q
        .graph()
        .node
        .iter()
        .find(|n| n.op_type == "QLinearConv")
        .unwrap();
    let scales = q
        .graph()
        .initializer
        .iter()
        .find(|t| t.name == qc.input[4])
        .unwrap();
    let scales = TensorData::from_proto(scales).unwrap().to_f64();
    assert!(scales.iter().all(|&s| s > 0.0));
    assert!(steps(&run(&m, &case), &run(&q, &case), 0.05) <= 1.0 + 1e-4);
}

#[test]
fn standalone_bn_relu_becomes_a_depthwise_qlinearconv() {
    // x -> Q -> DQ -> BN -> Relu -> Q(zp 0) -> DQ
    let f = |v: Vec<f32>| TensorData::F32(ndarray::Array1::from(v).into_dyn());
    let nodes = vec![
        node_of("QuantizeLinear", "qx", &["x", "xs", "xz"], &["xq"], vec![]),
        node_of(
            "DequantizeLinear",
            "dqx",
            &["xq", "xs", "xz"],
            &["xd"],
            vec![],
        ),
        node_of(
            "BatchNormalization",
            "bn",
            &["xd", "g", "b", "m", "v"],
            &["n"],
            vec![],
        ),
        node_of("Relu", "relu", &["n"], &["r"], vec![]),
        node_of("QuantizeLinear", "qy", &["r", "ys", "yz"], &["yq"], vec![]),
        node_of(
            "DequantizeLinear",
            "dqy",
            &["yq", "ys", "yz"],
            &["y"],
            vec![],
        ),
    ];
    let inits = vec![
        (
            "xs".to_string(),
            TensorData::F32(ndarray::arr0(0.02f32).into_dyn()),
        ),
        ("xz".into(), TensorData::U8(ndarray::arr0(128u8).into_dyn())),
        ("g".into(), f(vec![1.5, -0.7])),
        ("b".into(), f(vec![0.1, 0.4])),
        ("m".into(), f(vec![0.05, -0.1])),
        ("v".into(), f(vec![0.5, 1.2])),
        (
            "ys".into(),
            TensorData::F32(ndarray::arr0(0.01f32).into_dyn()),
        ),
        ("yz".into(), TensorData::U8(ndarray::arr0(0u8).into_dyn())),
    ];
    let m = model_of(
        nodes,
        inits,
        value_info("x", ElemType::F32, &[1, 2, 3, 3]),
        "y",
    );
    let x: Vec<f32> = (0..18).map(|i| i as f32 * 0.13 - 1.0).collect();
    let case = f32_case("x", &[1, 2, 3, 3], x);
    let mut q = m.clone();
    let r = convert(&mut q).unwrap();
    assert!(r
        .converted
        .iter()
        .any(|(rule, _)| rule == "bn_to_depthwise"));
    assert_eq!(count(&q, "BatchNormalization") + count(&q, "Relu"), 0);
    let qc = q
        .graph()
        .node
        .iter()
        .find(|n| n.op_type == "QLinearConv")
        .unwrap();
    assert!(qc.attribute.iter().any(|a| a.name == "group" && a.i == 2));
    assert!(steps(&run(&m, &case), &run(&q, &case), 0.01) <= 1.0 + 1e-4);
}

#[test]
fn matmul_becomes_qlinearmatmul() {
    let nodes = vec![
        node_of("QuantizeLinear", "qa", &["a", "as", "az"], &["aq"], vec![]),
        node_of(
            "DequantizeLinear",
            "dqa",
            &["aq", "as", "az"],
            &["ad"],
            vec![],
        ),
        node_of(
            "DequantizeLinear",
            "dqb",
            &["bq", "bs", "bz"],
            &["bd"],
            vec![int("axis", 1)],
        ),
        node_of("MatMul", "mm", &["ad", "bd"], &["c"], vec![]),
        node_of("QuantizeLinear", "qy", &["c", "ys", "yz"], &["yq"], vec![]),
        node_of(
            "DequantizeLinear",
            "dqy",
            &["yq", "ys", "yz"],
            &["y"],
            vec![],
        ),
    ];
    let b: Vec<i8> = (0..12).map(|i| (i * 23 % 100 - 50) as i8).collect();
    let inits = vec![
        (
            "as".to_string(),
            TensorData::F32(ndarray::arr0(0.02f32).into_dyn()),
        ),
        ("az".into(), TensorData::U8(ndarray::arr0(128u8).into_dyn())),
        (
            "bq".into(),
            TensorData::I8(ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&[4, 3]), b).unwrap()),
        ),
        (
            "bs".into(),
            TensorData::F32(ndarray::Array1::from(vec![0.01f32, 0.02, 0.03]).into_dyn()),
        ),
        (
            "bz".into(),
            TensorData::I8(ndarray::ArrayD::zeros(ndarray::IxDyn(&[3]))),
        ),
        (
            "ys".into(),
            TensorData::F32(ndarray::arr0(0.02f32).into_dyn()),
        ),
        ("yz".into(), TensorData::U8(ndarray::arr0(128u8).into_dyn())),
    ];
    let m = model_of(nodes, inits, value_info("a", ElemType::F32, &[2, 4]), "y");
    let x: Vec<f32> = (0..8).map(|i| i as f32 * 0.3 - 1.0).collect();
    let case = f32_case("a", &[2, 4], x);
    let mut q = m.clone();
    convert(&mut q).unwrap();
    assert_eq!(count(&q, "QLinearMatMul"), 1);
    assert_eq!(count(&q, "MatMul"), 0);
    assert!(steps(&run(&m, &case), &run(&q, &case), 0.02) <= 1.0 + 1e-4);
}

#[test]
fn contrib_ops_only_when_allowed() {
    use qfold::quant::qoperator::{convert_with, ConvertOptions};
    let (m, calib) = digits_cases("calib");
    let s: Vec<_> = calib.iter().map(|c| c.inputs.clone()).collect();
    let (qdq, _, _) = quantize(&m, Calibration::Samples(&s), &QuantizeOptions::default()).unwrap();
    let mut standard = qdq.clone();
    convert(&mut standard).unwrap();
    assert!(standard.graph().node.iter().all(|n| n.domain.is_empty()));
    assert!(standard
        .proto
        .opset_import
        .iter()
        .all(|o| o.domain.is_empty()));
    let mut contrib = qdq.clone();
    let r = convert_with(
        &mut contrib,
        ConvertOptions {
            allow_contrib_ops: true,
        },
    )
    .unwrap();
    assert!(r.float_islands.is_empty(), "{:?}", r.float_islands);
    let gap = contrib
        .graph()
        .node
        .iter()
        .find(|n| n.op_type == "QLinearGlobalAveragePool")
        .expect("QLinearGlobalAveragePool");
    assert_eq!(gap.domain, "com.microsoft");
    assert_eq!(gap.input.len(), 5);
    assert!(contrib
        .proto
        .opset_import
        .iter()
        .any(|o| o.domain == "com.microsoft" && o.version == 1));
    // tract has no com.microsoft ops: running it is an error naming the op, not a panic
    let err = qfold::runtime::Runner::new(&contrib, &calib[0].inputs, &[])
        .err()
        .expect("tract refuses");
    assert!(
        err.to_string().contains("QLinearGlobalAveragePool"),
        "{err}"
    );
}
