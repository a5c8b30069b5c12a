//! Tensors as EtLlm sees them: element types, shapes from a method's metadata, owned host
//! buffers handed to the runtime as inputs, borrowed views of its outputs, and the values
//! that constant methods return ([`ConstValue`]).

use crate::error::{Error, Result};

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
}

impl HostData {
    fn len(&self) -> usize {
        match self {
            HostData::F32(v) => v.len(),
            HostData::I64(v) => v.len(),
            HostData::I32(v) => v.len(),
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
}

/// Elements of an output tensor, borrowed from the runtime.
#[derive(Debug, Clone, Copy)]
pub enum TensorData<'a> {
    /// f32 elements.
    F32(&'a [f32]),
    /// i64 elements.
    I64(&'a [i64]),
    /// i32 elements.
    I32(&'a [i32]),
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
