//! If nodes whose condition depends only on the input shapes, resolved for one run in tract.
//!
//! tract runs an If only when both branches give outputs of the same type and shape, even when
//! the condition is known before the run (silero-vad's decoder: `If(Shape(x)[-1] == 1, then:
//! Squeeze, else: Identity)`). For the shapes of one run the condition is a constant: qfold
//! evaluates it in tract (the nodes it depends on, none of them control flow, on the run's
//! sample) and hands tract the chosen branch in place of the If. Nested Ifs the branch brings
//! in are resolved the same way, round after round.
//!
//! Only the copy tract receives changes: the model qfold writes keeps its If nodes, which stay
//! right for every input shape. A condition that depends on the input data (through anything
//! but Shape and Size) is left alone, and tract's refusal is explained as before
//! ([`super::guard::explain_tract_failure`]).

use std::collections::{HashMap, HashSet};

use crate::error::{Error, Result};
use crate::onnx::attr;
use crate::onnx::proto::{GraphProto, ModelProto, NodeProto, TensorProto};
use crate::onnx::{Model, TensorData};
use crate::runtime::Sample;

/// Rounds of resolution (each inlines the Ifs whose condition it can evaluate).
const MAX_ROUNDS: usize = 16;

/// The main graph's nodes with every If whose condition tract can evaluate for `sample`'s
/// shapes replaced by the nodes of the branch it takes (branch initializers become Constant
/// nodes), and the Ifs resolved with the branch taken; `None` when nothing was resolved.
pub fn resolve(model: &Model, sample: &Sample) -> Result<Option<(Vec<NodeProto>, Vec<String>)>> {
    let g = model.graph();
    if !g.node.iter().any(is_if) {
        return Ok(None);
    }
    let mut nodes = g.node.clone();
    let mut resolved = Vec::new();
    let inputs: HashSet<&str> = g
        .input
        .iter()
        .map(|v| v.name.as_str())
        .filter(|n| !g.initializer.iter().any(|t| t.name == *n))
        .collect();
    for _ in 0..MAX_ROUNDS {
        let ready = resolvable(&nodes, &inputs);
        if ready.is_empty() {
            break;
        }
        let conds: Vec<String> = ready.iter().map(|&i| nodes[i].input[0].clone()).collect();
        let values = evaluate(model, &nodes, &conds, sample)?;
        let mut taken: HashMap<usize, bool> = HashMap::new();
        for (&i, v) in ready.iter().zip(&values) {
            taken.insert(i, truth(&nodes[i], v)?);
        }
        let mut names: HashSet<String> = nodes
            .iter()
            .flat_map(|n| n.output.iter().chain(&n.input).cloned())
            .chain(g.initializer.iter().map(|t| t.name.clone()))
            .chain(g.input.iter().map(|v| v.name.clone()))
            .collect();
        let mut next = Vec::with_capacity(nodes.len());
        for (i, n) in nodes.into_iter().enumerate() {
            match taken.get(&i) {
                Some(&then) => {
                    resolved.push(format!(
                        "{} ({} branch)",
                        crate::graph::engine::label(&n),
                        if then { "then" } else { "else" }
                    ));
                    next.extend(inline(&n, then, &mut names)?);
                }
                None => next.push(n),
            }
        }
        nodes = next;
    }
    Ok((!resolved.is_empty()).then_some((nodes, resolved)))
}

/// The node writing each value of `nodes`.
fn producers(nodes: &[NodeProto]) -> HashMap<&str, usize> {
    nodes
        .iter()
        .enumerate()
        .flat_map(|(i, n)| n.output.iter().map(move |o| (o.as_str(), i)))
        .collect()
}

fn is_if(n: &NodeProto) -> bool {
    n.op_type == "If" && (n.domain.is_empty() || n.domain == "ai.onnx")
}

fn is_control_flow(n: &NodeProto) -> bool {
    matches!(n.op_type.as_str(), "If" | "Loop" | "Scan")
}

/// The Ifs of `nodes` whose condition depends on no input value (Shape and Size read only
/// shapes) and on no control-flow node.
fn resolvable(nodes: &[NodeProto], inputs: &HashSet<&str>) -> Vec<usize> {
    let producer = producers(nodes);
    let mut out = Vec::new();
    'ifs: for (i, n) in nodes.iter().enumerate() {
        let Some(cond) = n.input.first().filter(|c| !c.is_empty()) else {
            continue;
        };
        if !is_if(n) {
            continue;
        }
        // walk the condition's producers back; behind a Shape or Size only the shapes
        // matter, so the input data may be reached there (tract still runs those nodes)
        let mut stack = vec![(cond.as_str(), false)];
        let mut seen: HashSet<(&str, bool)> = HashSet::new();
        while let Some((v, shape_only)) = stack.pop() {
            if !seen.insert((v, shape_only)) {
                continue;
            }
            if inputs.contains(v) {
                if shape_only {
                    continue;
                }
                continue 'ifs; // the data's values reach the condition
            }
            let Some(&p) = producer.get(v) else {
                continue; // an initializer
            };
            let pn = &nodes[p];
            if p == i || is_control_flow(pn) {
                continue 'ifs;
            }
            let through = shape_only || matches!(pn.op_type.as_str(), "Shape" | "Size");
            stack.extend(
                crate::graph::node_uses(pn)
                    .into_iter()
                    .map(|x| (x, through)),
            );
        }
        out.push(i);
    }
    out
}

/// Runs, in tract, the nodes `conds` depend on (with the inputs of `sample`) and returns the
/// values of `conds`.
fn evaluate(
    model: &Model,
    nodes: &[NodeProto],
    conds: &[String],
    sample: &Sample,
) -> Result<Vec<TensorData>> {
    let g = model.graph();
    let producer = producers(nodes);
    let mut keep = vec![false; nodes.len()];
    let mut stack: Vec<&str> = conds.iter().map(String::as_str).collect();
    let mut used: HashSet<&str> = HashSet::new();
    while let Some(v) = stack.pop() {
        if !used.insert(v) {
            continue;
        }
        if let Some(&p) = producer.get(v) {
            if !keep[p] {
                keep[p] = true;
                stack.extend(crate::graph::node_uses(&nodes[p]));
            }
        }
    }
    let mut graph = GraphProto::new();
    graph.name = format!("{}/if_conditions", g.name);
    graph.node = nodes
        .iter()
        .zip(&keep)
        .filter(|(_, &k)| k)
        .map(|(n, _)| n.clone())
        .collect();
    graph.initializer = g
        .initializer
        .iter()
        .filter(|t| used.contains(t.name.as_str()))
        .cloned()
        .collect();
    graph.input = g
        .input
        .iter()
        .filter(|v| sample.iter().any(|(n, _)| *n == v.name))
        .cloned()
        .collect();
    for c in conds {
        let mut v = crate::onnx::proto::ValueInfoProto::new();
        v.name = c.clone();
        graph.output.push(v);
    }
    let mut proto = ModelProto::new();
    proto.ir_version = model.proto.ir_version;
    proto.opset_import = model.proto.opset_import.clone();
    proto.functions = model.proto.functions.clone();
    proto.graph = protobuf::MessageField::some(graph);
    let part = Model::new(proto);
    let feed: Sample = sample
        .iter()
        .filter(|(n, _)| part.graph().input.iter().any(|v| v.name == *n))
        .cloned()
        .collect();
    let out = crate::runtime::run_once(&part, &feed)?;
    conds
        .iter()
        .map(|c| {
            out.iter()
                .find(|(n, _)| n == c)
                .map(|(_, t)| t.clone())
                .ok_or_else(|| Error::tensor(c, "the If condition was not computed"))
        })
        .collect()
}

/// The condition's value as a bool (one element, of any numeric or bool type).
fn truth(n: &NodeProto, v: &TensorData) -> Result<bool> {
    let values = v.to_f64();
    let mut it = values.iter();
    match (it.next(), it.next()) {
        (Some(&x), None) => Ok(x != 0.0),
        _ => Err(Error::Node {
            node: crate::graph::engine::label(n),
            op_type: n.op_type.clone(),
            reason: format!(
                "its condition has {} values for these input shapes; an If needs one",
                values.len()
            ),
        }),
    }
}

/// The nodes that replace If `n` when it takes its then (`then`) or else branch: the branch's
/// nodes, its initializers as Constant nodes, its outputs written under the If's output
/// names, and any name it defines that the main graph has (in `names`) renamed.
fn inline(n: &NodeProto, then: bool, names: &mut HashSet<String>) -> Result<Vec<NodeProto>> {
    let which = if then { "then_branch" } else { "else_branch" };
    let branch = attr::find(n, which)
        .and_then(|a| a.g.as_ref())
        .ok_or_else(|| Error::Node {
            node: crate::graph::engine::label(n),
            op_type: n.op_type.clone(),
            reason: format!("no {which} graph"),
        })?;
    if branch.output.len() != n.output.len() {
        return Err(Error::Node {
            node: crate::graph::engine::label(n),
            op_type: n.op_type.clone(),
            reason: format!(
                "its {which} has {} outputs for the If's {}",
                branch.output.len(),
                n.output.len()
            ),
        });
    }
    let label = crate::graph::engine::label(n);
    // names the branch defines
    let defined: Vec<&str> = branch
        .node
        .iter()
        .flat_map(|m| m.output.iter())
        .chain(branch.initializer.iter().map(|t| &t.name))
        .map(String::as_str)
        .filter(|s| !s.is_empty())
        .collect();
    let produced: HashSet<&str> = defined.iter().copied().collect();
    let mut rename: HashMap<String, String> = HashMap::new();
    // a branch output the branch computes is written under the If's output name
    let mut identities = Vec::new();
    for (b, o) in branch.output.iter().zip(&n.output) {
        if o.is_empty() {
            continue;
        }
        if produced.contains(b.name.as_str()) && !rename.contains_key(&b.name) {
            rename.insert(b.name.clone(), o.clone());
        } else {
            // an outer value, or a branch output listed twice
            let src = rename
                .get(&b.name)
                .cloned()
                .unwrap_or_else(|| b.name.clone());
            let mut id = NodeProto::new();
            id.op_type = "Identity".into();
            id.name = format!("{label}/output_{o}");
            id.input = vec![src];
            id.output = vec![o.clone()];
            identities.push(id);
        }
    }
    for d in &defined {
        if rename.contains_key(*d) {
            continue;
        }
        if names.contains(*d) {
            let mut k = 0usize;
            let fresh = loop {
                let f = format!("{label}/{d}_{k}");
                if !names.contains(&f) {
                    break f;
                }
                k += 1;
            };
            names.insert(fresh.clone());
            rename.insert(d.to_string(), fresh);
        } else {
            names.insert(d.to_string());
        }
    }
    let mut out = Vec::with_capacity(branch.node.len() + branch.initializer.len() + 1);
    for t in &branch.initializer {
        out.push(constant_node(t, rename.get(&t.name).unwrap_or(&t.name)));
    }
    for m in &branch.node {
        let mut m = m.clone();
        for x in m.input.iter_mut().chain(m.output.iter_mut()) {
            if let Some(r) = rename.get(x.as_str()) {
                *x = r.clone();
            }
        }
        for a in &mut m.attribute {
            if let Some(sub) = a.g.as_mut() {
                rename_captured(sub, &rename);
            }
            for sub in &mut a.graphs {
                rename_captured(sub, &rename);
            }
        }
        if m.name.is_empty() {
            // by its first output, unique once renamed: two unnamed nodes of one op type
            // must not share a name
            let out = m.output.first().cloned().unwrap_or_default();
            m.name = format!("{label}/{}/{out}", m.op_type);
        }
        out.push(m);
    }
    // the Identities read values the branch defines: after its nodes
    for mut id in identities {
        if let Some(r) = rename.get(&id.input[0]) {
            id.input[0] = r.clone();
        }
        out.push(id);
    }
    Ok(out)
}

/// Renames, inside a nested subgraph, the outer values it reads (names it defines itself shadow
/// the outer ones and are left alone).
fn rename_captured(g: &mut GraphProto, rename: &HashMap<String, String>) {
    let local: HashSet<String> = g
        .node
        .iter()
        .flat_map(|n| n.output.iter().cloned())
        .chain(g.initializer.iter().map(|t| t.name.clone()))
        .chain(g.input.iter().map(|v| v.name.clone()))
        .collect();
    let inner: HashMap<String, String> = rename
        .iter()
        .filter(|(k, _)| !local.contains(*k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    for n in &mut g.node {
        for x in &mut n.input {
            if let Some(r) = inner.get(x.as_str()) {
                *x = r.clone();
            }
        }
        for a in &mut n.attribute {
            if let Some(sub) = a.g.as_mut() {
                rename_captured(sub, &inner);
            }
            for sub in &mut a.graphs {
                rename_captured(sub, &inner);
            }
        }
    }
    for o in &mut g.output {
        if let Some(r) = inner.get(o.name.as_str()) {
            o.name = r.clone();
        }
    }
}

/// A Constant node holding `t` under `name`.
fn constant_node(t: &TensorProto, name: &str) -> NodeProto {
    let mut t = t.clone();
    t.name = name.to_string();
    let mut c = NodeProto::new();
    c.op_type = "Constant".into();
    c.name = format!("{name}/constant");
    c.output = vec![name.to_string()];
    c.attribute.push(attr::make_tensor("value", t));
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::testing::*;
    use crate::onnx::ElemType;

    fn graph_attr(
        name: &str,
        nodes: Vec<NodeProto>,
        output: &str,
    ) -> crate::onnx::proto::AttributeProto {
        let mut g = GraphProto::new();
        g.name = name.into();
        g.node = nodes;
        g.output.push(untyped(output));
        let mut a = crate::onnx::proto::AttributeProto::new();
        a.name = name.into();
        a.type_ = crate::onnx::proto::attribute_proto::AttributeType::GRAPH.into();
        a.g = protobuf::MessageField::some(g);
        a
    }

    /// x [1, 2]; If(Shape(x)[1] == 2, then: Relu(Relu(x)) with unnamed nodes, else: x[..., 0]).
    fn shape_if() -> Model {
        let then = graph_attr(
            "then_branch",
            vec![
                node("Relu", "", &["x"], &["a"], vec![]),
                node("Relu", "", &["a"], &["b"], vec![]),
            ],
            "b",
        );
        let other = graph_attr(
            "else_branch",
            vec![node(
                "ReduceMax",
                "",
                &["x"],
                &["e"],
                vec![int("keepdims", 0)],
            )],
            "e",
        );
        model(
            vec![
                node("Shape", "shape", &["x"], &["s"], vec![]),
                node(
                    "Gather",
                    "width",
                    &["s", "one"],
                    &["w"],
                    vec![int("axis", 0)],
                ),
                node("Equal", "is_two", &["w", "two"], &["c"], vec![]),
                node("If", "choose", &["c"], &["y"], vec![then, other]),
            ],
            vec![
                ("one", TensorData::I64(ndarray::arr0(1i64).into_dyn())),
                ("two", TensorData::I64(ndarray::arr0(2i64).into_dyn())),
            ],
            value_info("x", ElemType::F32, &[1, 2]),
            "y",
        )
    }

    #[test]
    fn the_branch_taken_replaces_the_if_with_unique_node_names() {
        let m = shape_if();
        let s = sample("x", &[1, 2], vec![-1.0, 3.0]);
        let (nodes, resolved) = resolve(&m, &s).unwrap().expect("resolved");
        assert_eq!(resolved, ["choose (then branch)"]);
        assert!(!nodes.iter().any(|n| n.op_type == "If"));
        let names: HashSet<&str> = nodes.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(
            names.len(),
            nodes.len(),
            "{:?}",
            nodes.iter().map(|n| &n.name).collect::<Vec<_>>()
        );
        // the last Relu writes the If's output
        assert!(nodes
            .iter()
            .any(|n| n.op_type == "Relu" && n.output == ["y"]));
        // and tract runs the model: Relu(Relu([-1, 3])) = [0, 3]
        let out = crate::runtime::run_once(&m, &s).unwrap();
        assert_eq!(
            out[0].1.to_f64().iter().copied().collect::<Vec<_>>(),
            [0.0, 3.0]
        );
    }

    #[test]
    fn a_condition_on_the_input_values_is_left_alone() {
        let mut m = shape_if();
        // the condition now reads x's values (ReduceMax), not its shape
        let g = m.graph_mut();
        g.node[0] = node(
            "ReduceMax",
            "shape",
            &["x"],
            &["s"],
            vec![int("keepdims", 0)],
        );
        g.node[1] = node("Cast", "width", &["s"], &["w"], vec![int("to", 7)]);
        let s = sample("x", &[1, 2], vec![-1.0, 3.0]);
        assert!(resolve(&m, &s).unwrap().is_none());
    }
}
