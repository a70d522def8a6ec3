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
//! Histogram (ONNX Runtime's streaming approach): the first batch spreads 2048 bins over its
//! `[min, max]` (a constant batch gets a tiny positive bin width); a later batch outside it adds
//! whole bins of the same width on either side; when that would exceed 8192 bins, adjacent pairs
//! merge (width doubles, count halves) until it fits. Counts are `f64`: merging two histograms
//! re-bins the finer one onto the coarser grid, splitting each source bin's count over the target
//! bins it overlaps in proportion to the overlap. The readers:
//!
//! - Percentile `p`: asymmetric targets cut `(100 - p) / 2` percent of the mass on each side (the
//!   lower cut is skipped when no value is negative, the upper one when none is positive);
//!   symmetric targets take `t` = the `p`-th percentile of `|x|`, range `(-t, t)`. Quantiles
//!   interpolate linearly inside a bin.
//! - Entropy (TensorRT / ONNX Runtime KL calibration) on a 2048-bin histogram of `|x|` over
//!   `[0, max |x|]`. For every candidate `i` from `num_quantized_bins` to 2048: `p` = the first
//!   `i` bins with the mass beyond added to bin `i - 1`; `q` = those `i` bins (without the
//!   outliers) summed into `num_quantized_bins` chunks, each chunk's sum spread back evenly over
//!   its bins where `p` is non-zero. `t = i * bin_width` for the `i` minimizing KL(p || q); the
//!   range is `(-t, t)` when some value is negative or the target is symmetric, `(0, t)` otherwise.
//!   - `num_quantized_bins` = the grid levels covering `[0, t]`: `qmax - qmin + 1` for non-negative
//!     data on an asymmetric target (256 for 8 bits), half of that rounded up otherwise (128 for
//!     8 bits, ONNX Runtime's and TensorRT's fixed value).
//!   - Chunks hold `i / num_quantized_bins` bins rounded down or up, evenly interleaved (TensorRT's
//!     "quantize the `i` bins into `num_quantized_bins` levels"). MXNet and ONNX Runtime merge
//!     exactly `i / num_quantized_bins` bins (integer division) per chunk and give the remainder to
//!     the last one, which makes KL saw-toothed in `i` and pulls `t` to multiples of
//!     `num_quantized_bins` bins: on a Gaussian with a few outliers at 40 sigma that gives 5.0
//!     sigma (exactly 256 bins) where even chunks give 4.2 sigma, as without the outliers.
//!   - Smoothing: rather than adding an epsilon to every empty bin of both distributions (a change
//!     below 1e-4 of a count), only a bin where `p > 0` and `q = 0` (outliers landing in an empty
//!     chunk) gets `q = 1e-4`, which keeps KL finite.
//!   - Cost: with prefix sums a candidate costs O(`num_quantized_bins`), not O(bins), so every
//!     candidate is tried, no stepping (8-bit: ~1 ms optimized, ~8 ms at opt-level 0).
//! - L2 minimizes the estimated quantization error
//!   `sum(count_in * delta^2 / 12) + sum(count_out * (bin center - nearest clip edge)^2)` with
//!   `delta = (hi - lo) / (qmax - qmin)` over bin-edge ranges `[lo, hi]`. Because the caller widens
//!   the range to include 0, `lo` never moves above 0 nor `hi` below 0, and `delta` is measured on
//!   the widened range (so non-negative data keeps `lo = min`). The search starts at the full range
//!   and, like PyTorch's `_non_linear_param_search`, repeatedly moves whichever side lowers the
//!   error more and stops when neither does; unlike it, a move goes to the best position for that
//!   side given the other (an exact 1-D search in O(bins) with incremental sums), so noise in the
//!   tail bins cannot stop the search early. Symmetric targets search one `t` over the `|x|`
//!   histogram with range `(-t, t)`.

use serde::{Deserialize, Serialize};

/// Bins of a fresh histogram, and of the `|x|` histograms the entropy, symmetric percentile and
/// symmetric L2 searches run on.
const BINS: usize = 2048;
/// A histogram growing past this many bins merges adjacent pairs.
const MAX_BINS: usize = 4 * BINS;
/// PyTorch's default averaging constant, used when a given constant is not finite.
const DEFAULT_AVERAGING_CONSTANT: f32 = 0.01;
/// The count given to a bin where `p > 0` but `q = 0` (ONNX Runtime's smoothing epsilon).
const KL_EPSILON: f64 = 1e-4;
/// Scalars every observer holds: min, max and the number of finite samples.
const EXTREMES_SCALARS: usize = 3;

/// How a tensor's range is chosen from what was observed.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    MinMax,
    /// PyTorch's MovingAverageMinMaxObserver: after the first batch,
    /// min += c * (batch_min - min), max likewise (c = averaging constant, PyTorch default 0.01).
    /// A constant outside [0, 1] is clamped into it; a non-finite one means 0.01.
    MovingAverage {
        constant: f32,
    },
    /// Histogram, then clip `(100 - p) / 2` percent of the mass on each side (ORT's percentile
    /// calibration semantics, p e.g. 99.999). `p` is clamped to [0, 100]; NaN means 100.
    Percentile {
        percentile: f64,
    },
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

    fn of(values: &[f32]) -> Extremes {
        let mut extremes = Extremes::EMPTY;
        for &v in values.iter().filter(|v| v.is_finite()) {
            extremes.min = extremes.min.min(v);
            extremes.max = extremes.max.max(v);
            extremes.count += 1;
        }
        extremes
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

/// Bins `[origin + k * width, origin + (k + 1) * width)`, the last one closed on the right.
#[derive(Debug, Clone)]
struct Histogram {
    origin: f64,
    width: f64,
    counts: Vec<f64>,
}

impl Histogram {
    fn empty() -> Histogram {
        Histogram {
            origin: 0.0,
            width: 1.0,
            counts: Vec::new(),
        }
    }

    /// `bins` empty bins over `[0, limit]` (`limit > 0`).
    fn zeros_up_to(limit: f64, bins: usize) -> Histogram {
        Histogram {
            origin: 0.0,
            width: limit / bins as f64,
            counts: vec![0.0; bins],
        }
    }

    fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }

    fn edge(&self, k: usize) -> f64 {
        self.origin + k as f64 * self.width
    }

    fn total(&self) -> f64 {
        self.counts.iter().sum()
    }

    /// Index of the bin holding `x`, possibly outside the histogram (the right edge belongs to
    /// the last bin).
    fn position(&self, x: f64) -> f64 {
        let n = self.counts.len() as f64;
        let position = ((x - self.origin) / self.width).floor();
        if position >= n && x <= self.edge(self.counts.len()) {
            n - 1.0
        } else {
            position
        }
    }

    /// Index of the bin holding `x`, clamped into the histogram (which must not be empty).
    fn bin(&self, x: f64) -> usize {
        let last = self.counts.len() - 1;
        let position = self.position(x);
        if position >= last as f64 {
            last
        } else if position >= 0.0 {
            position as usize
        } else {
            0
        }
    }

    /// Adds values whose finite ones lie in `[lo, hi]`.
    fn add(&mut self, values: &[f32], lo: f32, hi: f32) {
        self.cover(f64::from(lo), f64::from(hi));
        for &v in values.iter().filter(|v| v.is_finite()) {
            let k = self.bin(f64::from(v));
            self.counts[k] += 1.0;
        }
    }

    /// Makes the histogram cover `[lo, hi]`: starts it, or adds whole bins on either side, first
    /// merging adjacent pairs of bins while the result would exceed `MAX_BINS`.
    fn cover(&mut self, lo: f64, hi: f64) {
        if !(lo.is_finite() && hi.is_finite() && lo <= hi) {
            return;
        }
        if self.counts.is_empty() {
            let width = (hi - lo) / BINS as f64;
            self.width = if width > 0.0 {
                width
            } else {
                // A constant first batch: tiny bins, later data will widen them.
                (lo.abs() * 1e-6).max(1e-30) / BINS as f64
            };
            self.origin = lo;
            self.counts = vec![0.0; BINS];
            return;
        }
        // Every round halves the span, and bins are at most ~1e72 apart: this always terminates
        // well within the bound, which only guards against a logic error.
        for _ in 0..4096 {
            let last = self.counts.len() as f64 - 1.0;
            let first = self.position(lo).min(0.0);
            let end = self.position(hi).max(last);
            if end - first < MAX_BINS as f64 {
                self.extend(first as i64, end as i64);
                return;
            }
            self.coarsen();
        }
    }

    /// Grows to bins `first..=end` of the current grid (`first <= 0`, `end >= len - 1`).
    fn extend(&mut self, first: i64, end: i64) {
        let n = self.counts.len();
        let before = usize::try_from(-first).unwrap_or(0);
        let after = usize::try_from(end - (n as i64 - 1)).unwrap_or(0);
        if before == 0 && after == 0 {
            return;
        }
        let mut counts = vec![0.0; before + n + after];
        counts[before..before + n].copy_from_slice(&self.counts);
        self.origin -= before as f64 * self.width;
        self.counts = counts;
    }

    /// Merges adjacent pairs of bins: width doubles, count halves (rounded up).
    fn coarsen(&mut self) {
        self.counts = self
            .counts
            .chunks(2)
            .map(|pair| pair.iter().sum())
            .collect();
        self.width *= 2.0;
    }

    /// Adds `other`'s counts: the finer histogram is re-binned onto the coarser one's grid.
    fn merge(&mut self, mut other: Histogram) {
        if other.is_empty() {
            return;
        }
        if self.is_empty() || other.width > self.width {
            std::mem::swap(self, &mut other);
        }
        if other.is_empty() {
            return;
        }
        self.cover(other.origin, other.edge(other.counts.len()));
        for (k, &count) in other.counts.iter().enumerate() {
            let lo = other.edge(k);
            self.spread(lo, lo + other.width, count);
        }
    }

    /// Adds `mass` spread uniformly over `[lo, hi)`, to each bin in proportion to its overlap with
    /// the interval; mass outside the histogram goes to the nearest part of it.
    fn spread(&mut self, lo: f64, hi: f64, mass: f64) {
        if self.counts.is_empty() || !positive(mass) {
            return;
        }
        let first = self.bin(lo);
        let last = self.bin(hi).max(first);
        let covered: f64 = (first..=last).map(|k| self.overlap(k, lo, hi)).sum();
        if covered > 0.0 {
            for k in first..=last {
                let share = self.overlap(k, lo, hi) / covered;
                self.counts[k] += mass * share;
            }
        } else {
            self.counts[first] += mass;
        }
    }

    fn overlap(&self, k: usize, lo: f64, hi: f64) -> f64 {
        (hi.min(self.edge(k + 1)) - lo.max(self.edge(k))).max(0.0)
    }

    /// The histogram of `|x|`: `BINS` bins over `[0, limit]` (`limit > 0`, normally `max |x|`).
    fn folded(&self, limit: f64) -> Histogram {
        let mut folded = Histogram::zeros_up_to(limit, BINS);
        for (k, &count) in self.counts.iter().enumerate() {
            let (lo, hi) = (self.edge(k), self.edge(k + 1));
            if lo >= 0.0 {
                folded.spread(lo, hi, count);
            } else if hi <= 0.0 {
                folded.spread(-hi, -lo, count);
            } else {
                let negative = -lo / (hi - lo);
                folded.spread(0.0, -lo, count * negative);
                folded.spread(0.0, hi, count * (1.0 - negative));
            }
        }
        folded
    }

    /// The value below which a fraction `q` of the mass lies, interpolated inside its bin.
    fn quantile(&self, q: f64) -> f64 {
        let wanted = q.clamp(0.0, 1.0) * self.total();
        let mut below = 0.0;
        for (k, &count) in self.counts.iter().enumerate() {
            if count > 0.0 && below + count >= wanted {
                let fraction = ((wanted - below) / count).clamp(0.0, 1.0);
                return self.edge(k) + fraction * self.width;
            }
            below += count;
        }
        self.edge(self.counts.len())
    }

    fn percentile_range(
        &self,
        percentile: f64,
        target: Target,
        (min, max): (f64, f64),
    ) -> (f64, f64) {
        let kept = if percentile.is_nan() {
            1.0
        } else {
            percentile.clamp(0.0, 100.0) / 100.0
        };
        if target.symmetric {
            let limit = min.abs().max(max.abs());
            let t = self.folded(limit).quantile(kept);
            return (-t, t);
        }
        // One-signed data has its whole tail on one side: cut all of `1 - kept` there (as
        // ONNX Runtime's |x| percentile does for a Relu output); two-signed data loses half
        // on each side.
        if min >= 0.0 {
            return (min, self.quantile(kept));
        }
        if max <= 0.0 {
            return (self.quantile(1.0 - kept), max);
        }
        let cut = (1.0 - kept) / 2.0;
        (self.quantile(cut), self.quantile(1.0 - cut))
    }

    fn entropy_range(&self, target: Target, (min, max): (f64, f64)) -> (f64, f64) {
        let levels = target.levels();
        if target.symmetric {
            let folded = self.folded(min.abs().max(max.abs()));
            let t = folded.edge(folded.kl_threshold_bins(levels.div_ceil(2)));
            return (-t, t);
        }
        if min >= 0.0 || max <= 0.0 {
            // one-signed data: the whole grid covers [0, t] (or [-t, 0])
            let folded = self.folded(min.abs().max(max.abs()));
            let t = folded.edge(folded.kl_threshold_bins(levels));
            return if min >= 0.0 { (0.0, t) } else { (-t, 0.0) };
        }
        // Both signs on an asymmetric grid: each side gets its share of the levels and its own
        // threshold. Folding |x| into one threshold clips a long tail on one side to the other
        // side's extent (model_for_fusion: [-10.2, 2.5] became [-2.5, 2.5], 13% clipped).
        let span = max - min;
        let side = |positive: bool, extent: f64| {
            let h = self.one_side(positive, extent);
            let share = ((levels as f64 * extent / span).round() as usize).max(2);
            h.edge(h.kl_threshold_bins(share))
        };
        (-side(false, -min), side(true, max))
    }

    /// The KL range, unless its expected squared quantization error (clipping plus rounding,
    /// estimated on the histogram) is larger than the full range's: the KL criterion ignores how
    /// far clipped values move, and on a tensor with a long thin tail it clips values that
    /// matter (model_for_fusion: 13.7 dB with KL alone, 33.8 dB with MinMax).
    fn vetted(&self, kl: (f64, f64), target: Target, (min, max): (f64, f64)) -> (f64, f64) {
        let full = if target.symmetric {
            let t = min.abs().max(max.abs());
            (-t, t)
        } else {
            (min, max)
        };
        let steps = target.steps();
        if self.expected_error(kl, steps) <= self.expected_error(full, steps) {
            kl
        } else {
            full
        }
    }

    /// Expected squared error of quantizing the histogram to `steps` steps over `(lo, hi)`
    /// (widened to include zero, as the grid is): clipped bins at their distance to the edge,
    /// kept ones at `delta^2 / 12`.
    fn expected_error(&self, (lo, hi): (f64, f64), steps: f64) -> f64 {
        let delta = (hi.max(0.0) - lo.min(0.0)) / steps;
        self.counts
            .iter()
            .enumerate()
            .map(|(k, &count)| {
                let c = self.edge(k) + self.width / 2.0;
                let e = if c < lo {
                    (lo - c) * (lo - c)
                } else if c > hi {
                    (c - hi) * (c - hi)
                } else {
                    delta * delta / 12.0
                };
                count * e
            })
            .sum()
    }

    /// Histogram of the values on one side of zero, as magnitudes over `[0, extent]`; the other
    /// side's mass is left out.
    fn one_side(&self, positive: bool, extent: f64) -> Histogram {
        let mut h = Histogram::zeros_up_to(extent, BINS);
        for (k, &count) in self.counts.iter().enumerate() {
            let (lo, hi) = (self.edge(k), self.edge(k + 1));
            let (a, b) = if positive {
                (lo.max(0.0), hi)
            } else {
                ((-hi).max(0.0), -lo)
            };
            if b > a && hi > lo {
                h.spread(a, b, count * (b - a) / (hi - lo));
            }
        }
        h
    }

    /// The number of leading bins `i` whose clipped distribution, quantized to `quantized_bins`
    /// levels, is closest in KL divergence to the whole histogram (see the module docs).
    fn kl_threshold_bins(&self, quantized_bins: usize) -> usize {
        let h = &self.counts;
        let n = h.len();
        let quantized_bins = quantized_bins.clamp(1, n.max(1));
        let mut mass = vec![0.0; n + 1];
        let mut nonzero = vec![0usize; n + 1];
        let mut x_ln_x_sum = vec![0.0; n + 1];
        for (k, &count) in h.iter().enumerate() {
            mass[k + 1] = mass[k] + count;
            nonzero[k + 1] = nonzero[k] + usize::from(count > 0.0);
            x_ln_x_sum[k + 1] = x_ln_x_sum[k] + x_ln_x(count);
        }
        let total = mass[n];
        if !positive(total) {
            return n;
        }
        let mut best = (f64::INFINITY, n);
        for i in quantized_bins..=n {
            let outliers = (total - mass[i]).max(0.0);
            let last = h[i - 1];
            // sum of p ln(p / q) over bins where p > 0, and the total mass of q.
            let (mut p_ln_p_over_q, mut q_total) = (0.0, 0.0);
            // Bin 0 holds zero, which is always on the grid: it is its own quantized level
            // (q = p there, no divergence), and the remaining bins share the other levels.
            // Merged into a chunk, the spike of exact zeros a Relu leaves makes every wide
            // chunk look wrong and drives the threshold far too low (digits CNN: 4 dB SQNR
            // instead of 39).
            let first = h[0];
            if first > 0.0 {
                q_total += first;
            }
            for j in 0..quantized_bins.saturating_sub(1) {
                let (start, end) = chunk(i - 1, quantized_bins - 1, j);
                let (start, end) = (start + 1, end + 1);
                let q_mass = mass[end] - mass[start];
                let mut p_mass = q_mass;
                let mut p_nonzero = nonzero[end] - nonzero[start];
                let mut p_x_ln_x = x_ln_x_sum[end] - x_ln_x_sum[start];
                if end == i && outliers > 0.0 {
                    p_mass += outliers;
                    p_nonzero += usize::from(last <= 0.0);
                    p_x_ln_x += x_ln_x(last + outliers) - x_ln_x(last);
                }
                if !positive(p_mass) || p_nonzero == 0 {
                    continue;
                }
                let q = if q_mass > 0.0 {
                    q_mass / p_nonzero as f64
                } else {
                    KL_EPSILON
                };
                p_ln_p_over_q += p_x_ln_x - p_mass * q.ln();
                q_total += q * p_nonzero as f64;
            }
            // KL(P || Q) of the normalized P = p / total and Q = q / q_total.
            let kl = p_ln_p_over_q / total + (q_total / total).ln();
            if kl < best.0 {
                best = (kl, i);
            }
        }
        best.1
    }

    fn l2_range(&self, target: Target, (min, max): (f64, f64)) -> (f64, f64) {
        let steps = target.steps();
        if target.symmetric {
            let folded = self.folded(min.abs().max(max.abs()));
            let j = folded.l2_symmetric_bins(steps);
            let t = folded.edge(j);
            return (-t, t);
        }
        let (a, b) = self.l2_edges(steps);
        (self.edge(a), self.edge(b))
    }

    /// For a histogram of `|x|`: the number of leading bins `j` such that `(-t, t)` with
    /// `t = edge(j)` minimizes the estimated L2 error.
    fn l2_symmetric_bins(&self, steps: f64) -> usize {
        let n = self.counts.len();
        let (mass, _, above) = self.clip_errors();
        let mut best = (f64::INFINITY, n);
        for j in (1..=n).rev() {
            let delta = 2.0 * j as f64 / steps;
            let error = above[j] + mass[j] * delta * delta / 12.0;
            if error < best.0 {
                best = (error, j);
            }
        }
        best.1
    }

    /// Bin edges `(a, b)` of the range `[edge(a), edge(b)]` minimizing the estimated L2 error, all
    /// in units of one bin width.
    fn l2_edges(&self, steps: f64) -> (usize, usize) {
        let n = self.counts.len();
        let (mass, below, above) = self.clip_errors();
        // Where 0 is: the caller's range always reaches it.
        let zero = -self.origin / self.width;
        let a_max = if zero >= n as f64 - 1.0 {
            n - 1
        } else if zero > 0.0 {
            zero as usize
        } else {
            0
        };
        let b_min = if zero <= 1.0 {
            1
        } else if zero < n as f64 {
            zero.ceil() as usize
        } else {
            n
        };
        let error = |a: usize, b: usize| {
            let delta = ((b as f64).max(zero) - (a as f64).min(zero)) / steps;
            below[a] + above[b] + (mass[b] - mass[a]) * delta * delta / 12.0
        };
        let (mut a, mut b) = (0, n);
        let mut current = error(a, b);
        for _ in 0..n + 1 {
            let (mut best_a, mut error_a) = (a, current);
            for a2 in 0..=a_max.min(b - 1) {
                let e = error(a2, b);
                if e < error_a {
                    (best_a, error_a) = (a2, e);
                }
            }
            let (mut best_b, mut error_b) = (b, current);
            for b2 in (b_min.max(a + 1)..=n).rev() {
                let e = error(a, b2);
                if e < error_b {
                    (best_b, error_b) = (b2, e);
                }
            }
            let enough = |e: f64| e < current - current.abs() * 1e-12;
            if enough(error_a) && error_a <= error_b {
                (a, current) = (best_a, error_a);
            } else if enough(error_b) {
                (b, current) = (best_b, error_b);
            } else {
                break;
            }
        }
        (a, b)
    }

    /// In units of one bin width, for every edge `e` in `0..=n`: the mass of the bins left of it,
    /// and the squared clipping error of all bins left of it (clipped up to `e`) and right of it
    /// (clipped down to `e`), each bin's mass sitting at its center.
    fn clip_errors(&self) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let c = &self.counts;
        let n = c.len();
        let mut mass = vec![0.0; n + 1];
        let mut below = vec![0.0; n + 1];
        let mut above = vec![0.0; n + 1];
        // Moving an edge one bin outwards past bin k: every clipped bin is one unit further away
        // (error + 2 * distance_sum + mass) and bin k joins half a unit away.
        let (mut moment, mut clipped) = (0.0, 0.0);
        for k in 0..n {
            mass[k + 1] = mass[k] + c[k];
            below[k + 1] = below[k] + 2.0 * moment + clipped + c[k] / 4.0;
            moment += clipped + c[k] / 2.0;
            clipped += c[k];
        }
        let (mut moment, mut clipped) = (0.0, 0.0);
        for k in (0..n).rev() {
            above[k] = above[k + 1] + 2.0 * moment + clipped + c[k] / 4.0;
            moment += clipped + c[k] / 2.0;
            clipped += c[k];
        }
        (mass, below, above)
    }
}

/// Bins `start..end` of chunk `j` when `bins` bins are merged into `chunks` chunks of
/// `bins / chunks` bins rounded down or up, the longer ones spread evenly.
fn chunk(bins: usize, chunks: usize, j: usize) -> (usize, usize) {
    (j * bins / chunks, (j + 1) * bins / chunks)
}

/// `x > 0`, false for NaN.
fn positive(x: f64) -> bool {
    x > 0.0
}

fn x_ln_x(x: f64) -> f64 {
    if x > 0.0 {
        x * x.ln()
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::collection::vec;
    use proptest::prelude::*;

    const UINT8: Target = Target {
        qmin: 0,
        qmax: 255,
        symmetric: false,
    };
    const INT8_SYMMETRIC: Target = Target {
        qmin: -127,
        qmax: 127,
        symmetric: true,
    };

    /// SplitMix64: a tiny deterministic generator.
    struct Rng(u64);

    impl Rng {
        fn next_u64(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        /// Uniform in (0, 1).
        fn uniform(&mut self) -> f64 {
            ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        }

        /// Standard normal (Box-Muller).
        fn normal(&mut self) -> f32 {
            let (u, v) = (self.uniform(), self.uniform());
            ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32
        }

        fn normals(&mut self, n: usize) -> Vec<f32> {
            (0..n).map(|_| self.normal()).collect()
        }
    }

    fn observed(method: Method, batches: &[&[f32]]) -> Observer {
        let mut observer = Observer::new(method);
        for batch in batches {
            observer.observe(batch);
        }
        observer
    }

    /// Width of one bin of a histogram observer (the finest a histogram range can resolve).
    fn bin_width(observer: &Observer) -> f64 {
        match &observer.state {
            State::Histogram(h) => h.width,
            _ => panic!("not a histogram observer"),
        }
    }

    fn all_methods() -> Vec<Method> {
        vec![
            Method::MinMax,
            Method::MovingAverage { constant: 0.01 },
            Method::Percentile { percentile: 99.99 },
            Method::Entropy,
            Method::L2,
        ]
    }

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
    fn percentile_on_uniform_integers_cuts_the_expected_mass() {
        let data: Vec<f32> = (0..100_000).map(|i| i as f32).collect();
        let method = Method::Percentile { percentile: 99.9 };
        let batches: Vec<&[f32]> = data.chunks(1000).collect();
        let observer = observed(method, &batches);
        let width = bin_width(&observer);
        assert!(width < 50.0, "{width}");
        // Non-negative data: the lower edge stays at min and the whole 0.1 % comes off the top.
        let (lo, hi) = observer.range(UINT8).unwrap();
        assert_eq!(lo, 0.0);
        assert!((f64::from(hi) - 99_900.0).abs() <= width, "{hi}");

        // Centered data: 0.05 % is cut on each side.
        let centered: Vec<f32> = data.iter().map(|x| x - 50_000.0).collect();
        let observer = observed(method, &[&centered]);
        let (lo, hi) = observer.range(UINT8).unwrap();
        assert!((f64::from(lo) + 49_950.0).abs() <= width, "{lo}");
        assert!((f64::from(hi) - 49_950.0).abs() <= width, "{hi}");
        // Symmetric: the 99.9th percentile of |x|.
        let (lo, hi) = observer.range(INT8_SYMMETRIC).unwrap();
        assert_eq!(lo, -hi);
        assert!((f64::from(hi) - 49_950.0).abs() <= width, "{hi}");
    }

    #[test]
    fn histogram_merge_of_two_halves_matches_one_observer() {
        let mut rng = Rng(7);
        let data: Vec<f32> = rng.normals(40_000).iter().map(|x| 3.0 * x + 1.0).collect();
        let method = Method::Percentile { percentile: 99.0 };
        let single = observed(method, &data.chunks(500).collect::<Vec<_>>());
        let width = bin_width(&single);
        // Halves split by value, so the two histograms have different grids and must be re-binned.
        let (mut low, mut high): (Vec<f32>, Vec<f32>) = data.iter().partition(|&&x| x < 2.0);
        low.push(-0.5);
        high.push(9.0);
        for (first, second) in [(&low, &high), (&high, &low)] {
            let mut merged = observed(method, &first.chunks(500).collect::<Vec<_>>());
            merged.merge(observed(method, &second.chunks(500).collect::<Vec<_>>()));
            for target in [UINT8, INT8_SYMMETRIC] {
                let (lo, hi) = merged.range(target).unwrap();
                let (single_lo, single_hi) = single.range(target).unwrap();
                let tolerance = width.max(bin_width(&merged)) + 0.01;
                assert!(
                    f64::from((lo - single_lo).abs()) <= tolerance,
                    "{lo} {single_lo}"
                );
                assert!(
                    f64::from((hi - single_hi).abs()) <= tolerance,
                    "{hi} {single_hi}"
                );
            }
        }
    }

    #[test]
    fn histogram_keeps_its_mass_through_growth_and_merges() {
        let mut observer = Observer::new(Method::L2);
        observer.observe(&[1.0; 10]);
        observer.observe(&[0.0, 1e6]);
        observer.observe(&[-1e30, 5.0]);
        let mut other = Observer::new(Method::Entropy);
        other.observe(&[0.25, 0.5, 0.75]);
        observer.merge(other);
        let State::Histogram(h) = &observer.state else {
            unreachable!()
        };
        assert!((h.total() - 17.0).abs() < 1e-9, "{}", h.total());
        assert!(h.counts.len() <= MAX_BINS);
        assert_eq!(observer.min_max(), Some((-1e30, 1e6)));
    }

    #[test]
    fn entropy_threshold_clips_outliers_of_a_gaussian() {
        let mut rng = Rng(42);
        let mut data = rng.normals(100_000);
        data.extend_from_slice(&[40.0, -38.0, 39.5, 40.0, -40.0]);
        let observer = observed(Method::Entropy, &data.chunks(4096).collect::<Vec<_>>());
        let clean = observed(Method::Entropy, &[&data[..100_000]]);
        let kl = |o: &Observer, target: Target| {
            let State::Histogram(h) = &o.state else {
                unreachable!()
            };
            let (lo, hi) = o.min_max().unwrap();
            (h.entropy_range(target, (lo as f64, hi as f64)), h.clone())
        };
        for target in [UINT8, INT8_SYMMETRIC] {
            let ((lo, hi), h) = kl(&observer, target);
            if target.symmetric {
                assert_eq!(lo, -hi, "symmetric target: symmetric range");
            }
            // The KL search alone: each side well inside the outliers (about 4 sigma).
            assert!(hi > 2.0 && hi < 10.0, "{target:?}: threshold {hi}");
            assert!(lo < -2.0 && lo > -10.0, "{target:?}: threshold {lo}");
            let ((clean_lo, clean_hi), _) = kl(&clean, target);
            assert!(
                (hi - clean_hi).abs() < 0.6 && (lo - clean_lo).abs() < 0.6,
                "({lo}, {hi}) vs ({clean_lo}, {clean_hi}) without outliers"
            );
            // The method's range never has a larger expected error than the full range: here
            // five values 40 sigma out cost more clipped than the finer grid saves.
            let (a, b) = observer.range(target).unwrap();
            let chosen = h.expected_error((a as f64, b as f64), target.steps());
            let full = h.expected_error((-40.0, 40.0), target.steps());
            assert!(chosen <= full * (1.0 + 1e-9), "{chosen} > {full}");
        }
        // Non-negative data: (0, t) from the KL search; the vetted range starts at 0 too.
        let relu: Vec<f32> = data.iter().map(|x| x.max(0.0)).collect();
        let observer = observed(Method::Entropy, &[&relu]);
        let ((lo, hi), _) = kl(&observer, UINT8);
        assert_eq!(lo, 0.0);
        assert!(hi > 2.0 && hi < 10.0, "threshold {hi}");
        assert_eq!(observer.range(UINT8).unwrap().0, 0.0);
    }

    #[test]
    fn l2_clips_outliers_of_a_gaussian() {
        // On an 8-bit grid, clipping even a few outliers costs more than it saves: the fraction of
        // outliers worth clipping is about 1 / (12 * 255^2). A 4-bit grid shows the trade-off.
        let int4 = Target {
            qmin: -8,
            qmax: 7,
            symmetric: false,
        };
        let int4_symmetric = Target {
            qmin: -7,
            qmax: 7,
            symmetric: true,
        };
        let mut rng = Rng(3);
        let mut data = rng.normals(100_000);
        data.extend_from_slice(&[100.0, -90.0, 95.0]);
        let observer = observed(Method::L2, &data.chunks(4096).collect::<Vec<_>>());
        let (lo, hi) = observer.range(int4).unwrap();
        assert!(
            lo < -2.0 && lo > -5.0 && hi > 2.0 && hi < 5.0,
            "({lo}, {hi})"
        );
        let (lo, hi) = observer.range(int4_symmetric).unwrap();
        assert!(lo == -hi && hi > 2.0 && hi < 5.0, "({lo}, {hi})");

        // Without outliers on 8 bits, only the thin tails are clipped (the optimum is near 3.8
        // sigma).
        let observer = observed(Method::L2, &[&data[..100_000]]);
        let (min, max) = observer.min_max().unwrap();
        let (lo, hi) = observer.range(UINT8).unwrap();
        assert!(
            lo < -3.0 && lo >= min && hi > 3.0 && hi <= max,
            "({lo}, {hi})"
        );

        // Non-negative data keeps lo = min.
        let shifted: Vec<f32> = data[..100_000].iter().map(|x| x.abs() + 0.5).collect();
        let observer = observed(Method::L2, &[&shifted]);
        let (lo, hi) = observer.range(int4).unwrap();
        assert_eq!(lo, observer.min_max().unwrap().0);
        assert!(hi > 2.0 && hi < 5.0, "{hi}");
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
    fn method_serializes_in_snake_case() {
        let methods = all_methods();
        let json = serde_json::to_string(&methods).unwrap();
        assert_eq!(
            json,
            concat!(
                r#"["min_max",{"moving_average":{"constant":0.01}},"#,
                r#"{"percentile":{"percentile":99.99}},"entropy","l2"]"#
            )
        );
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

    #[test]
    fn entropy_keeps_discrete_pixel_ranges_with_a_zero_spike() {
        // Images in [0, 1] at multiples of 1/16 with half the pixels exactly 0 (the digits
        // calibration set): the spike at zero must not drive the threshold to the smallest
        // candidate, which once clipped the input to 0.06 and gave -2.8 dB SQNR.
        let mut rng = Rng(3);
        let data: Vec<f32> = (0..20_000)
            .map(|_| {
                if rng.uniform() < 0.5 {
                    0.0
                } else {
                    (rng.uniform() * 16.0).ceil() as f32 / 16.0
                }
            })
            .collect();
        for target in [UINT8, INT8_SYMMETRIC] {
            let (_, hi) = observed(Method::Entropy, &[&data]).range(target).unwrap();
            assert!(hi >= 0.5, "{target:?}: threshold {hi}");
        }
    }

    #[test]
    fn entropy_keeps_a_long_tail_on_one_side_of_an_asymmetric_grid() {
        // Mostly in [-2.5, 2.5] with 13% of the mass spread down to -10: a single folded
        // threshold would clip that tail to -2.5.
        let mut rng = Rng(11);
        let data: Vec<f32> = (0..40_000)
            .map(|_| {
                if rng.uniform() < 0.13 {
                    -(2.5 + rng.uniform() * 7.5) as f32
                } else {
                    (rng.uniform() * 5.0 - 2.5) as f32
                }
            })
            .collect();
        let (lo, hi) = observed(Method::Entropy, &[&data]).range(UINT8).unwrap();
        assert!(lo < -7.0, "negative threshold {lo}");
        assert!(hi > 2.0, "positive threshold {hi}");
    }
}
