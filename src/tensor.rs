//! Tensors as EtLlm sees them: element types, shapes from a method's metadata, owned host
//! buffers handed to the runtime as inputs, borrowed views of its outputs, and the values
//! that constant methods return ([`ConstValue`]).

use crate::error::{Error, Result};

/// The half-precision element types of [`HostData`] and [`TensorData`] (from the `half`
/// crate).
pub use half::{bf16, f16};

/// Element type of a tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DType {
    /// 32-bit float.
    F32,
    /// 16-bit float.
    F16,
    /// bfloat16.
    BF16,
    /// 64-bit float.
    F64,
    /// 64-bit signed integer.
    I64,
    /// 32-bit signed integer.
    I32,
    /// 16-bit signed integer.
    I16,
    /// 8-bit signed integer.
    I8,
    /// 8-bit unsigned integer.
    U8,
    /// Boolean, one byte each.
    Bool,
    /// Any other ExecuTorch scalar type.
    Other,
}

impl DType {
    /// Size of one element in bytes (0 for [`DType::Other`]).
    pub fn size(self) -> usize {
        match self {
            DType::F64 | DType::I64 => 8,
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 | DType::I16 => 2,
            DType::I8 | DType::U8 | DType::Bool => 1,
            DType::Other => 0,
        }
    }
}

/// Shape and element type of one method input or output, as recorded in the program.
/// For a dynamic-shape input, `sizes` is the upper bound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    /// Element type.
    pub dtype: DType,
    /// Sizes, outermost first.
    pub sizes: Vec<usize>,
}

impl TensorSpec {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.sizes.iter().product()
    }
}

/// What a method argument or result is.
#[derive(Debug, Clone, PartialEq)]
pub enum ValueSpec {
    /// A tensor.
    Tensor(TensorSpec),
    /// A non-tensor value (int, bool, list, ...), named by its kind.
    Other(String),
}

impl ValueSpec {
    /// The tensor spec, if this is a tensor.
    pub fn tensor(&self) -> Option<&TensorSpec> {
        match self {
            ValueSpec::Tensor(t) => Some(t),
            ValueSpec::Other(_) => None,
        }
    }
}

/// Metadata of one method of the program.
#[derive(Debug, Clone, PartialEq)]
pub struct MethodInfo {
    /// Method name, e.g. `forward`.
    pub name: String,
    /// One entry per input.
    pub inputs: Vec<ValueSpec>,
    /// One entry per output.
    pub outputs: Vec<ValueSpec>,
}

/// Element storage of a [`HostTensor`].
#[derive(Debug, Clone, PartialEq)]
pub enum HostData {
    /// f32 elements.
    F32(Vec<f32>),
    /// i64 elements.
    I64(Vec<i64>),
    /// i32 elements.
    I32(Vec<i32>),
    /// f16 elements.
    F16(Vec<f16>),
    /// bfloat16 elements.
    BF16(Vec<bf16>),
}

impl HostData {
    fn len(&self) -> usize {
        match self {
            HostData::F32(v) => v.len(),
            HostData::I64(v) => v.len(),
            HostData::I32(v) => v.len(),
            HostData::F16(v) => v.len(),
            HostData::BF16(v) => v.len(),
        }
    }

    /// `len` zeros of a floating-point type (f32, f16 or bf16), for a manager that builds
    /// a float input in the dtype the method declares. `None` for other types.
    pub fn float_zeros(dtype: DType, len: usize) -> Option<Self> {
        match dtype {
            DType::F32 => Some(HostData::F32(vec![0.0; len])),
            DType::F16 => Some(HostData::F16(vec![f16::ZERO; len])),
            DType::BF16 => Some(HostData::BF16(vec![bf16::ZERO; len])),
            _ => None,
        }
    }
}

/// A tensor owned by the host (an IoManager), passed to a method as an input. The runtime
/// reads it in place: its buffer is not copied by EtLlm.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    sizes: Vec<usize>,
    data: HostData,
}

impl HostTensor {
    /// A tensor with the given sizes over `data`; fails when the element count differs.
    pub fn new(sizes: Vec<usize>, data: HostData) -> Result<Self> {
        let numel: usize = sizes.iter().product();
        if numel != data.len() {
            return Err(Error::InvalidArgument(format!(
                "tensor sizes {sizes:?} hold {numel} elements but {} were given",
                data.len()
            )));
        }
        Ok(Self { sizes, data })
    }

    /// Sizes, outermost first.
    pub fn sizes(&self) -> &[usize] {
        &self.sizes
    }

    /// Element type.
    pub fn dtype(&self) -> DType {
        match self.data {
            HostData::F32(_) => DType::F32,
            HostData::I64(_) => DType::I64,
            HostData::I32(_) => DType::I32,
            HostData::F16(_) => DType::F16,
            HostData::BF16(_) => DType::BF16,
        }
    }

    /// The elements.
    pub fn data(&self) -> &HostData {
        &self.data
    }

    /// The elements, for in-place updates. The length cannot change, so the buffer the
    /// runtime reads never moves.
    pub fn data_mut(&mut self) -> HostDataMut<'_> {
        match &mut self.data {
            HostData::F32(v) => HostDataMut::F32(v),
            HostData::I64(v) => HostDataMut::I64(v),
            HostData::I32(v) => HostDataMut::I32(v),
            HostData::F16(v) => HostDataMut::F16(v),
            HostData::BF16(v) => HostDataMut::BF16(v),
        }
    }

    /// Changes the sizes, keeping the buffer; the new sizes must not hold more elements
    /// than the buffer (a shorter view of it is allowed, for dynamic-shape inputs).
    pub fn set_sizes(&mut self, sizes: &[usize]) -> Result<()> {
        let numel: usize = sizes.iter().product();
        if numel > self.data.len() {
            return Err(Error::InvalidArgument(format!(
                "sizes {sizes:?} need {numel} elements but the buffer holds {}",
                self.data.len()
            )));
        }
        self.sizes.clear();
        self.sizes.extend_from_slice(sizes);
        Ok(())
    }

    /// Number of elements the current sizes cover.
    pub fn numel(&self) -> usize {
        self.sizes.iter().product()
    }

    /// A view of the elements the current sizes cover, to pass as a method input.
    pub fn view(&self) -> TensorView<'_> {
        let n = self.numel();
        TensorView {
            sizes: self.sizes.clone(),
            data: match &self.data {
                HostData::F32(v) => TensorData::F32(&v[..n]),
                HostData::I64(v) => TensorData::I64(&v[..n]),
                HostData::I32(v) => TensorData::I32(&v[..n]),
                HostData::F16(v) => TensorData::F16(&v[..n]),
                HostData::BF16(v) => TensorData::BF16(&v[..n]),
            },
        }
    }
}

/// Mutable access to a [`HostTensor`]'s elements.
#[derive(Debug)]
pub enum HostDataMut<'a> {
    /// f32 elements.
    F32(&'a mut [f32]),
    /// i64 elements.
    I64(&'a mut [i64]),
    /// i32 elements.
    I32(&'a mut [i32]),
    /// f16 elements.
    F16(&'a mut [f16]),
    /// bfloat16 elements.
    BF16(&'a mut [bf16]),
}

impl HostDataMut<'_> {
    /// Writes `values` (converted, with rounding to nearest) into the first elements of a
    /// floating-point buffer; fails for an integer buffer or when `values` is longer.
    pub fn write_floats(&mut self, offset: usize, values: &[f32]) -> Result<()> {
        let len = match self {
            HostDataMut::F32(b) => b.len(),
            HostDataMut::F16(b) => b.len(),
            HostDataMut::BF16(b) => b.len(),
            _ => {
                return Err(Error::IoManager(
                    "a float was written to an integer input".into(),
                ))
            }
        };
        if offset.checked_add(values.len()).is_none_or(|end| end > len) {
            return Err(Error::IoManager(format!(
                "{} floats at {offset} do not fit an input of {len}",
                values.len()
            )));
        }
        match self {
            HostDataMut::F32(b) => b[offset..offset + values.len()].copy_from_slice(values),
            HostDataMut::F16(b) => {
                for (o, &v) in b[offset..].iter_mut().zip(values) {
                    *o = f16::from_f32(v);
                }
            }
            HostDataMut::BF16(b) => {
                for (o, &v) in b[offset..].iter_mut().zip(values) {
                    *o = bf16::from_f32(v);
                }
            }
            _ => unreachable!("checked above"),
        }
        Ok(())
    }
}

/// Elements of a tensor view. Method outputs in f16 or bf16 reach managers widened to
/// [`TensorData::F32`] (the conversion is exact, and done once per step into buffers the
/// runner reuses), so that logits and cache rows are read one way whatever the export's
/// float type; inputs may be any of these types.
#[derive(Debug, Clone, Copy)]
pub enum TensorData<'a> {
    /// f32 elements.
    F32(&'a [f32]),
    /// i64 elements.
    I64(&'a [i64]),
    /// i32 elements.
    I32(&'a [i32]),
    /// f16 elements (inputs only; see above).
    F16(&'a [f16]),
    /// bfloat16 elements (inputs only; see above).
    BF16(&'a [bf16]),
    /// Elements of another type, as raw bytes.
    Bytes(DType, &'a [u8]),
}

/// A tensor borrowed for the duration of a step: a method output (borrowed from the
/// runtime until the next method call), or an input a KV-cache manager hands over (read
/// in place, without a copy).
#[derive(Debug, Clone)]
pub struct TensorView<'a> {
    /// Sizes, outermost first.
    pub sizes: Vec<usize>,
    /// The elements.
    pub data: TensorData<'a>,
}

impl<'a> TensorView<'a> {
    /// Element type.
    pub fn dtype(&self) -> DType {
        match self.data {
            TensorData::F32(_) => DType::F32,
            TensorData::I64(_) => DType::I64,
            TensorData::I32(_) => DType::I32,
            TensorData::F16(_) => DType::F16,
            TensorData::BF16(_) => DType::BF16,
            TensorData::Bytes(d, _) => d,
        }
    }

    /// The elements as f32, if that is their type.
    pub fn as_f32(&self) -> Option<&'a [f32]> {
        match self.data {
            TensorData::F32(v) => Some(v),
            _ => None,
        }
    }
}

/// Widens f16 elements to f32 into `buf` (grown when too short, never shrunk, so a
/// buffer reused from step to step is allocated once) and returns the widened elements.
pub(crate) fn widen_f16<'b>(src: &[f16], buf: &'b mut Vec<f32>) -> &'b [f32] {
    if buf.len() < src.len() {
        buf.resize(src.len(), 0.0);
    }
    let out = &mut buf[..src.len()];
    half::slice::HalfFloatSliceExt::convert_to_f32_slice(src, out);
    out
}

/// Widens bf16 elements to f32 into `buf`, as [`widen_f16`] does.
pub(crate) fn widen_bf16<'b>(src: &[bf16], buf: &'b mut Vec<f32>) -> &'b [f32] {
    if buf.len() < src.len() {
        buf.resize(src.len(), 0.0);
    }
    let out = &mut buf[..src.len()];
    // A bf16 is the top half of an f32: the shift is exact and vectorizes.
    for (o, &v) in out.iter_mut().zip(src) {
        *o = f32::from_bits((v.to_bits() as u32) << 16);
    }
    out
}

/// The value a constant method (one without inputs, such as `get_max_seq_len`) returned.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum ConstValue {
    /// An integer.
    Int(i64),
    /// A boolean.
    Bool(bool),
    /// A float.
    Double(f64),
    /// A list of integers (also what a Python list of ints exports as).
    IntList(Vec<i64>),
    /// An integer tensor, flattened in row-major order.
    IntTensor {
        /// Sizes, outermost first.
        sizes: Vec<usize>,
        /// Elements.
        data: Vec<i64>,
    },
    /// A float tensor, flattened in row-major order.
    FloatTensor {
        /// Sizes, outermost first.
        sizes: Vec<usize>,
        /// Elements.
        data: Vec<f32>,
    },
    /// Anything else, named by its kind.
    Other(String),
}

impl ConstValue {
    /// The value as integers: an int, a bool, a list or an integer tensor (flattened).
    pub fn as_ints(&self) -> Option<Vec<i64>> {
        match self {
            ConstValue::Int(v) => Some(vec![*v]),
            ConstValue::Bool(b) => Some(vec![*b as i64]),
            ConstValue::IntList(v) | ConstValue::IntTensor { data: v, .. } => Some(v.clone()),
            _ => None,
        }
    }

    /// The value as one integer, if it is exactly one.
    pub fn as_int(&self) -> Option<i64> {
        match self.as_ints()?.as_slice() {
            [v] => Some(*v),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn widening_bf16_is_exact_for_every_finite_bit_pattern_class() {
        let values = [
            0.0f32,
            -0.0,
            1.0,
            -2.5,
            3.0e38,
            -1.0e-38,
            f32::INFINITY,
            0.1,
        ];
        let src: Vec<bf16> = values.iter().map(|&v| bf16::from_f32(v)).collect();
        let mut buf = Vec::new();
        let out = widen_bf16(&src, &mut buf);
        for (o, s) in out.iter().zip(&src) {
            assert_eq!(o.to_bits(), s.to_f32().to_bits());
        }
        assert!(widen_bf16(&[bf16::NAN], &mut buf)[0].is_nan());
    }

    #[test]
    fn widening_f16_matches_the_half_crate_conversion() {
        let src: Vec<f16> = (0..=u16::MAX).step_by(7).map(f16::from_bits).collect();
        let mut buf = Vec::new();
        let out = widen_f16(&src, &mut buf);
        for (o, s) in out.iter().zip(&src) {
            let expected = s.to_f32();
            assert!(o.to_bits() == expected.to_bits() || (o.is_nan() && expected.is_nan()));
        }
    }

    #[test]
    fn widening_reuses_the_buffer_once_it_is_large_enough() {
        let mut buf = Vec::new();
        widen_bf16(&vec![bf16::ONE; 1000], &mut buf);
        let ptr = buf.as_ptr();
        let out = widen_bf16(&[bf16::from_f32(2.0); 10], &mut buf);
        assert_eq!(out, &[2.0; 10]);
        widen_bf16(&vec![bf16::ONE; 1000], &mut buf);
        assert_eq!(buf.as_ptr(), ptr, "the buffer was reallocated");
    }

    #[test]
    fn writing_floats_rounds_into_half_precision_inputs() {
        let mut t =
            HostTensor::new(vec![3], HostData::float_zeros(DType::BF16, 3).unwrap()).unwrap();
        t.data_mut().write_floats(1, &[1.0, 0.3]).unwrap();
        let HostData::BF16(v) = t.data() else {
            panic!("not bf16")
        };
        assert_eq!(v, &[bf16::ZERO, bf16::ONE, bf16::from_f32(0.3)]);
        assert!(t.data_mut().write_floats(2, &[1.0, 2.0]).is_err());
        let mut ints = HostTensor::new(vec![1], HostData::I64(vec![0])).unwrap();
        assert!(ints.data_mut().write_floats(0, &[1.0]).is_err());
    }
}
