//! What a model must pass before it is handed to tract: every node against its op spec
//! ([`super::spec`]), and the input ranks tract is known to mishandle (a BatchNormalization whose
//! input has rank 0 or 1 makes tract abort the process from inside its shape inference, where
//! no error can be caught). Each refusal names the node.
//!
//! Ranks come from a light propagation over the main graph: graph inputs (the run's concrete
//! shapes), constants, and the ops whose output rank follows from their inputs' (elementwise
//! ops, Conv, pooling, Gemm, MatMul, Reshape with a constant shape, ...). A value whose rank is
//! not known this way is not checked here; tract's own inference reports it.

use std::collections::HashMap;

use super::{spec, Graph};
use crate::error::{Error, Result};
use crate::onnx::attr;

/// Ops whose output has the rank of their first input.
const SAME_RANK: &[&str] = &[
    "Abs",
    "Split",
    "BatchNormalization",
    "Cast",
    "Ceil",
    "Clip",
    "Conv",
    "ConvTranspose",
    "DequantizeLinear",
    "Dropout",
    "Elu",
    "Erf",
    "Exp",
    "Floor",
    "GlobalAveragePool",
    "GlobalMaxPool",
    "HardSigmoid",
    "HardSwish",
    "Identity",
    "InstanceNormalization",
    "LeakyRelu",
    "Log",
    "LogSoftmax",
    "LpNormalization",
    "LRN",
    "AveragePool",
    "MaxPool",
    "Neg",
    "Pad",
    "PRelu",
    "QLinearConv",
    "QuantizeLinear",
    "Reciprocal",
    "Relu",
    "Resize",
    "Round",
    "Selu",
    "Sigmoid",
    "Sign",
    "Softmax",
    "Softplus",
    "Sqrt",
    "Tanh",
    "Transpose",
    "Upsample",
];

/// Ops whose output has the largest rank of their inputs (numpy broadcasting).
const BROADCAST: &[&str] = &[
    "Add", "And", "Div", "Equal", "Greater", "Less", "Max", "Mean", "Min", "Mod", "Mul", "Or",
    "Pow", "Sub", "Sum", "Where", "Xor",
];

/// The rank of every value whose rank follows from the inputs' `input_ranks`.
pub fn ranks(g: &Graph, input_ranks: &[(String, usize)]) -> HashMap<String, usize> {
    let mut rank: HashMap<String, usize> = input_ranks.iter().cloned().collect();
    for t in &g.proto().initializer {
        rank.entry(t.name.clone()).or_insert(t.dims.len());
    }
    let Ok(order) = g.topo_order() else {
        return rank;
    };
    for i in order {
        let n = g.node(i);
        if !(n.domain.is_empty() || n.domain == "ai.onnx") || spec::check(n).is_err() {
            continue;
        }
        let r = |k: usize| n.input.get(k).and_then(|x| rank.get(x)).copied();
        let op = n.op_type.as_str();
        let out = if op == "Constant" {
            crate::graph::constant_node_value(n)
                .ok()
                .map(|t| t.shape().len())
        } else if SAME_RANK.contains(&op) {
            r(0)
        } else if BROADCAST.contains(&op) {
            (0..n.input.len())
                .map(r)
                .try_fold(0, |m, x| Some(m.max(x?)))
        } else {
            match op {
                "Gemm" | "Flatten" => Some(2),
                "Shape" | "Size" => Some(if op == "Shape" { 1 } else { 0 }),
                "MatMul" => match (r(0), r(1)) {
                    (Some(a), Some(b)) if a >= 2 && b >= 2 => Some(a.max(b)),
                    (Some(1), Some(b)) if b >= 2 => Some(b - 1),
                    (Some(a), Some(1)) if a >= 2 => Some(a - 1),
                    (Some(1), Some(1)) => Some(0),
                    _ => None,
                },
                "Concat" => r(0),
                "ReduceSum" | "ReduceMean" | "ReduceMax" | "ReduceMin" | "ReduceProd"
                | "ReduceL1" | "ReduceL2" | "ReduceLogSum" | "ReduceLogSumExp"
                | "ReduceSumSquare" => {
                    let keep = attr::int(n, "keepdims", 1).unwrap_or(1) != 0;
                    let axes = attr::ints(n, "axes")
                        .ok()
                        .flatten()
                        .map(|a| a.len())
                        .or_else(|| {
                            n.input
                                .get(1)
                                .filter(|s| !s.is_empty())
                                .and_then(|s| g.constant(s).ok().flatten())
                                .map(|t| t.len())
                        });
                    match (r(0), keep, axes) {
                        (Some(x), true, _) => Some(x),
                        (Some(x), false, Some(k)) => x.checked_sub(k),
                        (Some(_), false, None) => Some(0),
                        _ => None,
                    }
                }
                "Reshape" => n
                    .input
                    .get(1)
                    .and_then(|s| g.constant(s).ok().flatten())
                    .map(|t| t.len()),
                "Unsqueeze" | "Squeeze" => {
                    let axes = attr::ints(n, "axes")
                        .ok()
                        .flatten()
                        .map(|a| a.len())
                        .or_else(|| {
                            n.input
                                .get(1)
                                .filter(|s| !s.is_empty())
                                .and_then(|s| g.constant(s).ok().flatten())
                                .map(|t| t.len())
                        });
                    match (r(0), axes) {
                        (Some(x), Some(k)) if op == "Unsqueeze" => Some(x + k),
                        (Some(x), Some(k)) => x.checked_sub(k),
                        _ => None,
                    }
                }
                _ => None,
            }
        };
        if let Some(o) = out {
            // Split's outputs all have its input's rank; every other op here has one output.
            let outputs = if op == "Split" {
                &n.output[..]
            } else {
                &n.output[..n.output.len().min(1)]
            };
            for name in outputs.iter().filter(|s| !s.is_empty()) {
                rank.insert(name.clone(), o);
            }
        }
    }
    rank
}

/// Refuses, by node name, what tract must not be given: nodes that fail their spec, and input
/// ranks it mishandles.
pub fn check_for_tract(g: &Graph, input_ranks: &[(String, usize)]) -> Result<()> {
    for n in g.nodes() {
        if let Err(reason) = spec::check(n) {
            return Err(Error::Node {
                node: super::engine::label(n),
                op_type: n.op_type.clone(),
                reason,
            });
        }
    }
    let ranks = ranks(g, input_ranks);
    for n in g.nodes() {
        let x = n.input.first().and_then(|x| ranks.get(x)).copied();
        let min = match n.op_type.as_str() {
            "BatchNormalization" | "InstanceNormalization" => 2,
            "Conv" | "ConvTranspose" | "MaxPool" | "AveragePool" | "GlobalAveragePool" => 3,
            _ => continue,
        };
        if let Some(r) = x.filter(|&r| r < min) {
            return Err(Error::Node {
                node: super::engine::label(n),
                op_type: n.op_type.clone(),
                reason: format!(
                    "its input '{}' has rank {r}; {} needs rank {min} or more",
                    n.input[0], n.op_type
                ),
            });
        }
    }
    Ok(())
}
