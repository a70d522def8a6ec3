//! Opset 11 and 12 models raised to 13 for per-axis quantization: Squeeze, Unsqueeze, ReduceSum
//! and Split move their attribute to an input, Softmax over the last axis is kept, and the
//! upgraded model computes what the original did (both run in tract).

mod common;

use common::*;
use ndarray::{ArrayD, IxDyn};
use qfold::onnx::{ElemType, Model, TensorData};

fn f32s(shape: &[usize], values: &[f32]) -> TensorData {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|k| values[k % values.len()]).collect();
    TensorData::F32(ArrayD::from_shape_vec(IxDyn(shape), v).unwrap())
}

fn at_opset(mut m: Model, v: i64) -> Model {
    m.proto.opset_import[0].version = v;
    m
}

/// x [1, 3, 4, 4] -> Conv -> ReduceSum(axes [3], keepdims 0) [1, 3, 4] -> Unsqueeze(axes [1])
/// [1, 1, 3, 4] -> Split(axis 3, split [1, 3]) -> Squeeze(axes [0]) of [1, 1, 3, 3] -> [1, 3, 3]
/// -> Softmax(axis)
fn model(softmax_axis: i64, opset: i64) -> Model {
    let m = model_of(
        vec![
            node_of("Conv", "conv", &["x", "w", "b"], &["c"], vec![]),
            node_of(
                "ReduceSum",
                "sum",
                &["c"],
                &["r"],
                vec![ints("axes", &[3]), int("keepdims", 0)],
            ),
            node_of(
                "Unsqueeze",
                "unsq",
                &["r"],
                &["u"],
                vec![ints("axes", &[1])],
            ),
            node_of(
                "Split",
                "split",
                &["u"],
                &["s0", "s1"],
                vec![int("axis", 3), ints("split", &[1, 3])],
            ),
            node_of("Squeeze", "sq", &["s1"], &["q"], vec![ints("axes", &[0])]),
            node_of(
                "Softmax",
                "soft",
                &["q"],
                &["y"],
                vec![int("axis", softmax_axis)],
            ),
        ],
        vec![
            (
                "w".into(),
                f32s(&[3, 3, 1, 1], &[0.2, -0.1, 0.05, 0.3, -0.25]),
            ),
            ("b".into(), f32s(&[3], &[0.1, 0.2, 0.3])),
        ],
        value_info("x", ElemType::F32, &[1, 3, 4, 4]),
        "y",
    );
    at_opset(m, opset)
}

fn sample() -> qfold::verify::Case {
    let v: Vec<f32> = (0..48)
        .map(|k| ((k * 37) % 23) as f32 / 11.0 - 1.0)
        .collect();
    f32_case("x", &[1, 3, 4, 4], v)
}

#[test]
fn opset_11_and_12_upgrade_to_13_computing_the_same() {
    for opset in [11, 12] {
        let m = model(2, opset); // q is [1, 3, 3]: axis 2 is the last
        let mut up = m.clone();
        let rewritten = qfold::graph::upgrade::upgrade_to_13(&mut up).unwrap();
        assert_eq!(up.opset(), Some(13));
        assert_eq!(rewritten.len(), 5, "{rewritten:?}");
        for op in ["ReduceSum", "Unsqueeze", "Squeeze", "Split"] {
            let n = up.graph().node.iter().find(|n| n.op_type == op).unwrap();
            assert_eq!(n.input.len(), 2, "{op} takes its axes/split as an input");
            assert!(n
                .attribute
                .iter()
                .all(|a| a.name != "axes" && a.name != "split"));
        }
        let case = sample();
        assert_close(
            &run(&m, &case),
            &run(&up, &case),
            qfold::verify::tolerance::EXACT,
            "upgraded against original",
        );
    }
}

#[test]
fn softmax_over_a_non_last_axis_is_not_upgraded_and_named() {
    let m = model(1, 11);
    let mut up = m.clone();
    let e = qfold::graph::upgrade::upgrade_to_13(&mut up)
        .unwrap_err()
        .to_string();
    assert!(e.contains("node 'soft'") && e.contains("axis 1"), "{e}");
    assert_eq!(up.opset(), Some(11), "unchanged on failure");
}

#[test]
fn per_channel_quantization_of_an_opset_11_model() {
    let m = model(-1, 11);
    let case = sample();
    let samples: Vec<qfold::runtime::Sample> = (0..4).map(|_| case.inputs.clone()).collect();
    let (q, _, report) = qfold::quant::quantize(
        &m,
        qfold::quant::Calibration::Samples(&samples),
        &Default::default(),
    )
    .unwrap();
    assert_eq!(report.qdq.opset, Some((11, 13)));
    assert!(report.qdq.upgraded.len() >= 4, "{:?}", report.qdq.upgraded);
    assert_eq!(q.opset(), Some(13));
    let c = compare(
        &run(&m, &case),
        &run(&q, &case),
        qfold::verify::Criterion::MinSqnr { db: 0.0 },
    );
    let sqnr = c.outputs[0].sqnr_db;
    assert_eq!(c.outputs[0].elements, 9);
    let sqnr = sqnr.expect("quantization moves the outputs");
    assert!(sqnr > 25.0, "SQNR {sqnr}");
}

#[test]
fn per_tensor_below_opset_13_writes_biases_without_an_axis() {
    // Softmax over axis 1 of a rank-3 value blocks the upgrade; per tensor needs no upgrade.
    let m = model(1, 11);
    let case = sample();
    let samples: Vec<qfold::runtime::Sample> = (0..4).map(|_| case.inputs.clone()).collect();
    let opts = qfold::quant::QuantizeOptions {
        per_channel: false,
        ..Default::default()
    };
    let (q, _, report) =
        qfold::quant::quantize(&m, qfold::quant::Calibration::Samples(&samples), &opts).unwrap();
    assert_eq!(report.qdq.opset, None);
    assert_eq!(q.opset(), Some(11));
    let dqs: Vec<_> = q
        .graph()
        .node
        .iter()
        .filter(|n| n.op_type == "DequantizeLinear")
        .collect();
    assert!(!dqs.is_empty());
    for n in dqs {
        assert!(
            n.attribute.iter().all(|a| a.name != "axis"),
            "opset 11 DequantizeLinear '{}' has an axis",
            n.name
        );
    }
    let c = compare(
        &run(&m, &case),
        &run(&q, &case),
        qfold::verify::Criterion::MinSqnr { db: 0.0 },
    );
    assert!(c.outputs[0].sqnr_db.expect("quantized") > 25.0, "{c:?}");
}
