#!/usr/bin/env python3
"""ONNX Runtime loads and runs every QOperator model qfold writes, with results matching tract's.

For the digits CNN and the fusion reference models, writes with qfold
  * --format qoperator (standard domain: what tract runs on integer kernels),
  * --format qoperator --preset tract (per-tensor weights),
  * --format qoperator --allow-contrib-ops (com.microsoft QLinearGlobalAveragePool, QLinearAdd...),
runs each in onnxruntime (CPUExecutionProvider, default optimizations) on the evaluation input, and
compares with the float model in onnxruntime: SQNR in dB. Next to it: qfold's own SQNR from its
--json report (tract, same evaluation data; for contrib models tract evaluates the standard-domain
model). Exits 1 if onnxruntime refuses a model or the two SQNRs differ by more than 1 dB.

Usage: /work/venv/bin/python tools/check_qoperator_ort.py [--qfold target/debug/qfold]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_inputs(folder):
    sets = sorted(d for d in os.listdir(folder) if d.startswith("test_data_set_"))
    return [numpy_helper.to_array(onnx.load_tensor(os.path.join(folder, s, "input_0.pb"))) for s in sets]


def ort_run(path, name, xs):
    s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return [s.run(None, {name: x})[0] for x in xs]


def sqnr(ref, out):
    num = sum(float((r.astype(np.float64) ** 2).sum()) for r in ref)
    den = sum(float(((r.astype(np.float64) - o) ** 2).sum()) for r, o in zip(ref, out))
    return float("inf") if den == 0 else 10 * np.log10(num / den)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--qfold", default=os.path.join(REPO, "target", "debug", "qfold"))
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="qfold-qop-")
    cases = [("digits_cnn", ["--calib", "onnx_models/digits_cnn/calib"], "onnx_models/digits_cnn/eval")]
    for m in ["fusion_model_for_fusion", "fusion_sequential", "fusion_linear_bn", "fusion_conv_with_bias", "fusion_convtranspose_bn"]:
        d = f"onnx_models/{m}"
        cases.append((m, ["--calib", d], d))
    variants = [
        ("qoperator", ["--format", "qoperator"]),
        ("qoperator tract preset", ["--format", "qoperator", "--preset", "tract"]),
        ("qoperator + contrib ops", ["--format", "qoperator", "--allow-contrib-ops"]),
    ]
    failed = False
    print("| model | variant | QLinear ops | onnxruntime SQNR dB | qfold (tract) SQNR dB | match |")
    print("|---|---|---|---|---|---|")
    for name, calib, eval_dir in cases:
        model = os.path.join(REPO, "onnx_models", name, "model.onnx")
        input_name = onnx.load(model).graph.input[0].name
        xs = load_inputs(os.path.join(REPO, eval_dir))
        ref = ort_run(model, input_name, xs)
        for vname, flags in variants:
            out = os.path.join(tmp, f"{name}-{vname.replace(' ', '_')}.onnx")
            p = subprocess.run([a.qfold, "quantize", model, "-o", out, *calib, "--eval", eval_dir, "--json", *flags],
                               cwd=REPO, capture_output=True, text=True)
            if p.returncode != 0:
                print(f"| {name} | {vname} | qfold failed: {p.stderr.strip()} | | | no |")
                failed = True
                continue
            tract = json.loads(p.stdout)["evaluation"]["comparison"]["outputs"][0]["sqnr_db"]
            tract = float("inf") if tract is None else tract
            ops = sorted({n.op_type for n in onnx.load(out).graph.node if n.op_type.startswith("QLinear")})
            try:
                got = ort_run(out, input_name, xs)
                s = sqnr(ref, got)
                ok = abs(s - tract) <= 1.0 or (np.isinf(s) and np.isinf(tract))
            except Exception as e:  # onnxruntime refused the model
                s, ok = f"refused: {type(e).__name__}: {e}"[:120], False
            failed |= not ok
            s_txt = f"{s:.2f}" if isinstance(s, float) else s
            print(f"| {name} | {vname} | {', '.join(ops)} | {s_txt} | {tract:.2f} | {'yes' if ok else 'NO'} |", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
