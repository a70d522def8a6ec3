//! Constant folding: every node whose inputs are all constant is evaluated once and replaced by
//! the initializer it computes, so that BatchNormalization parameters behind Identity (PyTorch
//! exports shared parameters that way), weights built by ConstantOfShape (ONNX's light model-zoo
//! models), Constant -> Cast chains and shape arithmetic on static shapes become plain constants
//! the fold rules can read.
//!
//! ```text
//! before:  c (const) -> Identity -> p        k -> ConstantOfShape -> Mul(s) -> w
//! after:   p (initializer)                   w (initializer)
//! ```
//!
//! The constant subgraph is evaluated by tract, so every op tract knows folds with ONNX
//! semantics. Never folded: ops with random output, QuantizeLinear / DequantizeLinear (a QDQ
//! model keeps its form), ops with subgraphs, other domains, nodes producing a graph output, and
//! values over [`MAX_FOLDED_ELEMENTS`] elements (they stay computed, so the model does not grow).
//! A constant subgraph tract cannot evaluate is left as it is, with the reason in the report.
//!
//! For IR version >= 4 an initializer that is also a graph input is an overridable default,
//! not a constant (see [`super::Graph::of_model`]).
//!
//! Also here: [`identity`], the engine rule that removes Identity and inference Dropout nodes.

use serde::Serialize;

use super::engine::{label, Outcome};
use super::{spec, Graph, Names, Patch, Set};
use crate::error::Result;
use crate::onnx::proto::{GraphProto, ModelProto, NodeProto, ValueInfoProto};
use crate::onnx::Model;

/// The largest value constant folding writes as an initializer (16 Mi elements).
pub const MAX_FOLDED_ELEMENTS: usize = 1 << 24;

/// Ops never folded: their output is random, or folding would change the model's form.
const NEVER: &[&str] = &[
    "RandomNormal",
    "RandomUniform",
    "RandomNormalLike",
    "RandomUniformLike",
    "Multinomial",
    "Bernoulli",
    "QuantizeLinear",
    "DequantizeLinear",
    "Constant",
];

/// What constant folding did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ConstantReport {
    /// Nodes evaluated and removed.
    pub folded_nodes: usize,
    /// Values that became initializers.
    pub initializers: Vec<String>,
    /// Why a constant subgraph was left as it is.
    pub skipped: Vec<String>,
    /// Graph inputs with an initializer made constants (`--inputs-as-constants`).
    pub inputs_as_constants: Vec<String>,
    /// Conv / ConvTranspose biases of shape `[C, 1]` or `[1, C]` rewritten as `[C]`
    /// (`node: tensor [C, 1] -> [C]`).
    pub conv_bias_reshaped: Vec<String>,
}

/// Makes every initializer that is also a graph input a constant: it leaves the graph's
/// inputs. For IR version >= 4 such an initializer is a default a caller may override, so it
/// is folded only when asked (`--inputs-as-constants`); below IR 4 it always was a constant.
/// Returns the inputs removed.
pub fn inputs_as_constants(model: &mut Model) -> Vec<String> {
    let g = model.graph_mut();
    let inits: Set<String> = g.initializer.iter().map(|t| t.name.clone()).collect();
    let removed: Vec<String> = g
        .input
        .iter()
        .filter(|v| inits.contains(&v.name))
        .map(|v| v.name.clone())
        .collect();
    g.input.retain(|v| !inits.contains(&v.name));
    removed
}

/// Conv / ConvTranspose biases stored with extra unit axes (`[C, 1]`, `[1, C]`: TensorFlow
/// exports) become `[C]`, the shape ONNX specifies and tract requires; the values and their
/// order are unchanged, so the meaning is the same.
///
/// ```text
/// before:  Conv(x, w, b [C, 1])
/// after:   Conv(x, w, b_1d [C])
/// ```
///
/// Conditions: the bias is a constant whose dims are all 1 but at most one, and, when the
/// weight is constant, its size is the Conv's output channel count (`w.shape[0]`, or
/// `w.shape[1] * group` for ConvTranspose). A new initializer is written (the old one may be
/// shared); the old one goes when nothing else reads it.
pub fn canonicalize_conv_bias(model: &mut Model) -> Result<Vec<String>> {
    if !has_padded_conv_bias(model.graph()) {
        return Ok(Vec::new());
    }
    let (done, patch) = {
        let g = Graph::of_model(model);
        plan_canonical_conv_bias(&g)?
    };
    if let Some(patch) = patch {
        patch.apply(model.graph_mut())?;
    }
    Ok(done)
}

/// [`canonicalize_conv_bias`] as a plan on the index `g`: what it changes and the patch (none
/// when nothing changes).
pub fn plan_canonical_conv_bias(g: &Graph) -> Result<(Vec<String>, Option<Patch>)> {
    let mut done = Vec::new();
    if !has_padded_conv_bias(g.proto()) {
        return Ok((done, None));
    }
    let mut names = Names::new(g.proto());
    let mut patch = Patch::new("canonical Conv bias shapes");
    for (i, n) in g.nodes().iter().enumerate() {
        if !(spec::is_op(n, "Conv") || spec::is_op(n, "ConvTranspose")) {
            continue;
        }
        let Some(b) = n.input.get(2).filter(|s| !s.is_empty()) else {
            continue;
        };
        let Some(t) = g.constant(b)? else { continue };
        let shape = t.shape().to_vec();
        if shape.len() < 2 || shape.iter().filter(|&&d| d != 1).count() > 1 {
            continue;
        }
        let channels = match g.constant(&n.input[1])? {
            Some(w) if w.shape().len() >= 2 => {
                if n.op_type == "Conv" {
                    Some(w.shape()[0])
                } else {
                    let group = crate::onnx::attr::int(n, "group", 1)?;
                    usize::try_from(group)
                        .ok()
                        .and_then(|gr| w.shape()[1].checked_mul(gr))
                }
            }
            _ => None,
        };
        if channels.is_some_and(|c| c != t.len()) {
            continue;
        }
        let name = names.fresh(&format!("{b}_1d"));
        let mut p = t.to_proto(&name);
        p.dims = vec![t.len() as i64];
        patch.add_initializer(p);
        let mut m = n.clone();
        m.input[2] = name;
        patch.replace_node(i, m);
        done.push(format!("{}: '{b}' {shape:?} -> [{}]", label(n), t.len()));
    }
    Ok((done, (!patch.is_empty()).then_some(patch)))
}

/// True when some Conv / ConvTranspose bias may be a constant of shape `[C, 1]`-like: a
/// pre-check over the tensors' dims alone, so graphs without such a bias (nearly all) are not
/// indexed for nothing.
fn has_padded_conv_bias(g: &GraphProto) -> bool {
    let padded = |dims: &[i64]| dims.len() >= 2 && dims.iter().filter(|&&d| d != 1).count() <= 1;
    let mut candidates: Set<&str> = g
        .initializer
        .iter()
        .filter(|t| padded(&t.dims))
        .map(|t| t.name.as_str())
        .collect();
    for n in &g.node {
        if n.op_type == "Constant"
            && n.attribute
                .iter()
                .any(|a| a.t.as_ref().is_some_and(|t| padded(&t.dims)))
        {
            candidates.extend(n.output.iter().map(String::as_str));
        }
    }
    !candidates.is_empty()
        && g.node.iter().any(|n| {
            (n.op_type == "Conv" || n.op_type == "ConvTranspose")
                && n.input
                    .get(2)
                    .is_some_and(|b| candidates.contains(b.as_str()))
        })
}

fn foldable(g: &Graph, n: &NodeProto, folded_values: &Set<&str>) -> bool {
    (n.domain.is_empty() || n.domain == "ai.onnx")
        && !NEVER.contains(&n.op_type.as_str())
        && n.input.iter().any(|x| !x.is_empty())
        && n.input.iter().all(|x| {
            x.is_empty() || folded_values.contains(x.as_str()) || g.const_source(x).is_some()
        })
        && spec::check(n).is_ok()
        && !n
            .attribute
            .iter()
            .any(|a| a.g.is_some() || !a.graphs.is_empty())
        && !n.output.iter().any(|o| g.is_output(o))
}

/// Folds every constant node of the main graph into initializers.
pub fn fold_constants(model: &mut Model) -> Result<ConstantReport> {
    let (report, patch) = {
        let g = Graph::of_model(model);
        plan_fold_constants(model, &g)?
    };
    if let Some(patch) = patch {
        patch.apply(model.graph_mut())?;
    }
    Ok(report)
}

/// [`fold_constants`] as a plan on `g`, the index of `model`'s main graph: the report and the
/// patch that folds (none when nothing folds). The engine runs it on its first index.
pub fn plan_fold_constants(model: &Model, g: &Graph) -> Result<(ConstantReport, Option<Patch>)> {
    let mut report = ConstantReport::default();
    let order;
    // Only nodes reading nothing but constants can fold: the index lists them when the stored
    // order is topological, so most graphs are not walked node by node.
    let nodes: &[usize] = match g.constant_candidates() {
        Some(candidates) => candidates,
        None => {
            order = g.topo_order()?;
            &order
        }
    };
    // Outputs of the nodes chosen so far; the graph's own constants (initializers,
    // Constant nodes) are looked up in the index.
    let mut folded_values: Set<&str> = Set::default();
    let mut folded: Vec<usize> = Vec::new();
    for &i in nodes {
        let n = g.node(i);
        if foldable(g, n, &folded_values) {
            folded.push(i);
            folded_values.extend(
                n.output
                    .iter()
                    .filter(|o| !o.is_empty())
                    .map(String::as_str),
            );
        }
    }
    // tract evaluates the whole constant subgraph at once; a node it refuses (a value over
    // the size bound, an op it lacks) is left computed with everything that depends on it,
    // and the rest is tried again.
    let mut attempts = 0;
    let (values, frontier) = loop {
        if folded.is_empty() {
            return Ok((report, None));
        }
        let folded_set: Set<usize> = folded.iter().copied().collect();
        // The values the rest of the graph reads: they become initializers.
        let frontier: Vec<String> = folded
            .iter()
            .flat_map(|&i| g.node(i).output.iter().filter(|o| !o.is_empty()))
            .filter(|o| g.consumers(o).iter().any(|c| !folded_set.contains(c)))
            .cloned()
            .collect();
        let sub = constant_subgraph(model, g, &folded, &frontier);
        let run = crate::runtime::Runner::with_limit(&sub, &Vec::new(), &[], MAX_FOLDED_ELEMENTS)
            .and_then(|r| r.run(&Vec::new()));
        let e = match run {
            Ok(values) => break (values, frontier),
            Err(e) => e,
        };
        attempts += 1;
        let msg = e.to_string();
        let culprit = folded.iter().position(|&i| {
            let name = &g.node(i).name;
            !name.is_empty()
                && (msg.contains(&format!("'{name}'")) || msg.contains(&format!("'{name}.")))
        });
        match culprit {
            Some(k) if attempts < 16 => {
                report
                    .skipped
                    .push(format!("'{}' stays computed: {e}", g.node(folded[k]).name));
                let mut dropped: Set<String> = g.node(folded[k]).output.iter().cloned().collect();
                folded.remove(k);
                folded.retain(|&i| {
                    let n = g.node(i);
                    let depends = n.input.iter().any(|x| dropped.contains(x));
                    if depends {
                        dropped.extend(n.output.iter().cloned());
                    }
                    !depends
                });
            }
            _ => {
                report.skipped.push(format!(
                    "{} constant nodes were left as they are: tract could not evaluate them ({e})",
                    folded.len()
                ));
                return Ok((report, None));
            }
        }
    };
    let mut patch = Patch::new("fold constants");
    for &i in &folded {
        patch.remove_node(i);
    }
    for (name, value) in frontier.iter().zip(values) {
        patch.add_initializer(value.to_proto(name));
    }
    report.folded_nodes = folded.len();
    report.initializers = frontier;
    Ok((report, Some(patch)))
}

/// A model of the folded nodes alone: the constants they read, the nodes, the frontier values
/// as outputs, no inputs.
fn constant_subgraph(model: &Model, g: &Graph, folded: &[usize], frontier: &[String]) -> Model {
    let mut sub = GraphProto::new();
    sub.name = "constants".into();
    let mut needed: Set<&str> = Set::default();
    for &i in folded {
        let n = g.node(i);
        sub.node.push(n.clone());
        needed.extend(n.input.iter().map(String::as_str));
    }
    for t in &g.proto().initializer {
        if needed.contains(t.name.as_str()) {
            sub.initializer.push(t.clone());
        }
    }
    let constants: Vec<NodeProto> = g
        .nodes()
        .iter()
        .filter(|n| n.op_type == "Constant" && n.output.iter().any(|o| needed.contains(o.as_str())))
        .cloned()
        .collect();
    sub.node.splice(0..0, constants);
    for o in frontier {
        let mut v = ValueInfoProto::new();
        v.name = o.clone();
        sub.output.push(v);
    }
    let mut m = ModelProto::new();
    m.ir_version = model.proto.ir_version.max(4);
    m.opset_import = model.proto.opset_import.clone();
    m.graph = Some(sub).into();
    Model::new(m)
}

/// Identity, and Dropout in inference (no `training_mode`, or a constant false one, and no mask
/// output read), removed:
///
/// ```text
/// before:  x -> Identity -> y -> A, B        x -> P -> t -> Identity -> y (graph output)
/// after:   x -> A, B                         x -> P -> y
/// ```
///
/// Readers of `y` read `x` instead; when `y` is a graph output, the producer of `x` writes `y`
/// instead (when `x` has no other reader and is not a graph output itself), so graph input and
/// output names stay. A reader that captures `y` inside a subgraph keeps the node.
pub fn identity(g: &Graph, i: usize, _: &mut Names) -> Result<Option<Outcome<String>>> {
    let n = g.node(i);
    let dropout = spec::is_op(n, "Dropout");
    if !(spec::is_op(n, "Identity") || dropout) || n.input.is_empty() || n.output.is_empty() {
        return Ok(None);
    }
    if dropout {
        let training = match n.input.get(2).filter(|s| !s.is_empty()) {
            None => false,
            Some(t) => match g.constant(t)? {
                Some(v) => v.to_f64().iter().any(|&b| b != 0.0),
                None => true,
            },
        };
        let mask_read = n
            .output
            .get(1)
            .is_some_and(|m| !m.is_empty() && (g.is_output(m) || !g.consumers(m).is_empty()));
        if training || mask_read {
            return Ok(None);
        }
    }
    let (x, y) = (&n.input[0], &n.output[0]);
    if x.is_empty() || y.is_empty() {
        return Ok(None);
    }
    let mut patch = Patch::new(format!("remove {}", label(n)));
    if !g.is_output(y) {
        for &c in g.consumers(y) {
            let reader = g.node(c);
            if !reader.input.contains(y) {
                return Ok(None); // read inside a subgraph
            }
            let mut r = reader.clone();
            for inp in r.input.iter_mut().filter(|v| *v == y) {
                *inp = x.clone();
            }
            patch.replace_node(c, r);
        }
    } else {
        let Some(p) = g.producer(x) else {
            return Ok(None);
        };
        if g.is_output(x) || g.consumers(x) != [i] {
            return Ok(None);
        }
        let mut prod = g.node(p).clone();
        for o in prod.output.iter_mut().filter(|o| *o == x) {
            *o = y.clone();
        }
        patch.replace_node(p, prod);
    }
    patch.remove_node(i);
    Ok(Some(Outcome::Rewrite(patch, label(n))))
}
