#!/usr/bin/env python3
"""Generate the ONNX conformance corpus in onnx_models/conformance/.

Every case is a folder ``onnx_models/conformance/<case>/`` holding

* ``model.onnx``                 built by hand with ``onnx.helper``
* ``test_data_set_N/input_K.pb`` serialized ``TensorProto`` inputs (graph input order)
* ``test_data_set_N/output_K.pb`` expected outputs (graph output order), computed
  by ``onnx.reference.ReferenceEvaluator``
* ``provenance.json``            how the expected outputs were produced

Run from anywhere (paths are resolved relative to this file)::

    /work/venv/bin/python tools/make_conformance.py            # generate + verify + ORT table
    /work/venv/bin/python tools/make_conformance.py --no-ort   # skip the onnxruntime comparison

The output is deterministic: running the script twice yields byte-identical files.
Pinned tool versions: see tools/requirements.txt (onnx 1.17.0, numpy 1.26.4,
onnxruntime 1.20.1).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = ROOT / "onnx_models" / "conformance"
SCRIPT_REL = "tools/make_conformance.py"

# IR version 8 is accepted by the onnx 1.17 checker for opset 13 models and is
# understood by every consumer we care about (tract, onnxruntime 1.20).
IR_VERSION = 8
DEFAULT_OPSET = 13
PRODUCER = "qfold tools/make_conformance.py"

F32 = TensorProto.FLOAT
F16 = TensorProto.FLOAT16
BF16 = TensorProto.BFLOAT16
F64 = TensorProto.DOUBLE
I64 = TensorProto.INT64
I32 = TensorProto.INT32
I8 = TensorProto.INT8
U8 = TensorProto.UINT8
BOOL = TensorProto.BOOL


# --------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------


def vi(name: str, elem: int, shape):
    return helper.make_tensor_value_info(name, elem, shape)


def init(name: str, arr) -> TensorProto:
    """Initializer stored in raw_data (what numpy_helper.from_array does)."""
    return numpy_helper.from_array(np.asarray(arr), name=name)


def randn(rng, *shape, scale: float = 1.0) -> np.ndarray:
    return (rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)).astype(np.float32)


def model_of(nodes, name, inputs, outputs, initializers=(), opset=DEFAULT_OPSET, doc="",
             value_info=()):
    graph = helper.make_graph(list(nodes), name, list(inputs), list(outputs),
                              initializer=list(initializers), value_info=list(value_info))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name=PRODUCER, ir_version=IR_VERSION)
    model.doc_string = doc
    return model


def const_node(out: str, arr) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [out], value=numpy_helper.from_array(np.asarray(arr), name=out))


def run_reference(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    return [np.asarray(o) for o in ReferenceEvaluator(model).run(None, feeds)]


def run_reference_at_opset(model: onnx.ModelProto, feeds: dict, opset: int) -> list[np.ndarray]:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for op in m.opset_import:
        if op.domain in ("", "ai.onnx"):
            op.version = opset
    m.ir_version = max(m.ir_version, 9 if opset >= 19 else 8)
    return run_reference(m, feeds)


def run_reference_opset15(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    """onnx 1.17's ReferenceEvaluator BatchNormalization-9 treats the (always defaulted) momentum
    attribute as a request for training mode and normalizes with blended *batch* statistics,
    whereas the spec's single-output BatchNormalization-9 is inference mode (running mean/var).
    BatchNormalization-15 with its default training_mode=0 is the same inference formula, and the
    other ops used with it here (Conv, Relu, Constant) are unchanged between 13 and 15, so
    evaluate a copy of the model at opset 15. The committed model.onnx stays at opset 13."""
    return run_reference_at_opset(model, feeds, 15)


OPSET15_GENERATOR = "onnx.reference.ReferenceEvaluator (model copy evaluated at opset 15)"
OPSET15_NOTES = ("onnx 1.17's ReferenceEvaluator BatchNormalization-9 uses batch statistics (it mistakes the "
                 "defaulted momentum attribute for training mode); the expected outputs come from a copy "
                 "of this opset-13 model evaluated at opset 15 (BatchNormalization-15, training_mode=0: "
                 "the spec's inference formula), and were checked against "
                 "scale*(x-mean)/sqrt(var+epsilon)+B computed in numpy.")


def _bn_numpy(x, s, b, mean, var, eps):
    sh = (1, -1) + (1,) * (x.ndim - 2)
    return (s.reshape(sh) * (x - mean.reshape(sh)) / np.sqrt(var.reshape(sh) + np.float32(eps))
            + b.reshape(sh)).astype(np.float32)


def run_reference_opset19(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    """onnx 1.17's ReferenceEvaluator has DequantizeLinear only for opsets 19 and 21 (no
    DequantizeLinear-13 kernel). For int8/uint8 inputs with per-tensor or per-axis parameters
    DequantizeLinear-19 is identical to -13 (19 only adds float8 types), and every other op used
    alongside it here (Conv, Reshape, Gemm, Cast, Add) has the same semantics at opset 19 for
    these inputs, so evaluate a copy of the model with its default-domain opset import raised
    to 19. The committed model.onnx stays at opset 13."""
    return run_reference_at_opset(model, feeds, 19)


OPSET19_GENERATOR = "onnx.reference.ReferenceEvaluator (model copy evaluated at opset 19)"
OPSET19_NOTES = ("onnx 1.17's ReferenceEvaluator has no DequantizeLinear-13 kernel (only 19 and 21); "
                 "the expected outputs come from evaluating a copy of this opset-13 model with the "
                 "opset import raised to 19, where DequantizeLinear is unchanged for int8/uint8 inputs.")


# --------------------------------------------------------------------------------------
# case registry
# --------------------------------------------------------------------------------------


class Case:
    def __init__(self, name, seed, description, build):
        self.name = name
        self.seed = seed
        self.description = description
        self.build = build


CASES: list[Case] = []


def case(name: str, seed: int, description: str):
    def deco(fn):
        CASES.append(Case(name, seed, description, fn))
        return fn

    return deco


# A builder returns a dict:
#   model:     onnx.ModelProto
#   feeds:     list of {input_name: ndarray} (one per test_data_set)
#   external:  optional bool, save initializers to weights.bin
#   reference: optional callable(model, feeds) -> list[ndarray] replacing ReferenceEvaluator
#   generator: optional str describing the reference path (for provenance)
#   notes:     optional str for provenance


# ======================================================================================
# Conv
# ======================================================================================


@case("conv1d", 101, "1-D Conv, kernel 3, asymmetric pads [1,2], stride 2, with bias.")
def _conv1d(rng):
    x = randn(rng, 1, 3, 10)
    w = randn(rng, 4, 3, 3, scale=0.5)
    b = randn(rng, 4)
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], kernel_shape=[3], pads=[1, 2], strides=[2])
    m = model_of([node], "conv1d", [vi("x", F32, [1, 3, 10])], [vi("y", F32, [1, 4, 6])],
                 [init("w", w), init("b", b)])
    return dict(model=m, feeds=[{"x": x}])


@case("conv2d_basic", 102, "2-D Conv 3x3, pads 1, stride 1, with bias.")
def _conv2d_basic(rng):
    x = randn(rng, 1, 3, 6, 6)
    w = randn(rng, 4, 3, 3, 3, scale=0.5)
    b = randn(rng, 4)
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    m = model_of([node], "conv2d_basic", [vi("x", F32, [1, 3, 6, 6])], [vi("y", F32, [1, 4, 6, 6])],
                 [init("w", w), init("b", b)])
    return dict(model=m, feeds=[{"x": x}])


@case("conv2d_group", 103,
      "2-D grouped Conv: group=2, dilations 2, strides 2, asymmetric pads [1,0,2,1], with bias.")
def _conv2d_group(rng):
    x = randn(rng, 1, 4, 9, 9)
    w = randn(rng, 6, 2, 3, 3, scale=0.5)
    b = randn(rng, 6)
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], kernel_shape=[3, 3], group=2,
                            dilations=[2, 2], strides=[2, 2], pads=[1, 0, 2, 1])
    m = model_of([node], "conv2d_group", [vi("x", F32, [1, 4, 9, 9])], [vi("y", F32, [1, 6, 4, 3])],
                 [init("w", w), init("b", b)])
    return dict(model=m, feeds=[{"x": x}])


@case("conv2d_depthwise", 104, "Depthwise 2-D Conv (group = C = 4), 3x3, pads 1, with bias.")
def _conv2d_depthwise(rng):
    x = randn(rng, 1, 4, 6, 6)
    w = randn(rng, 4, 1, 3, 3, scale=0.5)
    b = randn(rng, 4)
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], kernel_shape=[3, 3], group=4,
                            pads=[1, 1, 1, 1])
    m = model_of([node], "conv2d_depthwise", [vi("x", F32, [1, 4, 6, 6])], [vi("y", F32, [1, 4, 6, 6])],
                 [init("w", w), init("b", b)])
    return dict(model=m, feeds=[{"x": x}])


@case("conv3d", 105, "3-D Conv 3x3x3, pads 1, with bias.")
def _conv3d(rng):
    x = randn(rng, 1, 2, 4, 5, 5)
    w = randn(rng, 3, 2, 3, 3, 3, scale=0.3)
    b = randn(rng, 3)
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], kernel_shape=[3, 3, 3], pads=[1] * 6)
    m = model_of([node], "conv3d", [vi("x", F32, [1, 2, 4, 5, 5])], [vi("y", F32, [1, 3, 4, 5, 5])],
                 [init("w", w), init("b", b)])
    return dict(model=m, feeds=[{"x": x}])


@case("conv2d_nobias", 106, "2-D Conv without bias input, batch 2, no padding, no kernel_shape attribute.")
def _conv2d_nobias(rng):
    x = randn(rng, 2, 3, 5, 5)
    w = randn(rng, 2, 3, 3, 3, scale=0.5)
    node = helper.make_node("Conv", ["x", "w"], ["y"])
    m = model_of([node], "conv2d_nobias", [vi("x", F32, [2, 3, 5, 5])], [vi("y", F32, [2, 2, 3, 3])],
                 [init("w", w)])
    return dict(model=m, feeds=[{"x": x}])


# ======================================================================================
# ConvTranspose
# ======================================================================================


@case("convtranspose1d", 111, "1-D ConvTranspose, kernel 3, stride 2, pads [1,1], with bias.")
def _convtranspose1d(rng):
    x = randn(rng, 1, 3, 5)
    w = randn(rng, 3, 2, 3, scale=0.5)  # [C_in, C_out/group, k]
    b = randn(rng, 2)
    node = helper.make_node("ConvTranspose", ["x", "w", "b"], ["y"], kernel_shape=[3], strides=[2],
                            pads=[1, 1])
    m = model_of([node], "convtranspose1d", [vi("x", F32, [1, 3, 5])], [vi("y", F32, [1, 2, 9])],
                 [init("w", w), init("b", b)])
    return dict(model=m, feeds=[{"x": x}])


@case("convtranspose2d", 112,
      "2-D ConvTranspose 3x3, strides 2, pads 1, output_padding [1,1], with bias.")
def _convtranspose2d(rng):
    x = randn(rng, 1, 2, 4, 4)
    w = randn(rng, 2, 3, 3, 3, scale=0.5)
    b = randn(rng, 3)
    node = helper.make_node("ConvTranspose", ["x", "w", "b"], ["y"], kernel_shape=[3, 3], strides=[2, 2],
                            pads=[1, 1, 1, 1], output_padding=[1, 1])
    m = model_of([node], "convtranspose2d", [vi("x", F32, [1, 2, 4, 4])], [vi("y", F32, [1, 3, 8, 8])],
                 [init("w", w), init("b", b)])
    return dict(model=m, feeds=[{"x": x}])


def _reference_convtranspose_grouped(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    """ReferenceEvaluator's ConvTranspose is wrong for group > 1 unless C_in == C_out and
    C_out/group == 1 (it slices W by output channels, reuses B[0..] for every group and
    writes one channel per group). Decompose into `group` group=1 ConvTranspose models,
    each evaluated by ReferenceEvaluator, and concatenate along the channel axis."""
    (node,) = [n for n in model.graph.node if n.op_type == "ConvTranspose"]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    group = attrs.pop("group")
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    x = feeds[node.input[0]]
    w = inits[node.input[1]]
    b = inits[node.input[2]] if len(node.input) > 2 and node.input[2] else None
    cin_g = w.shape[0] // group
    cout_g = w.shape[1]
    outs = []
    for g in range(group):
        xg = x[:, g * cin_g:(g + 1) * cin_g]
        wg = w[g * cin_g:(g + 1) * cin_g]
        ins = ["x", "w"]
        inits_g = [init("w", wg)]
        if b is not None:
            ins.append("b")
            inits_g.append(init("b", b[g * cout_g:(g + 1) * cout_g]))
        n = helper.make_node("ConvTranspose", ins, ["y"], **attrs)
        mg = model_of([n], f"group{g}", [vi("x", F32, list(xg.shape))], [vi("y", F32, None)], inits_g)
        outs.append(run_reference(mg, {"x": xg})[0])
    return [np.concatenate(outs, axis=1).astype(np.float32)]


@case("convtranspose2d_group", 113,
      "2-D grouped ConvTranspose: group=2, C_in=4, C_out=6, strides 2, pads 1, with bias.")
def _convtranspose2d_group(rng):
    x = randn(rng, 1, 4, 3, 3)
    w = randn(rng, 4, 3, 3, 3, scale=0.5)  # [C_in, C_out/group, kH, kW]
    b = randn(rng, 6)
    node = helper.make_node("ConvTranspose", ["x", "w", "b"], ["y"], kernel_shape=[3, 3], group=2,
                            strides=[2, 2], pads=[1, 1, 1, 1])
    m = model_of([node], "convtranspose2d_group", [vi("x", F32, [1, 4, 3, 3])],
                 [vi("y", F32, [1, 6, 5, 5])], [init("w", w), init("b", b)])
    return dict(model=m, feeds=[{"x": x}], reference=_reference_convtranspose_grouped,
                generator="onnx.reference.ReferenceEvaluator (per-group decomposition)",
                notes="ReferenceEvaluator's ConvTranspose mishandles group>1 with C_out/group>1 "
                      "(wrong weight slice, bias and channel placement), so the expected output is the "
                      "concatenation of ReferenceEvaluator runs of one group=1 ConvTranspose per group.")


# ======================================================================================
# BatchNormalization
# ======================================================================================


def _bn_params(rng, c):
    scale = rng.uniform(0.5, 1.5, c).astype(np.float32)
    bias = randn(rng, c)
    mean = randn(rng, c, scale=0.5)
    var = rng.uniform(0.25, 2.0, c).astype(np.float32)
    return scale, bias, mean, var


@case("batchnorm", 121, "BatchNormalization (inference) on a 4-D input with epsilon=1e-3.")
def _batchnorm(rng):
    x = randn(rng, 2, 3, 4, 4)
    s, b, mu, var = _bn_params(rng, 3)
    node = helper.make_node("BatchNormalization", ["x", "s", "b", "mean", "var"], ["y"], epsilon=1e-3)
    m = model_of([node], "batchnorm", [vi("x", F32, [2, 3, 4, 4])], [vi("y", F32, [2, 3, 4, 4])],
                 [init("s", s), init("b", b), init("mean", mu), init("var", var)])
    return dict(model=m, feeds=[{"x": x}], reference=run_reference_opset15, generator=OPSET15_GENERATOR,
                notes=OPSET15_NOTES,
                check=lambda f, o: np.allclose(o[0], _bn_numpy(f["x"], s, b, mu, var, 1e-3), rtol=1e-5, atol=1e-5))


@case("batchnorm_default_eps", 122,
      "BatchNormalization without an epsilon attribute (default 1e-5); small variances make eps matter.")
def _batchnorm_default_eps(rng):
    x = randn(rng, 1, 4, 3, 3)
    s, b, mu, _ = _bn_params(rng, 4)
    var = np.array([1e-4, 5e-4, 1e-3, 0.5], dtype=np.float32)
    node = helper.make_node("BatchNormalization", ["x", "s", "b", "mean", "var"], ["y"])
    m = model_of([node], "batchnorm_default_eps", [vi("x", F32, [1, 4, 3, 3])], [vi("y", F32, [1, 4, 3, 3])],
                 [init("s", s), init("b", b), init("mean", mu), init("var", var)])
    return dict(model=m, feeds=[{"x": x}], reference=run_reference_opset15, generator=OPSET15_GENERATOR,
                notes=OPSET15_NOTES,
                check=lambda f, o: np.allclose(o[0], _bn_numpy(f["x"], s, b, mu, var, 1e-5), rtol=1e-5, atol=1e-4))


# ======================================================================================
# Gemm / MatMul
# ======================================================================================


@case("gemm_transb", 131, "Gemm with transB=1, alpha=0.5, beta=2, C of shape [N].")
def _gemm_transb(rng):
    a = randn(rng, 3, 5)
    bm = randn(rng, 4, 5)
    c = randn(rng, 4)
    node = helper.make_node("Gemm", ["a", "b", "c"], ["y"], transB=1, alpha=0.5, beta=2.0)
    m = model_of([node], "gemm_transb", [vi("a", F32, [3, 5])], [vi("y", F32, [3, 4])],
                 [init("b", bm), init("c", c)])
    return dict(model=m, feeds=[{"a": a}])


@case("gemm_transa", 132, "Gemm with transA=1 (A input is [K,M]), C of shape [1,N].")
def _gemm_transa(rng):
    a = randn(rng, 5, 3)
    bm = randn(rng, 5, 4)
    c = randn(rng, 1, 4)
    node = helper.make_node("Gemm", ["a", "b", "c"], ["y"], transA=1)
    m = model_of([node], "gemm_transa", [vi("a", F32, [5, 3])], [vi("y", F32, [3, 4])],
                 [init("b", bm), init("c", c)])
    return dict(model=m, feeds=[{"a": a}])


@case("gemm_c_full", 133, "Gemm with transB=0 and a full [M,N] C, beta=0.75.")
def _gemm_c_full(rng):
    a = randn(rng, 3, 5)
    bm = randn(rng, 5, 4)
    c = randn(rng, 3, 4)
    node = helper.make_node("Gemm", ["a", "b", "c"], ["y"], beta=0.75)
    m = model_of([node], "gemm_c_full", [vi("a", F32, [3, 5])], [vi("y", F32, [3, 4])],
                 [init("b", bm), init("c", c)])
    return dict(model=m, feeds=[{"a": a}])


@case("gemm_c_scalar", 134, "Gemm with a rank-0 (scalar, shape []) C broadcast to [M,N], transB=1.")
def _gemm_c_scalar(rng):
    a = randn(rng, 3, 5)
    bm = randn(rng, 4, 5)
    c = np.array(0.625, dtype=np.float32)
    node = helper.make_node("Gemm", ["a", "b", "c"], ["y"], transB=1)
    m = model_of([node], "gemm_c_scalar", [vi("a", F32, [3, 5])], [vi("y", F32, [3, 4])],
                 [init("b", bm), init("c", c)])
    return dict(model=m, feeds=[{"a": a}])


@case("gemm_c_one", 135, "Gemm with a C of shape [1] broadcast to [M,N], beta=-1.5.")
def _gemm_c_one(rng):
    a = randn(rng, 3, 5)
    bm = randn(rng, 5, 4)
    c = np.array([0.375], dtype=np.float32)
    node = helper.make_node("Gemm", ["a", "b", "c"], ["y"], beta=-1.5)
    m = model_of([node], "gemm_c_one", [vi("a", F32, [3, 5])], [vi("y", F32, [3, 4])],
                 [init("b", bm), init("c", c)])
    return dict(model=m, feeds=[{"a": a}])


@case("gemm_no_c", 136, "Gemm with only A and B (no C input), alpha=1.5.")
def _gemm_no_c(rng):
    a = randn(rng, 3, 5)
    bm = randn(rng, 5, 4)
    node = helper.make_node("Gemm", ["a", "b"], ["y"], alpha=1.5)
    m = model_of([node], "gemm_no_c", [vi("a", F32, [3, 5])], [vi("y", F32, [3, 4])], [init("b", bm)])
    return dict(model=m, feeds=[{"a": a}])


@case("matmul", 141, "MatMul of a 2-D input [3,4] with a 2-D weight initializer [4,5].")
def _matmul(rng):
    x = randn(rng, 3, 4)
    w = randn(rng, 4, 5)
    node = helper.make_node("MatMul", ["x", "w"], ["y"])
    m = model_of([node], "matmul", [vi("x", F32, [3, 4])], [vi("y", F32, [3, 5])], [init("w", w)])
    return dict(model=m, feeds=[{"x": x}])


@case("matmul_batched", 142, "MatMul of a 3-D input [2,3,4] with a 2-D weight [4,5] (batch broadcast).")
def _matmul_batched(rng):
    x = randn(rng, 2, 3, 4)
    w = randn(rng, 4, 5)
    node = helper.make_node("MatMul", ["x", "w"], ["y"])
    m = model_of([node], "matmul_batched", [vi("x", F32, [2, 3, 4])], [vi("y", F32, [2, 3, 5])],
                 [init("w", w)])
    return dict(model=m, feeds=[{"x": x}])


# ======================================================================================
# Activations
# ======================================================================================


@case("relu", 151, "Relu on a 3-D input with mixed-sign values.")
def _relu(rng):
    x = randn(rng, 2, 3, 4)
    node = helper.make_node("Relu", ["x"], ["y"])
    m = model_of([node], "relu", [vi("x", F32, [2, 3, 4])], [vi("y", F32, [2, 3, 4])])
    return dict(model=m, feeds=[{"x": x}])


@case("clip", 152, "Clip (opset 13) with min/max given as scalar initializer inputs (-0.5, 1.0).")
def _clip(rng):
    x = randn(rng, 2, 3, 4, scale=1.5)
    node = helper.make_node("Clip", ["x", "lo", "hi"], ["y"])
    m = model_of([node], "clip", [vi("x", F32, [2, 3, 4])], [vi("y", F32, [2, 3, 4])],
                 [init("lo", np.array(-0.5, np.float32)), init("hi", np.array(1.0, np.float32))])
    return dict(model=m, feeds=[{"x": x}])


# ======================================================================================
# Quantization
# ======================================================================================


@case("quantize_linear_per_tensor", 161,
      "QuantizeLinear float32 -> uint8, per-tensor scale 0.02 / zero point 128 (saturating).")
def _ql_per_tensor(rng):
    x = randn(rng, 2, 3, 4, scale=1.5)
    node = helper.make_node("QuantizeLinear", ["x", "scale", "zp"], ["y"])
    m = model_of([node], "quantize_linear_per_tensor", [vi("x", F32, [2, 3, 4])], [vi("y", U8, [2, 3, 4])],
                 [init("scale", np.array(0.02, np.float32)), init("zp", np.array(128, np.uint8))])
    return dict(model=m, feeds=[{"x": x}])


@case("quantize_linear_int8", 162,
      "QuantizeLinear float32 -> int8, per-tensor scale 0.015 / zero point -3 (saturating).")
def _ql_int8(rng):
    x = randn(rng, 2, 3, 4, scale=1.5)
    node = helper.make_node("QuantizeLinear", ["x", "scale", "zp"], ["y"])
    m = model_of([node], "quantize_linear_int8", [vi("x", F32, [2, 3, 4])], [vi("y", I8, [2, 3, 4])],
                 [init("scale", np.array(0.015, np.float32)), init("zp", np.array(-3, np.int8))])
    return dict(model=m, feeds=[{"x": x}])


@case("quantize_linear_per_axis", 163,
      "QuantizeLinear float32 -> int8, per-channel (axis=1) scale and zero point, opset 13.")
def _ql_per_axis(rng):
    x = randn(rng, 2, 3, 4)
    scale = np.array([0.01, 0.02, 0.05], np.float32)
    zp = np.array([-5, 0, 7], np.int8)
    node = helper.make_node("QuantizeLinear", ["x", "scale", "zp"], ["y"], axis=1)
    m = model_of([node], "quantize_linear_per_axis", [vi("x", F32, [2, 3, 4])], [vi("y", I8, [2, 3, 4])],
                 [init("scale", scale), init("zp", zp)])
    return dict(model=m, feeds=[{"x": x}])


@case("dequantize_linear_per_tensor", 164,
      "DequantizeLinear uint8 input -> float32, per-tensor scale 0.05 / zero point 100.")
def _dql_per_tensor(rng):
    x = rng.integers(0, 256, size=(2, 3, 4), dtype=np.uint8)
    node = helper.make_node("DequantizeLinear", ["x", "scale", "zp"], ["y"])
    m = model_of([node], "dequantize_linear_per_tensor", [vi("x", U8, [2, 3, 4])], [vi("y", F32, [2, 3, 4])],
                 [init("scale", np.array(0.05, np.float32)), init("zp", np.array(100, np.uint8))])
    return dict(model=m, feeds=[{"x": x}], reference=run_reference_opset19,
                generator=OPSET19_GENERATOR, notes=OPSET19_NOTES)


@case("dequantize_linear_per_axis", 165,
      "DequantizeLinear int8 input -> float32, per-channel along axis 0 (scale and zero point [3]).")
def _dql_per_axis(rng):
    x = rng.integers(-128, 128, size=(3, 4, 2), dtype=np.int8)
    scale = np.array([0.1, 0.025, 0.003], np.float32)
    zp = np.array([3, -10, 0], np.int8)
    node = helper.make_node("DequantizeLinear", ["x", "scale", "zp"], ["y"], axis=0)
    m = model_of([node], "dequantize_linear_per_axis", [vi("x", I8, [3, 4, 2])], [vi("y", F32, [3, 4, 2])],
                 [init("scale", scale), init("zp", zp)])
    return dict(model=m, feeds=[{"x": x}], reference=run_reference_opset19,
                generator=OPSET19_GENERATOR, notes=OPSET19_NOTES)


def _reference_qlinearconv_per_channel(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    """onnx 1.17's ReferenceEvaluator QLinearConv cannot take a per-output-channel w_scale (it
    multiplies the [N,M,H,W] accumulator by a [M] vector, broadcasting on the last axis, and
    fails). Output channels are independent, so evaluate one QLinearConv per output channel (its
    weight slice, scalar w_scale / w_zero_point, bias element) with ReferenceEvaluator and
    concatenate along the channel axis."""
    (node,) = [n for n in model.graph.node if n.op_type == "QLinearConv"]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    names = list(node.input)
    x = feeds[names[0]]
    w, w_scale, w_zp = inits[names[3]], inits[names[4]], inits[names[5]]
    bias = inits[names[8]] if len(names) > 8 and names[8] else None
    outs = []
    for c in range(w.shape[0]):
        local = {n: inits[n] for n in names if n in inits}
        local[names[3]] = w[c:c + 1]
        local[names[4]] = np.asarray(w_scale.reshape(-1)[c] if w_scale.size > 1 else w_scale.reshape(()))
        local[names[5]] = np.asarray(w_zp.reshape(-1)[c] if w_zp.size > 1 else w_zp.reshape(()))
        if bias is not None:
            local[names[8]] = bias[c:c + 1]
        n = helper.make_node("QLinearConv", names, ["y"], **attrs)
        mc = model_of([n], f"oc{c}", [vi(names[0], U8, list(x.shape))], [vi("y", U8, None)],
                      [init(k, v) for k, v in local.items()])
        outs.append(run_reference(mc, {names[0]: x})[0])
    return [np.concatenate(outs, axis=1)]


@case("qlinearconv", 166,
      "QLinearConv: uint8 activation, int8 weight with per-output-channel scales (zero points 0), "
      "int32 bias, 3x3 pads 1, uint8 output.")
def _qlinearconv(rng):
    x = rng.integers(0, 256, size=(1, 3, 5, 5), dtype=np.uint8)
    w = rng.integers(-127, 128, size=(4, 3, 3, 3), dtype=np.int8)
    w_scale = np.array([0.002, 0.004, 0.003, 0.005], np.float32)
    b = rng.integers(-2000, 2000, size=(4,), dtype=np.int32)
    inits = [
        init("x_scale", np.array(0.02, np.float32)), init("x_zp", np.array(120, np.uint8)),
        init("w", w), init("w_scale", w_scale), init("w_zp", np.zeros(4, np.int8)),
        init("y_scale", np.array(0.05, np.float32)), init("y_zp", np.array(128, np.uint8)),
        init("b", b),
    ]
    node = helper.make_node("QLinearConv",
                            ["x", "x_scale", "x_zp", "w", "w_scale", "w_zp", "y_scale", "y_zp", "b"],
                            ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    m = model_of([node], "qlinearconv", [vi("x", U8, [1, 3, 5, 5])], [vi("y", U8, [1, 4, 5, 5])], inits)
    return dict(model=m, feeds=[{"x": x}], reference=_reference_qlinearconv_per_channel,
                generator="onnx.reference.ReferenceEvaluator (per-output-channel decomposition)",
                notes="ReferenceEvaluator's QLinearConv cannot apply a per-channel w_scale (broadcast "
                      "error), so the expected output is the channel-concatenation of ReferenceEvaluator "
                      "runs of one QLinearConv per output channel with scalar w_scale/w_zero_point.")


def _reference_qlinearmatmul_saturating(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    """onnx 1.17's ReferenceEvaluator QLinearMatMul rounds but does not saturate: it casts the
    requantized value straight to uint8, so 300 wraps to 44 instead of clamping to 255. Run
    ReferenceEvaluator with that one kernel overridden by a subclass computing exactly the same
    value and clamping it to the output type's range before the cast (the spec's saturation)."""
    from onnx.reference.ops.op_qlinear_matmul import QLinearMatMul as RefQLinearMatMul

    class QLinearMatMul(RefQLinearMatMul):  # noqa: N801 - class name must equal the op type
        op_domain = ""

        def _run(self, a, a_scale, a_zero_point, b, b_scale, b_zero_point, y_scale, y_zero_point):
            A = a.astype(np.int32) - a_zero_point.astype(np.int32)
            B = b.astype(np.int32) - b_zero_point.astype(np.int32)
            D = np.matmul(A, B) * (a_scale * b_scale / y_scale) + y_zero_point
            info = np.iinfo(y_zero_point.dtype)
            return (np.clip(np.rint(D), info.min, info.max).astype(y_zero_point.dtype),)

    return [np.asarray(o) for o in ReferenceEvaluator(model, new_ops=[QLinearMatMul]).run(None, feeds)]


@case("qlinearmatmul", 167, "QLinearMatMul: uint8 input [3,4] x uint8 weight [4,5], per-tensor params.")
def _qlinearmatmul(rng):
    a = rng.integers(0, 256, size=(3, 4), dtype=np.uint8)
    bm = rng.integers(0, 256, size=(4, 5), dtype=np.uint8)
    inits = [
        init("a_scale", np.array(0.02, np.float32)), init("a_zp", np.array(110, np.uint8)),
        init("b", bm), init("b_scale", np.array(0.03, np.float32)), init("b_zp", np.array(125, np.uint8)),
        init("y_scale", np.array(0.05, np.float32)), init("y_zp", np.array(128, np.uint8)),
    ]
    node = helper.make_node("QLinearMatMul", ["a", "a_scale", "a_zp", "b", "b_scale", "b_zp", "y_scale", "y_zp"],
                            ["y"])
    m = model_of([node], "qlinearmatmul", [vi("a", U8, [3, 4])], [vi("y", U8, [3, 5])], inits)
    return dict(model=m, feeds=[{"a": a}], reference=_reference_qlinearmatmul_saturating,
                generator="onnx.reference.ReferenceEvaluator (QLinearMatMul kernel patched to saturate)",
                notes="ReferenceEvaluator's QLinearMatMul wraps out-of-range results (astype) instead of "
                      "saturating; the expected output comes from ReferenceEvaluator with that kernel "
                      "overridden (new_ops) by the same computation plus a clamp to [0,255] before the "
                      "cast. Several outputs of this case saturate on purpose.",
                check=lambda f, o: (o[0] == 255).any() and (o[0] < 255).any())


# ======================================================================================
# Pooling / shape / elementwise
# ======================================================================================


@case("maxpool", 171, "2-D MaxPool kernel 3, stride 2, pads 1.")
def _maxpool(rng):
    x = randn(rng, 1, 2, 7, 7)
    node = helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    m = model_of([node], "maxpool", [vi("x", F32, [1, 2, 7, 7])], [vi("y", F32, [1, 2, 4, 4])])
    return dict(model=m, feeds=[{"x": x}])


@case("global_average_pool", 172, "GlobalAveragePool over a [1,3,5,5] input.")
def _gap(rng):
    x = randn(rng, 1, 3, 5, 5)
    node = helper.make_node("GlobalAveragePool", ["x"], ["y"])
    m = model_of([node], "global_average_pool", [vi("x", F32, [1, 3, 5, 5])], [vi("y", F32, [1, 3, 1, 1])])
    return dict(model=m, feeds=[{"x": x}])


@case("add", 173, "Add of two graph inputs with multidirectional broadcasting: [2,1,4,5] + [3,1,5].")
def _add(rng):
    a = randn(rng, 2, 1, 4, 5)
    b = randn(rng, 3, 1, 5)
    node = helper.make_node("Add", ["a", "b"], ["y"])
    m = model_of([node], "add", [vi("a", F32, [2, 1, 4, 5]), vi("b", F32, [3, 1, 5])],
                 [vi("y", F32, [2, 3, 4, 5])])
    return dict(model=m, feeds=[{"a": a, "b": b}])


@case("concat", 174, "Concat on axis 1 of two graph inputs and one initializer.")
def _concat(rng):
    a = randn(rng, 1, 2, 3, 3)
    b = randn(rng, 1, 3, 3, 3)
    c = randn(rng, 1, 1, 3, 3)
    node = helper.make_node("Concat", ["a", "b", "c"], ["y"], axis=1)
    m = model_of([node], "concat", [vi("a", F32, [1, 2, 3, 3]), vi("b", F32, [1, 3, 3, 3])],
                 [vi("y", F32, [1, 6, 3, 3])], [init("c", c)])
    return dict(model=m, feeds=[{"a": a, "b": b}])


@case("reshape", 175, "Reshape with an int64 shape initializer [0,-1,2] (0 = copy dim, -1 = inferred).")
def _reshape(rng):
    x = randn(rng, 2, 3, 4)
    node = helper.make_node("Reshape", ["x", "shape"], ["y"])
    m = model_of([node], "reshape", [vi("x", F32, [2, 3, 4])], [vi("y", F32, [2, 6, 2])],
                 [init("shape", np.array([0, -1, 2], np.int64))])
    return dict(model=m, feeds=[{"x": x}])


@case("flatten", 176, "Flatten with axis=1: [2,3,2,2] -> [2,12].")
def _flatten(rng):
    x = randn(rng, 2, 3, 2, 2)
    node = helper.make_node("Flatten", ["x"], ["y"], axis=1)
    m = model_of([node], "flatten", [vi("x", F32, [2, 3, 2, 2])], [vi("y", F32, [2, 12])])
    return dict(model=m, feeds=[{"x": x}])


# ======================================================================================
# Control flow
# ======================================================================================


@case("if_subgraph", 181,
      "If node on a bool input `cond`; both branches read the outer-scope initializer `outer_w` "
      "(then: Add(x, outer_w), else: Mul(x, outer_w)). test_data_set_0 has cond=True, "
      "test_data_set_1 has cond=False.")
def _if_subgraph(rng):
    x0 = randn(rng, 2, 3)
    x1 = randn(rng, 2, 3)
    w = randn(rng, 3)
    then_g = helper.make_graph([helper.make_node("Add", ["x", "outer_w"], ["then_out"])], "then_branch", [],
                               [vi("then_out", F32, [2, 3])])
    else_g = helper.make_graph([helper.make_node("Mul", ["x", "outer_w"], ["else_out"])], "else_branch", [],
                               [vi("else_out", F32, [2, 3])])
    node = helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g)
    m = model_of([node], "if_subgraph", [vi("x", F32, [2, 3]), vi("cond", BOOL, [])], [vi("y", F32, [2, 3])],
                 [init("outer_w", w)])
    return dict(model=m, feeds=[{"x": x0, "cond": np.array(True)}, {"x": x1, "cond": np.array(False)}])


def _reference_loop_stack_scan(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    """onnx 1.17's ReferenceEvaluator Loop joins scan outputs with np.vstack, which concatenates
    (rather than stacks) per-iteration values of rank >= 2: 4 iterations of [2,3] come out as
    [8,3] instead of [4,2,3]. vstack of equal-shape arrays is the C-order stack with the first two
    axes merged, so reshaping to [iterations, *per-iteration shape] recovers the spec result
    exactly. Loop-carried outputs are unaffected."""
    outs = run_reference(model, feeds)
    (loop,) = [n for n in model.graph.node if n.op_type == "Loop"]
    body = helper.get_attribute_value([a for a in loop.attribute if a.name == "body"][0])
    n_carried = len(body.input) - 2
    assert list(loop.output) == [o.name for o in model.graph.output]
    fixed = []
    for i, o in enumerate(outs):
        if i >= n_carried:  # scan output: body output 1 + i
            o = o.reshape([-1, *_out_shape(body.output[1 + i])])
        fixed.append(o)
    return fixed


@case("loop_subgraph", 182,
      "Loop with trip count 4 (int64 scalar initializer) and cond initializer True; loop-carried "
      "[2,3] tensor updated by adding the outer-scope initializer `outer_b` each iteration; scan "
      "output = carried value + float(iteration number), stacked to [4,2,3].")
def _loop_subgraph(rng):
    x = randn(rng, 2, 3)
    bvec = randn(rng, 3)
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Add", ["v_in", "outer_b"], ["v_out"]),
            helper.make_node("Cast", ["iter"], ["iter_f"], to=F32),
            helper.make_node("Add", ["v_out", "iter_f"], ["scan_out"]),
        ],
        "loop_body",
        [vi("iter", I64, []), vi("cond_in", BOOL, []), vi("v_in", F32, [2, 3])],
        [vi("cond_out", BOOL, []), vi("v_out", F32, [2, 3]), vi("scan_out", F32, [2, 3])],
    )
    node = helper.make_node("Loop", ["trip_count", "cond_init", "x"], ["y_final", "y_scan"], body=body)
    m = model_of([node], "loop_subgraph", [vi("x", F32, [2, 3])],
                 [vi("y_final", F32, [2, 3]), vi("y_scan", F32, [4, 2, 3])],
                 [init("trip_count", np.array(4, np.int64)), init("cond_init", np.array(True)),
                  init("outer_b", bvec)])
    return dict(model=m, feeds=[{"x": x}], reference=_reference_loop_stack_scan,
                generator="onnx.reference.ReferenceEvaluator (scan output reshaped)",
                notes="ReferenceEvaluator's Loop joins rank>=2 scan outputs with np.vstack ([8,3] instead "
                      "of [4,2,3]); the stored y_scan is that result reshaped to [4,2,3], which is exactly "
                      "the spec's stacking. y_final is the unmodified ReferenceEvaluator output.")


# ======================================================================================
# Constant nodes
# ======================================================================================


@case("constant_nodes", 191,
      "Conv -> BatchNormalization -> Relu where every weight and BN parameter comes from a Constant "
      "node (value = TensorProto); the graph has no initializers.")
def _constant_nodes(rng):
    x = randn(rng, 1, 2, 5, 5)
    w = randn(rng, 3, 2, 3, 3, scale=0.5)
    b = randn(rng, 3)
    s, bb, mu, var = _bn_params(rng, 3)
    nodes = [
        const_node("w", w), const_node("b", b),
        const_node("bn_s", s), const_node("bn_b", bb), const_node("bn_mean", mu), const_node("bn_var", var),
        helper.make_node("Conv", ["x", "w", "b"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "bn_s", "bn_b", "bn_mean", "bn_var"], ["n"], epsilon=1e-5),
        helper.make_node("Relu", ["n"], ["y"]),
    ]
    # Conv alone (initializers), for the independent BN/Relu check of the stored output.
    m_conv = model_of([nodes[6]], "conv_only", [vi("x", F32, [1, 2, 5, 5])], [vi("c", F32, [1, 3, 5, 5])],
                      [init("w", w), init("b", b)])
    m = model_of(nodes, "constant_nodes", [vi("x", F32, [1, 2, 5, 5])], [vi("y", F32, [1, 3, 5, 5])])
    return dict(model=m, feeds=[{"x": x}], reference=run_reference_opset15, generator=OPSET15_GENERATOR,
                notes=OPSET15_NOTES.replace("scale*(x-mean)", "Relu(scale*(conv-mean)").replace("+B computed", "+B) computed"),
                check=lambda f, o: np.allclose(
                    o[0], np.maximum(_bn_numpy(run_reference(m_conv, f)[0], s, bb, mu, var, 1e-5), 0),
                    rtol=1e-5, atol=1e-5))


@case("constant_attr_forms", 192,
      "Constant nodes using value_floats (Add bias), value_float (Clip min/max and a Mul scale) and "
      "value_ints (Reshape shape [4,-1]).")
def _constant_attr_forms(rng):
    x = randn(rng, 2, 3, 4)
    nodes = [
        helper.make_node("Constant", [], ["bias"], value_floats=[0.25, -0.5, 0.125, 1.0]),
        helper.make_node("Constant", [], ["lo"], value_float=-0.5),
        helper.make_node("Constant", [], ["hi"], value_float=0.75),
        helper.make_node("Constant", [], ["k"], value_float=2.5),
        helper.make_node("Constant", [], ["shape"], value_ints=[4, -1]),
        helper.make_node("Add", ["x", "bias"], ["t0"]),
        helper.make_node("Clip", ["t0", "lo", "hi"], ["t1"]),
        helper.make_node("Mul", ["t1", "k"], ["t2"]),
        helper.make_node("Reshape", ["t2", "shape"], ["y"]),
    ]
    m = model_of(nodes, "constant_attr_forms", [vi("x", F32, [2, 3, 4])], [vi("y", F32, [4, 6])])
    return dict(model=m, feeds=[{"x": x}])


# ======================================================================================
# Tensor storage: external data / typed fields
# ======================================================================================


def _conv_gemm_graph(name, inits, extra_nodes=(), out="y", flatten=False):
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Flatten", ["c"], ["r"], axis=1) if flatten
        else helper.make_node("Reshape", ["c", "shape"], ["r"]),
        helper.make_node("Gemm", ["r", "gw", "gc"], ["g" if extra_nodes else out], transB=1),
        *extra_nodes,
    ]
    return model_of(nodes, name, [vi("x", F32, [1, 2, 5, 5])], [vi(out, F32, [1, 4])], inits)


@case("external_data", 201,
      "Conv -> Flatten -> Gemm with every initializer stored as external data in one file "
      "weights.bin (location/offset/length; offsets 0, 216, 228, 1428).")
def _external_data(rng):
    # Flatten rather than Reshape: onnxruntime 1.20 refuses to load a model whose Reshape shape
    # tensor is external ("Cannot parse data from external tensors"), which would make this case
    # unusable as an ORT cross-check.
    x = randn(rng, 1, 2, 5, 5)
    inits = [
        init("w", randn(rng, 3, 2, 3, 3, scale=0.5)), init("b", randn(rng, 3)),
        init("gw", randn(rng, 4, 75, scale=0.2)), init("gc", randn(rng, 4)),
    ]
    m = _conv_gemm_graph("external_data", inits, flatten=True)
    return dict(model=m, feeds=[{"x": x}], external=True)


@case("external_data_typed", 202,
      "Conv -> Reshape -> Gemm plus bias terms where no initializer uses raw_data: float32 in "
      "float_data, int64 in int64_data, int32/int8/float16 (as uint16 bits) in int32_data, float64 in "
      "double_data.")
def _external_data_typed(rng):
    x = randn(rng, 1, 2, 5, 5)
    w = randn(rng, 3, 2, 3, 3, scale=0.5)
    b = randn(rng, 3)
    gw = randn(rng, 4, 75, scale=0.2)
    gc = randn(rng, 4)
    i32 = rng.integers(-3, 4, size=4, dtype=np.int32)
    h16 = randn(rng, 4).astype(np.float16)
    q8 = rng.integers(-100, 100, size=4, dtype=np.int8)
    d64 = rng.standard_normal(4)

    def typed(name, dt, arr):
        arr = np.asarray(arr)
        return helper.make_tensor(name, dt, list(arr.shape), arr.flatten().tolist(), raw=False)

    inits = [
        typed("w", F32, w), typed("b", F32, b),
        typed("shape", I64, np.array([1, -1], np.int64)),
        typed("gw", F32, gw), typed("gc", F32, gc),
        typed("i32", I32, i32),
        helper.make_tensor("h16", F16, [4], h16, raw=False),
        typed("q8", I8, q8), typed("q_scale", F32, np.array(0.01, np.float32)),
        typed("q_zp", I8, np.array(-2, np.int8)),
        typed("d64", F64, d64),
    ]
    for t in inits:
        assert not t.HasField("raw_data"), t.name
    extra = [
        helper.make_node("Cast", ["i32"], ["i32_f"], to=F32),
        helper.make_node("Cast", ["h16"], ["h16_f"], to=F32),
        helper.make_node("DequantizeLinear", ["q8", "q_scale", "q_zp"], ["q_f"]),
        helper.make_node("Cast", ["d64"], ["d64_f"], to=F32),
        helper.make_node("Add", ["g", "i32_f"], ["a1"]),
        helper.make_node("Add", ["a1", "h16_f"], ["a2"]),
        helper.make_node("Add", ["a2", "q_f"], ["a3"]),
        helper.make_node("Add", ["a3", "d64_f"], ["y"]),
    ]
    m = _conv_gemm_graph("external_data_typed", inits, extra)
    return dict(model=m, feeds=[{"x": x}], reference=run_reference_opset19,
                generator=OPSET19_GENERATOR, notes=OPSET19_NOTES)


# ======================================================================================
# dtypes
# ======================================================================================


@case("dtypes_float16", 211,
      "float16 Conv weight/bias initializers Cast to float32 at the graph edge, then a float32 Conv.")
def _dtypes_float16(rng):
    x = randn(rng, 1, 2, 5, 5)
    w = randn(rng, 3, 2, 3, 3, scale=0.5).astype(np.float16)
    b = randn(rng, 3).astype(np.float16)
    nodes = [
        helper.make_node("Cast", ["w16"], ["w"], to=F32),
        helper.make_node("Cast", ["b16"], ["b"], to=F32),
        helper.make_node("Conv", ["x", "w", "b"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
    ]
    m = model_of(nodes, "dtypes_float16", [vi("x", F32, [1, 2, 5, 5])], [vi("y", F32, [1, 3, 5, 5])],
                 [init("w16", w), init("b16", b)])
    return dict(model=m, feeds=[{"x": x}])


@case("dtypes_float16_model", 212,
      "Whole model in float16: float16 input, Add of a float16 initializer, Mul by a float16 "
      "initializer, float16 output.")
def _dtypes_float16_model(rng):
    x = randn(rng, 2, 3, 4).astype(np.float16)
    b = randn(rng, 4).astype(np.float16)
    s = randn(rng, 3, 1).astype(np.float16)
    nodes = [
        helper.make_node("Add", ["x", "b"], ["t"]),
        helper.make_node("Mul", ["t", "s"], ["y"]),
    ]
    m = model_of(nodes, "dtypes_float16_model", [vi("x", F16, [2, 3, 4])], [vi("y", F16, [2, 3, 4])],
                 [init("b", b), init("s", s)])
    return dict(model=m, feeds=[{"x": x}])


@case("dtypes_double", 213, "float64 model: Add of a float64 initializer then Mul by a float64 scalar.")
def _dtypes_double(rng):
    x = rng.standard_normal((2, 3, 4))
    b = rng.standard_normal((3, 4))
    nodes = [
        helper.make_node("Add", ["x", "b"], ["t"]),
        helper.make_node("Mul", ["t", "k"], ["y"]),
    ]
    m = model_of(nodes, "dtypes_double", [vi("x", F64, [2, 3, 4])], [vi("y", F64, [2, 3, 4])],
                 [init("b", b), init("k", np.array(1.0 / 3.0, np.float64))])
    return dict(model=m, feeds=[{"x": x}])


def _bf16_raw(name: str, values_f32: np.ndarray) -> TensorProto:
    """bfloat16 initializer in raw_data (little-endian uint16 = upper half of the float32 bits).
    The values are chosen exactly representable in bfloat16, so there is no rounding question."""
    bits = (values_f32.astype(np.float32).view(np.uint32) >> 16).astype("<u2")
    assert np.array_equal((bits.astype(np.uint32) << 16).view(np.float32), values_f32)
    t = TensorProto()
    t.name = name
    t.data_type = BF16
    t.dims.extend(values_f32.shape)
    t.raw_data = bits.tobytes()
    return t


def _reference_bf16_typed(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    """onnx 1.17's numpy_helper.to_array ignores raw_data for BFLOAT16 tensors (it only reads
    int32_data and otherwise returns uninitialised memory), so ReferenceEvaluator silently computes
    garbage from a raw bf16 initializer. Evaluate a copy in which every raw bf16 initializer is
    re-encoded bit-identically in int32_data."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for t in m.graph.initializer:
        if t.data_type == BF16 and t.HasField("raw_data"):
            bits = np.frombuffer(t.raw_data, dtype="<u2")
            t.ClearField("raw_data")
            t.int32_data.extend(int(b) for b in bits)
    return run_reference(m, feeds)


@case("dtypes_bfloat16", 214,
      "bfloat16 initializers Cast to float32 and added to the input: one stored in raw_data "
      "(as exporters write it), one in int32_data (typed field, one uint16 bit pattern per element).")
def _dtypes_bfloat16(rng):
    x = randn(rng, 2, 3, 4)
    w = randn(rng, 3, 4)
    w = ((w.view(np.uint32) >> 16) << 16).view(np.float32)  # truncate to bf16-representable
    b = randn(rng, 4)
    b = ((b.view(np.uint32) >> 16) << 16).view(np.float32)
    b_typed = helper.make_tensor("b_bf16", BF16, [4], b.tolist(), raw=False)
    assert not b_typed.HasField("raw_data") and len(b_typed.int32_data) == 4
    nodes = [
        helper.make_node("Cast", ["w_bf16"], ["w"], to=F32),
        helper.make_node("Cast", ["b_bf16"], ["b"], to=F32),
        helper.make_node("Add", ["x", "w"], ["t"]),
        helper.make_node("Add", ["t", "b"], ["y"]),
    ]
    m = model_of(nodes, "dtypes_bfloat16", [vi("x", F32, [2, 3, 4])], [vi("y", F32, [2, 3, 4])],
                 [_bf16_raw("w_bf16", w), b_typed])
    return dict(model=m, feeds=[{"x": x}], reference=_reference_bf16_typed,
                generator="onnx.reference.ReferenceEvaluator (raw bf16 re-encoded as int32_data)",
                notes="onnx 1.17's numpy_helper.to_array ignores raw_data for BFLOAT16 (returns "
                      "uninitialised memory), so the expected output comes from a copy of the model in "
                      "which w_bf16 is re-encoded bit-identically in int32_data. The stored output was "
                      "also checked against x + float32(w) + float32(b) computed directly in numpy.",
                check=lambda feeds, outs: np.array_equal(outs[0], (feeds["x"] + w) + b))


# ======================================================================================
# generation
# ======================================================================================


def _out_shape(value_info):
    t = value_info.type.tensor_type
    return [d.dim_value for d in t.shape.dim]


def write_tensor(path: Path, arr: np.ndarray, name: str) -> None:
    path.write_bytes(numpy_helper.from_array(np.asarray(arr), name=name).SerializeToString())


def read_tensor(path: Path) -> np.ndarray:
    t = TensorProto()
    t.ParseFromString(path.read_bytes())
    return numpy_helper.to_array(t)


def generate_case(c: Case) -> dict:
    rng = np.random.default_rng(c.seed)
    spec = c.build(rng)
    model: onnx.ModelProto = spec["model"]
    feeds_list = spec["feeds"]
    reference: Callable = spec.get("reference", run_reference)

    onnx.checker.check_model(model, full_check=True)

    d = OUT / c.name
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)

    in_names = [i.name for i in model.graph.input]
    out_names = [o.name for o in model.graph.output]
    # Elem types of graph inputs/outputs, to make sure generated data matches the declared dtype.
    in_types = {i.name: helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type) for i in model.graph.input}

    for k, feeds in enumerate(feeds_list):
        assert list(feeds) == in_names or set(feeds) == set(in_names), (c.name, list(feeds), in_names)
        for n in in_names:
            assert feeds[n].dtype == in_types[n], (c.name, n, feeds[n].dtype, in_types[n])
        outs = reference(model, feeds)
        assert len(outs) == len(out_names)
        if "check" in spec:
            assert spec["check"](feeds, outs), f"{c.name}: independent numpy check failed"
        for o, vo in zip(outs, model.graph.output):
            want_dt = helper.tensor_dtype_to_np_dtype(vo.type.tensor_type.elem_type)
            assert o.dtype == want_dt, (c.name, vo.name, o.dtype, want_dt)
            assert list(o.shape) == _out_shape(vo), (c.name, vo.name, o.shape, _out_shape(vo))
        ds = d / f"test_data_set_{k}"
        ds.mkdir()
        for i, n in enumerate(in_names):
            write_tensor(ds / f"input_{i}.pb", feeds[n], n)
        for i, (n, o) in enumerate(zip(out_names, outs)):
            write_tensor(ds / f"output_{i}.pb", o, n)

    model_path = d / "model.onnx"
    if spec.get("external"):
        # save_model mutates the proto (moves raw_data to weights.bin) -- work on a copy.
        ext = onnx.ModelProto()
        ext.CopyFrom(model)
        onnx.save_model(ext, str(model_path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location="weights.bin", size_threshold=0)
        # The full check (with shape inference) already passed on the in-memory model above; on
        # the saved file, onnx 1.17's shape inference cannot read external tensors (Reshape's
        # shape), so check the on-disk model structurally (this resolves weights.bin).
        onnx.checker.check_model(str(model_path))
        for t in onnx.load(str(model_path), load_external_data=False).graph.initializer:
            assert t.data_location == TensorProto.EXTERNAL and not t.HasField("raw_data"), t.name
    else:
        onnx.save_model(model, str(model_path))

    prov = {
        "case": c.name,
        "script": SCRIPT_REL,
        "generator": spec.get("generator", "onnx.reference.ReferenceEvaluator"),
        "onnx_version": onnx.__version__,
        "numpy_version": np.__version__,
        "seed": c.seed,
        "opset": model.opset_import[0].version,
        "ir_version": model.ir_version,
        "test_data_sets": len(feeds_list),
        "inputs": in_names,
        "outputs": out_names,
        "description": c.description,
    }
    if spec.get("notes"):
        prov["notes"] = spec["notes"]
    (d / "provenance.json").write_text(json.dumps(prov, indent=2) + "\n")
    return spec


# ======================================================================================
# verification
# ======================================================================================


def load_case(c: Case):
    d = OUT / c.name
    model = onnx.load(str(d / "model.onnx"))  # resolves weights.bin for external data
    sets = []
    for ds in sorted(d.glob("test_data_set_*")):
        ins = [read_tensor(p) for p in sorted(ds.glob("input_*.pb"), key=lambda p: int(p.stem.split("_")[1]))]
        outs = [read_tensor(p) for p in sorted(ds.glob("output_*.pb"), key=lambda p: int(p.stem.split("_")[1]))]
        sets.append((ins, outs))
    return model, sets


def verify_reference(c: Case, spec: dict) -> None:
    model, sets = load_case(c)
    reference = spec.get("reference", run_reference)
    in_names = [i.name for i in model.graph.input]
    for ins, outs in sets:
        got = reference(model, dict(zip(in_names, ins)))
        for g, e in zip(got, outs):
            assert g.dtype == e.dtype and g.shape == e.shape and np.array_equal(g, e), c.name


def compare_ort(c: Case):
    import onnxruntime as ort

    d = OUT / c.name
    model, sets = load_case(c)
    in_names = [i.name for i in model.graph.input]
    try:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        sess = ort.InferenceSession(str(d / "model.onnx"), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001
        return "N/A", f"load failed: {str(e).splitlines()[0][:90]}"
    worst_rel, worst_abs, max_int, f16_ulp, f16_ndiff = 0.0, 0.0, 0, 0.0, 0
    ok = True
    for ins, outs in sets:
        try:
            got = sess.run(None, dict(zip(in_names, ins)))
        except Exception as e:  # noqa: BLE001
            return "N/A", f"run failed: {str(e).splitlines()[0][:90]}"
        for g, e in zip(got, outs):
            if g.shape != e.shape or g.dtype != e.dtype:
                return "NO", f"shape/dtype {g.shape}/{g.dtype} vs {e.shape}/{e.dtype}"
            if np.issubdtype(e.dtype, np.integer):
                diff = int(np.max(np.abs(g.astype(np.int64) - e.astype(np.int64)))) if e.size else 0
                max_int = max(max_int, diff)
                ok &= diff == 0
            else:
                g64, e64 = g.astype(np.float64), e.astype(np.float64)
                absd = np.abs(g64 - e64)
                worst_abs = max(worst_abs, float(absd.max()))
                worst_rel = max(worst_rel, float((absd / np.maximum(np.abs(e64), 1e-6)).max()))
                ok &= bool(np.allclose(g64, e64, rtol=1e-5, atol=1e-6))
                if e.dtype == np.float16:
                    ulps = np.abs(g64 - e64) / np.spacing(np.abs(e)).astype(np.float64)
                    f16_ulp = max(f16_ulp, float(ulps.max()))
                    f16_ndiff += int((g != e).sum())
    detail = f"max_abs={worst_abs:.2e} max_rel={worst_rel:.2e}"
    if f16_ulp:
        detail += f" (float16: {f16_ndiff} elements differ, max {f16_ulp:.0f} ulp)"
    if max_int:
        detail += f" max_int_diff={max_int}"
    return ("yes" if ok else "NO"), detail


def dir_size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


README = """\
# ONNX conformance corpus

Tiny hand-built ONNX models with expected outputs, used to check qfold's loader,
fusion and quantization passes (and tract) against an independent reference.

Generated by `tools/make_conformance.py`; **do not edit by hand**. To regenerate, from the
repository root:

```sh
/work/venv/bin/python tools/make_conformance.py
```

(any Python with the pins in `tools/requirements.txt`: onnx 1.17.0, numpy 1.26.4,
onnxruntime 1.20.1; onnxruntime is only used for the optional cross-check table, skip it with
`--no-ort`). The script resolves paths relative to its own location and is deterministic:
running it twice produces byte-identical files.

## Layout

Each case is a folder `<case>/` with

* `model.onnx`: built with `onnx.helper`, opset {opset} unless noted, IR version {ir},
  passes `onnx.checker.check_model(..., full_check=True)`;
* `test_data_set_N/input_K.pb`, `test_data_set_N/output_K.pb`: serialized `TensorProto`s
  (the layout of the ONNX backend test suite), `K` in graph input / output order, tensor
  `name` = graph input / output name. Inputs are random (`numpy.random.default_rng(seed)`),
  outputs come from `onnx.reference.ReferenceEvaluator`;
* `provenance.json`: case, script, generator, onnx/numpy versions, seed, description;
* `external_data/weights.bin` (that case only): the external initializer data.

Weights are float32 initializers in `raw_data` unless the case says otherwise.

## Cases

| case | data sets | what it tests |
|------|-----------|---------------|
{rows}

## Where the expected outputs do not come from a plain `ReferenceEvaluator(model).run`

onnx 1.17's `ReferenceEvaluator` gets a few of these cases wrong or cannot run them. In each
case below the stored output is still produced by `ReferenceEvaluator`, on a minimally changed
but equivalent input, and `provenance.json` (`generator`, `notes`) says what was done.
onnxruntime agrees with every one of these outputs.

| case(s) | problem in onnx 1.17 | what the script does instead |
|---------|----------------------|------------------------------|
| `batchnorm`, `batchnorm_default_eps`, `constant_nodes` | BatchNormalization-9 uses *batch* statistics (mistakes the defaulted `momentum` for training mode) | evaluate a copy at opset 15 (BN-15, `training_mode=0` = the spec's inference formula); also checked against numpy |
| `dequantize_linear_per_tensor`, `dequantize_linear_per_axis`, `external_data_typed` | no DequantizeLinear-13 kernel (only 19 and 21) | evaluate a copy at opset 19 (identical for int8/uint8) |
| `convtranspose2d_group` | ConvTranspose with `group > 1` is wrong unless `C_in == C_out` and `C_out/group == 1` | one `group=1` ConvTranspose per group, outputs concatenated on channels |
| `qlinearconv` | QLinearConv cannot take a per-channel `w_scale` (broadcast error) | one QLinearConv per output channel with scalar `w_scale`, outputs concatenated |
| `qlinearmatmul` | QLinearMatMul wraps out-of-range results instead of saturating | same kernel with a clamp before the cast, passed via `new_ops` |
| `loop_subgraph` | Loop joins rank>=2 scan outputs with `np.vstack` (`[8,3]` instead of `[4,2,3]`) | reshape the scan output to `[4,2,3]` (exactly the spec's stacking) |
| `dtypes_bfloat16` | `numpy_helper.to_array` ignores `raw_data` for BFLOAT16 (returns uninitialised memory) | evaluate a copy with the raw bf16 tensor re-encoded bit-identically in `int32_data`; also checked against numpy |

Other notes:

* `external_data`: `onnx.checker.check_model(full_check=True)` runs on the in-memory model;
  the saved file is checked without shape inference, because onnx's (and onnxruntime's) shape
  inference cannot read an external tensor that feeds a shape input. For the same reason this
  case uses Flatten rather than Reshape (onnxruntime refuses to load a Reshape whose `shape` is
  external).
* `dtypes_float16_model`: the expected output rounds the intermediate Add result to float16,
  as the model's types say. onnxruntime's CPU provider computes the Add -> Mul chain in float32
  and differs by 1 float16 ulp on a few elements; an engine that keeps float16 intermediates
  should match exactly, one that upcasts should be compared with a float16 tolerance.
* Integer outputs (QuantizeLinear, QLinearConv, QLinearMatMul) use round-half-to-even as the
  spec requires; the random inputs are not chosen to hit exact ties.
"""


def write_readme() -> None:
    rows = []
    for c in CASES:
        n_sets = len(list((OUT / c.name).glob("test_data_set_*")))
        desc = c.description.replace("|", "\\|")
        rows.append(f"| `{c.name}` | {n_sets} | {desc} |")
    (OUT / "README.md").write_text(README.format(opset=DEFAULT_OPSET, ir=IR_VERSION, rows="\n".join(rows)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-ort", action="store_true", help="skip the onnxruntime comparison table")
    ap.add_argument("cases", nargs="*", help="only (re)generate these cases (default: all)")
    args = ap.parse_args()

    names = [c.name for c in CASES]
    assert len(names) == len(set(names)), "duplicate case names"
    selected = [c for c in CASES if not args.cases or c.name in args.cases]
    unknown = set(args.cases) - set(names)
    if unknown:
        print(f"unknown cases: {sorted(unknown)}", file=sys.stderr)
        return 2

    OUT.mkdir(parents=True, exist_ok=True)
    specs = {}
    for c in selected:
        specs[c.name] = generate_case(c)
        verify_reference(c, specs[c.name])
        print(f"generated + verified {c.name}")
    write_readme()

    if not args.no_ort:
        import onnxruntime as ort

        print(f"\nonnxruntime {ort.__version__} (CPUExecutionProvider) vs stored outputs "
              f"(agree = allclose rtol=1e-5 atol=1e-6; integers exact):")
        print(f"{'case':32} {'agree':6} detail")
        for c in selected:
            verdict, detail = compare_ort(c)
            print(f"{c.name:32} {verdict:6} {detail}")

    total = dir_size(OUT)
    print(f"\ntotal size of {OUT.relative_to(ROOT)}: {total} bytes ({total / 1024:.1f} KiB), "
          f"{len(CASES)} cases")
    return 0


if __name__ == "__main__":
    sys.exit(main())
