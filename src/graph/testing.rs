//! Builders shared by the rule unit tests: nodes, attributes, tensors and one-input models (the
//! counterparts of `tests/common`), running a rule at a named anchor, applying its patch, and
//! running models in tract.

use std::fmt::Debug;

use ndarray::{ArrayD, IxDyn};

use super::engine::Outcome;
use super::{Graph, Names};
use crate::error::Result;
use crate::onnx::proto::{
    attribute_proto::AttributeType, tensor_shape_proto, type_proto, AttributeProto, GraphProto,
    ModelProto, NodeProto, OperatorSetIdProto, TensorShapeProto, TypeProto, ValueInfoProto,
};
use crate::onnx::{ElemType, Model, TensorData};
use crate::runtime::Sample;

/// A node of the standard domain.
pub fn node(
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

/// An INT attribute.
pub fn int(name: &str, v: i64) -> AttributeProto {
    crate::onnx::attr::make_int(name, v)
}

/// An INTS attribute.
pub fn ints(name: &str, v: &[i64]) -> AttributeProto {
    crate::onnx::attr::make_ints(name, v)
}

/// A FLOAT attribute.
pub fn float(name: &str, v: f32) -> AttributeProto {
    crate::onnx::attr::make_float(name, v)
}

/// A STRING attribute.
pub fn string(name: &str, v: &str) -> AttributeProto {
    let mut a = AttributeProto::new();
    a.name = name.into();
    a.type_ = AttributeType::STRING.into();
    a.s = v.as_bytes().to_vec();
    a
}

/// A tensor value declaration with a concrete shape.
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

/// A declaration with a name only (no type, so no known rank).
pub fn untyped(name: &str) -> ValueInfoProto {
    let mut v = ValueInfoProto::new();
    v.name = name.into();
    v
}

/// A model of `nodes` with one input and one output (untyped), IR 8, opset 13.
pub fn model(
    nodes: Vec<NodeProto>,
    initializers: Vec<(&str, TensorData)>,
    input: ValueInfoProto,
    output: &str,
) -> Model {
    let mut g = GraphProto::new();
    g.name = "g".into();
    g.node = nodes;
    g.initializer = initializers.iter().map(|(n, t)| t.to_proto(n)).collect();
    g.input.push(input);
    g.output.push(untyped(output));
    let mut m = ModelProto::new();
    m.ir_version = 8;
    let mut op = OperatorSetIdProto::new();
    op.version = 13;
    m.opset_import.push(op);
    m.graph = Some(g).into();
    Model::new(m)
}

/// Adds `name` as a second graph output.
pub fn add_output(m: &mut Model, name: &str) {
    m.graph_mut().output.push(untyped(name));
}

/// Declares initializer `name` as a graph input too: a default the caller may override, so
/// not a constant (IR >= 4).
pub fn make_overridable(m: &mut Model, name: &str, ty: ElemType, shape: &[usize]) {
    m.graph_mut().input.push(value_info(name, ty, shape));
}

/// An f32 tensor of `shape`.
pub fn f32t(shape: &[usize], values: Vec<f32>) -> TensorData {
    TensorData::F32(ArrayD::from_shape_vec(IxDyn(shape), values).expect("values fit the shape"))
}

/// A 1-D f32 tensor.
pub fn f32v(values: &[f32]) -> TensorData {
    f32t(&[values.len()], values.to_vec())
}

/// An f32 scalar.
pub fn f32_scalar(v: f32) -> TensorData {
    TensorData::F32(ndarray::arr0(v).into_dyn())
}

/// An int8 tensor of `shape`.
pub fn i8t(shape: &[usize], values: Vec<i8>) -> TensorData {
    TensorData::I8(ArrayD::from_shape_vec(IxDyn(shape), values).expect("values fit the shape"))
}

/// An int8 scalar.
pub fn i8_scalar(v: i8) -> TensorData {
    TensorData::I8(ndarray::arr0(v).into_dyn())
}

/// A uint8 scalar.
pub fn u8_scalar(v: u8) -> TensorData {
    TensorData::U8(ndarray::arr0(v).into_dyn())
}

/// `n` deterministic, non-trivial values in about [-1, 1] (no two neighbours equal).
pub fn seq(n: usize, seed: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 37 + seed * 11 + 5) % 41) as f32 / 20.0 - 1.0)
        .collect()
}

/// `n` deterministic int8 values in [-100, 100).
pub fn seq_i8(n: usize, seed: usize) -> Vec<i8> {
    (0..n)
        .map(|i| ((i * 37 + seed * 13) % 200) as i32 - 100)
        .map(|v| v as i8)
        .collect()
}

/// One f32 input.
pub fn sample(name: &str, shape: &[usize], values: Vec<f32>) -> Sample {
    vec![(name.to_string(), f32t(shape, values))]
}

/// The index of the node named `name`.
pub fn index_of(m: &Model, name: &str) -> usize {
    m.graph()
        .node
        .iter()
        .position(|n| n.name == name)
        .unwrap_or_else(|| panic!("no node {name}"))
}

/// The node named `name`.
pub fn node_named<'m>(m: &'m Model, name: &str) -> &'m NodeProto {
    &m.graph().node[index_of(m, name)]
}

/// Number of nodes of type `op`.
pub fn count(m: &Model, op: &str) -> usize {
    m.graph().node.iter().filter(|n| n.op_type == op).count()
}

/// The op types of the nodes, in order.
pub fn ops(m: &Model) -> Vec<String> {
    m.graph().node.iter().map(|n| n.op_type.clone()).collect()
}

/// The value of initializer `name`.
pub fn init(m: &Model, name: &str) -> TensorData {
    let t = m
        .graph()
        .initializer
        .iter()
        .find(|t| t.name == name)
        .unwrap_or_else(|| panic!("no initializer {name}"));
    TensorData::from_proto(t).expect("initializer decodes")
}

/// True when an initializer named `name` exists.
pub fn has_init(m: &Model, name: &str) -> bool {
    m.graph().initializer.iter().any(|t| t.name == name)
}

/// Runs `rule` at the node named `anchor` of `m`, as the engine would (fresh index and names).
pub fn try_rule<R>(
    m: &Model,
    anchor: &str,
    rule: impl Fn(&Graph, usize, &mut Names) -> Result<Option<Outcome<R>>>,
) -> Result<Option<Outcome<R>>> {
    let g = Graph::of_model(m);
    let mut names = Names::new(m.graph());
    rule(&g, index_of(m, anchor), &mut names)
}

/// Runs `rule` at `anchor`, asserts a rewrite, and returns the patched model and the record.
pub fn rewrite<R: Debug>(
    m: &Model,
    anchor: &str,
    rule: impl Fn(&Graph, usize, &mut Names) -> Result<Option<Outcome<R>>>,
) -> (Model, R) {
    match try_rule(m, anchor, rule).expect("the rule runs") {
        Some(Outcome::Rewrite(patch, record)) => {
            let mut out = m.clone();
            patch.apply(out.graph_mut()).expect("the patch applies");
            (out, record)
        }
        other => panic!("expected a rewrite at {anchor}, got {other:?}"),
    }
}

/// Runs `rule` at `anchor` and asserts a decline; returns its nodes and reason.
pub fn declined<R: Debug>(
    m: &Model,
    anchor: &str,
    rule: impl Fn(&Graph, usize, &mut Names) -> Result<Option<Outcome<R>>>,
) -> (Vec<String>, String) {
    match try_rule(m, anchor, rule).expect("the rule runs") {
        Some(Outcome::Decline(nodes, reason)) => (nodes, reason),
        other => panic!("expected a decline at {anchor}, got {other:?}"),
    }
}

/// Runs `rule` at `anchor` and asserts `Ok(None)`.
pub fn not_applied<R: Debug>(
    m: &Model,
    anchor: &str,
    rule: impl Fn(&Graph, usize, &mut Names) -> Result<Option<Outcome<R>>>,
) {
    match try_rule(m, anchor, rule) {
        Ok(None) => {}
        other => panic!("expected Ok(None) at {anchor}, got {other:?}"),
    }
}

/// The first output of `m` on `sample`, in tract, as f64.
pub fn run_f64(m: &Model, sample: &Sample) -> ArrayD<f64> {
    let out = crate::runtime::run_once(m, sample).expect("tract runs the model");
    out.into_iter().next().expect("one output").1.to_f64()
}

/// Largest absolute difference between two outputs of one shape.
pub fn max_abs_diff(a: &ArrayD<f64>, b: &ArrayD<f64>) -> f64 {
    assert_eq!(a.shape(), b.shape(), "output shapes differ");
    a.iter()
        .zip(b.iter())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

/// Asserts that `a` and `b` run to the same output within `rel` of the output's peak.
pub fn assert_same_output(a: &Model, b: &Model, sample: &Sample, rel: f64) {
    let (x, y) = (run_f64(a, sample), run_f64(b, sample));
    let peak = x.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    assert!(peak > 0.0, "the reference output is all zeros: a weak test");
    let d = max_abs_diff(&x, &y);
    assert!(d <= rel * peak, "max abs difference {d:e}, peak {peak:e}");
}

/// Asserts that `a` and `b` run to outputs at most `steps` quantization steps of size `step`
/// apart; returns the largest difference in steps.
pub fn assert_within_steps(a: &Model, b: &Model, sample: &Sample, step: f32, steps: f64) -> f64 {
    let (x, y) = (run_f64(a, sample), run_f64(b, sample));
    assert!(
        x.iter()
            .any(|v| *v != x.iter().next().copied().unwrap_or(0.0)),
        "the reference output is constant: a weak test"
    );
    let d = max_abs_diff(&x, &y) / step as f64;
    assert!(d <= steps + 1e-4, "{d} quantization steps apart");
    d
}

/// Asserts two f64 slices agree to `eps`.
pub fn assert_all_close(got: &[f64], want: &[f64], eps: f64) {
    assert_eq!(got.len(), want.len(), "lengths differ");
    for (k, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= eps, "entry {k}: got {g}, want {w}");
    }
}

/// A uint8 tensor of `shape`.
pub fn u8t(shape: &[usize], values: Vec<u8>) -> TensorData {
    TensorData::U8(ArrayD::from_shape_vec(IxDyn(shape), values).expect("values fit the shape"))
}

/// `QuantizeLinear(x, scale, zero_point) -> y`, named `name`.
pub fn quantize(name: &str, x: &str, scale: &str, zp: &str, y: &str) -> NodeProto {
    node("QuantizeLinear", name, &[x, scale, zp], &[y], vec![])
}

/// `DequantizeLinear(q, scale, zero_point) -> y`, named `name`, with an axis when given.
pub fn dequantize(
    name: &str,
    q: &str,
    scale: &str,
    zp: &str,
    y: &str,
    axis: Option<i64>,
) -> NodeProto {
    let attrs = axis.map(|a| vec![int("axis", a)]).unwrap_or_default();
    node("DequantizeLinear", name, &[q, scale, zp], &[y], attrs)
}

/// Replaces (or adds) initializer `name`.
pub fn set_init(m: &mut Model, name: &str, t: TensorData) {
    let g = m.graph_mut();
    match g.initializer.iter_mut().find(|i| i.name == name) {
        Some(i) => *i = t.to_proto(name),
        None => g.initializer.push(t.to_proto(name)),
    }
}
