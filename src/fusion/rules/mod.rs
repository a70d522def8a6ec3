//! The fold rules, one file each, and the matching helpers they share.
//!
//! | file | rewrites |
//! |------|----------|
//! | [`conv_bn`] | Conv -> BN and ConvTranspose -> BN: weights and bias folded |
//! | [`gemm_bn`] | Gemm -> BN on a rank-2 output |
//! | [`matmul_bn`] | MatMul [-> Add] -> BN with a constant 2-D weight |
//! | [`bn_conv`] | BN -> unpadded, one-group Conv (forward fold) |
//! | [`conv_affine`] | Conv / ConvTranspose / Gemm -> Add, Sub, Mul, Div by a per-channel constant |
//! | [`unfoldable`] | no rewrite: says why a BN with no foldable neighbour stays |
//! | [`relu`] | no rewrite: the Conv/Linear/BN + Relu groups |
//!
//! Each rule is anchored at a BatchNormalization node (`conv_affine` at the Add / Sub / Mul / Div) and returns `Ok(None)` when its pattern
//! is not there, a decline with the reason when folding would not be exact, or the patch.
//!
//! Conditions shared by every fold (DESIGN §3):
//! - BN: inference form (`training_mode` 0, one output, no `spatial = 0`), constant parameters.
//! - The producer's output has exactly one consumer (the BN) and is not a graph output.
//! - Weights and biases are constant (initializers or Constant nodes); a weight initializer
//!   read by another node is cloned, never edited in place.
//! - Channel counts match.
//!
//! The fused node keeps the producer's name and inputs and produces the BN's output name.

pub mod bn_conv;
pub mod conv_affine;
pub mod conv_bn;
pub mod gemm_bn;
pub mod matmul_bn;
pub mod relu;
pub mod unfoldable;

use ndarray::{Array1, ArrayD, Ix1};

use super::fold::BnAffine;
use super::patterns::GroupKind;
use super::FusedGroup;
use crate::error::Result;
use crate::graph::engine;
use crate::graph::{ConstSource, Graph, Names, Patch};
use crate::onnx::attr::{self, defaults};
use crate::onnx::proto::{NodeProto, TensorProto};
use crate::onnx::{ElemType, TensorData};

pub use crate::graph::engine::label;
pub use crate::graph::spec::is_op;

/// What a fold rule decides.
pub type Outcome = engine::Outcome<FusedGroup>;

/// Declines with a formatted reason unless the condition holds.
macro_rules! decline_unless {
    ($cond:expr, $nodes:expr, $($reason:tt)+) => {
        if !$cond {
            return Ok(Some($crate::graph::engine::Outcome::Decline(
                $nodes.clone(),
                format!($($reason)+),
            )));
        }
    };
}
pub(crate) use decline_unless;

/// Unwraps `Ok(v)` of a `Result<T, String>`, or declines with the reason (prefixed).
macro_rules! or_decline {
    ($e:expr, $nodes:expr) => {
        match $e {
            Ok(v) => v,
            Err(r) => {
                return Ok(Some($crate::graph::engine::Outcome::Decline(
                    $nodes.clone(),
                    r,
                )))
            }
        }
    };
    ($e:expr, $nodes:expr, $prefix:expr) => {
        match $e {
            Ok(v) => v,
            Err(r) => {
                return Ok(Some($crate::graph::engine::Outcome::Decline(
                    $nodes.clone(),
                    format!("{} {r}", $prefix),
                )))
            }
        }
    };
}
pub(crate) use or_decline;

/// The record of a fold.
pub fn folded(kind: GroupKind, nodes: Vec<String>, output: &str) -> FusedGroup {
    FusedGroup {
        kind,
        nodes,
        folded: true,
        fuser: None,
        output: output.to_string(),
    }
}

/// Why `value` cannot be removed as an intermediate, if it cannot.
pub fn single_use(g: &Graph, value: &str) -> Option<String> {
    if g.is_output(value) {
        return Some(format!("'{value}' is a graph output"));
    }
    let n = g.consumers(value).len();
    (n != 1).then(|| format!("'{value}' has {n} consumers"))
}

/// A constant as f64 with its element type; a reason when it is not a float constant.
pub fn float_const(
    g: &Graph,
    name: &str,
) -> Result<std::result::Result<(ArrayD<f64>, ElemType), String>> {
    Ok(match g.constant(name)? {
        None => Err(format!("'{name}' is not a constant")),
        Some(t) if !t.elem_type().is_float() => Err(format!(
            "'{name}' is {}, not floating point",
            t.elem_type().name()
        )),
        Some(t) => Ok((t.to_f64(), t.elem_type())),
    })
}

/// A constant 1-D vector, or why it is not one.
pub fn float_vector(g: &Graph, name: &str) -> Result<std::result::Result<Array1<f64>, String>> {
    Ok(match float_const(g, name)? {
        Ok((a, _)) if a.ndim() == 1 => Ok(as_vec(a)),
        Ok((a, _)) => Err(format!("'{name}' has shape {:?}, not [C]", a.shape())),
        Err(r) => Err(r),
    })
}

/// The BN node's affine form, or why it cannot be folded. The node must pass its spec.
pub fn bn_affine(g: &Graph, bn: usize) -> Result<std::result::Result<BnAffine, String>> {
    let n = g.node(bn);
    if !is_op(n, "BatchNormalization") {
        return Ok(Err(match crate::graph::spec::check(n) {
            Err(r) => r,
            Ok(()) => format!(
                "'{}' is a {}, not a BatchNormalization",
                label(n),
                n.op_type
            ),
        }));
    }
    if attr::int(n, "training_mode", 0)? != 0 {
        return Ok(Err("training_mode = 1".into()));
    }
    if n.output.iter().skip(1).any(|o| !o.is_empty()) {
        return Ok(Err("it has training outputs (running mean/var)".into()));
    }
    if attr::int(n, "spatial", 1)? == 0 {
        return Ok(Err("spatial = 0".into()));
    }
    let eps = attr::float(n, "epsilon", defaults::BN_EPSILON)? as f64;
    let mut p = Vec::new();
    for name in &n.input[1..5] {
        match float_const(g, name)? {
            Ok((a, _)) => p.push(a),
            Err(r) => return Ok(Err(format!("BN parameter {r}"))),
        }
    }
    Ok(BnAffine::new(&p[0], &p[1], &p[2], &p[3], eps))
}

/// Writes a folded weight: in place when the initializer is read by this node only, else as a
/// new initializer (clone). Returns the name to use.
pub fn write_const(
    g: &Graph,
    patch: &mut Patch,
    names: &mut Names,
    orig: &str,
    value: ArrayD<f64>,
    ty: ElemType,
) -> Result<String> {
    let data = TensorData::from_f64(value, ty)?;
    let private = matches!(g.const_source(orig), Some(ConstSource::Initializer(_)))
        && g.consumers(orig).len() == 1
        && !g.is_output(orig);
    if private {
        patch.replace_initializer(data.to_proto(orig));
        Ok(orig.to_string())
    } else {
        let name = names.fresh(&format!("{orig}_fused"));
        patch.add_initializer(data.to_proto(&name));
        Ok(name)
    }
}

/// Adds a new initializer named after `base`; returns its name.
pub fn new_const(
    patch: &mut Patch,
    names: &mut Names,
    base: &str,
    value: ArrayD<f64>,
    ty: ElemType,
) -> Result<String> {
    let name = names.fresh(base);
    patch.add_initializer(TensorData::from_f64(value, ty)?.to_proto(&name));
    Ok(name)
}

/// Writes a Conv's folded weight and bias (a new bias initializer when it had none); returns
/// their names. `conv` passed its spec (two inputs at least).
pub fn write_weight_and_bias(
    g: &Graph,
    patch: &mut Patch,
    names: &mut Names,
    conv: &NodeProto,
    (w, b): (ArrayD<f64>, Array1<f64>),
    ty: ElemType,
) -> Result<(String, String)> {
    let wname = write_const(g, patch, names, &conv.input[1], w, ty)?;
    let bname = write_bias(g, patch, names, conv, b, ty)?;
    Ok((wname, bname))
}

/// Writes a Conv's folded bias (a new initializer when it had none); returns its name.
pub fn write_bias(
    g: &Graph,
    patch: &mut Patch,
    names: &mut Names,
    conv: &NodeProto,
    b: Array1<f64>,
    ty: ElemType,
) -> Result<String> {
    match conv.input.get(2).filter(|s| !s.is_empty()) {
        Some(bias) => write_const(g, patch, names, bias, b.into_dyn(), ty),
        None => new_const(
            patch,
            names,
            &format!("{}_bias", conv.input[1]),
            b.into_dyn(),
            ty,
        ),
    }
}

/// A float32 initializer held as raw bytes of exactly its declared size (the form large
/// weights take), for folds computed straight on the bytes.
pub fn raw_f32_initializer<'a>(g: &Graph<'a>, name: &str) -> Option<&'a TensorProto> {
    if !matches!(g.const_source(name), Some(ConstSource::Initializer(_))) {
        return None;
    }
    let t = g.initializer(name)?;
    let count = t.dims.iter().try_fold(1usize, |n, &d| {
        usize::try_from(d).ok().and_then(|d| n.checked_mul(d))
    })?;
    (t.data_type == ElemType::F32.onnx_code()
        && !t.raw_data.is_empty()
        && count.checked_mul(4) == Some(t.raw_data.len()))
    .then_some(t)
}

/// [`write_const`] for a float32 tensor of shape `dims` already in raw little-endian bytes:
/// the same initializer `TensorData::to_proto` would make.
pub fn write_raw_f32(
    g: &Graph,
    patch: &mut Patch,
    names: &mut Names,
    orig: &str,
    dims: Vec<i64>,
    raw: Vec<u8>,
) -> String {
    let private = matches!(g.const_source(orig), Some(ConstSource::Initializer(_)))
        && g.consumers(orig).len() == 1
        && !g.is_output(orig);
    let name = if private {
        orig.to_string()
    } else {
        names.fresh(&format!("{orig}_fused"))
    };
    let mut t = TensorProto::new();
    t.name = name.clone();
    t.data_type = ElemType::F32.onnx_code();
    t.dims = dims;
    t.raw_data = raw;
    if private {
        patch.replace_initializer(t);
    } else {
        patch.add_initializer(t);
    }
    name
}

/// A 1-D array of any array's values, in order.
pub fn as_vec(a: ArrayD<f64>) -> Array1<f64> {
    if a.ndim() == 1 {
        return a.into_dimensionality::<Ix1>().unwrap_or_default();
    }
    a.iter().copied().collect()
}

/// The rank of a value when the graph says it: declared input/output/value_info shapes, or
/// producers whose output rank is fixed (Gemm, Flatten).
pub fn known_rank(g: &Graph, value: &str) -> Option<usize> {
    use crate::onnx::proto::type_proto;
    let declared = g
        .declared_type(value)
        .and_then(|v| match v.value.as_ref()? {
            type_proto::Value::TensorType(t) => t.shape.as_ref().map(|s| s.dim.len()),
            _ => None,
        });
    declared.or_else(|| {
        let p = g.node(g.producer(value)?);
        (is_op(p, "Gemm") || is_op(p, "Flatten")).then_some(2)
    })
}
