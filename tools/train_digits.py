#!/usr/bin/env python3
"""Train a small Conv-BN-ReLU CNN on scikit-learn's bundled digits data set and export it, with its
BatchNormalization nodes kept, to onnx_models/digits_cnn/ (a real trained model for qfold's
fusion + quantization checks, with calibration and evaluation data).

Data: sklearn.datasets.load_digits() (1797 8x8 grayscale images, bundled with scikit-learn, no
download), pixel values 0..16 divided by 16 -> [0, 1], shape [N, 1, 8, 8] float32.
  * one stratified train_test_split(random_state=SPLIT_SEED): EVAL_SIZE images held out for
    evaluation, the rest for training;
  * calibration: a stratified CALIB_SIZE subset of the training split (these images are also
    trained on; they never overlap the evaluation images).

Model (module paths = ONNX node scopes): conv1(1->16,3x3,p1)+bn1+relu1, conv2(16->32)+bn2+relu2,
pool(maxpool 2x2), conv3(32->32)+bn3+relu3, gap(AdaptiveAvgPool2d(1)), flatten, fc1(32->64)+relu4,
fc2(64->10) -> logits.

Files written (the folder is replaced): see FILES below, README.md and provenance.json.

Deterministic: fixed seeds, torch.use_deterministic_algorithms(True), one thread, node doc_strings
cleared, np.save / TensorProto / sorted JSON; running it twice gives byte-identical files.

Usage: /work/venv/bin/python tools/train_digits.py [--out onnx_models]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import sys
import time
import warnings

import numpy as np
import onnx
import sklearn
import torch
import torch.nn as nn
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fusion_common as fc  # noqa: E402
from export_seed_models import module_nodes  # noqa: E402

warnings.filterwarnings("ignore")
SCRIPT = "tools/train_digits.py"
CASE = "digits_cnn"
SEED = 20240601  # torch + numpy + python random
SPLIT_SEED = 0  # train_test_split random_state (eval split)
CALIB_SEED = 1  # train_test_split random_state (calibration subset of the training split)
EVAL_SIZE = 512  # 8 batches of 64: every eval batch has the same shape, one tract plan serves all
EVAL_BATCH = 64
CALIB_SIZE = 100
CALIB_BATCH = 25
TEST_BATCH = 8
EPOCHS = 10
BATCH_SIZE = 32
LR = 3e-3
MIN_ACCURACY = 0.97
OPSET = 13
MAX_FOLDER_BYTES = 1_500_000

EXPORT_OPTIONS_TEXT = (
    "torch.onnx.export(model.eval(), x, path, dynamo=False, training=torch.onnx.TrainingMode.PRESERVE, "
    "do_constant_folding=False, opset_version=13, input_names=['input'], output_names=['logits'], "
    "dynamic_axes={'input': {0: 'N'}, 'logits': {0: 'N'}})"
)

ARCHITECTURE = [
    "conv1: Conv2d(1, 16, 3, padding=1)",
    "bn1: BatchNorm2d(16)",
    "relu1: ReLU",
    "conv2: Conv2d(16, 32, 3, padding=1)",
    "bn2: BatchNorm2d(32)",
    "relu2: ReLU",
    "pool: MaxPool2d(2)  (8x8 -> 4x4)",
    "conv3: Conv2d(32, 32, 3, padding=1)",
    "bn3: BatchNorm2d(32)",
    "relu3: ReLU",
    "gap: AdaptiveAvgPool2d(1)",
    "flatten: Flatten",
    "fc1: Linear(32, 64)",
    "relu4: ReLU",
    "fc2: Linear(64, 10) -> logits",
]

FILES = {
    "model.onnx": "the trained model, BatchNormalization kept (3 BN nodes), opset 13, dynamic batch "
    "dimension N on 'input' [N,1,8,8] and 'logits' [N,10]",
    "test_data_set_0/input_0.pb": "TensorProto 'input' [8,1,8,8] float32: the first 8 evaluation images",
    "test_data_set_0/output_0.pb": "TensorProto 'logits' [8,10] float32: PyTorch eval-mode logits for them",
    "calib/input.npy": f"the calibration set, [{CALIB_SIZE},1,8,8] float32 (np.save)",
    "calib/labels.npy": f"its labels, [{CALIB_SIZE}] int64",
    "calib/indices.npy": f"row indices of the calibration images in load_digits(), [{CALIB_SIZE}] int64",
    "calib/test_data_set_K/input_0.pb": f"K = 0..{CALIB_SIZE // CALIB_BATCH - 1}: the calibration set in "
    f"batches of {CALIB_BATCH} (TensorProto 'input' [{CALIB_BATCH},1,8,8]), same order as calib/input.npy",
    "eval/input.npy": f"the evaluation set (the whole held-out split), [{EVAL_SIZE},1,8,8] float32",
    "eval/labels.npy": f"its labels, [{EVAL_SIZE}] int64",
    "eval/indices.npy": f"row indices of the evaluation images in load_digits(), [{EVAL_SIZE}] int64",
    "eval/test_data_set_K/input_0.pb": f"K = 0..{EVAL_SIZE // EVAL_BATCH - 1}: the evaluation set in "
    f"batches of {EVAL_BATCH} (TensorProto 'input' [{EVAL_BATCH},1,8,8]), same order as eval/input.npy",
    "eval/test_data_set_K/output_0.pb": f"PyTorch float logits for that batch (TensorProto 'logits' "
    f"[{EVAL_BATCH},10])",
    "eval/test_data_set_K/labels.npy": f"the labels of that batch, [{EVAL_BATCH}] int64",
    "provenance.json": "this provenance record",
    "README.md": "description of the files",
}


class DigitsCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.relu2 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(32, 32, 3, padding=1)
        self.bn3 = nn.BatchNorm2d(32)
        self.relu3 = nn.ReLU()
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(32, 64)
        self.relu4 = nn.ReLU()
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.pool(x)
        x = self.relu3(self.bn3(self.conv3(x)))
        x = self.flatten(self.gap(x))
        return self.fc2(self.relu4(self.fc1(x)))


def seed_everything() -> None:
    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set (the runtime was started before main)
        pass


def load_data():
    d = load_digits()
    x = (d.images.astype(np.float32) / np.float32(16.0)).reshape(-1, 1, 8, 8)
    y = d.target.astype(np.int64)
    idx = np.arange(len(y), dtype=np.int64)
    train_idx, eval_idx = train_test_split(idx, test_size=EVAL_SIZE, stratify=y, random_state=SPLIT_SEED)
    _, calib_idx = train_test_split(
        train_idx, test_size=CALIB_SIZE, stratify=y[train_idx], random_state=CALIB_SEED
    )
    return x, y, train_idx.astype(np.int64), eval_idx.astype(np.int64), calib_idx.astype(np.int64)


def predict(model: nn.Module, x: np.ndarray) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, log) -> list[dict]:
    gen = torch.Generator().manual_seed(SEED + 1)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=EPOCHS)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    loss_fn = nn.CrossEntropyLoss()
    history = []
    for epoch in range(EPOCHS):
        model.train()
        perm = torch.randperm(len(yt), generator=gen)
        total, n = 0.0, 0
        for s in range(0, len(perm), BATCH_SIZE):
            b = perm[s : s + BATCH_SIZE]
            if len(b) < 2:  # BatchNorm needs more than one value per channel in train mode
                continue
            opt.zero_grad()
            loss = loss_fn(model(xt[b]), yt[b])
            loss.backward()
            opt.step()
            total += float(loss) * len(b)
            n += len(b)
        sched.step()
        train_acc = float((predict(model, x).argmax(1) == y).mean())
        history.append({"epoch": epoch + 1, "loss": round(total / n, 4), "train_accuracy": round(train_acc, 4)})
        log(f"epoch {epoch + 1:2d} loss {total / n:.4f} train acc {train_acc:.4f}")
    model.eval()
    return history


def export(model: nn.Module, x: np.ndarray) -> onnx.ModelProto:
    f = io.BytesIO()
    torch.onnx.export(
        model.eval(),
        torch.from_numpy(x),
        f,
        dynamo=False,
        training=torch.onnx.TrainingMode.PRESERVE,
        do_constant_folding=False,
        opset_version=OPSET,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
    )
    m = onnx.load_from_string(f.getvalue())
    for n in m.graph.node:  # determinism: no stack traces / source paths in doc strings
        n.doc_string = ""
    m.doc_string = ""
    return m


def ort_logits(model: onnx.ModelProto, x: np.ndarray, batch: int) -> np.ndarray:
    return np.concatenate([fc.run_ort(model, [x[s : s + batch]])[0] for s in range(0, len(x), batch)])


def write_readme(folder: str, prov: dict) -> None:
    acc = prov["accuracy"]
    lines = [
        "# digits_cnn: a trained Conv-BN-ReLU CNN on scikit-learn's digits",
        "",
        "A small CNN trained on `sklearn.datasets.load_digits()` (1797 8x8 grayscale images of the",
        "digits 0-9, bundled with scikit-learn) and exported with its three BatchNormalization nodes",
        "kept, plus calibration and evaluation data. It is the real-model case for qfold's",
        "fuse + quantize + check pipeline: unlike the random-weight fusion cases, accuracy means",
        "something here.",
        "",
        "Regenerate (deterministic, byte-identical, a few seconds on 2 CPU cores):",
        "",
        "```",
        "/work/venv/bin/python tools/train_digits.py",
        "```",
        "",
        "## Data",
        "",
        "Pixels 0..16 divided by 16 -> [0, 1], float32, shape [N, 1, 8, 8]. One stratified",
        f"`train_test_split(test_size={EVAL_SIZE}, random_state={SPLIT_SEED})` holds out the evaluation set;",
        f"the other {prov['split']['train']} images are the training set. The calibration set is a stratified",
        f"subset of {CALIB_SIZE} training images (`random_state={CALIB_SEED}`): it was trained on, and never",
        "overlaps the evaluation set. `indices.npy` gives the rows of `load_digits()` used, in file order.",
        "",
        "## Model",
        "",
        "```",
        *ARCHITECTURE,
        "```",
        "",
        "ONNX node names follow the PyTorch module paths (`/conv1/Conv`, `/bn1/BatchNormalization`,",
        "`/fc1/Gemm`, ...). Input `input` [N,1,8,8], output `logits` [N,10], N dynamic.",
        "",
        f"Float accuracy on the {EVAL_SIZE} evaluation images: PyTorch {acc['eval_pytorch']:.4f},",
        f"ONNX Runtime {acc['eval_onnxruntime']:.4f} (same predictions). Training accuracy {acc['train_pytorch']:.4f}.",
        "",
        "## Files",
        "",
        "| file | contents |",
        "| --- | --- |",
        *[f"| `{k}` | {v} |" for k, v in FILES.items()],
        "",
        "`calib/` and `eval/` hold the same data twice: as one stacked `input.npy`, and as",
        "`test_data_set_K/input_0.pb` batches (the ONNX backend-test layout), so both data layouts",
        "qfold reads are exercised. Every batch in a folder has the same shape.",
        "",
        "`tools/ort_quantize_digits.py` quantizes this model with ONNX Runtime's `quantize_static`",
        "(MinMax / Percentile / Entropy) as a reference to compare qfold against.",
        "",
    ]
    with open(os.path.join(folder, "README.md"), "w") as f:
        f.write("\n".join(lines))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=fc.MODELS_DIR)
    args = ap.parse_args()
    t0 = time.time()
    seed_everything()

    x, y, train_idx, eval_idx, calib_idx = load_data()
    assert not set(calib_idx) & set(eval_idx) and set(calib_idx) <= set(train_idx)
    x_train, y_train = x[train_idx], y[train_idx]
    x_eval, y_eval = x[eval_idx], y[eval_idx]
    x_calib, y_calib = x[calib_idx], y[calib_idx]

    model = DigitsCNN()
    history = train(model, x_train, y_train, print)

    logits_eval = predict(model, x_eval)
    acc_torch = float((logits_eval.argmax(1) == y_eval).mean())
    acc_train = float((predict(model, x_train).argmax(1) == y_train).mean())
    print(f"eval accuracy (PyTorch) {acc_torch:.4f} on {len(y_eval)} images")
    assert acc_torch >= MIN_ACCURACY, f"eval accuracy {acc_torch} < {MIN_ACCURACY}"

    x_test = x_eval[:TEST_BATCH]
    out_test = logits_eval[:TEST_BATCH]
    onnx_model = export(model, x_test)
    bns = fc.bn_nodes(onnx_model)
    assert len(bns) == 3, [n.name for n in bns]
    for n in bns:
        assert len(n.output) == 1, (n.name, "training-mode BN")
    ops = fc.op_counts(onnx_model)
    for bad in ("Dropout", "Identity"):
        assert bad not in ops, (bad, ops)

    logits_ort = ort_logits(onnx_model, x_eval, EVAL_BATCH)
    acc_ort = float((logits_ort.argmax(1) == y_eval).mean())
    same_pred = bool((logits_ort.argmax(1) == logits_eval.argmax(1)).all())
    ort_diff = fc.max_abs(logits_ort, logits_eval)
    print(f"eval accuracy (ORT)     {acc_ort:.4f}, same predictions: {same_pred}, max |ort - torch| {ort_diff:.2e}")
    assert acc_ort == acc_torch and same_pred, (acc_ort, acc_torch)
    assert ort_diff < 1e-4, ort_diff

    relu_frac = fc.relu_positive_fractions(onnx_model, [x_eval])
    fc.assert_relus_alive(CASE, relu_frac)
    paths = [name for name, m in model.named_modules() if name and not isinstance(m, nn.Flatten)]
    mod_nodes = module_nodes(onnx_model, paths)

    n_params = sum(p.numel() for p in model.parameters())
    prov = {
        "script": SCRIPT,
        "regenerate": "/work/venv/bin/python tools/train_digits.py",
        "versions": {**fc.versions(), "scikit-learn": sklearn.__version__},
        "seeds": {
            "torch_numpy_random": SEED,
            "shuffle_generator": SEED + 1,
            "eval_split_random_state": SPLIT_SEED,
            "calib_split_random_state": CALIB_SEED,
        },
        "determinism": "torch.use_deterministic_algorithms(True), torch.set_num_threads(1), node doc_strings "
        "cleared; byte-identical across runs",
        "data": "sklearn.datasets.load_digits(): 1797 8x8 images, pixels /16 -> [0,1] float32, [N,1,8,8]",
        "split": {
            "total": int(len(y)),
            "train": int(len(train_idx)),
            "eval": int(len(eval_idx)),
            "calib": int(len(calib_idx)),
            "rule": f"train_test_split(arange(1797), test_size={EVAL_SIZE}, stratify=y, random_state={SPLIT_SEED}) "
            f"-> train, eval; train_test_split(train, test_size={CALIB_SIZE}, stratify=y[train], "
            f"random_state={CALIB_SEED}) -> calib (a subset of train, trained on)",
            "eval_class_counts": np.bincount(y_eval, minlength=10).tolist(),
            "calib_class_counts": np.bincount(y_calib, minlength=10).tolist(),
        },
        "architecture": ARCHITECTURE,
        "parameters": int(n_params),
        "training": {
            "optimizer": f"Adam(lr={LR}), CosineAnnealingLR(T_max={EPOCHS})",
            "loss": "CrossEntropyLoss",
            "epochs": EPOCHS,
            "batch_size": BATCH_SIZE,
            "history": history,
        },
        "accuracy": {
            "eval_pytorch": round(acc_torch, 6),
            "eval_onnxruntime": round(acc_ort, 6),
            "eval_correct": int((logits_eval.argmax(1) == y_eval).sum()),
            "eval_images": int(len(y_eval)),
            "train_pytorch": round(acc_train, 6),
            "onnxruntime_same_predictions": same_pred,
        },
        "onnxruntime_vs_torch_eval_logits_max_abs_diff": fc.rounded(ort_diff),
        "onnxruntime_options": "CPUExecutionProvider, ORT_DISABLE_ALL graph optimizations, 1 thread",
        "eval_logits_abs_max": fc.rounded(float(np.max(np.abs(logits_eval)))),
        "relu_positive_fraction_eval": relu_frac,
        "exporter": EXPORT_OPTIONS_TEXT,
        "exporter_notes": "PRESERVE with model.eval() keeps BatchNormalization in inference form (one "
        "output, no training_mode in opset 13). Node doc_strings cleared.",
        "bn_nodes": [n.name for n in bns],
        "module_nodes": mod_nodes,
        "files": FILES,
    }

    folder = fc.write_case(CASE, onnx_model, [x_test], [out_test], prov, root=args.out)

    calib_dir = os.path.join(folder, "calib")
    os.makedirs(calib_dir)
    np.save(os.path.join(calib_dir, "input.npy"), np.ascontiguousarray(x_calib))
    np.save(os.path.join(calib_dir, "labels.npy"), y_calib)
    np.save(os.path.join(calib_dir, "indices.npy"), calib_idx)
    for k in range(CALIB_SIZE // CALIB_BATCH):
        d = os.path.join(calib_dir, f"test_data_set_{k}")
        os.makedirs(d)
        fc.write_pb(os.path.join(d, "input_0.pb"), x_calib[k * CALIB_BATCH : (k + 1) * CALIB_BATCH], "input")

    eval_dir = os.path.join(folder, "eval")
    os.makedirs(eval_dir)
    np.save(os.path.join(eval_dir, "input.npy"), np.ascontiguousarray(x_eval))
    np.save(os.path.join(eval_dir, "labels.npy"), y_eval)
    np.save(os.path.join(eval_dir, "indices.npy"), eval_idx)
    assert EVAL_SIZE % EVAL_BATCH == 0
    for k in range(EVAL_SIZE // EVAL_BATCH):
        d = os.path.join(eval_dir, f"test_data_set_{k}")
        os.makedirs(d)
        sl = slice(k * EVAL_BATCH, (k + 1) * EVAL_BATCH)
        fc.write_pb(os.path.join(d, "input_0.pb"), x_eval[sl], "input")
        fc.write_pb(os.path.join(d, "output_0.pb"), logits_eval[sl], "logits")
        np.save(os.path.join(d, "labels.npy"), y_eval[sl])

    write_readme(folder, prov)
    size = fc.folder_size(folder)
    assert size < MAX_FOLDER_BYTES, size
    print(f"{CASE}: bn={prov['bn_count']} params={n_params} size={size}B time={time.time() - t0:.1f}s -> {folder}")


if __name__ == "__main__":
    main()
