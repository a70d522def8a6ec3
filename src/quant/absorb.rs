//! High-bias absorption (Nagel, van Baalen, Blankevoort, Welling, "Data-Free Quantization
//! Through Weight Equalization and Bias Correction", ICCV 2019, section 4.1.1), with the
//! absorbed amounts measured on calibration data.
//!
//! ```text
//! before:  x -> L1(W1, b1) -> Relu -> h     -> L2(W2, b2)        -> y
//! after:   x -> L1(W1, b1 - c) -> Relu -> h - c -> L2(W2, b2 + W2 c) -> y   (the same y)
//! ```
//!
//! Where the input `x_i` of the Relu never falls below `c_i >= 0`,
//! `Relu(x_i - c_i) = Relu(x_i) - c_i`, and the next layer takes the constant into its bias:
//! `W2 (h - c) + (b2 + W2 c) = W2 h + b2`. A channel that never goes below `c_i` then no
//! longer widens the activation's range by `c_i`: with per-tensor activation ranges the
//! channel with the largest maximum sets the grid for all of them. Equalization makes such
//! channels: dividing a channel by `s_i < 1` scales its bias up with it.
//!
//! The paper bounds `x_i` from the BatchNormalization statistics before the Relu,
//! `c_i = max(0, beta_i - 3 gamma_i)`, which fusion has folded away by the time qfold
//! equalizes. qfold measures the same bound on the calibration data (at most [`MAX_SAMPLES`]
//! samples, every position): `c_i = max(0, min(m_i, mean_i - 3 std_i))` with `m_i` the smallest
//! value channel `i` takes. The rewrite is then exact on the calibration data, and on any input
//! where `x_i` stays at or above `c_i`; the `3 std` margin keeps a channel seen at few positions
//! (a squeeze-excitation conv's `[1, C, 1, 1]` output) from giving up all the calibration
//! samples happened to show. Like the paper's bound, it assumes unseen inputs stay in that
//! range: where one does not, the channel is clipped at `c_i` rather than 0.
//!
//! Activations: Relu, Clip(0, M) (ReLU6; it becomes `Relu -> Min(x, M - c)` per channel,
//! `min(x, M) - c = min(x - c, M - c)` for `x >= c`), and an equalized ReLU6
//! (`Relu -> Min(x, cap)`, whose cap becomes `cap - c`). Writers: Conv (any group) and Gemm,
//! their weights constant. Readers: every consumer of the activation must be a Conv without
//! padding or a Gemm, reading it as its data input: a zero-padded Conv would read the padding
//! as `-c` after the shift, which no bias can undo, so such pairs are left as they are (in
//! MobileNet's blocks, the depthwise conv's Relu feeding the 1x1 projection is absorbed; the
//! expansion's Relu feeding the padded depthwise conv is not).

use std::collections::btree_map::Entry;
use std::collections::BTreeMap;

use ndarray::{ArrayD, Axis, IxDyn};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::fusion::rules::label;
use crate::graph::{Graph, Names, Patch};
use crate::onnx::attr::{self, defaults};
use crate::onnx::proto::NodeProto;
use crate::onnx::{ElemType, Model, TensorData};
use crate::verify::SampleSource;

/// At most this many calibration samples measure the amounts.
pub const MAX_SAMPLES: usize = 64;

/// One activation whose writers' biases were lowered.
#[derive(Debug, Clone, Serialize)]
pub struct AbsorbedHighBias {
    /// `writer -> activation -> reader [+ reader]`.
    pub chain: String,
    pub channels: usize,
    /// Channels with a positive amount absorbed.
    pub absorbed: usize,
    /// The largest amount absorbed.
    pub max_amount: f64,
    /// The activation's largest value on the calibration data, before and after: the top of
    /// its per-tensor range.
    pub max_before: f64,
    pub max_after: f64,
}

/// What high-bias absorption did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct AbsorbReport {
    /// Calibration samples the amounts were measured on.
    pub samples: usize,
    pub activations: Vec<AbsorbedHighBias>,
}

/// The activation between a writer and its readers.
#[derive(Debug, Clone)]
enum Act {
    /// A Relu.
    Relu,
    /// A Clip(0, M) node (it becomes Relu -> Min).
    Clip(f64),
    /// A Relu followed by a Min with a constant cap per channel (node index of the Min).
    ReluMin { min: usize, cap: Vec<f64> },
}

/// A writer, its activation and the layers reading the activation.
struct Candidate {
    writer: usize,
    act_node: usize,
    act: Act,
    readers: Vec<usize>,
    channels: usize,
    /// The rank of the writer's output.
    rank: usize,
}

fn standard(n: &NodeProto) -> bool {
    n.domain.is_empty() || n.domain == "ai.onnx"
}

/// A constant float tensor, as f64.
fn float_constant(g: &Graph, name: &str) -> Result<Option<ArrayD<f64>>> {
    Ok(match g.constant(name)? {
        Some(t) if t.elem_type().is_float() => Some(t.to_f64()),
        _ => None,
    })
}

/// The shape of a constant float tensor, read without decoding its data (the candidate search
/// looks at every Conv and Gemm; only the layers rewritten are decoded).
fn float_shape(g: &Graph, name: &str) -> Option<Vec<usize>> {
    g.constant_shape(name)
        .filter(|(ty, _)| ty.is_float())
        .map(|(_, shape)| shape)
}

/// Whether a bias of shape `b` adds one value, or one per channel along its last axis.
fn bias_fits(b: &[usize], channels: usize) -> bool {
    b.iter().product::<usize>() == 1 || b.last() == Some(&channels)
}

/// `t` as one value per channel of a rank-`rank` value with `channels` channels on axis 1
/// (numpy broadcasting), or `None` when it varies along another axis.
fn per_channel(t: &ArrayD<f64>, channels: usize, rank: usize) -> Option<Vec<f64>> {
    if t.len() == 1 {
        return t.iter().next().map(|&v| vec![v; channels]);
    }
    if t.ndim() > rank || rank < 2 {
        return None;
    }
    let pad = rank - t.ndim();
    let ok = (0..rank).all(|ax| {
        let d = if ax < pad { 1 } else { t.shape()[ax - pad] };
        if ax == 1 {
            d == channels
        } else {
            d == 1
        }
    });
    ok.then(|| t.iter().copied().collect())
}

/// The writer's output channels and output rank, when it is a Conv or Gemm with a constant
/// float weight and a constant float bias (or none) along its channels.
fn writer(g: &Graph, i: usize) -> Result<Option<(usize, usize)>> {
    let n = g.node(i);
    if !standard(n) || n.output.len() != 1 {
        return Ok(None);
    }
    let Some(w) = n.input.get(1) else {
        return Ok(None);
    };
    let Some(w) = float_shape(g, w) else {
        return Ok(None);
    };
    let (channels, rank) = match n.op_type.as_str() {
        "Conv" if w.len() >= 3 => (w[0], w.len()),
        "Gemm" if w.len() == 2 => {
            if attr::int(n, "transA", defaults::GEMM_TRANS)? != 0
                || attr::float(n, "beta", defaults::GEMM_BETA)? == 0.0
            {
                return Ok(None);
            }
            let trans_b = attr::int(n, "transB", defaults::GEMM_TRANS)? != 0;
            (w[usize::from(!trans_b)], 2)
        }
        _ => return Ok(None),
    };
    if let Some(b) = n.input.get(2).filter(|s| !s.is_empty()) {
        if !float_shape(g, b).is_some_and(|b| bias_fits(&b, channels)) {
            return Ok(None);
        }
    }
    Ok(Some((channels, rank)))
}

/// Whether node `r` is a layer that can take a per-channel constant of its data input
/// `h` (with `channels` channels) into its bias exactly.
fn reader(g: &Graph, r: usize, h: &str, channels: usize) -> Result<bool> {
    let n = g.node(r);
    if !standard(n)
        || n.input.first().map(String::as_str) != Some(h)
        || n.input.iter().skip(1).any(|x| x == h)
    {
        return Ok(false);
    }
    let Some(w) = n.input.get(1) else {
        return Ok(false);
    };
    let Some(w) = float_shape(g, w) else {
        return Ok(false);
    };
    let out = match n.op_type.as_str() {
        "Conv" if w.len() >= 3 => {
            let group = attr::int(n, "group", defaults::GROUP)?.max(1) as usize;
            let pads = attr::ints(n, "pads")?.unwrap_or_default();
            let auto_pad = attr::string(n, "auto_pad")?.unwrap_or_default();
            if pads.iter().any(|&p| p != 0)
                || !matches!(auto_pad.as_str(), "" | "NOTSET" | "VALID")
                || w[0] % group != 0
                || w[1].checked_mul(group) != Some(channels)
            {
                return Ok(false);
            }
            w[0]
        }
        "Gemm" if w.len() == 2 => {
            if attr::int(n, "transA", defaults::GEMM_TRANS)? != 0
                || attr::float(n, "beta", defaults::GEMM_BETA)? == 0.0
            {
                return Ok(false);
            }
            let trans_b = attr::int(n, "transB", defaults::GEMM_TRANS)? != 0;
            if w[usize::from(trans_b)] != channels {
                return Ok(false);
            }
            w[usize::from(!trans_b)]
        }
        _ => return Ok(false),
    };
    Ok(match n.input.get(2).filter(|s| !s.is_empty()) {
        None => true,
        Some(b) => float_shape(g, b).is_some_and(|b| bias_fits(&b, out)),
    })
}

/// The candidate starting at writer `i`, if the pattern holds.
fn candidate(g: &Graph, i: usize) -> Result<Option<Candidate>> {
    let Some((channels, rank)) = writer(g, i)? else {
        return Ok(None);
    };
    let y = &g.node(i).output[0];
    let [a] = g.consumers(y) else {
        return Ok(None);
    };
    let a = *a;
    let an = g.node(a);
    if g.is_output(y) || !standard(an) || an.output.len() != 1 || an.input.first() != Some(y) {
        return Ok(None);
    }
    let (act, h) = match an.op_type.as_str() {
        "Relu" => {
            let r = &an.output[0];
            let min = match g.consumers(r) {
                [m] if !g.is_output(r) => {
                    let mn = g.node(*m);
                    let other = mn.input.iter().find(|x| *x != r);
                    match (mn.op_type.as_str(), mn.input.len(), other) {
                        ("Min", 2, Some(c)) if standard(mn) && mn.output.len() == 1 => {
                            float_constant(g, c)?
                                .and_then(|t| per_channel(&t, channels, rank))
                                .map(|cap| (*m, cap))
                        }
                        _ => None,
                    }
                }
                _ => None,
            };
            match min {
                Some((m, cap)) => (Act::ReluMin { min: m, cap }, g.node(m).output[0].clone()),
                None => (Act::Relu, r.clone()),
            }
        }
        "Clip" => match super::equalize::clip_bounds(g, an)? {
            Some((lo, hi)) if lo == 0.0 && hi > 0.0 && hi.is_finite() => {
                (Act::Clip(hi), an.output[0].clone())
            }
            _ => return Ok(None),
        },
        _ => return Ok(None),
    };
    let readers = g.consumers(&h).to_vec();
    if g.is_output(&h) || readers.is_empty() {
        return Ok(None);
    }
    for &r in &readers {
        if !reader(g, r, &h, channels)? {
            return Ok(None);
        }
    }
    Ok(Some(Candidate {
        writer: i,
        act_node: a,
        act,
        readers,
        channels,
        rank,
    }))
}

/// Per-channel (axis 1) statistics of a value over the calibration samples.
#[derive(Debug, Clone, Default)]
struct ChannelStats {
    lo: Vec<f64>,
    hi: Vec<f64>,
    sum: Vec<f64>,
    sum_sq: Vec<f64>,
    /// Values seen per channel.
    n: f64,
}

impl ChannelStats {
    fn new(channels: usize) -> ChannelStats {
        ChannelStats {
            lo: vec![f64::INFINITY; channels],
            hi: vec![f64::NEG_INFINITY; channels],
            sum: vec![0.0; channels],
            sum_sq: vec![0.0; channels],
            n: 0.0,
        }
    }

    /// The amount channel `i` can give up: its smallest value, but no more than its mean less
    /// three standard deviations (the paper's `beta - 3 gamma` bound, from the data), so that
    /// a channel seen at few positions (a squeeze-excitation conv's [1, C, 1, 1] output) keeps
    /// a margin below what the calibration samples happened to show; never negative.
    fn amount(&self, i: usize) -> f64 {
        let n = self.n.max(1.0);
        let mean = self.sum[i] / n;
        let var = (self.sum_sq[i] / n - mean * mean).max(0.0);
        let a = self.lo[i].min(mean - 3.0 * var.sqrt()).max(0.0);
        if a.is_finite() {
            a
        } else {
            0.0
        }
    }
}

/// Per-channel statistics of the values `names` of `model` over the first `count` samples of
/// `samples`.
fn channel_stats<S: SampleSource + ?Sized>(
    model: &Model,
    names: &[String],
    samples: &S,
    count: usize,
) -> Result<Vec<ChannelStats>> {
    let mut acc: Vec<Option<ChannelStats>> = vec![None; names.len()];
    super::bias_correction::for_each_value(model, names, samples, count, |j, t| {
        let a = t.to_f64();
        if a.ndim() < 2 {
            return Err(Error::tensor(&names[j], "a measured output of rank < 2"));
        }
        let channels = a.shape()[1];
        let st = acc[j].get_or_insert_with(|| ChannelStats::new(channels));
        if st.lo.len() != channels {
            return Err(Error::tensor(
                &names[j],
                "channel count changed between samples",
            ));
        }
        for (i, c) in a.axis_iter(Axis(1)).enumerate() {
            for &v in c.iter() {
                st.lo[i] = st.lo[i].min(v);
                st.hi[i] = st.hi[i].max(v);
                st.sum[i] += v;
                st.sum_sq[i] += v * v;
            }
        }
        st.n += (a.len() / channels.max(1)) as f64;
        Ok(())
    })?;
    Ok(acc.into_iter().map(Option::unwrap_or_default).collect())
}

/// A layer's bias being edited: its values, its type, and its broadcast shape.
struct Bias {
    values: ArrayD<f64>,
    ty: ElemType,
}

impl Bias {
    /// The bias of node `i` (zeros of `[channels]` where it has none), along its last axis.
    fn of(g: &Graph, i: usize, channels: usize) -> Result<Bias> {
        let n = g.node(i);
        let found = match n.input.get(2).filter(|s| !s.is_empty()) {
            Some(b) => g.constant(b)?,
            None => None,
        };
        let (values, ty) = match found {
            Some(t) => (t.to_f64(), t.elem_type()),
            None => (ArrayD::zeros(IxDyn(&[channels])), ElemType::F32),
        };
        let values = if values.len() == 1 && channels != 1 {
            let v = values.iter().next().copied().unwrap_or(0.0);
            ArrayD::from_elem(IxDyn(&[channels]), v)
        } else {
            values
        };
        Ok(Bias { values, ty })
    }

    /// Adds `d[c]` to channel `c`.
    fn add(&mut self, d: &[f64]) {
        let last = self.values.ndim().saturating_sub(1);
        for (c, mut col) in self.values.axis_iter_mut(Axis(last)).enumerate() {
            if let Some(v) = d.get(c) {
                col.mapv_inplace(|x| x + v);
            }
        }
    }
}

/// `W c`: what a reader's output channels gain from a constant `c` per input channel.
fn reader_shift(g: &Graph, r: usize, c: &[f64]) -> Result<Vec<f64>> {
    let n = g.node(r);
    let w = float_constant(g, &n.input[1])?.ok_or_else(|| {
        Error::tensor(
            &n.input[1],
            "the weight of a layer absorbing a bias is not constant",
        )
    })?;
    Ok(match n.op_type.as_str() {
        "Conv" => {
            let group = attr::int(n, "group", defaults::GROUP)?.max(1) as usize;
            let m = w.shape()[0];
            let per_group_out = (m / group).max(1);
            let per_group_in = w.shape()[1];
            w.axis_iter(Axis(0))
                .enumerate()
                .map(|(o, wo)| {
                    let base = (o / per_group_out) * per_group_in;
                    wo.axis_iter(Axis(0))
                        .enumerate()
                        .map(|(i, k)| c.get(base + i).copied().unwrap_or(0.0) * k.sum())
                        .sum()
                })
                .collect()
        }
        _ => {
            let trans_b = attr::int(n, "transB", defaults::GEMM_TRANS)? != 0;
            let alpha = attr::float(n, "alpha", defaults::GEMM_ALPHA)? as f64;
            let beta = attr::float(n, "beta", defaults::GEMM_BETA)? as f64;
            // B is [K, N], or [N, K] with transB; the bias is added as beta * C
            let b = if trans_b { w.t().to_owned() } else { w };
            b.axis_iter(Axis(1))
                .map(|col| alpha / beta * col.iter().zip(c).map(|(w, c)| w * c).sum::<f64>())
                .collect()
        }
    })
}

/// Absorbs, for every Relu / ReLU6 between a Conv or Gemm and layers that can take a constant
/// into their bias (see the module docs), the smallest value each channel takes on the
/// calibration samples. The model computes the same outputs on those samples afterwards, up to
/// float rounding.
pub fn absorb<S: SampleSource + ?Sized>(model: &mut Model, samples: &S) -> Result<AbsorbReport> {
    let count = samples.len().min(MAX_SAMPLES);
    let mut report = AbsorbReport {
        samples: count,
        activations: vec![],
    };
    if count == 0 {
        return Ok(report);
    }
    let g = Graph::of_model(model);
    let mut cands = Vec::new();
    for i in g.topo_order()? {
        if let Some(c) = candidate(&g, i)? {
            cands.push(c);
        }
    }
    if cands.is_empty() {
        return Ok(report);
    }
    let names: Vec<String> = cands
        .iter()
        .map(|c| g.node(c.writer).output[0].clone())
        .collect();
    let extremes = {
        let _p = crate::progress::phase(format!(
            "measuring the smallest pre-activation values on {count} samples"
        ));
        channel_stats(model, &names, samples, count)?
    };
    let mut names_gen = Names::new(g.proto());
    let mut patch = Patch::new("high-bias absorption");
    let mut biases: BTreeMap<usize, Bias> = BTreeMap::new();
    for (c, st) in cands.iter().zip(&extremes) {
        if st.lo.len() != c.channels {
            continue;
        }
        let hi = &st.hi;
        let caps: Vec<f64> = match &c.act {
            Act::Relu => vec![f64::INFINITY; c.channels],
            Act::Clip(m) => vec![*m; c.channels],
            Act::ReluMin { cap, .. } => cap.clone(),
        };
        let amount: Vec<f64> = (0..c.channels)
            .map(|i| st.amount(i).min(caps[i].max(0.0)))
            .collect();
        let absorbed = amount.iter().filter(|&&a| a > 0.0).count();
        if absorbed == 0 {
            continue;
        }
        // the writer: b - c (a Gemm adds beta * C)
        let wn = g.node(c.writer);
        let beta = if wn.op_type == "Gemm" {
            attr::float(wn, "beta", defaults::GEMM_BETA)? as f64
        } else {
            1.0
        };
        let neg: Vec<f64> = amount.iter().map(|a| -a / beta).collect();
        match biases.entry(c.writer) {
            Entry::Occupied(mut e) => e.get_mut().add(&neg),
            Entry::Vacant(e) => e.insert(Bias::of(&g, c.writer, c.channels)?).add(&neg),
        }
        // the readers: b2 + W2 c
        for &r in &c.readers {
            let shift = reader_shift(&g, r, &amount)?;
            match biases.entry(r) {
                Entry::Occupied(mut e) => e.get_mut().add(&shift),
                Entry::Vacant(e) => e.insert(Bias::of(&g, r, shift.len())?).add(&shift),
            }
        }
        // the cap: min(x, M) - c = min(x - c, M - c)
        let new_cap: Option<Vec<f32>> = match &c.act {
            Act::Relu => None,
            _ => Some(
                caps.iter()
                    .zip(&amount)
                    .map(|(m, a)| (m - a) as f32)
                    .collect(),
            ),
        };
        if let Some(cap) = new_cap {
            let an = g.node(c.act_node);
            let mut shape = vec![c.channels];
            shape.extend(std::iter::repeat_n(1, c.rank.saturating_sub(2)));
            let (min_node, base) = match &c.act {
                Act::ReluMin { min, .. } => (*min, g.node(*min).name.clone()),
                _ => (c.act_node, an.name.clone()),
            };
            let cap_name = names_gen.fresh(&format!("{base}_cap_absorbed"));
            let cap = ArrayD::from_shape_vec(IxDyn(&shape), cap)
                .map_err(|e| Error::tensor(&cap_name, e.to_string()))?;
            patch.add_initializer(TensorData::F32(cap).to_proto(&cap_name));
            let mut min = NodeProto::new();
            min.op_type = "Min".into();
            match &c.act {
                Act::ReluMin { min: m, .. } => {
                    let old = g.node(*m);
                    min.name = old.name.clone();
                    let data = old
                        .input
                        .iter()
                        .find(|x| **x == an.output[0])
                        .cloned()
                        .unwrap_or_else(|| an.output[0].clone());
                    min.input = vec![data, cap_name];
                    min.output = old.output.clone();
                    patch.replace_node(min_node, min);
                }
                _ => {
                    // Clip(0, M) -> Relu -> Min(x, M - c)
                    let mid = names_gen.fresh(&format!("{}_relu", an.output[0]));
                    let mut relu = NodeProto::new();
                    relu.op_type = "Relu".into();
                    relu.name = names_gen.fresh(&format!("{}_relu", an.name));
                    relu.input = vec![an.input[0].clone()];
                    relu.output = vec![mid.clone()];
                    min.name = an.name.clone();
                    min.input = vec![mid, cap_name];
                    min.output = an.output.clone();
                    patch.replace_node(c.act_node, relu);
                    patch.add_node(min);
                }
            }
        }
        let top = |v: &mut dyn Iterator<Item = f64>| v.fold(f64::NEG_INFINITY, f64::max);
        let max_before = top(&mut hi.iter().zip(&caps).map(|(h, m)| h.min(*m).max(0.0)));
        let max_after = top(&mut hi
            .iter()
            .zip(&caps)
            .zip(&amount)
            .map(|((h, m), a)| h.min(*m).max(0.0) - a));
        let mut chain = vec![label(wn), label(g.node(c.act_node))];
        if let Act::ReluMin { min, .. } = &c.act {
            chain.push(label(g.node(*min)));
        }
        chain.push(
            c.readers
                .iter()
                .map(|&r| label(g.node(r)))
                .collect::<Vec<_>>()
                .join(" + "),
        );
        report.activations.push(AbsorbedHighBias {
            chain: chain.join(" -> "),
            channels: c.channels,
            absorbed,
            max_amount: amount.iter().fold(0.0f64, |m, &a| m.max(a)),
            max_before,
            max_after,
        });
    }
    for (i, b) in biases {
        super::bias_correction::write_bias(
            &mut patch,
            &mut names_gen,
            g.node(i),
            i,
            b.values,
            b.ty,
            "absorbed",
        )?;
    }
    drop(g);
    patch.apply(model.graph_mut())?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::testing::*;
    use crate::quant::QuantizeOptions;
    use crate::runtime::Sample;

    /// x -> Conv a (3x3, padded, high biases on channels 0 and 3) -> Relu -> Conv b (1x1, a high
    /// bias on channel 0) -> Clip(0, 6) -> Conv c (1x1, no bias) -> y.
    fn chain() -> Model {
        let pads = || vec![ints("pads", &[1, 1, 1, 1])];
        let small = |shape: &[usize], seed: usize| {
            let n = shape.iter().product();
            f32t(shape, seq(n, seed).iter().map(|v| v * 0.1).collect())
        };
        model(
            vec![
                node("Conv", "a", &["x", "wa", "ba"], &["ya"], pads()),
                node("Relu", "ra", &["ya"], &["ha"], vec![]),
                node("Conv", "b", &["ha", "wb", "bb"], &["yb"], vec![]),
                node("Clip", "cb", &["yb", "zero", "six"], &["hb"], vec![]),
                node("Conv", "c", &["hb", "wc"], &["y"], vec![]),
            ],
            vec![
                ("wa", small(&[4, 2, 3, 3], 1)),
                ("ba", f32v(&[4.0, 0.1, -0.5, 3.0])),
                ("wb", small(&[3, 4, 1, 1], 2)),
                ("bb", f32v(&[5.0, 0.2, -0.3])),
                ("wc", small(&[2, 3, 1, 1], 3)),
                ("zero", f32_scalar(0.0)),
                ("six", f32_scalar(6.0)),
            ],
            value_info("x", ElemType::F32, &[1, 2, 5, 5]),
            "y",
        )
    }

    fn samples(n: usize, shape: &[usize]) -> Vec<Sample> {
        let len = shape.iter().product();
        (0..n)
            .map(|k| sample("x", shape, seq(len, 20 + k)))
            .collect()
    }

    #[test]
    fn the_smallest_pre_activation_is_absorbed_exactly_on_the_calibration_data() {
        let m = chain();
        let s = samples(6, &[1, 2, 5, 5]);
        let writers = ["ya".to_string(), "yb".to_string()];
        let before = channel_stats(&m, &writers, &s, s.len()).unwrap();
        let mut absorbed = m.clone();
        let report = absorb(&mut absorbed, &s).unwrap();
        assert_eq!(report.samples, 6);
        let chains: Vec<&str> = report
            .activations
            .iter()
            .map(|a| a.chain.as_str())
            .collect();
        assert_eq!(chains.len(), 2, "{chains:?}");
        assert!(
            chains[0].starts_with("a") && chains[0].ends_with("b"),
            "{chains:?}"
        );
        assert!(
            chains[1].starts_with("b") && chains[1].ends_with("c"),
            "{chains:?}"
        );
        // the same outputs on every calibration sample
        for x in &s {
            assert_same_output(&m, &absorbed, x, 1e-5);
        }
        // each channel's minimum moved down by its amount: min(min, mean - 3 std), if positive
        let after = channel_stats(&absorbed, &writers, &s, s.len()).unwrap();
        let mut moved = 0;
        for (b, a) in before.iter().zip(&after) {
            for i in 0..b.lo.len() {
                let amount = b.amount(i);
                let n = b.n;
                let mean = b.sum[i] / n;
                let std = (b.sum_sq[i] / n - mean * mean).max(0.0).sqrt();
                assert_eq!(amount, b.lo[i].min(mean - 3.0 * std).max(0.0));
                assert!(amount <= b.lo[i].max(0.0));
                let want = b.lo[i] - amount;
                assert!(
                    (a.lo[i] - want).abs() < 1e-5,
                    "min {} -> {}, want {want}",
                    b.lo[i],
                    a.lo[i]
                );
                moved += usize::from(amount > 0.0);
            }
        }
        // the channels the report counts, among them the high-bias ones: 0 and 3 of a, 0 of b
        let counted: usize = report.activations.iter().map(|a| a.absorbed).sum();
        assert_eq!(moved, counted);
        assert!(before[0].amount(0) > 1.0 && before[0].amount(3) > 1.0);
        assert!(before[1].amount(0) > 1.0);
        // the Clip is now Relu -> Min with a per-channel cap of 6 - c
        assert_eq!(count(&absorbed, "Clip"), 0);
        assert_eq!(count(&absorbed, "Min"), 1);
        // the top of a's activation came down from channel 0's maximum
        let a = &report.activations[0];
        assert!(a.max_after < a.max_before - 1.0, "{a:?}");
    }

    #[test]
    fn a_padded_reader_is_left_as_it_is() {
        // Conv p reads the Relu with zero padding: its borders would see -c
        let mut m = chain();
        let g = m.graph_mut();
        g.node[2].attribute = vec![ints("pads", &[1, 1, 1, 1])];
        let s = samples(3, &[1, 2, 5, 5]);
        let mut absorbed = m.clone();
        let report = absorb(&mut absorbed, &s).unwrap();
        // only b -> Clip -> c is left
        assert_eq!(report.activations.len(), 1, "{report:?}");
        assert!(report.activations[0].chain.starts_with("b"));
        for x in &s {
            assert_same_output(&m, &absorbed, x, 1e-5);
        }
    }

    /// SQNR (dB) of `q` against `f` over `samples`.
    fn sqnr(f: &Model, q: &Model, samples: &[Sample]) -> f64 {
        let (mut sig, mut err) = (0.0f64, 0.0f64);
        for s in samples {
            let (a, b) = (run_f64(f, s), run_f64(q, s));
            sig += a.iter().map(|v| v * v).sum::<f64>();
            err += a
                .iter()
                .zip(b.iter())
                .map(|(x, y)| (x - y).powi(2))
                .sum::<f64>();
        }
        10.0 * (sig / err).log10()
    }

    #[test]
    fn absorption_raises_the_sqnr_where_a_high_bias_channel_sets_the_range() {
        // channel 0 of a lives in [19.5, 20.5], channel 1 in [0, 0.5]: the Relu's per-tensor
        // range [0, 20.5] gives channel 1, which the output reads, a step of 0.08
        let m = model(
            vec![
                node("Conv", "a", &["x", "wa", "ba"], &["ya"], vec![]),
                node("Relu", "ra", &["ya"], &["ha"], vec![]),
                node("Conv", "b", &["ha", "wb"], &["y"], vec![]),
            ],
            vec![
                ("wa", f32t(&[2, 2, 1, 1], vec![0.5, 0.0, 0.0, 0.5])),
                ("ba", f32v(&[20.0, 0.0])),
                ("wb", f32t(&[1, 2, 1, 1], vec![0.05, 1.0])),
            ],
            value_info("x", ElemType::F32, &[1, 2, 4, 4]),
            "y",
        );
        let s = samples(8, &[1, 2, 4, 4]);
        let quantized = |absorb: bool| {
            let opts = QuantizeOptions {
                high_bias_absorption: absorb,
                ..QuantizeOptions::default()
            };
            let (q, _, r) =
                super::super::quantize(&m, super::super::Calibration::Samples(&s), &opts).unwrap();
            assert_eq!(r.high_bias_absorption.is_some(), absorb);
            sqnr(&m, &q, &s)
        };
        let (without, with) = (quantized(false), quantized(true));
        assert!(with > without + 15.0, "{without:.2} -> {with:.2} dB");
    }
}
