#!/usr/bin/env python3
"""Reference int8 results for onnx_models/digits_cnn from ONNX Runtime's static quantizer, to compare
qfold's quantization against.

For each calibration method (MinMax, Percentile, Entropy; ORT's default options for each) and each
preparation (`prep`: onnxruntime.quantization.shape_inference.quant_pre_process first, whose ORT
graph optimization folds the three Conv+BatchNormalization pairs; `raw`: the model as committed,
BatchNormalization kept, which ORT's QDQ quantizer then quantizes as an operator of its own), runs

    quantize_static(model, out, reader, quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    per_channel=True, calibrate_method=<method>)

with a CalibrationDataReader over calib/input.npy (batches of --calib-batch images), then runs the
quantized model on eval/input.npy with onnxruntime and reports:
  * int8 accuracy next to float accuracy (eval/labels.npy);
  * SQNR of the quantized logits against the float logits over the whole eval set,
    10*log10(sum ref^2 / sum (ref - q)^2) dB, ref = float model.onnx in onnxruntime;
  * the same two for the quantized model run with graph optimizations disabled (`sim`: every
    DequantizeLinear -> float op -> QuantizeLinear as written, no int8 kernels), next to the default
    ORT_ENABLE_ALL session (`ort`: ORT fuses the QDQ groups into QLinearConv / int8 kernels).

The quantized models go to a temporary directory (kept only with --keep DIR). Prints a markdown table.

Usage: /work/venv/bin/python tools/ort_quantize_digits.py [--model-dir onnx_models/digits_cnn]
       [--calib-batch 25] [--keep DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
warnings.filterwarnings("ignore")

METHODS = [CalibrationMethod.MinMax, CalibrationMethod.Percentile, CalibrationMethod.Entropy]


class NpyReader(CalibrationDataReader):
    """Feeds calib/input.npy in consecutive batches (the last one may be smaller)."""

    def __init__(self, x: np.ndarray, batch: int, input_name: str = "input"):
        self.batches = [x[s : s + batch] for s in range(0, len(x), batch)]
        self.input_name = input_name
        self.pos = 0

    def get_next(self):
        if self.pos >= len(self.batches):
            return None
        self.pos += 1
        return {self.input_name: self.batches[self.pos - 1]}

    def rewind(self):
        self.pos = 0


def session(path: str, optimize: bool) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    so.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def run(path: str, x: np.ndarray, optimize: bool, batch: int = 64) -> np.ndarray:
    sess = session(path, optimize)
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[s : s + batch]})[0] for s in range(0, len(x), batch)])


def sqnr_db(ref: np.ndarray, q: np.ndarray) -> float:
    ref = ref.astype(np.float64)
    noise = np.sum((ref - q.astype(np.float64)) ** 2)
    return float("inf") if noise == 0 else float(10 * np.log10(np.sum(ref**2) / noise))


def activation_scales(path: str) -> list[tuple[str, float, int]]:
    """(tensor, scale, zero point) of every QuantizeLinear, in node order."""
    m = onnx.load(path)
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    return [
        (n.input[0], float(inits[n.input[1]]), int(inits[n.input[2]]))
        for n in m.graph.node
        if n.op_type == "QuantizeLinear"
    ]


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(1) == labels).mean())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", default=os.path.join(REPO, "onnx_models", "digits_cnn"))
    ap.add_argument("--calib-batch", type=int, default=25)
    ap.add_argument("--keep", default="", help="also copy the quantized models to this directory")
    ap.add_argument("-v", "--verbose", action="store_true", help="show the quantizer's own output")
    args = ap.parse_args()
    if not args.verbose:  # the quantizer logs a 'consider pre-processing' warning per call
        logging.getLogger().setLevel(logging.ERROR)

    model_path = os.path.join(args.model_dir, "model.onnx")
    x_cal = np.load(os.path.join(args.model_dir, "calib", "input.npy"))
    x_eval = np.load(os.path.join(args.model_dir, "eval", "input.npy"))
    y_eval = np.load(os.path.join(args.model_dir, "eval", "labels.npy"))

    ref = run(model_path, x_eval, optimize=False)
    acc_float = accuracy(ref, y_eval)
    print(f"ONNX Runtime {ort.__version__}, onnx {onnx.__version__}; model {os.path.relpath(model_path, REPO)}")
    print(f"calibration: {len(x_cal)} images in batches of {args.calib_batch}; eval: {len(x_eval)} images")
    print(f"float accuracy (ORT, optimizations off): {acc_float:.4f}\n")

    rows = []
    tmp = tempfile.mkdtemp(prefix="qfold_ort_digits_")
    try:
        prep_path = os.path.join(tmp, "model.prep.onnx")
        quant_pre_process(model_path, prep_path)
        prep_ops = Counter(n.op_type for n in onnx.load(prep_path).graph.node)
        print(f"after quant_pre_process: {dict(sorted(prep_ops.items()))}\n")

        for prep in (True, False):
            src = prep_path if prep else model_path
            for method in METHODS:
                out = os.path.join(tmp, f"model.{'prep' if prep else 'raw'}.{method.name.lower()}.qdq.onnx")
                t0 = time.time()
                quiet = contextlib.nullcontext() if args.verbose else contextlib.redirect_stdout(io.StringIO())
                with quiet:
                    quantize_static(
                        src,
                        out,
                        NpyReader(x_cal, args.calib_batch),
                        quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8,
                        per_channel=True,
                        calibrate_method=method,
                    )
                dt = time.time() - t0
                ops = Counter(n.op_type for n in onnx.load(out).graph.node)
                q_ort = run(out, x_eval, optimize=True)
                q_sim = run(out, x_eval, optimize=False)
                rows.append(
                    dict(
                        prep="prep (BN folded)" if prep else "raw (BN kept)",
                        method=method.name,
                        bn=ops.get("BatchNormalization", 0),
                        q=ops.get("QuantizeLinear", 0),
                        acc_ort=accuracy(q_ort, y_eval),
                        sqnr_ort=sqnr_db(ref, q_ort),
                        acc_sim=accuracy(q_sim, y_eval),
                        sqnr_sim=sqnr_db(ref, q_sim),
                        agree=float((q_ort.argmax(1) == ref.argmax(1)).mean()),
                        scales=activation_scales(out),
                        secs=dt,
                    )
                )
                r = rows[-1]
                print(
                    f"{r['prep']:17s} {r['method']:10s} acc {r['acc_ort']:.4f} SQNR {r['sqnr_ort']:.2f} dB "
                    f"(sim {r['acc_sim']:.4f} / {r['sqnr_sim']:.2f} dB) {dt:.1f}s",
                    file=sys.stderr,
                )
                if args.keep:
                    os.makedirs(args.keep, exist_ok=True)
                    shutil.copy(out, args.keep)
    finally:
        shutil.rmtree(tmp)

    minmax = {r["prep"]: r["scales"] for r in rows if r["method"] == "MinMax"}
    print(
        "| preparation | calibration | BN nodes | QuantizeLinear | same ranges as MinMax | float acc "
        "| int8 acc (ort) | SQNR dB (ort) | top-1 agreement (ort) | int8 acc (sim) | SQNR dB (sim) |"
    )
    print("| --- | --- | ---: | ---: | :---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        same = "-" if r["method"] == "MinMax" else ("yes" if r["scales"] == minmax[r["prep"]] else "no")
        print(
            f"| {r['prep']} | {r['method']} | {r['bn']} | {r['q']} | {same} | {acc_float:.4f} | {r['acc_ort']:.4f} | "
            f"{r['sqnr_ort']:.2f} | {r['agree']:.4f} | {r['acc_sim']:.4f} | {r['sqnr_sim']:.2f} |"
        )
    print(
        "\nort = quantized model in onnxruntime with default optimizations (QDQ groups fused into QLinearConv / "
        "QGemm int8 kernels); sim = optimizations off (QDQ simulated in float). SQNR vs the float model's logits "
        "over all eval images. top-1 agreement = int8 argmax equals float argmax."
    )
    print(
        "same ranges as MinMax: every activation QuantizeLinear has MinMax's scale and zero point. quantize_static "
        "runs Entropy with num_bins = num_quantized_bins = 128 (not settable through its extra_options in "
        f"onnxruntime {ort.__version__}), so the KL search has one candidate, the full range."
    )
    print(
        "raw: the BatchNormalization scale (rank 1) gets per-tensor int8 weights (the quantizer warns "
        "'Axis 1 is out-of-range' and falls back), and the Conv output is quantized before BN."
    )


if __name__ == "__main__":
    main()
