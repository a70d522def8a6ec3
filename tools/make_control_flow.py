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
    onnx_models/control_flow/if_shape/     r = Relu(Conv(x)), x [1, 2, n]; If(Shape(r)[2] == 1,
                                           then: Squeeze(r) [1, 3], else: If(Shape(r)[0] == 1,
                                           then: r, else: Unsqueeze(r))) * 2: conditions
                                           decided by the input shape alone, branches of
                                           different ranks, one If nested in another (silero-vad
                                           decoder's pattern); two data sets, n = 8 and n = 1
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


def if_shape_model():
    inner_then = h.make_graph([h.make_node("Identity", ["r"], ["it_out"], name="keep")], "inner_then",
                              [], [h.make_tensor_value_info("it_out", T.FLOAT, [1, 3, "n"])])
    inner_else = h.make_graph([h.make_node("Unsqueeze", ["r", "axes0"], ["ie_out"], name="lift")],
                              "inner_else", [], [h.make_tensor_value_info("ie_out", T.FLOAT, [1, 1, 3, "n"])])
    else_g = h.make_graph(
        [h.make_node("Shape", ["r"], ["r_shape"], name="inner_shape"),
         h.make_node("Gather", ["r_shape", "zero64"], ["batch"], name="inner_batch", axis=0),
         h.make_node("Equal", ["batch", "one64"], ["is_one"], name="inner_is_one"),
         h.make_node("If", ["is_one"], ["e_out"], name="choose_batch",
                     then_branch=inner_then, else_branch=inner_else)],
        "outer_else", [], [h.make_tensor_value_info("e_out", T.FLOAT, [1, 3, "n"])])
    then_g = h.make_graph([h.make_node("Squeeze", ["r", "axes2"], ["t_out"], name="squeeze")], "outer_then",
                          [], [h.make_tensor_value_info("t_out", T.FLOAT, [1, 3])])
    rng = np.random.default_rng(1)
    nodes = [
        h.make_node("Conv", ["x", "w", "b"], ["c"], name="conv"),
        h.make_node("Relu", ["c"], ["r"], name="relu"),
        h.make_node("Shape", ["r"], ["shape"], name="shape"),
        h.make_node("Gather", ["shape", "two64"], ["len"], name="length", axis=0),
        h.make_node("Equal", ["len", "one64"], ["single"], name="is_single"),
        h.make_node("If", ["single"], ["chosen"], name="choose_len", then_branch=then_g, else_branch=else_g),
        h.make_node("Mul", ["chosen", "two"], ["y"], name="double"),
    ]
    return h.make_graph(
        nodes, "if_shape",
        [h.make_tensor_value_info("x", T.FLOAT, [1, 2, "n"])],
        # rank 2 when n is 1: declared for the larger case (ONNX Runtime warns, then runs)
        [h.make_tensor_value_info("y", T.FLOAT, [1, 3, "n"])],
        [numpy_helper.from_array(rng.normal(size=(3, 2, 1)).astype(np.float32), "w"),
         numpy_helper.from_array(np.array([0.1, -0.2, 0.3], np.float32), "b"),
         numpy_helper.from_array(np.array(2.0, np.float32), "two"),
         numpy_helper.from_array(np.array(0, np.int64), "zero64"),
         numpy_helper.from_array(np.array(1, np.int64), "one64"),
         numpy_helper.from_array(np.array(2, np.int64), "two64"),
         numpy_helper.from_array(np.array([0], np.int64), "axes0"),
         numpy_helper.from_array(np.array([2], np.int64), "axes2")])


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
    "if_shape": (if_shape_model, "Ifs decided by the input shape, one nested in the other"),
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
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
        d = os.path.join(args.out, name)
        if os.path.isdir(d):
            shutil.rmtree(d)
        os.makedirs(d)
        onnx.save(m, os.path.join(d, "model.onnx"))
        x_shapes = [(1, 2, 8), (1, 2, 1)] if name == "if_shape" else [(1, 4)]
        for s_k, x_shape in enumerate(x_shapes):
            feeds = {"x": rng.normal(size=x_shape).astype(np.float32)}
            if any(i.name == "M" for i in g.input):
                feeds["M"] = np.array(4, np.int64)
            outs = sess.run(None, feeds)
            ds = os.path.join(d, f"test_data_set_{s_k}")
            os.makedirs(ds)
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
