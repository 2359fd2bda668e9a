//! Tokenizer tests against the rwkv package fixtures (tests/fixtures/tokenizer/cases.json).

use rwkv::tokenizer::{
    decode_text_strict, for_vocab, load, ByteTokenizer, StreamDecoder, Tokenizer, WorldTokenizer,
};
use serde_json::Value;

const CASES: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/tokenizer/cases.json"
);
const VOCAB_TXT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/assets/world_vocab.txt");

fn cases() -> Value {
    let text = std::fs::read_to_string(CASES).expect("read cases.json");
    serde_json::from_str(&text).expect("parse cases.json")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn ids_of(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn world() -> WorldTokenizer {
    WorldTokenizer::new().expect("embedded vocab")
}

/// A unique scratch directory for files this test writes.
fn temp_dir(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("rwkv-tok-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn world_encode_cases() {
    let c = cases();
    let t = world();
    let cases = c["cases"].as_array().unwrap();
    assert!(!cases.is_empty());
    for case in cases {
        let text = case["text"].as_str().unwrap();
        assert_eq!(hex(text.as_bytes()), case["utf8_hex"].as_str().unwrap());
        let ids = t.encode(text).unwrap();
        assert_eq!(ids, ids_of(&case["ids"]), "encode {text:?}");
        let bytes = t.decode_bytes(&ids).unwrap();
        if case["roundtrip_ok"].as_bool().unwrap() {
            assert_eq!(bytes, text.as_bytes(), "decode {text:?}");
            assert_eq!(decode_text_strict(&bytes), text);
        }
    }
}

#[test]
fn world_decode_cases() {
    let c = cases();
    let t = world();
    for case in c["decode_cases"].as_array().unwrap() {
        let ids = ids_of(&case["ids"]);
        let bytes = t.decode_bytes(&ids).unwrap();
        assert_eq!(hex(&bytes), case["bytes_hex"].as_str().unwrap(), "{ids:?}");
        assert_eq!(
            decode_text_strict(&bytes),
            case["text"].as_str().unwrap(),
            "{ids:?}"
        );
    }
}

#[test]
fn world_vocab_digest() {
    let c = cases();
    let v = &c["vocab"];
    let t = world();
    let min_id = v["min_id"].as_u64().unwrap() as u32;
    let max_id = v["max_id"].as_u64().unwrap() as u32;
    assert_eq!(t.vocab_size(), max_id as usize + 1);
    let mut n_tokens = 0;
    let mut total = 0;
    let mut digest_input = Vec::new();
    let mut tok = Vec::new();
    for id in min_id..=max_id {
        tok.clear();
        t.token_bytes_into(id, &mut tok).unwrap();
        n_tokens += 1;
        total += tok.len();
        digest_input.extend_from_slice(&id.to_le_bytes());
        digest_input.extend_from_slice(&(tok.len() as u32).to_le_bytes());
        digest_input.extend_from_slice(&tok);
    }
    assert_eq!(n_tokens, v["n_tokens"].as_u64().unwrap());
    assert_eq!(total as u64, v["total_token_bytes"].as_u64().unwrap());
    for s in v["sample_tokens"].as_array().unwrap() {
        let id = s["id"].as_u64().unwrap() as u32;
        let bytes = t.decode_bytes(&[id]).unwrap();
        assert_eq!(hex(&bytes), s["bytes_hex"].as_str().unwrap(), "token {id}");
    }
    assert_eq!(
        hex(&sha256(&digest_input)),
        v["parsed_digest_sha256"].as_str().unwrap()
    );
    let file = std::fs::read(VOCAB_TXT).unwrap();
    assert_eq!(hex(&sha256(&file)), v["sha256"].as_str().unwrap());
}

#[test]
fn world_end_of_text_and_unknown_ids() {
    let t = world();
    assert_eq!(t.decode_bytes(&[0]).unwrap(), b"");
    assert_eq!(t.name(), "world");
    let err = t.decode_bytes(&[98, 70000]).unwrap_err().to_string();
    assert!(err.contains("70000"), "{err}");
    let mut out = Vec::new();
    assert!(t.token_bytes_into(65530, &mut out).is_err());
    assert!(t.token_bytes_into(u32::MAX, &mut out).is_err());
    assert!(out.is_empty());
}

#[test]
fn world_encodes_any_text() {
    let t = world();
    // Every single byte is a token, so arbitrary (even unusual) text always encodes.
    let text: String = (0u32..0x3000)
        .step_by(7)
        .filter_map(char::from_u32)
        .collect::<String>()
        + "\u{1f600}\u{10ffff}\0\r\n";
    let ids = t.encode(&text).unwrap();
    assert_eq!(t.decode_bytes(&ids).unwrap(), text.as_bytes());
    // A long text encodes quickly (the trie walk is linear in practice).
    let long = "The quick brown fox jumps over the lazy dog. 中文字符 ".repeat(20_000);
    let start = std::time::Instant::now();
    let ids = t.encode(&long).unwrap();
    assert!(start.elapsed().as_secs_f64() < 5.0);
    assert_eq!(t.decode_bytes(&ids).unwrap(), long.as_bytes());
}

#[test]
fn world_vocab_from_path_matches_embedded() {
    let from_file = load(VOCAB_TXT).unwrap();
    let embedded = load("world").unwrap();
    assert_eq!(embedded.name(), "world");
    assert_eq!(from_file.name(), VOCAB_TXT);
    let text = "Hello, world! 你好 \u{1f600}";
    assert_eq!(
        from_file.encode(text).unwrap(),
        embedded.encode(text).unwrap()
    );
    assert_eq!(from_file.vocab_size(), embedded.vocab_size());
}

#[test]
fn bad_world_vocab_files_are_errors() {
    let dir = temp_dir("vocab");
    for (name, body, needle) in [
        ("len.txt", "1 'a' 1\n2 'bc' 3\n", "line 2"),
        ("escape.txt", "1 'a' 1\n2 '\\q' 1\n", "line 2"),
        ("id.txt", "x 'a' 1\n", "line 1"),
        ("shape.txt", "1 'a'\n", "line 1"),
        ("dup.txt", "1 'a' 1\n1 'b' 1\n", "1"),
    ] {
        let path = dir.join(name);
        std::fs::write(&path, body).unwrap();
        let err = load(path.to_str().unwrap()).err().expect(name).to_string();
        assert!(err.contains(name), "{err}");
        assert!(err.contains(needle), "{err}");
        assert!(!err.contains('\n'));
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn stream_decoder_holds_back_split_characters() {
    let t = world();
    let mut d = StreamDecoder::new();
    let mut got = String::new();
    // 😀 is split over three tokens; nothing shows until the last one.
    for (k, &id) in [3319u32, 153, 129].iter().enumerate() {
        let s = d.push(&t.decode_bytes(&[id]).unwrap());
        if k < 2 {
            assert_eq!(s, "", "token {id}");
        }
        got += &s;
    }
    assert_eq!(got, "\u{1f600}");
    assert_eq!(d.finish(), "");

    // Byte by byte through a mix of scripts.
    let text = "a中文é\u{1f600}b";
    let mut out = String::new();
    for b in text.bytes() {
        d.push_into(&[b], &mut out);
    }
    assert_eq!(out, text);
}

#[test]
fn stream_decoder_replaces_invalid_bytes() {
    let mut d = StreamDecoder::new();
    assert_eq!(d.push(b"a\xffb"), "a\u{fffd}b");
    // An incomplete prefix that cannot be continued is one replacement character.
    assert_eq!(d.push(b"\xf0\x9f"), "");
    assert_eq!(d.push(b"a"), "\u{fffd}a");
    // An incomplete tail is flushed lossily by finish().
    assert_eq!(d.push("x中".as_bytes().split_at(3).0), "x");
    assert_eq!(d.finish(), "\u{fffd}");
    assert_eq!(d.finish(), "");
    assert_eq!(d.push(b"\xe4"), "");
    d.reset();
    assert_eq!(d.push(b"ok"), "ok");
}

#[test]
fn stream_decoder_matches_lossy_decode() {
    // Pseudo-random byte streams (valid characters mixed with garbage), pushed in random
    // chunks, decode exactly like a one-shot lossy decode.
    let mut state = 0x1234_5678_9abc_def0u64;
    let mut rnd = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let pieces: [&[u8]; 8] = [
        b"a",
        "é".as_bytes(),
        "中".as_bytes(),
        "\u{1f600}".as_bytes(),
        b"\xff",
        b"\x80",
        b"\xe4\xb8",
        b"\xf0\x9f\x98",
    ];
    for _ in 0..500 {
        let mut bytes = Vec::new();
        for _ in 0..(rnd() % 20) {
            bytes.extend_from_slice(pieces[(rnd() % 8) as usize]);
        }
        let mut d = StreamDecoder::new();
        let mut out = String::new();
        let mut rest = &bytes[..];
        while !rest.is_empty() {
            let k = 1 + (rnd() as usize) % rest.len().min(5);
            let (chunk, tail) = rest.split_at(k);
            d.push_into(chunk, &mut out);
            rest = tail;
        }
        out += &d.finish();
        assert_eq!(out, String::from_utf8_lossy(&bytes), "{}", hex(&bytes));
    }
}

#[test]
fn byte_tokenizer_round_trip() {
    let t = ByteTokenizer::new();
    assert_eq!(t.vocab_size(), 256);
    assert_eq!(t.name(), "bytes");
    let text = "héllo \u{1f600}\0\n";
    let ids = t.encode(text).unwrap();
    assert_eq!(ids.len(), text.len());
    assert_eq!(t.decode_bytes(&ids).unwrap(), text.as_bytes());
    let all: Vec<u32> = (0..256).collect();
    let bytes = t.decode_bytes(&all).unwrap();
    assert_eq!(bytes, (0..=255u8).collect::<Vec<_>>());
    let err = t.decode_bytes(&[1, 256]).unwrap_err().to_string();
    assert!(err.contains("256"), "{err}");
}

#[test]
fn tokenizer_for_vocab() {
    assert_eq!(for_vocab(65536).unwrap().name(), "world");
    assert_eq!(for_vocab(65530).unwrap().name(), "world");
    assert_eq!(for_vocab(256).unwrap().name(), "bytes");
    let err = for_vocab(300).err().unwrap();
    assert_eq!(err.exit_code(), 2);
    let msg = err.to_string();
    assert!(msg.contains("tokenizer"), "{msg}");
    assert!(msg.contains("300"), "{msg}");
}

#[test]
fn load_errors_do_not_panic() {
    let dir = temp_dir("load");
    let missing = dir.join("missing.json");
    let err = load(missing.to_str().unwrap()).err().unwrap();
    assert_eq!(err.exit_code(), 2);
    assert!(err.to_string().contains("missing.json"));

    for (name, body) in [
        ("broken.json", "{not json"),
        ("empty.json", ""),
        ("wrong.json", "{\"model\": 3}"),
    ] {
        let path = dir.join(name);
        std::fs::write(&path, body).unwrap();
        let err = load(path.to_str().unwrap()).err().expect(name);
        assert_eq!(err.exit_code(), 2);
        let msg = err.to_string();
        assert!(msg.contains(name), "{msg}");
        assert!(!msg.contains('\n'), "{msg}");
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// GPT-2's byte-to-unicode table, written independently of the library.
fn byte_level_char(b: u8) -> char {
    let printable: Vec<u8> = (b'!'..=b'~')
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    if printable.contains(&b) {
        return b as char;
    }
    let rank = (0..b).filter(|x| !printable.contains(x)).count() as u32;
    char::from_u32(256 + rank).unwrap()
}

/// A small byte-level BPE tokenizer.json: the 256 byte symbols, four merges and one special
/// token.
fn byte_level_bpe_json() -> String {
    let mut vocab = serde_json::Map::new();
    for b in 0..=255u8 {
        vocab.insert(byte_level_char(b).to_string(), b.into());
    }
    // "he", "ll", " w" and the two bytes of "é".
    let merges = [(b'h', b'e'), (b'l', b'l'), (b' ', b'w'), (0xc3, 0xa9)];
    let mut merge_list = Vec::new();
    for (k, &(a, b)) in merges.iter().enumerate() {
        let (a, b) = (byte_level_char(a), byte_level_char(b));
        vocab.insert(format!("{a}{b}"), (256 + k).into());
        merge_list.push(Value::String(format!("{a} {b}")));
    }
    let byte_level = serde_json::json!({
        "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true
    });
    serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [{
            "id": 260, "content": "<|endoftext|>", "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true
        }],
        "normalizer": null,
        "pre_tokenizer": byte_level,
        "post_processor": null,
        "decoder": byte_level,
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": null, "end_of_word_suffix": null,
            "fuse_unk": false, "byte_fallback": false,
            "vocab": vocab, "merges": merge_list
        }
    })
    .to_string()
}

#[test]
fn hf_byte_level_round_trip() {
    let dir = temp_dir("hf");
    let path = dir.join("tokenizer.json");
    std::fs::write(&path, byte_level_bpe_json()).unwrap();
    let t = load(path.to_str().unwrap()).unwrap();
    assert_eq!(t.name(), path.to_str().unwrap());
    assert_eq!(t.vocab_size(), 261);

    let text = "hello world café \u{1f600}!";
    let ids = t.encode(text).unwrap();
    assert_eq!(t.decode_bytes(&ids).unwrap(), text.as_bytes());
    assert!(ids.contains(&256) && ids.contains(&257) && ids.contains(&258));
    assert!(ids.contains(&259), "é is one merged token: {ids:?}");
    // No special tokens are added.
    assert_eq!(t.encode("he").unwrap(), vec![256]);

    // The emoji is four single-byte tokens; each decodes to its exact byte.
    let emoji = t.encode("\u{1f600}").unwrap();
    assert_eq!(emoji.len(), 4);
    let mut bytes = Vec::new();
    for &id in &emoji {
        let before = bytes.len();
        t.token_bytes_into(id, &mut bytes).unwrap();
        assert_eq!(bytes.len(), before + 1);
    }
    assert_eq!(bytes, "\u{1f600}".as_bytes());
    assert_eq!(t.decode_bytes(&emoji[..1]).unwrap(), b"\xf0");

    // Streaming the per-token bytes gives the text back.
    let mut d = StreamDecoder::new();
    let mut out = String::new();
    let mut tok = Vec::new();
    for &id in &ids {
        tok.clear();
        t.token_bytes_into(id, &mut tok).unwrap();
        d.push_into(&tok, &mut out);
    }
    out += &d.finish();
    assert_eq!(out, text);

    assert_eq!(t.decode_bytes(&[260]).unwrap(), b"<|endoftext|>");
    assert_eq!(t.decode_bytes(&[b' ' as u32]).unwrap(), b" ");
    let err = t.decode_bytes(&[5000]).unwrap_err().to_string();
    assert!(err.contains("5000"), "{err}");
    let _ = std::fs::remove_dir_all(dir);
}

/// SHA-256 (FIPS 180-4), small and slow, for checking the fixture digests.
fn sha256(data: &[u8]) -> [u8; 32] {
    const K: [u32; 64] = [
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
        0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
        0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
        0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
        0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
        0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
        0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
        0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
        0xc67178f2,
    ];
    let mut h: [u32; 8] = [
        0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab,
        0x5be0cd19,
    ];
    let mut msg = data.to_vec();
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&((data.len() as u64) * 8).to_be_bytes());
    for block in msg.chunks_exact(64) {
        let mut w = [0u32; 64];
        for (i, c) in block.chunks_exact(4).enumerate() {
            w[i] = u32::from_be_bytes([c[0], c[1], c[2], c[3]]);
        }
        for i in 16..64 {
            let s0 = w[i - 15].rotate_right(7) ^ w[i - 15].rotate_right(18) ^ (w[i - 15] >> 3);
            let s1 = w[i - 2].rotate_right(17) ^ w[i - 2].rotate_right(19) ^ (w[i - 2] >> 10);
            w[i] = w[i - 16]
                .wrapping_add(s0)
                .wrapping_add(w[i - 7])
                .wrapping_add(s1);
        }
        let [mut a, mut b, mut c, mut d, mut e, mut f, mut g, mut hh] = h;
        for i in 0..64 {
            let s1 = e.rotate_right(6) ^ e.rotate_right(11) ^ e.rotate_right(25);
            let ch = (e & f) ^ (!e & g);
            let t1 = hh
                .wrapping_add(s1)
                .wrapping_add(ch)
                .wrapping_add(K[i])
                .wrapping_add(w[i]);
            let s0 = a.rotate_right(2) ^ a.rotate_right(13) ^ a.rotate_right(22);
            let maj = (a & b) ^ (a & c) ^ (b & c);
            let t2 = s0.wrapping_add(maj);
            hh = g;
            g = f;
            f = e;
            e = d.wrapping_add(t1);
            d = c;
            c = b;
            b = a;
            a = t1.wrapping_add(t2);
        }
        for (x, y) in h.iter_mut().zip([a, b, c, d, e, f, g, hh]) {
            *x = x.wrapping_add(y);
        }
    }
    let mut out = [0u8; 32];
    for (o, x) in out.chunks_exact_mut(4).zip(h) {
        o.copy_from_slice(&x.to_be_bytes());
    }
    out
}

#[test]
fn sha256_known_answer() {
    assert_eq!(
        hex(&sha256(b"abc")),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
}

/// A syntax error or invalid UTF-8 inside the "decoder" value made the `tokenizers` crate
/// panic (found by the `tokenizer_json` fuzz target); each is an error naming the file.
#[test]
fn tokenizer_json_with_a_broken_decoder_is_an_error() {
    for name in ["syntax-error", "invalid-utf8"] {
        let path = format!(
            "{}/fuzz/corpus/tokenizer_json/crash-decoder-{name}.json",
            env!("CARGO_MANIFEST_DIR")
        );
        let err = rwkv::tokenizer::load(&path).err().expect("an error");
        assert!(
            err.to_string().contains("not a valid tokenizer.json"),
            "{err}"
        );
    }
}

/// A vocab file of a few lines whose token id is 655 million asked for 2.6 GB of id tables
/// (found by the `world_vocab` fuzz target): the id is refused by its line.
#[test]
fn world_vocab_with_a_huge_token_id_is_an_error() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/fuzz/corpus/world_vocab/oom-huge-token-id.txt"
    );
    let err = rwkv::tokenizer::load(path).err().expect("an error");
    assert!(err.to_string().contains("is too large"), "{err}");
}
