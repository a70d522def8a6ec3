//! DQ(A), DQ(B const), [C] -> Gemm [-> Relu] -> Q  =>  Unsqueeze -> 1-wide QLinearConv ->
//! Squeeze, all on 8-bit tensors.
//!
//! ```text
//! before:  aq -> DQ -> Gemm(DQ(bq), C) [-> Relu] -> Q -> yq
//! after:   aq -> Unsqueeze(2) -> QLinearConv(W [N, K, 1], b_int32) -> Squeeze(2) -> yq
//! ```
//!
//! Why: tract has no integer Gemm with a bias, QLinearMatMul has no bias input (adding it in
//! float would need a float island and a second requantization), and a 1-D QLinearConv carries
//! the int32 bias and per-channel scales exactly.
//!
//! Conditions: `transA = 0`; per-tensor A and y scales; a constant rank-2 8-bit B, per tensor or
//! per output channel (axis 0 when `transB`, else 1) with one scale per channel; C absent or
//! per output channel.
//!
//! Formula: `alpha` folds into the weight scales (`w_scale * alpha`), `beta` into C; the bias is
//! int32 at scale `a_scale * w_scale[o]`.

use ndarray::{ArrayD, IxDyn};

use super::common::*;
use crate::error::Result;
use crate::graph::{Graph, Names, Patch};
use crate::onnx::attr::{self, defaults};
use crate::onnx::{ElemType, TensorData};

/// DQ(A), DQ(B), [C] -> Gemm [-> Relu] -> Q  =>  Unsqueeze -> 1-D QLinearConv -> Squeeze.
pub fn gemm(g: &Graph, i: usize, names: &mut Names, opset: i64) -> Result<Option<Outcome>> {
    let n = g.node(i);
    if !is_op(n, "Gemm") {
        return Ok(None);
    }
    if attr::int(n, "transA", 0)? != 0 {
        return Ok(None);
    }
    let (Some(a), Some(b)) = (dq_of(g, &n.input[0]), dq_of(g, &n.input[1])) else {
        return Ok(None);
    };
    let Some(xs) = f32s(g, &a.scale)?.filter(|s| s.len() == 1) else {
        return Ok(None);
    };
    let Some(bq) = g.constant(&b.q)? else {
        return Ok(None);
    };
    if bq.shape().len() != 2 || !matches!(bq.elem_type(), ElemType::I8 | ElemType::U8) {
        return Ok(None);
    }
    let Some(bs) = f32s(g, &b.scale)? else {
        return Ok(None);
    };
    let trans_b = attr::int(n, "transB", 0)? != 0;
    let out_axis = if trans_b { 0 } else { 1 };
    if bs.len() > 1 && b.axis != out_axis as i64 {
        return Ok(None);
    }
    let Some((bz, _)) = zps(g, b.zp.as_ref())? else {
        return Ok(None);
    };
    if params_fit(bq.shape(), out_axis as i64, bs.len(), bz.len()).is_none() {
        return Ok(None);
    }
    let bz_ty = bq.elem_type();
    let Some((q, relu)) = output_chain(g, &n.output[0])? else {
        return Ok(None);
    };
    if f32s(g, &q.scale)?.is_none_or(|s| s.len() != 1) {
        return Ok(None);
    }
    let alpha = attr::float(n, "alpha", defaults::GEMM_ALPHA)?;
    let beta = attr::float(n, "beta", defaults::GEMM_BETA)? as f64;
    let channels = bq.shape()[out_axis];
    let w_scales: Vec<f32> = bs.iter().map(|s| s * alpha).collect();
    if let Some(cname) = n.input.get(2).filter(|s| !s.is_empty()) {
        let shape = match dq_of(g, cname) {
            Some(dq) => g.constant(&dq.q)?.map(|t| t.shape().to_vec()),
            None => g.constant(cname)?.map(|t| t.shape().to_vec()),
        };
        let per_channel = matches!(
            shape.as_deref(),
            Some([]) | Some([1]) | Some([_]) | Some([1, _])
        );
        if !per_channel
            || shape.as_ref().is_some_and(|s| {
                s.iter().product::<usize>() != channels && s.iter().product::<usize>() != 1
            })
        {
            return Ok(Some(decline(
                label(n),
                "Gemm C is not a per-output-channel bias".into(),
            )));
        }
    }
    let bias = match int32_bias(
        g,
        n.input.get(2).filter(|s| !s.is_empty()),
        xs[0],
        &w_scales,
        channels,
        beta,
    )? {
        None => return Ok(None),
        Some(Err(reason)) => return Ok(Some(decline(label(n), reason))),
        Some(Ok(v)) => v,
    };
    // Weight [N, K, 1] for the 1-D convolution, scales per output channel.
    let w = bq.to_i64().expect("integer weights");
    let (r, c) = (bq.shape()[0], bq.shape()[1]);
    let (nn, k) = if trans_b { (r, c) } else { (c, r) };
    let mut wt = vec![0i64; nn * k];
    for o in 0..nn {
        for j in 0..k {
            wt[o * k + j] = if trans_b { w[o * c + j] } else { w[j * c + o] };
        }
    }
    let mut patch = Patch::new(format!("Gemm as QLinearConv {}", label(n)));
    let wname = names.fresh(&format!("{}_conv", b.q));
    let wdata = match bq.elem_type() {
        ElemType::I8 => TensorData::I8(
            ArrayD::from_shape_vec(IxDyn(&[nn, k, 1]), wt.iter().map(|&v| v as i8).collect())
                .expect("w"),
        ),
        _ => TensorData::U8(
            ArrayD::from_shape_vec(IxDyn(&[nn, k, 1]), wt.iter().map(|&v| v as u8).collect())
                .expect("w"),
        ),
    };
    patch.add_initializer(wdata.to_proto(&wname));
    let per = w_scales.len() > 1;
    let sname = names.fresh(&format!("{}_conv_scale", b.q));
    let sdata = if per {
        TensorData::F32(ArrayD::from_shape_vec(IxDyn(&[nn]), w_scales.clone()).expect("s"))
    } else {
        TensorData::F32(ndarray::arr0(w_scales[0]).into_dyn())
    };
    patch.add_initializer(sdata.to_proto(&sname));
    let zname = names.fresh(&format!("{}_conv_zero_point", b.q));
    let zshape: Vec<usize> = if bz.len() > 1 { vec![bz.len()] } else { vec![] };
    let zdata = match bz_ty {
        ElemType::I8 => TensorData::I8(
            ArrayD::from_shape_vec(IxDyn(&zshape), bz.iter().map(|&v| v as i8).collect())
                .expect("z"),
        ),
        _ => TensorData::U8(
            ArrayD::from_shape_vec(IxDyn(&zshape), bz.iter().map(|&v| v as u8).collect())
                .expect("z"),
        ),
    };
    patch.add_initializer(zdata.to_proto(&zname));
    let bname = int32_initializer(&mut patch, names, &format!("{}_bias_int32", label(n)), bias);
    let x_zp = zero_point_input(g, &mut patch, names, a.zp.as_ref(), &a.q);
    let y_zp = zero_point_input(g, &mut patch, names, q.zp.as_ref(), &q.output);
    let a3 = names.fresh(&format!("{}_3d", a.q));
    let y3 = names.fresh(&format!("{}_3d", q.output));
    let mut un = new_node(
        "Unsqueeze",
        names.fresh(&format!("{}_unsqueeze", label(n))),
        vec![a.q.clone()],
        a3.clone(),
    );
    axes_input(&mut patch, names, &mut un, &[2], opset);
    let mut conv = new_node(
        "QLinearConv",
        n.name.clone(),
        vec![
            a3,
            a.scale.clone(),
            x_zp,
            wname,
            sname,
            zname,
            q.scale.clone(),
            y_zp,
            bname,
        ],
        y3.clone(),
    );
    attr::set(&mut conv, attr::make_ints("kernel_shape", &[1]));
    let mut sq = new_node(
        "Squeeze",
        names.fresh(&format!("{}_squeeze", label(n))),
        vec![y3],
        q.output.clone(),
    );
    axes_input(&mut patch, names, &mut sq, &[2], opset);
    patch.replace_node(i, conv).add_node(un).add_node(sq);
    Ok(Some(finish_qlinear(g, patch, i, &q, relu, &n.input)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::testing::*;
    use crate::onnx::Model;

    const BS: [f32; 3] = [0.01, 0.02, 0.005];
    const C: [f32; 3] = [0.2, -0.1, 0.05];
    const AS: f32 = 0.02;

    fn rule(g: &Graph, i: usize, n: &mut Names) -> Result<Option<Outcome>> {
        gemm(g, i, n, 13)
    }

    /// a [2, 4] -> Q -> DQ -> Gemm(DQ(bq per output channel), C; alpha 0.5, beta 2, transB)
    /// [-> Relu] -> Q(zp) -> DQ -> y
    fn gemm_model(trans_b: bool, relu: bool, zp: u8) -> Model {
        let (shape, axis): (&[usize], i64) = if trans_b { (&[3, 4], 0) } else { (&[4, 3], 1) };
        let attrs = vec![
            float("alpha", 0.5),
            float("beta", 2.0),
            int("transB", i64::from(trans_b)),
        ];
        let mut nodes = vec![
            quantize("qa", "a", "as", "az", "aq"),
            dequantize("dqa", "aq", "as", "az", "ad", None),
            dequantize("dqb", "bq", "bs", "bz", "bd", Some(axis)),
            node("Gemm", "fc", &["ad", "bd", "c"], &["g"], attrs),
        ];
        let mut last = "g";
        if relu {
            nodes.push(node("Relu", "relu", &["g"], &["r"], vec![]));
            last = "r";
        }
        nodes.push(quantize("qy", last, "ys", "yz", "yq"));
        nodes.push(dequantize("dqy", "yq", "ys", "yz", "y", None));
        model(
            nodes,
            vec![
                ("as", f32_scalar(AS)),
                ("az", u8_scalar(128)),
                ("bq", i8t(shape, seq_i8(12, 3))),
                ("bs", f32v(&BS)),
                ("bz", i8t(&[3], vec![0, 0, 0])),
                ("c", f32v(&C)),
                ("ys", f32_scalar(0.01)),
                ("yz", u8_scalar(zp)),
            ],
            value_info("a", ElemType::F32, &[2, 4]),
            "y",
        )
    }

    fn a() -> crate::runtime::Sample {
        sample("a", &[2, 4], seq(8, 4))
    }

    fn check(trans_b: bool) {
        let m = gemm_model(trans_b, false, 128);
        let (f, rec) = rewrite(&m, "fc", rule);
        assert_eq!(rec.nodes, ["fc"]);
        assert_eq!(
            ops(&f),
            [
                "QuantizeLinear",
                "Unsqueeze",
                "QLinearConv",
                "Squeeze",
                "DequantizeLinear"
            ]
        );
        let qc = node_named(&f, "fc");
        assert_eq!(attr::ints(qc, "kernel_shape").unwrap(), Some(vec![1]));
        // W [N, K, 1] = op(B) transposed to output-channel-major
        let b = init(&m, "bq").to_f64();
        let w = init(&f, &qc.input[3]).to_f64();
        assert_eq!(w.shape(), [3, 4, 1]);
        for o in 0..3 {
            for k in 0..4 {
                let want = if trans_b { b[[o, k]] } else { b[[k, o]] };
                assert_eq!(w[[o, k, 0]], want, "W[{o}, {k}]");
            }
        }
        // alpha folds into the scales, beta into the bias
        let ws = init(&f, &qc.input[4]).to_f64();
        let want_ws: Vec<f64> = BS.iter().map(|s| (s * 0.5) as f64).collect();
        assert_all_close(ws.as_slice().unwrap(), &want_ws, 1e-9);
        let want_b: Vec<i32> = (0..3)
            .map(|o| {
                (2.0 * C[o] as f64 / (AS as f64 * (BS[o] * 0.5) as f64)).round_ties_even() as i32
            })
            .collect();
        assert_eq!(
            init(&f, &qc.input[8]),
            TensorData::I32(ndarray::Array1::from(want_b).into_dyn())
        );
        // opset 13: axes as an input
        let un = f
            .graph()
            .node
            .iter()
            .find(|n| n.op_type == "Unsqueeze")
            .unwrap();
        assert_eq!(un.input.len(), 2);
        assert_eq!(
            init(&f, &un.input[1]),
            TensorData::I64(ndarray::arr1(&[2i64]).into_dyn())
        );
        assert_within_steps(&m, &f, &a(), 0.01, 1.0);
    }

    #[test]
    fn gemm_with_trans_b_1_becomes_a_1d_qlinearconv() {
        check(true);
    }

    #[test]
    fn gemm_with_trans_b_0_becomes_a_1d_qlinearconv() {
        check(false);
    }

    #[test]
    fn relu_absorbed_and_opset_11_axes_attributes() {
        let m = gemm_model(true, true, 0);
        let (f, rec) = rewrite(&m, "fc", |g: &Graph, i, n: &mut Names| gemm(g, i, n, 11));
        assert_eq!(rec.nodes, ["fc", "relu"]);
        assert_eq!(count(&f, "Relu"), 0);
        for op in ["Unsqueeze", "Squeeze"] {
            let n = f.graph().node.iter().find(|n| n.op_type == op).unwrap();
            assert_eq!(n.input.len(), 1);
            assert_eq!(attr::ints(n, "axes").unwrap(), Some(vec![2]));
        }
        let (f13, _) = rewrite(&m, "fc", rule);
        assert_within_steps(&m, &f13, &a(), 0.01, 1.0);
    }

    #[test]
    fn declines_a_c_that_is_not_per_output_channel() {
        let mut m = gemm_model(true, false, 128);
        set_init(&mut m, "c", f32t(&[2, 3], seq(6, 1)));
        let (nodes, reason) = declined(&m, "fc", rule);
        assert_eq!(nodes, ["fc"]);
        assert_eq!(reason, "Gemm C is not a per-output-channel bias");
        let mut m = gemm_model(true, false, 128);
        set_init(&mut m, "c", f32v(&[0.1, 0.2]));
        assert_eq!(
            declined(&m, "fc", rule).1,
            "Gemm C is not a per-output-channel bias"
        );
    }

    #[test]
    fn declines_a_bias_that_overflows_int32() {
        let mut m = gemm_model(true, false, 128);
        set_init(&mut m, "c", f32v(&[0.0, 1e9, 0.0]));
        assert!(declined(&m, "fc", rule).1.starts_with("bias channel 1"));
    }

    #[test]
    fn does_not_apply_to_trans_a_wrong_axis_or_non_qmin_relu() {
        let mut m = gemm_model(true, false, 128);
        m.graph_mut().node[3].attribute.push(int("transA", 1));
        not_applied(&m, "fc", rule);
        // transB = 1 wants scales per axis 0
        let mut m = gemm_model(true, false, 128);
        attr::set(&mut m.graph_mut().node[2], int("axis", 1));
        set_init(&mut m, "bs", f32v(&[0.01, 0.02, 0.03, 0.04]));
        set_init(&mut m, "bz", i8t(&[4], vec![0; 4]));
        not_applied(&m, "fc", rule);
        not_applied(&gemm_model(true, true, 128), "fc", rule);
        let mut m = gemm_model(true, false, 128);
        make_overridable(&mut m, "bq", ElemType::I8, &[3, 4]);
        not_applied(&m, "fc", rule);
    }

    #[test]
    fn malformed_nodes_do_not_apply() {
        let mut m = gemm_model(true, false, 128);
        m.graph_mut().node[3].input.truncate(1);
        not_applied(&m, "fc", rule);
        let mut m = gemm_model(true, false, 128);
        attr::set(&mut m.graph_mut().node[3], int("transB", 2));
        not_applied(&m, "fc", rule);
        let mut m = gemm_model(true, false, 128);
        m.graph_mut().node[3].output.clear();
        not_applied(&m, "fc", rule);
    }
}
