//! Tensor layouts of other tools, each one name and shape map onto the official tensors of
//! [`crate::schema`]: a checkpoint opened from such a file lists the official names, so the
//! models load it as they load an official file.
//!
//! - llama.cpp's GGUF, `rwkv7` (as `convert_hf_to_gguf.py` writes it): `blk.N.time_mix_*` and
//!   `channel_mix_*` names, the six token-shift mixes fused into one `[6, 1, 1, C]` tensor, the
//!   LoRA matrices stored `[out, in]` (the official files store them `[in, out]`), `r_k`
//!   flattened to `[C]`, and a dummy value LoRA in block 0 (a copy of the `a` one, which the
//!   official block 0 does not have); `rwkv6`: its five fused mixes, transposed LoRAs, the
//!   `time_mix_w2` stack stored transposed, and `rescale_every`'s divided matrices. Tensors are
//!   used in place where the kernels read their type: F32/F16/BF16 always; Q8_0 and Q4_0
//!   weight matrices (and the embedding) are repacked at open time into the integer kernels'
//!   blocks (the same bytes per weight: no float copy); every other quantized type, and every
//!   quantized vector or LoRA matrix, is dequantized to f32 at open time exactly as ggml
//!   dequantizes it. [`write_gguf`] writes the `rwkv7` and `rwkv6` layouts.
//! - Hugging Face directories (`config.json` with one or several safetensors or
//!   `pytorch_model.bin` files): transformers' `RwkvForCausalLM` (RWKV-4), the RWKV-5/6
//!   remote-code layout, fla-hub's `RWKV7ForCausalLM` and RWKV-block's (the official names).

use super::detect::{detect, Generation};
use super::gguf::{self, GgmlType, Gguf, TensorInfo, Value};
use super::{Bytes, Checkpoint, Format, TensorMeta};
use crate::error::{Error, Result};
use crate::tensor::{DType, QBLOCK};
use std::collections::BTreeMap;
use std::path::Path;
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
    /// Matrices stacked `[n, a, b]`, each stored transposed (officially `[n, b, a]`).
    TransposedStack(String),
    /// An official `[out, in]` weight matrix stored divided by this factor.
    Scaled(String, f32),
    /// Not used by the math.
    Unused,
}

/// The six token-shift mixes of RWKV-7 in the order llama.cpp fuses them.
const V7_LERPS: [&str; 6] = ["x_r", "x_w", "x_k", "x_v", "x_a", "x_g"];

/// The block of a tensor named `PREFIX{i}.rest`: `i`, its official prefix `blocks.{i}`, and
/// `rest`.
fn block_of<'a>(name: &'a str, prefix: &str) -> Option<(usize, String, &'a str)> {
    let (i, rest) = name.strip_prefix(prefix)?.split_once('.')?;
    let i: usize = i.parse().ok()?;
    Some((i, format!("blocks.{i}"), rest))
}

/// The tensors every llama.cpp RWKV layout names alike: the embedding, its norm (`ln0`), the
/// final norm and the head (`c` is the width).
fn gguf_shared_place(name: &str, c: usize) -> Option<Place> {
    let vector = |n: &str| Some(Place::As(n.to_string(), vec![c]));
    match name {
        // Read a row at a time, it may stay block-quantized as a matrix does.
        "token_embd.weight" => Some(Place::Matrix("emb.weight".into())),
        "token_embd_norm.weight" => vector("blocks.0.ln0.weight"),
        "token_embd_norm.bias" => vector("blocks.0.ln0.bias"),
        "output_norm.weight" => vector("ln_out.weight"),
        "output_norm.bias" => vector("ln_out.bias"),
        "output.weight" => Some(Place::Matrix("head.weight".into())),
        _ => None,
    }
}

/// A block's norms in every llama.cpp RWKV layout: `ln1`, `ln2` and the time mix's `ln_x`.
fn gguf_norm_place(t: &str, suffix: &str, b: &str, c: usize) -> Option<Place> {
    let n = match t {
        "attn_norm" => "ln1",
        "attn_norm_2" => "ln2",
        "time_mix_ln" => "att.ln_x",
        _ => return None,
    };
    Some(Place::As(format!("{b}.{n}.{suffix}"), vec![c]))
}

/// A llama.cpp tensor name, read as far as every RWKV layout of llama.cpp reads it alike.
enum GgufName<'a> {
    /// One of the tensors all layouts place alike.
    Placed(Place),
    /// Another tensor of block `i` (official prefix, name, suffix, width).
    Block(usize, String, &'a str, &'a str, usize),
}

fn gguf_name<'a>(name: &'a str, shape: &[usize]) -> Option<GgufName<'a>> {
    let c = *shape.last()?;
    if let Some(p) = gguf_shared_place(name, c) {
        return Some(GgufName::Placed(p));
    }
    let (i, b, t) = block_of(name, "blk.")?;
    let (t, suffix) = t.rsplit_once('.')?;
    Some(match gguf_norm_place(t, suffix, &b, c) {
        Some(p) => GgufName::Placed(p),
        None => GgufName::Block(i, b, t, suffix, c),
    })
}

/// The five token-shift mixes of RWKV-6 in the order llama.cpp fuses them.
const V6_LERPS: [&str; 5] = ["w", "k", "v", "r", "g"];

/// Where a tensor of llama.cpp's `rwkv6` layout goes (its converter: the LoRA matrices
/// transposed, `time_mix_w2` stored `[5, C, 32]`, the five mixes fused `[5, 1, 1, C]`, and with
/// `rescale_every` = R > 0 the output and value matrices of block `i` divided by
/// `2^(i / R)`); `None` for a name it does not have.
fn rwkv6_place(name: &str, shape: &[usize], rescale: usize) -> Option<Place> {
    let (i, b, t, suffix, c) = match gguf_name(name, shape)? {
        GgufName::Placed(p) => return Some(p),
        GgufName::Block(i, b, t, suffix, c) => (i, b, t, suffix, c),
    };
    let at = |n: &str| format!("{b}.att.{n}");
    let scaled = |n: String| {
        let k = i.checked_div(rescale).unwrap_or(0);
        if k == 0 {
            Place::Matrix(n)
        } else {
            Place::Scaled(n, (1u64 << k.min(62)) as f32)
        }
    };
    Some(match (t, suffix) {
        ("time_mix_lerp_fused", "weight") => Place::Split(
            V6_LERPS
                .iter()
                .map(|n| at(&format!("time_maa_{n}")))
                .collect(),
        ),
        ("time_mix_lerp_x", "weight") => Place::As(at("time_maa_x"), vec![c]),
        ("time_mix_w1", "weight") => Place::Transposed(at("time_maa_w1")),
        ("time_mix_w2", "weight") => Place::TransposedStack(at("time_maa_w2")),
        ("time_mix_decay", "weight") => Place::As(at("time_decay"), vec![c]),
        ("time_mix_decay_w1", "weight") => Place::Transposed(at("time_decay_w1")),
        ("time_mix_decay_w2", "weight") => Place::Transposed(at("time_decay_w2")),
        ("time_mix_first", "weight") => Place::As(at("time_faaaa"), shape.to_vec()),
        ("time_mix_key" | "time_mix_value" | "time_mix_receptance" | "time_mix_gate", "weight") => {
            Place::Matrix(at(&format!("{}.weight", &t["time_mix_".len()..])))
        }
        ("time_mix_output", "weight") => scaled(at("output.weight")),
        ("channel_mix_lerp_k", "weight") => Place::As(format!("{b}.ffn.time_maa_k"), vec![c]),
        ("channel_mix_lerp_r", "weight") => Place::As(format!("{b}.ffn.time_maa_r"), vec![c]),
        ("channel_mix_key" | "channel_mix_receptance", "weight") => {
            Place::Matrix(format!("{b}.ffn.{}.weight", &t["channel_mix_".len()..]))
        }
        ("channel_mix_value", "weight") => scaled(format!("{b}.ffn.value.weight")),
        _ => return None,
    })
}

/// Where a tensor of llama.cpp's `rwkv7` layout goes; `None` for a name it does not have.
fn rwkv7_place(name: &str, shape: &[usize], head_size: usize) -> Option<Place> {
    let (i, b, t, suffix, c) = match gguf_name(name, shape)? {
        GgufName::Placed(p) => return Some(p),
        GgufName::Block(i, b, t, suffix, c) => (i, b, t, suffix, c),
    };
    let at = |n: &str| format!("{b}.att.{n}");
    Some(match (t, suffix) {
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

/// The `[cols, rows]` transpose of a row-major `[rows, cols]` matrix.
fn transpose<T: Copy + Default>(src: &[T], rows: usize, cols: usize) -> Vec<T> {
    let mut out = vec![T::default(); src.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = src[r * cols + c];
        }
    }
    out
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
    if arch != "rwkv7" && arch != "rwkv6" {
        let hint = match arch.as_str() {
            "rwkv6qwen2" | "arwkv7" => {
                "; rwkv reads llama.cpp's rwkv6 and rwkv7 files (RWKV's own)"
            }
            _ => " (not an RWKV model)",
        };
        return Err(Error::bad(format!(
            "{what}: GGUF architecture {arch:?} is not supported{hint}"
        )));
    }
    let meta_uint = |k: &str| -> Result<usize> {
        g.get(&format!("{arch}.{k}"))
            .and_then(Value::as_uint)
            .map(|v| v as usize)
            .ok_or_else(|| Error::bad(format!("{what}: GGUF metadata {arch}.{k} missing")))
    };
    let head_size = meta_uint("wkv.head_size")?;
    let rescale = if arch == "rwkv6" {
        meta_uint("rescale_every_n_layers").unwrap_or(0)
    } else {
        0
    };
    ck.layout = format!("llama.cpp GGUF v{} ({arch})", g.version);
    ck.vocab = gguf_vocab(&g, what)?;
    for t in &g.tensors {
        let place = if arch == "rwkv6" {
            rwkv6_place(&t.name, &t.shape, rescale)
        } else {
            rwkv7_place(&t.name, &t.shape, head_size)
        };
        let place = place.ok_or_else(|| {
            Error::bad(format!(
                "{what}: unknown tensor {} (shape {:?}; not part of llama.cpp's {arch} layout)",
                t.name, t.shape
            ))
        })?;
        place_tensor(ck, &map, None, t, place, what)?;
    }
    Ok(())
}

/// Enters tensor `t` of `map` (the checkpoint's file when `src` is `None`, else its buffer
/// `src`) at its official place, in place where its type allows.
fn place_tensor(
    ck: &mut Checkpoint,
    map: &[u8],
    src: Option<usize>,
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
        converted: src,
    };
    let owned = |dtype: DType, shape: Vec<usize>, buf: usize, nbytes: usize| TensorMeta {
        dtype,
        shape,
        offset: 0,
        nbytes,
        converted: Some(buf),
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
                    owned(DType::F32, shape, ck.keep_f32(&v), numel * 4)
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
                    let qn = q.len();
                    let qo = ck.keep(q);
                    ck.insert(name.clone(), owned(dtype, vec![rows, packed], qo, qn))?;
                    let dof = ck.keep_f32(&d);
                    ck.insert(
                        format!("{name}.scales"),
                        owned(DType::F32, vec![rows, cols / QBLOCK], dof, d.len() * 4),
                    )
                }
                ty => match in_place_dtype(ty) {
                    Some(d) => ck.insert(name, in_file(d, vec![rows, cols], t.offset, t.nbytes)),
                    None => {
                        let v = dequantized(map, t);
                        let o = ck.keep_f32(&v);
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
            // Floats keep their type, transposed as 16- or 32-bit words; the rest as f32.
            let (dtype, out): (DType, Vec<u8>) = match in_place_dtype(t.ty) {
                Some(d) if d.size() == 2 => {
                    let w: Vec<u16> = map[t.offset..t.offset + t.nbytes]
                        .chunks_exact(2)
                        .map(|b| u16::from_le_bytes([b[0], b[1]]))
                        .collect();
                    let tw = transpose(&w, rows, cols);
                    (d, tw.iter().flat_map(|x| x.to_le_bytes()).collect())
                }
                _ => {
                    let tv = transpose(&dequantized(map, t), rows, cols);
                    (DType::F32, gguf::quantize(GgmlType::F32, &tv))
                }
            };
            let n = out.len();
            let o = ck.keep(out);
            ck.insert(name, owned(dtype, vec![cols, rows], o, n))
        }
        Place::TransposedStack(name) => {
            let [n, rows, cols] = t.shape[..] else {
                return Err(Error::bad(format!(
                    "{what}: tensor {} has shape {:?}, expected [n, a, b]",
                    t.name, t.shape
                )));
            };
            let v = dequantized(map, t);
            let out: Vec<f32> = v
                .chunks_exact(rows * cols)
                .flat_map(|m| transpose(m, rows, cols))
                .collect();
            let o = ck.keep_f32(&out);
            ck.insert(name, owned(DType::F32, vec![n, cols, rows], o, numel * 4))
        }
        Place::Scaled(name, factor) => {
            let shape = t.shape.clone();
            let v: Vec<f32> = dequantized(map, t).iter().map(|x| x * factor).collect();
            let o = ck.keep_f32(&v);
            ck.insert(name, owned(DType::F32, shape, o, numel * 4))
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
                        let o = ck.keep_f32(&v[k * c..(k + 1) * c]);
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

/// Where an official RWKV-6 or RWKV-7 tensor goes in llama.cpp's `rwkv6` or `rwkv7` layout
/// (the inverse of [`rwkv6_place`] with `rescale_every` 0 and of [`rwkv7_place`]): its
/// llama.cpp name and how its values are arranged there.
fn gguf_out_name(generation: Generation, name: &str) -> Option<(String, Put)> {
    let g = |n: &str| Some((n.to_string(), Put::Same));
    match name {
        "emb.weight" => return g("token_embd.weight"),
        "blocks.0.ln0.weight" => return g("token_embd_norm.weight"),
        "blocks.0.ln0.bias" => return g("token_embd_norm.bias"),
        "ln_out.weight" => return g("output_norm.weight"),
        "ln_out.bias" => return g("output_norm.bias"),
        "head.weight" => return g("output.weight"),
        _ => {}
    }
    let (i, _, t) = block_of(name, "blocks.")?;
    let blk = |n: &str| format!("blk.{i}.{n}");
    let (module, t) = t.split_once('.')?;
    match (module, t) {
        ("ln1", s) => return Some((blk(&format!("attn_norm.{s}")), Put::Same)),
        ("ln2", s) => return Some((blk(&format!("attn_norm_2.{s}")), Put::Same)),
        ("att", "ln_x.weight" | "ln_x.bias") => {
            return Some((
                blk(&format!("time_mix_ln.{}", &t["ln_x.".len()..])),
                Put::Same,
            ))
        }
        _ => {}
    }
    let lerp = |names: &[&str], x: &str| {
        Some((
            blk("time_mix_lerp_fused.weight"),
            Put::Lerp(names.iter().position(|l| *l == x)?, names.len()),
        ))
    };
    match generation {
        Generation::V7 => Some(match (module, t) {
            ("att", x) if V7_LERPS.contains(&x) => return lerp(&V7_LERPS, x),
            ("att", "w0" | "a0" | "v0" | "k_k" | "k_a" | "r_k") => {
                (blk(&format!("time_mix_{t}.weight")), Put::Flat)
            }
            ("att", "w1" | "w2" | "a1" | "a2" | "v1" | "v2" | "g1" | "g2") => {
                (blk(&format!("time_mix_{t}.weight")), Put::Transpose)
            }
            ("att", "key.weight" | "value.weight" | "receptance.weight" | "output.weight") => {
                (blk(&format!("time_mix_{t}")), Put::Same)
            }
            ("ffn", "x_k") => (blk("channel_mix_lerp_k.weight"), Put::Flat),
            ("ffn", "key.weight" | "value.weight") => (blk(&format!("channel_mix_{t}")), Put::Same),
            _ => return None,
        }),
        Generation::V6_0 => Some(match (module, t) {
            ("att", "time_maa_x") => (blk("time_mix_lerp_x.weight"), Put::Flat),
            ("att", x)
                if x.strip_prefix("time_maa_")
                    .is_some_and(|m| V6_LERPS.contains(&m)) =>
            {
                return lerp(&V6_LERPS, &x["time_maa_".len()..])
            }
            ("att", "time_maa_w1") => (blk("time_mix_w1.weight"), Put::Transpose),
            ("att", "time_maa_w2") => (blk("time_mix_w2.weight"), Put::TransposeEach),
            ("att", "time_decay") => (blk("time_mix_decay.weight"), Put::Flat),
            ("att", "time_decay_w1" | "time_decay_w2") => (
                blk(&format!(
                    "time_mix_decay_{}.weight",
                    &t["time_decay_".len()..]
                )),
                Put::Transpose,
            ),
            ("att", "time_faaaa") => (blk("time_mix_first.weight"), Put::Same),
            (
                "att",
                "key.weight" | "value.weight" | "receptance.weight" | "gate.weight"
                | "output.weight",
            ) => (blk(&format!("time_mix_{t}")), Put::Same),
            ("ffn", "time_maa_k" | "time_maa_r") => (
                blk(&format!(
                    "channel_mix_lerp_{}.weight",
                    &t["time_maa_".len()..]
                )),
                Put::Flat,
            ),
            ("ffn", "key.weight" | "value.weight" | "receptance.weight") => {
                (blk(&format!("channel_mix_{t}")), Put::Same)
            }
            _ => return None,
        }),
        Generation::V4 | Generation::V5_2 | Generation::Gpt => None,
    }
}

/// How an official tensor's values are arranged in its llama.cpp tensor.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Put {
    /// As they are, in the same shape.
    Same,
    /// Flattened to one dimension.
    Flat,
    /// The `[in, out]` matrix transposed to `[out, in]`.
    Transpose,
    /// Each matrix of an `[n, a, b]` stack transposed (`[n, b, a]`).
    TransposeEach,
    /// Slice `k` of the `n` fused token-shift mixes.
    Lerp(usize, usize),
}

/// The ggml types `rwkv convert` writes.
pub const GGUF_OUT: [GgmlType; 5] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q8_0,
    GgmlType::Q4_0,
];

/// llama.cpp's `general.file_type` of a file mostly in `ty`.
fn file_type(ty: GgmlType) -> u32 {
    match ty {
        GgmlType::F16 => 1,
        GgmlType::Q4_0 => 2,
        GgmlType::Q8_0 => 7,
        GgmlType::BF16 => 32,
        _ => 0,
    }
}

/// Every value of an official tensor as f32 (quantized matrices of `rwkv convert --quant`
/// dequantized).
fn values(ck: &Checkpoint, name: &str) -> Result<Vec<f32>> {
    let m = ck.meta(name)?;
    match m.dtype {
        DType::I8 | DType::U8 => {
            let per = if m.dtype == DType::I8 { 1 } else { 2 };
            let (rows, cols) = (m.shape[0], m.shape.get(1).copied().unwrap_or(0) * per);
            match ck.quantized_matrix(name, rows, cols)? {
                Some(q) => Ok(q.to_f32()),
                None => Err(Error::Internal(format!("{name} is not quantized"))),
            }
        }
        _ => ck.f32_vec(name),
    }
}

/// Writes an RWKV-6 or RWKV-7 checkpoint (read from any layout) as llama.cpp's `rwkv6` or
/// `rwkv7` GGUF, the way its `convert_hf_to_gguf.py` writes one: the weight matrices,
/// embedding and LoRAs in `ty` (F16 where a quantized type's block does not divide a row), the
/// vectors, the fused token-shift mixes, RWKV-7's decay LoRA and RWKV-6's mix and decay LoRAs
/// and bonus in F32; RWKV-7's block 0 given the dummy value LoRA llama.cpp expects, RWKV-6's
/// `rescale_every` 0 (no matrix divided); and the vocabulary `vocab` (each id's bytes; empty
/// for ids that do not decode).
pub fn write_gguf(ck: &Checkpoint, path: &Path, ty: GgmlType, vocab: &[Vec<u8>]) -> Result<()> {
    let what = ck.path().display().to_string();
    let info = detect(ck)?;
    let arch = match info.generation {
        Generation::V7 => "rwkv7",
        Generation::V6_0 => "rwkv6",
        g => {
            return Err(Error::bad(format!(
                "{what}: GGUF output is written for RWKV-6 and RWKV-7 (llama.cpp's rwkv6 and \
                 rwkv7); this is RWKV {g}"
            )))
        }
    };
    if info.deep_embed > 0 {
        return Err(Error::bad(format!(
            "{what}: RWKV-7a's DeepEmbed (tensor blocks.0.ffn.s_emb.weight) has no place in \
             llama.cpp's rwkv7 layout; convert it to .safetensors or .pth instead"
        )));
    }
    if !GGUF_OUT.contains(&ty) {
        return Err(Error::Internal(format!(
            "rwkv does not write {}",
            ty.name()
        )));
    }
    if vocab.len() != info.vocab_size {
        return Err(Error::bad(format!(
            "{what}: the vocabulary has {} tokens but the model has {} rows",
            vocab.len(),
            info.vocab_size
        )));
    }
    // llama.cpp's names in the order its converter writes them, each with its values.
    let mut out: BTreeMap<String, (Vec<usize>, Vec<f32>)> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    let c = info.n_embd;
    for name in ck.names().iter().filter(|n| !n.ends_with(".scales")) {
        let (gname, put) = gguf_out_name(info.generation, name).ok_or_else(|| {
            Error::bad(format!(
                "{what}: tensor {name} has no place in llama.cpp's {arch} layout"
            ))
        })?;
        let shape = ck.meta(name)?.shape.clone();
        let shape = if ck.meta(name)?.dtype == DType::U8 {
            vec![shape[0], shape[1] * 2]
        } else {
            shape
        };
        let v = values(ck, name)?;
        let entry = out.entry(gname.clone()).or_insert_with(|| {
            order.push(gname.clone());
            (Vec::new(), Vec::new())
        });
        match put {
            Put::Same => *entry = (shape, v),
            Put::Flat => *entry = (vec![v.len()], v),
            Put::Transpose => {
                let (rows, cols) = (shape[0], shape[1]);
                *entry = (vec![cols, rows], transpose(&v, rows, cols));
            }
            Put::TransposeEach => {
                let (n, rows, cols) = (shape[0], shape[1], shape[2]);
                let t = v
                    .chunks_exact(rows * cols)
                    .flat_map(|m| transpose(m, rows, cols))
                    .collect();
                *entry = (vec![n, cols, rows], t);
            }
            Put::Lerp(k, n) => {
                if entry.1.is_empty() {
                    *entry = (vec![n, 1, 1, c], vec![0.0; n * c]);
                }
                entry.1[k * c..(k + 1) * c].copy_from_slice(&v);
            }
        }
    }
    if arch == "rwkv7" {
        // llama.cpp reads a value LoRA in every block: block 0's is a copy of its `a` LoRA.
        for (v, a) in [("v0", "a0"), ("v1", "a1"), ("v2", "a2")] {
            let src = out.get(&format!("blk.0.time_mix_{a}.weight")).cloned();
            if let Some(t) = src {
                let name = format!("blk.0.time_mix_{v}.weight");
                order.push(name.clone());
                out.insert(name, t);
            }
        }
    }
    let mut w = gguf::Writer::default();
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    w.str("general.architecture", arch);
    w.str("general.type", "model");
    w.str("general.name", &stem);
    let u = |w: &mut gguf::Writer, k: &str, v: usize| w.u32(&format!("{arch}.{k}"), v as u32);
    u(&mut w, "context_length", 1 << 20);
    u(&mut w, "embedding_length", c);
    u(&mut w, "block_count", info.n_layer);
    w.f32(&format!("{arch}.attention.layer_norm_epsilon"), 1e-5);
    let rank = |k: &str| info.lora.get(k).copied().unwrap_or(0);
    if arch == "rwkv7" {
        u(&mut w, "wkv.head_size", info.head_size);
        u(&mut w, "attention.decay_lora_rank", rank("w"));
        u(&mut w, "attention.iclr_lora_rank", rank("a"));
        u(&mut w, "attention.value_residual_mix_lora_rank", rank("v"));
        u(&mut w, "attention.gate_lora_rank", rank("g"));
    } else {
        u(&mut w, "rescale_every_n_layers", 0);
        u(&mut w, "wkv.head_size", info.head_size);
        u(&mut w, "time_mix_extra_dim", rank("maa"));
        u(&mut w, "time_decay_extra_dim", rank("decay"));
    }
    u(&mut w, "feed_forward_length", info.ffn_dim);
    w.u32("general.file_type", file_type(ty));
    u(&mut w, "attention.head_count", 0);
    w.u32("general.quantization_version", 2);
    w.str("tokenizer.ggml.model", "rwkv");
    let mut texts = Vec::with_capacity(vocab.len());
    let mut types = Vec::with_capacity(vocab.len());
    for (id, b) in vocab.iter().enumerate() {
        let (text, t) = match (id, b.is_empty()) {
            (0, _) => ("<s>".to_string(), 3),
            (_, false) => (escape_repr(b), 1),
            (_, true) => (format!("[PAD{id}]"), 5),
        };
        texts.push(text);
        types.push(t);
    }
    w.strs("tokenizer.ggml.tokens", &texts);
    w.i32s("tokenizer.ggml.token_type", &types);
    if vocab.get(261).is_some_and(|b| b == b"\n\n") {
        w.u32("tokenizer.ggml.eot_token_id", 261);
    }
    w.u32("tokenizer.ggml.bos_token_id", 0);
    w.u32("tokenizer.ggml.eos_token_id", 0);
    w.str("tokenizer.chat_template", "rwkv-world");
    for name in order {
        let (shape, v) = out.remove(&name).expect("listed");
        let t = if shape.len() == 1 || GGUF_F32.iter().any(|s| name.ends_with(s)) {
            GgmlType::F32
        } else if ty.is_quantized() && !shape[shape.len() - 1].is_multiple_of(ty.block().0) {
            GgmlType::F16
        } else {
            ty
        };
        w.tensor(name, shape, t, gguf::quantize(t, &v));
    }
    w.write(path)
}

/// The tensors llama.cpp's converter always writes in F32 (with every vector): the fused
/// mixes, RWKV-7's decay LoRA (`time_mix_w1/w2`, RWKV-6's mix LoRA of the same names), RWKV-6's
/// decay LoRA and its bonus `time_mix_first`.
const GGUF_F32: [&str; 6] = [
    "time_mix_lerp_fused.weight",
    "time_mix_w1.weight",
    "time_mix_w2.weight",
    "time_mix_decay_w1.weight",
    "time_mix_decay_w2.weight",
    "time_mix_first.weight",
];

/// Python's `repr` of `bytes` without the `b'…'`: the token text llama.cpp's converter writes
/// for the World vocabulary (read back by [`unescape_repr`]).
pub fn escape_repr(b: &[u8]) -> String {
    let double = b.contains(&b'\'') && !b.contains(&b'"');
    let mut s = String::with_capacity(b.len());
    for &c in b {
        match c {
            b'\\' => s.push_str("\\\\"),
            b'\'' if !double => s.push_str("\\'"),
            b'\n' => s.push_str("\\n"),
            b'\r' => s.push_str("\\r"),
            b'\t' => s.push_str("\\t"),
            0x20..=0x7e => s.push(c as char),
            _ => s.push_str(&format!("\\x{c:02x}")),
        }
    }
    s
}

/// A map of a layout's tensors (name and shape) onto the official ones (`None`: not a name
/// it has).
type Rename = fn(&str, &[usize]) -> Option<Place>;

/// The Hugging Face layouts read: from `config.json`'s architecture (and, for
/// `RWKV7ForCausalLM`, which of its two layouts), the layout's name and its tensors' map.
fn hf_name_map(arch: &str, cfg: &serde_json::Value) -> Option<(&'static str, Rename)> {
    match arch {
        // RWKV-block's remote code (its `hf_builder.py`, behind RWKV-org's "-HF" repositories
        // of that project) stores the official names unchanged; its config names the
        // attention and channel-mix widths, which fla's does not.
        "RWKV7ForCausalLM" if cfg.get("hidden_size_att").is_some() => Some((
            "RWKV-block RWKV7ForCausalLM (RWKV-7, official names)",
            |n, s| Some(Place::As(n.to_string(), s.to_vec())),
        )),
        "RwkvForCausalLM" => Some(("transformers RwkvForCausalLM (RWKV-4)", |n, s| {
            transformers_rwkv4(n).map(|o| Place::As(o, s.to_vec()))
        })),
        "RWKV7ForCausalLM" => Some(("fla-hub RWKV7ForCausalLM (RWKV-7)", fla_rwkv7)),
        "Rwkv5ForCausalLM" | "Rwkv6ForCausalLM" => Some(("RWKV-5/6 remote-code", |n, s| {
            rwkv56_hf(n).map(|o| Place::As(o, s.to_vec()))
        })),
        _ => None,
    }
}

/// The flash-linear-attention project's RWKV-7 names (its `convert_from_rwkv7.py`):
/// `model.layers.N.attn.*` with the six token-shift mixes as `x_r … x_g` (or, in its earlier
/// releases, fused into `x_x` `[6, C]`, order r w k v a g), each LoRA an `nn.Linear` pair (`X_lora.lora.0.weight` `[rank, C]`,
/// `lora.2.weight` `[C, rank]`, the `X0` vector as `lora.2.bias`), `r_proj k_proj v_proj
/// o_proj g_norm` for `receptance key value output ln_x`, `attn_norm`/`ffn_norm`/`pre_norm`
/// for `ln1`/`ln2`/`ln0`, `model.norm` and `lm_head`.
fn fla_rwkv7(name: &str, shape: &[usize]) -> Option<Place> {
    let same = |n: &str| Some(Place::As(n.to_string(), shape.to_vec()));
    match name {
        "model.embeddings.weight" => return Some(Place::Matrix("emb.weight".into())),
        "model.norm.weight" => return same("ln_out.weight"),
        "model.norm.bias" => return same("ln_out.bias"),
        "lm_head.weight" => return Some(Place::Matrix("head.weight".into())),
        _ => {}
    }
    let (i, b, t) = block_of(name, "model.layers.")?;
    let (module, t) = t.split_once('.')?;
    Some(match (module, t) {
        ("pre_norm", s) => Place::As(format!("{b}.ln0.{s}"), shape.to_vec()),
        ("attn_norm", s) => Place::As(format!("{b}.ln1.{s}"), shape.to_vec()),
        ("ffn_norm", s) => Place::As(format!("{b}.ln2.{s}"), shape.to_vec()),
        ("attn", "x_x") => Place::Split(V7_LERPS.iter().map(|n| format!("{b}.att.{n}")).collect()),
        ("attn", x) if V7_LERPS.contains(&x) => Place::As(format!("{b}.att.{x}"), shape.to_vec()),
        ("attn", "k_k" | "k_a" | "r_k") => Place::As(format!("{b}.att.{t}"), shape.to_vec()),
        ("attn", p) if p.contains("_lora.lora.") => {
            let (x, part) = p.split_once("_lora.lora.")?;
            if !matches!(x, "w" | "a" | "v" | "g") {
                return None;
            }
            if i == 0 && x == "v" {
                return Some(Place::Unused);
            }
            match part {
                "0.weight" => Place::Transposed(format!("{b}.att.{x}1")),
                "2.weight" => Place::Transposed(format!("{b}.att.{x}2")),
                "2.bias" if x != "g" => Place::As(format!("{b}.att.{x}0"), shape.to_vec()),
                _ => return None,
            }
        }
        ("attn", p) => {
            let (proj, s) = p.split_once('.')?;
            let official = match proj {
                "r_proj" => "receptance",
                "k_proj" => "key",
                "v_proj" => "value",
                "o_proj" => "output",
                "g_norm" => "ln_x",
                _ => return None,
            };
            let n = format!("{b}.att.{official}.{s}");
            if official == "ln_x" {
                Place::As(n, shape.to_vec())
            } else {
                Place::Matrix(n)
            }
        }
        ("ffn", "x_k") => Place::As(format!("{b}.ffn.x_k"), shape.to_vec()),
        ("ffn", "key.weight" | "value.weight") => Place::Matrix(format!("{b}.ffn.{t}")),
        _ => return None,
    })
}

/// transformers' `RwkvForCausalLM` names (its `convert_rwkv_checkpoint_to_hf.py` renames the
/// official ones and changes no values): `rwkv.` before all but the head, `embeddings`,
/// `pre_ln`, `attention`, `feed_forward` and the spelled-out token-shift mixes. Its
/// `rescale_every` halves the output and value weights and the residual stream together at
/// run time (fp16 headroom), which leaves the stored weights and the function unchanged.
fn transformers_rwkv4(name: &str) -> Option<String> {
    let n = rwkv56_hf(name)?;
    Some(
        n.replace(".time_mix_key", ".time_mix_k")
            .replace(".time_mix_value", ".time_mix_v")
            .replace(".time_mix_receptance", ".time_mix_r"),
    )
}

/// The RWKV-5/6 Hugging Face names (the `modeling_rwkv5.py`/`modeling_rwkv6.py` remote code,
/// as llama.cpp's converter reads them): transformers' RWKV-4 renames without its spelled-out
/// mixes (`time_maa_*`, `time_decay*`, `time_faaaa` keep their official names).
fn rwkv56_hf(name: &str) -> Option<String> {
    if name == "head.weight" {
        return Some(name.into());
    }
    let n = name.strip_prefix("rwkv.")?;
    if n == "embeddings.weight" {
        return Some("emb.weight".into());
    }
    Some(
        n.replacen("blocks.0.pre_ln.", "blocks.0.ln0.", 1)
            .replace(".attention.", ".att.")
            .replace(".feed_forward.", ".ffn."),
    )
}

/// Opens a Hugging Face model directory: `config.json`, then `model.safetensors`, the shards
/// of `model.safetensors.index.json`, or `pytorch_model.bin` (or its index), each memory-mapped;
/// the tensors renamed to the official names; the tokenizer beside them.
pub(super) fn open_hf_dir(dir: &Path) -> Result<Checkpoint> {
    let cfg_path = dir.join("config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
    let cfg: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::bad(format!("{}: not valid JSON: {e}", cfg_path.display())))?;
    let arch = cfg["architectures"][0].as_str().unwrap_or("").to_string();
    let (layout, rename) = hf_name_map(&arch, &cfg).ok_or_else(|| {
        Error::bad(format!(
            "{}: architecture {arch:?} is not a layout rwkv reads (RwkvForCausalLM)",
            cfg_path.display()
        ))
    })?;
    let files = weight_files(dir)?;
    let mut ck = Checkpoint {
        path: dir.to_path_buf(),
        format: Format::Safetensors,
        map: Arc::new(Bytes::Owned(Vec::new())),
        converted: Vec::new(),
        tokenizer_file: None,
        file_bytes: 0,
        order: Vec::new(),
        tensors: std::collections::HashMap::new(),
        metadata: BTreeMap::new(),
        layout: format!("Hugging Face {layout}"),
        vocab: None,
    };
    for (file, wanted) in files {
        let shard = Checkpoint::open(&file)?;
        ck.format = shard.format;
        ck.file_bytes += shard.file_bytes;
        let buf = ck.converted.len();
        ck.converted.push(shard.map.clone());
        if let Some(missing) = wanted.iter().flatten().find(|n| !shard.has(n)) {
            return Err(Error::bad(format!(
                "{}: tensor {missing}, which the index puts there, is missing",
                file.display()
            )));
        }
        let fname = file.display().to_string();
        for name in shard.names() {
            if let Some(w) = &wanted {
                if !w.contains(name.as_str()) {
                    return Err(Error::bad(format!(
                        "{fname}: tensor {name} is not the one the index puts there"
                    )));
                }
            }
            let m = shard.get(name).expect("listed");
            let place = rename(name, &m.shape).ok_or_else(|| {
                Error::bad(format!(
                    "{fname}: unknown tensor {name} (not part of the {layout} layout)"
                ))
            })?;
            let ty = match m.dtype {
                DType::F32 => GgmlType::F32,
                DType::F16 => GgmlType::F16,
                DType::BF16 => GgmlType::BF16,
                d => {
                    return Err(Error::bad(format!(
                        "{fname}: tensor {name} has dtype {d}, expected a float type"
                    )))
                }
            };
            let t = TensorInfo {
                name: name.clone(),
                shape: m.shape.clone(),
                ty,
                offset: m.offset,
                nbytes: m.nbytes,
            };
            place_tensor(&mut ck, &shard.map, Some(buf), &t, place, &fname)?;
        }
    }
    let info = detect(&ck)?;
    for (key, dim, got) in [
        ("hidden_size", "width", info.n_embd),
        ("num_hidden_layers", "layers", info.n_layer),
        ("vocab_size", "vocab", info.vocab_size),
    ] {
        let Some(want) = cfg[key].as_u64() else {
            continue;
        };
        let got = got as u64;
        if got != want {
            return Err(Error::bad(format!(
                "{}: {key} is {want} but the tensors make {dim} {got}",
                cfg_path.display()
            )));
        }
    }
    ck.tokenizer_file = ["tokenizer.json", "rwkv_vocab_v20230424.txt"]
        .iter()
        .map(|f| dir.join(f))
        .find(|p| p.is_file());
    Ok(ck)
}

/// The weight files of a directory, each with the tensor names its index puts in it.
#[allow(clippy::type_complexity)]
fn weight_files(
    dir: &Path,
) -> Result<
    Vec<(
        std::path::PathBuf,
        Option<std::collections::HashSet<String>>,
    )>,
> {
    for (single, index) in [
        ("model.safetensors", "model.safetensors.index.json"),
        ("pytorch_model.bin", "pytorch_model.bin.index.json"),
    ] {
        let ip = dir.join(index);
        if ip.is_file() {
            let text = std::fs::read_to_string(&ip).map_err(|e| Error::io(&ip, e))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| Error::bad(format!("{}: not valid JSON: {e}", ip.display())))?;
            let map = v["weight_map"]
                .as_object()
                .ok_or_else(|| Error::bad(format!("{}: no weight_map object", ip.display())))?;
            let mut by_file: BTreeMap<String, std::collections::HashSet<String>> = BTreeMap::new();
            for (tensor, file) in map {
                let file = file
                    .as_str()
                    .filter(|f| !f.contains('/') && !f.contains(".."))
                    .ok_or_else(|| {
                        Error::bad(format!(
                            "{}: weight_map entry {tensor} is not a file name beside the index",
                            ip.display()
                        ))
                    })?;
                by_file
                    .entry(file.to_string())
                    .or_default()
                    .insert(tensor.clone());
            }
            let mut out = Vec::new();
            for (file, names) in by_file {
                let p = dir.join(&file);
                if !p.is_file() {
                    return Err(Error::bad(format!(
                        "{}: names shard {file}, which is missing",
                        ip.display()
                    )));
                }
                out.push((p, Some(names)));
            }
            return Ok(out);
        }
        let sp = dir.join(single);
        if sp.is_file() {
            return Ok(vec![(sp, None)]);
        }
    }
    Err(Error::bad(format!(
        "{}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin",
        dir.display()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gguf_names_are_the_inverse_of_the_map() {
        for (dir, generation) in [("v7", Generation::V7), ("v6_0", Generation::V6_0)] {
            let path = format!(
                "{}/../../tests/fixtures/{dir}/model.pth",
                env!("CARGO_MANIFEST_DIR")
            );
            let ck = Checkpoint::open(path).unwrap();
            for name in ck.names() {
                let p = ck.get(name).unwrap();
                let (g, put) = gguf_out_name(generation, name).unwrap_or_else(|| panic!("{name}"));
                let shape = match put {
                    Put::Transpose => vec![p.shape[1], p.shape[0]],
                    Put::TransposeEach => vec![p.shape[0], p.shape[2], p.shape[1]],
                    Put::Lerp(_, n) => vec![n, 1, 1, 128],
                    Put::Flat => vec![p.shape.iter().product()],
                    Put::Same => p.shape.clone(),
                };
                let place = match generation {
                    Generation::V7 => rwkv7_place(&g, &shape, 64),
                    _ => rwkv6_place(&g, &shape, 0),
                };
                let back = match place.unwrap_or_else(|| panic!("{g}")) {
                    Place::As(n, _)
                    | Place::Matrix(n)
                    | Place::Transposed(n)
                    | Place::TransposedStack(n)
                    | Place::Scaled(n, _) => n,
                    Place::Split(v) => match put {
                        Put::Lerp(k, _) => v[k].clone(),
                        _ => panic!("{name}"),
                    },
                    Place::Unused => panic!("{name}"),
                };
                assert_eq!(&back, name);
            }
        }
    }

    #[test]
    fn repr_escapes_round_trip() {
        for b in [&b"it's"[..], b"a\"b'", b"\\\n\t\r\x00\xff ~", b"\""] {
            assert_eq!(unescape_repr(&escape_repr(b)).unwrap(), b);
        }
        assert_eq!(escape_repr(b"\xe4\n'"), "\\xe4\\n'");
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
