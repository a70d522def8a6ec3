//! `qfold._native`: the qfold commands for Python. Each function returns the report
//! `qfold <command> --json` prints, as a JSON string, which `qfold/__init__.py` decodes; the
//! rewriting commands also return the failure message when their check failed (nothing was
//! written then). Arrays arrive as `(name, dtype name, shape, little-endian bytes)` so this
//! crate needs no numpy bindings. The GIL is released while qfold works.

use std::path::PathBuf;

use pyo3::create_exception;
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;

use qfold::commands::{
    self, CalibrationData, Destination, EvalData, FuseCheck, Inputs, QuantizeJob, QuantizeSettings,
    TargetJob,
};
use qfold::fusion::FuseOptions;
use qfold::onnx::proto::TensorProto;
use qfold::onnx::{ExternalData, SaveOptions, TensorData};
use qfold::quant::qoperator::ConvertOptions;
use qfold::runtime::Sample;

create_exception!(
    _native,
    NativeError,
    PyRuntimeError,
    "An error of qfold; qfold.QfoldError is raised in its place."
);

fn err(e: qfold::Error) -> PyErr {
    NativeError::new_err(e.to_string())
}

fn usage(msg: String) -> PyErr {
    NativeError::new_err(msg)
}

fn to_json<R: qfold::report::Report>(r: &R) -> String {
    qfold::report::to_json(r, false)
}

/// An array as the Python side sends it.
type RawArray = (String, String, Vec<usize>, Vec<u8>);

/// ONNX element type codes of the numpy dtype names qfold handles.
fn onnx_code(dtype: &str) -> Option<i32> {
    Some(match dtype {
        "float32" => 1,
        "uint8" => 2,
        "int8" => 3,
        "uint16" => 4,
        "int16" => 5,
        "int32" => 6,
        "int64" => 7,
        "bool" => 9,
        "float16" => 10,
        "float64" => 11,
        "uint32" => 12,
        "uint64" => 13,
        _ => return None,
    })
}

fn tensor((name, dtype, shape, bytes): RawArray) -> PyResult<(String, TensorData)> {
    let code = onnx_code(&dtype).ok_or_else(|| {
        usage(format!(
            "array '{name}': dtype {dtype} is not supported (use float32, float16, float64, \
             int8/16/32/64, uint8/16/32/64 or bool)"
        ))
    })?;
    let t = TensorProto {
        name: name.clone(),
        data_type: code,
        dims: shape.iter().map(|&d| d as i64).collect(),
        raw_data: bytes,
        ..Default::default()
    };
    let data = TensorData::from_proto(&t).map_err(err)?;
    Ok((name, data))
}

/// `("dir", path)`, `("npy", [specs])`, `("random", count, seed, [shapes])` or
/// `("arrays", [[RawArray]], batch, labels, source)`.
fn inputs(spec: &Bound<'_, PyAny>) -> PyResult<Inputs> {
    let tag: String = spec.get_item(0)?.extract()?;
    Ok(match tag.as_str() {
        "dir" => Inputs::Dir(spec.get_item(1)?.extract()?),
        "npy" => Inputs::Npy(spec.get_item(1)?.extract()?),
        "random" => {
            let (_, count, seed, shapes): (String, usize, u64, Vec<String>) = spec.extract()?;
            Inputs::Random {
                count,
                seed,
                shapes,
            }
        }
        "arrays" => {
            type Spec = (
                String,
                Vec<Vec<RawArray>>,
                Option<usize>,
                Option<Vec<i64>>,
                String,
            );
            let (_, feeds, batch, labels, source): Spec = spec.extract()?;
            let feeds = feeds
                .into_iter()
                .map(|f| f.into_iter().map(tensor).collect::<PyResult<Sample>>())
                .collect::<PyResult<Vec<Sample>>>()?;
            Inputs::Arrays {
                feeds,
                batch,
                labels,
                source,
            }
        }
        other => return Err(usage(format!("unknown input kind '{other}'"))),
    })
}

fn destination(
    model: &std::path::Path,
    out: Option<PathBuf>,
    in_place: bool,
    external_data_threshold: Option<usize>,
) -> qfold::Result<Destination> {
    let save = SaveOptions {
        external: match external_data_threshold {
            Some(n) => ExternalData::Threshold(n),
            None => ExternalData::Keep,
        },
        ..Default::default()
    };
    Destination::new(model, out.as_deref(), in_place, save)
}

/// `qfold inspect MODEL --json`.
#[pyfunction]
fn inspect(py: Python<'_>, path: PathBuf) -> PyResult<String> {
    py.allow_threads(|| commands::inspect_file(&path).map(|s| to_json(&s)))
        .map_err(err)
}

/// The `--check [--inputs ...] [--tolerance ...]` of fuse and upgrade.
fn fuse_check(
    check: Option<Bound<'_, PyAny>>,
    tolerance: Option<String>,
) -> PyResult<Option<FuseCheck>> {
    check
        .map(|spec| {
            Ok(FuseCheck {
                inputs: inputs(&spec)?,
                tolerance,
            })
        })
        .transpose()
}

/// `qfold fuse MODEL -o OUT ... --json`: (report, failure message).
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn fuse(
    py: Python<'_>,
    path: PathBuf,
    out: Option<PathBuf>,
    only: Vec<Vec<String>>,
    qat: bool,
    affine_folding: bool,
    check: Option<Bound<'_, PyAny>>,
    tolerance: Option<String>,
    in_place: bool,
    external_data_threshold: Option<usize>,
) -> PyResult<(String, Option<String>)> {
    let check = fuse_check(check, tolerance)?;
    let opts = FuseOptions {
        only,
        qat,
        fusers: vec![],
        no_constant_folding: false,
        inputs_as_constants: false,
        no_affine_folding: !affine_folding,
        no_scalar_affine_folding: false,
    };
    py.allow_threads(|| {
        let dest = destination(&path, out, in_place, external_data_threshold)?;
        let o = commands::fuse_file(&path, &dest, &opts, check)?;
        Ok((to_json(&o), o.failure()))
    })
    .map_err(err)
}

/// `qfold convert QDQ_MODEL -o OUT ... --json`: (report, failure message).
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn convert(
    py: Python<'_>,
    path: PathBuf,
    out: Option<PathBuf>,
    check: Option<Bound<'_, PyAny>>,
    min_sqnr: f64,
    allow_contrib_ops: bool,
    in_place: bool,
    external_data_threshold: Option<usize>,
) -> PyResult<(String, Option<String>)> {
    let check = match check {
        Some(spec) => Some((inputs(&spec)?, min_sqnr)),
        None => None,
    };
    let opts = ConvertOptions { allow_contrib_ops };
    py.allow_threads(|| {
        let dest = destination(&path, out, in_place, external_data_threshold)?;
        let o = commands::convert_file(&path, &dest, opts, check)?;
        Ok((to_json(&o), o.failure()))
    })
    .map_err(err)
}

/// `qfold check A [B] ... --json`.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn check(
    py: Python<'_>,
    a: PathBuf,
    b: Option<PathBuf>,
    inputs_spec: Bound<'_, PyAny>,
    min_sqnr: Option<f64>,
    tolerance: Option<String>,
    atol: Option<f64>,
    rtol: Option<f64>,
) -> PyResult<String> {
    let inputs = inputs(&inputs_spec)?;
    py.allow_threads(|| {
        let crit = commands::criterion(min_sqnr, tolerance.as_deref(), atol, rtol)?;
        commands::check_files(&a, b.as_deref(), inputs, crit).map(|c| to_json(&c))
    })
    .map_err(err)
}

/// The quantization settings, from a dict with every key of [`QuantizeSettings`].
#[derive(FromPyObject)]
#[pyo3(from_item_all)]
struct Settings {
    preset: String,
    format: Option<String>,
    method: Option<String>,
    percentile: f64,
    activation: Option<String>,
    weight: Option<String>,
    symmetric_activations: bool,
    per_channel: Option<bool>,
    per_tensor_min_sqnr: Option<f64>,
    reduce_range: bool,
    exclude: Vec<String>,
    op_types: Vec<String>,
    fuse: bool,
    /// False: Add / Sub / Mul / Div after a Conv, ConvTranspose, Gemm or MatMul stay unfolded;
    /// True: folded; None: folded unless leaving them out measures better.
    affine_folding: Option<bool>,
    threads: usize,
    equalize: Option<bool>,
    /// None: the default (on with equalization); true: on; false: off, even with equalization.
    bias_correction: Option<bool>,
    high_bias_absorption: bool,
    output_bias_correction: bool,
}

/// The accuracy tools' options of `quantize` (issue 11), from a dict with every key.
#[derive(FromPyObject)]
#[pyo3(from_item_all)]
struct Accuracy {
    report_layers: bool,
    samples: usize,
    target_sqnr: Option<f64>,
    target_accuracy: Option<f64>,
    min_quantized: f64,
    write_best: bool,
    realizations: usize,
}

impl Accuracy {
    fn target(&self) -> PyResult<Option<TargetJob>> {
        let flag = |f: &str| f.replace('-', "_");
        TargetJob::checked(
            self.target_sqnr,
            self.target_accuracy,
            self.min_quantized,
            self.samples,
            self.write_best,
            &flag,
            "=",
        )
        .and_then(|t| {
            t.map(|t| t.with_realizations(self.realizations, &flag, "="))
                .transpose()
        })
        .map_err(err)
    }
}

impl From<Settings> for QuantizeSettings {
    fn from(s: Settings) -> Self {
        QuantizeSettings {
            preset: s.preset,
            format: s.format,
            method: s.method,
            percentile: s.percentile,
            activation: s.activation,
            weight: s.weight,
            symmetric_activations: s.symmetric_activations,
            per_channel: s.per_channel,
            per_tensor_min_sqnr: s.per_tensor_min_sqnr,
            reduce_range: s.reduce_range,
            exclude: s.exclude,
            op_types: s.op_types,
            fuse: s.fuse,
            no_constant_folding: false,
            inputs_as_constants: false,
            affine_folding: s.affine_folding,
            threads: s.threads,
            equalize: s.equalize,
            bias_correction: s.bias_correction == Some(true),
            no_bias_correction: s.bias_correction == Some(false),
            high_bias_absorption: s.high_bias_absorption,
            output_bias_correction: s.output_bias_correction,
        }
    }
}

/// `qfold quantize MODEL -o OUT ... --json`: (report, failure message). `calibration` is an
/// input spec, or `None` with `ranges`; `eval` an input spec, or `None` for the default (the
/// calibration samples themselves, or random samples with `ranges`). Arrays from Python are
/// collected into memory; data folders and files are read one sample at a time.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn quantize(
    py: Python<'_>,
    path: PathBuf,
    out: Option<PathBuf>,
    settings: Settings,
    accuracy: Accuracy,
    calibration: Option<Bound<'_, PyAny>>,
    ranges: Option<PathBuf>,
    save_ranges: Option<PathBuf>,
    eval: Option<Bound<'_, PyAny>>,
    seed: u64,
    input_shapes: Vec<String>,
    check: bool,
    min_sqnr: f64,
    allow_contrib_ops: bool,
    in_place: bool,
    external_data_threshold: Option<usize>,
) -> PyResult<(String, Option<String>)> {
    let calibration = match (calibration, ranges) {
        (Some(spec), None) => CalibrationData::Inputs(inputs(&spec)?),
        (None, Some(p)) => CalibrationData::Ranges(p),
        (Some(_), Some(_)) => {
            return Err(usage("give calibration data or ranges, not both".into()))
        }
        (None, None) => {
            return Err(usage(
                "give calibration data: arrays, a data folder, or ranges=FILE".into(),
            ))
        }
    };
    let eval = match eval {
        Some(spec) => {
            let inputs = inputs(&spec)?;
            let source = match &inputs {
                Inputs::Dir(d) | Inputs::Data { path: d, .. } => d.display().to_string(),
                Inputs::Arrays { source, .. } => source.clone(),
                Inputs::Random { count, .. } => format!("{count} random samples"),
                Inputs::Npy(specs) => specs.join(", "),
                Inputs::Cases(c) => format!("{} samples", c.len()),
            };
            EvalData::Inputs { inputs, source }
        }
        None => match &calibration {
            CalibrationData::Inputs(Inputs::Random { .. }) | CalibrationData::Ranges(_) => {
                EvalData::Random {
                    seed,
                    shapes: input_shapes,
                }
            }
            CalibrationData::Inputs(_) => EvalData::Calibration,
        },
    };
    let settings = QuantizeSettings::from(settings);
    let target = accuracy.target()?;
    let report_layers = accuracy.report_layers.then_some(accuracy.samples);
    py.allow_threads(|| {
        let qoperator = settings.qoperator()?;
        let options = settings.options()?;
        let dest = destination(&path, out, in_place, external_data_threshold)?;
        let job = QuantizeJob {
            options,
            qoperator,
            allow_contrib_ops,
            calibration,
            eval,
            save_ranges,
            check,
            min_sqnr,
            report_layers,
            target,
        };
        let o = commands::quantize_file(&path, &dest, job)?;
        Ok((to_json(&o), o.failure()))
    })
    .map_err(err)
}

/// `qfold upgrade MODEL -o OUT --opset N ... --json`: (report, failure message).
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn upgrade(
    py: Python<'_>,
    path: PathBuf,
    out: Option<PathBuf>,
    opset: i64,
    check: Option<Bound<'_, PyAny>>,
    tolerance: Option<String>,
    in_place: bool,
    external_data_threshold: Option<usize>,
) -> PyResult<(String, Option<String>)> {
    let check = fuse_check(check, tolerance)?;
    py.allow_threads(|| {
        let dest = destination(&path, out, in_place, external_data_threshold)?;
        let o = commands::upgrade_file(&path, &dest, opset, check)?;
        Ok((to_json(&o), o.failure()))
    })
    .map_err(err)
}

/// `qfold analyze MODEL --calib ... --json`: the report. `eval` `None`: the calibration
/// samples.
#[pyfunction]
fn analyze(
    py: Python<'_>,
    path: PathBuf,
    settings: Settings,
    calibration: Bound<'_, PyAny>,
    eval: Option<Bound<'_, PyAny>>,
    samples: usize,
) -> PyResult<String> {
    let calibration = inputs(&calibration)?;
    let eval = match eval {
        Some(spec) => Some((inputs(&spec)?, "the evaluation samples".to_string())),
        None => None,
    };
    let settings = QuantizeSettings::from(settings);
    py.allow_threads(|| {
        commands::analyze_file(&path, &settings, calibration, eval, samples).map(|o| to_json(&o))
    })
    .map_err(err)
}

/// The extension module.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("NativeError", m.py().get_type::<NativeError>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(inspect, m)?)?;
    m.add_function(wrap_pyfunction!(fuse, m)?)?;
    m.add_function(wrap_pyfunction!(convert, m)?)?;
    m.add_function(wrap_pyfunction!(check, m)?)?;
    m.add_function(wrap_pyfunction!(quantize, m)?)?;
    m.add_function(wrap_pyfunction!(upgrade, m)?)?;
    m.add_function(wrap_pyfunction!(analyze, m)?)?;
    Ok(())
}
