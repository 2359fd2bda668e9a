//! Hugging Face `tokenizer.json` files (e.g. the GPT-NeoX 20B tokenizer of the RWKV-4 Pile
//! models), through the `tokenizers` crate.

use std::path::Path;

use super::Tokenizer;
use crate::error::{Error, Result};
use tokenizers::DecoderWrapper;

/// A tokenizer loaded from a Hugging Face `tokenizer.json`.
///
/// Byte-level BPE tokenizers (GPT-2 / NeoX style) decode to exact bytes, so a character split
/// across tokens survives streaming; other tokenizers decode through the library's decoder,
/// one token at a time when streaming.
pub struct HfTokenizer {
    inner: tokenizers::Tokenizer,
    path: String,
    /// One past the largest id of the model vocab and the added tokens.
    vocab_size: usize,
    /// For byte-level tokenizers, the raw bytes of every id; `None` otherwise.
    table: Option<ByteTable>,
    /// Whether the decoder turns `<0xNN>` tokens into raw bytes.
    byte_fallback: bool,
}

/// Token bytes in id order: id `i` is `bytes[starts[i]..starts[i + 1]]` when `defined[i]`.
struct ByteTable {
    bytes: Vec<u8>,
    starts: Vec<usize>,
    defined: Vec<bool>,
}

impl HfTokenizer {
    /// Loads a `tokenizer.json`; a missing file is an I/O error, an unparsable one bad input.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let json = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::from_bytes(&json, path.display().to_string())
    }

    /// Parses the bytes of a `tokenizer.json`; `name` identifies it in messages.
    pub fn from_bytes(json: &[u8], name: String) -> Result<Self> {
        // `tokenizers` panics (an `expect` in its decoder's deserializer) on a syntax error
        // inside the "decoder" value: the JSON is checked whole first, into values (invalid
        // UTF-8 in a string is such an error, which merely skipping the value does not see).
        serde_json::from_slice::<serde_json::Value>(json)
            .map_err(|e| Error::bad(format!("{name}: not a valid tokenizer.json: {e}")))?;
        let inner = tokenizers::Tokenizer::from_bytes(json).map_err(|e| {
            Error::bad(format!(
                "{name}: not a valid tokenizer.json: {}",
                one_line(&e.to_string())
            ))
        })?;
        Ok(Self::from_tokenizer(inner, name))
    }

    /// Wraps an already built `tokenizers::Tokenizer`; `name` identifies it in messages.
    pub fn from_tokenizer(inner: tokenizers::Tokenizer, name: String) -> Self {
        let vocab_size = inner
            .get_vocab(true)
            .values()
            .max()
            .map_or(0, |&m| m as usize + 1);
        let decoders = inner
            .get_decoder()
            .map(flatten_decoders)
            .unwrap_or_default();
        let byte_level = decoders
            .iter()
            .any(|d| matches!(d, DecoderWrapper::ByteLevel(_)));
        let byte_fallback = decoders
            .iter()
            .any(|d| matches!(d, DecoderWrapper::ByteFallback(_)));
        let table = byte_level.then(|| build_byte_table(&inner, vocab_size));
        Self {
            inner,
            path: name,
            vocab_size,
            table,
            byte_fallback,
        }
    }

    fn unknown(&self, id: u32) -> Error {
        Error::bad(format!(
            "token id {id} is not in the tokenizer {} (size {})",
            self.path, self.vocab_size
        ))
    }
}

impl Tokenizer for HfTokenizer {
    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(|e| {
            Error::bad(format!(
                "{}: cannot encode the text: {}",
                self.path,
                one_line(&e.to_string())
            ))
        })?;
        Ok(enc.get_ids().to_vec())
    }

    fn decode_bytes(&self, ids: &[u32]) -> Result<Vec<u8>> {
        if self.table.is_some() {
            let mut out = Vec::new();
            for &id in ids {
                self.token_bytes_into(id, &mut out)?;
            }
            return Ok(out);
        }
        // The library's decode silently skips unknown ids; they must be errors here.
        if let Some(&id) = ids.iter().find(|&&id| self.inner.id_to_token(id).is_none()) {
            return Err(self.unknown(id));
        }
        let text = self.inner.decode(ids, false).map_err(|e| {
            Error::bad(format!(
                "{}: cannot decode: {}",
                self.path,
                one_line(&e.to_string())
            ))
        })?;
        Ok(text.into_bytes())
    }

    fn token_bytes_into(&self, id: u32, out: &mut Vec<u8>) -> Result<()> {
        if let Some(t) = &self.table {
            let i = id as usize;
            if !t.defined.get(i).copied().unwrap_or(false) {
                return Err(self.unknown(id));
            }
            out.extend_from_slice(&t.bytes[t.starts[i]..t.starts[i + 1]]);
            return Ok(());
        }
        let token = self.inner.id_to_token(id).ok_or_else(|| self.unknown(id))?;
        if self.byte_fallback {
            if let Some(b) = parse_byte_token(&token) {
                out.push(b);
                return Ok(());
            }
        }
        out.extend_from_slice(&self.decode_bytes(&[id])?);
        Ok(())
    }

    fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    fn name(&self) -> String {
        self.path.clone()
    }
}

/// Joins a multi-line library message into one line.
fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The decoder and, for a sequence, every decoder inside it.
fn flatten_decoders(d: &DecoderWrapper) -> Vec<&DecoderWrapper> {
    match d {
        DecoderWrapper::Sequence(s) => s.get_decoders().iter().flat_map(flatten_decoders).collect(),
        other => vec![other],
    }
}

/// `<0xNN>` (a sentencepiece byte-fallback token) -> the byte NN.
fn parse_byte_token(token: &str) -> Option<u8> {
    let hex = token.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// The byte-level alphabet (GPT-2's `bytes_to_unicode`): printable bytes stand for themselves,
/// the others are shifted to U+0100 and up so that every byte is a visible character.
fn byte_level_alphabet() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut shifted = 0u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        let code = if printable {
            u32::from(b)
        } else {
            shifted += 1;
            255 + shifted
        };
        table[b as usize] = char::from_u32(code).unwrap_or('\0');
    }
    table
}

/// Maps every token back to raw bytes the way the library's `ByteLevel` decoder does: each
/// character through the inverse alphabet, or, if some character is outside it (added tokens),
/// the token's UTF-8 bytes unchanged.
fn build_byte_table(inner: &tokenizers::Tokenizer, vocab_size: usize) -> ByteTable {
    let mut char_to_byte = std::collections::HashMap::with_capacity(256);
    for (b, c) in byte_level_alphabet().iter().enumerate() {
        char_to_byte.insert(*c, b as u8);
    }
    let mut bytes = Vec::new();
    let mut starts = Vec::with_capacity(vocab_size + 1);
    let mut defined = vec![false; vocab_size];
    let mut mapped = Vec::new();
    for (id, def) in defined.iter_mut().enumerate() {
        starts.push(bytes.len());
        let Some(token) = inner.id_to_token(id as u32) else {
            continue;
        };
        *def = true;
        mapped.clear();
        let all_mapped = token.chars().all(|c| match char_to_byte.get(&c) {
            Some(&b) => {
                mapped.push(b);
                true
            }
            None => false,
        });
        if all_mapped {
            bytes.extend_from_slice(&mapped);
        } else {
            bytes.extend_from_slice(token.as_bytes());
        }
    }
    starts.push(bytes.len());
    ByteTable {
        bytes,
        starts,
        defined,
    }
}
