//! Every input the mutation fuzzer (`tools/fuzz_pipeline.py`) ever crashed qfold with stays here
//! as a regression test: `tests/crashers/<command>-<signature>.onnx`, each run through inspect,
//! fuse, quantize (2 random calibration samples) and convert. None may panic, abort, be killed
//! by a signal or run past the time limit; a refusal exits 2 with an `error: ` line.

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const LIMIT: Duration = Duration::from_secs(60);

fn crashers() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(root().join("tests/crashers"))
        .expect("tests/crashers")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "onnx"))
        .collect();
    v.sort();
    v
}

/// Runs qfold with `args` under the time limit: exit code and stderr.
fn run_limited(args: &[&str]) -> (Option<i32>, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_qfold"))
        .args(args)
        .current_dir(root())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run qfold");
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            let mut err = String::new();
            use std::io::Read;
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            return (status.code(), err);
        }
        if start.elapsed() > LIMIT {
            let _ = child.kill();
            panic!("{args:?} ran past {LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn every_fuzz_crasher_is_refused_cleanly() {
    let all = crashers();
    assert!(all.len() >= 15, "the crasher corpus is missing");
    let tmp = TempDir::new("crashers");
    let out = tmp.join("out.onnx");
    let o = out.to_str().unwrap();
    for path in &all {
        let m = path.to_str().unwrap();
        for args in [
            vec!["inspect", m],
            vec!["fuse", m, "-o", o],
            vec!["quantize", m, "-o", o, "--calib-random", "2"],
            vec!["convert", m, "-o", o],
        ] {
            let (code, err) = run_limited(&args);
            assert!(
                matches!(code, Some(0..=2)),
                "{args:?}: exit {code:?} (killed by a signal?)\n{err}"
            );
            assert!(!err.contains("panicked"), "{args:?}: {err}");
            if code == Some(2) {
                assert!(
                    common::without_progress(&err).starts_with("error: "),
                    "{args:?}: {err}"
                );
            }
            let _ = std::fs::remove_file(&out);
        }
    }
}

/// A graph that cannot be ordered is refused before any input data are drawn: the fuzzer's
/// timeout was a one-node cycle declaring a 1x3x1000000x32 input, for which `quantize` drew
/// 384 MB random samples (20 s) and only then found the cycle. Three samples are over the
/// random-data bound, so drawing first would fail on the bound instead of naming the cycle.
#[test]
fn a_cycle_is_named_before_random_inputs_are_drawn() {
    let m = root().join("tests/crashers/quantize-timeout-cycle-behind-large-input.onnx");
    let m = m.to_str().unwrap();
    let tmp = TempDir::new("cycle_first");
    let out = tmp.join("out.onnx");
    let o = out.to_str().unwrap();
    for args in [
        vec!["quantize", m, "-o", o, "--calib-random", "3"],
        vec!["analyze", m, "--calib-random", "3"],
        vec!["check", m, m, "--random", "3"],
    ] {
        let (code, err) = run_limited(&args);
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(
            err.contains("the graph has a cycle through node '' (Relu)"),
            "{args:?}: {err}"
        );
        assert!(!out.exists(), "{args:?} wrote {o}");
    }
}

/// tract runs a node by its op type whatever its domain, so the size bounds of the op specs
/// apply to every domain before a model reaches tract: the fuzzer's `com.microsoft` MaxPool
/// with a kernel of 2^63 - 1 made tract's MaxPool ask for 4 GiB of patch offsets and abort.
#[test]
fn a_contrib_domain_op_is_bounded_like_the_standard_one() {
    let m =
        root().join("tests/crashers/quantize-memory-allocation-failed-contrib-domain-maxpool.onnx");
    let tmp = TempDir::new("contrib-maxpool");
    let out = tmp.join("out.onnx");
    let (code, err) = run_limited(&[
        "quantize",
        m.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--calib-random",
        "2",
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("(MaxPool): attribute 'kernel_shape' has the entry 9223372036854775807"),
        "{err}"
    );
    assert!(!out.exists());
}
