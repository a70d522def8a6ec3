#!/usr/bin/env python3
"""Check that ONNX Runtime loads and runs the QDQ models `qfold quantize` writes, with the results
tract gives.

For each model (onnx_models/digits_cnn with its calib/ and eval/ sets; the fusion reference models
onnx_models/fusion_{model_for_fusion,sequential,linear_bn,conv_with_bias,convtranspose_bn}
calibrated with --calib-random 32 --seed 0 and evaluated on their test_data_set_0 input) and each
preset (qfold, ort, tensorrt):

  1. `qfold quantize MODEL -o TMP/q.onnx --format qdq <calib> --eval <eval> --preset P --json` writes the QDQ
     model and reports tract's SQNR of the quantized outputs against the float outputs;
  2. onnxruntime (CPUExecutionProvider, one thread) runs the float and the quantized model on the
     same evaluation inputs, once with ORT_DISABLE_ALL (`noopt`: every DequantizeLinear -> float op
     -> QuantizeLinear as written, the same simulation tract does) and once with the default
     ORT_ENABLE_ALL (`opt`: ORT fuses QDQ groups into QLinearConv / QGemm / int8 kernels);
  3. SQNR = 10*log10(sum ref^2 / sum (ref - q)^2) over every evaluation sample (ref = ORT's float
     outputs at the same optimization level), top-1 agreement for [N, C] outputs, and accuracy
     where labels exist;
  4. `direct`: ORT's quantized outputs (noopt) are stored as the expected outputs of a
     test_data_set and `qfold check q.onnx --inputs` compares tract's run of the same quantized
     model with them (max abs difference and SQNR of tract against ORT; inf = bit-identical).

"Matching" = |SQNR(ORT) - SQNR(tract)| <= --tol dB (1 by default) for both ORT sessions. Prints a
markdown table; exits 1 if ORT refuses a model, qfold fails, or any output does not match.

Usage: /work/venv/bin/python tools/check_qdq_ort.py [--qfold target/debug/qfold] [--tol 1]
       [--models digits_cnn,fusion_sequential] [--presets qfold,ort,tensorrt] [--keep DIR]
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = ["digits_cnn"] + [
    f"fusion_{m}" for m in ("model_for_fusion", "sequential", "linear_bn", "conv_with_bias", "convtranspose_bn")
]
PRESETS = ["qfold", "ort", "tensorrt"]


def session(path: str, optimize: bool) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    so.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def run_all(path: str, samples: list[dict], optimize: bool) -> list[list[np.ndarray]]:
    """Outputs of every sample, in graph output order."""
    sess = session(path, optimize)
    return [sess.run(None, feeds) for feeds in samples]


def sqnr_db(ref: np.ndarray, q: np.ndarray) -> float:
    ref = ref.astype(np.float64)
    noise = float(np.sum((ref - q.astype(np.float64)) ** 2))
    return math.inf if noise == 0 else float(10 * np.log10(np.sum(ref**2) / noise))


def graph_inputs(model: onnx.ModelProto) -> list[str]:
    inits = {t.name for t in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits]


def load_dataset(folder: str, names: list[str]) -> dict:
    """One test_data_set_N folder -> {input name: array} (input_K.pb in graph input order)."""
    feeds = {}
    for k, name in enumerate(names):
        t = onnx.load_tensor(os.path.join(folder, f"input_{k}.pb"))
        feeds[t.name or name] = numpy_helper.to_array(t)
    return feeds


def cases(which: list[str]) -> list[dict]:
    out = []
    for name in which:
        d = os.path.join(REPO, "onnx_models", name)
        model = os.path.join(d, "model.onnx")
        names = graph_inputs(onnx.load(model))
        if name == "digits_cnn":
            sets = sorted(glob.glob(os.path.join(d, "eval", "test_data_set_*")), key=lambda p: int(p.rsplit("_", 1)[1]))
            labels = np.concatenate([np.load(os.path.join(s, "labels.npy")) for s in sets])
            out.append(
                dict(
                    name=name,
                    model=model,
                    calib=["--calib", os.path.join(d, "calib")],
                    eval=os.path.join(d, "eval"),
                    samples=[load_dataset(s, names) for s in sets],
                    labels=labels,
                )
            )
        else:
            s = os.path.join(d, "test_data_set_0")
            out.append(
                dict(
                    name=name,
                    model=model,
                    calib=["--calib-random", "32", "--seed", "0"],
                    eval=s,
                    samples=[load_dataset(s, names)],
                    labels=None,
                )
            )
    return out


def qfold_quantize(qfold: str, case: dict, preset: str, out: str) -> dict:
    cmd = [qfold, "quantize", case["model"], "-o", out, "--format", "qdq", *case["calib"], "--eval", case["eval"], "--preset", preset, "--json"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0 or not os.path.exists(out):
        raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    return json.loads(p.stdout)


def tract_vs_ort(qfold: str, qmodel: str, case: dict, q_outs: list[list[np.ndarray]], out_names: list[str], tmp: str):
    """Stores ORT's quantized outputs as expected outputs and lets `qfold check` compare tract with them."""
    root = tempfile.mkdtemp(prefix="direct_", dir=tmp)
    for k, (feeds, outs) in enumerate(zip(case["samples"], q_outs)):
        d = os.path.join(root, f"test_data_set_{k}")
        os.makedirs(d)
        for j, (name, arr) in enumerate(feeds.items()):
            onnx.save_tensor(numpy_helper.from_array(arr, name), os.path.join(d, f"input_{j}.pb"))
        for j, (name, arr) in enumerate(zip(out_names, outs)):
            onnx.save_tensor(numpy_helper.from_array(arr, name), os.path.join(d, f"output_{j}.pb"))
    p = subprocess.run([qfold, "check", qmodel, "--inputs", root, "--tolerance", "exact", "--json"], capture_output=True, text=True)
    try:
        rep = json.loads(p.stdout)
    except json.JSONDecodeError:
        raise RuntimeError(f"qfold check {qmodel} exited {p.returncode}:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    return {o["name"]: o for o in rep["outputs"]}


def fmt_db(x) -> str:
    if x is None:
        return "-"
    return "inf" if math.isinf(x) else f"{x:.2f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--qfold", default=os.path.join(REPO, "target", "debug", "qfold"))
    ap.add_argument("--tol", type=float, default=1.0, help="largest allowed |SQNR(ORT) - SQNR(tract)| in dB")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--presets", default=",".join(PRESETS))
    ap.add_argument("--keep", default="", help="also copy the quantized models to this directory")
    args = ap.parse_args()

    print(f"onnxruntime {ort.__version__}, onnx {onnx.__version__}; qfold {os.path.relpath(args.qfold, REPO)}\n")
    rows, failures = [], []
    tmp = tempfile.mkdtemp(prefix="qfold_check_ort_")
    try:
        for case in cases(args.models.split(",")):
            float_ref = {opt: run_all(case["model"], case["samples"], opt) for opt in (False, True)}
            out_names = [o.name for o in session(case["model"], False).get_outputs()]
            for preset in args.presets.split(","):
                tag = f"{case['name']} / {preset}"
                qpath = os.path.join(tmp, f"{case['name']}.{preset}.qdq.onnx")
                try:
                    rep = qfold_quantize(args.qfold, case, preset, qpath)
                except Exception as e:
                    failures.append(f"{tag}: qfold failed: {e}")
                    continue
                if args.keep:
                    os.makedirs(args.keep, exist_ok=True)
                    shutil.copy(qpath, args.keep)
                tract = {o["name"]: o for o in rep["evaluation"]["comparison"]["outputs"]}
                ev = rep["evaluation"]
                qm = onnx.load(qpath)
                ops = Counter(n.op_type for n in qm.graph.node)
                if not ops.get("QuantizeLinear") or not ops.get("DequantizeLinear"):
                    failures.append(f"{tag}: qfold wrote no QuantizeLinear/DequantizeLinear pairs: {dict(ops)}")
                q_outs = {}
                for opt in (False, True):
                    try:
                        q_outs[opt] = run_all(qpath, case["samples"], opt)
                    except Exception as e:
                        failures.append(f"{tag}: onnxruntime ({'opt' if opt else 'noopt'}) refused or failed: {e}")
                if False not in q_outs or True not in q_outs:
                    continue
                try:
                    direct = tract_vs_ort(args.qfold, qpath, case, q_outs[False], out_names, tmp)
                except Exception as e:
                    failures.append(f"{tag}: qfold check against ORT's outputs failed: {e}")
                    direct = {}
                for j, name in enumerate(out_names):
                    r = dict(model=case["name"], preset=preset, output=name, q=ops.get("QuantizeLinear", 0))
                    r["tract"] = tract[name]["sqnr_db"] if name in tract else None
                    r["tract_top1"] = tract[name].get("top1") if name in tract else None
                    for opt, key in ((False, "noopt"), (True, "opt")):
                        ref = np.concatenate([o[j].reshape(-1) for o in float_ref[opt]])
                        q = np.concatenate([o[j].reshape(-1) for o in q_outs[opt]])
                        r[key] = sqnr_db(ref, q)
                        if float_ref[opt][0][j].ndim == 2:
                            rf = np.concatenate([o[j] for o in float_ref[opt]])
                            qq = np.concatenate([o[j] for o in q_outs[opt]])
                            r[key + "_top1"] = float((rf.argmax(1) == qq.argmax(1)).mean())
                            if case["labels"] is not None:
                                r[key + "_acc"] = float((qq.argmax(1) == case["labels"]).mean())
                                r["float_acc"] = float((rf.argmax(1) == case["labels"]).mean())
                    if case["labels"] is not None:
                        r["tract_acc"] = ev.get("quantized_accuracy")
                        r["tract_float_acc"] = ev.get("float_accuracy")
                    r["opt_vs_noopt"] = max(
                        float(np.abs(a[j].astype(np.float64) - b[j]).max()) for a, b in zip(q_outs[False], q_outs[True])
                    )
                    d = direct.get(name)
                    r["direct_sqnr"] = None if d is None else (math.inf if d["sqnr_db"] is None else d["sqnr_db"])
                    r["direct_maxabs"] = None if d is None else d["max_abs"]
                    ok = True
                    for key in ("noopt", "opt"):
                        a, b = r[key], r["tract"]
                        if b is None or a is None:
                            ok = False
                        elif math.isinf(a) or math.isinf(b):
                            ok = math.isinf(a) and math.isinf(b)
                        elif abs(a - b) > args.tol:
                            ok = False
                        if not ok:
                            failures.append(
                                f"{tag} output {name}: SQNR ORT {key} {fmt_db(a)} dB vs tract {fmt_db(b)} dB "
                                f"(more than {args.tol} dB apart)"
                            )
                            break
                    r["ok"] = ok
                    rows.append(r)
                    print(
                        f"{tag} {name}: tract {fmt_db(r['tract'])} noopt {fmt_db(r['noopt'])} opt {fmt_db(r['opt'])} "
                        f"direct {fmt_db(r['direct_sqnr'])} dB",
                        file=sys.stderr,
                    )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(
        "| model | preset | Q nodes | output | SQNR dB tract (qfold) | SQNR dB ORT noopt | SQNR dB ORT opt "
        "| max Δ dB | tract vs ORT noopt: SQNR dB / max abs | ORT opt vs noopt max abs | top-1 tract / noopt / opt | accuracy float / tract / noopt / opt | match |"
    )
    print("| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | :---: |")
    for r in rows:
        deltas = [abs(r[k] - r["tract"]) for k in ("noopt", "opt") if r["tract"] is not None and not math.isinf(r[k])]
        delta = f"{max(deltas):.2f}" if deltas else "-"
        top1 = " / ".join("-" if r.get(k) is None else f"{r[k]:.3f}" for k in ("tract_top1", "noopt_top1", "opt_top1"))
        if "float_acc" in r:
            acc = " / ".join(
                "-" if r.get(k) is None else f"{r[k]:.4f}" for k in ("float_acc", "tract_acc", "noopt_acc", "opt_acc")
            )
        else:
            acc = "-"
        maxabs = "-" if r["direct_maxabs"] is None else f"{r['direct_maxabs']:.2e}"
        direct = f"{fmt_db(r['direct_sqnr'])} / {maxabs}"
        print(
            f"| {r['model']} | {r['preset']} | {r['q']} | {r['output']} | {fmt_db(r['tract'])} | {fmt_db(r['noopt'])} | "
            f"{fmt_db(r['opt'])} | {delta} | {direct} | {r['opt_vs_noopt']:.2e} | {top1} | {acc} | {'yes' if r['ok'] else '**no**'} |"
        )
    print(
        "\nSQNR of the quantized outputs against the float model's outputs in the same runtime, over every "
        "evaluation sample (digits_cnn: the 512 eval images in 8 batches; fusion models: test_data_set_0). "
        "noopt = ORT_DISABLE_ALL (QDQ simulated in float, like tract); opt = ORT_ENABLE_ALL (int8 kernels). "
        "tract vs ORT noopt = `qfold check` of the quantized model in tract against ORT's outputs of the same "
        "model (inf = identical); ORT opt vs noopt = largest difference between ORT's two sessions on the quantized model. top-1 = argmax agreement with the float model."
    )
    if failures:
        print("\nFAILURES:")
        for f in failures:
            print(f"- {f}")
        sys.exit(1)
    print(f"\nall {len(rows)} outputs match within {args.tol} dB")


if __name__ == "__main__":
    main()
