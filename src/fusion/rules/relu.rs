//! No rewrite: the Relu groups of PyTorch's eager fusion.
//!
//! ```text
//! Conv -> Relu                       ConvReLU   (ConvBnReLU when the Conv is a folded Conv+BN)
//! Gemm / MatMul [-> Add] -> Relu     LinearReLU
//! BatchNormalization -> Relu         BNReLU
//! ```
//!
//! Conditions: the value between the producer and the Relu has exactly one consumer and is not
//! a graph output (otherwise the candidate is listed as skipped with the reason); for
//! MatMul -> Add, the Add's other operand is constant. Nothing is folded: the group is recorded
//! so quantization treats it as one unit (the Relu goes into the output range).

use std::collections::HashMap;

use super::{is_op, label, single_use};
use crate::fusion::patterns::GroupKind;
use crate::fusion::{FuseReport, FusedGroup, Skipped};
use crate::graph::Graph;

/// Adds the Relu groups of `g` to `report`. A Relu reading the output of a fold group already
/// in the report extends that group.
pub fn relu_groups(g: &Graph, report: &mut FuseReport) {
    let mut by_output: HashMap<String, usize> = report
        .groups
        .iter()
        .enumerate()
        .filter(|(_, gr)| matches!(gr.kind, GroupKind::ConvBn | GroupKind::LinearBn))
        .map(|(k, gr)| (gr.output.clone(), k))
        .collect();
    for r in 0..g.len() {
        let relu = g.node(r);
        if !is_op(relu, "Relu") {
            continue;
        }
        let x = &relu.input[0];
        let Some(p) = g.producer(x) else { continue };
        let prod = g.node(p);
        let mut chain = vec![label(prod)];
        let kind = if is_op(prod, "Conv") {
            GroupKind::ConvRelu
        } else if is_op(prod, "Gemm") || is_op(prod, "MatMul") {
            GroupKind::LinearRelu
        } else if is_op(prod, "Add") {
            let mm = prod.input.iter().filter_map(|i| g.producer(i)).find(|&q| {
                let m = g.node(q);
                is_op(m, "MatMul")
                    && single_use(g, &m.output[0]).is_none()
                    && prod.input.iter().any(|i| g.const_source(i).is_some())
            });
            match mm {
                Some(q) => {
                    chain.insert(0, label(g.node(q)));
                    GroupKind::LinearRelu
                }
                None => continue,
            }
        } else if is_op(prod, "BatchNormalization") {
            GroupKind::BnRelu
        } else {
            continue;
        };
        chain.push(label(relu));
        if let Some(reason) = single_use(g, x) {
            report.skipped.push(Skipped {
                nodes: chain,
                reason,
            });
            continue;
        }
        match by_output.remove(x.as_str()) {
            Some(k) => {
                let gr = &mut report.groups[k];
                if gr.kind == GroupKind::ConvBn {
                    gr.kind = GroupKind::ConvBnRelu;
                }
                gr.nodes.push(label(relu));
            }
            None => report.groups.push(FusedGroup {
                kind,
                nodes: chain,
                folded: false,
                fuser: None,
                output: relu.output[0].clone(),
            }),
        }
    }
}
