//! Loads a model and saves it again with the default options: the I/O path that
//! `tools/bench_io.sh` measures. Prints the load and save times on stderr.
//!
//! ```sh
//! cargo run --example roundtrip -- IN.onnx OUT.onnx
//! ```

use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [input, output] = args.as_slice() else {
        eprintln!("usage: roundtrip IN.onnx OUT.onnx");
        std::process::exit(2);
    };
    let start = Instant::now();
    let model = match qfold::onnx::load(input) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    let loaded = start.elapsed();
    if let Err(e) = qfold::onnx::save(&model, output, &Default::default()) {
        eprintln!("error: {e}");
        std::process::exit(2);
    }
    let saved = start.elapsed() - loaded;
    eprintln!(
        "load {:.3} s, save {:.3} s",
        loaded.as_secs_f64(),
        saved.as_secs_f64()
    );
}
