//! Static quantization: mark, then materialize.
//!
//! fuse -> choose quantization points ([`plan`]) -> calibrate on tract ([`calibrate`], streaming
//! every batch into [`observe`] observers) -> compute parameters ([`params`]) -> emit QDQ
//! ([`qdq`]) -> check on tract.

pub mod absorb;
pub mod analyze;
pub mod bias_correction;
pub mod calibrate;
pub mod decompose;
pub mod equalize;
pub mod observe;
pub mod params;
pub mod plan;
pub mod qdq;
pub mod qoperator;
pub mod segments;
pub mod target;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::fusion::{fuse, FuseOptions, FuseReport};
use crate::graph::Graph;
use crate::onnx::Model;
use crate::runtime::Sample;
use calibrate::Ranges;
use observe::{Method, Target};
use params::QType;
use plan::{PlanOptions, QuantPlan};
use qdq::{QdqOptions, QdqReport};

/// Named settings: ONNX Runtime's and PyTorch's defaults, and targets' needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Preset {
    /// qfold's default: uint8 asymmetric activations (MinMax), int8 symmetric per-channel
    /// weights, int32 bias.
    Qfold,
    /// ONNX Runtime `quantize_static` defaults: as qfold but per-tensor weights.
    Ort,
    /// PyTorch x86/fbgemm qconfig: histogram (L2) activations with reduce_range, per-channel
    /// symmetric int8 weights.
    Fbgemm,
    /// PyTorch qnnpack qconfig: histogram (L2) activations, per-tensor symmetric int8 weights.
    Qnnpack,
    /// TensorRT: symmetric int8 activations with zero point 0 (entropy), Relu kept, per-channel
    /// weights, float bias.
    Tensorrt,
    /// tract: per-tensor weights (its integer kernels are fastest with them), MinMax, with
    /// cross-layer equalization so that per-tensor weights lose little, kept where it
    /// measures better on the calibration samples.
    Tract,
}

impl std::fmt::Display for Preset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl Preset {
    /// The CLI's spelling (`--preset`).
    pub fn name(self) -> &'static str {
        match self {
            Preset::Qfold => "qfold",
            Preset::Ort => "ort",
            Preset::Fbgemm => "fbgemm",
            Preset::Qnnpack => "qnnpack",
            Preset::Tensorrt => "tensorrt",
            Preset::Tract => "tract",
        }
    }

    /// Parses a preset name, case-insensitively (`x86` is fbgemm).
    pub fn by_name(s: &str) -> Option<Preset> {
        Some(match s.to_ascii_lowercase().as_str() {
            "qfold" | "default" => Preset::Qfold,
            "ort" => Preset::Ort,
            "fbgemm" | "x86" => Preset::Fbgemm,
            "qnnpack" => Preset::Qnnpack,
            "tensorrt" => Preset::Tensorrt,
            "tract" => Preset::Tract,
            _ => return None,
        })
    }

    /// The options this preset stands for.
    pub fn options(self) -> QuantizeOptions {
        let mut o = QuantizeOptions {
            preset: self,
            activation: QType::U8,
            weight: QType::I8,
            symmetric_activations: false,
            symmetric_weights: true,
            per_channel: true,
            reduce_range: false,
            int32_bias: true,
            method: Method::MinMax,
            fuse: true,
            no_constant_folding: false,
            inputs_as_constants: false,
            no_affine_folding: false,
            no_scalar_affine_folding: false,
            affine_folding_measured: true,
            per_tensor_min_sqnr: None,
            exclude: vec![],
            prepared_exclude: vec![],
            exclude_op_types: vec![],
            threads: 0,
            equalize: false,
            equalize_measured: false,
            equalize_bias_correction: true,
            high_bias_absorption: false,
            bias_correction: false,
            output_bias_correction: false,
            quantize_softmax: matches!(self, Preset::Qfold | Preset::Ort),
        };
        match self {
            Preset::Qfold => {}
            Preset::Ort => o.per_channel = false,
            Preset::Fbgemm => {
                o.method = Method::L2;
                o.reduce_range = true;
            }
            Preset::Qnnpack => {
                o.method = Method::L2;
                o.per_channel = false;
            }
            Preset::Tensorrt => {
                o.activation = QType::I8;
                o.symmetric_activations = true;
                o.int32_bias = false;
                o.method = Method::Entropy;
            }
            Preset::Tract => {
                o.per_channel = false;
                o.equalize = true;
                o.equalize_measured = true;
            }
        }
        o
    }
}

/// Everything `quantize` needs to know.
#[derive(Debug, Clone, Serialize)]
pub struct QuantizeOptions {
    pub preset: Preset,
    pub activation: QType,
    pub weight: QType,
    pub symmetric_activations: bool,
    pub symmetric_weights: bool,
    pub per_channel: bool,
    pub reduce_range: bool,
    pub int32_bias: bool,
    pub method: Method,
    /// Run automatic fusion first.
    pub fuse: bool,
    /// Keep constant subgraphs, Identity and Dropout nodes (by default fusion folds them first).
    pub no_constant_folding: bool,
    /// Initializers that are also graph inputs (overridable defaults, IR >= 4) become
    /// constants, so they fold and quantize as weights.
    pub inputs_as_constants: bool,
    /// Fuse without the channel-affine folds (Add / Sub / Mul / Div after a Conv, ConvTranspose,
    /// Gemm or MatMul stay separate, quantized ops).
    pub no_affine_folding: bool,
    /// Fold only the per-channel constants, not single values (learnable affine blocks).
    pub no_scalar_affine_folding: bool,
    /// Without `no_affine_folding`: `quantize_file` quantizes with and without the
    /// single-value channel-affine folds where fusion makes any, and keeps the one that
    /// measures better on the calibration samples ([`choose_affine_folding`]);
    /// `--affine-folding` / `--no-affine-folding` decide without measuring.
    pub affine_folding_measured: bool,
    /// With per-channel weights: weights that quantize per tensor with at least this SQNR
    /// (dB) stay per tensor (the tract preset: its per-tensor integer kernels are faster).
    pub per_tensor_min_sqnr: Option<f64>,
    /// Node names or module paths left float. A HardSwish named here stays whole.
    pub exclude: Vec<String>,
    /// Nodes of the prepared model (fused, equalized, HardSwish decomposed) left float: the
    /// exclusions a target search found, which may name nodes the decomposition creates
    /// (`HardSwish.14/HardSigmoid`), so unlike `exclude` they keep no HardSwish whole.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub prepared_exclude: Vec<String>,
    /// Op types left float.
    pub exclude_op_types: Vec<String>,
    /// Calibration threads (0: every core).
    pub threads: usize,
    /// Cross-layer equalization before planning ([`equalize`]).
    pub equalize: bool,
    /// With `equalize`: `quantize_file` keeps it only where it measures better on the
    /// calibration samples ([`equalize::choose`]; the tract preset).
    pub equalize_measured: bool,
    /// With `equalize`: also correct biases on the calibration samples ([`bias_correction`]),
    /// as the equalization paper's data-free pipeline does (its bias correction, here
    /// empirical); skipped when the ranges come from a file (`--no-bias-correction` turns it
    /// off). Per-tensor weights need it to come within 1 dB of per-channel on resnet18.
    pub equalize_bias_correction: bool,
    /// Lower the bias before each Relu / ReLU6 by the smallest value its channel takes on the
    /// calibration samples, and raise the next layer's bias to match ([`absorb`]; the
    /// equalization paper's high-bias absorption).
    pub high_bias_absorption: bool,
    /// Correct each quantized layer's bias for the mean shift its weight quantization causes
    /// ([`bias_correction`]).
    pub bias_correction: bool,
    /// Correct each quantized layer's bias for the mean error of its output in the quantized
    /// model, upstream rounding included ([`bias_correction::correct_outputs`]).
    pub output_bias_correction: bool,
    /// Quantize Softmax, as ONNX Runtime's QDQ quantizer does (the qfold and ort presets);
    /// the others keep it float, as their runtimes do ([`plan`]).
    pub quantize_softmax: bool,
}

impl Default for QuantizeOptions {
    fn default() -> Self {
        Preset::Qfold.options()
    }
}

impl QuantizeOptions {
    /// Whether biases are corrected: asked for, or with equalization.
    pub fn corrects_biases(&self) -> bool {
        self.bias_correction || (self.equalize && self.equalize_bias_correction)
    }

    pub fn plan_options(&self) -> PlanOptions {
        PlanOptions {
            activation: self.activation,
            symmetric_activations: self.symmetric_activations,
            per_channel: self.per_channel,
            int32_bias: self.int32_bias,
            exclude: self
                .exclude
                .iter()
                .chain(&self.prepared_exclude)
                .cloned()
                .collect(),
            exclude_op_types: self.exclude_op_types.clone(),
            per_tensor_min_sqnr: self.per_tensor_min_sqnr,
            quantize_softmax: self.quantize_softmax,
        }
    }

    pub fn qdq_options(&self) -> QdqOptions {
        QdqOptions {
            activation: self.activation,
            weight: self.weight,
            symmetric_activations: self.symmetric_activations,
            symmetric_weights: self.symmetric_weights,
            reduce_range: self.reduce_range,
        }
    }

    /// The activation grid calibration aims at.
    pub fn target(&self) -> Target {
        let (qmin, qmax) = self.qdq_options().activation_grid();
        Target {
            qmin,
            qmax,
            symmetric: self.symmetric_activations,
        }
    }
}

/// What `quantize` did.
#[derive(Debug, Clone, Serialize)]
pub struct QuantizeReport {
    pub options: QuantizeOptions,
    pub fusion: Option<FuseReport>,
    /// Cross-layer equalization (`--equalize`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub equalization: Option<equalize::EqualizeReport>,
    /// High-bias absorption (`--high-bias-absorption`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub high_bias_absorption: Option<absorb::AbsorbReport>,
    /// Bias correction (`--bias-correction`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bias_correction: Option<bias_correction::BiasCorrectionReport>,
    /// Output bias correction (`--output-bias-correction`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output_bias_correction: Option<bias_correction::BiasCorrectionReport>,
    pub plan: QuantPlan,
    pub qdq: QdqReport,
    pub calibration_samples: usize,
    pub ranges_from_file: bool,
    /// HardSwish nodes quantized as `x * HardSigmoid(x)` ([`decompose`]).
    pub decomposed: Vec<String>,
    /// MatMul nodes that, with the bias Add after them, became one Gemm
    /// ([`decompose::matmul_add_gemm`]).
    pub gemm_from_matmul: Vec<String>,
}

/// Where activation ranges come from.
pub enum Calibration<'a> {
    /// Run these samples through the float model.
    Samples(&'a [Sample]),
    /// Run these samples through the float model, read one at a time as calibration needs
    /// them (a data set on disk, see [`crate::verify::open_data`]).
    Source(&'a dyn crate::verify::SampleSource),
    /// Ranges saved by an earlier run.
    Ranges(&'a Ranges),
    /// Ranges chosen by the caller (the target mode), used as they are; the samples serve
    /// bias correction.
    Chosen {
        ranges: &'a Ranges,
        samples: &'a dyn crate::verify::SampleSource,
    },
}

/// Refuses models `quantize` cannot handle, before any work: already quantized ones (their
/// QDQ form goes through `qoperator::convert`), and inputs of floating-point types other than
/// float32 (QuantizeLinear takes float32 below opset 19).
fn check_quantizable(model: &Model) -> Result<()> {
    let g = model.graph();
    if let Some(n) = g.node.iter().find(|n| {
        matches!(
            n.op_type.as_str(),
            "QuantizeLinear"
                | "DequantizeLinear"
                | "QLinearConv"
                | "QLinearMatMul"
                | "ConvInteger"
                | "MatMulInteger"
        )
    }) {
        return Err(Error::Usage(format!(
            "the model is already quantized (node '{}' is a {}): convert a QDQ model with `qfold convert`",
            n.name, n.op_type
        )));
    }
    let graph = crate::graph::Graph::of_model(model);
    let other_float = graph
        .real_inputs()
        .into_iter()
        .filter_map(|v| match v.type_.as_ref().and_then(|t| t.value.as_ref()) {
            Some(crate::onnx::proto::type_proto::Value::TensorType(t)) => {
                crate::onnx::ElemType::from_onnx(t.elem_type).map(|e| (v.name.clone(), e))
            }
            _ => None,
        })
        .find(|(_, e)| e.is_float() && *e != crate::onnx::ElemType::F32);
    if let Some((name, e)) = other_float {
        return Err(Error::Usage(format!(
            "'{name}' is {}: qfold quantizes float32 models (QuantizeLinear takes float32 before opset 19); cast the model to float32 first",
            e.name()
        )));
    }
    Ok(())
}

/// The float model as quantization sees it (fused unless disabled, equalized when asked, its
/// opset raised to what the QDQ form needs) and its plan: everything before calibration.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub float: Model,
    pub plan: QuantPlan,
    pub fusion: Option<FuseReport>,
    pub equalization: Option<equalize::EqualizeReport>,
    /// High-bias absorption, once done ([`absorb_prepared`]).
    pub absorption: Option<absorb::AbsorbReport>,
    /// The opset raised (from, to) and the nodes rewritten on the way.
    pub upgraded: Option<(i64, i64, Vec<String>)>,
    /// HardSwish nodes rewritten as `x * HardSigmoid(x)` ([`decompose`]).
    pub decomposed: Vec<String>,
    /// MatMul + bias Add pairs rewritten as one Gemm (their MatMul labels).
    pub gemm_from_matmul: Vec<String>,
}

/// Fuses (unless disabled), equalizes (when asked), plans and raises the opset: the steps of
/// [`quantize`] before calibration. `model` is not changed (it is copied: [`prepare_owned`]
/// works on the model itself).
pub fn prepare(model: &Model, opts: &QuantizeOptions) -> Result<Prepared> {
    check_prepare(model, opts)?;
    prepare_checked(model.clone(), opts)
}

/// [`prepare`] working on `model` itself: no copy of it is made.
pub fn prepare_owned(model: Model, opts: &QuantizeOptions) -> Result<Prepared> {
    check_prepare(&model, opts)?;
    prepare_checked(model, opts)
}

fn check_prepare(model: &Model, opts: &QuantizeOptions) -> Result<()> {
    check_quantizable(model)?;
    plan::check_op_types(&Graph::of_model(model), &opts.exclude_op_types)
}

fn prepare_checked(mut float: Model, opts: &QuantizeOptions) -> Result<Prepared> {
    if opts.inputs_as_constants && !opts.fuse {
        crate::graph::constants::inputs_as_constants(&mut float);
    }
    let fusion = if opts.fuse {
        let _p = crate::progress::phase("fusing");
        Some(fuse(
            &mut float,
            &FuseOptions {
                no_constant_folding: opts.no_constant_folding,
                inputs_as_constants: opts.inputs_as_constants,
                no_affine_folding: opts.no_affine_folding,
                no_scalar_affine_folding: opts.no_scalar_affine_folding,
                ..FuseOptions::default()
            },
        )?)
    } else {
        None
    };
    let equalization = if opts.equalize {
        let _p = crate::progress::phase("equalizing weight ranges across layers");
        Some(equalize::equalize(
            &mut float,
            &equalize::EqualizeOptions::default(),
        )?)
    } else {
        None
    };
    // HardSwish quantized as x * HardSigmoid(x), as ONNX Runtime's pre-processing presents
    // it (see `decompose`), unless the op type is left float.
    let decomposed = if opts
        .exclude_op_types
        .iter()
        .any(|t| t.eq_ignore_ascii_case("HardSwish"))
    {
        Vec::new()
    } else {
        decompose::hardswish(&mut float, &opts.exclude)?
    };
    // 2-D MatMul + bias Add as one Gemm, as ONNX Runtime's pre-processing presents it, unless
    // one of those op types is left float.
    let gemm_from_matmul = if opts.exclude_op_types.iter().any(|t| {
        ["MatMul", "Add", "Gemm"]
            .iter()
            .any(|o| t.eq_ignore_ascii_case(o))
    }) {
        Vec::new()
    } else {
        decompose::matmul_add_gemm(&mut float, &opts.exclude)?
    };
    let mut plan = plan::plan(&float, &opts.plan_options())?;
    // Raise the opset the QDQ form needs before calibrating: the upgraded float model is the
    // one calibrated (tract runs it where it may not run the old ops, e.g. Upsample), and a
    // model that cannot be raised fails here, not after calibration.
    let upgraded = match qdq::opset_upgrade(&float, &plan)? {
        Some((from, to)) => {
            let r = crate::graph::upgrade::upgrade(&mut float, to)?;
            plan = plan::plan(&float, &opts.plan_options())?;
            let rewritten = r
                .rewritten
                .iter()
                .map(|w| format!("{} ({}): {}", w.node, w.op_type, w.change))
                .collect();
            Some((from, to, rewritten))
        }
        None => None,
    };
    Ok(Prepared {
        float,
        plan,
        fusion,
        equalization,
        absorption: None,
        upgraded,
        decomposed,
        gemm_from_matmul,
    })
}

/// High-bias absorption on `prepared.float`, measured on `samples` ([`absorb`]), when the
/// options ask for it and it was not done yet; the plan follows the new bias names.
pub fn absorb_prepared<S: crate::verify::SampleSource + ?Sized>(
    prepared: &mut Prepared,
    samples: &S,
    opts: &QuantizeOptions,
) -> Result<()> {
    if !opts.high_bias_absorption || prepared.absorption.is_some() {
        return Ok(());
    }
    let _p = crate::progress::phase("absorbing high biases");
    let r = absorb::absorb(&mut prepared.float, samples)?;
    if !r.activations.is_empty() {
        prepared.plan = plan::plan(&prepared.float, &opts.plan_options())?;
    }
    prepared.absorption = Some(r);
    Ok(())
}

/// [`prepare`], then [`absorb_prepared`] on `samples`.
pub fn prepare_on(
    model: &Model,
    opts: &QuantizeOptions,
    samples: &dyn crate::verify::SampleSource,
) -> Result<Prepared> {
    let mut p = prepare(model, opts)?;
    absorb_prepared(&mut p, samples, opts)?;
    Ok(p)
}

/// Quantizes `model` with each option set of `variants` (each calibrated on `calib`, its
/// progress phase named by its label) and scores each against `reference` (the float model as
/// quantization sees it) on the first [`equalize::CHOICE_SAMPLES`] calibration samples: the
/// worst output's SQNR in dB (`None`: identical to float), and the samples scored. What the
/// measured choices ([`choose_affine_folding`], [`equalize::choose`]) compare.
fn score_variants(
    model: &Model,
    calib: &dyn crate::verify::SampleSource,
    reference: Model,
    variants: &[(&str, &QuantizeOptions)],
) -> Result<(Vec<Option<f64>>, usize)> {
    let cases = analyze::take_samples(calib, equalize::CHOICE_SAMPLES)?;
    let samples = cases.len();
    let threads = variants.first().map_or(0, |(_, o)| o.threads);
    let evaluator = analyze::Evaluator::new(&reference, cases, threads)?;
    drop(reference);
    let mut scores = Vec::with_capacity(variants.len());
    for (label, o) in variants {
        let _p = crate::progress::phase(*label);
        let (q, _, _) = quantize(model, Calibration::Source(calib), o)?;
        scores.push(evaluator.score(&q)?.sqnr_db);
    }
    Ok((scores, samples))
}

/// What [`choose_affine_folding`] measured: the worst output's SQNR of the quantized model
/// against the float one, with and without the single-value channel-affine folds, on the
/// calibration samples.
#[derive(Debug, Clone, Serialize)]
pub struct AffineFoldingChoice {
    /// Whether those folds were kept.
    pub folded: bool,
    /// The channel-affine folds of single values fusion makes (the per-channel ones are made
    /// either way).
    pub folds: usize,
    /// dB; `None`: identical to the float model.
    pub sqnr_with_db: Option<f64>,
    pub sqnr_without_db: Option<f64>,
    /// Calibration samples the two models were scored on.
    pub samples: usize,
}

/// Quantizes `model` with `opts` with and without the channel-affine folds of single values
/// (`Conv -> Mul(s) -> Add(t)`, PP-LCNetV3's learnable affine blocks, folded into the Conv),
/// each calibrated on `calib`, scores both against the float model on the first
/// [`equalize::CHOICE_SAMPLES`] calibration samples, and keeps the folds unless leaving them
/// out scores strictly better. The per-channel folds (Paddle's bias Adds, TF's BN as Sub / Mul
/// / Add), which ONNX Runtime's pre-processing makes too, are made either way. Both float
/// models compute the same function; they differ in where quantization rounds, and which
/// rounds better depends on the data: on PP-OCRv4 det the folds gain 4.7 dB on real document
/// scans and lose 1.1 on synthetic pages. `None` when fusion makes no such fold.
pub fn choose_affine_folding(
    model: &Model,
    calib: &dyn crate::verify::SampleSource,
    opts: &QuantizeOptions,
) -> Result<Option<AffineFoldingChoice>> {
    let mut with = opts.clone();
    with.no_affine_folding = false;
    with.no_scalar_affine_folding = false;
    let mut without = with.clone();
    without.no_scalar_affine_folding = true;
    let affine_folds = |o: &QuantizeOptions| -> Result<(usize, Prepared)> {
        let p = prepare(model, o)?;
        let n = p.fusion.as_ref().map_or(0, |f| {
            f.groups
                .iter()
                .filter(|g| g.kind == crate::fusion::patterns::GroupKind::ConvAffine)
                .count()
        });
        Ok((n, p))
    };
    let (all, prepared) = {
        let _p = crate::progress::phase("looking for channel-affine folds");
        affine_folds(&with)?
    };
    if all == 0 {
        return Ok(None);
    }
    let folds = all.saturating_sub(affine_folds(&without)?.0);
    if folds == 0 {
        return Ok(None);
    }
    // the reference: the float model as quantization sees it, which computes the same
    // function as `model`
    let (scores, samples) = score_variants(
        model,
        calib,
        prepared.float,
        &[
            (
                "measuring with the single-value channel-affine folds",
                &with,
            ),
            (
                "measuring without the single-value channel-affine folds",
                &without,
            ),
        ],
    )?;
    let (sqnr_with_db, sqnr_without_db) = (scores[0], scores[1]);
    let db = |s: Option<f64>| s.unwrap_or(f64::INFINITY);
    Ok(Some(AffineFoldingChoice {
        folded: db(sqnr_with_db) >= db(sqnr_without_db),
        folds,
        sqnr_with_db,
        sqnr_without_db,
        samples,
    }))
}

/// Calibrates `prepared.float` (or takes the ranges given) for the plan's values; the model's
/// outputs keep their observed range. Returns the ranges and whether they came from a file.
pub fn calibrate_prepared(
    prepared: &Prepared,
    calibration: Calibration,
    opts: &QuantizeOptions,
) -> Result<(Ranges, bool)> {
    calibrate_float(
        Float::Shared(&prepared.float),
        &prepared.plan,
        calibration,
        opts,
    )
}

/// [`calibrate_prepared`] lending `prepared.float`'s weights to tract rather than copying
/// them ([`calibrate::calibrate_lending`]); `prepared` is as it was afterwards.
pub fn calibrate_prepared_lending(
    prepared: &mut Prepared,
    calibration: Calibration,
    opts: &QuantizeOptions,
) -> Result<(Ranges, bool)> {
    let Prepared { float, plan, .. } = prepared;
    calibrate_float(Float::Lent(float), plan, calibration, opts)
}

/// How [`calibrate_float`] has the float model: tract copies or borrows its weights.
enum Float<'a> {
    Shared(&'a Model),
    Lent(&'a mut Model),
}

fn calibrate_float(
    float: Float<'_>,
    plan: &QuantPlan,
    calibration: Calibration,
    opts: &QuantizeOptions,
) -> Result<(Ranges, bool)> {
    let values = plan.calibrated_values();
    let mut float = float;
    fn run<S: crate::verify::SampleSource + ?Sized>(
        float: &mut Float<'_>,
        values: &[String],
        samples: &S,
        opts: &QuantizeOptions,
    ) -> Result<Ranges> {
        let (method, target, threads) = (opts.method, opts.target(), opts.threads);
        match float {
            Float::Shared(m) => calibrate::calibrate(m, values, samples, method, target, threads),
            Float::Lent(m) => {
                calibrate::calibrate_lending(m, values, samples, method, target, threads)
            }
        }
    }
    let (ranges, from_file) = match calibration {
        Calibration::Samples(samples) => (run(&mut float, &values, samples, opts)?, false),
        Calibration::Source(samples) => (run(&mut float, &values, samples, opts)?, false),
        Calibration::Ranges(r) => {
            if let Some(missing) = values.iter().find(|v| !r.ranges.contains_key(*v)) {
                return Err(Error::Usage(format!(
                    "the ranges file has no range for '{missing}' (was it saved for this model and these options?)"
                )));
            }
            (r.clone(), true)
        }
        Calibration::Chosen { ranges: r, .. } => {
            if let Some(missing) = values.iter().find(|v| !r.ranges.contains_key(*v)) {
                return Err(Error::tensor(missing, "no range was chosen for this value"));
            }
            return Ok((r.clone(), false));
        }
    };
    let float: &Model = match &float {
        Float::Shared(m) => m,
        Float::Lent(m) => m,
    };
    // A model's outputs are what the user reads: clipping them (as percentile, entropy and L2
    // do to intermediate activations) changes answers, so they keep the observed range.
    let mut ranges = ranges;
    if !from_file {
        keep_output_ranges(float, &mut ranges, opts.symmetric_activations);
    }
    Ok((ranges, from_file))
}

/// Sets the range of each graph output of `float` to its observed range.
pub fn keep_output_ranges(float: &Model, ranges: &mut Ranges, symmetric: bool) {
    for o in &float.graph().output {
        if let Some(&mm) = ranges.observed.get(&o.name) {
            let r = if symmetric {
                let t = mm.0.abs().max(mm.1.abs());
                (-t, t)
            } else {
                mm
            };
            ranges.ranges.insert(o.name.clone(), r);
        }
    }
}

/// Emits the QDQ model of `prepared` with `ranges` (the plan may be a subset of
/// `prepared.plan`, as the analyzer's variants are).
pub fn emit(
    prepared: &Prepared,
    plan: &QuantPlan,
    ranges: &Ranges,
    opts: &QuantizeOptions,
) -> Result<(Model, QdqReport)> {
    materialize_float(
        prepared.float.clone(),
        prepared.upgraded.as_ref(),
        plan,
        ranges,
        opts,
    )
}

/// Turns the float model `float` (prepared, raised to the opset `upgraded` says) into its QDQ
/// form in place.
fn materialize_float(
    float: Model,
    upgraded: Option<&(i64, i64, Vec<String>)>,
    plan: &QuantPlan,
    ranges: &Ranges,
    opts: &QuantizeOptions,
) -> Result<(Model, QdqReport)> {
    let mut quantized = float;
    let mut qdq = qdq::materialize(&mut quantized, plan, &ranges.ranges, &opts.qdq_options())?;
    if let Some((from, to, r)) = upgraded {
        qdq.opset = Some((*from, *to));
        qdq.upgraded = r.clone();
    }
    Ok((quantized, qdq))
}

/// Fuses (unless disabled), plans, calibrates and emits a QDQ model. Returns the quantized
/// model, the ranges used and the report; `model` is not changed (it is copied:
/// [`quantize_owned`] turns the model itself into the quantized one).
pub fn quantize(
    model: &Model,
    calibration: Calibration,
    opts: &QuantizeOptions,
) -> Result<(Model, Ranges, QuantizeReport)> {
    quantize_prepared(prepare(model, opts)?, calibration, opts)
}

/// [`quantize`] turning `model` itself into the quantized model: no copy of it is made, and
/// calibration lends its weights to tract, so the float weights are held once by qfold and
/// once by tract at most.
pub fn quantize_owned(
    model: Model,
    calibration: Calibration,
    opts: &QuantizeOptions,
) -> Result<(Model, Ranges, QuantizeReport)> {
    quantize_prepared(prepare_owned(model, opts)?, calibration, opts)
}

fn quantize_prepared(
    prepared: Prepared,
    calibration: Calibration,
    opts: &QuantizeOptions,
) -> Result<(Model, Ranges, QuantizeReport)> {
    let mut prepared = prepared;
    let bias_samples = match (
        &calibration,
        opts.corrects_biases() || opts.output_bias_correction,
    ) {
        (Calibration::Samples(s), true) => Some(BiasSamples::Samples(s)),
        (Calibration::Source(s), true) => Some(BiasSamples::Source(*s)),
        (Calibration::Chosen { samples, .. }, true) => Some(BiasSamples::Source(*samples)),
        (Calibration::Ranges(_), true) if opts.bias_correction || opts.output_bias_correction => {
            return Err(Error::Usage(format!(
                "{} measures on calibration samples: give --calib, not --ranges",
                if opts.bias_correction {
                    "--bias-correction"
                } else {
                    "--output-bias-correction"
                }
            )))
        }
        _ => None,
    };
    if opts.high_bias_absorption {
        match &calibration {
            Calibration::Samples(s) => absorb_prepared(&mut prepared, *s, opts)?,
            Calibration::Source(s) | Calibration::Chosen { samples: s, .. } => {
                absorb_prepared(&mut prepared, *s, opts)?
            }
            Calibration::Ranges(_) => {
                return Err(Error::Usage(
                    "--high-bias-absorption measures on calibration samples: give --calib, not --ranges"
                        .into(),
                ))
            }
        }
    }
    let (ranges, from_file) = calibrate_prepared_lending(&mut prepared, calibration, opts)?;
    let bias_correction = match bias_samples.filter(|_| opts.corrects_biases()) {
        Some(s) => {
            let _p = crate::progress::phase("correcting biases for weight quantization");
            Some(match s {
                BiasSamples::Samples(s) => {
                    bias_correction::correct(&mut prepared.float, &prepared.plan, opts, s)?
                }
                BiasSamples::Source(s) => {
                    bias_correction::correct(&mut prepared.float, &prepared.plan, opts, s)?
                }
            })
        }
        None => None,
    };
    if bias_correction.is_some() {
        // new bias initializers may have new names
        prepared.plan = plan::plan(&prepared.float, &opts.plan_options())?;
    }
    let output_bias_correction = match bias_samples.filter(|_| opts.output_bias_correction) {
        Some(s) => {
            let plan_of = |m: &Model| plan::plan(m, &opts.plan_options());
            let upgraded = prepared.upgraded.clone();
            let build = |f: &Model, p: &QuantPlan| {
                Ok(materialize_float(f.clone(), upgraded.as_ref(), p, &ranges, opts)?.0)
            };
            let r = match s {
                BiasSamples::Samples(s) => {
                    bias_correction::correct_outputs(&mut prepared.float, &plan_of, build, s)?
                }
                BiasSamples::Source(s) => {
                    bias_correction::correct_outputs(&mut prepared.float, &plan_of, build, s)?
                }
            };
            prepared.plan = plan::plan(&prepared.float, &opts.plan_options())?;
            Some(r)
        }
        None => None,
    };
    let Prepared {
        float,
        plan,
        fusion,
        equalization,
        absorption,
        upgraded,
        decomposed,
        gemm_from_matmul,
    } = prepared;
    let (quantized, qdq) = {
        let _p = crate::progress::phase("inserting QuantizeLinear / DequantizeLinear");
        materialize_float(float, upgraded.as_ref(), &plan, &ranges, opts)?
    };
    let report = QuantizeReport {
        options: opts.clone(),
        fusion,
        equalization,
        high_bias_absorption: absorption,
        bias_correction,
        output_bias_correction,
        plan,
        qdq,
        calibration_samples: ranges.samples,
        ranges_from_file: from_file,
        decomposed,
        gemm_from_matmul,
    };
    Ok((quantized, ranges, report))
}

#[derive(Clone, Copy)]
enum BiasSamples<'a> {
    Samples(&'a [Sample]),
    Source(&'a dyn crate::verify::SampleSource),
}
