//! Writing checkpoints: `.safetensors`, and `.pth` in the layout `torch.save` produces (a zip
//! of stored entries holding a protocol-2 pickle of an `OrderedDict` of tensors), so files
//! converted here load in PyTorch and in the official package.

use super::gguf::GgmlType;
use super::{write_atomic, write_safetensors, Checkpoint, OutTensor};
use crate::error::{Error, Result};
use crate::tensor::{bf16_to_f32, DType, FloatData, WeightFormat, QBLOCK};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

/// CRC-32 (IEEE), as zip readers verify it.
fn crc32(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let t = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, e) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
            *e = c;
        }
        t
    });
    let mut c = !0u32;
    for &b in data {
        c = t[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

/// Streams a zip archive of stored entries, aligning each entry's data to 64 bytes (as
/// `torch.save` does) so that readers can map tensors in place.
struct ZipWriter<'w, W: Write> {
    w: &'w mut W,
    pos: u64,
    central: Vec<u8>,
    count: u64,
}

impl<'w, W: Write> ZipWriter<'w, W> {
    fn entry(&mut self, name: &str, data: &[u8]) -> std::io::Result<()> {
        let header = 30 + name.len() as u64;
        // Extra field padding: id 0x4246 ("FB", as PyTorch writes), then zeros.
        let mut pad = (64 - (self.pos + header + 4) % 64) % 64;
        let extra_len = 4 + pad;
        let off = self.pos;
        let crc = crc32(data);
        let size = data.len() as u64;
        let big = size >= 0xFFFF_FFFF || off >= 0xFFFF_FFFF;
        if big {
            // Zip64 sizes in the local header need a 20-byte extra field; keep alignment.
            pad = (64 - (self.pos + header + 4 + 20) % 64) % 64;
        }
        let mut lh = Vec::with_capacity(64 + name.len());
        lh.extend_from_slice(&0x0403_4b50u32.to_le_bytes());
        lh.extend_from_slice(&(if big { 45u16 } else { 20 }).to_le_bytes());
        lh.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0x21]); // flags, stored, time, date
        lh.extend_from_slice(&crc.to_le_bytes());
        let s32 = if big { 0xFFFF_FFFF } else { size as u32 };
        lh.extend_from_slice(&s32.to_le_bytes());
        lh.extend_from_slice(&s32.to_le_bytes());
        lh.extend_from_slice(&(name.len() as u16).to_le_bytes());
        let extra_total = if big { 20 + 4 + pad } else { extra_len };
        lh.extend_from_slice(&(extra_total as u16).to_le_bytes());
        lh.extend_from_slice(name.as_bytes());
        if big {
            lh.extend_from_slice(&1u16.to_le_bytes());
            lh.extend_from_slice(&16u16.to_le_bytes());
            lh.extend_from_slice(&size.to_le_bytes());
            lh.extend_from_slice(&size.to_le_bytes());
        }
        lh.extend_from_slice(&0x4246u16.to_le_bytes());
        lh.extend_from_slice(&(pad as u16).to_le_bytes());
        lh.resize(lh.len() + pad as usize, 0);
        self.w.write_all(&lh)?;
        self.w.write_all(data)?;
        self.pos += lh.len() as u64 + size;
        // Central directory record, with zip64 sizes and offset when needed.
        let c = &mut self.central;
        c.extend_from_slice(&0x0201_4b50u32.to_le_bytes());
        c.extend_from_slice(&(if big { 45u16 } else { 20 }).to_le_bytes());
        c.extend_from_slice(&(if big { 45u16 } else { 20 }).to_le_bytes());
        c.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0x21]);
        c.extend_from_slice(&crc.to_le_bytes());
        c.extend_from_slice(&s32.to_le_bytes());
        c.extend_from_slice(&s32.to_le_bytes());
        c.extend_from_slice(&(name.len() as u16).to_le_bytes());
        c.extend_from_slice(&(if big { 28u16 } else { 0 }).to_le_bytes());
        c.extend_from_slice(&[0; 8]); // comment, disk, internal and external attributes
        c.extend_from_slice(&[0; 2]);
        let o32 = if big { 0xFFFF_FFFF } else { off as u32 };
        c.extend_from_slice(&o32.to_le_bytes());
        c.extend_from_slice(name.as_bytes());
        if big {
            c.extend_from_slice(&1u16.to_le_bytes());
            c.extend_from_slice(&24u16.to_le_bytes());
            c.extend_from_slice(&size.to_le_bytes());
            c.extend_from_slice(&size.to_le_bytes());
            c.extend_from_slice(&off.to_le_bytes());
        }
        self.count += 1;
        Ok(())
    }

    fn finish(self) -> std::io::Result<()> {
        let cd_off = self.pos;
        let cd_len = self.central.len() as u64;
        self.w.write_all(&self.central)?;
        // Always write the zip64 records: simpler, and every reader accepts them.
        let z64 = cd_off + cd_len;
        let w = self.w;
        w.write_all(&0x0606_4b50u32.to_le_bytes())?;
        w.write_all(&44u64.to_le_bytes())?;
        w.write_all(&45u16.to_le_bytes())?;
        w.write_all(&45u16.to_le_bytes())?;
        w.write_all(&[0; 8])?;
        w.write_all(&self.count.to_le_bytes())?;
        w.write_all(&self.count.to_le_bytes())?;
        w.write_all(&cd_len.to_le_bytes())?;
        w.write_all(&cd_off.to_le_bytes())?;
        w.write_all(&0x0706_4b50u32.to_le_bytes())?;
        w.write_all(&0u32.to_le_bytes())?;
        w.write_all(&z64.to_le_bytes())?;
        w.write_all(&1u32.to_le_bytes())?;
        w.write_all(&0x0605_4b50u32.to_le_bytes())?;
        w.write_all(&[0; 4])?;
        w.write_all(&[0xff; 16])?; // counts, size and offset live in the zip64 record
        w.write_all(&[0, 0])?;
        Ok(())
    }
}

fn storage_class(d: DType) -> Result<&'static str> {
    Ok(match d {
        DType::F32 => "FloatStorage",
        DType::F16 => "HalfStorage",
        DType::BF16 => "BFloat16Storage",
        DType::F64 => "DoubleStorage",
        DType::I64 => "LongStorage",
        DType::I32 => "IntStorage",
        DType::U8 => "ByteStorage",
        DType::I8 => "CharStorage",
    })
}

fn p_str(out: &mut Vec<u8>, s: &str) {
    out.push(b'X');
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn p_int(out: &mut Vec<u8>, v: usize) {
    if v < 256 {
        out.extend_from_slice(&[b'K', v as u8]);
    } else if v < 65536 {
        out.push(b'M');
        out.extend_from_slice(&(v as u16).to_le_bytes());
    } else if v < 0x7fff_ffff {
        out.push(b'J');
        out.extend_from_slice(&(v as i32).to_le_bytes());
    } else {
        out.extend_from_slice(&[0x8a, 8]);
        out.extend_from_slice(&(v as i64).to_le_bytes());
    }
}

fn p_tuple(out: &mut Vec<u8>, xs: &[usize]) {
    out.push(b'(');
    for &x in xs {
        p_int(out, x);
    }
    out.push(b't');
}

/// The pickle `torch.save(state_dict)` writes for these tensors (storage `i` = tensor `i`).
fn state_dict_pickle(tensors: &[OutTensor<'_>]) -> Result<Vec<u8>> {
    let mut p = vec![0x80, 2];
    p.extend_from_slice(b"ccollections\nOrderedDict\n)R(");
    for (i, t) in tensors.iter().enumerate() {
        p_str(&mut p, &t.name);
        p.extend_from_slice(b"ctorch._utils\n_rebuild_tensor_v2\n(");
        p.push(b'(');
        p_str(&mut p, "storage");
        p.extend_from_slice(format!("ctorch\n{}\n", storage_class(t.dtype)?).as_bytes());
        p_str(&mut p, &i.to_string());
        p_str(&mut p, "cpu");
        p_int(&mut p, t.shape.iter().product());
        p.extend_from_slice(b"tQ");
        p_int(&mut p, 0);
        p_tuple(&mut p, &t.shape);
        let mut stride = vec![1usize; t.shape.len()];
        for d in (0..t.shape.len().saturating_sub(1)).rev() {
            stride[d] = stride[d + 1] * t.shape[d + 1];
        }
        p_tuple(&mut p, &stride);
        p.push(0x89); // requires_grad = False
        p.extend_from_slice(b"ccollections\nOrderedDict\n)R");
        p.extend_from_slice(b"tR");
    }
    p.extend_from_slice(b"u.");
    Ok(p)
}

/// Writes tensors as a PyTorch `.pth` file (atomically).
pub fn write_pth(path: &Path, tensors: &[OutTensor<'_>]) -> Result<()> {
    let stem = path
        .file_stem()
        .map(|s| {
            s.to_string_lossy()
                .replace(|c: char| !c.is_ascii_alphanumeric() && c != '_', "_")
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "archive".into());
    let pkl = state_dict_pickle(tensors)?;
    write_atomic(path, |w| {
        let mut z = ZipWriter {
            w,
            pos: 0,
            central: Vec::new(),
            count: 0,
        };
        z.entry(&format!("{stem}/data.pkl"), &pkl)?;
        z.entry(&format!("{stem}/.format_version"), b"1")?;
        z.entry(&format!("{stem}/.storage_alignment"), b"64")?;
        z.entry(&format!("{stem}/byteorder"), b"little")?;
        for (i, t) in tensors.iter().enumerate() {
            z.entry(&format!("{stem}/data/{i}"), &t.data)?;
        }
        z.entry(&format!("{stem}/version"), b"3\n")?;
        z.finish()
    })
}

fn convert_bytes(name: &str, from: DType, to: DType, b: &[u8]) -> Result<Vec<u8>> {
    let vals: Vec<f32> = match from {
        DType::F32 => b
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        DType::BF16 => b
            .chunks_exact(2)
            .map(|c| bf16_to_f32(u16::from_le_bytes([c[0], c[1]])))
            .collect(),
        DType::F16 => b
            .chunks_exact(2)
            .map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect(),
        _ => {
            return Err(Error::bad(format!(
                "tensor {name}: cannot convert {from} to {to}"
            )))
        }
    };
    let mut out = Vec::with_capacity(vals.len() * to.size());
    for v in vals {
        match to {
            DType::F32 => out.extend_from_slice(&v.to_le_bytes()),
            DType::BF16 => out.extend_from_slice(&half::bf16::from_f32(v).to_bits().to_le_bytes()),
            DType::F16 => {
                let h = half::f16::from_f32(v);
                if v.is_finite() && !h.to_f32().is_finite() {
                    return Err(Error::bad(format!(
                        "tensor {name}: value {v} does not fit in f16; keep bf16 or f32"
                    )));
                }
                out.extend_from_slice(&h.to_bits().to_le_bytes())
            }
            _ => return Err(Error::bad(format!("cannot convert to {to}"))),
        }
    }
    Ok(out)
}

/// The ggml type of a GGUF written by [`convert`]: Q8_0/Q4_0 for `--quant int8|q4`, else the
/// float dtype asked for, else the input's (its quantized matrices as Q8_0 or Q4_0).
fn gguf_type(
    ck: &Checkpoint,
    dtype: Option<DType>,
    quant: Option<WeightFormat>,
) -> Result<GgmlType> {
    let from_dtype = |d: DType| match d {
        DType::F16 => GgmlType::F16,
        DType::BF16 => GgmlType::BF16,
        DType::I8 => GgmlType::Q8_0,
        DType::U8 => GgmlType::Q4_0,
        _ => GgmlType::F32,
    };
    Ok(match quant {
        Some(WeightFormat::Int8) => GgmlType::Q8_0,
        Some(WeightFormat::Q4) => GgmlType::Q4_0,
        Some(WeightFormat::F32) => GgmlType::F32,
        Some(WeightFormat::F16) => GgmlType::F16,
        Some(WeightFormat::BF16) => GgmlType::BF16,
        None => match dtype {
            Some(d) => from_dtype(d),
            None => {
                let stored = ck
                    .get("blocks.0.att.key.weight")
                    .or_else(|| ck.get("head.weight"))
                    .map_or(DType::F32, |m| m.dtype);
                from_dtype(stored)
            }
        },
    })
}

/// The output container of [`convert`], from the file name.
pub fn format_for(path: &Path) -> Result<super::Format> {
    match path.extension().and_then(|e| e.to_str()) {
        Some("safetensors") => Ok(super::Format::Safetensors),
        Some("pth") | Some("pt") | Some("bin") => Ok(super::Format::Pth),
        Some("gguf") => Ok(super::Format::Gguf),
        _ => Err(Error::bad(format!(
            "{}: output name must end in .safetensors, .pth or .gguf",
            path.display()
        ))),
    }
}

/// Whether a tensor is one of the `[out, in]` weight matrices that `--quant` applies to (every
/// 2-D `.weight` but the embedding, which is a table lookup, not a product).
fn is_quantizable(name: &str, shape: &[usize]) -> bool {
    shape.len() == 2
        && name.ends_with(".weight")
        && name != "emb.weight"
        && shape[1].is_multiple_of(QBLOCK)
}

/// Converts a checkpoint of any readable layout to `.pth` or `.safetensors` with the official
/// key names and order, or to llama.cpp's GGUF (RWKV-6 and RWKV-7), optionally changing the float dtype
/// of every float tensor, and optionally storing the weight matrices quantized (`quant` int8
/// or q4: `name` holds the packed values and `name.scales` the block scales, so that loading
/// is a memory map; in a GGUF, Q8_0 and Q4_0). A GGUF carries a vocabulary: `vocab` (each
/// id's bytes), or the input's own.
pub fn convert(
    input: &Path,
    output: &Path,
    dtype: Option<DType>,
    quant: Option<WeightFormat>,
    vocab: Option<&[Vec<u8>]>,
) -> Result<()> {
    let ck = Checkpoint::open(input)?;
    if std::fs::canonicalize(input).ok() == std::fs::canonicalize(output).ok() {
        return Err(Error::bad(format!(
            "{}: output would overwrite the input",
            output.display()
        )));
    }
    convert_checkpoint(&ck, output, dtype, quant, vocab)
}

/// [`convert`] of an opened checkpoint (a model with a LoRA merged into it, say).
pub fn convert_checkpoint(
    ck: &Checkpoint,
    output: &Path,
    dtype: Option<DType>,
    quant: Option<WeightFormat>,
    vocab: Option<&[Vec<u8>]>,
) -> Result<()> {
    let fmt = format_for(output)?;
    if fmt == super::Format::Gguf {
        let ty = gguf_type(ck, dtype, quant)?;
        let vocab = vocab.or(ck.vocab().map(|v| &v[..])).ok_or_else(|| {
            Error::bad(format!(
                "{}: a GGUF needs the model's vocabulary: name its tokenizer",
                output.display()
            ))
        })?;
        return super::layout::write_gguf(ck, output, ty, vocab);
    }
    let mut tensors = Vec::with_capacity(ck.names().len());
    for name in ck.names() {
        let m = ck.get(name).expect("listed");
        let raw = ck.bytes(name)?;
        let is_float = matches!(m.dtype, DType::F32 | DType::F16 | DType::BF16);
        if let Some(q @ (WeightFormat::Int8 | WeightFormat::Q4)) = quant {
            if is_float && is_quantizable(name, &m.shape) {
                let fd = match q.convert(&ck.float_tensor(name)?, m.shape[1]) {
                    Some(FloatData::Q8(b)) | Some(FloatData::Q4(b)) => b,
                    _ => return Err(Error::Internal(format!("quantizing {name}"))),
                };
                let (rows, cols) = (m.shape[0], m.shape[1]);
                let (dt, packed) = if q == WeightFormat::Int8 {
                    (DType::I8, cols)
                } else {
                    (DType::U8, cols / 2)
                };
                tensors.push(OutTensor {
                    name: name.clone(),
                    dtype: dt,
                    shape: vec![rows, packed],
                    data: fd.q.to_vec().into(),
                });
                tensors.push(OutTensor::f32(
                    format!("{name}.scales"),
                    vec![rows, cols / QBLOCK],
                    &fd.d,
                ));
                continue;
            }
        }
        let (dt, data) = match dtype {
            Some(to) if is_float && to != m.dtype => {
                (to, convert_bytes(name, m.dtype, to, raw)?.into())
            }
            _ => (m.dtype, std::borrow::Cow::Borrowed(raw)),
        };
        tensors.push(OutTensor {
            name: name.clone(),
            dtype: dt,
            shape: m.shape.clone(),
            data,
        });
    }
    match fmt {
        super::Format::Safetensors => {
            let mut md = BTreeMap::new();
            md.insert("format".to_string(), "pt".to_string());
            if let Some(q) = quant {
                md.insert("rwkv_quant".to_string(), format!("{q:?}").to_lowercase());
            }
            write_safetensors(output, &tensors, &md)
        }
        super::Format::Pth
            if quant.is_some_and(|q| matches!(q, WeightFormat::Int8 | WeightFormat::Q4)) =>
        {
            Err(Error::bad(format!(
                "{}: quantized checkpoints are written as .safetensors only",
                output.display()
            )))
        }
        super::Format::Pth => write_pth(output, &tensors),
        super::Format::Gguf => unreachable!("GGUF output is written above"),
    }
}
