#!/usr/bin/env python3
"""Export torchvision resnet50 and mobilenet_v2 (random weights, BN statistics randomized with a
fixed seed) to ONNX with their BatchNormalization nodes kept, for large-model fusion runs.

Written OUTSIDE the repository (default /tmp/qfold_big/), one folder per model:
    <out>/<model>/model.onnx, <out>/<model>/test_data_set_0/{input_0,output_0}.pb, provenance.json
output_0.pb is the unfused PyTorch eval output (fusion must not change it beyond float tolerance).

Same exporter options as tools/export_seed_models.py:
    dynamo=False, training=TrainingMode.PRESERVE, do_constant_folding=False, opset_version=13

Usage: python tools/export_torchvision.py [OUT_DIR] [--models resnet50,mobilenet_v2] [--size 224]
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
import warnings

import numpy as np
import onnx
import torch
import torchvision

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fusion_common as fc  # noqa: E402
from export_seed_models import (  # noqa: E402
    EXPORT_OPTIONS,
    EXPORT_OPTIONS_TEXT,
    module_nodes,
    randomize_bn,
    run_bn_hooks,
)

warnings.filterwarnings("ignore")
SCRIPT = "tools/export_torchvision.py"
SEED = 20240607


def export(name: str, out_root: str, size: int) -> None:
    t0 = time.time()
    torch.manual_seed(SEED)
    model = getattr(torchvision.models, name)(weights=None)
    gen = torch.Generator().manual_seed(SEED + 1)
    calib = torch.rand(4, 3, size, size, generator=gen)
    randomize_bn(model, gen, calib)  # also leaves the model in eval mode
    x = torch.rand(1, 3, size, size, generator=gen)
    bn_ran = run_bn_hooks(model, x)
    with torch.no_grad():
        y = model(x).numpy()

    f = io.BytesIO()
    torch.onnx.export(model, (x,), f, **EXPORT_OPTIONS)
    m = onnx.load_from_string(f.getvalue())
    for n in m.graph.node:
        n.doc_string = ""
    bns = fc.bn_nodes(m)
    assert len(bns) == len(bn_ran), (name, len(bns), len(bn_ran))
    assert all(len(n.output) == 1 for n in bns), name
    ort_y = fc.run_ort(m, [x.numpy()])[0]
    bn_map = module_nodes(m, bn_ran)
    unresolved = [p for p, v in bn_map.items() if len(v) != 1]
    assert not unresolved, (name, unresolved[:5])

    prov = {
        "script": SCRIPT,
        "versions": fc.versions(),
        "seed": SEED,
        "model": f"torchvision.models.{name}(weights=None)",
        "input": f"torch.rand(1, 3, {size}, {size})",
        "bn_statistics": "as tools/export_seed_models.py randomize_bn: random affine, running stats from one "
        "train-mode pass over torch.rand(4, 3, H, W), then perturbed",
        "exporter": EXPORT_OPTIONS_TEXT,
        "bn_modules_run": len(bn_ran),
        "bn_module_nodes": bn_map,
        "outputs": "test_data_set_0/output_0.pb: the unfused PyTorch eval output",
        "onnxruntime_vs_torch_max_abs_diff": fc.rounded(fc.max_abs(ort_y, y)),
        "output_abs_max": fc.rounded(float(np.max(np.abs(y)))),
    }
    folder = fc.write_case(name, m, [x.numpy()], [y], prov, root=out_root)
    size_mb = os.path.getsize(os.path.join(folder, "model.onnx")) / 1e6
    print(
        f"{name}: BatchNormalization nodes = {prov['bn_count']} (modules run: {len(bn_ran)}), "
        f"model.onnx = {size_mb:.1f} MB, ops = {prov['op_counts']}, "
        f"ort-vs-torch max abs diff = {prov['onnxruntime_vs_torch_max_abs_diff']}, "
        f"{time.time() - t0:.1f}s -> {folder}"
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", nargs="?", default="/tmp/qfold_big/")
    ap.add_argument("--models", default="resnet50,mobilenet_v2")
    ap.add_argument("--size", type=int, default=224)
    args = ap.parse_args()
    torch.set_num_threads(2)
    os.makedirs(args.out, exist_ok=True)
    for name in args.models.split(","):
        export(name, args.out, args.size)


if __name__ == "__main__":
    main()
