//! Median tract latency of a model: `cargo run --release --example latency -- MODEL [RUNS]
//! [name:d1,d2,...]`. Inputs are random from the declared shapes (symbolic dims from the
//! optional shape argument, else 1). Prints `median_ms min_ms runs`. One thread.

use std::collections::HashMap;
use std::time::Instant;

fn main() -> qfold::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(path) = args.first() else {
        eprintln!("usage: latency MODEL [RUNS] [name:d1,d2,...]");
        std::process::exit(2);
    };
    let runs: usize = args.get(1).and_then(|r| r.parse().ok()).unwrap_or(20);
    let shapes: HashMap<String, Vec<usize>> = args
        .iter()
        .skip(2)
        .map(|s| qfold::verify::parse_input_shape(s))
        .collect::<qfold::Result<_>>()?;
    let model = qfold::onnx::load(path)?;
    let cases = qfold::verify::random_cases(&model, 1, 0, &shapes)?;
    let runner = qfold::runtime::Runner::new(&model, &cases[0].inputs, &[])?;
    runner.run(&cases[0].inputs)?; // warm up
    let mut times: Vec<f64> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            runner
                .run(&cases[0].inputs)
                .map(|_| t.elapsed().as_secs_f64() * 1e3)
        })
        .collect::<qfold::Result<_>>()?;
    times.sort_by(|a, b| a.total_cmp(b));
    println!("{:.3} {:.3} {}", times[times.len() / 2], times[0], runs);
    Ok(())
}
