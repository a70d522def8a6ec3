//! `qfold fuse MODEL -o OUT [--only a,b,c]... [--qat] [--check] [--json]`.

use std::path::PathBuf;

use qfold::commands::{fuse_file, FuseCheck, Inputs};
use qfold::fusion::{FuseOptions, FuseReport};
use qfold::Result;

#[derive(clap::Args)]
pub struct Args {
    /// The float model.
    model: PathBuf,
    /// Where to write the fused model.
    #[arg(short, long, required_unless_present = "in_place")]
    output: Option<PathBuf>,
    #[command(flatten)]
    out: super::OutputArgs,
    /// An explicit chain to fuse: node names or PyTorch module paths, comma-separated
    /// (repeatable). Without it every pattern is fused.
    #[arg(long, value_name = "A,B,C")]
    only: Vec<String>,
    /// QAT fusion: find and record the groups, fold nothing.
    #[arg(long)]
    qat: bool,
    /// Keep constant subgraphs, Identity and inference Dropout nodes as they are (by default
    /// they are folded into initializers and removed before fusing).
    #[arg(long)]
    no_constant_folding: bool,
    /// Treat initializers that are also graph inputs as constants (for IR >= 4 they are
    /// defaults a caller may override, so they are not folded otherwise).
    #[arg(long)]
    inputs_as_constants: bool,
    /// Leave Add / Sub / Mul / Div by constants after Conv, ConvTranspose, Gemm and MatMul
    /// as they are (BatchNormalization still folds).
    #[arg(long)]
    no_affine_folding: bool,
    /// Run original and fused models in tract and refuse to write when they differ.
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
    #[arg(long, value_enum, ignore_case = true)]
    tolerance: Option<super::ToleranceArg>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Prints a fusion report as text.
pub fn print_report(r: &FuseReport) {
    println!(
        "{} groups; BatchNormalization {} -> {}; nodes {} -> {}",
        r.groups.len(),
        r.bn_before,
        r.bn_after,
        r.nodes_before,
        r.nodes_after
    );
    if r.constants.folded_nodes > 0 || !r.removed.is_empty() {
        println!(
            "constants: {} nodes folded into {} initializers; {} Identity/Dropout removed",
            r.constants.folded_nodes,
            r.constants.initializers.len(),
            r.removed.len()
        );
    }
    for note in &r.constants.skipped {
        println!("  constants: {note}");
    }
    if !r.constants.inputs_as_constants.is_empty() {
        println!(
            "  constants: {} graph inputs with an initializer made constant: {}",
            r.constants.inputs_as_constants.len(),
            r.constants.inputs_as_constants.join(", ")
        );
    }
    for b in &r.constants.conv_bias_reshaped {
        println!("  bias shape: {b}");
    }
    for g in &r.groups {
        let how = match (&g.fuser, g.folded) {
            (Some(f), _) => format!("custom fuser {f}"),
            (None, true) => "folded".into(),
            (None, false) => "grouped".into(),
        };
        println!(
            "  {:<16} {:<8} {}",
            g.kind.torch_name(),
            how,
            g.nodes.join(" + ")
        );
    }
    for s in &r.skipped {
        println!("  skipped {}: {}", s.nodes.join(" + "), s.reason);
    }
}

pub fn run(args: Args) -> Result<i32> {
    let dest = args.out.destination(&args.model, args.output.as_deref())?;
    let opts = FuseOptions {
        only: args
            .only
            .iter()
            .map(|l| {
                l.split(',')
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect()
            })
            .collect(),
        qat: args.qat,
        fusers: vec![],
        no_constant_folding: args.no_constant_folding,
        inputs_as_constants: args.inputs_as_constants,
        no_affine_folding: args.no_affine_folding,
        no_scalar_affine_folding: false,
    };
    let check = args.check.then(|| FuseCheck {
        inputs: match &args.inputs {
            Some(dir) => Inputs::Dir(dir.clone()),
            None => Inputs::Random {
                count: args.random,
                seed: args.seed,
                shapes: args.input_shape.clone(),
            },
        },
        tolerance: args.tolerance.as_ref().map(super::spelling),
    });
    qfold::verify::check_random_count("--random", args.random)?;
    let out = fuse_file(&args.model, &dest, &opts, check)?;
    Ok(super::finish(
        args.json,
        &out,
        || print_report(&out.fusion),
        out.check.as_ref(),
        "the original",
        out.written.as_deref(),
        out.failure(),
    ))
}
