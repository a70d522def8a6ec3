//! DQ(x), DQ(w), [DQ(b) or float b] -> Conv [-> Relu] -> Q  =>  QLinearConv.
//!
//! ```text
//! before:  xq -> DQ -> Conv(DQ(wq), b) [-> Relu] -> Q -> yq
//! after:   xq -> QLinearConv(x_scale, x_zp, wq, w_scale, w_zp, y_scale, y_zp, b_int32) -> yq
//! ```
//!
//! Conditions: per-tensor x and y scales; constant 8-bit weights, per tensor or per output
//! channel (axis 0), with one scale per channel; a bias that is per channel; a Relu only when
//! Q's zero point is its type's minimum (then `Q(Relu(v)) = Q(v)` exactly).
//!
//! Formula: the bias becomes int32 at scale `x_scale * w_scale[o]`: the DQ'd int32 values when
//! they already have exactly that scale, else `round_half_even(b / (x_scale * w_scale[o]))`;
//! a value that overflows int32 declines the rewrite.

use super::common::*;
use crate::error::Result;
use crate::graph::{Graph, Names, Patch};

/// DQ(x), DQ(w), [b] -> Conv [-> Relu] -> Q  =>  QLinearConv.
pub fn conv(g: &Graph, i: usize, names: &mut Names) -> Result<Option<Outcome>> {
    let c = g.node(i);
    if !is_op(c, "Conv") {
        return Ok(None);
    }
    let (Some(x), Some(w)) = (dq_of(g, &c.input[0]), dq_of(g, &c.input[1])) else {
        return Ok(None);
    };
    let Some(xs) = f32s(g, &x.scale)?.filter(|s| s.len() == 1) else {
        return Ok(None);
    };
    let (ws, channels) = match conv_weight(g, &w)? {
        None => return Ok(None),
        Some(Err(reason)) => return Ok(Some(decline(label(c), reason))),
        Some(Ok(v)) => v,
    };
    let Some((q, relu)) = output_chain(g, &c.output[0])? else {
        return Ok(None);
    };
    if f32s(g, &q.scale)?.is_none_or(|s| s.len() != 1) {
        return Ok(None);
    }
    let bias = match int32_bias(
        g,
        c.input.get(2).filter(|s| !s.is_empty()),
        xs[0],
        &ws,
        channels,
        1.0,
    )? {
        None => return Ok(None),
        Some(Err(reason)) => return Ok(Some(decline(label(c), reason))),
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
    patch.replace_node(i, qc);
    Ok(Some(finish_qlinear(g, patch, i, &q, relu, &c.input)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::testing::*;
    use crate::onnx::attr;
    use crate::onnx::{ElemType, Model, TensorData};

    const WS: [f32; 3] = [0.01, 0.02, 0.005];
    const B: [f32; 3] = [0.2, -0.1, 0.05];
    const XS: f32 = 0.02;

    /// x -> Q -> DQ -> Conv(DQ(wq per channel), [b]) [-> Relu] -> Q(zp) -> DQ -> y
    fn conv_model(bias: bool, relu: bool, zp: u8) -> Model {
        let mut conv_in = vec!["xd", "wd"];
        if bias {
            conv_in.push("b");
        }
        let mut nodes = vec![
            quantize("qx", "x", "xs", "xz", "xq"),
            dequantize("dqx", "xq", "xs", "xz", "xd", None),
            dequantize("dqw", "wq", "ws", "wz", "wd", Some(0)),
            node(
                "Conv",
                "conv",
                &conv_in,
                &["c"],
                vec![ints("pads", &[1, 1, 1, 1])],
            ),
        ];
        let mut last = "c";
        if relu {
            nodes.push(node("Relu", "relu", &["c"], &["r"], vec![]));
            last = "r";
        }
        nodes.push(quantize("qy", last, "ys", "yz", "yq"));
        nodes.push(dequantize("dqy", "yq", "ys", "yz", "y", None));
        model(
            nodes,
            vec![
                ("xs", f32_scalar(XS)),
                ("xz", u8_scalar(128)),
                ("wq", i8t(&[3, 2, 3, 3], seq_i8(54, 2))),
                ("ws", f32v(&WS)),
                ("wz", i8t(&[3], vec![0, 0, 0])),
                ("b", f32v(&B)),
                ("ys", f32_scalar(0.05)),
                ("yz", u8_scalar(zp)),
            ],
            value_info("x", ElemType::F32, &[1, 2, 5, 5]),
            "y",
        )
    }

    fn x() -> crate::runtime::Sample {
        sample("x", &[1, 2, 5, 5], seq(50, 6))
    }

    #[test]
    fn conv_becomes_qlinearconv_with_an_int32_bias() {
        let m = conv_model(true, false, 128);
        let (f, rec) = rewrite(&m, "conv", conv);
        assert_eq!(rec.nodes, ["conv"]);
        assert_eq!(
            ops(&f),
            ["QuantizeLinear", "QLinearConv", "DequantizeLinear"]
        );
        let qc = node_named(&f, "conv");
        assert_eq!(
            qc.input[..8],
            ["xq", "xs", "xz", "wq", "ws", "wz", "ys", "yz"]
        );
        assert_eq!(qc.output, ["yq"]);
        assert_eq!(qc.attribute, m.graph().node[3].attribute, "attributes kept");
        // b_int32[o] = round_half_even(b[o] / (x_scale * w_scale[o]))
        let want: Vec<i32> = (0..3)
            .map(|o| (B[o] as f64 / (XS as f64 * WS[o] as f64)).round_ties_even() as i32)
            .collect();
        assert_eq!(
            init(&f, &qc.input[8]),
            TensorData::I32(ndarray::Array1::from(want).into_dyn())
        );
        assert_within_steps(&m, &f, &x(), 0.05, 1.0);
    }

    #[test]
    fn relu_is_absorbed_when_the_zero_point_is_qmin() {
        let m = conv_model(false, true, 0);
        let (f, rec) = rewrite(&m, "conv", conv);
        assert_eq!(rec.nodes, ["conv", "relu"]);
        assert_eq!(count(&f, "Relu"), 0);
        let qc = node_named(&f, "conv");
        assert_eq!(
            init(&f, &qc.input[8]),
            TensorData::I32(ndarray::Array1::zeros(3).into_dyn())
        );
        assert_within_steps(&m, &f, &x(), 0.05, 1.0);
    }

    #[test]
    fn relu_with_an_int8_output_is_absorbed_only_at_minus_128() {
        let mut m = conv_model(false, true, 0);
        set_init(&mut m, "yz", i8_scalar(-128));
        let (f, rec) = rewrite(&m, "conv", conv);
        assert_eq!(rec.nodes, ["conv", "relu"]);
        assert_within_steps(&m, &f, &x(), 0.05, 1.0);
        // symmetric int8 (zero point 0): the Relu is not implied
        let mut m = conv_model(false, true, 0);
        set_init(&mut m, "yz", i8_scalar(0));
        not_applied(&m, "conv", conv);
    }

    #[test]
    fn a_dequantized_int32_bias_at_the_right_scale_is_kept() {
        let mut m = conv_model(true, false, 128);
        let bs: Vec<f32> = WS.iter().map(|w| XS * w).collect();
        set_init(
            &mut m,
            "bq",
            TensorData::I32(ndarray::arr1(&[1000, -500, 7]).into_dyn()),
        );
        set_init(&mut m, "bs", f32v(&bs));
        m.graph_mut()
            .node
            .insert(0, dequantize("dqb", "bq", "bs", "", "bd", Some(0)));
        m.graph_mut().node[0].input.truncate(2);
        m.graph_mut().node[4].input[2] = "bd".into();
        let (f, _) = rewrite(&m, "conv", conv);
        assert_eq!(count(&f, "DequantizeLinear"), 1, "only dqy is left");
        let qc = node_named(&f, "conv");
        assert_eq!(
            init(&f, &qc.input[8]),
            TensorData::I32(ndarray::arr1(&[1000, -500, 7]).into_dyn())
        );
        assert_within_steps(&m, &f, &x(), 0.05, 1.0);
    }

    #[test]
    fn declines_weights_per_the_wrong_axis_or_of_the_wrong_rank() {
        let mut m = conv_model(true, false, 128);
        set_init(&mut m, "ws", f32v(&[0.01, 0.02]));
        set_init(&mut m, "wz", i8t(&[2], vec![0, 0]));
        attr::set(&mut m.graph_mut().node[2], int("axis", 1));
        let (nodes, reason) = declined(&m, "conv", conv);
        assert_eq!(nodes, ["conv"]);
        assert_eq!(
            reason,
            "weight scales are per axis 1; QLinearConv takes them per output channel (axis 0)"
        );
        let mut m = conv_model(true, false, 128);
        set_init(&mut m, "wq", i8t(&[3, 18], seq_i8(54, 2)));
        assert!(declined(&m, "conv", conv).1.contains("has shape [3, 18]"));
        let mut m = conv_model(true, false, 128);
        set_init(&mut m, "ws", f32v(&[0.01, 0.02, 0.03, 0.04]));
        set_init(&mut m, "wz", i8_scalar(0));
        assert_eq!(
            declined(&m, "conv", conv).1,
            "4 weight scales for 3 output channels"
        );
    }

    #[test]
    fn declines_a_bias_that_overflows_int32() {
        let mut m = conv_model(true, false, 128);
        set_init(&mut m, "b", f32v(&[1e9, 0.0, 0.0]));
        assert!(declined(&m, "conv", conv)
            .1
            .starts_with("bias channel 0 (1e9) overflows int32"));
    }

    #[test]
    fn does_not_apply_without_an_exact_qdq_frame() {
        // zero point 128: Q does not imply the Relu
        not_applied(&conv_model(false, true, 128), "conv", conv);
        // per-channel activation scales
        let mut m = conv_model(false, false, 128);
        set_init(&mut m, "xs", f32v(&[0.02, 0.03]));
        not_applied(&m, "conv", conv);
        // the Conv output read twice
        let mut m = conv_model(false, false, 128);
        m.graph_mut()
            .node
            .push(node("Sigmoid", "sig", &["c"], &["s"], vec![]));
        add_output(&mut m, "s");
        not_applied(&m, "conv", conv);
        // a non-constant weight
        let mut m = conv_model(false, false, 128);
        make_overridable(&mut m, "wq", ElemType::I8, &[3, 2, 3, 3]);
        not_applied(&m, "conv", conv);
    }

    #[test]
    fn malformed_nodes_do_not_apply() {
        let mut m = conv_model(true, false, 128);
        m.graph_mut().node[3].input.truncate(1);
        not_applied(&m, "conv", conv);
        let mut m = conv_model(true, false, 128);
        m.graph_mut().node[3].attribute.push(int("group", 0));
        not_applied(&m, "conv", conv);
        let mut m = conv_model(true, false, 128);
        m.graph_mut().node[4].input.truncate(1);
        not_applied(&m, "conv", conv);
    }

    #[test]
    fn a_missing_weight_zero_point_is_added() {
        let mut m = conv_model(true, false, 128);
        m.graph_mut().node[2].input.truncate(2);
        let (f, _) = rewrite(&m, "conv", conv);
        assert_eq!(init(&f, &node_named(&f, "conv").input[5]), i8_scalar(0));
        assert_within_steps(&m, &f, &x(), 0.05, 1.0);
    }
}
