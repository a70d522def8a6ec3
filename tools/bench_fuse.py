#!/usr/bin/env python3
"""Benchmark BatchNormalization folding: qfold fuse against onnxoptimizer's fuse_bn_into_conv,
ONNX Runtime's offline optimizer (basic level, which folds Conv+BN), and plain `cp`.

Each tool runs in its own process under /usr/bin/time -v, REPEAT times; the table gives the
median wall time and the median peak RSS, the BatchNormalization nodes left, and the max abs
difference of the result from the original model when both run in ONNX Runtime on the stored
test input.

    /work/venv/bin/python tools/bench_fuse.py [--qfold target/release/qfold] [--repeat 5] MODEL.onnx...

The models come from tools/export_torchvision.py (not committed). Build qfold in release first:
`cargo build --release`.
"""
import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile

import numpy as np
import onnx
from onnx import numpy_helper
import onnxruntime as ort

ONNXOPT = """
import sys, onnx, onnxoptimizer
m = onnx.load(sys.argv[1])
m = onnxoptimizer.optimize(m, ["fuse_bn_into_conv"])
onnx.save(m, sys.argv[2])
"""

ORT_OFFLINE = """
import sys, onnxruntime as ort
so = ort.SessionOptions()
so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
so.optimized_model_filepath = sys.argv[2]
ort.InferenceSession(sys.argv[1], so, providers=["CPUExecutionProvider"])
"""


def timed(cmd):
    """Runs cmd under /usr/bin/time -v; returns (seconds, peak RSS in MiB)."""
    p = subprocess.run(["/usr/bin/time", "-v"] + cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{cmd} failed:\n{p.stdout}\n{p.stderr}")
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", p.stderr).group(1)
    parts = [float(x) for x in wall.split(":")]
    secs = sum(v * 60 ** i for i, v in enumerate(reversed(parts)))
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1))
    return secs, rss_kb / 1024.0


def ort_run(path, feeds):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    return s.run(None, feeds)[0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+")
    ap.add_argument("--qfold", default="target/release/qfold")
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()
    py = sys.executable
    tmp = tempfile.mkdtemp(prefix="qfold-bench-")
    with open(os.path.join(tmp, "onnxopt.py"), "w") as f:
        f.write(ONNXOPT)
    with open(os.path.join(tmp, "ort_offline.py"), "w") as f:
        f.write(ORT_OFFLINE)
    print(f"machine: {os.cpu_count()} cores; repeat {a.repeat}; medians")
    print(f"| model | tool | wall s | peak RSS MiB | BN left | max abs diff vs original (ORT) |")
    print(f"|---|---|---|---|---|---|")
    for model in a.models:
        name = os.path.basename(os.path.dirname(model)) or model
        feeds_dir = os.path.join(os.path.dirname(model), "test_data_set_0")
        orig = onnx.load(model, load_external_data=False)
        inp = numpy_helper.to_array(onnx.load_tensor(os.path.join(feeds_dir, "input_0.pb")))
        feeds = {orig.graph.input[0].name: inp}
        ref = ort_run(model, feeds)
        tools = {
            "cp": lambda out: ["cp", model, out],
            "qfold fuse": lambda out: [a.qfold, "fuse", model, "-o", out],
            "onnxoptimizer fuse_bn_into_conv": lambda out: [py, os.path.join(tmp, "onnxopt.py"), model, out],
            "onnxruntime offline (basic)": lambda out: [py, os.path.join(tmp, "ort_offline.py"), model, out],
        }
        for tool, cmd in tools.items():
            out = os.path.join(tmp, f"{name}-{tool.split()[0]}.onnx")
            runs = [timed(cmd(out)) for _ in range(a.repeat)]
            wall = statistics.median(r[0] for r in runs)
            rss = statistics.median(r[1] for r in runs)
            m = onnx.load(out, load_external_data=False)
            bn = sum(n.op_type == "BatchNormalization" for n in m.graph.node)
            try:
                diff = float(np.abs(ort_run(out, feeds) - ref).max())
                diff_s = f"{diff:.2e}"
            except Exception as e:  # ORT's optimized model may hold contrib ops it reloads fine
                diff_s = f"n/a ({type(e).__name__})"
            print(f"| {name} | {tool} | {wall:.3f} | {rss:.0f} | {bn} | {diff_s} |", flush=True)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
