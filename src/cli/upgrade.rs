//! `qfold upgrade MODEL -o OUT [--opset N] [--check] [--json]`.

use std::path::PathBuf;

use qfold::commands::{upgrade_file, FuseCheck, Inputs};
use qfold::graph::upgrade::{UpgradeReport, DEFAULT_TO};
use qfold::Result;

#[derive(clap::Args)]
pub struct Args {
    /// The model to upgrade.
    model: PathBuf,
    /// Where to write the upgraded model.
    #[arg(short, long, required_unless_present = "in_place")]
    output: Option<PathBuf>,
    #[command(flatten)]
    out: super::OutputArgs,
    /// The default-domain opset to raise the model to (at most 18).
    #[arg(long, default_value_t = DEFAULT_TO)]
    opset: i64,
    /// Run original and upgraded models in tract and refuse to write when they differ.
    #[arg(long)]
    check: bool,
    /// Inputs for --check: a test_data_set_N folder or a folder of them (default: random).
    #[arg(long)]
    inputs: Option<PathBuf>,
    /// Random samples for --check.
    #[arg(long, default_value_t = 2)]
    random: usize,
    /// Seed of the random samples.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Shape of an input with symbolic dims: `name:1,3,224,224` (repeatable).
    #[arg(long = "input-shape", value_name = "NAME:DIMS")]
    input_shape: Vec<String>,
    /// Tolerance for --check: exact, float, half, loose (default: half for float16 models,
    /// float otherwise).
    #[arg(long)]
    tolerance: Option<String>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Prints an upgrade report as text.
pub fn print_report(r: &UpgradeReport) {
    println!(
        "opset {} -> {}; {} nodes rewritten; nodes {} -> {}",
        r.from,
        r.to,
        r.rewritten.len(),
        r.nodes_before,
        r.nodes_after
    );
    for (op, n) in &r.by_op {
        println!("  {op:<20} {n}");
    }
    for w in &r.rewritten {
        println!("  {} ({}): {}", w.node, w.op_type, w.change);
    }
}

pub fn run(args: Args) -> Result<i32> {
    let dest = args.out.destination(&args.model, args.output.as_deref())?;
    qfold::verify::check_random_count("--random", args.random)?;
    let check = args.check.then(|| FuseCheck {
        inputs: match &args.inputs {
            Some(dir) => Inputs::Dir(dir.clone()),
            None => Inputs::Random {
                count: args.random,
                seed: args.seed,
                shapes: args.input_shape.clone(),
            },
        },
        tolerance: args.tolerance.clone(),
    });
    let out = upgrade_file(&args.model, &dest, args.opset, check)?;
    Ok(super::finish(
        args.json,
        &out,
        || print_report(&out.upgrade),
        out.check.as_ref(),
        "the original",
        out.written.as_deref(),
        out.failure(),
    ))
}
