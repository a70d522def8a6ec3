//! Property tests: random small Conv / ConvTranspose / Gemm + BatchNormalization graphs (shapes,
//! groups, strides, pads, dilations, bias or not, f32 or f64) fold into a graph without BN whose
//! outputs in tract match the original's.

mod common;

use std::collections::HashMap;

use common::*;
use ndarray::{ArrayD, IxDyn};
use proptest::prelude::*;
use qfold::fusion::{fuse, FuseOptions};
use qfold::onnx::{ElemType, Model, TensorData};
use qfold::verify::{random_cases, tolerance};

/// Deterministic values from a seed (splitmix64), uniform in [lo, hi).
fn values(seed: u64, n: usize, lo: f64, hi: f64) -> Vec<f64> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            lo + (hi - lo) * (z >> 11) as f64 / (1u64 << 53) as f64
        })
        .collect()
}

fn tensor(seed: u64, shape: &[usize], lo: f64, hi: f64, ty: ElemType) -> TensorData {
    let n = shape.iter().product();
    TensorData::from_f64(
        ArrayD::from_shape_vec(IxDyn(shape), values(seed, n, lo, hi)).unwrap(),
        ty,
    )
    .unwrap()
}

fn bn_inits(seed: u64, c: usize, ty: ElemType) -> Vec<(String, TensorData)> {
    vec![
        ("gamma".into(), tensor(seed + 11, &[c], -1.5, 1.5, ty)),
        ("beta".into(), tensor(seed + 12, &[c], -1.0, 1.0, ty)),
        ("mean".into(), tensor(seed + 13, &[c], -1.0, 1.0, ty)),
        ("var".into(), tensor(seed + 14, &[c], 0.1, 2.0, ty)),
    ]
}

fn bn_node(input: &str, eps: Option<f32>) -> qfold::onnx::proto::NodeProto {
    let attrs = eps.map(|e| vec![float("epsilon", e)]).unwrap_or_default();
    node_of(
        "BatchNormalization",
        "bn",
        &[input, "gamma", "beta", "mean", "var"],
        &["y"],
        attrs,
    )
}

fn check_fold(model: &Model, seed: u64) -> Result<(), TestCaseError> {
    let cases = random_cases(model, 1, seed, &HashMap::new()).unwrap();
    let mut fused = model.clone();
    let r = fuse(&mut fused, &FuseOptions::default()).unwrap();
    prop_assert_eq!(count(&fused, "BatchNormalization"), 0, "{:#?}", r);
    let a = run(model, &cases[0]);
    let b = run(&fused, &cases[0]);
    let cmp = compare(&a, &b, tolerance::FLOAT);
    prop_assert!(cmp.passed, "{:#?}", cmp.outputs);
    Ok(())
}

#[derive(Debug, Clone)]
struct ConvCase {
    transpose: bool,
    rank: usize,
    groups: usize,
    c_per_group: usize,
    m_per_group: usize,
    kernel: usize,
    stride: usize,
    pad: usize,
    dilation: usize,
    extra: usize,
    bias: bool,
    f64: bool,
    eps: Option<f32>,
    seed: u64,
}

fn conv_case() -> impl Strategy<Value = ConvCase> {
    let shape = (
        any::<bool>(),
        1usize..=3,
        1usize..=3,
        1usize..=3,
        1usize..=3,
        1usize..=3,
    );
    let conv = (
        1usize..=2,
        0usize..=1,
        1usize..=2,
        0usize..=2,
        any::<bool>(),
        any::<bool>(),
    );
    let eps = prop_oneof![Just(None), Just(Some(1e-3f32))];
    (shape, conv, eps, any::<u64>()).prop_map(
        |(
            (transpose, rank, groups, c_per_group, m_per_group, kernel),
            (stride, pad, dilation, extra, bias, f64),
            eps,
            seed,
        )| ConvCase {
            transpose,
            rank,
            groups,
            c_per_group,
            m_per_group,
            kernel,
            stride,
            pad,
            dilation,
            extra,
            bias,
            f64,
            eps,
            seed: seed >> 8,
        },
    )
}

fn conv_model(c: &ConvCase) -> Model {
    let ty = if c.f64 { ElemType::F64 } else { ElemType::F32 };
    let cin = c.groups * c.c_per_group;
    let m = c.groups * c.m_per_group;
    let span = (c.kernel - 1) * c.dilation + 1;
    let spatial = vec![span + c.extra + if c.rank == 3 { 0 } else { 1 }; c.rank];
    let mut in_shape = vec![1, cin];
    in_shape.extend(&spatial);
    let k = vec![c.kernel; c.rank];
    let w_shape: Vec<usize> = if c.transpose {
        [vec![cin, c.m_per_group], k.clone()].concat()
    } else {
        [vec![m, c.c_per_group], k.clone()].concat()
    };
    let mut inits = vec![("w".to_string(), tensor(c.seed + 1, &w_shape, -0.5, 0.5, ty))];
    let mut inputs = vec!["x", "w"];
    if c.bias {
        inits.push(("b".into(), tensor(c.seed + 2, &[m], -0.5, 0.5, ty)));
        inputs.push("b");
    }
    inits.extend(bn_inits(c.seed, m, ty));
    let r = c.rank;
    // A ConvTranspose output must not be empty: pads stay within the kernel span.
    let pad = if c.transpose {
        c.pad.min((span - 1) / 2)
    } else {
        c.pad
    };
    let attrs = vec![
        int("group", c.groups as i64),
        ints("strides", &vec![c.stride as i64; r]),
        ints("pads", &vec![pad as i64; 2 * r]),
        ints("dilations", &vec![c.dilation as i64; r]),
        ints("kernel_shape", &vec![c.kernel as i64; r]),
    ];
    let op = if c.transpose { "ConvTranspose" } else { "Conv" };
    let nodes = vec![
        node_of(op, "conv", &inputs, &["t"], attrs),
        bn_node("t", c.eps),
    ];
    model_of(nodes, inits, value_info("x", ty, &in_shape), "y")
}

#[derive(Debug, Clone)]
struct GemmCase {
    m: usize,
    k: usize,
    n: usize,
    trans_b: bool,
    alpha: f32,
    beta: f32,
    c_shape: usize,
    seed: u64,
}

fn gemm_case() -> impl Strategy<Value = GemmCase> {
    (
        1usize..=4,
        1usize..=5,
        1usize..=5,
        any::<bool>(),
        0.25f32..2.0,
        0.25f32..2.0,
        0usize..=5,
        any::<u64>(),
    )
        .prop_map(|(m, k, n, trans_b, alpha, beta, c_shape, seed)| GemmCase {
            m,
            k,
            n,
            trans_b,
            alpha,
            beta,
            c_shape,
            seed: seed >> 8,
        })
}

fn gemm_model(c: &GemmCase) -> Model {
    // tract 0.23.9 cannot load an f64 Gemm with a C input ("tensor is F32, accessed as F64"
    // while folding beta * C), and every folded Gemm has one: Gemm cases are f32 (the f64 fold
    // math is the same code, exercised by the Conv cases).
    let ty = ElemType::F32;
    let b_shape = if c.trans_b { [c.n, c.k] } else { [c.k, c.n] };
    let mut inits = vec![("B".to_string(), tensor(c.seed + 1, &b_shape, -1.0, 1.0, ty))];
    let mut inputs = vec!["a", "B"];
    let c_shape: Option<Vec<usize>> = match c.c_shape {
        0 => None,
        1 => Some(vec![]),
        2 => Some(vec![c.n]),
        3 => Some(vec![1, c.n]),
        4 => Some(vec![c.m, c.n]),
        _ => Some(vec![c.m, 1]),
    };
    if let Some(s) = &c_shape {
        inits.push(("C".into(), tensor(c.seed + 2, s, -1.0, 1.0, ty)));
        inputs.push("C");
    }
    inits.extend(bn_inits(c.seed, c.n, ty));
    let attrs = vec![
        int("transB", c.trans_b as i64),
        float("alpha", c.alpha),
        float("beta", c.beta),
    ];
    let nodes = vec![
        node_of("Gemm", "fc", &inputs, &["t"], attrs),
        bn_node("t", None),
    ];
    model_of(nodes, inits, value_info("a", ty, &[c.m, c.k]), "y")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, .. ProptestConfig::default() })]

    #[test]
    fn conv_and_conv_transpose_bn_fold_exactly(c in conv_case()) {
        check_fold(&conv_model(&c), c.seed)?;
    }

    #[test]
    fn gemm_bn_folds_exactly(c in gemm_case()) {
        check_fold(&gemm_model(&c), c.seed)?;
    }
}
