//! Loading and saving models: external data, the 2 GiB limit, atomic writes.
//!
//! Loading resolves every external tensor into `raw_data`, so the rest of qfold only ever sees
//! tensors in memory; the names of the tensors that were external are kept in
//! [`Model::external`] so saving can keep the layout. Saving writes to temporary files in the
//! destination folder and renames them into place, so a failure leaves nothing half-written.
//!
//! Every file a model refers to must be a regular file inside the model's folder once symbolic
//! links are resolved ([`crate::files`]); its declared offset and length are checked against the
//! file's size and [`MAX_EXTERNAL_TENSOR_BYTES`] before anything is allocated.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Component, Path, PathBuf};

use protobuf::Message;

use super::proto::{
    tensor_proto::DataLocation, GraphProto, ModelProto, NodeProto, StringStringEntryProto,
    TensorProto,
};
use super::tensor::TensorData;
use crate::error::{Error, Result};
use crate::files::Staged;

/// protobuf cannot encode a message of 2 GiB or more.
pub const PROTOBUF_LIMIT: u64 = (1u64 << 31) - 1;

/// The largest external tensor qfold reads (16 GiB): a declared `length` above it is refused
/// before anything is allocated, whatever the file's size (a sparse file can claim any size).
pub const MAX_EXTERNAL_TENSOR_BYTES: u64 = 16 << 30;

/// A loaded model: the protobuf message plus where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Model {
    /// The message. Every tensor's data is in memory.
    pub proto: ModelProto,
    /// The folder of the file it was loaded from; external data paths are relative to it.
    pub dir: Option<PathBuf>,
    /// Names of the tensors that were stored as external data when loaded.
    pub external: BTreeSet<String>,
    /// Canonical paths of the files it was read from: the model file (when loaded from one),
    /// then each external data file, in the order first met. Outputs must not replace them.
    pub files: Vec<PathBuf>,
}

/// Where saving puts tensor data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ExternalData {
    /// Tensors that were external when loaded stay external; everything else is inline unless
    /// the file would exceed the 2 GiB protobuf limit, in which case the largest tensors move out.
    #[default]
    Keep,
    /// Every tensor inline; fails when the model would exceed 2 GiB.
    Never,
    /// Every tensor of at least this many bytes goes to the external data file.
    Threshold(usize),
}

/// Options for [`save`].
#[derive(Debug, Clone, Default)]
pub struct SaveOptions {
    pub external: ExternalData,
    /// Test hook: the size above which a message counts as too big to encode, in place of
    /// [`PROTOBUF_LIMIT`], so the over-2-GiB paths can be exercised on small models.
    #[doc(hidden)]
    pub inline_limit: Option<u64>,
}

impl Model {
    /// Wraps a message built in memory.
    pub fn new(proto: ModelProto) -> Model {
        Model {
            proto,
            dir: None,
            external: BTreeSet::new(),
            files: Vec::new(),
        }
    }

    /// The main graph (an empty one is created if the message has none).
    pub fn graph(&self) -> &GraphProto {
        self.proto.graph.get_or_default()
    }

    /// The main graph, mutably.
    pub fn graph_mut(&mut self) -> &mut GraphProto {
        self.proto.graph.mut_or_insert_default()
    }

    /// The opset version imported for the default ONNX domain.
    pub fn opset(&self) -> Option<i64> {
        self.proto
            .opset_import
            .iter()
            .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
            .map(|o| o.version)
    }

    /// Encodes the message as bytes (every tensor inline).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        encode(&self.proto, "model")
    }
}

fn encode(proto: &ModelProto, what: &str) -> Result<Vec<u8>> {
    let size = proto.compute_size();
    if size > PROTOBUF_LIMIT {
        return Err(Error::Encode {
            what: what.into(),
            reason: format!(
                "{size} bytes exceeds protobuf's 2 GiB limit: save it with external data"
            ),
        });
    }
    proto.write_to_bytes().map_err(|e| Error::Encode {
        what: what.into(),
        reason: e.to_string(),
    })
}

/// Loads a model file, resolving external data relative to its folder. The file must be a
/// regular file (a FIFO or a device is refused without being opened for reading) of at most
/// protobuf's 2 GiB.
pub fn load(path: impl AsRef<Path>) -> Result<Model> {
    load_with(path.as_ref(), true)
}

/// [`load`] leaving external data in its files: every reference is checked as `load` checks
/// it (inside the model's folder, a regular file, the range within it) and written out
/// explicitly (location, offset, length), but nothing is read. Such a model can only be run
/// ([`crate::runtime::Runner`] has tract read the data) or inspected: decoding one of its
/// external tensors is an error. For checking models bigger than memory allows twice.
pub fn load_lazy(path: impl AsRef<Path>) -> Result<Model> {
    load_with(path.as_ref(), false)
}

fn load_with(path: &Path, read_external: bool) -> Result<Model> {
    let bytes = crate::files::read_regular(path, PROTOBUF_LIMIT)?;
    let dir = crate::files::folder_of(path);
    let mut model = decode(&bytes, Some(&dir), &path.display().to_string())?;
    resolve_external(&mut model, read_external)?;
    let canonical = path.canonicalize().map_err(|e| Error::io(path, e))?;
    model.files.insert(0, canonical);
    Ok(model)
}

/// Decodes a model from bytes. `dir` is where external data files are looked up (external
/// data is an error without it); `what` names the source in error messages.
pub fn load_bytes(bytes: &[u8], dir: Option<&Path>, what: &str) -> Result<Model> {
    let mut model = decode(bytes, dir, what)?;
    resolve_external(&mut model, true)?;
    Ok(model)
}

fn decode(bytes: &[u8], dir: Option<&Path>, what: &str) -> Result<Model> {
    super::wire::prescan(bytes, super::wire::Msg::Model).map_err(|reason| Error::Decode {
        what: what.into(),
        reason,
    })?;
    let proto = ModelProto::parse_from_bytes(bytes).map_err(|e| Error::Decode {
        what: what.into(),
        reason: e.to_string(),
    })?;
    if proto.graph.is_none() {
        return Err(Error::Decode {
            what: what.into(),
            reason: "the message has no graph".into(),
        });
    }
    Ok(Model {
        proto,
        dir: dir.map(Path::to_path_buf),
        external: BTreeSet::new(),
        files: Vec::new(),
    })
}

/// Calls `f` on every tensor of the model: initializers, Constant and other tensor attributes,
/// sparse tensors, in subgraphs, training graphs and function bodies. The order is fixed.
pub fn for_each_tensor_mut(
    proto: &mut ModelProto,
    f: &mut dyn FnMut(&mut TensorProto) -> Result<()>,
) -> Result<()> {
    fn nodes(
        nodes: &mut [NodeProto],
        f: &mut dyn FnMut(&mut TensorProto) -> Result<()>,
    ) -> Result<()> {
        for n in nodes {
            for a in &mut n.attribute {
                if let Some(t) = a.t.as_mut() {
                    f(t)?;
                }
                for t in &mut a.tensors {
                    f(t)?;
                }
                if let Some(s) = a.sparse_tensor.as_mut() {
                    sparse(s, f)?;
                }
                for s in &mut a.sparse_tensors {
                    sparse(s, f)?;
                }
                if let Some(g) = a.g.as_mut() {
                    graph(g, f)?;
                }
                for g in &mut a.graphs {
                    graph(g, f)?;
                }
            }
        }
        Ok(())
    }
    fn sparse(
        s: &mut super::proto::SparseTensorProto,
        f: &mut dyn FnMut(&mut TensorProto) -> Result<()>,
    ) -> Result<()> {
        if let Some(t) = s.values.as_mut() {
            f(t)?;
        }
        if let Some(t) = s.indices.as_mut() {
            f(t)?;
        }
        Ok(())
    }
    fn graph(g: &mut GraphProto, f: &mut dyn FnMut(&mut TensorProto) -> Result<()>) -> Result<()> {
        for t in &mut g.initializer {
            f(t)?;
        }
        for s in &mut g.sparse_initializer {
            sparse(s, f)?;
        }
        nodes(&mut g.node, f)
    }
    if let Some(g) = proto.graph.as_mut() {
        graph(g, f)?;
    }
    for ti in &mut proto.training_info {
        if let Some(g) = ti.initialization.as_mut() {
            graph(g, f)?;
        }
        if let Some(g) = ti.algorithm.as_mut() {
            graph(g, f)?;
        }
    }
    for func in &mut proto.functions {
        nodes(&mut func.node, f)?;
    }
    Ok(())
}

/// Calls `f` on every tensor of the model, in the order of [`for_each_tensor_mut`], without
/// copying anything.
pub fn for_each_tensor(
    proto: &ModelProto,
    f: &mut dyn FnMut(&TensorProto) -> Result<()>,
) -> Result<()> {
    fn nodes(nodes: &[NodeProto], f: &mut dyn FnMut(&TensorProto) -> Result<()>) -> Result<()> {
        for a in nodes.iter().flat_map(|n| &n.attribute) {
            for t in a.t.as_ref().into_iter().chain(&a.tensors) {
                f(t)?;
            }
            for s in a
                .sparse_tensor
                .as_ref()
                .into_iter()
                .chain(&a.sparse_tensors)
            {
                sparse(s, f)?;
            }
            for g in a.g.as_ref().into_iter().chain(&a.graphs) {
                graph(g, f)?;
            }
        }
        Ok(())
    }
    fn sparse(
        s: &super::proto::SparseTensorProto,
        f: &mut dyn FnMut(&TensorProto) -> Result<()>,
    ) -> Result<()> {
        for t in s.values.as_ref().into_iter().chain(s.indices.as_ref()) {
            f(t)?;
        }
        Ok(())
    }
    fn graph(g: &GraphProto, f: &mut dyn FnMut(&TensorProto) -> Result<()>) -> Result<()> {
        for t in &g.initializer {
            f(t)?;
        }
        for s in &g.sparse_initializer {
            sparse(s, f)?;
        }
        nodes(&g.node, f)
    }
    if let Some(g) = proto.graph.as_ref() {
        graph(g, f)?;
    }
    for ti in &proto.training_info {
        for g in ti
            .initialization
            .as_ref()
            .into_iter()
            .chain(ti.algorithm.as_ref())
        {
            graph(g, f)?;
        }
    }
    for func in &proto.functions {
        nodes(&func.node, f)?;
    }
    Ok(())
}

fn is_external(t: &TensorProto) -> bool {
    t.data_location.value() == DataLocation::EXTERNAL as i32
}

/// A relative path that stays inside the model folder, or the reason it does not.
fn safe_relative(location: &str) -> std::result::Result<PathBuf, String> {
    if location.is_empty() {
        return Err("no 'location'".into());
    }
    let p = Path::new(location);
    for c in p.components() {
        match c {
            Component::Normal(_) | Component::CurDir => {}
            Component::ParentDir => {
                return Err(format!(
                    "location '{location}' leaves the model folder ('..')"
                ))
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err(format!("location '{location}' is absolute"))
            }
        }
    }
    Ok(p.to_path_buf())
}

fn resolve_external(model: &mut Model, read: bool) -> Result<()> {
    let dir = model.dir.clone();
    // The model folder, canonical, resolved on first need.
    let mut root: Option<PathBuf> = None;
    let mut files: HashMap<PathBuf, (File, u64)> = HashMap::new();
    let mut order: Vec<PathBuf> = Vec::new();
    let mut external = BTreeSet::new();
    for_each_tensor_mut(&mut model.proto, &mut |t| {
        if !is_external(t) {
            return Ok(());
        }
        let err = |reason: String| Error::ExternalData {
            tensor: t.name.clone(),
            reason,
        };
        let mut location = String::new();
        let mut offset: u64 = 0;
        let mut length: Option<u64> = None;
        for kv in &t.external_data {
            match kv.key.as_str() {
                "location" => location = kv.value.clone(),
                "offset" => {
                    offset = kv
                        .value
                        .parse()
                        .map_err(|_| err(format!("bad offset '{}'", kv.value)))?
                }
                "length" => {
                    length = Some(
                        kv.value
                            .parse()
                            .map_err(|_| err(format!("bad length '{}'", kv.value)))?,
                    )
                }
                _ => {}
            }
        }
        let rel = safe_relative(&location).map_err(err)?;
        let dir = dir.as_ref().ok_or_else(|| {
            err("the model was not loaded from a file, so its external data cannot be found".into())
        })?;
        if root.is_none() {
            root = Some(
                crate::files::canonical_dir(dir)
                    .map_err(|e| err(format!("model folder {}: {e}", dir.display())))?,
            );
        }
        let root = root.as_ref().expect("set above");
        let path = crate::files::confined(root, &dir.join(rel))
            .map_err(|r| err(format!("location '{location}': {r}")))?;
        if !files.contains_key(&path) {
            let opened = crate::files::open_regular(&path)
                .map_err(|e| err(format!("location '{location}': {}: {e}", path.display())))?;
            files.insert(path.clone(), opened);
            order.push(path.clone());
        }
        let (file, file_len) = files.get_mut(&path).expect("inserted above");
        let length = length.unwrap_or(file_len.saturating_sub(offset));
        if offset.checked_add(length).is_none_or(|end| end > *file_len) {
            return Err(err(format!(
                "{}: offset {offset} + length {length} is past the end of the file ({file_len} bytes)",
                path.display()
            )));
        }
        if length > MAX_EXTERNAL_TENSOR_BYTES {
            return Err(err(format!(
                "{}: length {length} is more than the {MAX_EXTERNAL_TENSOR_BYTES} bytes qfold \
                 reads for one tensor (MAX_EXTERNAL_TENSOR_BYTES)",
                path.display()
            )));
        }
        if !read {
            // Left in the file, with every key explicit for whoever reads it.
            let entry = |k: &str, v: String| {
                let mut e = StringStringEntryProto::new();
                e.key = k.into();
                e.value = v;
                e
            };
            t.external_data = vec![
                entry("location", location.clone()),
                entry("offset", offset.to_string()),
                entry("length", length.to_string()),
            ];
            external.insert(t.name.clone());
            return Ok(());
        }
        let mut buf = Vec::new();
        buf.try_reserve_exact(length as usize).map_err(|_| {
            err(format!(
                "{}: cannot allocate {length} bytes for this tensor",
                path.display()
            ))
        })?;
        file.seek(SeekFrom::Start(offset))
            .and_then(|_| Read::by_ref(file).take(length).read_to_end(&mut buf))
            .map_err(|e| err(format!("{}: {e}", path.display())))?;
        if buf.len() as u64 != length {
            return Err(err(format!(
                "{}: {} bytes read of the {length} declared (the file shrank?)",
                path.display(),
                buf.len()
            )));
        }
        t.raw_data = buf;
        t.external_data.clear();
        t.data_location = DataLocation::DEFAULT.into();
        external.insert(t.name.clone());
        Ok(())
    })?;
    model.external = external;
    model.files.extend(order);
    Ok(())
}

/// Bytes a tensor's data takes.
fn data_bytes(t: &TensorProto) -> usize {
    if !t.raw_data.is_empty() {
        return t.raw_data.len();
    }
    t.float_data.len() * 4
        + t.int32_data.len() * 4
        + t.int64_data.len() * 8
        + t.double_data.len() * 8
        + t.uint64_data.len() * 8
}

/// Whether a tensor's data can go to an external data file: a type qfold reads (strings and
/// unknown types stay inline).
fn has_raw_form(t: &TensorProto) -> bool {
    super::tensor::ElemType::from_onnx(t.data_type).is_some()
}

/// Saves a model atomically. External data, when any, goes to `<file name>.data` beside it.
/// Refused before anything is written: a destination (or its `.data`) that exists and is not a
/// regular file, and one that is a file the model was read from ([`Model::files`]; see
/// [`save_in_place`]). Model and data file are written to temporary files, then renamed into
/// place together: a failure or a signal leaves neither behind.
pub fn save(model: &Model, path: impl AsRef<Path>, options: &SaveOptions) -> Result<()> {
    save_checked(model, path.as_ref(), options, false)
}

/// [`save`], allowing `path` to be the model's own file (the first of [`Model::files`]) and
/// its `<file>.data` to be the model's external data file: the new files replace the old ones
/// only once both are complete. Its other external data files are still never replaced.
pub fn save_in_place(model: &Model, path: impl AsRef<Path>, options: &SaveOptions) -> Result<()> {
    save_checked(model, path.as_ref(), options, true)
}

fn save_checked(model: &Model, path: &Path, options: &SaveOptions, in_place: bool) -> Result<()> {
    crate::files::check_destination(path)?;
    if let Some(input) = model.files.first() {
        crate::files::check_output(input, path, in_place)?;
    }
    crate::files::check_output_against(&model.files, path, in_place)?;
    let limit = options.inline_limit.unwrap_or(PROTOBUF_LIMIT);
    let total = model.proto.compute_size();
    let mut chosen: BTreeSet<String> = match options.external {
        ExternalData::Never => BTreeSet::new(),
        ExternalData::Keep => model.external.clone(),
        ExternalData::Threshold(min) => {
            let mut set = BTreeSet::new();
            for_each_tensor(&model.proto, &mut |t| {
                if data_bytes(t) >= min && !t.name.is_empty() {
                    set.insert(t.name.clone());
                }
                Ok(())
            })?;
            set
        }
    };
    if total > limit && options.external == ExternalData::Keep {
        // Move the largest tensors out until what stays inline fits.
        let mut sizes = Vec::new();
        for_each_tensor(&model.proto, &mut |t| {
            if !t.name.is_empty() {
                sizes.push((data_bytes(t) as u64, t.name.clone()));
            }
            Ok(())
        })?;
        sizes.sort_unstable_by(|a, b| b.cmp(a));
        let mut inline = total;
        for (size, name) in sizes {
            if inline <= limit / 2 {
                break;
            }
            if chosen.insert(name) {
                inline = inline.saturating_sub(size);
            }
        }
    }
    if chosen.is_empty() {
        if total > limit {
            return Err(Error::Encode {
                what: path.display().to_string(),
                reason: format!(
                    "{total} bytes exceeds protobuf's 2 GiB limit: save it with external data"
                ),
            });
        }
        let mut tmp = Staged::new(path)?;
        write_proto(&mut tmp, &model.proto)?;
        return crate::files::commit(vec![tmp]);
    }
    save_with_external(model, path, &chosen, limit)
}

fn save_with_external(
    model: &Model,
    path: &Path,
    chosen: &BTreeSet<String>,
    limit: u64,
) -> Result<()> {
    let file_name = path
        .file_name()
        .ok_or_else(|| Error::Usage(format!("{}: not a file path", path.display())))?
        .to_string_lossy()
        .to_string();
    let location = format!("{file_name}.data");
    let data_path = path.with_file_name(&location);
    crate::files::check_data_destination(path)?;
    let mut data_tmp = Staged::new(&data_path)?;
    // The data file is written from the model as it is (borrowed); then the message to save
    // is a copy in which the chosen initializers carry no data, so no second copy of the
    // weights is ever made. Tensors elsewhere (Constant nodes, subgraphs) are copied with
    // the nodes and emptied below.
    let mut placed: std::collections::VecDeque<(u64, usize)> = Default::default();
    data_tmp
        .write_with(|data_w| write_external_data(model, chosen, &data_path, &mut placed, data_w))?;
    let mut proto = copy_without_data(&model.proto, chosen);
    refer_to_external(&mut proto, chosen, &location, &mut placed)?;
    if !placed.is_empty() {
        return Err(Error::Encode {
            what: path.display().to_string(),
            reason: format!(
                "external data: {} tensors written but not referred to",
                placed.len()
            ),
        });
    }
    let size = proto.compute_size();
    if size > limit {
        return Err(Error::Encode {
            what: path.display().to_string(),
            reason: format!("{size} bytes stay inline even with external data"),
        });
    }
    let mut tmp = Staged::new(path)?;
    write_proto(&mut tmp, &proto)?;
    // Both complete: the data file first, the model that refers to it last.
    crate::files::commit(vec![data_tmp, tmp])
}

fn write_proto(tmp: &mut Staged, proto: &ModelProto) -> Result<()> {
    let what = tmp.dest().display().to_string();
    tmp.write_with(|w| {
        proto.write_to_writer(w).map_err(|e| Error::Encode {
            what: what.clone(),
            reason: e.to_string(),
        })
    })?;
    // Test hook: a pause with the temporary files complete and not yet renamed, so a test can
    // send a signal at that moment.
    if let Some(ms) = std::env::var_os("QFOLD_TEST_PAUSE_BEFORE_COMMIT_MS")
        .and_then(|v| v.to_str().and_then(|v| v.parse::<u64>().ok()))
    {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
    Ok(())
}

/// Moves the `chosen` tensors' data to `data_w`, each aligned to 4 KiB, and points them at it.
/// Writes the data of every tensor in `chosen` (in [`for_each_tensor`] order) to `data_w`,
/// each aligned to 4 KiB as ONNX's own writer does for mmap-friendliness, and records where
/// each went (offset, length) in `placed`, in the same order.
fn write_external_data(
    model: &Model,
    chosen: &BTreeSet<String>,
    data_path: &Path,
    placed: &mut std::collections::VecDeque<(u64, usize)>,
    data_w: &mut dyn Write,
) -> Result<()> {
    let mut offset: u64 = 0;
    for_each_tensor(&model.proto, &mut |t| {
        if !chosen.contains(&t.name) || !has_raw_form(t) {
            return Ok(());
        }
        // raw_data borrowed; typed fields converted (one tensor at a time)
        let converted;
        let raw: &[u8] = if !t.raw_data.is_empty() {
            &t.raw_data
        } else {
            converted = TensorData::from_proto(t)
                .map_err(|e| Error::tensor(&t.name, e.to_string()))?
                .to_proto("")
                .raw_data;
            &converted
        };
        let pad = (4096 - offset % 4096) % 4096;
        data_w
            .write_all(&vec![0u8; pad as usize])
            .and_then(|_| data_w.write_all(raw))
            .map_err(|e| Error::io(data_path, e))?;
        offset += pad;
        placed.push_back((offset, raw.len()));
        offset += raw.len() as u64;
        Ok(())
    })
}

/// The message with every field copied except the data of the main graph's initializers
/// named in `chosen` (struct literals list every field, so none is forgotten, unknown
/// fields included).
fn copy_without_data(p: &ModelProto, chosen: &BTreeSet<String>) -> ModelProto {
    let graph = p.graph.as_ref().map(|g| GraphProto {
        node: g.node.clone(),
        name: g.name.clone(),
        initializer: g
            .initializer
            .iter()
            .map(|t| {
                if chosen.contains(&t.name) {
                    TensorProto {
                        dims: t.dims.clone(),
                        data_type: t.data_type,
                        segment: t.segment.clone(),
                        float_data: vec![],
                        int32_data: vec![],
                        string_data: t.string_data.clone(),
                        int64_data: vec![],
                        name: t.name.clone(),
                        doc_string: t.doc_string.clone(),
                        raw_data: vec![],
                        external_data: t.external_data.clone(),
                        data_location: t.data_location,
                        double_data: vec![],
                        uint64_data: vec![],
                        metadata_props: t.metadata_props.clone(),
                        special_fields: t.special_fields.clone(),
                    }
                } else {
                    t.clone()
                }
            })
            .collect(),
        sparse_initializer: g.sparse_initializer.clone(),
        doc_string: g.doc_string.clone(),
        input: g.input.clone(),
        output: g.output.clone(),
        value_info: g.value_info.clone(),
        quantization_annotation: g.quantization_annotation.clone(),
        metadata_props: g.metadata_props.clone(),
        special_fields: g.special_fields.clone(),
    });
    ModelProto {
        ir_version: p.ir_version,
        opset_import: p.opset_import.clone(),
        producer_name: p.producer_name.clone(),
        producer_version: p.producer_version.clone(),
        domain: p.domain.clone(),
        model_version: p.model_version,
        doc_string: p.doc_string.clone(),
        graph: graph.into(),
        metadata_props: p.metadata_props.clone(),
        training_info: p.training_info.clone(),
        functions: p.functions.clone(),
        special_fields: p.special_fields.clone(),
    }
}

/// Points every tensor of `chosen` at its place in the data file (`placed`, in
/// [`for_each_tensor_mut`] order, the order [`write_external_data`] wrote them) and clears its
/// inline data. A tensor with no raw form ([`has_raw_form`]) was not written and stays inline.
fn refer_to_external(
    proto: &mut ModelProto,
    chosen: &BTreeSet<String>,
    location: &str,
    placed: &mut std::collections::VecDeque<(u64, usize)>,
) -> Result<()> {
    for_each_tensor_mut(proto, &mut |t| {
        if !chosen.contains(&t.name) || !has_raw_form(t) {
            return Ok(());
        }
        let Some((offset, length)) = placed.pop_front() else {
            return Err(Error::Encode {
                what: t.name.clone(),
                reason: "external data: more tensors to refer to than were written".into(),
            });
        };
        let entry = |k: &str, v: String| {
            let mut e = StringStringEntryProto::new();
            e.key = k.into();
            e.value = v;
            e
        };
        t.external_data = vec![
            entry("location", location.to_string()),
            entry("offset", offset.to_string()),
            entry("length", length.to_string()),
        ];
        t.data_location = DataLocation::EXTERNAL.into();
        t.raw_data.clear();
        t.float_data.clear();
        t.int32_data.clear();
        t.int64_data.clear();
        t.double_data.clear();
        t.uint64_data.clear();
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_locations() {
        assert!(safe_relative("weights.bin").is_ok());
        assert!(safe_relative("sub/./w.bin").is_ok());
        assert!(safe_relative("../w.bin").unwrap_err().contains(".."));
        assert!(safe_relative("a/../../w.bin").is_err());
        assert!(safe_relative("/etc/passwd")
            .unwrap_err()
            .contains("absolute"));
        assert!(safe_relative("").is_err());
    }

    /// A model whose only external tensor, `w`, sits in an If node's then-branch.
    fn subgraph_model(location: &str) -> Vec<u8> {
        use super::super::proto::{AttributeProto, GraphProto};
        let mut w = TensorProto::new();
        w.name = "w".into();
        w.data_type = 1;
        w.dims = vec![4];
        w.data_location = DataLocation::EXTERNAL.into();
        for (k, v) in [("location", location), ("offset", "0"), ("length", "16")] {
            let mut e = StringStringEntryProto::new();
            e.key = k.into();
            e.value = v.into();
            w.external_data.push(e);
        }
        let mut branch = GraphProto::new();
        branch.name = "then".into();
        branch.initializer.push(w);
        let mut a = AttributeProto::new();
        a.name = "then_branch".into();
        a.g = Some(branch).into();
        let mut n = NodeProto::new();
        n.op_type = "If".into();
        n.attribute.push(a);
        let mut g = GraphProto::new();
        g.node.push(n);
        let mut m = ModelProto::new();
        m.graph = Some(g).into();
        m.write_to_bytes().unwrap()
    }

    #[cfg(unix)]
    #[test]
    fn subgraph_external_data_is_confined_too() {
        let dir = std::env::temp_dir().join(format!("qfold-io-sub-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("w.bin"), [0u8; 16]).unwrap();
        let _ = std::fs::remove_file(dir.join("link.bin"));
        std::os::unix::fs::symlink("/etc/passwd", dir.join("link.bin")).unwrap();
        let ok = load_bytes(&subgraph_model("w.bin"), Some(&dir), "m").unwrap();
        assert!(ok.external.contains("w"));
        assert_eq!(ok.files, [dir.canonicalize().unwrap().join("w.bin")]);
        let e = load_bytes(&subgraph_model("link.bin"), Some(&dir), "m")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("tensor 'w'") && e.contains("outside the folder"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
