//! Tokenizers: the RWKV "World" trie tokenizer, a raw byte tokenizer and Hugging Face
//! `tokenizer.json` files, behind one [`Tokenizer`] trait.
//!
//! Decoding works on bytes rather than strings because a token may hold only part of a UTF-8
//! character; [`StreamDecoder`] turns a stream of token bytes into text as characters complete,
//! and [`decode_text_strict`] reproduces the reference package's all-or-nothing decode.

mod bytes;
mod hf;
mod world;

use std::path::Path;

use crate::error::{Error, Result};

pub use bytes::ByteTokenizer;
pub use hf::HfTokenizer;
pub use world::WorldTokenizer;

/// Converts between text and token ids.
pub trait Tokenizer: Send + Sync {
    /// Encodes text into token ids.
    fn encode(&self, text: &str) -> Result<Vec<u32>>;
    /// The raw bytes of a token sequence; error naming the id if an id is unknown.
    fn decode_bytes(&self, ids: &[u32]) -> Result<Vec<u8>>;
    /// Appends the bytes of one token to `out` without allocating (hot path of generation);
    /// error if unknown.
    fn token_bytes_into(&self, id: u32, out: &mut Vec<u8>) -> Result<()>;
    /// One past the largest id this tokenizer can decode.
    fn vocab_size(&self) -> usize;
    /// Short name for messages and `rwkv info`: "world", "bytes", or the json path.
    fn name(&self) -> String;
}

/// Loads a tokenizer from a user spec: `"world"` (the embedded World vocab), `"bytes"`, the path
/// of a world-format vocab `.txt`, or the path of a Hugging Face `tokenizer.json`.
pub fn load(spec: &str) -> Result<Box<dyn Tokenizer>> {
    match spec {
        "world" => return Ok(Box::new(WorldTokenizer::new()?)),
        "bytes" => return Ok(Box::new(ByteTokenizer::new())),
        _ => {}
    }
    let path = Path::new(spec);
    if !path.is_file() {
        return Err(Error::bad(format!(
            "tokenizer {spec:?}: no such file (expected \"world\", \"bytes\", a tokenizer.json or a world-format vocab .txt)"
        )));
    }
    let is_txt = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("txt"));
    if is_txt {
        Ok(Box::new(WorldTokenizer::from_file(path)?))
    } else {
        Ok(Box::new(HfTokenizer::from_file(path)?))
    }
}

/// Picks the tokenizer for a model vocab size when the user did not name one: 65530..=65536 ->
/// world, 256 -> bytes; any other size is a bad-input error asking for `--tokenizer`.
pub fn for_vocab(model_vocab: usize) -> Result<Box<dyn Tokenizer>> {
    match model_vocab {
        // World models pad the 65530-entry table up to 65536 rows.
        65530..=65536 => Ok(Box::new(WorldTokenizer::new()?)),
        256 => Ok(Box::new(ByteTokenizer::new())),
        _ => Err(Error::bad(format!(
            "model vocab size {model_vocab} matches no built-in tokenizer; name one: world, bytes or a tokenizer.json"
        ))),
    }
}

/// The tokenizer of a model when the user did not name one: the vocabulary its file carries
/// (GGUF), the tokenizer file beside its weights (a Hugging Face directory), else the one
/// [`for_vocab`] picks for its size.
pub fn for_model(info: &crate::checkpoint::ModelInfo) -> Result<Box<dyn Tokenizer>> {
    if let Some(f) = &info.tokenizer_file {
        return load(&f.display().to_string());
    }
    match &info.vocab {
        Some(tokens) => Ok(Box::new(WorldTokenizer::from_tokens(
            tokens,
            "the model file's vocabulary",
        )?)),
        None => for_vocab(info.vocab_size),
    }
}

/// The bytes of each of the ids `0..n` (empty for an id the tokenizer does not decode): the
/// vocabulary table a GGUF file carries.
pub fn token_table(tok: &dyn Tokenizer, n: usize) -> Vec<Vec<u8>> {
    (0..n as u32)
        .map(|id| {
            let mut b = Vec::new();
            match tok.token_bytes_into(id, &mut b) {
                Ok(()) => b,
                Err(_) => Vec::new(),
            }
        })
        .collect()
}

/// Package semantics of decode: UTF-8 decode; if invalid, the whole result is "\u{fffd}".
pub fn decode_text_strict(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(s) => s.to_owned(),
        Err(_) => "\u{fffd}".to_owned(),
    }
}

/// Incremental UTF-8 decoder for generated tokens.
///
/// Bytes of a character split across tokens are held back until the character is complete, so
/// streamed output never shows a spurious replacement character; a sequence that can never
/// become valid is emitted as U+FFFD right away.
#[derive(Debug, Default, Clone)]
pub struct StreamDecoder {
    /// Bytes of an incomplete trailing character (at most 3 once a push returns).
    pending: Vec<u8>,
}

impl StreamDecoder {
    /// A decoder with nothing pending.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds token bytes and returns the text that is now complete.
    pub fn push(&mut self, bytes: &[u8]) -> String {
        let mut out = String::new();
        self.push_into(bytes, &mut out);
        out
    }

    /// Feeds token bytes and appends the text that is now complete to `out`.
    pub fn push_into(&mut self, bytes: &[u8], out: &mut String) {
        let mut used = 0;
        // Complete a held-back character first, byte by byte, so the bulk of `bytes` is decoded
        // in place without being copied into `pending`.
        while !self.pending.is_empty() && used < bytes.len() {
            self.pending.push(bytes[used]);
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    out.push_str(s);
                    self.pending.clear();
                    used += 1;
                }
                // Still a valid prefix of a character: wait for more bytes.
                Err(e) if e.error_len().is_none() => used += 1,
                Err(_) => {
                    // The held-back prefix cannot be continued by this byte: the prefix is one
                    // invalid sequence, and the byte is decoded afresh.
                    out.push('\u{fffd}');
                    self.pending.clear();
                }
            }
        }
        decode_lossy_into(&bytes[used..], out, &mut self.pending);
    }

    /// Flushes whatever is held back (an incomplete character becomes U+FFFD) and resets.
    pub fn finish(&mut self) -> String {
        let s = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        s
    }

    /// Drops anything held back.
    pub fn reset(&mut self) {
        self.pending.clear();
    }
}

/// Decodes `bytes` into `out`, replacing each invalid sequence by U+FFFD and storing an
/// incomplete trailing character in `pending`.
fn decode_lossy_into(mut bytes: &[u8], out: &mut String, pending: &mut Vec<u8>) {
    loop {
        match std::str::from_utf8(bytes) {
            Ok(s) => {
                out.push_str(s);
                return;
            }
            Err(e) => {
                let (valid, after) = bytes.split_at(e.valid_up_to());
                // Cannot fail: `valid_up_to` marks a valid prefix.
                out.push_str(std::str::from_utf8(valid).unwrap_or_default());
                match e.error_len() {
                    None => {
                        pending.extend_from_slice(after);
                        return;
                    }
                    Some(n) => {
                        out.push('\u{fffd}');
                        bytes = &after[n..];
                    }
                }
            }
        }
    }
}
