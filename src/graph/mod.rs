//! The editable graph: a read-only index over a `GraphProto` that every rule queries, and
//! [`Patch`], the only way a rule changes the graph.

pub mod constants;
pub mod engine;
pub mod guard;
pub mod inline_if;
mod names;
mod patch;
pub mod spec;
#[cfg(test)]
pub mod testing;
pub mod types;
pub mod upgrade;

use std::cell::{OnceCell, RefCell};
use std::cmp::Reverse;
use std::collections::BinaryHeap;

pub use names::Names;

/// Hash maps and sets of the graph index and the rewrite machinery: aHash, fast (SipHash was
/// the largest single cost on 100,000-node graphs) and seeded per process, so the names in a
/// hostile model cannot be chosen to collide.
pub type Map<K, V> = std::collections::HashMap<K, V, ahash::RandomState>;
/// See [`Map`].
pub type Set<K> = std::collections::HashSet<K, ahash::RandomState>;
pub use patch::Patch;

use smallvec::SmallVec;

use crate::error::{Error, Result};
use crate::onnx::attr;
use crate::onnx::proto::{
    attribute_proto::AttributeType, GraphProto, NodeProto, TensorProto, TypeProto,
};
use crate::onnx::{ElemType, Model, TensorData};

/// Where a constant value comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConstSource {
    /// `graph.initializer[i]`.
    Initializer(usize),
    /// The output of the Constant node `graph.node[i]`.
    ConstantNode(usize),
}

/// An index over one graph: producer and consumers of every value, constants, graph inputs and
/// outputs. Values used inside If/Loop/Scan bodies but defined outside count as inputs of the
/// node that owns the body.
#[derive(Debug)]
pub struct Graph<'a> {
    proto: &'a GraphProto,
    /// Everything known of each name, in one map: a name is hashed once per occurrence when
    /// indexing, and the producer, readers and constant of one value share a cache line.
    values: Map<&'a str, Value>,
    /// The first value two nodes produce: (value, first producer, second producer).
    duplicate: Option<(&'a str, usize, usize)>,
    /// The stored order is topological (see [`Graph::in_stored_order`]).
    in_order: bool,
    /// The Constant nodes (default domain), in stored order.
    constant_nodes: Vec<usize>,
    /// See [`Graph::constant_candidates`].
    constant_candidates: Vec<usize>,
    /// Built on first use (explicit node lists, patterns): most runs never look a node up by
    /// name.
    by_name: OnceCell<Map<&'a str, usize>>,
    /// Declared types of graph inputs, value_info entries and graph outputs (built on first
    /// use).
    declared: OnceCell<Map<&'a str, Option<&'a TypeProto>>>,
    /// While the engine runs a rule: every node the rule looked at (its footprint).
    reads: RefCell<Option<Vec<usize>>>,
    /// Initializers that are also graph inputs are defaults a caller may override (IR >= 4),
    /// so they are not constants.
    overridable_initializers: bool,
}

/// One name's entry in the index.
#[derive(Debug, Default)]
struct Value {
    /// The (first) node that produces it.
    producer: Option<usize>,
    /// That node is a Constant (default domain).
    constant_node: bool,
    /// That node reads only constants and values of such nodes (see
    /// [`Graph::constant_candidates`]).
    from_constants: bool,
    /// The initializer of that name (the last, if names repeat).
    initializer: Option<usize>,
    input: bool,
    output: bool,
    /// The nodes that read it, each once, in stored order.
    readers: Readers,
}

/// The readers of one value: most values have one or two, kept inline (no allocation each).
type Readers = SmallVec<[usize; 2]>;

/// Every name a node reads: its inputs and the outer-scope values its subgraphs capture.
pub fn node_uses(node: &NodeProto) -> SmallVec<[&str; 6]> {
    let mut uses: SmallVec<[&str; 6]> = node
        .input
        .iter()
        .filter(|s| !s.is_empty())
        .map(String::as_str)
        .collect();
    if node
        .attribute
        .iter()
        .any(|a| a.g.is_some() || !a.graphs.is_empty())
    {
        uses.extend(implicit_inputs(node));
    }
    uses
}

/// Values a node's subgraphs read from the enclosing scope.
pub fn implicit_inputs(node: &NodeProto) -> Vec<&str> {
    let mut out = Vec::new();
    let mut seen = Set::default();
    for a in &node.attribute {
        for g in a.g.as_ref().into_iter().chain(a.graphs.iter()) {
            for name in free_values(g) {
                if seen.insert(name) {
                    out.push(name);
                }
            }
        }
    }
    out
}

/// Names a graph reads but does not define (its captures from the enclosing scope).
pub fn free_values(g: &GraphProto) -> Vec<&str> {
    let mut defined: Set<&str> = g.input.iter().map(|v| v.name.as_str()).collect();
    defined.extend(g.initializer.iter().map(|t| t.name.as_str()));
    defined.extend(
        g.sparse_initializer
            .iter()
            .filter_map(|s| s.values.as_ref().map(|t| t.name.as_str())),
    );
    for n in &g.node {
        defined.extend(n.output.iter().map(String::as_str));
    }
    let mut out = Vec::new();
    let mut seen = Set::default();
    let uses = g
        .node
        .iter()
        .flat_map(node_uses)
        .chain(g.output.iter().map(|o| o.name.as_str()));
    for name in uses {
        if !name.is_empty() && !defined.contains(name) && seen.insert(name) {
            out.push(name);
        }
    }
    out
}

/// Stable topological order of `nodes` (original position breaks ties). `available` are the
/// names defined before any node (graph inputs, initializers, outer scope). Errors name a node
/// input nothing produces, a value produced twice, or a cycle.
pub(crate) fn topo_order(
    nodes: &[&NodeProto],
    available: &Set<&str>,
) -> std::result::Result<Vec<usize>, String> {
    let mut producer: Map<&str, usize> = Map::default();
    producer.reserve(nodes.len());
    for (i, n) in nodes.iter().enumerate() {
        for o in n.output.iter().filter(|o| !o.is_empty()) {
            if available.contains(o.as_str()) {
                return Err(format!(
                    "value '{o}' is produced by node '{}' but is also a graph input or initializer",
                    n.name
                ));
            }
            if let Some(&j) = producer.get(o.as_str()) {
                return Err(format!(
                    "value '{o}' is produced by two nodes: '{}' and '{}'",
                    nodes[j].name, n.name
                ));
            }
            producer.insert(o, i);
        }
    }
    // Already in order (every value read is produced earlier or outside): the stable order is
    // the given one, found in one pass without building the dependency lists.
    let mut in_order = true;
    'check: for (i, n) in nodes.iter().enumerate() {
        for name in node_uses(n) {
            match producer.get(name) {
                Some(&p) if p < i => {}
                None if available.contains(name) => {}
                _ => {
                    in_order = false;
                    break 'check;
                }
            }
        }
    }
    if in_order {
        return Ok((0..nodes.len()).collect());
    }
    let mut pending = vec![0usize; nodes.len()];
    let mut users: Vec<Vec<usize>> = vec![Vec::new(); nodes.len()];
    // The last node that counted `p` as a dependency: each dependency is counted once per node.
    let mut counted_for = vec![usize::MAX; nodes.len()];
    for (i, n) in nodes.iter().enumerate() {
        for name in node_uses(n) {
            match producer.get(name) {
                Some(&p) => {
                    if counted_for[p] != i {
                        counted_for[p] = i;
                        users[p].push(i);
                        pending[i] += 1;
                    }
                }
                None if available.contains(name) => {}
                None => {
                    return Err(format!(
                        "node '{}' ({}) reads '{name}', which no node, initializer or graph input produces",
                        n.name, n.op_type
                    ))
                }
            }
        }
    }
    let mut ready: BinaryHeap<Reverse<usize>> = (0..nodes.len())
        .filter(|&i| pending[i] == 0)
        .map(Reverse)
        .collect();
    let mut order = Vec::with_capacity(nodes.len());
    while let Some(Reverse(i)) = ready.pop() {
        order.push(i);
        for &u in &users[i] {
            pending[u] -= 1;
            if pending[u] == 0 {
                ready.push(Reverse(u));
            }
        }
    }
    if order.len() != nodes.len() {
        let stuck = (0..nodes.len()).find(|&i| pending[i] > 0).unwrap_or(0);
        return Err(format!(
            "the graph has a cycle through node '{}' ({})",
            nodes[stuck].name, nodes[stuck].op_type
        ));
    }
    Ok(order)
}

impl<'a> Graph<'a> {
    /// Indexes a graph. Initializers that are also graph inputs are not treated as constants.
    pub fn new(proto: &'a GraphProto) -> Graph<'a> {
        let mut values: Map<&str, Value> = Map::default();
        values.reserve(proto.node.len() + proto.initializer.len() + proto.input.len());
        let mut duplicate = None;
        let mut constant_nodes = Vec::new();
        let mut constant_candidates = Vec::new();
        let mut in_order = proto.sparse_initializer.is_empty();
        for v in &proto.input {
            values.entry(v.name.as_str()).or_default().input = true;
        }
        for (i, t) in proto.initializer.iter().enumerate() {
            values.entry(t.name.as_str()).or_default().initializer = Some(i);
        }
        for (i, n) in proto.node.iter().enumerate() {
            let constant = n.op_type == "Constant" && n.domain.is_empty();
            if constant {
                constant_nodes.push(i);
            }
            let mut reads_any = false;
            let mut from_constants = true;
            for name in node_uses(n) {
                let v = values.entry(name).or_default();
                // Read before anything produced it (inputs and initializers are entered
                // first): the stored order is not topological.
                in_order &= v.producer.is_some_and(|p| p < i)
                    || (v.producer.is_none() && (v.input || v.initializer.is_some()));
                reads_any = true;
                from_constants &= v.initializer.is_some() || v.constant_node || v.from_constants;
                if v.readers.last() != Some(&i) {
                    v.readers.push(i);
                }
            }
            let from_constants = reads_any && from_constants;
            if from_constants {
                constant_candidates.push(i);
            }
            for o in n.output.iter().filter(|o| !o.is_empty()) {
                let v = values.entry(o.as_str()).or_default();
                in_order &= !v.input && v.initializer.is_none();
                match v.producer {
                    None => {
                        v.producer = Some(i);
                        v.constant_node = constant;
                        v.from_constants = from_constants;
                    }
                    Some(first) => {
                        duplicate.get_or_insert((o.as_str(), first, i));
                    }
                }
            }
        }
        for v in &proto.output {
            values.entry(v.name.as_str()).or_default().output = true;
        }
        Graph {
            proto,
            in_order: in_order && duplicate.is_none(),
            values,
            duplicate,
            constant_nodes,
            constant_candidates,
            by_name: OnceCell::new(),
            declared: OnceCell::new(),
            reads: RefCell::new(None),
            overridable_initializers: true,
        }
    }

    /// Indexes a model's main graph; IR < 4 models list their initializers as inputs, so those
    /// count as constants there.
    pub fn of_model(model: &'a Model) -> Graph<'a> {
        let mut g = Graph::new(model.graph());
        g.overridable_initializers = model.proto.ir_version >= 4;
        g
    }

    /// The underlying message.
    pub fn proto(&self) -> &'a GraphProto {
        self.proto
    }

    /// The graph's name for messages.
    pub fn name(&self) -> &'a str {
        &self.proto.name
    }

    /// Node `i` (an index this graph handed out: from `producer`, `consumers`, `node_by_name`
    /// or `0..len()`). While the engine runs a rule, the access is recorded in its footprint.
    pub fn node(&self, i: usize) -> &'a NodeProto {
        self.note_read(i);
        &self.proto.node[i]
    }

    /// Records node `i` in the running rule's footprint, if one is being recorded.
    fn note_read(&self, i: usize) {
        if let Some(log) = self.reads.borrow_mut().as_mut() {
            log.push(i);
        }
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.proto.node.len()
    }

    /// True when the graph has no node.
    pub fn is_empty(&self) -> bool {
        self.proto.node.is_empty()
    }

    /// All nodes, in stored order. Rules use [`Graph::node`] instead, so their footprint is
    /// known.
    pub fn nodes(&self) -> &'a [NodeProto] {
        &self.proto.node
    }

    /// The node named `name` (the first, if names repeat).
    pub fn node_by_name(&self, name: &str) -> Option<usize> {
        self.by_name
            .get_or_init(|| {
                let mut m = Map::default();
                for (i, n) in self.proto.node.iter().enumerate() {
                    if !n.name.is_empty() {
                        m.entry(n.name.as_str()).or_insert(i);
                    }
                }
                m
            })
            .get(name)
            .copied()
    }

    /// Starts recording the nodes rules look at.
    pub(crate) fn start_footprint(&self) {
        *self.reads.borrow_mut() = Some(Vec::new());
    }

    /// Stops recording and returns the nodes looked at since [`Graph::start_footprint`].
    pub(crate) fn take_footprint(&self) -> Vec<usize> {
        self.reads.borrow_mut().take().unwrap_or_default()
    }

    /// The node that produces `value`.
    pub fn producer(&self, value: &str) -> Option<usize> {
        self.values.get(value)?.producer
    }

    /// The nodes that read `value` (each once, in stored order), subgraph captures included.
    pub fn consumers(&self, value: &str) -> &[usize] {
        self.values
            .get(value)
            .map(|v| v.readers.as_slice())
            .unwrap_or(&[])
    }

    /// True when `value` is a graph output.
    pub fn is_output(&self, value: &str) -> bool {
        self.values.get(value).is_some_and(|v| v.output)
    }

    /// True when `value` is a graph input.
    pub fn is_input(&self, value: &str) -> bool {
        self.values.get(value).is_some_and(|v| v.input)
    }

    /// The type declared for `value` (graph input, value_info or graph output), if any.
    pub fn declared_type(&self, value: &str) -> Option<&'a TypeProto> {
        self.declared
            .get_or_init(|| {
                let mut m = Map::default();
                for v in self
                    .proto
                    .input
                    .iter()
                    .chain(&self.proto.value_info)
                    .chain(&self.proto.output)
                {
                    m.entry(v.name.as_str()).or_insert(v.type_.as_ref());
                }
                m
            })
            .get(value)
            .copied()
            .flatten()
    }

    /// The initializer named `name`.
    pub fn initializer(&self, name: &str) -> Option<&'a TensorProto> {
        let i = self.values.get(name)?.initializer?;
        self.proto.initializer.get(i)
    }

    /// Graph inputs that are not initializers: what a caller feeds.
    pub fn real_inputs(&self) -> Vec<&'a crate::onnx::proto::ValueInfoProto> {
        self.proto
            .input
            .iter()
            .filter(|v| self.initializer(&v.name).is_none())
            .collect()
    }

    /// Where the constant value `name` comes from, if it is a constant.
    pub fn const_source(&self, name: &str) -> Option<ConstSource> {
        let v = self.values.get(name)?;
        if let Some(i) = v.initializer {
            if self.overridable_initializers && v.input {
                return None;
            }
            return Some(ConstSource::Initializer(i));
        }
        let p = v.producer?;
        // The producer counts as looked at (a footprint), though its kind is read from the
        // index.
        self.note_read(p);
        v.constant_node.then_some(ConstSource::ConstantNode(p))
    }

    /// The value of constant `name` (initializer or Constant node), `None` if it is not constant.
    pub fn constant(&self, name: &str) -> Result<Option<TensorData>> {
        match self.const_source(name) {
            None => Ok(None),
            Some(ConstSource::Initializer(i)) => {
                TensorData::from_proto(&self.proto.initializer[i]).map(Some)
            }
            Some(ConstSource::ConstantNode(p)) => constant_node_value(self.node(p)).map(Some),
        }
    }

    /// Element type and shape of a constant, read from an initializer's header without
    /// decoding its data (a Constant node's value is decoded: those are small). `None` when
    /// `name` is not a constant, its type is unknown or a dimension is negative.
    pub fn constant_shape(&self, name: &str) -> Option<(ElemType, Vec<usize>)> {
        match self.const_source(name)? {
            ConstSource::Initializer(i) => {
                let t = &self.proto.initializer[i];
                let dims = t
                    .dims
                    .iter()
                    .map(|&d| usize::try_from(d).ok())
                    .collect::<Option<Vec<usize>>>()?;
                Some((ElemType::from_onnx(t.data_type)?, dims))
            }
            ConstSource::ConstantNode(p) => constant_node_value(self.node(p))
                .ok()
                .map(|t| (t.elem_type(), t.shape().to_vec())),
        }
    }

    /// Element type of a constant, if known.
    pub fn constant_type(&self, name: &str) -> Option<ElemType> {
        match self.const_source(name)? {
            ConstSource::Initializer(i) => ElemType::from_onnx(self.proto.initializer[i].data_type),
            ConstSource::ConstantNode(p) => constant_node_value(self.node(p))
                .ok()
                .map(|t| t.elem_type()),
        }
    }

    /// Node indices in a topological order (stable: stored order where it is already valid).
    pub fn topo_order(&self) -> Result<Vec<usize>> {
        if self.in_stored_order() {
            return Ok((0..self.len()).collect());
        }
        let nodes: Vec<&NodeProto> = self.proto.node.iter().collect();
        topo_order(&nodes, &self.defined_outside_nodes(&Set::default()))
            .map_err(|e| Error::graph(self.name(), e))
    }

    /// True when the stored order is a valid topological order, as found while indexing (each
    /// read is checked against the producers seen so far). Anything unusual (a value produced twice, or also an input or
    /// initializer, sparse initializers, a dangling read) answers false, so that
    /// [`Graph::topo_order`] takes the full path, which sorts or names the problem.
    pub(crate) fn in_stored_order(&self) -> bool {
        self.in_order
    }

    /// When the stored order is topological: in stored order, every node that reads at least
    /// one value and only initializers, Constant outputs and outputs of such nodes (overridable
    /// initializers and every op included, so a superset of what constant folding folds). Found
    /// while indexing, so a graph with nothing to fold is not walked again.
    pub(crate) fn constant_candidates(&self) -> Option<&[usize]> {
        self.in_order.then_some(&self.constant_candidates)
    }

    fn defined_outside_nodes<'s>(&'s self, outer: &Set<&'s str>) -> Set<&'s str> {
        let mut avail: Set<&str> = outer.clone();
        avail.extend(self.proto.input.iter().map(|v| v.name.as_str()));
        avail.extend(self.proto.initializer.iter().map(|t| t.name.as_str()));
        avail.extend(
            self.proto
                .sparse_initializer
                .iter()
                .filter_map(|s| s.values.as_ref().map(|t| t.name.as_str())),
        );
        avail
    }

    /// Checks the graph: one producer per value, no dangling input, graph outputs defined,
    /// unique node names, nodes in topological order; subgraphs recursively.
    pub fn check(&self) -> Result<()> {
        self.check_scoped(&Set::default())
    }

    fn check_scoped(&self, outer: &Set<&str>) -> Result<()> {
        let gname = if self.name().is_empty() {
            "main"
        } else {
            self.name()
        };
        let err = |r: String| Error::graph(gname, r);
        let avail = self.defined_outside_nodes(outer);
        let mut names = Set::default();
        for n in &self.proto.node {
            if !n.name.is_empty() && !names.insert(n.name.as_str()) {
                return Err(err(format!("two nodes are named '{}'", n.name)));
            }
        }
        let nodes: Vec<&NodeProto> = self.proto.node.iter().collect();
        let order = topo_order(&nodes, &avail).map_err(&err)?;
        if let Some(pos) = order.iter().enumerate().position(|(k, &i)| k != i) {
            let n = &self.proto.node[pos];
            return Err(err(format!(
                "nodes are not in topological order: node '{}' ({}) reads a value produced later",
                n.name, n.op_type
            )));
        }
        let mut defined = avail.clone();
        for n in &self.proto.node {
            for a in &n.attribute {
                for g in a.g.as_ref().into_iter().chain(a.graphs.iter()) {
                    Graph::new(g).check_scoped(&defined)?;
                }
            }
            defined.extend(n.output.iter().map(String::as_str));
        }
        for o in &self.proto.output {
            if !defined.contains(o.name.as_str()) {
                return Err(err(format!(
                    "graph output '{}' is not produced by any node, initializer or input",
                    o.name
                )));
            }
        }
        Ok(())
    }

    /// Number of subgraphs (If/Loop/Scan bodies), nested ones included.
    pub fn subgraph_count(&self) -> usize {
        fn count(g: &GraphProto) -> usize {
            g.node
                .iter()
                .flat_map(|n| n.attribute.iter())
                .flat_map(|a| a.g.as_ref().into_iter().chain(a.graphs.iter()))
                .map(|s| 1 + count(s))
                .sum()
        }
        count(self.proto)
    }
}

/// The value of a Constant node, from whichever attribute holds it.
pub fn constant_node_value(n: &NodeProto) -> Result<TensorData> {
    let node_err = |r: &str| Error::Node {
        node: n.name.clone(),
        op_type: n.op_type.clone(),
        reason: r.to_string(),
    };
    let a = n
        .attribute
        .first()
        .ok_or_else(|| node_err("Constant node without a value attribute"))?;
    use ndarray::{arr0, ArrayD, IxDyn};
    let kind = a.type_.enum_value().ok();
    Ok(match (a.name.as_str(), kind) {
        ("value", _) => {
            let t = attr::tensor(n, "value")?.ok_or_else(|| node_err("missing 'value'"))?;
            TensorData::from_proto(t)?
        }
        ("value_float", Some(AttributeType::FLOAT)) => TensorData::F32(arr0(a.f).into_dyn()),
        ("value_floats", Some(AttributeType::FLOATS)) => TensorData::F32(
            ArrayD::from_shape_vec(IxDyn(&[a.floats.len()]), a.floats.clone())
                .map_err(|e| node_err(&e.to_string()))?,
        ),
        ("value_int", Some(AttributeType::INT)) => TensorData::I64(arr0(a.i).into_dyn()),
        ("value_ints", Some(AttributeType::INTS)) => TensorData::I64(
            ArrayD::from_shape_vec(IxDyn(&[a.ints.len()]), a.ints.clone())
                .map_err(|e| node_err(&e.to_string()))?,
        ),
        (other, _) => {
            return Err(node_err(&format!(
                "Constant attribute '{other}' is not supported as a constant here"
            )))
        }
    })
}
