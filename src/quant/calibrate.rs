//! Calibration: the float model runs in tract with the values to observe exposed as outputs,
//! and every sample streams into one observer per value. Observer state is O(tensors x bins),
//! never O(samples). Samples run in parallel over one shared optimized plan (one tract state
//! per run); each thread keeps partial observers that are merged at the end. The
//! moving-average observer depends on sample order, so it runs on one thread, in order.
//! Samples come from a [`SampleSource`], read as each thread reaches them: at most one sample
//! per thread is in memory.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::observe::{Method, Observer, Target};
use crate::error::{Error, Result};
use crate::onnx::{Model, TensorData};
use crate::runtime::{Output, Runner, Sample};
use crate::verify::{Case, SampleSource};

/// Calibrated ranges by value name, with how they were obtained; saved and loaded as JSON so
/// calibration runs once.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Ranges {
    pub method: Method,
    pub samples: usize,
    /// The observed min and max of each value.
    pub observed: BTreeMap<String, (f32, f32)>,
    /// The range chosen by the method, before the zero adjustment.
    pub ranges: BTreeMap<String, (f32, f32)>,
}

impl Ranges {
    /// Writes the ranges as JSON (atomically).
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).expect("ranges serialize");
        crate::files::write_atomic(path, text.as_bytes())
    }

    /// Reads ranges written by [`Ranges::save`].
    pub fn load(path: &Path) -> Result<Ranges> {
        // A ranges file is small; 256 MiB is far beyond any real one.
        let bytes = crate::files::read_regular(path, 256 << 20)?;
        serde_json::from_slice(&bytes).map_err(|e| Error::Decode {
            what: path.display().to_string(),
            reason: format!("not a qfold ranges file: {e}"),
        })
    }
}

/// The values of an output as f32, borrowed when tract produced a contiguous f32 tensor (the
/// usual case: no copy on the calibration loop).
fn as_f32<'t>(name: &str, t: &'t TensorData) -> Result<Cow<'t, [f32]>> {
    Ok(match t {
        TensorData::F32(a) => match a.as_slice() {
            Some(s) => Cow::Borrowed(s),
            None => Cow::Owned(a.iter().copied().collect()),
        },
        t if t.elem_type().is_float() => Cow::Owned(t.to_f64().iter().map(|&v| v as f32).collect()),
        t => {
            return Err(Error::tensor(
                name,
                format!("cannot calibrate a {} value", t.elem_type().name()),
            ))
        }
    })
}

/// Partial observers merged in block order, whatever order the blocks finish in.
#[derive(Default)]
struct OrderedMerge {
    acc: Option<Vec<Observer>>,
    waiting: BTreeMap<usize, Vec<Observer>>,
    turn: usize,
}

impl OrderedMerge {
    fn add(&mut self, block: usize, obs: Vec<Observer>) {
        self.waiting.insert(block, obs);
        while let Some(ready) = self.waiting.remove(&self.turn) {
            self.acc = Some(match self.acc.take() {
                None => ready,
                Some(mut m) => {
                    for (a, o) in m.iter_mut().zip(ready) {
                        a.merge(o);
                    }
                    m
                }
            });
            self.turn += 1;
        }
    }
}

/// Each input's name and shape.
type Shapes = Vec<(String, Vec<usize>)>;

/// The [`Shapes`] of a sample's inputs.
fn shapes_of(inputs: &Sample) -> Shapes {
    inputs
        .iter()
        .map(|(n, t)| (n.clone(), t.shape().to_vec()))
        .collect()
}

/// Whether `inputs` have exactly `shapes` (compared without allocating: once per sample).
fn shaped_as(inputs: &Sample, shapes: &Shapes) -> bool {
    inputs.len() == shapes.len()
        && inputs
            .iter()
            .zip(shapes)
            .all(|((n, t), (m, s))| n == m && t.shape() == s.as_slice())
}

/// A runner of `model` for inputs shaped like `inputs`, exposing `extra`.
fn runner_for(model: &mut ModelRef<'_>, inputs: &Sample, extra: &[String]) -> Result<Runner> {
    match model {
        ModelRef::Shared(m) => Runner::new(m, inputs, extra),
        ModelRef::Lent(m) => Runner::new_lending(m, inputs, extra),
    }
}

/// Samples per calibration block: the unit of parallel work and of ordered merging.
const BLOCK: usize = 4;

/// Runs the float `model` over `samples` (`&[Sample]`, `&[Case]` or any [`SampleSource`]) and
/// observes `values`. `threads` = 0 uses every core. Samples may differ in shape (text lines of
/// several widths, clips of several lengths): those shaped unlike the first are observed after
/// the others, one tract runner per shape (so a moving average sees them last).
pub fn observe<S: SampleSource + ?Sized>(
    model: &Model,
    values: &[String],
    samples: &S,
    method: Method,
    threads: usize,
) -> Result<BTreeMap<String, Observer>> {
    observe_model(ModelRef::Shared(model), values, samples, method, threads)
}

/// [`observe`], lending `model`'s weights to tract rather than copying them
/// ([`Runner::new_lending`]): preparing the run holds the weights twice (qfold's and
/// tract's), not three times. `model` is unchanged afterwards.
pub fn observe_lending<S: SampleSource + ?Sized>(
    model: &mut Model,
    values: &[String],
    samples: &S,
    method: Method,
    threads: usize,
) -> Result<BTreeMap<String, Observer>> {
    observe_model(ModelRef::Lent(model), values, samples, method, threads)
}

/// How [`observe_model`] has the model: its tract runner copies or borrows the weights.
enum ModelRef<'a> {
    Shared(&'a Model),
    Lent(&'a mut Model),
}

fn observe_model<S: SampleSource + ?Sized>(
    model: ModelRef<'_>,
    values: &[String],
    samples: &S,
    method: Method,
    threads: usize,
) -> Result<BTreeMap<String, Observer>> {
    if samples.is_empty() {
        return Err(Error::Usage("no calibration samples".into()));
    }
    let first = samples.read(0)?;
    let graph_outputs = match &model {
        ModelRef::Shared(m) => &m.graph().output,
        ModelRef::Lent(m) => &m.graph().output,
    };
    let outputs: Vec<String> = graph_outputs.iter().map(|o| o.name.clone()).collect();
    let output_set: HashSet<&String> = outputs.iter().collect();
    let extra: Vec<String> = values
        .iter()
        .filter(|v| !output_set.contains(v))
        .cloned()
        .collect();
    let mut model = model;
    let runner = runner_for(&mut model, &first.inputs, &extra)?;
    // tract's runner is built for the first sample's shapes: samples of other shapes are set
    // aside and observed afterwards, with a runner per shape
    let first_shapes = shapes_of(&first.inputs);
    drop(first);
    let position_of: HashMap<&str, usize> = runner
        .output_names()
        .iter()
        .enumerate()
        .rev()
        .map(|(k, o)| (o.as_str(), k))
        .collect();
    let positions: Vec<usize> = values
        .iter()
        .map(|v| {
            position_of.get(v.as_str()).copied().ok_or_else(|| {
                Error::runtime("calibration", format!("value '{v}' was not exposed"))
            })
        })
        .collect::<Result<_>>()?;
    // For each output of the runner, the observer of the value it is, if any.
    let mut observer_of: Vec<Option<usize>> = vec![None; runner.output_names().len()];
    for (i, &p) in positions.iter().enumerate() {
        if let Some(slot) = observer_of.get_mut(p) {
            *slot = Some(i);
        }
    }
    let threads = if matches!(method, Method::MovingAverage { .. }) {
        1
    } else if threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        threads
    }
    .min(samples.len().div_ceil(BLOCK))
    .max(1);
    let progress = Mutex::new(crate::progress::counted(
        format!("calibrating on {} samples", samples.len()),
        samples.len(),
    ));
    // Samples go in fixed blocks whatever the thread count; workers take blocks in turn and
    // the partial observers are merged in block order, so the ranges (histogram merges are
    // not associative bit for bit) do not depend on how many cores ran them. At most a few
    // blocks wait for their turn: memory stays O(threads x tensors x bins).
    let blocks = samples.len().div_ceil(BLOCK);
    let next = AtomicUsize::new(0);
    let set_aside: Mutex<Vec<(usize, Shapes)>> = Mutex::new(Vec::new());
    // one sample through `runner` into `obs`
    let observe_sample = |runner: &Runner, s: &Case, obs: &mut Vec<Observer>| -> Result<()> {
        let mut visit = |p: usize, out: Output<'_>| -> Result<()> {
            let Some(&i) = observer_of.get(p).and_then(Option::as_ref) else {
                return Ok(());
            };
            match out {
                Output::F32(values) => obs[i].observe(values),
                Output::Data(t) => obs[i].observe(&as_f32(&values[i], &t)?),
            }
            Ok(())
        };
        runner
            .run_visit(&s.inputs, &mut visit)
            .map_err(|e| match e {
                Error::Input { input, reason } => Error::Input {
                    input,
                    reason: format!("{}: {reason}", s.source),
                },
                Error::Runtime { context, reason } => Error::Runtime {
                    context: format!("{}: {context}", s.source),
                    reason,
                },
                e => e,
            })
    };
    let observe_block = |b: usize| -> Result<Vec<Observer>> {
        let mut obs: Vec<Observer> = values.iter().map(|_| Observer::new(method)).collect();
        for k in b * BLOCK..((b + 1) * BLOCK).min(samples.len()) {
            let s = samples.read(k)?;
            if !shaped_as(&s.inputs, &first_shapes) {
                let shapes = shapes_of(&s.inputs);
                set_aside.lock().expect("set-aside lock").push((k, shapes));
                continue;
            }
            observe_sample(&runner, &s, &mut obs)?;
            progress.lock().expect("progress lock").inc();
        }
        Ok(obs)
    };
    let merged = Mutex::new(OrderedMerge::default());
    let worker = || -> Result<()> {
        loop {
            let b = next.fetch_add(1, Ordering::SeqCst);
            if b >= blocks {
                return Ok(());
            }
            let obs = observe_block(b)?;
            merged.lock().expect("merge lock").add(b, obs);
        }
    };
    let results: Vec<Result<()>> = if threads == 1 {
        vec![worker()]
    } else {
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads).map(|_| s.spawn(worker)).collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(Error::runtime("calibration", "a worker thread panicked"))
                    })
                })
                .collect()
        })
    };
    for r in results {
        r?;
    }
    // The samples of other shapes, a runner per shape (in the order the shapes first come),
    // each shape's samples one after another; merged after the blocks, in that order.
    let mut set_aside = set_aside.into_inner().expect("set-aside lock");
    set_aside.sort_unstable_by_key(|(k, _)| *k);
    let mut groups: Vec<(Shapes, Vec<usize>)> = Vec::new();
    for (k, shapes) in set_aside {
        match groups.iter_mut().find(|(s, _)| *s == shapes) {
            Some((_, ks)) => ks.push(k),
            None => groups.push((shapes, vec![k])),
        }
    }
    if !groups.is_empty() {
        drop(runner);
        let mut merged = merged.lock().expect("merge lock");
        for (g, (_, ks)) in groups.iter().enumerate() {
            let first = samples.read(ks[0])?;
            let runner = runner_for(&mut model, &first.inputs, &extra)?;
            if runner.output_names().len() != observer_of.len() {
                return Err(Error::runtime(
                    "calibration",
                    format!(
                        "{}: the model exposes other values at this shape",
                        first.source
                    ),
                ));
            }
            drop(first);
            let mut obs: Vec<Observer> = values.iter().map(|_| Observer::new(method)).collect();
            for &k in ks {
                observe_sample(&runner, &*samples.read(k)?, &mut obs)?;
                progress.lock().expect("progress lock").inc();
            }
            merged.add(blocks + g, obs);
        }
    }
    drop(progress);
    let acc = merged.into_inner().expect("merge lock").acc;
    Ok(values
        .iter()
        .cloned()
        .zip(acc.unwrap_or_default())
        .collect())
}

/// Calibrates and chooses ranges for `values` for the activation grid `target`.
pub fn calibrate<S: SampleSource + ?Sized>(
    model: &Model,
    values: &[String],
    samples: &S,
    method: Method,
    target: Target,
    threads: usize,
) -> Result<Ranges> {
    let observers = observe(model, values, samples, method, threads)?;
    ranges_of(&observers, method, samples.len(), target)
}

/// [`calibrate`], lending `model`'s weights to tract ([`observe_lending`]).
pub fn calibrate_lending<S: SampleSource + ?Sized>(
    model: &mut Model,
    values: &[String],
    samples: &S,
    method: Method,
    target: Target,
    threads: usize,
) -> Result<Ranges> {
    let observers = observe_lending(model, values, samples, method, threads)?;
    ranges_of(&observers, method, samples.len(), target)
}

fn ranges_of(
    observers: &BTreeMap<String, Observer>,
    method: Method,
    samples: usize,
    target: Target,
) -> Result<Ranges> {
    let mut observed = BTreeMap::new();
    let mut ranges = BTreeMap::new();
    for (v, o) in observers {
        match (o.min_max(), o.range(target)) {
            (Some(mm), Some(r)) => {
                observed.insert(v.clone(), mm);
                ranges.insert(v.clone(), r);
            }
            _ => {
                return Err(Error::tensor(
                    v,
                    "no finite value observed during calibration",
                ))
            }
        }
    }
    Ok(Ranges {
        method,
        samples,
        observed,
        ranges,
    })
}
