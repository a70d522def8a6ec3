#!/usr/bin/env python3
"""Build onnx_models/accuracy_outlier: a small MLP whose first hidden activation is dominated by
one outlier channel, so plain MinMax quantization (one scale per activation tensor) crushes the
other channels, and the accuracy tools (per-activation calibration method, fallback to float)
have something to recover.

    x [N, 16] -> Gemm(16->32) -> Relu -> h1 -> Gemm(32->32) -> Relu -> Gemm(32->10) -> y

Channel 0 of the first Gemm has weights 60x larger than the others, and the second Gemm reads it
with weights 60x smaller: the function is balanced, but h1's range is set by channel 0 alone.

Deterministic (numpy seed 11). Writes model.onnx, calib/input.npy [8 samples x 16 rows],
eval/input.npy [4 x 16], provenance.json.

Usage: /work/venv/bin/python tools/make_accuracy_models.py
"""

import json
import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "onnx_models", "accuracy_outlier")
SEED = 11


def main():
    rng = np.random.default_rng(SEED)
    w1 = rng.normal(0, 0.3, (32, 16)).astype(np.float32)
    b1 = rng.normal(0, 0.1, 32).astype(np.float32)
    w1[0] *= 60.0
    b1[0] = 3.0
    w2 = rng.normal(0, 0.3, (32, 32)).astype(np.float32)
    w2[:, 0] /= 60.0
    b2 = rng.normal(0, 0.1, 32).astype(np.float32)
    w3 = rng.normal(0, 0.3, (10, 32)).astype(np.float32)
    b3 = rng.normal(0, 0.1, 10).astype(np.float32)
    inits = [numpy_helper.from_array(a, n) for a, n in
             [(w1, "fc1.weight"), (b1, "fc1.bias"), (w2, "fc2.weight"), (b2, "fc2.bias"),
              (w3, "fc3.weight"), (b3, "fc3.bias")]]
    nodes = [
        helper.make_node("Gemm", ["x", "fc1.weight", "fc1.bias"], ["a1"], name="fc1", transB=1),
        helper.make_node("Relu", ["a1"], ["h1"], name="relu1"),
        helper.make_node("Gemm", ["h1", "fc2.weight", "fc2.bias"], ["a2"], name="fc2", transB=1),
        helper.make_node("Relu", ["a2"], ["h2"], name="relu2"),
        helper.make_node("Gemm", ["h2", "fc3.weight", "fc3.bias"], ["y"], name="fc3", transB=1),
    ]
    g = helper.make_graph(
        nodes, "accuracy_outlier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], producer_name="qfold tools")
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    os.makedirs(os.path.join(ROOT, "calib"), exist_ok=True)
    os.makedirs(os.path.join(ROOT, "eval"), exist_ok=True)
    onnx.save(m, os.path.join(ROOT, "model.onnx"))
    calib = rng.normal(0, 1, (8, 16, 16)).astype(np.float32)
    evals = rng.normal(0, 1, (4, 16, 16)).astype(np.float32)
    np.save(os.path.join(ROOT, "calib", "input.npy"), calib)
    np.save(os.path.join(ROOT, "eval", "input.npy"), evals)
    with open(os.path.join(ROOT, "provenance.json"), "w") as f:
        json.dump({
            "script": "tools/make_accuracy_models.py",
            "seed": SEED,
            "numpy": np.__version__,
            "onnx": onnx.__version__,
            "model": "x[N,16] -> Gemm 16->32 (channel 0 weights x60, bias 3) -> Relu -> Gemm 32->32 "
                     "(column 0 / 60) -> Relu -> Gemm 32->10",
            "calib": "calib/input.npy: 8 samples of 16 rows, N(0, 1)",
            "eval": "eval/input.npy: 4 samples of 16 rows, N(0, 1)",
        }, f, indent=2, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main()
