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
    patch
        .replace_node(i, conv)
        .add_node(un)
        .add_node(sq)
        .remove_node(q.node);
    let mut nodes = vec![label(n)];
    if let Some(r) = relu {
        patch.remove_node(r);
        nodes.push(label(g.node(r)));
    }
    drop_private_dq(g, &mut patch, &a, i);
    drop_private_dq(g, &mut patch, &b, i);
    if let Some(cq) = n.input.get(2).and_then(|c| dq_of(g, c)) {
        drop_private_dq(g, &mut patch, &cq, i);
    }
    Ok(Some(converted(patch, nodes)))
}
