//! Malformed but decodable models through the rules: every case the engine issue lists goes
//! through inspect, fuse, quantize and convert without a panic or an abort, and every refusal
//! exits 2 naming the node; a property test throws random small graphs with wrong arities, odd
//! dims and attribute values at the same library calls.

mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};

use common::*;
use ndarray::{ArrayD, IxDyn};
use proptest::prelude::*;
use qfold::onnx::proto::{AttributeProto, NodeProto};
use qfold::onnx::{ElemType, Model, TensorData};

fn f32s(shape: &[usize], v: f32) -> TensorData {
    TensorData::F32(ArrayD::from_elem(IxDyn(shape), v))
}

fn bn_params(c: usize) -> Vec<(String, TensorData)> {
    vec![
        ("s".into(), f32s(&[c], 1.5)),
        ("b".into(), f32s(&[c], 0.1)),
        ("m".into(), f32s(&[c], 0.2)),
        ("v".into(), f32s(&[c], 0.9)),
    ]
}

fn bn(input: &str, output: &str) -> NodeProto {
    node_of(
        "BatchNormalization",
        "bn",
        &[input, "s", "b", "m", "v"],
        &[output],
        vec![],
    )
}

/// Saves `model` in a scratch folder and runs inspect, fuse, quantize and convert on it.
/// Returns (command, exit code, stderr) for each; asserts no panic, no abort, exit 0-2.
fn through_cli(tag: &str, model: &Model) -> Vec<(&'static str, i32, String)> {
    let tmp = TempDir::new(tag);
    let path = tmp.join("model.onnx");
    qfold::onnx::save(model, &path, &Default::default()).unwrap();
    let m = path.to_str().unwrap();
    let out = tmp.join("out.onnx");
    let o = out.to_str().unwrap();
    let runs: [(&str, Vec<&str>); 4] = [
        ("inspect", vec!["inspect", m]),
        ("fuse", vec!["fuse", m, "-o", o]),
        (
            "quantize",
            vec!["quantize", m, "-o", o, "--calib-random", "2"],
        ),
        ("convert", vec!["convert", m, "-o", o]),
    ];
    runs.into_iter()
        .map(|(what, args)| {
            let (code, _, err) = run_qfold(&args);
            assert!((0..=2).contains(&code), "{tag} {what}: exit {code}\n{err}");
            assert!(!err.contains("panicked"), "{tag} {what}: {err}");
            if code == 2 {
                assert!(
                    common::without_progress(&err).starts_with("error: "),
                    "{tag} {what}: {err}"
                );
            }
            (what, code, err)
        })
        .collect()
}

fn outcome<'a>(runs: &'a [(&str, i32, String)], what: &str) -> (i32, &'a str) {
    let r = runs.iter().find(|r| r.0 == what).unwrap();
    (r.1, &r.2)
}

fn x4() -> qfold::onnx::proto::ValueInfoProto {
    value_info("x", ElemType::F32, &[1, 4, 4, 4])
}

#[test]
fn matmul_with_one_input_before_bn() {
    let m = model_of(
        vec![
            node_of("MatMul", "mm", &["x"], &["t"], vec![]),
            bn("t", "y"),
        ],
        bn_params(4),
        value_info("x", ElemType::F32, &[2, 4]),
        "y",
    );
    let runs = through_cli("mm1", &m);
    assert_eq!(outcome(&runs, "fuse").0, 0);
    let (code, err) = outcome(&runs, "quantize");
    assert_eq!(code, 2);
    assert!(
        err.contains("node 'mm' (MatMul): has 1 inputs, expects 2"),
        "{err}"
    );
}

#[test]
fn bn_before_conv_with_one_input() {
    let m = model_of(
        vec![
            bn("x", "t"),
            node_of("Conv", "conv", &["t"], &["y"], vec![]),
        ],
        bn_params(4),
        x4(),
        "y",
    );
    let runs = through_cli("bnconv1", &m);
    assert_eq!(outcome(&runs, "fuse").0, 0);
    let (code, err) = outcome(&runs, "quantize");
    assert_eq!(code, 2);
    assert!(err.contains("node 'conv' (Conv): has 1 inputs"), "{err}");
}

#[test]
fn gemm_whose_c_has_no_values() {
    let mut inits = bn_params(4);
    inits.push(("B".into(), f32s(&[3, 4], 0.5)));
    inits.push(("C".into(), f32s(&[0, 4], 0.0)));
    let m = model_of(
        vec![
            node_of("Gemm", "gemm", &["x", "B", "C"], &["t"], vec![]),
            bn("t", "y"),
        ],
        inits,
        value_info("x", ElemType::F32, &[2, 3]),
        "y",
    );
    let mut fused = m.clone();
    let r = qfold::fusion::fuse(&mut fused, &Default::default()).unwrap();
    assert_eq!(r.bn_after, 1);
    assert!(
        r.skipped
            .iter()
            .any(|s| s.reason.contains("C has shape [0, 4]")),
        "{:?}",
        r.skipped
    );
    let runs = through_cli("gemmc0", &m);
    assert_eq!(outcome(&runs, "fuse").0, 0);
}

#[test]
fn gemm_with_one_input_under_quantize() {
    let m = model_of(
        vec![node_of("Gemm", "gemm", &["x"], &["y"], vec![])],
        vec![],
        value_info("x", ElemType::F32, &[2, 3]),
        "y",
    );
    let runs = through_cli("gemm1", &m);
    let (code, err) = outcome(&runs, "quantize");
    assert_eq!(code, 2);
    assert!(err.contains("node 'gemm' (Gemm)"), "{err}");
}

#[test]
fn conv_transpose_with_a_huge_group() {
    let mut inits = bn_params(4);
    inits.push(("W".into(), f32s(&[4, 1, 3, 3], 0.5)));
    let m = model_of(
        vec![
            node_of(
                "ConvTranspose",
                "ct",
                &["x", "W"],
                &["t"],
                vec![int("group", 1 << 62)],
            ),
            bn("t", "y"),
        ],
        inits,
        x4(),
        "y",
    );
    let mut fused = m.clone();
    let r = qfold::fusion::fuse(&mut fused, &Default::default()).unwrap();
    assert_eq!(r.bn_after, 1);
    assert!(
        r.skipped
            .iter()
            .any(|s| s.nodes == ["ct"] && s.reason.contains("'group'")),
        "{:?}",
        r.skipped
    );
    let runs = through_cli("ctgroup", &m);
    let (code, err) = outcome(&runs, "quantize");
    assert_eq!(code, 2);
    assert!(
        err.contains("node 'ct' (ConvTranspose): attribute 'group'"),
        "{err}"
    );
}

/// Q -> DQ -> Conv(DQ(w)) -> Q -> DQ with the weight and its DequantizeLinear as given.
fn qdq_conv(w: TensorData, scales: Vec<f32>, axis: Option<i64>) -> Model {
    let n = scales.len();
    let inits = vec![
        (
            "xs".to_string(),
            TensorData::F32(ndarray::arr0(0.1f32).into_dyn()),
        ),
        (
            "xz".to_string(),
            TensorData::U8(ndarray::arr0(0u8).into_dyn()),
        ),
        ("wq".to_string(), w),
        (
            "ws".to_string(),
            TensorData::F32(ArrayD::from_shape_vec(IxDyn(&[n]), scales).unwrap()),
        ),
    ];
    let dqw_attrs = axis.map(|a| vec![int("axis", a)]).unwrap_or_default();
    model_of(
        vec![
            node_of("QuantizeLinear", "q0", &["x", "xs", "xz"], &["xq"], vec![]),
            node_of(
                "DequantizeLinear",
                "dq0",
                &["xq", "xs", "xz"],
                &["xd"],
                vec![],
            ),
            node_of("DequantizeLinear", "dqw", &["wq", "ws"], &["wd"], dqw_attrs),
            node_of("Conv", "conv", &["xd", "wd"], &["c"], vec![]),
            node_of("QuantizeLinear", "q1", &["c", "xs", "xz"], &["cq"], vec![]),
            node_of(
                "DequantizeLinear",
                "dq1",
                &["cq", "xs", "xz"],
                &["y"],
                vec![],
            ),
        ],
        inits,
        value_info("x", ElemType::F32, &[1, 1, 4, 4]),
        "y",
    )
}

#[test]
fn qdq_conv_with_a_scalar_int8_weight() {
    let m = qdq_conv(
        TensorData::I8(ndarray::arr0(3i8).into_dyn()),
        vec![0.1],
        None,
    );
    let runs = through_cli("qdqscalar", &m);
    let (code, err) = outcome(&runs, "convert");
    assert_eq!(code, 2);
    assert!(
        err.contains("node 'conv': weight 'wq' has shape []"),
        "{err}"
    );
}

#[test]
fn dequantize_with_axis_out_of_rank_or_too_few_scales() {
    let w = TensorData::I8(ArrayD::from_elem(IxDyn(&[4, 1, 1, 1]), 1i8));
    let m = qdq_conv(w.clone(), vec![0.1; 4], Some(7));
    let runs = through_cli("dqaxis7", &m);
    let (code, err) = outcome(&runs, "convert");
    assert_eq!(code, 2);
    assert!(err.contains("per axis 7"), "{err}");
    let m = qdq_conv(w, vec![0.1; 3], Some(0));
    let runs = through_cli("dq3of4", &m);
    let (code, err) = outcome(&runs, "convert");
    assert_eq!(code, 2);
    assert!(
        err.contains("3 weight scales for 4 output channels"),
        "{err}"
    );
}

#[test]
fn huge_attributes_are_refused_before_any_allocation() {
    for (attr, tag) in [
        (ints("kernel_shape", &[1 << 32, 3]), "kernel"),
        (ints("strides", &[1 << 32, 1]), "strides"),
        (ints("pads", &[0, 0, 1 << 32, 0]), "pads"),
    ] {
        let m = model_of(
            vec![node_of("Conv", "conv", &["x", "W"], &["y"], vec![attr])],
            vec![("W".into(), f32s(&[4, 4, 3, 3], 0.1))],
            x4(),
            "y",
        );
        let runs = through_cli(tag, &m);
        let (code, err) = outcome(&runs, "quantize");
        assert_eq!(code, 2, "{tag}");
        assert!(
            err.contains("node 'conv' (Conv)") && err.contains("4294967296"),
            "{err}"
        );
    }
    // Pads within the spec's bound that would still need absurd memory: refused from the
    // typed shapes, before tract allocates.
    let m = model_of(
        vec![node_of(
            "Conv",
            "conv",
            &["x", "W"],
            &["y"],
            vec![ints("pads", &[60000, 60000, 60000, 60000])],
        )],
        vec![("W".into(), f32s(&[4, 4, 3, 3], 0.1))],
        x4(),
        "y",
    );
    let runs = through_cli("bigpads", &m);
    let (code, err) = outcome(&runs, "quantize");
    assert_eq!(code, 2);
    assert!(
        err.contains("node 'conv'") && err.contains("elements"),
        "{err}"
    );
}

#[test]
fn batch_normalization_of_a_rank_one_input() {
    let m = model_of(
        vec![bn("x", "y")],
        bn_params(4),
        value_info("x", ElemType::F32, &[4]),
        "y",
    );
    let runs = through_cli("bnrank1", &m);
    let (code, err) = outcome(&runs, "quantize");
    assert_eq!(code, 2);
    assert!(
        err.contains("node 'bn' (BatchNormalization): its input 'x' has rank 1"),
        "{err}"
    );
}

#[test]
fn nested_protobuf_groups_are_refused_by_every_command() {
    let tmp = TempDir::new("groups");
    let path = tmp.join("model.onnx");
    let mut bytes = std::fs::read(conformance("conv2d_basic").join("model.onnx")).unwrap();
    bytes.extend(std::iter::repeat_n(0x0bu8, 1_000_000));
    std::fs::write(&path, bytes).unwrap();
    let m = path.to_str().unwrap();
    let o = tmp.join("o.onnx");
    for args in [
        vec!["inspect", m],
        vec!["fuse", m, "-o", o.to_str().unwrap()],
        vec![
            "quantize",
            m,
            "-o",
            o.to_str().unwrap(),
            "--calib-random",
            "1",
        ],
        vec!["convert", m, "-o", o.to_str().unwrap()],
    ] {
        let (code, _, err) = run_qfold(&args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains("protobuf group"), "{err}");
    }
}

// ---- property test: random small graphs through the library ----

const OPS: &[&str] = &[
    "Conv",
    "ConvTranspose",
    "BatchNormalization",
    "Gemm",
    "MatMul",
    "Relu",
    "Add",
    "Mul",
    "QuantizeLinear",
    "DequantizeLinear",
    "Identity",
    "Reshape",
    "Flatten",
    "Concat",
    "MaxPool",
    "Clip",
];

/// A constant: mostly shapes that fit the ops (weights [4, 4, k, k], vectors [4], matrices,
/// scalars) in f32, int8, uint8 or int64; sometimes any rank-0..4 shape with dims 0..4.
fn tensor() -> impl Strategy<Value = TensorData> {
    let canned = prop::sample::select(vec![
        vec![4usize, 4, 1, 1],
        vec![4, 4, 3, 3],
        vec![4, 1, 3, 3],
        vec![4],
        vec![],
        vec![1],
        vec![4, 4],
        vec![16, 4],
        vec![2],
        vec![3],
    ]);
    let shape = prop_oneof![
        3 => canned,
        1 => prop::collection::vec(0usize..5, 0..5),
    ];
    (0usize..6, shape, -2.0f32..2.0).prop_map(|(ty, shape, v)| {
        let n: usize = shape.iter().product();
        let s = IxDyn(&shape);
        let ramp = |k: usize| v + k as f32 * 0.25;
        match ty {
            0..=2 => {
                TensorData::F32(ArrayD::from_shape_vec(s, (0..n).map(ramp).collect()).unwrap())
            }
            3 => TensorData::I8(ArrayD::from_shape_vec(s, vec![v as i8; n]).unwrap()),
            4 => TensorData::U8(ArrayD::from_shape_vec(s, vec![v.abs() as u8; n]).unwrap()),
            _ => TensorData::I64(ArrayD::from_shape_vec(s, vec![v as i64 + 1; n]).unwrap()),
        }
    })
}

fn attribute() -> impl Strategy<Value = AttributeProto> {
    let names = prop::sample::select(vec![
        "group",
        "kernel_shape",
        "pads",
        "strides",
        "dilations",
        "axis",
        "epsilon",
        "transA",
        "transB",
        "alpha",
        "beta",
        "training_mode",
        "spatial",
        "min",
        "max",
        "perm",
    ]);
    let ivals = prop::sample::select(vec![
        -1i64,
        0,
        1,
        2,
        3,
        7,
        1 << 16,
        1 << 31,
        1 << 32,
        1 << 62,
        i64::MAX,
        i64::MIN,
    ]);
    (
        names,
        ivals,
        0usize..3,
        prop::collection::vec(-2i64..5, 0..5),
    )
        .prop_map(|(name, iv, kind, list)| match kind {
            0 => int(name, iv),
            1 => float(
                name,
                [f32::NAN, -1.0, 0.0, 1e-5, f32::INFINITY][iv.unsigned_abs() as usize % 5],
            ),
            _ => ints(
                name,
                &list
                    .iter()
                    .map(|&k| if k == 4 { iv } else { k })
                    .collect::<Vec<_>>(),
            ),
        })
}

/// The usual number of inputs of each op in [`OPS`].
fn arity(op: &str) -> usize {
    match op {
        "BatchNormalization" => 5,
        "Conv" | "ConvTranspose" | "Gemm" | "QuantizeLinear" | "DequantizeLinear" => 3,
        "MatMul" | "Add" | "Mul" | "Reshape" | "Concat" => 2,
        _ => 1,
    }
}

/// A node spec: op, whether to use its usual arity, input choices, attributes, output count.
type NodeSpec = (usize, bool, Vec<usize>, Vec<AttributeProto>, usize);

fn node_spec() -> impl Strategy<Value = NodeSpec> {
    (
        0..OPS.len(),
        prop::bool::weighted(0.85),
        prop::collection::vec(0usize..12, 0..7),
        prop::collection::vec(attribute(), 0..3),
        prop::sample::select(vec![1usize, 1, 1, 1, 0, 2]),
    )
}

/// Builds a graph: input x [1, 4, 4, 4], constants c0..ck, nodes n0..nk. Input choice 0-5 is
/// the value produced last, 6-9 a constant, 10 any earlier value, 11 an empty optional input.
fn graph(nodes: Vec<NodeSpec>, consts: Vec<TensorData>) -> Model {
    let mut pool: Vec<String> = vec!["x".into()];
    let nconst = consts.len();
    let mut out = Vec::new();
    let mut last = "x".to_string();
    for (k, (op, usual, mut inputs, attrs, outputs)) in nodes.into_iter().enumerate() {
        let op = OPS[op];
        if usual {
            inputs.resize(arity(op), 6);
            if let Some(first) = inputs.first_mut() {
                *first = 0;
            }
        }
        let ins: Vec<String> = inputs
            .iter()
            .enumerate()
            .map(|(slot, &i)| match i {
                0..=5 if slot == 0 => last.clone(),
                0..=9 if nconst > 0 => format!("c{}", (i + slot) % nconst),
                0..=10 => pool[(i * 7 + slot) % pool.len()].clone(),
                _ => String::new(),
            })
            .collect();
        let outs: Vec<String> = (0..outputs).map(|j| format!("n{k}_{j}")).collect();
        let refs: Vec<&str> = ins.iter().map(String::as_str).collect();
        let orefs: Vec<&str> = outs.iter().map(String::as_str).collect();
        out.push(node_of(op, &format!("n{k}"), &refs, &orefs, attrs));
        pool.extend(outs.iter().cloned());
        if let Some(o) = outs.first() {
            last = o.clone();
        }
    }
    let inits = consts
        .into_iter()
        .enumerate()
        .map(|(k, t)| (format!("c{k}"), t))
        .collect();
    model_of(out, inits, x4(), &last)
}

/// An error message names what it is about: a node, a tensor, an input or a file.
fn names_something(e: &qfold::Error) -> bool {
    !matches!(e, qfold::Error::Usage(m) if !m.contains('\''))
}

fn no_panic<T>(what: &str, f: impl FnOnce() -> qfold::Result<T>) -> Result<(), TestCaseError> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Err(_) => Err(TestCaseError::fail(format!("{what} panicked"))),
        Ok(Err(e)) if !names_something(&e) => {
            Err(TestCaseError::fail(format!("{what}: unnamed error: {e}")))
        }
        Ok(r) => {
            if std::env::var("FUZZ_TRACE").is_ok() {
                match &r {
                    Ok(_) => eprintln!("TRACE {what}: ok"),
                    Err(e) => eprintln!(
                        "TRACE {what}: {}",
                        e.to_string().chars().take(90).collect::<String>()
                    ),
                }
            }
            Ok(())
        }
    }
}

proptest! {
    // 200 cases by default; PROPTEST_CASES=N for a longer run.
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(200),
        ..ProptestConfig::default()
    })]

    #[test]
    fn random_graphs_never_panic(
        nodes in prop::collection::vec(node_spec(), 1..6),
        consts in prop::collection::vec(tensor(), 0..6),
    ) {
        let model = graph(nodes, consts);
        no_panic("inspect", || Ok(qfold::inspect::summarize(model.clone())))?;
        let mut fused = model.clone();
        no_panic("fuse", || qfold::fusion::fuse(&mut fused, &Default::default()))?;
        let mut qat = model.clone();
        no_panic("fuse --qat", || {
            qfold::fusion::fuse(&mut qat, &qfold::fusion::FuseOptions { qat: true, ..Default::default() })
        })?;
        let mut converted = model.clone();
        no_panic("convert", || qfold::quant::qoperator::convert(&mut converted))?;
        no_panic("plan", || {
            qfold::quant::plan::plan(&model, &qfold::quant::QuantizeOptions::default().plan_options())
        })?;
        // Through tract: a random calibration sample, as `quantize --calib-random 1` does.
        let sample = vec![("x".to_string(), f32s(&[1, 4, 4, 4], 0.5))];
        no_panic("quantize", || {
            qfold::quant::quantize(
                &model,
                qfold::quant::Calibration::Samples(std::slice::from_ref(&sample)),
                &Default::default(),
            )
        })?;
    }
}
