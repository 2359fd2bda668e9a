//! llama.cpp's GGUF container (versions 2 and 3, little-endian): the header, the metadata,
//! the tensor table, and the block formats of the tensor types llama.cpp's quantizer writes
//! for RWKV models, with their exact dequantization (ggml's `dequantize_row_*`).
//!
//! This module reads the container only; [`super::layout`] maps llama.cpp's tensor names onto
//! the official ones.

use crate::error::{Error, Result};
use std::collections::BTreeMap;

/// The first four bytes of every GGUF file.
pub const MAGIC: &[u8; 4] = b"GGUF";

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// Any unsigned integer type (u8, u16, u32, u64).
    Uint(u64),
    /// Any signed integer type (i8, i16, i32, i64).
    Int(i64),
    /// f32 or f64.
    Float(f64),
    /// A boolean.
    Bool(bool),
    /// A UTF-8 string (invalid UTF-8 is replaced, as the value is only ever shown or matched).
    Str(String),
    /// An array of values of one type.
    Array(Vec<Value>),
}

impl Value {
    /// The value as an unsigned integer, when it is a non-negative integer.
    pub fn as_uint(&self) -> Option<u64> {
        match *self {
            Value::Uint(v) => Some(v),
            Value::Int(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }
    /// The value as a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
}

/// The ggml tensor types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    /// IEEE binary32.
    F32,
    /// IEEE binary16.
    F16,
    /// bfloat16.
    BF16,
    /// 32 × 4-bit, one f16 scale: `x = d·(q − 8)`.
    Q4_0,
    /// 32 × 4-bit, f16 scale and minimum: `x = d·q + m`.
    Q4_1,
    /// 32 × 5-bit, one f16 scale: `x = d·(q − 16)`.
    Q5_0,
    /// 32 × 5-bit, f16 scale and minimum: `x = d·q + m`.
    Q5_1,
    /// 32 × int8, one f16 scale: `x = d·q`.
    Q8_0,
    /// Super-blocks of 256: 8 × 32 × 4-bit with 6-bit scales and minimums.
    Q4K,
    /// Super-blocks of 256: 8 × 32 × 5-bit with 6-bit scales and minimums.
    Q5K,
    /// Super-blocks of 256: 16 × 16 × 6-bit with 8-bit scales.
    Q6K,
}

impl GgmlType {
    /// The type of a ggml type id, or `None` for one this project does not read.
    pub fn from_id(id: u32) -> Option<GgmlType> {
        Some(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            6 => GgmlType::Q5_0,
            7 => GgmlType::Q5_1,
            8 => GgmlType::Q8_0,
            12 => GgmlType::Q4K,
            13 => GgmlType::Q5K,
            14 => GgmlType::Q6K,
            30 => GgmlType::BF16,
            _ => return None,
        })
    }

    /// ggml's name of a type id (for messages about the types this project does not read).
    pub fn id_name(id: u32) -> String {
        const NAMES: [&str; 43] = [
            "F32",
            "F16",
            "Q4_0",
            "Q4_1",
            "Q4_2",
            "Q4_3",
            "Q5_0",
            "Q5_1",
            "Q8_0",
            "Q8_1",
            "Q2_K",
            "Q3_K",
            "Q4_K",
            "Q5_K",
            "Q6_K",
            "Q8_K",
            "IQ2_XXS",
            "IQ2_XS",
            "IQ3_XXS",
            "IQ1_S",
            "IQ4_NL",
            "IQ3_S",
            "IQ2_S",
            "IQ4_XS",
            "I8",
            "I16",
            "I32",
            "I64",
            "F64",
            "IQ1_M",
            "BF16",
            "Q4_0_4_4",
            "Q4_0_4_8",
            "Q4_0_8_8",
            "TQ1_0",
            "TQ2_0",
            "IQ4_NL_4_4",
            "IQ4_NL_4_8",
            "IQ4_NL_8_8",
            "MXFP4",
            "NVFP4",
            "Q1_0",
            "Q2_0",
        ];
        NAMES
            .get(id as usize)
            .map_or_else(|| format!("{id} (unknown)"), |s| s.to_string())
    }

    /// ggml's name of the type.
    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::BF16 => "BF16",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4_1 => "Q4_1",
            GgmlType::Q5_0 => "Q5_0",
            GgmlType::Q5_1 => "Q5_1",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q4K => "Q4_K",
            GgmlType::Q5K => "Q5_K",
            GgmlType::Q6K => "Q6_K",
        }
    }

    /// The type's ggml id.
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q5_0 => 6,
            GgmlType::Q5_1 => 7,
            GgmlType::Q8_0 => 8,
            GgmlType::Q4K => 12,
            GgmlType::Q5K => 13,
            GgmlType::Q6K => 14,
            GgmlType::BF16 => 30,
        }
    }

    /// Elements per block and bytes per block.
    pub fn block(self) -> (usize, usize) {
        match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 | GgmlType::BF16 => (1, 2),
            GgmlType::Q4_0 => (32, 18),
            GgmlType::Q4_1 => (32, 20),
            GgmlType::Q5_0 => (32, 22),
            GgmlType::Q5_1 => (32, 24),
            GgmlType::Q8_0 => (32, 34),
            GgmlType::Q4K => (256, 144),
            GgmlType::Q5K => (256, 176),
            GgmlType::Q6K => (256, 210),
        }
    }

    /// Whether the type is block-quantized.
    pub fn is_quantized(self) -> bool {
        self.block().0 > 1
    }
}

/// One entry of the tensor table.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    /// llama.cpp's name.
    pub name: String,
    /// The shape in PyTorch order (ggml's `ne` reversed: the last dimension is contiguous).
    pub shape: Vec<usize>,
    /// Element type.
    pub ty: GgmlType,
    /// Absolute offset of the data in the file.
    pub offset: usize,
    /// Bytes of data.
    pub nbytes: usize,
}

impl TensorInfo {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A parsed GGUF header: version, metadata and tensor table.
#[derive(Debug)]
pub struct Gguf {
    /// Format version (2 or 3).
    pub version: u32,
    /// Metadata by key.
    pub kv: BTreeMap<String, Value>,
    /// Tensors in file order.
    pub tensors: Vec<TensorInfo>,
}

impl Gguf {
    /// A metadata value.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.kv.get(key)
    }
}

/// Bounds-checked little-endian reads over the file's bytes.
struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
    what: &'a str,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, field: &str) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.b.len());
        match end {
            Some(e) => {
                let s = &self.b[self.pos..e];
                self.pos = e;
                Ok(s)
            }
            None => Err(Error::bad(format!(
                "{}: GGUF file ends inside {field} (offset {}; truncated file?)",
                self.what, self.pos
            ))),
        }
    }
    fn u8(&mut self, f: &str) -> Result<u8> {
        Ok(self.take(1, f)?[0])
    }
    fn u16(&mut self, f: &str) -> Result<u16> {
        let s = self.take(2, f)?;
        Ok(u16::from_le_bytes([s[0], s[1]]))
    }
    fn u32(&mut self, f: &str) -> Result<u32> {
        let s = self.take(4, f)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn u64(&mut self, f: &str) -> Result<u64> {
        let s = self.take(8, f)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        Ok(u64::from_le_bytes(a))
    }
    /// A count or length, which cannot exceed the bytes left (each item takes at least
    /// `min_item` bytes), so that a corrupt count never asks for a huge allocation.
    fn count(&mut self, min_item: usize, f: &str) -> Result<usize> {
        let n = self.u64(f)?;
        let left = (self.b.len() - self.pos) as u64;
        if n.saturating_mul(min_item.max(1) as u64) > left {
            return Err(Error::bad(format!(
                "{}: GGUF {f} of {n} does not fit in the {left} bytes left (corrupt or truncated file)",
                self.what
            )));
        }
        Ok(n as usize)
    }
    fn string(&mut self, f: &str) -> Result<String> {
        let n = self.count(1, f)?;
        Ok(String::from_utf8_lossy(self.take(n, f)?).into_owned())
    }
    fn value(&mut self, ty: u32, f: &str, depth: usize) -> Result<Value> {
        Ok(match ty {
            0 => Value::Uint(self.u8(f)? as u64),
            1 => Value::Int(self.u8(f)? as i8 as i64),
            2 => Value::Uint(self.u16(f)? as u64),
            3 => Value::Int(self.u16(f)? as i16 as i64),
            4 => Value::Uint(self.u32(f)? as u64),
            5 => Value::Int(self.u32(f)? as i32 as i64),
            6 => Value::Float(f32::from_bits(self.u32(f)?) as f64),
            7 => Value::Bool(self.u8(f)? != 0),
            8 => Value::Str(self.string(f)?),
            9 if depth == 0 => {
                let et = self.u32(f)?;
                let n = self.count(1, f)?;
                let mut v = Vec::with_capacity(n.min(1 << 20));
                for _ in 0..n {
                    v.push(self.value(et, f, depth + 1)?);
                }
                Value::Array(v)
            }
            10 => Value::Uint(self.u64(f)?),
            11 => Value::Int(self.u64(f)? as i64),
            12 => Value::Float(f64::from_bits(self.u64(f)?)),
            _ => {
                return Err(Error::bad(format!(
                    "{}: GGUF metadata {f} has unknown value type {ty}",
                    self.what
                )))
            }
        })
    }
}

/// Parses the header, metadata and tensor table of a GGUF file held in `b`, checking that
/// every tensor's data lies inside the file.
pub fn parse(b: &[u8], what: &str) -> Result<Gguf> {
    let mut r = Reader { b, pos: 0, what };
    if r.take(4, "the magic")? != MAGIC {
        return Err(Error::bad(format!("{what}: not a GGUF file")));
    }
    let version = r.u32("the version")?;
    if !(2..=3).contains(&version) {
        let hint = if version.swap_bytes() <= 3 {
            " (a big-endian file)"
        } else {
            ""
        };
        return Err(Error::bad(format!(
            "{what}: GGUF version {version}{hint} is not supported (versions 2 and 3 are)"
        )));
    }
    let n_tensors = r.count(24, "tensor count")?;
    let n_kv = r.count(13, "metadata count")?;
    let mut kv = BTreeMap::new();
    for _ in 0..n_kv {
        let key = r.string("a metadata key")?;
        let ty = r.u32(&key)?;
        let v = r.value(ty, &key, 0)?;
        kv.insert(key, v);
    }
    let alignment = match kv.get("general.alignment") {
        None => 32,
        Some(v) => match v.as_uint() {
            Some(a) if a > 0 && a.is_power_of_two() && a <= 1 << 20 => a as usize,
            _ => {
                return Err(Error::bad(format!(
                    "{what}: GGUF general.alignment {v:?} is not a power of two"
                )))
            }
        },
    };
    struct Raw {
        name: String,
        ne: Vec<u64>,
        ty: u32,
        offset: u64,
    }
    let mut raw = Vec::with_capacity(n_tensors);
    for _ in 0..n_tensors {
        let name = r.string("a tensor name")?;
        let n_dims = r.u32(&name)? as usize;
        if n_dims == 0 || n_dims > 4 {
            return Err(Error::bad(format!(
                "{what}: tensor {name} has {n_dims} dimensions (GGUF allows 1 to 4)"
            )));
        }
        let mut ne = Vec::with_capacity(n_dims);
        for _ in 0..n_dims {
            ne.push(r.u64(&name)?);
        }
        let ty = r.u32(&name)?;
        let offset = r.u64(&name)?;
        raw.push(Raw {
            name,
            ne,
            ty,
            offset,
        });
    }
    let data = r.pos.div_ceil(alignment) * alignment;
    let mut tensors = Vec::with_capacity(raw.len());
    for t in raw {
        let name = t.name;
        let ty = GgmlType::from_id(t.ty).ok_or_else(|| {
            Error::bad(format!(
                "{what}: tensor {name} has ggml type {} which rwkv does not read (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K and Q6_K are read)",
                GgmlType::id_name(t.ty)
            ))
        })?;
        let numel =
            t.ne.iter()
                .try_fold(1u64, |a, &d| a.checked_mul(d))
                .filter(|&n| n > 0 && n < 1 << 40)
                .ok_or_else(|| Error::bad(format!("{what}: tensor {name} has shape {:?}", t.ne)))?;
        let (per, bytes) = ty.block();
        if !t.ne[0].is_multiple_of(per as u64) {
            return Err(Error::bad(format!(
                "{what}: tensor {name} ({}) has rows of {} elements, not a multiple of its block of {per}",
                ty.name(),
                t.ne[0]
            )));
        }
        let nbytes = (numel / per as u64) as usize * bytes;
        let offset = (data as u64).checked_add(t.offset);
        let end = offset.and_then(|o| o.checked_add(nbytes as u64));
        match (offset, end) {
            (Some(o), Some(e)) if e <= b.len() as u64 => tensors.push(TensorInfo {
                name,
                shape: t.ne.iter().rev().map(|&d| d as usize).collect(),
                ty,
                offset: o as usize,
                nbytes,
            }),
            _ => {
                return Err(Error::bad(format!(
                    "{what}: tensor {name} (data at {}, {nbytes} bytes) extends past the end of the file (truncated file?)",
                    t.offset
                )))
            }
        }
    }
    Ok(Gguf {
        version,
        kv,
        tensors,
    })
}

fn f16(b: &[u8], at: usize) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

/// ggml's `get_scale_min_k4`: the 6-bit scale and minimum of sub-block `j` of a Q4_K/Q5_K
/// super-block.
fn scale_min_k4(j: usize, q: &[u8]) -> (f32, f32) {
    if j < 4 {
        ((q[j] & 63) as f32, (q[j + 4] & 63) as f32)
    } else {
        (
            ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4)) as f32,
            ((q[j + 4] >> 4) | ((q[j] >> 6) << 4)) as f32,
        )
    }
}

/// Dequantizes `data` (whole blocks of `ty`) into `out` exactly as ggml's `dequantize_row_*`
/// does (same operations in the same order, so the same f32 values).
pub fn dequantize(ty: GgmlType, data: &[u8], out: &mut [f32]) {
    let (per, bytes) = ty.block();
    debug_assert_eq!(data.len() / bytes * per, out.len());
    for (b, y) in data.chunks_exact(bytes).zip(out.chunks_exact_mut(per)) {
        match ty {
            GgmlType::F32 => y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            GgmlType::F16 => y[0] = f16(b, 0),
            GgmlType::BF16 => {
                y[0] = f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16)
            }
            GgmlType::Q4_0 => {
                let d = f16(b, 0);
                for j in 0..16 {
                    y[j] = ((b[2 + j] & 0xF) as i32 - 8) as f32 * d;
                    y[j + 16] = ((b[2 + j] >> 4) as i32 - 8) as f32 * d;
                }
            }
            GgmlType::Q4_1 => {
                let (d, m) = (f16(b, 0), f16(b, 2));
                for j in 0..16 {
                    y[j] = (b[4 + j] & 0xF) as f32 * d + m;
                    y[j + 16] = (b[4 + j] >> 4) as f32 * d + m;
                }
            }
            GgmlType::Q5_0 | GgmlType::Q5_1 => {
                let one = ty == GgmlType::Q5_1;
                let d = f16(b, 0);
                let m = if one { f16(b, 2) } else { 0.0 };
                let h = if one { 4 } else { 2 };
                let qh = u32::from_le_bytes([b[h], b[h + 1], b[h + 2], b[h + 3]]);
                let qs = &b[h + 4..h + 20];
                for j in 0..16 {
                    let xh0 = (((qh >> j) << 4) & 0x10) as u8;
                    let xh1 = ((qh >> (j + 12)) & 0x10) as u8;
                    let x0 = ((qs[j] & 0xF) | xh0) as i32;
                    let x1 = ((qs[j] >> 4) | xh1) as i32;
                    if one {
                        y[j] = x0 as f32 * d + m;
                        y[j + 16] = x1 as f32 * d + m;
                    } else {
                        y[j] = (x0 - 16) as f32 * d;
                        y[j + 16] = (x1 - 16) as f32 * d;
                    }
                }
            }
            GgmlType::Q8_0 => {
                let d = f16(b, 0);
                for j in 0..32 {
                    y[j] = (b[2 + j] as i8) as f32 * d;
                }
            }
            GgmlType::Q4K | GgmlType::Q5K => {
                let five = ty == GgmlType::Q5K;
                let (d, min) = (f16(b, 0), f16(b, 2));
                let scales = &b[4..16];
                let (qh, mut ql) = if five {
                    (&b[16..48], &b[48..176])
                } else {
                    (&b[0..0], &b[16..144])
                };
                let (mut u1, mut u2) = (1u8, 2u8);
                for (k, y) in y.chunks_exact_mut(64).enumerate() {
                    let (sc, m) = scale_min_k4(2 * k, scales);
                    let (d1, m1) = (d * sc, min * m);
                    let (sc, m) = scale_min_k4(2 * k + 1, scales);
                    let (d2, m2) = (d * sc, min * m);
                    for l in 0..32 {
                        let hi = |u: u8| if five && qh[l] & u != 0 { 16 } else { 0 };
                        y[l] = d1 * ((ql[l] & 0xF) + hi(u1)) as f32 - m1;
                        y[l + 32] = d2 * ((ql[l] >> 4) + hi(u2)) as f32 - m2;
                    }
                    ql = &ql[32..];
                    u1 <<= 2;
                    u2 <<= 2;
                }
            }
            GgmlType::Q6K => {
                let d = f16(b, 208);
                for (n, y) in y.chunks_exact_mut(128).enumerate() {
                    let ql = &b[64 * n..64 * n + 64];
                    let qh = &b[128 + 32 * n..128 + 32 * n + 32];
                    let sc = &b[192 + 8 * n..192 + 8 * n + 8];
                    for l in 0..32 {
                        let is = l / 16;
                        let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
                        let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                        let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                        let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                        let s = |i: usize| (sc[i] as i8) as f32;
                        y[l] = d * s(is) * q1 as f32;
                        y[l + 32] = d * s(is + 2) * q2 as f32;
                        y[l + 64] = d * s(is + 4) * q3 as f32;
                        y[l + 96] = d * s(is + 6) * q4 as f32;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q4_0_and_q8_0_blocks_dequantize_as_ggml_does() {
        // d = 0.5 (f16 0x3800); element j low nibble j%16, element j+16 high nibble.
        let mut b = vec![0x00, 0x38];
        b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let mut y = [0f32; 32];
        dequantize(GgmlType::Q4_0, &b, &mut y);
        assert_eq!(y[0], -4.0);
        assert_eq!(y[15], 3.5);
        assert_eq!(y[16], 3.5);
        assert_eq!(y[31], -4.0);
        let mut b = vec![0x00, 0x38];
        b.extend((0..32).map(|j| (j as i8 - 16) as u8));
        dequantize(GgmlType::Q8_0, &b, &mut y);
        assert_eq!(y[0], -8.0);
        assert_eq!(y[31], 7.5);
    }

    #[test]
    fn a_corrupt_count_is_an_error_not_an_allocation() {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(u64::MAX.to_le_bytes());
        b.extend(0u64.to_le_bytes());
        let e = parse(&b, "x.gguf").unwrap_err().to_string();
        assert!(e.contains("x.gguf") && e.contains("tensor count"), "{e}");
    }
}

/// `x` in `ty`'s blocks, as ggml's reference quantizers write them (`quantize_row_q8_0_ref`,
/// `quantize_row_q4_0_ref`; f16 and bf16 rounded to nearest even). Only the types `rwkv
/// convert` writes: F32, F16, BF16, Q8_0 and Q4_0; `x.len()` a multiple of the block.
pub fn quantize(ty: GgmlType, x: &[f32]) -> Vec<u8> {
    let (per, bytes) = ty.block();
    let mut out = Vec::with_capacity(x.len() / per * bytes);
    let f16 = |v: f32| half::f16::from_f32(v).to_bits().to_le_bytes();
    match ty {
        GgmlType::F32 => x.iter().for_each(|v| out.extend(v.to_le_bytes())),
        GgmlType::F16 => x.iter().for_each(|&v| out.extend(f16(v))),
        GgmlType::BF16 => x
            .iter()
            .for_each(|&v| out.extend(half::bf16::from_f32(v).to_bits().to_le_bytes())),
        GgmlType::Q8_0 => {
            for b in x.chunks_exact(32) {
                let amax = b.iter().fold(0f32, |m, v| m.max(v.abs()));
                let d = amax / 127.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend(f16(d));
                out.extend(b.iter().map(|v| (v * id).round() as i8 as u8));
            }
        }
        GgmlType::Q4_0 => {
            for b in x.chunks_exact(32) {
                // The value of largest magnitude, with its sign, maps to -8.
                let (mut amax, mut max) = (0f32, 0f32);
                for &v in b {
                    if amax < v.abs() {
                        amax = v.abs();
                        max = v;
                    }
                }
                let d = max / -8.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend(f16(d));
                let q = |v: f32| ((v * id + 8.5) as i8).min(15) as u8;
                out.extend((0..16).map(|j| q(b[j]) | (q(b[j + 16]) << 4)));
            }
        }
        _ => unreachable!("rwkv does not write {}", ty.name()),
    }
    out
}

/// A GGUF version 3 file being assembled: metadata, then tensors, written by [`Writer::write`].
#[derive(Default)]
pub struct Writer {
    kv: Vec<u8>,
    n_kv: u64,
    tensors: Vec<(String, Vec<usize>, GgmlType, Vec<u8>)>,
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

impl Writer {
    fn key(&mut self, k: &str, ty: u32) {
        put_str(&mut self.kv, k);
        self.kv.extend(ty.to_le_bytes());
        self.n_kv += 1;
    }
    /// A u32 value.
    pub fn u32(&mut self, k: &str, v: u32) {
        self.key(k, 4);
        self.kv.extend(v.to_le_bytes());
    }
    /// An f32 value.
    pub fn f32(&mut self, k: &str, v: f32) {
        self.key(k, 6);
        self.kv.extend(v.to_le_bytes());
    }
    /// A string value.
    pub fn str(&mut self, k: &str, v: &str) {
        self.key(k, 8);
        put_str(&mut self.kv, v);
    }
    /// An array of strings.
    pub fn strs(&mut self, k: &str, v: &[String]) {
        self.key(k, 9);
        self.kv.extend(8u32.to_le_bytes());
        self.kv.extend((v.len() as u64).to_le_bytes());
        v.iter().for_each(|s| put_str(&mut self.kv, s));
    }
    /// An array of i32.
    pub fn i32s(&mut self, k: &str, v: &[i32]) {
        self.key(k, 9);
        self.kv.extend(5u32.to_le_bytes());
        self.kv.extend((v.len() as u64).to_le_bytes());
        v.iter().for_each(|x| self.kv.extend(x.to_le_bytes()));
    }
    /// A tensor of PyTorch-order `shape` whose `data` is already in `ty`'s blocks.
    pub fn tensor(&mut self, name: String, shape: Vec<usize>, ty: GgmlType, data: Vec<u8>) {
        self.tensors.push((name, shape, ty, data));
    }
    /// Writes the file (32-byte alignment) atomically.
    pub fn write(self, path: &std::path::Path) -> Result<()> {
        const ALIGN: usize = 32;
        let mut head = Vec::new();
        head.extend(MAGIC);
        head.extend(3u32.to_le_bytes());
        head.extend((self.tensors.len() as u64).to_le_bytes());
        head.extend(self.n_kv.to_le_bytes());
        head.extend(&self.kv);
        let mut offset = 0usize;
        for (name, shape, ty, data) in &self.tensors {
            put_str(&mut head, name);
            head.extend((shape.len() as u32).to_le_bytes());
            shape
                .iter()
                .rev()
                .for_each(|&d| head.extend((d as u64).to_le_bytes()));
            head.extend(ty.id().to_le_bytes());
            head.extend((offset as u64).to_le_bytes());
            offset = (offset + data.len()).div_ceil(ALIGN) * ALIGN;
        }
        super::write_atomic(path, |w| {
            use std::io::Write;
            w.write_all(&head)?;
            w.write_all(&vec![0u8; head.len().div_ceil(ALIGN) * ALIGN - head.len()])?;
            for (_, _, _, data) in &self.tensors {
                w.write_all(data)?;
                w.write_all(&vec![0u8; data.len().div_ceil(ALIGN) * ALIGN - data.len()])?;
            }
            Ok(())
        })
    }
}
