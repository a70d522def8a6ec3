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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::testing::*;
    use crate::onnx::proto::AttributeProto;
    use crate::onnx::{ElemType, Model};

    const GAMMA: [f32; 2] = [1.5, -0.7];
    const BETA: [f32; 2] = [0.1, -0.2];
    const MEAN: [f32; 2] = [0.05, 0.1];
    const VAR: [f32; 2] = [0.5, 1.2];

    fn s(c: usize) -> f64 {
        GAMMA[c] as f64 / (VAR[c] as f64 + 1e-5).sqrt()
    }

    fn shift(c: usize) -> f64 {
        BETA[c] as f64 - MEAN[c] as f64 * s(c)
    }

    /// x [1, 2, 5, 5] -> BN -> t -> Conv(w [3, 2, 3, 3], [b]; attrs) -> y
    fn bn_conv_model(
        bias: bool,
        conv_attrs: Vec<AttributeProto>,
        bn_attrs: Vec<AttributeProto>,
    ) -> Model {
        let mut conv_in = vec!["t", "w"];
        let mut inits = vec![
            ("w", f32t(&[3, 2, 3, 3], seq(54, 6))),
            ("g", f32v(&GAMMA)),
            ("beta", f32v(&BETA)),
            ("mean", f32v(&MEAN)),
            ("var", f32v(&VAR)),
        ];
        if bias {
            conv_in.push("b");
            inits.push(("b", f32v(&[0.2, -0.1, 0.05])));
        }
        model(
            vec![
                node(
                    "BatchNormalization",
                    "bn",
                    &["x", "g", "beta", "mean", "var"],
                    &["t"],
                    bn_attrs,
                ),
                node("Conv", "conv", &conv_in, &["y"], conv_attrs),
            ],
            inits,
            value_info("x", ElemType::F32, &[1, 2, 5, 5]),
            "y",
        )
    }

    fn x() -> crate::runtime::Sample {
        sample("x", &[1, 2, 5, 5], seq(50, 8))
    }

    #[test]
    fn folds_bn_forward_into_an_unpadded_conv() {
        let m = bn_conv_model(true, vec![ints("strides", &[2, 2])], vec![]);
        let (f, rec) = rewrite(&m, "bn", bn_conv);
        assert_eq!(rec.kind, GroupKind::BnConv);
        assert_eq!(rec.nodes, ["bn", "conv"]);
        assert_eq!(rec.output, "y");
        assert_eq!(ops(&f), ["Conv"]);
        let c = node_named(&f, "conv");
        assert_eq!(c.input[0], "x");
        assert_eq!(c.output, ["y"]);
        // W'[o, c] = W[o, c] * s[c]; b'[o] = b[o] + sum_{c,k} W[o, c, k] * shift[c]
        let w = init(&m, "w").to_f64();
        let w2 = init(&f, &c.input[1]).to_f64();
        let b = [0.2f64, -0.1, 0.05];
        let b2 = init(&f, &c.input[2]).to_f64();
        for o in 0..3 {
            let mut want_b = b[o];
            for ci in 0..2 {
                for k in 0..9 {
                    let idx = [o, ci, k / 3, k % 3];
                    assert!((w[idx] * s(ci) - w2[idx]).abs() < 1e-6, "W{idx:?}");
                    want_b += w[idx] * shift(ci);
                }
            }
            assert!(
                (b2[o] - want_b).abs() < 1e-5,
                "b[{o}]: {} vs {want_b}",
                b2[o]
            );
        }
        assert_same_output(&m, &f, &x(), 1e-4);
    }

    #[test]
    fn without_bias_and_with_valid_auto_pad() {
        let m = bn_conv_model(false, vec![string("auto_pad", "VALID")], vec![]);
        let (f, _) = rewrite(&m, "bn", bn_conv);
        assert_eq!(node_named(&f, "conv").input[2], "w_bias");
        assert_same_output(&m, &f, &x(), 1e-4);
        let m = bn_conv_model(true, vec![ints("pads", &[0, 0, 0, 0])], vec![]);
        let (f, _) = rewrite(&m, "bn", bn_conv);
        assert_same_output(&m, &f, &x(), 1e-4);
    }

    #[test]
    fn declines_a_padded_conv() {
        let m = bn_conv_model(true, vec![ints("pads", &[1, 1, 1, 1])], vec![]);
        let (nodes, reason) = declined(&m, "bn", bn_conv);
        assert_eq!(nodes, ["bn", "conv"]);
        assert!(
            reason.starts_with("the Conv after the BN pads its input (pads [1, 1, 1, 1]"),
            "{reason}"
        );
        let m = bn_conv_model(true, vec![string("auto_pad", "SAME_UPPER")], vec![]);
        assert!(declined(&m, "bn", bn_conv)
            .1
            .contains("auto_pad SAME_UPPER"));
    }

    #[test]
    fn declines_groups_channel_mismatch_and_training_mode() {
        let mut m = bn_conv_model(true, vec![int("group", 2)], vec![]);
        m.graph_mut().initializer[0] = f32t(&[4, 1, 3, 3], seq(36, 1)).to_proto("w");
        m.graph_mut().initializer.retain(|t| t.name != "b");
        m.graph_mut().node[1].input.truncate(2);
        assert_eq!(
            declined(&m, "bn", bn_conv).1,
            "the Conv after the BN has group = 2"
        );
        let mut m = bn_conv_model(true, vec![], vec![]);
        m.graph_mut().initializer[0] = f32t(&[3, 3, 3, 3], seq(81, 1)).to_proto("w");
        assert_eq!(
            declined(&m, "bn", bn_conv).1,
            "Conv weight [3, 3, 3, 3] does not read 2 channels"
        );
        let m = bn_conv_model(true, vec![], vec![int("training_mode", 1)]);
        assert_eq!(declined(&m, "bn", bn_conv).1, "training_mode = 1");
    }

    #[test]
    fn declines_a_bn_output_that_is_a_graph_output_and_skips_two_consumers() {
        let mut m = bn_conv_model(true, vec![], vec![]);
        add_output(&mut m, "t");
        assert_eq!(declined(&m, "bn", bn_conv).1, "'t' is a graph output");
        let mut m = bn_conv_model(true, vec![], vec![]);
        m.graph_mut()
            .node
            .push(node("Relu", "r", &["t"], &["r"], vec![]));
        add_output(&mut m, "r");
        not_applied(&m, "bn", bn_conv);
    }

    #[test]
    fn declines_a_non_constant_weight() {
        let mut m = bn_conv_model(true, vec![], vec![]);
        make_overridable(&mut m, "w", ElemType::F32, &[3, 2, 3, 3]);
        assert_eq!(
            declined(&m, "bn", bn_conv).1,
            "weight 'w' is not a constant"
        );
    }

    #[test]
    fn does_not_apply_when_the_bn_feeds_the_weight_or_another_op() {
        let mut m = bn_conv_model(true, vec![], vec![]);
        m.graph_mut().node[1].op_type = "Add".into();
        m.graph_mut().node[1].input.truncate(2);
        not_applied(&m, "bn", bn_conv);
        let mut m = bn_conv_model(true, vec![], vec![]);
        m.graph_mut().node[1].input[0] = "x".into();
        m.graph_mut().node[1].input[1] = "t".into();
        not_applied(&m, "bn", bn_conv);
        not_applied(&bn_conv_model(true, vec![], vec![]), "conv", bn_conv);
    }

    #[test]
    fn malformed_nodes_do_not_apply() {
        let mut m = bn_conv_model(true, vec![], vec![]);
        m.graph_mut().node[1].input.truncate(1);
        not_applied(&m, "bn", bn_conv);
        not_applied(
            &bn_conv_model(true, vec![int("group", 0)], vec![]),
            "bn",
            bn_conv,
        );
        let mut m = bn_conv_model(true, vec![], vec![]);
        m.graph_mut().node[0].input.truncate(4);
        not_applied(&m, "bn", bn_conv);
    }
}
