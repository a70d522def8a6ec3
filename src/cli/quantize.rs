//! `qfold quantize MODEL -o OUT [...]`: fuse, calibrate on tract, emit QDQ, evaluate.

use std::path::PathBuf;

use qfold::commands::{
    quantize_file, CalibrationData, EvalData, Evaluation, Inputs, QuantizeJob, TargetJob,
};
use qfold::quant::QuantizeReport;
use qfold::verify;
use qfold::{Error, Result};

#[derive(clap::Args)]
pub struct Args {
    /// The float model.
    model: PathBuf,
    /// Where to write the quantized model.
    #[arg(short, long, required_unless_present = "in_place")]
    output: Option<PathBuf>,
    #[command(flatten)]
    out: super::OutputArgs,
    /// Output format (default: qoperator for the tract preset, qdq otherwise).
    #[arg(long, value_enum, ignore_case = true)]
    format: Option<super::FormatArg>,
    /// Calibration data, a folder or a file: test_data_set_N folders, .npy/.npz arrays, or
    /// images (JPEG, PNG, BMP, WebP; see the preprocessing flags). Every sample calibrates.
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
    #[command(flatten)]
    settings: super::settings::SettingsArgs,
    /// Save the calibrated ranges to this JSON file.
    #[arg(long, value_name = "FILE")]
    save_ranges: Option<PathBuf>,
    /// Use ranges saved by --save-ranges instead of calibrating.
    #[arg(long, value_name = "FILE")]
    ranges: Option<PathBuf>,
    /// Evaluation data (same forms as --calib; labels.npy or class subfolders give accuracy).
    /// Without it, the quantized model is evaluated on the calibration data.
    #[arg(long)]
    eval: Option<PathBuf>,
    /// Fail (exit 1, write nothing) when the SQNR of an output against the float model is
    /// below --min-sqnr.
    #[arg(long)]
    check: bool,
    /// SQNR threshold of the evaluation (and --check), in dB [default: the --target-sqnr
    /// when given, else 20].
    #[arg(long, value_name = "DB")]
    min_sqnr: Option<f64>,
    /// With --format qoperator: also emit ONNX Runtime's com.microsoft QLinearAdd, QLinearMul,
    /// QLinearConcat and QLinearGlobalAveragePool. tract cannot run them: the evaluation then
    /// runs on the standard-domain model and the written model is for ONNX Runtime.
    #[arg(long)]
    allow_contrib_ops: bool,
    /// Also print the per-tensor sensitivity table of `qfold analyze` (its variants run on
    /// --samples evaluation samples).
    #[arg(long)]
    report_layers: bool,
    /// With --report-layers or a target: evaluation samples (runs of the model) each variant
    /// runs on (0: all).
    #[arg(long, value_name = "N", default_value_t = qfold::quant::analyze::DEFAULT_SAMPLES)]
    samples: usize,
    /// Leave float the fewest, least costly layers (after choosing each activation's
    /// calibration method) until the worst output's SQNR against float reaches DB on the
    /// evaluation data; exit 1 and write nothing when no model reaches it.
    #[arg(long, value_name = "DB")]
    target_sqnr: Option<f64>,
    /// As --target-sqnr, for top-1 accuracy (percent) on labelled evaluation data.
    #[arg(long, value_name = "PCT")]
    target_accuracy: Option<f64>,
    /// With a target: at least this percentage of the Conv / ConvTranspose / Gemm / MatMul
    /// nodes stays quantized (a target that needs more fallback is unreachable).
    #[arg(long, value_name = "PCT", default_value_t = 50.0)]
    min_quantized: f64,
    /// With a target: write the best model found even when it misses the target (exit 1).
    #[arg(long)]
    write_best: bool,
    /// With a target: score each variant, and the model written, on N realizations of the
    /// evaluation samples pooled: as given, then with float inputs scaled by 1 + 2^-20,
    /// 1 - 2^-20, ... A quantized model's SQNR on a few samples is one draw of its rounding
    /// flips (PP-OCR cls: 25.98 dB as given, 21.54 with inputs scaled by 1 + 1e-6); 1 scores
    /// the samples as given.
    #[arg(long, value_name = "N", default_value_t = qfold::commands::DEFAULT_REALIZATIONS)]
    realizations: usize,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    data: super::data::PreprocessArgs,
}

/// The evaluation's SQNR criterion without --min-sqnr or --target-sqnr, dB.
const DEFAULT_MIN_SQNR: f64 = 20.0;

/// The tract preset's measured choice of equalization.
fn print_equalize_choice(c: &qfold::quant::equalize::EqualizeChoice) {
    let db = |s: Option<f64>| s.map_or("inf".to_string(), |d| format!("{d:.2}"));
    println!(
        "equalization {} (the preset's choice, measured on {} calibration samples: {} dB with, {} dB without)",
        if c.equalized { "kept" } else { "left out" },
        c.samples,
        db(c.sqnr_with_db),
        db(c.sqnr_without_db)
    );
}

/// The measured choice of the channel-affine folds.
fn print_affine_folding_choice(c: &qfold::quant::AffineFoldingChoice) {
    let db = |s: Option<f64>| s.map_or("inf".to_string(), |d| format!("{d:.2}"));
    println!(
        "single-value channel-affine folds ({}) {} (measured on {} calibration samples: {} dB with, {} dB without; --affine-folding / --no-affine-folding decide without measuring)",
        c.folds,
        if c.folded { "kept" } else { "left out" },
        c.samples,
        db(c.sqnr_with_db),
        db(c.sqnr_without_db)
    );
}

fn print(r: &QuantizeReport, e: &Evaluation, before: u64, after: u64, notes: &[String]) {
    if let Some(f) = &r.fusion {
        println!(
            "fused {} groups ({} BatchNormalization folded)",
            f.groups.len(),
            f.bn_before - f.bn_after
        );
    }
    let o = &r.options;
    println!(
        "preset {}: activations {}{}{}, weights {} {}, method {}, bias {}",
        o.preset,
        o.activation,
        if o.symmetric_activations {
            " symmetric"
        } else {
            " asymmetric"
        },
        if o.reduce_range { " reduce-range" } else { "" },
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
    for n in notes {
        println!("  note: {n}");
    }
    println!(
        "quantized {} nodes: {} activations, {} weights, {} biases; {} Relu/Clip absorbed",
        r.plan.quantized.len(),
        r.qdq.activations,
        r.qdq.weights,
        r.qdq.biases,
        r.qdq.absorbed.len()
    );
    if !r.plan.float.is_empty() {
        println!(
            "  float: {} nodes ({} op types, by node in --json):",
            r.plan.float.len(),
            r.plan.float_by_op.len()
        );
        for line in r.plan.float_summary() {
            println!("    {line}");
        }
    }
    for b in &r.qdq.bias_adjustments {
        println!("  bias: {b}");
    }
    if !r.decomposed.is_empty() {
        println!(
            "  {} HardSwish quantized as x * HardSigmoid(x) (as ONNX Runtime's pre-processing does)",
            r.decomposed.len()
        );
    }
    if !r.gemm_from_matmul.is_empty() {
        println!(
            "  {} MatMul + bias Add quantized as one Gemm (as ONNX Runtime's pre-processing does)",
            r.gemm_from_matmul.len()
        );
    }
    if let Some((a, b)) = r.qdq.opset {
        println!("  opset raised from {a} to {b}");
    }
    println!(
        "evaluated on {} ({} runs of the model):",
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

fn target(a: &Args) -> Result<Option<TargetJob>> {
    let flag = |f: &str| format!("--{f}");
    TargetJob::checked(
        a.target_sqnr,
        a.target_accuracy,
        a.min_quantized,
        a.samples,
        a.write_best,
        &flag,
        " ",
    )?
    .map(|t| t.with_realizations(a.realizations, &flag, " "))
    .transpose()
}

fn print_target(t: &qfold::quant::target::TargetReport) {
    println!(
        "target search on {} samples{}{} ({} variants): methods {}; kept {}",
        t.samples,
        if t.realizations > 1 {
            format!(" x {} realizations", t.realizations)
        } else {
            String::new()
        },
        if t.bias_correction {
            ", biases corrected"
        } else {
            ""
        },
        t.variants,
        t.methods
            .iter()
            .map(|m| format!(
                "{} {}",
                m.method,
                m.score
                    .sqnr_db
                    .map_or("exact".to_string(), |d| format!("{d:.2} dB"))
            ))
            .collect::<Vec<_>>()
            .join(", "),
        t.method
    );
    for f in &t.fallback {
        println!(
            "  left float: {} ({}): {}, then {}",
            f.node,
            f.op_type,
            f.reason,
            f.score
                .sqnr_db
                .map_or("exact".to_string(), |d| format!("{d:.2} dB"))
        );
    }
    if !t.restored.is_empty() {
        println!("  tried float, not needed: {}", t.restored.join(", "));
    }
    let score = |s: &qfold::quant::analyze::Score| {
        let db = s
            .sqnr_db
            .map_or("exact".to_string(), |d| format!("{d:.2} dB"));
        match s.accuracy {
            Some(a) => format!("{db}, top-1 {:.2}%", 100.0 * a),
            None => db,
        }
    };
    for c in &t.checks {
        let raised = match (c.raised_sqnr_db, c.raised_accuracy) {
            (None, None) => String::new(),
            (d, a) => format!(
                "; missed: the search goes on for {} on its samples",
                d.map(|d| format!("{d:.2} dB"))
                    .into_iter()
                    .chain(a.map(|a| format!("top-1 {:.2}%", 100.0 * a)))
                    .collect::<Vec<_>>()
                    .join(" and ")
            ),
        };
        println!(
            "  checked on the whole evaluation data, {} node(s) left float: {} ({} on the search samples){}",
            c.left_float,
            score(&c.score),
            score(&c.search_score),
            raised
        );
    }
    if let Some(c) = &t.cost {
        println!(
            "  cost of the fallback: {} bytes against {} with every node quantized ({:+.1}%); \
             tract latency (first evaluation sample, median of {}): float {:.2} ms, every node \
             quantized {:.2} ms, this model {:.2} ms",
            c.size,
            c.size_all_quantized,
            100.0 * (c.size as f64 / c.size_all_quantized.max(1) as f64 - 1.0),
            c.latency_runs,
            c.latency_float_ms,
            c.latency_all_quantized_ms,
            c.latency_ms
        );
    }
    println!(
        "  Conv/ConvTranspose/Gemm/MatMul quantized: {} of {} ({:.1}%)",
        t.compute_quantized,
        t.compute_nodes,
        100.0 * t.compute_quantized as f64 / t.compute_nodes.max(1) as f64
    );
}

pub fn run(a: Args) -> Result<i32> {
    let settings = a.settings.settings(a.format.as_ref().map(super::spelling));
    let qoperator = settings.qoperator()?;
    let opts = settings.options()?;
    a.settings.check(&opts)?;
    let dest = a.out.destination(&a.model, a.output.as_deref())?;
    verify::parse_input_shapes(&a.input_shape)?;
    let calibration = match (&a.calib, a.calib_random, &a.ranges) {
        (Some(path), _, _) => CalibrationData::Inputs(Inputs::Data {
            path: path.clone(),
            preprocess: a.data.preprocess(),
        }),
        (None, Some(count), _) => CalibrationData::Inputs(Inputs::Random {
            count,
            seed: a.seed,
            shapes: a.input_shape.clone(),
        }),
        (None, None, Some(p)) => CalibrationData::Ranges(p.clone()),
        (None, None, None) => {
            return Err(Error::Usage(
                "give calibration data: --calib DIR, --calib-random N, or --ranges FILE".into(),
            ))
        }
    };
    let eval = match (&a.eval, &a.calib) {
        (Some(path), _) => EvalData::Inputs {
            inputs: Inputs::Data {
                path: path.clone(),
                preprocess: a.data.preprocess(),
            },
            source: path.display().to_string(),
        },
        (None, Some(_)) if a.calib_random.is_none() => EvalData::Calibration,
        (None, _) => EvalData::Random {
            seed: a.seed,
            shapes: a.input_shape.clone(),
        },
    };
    let job = QuantizeJob {
        options: opts,
        qoperator,
        allow_contrib_ops: a.allow_contrib_ops,
        calibration,
        eval,
        save_ranges: a.save_ranges.clone(),
        check: a.check,
        min_sqnr: a.min_sqnr.or(a.target_sqnr).unwrap_or(DEFAULT_MIN_SQNR),
        report_layers: a.report_layers.then_some(a.samples),
        target: target(&a)?,
    };
    let out = quantize_file(&a.model, &dest, job)?;
    Ok(super::finish(
        a.json,
        &out,
        || {
            print(
                &out.quantization,
                &out.evaluation,
                out.size_before,
                out.size_after,
                &out.notes,
            );
            if let Some(c) = &out.affine_folding_choice {
                print_affine_folding_choice(c);
            }
            if let Some(c) = &out.equalize_choice {
                print_equalize_choice(c);
            }
            if let Some(c) = &out.conversion {
                super::convert::print_report(c);
            }
            if let Some(t) = &out.target {
                print_target(t);
            }
            if let Some(l) = &out.layers {
                super::analyze::print_table(l, usize::MAX);
            }
        },
        None,
        "the float model",
        out.written.as_deref(),
        out.failure(),
    ))
}
