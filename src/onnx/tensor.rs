//! TensorProto <-> ndarray.
//!
//! Which TensorProto field holds which data type (onnx.proto, `TensorProto`):
//!
//! | data type                                         | typed field    | raw_data element |
//! |---------------------------------------------------|----------------|------------------|
//! | FLOAT                                             | `float_data`   | 4 bytes LE       |
//! | DOUBLE                                            | `double_data`  | 8 bytes LE       |
//! | INT64                                             | `int64_data`   | 8 bytes LE       |
//! | INT32, INT8, UINT8, INT16, UINT16, BOOL           | `int32_data`   | 4/1/1/2/2/1      |
//! | FLOAT16, BFLOAT16 (bit pattern in the low 16 bits)| `int32_data`   | 2 bytes LE       |
//! | UINT32, UINT64                                    | `uint64_data`  | 4/8 bytes LE     |
//!
//! `raw_data` is always little-endian, whatever the host; typed fields are protobuf varints or
//! fixed-width values decoded by protobuf itself, so both are host-order independent here.

use half::{bf16, f16};
use ndarray::{ArrayD, IxDyn};

use super::proto::{tensor_proto::DataLocation, TensorProto};
use crate::error::{Error, Result};

/// The element types qfold reads and writes, with their ONNX `TensorProto.DataType` codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ElemType {
    F32,
    U8,
    I8,
    U16,
    I16,
    I32,
    I64,
    Bool,
    F16,
    F64,
    U32,
    U64,
    BF16,
}

impl ElemType {
    /// The element type for an ONNX data type code, if qfold handles it.
    pub fn from_onnx(code: i32) -> Option<ElemType> {
        use ElemType::*;
        Some(match code {
            1 => F32,
            2 => U8,
            3 => I8,
            4 => U16,
            5 => I16,
            6 => I32,
            7 => I64,
            9 => Bool,
            10 => F16,
            11 => F64,
            12 => U32,
            13 => U64,
            16 => BF16,
            _ => return None,
        })
    }

    /// The ONNX data type code.
    pub fn onnx_code(self) -> i32 {
        use ElemType::*;
        match self {
            F32 => 1,
            U8 => 2,
            I8 => 3,
            U16 => 4,
            I16 => 5,
            I32 => 6,
            I64 => 7,
            Bool => 9,
            F16 => 10,
            F64 => 11,
            U32 => 12,
            U64 => 13,
            BF16 => 16,
        }
    }

    /// Bytes per element in `raw_data`.
    pub fn size(self) -> usize {
        use ElemType::*;
        match self {
            U8 | I8 | Bool => 1,
            U16 | I16 | F16 | BF16 => 2,
            F32 | I32 | U32 => 4,
            F64 | I64 | U64 => 8,
        }
    }

    /// True for the floating-point types.
    pub fn is_float(self) -> bool {
        matches!(
            self,
            ElemType::F32 | ElemType::F64 | ElemType::F16 | ElemType::BF16
        )
    }

    /// The ONNX spelling (`float`, `uint8`, ...).
    pub fn name(self) -> &'static str {
        use ElemType::*;
        match self {
            F32 => "float",
            U8 => "uint8",
            I8 => "int8",
            U16 => "uint16",
            I16 => "int16",
            I32 => "int32",
            I64 => "int64",
            Bool => "bool",
            F16 => "float16",
            F64 => "double",
            U32 => "uint32",
            U64 => "uint64",
            BF16 => "bfloat16",
        }
    }
}

/// The name of an ONNX data type code, known to qfold or not.
pub fn onnx_type_name(code: i32) -> String {
    match ElemType::from_onnx(code) {
        Some(t) => t.name().to_string(),
        None => match code {
            0 => "undefined".into(),
            8 => "string".into(),
            14 => "complex64".into(),
            15 => "complex128".into(),
            17..=20 => "float8".into(),
            21 => "uint4".into(),
            22 => "int4".into(),
            23 => "float4e2m1".into(),
            c => format!("unknown data type {c}"),
        },
    }
}

/// A dense tensor of one of the element types qfold handles.
#[derive(Debug, Clone, PartialEq)]
pub enum TensorData {
    F32(ArrayD<f32>),
    F64(ArrayD<f64>),
    F16(ArrayD<f16>),
    BF16(ArrayD<bf16>),
    I8(ArrayD<i8>),
    U8(ArrayD<u8>),
    I16(ArrayD<i16>),
    U16(ArrayD<u16>),
    I32(ArrayD<i32>),
    I64(ArrayD<i64>),
    U32(ArrayD<u32>),
    U64(ArrayD<u64>),
    Bool(ArrayD<bool>),
}

/// Applies `$body` to the array inside any `TensorData` variant, bound as `$a`.
macro_rules! with_array {
    ($t:expr, $a:ident => $body:expr) => {
        match $t {
            TensorData::F32($a) => $body,
            TensorData::F64($a) => $body,
            TensorData::F16($a) => $body,
            TensorData::BF16($a) => $body,
            TensorData::I8($a) => $body,
            TensorData::U8($a) => $body,
            TensorData::I16($a) => $body,
            TensorData::U16($a) => $body,
            TensorData::I32($a) => $body,
            TensorData::I64($a) => $body,
            TensorData::U32($a) => $body,
            TensorData::U64($a) => $body,
            TensorData::Bool($a) => $body,
        }
    };
}
#[allow(unused_imports)]
pub(crate) use with_array;

/// Element types with a fixed little-endian byte layout.
trait Le: Copy + Default {
    const SIZE: usize;
    fn from_le(b: &[u8]) -> Self;
    fn write_le(self, out: &mut Vec<u8>);
}

macro_rules! le_num {
    ($($t:ty),*) => {$(
        impl Le for $t {
            const SIZE: usize = std::mem::size_of::<$t>();
            fn from_le(b: &[u8]) -> Self {
                let mut a = [0u8; std::mem::size_of::<$t>()];
                a.copy_from_slice(b);
                <$t>::from_le_bytes(a)
            }
            fn write_le(self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_le_bytes());
            }
        }
    )*};
}
le_num!(f32, f64, i8, u8, i16, u16, i32, i64, u32, u64);

impl Le for f16 {
    const SIZE: usize = 2;
    fn from_le(b: &[u8]) -> Self {
        f16::from_bits(<u16 as Le>::from_le(b))
    }
    fn write_le(self, out: &mut Vec<u8>) {
        self.to_bits().write_le(out)
    }
}

impl Le for bf16 {
    const SIZE: usize = 2;
    fn from_le(b: &[u8]) -> Self {
        bf16::from_bits(<u16 as Le>::from_le(b))
    }
    fn write_le(self, out: &mut Vec<u8>) {
        self.to_bits().write_le(out)
    }
}

impl Le for bool {
    const SIZE: usize = 1;
    fn from_le(b: &[u8]) -> Self {
        b[0] != 0
    }
    fn write_le(self, out: &mut Vec<u8>) {
        out.push(self as u8)
    }
}

/// The shape of a TensorProto as `usize`s with its element count, refusing negative dims and
/// overflowing products.
pub fn proto_shape(t: &TensorProto) -> Result<(Vec<usize>, usize)> {
    let mut shape = Vec::with_capacity(t.dims.len());
    let mut count: usize = 1;
    for &d in &t.dims {
        let d = usize::try_from(d)
            .map_err(|_| Error::tensor(&t.name, format!("negative dimension {d}")))?;
        count = count
            .checked_mul(d)
            .ok_or_else(|| Error::tensor(&t.name, "element count overflows"))?;
        shape.push(d);
    }
    Ok((shape, count))
}

fn decode_raw<T: Le>(name: &str, raw: &[u8], count: usize) -> Result<Vec<T>> {
    let want = count.checked_mul(T::SIZE);
    if want != Some(raw.len()) {
        return Err(Error::tensor(
            name,
            format!(
                "raw_data holds {} bytes, the shape needs {} elements of {} bytes",
                raw.len(),
                count,
                T::SIZE
            ),
        ));
    }
    Ok(raw.chunks_exact(T::SIZE).map(T::from_le).collect())
}

fn check_len(name: &str, field: &str, len: usize, count: usize) -> Result<()> {
    if len != count {
        return Err(Error::tensor(
            name,
            format!("{field} holds {len} values, the shape needs {count}"),
        ));
    }
    Ok(())
}

fn typed_from_i32<T>(
    name: &str,
    data: &[i32],
    count: usize,
    conv: impl Fn(i32) -> Option<T>,
) -> Result<Vec<T>> {
    check_len(name, "int32_data", data.len(), count)?;
    data.iter()
        .map(|&v| {
            conv(v).ok_or_else(|| Error::tensor(name, format!("int32_data value {v} out of range")))
        })
        .collect()
}

fn to_array<T>(name: &str, shape: Vec<usize>, v: Vec<T>) -> Result<ArrayD<T>> {
    ArrayD::from_shape_vec(IxDyn(&shape), v).map_err(|e| Error::tensor(name, e.to_string()))
}

fn unsupported_type(t: &TensorProto) -> Error {
    Error::tensor(
        &t.name,
        format!(
            "data type {} ({}) is not supported",
            t.data_type,
            onnx_type_name(t.data_type)
        ),
    )
}

/// Checks, without decoding, that a tensor's data fits its type and shape: a data type qfold
/// handles (or string), non-negative dims, and exactly as many `raw_data` bytes or typed values
/// as the shape needs. External data must have been resolved (`io::load` does so).
pub fn check_proto(t: &TensorProto) -> Result<()> {
    let name = t.name.as_str();
    if t.data_location.value() == DataLocation::EXTERNAL as i32 {
        return Err(Error::ExternalData {
            tensor: name.into(),
            reason: "data is still external (not loaded from its file)".into(),
        });
    }
    if t.segment.is_some() {
        return Err(Error::tensor(name, "segmented tensors are not supported"));
    }
    let (_, count) = proto_shape(t)?;
    const STRING: i32 = 8;
    if t.data_type == STRING {
        return check_len(name, "string_data", t.string_data.len(), count);
    }
    let ty = ElemType::from_onnx(t.data_type).ok_or_else(|| unsupported_type(t))?;
    if !t.raw_data.is_empty() || count == 0 {
        if count.checked_mul(ty.size()) != Some(t.raw_data.len()) {
            return Err(Error::tensor(
                name,
                format!(
                    "raw_data holds {} bytes, the shape needs {} elements of {} bytes",
                    t.raw_data.len(),
                    count,
                    ty.size()
                ),
            ));
        }
        return Ok(());
    }
    let (field, len) = match ty {
        ElemType::F32 => ("float_data", t.float_data.len()),
        ElemType::F64 => ("double_data", t.double_data.len()),
        ElemType::I64 => ("int64_data", t.int64_data.len()),
        ElemType::U32 | ElemType::U64 => ("uint64_data", t.uint64_data.len()),
        _ => ("int32_data", t.int32_data.len()),
    };
    check_len(name, field, len, count)
}

impl TensorData {
    /// Decodes a TensorProto whose data is in memory (raw_data or typed fields). External data
    /// must have been resolved first (`io::load` does so).
    pub fn from_proto(t: &TensorProto) -> Result<TensorData> {
        let name = t.name.as_str();
        if t.data_location.value() == DataLocation::EXTERNAL as i32 {
            return Err(Error::ExternalData {
                tensor: name.into(),
                reason: "data is still external (not loaded from its file)".into(),
            });
        }
        if t.segment.is_some() {
            return Err(Error::tensor(name, "segmented tensors are not supported"));
        }
        let ty = ElemType::from_onnx(t.data_type).ok_or_else(|| unsupported_type(t))?;
        let (shape, count) = proto_shape(t)?;
        let raw = !t.raw_data.is_empty() || count == 0;
        macro_rules! raw_or {
            ($variant:ident, $typed:expr) => {{
                let v = if raw {
                    decode_raw(name, &t.raw_data, count)?
                } else {
                    $typed
                };
                TensorData::$variant(to_array(name, shape, v)?)
            }};
        }
        Ok(match ty {
            ElemType::F32 => raw_or!(F32, {
                check_len(name, "float_data", t.float_data.len(), count)?;
                t.float_data.clone()
            }),
            ElemType::F64 => raw_or!(F64, {
                check_len(name, "double_data", t.double_data.len(), count)?;
                t.double_data.clone()
            }),
            ElemType::I64 => raw_or!(I64, {
                check_len(name, "int64_data", t.int64_data.len(), count)?;
                t.int64_data.clone()
            }),
            ElemType::I32 => raw_or!(I32, {
                check_len(name, "int32_data", t.int32_data.len(), count)?;
                t.int32_data.clone()
            }),
            ElemType::I8 => raw_or!(
                I8,
                typed_from_i32(name, &t.int32_data, count, |v| i8::try_from(v).ok())?
            ),
            ElemType::U8 => raw_or!(
                U8,
                typed_from_i32(name, &t.int32_data, count, |v| u8::try_from(v).ok())?
            ),
            ElemType::I16 => raw_or!(
                I16,
                typed_from_i32(name, &t.int32_data, count, |v| i16::try_from(v).ok())?
            ),
            ElemType::U16 => raw_or!(
                U16,
                typed_from_i32(name, &t.int32_data, count, |v| u16::try_from(v).ok())?
            ),
            ElemType::Bool => raw_or!(
                Bool,
                typed_from_i32(name, &t.int32_data, count, |v| Some(v != 0))?
            ),
            ElemType::F16 => raw_or!(
                F16,
                typed_from_i32(name, &t.int32_data, count, |v| u16::try_from(v)
                    .ok()
                    .map(f16::from_bits))?
            ),
            ElemType::BF16 => raw_or!(
                BF16,
                typed_from_i32(name, &t.int32_data, count, |v| u16::try_from(v)
                    .ok()
                    .map(bf16::from_bits))?
            ),
            ElemType::U32 => raw_or!(U32, {
                check_len(name, "uint64_data", t.uint64_data.len(), count)?;
                t.uint64_data
                    .iter()
                    .map(|&v| {
                        u32::try_from(v).map_err(|_| {
                            Error::tensor(name, format!("uint64_data value {v} out of range"))
                        })
                    })
                    .collect::<Result<Vec<_>>>()?
            }),
            ElemType::U64 => raw_or!(U64, {
                check_len(name, "uint64_data", t.uint64_data.len(), count)?;
                t.uint64_data.clone()
            }),
        })
    }

    /// Encodes as a TensorProto named `name`, data in little-endian `raw_data`.
    pub fn to_proto(&self, name: &str) -> TensorProto {
        let mut t = TensorProto::new();
        t.name = name.to_string();
        t.data_type = self.elem_type().onnx_code();
        t.dims = self.shape().iter().map(|&d| d as i64).collect();
        let mut raw = Vec::with_capacity(self.len() * self.elem_type().size());
        with_array!(self, a => a.iter().for_each(|v| v.write_le(&mut raw)));
        t.raw_data = raw;
        t
    }

    /// The element type.
    pub fn elem_type(&self) -> ElemType {
        match self {
            TensorData::F32(_) => ElemType::F32,
            TensorData::F64(_) => ElemType::F64,
            TensorData::F16(_) => ElemType::F16,
            TensorData::BF16(_) => ElemType::BF16,
            TensorData::I8(_) => ElemType::I8,
            TensorData::U8(_) => ElemType::U8,
            TensorData::I16(_) => ElemType::I16,
            TensorData::U16(_) => ElemType::U16,
            TensorData::I32(_) => ElemType::I32,
            TensorData::I64(_) => ElemType::I64,
            TensorData::U32(_) => ElemType::U32,
            TensorData::U64(_) => ElemType::U64,
            TensorData::Bool(_) => ElemType::Bool,
        }
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        with_array!(self, a => a.shape())
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        with_array!(self, a => a.len())
    }

    /// True when the tensor has no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every element as f64 (exact for all types but u64/i64 beyond 2^53).
    pub fn to_f64(&self) -> ArrayD<f64> {
        match self {
            TensorData::F32(a) => a.mapv(f64::from),
            TensorData::F64(a) => a.clone(),
            TensorData::F16(a) => a.mapv(f64::from),
            TensorData::BF16(a) => a.mapv(f64::from),
            TensorData::I8(a) => a.mapv(f64::from),
            TensorData::U8(a) => a.mapv(f64::from),
            TensorData::I16(a) => a.mapv(f64::from),
            TensorData::U16(a) => a.mapv(f64::from),
            TensorData::I32(a) => a.mapv(f64::from),
            TensorData::I64(a) => a.mapv(|v| v as f64),
            TensorData::U32(a) => a.mapv(f64::from),
            TensorData::U64(a) => a.mapv(|v| v as f64),
            TensorData::Bool(a) => a.mapv(|v| v as u8 as f64),
        }
    }

    /// Stores f64 values in a floating-point element type (rounding to nearest).
    pub fn from_f64(a: ArrayD<f64>, ty: ElemType) -> Result<TensorData> {
        Ok(match ty {
            ElemType::F32 => TensorData::F32(a.mapv(|v| v as f32)),
            ElemType::F64 => TensorData::F64(a),
            ElemType::F16 => TensorData::F16(a.mapv(f16::from_f64)),
            ElemType::BF16 => TensorData::BF16(a.mapv(bf16::from_f64)),
            other => {
                return Err(Error::Usage(format!(
                    "cannot store floating-point values as {}",
                    other.name()
                )))
            }
        })
    }

    /// Every element as i64 (for shapes, axes and other integer parameters).
    pub fn to_i64(&self) -> Option<Vec<i64>> {
        Some(match self {
            TensorData::I64(a) => a.iter().copied().collect(),
            TensorData::I32(a) => a.iter().map(|&v| v as i64).collect(),
            TensorData::I16(a) => a.iter().map(|&v| v as i64).collect(),
            TensorData::I8(a) => a.iter().map(|&v| v as i64).collect(),
            TensorData::U8(a) => a.iter().map(|&v| v as i64).collect(),
            TensorData::U16(a) => a.iter().map(|&v| v as i64).collect(),
            TensorData::U32(a) => a.iter().map(|&v| v as i64).collect(),
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn raw_round_trip_every_type() {
        let cases = vec![
            TensorData::F32(array![[1.5f32, -2.0], [0.0, 3.25]].into_dyn()),
            TensorData::F64(array![1.0f64, -1e300].into_dyn()),
            TensorData::F16(array![f16::from_f32(0.5), f16::from_f32(-65504.0)].into_dyn()),
            TensorData::BF16(array![bf16::from_f32(1.0), bf16::from_f32(-3.0e38)].into_dyn()),
            TensorData::I8(array![-128i8, 127].into_dyn()),
            TensorData::U8(array![0u8, 255].into_dyn()),
            TensorData::I32(array![i32::MIN, i32::MAX].into_dyn()),
            TensorData::I64(array![i64::MIN, 7].into_dyn()),
            TensorData::Bool(array![true, false].into_dyn()),
        ];
        for c in cases {
            let p = c.to_proto("t");
            assert_eq!(TensorData::from_proto(&p).unwrap(), c);
        }
    }

    #[test]
    fn raw_data_is_little_endian() {
        let p = TensorData::F32(array![1.0f32].into_dyn()).to_proto("x");
        assert_eq!(p.raw_data, vec![0, 0, 0x80, 0x3f]);
        let p = TensorData::I64(array![258i64].into_dyn()).to_proto("x");
        assert_eq!(p.raw_data, vec![2, 1, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn typed_fields() {
        let mut t = TensorProto::new();
        t.name = "h".into();
        t.data_type = ElemType::F16.onnx_code();
        t.dims = vec![2];
        t.int32_data = vec![0x3c00, 0xc000]; // 1.0, -2.0
        let d = TensorData::from_proto(&t).unwrap();
        assert_eq!(d.to_f64().into_raw_vec_and_offset().0, vec![1.0, -2.0]);

        t.data_type = ElemType::U8.onnx_code();
        t.int32_data = vec![3, 300];
        let e = TensorData::from_proto(&t).unwrap_err().to_string();
        assert!(e.contains("'h'") && e.contains("300"), "{e}");

        t.data_type = ElemType::F32.onnx_code();
        t.int32_data.clear();
        t.float_data = vec![1.0];
        let e = TensorData::from_proto(&t).unwrap_err().to_string();
        assert!(
            e.contains("float_data holds 1 values, the shape needs 2"),
            "{e}"
        );
    }

    #[test]
    fn bad_raw_length_and_type() {
        let mut t = TensorData::F32(array![1.0f32, 2.0].into_dyn()).to_proto("w");
        t.raw_data.pop();
        let e = TensorData::from_proto(&t).unwrap_err().to_string();
        assert!(e.contains("'w'") && e.contains("7 bytes"), "{e}");
        t.data_type = 8;
        let e = TensorData::from_proto(&t).unwrap_err().to_string();
        assert!(e.contains("string"), "{e}");
        t.data_type = 1;
        t.dims = vec![-1];
        assert!(TensorData::from_proto(&t).is_err());
    }

    #[test]
    fn check_proto_agrees_with_from_proto() {
        let good = TensorData::I8(array![1i8, 2, 3].into_dyn()).to_proto("q");
        assert!(check_proto(&good).is_ok());
        let mut t = good.clone();
        t.raw_data.push(0);
        let e = check_proto(&t).unwrap_err().to_string();
        assert!(e.contains("'q'") && e.contains("4 bytes"), "{e}");
        let mut t = good.clone();
        t.data_type = 999;
        let e = check_proto(&t).unwrap_err().to_string();
        assert!(e.contains("'q'") && e.contains("999"), "{e}");
        let mut t = good.clone();
        t.raw_data.clear();
        t.int32_data = vec![1, 2];
        let e = check_proto(&t).unwrap_err().to_string();
        assert!(
            e.contains("int32_data holds 2 values, the shape needs 3"),
            "{e}"
        );
        let mut t = good;
        t.data_type = 8;
        t.raw_data.clear();
        t.string_data = vec![b"a".to_vec(); 3];
        assert!(check_proto(&t).is_ok());
        t.dims = vec![i64::MAX, 4];
        assert!(check_proto(&t)
            .unwrap_err()
            .to_string()
            .contains("overflows"));
    }
}
