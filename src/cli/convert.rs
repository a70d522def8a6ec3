//! `qfold convert QDQ_MODEL -o OUT [--check ...] [--json]`: QDQ -> QOperator.

use std::collections::HashMap;
use std::path::PathBuf;

use qfold::commands::{convert_file, Inputs};
use qfold::quant::qoperator::{ConvertOptions, ConvertReport};
use qfold::Result;

#[derive(clap::Args)]
pub struct Args {
    /// A QDQ model (from qfold, ONNX Runtime's quantizer, a PyTorch QAT export...).
    model: PathBuf,
    /// Where to write the QOperator model.
    #[arg(short, long, required_unless_present = "in_place")]
    output: Option<PathBuf>,
    #[command(flatten)]
    out: super::OutputArgs,
    /// Run both models in tract and refuse to write when the converted one's SQNR against the
    /// QDQ model is below --min-sqnr.
    #[arg(long)]
    check: bool,
    /// Threshold for --check, in dB.
    #[arg(long, default_value_t = 30.0)]
    min_sqnr: f64,
    /// Inputs for --check: a test_data_set folder, a folder of them, or .npy/.npz files.
    #[arg(long)]
    inputs: Option<PathBuf>,
    /// Random samples for --check.
    #[arg(long, default_value_t = 2)]
    random: usize,
    /// Shape of an input with symbolic dims: `name:1,3,224,224` (repeatable).
    #[arg(long = "input-shape", value_name = "NAME:DIMS")]
    input_shape: Vec<String>,
    /// Also emit ONNX Runtime's com.microsoft QLinearAdd, QLinearMul, QLinearConcat and
    /// QLinearGlobalAveragePool (for ONNX Runtime targets; tract cannot run them, so --check
    /// is refused with it).
    #[arg(long, conflicts_with = "check")]
    allow_contrib_ops: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Prints a conversion report.
pub fn print_report(r: &ConvertReport) {
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for (rule, _) in &r.converted {
        *counts.entry(rule.as_str()).or_insert(0) += 1;
    }
    let mut counts: Vec<_> = counts.into_iter().collect();
    counts.sort();
    println!(
        "converted {} patterns ({}); {} QuantizeLinear and {} DequantizeLinear left",
        r.converted.len(),
        counts
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", "),
        r.quantize_linear_left,
        r.dequantize_linear_left
    );
    for (node, op) in &r.float_islands {
        println!("  float island: {node} ({op})");
    }
    for (node, why) in &r.skipped {
        println!("  not converted: {node}: {why}");
    }
    for note in &r.inexact {
        println!("  inexact: {note}");
    }
}

pub fn run(a: Args) -> Result<i32> {
    let dest = a.out.destination(&a.model, a.output.as_deref())?;
    qfold::verify::check_random_count("--random", a.random)?;
    let check = a.check.then(|| {
        let inputs = match &a.inputs {
            Some(dir) => Inputs::Dir(dir.clone()),
            None => Inputs::Random {
                count: a.random,
                seed: 0,
                shapes: a.input_shape.clone(),
            },
        };
        (inputs, a.min_sqnr)
    });
    let opts = ConvertOptions {
        allow_contrib_ops: a.allow_contrib_ops,
    };
    let out = convert_file(&a.model, &dest, opts, check)?;
    Ok(super::finish(
        a.json,
        &out,
        || print_report(&out.convert),
        out.check.as_ref(),
        "the QDQ model",
        out.written.as_deref(),
        out.failure(),
    ))
}
