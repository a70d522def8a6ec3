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
    let w_out = &g.node(w.node).output[0];
    if g.consumers(w_out).len() != 1 || g.is_output(w_out) {
        return Ok(Some(decline(
            label(c),
            "the quantized weight is shared (another reader or a graph output)".into(),
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
        Some(bn) => {
            let value = match dq_of(g, bn) {
                Some(dq) => dequantized_f64(g, &dq)?,
                None => g.constant(bn)?.map(|t| t.to_f64()),
            };
            match value {
                Some(v) => Some(v),
                None => {
                    return Ok(Some(decline(
                        label(c),
                        format!("the Conv bias '{bn}' is not constant"),
                    )))
                }
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::testing::*;
    use crate::onnx::proto::AttributeProto;
    use crate::onnx::{ElemType, Model};

    const GAMMA: [f32; 3] = [1.5, -0.7, 0.9];
    const BETA: [f32; 3] = [0.1, -0.2, 0.3];
    const MEAN: [f32; 3] = [0.05, 0.1, -0.1];
    const VAR: [f32; 3] = [0.5, 1.2, 0.8];
    const WS: [f32; 3] = [0.01, 0.02, 0.005];
    /// The exported BN-scale divisor (negative on channel 2) and conv bias.
    const K: [f32; 3] = [2.0, 0.5, -4.0];
    const B: [f32; 3] = [0.2, -0.1, 0.05];

    fn s(o: usize) -> f64 {
        GAMMA[o] as f64 / (VAR[o] as f64 + 1e-5).sqrt()
    }

    fn chan(v: &[f32]) -> TensorData {
        f32t(&[1, 3, 1, 1], v.to_vec())
    }

    /// x -> Q -> DQ -> Conv(DQ(wq per channel)) -> Div(k) -> Add(b) -> BN -> Q -> DQ -> y,
    /// PyTorch's export of a fused QAT ConvBn.
    fn qat_model(bn_attrs: Vec<AttributeProto>) -> Model {
        model(
            vec![
                quantize("qx", "x", "xs", "xz", "xq"),
                dequantize("dqx", "xq", "xs", "xz", "xd", None),
                dequantize("dqw", "wq", "ws", "wz", "wd", Some(0)),
                node("Conv", "conv", &["xd", "wd"], &["c"], vec![]),
                node("Div", "div", &["c", "k"], &["d"], vec![]),
                node("Add", "add", &["d", "b"], &["a"], vec![]),
                node(
                    "BatchNormalization",
                    "bn",
                    &["a", "g", "beta", "mean", "var"],
                    &["n"],
                    bn_attrs,
                ),
                quantize("qy", "n", "ys", "yz", "yq"),
                dequantize("dqy", "yq", "ys", "yz", "y", None),
            ],
            vec![
                ("xs", f32_scalar(0.02)),
                ("xz", u8_scalar(128)),
                ("wq", i8t(&[3, 2, 3, 3], seq_i8(54, 1))),
                ("ws", f32v(&WS)),
                ("wz", i8t(&[3], vec![0, 0, 0])),
                ("k", chan(&K)),
                ("b", chan(&B)),
                ("g", f32v(&GAMMA)),
                ("beta", f32v(&BETA)),
                ("mean", f32v(&MEAN)),
                ("var", f32v(&VAR)),
                ("ys", f32_scalar(0.05)),
                ("yz", u8_scalar(128)),
            ],
            value_info("x", ElemType::F32, &[1, 2, 5, 5]),
            "y",
        )
    }

    fn x() -> crate::runtime::Sample {
        sample("x", &[1, 2, 5, 5], seq(50, 3))
    }

    #[test]
    fn folds_the_exported_chain_and_bn_into_the_weight_scales() {
        let m = qat_model(vec![]);
        let (f, rec) = rewrite(&m, "conv", fold_qat_bn);
        assert_eq!(rec.nodes, ["conv", "div", "add", "bn"]);
        assert!(rec.inexact.is_none());
        assert_eq!(
            count(&f, "Div") + count(&f, "Add") + count(&f, "BatchNormalization"),
            0
        );
        assert_eq!(count(&f, "DequantizeLinear"), 3);
        let c = node_named(&f, "conv");
        assert_eq!(c.output, ["n"]);
        assert_eq!(c.input[0], "xd");
        let dq = f
            .graph()
            .node
            .iter()
            .find(|n| n.output[0] == c.input[1])
            .unwrap();
        assert_eq!(dq.op_type, "DequantizeLinear");
        assert_eq!(attr::int(dq, "axis", 1).unwrap(), 0);
        // f = s * m with m = 1 / k: w_scale' = w_scale * |f|, weights negated where f < 0
        let wq = init(&m, "wq").to_f64();
        let wq2 = init(&f, &dq.input[0]).to_f64();
        let ws2 = init(&f, &dq.input[1]).to_f64();
        for o in 0..3 {
            let fo = s(o) / K[o] as f64;
            assert!((ws2[o] - WS[o] as f64 * fo.abs()).abs() < 1e-8, "scale {o}");
            let sign = fo.signum();
            let (a, b) = (wq.index_axis(Axis(0), o), wq2.index_axis(Axis(0), o));
            assert!(
                a.iter().zip(b.iter()).all(|(p, q)| p * sign == *q),
                "channel {o}"
            );
        }
        assert_eq!(init(&f, &dq.input[2]).to_f64().iter().sum::<f64>(), 0.0);
        // bias: (m * 0 + a - mean) * s + beta, with a = b (the Add after the Div)
        let bias = init(&f, &c.input[2]).to_f64();
        let want: Vec<f64> = (0..3)
            .map(|o| (B[o] as f64 - MEAN[o] as f64) * s(o) + BETA[o] as f64)
            .collect();
        assert_all_close(bias.as_slice().unwrap(), &want, 1e-5);
        assert_within_steps(&m, &f, &x(), 0.05, 1.0);
    }

    #[test]
    fn a_bn_right_after_the_conv_folds_too() {
        let mut m = qat_model(vec![]);
        m.graph_mut()
            .node
            .retain(|n| n.name != "div" && n.name != "add");
        m.graph_mut().node[3].output[0] = "a".into();
        let (f, rec) = rewrite(&m, "conv", fold_qat_bn);
        assert_eq!(rec.nodes, ["conv", "bn"]);
        assert_within_steps(&m, &f, &x(), 0.05, 1.0);
    }

    #[test]
    fn negating_minus_128_is_reported_inexact() {
        let mut m = qat_model(vec![]);
        let mut w = seq_i8(54, 1);
        w[18] = -128; // channel 1, where f < 0
        set_init(&mut m, "wq", i8t(&[3, 2, 3, 3], w));
        let (f, rec) = rewrite(&m, "conv", fold_qat_bn);
        let note = rec.inexact.expect("an inexact note");
        assert!(note.contains("channel 1: 1"), "{note}");
        let dq = f
            .graph()
            .node
            .iter()
            .find(|n| n.op_type == "DequantizeLinear" && n.input[0] != "xq" && n.input[0] != "yq")
            .unwrap();
        assert_eq!(init(&f, &dq.input[0]).to_f64()[[1, 0, 0, 0]], 127.0);
    }

    #[test]
    fn declines_a_shared_quantized_weight() {
        let mut m = qat_model(vec![]);
        m.graph_mut()
            .node
            .push(node("Conv", "conv2", &["xd", "wd"], &["c2"], vec![]));
        add_output(&mut m, "c2");
        let (nodes, reason) = declined(&m, "conv", fold_qat_bn);
        assert_eq!(nodes, ["conv"]);
        assert!(
            reason.starts_with("the quantized weight is shared"),
            "{reason}"
        );
    }

    #[test]
    fn declines_asymmetric_weights_training_mode_and_channel_mismatch() {
        let mut m = qat_model(vec![]);
        set_init(&mut m, "wz", i8t(&[3], vec![0, 1, 0]));
        assert_eq!(
            declined(&m, "conv", fold_qat_bn).1,
            "folding a negative BN scale needs symmetric int8 weights (zero point 0)"
        );
        let m = qat_model(vec![int("training_mode", 1)]);
        let (nodes, reason) = declined(&m, "conv", fold_qat_bn);
        assert_eq!(nodes, ["bn"]);
        assert_eq!(reason, "training_mode = 1");
        let mut m = qat_model(vec![]);
        for p in ["g", "beta", "mean", "var"] {
            set_init(&mut m, p, f32v(&[1.0, 0.5, 0.2, 0.3]));
        }
        assert_eq!(
            declined(&m, "conv", fold_qat_bn).1,
            "channel counts do not match the BN"
        );
    }

    #[test]
    fn does_not_apply_to_a_broken_chain() {
        // a link read twice
        let mut m = qat_model(vec![]);
        m.graph_mut()
            .node
            .push(node("Relu", "r", &["d"], &["r"], vec![]));
        add_output(&mut m, "r");
        not_applied(&m, "conv", fold_qat_bn);
        // k - y is not m * y + a with the constant second
        let mut m = qat_model(vec![]);
        let sub = &mut m.graph_mut().node[4];
        sub.op_type = "Sub".into();
        sub.input = vec!["k".into(), "c".into()];
        not_applied(&m, "conv", fold_qat_bn);
        // the Conv output is a graph output
        let mut m = qat_model(vec![]);
        add_output(&mut m, "c");
        not_applied(&m, "conv", fold_qat_bn);
        // weight scales per axis 1
        let mut m = qat_model(vec![]);
        set_init(&mut m, "ws", f32v(&[0.01, 0.02]));
        set_init(&mut m, "wz", i8t(&[2], vec![0, 0]));
        attr::set(&mut m.graph_mut().node[2], int("axis", 1));
        not_applied(&m, "conv", fold_qat_bn);
    }

    #[test]
    fn malformed_nodes_do_not_apply() {
        let mut m = qat_model(vec![]);
        m.graph_mut().node[3].input.truncate(1);
        not_applied(&m, "conv", fold_qat_bn);
        let mut m = qat_model(vec![]);
        m.graph_mut().node[6].input.truncate(4);
        not_applied(&m, "conv", fold_qat_bn);
        let mut m = qat_model(vec![]);
        m.graph_mut().node[4].input.push("k".into());
        not_applied(&m, "conv", fold_qat_bn);
    }

    #[test]
    fn a_weight_dq_that_is_a_graph_output_is_kept_or_declined() {
        let mut m = qat_model(vec![]);
        add_output(&mut m, "wd");
        if let Some(Outcome::Rewrite(patch, _)) = try_rule(&m, "conv", fold_qat_bn).unwrap() {
            let mut f = m.clone();
            patch.apply(f.graph_mut()).expect("a rewrite must apply");
        }
    }

    #[test]
    fn a_non_constant_conv_bias_is_not_dropped() {
        let mut m = qat_model(vec![]);
        m.graph_mut().node[3].input.push("cb".into());
        set_init(&mut m, "cb", f32v(&[0.3, -0.2, 0.1]));
        make_overridable(&mut m, "cb", ElemType::F32, &[3]);
        if let Some(Outcome::Rewrite(patch, _)) = try_rule(&m, "conv", fold_qat_bn).unwrap() {
            let mut f = m.clone();
            patch.apply(f.graph_mut()).unwrap();
            assert!(node_named(&f, "conv").input.len() == 3);
            assert_within_steps(&m, &f, &x(), 0.05, 1.0);
        }
    }
}
