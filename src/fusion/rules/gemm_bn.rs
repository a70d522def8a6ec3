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
