//! Cross-layer equalization (Nagel, van Baalen, Blankevoort, Welling, "Data-Free Quantization
//! Through Weight Equalization and Bias Correction", ICCV 2019, section 4.1).
//!
//! ```text
//! before:  x -> L1(W1, b1) -> f -> ... -> L2(W2, b2) -> y
//! after:   x -> L1(S^-1 W1, S^-1 b1) -> f -> ... -> L2(W2 S, b2) -> y      (the same y)
//! ```
//!
//! For a positively homogeneous `f` (`f(s x) = s f(x)` for `s > 0`: Relu, LeakyRelu, PRelu,
//! Identity, MaxPool, and no activation at all), scaling output channel `i` of `L1` by
//! `1 / s_i` and input channel `i` of `L2` by `s_i` computes the same function. With
//! `r1_i` the range of output channel `i` of `W1` and `r2_i` that of input channel `i` of `W2`
//! (largest magnitude), the paper's choice
//!
//! ```text
//! s_i = (1 / r2_i) * sqrt(r1_i * r2_i)
//! ```
//!
//! makes both ranges `sqrt(r1_i * r2_i)`, which maximizes the product of the per-channel
//! precisions `r_i / R` of the two layers (eq. 8-10): per-tensor weight quantization then loses
//! little against per-channel. Chains (`L1 -> L2 -> L3`) are equalized pair by pair, sweeping
//! until no scale moves by more than `tolerance` (the paper's iteration).
//!
//! A Clip with minimum 0 and a constant maximum `M` (ReLU6) is not positively homogeneous:
//! the paper replaces ReLU6 with ReLU, which changes the model. qfold keeps it exact instead:
//! where the scales of the channels before it differ from 1, the Clip becomes
//! `Relu -> Min(x, M / S)` with `S` the per-channel divisor applied to the layer before (the
//! Relu is then absorbed by quantization as usual; Min stays float).
//!
//! Layers: Conv (any group: a depthwise conv's channel `i` is both its input and its output
//! channel, so it equalizes with the layer before and the layer after it) and Gemm (output
//! channel `n` is row `n` of `B` with `transB = 1`, column `n` otherwise; a bias `C` is
//! scaled along its last axis). The value between the two layers, and every value of the chain
//! of activations between them, must have exactly one consumer and not be a graph output; the
//! weights must be constant. A channel whose range is zero on either side keeps `s_i = 1`.
//!
//! High-bias absorption (section 4.1.1) is [`super::absorb`] (`--high-bias-absorption`),
//! measured on the calibration data, since the BatchNormalization statistics the paper bounds
//! activations with are folded away by then. Bias correction ([`super::bias_correction`]),
//! which `quantize` runs after equalization unless told not to (the paper's pipeline, section
//! 4.2, here empirical), removes the mean shift; on resnet18 per-tensor weights need it to come
//! within 1 dB of per-channel ones.
//!
//! Equalization is exact in float but not free: it changes the activation ranges per-tensor
//! activation quantization sees. [`choose`] measures both ways (the tract preset).

use std::collections::{BTreeMap, BTreeSet};

use ndarray::{ArrayD, Axis};
use serde::Serialize;

use crate::error::Result;
use crate::fusion::rules::label;
use crate::graph::{Graph, Names, Patch};
use crate::onnx::attr::{self, defaults};
use crate::onnx::{ElemType, Model, TensorData};

/// Ops between the two layers through which a positive per-channel scale passes unchanged.
const HOMOGENEOUS: &[&str] = &["Relu", "LeakyRelu", "PRelu", "Identity", "MaxPool"];

/// How equalization runs.
#[derive(Debug, Clone)]
pub struct EqualizeOptions {
    /// Stop when no scale of a sweep differs from 1 by more than this.
    pub tolerance: f64,
    /// At most this many sweeps over all pairs.
    pub max_sweeps: usize,
}

impl Default for EqualizeOptions {
    fn default() -> Self {
        EqualizeOptions {
            tolerance: 1e-4,
            max_sweeps: 100,
        }
    }
}

/// What equalization did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct EqualizeReport {
    /// The pairs equalized, `first -> [between ->] second`.
    pub pairs: Vec<String>,
    /// Sweeps over all pairs until the scales settled.
    pub sweeps: usize,
    /// The mean SQNR (dB) of the equalized layers' weights quantized per tensor (symmetric
    /// int8), before and after: what equalization is for.
    pub per_tensor_weight_sqnr_before: f64,
    pub per_tensor_weight_sqnr_after: f64,
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Conv { group: usize },
    Gemm { trans_b: bool },
}

/// A layer's weight and bias, as f64, with where they came from.
#[derive(Debug, Clone)]
struct Layer {
    node: usize,
    kind: Kind,
    w: ArrayD<f64>,
    w_type: ElemType,
    b: Option<(ArrayD<f64>, ElemType)>,
    touched: bool,
    /// The product of the divisors applied to each output channel.
    divisor: Vec<f64>,
}

impl Layer {
    fn out_axis(&self) -> usize {
        match self.kind {
            Kind::Conv { .. } => 0,
            Kind::Gemm { trans_b } => usize::from(!trans_b),
        }
    }

    fn out_channels(&self) -> usize {
        self.w.shape()[self.out_axis()]
    }

    fn in_channels(&self) -> Option<usize> {
        match self.kind {
            Kind::Conv { group } => self.w.shape()[1].checked_mul(group),
            Kind::Gemm { trans_b } => Some(self.w.shape()[usize::from(trans_b)]),
        }
    }

    /// Largest magnitude of each output channel.
    fn out_ranges(&self) -> Vec<f64> {
        self.w
            .axis_iter(Axis(self.out_axis()))
            .map(|c| c.iter().fold(0.0f64, |m, v| m.max(v.abs())))
            .collect()
    }

    /// Largest magnitude of each input channel.
    fn in_ranges(&self) -> Vec<f64> {
        let n = self.in_channels().unwrap_or(0);
        let mut r = vec![0.0f64; n];
        for (idx, v) in self.w.indexed_iter() {
            if let Some(c) = self.in_channel_of(&idx) {
                r[c] = r[c].max(v.abs());
            }
        }
        r
    }

    /// The input channel a weight element reads.
    fn in_channel_of(&self, idx: &ndarray::IxDyn) -> Option<usize> {
        match self.kind {
            Kind::Conv { group } => {
                let m = self.w.shape()[0];
                let per_group_out = m / group.max(1);
                let per_group_in = self.w.shape()[1];
                let g = idx[0] / per_group_out.max(1);
                Some(g * per_group_in + idx[1])
            }
            Kind::Gemm { trans_b } => Some(idx[usize::from(trans_b)]),
        }
    }

    /// Divides output channel `i` (weights and bias) by `s[i]`.
    fn scale_out(&mut self, s: &[f64]) {
        let ax = self.out_axis();
        if self.divisor.len() != s.len() {
            self.divisor = vec![1.0; s.len()];
        }
        self.divisor.iter_mut().zip(s).for_each(|(d, v)| *d *= v);
        for (i, mut c) in self.w.axis_iter_mut(Axis(ax)).enumerate() {
            c.mapv_inplace(|v| v / s[i]);
        }
        if let Some((b, _)) = &mut self.b {
            let last = b.ndim().saturating_sub(1);
            if b.ndim() > 0 {
                for (i, mut c) in b.axis_iter_mut(Axis(last)).enumerate() {
                    c.mapv_inplace(|v| v / s[i]);
                }
            }
        }
        self.touched = true;
    }

    /// Multiplies input channel `i` by `s[i]`.
    fn scale_in(&mut self, s: &[f64]) {
        let kind = self.kind;
        let shape = self.w.shape().to_vec();
        for (idx, v) in self.w.indexed_iter_mut() {
            let c = match kind {
                Kind::Conv { group } => {
                    let per_group_out = shape[0] / group.max(1);
                    (idx[0] / per_group_out.max(1)) * shape[1] + idx[1]
                }
                Kind::Gemm { trans_b } => idx[usize::from(trans_b)],
            };
            *v *= s[c];
        }
        self.touched = true;
    }
}

/// Reads the layer at node `i` when it is a Conv or Gemm with constant float weights (and a
/// per-channel bias, if any), else `None`.
fn layer(g: &Graph, i: usize) -> Result<Option<Layer>> {
    let n = g.node(i);
    let kind = match n.op_type.as_str() {
        "Conv" if n.domain.is_empty() || n.domain == "ai.onnx" => Kind::Conv {
            group: attr::int(n, "group", defaults::GROUP)?.max(1) as usize,
        },
        "Gemm" if n.domain.is_empty() || n.domain == "ai.onnx" => Kind::Gemm {
            trans_b: attr::int(n, "transB", defaults::GEMM_TRANS)? != 0,
        },
        _ => return Ok(None),
    };
    if let Kind::Gemm { .. } = kind {
        if attr::int(n, "transA", defaults::GEMM_TRANS)? != 0 {
            return Ok(None);
        }
    }
    let Some(wname) = n.input.get(1) else {
        return Ok(None);
    };
    let Some(w) = g.constant(wname)? else {
        return Ok(None);
    };
    if !w.elem_type().is_float() {
        return Ok(None);
    }
    let w_type = w.elem_type();
    let w = w.to_f64();
    let min_rank = if matches!(kind, Kind::Conv { .. }) {
        3
    } else {
        2
    };
    if w.ndim() < min_rank || (matches!(kind, Kind::Gemm { .. }) && w.ndim() != 2) {
        return Ok(None);
    }
    if let Kind::Conv { group } = kind {
        if w.shape()[0] % group != 0 {
            return Ok(None);
        }
    }
    let b = match n.input.get(2).filter(|s| !s.is_empty()) {
        None => None,
        Some(bname) => {
            let Some(b) = g.constant(bname)? else {
                return Ok(None);
            };
            if !b.elem_type().is_float() {
                return Ok(None);
            }
            Some((b.elem_type(), b.to_f64()))
        }
    };
    let mut l = Layer {
        node: i,
        kind,
        w,
        w_type,
        b: None,
        touched: false,
        divisor: vec![],
    };
    if let Some((ty, b)) = b {
        // the bias must be per output channel along its last axis
        let m = l.out_channels();
        if b.ndim() == 0 || b.shape()[b.ndim() - 1] != m {
            return Ok(None);
        }
        l.b = Some((b, ty));
    }
    Ok(Some(l))
}

/// A channel space to equalize: the layers writing it and those reading it (indices into the
/// layer table; one of each for a plain pair) and the ops between.
struct Pair {
    first: Vec<usize>,
    second: Vec<usize>,
    between: Vec<String>,
    /// Clip nodes between, with their upper bound.
    clips: Vec<(usize, f64)>,
}

/// A channel space found in the graph, by node index.
struct Space {
    writers: BTreeSet<usize>,
    readers: BTreeSet<usize>,
    between: Vec<String>,
    clips: Vec<(usize, f64)>,
}

fn is_layer_op(n: &crate::onnx::proto::NodeProto) -> bool {
    matches!(n.op_type.as_str(), "Conv" | "Gemm") && (n.domain.is_empty() || n.domain == "ai.onnx")
}

/// Whether `n` passes a positive per-channel scale of its data input(s) to its output; Clip's
/// upper bound when it is a Clip with minimum 0.
fn passes_scale(g: &Graph, n: &crate::onnx::proto::NodeProto) -> Option<Option<f64>> {
    if !(n.domain.is_empty() || n.domain == "ai.onnx") || n.output.len() != 1 {
        return None;
    }
    match n.op_type.as_str() {
        "Add" if n.input.len() == 2 => Some(None),
        "Clip" => {
            let (lo, hi) = clip_bounds(g, n).ok().flatten()?;
            (lo == 0.0 && hi > 0.0).then_some(Some(hi))
        }
        "PRelu" if n.input.get(1).is_some_and(|s| g.const_source(s).is_none()) => None,
        op if HOMOGENEOUS.contains(&op) => Some(None),
        _ => None,
    }
}

/// The channel space the output of layer `w` belongs to: every value reachable from it
/// through ops that pass a per-channel scale (Relu, MaxPool, Clip(0, M), Add of two such
/// values, ...), with the layers writing and reading those values. `None` when a value of it
/// is a graph output, comes from or goes to anything else, or a layer both reads and writes it.
/// Scaling every writer's output channel `i` by `1 / s_i` and every reader's input channel `i`
/// by `s_i` is then exact: Add of two scaled values is the scaled sum.
fn space_from(g: &Graph, w: usize) -> Option<Space> {
    let mut space = Space {
        writers: BTreeSet::from([w]),
        readers: BTreeSet::new(),
        between: vec![],
        clips: vec![],
    };
    let mut values: BTreeSet<String> = BTreeSet::new();
    let mut queue = std::collections::VecDeque::new();
    let mut seen_ops: BTreeSet<usize> = BTreeSet::new();
    let first = g.node(w).output.first()?.clone();
    values.insert(first.clone());
    queue.push_back(first);
    while let Some(v) = queue.pop_front() {
        if g.is_output(&v) || values.len() > 10_000 {
            return None;
        }
        // how v is made
        let p = g.producer(&v)?;
        let pn = g.node(p);
        if is_layer_op(pn) {
            if pn.output.len() != 1 {
                return None;
            }
            space.writers.insert(p);
        } else {
            let clip = passes_scale(g, pn)?;
            let data = if pn.op_type == "Add" { 2 } else { 1 };
            if seen_ops.insert(p) {
                space.between.push(label(pn));
                if let Some(hi) = clip {
                    space.clips.push((p, hi));
                }
                for x in pn.input.iter().take(data) {
                    if values.insert(x.clone()) {
                        queue.push_back(x.clone());
                    }
                }
            }
        }
        // where v goes
        for &c in g.consumers(&v) {
            let n = g.node(c);
            if is_layer_op(n) {
                if n.input.first() != Some(&v) || n.input.iter().skip(1).any(|x| *x == v) {
                    return None;
                }
                space.readers.insert(c);
                continue;
            }
            let clip = passes_scale(g, n)?;
            if n.op_type != "Add"
                && (n.input.first() != Some(&v) || n.input.iter().skip(1).any(|x| *x == v))
            {
                return None;
            }
            if seen_ops.insert(c) {
                space.between.push(label(n));
                if let Some(hi) = clip {
                    space.clips.push((c, hi));
                }
                let data = if n.op_type == "Add" { 2 } else { 1 };
                for x in n.input.iter().take(data).chain(n.output.iter()) {
                    if values.insert(x.clone()) {
                        queue.push_back(x.clone());
                    }
                }
            }
        }
    }
    if space.readers.is_empty() || space.writers.intersection(&space.readers).next().is_some() {
        return None;
    }
    Some(space)
}

/// Clip's (min, max) when both are constant (absent bounds are infinite).
pub(crate) fn clip_bounds(
    g: &Graph,
    n: &crate::onnx::proto::NodeProto,
) -> Result<Option<(f64, f64)>> {
    let mut b = [f64::NEG_INFINITY, f64::INFINITY];
    for (slot, name) in [(1usize, "min"), (2, "max")] {
        match n.input.get(slot).filter(|s| !s.is_empty()) {
            Some(x) => match g.constant(x)? {
                Some(t) if t.len() == 1 => {
                    b[slot - 1] = t.to_f64().iter().copied().next().unwrap_or(0.0)
                }
                _ => return Ok(None),
            },
            None => {
                if let Some(v) = attr::find(n, name).map(|_| attr::float(n, name, 0.0)) {
                    b[slot - 1] = v? as f64;
                }
            }
        }
    }
    Ok(Some((b[0], b[1])))
}

/// Equalizes every Conv / Gemm pair of `model` (see the module docs). The model computes the
/// same function afterwards, up to float rounding.
pub fn equalize(model: &mut Model, opts: &EqualizeOptions) -> Result<EqualizeReport> {
    let g = Graph::of_model(model);
    let mut layers: Vec<Layer> = Vec::new();
    let mut index: BTreeMap<usize, usize> = BTreeMap::new();
    let mut pairs: Vec<Pair> = Vec::new();
    let mut claimed: BTreeSet<usize> = BTreeSet::new();
    'layers: for i in g.topo_order()? {
        if claimed.contains(&i) || !is_layer_op(g.node(i)) || layer(&g, i)?.is_none() {
            continue;
        }
        let Some(space) = space_from(&g, i) else {
            continue;
        };
        claimed.extend(space.writers.iter().copied());
        let mut read = Vec::new();
        for &n in space.writers.iter().chain(&space.readers) {
            let Some(l) = layer(&g, n)? else {
                continue 'layers;
            };
            read.push((n, l));
        }
        let channels = read[0].1.out_channels();
        let consistent = read.iter().all(|(n, l)| {
            if space.writers.contains(n) {
                l.out_channels() == channels
            } else {
                l.in_channels() == Some(channels)
            }
        });
        if !consistent {
            continue;
        }
        let mut first = vec![];
        let mut second = vec![];
        for (n, l) in read {
            let k = *index.entry(n).or_insert_with(|| {
                layers.push(l);
                layers.len() - 1
            });
            if space.writers.contains(&n) {
                first.push(k);
            } else {
                second.push(k);
            }
        }
        pairs.push(Pair {
            first,
            second,
            between: space.between,
            clips: space.clips,
        });
    }
    let mut report = EqualizeReport::default();
    if pairs.is_empty() {
        return Ok(report);
    }
    let mean_sqnr = |layers: &[Layer]| -> f64 {
        let v: Vec<f64> = layers
            .iter()
            .map(|l| super::plan::per_tensor_weight_sqnr(&l.w))
            .filter(|d| d.is_finite())
            .collect();
        v.iter().sum::<f64>() / v.len().max(1) as f64
    };
    report.per_tensor_weight_sqnr_before = mean_sqnr(&layers);
    for sweep in 1..=opts.max_sweeps {
        report.sweeps = sweep;
        let mut moved = 0.0f64;
        for p in &pairs {
            let max_of = |v: Vec<Vec<f64>>| -> Vec<f64> {
                let mut out = v[0].clone();
                for r in &v[1..] {
                    out.iter_mut().zip(r).for_each(|(a, b)| *a = a.max(*b));
                }
                out
            };
            let r1 = max_of(p.first.iter().map(|&k| layers[k].out_ranges()).collect());
            let r2 = max_of(p.second.iter().map(|&k| layers[k].in_ranges()).collect());
            let s: Vec<f64> = r1
                .iter()
                .zip(&r2)
                .map(|(&a, &b)| {
                    let s = (a * b).sqrt() / b;
                    if a > 0.0 && b > 0.0 && s.is_finite() && s > 0.0 {
                        s
                    } else {
                        1.0
                    }
                })
                .collect();
            moved = moved.max(s.iter().fold(0.0f64, |m, &v| m.max((v - 1.0).abs())));
            for &k in &p.first {
                layers[k].scale_out(&s);
            }
            for &k in &p.second {
                layers[k].scale_in(&s);
            }
        }
        if moved <= opts.tolerance {
            break;
        }
    }
    report.per_tensor_weight_sqnr_after = mean_sqnr(&layers);
    report.pairs = pairs
        .iter()
        .map(|p| {
            let names = |v: &[usize]| {
                v.iter()
                    .map(|&k| label(g.node(layers[k].node)))
                    .collect::<Vec<_>>()
                    .join(" + ")
            };
            let mut parts = vec![names(&p.first)];
            parts.extend(p.between.iter().cloned());
            parts.push(names(&p.second));
            parts.join(" -> ")
        })
        .collect();

    // Write the new weights under fresh names (the old ones may be shared with other nodes;
    // apply sweeps those left unused).
    let mut names = Names::new(g.proto());
    let mut patch = Patch::new("cross-layer equalization");
    for l in layers.iter().filter(|l| l.touched) {
        let n = g.node(l.node);
        let mut node = n.clone();
        let wname = names.fresh(&format!("{}_equalized", n.input[1]));
        patch.add_initializer(TensorData::from_f64(l.w.clone(), l.w_type)?.to_proto(&wname));
        node.input[1] = wname;
        if let Some((b, ty)) = &l.b {
            let bname = names.fresh(&format!("{}_equalized", n.input[2]));
            patch.add_initializer(TensorData::from_f64(b.clone(), *ty)?.to_proto(&bname));
            node.input[2] = bname;
        }
        patch.replace_node(l.node, node);
    }
    // Clips between scaled channels: Relu -> Min(x, M / S) per channel.
    for p in &pairs {
        let l = &layers[p.first[0]];
        if l.divisor.iter().all(|&d| d == 1.0) {
            continue;
        }
        // the channel axis is 1; the cap broadcasts as [C, 1, ...] over the spatial axes
        let rank = match l.kind {
            Kind::Conv { .. } => l.w.ndim(),
            Kind::Gemm { .. } => 2,
        };
        let mut shape = vec![l.divisor.len()];
        shape.extend(std::iter::repeat_n(1, rank.saturating_sub(2)));
        for &(c, hi) in &p.clips {
            let n = g.node(c);
            let mid = names.fresh(&format!("{}_relu", n.output[0]));
            let cap_name = names.fresh(&format!("{}_cap", n.name));
            let cap: Vec<f32> = l.divisor.iter().map(|d| (hi / d) as f32).collect();
            let cap = ArrayD::from_shape_vec(ndarray::IxDyn(&shape), cap)
                .map_err(|e| crate::error::Error::tensor(&cap_name, e.to_string()))?;
            patch.add_initializer(TensorData::F32(cap).to_proto(&cap_name));
            let mut relu = crate::onnx::proto::NodeProto::new();
            relu.op_type = "Relu".into();
            relu.name = names.fresh(&format!("{}_relu", n.name));
            relu.input = vec![n.input[0].clone()];
            relu.output = vec![mid.clone()];
            let mut min = crate::onnx::proto::NodeProto::new();
            min.op_type = "Min".into();
            min.name = n.name.clone();
            min.input = vec![mid, cap_name];
            min.output = vec![n.output[0].clone()];
            patch.replace_node(c, relu);
            patch.add_node(min);
        }
    }
    drop(g);
    patch.apply(model.graph_mut())?;
    Ok(report)
}

/// What [`choose`] measured: the worst output's SQNR of the quantized model against the float
/// one, with and without equalization, on the calibration samples.
#[derive(Debug, Clone, Serialize)]
pub struct EqualizeChoice {
    /// Whether equalization was kept.
    pub equalized: bool,
    /// dB; `None`: identical to the float model.
    pub sqnr_with_db: Option<f64>,
    pub sqnr_without_db: Option<f64>,
    /// Calibration samples the two models were scored on.
    pub samples: usize,
}

/// Calibration samples [`choose`] scores on (the first ones).
pub const CHOICE_SAMPLES: usize = 16;

/// Quantizes `model` with `opts` with and without equalization (each calibrated on `calib`),
/// scores both against the float model on the first [`CHOICE_SAMPLES`] calibration samples,
/// and keeps equalization only when it scores strictly better (the worst output's SQNR).
/// Equalization is exact in float, but it changes the activation ranges per-tensor
/// quantization sees, and on some models that costs more than the weights gain.
pub fn choose(
    model: &Model,
    calib: &dyn crate::verify::SampleSource,
    opts: &super::QuantizeOptions,
) -> Result<EqualizeChoice> {
    let mut without = opts.clone();
    without.equalize = false;
    let mut with = opts.clone();
    with.equalize = true;
    // the reference: the float model as quantization sees it (fused, its opset raised), which
    // computes the same function as `model`
    let reference = super::prepare(model, &without)?.float;
    let (scores, samples) = super::score_variants(
        model,
        calib,
        reference,
        &[
            ("measuring without equalization", &without),
            ("measuring with equalization", &with),
        ],
    )?;
    let (sqnr_without_db, sqnr_with_db) = (scores[0], scores[1]);
    let db = |s: Option<f64>| s.unwrap_or(f64::INFINITY);
    Ok(EqualizeChoice {
        equalized: db(sqnr_with_db) > db(sqnr_without_db),
        sqnr_with_db,
        sqnr_without_db,
        samples,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::IxDyn;

    fn conv(w: ArrayD<f64>, group: usize) -> Layer {
        Layer {
            node: 0,
            kind: Kind::Conv { group },
            w,
            w_type: ElemType::F32,
            b: None,
            touched: false,
            divisor: vec![],
        }
    }

    #[test]
    fn one_step_makes_both_ranges_the_geometric_mean() {
        // L1: 2 output channels with ranges 4 and 0.25; L2: 1x2 with ranges 1 and 4.
        let mut l1 = conv(
            ArrayD::from_shape_vec(IxDyn(&[2, 1, 1]), vec![4.0, -0.25]).unwrap(),
            1,
        );
        let mut l2 = conv(
            ArrayD::from_shape_vec(IxDyn(&[1, 2, 1]), vec![1.0, -4.0]).unwrap(),
            1,
        );
        let (r1, r2) = (l1.out_ranges(), l2.in_ranges());
        assert_eq!((r1.clone(), r2.clone()), (vec![4.0, 0.25], vec![1.0, 4.0]));
        // s = sqrt(r1 r2) / r2 = [2, 0.25]
        let s: Vec<f64> = r1
            .iter()
            .zip(&r2)
            .map(|(a, b)| (a * b).sqrt() / b)
            .collect();
        assert_eq!(s, vec![2.0, 0.25]);
        l1.scale_out(&s);
        l2.scale_in(&s);
        assert_eq!(l1.out_ranges(), vec![2.0, 1.0]);
        assert_eq!(l2.in_ranges(), vec![2.0, 1.0]);
    }

    #[test]
    fn depthwise_channels_are_their_own_inputs() {
        // a depthwise conv, 3 channels, weight [3, 1, 1]
        let mut dw = conv(
            ArrayD::from_shape_vec(IxDyn(&[3, 1, 1]), vec![1.0, 2.0, 3.0]).unwrap(),
            3,
        );
        assert_eq!(dw.in_channels(), Some(3));
        assert_eq!(dw.in_ranges(), vec![1.0, 2.0, 3.0]);
        dw.scale_in(&[2.0, 1.0, 0.5]);
        assert_eq!(dw.out_ranges(), vec![2.0, 2.0, 1.5]);
        // grouped: 4 outputs, 2 groups, 2 inputs per group: input channel of W[o, c] is
        // (o / 2) * 2 + c
        let g = conv(
            ArrayD::from_shape_fn(IxDyn(&[4, 2, 1]), |i| (i[0] * 2 + i[1]) as f64),
            2,
        );
        assert_eq!(g.in_channels(), Some(4));
        // channel 0: W[0,0]=0, W[1,0]=2; channel 1: W[0,1]=1, W[1,1]=3; channel 2: W[2,0]=4,
        // W[3,0]=6; channel 3: 5, 7
        assert_eq!(g.in_ranges(), vec![2.0, 3.0, 6.0, 7.0]);
    }
}
