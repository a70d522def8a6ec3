//! The histogram behind the `Percentile`, `Entropy` and `L2` observers: growth, merge and the
//! re-binning the readers use (`folded`, the histogram of `|x|`).
//!
//! Histogram (ONNX Runtime's streaming approach): the first batch spreads 2048 bins over its
//! `[min, max]` (a constant batch gets a tiny positive bin width); a later batch outside it adds
//! whole bins of the same width on either side; when that would exceed 8192 bins, adjacent pairs
//! merge (width doubles, count halves) until it fits. Counts are `f64`: merging two histograms
//! re-bins the finer one onto the coarser grid, splitting each source bin's count over the target
//! bins it overlaps in proportion to the overlap. The readers are `percentile.rs`, `entropy.rs`
//! and `l2.rs`.

/// Bins of a fresh histogram, and of the `|x|` histograms the entropy, symmetric percentile and
/// symmetric L2 searches run on.
pub(super) const BINS: usize = 2048;
/// A histogram growing past this many bins merges adjacent pairs.
pub(super) const MAX_BINS: usize = 4 * BINS;

/// Bins `[origin + k * width, origin + (k + 1) * width)`, the last one closed on the right.
#[derive(Debug, Clone)]
pub(super) struct Histogram {
    pub(super) origin: f64,
    pub(super) width: f64,
    pub(super) counts: Vec<f64>,
}

impl Histogram {
    pub(super) fn empty() -> Histogram {
        Histogram {
            origin: 0.0,
            width: 1.0,
            counts: Vec::new(),
        }
    }

    /// `bins` empty bins over `[0, limit]` (`limit > 0`).
    pub(super) fn zeros_up_to(limit: f64, bins: usize) -> Histogram {
        Histogram {
            origin: 0.0,
            width: limit / bins as f64,
            counts: vec![0.0; bins],
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }

    pub(super) fn edge(&self, k: usize) -> f64 {
        self.origin + k as f64 * self.width
    }

    pub(super) fn total(&self) -> f64 {
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
    ///
    /// Counted in integers first, four interleaved tallies so that runs of values landing in
    /// one bin (the zeros after a Relu) do not wait on each other, then added to the `f64`
    /// counts: those are whole numbers while values are added (only merging makes fractions,
    /// and merges come after), so the sums are exact and equal to adding 1.0 per value.
    pub(super) fn add(&mut self, values: &[f32], lo: f32, hi: f32) {
        self.cover(f64::from(lo), f64::from(hi));
        let n = self.counts.len();
        if n == 0 {
            return;
        }
        const WAYS: usize = 4;
        let (origin, width, last) = (self.origin, self.width, n - 1);
        // `bin`, inlined: clamp(floor(q), 0, last), where floor is truncation for q > 0 (a
        // float-to-int cast, not a libm call) and anything below 1 lands in bin 0.
        let bin = |v: f32| {
            let q = (f64::from(v) - origin) / width;
            if q > 0.0 {
                (q as usize).min(last)
            } else {
                0
            }
        };
        if values.len() < n * WAYS {
            // Fewer values than tally slots: clearing and summing the tallies would cost more
            // than they save. Adding 1.0 per value gives the same whole-number counts.
            for &v in values.iter().filter(|v| v.is_finite()) {
                self.counts[bin(v)] += 1.0;
            }
            return;
        }
        let mut tally = vec![0u32; n * WAYS];
        let mut pending = 0u32;
        for (i, &v) in values.iter().enumerate() {
            if !v.is_finite() {
                continue;
            }
            tally[bin(v) * WAYS + i % WAYS] += 1;
            pending += 1;
            if pending == u32::MAX {
                self.flush(&mut tally, WAYS);
                pending = 0;
            }
        }
        self.flush(&mut tally, WAYS);
    }

    /// Adds the integer tallies of [`Histogram::add`] to the counts and clears them.
    fn flush(&mut self, tally: &mut [u32], ways: usize) {
        for (count, t) in self.counts.iter_mut().zip(tally.chunks_exact_mut(ways)) {
            let sum: u64 = t.iter().map(|&c| u64::from(c)).sum();
            if sum > 0 {
                *count += sum as f64;
            }
            t.fill(0);
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
    pub(super) fn merge(&mut self, mut other: Histogram) {
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
    pub(super) fn spread(&mut self, lo: f64, hi: f64, mass: f64) {
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
    pub(super) fn folded(&self, limit: f64) -> Histogram {
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
}

/// `x > 0`, false for NaN.
pub(super) fn positive(x: f64) -> bool {
    x > 0.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::observe::testing::{bin_width, observed, Rng, INT8_SYMMETRIC, UINT8};
    use crate::quant::observe::{Method, Observer, State};

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
}
