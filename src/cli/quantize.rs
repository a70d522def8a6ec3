//! `qfold quantize MODEL -o OUT [...]`: fuse, calibrate on tract, emit QDQ, evaluate.

use std::path::PathBuf;

use qfold::commands::{
    quantize_file, CalibrationData, EvalData, Evaluation, Inputs, QuantizeJob, QuantizeSettings,
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
    /// Named settings (the other options override them).
    #[arg(long, value_enum, ignore_case = true, default_value = "qfold")]
    preset: super::PresetArg,
    /// How each activation's range is chosen (default: the preset's).
    #[arg(long, value_enum, ignore_case = true)]
    method: Option<super::MethodArg>,
    /// Percentile for --method percentile, in (50, 100] [default: 99.999].
    #[arg(long)]
    percentile: Option<f64>,
    /// Activation type (default: the preset's).
    #[arg(long, value_enum, ignore_case = true)]
    activation: Option<super::QTypeArg>,
    /// Weight type (default: the preset's).
    #[arg(long, value_enum, ignore_case = true)]
    weight: Option<super::QTypeArg>,
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
    #[arg(long, value_name = "DB", conflicts_with = "per_tensor")]
    per_tensor_min_sqnr: Option<f64>,
    /// 7-bit activations (PyTorch fbgemm's reduce_range).
    #[arg(long)]
    reduce_range: bool,
    /// Leave this node or PyTorch module path float (repeatable).
    #[arg(long, value_name = "NAME")]
    exclude: Vec<String>,
    /// Leave these op types float: `--op-types Gemm,Add` (case-insensitive; a type no node
    /// has is an error).
    #[arg(long, value_name = "A,B")]
    op_types: Option<String>,
    /// Do not fuse before quantizing.
    #[arg(long)]
    no_fuse: bool,
    /// Keep constant subgraphs, Identity and inference Dropout nodes as they are (by default
    /// fusion folds and removes them first).
    #[arg(long)]
    no_constant_folding: bool,
    /// Treat initializers that are also graph inputs as constants (for IR >= 4 they are
    /// defaults a caller may override, so they are not folded otherwise).
    #[arg(long)]
    inputs_as_constants: bool,
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
    pub json: bool,
    #[command(flatten)]
    data: super::data::PreprocessArgs,
}

fn settings(a: &Args) -> QuantizeSettings {
    QuantizeSettings {
        preset: super::spelling(&a.preset),
        format: a.format.as_ref().map(super::spelling),
        method: a.method.as_ref().map(super::spelling),
        percentile: a.percentile.unwrap_or(99.999),
        activation: a.activation.as_ref().map(super::spelling),
        weight: a.weight.as_ref().map(super::spelling),
        symmetric_activations: a.symmetric_activations,
        per_channel: match (a.per_channel, a.per_tensor) {
            (true, _) => Some(true),
            (_, true) => Some(false),
            _ => None,
        },
        per_tensor_min_sqnr: a.per_tensor_min_sqnr,
        reduce_range: a.reduce_range,
        exclude: a.exclude.clone(),
        op_types: a.op_types.iter().cloned().collect(),
        fuse: !a.no_fuse,
        no_constant_folding: a.no_constant_folding,
        inputs_as_constants: a.inputs_as_constants,
        threads: a.threads,
    }
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

pub fn run(a: Args) -> Result<i32> {
    let settings = settings(&a);
    let qoperator = settings.qoperator()?;
    let opts = settings.options()?;
    if let (Some(p), false) = (
        a.percentile,
        matches!(
            opts.method,
            qfold::quant::observe::Method::Percentile { .. }
        ),
    ) {
        return Err(Error::Usage(format!(
            "--percentile {p} applies to --method percentile; the method is {}",
            opts.method.name()
        )));
    }
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
        min_sqnr: a.min_sqnr,
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
            if let Some(c) = &out.conversion {
                super::convert::print_report(c);
            }
        },
        None,
        "the float model",
        out.written.as_deref(),
        out.failure(),
    ))
}
