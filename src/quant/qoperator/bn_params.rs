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
