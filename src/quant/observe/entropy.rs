//! Entropy: the threshold whose clipped-and-quantized histogram is closest in KL divergence to the
//! whole one, vetted against the full range's expected error.
//!
//! Entropy (TensorRT / ONNX Runtime KL calibration) on a 2048-bin histogram of `|x|` over
//! `[0, max |x|]`. For every candidate `i` from `num_quantized_bins` to 2048: `p` = the first
//! `i` bins with the mass beyond added to bin `i - 1`; `q` = those `i` bins (without the
//! outliers) summed into `num_quantized_bins` chunks, each chunk's sum spread back evenly over
//! its bins where `p` is non-zero. `t = i * bin_width` for the `i` minimizing KL(p || q); the
//! range is `(-t, t)` when some value is negative or the target is symmetric, `(0, t)` otherwise.
//!
//! - `num_quantized_bins` = the grid levels covering `[0, t]`: `qmax - qmin + 1` for non-negative
//!   data on an asymmetric target (256 for 8 bits), half of that rounded up otherwise (128 for
//!   8 bits, ONNX Runtime's and TensorRT's fixed value).
//! - Chunks hold `i / num_quantized_bins` bins rounded down or up, evenly interleaved (TensorRT's
//!   "quantize the `i` bins into `num_quantized_bins` levels"). MXNet and ONNX Runtime merge
//!   exactly `i / num_quantized_bins` bins (integer division) per chunk and give the remainder to
//!   the last one, which makes KL saw-toothed in `i` and pulls `t` to multiples of
//!   `num_quantized_bins` bins: on a Gaussian with a few outliers at 40 sigma that gives 5.0
//!   sigma (exactly 256 bins) where even chunks give 4.2 sigma, as without the outliers.
//! - Smoothing: rather than adding an epsilon to every empty bin of both distributions (a change
//!   below 1e-4 of a count), only a bin where `p > 0` and `q = 0` (outliers landing in an empty
//!   chunk) gets `q = 1e-4`, which keeps KL finite.
//! - Cost: with prefix sums a candidate costs O(`num_quantized_bins`), not O(bins), so every
//!   candidate is tried, no stepping (8-bit: ~1 ms optimized, ~8 ms at opt-level 0).

use super::histogram::{positive, Histogram, BINS};
use super::Target;

/// The count given to a bin where `p > 0` but `q = 0` (ONNX Runtime's smoothing epsilon).
const KL_EPSILON: f64 = 1e-4;

impl Histogram {
    pub(super) fn entropy_range(&self, target: Target, (min, max): (f64, f64)) -> (f64, f64) {
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
    pub(super) fn vetted(
        &self,
        kl: (f64, f64),
        target: Target,
        (min, max): (f64, f64),
    ) -> (f64, f64) {
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
}

/// Bins `start..end` of chunk `j` when `bins` bins are merged into `chunks` chunks of
/// `bins / chunks` bins rounded down or up, the longer ones spread evenly.
fn chunk(bins: usize, chunks: usize, j: usize) -> (usize, usize) {
    (j * bins / chunks, (j + 1) * bins / chunks)
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
    use crate::quant::observe::testing::{observed, Rng, INT8_SYMMETRIC, UINT8};
    use crate::quant::observe::{Method, Observer, State, Target};

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
