//! Running a QDQ model a part at a time, for measurements that walk its layers in order and
//! change each layer before measuring the next ([`super::bias_correction::correct_outputs`]).
//!
//! Every value asked for is computed from values already known: the samples' graph inputs,
//! and the activations computed by earlier runs (the outputs of activation
//! DequantizeLinear nodes, kept per sample). Each run builds a model of only the nodes between
//! those and the value asked for, so a walk over the layers runs each node about twice
//! (once on the way to a layer's output, once more on the way to the next) instead of the
//! whole prefix of the model per layer. Kept values are dropped once every node reading them
//! has run and left its own results known, and all of them past [`BUDGET`] bytes (then
//! computed again from the inputs when needed: slower, the same values).
//!
//! A kept value must not depend on anything changed afterwards: the caller changes only the
//! node whose output it last asked for (its bias), and values are kept only from the nodes run
//! before it.

use std::collections::{HashMap, HashSet};

use crate::error::{Error, Result};
use crate::graph::node_uses;
use crate::onnx::proto::{GraphProto, ModelProto, ValueInfoProto};
use crate::onnx::{Model, TensorData};
use crate::runtime::{Runner, Sample};
use crate::verify::SampleSource;

/// Bytes of kept activations (graph inputs not counted) past which all are dropped.
pub const BUDGET: usize = 1 << 30;

/// How deep [`Segments::is_done`] looks through values no one keeps.
const DONE_DEPTH: usize = 32;

pub struct Segments {
    producer: HashMap<String, usize>,
    consumers: HashMap<String, Vec<usize>>,
    initializers: HashMap<String, usize>,
    /// Values kept once computed: the outputs of activation DequantizeLinear nodes.
    keep: HashSet<String>,
    /// The samples' graph inputs (never dropped).
    inputs: HashSet<String>,
    /// Known values, per sample.
    known: HashMap<String, Vec<TensorData>>,
    /// Nodes run on the way to another node's output (so their results are final).
    ran: Vec<bool>,
    done: Vec<bool>,
    bytes: usize,
    count: usize,
    /// Nodes run in all (for the report and tests).
    pub nodes_run: usize,
}

fn bytes_of(t: &TensorData) -> usize {
    t.len() * t.elem_type().size().max(1)
}

impl Segments {
    /// Reads the graph inputs of the first `count` samples and indexes `model`.
    pub fn new<S: SampleSource + ?Sized>(
        model: &Model,
        samples: &S,
        count: usize,
    ) -> Result<Segments> {
        let mut known: HashMap<String, Vec<TensorData>> = HashMap::new();
        for k in 0..count {
            let s = samples.read(k)?;
            for (name, t) in &s.inputs {
                known.entry(name.clone()).or_default().push(t.clone());
            }
        }
        if let Some((name, _)) = known.iter().find(|(_, v)| v.len() != count) {
            return Err(Error::tensor(name, "given by some samples and not others"));
        }
        let inputs = known.keys().cloned().collect();
        let mut s = Segments {
            producer: HashMap::new(),
            consumers: HashMap::new(),
            initializers: HashMap::new(),
            keep: HashSet::new(),
            inputs,
            known,
            ran: vec![],
            done: vec![],
            bytes: 0,
            count,
            nodes_run: 0,
        };
        s.reindex(model, false);
        Ok(s)
    }

    /// Indexes `model` anew, after it was built again. With `same_values` (the caller knows
    /// every kept value is computed the same in it), the kept values it also computes stay;
    /// otherwise only the inputs do.
    pub fn reindex(&mut self, model: &Model, same_values: bool) {
        let g = model.graph();
        self.producer.clear();
        self.consumers.clear();
        self.initializers.clear();
        self.keep.clear();
        for (i, n) in g.node.iter().enumerate() {
            for o in n.output.iter().filter(|o| !o.is_empty()) {
                self.producer.insert(o.clone(), i);
            }
            for u in node_uses(n) {
                self.consumers.entry(u.to_string()).or_default().push(i);
            }
        }
        for (i, t) in g.initializer.iter().enumerate() {
            self.initializers.insert(t.name.clone(), i);
        }
        // activation DequantizeLinear: reads what a QuantizeLinear computed
        for n in &g.node {
            if n.op_type == "DequantizeLinear"
                && n.input.first().is_some_and(|x| {
                    self.producer
                        .get(x)
                        .is_some_and(|&p| g.node[p].op_type == "QuantizeLinear")
                })
            {
                if let Some(o) = n.output.first().filter(|o| !o.is_empty()) {
                    self.keep.insert(o.clone());
                }
            }
        }
        self.ran = vec![false; g.node.len()];
        self.done = vec![false; g.node.len()];
        if same_values {
            let (inputs, keep) = (&self.inputs, &self.keep);
            self.known
                .retain(|k, _| inputs.contains(k) || keep.contains(k));
            self.bytes = self
                .known
                .iter()
                .filter(|(k, _)| !inputs.contains(*k))
                .map(|(_, v)| v.iter().map(bytes_of).sum::<usize>())
                .sum();
        } else {
            self.forget_computed();
        }
    }

    /// Drops every computed value (the inputs stay): the next run starts from them.
    pub fn forget_computed(&mut self) {
        let inputs = &self.inputs;
        self.known.retain(|k, _| inputs.contains(k));
        self.bytes = 0;
        self.ran.fill(false);
        self.done.fill(false);
    }

    pub fn producer(&self, value: &str) -> Option<usize> {
        self.producer.get(value).copied()
    }

    pub fn readers(&self, value: &str) -> usize {
        self.consumers.get(value).map_or(0, Vec::len)
    }

    pub fn initializer(&self, name: &str) -> Option<usize> {
        self.initializers.get(name).copied()
    }

    /// The value `target` of `model` (the model indexed, its initializers' data possibly
    /// changed since) on each sample.
    pub fn compute(&mut self, model: &Model, target: &str) -> Result<Vec<TensorData>> {
        let g = model.graph();
        let root = self
            .producer(target)
            .ok_or_else(|| Error::tensor(target, "no node computes it"))?;
        // the nodes between known values and the target, dependencies first
        let mut order = Vec::new();
        // (a set, not a flag per node: the cost of a run follows its nodes, not the model's)
        let mut seen: HashSet<usize> = HashSet::new();
        let mut leaves: Vec<&str> = Vec::new();
        let mut leaf_seen: HashSet<&str> = HashSet::new();
        let mut stack = vec![(root, false)];
        while let Some((n, expanded)) = stack.pop() {
            if expanded {
                order.push(n);
                continue;
            }
            if !seen.insert(n) {
                continue;
            }
            stack.push((n, true));
            for v in node_uses(&g.node[n]) {
                if self.known.contains_key(v) {
                    if leaf_seen.insert(v) {
                        leaves.push(v);
                    }
                } else if self.initializers.contains_key(v) {
                    continue;
                } else {
                    match self.producer(v) {
                        Some(p) if !seen.contains(&p) => stack.push((p, false)),
                        Some(_) => {}
                        None => {
                            return Err(Error::tensor(
                                v,
                                "read on the way to a measured layer, but neither computed, \
                                 constant nor given by the samples",
                            ))
                        }
                    }
                }
            }
        }
        // the model of those nodes: known values in; out, the target and the new kept values
        // a later run may read (read by a node outside these, or by the target's, which runs
        // again once changed)
        let mut outputs = vec![target.to_string()];
        for &n in &order {
            for o in &g.node[n].output {
                if n != root
                    && self.keep.contains(o)
                    && self
                        .consumers
                        .get(o)
                        .is_some_and(|r| r.iter().any(|&c| c == root || !seen.contains(&c)))
                {
                    outputs.push(o.clone());
                }
            }
        }
        let mut graph = GraphProto::new();
        graph.name = "segment".into();
        let mut inits: HashSet<&str> = HashSet::new();
        for &n in &order {
            let node = &g.node[n];
            for v in node_uses(node) {
                if let Some(&i) = self.initializers.get(v) {
                    if inits.insert(v) {
                        graph.initializer.push(g.initializer[i].clone());
                    }
                }
            }
            graph.node.push(node.clone());
        }
        for &v in &leaves {
            let t = &self.known[v][0];
            graph.input.push(crate::graph::upgrade::tensor_value_info(
                v,
                t.elem_type(),
                t.shape(),
            ));
        }
        for o in &outputs {
            let mut vi = ValueInfoProto::new();
            vi.name = o.clone();
            graph.output.push(vi);
        }
        let src = &model.proto;
        let mut proto = ModelProto::new();
        proto.ir_version = src.ir_version;
        proto.opset_import = src.opset_import.clone();
        proto.functions = src.functions.clone();
        proto.graph = Some(graph).into();
        let part = Model {
            proto,
            dir: model.dir.clone(),
            external: Default::default(),
            files: vec![],
        };
        let mut results: Vec<Vec<TensorData>> = vec![Vec::with_capacity(self.count); outputs.len()];
        let mut runner: Option<(Runner, Vec<Vec<usize>>)> = None;
        for k in 0..self.count {
            let sample: Sample = leaves
                .iter()
                .map(|&v| (v.to_string(), self.known[v][k].clone()))
                .collect();
            let shapes: Vec<Vec<usize>> = sample.iter().map(|(_, t)| t.shape().to_vec()).collect();
            if runner.as_ref().is_none_or(|(_, s)| *s != shapes) {
                runner = Some((Runner::new(&part, &sample, &[])?, shapes));
            }
            let out = runner.as_ref().expect("set above").0.run(&sample)?;
            if out.len() != outputs.len() {
                return Err(Error::runtime(
                    "running a part of the model",
                    format!("{} outputs for {} asked", out.len(), outputs.len()),
                ));
            }
            for (r, t) in results.iter_mut().zip(out) {
                r.push(t);
            }
        }
        drop(runner);
        drop(part);
        self.nodes_run += order.len();
        for &n in &order {
            if n != root {
                self.ran[n] = true;
            }
        }
        let mut results = results.into_iter();
        let value = results.next().unwrap_or_default();
        for (name, vals) in outputs.into_iter().skip(1).zip(results) {
            self.bytes += vals.iter().map(bytes_of).sum::<usize>();
            self.known.insert(name, vals);
        }
        self.forget(g);
        Ok(value)
    }

    /// Drops the kept values no node will read again (and all of them past the budget).
    fn forget(&mut self, g: &GraphProto) {
        let kept: Vec<String> = self
            .known
            .keys()
            .filter(|k| !self.inputs.contains(*k))
            .cloned()
            .collect();
        for v in kept {
            let readers = self.consumers.get(&v).cloned().unwrap_or_default();
            if readers.iter().all(|&c| self.is_done(g, c, 0)) {
                if let Some(vals) = self.known.remove(&v) {
                    self.bytes -= vals.iter().map(bytes_of).sum::<usize>();
                }
            }
        }
        if self.bytes > BUDGET {
            self.forget_computed();
        }
    }

    /// Whether node `n` has run with its results final and each of its outputs is known or
    /// read only by such nodes: no later run needs its inputs.
    fn is_done(&mut self, g: &GraphProto, n: usize, depth: usize) -> bool {
        if self.done[n] {
            return true;
        }
        if !self.ran[n] || depth > DONE_DEPTH {
            return false;
        }
        for o in g.node[n].output.iter().filter(|o| !o.is_empty()) {
            if self.known.contains_key(o) {
                continue;
            }
            let readers = self.consumers.get(o).cloned().unwrap_or_default();
            if !readers.iter().all(|&c| self.is_done(g, c, depth + 1)) {
                return false;
            }
        }
        self.done[n] = true;
        true
    }
}
