//! Training data: a text file tokenized once into a memory-mapped token file cached beside it.

use crate::error::{Error, Result};
use crate::tokenizer;
use memmap2::Mmap;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"RWKVTOK1";
const HEADER: usize = 32;

/// Where the validation split starts in a text of `len` tokens when its last `fraction` is held
/// out (shared by `rwkv train --val-fraction` and `rwkv eval --val-fraction`, so that both score
/// the same tokens).
pub fn val_start(len: usize, fraction: f64) -> usize {
    ((len as f64) * (1.0 - fraction)).round() as usize
}

/// FNV-1a over bytes: identifies the text (and tokenizer) a cache was made from.
pub fn fnv(bytes: &[u8], seed: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

/// A tokenized corpus, memory-mapped from its cache file.
pub struct Tokens {
    map: Mmap,
    width: usize,
    len: usize,
    /// Bytes of text the tokens came from.
    pub text_bytes: usize,
}

impl Tokens {
    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.len
    }
    /// True when there are no tokens.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Token `i`.
    pub fn get(&self, i: usize) -> u32 {
        let o = HEADER + i * self.width;
        let b = &self.map[o..o + self.width];
        if self.width == 2 {
            u16::from_le_bytes([b[0], b[1]]) as u32
        } else {
            u32::from_le_bytes([b[0], b[1], b[2], b[3]])
        }
    }
    /// Tokens `start..end` into `out`.
    pub fn copy(&self, start: usize, end: usize, out: &mut Vec<u32>) {
        out.extend((start..end).map(|i| self.get(i)));
    }
}

/// The cache name for `data` and a tokenizer spec: `FILE.<tag>.tokens`.
fn cache_name(data: &Path, tok_tag: &str) -> PathBuf {
    let mut name = data.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{tok_tag}.tokens"));
    data.with_file_name(name)
}

fn tokenizer_tag(spec: &str) -> Result<String> {
    Ok(match spec {
        "bytes" | "world" => spec.to_string(),
        path => {
            let b = std::fs::read(path).map_err(|e| Error::io(path, e))?;
            format!("tok{:016x}", fnv(&b, 0))
        }
    })
}

fn open_cache(path: &Path, hash: u64) -> Option<Tokens> {
    let f = std::fs::File::open(path).ok()?;
    // SAFETY: the cache is written once under a temporary name and renamed into place; it is
    // only read here.
    let map = unsafe { Mmap::map(&f) }.ok()?;
    if map.len() < HEADER || &map[..8] != MAGIC {
        return None;
    }
    let rd = |o: usize| u64::from_le_bytes(map[o..o + 8].try_into().unwrap());
    let width = map[8] as usize;
    let (text_bytes, h) = (rd(16), rd(24));
    if h != hash || !(width == 2 || width == 4) || !(map.len() - HEADER).is_multiple_of(width) {
        return None;
    }
    let len = (map.len() - HEADER) / width;
    Some(Tokens {
        map,
        width,
        len,
        text_bytes: text_bytes as usize,
    })
}

/// Tokenizes `data` with the tokenizer `spec` (`bytes`, `world` or a tokenizer file), reusing
/// the cache `FILE.<tokenizer>.tokens` beside it when it matches the text, else writing it
/// (or, when the data's directory is read-only, into `fallback_dir`).
pub fn load(data: &Path, spec: &str, fallback_dir: &Path) -> Result<Tokens> {
    let text = std::fs::read(data).map_err(|e| Error::io(data, e))?;
    if text.is_empty() {
        return Err(Error::bad(format!(
            "{}: the corpus is empty",
            data.display()
        )));
    }
    let tag = tokenizer_tag(spec)?;
    let hash = fnv(&text, fnv(tag.as_bytes(), 0));
    let beside = cache_name(data, &tag);
    let elsewhere = fallback_dir.join(beside.file_name().unwrap_or_default());
    for p in [&beside, &elsewhere] {
        if let Some(t) = open_cache(p, hash) {
            return Ok(t);
        }
    }
    let ids: Vec<u32> = if spec == "bytes" {
        text.iter().map(|&b| b as u32).collect()
    } else {
        let s = std::str::from_utf8(&text).map_err(|e| {
            Error::bad(format!(
                "{}: not UTF-8 text (at byte {}); use the bytes tokenizer for binary data",
                data.display(),
                e.valid_up_to()
            ))
        })?;
        tokenizer::load(spec)?.encode(s)?
    };
    let width = if ids.iter().all(|&t| t < 65536) { 2 } else { 4 };
    let write = |path: &Path| {
        crate::checkpoint::write_atomic(path, |w| {
            use std::io::Write;
            let mut h = [0u8; HEADER];
            h[..8].copy_from_slice(MAGIC);
            h[8] = width as u8;
            h[16..24].copy_from_slice(&(text.len() as u64).to_le_bytes());
            h[24..32].copy_from_slice(&hash.to_le_bytes());
            w.write_all(&h)?;
            for &t in &ids {
                if width == 2 {
                    w.write_all(&(t as u16).to_le_bytes())?;
                } else {
                    w.write_all(&t.to_le_bytes())?;
                }
            }
            Ok(())
        })
    };
    let path = match write(&beside) {
        Ok(()) => beside,
        Err(_) => {
            write(&elsewhere)?;
            elsewhere
        }
    };
    open_cache(&path, hash)
        .ok_or_else(|| Error::Internal(format!("{}: token cache unreadable", path.display())))
}
