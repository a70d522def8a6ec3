//! `qfold inspect MODEL [--json]`.

use std::path::PathBuf;

use qfold::inspect::ValueSummary;

#[derive(clap::Args)]
pub struct Args {
    /// The model.
    model: PathBuf,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

fn value_line(v: &ValueSummary) -> String {
    let shape = v
        .shape
        .as_ref()
        .map(|s| format!("[{}]", s.join(", ")))
        .unwrap_or_else(|| "(unknown shape)".into());
    format!("  {} {} {}", v.name, v.elem_type, shape)
}

pub fn run(args: Args) -> qfold::Result<i32> {
    let s = qfold::commands::inspect_file(&args.model)?;
    if args.json {
        super::print_json(&s);
        return Ok(super::OK);
    }
    println!("{}", args.model.display());
    println!(
        "  ir_version {}, opsets {}",
        s.ir_version,
        s.opsets
            .iter()
            .map(|(d, v)| format!("{d} {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if !s.producer.is_empty() {
        let version = if s.producer_version.is_empty() {
            String::new()
        } else {
            format!(" {}", s.producer_version)
        };
        println!("  producer {}{version}", s.producer);
    }
    println!("inputs");
    s.inputs.iter().for_each(|v| println!("{}", value_line(v)));
    println!("outputs");
    s.outputs.iter().for_each(|v| println!("{}", value_line(v)));
    println!(
        "nodes {} ({} subgraphs, {} functions)",
        s.nodes, s.subgraphs, s.functions
    );
    for (op, n) in &s.op_types {
        println!("  {op:<24} {n}");
    }
    println!(
        "initializers {} ({} bytes), {} external ({} bytes); {} Constant nodes",
        s.initializers,
        s.initializer_bytes,
        s.external_initializers,
        s.external_bytes,
        s.constant_nodes
    );
    match (&s.fusion, &s.fusion_error) {
        (Some(r), _) => {
            println!("fusion candidates (what qfold fuse would do)");
            super::fuse::print_report(r);
        }
        (None, Some(e)) => println!("fusion: cannot analyse: {e}"),
        (None, None) => {}
    }
    Ok(super::OK)
}
