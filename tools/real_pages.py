#!/usr/bin/env python3
"""Calibration and evaluation samples cut from real document scans that PyPI packages ship, for
text detectors (PP-OCR det: input ``x``, 1x3x640x640, ImageNet normalization).

    real_pages.py build --dest DIR

downloads (``pip download --no-deps``, outside the repository) the scikit-image 0.26.0 wheel
(``skimage/data`` images) and the ocrmypdf 17.13.0 sdist (``tests/resources`` scans, some pulled
out of its test PDFs), and writes ONNX test-data folders (``test_data_set_K/input_0.pb``):

* ``DIR/calib`` (8) and ``DIR/eval`` (16): split A;
* ``DIR/calibB`` (8) and ``DIR/evalB`` (16): split B, whose calibration images are A's evaluation
  scans and whose evaluation images are A's calibration scans plus the rest;

and ``DIR/samples.txt``, the source file, resize and crop of every sample. Use them as

    qfold quantize model.onnx -o q.onnx --calib DIR/calib --eval DIR/eval --input-shape x:1,3,640,640

The README's "On real pages" table was measured on these folders.
"""

import argparse
import glob
import io
import os
import re
import struct
import subprocess
import sys
import tarfile
import zipfile
import zlib

import numpy as np
import onnx
from onnx import numpy_helper
from PIL import Image

Image.MAX_IMAGE_PIXELS = 2 * 10**8

SKIMAGE = "scikit-image==0.26.0"
OCRMYPDF = "ocrmypdf==17.13.0"
RES = "ocrmypdf-17.13.0/tests/resources/"
SKD = "skimage/data/"
PDF = "pdfimg/"
SIZE = 640
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)

# (file, scale: a factor, or ("short", N): the short side becomes N; number of crops)
CALIB_A = [(RES + "linn.png", 0.5, 2), (PDF + "c03-29_0.jpg", 1.0, 2), (RES + "baiona.png", 1.0, 1),
           (PDF + "kcs_x1.png", ("short", SIZE), 1), (SKD + "page.png", ("short", SIZE), 1),
           (SKD + "astronaut.png", ("short", SIZE), 1)]
EVAL_A = [(RES + "typewriter.png", 0.4, 3), (PDF + "epson_x0.png", 0.5, 3), (PDF + "multipage_x5.png", 1.0, 2),
          (PDF + "multipage_x4.png", ("short", SIZE), 1), (PDF + "francais_0.jpg", 1.0, 2),
          (SKD + "text.png", ("short", SIZE), 2), (SKD + "camera.png", ("short", SIZE), 1),
          (SKD + "coffee.png", ("short", SIZE), 1), (PDF + "masks_x1.png", 0.5, 1)]
# split B, by index into A's samples (calibration 0-7, evaluation 8-23)
CALIB_B = [8, 9, 10, 11, 12, 13, 21, 23]
EVAL_B = [0, 1, 2, 3, 4, 5, 6, 7, 14, 15, 16, 17, 18, 19, 20, 22]


def download(dl):
    os.makedirs(dl, exist_ok=True)
    for spec, extra in ((SKIMAGE, ["--only-binary", ":all:"]), (OCRMYPDF, ["--no-binary", ":all:"])):
        name = spec.split("==")[0].replace("-", "_")
        if glob.glob(os.path.join(dl, name + "*")) or glob.glob(os.path.join(dl, spec.split("==")[0] + "*")):
            continue
        print(f"pip download --no-deps {spec}", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", spec, "-d", dl] + extra,
                       check=True)


def unpack(dl, src):
    os.makedirs(src, exist_ok=True)
    (wheel,) = glob.glob(os.path.join(dl, "scikit_image-0.26.0-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        for n in z.namelist():
            if n.startswith(SKD) and n.endswith((".png", ".jpg")):
                z.extract(n, src)
    (sdist,) = glob.glob(os.path.join(dl, "ocrmypdf-17.13.0.tar.gz"))
    with tarfile.open(sdist) as t:
        members = [m for m in t.getmembers() if m.name.startswith(RES) and m.isfile()]
        t.extractall(src, members=members, filter="data")


def pdf_image_objects(b):
    """The image XObjects of a PDF: (dictionary, stream data)."""
    for m in re.finditer(rb"(\d+)\s+\d+\s+obj(.*?)stream\r?\n", b, re.S):
        d = m.group(2)
        if b"/Image" not in d:
            continue
        start = m.end()
        length = re.search(rb"/Length\s+(\d+)(\s+\d+\s+R)?", d)
        if length and not length.group(2):
            data = b[start:start + int(length.group(1))]
        else:
            data = b[start:b.find(b"endstream", start)].rstrip(b"\r\n")
        yield d, data


def tiff_ccitt(data, w, h, k, black_is_1):
    """A one-strip TIFF around CCITT fax data, for Pillow to decode."""
    tags = [(256, 4, 1, w), (257, 4, 1, h), (258, 3, 1, 1), (259, 3, 1, 4 if k < 0 else 3),
            (262, 3, 1, 1 if black_is_1 else 0), (273, 4, 1, 0), (277, 3, 1, 1), (278, 4, 1, h),
            (279, 4, 1, len(data))]
    ifd = struct.pack("<H", len(tags))
    offset = 8 + 2 + 12 * len(tags) + 4
    for tag, ty, count, v in tags:
        if tag == 273:
            v = offset
        ifd += struct.pack("<HHI", tag, ty, count)
        ifd += struct.pack("<HH", v, 0) if ty == 3 else struct.pack("<I", v)
    return b"II*\x00" + struct.pack("<I", 8) + ifd + b"\x00\x00\x00\x00" + data


def extract_pdf_images(src):
    """JPEG streams as ``NAME_K.jpg``; CCITT and plain Flate images as ``NAME_xK.png``."""
    out = os.path.join(src, PDF)
    os.makedirs(out, exist_ok=True)
    for f in sorted(glob.glob(os.path.join(src, RES, "*.pdf"))):
        b = open(f, "rb").read()
        base = os.path.basename(f)[:-4]
        i = n = 0
        while (s := b.find(b"\xff\xd8\xff", i)) >= 0:
            data = b[s:b.find(b"endstream", s)].rstrip(b"\r\n")
            i = s + 3
            try:
                Image.open(io.BytesIO(data)).load()
            except Exception:
                continue
            open(os.path.join(out, f"{base}_{n}.jpg"), "wb").write(data)
            n += 1
        for k, (d, data) in enumerate(pdf_image_objects(b)):
            def num(key, default=b"0"):
                m = re.search(rb"/" + key + rb"\s+(-?\d+)", d)
                return int(m.group(1) if m else default)
            w, h, bpc = num(b"Width"), num(b"Height"), num(b"BitsPerComponent", b"1")
            if w * h < 200 * 200:
                continue
            try:
                if b"CCITTFaxDecode" in d:
                    im = Image.open(io.BytesIO(tiff_ccitt(data, w, h, num(b"K"), b"/BlackIs1 true" in d)))
                    im.load()
                elif re.search(rb"/Filter\s*/FlateDecode", d) and b"DecodeParms" not in d and bpc in (1, 8):
                    raw = zlib.decompress(data)
                    mode = "1" if bpc == 1 else ("RGB" if b"DeviceRGB" in d else "L")
                    im = Image.frombytes(mode, (w, h), raw)
                else:
                    continue
            except Exception as e:
                print(f"{f}: image {k} skipped ({e})")
                continue
            im.save(os.path.join(out, f"{base}_x{k}.png"))


def crops(src, spec):
    f, scale, n = spec
    im = Image.open(os.path.join(src, f))
    im = im.convert("L").convert("RGB") if im.mode == "1" else im.convert("RGB")
    w, h = im.size
    s = scale[1] / min(w, h) if isinstance(scale, tuple) else scale
    W, H = max(SIZE, round(w * s)), max(SIZE, round(h * s))
    im = im.resize((W, H), Image.LANCZOS)
    for i in range(n):
        # offsets along the diagonal, away from the margins
        t = 0.5 if n == 1 else 0.15 + 0.7 * i / (n - 1)
        x, y = round(t * (W - SIZE)), round(t * (H - SIZE))
        yield f"{f} resized to {W}x{H}, crop at ({x},{y})", im.crop((x, y, x + SIZE, y + SIZE))


def write(folder, samples):
    for k, (_, img) in enumerate(samples):
        a = (np.asarray(img, np.float32) / 255.0 - MEAN) / STD
        a = np.ascontiguousarray(a.transpose(2, 0, 1)[None])
        d = os.path.join(folder, f"test_data_set_{k}")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "input_0.pb"), "wb") as fh:
            fh.write(numpy_helper.from_array(a, name="x").SerializeToString())


def cmd_build(args):
    dest = os.path.abspath(args.dest)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if dest == root or dest.startswith(root + os.sep):
        sys.exit("error: --dest must be outside the repository")
    dl, src = os.path.join(dest, "_dl"), os.path.join(dest, "src")
    download(dl)
    unpack(dl, src)
    extract_pdf_images(src)
    a = [c for spec in CALIB_A + EVAL_A for c in crops(src, spec)]
    if len(a) != 24:
        sys.exit(f"error: {len(a)} samples, expected 24")
    sets = {"calib": a[:8], "eval": a[8:], "calibB": [a[k] for k in CALIB_B], "evalB": [a[k] for k in EVAL_B]}
    lines = []
    for name, samples in sets.items():
        write(os.path.join(dest, name), samples)
        lines += [f"{name}/test_data_set_{k}: {what}" for k, (what, _) in enumerate(samples)]
    with open(os.path.join(dest, "samples.txt"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="download the packages and write the sample folders")
    b.add_argument("--dest", required=True, help="a folder outside the repository")
    b.set_defaults(func=cmd_build)
    args = ap.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
