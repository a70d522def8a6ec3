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
    let mut nodes = vec![label(c)];
    patch.replace_node(i, qc).remove_node(q.node);
    if let Some(r) = relu {
        patch.remove_node(r);
        nodes.push(label(g.node(r)));
    }
    drop_private_dq(g, &mut patch, &x, i);
    drop_private_dq(g, &mut patch, &w, i);
    if let Some(b) = c.input.get(2).and_then(|b| dq_of(g, b)) {
        drop_private_dq(g, &mut patch, &b, i);
    }
    Ok(Some(converted(patch, nodes)))
}
