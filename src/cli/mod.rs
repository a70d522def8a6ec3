//! clap definitions and dispatch. Exit codes: 0 ok, 1 a check failed, 2 usage or input error.

mod check;
mod convert;
mod fuse;
mod inspect;
mod quantize;

use std::path::{Path, PathBuf};

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

    /// Saves `model` to `target` (from [`OutputArgs::target`]).
    pub fn save(&self, model: &qfold::onnx::Model, target: &Path) -> qfold::Result<()> {
        if self.in_place {
            qfold::onnx::save_in_place(model, target, &self.save_options())
        } else {
            qfold::onnx::save(model, target, &self.save_options())
        }
    }

    /// Where to write, checked before anything is loaded: `-o` (or, with --in-place and no
    /// `-o`, the input model) in an existing folder, not a directory, FIFO or device, and not
    /// the input model unless --in-place. With --in-place, an output naming the input through a
    /// symbolic link resolves to the input itself, so the link is not replaced.
    pub fn target(&self, model: &Path, output: Option<&Path>) -> qfold::Result<PathBuf> {
        let out = match output {
            Some(o) => o.to_path_buf(),
            None if self.in_place => model.to_path_buf(),
            None => return Err(qfold::Error::Usage("give -o OUTPUT or --in-place".into())),
        };
        qfold::files::check_output(model, &out, self.in_place)?;
        qfold::files::check_data_destination(&out)?;
        if self.in_place && qfold::files::same_file(&out, model) {
            return out.canonicalize().map_err(|e| qfold::Error::Io {
                path: out.clone(),
                source: e,
            });
        }
        Ok(out)
    }

    /// Once the input is loaded and before any work: refuses an output that is, or whose
    /// `.data` is, one of the input's external data files.
    pub fn check_against(&self, input: &qfold::onnx::Model, target: &Path) -> qfold::Result<()> {
        qfold::files::check_output_against(&input.files, target, self.in_place)
    }
}

/// How a rewriting command ends: print its report (JSON under `key`, or text), then write the
/// model, unless its check against the input failed (exit 1, nothing written).
pub struct Outcome<'a, R: serde::Serialize> {
    pub key: &'a str,
    pub report: &'a R,
    pub print: &'a dyn Fn(&R),
    pub check: Option<&'a qfold::verify::Comparison>,
    /// What the check compared against, for messages ("the original", "the QDQ model").
    pub against: &'a str,
}

impl<R: serde::Serialize> Outcome<'_, R> {
    /// Prints, then saves `model` to `path` when the check passed (or there was none).
    pub fn finish(
        self,
        model: &qfold::onnx::Model,
        path: &std::path::Path,
        out: &OutputArgs,
        json: bool,
    ) -> qfold::Result<i32> {
        let passed = self.check.is_none_or(|c| c.passed);
        if json {
            let v = serde_json::json!({
                self.key: self.report,
                "check": self.check,
                "written": passed.then(|| path.display().to_string()),
            });
            println!(
                "{}",
                serde_json::to_string_pretty(&v).expect("report serializes")
            );
        } else {
            (self.print)(self.report);
            if let Some(c) = self.check {
                println!("check against {} in tract:", self.against);
                check::print_comparison(c);
            }
        }
        if !passed {
            eprintln!(
                "error: the result does not match {}; nothing written",
                self.against
            );
            return Ok(CHECK_FAILED);
        }
        out.save(model, path)?;
        if !json {
            println!("wrote {}", path.display());
        }
        Ok(OK)
    }
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
    let result = match cli.command {
        Command::Inspect(a) => inspect::run(a),
        Command::Check(a) => check::run(a),
        Command::Fuse(a) => fuse::run(a),
        Command::Quantize(a) => quantize::run(*a),
        Command::Convert(a) => convert::run(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            USAGE
        }
    }
}
