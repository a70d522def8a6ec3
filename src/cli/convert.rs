//! `qfold convert QDQ_MODEL -o OUT [--check ...] [--json]`: QDQ -> QOperator.

use std::collections::HashMap;
use std::path::PathBuf;

use qfold::quant::qoperator::{convert_with, ConvertOptions, ConvertReport};
use qfold::verify::{self, Criterion};
use qfold::{Error, Result};

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
    json: bool,
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
    let target = a.out.target(&a.model, a.output.as_deref())?;
    verify::check_random_count("--random", a.random)?;
    let qdq = qfold::onnx::load(&a.model)?;
    a.out.check_against(&qdq, &target)?;
    let mut q = qdq.clone();
    let report = convert_with(
        &mut q,
        ConvertOptions {
            allow_contrib_ops: a.allow_contrib_ops,
        },
    )
    .map_err(|e| match e {
        Error::Usage(m) => Error::Usage(format!("{}: {m}", a.model.display())),
        other => other,
    })?;
    if report.converted.is_empty() {
        let why: Vec<String> = report
            .skipped
            .iter()
            .take(5)
            .map(|(node, reason)| format!("node '{node}': {reason}"))
            .collect();
        return Err(Error::Usage(format!(
            "{}: no QDQ pattern to convert (is it a QDQ model?){}",
            a.model.display(),
            if why.is_empty() {
                String::new()
            } else {
                format!("; left alone: {}", why.join("; "))
            }
        )));
    }
    let comparison = if a.check {
        let cases =
            verify::dataset_or_random(&qdq, a.inputs.as_deref(), a.random, 0, &a.input_shape)?;
        Some(verify::compare_models(
            &qdq,
            &q,
            &cases,
            Criterion::MinSqnr { db: a.min_sqnr },
        )?)
    } else {
        None
    };
    super::Outcome {
        key: "convert",
        report: &report,
        print: &print_report,
        check: comparison.as_ref(),
        against: "the QDQ model",
    }
    .finish(&q, &target, &a.out, a.json)
}
