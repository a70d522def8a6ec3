//! The commands as library functions: each runs what `qfold <command>` runs, writes what it
//! writes, and returns the report `qfold <command> --json` prints. The CLI prints these
//! reports; the Python package returns them as dicts.
//!
//! A rewriting command whose check fails writes nothing and returns its report with
//! `written: None`; [`FuseOutput::failure`] (and its siblings) give the message to show.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::{Error, Result};
use crate::fusion::{fuse, FuseOptions, FuseReport};
use crate::graph::Graph;
use crate::inspect::{summarize, ModelSummary};
use crate::onnx::{Model, SaveOptions};
use crate::progress;
use crate::quant::analyze::{Evaluator, LayerAnalysis};
use crate::quant::calibrate::Ranges;
use crate::quant::observe::Method;
use crate::quant::params::QType;
use crate::quant::qoperator::{convert_with, ConvertOptions, ConvertReport};
use crate::quant::Preset;
use crate::quant::{quantize_owned, Calibration, QuantizeOptions, QuantizeReport};
use crate::report::Report;
use crate::runtime::{Runner, Sample};
use crate::verify::{
    self, tolerance, Case, Comparer, Comparison, Criterion, Preprocess, SampleSource,
};

impl Report for ModelSummary {
    const SCHEMA: &'static str = "qfold.inspect/1";
}

impl Report for FuseOutput {
    const SCHEMA: &'static str = "qfold.fuse/1";
}

impl Report for ConvertOutput {
    const SCHEMA: &'static str = "qfold.convert/1";
}

impl Report for Comparison {
    const SCHEMA: &'static str = "qfold.check/1";
}

impl Report for UpgradeOutput {
    const SCHEMA: &'static str = "qfold.upgrade/1";
}

impl Report for QuantizeOutput {
    const SCHEMA: &'static str = "qfold.quantize/1";
}

impl Report for AnalyzeOutput {
    const SCHEMA: &'static str = "qfold.analyze/1";
}

/// Where a command's input samples come from.
#[derive(Debug, Clone)]
pub enum Inputs {
    /// A data set folder or file: `test_data_set_N` folders, `input_K.pb` files, `.npy` /
    /// `.npz` files, images ([`verify::open_data`], images at the model's declared size).
    Dir(PathBuf),
    /// A data set folder or file as [`Inputs::Dir`], images preprocessed as `preprocess` says.
    Data {
        path: PathBuf,
        preprocess: Preprocess,
    },
    /// One sample from `.npy` files: `name=path` pairs, or plain paths in input order.
    Npy(Vec<String>),
    /// `count` random samples from the declared input shapes (symbolic dims from `shapes`,
    /// `name:1,3,224,224`).
    Random {
        count: usize,
        seed: u64,
        shapes: Vec<String>,
    },
    /// Samples already in memory.
    Cases(Vec<Case>),
    /// Arrays held in memory, one run of the model or several per feed
    /// ([`verify::cases_from_arrays`] with `batch`), rows labelled in order by `labels`
    /// (for accuracy); `source` names them in messages.
    Arrays {
        feeds: Vec<Sample>,
        batch: Option<usize>,
        labels: Option<Vec<i64>>,
        source: String,
    },
}

impl Inputs {
    /// Refuses a random sample count over the limit before any model is loaded; `what` names
    /// the count in the message (`--random`).
    fn check_count(&self, what: &str) -> Result<()> {
        match self {
            Inputs::Random { count, .. } => verify::check_random_count(what, *count),
            _ => Ok(()),
        }
    }

    /// The samples, read or generated for `model`, all in memory.
    pub fn resolve(self, model: &Model) -> Result<Vec<Case>> {
        verify::source::collect(self.open(model)?.as_ref())
    }

    /// The samples for `model`: data sets on disk are read one sample at a time as they are
    /// asked for; random samples and arrays are held in memory.
    pub fn open(self, model: &Model) -> Result<Box<dyn SampleSource>> {
        match self {
            Inputs::Dir(d) => verify::open_data(model, &d, &Preprocess::default()),
            Inputs::Data { path, preprocess } => verify::open_data(model, &path, &preprocess),
            other => Ok(Box::new(other.in_memory(model)?)),
        }
    }

    fn in_memory(self, model: &Model) -> Result<Vec<Case>> {
        match self {
            Inputs::Dir(_) | Inputs::Data { .. } => self.resolve(model),
            Inputs::Npy(specs) => Ok(vec![verify::read_npy_sample(model, &specs)?]),
            Inputs::Random {
                count,
                seed,
                shapes,
            } => verify::random_cases(model, count, seed, &verify::parse_input_shapes(&shapes)?),
            Inputs::Cases(c) => Ok(c),
            Inputs::Arrays {
                feeds,
                batch,
                labels,
                source,
            } => {
                let many = feeds.len() > 1;
                let mut cases = Vec::new();
                for (k, feed) in feeds.into_iter().enumerate() {
                    let name = if many {
                        format!("{source}[{k}]")
                    } else {
                        source.clone()
                    };
                    cases.extend(verify::cases_from_arrays(model, feed, &name, batch)?);
                }
                if cases.is_empty() {
                    return Err(Error::Usage(format!("{source}: no samples")));
                }
                if let Some(l) = labels {
                    verify::label_rows(&mut cases, &l, &format!("{source} labels"))?;
                }
                Ok(cases)
            }
        }
    }
}

/// Where a rewriting command writes its model, checked before anything is loaded.
#[derive(Debug, Clone)]
pub struct Destination {
    pub path: PathBuf,
    pub save: SaveOptions,
    /// Replace the input model (its external data file included) once the new one is complete.
    pub in_place: bool,
}

impl Destination {
    /// `output` (or, with `in_place` and no output, the input model) in an existing folder,
    /// not a directory, FIFO or device, and not the input model unless `in_place`. With
    /// `in_place`, an output naming the input through a symbolic link resolves to the input
    /// itself, so the link is not replaced.
    pub fn new(
        model: &Path,
        output: Option<&Path>,
        in_place: bool,
        save: SaveOptions,
    ) -> Result<Destination> {
        let out = match output {
            Some(o) => o.to_path_buf(),
            None if in_place => model.to_path_buf(),
            None => return Err(Error::Usage("give -o OUTPUT or --in-place".into())),
        };
        crate::files::check_output(model, &out, in_place)?;
        crate::files::check_data_destination(&out)?;
        let path = if in_place && crate::files::same_file(&out, model) {
            out.canonicalize().map_err(|e| Error::Io {
                path: out.clone(),
                source: e,
            })?
        } else {
            out
        };
        Ok(Destination {
            path,
            save,
            in_place,
        })
    }

    /// Once the input is loaded and before any work: refuses an output that is, or whose
    /// `.data` is, one of the input's external data files.
    pub fn check_against(&self, input: &Model) -> Result<()> {
        crate::files::check_output_against(&input.files, &self.path, self.in_place)
    }

    /// Saves `model` here.
    pub fn save(&self, model: &Model) -> Result<()> {
        let _p = progress::phase(format!("saving {}", self.path.display()));
        if self.in_place {
            crate::onnx::save_in_place(model, &self.path, &self.save)
        } else {
            crate::onnx::save(model, &self.path, &self.save)
        }
    }

    fn written(&self, passed: bool) -> Option<String> {
        passed.then(|| self.path.display().to_string())
    }
}

/// The names of `m`'s outputs.
fn output_names(m: &Model) -> Vec<String> {
    m.graph().output.iter().map(|o| o.name.clone()).collect()
}

/// Loads a model, showing progress.
fn load(path: &Path) -> Result<Model> {
    let _p = progress::phase(format!("loading {}", path.display()));
    crate::onnx::load(path)
}

/// Fails on a main graph that cannot be ordered (a cycle, a value read that nothing produces,
/// a value produced twice) before any input data is read or generated: random inputs of a
/// large declared shape take seconds to draw, and a broken graph should not wait for them.
/// One pass when the stored order is already topological.
fn check_order(model: &Model) -> Result<()> {
    Graph::of_model(model).topo_order().map(drop)
}

/// Loads a model to be run only, its external data left in the files for tract to read
/// ([`crate::onnx::load_lazy`]), showing progress.
fn lazy(path: &Path) -> Result<Model> {
    let _p = progress::phase(format!("loading {}", path.display()));
    crate::onnx::load_lazy(path)
}

/// `qfold inspect`: what is inside a model.
pub fn inspect_file(model: &Path) -> Result<ModelSummary> {
    Ok(summarize(load(model)?))
}

/// How `fuse_file` checks the fused model against the original in tract.
#[derive(Debug, Clone)]
pub struct FuseCheck {
    pub inputs: Inputs,
    /// A named tolerance (exact, float, half, loose); `None`: half for float16 models, float
    /// otherwise.
    pub tolerance: Option<String>,
}

/// The report of `qfold fuse --json`.
#[derive(Debug, Clone, Serialize)]
pub struct FuseOutput {
    pub fusion: FuseReport,
    pub check: Option<Comparison>,
    /// The path written, `None` when the check failed.
    pub written: Option<String>,
}

impl FuseOutput {
    /// The error to show when the check failed (nothing was written).
    pub fn failure(&self) -> Option<String> {
        check_failure(self.check.as_ref(), "the original")
    }
}

fn check_failure(check: Option<&Comparison>, against: &str) -> Option<String> {
    check
        .filter(|c| !c.passed)
        .map(|_| format!("the result does not match {against}; nothing written"))
}

/// `qfold fuse`: fuses `model`, checks the result when asked, and writes it to `dest` unless
/// the check failed.
pub fn fuse_file(
    model: &Path,
    dest: &Destination,
    opts: &FuseOptions,
    check: Option<FuseCheck>,
) -> Result<FuseOutput> {
    if let Some(c) = &check {
        c.inputs.check_count("--random")?;
    }
    let mut fused = load(model)?;
    dest.check_against(&fused)?;
    if opts.only.iter().any(Vec::is_empty) {
        return Err(Error::Usage("--only needs at least one name".into()));
    }
    let checked = match check {
        Some(c) => {
            let criterion: Criterion = match &c.tolerance {
                None => tolerance::for_model(&fused),
                Some(t) => tolerance::by_name(t).ok_or_else(|| {
                    Error::Usage(format!("--tolerance {t}: use exact, float, half or loose"))
                })?,
            };
            let cases = c.inputs.open(&fused)?;
            Some((output_names(&fused), cases, criterion))
        }
        None => None,
    };
    let report = {
        let _p = progress::phase("fusing");
        fuse(&mut fused, opts)?
    };
    let comparison = match checked {
        // The original is not kept: its runner reads it again from its file, external data
        // left there for tract to read; the fused model lends its weights to its runner. The
        // two run in turns, so the weights are held by the fused model and one runner.
        Some((original_outputs, cases, criterion)) => {
            let fused_outputs = output_names(&fused);
            Some(verify::compare::compare_with(
                original_outputs,
                fused_outputs,
                cases.as_ref(),
                criterion,
                &mut |s| reference_runner(model, None, s),
                &mut |s| Runner::new_lending(&mut fused, s, &[]),
            )?)
        }
        None => None,
    };
    let passed = comparison.as_ref().is_none_or(|c| c.passed);
    if passed {
        dest.save(&fused)?;
    }
    Ok(FuseOutput {
        fusion: report,
        check: comparison,
        written: dest.written(passed),
    })
}

/// The report of `qfold convert --json`.
#[derive(Debug, Clone, Serialize)]
pub struct ConvertOutput {
    pub convert: ConvertReport,
    pub check: Option<Comparison>,
    /// The path written, `None` when the check failed.
    pub written: Option<String>,
}

impl ConvertOutput {
    /// The error to show when the check failed (nothing was written).
    pub fn failure(&self) -> Option<String> {
        check_failure(self.check.as_ref(), "the QDQ model")
    }
}

/// `qfold convert`: rewrites a QDQ model into QOperator form, checks it against the QDQ model
/// (SQNR of at least `check.1` dB) when asked, and writes it unless the check failed.
pub fn convert_file(
    model: &Path,
    dest: &Destination,
    opts: ConvertOptions,
    check: Option<(Inputs, f64)>,
) -> Result<ConvertOutput> {
    if let Some((inputs, _)) = &check {
        inputs.check_count("--random")?;
    }
    let mut q = load(model)?;
    dest.check_against(&q)?;
    let checked = match check {
        Some((inputs, db)) => Some((output_names(&q), inputs.open(&q)?, db)),
        None => None,
    };
    let p = progress::phase("converting to QOperator form");
    let report = convert_with(&mut q, opts).map_err(|e| match e {
        Error::Usage(m) => Error::Usage(format!("{}: {m}", model.display())),
        other => other,
    })?;
    drop(p);
    if report.converted.is_empty() {
        let why: Vec<String> = report
            .skipped
            .iter()
            .take(5)
            .map(|(node, reason)| format!("node '{node}': {reason}"))
            .collect();
        return Err(Error::Usage(format!(
            "{}: no QDQ pattern to convert (is it a QDQ model?){}",
            model.display(),
            if why.is_empty() {
                String::new()
            } else {
                format!("; left alone: {}", why.join("; "))
            }
        )));
    }
    let comparison = match checked {
        // as fuse_file checks: the QDQ model read again from its file, in turns
        Some((qdq_outputs, cases, db)) => {
            let outputs = output_names(&q);
            Some(verify::compare::compare_with(
                qdq_outputs,
                outputs,
                cases.as_ref(),
                Criterion::MinSqnr { db },
                &mut |s| reference_runner(model, None, s),
                &mut |s| Runner::new_lending(&mut q, s, &[]),
            )?)
        }
        None => None,
    };
    let passed = comparison.as_ref().is_none_or(|c| c.passed);
    if passed {
        dest.save(&q)?;
    }
    Ok(ConvertOutput {
        convert: report,
        check: comparison,
        written: dest.written(passed),
    })
}

/// The criterion `qfold check` judges by: `min_sqnr` (dB), else a named `tolerance` (exact,
/// float, half, loose), else `atol` / `rtol` (either may be left out, meaning 0); `None`
/// when none is given (the model's default applies).
pub fn criterion(
    min_sqnr: Option<f64>,
    tolerance: Option<&str>,
    atol: Option<f64>,
    rtol: Option<f64>,
) -> Result<Option<Criterion>> {
    if let Some(db) = min_sqnr {
        return Ok(Some(Criterion::MinSqnr { db }));
    }
    if let Some(name) = tolerance {
        return tolerance::by_name(name).map(Some).ok_or_else(|| {
            Error::Usage(format!(
                "--tolerance {name}: use exact, float, half or loose"
            ))
        });
    }
    match (atol, rtol) {
        (None, None) => Ok(None),
        (a, r) => {
            let (atol, rtol) = (a.unwrap_or(0.0), r.unwrap_or(0.0));
            if !(atol >= 0.0 && rtol >= 0.0) {
                return Err(Error::Usage(
                    "--atol and --rtol must be non-negative".into(),
                ));
            }
            Ok(Some(Criterion::Tolerance { atol, rtol }))
        }
    }
}

/// `qfold check`: runs `b` against `a` in tract on `inputs`, or, without `b`, `a` against the
/// expected outputs stored with the inputs (which must then be a folder). `criterion`
/// defaults to the float tolerance (half for float16 models).
pub fn check_files(
    a: &Path,
    b: Option<&Path>,
    inputs: Inputs,
    criterion: Option<Criterion>,
) -> Result<Comparison> {
    let model_a = lazy(a)?;
    check_order(&model_a)?;
    let crit = criterion.unwrap_or_else(|| tolerance::for_model(&model_a));
    inputs.check_count("--random")?;
    match b {
        Some(bp) => {
            let model_b = lazy(bp)?;
            let cases = inputs.open(&model_a)?;
            verify::compare_models(&model_a, &model_b, cases.as_ref(), crit)
        }
        None => {
            if !matches!(inputs, Inputs::Dir(_) | Inputs::Data { .. }) {
                return Err(Error::Usage(
                    "check with one model needs --inputs DIR holding expected output_K.pb files"
                        .into(),
                ));
            }
            let cases = inputs.open(&model_a)?;
            verify::compare_expected(&model_a, cases.as_ref(), crit)
        }
    }
}

/// Where `quantize_file` takes its activation ranges from.
#[derive(Debug, Clone)]
pub enum CalibrationData {
    /// Calibrate on these samples.
    Inputs(Inputs),
    /// Ranges saved by an earlier run (`--save-ranges`).
    Ranges(PathBuf),
}

/// What `quantize_file` evaluates the quantized model on.
#[derive(Debug, Clone)]
pub enum EvalData {
    /// These samples; `source` describes them in the report.
    Inputs { inputs: Inputs, source: String },
    /// The calibration samples themselves (every calibration sample calibrates, as in ONNX
    /// Runtime): the report says so.
    Calibration,
    /// Fresh random samples: a fifth as many as the calibration samples, at least 2.
    Random { seed: u64, shapes: Vec<String> },
}

/// Everything `qfold quantize` needs besides the model and where to write it.
#[derive(Debug, Clone)]
pub struct QuantizeJob {
    pub options: QuantizeOptions,
    /// Rewrite the QDQ model into QOperator form.
    pub qoperator: bool,
    /// With `qoperator`: also emit ONNX Runtime's com.microsoft operators (evaluated before
    /// they are added, as tract cannot run them).
    pub allow_contrib_ops: bool,
    pub calibration: CalibrationData,
    pub eval: EvalData,
    /// Save the calibrated ranges to this JSON file.
    pub save_ranges: Option<PathBuf>,
    /// Write nothing when an output's SQNR against the float model is below `min_sqnr`.
    pub check: bool,
    pub min_sqnr: f64,
    /// Also analyze every quantized tensor ([`crate::quant::analyze`]) on this many
    /// evaluation samples (0: all).
    pub report_layers: Option<usize>,
    /// Accuracy-driven quantization ([`crate::quant::target`]).
    pub target: Option<TargetJob>,
}

/// `--target-sqnr` / `--target-accuracy`.
#[derive(Debug, Clone)]
pub struct TargetJob {
    pub goal: crate::quant::target::Goal,
    /// Evaluation samples (runs of the model) the search scores variants on (0: all).
    pub samples: usize,
    /// Write the best model found even when it misses the goal (the run still exits 1).
    pub write_best: bool,
    /// Realizations of the evaluation samples each variant, and the final model, is scored on
    /// ([`verify::Realizations`]).
    pub realizations: usize,
}

/// The default of [`TargetJob::realizations`]: the samples as given and two near copies.
pub const DEFAULT_REALIZATIONS: usize = 3;

impl TargetJob {
    /// The target search the user asked for, checked: `None` without a target. Percentages
    /// are as the user gives them (`accuracy_pct` in (0, 100], `min_quantized_pct` in
    /// [0, 100]). `flag` spells an option for messages (`--target-sqnr` on the command line,
    /// `target_sqnr` in Python) and `sep` joins it to a value (`" "`, `"="`).
    pub fn checked(
        sqnr_db: Option<f64>,
        accuracy_pct: Option<f64>,
        min_quantized_pct: f64,
        samples: usize,
        write_best: bool,
        flag: &dyn Fn(&str) -> String,
        sep: &str,
    ) -> Result<Option<TargetJob>> {
        if sqnr_db.is_none() && accuracy_pct.is_none() {
            if write_best {
                return Err(Error::Usage(format!(
                    "{} needs {} or {}",
                    flag("write-best"),
                    flag("target-sqnr"),
                    flag("target-accuracy")
                )));
            }
            return Ok(None);
        }
        if let Some(p) = accuracy_pct {
            if !(p > 0.0 && p <= 100.0) {
                return Err(Error::Usage(format!(
                    "{}{sep}{p}: use a percentage in (0, 100]",
                    flag("target-accuracy")
                )));
            }
        }
        if !(0.0..=100.0).contains(&min_quantized_pct) {
            return Err(Error::Usage(format!(
                "{}{sep}{min_quantized_pct}: use a percentage in [0, 100]",
                flag("min-quantized")
            )));
        }
        if sqnr_db.is_some_and(|d| !d.is_finite()) {
            return Err(Error::Usage(format!(
                "{}: use a finite number of dB",
                flag("target-sqnr")
            )));
        }
        Ok(Some(TargetJob {
            goal: crate::quant::target::Goal {
                sqnr_db,
                accuracy: accuracy_pct.map(|p| p / 100.0),
                min_quantized: min_quantized_pct / 100.0,
            },
            samples,
            write_best,
            realizations: DEFAULT_REALIZATIONS,
        }))
    }

    /// The job scoring on `realizations` realizations (1 to 16) of the evaluation samples.
    pub fn with_realizations(
        self,
        realizations: usize,
        flag: &dyn Fn(&str) -> String,
        sep: &str,
    ) -> Result<TargetJob> {
        if !(1..=16).contains(&realizations) {
            return Err(Error::Usage(format!(
                "{}{sep}{realizations}: use 1 (the samples as given) to 16",
                flag("realizations")
            )));
        }
        Ok(TargetJob {
            realizations,
            ..self
        })
    }
}

/// The quantization settings as the command line spells them: a preset and overrides.
#[derive(Debug, Clone)]
pub struct QuantizeSettings {
    /// qfold, ort, fbgemm (x86), qnnpack, tensorrt, tract.
    pub preset: String,
    /// qdq or qoperator; `None`: qoperator for the tract preset, qdq otherwise.
    pub format: Option<String>,
    /// minmax, moving-average, percentile, entropy, l2; `None`: the preset's.
    pub method: Option<String>,
    /// For the percentile method, in (50, 100].
    pub percentile: f64,
    /// u8 or i8.
    pub activation: Option<String>,
    /// i8 or u8.
    pub weight: Option<String>,
    pub symmetric_activations: bool,
    /// Per-channel (`Some(true)`) or per-tensor (`Some(false)`) weight scales; `None`: the
    /// preset's.
    pub per_channel: Option<bool>,
    pub per_tensor_min_sqnr: Option<f64>,
    pub reduce_range: bool,
    pub exclude: Vec<String>,
    pub op_types: Vec<String>,
    pub fuse: bool,
    /// Keep constant subgraphs, Identity and inference Dropout nodes as they are.
    pub no_constant_folding: bool,
    /// Initializers that are also graph inputs become constants.
    pub inputs_as_constants: bool,
    /// The channel-affine folds: `Some(false)` without them, `Some(true)` with them, `None`:
    /// with them unless leaving them out measures better ([`crate::quant::choose_affine_folding`]).
    pub affine_folding: Option<bool>,
    pub threads: usize,
    /// Cross-layer equalization before quantizing (`None`: the preset's).
    pub equalize: Option<bool>,
    /// Correct biases for the mean shift weight quantization causes.
    pub bias_correction: bool,
    /// No bias correction with equalization either.
    pub no_bias_correction: bool,
    /// High-bias absorption, measured on the calibration data.
    pub high_bias_absorption: bool,
    /// Correct biases for the mean error of each layer's output in the quantized model.
    pub output_bias_correction: bool,
}

impl Default for QuantizeSettings {
    fn default() -> Self {
        QuantizeSettings {
            preset: "qfold".into(),
            format: None,
            method: None,
            percentile: 99.999,
            activation: None,
            weight: None,
            symmetric_activations: false,
            per_channel: None,
            per_tensor_min_sqnr: None,
            reduce_range: false,
            exclude: vec![],
            op_types: vec![],
            fuse: true,
            no_constant_folding: false,
            inputs_as_constants: false,
            affine_folding: None,
            threads: 0,
            equalize: None,
            bias_correction: false,
            no_bias_correction: false,
            high_bias_absorption: false,
            output_bias_correction: false,
        }
    }
}

fn qtype(s: &str, what: &str) -> Result<QType> {
    match s.to_ascii_lowercase().as_str() {
        "u8" | "uint8" => Ok(QType::U8),
        "i8" | "int8" => Ok(QType::I8),
        _ => Err(Error::Usage(format!("--{what} {s}: use u8 or i8"))),
    }
}

fn method(s: &str, percentile: f64) -> Result<Method> {
    Ok(match s.to_ascii_lowercase().as_str() {
        "minmax" => Method::MinMax,
        "moving-average" | "moving_average" => Method::MovingAverage { constant: 0.01 },
        "percentile" => {
            if !(percentile > 50.0 && percentile <= 100.0) {
                return Err(Error::Usage(format!(
                    "--percentile {percentile}: use a value in (50, 100]"
                )));
            }
            Method::Percentile { percentile }
        }
        "entropy" => Method::Entropy,
        "l2" => Method::L2,
        _ => {
            return Err(Error::Usage(format!(
                "--method {s}: use minmax, moving-average, percentile, entropy or l2"
            )))
        }
    })
}

impl QuantizeSettings {
    /// Whether the output is QOperator (else QDQ).
    pub fn qoperator(&self) -> Result<bool> {
        let default_format = if self.preset.eq_ignore_ascii_case("tract") {
            "qoperator"
        } else {
            "qdq"
        };
        match self
            .format
            .as_deref()
            .unwrap_or(default_format)
            .to_ascii_lowercase()
            .as_str()
        {
            "qdq" => Ok(false),
            "qoperator" => Ok(true),
            other => Err(Error::Usage(format!(
                "--format {other}: use qdq or qoperator"
            ))),
        }
    }

    /// The preset's options with the overrides applied.
    pub fn options(&self) -> Result<QuantizeOptions> {
        let preset = Preset::by_name(&self.preset).ok_or_else(|| {
            Error::Usage(format!(
                "--preset {}: use qfold, ort, fbgemm, x86, qnnpack, tensorrt or tract",
                self.preset
            ))
        })?;
        let mut o = preset.options();
        if let Some(m) = &self.method {
            o.method = method(m, self.percentile)?;
        }
        if let Some(t) = &self.activation {
            o.activation = qtype(t, "activation")?;
        }
        if let Some(t) = &self.weight {
            o.weight = qtype(t, "weight")?;
            o.symmetric_weights = o.weight == QType::I8;
        }
        if self.symmetric_activations {
            o.symmetric_activations = true;
        }
        if let Some(pc) = self.per_channel {
            o.per_channel = pc;
        }
        if self.reduce_range {
            o.reduce_range = true;
        }
        if let Some(db) = self.per_tensor_min_sqnr {
            o.per_tensor_min_sqnr = Some(db);
            o.per_channel = true;
        }
        o.exclude = self.exclude.clone();
        o.exclude_op_types = self
            .op_types
            .iter()
            .flat_map(|s| s.split(','))
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        o.fuse = self.fuse;
        o.no_constant_folding = self.no_constant_folding;
        o.inputs_as_constants = self.inputs_as_constants;
        if let Some(f) = self.affine_folding {
            o.no_affine_folding = !f;
            o.affine_folding_measured = false;
        }
        o.threads = self.threads;
        if let Some(e) = self.equalize {
            o.equalize = e;
            o.equalize_measured = false;
        }
        o.bias_correction = self.bias_correction;
        o.output_bias_correction = self.output_bias_correction;
        o.equalize_bias_correction = !self.no_bias_correction;
        o.high_bias_absorption = self.high_bias_absorption;
        Ok(o)
    }
}

/// Float vs quantized on the evaluation set.
#[derive(Debug, Clone, Serialize)]
pub struct Evaluation {
    pub source: String,
    pub comparison: Comparison,
    pub float_accuracy: Option<f64>,
    pub quantized_accuracy: Option<f64>,
    pub labelled: usize,
}

/// The report of `qfold quantize --json`.
#[derive(Debug, Clone, Serialize)]
pub struct QuantizeOutput {
    pub quantization: QuantizeReport,
    pub evaluation: Evaluation,
    pub size_before: u64,
    pub size_after: u64,
    pub conversion: Option<ConvertReport>,
    /// The per-tensor analysis (`--report-layers`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub layers: Option<LayerAnalysis>,
    /// The accuracy-driven search (`--target-sqnr`, `--target-accuracy`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<crate::quant::target::TargetReport>,
    /// The tract preset's measured choice of equalization ([`crate::quant::equalize::choose`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub equalize_choice: Option<crate::quant::equalize::EqualizeChoice>,
    /// The measured choice of the channel-affine folds ([`crate::quant::choose_affine_folding`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub affine_folding_choice: Option<crate::quant::AffineFoldingChoice>,
    /// The path written, `None` when the check failed.
    pub written: Option<String>,
    /// How the calibration and evaluation data were read (layouts, casts, files left out,
    /// images converted).
    /// (always present, `[]` when there is nothing to say: a stable key for scripts)
    pub notes: Vec<String>,
    /// The SQNR threshold the evaluation was judged by.
    #[serde(skip)]
    pub min_sqnr: f64,
    /// Why the target was missed, if it was.
    #[serde(skip)]
    pub target_failure: Option<String>,
}

fn goal_text(g: &crate::quant::target::Goal) -> String {
    let mut parts = vec![];
    if let Some(d) = g.sqnr_db {
        parts.push(format!("SQNR >= {d} dB"));
    }
    if let Some(a) = g.accuracy {
        parts.push(format!("accuracy >= {:.2}%", 100.0 * a));
    }
    parts.join(", ")
}

fn score_text(s: &crate::quant::analyze::Score) -> String {
    let db = match s.sqnr_db {
        Some(d) => format!("SQNR {d:.2} dB"),
        None => "SQNR infinite".into(),
    };
    match s.accuracy {
        Some(a) => format!("{db}, accuracy {:.2}%", 100.0 * a),
        None => db,
    }
}

impl QuantizeOutput {
    /// The error to show when the evaluation missed the criterion: nothing was written with
    /// `--check`; without it the model was written, and the run still fails (exit 1), so a
    /// model below the criterion never reads as success.
    pub fn failure(&self) -> Option<String> {
        if let Some(f) = &self.target_failure {
            return Some(f.clone());
        }
        if self.written.is_none() {
            Some(format!(
                "SQNR below {} dB against the float model; nothing written",
                self.min_sqnr
            ))
        } else if !self.evaluation.comparison.passed {
            Some(format!(
                "SQNR below {} dB against the float model (see the evaluation above); the model \
                 was written all the same: use --check to write nothing in that case, or \
                 --min-sqnr to change the criterion",
                self.min_sqnr
            ))
        } else {
            None
        }
    }
}

/// Runs the float reference (a runner from `float` for a sample's inputs) and `quantized` on
/// `cases`, in turns ([`verify::compare::run_in_turns`]: one runner alive at a time), and
/// compares their outputs (`names`, the float model's) by SQNR.
fn evaluate(
    names: &[String],
    float: &mut verify::compare::MakeRunner<'_>,
    quantized: &Model,
    cases: &dyn SampleSource,
    min_sqnr: f64,
    source: String,
) -> Result<Evaluation> {
    let mut cmp = Comparer::new(names, Criterion::MinSqnr { db: min_sqnr });
    let mut p = progress::counted(
        format!("evaluating on {} samples", cases.len()),
        cases.len(),
    );
    let (mut fc, mut qc, mut total) = (0, 0, 0);
    verify::compare::run_in_turns(
        cases,
        float,
        &mut |s| Runner::new(quantized, s, &[]),
        &mut |c, of, oq| {
            if let Some(l) = &c.labels {
                let (a, n) = verify::accuracy(of, l);
                let (b, _) = verify::accuracy(oq, l);
                fc += a;
                qc += b;
                total += n;
            }
            cmp.add(of, oq);
            p.inc();
            Ok(())
        },
    )?;
    drop(p);
    Ok(Evaluation {
        source,
        comparison: cmp.finish(),
        float_accuracy: (total > 0).then(|| fc as f64 / total as f64),
        quantized_accuracy: (total > 0).then(|| qc as f64 / total as f64),
        labelled: total,
    })
}

/// A tract runner of the model at `path` read again from its file, its external data left
/// there for tract to read ([`crate::onnx::load_lazy`]), raised to opset `to` when given, and
/// dropped once tract holds its weights: the float reference of an evaluation, which then
/// costs no memory between runners.
fn reference_runner(path: &Path, to: Option<i64>, sample: &Sample) -> Result<Runner> {
    let mut m = lazy(path)?;
    if let Some(to) = to {
        if crate::graph::upgrade::upgrade(&mut m, to).is_err() {
            // the upgrade may read a constant the lazy model left in its file
            m = load(path)?;
            crate::graph::upgrade::upgrade(&mut m, to)?;
        }
    }
    Runner::new_lending(&mut m, sample, &[])
}

/// Timed runs of each model in [`fallback_cost`].
const LATENCY_RUNS: usize = 5;

/// The median of [`LATENCY_RUNS`] runs of `r` on `s` after one warm-up, ms.
fn median_ms(r: &Runner, s: &Sample) -> Result<f64> {
    r.run(s)?;
    let mut t = Vec::with_capacity(LATENCY_RUNS);
    for _ in 0..LATENCY_RUNS {
        let start = std::time::Instant::now();
        r.run(s)?;
        t.push(start.elapsed().as_secs_f64() * 1e3);
    }
    t.sort_by(f64::total_cmp);
    Ok(t[LATENCY_RUNS / 2])
}

/// Sizes and tract latencies of the float model (read again from `path`, raised to `to`),
/// `all` (every node of the plan quantized) and `written`, on the first evaluation sample.
fn fallback_cost(
    path: &Path,
    to: Option<i64>,
    all: &Model,
    written: &Model,
    eval: &dyn SampleSource,
) -> Result<crate::quant::target::FallbackCost> {
    let _p = progress::phase("timing the float, all-quantized and written models in tract");
    let sample = eval.read(0)?.into_owned().inputs;
    let latency_float_ms = median_ms(&reference_runner(path, to, &sample)?, &sample)?;
    let latency_all_quantized_ms = median_ms(&Runner::new(all, &sample, &[])?, &sample)?;
    let latency_ms = median_ms(&Runner::new(written, &sample, &[])?, &sample)?;
    Ok(crate::quant::target::FallbackCost {
        size_all_quantized: protobuf::Message::compute_size(&all.proto),
        size: protobuf::Message::compute_size(&written.proto),
        latency_float_ms,
        latency_all_quantized_ms,
        latency_ms,
        latency_runs: LATENCY_RUNS,
    })
}

/// `qfold quantize`: fuses, calibrates on tract, emits QDQ (or QOperator), evaluates against
/// the float model and writes the result unless `job.check` is set and the SQNR is too low.
pub fn quantize_file(
    model_path: &Path,
    dest: &Destination,
    job: QuantizeJob,
) -> Result<QuantizeOutput> {
    if let CalibrationData::Inputs(i) = &job.calibration {
        i.check_count("--calib-random")?;
    }
    if job.allow_contrib_ops && !job.qoperator {
        return Err(Error::Usage(
            "--allow-contrib-ops needs --format qoperator".into(),
        ));
    }
    if let Some(p) = &job.save_ranges {
        crate::files::check_destination(p)?;
    }
    let model = load(model_path)?;
    check_order(&model)?;
    dest.check_against(&model)?;
    if let Some(p) = &job.save_ranges {
        crate::files::check_side_output("--save-ranges", p, &model.files, &dest.path)?;
    }
    // the encoded size (tensor data included), computed without encoding
    let size_before = protobuf::Message::compute_size(&model.proto);
    let float_outputs = output_names(&model);
    let (calib, loaded): (Box<dyn SampleSource>, _) = match job.calibration {
        CalibrationData::Inputs(i) => (i.open(&model)?, None),
        CalibrationData::Ranges(p) => (Box::new(Vec::<Case>::new()), Some(p)),
    };
    let (eval_cases, eval_source): (Option<Box<dyn SampleSource>>, String) = match job.eval {
        EvalData::Inputs { inputs, source } => (Some(inputs.open(&model)?), source),
        EvalData::Random { seed, shapes } => {
            let n = (calib.len() / 5).max(2);
            let cases = verify::random_cases(
                &model,
                n,
                seed.wrapping_add(1),
                &verify::parse_input_shapes(&shapes)?,
            )?;
            (Some(Box::new(cases)), format!("{n} fresh random samples"))
        }
        EvalData::Calibration => (None, "the calibration data (no --eval given)".into()),
    };
    let ranges_file;
    let mut options = job.options.clone();
    let mut target = None;
    let mut all_quantized = None;
    let calibration = match (&loaded, &job.target) {
        (Some(_), Some(_)) => {
            return Err(Error::Usage(
                "--target-sqnr / --target-accuracy calibrate: give --calib, not --ranges".into(),
            ))
        }
        (Some(p), None) => {
            ranges_file = Ranges::load(p)?;
            Calibration::Ranges(&ranges_file)
        }
        (None, Some(_)) if options.output_bias_correction => {
            return Err(Error::Usage(
                "--output-bias-correction is not combined with --target-sqnr / --target-accuracy \
                 (the search would have to correct every variant): use --bias-correction"
                    .into(),
            ))
        }
        (None, Some(t)) => {
            let eval = eval_cases.as_deref().unwrap_or(calib.as_ref());
            // (the search corrects biases as the model written will be corrected)
            let prepared = crate::quant::prepare_on(&model, &options, calib.as_ref())?;
            let reference = analysis_reference(&model, &prepared)?;
            let cases = crate::quant::analyze::take_samples(eval, t.samples)?;
            let taken = cases.len();
            let cases = crate::quant::analyze::take_samples(
                &verify::Realizations::new(&cases, t.realizations),
                0,
            )?;
            let evaluator = Evaluator::new(&reference, cases, options.threads)?;
            drop(reference);
            // a state met on fewer samples than the evaluation data holds is checked on all
            // of them, as the model written will be judged
            let upgrade_to = prepared.upgraded.as_ref().map(|u| u.1);
            let whole = verify::Realizations::new(eval, t.realizations);
            let mut check = |m: &Model| -> Result<crate::quant::analyze::Score> {
                let e = evaluate(
                    &float_outputs,
                    &mut |s| reference_runner(model_path, upgrade_to, s),
                    m,
                    &whole,
                    0.0,
                    String::new(),
                )?;
                Ok(crate::quant::analyze::Score::worst_of(
                    &e.comparison.outputs,
                    e.quantized_accuracy,
                ))
            };
            let found = crate::quant::target::search(
                &prepared,
                &options,
                calib.as_ref(),
                &evaluator,
                t.goal,
                (taken < eval.len()).then_some(&mut check as &mut dyn FnMut(&Model) -> _),
            )?;
            options
                .prepared_exclude
                .extend(found.exclude.iter().cloned());
            ranges_file = found.ranges;
            all_quantized = found.all_quantized;
            let mut report = found.report;
            report.samples = taken;
            report.realizations = t.realizations;
            target = Some(report);
            Calibration::Chosen {
                ranges: &ranges_file,
                samples: calib.as_ref(),
            }
        }
        (None, None) => Calibration::Source(calib.as_ref()),
    };
    // the channel-affine folds, kept unless leaving them out measures better
    let affine_folding_choice = match (
        &calibration,
        options.fuse && !options.no_affine_folding && options.affine_folding_measured,
    ) {
        (Calibration::Source(c), true) => {
            let choice = crate::quant::choose_affine_folding(&model, *c, &options)?;
            if let Some(ch) = &choice {
                options.no_scalar_affine_folding = !ch.folded;
            }
            choice
        }
        _ => None,
    };
    // the tract preset's equalization, kept where it measures better
    let equalize_choice = match (&calibration, options.equalize && options.equalize_measured) {
        (Calibration::Source(c), true) => {
            let choice = crate::quant::equalize::choose(&model, *c, &options)?;
            options.equalize = choice.equalized;
            Some(choice)
        }
        _ => None,
    };
    // The model itself becomes the quantized one (no copy); the float reference of the
    // evaluation is read again from its file.
    let (mut quantized, ranges, mut report) = quantize_owned(model, calibration, &options)?;
    // the options the user gave; the exclusions the search added are in the target report
    report.options = job.options.clone();
    let layers = match job.report_layers {
        Some(n) => {
            let eval = eval_cases.as_deref().unwrap_or(calib.as_ref());
            let source = eval_source.clone();
            Some(analyze_with_ranges(
                &load(model_path)?,
                calib.as_ref(),
                &ranges,
                &job.options,
                eval,
                n,
                source,
            )?)
        }
        None => None,
    };
    let mut conversion = if job.qoperator {
        Some(crate::quant::qoperator::convert(&mut quantized)?)
    } else {
        None
    };
    if let Some(p) = &job.save_ranges {
        ranges.save(p)?;
    }
    // The float reference at the opset quantization raised it to (the same function, in a
    // form tract runs where it may not run the old ops).
    let upgrade_to = report.qdq.opset.map(|(_, to)| to);
    let eval_cases = eval_cases.as_deref().unwrap_or(calib.as_ref());
    // with a target, on the realizations the search scored on
    let realizations = job.target.as_ref().map_or(1, |t| t.realizations);
    let eval_source = if realizations > 1 {
        format!("{eval_source}, {realizations} realizations (inputs scaled by 1, 1 + 2^-20, ...)")
    } else {
        eval_source
    };
    let evaluation = evaluate(
        &float_outputs,
        &mut |s| reference_runner(model_path, upgrade_to, s),
        &quantized,
        &verify::Realizations::new(eval_cases, realizations),
        job.min_sqnr,
        eval_source,
    )?;
    // what the nodes a target left float cost, in the form written
    if let (Some(r), Some(mut all)) = (target.as_mut(), all_quantized.take()) {
        if job.qoperator {
            crate::quant::qoperator::convert(&mut all)?;
        }
        r.cost = Some(fallback_cost(
            model_path, upgrade_to, &all, &quantized, eval_cases,
        )?);
    }
    let mut notes = calib.notes();
    for n in eval_cases.notes() {
        if !notes.contains(&n) {
            notes.push(n);
        }
    }
    if job.allow_contrib_ops {
        // evaluated above on the standard-domain model tract can run; now the contrib islands
        let extra = convert_with(
            &mut quantized,
            ConvertOptions {
                allow_contrib_ops: true,
            },
        )?;
        if let Some(c) = conversion.as_mut() {
            c.converted.extend(extra.converted);
            c.float_islands = extra.float_islands;
            c.quantize_linear_left = extra.quantize_linear_left;
            c.dequantize_linear_left = extra.dequantize_linear_left;
        }
    }
    let size_after = protobuf::Message::compute_size(&quantized.proto);
    // The target is judged on the whole evaluation set, in tract.
    let target_failure = match (&job.target, &mut target) {
        (Some(t), Some(r)) => {
            let score = crate::quant::analyze::Score::worst_of(
                &evaluation.comparison.outputs,
                evaluation.quantized_accuracy,
            );
            r.met = t.goal.met(&score);
            (!r.met).then(|| {
                format!(
                    "the target ({}) is not reached: the best model found, with {} node(s) left \
                     float, has {} on {}{}",
                    goal_text(&t.goal),
                    r.fallback.len(),
                    score_text(&score),
                    evaluation.source,
                    if t.write_best {
                        "; written all the same (--write-best)"
                    } else {
                        "; nothing written (--write-best writes it)"
                    }
                )
            })
        }
        _ => None,
    };
    let passed = (!job.check || evaluation.comparison.passed)
        && (target_failure.is_none() || job.target.as_ref().is_some_and(|t| t.write_best));
    if passed {
        dest.save(&quantized)?;
    }
    Ok(QuantizeOutput {
        quantization: report,
        evaluation,
        size_before,
        size_after,
        conversion,
        layers,
        target,
        equalize_choice,
        affine_folding_choice,
        written: dest.written(passed),
        notes,
        min_sqnr: job.min_sqnr,
        target_failure,
    })
}

/// The report of `qfold upgrade --json`.
#[derive(Debug, Clone, Serialize)]
pub struct UpgradeOutput {
    pub upgrade: crate::graph::upgrade::UpgradeReport,
    pub check: Option<Comparison>,
    /// The path written, `None` when the check failed.
    pub written: Option<String>,
}

impl UpgradeOutput {
    /// The error to show when the check failed (nothing was written).
    pub fn failure(&self) -> Option<String> {
        check_failure(self.check.as_ref(), "the original")
    }
}

/// `qfold upgrade`: raises the model's default-domain opset to `opset`
/// ([`crate::graph::upgrade::upgrade`]), checks the result against the original in tract when
/// asked (the same check as `fuse --check`; tract must be able to run the original, which it
/// cannot for Upsample), and writes it to `dest` unless the check failed.
pub fn upgrade_file(
    model: &Path,
    dest: &Destination,
    opset: i64,
    check: Option<FuseCheck>,
) -> Result<UpgradeOutput> {
    if let Some(c) = &check {
        c.inputs.check_count("--random")?;
    }
    let original = crate::onnx::load(model)?;
    dest.check_against(&original)?;
    let mut upgraded = original.clone();
    let report = crate::graph::upgrade::upgrade(&mut upgraded, opset).map_err(|e| match e {
        Error::Usage(m) => Error::Usage(format!("{}: {m}", model.display())),
        other => other,
    })?;
    let comparison = match check {
        Some(c) => {
            let criterion: Criterion = match &c.tolerance {
                None => tolerance::for_model(&original),
                Some(t) => tolerance::by_name(t).ok_or_else(|| {
                    Error::Usage(format!("--tolerance {t}: use exact, float, half or loose"))
                })?,
            };
            let cases = c.inputs.resolve(&original)?;
            Some(verify::compare_models(
                &original, &upgraded, &cases, criterion,
            )?)
        }
        None => None,
    };
    let passed = comparison.as_ref().is_none_or(|c| c.passed);
    if passed {
        dest.save(&upgraded)?;
    }
    Ok(UpgradeOutput {
        upgrade: report,
        check: comparison,
        written: dest.written(passed),
    })
}

/// The report of `qfold analyze --json`.
#[derive(Debug, Clone, Serialize)]
pub struct AnalyzeOutput {
    pub options: QuantizeOptions,
    pub calibration_samples: usize,
    pub analysis: LayerAnalysis,
    /// How the calibration and evaluation data were read.
    /// (always present, `[]` when there is nothing to say: a stable key for scripts)
    pub notes: Vec<String>,
}

/// Prepares `model` as `quantize` does, takes `ranges` (no calibration), and analyzes every
/// quantized tensor on `samples` samples of `eval` (0: all).
fn analyze_with_ranges(
    model: &Model,
    calib: &dyn SampleSource,
    ranges: &Ranges,
    opts: &QuantizeOptions,
    eval: &dyn SampleSource,
    samples: usize,
    source: String,
) -> Result<LayerAnalysis> {
    let mut opts = opts.clone();
    // bias correction changed the weights' biases only; the analysis is of the same plan
    opts.bias_correction = false;
    opts.output_bias_correction = false;
    let prepared = crate::quant::prepare_on(model, &opts, calib)?;
    let (ranges, _) =
        crate::quant::calibrate_prepared(&prepared, Calibration::Ranges(ranges), &opts)?;
    let reference = analysis_reference(model, &prepared)?;
    let cases = crate::quant::analyze::take_samples(eval, samples)?;
    let evaluator = Evaluator::new(&reference, cases, opts.threads)?;
    crate::quant::analyze::analyze(&prepared, &ranges, &opts, &evaluator, source)
}

/// The float model variants are compared with: the original, at the opset quantization raised
/// it to.
fn analysis_reference<'m>(
    model: &'m Model,
    prepared: &crate::quant::Prepared,
) -> Result<std::borrow::Cow<'m, Model>> {
    Ok(match prepared.upgraded {
        Some((_, to, _)) => {
            let mut m = model.clone();
            crate::graph::upgrade::upgrade(&mut m, to)?;
            std::borrow::Cow::Owned(m)
        }
        None => std::borrow::Cow::Borrowed(model),
    })
}

/// `qfold analyze`: calibrates `model` once with `settings`, then measures every quantized
/// tensor on `samples` samples (0: all) of `eval` (default: the calibration data).
pub fn analyze_file(
    model_path: &Path,
    settings: &QuantizeSettings,
    calibration: Inputs,
    eval: Option<(Inputs, String)>,
    samples: usize,
) -> Result<AnalyzeOutput> {
    calibration.check_count("--calib-random")?;
    let opts = settings.options()?;
    if opts.bias_correction || opts.output_bias_correction {
        return Err(Error::Usage(format!(
            "analyze measures the plain quantization: drop --{}bias-correction",
            if opts.bias_correction { "" } else { "output-" }
        )));
    }
    let model = load(model_path)?;
    check_order(&model)?;
    let calib = calibration.open(&model)?;
    let (eval, source) = match eval {
        Some((i, s)) => (Some(i.open(&model)?), s),
        None => (None, "the calibration data (no --eval given)".into()),
    };
    let prepared = crate::quant::prepare_on(&model, &opts, calib.as_ref())?;
    let (ranges, _) =
        crate::quant::calibrate_prepared(&prepared, Calibration::Source(calib.as_ref()), &opts)?;
    let eval_source = eval.as_deref().unwrap_or(calib.as_ref());
    let reference = analysis_reference(&model, &prepared)?;
    let cases = crate::quant::analyze::take_samples(eval_source, samples)?;
    let evaluator = Evaluator::new(&reference, cases, opts.threads)?;
    let analysis = crate::quant::analyze::analyze(&prepared, &ranges, &opts, &evaluator, source)?;
    let mut notes = calib.notes();
    for n in eval_source.notes() {
        if !notes.contains(&n) {
            notes.push(n);
        }
    }
    Ok(AnalyzeOutput {
        options: opts,
        calibration_samples: ranges.samples,
        analysis,
        notes,
    })
}
