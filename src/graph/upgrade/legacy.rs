//! Legacy attributes and renamed ops (onnx's BatchNormalization 8 -> 9 `RemoveAttribute(spatial,
//! 1)`, `BatchNormalization_13_14`, `Scatter_10_11`, RoiAlign 15 -> 16).
//!
//! - BatchNormalization at 9: `spatial` goes. `spatial = 1` (the default) is what 9 computes;
//!   `spatial = 0` (statistics per activation, `[C, D1, ...]`) means the same only on a rank-2
//!   `[N, C]` input, and is refused otherwise. The legacy `is_test` and `consumed_inputs` (opset
//!   6 and older, still found in old exports) are dropped.
//! - BatchNormalization at 14: the training outputs changed (saved mean / var removed, running
//!   mean / var redefined): refused when one is read, dropped when not.
//! - Scatter at 11: renamed ScatterElements, same inputs and `axis` (default 0).
//! - RoiAlign at 16: the default `coordinate_transformation_mode` became `half_pixel`; the old
//!   default `output_half_pixel` is written out.

use crate::onnx::attr;
use crate::onnx::proto::{attribute_proto::AttributeType, AttributeProto, NodeProto};

use super::{data_input, Ctx, Step};

pub(super) fn batch_normalization(ctx: &mut Ctx, i: usize, n: &NodeProto) -> Step {
    let x = data_input(n)?.to_string();
    let mut m = n.clone();
    let mut changes = Vec::new();
    if ctx.crosses(9) {
        let spatial = attr::int(n, "spatial", 1).map_err(|e| e.to_string())?;
        if spatial == 0 {
            match ctx.rank(&x) {
                Some(2) => {}
                Some(r) => {
                    return Err(format!(
                        "spatial = 0 (statistics per activation) on a rank-{r} input has no form at opset 9 or later"
                    ))
                }
                None => {
                    return Err(
                        "spatial = 0 (statistics per activation) on an input of unknown rank has no form at opset 9 or later"
                            .into(),
                    )
                }
            }
        }
        if attr::find(n, "spatial").is_some() {
            changes.push(format!("spatial {spatial} dropped"));
        }
    }
    for legacy in ["is_test", "consumed_inputs"] {
        if attr::find(n, legacy).is_some() {
            changes.push(format!("legacy {legacy} dropped"));
        }
    }
    m.attribute
        .retain(|a| !matches!(a.name.as_str(), "spatial" | "is_test" | "consumed_inputs"));
    if ctx.crosses(14) && n.output.len() > 1 {
        if let Some(o) = n.output[1..].iter().find(|o| ctx.is_used(o)) {
            return Err(format!(
                "its training output '{o}' is used, and BatchNormalization's training outputs changed at opset 14"
            ));
        }
        m.output.truncate(1);
        changes.push("unused training outputs dropped".into());
    }
    if changes.is_empty() {
        return Ok(None);
    }
    ctx.patch.replace_node(i, m);
    Ok(Some(changes.join("; ")))
}

pub(super) fn scatter(ctx: &mut Ctx, i: usize, n: &NodeProto) -> Step {
    if n.input.len() != 3 || n.input.iter().any(String::is_empty) {
        return Err(format!(
            "it has {} inputs, expects data, indices, updates",
            n.input.len()
        ));
    }
    let mut m = n.clone();
    m.op_type = "ScatterElements".into();
    ctx.patch.replace_node(i, m);
    Ok(Some("renamed ScatterElements".into()))
}

pub(super) fn roi_align(ctx: &mut Ctx, i: usize, n: &NodeProto) -> Step {
    if attr::find(n, "coordinate_transformation_mode").is_some() {
        return Ok(None);
    }
    let mut m = n.clone();
    m.attribute.push(make_string(
        "coordinate_transformation_mode",
        "output_half_pixel",
    ));
    ctx.patch.replace_node(i, m);
    Ok(Some(
        "the old default coordinate_transformation_mode output_half_pixel written out".into(),
    ))
}

/// A STRING attribute.
pub(super) fn make_string(name: &str, v: &str) -> AttributeProto {
    let mut a = AttributeProto::new();
    a.name = name.into();
    a.type_ = AttributeType::STRING.into();
    a.s = v.as_bytes().to_vec();
    a
}
