//! Attributes that became inputs at 10, 11 and 12 (onnx's `Slice_9_10`, `TopK_9_10`,
//! `Clip_10_11`, `Pad_10_11`, `Dropout_11_12`). The new inputs are initializers; the node keeps
//! its name and outputs.
//!
//! - Slice at 10: `Slice(x, starts, ends[, axes])` attributes become int64 inputs in that order
//!   (`steps` stays absent: 1).
//! - TopK at 10: `TopK(x, k)` becomes `TopK(x, K)` with K an int64 `[1]` input.
//! - Clip at 11: `Clip(x, min, max)` attributes become scalar inputs of x's element type. An
//!   absent bound stays absent (an empty input name): no bound, where opset 6 clipped at the
//!   type's lowest / highest finite value (only an infinite input tells them apart).
//! - Pad at 11: `pads` becomes an int64 input; in `constant` mode a `value` attribute becomes
//!   a scalar `constant_value` input of x's element type (absent: 0 both before and after);
//!   `mode` is kept.
//! - Dropout at 10: the mask output turns from x's type to bool: refused when the mask is read,
//!   dropped when it is not.
//!   At 12 `ratio` becomes a float scalar input (absent: 0.5 both before and after). At
//!   inference Dropout is the identity in every version; the legacy `is_test` is dropped.

use crate::onnx::attr;
use crate::onnx::proto::NodeProto;
use crate::onnx::ElemType;

use super::{data_input, Ctx, Step};

type Res<T> = std::result::Result<T, String>;

fn one_input(n: &NodeProto, before: i64) -> Res<()> {
    if n.input.len() > 1 {
        return Err(format!(
            "it has {} inputs; before opset {before} {} takes one and its parameters as attributes",
            n.input.len(),
            n.op_type
        ));
    }
    Ok(())
}

fn ints(n: &NodeProto, name: &str) -> Res<Option<Vec<i64>>> {
    attr::ints(n, name).map_err(|e| e.to_string())
}

fn float(n: &NodeProto, name: &str) -> Res<Option<f32>> {
    if attr::find(n, name).is_none() {
        return Ok(None);
    }
    attr::float(n, name, 0.0)
        .map(Some)
        .map_err(|e| e.to_string())
}

fn float_type(ctx: &Ctx, x: &str) -> Res<ElemType> {
    match ctx.elem_type(x) {
        Some(t) if t.is_float() => Ok(t),
        Some(t) => Err(format!(
            "its input '{x}' is {}, where a floating-point type is expected",
            t.name()
        )),
        None => Err(format!(
            "the element type of its input '{x}' is not known, and the new inputs must have it"
        )),
    }
}

fn label(n: &NodeProto) -> String {
    super::super::engine::label(n)
}

/// Slice: `starts`, `ends`, `axes` to inputs at 10.
pub(super) fn slice(ctx: &mut Ctx, i: usize, n: &NodeProto) -> Step {
    data_input(n)?;
    one_input(n, 10)?;
    let l = label(n);
    let mut m = n.clone();
    m.attribute
        .retain(|a| !matches!(a.name.as_str(), "starts" | "ends" | "axes"));
    let mut moved = Vec::new();
    for name in ["starts", "ends", "axes"] {
        match ints(n, name)? {
            Some(v) => {
                let t = ctx.int64s(&format!("{l}_{name}"), v)?;
                m.input.push(t);
                moved.push(name);
            }
            None if name == "axes" => {}
            None => {
                return Err(format!(
                    "it has no '{name}' attribute, which Slice-1 requires"
                ))
            }
        }
    }
    ctx.patch.replace_node(i, m);
    Ok(Some(format!("{} attributes to inputs", moved.join(", "))))
}

/// TopK: `k` to an input at 10.
pub(super) fn topk(ctx: &mut Ctx, i: usize, n: &NodeProto) -> Step {
    data_input(n)?;
    one_input(n, 10)?;
    if attr::find(n, "k").is_none() {
        return Err("it has no 'k' attribute, which TopK-1 requires".into());
    }
    let k = attr::int(n, "k", 0).map_err(|e| e.to_string())?;
    let mut m = n.clone();
    m.attribute.retain(|a| a.name != "k");
    let t = ctx.int64s(&format!("{}_k", label(n)), vec![k])?;
    m.input.push(t);
    ctx.patch.replace_node(i, m);
    Ok(Some(format!("k {k} attribute to an input")))
}

/// Clip: `min`, `max` to inputs at 11.
pub(super) fn clip(ctx: &mut Ctx, i: usize, n: &NodeProto) -> Step {
    let x = data_input(n)?.to_string();
    one_input(n, 11)?;
    let (min, max) = (float(n, "min")?, float(n, "max")?);
    if min.is_none() && max.is_none() {
        return Ok(None);
    }
    let ty = float_type(ctx, &x)?;
    let l = label(n);
    let mut m = n.clone();
    m.attribute.retain(|a| a.name != "min" && a.name != "max");
    m.input.push(match min {
        Some(v) => ctx.float_scalar(&format!("{l}_min"), v as f64, ty)?,
        None => String::new(),
    });
    if let Some(v) = max {
        m.input
            .push(ctx.float_scalar(&format!("{l}_max"), v as f64, ty)?);
    }
    ctx.patch.replace_node(i, m);
    let show = |v: Option<f32>| v.map(|v| v.to_string()).unwrap_or_else(|| "none".into());
    Ok(Some(format!(
        "min {} / max {} attributes to inputs",
        show(min),
        show(max)
    )))
}

/// Pad: `pads` and `value` to inputs at 11.
pub(super) fn pad(ctx: &mut Ctx, i: usize, n: &NodeProto) -> Step {
    let x = data_input(n)?.to_string();
    one_input(n, 11)?;
    let pads = ints(n, "pads")?.ok_or("it has no 'pads' attribute, which Pad-2 requires")?;
    let mode = attr::string(n, "mode")
        .map_err(|e| e.to_string())?
        .unwrap_or_else(|| "constant".into());
    if !matches!(mode.as_str(), "constant" | "reflect" | "edge") {
        return Err(format!("mode '{mode}' is not constant, reflect or edge"));
    }
    if let Some(r) = ctx.rank(&x) {
        if pads.len() != 2 * r {
            return Err(format!(
                "it has {} pads for a rank-{r} input (expects {})",
                pads.len(),
                2 * r
            ));
        }
    }
    let value = float(n, "value")?;
    let l = label(n);
    let mut m = n.clone();
    m.attribute
        .retain(|a| a.name != "pads" && a.name != "value");
    let t = ctx.int64s(&format!("{l}_pads"), pads)?;
    m.input.push(t);
    let mut what = "pads attribute to an input".to_string();
    if let (Some(v), "constant") = (value, mode.as_str()) {
        let ty = float_type(ctx, &x)?;
        m.input
            .push(ctx.float_scalar(&format!("{l}_value"), v as f64, ty)?);
        what = format!("pads and value {v} attributes to inputs");
    }
    ctx.patch.replace_node(i, m);
    Ok(Some(format!("{what}, mode {mode}")))
}

/// Dropout: the mask's type at 10, `ratio` to an input at 12.
pub(super) fn dropout(ctx: &mut Ctx, i: usize, n: &NodeProto) -> Step {
    data_input(n)?;
    if ctx.crosses(10) {
        if let Some(mask) = n.output.get(1).filter(|m| ctx.is_used(m)) {
            return Err(format!(
                "its mask '{mask}' is used, and turns from the input's type to bool at opset 10"
            ));
        }
    }
    let mut m = n.clone();
    let mut changes = Vec::new();
    if ctx.crosses(10) && n.output.len() > 1 {
        m.output.truncate(1);
        changes.push("unused mask output dropped".to_string());
    }
    if attr::find(n, "is_test").is_some() {
        m.attribute.retain(|a| a.name != "is_test");
        changes.push("legacy is_test dropped".to_string());
    }
    if ctx.crosses(12) {
        if let Some(ratio) = float(n, "ratio")? {
            one_input(n, 12)?;
            m.attribute.retain(|a| a.name != "ratio");
            let t =
                ctx.float_scalar(&format!("{}_ratio", label(n)), ratio as f64, ElemType::F32)?;
            m.input.push(t);
            changes.push(format!("ratio {ratio} attribute to an input"));
        }
    }
    if changes.is_empty() {
        return Ok(None);
    }
    ctx.patch.replace_node(i, m);
    Ok(Some(changes.join("; ")))
}
