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

use super::{is_op, label, single_use};
use crate::fusion::patterns::GroupKind;
use crate::fusion::{FuseReport, FusedGroup, Skipped};
use crate::graph::{Graph, Map};

/// A Relu group found on the final graph, before it is merged with the fold groups.
#[derive(Debug)]
pub struct ReluFinding {
    /// The producer chain and the Relu, by label.
    nodes: Vec<String>,
    kind: GroupKind,
    /// The value between producer and Relu.
    input: String,
    /// The Relu's output.
    output: String,
    /// Why the group cannot be formed, if it cannot.
    skip: Option<String>,
}

/// Adds the Relu groups of `g` to `report`. A Relu reading the output of a fold group already
/// in the report extends that group.
pub fn relu_groups(g: &Graph, report: &mut FuseReport) {
    merge(find(g), report);
}

/// The Relu groups of `g`, in node order.
pub fn find(g: &Graph) -> Vec<ReluFinding> {
    let mut found = Vec::new();
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
        found.push(ReluFinding {
            nodes: chain,
            kind,
            input: x.clone(),
            output: relu.output[0].clone(),
            skip: single_use(g, x),
        });
    }
    found
}

/// Adds `found` to `report`: a Relu reading the output of a fold group already in the report
/// extends that group; the others become groups of their own (or skipped candidates).
pub fn merge(found: Vec<ReluFinding>, report: &mut FuseReport) {
    let mut by_output: Map<String, usize> = report
        .groups
        .iter()
        .enumerate()
        .filter(|(_, gr)| matches!(gr.kind, GroupKind::ConvBn | GroupKind::LinearBn))
        .map(|(k, gr)| (gr.output.clone(), k))
        .collect();
    for f in found {
        if let Some(reason) = f.skip {
            report.skipped.push(Skipped {
                nodes: f.nodes,
                reason,
            });
            continue;
        }
        match by_output.remove(f.input.as_str()) {
            Some(k) => {
                let gr = &mut report.groups[k];
                if gr.kind == GroupKind::ConvBn {
                    gr.kind = GroupKind::ConvBnRelu;
                }
                if let Some(relu) = f.nodes.last() {
                    gr.nodes.push(relu.clone());
                }
            }
            None => report.groups.push(FusedGroup {
                kind: f.kind,
                nodes: f.nodes,
                folded: false,
                fuser: None,
                output: f.output,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::testing::*;
    use crate::onnx::proto::NodeProto;
    use crate::onnx::{ElemType, Model};

    /// x [2, 2] -> nodes..., with constants for a 2x2 weight, a bias and BN parameters.
    fn with(nodes: Vec<NodeProto>, output: &str) -> Model {
        model(
            nodes,
            vec![
                ("w", f32t(&[2, 2], seq(4, 1))),
                ("w4", f32t(&[2, 2, 1, 1], seq(4, 2))),
                ("b", f32v(&[0.1, -0.2])),
                ("g", f32v(&[1.5, -0.7])),
                ("beta", f32v(&[0.1, -0.2])),
                ("mean", f32v(&[0.05, 0.1])),
                ("var", f32v(&[0.5, 1.2])),
            ],
            value_info("x", ElemType::F32, &[2, 2]),
            output,
        )
    }

    fn relu(input: &str) -> NodeProto {
        node("Relu", "relu", &[input], &["y"], vec![])
    }

    fn groups_of(m: &Model, report: FuseReport) -> FuseReport {
        let mut report = report;
        relu_groups(&Graph::of_model(m), &mut report);
        report
    }

    fn group(kind: GroupKind, nodes: &[&str], output: &str, folded: bool) -> FusedGroup {
        FusedGroup {
            kind,
            nodes: nodes.iter().map(|s| s.to_string()).collect(),
            folded,
            fuser: None,
            output: output.into(),
        }
    }

    #[test]
    fn conv_gemm_matmul_and_bn_relu_groups() {
        let cases: Vec<(Vec<NodeProto>, GroupKind, Vec<&str>)> = vec![
            (
                vec![node("Conv", "conv", &["x", "w4"], &["c"], vec![])],
                GroupKind::ConvRelu,
                vec!["conv", "relu"],
            ),
            (
                vec![node("Gemm", "fc", &["x", "w", "b"], &["c"], vec![])],
                GroupKind::LinearRelu,
                vec!["fc", "relu"],
            ),
            (
                vec![node("MatMul", "mm", &["x", "w"], &["c"], vec![])],
                GroupKind::LinearRelu,
                vec!["mm", "relu"],
            ),
            (
                vec![
                    node("MatMul", "mm", &["x", "w"], &["m"], vec![]),
                    node("Add", "add", &["m", "b"], &["c"], vec![]),
                ],
                GroupKind::LinearRelu,
                vec!["mm", "add", "relu"],
            ),
            (
                vec![node(
                    "BatchNormalization",
                    "bn",
                    &["x", "g", "beta", "mean", "var"],
                    &["c"],
                    vec![],
                )],
                GroupKind::BnRelu,
                vec!["bn", "relu"],
            ),
        ];
        for (mut nodes, kind, chain) in cases {
            nodes.push(relu("c"));
            let m = with(nodes, "y");
            let r = groups_of(&m, FuseReport::default());
            assert_eq!(r.groups, [group(kind, &chain, "y", false)], "{chain:?}");
            assert!(r.skipped.is_empty());
        }
    }

    #[test]
    fn a_relu_after_a_folded_group_extends_it() {
        // conv+bn was folded into conv (output "c"); the Relu joins the group
        let m = with(
            vec![
                node("Conv", "conv", &["x", "w4"], &["c"], vec![]),
                relu("c"),
            ],
            "y",
        );
        let mut report = FuseReport::default();
        report
            .groups
            .push(group(GroupKind::ConvBn, &["conv", "bn"], "c", true));
        report
            .groups
            .push(group(GroupKind::LinearBn, &["fc", "bn2"], "other", true));
        let r = groups_of(&m, report);
        assert_eq!(r.groups.len(), 2);
        assert_eq!(
            r.groups[0],
            group(GroupKind::ConvBnRelu, &["conv", "bn", "relu"], "c", true)
        );
        // a Linear+BN group gains the Relu but keeps its kind
        let m = with(
            vec![node("Gemm", "fc", &["x", "w"], &["c"], vec![]), relu("c")],
            "y",
        );
        let mut report = FuseReport::default();
        report
            .groups
            .push(group(GroupKind::LinearBn, &["fc", "bn"], "c", true));
        let r = groups_of(&m, report);
        assert_eq!(
            r.groups,
            [group(GroupKind::LinearBn, &["fc", "bn", "relu"], "c", true)]
        );
    }

    #[test]
    fn skips_an_intermediate_with_two_consumers_or_a_graph_output() {
        let mut m = with(
            vec![
                node("Conv", "conv", &["x", "w4"], &["c"], vec![]),
                relu("c"),
                node("Sigmoid", "sig", &["c"], &["s"], vec![]),
            ],
            "y",
        );
        add_output(&mut m, "s");
        let r = groups_of(&m, FuseReport::default());
        assert!(r.groups.is_empty());
        assert_eq!(
            r.skipped,
            [Skipped {
                nodes: vec!["conv".into(), "relu".into()],
                reason: "'c' has 2 consumers".into()
            }]
        );
        let mut m = with(
            vec![node("Gemm", "fc", &["x", "w"], &["c"], vec![]), relu("c")],
            "y",
        );
        add_output(&mut m, "c");
        let r = groups_of(&m, FuseReport::default());
        assert!(r.groups.is_empty());
        assert_eq!(r.skipped[0].reason, "'c' is a graph output");
    }

    #[test]
    fn no_group_for_other_producers_or_a_non_constant_add() {
        // MatMul -> Add(x) -> Relu: the Add's other operand is not a constant
        let m = with(
            vec![
                node("MatMul", "mm", &["x", "w"], &["m"], vec![]),
                node("Add", "add", &["m", "x"], &["c"], vec![]),
                relu("c"),
            ],
            "y",
        );
        let r = groups_of(&m, FuseReport::default());
        assert!(r.groups.is_empty() && r.skipped.is_empty());
        let m = with(
            vec![node("Sigmoid", "sig", &["x"], &["c"], vec![]), relu("c")],
            "y",
        );
        let r = groups_of(&m, FuseReport::default());
        assert!(r.groups.is_empty() && r.skipped.is_empty());
        // a Relu on the graph input
        let m = with(vec![relu("x")], "y");
        assert!(groups_of(&m, FuseReport::default()).groups.is_empty());
    }

    #[test]
    fn malformed_nodes_form_no_group() {
        // Conv with one input
        let m = with(
            vec![node("Conv", "conv", &["x"], &["c"], vec![]), relu("c")],
            "y",
        );
        let r = groups_of(&m, FuseReport::default());
        assert!(r.groups.is_empty() && r.skipped.is_empty());
        // Relu with two inputs
        let mut m = with(
            vec![
                node("Conv", "conv", &["x", "w4"], &["c"], vec![]),
                relu("c"),
            ],
            "y",
        );
        m.graph_mut().node[1].input.push("x".into());
        let r = groups_of(&m, FuseReport::default());
        assert!(r.groups.is_empty() && r.skipped.is_empty());
        // Relu with no output
        let mut m = with(
            vec![
                node("Conv", "conv", &["x", "w4"], &["c"], vec![]),
                relu("c"),
            ],
            "c",
        );
        m.graph_mut().node[1].output.clear();
        assert!(groups_of(&m, FuseReport::default()).groups.is_empty());
    }
}
