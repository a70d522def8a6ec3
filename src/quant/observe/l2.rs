//! L2: the range minimizing the estimated squared quantization error over a histogram.
//!
//! L2 minimizes the estimated quantization error
//! `sum(count_in * delta^2 / 12) + sum(count_out * (bin center - nearest clip edge)^2)` with
//! `delta = (hi - lo) / (qmax - qmin)` over bin-edge ranges `[lo, hi]`. Because the caller widens
//! the range to include 0, `lo` never moves above 0 nor `hi` below 0, and `delta` is measured on
//! the widened range (so non-negative data keeps `lo = min`). The search starts at the full range
//! and, like PyTorch's `_non_linear_param_search`, repeatedly moves whichever side lowers the
//! error more and stops when neither does; unlike it, a move goes to the best position for that
//! side given the other (an exact 1-D search in O(bins) with incremental sums), so noise in the
//! tail bins cannot stop the search early. Symmetric targets search one `t` over the `|x|`
//! histogram with range `(-t, t)`.

use super::histogram::Histogram;
use super::Target;

impl Histogram {
    pub(super) fn l2_range(&self, target: Target, (min, max): (f64, f64)) -> (f64, f64) {
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

#[cfg(test)]
mod tests {
    use crate::quant::observe::testing::{observed, Rng, UINT8};
    use crate::quant::observe::{Method, Target};

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
}
