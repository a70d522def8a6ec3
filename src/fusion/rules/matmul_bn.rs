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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::testing::*;
    use crate::onnx::proto::AttributeProto;
    use crate::onnx::{ElemType, Model, TensorData};

    const GAMMA: [f32; 4] = [1.5, -0.7, 0.9, 1.1];
    const BETA: [f32; 4] = [0.1, -0.2, 0.3, 0.0];
    const MEAN: [f32; 4] = [0.05, 0.1, -0.1, 0.2];
    const VAR: [f32; 4] = [0.5, 1.2, 0.8, 0.3];
    const BIAS: [f32; 4] = [0.2, -0.1, 0.05, 0.4];

    fn s(o: usize) -> f64 {
        GAMMA[o] as f64 / (VAR[o] as f64 + 1e-5).sqrt()
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

    /// x [2, 3] -> MatMul(W [3, 4]) -> mm [-> Add(b) -> t] -> BN -> y
    fn matmul_bn_model(bias: Option<TensorData>) -> Model {
        let mut nodes = vec![node("MatMul", "mm", &["x", "W"], &["mm"], vec![])];
        let mut inits = vec![
            ("W", f32t(&[3, 4], seq(12, 2))),
            ("g", f32v(&GAMMA)),
            ("beta", f32v(&BETA)),
            ("mean", f32v(&MEAN)),
            ("var", f32v(&VAR)),
        ];
        let last = match bias {
            Some(b) => {
                nodes.push(node("Add", "add", &["mm", "b"], &["t"], vec![]));
                inits.push(("b", b));
                "t"
            }
            None => "mm",
        };
        nodes.push(bn(last, vec![]));
        model(nodes, inits, value_info("x", ElemType::F32, &[2, 3]), "y")
    }

    fn x() -> crate::runtime::Sample {
        sample("x", &[2, 3], seq(6, 3))
    }

    fn check_weight(m: &Model, f: &Model) {
        let w = init(m, "W").to_f64();
        let w2 = init(f, &node_named(f, "mm").input[1]).to_f64();
        for k in 0..3 {
            for n in 0..4 {
                assert!((w[[k, n]] * s(n) - w2[[k, n]]).abs() < 1e-6, "W[{k}, {n}]");
            }
        }
    }

    #[test]
    fn folds_into_matmul_and_its_bias_add() {
        let m = matmul_bn_model(Some(f32v(&BIAS)));
        let (f, rec) = rewrite(&m, "bn", matmul_bn);
        assert_eq!(rec.kind, GroupKind::LinearBn);
        assert_eq!(rec.nodes, ["mm", "add", "bn"]);
        assert_eq!(rec.output, "y");
        assert_eq!(ops(&f), ["MatMul", "Add"]);
        let add = node_named(&f, "add");
        assert_eq!(add.output, ["y"]);
        assert_eq!(add.input[0], "mm");
        check_weight(&m, &f);
        // b' = b * s + shift = (b - mean) * s + beta
        let b2 = init(&f, &add.input[1]).to_f64();
        let want: Vec<f64> = (0..4)
            .map(|o| (BIAS[o] as f64 - MEAN[o] as f64) * s(o) + BETA[o] as f64)
            .collect();
        assert_all_close(b2.as_slice().unwrap(), &want, 1e-6);
        assert_same_output(&m, &f, &x(), 1e-4);
    }

    #[test]
    fn without_an_add_a_new_add_named_after_the_bn() {
        let m = matmul_bn_model(None);
        let (f, rec) = rewrite(&m, "bn", matmul_bn);
        assert_eq!(rec.nodes, ["mm", "bn"]);
        assert_eq!(ops(&f), ["MatMul", "Add"]);
        let add = node_named(&f, "bn");
        assert_eq!(add.op_type, "Add");
        assert_eq!(add.input, ["mm", "W_bias"]);
        assert_eq!(add.output, ["y"]);
        check_weight(&m, &f);
        let want: Vec<f64> = (0..4)
            .map(|o| BETA[o] as f64 - MEAN[o] as f64 * s(o))
            .collect();
        assert_all_close(init(&f, "W_bias").to_f64().as_slice().unwrap(), &want, 1e-6);
        assert_same_output(&m, &f, &x(), 1e-4);
    }

    #[test]
    fn scalar_and_row_biases_fold() {
        for b in [f32_scalar(0.25), f32t(&[1, 4], BIAS.to_vec())] {
            let m = matmul_bn_model(Some(b));
            let (f, _) = rewrite(&m, "bn", matmul_bn);
            assert_eq!(init(&f, &node_named(&f, "add").input[1]).shape(), [4]);
            assert_same_output(&m, &f, &x(), 1e-4);
        }
    }

    #[test]
    fn declines_when_the_input_is_not_known_to_be_2d() {
        let mut m = matmul_bn_model(None);
        m.graph_mut().input[0] = value_info("x", ElemType::F32, &[1, 2, 3]);
        assert!(declined(&m, "bn", matmul_bn)
            .1
            .starts_with("MatMul input 'x' is not known to be 2-D (rank Some(3))"));
        let mut m = matmul_bn_model(None);
        m.graph_mut().input[0] = untyped("x");
        assert!(declined(&m, "bn", matmul_bn).1.contains("(rank None)"));
    }

    #[test]
    fn declines_shared_intermediates() {
        let mut m = matmul_bn_model(Some(f32v(&BIAS)));
        add_output(&mut m, "mm");
        assert_eq!(declined(&m, "bn", matmul_bn).1, "'mm' is a graph output");
        let mut m = matmul_bn_model(Some(f32v(&BIAS)));
        m.graph_mut()
            .node
            .push(node("Relu", "r", &["t"], &["r"], vec![]));
        add_output(&mut m, "r");
        let (nodes, reason) = declined(&m, "bn", matmul_bn);
        assert_eq!(nodes, ["mm", "add", "bn"]);
        assert_eq!(reason, "'t' has 2 consumers");
    }

    #[test]
    fn declines_non_constant_weight_bad_bias_and_channel_mismatch() {
        let mut m = matmul_bn_model(None);
        make_overridable(&mut m, "W", ElemType::F32, &[3, 4]);
        assert_eq!(
            declined(&m, "bn", matmul_bn).1,
            "MatMul weight 'W' is not a constant"
        );
        let m = matmul_bn_model(Some(f32t(&[2, 4], seq(8, 1))));
        assert_eq!(declined(&m, "bn", matmul_bn).1, "bias has shape [2, 4]");
        let mut m = matmul_bn_model(None);
        m.graph_mut().initializer[0] = f32t(&[3, 5], seq(15, 2)).to_proto("W");
        assert_eq!(
            declined(&m, "bn", matmul_bn).1,
            "MatMul has 5 output columns, BN has 4 channels"
        );
    }

    #[test]
    fn does_not_apply_to_an_add_without_a_matmul() {
        let mut m = matmul_bn_model(Some(f32v(&BIAS)));
        m.graph_mut().node[0].op_type = "Sub".into();
        not_applied(&m, "bn", matmul_bn);
        not_applied(&matmul_bn_model(None), "mm", matmul_bn);
    }

    #[test]
    fn malformed_nodes_do_not_apply() {
        let mut m = matmul_bn_model(None);
        m.graph_mut().node[0].input.push("W".into());
        not_applied(&m, "bn", matmul_bn);
        let mut m = matmul_bn_model(Some(f32v(&BIAS)));
        m.graph_mut().node[1].input.truncate(1);
        not_applied(&m, "bn", matmul_bn);
        let mut m = matmul_bn_model(None);
        m.graph_mut().node[1].input.truncate(4);
        not_applied(&m, "bn", matmul_bn);
    }
}
