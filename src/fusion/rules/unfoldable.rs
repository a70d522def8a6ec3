//! No rewrite: the last rule tried on a BatchNormalization, which says why it stays.
//!
//! A BN that passes its spec but that no fold rule took stays, with the reason in the report:
//! its input is a graph input or constant, it follows a Relu (Conv -> Relu -> BN has no backward
//! fold), or its producer is an op nothing folds into. A BN that fails its spec is reported by
//! the engine with the spec's reason.

use super::{is_op, label, Outcome};
use crate::error::Result;
use crate::graph::engine;
use crate::graph::{Graph, Names};

/// Declines every BN it sees, with the reason it stays.
pub fn unfoldable_bn(g: &Graph, bn: usize, _: &mut Names) -> Result<Option<Outcome>> {
    let bnn = g.node(bn);
    if !is_op(bnn, "BatchNormalization") {
        return Ok(None);
    }
    let reason = match g.producer(&bnn.input[0]) {
        None => "its input is a graph input or constant: nothing to fold into".to_string(),
        Some(p) => {
            let prod = g.node(p);
            if let Err(r) = crate::graph::spec::check(prod) {
                format!(
                    "its producer '{}' ({}) is malformed: {r}",
                    label(prod),
                    prod.op_type
                )
            } else if is_op(prod, "Relu") {
                "it follows a Relu: Conv -> Relu -> BN has no backward fold".to_string()
            } else {
                format!(
                    "its producer '{}' is a {}, not Conv, ConvTranspose, Gemm or MatMul",
                    label(prod),
                    prod.op_type
                )
            }
        }
    };
    Ok(Some(engine::Outcome::Decline(vec![label(bnn)], reason)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fusion::rules::conv_bn::conv_bn;
    use crate::graph::engine::{run, Rule};
    use crate::graph::testing::*;
    use crate::onnx::proto::NodeProto;
    use crate::onnx::{ElemType, Model};

    fn bn(name: &str, input: &str, output: &str) -> NodeProto {
        node(
            "BatchNormalization",
            name,
            &[input, "g", "beta", "mean", "var"],
            &[output],
            vec![],
        )
    }

    /// x [1, 2, 3, 3] -> nodes..., with BN parameters for 2 channels and a Conv weight.
    fn with(nodes: Vec<NodeProto>, output: &str) -> Model {
        model(
            nodes,
            vec![
                ("w", f32t(&[2, 2, 1, 1], seq(4, 1))),
                ("g", f32v(&[1.5, -0.7])),
                ("beta", f32v(&[0.1, -0.2])),
                ("mean", f32v(&[0.05, 0.1])),
                ("var", f32v(&[0.5, 1.2])),
            ],
            value_info("x", ElemType::F32, &[1, 2, 3, 3]),
            output,
        )
    }

    #[test]
    fn a_bn_on_a_graph_input_stays_with_the_reason() {
        let m = with(vec![bn("bn", "x", "y")], "y");
        let (nodes, reason) = declined(&m, "bn", unfoldable_bn);
        assert_eq!(nodes, ["bn"]);
        assert_eq!(
            reason,
            "its input is a graph input or constant: nothing to fold into"
        );
    }

    #[test]
    fn a_bn_after_a_relu_has_no_backward_fold() {
        let m = with(
            vec![
                node("Conv", "conv", &["x", "w"], &["c"], vec![]),
                node("Relu", "relu", &["c"], &["r"], vec![]),
                bn("bn", "r", "y"),
            ],
            "y",
        );
        assert_eq!(
            declined(&m, "bn", unfoldable_bn).1,
            "it follows a Relu: Conv -> Relu -> BN has no backward fold"
        );
    }

    #[test]
    fn a_bn_after_another_op_names_it() {
        let m = with(
            vec![
                node("Sigmoid", "sig", &["x"], &["s"], vec![]),
                bn("bn", "s", "y"),
            ],
            "y",
        );
        assert_eq!(
            declined(&m, "bn", unfoldable_bn).1,
            "its producer 'sig' is a Sigmoid, not Conv, ConvTranspose, Gemm or MatMul"
        );
    }

    #[test]
    fn a_malformed_producer_is_named_with_its_spec_failure() {
        let m = with(
            vec![
                node("Conv", "conv", &["x"], &["c"], vec![]),
                bn("bn", "c", "y"),
            ],
            "y",
        );
        assert_eq!(
            declined(&m, "bn", unfoldable_bn).1,
            "its producer 'conv' (Conv) is malformed: has 1 inputs, expects 2 to 3"
        );
    }

    #[test]
    fn only_bns_that_no_fold_rule_took_are_reported() {
        // conv -> bn1 folds; bn2 on the graph input stays, with its reason
        let mut m = with(
            vec![
                node("Conv", "conv", &["x", "w"], &["c"], vec![]),
                bn("bn1", "c", "y"),
                bn("bn2", "x", "z"),
            ],
            "y",
        );
        add_output(&mut m, "z");
        let rules = [
            Rule::new("conv_bn", conv_bn),
            Rule::new("unfoldable_bn", unfoldable_bn),
        ];
        let r = run(&mut m, &rules, true).unwrap();
        assert_eq!(r.applied.len(), 1);
        assert_eq!(r.declined.len(), 1);
        assert_eq!(r.declined[0].rule, "unfoldable_bn");
        assert_eq!(r.declined[0].nodes, ["bn2"]);
        assert_eq!(ops(&m), ["Conv", "BatchNormalization"]);
    }

    #[test]
    fn other_nodes_and_malformed_bns_are_not_matched() {
        let m = with(
            vec![
                node("Conv", "conv", &["x", "w"], &["c"], vec![]),
                bn("bn", "c", "y"),
            ],
            "y",
        );
        not_applied(&m, "conv", unfoldable_bn);
        let mut m = with(vec![bn("bn", "x", "y")], "y");
        m.graph_mut().node[0].input.truncate(4);
        not_applied(&m, "bn", unfoldable_bn);
        let mut m = with(vec![bn("bn", "x", "y")], "y");
        m.graph_mut().node[0]
            .attribute
            .push(float("epsilon", f32::NAN));
        not_applied(&m, "bn", unfoldable_bn);
    }
}
