//! Softmax, LogSoftmax, Hardmax at opset 13 (onnx's `Softmax_12_13`).
//!
//! Before 13 the input is coerced to 2-D at `axis` (default 1): `[d0 * ... * d(axis-1),
//! d(axis) * ... * d(r-1)]`, and the op runs over the second axis. From 13 it runs over the one
//! axis `axis` (default -1).
//!
//! - `axis` is the last axis (-1, or r - 1 on an input of known rank r): both compute the same;
//!   `axis = -1` is written out.
//! - otherwise, whatever the rank:
//!   ```text
//!   x -> op(axis = a) -> y
//!   ```
//!   becomes the coercion written out
//!   ```text
//!   x -> Flatten(axis = a) -> op(axis = -1) -> Reshape(shape = Shape(x)) -> y
//!   ```
//!   The op keeps its name and the Reshape produces `y`, so consumers and graph outputs are
//!   unchanged. (onnx's adapter applies to Softmax and LogSoftmax; Hardmax changed the same way
//!   at 13 and gets the same rewrite here.)

use crate::onnx::attr;
use crate::onnx::proto::NodeProto;

use super::{data_input, Ctx, Step};

pub(super) fn softmax(ctx: &mut Ctx, i: usize, n: &NodeProto) -> Step {
    let x = data_input(n)?.to_string();
    let y = n
        .output
        .first()
        .filter(|s| !s.is_empty())
        .ok_or("it has no output")?
        .clone();
    let axis = attr::int(n, "axis", 1).map_err(|e| e.to_string())?;
    let rank = ctx.rank(&x);
    let last = axis == -1 || rank.is_some_and(|r| axis == r as i64 - 1);
    let mut m = n.clone();
    attr::set(&mut m, attr::make_int("axis", -1));
    if last {
        ctx.patch.replace_node(i, m);
        return Ok(Some(format!(
            "axis {axis} is the last axis: axis -1 written out"
        )));
    }
    if let Some(r) = rank {
        if axis < -(r as i64) || axis > r as i64 {
            return Err(format!(
                "axis {axis} is out of range for its rank-{r} input"
            ));
        }
    }
    let label = super::super::engine::label(n);
    let shape = ctx.fresh(&format!("{x}_shape"));
    let flat = ctx.fresh(&format!("{x}_2d"));
    let y2 = ctx.fresh(&format!("{y}_2d"));
    let shape_node = node(
        "Shape",
        ctx.fresh(&format!("{label}_shape")),
        vec![x.clone()],
        shape.clone(),
    );
    let mut flatten = node(
        "Flatten",
        ctx.fresh(&format!("{label}_flatten")),
        vec![x],
        flat.clone(),
    );
    flatten.attribute.push(attr::make_int("axis", axis));
    let reshape = node(
        "Reshape",
        ctx.fresh(&format!("{label}_reshape")),
        vec![y2.clone(), shape],
        y.clone(),
    );
    m.input[0] = flat;
    m.output[0] = y2;
    ctx.patch
        .replace_node(i, m)
        .add_node(shape_node)
        .add_node(flatten)
        .add_node(reshape);
    Ok(Some(format!(
        "axis {axis}{}: Flatten(axis {axis}) -> {}(axis -1) -> Reshape to the input's shape",
        rank.map(|r| format!(" of a rank-{r} input"))
            .unwrap_or_default(),
        n.op_type
    )))
}

/// A default-domain node with one output.
pub(super) fn node(op: &str, name: String, inputs: Vec<String>, output: String) -> NodeProto {
    let mut n = NodeProto::new();
    n.op_type = op.into();
    n.name = name;
    n.input = inputs;
    n.output = vec![output];
    n
}
