//! DQ -> Reshape / Flatten / Transpose / Squeeze / Unsqueeze / MaxPool -> Q  =>  the op on the
//! 8-bit tensor.
//!
//! ```text
//! before:  xq -> DQ -> Reshape -> Q -> yq
//! after:   xq -> Reshape -> yq
//! ```
//!
//! Conditions: the Q after the op has the same per-tensor scale and the same zero point as the
//! DQ before it, so the op commutes with (de)quantization exactly.

use super::common::*;
use crate::error::Result;
use crate::graph::{Graph, Patch};

pub const DATA_MOVEMENT: &[&str] = &[
    "Reshape",
    "Flatten",
    "Transpose",
    "Squeeze",
    "Unsqueeze",
    "MaxPool",
];

/// DQ -> data movement -> Q with the same parameters  =>  the op on the 8-bit tensor.
pub fn data_movement(g: &Graph, i: usize) -> Result<Option<Outcome>> {
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
    Ok(Some(converted(patch, vec![label(n)])))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::testing::*;
    use crate::onnx::proto::NodeProto;
    use crate::onnx::{ElemType, Model, TensorData};

    fn rule(g: &Graph, i: usize, _: &mut crate::graph::Names) -> Result<Option<Outcome>> {
        data_movement(g, i)
    }

    /// x [1, 2, 4, 4] -> Q -> DQ -> op -> Q(ys, yz) -> DQ -> y
    fn dm_model(op: NodeProto, ys: f32, yz: u8) -> Model {
        model(
            vec![
                quantize("qx", "x", "xs", "xz", "xq"),
                dequantize("dqx", "xq", "xs", "xz", "xd", None),
                op,
                quantize("qy", "t", "ys", "yz", "yq"),
                dequantize("dqy", "yq", "ys", "yz", "y", None),
            ],
            vec![
                ("xs", f32_scalar(0.02)),
                ("xz", u8_scalar(128)),
                ("ys", f32_scalar(ys)),
                ("yz", u8_scalar(yz)),
                (
                    "shape",
                    TensorData::I64(ndarray::arr1(&[2i64, 16]).into_dyn()),
                ),
            ],
            value_info("x", ElemType::F32, &[1, 2, 4, 4]),
            "y",
        )
    }

    fn transpose() -> NodeProto {
        node(
            "Transpose",
            "op",
            &["xd"],
            &["t"],
            vec![ints("perm", &[0, 2, 3, 1])],
        )
    }

    fn x() -> crate::runtime::Sample {
        sample("x", &[1, 2, 4, 4], seq(32, 1))
    }

    #[test]
    fn transpose_reshape_and_maxpool_run_on_8_bit_tensors() {
        let ops_ = [
            transpose(),
            node("Reshape", "op", &["xd", "shape"], &["t"], vec![]),
            node(
                "MaxPool",
                "op",
                &["xd"],
                &["t"],
                vec![ints("kernel_shape", &[2, 2])],
            ),
            node("Flatten", "op", &["xd"], &["t"], vec![]),
        ];
        for op in ops_ {
            let kind = op.op_type.clone();
            let m = dm_model(op, 0.02, 128);
            let (f, rec) = rewrite(&m, "op", rule);
            assert_eq!(rec.nodes, ["op"]);
            assert_eq!(
                ops(&f),
                ["QuantizeLinear", kind.as_str(), "DequantizeLinear"]
            );
            let n = node_named(&f, "op");
            assert_eq!(n.input[0], "xq");
            assert_eq!(n.output, ["yq"]);
            assert_within_steps(&m, &f, &x(), 0.02, 0.0);
        }
    }

    #[test]
    fn a_shared_dq_stays_for_its_other_reader() {
        let mut m = dm_model(transpose(), 0.02, 128);
        m.graph_mut()
            .node
            .push(node("Relu", "r", &["xd"], &["r"], vec![]));
        add_output(&mut m, "r");
        let (f, _) = rewrite(&m, "op", rule);
        assert_eq!(count(&f, "DequantizeLinear"), 2);
        assert_eq!(node_named(&f, "op").input[0], "xq");
    }

    #[test]
    fn different_scales_or_zero_points_stay() {
        not_applied(&dm_model(transpose(), 0.04, 128), "op", rule);
        not_applied(&dm_model(transpose(), 0.02, 127), "op", rule);
        // per-axis scales on both sides
        let mut m = dm_model(transpose(), 0.02, 128);
        set_init(&mut m, "xs", f32v(&[0.02, 0.02]));
        set_init(&mut m, "ys", f32v(&[0.02, 0.02]));
        not_applied(&m, "op", rule);
    }

    #[test]
    fn no_q_after_or_no_dq_before_stays() {
        // the op output is read twice
        let mut m = dm_model(transpose(), 0.02, 128);
        m.graph_mut()
            .node
            .push(node("Relu", "r", &["t"], &["r"], vec![]));
        add_output(&mut m, "r");
        not_applied(&m, "op", rule);
        // the input is not dequantized
        let mut m = dm_model(transpose(), 0.02, 128);
        m.graph_mut().node[2].input[0] = "x".into();
        not_applied(&m, "op", rule);
        // MaxPool with its indices output
        let mut mp = node(
            "MaxPool",
            "op",
            &["xd"],
            &["t", "idx"],
            vec![ints("kernel_shape", &[2, 2])],
        );
        mp.output[1] = "idx".into();
        not_applied(&dm_model(mp, 0.02, 128), "op", rule);
        // an op that is not data movement
        not_applied(
            &dm_model(node("Sigmoid", "op", &["xd"], &["t"], vec![]), 0.02, 128),
            "op",
            rule,
        );
    }

    #[test]
    fn malformed_nodes_stay() {
        let mut t = transpose();
        t.input.push("shape".into());
        not_applied(&dm_model(t, 0.02, 128), "op", rule);
        let mp = node("MaxPool", "op", &["xd"], &["t"], vec![]);
        not_applied(&dm_model(mp, 0.02, 128), "op", rule);
        let mut t = transpose();
        t.attribute.push(int("perm", 1));
        not_applied(&dm_model(t, 0.02, 128), "op", rule);
    }
}
