#!/usr/bin/env python3
"""Small models at OLD opsets, one per opset-upgrade adapter (issue 9, item 3), with reference
outputs from ONNX Runtime run AT THE OLD OPSET: an upgraded model must reproduce them.

    make   writes onnx_models/upgrade/<case>/{model.onnx, test_data_set_0/{input,output}_K.pb,
           provenance.json} (onnx.helper, inputs from a fixed seed per case, ORT CPU with graph
           optimizations disabled). provenance.json records the opset, the upgrade target, the
           adapters the case exercises, what the upgraded model must no longer contain, and
           what onnx.version_converter makes of the case (its output against the reference).
    check  runs `qfold upgrade` (--bin) on every case to its target and checks the result with
           onnx.checker (full_check: strict shape inference at the new opset) and ONNX Runtime
           against the stored reference (max abs diff); prints a table.

Run with the project venv (onnx 1.17, onnxruntime 1.20):

    /work/venv/bin/python tools/make_upgrade_models.py make [--out onnx_models/upgrade]
    /work/venv/bin/python tools/make_upgrade_models.py check --bin target/debug/qfold
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zlib

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper

SCRIPT = "tools/make_upgrade_models.py"


def seed_of(case: str) -> int:
    return zlib.crc32(case.encode()) & 0x7FFFFFFF


class Case:
    def __init__(self, name, opset, target, adapters, description, ir=None):
        self.name = name
        self.opset = opset
        self.target = target
        self.adapters = adapters
        self.description = description
        self.ir = ir
        self.rng = np.random.default_rng(seed_of(name))
        self.nodes = []
        self.inits = []
        self.inputs = []
        self.outputs = []
        self.feeds = {}
        self.gone = []  # (op_type, attribute) pairs the upgraded model must not contain
        self.expect_ops = []  # op types the upgraded model must contain

    def input(self, name, shape, low=-2.0, high=2.0):
        self.inputs.append(h.make_tensor_value_info(name, T.FLOAT, shape))
        self.feeds[name] = self.rng.uniform(low, high, size=shape).astype(np.float32)

    def init(self, name, array):
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))

    def weight(self, name, shape, scale=0.5):
        self.init(name, (self.rng.standard_normal(shape) * scale).astype(np.float32))

    def node(self, op, inputs, outputs, **attrs):
        self.nodes.append(h.make_node(op, inputs, outputs, name=outputs[0] + "_node", **attrs))

    def output(self, name, elem=T.FLOAT):
        self.outputs.append(h.make_tensor_value_info(name, elem, None))

    def model(self, shapes=None):
        if shapes is not None:
            self.outputs = [h.make_tensor_value_info(o.name, o.type.tensor_type.elem_type, list(s))
                            for o, s in zip(self.outputs, shapes)]
        graph_inputs = list(self.inputs)
        if self.ir is not None and self.ir < 4:
            # IR 3: every initializer is declared as a graph input too
            for t in self.inits:
                graph_inputs.append(h.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        g = h.make_graph(self.nodes, self.name, graph_inputs, self.outputs, self.inits)
        m = h.make_model(g, opset_imports=[h.make_opsetid("", self.opset)],
                         producer_name="qfold " + SCRIPT)
        m.ir_version = self.ir or (3 if self.opset < 9 else 4 if self.opset < 10 else
                                   5 if self.opset < 11 else 6 if self.opset < 12 else 7)
        if shapes is not None:
            onnx.checker.check_model(m, full_check=True)
        return m


def ort_run(model_bytes, feeds):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    s = ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])
    return s.run(None, feeds)


# ---------------------------------------------------------------------------------------------
# The cases


def clip_6():
    c = Case("clip_6", 10, 13, ["Clip"],
             "Clip-6 with min and max attributes, and with max only, on one input")
    c.input("x", [1, 3, 4, 5])
    c.node("Clip", ["x"], ["a"], min=-0.5, max=0.7)
    c.node("Clip", ["x"], ["b"], max=0.3)
    c.node("Add", ["a", "b"], ["y"])
    c.output("y")
    c.gone = [("Clip", "min"), ("Clip", "max")]
    return c


def pad_2():
    c = Case("pad_2", 10, 13, ["Pad"],
             "Pad-2 in constant (value 1.5), reflect and edge modes")
    c.input("x", [1, 2, 4, 5])
    c.node("Pad", ["x"], ["y0"], pads=[0, 0, 1, 2, 0, 0, 2, 1], value=1.5)
    c.node("Pad", ["x"], ["y1"], mode="reflect", pads=[0, 0, 1, 1, 0, 0, 2, 1])
    c.node("Pad", ["x"], ["y2"], mode="edge", pads=[0, 1, 0, 2, 0, 0, 3, 0])
    for o in ["y0", "y1", "y2"]:
        c.output(o)
    c.gone = [("Pad", "pads"), ("Pad", "value")]
    return c


def slice_1():
    c = Case("slice_1", 9, 13, ["Slice"],
             "Slice-1 with starts/ends/axes attributes (negative and clamped ends), and without axes")
    c.input("x", [2, 3, 6, 7])
    c.node("Slice", ["x"], ["y0"], starts=[1, 0], ends=[5, -1], axes=[2, 3])
    c.node("Slice", ["x"], ["y1"], starts=[0, 1, 2, -4], ends=[1, 100, 5, -1])
    c.output("y0")
    c.output("y1")
    c.gone = [("Slice", "starts"), ("Slice", "ends"), ("Slice", "axes")]
    return c


def topk_1():
    c = Case("topk_1", 9, 13, ["TopK"], "TopK-1 with the k attribute, values and indices")
    c.input("x", [2, 3, 7])
    c.node("TopK", ["x"], ["v", "i"], k=3, axis=2)
    c.output("v")
    c.output("i", T.INT64)
    c.gone = [("TopK", "k")]
    return c


def upsample_7():
    c = Case("upsample_7", 7, 13, ["Upsample"],
             "Upsample-7 (scales attribute) nearest x2/x3 and linear x2, IR 3", ir=3)
    c.input("x", [1, 2, 3, 4])
    c.node("Upsample", ["x"], ["y0"], scales=[1.0, 1.0, 2.0, 3.0])
    c.node("Upsample", ["x"], ["y1"], mode="linear", scales=[1.0, 1.0, 2.0, 2.0])
    c.output("y0")
    c.output("y1")
    c.gone = [("Upsample", None)]
    c.expect_ops = ["Resize"]
    return c


def upsample_9():
    c = Case("upsample_9", 9, 13, ["Upsample"],
             "Upsample-9 (scales input) nearest x1.5/x2.5 and linear x2/x1.5")
    c.input("x", [1, 2, 3, 4])
    c.init("s_nearest", np.array([1, 1, 1.5, 2.5], np.float32))
    c.init("s_linear", np.array([1, 1, 2, 1.5], np.float32))
    c.node("Upsample", ["x", "s_nearest"], ["y0"], mode="nearest")
    c.node("Upsample", ["x", "s_linear"], ["y1"], mode="linear")
    c.output("y0")
    c.output("y1")
    c.gone = [("Upsample", None)]
    c.expect_ops = ["Resize"]
    return c


def resize_10():
    c = Case("resize_10", 10, 13, ["Resize"],
             "Resize-10 nearest shrinking (0.6: ONNX Runtime rounds up), nearest enlarging "
             "(2, 1.5: rounds down), nearest by 0.5 and 1.5, linear shrinking and enlarging")
    c.input("x", [1, 2, 5, 7])
    c.init("s_down", np.array([1, 1, 0.6, 0.6], np.float32))
    c.init("s_up", np.array([1, 1, 2, 1.5], np.float32))
    c.init("s_half", np.array([1, 1, 0.5, 1.5], np.float32))
    c.init("s_mixed", np.array([1, 1, 0.6, 1.7], np.float32))
    c.node("Resize", ["x", "s_down"], ["y0"], mode="nearest")
    c.node("Resize", ["x", "s_up"], ["y1"], mode="nearest")
    c.node("Resize", ["x", "s_half"], ["y2"], mode="nearest")
    c.node("Resize", ["x", "s_mixed"], ["y3"], mode="linear")
    for o in ["y0", "y1", "y2", "y3"]:
        c.output(o)
    c.expect_ops = ["Resize"]
    return c


def dropout_7():
    c = Case("dropout_7", 7, 13, ["Dropout"],
             "Dropout-7 with a ratio attribute (identity at inference) between two Relus, IR 3",
             ir=3)
    c.input("x", [2, 5])
    c.node("Relu", ["x"], ["r"])
    c.node("Dropout", ["r"], ["d"], ratio=0.3)
    c.node("Neg", ["d"], ["y"])
    c.output("y")
    c.gone = [("Dropout", "ratio")]
    return c


def batchnorm_7():
    c = Case("batchnorm_7", 7, 13, ["BatchNormalization"],
             "BatchNormalization-7 with spatial = 1 on NCHW, and spatial = 0 on a rank-2 input "
             "(per activation = per channel there)", ir=3)
    c.input("x", [2, 3, 4, 4])
    c.input("v", [5, 3])
    for p, lo in [("s", 0.5), ("b", -1), ("m", -1), ("var", 0.2)]:
        c.init(p, c.rng.uniform(lo, lo + 1.5, size=[3]).astype(np.float32))
    c.node("BatchNormalization", ["x", "s", "b", "m", "var"], ["y0"], spatial=1, epsilon=1e-3)
    c.node("BatchNormalization", ["v", "s", "b", "m", "var"], ["y1"], spatial=0)
    c.output("y0")
    c.output("y1")
    c.gone = [("BatchNormalization", "spatial")]
    return c


def scatter_9():
    c = Case("scatter_9", 9, 13, ["Scatter"], "Scatter-9 (axis 1) becomes ScatterElements")
    c.input("x", [3, 4])
    c.init("idx", np.array([[1, 3], [0, 2], [3, 1]], np.int64))
    c.init("upd", np.array([[10, 20], [30, 40], [50, 60]], np.float32))
    c.node("Scatter", ["x", "idx", "upd"], ["y"], axis=1)
    c.output("y")
    c.gone = [("Scatter", None)]
    c.expect_ops = ["ScatterElements"]
    return c


def softmax_11():
    c = Case("softmax_11", 11, 13, ["Softmax", "LogSoftmax", "Hardmax"],
             "Softmax axis 1, LogSoftmax axis 2 and Hardmax axis 1 of a rank-4 input (coerced to "
             "2-D before 13), and Softmax over the last axis")
    c.input("x", [2, 3, 4, 5])
    c.node("Softmax", ["x"], ["y0"], axis=1)
    c.node("LogSoftmax", ["x"], ["y1"], axis=2)
    c.node("Hardmax", ["x"], ["y2"], axis=1)
    c.node("Softmax", ["x"], ["y3"], axis=3)
    for o in ["y0", "y1", "y2", "y3"]:
        c.output(o)
    c.expect_ops = ["Flatten", "Reshape"]
    return c


def axes_11():
    c = Case("axes_11", 11, 13, ["Squeeze", "Unsqueeze", "ReduceSum", "Split"],
             "ReduceSum, Unsqueeze, Split and Squeeze with axes/split attributes")
    c.input("x", [1, 3, 4, 4])
    c.node("ReduceSum", ["x"], ["r"], axes=[3], keepdims=0)
    c.node("Unsqueeze", ["r"], ["u"], axes=[1])
    c.node("Split", ["u"], ["s0", "s1"], axis=3, split=[1, 3])
    c.node("Squeeze", ["s1"], ["y0"], axes=[0, 1])
    c.node("Squeeze", ["s0"], ["y1"], axes=[0])
    c.output("y0")
    c.output("y1")
    c.gone = [("ReduceSum", "axes"), ("Unsqueeze", "axes"), ("Squeeze", "axes"),
              ("Split", "split")]
    return c


def reduce_13():
    c = Case("reduce_13", 13, 18, ["ReduceMean", "ReduceMax", "Split"],
             "ReduceMean / ReduceMax with axes attributes and Split without split, raised to 18")
    c.input("x", [2, 3, 4, 6])
    c.node("ReduceMean", ["x"], ["y0"], axes=[2, 3])
    c.node("ReduceMax", ["x"], ["y1"], axes=[1], keepdims=0)
    c.node("Split", ["x"], ["y2", "y3"], axis=3)
    for o in ["y0", "y1", "y2", "y3"]:
        c.output(o)
    c.gone = [("ReduceMean", "axes"), ("ReduceMax", "axes")]
    return c


def cnn_8():
    c = Case("cnn_8", 8, 13,
             ["BatchNormalization", "Upsample", "Pad", "Clip", "Dropout", "Softmax"],
             "An opset-8 CNN as old exporters wrote it: Conv -> BN(spatial) -> Clip(0, 6) -> "
             "Upsample x2 -> Pad -> Conv -> Dropout -> Flatten -> Gemm -> Softmax, IR 3 "
             "(initializers listed as inputs)", ir=3)
    c.input("x", [1, 3, 6, 6], low=0, high=1)
    c.weight("w1", [4, 3, 3, 3])
    c.weight("b1", [4], 0.1)
    for p, lo in [("s", 0.5), ("b", -0.5), ("m", -0.5), ("var", 0.2)]:
        c.init(p, c.rng.uniform(lo, lo + 1.0, size=[4]).astype(np.float32))
    c.weight("w2", [2, 4, 3, 3])
    c.weight("wg", [10, 2 * 12 * 12], 0.1)
    c.weight("bg", [10], 0.1)
    c.node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1])
    c.node("BatchNormalization", ["c1", "s", "b", "m", "var"], ["bn"], spatial=1)
    c.node("Clip", ["bn"], ["r"], min=0.0, max=6.0)
    c.node("Upsample", ["r"], ["u"], mode="nearest", scales=[1.0, 1.0, 2.0, 2.0])
    c.node("Pad", ["u"], ["p"], pads=[0, 0, 1, 1, 0, 0, 1, 1], mode="reflect")
    c.node("Conv", ["p", "w2"], ["c2"])
    c.node("Dropout", ["c2"], ["d"], ratio=0.2)
    c.node("Flatten", ["d"], ["f"], axis=1)
    c.node("Gemm", ["f", "wg", "bg"], ["g"], transB=1)
    c.node("Softmax", ["g"], ["y"], axis=1)
    c.output("y")
    c.gone = [("Upsample", None), ("BatchNormalization", "spatial"), ("Clip", "min"),
              ("Pad", "pads"), ("Dropout", "ratio")]
    return c


CASES = [clip_6, pad_2, slice_1, topk_1, upsample_7, upsample_9, resize_10, dropout_7,
         batchnorm_7, scatter_9, softmax_11, axes_11, reduce_13, cnn_8]


def version_converter_result(m, target, feeds, refs):
    """What onnx.version_converter makes of the case: its max abs diff against the reference in
    ORT, or the error."""
    try:
        conv = onnx.version_converter.convert_version(m, target)
        outs = ort_run(conv.SerializeToString(), feeds)
        return {"max_abs_diff": max(float(np.max(np.abs(np.asarray(a, np.float64) -
                                                         np.asarray(b, np.float64))))
                                    if np.asarray(a).size else 0.0
                                    for a, b in zip(refs, outs))}
    except Exception as e:  # noqa: BLE001
        return {"error": str(e).splitlines()[0][:200]}


def make(out):
    os.makedirs(out, exist_ok=True)
    for fn in CASES:
        c = fn()
        outs = ort_run(c.model().SerializeToString(), c.feeds)
        m = c.model([np.asarray(o).shape for o in outs])
        d = os.path.join(out, c.name)
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(os.path.join(d, "test_data_set_0"))
        onnx.save(m, os.path.join(d, "model.onnx"))
        for k, vi in enumerate(c.inputs):
            t = numpy_helper.from_array(c.feeds[vi.name], vi.name)
            with open(os.path.join(d, "test_data_set_0", f"input_{k}.pb"), "wb") as f:
                f.write(t.SerializeToString())
        for k, (vi, a) in enumerate(zip(c.outputs, outs)):
            t = numpy_helper.from_array(np.asarray(a), vi.name)
            with open(os.path.join(d, "test_data_set_0", f"output_{k}.pb"), "wb") as f:
                f.write(t.SerializeToString())
        prov = {
            "case": c.name,
            "description": c.description,
            "generator": SCRIPT + " (onnx.helper)",
            "opset": c.opset,
            "ir_version": m.ir_version,
            "target": c.target,
            "adapters": c.adapters,
            "gone_after_upgrade": [{"op_type": op, "attribute": a} for op, a in c.gone],
            "ops_after_upgrade": c.expect_ops,
            "seed": seed_of(c.name),
            "reference": f"onnxruntime {ort.__version__} CPU at opset {c.opset}, "
                         "graph optimizations disabled",
            "onnx": onnx.__version__,
            "onnx_version_converter": version_converter_result(m, c.target, c.feeds, outs),
        }
        with open(os.path.join(d, "provenance.json"), "w") as f:
            json.dump(prov, f, indent=2, sort_keys=True)
            f.write("\n")
        print(f"{c.name}: opset {c.opset} -> {c.target}; onnx.version_converter: "
              f"{prov['onnx_version_converter']}")


def check(out, binary):
    rows = []
    ok = True
    for d in sorted(os.listdir(out)):
        case_dir = os.path.join(out, d)
        if not os.path.isfile(os.path.join(case_dir, "model.onnx")):
            continue
        prov = json.load(open(os.path.join(case_dir, "provenance.json")))
        with tempfile.TemporaryDirectory() as tmp:
            up = os.path.join(tmp, "up.onnx")
            r = subprocess.run([binary, "upgrade", os.path.join(case_dir, "model.onnx"), "-o", up,
                                "--opset", str(prov["target"])], capture_output=True, text=True)
            if r.returncode != 0:
                rows.append((d, f"qfold exit {r.returncode}: {r.stderr.strip()[:150]}", "", ""))
                ok = False
                continue
            m = onnx.load(up)
            try:
                onnx.checker.check_model(m, full_check=True)
                checker = "ok"
            except Exception as e:  # noqa: BLE001
                checker = "FAIL " + str(e).splitlines()[0][:100]
                ok = False
            orig = onnx.load(os.path.join(case_dir, "model.onnx"))
            feeds = {}
            real = [vi.name for vi in orig.graph.input
                    if vi.name not in {t.name for t in orig.graph.initializer}]
            for k, name in enumerate(real):
                t = onnx.TensorProto()
                t.ParseFromString(open(os.path.join(case_dir, "test_data_set_0",
                                                    f"input_{k}.pb"), "rb").read())
                feeds[name] = numpy_helper.to_array(t)
            refs = []
            for k in range(len(orig.graph.output)):
                t = onnx.TensorProto()
                t.ParseFromString(open(os.path.join(case_dir, "test_data_set_0",
                                                    f"output_{k}.pb"), "rb").read())
                refs.append(numpy_helper.to_array(t))
            try:
                outs = ort_run(m.SerializeToString(), feeds)
                diff = max(float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
                           for a, b in zip(refs, outs))
                ort_res = f"max abs diff {diff:.3g}"
                if diff > 1e-5:
                    ok = False
            except Exception as e:  # noqa: BLE001
                ort_res = "FAIL " + str(e).splitlines()[0][:100]
                ok = False
            opset = [o.version for o in m.opset_import if o.domain in ("", "ai.onnx")][0]
            rows.append((d, f"opset {prov['opset']} -> {opset}", checker, ort_res))
    print("| case | qfold upgrade | onnx.checker (full) | ONNX Runtime vs reference |")
    print("|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    return 0 if ok else 1


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    mk = sub.add_parser("make")
    mk.add_argument("--out", default="onnx_models/upgrade")
    ck = sub.add_parser("check")
    ck.add_argument("--out", default="onnx_models/upgrade")
    ck.add_argument("--bin", default="target/debug/qfold")
    a = ap.parse_args()
    if a.cmd == "make":
        make(a.out)
        return 0
    return check(a.out, a.bin)


if __name__ == "__main__":
    sys.exit(main())
