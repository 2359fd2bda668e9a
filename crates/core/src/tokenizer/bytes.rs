//! The byte tokenizer: one token per byte, id = byte value (for byte-level models).

use super::Tokenizer;
use crate::error::{Error, Result};

/// Maps each byte of the UTF-8 text to the token with the same value; vocab size 256.
#[derive(Debug, Default, Clone, Copy)]
pub struct ByteTokenizer;

impl ByteTokenizer {
    /// The byte tokenizer.
    pub fn new() -> Self {
        ByteTokenizer
    }
}

impl Tokenizer for ByteTokenizer {
    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(text.bytes().map(u32::from).collect())
    }

    fn decode_bytes(&self, ids: &[u32]) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(ids.len());
        for &id in ids {
            self.token_bytes_into(id, &mut out)?;
        }
        Ok(out)
    }

    fn token_bytes_into(&self, id: u32, out: &mut Vec<u8>) -> Result<()> {
        let b = u8::try_from(id).map_err(|_| {
            Error::bad(format!(
                "token id {id} is not in the bytes vocab (size 256)"
            ))
        })?;
        out.push(b);
        Ok(())
    }

    fn vocab_size(&self) -> usize {
        256
    }

    fn name(&self) -> String {
        "bytes".to_owned()
    }
}
