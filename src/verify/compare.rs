//! Running two models (or one model against stored outputs) in tract and comparing.

use crate::error::{Error, Result};
use crate::onnx::{ElemType, Model, TensorData};
use crate::runtime::{Runner, Sample};

use super::data::Case;
use super::metrics::{Comparer, Comparison, Criterion};
use super::source::SampleSource;

/// Runs `a` and `b` in tract on every case of `cases` (read one at a time) and compares `b`'s
/// outputs to `a`'s. The comparison carries the data's notes.
pub fn compare_models<S: SampleSource + ?Sized>(
    a: &Model,
    b: &Model,
    cases: &S,
    criterion: Criterion,
) -> Result<Comparison> {
    let names: Vec<String> = a.graph().output.iter().map(|o| o.name.clone()).collect();
    let names_b: Vec<String> = b.graph().output.iter().map(|o| o.name.clone()).collect();
    if names != names_b {
        return Err(Error::Usage(format!(
            "the models have different outputs: {names:?} vs {names_b:?}"
        )));
    }
    if cases.is_empty() {
        return Err(Error::Usage("no input samples to compare on".into()));
    }
    let first = cases.read(0)?;
    let mut ra = Runner::new(a, &first.inputs, &[])?;
    let mut rb = Runner::new(b, &first.inputs, &[])?;
    let mut cmp = Comparer::new(&names, criterion);
    let mut shape_of = shapes(&first.inputs);
    drop(first);
    let mut p = crate::progress::counted(
        format!("running both models in tract on {} samples", cases.len()),
        cases.len(),
    );
    for k in 0..cases.len() {
        let c = cases.read(k)?;
        if shapes(&c.inputs) != shape_of {
            ra = Runner::new(a, &c.inputs, &[])?;
            rb = Runner::new(b, &c.inputs, &[])?;
            shape_of = shapes(&c.inputs);
        }
        let oa = ra.run(&c.inputs)?;
        let ob = rb.run(&c.inputs)?;
        cmp.add(&oa, &ob);
        p.inc();
    }
    let mut comparison = cmp.finish();
    comparison.notes = cases.notes();
    Ok(comparison)
}

/// The names, types and shapes of a sample's inputs.
type Shapes = Vec<(String, ElemType, Vec<usize>)>;

fn shapes(s: &Sample) -> Shapes {
    s.iter()
        .map(|(n, t)| (n.clone(), t.elem_type(), t.shape().to_vec()))
        .collect()
}

/// Runs `model` in tract on every case of `cases` (read one at a time) and compares with the
/// cases' expected outputs.
pub fn compare_expected<S: SampleSource + ?Sized>(
    model: &Model,
    cases: &S,
    criterion: Criterion,
) -> Result<Comparison> {
    let names: Vec<String> = model
        .graph()
        .output
        .iter()
        .map(|o| o.name.clone())
        .collect();
    if cases.is_empty() {
        return Err(Error::Usage("no input samples to compare on".into()));
    }
    let first = cases.read(0)?;
    let params = parameter_inputs(model);
    // tract wants some parameters constant (BatchNormalization's statistics, Q/DQ scales and
    // zero points): when the model does not load with them as inputs and the data set gives
    // their values, each case runs with them bound as initializers.
    let mut runner: Option<(Runner, Shapes)> = None;
    let mut bound: Option<Model> = None;
    match Runner::new(model, &first.inputs, &[]) {
        Ok(r) => runner = Some((r, shapes(&first.inputs))),
        Err(Error::Runtime { .. })
            if !params.is_empty()
                && params
                    .iter()
                    .all(|p| first.inputs.iter().any(|(n, _)| n == p)) =>
        {
            bound = Some(with_parameters_bound(model, &params));
        }
        Err(e) => return Err(e),
    }
    drop(first);
    let mut cmp = Comparer::new(&names, criterion);
    let mut p = crate::progress::counted(
        format!("running the model in tract on {} samples", cases.len()),
        cases.len(),
    );
    for k in 0..cases.len() {
        p.inc();
        let c = cases.read(k)?;
        let c = c.as_ref();
        if c.expected.is_empty() {
            return Err(Error::Usage(format!(
                "{}: no expected outputs (output_K.pb)",
                c.source
            )));
        }
        let out = match bound.as_mut() {
            Some(m) => {
                let inputs = set_parameters(m, &params, c).ok_or_else(|| {
                    Error::Usage(format!("{}: a parameter input is missing", c.source))
                })?;
                Runner::new(m, &inputs, &[])?.run(&inputs)?
            }
            None => {
                let shape_of = shapes(&c.inputs);
                if runner.as_ref().is_none_or(|(_, s)| *s != shape_of) {
                    runner = Some((Runner::new(model, &c.inputs, &[])?, shape_of));
                }
                let (r, _) = runner.as_ref().expect("set above");
                r.run(&c.inputs)?
            }
        };
        let expected: Vec<TensorData> = names
            .iter()
            .map(|n| {
                c.expected
                    .iter()
                    .find(|(m, _)| m == n)
                    .map(|(_, t)| t.clone())
                    .ok_or_else(|| {
                        Error::Usage(format!("{}: no expected value for output '{n}'", c.source))
                    })
            })
            .collect::<Result<_>>()?;
        cmp.add(&expected, &out);
    }
    let mut comparison = cmp.finish();
    comparison.notes = cases.notes();
    Ok(comparison)
}

/// Graph inputs that no node reads as its first (data) input: parameters such as BN statistics
/// or Q/DQ scales and zero points, which tract wants constant.
fn parameter_inputs(model: &Model) -> Vec<String> {
    let g = crate::graph::Graph::of_model(model);
    g.real_inputs()
        .into_iter()
        .map(|v| v.name.clone())
        .filter(|name| {
            let readers = g.consumers(name);
            !readers.is_empty()
                && readers
                    .iter()
                    .all(|&c| g.nodes()[c].input.first() != Some(name))
        })
        .collect()
}

/// `model` with the parameter inputs removed from its inputs; [`set_parameters`] writes each
/// case's values as initializers. One copy serves every case.
fn with_parameters_bound(model: &Model, params: &[String]) -> Model {
    let mut m = model.clone();
    m.graph_mut().input.retain(|v| !params.contains(&v.name));
    m
}

/// Writes the case's parameter values into `m`'s initializers and returns the case's other
/// inputs; `None` when the case lacks a parameter.
fn set_parameters(m: &mut Model, params: &[String], case: &Case) -> Option<Sample> {
    let g = m.graph_mut();
    for p in params {
        let (_, t) = case.inputs.iter().find(|(n, _)| n == p)?;
        let proto = t.to_proto(p);
        match g.initializer.iter_mut().find(|x| x.name == *p) {
            Some(slot) => *slot = proto,
            None => g.initializer.push(proto),
        }
    }
    Some(
        case.inputs
            .iter()
            .filter(|(n, _)| !params.contains(n))
            .cloned()
            .collect(),
    )
}
