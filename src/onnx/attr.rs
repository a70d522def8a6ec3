//! Typed attribute getters. Each getter checks the attribute's declared kind; ONNX defaults are
//! declared once, in [`defaults`], and passed by the caller.

use super::proto::{attribute_proto::AttributeType, AttributeProto, NodeProto, TensorProto};
use crate::error::{Error, Result};

/// ONNX attribute defaults used by qfold's rules.
pub mod defaults {
    /// BatchNormalization `epsilon`.
    pub const BN_EPSILON: f32 = 1e-5;
    /// BatchNormalization `momentum` (unused by inference).
    pub const BN_MOMENTUM: f32 = 0.9;
    /// Conv / ConvTranspose `group`.
    pub const GROUP: i64 = 1;
    /// Gemm `alpha` and `beta`.
    pub const GEMM_ALPHA: f32 = 1.0;
    pub const GEMM_BETA: f32 = 1.0;
    /// Gemm `transA` / `transB`.
    pub const GEMM_TRANS: i64 = 0;
    /// QuantizeLinear / DequantizeLinear `axis`.
    pub const QDQ_AXIS: i64 = 1;
    /// Flatten `axis`.
    pub const FLATTEN_AXIS: i64 = 1;
}

fn kind_error(node: &NodeProto, a: &AttributeProto, want: &str) -> Error {
    Error::Node {
        node: node.name.clone(),
        op_type: node.op_type.clone(),
        reason: format!(
            "attribute '{}' should be {want}, found type {}",
            a.name,
            a.type_.value()
        ),
    }
}

/// The attribute named `name`, if present.
pub fn find<'a>(node: &'a NodeProto, name: &str) -> Option<&'a AttributeProto> {
    node.attribute.iter().find(|a| a.name == name)
}

fn kind(a: &AttributeProto) -> Option<AttributeType> {
    a.type_.enum_value().ok()
}

/// An INT attribute, or `default` when absent.
pub fn int(node: &NodeProto, name: &str, default: i64) -> Result<i64> {
    match find(node, name) {
        None => Ok(default),
        Some(a) if kind(a) == Some(AttributeType::INT) => Ok(a.i),
        Some(a) => Err(kind_error(node, a, "an int")),
    }
}

/// A FLOAT attribute, or `default` when absent.
pub fn float(node: &NodeProto, name: &str, default: f32) -> Result<f32> {
    match find(node, name) {
        None => Ok(default),
        Some(a) if kind(a) == Some(AttributeType::FLOAT) => Ok(a.f),
        Some(a) => Err(kind_error(node, a, "a float")),
    }
}

/// An INTS attribute, if present.
pub fn ints(node: &NodeProto, name: &str) -> Result<Option<Vec<i64>>> {
    match find(node, name) {
        None => Ok(None),
        Some(a) if kind(a) == Some(AttributeType::INTS) => Ok(Some(a.ints.clone())),
        Some(a) => Err(kind_error(node, a, "a list of ints")),
    }
}

/// A STRING attribute, if present.
pub fn string(node: &NodeProto, name: &str) -> Result<Option<String>> {
    match find(node, name) {
        None => Ok(None),
        Some(a) if kind(a) == Some(AttributeType::STRING) => {
            Ok(Some(String::from_utf8_lossy(&a.s).into_owned()))
        }
        Some(a) => Err(kind_error(node, a, "a string")),
    }
}

/// A TENSOR attribute, if present.
pub fn tensor<'a>(node: &'a NodeProto, name: &str) -> Result<Option<&'a TensorProto>> {
    match find(node, name) {
        None => Ok(None),
        Some(a) if kind(a) == Some(AttributeType::TENSOR) => match a.t.as_ref() {
            Some(t) => Ok(Some(t)),
            None => Err(kind_error(node, a, "a tensor (the tensor is missing)")),
        },
        Some(a) => Err(kind_error(node, a, "a tensor")),
    }
}

/// Builds an INT attribute.
pub fn make_int(name: &str, v: i64) -> AttributeProto {
    let mut a = AttributeProto::new();
    a.name = name.into();
    a.type_ = AttributeType::INT.into();
    a.i = v;
    a
}

/// Builds a FLOAT attribute.
pub fn make_float(name: &str, v: f32) -> AttributeProto {
    let mut a = AttributeProto::new();
    a.name = name.into();
    a.type_ = AttributeType::FLOAT.into();
    a.f = v;
    a
}

/// Builds an INTS attribute.
pub fn make_ints(name: &str, v: &[i64]) -> AttributeProto {
    let mut a = AttributeProto::new();
    a.name = name.into();
    a.type_ = AttributeType::INTS.into();
    a.ints = v.to_vec();
    a
}

/// Builds a TENSOR attribute.
pub fn make_tensor(name: &str, t: TensorProto) -> AttributeProto {
    let mut a = AttributeProto::new();
    a.name = name.into();
    a.type_ = AttributeType::TENSOR.into();
    a.t = protobuf::MessageField::some(t);
    a
}

/// Sets (replacing or adding) an attribute on a node.
pub fn set(node: &mut NodeProto, a: AttributeProto) {
    match node.attribute.iter_mut().find(|x| x.name == a.name) {
        Some(x) => *x = a,
        None => node.attribute.push(a),
    }
}
