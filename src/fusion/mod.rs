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

use std::collections::HashMap;

use serde::Serialize;

pub use patterns::{Fuser, FuserRef, GroupKind};
use rules::{label, single_use};

use crate::error::{Error, Result};
use crate::graph::constants::ConstantReport;
use crate::graph::engine::{self, Outcome, Rule};
use crate::graph::{spec, Graph, Map, Names, Patch};
use crate::onnx::proto::StringStringEntryProto;
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
    /// Keep constant subgraphs, Identity and inference Dropout nodes as they are (by default
    /// they are folded and removed first, so BN parameters behind them fold).
    pub no_constant_folding: bool,
    /// Initializers that are also graph inputs (overridable defaults, IR >= 4) become
    /// constants, so they fold too.
    pub inputs_as_constants: bool,
    /// Leave Add / Sub / Mul / Div after a Conv, ConvTranspose, Gemm or MatMul as they are
    /// (the channel-affine folds); BatchNormalization still folds where it directly follows.
    pub no_affine_folding: bool,
    /// Without `no_affine_folding`: fold only the constants with a value per channel, not
    /// single values (see [`rules::conv_affine::conv_affine_per_channel`]).
    pub no_scalar_affine_folding: bool,
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
    /// Engine sweeps (automatic mode).
    #[serde(skip)]
    pub sweeps: usize,
    /// What constant folding did (before fusing).
    pub constants: ConstantReport,
    /// Identity and inference Dropout nodes removed.
    pub removed: Vec<String>,
}

fn count_op(model: &Model, op: &str) -> usize {
    model
        .graph()
        .node
        .iter()
        .filter(|n| n.op_type == op)
        .count()
}

/// The channel-affine fold rule's name (left out with `no_affine_folding`).
const AFFINE_RULE: &str = "conv_affine";

/// The fold rules, in the order they are tried at each node.
fn fold_rules() -> Vec<Rule<'static, FusedGroup>> {
    vec![
        Rule::new(AFFINE_RULE, rules::conv_affine::conv_affine),
        Rule::new("conv_bn", rules::conv_bn::conv_bn),
        Rule::new("gemm_bn", rules::gemm_bn::gemm_bn),
        Rule::new("matmul_bn", rules::matmul_bn::matmul_bn),
        Rule::new("bn_conv", rules::bn_conv::bn_conv),
        Rule::new("unfoldable_bn", rules::unfoldable::unfoldable_bn),
    ]
}

/// The chain of `ops.len()` nodes starting at `start`, each the single consumer of the
/// previous one's first output, if op types match.
fn chain_from(g: &Graph, start: usize, ops: &[String]) -> Option<Vec<usize>> {
    let first = g.node(start);
    if ops.first() != Some(&first.op_type) {
        return None;
    }
    let mut chain = vec![start];
    for op in &ops[1..] {
        let last = g.node(*chain.last()?);
        let out = last.output.first()?;
        if single_use(g, out).is_some() {
            return None;
        }
        let next = *g.consumers(out).first()?;
        if &g.node(next).op_type != op {
            return None;
        }
        chain.push(next);
    }
    Some(chain)
}

/// The record of a custom fuser's rewrite of `chain`.
fn custom_group(g: &Graph, fuser: &FuserRef, chain: &[usize]) -> FusedGroup {
    FusedGroup {
        kind: GroupKind::Custom,
        nodes: chain.iter().map(|&i| label(g.node(i))).collect(),
        folded: true,
        fuser: Some(fuser.name().to_string()),
        output: chain
            .last()
            .and_then(|&i| g.node(i).output.first().cloned())
            .unwrap_or_default(),
    }
}

/// A custom fuser as an engine rule, anchored at the first node of its pattern.
fn custom_rule(fuser: &FuserRef) -> Result<Rule<'_, FusedGroup>> {
    let ops = fuser.pattern();
    if ops.is_empty() {
        return Err(Error::Usage(format!(
            "custom fuser '{}' has an empty pattern",
            fuser.name()
        )));
    }
    Ok(Rule::new(
        format!("custom fuser {}", fuser.name()),
        move |g: &Graph, i: usize, names: &mut Names| {
            let Some(chain) = chain_from(g, i, &ops) else {
                return Ok(None);
            };
            let patch = fuser.fuse(g, &chain, names)?;
            Ok(Some(Outcome::Rewrite(
                patch,
                custom_group(g, fuser, &chain),
            )))
        },
    ))
}

/// Automatic mode: with `simplify`, constant folding and canonical bias shapes first, then
/// custom fusers, Identity removal and every fold rule, through the engine.
fn fuse_auto(
    model: &mut Model,
    opts: &FuseOptions,
    simplify: bool,
    report: &mut FuseReport,
) -> Result<()> {
    let mut all = Vec::new();
    if simplify {
        all.push(identity_rule());
    }
    for f in &opts.fusers {
        all.push(custom_rule(f)?);
    }
    all.extend(fold_rules());
    if opts.no_affine_folding {
        all.retain(|r| r.name != AFFINE_RULE);
    } else if opts.no_scalar_affine_folding {
        for r in all.iter_mut().filter(|r| r.name == AFFINE_RULE) {
            *r = Rule::new(AFFINE_RULE, rules::conv_affine::conv_affine_per_channel);
        }
    }
    // The Relu groups are read from the engine's index of the final graph.
    let mut relus = Vec::new();
    let mut constants = ConstantReport::default();
    let mut reshaped = Vec::new();
    let mut passes: Vec<engine::Pass> = Vec::new();
    if simplify {
        passes.push(Box::new(|m: &Model, g: &Graph| {
            let (r, patch) = crate::graph::constants::plan_fold_constants(m, g)?;
            constants = r;
            Ok(patch)
        }));
        passes.push(Box::new(|_: &Model, g: &Graph| {
            let (done, patch) = crate::graph::constants::plan_canonical_conv_bias(g)?;
            reshaped = done;
            Ok(patch)
        }));
    }
    let run = engine::run_with(model, passes, &all, !opts.qat, |g| {
        relus = rules::relu::find(g)
    })?;
    report.constants = constants;
    report.constants.conv_bias_reshaped = reshaped;
    for m in run.malformed {
        report.skipped.push(Skipped {
            nodes: vec![m.node],
            reason: format!("malformed {}: {}", m.op_type, m.reason),
        });
    }
    for a in run.applied {
        if a.rule == IDENTITY {
            report.removed.extend(a.record.nodes);
            continue;
        }
        let mut group = a.record;
        group.folded = group.folded && !opts.qat;
        report.groups.push(group);
    }
    for d in run.declined {
        report.skipped.push(Skipped {
            nodes: d.nodes,
            reason: d.reason,
        });
    }
    report.sweeps = run.sweeps;
    rules::relu::merge(relus, report);
    Ok(())
}

/// Writes each group's name on its surviving nodes (the first group a node belongs to).
fn mark_groups(model: &mut Model, groups: &[FusedGroup]) -> Result<()> {
    let mut group_of: Map<&str, usize> = Map::default();
    for (k, gr) in groups
        .iter()
        .enumerate()
        .filter(|(_, gr)| gr.fuser.is_none())
    {
        for n in &gr.nodes {
            group_of.entry(n.as_str()).or_insert(k);
        }
    }
    if group_of.is_empty() {
        return Ok(());
    }
    // Metadata only: names, inputs, outputs and order stay, so the nodes are edited in place.
    for node in model.graph_mut().node.iter_mut() {
        let Some(&k) = group_of.get(engine::label_of(node).as_ref()) else {
            continue;
        };
        node.metadata_props.retain(|kv| kv.key != GROUP_KEY);
        let mut kv = StringStringEntryProto::new();
        kv.key = GROUP_KEY.into();
        kv.value = groups[k].nodes.join("+");
        node.metadata_props.push(kv);
    }
    Ok(())
}

/// Resolves and checks one explicit chain against `g`; returns its group and, for folding
/// kinds outside QAT mode, the patch. Nothing is changed.
fn fuse_list(
    g: &Graph,
    list: &[String],
    opts: &FuseOptions,
    names: &mut Names,
) -> Result<(Vec<usize>, FusedGroup, Option<Patch>)> {
    let what = list.join(",");
    let fail = |reason: String| Error::Usage(format!("cannot fuse [{what}]: {reason}"));
    let mut chain: Vec<usize> = Vec::new();
    for name in list {
        for i in patterns::resolve(g, name)? {
            if !chain.contains(&i) {
                chain.push(i);
            }
        }
    }
    for &i in &chain {
        let n = g.node(i);
        if let Err(r) = spec::check(n) {
            return Err(fail(format!(
                "'{}' ({}) is malformed: {r}",
                label(n),
                n.op_type
            )));
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
        if let Some(r) = single_use(g, out) {
            return Err(fail(format!(
                "{r}, so '{}' cannot be fused into '{}'",
                label(a),
                label(b)
            )));
        }
    }
    let ops: Vec<&str> = chain.iter().map(|&i| g.node(i).op_type.as_str()).collect();
    let labels: Vec<String> = chain.iter().map(|&i| label(g.node(i))).collect();
    let last_output = chain
        .last()
        .and_then(|&i| g.node(i).output.first().cloned())
        .unwrap_or_default();
    let custom = opts.fusers.iter().find(|f| {
        f.pattern()
            .iter()
            .map(String::as_str)
            .eq(ops.iter().copied())
    });
    if let Some(f) = custom {
        let patch = f.fuse(g, &chain, names)?;
        let mut group = custom_group(g, f, &chain);
        group.output = String::new();
        return Ok((chain, group, Some(patch)));
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
        let mut tried = None;
        for rule in fold_rules() {
            tried = (rule.matcher)(g, bn, names)?;
            if tried.is_some() {
                break;
            }
        }
        match tried {
            Some(Outcome::Rewrite(p, _)) => patch = Some(p),
            Some(Outcome::Decline(_, reason)) => return Err(fail(reason)),
            None => {
                return Err(fail(
                    "the BatchNormalization has no foldable producer".into(),
                ))
            }
        }
    }
    let group = FusedGroup {
        kind,
        nodes: labels,
        folded: patch.is_some() && !opts.qat,
        fuser: None,
        output: last_output,
    };
    Ok((chain, group, patch.filter(|_| !opts.qat)))
}

/// Explicit mode: every list is resolved and checked on one index, then all folds are applied
/// as one patch, so a list that cannot be fused leaves the model unchanged.
fn fuse_lists(model: &mut Model, opts: &FuseOptions, report: &mut FuseReport) -> Result<()> {
    let g = Graph::of_model(model);
    let mut names = Names::new(g.proto());
    let mut owner: HashMap<usize, usize> = HashMap::new();
    let mut merged = Patch::new("fuse the listed modules");
    for (k, list) in opts.only.iter().enumerate() {
        let (chain, group, patch) = fuse_list(&g, list, opts, &mut names)?;
        for i in chain
            .iter()
            .copied()
            .chain(patch.iter().flat_map(Patch::touched_nodes))
        {
            if let Some(&other) = owner.get(&i) {
                if other != k {
                    return Err(Error::Usage(format!(
                        "cannot fuse [{}]: node '{}' is also in [{}]",
                        list.join(","),
                        label(g.node(i)),
                        opts.only[other].join(",")
                    )));
                }
            }
            owner.insert(i, k);
        }
        if let Some(p) = patch {
            merged.merge(p);
        }
        report.groups.push(group);
    }
    drop(g);
    if !merged.is_empty() {
        merged.apply(model.graph_mut())?;
    }
    Ok(())
}

/// The rule that removes Identity and inference Dropout nodes, so the fold rules see direct
/// producers (constant folding, before it, makes their parameters plain constants).
const IDENTITY: &str = "identity";

/// Identity and inference Dropout removal as a fusion rule, so it runs in the same sweeps as the
/// fold rules (its records go to `FuseReport::removed`).
fn identity_rule() -> Rule<'static, FusedGroup> {
    Rule::new(IDENTITY, |g: &Graph, i: usize, names: &mut Names| {
        Ok(
            crate::graph::constants::identity(g, i, names)?.map(|o| match o {
                Outcome::Rewrite(p, node) => Outcome::Rewrite(
                    p,
                    FusedGroup {
                        kind: GroupKind::Custom,
                        nodes: vec![node],
                        folded: true,
                        fuser: Some(IDENTITY.into()),
                        output: String::new(),
                    },
                ),
                Outcome::Decline(nodes, reason) => Outcome::Decline(nodes, reason),
            }),
        )
    })
}

/// Explicit mode: Identity and inference Dropout removed first, on their own.
fn remove_identities(model: &mut Model, report: &mut FuseReport) -> Result<()> {
    let run = engine::run(model, &[identity_rule()], true)?;
    report
        .removed
        .extend(run.applied.into_iter().flat_map(|a| a.record.nodes));
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
    let simplify = !opts.no_constant_folding && !opts.qat;
    let as_constants = if opts.inputs_as_constants {
        crate::graph::constants::inputs_as_constants(model)
    } else {
        vec![]
    };
    if opts.only.is_empty() {
        // Constant folding and bias shapes run as the engine's passes (one index for them
        // and the first sweep when they change nothing).
        fuse_auto(model, opts, simplify, &mut report)?;
    } else {
        if simplify {
            report.constants = crate::graph::constants::fold_constants(model)?;
            report.constants.conv_bias_reshaped =
                crate::graph::constants::canonicalize_conv_bias(model)?;
            remove_identities(model, &mut report)?;
        }
        fuse_lists(model, opts, &mut report)?;
    }
    report.constants.inputs_as_constants = as_constants;
    let groups = std::mem::take(&mut report.groups);
    mark_groups(model, &groups)?;
    report.groups = groups;
    report.bn_after = count_op(model, "BatchNormalization");
    report.nodes_after = model.graph().node.len();
    Ok(report)
}
