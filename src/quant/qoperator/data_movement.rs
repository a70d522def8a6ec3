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
