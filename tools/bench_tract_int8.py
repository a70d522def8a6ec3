"""tract's 8-bit convolution against its float one, on this machine.

Writes chains of N Conv layers (float) and the same chains as QLinearConv (u8 activations,
i8 per-tensor weights, one QuantizeLinear before and one DequantizeLinear after), then times
each with the latency example (one thread, median of RUNS runs after a warm-up):

    cargo build --release --example latency
    python tools/bench_tract_int8.py --latency-bin target/release/examples/latency

This is the ceiling of the tract preset's speed-up: a QOperator model cannot run faster than
tract runs its QLinearConv layers. Needs numpy and onnx (tools/requirements.txt).
"""
import argparse
import os
import subprocess
import tempfile

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

SHAPES = [(64, 56, 3), (128, 28, 3), (256, 14, 3), (512, 7, 3), (64, 56, 1)]


def save(path, nodes, inits, xshape):
    g = h.make_graph(nodes, "chain", [h.make_tensor_value_info("x", T.FLOAT, xshape)],
                     [h.make_tensor_value_info("y", T.FLOAT, None)], inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 13)])
    m.ir_version = 7
    onnx.save(m, path)


def chain(folder, c, hw, k, n, rng):
    pads = [k // 2] * 4
    fnodes, finits = [], []
    qnodes = [h.make_node("QuantizeLinear", ["x", "s", "z"], ["a0"])]
    qinits = [nh.from_array(np.array(0.02, np.float32), "s"), nh.from_array(np.array(128, np.uint8), "z"),
              nh.from_array(np.array(0.001, np.float32), "ws"), nh.from_array(np.array(0, np.int8), "wz")]
    prev = "x"
    for i in range(n):
        w = (rng.standard_normal((c, c, k, k)) * 0.05).astype(np.float32)
        finits.append(nh.from_array(w, f"W{i}"))
        out = "y" if i == n - 1 else f"f{i}"
        fnodes.append(h.make_node("Conv", [prev, f"W{i}"], [out], pads=pads))
        prev = out
        qinits.append(nh.from_array(np.clip(np.round(w / 0.001), -127, 127).astype(np.int8), f"Q{i}"))
        qnodes.append(h.make_node("QLinearConv", [f"a{i}", "s", "z", f"Q{i}", "ws", "wz", "s", "z"],
                                  [f"a{i + 1}"], pads=pads))
    qnodes.append(h.make_node("DequantizeLinear", [f"a{n}", "s", "z"], ["y"]))
    tag = f"c{c}_{hw}x{hw}_k{k}"
    fp, qp = os.path.join(folder, f"f32_{tag}.onnx"), os.path.join(folder, f"q8_{tag}.onnx")
    save(fp, fnodes, finits, [1, c, hw, hw])
    save(qp, qnodes, qinits, [1, c, hw, hw])
    return tag, fp, qp


def median_ms(bin_, model, runs):
    out = subprocess.run([bin_, model, str(runs)], capture_output=True, text=True, check=True).stdout
    return float(out.split()[0])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--latency-bin", required=True)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3, help="float and int8 timed alternately, median of the rounds")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as d:
        print(f"| {args.layers} layers, channels, input | float ms | QLinearConv ms | ratio |")
        print("|---|---|---|---|")
        for c, hw, k in SHAPES:
            tag, fp, qp = chain(d, c, hw, k, args.layers, rng)
            f, q = [], []
            for _ in range(args.rounds):
                f.append(median_ms(args.latency_bin, fp, args.runs))
                q.append(median_ms(args.latency_bin, qp, args.runs))
            fm, qm = float(np.median(f)), float(np.median(q))
            print(f"| {k}x{k} Conv, {c} ch, {hw}x{hw} | {fm:.2f} | {qm:.2f} | {qm / fm:.2f} |", flush=True)


if __name__ == "__main__":
    main()
