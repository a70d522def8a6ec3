#!/usr/bin/env python3
"""QDQ models made by ONNX Runtime's quantizer, committed so `qfold convert` is tested on a
quantizer other than qfold's own.

Quantizes onnx_models/digits_cnn/model.onnx with onnxruntime.quantization.quantize_static (QDQ,
QUInt8 activations, QInt8 per-channel weights, MinMax, calibration on calib/input.npy in batches
of 25), twice:
  * ort_qdq_digits_prep: after quant_pre_process (ORT's optimizer folds Conv+BatchNormalization);
  * ort_qdq_digits_raw: on the model as committed, BatchNormalization kept (ORT quantizes the BN
    scale as an int8 weight and the Conv output before it).
Each folder gets model.onnx, test_data_set_0 (the first eval batch of 64 and the QDQ model's
outputs in onnxruntime with graph optimizations disabled, i.e. the QDQ graph as written) and
provenance.json.

Usage: /work/venv/bin/python tools/make_ort_qdq.py
"""
import json
import os
import shutil
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = os.path.join(REPO, "onnx_models", "digits_cnn")


class Reader(CalibrationDataReader):
    def __init__(self, x, batch):
        self.batches = [x[i:i + batch] for i in range(0, len(x), batch)]

    def get_next(self):
        return {"input": self.batches.pop(0)} if self.batches else None


def main():
    calib = np.load(os.path.join(DIGITS, "calib", "input.npy"))
    x = numpy_helper.to_array(onnx.load_tensor(os.path.join(DIGITS, "eval", "test_data_set_0", "input_0.pb")))
    tmp = tempfile.mkdtemp()
    for prep in (True, False):
        src = os.path.join(DIGITS, "model.onnx")
        if prep:
            pre = os.path.join(tmp, "pre.onnx")
            quant_pre_process(src, pre)
            src = pre
        name = "ort_qdq_digits_prep" if prep else "ort_qdq_digits_raw"
        out_dir = os.path.join(REPO, "onnx_models", name)
        shutil.rmtree(out_dir, ignore_errors=True)
        os.makedirs(os.path.join(out_dir, "test_data_set_0"))
        path = os.path.join(out_dir, "model.onnx")
        quantize_static(src, path, Reader(calib, 25), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        per_channel=True, calibrate_method=CalibrationMethod.MinMax)
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        y = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
        onnx.save_tensor(numpy_helper.from_array(x, "input"), os.path.join(out_dir, "test_data_set_0", "input_0.pb"))
        onnx.save_tensor(numpy_helper.from_array(y, "logits"), os.path.join(out_dir, "test_data_set_0", "output_0.pb"))
        m = onnx.load(path)
        ops = {}
        for n in m.graph.node:
            ops[n.op_type] = ops.get(n.op_type, 0) + 1
        with open(os.path.join(out_dir, "provenance.json"), "w") as f:
            json.dump({
                "case": name,
                "script": "tools/make_ort_qdq.py",
                "onnxruntime_version": ort.__version__,
                "onnx_version": onnx.__version__,
                "source": "onnx_models/digits_cnn/model.onnx" + (" after quant_pre_process" if prep else " as committed (BN kept)"),
                "quantize_static": "QDQ, QUInt8 activations, QInt8 weights, per_channel=True, MinMax, calib/input.npy in batches of 25",
                "test_data_set_0": "eval/test_data_set_0 input (64 images); output = this QDQ model in onnxruntime, optimizations disabled",
                "op_types": ops,
            }, f, indent=2, sort_keys=True)
        print(name, ops)
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
