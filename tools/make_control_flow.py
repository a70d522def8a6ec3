#!/usr/bin/env python3
"""Small models tract cannot run (issue 9: "a model tract cannot run (Loop, data-dependent If)
gets a clear error naming the op, exit 2"), with ONNX Runtime's outputs as references.

    onnx_models/control_flow/if_data/      y = If(ReduceSum(x) > 0, then: x * 2 [1, 4],
                                                   else: Concat(x, x) [1, 8]): the condition
                                                   depends on the input, and the branches'
                                                   output shapes differ (silero-vad's pattern:
                                                   an If on its sample-rate input)
    onnx_models/control_flow/if_data_same/ the same If whose branches give [1, 4] both: tract
                                           runs it (its IfThenElse needs equal branch facts)
    onnx_models/control_flow/loop_data/    y = Loop(M, true, x): M (an int64 input) iterations
                                           of x = x * 0.5 + 1 (tract has no Loop operator)
    onnx_models/control_flow/loop_const/   the same Loop with a constant trip count of 3

Each folder: model.onnx, test_data_set_0/{input,output}_K.pb (ORT 1.20 CPU, graph optimizations
disabled; inputs from seed 0), provenance.json.

    /work/venv/bin/python tools/make_control_flow.py [--out onnx_models/control_flow]
"""

import argparse
import json
import os
import shutil

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper

SCRIPT = "tools/make_control_flow.py"
OPSET = 13


def if_model(same_shapes):
    then_out = h.make_tensor_value_info("t_out", T.FLOAT, [1, 4])
    then_g = h.make_graph(
        [h.make_node("Mul", ["x", "two"], ["t_out"], name="then_mul")], "then", [], [then_out])
    else_out = h.make_tensor_value_info("e_out", T.FLOAT, [1, 4 if same_shapes else 8])
    if same_shapes:
        else_nodes = [h.make_node("Add", ["x", "two"], ["e_out"], name="else_add")]
    else:
        else_nodes = [h.make_node("Concat", ["x", "x"], ["e_out"], name="else_concat", axis=1)]
    else_g = h.make_graph(else_nodes, "else", [], [else_out])
    nodes = [
        h.make_node("ReduceSum", ["x"], ["s"], name="sum", keepdims=0),
        h.make_node("Greater", ["s", "zero"], ["cond"], name="positive"),
        h.make_node("If", ["cond"], ["y"], name="choose", then_branch=then_g, else_branch=else_g),
    ]
    g = h.make_graph(
        nodes, "if_data",
        [h.make_tensor_value_info("x", T.FLOAT, [1, 4])],
        [h.make_tensor_value_info("y", T.FLOAT, [1, "n"])],
        [numpy_helper.from_array(np.array(2.0, np.float32), "two"),
         numpy_helper.from_array(np.array(0.0, np.float32), "zero")])
    return g


def loop_model(const_trip):
    body = h.make_graph(
        [h.make_node("Mul", ["x_in", "half"], ["m"], name="body_mul"),
         h.make_node("Add", ["m", "one"], ["x_out"], name="body_add"),
         h.make_node("Identity", ["cond_in"], ["cond_out"], name="body_cond")],
        "body",
        [h.make_tensor_value_info("i", T.INT64, []),
         h.make_tensor_value_info("cond_in", T.BOOL, []),
         h.make_tensor_value_info("x_in", T.FLOAT, [1, 4])],
        [h.make_tensor_value_info("cond_out", T.BOOL, []),
         h.make_tensor_value_info("x_out", T.FLOAT, [1, 4])])
    inits = [numpy_helper.from_array(np.array(0.5, np.float32), "half"),
             numpy_helper.from_array(np.array(1.0, np.float32), "one"),
             numpy_helper.from_array(np.array(True), "keep_going")]
    inputs = [h.make_tensor_value_info("x", T.FLOAT, [1, 4])]
    if const_trip:
        inits.append(numpy_helper.from_array(np.array(3, np.int64), "M"))
    else:
        inputs.append(h.make_tensor_value_info("M", T.INT64, []))
    nodes = [h.make_node("Loop", ["M", "keep_going", "x"], ["y"], name="repeat", body=body)]
    return h.make_graph(nodes, "loop_const" if const_trip else "loop_data", inputs,
                        [h.make_tensor_value_info("y", T.FLOAT, [1, 4])], inits)


CASES = {
    "if_data": (lambda: if_model(False), "If on ReduceSum(x) > 0, branches of different shapes"),
    "if_data_same": (lambda: if_model(True), "If on ReduceSum(x) > 0, branches of the same shape"),
    "loop_data": (lambda: loop_model(False), "Loop with a trip count from the int64 input M"),
    "loop_const": (lambda: loop_model(True), "Loop with a constant trip count of 3"),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="onnx_models/control_flow")
    args = ap.parse_args()
    for name, (make, desc) in CASES.items():
        g = make()
        m = h.make_model(g, opset_imports=[h.make_opsetid("", OPSET)], producer_name=SCRIPT)
        m.ir_version = 8
        onnx.checker.check_model(m)
        rng = np.random.default_rng(0)
        feeds = {"x": rng.normal(size=(1, 4)).astype(np.float32)}
        if any(i.name == "M" for i in g.input):
            feeds["M"] = np.array(4, np.int64)
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
        outs = sess.run(None, feeds)
        d = os.path.join(args.out, name)
        if os.path.isdir(d):
            shutil.rmtree(d)
        ds = os.path.join(d, "test_data_set_0")
        os.makedirs(ds)
        onnx.save(m, os.path.join(d, "model.onnx"))
        for k, i in enumerate(x.name for x in g.input):
            with open(os.path.join(ds, f"input_{k}.pb"), "wb") as f:
                f.write(numpy_helper.from_array(feeds[i], i).SerializeToString())
        for k, (o, v) in enumerate(zip(sess.get_outputs(), outs)):
            with open(os.path.join(ds, f"output_{k}.pb"), "wb") as f:
                f.write(numpy_helper.from_array(v, o.name).SerializeToString())
        with open(os.path.join(d, "provenance.json"), "w") as f:
            json.dump(dict(script=SCRIPT, case=name, description=desc, opset=OPSET, seed=0,
                           onnx=onnx.__version__, onnxruntime=ort.__version__,
                           reference="ONNX Runtime CPU, graph optimizations disabled"), f, indent=2)
        print(f"{name}: {desc}; y = {outs[0].ravel().tolist()}")


if __name__ == "__main__":
    main()
