//! The ops real CNNs use (issue 9, item 5): the plan's treatment of each on small graphs, and
//! end to end on two PyTorch models from `tools/make_real_ops.py` (a MobileNetV3-style block
//! with HardSwish, HardSigmoid, squeeze-excite and InstanceNormalization; a PicoDet/YOLO-style
//! neck with LeakyRelu, PRelu, SiLU, nearest and bilinear Resize, Split, Slice, Gather, Pad,
//! DepthToSpace and SpaceToDepth), quantized in QDQ and QOperator form and measured in tract
//! against the float model. `tools/make_real_ops.py ort` runs the same quantized models in ONNX
//! Runtime (measured: mbv3_block 26.47 dB QDQ and QOperator, neck 39.46 dB, both runtimes).

mod common;

use common::*;
use qfold::onnx::{ElemType, TensorData};
use qfold::quant::plan::{plan, PlanOptions, Source};
use qfold::quant::QuantizeOptions;

fn opts() -> PlanOptions {
    QuantizeOptions::default().plan_options()
}

fn f32s(v: &[f32], shape: &[usize]) -> TensorData {
    TensorData::F32(ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(shape), v.to_vec()).unwrap())
}

fn i64s(v: &[i64]) -> TensorData {
    TensorData::I64(ndarray::arr1(v).into_dyn())
}

/// x [1, 4, 4, 4] -> Conv(w) -> c -> `op` -> t -> Conv(w2) -> y: the op between two quantized
/// Convs, so the plan has a reason to quantize it.
fn between_convs(
    op: qfold::onnx::proto::NodeProto,
    extra: Vec<(String, TensorData)>,
) -> qfold::onnx::Model {
    let mut inits = vec![
        ("w".to_string(), f32s(&[0.5; 16], &[4, 4, 1, 1])),
        ("w2".to_string(), f32s(&[0.25; 16], &[4, 4, 1, 1])),
    ];
    inits.extend(extra);
    model_of(
        vec![
            node_of("Conv", "conv", &["x", "w"], &["c"], vec![]),
            op,
            node_of("Conv", "conv2", &["t", "w2"], &["y"], vec![]),
        ],
        inits,
        value_info("x", ElemType::F32, &[1, 4, 4, 4]),
        "y",
    )
}

fn source_of(p: &qfold::quant::plan::QuantPlan, v: &str) -> Option<Source> {
    p.activations.get(v).cloned()
}

#[test]
fn data_movement_ops_share_their_input_parameters() {
    let cases = vec![
        (
            node_of("Slice", "op", &["c", "st", "en"], &["t"], vec![]),
            vec![
                ("st".to_string(), i64s(&[0])),
                ("en".to_string(), i64s(&[2])),
            ],
        ),
        (
            node_of("Gather", "op", &["c", "idx"], &["t"], vec![int("axis", 1)]),
            vec![("idx".to_string(), i64s(&[0, 1, 2, 3]))],
        ),
        (
            node_of(
                "DepthToSpace",
                "op",
                &["c"],
                &["t"],
                vec![int("blocksize", 2)],
            ),
            vec![],
        ),
        (
            node_of(
                "SpaceToDepth",
                "op",
                &["c"],
                &["t"],
                vec![int("blocksize", 2)],
            ),
            vec![],
        ),
        (
            node_of("Resize", "op", &["c", "", "sc"], &["t"], vec![]),
            vec![("sc".to_string(), f32s(&[1.0, 1.0, 2.0, 2.0], &[4]))],
        ),
        (
            node_of("Pad", "op", &["c", "pads"], &["t"], vec![]),
            vec![("pads".to_string(), i64s(&[0, 0, 1, 1, 0, 0, 1, 1]))],
        ),
        (
            node_of(
                "Pad",
                "op",
                &["c", "pads"],
                &["t"],
                vec![string_attr("mode", "reflect")],
            ),
            vec![("pads".to_string(), i64s(&[0, 0, 1, 1, 0, 0, 1, 1]))],
        ),
    ];
    for (op, extra) in cases {
        let kind = op.op_type.clone();
        // (the plan reads no shapes: DepthToSpace's channel count does not matter here)
        let m = between_convs(op, extra);
        let p = plan(&m, &opts()).unwrap();
        assert!(
            p.quantized.iter().any(|n| n == "op"),
            "{kind}: {:?}",
            p.float
        );
        assert_eq!(
            source_of(&p, "t"),
            Some(Source::SharedWith("c".into())),
            "{kind}"
        );
        assert_eq!(
            source_of(&p, "c"),
            Some(Source::Calibrated("c".into())),
            "{kind}"
        );
    }
}

fn string_attr(name: &str, v: &str) -> qfold::onnx::proto::AttributeProto {
    let mut a = qfold::onnx::proto::AttributeProto::new();
    a.name = name.into();
    a.type_ = qfold::onnx::proto::attribute_proto::AttributeType::STRING.into();
    a.s = v.as_bytes().to_vec();
    a
}

#[test]
fn split_outputs_all_share_the_input_parameters() {
    let m = model_of(
        vec![
            node_of("Conv", "conv", &["x", "w"], &["c"], vec![]),
            node_of(
                "Split",
                "split",
                &["c", "parts"],
                &["a", "b"],
                vec![int("axis", 1)],
            ),
            node_of("Concat", "cat", &["b", "a"], &["y"], vec![int("axis", 1)]),
        ],
        vec![
            ("w".to_string(), f32s(&[0.5; 16], &[4, 4, 1, 1])),
            ("parts".to_string(), i64s(&[2, 2])),
        ],
        value_info("x", ElemType::F32, &[1, 4, 4, 4]),
        "y",
    );
    let p = plan(&m, &opts()).unwrap();
    assert!(p.quantized.iter().any(|n| n == "split"), "{:?}", p.float);
    for o in ["a", "b"] {
        assert_eq!(
            source_of(&p, o),
            Some(Source::SharedWith("c".into())),
            "{o}"
        );
    }
}

#[test]
fn interpolating_resize_and_nonzero_pad_calibrate_their_output() {
    let linear = node_of(
        "Resize",
        "op",
        &["c", "", "sc"],
        &["t"],
        vec![string_attr("mode", "linear")],
    );
    let m = between_convs(
        linear,
        vec![("sc".to_string(), f32s(&[1.0, 1.0, 2.0, 2.0], &[4]))],
    );
    let p = plan(&m, &opts()).unwrap();
    assert_eq!(source_of(&p, "t"), Some(Source::Calibrated("t".into())));
    assert_eq!(source_of(&p, "c"), Some(Source::Calibrated("c".into())));

    let pad = node_of("Pad", "op", &["c", "pads", "v"], &["t"], vec![]);
    let m = between_convs(
        pad,
        vec![
            ("pads".to_string(), i64s(&[0, 0, 1, 1, 0, 0, 1, 1])),
            ("v".to_string(), f32s(&[-1.5], &[])),
        ],
    );
    let p = plan(&m, &opts()).unwrap();
    assert_eq!(source_of(&p, "t"), Some(Source::Calibrated("t".into())));
    // the pad value stays a float input
    assert_eq!(source_of(&p, "v"), None);
}

#[test]
fn activation_functions_and_instance_norm_get_their_own_parameters() {
    let cases = vec![
        (node_of("Sigmoid", "op", &["c"], &["t"], vec![]), vec![]),
        (
            node_of(
                "HardSigmoid",
                "op",
                &["c"],
                &["t"],
                vec![float("alpha", 0.2)],
            ),
            vec![],
        ),
        (node_of("HardSwish", "op", &["c"], &["t"], vec![]), vec![]),
        (
            node_of("LeakyRelu", "op", &["c"], &["t"], vec![float("alpha", 0.1)]),
            vec![],
        ),
        (
            node_of("PRelu", "op", &["c", "slope"], &["t"], vec![]),
            vec![("slope".to_string(), f32s(&[0.1, 0.2, 0.3, 0.4], &[4, 1, 1]))],
        ),
        (
            node_of(
                "InstanceNormalization",
                "op",
                &["c", "s", "b"],
                &["t"],
                vec![],
            ),
            vec![
                ("s".to_string(), f32s(&[1.0; 4], &[4])),
                ("b".to_string(), f32s(&[0.0; 4], &[4])),
            ],
        ),
    ];
    for (op, extra) in cases {
        let kind = op.op_type.clone();
        let p = plan(&between_convs(op, extra), &opts()).unwrap();
        assert!(
            p.quantized.iter().any(|n| n == "op"),
            "{kind}: {:?}",
            p.float
        );
        assert_eq!(
            source_of(&p, "t"),
            Some(Source::Calibrated("t".into())),
            "{kind}"
        );
        assert_eq!(
            source_of(&p, "c"),
            Some(Source::Calibrated("c".into())),
            "{kind}"
        );
        // parameters (PRelu's slope, the norm's scale and bias) stay float
        for v in ["slope", "s", "b"] {
            assert_eq!(source_of(&p, v), None, "{kind} {v}");
        }
    }
}

/// Conv -> Softmax(axis 1) -> Shape / Reshape, at `opset`.
fn softmax_reshape(opset: i64) -> qfold::onnx::Model {
    let mut m = model_of(
        vec![
            node_of("Conv", "conv", &["x", "w"], &["c"], vec![]),
            node_of("Softmax", "sm", &["c"], &["s"], vec![int("axis", 1)]),
            node_of("Shape", "shape", &["s"], &["sh"], vec![]),
            node_of("Reshape", "r", &["s", "sh"], &["y"], vec![]),
        ],
        vec![("w".to_string(), f32s(&[0.5; 16], &[4, 4, 1, 1]))],
        value_info("x", ElemType::F32, &[1, 4, 4, 4]),
        "y",
    );
    m.proto.opset_import[0].version = opset;
    m
}

#[test]
fn softmax_float_where_the_preset_or_the_opset_says_and_the_report_groups_float_ops() {
    let tract = qfold::quant::Preset::Tract.options().plan_options();
    let p = plan(&softmax_reshape(13), &tract).unwrap();
    assert!(!p.activations.contains_key("s"));
    let sm = &p.float_by_op["Softmax"];
    assert_eq!(sm.count, 1);
    assert!(
        sm.reasons[0].contains("the preset keeps Softmax float"),
        "{sm:?}"
    );
    assert_eq!(p.float_by_op["Shape"].count, 1);
    assert_eq!(p.float_by_op["Reshape"].count, 1);
    assert_eq!(p.float.len(), 3);
    let summary = p.float_summary();
    assert_eq!(summary.len(), 3);
    assert!(
        summary
            .iter()
            .any(|l| l.starts_with("Softmax 1 (the preset keeps Softmax float")),
        "{summary:?}"
    );
    // the default preset quantizes it (the Reshape, read by no quantized op, stays float)
    let p = plan(&softmax_reshape(13), &opts()).unwrap();
    assert!(p.quantized.contains(&"sm".to_string()));
    assert_eq!(source_of(&p, "s"), Some(Source::Calibrated("s".into())));
    // before opset 13 a Softmax over axis 1 of a 4-D tensor normalizes over axes 1 to 3: no
    // single-axis form, so it stays float
    let p = plan(&softmax_reshape(11), &opts()).unwrap();
    assert!(!p.activations.contains_key("s"));
    assert!(
        p.float_by_op["Softmax"].reasons[0].contains("over several axes"),
        "{:?}",
        p.float_by_op
    );
}

/// `qfold quantize` of a committed real_ops case: the JSON report.
fn quantize_case(case: &str, extra: &[&str]) -> serde_json::Value {
    let d = format!("onnx_models/real_ops/{case}");
    let t = TempDir::new(&format!("real-ops-{case}"));
    let out = t.join("q.onnx");
    let calib = format!("{d}/calib.npy");
    let eval = format!("{d}/eval.npy");
    let mut args = vec![
        "quantize",
        &d,
        "-o",
        out.to_str().unwrap(),
        "--calib",
        &calib,
        "--eval",
        &eval,
        "--json",
    ];
    let model = format!("{d}/model.onnx");
    args[1] = &model;
    args.extend_from_slice(extra);
    let (code, stdout, err) = run_qfold(&args);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&stdout).unwrap()
}

fn worst_sqnr(j: &serde_json::Value) -> f64 {
    j["evaluation"]["comparison"]["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["sqnr_db"].as_f64().unwrap_or(f64::INFINITY))
        .fold(f64::INFINITY, f64::min)
}

fn quantized_ops(j: &serde_json::Value) -> Vec<String> {
    j["quantization"]["plan"]["quantized"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn mobilenet_v3_block_quantizes_its_hardswish_and_squeeze_excite() {
    let j = quantize_case("mbv3_block", &[]);
    let q = quantized_ops(&j);
    for n in [
        "/HardSwish",
        "/HardSwish_3",
        "/HardSigmoid",
        "/Mul",
        "/inorm/InstanceNormalization",
    ] {
        assert!(q.iter().any(|x| x == n), "{n} not in {q:?}");
    }
    assert_eq!(
        j["quantization"]["plan"]["float"].as_array().unwrap().len(),
        0
    );
    let db = worst_sqnr(&j);
    // measured 26.47 dB (ONNX Runtime's quantize_static with the same settings: see the tool)
    assert!(db > 25.0, "{db}");
    let j = quantize_case("mbv3_block", &["--format", "qoperator"]);
    assert!(worst_sqnr(&j) > 25.0);
}

#[test]
fn neck_quantizes_every_op_and_runs_data_movement_on_8_bit_tensors() {
    let j = quantize_case("neck", &[]);
    let q = quantized_ops(&j);
    for n in [
        "/LeakyRelu",
        "/prelu/PRelu",
        "/Sigmoid",
        "/Resize",
        "/Resize_1",
        "/Split",
        "/Pad",
        "/Pad_1",
        "/DepthToSpace",
        "/SpaceToDepth",
        "/Gather",
        "/Slice",
    ] {
        assert!(q.iter().any(|x| x == n), "{n} not in {q:?}");
    }
    let acts = &j["quantization"]["plan"]["activations"];
    // nearest Resize shares, bilinear Resize is calibrated
    assert_eq!(acts["/Resize_output_0"]["shared_with"], "/Mul_output_0");
    assert_eq!(
        acts["/Resize_1_output_0"]["calibrated"],
        "/Resize_1_output_0"
    );
    assert_eq!(acts["/Pad_1_output_0"]["shared_with"], "/Split_output_1");
    let db = worst_sqnr(&j);
    // measured 39.46 dB
    assert!(db > 38.0, "{db}");

    let j = quantize_case("neck", &["--format", "qoperator"]);
    assert!(worst_sqnr(&j) > 38.0);
    let conv = &j["conversion"];
    let rules: Vec<(String, String)> = conv["converted"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| {
            let rule = r["rule"].as_str().unwrap().to_string();
            r["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .map(move |n| (rule.clone(), n.as_str().unwrap().to_string()))
        })
        .collect();
    for n in ["/Split", "/Pad", "/Pad_1", "/Resize", "/Gather", "/Slice"] {
        assert!(
            rules.iter().any(|(r, x)| r == "data_movement" && x == n),
            "{n} not converted: {rules:?}"
        );
    }
    // the bilinear Resize interpolates: it stays float between DQ and Q
    let islands: Vec<&str> = conv["float_islands"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["node"].as_str().unwrap())
        .collect();
    assert!(islands.contains(&"/Resize_1"), "{islands:?}");
    assert!(!islands.contains(&"/Resize"), "{islands:?}");
}

#[test]
fn float_model_in_tract_matches_onnx_runtime() {
    for case in ["real_ops/mbv3_block", "real_ops/neck"] {
        let rc = load_case(case);
        let out = run(&rc.model, &rc.case);
        let want = expected(&rc.case);
        let cmp = compare(
            &want,
            &out,
            qfold::verify::Criterion::Tolerance {
                atol: 1e-5,
                rtol: 1e-4,
            },
        );
        assert!(cmp.passed, "{case}: {cmp:?}");
    }
}
