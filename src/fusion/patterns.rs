//! The pattern table, name resolution for explicit lists, and the registry of custom fusers.
//!
//! | chain (ONNX)                  | PyTorch eager           | float result              |
//! |-------------------------------|-------------------------|---------------------------|
//! | Conv -> BN [-> Relu]          | ConvBn(ReLU)1d/2d/3d    | folded Conv [-> Relu]     |
//! | Conv -> Relu                  | ConvReLU1d/2d/3d        | unchanged, grouped        |
//! | ConvTranspose -> BN           | ConvTranspose + BN      | folded ConvTranspose      |
//! | Gemm -> BN, MatMul [-> Add] -> BN | Linear + BatchNorm1d | folded Gemm / MatMul+Add  |
//! | Gemm / MatMul [-> Add] -> Relu | LinearReLU             | unchanged, grouped        |
//! | BN -> Relu                    | BNReLU2d/3d             | unchanged, grouped        |
//! | BN -> Conv (no pads, group 1) | (none)                  | folded forward into Conv  |
//! | Conv / Gemm -> Add/Sub/Mul/Div by a per-channel constant | (exporter decompositions) | folded into W, b |

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::graph::{Graph, Names, Patch};
use crate::onnx::proto::NodeProto;

/// The kinds of fusion groups; in JSON and text by PyTorch's name of the fused module
/// ([`GroupKind::torch_name`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum GroupKind {
    ConvBn,
    #[serde(rename = "ConvBnReLU")]
    ConvBnRelu,
    #[serde(rename = "ConvReLU")]
    ConvRelu,
    ConvTransposeBn,
    LinearBn,
    #[serde(rename = "LinearReLU")]
    LinearRelu,
    #[serde(rename = "BNReLU")]
    BnRelu,
    /// BN -> unpadded Conv, folded forward (ONNX-only; PyTorch has no such module).
    BnConv,
    /// Conv / ConvTranspose / Gemm -> Add, Sub, Mul or Div by a per-channel constant (exporter
    /// decompositions: Paddle's bias Add, TF's BN as Sub / Mul / Add).
    ConvAffine,
    Custom,
}

impl GroupKind {
    /// PyTorch's name of the fused module.
    pub fn torch_name(self) -> &'static str {
        match self {
            GroupKind::ConvBn => "ConvBn",
            GroupKind::ConvBnRelu => "ConvBnReLU",
            GroupKind::ConvRelu => "ConvReLU",
            GroupKind::ConvTransposeBn => "ConvTransposeBn",
            GroupKind::LinearBn => "LinearBn",
            GroupKind::LinearRelu => "LinearReLU",
            GroupKind::BnRelu => "BNReLU",
            GroupKind::BnConv => "BnConv",
            GroupKind::ConvAffine => "ConvAffine",
            GroupKind::Custom => "Custom",
        }
    }
}

/// The group a chain of op types forms, if it is one of PyTorch's eager patterns.
pub fn classify(ops: &[&str]) -> Option<GroupKind> {
    Some(match ops {
        ["Conv", "BatchNormalization"] => GroupKind::ConvBn,
        ["Conv", "BatchNormalization", "Relu"] => GroupKind::ConvBnRelu,
        ["Conv", "Relu"] => GroupKind::ConvRelu,
        ["ConvTranspose", "BatchNormalization"] => GroupKind::ConvTransposeBn,
        ["Gemm", "BatchNormalization"]
        | ["MatMul", "BatchNormalization"]
        | ["MatMul", "Add", "BatchNormalization"] => GroupKind::LinearBn,
        ["Gemm", "Relu"] | ["MatMul", "Relu"] | ["MatMul", "Add", "Relu"] => GroupKind::LinearRelu,
        ["BatchNormalization", "Relu"] => GroupKind::BnRelu,
        ["BatchNormalization", "Conv"] => GroupKind::BnConv,
        _ => return None,
    })
}

/// A user-supplied fuser: the counterpart of PyTorch's `fuser_func` and
/// `additional_fuser_method_mapping`. It claims a chain of op types and rewrites matching
/// chains its own way.
pub trait Fuser: Send + Sync {
    /// A name for reports.
    fn name(&self) -> &str;
    /// The op types of the chain it fuses, first to last.
    fn pattern(&self) -> Vec<String>;
    /// Builds the rewrite of `chain` (node indices, first to last). The patch should keep the
    /// first node's name and produce the last node's outputs.
    fn fuse(&self, graph: &Graph, chain: &[usize], names: &mut Names) -> Result<Patch>;
}

/// Shared handle to a custom fuser.
pub type FuserRef = Arc<dyn Fuser>;

/// Segments of the exporter's scoped node name for a module path: each level adds the path
/// from its last non-numeric component (`features.0.1` -> `features`, `features.0`,
/// `features.0.1`; `sub1.conv` -> `sub1`, `conv`).
pub fn scope_segments(path: &str) -> Vec<String> {
    let parts: Vec<&str> = path.split('.').collect();
    (0..parts.len())
        .map(|k| {
            let start = (0..=k)
                .rev()
                .find(|&j| parts[j].parse::<u64>().is_err())
                .unwrap_or(0);
            parts[start..=k].join(".")
        })
        .collect()
}

fn name_scopes_match(n: &NodeProto, path: &str) -> bool {
    n.metadata_props
        .iter()
        .filter(|kv| kv.key == "pkg.torch.onnx.name_scopes")
        .any(|kv| {
            let scopes: Vec<&str> = kv
                .value
                .split(['\'', '"'])
                .enumerate()
                .filter(|(i, _)| i % 2 == 1)
                .map(|(_, s)| s)
                .filter(|s| !s.is_empty())
                .collect();
            scopes.last() == Some(&path) || scopes.join(".") == path
        })
}

/// Resolves a node name or a PyTorch module path to the compute nodes it stands for, in graph
/// order.
pub fn resolve(g: &Graph, name: &str) -> Result<Vec<usize>> {
    if let Some(i) = g.node_by_name(name) {
        return Ok(vec![i]);
    }
    let skip = |n: &NodeProto| matches!(n.op_type.as_str(), "Constant" | "Identity");
    let prefix = format!("/{}/", scope_segments(name).join("/"));
    let by_scope: Vec<usize> = (0..g.nodes().len())
        .filter(|&i| {
            let n = g.node(i);
            !skip(n)
                && n.name
                    .strip_prefix(&prefix)
                    .is_some_and(|rest| !rest.contains('/'))
        })
        .collect();
    if !by_scope.is_empty() {
        return Ok(by_scope);
    }
    let by_meta: Vec<usize> = (0..g.nodes().len())
        .filter(|&i| !skip(g.node(i)) && name_scopes_match(g.node(i), name))
        .collect();
    if !by_meta.is_empty() {
        return Ok(by_meta);
    }
    Err(Error::Usage(format!(
        "'{name}' is neither a node name nor a module path of this model (looked for nodes named '{prefix}<Op>')"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exporter_scopes() {
        assert_eq!(scope_segments("sub1.conv"), ["sub1", "conv"]);
        assert_eq!(
            scope_segments("features.0.1"),
            ["features", "features.0", "features.0.1"]
        );
        assert_eq!(
            scope_segments("layer1.0.downsample.1"),
            ["layer1", "layer1.0", "downsample", "downsample.1"]
        );
    }

    #[test]
    fn pattern_table() {
        assert_eq!(
            classify(&["Conv", "BatchNormalization", "Relu"]),
            Some(GroupKind::ConvBnRelu)
        );
        assert_eq!(classify(&["Conv", "Relu", "BatchNormalization"]), None);
        assert_eq!(
            classify(&["MatMul", "Add", "BatchNormalization"]),
            Some(GroupKind::LinearBn)
        );
    }
}
