//! The parameters of each generation, in one place: every tensor's official name, its shape in
//! terms of the model's dimensions, how the math uses it (its layout) and how the official
//! trainer initialises it.
//!
//! The inference loader ([`crate::model`]) checks a checkpoint against this list and takes each
//! tensor's shape and layout from it, `rwkv init` ([`crate::init`]) writes it, and the trainer
//! checks its parameters against it. A new tensor, or a new name map for another file layout,
//! is written here once.
//!
//! Sources of the initialisation formulas: RWKV-v7 `train_temp/src/model.py`
//! (`RWKV_Tmix_x070.__init__`, `RWKV_CMix_x070.__init__`, `RWKV.generate_init_weight`),
//! RWKV-v5 `src/model.py` (`RWKV_Tmix_x052`, `RWKV_Tmix_x060` and their channel mixes) and
//! RWKV-v4neo `src/model.py` (`RWKV_TimeMix.__init__`, `RWKV_ChannelMix.__init__`,
//! `generate_init_weight`).

pub mod gpt;
pub mod v4;
pub mod v5;
pub mod v7;

use crate::checkpoint::{Generation, ModelInfo};
use crate::error::{Error, Result};
use crate::tensor::Layout;
use std::collections::HashMap;

/// How the math uses a tensor, which says how it is stored and loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A small vector used in f32 (its size-1 dimensions do not matter: `[1, 1, C]` is `[C]`).
    Vector,
    /// A weight matrix: `[out, in]` (`x @ Wᵀ`, converted to the weight format asked for at
    /// load) or `[in, out]` (`x @ W`, the LoRA matrices, used as stored).
    Matrix(Layout),
    /// A table of rows read one at a time (the embedding), used as stored.
    Table,
    /// Several matrices stacked in one tensor (v6's `time_maa_w2`), used as stored.
    Stacked,
}

/// How the official trainer initialises a tensor.
#[derive(Debug, Clone, PartialEq)]
pub enum Init {
    /// All ones.
    Ones,
    /// All zeros.
    Zeros,
    /// Every element the same value.
    Const(f32),
    /// Values given by a formula of the dimensions and the layer (no randomness).
    Values(Vec<f32>),
    /// Uniform in `[-lim, lim)`.
    Uniform(f64),
    /// `torch.nn.init.orthogonal_` of the `[rows, cols]` tensor, times `gain`.
    Orthogonal(f32),
    /// Normal with mean 0 and this standard deviation (nanoGPT's `normal_(0, std)`).
    Normal(f64),
}

/// One tensor of a generation.
#[derive(Debug, Clone, PartialEq)]
pub struct Param {
    /// The official name.
    pub name: String,
    /// The shape as the official checkpoints store it.
    pub shape: Vec<usize>,
    /// How the math uses it.
    pub role: Role,
    /// How the official trainer initialises it.
    pub init: Init,
}

/// The dimensions the shapes are written in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dims {
    /// Generation.
    pub generation: Generation,
    /// Blocks.
    pub n_layer: usize,
    /// Width of the residual stream (C).
    pub n_embd: usize,
    /// Head size N (0 for v4, which has no heads).
    pub head_size: usize,
    /// Channel-mixing hidden size (F).
    pub ffn_dim: usize,
    /// Vocabulary size (V).
    pub vocab: usize,
    /// LoRA ranks (v6: `maa`, `decay`; v7: `w`, `a`, `v`, `g`).
    pub lora: Vec<(&'static str, usize)>,
    /// RWKV-7a's DeepEmbed rank (0: none).
    pub deep_embed: usize,
    /// The Transformer's learned positions (rows of `wpe`); 0 for RWKV.
    pub positions: usize,
}

impl Dims {
    /// The dimensions of a detected checkpoint.
    pub fn of(info: &ModelInfo) -> Dims {
        let lora = match info.generation {
            Generation::V4 | Generation::V5_2 => Vec::new(),
            Generation::V6_0 => vec!["maa", "decay"],
            Generation::V7 => vec!["w", "a", "v", "g"],
            Generation::Gpt => Vec::new(),
        };
        Dims {
            generation: info.generation,
            n_layer: info.n_layer,
            n_embd: info.n_embd,
            head_size: info.head_size,
            ffn_dim: info.ffn_dim,
            vocab: info.vocab_size,
            lora: lora
                .into_iter()
                .map(|k| (k, info.lora.get(k).copied().unwrap_or(0)))
                .collect(),
            deep_embed: info.deep_embed,
            positions: info.positions,
        }
    }

    /// The dimensions of a new model of `generation`, with the official trainer's channel-mix
    /// size and LoRA ranks for the width `n_embd`.
    pub fn new(
        generation: Generation,
        n_layer: usize,
        n_embd: usize,
        head_size: usize,
        vocab: usize,
    ) -> Result<Dims> {
        if n_layer == 0 || n_embd == 0 || vocab == 0 {
            return Err(Error::bad("layers, dim and vocab must be at least 1"));
        }
        if generation != Generation::V4 && (head_size == 0 || !n_embd.is_multiple_of(head_size)) {
            return Err(Error::bad(format!(
                "dim {n_embd} is not a multiple of head-size {head_size}"
            )));
        }
        let (ffn_dim, lora) = match generation {
            Generation::V4 => (4 * n_embd, Vec::new()),
            Generation::V5_2 => (v5::ffn_dim(n_embd), Vec::new()),
            Generation::V6_0 => (v5::ffn_dim(n_embd), v5::lora_ranks(n_embd)),
            Generation::V7 => (4 * n_embd, v7::lora_ranks(n_embd)),
            Generation::Gpt => (4 * n_embd, Vec::new()),
        };
        Ok(Dims {
            generation,
            n_layer,
            n_embd,
            head_size: if generation == Generation::V4 {
                0
            } else {
                head_size
            },
            ffn_dim,
            vocab,
            lora,
            deep_embed: 0,
            positions: 0,
        })
    }

    /// These dimensions with `n` learned positions (the Transformer's context).
    pub fn with_positions(mut self, n: usize) -> Dims {
        self.positions = n;
        self
    }

    /// Number of heads (1 for v4).
    pub fn n_head(&self) -> usize {
        self.n_embd.checked_div(self.head_size).unwrap_or(1)
    }

    /// The LoRA rank called `name` (0 when the generation has none).
    pub fn rank(&self, name: &str) -> usize {
        self.lora
            .iter()
            .find(|(k, _)| *k == name)
            .map_or(0, |(_, r)| *r)
    }
}

/// Every parameter of a model with dimensions `d`, in the official key order.
pub fn params(d: &Dims) -> Vec<Param> {
    let mut out = Params(Vec::new());
    if d.generation == Generation::Gpt {
        gpt::params(d, &mut out);
        return out.0;
    }
    out.push(
        "emb.weight",
        &[d.vocab, d.n_embd],
        Role::Table,
        Init::Uniform(1e-4),
    );
    match d.generation {
        Generation::V4 => v4::blocks(d, &mut out),
        Generation::V5_2 | Generation::V6_0 => v5::blocks(d, &mut out),
        Generation::V7 => v7::blocks(d, &mut out),
        Generation::Gpt => unreachable!("written above"),
    }
    let c = d.n_embd;
    out.norm("ln_out", c);
    let v = d.vocab;
    let gain = if v > c {
        0.5 * (v as f32 / c as f32).sqrt()
    } else {
        0.5
    };
    out.push(
        "head.weight",
        &[v, c],
        Role::Matrix(Layout::OutIn),
        Init::Orthogonal(gain),
    );
    out.0
}

/// The metadata a safetensors file of a model with dimensions `d` carries: PyTorch's
/// `format`, and for the Transformer the head size its shapes do not say.
pub fn metadata(d: &Dims) -> std::collections::BTreeMap<String, String> {
    let mut md = std::collections::BTreeMap::new();
    md.insert("format".to_string(), "pt".to_string());
    if d.generation == Generation::Gpt {
        md.insert(gpt::HEAD_SIZE_KEY.to_string(), d.head_size.to_string());
    }
    md
}

/// [`params`] by name.
pub fn by_name(d: &Dims) -> HashMap<String, Param> {
    params(d).into_iter().map(|p| (p.name.clone(), p)).collect()
}

/// Checks that `tensors` (name and shape) are exactly the parameters of a model with
/// dimensions `d`: each present with its shape (vectors compared without their size-1
/// dimensions, as the loader reads them), and nothing else.
pub fn check<'a>(
    d: &Dims,
    tensors: impl IntoIterator<Item = (&'a str, &'a [usize])>,
) -> Result<()> {
    let mut want = by_name(d);
    for (name, shape) in tensors {
        let p = want.remove(name).ok_or_else(|| {
            Error::bad(format!(
                "unknown tensor {name} (not part of a {} model)",
                d.generation
            ))
        })?;
        let same = match p.role {
            Role::Vector => squeeze(shape) == squeeze(&p.shape),
            _ => shape == p.shape.as_slice(),
        };
        if !same {
            return Err(Error::bad(format!(
                "tensor {name} has shape {shape:?}, expected {:?}",
                p.shape
            )));
        }
    }
    match want.into_keys().min() {
        Some(name) => Err(Error::bad(format!("missing tensor {name}"))),
        None => Ok(()),
    }
}

/// A shape without its size-1 dimensions.
pub(crate) fn squeeze(s: &[usize]) -> Vec<usize> {
    s.iter().copied().filter(|&d| d != 1).collect()
}

/// The list being written, with shorthands for the kinds of tensor every generation has.
pub(crate) struct Params(Vec<Param>);

impl Params {
    fn push(&mut self, name: impl Into<String>, shape: &[usize], role: Role, init: Init) {
        self.0.push(Param {
            name: name.into(),
            shape: shape.to_vec(),
            role,
            init,
        });
    }

    /// A LayerNorm's `weight` (ones) and `bias` (zeros).
    fn norm(&mut self, prefix: &str, c: usize) {
        self.norm_with(prefix, c, Init::Ones);
    }

    /// A norm whose weight starts at `weight` (the bias at zero).
    fn norm_with(&mut self, prefix: &str, c: usize, weight: Init) {
        self.push(format!("{prefix}.weight"), &[c], Role::Vector, weight);
        self.push(format!("{prefix}.bias"), &[c], Role::Vector, Init::Zeros);
    }

    /// A `[1, 1, C]` vector.
    fn vec(&mut self, name: impl Into<String>, c: usize, init: Init) {
        self.push(name, &[1, 1, c], Role::Vector, init);
    }

    /// An `[out, in]` weight with generate_init_weight's rule: orthogonal with gain
    /// `√(out/in)` (when out > in and `fan_gain`) times `scale`, or zeros when `scale` is 0.
    fn linear(
        &mut self,
        name: impl Into<String>,
        out: usize,
        inp: usize,
        scale: f32,
        fan_gain: bool,
    ) {
        let init = if scale == 0.0 {
            Init::Zeros
        } else {
            let gain = if fan_gain && out > inp {
                (out as f32 / inp as f32).sqrt()
            } else {
                1.0
            };
            Init::Orthogonal(gain * scale)
        };
        self.push(name, &[out, inp], Role::Matrix(Layout::OutIn), init);
    }

    /// An `[in, out]` LoRA matrix.
    fn lora(&mut self, name: impl Into<String>, inp: usize, out: usize, init: Init) {
        self.push(name, &[inp, out], Role::Matrix(Layout::InOut), init);
    }

    /// The norms every block starts with (and `ln0` in block 0); returns the block's key
    /// prefix and RWKV-LM's depth ratios `ratio_0_to_1 = i/(L-1)` and
    /// `ratio_1_to_almost0 = 1 - i/L`.
    fn block_start(&mut self, i: usize, l: usize, c: usize) -> (String, f64, f64) {
        let b = format!("blocks.{i}");
        self.norm(&format!("{b}.ln1"), c);
        self.norm(&format!("{b}.ln2"), c);
        if i == 0 {
            self.norm(&format!("{b}.ln0"), c);
        }
        let r01 = if l > 1 {
            i as f64 / (l - 1) as f64
        } else {
            0.0
        };
        (b, r01, 1.0 - i as f64 / l as f64)
    }
}

/// `j / (C - 1)` for every channel (0 for a width of 1).
fn ramp(c: usize) -> impl Iterator<Item = f64> {
    (0..c).map(move |j| j as f64 / (c - 1).max(1) as f64)
}

/// `j / C` for every channel (RWKV-LM's `ddd`).
fn ddd(c: usize) -> Vec<f64> {
    (0..c).map(|i| i as f64 / c as f64).collect()
}

/// `ddd^e + add` for every channel, as f32.
fn pow_values(c: usize, e: f64, add: f64) -> Vec<f32> {
    ddd(c).iter().map(|d| (d.powf(e) + add) as f32).collect()
}

/// [`pow_values`] as an initialisation.
fn pow_mix(c: usize, e: f64, add: f64) -> Init {
    Init::Values(pow_values(c, e, add))
}

/// `1 - ddd^e` for every channel.
fn one_minus_pow(c: usize, e: f64) -> Init {
    Init::Values(ddd(c).iter().map(|d| (1.0 - d.powf(e)) as f32).collect())
}
