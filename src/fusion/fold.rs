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
