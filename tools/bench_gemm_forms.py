#!/usr/bin/env python3
"""Which QOperator form for a Gemm with a bias runs fastest in tract, and how exact is it?

Builds a float Gemm model (A [M, K] x B^T [K, N] + C [N], K = N = 1024, M = 64 by default),
quantizes it with qfold (QDQ, per-channel int8 weights), and compares in tract:
  * float:             the float model;
  * qdq:               qfold's QDQ model (tract runs DQ -> Gemm -> Q in float);
  * conv (qfold):      qfold's QOperator form: Unsqueeze -> 1-wide QLinearConv with the int32
                       bias -> Squeeze, all on 8-bit tensors;
  * matmul + add:      the alternative: QLinearMatMul (no bias input) -> DequantizeLinear ->
                       float Add of C -> QuantizeLinear, built here from qfold's own parameters
                       (the QLinearMatMul output reuses the final output's scale and zero point,
                       the only parameters available without a second calibration).
Latency is the median of repeated single-threaded runs (examples/latency.rs, release build);
SQNR against the float model from `qfold check`.

Usage: /work/venv/bin/python tools/bench_gemm_forms.py [--qfold Q] [--latency L] [--m 64]
"""
import argparse
import os
import subprocess
import tempfile

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--qfold", default="/work/target-release/release/qfold")
    ap.add_argument("--latency", default="/work/target-release/release/examples/latency")
    ap.add_argument("--m", type=int, default=64)
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=50)
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="qfold-gemm-")
    rng = np.random.default_rng(0)
    M, K, N = a.m, a.k, a.n
    B = (rng.standard_normal((N, K)) / np.sqrt(K)).astype(np.float32)
    C = rng.standard_normal(N).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("Gemm", ["a", "B", "C"], ["y"], name="fc", transB=1)],
        "gemm",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [M, K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [M, N])],
        [numpy_helper.from_array(B, "B"), numpy_helper.from_array(C, "C")],
    )
    float_path = os.path.join(tmp, "float.onnx")
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), float_path)
    qdq = os.path.join(tmp, "qdq.onnx")
    conv = os.path.join(tmp, "conv.onnx")
    calib = ["--calib-random", "16", "--seed", "0"]
    subprocess.run([a.qfold, "quantize", float_path, "-o", qdq, *calib, "--format", "qdq"], check=True, capture_output=True)
    subprocess.run([a.qfold, "quantize", float_path, "-o", conv, *calib, "--format", "qoperator"], check=True, capture_output=True)
    # matmul + add, from qfold's QDQ parameters
    m = onnx.load(qdq)
    init = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    nodes = {n.output[0]: n for n in m.graph.node}
    gemm = next(n for n in m.graph.node if n.op_type == "Gemm")
    dq_a, dq_b = nodes[gemm.input[0]], nodes[gemm.input[1]]
    q_y = next(n for n in m.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == gemm.output[0])
    bq = init[dq_b.input[0]]  # [N, K] int8, per-channel on axis 0
    inits = [
        numpy_helper.from_array(init[dq_a.input[1]], "a_s"), numpy_helper.from_array(init[dq_a.input[2]], "a_zp"),
        numpy_helper.from_array(np.ascontiguousarray(bq.T), "bT"),
        numpy_helper.from_array(init[dq_b.input[1]], "b_s"), numpy_helper.from_array(init[dq_b.input[2]], "b_zp"),
        numpy_helper.from_array(init[q_y.input[1]], "y_s"), numpy_helper.from_array(init[q_y.input[2]], "y_zp"),
        numpy_helper.from_array(C, "C"),
    ]
    g2 = helper.make_graph(
        [
            helper.make_node("QuantizeLinear", ["a", "a_s", "a_zp"], ["aq"]),
            helper.make_node("QLinearMatMul", ["aq", "a_s", "a_zp", "bT", "b_s", "b_zp", "y_s", "y_zp"], ["mq"]),
            helper.make_node("DequantizeLinear", ["mq", "y_s", "y_zp"], ["mf"]),
            helper.make_node("Add", ["mf", "C"], ["yf"]),
            helper.make_node("QuantizeLinear", ["yf", "y_s", "y_zp"], ["yq"]),
            helper.make_node("DequantizeLinear", ["yq", "y_s", "y_zp"], ["y"]),
        ],
        "matmul_add",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [M, K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [M, N])],
        inits,
    )
    mm = os.path.join(tmp, "matmul_add.onnx")
    onnx.save(helper.make_model(g2, opset_imports=[helper.make_opsetid("", 13)]), mm)
    print(f"Gemm [{M}x{K}] x [{K}x{N}] + C, tract, one thread, median of {a.runs} runs")
    print("| form | ms | SQNR vs float dB |")
    print("|---|---|---|")
    for name, path in [("float", float_path), ("qdq (float Gemm between DQ and Q)", qdq),
                       ("1-wide QLinearConv with int32 bias (qfold)", conv), ("QLinearMatMul + float Add", mm)]:
        lat = subprocess.run([a.latency, path, str(a.runs)], check=True, capture_output=True, text=True).stdout.split()[0]
        if path == float_path:
            s = "-"
        else:
            out = subprocess.run([a.qfold, "check", float_path, path, "--random", "4", "--json"], capture_output=True, text=True).stdout
            import json
            v = json.loads(out)["outputs"][0]["sqnr_db"]
            s = "inf" if v is None else f"{v:.2f}"
        print(f"| {name} | {lat} | {s} |", flush=True)


if __name__ == "__main__":
    main()
