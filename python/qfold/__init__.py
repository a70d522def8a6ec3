"""qfold: fuse and quantize ONNX models, and check every rewrite by running it in tract.

Each function runs the ``qfold`` command of the same name and returns the report that
``qfold <command> --json`` prints, as a dict. Errors raise :class:`QfoldError` with the
message the command line prints after ``error:``.

Samples (calibration, evaluation, check inputs) may be given as:

- a dict of input name -> numpy array. An array one rank above the input's declared rank
  holds samples stacked on a new first axis; otherwise its first axis holds the samples,
  fed ``batch_size`` rows per run (or as many as a fixed first dim of the input says);
- an iterable of such dicts (ONNX Runtime's CalibrationDataReader habit), or an object with
  ``get_next()`` returning dicts until ``None``: each dict is one run of the model, unless
  its arrays are stacked one rank above the declared one;
- a path: a folder of ``test_data_set_N`` folders or ``.npy`` / ``.npz`` files, as the
  command line reads it.

Arrays must have the model's input types (``float32`` for most models): nothing is cast.
"""

import json
import os
from collections.abc import Mapping

from . import _native

__all__ = ["QfoldError", "inspect", "fuse", "quantize", "convert", "check", "upgrade", "analyze"]
__version__ = _native.__version__


class QfoldError(RuntimeError, ValueError):
    """An error of qfold: a missing or malformed file, a bad option, or a check that failed.

    ``report`` holds the command's report (a dict) when a check failed and nothing was
    written; otherwise it is None.
    """

    def __init__(self, message, report=None):
        super().__init__(message)
        self.report = report


def _run(fn, *args):
    try:
        return fn(*args)
    except _native.NativeError as e:
        raise QfoldError(str(e)) from None
    except (TypeError, OverflowError) as e:
        # an option of the wrong type, as pyo3 reports it
        raise QfoldError(str(e)) from None


def _rewrite(fn, *args):
    text, failure = _run(fn, *args)
    report = json.loads(text)
    if failure is not None:
        raise QfoldError(failure, report)
    return report


def _path(p):
    return None if p is None else os.fspath(p)


def _array(name, a):
    import numpy as np

    a = np.asarray(a)
    if a.dtype.kind not in "biuf":
        raise QfoldError(f"array '{name}': dtype {a.dtype} is not a number or bool type")
    a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
    return (str(name), a.dtype.name, [int(d) for d in a.shape], a.tobytes())


def _feed(d, where):
    if not isinstance(d, Mapping):
        raise QfoldError(f"{where}: expected a dict of input name -> array, got {type(d).__name__}")
    return [_array(k, v) for k, v in d.items()]


def _labels(labels):
    if labels is None:
        return None
    import numpy as np

    a = np.asarray(labels)
    if a.dtype.kind not in "iu":
        raise QfoldError(f"labels must be integers, got dtype {a.dtype}")
    return [int(x) for x in a.reshape(-1)]


def _inputs(data, what, batch_size=1, labels=None):
    """The input spec `_native` takes, for any accepted form of `data`."""
    if isinstance(data, (str, bytes, os.PathLike)):
        if labels is not None:
            raise QfoldError(f"{what}: labels go in a labels.npy beside a data folder")
        return ("dir", os.fsdecode(data))
    if isinstance(data, Mapping):
        return ("arrays", [_feed(data, what)], int(batch_size), _labels(labels), what)
    if hasattr(data, "get_next"):
        data = iter(data.get_next, None)
    try:
        items = iter(data)
    except TypeError:
        raise QfoldError(
            f"{what}: expected a dict of arrays, an iterable of dicts or a folder, "
            f"got {type(data).__name__}"
        ) from None
    feeds = [_feed(d, f"{what}[{k}]") for k, d in enumerate(items)]
    if not feeds:
        raise QfoldError(f"{what}: no samples")
    return ("arrays", feeds, None, _labels(labels), what)


def _random(count, seed, input_shapes):
    return ("random", int(count), int(seed), _shapes(input_shapes))


def _shapes(input_shapes):
    """{name: (1, 3, 224, 224)} or ["name:1,3,224,224"] -> ["name:1,3,224,224"]."""
    if not input_shapes:
        return []
    if isinstance(input_shapes, Mapping):
        return [f"{k}:{','.join(str(int(d)) for d in v)}" for k, v in input_shapes.items()]
    if isinstance(input_shapes, str):
        return [input_shapes]
    return [str(s) for s in input_shapes]


def _names(v):
    """A name, a comma-separated string or a list of names -> a list of names."""
    if v is None:
        return []
    if isinstance(v, str):
        return [s.strip() for s in v.split(",") if s.strip()]
    return [str(s) for s in v]


def inspect(path):
    """What is inside a model: inputs, outputs, op types, initializers, fusion candidates.

    Returns ``qfold inspect --json``'s report: ``ir_version``, ``opsets``, ``inputs``,
    ``outputs``, ``op_types``, ``nodes``, ``initializers``, ... and ``fusion`` (what
    :func:`fuse` would do).
    """
    return json.loads(_run(_native.inspect, _path(path)))


def fuse(
    path,
    out=None,
    *,
    only=None,
    qat=False,
    affine_folding=True,
    check=False,
    inputs=None,
    random=2,
    seed=0,
    input_shapes=None,
    tolerance=None,
    batch_size=1,
    in_place=False,
    external_data_threshold=None,
):
    """Fold BatchNormalization and record fusion groups (PyTorch's ``fuse_modules``).

    ``only``: explicit chains, ``[["conv1", "bn1", "relu1"], ...]`` (node names or PyTorch
    module paths; a chain may also be a comma-separated string); without it every pattern is
    fused. ``qat``: record the groups, fold nothing. ``affine_folding=False`` leaves Add / Sub /
    Mul / Div by constants after a Conv, ConvTranspose, Gemm or MatMul unfolded (BN still
    folds; ``quantize`` and ``analyze`` take it too, as ``--no-affine-folding``). ``check``:
    run both models in tract on ``inputs`` (samples, see the module doc) or ``random`` random
    samples, and raise
    :class:`QfoldError` (writing nothing) when they differ beyond ``tolerance`` (exact, float,
    half, loose).

    Returns ``{"fusion": {...groups, skipped, counts...}, "check": {...} or None,
    "written": out}``.
    """
    chains = [_names(c) for c in (only or [])]
    spec = None
    if check:
        spec = (
            _random(random, seed, input_shapes)
            if inputs is None
            else _inputs(inputs, "inputs", batch_size)
        )
    return _rewrite(
        _native.fuse,
        _path(path),
        _path(out),
        chains,
        bool(qat),
        bool(affine_folding),
        spec,
        tolerance,
        bool(in_place),
        external_data_threshold,
    )


def _min_sqnr(min_sqnr, target_sqnr):
    """The evaluation's criterion: ``min_sqnr``, else the target, else 20 dB."""
    if min_sqnr is not None:
        return min_sqnr
    return 20.0 if target_sqnr is None else target_sqnr


def convert(
    path,
    out=None,
    *,
    check=False,
    min_sqnr=30.0,
    inputs=None,
    random=2,
    input_shapes=None,
    batch_size=1,
    allow_contrib_ops=False,
    in_place=False,
    external_data_threshold=None,
):
    """Rewrite a QDQ model into QOperator form (QLinearConv, QLinearMatMul, 8-bit data
    movement).

    ``check``: compare with the QDQ model in tract and raise :class:`QfoldError` (writing
    nothing) when an output's SQNR is below ``min_sqnr`` dB.

    Returns ``{"convert": {"converted", "float_islands", "skipped", ...}, "check": ...,
    "written": out}``.
    """
    spec = None
    if check:
        spec = (
            _random(random, 0, input_shapes)
            if inputs is None
            else _inputs(inputs, "inputs", batch_size)
        )
    return _rewrite(
        _native.convert,
        _path(path),
        _path(out),
        spec,
        float(min_sqnr),
        bool(allow_contrib_ops),
        bool(in_place),
        external_data_threshold,
    )


def check(
    a,
    b=None,
    inputs=None,
    random=None,
    *,
    seed=0,
    input_shapes=None,
    min_sqnr=None,
    tolerance=None,
    atol=None,
    rtol=None,
    batch_size=1,
):
    """Run ``b`` against ``a`` in tract on the same inputs and compare each output.

    ``inputs``: samples (see the module doc); without them, ``random`` random samples (1 by
    default). Without ``b``, ``a`` is checked against the expected outputs stored in the
    ``inputs`` folder. The criterion is ``min_sqnr`` (dB), a named ``tolerance`` or
    ``atol``/``rtol``; by default the float tolerance.

    Returns ``qfold check --json``'s report: ``passed``, ``samples``, ``criterion`` and per
    output ``max_abs``, ``max_rel``, ``cosine``, ``sqnr_db``, ``top1``. A failed comparison
    is reported (``passed`` False), not raised.
    """
    if inputs is not None and random is not None:
        raise QfoldError("give inputs or random, not both")
    spec = (
        _random(1 if random is None else random, seed, input_shapes)
        if inputs is None
        else _inputs(inputs, "inputs", batch_size)
    )
    return json.loads(
        _run(
            _native.check,
            _path(a),
            _path(b),
            spec,
            min_sqnr,
            tolerance,
            atol,
            rtol,
        )
    )


def quantize(
    path,
    out=None,
    calibration=None,
    *,
    preset="qfold",
    format=None,
    method=None,
    percentile=99.999,
    activation=None,
    weight=None,
    symmetric_activations=False,
    per_channel=None,
    per_tensor_min_sqnr=None,
    reduce_range=False,
    exclude=None,
    op_types=None,
    fuse=True,
    affine_folding=None,
    threads=0,
    equalize=None,
    bias_correction=None,
    high_bias_absorption=False,
    output_bias_correction=False,
    eval=None,
    eval_labels=None,
    labels=None,
    batch_size=1,
    random=None,
    seed=0,
    input_shapes=None,
    ranges=None,
    save_ranges=None,
    check=False,
    min_sqnr=None,
    allow_contrib_ops=False,
    in_place=False,
    external_data_threshold=None,
    report_layers=False,
    samples=8,
    target_sqnr=None,
    target_accuracy=None,
    min_quantized=50.0,
    write_best=False,
    realizations=3,
):
    """Fuse, calibrate on tract, and write a quantized model (QDQ, or QOperator with
    ``format="qoperator"``).

    ``calibration``: samples (see the module doc), or ``random=N`` random samples, or
    ``ranges`` (a file written by ``save_ranges``). ``preset``: qfold, ort, fbgemm, x86,
    qnnpack, tensorrt, tract; ``method``: minmax, moving-average, percentile, entropy, l2;
    ``activation``/``weight``: "u8" or "i8"; ``per_channel``: True/False (None: the
    preset's); ``exclude``: node names or module paths left float; ``op_types``: op types
    left float. The quantized model is evaluated against the float model on ``eval``
    (samples; ``eval_labels`` gives accuracy), or else on the calibration samples themselves
    (``labels`` labels the calibration rows). An output SQNR below ``min_sqnr`` dB (default
    ``target_sqnr`` when given, else 20) raises :class:`QfoldError` (its ``report`` holds the
    figures): with ``check`` nothing is written, without it the model is written first.

    Accuracy tools: ``equalize`` (cross-layer equalization; None: the preset's),
    ``bias_correction`` (None: on with equalization, else off; True / False force it),
    ``affine_folding`` (None: Add / Sub / Mul / Div by constants after a Conv, ConvTranspose,
    Gemm or MatMul folded into it unless leaving them out measures better on the calibration
    samples; True / False decide without measuring),
    ``high_bias_absorption`` (the bias before each Relu / ReLU6 lowered by the smallest value
    its channel takes on the calibration data, the next layer's raised to match),
    ``output_bias_correction`` (biases corrected for the mean error of each layer's output in
    the quantized model, upstream rounding included),
    ``report_layers`` (the per-tensor table of :func:`analyze` in
    ``layers``, variants run on ``samples`` evaluation samples), ``target_sqnr`` (dB) /
    ``target_accuracy`` (percent): leave float the fewest layers that reach it, keeping at
    least ``min_quantized`` percent of Conv/Gemm/MatMul quantized; a missed target raises
    :class:`QfoldError` and writes nothing unless ``write_best``. With a target, variants
    and the model written are scored on ``realizations`` copies of the evaluation samples
    pooled (as given, then float inputs scaled by 1 + 2^-20, 1 - 2^-20, ...): one draw of a
    quantized model's rounding flips can be lucky.

    Returns ``qfold quantize --json``'s report: ``quantization`` (options, fusion, plan,
    qdq), ``evaluation`` (``comparison`` with per-output ``sqnr_db``, accuracies),
    ``size_before``, ``size_after``, ``conversion`` (QOperator), ``layers``, ``target`` and
    ``written``.
    """
    given = sum(x is not None for x in (calibration, random, ranges))
    if given != 1:
        raise QfoldError(
            "give calibration data (arrays, dicts or a folder), random=N or ranges=FILE"
        )
    calib_labels = labels
    if calibration is not None:
        calib = _inputs(calibration, "calibration", batch_size, calib_labels)
    elif random is not None:
        calib = _random(random, seed, input_shapes)
    else:
        calib = None
    eval_spec = None if eval is None else _inputs(eval, "eval", batch_size, eval_labels)
    if eval is None and eval_labels is not None:
        raise QfoldError("eval_labels without eval")
    settings = {
        "preset": str(preset),
        "format": format,
        "method": method,
        "percentile": float(percentile),
        "activation": activation,
        "weight": weight,
        "symmetric_activations": bool(symmetric_activations),
        "per_channel": per_channel,
        "per_tensor_min_sqnr": per_tensor_min_sqnr,
        "reduce_range": bool(reduce_range),
        "exclude": [exclude] if isinstance(exclude, str) else [str(e) for e in exclude or []],
        "op_types": _names(op_types),
        "fuse": bool(fuse),
        "affine_folding": None if affine_folding is None else bool(affine_folding),
        "threads": int(threads),
        "equalize": None if equalize is None else bool(equalize),
        "bias_correction": None if bias_correction is None else bool(bias_correction),
        "high_bias_absorption": bool(high_bias_absorption),
        "output_bias_correction": bool(output_bias_correction),
    }
    accuracy = {
        "report_layers": bool(report_layers),
        "samples": int(samples),
        "target_sqnr": None if target_sqnr is None else float(target_sqnr),
        "target_accuracy": None if target_accuracy is None else float(target_accuracy),
        "min_quantized": float(min_quantized),
        "write_best": bool(write_best),
        "realizations": int(realizations),
    }
    return _rewrite(
        _native.quantize,
        _path(path),
        _path(out),
        settings,
        accuracy,
        calib,
        _path(ranges),
        _path(save_ranges),
        eval_spec,
        int(seed),
        _shapes(input_shapes),
        bool(check),
        float(_min_sqnr(min_sqnr, target_sqnr)),
        bool(allow_contrib_ops),
        bool(in_place),
        external_data_threshold,
    )


def upgrade(
    path,
    out=None,
    opset=13,
    check=False,
    *,
    inputs=None,
    random=2,
    seed=0,
    input_shapes=None,
    tolerance=None,
    batch_size=1,
    in_place=False,
    external_data_threshold=None,
):
    """Raise a model's default-domain opset to ``opset`` (at most 18), rewriting every op whose
    signature or meaning changed on the way (Upsample to Resize, Clip/Pad/Slice/TopK attributes
    to inputs, Softmax over an inner axis, ...). A downgrade, a model below opset 7, or an op
    without adapter raises :class:`QfoldError` naming the nodes.

    ``check``: run both models in tract on ``inputs`` (samples, see the module doc) or
    ``random`` random samples, and raise :class:`QfoldError` (writing nothing) when they differ
    beyond ``tolerance`` (exact, float, half, loose). tract must be able to run the original.

    Returns ``{"upgrade": {"from", "to", "by_op", "rewritten", ...}, "check": ... or None,
    "written": out}``.
    """
    spec = None
    if check:
        spec = (
            _random(random, seed, input_shapes)
            if inputs is None
            else _inputs(inputs, "inputs", batch_size)
        )
    return _rewrite(
        _native.upgrade,
        _path(path),
        _path(out),
        int(opset),
        spec,
        tolerance,
        bool(in_place),
        external_data_threshold,
    )


def analyze(
    path,
    calibration=None,
    *,
    eval=None,
    samples=8,
    random=None,
    seed=0,
    input_shapes=None,
    labels=None,
    eval_labels=None,
    batch_size=1,
    preset="qfold",
    method=None,
    percentile=99.999,
    activation=None,
    weight=None,
    symmetric_activations=False,
    per_channel=None,
    per_tensor_min_sqnr=None,
    reduce_range=False,
    exclude=None,
    op_types=None,
    fuse=True,
    affine_folding=None,
    threads=0,
    equalize=None,
    high_bias_absorption=False,
):
    """Per-tensor quantization sensitivity (``qfold analyze --json``): calibrate once, then for
    every quantized tensor its own SQNR, the model's output SQNR with only it quantized and with
    only it left float, its range, clipped fraction and per-channel weight range spread, sorted
    by sensitivity. Variants run on ``samples`` samples of ``eval`` (default: the calibration
    samples). Settings as :func:`quantize`.
    """
    if (calibration is None) == (random is None):
        raise QfoldError("give calibration data (arrays, dicts or a folder) or random=N")
    if calibration is not None:
        calib = _inputs(calibration, "calibration", batch_size, labels)
    else:
        calib = _random(random, seed, input_shapes)
    eval_spec = None if eval is None else _inputs(eval, "eval", batch_size, eval_labels)
    settings = {
        "preset": str(preset),
        "format": None,
        "method": method,
        "percentile": float(percentile),
        "activation": activation,
        "weight": weight,
        "symmetric_activations": bool(symmetric_activations),
        "per_channel": per_channel,
        "per_tensor_min_sqnr": per_tensor_min_sqnr,
        "reduce_range": bool(reduce_range),
        "exclude": [exclude] if isinstance(exclude, str) else [str(e) for e in exclude or []],
        "op_types": _names(op_types),
        "fuse": bool(fuse),
        "affine_folding": None if affine_folding is None else bool(affine_folding),
        "threads": int(threads),
        "equalize": None if equalize is None else bool(equalize),
        "bias_correction": None,
        "high_bias_absorption": bool(high_bias_absorption),
        "output_bias_correction": False,
    }
    return json.loads(_run(_native.analyze, _path(path), settings, calib, eval_spec, int(samples)))
