#!/usr/bin/env python3
"""Small PyTorch models exercising the ops real CNNs use (issue 9, item 5), for the
quantization plan's end-to-end tests, and a check that qfold's quantized forms of them load and
run in ONNX Runtime.

    make   writes onnx_models/real_ops/<case>/: model.onnx (torch.onnx.export, TorchScript
           exporter, opset 14 (HardSwish), eval mode; random weights, BatchNorm statistics randomized so
           the folds are not identities), calib.npy (16 samples, seed 1) and eval.npy (8
           samples, seed 2) of smooth random images [N, 3, 32, 32], test_data_set_0 (the first
           eval sample, ONNX Runtime's output as the reference), provenance.json.
    ort    quantizes every case with `qfold quantize --calib calib.npy --eval eval.npy` (--bin) in
           QDQ and QOperator form (and with --preset ort), runs each quantized model in ONNX
           Runtime on eval.npy and prints its SQNR against the float model in ONNX Runtime, next
           to qfold's own SQNR in tract.

Cases:
    mbv3_block   MobileNetV3-style: Conv-BN-HardSwish, depthwise Conv-BN-HardSwish, squeeze-
                 excite (GlobalAveragePool, Conv, Relu, Conv, HardSigmoid, Mul), Conv-BN,
                 residual Add, InstanceNormalization, head Conv-BN-Hardswish
    neck         PicoDet / YOLO-style neck: Conv-BN-LeakyRelu, Conv-BN-PRelu, SiLU (Sigmoid, Mul),
                 nearest Resize + Concat, bilinear Resize, Split (chunk), Slice (Focus-style
                 stride-2 slices), Gather of one channel, constant-0 Pad before a valid Conv,
                 reflect Pad, DepthToSpace (pixel shuffle), SpaceToDepth

Run with the project venv (torch 2.5, onnx 1.17, onnxruntime 1.20):

    /work/venv/bin/python tools/make_real_ops.py make [--out onnx_models/real_ops]
    /work/venv/bin/python tools/make_real_ops.py ort --bin target/debug/qfold
"""

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

SCRIPT = "tools/make_real_ops.py"
OPSET = 14
SHAPE = (3, 32, 32)


def build(case):
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    class SpaceToDepth(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            # ONNX SpaceToDepth order: output channel (bh * 2 + bw) * C + c
            n, c, h, w = x.shape
            return x.reshape(n, c, h // 2, 2, w // 2, 2).permute(0, 3, 5, 1, 2, 4).reshape(n, 4 * c, h // 2, w // 2)

        @staticmethod
        def symbolic(g, x):
            return g.op("SpaceToDepth", x, blocksize_i=2)

    def cbn(cin, cout, k=3, s=1, groups=1, pad=None):
        return nn.Sequential(nn.Conv2d(cin, cout, k, s, k // 2 if pad is None else pad, groups=groups,
                                       bias=False), nn.BatchNorm2d(cout))

    class Mbv3Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = cbn(3, 16, s=2)
            self.expand = cbn(16, 32, k=1)
            self.dw = cbn(32, 32, groups=32)
            self.se_reduce = nn.Conv2d(32, 8, 1)
            self.se_expand = nn.Conv2d(8, 32, 1)
            self.project = cbn(32, 16, k=1)
            self.inorm = nn.InstanceNorm2d(16, affine=True)
            self.head = cbn(16, 24, k=1)

        def forward(self, x):
            x = F.hardswish(self.stem(x))
            y = F.hardswish(self.expand(x))
            y = F.hardswish(self.dw(y))
            s = F.adaptive_avg_pool2d(y, 1)
            s = F.hardsigmoid(self.se_expand(F.relu(self.se_reduce(s))))
            y = self.project(y * s)
            x = x + y
            x = self.inorm(x)
            return F.hardswish(self.head(x))

    class Neck(nn.Module):
        def __init__(self):
            super().__init__()
            self.focus = cbn(12, 16, k=3)
            self.c2 = cbn(16, 32, s=2)
            self.prelu = nn.PReLU(32)
            self.lat = cbn(48, 32, k=1)
            self.padded = cbn(16, 16, k=3, pad=0)
            self.reflect = nn.Conv2d(16, 16, 3)
            self.shuffle = cbn(32, 16, k=1)
            self.s2d = cbn(64, 16, k=1)
            self.out = cbn(16 + 16 + 8 + 16 + 16 + 1, 32, k=1)

        def forward(self, x):
            # Focus: four stride-2 slices of the image, concatenated on channels
            x = torch.cat([x[..., ::2, ::2], x[..., 1::2, ::2], x[..., ::2, 1::2], x[..., 1::2, 1::2]], 1)
            a = F.leaky_relu(self.focus(x), 0.1)                       # [16, 16, 16]
            b = self.prelu(self.c2(a))                                 # [32, 8, 8]
            b = b * torch.sigmoid(b)                                   # SiLU
            up = F.interpolate(b, scale_factor=2.0, mode="nearest")    # [32, 16, 16]
            c = F.leaky_relu(self.lat(torch.cat([a, up], 1)), 0.1)     # [32, 16, 16]
            c1, c2 = torch.split(c, [16, 16], dim=1)                   # Split: 2 x [16, 16, 16]
            p = F.relu(self.padded(F.pad(c1, (1, 1, 1, 1))))           # constant-0 Pad, valid Conv
            r = self.reflect(F.pad(c2, (1, 1, 1, 1), mode="reflect"))  # reflect Pad
            d = F.pixel_shuffle(b, 2)                                  # DepthToSpace: [8, 16, 16]
            lin = F.interpolate(self.shuffle(b), scale_factor=2.0, mode="bilinear",
                                align_corners=False)                  # linear Resize: [16, 16, 16]
            s2d = F.relu(self.s2d(SpaceToDepth.apply(F.interpolate(a, scale_factor=2.0, mode="nearest"))))
            g = c[:, 3]                                                # Gather: [16, 16]
            y = torch.cat([p, r, d, lin, s2d, g.unsqueeze(1)], 1)
            return F.leaky_relu(self.out(y), 0.1)

    return {"mbv3_block": Mbv3Block, "neck": Neck}[case]()


ARCH = {
    "mbv3_block": "stem Conv(3->16, s2)-BN-HardSwish; expand 1x1 Conv-BN-HardSwish; depthwise 3x3 Conv-BN-HardSwish; "
                  "SE: GlobalAveragePool, 1x1 Conv(32->8), Relu, 1x1 Conv(8->32), HardSigmoid, Mul; project 1x1 Conv-BN; "
                  "residual Add; InstanceNormalization(16, affine); head 1x1 Conv-BN-HardSwish -> [1, 24, 16, 16]",
    "neck": "Focus (4 Slices + Concat); Conv-BN-LeakyRelu(0.1); Conv(s2)-BN-PRelu; SiLU (Sigmoid, Mul); nearest Resize x2 "
            "+ Concat + 1x1 Conv-BN-LeakyRelu; Split in 2; constant-0 Pad + valid Conv-BN-Relu; reflect Pad + Conv; "
            "DepthToSpace(2); bilinear Resize x2 of a 1x1 Conv-BN; nearest Resize + SpaceToDepth(2) + 1x1 Conv-BN-Relu; "
            "Gather of channel 3 + Unsqueeze; Concat; 1x1 Conv-BN-LeakyRelu -> [1, 32, 16, 16]",
}


def randomize(model, seed):
    import torch
    torch.manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
            if isinstance(m, torch.nn.InstanceNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
            if isinstance(m, torch.nn.PReLU):
                m.weight.uniform_(0.05, 0.3)
    return model.eval()


def images(n, seed):
    """Smooth random images: low-resolution noise upsampled, plus fine noise, roughly N(0, 1)."""
    rng = np.random.default_rng(seed)
    c, h, w = SHAPE
    low = rng.normal(size=(n, c, h // 4, w // 4))
    x = np.repeat(np.repeat(low, 4, axis=2), 4, axis=3)
    x = x + 0.2 * rng.normal(size=x.shape)
    return x.astype(np.float32)


def cmd_make(args):
    import onnx
    import onnxruntime as ort
    import torch
    from onnx import numpy_helper

    for case in ("mbv3_block", "neck"):
        model = randomize(build(case), seed=0 if case == "mbv3_block" else 1)
        x = torch.from_numpy(images(1, 3))
        f = io.BytesIO()
        torch.onnx.export(model, (x,), f, dynamo=False, opset_version=OPSET, training=torch.onnx.TrainingMode.EVAL,
                          input_names=["input"], output_names=["output"])
        m = onnx.load_from_string(f.getvalue())
        for n in m.graph.node:
            n.doc_string = ""
        onnx.checker.check_model(m)
        d = os.path.join(args.out, case)
        if os.path.isdir(d):
            shutil.rmtree(d)
        os.makedirs(os.path.join(d, "test_data_set_0"))
        onnx.save(m, os.path.join(d, "model.onnx"))
        calib, evals = images(16, 1), images(8, 2)
        np.save(os.path.join(d, "calib.npy"), calib)
        np.save(os.path.join(d, "eval.npy"), evals)
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
        ref = sess.run(None, {"input": evals[:1]})[0]
        with torch.no_grad():
            torch_out = model(torch.from_numpy(evals[:1])).numpy()
        with open(os.path.join(d, "test_data_set_0", "input_0.pb"), "wb") as fh:
            fh.write(numpy_helper.from_array(evals[:1], "input").SerializeToString())
        with open(os.path.join(d, "test_data_set_0", "output_0.pb"), "wb") as fh:
            fh.write(numpy_helper.from_array(ref, "output").SerializeToString())
        ops = {}
        for n in m.graph.node:
            ops[n.op_type] = ops.get(n.op_type, 0) + 1
        prov = dict(script=SCRIPT, case=case, architecture=ARCH[case], opset=OPSET, torch=torch.__version__,
                    onnx=onnx.__version__, onnxruntime=ort.__version__,
                    export="torch.onnx.export(model.eval(), (x,), f, dynamo=False, opset_version=14, "
                           "training=TrainingMode.EVAL, input_names=['input'], output_names=['output'])",
                    weights="PyTorch default init, torch.manual_seed; BatchNorm running stats, gamma, beta and "
                            "InstanceNorm affine parameters and PReLU slopes drawn uniformly (see randomize)",
                    data="calib.npy: 16 smooth random images (seed 1), eval.npy: 8 (seed 2), [N, 3, 32, 32]",
                    reference="test_data_set_0/output_0.pb: ONNX Runtime CPU, graph optimizations disabled, on "
                              "eval.npy[0]",
                    max_abs_torch_vs_ort=float(np.abs(torch_out - ref).max()), op_types=ops)
        with open(os.path.join(d, "provenance.json"), "w") as fh:
            json.dump(prov, fh, indent=2)
        print(f"{case}: {sum(ops.values())} nodes {ops}; torch vs ORT max abs {prov['max_abs_torch_vs_ort']:.2e}")


def cmd_ort(args):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL

    def run(path, x):
        s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        return np.concatenate([s.run(None, {"input": x[i:i + 1]})[0] for i in range(len(x))])

    def sqnr(r, q):
        noise = float(np.sum((r.astype(np.float64) - q) ** 2))
        return float("inf") if noise == 0 else 10 * np.log10(float(np.sum(r.astype(np.float64) ** 2)) / noise)

    rows = []
    for case in ("mbv3_block", "neck"):
        d = os.path.join(args.models, case)
        x = np.load(os.path.join(d, "eval.npy"))
        ref = run(os.path.join(d, "model.onnx"), x)
        with tempfile.TemporaryDirectory() as t:
            for label, extra in (("qdq", []), ("qoperator", ["--format", "qoperator"]), ("qdq --preset ort", ["--preset", "ort"])):
                out = os.path.join(t, "q.onnx")
                r = subprocess.run([args.bin, "quantize", os.path.join(d, "model.onnx"), "-o", out, "--calib",
                                    os.path.join(d, "calib.npy"), "--eval", os.path.join(d, "eval.npy"), "--json"] + extra,
                                   capture_output=True, text=True)
                if r.returncode:
                    rows.append((case, label, "qfold failed", r.stderr.strip().splitlines()[-1:]))
                    continue
                rep = json.loads(r.stdout)
                tract_db = min(o.get("sqnr_db") or float("inf") for o in rep["evaluation"]["comparison"]["outputs"])
                try:
                    q = run(out, x)
                    ort_db = sqnr(ref, q)
                except Exception as e:  # report, do not stop
                    rows.append((case, label, "ORT failed", str(e).splitlines()[0][:200]))
                    continue
                rows.append((case, label, f"tract {tract_db:.2f} dB", f"ONNX Runtime {ort_db:.2f} dB"))
    for r in rows:
        print(" | ".join(map(str, r)))
    if any("failed" in r[2] for r in rows):
        sys.exit(1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("--out", default="onnx_models/real_ops")
    o = sub.add_parser("ort")
    o.add_argument("--models", default="onnx_models/real_ops")
    o.add_argument("--bin", default="target/debug/qfold")
    a = ap.parse_args()
    {"make": cmd_make, "ort": cmd_ort}[a.cmd](a)


if __name__ == "__main__":
    main()
