//! Upsample and Resize (onnx's `Upsample_8_9`, `Upsample_9_10`, `Resize_10_11`).
//!
//! - Upsample at 9: the `scales` attribute becomes a float input.
//! - Upsample at 10 (deprecated there): becomes `Resize(x, scales)` with the same `mode`; when
//!   the target is 11 or later, directly the Resize-11 form below.
//! - Resize at 11: `Resize(x, scales)` becomes `Resize(x, roi, scales)`, roi an empty float
//!   tensor (or, from 13, an absent input), with `coordinate_transformation_mode = asymmetric`,
//!   which is how opset 10 maps coordinates (`x_original = x_resized / scale`). onnx's own
//!   adapter leaves the opset-11 defaults (`half_pixel`, `round_prefer_floor`), which changes the
//!   result; here the meaning is kept. For `nearest`, ONNX Runtime at opset 10 rounds
//!   `x_resized / scale` down on an axis it enlarges and up on an axis it shrinks (measured:
//!   scales 0.6 match `ceil`, 1.5, 2 and 2.5 match `floor`), so `nearest_mode` is `floor` when
//!   no axis shrinks, `ceil` when no axis enlarges; an axis shrunk by an exact power of two
//!   (0.5, 0.25, ...) lands on whole coordinates and counts as neither. Refused when the scales
//!   enlarge one axis and shrink another, and, for Resize-10 `nearest`, when they are computed
//!   at run time. Upsample's scales are at least 1, so its `nearest` is `floor` even then.
//!   `linear` needs no `nearest_mode`.
//! - Resize at 13: `coordinate_transformation_mode = tf_half_pixel_for_nn` was removed and is
//!   refused; every other Resize-11 node is valid at 13.

use ndarray::{ArrayD, IxDyn};

use crate::onnx::attr;
use crate::onnx::proto::NodeProto;
use crate::onnx::TensorData;

use super::legacy::make_string;
use super::{data_input, Ctx, Step};

type Res<T> = std::result::Result<T, String>;

fn mode_of(n: &NodeProto) -> Res<String> {
    let mode = attr::string(n, "mode")
        .map_err(|e| e.to_string())?
        .unwrap_or_else(|| "nearest".into());
    if !matches!(mode.as_str(), "nearest" | "linear") {
        return Err(format!("mode '{mode}' is not nearest or linear"));
    }
    Ok(mode)
}

fn floats(n: &NodeProto, name: &str) -> Res<Option<Vec<f32>>> {
    use crate::onnx::proto::attribute_proto::AttributeType;
    match attr::find(n, name) {
        None => Ok(None),
        Some(a) if a.type_.enum_value().ok() == Some(AttributeType::FLOATS) => {
            Ok(Some(a.floats.clone()))
        }
        Some(_) => Err(format!("attribute '{name}' should be a list of floats")),
    }
}

pub(super) fn upsample(ctx: &mut Ctx, i: usize, n: &NodeProto) -> Step {
    let x = data_input(n)?.to_string();
    let mode = mode_of(n)?;
    let label = super::super::engine::label(n);
    let (scales_name, scales) = if ctx.from < 9 {
        if n.input.len() > 1 {
            return Err(format!(
                "it has {} inputs; before opset 9 Upsample takes one and its scales as an attribute",
                n.input.len()
            ));
        }
        let v = floats(n, "scales")?
            .ok_or("it has no 'scales' attribute, which Upsample-7 requires")?;
        if v.len() > super::super::spec::MAX_RANK as usize {
            return Err(format!("it has {} scales", v.len()));
        }
        let values: Vec<f64> = v.iter().map(|&s| s as f64).collect();
        let data = ArrayD::from_shape_vec(IxDyn(&[v.len()]), v).map_err(|e| e.to_string())?;
        (
            ctx.constant(&format!("{label}_scales"), TensorData::F32(data)),
            Some(values),
        )
    } else {
        let s = n
            .input
            .get(1)
            .filter(|s| !s.is_empty())
            .ok_or("it has no scales input, which Upsample-9 requires")?
            .clone();
        let values = ctx.constant_values(&s)?;
        (s, values)
    };
    if !ctx.crosses(10) {
        let mut m = n.clone();
        m.attribute.retain(|a| a.name != "scales");
        m.input = vec![x, scales_name];
        ctx.patch.replace_node(i, m);
        return Ok(Some("scales attribute to an input".into()));
    }
    let (r, what) = wire_resize(ctx, n, x, scales_name, scales.as_deref(), &mode, true)?;
    ctx.patch.replace_node(i, r);
    Ok(Some(what))
}

pub(super) fn resize(ctx: &mut Ctx, i: usize, n: &NodeProto) -> Step {
    if ctx.crosses(11) {
        let x = data_input(n)?.to_string();
        if n.input.len() != 2 || n.input[1].is_empty() {
            return Err(format!(
                "it has {} inputs; before opset 11 Resize takes two (X, scales)",
                n.input.len()
            ));
        }
        let mode = mode_of(n)?;
        let scales_name = n.input[1].clone();
        let scales = ctx.constant_values(&scales_name)?;
        let (r, what) = wire_resize(ctx, n, x, scales_name, scales.as_deref(), &mode, false)?;
        ctx.patch.replace_node(i, r);
        return Ok(Some(what));
    }
    if ctx.crosses(13) {
        let ctm = attr::string(n, "coordinate_transformation_mode").map_err(|e| e.to_string())?;
        if ctm.as_deref() == Some("tf_half_pixel_for_nn") {
            return Err(
                "coordinate_transformation_mode tf_half_pixel_for_nn was removed at opset 13 and has no equivalent there"
                    .into(),
            );
        }
    }
    Ok(None)
}

/// The Resize node at the target opset that computes what opset-10 Resize (or Upsample) `n`
/// does, and a description.
fn wire_resize(
    ctx: &mut Ctx,
    n: &NodeProto,
    x: String,
    scales_name: String,
    scales: Option<&[f64]>,
    mode: &str,
    upsample: bool,
) -> Res<(NodeProto, String)> {
    let mut r = NodeProto::new();
    r.op_type = "Resize".into();
    r.name = n.name.clone();
    r.domain = n.domain.clone();
    r.doc_string = n.doc_string.clone();
    r.output = n.output.clone();
    r.attribute.push(make_string("mode", mode));
    let from = if upsample { "Upsample" } else { "Resize-10" };
    if ctx.to < 11 {
        r.input = vec![x, scales_name];
        return Ok((r, format!("{from} -> Resize (opset 10), mode {mode}")));
    }
    let nearest = if mode == "nearest" {
        Some(nearest_mode(scales, upsample)?)
    } else {
        None
    };
    let roi = if ctx.to >= 13 {
        String::new()
    } else {
        let label = super::super::engine::label(n);
        let empty = ArrayD::from_shape_vec(IxDyn(&[0]), vec![]).map_err(|e| e.to_string())?;
        ctx.constant(&format!("{label}_roi"), TensorData::F32(empty))
    };
    r.input = vec![x, roi, scales_name];
    r.attribute
        .push(make_string("coordinate_transformation_mode", "asymmetric"));
    if let Some(nm) = nearest {
        r.attribute.push(make_string("nearest_mode", nm));
    }
    Ok((
        r,
        format!(
            "{from} -> Resize, mode {mode}, asymmetric coordinates{}",
            nearest
                .map(|m| format!(", nearest_mode {m}"))
                .unwrap_or_default()
        ),
    ))
}

/// The opset-11 `nearest_mode` that rounds as ONNX Runtime's opset-10 nearest does with these
/// scales (see the module docs).
fn nearest_mode(scales: Option<&[f64]>, upsample: bool) -> Res<&'static str> {
    let Some(s) = scales else {
        return if upsample {
            Ok("floor")
        } else {
            Err("its scales are computed at run time: opset-10 nearest rounds down on an axis it enlarges and up on one it shrinks, and which one applies is not known".into())
        };
    };
    let enlarges = s.iter().any(|&v| v > 1.0);
    let shrinks = s.iter().any(|&v| v < 1.0 && !exact_shrink(v));
    match (enlarges, shrinks) {
        (true, true) => Err(format!(
            "scales {s:?} enlarge one axis and shrink another: opset-10 nearest rounds down on the first and up on the second, which no single opset-11 nearest_mode does"
        )),
        (false, true) => Ok("ceil"),
        _ => Ok("floor"),
    }
}

/// A scale 1 / 2^k: `x / scale` is a whole number, so rounding down and up agree.
fn exact_shrink(v: f64) -> bool {
    if v.is_nan() || v <= 0.0 {
        return false;
    }
    let r = 1.0 / v;
    r.fract() == 0.0 && r <= (1u64 << 32) as f64 && (r as u64).is_power_of_two()
}
