//! Gemm -> BatchNormalization (PyTorch's Linear + BatchNorm1d).
//!
//! ```text
//! before:  A -> Gemm(B, C; alpha, beta, transB) -> T [M, N] -> BatchNormalization -> Y
//! after:   A -> Gemm(B', C'; alpha, beta = 1, transB) -> Y
//! ```
//!
//! Conditions: the shared ones (`super`), a constant rank-2 `B` with `N` output channels equal
//! to BN's, and `C` absent or broadcasting to `[M, N]` (a scalar, `[1]`, `[N]`, `[1, N]`,
//! `[M, 1]` or `[M, N]`, with at least one value).
//!
//! Formula, `Y = alpha * A * op(B) + beta * C` then BN with `s`, `shift`: scale the
//! output-channel axis of `B` (rows when `transB = 1`, columns otherwise) by `s`;
//! `C' = (beta * C - mean) * s + beta_bn = beta * C * s + shift`, and `beta` becomes 1.

use super::{
    bn_affine, decline_unless, float_const, folded, is_op, label, new_const, or_decline,
    single_use, write_const, Outcome,
};
use crate::error::Result;
use crate::fusion::fold;
use crate::fusion::patterns::GroupKind;
use crate::graph::{Graph, Names, Patch};
use crate::onnx::attr::{self, defaults};

/// Folds the BN at node `bn` into the Gemm before it.
pub fn gemm_bn(g: &Graph, bn: usize, names: &mut Names) -> Result<Option<Outcome>> {
    let bnn = g.node(bn);
    if !is_op(bnn, "BatchNormalization") {
        return Ok(None);
    }
    let Some(p) = g.producer(&bnn.input[0]) else {
        return Ok(None);
    };
    let gemm = g.node(p);
    if !is_op(gemm, "Gemm") {
        return Ok(None);
    }
    let nodes = vec![label(gemm), label(bnn)];
    if let Some(r) = single_use(g, &bnn.input[0]) {
        decline_unless!(false, nodes, "{r}");
    }
    let bn_aff = or_decline!(bn_affine(g, bn)?, nodes);
    let (b, bty) = or_decline!(float_const(g, &gemm.input[1])?, nodes, "B");
    decline_unless!(b.ndim() == 2, nodes, "B has rank {}", b.ndim());
    let trans_b = attr::int(gemm, "transB", defaults::GEMM_TRANS)? != 0;
    let beta = attr::float(gemm, "beta", defaults::GEMM_BETA)? as f64;
    let n = if trans_b { b.shape()[0] } else { b.shape()[1] };
    decline_unless!(
        n == bn_aff.channels(),
        nodes,
        "Gemm has {n} output channels, BN has {}",
        bn_aff.channels()
    );
    let c_name = gemm.input.get(2).filter(|s| !s.is_empty());
    let c = match c_name {
        None => None,
        Some(c) => Some(or_decline!(float_const(g, c)?, nodes, "C").0),
    };
    if let Some(c) = &c {
        let ok = !c.is_empty()
            && match c.shape() {
                [] => true,
                [k] => *k == 1 || *k == n,
                [_, k] => *k == 1 || *k == n,
                _ => false,
            };
        decline_unless!(
            ok,
            nodes,
            "C has shape {:?}, which does not broadcast to [M, {n}]",
            c.shape()
        );
    }
    let b2 = fold::fold_gemm_weight(&b, trans_b, &bn_aff);
    let c2 = fold::fold_gemm_bias(c.as_ref(), beta, &bn_aff);
    let mut patch = Patch::new(format!("fold {}", nodes.join("+")));
    let bname = write_const(g, &mut patch, names, &gemm.input[1], b2, bty)?;
    let cname = match c_name {
        Some(cn) if c.as_ref().is_some_and(|c| c.shape() == c2.shape()) => {
            write_const(g, &mut patch, names, cn, c2, bty)?
        }
        _ => new_const(
            &mut patch,
            names,
            &format!("{}_bias", gemm.input[1]),
            c2,
            bty,
        )?,
    };
    let mut fused = gemm.clone();
    fused.input = vec![gemm.input[0].clone(), bname, cname];
    fused.output = vec![bnn.output[0].clone()];
    attr::set(&mut fused, attr::make_float("beta", 1.0));
    patch.replace_node(p, fused).remove_node(bn);
    Ok(Some(Outcome::Rewrite(
        patch,
        folded(GroupKind::LinearBn, nodes, &bnn.output[0]),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::testing::*;
    use crate::onnx::proto::{AttributeProto, NodeProto};
    use crate::onnx::{ElemType, Model};

    const GAMMA: [f32; 4] = [1.5, -0.7, 0.9, 1.1];
    const BETA: [f32; 4] = [0.1, -0.2, 0.3, 0.0];
    const MEAN: [f32; 4] = [0.05, 0.1, -0.1, 0.2];
    const VAR: [f32; 4] = [0.5, 1.2, 0.8, 0.3];
    const C: [f32; 4] = [0.2, -0.1, 0.05, 0.4];

    fn s(o: usize) -> f64 {
        GAMMA[o] as f64 / (VAR[o] as f64 + 1e-5).sqrt()
    }

    fn shift(o: usize) -> f64 {
        BETA[o] as f64 - MEAN[o] as f64 * s(o)
    }

    fn bn(input: &str, attrs: Vec<AttributeProto>) -> NodeProto {
        node(
            "BatchNormalization",
            "bn",
            &[input, "g", "beta", "mean", "var"],
            &["y"],
            attrs,
        )
    }

    /// a [2, 3] -> Gemm(B, [C]; alpha 0.5, beta 2, transB) -> t [2, 4] -> BN -> y
    fn gemm_bn_model(trans_b: bool, c: Option<crate::onnx::TensorData>) -> Model {
        let b_shape: &[usize] = if trans_b { &[4, 3] } else { &[3, 4] };
        let mut inputs = vec!["a", "B"];
        let mut inits = vec![
            ("B", f32t(b_shape, seq(12, 4))),
            ("g", f32v(&GAMMA)),
            ("beta", f32v(&BETA)),
            ("mean", f32v(&MEAN)),
            ("var", f32v(&VAR)),
        ];
        if let Some(c) = c {
            inputs.push("C");
            inits.push(("C", c));
        }
        let attrs = vec![
            float("alpha", 0.5),
            float("beta", 2.0),
            int("transB", i64::from(trans_b)),
        ];
        model(
            vec![node("Gemm", "fc", &inputs, &["t"], attrs), bn("t", vec![])],
            inits,
            value_info("a", ElemType::F32, &[2, 3]),
            "y",
        )
    }

    fn a() -> crate::runtime::Sample {
        sample("a", &[2, 3], seq(6, 9))
    }

    fn check_fold(trans_b: bool) {
        let m = gemm_bn_model(trans_b, Some(f32v(&C)));
        let (f, rec) = rewrite(&m, "bn", gemm_bn);
        assert_eq!(rec.kind, GroupKind::LinearBn);
        assert_eq!(rec.nodes, ["fc", "bn"]);
        assert_eq!(rec.output, "y");
        assert_eq!(ops(&f), ["Gemm"]);
        let n = node_named(&f, "fc");
        assert_eq!(n.input[0], "a");
        assert_eq!(n.output, ["y"]);
        assert_eq!(attr::float(n, "beta", 0.0).unwrap(), 1.0);
        assert_eq!(attr::float(n, "alpha", 0.0).unwrap(), 0.5);
        let b = init(&m, "B").to_f64();
        let b2 = init(&f, &n.input[1]).to_f64();
        for k in 0..3 {
            for o in 0..4 {
                let idx = if trans_b { [o, k] } else { [k, o] };
                assert!((b[idx] * s(o) - b2[idx]).abs() < 1e-6, "B{idx:?}");
            }
        }
        // C' = (beta_g * C - mean) * s + beta
        let c2 = init(&f, &n.input[2]).to_f64();
        let want: Vec<f64> = (0..4)
            .map(|o| (2.0 * C[o] as f64 - MEAN[o] as f64) * s(o) + BETA[o] as f64)
            .collect();
        assert_all_close(c2.as_slice().unwrap(), &want, 1e-6);
        assert_same_output(&m, &f, &a(), 1e-4);
    }

    #[test]
    fn folds_gemm_bn_with_trans_b_1() {
        check_fold(true);
    }

    #[test]
    fn folds_gemm_bn_with_trans_b_0() {
        check_fold(false);
    }

    #[test]
    fn bias_shapes_absent_scalar_and_full() {
        // absent: a new [N] bias
        let m = gemm_bn_model(true, None);
        let (f, _) = rewrite(&m, "bn", gemm_bn);
        let n = node_named(&f, "fc");
        assert_eq!(n.input[2], "B_bias");
        let want: Vec<f64> = (0..4).map(shift).collect();
        assert_all_close(init(&f, "B_bias").to_f64().as_slice().unwrap(), &want, 1e-6);
        assert_same_output(&m, &f, &a(), 1e-4);
        // a scalar broadcasts: C' = beta_g * C * s + shift, per channel
        let m = gemm_bn_model(false, Some(f32_scalar(0.3)));
        let (f, _) = rewrite(&m, "bn", gemm_bn);
        let c2 = init(&f, &node_named(&f, "fc").input[2]).to_f64();
        let want: Vec<f64> = (0..4)
            .map(|o| 2.0 * 0.3f32 as f64 * s(o) + shift(o))
            .collect();
        assert_all_close(
            c2.iter().copied().collect::<Vec<_>>().as_slice(),
            &want,
            1e-6,
        );
        assert_same_output(&m, &f, &a(), 1e-4);
        // [M, N] keeps its shape
        let m = gemm_bn_model(true, Some(f32t(&[2, 4], seq(8, 5))));
        let (f, _) = rewrite(&m, "bn", gemm_bn);
        assert_eq!(init(&f, &node_named(&f, "fc").input[2]).shape(), [2, 4]);
        assert_same_output(&m, &f, &a(), 1e-4);
        // [M, 1] broadcasts along the channels
        let m = gemm_bn_model(false, Some(f32t(&[2, 1], vec![0.3, -0.6])));
        let (f, _) = rewrite(&m, "bn", gemm_bn);
        assert_same_output(&m, &f, &a(), 1e-4);
    }

    #[test]
    fn declines_shared_or_output_intermediate() {
        let mut m = gemm_bn_model(true, None);
        add_output(&mut m, "t");
        assert_eq!(declined(&m, "bn", gemm_bn).1, "'t' is a graph output");
        let mut m = gemm_bn_model(true, None);
        m.graph_mut()
            .node
            .push(node("Relu", "r", &["t"], &["r"], vec![]));
        add_output(&mut m, "r");
        let (nodes, reason) = declined(&m, "bn", gemm_bn);
        assert_eq!(nodes, ["fc", "bn"]);
        assert_eq!(reason, "'t' has 2 consumers");
    }

    #[test]
    fn declines_non_constant_b_bad_c_and_channel_mismatch() {
        let mut m = gemm_bn_model(true, None);
        make_overridable(&mut m, "B", ElemType::F32, &[4, 3]);
        assert_eq!(declined(&m, "bn", gemm_bn).1, "B 'B' is not a constant");
        let m = gemm_bn_model(true, Some(f32t(&[1, 2, 4], seq(8, 1))));
        assert!(declined(&m, "bn", gemm_bn)
            .1
            .starts_with("C has shape [1, 2, 4], which does not broadcast"));
        let m = gemm_bn_model(true, Some(f32v(&[0.1, 0.2])));
        assert!(declined(&m, "bn", gemm_bn).1.starts_with("C has shape [2]"));
        // transB = 1 with a [3, 4] B reads 3 output channels
        let mut m = gemm_bn_model(false, None);
        attr::set(&mut m.graph_mut().node[0], int("transB", 1));
        assert_eq!(
            declined(&m, "bn", gemm_bn).1,
            "Gemm has 3 output channels, BN has 4"
        );
        let mut m = gemm_bn_model(true, None);
        m.graph_mut().node[1] = bn("t", vec![int("training_mode", 1)]);
        assert_eq!(declined(&m, "bn", gemm_bn).1, "training_mode = 1");
    }

    #[test]
    fn does_not_apply_to_other_producers() {
        let mut m = gemm_bn_model(true, None);
        m.graph_mut().node[0].op_type = "MatMul".into();
        m.graph_mut().node[0].attribute.clear();
        not_applied(&m, "bn", gemm_bn);
        not_applied(&gemm_bn_model(true, None), "fc", gemm_bn);
    }

    #[test]
    fn malformed_nodes_do_not_apply() {
        let mut m = gemm_bn_model(true, None);
        m.graph_mut().node[0].input.truncate(1);
        not_applied(&m, "bn", gemm_bn);
        let mut m = gemm_bn_model(true, None);
        attr::set(&mut m.graph_mut().node[0], int("transB", 2));
        not_applied(&m, "bn", gemm_bn);
        let mut m = gemm_bn_model(true, None);
        m.graph_mut().node[1].input.truncate(4);
        not_applied(&m, "bn", gemm_bn);
    }
}
