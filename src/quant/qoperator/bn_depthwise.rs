//! DQ(x) -> BatchNormalization [-> Relu] -> Q  =>  a depthwise 1x1 Conv (which `conv` then
//! turns into a QLinearConv).
//!
//! ```text
//! before:  x -> DQ -> BatchNormalization [-> Relu] -> Q
//! after:   x -> DQ -> Conv(DQ(w), bias; group = C, kernel 1...) [-> Relu] -> Q
//! ```
//!
//! Conditions: an inference BN with constant parameters; an input of known rank >= 3.
//!
//! Formula: per channel `s = gamma / sqrt(var + eps)`, stored exactly as the int8 weight
//! `sign(s) * 127` with scale `|s| / 127`; bias `beta - mean * s` (float).

use ndarray::{ArrayD, IxDyn};

use super::common::*;
use crate::error::Result;
use crate::graph::{Graph, Names, Patch};
use crate::onnx::attr::{self};
use crate::onnx::TensorData;

/// DQ(x) -> BN [-> Relu] -> Q  =>  depthwise 1x1 Conv (then QLinearConv).
pub fn bn_to_depthwise(g: &Graph, i: usize, names: &mut Names) -> Result<Option<Outcome>> {
    let n = g.node(i);
    if !is_op(n, "BatchNormalization") {
        return Ok(None);
    }
    let Some(_x) = dq_of(g, &n.input[0]) else {
        return Ok(None);
    };
    if output_chain(g, &n.output[0])?.is_none() {
        return Ok(None);
    }
    let aff = match bn_affine(g, i)? {
        Ok(a) => a,
        Err(r) => return Ok(Some(decline(label(n), r))),
    };
    let Some(rank) = infer_rank(g, &n.input[0]) else {
        return Ok(Some(decline(
            label(n),
            "the rank of its input is unknown".into(),
        )));
    };
    if rank < 3 {
        return Ok(Some(decline(
            label(n),
            format!("rank-{rank} input: no convolution form"),
        )));
    }
    let c = aff.channels();
    let mut shape = vec![c, 1];
    shape.extend(std::iter::repeat_n(1, rank - 2));
    let q: Vec<i8> = aff
        .scale
        .iter()
        .map(|&s| if s < 0.0 { -127 } else { 127 })
        .collect();
    let scales: Vec<f32> = aff
        .scale
        .iter()
        .map(|&s| (s.abs() / 127.0) as f32)
        .collect();
    let mut patch = Patch::new(format!("BN as depthwise Conv {}", label(n)));
    let qname = names.fresh(&format!("{}_depthwise", label(n)));
    patch.add_initializer(
        TensorData::I8(ArrayD::from_shape_vec(IxDyn(&shape), q).expect("shape")).to_proto(&qname),
    );
    let sname = names.fresh(&format!("{}_depthwise_scale", label(n)));
    patch.add_initializer(
        TensorData::F32(ArrayD::from_shape_vec(IxDyn(&[c]), scales).expect("c")).to_proto(&sname),
    );
    let zname = names.fresh(&format!("{}_depthwise_zero_point", label(n)));
    patch.add_initializer(TensorData::I8(ArrayD::zeros(IxDyn(&[c]))).to_proto(&zname));
    let wout = names.fresh(&format!("{}_depthwise_dequantized", label(n)));
    let mut dq = new_node(
        "DequantizeLinear",
        names.fresh(&format!("{}_depthwise_DequantizeLinear", label(n))),
        vec![qname, sname, zname],
        wout.clone(),
    );
    attr::set(&mut dq, attr::make_int("axis", 0));
    let bname = names.fresh(&format!("{}_depthwise_bias", label(n)));
    patch
        .add_initializer(TensorData::F32(aff.shift.mapv(|v| v as f32).into_dyn()).to_proto(&bname));
    let mut conv = new_node(
        "Conv",
        n.name.clone(),
        vec![n.input[0].clone(), wout, bname],
        n.output[0].clone(),
    );
    attr::set(&mut conv, attr::make_int("group", c as i64));
    attr::set(
        &mut conv,
        attr::make_ints("kernel_shape", &vec![1; rank - 2]),
    );
    patch.add_node(dq).replace_node(i, conv);
    Ok(Some(converted(patch, vec![label(n)])))
}
