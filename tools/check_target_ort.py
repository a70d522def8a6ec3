#!/usr/bin/env python3
"""Check in ONNX Runtime what `qfold quantize --target-sqnr` reached in tract, on
onnx_models/accuracy_outlier: plain MinMax misses the target, the target mode meets it.

Runs the qfold binary (both ways), then both QDQ models and the float model in onnxruntime on
eval/input.npy and prints the SQNR (dB) of the output against float. With --record, writes the
figures to onnx_models/accuracy_outlier/ort_reference.json (tests/quant_accuracy.rs reads it).

Usage: /work/venv/bin/python tools/check_target_ort.py --bin target/release/qfold [--record]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import onnxruntime as ort

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
CASE = os.path.join(ROOT, "onnx_models", "accuracy_outlier")
TARGET = 30.0


def sqnr(ref, out):
    ref = np.asarray(ref, np.float64)
    err = ref - np.asarray(out, np.float64)
    return float(10 * np.log10((ref ** 2).sum() / (err ** 2).sum()))


def run(path, xs):
    s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return np.concatenate([s.run(None, {"x": x})[0] for x in xs])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "release", "qfold"))
    ap.add_argument("--record", action="store_true")
    a = ap.parse_args()
    xs = np.load(os.path.join(CASE, "eval", "input.npy"))
    float_out = run(os.path.join(CASE, "model.onnx"), xs)
    figures = {"target_sqnr_db": TARGET, "onnxruntime": ort.__version__}
    with tempfile.TemporaryDirectory() as d:
        for name, extra in [("minmax", []), ("target", ["--target-sqnr", str(TARGET), "--min-quantized", "30"])]:
            out = os.path.join(d, f"{name}.onnx")
            cmd = [a.bin, "-q", "quantize", os.path.join(CASE, "model.onnx"), "-o", out,
                   "--calib", os.path.join(CASE, "calib"), "--eval", os.path.join(CASE, "eval"),
                   "--json"] + extra
            p = subprocess.run(cmd, capture_output=True, text=True)
            report = json.loads(p.stdout)
            tract = min(o["sqnr_db"] for o in report["evaluation"]["comparison"]["outputs"])
            ort_db = sqnr(float_out, run(out, xs))
            figures[name] = {"exit_code": p.returncode, "tract_sqnr_db": round(tract, 2),
                             "ort_sqnr_db": round(ort_db, 2)}
            if name == "target":
                t = report["target"]
                figures[name]["left_float"] = [f["node"] for f in t["fallback"]]
                figures[name]["compute_quantized"] = f'{t["compute_quantized"]} of {t["compute_nodes"]}'
            print(f"{name}: exit {p.returncode}, tract {tract:.2f} dB, onnxruntime {ort_db:.2f} dB")
    ok = figures["minmax"]["ort_sqnr_db"] < TARGET <= figures["target"]["ort_sqnr_db"]
    print("MinMax misses the target, the target mode meets it in onnxruntime:", ok)
    if a.record:
        with open(os.path.join(CASE, "ort_reference.json"), "w") as f:
            json.dump(figures, f, indent=2, sort_keys=True)
            f.write("\n")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
