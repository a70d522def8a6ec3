//! `qfold quantize MODEL -o OUT [...]`: fuse, calibrate on tract, emit QDQ, evaluate.

use std::path::PathBuf;

use qfold::onnx::Model;
use qfold::quant::calibrate::Ranges;
use qfold::quant::observe::Method;
use qfold::quant::params::QType;
use qfold::quant::{quantize, Calibration, Preset, QuantizeOptions, QuantizeReport};
use qfold::runtime::Runner;
use qfold::verify::{self, Case, Comparer, Comparison, Criterion};
use qfold::{Error, Result};
use serde::Serialize;

#[derive(clap::Args)]
pub struct Args {
    /// The float model.
    model: PathBuf,
    /// Where to write the quantized model.
    #[arg(short, long, required_unless_present = "in_place")]
    output: Option<PathBuf>,
    #[command(flatten)]
    out: super::OutputArgs,
    /// Output format: qdq (QuantizeLinear/DequantizeLinear pairs) or qoperator (QLinearConv,
    /// QLinearMatMul and 8-bit data movement, the form tract runs on integer kernels).
    /// Default: qoperator for the tract preset, qdq otherwise.
    #[arg(long)]
    format: Option<String>,
    /// Calibration data: test_data_set_N folders, or .npy/.npz files.
    #[arg(long, conflicts_with_all = ["calib_random", "ranges"])]
    calib: Option<PathBuf>,
    /// N random calibration samples from the declared input shapes.
    #[arg(long, value_name = "N")]
    calib_random: Option<usize>,
    /// Seed of random samples.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Shape of an input with symbolic dims: `name:1,3,224,224` (repeatable).
    #[arg(long = "input-shape", value_name = "NAME:DIMS")]
    input_shape: Vec<String>,
    /// Settings: qfold (default), ort, fbgemm (x86), qnnpack, tensorrt, tract.
    #[arg(long, default_value = "qfold")]
    preset: String,
    /// Range method: minmax, moving-average, percentile, entropy, l2 (default: the preset's).
    #[arg(long)]
    method: Option<String>,
    /// Percentile for --method percentile.
    #[arg(long, default_value_t = 99.999)]
    percentile: f64,
    /// Activation type: u8 or i8.
    #[arg(long)]
    activation: Option<String>,
    /// Weight type: i8 or u8.
    #[arg(long)]
    weight: Option<String>,
    /// Symmetric activations (zero point at the grid's middle; Relu is then kept).
    #[arg(long)]
    symmetric_activations: bool,
    /// Per-channel weight scales.
    #[arg(long, conflicts_with = "per_tensor")]
    per_channel: bool,
    /// One scale per weight tensor.
    #[arg(long)]
    per_tensor: bool,
    /// With per-channel weights, keep per tensor every weight that quantizes per tensor with at
    /// least this SQNR in dB (faster QLinearConv in tract).
    #[arg(long, value_name = "DB")]
    per_tensor_min_sqnr: Option<f64>,
    /// 7-bit activations (PyTorch fbgemm's reduce_range).
    #[arg(long)]
    reduce_range: bool,
    /// Leave this node or PyTorch module path float (repeatable).
    #[arg(long, value_name = "NAME")]
    exclude: Vec<String>,
    /// Leave these op types float: `--op-types Gemm,Add`.
    #[arg(long, value_name = "A,B")]
    op_types: Option<String>,
    /// Do not fuse before quantizing.
    #[arg(long)]
    no_fuse: bool,
    /// Keep constant subgraphs, Identity and inference Dropout nodes as they are (by default
    /// fusion folds and removes them first).
    #[arg(long)]
    no_constant_folding: bool,
    /// Save the calibrated ranges to this JSON file.
    #[arg(long, value_name = "FILE")]
    save_ranges: Option<PathBuf>,
    /// Use ranges saved by --save-ranges instead of calibrating.
    #[arg(long, value_name = "FILE")]
    ranges: Option<PathBuf>,
    /// Evaluation data (same forms as --calib; labels.npy gives accuracy). Without it, the last
    /// fifth of the calibration samples is held out.
    #[arg(long)]
    eval: Option<PathBuf>,
    /// Fail (exit 1, write nothing) when the SQNR of an output against the float model is
    /// below --min-sqnr.
    #[arg(long)]
    check: bool,
    /// SQNR threshold for --check, in dB.
    #[arg(long, default_value_t = 20.0)]
    min_sqnr: f64,
    /// With --format qoperator: also emit ONNX Runtime's com.microsoft QLinearAdd, QLinearMul,
    /// QLinearConcat and QLinearGlobalAveragePool. tract cannot run them: the evaluation then
    /// runs on the standard-domain model and the written model is for ONNX Runtime.
    #[arg(long)]
    allow_contrib_ops: bool,
    /// Calibration threads (0: every core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

fn qtype(s: &str, what: &str) -> Result<QType> {
    match s {
        "u8" | "uint8" => Ok(QType::U8),
        "i8" | "int8" => Ok(QType::I8),
        _ => Err(Error::Usage(format!("--{what} {s}: use u8 or i8"))),
    }
}

fn method(s: &str, percentile: f64) -> Result<Method> {
    Ok(match s {
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

fn options(a: &Args) -> Result<QuantizeOptions> {
    let preset = Preset::by_name(&a.preset).ok_or_else(|| {
        Error::Usage(format!(
            "--preset {}: use qfold, ort, fbgemm, x86, qnnpack, tensorrt or tract",
            a.preset
        ))
    })?;
    let mut o = preset.options();
    if let Some(m) = &a.method {
        o.method = method(m, a.percentile)?;
    }
    if let Some(t) = &a.activation {
        o.activation = qtype(t, "activation")?;
    }
    if let Some(t) = &a.weight {
        o.weight = qtype(t, "weight")?;
        o.symmetric_weights = o.weight == QType::I8;
    }
    if a.symmetric_activations {
        o.symmetric_activations = true;
    }
    if a.per_channel {
        o.per_channel = true;
    }
    if a.per_tensor {
        o.per_channel = false;
    }
    if a.reduce_range {
        o.reduce_range = true;
    }
    if let Some(db) = a.per_tensor_min_sqnr {
        o.per_tensor_min_sqnr = Some(db);
        o.per_channel = true;
    }
    o.exclude = a.exclude.clone();
    o.exclude_op_types = a
        .op_types
        .iter()
        .flat_map(|s| s.split(','))
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    o.fuse = !a.no_fuse;
    o.no_constant_folding = a.no_constant_folding;
    o.threads = a.threads;
    Ok(o)
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

fn evaluate(
    float: &Model,
    quantized: &Model,
    cases: &[Case],
    min_sqnr: f64,
    source: String,
) -> Result<Evaluation> {
    let names: Vec<String> = float
        .graph()
        .output
        .iter()
        .map(|o| o.name.clone())
        .collect();
    let mut cmp = Comparer::new(&names, Criterion::MinSqnr { db: min_sqnr });
    let (mut fc, mut qc, mut total) = (0, 0, 0);
    let mut runners: Option<(Runner, Runner)> = None;
    let mut shapes: Vec<Vec<usize>> = vec![];
    for c in cases {
        let s: Vec<Vec<usize>> = c.inputs.iter().map(|(_, t)| t.shape().to_vec()).collect();
        if runners.is_none() || s != shapes {
            runners = Some((
                Runner::new(float, &c.inputs, &[])?,
                Runner::new(quantized, &c.inputs, &[])?,
            ));
            shapes = s;
        }
        let (rf, rq) = runners.as_ref().expect("set above");
        let of = rf.run(&c.inputs)?;
        let oq = rq.run(&c.inputs)?;
        if let Some(l) = &c.labels {
            let (a, n) = verify::accuracy(&of, l);
            let (b, _) = verify::accuracy(&oq, l);
            fc += a;
            qc += b;
            total += n;
        }
        cmp.add(&of, &oq);
    }
    Ok(Evaluation {
        source,
        comparison: cmp.finish(),
        float_accuracy: (total > 0).then(|| fc as f64 / total as f64),
        quantized_accuracy: (total > 0).then(|| qc as f64 / total as f64),
        labelled: total,
    })
}

#[derive(Serialize)]
struct Output<'a> {
    quantization: &'a QuantizeReport,
    evaluation: &'a Evaluation,
    size_before: u64,
    size_after: u64,
    conversion: Option<&'a qfold::quant::qoperator::ConvertReport>,
    written: Option<String>,
}

fn print(r: &QuantizeReport, e: &Evaluation, before: u64, after: u64) {
    if let Some(f) = &r.fusion {
        println!(
            "fused {} groups ({} BatchNormalization folded)",
            f.groups.len(),
            f.bn_before - f.bn_after
        );
    }
    let o = &r.options;
    println!(
        "preset {:?}: activations {:?}{}{}, weights {:?} {}, method {:?}, bias {}",
        o.preset,
        o.activation,
        if o.symmetric_activations {
            " symmetric"
        } else {
            " asymmetric"
        },
        if o.reduce_range { " reduce_range" } else { "" },
        o.weight,
        if o.per_channel {
            "per-channel"
        } else {
            "per-tensor"
        },
        o.method,
        if o.int32_bias { "int32" } else { "float" }
    );
    println!(
        "calibration: {} samples (runs of the model){}",
        r.calibration_samples,
        if r.ranges_from_file {
            " (ranges from file)"
        } else {
            ""
        }
    );
    println!(
        "quantized {} nodes: {} activations, {} weights, {} biases; {} Relu/Clip absorbed",
        r.plan.quantized.len(),
        r.qdq.activations,
        r.qdq.weights,
        r.qdq.biases,
        r.qdq.absorbed.len()
    );
    for (n, why) in &r.plan.float {
        println!("  float: {n} ({why})");
    }
    for b in &r.qdq.bias_adjustments {
        println!("  bias: {b}");
    }
    if let Some((a, b)) = r.qdq.opset {
        println!("  opset raised from {a} to {b}");
    }
    println!(
        "evaluation on {} ({} runs of the model):",
        e.source, e.comparison.samples
    );
    super::check::print_comparison(&e.comparison);
    if let (Some(f), Some(q)) = (e.float_accuracy, e.quantized_accuracy) {
        println!(
            "accuracy on {} labelled rows: float {:.2}%, int8 {:.2}% ({:+.2} points)",
            e.labelled,
            100.0 * f,
            100.0 * q,
            100.0 * (q - f)
        );
    }
    let ratio = before as f64 / after.max(1) as f64;
    println!(
        "size {before} -> {after} bytes ({})",
        if ratio >= 1.0 {
            format!("{ratio:.1}x smaller")
        } else {
            format!(
                "{:.1}x larger: the quantization parameters outweigh the int8 savings",
                1.0 / ratio
            )
        }
    );
}

pub fn run(a: Args) -> Result<i32> {
    let default_format = if a.preset == "tract" {
        "qoperator"
    } else {
        "qdq"
    };
    let qoperator = match a.format.as_deref().unwrap_or(default_format) {
        "qdq" => false,
        "qoperator" => true,
        other => {
            return Err(Error::Usage(format!(
                "--format {other}: use qdq or qoperator"
            )))
        }
    };
    let opts = options(&a)?;
    let target = a.out.target(&a.model, a.output.as_deref())?;
    if let Some(n) = a.calib_random {
        verify::check_random_count("--calib-random", n)?;
    }
    let model = qfold::onnx::load(&a.model)?;
    a.out.check_against(&model, &target)?;
    if let Some(p) = &a.save_ranges {
        qfold::files::check_side_output("--save-ranges", p, &model.files, &target)?;
    }
    let shapes = verify::parse_input_shapes(&a.input_shape)?;
    let mut calib = match (&a.calib, a.calib_random) {
        (Some(dir), _) => verify::read_dataset(&model, dir)?,
        (None, Some(n)) => verify::random_cases(&model, n, a.seed, &shapes)?,
        (None, None) if a.ranges.is_some() => vec![],
        (None, None) => {
            return Err(Error::Usage(
                "give calibration data: --calib DIR, --calib-random N, or --ranges FILE".into(),
            ))
        }
    };
    let (eval_cases, eval_source) = if let Some(dir) = &a.eval {
        (
            verify::read_dataset(&model, dir)?,
            dir.display().to_string(),
        )
    } else if a.calib_random.is_some() || a.calib.is_none() {
        let n = (calib.len() / 5).max(2);
        let cases = verify::random_cases(&model, n, a.seed.wrapping_add(1), &shapes)?;
        (cases, format!("{n} fresh random samples"))
    } else if calib.len() >= 2 {
        let held = (calib.len() / 5).max(1);
        let cases = calib.split_off(calib.len() - held);
        (
            cases,
            format!("the last {held} calibration samples, held out"),
        )
    } else {
        (
            calib.clone(),
            "the calibration sample (too few to hold any out)".into(),
        )
    };
    let samples: Vec<_> = calib.iter().map(|c| c.inputs.clone()).collect();
    let loaded;
    let calibration = match &a.ranges {
        Some(p) => {
            loaded = Ranges::load(p)?;
            Calibration::Ranges(&loaded)
        }
        None => Calibration::Samples(&samples),
    };
    let (mut quantized, ranges, report) = quantize(&model, calibration, &opts)?;
    let mut conversion = if qoperator {
        Some(qfold::quant::qoperator::convert(&mut quantized)?)
    } else {
        None
    };
    if let Some(p) = &a.save_ranges {
        ranges.save(p)?;
    }
    let evaluation = evaluate(&model, &quantized, &eval_cases, a.min_sqnr, eval_source)?;
    if a.allow_contrib_ops {
        if !qoperator {
            return Err(Error::Usage(
                "--allow-contrib-ops needs --format qoperator".into(),
            ));
        }
        // evaluated above on the standard-domain model tract can run; now the contrib islands
        let extra = qfold::quant::qoperator::convert_with(
            &mut quantized,
            qfold::quant::qoperator::ConvertOptions {
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
    let before = model.to_bytes()?.len() as u64;
    let after = quantized.to_bytes()?.len() as u64;
    let passed = !a.check || evaluation.comparison.passed;
    if a.json {
        let out = Output {
            quantization: &report,
            evaluation: &evaluation,
            size_before: before,
            size_after: after,
            conversion: conversion.as_ref(),
            written: passed.then(|| target.display().to_string()),
        };
        println!(
            "{}",
            serde_json::to_string_pretty(&out).expect("report serializes")
        );
    } else {
        print(&report, &evaluation, before, after);
        if let Some(c) = &conversion {
            super::convert::print_report(c);
        }
    }
    if !passed {
        eprintln!(
            "error: SQNR below {} dB against the float model; nothing written",
            a.min_sqnr
        );
        return Ok(super::CHECK_FAILED);
    }
    a.out.save(&quantized, &target)?;
    if !a.json {
        println!("wrote {}", target.display());
    }
    Ok(super::OK)
}
