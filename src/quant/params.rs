//! Scale, zero point and rounding, per tensor and per channel; bias quantization. The formulas
//! are ONNX Runtime's (`quant_utils.py`: `get_qmin_qmax_for_qType`, `compute_scale_zp`,
//! `quantize_nparray`, `quantize_bias_static`):
//!
//! - `rmin = min(rmin, 0)`, `rmax = max(rmax, 0)`; symmetric: `rmin = -max(|rmin|, |rmax|)`,
//!   `rmax = -rmin`.
//! - `scale = (rmax - rmin) / (qmax - qmin)` (in f64, stored as f32); a scale below f32's
//!   smallest normal becomes 1 with zero point 0.
//! - asymmetric `zp = round(qmin - rmin / scale)`; symmetric `zp = round((qmin + qmax) / 2)`.
//! - `q = clip(round(x / scale) + zp, qmin, qmax)`; rounding is half to even everywhere.
//! - Grids: uint8 [0, 255] ([0, 127] reduce_range); int8 [-128, 127], symmetric [-127, 127],
//!   reduce_range [-64, 64].
//! - Bias: int32, `scale = x_scale * w_scale`, zero point 0, `q = round(b / scale)`.

use serde::{Deserialize, Serialize};

/// The integer types of quantized tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QType {
    U8,
    I8,
}

impl std::fmt::Display for QType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            QType::U8 => "u8",
            QType::I8 => "i8",
        })
    }
}

impl QType {
    /// The ONNX data type code.
    pub fn onnx_code(self) -> i32 {
        match self {
            QType::U8 => 2,
            QType::I8 => 3,
        }
    }

    /// The integer grid, as ONNX Runtime's `get_qmin_qmax_for_qType`.
    pub fn grid(self, symmetric: bool, reduce_range: bool) -> (i32, i32) {
        match (self, symmetric, reduce_range) {
            (QType::U8, _, false) => (0, 255),
            (QType::U8, _, true) => (0, 127),
            (QType::I8, _, true) => (-64, 64),
            (QType::I8, true, false) => (-127, 127),
            (QType::I8, false, false) => (-128, 127),
        }
    }
}

/// Round half to even (numpy's `round`).
pub fn round_half_even(x: f64) -> f64 {
    x.round_ties_even()
}

/// Quantization parameters of one tensor (or one channel).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ScaleZp {
    pub scale: f32,
    pub zero_point: i32,
}

/// ONNX Runtime's `compute_scale_zp`.
pub fn compute_scale_zp(rmin: f32, rmax: f32, qmin: i32, qmax: i32, symmetric: bool) -> ScaleZp {
    let mut rmin = (rmin as f64).min(0.0);
    let mut rmax = (rmax as f64).max(0.0);
    if symmetric {
        let absmax = rmin.abs().max(rmax.abs());
        rmin = -absmax;
        rmax = absmax;
    }
    let scale = (rmax - rmin) / (qmax as f64 - qmin as f64);
    if scale.is_nan() || scale < f32::MIN_POSITIVE as f64 || !scale.is_finite() {
        return ScaleZp {
            scale: 1.0,
            zero_point: 0,
        };
    }
    let zp = if symmetric {
        round_half_even((qmax as f64 + qmin as f64) / 2.0)
    } else {
        round_half_even(qmin as f64 - rmin / scale)
    };
    ScaleZp {
        scale: scale as f32,
        zero_point: zp.clamp(qmin as f64, qmax as f64) as i32,
    }
}

/// `clip(round(x / scale) + zp, qmin, qmax)` (ORT computes `x / scale` in f32).
pub fn quantize(x: f32, p: ScaleZp, qmin: i32, qmax: i32) -> i32 {
    let v = round_half_even((x / p.scale) as f64) + p.zero_point as f64;
    v.clamp(qmin as f64, qmax as f64) as i32
}

/// [`quantize`] for bulk use (every weight element): round-half-even by the 1.5 * 2^52 trick,
/// which the compiler vectorizes where `round_ties_even` is a libm call per element. The
/// quotient is first clamped to +-2^32, far outside any 32-bit grid yet inside the trick's
/// exact range (|v| < 2^51), so every result, NaN and infinities included, equals
/// [`quantize`]'s.
#[inline]
pub fn quantize_fast(x: f32, p: ScaleZp, qmin: i32, qmax: i32) -> i32 {
    const MAGIC: f64 = 6_755_399_441_055_744.0; // 1.5 * 2^52
    const BOUND: f64 = 4_294_967_296.0; // 2^32
    let v = ((x / p.scale) as f64).clamp(-BOUND, BOUND);
    let rounded = (v + MAGIC) - MAGIC;
    (rounded + p.zero_point as f64).clamp(qmin as f64, qmax as f64) as i32
}

/// `(q - zp) * scale`.
pub fn dequantize(q: i32, p: ScaleZp) -> f32 {
    (q - p.zero_point) as f32 * p.scale
}

/// A bias quantized to int32 with `scale = x_scale * w_scale`, or the largest `|b / scale|` when
/// a value does not fit in int32.
pub fn quantize_bias(b: f32, x_scale: f32, w_scale: f32) -> Result<i32, f64> {
    let scale = x_scale as f64 * w_scale as f64;
    let v = round_half_even(b as f64 / scale);
    if v.abs() > i32::MAX as f64 || !v.is_finite() {
        return Err(v);
    }
    Ok(v as i32)
}

/// The smallest weight scale for which `b` fits int32 with headroom (a factor of 2, as ONNX
/// Runtime's int32-bias adjustment keeps), given `x_scale`.
pub fn min_weight_scale_for_bias(b: f32, x_scale: f32) -> f32 {
    ((b.abs() as f64) * 2.0 / (i32::MAX as f64 * x_scale as f64)) as f32
}

#[cfg(test)]
mod tests {

    #[test]
    fn quantize_fast_equals_quantize() {
        let params = [
            ScaleZp {
                scale: 0.1,
                zero_point: 0,
            },
            ScaleZp {
                scale: 0.0173,
                zero_point: 128,
            },
            ScaleZp {
                scale: 1.0,
                zero_point: -3,
            },
            ScaleZp {
                scale: 3.0e-8,
                zero_point: 7,
            },
        ];
        let mut xs: Vec<f32> = vec![
            0.0,
            -0.0,
            0.5,
            -0.5,
            1.5,
            2.5,
            -2.5,
            0.05,
            0.15,
            0.25,
            -0.35,
            12.7,
            12.75,
            1e30,
            -1e30,
            f32::MAX,
            f32::MIN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::MIN_POSITIVE,
            1e-40,
            127.5,
            128.5,
            -128.5,
            255.5,
        ];
        let mut state = 0x2545F4914F6CDD1Du64;
        for _ in 0..100_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            xs.push(f32::from_bits(state as u32));
            xs.push(((state >> 40) as f32 / 1024.0 - 8192.0) * 0.05);
        }
        for p in params {
            for (qmin, qmax) in [(0, 255), (-128, 127), (-127, 127), (i32::MIN, i32::MAX)] {
                for &x in &xs {
                    assert_eq!(
                        quantize_fast(x, p, qmin, qmax),
                        quantize(x, p, qmin, qmax),
                        "x = {x:e}, {p:?}, [{qmin}, {qmax}]"
                    );
                }
            }
        }
    }

    use super::*;

    #[test]
    fn grids_match_onnx_runtime() {
        assert_eq!(QType::U8.grid(false, false), (0, 255));
        assert_eq!(QType::U8.grid(false, true), (0, 127));
        assert_eq!(QType::I8.grid(false, false), (-128, 127));
        assert_eq!(QType::I8.grid(true, false), (-127, 127));
        assert_eq!(QType::I8.grid(true, true), (-64, 64));
        assert_eq!(QType::I8.grid(false, true), (-64, 64));
    }

    #[test]
    fn rounding_is_half_to_even() {
        assert_eq!(round_half_even(0.5), 0.0);
        assert_eq!(round_half_even(1.5), 2.0);
        assert_eq!(round_half_even(2.5), 2.0);
        assert_eq!(round_half_even(-0.5), 0.0);
        assert_eq!(round_half_even(-1.5), -2.0);
        assert_eq!(round_half_even(-2.5), -2.0);
        assert_eq!(round_half_even(2.4999), 2.0);
        assert_eq!(round_half_even(-2.6), -3.0);
    }

    #[test]
    fn asymmetric_uint8_by_hand() {
        // ORT: rmin=-1, rmax=3 -> scale = 4/255, zp = round(0 - (-1)/(4/255)) = round(63.75) = 64
        let p = compute_scale_zp(-1.0, 3.0, 0, 255, false);
        assert_eq!(p.scale, (4.0f64 / 255.0) as f32);
        assert_eq!(p.zero_point, 64);
        // a range that excludes zero is widened to include it: [2, 5] -> [0, 5]
        let p = compute_scale_zp(2.0, 5.0, 0, 255, false);
        assert_eq!(p.zero_point, 0);
        assert_eq!(p.scale, (5.0f64 / 255.0) as f32);
        // post-ReLU range on int8: zero is qmin
        let p = compute_scale_zp(0.0, 6.0, -128, 127, false);
        assert_eq!(p.zero_point, -128);
    }

    #[test]
    fn symmetric_by_hand() {
        // int8 symmetric: [-2, 1] -> absmax 2, scale = 4/254, zp 0
        let p = compute_scale_zp(-2.0, 1.0, -127, 127, true);
        assert_eq!(p.scale, (4.0f64 / 254.0) as f32);
        assert_eq!(p.zero_point, 0);
        // uint8 symmetric: zp = round(127.5) = 128 (half to even)
        let p = compute_scale_zp(-2.0, 1.0, 0, 255, true);
        assert_eq!(p.zero_point, 128);
        // reduce_range int8 [-64, 64]
        let p = compute_scale_zp(-1.0, 1.0, -64, 64, true);
        assert_eq!(p.scale, (2.0f64 / 128.0) as f32);
    }

    #[test]
    fn ties_in_zero_point_round_to_even() {
        // rmin = -0.5 * scale * k chosen so that qmin - rmin/scale = 2.5 exactly:
        // range [-2.5, 252.5] over 255 steps: scale = 1, zp = round(2.5) = 2
        let p = compute_scale_zp(-2.5, 252.5, 0, 255, false);
        assert_eq!(p.scale, 1.0);
        assert_eq!(p.zero_point, 2);
        let p = compute_scale_zp(-3.5, 251.5, 0, 255, false);
        assert_eq!(p.zero_point, 4);
    }

    #[test]
    fn degenerate_range_gives_unit_scale() {
        assert_eq!(
            compute_scale_zp(0.0, 0.0, 0, 255, false),
            ScaleZp {
                scale: 1.0,
                zero_point: 0
            }
        );
        assert_eq!(
            compute_scale_zp(f32::NAN, f32::NAN, 0, 255, false).scale,
            1.0
        );
    }

    #[test]
    fn quantize_clips_and_rounds() {
        let p = ScaleZp {
            scale: 0.5,
            zero_point: 10,
        };
        assert_eq!(quantize(1.25, p, 0, 255), 12); // 2.5 -> 2, + 10
        assert_eq!(quantize(1.75, p, 0, 255), 14); // 3.5 -> 4
        assert_eq!(quantize(-100.0, p, 0, 255), 0);
        assert_eq!(quantize(1000.0, p, 0, 255), 255);
        assert_eq!(dequantize(14, p), 2.0);
    }

    #[test]
    fn bias_int32_and_overflow() {
        assert_eq!(quantize_bias(1.0, 0.01, 0.02), Ok(5000));
        assert_eq!(quantize_bias(0.375, 0.5, 0.5), Ok(2)); // 1.5 -> 2
        assert_eq!(quantize_bias(0.625, 0.5, 0.5), Ok(2)); // 2.5 -> 2
        assert_eq!(quantize_bias(-0.625, 0.5, 0.5), Ok(-2));
        let e = quantize_bias(1e6, 1e-4, 1e-4).unwrap_err();
        assert!(e > i32::MAX as f64);
        let w = min_weight_scale_for_bias(1e6, 1e-4);
        assert!(quantize_bias(1e6, 1e-4, w).is_ok());
    }
}
