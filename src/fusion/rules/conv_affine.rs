//! Conv / ConvTranspose / Gemm -> Add, Sub, Mul or Div by a per-output-channel constant.
//!
//! ```text
//! before:  X -> Conv(W, b) -> T -> Mul(k) -> Y        X -> ConvTranspose(W) -> T -> Add(k) -> Y
//! after:   X -> Conv(W', b') -> Y                     X -> ConvTranspose(W, b' = k) -> Y
//! ```
//!
//! Paddle exports ConvTranspose without bias followed by Add and BatchNormalization (DB text
//! detectors), TF exports write BN as Sub / Mul / Add chains; once the chain is folded into the
//! producer, a BatchNormalization after it folds too (`conv_bn`). The rule repeats through the
//! engine's sweeps, so a chain of several such ops folds one by one.
//!
//! Conditions: the producer's output has one reader (this op) and is not a graph output; the
//! weight (and bias, if any) are float constants; the other operand is a float constant that
//! broadcasts per output channel: one value, or `C` values on the channel axis (axis 1 of a
//! Conv output, `[C, 1, 1]` or `[1, C, 1, 1]`; the last axis of a Gemm output, `[C]` or
//! `[1, C]`); a Gemm's C is absent, one value or per column.
//!
//! Formula, per output channel `o` with the constant `k[o]` (a missing bias is 0):
//! - `T * k`, `k * T`: `W'[o] = W[o] * k[o]`, `b' = b * k`;
//! - `T / k`: `W'[o] = W[o] / k[o]`, `b' = b / k` (every `k[o]` non-zero);
//! - `T + k`, `k + T`: `b' = b + k`; `T - k`: `b' = b - k`;
//! - `k - T`: `W' = -W`, `b' = k - b`.
//!
//! For a ConvTranspose (`W [C_in, M/g, k...]`) the output channel of `W[i, j]` is
//! `(i / (C_in/g)) * (M/g) + j`; for a Gemm, the output-channel axis of `B` is 0 when
//! `transB = 1`, else 1, and `beta` folds into the new C.

use ndarray::{Array1, ArrayD, Axis};

use super::{
    as_vec, decline_unless, float_const, is_op, label, new_const, or_decline, single_use,
    write_const, Outcome,
};
use crate::error::Result;
use crate::fusion::patterns::GroupKind;
use crate::fusion::FusedGroup;
use crate::graph::{Graph, Names, Patch};
use crate::onnx::attr::{self, defaults};

/// How the constant combines with the producer's output.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Affine {
    Mul,
    Div,
    Add,
    /// `T - k`
    Sub,
    /// `k - T`
    SubFrom,
}

/// The constant operand as `channels` values, when it broadcasts per output channel of an
/// output of rank `rank` whose channel axis is `axis`; the reason otherwise.
fn per_channel(
    g: &Graph,
    name: &str,
    channels: usize,
    rank: usize,
    axis: usize,
) -> Result<std::result::Result<Vec<f64>, String>> {
    let (k, _) = match float_const(g, name)? {
        Ok(v) => v,
        Err(r) => return Ok(Err(r)),
    };
    let shape = k.shape();
    if shape.len() > rank {
        return Ok(Err(format!(
            "'{name}' has shape {shape:?}, more axes than the output"
        )));
    }
    let offset = rank - shape.len();
    for (j, &d) in shape.iter().enumerate() {
        if d != 1 && !(j + offset == axis && d == channels) {
            return Ok(Err(format!(
                "'{name}' has shape {shape:?}, which does not broadcast per output channel"
            )));
        }
    }
    let v: Vec<f64> = k.iter().copied().collect();
    Ok(Ok(match v.len() {
        1 => vec![v[0]; channels],
        _ => v,
    }))
}

/// Folds the Add / Sub / Mul / Div at node `i` into the Conv, ConvTranspose or Gemm before it.
pub fn conv_affine(g: &Graph, i: usize, names: &mut Names) -> Result<Option<Outcome>> {
    fold(g, i, names, true)
}

/// [`conv_affine`] for constants with a value per channel only: a single value (PP-LCNetV3's
/// learnable affine blocks, `Conv -> Mul(s) -> Add(t)`) is not a match. ONNX Runtime's
/// pre-processing folds the per-channel ones (Paddle's bias Adds) and not those.
pub fn conv_affine_per_channel(g: &Graph, i: usize, names: &mut Names) -> Result<Option<Outcome>> {
    fold(g, i, names, false)
}

fn fold(g: &Graph, i: usize, names: &mut Names, scalars: bool) -> Result<Option<Outcome>> {
    let n = g.node(i);
    let op = ["Mul", "Div", "Add", "Sub"]
        .into_iter()
        .find(|op| is_op(n, op));
    let Some(op) = op else { return Ok(None) };
    // Which input the producer writes, and the constant operand.
    let (p, slot) = match (g.producer(&n.input[0]), g.producer(&n.input[1])) {
        (Some(p), _) if is_linear(g, p) => (p, 0),
        (_, Some(p)) if is_linear(g, p) => (p, 1),
        _ => return Ok(None),
    };
    if n.input[0] == n.input[1] {
        return Ok(None);
    }
    let kind = match (op, slot) {
        ("Mul", _) => Affine::Mul,
        ("Div", 0) => Affine::Div,
        ("Add", _) => Affine::Add,
        ("Sub", 0) => Affine::Sub,
        ("Sub", _) => Affine::SubFrom,
        _ => return Ok(None), // k / T is not affine
    };
    let other = &n.input[1 - slot];
    if g.const_source(other).is_none() {
        return Ok(None);
    }
    if !scalars && g.constant(other)?.is_some_and(|t| t.len() == 1) {
        return Ok(None);
    }
    let prod = g.node(p);
    let nodes = vec![label(prod), label(n)];
    let t = &n.input[slot];
    if let Some(r) = single_use(g, t) {
        decline_unless!(false, nodes, "{r}");
    }
    let (w, wty) = or_decline!(float_const(g, &prod.input[1])?, nodes, "weight");
    let gemm = is_op(prod, "Gemm");
    let transpose = is_op(prod, "ConvTranspose");
    let group = attr::int(prod, "group", defaults::GROUP)? as usize;
    let trans_b = gemm && attr::int(prod, "transB", defaults::GEMM_TRANS)? != 0;
    decline_unless!(
        if gemm { w.ndim() == 2 } else { w.ndim() >= 3 },
        nodes,
        "weight has rank {}",
        w.ndim()
    );
    let (channels, rank, axis) = if gemm {
        (w.shape()[if trans_b { 0 } else { 1 }], 2, 1)
    } else if transpose {
        let c = w.shape()[1].checked_mul(group).unwrap_or(0);
        decline_unless!(
            group > 0 && w.shape()[0] % group == 0,
            nodes,
            "weight's input channels do not divide into {group} groups"
        );
        (c, w.ndim(), 1)
    } else {
        (w.shape()[0], w.ndim(), 1)
    };
    let k = or_decline!(per_channel(g, other, channels, rank, axis)?, nodes);
    if kind == Affine::Div {
        decline_unless!(
            k.iter().all(|&v| v != 0.0 && v.is_finite()),
            nodes,
            "'{other}' has a zero or non-finite value"
        );
    }
    // The bias as C values: Conv's b, or a Gemm's beta * C.
    let bias_name = prod.input.get(2).filter(|s| !s.is_empty());
    let beta = if gemm {
        attr::float(prod, "beta", defaults::GEMM_BETA)? as f64
    } else {
        1.0
    };
    let bias: Array1<f64> = match bias_name {
        None => Array1::zeros(channels),
        Some(b) => {
            let (a, _) = or_decline!(float_const(g, b)?, nodes, "bias");
            let fits = a.len() == channels
                && (a.ndim() == 1 || (gemm && a.ndim() == 2 && a.shape()[0] == 1))
                || a.len() == 1;
            decline_unless!(fits, nodes, "bias has shape {:?}", a.shape());
            let v = as_vec(a);
            (0..channels)
                .map(|o| beta * if v.len() == 1 { v[0] } else { v[o] })
                .collect()
        }
    };
    // Weight factor and new bias per output channel.
    let (factor, new_bias): (Vec<f64>, Array1<f64>) = match kind {
        Affine::Mul => (k.clone(), &bias * &Array1::from(k.clone())),
        Affine::Div => (
            k.iter().map(|v| 1.0 / v).collect(),
            &bias / &Array1::from(k.clone()),
        ),
        Affine::Add => (vec![1.0; channels], &bias + &Array1::from(k.clone())),
        Affine::Sub => (vec![1.0; channels], &bias - &Array1::from(k.clone())),
        Affine::SubFrom => (vec![-1.0; channels], Array1::from(k.clone()) - &bias),
    };
    let scaled = factor.iter().any(|&f| f != 1.0);
    let mut patch = Patch::new(format!("fold {}", nodes.join("+")));
    let wname = if scaled {
        let w2 = scale_output_channels(w, &factor, gemm, trans_b, transpose, group);
        write_const(g, &mut patch, names, &prod.input[1], w2, wty)?
    } else {
        prod.input[1].clone()
    };
    let bname = match bias_name {
        Some(b) if g.constant(b)?.is_some_and(|t| t.shape() == [channels]) => {
            write_const(g, &mut patch, names, b, new_bias.into_dyn(), wty)?
        }
        _ => new_const(
            &mut patch,
            names,
            &format!("{}_bias", prod.input[1]),
            new_bias.into_dyn(),
            wty,
        )?,
    };
    let mut fused = prod.clone();
    fused.input = vec![prod.input[0].clone(), wname, bname];
    fused.output = vec![n.output[0].clone()];
    if gemm {
        attr::set(&mut fused, attr::make_float("beta", 1.0));
    }
    patch.replace_node(p, fused).remove_node(i);
    Ok(Some(Outcome::Rewrite(
        patch,
        FusedGroup {
            kind: GroupKind::ConvAffine,
            nodes,
            folded: true,
            fuser: None,
            output: n.output[0].clone(),
        },
    )))
}

fn is_linear(g: &Graph, p: usize) -> bool {
    let n = g.node(p);
    ["Conv", "ConvTranspose", "Gemm"]
        .into_iter()
        .any(|op| is_op(n, op))
        && n.output.len() == 1
}

/// Multiplies each output channel's weights by `factor[o]`.
fn scale_output_channels(
    mut w: ArrayD<f64>,
    factor: &[f64],
    gemm: bool,
    trans_b: bool,
    transpose: bool,
    group: usize,
) -> ArrayD<f64> {
    if gemm {
        let axis = if trans_b { 0 } else { 1 };
        for (o, mut s) in w.axis_iter_mut(Axis(axis)).enumerate() {
            s *= factor[o];
        }
    } else if transpose {
        let c_per_group = w.shape()[0] / group;
        let m_per_group = w.shape()[1];
        for (i, mut row) in w.axis_iter_mut(Axis(0)).enumerate() {
            let base = (i / c_per_group) * m_per_group;
            for (j, mut s) in row.axis_iter_mut(Axis(0)).enumerate() {
                s *= factor[base + j];
            }
        }
    } else {
        for (o, mut s) in w.axis_iter_mut(Axis(0)).enumerate() {
            s *= factor[o];
        }
    }
    w
}
