//! Helpers shared by the integration tests: where the committed models are, scratch folders,
//! the CLI binary, reference cases run in tract, and small models built in code.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

use qfold::onnx::proto::Message;
use qfold::onnx::proto::{
    attribute_proto::AttributeType, tensor_shape_proto, type_proto, AttributeProto, GraphProto,
    ModelProto, NodeProto, OperatorSetIdProto, TensorShapeProto, TypeProto, ValueInfoProto,
};
use qfold::onnx::{ElemType, Model, TensorData};
use qfold::verify::{self, Case, Comparer, Comparison, Criterion};
use std::collections::BTreeMap;

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `onnx_models/`.
pub fn models_dir() -> PathBuf {
    root().join("onnx_models")
}

/// Every committed case folder holding a `model.onnx` (conformance, fusion, trap), sorted.
pub fn all_case_dirs() -> Vec<PathBuf> {
    let mut out = Vec::new();
    for base in [models_dir(), models_dir().join("conformance")] {
        for e in std::fs::read_dir(&base).expect("onnx_models is readable") {
            let p = e.expect("dir entry").path();
            if p.join("model.onnx").is_file() {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// The conformance case folders, sorted by name.
pub fn conformance_dirs() -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(models_dir().join("conformance"))
        .expect("conformance corpus is readable")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.join("model.onnx").is_file())
        .collect();
    out.sort();
    out
}

/// The folder of conformance case `name`.
pub fn conformance(name: &str) -> PathBuf {
    models_dir().join("conformance").join(name)
}

/// Case name of a case folder.
pub fn case_name(dir: &Path) -> String {
    dir.file_name().unwrap().to_string_lossy().to_string()
}

/// A scratch folder under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let k = COUNTER.fetch_add(1, Ordering::SeqCst);
        let p = std::env::temp_dir().join(format!("qfold-test-{tag}-{}-{k}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, p: impl AsRef<Path>) -> PathBuf {
        self.0.join(p)
    }

    /// File names in the folder, sorted.
    pub fn listing(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&self.0)
            .expect("read temp dir")
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        v.sort();
        v
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Copies a folder recursively.
pub fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).expect("create copy target");
    for e in std::fs::read_dir(src).expect("read copy source") {
        let e = e.unwrap();
        let to = dst.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to);
        } else {
            std::fs::copy(e.path(), &to).expect("copy file");
        }
    }
}

/// Decodes a model file as a plain message (external data left as it is).
pub fn read_proto(path: &Path) -> ModelProto {
    ModelProto::parse_from_bytes(&std::fs::read(path).expect("read model")).expect("decode model")
}

/// Encodes a message into a file.
pub fn write_proto(m: &impl Message, path: &Path) {
    std::fs::write(path, m.write_to_bytes().expect("encode")).expect("write");
}

/// The qfold binary with `args`, run to completion.
pub fn qfold(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qfold"))
        .args(args)
        .current_dir(root())
        .output()
        .expect("run qfold")
}

/// stdout and stderr of a run as text.
pub fn texts(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).to_string(),
        String::from_utf8_lossy(&o.stderr).to_string(),
    )
}

/// The qfold binary with `args`: exit code, stdout, stderr.
pub fn run_qfold(args: &[&str]) -> (i32, String, String) {
    let o = qfold(args);
    let (out, err) = texts(&o);
    (o.status.code().unwrap_or(-1), out, err)
}

/// A committed case: its model, its test_data_set_0 and its provenance.json.
pub struct RefCase {
    pub dir: PathBuf,
    pub model: Model,
    pub case: Case,
    pub provenance: serde_json::Value,
}

pub fn load_case(name: &str) -> RefCase {
    let dir = models_dir().join(name);
    let model = qfold::onnx::load(dir.join("model.onnx")).expect("model loads");
    let case = verify::read_test_data_set(&model, &dir.join("test_data_set_0")).expect("data set");
    let provenance: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("provenance.json")).expect("provenance"))
            .expect("provenance parses");
    RefCase {
        dir,
        model,
        case,
        provenance,
    }
}

/// The reference test's module lists recorded by the export script.
pub fn fuse_lists(p: &serde_json::Value) -> Vec<Vec<String>> {
    p["fuse_lists"]
        .as_array()
        .expect("fuse_lists")
        .iter()
        .map(|l| {
            l.as_array()
                .expect("list")
                .iter()
                .map(|s| s.as_str().expect("name").to_string())
                .collect()
        })
        .collect()
}

pub fn run(model: &Model, case: &Case) -> Vec<TensorData> {
    let r = qfold::runtime::Runner::new(model, &case.inputs, &[]).expect("tract loads the model");
    r.run(&case.inputs).expect("tract runs the model")
}

pub fn compare(reference: &[TensorData], actual: &[TensorData], c: Criterion) -> Comparison {
    let names: Vec<String> = (0..reference.len())
        .map(|i| format!("output_{i}"))
        .collect();
    let mut cmp = Comparer::new(&names, c);
    cmp.add(reference, actual);
    cmp.finish()
}

/// The fusion test tolerance: 1e-5 absolute, 1e-4 relative.
pub const FUSION_TOL: Criterion = Criterion::Tolerance {
    atol: 1e-5,
    rtol: 1e-4,
};

pub fn assert_close(reference: &[TensorData], actual: &[TensorData], c: Criterion, what: &str) {
    let cmp = compare(reference, actual, c);
    assert!(cmp.passed, "{what}: {:#?}", cmp.outputs);
}

pub fn expected(case: &Case) -> Vec<TensorData> {
    case.expected.iter().map(|(_, t)| t.clone()).collect()
}

pub fn read_pb(path: &Path) -> TensorData {
    verify::read_tensor_pb(path).expect("tensor file").1
}

pub fn op_counts(model: &Model) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for n in &model.graph().node {
        *m.entry(n.op_type.clone()).or_insert(0) += 1;
    }
    m
}

pub fn count(model: &Model, op: &str) -> usize {
    op_counts(model).get(op).copied().unwrap_or(0)
}

pub fn node<'a>(model: &'a Model, name: &str) -> &'a NodeProto {
    model
        .graph()
        .node
        .iter()
        .find(|n| n.name == name)
        .unwrap_or_else(|| panic!("no node {name}"))
}

pub fn group_of(n: &NodeProto) -> Option<String> {
    n.metadata_props
        .iter()
        .find(|kv| kv.key == qfold::fusion::GROUP_KEY)
        .map(|kv| kv.value.clone())
}

// ---- building models in code ----

pub fn value_info(name: &str, ty: ElemType, shape: &[usize]) -> ValueInfoProto {
    let mut v = ValueInfoProto::new();
    v.name = name.into();
    let mut t = type_proto::Tensor::new();
    t.elem_type = ty.onnx_code();
    let mut s = TensorShapeProto::new();
    for &d in shape {
        let mut dim = tensor_shape_proto::Dimension::new();
        dim.value = Some(tensor_shape_proto::dimension::Value::DimValue(d as i64));
        s.dim.push(dim);
    }
    t.shape = Some(s).into();
    let mut tp = TypeProto::new();
    tp.value = Some(type_proto::Value::TensorType(t));
    v.type_ = Some(tp).into();
    v
}

pub fn ints(name: &str, v: &[i64]) -> AttributeProto {
    let mut a = AttributeProto::new();
    a.name = name.into();
    a.type_ = AttributeType::INTS.into();
    a.ints = v.to_vec();
    a
}

pub fn int(name: &str, v: i64) -> AttributeProto {
    let mut a = AttributeProto::new();
    a.name = name.into();
    a.type_ = AttributeType::INT.into();
    a.i = v;
    a
}

pub fn float(name: &str, v: f32) -> AttributeProto {
    let mut a = AttributeProto::new();
    a.name = name.into();
    a.type_ = AttributeType::FLOAT.into();
    a.f = v;
    a
}

pub fn node_of(
    op: &str,
    name: &str,
    inputs: &[&str],
    outputs: &[&str],
    attrs: Vec<AttributeProto>,
) -> NodeProto {
    let mut n = NodeProto::new();
    n.op_type = op.into();
    n.name = name.into();
    n.input = inputs.iter().map(|s| s.to_string()).collect();
    n.output = outputs.iter().map(|s| s.to_string()).collect();
    n.attribute = attrs;
    n
}

/// A model of `nodes` with one input and one output, opset 13.
pub fn model_of(
    nodes: Vec<NodeProto>,
    initializers: Vec<(String, TensorData)>,
    input: ValueInfoProto,
    output: &str,
) -> Model {
    let mut g = GraphProto::new();
    g.name = "g".into();
    g.node = nodes;
    g.initializer = initializers.iter().map(|(n, t)| t.to_proto(n)).collect();
    g.input.push(input);
    let mut o = ValueInfoProto::new();
    o.name = output.into();
    g.output.push(o);
    let mut m = ModelProto::new();
    m.ir_version = 8;
    let mut op = OperatorSetIdProto::new();
    op.version = 13;
    m.opset_import.push(op);
    m.graph = Some(g).into();
    Model::new(m)
}

/// A one-input case of f32 values with the given shape.
pub fn f32_case(input: &str, shape: &[usize], values: Vec<f32>) -> Case {
    let t = TensorData::F32(
        ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(shape), values)
            .expect("values fit the shape"),
    );
    Case {
        source: input.into(),
        inputs: vec![(input.into(), t)],
        expected: vec![],
        labels: None,
    }
}

/// stderr without the progress lines (`qfold: loading ...`) and notes the CLI prints as it
/// works: what is left is the error, if any.
pub fn without_progress(stderr: &str) -> String {
    stderr
        .lines()
        .filter(|l| !l.starts_with("qfold: ") && !l.starts_with("note: "))
        .collect::<Vec<_>>()
        .join("\n")
}
