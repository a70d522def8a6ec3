//! Sample sources: data sets read one sample at a time, on demand, so calibration and
//! evaluation never hold all samples in memory.
//!
//! [`open_data`] turns what users have into a [`SampleSource`]: a `test_data_set_N` folder or
//! a folder of them, a `.npy` / `.npz` file or a folder of them, an image or a folder of
//! images (see [`super::image`]). A stacked `.npy` is read by seeking to sample `k`'s rows;
//! an uncompressed `.npz` entry likewise (a compressed one is decompressed into memory, since a
//! deflate stream cannot be entered in the middle). In-memory samples (`[Case]`, `[Sample]`)
//! are sources too.

use std::borrow::Cow;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};
use crate::onnx::proto::TensorProto;
use crate::onnx::{ElemType, Model, TensorData};
use crate::runtime::Sample;

use super::data::{self, Case};
use super::image::{ImageSource, Preprocess};

/// Samples read on demand, by index. `Sync`, so calibration threads share one source.
pub trait SampleSource: Sync {
    /// The number of samples (runs of the model).
    fn len(&self) -> usize;

    /// True when there is no sample.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sample `k` (`k < len()`), read now: borrowed when it is held in memory.
    fn read(&self, k: usize) -> Result<Cow<'_, Case>>;

    /// What the user should know about how the data was read (layouts, casts, files left
    /// out, images converted), once the samples have been read.
    fn notes(&self) -> Vec<String> {
        Vec::new()
    }
}

fn out_of_range(k: usize, len: usize) -> Error {
    Error::Usage(format!("sample {k} asked of a data set of {len} samples"))
}

impl SampleSource for [Case] {
    fn len(&self) -> usize {
        <[Case]>::len(self)
    }

    fn read(&self, k: usize) -> Result<Cow<'_, Case>> {
        self.get(k)
            .map(Cow::Borrowed)
            .ok_or_else(|| out_of_range(k, <[Case]>::len(self)))
    }
}

/// `inner`'s samples `count` times over: realization 0 as they are, realization `j > 0`
/// with every float input scaled by [`realization_factor`]`(j)` (about one part in a
/// million). A quantized model's output reacts chaotically to rounding: an input moved by a
/// few float ulps flips some roundings, and the flips spread layer by layer, so its SQNR on
/// a few samples is one draw among many (PP-OCR cls, 16 samples: 25.98 dB as given, 21.54
/// with the inputs scaled by 1 + 1e-6), and another runtime's summation order draws again.
/// Scoring on several realizations pooled measures the model, not the draw.
pub struct Realizations<'a, S: SampleSource + ?Sized> {
    inner: &'a S,
    count: usize,
}

impl<'a, S: SampleSource + ?Sized> Realizations<'a, S> {
    /// `count` realizations of `inner` (at least one).
    pub fn new(inner: &'a S, count: usize) -> Self {
        Realizations {
            inner,
            count: count.max(1),
        }
    }
}

/// The input scale of realization `j`: 1, then 1 + 2^-20, 1 - 2^-20, 1 + 2 * 2^-20, ...
pub fn realization_factor(j: usize) -> f64 {
    let step = j.div_ceil(2) as f64 * (2.0f64).powi(-20);
    if j % 2 == 1 {
        1.0 + step
    } else {
        1.0 - step
    }
}

impl<S: SampleSource + ?Sized> SampleSource for Realizations<'_, S> {
    fn len(&self) -> usize {
        self.inner.len().saturating_mul(self.count)
    }

    fn read(&self, k: usize) -> Result<Cow<'_, Case>> {
        let n = self.inner.len();
        if k >= self.len() {
            return Err(out_of_range(k, self.len()));
        }
        let (j, i) = (k / n, k % n);
        let case = self.inner.read(i)?;
        if j == 0 {
            return Ok(case);
        }
        let f = realization_factor(j);
        let mut c = case.into_owned();
        for (_, t) in c.inputs.iter_mut() {
            match t {
                TensorData::F32(a) => a.mapv_inplace(|v| (v as f64 * f) as f32),
                TensorData::F64(a) => a.mapv_inplace(|v| v * f),
                TensorData::F16(a) => a.mapv_inplace(|v| half::f16::from_f64(v.to_f64() * f)),
                TensorData::BF16(a) => a.mapv_inplace(|v| half::bf16::from_f64(v.to_f64() * f)),
                _ => {}
            }
        }
        // the stored outputs were for the inputs as given
        c.expected.clear();
        c.source = format!("{} (inputs x {f})", c.source);
        Ok(Cow::Owned(c))
    }

    fn notes(&self) -> Vec<String> {
        self.inner.notes()
    }
}

impl SampleSource for Vec<Case> {
    fn len(&self) -> usize {
        self.as_slice().len()
    }

    fn read(&self, k: usize) -> Result<Cow<'_, Case>> {
        self.as_slice().read(k)
    }
}

impl SampleSource for [Sample] {
    fn len(&self) -> usize {
        <[Sample]>::len(self)
    }

    fn read(&self, k: usize) -> Result<Cow<'_, Case>> {
        let s = self
            .get(k)
            .ok_or_else(|| out_of_range(k, <[Sample]>::len(self)))?;
        Ok(Cow::Owned(Case {
            source: format!("sample {k}"),
            inputs: s.clone(),
            expected: vec![],
            labels: None,
        }))
    }
}

impl SampleSource for Vec<Sample> {
    fn len(&self) -> usize {
        self.as_slice().len()
    }

    fn read(&self, k: usize) -> Result<Cow<'_, Case>> {
        self.as_slice().read(k)
    }
}

/// Every sample of `source`, in memory (for callers of the collecting API).
pub fn collect(source: &dyn SampleSource) -> Result<Vec<Case>> {
    (0..source.len())
        .map(|k| source.read(k).map(Cow::into_owned))
        .collect()
}

/// Sources one after the other (the files of a folder).
struct Concat {
    parts: Vec<Box<dyn SampleSource>>,
    /// The index one past each part's last sample.
    ends: Vec<usize>,
    notes: Vec<String>,
}

impl Concat {
    fn new(parts: Vec<Box<dyn SampleSource>>, notes: Vec<String>) -> Concat {
        let mut at = 0;
        let ends = parts
            .iter()
            .map(|p| {
                at += p.len();
                at
            })
            .collect();
        Concat { parts, ends, notes }
    }
}

impl SampleSource for Concat {
    fn len(&self) -> usize {
        self.ends.last().copied().unwrap_or(0)
    }

    fn read(&self, k: usize) -> Result<Cow<'_, Case>> {
        let p = self.ends.partition_point(|&e| e <= k);
        let part = self
            .parts
            .get(p)
            .ok_or_else(|| out_of_range(k, self.len()))?;
        let start = if p == 0 { 0 } else { self.ends[p - 1] };
        part.read(k - start)
    }

    fn notes(&self) -> Vec<String> {
        let mut n = self.notes.clone();
        for p in &self.parts {
            n.extend(p.notes());
        }
        n
    }
}

/// A message about a data file: `what` then `reason`.
pub(crate) fn bad_data(what: &str, reason: impl std::fmt::Display) -> Error {
    Error::Usage(format!("{what}: {reason}"))
}

/// Opens a data set for `model`: a `test_data_set_N` folder (or a folder of them), a `.npy` or
/// `.npz` file or a folder of them (with an optional `labels.npy`), or an image or a folder of
/// images (with an optional `labels.npy`, or in class subfolders) preprocessed by `pre`.
/// Nothing but file names, headers and labels is read until a sample is asked for.
///
/// An array feeds a model input of declared shape `D` (rank r) in one of these forms:
/// rank r + 1, samples stacked on a new first axis (`[N, 1, 3, 224, 224]` for
/// `[1, 3, 224, 224]`); rank r with the samples on the model's own batch axis when it is 1 or
/// symbolic (`[N, 3, 224, 224]`: N runs of one row) or a fixed B (runs of B rows). Floating
/// arrays of another float type are cast to the input's (with a note).
pub fn open_data(model: &Model, path: &Path, pre: &Preprocess) -> Result<Box<dyn SampleSource>> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.is_file() {
        return open_file(model, path, pre);
    }
    if !meta.is_dir() {
        return Err(bad_data(
            &path.display().to_string(),
            "not a file or a folder",
        ));
    }
    if path.join("input_0.pb").exists() || data::has_test_data_sets(path) {
        let mut sets = TestDataSets::open(model, path)?;
        sets.notes.extend(arrays_only(path, pre));
        return Ok(Box::new(sets));
    }
    let root = data::data_root(path)?;
    let mut arrays = Vec::new();
    let mut images = Vec::new();
    let mut subdirs = Vec::new();
    let (mut labels_file, mut indices_file) = (None, None);
    for entry in std::fs::read_dir(path).map_err(|e| Error::io(path, e))? {
        let p = entry.map_err(|e| Error::io(path, e))?.path();
        let ext = extension(&p);
        let stem = p.file_stem().and_then(|e| e.to_str()).unwrap_or("");
        match ext.as_str() {
            "npy" if stem == "labels" => labels_file = Some(p),
            "npy" if stem == "indices" => indices_file = Some(p),
            "npy" | "npz" => arrays.push(p),
            e if super::image::is_image_extension(e) => images.push(p),
            _ if p.is_dir() => subdirs.push(p),
            _ => {}
        }
    }
    arrays.sort();
    images.sort();
    subdirs.sort();
    let mut notes = Vec::new();
    if let Some(p) = &indices_file {
        notes.push(format!(
            "{}: not read (qfold takes labels from labels.npy; indices are not needed)",
            p.display()
        ));
    }
    let labels = match &labels_file {
        Some(p) => Some(data::read_labels_in(p, Some(&root))?),
        None => None,
    };
    let what = path.display().to_string();
    if !arrays.is_empty() && !images.is_empty() {
        return Err(bad_data(
            &what,
            format!(
                "holds both arrays ({}) and images ({}): put them in separate folders",
                file_name(&arrays[0]),
                file_name(&images[0])
            ),
        ));
    }
    if !arrays.is_empty() {
        notes.extend(arrays_only(path, pre));
        let labels = labels.map(Arc::<[i64]>::from);
        let mut parts: Vec<Box<dyn SampleSource>> = Vec::new();
        let mut rows = 0usize;
        for f in &arrays {
            let part = open_arrays(model, f, Some(&root), labels.clone(), rows)?;
            rows = rows.saturating_add(part.len.saturating_mul(part.rows_per_sample));
            parts.push(Box::new(part));
        }
        if let (Some(l), Some(p)) = (&labels, &labels_file) {
            if l.len() < rows {
                return Err(bad_data(
                    &p.display().to_string(),
                    format!(
                        "{} labels for {rows} rows of data: give one label per row, in the \
                         files' sorted order",
                        l.len()
                    ),
                ));
            }
            notes.push(format!("{}: {rows} labels used for accuracy", p.display()));
        }
        return Ok(Box::new(Concat::new(parts, notes)));
    }
    if !images.is_empty() {
        if let (Some(l), Some(p)) = (&labels, &labels_file) {
            if l.len() < images.len() {
                return Err(bad_data(
                    &p.display().to_string(),
                    format!(
                        "{} labels for {} images: give one label per image, in sorted file \
                         name order",
                        l.len(),
                        images.len()
                    ),
                ));
            }
            notes.push(format!(
                "{}: {} labels used for accuracy (one per image, sorted file names)",
                p.display(),
                images.len()
            ));
        }
        let labels = labels.map(|l| l[..images.len()].to_vec());
        let src = ImageSource::open(model, &what, images, labels, root, pre, notes)?;
        return Ok(Box::new(src));
    }
    // ImageNet style: one subfolder of images per class, classes numbered in sorted order.
    let mut files = Vec::new();
    let mut labels = Vec::new();
    let mut classes = 0usize;
    for (class, d) in subdirs.iter().enumerate() {
        let mut found: Vec<PathBuf> = std::fs::read_dir(d)
            .map_err(|e| Error::io(d, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| super::image::is_image_extension(&extension(p)))
            .collect();
        found.sort();
        if !found.is_empty() {
            classes += 1;
        }
        labels.extend(std::iter::repeat_n(class as i64, found.len()));
        files.extend(found);
    }
    if files.is_empty() {
        return Err(bad_data(
            &what,
            "no test_data_set_N folder, input_0.pb, .npy, .npz or image file (JPEG, PNG, BMP, \
             WebP), nor class subfolders of images",
        ));
    }
    notes.push(format!(
        "{what}: {} images in {classes} class subfolders, labelled by the subfolder's index in \
         sorted name order (as torchvision's ImageFolder)",
        files.len()
    ));
    let src = ImageSource::open(model, &what, files, Some(labels), root, pre, notes)?;
    Ok(Box::new(src))
}

/// A single data file given directly (not confined to a folder, like `--npy`).
fn open_file(model: &Model, path: &Path, pre: &Preprocess) -> Result<Box<dyn SampleSource>> {
    let ext = extension(path);
    match ext.as_str() {
        "npy" | "npz" => {
            let mut src = open_arrays(model, path, None, None, 0)?;
            src.notes.extend(arrays_only(path, pre));
            Ok(Box::new(src))
        }
        e if super::image::is_image_extension(e) => {
            let what = path.display().to_string();
            let root = data::data_root(&crate::files::folder_of(path))?;
            let src = ImageSource::open(
                model,
                &what,
                vec![path.to_path_buf()],
                None,
                root,
                pre,
                vec![],
            )?;
            Ok(Box::new(src))
        }
        "pb" => {
            let (name, t) = data::read_tensor_pb(path)?;
            let decl = data::declared_inputs(model)?;
            let name = match (name.is_empty(), decl.as_slice()) {
                (true, [(only, _, _)]) => only.clone(),
                _ => name,
            };
            Ok(Box::new(vec![Case {
                source: path.display().to_string(),
                inputs: vec![(name, t)],
                expected: vec![],
                labels: None,
            }]))
        }
        _ => Err(bad_data(
            &path.display().to_string(),
            "not a .npy, .npz, .pb or image file (JPEG, PNG, BMP, WebP); give one of those, or \
             a folder of them",
        )),
    }
}

/// The note for image preprocessing options given with data that are not images.
fn arrays_only(path: &Path, pre: &Preprocess) -> Option<String> {
    (!pre.is_unset()).then(|| {
        format!(
            "{}: arrays, fed as they are (image preprocessing applies to images only)",
            path.display()
        )
    })
}

fn extension(p: &Path) -> String {
    p.extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase()
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map_or_else(|| p.display().to_string(), |n| n.to_string_lossy().into())
}

/// `test_data_set_N` folders (or one folder of `input_K.pb` files), each read when asked for.
struct TestDataSets {
    inputs: Vec<String>,
    outputs: Vec<String>,
    dirs: Vec<PathBuf>,
    notes: Vec<String>,
}

impl TestDataSets {
    fn open(model: &Model, dir: &Path) -> Result<TestDataSets> {
        let (inputs, outputs) = data::io_names(model);
        let dirs = if dir.join("input_0.pb").exists() {
            vec![dir.to_path_buf()]
        } else {
            data::test_data_set_dirs(dir)?
        };
        Ok(TestDataSets {
            inputs,
            outputs,
            dirs,
            notes: vec![],
        })
    }
}

impl SampleSource for TestDataSets {
    fn len(&self) -> usize {
        self.dirs.len()
    }

    fn read(&self, k: usize) -> Result<Cow<'_, Case>> {
        let dir = self
            .dirs
            .get(k)
            .ok_or_else(|| out_of_range(k, self.dirs.len()))?;
        data::read_test_data_set_named(&self.inputs, &self.outputs, dir).map(Cow::Owned)
    }

    fn notes(&self) -> Vec<String> {
        self.notes.clone()
    }
}

/// An array in a file, read a few rows at a time: `.npy` data start at `start` (after the
/// header) in C order, and the whole array is known to fit in the file.
struct NpyRows {
    what: String,
    file: Arc<Mutex<File>>,
    start: u64,
    shape: Vec<usize>,
    ty: ElemType,
    big_endian: bool,
}

impl NpyRows {
    /// Rows `from..from + count` of axis 0, the axis kept.
    fn rows(&self, from: usize, count: usize) -> Result<TensorData> {
        let row: usize = self.shape.iter().skip(1).product();
        let item = self.ty.size();
        let (offset, bytes) = (
            (from * row * item) as u64,
            count.saturating_mul(row).saturating_mul(item),
        );
        let mut buf = Vec::new();
        buf.try_reserve_exact(bytes)
            .map_err(|_| bad_data(&self.what, format!("cannot allocate {bytes} bytes")))?;
        buf.resize(bytes, 0);
        {
            let mut f = self.file.lock().unwrap_or_else(|e| e.into_inner());
            f.seek(SeekFrom::Start(self.start + offset))
                .and_then(|_| f.read_exact(&mut buf))
                .map_err(|e| bad_data(&self.what, format!("reading rows {from}..: {e}")))?;
        }
        if self.big_endian && item > 1 {
            for c in buf.chunks_exact_mut(item) {
                c.reverse();
            }
        }
        let mut dims = vec![count as i64];
        dims.extend(self.shape.iter().skip(1).map(|&d| d as i64));
        if self.shape.is_empty() {
            dims.clear();
        }
        let t = TensorProto {
            data_type: self.ty.onnx_code(),
            dims,
            raw_data: buf,
            ..Default::default()
        };
        TensorData::from_proto(&t).map_err(|e| bad_data(&self.what, e))
    }
}

/// An array of a data file: read from the file on demand, or held in memory.
enum Array {
    File(NpyRows),
    Memory(TensorData),
}

impl Array {
    fn shape(&self) -> &[usize] {
        match self {
            Array::File(f) => &f.shape,
            Array::Memory(t) => t.shape(),
        }
    }

    fn elem_type(&self) -> ElemType {
        match self {
            Array::File(f) => f.ty,
            Array::Memory(t) => t.elem_type(),
        }
    }

    fn rows(&self, from: usize, count: usize) -> Result<TensorData> {
        match self {
            Array::File(f) => f.rows(from, count),
            Array::Memory(t) => Ok(data::slice_axis0(t, from, from + count)),
        }
    }

    fn whole(&self) -> Result<TensorData> {
        match self {
            Array::File(f) => f.rows(0, f.shape.first().copied().unwrap_or(1)),
            Array::Memory(t) => Ok(t.clone()),
        }
    }
}

/// How an array's samples lie in it.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Split {
    /// Sample k is `a[k]` (a new first axis).
    Stacked,
    /// Sample k is rows `k*n .. (k+1)*n` of the model's own batch axis.
    Rows(usize),
    /// The whole array is one sample.
    Whole,
}

/// One model input's array in a data file.
struct Feed {
    input: String,
    array: Array,
    split: Split,
    /// The float type the values are cast to.
    cast: Option<ElemType>,
}

impl Feed {
    fn sample(&self, k: usize) -> Result<TensorData> {
        let t = match self.split {
            Split::Whole => self.array.whole()?,
            Split::Rows(n) => self.array.rows(k * n, n)?,
            Split::Stacked => {
                let t = self.array.rows(k, 1)?;
                let shape = t.shape()[1..].to_vec();
                reshape(t, &shape)
            }
        };
        match self.cast {
            Some(ty) => TensorData::from_f64(t.to_f64(), ty),
            None => Ok(t),
        }
    }
}

fn reshape(t: TensorData, shape: &[usize]) -> TensorData {
    macro_rules! re {
        ($v:ident, $a:expr) => {
            match $a.into_shape_with_order(ndarray::IxDyn(shape)) {
                Ok(a) => TensorData::$v(a),
                Err(_) => unreachable!("same number of elements"),
            }
        };
    }
    match t {
        TensorData::F32(a) => re!(F32, a),
        TensorData::F64(a) => re!(F64, a),
        TensorData::F16(a) => re!(F16, a),
        TensorData::BF16(a) => re!(BF16, a),
        TensorData::I8(a) => re!(I8, a),
        TensorData::U8(a) => re!(U8, a),
        TensorData::I16(a) => re!(I16, a),
        TensorData::U16(a) => re!(U16, a),
        TensorData::I32(a) => re!(I32, a),
        TensorData::I64(a) => re!(I64, a),
        TensorData::U32(a) => re!(U32, a),
        TensorData::U64(a) => re!(U64, a),
        TensorData::Bool(a) => re!(Bool, a),
    }
}

/// The samples of one `.npy` or `.npz` file.
struct ArraySource {
    what: String,
    feeds: Vec<Feed>,
    len: usize,
    /// Rows of the first input per sample (what labels count).
    rows_per_sample: usize,
    /// Labels of every row of the folder, and the index of this file's first row in them.
    labels: Option<(Arc<[i64]>, usize)>,
    notes: Vec<String>,
}

impl SampleSource for ArraySource {
    fn len(&self) -> usize {
        self.len
    }

    fn read(&self, k: usize) -> Result<Cow<'_, Case>> {
        if k >= self.len {
            return Err(out_of_range(k, self.len));
        }
        let inputs = self
            .feeds
            .iter()
            .map(|f| Ok((f.input.clone(), f.sample(k)?)))
            .collect::<Result<Sample>>()?;
        let labels = self.labels.as_ref().and_then(|(l, base)| {
            let from = base + k * self.rows_per_sample;
            l.get(from..from + self.rows_per_sample)
                .map(<[i64]>::to_vec)
        });
        let source = match (self.len, self.feeds.first().map(|f| f.split)) {
            (1, _) | (_, Some(Split::Whole)) => self.what.clone(),
            (_, Some(Split::Rows(n))) if n > 1 => {
                format!("{}[{}:{}]", self.what, k * n, (k + 1) * n)
            }
            _ => format!("{}[{k}]", self.what),
        };
        Ok(Cow::Owned(Case {
            source,
            inputs,
            expected: vec![],
            labels,
        }))
    }

    fn notes(&self) -> Vec<String> {
        self.notes.clone()
    }
}

/// Shape as the model declares it, symbolic dims by name (`[N, 3, 224, 224]`).
fn show_declared(dims: &[Option<usize>], names: &[String]) -> String {
    let d: Vec<String> = dims
        .iter()
        .enumerate()
        .map(|(i, d)| match d {
            Some(v) => v.to_string(),
            None => names
                .get(i)
                .filter(|n| !n.is_empty())
                .cloned()
                .unwrap_or_else(|| "?".into()),
        })
        .collect();
    format!("[{}]", d.join(", "))
}

fn fits(given: &[usize], declared: &[Option<usize>]) -> bool {
    given.len() == declared.len()
        && given
            .iter()
            .zip(declared)
            .all(|(g, d)| d.is_none_or(|d| d == *g))
}

/// How the array `shape` of `what` feeds `input` (declared `dims`, symbolic dims named by
/// `names`): the split, the sample count and the rows per sample, and a note to give.
fn plan_split(
    what: &str,
    input: &str,
    shape: &[usize],
    dims: &[Option<usize>],
    names: &[String],
) -> Result<(Split, usize, usize, Option<String>)> {
    let rows_of = |s: &[usize]| s.first().copied().unwrap_or(1);
    if dims.is_empty() {
        // No declared shape: the array is one sample, as given.
        return Ok((Split::Whole, 1, rows_of(shape), None));
    }
    if shape.len() == dims.len() + 1 && fits(&shape[1..], dims) {
        return Ok((Split::Stacked, shape[0], rows_of(&shape[1..]), None));
    }
    if shape.len() == dims.len() && fits(&shape[1..], &dims[1..]) {
        let n = shape[0];
        match dims[0] {
            None => {
                let note = (n > 1).then(|| {
                    format!(
                        "{what}: {n} rows on input '{input}''s symbolic batch axis ({}): {n} \
                         runs of one row each (stack them as [runs, rows, ...] to run several \
                         rows at once)",
                        names.first().filter(|s| !s.is_empty()).map_or("?", |s| s)
                    )
                });
                return Ok((Split::Rows(1), n, 1, note));
            }
            Some(b) if b >= 1 && n.is_multiple_of(b) => {
                let note = (n > b).then(|| {
                    format!(
                        "{what}: {n} rows on input '{input}''s batch axis (declared {b}): {} \
                         runs of {b} row{}",
                        n / b,
                        if b == 1 { "" } else { "s" }
                    )
                });
                return Ok((Split::Rows(b), n / b, b, note));
            }
            _ => {}
        }
    }
    let declared = show_declared(dims, names);
    let rest = show_declared(&dims[1..], &names[names.len().min(1)..]);
    let rest = rest.trim_start_matches('[').trim_end_matches(']');
    let batch_form = match dims[0] {
        Some(b) if b > 1 => format!("[{b}*K, {rest}] (K runs of {b} rows)"),
        _ => format!("[S, {rest}] (S samples on the batch axis)"),
    };
    let stacked = declared.trim_start_matches('[').trim_end_matches(']');
    Err(bad_data(
        what,
        format!(
            "shape {shape:?} for input '{input}', which is declared {declared}: give \
             {batch_form} or [S, {stacked}] (S samples on a new first axis), with the data \
             resized or reshaped to fit"
        ),
    ))
}

/// The cast of `found` values to input `input` of type `ty`: `None` when they are the same;
/// floats are cast with a note, anything else is an error.
fn plan_cast(
    what: &str,
    input: &str,
    found: ElemType,
    ty: ElemType,
    notes: &mut Vec<String>,
) -> Result<Option<ElemType>> {
    if found == ty {
        return Ok(None);
    }
    if found.is_float() && ty.is_float() {
        notes.push(format!(
            "{what}: {} values cast to {} (the type of input '{input}')",
            found.name(),
            ty.name()
        ));
        return Ok(Some(ty));
    }
    Err(bad_data(
        what,
        format!(
            "{} values for input '{input}', which is {}: save the array as {} \
             (x.astype(np.{}))",
            found.name(),
            ty.name(),
            ty.name(),
            numpy_name(ty)
        ),
    ))
}

fn numpy_name(ty: ElemType) -> &'static str {
    match ty {
        ElemType::F32 => "float32",
        ElemType::F64 => "float64",
        ElemType::F16 => "float16",
        ElemType::BF16 => "float32",
        ElemType::I8 => "int8",
        ElemType::U8 => "uint8",
        ElemType::I16 => "int16",
        ElemType::U16 => "uint16",
        ElemType::I32 => "int32",
        ElemType::I64 => "int64",
        ElemType::U32 => "uint32",
        ElemType::U64 => "uint64",
        ElemType::Bool => "bool_",
    }
}

/// Opens a `.npy` (a single-input model's) or `.npz` (arrays named after the inputs) file
/// (inside `root` when given). `labels` label the folder's rows; this file's first row is
/// `first_row` of them.
fn open_arrays(
    model: &Model,
    path: &Path,
    root: Option<&Path>,
    labels: Option<Arc<[i64]>>,
    first_row: usize,
) -> Result<ArraySource> {
    if let Some(root) = root {
        crate::files::confined(root, path).map_err(Error::Usage)?;
    }
    let what = path.display().to_string();
    let decl = data::declared_inputs(model)?;
    let names = data::declared_dim_names(model);
    let mut notes = Vec::new();
    let npz = extension(path) == "npz";
    let mut arrays: Vec<(String, Array)> = if npz {
        open_npz(path, &what, &mut notes)?
    } else {
        if decl.len() != 1 {
            return Err(bad_data(
                &what,
                format!(
                    "a .npy file feeds a single-input model; this one has inputs {}: save an \
                     .npz with one array per input (np.savez(f, {}))",
                    list(decl.iter().map(|d| &d.0)),
                    decl.iter()
                        .map(|d| format!("{}=...", d.0))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
        vec![(decl[0].0.clone(), open_npy(path, &what)?)]
    };
    // A single-input model takes the only array of an .npz, whatever its name.
    if npz && decl.len() == 1 && arrays.len() == 1 && arrays[0].0 != decl[0].0 {
        arrays[0].0 = decl[0].0.clone();
    }
    let scalars = scalar_inputs(model);
    let mut feeds = Vec::new();
    let mut count: Option<(usize, String)> = None;
    let mut rows_per_sample = 1;
    for (k, (name, ty, dims)) in decl.iter().enumerate() {
        let Some(pos) = arrays.iter().position(|(n, _)| n == name) else {
            let keys: Vec<&String> = arrays.iter().map(|(n, _)| n).collect();
            return Err(bad_data(
                &what,
                if npz {
                    format!(
                        "no array named '{name}' (keys: {}); name arrays after the inputs: \
                         np.savez(f, {})",
                        if keys.is_empty() {
                            "none".to_string()
                        } else {
                            keys.iter()
                                .map(|k| k.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        },
                        decl.iter()
                            .map(|d| format!("{}=...", d.0))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                } else {
                    format!("no array for input '{name}'")
                },
            ));
        };
        let (_, array) = arrays.swap_remove(pos);
        let array_what = if npz {
            format!("{what}: array '{name}'")
        } else {
            what.clone()
        };
        let no_names = Vec::new();
        let dim_names = names.get(name).unwrap_or(&no_names);
        // A declared scalar (an LSTM's sample rate) is a [S] array of S samples, or one value
        // for every sample.
        let scalar = scalars.contains(name);
        let (split, n, rows, note) = match array.shape() {
            [n] if scalar => (Split::Stacked, *n, 1, None),
            _ => plan_split(&array_what, name, array.shape(), dims, dim_names)?,
        };
        notes.extend(note);
        let cast = plan_cast(&array_what, name, array.elem_type(), *ty, &mut notes)?;
        if scalar && split == Split::Whole && decl.len() > 1 {
            feeds.push(Feed {
                input: name.clone(),
                array,
                split,
                cast,
            });
            continue;
        }
        match &count {
            Some((c, first)) if *c != n => {
                return Err(bad_data(
                    &what,
                    format!(
                        "the arrays hold different numbers of samples: {c} for input \
                         '{first}', {n} for input '{name}'"
                    ),
                ))
            }
            Some(_) => {}
            None => count = Some((n, name.clone())),
        }
        if k == 0 {
            rows_per_sample = rows;
        }
        feeds.push(Feed {
            input: name.clone(),
            array,
            split,
            cast,
        });
    }
    if !arrays.is_empty() {
        notes.push(format!(
            "{what}: arrays {} not read (the model has no inputs of those names)",
            list(arrays.iter().map(|(n, _)| n))
        ));
    }
    // every input a scalar given once: one sample
    let len = count.map_or(usize::from(!feeds.is_empty()), |(c, _)| c);
    if len == 0 {
        return Err(bad_data(&what, "holds no sample (an array of 0 rows)"));
    }
    Ok(ArraySource {
        what,
        feeds,
        len,
        rows_per_sample,
        labels: labels.map(|l| (l, first_row)),
        notes,
    })
}

/// The model inputs declared as scalars (a shape of rank 0, not an absent shape).
fn scalar_inputs(model: &Model) -> Vec<String> {
    use crate::onnx::proto::type_proto;
    crate::graph::Graph::of_model(model)
        .real_inputs()
        .into_iter()
        .filter(|v| match v.type_.as_ref().and_then(|t| t.value.as_ref()) {
            Some(type_proto::Value::TensorType(t)) => {
                t.shape.as_ref().is_some_and(|s| s.dim.is_empty())
            }
            _ => false,
        })
        .map(|v| v.name.clone())
        .collect()
}

fn list<'a>(names: impl Iterator<Item = &'a String>) -> String {
    names
        .map(|n| format!("'{n}'"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The element type and byte order of an `.npy` dtype (`<f4`, `|u1`, `>i8`...), once the
/// array is known to fit in the bytes after the header ([`data::npy_kind`]).
fn npy_type(header: &ndarray_npy::npy::header::Header, kind: &str) -> Option<(ElemType, bool)> {
    let descr = header.type_descriptor.to_string();
    let big = descr
        .trim_matches(|c| c == '\'' || c == '"')
        .starts_with('>');
    let ty = match kind {
        "f2" => ElemType::F16,
        "f4" => ElemType::F32,
        "f8" => ElemType::F64,
        "i1" => ElemType::I8,
        "i2" => ElemType::I16,
        "i4" => ElemType::I32,
        "i8" => ElemType::I64,
        "u1" => ElemType::U8,
        "u2" => ElemType::U16,
        "u4" => ElemType::U32,
        "u8" => ElemType::U64,
        "b1" => ElemType::Bool,
        _ => return None,
    };
    Some((ty, big))
}

/// A `.npy` file, its header checked against its size; rows are read when asked for.
/// Fortran-ordered arrays (rows not contiguous) are read into memory.
fn open_npy(path: &Path, what: &str) -> Result<Array> {
    use std::io::BufReader;
    let (file, len) = crate::files::open_regular(path).map_err(|e| Error::io(path, e))?;
    let mut r = BufReader::new(file);
    let header = data::npy_header(&mut r, what)?;
    let start = r.stream_position().map_err(|e| Error::io(path, e))?;
    let kind = data::npy_kind(&header, len.saturating_sub(start), what)?;
    match npy_type(&header, &kind) {
        Some((ty, big)) if !header.layout.is_fortran() => Ok(Array::File(NpyRows {
            what: what.to_string(),
            file: Arc::new(Mutex::new(r.into_inner())),
            start,
            shape: header.shape,
            ty,
            big_endian: big,
        })),
        _ => {
            r.seek(SeekFrom::Start(0)).map_err(|e| Error::io(path, e))?;
            Ok(Array::Memory(data::npy_read(r, kind, what)?))
        }
    }
}

/// Counts the bytes read through it.
struct Counted<R> {
    inner: R,
    read: u64,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        Ok(n)
    }
}

/// The arrays of an `.npz` file by name. Stored (uncompressed, `np.savez`) entries are read
/// row by row from the file; if any entry is compressed (`np.savez_compressed`), the file's
/// arrays are read into memory, with a note.
fn open_npz(path: &Path, what: &str, notes: &mut Vec<String>) -> Result<Vec<(String, Array)>> {
    let (file, file_len) = crate::files::open_regular(path).map_err(|e| Error::io(path, e))?;
    let mut zip = zip::ZipArchive::new(file)
        .map_err(|e| bad_data(what, format!("not an .npz (zip) file: {e}")))?;
    let shared = Arc::new(Mutex::new(
        crate::files::open_regular(path)
            .map_err(|e| Error::io(path, e))?
            .0,
    ));
    let mut out = Vec::new();
    for i in 0..zip.len() {
        let entry = zip.by_index(i).map_err(|e| bad_data(what, e))?;
        if entry.is_dir() {
            continue;
        }
        let name = entry.name().to_string();
        let entry_what = format!("{what}: array '{name}'");
        if entry.compression() != zip::CompressionMethod::Stored || entry.encrypted() {
            drop(entry);
            notes.push(format!(
                "{what}: compressed (np.savez_compressed), so its arrays are read into memory; \
                 np.savez (uncompressed) files are read one sample at a time"
            ));
            return Ok(data::read_npz(path, None)?
                .into_iter()
                .map(|(n, t)| (n, Array::Memory(t)))
                .collect());
        }
        let (data_start, size) = (entry.data_start(), entry.size());
        let mut r = Counted {
            inner: entry,
            read: 0,
        };
        let header = data::npy_header(&mut r, &entry_what)?;
        let header_len = r.read;
        let held = size
            .saturating_sub(header_len)
            .min(file_len.saturating_sub(data_start.saturating_add(header_len)));
        let kind = data::npy_kind(&header, held, &entry_what)?;
        let key = name.trim_end_matches(".npy").to_string();
        match npy_type(&header, &kind) {
            Some((ty, big)) if !header.layout.is_fortran() => out.push((
                key,
                Array::File(NpyRows {
                    what: entry_what,
                    file: shared.clone(),
                    start: data_start + header_len,
                    shape: header.shape,
                    ty,
                    big_endian: big,
                }),
            )),
            _ => {
                drop(r);
                let mut entry = zip.by_index(i).map_err(|e| bad_data(what, e))?;
                let mut bytes = Vec::new();
                (&mut entry)
                    .take(size.min(file_len))
                    .read_to_end(&mut bytes)
                    .map_err(|e| bad_data(&entry_what, e))?;
                out.push((key, Array::Memory(data::npy_array(&bytes, &entry_what)?)));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{ArrayD, IxDyn};

    fn case(x: Vec<f32>, ids: Vec<i64>) -> Case {
        Case {
            source: "s".into(),
            inputs: vec![
                (
                    "x".into(),
                    TensorData::F32(ArrayD::from_shape_vec(IxDyn(&[x.len()]), x).unwrap()),
                ),
                (
                    "ids".into(),
                    TensorData::I64(ArrayD::from_shape_vec(IxDyn(&[ids.len()]), ids).unwrap()),
                ),
            ],
            expected: vec![("y".into(), TensorData::F32(ArrayD::zeros(IxDyn(&[1]))))],
            labels: Some(vec![3]),
        }
    }

    #[test]
    fn realizations_scale_float_inputs_only_and_keep_labels() {
        let cases = vec![case(vec![1.0, -2.0], vec![7, 8]), case(vec![4.0], vec![9])];
        let r = Realizations::new(&cases, 3);
        assert_eq!(r.len(), 6);
        // realization 0: the cases as given, borrowed
        assert!(matches!(r.read(1).unwrap(), Cow::Borrowed(_)));
        let f = |k| realization_factor(k);
        assert_eq!(
            (f(0), f(1), f(2), f(3)),
            (
                1.0,
                1.0 + 2f64.powi(-20),
                1.0 - 2f64.powi(-20),
                1.0 + 2.0 * 2f64.powi(-20)
            )
        );
        for (k, (i, j)) in [(2, (0, 1)), (3, (1, 1)), (4, (0, 2))] {
            let c = r.read(k).unwrap();
            let TensorData::F32(x) = &c.inputs[0].1 else {
                panic!()
            };
            let TensorData::F32(x0) = &cases[i].inputs[0].1 else {
                panic!()
            };
            for (a, b) in x.iter().zip(x0.iter()) {
                assert_eq!(*a, (*b as f64 * f(j)) as f32);
                assert_ne!(a, b);
            }
            // integer inputs and labels as given; the stored outputs no longer apply
            assert_eq!(c.inputs[1].1, cases[i].inputs[1].1);
            assert_eq!(c.labels, Some(vec![3]));
            assert!(c.expected.is_empty());
        }
        assert!(r.read(6).is_err());
        // one realization is the source itself; zero counts as one
        assert_eq!(Realizations::new(&cases, 0).len(), 2);
    }
}
