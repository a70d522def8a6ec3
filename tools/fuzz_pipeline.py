#!/usr/bin/env python3
"""Mutation fuzzer for the whole qfold command-line pipeline.

Seeds are the committed models (every ``onnx_models/**/model.onnx`` up to 5 MB; smaller seeds are
picked more often, so crashers stay small). Each mutant applies one to three mutations, drawn
from a seeded RNG (mutant ``i`` of ``--seed S`` is always the same model):

* byte level: bit flips, bytes set to 0x00/0xff, truncation, duplicated chunks, random or
  overlong length-delimited fields, and nested protobuf group tags (wire type 3 repeated N times,
  ``b'\\x0b' * N`` appended, N from 10 to 1,000,000);
* structure level (with the ``onnx`` package): drop/add/empty node inputs, point an input at
  another value (an initializer, a graph input, a node's own output), duplicate outputs, extreme
  attribute values (0, -1, 2**31, 2**32, 2**62, i64 max/min, NaN/inf, wrong attribute types) for
  kernel_shape/pads/strides/dilations/group/axis/epsilon/transA/transB/training_mode/...,
  cleared or changed tensor and value_info dims, op_type swaps among
  Conv/ConvTranspose/Gemm/MatMul/BatchNormalization/QuantizeLinear/DequantizeLinear/Relu/Add,
  scalar / mismatched / zero / NaN scales and zero points, dtype changes, broken raw_data and
  external data references, deleted/duplicated/reordered nodes, cycles, opset and IR changes.

Every mutant goes through ``qfold inspect M``, ``qfold fuse M -o out.onnx``,
``qfold quantize M -o out.onnx --calib-random 2`` (plus ``--quantize-args``) and, when the
seed or the mutant has Q/DQ nodes, ``qfold convert M -o out.onnx``; each with a timeout (``--timeout``, 20 s) and an
address-space limit (``--mem-gb``, 8 GB, ``resource.setrlimit`` in the child) in a temp dir
outside the repository.

Findings:

* crash: exit code not in {0, 1, 2}, a signal, a timeout, or stderr containing "panicked",
  "RUST_BACKTRACE", "memory allocation of" or "overflowed its stack";
* unnamed error (soft): exit 2 whose message (after "error: ") names no node, tensor or file,
  i.e. contains none of ``'``, ``node``, ``tensor``, ``:``;
* contract (soft): input file modified, output left behind by a failed command (exit 2, or
  exit 1 of a command other than quantize: quantize's exit 1 is a complete model below the
  accuracy criterion, written all the same), stray temp files in the output folder, or an
  exit-0/1 output that ``onnx`` cannot parse although the mutant parsed.

A panic's signature is its first location (src/quant/plan.rs:322, or crate-version/src/... for
a dependency). An abort without a panic message (a panic in a no-unwind context, which qfold's
quiet panic hook around tract does not print) is located with gdb when it is installed: the
first frame outside core/std, e.g. tract_core::...::BaseDataShape::c (data_formats.rs:175).

Each distinct signature (command + first panic location, or the normalized error message) is
shrunk (``--reduce-budget`` runs: parts of the model dropped while the signature stays the same,
then bytes cut in halving chunks) and saved once in ``--crashers DIR`` (default /work/crashers) as ``DIR/<signature-slug>/model.onnx``
(plus any external-data file it needs) and ``crash.json`` (one line: seed model, mutations,
command, exit, stderr tail); a later smaller reproducer of the same signature replaces it.
``DIR/index.jsonl`` logs every save. A summary table is printed at the end.

Usage (from anywhere; needs onnx and numpy, e.g. /work/venv from tools/requirements.txt)::

    /work/venv/bin/python tools/fuzz_pipeline.py --bin /work/qfold-bin/qfold-XXXX --minutes 25
    /work/venv/bin/python tools/fuzz_pipeline.py --seed 7 --iterations 200      # fixed amount
    /work/venv/bin/python tools/fuzz_pipeline.py --replay --bin target/debug/qfold  # re-run saved
                                                 # crashers: which still crash, which are fixed

Copy the binary somewhere stable first (``cp target/debug/qfold /work/qfold-bin/qfold-$(date
+%s)``) so a rebuild does not change it under the fuzzer. ``--jobs`` runs mutants in parallel
processes (default 1: the build machine is shared).
"""
from __future__ import annotations

import argparse
import concurrent.futures as futures
import faulthandler
import hashlib
import json
import os
import random
import re
import resource
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto, numpy_helper

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MAX_SEED_BYTES = 5 * 1024 * 1024

I64_MAX = 2**63 - 1
I64_MIN = -(2**63)
EXTREME_INTS = [0, -1, 1, 2, 3, -2, 2**31 - 1, 2**31, -(2**31), 2**32, 2**32 + 1, 2**62, I64_MAX, I64_MIN]
EXTREME_FLOATS = [0.0, -0.0, -1.0, 1e-45, 1e-38, 1e38, 3.4e38, float("inf"), float("-inf"), float("nan"), -1e-5]
INT_ATTRS = ["group", "axis", "transA", "transB", "training_mode", "spatial", "saturate", "block_size",
             "keepdims", "to", "allowzero"]
INTS_ATTRS = ["kernel_shape", "pads", "strides", "dilations", "output_padding", "output_shape", "perm", "axes"]
FLOAT_ATTRS = ["epsilon", "momentum", "alpha", "beta", "min", "max"]
STRING_ATTRS = ["auto_pad"]
OP_TYPES = ["Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization", "QuantizeLinear",
            "DequantizeLinear", "Relu", "Add", "QLinearConv", "QLinearMatMul", "Identity", "Constant",
            "Clip", "Flatten", "Reshape"]
QDQ_OPS = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul"}
DTYPES = [TensorProto.FLOAT, TensorProto.UINT8, TensorProto.INT8, TensorProto.INT32, TensorProto.INT64,
          TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE, TensorProto.STRING,
          TensorProto.BOOL, TensorProto.UNDEFINED, TensorProto.FLOAT8E4M3FN, TensorProto.INT4, 99]
CRASH_MARKERS = ("panicked", "RUST_BACKTRACE", "memory allocation of", "overflowed its stack")


# ----------------------------------------------------------------------------------------------
# seeds


class Seed:
    def __init__(self, path: Path):
        self.path = path
        self.name = str(path.parent.relative_to(ROOT / "onnx_models"))
        self.data = path.read_bytes()
        self.model = onnx.load_from_string(self.data)
        # files the model may reference (external data), copied next to every mutant
        self.extra = [p for p in path.parent.iterdir()
                      if p.is_file() and p.name not in ("model.onnx", "provenance.json")]
        ops = {n.op_type for g in all_graphs(self.model.graph) for n in g.node}
        self.qdq = bool(ops & QDQ_OPS)


def load_seeds(models_dir: Path) -> list[Seed]:
    seeds = []
    for p in sorted(models_dir.rglob("model.onnx")):
        if p.stat().st_size > MAX_SEED_BYTES:
            continue
        try:
            seeds.append(Seed(p))
        except Exception as e:  # noqa: BLE001 - a seed onnx cannot parse is just skipped
            print(f"skipping seed {p}: {e}", file=sys.stderr)
    return seeds


def all_graphs(g):
    yield g
    for n in g.node:
        for a in n.attribute:
            if a.type == AttributeProto.GRAPH:
                yield from all_graphs(a.g)
            elif a.type == AttributeProto.GRAPHS:
                for sg in a.graphs:
                    yield from all_graphs(sg)


# ----------------------------------------------------------------------------------------------
# structure mutations: each takes (rng, model) and returns a description, or None if it did not apply


def pick_graph(rng, model):
    gs = list(all_graphs(model.graph))
    return gs[0] if len(gs) == 1 or rng.random() < 0.7 else rng.choice(gs)


def value_names(g):
    names = [i.name for i in g.input] + [t.name for t in g.initializer]
    for n in g.node:
        names.extend(o for o in n.output if o)
    return names or ["x"]


def pick_node(rng, g, ops=None):
    nodes = [n for n in g.node if ops is None or n.op_type in ops]
    return rng.choice(nodes) if nodes else None


def find_init(g, name):
    for t in g.initializer:
        if t.name == name:
            return t
    return None


def m_drop_input(rng, model):
    g = pick_graph(rng, model)
    n = pick_node(rng, g)
    if n is None or not n.input:
        return None
    k = rng.randrange(len(n.input))
    del n.input[k]
    return f"drop input {k} of {n.op_type} '{n.name}'"


def m_add_input(rng, model):
    g = pick_graph(rng, model)
    n = pick_node(rng, g)
    if n is None:
        return None
    v = rng.choice(value_names(g) + ["", "qfold_fuzz_missing"])
    for _ in range(rng.choice([1, 1, 1, 3])):
        n.input.append(v)
    return f"add input '{v}' to {n.op_type} '{n.name}'"


def m_empty_input(rng, model):
    g = pick_graph(rng, model)
    n = pick_node(rng, g)
    if n is None or not n.input:
        return None
    k = rng.randrange(len(n.input))
    n.input[k] = ""
    return f"input {k} of {n.op_type} '{n.name}' set to ''"


def m_repoint_input(rng, model):
    g = pick_graph(rng, model)
    n = pick_node(rng, g)
    if n is None or not n.input:
        return None
    k = rng.randrange(len(n.input))
    kind = rng.choice(["initializer", "graph input", "own output", "other output", "missing"])
    if kind == "initializer" and g.initializer:
        v = rng.choice(g.initializer).name
    elif kind == "graph input" and g.input:
        v = rng.choice(g.input).name
    elif kind == "own output" and n.output:
        v = n.output[0]  # a self-loop
    elif kind == "other output":
        v = rng.choice(value_names(g))
    else:
        kind, v = "missing", "qfold_fuzz_missing"
    n.input[k] = v
    return f"input {k} of {n.op_type} '{n.name}' -> {kind} '{v}'"


def m_dup_output(rng, model):
    g = pick_graph(rng, model)
    n = pick_node(rng, g)
    if n is None or not n.output:
        return None
    how = rng.choice(["same as other node", "graph input name", "initializer name", "twice", "graph output twice"])
    if how == "same as other node":
        other = pick_node(rng, g)
        if other is None or not other.output or other is n:
            return None
        n.output[0] = other.output[0]
    elif how == "graph input name" and g.input:
        n.output[0] = g.input[0].name
    elif how == "initializer name" and g.initializer:
        n.output[0] = rng.choice(g.initializer).name
    elif how == "twice":
        n.output.append(n.output[0])
    elif how == "graph output twice" and g.output:
        g.output.append(g.output[0])
    else:
        return None
    return f"duplicate output ({how}) on {n.op_type} '{n.name}'"


def set_attr(node, attr):
    keep = [a for a in node.attribute if a.name != attr.name]
    del node.attribute[:]
    node.attribute.extend(keep)
    node.attribute.append(attr)


def m_attr_extreme(rng, model):
    g = pick_graph(rng, model)
    n = pick_node(rng, g)
    if n is None:
        return None
    existing = [a.name for a in n.attribute]
    r = rng.random()
    if existing and r < 0.6:
        name = rng.choice(existing)
    else:
        name = rng.choice(INT_ATTRS + INTS_ATTRS + FLOAT_ATTRS + STRING_ATTRS)
    a = AttributeProto()
    a.name = name
    if rng.random() < 0.1:  # wrong attribute type
        a.type = rng.choice([AttributeProto.FLOAT, AttributeProto.STRING, AttributeProto.INTS, AttributeProto.TENSOR])
        if a.type == AttributeProto.FLOAT:
            a.f = rng.choice(EXTREME_FLOATS)
        elif a.type == AttributeProto.STRING:
            a.s = rng.choice([b"", b"\xff\xfe", b"VALID", b"SAME_UPPER"])
        elif a.type == AttributeProto.INTS:
            a.ints.extend([rng.choice(EXTREME_INTS)])
        desc = f"{name} with wrong type {AttributeProto.AttributeType.Name(a.type)}"
    elif name in INTS_ATTRS:
        a.type = AttributeProto.INTS
        old = next((x for x in n.attribute if x.name == name), None)
        length = len(old.ints) if old is not None and old.ints and rng.random() < 0.6 else rng.choice([0, 1, 2, 3, 4, 6, 9])
        if old is not None and old.ints and rng.random() < 0.5:
            vals = list(old.ints)
            vals[rng.randrange(len(vals))] = rng.choice(EXTREME_INTS)
        else:
            vals = [rng.choice(EXTREME_INTS) for _ in range(length)]
        a.ints.extend(vals)
        desc = f"{name}={vals}"
    elif name in FLOAT_ATTRS:
        a.type = AttributeProto.FLOAT
        a.f = rng.choice(EXTREME_FLOATS)
        desc = f"{name}={a.f}"
    elif name in STRING_ATTRS:
        a.type = AttributeProto.STRING
        a.s = rng.choice([b"", b"SAME_UPPER", b"SAME_LOWER", b"VALID", b"NOTSET", b"bogus"])
        desc = f"{name}={a.s!r}"
    else:
        a.type = AttributeProto.INT
        a.i = rng.choice(EXTREME_INTS)
        desc = f"{name}={a.i}"
    if rng.random() < 0.05:  # duplicated attribute name
        node_attr = AttributeProto()
        node_attr.CopyFrom(a)
        n.attribute.append(node_attr)
        n.attribute.append(a)
        desc += " (twice)"
    else:
        set_attr(n, a)
    return f"attr on {n.op_type} '{n.name}': {desc}"


def m_tensor_dims(rng, model):
    g = pick_graph(rng, model)
    if not g.initializer:
        return None
    t = rng.choice(g.initializer)
    how = rng.choice(["clear", "extreme", "add", "drop", "scalar", "zero"])
    dims = list(t.dims)
    if how == "clear" or how == "scalar":
        dims = []
    elif how == "extreme" and dims:
        dims[rng.randrange(len(dims))] = rng.choice([0, -1, 2**31, 2**32, 2**62, I64_MAX, 3])
    elif how == "add":
        dims.insert(rng.randrange(len(dims) + 1), rng.choice([1, 2, 0, 2**40]))
    elif how == "drop" and dims:
        dims.pop(rng.randrange(len(dims)))
    elif how == "zero" and dims:
        dims[0] = 0
    else:
        return None
    del t.dims[:]
    t.dims.extend(dims)
    return f"initializer '{t.name}' dims -> {dims} ({how})"


def m_valueinfo_dims(rng, model):
    g = pick_graph(rng, model)
    vis = list(g.input) + list(g.output) + list(g.value_info)
    if not vis:
        return None
    vi = rng.choice(vis)
    tt = vi.type.tensor_type
    how = rng.choice(["clear shape", "clear type", "dim extreme", "dim param", "drop dim", "add dim", "elem type"])
    if how == "clear shape":
        tt.ClearField("shape")
    elif how == "clear type":
        vi.ClearField("type")
    elif how == "elem type":
        tt.elem_type = rng.choice(DTYPES)
    elif tt.HasField("shape") and tt.shape.dim:
        d = tt.shape.dim[rng.randrange(len(tt.shape.dim))]
        if how == "dim extreme":
            d.dim_value = rng.choice([0, -1, 2**31, 2**32, 2**62, I64_MAX, 1000000])
        elif how == "dim param":
            d.dim_param = rng.choice(["N", "", "batch"])
        elif how == "drop dim":
            del tt.shape.dim[rng.randrange(len(tt.shape.dim))]
        else:
            tt.shape.dim.add().dim_value = rng.choice([1, 2, 0])
    else:
        return None
    return f"value_info '{vi.name}': {how}"


def m_swap_op(rng, model):
    g = pick_graph(rng, model)
    n = pick_node(rng, g)
    if n is None:
        return None
    old = n.op_type
    n.op_type = rng.choice([o for o in OP_TYPES if o != old])
    return f"op_type of '{n.name}' {old} -> {n.op_type}"


def m_qparams(rng, model):
    g = pick_graph(rng, model)
    n = pick_node(rng, g, {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul"})
    if n is None:
        return None
    k = rng.randrange(1, len(n.input)) if len(n.input) > 1 else 1
    is_zp = (n.op_type in ("QuantizeLinear", "DequantizeLinear") and k == 2) or (
        n.op_type.startswith("QLinear") and k % 3 == 2)
    old = find_init(g, n.input[k]) if k < len(n.input) else None
    old_len = int(np.prod(old.dims)) if old is not None and old.dims else 1
    shape_kind = rng.choice(["scalar", "[1]", "per-channel wrong length", "2-D", "empty"])
    shape = {"scalar": (), "[1]": (1,), "per-channel wrong length": (old_len + rng.choice([1, -1 if old_len > 1 else 2]),),
             "2-D": (1, max(old_len, 1)), "empty": (0,)}[shape_kind]
    if is_zp:
        dtype = rng.choice([np.uint8, np.int8, np.int32, np.int16, np.float32, np.uint16])
        val = rng.choice([0, 1, 127, 255, -128, -1])
        arr = np.full(shape, val).astype(dtype)
    else:
        dtype = rng.choice([np.float32, np.float32, np.float16, np.float64, np.int8])
        val = rng.choice([0.0, -1.0, 1e-45, 1e38, float("inf"), float("nan"), 0.5])
        with np.errstate(all="ignore"):
            arr = np.full(shape, val).astype(dtype)
    name = f"qfold_fuzz_qparam_{rng.randrange(10**6)}"
    g.initializer.append(numpy_helper.from_array(arr, name))
    if k < len(n.input):
        n.input[k] = name
    else:
        while len(n.input) < k:
            n.input.append("")
        n.input.append(name)
    what = "zero point" if is_zp else "scale"
    return f"{what} input {k} of {n.op_type} '{n.name}' -> {shape_kind} {np.dtype(dtype).name} {val}"


def m_axis(rng, model):
    g = pick_graph(rng, model)
    n = pick_node(rng, g, {"QuantizeLinear", "DequantizeLinear", "Gemm", "Flatten", "Concat", "Softmax"})
    if n is None:
        return None
    a = AttributeProto()
    a.name, a.type, a.i = "axis", AttributeProto.INT, rng.choice(EXTREME_INTS + [-5, 4, 5])
    set_attr(n, a)
    return f"axis={a.i} on {n.op_type} '{n.name}'"


def m_dtype(rng, model):
    g = pick_graph(rng, model)
    if not g.initializer:
        return None
    t = rng.choice(g.initializer)
    old = t.data_type
    t.data_type = rng.choice([d for d in DTYPES if d != old])
    return f"initializer '{t.name}' data_type {old} -> {t.data_type}"


def m_raw_data(rng, model):
    g = pick_graph(rng, model)
    if not g.initializer:
        return None
    t = rng.choice(g.initializer)
    how = rng.choice(["truncate", "append", "clear", "both fields", "odd length"])
    if how == "truncate" and t.raw_data:
        t.raw_data = t.raw_data[: rng.randrange(len(t.raw_data))]
    elif how == "append":
        t.raw_data = bytes(t.raw_data) + b"\x01\x02\x03\x04" * rng.choice([1, 2, 100])
    elif how == "clear":
        t.ClearField("raw_data")
        t.ClearField("float_data")
        t.ClearField("int32_data")
        t.ClearField("int64_data")
    elif how == "both fields":
        t.float_data.extend([1.0, 2.0])
        if not t.raw_data:
            t.raw_data = b"\x00" * 8
    elif how == "odd length":
        t.raw_data = bytes(t.raw_data) + b"\x07"
    else:
        return None
    return f"initializer '{t.name}' raw_data: {how}"


def m_external(rng, model):
    g = pick_graph(rng, model)
    if not g.initializer:
        return None
    t = rng.choice(g.initializer)
    location = rng.choice(["missing.bin", "weights.bin", "../../../../../etc/hostname", "/etc/hostname", "", "."])
    offset = rng.choice([0, 1, 7, 2**31, 2**62, -1])
    length = rng.choice([None, 0, 4, 2**32, 2**62, -1])
    t.ClearField("raw_data")
    t.ClearField("float_data")
    del t.external_data[:]
    t.data_location = TensorProto.EXTERNAL
    for key, val in (("location", location), ("offset", offset), ("length", length)):
        if val is not None:
            e = t.external_data.add()
            e.key, e.value = key, str(val)
    return f"initializer '{t.name}' external location={location!r} offset={offset} length={length}"


def m_initializer_set(rng, model):
    g = pick_graph(rng, model)
    how = rng.choice(["remove", "duplicate name", "shadow graph input", "to Constant node"])
    if not g.initializer:
        return None
    i = rng.randrange(len(g.initializer))
    t = g.initializer[i]
    if how == "remove":
        del g.initializer[i]
    elif how == "duplicate name":
        d = g.initializer.add()
        d.CopyFrom(t)
        if d.dims:
            d.dims[0] = d.dims[0] + 1
    elif how == "shadow graph input" and g.input:
        d = g.initializer.add()
        d.CopyFrom(t)
        d.name = g.input[0].name
    elif how == "to Constant node":
        c = onnx.helper.make_node("Constant", [], [t.name], name=f"qfold_fuzz_const_{i}", value=t)
        del g.initializer[i]
        g.node.insert(rng.randrange(len(g.node) + 1), c)
    else:
        return None
    return f"initializer '{t.name}': {how}"


def m_nodes(rng, model):
    g = pick_graph(rng, model)
    if not g.node:
        return None
    how = rng.choice(["delete", "duplicate", "reverse", "shuffle", "cycle", "clear name", "dup name",
                      "domain", "delete all"])
    i = rng.randrange(len(g.node))
    n = g.node[i]
    if how == "delete":
        del g.node[i]
    elif how == "duplicate":
        g.node.insert(i, n)  # copies
    elif how in ("reverse", "shuffle"):
        nodes = list(g.node)
        if how == "reverse":
            nodes.reverse()
        else:
            rng.shuffle(nodes)
        copies = [onnx.NodeProto.FromString(x.SerializeToString()) for x in nodes]
        del g.node[:]
        g.node.extend(copies)
    elif how == "cycle":
        j = rng.randrange(len(g.node))
        a, b = g.node[min(i, j)], g.node[max(i, j)]
        if not b.output or not a.input:
            return None
        a.input[0] = b.output[0]
    elif how == "clear name":
        n.name = ""
    elif how == "dup name":
        other = g.node[rng.randrange(len(g.node))]
        n.name = other.name
    elif how == "domain":
        n.domain = rng.choice(["com.microsoft", "bogus.domain", "ai.onnx.ml", "ai.onnx"])
    elif how == "delete all":
        del g.node[:]
    return f"nodes: {how} (at '{n.name}')"


def m_graph_io(rng, model):
    g = pick_graph(rng, model)
    how = rng.choice(["remove output", "remove all outputs", "remove input", "output is input",
                      "output is initializer", "missing output"])
    if how == "remove output" and g.output:
        del g.output[rng.randrange(len(g.output))]
    elif how == "remove all outputs":
        del g.output[:]
    elif how == "remove input" and g.input:
        del g.input[rng.randrange(len(g.input))]
    elif how == "output is input" and g.output and g.input:
        g.output[0].name = g.input[0].name
    elif how == "output is initializer" and g.output and g.initializer:
        g.output[0].name = g.initializer[0].name
    elif how == "missing output" and g.output:
        g.output[0].name = "qfold_fuzz_missing"
    else:
        return None
    return f"graph io: {how}"


def m_opset(rng, model):
    how = rng.choice(["version", "remove default", "ir_version", "add domain"])
    if how == "version" and model.opset_import:
        o = rng.choice(model.opset_import)
        o.version = rng.choice([0, 1, 6, 7, 9, 10, 12, 21, 99, -1, I64_MAX])
        return f"opset '{o.domain}' -> {o.version}"
    if how == "remove default":
        keep = [o for o in model.opset_import if o.domain not in ("", "ai.onnx")]
        del model.opset_import[:]
        model.opset_import.extend(keep)
        return "default opset removed"
    if how == "ir_version":
        model.ir_version = rng.choice([0, 1, 3, 4, 11, 99, -1])
        return f"ir_version -> {model.ir_version}"
    o = model.opset_import.add()
    o.domain, o.version = rng.choice([("", 11), ("com.microsoft", 1), ("", 21)])
    return f"opset import added {o.domain!r} {o.version}"


def m_bn_specific(rng, model):
    g = pick_graph(rng, model)
    n = pick_node(rng, g, {"BatchNormalization"})
    if n is None:
        return None
    how = rng.choice(["training outputs", "six inputs", "var negative", "var nan", "gamma zero"])
    if how == "training outputs":
        n.output.extend([n.output[0] + "_mean", n.output[0] + "_var"])
        a = AttributeProto()
        a.name, a.type, a.i = "training_mode", AttributeProto.INT, rng.choice([0, 1])
        set_attr(n, a)
    elif how == "six inputs":
        n.input.append(n.input[-1])
    else:
        idx = {"var negative": 4, "var nan": 4, "gamma zero": 1}[how]
        if len(n.input) <= idx:
            return None
        t = find_init(g, n.input[idx])
        if t is None:
            return None
        arr = numpy_helper.to_array(t).copy()
        with np.errstate(all="ignore"):
            arr[...] = {"var negative": -1.0, "var nan": np.nan, "gamma zero": 0.0}[how]
        t.CopyFrom(numpy_helper.from_array(arr.astype(arr.dtype), t.name))
    return f"BatchNormalization '{n.name}': {how}"


STRUCT_MUTATIONS = [
    (m_drop_input, 3), (m_add_input, 3), (m_empty_input, 2), (m_repoint_input, 4), (m_dup_output, 2),
    (m_attr_extreme, 6), (m_tensor_dims, 4), (m_valueinfo_dims, 3), (m_swap_op, 4), (m_qparams, 4),
    (m_axis, 2), (m_dtype, 2), (m_raw_data, 3), (m_external, 1), (m_initializer_set, 2), (m_nodes, 3),
    (m_graph_io, 2), (m_opset, 2), (m_bn_specific, 2),
]


# ----------------------------------------------------------------------------------------------
# byte mutations: (rng, bytes) -> (bytes, description)


def varint(v: int) -> bytes:
    v &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        if v:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def b_bitflip(rng, data):
    d = bytearray(data)
    k = rng.choice([1, 1, 2, 4, 16])
    for _ in range(k):
        i = rng.randrange(len(d))
        d[i] ^= 1 << rng.randrange(8)
    return bytes(d), f"{k} bit flip(s)"


def b_setbyte(rng, data):
    d = bytearray(data)
    k = rng.choice([1, 2, 8])
    v = rng.choice([0x00, 0xFF])
    for _ in range(k):
        d[rng.randrange(len(d))] = v
    return bytes(d), f"{k} byte(s) set to {v:#04x}"


def b_truncate(rng, data):
    n = rng.randrange(len(data))
    return data[:n], f"truncated to {n} bytes"


def b_dup_chunk(rng, data):
    i = rng.randrange(len(data))
    ln = rng.choice([1, 4, 16, 256, 4096])
    j = rng.randrange(len(data) + 1)
    chunk = data[i:i + ln]
    reps = rng.choice([1, 1, 2, 10])
    return data[:j] + chunk * reps + data[j:], f"chunk [{i}:{i + ln}] x{reps} inserted at {j}"


def b_nested_groups(rng, data):
    n = rng.choice([10, 100, 1000, 10_000, 100_000, 1_000_000])
    tag = rng.choice([b"\x0b", b"\x0b", b"\x3b", b"\x5b"])  # field 1 / 7 / 11, wire type 3 (start group)
    return data + tag * n, f"{tag!r} * {n} appended (nested groups)"


def b_nested_messages(rng, data):
    # graph (7) -> node (1) -> attribute (5) -> g (6) ... nested length-delimited submessages
    depth = rng.choice([50, 100, 200, 1000, 10000])
    body = b""
    for _ in range(depth):
        body = b"\x32" + varint(len(body)) + body  # field 6 (AttributeProto.g), length-delimited
    return data + b"\x3a" + varint(len(body)) + body, f"nested length-delimited messages depth {depth} appended"


def b_overlong(rng, data):
    field = rng.choice([1, 7, 8, 14])
    ln = rng.choice([2**31, 2**32, 2**62, 2**64 - 1, 1000])
    return data + bytes([(field << 3) | 2]) + varint(ln) + b"\x00" * 8, f"field {field} with length {ln} appended"


def b_random_tail(rng, data):
    n = rng.choice([1, 8, 64, 1024])
    return data + bytes(rng.randrange(256) for _ in range(n)), f"{n} random bytes appended"


BYTE_MUTATIONS = [
    (b_bitflip, 4), (b_setbyte, 3), (b_truncate, 2), (b_dup_chunk, 3), (b_nested_groups, 2),
    (b_nested_messages, 1), (b_overlong, 1), (b_random_tail, 1),
]


def weighted(rng, table):
    total = sum(w for _, w in table)
    r = rng.uniform(0, total)
    for f, w in table:
        r -= w
        if r <= 0:
            return f
    return table[-1][0]


def make_mutant(rng, seed: Seed):
    """Returns (bytes, [descriptions])."""
    descs = []
    data = seed.data
    if rng.random() < 0.7:
        model = onnx.ModelProto()
        model.CopyFrom(seed.model)
        for _ in range(rng.choice([1, 1, 1, 2, 3])):
            for _attempt in range(8):
                f = weighted(rng, STRUCT_MUTATIONS)
                try:
                    d = f(rng, model)
                except Exception:  # noqa: BLE001 - an earlier mutation broke what this one reads
                    d = None
                if d:
                    descs.append(d)
                    break
        data = model.SerializeToString()
        if rng.random() < 0.15 and data:
            data, d = weighted(rng, BYTE_MUTATIONS)(rng, data)
            descs.append(d)
    else:
        for _ in range(rng.choice([1, 1, 2])):
            if not data:
                break
            data, d = weighted(rng, BYTE_MUTATIONS)(rng, data)
            descs.append(d)
    return data, descs or ["none"]


# ----------------------------------------------------------------------------------------------
# running qfold and classifying the result


def commands_for(bin_path: str, model: str, out: str, qdq: bool):
    cmds = [
        ("inspect", [bin_path, "inspect", model]),
        ("fuse", [bin_path, "fuse", model, "-o", out]),
        ("quantize", [bin_path, "quantize", model, "-o", out, "--calib-random", "2"]
         + shlex.split(os.environ.get("QFOLD_FUZZ_QUANTIZE_ARGS", ""))),
    ]
    if qdq:
        cmds.append(("convert", [bin_path, "convert", model, "-o", out]))
    return cmds


def limiter(mem_bytes: int):
    def f():
        resource.setrlimit(resource.RLIMIT_AS, (mem_bytes, mem_bytes))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    return f


def run_one(argv, timeout, mem_bytes, cwd):
    env = {k: v for k, v in os.environ.items() if k not in ("RUST_BACKTRACE", "RUST_LIB_BACKTRACE")}
    t0 = time.monotonic()
    try:
        p = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=timeout,
                           preexec_fn=limiter(mem_bytes), cwd=cwd, env=env)
        return p.returncode, p.stderr.decode("utf-8", "replace"), False, time.monotonic() - t0
    except subprocess.TimeoutExpired as e:
        err = (e.stderr or b"").decode("utf-8", "replace")
        return None, err, True, time.monotonic() - t0


REGISTRY_RE = re.compile(r"^.*?/registry/src/[^/]+/")
RUSTC_RE = re.compile(r"^/rustc/[0-9a-f]+/")


def norm_path(loc: str) -> str:
    loc = REGISTRY_RE.sub("", loc)
    loc = RUSTC_RE.sub("rustc:", loc)
    return loc


def norm_msg(msg: str) -> str:
    msg = re.sub(r"/[^\s:'\"]*", "PATH", msg)
    msg = re.sub(r"'[^']*'", "'_'", msg)
    msg = re.sub(r"-?\d+", "N", msg)
    return msg.strip()[:100]


def classify(cmd, rc, stderr, timed_out):
    """Returns (category, signature) or None. category: crash | unnamed error."""
    m = re.search(r"panicked at (.+?):(\d+):(\d+)", stderr)
    if m:
        return "crash", f"{cmd}: panic at {norm_path(m.group(1))}:{m.group(2)}"
    if "overflowed its stack" in stderr:
        return "crash", f"{cmd}: stack overflow"
    m = re.search(r"memory allocation of \d+ bytes failed", stderr)
    if m:
        return "crash", f"{cmd}: memory allocation failed"
    if timed_out:
        return "crash", f"{cmd}: timeout"
    if rc is not None and rc < 0:
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = str(-rc)
        first = stderr.strip().splitlines()[0] if stderr.strip() else ""
        return "crash", f"{cmd}: signal {name}" + (f" ({norm_msg(first)})" if first else "")
    if "panicked" in stderr or "RUST_BACKTRACE" in stderr:
        return "crash", f"{cmd}: panic ({norm_msg(stderr.splitlines()[0] if stderr else '')})"
    if rc not in (0, 1, 2):
        return "crash", f"{cmd}: exit {rc}"
    if rc == 2:
        msg = stderr.strip()
        first = msg.splitlines()[0] if msg else ""
        body = first[len("error:"):].strip() if first.startswith("error:") else first
        whole = msg[len("error:"):] if msg.startswith("error:") else msg
        if not any(s in whole for s in ("'", "node", "tensor", ":")):
            return "unnamed error", f"{cmd}: unnamed error: {norm_msg(body)}"
    return None


GDB = shutil.which("gdb")
SKIP_FRAME = re.compile(r"^(core::|std::|alloc::|__GI_|__pthread|__rust|raise|abort|<?alloc::|rust_panic)")


def abort_site(argv, timeout, mem_bytes, cwd):
    """For an abort with no panic message (a panic in a no-unwind context, e.g. a debug
    precondition of get_unchecked, which qfold's quiet panic hook for tract does not print), asks
    gdb for the first frame outside core/std: 'tract_core::ops::...::c_dim (data_formats.rs:NN)'."""
    if not GDB:
        return None
    try:
        p = subprocess.run([GDB, "-q", "-batch", "-nx", "-ex", "set pagination off", "-ex", "run",
                            "-ex", "bt 40", "--args"] + argv, capture_output=True, timeout=timeout * 3 + 30,
                           cwd=cwd, preexec_fn=limiter(mem_bytes))
    except subprocess.TimeoutExpired:
        return None
    for line in p.stdout.decode("utf-8", "replace").splitlines():
        prev = None
        while prev != line:  # drop generic arguments, innermost first
            prev, line = line, re.sub(r"<[^<>]*>", "", line)
        m = re.match(r"#\d+\s+(?:0x[0-9a-f]+ in )?(\S+)(?: \(.*?\))?(?: at (\S+):(\d+))?", line)
        if not m:
            continue
        func = m.group(1)
        if SKIP_FRAME.match(func) or "panicking" in func or "ub_checks" in (m.group(2) or ""):
            continue
        where = f" ({Path(m.group(2)).name}:{m.group(3)})" if m.group(2) else ""
        return f"{func}{where}"
    return None


def signature_of(cmd, argv, rc, stderr, timed_out, timeout, mem_bytes, cwd):
    found = classify(cmd, rc, stderr, timed_out)
    if found and found[0] == "crash" and "non-unwinding panic" in stderr and "panicked at" not in stderr:
        site = abort_site(argv, timeout, mem_bytes, cwd)
        if site:
            return "crash", f"{cmd}: abort (non-unwinding panic) in {site}"
    return found


def slug(sig: str) -> str:
    s = re.sub(r"[^A-Za-z0-9]+", "-", sig).strip("-").lower()[:60]
    return f"{s}-{hashlib.sha1(sig.encode()).hexdigest()[:8]}"


class Store:
    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.best: dict[str, dict] = {}
        self.counts: dict[str, int] = {}
        self.new: set[str] = set()
        for cj in root.glob("*/crash.json"):
            try:
                rec = json.loads(cj.read_text())
                self.best[rec["signature"]] = rec
            except Exception:  # noqa: BLE001
                pass

    def would_keep(self, sig: str, size: int) -> bool:
        old = self.best.get(sig)
        return old is None or old.get("model_bytes", 1 << 62) > size

    def add(self, rec: dict, model_bytes: bytes, extra: list[Path]):
        sig = rec["signature"]
        self.counts[sig] = self.counts.get(sig, 0) + 1
        if not self.would_keep(sig, len(model_bytes)):
            return False
        d = self.root / slug(sig)
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        (d / "model.onnx").write_bytes(model_bytes)
        for p in extra:
            shutil.copy(p, d / p.name)
        rec = dict(rec)
        rec["model_bytes"] = len(model_bytes)
        rec["reproducer"] = str(d / "model.onnx")
        rec["repro_command"] = " ".join(
            "OUT.onnx" if a == "__OUT__" else (str(d / "model.onnx") if a == "__MODEL__" else a)
            for a in rec["argv"])
        (d / "crash.json").write_text(json.dumps(rec) + "\n")
        with open(self.root / "index.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        self.best[sig] = rec
        self.new.add(sig)
        return True


def fuzz_one(args_tuple):
    """Runs one mutant (in a worker process with --jobs > 1). Returns a result dict."""
    index, seed_idx, rseed, bin_path, timeout, mem_bytes, workroot = args_tuple
    seed = SEEDS[seed_idx]
    rng = random.Random(rseed)
    data, descs = make_mutant(rng, seed)
    work = Path(workroot) / f"w{os.getpid()}"
    mdir, odir = work / "m", work / "o"
    for d in (mdir, odir):
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
    mpath = mdir / "model.onnx"
    mpath.write_bytes(data)
    for p in seed.extra:
        shutil.copy(p, mdir / p.name) if p.is_file() else None
    try:
        mutant_model = onnx.load_from_string(data)
        parsed = True
        ops = {n.op_type for n in mutant_model.graph.node}
    except Exception:  # noqa: BLE001
        parsed, ops = False, set()
    qdq = seed.qdq or bool(ops & QDQ_OPS)
    digest = hashlib.sha1(data).hexdigest()
    out = odir / "out.onnx"
    results = []
    for cmd, argv in commands_for(bin_path, str(mpath), str(out), qdq):
        for p in odir.iterdir():
            p.unlink() if p.is_file() else shutil.rmtree(p)
        rc, stderr, timed_out, dt = run_one(argv, timeout, mem_bytes, str(work))
        found = signature_of(cmd, argv, rc, stderr, timed_out, timeout, mem_bytes, str(work))
        if found is None:
            # contract checks (soft)
            left = sorted(p.name for p in odir.iterdir())
            if mpath.exists() and hashlib.sha1(mpath.read_bytes()).hexdigest() != digest:
                found = ("contract", f"{cmd}: input file modified")
                mpath.write_bytes(data)
            elif cmd != "inspect" and (rc == 2 or (rc == 1 and cmd != "quantize")) and left:
                found = ("contract", f"{cmd}: files left after exit {rc}")
            elif cmd != "inspect" and rc in (0, 1) and [x for x in left if x not in ("out.onnx", "out.onnx.data")]:
                found = ("contract", f"{cmd}: stray files in output folder")
            elif cmd != "inspect" and rc in (0, 1) and parsed and out.exists():
                try:
                    onnx.load_from_string(out.read_bytes())
                except Exception:  # noqa: BLE001
                    found = ("contract", f"{cmd}: output onnx cannot parse")
        rec = None
        if found is not None:
            cat, sig = found
            tail = stderr.strip().splitlines()[-12:]
            rec = {
                "category": cat, "signature": sig, "seed_model": seed.name, "fuzz_seed_index": index,
                "mutations": descs, "command": cmd,
                "argv": ["qfold" if a == bin_path else ("__MODEL__" if a == str(mpath) else
                                                         ("__OUT__" if a == str(out) else a)) for a in argv],
                "exit": "timeout" if timed_out else rc, "seconds": round(dt, 2),
                "stderr_tail": "\n".join(tail)[-2000:], "binary": bin_path,
            }
        results.append((cmd, rc, timed_out, dt, rec))
    return {"index": index, "seed": seed.name, "bytes": len(data), "results": results,
            "data": data if any(r[4] for r in results) else None, "seed_idx": seed_idx}


class Reducer:
    """Shrinks a crasher while its signature stays the same (a budget of runs per crasher).

    A mutant onnx can parse loses nodes, initializers, value_info, graph inputs/outputs and doc
    strings one at a time; bytes are cut in halving chunks (ddmin-like), which shrinks e.g. a
    million nested group tags to the fewest that still crash."""

    def __init__(self, bin_path, timeout, mem_bytes, workroot, budget):
        self.bin, self.timeout, self.mem, self.budget = bin_path, timeout, mem_bytes, budget
        self.work = Path(workroot) / "reduce"

    def reproduces(self, data, rec, extra):
        if self.left <= 0:
            return False
        self.left -= 1
        if self.work.exists():
            shutil.rmtree(self.work)
        self.work.mkdir(parents=True)
        m, out = self.work / "model.onnx", self.work / "out" / "out.onnx"
        out.parent.mkdir()
        m.write_bytes(data)
        for p in extra:
            shutil.copy(p, self.work / p.name)
        argv = [self.bin if a == "qfold" else (str(m) if a == "__MODEL__" else (str(out) if a == "__OUT__" else a))
                for a in rec["argv"]]
        rc, stderr, to, _ = run_one(argv, self.timeout, self.mem, str(self.work))
        found = signature_of(rec["command"], argv, rc, stderr, to, self.timeout, self.mem, str(self.work))
        if found is None and rec["category"] == "contract":
            return False  # contract findings are not re-checked here: keep the original
        return found is not None and found[1] == rec["signature"]

    def reduce(self, data: bytes, rec: dict, extra) -> bytes:
        if rec["exit"] == "timeout" or rec["category"] == "contract":
            return data
        # gdb-located aborts cost seconds per try
        self.left = self.budget if "non-unwinding" not in rec["signature"] else min(self.budget, 40)
        try:
            model = onnx.load_from_string(data)
            again = model.SerializeToString()
            if len(again) <= len(data) and self.reproduces(again, rec, extra):
                data = self._reduce_model(model, rec, extra)
        except Exception:  # noqa: BLE001 - not parseable: bytes only
            pass
        return self._reduce_bytes(data, rec, extra)

    def _reduce_model(self, model, rec, extra):
        def fields(g):
            return [g.node, g.initializer, g.value_info, g.output, g.input]
        best = model.SerializeToString()
        for g in list(all_graphs(model.graph)):
            for rep in fields(g):
                i = len(rep) - 1
                while i >= 0 and self.left > 0:
                    item = type(rep[i])()
                    item.CopyFrom(rep[i])
                    del rep[i]
                    cand = model.SerializeToString()
                    if self.reproduces(cand, rec, extra):
                        best = cand
                    else:
                        rep.insert(i, item)
                    i -= 1
        for clear in (lambda: model.graph.ClearField("doc_string"), lambda: model.ClearField("doc_string"),
                      lambda: model.ClearField("metadata_props"), lambda: model.ClearField("producer_name")):
            clear()
            cand = model.SerializeToString()
            if len(cand) < len(best) and self.reproduces(cand, rec, extra):
                best = cand
            else:
                model = onnx.load_from_string(best)
        return best

    def _reduce_bytes(self, data, rec, extra):
        chunk = len(data) // 2
        while chunk >= 1 and self.left > 0:
            i = len(data) - chunk
            while i >= 0 and self.left > 0:
                cand = data[:i] + data[i + chunk:]
                if cand and self.reproduces(cand, rec, extra):
                    data = cand
                i -= chunk
                if i >= len(data):
                    i = len(data) - chunk
            chunk //= 2
        return data


SEEDS: list[Seed] = []


def init_worker(models_dir):
    global SEEDS
    SEEDS = load_seeds(Path(models_dir))


def replay(args):
    store_dir = Path(args.crashers)
    recs = []
    for cj in sorted(store_dir.glob("*/crash.json")):
        recs.append((cj.parent, json.loads(cj.read_text())))
    if not recs:
        print(f"no crashers in {store_dir}")
        return 0
    tmp = Path(tempfile.mkdtemp(prefix="qfold-replay-"))
    still = 0
    print(f"| signature | reproducer | now |\n|---|---|---|")
    for d, rec in recs:
        out = tmp / "out.onnx"
        argv = [args.bin if a == "qfold" else (str(d / "model.onnx") if a == "__MODEL__" else
                                               (str(out) if a == "__OUT__" else a)) for a in rec["argv"]]
        mem = int(args.mem_gb * 2**30)
        rc, stderr, to, _ = run_one(argv, args.timeout, mem, str(tmp))
        found = signature_of(rec["command"], argv, rc, stderr, to, args.timeout, mem, str(tmp))
        now = found[1] if found else f"ok (exit {rc})"
        if found and found[1] == rec["signature"]:
            now, still = "still: same signature", still + 1
        print(f"| {rec['signature']} | {d / 'model.onnx'} | {now} |")
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"\n{still} of {len(recs)} still reproduce")
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=str(ROOT / "target" / "debug" / "qfold"), help="qfold binary")
    ap.add_argument("--minutes", type=float, default=10.0, help="time budget (default 10)")
    ap.add_argument("--iterations", type=int, default=0, help="stop after this many mutants (0: no limit)")
    ap.add_argument("--seed", type=int, default=1, help="RNG seed; mutant i of seed S is reproducible")
    ap.add_argument("--start", type=int, default=0, help="first mutant index (resume a run)")
    ap.add_argument("--jobs", type=int, default=1, help="parallel worker processes (default 1)")
    ap.add_argument("--crashers", default="/work/crashers", help="where crashers are saved")
    ap.add_argument("--models", default=str(ROOT / "onnx_models"), help="seed models folder")
    ap.add_argument("--timeout", type=float, default=20.0, help="seconds per command (default 20)")
    ap.add_argument("--mem-gb", type=float, default=8.0, help="address-space limit per command (default 8)")
    ap.add_argument("--reduce-budget", type=int, default=300,
                    help="runs spent shrinking each new crasher (0: keep mutants as found)")
    ap.add_argument("--quantize-args", default="",
                    help="extra arguments of every quantize run, e.g. --quantize-args=--output-bias-correction")
    ap.add_argument("--no-soft", action="store_true", help="do not save unnamed-error / contract findings")
    ap.add_argument("--replay", action="store_true", help="re-run the saved crashers against --bin and exit")
    args = ap.parse_args()
    faulthandler.register(signal.SIGUSR1)  # kill -USR1 <pid> prints where the fuzzer is
    args.bin = str(Path(args.bin).resolve())
    # (workers inherit it)
    os.environ["QFOLD_FUZZ_QUANTIZE_ARGS"] = args.quantize_args
    if not os.access(args.bin, os.X_OK):
        sys.exit(f"error: qfold binary {args.bin} not found or not executable (cargo build, or --bin)")
    if args.replay:
        return replay(args)

    init_worker(args.models)
    if not SEEDS:
        sys.exit(f"error: no seed models under {args.models}")
    weights = [1.0 / max(len(s.data), 64) ** 0.5 for s in SEEDS]
    print(f"{len(SEEDS)} seeds ({sum(s.qdq for s in SEEDS)} with Q/DQ), binary {args.bin}, seed {args.seed}",
          flush=True)
    store = Store(Path(args.crashers))
    workroot = tempfile.mkdtemp(prefix="qfold-fuzz-")
    mem_bytes = int(args.mem_gb * 2**30)
    reducer = Reducer(args.bin, args.timeout, mem_bytes, workroot, args.reduce_budget)
    deadline = time.monotonic() + args.minutes * 60
    t_start = time.monotonic()
    picker = random.Random(args.seed)
    for _ in range(args.start):
        picker.choices(range(len(SEEDS)), weights)
    stats = {"mutants": 0, "runs": 0}
    by_cmd: dict[str, dict] = {}

    def tasks():
        i = args.start
        while (args.iterations == 0 or i < args.start + args.iterations) and time.monotonic() < deadline:
            s = picker.choices(range(len(SEEDS)), weights)[0]
            yield (i, s, f"{args.seed}:{i}", args.bin, args.timeout, mem_bytes, workroot)
            i += 1

    def consume(res):
        stats["mutants"] += 1
        for cmd, rc, to, dt, rec in res["results"]:
            stats["runs"] += 1
            c = by_cmd.setdefault(cmd, {"runs": 0, "0": 0, "1": 0, "2": 0, "other": 0, "secs": 0.0})
            c["runs"] += 1
            c["secs"] += dt
            key = str(rc) if rc in (0, 1, 2) else "other"
            c[key] += 1
            if rec is None or (args.no_soft and rec["category"] != "crash"):
                continue
            seed = SEEDS[res["seed_idx"]]
            extra = [p for p in seed.extra if p.is_file() and not p.name.startswith("test_data")]
            data = res["data"]
            if store.would_keep(rec["signature"], len(data)) and args.reduce_budget > 0:
                data = reducer.reduce(data, rec, extra)
                if len(data) != len(res["data"]):
                    rec["reduced_from_bytes"] = len(res["data"])
            if store.add(rec, data, extra):
                print(f"[{res['index']}] {rec['category']}: {rec['signature']} "
                      f"({res['seed']}, {len(res['data'])} -> {len(data)} bytes; {'; '.join(rec['mutations'])})", flush=True)
        if stats["mutants"] % 500 == 0:
            el = time.monotonic() - t_start
            print(f"... {stats['mutants']} mutants, {stats['runs']} runs, {len(store.counts)} signatures, "
                  f"{el / 60:.1f} min", flush=True)

    try:
        if args.jobs <= 1:
            for t in tasks():
                consume(fuzz_one(t))
        else:
            with futures.ProcessPoolExecutor(args.jobs, initializer=init_worker, initargs=(args.models,)) as ex:
                pending = set()
                for t in tasks():
                    pending.add(ex.submit(fuzz_one, t))
                    if len(pending) >= args.jobs * 2:
                        done, pending = futures.wait(pending, return_when=futures.FIRST_COMPLETED)
                        for d in done:
                            consume(d.result())
                for d in futures.as_completed(pending):
                    consume(d.result())
    except KeyboardInterrupt:
        print("interrupted", flush=True)
    finally:
        shutil.rmtree(workroot, ignore_errors=True)

    elapsed = time.monotonic() - t_start
    print(f"\n## qfold fuzz summary\n\nbinary {args.bin}; seed {args.seed}; "
          f"{stats['mutants']} mutants, {stats['runs']} runs in {elapsed / 60:.1f} min\n")
    print("| command | runs | exit 0 | exit 1 | exit 2 | other | mean s |\n|---|---|---|---|---|---|---|")
    for cmd, c in by_cmd.items():
        print(f"| {cmd} | {c['runs']} | {c['0']} | {c['1']} | {c['2']} | {c['other']} | "
              f"{c['secs'] / max(c['runs'], 1):.3f} |")
    print("\n| category | signature | hits this run | reproducer (bytes) | command |\n|---|---|---|---|---|")
    order = {"crash": 0, "contract": 1, "unnamed error": 2}
    for sig, rec in sorted(store.best.items(), key=lambda kv: (order.get(kv[1]["category"], 9), kv[0])):
        n = store.counts.get(sig, 0)
        if n == 0 and sig not in store.new:
            continue
        print(f"| {rec['category']} | {sig} | {n} | {rec['reproducer']} ({rec['model_bytes']}) | "
              f"`{rec['repro_command']}` |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
