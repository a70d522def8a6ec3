//! Percentile: the range that keeps `p` percent of a histogram's mass.
//!
//! Percentile `p`: asymmetric targets cut `(100 - p) / 2` percent of the mass on each side (the
//! lower cut is skipped when no value is negative, the upper one when none is positive);
//! symmetric targets take `t` = the `p`-th percentile of `|x|`, range `(-t, t)`. Quantiles
//! interpolate linearly inside a bin.

use super::histogram::Histogram;
use super::Target;

impl Histogram {
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

    pub(super) fn percentile_range(
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
}

#[cfg(test)]
mod tests {
    use crate::quant::observe::testing::{bin_width, observed, INT8_SYMMETRIC, UINT8};
    use crate::quant::observe::Method;

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
}
