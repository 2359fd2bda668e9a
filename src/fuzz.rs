//! The entry points of the fuzz targets (`fuzz/fuzz_targets/*.rs`, run by `scripts/fuzz.sh`)
//! and of the replay of their corpora (`tests/fuzz_corpus.rs`): each takes arbitrary bytes
//! through a loader or parser exactly as a file or a request would reach it. An error is the
//! right answer to bad bytes; a panic, a hang or an unbounded allocation is a bug.

use crate::checkpoint::{detect::detect, Checkpoint, ModelInfo};
use crate::model::{Model, State};
use crate::tokenizer::{HfTokenizer, StreamDecoder, Tokenizer, WorldTokenizer};
use std::sync::OnceLock;

/// An entry point: arbitrary bytes in, nothing out.
pub type Entry = fn(&[u8]);

/// The targets, by the name of their corpus folder (`fuzz/corpus/NAME`).
pub const TARGETS: &[(&str, Entry)] = &[
    ("pth", checkpoint),
    ("safetensors", checkpoint),
    ("gguf", checkpoint),
    ("state", state),
    ("world_tokenizer", world_tokenizer),
    ("world_vocab", world_vocab),
    ("tokenizer_json", tokenizer_json),
    ("train_config", train_config),
    ("request", request),
];

/// A `.pth` (zip + pickle), `.safetensors` or GGUF file: indexing (a GGUF's names mapped,
/// its blocks dequantized or repacked), every tensor read as f32, the generation detected and
/// the model loaded (every shape and name checked).
pub fn checkpoint(data: &[u8]) {
    let Ok(ck) = Checkpoint::from_bytes("fuzz", data.to_vec()) else {
        return;
    };
    for name in ck.names() {
        let _ = ck.f32_vec(name);
    }
    if detect(&ck).is_ok() {
        let _ = Model::from_checkpoint(&ck, None);
    }
}

/// The RWKV-7 fixture model's dimensions, for state files.
fn fixture_info() -> &'static ModelInfo {
    static INFO: OnceLock<ModelInfo> = OnceLock::new();
    INFO.get_or_init(|| {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/v7/model.safetensors"
        );
        let ck = Checkpoint::open(path).expect("the RWKV-7 fixture model");
        detect(&ck).expect("the RWKV-7 fixture's dimensions")
    })
}

/// A state file (`--state-in`, `State.load`) for the RWKV-7 fixture model.
pub fn state(data: &[u8]) {
    if let Ok(ck) = Checkpoint::from_bytes("fuzz.state", data.to_vec()) {
        let _ = State::from_checkpoint(&ck, fixture_info());
    }
}

fn world() -> &'static WorldTokenizer {
    static WORLD: OnceLock<WorldTokenizer> = OnceLock::new();
    WORLD.get_or_init(|| WorldTokenizer::new().expect("the embedded World vocabulary"))
}

/// The World tokenizer: the bytes as text to encode (and decode back), and as little-endian
/// `u16` token ids to decode, whole and streamed.
pub fn world_tokenizer(data: &[u8]) {
    let tok = world();
    let text = String::from_utf8_lossy(data);
    if let Ok(ids) = tok.encode(&text) {
        let back = tok.decode_bytes(&ids).expect("encoded ids decode");
        assert_eq!(back, text.as_bytes(), "World round trip");
    }
    let ids: Vec<u32> = data
        .chunks_exact(2)
        .map(|c| u32::from(u16::from_le_bytes([c[0], c[1]])))
        .collect();
    let _ = tok.decode_bytes(&ids);
    let mut stream = StreamDecoder::new();
    let mut bytes = Vec::new();
    for &id in &ids {
        bytes.clear();
        if tok.token_bytes_into(id, &mut bytes).is_ok() {
            stream.push(&bytes);
        }
    }
    stream.finish();
}

/// A World-format vocabulary file (`--tokenizer vocab.txt`), then a short text through it.
pub fn world_vocab(data: &[u8]) {
    if let Ok(tok) = WorldTokenizer::from_vocab_str(&String::from_utf8_lossy(data), "fuzz.txt") {
        let _ = tok.encode("Hello, world! 你好\n\n");
        let _ = tok.decode_bytes(&[1, 2, 3, 100, 1000]);
    }
}

/// A Hugging Face `tokenizer.json`, then a short text through it.
pub fn tokenizer_json(data: &[u8]) {
    if let Ok(tok) = HfTokenizer::from_bytes(data, "fuzz.json".into()) {
        if let Ok(ids) = tok.encode("Hello, world! 你好\n\n") {
            let _ = tok.decode_bytes(&ids);
        }
        let _ = tok.decode_bytes(&[0, 1, 2, 255, 65535]);
    }
}

/// A `rwkv train --config` TOML file, parsed and checked.
pub fn train_config(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(cfg) = crate::train::TrainConfig::from_toml_str(text, "fuzz.toml") {
            let _ = cfg.check();
        }
    }
}

/// An HTTP request body as every JSON endpoint of `rwkv serve` parses it (chat completions
/// with every field, completions, embeddings, tokenize, detokenize).
pub fn request(data: &[u8]) {
    use crate::server::api;
    if let Ok(req) = api::parse_chat(data) {
        let _ = api::chat_segments(&req.messages);
    }
    let _ = api::parse_completion(data);
    let _ = api::parse_embeddings(data, 128);
    let _ = api::parse_tokenize(data);
    let _ = api::parse_detokenize(data);
}
