//! A rewrite as data. A rule builds a [`Patch`] against a read-only [`super::Graph`]; `apply`
//! validates the whole result first and only then mutates, so a patch never half-applies.
//! After applying, nodes are re-sorted topologically and unused initializers, Constant nodes and
//! value_info entries are swept.

use super::{node_uses, topo_order, Graph, Map, Set};
use crate::error::{Error, Result};
use crate::onnx::proto::{GraphProto, NodeProto, TensorProto};

/// Nodes removed, replaced and added, and initializers added, against one graph snapshot (node
/// indices are positions in `graph.node` when the patch was built).
#[derive(Debug, Clone, Default)]
pub struct Patch {
    /// What the patch does, for messages (`fold conv1+bn1`).
    pub name: String,
    removed: Set<usize>,
    replaced: Map<usize, NodeProto>,
    added: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
    replaced_initializers: Vec<TensorProto>,
}

enum Src {
    Old(usize),
    Replaced(usize),
    Added(usize),
}

impl Patch {
    /// An empty patch.
    pub fn new(name: impl Into<String>) -> Patch {
        Patch {
            name: name.into(),
            ..Patch::default()
        }
    }

    /// Removes node `i`.
    pub fn remove_node(&mut self, i: usize) -> &mut Self {
        self.removed.insert(i);
        self
    }

    /// Replaces node `i` by `node` (same position before re-sorting).
    pub fn replace_node(&mut self, i: usize, node: NodeProto) -> &mut Self {
        self.replaced.insert(i, node);
        self
    }

    /// Adds a node; its place is found by the topological sort.
    pub fn add_node(&mut self, node: NodeProto) -> &mut Self {
        self.added.push(node);
        self
    }

    /// Adds an initializer (its name must be new).
    pub fn add_initializer(&mut self, t: TensorProto) -> &mut Self {
        self.initializers.push(t);
        self
    }

    /// Replaces the data of the existing initializer of the same name (kept in place).
    pub fn replace_initializer(&mut self, t: TensorProto) -> &mut Self {
        self.replaced_initializers.push(t);
        self
    }

    /// Nodes removed by the patch.
    pub fn removed_nodes(&self) -> impl Iterator<Item = usize> + '_ {
        self.removed.iter().copied()
    }

    /// Nodes removed or replaced by the patch.
    pub fn touched_nodes(&self) -> impl Iterator<Item = usize> + '_ {
        self.removed.iter().chain(self.replaced.keys()).copied()
    }

    /// Adds `other`'s changes to this patch. Both must be built against the same graph and
    /// touch different nodes (the engine makes sure); `apply` validates the union.
    pub fn merge(&mut self, other: Patch) {
        self.removed.extend(other.removed);
        self.replaced.extend(other.replaced);
        self.added.extend(other.added);
        self.initializers.extend(other.initializers);
        self.replaced_initializers
            .extend(other.replaced_initializers);
    }

    /// Bytes of tensor data the patch carries (new and replacement initializers).
    pub fn tensor_bytes(&self) -> usize {
        self.initializers
            .iter()
            .chain(&self.replaced_initializers)
            .map(|t| {
                t.raw_data.len()
                    + 4 * (t.float_data.len() + t.int32_data.len())
                    + 8 * (t.int64_data.len() + t.double_data.len() + t.uint64_data.len())
            })
            .sum()
    }

    /// True when the patch changes nothing.
    pub fn is_empty(&self) -> bool {
        self.removed.is_empty()
            && self.replaced.is_empty()
            && self.added.is_empty()
            && self.initializers.is_empty()
            && self.replaced_initializers.is_empty()
    }

    /// True when the patch only replaces nodes by nodes of the same name, inputs and outputs
    /// (attribute or metadata edits), so the graph's structure does not change.
    fn edits_in_place(&self, g: &GraphProto) -> bool {
        self.removed.is_empty()
            && self.added.is_empty()
            && self.initializers.is_empty()
            && self.replaced_initializers.is_empty()
            && self.replaced.iter().all(|(&i, new)| {
                g.node.get(i).is_some_and(|old| {
                    old.name == new.name && old.input == new.input && old.output == new.output
                })
            })
    }

    fn err(&self, reason: impl Into<String>) -> Error {
        Error::Patch {
            patch: self.name.clone(),
            reason: reason.into(),
        }
    }

    /// Validates the patched graph, then rewrites `g`. On error `g` is unchanged.
    pub fn apply(mut self, g: &mut GraphProto) -> Result<()> {
        let n = g.node.len();
        if let Some(&i) = self
            .removed
            .iter()
            .chain(self.replaced.keys())
            .find(|&&i| i >= n)
        {
            return Err(self.err(format!("node index {i} is out of range ({n} nodes)")));
        }
        if let Some(&i) = self.removed.iter().find(|i| self.replaced.contains_key(i)) {
            return Err(self.err(format!(
                "node '{}' is both removed and replaced",
                g.node[i].name
            )));
        }
        if self.edits_in_place(g) {
            // Same nodes reading and writing the same values: order and uses are unchanged.
            for (i, node) in std::mem::take(&mut self.replaced) {
                g.node[i] = node;
            }
            return Ok(());
        }
        let mut srcs = Vec::with_capacity(n + self.added.len());
        for i in 0..n {
            if self.replaced.contains_key(&i) {
                srcs.push(Src::Replaced(i));
            } else if !self.removed.contains(&i) {
                srcs.push(Src::Old(i));
            }
        }
        srcs.extend((0..self.added.len()).map(Src::Added));

        let mut replaced_at = Vec::with_capacity(self.replaced_initializers.len());
        let order = {
            let view: Vec<&NodeProto> = srcs
                .iter()
                .map(|s| match s {
                    Src::Old(i) => &g.node[*i],
                    Src::Replaced(i) => &self.replaced[i],
                    Src::Added(k) => &self.added[*k],
                })
                .collect();
            let mut avail: Set<&str> = g.input.iter().map(|v| v.name.as_str()).collect();
            avail.extend(g.initializer.iter().map(|t| t.name.as_str()));
            avail.extend(
                g.sparse_initializer
                    .iter()
                    .filter_map(|s| s.values.as_ref().map(|t| t.name.as_str())),
            );
            let mut produced: Set<&str> = Set::default();
            for v in &view {
                produced.extend(v.output.iter().map(String::as_str));
            }
            for t in &self.initializers {
                if avail.contains(t.name.as_str()) || produced.contains(t.name.as_str()) {
                    return Err(self.err(format!("initializer name '{}' is already used", t.name)));
                }
                avail.insert(t.name.as_str());
            }
            let existing: Map<&str, usize> = g
                .initializer
                .iter()
                .enumerate()
                .map(|(i, t)| (t.name.as_str(), i))
                .collect();
            let mut seen = Set::default();
            for t in &self.replaced_initializers {
                let Some(&i) = existing.get(t.name.as_str()) else {
                    return Err(self.err(format!("no initializer '{}' to replace", t.name)));
                };
                if !seen.insert(i) {
                    return Err(self.err(format!("initializer '{}' is replaced twice", t.name)));
                }
                replaced_at.push(i);
            }
            let mut names = Set::default();
            for v in &view {
                if !v.name.is_empty() && !names.insert(v.name.as_str()) {
                    return Err(self.err(format!("two nodes would be named '{}'", v.name)));
                }
            }
            let order = topo_order(&view, &avail).map_err(|e| self.err(e))?;
            for o in &g.output {
                if !avail.contains(o.name.as_str()) && !produced.contains(o.name.as_str()) {
                    return Err(self.err(format!(
                        "graph output '{}' would no longer be produced",
                        o.name
                    )));
                }
            }
            order
        };

        // Everything is valid: mutate.
        let mut old: Vec<Option<NodeProto>> =
            std::mem::take(&mut g.node).into_iter().map(Some).collect();
        let mut added: Vec<Option<NodeProto>> = std::mem::take(&mut self.added)
            .into_iter()
            .map(Some)
            .collect();
        g.node = order
            .into_iter()
            .map(|k| match &srcs[k] {
                Src::Old(i) => old[*i].take(),
                Src::Replaced(i) => self.replaced.remove(i),
                Src::Added(j) => added[*j].take(),
            })
            .map(|n| n.expect("each source is taken once"))
            .collect();
        g.initializer.append(&mut self.initializers);
        for (t, i) in std::mem::take(&mut self.replaced_initializers)
            .into_iter()
            .zip(replaced_at)
        {
            g.initializer[i] = t;
        }
        sweep(g);
        if cfg!(debug_assertions) {
            Graph::new(g)
                .check()
                .map_err(|e| self.err(format!("the patched graph fails its check: {e}")))?;
        }
        Ok(())
    }
}

/// Removes initializers, Constant nodes and value_info entries nothing uses any more. Graph
/// inputs that only existed to carry a removed initializer (IR < 4 style) go with it.
pub fn sweep(g: &mut GraphProto) {
    let (keep_node, keep_init, keep_input, keep_vi) = {
        let mut used: Set<&str> = g.output.iter().map(|o| o.name.as_str()).collect();
        for n in &g.node {
            used.extend(node_uses(n));
        }
        let keep_node: Vec<bool> = g
            .node
            .iter()
            .map(|n| {
                !(n.op_type == "Constant"
                    && n.domain.is_empty()
                    && n.output.iter().all(|o| !used.contains(o.as_str())))
            })
            .collect();
        let keep_init: Vec<bool> = g
            .initializer
            .iter()
            .map(|t| used.contains(t.name.as_str()))
            .collect();
        let initializers: Set<&str> = g.initializer.iter().map(|t| t.name.as_str()).collect();
        let keep_input: Vec<bool> = g
            .input
            .iter()
            .map(|v| {
                let name = v.name.as_str();
                // a graph input that only carried a removed initializer (IR < 4) goes with it
                !initializers.contains(name) || used.contains(name)
            })
            .collect();
        let produced: Set<&str> = g
            .node
            .iter()
            .zip(&keep_node)
            .filter(|(_, &k)| k)
            .flat_map(|(n, _)| n.output.iter().map(String::as_str))
            .collect();
        let keep_vi: Vec<bool> = g
            .value_info
            .iter()
            .map(|v| produced.contains(v.name.as_str()))
            .collect();
        (keep_node, keep_init, keep_input, keep_vi)
    };
    retain_marked(&mut g.node, &keep_node);
    retain_marked(&mut g.initializer, &keep_init);
    retain_marked(&mut g.input, &keep_input);
    retain_marked(&mut g.value_info, &keep_vi);
}

fn retain_marked<T>(items: &mut Vec<T>, keep: &[bool]) {
    let mut k = keep.iter();
    items.retain(|_| k.next().copied().unwrap_or(true));
}
