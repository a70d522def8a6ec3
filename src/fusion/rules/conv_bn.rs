//! Conv -> BatchNormalization and ConvTranspose -> BatchNormalization.
//!
//! ```text
//! before:  X -> Conv(W, b) -> T -> BatchNormalization(gamma, beta, mean, var, eps) -> Y
//! after:   X -> Conv(W', b') -> Y            (the Conv keeps its name and attributes)
//! ```
//!
//! Conditions: the shared ones (`super`), plus a weight of rank >= 3, a `[C]` bias if any,
//! output channels equal to BN's (`W.shape[0]` for Conv; `W.shape[1] * group` for
//! ConvTranspose, whose input channels must divide into `group`).
//!
//! Formula, with `s = gamma / sqrt(var + eps)` per output channel:
//! - Conv, `W [M, C/g, k...]`: `W'[o] = W[o] * s[o]`, `b' = (b - mean) * s + beta`.
//! - ConvTranspose, `W [C, M/g, k...]`, group `g`: the output channel of `W[i, j]` is
//!   `(i / (C/g)) * (M/g) + j`, scaled by that channel's `s` (PyTorch gets `g > 1` wrong).

use super::{
    bn_affine, decline_unless, float_const, float_vector, folded, is_op, label, or_decline,
    single_use, write_weight_and_bias, Outcome,
};
use crate::error::Result;
use crate::fusion::fold;
use crate::fusion::patterns::GroupKind;
use crate::graph::{Graph, Names, Patch};
use crate::onnx::attr::{self, defaults};

/// Folds the BN at node `bn` into the Conv or ConvTranspose before it.
pub fn conv_bn(g: &Graph, bn: usize, names: &mut Names) -> Result<Option<Outcome>> {
    let bnn = g.node(bn);
    if !is_op(bnn, "BatchNormalization") {
        return Ok(None);
    }
    let x = &bnn.input[0];
    let Some(p) = g.producer(x) else {
        return Ok(None);
    };
    let conv = g.node(p);
    let transpose = is_op(conv, "ConvTranspose");
    if !is_op(conv, "Conv") && !transpose {
        return Ok(None);
    }
    let nodes = vec![label(conv), label(bnn)];
    if let Some(r) = single_use(g, x) {
        decline_unless!(false, nodes, "{r}");
    }
    let bn_aff = or_decline!(bn_affine(g, bn)?, nodes);
    let (w, wty) = or_decline!(float_const(g, &conv.input[1])?, nodes, "weight");
    let bias = match conv.input.get(2).filter(|s| !s.is_empty()) {
        None => None,
        Some(b) => Some(or_decline!(float_vector(g, b)?, nodes, "bias")),
    };
    decline_unless!(w.ndim() >= 3, nodes, "weight has rank {}", w.ndim());
    let group = attr::int(conv, "group", defaults::GROUP)? as usize;
    let out_channels = if transpose {
        w.shape()[1].checked_mul(group)
    } else {
        Some(w.shape()[0])
    };
    decline_unless!(
        out_channels == Some(bn_aff.channels()),
        nodes,
        "{} has {} output channels, BN has {}",
        conv.op_type,
        out_channels.map_or("too many".to_string(), |c| c.to_string()),
        bn_aff.channels()
    );
    decline_unless!(
        !transpose || w.shape()[0] % group == 0,
        nodes,
        "weight's input channels do not divide into {group} groups"
    );
    if let Some(b) = &bias {
        decline_unless!(
            b.len() == bn_aff.channels(),
            nodes,
            "bias has {} values for {} channels",
            b.len(),
            bn_aff.channels()
        );
    }
    let (w2, b2) = if transpose {
        fold::fold_conv_transpose(&w, bias.as_ref(), group, &bn_aff)
    } else {
        fold::fold_conv(&w, bias.as_ref(), &bn_aff)
    };
    let mut patch = Patch::new(format!("fold {}", nodes.join("+")));
    let (wname, bname) = write_weight_and_bias(g, &mut patch, names, conv, (w2, b2), wty)?;
    let mut fused = conv.clone();
    fused.input = vec![conv.input[0].clone(), wname, bname];
    fused.output = vec![bnn.output[0].clone()];
    patch.replace_node(p, fused).remove_node(bn);
    let kind = if transpose {
        GroupKind::ConvTransposeBn
    } else {
        GroupKind::ConvBn
    };
    Ok(Some(Outcome::Rewrite(
        patch,
        folded(kind, nodes, &bnn.output[0]),
    )))
}
