//! Helpers shared by the observer tests: two common targets, a deterministic generator, and
//! observers fed whole batches.

use super::{Method, Observer, State, Target};

pub(super) const UINT8: Target = Target {
    qmin: 0,
    qmax: 255,
    symmetric: false,
};
pub(super) const INT8_SYMMETRIC: Target = Target {
    qmin: -127,
    qmax: 127,
    symmetric: true,
};

/// SplitMix64: a tiny deterministic generator.
pub(super) struct Rng(pub(super) u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1).
    pub(super) fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    /// Standard normal (Box-Muller).
    fn normal(&mut self) -> f32 {
        let (u, v) = (self.uniform(), self.uniform());
        ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32
    }

    pub(super) fn normals(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.normal()).collect()
    }
}

pub(super) fn observed(method: Method, batches: &[&[f32]]) -> Observer {
    let mut observer = Observer::new(method);
    for batch in batches {
        observer.observe(batch);
    }
    observer
}

/// Width of one bin of a histogram observer (the finest a histogram range can resolve).
pub(super) fn bin_width(observer: &Observer) -> f64 {
    match &observer.state {
        State::Histogram(h) => h.width,
        _ => panic!("not a histogram observer"),
    }
}

pub(super) fn all_methods() -> Vec<Method> {
    vec![
        Method::MinMax,
        Method::MovingAverage { constant: 0.01 },
        Method::Percentile { percentile: 99.99 },
        Method::Entropy,
        Method::L2,
    ]
}
