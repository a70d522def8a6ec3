//! DQ(a), DQ(b) -> MatMul [-> Relu] -> Q  =>  QLinearMatMul.
//!
//! ```text
//! before:  aq -> DQ -> MatMul(DQ(bq)) [-> Relu] -> Q -> yq
//! after:   aq -> QLinearMatMul(a_scale, a_zp, bq, b_scale, b_zp, y_scale, y_zp) -> yq
//! ```
//!
//! Conditions: per-tensor a and y scales; b per tensor, or per column of a constant 2-D b
//! (axis 1 or -1); a Relu only when Q's zero point is its type's minimum.

use super::common::*;
use crate::error::Result;
use crate::graph::{Graph, Names, Patch};

/// DQ(a), DQ(b) -> MatMul [-> Relu] -> Q  =>  QLinearMatMul.
pub fn matmul(g: &Graph, i: usize, names: &mut Names) -> Result<Option<Outcome>> {
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
        let shape = g.constant(&b.q)?.map(|t| t.shape().to_vec());
        let zp_count = zps(g, b.zp.as_ref())?.map_or(0, |(z, _)| z.len());
        let fits = shape
            .as_deref()
            .is_some_and(|s| s.len() == 2 && params_fit(s, b.axis, bs.len(), zp_count) == Some(1));
        if !fits {
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
    let b_zp = zero_points_input(g, &mut patch, names, b.zp.as_ref(), &b.q, bs.len());
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
    patch.replace_node(i, qm);
    Ok(Some(finish_qlinear(g, patch, i, &q, relu, &m.input)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::testing::*;
    use crate::onnx::attr;
    use crate::onnx::{ElemType, Model};

    /// a [2, 4] -> Q -> DQ -> MatMul(DQ(bq [4, 3] per column)) [-> Relu] -> Q(zp) -> DQ -> y
    fn matmul_model(relu: bool, zp: u8) -> Model {
        let mut nodes = vec![
            quantize("qa", "a", "as", "az", "aq"),
            dequantize("dqa", "aq", "as", "az", "ad", None),
            dequantize("dqb", "bq", "bs", "bz", "bd", Some(1)),
            node("MatMul", "mm", &["ad", "bd"], &["c"], vec![]),
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
                ("as", f32_scalar(0.02)),
                ("az", u8_scalar(128)),
                ("bq", i8t(&[4, 3], seq_i8(12, 5))),
                ("bs", f32v(&[0.01, 0.02, 0.03])),
                ("bz", i8t(&[3], vec![0, 0, 0])),
                ("ys", f32_scalar(0.02)),
                ("yz", u8_scalar(zp)),
            ],
            value_info("a", ElemType::F32, &[2, 4]),
            "y",
        )
    }

    fn a() -> crate::runtime::Sample {
        sample("a", &[2, 4], seq(8, 2))
    }

    #[test]
    fn matmul_becomes_qlinearmatmul() {
        let m = matmul_model(false, 128);
        let (f, rec) = rewrite(&m, "mm", matmul);
        assert_eq!(rec.nodes, ["mm"]);
        assert_eq!(
            ops(&f),
            ["QuantizeLinear", "QLinearMatMul", "DequantizeLinear"]
        );
        let q = node_named(&f, "mm");
        assert_eq!(q.input, ["aq", "as", "az", "bq", "bs", "bz", "ys", "yz"]);
        assert_eq!(q.output, ["yq"]);
        assert_within_steps(&m, &f, &a(), 0.02, 1.0);
    }

    #[test]
    fn relu_absorbed_and_axis_minus_1_per_column() {
        let m = matmul_model(true, 0);
        let (f, rec) = rewrite(&m, "mm", matmul);
        assert_eq!(rec.nodes, ["mm", "relu"]);
        assert_eq!(count(&f, "Relu"), 0);
        assert_within_steps(&m, &f, &a(), 0.02, 1.0);
        let mut m = matmul_model(false, 128);
        attr::set(&mut m.graph_mut().node[2], int("axis", -1));
        let (f, _) = rewrite(&m, "mm", matmul);
        assert_within_steps(&m, &f, &a(), 0.02, 1.0);
    }

    #[test]
    fn missing_zero_points_are_added_with_the_right_type() {
        let mut m = matmul_model(false, 128);
        m.graph_mut().node[2].input.truncate(2);
        m.graph_mut().node[2].attribute.clear();
        set_init(&mut m, "bs", f32_scalar(0.02));
        let (f, _) = rewrite(&m, "mm", matmul);
        let q = node_named(&f, "mm");
        assert_eq!(init(&f, &q.input[5]), i8_scalar(0));
        assert_within_steps(&m, &f, &a(), 0.02, 1.0);
    }

    #[test]
    fn per_column_b_without_a_zero_point_runs_in_tract() {
        let mut m = matmul_model(false, 128);
        m.graph_mut().node[2].input.truncate(2);
        let (f, _) = rewrite(&m, "mm", matmul);
        assert_within_steps(&m, &f, &a(), 0.02, 1.0);
    }

    #[test]
    fn does_not_apply_to_scales_on_the_wrong_axis() {
        // per-row scales of b (axis 0)
        let mut m = matmul_model(false, 128);
        attr::set(&mut m.graph_mut().node[2], int("axis", 0));
        set_init(&mut m, "bs", f32v(&[0.01, 0.02, 0.03, 0.04]));
        set_init(&mut m, "bz", i8t(&[4], vec![0; 4]));
        not_applied(&m, "mm", matmul);
        // per-axis activation scales
        let mut m = matmul_model(false, 128);
        set_init(&mut m, "as", f32v(&[0.02, 0.03]));
        not_applied(&m, "mm", matmul);
        // per-axis output scales
        let mut m = matmul_model(false, 128);
        set_init(&mut m, "ys", f32v(&[0.02, 0.03, 0.04]));
        not_applied(&m, "mm", matmul);
    }

    #[test]
    fn does_not_apply_to_a_relu_that_q_does_not_imply() {
        not_applied(&matmul_model(true, 128), "mm", matmul);
        let mut m = matmul_model(false, 128);
        add_output(&mut m, "c");
        not_applied(&m, "mm", matmul);
    }

    #[test]
    fn malformed_nodes_do_not_apply() {
        let mut m = matmul_model(false, 128);
        m.graph_mut().node[3].input.truncate(1);
        not_applied(&m, "mm", matmul);
        let mut m = matmul_model(false, 128);
        m.graph_mut().node[3].output.push("extra".into());
        not_applied(&m, "mm", matmul);
        let mut m = matmul_model(false, 128);
        m.graph_mut().node[4].input.truncate(1);
        not_applied(&m, "mm", matmul);
    }
}
