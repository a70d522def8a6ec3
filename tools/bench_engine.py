#!/usr/bin/env python3
"""Rewrite-engine benchmark: how qfold's fuse / quantize / convert scale with the graph size.

This is a benchmark, not a test: it prints numbers and checks only that each command exits 0.

Generated graphs (outside the repository, default /tmp/qfold-bench; deterministic, fixed seeds,
opset 13, reused when already there):

* ``chain_<N>.onnx``: Conv -> BatchNormalization -> Relu repeated, N nodes in total (N/3 blocks;
  default N = 1000, 10002, 50001, i.e. 999, 10002 and 50001 nodes), input [1, 4, 8, 8], 4-channel
  3x3 convs with pads 1 and a bias, BN parameters as initializers (each block has its own).
  The weights are a contraction (centre tap 0.9 * identity plus small noise, BN close to identity
  with beta 0.1), so activations stay near 1 however long the chain is.
* ``qdq_<N>.onnx``: ONNX Runtime's QDQ format, about N nodes (default N = 2000, 20004, 100000):
  x -> QuantizeLinear -> DequantizeLinear -> [Conv (weight: int8 per-channel initializer behind
  DequantizeLinear, axis 0; bias: int32 initializer, scale x_scale * w_scale, behind
  DequantizeLinear) -> Relu -> QuantizeLinear (uint8, zero point 0) -> DequantizeLinear] repeated:
  6 nodes per block plus the first Q/DQ pair. Valid input for ``qfold convert``.

Measured commands, each in its own process (peak RSS from ``/usr/bin/time``'s %M, else from
``os.wait4``, which also counts this Python process's own peak):

* ``qfold fuse chain_N.onnx -o out.onnx``
* ``qfold quantize chain_N.onnx -o out.onnx --calib-random 2``
* ``qfold convert qdq_N.onnx -o out.onnx``

Each runs ``--runs`` times (default 3; once when the first run takes over 60 s) with a
``--timeout`` (default 300 s, recorded as ">300 s"). The markdown table gives the median wall
time and peak RSS, and for each command the time ratio of every size to the smallest one
(10x the nodes should cost about 10x the time: a ratio near 100 means quadratic work).

Usage (onnx + numpy, e.g. /work/venv from tools/requirements.txt)::

    cargo build --release
    /work/venv/bin/python tools/bench_engine.py                       # target/release/qfold
    /work/venv/bin/python tools/bench_engine.py --bin target/debug/qfold --label debug \\
        --sizes 1000,10002 --qdq-sizes 2000,20004 --only fuse
    /work/venv/bin/python tools/bench_engine.py --generate-only        # just write the models

Options: ``--sizes`` (chain node counts), ``--qdq-sizes``, ``--runs``, ``--bin`` (default
target/release/qfold if present, else target/debug/qfold with a warning), ``--only
fuse|quantize|convert`` (repeatable), ``--timeout``, ``--out DIR``, ``--label`` (printed with the
table), ``--mem-gb`` (address-space limit per run, default 16). The table is also written to
``DIR/results-<label>.md`` and the raw numbers to ``DIR/results-<label>.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
C = 4            # channels
HW = 8           # spatial size
OPSET = 13
GEN_VERSION = 1  # bump when the generators change, so cached models are rebuilt


# ----------------------------------------------------------------------------------------------
# model generators


def contraction_weight(rng: np.random.Generator) -> np.ndarray:
    w = rng.normal(0.0, 0.01, size=(C, C, 3, 3)).astype(np.float32)
    w[np.arange(C), np.arange(C), 1, 1] += 0.9
    return w


def make_chain(n_nodes: int, seed: int = 0) -> onnx.ModelProto:
    """Conv -> BN -> Relu blocks, n_nodes // 3 of them (at least one)."""
    rng = np.random.default_rng(seed)
    blocks = max(1, round(n_nodes / 3))
    nodes, inits = [], []
    x = "input"
    for i in range(blocks):
        w = contraction_weight(rng)
        b = rng.normal(0.0, 0.01, size=C).astype(np.float32)
        gamma = (1.0 + rng.normal(0.0, 0.01, size=C)).astype(np.float32)
        beta = np.full(C, 0.1, np.float32)
        mean = rng.normal(0.0, 0.01, size=C).astype(np.float32)
        var = (1.0 + np.abs(rng.normal(0.0, 0.01, size=C))).astype(np.float32)
        p = f"b{i}"
        for name, arr in ((f"{p}.conv.weight", w), (f"{p}.conv.bias", b), (f"{p}.bn.weight", gamma),
                          (f"{p}.bn.bias", beta), (f"{p}.bn.running_mean", mean), (f"{p}.bn.running_var", var)):
            inits.append(numpy_helper.from_array(arr, name))
        conv_out, bn_out = f"{p}.conv_out", f"{p}.bn_out"
        y = "output" if i == blocks - 1 else f"{p}.relu_out"
        nodes.append(helper.make_node("Conv", [x, f"{p}.conv.weight", f"{p}.conv.bias"], [conv_out],
                                      name=f"/{p}/conv/Conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("BatchNormalization",
                                      [conv_out, f"{p}.bn.weight", f"{p}.bn.bias", f"{p}.bn.running_mean",
                                       f"{p}.bn.running_var"], [bn_out], name=f"/{p}/bn/BatchNormalization",
                                      epsilon=1e-5))
        nodes.append(helper.make_node("Relu", [bn_out], [y], name=f"/{p}/relu/Relu"))
        x = y
    graph = helper.make_graph(
        nodes, f"conv_bn_relu_chain_{len(nodes)}",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, C, HW, HW])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, C, HW, HW])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="qfold-tools/bench_engine.py")
    model.ir_version = 8
    return model


def make_qdq(n_nodes: int, seed: int = 0) -> onnx.ModelProto:
    """ORT-style QDQ chain: Q -> DQ -> [DQ(w), DQ(b) -> Conv -> Relu -> Q -> DQ] * blocks."""
    rng = np.random.default_rng(seed)
    blocks = max(1, round((n_nodes - 2) / 6))
    act_scale = np.float32(2.0 / 255.0)  # activations stay in [0, ~1.3]
    nodes, inits = [], []
    inits += [numpy_helper.from_array(np.array(act_scale, np.float32), "act.scale"),
              numpy_helper.from_array(np.array(0, np.uint8), "act.zero_point")]
    nodes.append(helper.make_node("QuantizeLinear", ["input", "act.scale", "act.zero_point"], ["input_q"],
                                  name="input_QuantizeLinear"))
    nodes.append(helper.make_node("DequantizeLinear", ["input_q", "act.scale", "act.zero_point"], ["input_dq"],
                                  name="input_DequantizeLinear"))
    x = "input_dq"
    for i in range(blocks):
        p = f"b{i}"
        w = contraction_weight(rng)
        b = np.full(C, 0.1, np.float32) + rng.normal(0.0, 0.01, size=C).astype(np.float32)
        w_scale = (np.abs(w).reshape(C, -1).max(axis=1) / 127.0).astype(np.float32)
        wq = np.clip(np.round(w / w_scale[:, None, None, None]), -127, 127).astype(np.int8)
        b_scale = (act_scale * w_scale).astype(np.float32)
        bq = np.round(b / b_scale).astype(np.int32)
        inits += [
            numpy_helper.from_array(wq, f"{p}.conv.weight_quantized"),
            numpy_helper.from_array(w_scale, f"{p}.conv.weight_scale"),
            numpy_helper.from_array(np.zeros(C, np.int8), f"{p}.conv.weight_zero_point"),
            numpy_helper.from_array(bq, f"{p}.conv.bias_quantized"),
            numpy_helper.from_array(b_scale, f"{p}.conv.bias_scale"),
            numpy_helper.from_array(np.zeros(C, np.int32), f"{p}.conv.bias_zero_point"),
        ]
        nodes.append(helper.make_node(
            "DequantizeLinear", [f"{p}.conv.weight_quantized", f"{p}.conv.weight_scale",
                                 f"{p}.conv.weight_zero_point"], [f"{p}.conv.weight"],
            name=f"{p}.conv.weight_DequantizeLinear", axis=0))
        nodes.append(helper.make_node(
            "DequantizeLinear", [f"{p}.conv.bias_quantized", f"{p}.conv.bias_scale", f"{p}.conv.bias_zero_point"],
            [f"{p}.conv.bias"], name=f"{p}.conv.bias_DequantizeLinear", axis=0))
        nodes.append(helper.make_node("Conv", [x, f"{p}.conv.weight", f"{p}.conv.bias"], [f"{p}.conv_out"],
                                      name=f"/{p}/conv/Conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Relu", [f"{p}.conv_out"], [f"{p}.relu_out"], name=f"/{p}/relu/Relu"))
        nodes.append(helper.make_node("QuantizeLinear", [f"{p}.relu_out", "act.scale", "act.zero_point"],
                                      [f"{p}.relu_out_q"], name=f"{p}.relu_out_QuantizeLinear"))
        y = "output" if i == blocks - 1 else f"{p}.relu_out_dq"
        nodes.append(helper.make_node("DequantizeLinear", [f"{p}.relu_out_q", "act.scale", "act.zero_point"],
                                      [y], name=f"{p}.relu_out_DequantizeLinear"))
        x = y
    graph = helper.make_graph(
        nodes, f"qdq_chain_{len(nodes)}",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, C, HW, HW])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, C, HW, HW])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="qfold-tools/bench_engine.py")
    model.ir_version = 8
    return model


def generate(out: Path, kind: str, n: int) -> tuple[Path, int]:
    """Writes (or reuses) the model; returns its path and node count."""
    path = out / f"{kind}_{n}.onnx"
    stamp = out / f"{kind}_{n}.gen{GEN_VERSION}"
    if path.exists() and stamp.exists():
        return path, int(stamp.read_text())
    t0 = time.monotonic()
    model = make_chain(n) if kind == "chain" else make_qdq(n)
    onnx.save(model, str(path))
    stamp.write_text(str(len(model.graph.node)))
    print(f"generated {path} ({len(model.graph.node)} nodes, {path.stat().st_size / 2**20:.1f} MiB) "
          f"in {time.monotonic() - t0:.1f} s", flush=True)
    return path, len(model.graph.node)


# ----------------------------------------------------------------------------------------------
# measuring


TIME = "/usr/bin/time" if os.access("/usr/bin/time", os.X_OK) else None


def measure(argv: list[str], timeout: float, mem_bytes: int | None, cwd: Path):
    """Runs argv once; returns (seconds or None on timeout, peak RSS MiB, exit code, stderr tail).

    Peak RSS comes from /usr/bin/time (GNU time's %M) when it is there: a child forked straight
    from this Python process would report Python's own peak too (Linux carries the pre-exec
    high-water mark into ru_maxrss), which after generating a 100k-node graph is hundreds of MiB.
    Without /usr/bin/time it falls back to os.wait4's rusage, and says so."""
    def limits():
        if mem_bytes:
            resource.setrlimit(resource.RLIMIT_AS, (mem_bytes, mem_bytes))
    errf = open(cwd / "stderr.txt", "w+b")
    rfile = cwd / "rusage.txt"
    full = [TIME, "-f", "%e %M", "-o", str(rfile)] + argv if TIME else argv
    t0 = time.monotonic()
    p = subprocess.Popen(full, stdout=subprocess.DEVNULL, stderr=errf, preexec_fn=limits, cwd=cwd,
                         start_new_session=True)
    while True:
        pid, status, ru = os.wait4(p.pid, os.WNOHANG)
        if pid == p.pid:
            secs = time.monotonic() - t0
            break
        if time.monotonic() - t0 > timeout:
            os.killpg(p.pid, signal.SIGKILL)
            _, status, ru = os.wait4(p.pid, 0)
            secs = None
            break
        time.sleep(0.01 if time.monotonic() - t0 < 2 else 0.1)
    p.returncode = os.waitstatus_to_exitcode(status)
    peak = ru.ru_maxrss / 1024.0
    if TIME and secs is not None and rfile.exists():
        lines = rfile.read_text().strip().splitlines()
        if lines and len(lines[-1].split()) == 2:
            peak = int(lines[-1].split()[1]) / 1024.0
        if lines and lines[0].startswith("Command terminated by signal"):
            p.returncode = -int(lines[0].split()[-1])
    errf.seek(0)
    tail = errf.read().decode("utf-8", "replace").strip().splitlines()[-3:]
    errf.close()
    return secs, peak, p.returncode, " / ".join(tail)


def default_bin() -> tuple[str, str]:
    rel = ROOT / "target" / "release" / "qfold"
    if rel.exists():
        return str(rel), "release"
    dbg = ROOT / "target" / "debug" / "qfold"
    print(f"warning: {rel} not found (cargo build --release); using {dbg}: DEBUG numbers", file=sys.stderr)
    return str(dbg), "debug"


def fmt_secs(s, timeout):
    return f">{timeout:.0f} s" if s is None else f"{s:.2f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000,10002,50001", help="Conv-BN-Relu chain node counts")
    ap.add_argument("--qdq-sizes", default="2000,20004,100000", help="QDQ chain node counts")
    ap.add_argument("--runs", type=int, default=3, help="runs per measurement (1 when a run takes > 60 s)")
    ap.add_argument("--bin", help="qfold binary (default target/release/qfold, else target/debug/qfold)")
    ap.add_argument("--label", help="build label printed with the table (default: release/debug from the path)")
    ap.add_argument("--only", action="append", choices=["fuse", "quantize", "convert"],
                    help="only this command (repeatable)")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per run (default 300)")
    ap.add_argument("--mem-gb", type=float, default=16.0, help="address-space limit per run, GB (0: none)")
    ap.add_argument("--out", default="/tmp/qfold-bench", help="where models and results go")
    ap.add_argument("--generate-only", action="store_true", help="write the models and exit")
    args = ap.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    qdq_sizes = [int(s) for s in args.qdq_sizes.split(",") if s]
    only = args.only or ["fuse", "quantize", "convert"]

    plan = []  # (command, kind, requested size)
    for cmd in ("fuse", "quantize", "convert"):
        if cmd in only:
            for n in (qdq_sizes if cmd == "convert" else sizes):
                plan.append((cmd, "qdq" if cmd == "convert" else "chain", n))
    models = {}
    for _, kind, n in plan:
        if (kind, n) not in models:
            models[(kind, n)] = generate(out, kind, n)
    if args.generate_only:
        return 0

    if args.bin:
        bin_path = str(Path(args.bin).resolve())
        label = args.label or ("release" if "/release/" in bin_path else "debug" if "/debug/" in bin_path
                               else "unlabelled build")
    else:
        bin_path, label = default_bin()
        label = args.label or label
    if not os.access(bin_path, os.X_OK):
        sys.exit(f"error: qfold binary {bin_path} not found")
    mem = int(args.mem_gb * 2**30) if args.mem_gb > 0 else None
    work = out / "work"
    work.mkdir(exist_ok=True)

    rows = []
    for cmd, kind, n in plan:
        path, nodes = models[(kind, n)]
        dst = work / "out.onnx"
        argv = [bin_path, cmd, str(path), "-o", str(dst)]
        if cmd == "quantize":
            argv += ["--calib-random", "2"]
        times, rss, codes, note = [], [], [], ""
        for r in range(args.runs):
            for f in work.iterdir():
                if f.name not in ("stderr.txt", "rusage.txt"):
                    f.unlink()
            secs, peak, code, tail = measure(argv, args.timeout, mem, work)
            times.append(secs)
            rss.append(peak)
            codes.append(code)
            print(f"{cmd} {path.name} run {r + 1}: {fmt_secs(secs, args.timeout)} s, {peak:.0f} MiB, exit {code}"
                  + (f" ({tail})" if code != 0 and secs is not None else ""), flush=True)
            if secs is None or code != 0:
                note = "timeout" if secs is None else f"exit {code}: {tail}"
                break
            if secs > 60:
                break
        done = [t for t in times if t is not None]
        median = statistics.median(done) if done and len(done) == len(times) else None
        rows.append({"command": cmd, "model": path.name, "nodes": nodes, "bytes": path.stat().st_size,
                     "runs": len(times), "times": times, "median_s": median, "peak_rss_mib": max(rss),
                     "exit": codes, "note": note,
                     "argv": ["qfold" if a == bin_path else a for a in argv]})

    lines = [f"### qfold engine benchmark ({label} build: {bin_path})", "",
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {os.cpu_count()} cores; "
             f"timeout {args.timeout:.0f} s; peak RSS from {'/usr/bin/time' if TIME else 'os.wait4 (includes Python)'}", "",
             "| command | model | nodes | MiB | runs | median wall s | peak RSS MiB | time vs smallest graph |",
             "|---|---|---|---|---|---|---|---|"]
    prev = {}  # the smallest size of each command: ratios are against it (10x nodes: ~10x time?)
    for r in rows:
        p = prev.get(r["command"])
        ratio = ""
        if p and p["median_s"] and r["median_s"]:
            ratio = f"{r['median_s'] / p['median_s']:.1f}x for {r['nodes'] / p['nodes']:.1f}x nodes"
        elif p and p["median_s"] and r["median_s"] is None and r["note"] == "timeout":
            ratio = f">{args.timeout / p['median_s']:.0f}x for {r['nodes'] / p['nodes']:.1f}x nodes"
        med = fmt_secs(r["median_s"], args.timeout) if r["note"] in ("", "timeout") else f"failed ({r['note'][:60]})"
        lines.append(f"| {r['command']} | {r['model']} | {r['nodes']} | {r['bytes'] / 2**20:.1f} | {r['runs']} | "
                     f"{med} | {r['peak_rss_mib']:.0f} | {ratio} |")
        prev.setdefault(r["command"], r)
    report = "\n".join(lines)
    print("\n" + report)
    (out / f"results-{label}.md").write_text(report + "\n")
    (out / f"results-{label}.json").write_text(json.dumps(rows, indent=1) + "\n")
    return 0 if all(all(c == 0 for c in r["exit"]) and r["note"] == "" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
