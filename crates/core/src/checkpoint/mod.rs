//! Reading and writing the official checkpoint formats.
//!
//! A [`Checkpoint`] is a memory map of a `.pth` (PyTorch zip + pickle, read by the restricted
//! reader in [`pickle`]) or `.safetensors` file plus a table of its tensors. Tensor bytes are
//! used in place from the map wherever the stored dtype is what the kernels consume; nothing is
//! copied at open time. This module knows nothing about the math of the models.

pub mod detect;
pub mod gguf;
pub mod layout;
pub mod lora;
pub mod pickle;
pub mod write;
pub mod zip;

use crate::error::{Error, Result};
use crate::tensor::{DType, FloatData, QBlocks, Shared, QBLOCK};
use memmap2::Mmap;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use detect::{Generation, ModelInfo};

/// The container format of a checkpoint file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// PyTorch `torch.save` zip archive.
    Pth,
    /// Hugging Face safetensors.
    Safetensors,
    /// llama.cpp's GGUF.
    Gguf,
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::Pth => "pth",
            Format::Safetensors => "safetensors",
            Format::Gguf => "gguf",
        })
    }
}

/// Where one tensor lives inside the map.
#[derive(Debug, Clone)]
pub struct TensorMeta {
    /// Stored element type.
    pub dtype: DType,
    /// Shape as stored.
    pub shape: Vec<usize>,
    offset: usize,
    nbytes: usize,
    /// The checkpoint's other buffer holding the bytes (a file of a directory's, or values
    /// converted at open time: dequantized, transposed or repacked), or `None` for bytes in
    /// the file.
    converted: Option<usize>,
}

impl TensorMeta {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// The bytes a checkpoint reads: a file's memory map, or a buffer made in memory.
enum Bytes {
    Map(Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Map(m) => m,
            Bytes::Owned(v) => v,
        }
    }
}

/// An opened checkpoint: a memory map (or an in-memory safetensors buffer) and the table of
/// its tensors.
pub struct Checkpoint {
    path: PathBuf,
    format: Format,
    map: Arc<Bytes>,
    /// The other buffers: the files of a Hugging Face directory, and tensors converted at
    /// open time (GGUF types the kernels do not read in place), one buffer each so that a
    /// model keeps only those it uses in place.
    converted: Vec<Arc<Bytes>>,
    tokenizer_file: Option<PathBuf>,
    file_bytes: usize,
    order: Vec<String>,
    tensors: HashMap<String, TensorMeta>,
    metadata: BTreeMap<String, String>,
    layout: String,
    vocab: Option<Arc<[Vec<u8>]>>,
}

fn dtype_from_st(d: safetensors::Dtype) -> Option<DType> {
    use safetensors::Dtype as S;
    Some(match d {
        S::F32 => DType::F32,
        S::F16 => DType::F16,
        S::BF16 => DType::BF16,
        S::F64 => DType::F64,
        S::I64 => DType::I64,
        S::I32 => DType::I32,
        S::U8 => DType::U8,
        S::I8 => DType::I8,
        _ => return None,
    })
}

impl Checkpoint {
    /// Opens a `.pth` or `.safetensors` file (detected from its content, not its name).
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        if path.is_dir() {
            return layout::open_hf_dir(path);
        }
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the map is read-only; a file truncated underneath a running process is the
        // same hazard every mmap-based loader (llama.cpp, safetensors) accepts.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        Self::index(path.to_path_buf(), Bytes::Map(map))
    }

    /// A checkpoint over the bytes of a `.safetensors` or `.pth` file held in memory (a
    /// trainer's current weights, say); `name` stands for the file in messages.
    pub fn from_bytes(name: impl Into<PathBuf>, bytes: Vec<u8>) -> Result<Self> {
        Self::index(name.into(), Bytes::Owned(bytes))
    }

    /// A checkpoint holding `tensors`, in memory (see [`Checkpoint::from_bytes`]).
    pub fn from_tensors(name: impl Into<PathBuf>, tensors: &[OutTensor<'_>]) -> Result<Self> {
        Self::from_bytes(name, safetensors_bytes(tensors, &BTreeMap::new())?)
    }

    fn index(path: PathBuf, map: Bytes) -> Result<Self> {
        let what = path.display().to_string();
        if map.len() < 8 {
            return Err(Error::bad(format!(
                "{what}: file too short ({} bytes) to be a checkpoint",
                map.len()
            )));
        }
        let mut ck = Checkpoint {
            path,
            format: Format::Safetensors,
            map: Arc::new(map),
            converted: Vec::new(),
            tokenizer_file: None,
            file_bytes: 0,
            order: Vec::new(),
            tensors: HashMap::new(),
            metadata: BTreeMap::new(),
            layout: layout::OFFICIAL.to_string(),
            vocab: None,
        };
        ck.file_bytes = ck.map.len();
        if ck.map[..4] == *b"PK\x03\x04" {
            ck.format = Format::Pth;
            ck.index_pth(&what)?;
        } else if ck.map[..4] == *gguf::MAGIC {
            ck.format = Format::Gguf;
            layout::index_gguf(&mut ck, &what)?;
        } else {
            ck.index_safetensors(&what)?;
        }
        Ok(ck)
    }

    fn insert(&mut self, name: String, meta: TensorMeta) -> Result<()> {
        if self.tensors.insert(name.clone(), meta).is_some() {
            return Err(Error::bad(format!(
                "{}: tensor {name} appears twice",
                self.path.display()
            )));
        }
        self.order.push(name);
        Ok(())
    }

    fn index_safetensors(&mut self, what: &str) -> Result<()> {
        let map = self.map.clone();
        let (header_len, meta) =
            safetensors::SafeTensors::read_metadata(&map[..]).map_err(|e| {
                Error::bad(format!("{what}: not a valid safetensors or .pth file: {e}"))
            })?;
        let data_start = 8 + header_len;
        if let Some(md) = meta.metadata() {
            self.metadata = md.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        }
        let st = safetensors::SafeTensors::deserialize(&map[..])
            .map_err(|e| Error::bad(format!("{what}: corrupt safetensors file: {e}")))?;
        // Keep the file's own order (by offset) so `names()` matches what the writer saved.
        let mut items: Vec<_> = meta.tensors().into_iter().collect();
        items.sort_by_key(|(_, info)| info.data_offsets.0);
        for (name, info) in items {
            let dtype = dtype_from_st(info.dtype).ok_or_else(|| {
                Error::bad(format!(
                    "{what}: tensor {name} has unsupported dtype {:?}",
                    info.dtype
                ))
            })?;
            let view = st
                .tensor(&name)
                .map_err(|e| Error::bad(format!("{what}: tensor {name}: {e}")))?;
            let offset = view.data().as_ptr() as usize - map.as_ptr() as usize;
            debug_assert_eq!(offset, data_start + info.data_offsets.0);
            let shape = info.shape.clone();
            self.insert(
                name,
                TensorMeta {
                    dtype,
                    shape,
                    offset,
                    nbytes: view.data().len(),
                    converted: None,
                },
            )?;
        }
        Ok(())
    }

    fn index_pth(&mut self, what: &str) -> Result<()> {
        let map = self.map.clone();
        let entries = zip::entries(&map, what)?;
        let pkl = entries
            .iter()
            .find(|e| e.name.ends_with("/data.pkl") || e.name == "data.pkl")
            .ok_or_else(|| Error::bad(format!("{what}: no data.pkl in the archive")))?;
        let stem = pkl.name.trim_end_matches("data.pkl").to_string();
        let by_name: HashMap<&str, &zip::Entry> =
            entries.iter().map(|e| (e.name.as_str(), e)).collect();
        let tensors = pickle::read_state_dict(&map[pkl.offset..pkl.offset + pkl.len], what)?;
        for (name, t) in tensors {
            let dtype = t.dtype;
            let entry_name = format!("{stem}data/{}", t.key);
            let entry = by_name.get(entry_name.as_str()).ok_or_else(|| {
                Error::bad(format!(
                    "{what}: tensor {name}: storage {entry_name} missing from the archive"
                ))
            })?;
            if t.shape.len() != t.stride.len() {
                return Err(Error::bad(format!(
                    "{what}: tensor {name}: shape and stride disagree"
                )));
            }
            // Only contiguous row-major tensors can be used in place; torch.save of a
            // state dict always produces them.
            let mut expect = 1usize;
            for (d, s) in t.shape.iter().zip(&t.stride).rev() {
                if *d != 1 && *s != expect {
                    return Err(Error::bad(format!(
                        "{what}: tensor {name} is not contiguous (stride {:?}); save it with .contiguous()",
                        t.stride
                    )));
                }
                expect = expect.saturating_mul(*d);
            }
            let numel = t
                .shape
                .iter()
                .try_fold(1usize, |a, &d| a.checked_mul(d))
                .ok_or_else(|| Error::bad(format!("{what}: tensor {name}: shape overflows")))?;
            let es = dtype.size();
            let start = t.offset.checked_mul(es);
            let nbytes = numel.checked_mul(es);
            let ok = match (start, nbytes) {
                (Some(s), Some(n)) => s.checked_add(n).is_some_and(|end| end <= entry.len),
                _ => false,
            };
            if !ok {
                return Err(Error::bad(format!(
                    "{what}: tensor {name} (shape {:?}) extends past its storage (truncated file?)",
                    t.shape
                )));
            }
            self.insert(
                name,
                TensorMeta {
                    dtype,
                    shape: t.shape,
                    offset: entry.offset + start.unwrap_or(0),
                    nbytes: nbytes.unwrap_or(0),
                    converted: None,
                },
            )?;
        }
        Ok(())
    }

    /// The file this checkpoint was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// The container format.
    pub fn format(&self) -> Format {
        self.format
    }
    /// File size in bytes (of all its files, for a directory).
    pub fn file_size(&self) -> usize {
        self.file_bytes
    }
    /// Tensor names in file order.
    pub fn names(&self) -> &[String] {
        &self.order
    }
    /// The safetensors `__metadata__` map (empty for `.pth`).
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }
    /// The tensor layout the file was written in (see [`layout`]): the official names, or the
    /// name map of another tool read onto them.
    pub fn layout(&self) -> &str {
        &self.layout
    }
    /// The tokenizer file found beside the weights of a Hugging Face directory
    /// (`tokenizer.json`, or the World vocabulary's `rwkv_vocab_v20230424.txt`).
    pub fn tokenizer_file(&self) -> Option<&Path> {
        self.tokenizer_file.as_deref()
    }
    /// The vocabulary the file carries (GGUF), as each id's bytes (empty for ids that do not
    /// decode: control and padding tokens).
    pub fn vocab(&self) -> Option<&Arc<[Vec<u8>]>> {
        self.vocab.as_ref()
    }
    /// Looks a tensor up by name.
    pub fn get(&self, name: &str) -> Option<&TensorMeta> {
        self.tensors.get(name)
    }
    /// Whether a tensor exists.
    pub fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    fn meta(&self, name: &str) -> Result<&TensorMeta> {
        self.tensors
            .get(name)
            .ok_or_else(|| Error::bad(format!("{}: missing tensor {name}", self.path.display())))
    }

    /// Keeps `data` as one of the checkpoint's buffers and returns its index.
    fn keep(&mut self, data: Vec<u8>) -> usize {
        self.converted.push(Arc::new(Bytes::Owned(data)));
        self.converted.len() - 1
    }

    /// [`Checkpoint::keep`] of f32 values.
    fn keep_f32(&mut self, v: &[f32]) -> usize {
        self.keep(gguf::quantize(gguf::GgmlType::F32, v))
    }

    /// The buffer a tensor's bytes are in.
    fn buffer(&self, m: &TensorMeta) -> &Arc<Bytes> {
        match m.converted {
            Some(i) => &self.converted[i],
            None => &self.map,
        }
    }

    /// The stored bytes of a tensor.
    pub fn bytes(&self, name: &str) -> Result<&[u8]> {
        let m = self.meta(name)?;
        Ok(&self.buffer(m)[m.offset..m.offset + m.nbytes])
    }

    /// The tensor's shape, checked against `want` (a missing or mis-shaped tensor is an error
    /// naming it). Leading and inner dimensions of size 1 are compared as stored.
    pub fn expect_shape(&self, name: &str, want: &[usize]) -> Result<&TensorMeta> {
        let m = self.meta(name)?;
        if m.shape != want {
            return Err(Error::bad(format!(
                "{}: tensor {name} has shape {:?}, expected {:?}",
                self.path.display(),
                m.shape,
                want
            )));
        }
        Ok(m)
    }

    /// A zero-copy typed view of a tensor's bytes, or a copy when the bytes are misaligned.
    fn view<T: Copy + Send + Sync + 'static>(&self, m: &TensorMeta) -> Shared<T> {
        let buf = self.buffer(m);
        let bytes = &buf[m.offset..m.offset + m.nbytes];
        let n = m.nbytes / std::mem::size_of::<T>();
        if (bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>()) {
            // SAFETY: the bytes are aligned for `T`, inside the map, and the map is read-only
            // and kept alive by the view.
            unsafe { Shared::from_owner(buf.clone(), bytes.as_ptr() as *const T, n) }
        } else {
            let mut v = Vec::<T>::with_capacity(n);
            // SAFETY: copying plain-old-data bytes into a vector of the same byte size.
            unsafe {
                std::ptr::copy_nonoverlapping(bytes.as_ptr(), v.as_mut_ptr() as *mut u8, m.nbytes);
                v.set_len(n);
            }
            Shared::from_vec(v)
        }
    }

    fn check_finite(&self, name: &str, m: &TensorMeta) -> Result<()> {
        let b = &self.buffer(m)[m.offset..m.offset + m.nbytes];
        let bad = match m.dtype {
            DType::F32 => b
                .chunks_exact(4)
                .any(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) & 0x7f80_0000 == 0x7f80_0000),
            DType::BF16 => b
                .chunks_exact(2)
                .any(|c| u16::from_le_bytes([c[0], c[1]]) & 0x7f80 == 0x7f80),
            DType::F16 => b
                .chunks_exact(2)
                .any(|c| u16::from_le_bytes([c[0], c[1]]) & 0x7c00 == 0x7c00),
            DType::F64 => b.chunks_exact(8).any(|c| {
                let mut a = [0u8; 8];
                a.copy_from_slice(c);
                !f64::from_le_bytes(a).is_finite()
            }),
            _ => false,
        };
        if bad {
            return Err(Error::bad(format!(
                "{}: tensor {name} contains non-finite values (NaN or infinity)",
                self.path.display()
            )));
        }
        Ok(())
    }

    /// A float tensor in its stored dtype, zero-copy where possible, after checking that all
    /// values are finite. f64 tensors are converted to f32.
    pub fn float_tensor(&self, name: &str) -> Result<FloatData> {
        let m = self.meta(name)?;
        self.check_finite(name, m)?;
        Ok(match m.dtype {
            DType::F32 => FloatData::F32(self.view::<f32>(m)),
            DType::BF16 => FloatData::BF16(self.view::<u16>(m)),
            DType::F16 => FloatData::F16(self.view::<u16>(m)),
            DType::F64 => {
                let b = self.bytes(name)?;
                let v: Vec<f32> = b
                    .chunks_exact(8)
                    .map(|c| {
                        let mut a = [0u8; 8];
                        a.copy_from_slice(c);
                        f64::from_le_bytes(a) as f32
                    })
                    .collect();
                FloatData::F32(Shared::from_vec(v))
            }
            d => {
                return Err(Error::bad(format!(
                    "{}: tensor {name} has dtype {d}, expected a float type",
                    self.path.display()
                )))
            }
        })
    }

    /// A matrix stored quantized by `rwkv convert --quant`: `name` holds the packed values
    /// (i8 `[rows, cols]` for int8, u8 `[rows, cols / 2]` for q4) and `name.scales` the f32
    /// block scales `[rows, cols / 32]`. `None` when `name` is a float tensor.
    pub fn quantized_matrix(
        &self,
        name: &str,
        rows: usize,
        cols: usize,
    ) -> Result<Option<FloatData>> {
        let m = self.meta(name)?;
        let four = match m.dtype {
            DType::I8 => false,
            DType::U8 => true,
            _ => return Ok(None),
        };
        let what = self.path.display();
        let packed = if four { cols / 2 } else { cols };
        if !cols.is_multiple_of(QBLOCK) || m.shape != [rows, packed] {
            return Err(Error::bad(format!(
                "{what}: quantized tensor {name} has shape {:?}; a [{rows}, {cols}] matrix in blocks of {QBLOCK} needs [{rows}, {packed}] with {cols} divisible by {QBLOCK}",
                m.shape
            )));
        }
        let sname = format!("{name}.scales");
        let sm = self.meta(&sname)?;
        if sm.dtype != DType::F32 || sm.shape != [rows, cols / QBLOCK] {
            return Err(Error::bad(format!(
                "{what}: tensor {sname} must be f32 [{rows}, {}], found {} {:?}",
                cols / QBLOCK,
                sm.dtype,
                sm.shape
            )));
        }
        self.check_finite(&sname, sm)?;
        let qb = QBlocks {
            len: rows * cols,
            q: self.view::<u8>(m),
            d: self.view::<f32>(sm),
        };
        Ok(Some(if four {
            FloatData::Q4(qb)
        } else {
            FloatData::Q8(qb)
        }))
    }

    /// A float tensor converted to an owned f32 vector (for small vectors and the math that
    /// needs f32 precision), after checking finiteness.
    pub fn f32_vec(&self, name: &str) -> Result<Vec<f32>> {
        Ok(self.float_tensor(name)?.to_f32())
    }

    /// An integer tensor (i64/i32) as i64 values.
    pub fn i64_vec(&self, name: &str) -> Result<Vec<i64>> {
        let m = self.meta(name)?;
        let b = self.bytes(name)?;
        match m.dtype {
            DType::I64 => Ok(b
                .chunks_exact(8)
                .map(|c| {
                    let mut a = [0u8; 8];
                    a.copy_from_slice(c);
                    i64::from_le_bytes(a)
                })
                .collect()),
            DType::I32 => Ok(b
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64)
                .collect()),
            d => Err(Error::bad(format!(
                "{}: tensor {name} has dtype {d}, expected an integer type",
                self.path.display()
            ))),
        }
    }
}

/// One tensor to write with [`write_safetensors`].
#[derive(Clone)]
pub struct OutTensor<'a> {
    /// Tensor name.
    pub name: String,
    /// Element type of `data`.
    pub dtype: DType,
    /// Shape.
    pub shape: Vec<usize>,
    /// Little-endian bytes.
    pub data: std::borrow::Cow<'a, [u8]>,
}

impl<'a> OutTensor<'a> {
    /// An f32 tensor.
    pub fn f32(name: impl Into<String>, shape: Vec<usize>, data: &[f32]) -> Self {
        let mut b = Vec::with_capacity(data.len() * 4);
        for x in data {
            b.extend_from_slice(&x.to_le_bytes());
        }
        OutTensor {
            name: name.into(),
            dtype: DType::F32,
            shape,
            data: b.into(),
        }
    }
}

/// Writes a safetensors file atomically: to a temporary name beside `path`, then renamed, so
/// an interrupted write never leaves a truncated file under the final name.
pub fn write_safetensors(
    path: &Path,
    tensors: &[OutTensor<'_>],
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let h = safetensors_header(tensors, metadata)?;
    write_atomic(path, |w| {
        w.write_all(&(h.len() as u64).to_le_bytes())?;
        w.write_all(&h)?;
        for t in tensors {
            w.write_all(&t.data)?;
        }
        Ok(())
    })
}

/// A safetensors file's bytes, in memory.
pub fn safetensors_bytes(
    tensors: &[OutTensor<'_>],
    metadata: &BTreeMap<String, String>,
) -> Result<Vec<u8>> {
    let h = safetensors_header(tensors, metadata)?;
    let data: usize = tensors.iter().map(|t| t.data.len()).sum();
    let mut out = Vec::with_capacity(8 + h.len() + data);
    out.extend_from_slice(&(h.len() as u64).to_le_bytes());
    out.extend_from_slice(&h);
    for t in tensors {
        out.extend_from_slice(&t.data);
    }
    Ok(out)
}

/// The JSON header of a safetensors file (padded so that the data starts 8-byte aligned).
fn safetensors_header(
    tensors: &[OutTensor<'_>],
    metadata: &BTreeMap<String, String>,
) -> Result<Vec<u8>> {
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert(
            "__metadata__".into(),
            serde_json::to_value(metadata).unwrap_or_default(),
        );
    }
    let mut off = 0usize;
    for t in tensors {
        let numel: usize = t.shape.iter().product();
        if numel * t.dtype.size() != t.data.len() {
            return Err(Error::Internal(format!(
                "tensor {} has {} bytes for shape {:?}",
                t.name,
                t.data.len(),
                t.shape
            )));
        }
        header.insert(
            t.name.clone(),
            serde_json::json!({
                "dtype": t.dtype.safetensors_name(),
                "shape": t.shape,
                "data_offsets": [off, off + t.data.len()],
            }),
        );
        off += t.data.len();
    }
    let mut h = serde_json::to_vec(&serde_json::Value::Object(header))
        .map_err(|e| Error::Internal(e.to_string()))?;
    // Pad the header so the data section starts 8-byte aligned (zero-copy f32/f64 views).
    while !(8 + h.len()).is_multiple_of(8) {
        h.push(b' ');
    }
    Ok(h)
}

/// What [`write_atomic`]'s temporary names hold between `.NAME` and the writer's process id.
const TEMP_MARK: &str = ".tmp";

/// Removes the temporary files [`write_atomic`] left in `dir` when its process was killed
/// mid-write (`.NAME.tmpPID` of another process); returns how many. The files they were to
/// replace are whole: a write only ever replaces its target by a rename.
pub fn remove_stale_temporaries(dir: &Path) -> usize {
    let own = format!("{TEMP_MARK}{}", std::process::id());
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let stale = name.starts_with('.')
            && name
                .rsplit_once(TEMP_MARK)
                .is_some_and(|(_, pid)| !pid.is_empty() && pid.bytes().all(|c| c.is_ascii_digit()))
            && !name.ends_with(&own);
        if stale && std::fs::remove_file(e.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// Writes a file through `f` to a temporary name in the same directory, syncs it, and renames
/// it over `path`.
pub fn write_atomic(
    path: &Path,
    f: impl FnOnce(&mut std::io::BufWriter<std::fs::File>) -> std::io::Result<()>,
) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let fname = path
        .file_name()
        .ok_or_else(|| Error::bad(format!("{}: not a file name", path.display())))?;
    let tmp = dir.join(format!(
        ".{}{TEMP_MARK}{}",
        fname.to_string_lossy(),
        std::process::id()
    ));
    let res = (|| -> std::io::Result<()> {
        let file = std::fs::File::create(&tmp)?;
        let mut w = std::io::BufWriter::new(file);
        f(&mut w)?;
        let file = w.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        Ok(())
    })();
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(path, e)
    })
}

#[cfg(test)]
mod temporaries {
    use super::*;

    #[test]
    fn only_other_processes_temporaries_are_removed() {
        let dir = std::env::temp_dir().join(format!("rwkv-stale-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let own = format!(".b.safetensors{TEMP_MARK}{}", std::process::id());
        let names = [
            ".state.safetensors.tmp12345",
            own.as_str(),
            "model.safetensors",
            ".hidden",
            "notes.tmp7",
            ".x.tmpabc",
        ];
        for n in names {
            std::fs::write(dir.join(n), b"x").unwrap();
        }
        assert_eq!(remove_stale_temporaries(&dir), 1);
        for n in &names[1..] {
            assert!(dir.join(n).exists(), "{n} was removed");
        }
        assert!(!dir.join(names[0]).exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
