//! What is inside a model: the data behind `qfold inspect`.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::graph::Graph;
use crate::onnx::proto::{
    tensor_shape_proto::dimension::Value as Dim, type_proto, GraphProto, ValueInfoProto,
};
use crate::onnx::tensor::onnx_type_name;
use crate::onnx::{ElemType, Model};

/// A graph input or output.
#[derive(Debug, Clone, Serialize)]
pub struct ValueSummary {
    pub name: String,
    pub elem_type: String,
    /// Each dim as a number or its symbolic name (`?` when unnamed); `None` when unknown rank.
    pub shape: Option<Vec<String>>,
}

/// A summary of a model.
#[derive(Debug, Clone, Serialize)]
pub struct ModelSummary {
    pub ir_version: i64,
    #[serde(serialize_with = "crate::report::ser::opsets")]
    pub opsets: Vec<(String, i64)>,
    pub producer: String,
    pub producer_version: String,
    pub graph_name: String,
    pub inputs: Vec<ValueSummary>,
    pub outputs: Vec<ValueSummary>,
    /// Op types of the main graph with their counts (`domain::Op` outside the default domain).
    pub op_types: BTreeMap<String, usize>,
    pub nodes: usize,
    pub initializers: usize,
    pub initializer_bytes: usize,
    pub external_initializers: usize,
    pub external_bytes: usize,
    /// Constant nodes holding tensors (weights exported as Constant nodes count here).
    pub constant_nodes: usize,
    pub subgraphs: usize,
    pub functions: usize,
    pub metadata: BTreeMap<String, String>,
    /// What automatic fusion would do (groups it would fold or record, candidates it skips).
    pub fusion: Option<crate::fusion::FuseReport>,
    /// Why fusion could not be analysed, if it could not.
    pub fusion_error: Option<String>,
}

fn value_summary(v: &ValueInfoProto) -> ValueSummary {
    let (elem_type, shape) = match v.type_.as_ref().and_then(|t| t.value.as_ref()) {
        Some(type_proto::Value::TensorType(t)) => (
            onnx_type_name(t.elem_type),
            t.shape.as_ref().map(|s| {
                s.dim
                    .iter()
                    .map(|d| match &d.value {
                        Some(Dim::DimValue(v)) => v.to_string(),
                        Some(Dim::DimParam(p)) => p.clone(),
                        _ => "?".into(),
                    })
                    .collect()
            }),
        ),
        Some(_) => ("non-tensor".into(), None),
        None => ("unknown".into(), None),
    };
    ValueSummary {
        name: v.name.clone(),
        elem_type,
        shape,
    }
}

fn tensor_bytes(t: &crate::onnx::proto::TensorProto) -> usize {
    if !t.raw_data.is_empty() {
        return t.raw_data.len();
    }
    let count = t
        .dims
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d.max(0) as usize))
        .unwrap_or(usize::MAX);
    ElemType::from_onnx(t.data_type)
        .map_or(0, |e| e.size())
        .saturating_mul(count)
}

/// Summarizes a model, including a dry run of automatic fusion on the model itself (which is
/// why it is taken by value: no copy of the weights is made).
pub fn summarize(mut model: Model) -> ModelSummary {
    let mut summary = describe(&model);
    match crate::fusion::fuse(&mut model, &crate::fusion::FuseOptions::default()) {
        Ok(r) => summary.fusion = Some(r),
        Err(e) => summary.fusion_error = Some(e.to_string()),
    }
    summary
}

/// Everything [`summarize`] reports but the fusion dry run.
fn describe(model: &Model) -> ModelSummary {
    let (fusion, fusion_error) = (None, None);
    let g: &GraphProto = model.graph();
    let index = Graph::of_model(model);
    let mut op_types = BTreeMap::new();
    for n in &g.node {
        let key = if n.domain.is_empty() || n.domain == "ai.onnx" {
            n.op_type.clone()
        } else {
            format!("{}::{}", n.domain, n.op_type)
        };
        *op_types.entry(key).or_insert(0) += 1;
    }
    let external: Vec<_> = g
        .initializer
        .iter()
        .filter(|t| model.external.contains(&t.name))
        .collect();
    ModelSummary {
        ir_version: model.proto.ir_version,
        opsets: model
            .proto
            .opset_import
            .iter()
            .map(|o| {
                let d = if o.domain.is_empty() {
                    "ai.onnx".to_string()
                } else {
                    o.domain.clone()
                };
                (d, o.version)
            })
            .collect(),
        producer: model.proto.producer_name.clone(),
        producer_version: model.proto.producer_version.clone(),
        graph_name: g.name.clone(),
        inputs: index.real_inputs().into_iter().map(value_summary).collect(),
        outputs: g.output.iter().map(value_summary).collect(),
        op_types,
        nodes: g.node.len(),
        initializers: g.initializer.len(),
        initializer_bytes: g.initializer.iter().map(tensor_bytes).sum(),
        external_initializers: external.len(),
        external_bytes: external.iter().map(|t| tensor_bytes(t)).sum(),
        constant_nodes: g.node.iter().filter(|n| n.op_type == "Constant").count(),
        subgraphs: index.subgraph_count(),
        functions: model.proto.functions.len(),
        metadata: model
            .proto
            .metadata_props
            .iter()
            .map(|kv| (kv.key.clone(), kv.value.clone()))
            .collect(),
        fusion,
        fusion_error,
    }
}
