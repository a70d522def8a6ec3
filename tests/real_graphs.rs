//! What real exporters write (issue 9): Conv biases of shape [C, 1] / [1, C] (TensorFlow
//! exports, which tract refuses), initializers listed among the graph inputs (IR 3 requires it;
//! from IR 4 they are overridable defaults, constants only with `--inputs-as-constants`), and
//! scalar inputs in stacked `.npz` data (an LSTM's sample rate).

mod common;

use common::*;
use qfold::fusion::{fuse, FuseOptions};
use qfold::onnx::{ElemType, Model, TensorData};
use qfold::verify::{open_data, Preprocess};

fn f32t(v: Vec<f32>, shape: &[usize]) -> TensorData {
    TensorData::F32(ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(shape), v).unwrap())
}

/// x [1, 2, 3, 3] -> Conv(w [3, 2, 1, 1], b of `bias_shape`) -> y
fn conv_with_bias(bias_shape: &[usize]) -> Model {
    model_of(
        vec![node_of("Conv", "conv", &["x", "w", "b"], &["y"], vec![])],
        vec![
            (
                "w".into(),
                f32t(
                    (0..6).map(|v| v as f32 * 0.25 - 0.5).collect(),
                    &[3, 2, 1, 1],
                ),
            ),
            ("b".into(), f32t(vec![1.0, -2.0, 3.0], bias_shape)),
        ],
        value_info("x", ElemType::F32, &[1, 2, 3, 3]),
        "y",
    )
}

fn x_case() -> qfold::verify::Case {
    f32_case(
        "x",
        &[1, 2, 3, 3],
        (0..18).map(|v| v as f32 / 9.0 - 1.0).collect(),
    )
}

#[test]
fn conv_bias_of_shape_c1_or_1c_becomes_c() {
    let reference = run(&conv_with_bias(&[3]), &x_case());
    for shape in [[3usize, 1], [1, 3]] {
        let m = conv_with_bias(&shape);
        // tract refuses the bias as given
        let err = qfold::runtime::Runner::new(&m, &x_case().inputs, &[])
            .err()
            .unwrap_or_else(|| panic!("tract accepted a {shape:?} bias"));
        assert!(!err.to_string().is_empty());
        let mut f = m.clone();
        let r = fuse(&mut f, &FuseOptions::default()).unwrap();
        assert_eq!(
            r.constants.conv_bias_reshaped,
            [format!("conv: 'b' {shape:?} -> [3]")]
        );
        let conv = node(&f, "conv");
        let b = f
            .graph()
            .initializer
            .iter()
            .find(|t| t.name == conv.input[2])
            .unwrap();
        assert_eq!(b.dims, [3]);
        // the original bias is gone (nothing else read it), the input model untouched
        assert!(!f.graph().initializer.iter().any(|t| t.name == "b"));
        assert_eq!(
            m.graph().initializer[1].dims,
            [shape[0] as i64, shape[1] as i64]
        );
        let out = run(&f, &x_case());
        assert_eq!(out, reference);
        let want = [1.0f32, -2.0, 3.0];
        // a zero input gives the bias itself
        let zero = f32_case("x", &[1, 2, 3, 3], vec![0.0; 18]);
        let TensorData::F32(y) = &run(&f, &zero)[0] else {
            panic!("float output")
        };
        for (c, w) in want.iter().enumerate() {
            assert_eq!(y[[0, c, 1, 1]], *w);
        }
    }
    // [2, 1] for 3 channels is not a [3] bias in disguise: left as it is
    let mut wrong = conv_with_bias(&[3, 1]);
    wrong.graph_mut().initializer[1] = f32t(vec![1.0, 2.0], &[2, 1]).to_proto("b");
    let r = fuse(&mut wrong, &FuseOptions::default()).unwrap();
    assert!(r.constants.conv_bias_reshaped.is_empty());
    // --no-constant-folding keeps the graph as it is
    let mut kept = conv_with_bias(&[3, 1]);
    let r = fuse(
        &mut kept,
        &FuseOptions {
            no_constant_folding: true,
            ..FuseOptions::default()
        },
    )
    .unwrap();
    assert!(r.constants.conv_bias_reshaped.is_empty());
}

/// x -> Conv(w, b) -> BatchNormalization -> y, with `w` also a graph input.
fn conv_bn_with_weight_input(ir: i64) -> Model {
    let mut m = model_of(
        vec![
            node_of("Conv", "conv", &["x", "w", "b"], &["c"], vec![]),
            node_of(
                "BatchNormalization",
                "bn",
                &["c", "s", "beta", "mean", "var"],
                &["y"],
                vec![],
            ),
        ],
        vec![
            (
                "w".into(),
                f32t(
                    (0..6).map(|v| v as f32 * 0.25 - 0.5).collect(),
                    &[3, 2, 1, 1],
                ),
            ),
            ("b".into(), f32t(vec![0.1, 0.2, 0.3], &[3])),
            ("s".into(), f32t(vec![1.5, 0.5, 2.0], &[3])),
            ("beta".into(), f32t(vec![0.0, 1.0, -1.0], &[3])),
            ("mean".into(), f32t(vec![0.2, -0.1, 0.0], &[3])),
            ("var".into(), f32t(vec![1.0, 4.0, 0.25], &[3])),
        ],
        value_info("x", ElemType::F32, &[1, 2, 3, 3]),
        "y",
    );
    m.proto.ir_version = ir;
    m.graph_mut()
        .input
        .push(value_info("w", ElemType::F32, &[3, 2, 1, 1]));
    m
}

#[test]
fn initializers_listed_as_inputs_fold_below_ir_4_or_when_asked() {
    let reference = run(&conv_bn_with_weight_input(8), &x_case());
    // IR 3: the listed initializer is a constant
    let mut f = conv_bn_with_weight_input(3);
    let r = fuse(&mut f, &FuseOptions::default()).unwrap();
    assert_eq!((r.bn_before, r.bn_after), (1, 0));
    // IR 8: an overridable default, not folded...
    let mut f = conv_bn_with_weight_input(8);
    let r = fuse(&mut f, &FuseOptions::default()).unwrap();
    assert_eq!((r.bn_before, r.bn_after), (1, 1));
    assert!(r.constants.inputs_as_constants.is_empty());
    assert!(f.graph().input.iter().any(|v| v.name == "w"));
    // ...unless asked
    let mut f = conv_bn_with_weight_input(8);
    let r = fuse(
        &mut f,
        &FuseOptions {
            inputs_as_constants: true,
            ..FuseOptions::default()
        },
    )
    .unwrap();
    assert_eq!((r.bn_before, r.bn_after), (1, 0));
    assert_eq!(r.constants.inputs_as_constants, ["w"]);
    assert!(!f.graph().input.iter().any(|v| v.name == "w"));
    let cmp = compare(
        &reference,
        &run(&f, &x_case()),
        qfold::verify::Criterion::Tolerance {
            atol: 1e-5,
            rtol: 1e-4,
        },
    );
    assert!(cmp.passed, "{cmp:?}");
}

#[test]
fn inputs_as_constants_on_the_command_line() {
    let t = TempDir::new("inputs-as-constants");
    let src = t.join("m.onnx");
    write_proto(&conv_bn_with_weight_input(8).proto, &src);
    let out = t.join("f.onnx");
    let (code, stdout, err) = run_qfold(&[
        "fuse",
        src.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--inputs-as-constants",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let j: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(j["fusion"]["bn_after"], 0);
    assert_eq!(j["fusion"]["constants"]["inputs_as_constants"][0], "w");
    // quantize takes the flag too: the weight becomes an int8 initializer
    let q = t.join("q.onnx");
    let (code, stdout, err) = run_qfold(&[
        "quantize",
        src.to_str().unwrap(),
        "-o",
        q.to_str().unwrap(),
        "--calib-random",
        "2",
        "--inputs-as-constants",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let j: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(j["quantization"]["qdq"]["weights"], 1);
    // without it the weight stays a float input of the Conv
    let (code, stdout, err) = run_qfold(&[
        "quantize",
        src.to_str().unwrap(),
        "-o",
        q.to_str().unwrap(),
        "--calib-random",
        "2",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let j: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(j["quantization"]["qdq"]["weights"], 0);
}

/// y = x * Cast(sr): x [1, 4] float, sr a declared int64 scalar.
fn scalar_input_model() -> Model {
    let mut m = model_of(
        vec![
            node_of("Cast", "cast", &["sr"], &["srf"], vec![int("to", 1)]),
            node_of("Mul", "mul", &["x", "srf"], &["y"], vec![]),
        ],
        vec![],
        value_info("x", ElemType::F32, &[1, 4]),
        "y",
    );
    m.graph_mut()
        .input
        .push(value_info("sr", ElemType::I64, &[]));
    m
}

#[test]
fn a_scalar_input_in_stacked_npz_data() {
    let t = TempDir::new("scalar-npz");
    let m = scalar_input_model();
    let x = ndarray::Array3::<f32>::from_shape_fn((5, 1, 4), |(k, _, j)| (k * 4 + j) as f32);
    let write = |name: &str, sr: ndarray::ArrayD<i64>| {
        let p = t.join(name);
        let mut z = ndarray_npy::NpzWriter::new(std::fs::File::create(&p).unwrap());
        z.add_array("x", &x).unwrap();
        z.add_array("sr", &sr).unwrap();
        z.finish().unwrap();
        p
    };
    // one sample rate per sample, stacked: [5]
    let rates = ndarray::arr1(&[8000i64, 16000, 8000, 16000, 8000]).into_dyn();
    let stacked = write("stacked.npz", rates.clone());
    let src = open_data(&m, &stacked, &Preprocess::default()).unwrap();
    assert_eq!(src.len(), 5);
    for k in 0..5 {
        let case = src.read(k).unwrap();
        let sr = &case.inputs.iter().find(|(n, _)| n == "sr").unwrap().1;
        assert_eq!(sr.shape(), &[] as &[usize]);
        assert_eq!(sr.to_i64().unwrap(), [rates[k]]);
        let y = run(&m, &case);
        let TensorData::F32(y) = &y[0] else { panic!() };
        assert_eq!(y[[0, 1]], (k * 4 + 1) as f32 * rates[k] as f32);
    }
    // one value for every sample: a rank-0 array
    let once = write("once.npz", ndarray::arr0(16000i64).into_dyn());
    let src = open_data(&m, &once, &Preprocess::default()).unwrap();
    assert_eq!(src.len(), 5);
    let case = src.read(4).unwrap();
    let y = run(&m, &case);
    let TensorData::F32(y) = &y[0] else { panic!() };
    assert_eq!(y[[0, 3]], 19.0 * 16000.0);
    // a count that does not match is an error naming both inputs
    let bad = write("bad.npz", ndarray::arr1(&[1i64, 2, 3]).into_dyn());
    let err = open_data(&m, &bad, &Preprocess::default())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("5 for input 'x', 3 for input 'sr'"), "{err}");
}
