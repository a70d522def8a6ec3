#!/usr/bin/env python3
"""SQNR of qfold's static quantization against ONNX Runtime's quantize_static with the same settings
and the same calibration data (issue 4's comparison table).

Models and data:
  * onnx_models/digits_cnn: calibration = calib/input.npy (100 images; qfold gets a temporary folder
    holding only that file, ORT one batch of the same array), evaluation = eval/input.npy (512
    images, labels in eval/labels.npy; qfold gets eval/, whose test_data_set_K batches hold the same
    images in the same order);
  * onnx_models/fusion_{model_for_fusion,sequential,linear_bn,conv_with_bias,convtranspose_bn}:
    calibration = 32 samples of the declared input shape, standard normal, seed 0, saved as ONE
    stacked .npy [32, *shape] in a temporary folder for `qfold --calib` and fed to ORT one sample per
    get_next(); evaluation = 16 other samples (seed 1), the same way.

Settings (QDQ, QUInt8 activations, QInt8 weights everywhere):

  | setting    | qfold                                        | quantize_static                          |
  | ort-minmax | --preset ort --method minmax                 | per_channel=False, MinMax                |
  | qfold      | --preset qfold                               | per_channel=True,  MinMax                |
  | percentile | --method percentile --percentile 99.999      | per_channel=True,  Percentile (defaults) |
  | entropy    | --method entropy                             | per_channel=True,  Entropy (defaults)    |

and, with --extra, two rows closer to qfold's algorithms: `entropy-2048`, the same qfold run against
ORT Entropy with num_bins=2048, num_quantized_bins=256 (ORT's KL search over a 2048-bin histogram of
[-max|x|, max|x|], 128 levels a side; quantize_static does not forward these options, so the script
wraps its create_calibrator; ORT's default 128/128 leaves the full range as the only candidate), and
`percentile-asym`, against ORT Percentile with extra_options={"CalibTensorRangeSymmetric": False}
(ORT's Percentile calibrator is symmetric by default; qfold's range for an asymmetric u8 target is
not).

ORT runs on the model after quant_pre_process (`prep`: shape inference + ORT's graph optimizer,
which folds Conv+BatchNormalization as qfold's fusion does) and on the model as committed (`raw`).

Every quantized model (qfold's and ORT's) runs in onnxruntime with optimizations disabled (QDQ
simulated in float; tools/check_qdq_ort.py shows tract gives identical outputs for qfold's models)
and SQNR = 10*log10(sum ref^2 / sum (ref - q)^2) over all evaluation samples, ref = the float model
in the same session settings. qfold's own (tract) SQNR is shown next to it. Accuracy where labels
exist. Prints a markdown table.

Usage: /work/venv/bin/python tools/compare_quant.py [--qfold target/debug/qfold] [--extra]
       [--models digits_cnn,...] [--keep DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
import warnings

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

# the module (the package re-exports a function of the same name)
ort_quantize_module = importlib.import_module("onnxruntime.quantization.quantize")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
warnings.filterwarnings("ignore")

MODELS = ["digits_cnn"] + [
    f"fusion_{m}" for m in ("model_for_fusion", "sequential", "linear_bn", "conv_with_bias", "convtranspose_bn")
]
# name -> (qfold flags, ORT per_channel, ORT method, ORT extra_options)
SETTINGS = {
    "ort-minmax": (["--preset", "ort", "--method", "minmax"], False, CalibrationMethod.MinMax, {}),
    "qfold": (["--preset", "qfold"], True, CalibrationMethod.MinMax, {}),
    "percentile": (["--method", "percentile", "--percentile", "99.999"], True, CalibrationMethod.Percentile, {}),
    "entropy": (["--method", "entropy"], True, CalibrationMethod.Entropy, {}),
}
EXTRA = {
    "entropy-2048": (
        ["--method", "entropy"],
        True,
        CalibrationMethod.Entropy,
        {"_calib": {"num_bins": 2048, "num_quantized_bins": 256}},
    ),
    "percentile-asym": (
        ["--method", "percentile", "--percentile", "99.999"],
        True,
        CalibrationMethod.Percentile,
        {"CalibTensorRangeSymmetric": False},
    ),
}


class Reader(CalibrationDataReader):
    def __init__(self, name: str, batches: list[np.ndarray]):
        self.name, self.batches, self.pos = name, batches, 0

    def get_next(self):
        if self.pos >= len(self.batches):
            return None
        self.pos += 1
        return {self.name: self.batches[self.pos - 1]}

    def rewind(self):
        self.pos = 0


def session(path: str) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def run(path: str, name: str, batches: list[np.ndarray]) -> np.ndarray:
    """First output of every batch, concatenated along axis 0."""
    s = session(path)
    return np.concatenate([s.run(None, {name: b})[0] for b in batches])


def sqnr_db(ref: np.ndarray, q: np.ndarray) -> float:
    ref = ref.astype(np.float64)
    noise = float(np.sum((ref - q.astype(np.float64)) ** 2))
    return math.inf if noise == 0 else float(10 * np.log10(np.sum(ref**2) / noise))


def declared_shape(model: onnx.ModelProto) -> tuple[str, list]:
    inits = {t.name for t in model.graph.initializer}
    ins = [i for i in model.graph.input if i.name not in inits]
    assert len(ins) == 1, "single-input models only"
    return ins[0].name, [d.dim_value if d.HasField("dim_value") else d.dim_param for d in ins[0].type.tensor_type.shape.dim]


def prepare(name: str, tmp: str, n_calib: int, n_eval: int) -> dict:
    """Calibration and evaluation data for one model: arrays for ORT, folders for qfold."""
    d = os.path.join(REPO, "onnx_models", name)
    model = os.path.join(d, "model.onnx")
    input_name, shape = declared_shape(onnx.load(model))
    calib_dir = os.path.join(tmp, f"{name}.calib")
    os.makedirs(calib_dir)
    if name == "digits_cnn":
        x_cal = np.load(os.path.join(d, "calib", "input.npy"))
        x_eval = np.load(os.path.join(d, "eval", "input.npy"))
        labels = np.load(os.path.join(d, "eval", "labels.npy"))
        np.save(os.path.join(calib_dir, "input.npy"), x_cal)  # rank 4 = the input's rank: one batch
        cal_batches = [x_cal]
        eval_batches = [x_eval[s : s + 64] for s in range(0, len(x_eval), 64)]
        eval_arg = os.path.join(d, "eval")
        calib_desc = f"calib/input.npy {list(x_cal.shape)}"
    else:
        assert all(isinstance(v, int) and v > 0 for v in shape), f"{name}: symbolic input shape {shape}"
        x_cal = np.random.default_rng(0).standard_normal((n_calib, *shape)).astype(np.float32)
        x_eval = np.random.default_rng(1).standard_normal((n_eval, *shape)).astype(np.float32)
        np.save(os.path.join(calib_dir, "input.npy"), x_cal)  # rank + 1: n_calib stacked samples
        eval_arg = os.path.join(tmp, f"{name}.eval")
        os.makedirs(eval_arg)
        np.save(os.path.join(eval_arg, "input.npy"), x_eval)
        cal_batches = list(x_cal)
        eval_batches = list(x_eval)
        labels = None
        calib_desc = f"{n_calib} x N(0,1) {shape} seed 0"
    return dict(
        name=name,
        model=model,
        input=input_name,
        calib_dir=calib_dir,
        eval_arg=eval_arg,
        cal_batches=cal_batches,
        eval_batches=eval_batches,
        labels=labels,
        calib_desc=calib_desc,
    )


def qfold_quantize(qfold: str, case: dict, flags: list[str], out: str) -> dict:
    cmd = [qfold, "quantize", case["model"], "-o", out, "--format", "qdq", "--calib", case["calib_dir"], "--eval", case["eval_arg"], *flags, "--json"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0 or not os.path.exists(out):
        raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    return json.loads(p.stdout)


def ort_quantize(src: str, out: str, case: dict, per_channel: bool, method, extra: dict, verbose: bool):
    """quantize_static; extra["_calib"] holds calibrator options quantize_static does not forward
    (num_bins, num_quantized_bins), injected by wrapping its create_calibrator."""
    extra = dict(extra)
    calib_opts = extra.pop("_calib", None)
    original = ort_quantize_module.create_calibrator
    if calib_opts:

        def create_calibrator(*a, **kw):
            kw["extra_options"] = dict(kw.get("extra_options") or {}, **calib_opts)
            return original(*a, **kw)

        ort_quantize_module.create_calibrator = create_calibrator
    quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    try:
        with quiet:
            quantize_static(
                src,
                out,
                Reader(case["input"], case["cal_batches"]),
                quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                per_channel=per_channel,
                calibrate_method=method,
                extra_options=extra,
            )
    finally:
        ort_quantize_module.create_calibrator = original


def fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    return "inf" if math.isinf(x) else f"{x:.2f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--qfold", default=os.path.join(REPO, "target", "debug", "qfold"))
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--eval-samples", type=int, default=16)
    ap.add_argument("--extra", action="store_true", help="also the entropy-2048 and percentile-asym rows")
    ap.add_argument("--keep", default="", help="also copy every quantized model to this directory")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()
    if not args.verbose:
        logging.getLogger().setLevel(logging.ERROR)
    settings = dict(SETTINGS, **(EXTRA if args.extra else {}))

    print(f"onnxruntime {ort.__version__}, onnx {onnx.__version__}; qfold {os.path.relpath(args.qfold, REPO)}\n")
    rows = []
    tmp = tempfile.mkdtemp(prefix="qfold_compare_")
    cwd = os.getcwd()
    os.chdir(tmp)  # quantize_static writes its augmented model next to the working directory
    try:
        for name in args.models.split(","):
            case = prepare(name, tmp, args.calib_samples, args.eval_samples)
            ref = run(case["model"], case["input"], case["eval_batches"])
            acc = lambda y: None if case["labels"] is None else float((y.argmax(1) == case["labels"]).mean())
            prep = os.path.join(tmp, f"{name}.prep.onnx")
            quant_pre_process(case["model"], prep)
            for setting, (flags, per_channel, method, extra) in settings.items():
                r = dict(model=name, setting=setting, calib=case["calib_desc"], float_acc=acc(ref))
                qpath = os.path.join(tmp, f"{name}.{setting}.qfold.onnx")
                try:
                    rep = qfold_quantize(args.qfold, case, flags, qpath)
                    y = run(qpath, case["input"], case["eval_batches"])
                    r["qfold"], r["qfold_acc"] = sqnr_db(ref, y), acc(y)
                    r["qfold_tract"] = rep["evaluation"]["comparison"]["outputs"][0]["sqnr_db"]
                except Exception as e:
                    print(f"{name} {setting}: qfold failed: {e}", file=sys.stderr)
                    r["qfold"] = "error"
                for kind, src in (("prep", prep), ("raw", case["model"])):
                    out = os.path.join(tmp, f"{name}.{setting}.ort-{kind}.onnx")
                    try:
                        ort_quantize(src, out, case, per_channel, method, extra, args.verbose)
                        y = run(out, case["input"], case["eval_batches"])
                        r[kind], r[kind + "_acc"] = sqnr_db(ref, y), acc(y)
                    except Exception as e:
                        print(f"{name} {setting}: ORT {kind} failed: {type(e).__name__}: {e}", file=sys.stderr)
                        r[kind] = "error"
                if args.keep:
                    os.makedirs(args.keep, exist_ok=True)
                    for f in os.listdir(tmp):
                        if f.startswith(f"{name}.{setting}.") and f.endswith(".onnx"):
                            shutil.copy(os.path.join(tmp, f), args.keep)
                rows.append(r)
                print(
                    f"{name} {setting}: qfold {fmt(r.get('qfold'))} (tract {fmt(r.get('qfold_tract'))}) "
                    f"ORT prep {fmt(r.get('prep'))} raw {fmt(r.get('raw'))} dB",
                    file=sys.stderr,
                )
    finally:
        os.chdir(cwd)
        shutil.rmtree(tmp, ignore_errors=True)

    print(
        "| model | setting | qfold SQNR dB | qfold SQNR dB (tract) | ORT SQNR dB (prep) | ORT SQNR dB (raw) "
        "| qfold - ORT prep dB | accuracy float / qfold / ORT prep / ORT raw |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |")
    worse = []
    for r in rows:
        q, p = r.get("qfold"), r.get("prep")
        diff = q - p if isinstance(q, float) and isinstance(p, float) and not (math.isinf(q) or math.isinf(p)) else None
        if diff is not None and diff < -0.05:
            worse.append(r)
        a = "-"
        if r.get("float_acc") is not None:
            a = " / ".join("-" if r.get(k) is None else f"{r[k]:.4f}" for k in ("float_acc", "qfold_acc", "prep_acc", "raw_acc"))
        d = "-" if diff is None else f"{diff:+.2f}"
        print(
            f"| {r['model']} | {r['setting']} | {fmt(r.get('qfold'))} | {fmt(r.get('qfold_tract'))} | "
            f"{fmt(r.get('prep'))} | {fmt(r.get('raw'))} | {d} | {a} |"
        )
    print(
        "\nSQNR of the quantized model's first output against the float model over the evaluation set, both in "
        "onnxruntime with optimizations off (qfold's tract figure beside it). digits_cnn: calibration "
        "calib/input.npy (100 images), evaluation the 512 eval images. fusion_*: calibration "
        f"{args.calib_samples} N(0,1) samples of the declared input shape (seed 0), evaluation {args.eval_samples} "
        "others (seed 1). ORT prep = quant_pre_process first (folds BN); raw = BN kept. QDQ, QUInt8 "
        "activations, QInt8 weights. ORT Entropy runs with its defaults num_bins = num_quantized_bins = 128 "
        "(one candidate: the full range); ORT Percentile with its default symmetric=True."
    )
    if worse:
        print(f"\nqfold below ORT (prep) by more than 0.05 dB in {len(worse)} of {len(rows)} rows: "
              + ", ".join(f"{r['model']}/{r['setting']}" for r in worse))


if __name__ == "__main__":
    main()
