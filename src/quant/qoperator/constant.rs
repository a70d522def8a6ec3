//! QuantizeLinear or Identity of a constant  =>  the constant it computes.
//!
//! ```text
//! before:  w (float const) -> QuantizeLinear(scale, zp) -> wq      z (const) -> Identity -> z2
//! after:   wq (integer initializer)                                 z2 (initializer)
//! ```
//!
//! A PyTorch QAT export quantizes its float weights in the graph, and the exporter shares
//! deduplicated initializers (zero points among them) through Identity nodes; as constants,
//! the other rules see integer weights and constant zero points.
//!
//! Conditions: every input constant; per-tensor, or per-axis with one scale per slice of the
//! (in-range) axis; positive finite scales; 8-bit zero points; no blocked quantization.
//!
//! Formula (f32, as ONNX Runtime): `saturate(round_half_even(x / scale) + zero_point)`.

use ndarray::{ArrayD, IxDyn};

use super::common::*;
use crate::error::Result;
use crate::graph::{Graph, Patch};
use crate::onnx::attr::{self, defaults};
use crate::onnx::proto::NodeProto;
use crate::onnx::{ElemType, TensorData};

/// The value QuantizeLinear computes from constant inputs: `saturate(round_half_even(x / scale)
/// + zero_point)` in f32, per tensor or per axis, as ONNX Runtime does.
pub fn quantize_constant(g: &Graph, n: &NodeProto) -> Result<Option<TensorData>> {
    if n.input.len() < 2 || attr::int(n, "block_size", 0)? != 0 {
        return Ok(None);
    }
    let Some(TensorData::F32(x)) = g.constant(&n.input[0])? else {
        return Ok(None);
    };
    let Some(s) = f32s(g, &n.input[1])? else {
        return Ok(None);
    };
    let Some((z, _)) = zps(g, n.input.get(2).filter(|s| !s.is_empty()))? else {
        return Ok(None);
    };
    let Some(ty) = quantize_output_type(g, n) else {
        return Ok(None);
    };
    let (lo, hi) = match ty {
        ElemType::I8 => (-128.0, 127.0),
        ElemType::U8 => (0.0, 255.0),
        _ => return Ok(None),
    };
    let axis = attr::int(n, "axis", defaults::QDQ_AXIS)?;
    let axis = if axis < 0 {
        axis + x.ndim() as i64
    } else {
        axis
    };
    let axis_ok = axis >= 0 && (axis as usize) < x.ndim() && x.shape()[axis as usize] == s.len();
    if s.is_empty()
        || (s.len() > 1 && !axis_ok)
        || (z.len() != 1 && z.len() != s.len())
        || s.iter().any(|v| !(v.is_finite() && *v > 0.0))
    {
        return Ok(None);
    }
    let q = x.indexed_iter().map(|(idx, &v)| {
        let k = if s.len() == 1 { 0 } else { idx[axis as usize] };
        let zk = if z.len() == 1 { z[0] } else { z[k] };
        ((v / s[k]).round_ties_even() + zk as f32).clamp(lo, hi)
    });
    let shape = IxDyn(x.shape());
    Ok(Some(match ty {
        ElemType::I8 => TensorData::I8(
            ArrayD::from_shape_vec(shape, q.map(|v| v as i8).collect()).expect("shape"),
        ),
        _ => TensorData::U8(
            ArrayD::from_shape_vec(shape, q.map(|v| v as u8).collect()).expect("shape"),
        ),
    }))
}

/// QuantizeLinear of a constant (a PyTorch QAT export quantizes its float weights in the graph)
/// and Identity of a constant (the PyTorch exporter shares deduplicated initializers, zero points
/// among them, through Identity nodes) become the constant they compute, so the other rules see
/// integer weights and constant zero points.
pub fn constant_node(g: &Graph, i: usize) -> Result<Option<Outcome>> {
    let n = g.node(i);
    if n.output.len() != 1 || g.is_output(&n.output[0]) || n.input.is_empty() {
        return Ok(None);
    }
    let value = if is_op(n, "Identity") {
        g.constant(&n.input[0])?
    } else if is_op(n, "QuantizeLinear") {
        quantize_constant(g, n)?
    } else {
        None
    };
    let Some(value) = value else {
        return Ok(None);
    };
    let mut patch = Patch::new(format!("constant {}", label(n)));
    patch
        .remove_node(i)
        .add_initializer(value.to_proto(&n.output[0]));
    Ok(Some(converted(patch, vec![label(n)])))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::testing::*;
    use crate::onnx::{ElemType, Model};

    fn rule(g: &Graph, i: usize, _: &mut crate::graph::Names) -> Result<Option<Outcome>> {
        constant_node(g, i)
    }

    /// x [2, 3] + DQ(Q(w const; ws, wz)) -> y
    fn qconst_model(w: Vec<f32>, ws: TensorData, wz: TensorData, axis: Option<i64>) -> Model {
        let mut q = quantize("qw", "w", "ws", "wz", "wq");
        let dq = dequantize("dqw", "wq", "ws", "wz", "wd", axis);
        if let Some(a) = axis {
            q.attribute.push(int("axis", a));
        }
        model(
            vec![q, dq, node("Add", "add", &["x", "wd"], &["y"], vec![])],
            vec![("w", f32t(&[2, 3], w)), ("ws", ws), ("wz", wz)],
            value_info("x", ElemType::F32, &[2, 3]),
            "y",
        )
    }

    fn x() -> crate::runtime::Sample {
        sample("x", &[2, 3], seq(6, 4))
    }

    #[test]
    fn quantize_of_a_constant_becomes_its_integer_initializer() {
        // x / s = [0.5, -0.5, 1.5, 2.5, 200, -1.2]: half to even, then + zp, saturated
        let m = qconst_model(
            vec![0.25, -0.25, 0.75, 1.25, 100.0, -0.6],
            f32_scalar(0.5),
            i8_scalar(1),
            None,
        );
        let (f, rec) = rewrite(&m, "qw", rule);
        assert_eq!(rec.nodes, ["qw"]);
        assert!(rec.inexact.is_none());
        assert_eq!(ops(&f), ["DequantizeLinear", "Add"]);
        assert_eq!(init(&f, "wq"), i8t(&[2, 3], vec![1, 1, 3, 3, 127, 0]));
        assert_within_steps(&m, &f, &x(), 0.5, 1.0);
    }

    #[test]
    fn per_axis_quantize_uses_each_slice_parameters() {
        let m = qconst_model(
            vec![0.5, 0.5, 0.5, -1.0, 2.0, 300.0],
            f32v(&[0.5, 0.25, 1.0]),
            u8t(&[3], vec![0, 10, 128]),
            Some(1),
        );
        let (f, _) = rewrite(&m, "qw", rule);
        // column 0: x / 0.5 + 0; column 1: x / 0.25 + 10; column 2: x + 128, saturated
        assert_eq!(init(&f, "wq"), u8t(&[2, 3], vec![1, 12, 128, 0, 18, 255]));
        assert_within_steps(&m, &f, &x(), 0.25, 1.0);
    }

    #[test]
    fn identity_of_a_constant_becomes_that_constant() {
        let mut m = qconst_model(seq(6, 1), f32_scalar(0.1), i8_scalar(3), None);
        m.graph_mut()
            .node
            .insert(0, node("Identity", "id", &["wz"], &["wz2"], vec![]));
        m.graph_mut().node[2].input[2] = "wz2".into();
        let (f, rec) = rewrite(&m, "id", rule);
        assert_eq!(rec.nodes, ["id"]);
        assert_eq!(count(&f, "Identity"), 0);
        assert_eq!(init(&f, "wz2"), i8_scalar(3));
        assert_same_output(&m, &f, &x(), 1e-6);
    }

    #[test]
    fn non_constant_or_graph_output_values_stay() {
        let mut m = qconst_model(seq(6, 1), f32_scalar(0.1), i8_scalar(0), None);
        make_overridable(&mut m, "w", ElemType::F32, &[2, 3]);
        not_applied(&m, "qw", rule);
        let mut m = qconst_model(seq(6, 1), f32_scalar(0.1), i8_scalar(0), None);
        add_output(&mut m, "wq");
        not_applied(&m, "qw", rule);
    }

    #[test]
    fn invalid_scales_zero_points_or_axes_stay() {
        for s in [0.0, -0.5, f32::INFINITY] {
            not_applied(
                &qconst_model(seq(6, 1), f32_scalar(s), i8_scalar(0), None),
                "qw",
                rule,
            );
        }
        // two scales on an axis of three
        let m = qconst_model(seq(6, 1), f32v(&[0.1, 0.2]), i8_scalar(0), Some(1));
        not_applied(&m, "qw", rule);
        // two zero points for three scales
        let m = qconst_model(
            seq(6, 1),
            f32v(&[0.1, 0.2, 0.3]),
            i8t(&[2], vec![0, 0]),
            Some(1),
        );
        not_applied(&m, "qw", rule);
        // a 16-bit zero point
        let z = TensorData::I16(ndarray::arr0(0i16).into_dyn());
        not_applied(
            &qconst_model(seq(6, 1), f32_scalar(0.1), z, None),
            "qw",
            rule,
        );
        // blocked quantization
        let mut m = qconst_model(seq(6, 1), f32_scalar(0.1), i8_scalar(0), None);
        m.graph_mut().node[0].attribute.push(int("block_size", 2));
        not_applied(&m, "qw", rule);
    }

    #[test]
    fn malformed_nodes_stay() {
        let mut m = qconst_model(seq(6, 1), f32_scalar(0.1), i8_scalar(0), None);
        m.graph_mut().node[0].input.truncate(1);
        not_applied(&m, "qw", rule);
        let mut m = qconst_model(seq(6, 1), f32_scalar(0.1), i8_scalar(0), None);
        m.graph_mut().node[0].attribute.push(int("axis", 1000));
        not_applied(&m, "qw", rule);
        let mut m = qconst_model(seq(6, 1), f32_scalar(0.1), i8_scalar(0), None);
        m.graph_mut()
            .node
            .insert(0, node("Identity", "id", &["wz", "ws"], &["wz2"], vec![]));
        not_applied(&m, "id", rule);
        let mut m = qconst_model(seq(6, 1), f32_scalar(0.1), i8_scalar(0), None);
        m.graph_mut()
            .node
            .insert(0, node("Identity", "id", &["wz"], &[], vec![]));
        not_applied(&m, "id", rule);
    }

    #[test]
    fn a_negative_axis_counts_from_the_end() {
        let m = qconst_model(
            vec![0.5, 0.5, 0.5, -1.0, 2.0, 300.0],
            f32v(&[0.5, 0.25, 1.0]),
            u8t(&[3], vec![0, 10, 128]),
            Some(-1),
        );
        let (f, _) = rewrite(&m, "qw", rule);
        assert_eq!(init(&f, "wq"), u8t(&[2, 3], vec![1, 12, 128, 0, 18, 255]));
    }

    #[test]
    fn output_dtype_sets_the_type_without_a_zero_point() {
        let mut m = qconst_model(
            vec![-0.5, 0.5, -1.0, 1.0, 0.0, 0.2],
            f32_scalar(0.1),
            i8_scalar(0),
            None,
        );
        m.proto.opset_import[0].version = 21;
        m.graph_mut().node[1].input.truncate(2);
        let q = &mut m.graph_mut().node[0];
        q.input.truncate(2);
        q.attribute
            .push(int("output_dtype", ElemType::I8.onnx_code() as i64));
        match try_rule(&m, "qw", rule).unwrap() {
            None | Some(Outcome::Decline(..)) => {}
            Some(Outcome::Rewrite(patch, _)) => {
                let mut f = m.clone();
                patch.apply(f.graph_mut()).unwrap();
                assert_eq!(init(&f, "wq"), i8t(&[2, 3], vec![-5, 5, -10, 10, 0, 2]));
            }
        }
    }
}
