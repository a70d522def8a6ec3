//! The rewrite engine behind fusion, QOperator conversion and custom fusers.
//!
//! A rule is matched at one node (its anchor) against a read-only [`Graph`] and returns
//! `Ok(None)` (does not apply), [`Outcome::Decline`] (the pattern is there but rewriting would be
//! wrong; the reason goes to the report) or [`Outcome::Rewrite`] (a [`Patch`] and a record of
//! what it did). The engine:
//!
//! - builds one index per sweep and one [`Names`] per run;
//! - walks the nodes once per sweep, trying the rules in order at each node (the first that
//!   answers wins);
//! - records every node a rule looks at (its footprint, through [`Graph::node`]); a rewrite claims
//!   its footprint, and a rule whose footprint meets a claimed node is set aside for the next
//!   sweep, since it looked at something that is about to change. So the rewrites of one sweep
//!   never overlap, and each is decided on the graph as it will be when applied;
//! - merges the sweep's rewrites into one patch and applies it (one topological sort, one sweep of
//!   unused initializers, one debug consistency check per sweep);
//! - repeats to a fixed point. A declined anchor is not tried again, and a rule rewrites an
//!   anchor (by node label) at most once.
//!
//! Passes ([`Pass`], [`run_with`]: constant folding, canonical bias shapes) run first, each
//! planned on the current index; one that changes nothing hands its index on, so a graph with
//! nothing to fold is indexed once for the passes and the first sweep. A sweep's merged patch is
//! validated against the sweep's own index (`Patch::precheck`) and applied in place when it
//! keeps the stored order; otherwise [`Patch::apply`] sorts it.
//!
//! Nodes that fail their op spec ([`super::spec`]) are never matched as that op; the engine lists
//! them once with the reason.
//!
//! Cost: each sweep is linear in the graph (plus the rules' own work); the number of sweeps is
//! the length of the longest chain of rewrites that enable each other, not the number of
//! rewrites.

use std::borrow::Cow;

use smallvec::SmallVec;

use super::{spec, Graph, Map, Names, Patch};
use crate::error::{Error, Result};
use crate::onnx::proto::NodeProto;
use crate::onnx::Model;

/// Sweeps after which a run that still rewrites is stopped with an error (a rule that undoes
/// another would otherwise loop forever).
pub const MAX_SWEEPS: usize = 10_000;

/// A sweep stops collecting rewrites once their patches carry this many bytes of new tensor
/// data (64 MiB), and applies them: the weights they replace are freed before more are
/// computed, so folding a model of large weights holds about one model's worth of tensors, not
/// two. Later matches are found by the next sweep.
pub const MAX_PENDING_TENSOR_BYTES: usize = 64 << 20;

/// What a rule decided at its anchor.
#[derive(Debug)]
pub enum Outcome<R> {
    /// The rewrite and a record of what it did.
    Rewrite(Patch, R),
    /// The pattern is there but rewriting would not be exact or valid: the nodes and why.
    Decline(Vec<String>, String),
}

/// A rule: a name for reports and the matcher.
pub struct Rule<'r, R> {
    pub name: String,
    #[allow(clippy::type_complexity)]
    pub matcher: Box<dyn Fn(&Graph, usize, &mut Names) -> Result<Option<Outcome<R>>> + 'r>,
}

impl<'r, R> Rule<'r, R> {
    /// A rule named `name`.
    pub fn new(
        name: impl Into<String>,
        matcher: impl Fn(&Graph, usize, &mut Names) -> Result<Option<Outcome<R>>> + 'r,
    ) -> Self {
        Rule {
            name: name.into(),
            matcher: Box::new(matcher),
        }
    }
}

/// A rewrite the engine made (or, without commit, found).
#[derive(Debug)]
pub struct Applied<R> {
    pub rule: String,
    pub record: R,
}

/// A candidate a rule declined.
#[derive(Debug, Clone, PartialEq)]
pub struct Declined {
    pub rule: String,
    pub nodes: Vec<String>,
    pub reason: String,
}

/// A node that fails its op spec.
#[derive(Debug, Clone, PartialEq)]
pub struct Malformed {
    pub node: String,
    pub op_type: String,
    pub reason: String,
}

/// What a run did.
#[derive(Debug)]
pub struct RunReport<R> {
    pub applied: Vec<Applied<R>>,
    pub declined: Vec<Declined>,
    pub malformed: Vec<Malformed>,
    pub sweeps: usize,
}

/// A display name: the node's name, or its op and first output when unnamed.
pub fn label(n: &NodeProto) -> String {
    label_of(n).into_owned()
}

/// [`label`] without a copy for named nodes.
pub(crate) fn label_of(n: &NodeProto) -> Cow<'_, str> {
    if !n.name.is_empty() {
        Cow::Borrowed(&n.name)
    } else {
        Cow::Owned(format!(
            "<{}:{}>",
            n.op_type,
            n.output.first().map(String::as_str).unwrap_or("")
        ))
    }
}

/// The nodes of `model`'s main graph that fail their op spec.
pub fn malformed_nodes(model: &Model) -> Vec<Malformed> {
    model
        .graph()
        .node
        .iter()
        .filter_map(|n| {
            spec::check(n).err().map(|reason| Malformed {
                node: label(n),
                op_type: n.op_type.clone(),
                reason,
            })
        })
        .collect()
}

/// Runs `rules` on `model` to a fixed point. With `commit = false` nothing is changed: one sweep
/// reports what every rule would rewrite on the graph as it is (dry runs, QAT fusion).
pub fn run<R>(model: &mut Model, rules: &[Rule<R>], commit: bool) -> Result<RunReport<R>> {
    run_then(model, rules, commit, |_| {})
}

/// [`run`], then `at_end` on the index of the final graph (the one the last sweep found
/// nothing to rewrite in), so a pass that reads the result needs no index of its own.
pub fn run_then<R>(
    model: &mut Model,
    rules: &[Rule<R>],
    commit: bool,
    at_end: impl FnOnce(&Graph),
) -> Result<RunReport<R>> {
    run_with(model, Vec::new(), rules, commit, at_end)
}

/// A pass run before the rules: a plan made on the current index, returning the patch to apply
/// (or none). Constant folding is one.
pub type Pass<'p> = Box<dyn FnOnce(&Model, &Graph) -> Result<Option<Patch>> + 'p>;

/// [`run_then`] after `passes`, each planned on the current index and applied in turn (with
/// `commit`); a pass that changes nothing leaves its index to the next pass and to the first
/// sweep, so a graph with nothing to fold is indexed once for all of them.
pub fn run_with<R>(
    model: &mut Model,
    passes: Vec<Pass>,
    rules: &[Rule<R>],
    commit: bool,
    at_end: impl FnOnce(&Graph),
) -> Result<RunReport<R>> {
    let mut passes = passes.into_iter();
    let mut report = RunReport {
        applied: Vec::new(),
        declined: Vec::new(),
        malformed: Vec::new(),
        sweeps: 0,
    };
    let mut names = Names::default();
    // With the index's own order check, what lets a sweep's patch be checked against the
    // sweep's index (see `Patch::precheck`); every applied patch keeps it.
    let mut unique_names = false;
    // Per anchor label: whether a rule declined it (it is not tried again) and which rules
    // rewrote it (a rule rewrites an anchor once, so a rule whose result matches its own pattern
    // cannot loop). One lookup per node and sweep.
    let mut anchors: Map<String, AnchorState> = Map::default();
    loop {
        let g = Graph::of_model(model);
        let mut planned = None;
        for pass in passes.by_ref() {
            if let Some(patch) = pass(model, &g)? {
                planned = Some(patch);
                break;
            }
        }
        if let Some(patch) = planned {
            if commit {
                let checked = patch.precheck(&g, g.in_stored_order(), false);
                drop(g);
                match checked {
                    Some(pc) => patch.apply_prechecked(model.graph_mut(), pc)?,
                    None => patch.apply(model.graph_mut())?,
                }
            }
            continue;
        }
        if report.sweeps == 0 {
            // After the passes: taken from the graph the rules will see.
            report.malformed = malformed_nodes(model);
            names = Names::new(model.graph());
            unique_names = Names::node_names_unique(model.graph());
        }
        report.sweeps += 1;
        let mut claimed = vec![false; g.len()];
        // The sweep's rewrites, merged as they come (the first one's patch is the base), and
        // how many.
        let mut merged: Option<Patch> = None;
        let mut count = 0usize;
        let mut pending_bytes = 0usize;
        'nodes: for i in 0..g.len() {
            if claimed[i] {
                continue;
            }
            let anchor = label_of(&g.nodes()[i]);
            let state = anchors.get(anchor.as_ref());
            if state.is_some_and(|s| s.settled) {
                continue;
            }
            for (r, rule) in rules.iter().enumerate() {
                if state.is_some_and(|s| s.rewrote(r)) {
                    continue;
                }
                let mark = names.mark();
                g.start_footprint();
                let outcome = (rule.matcher)(&g, i, &mut names);
                let mut footprint = g.take_footprint();
                let outcome = outcome.map_err(|e| in_rule(&rule.name, anchor.as_ref(), e))?;
                let Some(outcome) = outcome else {
                    names.rollback(mark);
                    continue;
                };
                if commit && footprint.iter().any(|&j| claimed.get(j) != Some(&false)) {
                    // It looked at something an earlier rewrite of this sweep changes.
                    names.rollback(mark);
                    break;
                }
                match outcome {
                    Outcome::Decline(nodes, reason) => {
                        names.rollback(mark);
                        anchors.entry(anchor.to_string()).or_default().settled = true;
                        report.declined.push(Declined {
                            rule: rule.name.clone(),
                            nodes,
                            reason,
                        });
                    }
                    Outcome::Rewrite(patch, record) => {
                        report.applied.push(Applied {
                            rule: rule.name.clone(),
                            record,
                        });
                        if commit {
                            anchors.entry(anchor.to_string()).or_default().mark(r);
                            footprint.extend(patch.touched_nodes());
                            for j in footprint {
                                if let Some(c) = claimed.get_mut(j) {
                                    *c = true;
                                }
                            }
                            pending_bytes = pending_bytes.saturating_add(patch.tensor_bytes());
                            count += 1;
                            match merged.as_mut() {
                                None => merged = Some(patch),
                                Some(m) => m.merge(patch),
                            }
                            if pending_bytes >= MAX_PENDING_TENSOR_BYTES {
                                break 'nodes;
                            }
                        } else {
                            anchors.entry(anchor.to_string()).or_default().settled = true;
                        }
                    }
                }
                break;
            }
        }
        // A rule set aside always follows a claim, so an empty sweep is the fixed point.
        let merged = match merged {
            Some(m) if commit => m,
            _ => {
                at_end(&g);
                return Ok(report);
            }
        };
        if report.sweeps > MAX_SWEEPS {
            return Err(Error::graph(
                &model.graph().name,
                format!("the rewrite rules did not settle after {MAX_SWEEPS} sweeps"),
            ));
        }
        let mut merged = merged;
        if count > 1 {
            merged.name = format!("{count} rewrites of sweep {}", report.sweeps);
        }
        let checked = merged.precheck(&g, g.in_stored_order(), unique_names);
        drop(g);
        match checked {
            Some(pc) => merged.apply_prechecked(model.graph_mut(), pc)?,
            None => merged.apply(model.graph_mut())?,
        }
    }
}

/// What the engine remembers of one anchor across sweeps.
#[derive(Debug, Default)]
struct AnchorState {
    /// A rule declined it (or, in a dry run, rewrote it): no rule is tried there again.
    settled: bool,
    /// Bit `r`: rule `r` rewrote it.
    rewritten: SmallVec<[u64; 1]>,
}

impl AnchorState {
    fn rewrote(&self, rule: usize) -> bool {
        self.rewritten
            .get(rule / 64)
            .is_some_and(|w| w & (1 << (rule % 64)) != 0)
    }

    fn mark(&mut self, rule: usize) {
        if self.rewritten.len() <= rule / 64 {
            self.rewritten.resize(rule / 64 + 1, 0);
        }
        self.rewritten[rule / 64] |= 1 << (rule % 64);
    }
}

fn in_rule(rule: &str, anchor: &str, e: Error) -> Error {
    match e {
        // Errors that already name their node or tensor pass through as they are.
        e @ (Error::Node { .. } | Error::Tensor { .. } | Error::Usage(_)) => e,
        other => Error::Patch {
            patch: format!("rule {rule} at node '{anchor}'"),
            reason: other.to_string(),
        },
    }
}
