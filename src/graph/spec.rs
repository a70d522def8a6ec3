//! Op specs, checked once: for every op that a fusion rule, the quantization plan, the QOperator
//! conversion or `inspect` reads, how many inputs and outputs it has, which inputs are required,
//! the kinds of its attributes and their valid ranges.
//!
//! A node is checked against its spec before any rule treats it as that op ([`is_op`]): a node
//! that fails is not matched by any rule, and the engine reports it with the reason (or fails,
//! naming it, when the user named it). After `is_op(n, "Conv")` a rule may read `n.input[0]`
//! and `n.input[1]` and the checked attributes without further checks.
//!
//! What a spec cannot know (ranks, channel counts, whether `group` divides the channels, whether
//! an axis is within the rank, whether scales match channels) depends on tensor shapes; the rules
//! check those where they read the tensors.
//!
//! Sizes are bounded here too: a spatial attribute (kernel, stride, dilation, pad) of more than
//! [`MAX_SPATIAL`] or a `group` over [`MAX_GROUP`] is refused, so no size computed from them can
//! overflow or ask for absurd memory.

use crate::onnx::proto::{attribute_proto::AttributeType, AttributeProto, NodeProto};

/// The largest kernel size, stride, dilation or pad qfold accepts (and hands to tract).
pub const MAX_SPATIAL: i64 = 1 << 16;
/// The largest Conv / ConvTranspose `group`.
pub const MAX_GROUP: i64 = 1 << 24;
/// The largest tensor rank an axis attribute may refer to.
pub const MAX_RANK: i64 = 64;

/// The kind and range of one attribute.
#[derive(Debug, Clone, Copy)]
pub enum AttrSpec {
    /// An INT in `[lo, hi]`.
    Int(&'static str, i64, i64),
    /// INTS, each in `[lo, hi]`.
    Ints(&'static str, i64, i64),
    /// A finite FLOAT, at least `lo`.
    Float(&'static str, f32),
    /// A STRING, one of the listed values.
    Str(&'static str, &'static [&'static str]),
    /// An attribute that must be present (kind checked by another entry).
    Required(&'static str),
}

/// What a node of one op type must look like.
#[derive(Debug, Clone, Copy)]
pub struct OpSpec {
    pub op: &'static str,
    /// Required inputs: present and non-empty.
    pub min_inputs: usize,
    /// Inputs at most (optional ones may be empty strings).
    pub max_inputs: usize,
    /// Required outputs: present and non-empty.
    pub min_outputs: usize,
    /// Outputs at most.
    pub max_outputs: usize,
    pub attrs: &'static [AttrSpec],
}

const S: i64 = MAX_SPATIAL;
const R: i64 = MAX_RANK;
const AUTO_PAD: &[&str] = &["NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"];
const CONV_ATTRS: &[AttrSpec] = &[
    AttrSpec::Int("group", 1, MAX_GROUP),
    AttrSpec::Ints("kernel_shape", 1, S),
    AttrSpec::Ints("strides", 1, S),
    AttrSpec::Ints("dilations", 1, S),
    AttrSpec::Ints("pads", 0, S),
    AttrSpec::Ints("output_padding", 0, S),
    AttrSpec::Ints("output_shape", 0, i32::MAX as i64),
    AttrSpec::Str("auto_pad", AUTO_PAD),
];
const POOL_ATTRS: &[AttrSpec] = &[
    AttrSpec::Required("kernel_shape"),
    AttrSpec::Ints("kernel_shape", 1, S),
    AttrSpec::Ints("strides", 1, S),
    AttrSpec::Ints("dilations", 1, S),
    AttrSpec::Ints("pads", 0, S),
    AttrSpec::Int("ceil_mode", 0, 1),
    AttrSpec::Int("count_include_pad", 0, 1),
    AttrSpec::Int("storage_order", 0, 1),
    AttrSpec::Str("auto_pad", AUTO_PAD),
];
const QDQ_ATTRS: &[AttrSpec] = &[
    AttrSpec::Int("axis", -R, R - 1),
    AttrSpec::Int("output_dtype", 0, 64),
    AttrSpec::Int("saturate", 0, 1),
    AttrSpec::Int("block_size", 0, i32::MAX as i64),
];
const AXIS_ATTR: &[AttrSpec] = &[AttrSpec::Int("axis", -R, R)];
const AXES_ATTR: &[AttrSpec] = &[AttrSpec::Ints("axes", -R, R - 1)];

const fn spec(
    op: &'static str,
    inputs: (usize, usize),
    outputs: (usize, usize),
    attrs: &'static [AttrSpec],
) -> OpSpec {
    OpSpec {
        op,
        min_inputs: inputs.0,
        max_inputs: inputs.1,
        min_outputs: outputs.0,
        max_outputs: outputs.1,
        attrs,
    }
}

/// The table. Ops not listed are not read by any rule; [`check`] accepts them as they are.
pub const SPECS: &[OpSpec] = &[
    spec("Conv", (2, 3), (1, 1), CONV_ATTRS),
    spec("ConvTranspose", (2, 3), (1, 1), CONV_ATTRS),
    spec(
        "BatchNormalization",
        (5, 5),
        (1, 5),
        &[
            AttrSpec::Float("epsilon", 0.0),
            AttrSpec::Float("momentum", f32::MIN),
            AttrSpec::Int("training_mode", 0, 1),
            AttrSpec::Int("spatial", 0, 1),
            AttrSpec::Int("is_test", 0, 1),
        ],
    ),
    spec(
        "Gemm",
        (2, 3),
        (1, 1),
        &[
            AttrSpec::Int("transA", 0, 1),
            AttrSpec::Int("transB", 0, 1),
            AttrSpec::Float("alpha", f32::MIN),
            AttrSpec::Float("beta", f32::MIN),
        ],
    ),
    spec("MatMul", (2, 2), (1, 1), &[]),
    spec("Add", (2, 2), (1, 1), &[]),
    spec("Sub", (2, 2), (1, 1), &[]),
    spec("Mul", (2, 2), (1, 1), &[]),
    spec("Div", (2, 2), (1, 1), &[]),
    spec("Relu", (1, 1), (1, 1), &[]),
    spec("Sigmoid", (1, 1), (1, 1), &[]),
    spec("Identity", (1, 1), (1, 1), &[]),
    spec(
        "Dropout",
        (1, 3),
        (1, 2),
        &[
            AttrSpec::Float("ratio", 0.0),
            AttrSpec::Int("seed", i64::MIN, i64::MAX),
        ],
    ),
    spec("Softmax", (1, 1), (1, 1), AXIS_ATTR),
    spec(
        "Clip",
        (1, 3),
        (1, 1),
        &[
            AttrSpec::Float("min", f32::NEG_INFINITY),
            AttrSpec::Float("max", f32::NEG_INFINITY),
        ],
    ),
    spec("QuantizeLinear", (2, 3), (1, 1), QDQ_ATTRS),
    spec("DequantizeLinear", (2, 3), (1, 1), QDQ_ATTRS),
    spec("QLinearConv", (8, 9), (1, 1), CONV_ATTRS),
    spec("QLinearMatMul", (8, 8), (1, 1), &[]),
    spec(
        "Reshape",
        (1, 2),
        (1, 1),
        &[AttrSpec::Int("allowzero", 0, 1)],
    ),
    spec("Flatten", (1, 1), (1, 1), AXIS_ATTR),
    spec(
        "Transpose",
        (1, 1),
        (1, 1),
        &[AttrSpec::Ints("perm", 0, R - 1)],
    ),
    spec("Squeeze", (1, 2), (1, 1), AXES_ATTR),
    spec("Unsqueeze", (1, 2), (1, 1), AXES_ATTR),
    spec("MaxPool", (1, 1), (1, 2), POOL_ATTRS),
    spec("AveragePool", (1, 1), (1, 1), POOL_ATTRS),
    spec("GlobalAveragePool", (1, 1), (1, 1), &[]),
    spec(
        "Concat",
        (1, usize::MAX),
        (1, 1),
        &[AttrSpec::Required("axis"), AttrSpec::Int("axis", -R, R - 1)],
    ),
    spec("Constant", (0, 0), (1, 1), &[]),
    // The ops the quantization plan reads since issue 9 (activations and data movement): only
    // what the plan and the QOperator rules read is checked; other attributes pass as they are.
    spec(
        "HardSigmoid",
        (1, 1),
        (1, 1),
        &[
            AttrSpec::Float("alpha", f32::MIN),
            AttrSpec::Float("beta", f32::MIN),
        ],
    ),
    spec("HardSwish", (1, 1), (1, 1), &[]),
    spec(
        "LeakyRelu",
        (1, 1),
        (1, 1),
        &[AttrSpec::Float("alpha", f32::MIN)],
    ),
    spec("PRelu", (2, 2), (1, 1), &[]),
    spec(
        "InstanceNormalization",
        (3, 3),
        (1, 1),
        &[AttrSpec::Float("epsilon", 0.0)],
    ),
    spec(
        "Split",
        (1, 2),
        (1, usize::MAX),
        &[
            AttrSpec::Int("axis", -R, R - 1),
            AttrSpec::Ints("split", 0, i64::MAX),
            AttrSpec::Int("num_outputs", 1, i64::MAX),
        ],
    ),
    spec("Slice", (1, 5), (1, 1), &[]),
    spec(
        "Gather",
        (2, 2),
        (1, 1),
        &[AttrSpec::Int("axis", -R, R - 1)],
    ),
    spec(
        "DepthToSpace",
        (1, 1),
        (1, 1),
        &[
            AttrSpec::Required("blocksize"),
            AttrSpec::Int("blocksize", 1, S),
            AttrSpec::Str("mode", &["DCR", "CRD"]),
        ],
    ),
    spec(
        "SpaceToDepth",
        (1, 1),
        (1, 1),
        &[
            AttrSpec::Required("blocksize"),
            AttrSpec::Int("blocksize", 1, S),
        ],
    ),
    spec(
        "Resize",
        (1, 4),
        (1, 1),
        &[AttrSpec::Str("mode", &["nearest", "linear", "cubic"])],
    ),
    spec(
        "Pad",
        (1, 4),
        (1, 1),
        &[
            AttrSpec::Str("mode", &["constant", "reflect", "edge", "wrap"]),
            AttrSpec::Float("value", f32::NEG_INFINITY),
        ],
    ),
];

/// The spec of a standard-domain op, if qfold reads that op.
pub fn spec_of(n: &NodeProto) -> Option<&'static OpSpec> {
    if !(n.domain.is_empty() || n.domain == "ai.onnx") {
        return None;
    }
    SPECS.iter().find(|s| s.op == n.op_type)
}

fn kind(a: &AttributeProto) -> Option<AttributeType> {
    a.type_.enum_value().ok()
}

fn check_attr(n: &NodeProto, spec: &AttrSpec) -> Result<(), String> {
    let name = match *spec {
        AttrSpec::Int(name, ..)
        | AttrSpec::Ints(name, ..)
        | AttrSpec::Float(name, _)
        | AttrSpec::Str(name, _)
        | AttrSpec::Required(name) => name,
    };
    let mut found = n.attribute.iter().filter(|a| a.name == name);
    let Some(a) = found.next() else {
        return match spec {
            AttrSpec::Required(_) => Err(format!("attribute '{name}' is required")),
            _ => Ok(()),
        };
    };
    if found.next().is_some() {
        return Err(format!("attribute '{name}' is given twice"));
    }
    let wrong_kind = |want: &str| {
        Err(format!(
            "attribute '{name}' should be {want}, found type {}",
            a.type_.value()
        ))
    };
    match *spec {
        AttrSpec::Required(_) => Ok(()),
        AttrSpec::Int(_, lo, hi) => {
            if kind(a) != Some(AttributeType::INT) {
                return wrong_kind("an int");
            }
            if a.i < lo || a.i > hi {
                return Err(format!(
                    "attribute '{name}' = {} is outside [{lo}, {hi}]",
                    a.i
                ));
            }
            Ok(())
        }
        AttrSpec::Ints(_, lo, hi) => {
            if kind(a) != Some(AttributeType::INTS) {
                return wrong_kind("a list of ints");
            }
            if a.ints.len() > MAX_RANK as usize * 2 {
                return Err(format!(
                    "attribute '{name}' has {} entries (at most {})",
                    a.ints.len(),
                    MAX_RANK * 2
                ));
            }
            match a.ints.iter().find(|&&v| v < lo || v > hi) {
                Some(v) => Err(format!(
                    "attribute '{name}' has the entry {v}, outside [{lo}, {hi}]"
                )),
                None => Ok(()),
            }
        }
        AttrSpec::Float(_, lo) => {
            if kind(a) != Some(AttributeType::FLOAT) {
                return wrong_kind("a float");
            }
            // Clip's min/max may be infinite; every other float must be finite.
            let ok = if lo == f32::NEG_INFINITY {
                !a.f.is_nan()
            } else {
                a.f.is_finite() && a.f >= lo
            };
            if ok {
                Ok(())
            } else {
                Err(format!("attribute '{name}' = {} is not valid", a.f))
            }
        }
        AttrSpec::Str(_, allowed) => {
            if kind(a) != Some(AttributeType::STRING) {
                return wrong_kind("a string");
            }
            let s = String::from_utf8_lossy(&a.s);
            if allowed.contains(&s.as_ref()) {
                Ok(())
            } else {
                Err(format!(
                    "attribute '{name}' = '{s}' is not one of {}",
                    allowed.join(", ")
                ))
            }
        }
    }
}

/// Checks a node against its op's spec; `Err` says what is wrong. Ops without a spec pass.
pub fn check(n: &NodeProto) -> Result<(), String> {
    match spec_of(n) {
        Some(spec) => check_with(spec, n),
        None => Ok(()),
    }
}

/// [`check`] by op type whatever the node's domain: tract runs a node by its op type alone,
/// so a `com.microsoft` MaxPool with a kernel of 2^63 reaches tract's MaxPool. Checked before
/// a model is handed to tract ([`super::guard`]), not by the rules, which match the default
/// domain only.
pub fn check_any_domain(n: &NodeProto) -> Result<(), String> {
    match SPECS.iter().find(|s| s.op == n.op_type) {
        Some(spec) => check_with(spec, n),
        None => Ok(()),
    }
}

fn check_with(spec: &OpSpec, n: &NodeProto) -> Result<(), String> {
    let ni = n.input.len();
    if ni < spec.min_inputs || ni > spec.max_inputs {
        return Err(arity("inputs", ni, spec.min_inputs, spec.max_inputs));
    }
    if let Some(k) = n.input[..spec.min_inputs].iter().position(String::is_empty) {
        return Err(format!("required input {k} is empty"));
    }
    let no = n.output.len();
    if no < spec.min_outputs || no > spec.max_outputs {
        return Err(arity("outputs", no, spec.min_outputs, spec.max_outputs));
    }
    if let Some(k) = n.output[..spec.min_outputs]
        .iter()
        .position(String::is_empty)
    {
        return Err(format!("required output {k} is empty"));
    }
    for a in spec.attrs {
        check_attr(n, a)?;
    }
    Ok(())
}

fn arity(what: &str, n: usize, lo: usize, hi: usize) -> String {
    if lo == hi {
        format!("has {n} {what}, expects {lo}")
    } else if hi == usize::MAX {
        format!("has {n} {what}, expects at least {lo}")
    } else {
        format!("has {n} {what}, expects {lo} to {hi}")
    }
}

/// True when `n` is the standard-domain op `op` and passes its spec: the test every rule uses
/// before it reads a node's inputs or attributes.
pub fn is_op(n: &NodeProto, op: &str) -> bool {
    n.op_type == op && (n.domain.is_empty() || n.domain == "ai.onnx") && check(n).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::attr;

    fn node(op: &str, inputs: &[&str], outputs: &[&str]) -> NodeProto {
        let mut n = NodeProto::new();
        n.op_type = op.into();
        n.name = "n".into();
        n.input = inputs.iter().map(|s| s.to_string()).collect();
        n.output = outputs.iter().map(|s| s.to_string()).collect();
        n
    }

    #[test]
    fn arity_and_required_inputs() {
        assert!(check(&node("Conv", &["x", "w"], &["y"])).is_ok());
        assert_eq!(
            check(&node("Conv", &["x"], &["y"])).unwrap_err(),
            "has 1 inputs, expects 2 to 3"
        );
        assert_eq!(
            check(&node("Conv", &["x", ""], &["y"])).unwrap_err(),
            "required input 1 is empty"
        );
        assert!(check(&node("Conv", &["x", "w", ""], &["y"])).is_ok());
        assert!(check(&node("BatchNormalization", &["x", "s", "b", "m"], &["y"])).is_err());
        assert!(check(&node("Gemm", &["a", "b"], &[])).is_err());
        assert!(!is_op(&node("MatMul", &["a"], &["y"]), "MatMul"));
        // ops without a spec pass as they are
        assert!(check(&node("Foo", &[], &[])).is_ok());
    }

    #[test]
    fn attribute_kinds_and_ranges() {
        let mut c = node("Conv", &["x", "w"], &["y"]);
        attr::set(&mut c, attr::make_int("group", 1 << 62));
        assert!(check(&c).unwrap_err().contains("'group'"));
        attr::set(&mut c, attr::make_int("group", 0));
        assert!(check(&c).is_err());
        attr::set(&mut c, attr::make_int("group", 2));
        attr::set(&mut c, attr::make_ints("pads", &[0, 0, 1 << 32, 0]));
        assert!(check(&c).unwrap_err().contains("4294967296"));
        attr::set(&mut c, attr::make_ints("pads", &[1, 1, 1, 1]));
        assert!(check(&c).is_ok());
        attr::set(&mut c, attr::make_float("group", 1.0));
        assert!(check(&c).unwrap_err().contains("should be an int"));

        let mut bn = node("BatchNormalization", &["x", "s", "b", "m", "v"], &["y"]);
        attr::set(&mut bn, attr::make_float("epsilon", f32::NAN));
        assert!(check(&bn).is_err());
        attr::set(&mut bn, attr::make_float("epsilon", 1e-3));
        assert!(check(&bn).is_ok());

        let mut dq = node("DequantizeLinear", &["q", "s"], &["y"]);
        attr::set(&mut dq, attr::make_int("axis", 1000));
        assert!(check(&dq).is_err());
        let mut cat = node("Concat", &["a", "b"], &["y"]);
        assert!(check(&cat).unwrap_err().contains("required"));
        attr::set(&mut cat, attr::make_int("axis", 1));
        assert!(check(&cat).is_ok());
    }
}
