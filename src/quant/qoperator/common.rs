//! Matching helpers shared by the QOperator rules: the DequantizeLinear before a value, the
//! QuantizeLinear after it, constant scales and zero points, int32 biases, new nodes.
//!
//! Every helper checks what it reads: a DequantizeLinear whose axis is outside its tensor's
//! rank, or whose scales or zero points do not match the channels, is not matched.

use ndarray::{ArrayD, IxDyn};

use crate::error::Result;
use crate::graph::engine;
use crate::graph::{Graph, Names, Patch};
use crate::onnx::attr::{self, defaults};
use crate::onnx::proto::NodeProto;
use crate::onnx::{ElemType, TensorData};

pub use crate::fusion::rules::{bn_affine, known_rank};
pub use crate::graph::engine::label;
pub use crate::graph::spec::is_op;

/// A Conv weight's scales and its number of output channels.
pub type ConvWeight = (Vec<f32>, usize);

/// A value a rule can use, or why it cannot.
pub type Usable<T> = std::result::Result<T, String>;

/// What a QOperator rule did: the nodes it replaced, and a note when it is not exact.
#[derive(Debug, Clone)]
pub struct Converted {
    pub nodes: Vec<String>,
    pub inexact: Option<String>,
}

/// What a QOperator rule decides.
pub type Outcome = engine::Outcome<Converted>;

/// An exact rewrite of `nodes`.
pub fn converted(patch: Patch, nodes: Vec<String>) -> Outcome {
    engine::Outcome::Rewrite(
        patch,
        Converted {
            nodes,
            inexact: None,
        },
    )
}

/// The pattern is there but cannot be converted.
pub fn decline(node: String, reason: String) -> Outcome {
    engine::Outcome::Decline(vec![node], reason)
}

/// A DequantizeLinear feeding a value.
#[derive(Debug, Clone)]
pub struct Dq {
    pub node: usize,
    pub q: String,
    pub scale: String,
    pub zp: Option<String>,
    pub axis: i64,
}

/// A QuantizeLinear reading a value.
#[derive(Debug, Clone)]
pub struct Q {
    pub node: usize,
    pub scale: String,
    pub zp: Option<String>,
    pub output: String,
}

/// The DequantizeLinear that produces `value`.
pub fn dq_of(g: &Graph, value: &str) -> Option<Dq> {
    let p = g.producer(value)?;
    let n = g.node(p);
    if !is_op(n, "DequantizeLinear") || n.input.len() < 2 {
        return None;
    }
    Some(Dq {
        node: p,
        q: n.input[0].clone(),
        scale: n.input[1].clone(),
        zp: n.input.get(2).filter(|s| !s.is_empty()).cloned(),
        axis: attr::int(n, "axis", defaults::QDQ_AXIS).ok()?,
    })
}

/// The QuantizeLinear that is the only reader of `value`.
pub fn q_after(g: &Graph, value: &str) -> Option<Q> {
    if g.is_output(value) {
        return None;
    }
    let [c] = g.consumers(value) else { return None };
    let n = g.node(*c);
    if !is_op(n, "QuantizeLinear") || n.input.first().map(String::as_str) != Some(value) {
        return None;
    }
    Some(Q {
        node: *c,
        scale: n.input.get(1)?.clone(),
        zp: n.input.get(2).filter(|s| !s.is_empty()).cloned(),
        output: n.output.first()?.clone(),
    })
}

/// The values of an f32 constant.
pub fn f32s(g: &Graph, name: &str) -> Result<Option<Vec<f32>>> {
    Ok(g.constant(name)?.and_then(|t| match t {
        TensorData::F32(a) => Some(a.iter().copied().collect()),
        _ => None,
    }))
}

/// Zero point values (default 0 when absent) and their type (uint8 when absent).
pub fn zps(g: &Graph, name: Option<&String>) -> Result<Option<(Vec<i64>, ElemType)>> {
    match name {
        None => Ok(Some((vec![0], ElemType::U8))),
        Some(n) => Ok(g
            .constant(n)?
            .and_then(|t| Some((t.to_i64()?, t.elem_type())))),
    }
}

/// Q's output: per-tensor parameters, and whether its zero point is its type's minimum.
pub fn q_is_qmin(g: &Graph, q: &Q) -> Result<bool> {
    Ok(match zps(g, q.zp.as_ref())? {
        Some((z, ElemType::U8)) => z == [0],
        Some((z, ElemType::I8)) => z == [-128],
        _ => false,
    })
}

/// The output chain of a compute node: its output goes to Q directly, or through a Relu that
/// Q absorbs exactly.
pub fn output_chain(g: &Graph, out: &str) -> Result<Option<(Q, Option<usize>)>> {
    if let Some(q) = q_after(g, out) {
        return Ok(Some((q, None)));
    }
    if g.is_output(out) {
        return Ok(None);
    }
    let [r] = g.consumers(out) else {
        return Ok(None);
    };
    let relu = g.node(*r);
    if !is_op(relu, "Relu") {
        return Ok(None);
    }
    match q_after(g, &relu.output[0]) {
        Some(q) if q_is_qmin(g, &q)? => Ok(Some((q, Some(*r)))),
        _ => Ok(None),
    }
}

/// The integer type of a quantized tensor: a constant's own type, else its QuantizeLinear's
/// zero-point type (uint8 when the zero point is absent).
pub fn qtype_of(g: &Graph, name: &str) -> ElemType {
    if let Some(t) = g.constant_type(name) {
        return t;
    }
    g.producer(name)
        .map(|p| g.node(p))
        .filter(|n| is_op(n, "QuantizeLinear"))
        .and_then(|n| quantize_output_type(g, n))
        .unwrap_or(ElemType::U8)
}

/// The type a QuantizeLinear writes: its zero point's type; without a zero point, its
/// `output_dtype` attribute (opset 21) when set, else uint8. `None` when unknown.
pub fn quantize_output_type(g: &Graph, n: &NodeProto) -> Option<ElemType> {
    match n.input.get(2).filter(|s| !s.is_empty()) {
        Some(z) => g.constant_type(z),
        None => match attr::int(n, "output_dtype", 0).ok()? {
            0 => Some(ElemType::U8),
            code => ElemType::from_onnx(i32::try_from(code).ok()?),
        },
    }
}

/// The zero-point input for a quantized tensor: the existing one, or a new 0 of its type.
pub fn zero_point_input(
    g: &Graph,
    patch: &mut Patch,
    names: &mut Names,
    zp: Option<&String>,
    quantized: &str,
) -> String {
    zero_points_input(g, patch, names, zp, quantized, 1)
}

/// The zero-point input for a quantized tensor with `count` scales: the existing one, or new
/// zeros of its type (a scalar for one scale, a `[count]` vector otherwise, since tract wants
/// the zero point's rank to match the scale's).
pub fn zero_points_input(
    g: &Graph,
    patch: &mut Patch,
    names: &mut Names,
    zp: Option<&String>,
    quantized: &str,
    count: usize,
) -> String {
    if let Some(z) = zp {
        return z.clone();
    }
    let n = names.fresh(&format!("{quantized}_zero_point"));
    let shape: Vec<usize> = if count > 1 { vec![count] } else { vec![] };
    let t = match qtype_of(g, quantized) {
        ElemType::I8 => TensorData::I8(ArrayD::zeros(IxDyn(&shape))),
        _ => TensorData::U8(ArrayD::zeros(IxDyn(&shape))),
    };
    patch.add_initializer(t.to_proto(&n));
    n
}

/// The common ending of the rules that replace node `i` by a QLinear node: the QuantizeLinear
/// after it (and the Relu it absorbs) go, and so do the DequantizeLinear nodes (of `inputs`,
/// the node's inputs) that only node `i` read. Returns the converted outcome, with the labels of
/// node `i` and the absorbed Relu.
pub fn finish_qlinear(
    g: &Graph,
    mut patch: Patch,
    i: usize,
    q: &Q,
    relu: Option<usize>,
    inputs: &[String],
) -> Outcome {
    let mut nodes = vec![label(g.node(i))];
    patch.remove_node(q.node);
    if let Some(r) = relu {
        patch.remove_node(r);
        nodes.push(label(g.node(r)));
    }
    for x in inputs.iter().filter(|x| !x.is_empty()) {
        if let Some(dq) = dq_of(g, x) {
            drop_private_dq(g, &mut patch, &dq, i);
        }
    }
    converted(patch, nodes)
}

/// Removes DQ nodes whose only reader is the rewritten node.
pub fn drop_private_dq(g: &Graph, patch: &mut Patch, dq: &Dq, reader: usize) {
    let out = &g.node(dq.node).output[0];
    if g.consumers(out) == [reader] && !g.is_output(out) {
        patch.remove_node(dq.node);
    }
}

pub fn dequantized_f64(g: &Graph, dq: &Dq) -> Result<Option<ArrayD<f64>>> {
    let Some(q) = g.constant(&dq.q)? else {
        return Ok(None);
    };
    let Some(s) = f32s(g, &dq.scale)? else {
        return Ok(None);
    };
    let Some((z, _)) = zps(g, dq.zp.as_ref())? else {
        return Ok(None);
    };
    let Some(axis) = params_fit(q.shape(), dq.axis, s.len(), z.len()) else {
        return Ok(None);
    };
    let mut out = q.to_f64();
    for (idx, v) in out.indexed_iter_mut() {
        let k = if s.len() == 1 { 0 } else { idx[axis] };
        let zk = if z.len() == 1 { z[0] } else { z[k] };
        *v = (*v - zk as f64) * s[k] as f64;
    }
    Ok(Some(out))
}

/// The axis (made non-negative) along which `scales` scales and `zero_points` zero points apply
/// to a tensor of `shape`, when they fit it: one of each, or one per slice of an axis within the
/// rank (zero points one or as many as the scales). `None` when they do not fit.
pub fn params_fit(shape: &[usize], axis: i64, scales: usize, zero_points: usize) -> Option<usize> {
    let rank = shape.len() as i64;
    let ax = if axis < 0 { axis + rank } else { axis };
    if scales == 0 || (zero_points != 1 && zero_points != scales) {
        return None;
    }
    if scales == 1 {
        return Some(usize::try_from(ax).unwrap_or(0));
    }
    let ax = usize::try_from(ax).ok().filter(|&a| a < shape.len())?;
    (shape[ax] == scales).then_some(ax)
}

/// One scale per channel (or one for all), when `scales` fits `channels`.
pub fn scales_fit(scales: &[f32], channels: usize) -> bool {
    scales.len() == 1 || scales.len() == channels
}

/// A Conv weight usable by QLinearConv: constant 8-bit values of rank >= 3, per tensor or per
/// output channel (axis 0, one scale per channel). Returns the scales and the number of output
/// channels; `Ok(None)` when the weight or its scale is not constant (yet); `Err(reason)` when
/// it is constant but cannot be used.
pub fn conv_weight(g: &Graph, w: &Dq) -> Result<Option<Usable<ConvWeight>>> {
    let Some(t) = g.constant(&w.q)? else {
        return Ok(None);
    };
    let Some(s) = f32s(g, &w.scale)? else {
        return Ok(None);
    };
    let shape = t.shape();
    Ok(Some(
        if !matches!(t.elem_type(), ElemType::I8 | ElemType::U8) {
            Err(format!(
                "weight '{}' is {}; QLinearConv takes 8-bit weights",
                w.q,
                t.elem_type().name()
            ))
        } else if shape.len() < 3 {
            Err(format!(
                "weight '{}' has shape {shape:?}; a Conv weight is [M, C/group, k...]",
                w.q
            ))
        } else if s.len() > 1 && w.axis != 0 && w.axis != -(shape.len() as i64) {
            Err(format!(
                "weight scales are per axis {}; QLinearConv takes them per output channel (axis 0)",
                w.axis
            ))
        } else if !scales_fit(&s, shape[0]) {
            Err(format!(
                "{} weight scales for {} output channels",
                s.len(),
                shape[0]
            ))
        } else {
            Ok((s, shape[0]))
        },
    ))
}

/// An int32 bias for scales `x_scale * w_scale[o]`: the DQ'd int32 values when they already
/// have exactly that scale, else the float bias requantized. `Err(reason)` on int32 overflow.
pub fn int32_bias(
    g: &Graph,
    bias: Option<&String>,
    x_scale: f32,
    w_scales: &[f32],
    channels: usize,
    factor: f64,
) -> Result<Option<std::result::Result<Vec<i32>, String>>> {
    if !scales_fit(w_scales, channels) {
        return Ok(None);
    }
    let Some(b) = bias else {
        return Ok(Some(Ok(vec![0; channels])));
    };
    let ws = |o: usize| {
        if w_scales.len() == 1 {
            w_scales[0]
        } else {
            w_scales[o]
        }
    };
    if let Some(dq) = dq_of(g, b) {
        let Some(t) = g.constant(&dq.q)? else {
            return Ok(None);
        };
        let Some(s) = f32s(g, &dq.scale)? else {
            return Ok(None);
        };
        if let (TensorData::I32(q), 1.0, true) = (&t, factor, scales_fit(&s, channels)) {
            let same = (0..channels).all(|o| {
                let bs = if s.len() == 1 { s[0] } else { s[o] };
                bs == x_scale * ws(o)
            });
            let zero = zps(g, dq.zp.as_ref())?.is_some_and(|(z, _)| z.iter().all(|&v| v == 0));
            if same && zero && q.len() == channels {
                return Ok(Some(Ok(q.iter().copied().collect())));
            }
        }
    }
    let values: Vec<f64> = if let Some(dq) = dq_of(g, b) {
        match dequantized_f64(g, &dq)? {
            Some(a) => a.iter().copied().collect(),
            None => return Ok(None),
        }
    } else {
        match g.constant(b)? {
            Some(t) if t.elem_type().is_float() => t.to_f64().iter().copied().collect(),
            _ => return Ok(None),
        }
    };
    let values: Vec<f64> = match values.len() {
        1 => vec![values[0]; channels],
        n if n == channels => values,
        _ => return Ok(None),
    };
    let mut out = Vec::with_capacity(channels);
    for (o, v) in values.iter().enumerate() {
        let q = (v * factor / (x_scale as f64 * ws(o) as f64)).round_ties_even();
        if q.is_nan() || q.abs() > i32::MAX as f64 {
            return Ok(Some(Err(format!(
                "bias channel {o} ({v:e}) overflows int32 at scale {:e}",
                x_scale * ws(o)
            ))));
        }
        out.push(q as i32);
    }
    Ok(Some(Ok(out)))
}

pub fn int32_initializer(
    patch: &mut Patch,
    names: &mut Names,
    base: &str,
    values: Vec<i32>,
) -> String {
    let name = names.fresh(base);
    let n = values.len();
    patch.add_initializer(
        TensorData::I32(ArrayD::from_shape_vec(IxDyn(&[n]), values).expect("n")).to_proto(&name),
    );
    name
}

pub fn new_node(op: &str, name: String, inputs: Vec<String>, output: String) -> NodeProto {
    let mut n = NodeProto::new();
    n.op_type = op.into();
    n.name = name;
    n.input = inputs;
    n.output = vec![output];
    n
}

pub fn axes_input(
    patch: &mut Patch,
    names: &mut Names,
    node: &mut NodeProto,
    axes: &[i64],
    opset: i64,
) {
    if opset >= 13 {
        let n = names.fresh("axes_2");
        patch.add_initializer(
            TensorData::I64(
                ArrayD::from_shape_vec(IxDyn(&[axes.len()]), axes.to_vec()).expect("axes"),
            )
            .to_proto(&n),
        );
        node.input.push(n);
    } else {
        attr::set(node, attr::make_ints("axes", axes));
    }
}

/// The rank of a value, from declared shapes or by walking back to a Conv (whose weight gives
/// it) through rank-preserving ops.
pub fn infer_rank(g: &Graph, value: &str) -> Option<usize> {
    let mut v = value.to_string();
    for _ in 0..64 {
        if let Some(r) = known_rank(g, &v) {
            return Some(r);
        }
        let p = g.node(g.producer(&v)?);
        match p.op_type.as_str() {
            "Conv" | "QLinearConv" if is_op(p, &p.op_type) => {
                let w = if p.op_type == "Conv" {
                    &p.input[1]
                } else {
                    &p.input[3]
                };
                let w = dq_of(g, w).map(|d| d.q).unwrap_or_else(|| w.clone());
                return g.constant(&w).ok().flatten().map(|t| t.shape().len());
            }
            "QuantizeLinear" | "DequantizeLinear" | "Relu" | "Clip" | "BatchNormalization"
            | "MaxPool" | "AveragePool" | "Add" | "Mul" | "Sigmoid" | "Identity" => {
                v = p.input.first()?.clone();
            }
            _ => return None,
        }
    }
    None
}
