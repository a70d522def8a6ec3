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
