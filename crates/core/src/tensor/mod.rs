//! The tensor layer: element types, weight data in every stored format (float and block-
//! quantized), conversions between the formats, and the weight matrix with its layout.
//!
//! Everything above it stands on this module: `checkpoint` produces these types from files,
//! `kernels` computes with them, the models hold them. It depends on nothing of theirs.

pub mod quantize;
pub mod widen;

use crate::error::{Error, Result};
use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

/// Element type of a stored tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    /// IEEE binary32.
    F32,
    /// IEEE binary16.
    F16,
    /// bfloat16 (the upper half of an f32).
    BF16,
    /// IEEE binary64.
    F64,
    /// 64-bit signed integer.
    I64,
    /// 32-bit signed integer.
    I32,
    /// Unsigned byte.
    U8,
    /// Signed byte.
    I8,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::F64 | DType::I64 => 8,
            DType::U8 | DType::I8 => 1,
        }
    }
    /// The safetensors name of the dtype.
    pub fn safetensors_name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::F64 => "F64",
            DType::I64 => "I64",
            DType::I32 => "I32",
            DType::U8 => "U8",
            DType::I8 => "I8",
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::F64 => "f64",
            DType::I64 => "i64",
            DType::I32 => "i32",
            DType::U8 => "u8",
            DType::I8 => "i8",
        };
        f.write_str(s)
    }
}

impl serde::Serialize for DType {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

/// A read-only slice that keeps its backing memory (a file map or a vector) alive.
///
/// This is how weights stay memory-mapped: a model holds `Shared` views into the checkpoint's
/// map, and the map lives as long as any view does.
pub struct Shared<T> {
    _owner: Arc<dyn Send + Sync>,
    ptr: *const T,
    len: usize,
}

// SAFETY: the data behind `ptr` is immutable for the lifetime of `_owner`, which is Send + Sync.
unsafe impl<T: Sync> Send for Shared<T> {}
// SAFETY: as above; only shared references are ever handed out.
unsafe impl<T: Sync> Sync for Shared<T> {}

impl<T> Clone for Shared<T> {
    fn clone(&self) -> Self {
        Shared {
            _owner: self._owner.clone(),
            ptr: self.ptr,
            len: self.len,
        }
    }
}

impl<T> Deref for Shared<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: ptr/len describe a live, aligned, immutable region owned by `_owner`.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl<T> fmt::Debug for Shared<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Shared(len={})", self.len)
    }
}

impl<T> Shared<T> {
    /// A sub-range sharing the same backing memory.
    pub fn slice(&self, start: usize, len: usize) -> Shared<T> {
        assert!(start + len <= self.len, "slice out of range");
        Shared {
            _owner: self._owner.clone(),
            // SAFETY: in bounds (checked above).
            ptr: unsafe { self.ptr.add(start) },
            len,
        }
    }
}

impl<T> Shared<T> {
    /// A view of `len` elements at `ptr` inside memory that `owner` keeps alive.
    ///
    /// # Safety
    /// `ptr .. ptr + len` must be an aligned, initialised region that stays valid and
    /// unmodified for as long as `owner` lives.
    pub unsafe fn from_owner(owner: Arc<dyn Send + Sync>, ptr: *const T, len: usize) -> Self {
        Shared {
            _owner: owner,
            ptr,
            len,
        }
    }
}

impl<T: Send + Sync + 'static> Shared<T> {
    /// Wraps an owned vector.
    pub fn from_vec(v: Vec<T>) -> Self {
        let v = Arc::new(v);
        let ptr = v.as_ptr();
        let len = v.len();
        Shared {
            _owner: v,
            ptr,
            len,
        }
    }
}

/// The formats weight matrices can be used in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightFormat {
    /// IEEE binary32.
    F32,
    /// IEEE binary16.
    F16,
    /// bfloat16.
    BF16,
    /// int8 blocks of 32 with an f32 scale (Q8_0-like; 9 bits per weight).
    Int8,
    /// 4-bit blocks of 32 with an f32 scale (Q4_0-like; 5 bits per weight).
    Q4,
}

impl std::str::FromStr for WeightFormat {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "f32" => WeightFormat::F32,
            "f16" => WeightFormat::F16,
            "bf16" => WeightFormat::BF16,
            "int8" | "q8" | "q8_0" => WeightFormat::Int8,
            "q4" | "q4_0" | "int4" => WeightFormat::Q4,
            _ => {
                return Err(Error::bad(format!(
                    "unknown weight format '{s}' (use f32, f16, bf16, int8 or q4)"
                )))
            }
        })
    }
}

impl WeightFormat {
    /// Converts float data to this format (owned). Quantized formats need rows whose length
    /// is a multiple of [`QBLOCK`]; `None` when they are not.
    pub fn convert(self, data: &FloatData, row_len: usize) -> Option<FloatData> {
        let same = matches!(
            (self, data),
            (WeightFormat::F32, FloatData::F32(_))
                | (WeightFormat::F16, FloatData::F16(_))
                | (WeightFormat::BF16, FloatData::BF16(_))
                | (WeightFormat::Int8, FloatData::Q8(_))
                | (WeightFormat::Q4, FloatData::Q4(_))
        );
        if same {
            return Some(data.clone());
        }
        let v = data.to_f32();
        Some(match self {
            WeightFormat::F32 => FloatData::F32(Shared::from_vec(v)),
            WeightFormat::F16 => FloatData::F16(Shared::from_vec(
                v.iter()
                    .map(|x| half::f16::from_f32(*x).to_bits())
                    .collect(),
            )),
            WeightFormat::BF16 => FloatData::BF16(Shared::from_vec(
                v.iter()
                    .map(|x| half::bf16::from_f32(*x).to_bits())
                    .collect(),
            )),
            WeightFormat::Int8 | WeightFormat::Q4 => {
                if !row_len.is_multiple_of(QBLOCK) {
                    return None;
                }
                if self == WeightFormat::Int8 {
                    FloatData::Q8(quantize::quantize_q8(&v))
                } else {
                    FloatData::Q4(quantize::quantize_q4(&v))
                }
            }
        })
    }
}

/// Elements per quantization block (one scale each).
pub const QBLOCK: usize = 32;

/// Block-quantized weights: one f32 scale per [`QBLOCK`] consecutive elements.
#[derive(Debug, Clone)]
pub struct QBlocks {
    /// Number of elements.
    pub len: usize,
    /// Packed values: one `i8` per element (int8), or two 4-bit values per byte (q4: byte `j`
    /// of a block holds element `j` in its low nibble and element `j + 16` in its high one,
    /// each stored as `q + 8` for `q` in -8..=7).
    pub q: Shared<u8>,
    /// Scale of each block.
    pub d: Shared<f32>,
}

/// Weight data in one of the formats the kernels read directly.
#[derive(Debug, Clone)]
pub enum FloatData {
    /// f32 values.
    F32(Shared<f32>),
    /// bf16 bit patterns.
    BF16(Shared<u16>),
    /// f16 bit patterns.
    F16(Shared<u16>),
    /// int8 blocks: `x = d · q`.
    Q8(QBlocks),
    /// 4-bit blocks: `x = d · q`, `q` in -8..=7.
    Q4(QBlocks),
}

impl FloatData {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            FloatData::F32(v) => v.len(),
            FloatData::BF16(v) | FloatData::F16(v) => v.len(),
            FloatData::Q8(b) | FloatData::Q4(b) => b.len,
        }
    }
    /// Whether there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The storage dtype of the values (quantized formats: their packed bytes).
    pub fn dtype(&self) -> DType {
        match self {
            FloatData::F32(_) => DType::F32,
            FloatData::BF16(_) => DType::BF16,
            FloatData::F16(_) => DType::F16,
            FloatData::Q8(_) => DType::I8,
            FloatData::Q4(_) => DType::U8,
        }
    }
    /// The format's name: f32, bf16, f16, int8, q4.
    pub fn format_name(&self) -> &'static str {
        match self {
            FloatData::F32(_) => "f32",
            FloatData::BF16(_) => "bf16",
            FloatData::F16(_) => "f16",
            FloatData::Q8(_) => "int8",
            FloatData::Q4(_) => "q4",
        }
    }
    /// Bytes of storage (values and scales).
    pub fn nbytes(&self) -> usize {
        match self {
            FloatData::F32(v) => v.len() * 4,
            FloatData::BF16(v) | FloatData::F16(v) => v.len() * 2,
            FloatData::Q8(b) | FloatData::Q4(b) => b.q.len() + b.d.len() * 4,
        }
    }
    /// Elements `start .. start + len`, sharing the same memory (block-aligned for the
    /// quantized formats).
    pub fn slice(&self, start: usize, len: usize) -> FloatData {
        match self {
            FloatData::F32(v) => FloatData::F32(v.slice(start, len)),
            FloatData::BF16(v) => FloatData::BF16(v.slice(start, len)),
            FloatData::F16(v) => FloatData::F16(v.slice(start, len)),
            FloatData::Q8(b) | FloatData::Q4(b) => {
                assert!(
                    start.is_multiple_of(QBLOCK) && len.is_multiple_of(QBLOCK),
                    "unaligned quantized slice"
                );
                let per = if matches!(self, FloatData::Q8(_)) {
                    1
                } else {
                    2
                };
                let qb = QBlocks {
                    len,
                    q: b.q.slice(start / per, len / per),
                    d: b.d.slice(start / QBLOCK, len / QBLOCK),
                };
                if per == 1 {
                    FloatData::Q8(qb)
                } else {
                    FloatData::Q4(qb)
                }
            }
        }
    }
    /// Element `i` as f32.
    #[inline]
    pub fn get(&self, i: usize) -> f32 {
        match self {
            FloatData::F32(v) => v[i],
            FloatData::BF16(v) => bf16_to_f32(v[i]),
            FloatData::F16(v) => half::f16::from_bits(v[i]).to_f32(),
            FloatData::Q8(b) => b.d[i / QBLOCK] * (b.q[i] as i8) as f32,
            FloatData::Q4(b) => {
                let (blk, j) = (i / QBLOCK, i % QBLOCK);
                let byte = b.q[blk * 16 + (j % 16)];
                let nib = if j < 16 { byte & 15 } else { byte >> 4 };
                b.d[blk] * (nib as i32 - 8) as f32
            }
        }
    }
    /// Converts a range into `out` (same length).
    pub fn read_into(&self, start: usize, out: &mut [f32]) {
        let n = out.len();
        match self {
            FloatData::F32(v) => out.copy_from_slice(&v[start..start + n]),
            FloatData::BF16(v) => widen::bf16_to_f32_slice(&v[start..start + n], out),
            FloatData::F16(v) => widen::f16_to_f32(&v[start..start + n], out),
            FloatData::Q8(b) if start.is_multiple_of(QBLOCK) => {
                for (k, o) in out.chunks_mut(QBLOCK).enumerate() {
                    let blk = start / QBLOCK + k;
                    let d = b.d[blk];
                    for (j, x) in o.iter_mut().enumerate() {
                        *x = d * (b.q[blk * QBLOCK + j] as i8) as f32;
                    }
                }
            }
            FloatData::Q4(b) if start.is_multiple_of(QBLOCK) => {
                for (k, o) in out.chunks_mut(QBLOCK).enumerate() {
                    let blk = start / QBLOCK + k;
                    let d = b.d[blk];
                    let bytes = &b.q[blk * 16..blk * 16 + 16];
                    for (j, x) in o.iter_mut().enumerate() {
                        let byte = bytes[j % 16];
                        let nib = if j < 16 { byte & 15 } else { byte >> 4 };
                        *x = d * (nib as i32 - 8) as f32;
                    }
                }
            }
            _ => {
                for (i, o) in out.iter_mut().enumerate() {
                    *o = self.get(start + i);
                }
            }
        }
    }
    /// All values as an owned f32 vector.
    pub fn to_f32(&self) -> Vec<f32> {
        let mut v = vec![0.0; self.len()];
        self.read_into(0, &mut v);
        v
    }
}

/// bf16 bits to f32 (exact).
#[inline(always)]
pub fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// Memory layout of a weight matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `[out, in]`, used as `x @ W^T` (PyTorch `nn.Linear` weights).
    OutIn,
    /// `[in, out]`, used as `x @ W` (the LoRA matrices of v6/v7).
    InOut,
}

/// A weight matrix in its stored format, used in place from the checkpoint's memory map.
#[derive(Debug, Clone)]
pub struct Matrix {
    /// Input features.
    pub n_in: usize,
    /// Output features.
    pub n_out: usize,
    /// Layout of `data`.
    pub layout: Layout,
    /// The values.
    pub data: FloatData,
}

impl Matrix {
    /// Bytes read by one product with a vector.
    pub fn bytes(&self) -> usize {
        self.data.nbytes()
    }
}
