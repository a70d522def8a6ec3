//! Input sets, comparison metrics and tolerances: what `qfold check` and every `--check`
//! report.
//!
//! Metrics per output, accumulated over all samples: max abs error, max rel error (over
//! elements whose reference magnitude exceeds the absolute tolerance), cosine similarity,
//! SQNR `10 log10(sum ref^2 / sum (ref - out)^2)` in dB, and top-1 agreement for
//! classifier-shaped outputs (`[N, C]` with `C >= 2`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use ndarray::{ArrayD, IxDyn};
use protobuf::Message;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::graph::Graph;
use crate::onnx::proto::{tensor_shape_proto::dimension::Value as Dim, type_proto, TensorProto};
use crate::onnx::{ElemType, Model, TensorData};
use crate::runtime::{Runner, Sample};

/// A sample plus, when the data set provides them, the expected outputs.
#[derive(Debug, Clone)]
pub struct Case {
    /// Where it came from (folder or file) for messages.
    pub source: String,
    pub inputs: Sample,
    pub expected: Vec<(String, TensorData)>,
    /// Class labels of the batch rows (from a `labels.npy` beside the inputs), for accuracy.
    pub labels: Option<Vec<i64>>,
}

/// A model input: name, element type and declared dims (`None` for symbolic ones).
pub type DeclaredInput = (String, ElemType, Vec<Option<usize>>);

/// Model inputs: names, element types and declared dims (`None` for symbolic ones).
pub fn declared_inputs(model: &Model) -> Result<Vec<DeclaredInput>> {
    let g = Graph::of_model(model);
    g.real_inputs()
        .into_iter()
        .map(|v| {
            let Some(type_proto::Value::TensorType(t)) =
                v.type_.as_ref().and_then(|t| t.value.as_ref())
            else {
                return Err(Error::input(&v.name, "the input has no tensor type"));
            };
            let ty = ElemType::from_onnx(t.elem_type).ok_or_else(|| {
                Error::input(
                    &v.name,
                    format!(
                        "element type {} is not supported",
                        crate::onnx::tensor::onnx_type_name(t.elem_type)
                    ),
                )
            })?;
            let dims = t
                .shape
                .as_ref()
                .map(|s| {
                    s.dim
                        .iter()
                        .map(|d| match d.value {
                            Some(Dim::DimValue(v)) if v >= 0 => Some(v as usize),
                            _ => None,
                        })
                        .collect()
                })
                .unwrap_or_default();
            Ok((v.name.clone(), ty, dims))
        })
        .collect()
}

/// Reads a serialized TensorProto file (`input_0.pb`).
pub fn read_tensor_pb(path: &Path) -> Result<(String, TensorData)> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let t = TensorProto::parse_from_bytes(&bytes).map_err(|e| Error::Decode {
        what: path.display().to_string(),
        reason: format!("not a TensorProto: {e}"),
    })?;
    let data = TensorData::from_proto(&t).map_err(|e| Error::Decode {
        what: path.display().to_string(),
        reason: e.to_string(),
    })?;
    Ok((t.name.clone(), data))
}

fn numbered_files(dir: &Path, prefix: &str) -> Result<Vec<PathBuf>> {
    let mut found: Vec<(usize, PathBuf)> = Vec::new();
    let rd = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    for entry in rd {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name().to_string_lossy().to_string();
        if let Some(k) = name
            .strip_prefix(prefix)
            .and_then(|r| r.strip_suffix(".pb"))
            .and_then(|k| k.parse::<usize>().ok())
        {
            found.push((k, entry.path()));
        }
    }
    found.sort();
    for (i, (k, p)) in found.iter().enumerate() {
        if *k != i {
            return Err(Error::Usage(format!(
                "{}: expected {prefix}{i}.pb, found {}",
                dir.display(),
                p.display()
            )));
        }
    }
    Ok(found.into_iter().map(|(_, p)| p).collect())
}

/// Names unnamed tensors by position, and checks named ones exist.
fn bind(
    files: Vec<(String, TensorData)>,
    names: &[String],
    what: &str,
    dir: &Path,
) -> Result<Vec<(String, TensorData)>> {
    if files.len() != names.len() {
        return Err(Error::Usage(format!(
            "{}: {} {what} files, the model has {} {what}s",
            dir.display(),
            files.len(),
            names.len()
        )));
    }
    files
        .into_iter()
        .enumerate()
        .map(|(k, (n, t))| {
            if n.is_empty() {
                Ok((names[k].clone(), t))
            } else if names.contains(&n) {
                Ok((n, t))
            } else {
                Err(Error::input(
                    &n,
                    format!("{}: the model has no {what} of this name", dir.display()),
                ))
            }
        })
        .collect()
}

/// Reads one `test_data_set_N` folder.
pub fn read_test_data_set(model: &Model, dir: &Path) -> Result<Case> {
    let g = Graph::of_model(model);
    let in_names: Vec<String> = g.real_inputs().iter().map(|v| v.name.clone()).collect();
    let out_names: Vec<String> = model
        .graph()
        .output
        .iter()
        .map(|v| v.name.clone())
        .collect();
    let inputs = numbered_files(dir, "input_")?
        .iter()
        .map(|p| read_tensor_pb(p))
        .collect::<Result<Vec<_>>>()?;
    if inputs.is_empty() {
        return Err(Error::Usage(format!("{}: no input_0.pb", dir.display())));
    }
    let outputs = numbered_files(dir, "output_")?
        .iter()
        .map(|p| read_tensor_pb(p))
        .collect::<Result<Vec<_>>>()?;
    let expected = if outputs.is_empty() {
        vec![]
    } else {
        bind(outputs, &out_names, "output", dir)?
    };
    let labels_path = dir.join("labels.npy");
    let labels = if labels_path.exists() {
        Some(read_labels(&labels_path)?)
    } else {
        None
    };
    Ok(Case {
        source: dir.display().to_string(),
        inputs: bind(inputs, &in_names, "input", dir)?,
        expected,
        labels,
    })
}

/// Reads integer class labels from a `.npy` file.
pub fn read_labels(path: &Path) -> Result<Vec<i64>> {
    read_npy(path)?.to_i64().ok_or_else(|| Error::Decode {
        what: path.display().to_string(),
        reason: "labels must be integers".into(),
    })
}

/// Reads a data set for calibration or evaluation: a `test_data_set_N` folder or a folder of
/// them (with optional `labels.npy` in each), or a folder of `.npy` / `.npz` files. A `.npy`
/// feeds the model's only input; an `.npz` holds arrays named after the inputs. An array whose
/// rank is the input's declared rank + 1 holds several samples stacked on a new leading axis.
/// A `labels.npy` beside `.npy` files labels their rows in file order.
pub fn read_dataset(model: &Model, dir: &Path) -> Result<Vec<Case>> {
    if dir.join("input_0.pb").exists() || has_test_data_sets(dir) {
        return read_cases(model, dir);
    }
    let decl = declared_inputs(model)?;
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let ext = p.extension().and_then(|e| e.to_str()).unwrap_or("");
            let stem = p.file_stem().and_then(|e| e.to_str()).unwrap_or("");
            (ext == "npy" || ext == "npz") && stem != "labels" && stem != "indices"
        })
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(Error::Usage(format!(
            "{}: no test_data_set_N folder, input_0.pb, .npy or .npz file",
            dir.display()
        )));
    }
    let mut cases = Vec::new();
    for f in &files {
        let arrays: Vec<(String, TensorData)> = if f.extension().is_some_and(|e| e == "npz") {
            read_npz(f)?
        } else {
            if decl.len() != 1 {
                return Err(Error::Usage(format!(
                    "{}: a .npy file feeds a single-input model; this one has {} inputs (use .npz)",
                    f.display(),
                    decl.len()
                )));
            }
            vec![(decl[0].0.clone(), read_npy(f)?)]
        };
        for (name, _, _) in &decl {
            if !arrays.iter().any(|(n, _)| n == name) {
                return Err(Error::input(
                    name,
                    format!("{}: no array for this input", f.display()),
                ));
            }
        }
        let stacked = arrays.iter().all(|(n, t)| {
            decl.iter()
                .find(|(d, _, _)| d == n)
                .is_some_and(|(_, _, dims)| !dims.is_empty() && t.shape().len() == dims.len() + 1)
        });
        if stacked {
            let count = arrays[0].1.shape()[0];
            for k in 0..count {
                let sample = arrays
                    .iter()
                    .map(|(n, t)| (n.clone(), index_axis0(t, k)))
                    .collect();
                cases.push(Case {
                    source: format!("{}[{k}]", f.display()),
                    inputs: sample,
                    expected: vec![],
                    labels: None,
                });
            }
        } else {
            cases.push(Case {
                source: f.display().to_string(),
                inputs: arrays,
                expected: vec![],
                labels: None,
            });
        }
    }
    let labels_path = dir.join("labels.npy");
    if labels_path.exists() {
        let labels = read_labels(&labels_path)?;
        let mut at = 0;
        for c in &mut cases {
            let rows = c
                .inputs
                .first()
                .map_or(0, |(_, t)| t.shape().first().copied().unwrap_or(1));
            if at + rows > labels.len() {
                return Err(Error::Usage(format!(
                    "{}: {} labels for more rows than that",
                    labels_path.display(),
                    labels.len()
                )));
            }
            c.labels = Some(labels[at..at + rows].to_vec());
            at += rows;
        }
    }
    Ok(cases)
}

fn has_test_data_sets(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|rd| {
        rd.filter_map(|e| e.ok()).any(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("test_data_set_")
        })
    })
}

fn index_axis0(t: &TensorData, k: usize) -> TensorData {
    macro_rules! pick {
        ($v:ident, $a:expr) => {
            TensorData::$v($a.index_axis(ndarray::Axis(0), k).to_owned())
        };
    }
    match t {
        TensorData::F32(a) => pick!(F32, a),
        TensorData::F64(a) => pick!(F64, a),
        TensorData::F16(a) => pick!(F16, a),
        TensorData::BF16(a) => pick!(BF16, a),
        TensorData::I8(a) => pick!(I8, a),
        TensorData::U8(a) => pick!(U8, a),
        TensorData::I16(a) => pick!(I16, a),
        TensorData::U16(a) => pick!(U16, a),
        TensorData::I32(a) => pick!(I32, a),
        TensorData::I64(a) => pick!(I64, a),
        TensorData::U32(a) => pick!(U32, a),
        TensorData::U64(a) => pick!(U64, a),
        TensorData::Bool(a) => pick!(Bool, a),
    }
}

fn read_npz(path: &Path) -> Result<Vec<(String, TensorData)>> {
    use ndarray_npy::NpzReader;
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let bad = |e: String| Error::Decode {
        what: path.display().to_string(),
        reason: e,
    };
    let mut npz = NpzReader::new(file).map_err(|e| bad(e.to_string()))?;
    let names = npz.names().map_err(|e| bad(e.to_string()))?;
    let mut out = Vec::new();
    for name in names {
        macro_rules! try_type {
            ($($ty:ty => $v:ident),*) => {{
                let mut found = None;
                $(
                    if found.is_none() {
                        if let Ok(a) = npz.by_name::<ndarray::OwnedRepr<$ty>, IxDyn>(&name) {
                            found = Some(TensorData::$v(a));
                        }
                    }
                )*
                found
            }};
        }
        let t = try_type!(f32 => F32, f64 => F64, i64 => I64, i32 => I32, u8 => U8, i8 => I8, bool => Bool)
            .ok_or_else(|| bad(format!("array '{name}' is not of a supported numeric type")))?;
        out.push((name.trim_end_matches(".npy").to_string(), t));
    }
    Ok(out)
}

/// Top-1 accuracy of the first output against the cases' labels: (correct, total).
pub fn accuracy(outputs: &[TensorData], labels: &[i64]) -> (usize, usize) {
    let Some(logits) = outputs.first() else {
        return (0, 0);
    };
    let l = logits.to_f64();
    if l.ndim() != 2 || l.shape()[0] != labels.len() {
        return (0, 0);
    }
    let correct = l
        .outer_iter()
        .zip(labels)
        .filter(|(row, &y)| argmax(row.iter().copied()) as i64 == y)
        .count();
    (correct, labels.len())
}

fn read_npy(path: &Path) -> Result<TensorData> {
    use ndarray_npy::ReadNpyExt;
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    macro_rules! try_type {
        ($($ty:ty => $v:ident),*) => {$(
            if let Ok(a) = ArrayD::<$ty>::read_npy(bytes.as_slice()) {
                return Ok(TensorData::$v(a));
            }
        )*};
    }
    try_type!(f32 => F32, f64 => F64, i64 => I64, i32 => I32, u8 => U8, i8 => I8, i16 => I16, u16 => U16, u32 => U32, u64 => U64, bool => Bool);
    Err(Error::Decode {
        what: path.display().to_string(),
        reason: "not a .npy file of a supported numeric type".into(),
    })
}

/// Reads `.npy` files as one sample: `name=path` pairs, or plain paths taken in input order.
pub fn read_npy_sample(model: &Model, specs: &[String]) -> Result<Case> {
    let g = Graph::of_model(model);
    let names: Vec<String> = g.real_inputs().iter().map(|v| v.name.clone()).collect();
    let mut sample = Vec::new();
    for (k, spec) in specs.iter().enumerate() {
        let (name, path) = match spec.split_once('=') {
            Some((n, p)) if names.iter().any(|x| x == n) => (n.to_string(), p),
            _ => (
                names.get(k).cloned().ok_or_else(|| {
                    Error::Usage(format!("{spec}: the model has only {} inputs", names.len()))
                })?,
                spec.as_str(),
            ),
        };
        sample.push((name, read_npy(Path::new(path))?));
    }
    Ok(Case {
        source: specs.join(","),
        inputs: sample,
        expected: vec![],
        labels: None,
    })
}

/// Reads every case under `dir`: the folder itself if it holds `input_0.pb`, else each of its
/// `test_data_set_*` subfolders in numeric order.
pub fn read_cases(model: &Model, dir: &Path) -> Result<Vec<Case>> {
    if !dir.is_dir() {
        return Err(Error::io(
            dir,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such folder"),
        ));
    }
    if dir.join("input_0.pb").exists() {
        return Ok(vec![read_test_data_set(model, dir)?]);
    }
    let mut sets: Vec<(usize, PathBuf)> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().to_string();
            n.strip_prefix("test_data_set_")
                .and_then(|k| k.parse().ok())
                .map(|k| (k, e.path()))
        })
        .collect();
    sets.sort();
    if sets.is_empty() {
        return Err(Error::Usage(format!(
            "{}: no input_0.pb and no test_data_set_N folder",
            dir.display()
        )));
    }
    sets.iter()
        .map(|(_, p)| read_test_data_set(model, p))
        .collect()
}

/// Parses `name:1,3,224,224`.
pub fn parse_input_shape(spec: &str) -> Result<(String, Vec<usize>)> {
    let (name, dims) = spec
        .rsplit_once(':')
        .ok_or_else(|| Error::Usage(format!("--input-shape '{spec}': expected name:d1,d2,...")))?;
    let dims = dims
        .split(',')
        .map(|d| d.trim().parse::<usize>())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|_| {
            Error::Usage(format!(
                "--input-shape '{spec}': dims must be non-negative integers"
            ))
        })?;
    Ok((name.to_string(), dims))
}

/// The most elements a random input may have (2^28: 1 GiB of f32); larger shapes are refused
/// instead of exhausting memory.
pub const MAX_RANDOM_ELEMENTS: usize = 1 << 28;

/// Parses every `--input-shape name:d1,d2,...`.
pub fn parse_input_shapes(specs: &[String]) -> Result<HashMap<String, Vec<usize>>> {
    specs.iter().map(|s| parse_input_shape(s)).collect()
}

/// The cases in `dir` ([`read_dataset`]), or `count` random ones from the declared shapes.
pub fn dataset_or_random(
    model: &Model,
    dir: Option<&Path>,
    count: usize,
    seed: u64,
    shapes: &[String],
) -> Result<Vec<Case>> {
    match dir {
        Some(d) => read_dataset(model, d),
        None => random_cases(model, count, seed, &parse_input_shapes(shapes)?),
    }
}

/// `count` random samples from the declared input shapes. Symbolic dims take their value from
/// `shapes` (whole shapes by input name) or default to 1. Floats are standard normal, integers
/// uniform in [0, 10), booleans fair coins. Inputs over [`MAX_RANDOM_ELEMENTS`] are an error.
pub fn random_cases(
    model: &Model,
    count: usize,
    seed: u64,
    shapes: &HashMap<String, Vec<usize>>,
) -> Result<Vec<Case>> {
    let decl = declared_inputs(model)?;
    for name in shapes.keys() {
        if !decl.iter().any(|(n, _, _)| n == name) {
            return Err(Error::input(
                name,
                "--input-shape names an input the model does not have",
            ));
        }
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut cases = Vec::with_capacity(count);
    for i in 0..count {
        let mut sample = Vec::new();
        for (name, ty, dims) in &decl {
            let shape: Vec<usize> = match shapes.get(name) {
                Some(s) => {
                    if s.len() != dims.len() && !dims.is_empty() {
                        return Err(Error::input(
                            name,
                            format!(
                                "--input-shape gives {} dims, the model declares {}",
                                s.len(),
                                dims.len()
                            ),
                        ));
                    }
                    s.clone()
                }
                None => dims.iter().map(|d| d.unwrap_or(1)).collect(),
            };
            let n = shape
                .iter()
                .try_fold(1usize, |n, &d| n.checked_mul(d))
                .filter(|&n| n <= MAX_RANDOM_ELEMENTS)
                .ok_or_else(|| {
                    Error::input(
                        name,
                        format!(
                            "shape {shape:?} is too large for random inputs \
                             (more than {MAX_RANDOM_ELEMENTS} elements)"
                        ),
                    )
                })?;
            let normal = |rng: &mut rand::rngs::StdRng| {
                // Box-Muller.
                let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
                let u2: f64 = rng.random();
                (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
            };
            let t = if ty.is_float() {
                let v: Vec<f64> = (0..n).map(|_| normal(&mut rng)).collect();
                TensorData::from_f64(
                    ArrayD::from_shape_vec(IxDyn(&shape), v).expect("n elements"),
                    *ty,
                )?
            } else {
                let v: Vec<i64> = (0..n).map(|_| rng.random_range(0..10)).collect();
                let a = ArrayD::from_shape_vec(IxDyn(&shape), v).expect("n elements");
                match ty {
                    ElemType::I64 => TensorData::I64(a),
                    ElemType::I32 => TensorData::I32(a.mapv(|x| x as i32)),
                    ElemType::I16 => TensorData::I16(a.mapv(|x| x as i16)),
                    ElemType::U16 => TensorData::U16(a.mapv(|x| x as u16)),
                    ElemType::I8 => TensorData::I8(a.mapv(|x| x as i8)),
                    ElemType::U8 => TensorData::U8(a.mapv(|x| x as u8)),
                    ElemType::U32 => TensorData::U32(a.mapv(|x| x as u32)),
                    ElemType::U64 => TensorData::U64(a.mapv(|x| x as u64)),
                    ElemType::Bool => TensorData::Bool(a.mapv(|x| x % 2 == 1)),
                    _ => unreachable!("float types handled above"),
                }
            };
            sample.push((name.clone(), t));
        }
        cases.push(Case {
            source: format!("random sample {i} (seed {seed})"),
            inputs: sample,
            expected: vec![],
            labels: None,
        });
    }
    Ok(cases)
}

/// What makes a comparison pass.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Criterion {
    /// Every element within `atol * max(1, peak) + rtol * |reference|`, where `peak` is the
    /// largest magnitude in that output of the sample: numpy's allclose with the absolute term
    /// following the output's scale, so float noise on a network whose outputs are in the
    /// hundreds is judged like the same noise on outputs near one.
    Tolerance { atol: f64, rtol: f64 },
    /// SQNR of every output at least this many dB.
    MinSqnr { db: f64 },
}

/// Named tolerance levels.
pub mod tolerance {
    use super::Criterion;
    /// Bit-identical.
    pub const EXACT: Criterion = Criterion::Tolerance {
        atol: 0.0,
        rtol: 0.0,
    };
    /// Float rewrites (fusion): 1e-5 absolute, 1e-4 relative.
    pub const FLOAT: Criterion = Criterion::Tolerance {
        atol: 1e-5,
        rtol: 1e-4,
    };
    /// Float16 models: folded weights rounded to half precision move outputs by a few ulps of
    /// the operands, so 1e-2 absolute and relative.
    pub const HALF: Criterion = Criterion::Tolerance {
        atol: 1e-2,
        rtol: 1e-2,
    };
    /// Loose: runtimes with different accumulation order on deep models.
    pub const LOOSE: Criterion = Criterion::Tolerance {
        atol: 1e-3,
        rtol: 1e-2,
    };

    /// The level for a float rewrite of `model`: half when any graph input or output is 16-bit
    /// floating point, float otherwise.
    pub fn for_model(model: &crate::onnx::Model) -> Criterion {
        use crate::onnx::proto::type_proto;
        let g = model.graph();
        let half = g.input.iter().chain(&g.output).any(|v| {
            matches!(
                v.type_.as_ref().and_then(|t| t.value.as_ref()),
                Some(type_proto::Value::TensorType(t)) if t.elem_type == 10 || t.elem_type == 16
            )
        });
        if half {
            HALF
        } else {
            FLOAT
        }
    }

    /// A level by name: exact, float, half, loose.
    pub fn by_name(name: &str) -> Option<Criterion> {
        Some(match name {
            "exact" => EXACT,
            "float" => FLOAT,
            "half" => HALF,
            "loose" => LOOSE,
            _ => return None,
        })
    }
}

/// Running statistics of one output over many samples.
#[derive(Debug, Clone, Default)]
struct Acc {
    elements: usize,
    sum_ref2: f64,
    sum_out2: f64,
    sum_err2: f64,
    dot: f64,
    max_abs: f64,
    max_rel: f64,
    violations: usize,
    top1_rows: usize,
    top1_agree: usize,
    mismatch: Option<String>,
}

/// Metrics of one output.
#[derive(Debug, Clone, Serialize)]
pub struct OutputMetrics {
    pub name: String,
    pub elements: usize,
    pub max_abs: f64,
    pub max_rel: f64,
    pub cosine: f64,
    /// `None` when the outputs are identical (infinite SQNR).
    pub sqnr_db: Option<f64>,
    /// Fraction of rows whose argmax agrees, for `[N, C]` outputs.
    pub top1: Option<f64>,
    /// Elements outside the tolerance (for a tolerance criterion).
    pub violations: usize,
    /// Shape or type mismatch, if any.
    pub mismatch: Option<String>,
    pub passed: bool,
}

/// The result of comparing outputs over a set of samples.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    pub samples: usize,
    pub criterion: Criterion,
    pub outputs: Vec<OutputMetrics>,
    pub passed: bool,
}

fn argmax(row: impl Iterator<Item = f64>) -> usize {
    let mut best = (0, f64::NEG_INFINITY);
    for (i, v) in row.enumerate() {
        if v > best.1 {
            best = (i, v);
        }
    }
    best.0
}

impl Acc {
    fn add(&mut self, reference: &TensorData, actual: &TensorData, atol: f64, rtol: f64) {
        if reference.shape() != actual.shape() {
            self.mismatch = Some(format!(
                "shape {:?} vs reference {:?}",
                actual.shape(),
                reference.shape()
            ));
            return;
        }
        let r = reference.to_f64();
        let a = actual.to_f64();
        let peak = r.iter().fold(
            1.0f64,
            |m, v| if v.is_finite() { m.max(v.abs()) } else { m },
        );
        let atol = atol * peak;
        for (&x, &y) in r.iter().zip(a.iter()) {
            let err = (x - y).abs();
            let err = if err.is_nan() {
                if x.is_nan() && y.is_nan() {
                    0.0
                } else {
                    f64::INFINITY
                }
            } else if x == y {
                0.0
            } else {
                err
            };
            self.elements += 1;
            self.sum_ref2 += x * x;
            self.sum_out2 += y * y;
            self.sum_err2 += err * err;
            self.dot += x * y;
            self.max_abs = self.max_abs.max(err);
            if x.abs() > atol.max(f64::MIN_POSITIVE) {
                self.max_rel = self.max_rel.max(err / x.abs());
            }
            if err > atol + rtol * x.abs() {
                self.violations += 1;
            }
        }
        let shape = r.shape();
        if shape.len() == 2 && shape[1] >= 2 {
            for (rr, aa) in r.outer_iter().zip(a.outer_iter()) {
                self.top1_rows += 1;
                if argmax(rr.iter().copied()) == argmax(aa.iter().copied()) {
                    self.top1_agree += 1;
                }
            }
        }
    }

    fn finish(self, name: &str, criterion: Criterion) -> OutputMetrics {
        let sqnr_db = if self.sum_err2 == 0.0 {
            None
        } else {
            Some(10.0 * (self.sum_ref2 / self.sum_err2).log10())
        };
        let norm = (self.sum_ref2 * self.sum_out2).sqrt();
        let cosine = if norm == 0.0 {
            if self.sum_err2 == 0.0 {
                1.0
            } else {
                0.0
            }
        } else {
            self.dot / norm
        };
        let passed = self.mismatch.is_none()
            && match criterion {
                Criterion::Tolerance { .. } => self.violations == 0,
                Criterion::MinSqnr { db } => sqnr_db.is_none_or(|s| s >= db),
            };
        OutputMetrics {
            name: name.to_string(),
            elements: self.elements,
            max_abs: self.max_abs,
            max_rel: self.max_rel,
            cosine,
            sqnr_db,
            top1: (self.top1_rows > 0).then(|| self.top1_agree as f64 / self.top1_rows as f64),
            violations: self.violations,
            mismatch: self.mismatch,
            passed,
        }
    }
}

/// Accumulates output comparisons over samples.
#[derive(Debug, Clone)]
pub struct Comparer {
    criterion: Criterion,
    names: Vec<String>,
    accs: Vec<Acc>,
    samples: usize,
}

impl Comparer {
    /// A comparer for outputs named `names`.
    pub fn new(names: &[String], criterion: Criterion) -> Comparer {
        Comparer {
            criterion,
            names: names.to_vec(),
            accs: vec![Acc::default(); names.len()],
            samples: 0,
        }
    }

    /// Adds one sample's outputs (same order as the names).
    pub fn add(&mut self, reference: &[TensorData], actual: &[TensorData]) {
        let (atol, rtol) = match self.criterion {
            Criterion::Tolerance { atol, rtol } => (atol, rtol),
            Criterion::MinSqnr { .. } => (0.0, 0.0),
        };
        for ((acc, r), a) in self.accs.iter_mut().zip(reference).zip(actual) {
            acc.add(r, a, atol, rtol);
        }
        self.samples += 1;
    }

    /// The metrics.
    pub fn finish(self) -> Comparison {
        let criterion = self.criterion;
        let outputs: Vec<OutputMetrics> = self
            .accs
            .into_iter()
            .zip(&self.names)
            .map(|(a, n)| a.finish(n, criterion))
            .collect();
        Comparison {
            samples: self.samples,
            criterion,
            passed: outputs.iter().all(|o| o.passed),
            outputs,
        }
    }
}

/// Runs `a` and `b` in tract on every case and compares `b`'s outputs to `a`'s.
pub fn compare_models(
    a: &Model,
    b: &Model,
    cases: &[Case],
    criterion: Criterion,
) -> Result<Comparison> {
    let names: Vec<String> = a.graph().output.iter().map(|o| o.name.clone()).collect();
    let names_b: Vec<String> = b.graph().output.iter().map(|o| o.name.clone()).collect();
    if names != names_b {
        return Err(Error::Usage(format!(
            "the models have different outputs: {names:?} vs {names_b:?}"
        )));
    }
    let first = cases
        .first()
        .ok_or_else(|| Error::Usage("no input samples to compare on".into()))?;
    let mut ra = Runner::new(a, &first.inputs, &[])?;
    let mut rb = Runner::new(b, &first.inputs, &[])?;
    let mut cmp = Comparer::new(&names, criterion);
    let mut shape_of = shapes(&first.inputs);
    for c in cases {
        if shapes(&c.inputs) != shape_of {
            ra = Runner::new(a, &c.inputs, &[])?;
            rb = Runner::new(b, &c.inputs, &[])?;
            shape_of = shapes(&c.inputs);
        }
        let oa = ra.run(&c.inputs)?;
        let ob = rb.run(&c.inputs)?;
        cmp.add(&oa, &ob);
    }
    Ok(cmp.finish())
}

fn shapes(s: &Sample) -> Vec<(String, ElemType, Vec<usize>)> {
    s.iter()
        .map(|(n, t)| (n.clone(), t.elem_type(), t.shape().to_vec()))
        .collect()
}

/// Runs `model` in tract on every case and compares with the cases' expected outputs.
pub fn compare_expected(model: &Model, cases: &[Case], criterion: Criterion) -> Result<Comparison> {
    let names: Vec<String> = model
        .graph()
        .output
        .iter()
        .map(|o| o.name.clone())
        .collect();
    let first = cases
        .first()
        .ok_or_else(|| Error::Usage("no input samples to compare on".into()))?;
    let mut runner = Runner::new(model, &first.inputs, &[])?;
    let mut shape_of = shapes(&first.inputs);
    let mut cmp = Comparer::new(&names, criterion);
    for c in cases {
        if c.expected.is_empty() {
            return Err(Error::Usage(format!(
                "{}: no expected outputs (output_K.pb)",
                c.source
            )));
        }
        if shapes(&c.inputs) != shape_of {
            runner = Runner::new(model, &c.inputs, &[])?;
            shape_of = shapes(&c.inputs);
        }
        let out = runner.run(&c.inputs)?;
        let expected: Vec<TensorData> = names
            .iter()
            .map(|n| {
                c.expected
                    .iter()
                    .find(|(m, _)| m == n)
                    .map(|(_, t)| t.clone())
                    .ok_or_else(|| {
                        Error::Usage(format!("{}: no expected value for output '{n}'", c.source))
                    })
            })
            .collect::<Result<_>>()?;
        cmp.add(&expected, &out);
    }
    Ok(cmp.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    fn t(v: ndarray::Array2<f32>) -> TensorData {
        TensorData::F32(v.into_dyn())
    }

    #[test]
    fn metrics_by_hand() {
        let r = t(array![[3.0, 4.0], [1.0, 0.0]]);
        let a = t(array![[3.0, 4.5], [1.0, 0.0]]);
        let mut c = Comparer::new(&["y".into()], tolerance::FLOAT);
        c.add(&[r], &[a]);
        let m = c.finish();
        let o = &m.outputs[0];
        assert_eq!(o.max_abs, 0.5);
        assert!((o.max_rel - 0.125).abs() < 1e-12);
        // sum ref^2 = 26, sum err^2 = 0.25
        assert!((o.sqnr_db.unwrap() - 10.0 * (26.0f64 / 0.25).log10()).abs() < 1e-9);
        let cos = (9.0 + 18.0 + 1.0) / (26.0f64.sqrt() * (9.0f64 + 20.25 + 1.0).sqrt());
        assert!((o.cosine - cos).abs() < 1e-12);
        // row 0 argmax 1 vs 1, row 1 argmax 0 vs 0
        assert_eq!(o.top1, Some(1.0));
        assert_eq!(o.violations, 1);
        assert!(!m.passed);
    }

    #[test]
    fn identical_is_infinite_sqnr_and_nan_fails() {
        let r = t(array![[1.0, 2.0]]);
        let mut c = Comparer::new(&["y".into()], tolerance::EXACT);
        c.add(std::slice::from_ref(&r), std::slice::from_ref(&r));
        let m = c.finish();
        assert!(m.passed && m.outputs[0].sqnr_db.is_none());
        let mut c = Comparer::new(&["y".into()], Criterion::MinSqnr { db: 10.0 });
        c.add(&[r], &[t(array![[1.0, f32::NAN]])]);
        assert!(!c.finish().passed);
    }

    #[test]
    fn shape_mismatch_fails() {
        let mut c = Comparer::new(&["y".into()], tolerance::LOOSE);
        c.add(&[t(array![[1.0, 2.0]])], &[t(array![[1.0], [2.0]])]);
        let m = c.finish();
        assert!(!m.passed && m.outputs[0].mismatch.is_some());
    }

    #[test]
    fn input_shape_parsing() {
        assert_eq!(
            parse_input_shape("x:1,3,224,224").unwrap(),
            ("x".into(), vec![1, 3, 224, 224])
        );
        assert!(parse_input_shape("x").is_err());
        assert!(parse_input_shape("x:1,-3").is_err());
    }
}
