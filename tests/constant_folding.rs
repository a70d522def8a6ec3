//! Constant folding and Identity / Dropout removal before fusion: BN parameters behind Identity,
//! weights from ConstantOfShape, Constant -> Cast chains fold, with the outputs of the original.

mod common;

use common::*;
use ndarray::{ArrayD, IxDyn};
use qfold::fusion::{fuse, FuseOptions};
use qfold::onnx::proto::NodeProto;
use qfold::onnx::{ElemType, Model, TensorData};

fn f32s(shape: &[usize], values: &[f32]) -> TensorData {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|k| values[k % values.len()]).collect();
    TensorData::F32(ArrayD::from_shape_vec(IxDyn(shape), v).unwrap())
}

fn i64s(values: &[i64]) -> TensorData {
    TensorData::I64(ArrayD::from_shape_vec(IxDyn(&[values.len()]), values.to_vec()).unwrap())
}

fn x() -> qfold::onnx::proto::ValueInfoProto {
    value_info("x", ElemType::F32, &[1, 3, 5, 5])
}

fn sample() -> qfold::verify::Case {
    let v: Vec<f32> = (0..75)
        .map(|k| ((k * 37) % 23) as f32 / 11.0 - 1.0)
        .collect();
    f32_case("x", &[1, 3, 5, 5], v)
}

/// Fuses `m` and checks: no BN left, `ops` counted as expected, outputs equal the original's.
fn fuses_exactly(m: &Model, bn_after: usize) -> (Model, qfold::fusion::FuseReport) {
    let mut fused = m.clone();
    let r = fuse(&mut fused, &FuseOptions::default()).unwrap();
    assert_eq!(r.bn_after, bn_after, "{:?}", r.skipped);
    let case = sample();
    assert_close(
        &run(m, &case),
        &run(&fused, &case),
        qfold::verify::tolerance::FLOAT,
        "fused against original",
    );
    (fused, r)
}

fn conv() -> NodeProto {
    node_of(
        "Conv",
        "conv",
        &["x", "w", "b"],
        &["c"],
        vec![ints("pads", &[1, 1, 1, 1])],
    )
}

#[test]
fn bn_parameters_behind_identity_fold() {
    let m = model_of(
        vec![
            conv(),
            node_of("Identity", "id_s", &["s0"], &["s"], vec![]),
            node_of("Identity", "id_v", &["v0"], &["v"], vec![]),
            node_of(
                "BatchNormalization",
                "bn",
                &["c", "s", "b2", "m", "v"],
                &["y"],
                vec![],
            ),
        ],
        vec![
            ("w".into(), f32s(&[3, 3, 3, 3], &[0.2, -0.1, 0.05, 0.3])),
            ("b".into(), f32s(&[3], &[0.1, -0.2, 0.3])),
            ("s0".into(), f32s(&[3], &[1.5, 0.7, 1.1])),
            ("b2".into(), f32s(&[3], &[0.1, 0.0, -0.1])),
            ("m".into(), f32s(&[3], &[0.2, -0.3, 0.05])),
            ("v0".into(), f32s(&[3], &[0.9, 1.3, 0.4])),
        ],
        x(),
        "y",
    );
    let (fused, r) = fuses_exactly(&m, 0);
    assert_eq!(r.constants.folded_nodes, 2);
    assert_eq!(count(&fused, "Identity"), 0);
    assert_eq!(count(&fused, "Conv"), 1);
}

#[test]
fn weights_from_constant_of_shape_and_cast_chains_fold() {
    // w = ConstantOfShape([3, 3, 3, 3], 0.25) * k ; var = Cast(Constant(int64 [1, 2, 3]))
    let mut cos = node_of("ConstantOfShape", "cos", &["wshape"], &["ones"], vec![]);
    let mut value = qfold::onnx::proto::AttributeProto::new();
    value.name = "value".into();
    value.type_ = qfold::onnx::proto::attribute_proto::AttributeType::TENSOR.into();
    value.t = Some(f32s(&[1], &[0.25]).to_proto("")).into();
    cos.attribute.push(value);
    let mut cst = node_of("Constant", "cst", &[], &["vint"], vec![]);
    let mut v = qfold::onnx::proto::AttributeProto::new();
    v.name = "value".into();
    v.type_ = qfold::onnx::proto::attribute_proto::AttributeType::TENSOR.into();
    v.t = Some(i64s(&[1, 2, 3]).to_proto("")).into();
    cst.attribute.push(v);
    let m = model_of(
        vec![
            cos,
            node_of("Mul", "mul", &["ones", "k"], &["w"], vec![]),
            cst,
            node_of("Cast", "cast", &["vint"], &["v"], vec![int("to", 1)]),
            conv(),
            node_of(
                "BatchNormalization",
                "bn",
                &["c", "s", "b2", "m", "v"],
                &["y"],
                vec![],
            ),
        ],
        vec![
            ("wshape".into(), i64s(&[3, 3, 3, 3])),
            ("k".into(), f32s(&[3, 1, 1, 1], &[1.0, -2.0, 0.5])),
            ("b".into(), f32s(&[3], &[0.1, -0.2, 0.3])),
            ("s".into(), f32s(&[3], &[1.5, 0.7, 1.1])),
            ("b2".into(), f32s(&[3], &[0.1, 0.0, -0.1])),
            ("m".into(), f32s(&[3], &[0.2, -0.3, 0.05])),
        ],
        x(),
        "y",
    );
    let (fused, r) = fuses_exactly(&m, 0);
    assert_eq!(r.constants.folded_nodes, 3, "{:?}", r.constants);
    for op in ["ConstantOfShape", "Mul", "Cast", "Constant"] {
        assert_eq!(count(&fused, op), 0, "{op} left");
    }
}

#[test]
fn identity_and_inference_dropout_are_removed_keeping_output_names() {
    // x -> Identity -> Conv -> Dropout -> Relu -> Identity -> y (graph output)
    let m = model_of(
        vec![
            node_of("Identity", "id_in", &["x"], &["x1"], vec![]),
            node_of("Conv", "conv", &["x1", "w", "b"], &["c"], vec![]),
            node_of("Dropout", "drop", &["c"], &["d"], vec![float("ratio", 0.5)]),
            node_of("Relu", "relu", &["d"], &["r"], vec![]),
            node_of("Identity", "id_out", &["r"], &["y"], vec![]),
        ],
        vec![
            ("w".into(), f32s(&[3, 3, 1, 1], &[0.2, -0.1, 0.05, 0.3])),
            ("b".into(), f32s(&[3], &[0.1, -0.2, 0.3])),
        ],
        x(),
        "y",
    );
    let (fused, r) = fuses_exactly(&m, 0);
    assert_eq!(r.removed.len(), 3, "{:?}", r.removed);
    assert_eq!(count(&fused, "Identity") + count(&fused, "Dropout"), 0);
    assert_eq!(fused.graph().output[0].name, "y");
    assert_eq!(node(&fused, "relu").output, ["y"]);
    assert_eq!(node(&fused, "conv").input[0], "x");
    // Conv -> Relu is now a group.
    assert!(r
        .groups
        .iter()
        .any(|g| g.kind == qfold::fusion::GroupKind::ConvRelu));
}

#[test]
fn training_dropout_random_ops_and_the_opt_out_are_left_alone() {
    // Dropout in training mode stays; RandomNormalLike of a constant is not folded.
    let m = model_of(
        vec![
            node_of("Dropout", "drop", &["x", "ratio", "train"], &["d"], vec![]),
            node_of("RandomNormalLike", "rnd", &["b"], &["noise"], vec![]),
            node_of("Add", "add", &["d", "noise"], &["y"], vec![]),
        ],
        vec![
            ("ratio".into(), f32s(&[], &[0.5])),
            (
                "train".into(),
                TensorData::Bool(ndarray::arr0(true).into_dyn()),
            ),
            ("b".into(), f32s(&[3, 1, 1], &[0.0])),
        ],
        x(),
        "y",
    );
    let mut fused = m.clone();
    let r = fuse(&mut fused, &FuseOptions::default()).unwrap();
    assert_eq!(count(&fused, "Dropout"), 1);
    assert_eq!(count(&fused, "RandomNormalLike"), 1);
    assert_eq!(r.constants.folded_nodes, 0);

    let m = model_of(
        vec![
            node_of("Identity", "id_s", &["s0"], &["s"], vec![]),
            node_of("Mul", "mul", &["x", "s"], &["y"], vec![]),
        ],
        vec![("s0".into(), f32s(&[3, 1, 1], &[2.0]))],
        x(),
        "y",
    );
    let mut kept = m.clone();
    let opts = FuseOptions {
        no_constant_folding: true,
        ..FuseOptions::default()
    };
    fuse(&mut kept, &opts).unwrap();
    assert_eq!(count(&kept, "Identity"), 1);
}

#[test]
fn a_constant_too_large_to_fold_stays_computed_and_the_rest_folds() {
    // ConstantOfShape([2^25]) stays (over the folding bound); the Identity before BN folds.
    let m = model_of(
        vec![
            node_of("ConstantOfShape", "big", &["bigshape"], &["zeros"], vec![]),
            node_of(
                "ReduceSum",
                "sum",
                &["zeros"],
                &["z"],
                vec![int("keepdims", 0)],
            ),
            node_of("Identity", "id_s", &["s0"], &["s"], vec![]),
            conv(),
            node_of(
                "BatchNormalization",
                "bn",
                &["c", "s", "b2", "m", "v"],
                &["t"],
                vec![],
            ),
            node_of("Add", "add", &["t", "z"], &["y"], vec![]),
        ],
        vec![
            ("bigshape".into(), i64s(&[1 << 25])),
            ("w".into(), f32s(&[3, 3, 3, 3], &[0.2, -0.1, 0.05, 0.3])),
            ("b".into(), f32s(&[3], &[0.1, -0.2, 0.3])),
            ("s0".into(), f32s(&[3], &[1.5, 0.7, 1.1])),
            ("b2".into(), f32s(&[3], &[0.1, 0.0, -0.1])),
            ("m".into(), f32s(&[3], &[0.2, -0.3, 0.05])),
            ("v".into(), f32s(&[3], &[0.9, 1.3, 0.4])),
        ],
        x(),
        "y",
    );
    let mut fused = m.clone();
    let r = fuse(&mut fused, &FuseOptions::default()).unwrap();
    assert_eq!(r.bn_after, 0, "{:?}", r.constants);
    assert_eq!(count(&fused, "ConstantOfShape"), 1, "{:?}", r.constants);
    assert!(
        r.constants.skipped.iter().any(|s| s.contains("'big'")),
        "{:?}",
        r.constants.skipped
    );
}
