#!/usr/bin/env python3
"""Export the models of PyTorch's eager fusion test (reference/test_fuse_eager.py) to ONNX, with
their BatchNormalization nodes kept, and store PyTorch's own fused outputs as the references.

For every case:
  * the model from torch.testing._internal.common_quantization, built under a fixed seed, with
    every BatchNorm given non-trivial statistics (weight, bias, running_mean, running_var drawn from
    a fixed-seed generator; some weights negative), then .eval();
  * model.onnx from the legacy TorchScript exporter with
        dynamo=False, training=TrainingMode.PRESERVE, do_constant_folding=False, opset_version=13
    (TrainingMode.EVAL, the default for an eval model, runs the exporter's Conv+BN fold; PRESERVE
    on an eval model keeps the BN nodes in inference form: one output, no training_mode in opset 13);
  * test_data_set_0/input_0.pb: a torch.rand input of the shape the reference test uses (batch 2..4);
  * test_data_set_0/output_0.pb: output of torch.ao.quantization.fuse_modules(model, <the test's
    module lists>) in eval mode;
  * unfused_output_0.pb: output of the unfused eager model in eval mode;
  * provenance.json: versions, seed, exporter options, BN counts, fuse_lists, module -> ONNX node
    names, max abs differences (fused vs unfused in PyTorch; onnxruntime on model.onnx vs unfused).

Usage: python tools/export_seed_models.py [--out onnx_models] [--only fusion_linear_bn,...]
Needs torch==2.5.1 and expecttest (torch.testing._internal imports it).
"""

from __future__ import annotations

import argparse
import copy
import io
import os
import sys
import warnings

import numpy as np
import onnx
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fusion_common as fc  # noqa: E402

warnings.filterwarnings("ignore")
SCRIPT = "tools/export_seed_models.py"
SEED = 20240601
OPSET = 13

EXPORT_OPTIONS = dict(
    dynamo=False,
    training=torch.onnx.TrainingMode.PRESERVE,
    do_constant_folding=False,
    opset_version=OPSET,
    input_names=["input"],
    output_names=["output"],
)
EXPORT_OPTIONS_TEXT = (
    "torch.onnx.export(model.eval(), (x,), f, dynamo=False, training=torch.onnx.TrainingMode.PRESERVE, "
    "do_constant_folding=False, opset_version=13, input_names=['input'], output_names=['output']) "
    "- fixed shapes, no dynamic_axes"
)

BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def randomize_bn(model: nn.Module, gen: torch.Generator, calib: torch.Tensor) -> None:
    """Non-trivial BN statistics that still keep the activations alive.

    1. weight = U(0.5,1.5) * (-1 with p=0.25), bias = N(0, 0.5^2);
    2. running statistics from one train-mode forward pass on a separate calibration batch
       (momentum=None: the cumulative average, i.e. the exact batch statistics), as the reference
       tests do with a train-mode pass;
    3. perturbed: running_mean += 0.3 * std * N(0,1), running_var *= U(0.5, 2.0).
    Distinct values also stop the exporter from deduplicating identical parameters into Identity
    nodes (it does that for the default 1/0/0/1 values).
    """
    bns = [m for _, m in model.named_modules() if isinstance(m, BN_TYPES)]
    with torch.no_grad():
        for m in bns:
            c = m.num_features
            sign = torch.where(torch.rand(c, generator=gen) < 0.25, -1.0, 1.0)
            m.weight.copy_((0.5 + torch.rand(c, generator=gen)) * sign)
            m.bias.copy_(torch.randn(c, generator=gen) * 0.5)
            m.reset_running_stats()
            m.momentum = None
        model.train()
        model(calib)
        for m in bns:
            c = m.num_features
            m.momentum = 0.1
            std = m.running_var.sqrt()
            m.running_mean.add_(0.3 * std * torch.randn(c, generator=gen))
            m.running_var.mul_(0.5 + 1.5 * torch.rand(c, generator=gen))
            m.num_batches_tracked.zero_()
    model.eval()


def scope_of(path: str) -> str:
    """PyTorch module path -> the legacy exporter's node-name scope (torch/onnx/utils.py,
    _setup_trace_module_map): one segment per module level, each segment the level's qualified name
    cut back to its last non-numeric atom.
      'sub1.conv'             -> '/sub1/conv/'
      'features.0.1'          -> '/features/features.0/features.0.1/'
      'layer1.0.downsample.0' -> '/layer1/layer1.0/downsample/downsample.0/'
    A node of that module is named scope + OpType (+ '_N' when the module emits several of a kind)."""
    parts = path.split(".")
    segs = []
    for i in range(len(parts)):
        atoms = parts[: i + 1]
        k = max(j for j, a in enumerate(atoms) if not a.isnumeric()) if any(
            not a.isnumeric() for a in atoms) else 0
        segs.append(".".join(atoms[k:]))
    return "/" + "/".join(segs) + "/"


def module_nodes(model: onnx.ModelProto, paths: list[str]) -> dict[str, list[str]]:
    """For each module path, the ONNX nodes emitted directly by that module."""
    out = {}
    for p in paths:
        sc = scope_of(p)
        out[p] = [n.name for n in model.graph.node
                  if n.name.startswith(sc) and "/" not in n.name[len(sc):]]
    return out


# Cases: (folder, builder, input shape, fuse lists, notes)


def build_model_for_fusion():
    from torch.ao.quantization import default_qat_qconfig
    from torch.testing._internal.common_quantization import ModelForFusion

    return ModelForFusion(default_qat_qconfig)


def _cq(name):
    def f():
        import torch.testing._internal.common_quantization as cq

        return getattr(cq, name)()

    return f


CASES = [
    dict(
        case="fusion_model_for_fusion",
        cls="ModelForFusion",
        build=build_model_for_fusion,
        constructor="ModelForFusion(default_qat_qconfig)",
        input_shape=[2, 3, 10],
        input_note="img_data_1d shape [2, 3, 10] (batch 2 as in the test). forward reshapes to (-1, 36), "
        "so batch 2 gives a [1, 10] output.",
        fuse_lists=[["conv1", "bn1", "relu1"], ["sub1.conv", "sub1.bn"]],
        test="test_fuse_module_train / test_forward_hooks_preserved (they use fuse_modules_qat; the ONNX "
        "counterpart of the eval export uses fuse_modules with the same lists)",
        dead_bn=["bn2"],
        bn_after_fuse_only=1,
        bn_after_fuse_auto=0,
        notes="bn2 runs in forward but only feeds the discarded y branch (conv2 -> relu2 -> bn2 -> relu3), "
        "so the exporter drops it: the graph has 3 BN (bn3, bn1, sub1.bn). conv3 -> bn3 -> relu4 is "
        "fusable too but is not in the test's lists (automatic mode would fold it as well). "
        "QuantStub/DeQuantStub are identity in float eval and produce no nodes.",
    ),
    dict(
        case="fusion_sequential",
        cls="ModelWithSequentialFusion",
        build=_cq("ModelWithSequentialFusion"),
        constructor="ModelWithSequentialFusion()",
        input_shape=[2, 3, 10, 10],
        input_note="img_data_2d shape [1, 3, 10, 10], batch 2 here",
        fuse_lists=[
            ["conv1", "relu1"],
            ["features.0.0", "features.0.1", "features.0.2"],
            ["features.1.0", "features.1.1", "features.1.2"],
            ["features.2.0", "features.2.1", "features.2.2"],
            ["classifier.0", "classifier.1"],
        ],
        test="test_fusion_sequential_model_eval / test_fuse_modules_with_nested_hooks",
        dead_bn=[],
        bn_after_fuse_only=0,
        bn_after_fuse_auto=0,
        notes="features.i are ConvBNReLU (nn.Sequential of Conv2d(3,3,1,bias=False), BatchNorm2d, ReLU); "
        "classifier is Linear(300,10) + ReLU (exported as Gemm transB=1 -> Relu).",
    ),
    dict(
        case="fusion_linear_bn",
        cls="ModelForLinearBNFusion",
        build=_cq("ModelForLinearBNFusion"),
        constructor="ModelForLinearBNFusion()",
        input_shape=[4, 20],
        input_note="the test uses randn(8, 20); batch 4 here (torch.rand)",
        fuse_lists=[["fc", "bn"]],
        test="test_fusion_linear_bn_eval",
        dead_bn=[],
        bn_after_fuse_only=0,
        bn_after_fuse_auto=0,
        notes="Linear(20,10) -> BatchNorm1d(10) on a rank-2 [N, 10] tensor: Gemm(transB=1) -> BN.",
    ),
    dict(
        case="fusion_conv_with_bias",
        cls="ModelForFusionWithBias",
        build=_cq("ModelForFusionWithBias"),
        constructor="ModelForFusionWithBias()",
        input_shape=[2, 3, 10, 10],
        input_note="img_data_2d shape [1, 3, 10, 10], batch 2 here",
        fuse_lists=[["conv1", "bn1", "relu1"], ["conv2", "bn2"]],
        test="test_fusion_conv_with_bias (it uses fuse_modules_qat; eval counterpart here)",
        dead_bn=[],
        bn_after_fuse_only=0,
        bn_after_fuse_auto=0,
        notes="Conv2d(3,2,5,bias=True) -> BN -> ReLU -> Conv2d(2,2,1,bias=True) -> BN: folding into an "
        "existing conv bias.",
    ),
    dict(
        case="fusion_convtranspose_bn",
        cls="ModelForConvTransposeBNFusion",
        build=_cq("ModelForConvTransposeBNFusion"),
        constructor="ModelForConvTransposeBNFusion()",
        input_shape=[2, 3, 16],
        input_note="the test uses randn(8, 3, 16); batch 2 here (torch.rand)",
        fuse_lists=[["conv1", "bn1"], ["conv2", "bn2"], ["conv3", "bn3"]],
        test="test_fusion_convtranspose_bn_eval",
        dead_bn=[],
        bn_after_fuse_only=0,
        bn_after_fuse_auto=0,
        notes="ConvTranspose1d/2d/3d(3,3,1) each followed by BatchNorm1d/2d/3d, with Unsqueeze between.",
    ),
    dict(
        case="fusion_single_layer_linear",
        cls="SingleLayerLinearModel",
        build=_cq("SingleLayerLinearModel"),
        constructor="SingleLayerLinearModel()",
        input_shape=[2, 5],
        input_note="get_example_inputs() is rand(1, 5); batch 2 here",
        fuse_lists=[["fc1"]],
        test="test_fuse_function_customization (fuser_func replaces fc1 by nn.Identity)",
        dead_bn=[],
        bn_after_fuse_only=0,
        bn_after_fuse_auto=0,
        custom_fuser=True,
        notes="No BN. The test fuses [['fc1']] with a custom fuser_func returning [nn.Identity()]; the "
        "default fuser has no method for a lone Linear. test_data_set_0/output_0.pb is therefore the "
        "model's own output (default semantics: nothing to fold, so every committed case's "
        "test_data_set_0 matches its model.onnx), and custom_fuser_output_0.pb holds the output after "
        "the custom fuser (fc1 -> Identity, i.e. equal to the input) for the custom-fuser test.",
    ),
]


def run_bn_hooks(model: nn.Module, x: torch.Tensor) -> list[str]:
    ran = []
    hooks = [
        m.register_forward_hook(lambda mod, i, o, name=name: ran.append(name))
        for name, m in model.named_modules()
        if isinstance(m, BN_TYPES)
    ]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return ran


def export_case(spec: dict, out_root: str) -> tuple[str, dict]:
    from torch.ao.quantization import fuse_modules

    case = spec["case"]
    torch.manual_seed(SEED)
    model = spec["build"]()
    gen = torch.Generator().manual_seed(SEED + 1)
    calib = torch.rand(*([4 * spec["input_shape"][0]] + spec["input_shape"][1:]), generator=gen)
    randomize_bn(model, gen, calib)
    x = torch.rand(*spec["input_shape"], generator=gen)

    bn_ran = run_bn_hooks(model, x)
    with torch.no_grad():
        unfused = model(x).numpy()

    # PyTorch's own fusion, eval semantics
    extra = {}
    fused_model = copy.deepcopy(model).eval()
    if spec.get("custom_fuser"):
        def custom_fuse_func(module, is_qat, add_fuser_mapping):  # as in the reference test
            return [torch.nn.Identity()]

        custom = fuse_modules(copy.deepcopy(model).eval(), spec["fuse_lists"], fuser_func=custom_fuse_func)
        assert type(custom.fc1) is nn.Identity
        with torch.no_grad():
            custom_out = custom(x).numpy()
        fused = unfused
    else:
        fused_model = fuse_modules(fused_model, spec["fuse_lists"])
        with torch.no_grad():
            fused = fused_model(x).numpy()
        for group in spec["fuse_lists"]:
            for name in group[1:]:
                assert type(fused_model.get_submodule(name)) is nn.Identity, (case, name)

    # ONNX export with BN kept
    f = io.BytesIO()
    torch.onnx.export(model, (x,), f, **EXPORT_OPTIONS)
    onnx_model = onnx.load_from_string(f.getvalue())
    for n in onnx_model.graph.node:  # determinism: no stack traces / paths in doc strings
        n.doc_string = ""

    bns = fc.bn_nodes(onnx_model)
    expected_bn = len(bn_ran) - len(spec["dead_bn"])
    assert len(bns) == expected_bn, (case, len(bns), bn_ran, spec["dead_bn"])
    for n in bns:
        assert len(n.output) == 1, (case, n.name, "training-mode BN")
        assert not any(a.name == "training_mode" and a.i for a in n.attribute), (case, n.name)
    ops = fc.op_counts(onnx_model)
    for bad in ("Dropout", "Identity"):
        assert bad not in ops, (case, bad, ops)

    # module path -> ONNX node names, for every module in the fuse lists and every BN
    paths = sorted({p for g in spec["fuse_lists"] for p in g} | set(bn_ran))
    mod_nodes = module_nodes(onnx_model, paths)
    for p in {p for g in spec["fuse_lists"] for p in g}:
        assert mod_nodes[p], (case, p, "no ONNX node for module")

    inits = {t.name for t in onnx_model.graph.initializer}
    const_nodes = [n.name for n in onnx_model.graph.node if n.op_type == "Constant"]
    ort_out = fc.run_ort(onnx_model, [x.numpy()])[0]
    relu_frac = fc.relu_positive_fractions(onnx_model, [x.numpy()])
    fc.assert_relus_alive(case, relu_frac)

    prov = {
        "script": SCRIPT,
        "versions": fc.versions(),
        "seed": SEED,
        "seed_rule": f"torch.manual_seed({SEED}) before building the model (its own init); "
        f"torch.Generator().manual_seed({SEED + 1}) for BN statistics, then the input",
        "model": f"torch.testing._internal.common_quantization.{spec['constructor']}",
        "reference_test": spec["test"],
        "description": spec["notes"],
        "input": spec["input_note"] + "; values torch.rand (uniform [0, 1))",
        "bn_statistics": "every BatchNorm: weight = U(0.5,1.5) * (-1 with p=0.25), bias = N(0,0.5^2); "
        "running stats = exact statistics of one train-mode pass over a separate torch.rand calibration "
        "batch (4x the batch size), then running_mean += 0.3*std*N(0,1), running_var *= U(0.5,2.0); "
        "eps = module default 1e-5, momentum 0.1 (exported as momentum=0.9)",
        "relu_positive_fraction": relu_frac,
        "exporter": EXPORT_OPTIONS_TEXT,
        "exporter_notes": "TrainingMode.EVAL (the default for an eval model) folds Conv+BN in the "
        "exporter; PRESERVE with model.eval() keeps BatchNormalization in inference form (one output, "
        "momentum attribute present, no training_mode in opset 13). Node doc_strings cleared.",
        "bn_modules_run": bn_ran,
        "bn_modules_dead": spec["dead_bn"],
        "bn_nodes": [n.name for n in bns],
        "fuse_lists": spec["fuse_lists"],
        "bn_after_fuse_only": spec["bn_after_fuse_only"],
        "bn_after_fuse_auto": spec["bn_after_fuse_auto"],
        "bn_after_fuse_note": "BatchNormalization nodes expected to remain after `qfold fuse --only "
        "<fuse_lists>` (only) and after automatic fusion (auto)",
        "module_nodes": mod_nodes,
        "weights_as": "initializers" if not const_nodes else f"initializers; Constant nodes: {const_nodes}",
        "initializer_count": len(inits),
        "outputs": (
            "test_data_set_0/output_0.pb: the model's own eval output (see description: custom fuser); "
            "custom_fuser_output_0.pb: output of fuse_modules(model, [['fc1']], fuser_func=<returns "
            "[nn.Identity()]>) in eval mode; unfused_output_0.pb: the unfused eager eval output"
            if spec.get("custom_fuser")
            else f"test_data_set_0/output_0.pb: outputs of torch.ao.quantization.fuse_modules(model, "
            f"{spec['fuse_lists']}) in eval mode; unfused_output_0.pb: the unfused eager eval output"
        ),
        "fused_vs_unfused_torch_max_abs_diff": fc.rounded(fc.max_abs(fused, unfused)),
        "onnxruntime_vs_unfused_torch_max_abs_diff": fc.rounded(fc.max_abs(ort_out, unfused)),
        "onnxruntime_options": "CPUExecutionProvider, ORT_DISABLE_ALL graph optimizations, 1 thread",
        "output_abs_max": fc.rounded(float(np.max(np.abs(unfused)))),
    }
    extra["unfused_output_0.pb"] = (unfused, "output")
    if spec.get("custom_fuser"):
        extra["custom_fuser_output_0.pb"] = (custom_out, "output")
        prov["custom_fuser_vs_input_max_abs_diff"] = fc.rounded(fc.max_abs(custom_out, x.numpy()))
    assert prov["onnxruntime_vs_unfused_torch_max_abs_diff"] < 1e-4, prov
    assert prov["fused_vs_unfused_torch_max_abs_diff"] < 1e-4, prov

    folder = fc.write_case(case, onnx_model, [x.numpy()], [fused], prov, extra_files=extra, root=out_root)
    return folder, prov


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=fc.MODELS_DIR)
    ap.add_argument("--only", default="")
    args = ap.parse_args()
    torch.set_num_threads(1)
    only = {s for s in args.only.split(",") if s}
    for spec in CASES:
        if only and spec["case"] not in only:
            continue
        folder, prov = export_case(spec, args.out)
        print(
            f"{spec['case']:28s} bn={prov['bn_count']} fused-unfused={prov['fused_vs_unfused_torch_max_abs_diff']} "
            f"ort-unfused={prov['onnxruntime_vs_unfused_torch_max_abs_diff']} size={fc.folder_size(folder)}B"
        )


if __name__ == "__main__":
    main()
