//! Per-tensor sensitivity: which quantized tensor costs the model its accuracy.
//!
//! The model is prepared and calibrated once ([`super::prepare`],
//! [`super::calibrate_prepared`]); every measurement is then a variant of the same QDQ model
//! with some Q/DQ pairs left out ([`subset_plan`], materialized by [`super::emit`]): nothing
//! is recalibrated, so a tensor keeps the exact parameters it has in the full model. For every
//! quantized tensor (an activation with the data-movement outputs that share its parameters,
//! a constant activation, or a weight), on a few evaluation samples:
//!
//! - its own SQNR: the float tensor against itself quantized and dequantized with its
//!   parameters, `10 log10(sum x^2 / sum (x - q(x))^2)`;
//! - the model's output SQNR when only this tensor is quantized, and when only this tensor is
//!   left float (every other quantized); the worst output counts;
//! - its observed range and the range the method chose, the fraction of its values the chosen
//!   range clips, and for weights the spread of the per-channel ranges (largest over smallest
//!   non-zero largest magnitude per output channel).
//!
//! The table is sorted by sensitivity: lowest "only this quantized" SQNR first. This is what
//! ONNX Runtime's `qdq_loss_debug` and AIMET's `QuantAnalyzer` show, measured in tract.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use ndarray::{ArrayD, Axis};
use serde::Serialize;

use super::bias_correction::fake_quantize_weight;
use super::calibrate::Ranges;
use super::params::{compute_scale_zp, dequantize, quantize, ScaleZp};
use super::plan::{QuantPlan, Source};
use super::{emit, Prepared, QuantizeOptions};
use crate::error::{Error, Result};
use crate::fusion::rules::label;
use crate::graph::Graph;
use crate::onnx::attr::{self, defaults};
use crate::onnx::{Model, TensorData};
use crate::runtime::Runner;
use crate::verify::{self, Case, Comparer, Criterion, SampleSource};

/// Evaluation samples the variants run on by default.
pub const DEFAULT_SAMPLES: usize = 8;

/// What a quantized tensor is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TensorKind {
    Activation,
    Constant,
    Weight,
}

impl TensorKind {
    pub fn name(self) -> &'static str {
        match self {
            TensorKind::Activation => "activation",
            TensorKind::Constant => "constant",
            TensorKind::Weight => "weight",
        }
    }
}

/// A unit of the analysis: one tensor (and, for an activation, the values sharing its
/// parameters), quantized or left float as a whole.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Unit {
    /// An activation group, by the name of the activation whose parameters it shares.
    Activation(String),
    /// A weight, by tensor name.
    Weight(String),
}

/// The model's figures on the evaluation samples.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Score {
    /// SQNR of the worst output against the float model, dB (`None`: identical).
    pub sqnr_db: Option<f64>,
    /// Top-1 accuracy when the samples carry labels.
    pub accuracy: Option<f64>,
}

impl Score {
    /// The SQNR with identical outputs as infinity.
    pub fn db(&self) -> f64 {
        self.sqnr_db.unwrap_or(f64::INFINITY)
    }

    /// The score of a comparison: its worst output's SQNR (a NaN, from non-finite outputs,
    /// is the worst of all), and `accuracy`.
    pub fn worst_of(outputs: &[crate::verify::OutputMetrics], accuracy: Option<f64>) -> Score {
        let worst = outputs
            .iter()
            .map(|o| match o.sqnr_db {
                None => f64::INFINITY,
                Some(d) if d.is_nan() => f64::NEG_INFINITY,
                Some(d) => d,
            })
            .fold(f64::INFINITY, f64::min);
        Score {
            sqnr_db: (worst != f64::INFINITY).then_some(worst),
            accuracy,
        }
    }
}

/// One row of the table.
#[derive(Debug, Clone, Serialize)]
pub struct TensorAnalysis {
    pub tensor: String,
    pub kind: TensorKind,
    /// The node producing the activation (or "input"), or the nodes reading the weight.
    pub nodes: Vec<String>,
    /// Values sharing this activation's parameters (data-movement outputs).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub shared_with: Vec<String>,
    /// The tensor's own SQNR against float (`None`: exact).
    pub sqnr_db: Option<f64>,
    /// The model's output SQNR with only this tensor quantized.
    pub only_quantized: Score,
    /// The model's output SQNR with only this tensor left float.
    pub only_float: Score,
    /// The observed minimum and maximum.
    pub min: f64,
    pub max: f64,
    /// The range quantized over (the method's choice for activations).
    pub range_min: f64,
    pub range_max: f64,
    /// Fraction of the values outside the quantized range (clipped).
    pub clipped: f64,
    /// Weights: the largest per-channel range over the smallest non-zero one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub channel_range_spread: Option<f64>,
    /// Weights: channels whose weights are all zero.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zero_channels: Option<usize>,
    /// Scale (for per-channel weights, the largest).
    pub scale: f32,
}

/// The analysis of a model.
#[derive(Debug, Clone, Serialize)]
pub struct LayerAnalysis {
    /// Evaluation samples (runs of the model) each variant ran on.
    pub samples: usize,
    pub source: String,
    /// Every tensor quantized, against float.
    pub quantized: Score,
    /// The float model's accuracy on the samples, when labelled.
    pub float_accuracy: Option<f64>,
    /// Sorted: most sensitive (lowest "only quantized" SQNR) first.
    pub tensors: Vec<TensorAnalysis>,
}

/// Runs models on a few samples held in memory and scores them against the float model's
/// outputs, computed once.
pub struct Evaluator {
    cases: Vec<Case>,
    reference: Vec<Vec<TensorData>>,
    names: Vec<String>,
    float_accuracy: Option<f64>,
    threads: usize,
}

/// Reads up to `n` samples of `source` into memory (all of them for `n == 0`).
pub fn take_samples<S: SampleSource + ?Sized>(source: &S, n: usize) -> Result<Vec<Case>> {
    let n = if n == 0 {
        source.len()
    } else {
        n.min(source.len())
    };
    (0..n)
        .map(|k| source.read(k).map(Cow::into_owned))
        .collect()
}

fn shapes(c: &Case) -> Vec<Vec<usize>> {
    c.inputs.iter().map(|(_, t)| t.shape().to_vec()).collect()
}

/// Runs `model` on every case (a new runner when the shapes change).
fn run_all(model: &Model, cases: &[Case]) -> Result<Vec<Vec<TensorData>>> {
    let mut runner: Option<(Runner, Vec<Vec<usize>>)> = None;
    let mut out = Vec::with_capacity(cases.len());
    for c in cases {
        let s = shapes(c);
        if runner.as_ref().is_none_or(|(_, sh)| *sh != s) {
            runner = Some((Runner::new(model, &c.inputs, &[])?, s));
        }
        out.push(runner.as_ref().expect("set above").0.run(&c.inputs)?);
    }
    Ok(out)
}

fn accuracy_of(outputs: &[Vec<TensorData>], cases: &[Case]) -> Option<f64> {
    let (mut right, mut total) = (0, 0);
    for (o, c) in outputs.iter().zip(cases) {
        if let Some(l) = &c.labels {
            let (a, n) = verify::accuracy(o, l);
            right += a;
            total += n;
        }
    }
    (total > 0).then(|| right as f64 / total as f64)
}

impl Evaluator {
    /// Runs `float` on `cases` once; `threads` (0: every core) run variants in parallel.
    pub fn new(float: &Model, cases: Vec<Case>, threads: usize) -> Result<Evaluator> {
        if cases.is_empty() {
            return Err(Error::Usage("no evaluation samples".into()));
        }
        let names = float
            .graph()
            .output
            .iter()
            .map(|o| o.name.clone())
            .collect();
        let reference = run_all(float, &cases)?;
        let float_accuracy = accuracy_of(&reference, &cases);
        let threads = if threads == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            threads
        };
        Ok(Evaluator {
            cases,
            reference,
            names,
            float_accuracy,
            threads,
        })
    }

    pub fn cases(&self) -> &[Case] {
        &self.cases
    }

    pub fn float_accuracy(&self) -> Option<f64> {
        self.float_accuracy
    }

    /// `model`'s score against the float model.
    pub fn score(&self, model: &Model) -> Result<Score> {
        let out = run_all(model, &self.cases)?;
        let mut cmp = Comparer::new(&self.names, Criterion::MinSqnr { db: 0.0 });
        for (r, o) in self.reference.iter().zip(&out) {
            cmp.add(r, o);
        }
        let c = cmp.finish();
        if let Some(m) = c.outputs.iter().find_map(|o| o.mismatch.clone()) {
            return Err(Error::runtime("scoring a quantized variant", m));
        }
        Ok(Score::worst_of(&c.outputs, accuracy_of(&out, &self.cases)))
    }

    /// Scores `count` models built by `build(k)`, in parallel; `what` names the phase.
    pub fn score_many<F>(&self, what: &str, count: usize, build: F) -> Result<Vec<Score>>
    where
        F: Fn(usize) -> Result<Model> + Sync,
    {
        let next = AtomicUsize::new(0);
        let results: Mutex<Vec<Option<Result<Score>>>> =
            Mutex::new((0..count).map(|_| None).collect());
        let progress = Mutex::new(crate::progress::counted(what.to_string(), count));
        let worker = || loop {
            let k = next.fetch_add(1, Ordering::SeqCst);
            if k >= count {
                return;
            }
            let r = build(k).and_then(|m| self.score(&m));
            let failed = r.is_err();
            results.lock().expect("results lock")[k] = Some(r);
            progress.lock().expect("progress lock").inc();
            if failed {
                next.store(count, Ordering::SeqCst);
            }
        };
        let threads = self.threads.min(count).max(1);
        if threads == 1 {
            worker();
        } else {
            std::thread::scope(|s| {
                for _ in 0..threads {
                    s.spawn(worker);
                }
            });
        }
        drop(progress);
        results
            .into_inner()
            .expect("results lock")
            .into_iter()
            .enumerate()
            .map(|(k, r)| {
                r.unwrap_or_else(|| {
                    Err(Error::runtime(
                        what,
                        format!("variant {k} was not scored (another failed first)"),
                    ))
                })
            })
            .collect()
    }
}

/// The activation whose parameters `a` uses (itself unless it shares another's).
fn root<'p>(plan: &'p QuantPlan, a: &'p str) -> &'p str {
    let mut at = a;
    for _ in 0..plan.activations.len() + 1 {
        match plan.activations.get(at) {
            Some(Source::SharedWith(s)) => at = s,
            _ => return at,
        }
    }
    at
}

/// Every unit of `plan`, activations first in graph order, then weights.
pub fn units(plan: &QuantPlan) -> Vec<Unit> {
    let mut out = Vec::new();
    let mut seen = BTreeSet::new();
    for a in &plan.activation_order {
        let r = root(plan, a).to_string();
        if seen.insert(Unit::Activation(r.clone())) {
            out.push(Unit::Activation(r));
        }
    }
    for w in &plan.weights {
        if seen.insert(Unit::Weight(w.tensor.clone())) {
            out.push(Unit::Weight(w.tensor.clone()));
        }
    }
    out
}

/// `plan` restricted to the units for which `keep` is true: activations outside it get no
/// Q/DQ pair (an absorbed Relu or Clip whose output is left float stays in the graph), weights
/// outside it stay float, and so do the biases of layers whose input or weight is float.
pub fn subset_plan(g: &Graph, plan: &QuantPlan, keep: &dyn Fn(&Unit) -> bool) -> QuantPlan {
    let mut out = plan.clone();
    let kept: BTreeSet<String> = plan
        .activation_order
        .iter()
        .filter(|a| keep(&Unit::Activation(root(plan, a).to_string())))
        .cloned()
        .collect();
    out.activation_order.retain(|a| kept.contains(a));
    out.activations.retain(|a, _| kept.contains(a));
    out.weights
        .retain(|w| keep(&Unit::Weight(w.tensor.clone())));
    let by_label: HashMap<String, usize> = (0..g.len()).map(|i| (label(g.node(i)), i)).collect();
    out.absorbed.retain(|a| {
        by_label
            .get(&a.node)
            .and_then(|&i| g.node(i).output.first())
            .is_some_and(|o| kept.contains(o))
    });
    let weights: BTreeSet<(&str, &str)> = out
        .weights
        .iter()
        .map(|w| (w.node.as_str(), w.tensor.as_str()))
        .collect();
    let biases: Vec<_> = plan
        .biases
        .iter()
        .filter(|b| {
            kept.contains(&b.input) && weights.contains(&(b.node.as_str(), b.weight.as_str()))
        })
        .cloned()
        .collect();
    out.biases = biases;
    out
}

/// Running statistics of a tensor against its quantized self.
#[derive(Debug, Clone, Default)]
struct Own {
    signal: f64,
    noise: f64,
    clipped: u64,
    count: u64,
    min: f64,
    max: f64,
}

impl Own {
    fn empty() -> Own {
        Own {
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
            ..Own::default()
        }
    }

    fn add(&mut self, values: impl Iterator<Item = f64>, p: ScaleZp, grid: (i32, i32)) {
        let lo = dequantize(grid.0, p) as f64;
        let hi = dequantize(grid.1, p) as f64;
        for x in values.filter(|v| v.is_finite()) {
            let q = dequantize(quantize(x as f32, p, grid.0, grid.1), p) as f64;
            self.signal += x * x;
            self.noise += (x - q) * (x - q);
            // a value beyond half a step past either end is clipped
            let half = p.scale as f64 / 2.0;
            if x < lo - half || x > hi + half {
                self.clipped += 1;
            }
            self.count += 1;
            self.min = self.min.min(x);
            self.max = self.max.max(x);
        }
    }

    fn sqnr(&self) -> Option<f64> {
        if self.noise == 0.0 {
            None
        } else {
            Some(10.0 * (self.signal / self.noise).log10())
        }
    }
}

/// The per-channel axis of a weight read by node `n` at `slot` (Conv 0, ConvTranspose 1, Gemm
/// `0 if transB else 1`, MatMul 1).
fn natural_axis(n: &crate::onnx::proto::NodeProto) -> Result<usize> {
    Ok(match n.op_type.as_str() {
        "Conv" => 0,
        "ConvTranspose" => 1,
        "Gemm" => usize::from(attr::int(n, "transB", defaults::GEMM_TRANS)? == 0),
        _ => 1,
    })
}

/// The largest per-channel range over the smallest non-zero one, and the all-zero channels.
pub fn channel_spread(w: &ArrayD<f64>, axis: usize) -> (Option<f64>, usize) {
    if axis >= w.ndim() {
        return (None, 0);
    }
    let r: Vec<f64> = w
        .axis_iter(Axis(axis))
        .map(|c| c.iter().fold(0.0f64, |m, v| m.max(v.abs())))
        .collect();
    let zero = r.iter().filter(|&&v| v == 0.0).count();
    let max = r.iter().copied().fold(0.0, f64::max);
    let min = r
        .iter()
        .copied()
        .filter(|&v| v > 0.0)
        .fold(f64::INFINITY, f64::min);
    ((max > 0.0 && min.is_finite()).then(|| max / min), zero)
}

/// Analyzes `prepared` quantized with `ranges` on `eval` (see the module docs).
pub fn analyze(
    prepared: &Prepared,
    ranges: &Ranges,
    opts: &QuantizeOptions,
    eval: &Evaluator,
    source: String,
) -> Result<LayerAnalysis> {
    let plan = &prepared.plan;
    let float = &prepared.float;
    let g = Graph::of_model(float);
    let (full, qdq) = emit(prepared, plan, ranges, opts)?;
    let quantized = eval.score(&full)?;
    drop(full);
    let units = units(plan);

    // Own figures of activations: the float model with every activation group's value exposed.
    let act_grid = opts.qdq_options().activation_grid();
    let mut own: BTreeMap<String, Own> = BTreeMap::new();
    let exposed: Vec<String> = units
        .iter()
        .filter_map(|u| match u {
            Unit::Activation(a)
                if matches!(plan.activations.get(a), Some(Source::Calibrated(_)))
                    && !g.is_input(a) =>
            {
                Some(a.clone())
            }
            _ => None,
        })
        .collect();
    let inputs: Vec<String> = units
        .iter()
        .filter_map(|u| match u {
            Unit::Activation(a) if g.is_input(a) => Some(a.clone()),
            _ => None,
        })
        .collect();
    {
        let _p = crate::progress::phase("measuring each activation against its quantized self");
        let mut runner: Option<(Runner, Vec<Vec<usize>>)> = None;
        for c in eval.cases() {
            let s = shapes(c);
            if runner.as_ref().is_none_or(|(_, sh)| *sh != s) {
                runner = Some((Runner::new(float, &c.inputs, &exposed)?, s));
            }
            let out = runner.as_ref().expect("set above").0.run(&c.inputs)?;
            let skip = out.len() - exposed.len();
            let values = exposed.iter().zip(&out[skip..]).chain(
                inputs
                    .iter()
                    .filter_map(|i| c.inputs.iter().find(|(n, _)| n == i).map(|(_, t)| (i, t))),
            );
            for (a, t) in values {
                let Some(&(scale, zero_point)) = qdq.activation_params.get(a) else {
                    continue;
                };
                own.entry(a.clone()).or_insert_with(Own::empty).add(
                    t.to_f64().iter().copied(),
                    ScaleZp { scale, zero_point },
                    act_grid,
                );
            }
        }
    }

    // Variants: only this unit quantized, then only this unit float.
    let n = units.len();
    let scores = eval.score_many(
        &format!(
            "running {} variants, each on {} samples",
            2 * n,
            eval.cases().len()
        ),
        2 * n,
        |k| {
            let unit = &units[k % n];
            let only = k < n;
            let keep = |u: &Unit| (u == unit) == only;
            let sub = subset_plan(&Graph::of_model(float), plan, &keep);
            Ok(emit(prepared, &sub, ranges, opts)?.0)
        },
    )?;

    let wgrid = opts.qdq_options().weight_grid();
    let mut rows = Vec::with_capacity(n);
    for (k, u) in units.iter().enumerate() {
        let (only_quantized, only_float) = (scores[k], scores[n + k]);
        let row = match u {
            Unit::Activation(a) => {
                let shared_with: Vec<String> = plan
                    .activation_order
                    .iter()
                    .filter(|b| *b != a && root(plan, b) == a)
                    .cloned()
                    .collect();
                let nodes = vec![match g.producer(a) {
                    Some(p) => label(g.node(p)),
                    None => "input".into(),
                }];
                let (scale, zp) = qdq.activation_params.get(a).copied().unwrap_or((1.0, 0));
                let p = ScaleZp {
                    scale,
                    zero_point: zp,
                };
                let (kind, o) = match plan.activations.get(a) {
                    Some(Source::Constant) => {
                        let t = g
                            .constant(a)?
                            .ok_or_else(|| Error::tensor(a, "expected a constant"))?;
                        let mut o = Own::empty();
                        o.add(t.to_f64().iter().copied(), p, act_grid);
                        (TensorKind::Constant, o)
                    }
                    _ => (
                        TensorKind::Activation,
                        own.get(a).cloned().unwrap_or_else(Own::empty),
                    ),
                };
                let calib = match plan.activations.get(a) {
                    Some(Source::Calibrated(v)) => Some(v),
                    _ => None,
                };
                let (min, max) = calib
                    .and_then(|v| ranges.observed.get(v))
                    .map(|&(l, h)| (l as f64, h as f64))
                    .unwrap_or((o.min, o.max));
                TensorAnalysis {
                    tensor: a.clone(),
                    kind,
                    nodes,
                    shared_with,
                    sqnr_db: o.sqnr(),
                    only_quantized,
                    only_float,
                    min,
                    max,
                    range_min: dequantize(act_grid.0, p) as f64,
                    range_max: dequantize(act_grid.1, p) as f64,
                    clipped: if o.count == 0 {
                        0.0
                    } else {
                        o.clipped as f64 / o.count as f64
                    },
                    channel_range_spread: None,
                    zero_channels: None,
                    scale,
                }
            }
            Unit::Weight(w) => {
                let uses: Vec<_> = plan.weights.iter().filter(|x| x.tensor == *w).collect();
                let nodes: Vec<String> = uses.iter().map(|x| x.node.clone()).collect();
                let data = g
                    .constant(w)?
                    .ok_or_else(|| Error::tensor(w, "weight is not constant"))?
                    .to_f64();
                let axis = uses[0].axis;
                let q = fake_quantize_weight(&data, axis, wgrid, opts.symmetric_weights);
                let (signal, noise) = data
                    .iter()
                    .zip(q.iter())
                    .fold((0.0, 0.0), |(s, e), (&x, &y)| {
                        (s + x * x, e + (x - y) * (x - y))
                    });
                let node = g
                    .node_by_name(&uses[0].node)
                    .map(|i| g.node(i))
                    .or_else(|| {
                        (0..g.len())
                            .map(|i| g.node(i))
                            .find(|n| label(n) == uses[0].node)
                    });
                let nat = match node {
                    Some(n) => natural_axis(n)?,
                    None => 0,
                };
                let (spread, zero) = channel_spread(&data, axis.unwrap_or(nat));
                let min = data.iter().copied().fold(f64::INFINITY, f64::min);
                let max = data.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                // per tensor, the tensor's scale; per channel, the largest channel's
                let scale = compute_scale_zp(
                    min as f32,
                    max as f32,
                    wgrid.0,
                    wgrid.1,
                    opts.symmetric_weights,
                )
                .scale;
                TensorAnalysis {
                    tensor: w.clone(),
                    kind: TensorKind::Weight,
                    nodes,
                    shared_with: vec![],
                    sqnr_db: (noise > 0.0).then(|| 10.0 * (signal / noise).log10()),
                    only_quantized,
                    only_float,
                    min,
                    max,
                    range_min: min.min(0.0),
                    range_max: max.max(0.0),
                    clipped: 0.0,
                    channel_range_spread: spread,
                    zero_channels: Some(zero),
                    scale,
                }
            }
        };
        rows.push(row);
    }
    rows.sort_by(|a, b| {
        a.only_quantized
            .db()
            .total_cmp(&b.only_quantized.db())
            .then(b.only_float.db().total_cmp(&a.only_float.db()))
    });
    Ok(LayerAnalysis {
        samples: eval.cases().len(),
        source,
        quantized,
        float_accuracy: eval.float_accuracy(),
        tensors: rows,
    })
}
