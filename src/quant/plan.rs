//! Mark: small per-op handlers say which tensors are activations, weights (with their axis)
//! and biases; nothing is inserted here. [`super::qdq`] materializes the plan in one step.
//!
//! | op | marks |
//! |----|-------|
//! | Conv, ConvTranspose | X activation, W weight (axis 0 / 1), B int32 bias, Y activation |
//! | Gemm | A activation, constant B weight (axis 0 if transB else 1), 1-D C bias when beta = 1 |
//! | MatMul | inputs activations, or a constant 2-D second input as weight (axis 1) |
//! | Add, Mul, Concat | inputs and output activations (constant inputs quantized from their values) |
//! | AveragePool, GlobalAveragePool | input and output activations |
//! | MaxPool, Reshape, Flatten, Transpose, Squeeze, Unsqueeze, Split, Slice, Gather, DepthToSpace, SpaceToDepth | input activation; the outputs share the input's parameters |
//! | Resize | nearest: as data movement; linear and cubic interpolate new values: input and output activations |
//! | Pad | reflect, edge, wrap, or constant 0 (every range includes 0): as data movement; another constant: input and output activations |
//! | Sigmoid, HardSigmoid, HardSwish, LeakyRelu, PRelu, InstanceNormalization | input (data input only) and output activations; PRelu's slope, InstanceNormalization's scale and bias stay float |
//! | Relu, Clip | removed where exact (the quantized zero is the grid's minimum, Clip's minimum is 0): the producer's output is calibrated on the activation's output; otherwise input and output activations |
//!
//! This follows ONNX Runtime's QDQ registry (`QDQDirect8BitOp`, `QDQResize`, `QDQPad`,
//! `QDQSplit`, `QDQGather`), except Resize: ONNX Runtime shares parameters in every mode, qfold
//! only where the output's values are the input's.
//!
//! Softmax is quantized (input and output, the output on the fixed range [0, 1]) when
//! `quantize_softmax` is set: every preset but the tract, fbgemm, qnnpack and TensorRT ones,
//! which keep it float as their runtimes do. tract evaluates DequantizeLinear -> Softmax ->
//! QuantizeLinear as a lookup table, which is wrong, so qfold's runs in tract see such a
//! Softmax decomposed ([`super::decompose::softmax_for_tract`]); before opset 13 only a
//! Softmax over the last axis has that form, and others stay float. Nothing is marked on the
//! output of a Softmax left float.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use serde::Serialize;

use crate::error::{Error, Result};
use crate::fusion::patterns;
use crate::fusion::rules::{label, single_use};
use crate::graph::{spec, Graph};
use crate::onnx::attr::{self, defaults};
use crate::onnx::{ElemType, Model};

use super::params::QType;

/// Ops whose outputs share the input's quantization parameters (Resize and Pad only in the
/// modes [`shares_input_params`] accepts; otherwise their outputs are calibrated).
pub const SHARING_OPS: &[&str] = &[
    "MaxPool",
    "Reshape",
    "Flatten",
    "Transpose",
    "Squeeze",
    "Unsqueeze",
    "Split",
    "Slice",
    "Gather",
    "DepthToSpace",
    "SpaceToDepth",
    "Resize",
    "Pad",
];

/// Ops that get their own output parameters.
pub const QUANTIZED_OPS: &[&str] = &[
    "Conv",
    "ConvTranspose",
    "Gemm",
    "MatMul",
    "Add",
    "Mul",
    "Concat",
    "AveragePool",
    "GlobalAveragePool",
    "Relu",
    "Clip",
    "Sigmoid",
    "HardSigmoid",
    "HardSwish",
    "LeakyRelu",
    "PRelu",
    "InstanceNormalization",
    "Softmax",
];

/// Whether node `n` of a sharing op moves its input's values without computing new ones, so
/// that its outputs can carry the input's quantization parameters exactly: always for the
/// pure data-movement ops; Resize in `nearest` mode; Pad in `reflect`, `edge` or `wrap` mode or
/// padding with the constant 0 (every quantized range includes 0). `opset` is the model's
/// (Pad's constant is an attribute before 11, an input from 11).
pub fn shares_input_params(g: &Graph, n: &crate::onnx::proto::NodeProto, opset: i64) -> bool {
    match n.op_type.as_str() {
        "Resize" => attr::string(n, "mode")
            .ok()
            .flatten()
            .is_none_or(|m| m == "nearest"),
        "Pad" => {
            let mode = attr::string(n, "mode").ok().flatten();
            if mode.as_deref().is_some_and(|m| m != "constant") {
                return true;
            }
            if opset < 11 {
                return attr::float(n, "value", 0.0).is_ok_and(|v| v == 0.0);
            }
            match n.input.get(2).filter(|s| !s.is_empty()) {
                None => true,
                Some(c) => g
                    .constant(c)
                    .ok()
                    .flatten()
                    .is_some_and(|t| t.len() == 1 && t.to_f64().iter().all(|&v| v == 0.0)),
            }
        }
        op => SHARING_OPS.contains(&op),
    }
}

/// Settings the plan depends on.
#[derive(Debug, Clone, Serialize)]
pub struct PlanOptions {
    pub activation: QType,
    pub symmetric_activations: bool,
    pub per_channel: bool,
    /// Quantize biases to int32 (false: leave them float, as TensorRT wants).
    pub int32_bias: bool,
    /// Node names or module paths left float.
    pub exclude: Vec<String>,
    /// Op types left float.
    pub exclude_op_types: Vec<String>,
    /// With `per_channel`: keep a weight per tensor when that alone quantizes it with at least
    /// this SQNR (dB); tract runs per-tensor QLinearConv much faster.
    pub per_tensor_min_sqnr: Option<f64>,
    /// Quantize Softmax (see the module docs).
    pub quantize_softmax: bool,
}

/// A weight input to quantize.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WeightUse {
    pub node: String,
    pub slot: usize,
    pub tensor: String,
    /// Per-channel axis, `None` for per-tensor.
    pub axis: Option<usize>,
}

/// A bias input to quantize to int32.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BiasUse {
    pub node: String,
    pub slot: usize,
    pub tensor: String,
    /// The activation input whose scale multiplies the weight's.
    pub input: String,
    pub weight: String,
}

/// Where an activation's parameters come from.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// Calibrated in the float model, on this value (the activation itself, or the output of
    /// the Relu/Clip that quantization absorbs).
    Calibrated(String),
    /// A constant: parameters from its own values.
    Constant,
    /// The same parameters as another activation (data-movement ops).
    SharedWith(String),
}

/// A removed Relu or Clip: its producer will write the activation's output directly.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AbsorbedActivation {
    pub node: String,
    pub producer: String,
    /// Clip's upper bound, which caps the calibrated range.
    pub max: Option<f32>,
}

/// The plan: which tensors get which treatment.
#[derive(Debug, Clone, Default, Serialize)]
pub struct QuantPlan {
    /// Activations by value name, in graph order of first marking.
    pub activations: BTreeMap<String, Source>,
    pub activation_order: Vec<String>,
    pub weights: Vec<WeightUse>,
    pub biases: Vec<BiasUse>,
    pub absorbed: Vec<AbsorbedActivation>,
    /// Node names quantized.
    pub quantized: Vec<String>,
    /// Nodes left float, with the reason.
    #[serde(serialize_with = "crate::report::ser::node_reasons")]
    pub float: Vec<(String, String)>,
    /// The nodes left float by op type: how many, and their distinct reasons.
    pub float_by_op: BTreeMap<String, FloatOps>,
    /// Outputs of the Softmax nodes left float: never marked.
    #[serde(skip)]
    float_softmax_outputs: HashSet<String>,
}

/// The nodes of one op type left float.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct FloatOps {
    pub count: usize,
    /// Distinct reasons, in the order first met.
    pub reasons: Vec<String>,
}

impl QuantPlan {
    fn leave_float(&mut self, n: &crate::onnx::proto::NodeProto, reason: String) {
        let group = self.float_by_op.entry(n.op_type.clone()).or_default();
        group.count += 1;
        if !group.reasons.contains(&reason) {
            group.reasons.push(reason.clone());
        }
        self.float.push((label(n), reason));
    }

    /// One line per op type left float, most nodes first: `Shape 6 (reason; reason)`.
    pub fn float_summary(&self) -> Vec<String> {
        let mut groups: Vec<(&String, &FloatOps)> = self.float_by_op.iter().collect();
        groups.sort_by(|a, b| b.1.count.cmp(&a.1.count).then(a.0.cmp(b.0)));
        groups
            .into_iter()
            .map(|(op, f)| format!("{op} {} ({})", f.count, f.reasons.join("; ")))
            .collect()
    }

    fn mark_activation(&mut self, name: &str, source: Source) {
        if name.is_empty() || self.activations.contains_key(name) {
            return;
        }
        if self.float_softmax_outputs.contains(name) {
            return;
        }
        self.activation_order.push(name.to_string());
        self.activations.insert(name.to_string(), source);
    }

    fn mark_input(&mut self, g: &Graph, name: &str) {
        let src = if g.const_source(name).is_some() {
            Source::Constant
        } else {
            Source::Calibrated(name.to_string())
        };
        self.mark_activation(name, src);
    }

    /// Values the calibration run must observe.
    pub fn calibrated_values(&self) -> Vec<String> {
        let mut seen = HashSet::new();
        self.activation_order
            .iter()
            .filter_map(|a| match &self.activations[a] {
                Source::Calibrated(v) => Some(v.clone()),
                _ => None,
            })
            .filter(|v| seen.insert(v.clone()))
            .collect()
    }
}

/// Refuses an op type of `--op-types` that no node of `g` has (matched case-insensitively,
/// as the plan matches them), listing the op types present: a misspelt type would otherwise
/// change nothing, silently. Checked on the model as given, before fusion removes any node.
pub fn check_op_types(g: &Graph, op_types: &[String]) -> Result<()> {
    for t in op_types {
        if !(0..g.nodes().len()).any(|i| g.node(i).op_type.eq_ignore_ascii_case(t)) {
            let present: BTreeSet<&str> = (0..g.nodes().len())
                .map(|i| g.node(i).op_type.as_str())
                .collect();
            return Err(Error::Usage(format!(
                "--op-types {t}: no node of this op type in the model (op types are matched \
                 case-insensitively; present: {})",
                present.into_iter().collect::<Vec<_>>().join(", ")
            )));
        }
    }
    Ok(())
}

fn excluded(g: &Graph, opts: &PlanOptions) -> Result<BTreeSet<usize>> {
    let mut out = BTreeSet::new();
    for name in &opts.exclude {
        let before = out.len();
        if let Ok(nodes) = patterns::resolve(g, name) {
            out.extend(nodes);
        }
        // a module path excludes every node under its scope, submodules included
        let prefix = format!("/{}/", patterns::scope_segments(name).join("/"));
        out.extend((0..g.nodes().len()).filter(|&i| g.node(i).name.starts_with(&prefix)));
        if out.len() == before && g.node_by_name(name).is_none() {
            return Err(Error::Usage(format!(
                "--exclude '{name}': neither a node name nor a module path of this model"
            )));
        }
    }
    Ok(out)
}

/// Why node `i` stays float on its own terms (exclusions, domain, spec, op type, element type),
/// or `None`.
fn op_float_reason(
    g: &Graph,
    i: usize,
    excl: &BTreeSet<usize>,
    opts: &PlanOptions,
    types: &crate::graph::Map<String, ElemType>,
    opset: i64,
) -> Option<String> {
    let n = g.node(i);
    if excl.contains(&i) {
        return Some("excluded by --exclude".into());
    }
    if opts
        .exclude_op_types
        .iter()
        .any(|t| t.eq_ignore_ascii_case(&n.op_type))
    {
        return Some(format!("op type {} excluded", n.op_type));
    }
    if !(n.domain.is_empty() || n.domain == "ai.onnx") {
        return Some(format!("domain {}", n.domain));
    }
    if let Err(r) = spec::check(n) {
        return Some(format!("malformed {}: {r}", n.op_type));
    }
    let op = n.op_type.as_str();
    if op == "Softmax" {
        if !opts.quantize_softmax {
            return Some("the preset keeps Softmax float".into());
        }
        let rank = n
            .input
            .first()
            .and_then(|x| super::decompose::declared_rank(g.proto(), x))
            .or_else(|| super::decompose::declared_rank(g.proto(), &n.output[0]));
        if super::decompose::softmax_axis(n, opset, rank).is_none() {
            return Some(
                "a Softmax over several axes (opset < 13): tract could not check it quantized"
                    .into(),
            );
        }
    }
    if !QUANTIZED_OPS.contains(&op) && !SHARING_OPS.contains(&op) {
        return Some(format!("no quantized form for {op}"));
    }
    match types.get(n.output[0].as_str()) {
        Some(ElemType::F32) => None,
        Some(t) => Some(format!(
            "its output is {}: only float32 tensors are quantized",
            t.name()
        )),
        // Conv, pooling and Gemm only compute on floats.
        None if matches!(
            op,
            "Conv" | "ConvTranspose" | "Gemm" | "AveragePool" | "GlobalAveragePool"
        ) =>
        {
            None
        }
        None => Some("the element type of its output is not known".into()),
    }
}

/// Whether a Relu (or Clip with min 0) after a quantized producer can be absorbed exactly.
fn absorbable(g: &Graph, act: usize, opts: &PlanOptions) -> Result<Option<(usize, Option<f32>)>> {
    let n = g.node(act);
    if opts.symmetric_activations {
        return Ok(None); // zero is mid-grid: the Relu stays
    }
    let max = if n.op_type == "Clip" {
        let lo = clip_bound(g, n, 1, "min")?;
        let hi = clip_bound(g, n, 2, "max")?;
        if lo != Some(0.0) {
            return Ok(None);
        }
        hi
    } else {
        None
    };
    let Some(x) = n.input.first() else {
        return Ok(None);
    };
    let Some(p) = g.producer(x) else {
        return Ok(None);
    };
    if single_use(g, x).is_some()
        || !matches!(
            g.node(p).op_type.as_str(),
            "Conv" | "ConvTranspose" | "Gemm" | "MatMul" | "Add"
        )
    {
        return Ok(None);
    }
    Ok(Some((p, max)))
}

fn clip_bound(
    g: &Graph,
    n: &crate::onnx::proto::NodeProto,
    slot: usize,
    attr_name: &str,
) -> Result<Option<f32>> {
    if let Some(name) = n.input.get(slot).filter(|s| !s.is_empty()) {
        return Ok(g
            .constant(name)?
            .and_then(|t| t.to_f64().iter().next().map(|&v| v as f32)));
    }
    let default = if attr_name == "min" {
        f32::NEG_INFINITY
    } else {
        f32::INFINITY
    };
    let v = attr::float(n, attr_name, default)?;
    Ok(v.is_finite().then_some(v))
}

/// Marks the model's tensors.
pub fn plan(model: &Model, opts: &PlanOptions) -> Result<QuantPlan> {
    let g = Graph::of_model(model);
    let opset = model.opset().unwrap_or(0);
    let excl = excluded(&g, opts)?;
    let mut plan = QuantPlan::default();
    let types = crate::graph::types::elem_types(&g);
    // Why each node stays float (None: it is quantized), decided once.
    let mut float_reason: Vec<Option<String>> = (0..g.len())
        .map(|i| op_float_reason(&g, i, &excl, opts, &types, opset))
        .collect();
    plan.float_softmax_outputs = (0..g.len())
        .filter(|&i| g.node(i).op_type == "Softmax" && float_reason[i].is_some())
        .flat_map(|i| g.node(i).output.iter().cloned())
        .collect();
    // A data-movement op is quantized only where a quantized op reads its output (directly or
    // through more data movement): otherwise its Q/DQ pair would only cost.
    let order = g.topo_order()?;
    for &i in order.iter().rev() {
        let n = g.node(i);
        if float_reason[i].is_some() || !shares_input_params(&g, n, opset) {
            continue;
        }
        // The outputs of a float Softmax stay float (see `mark_activation`), so there are no
        // parameters to share: the Reshape the opset-13 upgrade puts after an inner-axis
        // Softmax, say.
        let from_softmax = n
            .input
            .first()
            .is_some_and(|x| plan.float_softmax_outputs.contains(x));
        if from_softmax {
            float_reason[i] = Some("it reads a Softmax output, which stays float".into());
            continue;
        }
        let read = n
            .output
            .iter()
            .flat_map(|o| g.consumers(o))
            .any(|&c| float_reason[c].is_none());
        if !read {
            float_reason[i] = Some("no quantized op reads its output".into());
        }
    }
    let quantizable = |i: usize| -> Option<String> { float_reason[i].clone() };
    // Absorb activations first, so their producers' outputs are calibrated after the activation.
    let mut absorbed_by_producer = BTreeMap::new();
    let mut absorbed_nodes = HashSet::new();
    for i in 0..g.nodes().len() {
        let n = g.node(i);
        if !(n.op_type == "Relu" || n.op_type == "Clip") || quantizable(i).is_some() {
            continue;
        }
        if let Some((p, max)) = absorbable(&g, i, opts)? {
            if quantizable(p).is_none() {
                absorbed_by_producer.insert(p, (i, max));
                absorbed_nodes.insert(i);
            }
        }
    }
    for i in order {
        let n = g.node(i);
        if n.op_type == "Constant" {
            continue;
        }
        if let Some(reason) = quantizable(i) {
            plan.leave_float(n, reason);
            continue;
        }
        if absorbed_nodes.contains(&i) {
            continue; // handled with its producer
        }
        plan.quantized.push(label(n));
        let op = n.op_type.as_str();
        let out = n.output.first().cloned().unwrap_or_default();
        // The value downstream sees: the absorbed activation's output, calibrated there.
        let (out_value, calib_value) = match absorbed_by_producer.get(&i) {
            Some(&(a, max)) => {
                let act = g.node(a);
                plan.absorbed.push(AbsorbedActivation {
                    node: label(act),
                    producer: label(n),
                    max,
                });
                (act.output[0].clone(), act.output[0].clone())
            }
            None => (out.clone(), out.clone()),
        };
        match op {
            "Conv" | "ConvTranspose" => {
                plan.mark_input(&g, &n.input[0]);
                let axis = if op == "Conv" { 0 } else { 1 };
                mark_weight(&g, &mut plan, n, 1, Some(axis), opts);
                if let Some(b) = n.input.get(2).filter(|s| !s.is_empty()) {
                    if opts.int32_bias && g.const_source(b).is_some() {
                        plan.biases.push(BiasUse {
                            node: label(n),
                            slot: 2,
                            tensor: b.clone(),
                            input: n.input[0].clone(),
                            weight: n.input[1].clone(),
                        });
                    }
                }
            }
            "Gemm" => {
                plan.mark_input(&g, &n.input[0]);
                let trans_b = attr::int(n, "transB", defaults::GEMM_TRANS)? != 0;
                if g.const_source(&n.input[1]).is_some() {
                    mark_weight(&g, &mut plan, n, 1, Some(if trans_b { 0 } else { 1 }), opts);
                } else {
                    plan.mark_input(&g, &n.input[1]);
                }
                let beta = attr::float(n, "beta", defaults::GEMM_BETA)?;
                if let Some(c) = n.input.get(2).filter(|s| !s.is_empty()) {
                    let one_d = g.constant(c)?.is_some_and(|t| t.shape().len() == 1);
                    if opts.int32_bias
                        && one_d
                        && beta == 1.0
                        && g.const_source(&n.input[1]).is_some()
                    {
                        plan.biases.push(BiasUse {
                            node: label(n),
                            slot: 2,
                            tensor: c.clone(),
                            input: n.input[0].clone(),
                            weight: n.input[1].clone(),
                        });
                    }
                }
            }
            "MatMul" => {
                plan.mark_input(&g, &n.input[0]);
                let w2d = g
                    .constant(&n.input[1])?
                    .is_some_and(|t| t.shape().len() == 2);
                if w2d {
                    mark_weight(&g, &mut plan, n, 1, Some(1), opts);
                } else {
                    plan.mark_input(&g, &n.input[1]);
                }
            }
            "Add" | "Mul" | "Concat" | "AveragePool" | "GlobalAveragePool" | "Relu" | "Clip" => {
                let data_inputs = if op == "Clip" { 1 } else { n.input.len() };
                for x in n.input.iter().take(data_inputs) {
                    plan.mark_input(&g, x);
                }
            }
            _ if shares_input_params(&g, n, opset) => {
                // data movement: the outputs share the input's parameters
                plan.mark_input(&g, &n.input[0]);
                for o in n.output.iter().filter(|o| !o.is_empty()) {
                    plan.mark_activation(o, Source::SharedWith(n.input[0].clone()));
                }
                continue;
            }
            _ => {
                // an activation function, a normalization, an interpolating Resize, a Pad
                // with a non-zero constant: the data input, and the output calibrated
                plan.mark_input(&g, &n.input[0]);
            }
        }
        plan.mark_activation(&out_value, Source::Calibrated(calib_value));
    }
    calibrate_before_caps(&g, &mut plan)?;
    Ok(plan)
}

/// A float `Min(x, cap)` with a positive constant cap (per channel, as equalization writes a
/// ReLU6 whose channels were scaled), between two quantized activations where `x` has no
/// other reader: `x` gets the parameters of the Min's output (it is calibrated on that value).
/// Exact but for the caps' rounding to the grid: a value under the cap passes the second
/// QuantizeLinear unchanged, and clipping `x` at the output's largest value `R` first gives
/// `min(x, cap, R)` either way. Calibrated on its own, `x` (uncapped, so a wider range) would be
/// rounded twice, once on a coarser grid.
fn calibrate_before_caps(g: &Graph, plan: &mut QuantPlan) -> Result<()> {
    for i in 0..g.len() {
        let n = g.node(i);
        if n.op_type != "Min" || !(n.domain.is_empty() || n.domain == "ai.onnx") {
            continue;
        }
        let ([x, cap], [out]) = (n.input.as_slice(), n.output.as_slice()) else {
            continue;
        };
        let positive = match g.constant(cap)? {
            Some(t) => !t.is_empty() && t.to_f64().iter().all(|&v| v > 0.0),
            None => false,
        };
        if !positive || g.consumers(x).len() != 1 || g.is_output(x) {
            continue;
        }
        let (Some(Source::Calibrated(_)), Some(Source::Calibrated(o))) =
            (plan.activations.get(x), plan.activations.get(out))
        else {
            continue;
        };
        let o = o.clone();
        plan.activations.insert(x.clone(), Source::Calibrated(o));
    }
    Ok(())
}

fn mark_weight(
    g: &Graph,
    plan: &mut QuantPlan,
    n: &crate::onnx::proto::NodeProto,
    slot: usize,
    axis: Option<usize>,
    opts: &PlanOptions,
) {
    let Some(w) = n.input.get(slot) else { return };
    if g.const_source(w).is_none() {
        plan.mark_input(g, w);
        return;
    }
    let axis = match (opts.per_channel, opts.per_tensor_min_sqnr) {
        (false, _) => None,
        (true, None) => axis,
        (true, Some(db)) => {
            let per_tensor_db = g
                .constant(w)
                .ok()
                .flatten()
                .map(|t| per_tensor_weight_sqnr(&t.to_f64()));
            if per_tensor_db.is_some_and(|s| s >= db) {
                None
            } else {
                axis
            }
        }
    };
    plan.weights.push(WeightUse {
        node: label(n),
        slot,
        tensor: w.clone(),
        axis,
    });
}

/// SQNR (dB) of a weight quantized per tensor, symmetric int8 on [-127, 127].
pub fn per_tensor_weight_sqnr(w: &ndarray::ArrayD<f64>) -> f64 {
    let absmax = w.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    if absmax == 0.0 {
        return f64::INFINITY;
    }
    let scale = absmax / 127.0;
    let (signal, noise) = w.iter().fold((0.0, 0.0), |(s, n), &v| {
        let q = (v / scale).round_ties_even().clamp(-127.0, 127.0) * scale;
        (s + v * v, n + (v - q) * (v - q))
    });
    if noise == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (signal / noise).log10()
    }
}
