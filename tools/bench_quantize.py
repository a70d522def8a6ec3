#!/usr/bin/env python3
"""Time and peak memory of static quantization on a resnet50-size model: `qfold quantize` (release
build) against ONNX Runtime's quantize_static, both calibrated on the same 32 samples.

Data (in a temporary folder): calib/input.npy, one array [32, 1, 3, 224, 224] float32, standard
normal with seed 0 (rank = the input's rank + 1, so qfold reads 32 samples of [1, 3, 224, 224]);
eval/input.npy, [4, 1, 3, 224, 224], seed 1.

Tools, each run REPEAT times in its own process under /usr/bin/time -v (median wall time, median
peak RSS):
  * qfold minmax:      qfold quantize MODEL -o OUT --format qdq --calib calib --eval eval --method minmax --json
  * qfold percentile:  the same with --method percentile (99.999)
    (qfold's run includes BN folding, calibration, writing the model, and the evaluation on the 4
    eval samples: the float and the quantized model run in tract)
  * ORT MinMax / ORT Percentile: one Python process running quant_pre_process(MODEL, prep) then
    quantize_static(prep, OUT, reader over the 32 samples one by one, quant_format=QDQ,
    activation_type=QUInt8, weight_type=QInt8, per_channel=True, calibrate_method=...)
    (no evaluation inside the timed process)

Afterwards (not timed) every result runs in onnxruntime (optimizations off) on the 4 eval samples
next to the float model: SQNR of the output and top-1 agreement. Prints a markdown table.

The model comes from tools/export_torchvision.py (random weights, BN kept), made if missing.

Usage: /work/venv/bin/python tools/bench_quantize.py [--qfold /work/target-release/release/qfold]
       [--model /tmp/qfold_big/resnet50/model.onnx] [--repeat 3] [--tools qfold-minmax,...]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile

import numpy as np
import onnx
import onnxruntime as ort

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ORT_SCRIPT = r"""
import logging, sys, contextlib, io, warnings
import numpy as np
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process
warnings.filterwarnings("ignore")
logging.getLogger().setLevel(logging.ERROR)
model, calib, prep, out, method = sys.argv[1:6]

class Reader(CalibrationDataReader):
    def __init__(self):
        self.x = np.load(calib, mmap_mode="r")
        self.k = 0
    def get_next(self):
        if self.k >= len(self.x):
            return None
        self.k += 1
        return {"input": np.ascontiguousarray(self.x[self.k - 1])}
    def rewind(self):
        self.k = 0

quant_pre_process(model, prep)
with contextlib.redirect_stdout(io.StringIO()):
    quantize_static(prep, out, Reader(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, per_channel=True, calibrate_method=getattr(CalibrationMethod, method))
"""


def timed(cmd, cwd=None):
    """Runs cmd under /usr/bin/time -v; returns (seconds, peak RSS in MiB, stdout)."""
    p = subprocess.run(["/usr/bin/time", "-v"] + cmd, capture_output=True, text=True, cwd=cwd)
    if p.returncode != 0:
        raise RuntimeError(f"{cmd} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", p.stderr).group(1)
    secs = sum(float(v) * 60**i for i, v in enumerate(reversed(wall.split(":"))))
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1))
    return secs, rss_kb / 1024.0, p.stdout


def run_ort(path: str, x: np.ndarray) -> np.ndarray:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    name = s.get_inputs()[0].name
    return np.concatenate([s.run(None, {name: xi})[0] for xi in x])


def sqnr_db(ref: np.ndarray, q: np.ndarray) -> float:
    ref = ref.astype(np.float64)
    noise = float(np.sum((ref - q.astype(np.float64)) ** 2))
    return math.inf if noise == 0 else float(10 * np.log10(np.sum(ref**2) / noise))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--qfold", default="/work/target-release/release/qfold")
    ap.add_argument("--model", default="/tmp/qfold_big/resnet50/model.onnx")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--eval-samples", type=int, default=4)
    ap.add_argument("--tools", default="qfold-minmax,qfold-percentile,ort-minmax,ort-percentile")
    a = ap.parse_args()

    if not os.path.exists(a.model):
        out_dir = os.path.dirname(os.path.dirname(a.model))
        print(f"{a.model} missing: exporting with tools/export_torchvision.py {out_dir}", file=sys.stderr)
        subprocess.run([sys.executable, os.path.join(REPO, "tools", "export_torchvision.py"), out_dir], check=True)
    m = onnx.load(a.model, load_external_data=False)
    shape = [d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim]
    assert all(v > 0 for v in shape), f"symbolic input shape {shape}"
    del m

    tmp = tempfile.mkdtemp(prefix="qfold-bench-quant-")
    try:
        calib_dir, eval_dir = os.path.join(tmp, "calib"), os.path.join(tmp, "eval")
        os.makedirs(calib_dir)
        os.makedirs(eval_dir)
        calib = os.path.join(calib_dir, "input.npy")
        np.save(calib, np.random.default_rng(0).standard_normal((a.calib_samples, *shape)).astype(np.float32))
        x_eval = np.random.default_rng(1).standard_normal((a.eval_samples, *shape)).astype(np.float32)
        np.save(os.path.join(eval_dir, "input.npy"), x_eval)
        ort_script = os.path.join(tmp, "ort_quantize.py")
        with open(ort_script, "w") as f:
            f.write(ORT_SCRIPT)

        def cmd(tool: str, out: str) -> list[str]:
            kind, method = tool.split("-")
            if kind == "qfold":
                return [a.qfold, "quantize", a.model, "-o", out, "--format", "qdq", "--calib", calib_dir, "--eval", eval_dir, "--method", method, "--json"]
            prep = os.path.join(tmp, "prep.onnx")
            return [sys.executable, ort_script, a.model, calib, prep, out, {"minmax": "MinMax", "percentile": "Percentile"}[method]]

        size_mb = os.path.getsize(a.model) / 1e6
        print(
            f"machine: {os.cpu_count()} cores, {platform.machine()}; onnxruntime {ort.__version__}; "
            f"model {a.model} ({size_mb:.0f} MB, input {shape}); {a.calib_samples} calibration samples; "
            f"repeat {a.repeat}, medians\n"
        )
        rows = []
        ref = run_ort(a.model, x_eval)
        for tool in a.tools.split(","):
            out = os.path.join(tmp, f"{tool}.onnx")
            runs = []
            for k in range(a.repeat):
                if os.path.exists(out):
                    os.remove(out)
                secs, rss, stdout = timed(cmd(tool, out), cwd=tmp)
                runs.append((secs, rss))
                print(f"{tool} run {k + 1}: {secs:.2f} s, {rss:.0f} MiB", file=sys.stderr, flush=True)
                qfold_sqnr = None
                if tool.startswith("qfold"):
                    outs = json.loads(stdout)["evaluation"]["comparison"]["outputs"]
                    qfold_sqnr = f"{outs[0]['sqnr_db']:.2f}"
            y = run_ort(out, x_eval)
            rows.append(
                dict(
                    tool=tool,
                    wall=statistics.median(r[0] for r in runs),
                    walls=[r[0] for r in runs],
                    rss=statistics.median(r[1] for r in runs),
                    out_mb=os.path.getsize(out) / 1e6,
                    sqnr=sqnr_db(ref, y),
                    top1=float((ref.argmax(1) == y.argmax(1)).mean()),
                    qfold_sqnr=qfold_sqnr,
                )
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    names = {
        "qfold-minmax": "**qfold quantize** --method minmax",
        "qfold-percentile": "**qfold quantize** --method percentile",
        "ort-minmax": "ORT quant_pre_process + quantize_static MinMax",
        "ort-percentile": "ORT quant_pre_process + quantize_static Percentile",
    }
    print("| tool | wall s (median) | runs s | peak RSS MiB | output MB | SQNR dB (ORT, eval) | top-1 agreement |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        runs = ", ".join(f"{w:.1f}" for w in r["walls"])
        sq = f"{r['sqnr']:.2f}" + (f" (tract {r['qfold_sqnr']})" if r["qfold_sqnr"] else "")
        print(
            f"| {names.get(r['tool'], r['tool'])} | {r['wall']:.2f} | {runs} | {r['rss']:.0f} | {r['out_mb']:.1f} | "
            f"{sq} | {r['top1']:.2f} |"
        )
    print(
        f"\nqfold's time includes fusion, calibration, writing, and evaluating float and int8 models in tract on "
        f"{a.eval_samples} samples; ORT's includes quant_pre_process and quantize_static (per_channel=True, QDQ, "
        "QUInt8/QInt8), not an evaluation. SQNR/top-1: each result against the float model in onnxruntime "
        f"(optimizations off) on the {a.eval_samples} eval samples, measured outside the timing."
    )


if __name__ == "__main__":
    main()
