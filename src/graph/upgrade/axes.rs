//! Attributes that became int64 inputs (onnx's `AxesAttributeToInput`, `Split_12_13`,
//! `Split_17_18`).
//!
//! - Squeeze, Unsqueeze, ReduceSum at 13, and ReduceMax, ReduceMean, ReduceMin, ReduceProd,
//!   ReduceL1, ReduceL2, ReduceLogSum, ReduceLogSumExp, ReduceSumSquare at 18:
//!   `op(x, axes = [a, b])` becomes `op(x, axes)` with `axes` an int64 `[2]` initializer. An
//!   absent `axes` stays absent (the new default, "all axes" or "every size-1 axis", is the old
//!   one; `noop_with_empty_axes` defaults to 0).
//! - Split at 13: `Split(x, split = [..])` becomes `Split(x, split)` the same way. At 18, a Split
//!   without `split` (equal parts) gets `num_outputs` = its number of outputs, which 18
//!   requires.

use crate::onnx::attr;
use crate::onnx::proto::NodeProto;

use super::{data_input, Ctx, Step};

/// Squeeze, Unsqueeze, ReduceSum: `axes` to an input at 13.
pub(super) fn axes_13(ctx: &mut Ctx, i: usize, n: &NodeProto) -> Step {
    attribute_to_input(ctx, i, n, "axes", 13)
}

/// The other Reduce ops: `axes` to an input at 18.
pub(super) fn axes_18(ctx: &mut Ctx, i: usize, n: &NodeProto) -> Step {
    attribute_to_input(ctx, i, n, "axes", 18)
}

fn attribute_to_input(ctx: &mut Ctx, i: usize, n: &NodeProto, name: &str, at: i64) -> Step {
    let mut m = n.clone();
    let Some(what) = move_ints(ctx, n, &mut m, name, at)? else {
        return Ok(None);
    };
    ctx.patch.replace_node(i, m);
    Ok(Some(what))
}

/// Moves the INTS attribute `name` of `n` (copied in `m`) to its second input, when the
/// upgrade crosses `at` and the attribute is there.
fn move_ints(
    ctx: &mut Ctx,
    n: &NodeProto,
    m: &mut NodeProto,
    name: &str,
    at: i64,
) -> std::result::Result<Option<String>, String> {
    if !ctx.crosses(at) {
        return Ok(None);
    }
    data_input(n)?;
    let Some(values) = attr::ints(n, name).map_err(|e| e.to_string())? else {
        if n.op_type == "Unsqueeze" {
            return Err("it has no axes attribute, which Unsqueeze requires".into());
        }
        return Ok(None);
    };
    if n.input.len() > 1 {
        return Err(format!(
            "it has {} inputs and a '{name}' attribute; before opset {at} it takes one input",
            n.input.len()
        ));
    }
    m.attribute.retain(|a| a.name != name);
    let label = super::super::engine::label(n);
    let t = ctx.int64s(&format!("{label}_{name}"), values.clone())?;
    m.input.truncate(1);
    m.input.push(t);
    Ok(Some(format!("{name} {values:?} attribute to an input")))
}

/// Split: `split` to an input at 13, `num_outputs` written out at 18.
pub(super) fn split(ctx: &mut Ctx, i: usize, n: &NodeProto) -> Step {
    let mut m = n.clone();
    let mut changes = Vec::new();
    if let Some(what) = move_ints(ctx, n, &mut m, "split", 13)? {
        changes.push(what);
    }
    let has_split = m.input.get(1).is_some_and(|s| !s.is_empty());
    if ctx.crosses(18) && !has_split && attr::find(&m, "num_outputs").is_none() {
        let k = m.output.len() as i64;
        if k == 0 {
            return Err("it has no output".into());
        }
        attr::set(&mut m, attr::make_int("num_outputs", k));
        changes.push(format!("num_outputs {k} written out"));
    }
    if changes.is_empty() {
        return Ok(None);
    }
    ctx.patch.replace_node(i, m);
    Ok(Some(changes.join("; ")))
}
