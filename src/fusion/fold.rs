//! The folding math, one function per producer kind. Everything is computed in f64; callers
//! store the results in the initializers' own element types.
//!
//! BatchNormalization (inference): `y = gamma * (x - mean) / sqrt(var + eps) + beta`, per
//! channel. With `s = gamma / sqrt(var + eps)` and `shift = beta - mean * s` this is the affine
//! map `y = s * x + shift`, which a linear producer absorbs: its weights' output-channel slices
//! are scaled by `s` and its bias `b` becomes `b * s + shift = (b - mean) * s + beta`.

use ndarray::{Array1, ArrayD, Axis, IxDyn};

/// Per-channel affine form of an inference BatchNormalization.
#[derive(Debug, Clone, PartialEq)]
pub struct BnAffine {
    /// `gamma / sqrt(var + eps)`.
    pub scale: Array1<f64>,
    /// `beta - mean * scale`.
    pub shift: Array1<f64>,
}

impl BnAffine {
    /// From BN parameters. Fails when the parameters are not `[C]` vectors of one length or a
    /// variance makes the scale non-finite.
    pub fn new(
        gamma: &ArrayD<f64>,
        beta: &ArrayD<f64>,
        mean: &ArrayD<f64>,
        var: &ArrayD<f64>,
        eps: f64,
    ) -> Result<BnAffine, String> {
        let c = gamma.len();
        for (name, a) in [("scale", gamma), ("B", beta), ("mean", mean), ("var", var)] {
            if a.ndim() != 1 || a.len() != c {
                return Err(format!(
                    "BatchNormalization {name} has shape {:?}, expected [{c}]",
                    a.shape()
                ));
            }
        }
        let scale: Array1<f64> = gamma
            .iter()
            .zip(var.iter())
            .map(|(&g, &v)| g / (v + eps).sqrt())
            .collect();
        if scale.iter().any(|s| !s.is_finite()) {
            return Err("var + epsilon is not positive for some channel".into());
        }
        let shift = beta
            .iter()
            .zip(mean.iter())
            .zip(scale.iter())
            .map(|((&b, &m), &s)| b - m * s)
            .collect();
        Ok(BnAffine { scale, shift })
    }

    /// Number of channels.
    pub fn channels(&self) -> usize {
        self.scale.len()
    }

    /// `bias * s + shift` (a missing bias is zero).
    pub fn fold_bias(&self, bias: Option<&Array1<f64>>) -> Array1<f64> {
        match bias {
            Some(b) => b * &self.scale + &self.shift,
            None => self.shift.clone(),
        }
    }
}

/// Conv, weight `[M, C/g, k...]`: `W'[o] = W[o] * s[o]`, `b' = b * s + shift`.
pub fn fold_conv(
    w: &ArrayD<f64>,
    b: Option<&Array1<f64>>,
    bn: &BnAffine,
) -> (ArrayD<f64>, Array1<f64>) {
    let mut w2 = w.clone();
    for (o, mut slice) in w2.axis_iter_mut(Axis(0)).enumerate() {
        slice *= bn.scale[o];
    }
    (w2, bn.fold_bias(b))
}

/// [`fold_conv`]'s weight for a float32 weight held as raw little-endian bytes, computed
/// straight into the new bytes: `W'[o] = (W[o] as f64 * s[o]) as f32`, the same arithmetic
/// and rounding as the f64 path, with one allocation (the result) instead of five. `None`
/// when `raw` does not hold `channels` equal slices of whole f32 values.
pub fn fold_conv_raw_f32(raw: &[u8], scale: &[f64]) -> Option<Vec<u8>> {
    let channels = scale.len();
    if channels == 0 || !raw.len().is_multiple_of(4) || !(raw.len() / 4).is_multiple_of(channels) {
        return None;
    }
    let per_channel = (raw.len() / 4 / channels * 4).max(4);
    let mut out = vec![0u8; raw.len()];
    for ((src, dst), &s) in raw
        .chunks_exact(per_channel)
        .zip(out.chunks_exact_mut(per_channel))
        .zip(scale)
    {
        for (v, o) in src.chunks_exact(4).zip(dst.chunks_exact_mut(4)) {
            let w = f32::from_le_bytes([v[0], v[1], v[2], v[3]]);
            o.copy_from_slice(&(((w as f64) * s) as f32).to_le_bytes());
        }
    }
    Some(out)
}

/// ConvTranspose, weight `[C, M/g, k...]` with `group` groups: the output channel of `W[i, j]`
/// is `(i / (C/g)) * (M/g) + j`; that channel's scale applies.
pub fn fold_conv_transpose(
    w: &ArrayD<f64>,
    b: Option<&Array1<f64>>,
    group: usize,
    bn: &BnAffine,
) -> (ArrayD<f64>, Array1<f64>) {
    let c_in = w.shape()[0];
    let m_per_group = w.shape()[1];
    let c_per_group = c_in / group;
    let mut w2 = w.clone();
    for (i, mut row) in w2.axis_iter_mut(Axis(0)).enumerate() {
        let g = i / c_per_group;
        for (j, mut slice) in row.axis_iter_mut(Axis(0)).enumerate() {
            slice *= bn.scale[g * m_per_group + j];
        }
    }
    (w2, bn.fold_bias(b))
}

/// Gemm `Y = alpha * A * op(B) + beta * C` followed by BN on the `[M, N]` output: scales the
/// output-channel axis of `B` (rows when `trans_b`, columns otherwise).
pub fn fold_gemm_weight(b: &ArrayD<f64>, trans_b: bool, bn: &BnAffine) -> ArrayD<f64> {
    let axis = if trans_b { 0 } else { 1 };
    let mut b2 = b.clone();
    for (o, mut slice) in b2.axis_iter_mut(Axis(axis)).enumerate() {
        slice *= bn.scale[o];
    }
    b2
}

/// The new Gemm C (used with beta = 1): `C' = (beta * C) * s + shift`, broadcast along the
/// last axis. C may be absent, a scalar, `[N]`, `[1, N]` or `[M, N]`; the result is `[N]`
/// unless C is `[M, N]` with `M > 1`.
pub fn fold_gemm_bias(c: Option<&ArrayD<f64>>, beta: f64, bn: &BnAffine) -> ArrayD<f64> {
    let n = bn.channels();
    match c {
        None => bn.shift.clone().into_dyn(),
        Some(c) if c.ndim() == 2 && c.shape()[0] > 1 => {
            let mut out = if c.shape()[1] == n {
                c * beta
            } else {
                expand_columns(c, n) * beta
            };
            for mut row in out.axis_iter_mut(Axis(0)) {
                for (k, v) in row.iter_mut().enumerate() {
                    *v = *v * bn.scale[k] + bn.shift[k];
                }
            }
            out
        }
        Some(c) => {
            // scalar, [1], [N], [1, 1] or [1, N]: one value per output channel
            let flat: Vec<f64> = c.iter().copied().collect();
            let v: Vec<f64> = (0..n)
                .map(|k| {
                    let ck = if flat.len() == 1 { flat[0] } else { flat[k] };
                    beta * ck * bn.scale[k] + bn.shift[k]
                })
                .collect();
            ArrayD::from_shape_vec(IxDyn(&[n]), v).expect("n values")
        }
    }
}

/// Broadcasts a `[M, 1]` Gemm C to `[M, N]` so it can be scaled per output channel.
pub fn expand_columns(c: &ArrayD<f64>, n: usize) -> ArrayD<f64> {
    let m = c.shape()[0];
    let mut out = ArrayD::zeros(IxDyn(&[m, n]));
    for i in 0..m {
        for k in 0..n {
            out[[i, k]] = c[[i, 0]];
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use approx::assert_abs_diff_eq;
    use ndarray::{array, Array};

    fn bn(c: usize) -> BnAffine {
        let g = Array::linspace(0.5, 1.5, c).into_dyn();
        let b = Array::linspace(-0.2, 0.3, c).into_dyn();
        let m = Array::linspace(0.1, -0.4, c).into_dyn();
        let v = Array::linspace(0.2, 2.0, c).into_dyn();
        BnAffine::new(&g, &b, &m, &v, 1e-5).unwrap()
    }

    #[test]
    fn raw_f32_fold_is_bit_identical_to_the_f64_path() {
        let c = 3;
        let w = ArrayD::from_shape_fn(IxDyn(&[c, 2, 3, 3]), |i| {
            ((i[0] * 131 + i[1] * 17 + i[2] * 7 + i[3]) as f32 * 0.37).sin() * 3.1
        });
        let bn = bn(c);
        let (w64, _) = fold_conv(&w.mapv(|v| v as f64), None, &bn);
        let expected: Vec<u8> = w64.iter().flat_map(|&v| (v as f32).to_le_bytes()).collect();
        let raw: Vec<u8> = w.iter().flat_map(|v| v.to_le_bytes()).collect();
        let got = fold_conv_raw_f32(&raw, bn.scale.as_slice().unwrap()).unwrap();
        assert_eq!(got, expected);
        // bytes that do not split into the channels are refused
        assert_eq!(
            fold_conv_raw_f32(&raw[..raw.len() - 4], bn.scale.as_slice().unwrap()),
            None
        );
        assert_eq!(
            fold_conv_raw_f32(&raw[..7], bn.scale.as_slice().unwrap()),
            None
        );
        assert_eq!(fold_conv_raw_f32(&raw, &[]), None);
    }

    #[test]
    fn affine_matches_formula() {
        let b = BnAffine::new(
            &array![2.0].into_dyn(),
            &array![0.5].into_dyn(),
            &array![1.0].into_dyn(),
            &array![3.0].into_dyn(),
            1.0,
        )
        .unwrap();
        // s = 2 / sqrt(4) = 1; shift = 0.5 - 1 = -0.5
        assert_eq!(b.scale[0], 1.0);
        assert_eq!(b.shift[0], -0.5);
        let e = BnAffine::new(
            &array![1.0].into_dyn(),
            &array![0.0].into_dyn(),
            &array![0.0].into_dyn(),
            &array![-1.0].into_dyn(),
            0.0,
        );
        assert!(e.is_err());
    }

    #[test]
    fn conv_transpose_grouped_channel_mapping() {
        // C = 4 input channels, g = 2, M/g = 3 -> M = 6
        let w = ArrayD::from_elem(IxDyn(&[4, 3, 1]), 1.0);
        let a = bn(6);
        let (w2, _) = fold_conv_transpose(&w, None, 2, &a);
        for i in 0..4 {
            for j in 0..3 {
                let o = (i / 2) * 3 + j;
                assert_abs_diff_eq!(w2[[i, j, 0]], a.scale[o], epsilon = 1e-15);
            }
        }
    }

    #[test]
    fn gemm_bias_shapes() {
        let a = bn(3);
        let none = fold_gemm_bias(None, 2.0, &a);
        assert_eq!(none.shape(), &[3]);
        let scalar = fold_gemm_bias(Some(&array![1.5].into_dyn()), 2.0, &a);
        for k in 0..3 {
            assert_abs_diff_eq!(scalar[k], 3.0 * a.scale[k] + a.shift[k], epsilon = 1e-12);
        }
        let full = fold_gemm_bias(
            Some(&array![[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]].into_dyn()),
            0.5,
            &a,
        );
        assert_eq!(full.shape(), &[2, 3]);
        assert_abs_diff_eq!(full[[1, 2]], 3.0 * a.scale[2] + a.shift[2], epsilon = 1e-12);
    }
}
