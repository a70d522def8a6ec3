//! Unique, deterministic names for new nodes and tensors.

use super::Set;

use crate::onnx::proto::GraphProto;

/// Every name in use in a graph (values, nodes, initializers, subgraphs included), and a
/// generator of new ones: `base`, then `base_1`, `base_2`... whichever is free first.
#[derive(Debug, Default)]
pub struct Names {
    used: Set<String>,
    /// Names handed out by `fresh`, in order, so a discarded rewrite can give them back.
    journal: Vec<String>,
}

impl Names {
    /// Collects the names used in `g` and its subgraphs.
    pub fn new(g: &GraphProto) -> Names {
        let mut n = Names::default();
        n.collect(g);
        n
    }

    fn collect(&mut self, g: &GraphProto) {
        let vi = g.input.iter().chain(&g.output).chain(&g.value_info);
        self.used.extend(vi.map(|v| v.name.clone()));
        self.used
            .extend(g.initializer.iter().map(|t| t.name.clone()));
        for node in &g.node {
            self.used.insert(node.name.clone());
            self.used.extend(node.input.iter().cloned());
            self.used.extend(node.output.iter().cloned());
            for a in &node.attribute {
                for s in a.g.as_ref().into_iter().chain(&a.graphs) {
                    self.collect(s);
                }
            }
        }
    }

    /// True when `name` is taken.
    pub fn is_used(&self, name: &str) -> bool {
        self.used.contains(name)
    }

    /// A name not used yet, derived from `base`; it is reserved.
    pub fn fresh(&mut self, base: &str) -> String {
        let mut name = base.to_string();
        let mut k = 1;
        while self.used.contains(&name) || name.is_empty() {
            name = format!("{base}_{k}");
            k += 1;
        }
        self.used.insert(name.clone());
        self.journal.push(name.clone());
        name
    }

    /// A point to come back to with [`Names::rollback`].
    pub fn mark(&self) -> usize {
        self.journal.len()
    }

    /// Frees the names handed out since `mark` (their rewrite was discarded), so the same
    /// rewrite made later gets the same names.
    pub fn rollback(&mut self, mark: usize) {
        for name in self.journal.drain(mark.min(self.journal.len())..) {
            self.used.remove(&name);
        }
    }
}
