//! Materialize: one step turns a [`QuantPlan`] and calibrated ranges into QuantizeLinear /
//! DequantizeLinear nodes.
//!
//! - Activation `a` produced by a node: the producer writes `a_prequant`, then
//!   `QuantizeLinear -> a_quantized -> DequantizeLinear -> a`, so every consumer and graph
//!   output keeps reading the name `a`, now carrying the quantized value.
//! - Activation that is a graph input or a constant: `QuantizeLinear` (or an integer
//!   initializer) then `DequantizeLinear -> a_dequantized`, and the graph's consumers read that.
//! - Weight `w` (per channel on its axis, or per tensor): an integer initializer
//!   `w_quantized` with `w_scale` / `w_zero_point`, behind `DequantizeLinear -> w_dequantized`.
//! - Bias: int32 `b_quantized` with scale `x_scale * w_scale` (f32 product) and zero point 0.
//!   A bias value that would not fit int32 widens that channel's weight scale until it fits
//!   with a factor-2 headroom, and the report says so; nothing is clipped silently.
//! - An absorbed Relu / Clip is removed; its producer writes the activation's output.

use std::collections::{BTreeMap, HashMap};

use ndarray::{ArrayD, Axis, IxDyn};
use serde::Serialize;

use super::params::{
    compute_scale_zp, min_weight_scale_for_bias, quantize, quantize_bias, quantize_fast, QType,
    ScaleZp,
};
use super::plan::{QuantPlan, Source, WeightUse};
use crate::error::{Error, Result};
use crate::fusion::rules::label;
use crate::graph::{Graph, Names, Patch};
use crate::onnx::proto::NodeProto;
use crate::onnx::{attr, Model, TensorData};

/// Integer grids and symmetry.
#[derive(Debug, Clone, Serialize)]
pub struct QdqOptions {
    pub activation: QType,
    pub weight: QType,
    pub symmetric_activations: bool,
    pub symmetric_weights: bool,
    pub reduce_range: bool,
}

impl QdqOptions {
    /// The activation grid.
    pub fn activation_grid(&self) -> (i32, i32) {
        // reduce_range applies to weights only in ONNX Runtime and to activations in PyTorch's
        // fbgemm qconfig; qfold follows PyTorch (the preset that sets it is fbgemm's).
        self.activation
            .grid(self.symmetric_activations, self.reduce_range)
    }

    /// The weight grid.
    pub fn weight_grid(&self) -> (i32, i32) {
        self.weight.grid(self.symmetric_weights, false)
    }
}

/// Parameters of one quantized tensor.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TensorParams {
    pub scale: Vec<f32>,
    pub zero_point: Vec<i32>,
    pub axis: Option<usize>,
}

/// What materializing did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct QdqReport {
    pub activations: usize,
    pub weights: usize,
    pub biases: usize,
    pub absorbed: Vec<String>,
    /// Bias channels whose int32 range forced a wider weight scale.
    pub bias_adjustments: Vec<String>,
    /// The opset import raised, from and to.
    #[serde(serialize_with = "crate::report::ser::opset_change")]
    pub opset: Option<(i64, i64)>,
    /// The nodes rewritten when the opset was raised (`node (op): change`), see
    /// [`crate::graph::upgrade`].
    pub upgraded: Vec<String>,
    /// Activation parameters by value name.
    #[serde(serialize_with = "crate::report::ser::scale_zero_points")]
    pub activation_params: BTreeMap<String, (f32, i32)>,
}

fn int_tensor(q: Vec<i32>, shape: &[usize], ty: QType) -> TensorData {
    let a = ArrayD::from_shape_vec(IxDyn(shape), q).expect("shape matches");
    match ty {
        QType::U8 => TensorData::U8(a.mapv(|v| v as u8)),
        QType::I8 => TensorData::I8(a.mapv(|v| v as i8)),
    }
}

fn zp_tensor(zp: &[i32], ty: QType, per_axis: bool) -> TensorData {
    let shape: Vec<usize> = if per_axis { vec![zp.len()] } else { vec![] };
    int_tensor(zp.to_vec(), &shape, ty)
}

fn scale_tensor(s: &[f32], per_axis: bool) -> TensorData {
    let shape: Vec<usize> = if per_axis { vec![s.len()] } else { vec![] };
    TensorData::F32(ArrayD::from_shape_vec(IxDyn(&shape), s.to_vec()).expect("shape matches"))
}

/// A weight's values as float32, in standard (row-major) layout. Every float type converts
/// exactly or, from f64, with the one rounding quantization applied anyway (the range and
/// each value were rounded to f32 before); float32 data is taken as decoded, not copied.
fn weight_values(t: TensorData) -> ArrayD<f32> {
    match t {
        TensorData::F32(a) if a.is_standard_layout() => a,
        t => {
            let a = t.to_f64().mapv(|v| v as f32);
            if a.is_standard_layout() {
                a
            } else {
                a.as_standard_layout().into_owned()
            }
        }
    }
}

/// For element `k` of a row-major tensor of `shape`, its index along `axis`.
fn channel_of(shape: &[usize], axis: usize) -> impl Fn(usize) -> usize {
    let inner: usize = shape.get(axis + 1..).map_or(1, |s| s.iter().product());
    let channels = shape.get(axis).copied().unwrap_or(1).max(1);
    move |k| (k / inner.max(1)) % channels
}

/// Per-channel (or per-tensor) parameters of a weight.
fn weight_params(
    w: &ArrayD<f32>,
    axis: Option<usize>,
    grid: (i32, i32),
    symmetric: bool,
) -> Vec<ScaleZp> {
    let range = |it: &mut dyn Iterator<Item = f32>| {
        it.fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        })
    };
    match axis {
        None => {
            let (lo, hi) = range(&mut w.iter().copied());
            vec![compute_scale_zp(lo, hi, grid.0, grid.1, symmetric)]
        }
        Some(ax) => w
            .axis_iter(Axis(ax))
            .map(|c| {
                let (lo, hi) = range(&mut c.iter().copied());
                compute_scale_zp(lo, hi, grid.0, grid.1, symmetric)
            })
            .collect(),
    }
}

fn quantize_weight(
    w: &ArrayD<f32>,
    axis: Option<usize>,
    params: &[ScaleZp],
    grid: (i32, i32),
) -> Vec<i32> {
    // `iter` walks in logical (row-major) order, which `channel_of` indexes
    match axis {
        None => w
            .iter()
            .map(|&v| quantize_fast(v, params[0], grid.0, grid.1))
            .collect(),
        Some(ax) => {
            let channel = channel_of(w.shape(), ax);
            w.iter()
                .enumerate()
                .map(|(k, &v)| quantize_fast(v, params[channel(k)], grid.0, grid.1))
                .collect()
        }
    }
}

fn new_node(op: &str, name: String, inputs: Vec<String>, output: String) -> NodeProto {
    let mut n = NodeProto::new();
    n.op_type = op.into();
    n.name = name;
    n.input = inputs;
    n.output = vec![output];
    n
}

/// A weight's per-channel (or single) parameters, by tensor name and axis. The values are
/// read again when the weight is quantized, so one weight at a time is held decoded.
type WeightTable = BTreeMap<(String, Option<usize>), Vec<ScaleZp>>;

/// A quantized bias: node, input slot, tensor name, int32 values, per-channel scales.
struct QuantizedBias {
    node: usize,
    slot: usize,
    tensor: String,
    values: Vec<i32>,
    scales: Vec<f32>,
}

/// The opset the QDQ form of `plan` needs when the model's is lower (10 for QuantizeLinear, 13
/// for per-axis parameters), or an error naming the node when raising it would change what that
/// node computes (see [`crate::graph::upgrade`] for the ops rewritten on the way to 13).
pub fn opset_upgrade(model: &Model, plan: &QuantPlan) -> Result<Option<(i64, i64)>> {
    let per_axis = plan.weights.iter().any(|w| w.axis.is_some());
    let opset = model.opset().unwrap_or(0);
    let needed = if per_axis { 13 } else { 10 };
    if opset >= needed {
        return Ok(None);
    }
    match crate::graph::upgrade::check(model, needed) {
        Err(e) => Err(Error::Usage(format!(
            "the model imports opset {opset}; {} needs opset {needed}: {e}{}",
            if per_axis {
                "per-axis QuantizeLinear"
            } else {
                "QuantizeLinear"
            },
            if per_axis { "; use --per-tensor" } else { "" }
        ))),
        Ok(()) => Ok(Some((opset, needed))),
    }
}

/// Inserts Q/DQ nodes for `plan` using calibrated `ranges` (by value name).
pub fn materialize(
    model: &mut Model,
    plan: &QuantPlan,
    ranges: &BTreeMap<String, (f32, f32)>,
    opts: &QdqOptions,
) -> Result<QdqReport> {
    let mut report = QdqReport::default();
    if let Some((from, to)) = opset_upgrade(model, plan)? {
        let up = crate::graph::upgrade::upgrade(model, to)?;
        report.upgraded = up
            .rewritten
            .iter()
            .map(|r| format!("{} ({}): {}", r.node, r.op_type, r.change))
            .collect();
        report.opset = Some((from, to));
    }

    let g = Graph::of_model(model);
    let mut names = Names::new(g.proto());
    let mut patch = Patch::new("quantize (QDQ)");
    let mut modified: BTreeMap<usize, NodeProto> = BTreeMap::new();
    let index: HashMap<String, usize> = (0..g.nodes().len())
        .map(|i| (label(g.node(i)), i))
        .collect();
    let node_idx = |l: &str| -> Result<usize> {
        index
            .get(l)
            .copied()
            .ok_or_else(|| Error::graph(g.name(), format!("no node '{l}'")))
    };
    fn edit<'m>(
        modified: &'m mut BTreeMap<usize, NodeProto>,
        g: &Graph,
        i: usize,
    ) -> &'m mut NodeProto {
        modified.entry(i).or_insert_with(|| g.node(i).clone())
    }

    // Absorbed activations: the producer writes the activation's output.
    // Each absorbed output with its producer and Clip's upper bound (which caps its range).
    let mut absorbed_outputs: HashMap<String, (usize, Option<f32>)> = HashMap::new();
    for a in &plan.absorbed {
        let act = node_idx(&a.node)?;
        let prod = node_idx(&a.producer)?;
        let out = g.node(act).output[0].clone();
        edit(&mut modified, &g, prod).output[0] = out.clone();
        patch.remove_node(act);
        absorbed_outputs.insert(out, (prod, a.max));
        report.absorbed.push(a.node.clone());
    }

    // Activation parameters.
    let (aq_min, aq_max) = opts.activation_grid();
    let mut act_params: HashMap<String, ScaleZp> = HashMap::new();
    for a in &plan.activation_order {
        let p = match &plan.activations[a] {
            Source::Calibrated(v) => {
                let (mut lo, mut hi) = *ranges
                    .get(v)
                    .ok_or_else(|| Error::Usage(format!("no calibrated range for '{v}'")))?;
                if let Some(&(_, max)) = absorbed_outputs.get(a) {
                    if let Some(m) = max {
                        hi = hi.min(m);
                    }
                    lo = lo.max(0.0);
                }
                // a Softmax output is a probability: [0, 1] whatever was observed (ONNX
                // Runtime's QDQSoftmax fixes it likewise), so no method clips a confident one
                if g.producer(a)
                    .is_some_and(|p| g.node(p).op_type == "Softmax")
                {
                    (lo, hi) = (0.0, 1.0);
                }
                compute_scale_zp(lo, hi, aq_min, aq_max, opts.symmetric_activations)
            }
            Source::Constant => {
                let t = g
                    .constant(a)?
                    .ok_or_else(|| Error::tensor(a, "expected a constant"))?
                    .to_f64();
                let lo = t.iter().copied().fold(f64::INFINITY, f64::min);
                let hi = t.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                compute_scale_zp(
                    lo as f32,
                    hi as f32,
                    aq_min,
                    aq_max,
                    opts.symmetric_activations,
                )
            }
            Source::SharedWith(s) => *act_params.get(s).ok_or_else(|| {
                Error::Usage(format!(
                    "'{a}' shares parameters with '{s}', which has none"
                ))
            })?,
        };
        act_params.insert(a.clone(), p);
        report
            .activation_params
            .insert(a.clone(), (p.scale, p.zero_point));
    }

    // Weight parameters (per tensor and axis), then biases, which may widen them.
    let wgrid = opts.weight_grid();
    let mut weights: WeightTable = BTreeMap::new();
    for w in &plan.weights {
        let key = (w.tensor.clone(), w.axis);
        if weights.contains_key(&key) {
            continue;
        }
        let data = weight_values(
            g.constant(&w.tensor)?
                .ok_or_else(|| Error::tensor(&w.tensor, "weight is not constant"))?,
        );
        if let Some(ax) = w.axis {
            if ax >= data.ndim() {
                return Err(Error::tensor(
                    &w.tensor,
                    format!("axis {ax} out of range for shape {:?}", data.shape()),
                ));
            }
        }
        let p = weight_params(&data, w.axis, wgrid, opts.symmetric_weights);
        weights.insert(key, p);
    }
    let mut bias_q: Vec<QuantizedBias> = Vec::new();
    let mut weight_of: HashMap<(&str, &str), &WeightUse> = HashMap::new();
    for w in &plan.weights {
        weight_of
            .entry((w.node.as_str(), w.tensor.as_str()))
            .or_insert(w);
    }
    for b in &plan.biases {
        let ni = node_idx(&b.node)?;
        let Some(xp) = act_params.get(&b.input).copied() else {
            continue;
        };
        let wuse = weight_of
            .get(&(b.node.as_str(), b.weight.as_str()))
            .copied();
        let Some(wuse) = wuse else { continue };
        let key = (wuse.tensor.clone(), wuse.axis);
        let bias = g
            .constant(&b.tensor)?
            .ok_or_else(|| Error::tensor(&b.tensor, "bias is not constant"))?
            .to_f64();
        let m = bias.len();
        let wp = weights
            .get_mut(&key)
            .expect("weights of every bias are planned");
        let per_ch = wp.len();
        let idx = |o: usize| if per_ch == 1 { 0 } else { o % per_ch };
        for (o, &bv) in bias.iter().enumerate() {
            let k = idx(o);
            if quantize_bias(bv as f32, xp.scale, wp[k].scale).is_err() {
                let widened = min_weight_scale_for_bias(bv as f32, xp.scale);
                report.bias_adjustments.push(format!(
                    "{}: bias '{}' channel {o} = {bv:e} overflows int32 at weight scale {:e}; weight scale widened to {widened:e}",
                    b.node, b.tensor, wp[k].scale
                ));
                wp[k].scale = widened;
            }
        }
        let mut q = Vec::with_capacity(m);
        let mut scales = Vec::with_capacity(m);
        for (o, &bv) in bias.iter().enumerate() {
            let s = xp.scale * wp[idx(o)].scale;
            scales.push(s);
            q.push(
                quantize_bias(bv as f32, xp.scale, wp[idx(o)].scale).map_err(|_| {
                    Error::tensor(
                        &b.tensor,
                        format!("channel {o} still overflows int32 after widening"),
                    )
                })?,
            );
        }
        bias_q.push(QuantizedBias {
            node: ni,
            slot: b.slot,
            tensor: b.tensor.clone(),
            values: q,
            scales,
        });
    }

    // Emit weights.
    let mut weight_outputs: HashMap<(String, Option<usize>), String> = HashMap::new();
    for ((tensor, axis), params) in &weights {
        let data = weight_values(
            g.constant(tensor)?
                .ok_or_else(|| Error::tensor(tensor, "weight is not constant"))?,
        );
        let q = quantize_weight(&data, *axis, params, wgrid);
        let qname = names.fresh(&format!("{tensor}_quantized"));
        let sname = names.fresh(&format!("{tensor}_scale"));
        let zname = names.fresh(&format!("{tensor}_zero_point"));
        let out = names.fresh(&format!("{tensor}_dequantized"));
        let scales: Vec<f32> = params.iter().map(|p| p.scale).collect();
        let zps: Vec<i32> = params.iter().map(|p| p.zero_point).collect();
        patch.add_initializer(int_tensor(q, data.shape(), opts.weight).to_proto(&qname));
        patch.add_initializer(scale_tensor(&scales, axis.is_some()).to_proto(&sname));
        patch.add_initializer(zp_tensor(&zps, opts.weight, axis.is_some()).to_proto(&zname));
        let mut dq = new_node(
            "DequantizeLinear",
            names.fresh(&format!("{tensor}_DequantizeLinear")),
            vec![qname, sname, zname],
            out.clone(),
        );
        if let Some(ax) = axis {
            attr::set(&mut dq, attr::make_int("axis", *ax as i64));
        }
        patch.add_node(dq);
        weight_outputs.insert((tensor.clone(), *axis), out);
        report.weights += 1;
    }
    for w in &plan.weights {
        let ni = node_idx(&w.node)?;
        let out = weight_outputs[&(w.tensor.clone(), w.axis)].clone();
        edit(&mut modified, &g, ni).input[w.slot] = out;
    }
    // Emit biases. Below opset 13 DequantizeLinear has no axis: the weights are then per tensor,
    // so every channel of a bias has the same scale, written as one value.
    let per_axis_biases = model.opset().unwrap_or(0) >= 13;
    for QuantizedBias {
        node: ni,
        slot,
        tensor,
        values: q,
        scales,
    } in bias_q
    {
        let m = q.len();
        let qname = names.fresh(&format!("{tensor}_quantized"));
        let sname = names.fresh(&format!("{tensor}_scale"));
        let zname = names.fresh(&format!("{tensor}_zero_point"));
        let out = names.fresh(&format!("{tensor}_dequantized"));
        patch.add_initializer(
            TensorData::I32(ArrayD::from_shape_vec(IxDyn(&[m]), q).expect("m")).to_proto(&qname),
        );
        let per_axis =
            per_axis_biases || scales.is_empty() || scales.iter().any(|&s| s != scales[0]);
        let zshape: &[usize] = if per_axis { &[m] } else { &[] };
        let scales = if per_axis {
            &scales[..]
        } else {
            &scales[..1.min(scales.len())]
        };
        patch.add_initializer(scale_tensor(scales, per_axis).to_proto(&sname));
        patch.add_initializer(TensorData::I32(ArrayD::zeros(IxDyn(zshape))).to_proto(&zname));
        let mut dq = new_node(
            "DequantizeLinear",
            names.fresh(&format!("{tensor}_DequantizeLinear")),
            vec![qname, sname, zname],
            out.clone(),
        );
        if per_axis {
            attr::set(&mut dq, attr::make_int("axis", 0));
        }
        patch.add_node(dq);
        edit(&mut modified, &g, ni).input[slot] = out;
        report.biases += 1;
    }

    // Emit activations.
    for a in &plan.activation_order {
        let p = act_params[a];
        let sname = names.fresh(&format!("{a}_scale"));
        let zname = names.fresh(&format!("{a}_zero_point"));
        patch.add_initializer(scale_tensor(&[p.scale], false).to_proto(&sname));
        patch.add_initializer(zp_tensor(&[p.zero_point], opts.activation, false).to_proto(&zname));
        let qname = names.fresh(&format!("{a}_quantized"));
        let producer = absorbed_outputs
            .get(a)
            .map(|&(p, _)| p)
            .or_else(|| g.producer(a));
        match (&plan.activations[a], producer) {
            (Source::Constant, _) => {
                let t = g.constant(a)?.expect("checked above").to_f64();
                let q: Vec<i32> = t
                    .iter()
                    .map(|&v| quantize(v as f32, p, aq_min, aq_max))
                    .collect();
                patch.add_initializer(int_tensor(q, t.shape(), opts.activation).to_proto(&qname));
                let out = names.fresh(&format!("{a}_dequantized"));
                patch.add_node(new_node(
                    "DequantizeLinear",
                    names.fresh(&format!("{a}_DequantizeLinear")),
                    vec![qname, sname, zname],
                    out.clone(),
                ));
                rewire_consumers(&g, &mut modified, a, &out);
            }
            (_, Some(prod)) => {
                let pre = names.fresh(&format!("{a}_prequant"));
                let pn = edit(&mut modified, &g, prod);
                for o in pn.output.iter_mut().filter(|o| *o == a) {
                    *o = pre.clone();
                }
                patch.add_node(new_node(
                    "QuantizeLinear",
                    names.fresh(&format!("{a}_QuantizeLinear")),
                    vec![pre, sname.clone(), zname.clone()],
                    qname.clone(),
                ));
                patch.add_node(new_node(
                    "DequantizeLinear",
                    names.fresh(&format!("{a}_DequantizeLinear")),
                    vec![qname, sname, zname],
                    a.clone(),
                ));
            }
            (_, None) => {
                // a graph input
                let out = names.fresh(&format!("{a}_dequantized"));
                patch.add_node(new_node(
                    "QuantizeLinear",
                    names.fresh(&format!("{a}_QuantizeLinear")),
                    vec![a.clone(), sname.clone(), zname.clone()],
                    qname.clone(),
                ));
                patch.add_node(new_node(
                    "DequantizeLinear",
                    names.fresh(&format!("{a}_DequantizeLinear")),
                    vec![qname, sname, zname],
                    out.clone(),
                ));
                rewire_consumers(&g, &mut modified, a, &out);
            }
        }
        report.activations += 1;
    }
    for (i, n) in modified {
        patch.replace_node(i, n);
    }
    drop(g);
    patch.apply(model.graph_mut())?;
    Ok(report)
}

fn rewire_consumers(g: &Graph, modified: &mut BTreeMap<usize, NodeProto>, from: &str, to: &str) {
    for &c in g.consumers(from) {
        let n = modified.entry(c).or_insert_with(|| g.node(c).clone());
        for i in n.input.iter_mut().filter(|i| *i == from) {
            *i = to.to_string();
        }
    }
}
