//! Comparison metrics and tolerances: per output max abs / rel error, cosine, SQNR, top-1.

use serde::Serialize;

use crate::onnx::TensorData;

/// Top-1 accuracy of the first output against the cases' labels: (correct, total).
pub fn accuracy(outputs: &[TensorData], labels: &[i64]) -> (usize, usize) {
    let Some(logits) = outputs.first() else {
        return (0, 0);
    };
    let l = logits.to_f64();
    if l.ndim() != 2 || l.shape()[0] != labels.len() {
        return (0, 0);
    }
    let correct = l
        .outer_iter()
        .zip(labels)
        .filter(|(row, &y)| argmax(row.iter().copied()) as i64 == y)
        .count();
    (correct, labels.len())
}

/// What makes a comparison pass.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Criterion {
    /// Every element within `atol * max(1, peak) + rtol * |reference|`, where `peak` is the
    /// largest magnitude in that output of the sample: numpy's allclose with the absolute term
    /// following the output's scale, so float noise on a network whose outputs are in the
    /// hundreds is judged like the same noise on outputs near one.
    Tolerance { atol: f64, rtol: f64 },
    /// SQNR of every output at least this many dB.
    MinSqnr { db: f64 },
}

/// Named tolerance levels.
pub mod tolerance {
    use super::Criterion;
    /// Bit-identical.
    pub const EXACT: Criterion = Criterion::Tolerance {
        atol: 0.0,
        rtol: 0.0,
    };
    /// Float rewrites (fusion): 1e-5 absolute, 1e-4 relative.
    pub const FLOAT: Criterion = Criterion::Tolerance {
        atol: 1e-5,
        rtol: 1e-4,
    };
    /// Float16 models: folded weights rounded to half precision move outputs by a few ulps of
    /// the operands, so 1e-2 absolute and relative.
    pub const HALF: Criterion = Criterion::Tolerance {
        atol: 1e-2,
        rtol: 1e-2,
    };
    /// Loose: runtimes with different accumulation order on deep models.
    pub const LOOSE: Criterion = Criterion::Tolerance {
        atol: 1e-3,
        rtol: 1e-2,
    };

    /// The level for a float rewrite of `model`: half when any graph input or output is 16-bit
    /// floating point, float otherwise.
    pub fn for_model(model: &crate::onnx::Model) -> Criterion {
        use crate::onnx::proto::type_proto;
        let g = model.graph();
        let half = g.input.iter().chain(&g.output).any(|v| {
            matches!(
                v.type_.as_ref().and_then(|t| t.value.as_ref()),
                Some(type_proto::Value::TensorType(t)) if t.elem_type == 10 || t.elem_type == 16
            )
        });
        if half {
            HALF
        } else {
            FLOAT
        }
    }

    /// A level by name: exact, float, half, loose.
    pub fn by_name(name: &str) -> Option<Criterion> {
        Some(match name.to_ascii_lowercase().as_str() {
            "exact" => EXACT,
            "float" => FLOAT,
            "half" => HALF,
            "loose" => LOOSE,
            _ => return None,
        })
    }
}

/// Running statistics of one output over many samples.
#[derive(Debug, Clone, Default)]
struct Acc {
    elements: usize,
    sum_ref2: f64,
    sum_out2: f64,
    sum_err2: f64,
    dot: f64,
    max_abs: f64,
    max_rel: f64,
    violations: usize,
    top1_rows: usize,
    top1_agree: usize,
    mismatch: Option<String>,
}

/// Metrics of one output.
#[derive(Debug, Clone, Serialize)]
pub struct OutputMetrics {
    pub name: String,
    pub elements: usize,
    pub max_abs: f64,
    pub max_rel: f64,
    pub cosine: f64,
    /// `None` when the outputs are identical (infinite SQNR).
    pub sqnr_db: Option<f64>,
    /// Fraction of rows whose argmax agrees, for `[N, C]` outputs.
    pub top1: Option<f64>,
    /// Elements outside the tolerance (for a tolerance criterion; 0 under an SQNR criterion).
    pub violations: usize,
    /// Shape or type mismatch, if any.
    pub mismatch: Option<String>,
    pub passed: bool,
}

/// The result of comparing outputs over a set of samples.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    pub samples: usize,
    pub criterion: Criterion,
    pub outputs: Vec<OutputMetrics>,
    pub passed: bool,
    /// How the input data were read (layouts, casts, files left out), when worth saying.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

fn argmax(row: impl Iterator<Item = f64>) -> usize {
    let mut best = (0, f64::NEG_INFINITY);
    for (i, v) in row.enumerate() {
        if v > best.1 {
            best = (i, v);
        }
    }
    best.0
}

impl Acc {
    fn add(&mut self, reference: &TensorData, actual: &TensorData, atol: f64, rtol: f64) {
        if reference.shape() != actual.shape() {
            self.mismatch = Some(format!(
                "shape {:?} vs reference {:?}",
                actual.shape(),
                reference.shape()
            ));
            return;
        }
        let r = reference.to_f64();
        let a = actual.to_f64();
        let peak = r.iter().fold(
            1.0f64,
            |m, v| if v.is_finite() { m.max(v.abs()) } else { m },
        );
        let atol = atol * peak;
        for (&x, &y) in r.iter().zip(a.iter()) {
            let err = (x - y).abs();
            let err = if err.is_nan() {
                if x.is_nan() && y.is_nan() {
                    0.0
                } else {
                    f64::INFINITY
                }
            } else if x == y {
                0.0
            } else {
                err
            };
            self.elements += 1;
            self.sum_ref2 += x * x;
            self.sum_out2 += y * y;
            self.sum_err2 += err * err;
            self.dot += x * y;
            self.max_abs = self.max_abs.max(err);
            if x.abs() > atol.max(f64::MIN_POSITIVE) {
                self.max_rel = self.max_rel.max(err / x.abs());
            }
            if err > atol + rtol * x.abs() {
                self.violations += 1;
            }
        }
        let shape = r.shape();
        if shape.len() == 2 && shape[1] >= 2 {
            for (rr, aa) in r.outer_iter().zip(a.outer_iter()) {
                self.top1_rows += 1;
                if argmax(rr.iter().copied()) == argmax(aa.iter().copied()) {
                    self.top1_agree += 1;
                }
            }
        }
    }

    fn finish(self, name: &str, criterion: Criterion) -> OutputMetrics {
        let sqnr_db = if self.sum_err2 == 0.0 {
            None
        } else {
            Some(10.0 * (self.sum_ref2 / self.sum_err2).log10())
        };
        let norm = (self.sum_ref2 * self.sum_out2).sqrt();
        let cosine = if norm == 0.0 {
            if self.sum_err2 == 0.0 {
                1.0
            } else {
                0.0
            }
        } else {
            self.dot / norm
        };
        let passed = self.mismatch.is_none()
            && match criterion {
                Criterion::Tolerance { .. } => self.violations == 0,
                Criterion::MinSqnr { db } => sqnr_db.is_none_or(|s| s >= db),
            };
        OutputMetrics {
            name: name.to_string(),
            elements: self.elements,
            max_abs: self.max_abs,
            max_rel: self.max_rel,
            cosine,
            sqnr_db,
            top1: (self.top1_rows > 0).then(|| self.top1_agree as f64 / self.top1_rows as f64),
            // elements out of tolerance mean nothing under an SQNR criterion
            violations: match criterion {
                Criterion::Tolerance { .. } => self.violations,
                Criterion::MinSqnr { .. } => 0,
            },
            mismatch: self.mismatch,
            passed,
        }
    }
}

/// Accumulates output comparisons over samples.
#[derive(Debug, Clone)]
pub struct Comparer {
    criterion: Criterion,
    names: Vec<String>,
    accs: Vec<Acc>,
    samples: usize,
}

impl Comparer {
    /// A comparer for outputs named `names`.
    pub fn new(names: &[String], criterion: Criterion) -> Comparer {
        Comparer {
            criterion,
            names: names.to_vec(),
            accs: vec![Acc::default(); names.len()],
            samples: 0,
        }
    }

    /// Adds one sample's outputs (same order as the names).
    pub fn add(&mut self, reference: &[TensorData], actual: &[TensorData]) {
        let (atol, rtol) = match self.criterion {
            Criterion::Tolerance { atol, rtol } => (atol, rtol),
            Criterion::MinSqnr { .. } => (0.0, 0.0),
        };
        for ((acc, r), a) in self.accs.iter_mut().zip(reference).zip(actual) {
            acc.add(r, a, atol, rtol);
        }
        self.samples += 1;
    }

    /// The metrics.
    pub fn finish(self) -> Comparison {
        let criterion = self.criterion;
        let outputs: Vec<OutputMetrics> = self
            .accs
            .into_iter()
            .zip(&self.names)
            .map(|(a, n)| a.finish(n, criterion))
            .collect();
        Comparison {
            samples: self.samples,
            criterion,
            passed: outputs.iter().all(|o| o.passed),
            outputs,
            notes: vec![],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    fn t(v: ndarray::Array2<f32>) -> TensorData {
        TensorData::F32(v.into_dyn())
    }

    #[test]
    fn metrics_by_hand() {
        let r = t(array![[3.0, 4.0], [1.0, 0.0]]);
        let a = t(array![[3.0, 4.5], [1.0, 0.0]]);
        let mut c = Comparer::new(&["y".into()], tolerance::FLOAT);
        c.add(&[r], &[a]);
        let m = c.finish();
        let o = &m.outputs[0];
        assert_eq!(o.max_abs, 0.5);
        assert!((o.max_rel - 0.125).abs() < 1e-12);
        // sum ref^2 = 26, sum err^2 = 0.25
        assert!((o.sqnr_db.unwrap() - 10.0 * (26.0f64 / 0.25).log10()).abs() < 1e-9);
        let cos = (9.0 + 18.0 + 1.0) / (26.0f64.sqrt() * (9.0f64 + 20.25 + 1.0).sqrt());
        assert!((o.cosine - cos).abs() < 1e-12);
        // row 0 argmax 1 vs 1, row 1 argmax 0 vs 0
        assert_eq!(o.top1, Some(1.0));
        assert_eq!(o.violations, 1);
        assert!(!m.passed);
    }

    #[test]
    fn identical_is_infinite_sqnr_and_nan_fails() {
        let r = t(array![[1.0, 2.0]]);
        let mut c = Comparer::new(&["y".into()], tolerance::EXACT);
        c.add(std::slice::from_ref(&r), std::slice::from_ref(&r));
        let m = c.finish();
        assert!(m.passed && m.outputs[0].sqnr_db.is_none());
        let mut c = Comparer::new(&["y".into()], Criterion::MinSqnr { db: 10.0 });
        c.add(&[r], &[t(array![[1.0, f32::NAN]])]);
        assert!(!c.finish().passed);
    }

    #[test]
    fn shape_mismatch_fails() {
        let mut c = Comparer::new(&["y".into()], tolerance::LOOSE);
        c.add(&[t(array![[1.0, 2.0]])], &[t(array![[1.0], [2.0]])]);
        let m = c.finish();
        assert!(!m.passed && m.outputs[0].mismatch.is_some());
    }
}
