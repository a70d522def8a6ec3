//! Opset upgrade to 13 for the ops whose signature changed on the way, the way
//! `onnx.version_converter`'s adapters rewrite them, so a model exported at opset 11 or 12 can
//! take per-axis QuantizeLinear / DequantizeLinear (opset 13) without changing what it computes:
//!
//! | op | before 13 | at 13 |
//! |----|-----------|-------|
//! | Squeeze, Unsqueeze, ReduceSum | `axes` attribute | `axes` int64 input |
//! | Split | `split` attribute | `split` int64 input |
//! | Softmax, LogSoftmax, Hardmax | input coerced to 2-D at `axis` (default 1) | one axis (default -1) |
//!
//! Softmax-like ops are kept as they are when `axis` is the last axis (the 2-D coercion then
//! computes the same thing), with `axis` written out; another axis on an input of known rank is
//! not upgraded and [`upgrade_to_13`] names the node. The other ops whose meaning changed below
//! 13 (BatchNormalization 9, Upsample 10, Clip, Pad and Resize 11, Dropout 12) have no adapter
//! here and are named too, as are Slice and TopK below 10 (attributes that became inputs).

use ndarray::{ArrayD, IxDyn};

use super::{guard, spec, Graph, Names, Patch};
use crate::error::{Error, Result};
use crate::onnx::attr;
use crate::onnx::proto::{type_proto, NodeProto};
use crate::onnx::{Model, TensorData};

/// Ops whose meaning changed at an opset version up to 13, with that version.
pub const CHANGED_UP_TO_13: &[(&str, i64)] = &[
    ("BatchNormalization", 9),
    ("Upsample", 10),
    ("Clip", 11),
    ("Pad", 11),
    ("Resize", 11),
    ("Slice", 10),
    ("TopK", 10),
    ("Dropout", 12),
    ("Squeeze", 13),
    ("Unsqueeze", 13),
    ("Split", 13),
    ("ReduceSum", 13),
    ("Softmax", 13),
    ("LogSoftmax", 13),
    ("Hardmax", 13),
];

/// Adapters this module has, from any opset to 13.
const ADAPTED: &[&str] = &[
    "Squeeze",
    "Unsqueeze",
    "Split",
    "ReduceSum",
    "Softmax",
    "LogSoftmax",
    "Hardmax",
];

/// The node that keeps `model` (at opset `from`) from being raised to `to` without changing
/// what it computes, with the reason; `None` when every changed op has an adapter that applies.
pub fn blocker(model: &Model, from: i64, to: i64) -> Option<(String, String)> {
    let ranks = input_ranks(model);
    for n in &model.graph().node {
        if !(n.domain.is_empty() || n.domain == "ai.onnx") {
            continue;
        }
        let changed = CHANGED_UP_TO_13
            .iter()
            .any(|(op, v)| *op == n.op_type && from < *v && *v <= to);
        if !changed {
            continue;
        }
        // The adapted ops only changed at 13 (their earlier versions only widened what they
        // accept), so the adapters apply from any opset.
        let adapted = to == 13 && ADAPTED.contains(&n.op_type.as_str());
        if !adapted {
            return Some((
                super::engine::label(n),
                format!("its {} changed meaning before opset {to}", n.op_type),
            ));
        }
        if let Err(r) = softmax_axis_kept(n, &ranks) {
            return Some((super::engine::label(n), r));
        }
    }
    None
}

fn input_ranks(model: &Model) -> super::Map<String, usize> {
    let declared: Vec<(String, usize)> = model
        .graph()
        .input
        .iter()
        .filter_map(|v| match v.type_.as_ref()?.value.as_ref()? {
            type_proto::Value::TensorType(t) => Some((v.name.clone(), t.shape.as_ref()?.dim.len())),
            _ => None,
        })
        .collect();
    guard::ranks(&Graph::of_model(model), &declared)
        .into_iter()
        .collect()
}

/// For Softmax-like nodes: `Ok(axis)` when the opset-13 form computes the same thing (the axis
/// is the last one), else why not.
fn softmax_axis_kept(
    n: &NodeProto,
    ranks: &super::Map<String, usize>,
) -> std::result::Result<Option<i64>, String> {
    if !matches!(n.op_type.as_str(), "Softmax" | "LogSoftmax" | "Hardmax") {
        return Ok(None);
    }
    let axis = attr::int(n, "axis", 1).map_err(|e| e.to_string())?;
    if axis == -1 {
        return Ok(Some(-1));
    }
    let rank = n.input.first().and_then(|x| ranks.get(x.as_str())).copied();
    match rank {
        Some(r) if axis == r as i64 - 1 => Ok(Some(axis)),
        Some(r) => Err(format!(
            "{} over axis {axis} of a rank-{r} input flattens the axes after it before opset 13",
            n.op_type
        )),
        None => Err(format!(
            "{} over axis {axis}: the rank of its input is not known, so whether opset 13 computes the same is not known",
            n.op_type
        )),
    }
}

/// Rewrites every adapted node of `model` into its opset-13 form and raises the
/// default-domain opset to 13. Returns the nodes rewritten. Fails, naming the node, when a node
/// cannot be upgraded (see [`blocker`]); the model is then unchanged.
pub fn upgrade_to_13(model: &mut Model) -> Result<Vec<String>> {
    let from = model.opset().unwrap_or(0);
    if from >= 13 {
        return Ok(Vec::new());
    }
    if let Some((node, reason)) = blocker(model, from, 13) {
        return Err(Error::Usage(format!(
            "the model imports opset {from} and cannot be raised to 13: node '{node}': {reason}"
        )));
    }
    let ranks = input_ranks(model);
    let mut rewritten = Vec::new();
    let patch = {
        let g = Graph::of_model(model);
        let mut names = Names::new(g.proto());
        let mut patch = Patch::new("upgrade to opset 13");
        for (i, n) in g.nodes().iter().enumerate() {
            if !(n.domain.is_empty() || n.domain == "ai.onnx") || spec::check(n).is_err() {
                continue;
            }
            let moved = match n.op_type.as_str() {
                "Squeeze" | "Unsqueeze" | "ReduceSum" => Some("axes"),
                "Split" => Some("split"),
                _ => None,
            };
            let mut m = n.clone();
            if let Some(name) = moved {
                let Some(values) = attr::ints(n, name)? else {
                    continue; // absent: the opset-13 default is the same
                };
                m.attribute.retain(|a| a.name != name);
                let t = names.fresh(&format!("{}_{name}", super::engine::label(n)));
                let data = TensorData::I64(
                    ArrayD::from_shape_vec(IxDyn(&[values.len()]), values).map_err(|e| {
                        Error::graph(g.name(), format!("{name} of '{}': {e}", n.name))
                    })?,
                );
                patch.add_initializer(data.to_proto(&t));
                // The new input goes right after the data input (Split: [input, split]).
                m.input.truncate(1);
                m.input.push(t);
            } else if let Ok(Some(axis)) = softmax_axis_kept(n, &ranks) {
                attr::set(&mut m, attr::make_int("axis", axis));
            } else {
                continue;
            }
            rewritten.push(super::engine::label(n));
            patch.replace_node(i, m);
        }
        patch
    };
    patch.apply(model.graph_mut())?;
    for o in &mut model.proto.opset_import {
        if o.domain.is_empty() || o.domain == "ai.onnx" {
            o.version = 13;
        }
    }
    Ok(rewritten)
}
