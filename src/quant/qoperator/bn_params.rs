//! BatchNormalization parameters behind DequantizeLinear of constants  =>  float initializers.
//!
//! ```text
//! before:  DQ(gq, gs) -> BatchNormalization.scale
//! after:   g (f32 initializer) -> BatchNormalization.scale
//! ```
//!
//! ONNX Runtime quantizes a BN's scale like a weight; as float constants, the BN rules can fold
//! them. Formula: `(q - zero_point) * scale`, per tensor or per axis.

use super::common::*;
use crate::error::Result;
use crate::graph::{Graph, Names, Patch};
use crate::onnx::TensorData;

/// BatchNormalization parameters behind DequantizeLinear of constants (ONNX Runtime quantizes
/// a BN's scale like a weight): replaced by their float values so the BN rules can fold them.
pub fn bn_params_to_float(g: &Graph, i: usize, names: &mut Names) -> Result<Option<Outcome>> {
    let n = g.node(i);
    if !is_op(n, "BatchNormalization") {
        return Ok(None);
    }
    let mut patch = Patch::new(format!("dequantize the parameters of {}", label(n)));
    let mut m = n.clone();
    let mut changed = false;
    for k in 1..n.input.len().min(5) {
        let Some(dq) = dq_of(g, &n.input[k]) else {
            continue;
        };
        let Some(v) = dequantized_f64(g, &dq)? else {
            continue;
        };
        let name = names.fresh(&format!("{}_float", n.input[k]));
        patch.add_initializer(TensorData::F32(v.mapv(|x| x as f32)).to_proto(&name));
        m.input[k] = name;
        drop_private_dq(g, &mut patch, &dq, i);
        changed = true;
    }
    if !changed {
        return Ok(None);
    }
    patch.replace_node(i, m);
    Ok(Some(converted(patch, vec![label(n)])))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::testing::*;
    use crate::onnx::{ElemType, Model};

    /// x [1, 2, 3, 3] -> BN(scale = DQ(gq; gs, gz), beta, mean, var) -> y
    fn bn_model(gs: TensorData, gz: TensorData, axis: Option<i64>) -> Model {
        model(
            vec![
                dequantize("dqg", "gq", "gs", "gz", "gd", axis),
                node(
                    "BatchNormalization",
                    "bn",
                    &["x", "gd", "beta", "mean", "var"],
                    &["y"],
                    vec![],
                ),
            ],
            vec![
                ("gq", i8t(&[2], vec![75, -35])),
                ("gs", gs),
                ("gz", gz),
                ("beta", f32v(&[0.1, -0.2])),
                ("mean", f32v(&[0.05, 0.1])),
                ("var", f32v(&[0.5, 1.2])),
            ],
            value_info("x", ElemType::F32, &[1, 2, 3, 3]),
            "y",
        )
    }

    fn x() -> crate::runtime::Sample {
        sample("x", &[1, 2, 3, 3], seq(18, 2))
    }

    #[test]
    fn dequantized_bn_scale_becomes_a_float_initializer() {
        let m = bn_model(f32_scalar(0.02), i8_scalar(5), None);
        let (f, rec) = rewrite(&m, "bn", bn_params_to_float);
        assert_eq!(rec.nodes, ["bn"]);
        assert_eq!(ops(&f), ["BatchNormalization"], "the private DQ is removed");
        let bn = node_named(&f, "bn");
        assert_eq!(bn.input[1], "gd_float");
        // (q - zp) * scale
        let g = init(&f, "gd_float");
        assert_eq!(g.elem_type(), ElemType::F32);
        assert_all_close(
            g.to_f64().as_slice().unwrap(),
            &[70.0 * 0.02, -40.0 * 0.02],
            1e-6,
        );
        assert_same_output(&m, &f, &x(), 1e-6);
    }

    #[test]
    fn per_axis_parameters_and_a_shared_dq() {
        let mut m = bn_model(f32v(&[0.02, 0.05]), i8t(&[2], vec![0, -5]), Some(0));
        // the DQ output is also read by another node: it stays for that reader
        m.graph_mut()
            .node
            .push(node("Identity", "id", &["gd"], &["gd2"], vec![]));
        add_output(&mut m, "gd2");
        let (f, _) = rewrite(&m, "bn", bn_params_to_float);
        assert_eq!(count(&f, "DequantizeLinear"), 1);
        let g = init(&f, &node_named(&f, "bn").input[1]).to_f64();
        assert_all_close(g.as_slice().unwrap(), &[75.0 * 0.02, -30.0 * 0.05], 1e-6);
    }

    #[test]
    fn float_or_non_constant_parameters_stay() {
        // every parameter already float
        let mut m = bn_model(f32_scalar(0.02), i8_scalar(0), None);
        m.graph_mut().node.remove(0);
        m.graph_mut().node[0].input[1] = "beta".into();
        not_applied(&m, "bn", bn_params_to_float);
        // DQ of a non-constant
        let mut m = bn_model(f32_scalar(0.02), i8_scalar(0), None);
        make_overridable(&mut m, "gq", ElemType::I8, &[2]);
        not_applied(&m, "bn", bn_params_to_float);
        // per-axis scales that do not fit the tensor
        let m = bn_model(f32v(&[0.02, 0.05, 0.1]), i8_scalar(0), Some(0));
        not_applied(&m, "bn", bn_params_to_float);
    }

    #[test]
    fn malformed_nodes_stay() {
        let mut m = bn_model(f32_scalar(0.02), i8_scalar(0), None);
        m.graph_mut().node[1].input.truncate(4);
        not_applied(&m, "bn", bn_params_to_float);
        // a DQ with an axis outside the spec's range is not matched
        let m = bn_model(f32_scalar(0.02), i8_scalar(0), Some(1000));
        not_applied(&m, "bn", bn_params_to_float);
    }
}
