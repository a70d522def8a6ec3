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
    let Some((z, ty)) = zps(g, n.input.get(2).filter(|s| !s.is_empty()))? else {
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
    if (s.len() > 1 && !axis_ok)
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
