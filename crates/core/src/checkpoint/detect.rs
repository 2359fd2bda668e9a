//! Generation and dimension detection from tensor names and shapes.

use super::Checkpoint;
use crate::error::{Error, Result};
use crate::tensor::DType;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// The RWKV generation of a checkpoint, or the Transformer the project compares RWKV with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Generation {
    /// RWKV-4 (the paper's architecture).
    #[serde(rename = "v4")]
    V4,
    /// RWKV-5.2 "Eagle".
    #[serde(rename = "v5.2")]
    V5_2,
    /// RWKV-6.0 "Finch".
    #[serde(rename = "v6.0")]
    V6_0,
    /// RWKV-7 "Goose" (x070).
    #[serde(rename = "v7")]
    V7,
    /// Not RWKV: the Transformer baseline, nanoGPT's architecture (pre-LayerNorm blocks
    /// without biases, learned positions, causal softmax attention, a GELU MLP, the head tied
    /// to the embedding), under nanoGPT's tensor names ([`crate::schema::gpt`]).
    #[serde(rename = "gpt")]
    Gpt,
}

impl Generation {
    /// Short name: v4, v5.2, v6.0, v7 (gpt for the Transformer baseline).
    pub fn name(self) -> &'static str {
        match self {
            Generation::V4 => "v4",
            Generation::V5_2 => "v5.2",
            Generation::V6_0 => "v6.0",
            Generation::V7 => "v7",
            Generation::Gpt => "gpt",
        }
    }

    /// Whether this is an RWKV generation (not the Transformer baseline).
    pub fn is_rwkv(self) -> bool {
        self != Generation::Gpt
    }
    /// Parses a name as written by [`Generation::name`].
    pub fn from_name(s: &str) -> Option<Self> {
        Some(match s {
            "v4" => Generation::V4,
            "v5.2" => Generation::V5_2,
            "v6.0" => Generation::V6_0,
            "v7" => Generation::V7,
            "gpt" => Generation::Gpt,
            _ => return None,
        })
    }
}

impl fmt::Display for Generation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Everything about a checkpoint's architecture, read from its tensors.
#[derive(Debug, Clone, Serialize)]
pub struct ModelInfo {
    /// Generation.
    pub generation: Generation,
    /// Number of blocks.
    pub n_layer: usize,
    /// Width of the residual stream (C).
    pub n_embd: usize,
    /// Number of heads (1 for v4, which has no heads).
    pub n_head: usize,
    /// Head size N (0 for v4).
    pub head_size: usize,
    /// Channel-mixing hidden size.
    pub ffn_dim: usize,
    /// Vocabulary size (rows of the embedding).
    pub vocab_size: usize,
    /// LoRA ranks by name (v6: `maa`, `decay`; v7: `w`, `a`, `v`, `g`).
    pub lora: BTreeMap<String, usize>,
    /// RWKV-7a's DeepEmbed rank R (`ffn.s1` is `[C, R]`, `ffn.s_emb` rows are `R×R`); 0 for a
    /// model without DeepEmbed.
    pub deep_embed: usize,
    /// The most tokens a model with learned positions reads (the Transformer's rows of
    /// `wpe`); 0 for RWKV, whose context is unbounded.
    pub positions: usize,
    /// Total number of parameters.
    pub params: usize,
    /// The dtype most weights are stored in.
    pub dtype: DType,
    /// File format.
    pub format: String,
    /// The tensor layout: the official names, or the tool whose names were mapped onto them.
    pub layout: String,
    /// The vocabulary the file carries (GGUF), each id's bytes.
    #[serde(skip)]
    pub vocab: Option<std::sync::Arc<[Vec<u8>]>>,
    /// The tokenizer file beside the weights (a Hugging Face directory's).
    #[serde(skip)]
    pub tokenizer_file: Option<std::path::PathBuf>,
    /// File size in bytes.
    pub file_bytes: usize,
}

impl fmt::Display for ModelInfo {
    /// The architecture as `rwkv info` prints it, one `key  value` line each.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.generation == Generation::Gpt {
            writeln!(
                f,
                "generation  Transformer baseline (nanoGPT architecture, not RWKV)"
            )?;
        } else if self.deep_embed > 0 {
            writeln!(
                f,
                "generation  RWKV {} (RWKV-7a, DeepEmbed rank {})",
                self.generation, self.deep_embed
            )?;
        } else {
            writeln!(f, "generation  RWKV {}", self.generation)?;
        }
        writeln!(f, "layout      {}", self.layout)?;
        writeln!(f, "layers      {}", self.n_layer)?;
        writeln!(f, "width       {}", self.n_embd)?;
        if self.head_size > 0 {
            writeln!(f, "heads       {} x {}", self.n_head, self.head_size)?;
        }
        writeln!(f, "ffn         {}", self.ffn_dim)?;
        if self.positions > 0 {
            writeln!(f, "context     {} (learned positions)", self.positions)?;
        }
        writeln!(f, "vocab       {}", self.vocab_size)?;
        if !self.lora.is_empty() {
            let l: Vec<String> = self.lora.iter().map(|(k, v)| format!("{k}={v}")).collect();
            writeln!(f, "lora ranks  {}", l.join(" "))?;
        }
        writeln!(
            f,
            "parameters  {} ({:.2} M)",
            self.params,
            self.params as f64 / 1e6
        )?;
        writeln!(f, "dtype       {}", self.dtype)
    }
}

fn layer_generation(ck: &Checkpoint, i: usize) -> Option<Generation> {
    let p = format!("blocks.{i}.att.");
    let has = |k: &str| ck.has(&format!("{p}{k}"));
    if has("r_k") || has("x_r") {
        Some(Generation::V7)
    } else if has("time_maa_x") || has("time_maa_w1") {
        Some(Generation::V6_0)
    } else if has("ln_x.weight") && has("gate.weight") {
        Some(Generation::V5_2)
    } else if has("time_first") && !has("ln_x.weight") {
        Some(Generation::V4)
    } else {
        None
    }
}

/// Detects the generation and every dimension of a checkpoint.
pub fn detect(ck: &Checkpoint) -> Result<ModelInfo> {
    let what = ck.path().display().to_string();
    if ck.has(gpt::WTE) {
        return detect_gpt(ck, &what);
    }
    let emb = ck.get("emb.weight").ok_or_else(|| {
        Error::bad(format!(
            "{what}: missing tensor emb.weight: not an RWKV checkpoint"
        ))
    })?;
    if emb.shape.len() != 2 {
        return Err(Error::bad(format!(
            "{what}: tensor emb.weight has shape {:?}, expected [vocab, n_embd]",
            emb.shape
        )));
    }
    // A q4-packed table (a GGUF's Q4_0 embedding) holds two values per byte.
    let per_byte = if emb.dtype == DType::U8 { 2 } else { 1 };
    let (vocab, c) = (emb.shape[0], emb.shape[1] * per_byte);
    // Layers: every block index that any key mentions must form 0..n.
    let mut idx = BTreeSet::new();
    for name in ck.names() {
        if let Some(rest) = name.strip_prefix("blocks.") {
            let n = rest.split('.').next().unwrap_or("");
            let i: usize = n
                .parse()
                .map_err(|_| Error::bad(format!("{what}: unexpected tensor name {name}")))?;
            idx.insert(i);
        }
    }
    let n_layer = idx.len();
    if n_layer == 0 {
        return Err(Error::bad(format!(
            "{what}: no blocks.* tensors: not an RWKV checkpoint"
        )));
    }
    for (want, got) in idx.iter().enumerate() {
        if want != *got {
            return Err(Error::bad(format!(
                "{what}: layer {want} is missing (found layers up to {})",
                idx.iter().last().copied().unwrap_or(0)
            )));
        }
    }
    let generation = layer_generation(ck, 0).ok_or_else(|| {
        Error::bad(format!(
            "{what}: unrecognised RWKV generation (layer 0 has neither v4, v5.2, v6.0 nor v7 keys)"
        ))
    })?;
    for i in 1..n_layer {
        match layer_generation(ck, i) {
            Some(g) if g == generation => {}
            Some(g) => {
                return Err(Error::bad(format!(
                    "{what}: layer {i} has {g} keys but layer 0 has {generation} keys: mixed checkpoint"
                )))
            }
            None => {
                return Err(Error::bad(format!(
                    "{what}: layer {i} has an incomplete or unrecognised set of attention tensors"
                )))
            }
        }
    }
    let dim = |name: &str, d: usize| -> Result<usize> {
        let m = ck
            .get(name)
            .ok_or_else(|| Error::bad(format!("{what}: missing tensor {name}")))?;
        m.shape
            .get(d)
            .copied()
            .ok_or_else(|| Error::bad(format!("{what}: tensor {name} has shape {:?}", m.shape)))
    };
    let ffn_dim = dim("blocks.0.ffn.key.weight", 0)?;
    let mut lora = BTreeMap::new();
    let (n_head, head_size) = match generation {
        Generation::V4 => (1, 0),
        Generation::V5_2 => (
            dim("blocks.0.att.time_faaaa", 0)?,
            dim("blocks.0.att.time_faaaa", 1)?,
        ),
        Generation::V6_0 => {
            let w1 = dim("blocks.0.att.time_maa_w1", 1)?;
            if w1 % 5 != 0 {
                return Err(Error::bad(format!(
                    "{what}: tensor blocks.0.att.time_maa_w1 has {w1} columns, expected a multiple of 5"
                )));
            }
            lora.insert("maa".into(), w1 / 5);
            lora.insert("decay".into(), dim("blocks.0.att.time_decay_w1", 1)?);
            (
                dim("blocks.0.att.time_faaaa", 0)?,
                dim("blocks.0.att.time_faaaa", 1)?,
            )
        }
        Generation::V7 => {
            lora.insert("w".into(), dim("blocks.0.att.w1", 1)?);
            lora.insert("a".into(), dim("blocks.0.att.a1", 1)?);
            lora.insert("g".into(), dim("blocks.0.att.g1", 1)?);
            if n_layer > 1 {
                lora.insert("v".into(), dim("blocks.1.att.v1", 1)?);
            }
            (dim("blocks.0.att.r_k", 0)?, dim("blocks.0.att.r_k", 1)?)
        }
        Generation::Gpt => {
            return Err(Error::Internal("the Transformer has no RWKV layers".into()))
        }
    };
    let deep_embed = deep_embed(ck, generation, &what, &dim)?;
    if generation != Generation::V4 && n_head * head_size != c {
        return Err(Error::bad(format!(
            "{what}: {n_head} heads of size {head_size} do not make the width {c}"
        )));
    }
    let (params, dtype) = totals(ck);
    Ok(ModelInfo {
        generation,
        n_layer,
        n_embd: c,
        n_head,
        head_size,
        ffn_dim,
        vocab_size: vocab,
        lora,
        deep_embed,
        positions: 0,
        params,
        dtype,
        format: ck.format().to_string(),
        layout: ck.layout().to_string(),
        vocab: ck.vocab().cloned(),
        tokenizer_file: ck.tokenizer_file().map(|p| p.to_path_buf()),
        file_bytes: ck.file_size(),
    })
}

/// The Transformer baseline's names that tell it apart and give its dimensions (the rest of
/// its tensors are in [`crate::schema::gpt`]).
pub mod gpt {
    /// The token embedding, which is also the head (`[V, C]`).
    pub const WTE: &str = "transformer.wte.weight";
    /// The learned positions `[positions, C]`.
    pub const WPE: &str = "transformer.wpe.weight";
    /// The blocks' key prefix (`transformer.h.{i}.`).
    pub const BLOCKS: &str = "transformer.h.";
    /// The metadata key of the head size (nanoGPT's `n_head` is in its config, not in a
    /// shape).
    pub const HEAD_SIZE_KEY: &str = "head_size";
}

/// The number of parameters and the dtype most of them are stored in.
fn totals(ck: &Checkpoint) -> (usize, DType) {
    let mut params = 0usize;
    let mut by_dtype: BTreeMap<String, (usize, DType)> = BTreeMap::new();
    for name in ck.names() {
        let m = ck.get(name).expect("listed name");
        params += m.numel();
        let e = by_dtype.entry(m.dtype.to_string()).or_insert((0, m.dtype));
        e.0 += m.numel();
    }
    let dtype = by_dtype
        .values()
        .max_by_key(|(n, _)| *n)
        .map(|(_, d)| *d)
        .unwrap_or(DType::F32);
    (params, dtype)
}

/// The Transformer baseline's dimensions: the width and vocabulary from `wte`, the context
/// from `wpe`, the layers from the `transformer.h.N.` keys and the head size from the
/// metadata (nanoGPT keeps `n_head` in its config, not in any tensor's shape).
fn detect_gpt(ck: &Checkpoint, what: &str) -> Result<ModelInfo> {
    let shape = |name: &str| -> Result<(usize, usize)> {
        let m = ck
            .get(name)
            .ok_or_else(|| Error::bad(format!("{what}: missing tensor {name}")))?;
        match m.shape[..] {
            [a, b] => Ok((a, b)),
            _ => Err(Error::bad(format!(
                "{what}: tensor {name} has shape {:?}, expected two dimensions",
                m.shape
            ))),
        }
    };
    let (vocab, c) = shape(gpt::WTE)?;
    let (positions, _) = shape(gpt::WPE)?;
    let mut idx = BTreeSet::new();
    for name in ck.names() {
        if let Some(rest) = name.strip_prefix(gpt::BLOCKS) {
            let i: usize = rest
                .split('.')
                .next()
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| Error::bad(format!("{what}: unexpected tensor name {name}")))?;
            idx.insert(i);
        }
    }
    let n_layer = idx.len();
    if n_layer == 0 || idx.iter().enumerate().any(|(want, got)| want != *got) {
        return Err(Error::bad(format!(
            "{what}: the transformer.h.N layers are not numbered 0..{n_layer}"
        )));
    }
    let (ffn_dim, _) = shape(&format!("{}0.mlp.c_fc.weight", gpt::BLOCKS))?;
    let head_size: usize = ck
        .metadata()
        .get(gpt::HEAD_SIZE_KEY)
        .ok_or_else(|| {
            Error::bad(format!(
                "{what}: no {} in the metadata (a Transformer's head count is not in its tensors)",
                gpt::HEAD_SIZE_KEY
            ))
        })?
        .parse()
        .map_err(|_| {
            Error::bad(format!(
                "{what}: metadata {} is not a number",
                gpt::HEAD_SIZE_KEY
            ))
        })?;
    if head_size == 0 || !c.is_multiple_of(head_size) {
        return Err(Error::bad(format!(
            "{what}: head size {head_size} does not divide the width {c}"
        )));
    }
    let (params, dtype) = totals(ck);
    Ok(ModelInfo {
        generation: Generation::Gpt,
        n_layer,
        n_embd: c,
        n_head: c / head_size,
        head_size,
        ffn_dim,
        vocab_size: vocab,
        lora: BTreeMap::new(),
        deep_embed: 0,
        positions,
        params,
        dtype,
        format: ck.format().to_string(),
        // Its names are nanoGPT's, not an official RWKV checkpoint's.
        layout: match ck.layout() {
            "official" => "nanoGPT".to_string(),
            l => l.to_string(),
        },
        vocab: ck.vocab().cloned(),
        tokenizer_file: ck.tokenizer_file().map(|p| p.to_path_buf()),
        file_bytes: ck.file_size(),
    })
}

/// Tensor-name parts of RWKV-7b's DeepEmbedAttention (its per-token key and value tables and
/// the attention they feed), which this project does not run.
const DEEP_EMBED_ATTENTION: [&str; 3] = ["k_emb", "v_emb", ".qkv."];

/// RWKV-7a's DeepEmbed rank (0 without `ffn.s_emb`); RWKV-7b and DeepEmbed outside RWKV-7
/// are refused by name.
fn deep_embed(
    ck: &Checkpoint,
    generation: Generation,
    what: &str,
    dim: &dyn Fn(&str, usize) -> Result<usize>,
) -> Result<usize> {
    if let Some(n) = ck
        .names()
        .iter()
        .find(|n| DEEP_EMBED_ATTENTION.iter().any(|p| n.contains(p)))
    {
        return Err(Error::bad(format!(
            "{what}: tensor {n} belongs to RWKV-7b (DeepEmbedAttention), which is not supported \
             (RWKV-7 and RWKV-7a DeepEmbed models run)"
        )));
    }
    if !ck.has("blocks.0.ffn.s_emb.weight") {
        return Ok(0);
    }
    if generation != Generation::V7 {
        return Err(Error::bad(format!(
            "{what}: tensor blocks.0.ffn.s_emb.weight is DeepEmbed, which exists only for RWKV-7 \
             (this is a {generation} checkpoint)"
        )));
    }
    dim("blocks.0.ffn.s1", 1)
}
