//! Data sets: `test_data_set_N` folders, `.npy` / `.npz` files and random inputs from the
//! declared shapes.
//!
//! Files are hostile input: each must be a regular file (FIFOs and devices are refused without
//! blocking), files found in a data folder must stay inside it once symbolic links are
//! resolved, a `.npy` header's shape is checked against the bytes the file really holds
//! before anything is allocated, and random inputs are bounded by [`MAX_RANDOM_SAMPLES`],
//! [`MAX_RANDOM_ELEMENTS`] and [`MAX_RANDOM_BYTES`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use ndarray::{ArrayD, IxDyn};
use protobuf::Message;
use rand::{Rng, SeedableRng};

use crate::error::{Error, Result};
use crate::graph::Graph;
use crate::onnx::proto::{tensor_shape_proto::dimension::Value as Dim, type_proto, TensorProto};
use crate::onnx::{ElemType, Model, TensorData};
use crate::runtime::Sample;

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

/// Reads a file of a data set: a regular file, and inside `root` (canonical) when given.
fn read_data_file(path: &Path, root: Option<&Path>) -> Result<Vec<u8>> {
    if let Some(root) = root {
        crate::files::confined(root, path).map_err(Error::Usage)?;
    }
    crate::files::read_regular(path, u64::MAX)
}

/// The canonical form of a data folder, files in it must stay inside.
pub(crate) fn data_root(dir: &Path) -> Result<PathBuf> {
    crate::files::canonical_dir(dir).map_err(|e| Error::io(dir, e))
}

/// Reads a serialized TensorProto file (`input_0.pb`).
pub fn read_tensor_pb(path: &Path) -> Result<(String, TensorData)> {
    read_tensor_pb_in(path, None)
}

fn read_tensor_pb_in(path: &Path, root: Option<&Path>) -> Result<(String, TensorData)> {
    let bytes = read_data_file(path, root)?;
    let t = TensorProto::parse_from_bytes(&bytes).map_err(|e| {
        super::source::bad_data(
            &path.display().to_string(),
            format!("not a TensorProto: {e}"),
        )
    })?;
    let data = TensorData::from_proto(&t)
        .map_err(|e| super::source::bad_data(&path.display().to_string(), e.to_string()))?;
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
    let (in_names, out_names) = io_names(model);
    read_test_data_set_named(&in_names, &out_names, dir)
}

/// The names of the model's real inputs and of its outputs.
pub(crate) fn io_names(model: &Model) -> (Vec<String>, Vec<String>) {
    let g = Graph::of_model(model);
    let in_names: Vec<String> = g.real_inputs().iter().map(|v| v.name.clone()).collect();
    let out_names: Vec<String> = model
        .graph()
        .output
        .iter()
        .map(|v| v.name.clone())
        .collect();
    (in_names, out_names)
}

/// The names of the declared dims of each real input (empty for unnamed or fixed ones).
pub(crate) fn declared_dim_names(model: &Model) -> HashMap<String, Vec<String>> {
    let g = Graph::of_model(model);
    g.real_inputs()
        .into_iter()
        .map(|v| {
            let names = match v.type_.as_ref().and_then(|t| t.value.as_ref()) {
                Some(type_proto::Value::TensorType(t)) => t
                    .shape
                    .as_ref()
                    .map(|s| {
                        s.dim
                            .iter()
                            .map(|d| match &d.value {
                                Some(Dim::DimParam(p)) => p.clone(),
                                _ => String::new(),
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
                _ => vec![],
            };
            (v.name.clone(), names)
        })
        .collect()
}

/// Reads one `test_data_set_N` folder for a model with these input and output names.
pub(crate) fn read_test_data_set_named(
    in_names: &[String],
    out_names: &[String],
    dir: &Path,
) -> Result<Case> {
    let root = data_root(dir)?;
    let inputs = numbered_files(dir, "input_")?
        .iter()
        .map(|p| read_tensor_pb_in(p, Some(&root)))
        .collect::<Result<Vec<_>>>()?;
    if inputs.is_empty() {
        return Err(Error::Usage(format!("{}: no input_0.pb", dir.display())));
    }
    let outputs = numbered_files(dir, "output_")?
        .iter()
        .map(|p| read_tensor_pb_in(p, Some(&root)))
        .collect::<Result<Vec<_>>>()?;
    let expected = if outputs.is_empty() {
        vec![]
    } else {
        bind(outputs, out_names, "output", dir)?
    };
    let labels_path = dir.join("labels.npy");
    let labels = if labels_path.exists() {
        Some(read_labels_in(&labels_path, Some(&root))?)
    } else {
        None
    };
    Ok(Case {
        source: dir.display().to_string(),
        inputs: bind(inputs, in_names, "input", dir)?,
        expected,
        labels,
    })
}

/// Reads integer class labels from a `.npy` file.
pub fn read_labels(path: &Path) -> Result<Vec<i64>> {
    read_labels_in(path, None)
}

pub(crate) fn read_labels_in(path: &Path, root: Option<&Path>) -> Result<Vec<i64>> {
    read_npy(path, root)?.to_i64().ok_or_else(|| {
        super::source::bad_data(
            &path.display().to_string(),
            "labels must be integers (an int64 or int32 array, one label per row)",
        )
    })
}

/// Reads a whole data set into memory: every sample [`super::open_data`] finds in `dir` (a
/// folder or a single file), with images taken at the model's declared size. Prefer
/// [`super::open_data`], which reads samples as they are needed.
pub fn read_dataset(model: &Model, dir: &Path) -> Result<Vec<Case>> {
    let source = super::source::open_data(model, dir, &super::image::Preprocess::default())?;
    super::source::collect(source.as_ref())
}

/// Labels the rows of `cases` in order with `labels`, for accuracy; `what` names the labels
/// in messages. Each case takes as many labels as its first input has rows (axis 0).
pub fn label_rows(cases: &mut [Case], labels: &[i64], what: &str) -> Result<()> {
    let mut at = 0;
    for c in cases.iter_mut() {
        let rows = c
            .inputs
            .first()
            .map_or(0, |(_, t)| t.shape().first().copied().unwrap_or(1));
        if at + rows > labels.len() {
            return Err(Error::Usage(format!(
                "{what}: {} labels for more rows than that",
                labels.len()
            )));
        }
        c.labels = Some(labels[at..at + rows].to_vec());
        at += rows;
    }
    Ok(())
}

/// Samples from arrays held in memory (one array per model input, by name): arrays one rank
/// above the input's declared rank hold samples stacked on a new leading axis, one sample
/// each; otherwise, with `batch`, axis 0 holds the samples and they are grouped `batch` rows
/// per run of the model (or as many as a fixed declared first dim says), and without it the
/// arrays are one sample. `source` names them in
/// messages.
pub fn cases_from_arrays(
    model: &Model,
    arrays: Sample,
    source: &str,
    batch: Option<usize>,
) -> Result<Vec<Case>> {
    let decl = declared_inputs(model)?;
    for (name, _) in &arrays {
        if !decl.iter().any(|(d, _, _)| d == name) {
            return Err(Error::input(
                name,
                format!("{source}: the model has no input of this name"),
            ));
        }
    }
    for (name, _, _) in &decl {
        if !arrays.iter().any(|(n, _)| n == name) {
            return Err(Error::input(
                name,
                format!("{source}: no array for this input"),
            ));
        }
    }
    split_samples(&decl, arrays, source, batch)
}

/// See [`cases_from_arrays`]; every declared input is known to have an array.
fn split_samples(
    decl: &[DeclaredInput],
    arrays: Sample,
    source: &str,
    batch: Option<usize>,
) -> Result<Vec<Case>> {
    let stacked = arrays.iter().all(|(n, t)| {
        decl.iter()
            .find(|(d, _, _)| d == n)
            .is_some_and(|(_, _, dims)| !dims.is_empty() && t.shape().len() == dims.len() + 1)
    });
    let rows = |t: &TensorData| t.shape().first().copied();
    if stacked {
        let count = arrays[0].1.shape()[0];
        if let Some((n, _)) = arrays.iter().find(|(_, t)| rows(t) != Some(count)) {
            return Err(Error::input(
                n,
                format!("{source}: stacked arrays hold different numbers of samples"),
            ));
        }
        return Ok((0..count)
            .map(|k| Case {
                source: format!("{source}[{k}]"),
                inputs: arrays
                    .iter()
                    .map(|(n, t)| (n.clone(), index_axis0(t, k)))
                    .collect(),
                expected: vec![],
                labels: None,
            })
            .collect());
    }
    let Some(batch) = batch else {
        return Ok(vec![Case {
            source: source.to_string(),
            inputs: arrays,
            expected: vec![],
            labels: None,
        }]);
    };
    if batch == 0 {
        return Err(Error::Usage(format!("{source}: a batch size of 0")));
    }
    let count = arrays.first().and_then(|(_, t)| rows(t)).unwrap_or(0);
    if let Some((n, _)) = arrays.iter().find(|(_, t)| rows(t) != Some(count)) {
        return Err(Error::input(
            n,
            format!(
                "{source}: the arrays' first axes (the samples) differ in length, or one is a scalar"
            ),
        ));
    }
    // A first dim the model fixes is the batch, whatever was asked.
    let fixed = arrays.iter().find_map(|(n, t)| {
        decl.iter()
            .find(|(d, _, dims)| d == n && dims.len() == t.shape().len())
            .and_then(|(_, _, dims)| dims.first().copied().flatten())
            .map(|d| (n, d))
    });
    let batch = match fixed {
        Some((n, d)) if d == 0 || !count.is_multiple_of(d) => {
            return Err(Error::input(
                n,
                format!("{source}: {count} rows do not split into batches of {d}, the input's declared first dim"),
            ))
        }
        Some((_, d)) => d,
        None => batch,
    };
    Ok((0..count)
        .step_by(batch)
        .map(|k| {
            let end = (k + batch).min(count);
            Case {
                source: format!("{source}[{k}:{end}]"),
                inputs: arrays
                    .iter()
                    .map(|(n, t)| (n.clone(), slice_axis0(t, k, end)))
                    .collect(),
                expected: vec![],
                labels: None,
            }
        })
        .collect())
}

pub(crate) fn has_test_data_sets(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|rd| {
        rd.filter_map(|e| e.ok()).any(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("test_data_set_")
        })
    })
}

pub(crate) fn slice_axis0(t: &TensorData, from: usize, to: usize) -> TensorData {
    macro_rules! pick {
        ($v:ident, $a:expr) => {
            TensorData::$v(
                $a.slice_axis(ndarray::Axis(0), ndarray::Slice::from(from..to))
                    .to_owned(),
            )
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

/// The most bytes an `.npz` entry is inflated to (4 GiB): compressed arrays are held in
/// memory.
pub const MAX_NPZ_INFLATED: u64 = 1 << 32;

/// The arrays of an `.npz` file (a zip of `.npy` files), each checked like a `.npy` file.
/// An entry is decompressed into memory before its header is trusted, so what is allocated is
/// bounded by the data really there, never by what a header or the zip directory declares.
pub(crate) fn read_npz(path: &Path, root: Option<&Path>) -> Result<Vec<(String, TensorData)>> {
    use std::io::Read;
    let bytes = read_data_file(path, root)?;
    let bad = |e: String| super::source::bad_data(&path.display().to_string(), e);
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(bytes.as_slice()))
        .map_err(|e| bad(format!("not an .npz (zip) file: {e}")))?;
    let mut out = Vec::new();
    for i in 0..zip.len() {
        let mut entry = zip.by_index(i).map_err(|e| bad(e.to_string()))?;
        if entry.is_dir() {
            continue;
        }
        let name = entry.name().to_string();
        // A compressed entry may expand far beyond the file: read at most what deflate can
        // produce from its compressed bytes (1032:1), within MAX_NPZ_INFLATED.
        let cap = if entry.compression() == zip::CompressionMethod::Stored {
            entry.compressed_size()
        } else {
            entry
                .compressed_size()
                .saturating_mul(1032)
                .min(MAX_NPZ_INFLATED)
        };
        if entry.size() > cap {
            return Err(bad(format!(
                "array '{name}' declares {} bytes, more than the {cap} bytes qfold inflates from \
                 it (MAX_NPZ_INFLATED): save it uncompressed (np.savez), which is read one \
                 sample at a time",
                entry.size()
            )));
        }
        let mut data = Vec::new();
        let declared = entry.size();
        (&mut entry)
            .take(declared)
            .read_to_end(&mut data)
            .map_err(|e| bad(format!("array '{name}': {e}")))?;
        let what = format!("{}: array '{name}'", path.display());
        let t = npy_array(&data, &what)?;
        out.push((name.trim_end_matches(".npy").to_string(), t));
    }
    Ok(out)
}

/// Reads a `.npy` file (inside `root` when given), streaming: the header is read and checked
/// against the file's size first, then the array is read straight from the file.
fn read_npy(path: &Path, root: Option<&Path>) -> Result<TensorData> {
    use std::io::{BufReader, Seek, SeekFrom};
    if let Some(root) = root {
        crate::files::confined(root, path).map_err(Error::Usage)?;
    }
    let what = path.display().to_string();
    let (file, len) = crate::files::open_regular(path).map_err(|e| Error::io(path, e))?;
    let mut r = BufReader::new(file);
    let header = npy_header(&mut r, &what)?;
    let start = r.stream_position().map_err(|e| Error::io(path, e))?;
    let kind = npy_kind(&header, len.saturating_sub(start), &what)?;
    r.seek(SeekFrom::Start(0)).map_err(|e| Error::io(path, e))?;
    npy_read(r, kind, &what)
}

/// The header of an `.npy` stream.
pub(crate) fn npy_header(
    r: &mut impl std::io::Read,
    what: &str,
) -> Result<ndarray_npy::npy::header::Header> {
    ndarray_npy::npy::header::Header::from_reader(r)
        .map_err(|e| super::source::bad_data(what, format!("bad .npy header: {e}")))
}

/// The element kind of an `.npy` array (`f4`, `i8`, `b1`...), once its shape times its element
/// size is known to fit in the `held` bytes that follow the header: nothing the header
/// declares is allocated before this check.
pub(crate) fn npy_kind(
    header: &ndarray_npy::npy::header::Header,
    held: u64,
    what: &str,
) -> Result<String> {
    let bad = |reason: String| super::source::bad_data(what, reason);
    let descr = header.type_descriptor.to_string();
    let kind = descr
        .trim_matches(|c| c == '\'' || c == '"')
        .trim_start_matches(['<', '>', '|', '='])
        .to_string();
    let item: u64 = kind
        .get(1..)
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| bad(format!("dtype {descr} is not a supported numeric type")))?;
    let declared = header
        .shape
        .iter()
        .try_fold(item, |n, &d| n.checked_mul(d as u64));
    match declared {
        Some(n) if n <= held => Ok(kind),
        _ => Err(bad(format!(
            "the header declares shape {:?} of {descr} ({} bytes), but only {held} bytes of \
             data follow it",
            header.shape,
            declared.map_or("more than 2^64".to_string(), |n| n.to_string())
        ))),
    }
}

/// Reads a whole `.npy` stream (header included) whose element kind is `kind`.
pub(crate) fn npy_read(r: impl std::io::Read, kind: String, what: &str) -> Result<TensorData> {
    use ndarray_npy::ReadNpyExt;
    let bad = |reason: String| super::source::bad_data(what, reason);
    macro_rules! read {
        ($ty:ty, $v:ident) => {
            ArrayD::<$ty>::read_npy(r)
                .map(TensorData::$v)
                .map_err(|e| bad(e.to_string()))
        };
    }
    match kind.as_str() {
        "f4" => read!(f32, F32),
        "f8" => read!(f64, F64),
        "i8" => read!(i64, I64),
        "i4" => read!(i32, I32),
        "i2" => read!(i16, I16),
        "i1" => read!(i8, I8),
        "u8" => read!(u64, U64),
        "u4" => read!(u32, U32),
        "u2" => read!(u16, U16),
        "u1" => read!(u8, U8),
        "b1" => read!(bool, Bool),
        _ => Err(bad(format!(
            "dtype {kind} is not a supported numeric type (f4, f8, i1-i8, u1-u8, b1)"
        ))),
    }
}

/// Decodes an `.npy` file held in memory (an `.npz` entry), checked like [`read_npy`].
pub(crate) fn npy_array(bytes: &[u8], what: &str) -> Result<TensorData> {
    let mut rest = bytes;
    let header = npy_header(&mut rest, what)?;
    let kind = npy_kind(&header, rest.len() as u64, what)?;
    npy_read(bytes, kind, what)
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
        sample.push((name, read_npy(Path::new(path), None)?));
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
    let (in_names, out_names) = io_names(model);
    test_data_set_dirs(dir)?
        .iter()
        .map(|p| read_test_data_set_named(&in_names, &out_names, p))
        .collect()
}

/// The `test_data_set_*` subfolders of `dir` in numeric order, each confined to `dir`.
pub(crate) fn test_data_set_dirs(dir: &Path) -> Result<Vec<PathBuf>> {
    let root = data_root(dir)?;
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
    sets.into_iter()
        .map(|(_, p)| {
            crate::files::confined(&root, &p).map_err(Error::Usage)?;
            Ok(p)
        })
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

/// The most random samples one run generates (`--random`, `--calib-random`).
pub const MAX_RANDOM_SAMPLES: usize = 1_000_000;

/// The most bytes all random samples of a run may take together (1 GiB): they are generated
/// up front and held in memory.
pub const MAX_RANDOM_BYTES: u64 = 1 << 30;

/// Refuses a random sample count over [`MAX_RANDOM_SAMPLES`]; `what` names it in the message
/// (`--calib-random`).
pub fn check_random_count(what: &str, count: usize) -> Result<()> {
    if count > MAX_RANDOM_SAMPLES {
        return Err(Error::Usage(format!(
            "{what} {count}: at most {MAX_RANDOM_SAMPLES} random samples (MAX_RANDOM_SAMPLES)"
        )));
    }
    Ok(())
}

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
    check_random_count("random samples", count)?;
    let mut plan: Vec<(&String, &ElemType, Vec<usize>, usize)> = Vec::new();
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
            None => {
                let shape: Vec<usize> = dims.iter().map(|d| d.unwrap_or(1)).collect();
                if dims.iter().any(Option::is_none) {
                    crate::progress::note(format!(
                        "input '{name}': its symbolic dims are set to 1 for random samples \
                         (shape {shape:?}); --input-shape {name}:{} sets them (each ? a value)",
                        dims.iter()
                            .map(|d| d.map_or("?".to_string(), |d| d.to_string()))
                            .collect::<Vec<_>>()
                            .join(",")
                    ));
                }
                shape
            }
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
                         (more than {MAX_RANDOM_ELEMENTS} elements, MAX_RANDOM_ELEMENTS)"
                    ),
                )
            })?;
        plan.push((name, ty, shape, n));
    }
    // Every sample is held in memory at once: bound the total before generating any.
    let sample_bytes: u64 = plan
        .iter()
        .map(|(_, ty, _, n)| (*n as u64).saturating_mul(ty.size() as u64))
        .fold(0u64, u64::saturating_add);
    let total = sample_bytes.saturating_mul(count as u64);
    if total > MAX_RANDOM_BYTES {
        let (name, ty, shape, _) = plan
            .iter()
            .max_by_key(|(_, ty, _, n)| n.saturating_mul(ty.size()))
            .expect("a sample of more than 0 bytes has an input");
        return Err(Error::input(
            name,
            format!(
                "{count} random samples with this input of shape {shape:?} ({}) take {total} \
                 bytes, more than the {MAX_RANDOM_BYTES} bytes (1 GiB) allowed for random \
                 inputs (MAX_RANDOM_BYTES): give fewer samples or a smaller --input-shape",
                ty.name()
            ),
        ));
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut cases = Vec::with_capacity(count);
    for i in 0..count {
        let mut sample = Vec::new();
        for &(name, ty, ref shape, n) in &plan {
            let shape = shape.clone();
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

#[cfg(test)]
mod tests {
    use super::*;

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
