#!/usr/bin/env python3
"""Hand-built ONNX models that probe the edges of BatchNormalization folding ("traps").

Each case is a tiny opset-13 graph (opset 15 for training_mode) built with onnx.helper, random
weights from a fixed seed, and reference outputs computed by onnx.reference.ReferenceEvaluator on the
UNFUSED model: folding must not change the function, so these are also the expected outputs of the
fused model. provenance.json records "expect" ("fold", "skip" or "optional"), a "reason" for skips,
and how many BatchNormalization nodes should remain after `qfold fuse` in automatic mode.

As a cross-check of the folding math in DESIGN.md section 3, every "fold" case is also folded here in
numpy (float64, stored as the weight's dtype) and the folded model is evaluated again; the max abs
difference is recorded in provenance.json as python_fold.max_abs_diff (the folded model is not kept).

Usage: python tools/make_fusion_traps.py [--out onnx_models] [--only trap_a,trap_b]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import zlib

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fusion_common as fc  # noqa: E402

SCRIPT = "tools/make_fusion_traps.py"
OPSET = 13
IR_VERSION = 8  # opset 13..15 need IR >= 7/8; keeps the files readable by older tooling


def seed_of(case: str) -> int:
    return zlib.crc32(case.encode()) & 0x7FFFFFFF


# ---------------------------------------------------------------------------------------------
# Builder


class G:
    """Tiny graph builder: nodes, initializers, one rng per case."""

    def __init__(self, case: str, dtype=np.float32):
        self.case = case
        self.seed = seed_of(case)
        self.rng = np.random.default_rng(self.seed)
        self.dtype = dtype
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.feeds: list[np.ndarray] = []
        self.use_constant_nodes = False

    @property
    def elem(self):
        return helper.np_dtype_to_tensor_dtype(np.dtype(self.dtype))

    def const(self, name: str, arr: np.ndarray) -> str:
        arr = np.asarray(arr).astype(self.dtype)
        if self.use_constant_nodes:
            self.nodes.append(
                helper.make_node(
                    "Constant", [], [name], name=f"{name}_const",
                    value=numpy_helper.from_array(arr, name=name),
                )
            )
        else:
            self.inits.append(numpy_helper.from_array(arr, name=name))
        return name

    def randn(self, *shape, scale=1.0):
        return (self.rng.standard_normal(shape) * scale).astype(np.float64)

    def input(self, name: str, shape: list[int]) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, self.elem, shape))
        self.feeds.append(self.rng.standard_normal(shape).astype(self.dtype))
        return name

    def output(self, name: str, shape=None):
        self.outputs.append(helper.make_tensor_value_info(name, self.elem, shape))

    def node(self, op, ins, outs, name, **attrs):
        self.nodes.append(helper.make_node(op, ins, outs, name=name, **attrs))
        return outs[0] if len(outs) == 1 else outs

    def bn(self, x: str, y: str, name: str, c: int, epsilon=1e-5, var_scale=1.0, mean_scale=0.5,
           **attrs) -> str:
        """BatchNormalization with non-trivial statistics (some negative gammas)."""
        rng = self.rng
        gamma = rng.uniform(0.5, 1.5, c) * np.where(rng.random(c) < 0.25, -1.0, 1.0)
        beta = rng.standard_normal(c) * 0.5
        mean = rng.standard_normal(c) * mean_scale
        var = rng.uniform(0.2, 2.0, c) * var_scale
        ins = [
            x,
            self.const(f"{name}.weight", gamma),
            self.const(f"{name}.bias", beta),
            self.const(f"{name}.running_mean", mean),
            self.const(f"{name}.running_var", var),
        ]
        if epsilon is not None:
            attrs["epsilon"] = float(epsilon)
        return self.node("BatchNormalization", ins, [y], name, **attrs)

    def model(self, opset=OPSET) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, self.case, self.inputs, self.outputs, initializer=self.inits
        )
        m = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", opset)],
            ir_version=IR_VERSION,
            producer_name="qfold-tools/make_fusion_traps.py",
        )
        return m


# ---------------------------------------------------------------------------------------------
# Cases. Each returns (G, meta) where meta has description/expect/reason/bn_after_fuse.


def conv_bn(case, *, dims, cin, cout, k, group=1, transpose=False, bias=True, relu=False,
            strides=None, pads=None, output_padding=None, batch=2, spatial=5, epsilon=1e-5):
    g = G(case)
    shape = [batch, cin] + [spatial] * dims
    x = g.input("input", shape)
    if transpose:
        w = g.randn(cin, cout // group, *([k] * dims), scale=0.3)
        op = "ConvTranspose"
    else:
        w = g.randn(cout, cin // group, *([k] * dims), scale=0.3)
        op = "Conv"
    ins = [x, g.const("conv.weight", w)]
    if bias:
        ins.append(g.const("conv.bias", g.randn(cout, scale=0.5)))
    attrs = {"kernel_shape": [k] * dims, "group": group}
    if strides:
        attrs["strides"] = [strides] * dims
    if pads is not None:
        attrs["pads"] = [pads] * (2 * dims)
    if output_padding:
        attrs["output_padding"] = [output_padding] * dims
    g.node(op, ins, ["conv_out"], "conv", **attrs)
    if relu:
        g.bn("conv_out", "bn_out", "bn", cout, epsilon=epsilon)
        g.node("Relu", ["bn_out"], ["output"], "relu")
    else:
        g.bn("conv_out", "output", "bn", cout, epsilon=epsilon)
    g.output("output")
    return g


def case_convtranspose_grouped_bn():
    g = conv_bn("trap_convtranspose_grouped_bn", dims=2, cin=4, cout=6, k=3, group=2,
                transpose=True, strides=2, pads=1, output_padding=1)
    return g, dict(
        description="ConvTranspose2d(4 -> 6, k=3, stride 2, pad 1, output_padding 1, group=2, bias) "
        "-> BatchNormalization(6). Weight is [C_in=4, C_out/g=3, 3, 3]; output channel of W[i, j] "
        "is (i // 2) * 3 + j. PyTorch's own fuse_conv_bn_weights gets group > 1 wrong.",
        expect="fold", bn_after_fuse=0,
    )


def case_convtranspose_depthwise_bn():
    g = conv_bn("trap_convtranspose_depthwise_bn", dims=2, cin=4, cout=8, k=3, group=4,
                transpose=True, strides=2, pads=1)
    return g, dict(
        description="Depthwise ConvTranspose2d(4 -> 8, k=3, stride 2, pad 1, group=4 = C_in, channel "
        "multiplier 2, bias) -> BN(8). Weight [4, 2, 3, 3]; output channel of W[i, j] is i * 2 + j.",
        expect="fold", bn_after_fuse=0,
    )


def case_convtranspose3d_bn():
    g = conv_bn("trap_convtranspose3d_bn", dims=3, cin=3, cout=4, k=2, transpose=True,
                strides=2, bias=False, spatial=3)
    return g, dict(
        description="ConvTranspose3d(3 -> 4, k=2, stride 2, no bias) -> BN(4). Weight [3, 4, 2, 2, 2] "
        "(output channels on axis 1); the fold must create a bias.",
        expect="fold", bn_after_fuse=0,
    )


def case_conv1d_bn():
    g = conv_bn("trap_conv1d_bn", dims=1, cin=3, cout=5, k=3, pads=1, spatial=10, epsilon=1e-3)
    return g, dict(
        description="Conv1d(3 -> 5, k=3, pad 1, bias) -> BN(5, epsilon=1e-3) on [2, 3, 10].",
        expect="fold", bn_after_fuse=0,
    )


def case_conv3d_bn_relu():
    g = conv_bn("trap_conv3d_bn_relu", dims=3, cin=2, cout=4, k=3, pads=1, bias=False, relu=True,
                spatial=4)
    return g, dict(
        description="Conv3d(2 -> 4, k=3, pad 1, no bias) -> BN(4) -> Relu on [2, 2, 4, 4, 4]. "
        "Folds to Conv -> Relu (a ConvReLU group); the fold creates the bias.",
        expect="fold", bn_after_fuse=0,
    )


def case_conv_depthwise_bn():
    g = conv_bn("trap_conv_depthwise_bn", dims=2, cin=4, cout=4, k=3, group=4, pads=1)
    return g, dict(
        description="Depthwise Conv2d(4 -> 4, k=3, pad 1, group=4, bias) -> BN(4). Weight [4, 1, 3, 3].",
        expect="fold", bn_after_fuse=0,
    )


M, K, N = 4, 6, 5


def gemm_case(case, *, c_shape, trans_b, alpha, beta):
    g = G(case)
    a = g.input("input", [M, K])
    b = g.randn(N, K, scale=0.4) if trans_b else g.randn(K, N, scale=0.4)
    ins = [a, g.const("fc.weight", b)]
    if c_shape is not None:
        ins.append(g.const("fc.bias", g.randn(*c_shape, scale=0.5)))
    g.node("Gemm", ins, ["fc_out"], "fc", alpha=float(alpha), beta=float(beta), transB=int(trans_b))
    g.bn("fc_out", "output", "bn", N)
    g.output("output", [M, N])
    return g


def _gemm_desc(c_desc, trans_b, alpha, beta):
    return (
        f"Gemm(A [{M},{K}] graph input, B {'[N,K]' if trans_b else '[K,N]'} constant, transB={int(trans_b)}, "
        f"alpha={alpha}, beta={beta}, C {c_desc}) -> BatchNormalization({N}) on the rank-2 [M,N] output "
        f"(channel axis = last axis). Folded: scale B's output-channel axis "
        f"({'rows' if trans_b else 'columns'}), C' = (beta*C - mean)*s + beta_bn, beta := 1."
    )


def case_gemm_c_none():
    g = gemm_case("trap_gemm_c_none", c_shape=None, trans_b=0, alpha=0.7, beta=1.3)
    return g, dict(description=_gemm_desc("absent (a new [N] C is created)", 0, 0.7, 1.3),
                   expect="fold", bn_after_fuse=0)


def case_gemm_c_scalar():
    g = gemm_case("trap_gemm_c_scalar", c_shape=(), trans_b=0, alpha=0.7, beta=1.3)
    return g, dict(description=_gemm_desc("scalar, shape [] (becomes [N])", 0, 0.7, 1.3),
                   expect="fold", bn_after_fuse=0)


def case_gemm_c_n():
    g = gemm_case("trap_gemm_c_n", c_shape=(N,), trans_b=0, alpha=0.7, beta=1.3)
    return g, dict(description=_gemm_desc(f"[N]=[{N}]", 0, 0.7, 1.3), expect="fold", bn_after_fuse=0)


def case_gemm_c_1n():
    g = gemm_case("trap_gemm_c_1n", c_shape=(1, N), trans_b=0, alpha=0.7, beta=1.3)
    return g, dict(description=_gemm_desc(f"[1,N]=[1,{N}]", 0, 0.7, 1.3), expect="fold", bn_after_fuse=0)


def case_gemm_c_mn():
    g = gemm_case("trap_gemm_c_mn", c_shape=(M, N), trans_b=0, alpha=0.7, beta=1.3)
    return g, dict(description=_gemm_desc(f"[M,N]=[{M},{N}] (batch size fixed at {M})", 0, 0.7, 1.3),
                   expect="fold", bn_after_fuse=0)


def case_gemm_transb1():
    g = gemm_case("trap_gemm_transb1", c_shape=(N,), trans_b=1, alpha=1.0, beta=1.0)
    return g, dict(description=_gemm_desc(f"[N]=[{N}]", 1, 1.0, 1.0) + " This is the torch Linear layout.",
                   expect="fold", bn_after_fuse=0)


def case_matmul_bn():
    g = G("trap_matmul_bn")
    x = g.input("input", [M, K])
    g.node("MatMul", [x, g.const("fc.weight", g.randn(K, N, scale=0.4))], ["mm_out"], "matmul")
    g.bn("mm_out", "output", "bn", N)
    g.output("output", [M, N])
    return g, dict(
        description=f"2-D MatMul(X [{M},{K}], constant W [{K},{N}]) -> BN({N}). Folded: scale W's columns "
        "and add the BN shift with a new Add (or turn it into a Gemm).",
        expect="fold", bn_after_fuse=0,
    )


def case_matmul_add_bn():
    g = G("trap_matmul_add_bn")
    x = g.input("input", [M, K])
    g.node("MatMul", [x, g.const("fc.weight", g.randn(K, N, scale=0.4))], ["mm_out"], "matmul")
    g.node("Add", ["mm_out", g.const("fc.bias", g.randn(N, scale=0.5))], ["add_out"], "add")
    g.bn("add_out", "output", "bn", N)
    g.output("output", [M, N])
    return g, dict(
        description=f"2-D MatMul(X [{M},{K}], W [{K},{N}]) -> Add(bias [{N}]) -> BN({N}) "
        "(the torch Linear export pattern without Gemm). Folded into the existing bias Add.",
        expect="fold", bn_after_fuse=0,
    )


def case_bn_graph_output():
    g = G("trap_bn_graph_output")
    x = g.input("input", [2, 3, 6, 6])
    g.node("Conv", [x, g.const("conv.weight", g.randn(4, 3, 3, 3, scale=0.3)),
                    g.const("conv.bias", g.randn(4, scale=0.5))], ["conv_out"], "conv",
           kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    g.bn("conv_out", "output", "bn", 4)
    g.output("output")
    g.output("conv_out")
    return g, dict(
        description="Conv -> BN where the Conv output (conv_out) is ALSO a graph output. Graph outputs: "
        "[output (BN), conv_out].",
        expect="skip", reason="the intermediate Conv output is a graph output", bn_after_fuse=1,
    )


def case_bn_output_is_graph_output():
    g = G("trap_bn_output_is_graph_output")
    x = g.input("input", [2, 3, 6, 6])
    g.node("Conv", [x, g.const("conv.weight", g.randn(4, 3, 3, 3, scale=0.3)),
                    g.const("conv.bias", g.randn(4, scale=0.5))], ["conv_out"], "conv",
           kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    g.bn("conv_out", "features", "bn", 4)
    g.output("features")
    return g, dict(
        description="Conv -> BN where only the BN output is a graph output, named 'features'. The fused "
        "Conv must keep node name 'conv' and produce 'features' (the graph output name is preserved).",
        expect="fold", bn_after_fuse=0,
    )


def case_shared_weight():
    g = G("trap_shared_weight")
    x = g.input("input", [2, 3, 6, 6])
    w = g.const("shared.weight", g.randn(4, 3, 3, 3, scale=0.3))
    g.node("Conv", [x, w, g.const("conv1.bias", g.randn(4, scale=0.5))], ["conv1_out"], "conv1",
           kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    g.bn("conv1_out", "output1", "bn1", 4)
    g.node("Conv", [x, w, g.const("conv2.bias", g.randn(4, scale=0.5))], ["output2"], "conv2",
           kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    g.output("output1")
    g.output("output2")
    return g, dict(
        description="Two Convs share one weight initializer 'shared.weight'; only conv1 is followed by "
        "BN. The fold must clone the weight for conv1; conv2 keeps the original (output2 unchanged).",
        expect="fold", bn_after_fuse=0,
    )


def case_constant_params():
    g = G("trap_constant_params")
    g.use_constant_nodes = True
    x = g.input("input", [2, 3, 6, 6])
    g.node("Conv", [x, g.const("conv.weight", g.randn(4, 3, 3, 3, scale=0.3)),
                    g.const("conv.bias", g.randn(4, scale=0.5))], ["conv_out"], "conv",
           kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    g.bn("conv_out", "output", "bn", 4)
    g.output("output")
    return g, dict(
        description="Conv -> BN with every weight, bias and BN parameter coming from a Constant node "
        "(no initializers at all). Constant nodes count as constants for folding.",
        expect="fold", bn_after_fuse=0,
    )


def case_f16():
    g = G("trap_f16", dtype=np.float16)
    x = g.input("input", [2, 3, 6, 6])
    g.node("Conv", [x, g.const("conv.weight", g.randn(4, 3, 3, 3, scale=0.3)),
                    g.const("conv.bias", g.randn(4, scale=0.5))], ["conv_out"], "conv",
           kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    g.bn("conv_out", "bn_out", "bn", 4)
    g.node("Relu", ["bn_out"], ["output"], "relu")
    g.output("output")
    return g, dict(
        description="Conv -> BN -> Relu entirely in float16 (float16 initializers, input and output). "
        "Fold computes in f64 and stores f16. Reference output is ReferenceEvaluator's (numpy, computed "
        "in float16 per op); compare with an f16-appropriate tolerance (see f32_reference_max_abs_diff).",
        expect="fold", bn_after_fuse=0,
    )


def case_bn_no_epsilon():
    g = G("trap_bn_no_epsilon")
    x = g.input("input", [2, 3, 6, 6])
    g.node("Conv", [x, g.const("conv.weight", g.randn(4, 3, 3, 3, scale=0.01)),
                    g.const("conv.bias", g.randn(4, scale=0.01))], ["conv_out"], "conv",
           kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    g.bn("conv_out", "output", "bn", 4, epsilon=None, var_scale=1e-4, mean_scale=0.01)
    # statistics in the same scale as the tiny conv output, so the output stays O(1..10)
    g.output("output")
    return g, dict(
        description="Conv -> BN with NO epsilon attribute (ONNX default 1e-5) and running_var ~1e-4, "
        "so using any other epsilon (or none) changes the result by several percent.",
        expect="fold", bn_after_fuse=0,
    )


def case_conv_relu_bn():
    g = G("trap_conv_relu_bn")
    x = g.input("input", [2, 3, 6, 6])
    g.node("Conv", [x, g.const("conv.weight", g.randn(4, 3, 3, 3, scale=0.3)),
                    g.const("conv.bias", g.randn(4, scale=0.5))], ["conv_out"], "conv",
           kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    g.node("Relu", ["conv_out"], ["relu_out"], "relu")
    g.bn("relu_out", "output", "bn", 4)
    g.output("output")
    return g, dict(
        description="Conv -> Relu -> BN. BN cannot be folded backwards through the Relu. "
        "(Conv -> Relu may still be reported as a ConvReLU group; the graph is unchanged.)",
        expect="skip", reason="a Relu sits between Conv and BN (no backward fold)", bn_after_fuse=1,
    )


def case_bn_training_mode():
    g = G("trap_bn_training_mode")
    x = g.input("input", [2, 3, 6, 6])
    g.node("Conv", [x, g.const("conv.weight", g.randn(4, 3, 3, 3, scale=0.3)),
                    g.const("conv.bias", g.randn(4, scale=0.5))], ["conv_out"], "conv",
           kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    g.bn("conv_out", "output", "bn", 4, training_mode=1)
    # the checker requires all three outputs when training_mode=1; only Y is a graph output
    g.nodes[-1].output.extend(["bn.running_mean_out", "bn.running_var_out"])
    g.output("output")
    return g, dict(
        description="Conv -> BatchNormalization(training_mode=1) in opset 15. The ONNX checker requires "
        "all three outputs in training mode (Y, running_mean, running_var), so the node has three; only Y "
        "is a graph output, the other two are unused. In training "
        "mode Y is normalized with the BATCH statistics, so it is not a per-channel affine map of the "
        "Conv output and must not be folded. test_data_set_0/output_0.pb is the ONNX-spec (batch "
        "statistics) output from ReferenceEvaluator; inference_formula_output_0.pb beside model.onnx is "
        "what the running-statistics formula gives (what a runtime that ignores training_mode returns).",
        expect="skip", reason="BatchNormalization training_mode=1 (and three outputs)", bn_after_fuse=1,
        opset=15,
    )


def case_bn_multi_consumer():
    g = G("trap_bn_multi_consumer")
    x = g.input("input", [2, 3, 6, 6])
    g.node("Conv", [x, g.const("conv.weight", g.randn(4, 3, 3, 3, scale=0.3)),
                    g.const("conv.bias", g.randn(4, scale=0.5))], ["conv_out"], "conv",
           kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    g.bn("conv_out", "bn_out", "bn", 4)
    g.node("Add", ["conv_out", "bn_out"], ["output"], "add")
    g.output("output")
    return g, dict(
        description="Conv output consumed by BN and by an Add (output = conv_out + BN(conv_out)).",
        expect="skip", reason="the Conv output has two consumers", bn_after_fuse=1,
    )


def case_bn_before_conv():
    g = G("trap_bn_before_conv")
    x = g.input("input", [2, 3, 6, 6])
    g.bn(x, "bn_out", "bn", 3)
    g.node("Conv", ["bn_out", g.const("conv.weight", g.randn(4, 3, 3, 3, scale=0.3)),
                    g.const("conv.bias", g.randn(4, scale=0.5))], ["output"], "conv",
           kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    g.output("output")
    return g, dict(
        description="BN -> Conv(k=3, pad 1). A forward fold would be wrong at the border: the padding "
        "zeros are inserted after BN, so they are not shifted by BN's bias.",
        expect="skip", reason="BN before a Conv with padding (forward fold not exact)", bn_after_fuse=1,
    )


def case_bn_before_conv_nopad():
    g = G("trap_bn_before_conv_nopad")
    x = g.input("input", [2, 3, 6, 6])
    g.bn(x, "bn_out", "bn", 3)
    g.node("Conv", ["bn_out", g.const("conv.weight", g.randn(4, 3, 3, 3, scale=0.3)),
                    g.const("conv.bias", g.randn(4, scale=0.5))], ["output"], "conv",
           kernel_shape=[3, 3])
    g.output("output")
    return g, dict(
        description="BN -> Conv(k=3, no padding, group 1). A forward fold is exact here "
        "(W'[o,c] = W[o,c]*s[c], b'[o] = b[o] + sum_c,k W[o,c,k]*t[c]) but DESIGN.md only allows it, "
        "it does not require it; either result is correct.",
        expect="optional", reason="forward fold into an unpadded group-1 Conv is allowed, not required",
        bn_after_fuse=None,
    )


CASES = [
    case_convtranspose_grouped_bn,
    case_convtranspose_depthwise_bn,
    case_convtranspose3d_bn,
    case_conv1d_bn,
    case_conv3d_bn_relu,
    case_conv_depthwise_bn,
    case_gemm_c_none,
    case_gemm_c_scalar,
    case_gemm_c_n,
    case_gemm_c_1n,
    case_gemm_c_mn,
    case_gemm_transb1,
    case_matmul_bn,
    case_matmul_add_bn,
    case_bn_graph_output,
    case_bn_output_is_graph_output,
    case_shared_weight,
    case_constant_params,
    case_f16,
    case_bn_no_epsilon,
    case_conv_relu_bn,
    case_bn_training_mode,
    case_bn_multi_consumer,
    case_bn_before_conv,
    case_bn_before_conv_nopad,
]


# ---------------------------------------------------------------------------------------------
# Independent numpy fold (a cross-check of the math, not qfold's implementation)


def _consts(model):
    out = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant":
            out[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    return out


def _attr(node, name, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def python_fold(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Fold every Conv/ConvTranspose/Gemm/MatMul[/Add] -> BN pair whose intermediate has one
    consumer and is not a graph output. Returns (folded model, number of BNs folded)."""
    m = copy.deepcopy(model)
    g = m.graph
    consts = _consts(m)
    producers = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    outputs = {o.name for o in g.output}
    new_inits = []
    removed = []
    folded = 0

    def add_init(name, arr):
        new_inits.append(numpy_helper.from_array(arr, name=name))
        return name

    for bn in [n for n in g.node if n.op_type == "BatchNormalization"]:
        if _attr(bn, "training_mode", 0) or len(bn.output) != 1:
            continue
        x = bn.input[0]
        p = producers.get(x)
        if p is None or x in outputs or len(consumers.get(x, [])) != 1:
            continue
        gamma, beta, mean, var = (consts[i].astype(np.float64) for i in bn.input[1:5])
        eps = _attr(bn, "epsilon", 1e-5)
        s = gamma / np.sqrt(var + eps)
        t = beta - mean * s
        add_node = None
        if p.op_type == "Add":
            add_node, mm = p, producers.get(p.input[0])
            if mm is None or mm.op_type != "MatMul" or len(consumers[p.input[0]]) != 1:
                continue
            p = mm
        if p.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            continue
        wname = p.input[1]
        w = consts[wname]
        dt = w.dtype
        w64 = w.astype(np.float64)
        tag = f"{p.name}.folded"
        if p.op_type == "Conv":
            w2 = w64 * s.reshape(-1, *[1] * (w.ndim - 1))
            b = consts[p.input[2]].astype(np.float64) if len(p.input) > 2 and p.input[2] else 0.0
            b2 = b * s + t
            new_ins = [p.input[0], add_init(f"{tag}.weight", w2.astype(dt)), add_init(f"{tag}.bias", b2.astype(dt))]
        elif p.op_type == "ConvTranspose":
            gr = _attr(p, "group", 1)
            cin, mg = w.shape[0], w.shape[1]
            i = np.arange(cin)[:, None]
            j = np.arange(mg)[None, :]
            ch = (i // (cin // gr)) * mg + j
            w2 = w64 * s[ch].reshape(cin, mg, *[1] * (w.ndim - 2))
            b = consts[p.input[2]].astype(np.float64) if len(p.input) > 2 and p.input[2] else 0.0
            b2 = b * s + t
            new_ins = [p.input[0], add_init(f"{tag}.weight", w2.astype(dt)), add_init(f"{tag}.bias", b2.astype(dt))]
        elif p.op_type == "Gemm":
            if _attr(p, "transA", 0) not in (0,):
                pass  # transA only changes A; irrelevant to the fold
            tb = _attr(p, "transB", 0)
            bg = _attr(p, "beta", 1.0)
            w2 = w64 * (s[:, None] if tb else s[None, :])
            c = consts[p.input[2]].astype(np.float64) if len(p.input) > 2 and p.input[2] else 0.0
            c2 = (bg * c - mean) * s + beta
            c2 = np.asarray(c2)
            new_ins = [p.input[0], add_init(f"{tag}.weight", w2.astype(dt)), add_init(f"{tag}.bias", c2.astype(dt))]
            for a in p.attribute:
                if a.name == "beta":
                    a.f = 1.0
        else:  # MatMul [+ Add]
            w2 = w64 * s[None, :]
            if add_node is not None:
                bias = consts[add_node.input[1]].astype(np.float64)
                b2 = bias * s + t
                add_node.input[1] = add_init(f"{tag}.bias", b2.astype(dt))
                add_node.output[0] = bn.output[0]
                p.input[1] = add_init(f"{tag}.weight", w2.astype(dt))
                removed.append(bn)
                folded += 1
                continue
            p.input[1] = add_init(f"{tag}.weight", w2.astype(dt))
            mm_out = p.output[0]
            bn.op_type = "Add"
            del bn.attribute[:]
            del bn.input[:]
            bn.input.extend([mm_out, add_init(f"{tag}.bias", t.astype(dt))])
            folded += 1
            continue
        del p.input[:]
        p.input.extend(new_ins)
        p.output[0] = bn.output[0]
        removed.append(bn)
        folded += 1

    for bn in removed:
        g.node.remove(bn)
    g.initializer.extend(new_inits)
    return m, folded


# ---------------------------------------------------------------------------------------------


class ConvTranspose(OpRun):
    """Direct (scatter) numpy ConvTranspose, float64 accumulation.

    onnx 1.17's reference ConvTranspose is wrong for group > 1 (it slices W by output channels and
    mis-assembles the groups), so this replaces it for every ConvTranspose. Explicit pads only.
    """

    op_domain = ""

    def _run(self, X, W, B=None, auto_pad=None, dilations=None, group=None, kernel_shape=None,
             output_padding=None, output_shape=None, pads=None, strides=None):
        if auto_pad not in (None, "NOTSET") or output_shape is not None:
            raise NotImplementedError("ConvTranspose: only explicit pads are supported here")
        nd = X.ndim - 2
        group = group or 1
        dil = list(dilations or [1] * nd)
        st = list(strides or [1] * nd)
        op = list(output_padding or [0] * nd)
        pads = list(pads or [0] * (2 * nd))
        ks = W.shape[2:]
        cin, mg = W.shape[0], W.shape[1]
        cg = cin // group
        ins = X.shape[2:]
        full = [st[i] * (ins[i] - 1) + (ks[i] - 1) * dil[i] + 1 + op[i] for i in range(nd)]
        y = np.zeros((X.shape[0], mg * group, *full), dtype=np.float64)
        x64, w64 = X.astype(np.float64), W.astype(np.float64)
        for gi in range(group):
            xg = x64[:, gi * cg:(gi + 1) * cg]
            for kpos in np.ndindex(*ks):
                wk = w64[gi * cg:(gi + 1) * cg, :, *kpos]  # [cg, mg]
                contrib = np.einsum("nc...,cj->nj...", xg, wk)
                sl = tuple(
                    slice(kpos[i] * dil[i], kpos[i] * dil[i] + st[i] * (ins[i] - 1) + 1, st[i])
                    for i in range(nd)
                )
                y[(slice(None), slice(gi * mg, (gi + 1) * mg)) + sl] += contrib
        crop = tuple(slice(pads[i], full[i] - pads[i + nd]) for i in range(nd))
        y = y[(slice(None), slice(None)) + crop]
        if B is not None:
            y = y + B.astype(np.float64).reshape(-1, *[1] * nd)
        return (y.astype(X.dtype),)


class BatchNormalization(OpRun):
    """BatchNormalization per the ONNX spec, float64 math, result in X's dtype.

    onnx 1.17's reference BatchNormalization_9 (used for opsets 9..13) switches to batch statistics
    whenever the momentum attribute has a value, and the schema default (0.9) always gives it one, so
    every opset-13 inference BN comes out wrong there. This replaces it for every opset.
    """

    op_domain = ""

    def _run(self, x, scale, bias, mean, var, epsilon=None, momentum=None, training_mode=None,
             spatial=None, is_test=None):
        eps = 1e-5 if epsilon is None else float(epsilon)
        x64 = x.astype(np.float64)
        shp = (1, -1) + (1,) * (x.ndim - 2)
        if training_mode:
            axes = tuple(i for i in range(x.ndim) if i != 1)
            m_b, v_b = x64.mean(axis=axes), x64.var(axis=axes)
            mom = 0.9 if momentum is None else float(momentum)
            y = (x64 - m_b.reshape(shp)) / np.sqrt(v_b.reshape(shp) + eps)
            y = y * scale.astype(np.float64).reshape(shp) + bias.astype(np.float64).reshape(shp)
            rm = mean.astype(np.float64) * mom + m_b * (1 - mom)
            rv = var.astype(np.float64) * mom + v_b * (1 - mom)
            return (y.astype(x.dtype), rm.astype(mean.dtype), rv.astype(var.dtype))
        s = scale.astype(np.float64) / np.sqrt(var.astype(np.float64) + eps)
        y = (x64 - mean.astype(np.float64).reshape(shp)) * s.reshape(shp) + bias.astype(np.float64).reshape(shp)
        return (y.astype(x.dtype),)


def evaluate(model, feeds):
    sess = ReferenceEvaluator(model, new_ops=[ConvTranspose, BatchNormalization])
    names = fc.graph_input_names(model)
    outs = sess.run(None, dict(zip(names, feeds)))
    return [np.asarray(o) for o in outs[: len(model.graph.output)]]


def build(case_fn, out_root):
    g, meta = case_fn()
    opset = meta.pop("opset", OPSET)
    model = g.model(opset)
    feeds = g.feeds
    outs = evaluate(model, feeds)
    for o, vi in zip(outs, model.graph.output):
        assert o.dtype == helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type), g.case
        if not vi.type.tensor_type.HasField("shape"):  # declare the concrete output shape
            vi.CopyFrom(helper.make_tensor_value_info(vi.name, vi.type.tensor_type.elem_type, list(o.shape)))
    prov = {
        "script": SCRIPT,
        "generator": "onnx.helper (hand-built)",
        "versions": fc.versions(),
        "seed": g.seed,
        "seed_rule": "zlib.crc32(case name) & 0x7fffffff, numpy.random.default_rng(seed)",
        "description": meta["description"],
        "expect": meta["expect"],
        "bn_after_fuse": meta["bn_after_fuse"],
        "outputs": "onnx.reference.ReferenceEvaluator on the UNFUSED model.onnx "
        "(folding must not change the function)"
        + "; BatchNormalization evaluated by this script's own float64 implementation of the spec "
        "(onnx 1.17's reference BatchNormalization-9 uses batch statistics in opset 13 inference graphs)"
        + ("; ConvTranspose evaluated by this script's own numpy implementation because onnx's "
           "reference ConvTranspose is wrong for group > 1 (checked against onnxruntime and torch)"
           if any(n.op_type == "ConvTranspose" for n in model.graph.node) else ""),
    }
    if meta.get("reason"):
        prov["reason"] = meta["reason"]
    extra = {}

    fracs = fc.relu_positive_fractions(model, feeds)
    fc.assert_relus_alive(g.case, fracs)
    if fracs:
        prov["relu_positive_fraction"] = fracs

    # Sanity check with onnxruntime (graph optimizations disabled).
    try:
        ort_outs = fc.run_ort(model, feeds)
        prov["onnxruntime_max_abs_diff"] = fc.rounded(max(fc.max_abs(a, b) for a, b in zip(outs, ort_outs)))
    except Exception as e:  # noqa: BLE001
        prov["onnxruntime_max_abs_diff"] = None
        prov["onnxruntime_error"] = str(e).splitlines()[0][:200]

    if g.case == "trap_f16":
        # the same graph evaluated in float32 from the same (f16) values
        m32 = copy.deepcopy(model)
        for t in m32.graph.initializer:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name))
        for vi in list(m32.graph.input) + list(m32.graph.output):
            vi.type.tensor_type.elem_type = TensorProto.FLOAT
        o32 = evaluate(m32, [f.astype(np.float32) for f in feeds])
        prov["f32_reference_max_abs_diff"] = fc.rounded(fc.max_abs(outs[0], o32[0]))
        prov["output_abs_max"] = fc.rounded(float(np.max(np.abs(o32[0]))))

    if g.case == "trap_bn_training_mode":
        m_inf = copy.deepcopy(model)
        for n in m_inf.graph.node:
            if n.op_type == "BatchNormalization":
                for a in list(n.attribute):
                    if a.name == "training_mode":
                        n.attribute.remove(a)
                del n.output[1:]
        inf = evaluate(m_inf, feeds)[0]
        extra["inference_formula_output_0.pb"] = (inf, model.graph.output[0].name)
        prov["inference_formula_vs_spec_max_abs_diff"] = fc.rounded(fc.max_abs(inf, outs[0]))

    if meta["expect"] == "skip":
        assert python_fold(model)[1] == 0, f"{g.case}: numpy fold folded a skip case"
    if meta["expect"] in ("fold", "optional"):
        folded, n = python_fold(model)
        if n:
            f_outs = evaluate(folded, feeds)
            prov["python_fold"] = {
                "bn_folded": n,
                "max_abs_diff": fc.rounded(max(fc.max_abs(a, b) for a, b in zip(outs, f_outs))),
                "note": "independent numpy fold of DESIGN.md section 3 math, f64 -> weight dtype",
            }
        else:
            prov["python_fold"] = {"bn_folded": 0, "note": "numpy cross-check does not cover this pattern"}
        if meta["expect"] == "fold":
            assert n >= 1, f"{g.case}: numpy fold found nothing to fold"

    folder = fc.write_case(g.case, model, feeds, outs, prov, extra_files=extra, root=out_root)
    return folder, prov


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=fc.MODELS_DIR)
    ap.add_argument("--only", default="")
    args = ap.parse_args()
    only = {s for s in args.only.split(",") if s}
    for fn in CASES:
        name = "trap_" + fn.__name__[len("case_"):]
        if only and name not in only:
            continue
        folder, prov = build(fn, args.out)
        pf = prov.get("python_fold", {})
        print(
            f"{name:34s} bn={prov['bn_count']} expect={prov['expect']:8s} "
            f"ort_diff={prov.get('onnxruntime_max_abs_diff')} fold_diff={pf.get('max_abs_diff')} "
            f"size={fc.folder_size(folder)}B"
        )


if __name__ == "__main__":
    main()
