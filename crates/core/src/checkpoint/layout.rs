//! Tensor layouts of other tools, each one name and shape map onto the official tensors of
//! [`crate::schema`]: a checkpoint opened from such a file lists the official names, so the
//! models load it as they load an official file.
//!
//! llama.cpp's GGUF (`rwkv7`, as `convert_hf_to_gguf.py` writes it): `blk.N.time_mix_*` and
//! `channel_mix_*` names, the six token-shift mixes fused into one `[6, 1, 1, C]` tensor, the
//! LoRA matrices stored `[out, in]` (the official files store them `[in, out]`), `r_k`
//! flattened to `[C]`, and a dummy value LoRA in block 0 (a copy of the `a` one, which the
//! official block 0 does not have). Tensors are used in place where the kernels read their
//! type: F32/F16/BF16 always; Q8_0 and Q4_0 weight matrices are repacked at open time into the
//! integer kernels' blocks (the same bytes per weight: no float copy); every other quantized
//! type, and every quantized vector, table or LoRA matrix, is dequantized to f32 at open time
//! exactly as ggml dequantizes it.

use super::gguf::{self, GgmlType, Gguf, TensorInfo, Value};
use super::{Bytes, Checkpoint, TensorMeta};
use crate::error::{Error, Result};
use crate::tensor::{DType, QBLOCK};
use std::sync::Arc;

/// The layout of the official (BlinkDL) checkpoints.
pub const OFFICIAL: &str = "official";

/// Where a llama.cpp tensor goes among the official tensors.
#[derive(Debug, Clone, PartialEq)]
enum Place {
    /// One official tensor of this shape (the same elements in the same order).
    As(String, Vec<usize>),
    /// An official `[out, in]` weight matrix, which may stay block-quantized.
    Matrix(String),
    /// An official `[in, out]` LoRA matrix, stored transposed.
    Transposed(String),
    /// Equal slices along the first dimension, one official vector each.
    Split(Vec<String>),
    /// Not used by the math.
    Unused,
}

/// The six token-shift mixes of RWKV-7 in the order llama.cpp fuses them.
const V7_LERPS: [&str; 6] = ["x_r", "x_w", "x_k", "x_v", "x_a", "x_g"];

/// Where a tensor of llama.cpp's `rwkv7` layout goes; `None` for a name it does not have.
fn rwkv7_place(name: &str, shape: &[usize], head_size: usize) -> Option<Place> {
    let c = *shape.last()?;
    let vector = |n: &str| Some(Place::As(n.to_string(), vec![c]));
    match name {
        "token_embd.weight" => return Some(Place::As("emb.weight".into(), shape.to_vec())),
        "token_embd_norm.weight" => return vector("blocks.0.ln0.weight"),
        "token_embd_norm.bias" => return vector("blocks.0.ln0.bias"),
        "output_norm.weight" => return vector("ln_out.weight"),
        "output_norm.bias" => return vector("ln_out.bias"),
        "output.weight" => return Some(Place::Matrix("head.weight".into())),
        _ => {}
    }
    let rest = name.strip_prefix("blk.")?;
    let (i, t) = rest.split_once('.')?;
    let i: usize = i.parse().ok()?;
    let b = format!("blocks.{i}");
    let (t, suffix) = t.rsplit_once('.')?;
    let at = |n: &str| format!("{b}.att.{n}");
    Some(match (t, suffix) {
        ("attn_norm", s) => Place::As(format!("{b}.ln1.{s}"), vec![c]),
        ("attn_norm_2", s) => Place::As(format!("{b}.ln2.{s}"), vec![c]),
        ("time_mix_ln", s) => Place::As(format!("{b}.att.ln_x.{s}"), vec![c]),
        ("time_mix_lerp_fused", "weight") => Place::Split(V7_LERPS.iter().map(|n| at(n)).collect()),
        // llama.cpp gives block 0 a copy of the `a` LoRA as its value LoRA.
        ("time_mix_v0" | "time_mix_v1" | "time_mix_v2", "weight") if i == 0 => Place::Unused,
        (
            "time_mix_w0" | "time_mix_a0" | "time_mix_v0" | "time_mix_k_k" | "time_mix_k_a",
            "weight",
        ) => Place::As(at(&t["time_mix_".len()..]), vec![c]),
        ("time_mix_r_k", "weight") if head_size > 0 && c % head_size == 0 => {
            Place::As(at("r_k"), vec![c / head_size, head_size])
        }
        (
            "time_mix_w1" | "time_mix_w2" | "time_mix_a1" | "time_mix_a2" | "time_mix_v1"
            | "time_mix_v2" | "time_mix_g1" | "time_mix_g2",
            "weight",
        ) => Place::Transposed(at(&t["time_mix_".len()..])),
        (
            "time_mix_key" | "time_mix_value" | "time_mix_receptance" | "time_mix_output",
            "weight",
        ) => Place::Matrix(at(&format!("{}.weight", &t["time_mix_".len()..]))),
        ("channel_mix_lerp_k", "weight") => Place::As(format!("{b}.ffn.x_k"), vec![c]),
        ("channel_mix_key" | "channel_mix_value", "weight") => {
            Place::Matrix(format!("{b}.ffn.{}.weight", &t["channel_mix_".len()..]))
        }
        _ => return None,
    })
}

/// The tensors converted at open time, appended to one buffer.
struct Converted {
    bytes: Vec<u8>,
}

impl Converted {
    /// Appends `data` (64-byte aligned within the buffer) and returns its offset.
    fn push(&mut self, data: &[u8]) -> usize {
        while !self.bytes.len().is_multiple_of(64) {
            self.bytes.push(0);
        }
        let at = self.bytes.len();
        self.bytes.extend_from_slice(data);
        at
    }
    fn push_f32(&mut self, v: &[f32]) -> usize {
        let b: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.push(&b)
    }
}

/// The float dtype a ggml type is used as in place, if any.
fn in_place_dtype(ty: GgmlType) -> Option<DType> {
    match ty {
        GgmlType::F32 => Some(DType::F32),
        GgmlType::F16 => Some(DType::F16),
        GgmlType::BF16 => Some(DType::BF16),
        _ => None,
    }
}

/// Every value of a tensor as f32, as ggml dequantizes it.
fn dequantized(map: &[u8], t: &TensorInfo) -> Vec<f32> {
    let mut v = vec![0.0; t.numel()];
    gguf::dequantize(t.ty, &map[t.offset..t.offset + t.nbytes], &mut v);
    v
}

/// Indexes a GGUF file: the official names of its tensors, each in the file or converted.
pub(super) fn index_gguf(ck: &mut Checkpoint, what: &str) -> Result<()> {
    let map = ck.map.clone();
    let g = gguf::parse(&map, what)?;
    let arch = g
        .get("general.architecture")
        .and_then(Value::as_str)
        .ok_or_else(|| Error::bad(format!("{what}: GGUF file has no general.architecture")))?
        .to_string();
    if arch != "rwkv7" {
        let hint = match arch.as_str() {
            "rwkv6" | "rwkv6qwen2" | "arwkv7" => "; rwkv reads llama.cpp's rwkv7 files",
            _ => " (not an RWKV model)",
        };
        return Err(Error::bad(format!(
            "{what}: GGUF architecture {arch:?} is not supported{hint}"
        )));
    }
    let head_size = g
        .get("rwkv7.wkv.head_size")
        .and_then(Value::as_uint)
        .ok_or_else(|| Error::bad(format!("{what}: GGUF metadata rwkv7.wkv.head_size missing")))?
        as usize;
    ck.layout = format!("llama.cpp GGUF v{} ({arch})", g.version);
    ck.vocab = gguf_vocab(&g, what)?;
    let mut conv = Converted { bytes: Vec::new() };
    for t in &g.tensors {
        let place = rwkv7_place(&t.name, &t.shape, head_size).ok_or_else(|| {
            Error::bad(format!(
                "{what}: unknown tensor {} (shape {:?}; not part of llama.cpp's {arch} layout)",
                t.name, t.shape
            ))
        })?;
        place_tensor(ck, &map, &mut conv, t, place, what)?;
    }
    ck.converted = Arc::new(Bytes::Owned(conv.bytes));
    Ok(())
}

fn place_tensor(
    ck: &mut Checkpoint,
    map: &[u8],
    conv: &mut Converted,
    t: &TensorInfo,
    place: Place,
    what: &str,
) -> Result<()> {
    let numel = t.numel();
    let in_file = |dtype: DType, shape: Vec<usize>, offset: usize, nbytes: usize| TensorMeta {
        dtype,
        shape,
        offset,
        nbytes,
        converted: false,
    };
    let owned = |dtype: DType, shape: Vec<usize>, offset: usize, nbytes: usize| TensorMeta {
        dtype,
        shape,
        offset,
        nbytes,
        converted: true,
    };
    match place {
        Place::Unused => Ok(()),
        Place::As(name, shape) => {
            if shape.iter().product::<usize>() != numel {
                return Err(Error::bad(format!(
                    "{what}: tensor {} has shape {:?}, which does not make {name} {shape:?}",
                    t.name, t.shape
                )));
            }
            let meta = match in_place_dtype(t.ty) {
                Some(d) => in_file(d, shape, t.offset, t.nbytes),
                None => {
                    let v = dequantized(map, t);
                    owned(DType::F32, shape, conv.push_f32(&v), numel * 4)
                }
            };
            ck.insert(name, meta)
        }
        Place::Matrix(name) => {
            let [rows, cols] = t.shape[..] else {
                return Err(Error::bad(format!(
                    "{what}: tensor {} has shape {:?}, expected a matrix",
                    t.name, t.shape
                )));
            };
            let src = &map[t.offset..t.offset + t.nbytes];
            match t.ty {
                GgmlType::Q8_0 | GgmlType::Q4_0 => {
                    let (q, d) = repack(t.ty, src);
                    let (dtype, packed) = if t.ty == GgmlType::Q8_0 {
                        (DType::I8, cols)
                    } else {
                        (DType::U8, cols / 2)
                    };
                    let qo = conv.push(&q);
                    ck.insert(name.clone(), owned(dtype, vec![rows, packed], qo, q.len()))?;
                    let dof = conv.push_f32(&d);
                    ck.insert(
                        format!("{name}.scales"),
                        owned(DType::F32, vec![rows, cols / QBLOCK], dof, d.len() * 4),
                    )
                }
                ty => match in_place_dtype(ty) {
                    Some(d) => ck.insert(name, in_file(d, vec![rows, cols], t.offset, t.nbytes)),
                    None => {
                        let v = dequantized(map, t);
                        let o = conv.push_f32(&v);
                        ck.insert(name, owned(DType::F32, vec![rows, cols], o, numel * 4))
                    }
                },
            }
        }
        Place::Transposed(name) => {
            let [rows, cols] = t.shape[..] else {
                return Err(Error::bad(format!(
                    "{what}: tensor {} has shape {:?}, expected a matrix",
                    t.name, t.shape
                )));
            };
            let (dtype, es, src): (DType, usize, Vec<u8>) = match in_place_dtype(t.ty) {
                Some(d) => (d, d.size(), map[t.offset..t.offset + t.nbytes].to_vec()),
                None => (
                    DType::F32,
                    4,
                    dequantized(map, t)
                        .iter()
                        .flat_map(|x| x.to_le_bytes())
                        .collect(),
                ),
            };
            let mut out = vec![0u8; src.len()];
            for r in 0..rows {
                for c in 0..cols {
                    let from = (r * cols + c) * es;
                    let to = (c * rows + r) * es;
                    out[to..to + es].copy_from_slice(&src[from..from + es]);
                }
            }
            let o = conv.push(&out);
            ck.insert(name, owned(dtype, vec![cols, rows], o, out.len()))
        }
        Place::Split(names) => {
            let n = names.len();
            let c = numel / n;
            if t.shape.first() != Some(&n) || c * n != numel {
                return Err(Error::bad(format!(
                    "{what}: tensor {} has shape {:?}, expected [{n}, 1, 1, C]",
                    t.name, t.shape
                )));
            }
            match in_place_dtype(t.ty) {
                Some(d) => {
                    for (k, name) in names.into_iter().enumerate() {
                        let nb = c * d.size();
                        ck.insert(name, in_file(d, vec![c], t.offset + k * nb, nb))?;
                    }
                    Ok(())
                }
                None => {
                    let v = dequantized(map, t);
                    for (k, name) in names.into_iter().enumerate() {
                        let o = conv.push_f32(&v[k * c..(k + 1) * c]);
                        ck.insert(name, owned(DType::F32, vec![c], o, c * 4))?;
                    }
                    Ok(())
                }
            }
        }
    }
}

/// A Q8_0 or Q4_0 tensor's blocks split into the integer kernels' packed values and f32
/// scales. The packed values are the file's bytes: Q8_0's int8s, and Q4_0's nibbles, which
/// use the kernels' order (byte `j` holds elements `j` and `j + 16`, each stored as `q + 8`).
fn repack(ty: GgmlType, src: &[u8]) -> (Vec<u8>, Vec<f32>) {
    let (per, bytes) = ty.block();
    let n = src.len() / bytes;
    let mut q = Vec::with_capacity(n * (bytes - 2));
    let mut d = Vec::with_capacity(n);
    for b in src.chunks_exact(bytes) {
        d.push(half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32());
        q.extend_from_slice(&b[2..]);
    }
    debug_assert_eq!(
        q.len(),
        n * if ty == GgmlType::Q8_0 { per } else { per / 2 }
    );
    (q, d)
}

/// The vocabulary of a GGUF with llama.cpp's `rwkv` tokenizer model: each token's text is
/// Python's `repr` of its bytes without the `b'…'`, and only normal tokens decode.
fn gguf_vocab(g: &Gguf, what: &str) -> Result<Option<Arc<[Vec<u8>]>>> {
    if g.get("tokenizer.ggml.model").and_then(Value::as_str) != Some("rwkv") {
        return Ok(None);
    }
    let Some(Value::Array(tokens)) = g.get("tokenizer.ggml.tokens") else {
        return Err(Error::bad(format!(
            "{what}: GGUF tokenizer.ggml.tokens missing or not an array"
        )));
    };
    let types = match g.get("tokenizer.ggml.token_type") {
        Some(Value::Array(t)) => t.iter().map(|v| v.as_uint()).collect::<Vec<_>>(),
        _ => Vec::new(),
    };
    let mut out = Vec::with_capacity(tokens.len());
    for (id, t) in tokens.iter().enumerate() {
        let text = t
            .as_str()
            .ok_or_else(|| Error::bad(format!("{what}: GGUF token {id} is not a string")))?;
        // 1 = normal; control (3) and unused padding (5) tokens decode to nothing.
        let normal = types.get(id).copied().flatten().unwrap_or(1) == 1;
        out.push(if normal && id > 0 {
            unescape_repr(text)
                .map_err(|e| Error::bad(format!("{what}: GGUF token {id} ({text:?}): {e}")))?
        } else {
            Vec::new()
        });
    }
    Ok(Some(out.into()))
}

/// The bytes of the inside of a Python bytes `repr` (`\\`, `\'`, `\"`, `\n`, `\r`, `\t`,
/// `\xHH`; every other character stands for its own UTF-8 bytes).
pub fn unescape_repr(s: &str) -> std::result::Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'\\' {
            out.push(b[i]);
            i += 1;
            continue;
        }
        let e = *b.get(i + 1).ok_or("ends with a backslash")?;
        i += 2;
        out.push(match e {
            b'\\' => b'\\',
            b'\'' => b'\'',
            b'"' => b'"',
            b'n' => b'\n',
            b'r' => b'\r',
            b't' => b'\t',
            b'x' => {
                let h = s.get(i..i + 2).ok_or("\\x needs two hex digits")?;
                i += 2;
                u8::from_str_radix(h, 16).map_err(|_| format!("bad escape \\x{h}"))?
            }
            _ => return Err(format!("unknown escape \\{}", e as char)),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repr_escapes_round_trip() {
        assert_eq!(unescape_repr(r"\x00a\'\\\n").unwrap(), b"\x00a'\\\n");
        assert_eq!(unescape_repr("it's").unwrap(), b"it's");
        assert!(unescape_repr(r"\x4").is_err());
        assert!(unescape_repr(r"\q").is_err());
    }

    #[test]
    fn the_rwkv7_map_names_every_official_tensor_kind() {
        let p = |n: &str, s: &[usize]| rwkv7_place(n, s, 64);
        assert_eq!(
            p("blk.3.time_mix_r_k.weight", &[128]),
            Some(Place::As("blocks.3.att.r_k".into(), vec![2, 64]))
        );
        assert_eq!(
            p("blk.1.time_mix_w1.weight", &[64, 128]),
            Some(Place::Transposed("blocks.1.att.w1".into()))
        );
        assert_eq!(
            p("blk.0.time_mix_v2.weight", &[128, 32]),
            Some(Place::Unused)
        );
        assert_eq!(
            p("blk.1.time_mix_v0.weight", &[128]),
            Some(Place::As("blocks.1.att.v0".into(), vec![128]))
        );
        assert_eq!(
            p("blk.0.channel_mix_value.weight", &[128, 512]),
            Some(Place::Matrix("blocks.0.ffn.value.weight".into()))
        );
        match p("blk.0.time_mix_lerp_fused.weight", &[6, 1, 1, 128]) {
            Some(Place::Split(v)) => assert_eq!(v[3], "blocks.0.att.x_v"),
            other => panic!("{other:?}"),
        }
        assert_eq!(p("blk.0.time_mix_first.weight", &[128]), None);
    }
}
