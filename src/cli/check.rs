//! `qfold check A B [--inputs DIR | --random N] [--atol X --rtol Y | --tolerance L | --min-sqnr DB]`
//! and `qfold check MODEL --inputs DIR` (against the stored `output_K.pb`).

use std::path::PathBuf;

use qfold::commands::{check_files, criterion, Inputs};
use qfold::verify::{Comparison, Criterion};
use qfold::Result;

#[derive(clap::Args)]
pub struct Args {
    /// The reference model.
    a: PathBuf,
    /// The model to check against it; without it, MODEL is checked against the expected
    /// outputs stored in --inputs.
    b: Option<PathBuf>,
    /// A data set, a folder or a file: test_data_set_N folders (with expected outputs, needed
    /// when B is left out), .npy/.npz arrays, or images (see the preprocessing flags).
    #[arg(long, conflicts_with_all = ["random", "npy"])]
    inputs: Option<PathBuf>,
    /// One sample from .npy files: `name=file.npy`, or files in input order (repeatable).
    #[arg(long, conflicts_with = "random")]
    npy: Vec<String>,
    /// N random samples from the declared input shapes.
    #[arg(long, value_name = "N")]
    random: Option<usize>,
    /// Seed of the random samples.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Shape of an input with symbolic dims: `name:1,3,224,224` (repeatable).
    #[arg(long = "input-shape", value_name = "NAME:DIMS")]
    input_shape: Vec<String>,
    /// Absolute tolerance (with --rtol).
    #[arg(long, conflicts_with_all = ["tolerance", "min_sqnr"])]
    atol: Option<f64>,
    /// Relative tolerance (with --atol).
    #[arg(long, conflicts_with_all = ["tolerance", "min_sqnr"])]
    rtol: Option<f64>,
    /// A named tolerance: exact, float (1e-5 abs / 1e-4 rel), half (1e-2), loose (1e-3 abs /
    /// 1e-2 rel). Default: half for float16 models, float otherwise.
    #[arg(long, conflicts_with = "min_sqnr", value_enum, ignore_case = true)]
    tolerance: Option<super::ToleranceArg>,
    /// Pass when every output's SQNR is at least this many dB.
    #[arg(long, value_name = "DB")]
    min_sqnr: Option<f64>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    data: super::data::PreprocessArgs,
}

fn inputs(args: &Args) -> Inputs {
    if let Some(path) = &args.inputs {
        return Inputs::Data {
            path: path.clone(),
            preprocess: args.data.preprocess(),
        };
    }
    if !args.npy.is_empty() {
        return Inputs::Npy(args.npy.clone());
    }
    Inputs::Random {
        count: args.random.unwrap_or(1),
        seed: args.seed,
        shapes: args.input_shape.clone(),
    }
}

/// Prints a comparison as text.
pub fn print_comparison(c: &Comparison) {
    println!(
        "{} samples, criterion {}",
        c.samples,
        match c.criterion {
            Criterion::Tolerance { atol, rtol } => format!("atol {atol:e} rtol {rtol:e}"),
            Criterion::MinSqnr { db } => format!("SQNR >= {db} dB"),
        }
    );
    println!(
        "  {:<24} {:>11} {:>11} {:>10} {:>9} {:>7}  result",
        "output", "max abs", "max rel", "cosine", "SQNR dB", "top-1"
    );
    for o in &c.outputs {
        let sqnr = o.sqnr_db.map_or("inf".to_string(), |s| format!("{s:.2}"));
        let top1 = o
            .top1
            .map_or("-".to_string(), |t| format!("{:.1}%", 100.0 * t));
        let result = match (&o.mismatch, o.passed) {
            (Some(m), _) => format!("FAIL ({m})"),
            (None, true) => "ok".into(),
            (None, false) => match c.criterion {
                Criterion::MinSqnr { db } => format!("FAIL (SQNR below {db} dB)"),
                Criterion::Tolerance { .. } if o.violations > 0 => {
                    format!("FAIL ({} elements out of tolerance)", o.violations)
                }
                Criterion::Tolerance { .. } => "FAIL".into(),
            },
        };
        println!(
            "  {:<24} {:>11.3e} {:>11.3e} {:>10.7} {:>9} {:>7}  {}",
            o.name, o.max_abs, o.max_rel, o.cosine, sqnr, top1, result
        );
    }
    for n in &c.notes {
        println!("note: {n}");
    }
    println!("{}", if c.passed { "PASS" } else { "FAIL" });
}

pub fn run(args: Args) -> Result<i32> {
    let crit = criterion(
        args.min_sqnr,
        args.tolerance.as_ref().map(super::spelling).as_deref(),
        args.atol,
        args.rtol,
    )?;
    let comparison = check_files(&args.a, args.b.as_deref(), inputs(&args), crit)?;
    if args.json {
        super::print_json(&comparison);
    } else {
        print_comparison(&comparison);
    }
    Ok(if comparison.passed {
        super::OK
    } else {
        super::CHECK_FAILED
    })
}
