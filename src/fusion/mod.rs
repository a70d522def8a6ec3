//! PyTorch eager fusion (`torch.ao.quantization.fuse_modules`) on ONNX graphs.
//!
//! [`fuse`] folds BatchNormalization into the Conv, ConvTranspose, Gemm or MatMul before it,
//! and records Conv/Linear/BN + Relu groups, either everywhere (automatic) or for explicit lists
//! of node names or PyTorch module paths. In QAT mode the same groups are found and checked but
//! nothing is folded. Every group is written on its nodes as `qfold.fusion_group` metadata and
//! listed in the [`FuseReport`]; every candidate left alone is listed with the reason.

pub mod fold;
pub mod patterns;
pub mod rules;

use std::collections::HashSet;

use serde::Serialize;

pub use patterns::{Fuser, FuserRef, GroupKind};
use rules::{label, single_use, Outcome};

use crate::error::{Error, Result};
use crate::graph::{Graph, Names, Patch};
use crate::onnx::proto::{NodeProto, StringStringEntryProto};
use crate::onnx::Model;

/// Metadata key that records a node's fusion group.
pub const GROUP_KEY: &str = "qfold.fusion_group";

/// What to fuse and how.
#[derive(Clone, Default)]
pub struct FuseOptions {
    /// Explicit chains (node names or module paths, first to last); empty means automatic.
    pub only: Vec<Vec<String>>,
    /// Find and record the groups, fold nothing (PyTorch's `fuse_modules_qat`).
    pub qat: bool,
    /// Custom fusers, tried before the built-in patterns.
    pub fusers: Vec<FuserRef>,
}

/// One fusion group.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FusedGroup {
    pub kind: GroupKind,
    /// Names of the original nodes, first to last.
    pub nodes: Vec<String>,
    /// True when a BatchNormalization was folded away.
    pub folded: bool,
    /// The custom fuser that rewrote it, if any.
    pub fuser: Option<String>,
    /// The value the group's last node produces (stable across folding, unlike node labels
    /// of unnamed nodes).
    #[serde(skip)]
    pub output: String,
}

/// A candidate left alone, and why.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Skipped {
    pub nodes: Vec<String>,
    pub reason: String,
}

/// What `fuse` did.
#[derive(Debug, Clone, Serialize, Default)]
pub struct FuseReport {
    pub groups: Vec<FusedGroup>,
    pub skipped: Vec<Skipped>,
    pub bn_before: usize,
    pub bn_after: usize,
    pub nodes_before: usize,
    pub nodes_after: usize,
}

fn count_op(model: &Model, op: &str) -> usize {
    model
        .graph()
        .node
        .iter()
        .filter(|n| n.op_type == op)
        .count()
}

fn apply(model: &mut Model, patch: Patch) -> Result<()> {
    patch.apply(model.graph_mut())
}

/// Tries the fold rules on BN node `bn`.
fn fold_rule(g: &Graph, bn: usize, names: &mut Names) -> Result<Option<Outcome>> {
    if let Some(o) = rules::conv_bn(g, bn, names)? {
        return Ok(Some(o));
    }
    if let Some(o) = rules::gemm_bn(g, bn, names)? {
        return Ok(Some(o));
    }
    if let Some(o) = rules::matmul_bn(g, bn, names)? {
        return Ok(Some(o));
    }
    rules::bn_conv(g, bn, names)
}

fn kind_of_fold(g: &Graph, nodes: &[String]) -> GroupKind {
    let first = (0..g.nodes().len()).find(|&i| label(g.node(i)) == nodes[0]);
    match first.map(|i| g.node(i).op_type.as_str()) {
        Some("Conv") => GroupKind::ConvBn,
        Some("ConvTranspose") => GroupKind::ConvTransposeBn,
        Some("BatchNormalization") => GroupKind::BnConv,
        _ => GroupKind::LinearBn,
    }
}

/// The value a fold around BN node `bn` ends in: the BN's output, or for a forward fold into
/// the Conv after it, that Conv's output.
fn fold_output(g: &Graph, bn: usize) -> String {
    let y = g.node(bn).output.first().cloned().unwrap_or_default();
    match g.consumers(&y) {
        [c] if g.node(*c).op_type == "Conv"
            && g.producer(&y) == Some(bn)
            && rules_is_forward(g, bn) =>
        {
            g.node(*c).output.first().cloned().unwrap_or_default()
        }
        _ => y,
    }
}

fn rules_is_forward(g: &Graph, bn: usize) -> bool {
    let x = g.node(bn).input.first();
    !x.and_then(|x| g.producer(x)).is_some_and(|p| {
        matches!(
            g.node(p).op_type.as_str(),
            "Conv" | "ConvTranspose" | "Gemm" | "MatMul" | "Add"
        )
    })
}

/// The chain of `ops.len()` nodes starting at `start`, each the single consumer of the
/// previous one's first output, if op types match.
fn chain_from(g: &Graph, start: usize, ops: &[String]) -> Option<Vec<usize>> {
    let mut chain = vec![start];
    if g.node(start).op_type != ops[0] {
        return None;
    }
    for op in &ops[1..] {
        let last = g.node(*chain.last()?);
        let out = last.output.first()?;
        if single_use(g, out).is_some() {
            return None;
        }
        let next = g.consumers(out)[0];
        if &g.node(next).op_type != op {
            return None;
        }
        chain.push(next);
    }
    Some(chain)
}

fn custom_auto(model: &mut Model, fuser: &FuserRef, report: &mut FuseReport) -> Result<()> {
    let ops = fuser.pattern();
    if ops.is_empty() {
        return Err(Error::Usage(format!(
            "custom fuser '{}' has an empty pattern",
            fuser.name()
        )));
    }
    let mut done: HashSet<String> = HashSet::new();
    loop {
        let g = Graph::of_model(model);
        let found = (0..g.nodes().len())
            .filter(|&i| !done.contains(&label(g.node(i))))
            .find_map(|i| chain_from(&g, i, &ops));
        let Some(chain) = found else { return Ok(()) };
        let labels: Vec<String> = chain.iter().map(|&i| label(g.node(i))).collect();
        let mut names = Names::new(g.proto());
        let patch = fuser.fuse(&g, &chain, &mut names)?;
        done.insert(labels[0].clone());
        report.groups.push(FusedGroup {
            kind: GroupKind::Custom,
            nodes: labels,
            folded: true,
            fuser: Some(fuser.name().to_string()),
            output: g
                .node(*chain.last().expect("non-empty"))
                .output
                .first()
                .cloned()
                .unwrap_or_default(),
        });
        drop(g);
        apply(model, patch)?;
    }
}

/// Folds (or in QAT mode, records) every BN fold candidate.
fn fold_all(model: &mut Model, qat: bool, report: &mut FuseReport) -> Result<()> {
    let mut done: HashSet<String> = HashSet::new();
    loop {
        let g = Graph::of_model(model);
        let mut names = Names::new(g.proto());
        let mut patch = None;
        for i in 0..g.nodes().len() {
            let n = g.node(i);
            if n.op_type != "BatchNormalization" || !done.insert(label(n)) {
                continue;
            }
            match fold_rule(&g, i, &mut names)? {
                Some(Outcome::Fold(p, nodes)) => {
                    report.groups.push(FusedGroup {
                        kind: kind_of_fold(&g, &nodes),
                        nodes,
                        folded: !qat,
                        fuser: None,
                        output: fold_output(&g, i),
                    });
                    if !qat {
                        patch = Some(p);
                        break;
                    }
                }
                Some(Outcome::Skip(nodes, reason)) => {
                    report.skipped.push(Skipped { nodes, reason })
                }
                None => {
                    if let Some((nodes, reason)) = rules::unfoldable_bn(&g, i) {
                        report.skipped.push(Skipped { nodes, reason });
                    }
                }
            }
        }
        drop(g);
        match patch {
            Some(p) => apply(model, p)?,
            None => return Ok(()),
        }
    }
}

/// The Relu groups: Conv/Gemm/MatMul[+Add]/BN -> Relu with a single-use intermediate. A Relu
/// after a folded (or, in QAT mode, recorded) Conv+BN extends that group.
fn relu_groups(model: &Model, report: &mut FuseReport) {
    let g = Graph::of_model(model);
    for r in 0..g.nodes().len() {
        let relu = g.node(r);
        if relu.op_type != "Relu" || relu.input.is_empty() {
            continue;
        }
        let x = &relu.input[0];
        let Some(p) = g.producer(x) else { continue };
        let prod = g.node(p);
        let mut chain = vec![label(prod)];
        let kind = match prod.op_type.as_str() {
            "Conv" => GroupKind::ConvRelu,
            "Gemm" | "MatMul" => GroupKind::LinearRelu,
            "Add" => {
                let mm = prod.input.iter().filter_map(|i| g.producer(i)).find(|&q| {
                    g.node(q).op_type == "MatMul"
                        && single_use(&g, &g.node(q).output[0]).is_none()
                        && prod.input.iter().any(|i| g.const_source(i).is_some())
                });
                match mm {
                    Some(q) => {
                        chain.insert(0, label(g.node(q)));
                        GroupKind::LinearRelu
                    }
                    None => continue,
                }
            }
            "BatchNormalization" => GroupKind::BnRelu,
            _ => continue,
        };
        if let Some(reason) = single_use(&g, x) {
            chain.push(label(relu));
            report.skipped.push(Skipped {
                nodes: chain,
                reason,
            });
            continue;
        }
        chain.push(label(relu));
        // Extend a BN fold group whose result this Relu reads.
        let ext = report.groups.iter_mut().find(|gr| {
            matches!(gr.kind, GroupKind::ConvBn | GroupKind::LinearBn) && &gr.output == x
        });
        match ext {
            Some(gr) => {
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
                output: relu.output.first().cloned().unwrap_or_default(),
            }),
        }
    }
}

/// Writes each group's name on its surviving nodes.
fn mark_groups(model: &mut Model, groups: &[FusedGroup]) -> Result<()> {
    let g = Graph::of_model(model);
    let mut patch = Patch::new("record fusion groups");
    for i in 0..g.nodes().len() {
        let l = label(g.node(i));
        if let Some(gr) = groups
            .iter()
            .find(|gr| gr.fuser.is_none() && gr.nodes.contains(&l))
        {
            let mut n: NodeProto = g.node(i).clone();
            let value = gr.nodes.join("+");
            n.metadata_props.retain(|kv| kv.key != GROUP_KEY);
            let mut kv = StringStringEntryProto::new();
            kv.key = GROUP_KEY.into();
            kv.value = value;
            n.metadata_props.push(kv);
            patch.replace_node(i, n);
        }
    }
    drop(g);
    if patch.is_empty() {
        return Ok(());
    }
    apply(model, patch)
}

/// Resolves, checks and applies one explicit chain.
fn fuse_list(
    model: &mut Model,
    list: &[String],
    opts: &FuseOptions,
    report: &mut FuseReport,
) -> Result<()> {
    let what = list.join(",");
    let fail = |reason: String| Error::Usage(format!("cannot fuse [{what}]: {reason}"));
    let g = Graph::of_model(model);
    let mut chain: Vec<usize> = Vec::new();
    for name in list {
        for i in patterns::resolve(&g, name)? {
            if !chain.contains(&i) {
                chain.push(i);
            }
        }
    }
    for w in chain.windows(2) {
        let (a, b) = (g.node(w[0]), g.node(w[1]));
        let Some(out) = a.output.first() else {
            return Err(fail(format!("'{}' has no output", label(a))));
        };
        if !b.input.contains(out) {
            return Err(fail(format!(
                "'{}' does not read the output of '{}': the list is not a chain",
                label(b),
                label(a)
            )));
        }
        if let Some(r) = single_use(&g, out) {
            return Err(fail(format!(
                "{r}, so '{}' cannot be fused into '{}'",
                label(a),
                label(b)
            )));
        }
    }
    let ops: Vec<&str> = chain.iter().map(|&i| g.node(i).op_type.as_str()).collect();
    let labels: Vec<String> = chain.iter().map(|&i| label(g.node(i))).collect();
    let g_last_output = chain
        .last()
        .and_then(|&i| g.node(i).output.first().cloned())
        .unwrap_or_default();
    if let Some(f) = opts.fusers.iter().find(|f| {
        f.pattern()
            .iter()
            .map(String::as_str)
            .eq(ops.iter().copied())
    }) {
        let mut names = Names::new(g.proto());
        let patch = f.fuse(&g, &chain, &mut names)?;
        drop(g);
        apply(model, patch)?;
        report.groups.push(FusedGroup {
            kind: GroupKind::Custom,
            nodes: labels,
            folded: true,
            fuser: Some(f.name().to_string()),
            output: String::new(),
        });
        return Ok(());
    }
    let kind = patterns::classify(&ops).ok_or_else(|| {
        fail(format!(
            "no fuser for {} (PyTorch eager patterns only, or register a custom fuser)",
            ops.join(" -> ")
        ))
    })?;
    let bn = chain
        .iter()
        .copied()
        .find(|&i| g.node(i).op_type == "BatchNormalization");
    let folds = !matches!(
        kind,
        GroupKind::BnRelu | GroupKind::ConvRelu | GroupKind::LinearRelu
    );
    let mut patch = None;
    if let (true, Some(bn)) = (folds, bn) {
        let mut names = Names::new(g.proto());
        match fold_rule(&g, bn, &mut names)? {
            Some(Outcome::Fold(p, _)) => patch = Some(p),
            Some(Outcome::Skip(_, reason)) => return Err(fail(reason)),
            None => {
                return Err(fail(
                    "the BatchNormalization has no foldable producer".into(),
                ))
            }
        }
    }
    drop(g);
    let output = g_last_output.clone();
    report.groups.push(FusedGroup {
        kind,
        nodes: labels,
        folded: patch.is_some() && !opts.qat,
        fuser: None,
        output,
    });
    if let (Some(p), false) = (patch, opts.qat) {
        apply(model, p)?;
    }
    Ok(())
}

/// Fuses `model` in place. Automatic mode finds every pattern; explicit mode (`only`) fuses
/// exactly the given chains and fails, leaving the model unchanged, when one is not fusable.
pub fn fuse(model: &mut Model, opts: &FuseOptions) -> Result<FuseReport> {
    let mut report = FuseReport {
        bn_before: count_op(model, "BatchNormalization"),
        nodes_before: model.graph().node.len(),
        ..FuseReport::default()
    };
    if opts.only.is_empty() {
        for f in &opts.fusers {
            custom_auto(model, f, &mut report)?;
        }
        fold_all(model, opts.qat, &mut report)?;
        relu_groups(model, &mut report);
    } else {
        let mut work = model.clone();
        for list in &opts.only {
            fuse_list(&mut work, list, opts, &mut report)?;
        }
        *model = work;
    }
    let groups = report.groups.clone();
    mark_groups(model, &groups)?;
    report.bn_after = count_op(model, "BatchNormalization");
    report.nodes_after = model.graph().node.len();
    Ok(report)
}
