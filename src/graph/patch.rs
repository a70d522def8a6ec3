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
    /// Node indices to remove (a repeat is harmless).
    removed: Vec<usize>,
    /// Node indices and their replacements (for a repeated index the last one counts). Vectors,
    /// not maps: a sweep merges tens of thousands of small patches, and `apply` marks them in
    /// one array over the nodes.
    replaced: Vec<(usize, NodeProto)>,
    added: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
    replaced_initializers: Vec<TensorProto>,
}

enum Src {
    /// `g.node[i]`, kept.
    Old(usize),
    /// `replaced[k]`.
    Replaced(usize),
    /// `added[j]`.
    Added(usize),
}

/// [`Patch::apply`]'s marks: a kept node, a removed one; any other value is the index of the
/// node's replacement in `replaced`.
const KEEP: usize = usize::MAX;
const REMOVED: usize = usize::MAX - 1;

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
        self.removed.push(i);
        self
    }

    /// Replaces node `i` by `node` (same position before re-sorting).
    pub fn replace_node(&mut self, i: usize, node: NodeProto) -> &mut Self {
        self.replaced.push((i, node));
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
        self.removed
            .iter()
            .copied()
            .chain(self.replaced.iter().map(|(i, _)| *i))
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
            && self.replaced.iter().all(|(i, new)| {
                g.node.get(*i).is_some_and(|old| {
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
        if let Some(i) = self.touched_nodes().find(|&i| i >= n) {
            return Err(self.err(format!("node index {i} is out of range ({n} nodes)")));
        }
        // What becomes of each node: kept, removed, or replaced by `self.replaced[k]`.
        let mut fate = vec![KEEP; n];
        for &i in &self.removed {
            fate[i] = REMOVED;
        }
        for (k, (i, _)) in self.replaced.iter().enumerate() {
            if fate[*i] == REMOVED {
                return Err(self.err(format!(
                    "node '{}' is both removed and replaced",
                    g.node[*i].name
                )));
            }
            fate[*i] = k;
        }
        if self.edits_in_place(g) {
            // Same nodes reading and writing the same values: order and uses are unchanged.
            for (i, node) in std::mem::take(&mut self.replaced) {
                g.node[i] = node;
            }
            return Ok(());
        }
        let mut srcs = Vec::with_capacity(n + self.added.len());
        for (i, &f) in fate.iter().enumerate() {
            match f {
                KEEP => srcs.push(Src::Old(i)),
                REMOVED => {}
                k => srcs.push(Src::Replaced(k)),
            }
        }
        srcs.extend((0..self.added.len()).map(Src::Added));

        let mut replaced_at = Vec::with_capacity(self.replaced_initializers.len());
        let order = {
            let view: Vec<&NodeProto> = srcs
                .iter()
                .map(|s| match s {
                    Src::Old(i) => &g.node[*i],
                    Src::Replaced(k) => &self.replaced[*k].1,
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
            // Built only when initializers are replaced.
            let existing: Map<&str, usize> = if self.replaced_initializers.is_empty() {
                Map::default()
            } else {
                g.initializer
                    .iter()
                    .enumerate()
                    .map(|(i, t)| (t.name.as_str(), i))
                    .collect()
            };
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
        if order.iter().enumerate().all(|(k, &i)| k == i) {
            // The order is the stored one (the common case): edit the node list in place
            // rather than building a second one of the whole graph.
            self.edit_nodes_in_place(g, &fate, None);
        } else {
            let mut old = std::mem::take(&mut g.node);
            let mut added = std::mem::take(&mut self.added);
            g.node = order
                .into_iter()
                .map(|k| match &srcs[k] {
                    // Each source is taken once: the order is a permutation.
                    Src::Old(i) => std::mem::take(&mut old[*i]),
                    Src::Replaced(r) => std::mem::take(&mut self.replaced[*r].1),
                    Src::Added(j) => std::mem::take(&mut added[*j]),
                })
                .collect();
        }
        self.place_initializers(g, replaced_at);
        sweep(g);
        self.debug_check(g)
    }

    /// Puts the replacements where their nodes were (by `fate`: the last replacement of a node
    /// wins), drops the nodes marked [`REMOVED`] and appends the added nodes (those
    /// `keep_added` keeps, all without it).
    fn edit_nodes_in_place(
        &mut self,
        g: &mut GraphProto,
        fate: &[usize],
        keep_added: Option<&[bool]>,
    ) {
        for (k, (i, node)) in std::mem::take(&mut self.replaced).into_iter().enumerate() {
            if fate.get(i) == Some(&k) {
                g.node[i] = node;
            }
        }
        if fate.contains(&REMOVED) {
            let mut fates = fate.iter();
            g.node.retain(|_| fates.next() != Some(&REMOVED));
        }
        let mut keep = keep_added.map(|k| k.iter());
        g.node.extend(
            std::mem::take(&mut self.added)
                .into_iter()
                .filter(|_| keep.as_mut().is_none_or(|k| k.next() == Some(&true))),
        );
    }

    /// Writes the replaced initializers at `replaced_at` and appends the new ones.
    fn place_initializers(&mut self, g: &mut GraphProto, replaced_at: Vec<usize>) {
        for (t, i) in std::mem::take(&mut self.replaced_initializers)
            .into_iter()
            .zip(replaced_at)
        {
            if let Some(slot) = g.initializer.get_mut(i) {
                *slot = t;
            }
        }
        g.initializer.append(&mut self.initializers);
    }

    /// In debug builds, the patched graph must pass [`Graph::check`].
    fn debug_check(&self, g: &GraphProto) -> Result<()> {
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
        // Graph inputs that name an initializer (a short list: the graph's inputs are few).
        let inputs: Set<&str> = g.input.iter().map(|v| v.name.as_str()).collect();
        let initializer_inputs: Set<&str> = if inputs.is_empty() {
            Set::default()
        } else {
            g.initializer
                .iter()
                .map(|t| t.name.as_str())
                .filter(|t| inputs.contains(t))
                .collect()
        };
        let keep_input: Vec<bool> = g
            .input
            .iter()
            .map(|v| {
                let name = v.name.as_str();
                // a graph input that only carried a removed initializer (IR < 4) goes with it
                !initializer_inputs.contains(name) || used.contains(name)
            })
            .collect();
        let keep_vi: Vec<bool> = if g.value_info.is_empty() {
            Vec::new()
        } else {
            let produced: Set<&str> = g
                .node
                .iter()
                .zip(&keep_node)
                .filter(|(_, &k)| k)
                .flat_map(|(n, _)| n.output.iter().map(String::as_str))
                .collect();
            g.value_info
                .iter()
                .map(|v| produced.contains(v.name.as_str()))
                .collect()
        };
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

/// What [`Patch::precheck`] found, for [`Patch::apply_prechecked`]: the fate of every node and
/// which initializers, inputs and value_info entries the sweep keeps.
#[derive(Debug)]
pub(crate) struct Prechecked {
    /// Per node of the indexed graph: [`KEEP`], [`REMOVED`] (removed, or a Constant nothing
    /// reads any more) or the index of its replacement.
    fate: Vec<usize>,
    /// Where each of `replaced_initializers` goes in the graph's initializers.
    replaced_at: Vec<usize>,
    /// Per added node: kept (false for an added Constant nothing reads).
    keep_added: Vec<bool>,
    /// Per initializer, the graph's then the patch's.
    keep_init: Vec<bool>,
    keep_input: Vec<bool>,
    /// Empty when the graph has no value_info.
    keep_vi: Vec<bool>,
}

impl Patch {
    /// Validates the patch against `index`, the index of the graph it was made for, without
    /// building anything of the graph's size: every check of [`Patch::apply`] is answered from
    /// the index and the patch's own nodes, and the sweep of unused initializers, Constant
    /// nodes, inputs and value_info is decided the same way. `Some` only when the result keeps
    /// the stored order (old nodes where they were, replacements in place, added nodes last);
    /// anything else (added nodes that must move, an invalid patch, unusual graphs) answers
    /// `None`, and [`Patch::apply`] sorts or reports it.
    ///
    /// `in_order`: the indexed graph's stored order is topological; `unique_names`: its node
    /// names are unique. The engine knows both (every applied patch keeps them).
    pub(crate) fn precheck(
        &self,
        index: &Graph,
        in_order: bool,
        unique_names: bool,
    ) -> Option<Prechecked> {
        let g = index.proto;
        if !in_order
            || !unique_names
            || index.duplicate.is_some()
            || !g.sparse_initializer.is_empty()
            // `apply` edits those in place without a sweep: leave them to it.
            || self.edits_in_place(g)
        {
            return None;
        }
        let n = g.node.len();
        let mut fate = vec![KEEP; n];
        for &i in &self.removed {
            *fate.get_mut(i)? = REMOVED;
        }
        for (k, (i, _)) in self.replaced.iter().enumerate() {
            let f = fate.get_mut(*i)?;
            if *f != KEEP {
                return None;
            }
            *f = k;
        }
        // The new nodes at their positions: replacements where they were, added nodes after
        // every old one.
        let new_nodes: Vec<(usize, &NodeProto)> = self
            .replaced
            .iter()
            .map(|(i, node)| (*i, node))
            .chain(self.added.iter().enumerate().map(|(j, node)| (n + j, node)))
            .collect();
        let value = |name: &str| index.values.get(name);
        let outside = |name: &str| value(name).is_some_and(|v| v.input || v.initializer.is_some());
        // The surviving old producer of `name`, if any.
        let kept_producer = |name: &str, fate: &[usize]| {
            value(name)
                .and_then(|v| v.producer)
                .filter(|&p| fate[p] == KEEP)
        };
        let mut new_inits: Set<&str> = Set::default();
        for t in &self.initializers {
            if outside(&t.name)
                || kept_producer(&t.name, &fate).is_some()
                || !new_inits.insert(t.name.as_str())
            {
                return None;
            }
        }
        let mut replaced_at = Vec::with_capacity(self.replaced_initializers.len());
        let mut replaced_once: Set<usize> = Set::default();
        for t in &self.replaced_initializers {
            let i = value(&t.name).and_then(|v| v.initializer)?;
            if !replaced_once.insert(i) {
                return None;
            }
            replaced_at.push(i);
        }
        let mut new_out: Map<&str, usize> = Map::default();
        let mut new_names: Set<&str> = Set::default();
        let mut new_uses: Set<&str> = Set::default();
        for &(pos, node) in &new_nodes {
            for o in node.output.iter().filter(|o| !o.is_empty()) {
                if outside(o)
                    || new_inits.contains(o.as_str())
                    || kept_producer(o, &fate).is_some()
                    || new_out.insert(o.as_str(), pos).is_some()
                {
                    return None;
                }
            }
            if !node.name.is_empty() {
                let unchanged = pos < n && g.node[pos].name == node.name;
                if !new_names.insert(node.name.as_str())
                    || (!unchanged
                        && index
                            .node_by_name(&node.name)
                            .is_some_and(|j| fate[j] == KEEP))
                {
                    return None;
                }
            }
            new_uses.extend(node_uses(node));
        }
        // Defined before position `pos` in the patched graph.
        let before = |name: &str, pos: usize| -> bool {
            if let Some(&q) = new_out.get(name) {
                return q < pos;
            }
            if let Some(p) = kept_producer(name, &fate) {
                return p < pos;
            }
            outside(name) || new_inits.contains(name)
        };
        for &(pos, node) in &new_nodes {
            if !node_uses(node).into_iter().all(|u| before(u, pos)) {
                return None;
            }
        }
        // Surviving readers of the values removed and replaced nodes produced.
        for (i, _) in fate.iter().enumerate().filter(|(_, &f)| f != KEEP) {
            for o in g.node[i].output.iter().filter(|o| !o.is_empty()) {
                let readers = index.consumers(o);
                if readers.iter().any(|&c| fate[c] == KEEP && !before(o, c)) {
                    return None;
                }
            }
        }
        if !g.output.iter().all(|o| before(&o.name, usize::MAX)) {
            return None;
        }

        // The sweep, decided on the patched graph's uses.
        let used = |name: &str, fate: &[usize]| {
            index.is_output(name)
                || new_uses.contains(name)
                || index.consumers(name).iter().any(|&c| fate[c] == KEEP)
        };
        let constant = |node: &NodeProto| node.op_type == "Constant" && node.domain.is_empty();
        let unread = |node: &NodeProto, fate: &[usize]| !node.output.iter().any(|o| used(o, fate));
        let mut swept = Vec::new();
        for &i in &index.constant_nodes {
            if fate[i] == KEEP && unread(&g.node[i], &fate) {
                swept.push(i);
            }
        }
        for (i, node) in &self.replaced {
            if fate[*i] != KEEP && constant(node) && unread(node, &fate) {
                swept.push(*i);
            }
        }
        let keep_added: Vec<bool> = self
            .added
            .iter()
            .map(|node| !(constant(node) && unread(node, &fate)))
            .collect();
        // Constant nodes read nothing, so sweeping them changes no other use.
        for i in swept {
            fate[i] = REMOVED;
        }
        let keep_init: Vec<bool> = g
            .initializer
            .iter()
            .chain(&self.initializers)
            .map(|t| used(&t.name, &fate))
            .collect();
        let keep_input: Vec<bool> = g
            .input
            .iter()
            .map(|v| {
                let initializer = value(&v.name).is_some_and(|e| e.initializer.is_some())
                    || new_inits.contains(v.name.as_str());
                !initializer || used(&v.name, &fate)
            })
            .collect();
        let keep_vi: Vec<bool> = g
            .value_info
            .iter()
            .map(|v| match new_out.get(v.name.as_str()) {
                Some(&pos) if pos >= n => keep_added[pos - n],
                Some(&pos) => fate[pos] != REMOVED,
                None => kept_producer(&v.name, &fate).is_some(),
            })
            .collect();
        Some(Prechecked {
            fate,
            replaced_at,
            keep_added,
            keep_init,
            keep_input,
            keep_vi,
        })
    }

    /// Applies a patch [`Patch::precheck`] accepted against the index of `g`: replacements in
    /// place, removals and the sweep by the marks, added nodes appended; no node list or set of
    /// the graph's size is built.
    pub(crate) fn apply_prechecked(mut self, g: &mut GraphProto, pc: Prechecked) -> Result<()> {
        let Prechecked {
            fate,
            replaced_at,
            keep_added,
            keep_init,
            keep_input,
            keep_vi,
        } = pc;
        if fate.len() != g.node.len()
            || keep_init.len() != g.initializer.len() + self.initializers.len()
            || keep_input.len() != g.input.len()
            || keep_vi.len() != g.value_info.len()
            || keep_added.len() != self.added.len()
            || replaced_at.len() != self.replaced_initializers.len()
            || replaced_at.iter().any(|&i| i >= g.initializer.len())
        {
            return Err(self.err("the patch was checked against another graph"));
        }
        self.edit_nodes_in_place(g, &fate, Some(&keep_added));
        self.place_initializers(g, replaced_at);
        retain_marked(&mut g.initializer, &keep_init);
        retain_marked(&mut g.input, &keep_input);
        retain_marked(&mut g.value_info, &keep_vi);
        self.debug_check(g)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::testing::{f32v, model, node, value_info};
    use crate::onnx::ElemType;
    use proptest::prelude::*;

    /// x -> Conv(w0, b0) -> Add(Constant k) -> Relu -> Conv(w1) -> Relu -> y, with an unread
    /// Constant, an unread initializer, an initializer that is also a graph input, and
    /// value_info for produced and unproduced values.
    fn base() -> GraphProto {
        let mut k = node("Constant", "k", &[], &["kc"], vec![]);
        let mut t = f32v(&[0.5]).to_proto("");
        t.name.clear();
        let mut a = crate::onnx::proto::AttributeProto::new();
        a.name = "value".into();
        a.type_ = crate::onnx::proto::attribute_proto::AttributeType::TENSOR.into();
        a.t = Some(t).into();
        k.attribute.push(a.clone());
        let mut unused = node("Constant", "unused_k", &[], &["uk"], vec![]);
        unused.attribute.push(a);
        let mut m = model(
            vec![
                k,
                unused,
                node("Conv", "c0", &["x", "w0", "b0"], &["a0"], vec![]),
                node("Add", "add0", &["a0", "kc"], &["a1"], vec![]),
                node("Relu", "r0", &["a1"], &["a2"], vec![]),
                node("Conv", "c1", &["a2", "w1"], &["a3"], vec![]),
                node("Relu", "r1", &["a3"], &["y"], vec![]),
            ],
            vec![
                ("w0", f32v(&[1.0])),
                ("b0", f32v(&[0.0])),
                ("w1", f32v(&[2.0])),
                ("orphan", f32v(&[3.0])),
                ("in_init", f32v(&[4.0])),
            ],
            value_info("x", ElemType::F32, &[1]),
            "y",
        );
        let g = m.graph_mut();
        g.input.push(value_info("in_init", ElemType::F32, &[1]));
        for v in ["a0", "a1", "a3", "ghost", "uk"] {
            g.value_info.push(value_info(v, ElemType::F32, &[1]));
        }
        std::mem::take(g)
    }

    const VALUES: &[&str] = &[
        "x", "w0", "b0", "w1", "kc", "a0", "a1", "a2", "a3", "y", "orphan", "in_init", "uk",
        "new0", "new1", "nope",
    ];

    /// A patch built from `ops` against `g`: each op is (kind, a, b).
    fn patch_of(g: &GraphProto, ops: &[(u8, u8, u8)]) -> Patch {
        let n = g.node.len();
        let v = |b: u8| VALUES[b as usize % VALUES.len()];
        let mut p = Patch::new("random");
        for (k, &(kind, a, b)) in ops.iter().enumerate() {
            let i = a as usize % n;
            match kind % 8 {
                0 => {
                    p.remove_node(i);
                }
                1 => {
                    // Same interface, another attribute: an in-place edit.
                    let mut m = g.node[i].clone();
                    m.doc_string = format!("edit {k}");
                    p.replace_node(i, m);
                }
                2 => {
                    // Read another value.
                    let mut m = g.node[i].clone();
                    if let Some(x) = m.input.first_mut() {
                        *x = v(b).into();
                    }
                    p.replace_node(i, m);
                }
                3 => {
                    // Write the output of the next node (as a fold does) and drop that node.
                    let mut m = g.node[i].clone();
                    if i + 1 < n {
                        m.output = g.node[i + 1].output.clone();
                        p.remove_node(i + 1);
                    }
                    p.replace_node(i, m);
                }
                4 => {
                    p.add_node(node(
                        "Relu",
                        &format!("added{k}"),
                        &[v(b)],
                        &[&format!("new{}", k % 2)],
                        vec![],
                    ));
                }
                5 => {
                    p.add_initializer(f32v(&[k as f32]).to_proto(v(b)));
                }
                6 => {
                    p.replace_initializer(f32v(&[k as f32]).to_proto(v(b)));
                }
                _ => {
                    let mut m = g.node[i].clone();
                    m.name = format!("renamed{}", b % 3);
                    p.replace_node(i, m);
                }
            }
        }
        p
    }

    fn check(ops: &[(u8, u8, u8)], in_order: bool) -> std::result::Result<bool, TestCaseError> {
        let g0 = base();
        let patch = patch_of(&g0, ops);
        let mut full = g0.clone();
        let full_result = patch.clone().apply(&mut full);
        let index = Graph::new(&g0);
        let Some(pc) = patch.precheck(&index, in_order && index.in_stored_order(), true) else {
            return Ok(false);
        };
        prop_assert!(
            full_result.is_ok(),
            "precheck accepted what apply refuses: {full_result:?}"
        );
        let mut fast = g0.clone();
        patch.apply_prechecked(&mut fast, pc).unwrap();
        prop_assert_eq!(fast, full);
        Ok(true)
    }

    #[test]
    fn a_fold_like_patch_takes_the_fast_path_and_matches_apply() {
        // c0 takes over add0's output and add0 goes (kc loses its reader: k is swept).
        assert!(check(&[(3, 2, 0)], true).unwrap());
        // With a new weight initializer and a replaced one.
        assert!(check(&[(3, 5, 0), (5, 0, 13), (6, 0, 3)], true).unwrap());
        // Relu r0 takes over c1's output; w1 loses its reader and is swept.
        assert!(check(&[(3, 4, 0)], true).unwrap());
    }

    #[test]
    fn patches_that_need_sorting_or_are_invalid_are_left_to_apply() {
        // An added node read by an earlier one must move: not the fast path.
        assert!(!check(&[(4, 0, 0), (2, 4, 13)], true).unwrap());
        // A name clash.
        assert!(!check(&[(7, 2, 0), (7, 3, 0)], true).unwrap());
        // An initializer named like a produced value.
        assert!(!check(&[(5, 0, 5)], true).unwrap());
        // Not known to be in order.
        assert!(!check(&[(3, 2, 0)], false).unwrap());
    }

    #[test]
    fn the_fast_path_is_taken_for_many_random_patches() {
        // A fixed pseudo-random walk over op lists: the agreement test below would pass
        // vacuously if the fast path were never taken.
        let mut state = 0x2545_f491_u32;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            (state & 0xff) as u8
        };
        let mut taken = 0;
        for _ in 0..1000 {
            let len = 1 + next() as usize % 4;
            let ops: Vec<(u8, u8, u8)> = (0..len).map(|_| (next() % 8, next(), next())).collect();
            taken += usize::from(check(&ops, true).unwrap());
        }
        assert!(taken > 100, "fast path taken {taken} times in 1000");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        /// Whenever the fast path accepts a patch, `apply` accepts it too and gives the same
        /// graph, byte for byte.
        #[test]
        fn the_fast_path_agrees_with_apply(ops in proptest::collection::vec((0u8..8, any::<u8>(), any::<u8>()), 1..6)) {
            check(&ops, true)?;
        }
    }
}
