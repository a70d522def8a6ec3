//! Running two models (or one model against stored outputs) in tract and comparing.

use crate::error::{Error, Result};
use crate::onnx::{ElemType, Model, TensorData};
use crate::runtime::{Runner, Sample};

use super::data::Case;
use super::metrics::{Comparer, Comparison, Criterion};

/// Runs `a` and `b` in tract on every case and compares `b`'s outputs to `a`'s.
pub fn compare_models(
    a: &Model,
    b: &Model,
    cases: &[Case],
    criterion: Criterion,
) -> Result<Comparison> {
    let names: Vec<String> = a.graph().output.iter().map(|o| o.name.clone()).collect();
    let names_b: Vec<String> = b.graph().output.iter().map(|o| o.name.clone()).collect();
    if names != names_b {
        return Err(Error::Usage(format!(
            "the models have different outputs: {names:?} vs {names_b:?}"
        )));
    }
    let first = cases
        .first()
        .ok_or_else(|| Error::Usage("no input samples to compare on".into()))?;
    let mut ra = Runner::new(a, &first.inputs, &[])?;
    let mut rb = Runner::new(b, &first.inputs, &[])?;
    let mut cmp = Comparer::new(&names, criterion);
    let mut shape_of = shapes(&first.inputs);
    for c in cases {
        if shapes(&c.inputs) != shape_of {
            ra = Runner::new(a, &c.inputs, &[])?;
            rb = Runner::new(b, &c.inputs, &[])?;
            shape_of = shapes(&c.inputs);
        }
        let oa = ra.run(&c.inputs)?;
        let ob = rb.run(&c.inputs)?;
        cmp.add(&oa, &ob);
    }
    Ok(cmp.finish())
}

fn shapes(s: &Sample) -> Vec<(String, ElemType, Vec<usize>)> {
    s.iter()
        .map(|(n, t)| (n.clone(), t.elem_type(), t.shape().to_vec()))
        .collect()
}

/// Runs `model` in tract on every case and compares with the cases' expected outputs.
pub fn compare_expected(model: &Model, cases: &[Case], criterion: Criterion) -> Result<Comparison> {
    let names: Vec<String> = model
        .graph()
        .output
        .iter()
        .map(|o| o.name.clone())
        .collect();
    let first = cases
        .first()
        .ok_or_else(|| Error::Usage("no input samples to compare on".into()))?;
    let mut runner = Runner::new(model, &first.inputs, &[])?;
    let mut shape_of = shapes(&first.inputs);
    let mut cmp = Comparer::new(&names, criterion);
    for c in cases {
        if c.expected.is_empty() {
            return Err(Error::Usage(format!(
                "{}: no expected outputs (output_K.pb)",
                c.source
            )));
        }
        if shapes(&c.inputs) != shape_of {
            runner = Runner::new(model, &c.inputs, &[])?;
            shape_of = shapes(&c.inputs);
        }
        let out = runner.run(&c.inputs)?;
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
    Ok(cmp.finish())
}
