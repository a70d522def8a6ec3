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

/// The first Loop node of `graph` or of any subgraph in it (tract has no Loop operator).
fn find_loop(graph: &crate::onnx::proto::GraphProto) -> Option<&crate::onnx::proto::NodeProto> {
    for n in &graph.node {
        if n.op_type == "Loop" && (n.domain.is_empty() || n.domain == "ai.onnx") {
            return Some(n);
        }
        for a in &n.attribute {
            let inner = a.g.as_ref().into_iter().chain(a.graphs.iter());
            for sub in inner {
                if let Some(l) = find_loop(sub) {
                    return Some(l);
                }
            }
        }
    }
    None
}

/// Values of the main graph that depend on the data fed to it: the real inputs and everything
/// computed from them, except through Shape and Size (the run's input shapes are concrete, so
/// tract knows those values before it runs).
pub fn data_dependent(g: &Graph) -> super::Set<String> {
    let mut dep: super::Set<String> = g.real_inputs().iter().map(|v| v.name.clone()).collect();
    let Ok(order) = g.topo_order() else {
        return dep;
    };
    for i in order {
        let n = g.node(i);
        if matches!(n.op_type.as_str(), "Shape" | "Size") {
            continue;
        }
        if super::node_uses(n).iter().any(|x| dep.contains(*x)) {
            dep.extend(n.output.iter().filter(|o| !o.is_empty()).cloned());
        }
    }
    dep
}

/// The graph input that `value` depends on, found by walking producers back (for messages).
fn input_behind(g: &Graph, value: &str, dep: &super::Set<String>) -> Option<String> {
    let mut current = value.to_string();
    for _ in 0..g.len() + 1 {
        if g.is_input(&current) {
            return Some(current);
        }
        let p = g.producer(&current)?;
        current = super::node_uses(g.node(p))
            .into_iter()
            .find(|x| dep.contains(*x))?
            .to_string();
    }
    None
}

/// Turns tract's failure to load a model into an error naming the main-graph If or Scan node
/// tract's message names (tract runs an If only when both branches give outputs of the same
/// type and shape, whatever its condition), saying whether the If condition depends on the
/// input data. Any other error is returned as it is.
pub fn explain_tract_failure(g: &Graph, err: Error) -> Error {
    let Error::Runtime { reason, .. } = &err else {
        return err;
    };
    let dep = data_dependent(g);
    let mentioned = |n: &crate::onnx::proto::NodeProto| {
        !n.name.is_empty() && reason.contains(&format!("\"{}\"", n.name))
    };
    let candidates: Vec<&crate::onnx::proto::NodeProto> = g
        .nodes()
        .iter()
        .filter(|n| matches!(n.op_type.as_str(), "If" | "Scan"))
        .filter(|n| n.domain.is_empty() || n.domain == "ai.onnx")
        .collect();
    let Some(n) = candidates.iter().find(|n| mentioned(n)).copied() else {
        return err;
    };
    let why = match (n.op_type.as_str(), n.input.first()) {
        ("If", Some(c)) if dep.contains(c.as_str()) => format!(
            "the If condition '{c}' depends on the input data{}, and tract runs an If only \
             when both branches give outputs of the same type and shape",
            input_behind(g, c, &dep)
                .map(|i| format!(" (input '{i}')"))
                .unwrap_or_default()
        ),
        ("If", Some(c)) => format!(
            "the If condition '{c}' does not depend on the input data, but tract does not \
             pick the branch before the run: it runs an If only when both branches give \
             outputs of the same type and shape"
        ),
        (op, _) => format!("tract failed on this {op}"),
    };
    Error::Node {
        node: super::engine::label(n),
        op_type: n.op_type.clone(),
        reason: format!("tract cannot run this model: {why}; tract said: {reason}"),
    }
}

/// Refuses, by node name, what tract must not be given: nodes that fail their spec, Loop
/// nodes, and input ranks it mishandles.
pub fn check_for_tract(g: &Graph, input_ranks: &[(String, usize)]) -> Result<()> {
    if let Some(l) = find_loop(g.proto()) {
        let dep = data_dependent(g);
        let trip = match l.input.first().filter(|m| !m.is_empty()) {
            Some(m) if dep.contains(m.as_str()) => format!(
                "its trip count '{m}' depends on the input data{}; ",
                input_behind(g, m, &dep)
                    .map(|i| format!(" (input '{i}')"))
                    .unwrap_or_default()
            ),
            _ => String::new(),
        };
        return Err(Error::Node {
            node: super::engine::label(l),
            op_type: l.op_type.clone(),
            reason: format!(
                "tract cannot run this model: {trip}tract has no Loop operator (a loop with a \
                 fixed trip count can be unrolled at export)"
            ),
        });
    }
    for n in g.nodes() {
        if let Err(reason) = spec::check_any_domain(n) {
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
