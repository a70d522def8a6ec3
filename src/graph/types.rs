//! Element types of a graph's values, as far as they follow from the graph: declared types
//! (graph inputs, value_info, outputs), constants, and the ops whose output type is fixed
//! (Shape -> int64, Cast -> its `to`, comparisons -> bool, DequantizeLinear -> float, ...) or
//! is their data input's (elementwise ops, Conv, data movement, Gather, Concat, ...).
//!
//! The quantization plan uses it so that only float tensors become activations: the int64
//! shape arithmetic of real exports (Shape -> Gather -> Unsqueeze -> Concat -> Reshape) and
//! integer model inputs stay as they are.

use super::{Graph, Map};
use crate::onnx::attr;
use crate::onnx::proto::{type_proto, TypeProto};
use crate::onnx::ElemType;

fn declared(t: &TypeProto) -> Option<ElemType> {
    match t.value.as_ref()? {
        type_proto::Value::TensorType(tt) => ElemType::from_onnx(tt.elem_type),
        _ => None,
    }
}

/// The element type of every value whose type is known.
pub fn elem_types(g: &Graph) -> Map<String, ElemType> {
    let proto = g.proto();
    let mut ty: Map<String, ElemType> = Map::default();
    for v in proto
        .input
        .iter()
        .chain(&proto.value_info)
        .chain(&proto.output)
    {
        if let Some(t) = v.type_.as_ref().and_then(declared) {
            ty.entry(v.name.clone()).or_insert(t);
        }
    }
    for t in &proto.initializer {
        if let Some(e) = ElemType::from_onnx(t.data_type) {
            ty.insert(t.name.clone(), e);
        }
    }
    let Ok(order) = g.topo_order() else {
        return ty;
    };
    for i in order {
        let n = g.node(i);
        if !(n.domain.is_empty() || n.domain == "ai.onnx") {
            continue;
        }
        let input = |k: usize| n.input.get(k).and_then(|x| ty.get(x.as_str())).copied();
        let from_attr = |name: &str| {
            attr::int(n, name, 0)
                .ok()
                .and_then(|c| i32::try_from(c).ok())
                .and_then(ElemType::from_onnx)
        };
        if n.op_type == "If" {
            // each output has the type its branches declare for it (not the condition's)
            for branch in ["then_branch", "else_branch"] {
                let Some(b) = attr::find(n, branch).and_then(|a| a.g.as_ref()) else {
                    continue;
                };
                for (o, v) in n.output.iter().zip(&b.output) {
                    if let Some(t) = v.type_.as_ref().and_then(declared) {
                        if !o.is_empty() {
                            ty.entry(o.clone()).or_insert(t);
                        }
                    }
                }
            }
            continue;
        }
        let out: Option<ElemType> = match n.op_type.as_str() {
            // outputs of other control flow are not their first input's type
            "Loop" | "Scan" => None,
            "Constant" => super::constant_node_value(n).ok().map(|t| t.elem_type()),
            "Shape" | "Size" | "NonZero" | "ArgMax" | "ArgMin" | "NonMaxSuppression" => {
                Some(ElemType::I64)
            }
            "Cast" => from_attr("to"),
            "CastLike" => input(1),
            "ConstantOfShape" => match attr::tensor(n, "value") {
                Ok(Some(t)) => ElemType::from_onnx(t.data_type),
                _ => Some(ElemType::F32),
            },
            "Equal" | "Less" | "Greater" | "LessOrEqual" | "GreaterOrEqual" | "And" | "Or"
            | "Xor" | "Not" | "IsNaN" | "IsInf" => Some(ElemType::Bool),
            "DequantizeLinear" => Some(ElemType::F32),
            "QuantizeLinear" => match n.input.get(2).filter(|s| !s.is_empty()) {
                Some(z) => ty.get(z.as_str()).copied(),
                None => from_attr("output_dtype").or(Some(ElemType::U8)),
            },
            "RandomNormal" | "RandomUniform" | "RandomNormalLike" | "RandomUniformLike"
            | "EyeLike" => from_attr("dtype").or(input(0)).or(Some(ElemType::F32)),
            "Where" => input(1).or(input(2)),
            _ => input(0),
        };
        if let Some(t) = out {
            if let Some(o) = n.output.first().filter(|o| !o.is_empty()) {
                ty.entry(o.clone()).or_insert(t);
            }
            if n.op_type == "Split" {
                for o in n.output.iter().skip(1).filter(|o| !o.is_empty()) {
                    ty.entry(o.clone()).or_insert(t);
                }
            }
            if matches!(n.op_type.as_str(), "TopK" | "MaxPool") {
                if let Some(o) = n.output.get(1).filter(|o| !o.is_empty()) {
                    ty.entry(o.clone()).or_insert(ElemType::I64);
                }
            }
        }
    }
    ty
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::testing::*;
    use crate::onnx::proto::{attribute_proto::AttributeType, AttributeProto, GraphProto};

    fn branch(out: &str, ty: ElemType) -> AttributeProto {
        let mut g = GraphProto::new();
        g.node.push(node("Identity", "id", &["x"], &[out], vec![]));
        g.output.push(value_info(out, ty, &[2]));
        let mut a = AttributeProto::new();
        a.type_ = AttributeType::GRAPH.into();
        a.g = Some(g).into();
        a
    }

    /// An If's output is typed from its branches: silero-vad's decoder reads a float If output
    /// through an Unsqueeze, which was typed bool (the condition's type) and left out of the
    /// values the target search observes.
    #[test]
    fn an_if_output_has_its_branches_type_not_the_conditions() {
        let mut then_b = branch("t", ElemType::F32);
        then_b.name = "then_branch".into();
        let mut else_b = branch("e", ElemType::F32);
        else_b.name = "else_branch".into();
        let m = model(
            vec![
                node("Greater", "cmp", &["x", "zero"], &["c0"], vec![]),
                node("ReduceMin", "all", &["c0"], &["c"], vec![]),
                node("If", "if", &["c"], &["y"], vec![then_b, else_b]),
                node("Unsqueeze", "u", &["y", "axes"], &["z"], vec![]),
                node("Loop", "loop", &["", "c", "x"], &["l"], vec![]),
            ],
            vec![
                ("zero", f32_scalar(0.0)),
                (
                    "axes",
                    crate::onnx::TensorData::I64(ndarray::arr1(&[0i64]).into_dyn()),
                ),
            ],
            value_info("x", ElemType::F32, &[2]),
            "z",
        );
        let g = Graph::of_model(&m);
        let t = elem_types(&g);
        assert_eq!(t.get("c0"), Some(&ElemType::Bool));
        assert_eq!(t.get("y"), Some(&ElemType::F32));
        assert_eq!(t.get("z"), Some(&ElemType::F32));
        assert_eq!(t.get("l"), None);
    }
}
