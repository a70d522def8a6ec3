//! `qfold analyze MODEL --calib PATH [--eval PATH] [...]`: per-tensor sensitivity.

use std::path::PathBuf;

use qfold::commands::{analyze_file, Inputs};
use qfold::quant::analyze::{LayerAnalysis, Score, TensorKind};
use qfold::verify;
use qfold::{Error, Result};

#[derive(clap::Args)]
pub struct Args {
    /// The float model.
    model: PathBuf,
    /// Calibration data (the forms `quantize --calib` takes).
    #[arg(long, conflicts_with = "calib_random")]
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
    /// Evaluation data (default: the calibration data).
    #[arg(long)]
    eval: Option<PathBuf>,
    /// Evaluation samples (runs of the model) each variant runs on (0: all).
    #[arg(long, value_name = "N", default_value_t = qfold::quant::analyze::DEFAULT_SAMPLES)]
    samples: usize,
    /// Print only the N most sensitive tensors (0: all); --json always has all.
    #[arg(long, value_name = "N", default_value_t = 0)]
    top: usize,
    #[command(flatten)]
    settings: super::settings::SettingsArgs,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    data: super::data::PreprocessArgs,
}

fn db(s: Option<f64>) -> String {
    match s {
        None => "exact".into(),
        Some(d) => format!("{d:.2}"),
    }
}

fn score(s: &Score) -> String {
    match s.accuracy {
        Some(a) => format!("{} ({:.2}%)", db(s.sqnr_db), 100.0 * a),
        None => db(s.sqnr_db),
    }
}

fn score_db(s: &Score) -> String {
    match s.accuracy {
        Some(a) => format!("{} dB, accuracy {:.2}%", db(s.sqnr_db), 100.0 * a),
        None => format!("{} dB", db(s.sqnr_db)),
    }
}

/// Prints the table, at most `top` rows.
pub fn print_table(a: &LayerAnalysis, top: usize) {
    println!(
        "per-tensor analysis on {} samples of {}: every tensor quantized {}{}",
        a.samples,
        a.source,
        score_db(&a.quantized),
        match a.float_accuracy {
            Some(f) => format!(" (float accuracy {:.2}%)", 100.0 * f),
            None => String::new(),
        }
    );
    println!(
        "sorted by sensitivity; SQNR in dB: 'own' = the tensor against itself quantized, \
         'only q' = the model with only this tensor quantized, 'only f' = everything else \
         quantized"
    );
    println!(
        "{:<10} {:>8} {:>14} {:>14} {:>22} {:>8} {:>9}  tensor (node)",
        "kind", "own", "only q", "only f", "range (chosen)", "clipped", "ch spread"
    );
    for t in a.tensors.iter().take(top) {
        let range = if t.kind == TensorKind::Weight {
            format!("[{:.3}, {:.3}]", t.min, t.max)
        } else {
            format!(
                "[{:.3}, {:.3}] ({:.3}, {:.3})",
                t.min, t.max, t.range_min, t.range_max
            )
        };
        println!(
            "{:<10} {:>8} {:>14} {:>14} {:>22} {:>7.3}% {:>9}  {} ({})",
            t.kind.name(),
            db(t.sqnr_db),
            score(&t.only_quantized),
            score(&t.only_float),
            range,
            100.0 * t.clipped,
            t.channel_range_spread
                .map(|s| format!("{s:.1}"))
                .unwrap_or_default(),
            t.tensor,
            t.nodes.join(", ")
        );
    }
    if a.tensors.len() > top {
        println!(
            "... {} more (--top 0 or --json for all)",
            a.tensors.len() - top
        );
    }
}

pub fn run(a: Args) -> Result<i32> {
    let settings = a.settings.settings(None);
    let opts = settings.options()?;
    a.settings.check(&opts)?;
    verify::parse_input_shapes(&a.input_shape)?;
    let calibration = match (&a.calib, a.calib_random) {
        (Some(path), _) => Inputs::Data {
            path: path.clone(),
            preprocess: a.data.preprocess(),
        },
        (None, Some(count)) => Inputs::Random {
            count,
            seed: a.seed,
            shapes: a.input_shape.clone(),
        },
        (None, None) => {
            return Err(Error::Usage(
                "give calibration data: --calib PATH or --calib-random N".into(),
            ))
        }
    };
    let eval = a.eval.as_ref().map(|p| {
        (
            Inputs::Data {
                path: p.clone(),
                preprocess: a.data.preprocess(),
            },
            p.display().to_string(),
        )
    });
    let out = analyze_file(&a.model, &settings, calibration, eval, a.samples)?;
    if a.json {
        super::print_json(&out);
    } else {
        for n in &out.notes {
            println!("note: {n}");
        }
        let top = if a.top == 0 { usize::MAX } else { a.top };
        print_table(&out.analysis, top);
    }
    Ok(super::OK)
}
