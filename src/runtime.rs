//! The only module that imports tract: load a model, set concrete input facts, expose
//! intermediate values as outputs, run.
//!
//! The model is handed to tract as tract's own protobuf types ([`tract_proto`]): the graph
//! without its initializers goes through one small encode / decode, and each initializer is
//! copied field by field, so no model is ever encoded whole and protobuf's 2 GiB limit does
//! not apply. Its `value_info` and output shapes are ignored (tract is told to), since shapes
//! written by shape inference may hold symbolic dimensions that conflict with the concrete
//! inputs of a run. The saved model is never touched.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use tract_onnx::prelude::*;

use crate::error::{Error, Result};
use crate::graph::Graph;
use crate::onnx::io::for_each_tensor;
use crate::onnx::proto::{tensor_shape_proto::dimension::Value as Dim, type_proto};
use crate::onnx::tensor::check_proto;
use crate::onnx::{ElemType, Model, TensorData};

/// One set of named model inputs.
pub type Sample = Vec<(String, TensorData)>;

/// `model` as tract's protobuf types, without encoding it whole: everything but the main
/// graph's initializers (nodes, Constant tensors, subgraphs, functions: small in practice)
/// is encoded and decoded once, and each initializer is copied into tract's `TensorProto`
/// field by field. The result holds one copy of the weights, dropped once tract has read it.
pub fn tract_proto(model: &Model) -> Result<tract_onnx::pb::ModelProto> {
    tract_proto_with(model, false, None)
}

/// [`tract_proto`], with every DequantizeLinear of constant inputs replaced by its float
/// result when `fold_dequantize` ([`dequantized_constant`]): tract's analyser evaluates
/// them element by element (a third of the time `check` spent on a QDQ resnet50), and the
/// result is the same to the bit.
fn tract_proto_with(
    model: &Model,
    fold_dequantize: bool,
    nodes: Option<Vec<crate::onnx::proto::NodeProto>>,
) -> Result<tract_onnx::pb::ModelProto> {
    let (mut out, used, results) = tract_parts(model, fold_dequantize, nodes)?;
    let graph = out.graph.get_or_insert_with(Default::default);
    graph.initializer = model
        .graph()
        .initializer
        .iter()
        .zip(&used)
        .filter(|(_, &u)| u)
        .map(|(t, _)| tensor_to_pb(t))
        .chain(results)
        .collect();
    Ok(out)
}

/// What [`tract_proto_with`] and [`Runner::new_lending`] hand tract besides the main graph's
/// initializers: the skeleton ([`pb_skeleton`]) without the DequantizeLinear nodes folded
/// (when `fold_dequantize`), which of the initializers tract needs (those only folded nodes
/// read, the int8 weights, are left out), and the folded results as initializers.
fn tract_parts(
    model: &Model,
    fold_dequantize: bool,
    nodes: Option<Vec<crate::onnx::proto::NodeProto>>,
) -> Result<(
    tract_onnx::pb::ModelProto,
    Vec<bool>,
    Vec<tract_onnx::pb::TensorProto>,
)> {
    let g = model.graph();
    let mut out = pb_skeleton(model, nodes)?;
    let all = vec![true; g.initializer.len()];
    if !fold_dequantize {
        return Ok((out, all, Vec::new()));
    }
    let index = Graph::of_model(model);
    let mut folded: Vec<bool> = vec![false; g.node.len()];
    let mut results = Vec::new();
    for (i, n) in g.node.iter().enumerate() {
        if let Some(t) = dequantized_constant(&index, n) {
            folded[i] = true;
            let mut proto = t.to_proto(&n.output[0]);
            drop(t);
            results.push(tensor_to_pb_moved(&mut proto));
        }
    }
    if results.is_empty() {
        return Ok((out, all, results));
    }
    let graph = out.graph.get_or_insert_with(Default::default);
    // by output, not position: the skeleton's node list may differ from the model's (a
    // Softmax next to quantization decomposed, see `skeleton_only`)
    let gone: std::collections::HashSet<&str> = g
        .node
        .iter()
        .zip(&folded)
        .filter(|(_, &f)| f)
        .map(|(n, _)| n.output[0].as_str())
        .collect();
    graph.node.retain(|n| {
        !(n.op_type == "DequantizeLinear"
            && n.output.first().is_some_and(|o| gone.contains(o.as_str())))
    });
    // Initializers only the folded nodes read (the int8 weights) are left out.
    let mut used: std::collections::HashSet<&str> = std::collections::HashSet::new();
    for (i, n) in g.node.iter().enumerate() {
        if !folded[i] {
            used.extend(n.input.iter().map(String::as_str));
            for a in &n.attribute {
                // subgraphs may read outer values: keep everything when there are any
                if a.g.is_some() || !a.graphs.is_empty() {
                    used.extend(g.initializer.iter().map(|t| t.name.as_str()));
                }
            }
        }
    }
    used.extend(g.output.iter().map(|o| o.name.as_str()));
    used.extend(g.input.iter().map(|o| o.name.as_str()));
    let used = g
        .initializer
        .iter()
        .map(|t| used.contains(t.name.as_str()))
        .collect();
    Ok((out, used, results))
}

/// The float value of a DequantizeLinear node whose inputs are all constant initializers
/// (not overridable graph inputs): `((x - zero_point) as f32) * scale`, per tensor or along
/// `axis`, which is how tract computes it (and ONNX Runtime). `None` for anything else
/// (block quantization, unexpected types or shapes), which tract then evaluates itself.
fn dequantized_constant(g: &Graph, n: &crate::onnx::proto::NodeProto) -> Option<TensorData> {
    if n.op_type != "DequantizeLinear"
        || !(n.domain.is_empty() || n.domain == "ai.onnx")
        || n.output.len() != 1
        || n.output[0].is_empty()
        || !(2..=3).contains(&n.input.len())
        || n.attribute
            .iter()
            .any(|a| a.name == "block_size" && a.i != 0)
    {
        return None;
    }
    let constant = |name: &str| -> Option<TensorData> {
        if name.is_empty() || g.is_input(name) {
            return None;
        }
        TensorData::from_proto(g.initializer(name)?).ok()
    };
    let x = constant(&n.input[0])?;
    if !matches!(x.elem_type(), ElemType::I8 | ElemType::U8 | ElemType::I32) {
        return None;
    }
    let TensorData::F32(scale) = constant(&n.input[1])? else {
        return None;
    };
    let zp: Vec<i64> = match n.input.get(2).filter(|z| !z.is_empty()) {
        Some(z) => {
            let z = constant(z)?;
            if z.elem_type() != x.elem_type() || z.len() != scale.len() {
                return None;
            }
            z.to_i64()?
        }
        None => vec![0; scale.len()],
    };
    // the integers read in place, not widened into a copy (8 bytes per int8 weight)
    let xs: Box<dyn Iterator<Item = i64> + '_> = match &x {
        TensorData::I8(a) => Box::new(a.iter().map(|&v| i64::from(v))),
        TensorData::U8(a) => Box::new(a.iter().map(|&v| i64::from(v))),
        TensorData::I32(a) => Box::new(a.iter().map(|&v| i64::from(v))),
        _ => return None,
    };
    let shape = x.shape().to_vec();
    let per_tensor = scale.len() == 1 && scale.ndim() <= 1;
    let scale: Vec<f32> = scale.iter().copied().collect();
    let values: Vec<f32> = if per_tensor {
        xs.map(|v| ((v - zp[0]) as i32) as f32 * scale[0]).collect()
    } else {
        let axis = n
            .attribute
            .iter()
            .find(|a| a.name == "axis")
            .map_or(1, |a| a.i);
        let rank = shape.len() as i64;
        let axis = if axis < 0 { axis + rank } else { axis };
        let axis = usize::try_from(axis).ok().filter(|&a| a < shape.len())?;
        if shape[axis] != scale.len() || scale.is_empty() {
            return None;
        }
        let inner: usize = shape[axis + 1..].iter().product();
        let channels = scale.len();
        xs.enumerate()
            .map(|(k, v)| {
                let c = (k / inner.max(1)) % channels;
                (v as f32 - zp[c] as f32) * scale[c]
            })
            .collect()
    };
    ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&shape), values)
        .ok()
        .map(TensorData::F32)
}

/// One tensor as tract's `TensorProto`, field by field (no encoding, so no size limit).
fn tensor_to_pb(t: &crate::onnx::proto::TensorProto) -> tract_onnx::pb::TensorProto {
    use tract_onnx::pb;
    pb::TensorProto {
        dims: t.dims.clone(),
        data_type: t.data_type,
        segment: t.segment.as_ref().map(|s| pb::tensor_proto::Segment {
            begin: s.begin,
            end: s.end,
        }),
        float_data: t.float_data.clone(),
        int32_data: t.int32_data.clone(),
        string_data: t.string_data.clone(),
        int64_data: t.int64_data.clone(),
        name: t.name.clone(),
        doc_string: t.doc_string.clone(),
        raw_data: t.raw_data.clone(),
        double_data: t.double_data.clone(),
        uint64_data: t.uint64_data.clone(),
        data_location: match t.data_location.value() {
            0 => None,
            v => Some(v),
        },
        external_data: t
            .external_data
            .iter()
            .map(|e| pb::StringStringEntryProto {
                key: e.key.clone(),
                value: e.value.clone(),
            })
            .collect(),
    }
}

/// A model prepared by tract for one set of input types and shapes.
pub struct Runner {
    plan: Arc<TypedRunnableModel>,
    inputs: Vec<String>,
    outputs: Vec<String>,
}

fn datum_type(t: ElemType) -> Result<DatumType> {
    Ok(match t {
        ElemType::F32 => f32::datum_type(),
        ElemType::F64 => f64::datum_type(),
        ElemType::F16 => f16::datum_type(),
        ElemType::I8 => i8::datum_type(),
        ElemType::U8 => u8::datum_type(),
        ElemType::I16 => i16::datum_type(),
        ElemType::U16 => u16::datum_type(),
        ElemType::I32 => i32::datum_type(),
        ElemType::I64 => i64::datum_type(),
        ElemType::U32 => u32::datum_type(),
        ElemType::U64 => u64::datum_type(),
        ElemType::Bool => bool::datum_type(),
        ElemType::BF16 => {
            return Err(Error::Usage(
                "tract has no bfloat16 tensors: cast bfloat16 inputs to float".into(),
            ))
        }
    })
}

fn to_tract(t: &TensorData) -> Result<Tensor> {
    Ok(match t {
        TensorData::F32(a) => a.clone().into(),
        TensorData::F64(a) => a.clone().into(),
        TensorData::F16(a) => a.clone().into(),
        TensorData::I8(a) => a.clone().into(),
        TensorData::U8(a) => a.clone().into(),
        TensorData::I16(a) => a.clone().into(),
        TensorData::U16(a) => a.clone().into(),
        TensorData::I32(a) => a.clone().into(),
        TensorData::I64(a) => a.clone().into(),
        TensorData::U32(a) => a.clone().into(),
        TensorData::U64(a) => a.clone().into(),
        TensorData::Bool(a) => a.clone().into(),
        TensorData::BF16(_) => {
            return Err(Error::Usage(
                "tract has no bfloat16 tensors: cast bfloat16 inputs to float".into(),
            ))
        }
    })
}

fn from_tract(name: &str, t: &Tensor) -> Result<TensorData> {
    let e = |e: TractError| Error::runtime(format!("reading output '{name}'"), e);
    let dt = t.datum_type();
    macro_rules! get {
        ($ty:ty, $v:ident) => {
            TensorData::$v(t.to_plain_array_view::<$ty>().map_err(e)?.to_owned())
        };
    }
    Ok(if dt == f32::datum_type() {
        get!(f32, F32)
    } else if dt == f64::datum_type() {
        get!(f64, F64)
    } else if dt == f16::datum_type() {
        get!(f16, F16)
    } else if dt.unquantized() == i8::datum_type() {
        TensorData::I8(
            t.cast_to_dt(i8::datum_type())
                .map_err(e)?
                .to_plain_array_view::<i8>()
                .map_err(e)?
                .to_owned(),
        )
    } else if dt.unquantized() == u8::datum_type() {
        TensorData::U8(
            t.cast_to_dt(u8::datum_type())
                .map_err(e)?
                .to_plain_array_view::<u8>()
                .map_err(e)?
                .to_owned(),
        )
    } else if dt == i16::datum_type() {
        get!(i16, I16)
    } else if dt == u16::datum_type() {
        get!(u16, U16)
    } else if dt.unquantized() == i32::datum_type() {
        TensorData::I32(
            t.cast_to_dt(i32::datum_type())
                .map_err(e)?
                .to_plain_array_view::<i32>()
                .map_err(e)?
                .to_owned(),
        )
    } else if dt == i64::datum_type() {
        get!(i64, I64)
    } else if dt == u32::datum_type() {
        get!(u32, U32)
    } else if dt == u64::datum_type() {
        get!(u64, U64)
    } else if dt == bool::datum_type() {
        get!(bool, Bool)
    } else if dt == TDim::datum_type() {
        // shape arithmetic (Shape -> Cast -> ...) evaluated by tract: concrete dims are int64
        TensorData::I64(
            t.cast_to_dt(i64::datum_type())
                .map_err(e)?
                .to_plain_array_view::<i64>()
                .map_err(e)?
                .to_owned(),
        )
    } else {
        return Err(Error::runtime(
            format!("reading output '{name}'"),
            format!("tract produced a {dt:?} tensor, which qfold does not read"),
        ));
    })
}

/// Refuses a sample that does not fit the model's declared inputs: another element type,
/// another rank, or another size where the declared dim is a number (symbolic dims take any).
fn check_declared(graph: &Graph, sample: &Sample) -> Result<()> {
    for v in graph.real_inputs() {
        let Some((_, t)) = sample.iter().find(|(n, _)| *n == v.name) else {
            continue;
        };
        let Some(type_proto::Value::TensorType(tt)) =
            v.type_.as_ref().and_then(|t| t.value.as_ref())
        else {
            continue;
        };
        if let Some(ty) = ElemType::from_onnx(tt.elem_type) {
            if ty != t.elem_type() {
                return Err(Error::input(
                    &v.name,
                    format!(
                        "{} values given, the model declares {}",
                        t.elem_type().name(),
                        ty.name()
                    ),
                ));
            }
        }
        let Some(shape) = tt.shape.as_ref() else {
            continue;
        };
        let given = t.shape();
        let fits = shape.dim.len() == given.len()
            && shape.dim.iter().zip(given).all(|(d, &g)| match d.value {
                Some(Dim::DimValue(v)) if v >= 0 => v as usize == g,
                _ => true,
            });
        if !fits {
            let declared: Vec<String> = shape
                .dim
                .iter()
                .map(|d| match &d.value {
                    Some(Dim::DimValue(v)) => v.to_string(),
                    Some(Dim::DimParam(p)) if !p.is_empty() => p.clone(),
                    _ => "?".into(),
                })
                .collect();
            return Err(Error::input(
                &v.name,
                format!(
                    "shape {given:?} does not match the declared [{}]",
                    declared.join(", ")
                ),
            ));
        }
    }
    Ok(())
}

thread_local! {
    /// Set while this thread runs tract inside [`guarded`]: where its panic happened, if it did.
    static IN_TRACT: std::cell::RefCell<Option<Option<String>>> =
        const { std::cell::RefCell::new(None) };
}

/// Installs, once per process, a panic hook that stays silent for panics inside [`guarded`]
/// (they become errors, so the default hook's "thread panicked" text and backtrace would only
/// alarm) and defers to the hook it replaced for every other panic.
fn install_quiet_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let quiet = IN_TRACT.with(|s| match s.borrow_mut().as_mut() {
                Some(at) => {
                    *at = info.location().map(|l| {
                        // From the crate folder on: tract-core-0.23.9/src/...
                        let file = l.file();
                        let short = file.rfind("/tract-").map_or(file, |i| &file[i + 1..]);
                        format!("{short}:{}", l.line())
                    });
                    true
                }
                None => false,
            });
            if !quiet {
                previous(info);
            }
        }));
    });
}

/// Runs `f`, turning a panic inside tract into an error.
fn guarded<T>(context: &str, f: impl FnOnce() -> TractResult<T>) -> Result<T> {
    install_quiet_hook();
    let outer = IN_TRACT.with(|s| s.replace(Some(None)));
    let result = catch_unwind(AssertUnwindSafe(f));
    let at = IN_TRACT.with(|s| s.replace(outer)).flatten();
    match result {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(Error::runtime(context, e)),
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            let at = at.map(|a| format!(" (at {a})")).unwrap_or_default();
            Err(Error::runtime(
                context,
                format!("internal error in tract: {msg}{at}"),
            ))
        }
    }
}

/// The most elements qfold lets one tensor of a run have (8 GiB of f32).
pub const MAX_TENSOR_ELEMENTS: usize = 1 << 31;

/// Refuses a model whose value shapes, for the run's inputs, would need absurd memory (a pad
/// or a dim of 2^16 and more), naming the node, before tract allocates anything.
fn check_sizes(typed: &TypedModel, max_elements: usize) -> Result<()> {
    for node in typed.nodes() {
        for o in &node.outputs {
            let Some(shape) = o.fact.shape.as_concrete() else {
                continue;
            };
            let volume = shape.iter().try_fold(1usize, |v, &d| v.checked_mul(d));
            if volume.is_none_or(|v| v > max_elements) {
                return Err(Error::Runtime {
                    context: format!("node '{}'", node.name),
                    reason: format!(
                        "its output would have shape {shape:?}, more than {max_elements} elements"
                    ),
                });
            }
        }
    }
    Ok(())
}

impl Runner {
    /// Prepares `model` for inputs shaped like `sample`. The model's outputs come first, then
    /// `extra_outputs` (any value names of the main graph).
    pub fn new(model: &Model, sample: &Sample, extra_outputs: &[String]) -> Result<Runner> {
        Runner::with_limit(model, sample, extra_outputs, MAX_TENSOR_ELEMENTS)
    }

    /// [`Runner::new`] refusing any value of more than `max_elements` elements.
    pub fn with_limit(
        model: &Model,
        sample: &Sample,
        extra_outputs: &[String],
        max_elements: usize,
    ) -> Result<Runner> {
        let prepared = Prepared::new(model, sample, extra_outputs)?;
        let proto = tract_proto_with(model, true, shape_ifs_resolved(model, sample))?;
        let typed = prepared
            .parse(proto)
            .map_err(|e| crate::graph::guard::explain_tract_failure(&Graph::of_model(model), e))?;
        prepared.finish(typed, max_elements)
    }

    /// [`Runner::new`] lending `model`'s initializer data to tract instead of copying it: the
    /// data moves into tract's protobuf message, tract makes its own tensors from it, and it
    /// moves back, so preparing the runner never holds a third copy of the weights. Constant
    /// DequantizeLinear nodes are folded as [`Runner::new`] folds them. `model` is as it was
    /// afterwards, whatever happened.
    pub fn new_lending(
        model: &mut Model,
        sample: &Sample,
        extra_outputs: &[String],
    ) -> Result<Runner> {
        let prepared = Prepared::new(model, sample, extra_outputs)?;
        let nodes = shape_ifs_resolved(model, sample);
        let (mut proto, used, results) = tract_parts(model, true, nodes)?;
        let graph = proto.graph.get_or_insert_with(Default::default);
        graph.initializer = model
            .graph_mut()
            .initializer
            .iter_mut()
            .zip(&used)
            .filter(|(_, &u)| u)
            .map(|(t, _)| tensor_to_pb_moved(t))
            .chain(results)
            .collect();
        let mut lent = Vec::new();
        let typed = prepared.parse_keeping(&proto);
        if let Some(g) = proto.graph.as_mut() {
            lent = std::mem::take(&mut g.initializer);
        }
        drop(proto);
        // the lent tensors come first, in order; the folded results after them are dropped
        let ours = model
            .graph_mut()
            .initializer
            .iter_mut()
            .zip(&used)
            .filter(|(_, &u)| u)
            .map(|(t, _)| t);
        for (ours, theirs) in ours.zip(lent) {
            give_back(ours, theirs);
        }
        let typed = typed
            .map_err(|e| crate::graph::guard::explain_tract_failure(&Graph::of_model(model), e))?;
        prepared.finish(typed, MAX_TENSOR_ELEMENTS)
    }

    /// Names of the values `run` returns, in order.
    pub fn output_names(&self) -> &[String] {
        &self.outputs
    }

    /// Runs one sample; returns the outputs in `output_names` order.
    pub fn run(&self, sample: &Sample) -> Result<Vec<TensorData>> {
        let out = self.run_tract(sample)?;
        out.iter()
            .zip(&self.outputs)
            .map(|(t, name)| from_tract(name, t))
            .collect()
    }

    /// Runs one sample and hands each output, by position in [`Runner::output_names`], to
    /// `visit` without copying it when it is a contiguous float32 tensor (other types are
    /// converted to [`TensorData`] first). For calibration, which reads every activation of
    /// every sample: copying them out of tract was a fifth of its time.
    pub fn run_visit(
        &self,
        sample: &Sample,
        visit: &mut dyn FnMut(usize, Output<'_>) -> Result<()>,
    ) -> Result<()> {
        let out = self.run_tract(sample)?;
        for (k, (t, name)) in out.iter().zip(&self.outputs).enumerate() {
            let borrowed = (t.datum_type() == f32::datum_type())
                .then(|| {
                    t.to_plain_array_view::<f32>()
                        .ok()
                        .and_then(|v| v.to_slice())
                })
                .flatten();
            match borrowed {
                Some(s) => visit(k, Output::F32(s))?,
                None => visit(k, Output::Data(from_tract(name, t)?))?,
            }
        }
        Ok(())
    }

    fn run_tract(&self, sample: &Sample) -> Result<TVec<TValue>> {
        let mut inputs = TVec::new();
        for name in &self.inputs {
            let t = sample
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, t)| t)
                .ok_or_else(|| Error::input(name, "no value given for this model input"))?;
            inputs.push(to_tract(t)?.into_tvalue());
        }
        guarded("running the model", || self.plan.run(inputs))
    }
}

/// A tensor's data as the runner checks it: in memory ([`check_proto`]), or left in its file
/// by [`crate::onnx::load_lazy`], whose length must then be what the shape needs.
fn check_for_runner(t: &crate::onnx::proto::TensorProto) -> Result<()> {
    use crate::onnx::proto::tensor_proto::DataLocation;
    if t.data_location.value() != DataLocation::EXTERNAL as i32 {
        return check_proto(t);
    }
    let count = t.dims.iter().try_fold(1u64, |n, &d| {
        u64::try_from(d).ok().and_then(|d| n.checked_mul(d))
    });
    let size = ElemType::from_onnx(t.data_type).map(|e| e.size() as u64);
    let length = t
        .external_data
        .iter()
        .find(|e| e.key == "length")
        .and_then(|e| e.value.parse::<u64>().ok());
    match (count, size, length) {
        (Some(c), Some(s), Some(l)) if c.checked_mul(s) == Some(l) => Ok(()),
        _ => Err(Error::ExternalData {
            tensor: t.name.clone(),
            reason: format!(
                "{} bytes in the file for shape {:?} of {}",
                length.map_or("an unknown number of".into(), |l| l.to_string()),
                t.dims,
                crate::onnx::tensor::onnx_type_name(t.data_type)
            ),
        }),
    }
}

/// Reads external data for tract the way qfold reads it: a regular file (FIFOs and devices
/// refused without blocking), the range checked against the file's size before anything is
/// allocated, exactly `length` bytes. tract has already checked the path stays inside the
/// model's folder. (tract's own resolver memory-maps the file, which a file truncated under
/// it turns into a crash.)
struct FileResolver;

impl tract_onnx::data_resolver::ModelDataResolver for FileResolver {
    fn read_bytes_from_path(
        &self,
        buf: &mut Vec<u8>,
        p: &std::path::Path,
        offset: usize,
        length: Option<usize>,
    ) -> TractResult<()> {
        use std::io::{Read, Seek, SeekFrom};
        let (mut f, size) = crate::files::open_regular(p)
            .map_err(|e| TractError::msg(format!("{}: {e}", p.display())))?;
        let offset = offset as u64;
        let length = length.map_or(size.saturating_sub(offset), |l| l as u64);
        if offset.checked_add(length).is_none_or(|end| end > size) {
            return Err(TractError::msg(format!(
                "{}: offset {offset} + length {length} is past the end of the file ({size} bytes)",
                p.display()
            )));
        }
        let length = usize::try_from(length)?;
        buf.try_reserve_exact(length)
            .map_err(|_| TractError::msg(format!("cannot allocate {length} bytes")))?;
        f.seek(SeekFrom::Start(offset))?;
        let before = buf.len();
        (&mut f).take(length as u64).read_to_end(buf)?;
        if buf.len() - before != length {
            return Err(TractError::msg(format!(
                "{}: the file shrank while being read",
                p.display()
            )));
        }
        Ok(())
    }
}

/// What [`Runner`]'s constructors check and compute before tract reads the model.
struct Prepared {
    facts: Vec<InferenceFact>,
    /// "inputs 'x' [1, 3, 224, 224]": the shapes the model is loaded for, named in errors (a
    /// symbolic dim given a value too small for a kernel fails inside tract).
    shapes: String,
    real_inputs: Vec<String>,
    outputs: Vec<String>,
    /// The model's folder, for external data tract reads itself.
    dir: Option<String>,
}

impl Prepared {
    fn new(model: &Model, sample: &Sample, extra_outputs: &[String]) -> Result<Prepared> {
        let graph = Graph::of_model(model);
        graph.check()?;
        // tract reports bad tensor data without naming the tensor, or not at all.
        for_each_tensor(&model.proto, &mut check_for_runner)?;
        let real_inputs: Vec<String> = graph.real_inputs().iter().map(|v| v.name.clone()).collect();
        let mut facts = Vec::with_capacity(real_inputs.len());
        let mut shapes = Vec::new();
        for name in &real_inputs {
            let t = sample
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, t)| t)
                .ok_or_else(|| Error::input(name, "no value given for this model input"))?;
            if shapes.len() < 4 {
                shapes.push(format!("'{name}' {:?}", t.shape()));
            } else if shapes.len() == 4 {
                shapes.push("...".into());
            }
            facts.push(InferenceFact::dt_shape(
                datum_type(t.elem_type())?,
                t.shape(),
            ));
        }
        for (n, _) in sample {
            if !real_inputs.contains(n) {
                return Err(Error::input(n, "the model has no such input"));
            }
        }
        check_declared(&graph, sample)?;
        let ranks: Vec<(String, usize)> = sample
            .iter()
            .map(|(n, t)| (n.clone(), t.shape().len()))
            .collect();
        crate::graph::guard::check_for_tract(&graph, &ranks)?;
        for name in extra_outputs {
            if graph.producer(name).is_none() && !graph.is_input(name) {
                return Err(Error::Usage(format!(
                    "value '{name}' is not produced by any node of the main graph"
                )));
            }
        }
        let mut outputs: Vec<String> = model
            .graph()
            .output
            .iter()
            .map(|o| o.name.clone())
            .collect();
        outputs.extend(extra_outputs.iter().cloned());
        // External data left in its files (`load_lazy`) is read by tract, through
        // `FileResolver`, relative to the model's folder.
        let dir = match &model.dir {
            Some(d) => Some(d.to_str().map(str::to_string).ok_or_else(|| {
                Error::Usage(format!("{}: the model's folder is not UTF-8", d.display()))
            })?),
            None => None,
        };
        let shapes = match shapes.len() {
            0 => "no inputs".to_string(),
            1 => format!("input {}", shapes[0]),
            _ => format!("inputs {}", shapes.join(", ")),
        };
        Ok(Prepared {
            facts,
            shapes,
            real_inputs,
            outputs,
            dir,
        })
    }

    /// tract reads `proto` (dropped as soon as tract holds its own copy of the weights).
    fn parse(&self, proto: tract_onnx::pb::ModelProto) -> Result<TypedModel> {
        guarded(&self.loading(), move || {
            let m = self.read(&proto)?;
            drop(proto);
            self.typed(m)
        })
    }

    /// [`Prepared::parse`] leaving `proto` to the caller (whose data it lends).
    fn parse_keeping(&self, proto: &tract_onnx::pb::ModelProto) -> Result<TypedModel> {
        guarded(&self.loading(), || self.typed(self.read(proto)?))
    }

    fn loading(&self) -> String {
        format!("loading the model for {}", self.shapes)
    }

    fn read(&self, proto: &tract_onnx::pb::ModelProto) -> TractResult<InferenceModel> {
        let mut onnx = tract_onnx::onnx()
            .with_ignore_output_shapes(true)
            .with_ignore_value_info(true);
        onnx.provider = Arc::new(FileResolver);
        let parsed = onnx.parse(proto, self.dir.as_deref())?;
        if !parsed.unresolved_inputs.is_empty() {
            return Err(TractError::msg(format!(
                "could not resolve inputs at top level: {:?}",
                parsed.unresolved_inputs
            )));
        }
        Ok(parsed.model)
    }

    fn typed(&self, mut m: InferenceModel) -> TractResult<TypedModel> {
        for (i, f) in self.facts.iter().enumerate() {
            m.set_input_fact(i, f.clone())?;
        }
        m.select_outputs_by_name(&self.outputs)?;
        m.into_typed()
    }

    fn finish(self, typed: TypedModel, max_elements: usize) -> Result<Runner> {
        check_sizes(&typed, max_elements)?;
        let plan = guarded("optimizing the model", || {
            typed.into_optimized()?.into_runnable()
        })?;
        Ok(Runner {
            plan,
            inputs: self.real_inputs,
            outputs: self.outputs,
        })
    }
}

/// The main graph's nodes with the If nodes whose condition the shapes of `sample` decide
/// replaced by the branch they take ([`crate::graph::inline_if`]), or `None` (no such If, or
/// its condition could not be evaluated: tract's own error, explained, then says why).
fn shape_ifs_resolved(
    model: &Model,
    sample: &Sample,
) -> Option<Vec<crate::onnx::proto::NodeProto>> {
    crate::graph::inline_if::resolve(model, sample)
        .ok()
        .flatten()
        .map(|(nodes, _)| nodes)
}

/// `model` without its main graph's initializers, as tract's protobuf types: the nodes
/// (`nodes` in place of the main graph's when given), Constant tensors, subgraphs and
/// functions (small in practice) go through one encode / decode; the initializers are added by
/// the caller, copied or lent.
fn pb_skeleton(
    model: &Model,
    nodes: Option<Vec<crate::onnx::proto::NodeProto>>,
) -> Result<tract_onnx::pb::ModelProto> {
    use protobuf::Message;
    let skeleton = skeleton_only(model, nodes);
    let size = skeleton.compute_size();
    if size > crate::onnx::io::PROTOBUF_LIMIT {
        return Err(Error::Encode {
            what: "model".into(),
            reason: format!(
                "its nodes alone (Constant tensors, subgraphs) take {size} bytes, over \
                 protobuf's 2 GiB limit: tract cannot read them; move large Constant node \
                 tensors into initializers"
            ),
        });
    }
    let bytes = skeleton.write_to_bytes().map_err(|e| Error::Encode {
        what: "model".into(),
        reason: e.to_string(),
    })?;
    drop(skeleton);
    <tract_onnx::pb::ModelProto as prost::Message>::decode(bytes.as_slice())
        .map_err(|e| Error::runtime("handing the model to tract", e))
}

/// The message of `model` with everything but its main graph's initializers (and `nodes` as
/// its main graph's nodes when given).
fn skeleton_only(
    model: &Model,
    nodes: Option<Vec<crate::onnx::proto::NodeProto>>,
) -> crate::onnx::proto::ModelProto {
    use crate::onnx::proto::{GraphProto, ModelProto};
    let p = &model.proto;
    let g = model.graph();
    let mut graph = GraphProto::new();
    graph.name = g.name.clone();
    // what tract runs wrongly, rewritten as the same function in float
    let nodes = nodes.unwrap_or_else(|| g.node.clone());
    graph.node = crate::quant::decompose::softmax_for_tract(&nodes, g, model.opset().unwrap_or(0))
        .unwrap_or(nodes);
    graph.input = g.input.clone();
    graph.output = g.output.clone();
    graph.value_info = g.value_info.clone();
    graph.sparse_initializer = g.sparse_initializer.clone();
    let mut proto = ModelProto::new();
    proto.ir_version = p.ir_version;
    proto.opset_import = p.opset_import.clone();
    proto.producer_name = p.producer_name.clone();
    proto.producer_version = p.producer_version.clone();
    proto.domain = p.domain.clone();
    proto.model_version = p.model_version;
    proto.functions = p.functions.clone();
    proto.graph = protobuf::MessageField::some(graph);
    proto
}

/// [`tensor_to_pb`] moving the data fields out of `t` (given back by [`give_back`]).
fn tensor_to_pb_moved(t: &mut crate::onnx::proto::TensorProto) -> tract_onnx::pb::TensorProto {
    use tract_onnx::pb;
    pb::TensorProto {
        dims: t.dims.clone(),
        data_type: t.data_type,
        segment: t.segment.as_ref().map(|s| pb::tensor_proto::Segment {
            begin: s.begin,
            end: s.end,
        }),
        float_data: std::mem::take(&mut t.float_data),
        int32_data: std::mem::take(&mut t.int32_data),
        string_data: std::mem::take(&mut t.string_data),
        int64_data: std::mem::take(&mut t.int64_data),
        name: t.name.clone(),
        doc_string: t.doc_string.clone(),
        raw_data: std::mem::take(&mut t.raw_data),
        double_data: std::mem::take(&mut t.double_data),
        uint64_data: std::mem::take(&mut t.uint64_data),
        data_location: match t.data_location.value() {
            0 => None,
            v => Some(v),
        },
        external_data: t
            .external_data
            .iter()
            .map(|e| pb::StringStringEntryProto {
                key: e.key.clone(),
                value: e.value.clone(),
            })
            .collect(),
    }
}

/// Moves the data [`tensor_to_pb_moved`] lent back into `t`.
fn give_back(t: &mut crate::onnx::proto::TensorProto, pb: tract_onnx::pb::TensorProto) {
    t.raw_data = pb.raw_data;
    t.float_data = pb.float_data;
    t.int32_data = pb.int32_data;
    t.int64_data = pb.int64_data;
    t.double_data = pb.double_data;
    t.uint64_data = pb.uint64_data;
    t.string_data = pb.string_data;
}

/// An output as [`Runner::run_visit`] hands it over.
pub enum Output<'a> {
    /// Float32 values, borrowed from tract.
    F32(&'a [f32]),
    /// Any other output, converted.
    Data(TensorData),
}

/// Runs `model` on one sample and returns its outputs by name.
pub fn run_once(model: &Model, sample: &Sample) -> Result<Vec<(String, TensorData)>> {
    let r = Runner::new(model, sample, &[])?;
    let out = r.run(sample)?;
    Ok(r.outputs.iter().cloned().zip(out).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The piecewise conversion gives exactly what decoding the whole encoded message with
    /// prost gives, on every committed model (subgraphs, Constant nodes, typed fields,
    /// external data, float16, doubles...).
    #[test]
    fn tract_proto_equals_decoding_the_encoded_model() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("onnx_models");
        let mut seen = 0;
        for base in [root.clone(), root.join("conformance")] {
            for e in std::fs::read_dir(&base).unwrap() {
                let p = e.unwrap().path().join("model.onnx");
                if !p.is_file() {
                    continue;
                }
                let model = crate::onnx::load(&p).unwrap();
                let whole = <tract_onnx::pb::ModelProto as prost::Message>::decode(
                    model.to_bytes().unwrap().as_slice(),
                )
                .unwrap();
                let mut piecewise = tract_proto(&model).unwrap();
                // fields tract does not read and the skeleton leaves out
                let mut whole = whole;
                whole.doc_string.clear();
                whole.metadata_props.clear();
                whole.training_info.clear();
                if let (Some(a), Some(b)) = (whole.graph.as_mut(), piecewise.graph.as_mut()) {
                    a.doc_string.clear();
                    b.doc_string.clear();
                    a.quantization_annotation.clear();
                }
                assert_eq!(piecewise, whole, "{}", p.display());
                seen += 1;
            }
        }
        assert!(seen > 60, "{seen} models");
    }
}

#[cfg(test)]
mod lazy_tests {
    use super::*;

    /// A model loaded with its external data left in the file runs in tract (which reads the
    /// data through `FileResolver`) to the same bits as the model loaded whole; decoding one
    /// of its tensors in memory is an error naming it.
    #[test]
    fn a_lazily_loaded_model_runs_like_the_loaded_one() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("onnx_models/conformance/external_data");
        let whole = crate::onnx::load(dir.join("model.onnx")).unwrap();
        let lazy = crate::onnx::load_lazy(dir.join("model.onnx")).unwrap();
        assert!(!lazy.external.is_empty());
        let (_, input) =
            crate::verify::read_tensor_pb(&dir.join("test_data_set_0/input_0.pb")).unwrap();
        let sample = vec![("x".to_string(), input)];
        let a = Runner::new(&whole, &sample, &[])
            .unwrap()
            .run(&sample)
            .unwrap();
        let b = Runner::new(&lazy, &sample, &[])
            .unwrap()
            .run(&sample)
            .unwrap();
        assert_eq!(a, b);
        let name = lazy.external.iter().next().unwrap();
        let g = Graph::of_model(&lazy);
        let e = g.constant(name).unwrap_err().to_string();
        assert!(e.contains(name.as_str()) && e.contains("external"), "{e}");
    }
}

#[cfg(test)]
mod lending_tests {
    use super::*;

    /// A runner prepared with the weights lent gives the same outputs as one prepared from a
    /// copy, and the model is the same message afterwards.
    #[test]
    fn lending_runs_alike_and_gives_everything_back() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("onnx_models/digits_cnn/model.onnx");
        let mut model = crate::onnx::load(&path).unwrap();
        let before = model.to_bytes().unwrap();
        let sample = vec![(
            "input".to_string(),
            TensorData::F32(ndarray::ArrayD::from_shape_fn(
                ndarray::IxDyn(&[2, 1, 8, 8]),
                |i| ((i[0] * 64 + i[2] * 8 + i[3]) % 17) as f32 / 16.0,
            )),
        )];
        let copied = Runner::new(&model, &sample, &[])
            .unwrap()
            .run(&sample)
            .unwrap();
        let lent = Runner::new_lending(&mut model, &sample, &[])
            .unwrap()
            .run(&sample)
            .unwrap();
        assert_eq!(copied, lent);
        assert_eq!(model.to_bytes().unwrap(), before);
        // a failure inside tract (an op it does not know) gives the data back too
        let relu = model
            .graph()
            .node
            .iter()
            .position(|n| n.op_type == "Relu")
            .unwrap();
        model.graph_mut().node[relu].op_type = "NoSuchOp".into();
        let broken = model.to_bytes().unwrap();
        let e = Runner::new_lending(&mut model, &sample, &[]).err().unwrap();
        assert!(e.to_string().contains("NoSuchOp"), "{e}");
        assert_eq!(model.to_bytes().unwrap(), broken);
    }
}

#[cfg(test)]
mod dequantize_fold_tests {
    use super::*;
    use crate::graph::testing::*;

    /// A DequantizeLinear of constants, folded before tract, gives exactly
    /// `((x - zp) as f32) * scale`, per axis and per tensor: what tract computes itself.
    #[test]
    fn folded_dequantize_is_exact() {
        let x: Vec<i8> = (0..24).map(|k| (k * 11 % 255 - 127) as i8).collect();
        let scales = [0.013f32, 0.27, 1.9];
        for per_axis in [true, false] {
            let (scale, zp, attrs) = if per_axis {
                (
                    f32v(&scales),
                    i8t(&[3], vec![0, 3, -5]),
                    vec![int("axis", 0)],
                )
            } else {
                (f32t(&[], vec![scales[1]]), i8t(&[], vec![3]), vec![])
            };
            let m = model(
                vec![
                    node("DequantizeLinear", "dq", &["q", "s", "z"], &["w"], attrs),
                    node("Add", "add", &["inp", "w"], &["y"], vec![]),
                ],
                vec![("q", i8t(&[3, 8], x.clone())), ("s", scale), ("z", zp)],
                value_info("inp", crate::onnx::ElemType::F32, &[3, 8]),
                "y",
            );
            let sample = vec![("inp".to_string(), f32t(&[3, 8], vec![0.0; 24]))];
            let out = run_once(&m, &sample).unwrap();
            let TensorData::F32(y) = &out[0].1 else {
                panic!("float output")
            };
            for (k, &v) in y.iter().enumerate() {
                let c = k / 8;
                let (s, z) = if per_axis {
                    (scales[c], [0i32, 3, -5][c])
                } else {
                    (scales[1], 3)
                };
                let expected = (i32::from(x[k]) - z) as f32 * s;
                assert_eq!(
                    v.to_bits(),
                    expected.to_bits(),
                    "element {k}, per axis {per_axis}"
                );
            }
            // lending folds alike, and gives back the int8 weights it left out
            let mut lent = m.clone();
            let before = lent.to_bytes().unwrap();
            let runner = Runner::new_lending(&mut lent, &sample, &[]).unwrap();
            assert_eq!(runner.run(&sample).unwrap(), vec![out[0].1.clone()]);
            assert_eq!(lent.to_bytes().unwrap(), before);
        }
    }
}
