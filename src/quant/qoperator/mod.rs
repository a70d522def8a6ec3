//! QDQ -> QOperator: rewrite rules over a QDQ graph, so a model quantized by qfold and a QDQ
//! model made elsewhere (ONNX Runtime's quantizer, a PyTorch QAT export) share one path.
//!
//! Rules, one file each, run to a fixed point by the rewrite engine ([`crate::graph::engine`])
//! in this order at each node (the helpers they share are in [`common`]):
//! - `constant` ([`constant`]): QuantizeLinear of a constant (a PyTorch QAT export quantizes its float weights
//!   in the graph) becomes the integer initializer it computes (f32 `x / scale`, half to even,
//!   saturated, as ONNX Runtime), and Identity of a constant (the PyTorch exporter's
//!   deduplicated initializers, zero points among them) becomes that constant.
//! - `fold_qat_bn` ([`qat_bn`]): DQ(w) -> Conv [-> per-channel Mul / Div / Add / Sub by constants] ->
//!   BatchNormalization (the chain is how PyTorch exports a fused QAT ConvBn:
//!   `Conv -> Div(bn scale) -> Add(conv bias) -> BN`). With the chain `m * y + a` and the BN
//!   `s * (y - mean) + beta`, the factor `f = s * m` folds into the per-channel weight scales:
//!   `w_scale'[o] = w_scale[o] * |f[o]|`, the int8 weights of a channel with `f[o] < 0` are
//!   negated (symmetric weights: zero point 0), and the bias becomes
//!   `(m * b + a - mean) * s + beta` (float; `conv` below quantizes it). Negating -128 (which
//!   PyTorch's symmetric qint8 range [-128, 127] produces) saturates to 127, one weight step off
//!   on those entries: +128 has no int8 code, per-channel weight zero points that would keep it
//!   exact are refused by ONNX Runtime's QLinearConv, and a negative scale breaks both runtimes.
//! - `bn_params_to_float` ([`bn_params`]): BN parameters behind DequantizeLinear of constants
//!   become float initializers, so the BN rules can fold them.
//! - `bn_to_depthwise` ([`bn_depthwise`]): DQ(x) -> BatchNormalization [-> Relu] -> Q becomes a depthwise 1x1 Conv
//!   with per-channel weights `s[c]` (stored exactly as +-127 * |s[c]| / 127) and bias
//!   `beta - mean * s`, which `conv` then turns into a QLinearConv.
//! - `conv` ([`conv`]): DQ(x), DQ(w), [DQ(b) or float b] -> Conv [-> Relu] -> Q becomes QLinearConv with
//!   per-tensor or per-channel weight scales and an int32 bias of scale `x_scale * w_scale`.
//!   A Relu is fused only when Q's zero point is its type's minimum (then
//!   `Q(Relu(v)) = Q(v)` exactly).
//! - `gemm` ([`gemm`]): DQ(A), DQ(B const), [C] -> Gemm (transA = 0) [-> Relu] -> Q becomes
//!   Unsqueeze -> QLinearConv with a 1-wide kernel -> Squeeze, all on 8-bit tensors: tract has
//!   no integer Gemm with a bias, QLinearMatMul has no bias input (adding it in float would need
//!   a float island and a second requantization), and a 1-D QLinearConv carries the int32 bias
//!   and per-channel scales exactly. `alpha` folds into the weight scale, `beta` into C.
//! - `matmul` ([`matmul`]): DQ(a), DQ(b) -> MatMul [-> Relu] -> Q becomes QLinearMatMul (b per tensor or per
//!   column).
//! - `data_movement` ([`data_movement`]): DQ -> Reshape / Flatten / Transpose / Squeeze / Unsqueeze / MaxPool /
//!   Split / Slice / Gather / nearest Resize / Pad -> Q with the same scale
//!   and zero point runs on the 8-bit tensor directly (Pad's constant becomes its 8-bit code).
//!
//! - `contrib` ([`contrib`]), with `allow_contrib_ops` only: ONNX Runtime's com.microsoft
//!   QLinearAdd, QLinearMul, QLinearConcat and QLinearGlobalAveragePool.
//!
//! Whatever no rule converts stays float between DequantizeLinear and QuantizeLinear; the
//! report lists each such float island.

pub mod bn_depthwise;
pub mod bn_params;
pub mod common;
pub mod constant;
pub mod contrib;
pub mod conv;
pub mod data_movement;
pub mod gemm;
pub mod matmul;
pub mod qat_bn;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::graph::engine::{self, Rule};
use crate::graph::Graph;
use crate::onnx::Model;
use common::{dq_of, is_op, label, Converted};

/// What `convert` did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ConvertReport {
    /// Each rewrite: rule name and the nodes it replaced.
    #[serde(serialize_with = "crate::report::ser::rules")]
    pub converted: Vec<(String, Vec<String>)>,
    /// Nodes computing in float between DequantizeLinear and QuantizeLinear.
    #[serde(serialize_with = "crate::report::ser::node_ops")]
    pub float_islands: Vec<(String, String)>,
    /// Candidates a rule matched but could not convert, with the reason.
    #[serde(serialize_with = "crate::report::ser::node_reasons")]
    pub skipped: Vec<(String, String)>,
    /// Conversions that are not exact, and by how much.
    pub inexact: Vec<String>,
    pub quantize_linear_left: usize,
    pub dequantize_linear_left: usize,
}

/// Options of [`convert`].
#[derive(Debug, Clone, Copy, Default)]
pub struct ConvertOptions {
    /// Also use ONNX Runtime's `com.microsoft` QLinearAdd, QLinearMul, QLinearConcat and
    /// QLinearGlobalAveragePool (tract cannot run them).
    pub allow_contrib_ops: bool,
}

pub const CONTRIB: &str = "com.microsoft";

/// Float compute nodes reading dequantized values: the float islands.
fn float_islands(g: &Graph) -> Vec<(String, String)> {
    g.nodes()
        .iter()
        .filter(|n| {
            !matches!(
                n.op_type.as_str(),
                "QuantizeLinear" | "DequantizeLinear" | "Constant"
            ) && n.input.iter().any(|x| dq_of(g, x).is_some())
        })
        .map(|n| (label(n), n.op_type.clone()))
        .collect()
}

/// Rewrites a QDQ model into QOperator form in place (standard domain only).
pub fn convert(model: &mut Model) -> Result<ConvertReport> {
    convert_with(model, ConvertOptions::default())
}

/// The rules, in the order they are tried at each node.
fn rules(opts: ConvertOptions, opset: i64) -> Vec<Rule<'static, Converted>> {
    let mut rules = vec![
        Rule::new("constant", |g: &Graph, i, _: &mut _| {
            constant::constant_node(g, i)
        }),
        Rule::new("bn_params_to_float", bn_params::bn_params_to_float),
        Rule::new("fold_qat_bn", qat_bn::fold_qat_bn),
        Rule::new("bn_to_depthwise", bn_depthwise::bn_to_depthwise),
        Rule::new("conv", conv::conv),
        Rule::new("gemm", move |g: &Graph, i, n: &mut _| {
            gemm::gemm(g, i, n, opset)
        }),
        Rule::new("matmul", matmul::matmul),
        Rule::new("data_movement", move |g: &Graph, i, n: &mut _| {
            data_movement::data_movement(g, i, n, opset)
        }),
    ];
    if opts.allow_contrib_ops {
        rules.push(Rule::new("contrib", contrib::contrib));
    }
    rules
}

/// Rewrites a QDQ model into QOperator form in place.
pub fn convert_with(model: &mut Model, opts: ConvertOptions) -> Result<ConvertReport> {
    let opset = model.opset().unwrap_or(0);
    if opset < 10 {
        return Err(Error::Usage(format!(
            "the model imports opset {opset}; QLinearConv and QLinearMatMul need opset 10"
        )));
    }
    let run = engine::run(model, &rules(opts, opset), true)?;
    let mut report = ConvertReport::default();
    for a in run.applied {
        if let Some(note) = a.record.inexact {
            report.inexact.push(note);
        }
        report.converted.push((a.rule, a.record.nodes));
    }
    for m in run.malformed {
        report
            .skipped
            .push((m.node, format!("malformed {}: {}", m.op_type, m.reason)));
    }
    for d in run.declined {
        let node = d.nodes.into_iter().next().unwrap_or_default();
        report.skipped.push((node, d.reason));
    }
    let contrib_used = model.graph().node.iter().any(|n| n.domain == CONTRIB);
    if contrib_used && !model.proto.opset_import.iter().any(|o| o.domain == CONTRIB) {
        let mut o = crate::onnx::proto::OperatorSetIdProto::new();
        o.domain = CONTRIB.into();
        o.version = 1;
        model.proto.opset_import.push(o);
    }
    let g = Graph::of_model(model);
    let count = |op: &str| g.nodes().iter().filter(|n| is_op(n, op)).count();
    report.float_islands = float_islands(&g);
    report.quantize_linear_left = count("QuantizeLinear");
    report.dequantize_linear_left = count("DequantizeLinear");
    Ok(report)
}
