//! Observers: streaming statistics of one tensor's values, turned into the real range to quantize.
//!
//! An [`Observer`] sees calibration batches one at a time ([`Observer::observe`]), absorbs
//! observers that saw other batches on other threads ([`Observer::merge`]), and proposes the range
//! to quantize over for an integer grid ([`Observer::range`] with a [`Target`]). Memory is O(bins),
//! never O(samples). Non-finite values are ignored everywhere; no input makes an observer panic.
//!
//! - `MinMax`: the exact extremes.
//! - `MovingAverage`: PyTorch's `MovingAverageMinMaxObserver`; the first batch sets (min, max),
//!   each later batch moves them by `c * (batch_extreme - current)`.
//! - `Percentile`, `Entropy`, `L2`: one histogram, three ways to read it.
//!
//! Layout: `histogram.rs` holds the histogram shared by the last three (growth, merge, the `|x|`
//! fold); `percentile.rs`, `entropy.rs` and `l2.rs` each read a range from it. This file holds
//! [`Observer`], [`Method`], [`Target`] and the MinMax and moving-average statistics.

mod entropy;
mod histogram;
mod l2;
mod percentile;
#[cfg(test)]
mod testing;

use serde::{Deserialize, Serialize};

use histogram::Histogram;

/// PyTorch's default averaging constant, used when a given constant is not finite.
const DEFAULT_AVERAGING_CONSTANT: f32 = 0.01;
/// Scalars every observer holds: min, max and the number of finite samples.
const EXTREMES_SCALARS: usize = 3;

/// How a tensor's range is chosen from what was observed.
///
/// In JSON an object whose `name` is the CLI's spelling, with the method's parameter beside it:
/// `{"name": "minmax"}`, `{"name": "percentile", "percentile": 99.999}`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "kebab-case")]
pub enum Method {
    #[serde(rename = "minmax")]
    MinMax,
    /// PyTorch's MovingAverageMinMaxObserver: after the first batch,
    /// min += c * (batch_min - min), max likewise (c = averaging constant, PyTorch default 0.01).
    /// A constant outside [0, 1] is clamped into it; a non-finite one means 0.01.
    MovingAverage { constant: f32 },
    /// Histogram, then clip `(100 - p) / 2` percent of the mass on each side (ORT's percentile
    /// calibration semantics, p e.g. 99.999). `p` is clamped to [0, 100]; NaN means 100.
    Percentile { percentile: f64 },
    /// Histogram, then the threshold minimizing the KL divergence between the clipped-and-quantized
    /// distribution and the original (TensorRT / ORT entropy calibration).
    Entropy,
    /// Histogram, then the range minimizing the expected L2 quantization error (PyTorch
    /// HistogramObserver's non-linear parameter search).
    L2,
}

/// What the range is for: the integer grid it will be quantized to.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Target {
    pub qmin: i32,
    pub qmax: i32,
    pub symmetric: bool,
}

impl Method {
    /// The CLI's spelling (`--method`).
    pub fn name(self) -> &'static str {
        match self {
            Method::MinMax => "minmax",
            Method::MovingAverage { .. } => "moving-average",
            Method::Percentile { .. } => "percentile",
            Method::Entropy => "entropy",
            Method::L2 => "l2",
        }
    }
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Method::MovingAverage { constant } => write!(f, "moving-average ({constant})"),
            Method::Percentile { percentile } => write!(f, "percentile ({percentile})"),
            m => f.write_str(m.name()),
        }
    }
}

impl Target {
    /// Number of quantization steps between the ends of the grid (at least 1).
    fn steps(self) -> f64 {
        (i64::from(self.qmax) - i64::from(self.qmin)).max(1) as f64
    }

    /// Number of grid levels (at least 2).
    fn levels(self) -> usize {
        let levels = (i64::from(self.qmax) - i64::from(self.qmin) + 1).max(2);
        usize::try_from(levels).unwrap_or(usize::MAX)
    }
}

/// Streaming statistics of one tensor. Memory is O(bins), never O(samples).
#[derive(Debug, Clone)]
pub struct Observer {
    method: Method,
    seen: Extremes,
    state: State,
}

#[derive(Debug, Clone)]
enum State {
    MinMax,
    /// The averaged extremes; meaningless until `seen` is non-empty.
    MovingAverage {
        constant: f32,
        min: f32,
        max: f32,
    },
    Histogram(Histogram),
}

impl Observer {
    /// An observer that has seen nothing yet.
    pub fn new(method: Method) -> Observer {
        let state = match method {
            Method::MinMax => State::MinMax,
            Method::MovingAverage { constant } => State::MovingAverage {
                constant: if constant.is_finite() {
                    constant.clamp(0.0, 1.0)
                } else {
                    DEFAULT_AVERAGING_CONSTANT
                },
                min: 0.0,
                max: 0.0,
            },
            Method::Percentile { .. } | Method::Entropy | Method::L2 => {
                State::Histogram(Histogram::empty())
            }
        };
        Observer {
            method,
            seen: Extremes::EMPTY,
            state,
        }
    }

    /// The method this observer was created with.
    pub fn method(&self) -> Method {
        self.method
    }

    /// Adds one batch of values (non-finite values are ignored).
    pub fn observe(&mut self, values: &[f32]) {
        let batch = Extremes::of(values);
        if batch.is_empty() {
            return;
        }
        match &mut self.state {
            State::MinMax => {}
            State::MovingAverage { constant, min, max } => {
                if self.seen.is_empty() {
                    (*min, *max) = (batch.min, batch.max);
                } else {
                    *min = move_towards(*min, batch.min, *constant);
                    *max = move_towards(*max, batch.max, *constant);
                }
            }
            State::Histogram(histogram) => histogram.add(values, batch.min, batch.max),
        }
        self.seen.absorb(batch);
    }

    /// Merges another observer of the same method that saw other batches (parallel
    /// calibration): the result equals (MinMax) or closely approximates (histogram methods) having
    /// observed all batches in one observer.
    ///
    /// MovingAverage is order-dependent, so no merge can equal a sequential run: the merged
    /// averages are the sample-count-weighted means of the two observers' averages. The three
    /// histogram methods share one statistic and merge with each other. Any other mix keeps this
    /// observer's statistic and only merges the other's exact extremes (a moving average takes them
    /// as the other's averages).
    pub fn merge(&mut self, other: Observer) {
        let Observer {
            seen: other_seen,
            state: other_state,
            ..
        } = other;
        if other_seen.is_empty() {
            return;
        }
        match (&mut self.state, other_state) {
            (State::MinMax, _) => {}
            (State::MovingAverage { min, max, .. }, other_state) => {
                let (other_min, other_max) = match other_state {
                    State::MovingAverage { min, max, .. } => (min, max),
                    _ => (other_seen.min, other_seen.max),
                };
                if self.seen.is_empty() {
                    (*min, *max) = (other_min, other_max);
                } else {
                    let weight = other_seen.count as f64
                        / (self.seen.count as f64 + other_seen.count as f64);
                    *min = move_towards(*min, other_min, weight as f32);
                    *max = move_towards(*max, other_max, weight as f32);
                }
            }
            (State::Histogram(histogram), State::Histogram(other_histogram)) => {
                histogram.merge(other_histogram)
            }
            (State::Histogram(_), _) => {}
        }
        self.seen.absorb(other_seen);
    }

    /// The real range (rmin, rmax) to quantize over, before the usual `rmin = min(rmin, 0)`, `rmax
    /// = max(rmax, 0)` adjustment (the caller does that). None if nothing finite was observed.
    ///
    /// The range lies within the observed extremes, with `rmin <= rmax`; for a symmetric target it
    /// is `(-t, t)` (MinMax and MovingAverage take `t = max(|min|, |max|)`).
    pub fn range(&self, target: Target) -> Option<(f32, f32)> {
        let (min, max) = self.seen.get()?;
        let extremes = (f64::from(min), f64::from(max));
        let (lo, hi) = match &self.state {
            State::MinMax => extremes,
            State::MovingAverage { min, max, .. } => (f64::from(*min), f64::from(*max)),
            State::Histogram(histogram) if histogram.is_empty() || min == max => extremes,
            State::Histogram(histogram) => match self.method {
                Method::Percentile { percentile } => {
                    histogram.percentile_range(percentile, target, extremes)
                }
                Method::Entropy => {
                    histogram.vetted(histogram.entropy_range(target, extremes), target, extremes)
                }
                Method::L2 => histogram.l2_range(target, extremes),
                Method::MinMax | Method::MovingAverage { .. } => extremes,
            },
        };
        Some(finish(lo, hi, target, extremes))
    }

    /// The range `method` would choose from what this observer saw: a histogram observer
    /// answers for every histogram method and MinMax (one calibration pass, several methods);
    /// other observers answer with their own method.
    pub fn range_as(&self, method: Method, target: Target) -> Option<(f32, f32)> {
        match (&self.state, method) {
            (State::Histogram(_), Method::Percentile { .. } | Method::Entropy | Method::L2) => {
                let mut o = self.clone();
                o.method = method;
                o.range(target)
            }
            (_, Method::MinMax) => {
                let (min, max) = self.seen.get()?;
                let extremes = (f64::from(min), f64::from(max));
                Some(finish(extremes.0, extremes.1, target, extremes))
            }
            _ => self.range(target),
        }
    }

    /// The observed min and max (exact).
    pub fn min_max(&self) -> Option<(f32, f32)> {
        self.seen.get()
    }

    /// Number of numbers held (bins + scalars), to test that state does not grow with samples.
    pub fn state_size(&self) -> usize {
        EXTREMES_SCALARS
            + match &self.state {
                State::MinMax => 0,
                State::MovingAverage { .. } => 3,
                State::Histogram(histogram) => 2 + histogram.counts.len(),
            }
    }
}

/// `from + c * (to - from)`, computed in f64 so that extreme values cannot overflow.
fn move_towards(from: f32, to: f32, c: f32) -> f32 {
    let (from, to) = (f64::from(from), f64::from(to));
    (from + f64::from(c) * (to - from)) as f32
}

/// Clamps a proposed range into the observed extremes and makes it symmetric if asked.
fn finish(lo: f64, hi: f64, target: Target, (min, max): (f64, f64)) -> (f32, f32) {
    if target.symmetric {
        let limit = min.abs().max(max.abs());
        let t = lo.abs().max(hi.abs()).min(limit);
        let t = if t.is_nan() { limit } else { t } as f32;
        return (-t, t);
    }
    let lo = lo.max(min).min(max);
    let hi = hi.max(min).min(max);
    if lo <= hi {
        (lo as f32, hi as f32)
    } else {
        (min as f32, max as f32)
    }
}

/// Exact extremes and number of the finite values seen.
#[derive(Debug, Clone, Copy)]
struct Extremes {
    min: f32,
    max: f32,
    count: u64,
}

impl Extremes {
    const EMPTY: Extremes = Extremes {
        min: f32::INFINITY,
        max: f32::NEG_INFINITY,
        count: 0,
    };

    /// The finite values' extremes and count. Written lane-wise with selects, which the
    /// compiler vectorizes (`f32::min` with its NaN rule does not): calibration runs this over
    /// every activation of every sample. Min and max do not depend on the order they are taken
    /// in, so the result is the scalar loop's.
    fn of(values: &[f32]) -> Extremes {
        const LANES: usize = 16;
        let mut lo = [f32::INFINITY; LANES];
        let mut hi = [f32::NEG_INFINITY; LANES];
        let mut count = [0u32; LANES];
        let mut total: u64 = 0;
        // u32 lane counts cannot overflow within a block of 2^32 - 1 chunks
        for block in values.chunks(LANES * (u32::MAX as usize)) {
            let chunks = block.chunks_exact(LANES);
            let rest = chunks.remainder();
            for chunk in chunks {
                for i in 0..LANES {
                    let v = chunk[i];
                    // false for NaN and the infinities
                    let finite = v.abs() < f32::INFINITY;
                    let low = if finite { v } else { f32::INFINITY };
                    let high = if finite { v } else { f32::NEG_INFINITY };
                    lo[i] = if low < lo[i] { low } else { lo[i] };
                    hi[i] = if high > hi[i] { high } else { hi[i] };
                    count[i] += u32::from(finite);
                }
            }
            for &v in rest.iter().filter(|v| v.is_finite()) {
                lo[0] = lo[0].min(v);
                hi[0] = hi[0].max(v);
                total += 1;
            }
            total += count.iter().map(|&c| u64::from(c)).sum::<u64>();
            count = [0; LANES];
        }
        Extremes {
            min: lo.iter().fold(f32::INFINITY, |m, &v| m.min(v)),
            max: hi.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)),
            count: total,
        }
    }

    fn is_empty(&self) -> bool {
        self.count == 0
    }

    fn absorb(&mut self, other: Extremes) {
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
        self.count = self.count.saturating_add(other.count);
    }

    fn get(&self) -> Option<(f32, f32)> {
        (!self.is_empty()).then_some((self.min, self.max))
    }
}

#[cfg(test)]
mod tests {
    use super::histogram::MAX_BINS;
    use super::testing::{all_methods, observed, Rng, INT8_SYMMETRIC, UINT8};
    use super::*;
    use proptest::collection::vec;
    use proptest::prelude::*;

    #[test]
    fn min_max_is_exact_and_ignores_non_finite_values() {
        let observer = observed(
            Method::MinMax,
            &[
                &[0.5, -1.25, f32::NAN],
                &[],
                &[f32::INFINITY, 3.75, f32::NEG_INFINITY],
                &[2.0],
            ],
        );
        assert_eq!(observer.min_max(), Some((-1.25, 3.75)));
        assert_eq!(observer.range(UINT8), Some((-1.25, 3.75)));
        assert_eq!(observer.range(INT8_SYMMETRIC), Some((-3.75, 3.75)));
        assert_eq!(observer.state_size(), 3);
    }

    #[test]
    fn moving_average_matches_a_hand_computation() {
        let observer = observed(
            Method::MovingAverage { constant: 0.1 },
            &[&[1.0, 2.0, 3.0], &[-1.0, 5.0], &[f32::NAN], &[0.0, 4.0]],
        );
        // (1, 3); then min 1 + 0.1 * (-1 - 1) = 0.8, max 3 + 0.1 * (5 - 3) = 3.2; the NaN batch is
        // skipped; then min 0.8 + 0.1 * (0 - 0.8) = 0.72, max 3.2 + 0.1 * (4 - 3.2) = 3.28.
        let (lo, hi) = observer.range(UINT8).unwrap();
        assert!(
            (lo - 0.72).abs() < 1e-6 && (hi - 3.28).abs() < 1e-6,
            "{lo} {hi}"
        );
        assert_eq!(observer.min_max(), Some((-1.0, 5.0)));
        let (lo, hi) = observer.range(INT8_SYMMETRIC).unwrap();
        assert!((lo + 3.28).abs() < 1e-6 && (hi - 3.28).abs() < 1e-6);
    }

    #[test]
    fn moving_average_merge_weights_by_sample_count() {
        let method = Method::MovingAverage { constant: 0.5 };
        let mut a = observed(method, &[&[-1.0, 1.0, 0.0]]); // 3 samples, (-1, 1)
        let b = observed(method, &[&[-5.0, 9.0]]); // 2 samples, (-5, 9)
        a.merge(b);
        // min (3 * -1 + 2 * -5) / 5 = -2.6, max (3 * 1 + 2 * 9) / 5 = 4.2
        let (lo, hi) = a.range(UINT8).unwrap();
        assert!(
            (lo + 2.6).abs() < 1e-6 && (hi - 4.2).abs() < 1e-6,
            "{lo} {hi}"
        );
        assert_eq!(a.min_max(), Some((-5.0, 9.0)));

        let mut empty = Observer::new(method);
        empty.merge(observed(method, &[&[2.0, 3.0]]));
        assert_eq!(empty.range(UINT8), Some((2.0, 3.0)));
    }

    #[test]
    fn merging_two_min_max_observers_equals_one() {
        let mut rng = Rng(1);
        let data = rng.normals(1000);
        let (left, right) = data.split_at(400);
        let single = observed(Method::MinMax, &[left, right]);
        let mut merged = observed(Method::MinMax, &[left]);
        merged.merge(observed(Method::MinMax, &[right]));
        merged.merge(Observer::new(Method::MinMax));
        assert_eq!(merged.min_max(), single.min_max());
        assert_eq!(merged.range(UINT8), single.range(UINT8));
        assert_eq!(merged.range(INT8_SYMMETRIC), single.range(INT8_SYMMETRIC));
    }

    #[test]
    fn state_size_does_not_grow_with_samples() {
        // Every batch reaches the same extremes, so the histogram never needs to grow.
        let mut rng = Rng(11);
        let batch = |rng: &mut Rng| {
            let mut values: Vec<f32> = (0..62).map(|_| rng.uniform() as f32 * 2.0 - 1.0).collect();
            values.extend_from_slice(&[-1.0, 1.0]);
            values
        };
        for method in all_methods() {
            let (mut few, mut many) = (Observer::new(method), Observer::new(method));
            for i in 0..10_000 {
                let values = batch(&mut rng);
                if i < 10 {
                    few.observe(&values);
                }
                many.observe(&values);
            }
            assert_eq!(few.state_size(), many.state_size(), "{method:?}");
            assert!(many.state_size() <= MAX_BINS + 8);
        }
        // Spreading data grows the histogram, but never past MAX_BINS.
        let mut observer = Observer::new(Method::Entropy);
        for i in 0..2000 {
            let scale = 1.0 + i as f32;
            observer.observe(&[-scale, scale * 3.0, 0.5]);
        }
        assert!(
            observer.state_size() <= MAX_BINS + 8,
            "{}",
            observer.state_size()
        );
    }

    #[test]
    fn symmetric_targets_give_symmetric_ranges() {
        let mut rng = Rng(5);
        let data: Vec<f32> = rng.normals(20_000).iter().map(|x| 2.0 * x + 0.7).collect();
        let positive: Vec<f32> = data.iter().map(|x| x.abs()).collect();
        for method in all_methods() {
            for values in [&data, &positive] {
                let observer = observed(method, &[values]);
                let (lo, hi) = observer.range(INT8_SYMMETRIC).unwrap();
                assert_eq!(lo, -hi, "{method:?}");
                assert!(hi > 0.0 && f64::from(hi) <= 10.0, "{method:?} {hi}");
            }
        }
    }

    #[test]
    fn degenerate_inputs_do_not_panic() {
        let huge = [f32::MAX, -f32::MAX, 0.0];
        let batches: [&[f32]; 9] = [
            &[],
            &[f32::NAN, f32::NAN],
            &[f32::INFINITY, f32::NEG_INFINITY],
            &[3.0],
            &[3.0, 3.0],
            &[0.0],
            &huge,
            &[1e-38, -1e-38, f32::MIN_POSITIVE],
            &[-0.0, 0.0],
        ];
        let targets = [
            UINT8,
            INT8_SYMMETRIC,
            Target {
                qmin: i32::MIN,
                qmax: i32::MAX,
                symmetric: false,
            },
            Target {
                qmin: 5,
                qmax: 5,
                symmetric: false,
            },
            Target {
                qmin: 10,
                qmax: -10,
                symmetric: true,
            },
        ];
        let mut methods = all_methods();
        methods.extend([
            Method::MovingAverage { constant: f32::NAN },
            Method::MovingAverage { constant: 7.0 },
            Method::Percentile {
                percentile: f64::NAN,
            },
            Method::Percentile { percentile: -3.0 },
            Method::Percentile { percentile: 250.0 },
        ]);
        for method in methods {
            let empty = Observer::new(method);
            assert_eq!(empty.range(UINT8), None);
            assert_eq!(empty.min_max(), None);
            // Every batch alone, and every prefix of the sequence.
            let mut growing = Observer::new(method);
            for batch in batches {
                let single = observed(method, &[batch]);
                growing.observe(batch);
                let mut merged = growing.clone();
                merged.merge(single.clone());
                merged.merge(Observer::new(method));
                for observer in [&single, &growing, &merged] {
                    for target in targets {
                        let Some((lo, hi)) = observer.range(target) else {
                            assert!(observer.min_max().is_none());
                            continue;
                        };
                        let (min, max) = observer.min_max().unwrap();
                        assert!(
                            lo.is_finite() && hi.is_finite() && lo <= hi,
                            "{method:?} {lo} {hi}"
                        );
                        if !target.symmetric {
                            assert!(lo >= min && hi <= max, "{method:?} {target:?}");
                        }
                    }
                }
            }
            let (min, max) = growing.min_max().unwrap();
            assert_eq!((min, max), (-f32::MAX, f32::MAX));
        }
        // A constant tensor has a zero-width range.
        for method in all_methods() {
            let observer = observed(method, &[&[2.5; 100]]);
            assert_eq!(observer.range(UINT8), Some((2.5, 2.5)), "{method:?}");
        }
    }

    #[test]
    fn mixed_methods_merge_extremes_only() {
        let mut histogram = observed(Method::Entropy, &[&[0.0, 1.0]]);
        histogram.merge(observed(Method::MinMax, &[&[-4.0, 2.0]]));
        assert_eq!(histogram.min_max(), Some((-4.0, 2.0)));
        assert!(histogram.range(UINT8).is_some());
        let mut empty = Observer::new(Method::Percentile { percentile: 99.0 });
        empty.merge(observed(Method::MinMax, &[&[-4.0, 2.0]]));
        assert_eq!(empty.range(UINT8), Some((-4.0, 2.0)));
        let mut moving = Observer::new(Method::MovingAverage { constant: 0.01 });
        moving.merge(observed(Method::L2, &[&[-4.0, 2.0]]));
        assert_eq!(moving.range(UINT8), Some((-4.0, 2.0)));
    }

    #[test]
    fn method_serializes_with_the_cli_spelling() {
        let methods = all_methods();
        let json = serde_json::to_string(&methods).unwrap();
        assert_eq!(
            json,
            concat!(
                r#"[{"name":"minmax"},{"name":"moving-average","constant":0.01},"#,
                r#"{"name":"percentile","percentile":99.99},{"name":"entropy"},{"name":"l2"}]"#
            )
        );
        for m in &methods {
            assert!(json.contains(&format!(r#""name":"{}""#, m.name())));
        }
        let back: Vec<Method> = serde_json::from_str(&json).unwrap();
        assert_eq!(back, methods);
    }

    fn any_value() -> impl Strategy<Value = f32> {
        prop_oneof![
            4 => -10.0f32..10.0,
            1 => proptest::num::f32::ANY,
            1 => prop_oneof![
                Just(0.0f32),
                Just(-0.0),
                Just(f32::MAX),
                Just(-f32::MAX),
                Just(1e-40),
            ],
        ]
    }

    fn any_batches() -> impl Strategy<Value = Vec<Vec<f32>>> {
        vec(vec(any_value(), 0..40), 0..6)
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: 64, failure_persistence: None, ..ProptestConfig::default()
        })]

        #[test]
        fn any_batches_give_a_range_within_the_extremes(
            first in any_batches(),
            second in any_batches(),
            qmin in -300i32..10,
            qmax in -10i32..300,
        ) {
            let finite: Vec<f32> = first.iter().chain(&second).flatten().copied()
                .filter(|v| v.is_finite()).collect();
            for method in all_methods() {
                let mut a = Observer::new(method);
                first.iter().for_each(|batch| a.observe(batch));
                let mut b = Observer::new(method);
                second.iter().for_each(|batch| b.observe(batch));
                a.merge(b);
                if let State::Histogram(h) = &a.state {
                    let total = h.total();
                    let expected = finite.len() as f64;
                    prop_assert!((total - expected).abs() <= 1e-6 * expected.max(1.0));
                    prop_assert!(h.counts.len() <= MAX_BINS);
                }
                for symmetric in [false, true] {
                    let target = Target { qmin, qmax, symmetric };
                    let Some((lo, hi)) = a.range(target) else {
                        prop_assert!(finite.is_empty());
                        continue;
                    };
                    let (min, max) = a.min_max().unwrap();
                    prop_assert!(lo.is_finite() && hi.is_finite() && lo <= hi);
                    if symmetric {
                        prop_assert!(lo == -hi && hi <= min.abs().max(max.abs()));
                    } else {
                        prop_assert!(min <= lo && hi <= max, "{method:?} ({lo}, {hi})");
                    }
                }
            }
        }
    }
}
