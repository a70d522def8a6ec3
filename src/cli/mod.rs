//! clap definitions and dispatch. Exit codes: 0 ok, 1 a check failed, 2 usage or input error.

mod analyze;
mod check;
mod convert;
mod data;
mod fuse;
mod inspect;
mod quantize;
mod settings;
mod upgrade;

use std::path::Path;

use clap::{Parser, Subcommand};

/// Exit code: success.
pub const OK: i32 = 0;
/// Exit code: a check ran and failed.
pub const CHECK_FAILED: i32 = 1;
/// Exit code: bad usage or bad input.
pub const USAGE: i32 = 2;

#[derive(Parser)]
#[command(
    name = "qfold",
    version,
    about = "Fuse and quantize ONNX models, checked in tract"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Print nothing on stderr but errors (no progress, no notes).
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    quiet: bool,
    /// Also print each phase's duration and details meant for debugging.
    #[arg(short, long, global = true)]
    verbose: bool,
}

#[derive(Subcommand)]
enum Command {
    /// What is inside a model.
    Inspect(inspect::Args),
    /// Fold BatchNormalization and record fusion groups (PyTorch eager fuse_modules).
    Fuse(fuse::Args),
    /// Calibrate on tract and write a QDQ-quantized model.
    Quantize(Box<quantize::Args>),
    /// Rewrite a QDQ model into QOperator form (QLinearConv, QLinearMatMul, 8-bit data movement).
    Convert(convert::Args),
    /// Run two models (or one model against stored outputs) in tract and compare.
    Check(check::Args),
    /// Raise a model's opset, rewriting every op that changed on the way.
    Upgrade(upgrade::Args),
    /// Per-tensor quantization sensitivity: which tensor costs the model its accuracy.
    Analyze(Box<analyze::Args>),
}

/// `--preset`: named settings.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum PresetArg {
    /// uint8 asymmetric activations (MinMax), int8 symmetric per-channel weights, int32 bias.
    Qfold,
    /// ONNX Runtime quantize_static's defaults: as qfold, per-tensor weights.
    Ort,
    /// PyTorch's fbgemm (x86) qconfig: histogram (L2) activations with reduce-range.
    Fbgemm,
    /// Same as fbgemm.
    X86,
    /// PyTorch's qnnpack qconfig: histogram (L2) activations, per-tensor weights.
    Qnnpack,
    /// TensorRT: symmetric int8 activations (entropy), Relu kept, float bias.
    Tensorrt,
    /// tract: per-tensor weights, MinMax, QOperator output.
    Tract,
}

/// `--method`: how a tensor's range is chosen from what calibration observed.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum MethodArg {
    /// The observed minimum and maximum.
    Minmax,
    /// PyTorch's moving-average min/max (constant 0.01).
    MovingAverage,
    /// Clip the histogram's tails (--percentile).
    Percentile,
    /// Minimize the KL divergence (TensorRT / ORT entropy).
    Entropy,
    /// Minimize the expected L2 error (PyTorch's HistogramObserver).
    L2,
}

/// `--format`: the quantized model's form.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum FormatArg {
    /// QuantizeLinear / DequantizeLinear pairs around float ops.
    Qdq,
    /// QLinearConv, QLinearMatMul and 8-bit data movement.
    Qoperator,
}

/// `--activation`, `--weight`: an 8-bit integer type.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum QTypeArg {
    U8,
    I8,
}

/// `--tolerance`: named tolerance levels.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum ToleranceArg {
    /// Bit-identical.
    Exact,
    /// 1e-5 absolute, 1e-4 relative.
    Float,
    /// 1e-2 absolute and relative (float16).
    Half,
    /// 1e-3 absolute, 1e-2 relative.
    Loose,
}

/// The command line's spelling of a value (what the library's settings take).
pub fn spelling<E: clap::ValueEnum>(e: &E) -> String {
    e.to_possible_value()
        .map(|v| v.get_name().to_string())
        .unwrap_or_default()
}

/// Where a written model keeps its tensors.
#[derive(clap::Args, Debug, Clone)]
pub struct OutputArgs {
    /// Write every tensor of at least this many bytes to `<output>.data` (external data).
    /// Default: tensors external in the input stay external, and the largest move out only
    /// when the model would pass protobuf's 2 GiB limit.
    #[arg(long, value_name = "BYTES")]
    external_data_threshold: Option<usize>,
    /// Replace the input model with the result (`-o` may then be left out). Without it, an
    /// output that is the input model or one of its files is refused. The input's external
    /// data file is replaced only once the new model and data are complete.
    #[arg(long)]
    in_place: bool,
}

impl OutputArgs {
    /// The save options these arguments stand for.
    pub fn save_options(&self) -> qfold::onnx::SaveOptions {
        qfold::onnx::SaveOptions {
            external: match self.external_data_threshold {
                Some(n) => qfold::onnx::ExternalData::Threshold(n),
                None => qfold::onnx::ExternalData::Keep,
            },
            ..Default::default()
        }
    }

    /// Where to write, checked before anything is loaded (see
    /// [`qfold::commands::Destination::new`]).
    pub fn destination(
        &self,
        model: &Path,
        output: Option<&Path>,
    ) -> qfold::Result<qfold::commands::Destination> {
        qfold::commands::Destination::new(model, output, self.in_place, self.save_options())
    }
}

/// Prints a report as one pretty JSON object with its `"schema"` key.
pub fn print_json<R: qfold::report::Report>(report: &R) {
    println!("{}", qfold::report::to_json(report, true));
}

/// How a rewriting command ends once the library has run it: the report as JSON or text
/// (with the check against `against`), then the exit code: 1 with `failure` on stderr when the
/// check failed (nothing was written, or, for quantize without --check, the model was written
/// but misses the criterion).
pub fn finish<R: qfold::report::Report>(
    json: bool,
    output: &R,
    print: impl FnOnce(),
    check: Option<&qfold::verify::Comparison>,
    against: &str,
    written: Option<&str>,
    failure: Option<String>,
) -> i32 {
    if json {
        print_json(output);
    } else {
        print();
        if let Some(c) = check {
            println!("check against {against} in tract:");
            check::print_comparison(c);
        }
    }
    if let (false, Some(w)) = (json, written) {
        println!("wrote {w}");
    }
    if let Some(f) = failure {
        eprintln!("error: {f}");
        return CHECK_FAILED;
    }
    OK
}

/// On SIGINT, SIGTERM or SIGHUP: remove the temporary files being written and exit 128 +
/// the signal number (130, 143, 129). SIGXFSZ (file size limit) is caught and ignored so the
/// write that passed the limit fails with an error and is cleaned up like any other failure.
#[cfg(unix)]
fn remove_temp_files_on_signals() {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGXFSZ};
    let Ok(mut signals) = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP, SIGXFSZ])
    else {
        return;
    };
    std::thread::spawn(move || {
        for sig in signals.forever() {
            if sig != SIGXFSZ {
                qfold::files::remove_temp_files_and_exit(128 + sig);
            }
        }
    });
}

#[cfg(not(unix))]
fn remove_temp_files_on_signals() {}

/// Runs the CLI and returns the process exit code.
pub fn main() -> i32 {
    remove_temp_files_on_signals();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { USAGE } else { OK };
        }
    };
    qfold::progress::set_verbosity(match (cli.quiet, cli.verbose) {
        (true, _) => qfold::progress::Verbosity::Quiet,
        (_, true) => qfold::progress::Verbosity::Verbose,
        _ => qfold::progress::Verbosity::Normal,
    });
    let (name, json) = match &cli.command {
        Command::Inspect(a) => ("inspect", a.json),
        Command::Check(a) => ("check", a.json),
        Command::Fuse(a) => ("fuse", a.json),
        Command::Quantize(a) => ("quantize", a.json),
        Command::Convert(a) => ("convert", a.json),
        Command::Upgrade(a) => ("upgrade", a.json),
        Command::Analyze(a) => ("analyze", a.json),
    };
    let result = match cli.command {
        Command::Inspect(a) => inspect::run(a),
        Command::Check(a) => check::run(a),
        Command::Fuse(a) => fuse::run(a),
        Command::Quantize(a) => quantize::run(*a),
        Command::Convert(a) => convert::run(a),
        Command::Upgrade(a) => upgrade::run(a),
        Command::Analyze(a) => analyze::run(*a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            if json {
                println!("{}", qfold::report::error_json(name, &e, USAGE));
            }
            eprintln!("error: {e}");
            USAGE
        }
    }
}
