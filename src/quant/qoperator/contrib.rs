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
    Ok(Some(converted(patch, vec![label(n)])))
}
