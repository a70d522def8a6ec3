#!/usr/bin/env python3
"""Export a small CNN trained with PyTorch eager-mode quantization-aware training (QAT) to ONNX,
as the QDQ graphs `qfold convert` must turn into QOperator form.

Model (eager mode, torch.ao.quantization):
    QuantStub -> conv1 (3->8, 3x3, pad 1) -> bn1 -> relu1 -> conv2 (8->8, 3x3) -> bn2 -> relu2
              -> AdaptiveAvgPool2d(1) -> Flatten -> fc (8->4) -> DeQuantStub
qconfig: torch.ao.quantization.get_default_qat_qconfig("x86", version=0): activations
FakeQuantize(MovingAverageMinMaxObserver, quint8, reduce_range -> [0, 127]), weights
default_per_channel_weight_fake_quant (qint8 [-128, 127], per_channel_symmetric, axis 0).
version=1 (the default) uses FusedMovingAvgObsFakeQuantize, whose op
aten::fused_moving_avg_obs_fake_quant has no ONNX symbolic (the exporter refuses it); version 0
computes the same fake quantization with the exportable FakeQuantize.

Two cases, each onnx_models/<case>/{model.onnx, test_data_set_0/{input_0,output_0}.pb,
provenance.json}:
  * qat_convbn_folded: the usual flow, fuse_modules_qat([[conv1, bn1, relu1], [conv2, bn2,
    relu2]]) then prepare_qat. The exporter writes the QAT ConvBnReLU2d forward as it is
    (torch.ao.nn.intrinsic.qat ConvBn _forward_approximate): Q/DQ of the BN-scaled weight
    (constant-folded to one float tensor), Conv with a zero bias, Div by the BN scale, Add of the
    conv bias, then BatchNormalization and Relu. BN is not folded into the weights: the exporter's
    Conv+BN fold needs BN right after a Conv with a parameter weight.
  * qat_bn_left_in: prepare_qat without the Conv+BN fusion, so the Conv carries per-channel weight
    fake-quant and BatchNormalization stays an op after it. Plain prepare_qat of the unfused model
    also fake-quantizes the Conv output and the BN output and leaves the ReLU float
    (Conv -> Q -> DQ -> BN -> Q -> DQ -> Relu -> next Conv, recorded in provenance as
    `plain_unfused_export`); to get the QAT pattern with BN between the Conv and its output
    fake-quant, the convs get QConfig(activation=nn.Identity, weight=<per-channel weight
    fake-quant>) (no fake-quant on the Conv output) and bn+relu are fused into BNReLU2d (its
    output fake-quant after the ReLU; PyTorch applies it twice, see the provenance). The export is
    DQ(x), DQ(int8 per-channel w, axis 0) -> Conv -> BatchNormalization -> Relu -> Q.
Before QAT the BN parameters get fixed-seed values with some negative weights (as
tools/export_seed_models.py does), so folding exercises negative BN scales; 30 SGD steps on
random data then move the weights, BN running statistics and fake-quant ranges. Observers are
then disabled, BN statistics frozen, and the model exported in eval mode:
    torch.onnx.export(model, (x,), f, dynamo=False, opset_version=13,
                      training=torch.onnx.TrainingMode.EVAL)  (do_constant_folding default True)
output_0.pb is the exported model's own output in onnxruntime with graph optimizations disabled,
i.e. the QDQ graph as written.

Usage: /work/venv/bin/python tools/export_qat_model.py [--out onnx_models] [--check-twice]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import shutil
import sys
import tempfile
import warnings

import numpy as np
import onnx
import torch
import torch.nn as nn
import torch.ao.quantization as tq
from onnx import numpy_helper

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fusion_common as fc  # noqa: E402

warnings.filterwarnings("ignore")
SCRIPT = "tools/export_qat_model.py"
SEED = 20240917
OPSET = 13
INPUT_SHAPE = [2, 3, 16, 16]
TRAIN_STEPS = 30
TRAIN_BATCH = 16
MAX_BYTES = 200 * 1024

EXPORTER = (
    "torch.onnx.export(model.eval(), (x,), f, dynamo=False, opset_version=13, "
    "training=torch.onnx.TrainingMode.EVAL, input_names=['input'], output_names=['output']) "
    "(do_constant_folding left at its default True); node doc_strings cleared"
)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.quant = tq.QuantStub()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3)
        self.bn2 = nn.BatchNorm2d(8)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(8, 4)
        self.dequant = tq.DeQuantStub()

    def forward(self, x):
        x = self.quant(x)
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.fc(self.flatten(self.pool(x)))
        return self.dequant(x)


def qat_qconfig():
    return tq.get_default_qat_qconfig("x86", version=0)


def randomize_bn(model: nn.Module, gen: torch.Generator) -> None:
    """BN weight U(0.5, 1.5) with sign -1 for channels 1 and 5 (fixed, so both BNs have negative
    scales whatever the draw), bias N(0, 0.3^2), running_var U(0.5, 2): a start away from the
    identity that QAT training then moves."""
    with torch.no_grad():
        for m in (model.bn1, model.bn2):
            c = m.num_features
            sign = torch.ones(c)
            sign[[1, 5]] = -1.0
            m.weight.copy_((0.5 + torch.rand(c, generator=gen)) * sign)
            m.bias.copy_(torch.randn(c, generator=gen) * 0.3)
            m.running_mean.copy_(torch.randn(c, generator=gen) * 0.1)
            m.running_var.copy_(0.5 + 1.5 * torch.rand(c, generator=gen))


def build(case: str) -> tuple[nn.Module, dict]:
    """The float model, made QAT-ready for `case`, and a description of what was done."""
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED + 1)
    model = Net()
    randomize_bn(model, gen)
    model.train()
    qc = qat_qconfig()
    model.qconfig = qc
    if case == "qat_convbn_folded":
        fuse = [["conv1", "bn1", "relu1"], ["conv2", "bn2", "relu2"]]
        model = tq.fuse_modules_qat(model, fuse)
        how = {
            "fuse_modules_qat": fuse,
            "prepare": "torch.ao.quantization.prepare_qat(model) with model.qconfig = "
            "get_default_qat_qconfig('x86', version=0)",
        }
    else:
        fuse = [["bn1", "relu1"], ["bn2", "relu2"]]
        model = tq.fuse_modules_qat(model, fuse)
        conv_qc = tq.QConfig(activation=nn.Identity, weight=qc.weight)
        model.conv1.qconfig = conv_qc
        model.conv2.qconfig = conv_qc
        how = {
            "fuse_modules_qat": fuse,
            "prepare": "model.qconfig = get_default_qat_qconfig('x86', version=0); conv1.qconfig = "
            "conv2.qconfig = QConfig(activation=nn.Identity, weight=<the same per-channel weight "
            "fake-quant>); torch.ao.quantization.prepare_qat(model). Conv and BN are not fused: "
            "BN stays a module (inside BNReLU2d with the ReLU) after the QAT Conv2d",
        }
    model = tq.prepare_qat(model)
    return model, how


def train(model: nn.Module) -> list[float]:
    gen = torch.Generator().manual_seed(SEED + 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    losses = []
    model.train()
    for _ in range(TRAIN_STEPS):
        x = torch.randn(TRAIN_BATCH, *INPUT_SHAPE[1:], generator=gen)
        y = torch.randint(0, 4, (TRAIN_BATCH,), generator=gen)
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.apply(tq.disable_observer)
    model.apply(torch.ao.nn.intrinsic.qat.freeze_bn_stats)
    model.eval()
    return losses


def export(model: nn.Module, x: torch.Tensor) -> onnx.ModelProto:
    f = io.BytesIO()
    torch.onnx.export(
        model,
        (x,),
        f,
        dynamo=False,
        opset_version=OPSET,
        training=torch.onnx.TrainingMode.EVAL,
        input_names=["input"],
        output_names=["output"],
    )
    m = onnx.load_from_string(f.getvalue())
    for n in m.graph.node:
        n.doc_string = ""
    return m


def plain_unfused_export() -> dict:
    """Op counts of the unfused model under plain prepare_qat (every module's output
    fake-quantized), to record why qat_bn_left_in turns the Conv output fake-quant off."""
    torch.manual_seed(SEED)
    model = Net()
    randomize_bn(model, torch.Generator().manual_seed(SEED + 1))
    model.train()
    model.qconfig = qat_qconfig()
    model = tq.prepare_qat(model)
    train(model)
    m = export(model, torch.zeros(INPUT_SHAPE))
    g = onnx_graph(m)
    conv = next(n for n in m.graph.node if n.op_type == "Conv")
    chain = []
    v = conv.output[0]
    for _ in range(8):
        readers = g["consumers"].get(v, [])
        if len(readers) != 1:
            break
        chain.append(readers[0].op_type)
        v = readers[0].output[0]
    return {
        "op_counts": fc.op_counts(m),
        "after_first_conv": " -> ".join(["Conv"] + chain),
    }


def onnx_graph(m: onnx.ModelProto) -> dict:
    producer = {o: n for n in m.graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in m.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    return {"producer": producer, "consumers": consumers}


def const_value(m: onnx.ModelProto, name: str):
    """An initializer's value, looking through the exporter's Identity (deduplicated
    initializers) and Constant nodes."""
    inits = {t.name: t for t in m.graph.initializer}
    producer = onnx_graph(m)["producer"]
    for _ in range(4):
        if name in inits:
            return numpy_helper.to_array(inits[name])
        n = producer.get(name)
        if n is None:
            return None
        if n.op_type == "Identity":
            name = n.input[0]
        elif n.op_type == "Constant":
            return numpy_helper.to_array(n.attribute[0].t)
        else:
            return None
    return None


def describe(m: onnx.ModelProto) -> dict:
    """Structure facts the Rust test relies on: every Conv's weight path, what reads each Conv
    output, and the output's quantization step (the last DequantizeLinear's scale)."""
    g = onnx_graph(m)
    convs = []
    for n in m.graph.node:
        if n.op_type != "Conv":
            continue
        dq = g["producer"].get(n.input[1])
        assert dq is not None and dq.op_type == "DequantizeLinear", f"{n.name}: weight not from DQ"
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        scale = const_value(m, dq.input[1])
        zp = const_value(m, dq.input[2])
        q = g["producer"].get(dq.input[0])
        w_float = const_value(m, q.input[0]) if q is not None and q.op_type == "QuantizeLinear" else None
        readers = [r.op_type for r in g["consumers"].get(n.output[0], [])]
        info = {
            "node": n.name,
            "weight_dq_axis": axis,
            "weight_scale_len": int(np.size(scale)),
            "weight_zero_point_dtype": str(zp.dtype),
            "weight_zero_points_all_zero": bool(np.all(zp == 0)),
            "weight_source": "QuantizeLinear of a float initializer" if w_float is not None else "other",
            "output_read_by": readers,
        }
        if w_float is not None:
            # the int8 values QuantizeLinear computes (onnxruntime: round half to even of x / scale)
            s = scale.reshape([-1] + [1] * (w_float.ndim - 1)).astype(np.float32)
            qv = np.clip(np.rint(w_float / s), -128, 127)
            info["weight_int8_min"] = int(qv.min())
            info["weight_int8_max"] = int(qv.max())
            info["weight_channels_with_minus_128"] = int(np.sum(np.any(qv.reshape(qv.shape[0], -1) == -128, axis=1)))
        convs.append(info)
    bns = []
    for n in fc.bn_nodes(m):
        w = const_value(m, n.input[1])
        var = const_value(m, n.input[4])
        eps = next((a.f for a in n.attribute if a.name == "epsilon"), 1e-5)
        s = w / np.sqrt(var + eps)
        bns.append({"node": n.name, "input_from": g["producer"][n.input[0]].op_type,
                    "negative_scale_channels": [int(i) for i in np.nonzero(s < 0)[0]]})
    last_dq = g["producer"][m.graph.output[0].name]
    assert last_dq.op_type == "DequantizeLinear"
    out_scale = const_value(m, last_dq.input[1])
    out_zp = const_value(m, last_dq.input[2])
    clips = [n for n in m.graph.node if n.op_type == "Clip"]
    return {
        "convs": convs,
        "batch_normalizations": bns,
        "output_dequantize_linear": last_dq.name,
        "output_scale": float(out_scale.reshape(-1)[0]),
        "output_zero_point": int(out_zp.reshape(-1)[0]),
        "reduce_range_clips": len(clips),
        "identity_nodes": sum(n.op_type == "Identity" for n in m.graph.node),
    }


def check(case: str, m: onnx.ModelProto, d: dict) -> None:
    ops = fc.op_counts(m)
    assert ops.get("BatchNormalization", 0) == 2, f"{case}: {ops}"
    assert ops.get("Conv", 0) == 2 and ops.get("Gemm", 0) == 1, f"{case}: {ops}"
    for c in d["convs"]:
        assert c["weight_dq_axis"] == 0 and c["weight_scale_len"] == 8, f"{case}: {c}"
        assert c["weight_zero_point_dtype"] == "int8" and c["weight_zero_points_all_zero"], f"{case}: {c}"
    if case == "qat_bn_left_in":
        for c in d["convs"]:
            assert c["output_read_by"] == ["BatchNormalization"], f"{case}: {c}"
    else:
        for c in d["convs"]:
            assert c["output_read_by"] == ["Div"], f"{case}: {c}"
    for b in d["batch_normalizations"]:
        assert b["negative_scale_channels"], f"{case}: {b} has no negative scale"


def make_case(case: str, out_root: str) -> str:
    model, how = build(case)
    losses = train(model)
    x = torch.randn(INPUT_SHAPE, generator=torch.Generator().manual_seed(SEED + 3))
    with torch.no_grad():
        y_torch = model(x).numpy()
    m = export(model, x)
    d = describe(m)
    check(case, m, d)
    xin = x.numpy().astype(np.float32)
    (y,) = fc.run_ort(m, [xin])
    step = d["output_scale"]
    prov = {
        "case": case,
        "script": SCRIPT,
        "seed": SEED,
        "versions": fc.versions(),
        "model": "QuantStub -> conv1 Conv2d(3,8,3,padding=1) -> bn1 -> relu1 -> conv2 Conv2d(8,8,3) -> bn2 -> "
        "relu2 -> AdaptiveAvgPool2d(1) -> Flatten -> fc Linear(8,4) -> DeQuantStub",
        "qconfig": "get_default_qat_qconfig('x86', version=0): activation FakeQuantize(MovingAverageMinMaxObserver, "
        "quint8, quant_min=0, quant_max=255, reduce_range=True -> [0, 127]); weight "
        "default_per_channel_weight_fake_quant (MovingAveragePerChannelMinMaxObserver, qint8 [-128, 127], "
        "per_channel_symmetric, ch_axis=0). version=1 (default) uses FusedMovingAvgObsFakeQuantize: "
        "the exporter refuses aten::fused_moving_avg_obs_fake_quant",
        "qat": how,
        "bn_init": "before QAT: BN weight U(0.5,1.5) with channels 1 and 5 negated, bias N(0,0.3^2), "
        "running_mean N(0,0.1^2), running_var U(0.5,2)",
        "training": f"{TRAIN_STEPS} SGD steps (lr 0.05, momentum 0.9), batches of {TRAIN_BATCH} randn inputs with "
        "random labels of 4 classes, cross-entropy; then disable_observer, freeze_bn_stats, eval()",
        "train_loss_first_last": [fc.rounded(losses[0]), fc.rounded(losses[-1])],
        "exporter": EXPORTER,
        "structure": d,
        "test_data_set_0": f"input: torch.randn{tuple(INPUT_SHAPE)} (generator seed {SEED + 3}); output: this "
        "model.onnx in onnxruntime with graph optimizations disabled (the QDQ graph as written)",
        "torch_eager_vs_ort_max_abs_diff": fc.rounded(fc.max_abs(y_torch, y)),
        "torch_eager_vs_ort_max_steps": fc.rounded(fc.max_abs(y_torch, y) / step),
    }
    if case == "qat_convbn_folded":
        prov["exporter_notes"] = (
            "BN is NOT folded into the weights. The QAT ConvBnReLU2d forward is exported as written: "
            "weight * (bn.weight / sqrt(running_var + eps)) is constant-folded into one float initializer -> "
            "QuantizeLinear(axis 0) -> DequantizeLinear(axis 0) -> Conv (zero bias, a Constant) -> Div by the same "
            "per-channel scale ([1,C,1,1]) -> Add of the conv bias ([1,C,1,1]) -> BatchNormalization (running "
            "statistics) -> Relu -> QuantizeLinear -> Clip(max 127, reduce_range) -> DequantizeLinear. The "
            "exporter's eval-mode Conv+BN fold does not apply (Div/Add sit between them and the weight is not a "
            "parameter). Identity nodes carry initializers the exporter deduplicated (zero points)."
        )
    else:
        prov["exporter_notes"] = (
            "BN stays an op after the Conv: float weight initializer -> QuantizeLinear(axis 0) -> "
            "DequantizeLinear(axis 0, int8 zero points) -> Conv (float bias) -> BatchNormalization -> Relu -> "
            "QuantizeLinear -> Clip(max 127, reduce_range) -> DequantizeLinear. The exporter's eval-mode Conv+BN fold "
            "does not fire because the Conv weight comes from DequantizeLinear, not a parameter, so "
            "TrainingMode.EVAL with constant folding keeps both BatchNormalization nodes. "
            "Identity nodes carry initializers the exporter deduplicated (zero points). Each BNReLU2d output is "
            "fake-quantized twice with the same parameters (Q -> Clip -> DQ -> Q -> Clip -> DQ): prepare_qat adds "
            "activation_post_process as a child of the BNReLU2d nn.Sequential, so the Sequential's forward runs it "
            "as its last element and the observer hook runs it again; requantizing a dequantized value with the "
            "same scale and zero point gives it back, so the pair is exact."
        )
        prov["plain_unfused_export"] = plain_unfused_export()
    folder = fc.write_case(case, m, [xin], [y], prov, root=out_root)
    size = fc.folder_size(folder)
    assert size < MAX_BYTES, f"{case}: {size} bytes"
    print(f"{case}: {fc.op_counts(m)}; output step {step:.4g}; torch vs ORT "
          f"{prov['torch_eager_vs_ort_max_steps']} steps; {size} bytes")
    return folder


def tree_digest(path: str) -> str:
    h = hashlib.sha256()
    for dirpath, dirs, files in sorted(os.walk(path)):
        dirs.sort()
        for fn in sorted(files):
            p = os.path.join(dirpath, fn)
            h.update(os.path.relpath(p, path).encode())
            with open(p, "rb") as f:
                h.update(f.read())
    return h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=fc.MODELS_DIR)
    ap.add_argument("--check-twice", action="store_true",
                    help="also export into a temporary folder and require byte-identical files")
    a = ap.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    for case in ("qat_convbn_folded", "qat_bn_left_in"):
        folder = make_case(case, a.out)
        if a.check_twice:
            tmp = tempfile.mkdtemp()
            try:
                again = make_case(case, tmp)
                assert tree_digest(folder) == tree_digest(again), f"{case}: second export differs"
                print(f"{case}: second export byte-identical")
            finally:
                shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
