"""The Python package on the committed digits CNN (onnx_models/digits_cnn): every function,
both calibration forms, and errors. SQNR figures measured when these tests were written:
39.42 dB on the 512 evaluation images for the default settings (README, "Measured"), 40.64 dB
on the calibration set itself; the assertions leave a few dB of room."""

from pathlib import Path

import numpy as np
import pytest

import qfold

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "onnx_models" / "digits_cnn"
MODEL = DIGITS / "model.onnx"


@pytest.fixture(scope="module")
def calib():
    return np.load(DIGITS / "calib" / "input.npy")  # [100, 1, 8, 8] float32


@pytest.fixture(scope="module")
def evalset():
    return np.load(DIGITS / "eval" / "input.npy"), np.load(DIGITS / "eval" / "labels.npy")


def sqnr(report):
    return report["evaluation"]["comparison"]["outputs"][0]["sqnr_db"]


def test_inspect():
    r = qfold.inspect(MODEL)
    assert r["inputs"] == [{"name": "input", "elem_type": "float", "shape": ["N", "1", "8", "8"]}]
    assert r["outputs"][0]["name"] == "logits"
    assert r["op_types"]["BatchNormalization"] == 3
    assert len(r["fusion"]["groups"]) == 4


def test_fuse_matches_original(tmp_path, evalset):
    out = tmp_path / "fused.onnx"
    r = qfold.fuse(MODEL, out, check=True)
    assert r["written"] == str(out) and out.exists()
    assert r["check"]["passed"]
    assert r["fusion"]["bn_before"] == 3 and r["fusion"]["bn_after"] == 0
    # the fused model against the original on the 512 evaluation images
    x, _ = evalset
    c = qfold.check(MODEL, out, inputs={"input": x})
    assert c["passed"] and c["samples"] == 512
    assert c["outputs"][0]["max_abs"] < 1e-4


def test_fuse_in_onnxruntime(tmp_path, evalset):
    ort = pytest.importorskip("onnxruntime")
    out = tmp_path / "fused.onnx"
    qfold.fuse(MODEL, out)
    x, _ = evalset
    a = ort.InferenceSession(str(MODEL)).run(None, {"input": x})[0]
    b = ort.InferenceSession(str(out)).run(None, {"input": x})[0]
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)


def test_fuse_only_and_qat(tmp_path):
    out = tmp_path / "one.onnx"
    r = qfold.fuse(MODEL, out, only=[["/conv1/Conv", "/bn1/BatchNormalization"]])
    assert [g["nodes"] for g in r["fusion"]["groups"]] == [
        ["/conv1/Conv", "/bn1/BatchNormalization"]
    ]
    assert r["fusion"]["bn_after"] == 2
    r = qfold.fuse(MODEL, tmp_path / "qat.onnx", qat=True, check=True)
    assert r["fusion"]["bn_after"] == 3 and r["check"]["passed"]


def test_quantize_stacked_arrays(tmp_path, calib, evalset):
    out = tmp_path / "q.onnx"
    r = qfold.quantize(MODEL, out, {"input": calib})
    assert r["written"] == str(out) and out.exists()
    # 100 samples of one image each: all calibrate, and the evaluation runs on them
    assert r["quantization"]["calibration_samples"] == 100
    assert r["evaluation"]["source"] == "the calibration data (no --eval given)"
    assert sqnr(r) > 37.0  # measured 40.64 (qfold quantize --calib calib/input.npy)

    x, labels = evalset
    r = qfold.quantize(
        MODEL, out, {"input": calib}, eval={"input": x}, eval_labels=labels, check=True
    )
    assert r["evaluation"]["comparison"]["samples"] == 512
    assert sqnr(r) > 36.0  # measured 39.42
    assert r["evaluation"]["quantized_accuracy"] >= 0.98  # measured 0.9941


def test_quantize_iterator_of_dicts(tmp_path, calib, evalset):
    x, labels = evalset
    batches = ({"input": calib[k : k + 25]} for k in range(0, 100, 25))
    r = qfold.quantize(
        MODEL,
        tmp_path / "q.onnx",
        batches,
        eval={"input": x},
        eval_labels=labels,
        preset="ort",
        method="minmax",
    )
    assert r["quantization"]["calibration_samples"] == 4  # four runs of 25 images
    assert r["quantization"]["options"]["per_channel"] is False
    assert sqnr(r) > 35.0  # measured 38.20 (README: ORT 38.20)

    class Reader:  # ONNX Runtime's CalibrationDataReader protocol
        def __init__(self):
            self.it = iter([{"input": calib[k : k + 10]} for k in range(0, 100, 10)])

        def get_next(self):
            return next(self.it, None)

    r = qfold.quantize(MODEL, tmp_path / "q2.onnx", Reader(), eval={"input": x})
    assert r["quantization"]["calibration_samples"] == 10
    assert sqnr(r) > 36.0  # measured 39.42


def test_quantize_qoperator_then_convert_and_check(tmp_path, calib, evalset):
    x, _ = evalset
    qdq = tmp_path / "qdq.onnx"
    r = qfold.quantize(MODEL, qdq, {"input": calib}, format="qdq", exclude=["/fc2/Gemm"])
    assert r["schema"] == "qfold.quantize/1"
    assert any(f["node"] == "/fc2/Gemm" for f in r["quantization"]["plan"]["float"])
    assert r["conversion"] is None

    qop = tmp_path / "qop.onnx"
    r = qfold.convert(qdq, qop, check=True, inputs={"input": x[:64]})
    assert r["written"] == str(qop)
    assert r["schema"] == "qfold.convert/1"
    assert r["convert"]["converted"][0]["rule"]
    assert r["check"]["passed"]

    c = qfold.check(MODEL, qop, inputs={"input": x}, min_sqnr=30)
    assert c["passed"] and c["outputs"][0]["sqnr_db"] > 36.0

    r = qfold.quantize(MODEL, tmp_path / "tract.onnx", {"input": calib}, preset="tract")
    assert r["conversion"]["converted"]
    assert sqnr(r) > 30.0


def test_check_against_stored_outputs():
    c = qfold.check(MODEL, inputs=DIGITS / "test_data_set_0")
    assert c["passed"] and c["samples"] == 1


def test_check_random_samples(tmp_path):
    out = tmp_path / "fused.onnx"
    qfold.fuse(MODEL, out)
    c = qfold.check(MODEL, out, random=3, input_shapes={"input": (2, 1, 8, 8)})
    assert c["passed"] and c["samples"] == 3


def test_missing_file_raises():
    missing = DIGITS / "no_such_model.onnx"
    with pytest.raises(qfold.QfoldError, match="no_such_model.onnx") as e:
        qfold.inspect(missing)
    assert isinstance(e.value, RuntimeError) and isinstance(e.value, ValueError)
    with pytest.raises(qfold.QfoldError, match="no_such_model.onnx"):
        qfold.fuse(missing, "/tmp/never_written.onnx")


def test_failed_check_writes_nothing(tmp_path, calib):
    out = tmp_path / "q.onnx"
    with pytest.raises(qfold.QfoldError, match="SQNR below 80 dB") as e:
        qfold.quantize(MODEL, out, {"input": calib}, check=True, min_sqnr=80)
    assert e.value.report["written"] is None
    assert sqnr(e.value.report) < 80
    assert not out.exists()


def test_bad_arguments(tmp_path, calib):
    with pytest.raises(qfold.QfoldError, match="--preset nope"):
        qfold.quantize(MODEL, tmp_path / "q.onnx", {"input": calib}, preset="nope")
    with pytest.raises(qfold.QfoldError, match="'wrong'"):
        qfold.quantize(MODEL, tmp_path / "q.onnx", {"wrong": calib})
    with pytest.raises(qfold.QfoldError, match="calibration data"):
        qfold.quantize(MODEL, tmp_path / "q.onnx")
    with pytest.raises(qfold.QfoldError, match="Conv"):
        qfold.fuse(MODEL, tmp_path / "f.onnx", only=[["/conv1/Conv", "/fc1/Gemm"]])


UPGRADE = ROOT / "onnx_models" / "upgrade"


def test_upgrade(tmp_path):
    out = tmp_path / "cnn13.onnx"
    r = qfold.upgrade(UPGRADE / "cnn_8" / "model.onnx", out)
    assert r["written"] == str(out) and out.exists()
    assert (r["upgrade"]["from"], r["upgrade"]["to"]) == (8, 13)
    assert r["upgrade"]["by_op"]["Upsample"] == 1 and len(r["upgrade"]["rewritten"]) == 6
    # the upgraded model reproduces ONNX Runtime's outputs of the opset-8 original, in tract
    c = qfold.check(out, inputs=UPGRADE / "cnn_8" / "test_data_set_0")
    assert c["passed"] and c["outputs"][0]["max_abs"] < 1e-5
    r = qfold.upgrade(UPGRADE / "softmax_11" / "model.onnx", tmp_path / "s.onnx", check=True)
    assert r["check"]["passed"]
    with pytest.raises(qfold.QfoldError, match="downgrade"):
        qfold.upgrade(UPGRADE / "softmax_11" / "model.onnx", tmp_path / "d.onnx", opset=10)
    assert not (tmp_path / "d.onnx").exists()



def test_analyze_and_accuracy_options(tmp_path, calib):
    a = qfold.analyze(MODEL, {"input": calib}, eval=DIGITS / "eval", samples=2)
    assert a["schema"] == "qfold.analyze/1"
    rows = a["analysis"]["tensors"]
    assert len(rows) == 12 and rows[0]["tensor"] == "logits"
    assert all(r["only_quantized"]["sqnr_db"] > 35 for r in rows)
    out = tmp_path / "bc.onnx"
    r = qfold.quantize(MODEL, out, {"input": calib}, eval=DIGITS / "eval", bias_correction=True,
                       equalize=True, per_channel=False)
    assert r["quantization"]["equalization"]["pairs"]
    assert len(r["quantization"]["bias_correction"]["layers"]) == 5
    assert sqnr(r) > 39.0  # 40.81 dB measured; per-tensor without either: 38.20 dB
    # equalization corrects biases by default; bias_correction=False turns it off
    r = qfold.quantize(MODEL, tmp_path / "e.onnx", {"input": calib}, eval=DIGITS / "eval",
                       equalize=True, per_channel=False)
    assert len(r["quantization"]["bias_correction"]["layers"]) == 5
    r = qfold.quantize(MODEL, tmp_path / "nb.onnx", {"input": calib}, eval=DIGITS / "eval",
                       equalize=True, bias_correction=False, per_channel=False)
    assert "bias_correction" not in r["quantization"]
    assert 36.0 < sqnr(r) < 39.0  # 37.29 dB measured: equalization alone
    # the correction measured on the quantized model's activations, layer by layer
    r = qfold.quantize(MODEL, tmp_path / "obc.onnx", {"input": calib}, eval=DIGITS / "eval",
                       output_bias_correction=True)
    assert len(r["quantization"]["output_bias_correction"]["layers"]) == 5
    assert "bias_correction" not in r["quantization"]
    # high-bias absorption is measured and reported (the digits CNN's Relus feed MaxPool or
    # padded convs, so nothing moves)
    r = qfold.quantize(MODEL, tmp_path / "hba.onnx", {"input": calib}, eval=DIGITS / "eval",
                       high_bias_absorption=True)
    assert r["quantization"]["high_bias_absorption"]["activations"] == []
    a = qfold.analyze(MODEL, {"input": calib}, samples=1, high_bias_absorption=True)
    assert a["options"]["high_bias_absorption"] is True
    r = qfold.quantize(MODEL, tmp_path / "t.onnx", {"input": calib}, eval=DIGITS / "eval",
                       target_sqnr=41, report_layers=True, samples=2)
    assert r["target"]["met"] and sqnr(r) >= 41
    assert r["layers"]["samples"] == 2
    # the search and the judgment pool 3 realizations of the evaluation samples by default
    assert r["target"]["realizations"] == 3
    n = r["evaluation"]["comparison"]["samples"]
    r = qfold.quantize(MODEL, tmp_path / "t1.onnx", {"input": calib}, eval=DIGITS / "eval",
                       target_sqnr=41, samples=2, realizations=1)
    assert r["target"]["realizations"] == 1
    assert r["evaluation"]["comparison"]["samples"] * 3 == n
    with pytest.raises(qfold.QfoldError, match="realizations=0: use 1"):
        qfold.quantize(MODEL, tmp_path / "r0.onnx", {"input": calib}, target_sqnr=41, realizations=0)
    with pytest.raises(qfold.QfoldError, match="not reached"):
        qfold.quantize(MODEL, tmp_path / "n.onnx", {"input": calib}, eval=DIGITS / "eval",
                       target_sqnr=300, samples=1)
    assert not (tmp_path / "n.onnx").exists()


def test_affine_folding_off(tmp_path):
    # a conformance model whose Conv is followed by Adds of per-channel constants
    model = ROOT / "onnx_models" / "conformance" / "external_data_typed" / "model.onnx"

    def kinds(r):
        return [g["kind"] for g in r["fusion"]["groups"]]

    assert "ConvAffine" in kinds(qfold.fuse(model, tmp_path / "a.onnx", check=True))
    r = qfold.fuse(model, tmp_path / "b.onnx", affine_folding=False, check=True)
    assert "ConvAffine" not in kinds(r) and r["check"]["passed"]
    # (that model holds DequantizeLinear nodes, which quantize refuses: the digits CNN here)
    q = qfold.quantize(MODEL, tmp_path / "q.onnx", random=4, affine_folding=False)
    assert q["quantization"]["options"]["no_affine_folding"] is True
    assert q["quantization"]["options"]["affine_folding_measured"] is False
    # by default the single-value folds are measured (the digits CNN has none: nothing to report)
    q = qfold.quantize(MODEL, tmp_path / "q2.onnx", random=4)
    assert q["quantization"]["options"]["affine_folding_measured"] is True
    assert "affine_folding_choice" not in q
    q = qfold.quantize(MODEL, tmp_path / "q3.onnx", random=4, affine_folding=True)
    opts = q["quantization"]["options"]
    assert opts["no_affine_folding"] is False and opts["affine_folding_measured"] is False
    a = qfold.analyze(MODEL, random=4, samples=1, affine_folding=False)
    assert a["schema"] == "qfold.analyze/1" and a["analysis"]["tensors"]
