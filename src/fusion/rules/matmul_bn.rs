//! MatMul [-> Add bias] -> BatchNormalization (a Linear exported as MatMul + Add).
//!
//! ```text
//! before:  X [M, K] -> MatMul(W [K, N]) [-> Add(b)] -> T -> BatchNormalization -> Y
//! after:   X -> MatMul(W') -> Add(b') -> Y   (a new Add, named after the BN, when there was none)
//! ```
//!
//! Conditions: the shared ones (`super`) for every intermediate, a constant 2-D weight with `N`
//! columns equal to BN's channels, an input known to be 2-D (so BN's channel axis is the last
//! one), and a bias that is a scalar, `[N]` or `[1, N]`.
//!
//! Formula: `W'[:, n] = W[:, n] * s[n]`, `b' = b * s + shift` (a missing bias is zero).

use ndarray::Array1;

use super::{
    bn_affine, decline_unless, float_const, folded, is_op, known_rank, label, new_const,
    or_decline, single_use, write_const, Outcome,
};
use crate::error::Result;
use crate::fusion::fold;
use crate::fusion::patterns::GroupKind;
use crate::graph::{Graph, Names, Patch};
use crate::onnx::proto::NodeProto;

/// Folds the BN at node `bn` into the MatMul (and its bias Add) before it.
pub fn matmul_bn(g: &Graph, bn: usize, names: &mut Names) -> Result<Option<Outcome>> {
    let bnn = g.node(bn);
    if !is_op(bnn, "BatchNormalization") {
        return Ok(None);
    }
    let Some(p) = g.producer(&bnn.input[0]) else {
        return Ok(None);
    };
    let (mm_idx, add_idx) = if is_op(g.node(p), "MatMul") {
        (p, None)
    } else if is_op(g.node(p), "Add") {
        let add = g.node(p);
        let mm = add
            .input
            .iter()
            .filter_map(|i| g.producer(i))
            .find(|&q| is_op(g.node(q), "MatMul"));
        match mm {
            Some(q) => (q, Some(p)),
            None => return Ok(None),
        }
    } else {
        return Ok(None);
    };
    let mm = g.node(mm_idx);
    let mut nodes = vec![label(mm)];
    if let Some(a) = add_idx {
        nodes.push(label(g.node(a)));
    }
    nodes.push(label(bnn));
    if let Some(r) = single_use(g, &mm.output[0]) {
        decline_unless!(false, nodes, "{r}");
    }
    if let Some(a) = add_idx {
        if let Some(r) = single_use(g, &g.node(a).output[0]) {
            decline_unless!(false, nodes, "{r}");
        }
    }
    let bn_aff = or_decline!(bn_affine(g, bn)?, nodes);
    let (w, wty) = or_decline!(float_const(g, &mm.input[1])?, nodes, "MatMul weight");
    decline_unless!(w.ndim() == 2, nodes, "MatMul weight has rank {}", w.ndim());
    let n = w.shape()[1];
    decline_unless!(
        n == bn_aff.channels(),
        nodes,
        "MatMul has {n} output columns, BN has {} channels",
        bn_aff.channels()
    );
    let rank = known_rank(g, &mm.input[0]);
    decline_unless!(
        rank == Some(2),
        nodes,
        "MatMul input '{}' is not known to be 2-D (rank {:?}): BN's channel axis would not be the last axis",
        mm.input[0],
        rank
    );
    let (bias_name, bias) = match add_idx {
        None => (None, None),
        Some(a) => {
            let add = g.node(a);
            let other = add
                .input
                .iter()
                .find(|i| **i != mm.output[0])
                .cloned()
                .unwrap_or_default();
            let (b, _) = or_decline!(float_const(g, &other)?, nodes, "Add operand");
            let ok = b.len() == n && (b.ndim() == 1 || (b.ndim() == 2 && b.shape()[0] == 1))
                || b.len() == 1;
            decline_unless!(ok, nodes, "bias has shape {:?}", b.shape());
            let v: Array1<f64> = if b.len() == 1 {
                Array1::from_elem(n, b.iter().next().copied().unwrap_or(0.0))
            } else {
                b.iter().copied().collect()
            };
            (Some(other), Some(v))
        }
    };
    let w2 = fold::fold_gemm_weight(&w, false, &bn_aff);
    let b2 = bn_aff.fold_bias(bias.as_ref()).into_dyn();
    let mut patch = Patch::new(format!("fold {}", nodes.join("+")));
    let wname = write_const(g, &mut patch, names, &mm.input[1], w2, wty)?;
    let mut new_mm = mm.clone();
    new_mm.input[1] = wname;
    patch.replace_node(mm_idx, new_mm);
    match (add_idx, bias_name) {
        (Some(a), Some(bn_name)) => {
            let add = g.node(a);
            let same_shape = g.constant(&bn_name)?.is_some_and(|t| t.shape() == [n]);
            let bname = if same_shape {
                write_const(g, &mut patch, names, &bn_name, b2, wty)?
            } else {
                new_const(&mut patch, names, &format!("{bn_name}_fused"), b2, wty)?
            };
            let mut new_add = add.clone();
            new_add.input = vec![mm.output[0].clone(), bname];
            new_add.output = vec![bnn.output[0].clone()];
            patch.replace_node(a, new_add);
        }
        _ => {
            let bname = new_const(&mut patch, names, &format!("{}_bias", mm.input[1]), b2, wty)?;
            let mut add = NodeProto::new();
            add.op_type = "Add".into();
            add.name = if bnn.name.is_empty() {
                names.fresh("Add")
            } else {
                bnn.name.clone()
            };
            add.input = vec![mm.output[0].clone(), bname];
            add.output = vec![bnn.output[0].clone()];
            patch.add_node(add);
        }
    }
    patch.remove_node(bn);
    Ok(Some(Outcome::Rewrite(
        patch,
        folded(GroupKind::LinearBn, nodes, &bnn.output[0]),
    )))
}
