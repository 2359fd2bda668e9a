//! The RWKV "World" tokenizer: greedy longest match over UTF-8 bytes against a fixed vocab
//! (the package's `TRIE_TOKENIZER`).

use std::path::Path;
use std::sync::{Arc, OnceLock};

use super::Tokenizer;
use crate::error::{Error, Result};

/// The vocab shipped with the rwkv package (`rwkv_vocab_v20230424.txt`).
const EMBEDDED_VOCAB: &str = include_str!("../../../../assets/world_vocab.txt");

/// Marks a trie node that does not end a token.
const NO_TOKEN: u32 = u32::MAX;

/// The World tokenizer: the embedded vocab, or a world-format vocab file.
#[derive(Debug, Clone)]
pub struct WorldTokenizer {
    vocab: Arc<Vocab>,
    name: String,
}

impl WorldTokenizer {
    /// The tokenizer of the embedded World vocab (parsed once per process).
    pub fn new() -> Result<Self> {
        static EMBEDDED: OnceLock<std::result::Result<Arc<Vocab>, String>> = OnceLock::new();
        let vocab = EMBEDDED
            .get_or_init(|| {
                Vocab::parse(EMBEDDED_VOCAB, "embedded world_vocab.txt")
                    .map(Arc::new)
                    .map_err(|e| e.to_string())
            })
            .clone()
            .map_err(Error::Internal)?;
        Ok(Self {
            vocab,
            name: "world".to_owned(),
        })
    }

    /// Loads a world-format vocab file (`<id> <python literal> <byte length>` per line).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let name = path.display().to_string();
        Ok(Self {
            vocab: Arc::new(Vocab::parse(&text, &name)?),
            name,
        })
    }

    /// Parses a world-format vocab held in memory; `name` identifies it in messages.
    pub fn from_vocab_str(text: &str, name: &str) -> Result<Self> {
        Ok(Self {
            vocab: Arc::new(Vocab::parse(text, name)?),
            name: name.to_owned(),
        })
    }

    /// The tokenizer of a vocabulary given as each id's bytes (a GGUF file's); ids whose bytes
    /// are empty (control and padding tokens) do not decode, except id 0 (end of text).
    pub fn from_tokens(tokens: &[Vec<u8>], name: &str) -> Result<Self> {
        let entries = tokens
            .iter()
            .enumerate()
            .filter(|(id, b)| *id > 0 && !b.is_empty())
            .map(|(id, b)| (id as u32, b.clone()))
            .collect();
        Ok(Self {
            vocab: Arc::new(Vocab::from_entries(entries, name)?),
            name: name.to_owned(),
        })
    }

    /// The bytes of token `id`, or `None` if the vocab has no such id. Id 0 (end of text) is
    /// the empty string.
    pub fn token_bytes(&self, id: u32) -> Option<&[u8]> {
        self.vocab.token(id)
    }
}

impl Tokenizer for WorldTokenizer {
    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.vocab.encode(text.as_bytes(), &self.name)
    }

    fn decode_bytes(&self, ids: &[u32]) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        for &id in ids {
            self.token_bytes_into(id, &mut out)?;
        }
        Ok(out)
    }

    fn token_bytes_into(&self, id: u32, out: &mut Vec<u8>) -> Result<()> {
        match self.vocab.token(id) {
            Some(b) => {
                out.extend_from_slice(b);
                Ok(())
            }
            None => Err(Error::bad(format!(
                "token id {id} is not in the {} vocab (size {})",
                self.name,
                self.vocab_size()
            ))),
        }
    }

    fn vocab_size(&self) -> usize {
        self.vocab.starts.len() - 1
    }

    fn name(&self) -> String {
        self.name.clone()
    }
}

/// The largest token id a vocab file may use (16 times the World vocabulary's).
const MAX_TOKEN_ID: u32 = (1 << 20) - 1;

/// A parsed vocab: the token table plus a byte trie for encoding.
#[derive(Debug)]
struct Vocab {
    /// All token bytes, concatenated in id order.
    bytes: Vec<u8>,
    /// Token `id` is `bytes[starts[id]..starts[id + 1]]`; one entry per id plus one.
    starts: Vec<u32>,
    /// Whether each id is defined (ids missing from the file are unknown, except id 0).
    defined: Vec<bool>,
    trie: Trie,
}

impl Vocab {
    fn parse(text: &str, name: &str) -> Result<Self> {
        let mut entries: Vec<(u32, Vec<u8>)> = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let lineno = i + 1;
            let line = line.strip_suffix('\r').unwrap_or(line);
            if line.trim().is_empty() {
                continue;
            }
            let bad = |msg: &str| Error::bad(format!("{name}: line {lineno}: {msg}"));
            let (first, last) = match (line.find(' '), line.rfind(' ')) {
                (Some(f), Some(l)) if f < l => (f, l),
                _ => return Err(bad("expected `<id> <literal> <byte length>`")),
            };
            let id: u32 = line[..first]
                .parse()
                .map_err(|_| bad(&format!("bad token id {:?}", &line[..first])))?;
            // The id tables are as long as the largest id: a few bytes of file must not
            // claim gigabytes of them.
            if id > MAX_TOKEN_ID {
                return Err(bad(&format!(
                    "token id {id} is too large (at most {MAX_TOKEN_ID})"
                )));
            }
            let len: usize = line[last + 1..]
                .parse()
                .map_err(|_| bad(&format!("bad byte length {:?}", &line[last + 1..])))?;
            let bytes = parse_literal(&line[first + 1..last]).map_err(|m| bad(&m))?;
            if bytes.len() != len {
                return Err(bad(&format!(
                    "token {id} parses to {} bytes but the line says {len}",
                    bytes.len()
                )));
            }
            if bytes.is_empty() {
                return Err(bad(&format!("token {id} is empty")));
            }
            entries.push((id, bytes));
        }
        Self::from_entries(entries, name)
    }

    /// The vocab of `(id, bytes)` entries (in any order, non-empty bytes).
    fn from_entries(mut entries: Vec<(u32, Vec<u8>)>, name: &str) -> Result<Self> {
        if entries.is_empty() {
            return Err(Error::bad(format!("{name}: no tokens")));
        }
        entries.sort_by_key(|e| e.0);
        if let Some(w) = entries.windows(2).find(|w| w[0].0 == w[1].0) {
            return Err(Error::bad(format!(
                "{name}: token id {} appears twice",
                w[0].0
            )));
        }
        let max_id = entries.last().map_or(0, |e| e.0) as usize;
        let total: usize = entries.iter().map(|e| e.1.len()).sum();
        if total >= u32::MAX as usize {
            return Err(Error::bad(format!("{name}: vocab too large")));
        }
        let mut bytes = Vec::with_capacity(total);
        let mut starts = Vec::with_capacity(max_id + 2);
        let mut defined = vec![false; max_id + 1];
        // Id 0 is the end-of-text token: known, and decodes to nothing.
        defined[0] = true;
        let mut next = entries.iter().peekable();
        for (id, def) in defined.iter_mut().enumerate() {
            starts.push(bytes.len() as u32);
            if let Some((_, b)) = next.next_if(|e| e.0 as usize == id) {
                bytes.extend_from_slice(b);
                *def = true;
            }
        }
        starts.push(bytes.len() as u32);
        let trie = Trie::build(&entries);
        Ok(Self {
            bytes,
            starts,
            defined,
            trie,
        })
    }

    fn token(&self, id: u32) -> Option<&[u8]> {
        let i = id as usize;
        if !*self.defined.get(i)? {
            return None;
        }
        Some(&self.bytes[self.starts[i] as usize..self.starts[i + 1] as usize])
    }

    fn encode(&self, text: &[u8], name: &str) -> Result<Vec<u32>> {
        // Most tokens are several bytes long; this avoids regrowing for typical text.
        let mut ids = Vec::with_capacity(text.len() / 3 + 1);
        let mut pos = 0;
        while pos < text.len() {
            match self.trie.longest_match(&text[pos..]) {
                Some((id, len)) => {
                    ids.push(id);
                    pos += len;
                }
                None => {
                    return Err(Error::bad(format!(
                        "{name}: no token for byte 0x{:02x} at offset {pos} of the text",
                        text[pos]
                    )))
                }
            }
        }
        Ok(ids)
    }
}

/// A byte trie with each node's children stored contiguously and sorted by byte, so a lookup
/// is a binary search in a small slice and the whole trie is a handful of flat arrays.
#[derive(Debug)]
struct Trie {
    /// Child of the root for each first byte (0 = none; the root itself is node 0).
    root: [u32; 256],
    /// Token id ending at each node, or [`NO_TOKEN`].
    token: Vec<u32>,
    /// Node `n`'s children are edges `child_start[n]..child_start[n] + child_len[n]`.
    child_start: Vec<u32>,
    child_len: Vec<u16>,
    edge_byte: Vec<u8>,
    edge_node: Vec<u32>,
}

impl Trie {
    /// Builds the trie breadth first from the tokens sorted by bytes: the tokens below a node
    /// form a contiguous run of that order, and so do those below each child.
    fn build(entries: &[(u32, Vec<u8>)]) -> Self {
        let mut order: Vec<usize> = (0..entries.len()).collect();
        // Ties (duplicate byte strings) keep the lowest id, found first below.
        order.sort_by(|&a, &b| entries[a].1.cmp(&entries[b].1).then(a.cmp(&b)));
        let key = |i: usize| -> &[u8] { &entries[order[i]].1 };

        let mut trie = Trie {
            root: [0; 256],
            token: vec![NO_TOKEN],
            child_start: vec![0],
            child_len: vec![0],
            edge_byte: Vec::new(),
            edge_node: Vec::new(),
        };
        // (node, range of `order` below it, depth of the node)
        let mut queue = std::collections::VecDeque::from([(0u32, 0usize, order.len(), 0usize)]);
        while let Some((node, mut lo, hi, depth)) = queue.pop_front() {
            if lo < hi && key(lo).len() == depth {
                trie.token[node as usize] = entries[order[lo]].0;
                lo += 1;
                // Skip duplicate byte strings.
                while lo < hi && key(lo).len() == depth {
                    lo += 1;
                }
            }
            let first_edge = trie.edge_byte.len() as u32;
            let mut start = lo;
            while start < hi {
                let b = key(start)[depth];
                let mut end = start + 1;
                while end < hi && key(end)[depth] == b {
                    end += 1;
                }
                let child = trie.token.len() as u32;
                trie.token.push(NO_TOKEN);
                trie.child_start.push(0);
                trie.child_len.push(0);
                trie.edge_byte.push(b);
                trie.edge_node.push(child);
                if node == 0 {
                    trie.root[b as usize] = child;
                }
                queue.push_back((child, start, end, depth + 1));
                start = end;
            }
            trie.child_start[node as usize] = first_edge;
            trie.child_len[node as usize] = (trie.edge_byte.len() as u32 - first_edge) as u16;
        }
        trie
    }

    /// The longest token that is a prefix of `text`: `(id, byte length)`.
    fn longest_match(&self, text: &[u8]) -> Option<(u32, usize)> {
        let mut best = None;
        let mut node = self.root[*text.first()? as usize];
        let mut depth = 1;
        while node != 0 {
            let tok = self.token[node as usize];
            if tok != NO_TOKEN {
                best = Some((tok, depth));
            }
            let Some(&b) = text.get(depth) else { break };
            let start = self.child_start[node as usize] as usize;
            let len = self.child_len[node as usize] as usize;
            let bytes = &self.edge_byte[start..start + len];
            node = match bytes.binary_search(&b) {
                Ok(k) => self.edge_node[start + k],
                Err(_) => 0,
            };
            depth += 1;
        }
        best
    }
}

/// Parses a Python `str` or `bytes` literal as written by `repr()`, returning its bytes (a `str`
/// is encoded as UTF-8).
fn parse_literal(lit: &str) -> std::result::Result<Vec<u8>, String> {
    let (is_bytes, body) = match lit.strip_prefix('b') {
        Some(rest) => (true, rest),
        None => (false, lit),
    };
    let quote = body
        .chars()
        .next()
        .filter(|&c| c == '\'' || c == '"')
        .ok_or_else(|| format!("literal {lit} does not start with a quote"))?;
    let inner = body
        .strip_prefix(quote)
        .and_then(|s| s.strip_suffix(quote))
        .filter(|_| body.len() >= 2)
        .ok_or_else(|| format!("literal {lit} is not closed by {quote}"))?;
    let mut out = Vec::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            if is_bytes && !c.is_ascii() {
                return Err(format!("bytes literal {lit} holds a non-ASCII character"));
            }
            let mut buf = [0u8; 4];
            out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            continue;
        }
        let e = chars
            .next()
            .ok_or_else(|| format!("literal {lit} ends in a backslash"))?;
        let simple = match e {
            '\\' => Some(b'\\'),
            '\'' => Some(b'\''),
            '"' => Some(b'"'),
            'n' => Some(b'\n'),
            'r' => Some(b'\r'),
            't' => Some(b'\t'),
            _ => None,
        };
        if let Some(b) = simple {
            out.push(b);
            continue;
        }
        let digits = match e {
            'x' => 2,
            'u' if !is_bytes => 4,
            'U' if !is_bytes => 8,
            _ => return Err(format!("literal {lit} has an unknown escape \\{e}")),
        };
        let mut v: u32 = 0;
        for _ in 0..digits {
            let d = chars
                .next()
                .and_then(|h| h.to_digit(16))
                .ok_or_else(|| format!("literal {lit} has a bad \\{e} escape"))?;
            v = v * 16 + d;
        }
        if is_bytes {
            // \xNN in a bytes literal is a raw byte.
            out.push(v as u8);
        } else {
            // In a str literal every escape is a code point.
            let c = char::from_u32(v)
                .ok_or_else(|| format!("literal {lit} escapes an invalid code point {v:#x}"))?;
            let mut buf = [0u8; 4];
            out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals() {
        assert_eq!(parse_literal(r"'\x00'").unwrap(), b"\x00");
        assert_eq!(parse_literal(r"b'\xff'").unwrap(), b"\xff");
        assert_eq!(parse_literal(r#""'""#).unwrap(), b"'");
        assert_eq!(parse_literal(r"'\u2002'").unwrap(), "\u{2002}".as_bytes());
        assert_eq!(
            parse_literal(r"'\U0001f600'").unwrap(),
            "\u{1f600}".as_bytes()
        );
        assert_eq!(parse_literal(r"'\x80'").unwrap(), "\u{80}".as_bytes());
        assert_eq!(parse_literal("'中'").unwrap(), "中".as_bytes());
        assert!(parse_literal(r"'\q'").is_err());
        assert!(parse_literal("'abc").is_err());
        assert!(parse_literal("abc").is_err());
        assert!(parse_literal("'").is_err());
        assert!(parse_literal(r"'\x4'").is_err());
    }

    #[test]
    fn small_vocab() {
        let t =
            WorldTokenizer::from_vocab_str("1 'a' 1\n2 'ab' 2\n3 'abc' 3\n5 'b' 1\n", "t").unwrap();
        assert_eq!(t.encode("abab").unwrap(), vec![2, 2]);
        assert_eq!(t.encode("abcb").unwrap(), vec![3, 5]);
        assert_eq!(t.vocab_size(), 6);
        assert!(t.encode("x").is_err());
        assert!(t.decode_bytes(&[4]).is_err());
        assert_eq!(t.decode_bytes(&[0, 1]).unwrap(), b"a");
        assert!(WorldTokenizer::from_vocab_str("1 'a' 2\n", "t").is_err());
        assert!(WorldTokenizer::from_vocab_str("1 'a' 1\n1 'b' 1\n", "t").is_err());
        assert!(WorldTokenizer::from_vocab_str("x 'a' 1\n", "t").is_err());
    }
}
