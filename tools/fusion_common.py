"""Shared helpers for the scripts that write qfold's fusion reference models.

Layout written for every case (the ONNX backend-test layout):

    onnx_models/<case>/model.onnx
    onnx_models/<case>/test_data_set_0/input_K.pb, output_K.pb   (TensorProto, K in graph order)
    onnx_models/<case>/provenance.json

Everything here is deterministic: no timestamps, sorted JSON keys, fixed float formatting.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter

import numpy as np
import onnx
from onnx import numpy_helper

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS_DIR = os.path.join(REPO, "onnx_models")


def versions() -> dict:
    """Versions of the Python packages that produced a case (only those importable)."""
    out = {"onnx": onnx.__version__, "numpy": np.__version__}
    try:
        import onnxruntime

        out["onnxruntime"] = onnxruntime.__version__
    except ImportError:  # pragma: no cover
        pass
    import sys

    if "torch" in sys.modules:
        out["torch"] = sys.modules["torch"].__version__
    if "torchvision" in sys.modules:
        out["torchvision"] = sys.modules["torchvision"].__version__
    return out


def graph_input_names(model: onnx.ModelProto) -> list[str]:
    inits = {i.name for i in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits]


def graph_output_names(model: onnx.ModelProto) -> list[str]:
    return [o.name for o in model.graph.output]


def op_counts(model: onnx.ModelProto) -> dict:
    return dict(sorted(Counter(n.op_type for n in model.graph.node).items()))


def bn_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == "BatchNormalization"]


def tensor_pb(arr: np.ndarray, name: str) -> bytes:
    return numpy_helper.from_array(np.ascontiguousarray(arr), name=name).SerializeToString()


def write_pb(path: str, arr: np.ndarray, name: str) -> None:
    with open(path, "wb") as f:
        f.write(tensor_pb(arr, name))


def max_abs(a, b) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch {a.shape} vs {b.shape}")
    return float(np.max(np.abs(a - b))) if a.size else 0.0


def rounded(x: float) -> float:
    """Stable representation for provenance (diffs vary in the last bits across machines)."""
    return float(f"{x:.3e}")


def write_case(
    case: str,
    model: onnx.ModelProto,
    inputs: list[np.ndarray],
    outputs: list[np.ndarray],
    provenance: dict,
    extra_files: dict[str, tuple[np.ndarray, str]] | None = None,
    root: str = MODELS_DIR,
) -> str:
    """Write one case folder from scratch (the folder is replaced)."""
    onnx.checker.check_model(model, full_check=True)
    in_names = graph_input_names(model)
    out_names = graph_output_names(model)
    if len(inputs) != len(in_names):
        raise ValueError(f"{case}: {len(inputs)} inputs for graph inputs {in_names}")
    if outputs and len(outputs) != len(out_names):
        raise ValueError(f"{case}: {len(outputs)} outputs for graph outputs {out_names}")

    folder = os.path.join(root, case)
    if os.path.isdir(folder):
        shutil.rmtree(folder)
    data = os.path.join(folder, "test_data_set_0")
    os.makedirs(data)
    onnx.save(model, os.path.join(folder, "model.onnx"))
    for k, (arr, name) in enumerate(zip(inputs, in_names)):
        write_pb(os.path.join(data, f"input_{k}.pb"), arr, name)
    for k, (arr, name) in enumerate(zip(outputs, out_names)):
        write_pb(os.path.join(data, f"output_{k}.pb"), arr, name)
    for fname, (arr, name) in (extra_files or {}).items():
        write_pb(os.path.join(folder, fname), arr, name)

    prov = provenance  # filled in place so callers can print it
    prov.setdefault("case", case)
    prov["graph_inputs"] = [
        {"name": n, "shape": list(a.shape), "dtype": str(a.dtype)} for n, a in zip(in_names, inputs)
    ]
    prov["graph_outputs"] = [
        {"name": n, "shape": list(a.shape), "dtype": str(a.dtype)} for n, a in zip(out_names, outputs)
    ]
    prov["op_counts"] = op_counts(model)
    prov["bn_count"] = len(bn_nodes(model))
    prov["opset"] = {(o.domain or "ai.onnx"): o.version for o in model.opset_import}
    prov["ir_version"] = model.ir_version
    with open(os.path.join(folder, "provenance.json"), "w") as f:
        json.dump(prov, f, indent=2, sort_keys=True)
        f.write("\n")
    return folder


def folder_size(path: str) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for fn in files:
            total += os.path.getsize(os.path.join(dirpath, fn))
    return total


def run_ort(model: onnx.ModelProto, inputs: list[np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    # No graph optimizations: we want ORT to run the graph as written (it would fold BN itself).
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    feeds = {n: a for n, a in zip(graph_input_names(model), inputs)}
    return sess.run(None, feeds)


def relu_positive_fractions(model: onnx.ModelProto, inputs: list[np.ndarray]) -> dict:
    """Fraction of positive values at every Relu output (onnxruntime). A Relu that is all zero or all
    positive makes a reference output blind to folding errors upstream of it."""
    relus = [n for n in model.graph.node if n.op_type == "Relu"]
    if not relus:
        return {}
    m = onnx.ModelProto()
    m.CopyFrom(model)
    known = {o.name for o in m.graph.output}
    for n in relus:
        if n.output[0] not in known:
            m.graph.output.append(onnx.ValueInfoProto(name=n.output[0]))
    outs = dict(zip([o.name for o in m.graph.output], run_ort(m, inputs)))
    return {n.name: round(float((outs[n.output[0]] > 0).mean()), 3) for n in relus}


def assert_relus_alive(case: str, fractions: dict, lo=0.05, hi=0.999) -> None:
    for name, frac in fractions.items():
        if not lo <= frac <= hi:
            raise AssertionError(f"{case}: Relu {name} positive fraction {frac} (degenerate reference)")
