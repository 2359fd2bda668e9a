//! Generation and dimension detection from tensor names and shapes.

use super::Checkpoint;
use crate::error::{Error, Result};
use crate::tensor::DType;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// The RWKV generation of a checkpoint.
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
}

impl Generation {
    /// Short name: v4, v5.2, v6.0, v7.
    pub fn name(self) -> &'static str {
        match self {
            Generation::V4 => "v4",
            Generation::V5_2 => "v5.2",
            Generation::V6_0 => "v6.0",
            Generation::V7 => "v7",
        }
    }
    /// Parses a name as written by [`Generation::name`].
    pub fn from_name(s: &str) -> Option<Self> {
        Some(match s {
            "v4" => Generation::V4,
            "v5.2" => Generation::V5_2,
            "v6.0" => Generation::V6_0,
            "v7" => Generation::V7,
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
        if self.deep_embed > 0 {
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
    };
    let deep_embed = deep_embed(ck, generation, &what, &dim)?;
    if generation != Generation::V4 && n_head * head_size != c {
        return Err(Error::bad(format!(
            "{what}: {n_head} heads of size {head_size} do not make the width {c}"
        )));
    }
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
        params,
        dtype,
        format: ck.format().to_string(),
        layout: ck.layout().to_string(),
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
