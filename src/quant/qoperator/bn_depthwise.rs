//! DQ(x) -> BatchNormalization [-> Relu] -> Q  =>  a depthwise 1x1 Conv (which `conv` then
//! turns into a QLinearConv).
//!
//! ```text
//! before:  x -> DQ -> BatchNormalization [-> Relu] -> Q
//! after:   x -> DQ -> Conv(DQ(w), bias; group = C, kernel 1...) [-> Relu] -> Q
//! ```
//!
//! Conditions: an inference BN with constant parameters; an input of known rank >= 3.
//!
//! Formula: per channel `s = gamma / sqrt(var + eps)`, stored exactly as the int8 weight
//! `sign(s) * 127` with scale `|s| / 127`; bias `beta - mean * s` (float).

use ndarray::{ArrayD, IxDyn};

use super::common::*;
use crate::error::Result;
use crate::graph::{Graph, Names, Patch};
use crate::onnx::attr::{self};
use crate::onnx::TensorData;

/// DQ(x) -> BN [-> Relu] -> Q  =>  depthwise 1x1 Conv (then QLinearConv).
pub fn bn_to_depthwise(g: &Graph, i: usize, names: &mut Names) -> Result<Option<Outcome>> {
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
        Err(r) => return Ok(Some(decline(label(n), r))),
    };
    let Some(rank) = infer_rank(g, &n.input[0]) else {
        return Ok(Some(decline(
            label(n),
            "the rank of its input is unknown".into(),
        )));
    };
    if rank < 3 {
        return Ok(Some(decline(
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
    Ok(Some(converted(patch, vec![label(n)])))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::testing::*;
    use crate::onnx::proto::AttributeProto;
    use crate::onnx::{ElemType, Model};

    const GAMMA: [f32; 2] = [1.5, -0.7];
    const BETA: [f32; 2] = [0.1, 0.4];
    const MEAN: [f32; 2] = [0.05, -0.1];
    const VAR: [f32; 2] = [0.5, 1.2];

    fn s(c: usize) -> f64 {
        GAMMA[c] as f64 / (VAR[c] as f64 + 1e-5).sqrt()
    }

    /// x [1, 2, 3, 3] -> Q -> DQ -> BN -> Relu -> Q(zp) -> DQ -> y
    fn bn_model(yz: u8, bn_attrs: Vec<AttributeProto>) -> Model {
        model(
            vec![
                quantize("qx", "x", "xs", "xz", "xq"),
                dequantize("dqx", "xq", "xs", "xz", "xd", None),
                node(
                    "BatchNormalization",
                    "bn",
                    &["xd", "g", "b", "m", "v"],
                    &["n"],
                    bn_attrs,
                ),
                node("Relu", "relu", &["n"], &["r"], vec![]),
                quantize("qy", "r", "ys", "yz", "yq"),
                dequantize("dqy", "yq", "ys", "yz", "y", None),
            ],
            vec![
                ("xs", f32_scalar(0.02)),
                ("xz", u8_scalar(128)),
                ("g", f32v(&GAMMA)),
                ("b", f32v(&BETA)),
                ("m", f32v(&MEAN)),
                ("v", f32v(&VAR)),
                ("ys", f32_scalar(0.01)),
                ("yz", u8_scalar(yz)),
            ],
            value_info("x", ElemType::F32, &[1, 2, 3, 3]),
            "y",
        )
    }

    fn x() -> crate::runtime::Sample {
        sample("x", &[1, 2, 3, 3], seq(18, 5))
    }

    #[test]
    fn bn_becomes_a_depthwise_1x1_conv() {
        let m = bn_model(0, vec![]);
        let (f, rec) = rewrite(&m, "bn", bn_to_depthwise);
        assert_eq!(rec.nodes, ["bn"]);
        assert_eq!(count(&f, "BatchNormalization"), 0);
        assert_eq!(count(&f, "Relu"), 1, "the conv rule absorbs the Relu later");
        let c = node_named(&f, "bn");
        assert_eq!(c.op_type, "Conv");
        assert_eq!(c.input[0], "xd");
        assert_eq!(c.output, ["n"]);
        assert_eq!(attr::int(c, "group", 0).unwrap(), 2);
        assert_eq!(attr::ints(c, "kernel_shape").unwrap(), Some(vec![1, 1]));
        // weights sign(s) * 127 with scale |s| / 127, zero points 0; bias beta - mean * s
        let dq = f
            .graph()
            .node
            .iter()
            .find(|n| n.output[0] == c.input[1])
            .unwrap();
        assert_eq!(init(&f, &dq.input[0]), i8t(&[2, 1, 1, 1], vec![127, -127]));
        let ws = init(&f, &dq.input[1]).to_f64();
        assert_all_close(
            ws.as_slice().unwrap(),
            &[s(0).abs() / 127.0, s(1).abs() / 127.0],
            1e-8,
        );
        assert_eq!(init(&f, &dq.input[2]), i8t(&[2], vec![0, 0]));
        let b = init(&f, &c.input[2]).to_f64();
        let want: Vec<f64> = (0..2)
            .map(|k| BETA[k] as f64 - MEAN[k] as f64 * s(k))
            .collect();
        assert_all_close(b.as_slice().unwrap(), &want, 1e-6);
        assert_within_steps(&m, &f, &x(), 0.01, 1.0);
    }

    #[test]
    fn without_relu_and_with_a_rank_3_input() {
        let mut m = bn_model(128, vec![]);
        m.graph_mut().node.retain(|n| n.name != "relu");
        m.graph_mut().node[3].input[0] = "n".into();
        m.graph_mut().input[0] = value_info("x", ElemType::F32, &[1, 2, 9]);
        let (f, _) = rewrite(&m, "bn", bn_to_depthwise);
        assert_eq!(
            attr::ints(node_named(&f, "bn"), "kernel_shape").unwrap(),
            Some(vec![1])
        );
        assert_within_steps(&m, &f, &sample("x", &[1, 2, 9], seq(18, 5)), 0.01, 1.0);
    }

    #[test]
    fn declines_unknown_or_low_rank_inputs() {
        let mut m = bn_model(0, vec![]);
        m.graph_mut().input[0] = untyped("x");
        assert_eq!(
            declined(&m, "bn", bn_to_depthwise).1,
            "the rank of its input is unknown"
        );
        let mut m = bn_model(0, vec![]);
        m.graph_mut().input[0] = value_info("x", ElemType::F32, &[4, 2]);
        assert_eq!(
            declined(&m, "bn", bn_to_depthwise).1,
            "rank-2 input: no convolution form"
        );
    }

    #[test]
    fn declines_a_training_bn() {
        let m = bn_model(0, vec![int("training_mode", 1)]);
        let (nodes, reason) = declined(&m, "bn", bn_to_depthwise);
        assert_eq!(nodes, ["bn"]);
        assert_eq!(reason, "training_mode = 1");
    }

    #[test]
    fn does_not_apply_without_a_qdq_frame() {
        // Relu with zero point 128 is not absorbed by Q
        not_applied(&bn_model(128, vec![]), "bn", bn_to_depthwise);
        // input not dequantized
        let mut m = bn_model(0, vec![]);
        m.graph_mut().node[2].input[0] = "x".into();
        not_applied(&m, "bn", bn_to_depthwise);
        // BN output also a graph output
        let mut m = bn_model(0, vec![]);
        add_output(&mut m, "n");
        not_applied(&m, "bn", bn_to_depthwise);
    }

    #[test]
    fn malformed_nodes_do_not_apply() {
        let mut m = bn_model(0, vec![]);
        m.graph_mut().node[2].input.truncate(4);
        not_applied(&m, "bn", bn_to_depthwise);
        let mut m = bn_model(0, vec![]);
        m.graph_mut().node[2]
            .attribute
            .push(float("epsilon", f32::INFINITY));
        not_applied(&m, "bn", bn_to_depthwise);
    }
}
