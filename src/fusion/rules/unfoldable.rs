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
