#!/usr/bin/env python3
"""`qfold upgrade` on the real-model corpus (tools/real_models.py): every model whose default-domain
opset is below the target is upgraded, and the upgraded model is compared with the original

  * in ONNX Runtime (CPU, graph optimizations disabled): max abs diff over the outputs on the
    corpus's evaluation samples (DIR/<name>/score/eval/test_data_set_N, written by
    `real_models.py score`);
  * in tract: `qfold check ORIGINAL UPGRADED --inputs ...` (max abs diff from its JSON report).

Prints a markdown table (and writes it to --report when given).

    /work/venv/bin/python tools/upgrade_corpus.py --corpus /work/corpus --bin target/debug/qfold \
        [--opset 13] [--samples 2] [--report upgrade_corpus.md]
"""

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper


def default_opset(m):
    return next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), None)


def ort_outputs(path, feeds):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    names = {i.name for i in s.get_inputs()}
    return s.run(None, {k: v for k, v in feeds.items() if k in names})


def read_set(d, model):
    init = {t.name for t in model.graph.initializer}
    real = [i.name for i in model.graph.input if i.name not in init]
    feeds = {}
    for k, name in enumerate(real):
        p = os.path.join(d, f"input_{k}.pb")
        t = onnx.TensorProto()
        with open(p, "rb") as f:
            t.ParseFromString(f.read())
        feeds[t.name or name] = numpy_helper.to_array(t)
    return feeds


def max_abs(a, b):
    m = 0.0
    for x, y in zip(a, b):
        x, y = np.asarray(x), np.asarray(y)
        if x.shape != y.shape:
            return float("inf")
        if x.size and x.dtype.kind in "fiub":
            m = max(m, float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)))))
    return m


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", default="/work/corpus")
    ap.add_argument("--bin", default="target/debug/qfold")
    ap.add_argument("--opset", type=int, default=13)
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--report")
    a = ap.parse_args()
    rows = []
    for path in sorted(glob.glob(os.path.join(a.corpus, "*", "model.onnx"))):
        name = os.path.basename(os.path.dirname(path))
        m = onnx.load(path, load_external_data=False)
        v = default_opset(m)
        if v is None or v >= a.opset:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            up = os.path.join(tmp, "up.onnx")
            r = subprocess.run([a.bin, "upgrade", path, "-o", up, "--opset", str(a.opset),
                                "--json"], capture_output=True, text=True, timeout=a.timeout)
            if r.returncode != 0:
                err = r.stderr.strip().replace("|", "/")
                rows.append([name, str(v), f"exit {r.returncode}: {err[:300]}", "", ""])
                continue
            rep = json.loads(r.stdout)["upgrade"]
            by_op = ", ".join(f"{k} {n}" for k, n in rep["by_op"].items()) or "none"
            sets = sorted(glob.glob(os.path.join(os.path.dirname(path), "score", "eval",
                                                 "test_data_set_*")))[: a.samples]
            if not sets:
                rows.append([name, str(v), f"ok ({by_op})", "no eval samples", ""])
                continue
            # ONNX Runtime
            try:
                diffs = []
                for d in sets:
                    feeds = read_set(d, m)
                    diffs.append(max_abs(ort_outputs(path, feeds), ort_outputs(up, feeds)))
                ort_res = f"{max(diffs):.3g}"
            except Exception as e:  # noqa: BLE001
                ort_res = "error: " + str(e).splitlines()[0][:150].replace("|", "/")
            # tract, through qfold check, on the same samples
            tract_res = []
            for d in sets:
                c = subprocess.run([a.bin, "check", path, up, "--inputs", d, "--json",
                                    "--atol", "1e9"],
                                   capture_output=True, text=True, timeout=a.timeout)
                if c.returncode not in (0, 1):
                    tract_res = ["error: " + c.stderr.strip().splitlines()[-1][:150]
                                 .replace("|", "/")]
                    break
                rep_c = json.loads(c.stdout)
                tract_res.append(max(o["max_abs"] for o in rep_c["outputs"]))
            tract = (tract_res[0] if isinstance(tract_res[0], str)
                     else f"{max(tract_res):.3g}")
            rows.append([name, f"{v} -> {rep['to']}", f"ok: {by_op}",
                         f"{ort_res}", f"{tract}"])
        print(name, rows[-1][1:], flush=True)
    lines = [
        f"| model | opset | qfold upgrade (nodes rewritten) | ONNX Runtime max abs diff | "
        f"tract max abs diff |",
        "|---|---|---|---|---|",
    ] + ["| " + " | ".join(r) + " |" for r in rows]
    text = "\n".join(lines)
    print(text)
    if a.report:
        with open(a.report, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
