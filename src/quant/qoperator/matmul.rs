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
    Ok(Some(converted(patch, nodes)))
}
