//! The fold rules. Each looks at the read-only graph and a BatchNormalization node and returns
//! `Ok(None)` when the pattern does not apply, `Ok(Some(Outcome::Skip(reason)))` when it applies
//! but folding would not be exact, and `Ok(Some(Outcome::Fold(patch)))` otherwise.
//!
//! Conditions shared by every rule (DESIGN §3):
//! - BN: inference form (`training_mode` 0, one output, no `spatial = 0`), constant parameters.
//! - The producer's output has exactly one consumer (the BN) and is not a graph output.
//! - Weights and biases are constant (initializers or Constant nodes); a weight initializer
//!   read by another node is cloned, never edited in place.
//! - Channel counts match.
//!
//! The fused node keeps the producer's name and inputs and produces the BN's output name.

use ndarray::{Array1, ArrayD, Ix1};

use super::fold::{self, BnAffine};
use crate::error::Result;
use crate::graph::{ConstSource, Graph, Names, Patch};
use crate::onnx::attr::{self, defaults};
use crate::onnx::proto::NodeProto;
use crate::onnx::{ElemType, TensorData};

/// What a rule decided.
#[derive(Debug)]
pub enum Outcome {
    /// The rewrite, with the names of the nodes it fuses (first to last).
    Fold(Patch, Vec<String>),
    /// The pattern is there but folding would not be exact; the nodes and the reason.
    Skip(Vec<String>, String),
}

macro_rules! skip_unless {
    ($cond:expr, $nodes:expr, $($reason:tt)+) => {
        if !$cond {
            return Ok(Some(Outcome::Skip($nodes.clone(), format!($($reason)+))));
        }
    };
}

/// A display name: the node's name, or its first output when unnamed.
pub fn label(n: &NodeProto) -> String {
    if !n.name.is_empty() {
        n.name.clone()
    } else {
        format!(
            "<{}:{}>",
            n.op_type,
            n.output.first().map(String::as_str).unwrap_or("")
        )
    }
}

fn is_op(n: &NodeProto, op: &str) -> bool {
    n.op_type == op && (n.domain.is_empty() || n.domain == "ai.onnx")
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
fn float_const(
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

/// The BN node's affine form, or why it cannot be folded.
pub fn bn_affine(g: &Graph, bn: usize) -> Result<std::result::Result<BnAffine, String>> {
    let n = g.node(bn);
    if n.input.len() != 5 {
        return Ok(Err(format!("has {} inputs, expected 5", n.input.len())));
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

fn new_const(
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
/// their names.
fn write_weight_and_bias(
    g: &Graph,
    patch: &mut Patch,
    names: &mut Names,
    conv: &NodeProto,
    (w, b): (ArrayD<f64>, Array1<f64>),
    ty: ElemType,
) -> Result<(String, String)> {
    let wname = write_const(g, patch, names, &conv.input[1], w, ty)?;
    let bname = match conv.input.get(2).filter(|s| !s.is_empty()) {
        Some(bias) => write_const(g, patch, names, bias, b.into_dyn(), ty)?,
        None => new_const(
            patch,
            names,
            &format!("{}_bias", conv.input[1]),
            b.into_dyn(),
            ty,
        )?,
    };
    Ok((wname, bname))
}

fn as_vec(a: ArrayD<f64>) -> Array1<f64> {
    let n = a.len();
    a.into_shape_with_order(n)
        .expect("1-D")
        .into_dimensionality::<Ix1>()
        .expect("1-D")
}

/// Conv -> BN and ConvTranspose -> BN.
pub fn conv_bn(g: &Graph, bn: usize, names: &mut Names) -> Result<Option<Outcome>> {
    let bnn = g.node(bn);
    let Some(p) = bnn.input.first().and_then(|x| g.producer(x)) else {
        return Ok(None);
    };
    let conv = g.node(p);
    let transpose = is_op(conv, "ConvTranspose");
    if !is_op(conv, "Conv") && !transpose {
        return Ok(None);
    }
    let nodes = vec![label(conv), label(bnn)];
    let x = &bnn.input[0];
    if let Some(r) = single_use(g, x) {
        skip_unless!(false, nodes, "{r}");
    }
    skip_unless!(
        conv.output.len() == 1,
        nodes,
        "the producer has {} outputs",
        conv.output.len()
    );
    let bn_aff = match bn_affine(g, bn)? {
        Ok(a) => a,
        Err(r) => return Ok(Some(Outcome::Skip(nodes, r))),
    };
    skip_unless!(conv.input.len() >= 2, nodes, "no weight input");
    let (w, wty) = match float_const(g, &conv.input[1])? {
        Ok(v) => v,
        Err(r) => return Ok(Some(Outcome::Skip(nodes, format!("weight {r}")))),
    };
    let bias_name = conv.input.get(2).filter(|s| !s.is_empty());
    let bias = match bias_name {
        None => None,
        Some(b) => match float_const(g, b)? {
            Ok((a, _)) if a.ndim() == 1 => Some(as_vec(a)),
            Ok((a, _)) => {
                skip_unless!(false, nodes, "bias has shape {:?}", a.shape());
                None
            }
            Err(r) => return Ok(Some(Outcome::Skip(nodes, format!("bias {r}")))),
        },
    };
    skip_unless!(w.ndim() >= 3, nodes, "weight has rank {}", w.ndim());
    let group = attr::int(conv, "group", defaults::GROUP)?;
    skip_unless!(group >= 1, nodes, "group = {group}");
    let group = group as usize;
    let out_channels = if transpose {
        w.shape()[1] * group
    } else {
        w.shape()[0]
    };
    skip_unless!(
        out_channels == bn_aff.channels(),
        nodes,
        "{} has {out_channels} output channels, BN has {}",
        conv.op_type,
        bn_aff.channels()
    );
    skip_unless!(
        !transpose || w.shape()[0] % group == 0,
        nodes,
        "weight's input channels do not divide into {group} groups"
    );
    if let Some(b) = &bias {
        skip_unless!(
            b.len() == out_channels,
            nodes,
            "bias has {} values for {out_channels} channels",
            b.len()
        );
    }
    let (w2, b2) = if transpose {
        fold::fold_conv_transpose(&w, bias.as_ref(), group, &bn_aff)
    } else {
        fold::fold_conv(&w, bias.as_ref(), &bn_aff)
    };
    let mut patch = Patch::new(format!("fold {}", nodes.join("+")));
    let (wname, bname) = write_weight_and_bias(g, &mut patch, names, conv, (w2, b2), wty)?;
    let mut fused = conv.clone();
    fused.input = vec![conv.input[0].clone(), wname, bname];
    fused.output = vec![bnn.output[0].clone()];
    patch.replace_node(p, fused).remove_node(bn);
    Ok(Some(Outcome::Fold(patch, nodes)))
}

/// Gemm -> BN on the rank-2 `[M, N]` output.
pub fn gemm_bn(g: &Graph, bn: usize, names: &mut Names) -> Result<Option<Outcome>> {
    let bnn = g.node(bn);
    let Some(p) = bnn.input.first().and_then(|x| g.producer(x)) else {
        return Ok(None);
    };
    let gemm = g.node(p);
    if !is_op(gemm, "Gemm") {
        return Ok(None);
    }
    let nodes = vec![label(gemm), label(bnn)];
    if let Some(r) = single_use(g, &bnn.input[0]) {
        skip_unless!(false, nodes, "{r}");
    }
    let bn_aff = match bn_affine(g, bn)? {
        Ok(a) => a,
        Err(r) => return Ok(Some(Outcome::Skip(nodes, r))),
    };
    skip_unless!(gemm.input.len() >= 2, nodes, "Gemm has no B input");
    let (b, bty) = match float_const(g, &gemm.input[1])? {
        Ok(v) => v,
        Err(r) => return Ok(Some(Outcome::Skip(nodes, format!("B {r}")))),
    };
    skip_unless!(b.ndim() == 2, nodes, "B has rank {}", b.ndim());
    let trans_b = attr::int(gemm, "transB", defaults::GEMM_TRANS)? != 0;
    let beta = attr::float(gemm, "beta", defaults::GEMM_BETA)? as f64;
    let n = if trans_b { b.shape()[0] } else { b.shape()[1] };
    skip_unless!(
        n == bn_aff.channels(),
        nodes,
        "Gemm has {n} output channels, BN has {}",
        bn_aff.channels()
    );
    let c_name = gemm.input.get(2).filter(|s| !s.is_empty());
    let c = match c_name {
        None => None,
        Some(c) => match float_const(g, c)? {
            Ok((a, _)) => Some(a),
            Err(r) => return Ok(Some(Outcome::Skip(nodes, format!("C {r}")))),
        },
    };
    if let Some(c) = &c {
        let ok = match c.shape() {
            [] => true,
            [k] => *k == 1 || *k == n,
            [_, k] => *k == 1 || *k == n,
            _ => false,
        };
        skip_unless!(
            ok,
            nodes,
            "C has shape {:?}, which does not broadcast to [M, {n}]",
            c.shape()
        );
    }
    let b2 = fold::fold_gemm_weight(&b, trans_b, &bn_aff);
    let c2 = fold::fold_gemm_bias(c.as_ref(), beta, &bn_aff);
    let mut patch = Patch::new(format!("fold {}", nodes.join("+")));
    let bname = write_const(g, &mut patch, names, &gemm.input[1], b2, bty)?;
    let cname = match c_name {
        Some(cn) if c.as_ref().is_some_and(|c| c.shape() == c2.shape()) => {
            write_const(g, &mut patch, names, cn, c2, bty)?
        }
        _ => new_const(
            &mut patch,
            names,
            &format!("{}_bias", gemm.input[1]),
            c2,
            bty,
        )?,
    };
    let mut fused = gemm.clone();
    fused.input = vec![gemm.input[0].clone(), bname, cname];
    fused.output = vec![bnn.output[0].clone()];
    attr::set(&mut fused, attr::make_float("beta", 1.0));
    patch.replace_node(p, fused).remove_node(bn);
    Ok(Some(Outcome::Fold(patch, nodes)))
}

/// The rank of a value when the graph says it: declared input/output/value_info shapes, or
/// producers whose output rank is fixed (Gemm, Flatten).
pub fn known_rank(g: &Graph, value: &str) -> Option<usize> {
    use crate::onnx::proto::type_proto;
    let proto = g.proto();
    let declared = proto
        .input
        .iter()
        .chain(&proto.value_info)
        .chain(&proto.output)
        .find(|v| v.name == value)
        .and_then(|v| match v.type_.as_ref()?.value.as_ref()? {
            type_proto::Value::TensorType(t) => t.shape.as_ref().map(|s| s.dim.len()),
            _ => None,
        });
    declared.or_else(|| {
        let p = g.node(g.producer(value)?);
        (is_op(p, "Gemm") || is_op(p, "Flatten")).then_some(2)
    })
}

/// MatMul [-> Add bias] -> BN, with a constant 2-D weight and a 2-D input.
pub fn matmul_bn(g: &Graph, bn: usize, names: &mut Names) -> Result<Option<Outcome>> {
    let bnn = g.node(bn);
    let Some(p) = bnn.input.first().and_then(|x| g.producer(x)) else {
        return Ok(None);
    };
    let (mm_idx, add_idx) = if is_op(g.node(p), "MatMul") {
        (p, None)
    } else if is_op(g.node(p), "Add") {
        let add = g.node(p);
        let mm = add
            .input
            .iter()
            .filter_map(|i| g.producer(i))
            .find(|&q| is_op(g.node(q), "MatMul"));
        match mm {
            Some(q) => (q, Some(p)),
            None => return Ok(None),
        }
    } else {
        return Ok(None);
    };
    let mm = g.node(mm_idx);
    let mut nodes = vec![label(mm)];
    if let Some(a) = add_idx {
        nodes.push(label(g.node(a)));
    }
    nodes.push(label(bnn));
    if let Some(r) = single_use(g, &mm.output[0]) {
        skip_unless!(false, nodes, "{r}");
    }
    if let Some(a) = add_idx {
        if let Some(r) = single_use(g, &g.node(a).output[0]) {
            skip_unless!(false, nodes, "{r}");
        }
    }
    let bn_aff = match bn_affine(g, bn)? {
        Ok(a) => a,
        Err(r) => return Ok(Some(Outcome::Skip(nodes, r))),
    };
    let (w, wty) = match float_const(g, &mm.input[1])? {
        Ok(v) => v,
        Err(r) => return Ok(Some(Outcome::Skip(nodes, format!("MatMul weight {r}")))),
    };
    skip_unless!(w.ndim() == 2, nodes, "MatMul weight has rank {}", w.ndim());
    let n = w.shape()[1];
    skip_unless!(
        n == bn_aff.channels(),
        nodes,
        "MatMul has {n} output columns, BN has {} channels",
        bn_aff.channels()
    );
    let rank = known_rank(g, &mm.input[0]);
    skip_unless!(
        rank == Some(2),
        nodes,
        "MatMul input '{}' is not known to be 2-D (rank {:?}): BN's channel axis would not be the last axis",
        mm.input[0],
        rank
    );
    let (bias_name, bias) = match add_idx {
        None => (None, None),
        Some(a) => {
            let add = g.node(a);
            let other = add
                .input
                .iter()
                .find(|i| **i != mm.output[0])
                .cloned()
                .unwrap_or_default();
            match float_const(g, &other)? {
                Ok((b, _)) => {
                    let ok = b.len() == n
                        && (b.ndim() == 1 || (b.ndim() == 2 && b.shape()[0] == 1))
                        || b.len() == 1;
                    skip_unless!(ok, nodes, "bias has shape {:?}", b.shape());
                    let v: Array1<f64> = if b.len() == 1 {
                        Array1::from_elem(n, b.iter().next().copied().unwrap_or(0.0))
                    } else {
                        b.iter().copied().collect()
                    };
                    (Some(other), Some(v))
                }
                Err(r) => return Ok(Some(Outcome::Skip(nodes, format!("Add operand {r}")))),
            }
        }
    };
    let w2 = fold::fold_gemm_weight(&w, false, &bn_aff);
    let b2 = bn_aff.fold_bias(bias.as_ref()).into_dyn();
    let mut patch = Patch::new(format!("fold {}", nodes.join("+")));
    let wname = write_const(g, &mut patch, names, &mm.input[1], w2, wty)?;
    let mut new_mm = mm.clone();
    new_mm.input[1] = wname;
    patch.replace_node(mm_idx, new_mm);
    match (add_idx, bias_name) {
        (Some(a), Some(bn_name)) => {
            let add = g.node(a);
            let same_shape = g.constant(&bn_name)?.is_some_and(|t| t.shape() == [n]);
            let bname = if same_shape {
                write_const(g, &mut patch, names, &bn_name, b2, wty)?
            } else {
                new_const(&mut patch, names, &format!("{bn_name}_fused"), b2, wty)?
            };
            let mut new_add = add.clone();
            new_add.input = vec![mm.output[0].clone(), bname];
            new_add.output = vec![bnn.output[0].clone()];
            patch.replace_node(a, new_add);
        }
        _ => {
            let bname = new_const(&mut patch, names, &format!("{}_bias", mm.input[1]), b2, wty)?;
            let mut add = NodeProto::new();
            add.op_type = "Add".into();
            add.name = if bnn.name.is_empty() {
                names.fresh("Add")
            } else {
                bnn.name.clone()
            };
            add.input = vec![mm.output[0].clone(), bname];
            add.output = vec![bnn.output[0].clone()];
            patch.add_node(add);
        }
    }
    patch.remove_node(bn);
    Ok(Some(Outcome::Fold(patch, nodes)))
}

/// Why a BN with no foldable producer stays, for the report.
pub fn unfoldable_bn(g: &Graph, bn: usize) -> Option<(Vec<String>, String)> {
    let bnn = g.node(bn);
    let reason = match bnn.input.first().and_then(|x| g.producer(x)) {
        None => "its input is a graph input or constant: nothing to fold into".to_string(),
        Some(p) => {
            let prod = g.node(p);
            if is_op(prod, "Relu") {
                "it follows a Relu: Conv -> Relu -> BN has no backward fold".to_string()
            } else {
                format!(
                    "its producer '{}' is a {}, not Conv, ConvTranspose, Gemm or MatMul",
                    label(prod),
                    prod.op_type
                )
            }
        }
    };
    Some((vec![label(bnn)], reason))
}

/// BN -> Conv (forward fold), only when the Conv has no padding and one group, so every
/// input the Conv reads went through the BN: `W'[o, c] = W[o, c] * s[c]`,
/// `b'[o] = b[o] + sum_{c,k} W[o, c, k] * shift[c]`. The Conv keeps its name and output and
/// reads the BN's input.
pub fn bn_conv(g: &Graph, bn: usize, names: &mut Names) -> Result<Option<Outcome>> {
    let bnn = g.node(bn);
    let Some(y) = bnn.output.first() else {
        return Ok(None);
    };
    let [c] = g.consumers(y) else { return Ok(None) };
    let conv = g.node(*c);
    if !is_op(conv, "Conv") || conv.input.first() != Some(y) {
        return Ok(None);
    }
    let nodes = vec![label(bnn), label(conv)];
    if let Some(r) = single_use(g, y) {
        skip_unless!(false, nodes, "{r}");
    }
    let bn_aff = match bn_affine(g, bn)? {
        Ok(a) => a,
        Err(r) => return Ok(Some(Outcome::Skip(nodes, r))),
    };
    let pads = attr::ints(conv, "pads")?.unwrap_or_default();
    let auto_pad = attr::string(conv, "auto_pad")?.unwrap_or_else(|| "NOTSET".into());
    skip_unless!(
        pads.iter().all(|&p| p == 0) && (auto_pad == "NOTSET" || auto_pad == "VALID"),
        nodes,
        "the Conv after the BN pads its input (pads {pads:?}, auto_pad {auto_pad}): padded zeros do not go through the BN, so a forward fold is not exact"
    );
    let group = attr::int(conv, "group", defaults::GROUP)?;
    skip_unless!(
        group == 1,
        nodes,
        "the Conv after the BN has group = {group}"
    );
    let (w, wty) = match float_const(g, &conv.input[1])? {
        Ok(v) => v,
        Err(r) => return Ok(Some(Outcome::Skip(nodes, format!("weight {r}")))),
    };
    skip_unless!(
        w.ndim() >= 3 && w.shape()[1] == bn_aff.channels(),
        nodes,
        "Conv weight {:?} does not read {} channels",
        w.shape(),
        bn_aff.channels()
    );
    let bias_name = conv.input.get(2).filter(|s| !s.is_empty());
    let bias = match bias_name {
        None => Array1::zeros(w.shape()[0]),
        Some(b) => match float_const(g, b)? {
            Ok((a, _)) if a.len() == w.shape()[0] => as_vec(a),
            Ok((a, _)) => {
                return Ok(Some(Outcome::Skip(
                    nodes,
                    format!("bias has shape {:?}", a.shape()),
                )))
            }
            Err(r) => return Ok(Some(Outcome::Skip(nodes, format!("bias {r}")))),
        },
    };
    let mut w2 = w.clone();
    let mut b2 = bias;
    for (o, mut wo) in w2.axis_iter_mut(ndarray::Axis(0)).enumerate() {
        for (ci, mut wc) in wo.axis_iter_mut(ndarray::Axis(0)).enumerate() {
            b2[o] += wc.sum() * bn_aff.shift[ci];
            wc *= bn_aff.scale[ci];
        }
    }
    let mut patch = Patch::new(format!("fold {}", nodes.join("+")));
    let (wname, bname) = write_weight_and_bias(g, &mut patch, names, conv, (w2, b2), wty)?;
    let mut fused = conv.clone();
    fused.input = vec![bnn.input[0].clone(), wname, bname];
    patch.replace_node(*c, fused).remove_node(bn);
    Ok(Some(Outcome::Fold(patch, nodes)))
}
