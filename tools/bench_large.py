#!/usr/bin/env python3
"""Models over 2 GiB end to end: time and peak memory of every qfold command on a generated model
whose weights pass protobuf's 2 GiB limit, against `cp` of its files.

The model (generated outside the repository, in --dir, once): LAYERS blocks of
Conv(C -> C, 3x3, pad 1) -> BatchNormalization -> Relu on a [1, C, 4, 4] input, float32 weights
in one external data file (`model.onnx.data`). Defaults: 18 layers, C = 2048: 18 x 151 MB of conv
weights = 2.72 GB.

Each step runs REPEAT times in its own process under /usr/bin/time -v (median wall time, median
peak RSS), in this order, each reading the previous step's output:
  cp        cp model.onnx model.onnx.data to a scratch folder
  fuse      qfold fuse model.onnx -o fused.onnx
  fuse+check qfold fuse model.onnx -o fused_checked.onnx --check (both models run in tract)
  check     qfold check model.onnx fused.onnx --random 1
  quantize  qfold quantize fused.onnx -o q.onnx --calib-random 4 --no-fuse (QDQ, per-channel)
  convert   qfold convert q.onnx -o qop.onnx --check
Prints a markdown table. Needs /usr/bin/time (apt-get install time) and numpy + onnx to generate.

Usage: /work/venv/bin/python tools/bench_large.py [--qfold target/release/qfold]
       [--dir /tmp/qfold_large] [--layers 18] [--channels 2048] [--repeat 3] [--steps fuse,check]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def generate(path: Path, layers: int, channels: int) -> None:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    c = channels
    nodes, inits = [], []
    x = "input"
    for i in range(layers):
        # He-scaled so activations neither vanish nor explode over the chain
        w = (rng.standard_normal((c, c, 3, 3), dtype=np.float32) * np.float32(np.sqrt(2.0 / (9 * c))))
        inits += [
            numpy_helper.from_array(w, f"w{i}"),
            numpy_helper.from_array(rng.standard_normal(c).astype(np.float32) * 0.1, f"b{i}"),
            numpy_helper.from_array((1 + 0.1 * rng.standard_normal(c)).astype(np.float32), f"g{i}"),
            numpy_helper.from_array((0.1 * rng.standard_normal(c)).astype(np.float32), f"be{i}"),
            numpy_helper.from_array((0.1 * rng.standard_normal(c)).astype(np.float32), f"m{i}"),
            numpy_helper.from_array((1 + 0.1 * rng.random(c)).astype(np.float32), f"v{i}"),
        ]
        nodes += [
            helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]),
            helper.make_node("BatchNormalization", [f"c{i}", f"g{i}", f"be{i}", f"m{i}", f"v{i}"], [f"n{i}"], name=f"bn{i}"),
            helper.make_node("Relu", [f"n{i}"], [f"r{i}"], name=f"relu{i}"),
        ]
        x = f"r{i}"
    graph = helper.make_graph(
        nodes,
        "large",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, c, 4, 4])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, c, 4, 4])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=path.name + ".data",
        size_threshold=1024,
    )


def measure(cmd: list[str]) -> tuple[float, float, int]:
    """(wall seconds, peak RSS in GB, exit code) of one run."""
    with tempfile.NamedTemporaryFile("r", suffix=".log") as log:
        r = subprocess.run(["/usr/bin/time", "-v", "-o", log.name, *cmd],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        text = log.read()
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", text).group(1)
    parts = [float(p) for p in wall.split(":")]
    secs = sum(p * 60 ** k for k, p in enumerate(reversed(parts)))
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1))
    if r.returncode != 0:
        sys.stderr.write(f"{' '.join(cmd)}: exit {r.returncode}\n{r.stderr[-2000:]}\n")
    return secs, rss / 1e6, r.returncode


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--qfold", default="target/release/qfold")
    ap.add_argument("--dir", default="/tmp/qfold_large")
    ap.add_argument("--layers", type=int, default=18)
    ap.add_argument("--channels", type=int, default=2048)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--steps", default="cp,fuse,fuse+check,check,quantize,convert")
    a = ap.parse_args()
    if not Path("/usr/bin/time").exists():
        sys.exit("needs /usr/bin/time: apt-get install time")
    qfold = str(Path(a.qfold).resolve())
    base = Path(a.dir) / f"l{a.layers}_c{a.channels}"
    model = base / "model.onnx"
    if not model.exists():
        print(f"generating {model} ...", file=sys.stderr)
        generate(model, a.layers, a.channels)
    size = sum(f.stat().st_size for f in base.glob("model.onnx*"))
    work = base / "out"
    work.mkdir(exist_ok=True)
    w = lambda n: str(work / n)  # noqa: E731
    steps = {
        "cp": ["sh", "-c", f"cp {model} {model}.data {work}/"],
        "fuse": [qfold, "fuse", str(model), "-o", w("fused.onnx"), "-q"],
        "fuse+check": [qfold, "fuse", str(model), "-o", w("fused_checked.onnx"), "--check", "-q"],
        "check": [qfold, "check", str(model), w("fused.onnx"), "--random", "1", "-q"],
        "quantize": [qfold, "quantize", w("fused.onnx"), "-o", w("q.onnx"), "--calib-random", "4",
                     "--no-fuse", "-q"],
        "convert": [qfold, "convert", w("q.onnx"), "-o", w("qop.onnx"), "--check", "-q"],
    }
    print(f"model: {a.layers} x Conv-BN-Relu, {a.channels} channels, {size / 1e9:.2f} GB "
          f"(model.onnx + model.onnx.data); {os.cpu_count()} cores; median of {a.repeat}\n")
    print("| step | wall s | peak RSS GB | exit |")
    print("|---|---:|---:|---:|")
    for name in a.steps.split(","):
        runs = [measure(steps[name]) for _ in range(a.repeat)]
        secs = statistics.median(r[0] for r in runs)
        rss = statistics.median(r[1] for r in runs)
        code = max(r[2] for r in runs)
        print(f"| {name} | {secs:.1f} | {rss:.2f} | {code} |", flush=True)
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
