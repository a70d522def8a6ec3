//! DQ -> data movement -> Q  =>  the op on the 8-bit tensor.
//!
//! ```text
//! before:  xq -> DQ -> Reshape -> Q -> yq          xq -> DQ -> Split -> Q -> aq
//!                                                                    \-> Q -> bq
//! after:   xq -> Reshape -> yq                     xq -> Split -> aq, bq
//! ```
//!
//! Ops: Reshape, Flatten, Transpose, Squeeze, Unsqueeze, Split, Slice, Gather (every
//! standard-domain version from opset 10 takes 8-bit tensors), MaxPool from opset 12 and Pad
//! from opset 11 (where each starts to take them), Resize in `nearest` mode (it copies input
//! values). Below those opsets the op stays between DQ and Q: an 8-bit MaxPool in an opset-11
//! model is refused by `onnx.checker` and by ONNX Runtime. DepthToSpace and SpaceToDepth
//! stay between DQ and Q: ONNX allows them on 8-bit tensors, but ONNX Runtime 1.20 has no such
//! kernel, and a QOperator model must run there too.
//!
//! Conditions: every output goes to one QuantizeLinear with the same per-tensor scale and the
//! same zero point as the DQ before the op, so the op commutes with (de)quantization exactly.
//! Pad in `constant` mode pads with a value `c`: its 8-bit form pads with `q = c / scale + zp`,
//! which is exact only when `q` is an integer of the grid (c = 0 gives the zero point); another
//! `c` is declined. Gather's data input and Slice's, Resize's and Pad's first input are the
//! quantized ones; their other inputs (indices, starts, sizes, pads) are read as they are.

use super::common::*;
use crate::error::Result;
use crate::graph::{Graph, Names, Patch};
use crate::onnx::attr;
use crate::onnx::{ElemType, TensorData};

pub const DATA_MOVEMENT: &[&str] = &[
    "Reshape",
    "Flatten",
    "Transpose",
    "Squeeze",
    "Unsqueeze",
    "MaxPool",
    "Split",
    "Slice",
    "Gather",
    "Resize",
    "Pad",
];

/// The 8-bit pad value of a constant-mode Pad with per-tensor input parameters `(scale, zp)`
/// on the grid of `ty`: `Ok(None)` when the Pad is not constant-mode (or pads with 0 and the
/// zero point is 0, so no value input is needed), `Err` when the float value has no exact code.
fn pad_code(
    g: &Graph,
    n: &crate::onnx::proto::NodeProto,
    scale: f32,
    zp: i64,
    ty: ElemType,
) -> Result<std::result::Result<Option<i64>, String>> {
    let mode = attr::string(n, "mode")?.unwrap_or_else(|| "constant".into());
    if mode != "constant" {
        return Ok(Ok(None));
    }
    let c = match n.input.get(2).filter(|s| !s.is_empty()) {
        None => 0.0,
        Some(name) => match g.constant(name)?.map(|t| t.to_f64()) {
            Some(v) if v.len() == 1 => v.iter().copied().next().unwrap_or(0.0),
            _ => return Ok(Err("its pad value is not a constant scalar".into())),
        },
    };
    let q = c / scale as f64 + zp as f64;
    let (lo, hi) = if ty == ElemType::I8 {
        (-128.0, 127.0)
    } else {
        (0.0, 255.0)
    };
    if q.fract() != 0.0 || q < lo || q > hi {
        return Ok(Err(format!(
            "its pad value {c} is not on the 8-bit grid (scale {scale}, zero point {zp})"
        )));
    }
    Ok(Ok((q != 0.0
        || n.input.get(2).is_some_and(|s| !s.is_empty()))
    .then_some(q as i64)))
}

/// DQ -> data movement -> Q with the same parameters  =>  the op on the 8-bit tensor.
/// `opset` is the model's (Pad takes 8-bit tensors from 11, MaxPool from 12).
pub fn data_movement(
    g: &Graph,
    i: usize,
    names: &mut Names,
    opset: i64,
) -> Result<Option<Outcome>> {
    let n = g.node(i);
    if !DATA_MOVEMENT.iter().any(|op| is_op(n, op)) {
        return Ok(None);
    }
    let op = n.op_type.as_str();
    let multi_output = op == "Split";
    if !multi_output && n.output.len() != 1 {
        return Ok(None); // MaxPool with its indices
    }
    if op == "Resize" && attr::string(n, "mode")?.is_some_and(|m| m != "nearest") {
        return Ok(None);
    }
    if (op == "Pad" && opset < 11) || (op == "MaxPool" && opset < 12) {
        return Ok(None);
    }
    let Some(x) = dq_of(g, &n.input[0]) else {
        return Ok(None);
    };
    let mut qs = Vec::with_capacity(n.output.len());
    for o in &n.output {
        match q_after(g, o) {
            Some(q) => qs.push(q),
            None => return Ok(None),
        }
    }
    let x_scale = f32s(g, &x.scale)?;
    let x_zp = zps(g, x.zp.as_ref())?;
    let Some(scale) = x_scale.as_ref().filter(|s| s.len() == 1).map(|s| s[0]) else {
        return Ok(None);
    };
    for q in &qs {
        if f32s(g, &q.scale)? != x_scale || zps(g, q.zp.as_ref())? != x_zp {
            return Ok(None);
        }
    }
    let mut patch = Patch::new(format!("8-bit {}", label(n)));
    let mut m = n.clone();
    m.input[0] = x.q.clone();
    m.output = qs.iter().map(|q| q.output.clone()).collect();
    if op == "Pad" {
        let Some((zp, ty)) = x_zp.as_ref().and_then(|(z, t)| Some((*z.first()?, *t))) else {
            return Ok(None);
        };
        match pad_code(g, n, scale, zp, ty)? {
            Err(why) => return Ok(Some(decline(label(n), why))),
            Ok(None) => {}
            Ok(Some(code)) => {
                let name = names.fresh(&format!("{}_pad_value", label(n)));
                let t = if ty == ElemType::I8 {
                    TensorData::I8(ndarray::arr0(code as i8).into_dyn())
                } else {
                    TensorData::U8(ndarray::arr0(code as u8).into_dyn())
                };
                patch.add_initializer(t.to_proto(&name));
                while m.input.len() < 3 {
                    m.input.push(String::new());
                }
                m.input[2] = name;
            }
        }
    }
    patch.replace_node(i, m);
    for q in &qs {
        patch.remove_node(q.node);
    }
    drop_private_dq(g, &mut patch, &x, i);
    Ok(Some(converted(patch, vec![label(n)])))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::testing::*;
    use crate::onnx::proto::NodeProto;
    use crate::onnx::{ElemType, Model, TensorData};

    fn rule(g: &Graph, i: usize, names: &mut crate::graph::Names) -> Result<Option<Outcome>> {
        data_movement(g, i, names, 13)
    }

    /// x [1, 2, 4, 4] -> Q -> DQ -> op -> Q(ys, yz) -> DQ -> y
    fn dm_model(op: NodeProto, ys: f32, yz: u8) -> Model {
        model(
            vec![
                quantize("qx", "x", "xs", "xz", "xq"),
                dequantize("dqx", "xq", "xs", "xz", "xd", None),
                op,
                quantize("qy", "t", "ys", "yz", "yq"),
                dequantize("dqy", "yq", "ys", "yz", "y", None),
            ],
            vec![
                ("xs", f32_scalar(0.02)),
                ("xz", u8_scalar(128)),
                ("ys", f32_scalar(ys)),
                ("yz", u8_scalar(yz)),
                (
                    "shape",
                    TensorData::I64(ndarray::arr1(&[2i64, 16]).into_dyn()),
                ),
            ],
            value_info("x", ElemType::F32, &[1, 2, 4, 4]),
            "y",
        )
    }

    fn transpose() -> NodeProto {
        node(
            "Transpose",
            "op",
            &["xd"],
            &["t"],
            vec![ints("perm", &[0, 2, 3, 1])],
        )
    }

    fn x() -> crate::runtime::Sample {
        sample("x", &[1, 2, 4, 4], seq(32, 1))
    }

    #[test]
    fn maxpool_stays_float_below_opset_12() {
        let mp = node(
            "MaxPool",
            "op",
            &["xd"],
            &["t"],
            vec![ints("kernel_shape", &[2, 2])],
        );
        let m = dm_model(mp, 0.02, 128);
        not_applied(&m, "op", |g: &Graph, i, names: &mut crate::graph::Names| {
            data_movement(g, i, names, 11)
        });
        let (f, rec) = rewrite(&m, "op", |g: &Graph, i, names: &mut crate::graph::Names| {
            data_movement(g, i, names, 12)
        });
        assert_eq!(rec.nodes, ["op"]);
        assert_eq!(node_named(&f, "op").input[0], "xq");
    }

    #[test]
    fn transpose_reshape_and_maxpool_run_on_8_bit_tensors() {
        let ops_ = [
            transpose(),
            node("Reshape", "op", &["xd", "shape"], &["t"], vec![]),
            node(
                "MaxPool",
                "op",
                &["xd"],
                &["t"],
                vec![ints("kernel_shape", &[2, 2])],
            ),
            node("Flatten", "op", &["xd"], &["t"], vec![]),
        ];
        for op in ops_ {
            let kind = op.op_type.clone();
            let m = dm_model(op, 0.02, 128);
            let (f, rec) = rewrite(&m, "op", rule);
            assert_eq!(rec.nodes, ["op"]);
            assert_eq!(
                ops(&f),
                ["QuantizeLinear", kind.as_str(), "DequantizeLinear"]
            );
            let n = node_named(&f, "op");
            assert_eq!(n.input[0], "xq");
            assert_eq!(n.output, ["yq"]);
            assert_within_steps(&m, &f, &x(), 0.02, 0.0);
        }
    }

    fn pads() -> TensorData {
        TensorData::I64(ndarray::arr1(&[0i64, 0, 1, 1, 0, 0, 1, 1]).into_dyn())
    }

    #[test]
    fn pad_with_zero_pads_with_the_zero_point_on_8_bit_tensors() {
        let mut m = dm_model(
            node("Pad", "op", &["xd", "pads"], &["t"], vec![]),
            0.02,
            128,
        );
        set_init(&mut m, "pads", pads());
        let (f, rec) = rewrite(&m, "op", rule);
        assert_eq!(rec.nodes, ["op"]);
        let n = node_named(&f, "op");
        assert_eq!(n.input[0], "xq");
        // the float 0 is the code 128
        assert_eq!(init(&f, &n.input[2]), u8_scalar(128));
        assert_within_steps(&m, &f, &x(), 0.02, 0.0);
        // reflect mode needs no value
        let mut m = dm_model(
            node(
                "Pad",
                "op",
                &["xd", "pads"],
                &["t"],
                vec![string("mode", "reflect")],
            ),
            0.02,
            128,
        );
        set_init(&mut m, "pads", pads());
        let (f, _) = rewrite(&m, "op", rule);
        assert_eq!(node_named(&f, "op").input.len(), 2);
        assert_within_steps(&m, &f, &x(), 0.02, 0.0);
    }

    #[test]
    fn pad_with_a_value_off_the_grid_is_declined() {
        // 0.04 = 2 steps: code 130, exact
        let mut m = dm_model(
            node("Pad", "op", &["xd", "pads", "v"], &["t"], vec![]),
            0.02,
            128,
        );
        set_init(&mut m, "pads", pads());
        set_init(&mut m, "v", f32_scalar(0.04));
        let (f, _) = rewrite(&m, "op", rule);
        assert_eq!(init(&f, &node_named(&f, "op").input[2]), u8_scalar(130));
        assert_within_steps(&m, &f, &x(), 0.02, 0.0);
        set_init(&mut m, "v", f32_scalar(0.05));
        let (_, why) = declined(&m, "op", rule);
        assert!(why.contains("not on the 8-bit grid"), "{why}");
    }

    #[test]
    fn split_runs_on_8_bit_tensors_when_every_output_is_requantized_alike() {
        let mut m = model(
            vec![
                quantize("qx", "x", "xs", "xz", "xq"),
                dequantize("dqx", "xq", "xs", "xz", "xd", None),
                node(
                    "Split",
                    "op",
                    &["xd", "parts"],
                    &["a", "b"],
                    vec![int("axis", 1)],
                ),
                quantize("qa", "a", "xs", "xz", "aq"),
                quantize("qb", "b", "xs", "xz", "bq"),
                dequantize("dqa", "aq", "xs", "xz", "ad", None),
                dequantize("dqb", "bq", "xs", "xz", "y", None),
            ],
            vec![
                ("xs", f32_scalar(0.02)),
                ("xz", u8_scalar(128)),
                (
                    "parts",
                    TensorData::I64(ndarray::arr1(&[1i64, 1]).into_dyn()),
                ),
            ],
            value_info("x", ElemType::F32, &[1, 2, 4, 4]),
            "y",
        );
        add_output(&mut m, "ad");
        let (f, _) = rewrite(&m, "op", rule);
        let n = node_named(&f, "op");
        assert_eq!(n.input[0], "xq");
        assert_eq!(n.output, ["aq", "bq"]);
        assert_eq!(count(&f, "QuantizeLinear"), 1);
        assert_within_steps(&m, &f, &x(), 0.02, 0.0);
        // one output requantized differently: not converted
        set_init(&mut m, "ys", f32_scalar(0.04));
        m.graph_mut().node[4].input[1] = "ys".into();
        not_applied(&m, "op", rule);
    }

    #[test]
    fn only_a_nearest_resize_runs_on_8_bit_tensors() {
        let scales = TensorData::F32(ndarray::arr1(&[1.0f32, 1.0, 2.0, 2.0]).into_dyn());
        let mut m = dm_model(
            node("Resize", "op", &["xd", "", "sc"], &["t"], vec![]),
            0.02,
            128,
        );
        set_init(&mut m, "sc", scales.clone());
        let (f, _) = rewrite(&m, "op", rule);
        assert_eq!(node_named(&f, "op").input[0], "xq");
        assert_within_steps(&m, &f, &x(), 0.02, 0.0);
        let mut m = dm_model(
            node(
                "Resize",
                "op",
                &["xd", "", "sc"],
                &["t"],
                vec![string("mode", "linear")],
            ),
            0.02,
            128,
        );
        set_init(&mut m, "sc", scales);
        not_applied(&m, "op", rule);
    }

    #[test]
    fn a_shared_dq_stays_for_its_other_reader() {
        let mut m = dm_model(transpose(), 0.02, 128);
        m.graph_mut()
            .node
            .push(node("Relu", "r", &["xd"], &["r"], vec![]));
        add_output(&mut m, "r");
        let (f, _) = rewrite(&m, "op", rule);
        assert_eq!(count(&f, "DequantizeLinear"), 2);
        assert_eq!(node_named(&f, "op").input[0], "xq");
    }

    #[test]
    fn different_scales_or_zero_points_stay() {
        not_applied(&dm_model(transpose(), 0.04, 128), "op", rule);
        not_applied(&dm_model(transpose(), 0.02, 127), "op", rule);
        // per-axis scales on both sides
        let mut m = dm_model(transpose(), 0.02, 128);
        set_init(&mut m, "xs", f32v(&[0.02, 0.02]));
        set_init(&mut m, "ys", f32v(&[0.02, 0.02]));
        not_applied(&m, "op", rule);
    }

    #[test]
    fn no_q_after_or_no_dq_before_stays() {
        // the op output is read twice
        let mut m = dm_model(transpose(), 0.02, 128);
        m.graph_mut()
            .node
            .push(node("Relu", "r", &["t"], &["r"], vec![]));
        add_output(&mut m, "r");
        not_applied(&m, "op", rule);
        // the input is not dequantized
        let mut m = dm_model(transpose(), 0.02, 128);
        m.graph_mut().node[2].input[0] = "x".into();
        not_applied(&m, "op", rule);
        // MaxPool with its indices output
        let mut mp = node(
            "MaxPool",
            "op",
            &["xd"],
            &["t", "idx"],
            vec![ints("kernel_shape", &[2, 2])],
        );
        mp.output[1] = "idx".into();
        not_applied(&dm_model(mp, 0.02, 128), "op", rule);
        // an op that is not data movement
        not_applied(
            &dm_model(node("Sigmoid", "op", &["xd"], &["t"], vec![]), 0.02, 128),
            "op",
            rule,
        );
    }

    #[test]
    fn malformed_nodes_stay() {
        let mut t = transpose();
        t.input.push("shape".into());
        not_applied(&dm_model(t, 0.02, 128), "op", rule);
        let mp = node("MaxPool", "op", &["xd"], &["t"], vec![]);
        not_applied(&dm_model(mp, 0.02, 128), "op", rule);
        let mut t = transpose();
        t.attribute.push(int("perm", 1));
        not_applied(&dm_model(t, 0.02, 128), "op", rule);
    }
}
