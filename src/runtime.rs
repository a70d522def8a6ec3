//! The only module that imports tract: load a model, set concrete input facts, expose
//! intermediate values as outputs, run.
//!
//! The model handed to tract is the encoded message; its `value_info` and output shapes are
//! ignored (tract is told to), since shapes written by shape inference may hold symbolic
//! dimensions that conflict with the concrete inputs of a run. The saved model is never touched.

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
        let graph = Graph::of_model(model);
        graph.check()?;
        // tract reports bad tensor data without naming the tensor, or not at all.
        for_each_tensor(&model.proto, &mut |t| check_proto(t))?;
        let real_inputs: Vec<String> = graph.real_inputs().iter().map(|v| v.name.clone()).collect();
        let mut facts = Vec::with_capacity(real_inputs.len());
        for name in &real_inputs {
            let t = sample
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, t)| t)
                .ok_or_else(|| Error::input(name, "no value given for this model input"))?;
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
        let bytes = model.to_bytes()?;
        let typed = guarded("loading the model", || {
            let mut m = tract_onnx::onnx()
                .with_ignore_output_shapes(true)
                .with_ignore_value_info(true)
                .model_for_read(&mut bytes.as_slice())?;
            for (i, f) in facts.into_iter().enumerate() {
                m.set_input_fact(i, f)?;
            }
            m.select_outputs_by_name(&outputs)?;
            m.into_typed()
        })?;
        check_sizes(&typed, max_elements)?;
        let plan = guarded("optimizing the model", || {
            typed.into_optimized()?.into_runnable()
        })?;
        Ok(Runner {
            plan,
            inputs: real_inputs,
            outputs,
        })
    }

    /// Names of the values `run` returns, in order.
    pub fn output_names(&self) -> &[String] {
        &self.outputs
    }

    /// Runs one sample; returns the outputs in `output_names` order.
    pub fn run(&self, sample: &Sample) -> Result<Vec<TensorData>> {
        let mut inputs = TVec::new();
        for name in &self.inputs {
            let t = sample
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, t)| t)
                .ok_or_else(|| Error::input(name, "no value given for this model input"))?;
            inputs.push(to_tract(t)?.into_tvalue());
        }
        let out = guarded("running the model", || self.plan.run(inputs))?;
        out.iter()
            .zip(&self.outputs)
            .map(|(t, name)| from_tract(name, t))
            .collect()
    }
}

/// Runs `model` on one sample and returns its outputs by name.
pub fn run_once(model: &Model, sample: &Sample) -> Result<Vec<(String, TensorData)>> {
    let r = Runner::new(model, sample, &[])?;
    let out = r.run(sample)?;
    Ok(r.outputs.iter().cloned().zip(out).collect())
}
