//! Unique, deterministic names for new nodes and tensors.

use super::Set;

use crate::onnx::proto::GraphProto;

/// Every name in use in a graph (values, nodes, initializers, subgraphs included), and a
/// generator of new ones: `base`, then `base_1`, `base_2`... whichever is free first.
///
/// The names are kept as 64-bit hashes (fixed keys, so the names handed out are the same on
/// every run), not as copies of every string of the graph: indexing a 100,000-node graph cloned
/// half a million strings. Two different names with the same hash only make [`Names::fresh`]
/// skip a candidate; a name in use is never handed out.
#[derive(Debug, Default)]
pub struct Names {
    used: Set<u64>,
    /// Names handed out by `fresh`, in order, so a discarded rewrite can give them back.
    journal: Vec<u64>,
}

/// The fixed-key hasher of [`Names`].
pub(crate) fn key(name: &str) -> u64 {
    static STATE: std::sync::OnceLock<ahash::RandomState> = std::sync::OnceLock::new();
    STATE
        .get_or_init(|| {
            ahash::RandomState::with_seeds(
                0x9e37_79b9_7f4a_7c15,
                0xbf58_476d_1ce4_e5b9,
                0x94d0_49bb_1331_11eb,
                0x2545_f491_4f6c_dd1d,
            )
        })
        .hash_one(name)
}

impl Names {
    /// Collects the names used in `g` and its subgraphs.
    pub fn new(g: &GraphProto) -> Names {
        let mut n = Names::default();
        n.used.reserve(g.node.len() * 3 + g.initializer.len());
        n.collect(g);
        n
    }

    fn collect(&mut self, g: &GraphProto) {
        let vi = g.input.iter().chain(&g.output).chain(&g.value_info);
        self.used.extend(vi.map(|v| key(&v.name)));
        self.used.extend(g.initializer.iter().map(|t| key(&t.name)));
        for node in &g.node {
            self.used.insert(key(&node.name));
            self.used.extend(node.input.iter().map(|s| key(s)));
            self.used.extend(node.output.iter().map(|s| key(s)));
            for a in &node.attribute {
                for s in a.g.as_ref().into_iter().chain(&a.graphs) {
                    self.collect(s);
                }
            }
        }
    }

    /// True when no two nodes of `g` (main graph) share a non-empty name. A hash collision
    /// answers false, which only costs the caller its fast path.
    pub fn node_names_unique(g: &GraphProto) -> bool {
        let mut seen: Set<u64> = Set::default();
        seen.reserve(g.node.len());
        g.node
            .iter()
            .filter(|n| !n.name.is_empty())
            .all(|n| seen.insert(key(&n.name)))
    }

    /// True when `name` is taken (or shares its hash with a name that is).
    pub fn is_used(&self, name: &str) -> bool {
        self.used.contains(&key(name))
    }

    /// A name not used yet, derived from `base`; it is reserved.
    pub fn fresh(&mut self, base: &str) -> String {
        let mut name = base.to_string();
        let mut k = 1;
        while name.is_empty() || self.used.contains(&key(&name)) {
            name = format!("{base}_{k}");
            k += 1;
        }
        let h = key(&name);
        self.used.insert(h);
        self.journal.push(h);
        name
    }

    /// A point to come back to with [`Names::rollback`].
    pub fn mark(&self) -> usize {
        self.journal.len()
    }

    /// Frees the names handed out since `mark` (their rewrite was discarded), so the same
    /// rewrite made later gets the same names.
    pub fn rollback(&mut self, mark: usize) {
        for h in self.journal.drain(mark.min(self.journal.len())..) {
            self.used.remove(&h);
        }
    }
}
