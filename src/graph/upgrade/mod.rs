//! Opset upgrade of the default (`ai.onnx`) domain: every op whose signature or meaning changed
//! between the model's opset and the target is rewritten into its form at the target, the way
//! `onnx.version_converter`'s adapters do it (and where they change what a node computes, the
//! way that keeps it), so the upgraded model computes what the original did. Sources from
//! opset [`MIN_FROM`] on, targets up to [`MAX_TO`]; a downgrade is refused.
//!
//! | op | changed at | before | after |
//! |----|-----------|--------|-------|
//! | BatchNormalization | 9 | `spatial` (1 = per channel), legacy `is_test`, `consumed_inputs` | dropped; `spatial = 0` only on a rank-2 input (where it means the same) |
//! | BatchNormalization | 14 | training outputs (mean, var, saved mean, saved var) | refused when one is used |
//! | Upsample | 9 | `scales` attribute | `scales` input |
//! | Upsample | 10 | Upsample | Resize (opset 10), or at 11+ Resize with `coordinate_transformation_mode = asymmetric` and the `nearest_mode` below |
//! | Resize | 11 | (X, scales), coordinates `x / scale`, nearest rounding down when enlarging and up when shrinking (ONNX Runtime) | (X, roi, scales), `asymmetric`, `nearest_mode` floor or ceil (refused when the scales enlarge one axis and shrink another, or are unknown) |
//! | Resize | 13 | `coordinate_transformation_mode = tf_half_pixel_for_nn` | refused (removed at 13) |
//! | Slice | 10 | `starts`, `ends`, `axes` attributes | int64 inputs |
//! | TopK | 10 | `k` attribute | int64 `[1]` input |
//! | Dropout | 10 | mask of the input's type | bool mask: refused when the mask is used |
//! | Dropout | 12 | `ratio` attribute | float scalar input |
//! | Clip | 11 | `min`, `max` attributes | inputs of the input's type (an absent bound stays absent) |
//! | Pad | 11 | `pads`, `value` attributes | int64 `pads` input, `constant_value` input of the input's type; `mode` kept |
//! | Scatter | 11 | Scatter (deprecated) | ScatterElements, same inputs and `axis` |
//! | Squeeze, Unsqueeze, ReduceSum | 13 | `axes` attribute | int64 input |
//! | Split | 13 | `split` attribute | int64 input |
//! | Softmax, LogSoftmax, Hardmax | 13 | input coerced to 2-D at `axis` (default 1) | `axis = -1` when it was the last axis, else Flatten(axis) -> op(-1) -> Reshape(Shape(x)) |
//! | RoiAlign | 16 | `coordinate_transformation_mode` defaults to output_half_pixel | written out |
//! | ReduceMax, ReduceMean, ReduceMin, ReduceProd, ReduceL1, ReduceL2, ReduceLogSum, ReduceLogSumExp, ReduceSumSquare | 18 | `axes` attribute | int64 input |
//! | Split | 18 | no `split`: equal parts | `num_outputs` written out |
//!
//! Every other op that changed between 7 and 18 only widened its types or added attributes
//! whose default is the old meaning (onnx's `CompatibleAdapter`s: Gemm's optional C at 11, Cast
//! at 9, the pooling ops' `ceil_mode` and `dilations`, LSTM/GRU/RNN `layout` at 14, ...): they
//! need no rewrite. Not covered, and named in the error when a model uses them across the
//! version given: Scan 8 -> 9 (batch axis and `sequence_lens` input), the experimental ops
//! removed at 10 (ImageScaler, Affine, Crop, ScaledTanh, ParametricSoftplus, GRUUnit,
//! GivenTensorFill, Scale, DynamicSlice), and any changed op inside a subgraph (If/Loop/Scan
//! bodies). Other domains (ai.onnx.ml, com.microsoft...) keep their imports. The IR version is
//! kept; in an IR 3 model each new initializer is also declared as a graph input, as IR 3
//! requires.
//!
//! All adapters build one [`Patch`] against the read-only graph; the model is changed only when
//! every node could be upgraded.

mod attr_inputs;
mod axes;
mod legacy;
mod resize;
mod softmax;

use std::collections::{BTreeMap, HashMap};

use ndarray::{ArrayD, IxDyn};
use serde::Serialize;

use super::{guard, Graph, Map, Names, Patch};
use crate::error::{Error, Result};
use crate::onnx::proto::{
    tensor_shape_proto, type_proto, NodeProto, TensorShapeProto, TypeProto, ValueInfoProto,
};
use crate::onnx::{ElemType, Model, TensorData};

/// The lowest opset a model may be upgraded from.
pub const MIN_FROM: i64 = 7;
/// The highest opset a model may be upgraded to.
pub const MAX_TO: i64 = 18;
/// The default target: the first opset with per-axis QuantizeLinear / DequantizeLinear.
pub const DEFAULT_TO: i64 = 13;

/// What an adapter did to one node (`Ok(Some(change))`), that the node needs nothing
/// (`Ok(None)`), or why it cannot be upgraded (`Err`).
type Step = std::result::Result<Option<String>, String>;

/// An adapter: rewrites node `i` into its form at the target opset through the context.
type AdaptFn = fn(&mut Ctx, usize, &NodeProto) -> Step;

/// One op whose signature or meaning changed at some opset versions.
pub struct Change {
    pub op: &'static str,
    /// The versions at which it changed, between [`MIN_FROM`] and [`MAX_TO`].
    pub at: &'static [i64],
    adapt: Option<AdaptFn>,
    /// Why there is no adapter (for ops without one).
    pub missing: &'static str,
}

const fn adapted(op: &'static str, at: &'static [i64], adapt: AdaptFn) -> Change {
    Change {
        op,
        at,
        adapt: Some(adapt),
        missing: "",
    }
}

const fn refused(op: &'static str, at: &'static [i64], missing: &'static str) -> Change {
    Change {
        op,
        at,
        adapt: None,
        missing,
    }
}

const EXPERIMENTAL: &str = "an experimental op, removed from the standard at opset 10";

/// Every op that changed between [`MIN_FROM`] and [`MAX_TO`] in a way a model must be
/// rewritten for, with its adapter, or the reason it has none.
pub const CHANGES: &[Change] = &[
    adapted("BatchNormalization", &[9, 14], legacy::batch_normalization),
    adapted("Upsample", &[9, 10], resize::upsample),
    adapted("Resize", &[11, 13], resize::resize),
    adapted("Slice", &[10], attr_inputs::slice),
    adapted("TopK", &[10], attr_inputs::topk),
    adapted("Dropout", &[10, 12], attr_inputs::dropout),
    adapted("Clip", &[11], attr_inputs::clip),
    adapted("Pad", &[11], attr_inputs::pad),
    adapted("Scatter", &[11], legacy::scatter),
    adapted("Squeeze", &[13], axes::axes_13),
    adapted("Unsqueeze", &[13], axes::axes_13),
    adapted("ReduceSum", &[13], axes::axes_13),
    adapted("Split", &[13, 18], axes::split),
    adapted("Softmax", &[13], softmax::softmax),
    adapted("LogSoftmax", &[13], softmax::softmax),
    adapted("Hardmax", &[13], softmax::softmax),
    adapted("RoiAlign", &[16], legacy::roi_align),
    adapted("ReduceMax", &[18], axes::axes_18),
    adapted("ReduceMean", &[18], axes::axes_18),
    adapted("ReduceMin", &[18], axes::axes_18),
    adapted("ReduceProd", &[18], axes::axes_18),
    adapted("ReduceL1", &[18], axes::axes_18),
    adapted("ReduceL2", &[18], axes::axes_18),
    adapted("ReduceLogSum", &[18], axes::axes_18),
    adapted("ReduceLogSumExp", &[18], axes::axes_18),
    adapted("ReduceSumSquare", &[18], axes::axes_18),
    refused(
        "Scan",
        &[9],
        "Scan-8's batch axis and sequence_lens input have no adapter",
    ),
    refused("ImageScaler", &[10], EXPERIMENTAL),
    refused("Affine", &[10], EXPERIMENTAL),
    refused("Crop", &[10], EXPERIMENTAL),
    refused("ScaledTanh", &[10], EXPERIMENTAL),
    refused("ParametricSoftplus", &[10], EXPERIMENTAL),
    refused("GRUUnit", &[10], EXPERIMENTAL),
    refused("GivenTensorFill", &[10], EXPERIMENTAL),
    refused("Scale", &[10], EXPERIMENTAL),
    refused("DynamicSlice", &[10], EXPERIMENTAL),
];

/// The ops with an adapter, for messages.
pub fn adapted_ops() -> Vec<&'static str> {
    CHANGES
        .iter()
        .filter(|c| c.adapt.is_some())
        .map(|c| c.op)
        .collect()
}

/// One node the upgrade rewrote.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Rewritten {
    pub node: String,
    pub op_type: String,
    pub change: String,
}

/// What [`upgrade`] did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct UpgradeReport {
    /// The default-domain opset before and after.
    pub from: i64,
    pub to: i64,
    pub nodes_before: usize,
    pub nodes_after: usize,
    /// Nodes rewritten, by op type (of the original node).
    pub by_op: BTreeMap<String, usize>,
    pub rewritten: Vec<Rewritten>,
}

impl UpgradeReport {
    /// Labels of the nodes rewritten.
    pub fn nodes(&self) -> Vec<String> {
        self.rewritten.iter().map(|r| r.node.clone()).collect()
    }
}

/// What the adapters read and build while the graph is read-only.
pub(crate) struct Ctx<'a> {
    g: &'a Graph<'a>,
    from: i64,
    to: i64,
    ranks: HashMap<String, usize>,
    types: Map<String, ElemType>,
    names: Names,
    patch: Patch,
    /// Initializers added, for IR 3 models (which declare every initializer as an input).
    added: Vec<(String, ElemType, Vec<usize>)>,
}

impl Ctx<'_> {
    /// True when the upgrade crosses opset `v` (the op's version `v` applies after it, not
    /// before).
    fn crosses(&self, v: i64) -> bool {
        self.from < v && v <= self.to
    }

    fn fresh(&mut self, base: &str) -> String {
        self.names.fresh(base)
    }

    /// Adds an initializer holding `data` under a fresh name derived from `base`.
    fn constant(&mut self, base: &str, data: TensorData) -> String {
        let name = self.names.fresh(base);
        self.added
            .push((name.clone(), data.elem_type(), data.shape().to_vec()));
        self.patch.add_initializer(data.to_proto(&name));
        name
    }

    /// An int64 `[len]` initializer.
    fn int64s(&mut self, base: &str, values: Vec<i64>) -> std::result::Result<String, String> {
        let data = ArrayD::from_shape_vec(IxDyn(&[values.len()]), values)
            .map_err(|e| format!("{base}: {e}"))?;
        Ok(self.constant(base, TensorData::I64(data)))
    }

    /// A scalar initializer of the floating-point type `ty`.
    fn float_scalar(
        &mut self,
        base: &str,
        v: f64,
        ty: ElemType,
    ) -> std::result::Result<String, String> {
        let data = TensorData::from_f64(ndarray::arr0(v).into_dyn(), ty)
            .map_err(|e| format!("{base}: {e}"))?;
        Ok(self.constant(base, data))
    }

    fn rank(&self, value: &str) -> Option<usize> {
        self.ranks.get(value).copied()
    }

    fn elem_type(&self, value: &str) -> Option<ElemType> {
        self.types.get(value).copied()
    }

    /// The values of constant `name` (initializer or Constant node) as f64, `None` when it is
    /// not a constant.
    fn constant_values(&self, name: &str) -> std::result::Result<Option<Vec<f64>>, String> {
        match self.g.constant(name) {
            Ok(Some(t)) if t.len() <= 4 * super::spec::MAX_RANK as usize => {
                Ok(Some(t.to_f64().iter().copied().collect()))
            }
            Ok(Some(t)) => Err(format!("'{name}' has {} values", t.len())),
            Ok(None) => Ok(None),
            Err(e) => Err(e.to_string()),
        }
    }

    /// True when `value` is read by a node or is a graph output.
    fn is_used(&self, value: &str) -> bool {
        !value.is_empty() && (!self.g.consumers(value).is_empty() || self.g.is_output(value))
    }
}

/// A node's first input, which every adapted op requires.
fn data_input(n: &NodeProto) -> std::result::Result<&str, String> {
    n.input
        .first()
        .map(String::as_str)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| "it has no data input".to_string())
}

/// The rank of every value that follows from the declared input ranks ([`guard::ranks`]).
pub(crate) fn input_ranks(model: &Model, g: &Graph) -> HashMap<String, usize> {
    let declared: Vec<(String, usize)> = model
        .graph()
        .input
        .iter()
        .filter_map(|v| match v.type_.as_ref()?.value.as_ref()? {
            type_proto::Value::TensorType(t) => Some((v.name.clone(), t.shape.as_ref()?.dim.len())),
            _ => None,
        })
        .collect();
    guard::ranks(g, &declared)
}

fn in_default_domain(n: &NodeProto) -> bool {
    n.domain.is_empty() || n.domain == "ai.onnx"
}

/// The changes of `op` the upgrade from `from` to `to` crosses.
fn change_of(op: &str, from: i64, to: i64) -> Option<&'static Change> {
    CHANGES
        .iter()
        .find(|c| c.op == op && c.at.iter().any(|&v| from < v && v <= to))
}

/// The opsets of `model`, checked: (from, to). `to == from` is allowed (nothing to do).
fn versions(model: &Model, to: i64) -> Result<i64> {
    let from = model.opset().ok_or_else(|| {
        Error::Usage("the model imports no default-domain (ai.onnx) opset".into())
    })?;
    if to < from {
        return Err(Error::Usage(format!(
            "the model imports opset {from}; --opset {to} would be a downgrade, which qfold does not do"
        )));
    }
    if to == from {
        return Ok(from);
    }
    if from < MIN_FROM {
        return Err(Error::Usage(format!(
            "the model imports opset {from}; qfold upgrades models from opset {MIN_FROM} on"
        )));
    }
    if to > MAX_TO {
        return Err(Error::Usage(format!(
            "--opset {to}: qfold upgrades to opset {MAX_TO} at most (the ops changed after it have no adapter)"
        )));
    }
    Ok(from)
}

/// Everything the upgrade will do, built without changing the model.
struct Plan {
    patch: Patch,
    rewritten: Vec<Rewritten>,
    added: Vec<(String, ElemType, Vec<usize>)>,
}

fn plan(model: &Model, from: i64, to: i64) -> Result<Plan> {
    let g = Graph::of_model(model);
    let mut ctx = Ctx {
        g: &g,
        from,
        to,
        ranks: input_ranks(model, &g),
        types: super::types::elem_types(&g),
        names: Names::new(g.proto()),
        patch: Patch::new(format!("upgrade from opset {from} to {to}")),
        added: Vec::new(),
    };
    let mut blockers = Vec::new();
    let mut missing_adapter = false;
    let mut rewritten = Vec::new();
    for (i, n) in g.nodes().iter().enumerate() {
        let label = super::engine::label(n);
        if n.attribute
            .iter()
            .any(|a| a.g.is_some() || !a.graphs.is_empty())
        {
            if let Some(inner) = changed_inside(n, from, to) {
                blockers.push(format!(
                    "node '{}' ({}) in a subgraph of node '{label}': qfold does not upgrade ops inside subgraphs",
                    super::engine::label(inner),
                    inner.op_type
                ));
            }
        }
        if !in_default_domain(n) {
            continue;
        }
        let Some(change) = change_of(&n.op_type, from, to) else {
            continue;
        };
        let Some(adapt) = change.adapt else {
            missing_adapter = true;
            blockers.push(format!(
                "node '{label}' ({}): no adapter from opset {from} to {to}: {}",
                n.op_type, change.missing
            ));
            continue;
        };
        match adapt(&mut ctx, i, n) {
            Ok(Some(what)) => rewritten.push(Rewritten {
                node: label,
                op_type: n.op_type.clone(),
                change: what,
            }),
            Ok(None) => {}
            Err(reason) => blockers.push(format!("node '{label}' ({}): {reason}", n.op_type)),
        }
    }
    if !blockers.is_empty() {
        const SHOWN: usize = 10;
        let more = blockers.len().saturating_sub(SHOWN);
        blockers.truncate(SHOWN);
        let mut msg = format!(
            "cannot raise the model from opset {from} to {to} without changing what it computes: {}",
            blockers.join("; ")
        );
        if more > 0 {
            msg.push_str(&format!("; and {more} more"));
        }
        if missing_adapter {
            msg.push_str(&format!(
                " (qfold has adapters for {})",
                adapted_ops().join(", ")
            ));
        }
        return Err(Error::Usage(msg));
    }
    Ok(Plan {
        patch: ctx.patch,
        rewritten,
        added: ctx.added,
    })
}

/// A node inside `n`'s subgraphs (recursively) whose op changed between `from` and `to`.
fn changed_inside(n: &NodeProto, from: i64, to: i64) -> Option<&NodeProto> {
    for a in &n.attribute {
        for g in a.g.as_ref().into_iter().chain(a.graphs.iter()) {
            for inner in &g.node {
                if in_default_domain(inner) && change_of(&inner.op_type, from, to).is_some() {
                    return Some(inner);
                }
                if let Some(deeper) = changed_inside(inner, from, to) {
                    return Some(deeper);
                }
            }
        }
    }
    None
}

/// Checks that `model` can be raised to opset `to`: `Ok(())`, or the error [`upgrade`] would
/// return, naming every node that cannot be upgraded (at most ten).
pub fn check(model: &Model, to: i64) -> Result<()> {
    let from = versions(model, to)?;
    if from == to {
        return Ok(());
    }
    plan(model, from, to).map(|_| ())
}

/// Raises `model`'s default-domain opset to `to`, rewriting every node whose op changed on the
/// way (see the module docs). Fails, naming the nodes that cannot be upgraded, on a downgrade,
/// a source below [`MIN_FROM`] or a target above [`MAX_TO`]; the model is then unchanged.
pub fn upgrade(model: &mut Model, to: i64) -> Result<UpgradeReport> {
    let from = versions(model, to)?;
    let nodes_before = model.graph().node.len();
    let mut report = UpgradeReport {
        from,
        to,
        nodes_before,
        nodes_after: nodes_before,
        ..Default::default()
    };
    if from == to {
        return Ok(report);
    }
    let Plan {
        patch,
        rewritten,
        added,
    } = plan(model, from, to)?;
    patch.apply(model.graph_mut())?;
    if model.proto.ir_version < 4 {
        let g = model.graph_mut();
        for (name, ty, shape) in added {
            if g.initializer.iter().any(|t| t.name == name) {
                g.input.push(tensor_value_info(&name, ty, &shape));
            }
        }
    }
    for o in &mut model.proto.opset_import {
        if o.domain.is_empty() || o.domain == "ai.onnx" {
            o.version = to;
        }
    }
    for r in &rewritten {
        *report.by_op.entry(r.op_type.clone()).or_insert(0) += 1;
    }
    report.rewritten = rewritten;
    report.nodes_after = model.graph().node.len();
    Ok(report)
}

/// A tensor value declaration with a concrete shape.
pub(crate) fn tensor_value_info(name: &str, ty: ElemType, shape: &[usize]) -> ValueInfoProto {
    let mut s = TensorShapeProto::new();
    for &d in shape {
        let mut dim = tensor_shape_proto::Dimension::new();
        dim.value = Some(tensor_shape_proto::dimension::Value::DimValue(d as i64));
        s.dim.push(dim);
    }
    let mut t = type_proto::Tensor::new();
    t.elem_type = ty.onnx_code();
    t.shape = Some(s).into();
    let mut tp = TypeProto::new();
    tp.value = Some(type_proto::Value::TensorType(t));
    let mut v = ValueInfoProto::new();
    v.name = name.into();
    v.type_ = Some(tp).into();
    v
}

#[cfg(test)]
mod tests;
