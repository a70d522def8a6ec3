//! DQ(w) -> Conv [-> per-channel Mul / Div / Add / Sub by constants] -> BatchNormalization
//! =>  Conv with the BN folded into the per-channel weight scales.
//!
//! ```text
//! before:  x -> Conv(DQ(wq, ws)) -> Div(k) -> Add(b) -> BatchNormalization -> y
//! after:   x -> Conv(DQ(wq', ws'), b') -> y
//! ```
//!
//! This is how PyTorch exports a fused QAT ConvBn (`Conv -> Div(bn scale) -> Add(conv bias) ->
//! BN`), or a QAT model with BN left in after a quantized Conv.
//!
//! Conditions: constant symmetric int8 weights (zero point 0) read by this Conv only, one scale
//! per channel (or one), BN channels equal to the weight's; each link of the chain is the only
//! reader of its input; at most 8 links.
//!
//! Formula: with the chain `m * y + a` and the BN `s * (y - mean) + beta`, the factor `f = s * m`
//! folds into the weight scales, `w_scale'[o] = w_scale[o] * |f[o]|`; the int8 weights of a
//! channel with `f[o] < 0` are negated; the bias becomes `(m * b + a - mean) * s + beta` (float;
//! the `conv` rule quantizes it). Negating -128 (PyTorch's symmetric qint8 range is
//! [-128, 127]) saturates to 127, one weight step off on those entries: +128 has no int8 code,
//! per-channel weight zero points that would keep it exact are refused by ONNX Runtime's
//! QLinearConv, and a negative scale breaks both runtimes. The report lists it as inexact.

use ndarray::{ArrayD, Axis, IxDyn};

use super::common::*;
use crate::error::Result;
use crate::graph::{Graph, Names, Patch};
use crate::onnx::attr::{self};
use crate::onnx::{ElemType, TensorData};

/// A constant that broadcasts per output channel against a rank-`rank` Conv output
/// (`[C]`-valued on axis 1, or one value), as `C` values.
pub fn per_channel_const(g: &Graph, name: &str, c: usize, rank: usize) -> Result<Option<Vec<f64>>> {
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
pub type AffineChain = (usize, Vec<usize>, Vec<f64>, Vec<f64>);

pub fn chain_to_bn(g: &Graph, out: &str, c: usize, rank: usize) -> Result<Option<AffineChain>> {
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
pub fn fold_qat_bn(g: &Graph, i: usize, names: &mut Names) -> Result<Option<Outcome>> {
    let c = g.node(i);
    if !is_op(c, "Conv") {
        return Ok(None);
    }
    let Some(w) = dq_of(g, &c.input[1]) else {
        return Ok(None);
    };
    let Some(Ok((ws, m))) = conv_weight(g, &w)? else {
        return Ok(None);
    };
    let Some(wq) = g.constant(&w.q)? else {
        return Ok(None);
    };
    let Some((bn, chain, cm, ca)) = chain_to_bn(g, &c.output[0], m, wq.shape().len())? else {
        return Ok(None);
    };
    let aff = match bn_affine(g, bn)? {
        Ok(a) => a,
        Err(r) => return Ok(Some(decline(label(g.node(bn)), r))),
    };
    let Some((wz, _)) = zps(g, w.zp.as_ref())? else {
        return Ok(None);
    };
    if m != aff.channels() || attr::int(c, "group", 1)? < 1 {
        return Ok(Some(decline(
            label(c),
            "channel counts do not match the BN".into(),
        )));
    }
    if g.consumers(&g.node(w.node).output[0]).len() != 1 {
        return Ok(Some(decline(
            label(c),
            "the quantized weight is shared".into(),
        )));
    }
    if wz.iter().any(|&z| z != 0) || wq.elem_type() != ElemType::I8 {
        return Ok(Some(decline(
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
        return Ok(Some(converted(patch, nodes)));
    }
    let note = format!(
        "{}: a negative BN factor negates int8 weights, and -128 saturates to 127 (one step off) in {}",
        label(c),
        saturated.join(", ")
    );
    Ok(Some(Outcome::Rewrite(
        patch,
        Converted {
            nodes,
            inexact: Some(note),
        },
    )))
}
