//! QDQ -> QOperator: rewrite rules over a QDQ graph, so a model quantized by qfold and a QDQ
//! model made elsewhere (ONNX Runtime's quantizer, a PyTorch QAT export) share one path.
//!
//! Rules, run to a fixed point:
//! - `constant`: QuantizeLinear of a constant (a PyTorch QAT export quantizes its float weights
//!   in the graph) becomes the integer initializer it computes (f32 `x / scale`, half to even,
//!   saturated, as ONNX Runtime), and Identity of a constant (the PyTorch exporter's
//!   deduplicated initializers, zero points among them) becomes that constant.
//! - `fold_qat_bn`: DQ(w) -> Conv [-> per-channel Mul / Div / Add / Sub by constants] ->
//!   BatchNormalization (the chain is how PyTorch exports a fused QAT ConvBn:
//!   `Conv -> Div(bn scale) -> Add(conv bias) -> BN`). With the chain `m * y + a` and the BN
//!   `s * (y - mean) + beta`, the factor `f = s * m` folds into the per-channel weight scales:
//!   `w_scale'[o] = w_scale[o] * |f[o]|`, the int8 weights of a channel with `f[o] < 0` are
//!   negated (symmetric weights: zero point 0), and the bias becomes
//!   `(m * b + a - mean) * s + beta` (float; `conv` below quantizes it). Negating -128 (which
//!   PyTorch's symmetric qint8 range [-128, 127] produces) saturates to 127, one weight step off
//!   on those entries: +128 has no int8 code, per-channel weight zero points that would keep it
//!   exact are refused by ONNX Runtime's QLinearConv, and a negative scale breaks both runtimes.
//! - `bn_to_depthwise`: DQ(x) -> BatchNormalization [-> Relu] -> Q becomes a depthwise 1x1 Conv
//!   with per-channel weights `s[c]` (stored exactly as +-127 * |s[c]| / 127) and bias
//!   `beta - mean * s`, which `conv` then turns into a QLinearConv.
//! - `conv`: DQ(x), DQ(w), [DQ(b) or float b] -> Conv [-> Relu] -> Q becomes QLinearConv with
//!   per-tensor or per-channel weight scales and an int32 bias of scale `x_scale * w_scale`.
//!   A Relu is fused only when Q's zero point is its type's minimum (then
//!   `Q(Relu(v)) = Q(v)` exactly).
//! - `gemm`: DQ(A), DQ(B const), [C] -> Gemm (transA = 0) [-> Relu] -> Q becomes
//!   Unsqueeze -> QLinearConv with a 1-wide kernel -> Squeeze, all on 8-bit tensors: tract has
//!   no integer Gemm with a bias, QLinearMatMul has no bias input (adding it in float would need
//!   a float island and a second requantization), and a 1-D QLinearConv carries the int32 bias
//!   and per-channel scales exactly. `alpha` folds into the weight scale, `beta` into C.
//! - `matmul`: DQ(a), DQ(b) -> MatMul [-> Relu] -> Q becomes QLinearMatMul (b per tensor or per
//!   column).
//! - `data_movement`: DQ -> Reshape / Flatten / Transpose / Squeeze / Unsqueeze / MaxPool -> Q
//!   with the same scale and zero point runs on the 8-bit tensor directly.
//!
//! Whatever no rule converts stays float between DequantizeLinear and QuantizeLinear; the
//! report lists each such float island.

use std::collections::BTreeSet;

use ndarray::{ArrayD, Axis, IxDyn};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::fusion::rules::{bn_affine, known_rank, label};
use crate::graph::{Graph, Names, Patch};
use crate::onnx::attr::{self, defaults};
use crate::onnx::proto::NodeProto;
use crate::onnx::{ElemType, Model, TensorData};

/// What `convert` did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ConvertReport {
    /// Each rewrite: rule name and the nodes it replaced.
    pub converted: Vec<(String, Vec<String>)>,
    /// Nodes computing in float between DequantizeLinear and QuantizeLinear.
    pub float_islands: Vec<(String, String)>,
    /// Candidates a rule matched but could not convert, with the reason.
    pub skipped: Vec<(String, String)>,
    /// Conversions that are not exact, and by how much.
    pub inexact: Vec<String>,
    pub quantize_linear_left: usize,
    pub dequantize_linear_left: usize,
}

/// A DequantizeLinear feeding a value.
#[derive(Debug, Clone)]
struct Dq {
    node: usize,
    q: String,
    scale: String,
    zp: Option<String>,
    axis: i64,
}

/// A QuantizeLinear reading a value.
#[derive(Debug, Clone)]
struct Q {
    node: usize,
    scale: String,
    zp: Option<String>,
    output: String,
}

fn is_op(n: &NodeProto, op: &str) -> bool {
    n.op_type == op && (n.domain.is_empty() || n.domain == "ai.onnx")
}

fn dq_of(g: &Graph, value: &str) -> Option<Dq> {
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
fn q_after(g: &Graph, value: &str) -> Option<Q> {
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

fn f32s(g: &Graph, name: &str) -> Result<Option<Vec<f32>>> {
    Ok(g.constant(name)?.and_then(|t| match t {
        TensorData::F32(a) => Some(a.iter().copied().collect()),
        _ => None,
    }))
}

/// Zero point values (default 0 when absent) and their type (uint8 when absent).
fn zps(g: &Graph, name: Option<&String>) -> Result<Option<(Vec<i64>, ElemType)>> {
    match name {
        None => Ok(Some((vec![0], ElemType::U8))),
        Some(n) => Ok(g
            .constant(n)?
            .and_then(|t| Some((t.to_i64()?, t.elem_type())))),
    }
}

/// Q's output: per-tensor parameters, and whether its zero point is its type's minimum.
fn q_is_qmin(g: &Graph, q: &Q) -> Result<bool> {
    Ok(match zps(g, q.zp.as_ref())? {
        Some((z, ElemType::U8)) => z == [0],
        Some((z, ElemType::I8)) => z == [-128],
        _ => false,
    })
}

/// The output chain of a compute node: its output goes to Q directly, or through a Relu that
/// Q absorbs exactly.
fn output_chain(g: &Graph, out: &str) -> Result<Option<(Q, Option<usize>)>> {
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
fn qtype_of(g: &Graph, name: &str) -> ElemType {
    if let Some(t) = g.constant_type(name) {
        return t;
    }
    g.producer(name)
        .map(|p| g.node(p))
        .filter(|n| is_op(n, "QuantizeLinear"))
        .and_then(|n| n.input.get(2).filter(|s| !s.is_empty()))
        .and_then(|z| g.constant_type(z))
        .unwrap_or(ElemType::U8)
}

/// The zero-point input for a quantized tensor: the existing one, or a new 0 of its type.
fn zero_point_input(
    g: &Graph,
    patch: &mut Patch,
    names: &mut Names,
    zp: Option<&String>,
    quantized: &str,
) -> String {
    match zp {
        Some(z) => z.clone(),
        None => {
            let n = names.fresh(&format!("{quantized}_zero_point"));
            let t = match qtype_of(g, quantized) {
                ElemType::I8 => TensorData::I8(ndarray::arr0(0i8).into_dyn()),
                _ => TensorData::U8(ndarray::arr0(0u8).into_dyn()),
            };
            patch.add_initializer(t.to_proto(&n));
            n
        }
    }
}

/// Removes DQ nodes whose only reader is the rewritten node.
fn drop_private_dq(g: &Graph, patch: &mut Patch, dq: &Dq, reader: usize) {
    let out = &g.node(dq.node).output[0];
    if g.consumers(out) == [reader] && !g.is_output(out) {
        patch.remove_node(dq.node);
    }
}

fn dequantized_f64(g: &Graph, dq: &Dq) -> Result<Option<ArrayD<f64>>> {
    let Some(q) = g.constant(&dq.q)? else {
        return Ok(None);
    };
    let Some(s) = f32s(g, &dq.scale)? else {
        return Ok(None);
    };
    let Some((z, _)) = zps(g, dq.zp.as_ref())? else {
        return Ok(None);
    };
    let q = q.to_f64();
    let axis = if dq.axis < 0 {
        dq.axis + q.ndim() as i64
    } else {
        dq.axis
    } as usize;
    let mut out = q.clone();
    for (idx, v) in out.indexed_iter_mut() {
        let k = if s.len() == 1 { 0 } else { idx[axis] };
        let zk = if z.len() == 1 { z[0] } else { z[k] };
        *v = (*v - zk as f64) * s[k] as f64;
    }
    Ok(Some(out))
}

/// Weight scales per output channel, the weight's DQ, and whether it is usable by QLinearConv
/// (constant integer weights, per tensor or per axis 0).
fn conv_weight(g: &Graph, w: &Dq) -> Result<Option<Vec<f32>>> {
    let Some(t) = g.constant(&w.q)? else {
        return Ok(None);
    };
    if !matches!(t.elem_type(), ElemType::I8 | ElemType::U8) {
        return Ok(None);
    }
    let Some(s) = f32s(g, &w.scale)? else {
        return Ok(None);
    };
    if s.len() > 1 && w.axis != 0 {
        return Ok(None);
    }
    Ok(Some(s))
}

/// An int32 bias for scales `x_scale * w_scale[o]`: the DQ'd int32 values when they already
/// have exactly that scale, else the float bias requantized. `Err(reason)` on int32 overflow.
fn int32_bias(
    g: &Graph,
    bias: Option<&String>,
    x_scale: f32,
    w_scales: &[f32],
    channels: usize,
    factor: f64,
) -> Result<Option<std::result::Result<Vec<i32>, String>>> {
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
        if let (TensorData::I32(q), 1.0) = (&t, factor) {
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

fn int32_initializer(patch: &mut Patch, names: &mut Names, base: &str, values: Vec<i32>) -> String {
    let name = names.fresh(base);
    let n = values.len();
    patch.add_initializer(
        TensorData::I32(ArrayD::from_shape_vec(IxDyn(&[n]), values).expect("n")).to_proto(&name),
    );
    name
}

fn new_node(op: &str, name: String, inputs: Vec<String>, output: String) -> NodeProto {
    let mut n = NodeProto::new();
    n.op_type = op.into();
    n.name = name;
    n.input = inputs;
    n.output = vec![output];
    n
}

/// Outcome of a rule.
enum Rule {
    Apply(Patch, Vec<String>),
    /// Applied, with a note on what is not exact.
    ApplyInexact(Patch, Vec<String>, String),
    Skip(String, String),
}

/// DQ(x), DQ(w), [b] -> Conv [-> Relu] -> Q  =>  QLinearConv.
fn conv(g: &Graph, i: usize, names: &mut Names) -> Result<Option<Rule>> {
    let c = g.node(i);
    if !is_op(c, "Conv") || c.input.len() < 2 {
        return Ok(None);
    }
    let (Some(x), Some(w)) = (dq_of(g, &c.input[0]), dq_of(g, &c.input[1])) else {
        return Ok(None);
    };
    let Some(xs) = f32s(g, &x.scale)?.filter(|s| s.len() == 1) else {
        return Ok(None);
    };
    let Some(ws) = conv_weight(g, &w)? else {
        return Ok(None);
    };
    let Some((q, relu)) = output_chain(g, &c.output[0])? else {
        return Ok(None);
    };
    if f32s(g, &q.scale)?.is_none_or(|s| s.len() != 1) {
        return Ok(None);
    }
    let channels = g.constant(&w.q)?.map_or(0, |t| t.shape()[0]);
    let bias = match int32_bias(
        g,
        c.input.get(2).filter(|s| !s.is_empty()),
        xs[0],
        &ws,
        channels,
        1.0,
    )? {
        None => return Ok(None),
        Some(Err(reason)) => return Ok(Some(Rule::Skip(label(c), reason))),
        Some(Ok(b)) => b,
    };
    let mut patch = Patch::new(format!("QLinearConv {}", label(c)));
    let x_zp = zero_point_input(g, &mut patch, names, x.zp.as_ref(), &x.q);
    let w_zp = zero_point_input(g, &mut patch, names, w.zp.as_ref(), &w.q);
    let y_zp = zero_point_input(g, &mut patch, names, q.zp.as_ref(), &q.output);
    let bname = int32_initializer(&mut patch, names, &format!("{}_bias_int32", label(c)), bias);
    let mut qc = new_node(
        "QLinearConv",
        c.name.clone(),
        vec![
            x.q.clone(),
            x.scale.clone(),
            x_zp,
            w.q.clone(),
            w.scale.clone(),
            w_zp,
            q.scale.clone(),
            y_zp,
            bname,
        ],
        q.output.clone(),
    );
    qc.attribute = c.attribute.clone();
    let mut nodes = vec![label(c)];
    patch.replace_node(i, qc).remove_node(q.node);
    if let Some(r) = relu {
        patch.remove_node(r);
        nodes.push(label(g.node(r)));
    }
    drop_private_dq(g, &mut patch, &x, i);
    drop_private_dq(g, &mut patch, &w, i);
    if let Some(b) = c.input.get(2).and_then(|b| dq_of(g, b)) {
        drop_private_dq(g, &mut patch, &b, i);
    }
    Ok(Some(Rule::Apply(patch, nodes)))
}

/// DQ(a), DQ(b) -> MatMul [-> Relu] -> Q  =>  QLinearMatMul.
fn matmul(g: &Graph, i: usize, names: &mut Names) -> Result<Option<Rule>> {
    let m = g.node(i);
    if !is_op(m, "MatMul") {
        return Ok(None);
    }
    let (Some(a), Some(b)) = (dq_of(g, &m.input[0]), dq_of(g, &m.input[1])) else {
        return Ok(None);
    };
    if f32s(g, &a.scale)?.is_none_or(|s| s.len() != 1) {
        return Ok(None);
    }
    let Some(bs) = f32s(g, &b.scale)? else {
        return Ok(None);
    };
    if bs.len() > 1 {
        // per column: the last axis of a 2-D constant
        let rank = g.constant(&b.q)?.map(|t| t.shape().len());
        if rank != Some(2) || !(b.axis == 1 || b.axis == -1) {
            return Ok(None);
        }
    }
    let Some((q, relu)) = output_chain(g, &m.output[0])? else {
        return Ok(None);
    };
    if f32s(g, &q.scale)?.is_none_or(|s| s.len() != 1) {
        return Ok(None);
    }
    let mut patch = Patch::new(format!("QLinearMatMul {}", label(m)));
    let a_zp = zero_point_input(g, &mut patch, names, a.zp.as_ref(), &a.q);
    let b_zp = zero_point_input(g, &mut patch, names, b.zp.as_ref(), &b.q);
    let y_zp = zero_point_input(g, &mut patch, names, q.zp.as_ref(), &q.output);
    let qm = new_node(
        "QLinearMatMul",
        m.name.clone(),
        vec![
            a.q.clone(),
            a.scale.clone(),
            a_zp,
            b.q.clone(),
            b.scale.clone(),
            b_zp,
            q.scale.clone(),
            y_zp,
        ],
        q.output.clone(),
    );
    let mut nodes = vec![label(m)];
    patch.replace_node(i, qm).remove_node(q.node);
    if let Some(r) = relu {
        patch.remove_node(r);
        nodes.push(label(g.node(r)));
    }
    drop_private_dq(g, &mut patch, &a, i);
    drop_private_dq(g, &mut patch, &b, i);
    Ok(Some(Rule::Apply(patch, nodes)))
}

fn axes_input(
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

/// DQ(A), DQ(B), [C] -> Gemm [-> Relu] -> Q  =>  Unsqueeze -> 1-D QLinearConv -> Squeeze.
fn gemm(g: &Graph, i: usize, names: &mut Names, opset: i64) -> Result<Option<Rule>> {
    let n = g.node(i);
    if !is_op(n, "Gemm") || n.input.len() < 2 {
        return Ok(None);
    }
    if attr::int(n, "transA", 0)? != 0 {
        return Ok(None);
    }
    let (Some(a), Some(b)) = (dq_of(g, &n.input[0]), dq_of(g, &n.input[1])) else {
        return Ok(None);
    };
    let Some(xs) = f32s(g, &a.scale)?.filter(|s| s.len() == 1) else {
        return Ok(None);
    };
    let Some(bq) = g.constant(&b.q)? else {
        return Ok(None);
    };
    if bq.shape().len() != 2 || !matches!(bq.elem_type(), ElemType::I8 | ElemType::U8) {
        return Ok(None);
    }
    let Some(bs) = f32s(g, &b.scale)? else {
        return Ok(None);
    };
    let trans_b = attr::int(n, "transB", 0)? != 0;
    let out_axis = if trans_b { 0 } else { 1 };
    if bs.len() > 1 && b.axis != out_axis as i64 {
        return Ok(None);
    }
    let Some((bz, _)) = zps(g, b.zp.as_ref())? else {
        return Ok(None);
    };
    let bz_ty = bq.elem_type();
    let Some((q, relu)) = output_chain(g, &n.output[0])? else {
        return Ok(None);
    };
    if f32s(g, &q.scale)?.is_none_or(|s| s.len() != 1) {
        return Ok(None);
    }
    let alpha = attr::float(n, "alpha", defaults::GEMM_ALPHA)?;
    let beta = attr::float(n, "beta", defaults::GEMM_BETA)? as f64;
    let channels = bq.shape()[out_axis];
    let w_scales: Vec<f32> = bs.iter().map(|s| s * alpha).collect();
    if let Some(cname) = n.input.get(2).filter(|s| !s.is_empty()) {
        let shape = match dq_of(g, cname) {
            Some(dq) => g.constant(&dq.q)?.map(|t| t.shape().to_vec()),
            None => g.constant(cname)?.map(|t| t.shape().to_vec()),
        };
        let per_channel = matches!(
            shape.as_deref(),
            Some([]) | Some([1]) | Some([_]) | Some([1, _])
        );
        if !per_channel
            || shape.as_ref().is_some_and(|s| {
                s.iter().product::<usize>() != channels && s.iter().product::<usize>() != 1
            })
        {
            return Ok(Some(Rule::Skip(
                label(n),
                "Gemm C is not a per-output-channel bias".into(),
            )));
        }
    }
    let bias = match int32_bias(
        g,
        n.input.get(2).filter(|s| !s.is_empty()),
        xs[0],
        &w_scales,
        channels,
        beta,
    )? {
        None => return Ok(None),
        Some(Err(reason)) => return Ok(Some(Rule::Skip(label(n), reason))),
        Some(Ok(v)) => v,
    };
    // Weight [N, K, 1] for the 1-D convolution, scales per output channel.
    let w = bq.to_i64().expect("integer weights");
    let (r, c) = (bq.shape()[0], bq.shape()[1]);
    let (nn, k) = if trans_b { (r, c) } else { (c, r) };
    let mut wt = vec![0i64; nn * k];
    for o in 0..nn {
        for j in 0..k {
            wt[o * k + j] = if trans_b { w[o * c + j] } else { w[j * c + o] };
        }
    }
    let mut patch = Patch::new(format!("Gemm as QLinearConv {}", label(n)));
    let wname = names.fresh(&format!("{}_conv", b.q));
    let wdata = match bq.elem_type() {
        ElemType::I8 => TensorData::I8(
            ArrayD::from_shape_vec(IxDyn(&[nn, k, 1]), wt.iter().map(|&v| v as i8).collect())
                .expect("w"),
        ),
        _ => TensorData::U8(
            ArrayD::from_shape_vec(IxDyn(&[nn, k, 1]), wt.iter().map(|&v| v as u8).collect())
                .expect("w"),
        ),
    };
    patch.add_initializer(wdata.to_proto(&wname));
    let per = w_scales.len() > 1;
    let sname = names.fresh(&format!("{}_conv_scale", b.q));
    let sdata = if per {
        TensorData::F32(ArrayD::from_shape_vec(IxDyn(&[nn]), w_scales.clone()).expect("s"))
    } else {
        TensorData::F32(ndarray::arr0(w_scales[0]).into_dyn())
    };
    patch.add_initializer(sdata.to_proto(&sname));
    let zname = names.fresh(&format!("{}_conv_zero_point", b.q));
    let zshape: Vec<usize> = if bz.len() > 1 { vec![bz.len()] } else { vec![] };
    let zdata = match bz_ty {
        ElemType::I8 => TensorData::I8(
            ArrayD::from_shape_vec(IxDyn(&zshape), bz.iter().map(|&v| v as i8).collect())
                .expect("z"),
        ),
        _ => TensorData::U8(
            ArrayD::from_shape_vec(IxDyn(&zshape), bz.iter().map(|&v| v as u8).collect())
                .expect("z"),
        ),
    };
    patch.add_initializer(zdata.to_proto(&zname));
    let bname = int32_initializer(&mut patch, names, &format!("{}_bias_int32", label(n)), bias);
    let x_zp = zero_point_input(g, &mut patch, names, a.zp.as_ref(), &a.q);
    let y_zp = zero_point_input(g, &mut patch, names, q.zp.as_ref(), &q.output);
    let a3 = names.fresh(&format!("{}_3d", a.q));
    let y3 = names.fresh(&format!("{}_3d", q.output));
    let mut un = new_node(
        "Unsqueeze",
        names.fresh(&format!("{}_unsqueeze", label(n))),
        vec![a.q.clone()],
        a3.clone(),
    );
    axes_input(&mut patch, names, &mut un, &[2], opset);
    let mut conv = new_node(
        "QLinearConv",
        n.name.clone(),
        vec![
            a3,
            a.scale.clone(),
            x_zp,
            wname,
            sname,
            zname,
            q.scale.clone(),
            y_zp,
            bname,
        ],
        y3.clone(),
    );
    attr::set(&mut conv, attr::make_ints("kernel_shape", &[1]));
    let mut sq = new_node(
        "Squeeze",
        names.fresh(&format!("{}_squeeze", label(n))),
        vec![y3],
        q.output.clone(),
    );
    axes_input(&mut patch, names, &mut sq, &[2], opset);
    patch
        .replace_node(i, conv)
        .add_node(un)
        .add_node(sq)
        .remove_node(q.node);
    let mut nodes = vec![label(n)];
    if let Some(r) = relu {
        patch.remove_node(r);
        nodes.push(label(g.node(r)));
    }
    drop_private_dq(g, &mut patch, &a, i);
    drop_private_dq(g, &mut patch, &b, i);
    if let Some(cq) = n.input.get(2).and_then(|c| dq_of(g, c)) {
        drop_private_dq(g, &mut patch, &cq, i);
    }
    Ok(Some(Rule::Apply(patch, nodes)))
}

const DATA_MOVEMENT: &[&str] = &[
    "Reshape",
    "Flatten",
    "Transpose",
    "Squeeze",
    "Unsqueeze",
    "MaxPool",
];

/// DQ -> data movement -> Q with the same parameters  =>  the op on the 8-bit tensor.
fn data_movement(g: &Graph, i: usize) -> Result<Option<Rule>> {
    let n = g.node(i);
    if !DATA_MOVEMENT.iter().any(|op| is_op(n, op)) || n.output.len() != 1 {
        return Ok(None);
    }
    if is_op(n, "MaxPool") && n.output.len() > 1 {
        return Ok(None);
    }
    let Some(x) = dq_of(g, &n.input[0]) else {
        return Ok(None);
    };
    let Some(q) = q_after(g, &n.output[0]) else {
        return Ok(None);
    };
    let same_scale = f32s(g, &x.scale)? == f32s(g, &q.scale)?
        && f32s(g, &x.scale)?.is_some_and(|s| s.len() == 1);
    let same_zp = zps(g, x.zp.as_ref())? == zps(g, q.zp.as_ref())?;
    if !same_scale || !same_zp {
        return Ok(None);
    }
    let mut patch = Patch::new(format!("8-bit {}", label(n)));
    let mut m = n.clone();
    m.input[0] = x.q.clone();
    m.output = vec![q.output.clone()];
    patch.replace_node(i, m).remove_node(q.node);
    drop_private_dq(g, &mut patch, &x, i);
    Ok(Some(Rule::Apply(patch, vec![label(n)])))
}

/// The value QuantizeLinear computes from constant inputs: `saturate(round_half_even(x / scale)
/// + zero_point)` in f32, per tensor or per axis, as ONNX Runtime does.
fn quantize_constant(g: &Graph, n: &NodeProto) -> Result<Option<TensorData>> {
    if n.input.len() < 2 || attr::int(n, "block_size", 0)? != 0 {
        return Ok(None);
    }
    let Some(TensorData::F32(x)) = g.constant(&n.input[0])? else {
        return Ok(None);
    };
    let Some(s) = f32s(g, &n.input[1])? else {
        return Ok(None);
    };
    let Some((z, ty)) = zps(g, n.input.get(2).filter(|s| !s.is_empty()))? else {
        return Ok(None);
    };
    let (lo, hi) = match ty {
        ElemType::I8 => (-128.0, 127.0),
        ElemType::U8 => (0.0, 255.0),
        _ => return Ok(None),
    };
    let axis = attr::int(n, "axis", defaults::QDQ_AXIS)?;
    let axis = if axis < 0 {
        axis + x.ndim() as i64
    } else {
        axis
    };
    let axis_ok = axis >= 0 && (axis as usize) < x.ndim() && x.shape()[axis as usize] == s.len();
    if (s.len() > 1 && !axis_ok)
        || (z.len() != 1 && z.len() != s.len())
        || s.iter().any(|v| !(v.is_finite() && *v > 0.0))
    {
        return Ok(None);
    }
    let q = x.indexed_iter().map(|(idx, &v)| {
        let k = if s.len() == 1 { 0 } else { idx[axis as usize] };
        let zk = if z.len() == 1 { z[0] } else { z[k] };
        ((v / s[k]).round_ties_even() + zk as f32).clamp(lo, hi)
    });
    let shape = IxDyn(x.shape());
    Ok(Some(match ty {
        ElemType::I8 => TensorData::I8(
            ArrayD::from_shape_vec(shape, q.map(|v| v as i8).collect()).expect("shape"),
        ),
        _ => TensorData::U8(
            ArrayD::from_shape_vec(shape, q.map(|v| v as u8).collect()).expect("shape"),
        ),
    }))
}

/// QuantizeLinear of a constant (a PyTorch QAT export quantizes its float weights in the graph)
/// and Identity of a constant (the PyTorch exporter shares deduplicated initializers, zero points
/// among them, through Identity nodes) become the constant they compute, so the other rules see
/// integer weights and constant zero points.
fn constant_node(g: &Graph, i: usize) -> Result<Option<Rule>> {
    let n = g.node(i);
    if n.output.len() != 1 || g.is_output(&n.output[0]) || n.input.is_empty() {
        return Ok(None);
    }
    let value = if is_op(n, "Identity") {
        g.constant(&n.input[0])?
    } else if is_op(n, "QuantizeLinear") {
        quantize_constant(g, n)?
    } else {
        None
    };
    let Some(value) = value else {
        return Ok(None);
    };
    let mut patch = Patch::new(format!("constant {}", label(n)));
    patch
        .remove_node(i)
        .add_initializer(value.to_proto(&n.output[0]));
    Ok(Some(Rule::Apply(patch, vec![label(n)])))
}

/// A constant that broadcasts per output channel against a rank-`rank` Conv output
/// (`[C]`-valued on axis 1, or one value), as `C` values.
fn per_channel_const(g: &Graph, name: &str, c: usize, rank: usize) -> Result<Option<Vec<f64>>> {
    let Some(t) = g.constant(name)? else {
        return Ok(None);
    };
    if !t.elem_type().is_float() || t.shape().len() > rank {
        return Ok(None);
    }
    let r = t.shape().len();
    for (j, &d) in t.shape().iter().enumerate() {
        let on_channels = j + rank - r == 1;
        if d != 1 && !(on_channels && d == c) {
            return Ok(None);
        }
    }
    let v: Vec<f64> = t.to_f64().iter().copied().collect();
    Ok(Some(if v.len() == 1 { vec![v[0]; c] } else { v }))
}

/// What lies between a Conv and its BatchNormalization: per-channel Mul / Div / Add / Sub by
/// constants (PyTorch's fused QAT ConvBn exports `Conv -> Div(BN scale) -> Add(conv bias) ->
/// BN`), each the only reader of its input. Returns the BN, the chain's nodes and `(m, a)` with
/// `chain(y) = m * y + a`.
type AffineChain = (usize, Vec<usize>, Vec<f64>, Vec<f64>);

fn chain_to_bn(g: &Graph, out: &str, c: usize, rank: usize) -> Result<Option<AffineChain>> {
    let (mut m, mut a) = (vec![1.0f64; c], vec![0.0f64; c]);
    let mut chain = Vec::new();
    let mut v = out.to_string();
    loop {
        if g.is_output(&v) {
            return Ok(None);
        }
        let [next] = g.consumers(&v) else {
            return Ok(None);
        };
        let n = g.node(*next);
        if is_op(n, "BatchNormalization") {
            return Ok((n.input[0] == v).then_some((*next, chain, m, a)));
        }
        let op = n.op_type.as_str();
        if chain.len() >= 8
            || !(n.domain.is_empty() || n.domain == "ai.onnx")
            || !matches!(op, "Mul" | "Div" | "Add" | "Sub")
            || n.input.len() != 2
            || n.input[0] == n.input[1]
        {
            return Ok(None);
        }
        let first = n.input[0] == v;
        if !first && matches!(op, "Div" | "Sub") {
            return Ok(None);
        }
        let Some(k) = per_channel_const(g, &n.input[usize::from(first)], c, rank)? else {
            return Ok(None);
        };
        for o in 0..c {
            match op {
                "Mul" => (m[o], a[o]) = (m[o] * k[o], a[o] * k[o]),
                "Div" => (m[o], a[o]) = (m[o] / k[o], a[o] / k[o]),
                "Add" => a[o] += k[o],
                _ => a[o] -= k[o],
            }
        }
        if m.iter().chain(&a).any(|x| !x.is_finite()) {
            return Ok(None);
        }
        chain.push(*next);
        v = n.output[0].clone();
    }
}

/// DQ(w) -> Conv [-> per-channel Mul/Div/Add/Sub...] -> BN (a QAT export with BN left in, or
/// PyTorch's fused ConvBn written out): fold into the per-channel weight scales.
fn fold_qat_bn(g: &Graph, i: usize, names: &mut Names) -> Result<Option<Rule>> {
    let c = g.node(i);
    if !is_op(c, "Conv") || c.input.len() < 2 {
        return Ok(None);
    }
    let Some(w) = dq_of(g, &c.input[1]) else {
        return Ok(None);
    };
    let Some(wq) = g.constant(&w.q)? else {
        return Ok(None);
    };
    let Some((bn, chain, cm, ca)) = chain_to_bn(g, &c.output[0], wq.shape()[0], wq.shape().len())?
    else {
        return Ok(None);
    };
    let aff = match bn_affine(g, bn)? {
        Ok(a) => a,
        Err(r) => return Ok(Some(Rule::Skip(label(g.node(bn)), r))),
    };
    let Some(ws) = conv_weight(g, &w)? else {
        return Ok(None);
    };
    let Some((wz, _)) = zps(g, w.zp.as_ref())? else {
        return Ok(None);
    };
    let m = wq.shape()[0];
    if m != aff.channels() || attr::int(c, "group", 1)? < 1 {
        return Ok(Some(Rule::Skip(
            label(c),
            "channel counts do not match the BN".into(),
        )));
    }
    if g.consumers(&g.node(w.node).output[0]).len() != 1 {
        return Ok(Some(Rule::Skip(
            label(c),
            "the quantized weight is shared".into(),
        )));
    }
    if wz.iter().any(|&z| z != 0) || wq.elem_type() != ElemType::I8 {
        return Ok(Some(Rule::Skip(
            label(c),
            "folding a negative BN scale needs symmetric int8 weights (zero point 0)".into(),
        )));
    }
    let mut values = match &wq {
        TensorData::I8(a) => a.clone(),
        _ => unreachable!("checked above"),
    };
    let mut scales = Vec::with_capacity(m);
    let mut saturated = Vec::new();
    for (o, mut ch) in values.axis_iter_mut(Axis(0)).enumerate() {
        let s = aff.scale[o] * cm[o];
        let base = if ws.len() == 1 { ws[0] } else { ws[o] };
        scales.push((base as f64 * s.abs()) as f32);
        if s < 0.0 {
            // -128 -> 127: the one inexact case (see the module doc)
            let n = ch.iter().filter(|&&v| v == i8::MIN).count();
            if n > 0 {
                saturated.push(format!("channel {o}: {n}"));
            }
            ch.mapv_inplace(|v| v.saturating_neg());
        }
    }
    // bias: (b - mean) * s + beta = b * s + shift, with b dequantized or float
    let b = match c.input.get(2).filter(|s| !s.is_empty()) {
        None => None,
        Some(bn) => match dq_of(g, bn) {
            Some(dq) => dequantized_f64(g, &dq)?,
            None => g.constant(bn)?.map(|t| t.to_f64()),
        },
    };
    if b.as_ref().is_some_and(|b| b.len() != m) {
        return Ok(None);
    }
    // through the chain: m * (y + b) + a, i.e. bias m * b + a before the BN
    let b: ndarray::Array1<f64> = (0..m)
        .map(|o| cm[o] * b.as_ref().map_or(0.0, |b| b[o]) + ca[o])
        .collect();
    let folded = aff.fold_bias(Some(&b));
    let mut patch = Patch::new(format!("fold QAT BN into {}", label(c)));
    let qname = names.fresh(&format!("{}_bn", w.q));
    patch.add_initializer(TensorData::I8(values).to_proto(&qname));
    let sname = names.fresh(&format!("{}_bn_scale", w.scale));
    patch.add_initializer(
        TensorData::F32(ArrayD::from_shape_vec(IxDyn(&[m]), scales).expect("m")).to_proto(&sname),
    );
    let zname = names.fresh(&format!("{}_bn_zero_point", w.q));
    patch.add_initializer(TensorData::I8(ArrayD::zeros(IxDyn(&[m]))).to_proto(&zname));
    let dq_out = names.fresh(&format!("{}_bn_dequantized", w.q));
    let mut dq = new_node(
        "DequantizeLinear",
        names.fresh(&format!("{}_bn_DequantizeLinear", w.q)),
        vec![qname, sname, zname],
        dq_out.clone(),
    );
    attr::set(&mut dq, attr::make_int("axis", 0));
    let bname = names.fresh(&format!("{}_bn_bias", label(c)));
    patch.add_initializer(TensorData::F32(folded.mapv(|v| v as f32).into_dyn()).to_proto(&bname));
    let mut nc = c.clone();
    nc.input = vec![c.input[0].clone(), dq_out, bname];
    nc.output = vec![g.node(bn).output[0].clone()];
    patch
        .add_node(dq)
        .replace_node(i, nc)
        .remove_node(bn)
        .remove_node(w.node);
    let mut nodes = vec![label(c)];
    for &k in &chain {
        patch.remove_node(k);
        nodes.push(label(g.node(k)));
    }
    nodes.push(label(g.node(bn)));
    if let Some(bdq) = c.input.get(2).and_then(|b| dq_of(g, b)) {
        drop_private_dq(g, &mut patch, &bdq, i);
    }
    if saturated.is_empty() {
        return Ok(Some(Rule::Apply(patch, nodes)));
    }
    let note = format!(
        "{}: a negative BN factor negates int8 weights, and -128 saturates to 127 (one step off) in {}",
        label(c),
        saturated.join(", ")
    );
    Ok(Some(Rule::ApplyInexact(patch, nodes, note)))
}

/// BatchNormalization parameters behind DequantizeLinear of constants (ONNX Runtime quantizes
/// a BN's scale like a weight): replaced by their float values so the BN rules can fold them.
fn bn_params_to_float(g: &Graph, i: usize, names: &mut Names) -> Result<Option<Rule>> {
    let n = g.node(i);
    if !is_op(n, "BatchNormalization") {
        return Ok(None);
    }
    let mut patch = Patch::new(format!("dequantize the parameters of {}", label(n)));
    let mut m = n.clone();
    let mut changed = false;
    for k in 1..n.input.len().min(5) {
        let Some(dq) = dq_of(g, &n.input[k]) else {
            continue;
        };
        let Some(v) = dequantized_f64(g, &dq)? else {
            continue;
        };
        let name = names.fresh(&format!("{}_float", n.input[k]));
        patch.add_initializer(TensorData::F32(v.mapv(|x| x as f32)).to_proto(&name));
        m.input[k] = name;
        drop_private_dq(g, &mut patch, &dq, i);
        changed = true;
    }
    if !changed {
        return Ok(None);
    }
    patch.replace_node(i, m);
    Ok(Some(Rule::Apply(patch, vec![label(n)])))
}

/// The rank of a value, from declared shapes or by walking back to a Conv (whose weight gives
/// it) through rank-preserving ops.
fn infer_rank(g: &Graph, value: &str) -> Option<usize> {
    let mut v = value.to_string();
    for _ in 0..64 {
        if let Some(r) = known_rank(g, &v) {
            return Some(r);
        }
        let p = g.node(g.producer(&v)?);
        match p.op_type.as_str() {
            "Conv" | "QLinearConv" => {
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

/// DQ(x) -> BN [-> Relu] -> Q  =>  depthwise 1x1 Conv (then QLinearConv).
fn bn_to_depthwise(g: &Graph, i: usize, names: &mut Names) -> Result<Option<Rule>> {
    let n = g.node(i);
    if !is_op(n, "BatchNormalization") {
        return Ok(None);
    }
    let Some(_x) = dq_of(g, &n.input[0]) else {
        return Ok(None);
    };
    if output_chain(g, &n.output[0])?.is_none() {
        return Ok(None);
    }
    let aff = match bn_affine(g, i)? {
        Ok(a) => a,
        Err(r) => return Ok(Some(Rule::Skip(label(n), r))),
    };
    let Some(rank) = infer_rank(g, &n.input[0]) else {
        return Ok(Some(Rule::Skip(
            label(n),
            "the rank of its input is unknown".into(),
        )));
    };
    if rank < 3 {
        return Ok(Some(Rule::Skip(
            label(n),
            format!("rank-{rank} input: no convolution form"),
        )));
    }
    let c = aff.channels();
    let mut shape = vec![c, 1];
    shape.extend(std::iter::repeat_n(1, rank - 2));
    let q: Vec<i8> = aff
        .scale
        .iter()
        .map(|&s| if s < 0.0 { -127 } else { 127 })
        .collect();
    let scales: Vec<f32> = aff
        .scale
        .iter()
        .map(|&s| (s.abs() / 127.0) as f32)
        .collect();
    let mut patch = Patch::new(format!("BN as depthwise Conv {}", label(n)));
    let qname = names.fresh(&format!("{}_depthwise", label(n)));
    patch.add_initializer(
        TensorData::I8(ArrayD::from_shape_vec(IxDyn(&shape), q).expect("shape")).to_proto(&qname),
    );
    let sname = names.fresh(&format!("{}_depthwise_scale", label(n)));
    patch.add_initializer(
        TensorData::F32(ArrayD::from_shape_vec(IxDyn(&[c]), scales).expect("c")).to_proto(&sname),
    );
    let zname = names.fresh(&format!("{}_depthwise_zero_point", label(n)));
    patch.add_initializer(TensorData::I8(ArrayD::zeros(IxDyn(&[c]))).to_proto(&zname));
    let wout = names.fresh(&format!("{}_depthwise_dequantized", label(n)));
    let mut dq = new_node(
        "DequantizeLinear",
        names.fresh(&format!("{}_depthwise_DequantizeLinear", label(n))),
        vec![qname, sname, zname],
        wout.clone(),
    );
    attr::set(&mut dq, attr::make_int("axis", 0));
    let bname = names.fresh(&format!("{}_depthwise_bias", label(n)));
    patch
        .add_initializer(TensorData::F32(aff.shift.mapv(|v| v as f32).into_dyn()).to_proto(&bname));
    let mut conv = new_node(
        "Conv",
        n.name.clone(),
        vec![n.input[0].clone(), wout, bname],
        n.output[0].clone(),
    );
    attr::set(&mut conv, attr::make_int("group", c as i64));
    attr::set(
        &mut conv,
        attr::make_ints("kernel_shape", &vec![1; rank - 2]),
    );
    patch.add_node(dq).replace_node(i, conv);
    Ok(Some(Rule::Apply(patch, vec![label(n)])))
}

/// Options of [`convert`].
#[derive(Debug, Clone, Copy, Default)]
pub struct ConvertOptions {
    /// Also use ONNX Runtime's `com.microsoft` QLinearAdd, QLinearMul, QLinearConcat and
    /// QLinearGlobalAveragePool (tract cannot run them).
    pub allow_contrib_ops: bool,
}

const CONTRIB: &str = "com.microsoft";

/// DQ inputs -> Add / Mul / GlobalAveragePool / Concat -> Q  =>  the com.microsoft QLinear op.
fn contrib(g: &Graph, i: usize, names: &mut Names) -> Result<Option<Rule>> {
    let n = g.node(i);
    let op = n.op_type.as_str();
    if !(n.domain.is_empty() || n.domain == "ai.onnx")
        || !matches!(op, "Add" | "Mul" | "GlobalAveragePool" | "Concat")
    {
        return Ok(None);
    }
    let dqs: Vec<Dq> = n.input.iter().filter_map(|x| dq_of(g, x)).collect();
    if dqs.len() != n.input.len() || dqs.is_empty() {
        return Ok(None);
    }
    for d in &dqs {
        if f32s(g, &d.scale)?.is_none_or(|s| s.len() != 1) {
            return Ok(None);
        }
    }
    let Some(q) = q_after(g, &n.output[0]) else {
        return Ok(None);
    };
    let mut patch = Patch::new(format!("{CONTRIB} QLinear{op} {}", label(n)));
    let mut zp = |patch: &mut Patch, d: &Dq| zero_point_input(g, patch, names, d.zp.as_ref(), &d.q);
    let zps_in: Vec<String> = dqs.iter().map(|d| zp(&mut patch, d)).collect();
    let y_zp = zero_point_input(g, &mut patch, names, q.zp.as_ref(), &q.output);
    let (new_op, inputs) = match op {
        "Add" | "Mul" => {
            if dqs.len() != 2 {
                return Ok(None);
            }
            (
                format!("QLinear{op}"),
                vec![
                    dqs[0].q.clone(),
                    dqs[0].scale.clone(),
                    zps_in[0].clone(),
                    dqs[1].q.clone(),
                    dqs[1].scale.clone(),
                    zps_in[1].clone(),
                    q.scale.clone(),
                    y_zp,
                ],
            )
        }
        "GlobalAveragePool" => (
            "QLinearGlobalAveragePool".to_string(),
            vec![
                dqs[0].q.clone(),
                dqs[0].scale.clone(),
                zps_in[0].clone(),
                q.scale.clone(),
                y_zp,
            ],
        ),
        _ => {
            let mut v = vec![q.scale.clone(), y_zp];
            for (d, z) in dqs.iter().zip(&zps_in) {
                v.extend([d.q.clone(), d.scale.clone(), z.clone()]);
            }
            ("QLinearConcat".to_string(), v)
        }
    };
    let mut m = new_node(&new_op, n.name.clone(), inputs, q.output.clone());
    m.domain = CONTRIB.into();
    m.attribute = n.attribute.clone();
    if op == "GlobalAveragePool" {
        attr::set(&mut m, attr::make_int("channels_last", 0));
    }
    patch.replace_node(i, m).remove_node(q.node);
    for d in &dqs {
        drop_private_dq(g, &mut patch, d, i);
    }
    Ok(Some(Rule::Apply(patch, vec![label(n)])))
}

/// Float compute nodes reading dequantized values: the float islands.
fn float_islands(g: &Graph) -> Vec<(String, String)> {
    g.nodes()
        .iter()
        .filter(|n| {
            !matches!(
                n.op_type.as_str(),
                "QuantizeLinear" | "DequantizeLinear" | "Constant"
            ) && n.input.iter().any(|x| dq_of(g, x).is_some())
        })
        .map(|n| (label(n), n.op_type.clone()))
        .collect()
}

/// Rewrites a QDQ model into QOperator form in place (standard domain only).
pub fn convert(model: &mut Model) -> Result<ConvertReport> {
    convert_with(model, ConvertOptions::default())
}

/// Rewrites a QDQ model into QOperator form in place.
pub fn convert_with(model: &mut Model, opts: ConvertOptions) -> Result<ConvertReport> {
    let opset = model.opset().unwrap_or(0);
    if opset < 10 {
        return Err(Error::Usage(format!(
            "the model imports opset {opset}; QLinearConv and QLinearMatMul need opset 10"
        )));
    }
    let mut report = ConvertReport::default();
    let mut skipped: BTreeSet<String> = BTreeSet::new();
    loop {
        let g = Graph::of_model(model);
        let mut names = Names::new(g.proto());
        let mut found = None;
        'nodes: for i in 0..g.nodes().len() {
            if skipped.contains(&label(g.node(i))) {
                continue;
            }
            type RuleFn<'f> = Box<dyn Fn(&Graph, usize, &mut Names) -> Result<Option<Rule>> + 'f>;
            let contrib_rule: RuleFn = if opts.allow_contrib_ops {
                Box::new(contrib)
            } else {
                Box::new(|_: &Graph, _, _: &mut Names| Ok(None))
            };
            let rules: [(&str, RuleFn); 9] = [
                (
                    "constant",
                    Box::new(|g: &Graph, i, _: &mut Names| constant_node(g, i)),
                ),
                ("bn_params_to_float", Box::new(bn_params_to_float)),
                ("fold_qat_bn", Box::new(fold_qat_bn)),
                ("bn_to_depthwise", Box::new(bn_to_depthwise)),
                ("conv", Box::new(conv)),
                (
                    "gemm",
                    Box::new(|g: &Graph, i, n: &mut Names| gemm(g, i, n, opset)),
                ),
                ("matmul", Box::new(matmul)),
                (
                    "data_movement",
                    Box::new(|g: &Graph, i, _: &mut Names| data_movement(g, i)),
                ),
                ("contrib", contrib_rule),
            ];
            for (name, rule) in &rules {
                match rule(&g, i, &mut names)? {
                    Some(Rule::Apply(p, nodes)) => {
                        found = Some((name.to_string(), p, nodes));
                        break 'nodes;
                    }
                    Some(Rule::ApplyInexact(p, nodes, note)) => {
                        report.inexact.push(note);
                        found = Some((name.to_string(), p, nodes));
                        break 'nodes;
                    }
                    Some(Rule::Skip(node, reason)) => {
                        skipped.insert(node.clone());
                        report.skipped.push((node, reason));
                        continue 'nodes;
                    }
                    None => {}
                }
            }
        }
        let Some((rule, patch, nodes)) = found else {
            let contrib_used = g.nodes().iter().any(|n| n.domain == CONTRIB);
            drop(g);
            if contrib_used && !model.proto.opset_import.iter().any(|o| o.domain == CONTRIB) {
                let mut o = crate::onnx::proto::OperatorSetIdProto::new();
                o.domain = CONTRIB.into();
                o.version = 1;
                model.proto.opset_import.push(o);
            }
            let g = Graph::of_model(model);
            let count = |op: &str| g.nodes().iter().filter(|n| is_op(n, op)).count();
            report.float_islands = float_islands(&g);
            report.quantize_linear_left = count("QuantizeLinear");
            report.dequantize_linear_left = count("DequantizeLinear");
            return Ok(report);
        };
        drop(g);
        patch.apply(model.graph_mut())?;
        report.converted.push((rule, nodes));
    }
}
