//! BatchNormalization -> Conv, folded forward (no PyTorch module: an ONNX-only fold).
//!
//! ```text
//! before:  X -> BatchNormalization -> T -> Conv(W, b) -> Y
//! after:   X -> Conv(W', b') -> Y            (the Conv keeps its name and output)
//! ```
//!
//! Conditions: the BN's output is read by this Conv only (as its data input) and is not a graph
//! output; the Conv has no padding (`pads` all 0, `auto_pad` NOTSET or VALID: padded zeros
//! would not go through the BN) and one group; the weight reads BN's channels.
//!
//! Formula, with BN as `s * x + shift` per input channel `c`:
//! `W'[o, c] = W[o, c] * s[c]`, `b'[o] = b[o] + sum_{c,k} W[o, c, k] * shift[c]`.

use ndarray::{Array1, Axis};

use super::{
    as_vec, bn_affine, decline_unless, float_const, folded, is_op, label, or_decline, single_use,
    write_weight_and_bias, Outcome,
};
use crate::error::Result;
use crate::fusion::patterns::GroupKind;
use crate::graph::{Graph, Names, Patch};
use crate::onnx::attr::{self, defaults};

/// Folds the BN at node `bn` into the Conv after it.
pub fn bn_conv(g: &Graph, bn: usize, names: &mut Names) -> Result<Option<Outcome>> {
    let bnn = g.node(bn);
    if !is_op(bnn, "BatchNormalization") {
        return Ok(None);
    }
    let y = &bnn.output[0];
    let [c] = g.consumers(y) else { return Ok(None) };
    let conv = g.node(*c);
    if !is_op(conv, "Conv") || conv.input[0] != *y {
        return Ok(None);
    }
    let nodes = vec![label(bnn), label(conv)];
    if let Some(r) = single_use(g, y) {
        decline_unless!(false, nodes, "{r}");
    }
    let bn_aff = or_decline!(bn_affine(g, bn)?, nodes);
    let pads = attr::ints(conv, "pads")?.unwrap_or_default();
    let auto_pad = attr::string(conv, "auto_pad")?.unwrap_or_else(|| "NOTSET".into());
    decline_unless!(
        pads.iter().all(|&p| p == 0) && (auto_pad == "NOTSET" || auto_pad == "VALID"),
        nodes,
        "the Conv after the BN pads its input (pads {pads:?}, auto_pad {auto_pad}): padded zeros do not go through the BN, so a forward fold is not exact"
    );
    let group = attr::int(conv, "group", defaults::GROUP)?;
    decline_unless!(
        group == 1,
        nodes,
        "the Conv after the BN has group = {group}"
    );
    let (w, wty) = or_decline!(float_const(g, &conv.input[1])?, nodes, "weight");
    decline_unless!(
        w.ndim() >= 3 && w.shape()[1] == bn_aff.channels(),
        nodes,
        "Conv weight {:?} does not read {} channels",
        w.shape(),
        bn_aff.channels()
    );
    let m = w.shape()[0];
    let bias = match conv.input.get(2).filter(|s| !s.is_empty()) {
        None => Array1::zeros(m),
        Some(b) => {
            let (a, _) = or_decline!(float_const(g, b)?, nodes, "bias");
            decline_unless!(a.len() == m, nodes, "bias has shape {:?}", a.shape());
            as_vec(a)
        }
    };
    let mut w2 = w;
    let mut b2 = bias;
    for (o, mut wo) in w2.axis_iter_mut(Axis(0)).enumerate() {
        for (ci, mut wc) in wo.axis_iter_mut(Axis(0)).enumerate() {
            b2[o] += wc.sum() * bn_aff.shift[ci];
            wc *= bn_aff.scale[ci];
        }
    }
    let mut patch = Patch::new(format!("fold {}", nodes.join("+")));
    let (wname, bname) = write_weight_and_bias(g, &mut patch, names, conv, (w2, b2), wty)?;
    let mut fused = conv.clone();
    fused.input = vec![bnn.input[0].clone(), wname, bname];
    patch.replace_node(*c, fused).remove_node(bn);
    Ok(Some(Outcome::Rewrite(
        patch,
        folded(GroupKind::BnConv, nodes, &conv.output[0]),
    )))
}
