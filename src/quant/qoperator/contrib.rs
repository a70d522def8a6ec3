//! DQ inputs -> Add / Mul / GlobalAveragePool / Concat -> Q  =>  ONNX Runtime's `com.microsoft`
//! QLinearAdd, QLinearMul, QLinearGlobalAveragePool or QLinearConcat (only with
//! `allow_contrib_ops`: tract cannot run them).
//!
//! ```text
//! before:  aq -> DQ -> Add <- DQ <- bq,  Add -> Q -> yq
//! after:   QLinearAdd(aq, a_scale, a_zp, bq, b_scale, b_zp, y_scale, y_zp) -> yq
//! ```
//!
//! Conditions: every input dequantized per tensor; one Q reads the output.

use super::common::*;
use super::CONTRIB;
use crate::error::Result;
use crate::graph::{Graph, Names, Patch};
use crate::onnx::attr::{self};

/// DQ inputs -> Add / Mul / GlobalAveragePool / Concat -> Q  =>  the com.microsoft QLinear op.
pub fn contrib(g: &Graph, i: usize, names: &mut Names) -> Result<Option<Outcome>> {
    let n = g.node(i);
    let op = n.op_type.as_str();
    if !["Add", "Mul", "GlobalAveragePool", "Concat"]
        .iter()
        .any(|o| is_op(n, o))
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
    Ok(Some(converted(patch, vec![label(n)])))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::testing::*;
    use crate::onnx::proto::NodeProto;
    use crate::onnx::{ElemType, Model};

    /// x [1, 2, 3, 3] -> Q -> DQ -> xd; xd and DQ(k) -> op -> Q -> DQ -> y
    fn contrib_model(op: NodeProto) -> Model {
        model(
            vec![
                quantize("qx", "x", "xs", "xz", "xq"),
                dequantize("dqx", "xq", "xs", "xz", "xd", None),
                dequantize("dqk", "kq", "ks", "kz", "kd", None),
                op,
                quantize("qy", "t", "ys", "yz", "yq"),
                dequantize("dqy", "yq", "ys", "yz", "y", None),
            ],
            vec![
                ("xs", f32_scalar(0.02)),
                ("xz", u8_scalar(128)),
                (
                    "kq",
                    u8t(&[1, 2, 3, 3], (0..18).map(|i| i * 13 % 255).collect()),
                ),
                ("ks", f32_scalar(0.01)),
                ("kz", u8_scalar(100)),
                ("ys", f32_scalar(0.03)),
                ("yz", u8_scalar(120)),
            ],
            value_info("x", ElemType::F32, &[1, 2, 3, 3]),
            "y",
        )
    }

    fn add() -> NodeProto {
        node("Add", "op", &["xd", "kd"], &["t"], vec![])
    }

    #[test]
    fn add_and_mul_become_qlinear_ops_of_the_contrib_domain() {
        for op in ["Add", "Mul"] {
            let m = contrib_model(node(op, "op", &["xd", "kd"], &["t"], vec![]));
            let (f, rec) = rewrite(&m, "op", contrib);
            assert_eq!(rec.nodes, ["op"]);
            assert_eq!(
                ops(&f),
                [
                    "QuantizeLinear",
                    &format!("QLinear{op}"),
                    "DequantizeLinear"
                ]
            );
            let n = node_named(&f, "op");
            assert_eq!(n.domain, CONTRIB);
            assert_eq!(n.input, ["xq", "xs", "xz", "kq", "ks", "kz", "ys", "yz"]);
            assert_eq!(n.output, ["yq"]);
        }
        // tract has no com.microsoft ops, so there is no run to compare
    }

    #[test]
    fn global_average_pool_and_concat_layouts() {
        let m = contrib_model(node("GlobalAveragePool", "op", &["xd"], &["t"], vec![]));
        let (f, _) = rewrite(&m, "op", contrib);
        let n = node_named(&f, "op");
        assert_eq!(n.op_type, "QLinearGlobalAveragePool");
        assert_eq!(n.input, ["xq", "xs", "xz", "ys", "yz"]);
        assert_eq!(attr::int(n, "channels_last", 1).unwrap(), 0);
        assert!(
            f.graph().node.iter().all(|n| n.name != "dqx"),
            "the private DQ goes"
        );
        let m = contrib_model(node(
            "Concat",
            "op",
            &["xd", "kd"],
            &["t"],
            vec![int("axis", 1)],
        ));
        let (f, _) = rewrite(&m, "op", contrib);
        let n = node_named(&f, "op");
        assert_eq!(n.op_type, "QLinearConcat");
        assert_eq!(n.input, ["ys", "yz", "xq", "xs", "xz", "kq", "ks", "kz"]);
        assert_eq!(attr::int(n, "axis", 0).unwrap(), 1);
    }

    #[test]
    fn missing_zero_points_are_added() {
        let mut m = contrib_model(add());
        m.graph_mut().node[2].input.truncate(2);
        let (f, _) = rewrite(&m, "op", contrib);
        let n = node_named(&f, "op");
        assert_eq!(init(&f, &n.input[5]), u8_scalar(0));
    }

    #[test]
    fn does_not_apply_unless_every_input_is_dequantized_per_tensor() {
        let mut m = contrib_model(add());
        m.graph_mut().node[3].input[1] = "x".into();
        not_applied(&m, "op", contrib);
        let mut m = contrib_model(add());
        set_init(&mut m, "ks", f32v(&[0.01, 0.02]));
        not_applied(&m, "op", contrib);
        // the output read twice
        let mut m = contrib_model(add());
        add_output(&mut m, "t");
        not_applied(&m, "op", contrib);
        // another domain
        let mut m = contrib_model(add());
        m.graph_mut().node[3].domain = "custom".into();
        not_applied(&m, "op", contrib);
    }

    #[test]
    fn malformed_add_with_three_inputs_does_not_apply() {
        let mut m = contrib_model(add());
        m.graph_mut().node[3].input.push("kd".into());
        not_applied(&m, "op", contrib);
    }

    #[test]
    fn malformed_add_without_outputs_does_not_panic() {
        let mut m = contrib_model(add());
        m.graph_mut().node[3].output.clear();
        let r = std::panic::catch_unwind(|| try_rule(&m, "op", contrib).map(|o| o.is_none()));
        assert!(matches!(r, Ok(Ok(true))), "panicked or matched: {r:?}");
    }

    #[test]
    fn malformed_concat_without_axis_does_not_apply() {
        let m = contrib_model(node("Concat", "op", &["xd", "kd"], &["t"], vec![]));
        not_applied(&m, "op", contrib);
    }
}
