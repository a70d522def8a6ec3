//! Running two models (or one model against stored outputs) in tract and comparing.

use crate::error::{Error, Result};
use crate::onnx::{ElemType, Model, TensorData};
use crate::runtime::{Runner, Sample};

use super::data::Case;
use super::metrics::{Comparer, Comparison, Criterion};
use super::source::SampleSource;

/// Runs `a` and `b` in tract on every case of `cases` (read one at a time) and compares `b`'s
/// outputs to `a`'s. The comparison carries the data's notes. One runner is alive at a time
/// ([`run_in_turns`]).
pub fn compare_models<S: SampleSource + ?Sized>(
    a: &Model,
    b: &Model,
    cases: &S,
    criterion: Criterion,
) -> Result<Comparison> {
    compare_with(
        output_names(a),
        output_names(b),
        cases,
        criterion,
        &mut |s| Runner::new(a, s, &[]),
        &mut |s| Runner::new(b, s, &[]),
    )
}

/// [`compare_models`] with each side's runner built by `make_a` / `make_b` for a sample's
/// inputs: the reference `a` may, for example, be read again from its file each time it is
/// needed instead of being held. `names_a` / `names_b` are the models' outputs.
pub fn compare_with<S: SampleSource + ?Sized>(
    names_a: Vec<String>,
    names_b: Vec<String>,
    cases: &S,
    criterion: Criterion,
    make_a: &mut MakeRunner<'_>,
    make_b: &mut MakeRunner<'_>,
) -> Result<Comparison> {
    if names_a != names_b {
        return Err(Error::Usage(format!(
            "the models have different outputs: {names_a:?} vs {names_b:?}"
        )));
    }
    if cases.is_empty() {
        return Err(Error::Usage("no input samples to compare on".into()));
    }
    let mut cmp = Comparer::new(&names_a, criterion);
    let mut p = crate::progress::counted(
        format!("running both models in tract on {} samples", cases.len()),
        cases.len(),
    );
    run_in_turns(cases, make_a, make_b, &mut |_, oa, ob| {
        cmp.add(oa, ob);
        p.inc();
        Ok(())
    })?;
    drop(p);
    let mut comparison = cmp.finish();
    comparison.notes = cases.notes();
    Ok(comparison)
}

fn output_names(m: &Model) -> Vec<String> {
    m.graph().output.iter().map(|o| o.name.clone()).collect()
}

/// Builds a tract runner for inputs shaped like the sample given.
pub type MakeRunner<'a> = dyn FnMut(&Sample) -> Result<Runner> + 'a;

/// Takes a case with the first and the second model's outputs on it ([`run_in_turns`]).
pub type PairVisitor<'a> = dyn FnMut(&Case, &[TensorData], &[TensorData]) -> Result<()> + 'a;

/// The bytes of cases and first-model outputs [`run_in_turns`] holds before the second model
/// runs on them.
const HELD_BYTES: usize = 256 << 20;

/// Runs two models on every case of `cases`, in turns, so that a single tract runner is alive
/// at a time (a runner holds its model's weights: two at once held both models' weights
/// beside the models themselves). The first model runs on consecutive cases until they and
/// its outputs hold 256 MiB (at least one case), its runner is dropped, then the second model
/// runs on the same cases and `pair` gets each case with the first and the second model's
/// outputs, in case order; and so on until every case has run. Each side's runner is built by
/// `make_a` / `make_b` for the first case of a turn, and again (the old one dropped first)
/// when the inputs' shapes change.
pub fn run_in_turns<S: SampleSource + ?Sized>(
    cases: &S,
    make_a: &mut MakeRunner<'_>,
    make_b: &mut MakeRunner<'_>,
    pair: &mut PairVisitor<'_>,
) -> Result<()> {
    turns_holding(HELD_BYTES, cases, make_a, make_b, pair)
}

/// [`run_in_turns`] holding up to `held_bytes` per turn.
fn turns_holding<S: SampleSource + ?Sized>(
    held_bytes: usize,
    cases: &S,
    make_a: &mut MakeRunner<'_>,
    make_b: &mut MakeRunner<'_>,
    pair: &mut PairVisitor<'_>,
) -> Result<()> {
    let n = cases.len();
    let mut next = 0;
    while next < n {
        let mut held = Vec::new();
        let mut bytes = 0usize;
        let mut runner: Option<(Runner, Shapes)> = None;
        while next < n && (held.is_empty() || bytes < held_bytes) {
            let c = cases.read(next)?;
            let out = run_on(&mut runner, make_a, &c.inputs)?;
            bytes = bytes
                .saturating_add(case_bytes(&c))
                .saturating_add(out.iter().map(data_bytes).sum());
            held.push((c, out));
            next += 1;
        }
        drop(runner);
        let mut runner: Option<(Runner, Shapes)> = None;
        for (c, oa) in &held {
            let ob = run_on(&mut runner, make_b, &c.inputs)?;
            pair(c, oa, &ob)?;
        }
    }
    Ok(())
}

/// Runs `inputs` on `runner`, (re)built by `make` first when there is none or the inputs'
/// shapes differ from the ones it was built for.
fn run_on(
    runner: &mut Option<(Runner, Shapes)>,
    make: &mut MakeRunner<'_>,
    inputs: &Sample,
) -> Result<Vec<TensorData>> {
    let s = shapes(inputs);
    if runner.as_ref().is_none_or(|(_, old)| *old != s) {
        *runner = None;
        *runner = Some((make(inputs)?, s));
    }
    let (r, _) = runner.as_ref().expect("set above");
    r.run(inputs)
}

fn data_bytes(t: &TensorData) -> usize {
    t.len().saturating_mul(t.elem_type().size())
}

fn case_bytes(c: &Case) -> usize {
    c.inputs
        .iter()
        .chain(&c.expected)
        .map(|(_, t)| data_bytes(t))
        .sum()
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

#[cfg(test)]
mod turn_tests {
    use super::*;

    fn case(k: usize, batch: usize) -> Case {
        Case {
            source: format!("case {k}"),
            inputs: vec![(
                "input".to_string(),
                TensorData::F32(ndarray::ArrayD::from_shape_fn(
                    ndarray::IxDyn(&[batch, 1, 8, 8]),
                    |i| ((k * 7 + i[0] * 64 + i[2] * 8 + i[3]) % 17) as f32 / 16.0,
                )),
            )],
            expected: vec![],
            labels: None,
        }
    }

    /// Turns give every case, in order, the outputs each model gives it alone; a runner is
    /// built once per turn and side, and again when the shapes change.
    #[test]
    fn turns_pair_every_case_in_order() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("onnx_models/digits_cnn/model.onnx");
        let model = crate::onnx::load(&path).unwrap();
        // batch 2, 2, 3, 3, 3: one shape change
        let cases: Vec<Case> = (0..5).map(|k| case(k, if k < 2 { 2 } else { 3 })).collect();
        for (held, builds) in [(usize::MAX, 2), (1, 5)] {
            let (built_a, built_b) = (std::cell::Cell::new(0), std::cell::Cell::new(0));
            let mut seen = Vec::new();
            let mut make_a = |s: &Sample| {
                built_a.set(built_a.get() + 1);
                Runner::new(&model, s, &[])
            };
            let mut make_b = |s: &Sample| {
                built_b.set(built_b.get() + 1);
                Runner::new(&model, s, &[])
            };
            turns_holding(
                held,
                cases.as_slice(),
                &mut make_a,
                &mut make_b,
                &mut |c, a, b| {
                    let alone = Runner::new(&model, &c.inputs, &[])
                        .unwrap()
                        .run(&c.inputs)
                        .unwrap();
                    assert_eq!(a, alone.as_slice());
                    assert_eq!(b, alone.as_slice());
                    seen.push(c.source.clone());
                    Ok(())
                },
            )
            .unwrap();
            let names: Vec<String> = (0..5).map(|k| format!("case {k}")).collect();
            assert_eq!(seen, names);
            assert_eq!(
                (built_a.get(), built_b.get()),
                (builds, builds),
                "held {held}"
            );
        }
    }
}
