//! `rwkv train`: the training loop, checkpoints, resumption, metrics and the loss plot.

use super::optim::{lr_at, AdamConfig, Slot};
use super::params::{Dims, Params};
use crate::gpt::FusedGpt;
use crate::pass::products::Prepared;
use crate::pass::Pass;
use crate::v4::Fused4;
use crate::v7::Fused7;
use rayon::prelude::*;
use rwkv_core::checkpoint::{write_safetensors, Checkpoint, Generation, OutTensor};
use rwkv_core::data::{self, Tokens};
use rwkv_core::error::{Error, Result};
use rwkv_core::eval;
use rwkv_core::init::{init_tensors, InitSpec, Rng};
use rwkv_core::model::Model;
use rwkv_core::progress::{bar, fmt_secs};
use serde::{Deserialize, Serialize};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The generations `rwkv train` trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Arch {
    /// RWKV-7.
    #[serde(rename = "v7")]
    V7,
    /// RWKV-4.
    #[serde(rename = "v4")]
    V4,
    /// The Transformer baseline (nanoGPT's architecture).
    #[serde(rename = "gpt")]
    Gpt,
}

/// Settings named by a string (`arch`, `precision`) read through their `FromStr`, so that a
/// config file and a flag give the same message for a bad value.
macro_rules! deserialize_from_str {
    ($t:ty) => {
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<$t, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}
deserialize_from_str!(Arch);
deserialize_from_str!(Precision);

impl Arch {
    /// The generation it trains.
    pub fn generation(self) -> Generation {
        match self {
            Arch::V7 => Generation::V7,
            Arch::V4 => Generation::V4,
            Arch::Gpt => Generation::Gpt,
        }
    }
}

impl std::str::FromStr for Arch {
    type Err = Error;
    fn from_str(s: &str) -> Result<Arch> {
        match s {
            "v7" => Ok(Arch::V7),
            "v4" => Ok(Arch::V4),
            "gpt" => Ok(Arch::Gpt),
            _ => Err(Error::bad(format!(
                "arch {s}: training supports v7, v4 and gpt (the Transformer baseline)"
            ))),
        }
    }
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.generation().name())
    }
}

/// How RWKV-7's matrix products run in training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// bfloat16 inputs and f32 sums, on CPUs with AVX512-BF16 (f32 elsewhere).
    Bf16,
    /// Everything in f32.
    F32,
}

impl std::str::FromStr for Precision {
    type Err = Error;
    fn from_str(s: &str) -> Result<Precision> {
        match s {
            "bf16" => Ok(Precision::Bf16),
            "f32" => Ok(Precision::F32),
            _ => Err(Error::bad(format!("precision {s}: use bf16 or f32"))),
        }
    }
}

/// Everything that defines a training run. Every field is also a `rwkv train` flag of the same
/// name (`head_size` is `--head-size`); a TOML file given with `--config` uses the same keys.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct TrainConfig {
    /// Training text.
    pub data: PathBuf,
    /// `bytes`, `world` or a tokenizer file.
    pub tokenizer: String,
    /// Fraction of `data` (its end) held out for validation when `val_data` is not given.
    pub val_fraction: f64,
    /// Separate validation text.
    pub val_data: Option<PathBuf>,
    /// The generation to train.
    pub arch: Arch,
    /// Blocks.
    pub layers: usize,
    /// Width.
    pub dim: usize,
    /// Head size (RWKV-7).
    pub head_size: usize,
    /// Tokens per training window.
    pub ctx: usize,
    /// Windows per micro-batch.
    pub batch: usize,
    /// Micro-batches whose gradients are summed into one optimizer step.
    pub accum: usize,
    /// Optimizer steps.
    pub steps: u64,
    /// Peak learning rate.
    pub lr: f64,
    /// Learning rate at the last step (default: `lr / 100`; the resolved value is written
    /// into the run's `config.toml`, so that the file records the schedule that ran and
    /// `--config DIR/config.toml --resume` keeps it even if the default changes).
    pub lr_final: Option<f64>,
    /// Warm-up steps.
    pub warmup: u64,
    /// AdamW weight decay (2-D weights only).
    pub weight_decay: f64,
    /// Gradient clipping: largest global gradient norm.
    pub grad_clip: f64,
    /// L2Wrap factor.
    pub l2wrap: f64,
    /// Random seed (initialisation and data order).
    pub seed: u64,
    /// Run directory.
    pub out: PathBuf,
    /// Steps between checkpoints.
    pub save_every: u64,
    /// Steps between validations (also run at the last step).
    pub eval_every: u64,
    /// Steps between metric lines.
    pub log_every: u64,
    /// Also write `model.pth` with every checkpoint.
    pub pth: bool,
    /// `bf16`: the matrix products of RWKV-7 training take bfloat16 inputs and sum in f32
    /// (on CPUs with AVX512-BF16; f32 elsewhere); `f32`: everything in f32.
    pub precision: Precision,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            data: PathBuf::new(),
            tokenizer: "bytes".into(),
            val_fraction: 0.1,
            val_data: None,
            arch: Arch::V7,
            layers: 4,
            dim: 128,
            head_size: 32,
            ctx: 64,
            batch: 12,
            accum: 1,
            steps: 2000,
            lr: 6e-3,
            lr_final: None,
            warmup: 100,
            weight_decay: 0.1,
            grad_clip: 1.0,
            l2wrap: 1e-4,
            seed: 1337,
            out: PathBuf::from("runs/latest"),
            save_every: 500,
            eval_every: 500,
            log_every: 10,
            pth: false,
            precision: Precision::Bf16,
        }
    }
}

impl TrainConfig {
    /// The defaults for `arch`: RWKV-LM's settings for RWKV, nanoGPT's CPU recipe for the
    /// Transformer (`lr` 1e-3 to 1e-4, as its `train_shakespeare_char.py`, and no L2Wrap,
    /// which is RWKV-LM's).
    pub fn for_arch(arch: Arch) -> TrainConfig {
        let d = TrainConfig {
            arch,
            ..TrainConfig::default()
        };
        match arch {
            Arch::Gpt => TrainConfig {
                lr: 1e-3,
                lr_final: Some(1e-4),
                l2wrap: 0.0,
                ..d
            },
            _ => d,
        }
    }

    /// This configuration with the settings in `overrides` (an object of the same keys, as
    /// `rwkv train`'s flags serialise) replaced.
    pub fn with_overrides(&self, overrides: serde_json::Value) -> Result<TrainConfig> {
        with_overrides(self, overrides)
    }

    /// Reads a TOML config file.
    pub fn from_toml(path: &Path) -> Result<TrainConfig> {
        let s = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_toml_str(&s, &path.display().to_string())
    }

    /// Parses the text of a TOML config; `what` names it in messages.
    pub fn from_toml_str(text: &str, what: &str) -> Result<TrainConfig> {
        toml::from_str(text).map_err(|e| {
            Error::bad(format!(
                "{what}: {}",
                e.to_string().lines().collect::<Vec<_>>().join(" ")
            ))
        })
    }

    /// Errors on a setting no run can use (a zero size, a width the heads do not divide, a
    /// learning rate that is not a positive number, ...).
    pub fn check(&self) -> Result<()> {
        check_run(
            &[
                ("layers", self.layers as u64),
                ("dim", self.dim as u64),
                ("ctx", self.ctx as u64),
                ("batch", self.batch as u64),
                ("accum", self.accum as u64),
                ("steps", self.steps),
                ("save-every", self.save_every),
                ("eval-every", self.eval_every),
                ("log-every", self.log_every),
            ],
            self.lr,
            self.val_data.is_some(),
            self.val_fraction,
        )?;
        if self.arch != Arch::V4
            && (self.head_size == 0 || !self.dim.is_multiple_of(self.head_size))
        {
            return Err(Error::bad(format!(
                "dim {} is not a multiple of head-size {}",
                self.dim, self.head_size
            )));
        }
        if self.arch == Arch::V7 && self.head_size > 256 {
            return Err(Error::bad("head-size above 256 is not supported"));
        }
        if self.data.as_os_str().is_empty() {
            return Err(Error::bad("data (the training text) is required"));
        }
        Ok(())
    }

    fn lr_final(&self) -> f64 {
        // lr/100 rather than lr/10: on the recipe, three seeds each gave a lower validation
        // loss with it (paired runs, by 0.003 to 0.006), as the loss still falls steeply at
        // the end of the cosine.
        self.lr_final.unwrap_or(self.lr / 100.0)
    }
}

/// `cfg` with the keys in `overrides` (an object of its serialised keys) replaced.
pub(crate) fn with_overrides<T: Serialize + serde::de::DeserializeOwned>(
    cfg: &T,
    overrides: serde_json::Value,
) -> Result<T> {
    let mut merged = serde_json::to_value(cfg).map_err(|e| Error::Internal(e.to_string()))?;
    if let (Some(m), serde_json::Value::Object(o)) = (merged.as_object_mut(), overrides) {
        m.extend(o);
    }
    serde_json::from_value(merged).map_err(|e| Error::bad(e.to_string()))
}

/// The checks every run's settings share: counts that must be at least 1, a learning rate that
/// is a positive number, and a held-out fraction strictly between 0 and 1 unless separate
/// validation data is given.
pub(crate) fn check_run(
    counts: &[(&str, u64)],
    lr: f64,
    val_data: bool,
    val_fraction: f64,
) -> Result<()> {
    if let Some((n, _)) = counts.iter().find(|(_, v)| *v == 0) {
        return Err(Error::bad(format!("{n} must be at least 1")));
    }
    if !(lr > 0.0 && lr.is_finite()) {
        return Err(Error::bad("lr must be a positive number"));
    }
    if !(val_data || val_fraction > 0.0 && val_fraction < 1.0) {
        return Err(Error::bad(
            "val-fraction must be between 0 and 1 (or give val-data)",
        ));
    }
    Ok(())
}

/// One metrics line.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Metric {
    /// Optimizer step (1-based).
    pub step: u64,
    /// Mean training loss over the steps since the last line.
    pub train_loss: f64,
    /// Learning rate of the step.
    pub lr: f64,
    /// Training throughput since the last line.
    pub tokens_per_s: f64,
    /// Validation loss, on the steps where it ran.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub val_loss: Option<f64>,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
}

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct Summary {
    /// Final validation loss (windows of `ctx`, fresh state each).
    pub val_loss: f64,
    /// Mean training throughput over the run (tokens per second).
    pub tokens_per_s: f64,
    /// The final model.
    pub model: PathBuf,
}

/// A run directory's files.
struct RunDir(PathBuf);

impl RunDir {
    fn state(&self) -> PathBuf {
        self.0.join("state.safetensors")
    }
    fn model(&self) -> PathBuf {
        self.0.join("model.safetensors")
    }
}

/// Training and validation token streams.
struct Corpus {
    train: Tokens,
    train_range: (usize, usize),
    /// A separate validation text; without one, validation reads the end of `train`.
    val_text: Option<Tokens>,
    val_range: (usize, usize),
}

impl Corpus {
    fn val(&self) -> &Tokens {
        self.val_text.as_ref().unwrap_or(&self.train)
    }
}

fn corpus(cfg: &TrainConfig, vocab: usize) -> Result<Corpus> {
    let train = data::load(&cfg.data, &cfg.tokenizer, &cfg.out)?;
    let (train_range, val_text, val_range) = match &cfg.val_data {
        Some(p) => {
            let val = data::load(p, &cfg.tokenizer, &cfg.out)?;
            let n = val.len();
            ((0, train.len()), Some(val), (0, n))
        }
        None => {
            let cut = data::val_start(train.len(), cfg.val_fraction);
            ((0, cut), None, (cut, train.len()))
        }
    };
    let need = cfg.ctx + 1;
    for (what, (a, b)) in [("training", train_range), ("validation", val_range)] {
        if b - a < need {
            return Err(Error::bad(format!(
                "{}: the {what} text has {} tokens, fewer than one window of ctx {} plus one",
                cfg.data.display(),
                b - a,
                cfg.ctx
            )));
        }
    }
    if let Some(t) = (train_range.0..train_range.1)
        .map(|i| train.get(i))
        .find(|&t| t as usize >= vocab)
    {
        return Err(Error::bad(format!(
            "{}: token id {t} is outside the model's vocabulary of {vocab}",
            cfg.data.display()
        )));
    }
    Ok(Corpus {
        train,
        train_range,
        val_text,
        val_range,
    })
}

/// The vocabulary size a tokenizer spec implies.
fn vocab_for(spec: &str) -> Result<usize> {
    Ok(match spec {
        "bytes" => 256,
        s => rwkv_core::tokenizer::load(s)?.vocab_size(),
    })
}

/// Mean loss over the text `range` of `toks`, cut into windows of `ctx` tokens, each window
/// from a fresh state (every token after the first is predicted exactly once): the current
/// weights scored by the inference engine, through the code of `rwkv eval --ctx`.
pub fn window_loss(m: &Params, toks: &Tokens, range: (usize, usize), ctx: usize) -> Result<f64> {
    let ck = m.checkpoint("the model being trained")?;
    let model = Model::from_checkpoint(&ck, None)?;
    let mut ids = Vec::with_capacity(range.1 - range.0);
    toks.copy(range.0, range.1, &mut ids);
    Ok(eval::score(&model, &ids, 0, Some(ctx), None, &mut |_, _| {})?.loss)
}

/// A generation's hand-written pass with one work area per shard and the weights' forms for
/// the products.
struct Runner<P: Pass> {
    pass: P,
    works: Vec<ShardWork<P::Work>>,
    prepared: Prepared,
}

/// What computes the loss and the gradients (one trainer holds one, for its whole run).
enum Engine {
    V4(Runner<Fused4>),
    V7(Runner<Fused7>),
    Gpt(Runner<FusedGpt>),
}

/// Evaluates `$body` with `$r` bound to the engine's [`Runner`], whichever its generation.
macro_rules! each {
    ($engine:expr, $r:ident => $body:expr) => {
        match $engine {
            Engine::V4($r) => $body,
            Engine::V7($r) => $body,
            Engine::Gpt($r) => $body,
        }
    };
}

impl Engine {
    /// The pass for `params`, with bfloat16 products if `bf16` and the CPU has them.
    fn new(params: &Params, bf16: bool) -> Result<Engine> {
        fn runner<P: Pass>(mut pass: P, bf16: bool) -> Runner<P> {
            pass.products_mut().set_bf16(bf16);
            Runner {
                pass,
                works: Vec::new(),
                prepared: Prepared::default(),
            }
        }
        Ok(match params.dims.arch {
            Generation::V4 => Engine::V4(runner(Fused4::new(params)?, bf16)),
            Generation::V7 => Engine::V7(runner(Fused7::new(params)?, bf16)),
            Generation::Gpt => Engine::Gpt(runner(FusedGpt::new(params)?, bf16)),
            g => {
                return Err(Error::bad(format!(
                    "training covers RWKV-4, RWKV-7 and the Transformer, not {g:?}"
                )))
            }
        })
    }

    /// Whether the products take bfloat16 inputs.
    fn bf16(&self) -> bool {
        each!(self, r => r.pass.products().bf16())
    }
}

/// The trainer's state between steps.
struct Trainer {
    cfg: TrainConfig,
    params: Params,
    slots: Vec<Slot>,
    step: u64,
    rng: Rng,
    adam: AdamConfig,
    engine: Engine,
}

impl Trainer {
    fn new(cfg: TrainConfig, vocab: usize) -> Result<Trainer> {
        let spec = InitSpec {
            arch: cfg.arch.generation(),
            n_layer: cfg.layers,
            n_embd: cfg.dim,
            vocab,
            head_size: cfg.head_size,
            positions: cfg.ctx,
            seed: cfg.seed,
        };
        let tensors = init_tensors(&spec)?;
        let params = match cfg.arch {
            Arch::Gpt => Params::from_tensors_with_heads(tensors, cfg.head_size)?,
            _ => Params::from_tensors(tensors)?,
        };
        Trainer::with_params(cfg, params)
    }

    /// A trainer at step 0 with fresh optimizer state.
    fn with_params(cfg: TrainConfig, params: Params) -> Result<Trainer> {
        let slots = params
            .names()
            .iter()
            .zip(params.shapes())
            .map(|(n, s)| Slot::new(n, s.len(), s.iter().product()))
            .collect();
        let adam = AdamConfig {
            beta1: 0.9,
            beta2: 0.99,
            // RWKV-LM's epsilon; nanoGPT keeps PyTorch's.
            eps: if cfg.arch == Arch::Gpt { 1e-8 } else { 1e-18 },
            weight_decay: cfg.weight_decay,
        };
        let engine = Engine::new(&params, cfg.precision == Precision::Bf16)?;
        Ok(Trainer {
            rng: Rng::new(cfg.seed ^ 0x5eed_da7a),
            cfg,
            params,
            slots,
            step: 0,
            adam,
            engine,
        })
    }

    /// The saved state: weights under the official names, optimizer moments as
    /// `adam.m.NAME`/`adam.v.NAME`, the step, RNG and config in the metadata.
    fn save(&self, dir: &RunDir) -> Result<()> {
        // The weights first: they alone make model.safetensors.
        let mut all = self.params.out_tensors();
        let weights = all.len();
        let named = self.params.names().iter().zip(self.params.shapes());
        for ((n, s), slot) in named.zip(&self.slots) {
            all.push(OutTensor::f32(format!("adam.m.{n}"), s.clone(), &slot.m));
            all.push(OutTensor::f32(format!("adam.v.{n}"), s.clone(), &slot.v));
        }
        let out = &all[..weights];
        let mut meta = self.params.metadata();
        meta.insert("step".into(), self.step.to_string());
        meta.insert("rng".into(), self.rng.state().to_string());
        meta.insert(
            "config".into(),
            toml::to_string(&self.cfg).map_err(|e| Error::Internal(e.to_string()))?,
        );
        // The model first, then the state that points past it: a kill between the two leaves
        // a state whose weights are in the state file itself, so resuming stays exact.
        let mut mmeta = self.params.metadata();
        mmeta.insert("step".into(), self.step.to_string());
        write_safetensors(&dir.model(), out, &mmeta)?;
        if self.cfg.pth {
            rwkv_core::checkpoint::write::write_pth(&dir.0.join("model.pth"), out)?;
        }
        write_safetensors(&dir.state(), &all, &meta)?;
        Ok(())
    }

    fn resume(cfg: TrainConfig, vocab: usize, dir: &RunDir) -> Result<Trainer> {
        let path = dir.state();
        let ck = Checkpoint::open(&path)?;
        let md = ck.metadata();
        let get = |k: &str| {
            md.get(k)
                .cloned()
                .ok_or_else(|| Error::bad(format!("{}: no {k} in the metadata", path.display())))
        };
        let saved: TrainConfig = toml::from_str(&get("config")?)
            .map_err(|e| Error::bad(format!("{}: bad config: {e}", path.display())))?;
        for (what, a, b) in [
            ("arch", saved.arch.to_string(), cfg.arch.to_string()),
            ("layers", saved.layers.to_string(), cfg.layers.to_string()),
            ("dim", saved.dim.to_string(), cfg.dim.to_string()),
            (
                "head-size",
                saved.head_size.to_string(),
                cfg.head_size.to_string(),
            ),
            ("tokenizer", saved.tokenizer.clone(), cfg.tokenizer.clone()),
        ] {
            if a != b && !(what == "head-size" && cfg.arch == Arch::V4) {
                return Err(Error::bad(format!(
                    "resume: {} was trained with {what} {a}, not {b}",
                    path.display()
                )));
            }
        }
        // The weights come from the state file (no initialisation to throw away).
        let params = Params::from_checkpoint_keys(&ck, |n| !n.starts_with("adam."))?;
        let want = Dims {
            arch: cfg.arch.generation(),
            n_layer: cfg.layers,
            n_embd: cfg.dim,
            head_size: if cfg.arch == Arch::V4 {
                0
            } else {
                cfg.head_size
            },
            vocab,
            positions: if cfg.arch == Arch::Gpt { cfg.ctx } else { 0 },
        };
        if params.dims != want {
            return Err(Error::bad(format!(
                "resume: {} holds a model of {:?}, not {want:?}",
                path.display(),
                params.dims
            )));
        }
        let mut t = Trainer::with_params(cfg, params)?;
        let named = t.params.names().iter().zip(t.params.shapes());
        for ((n, shape), slot) in named.zip(t.slots.iter_mut()) {
            for (moment, out) in [("m", &mut slot.m), ("v", &mut slot.v)] {
                let name = format!("adam.{moment}.{n}");
                ck.expect_shape(&name, shape)?;
                *out = ck.f32_vec(&name)?;
            }
        }
        t.step = get("step")?
            .parse()
            .map_err(|_| Error::bad(format!("{}: bad step", path.display())))?;
        t.rng = Rng::from_state(
            get("rng")?
                .parse()
                .map_err(|_| Error::bad(format!("{}: bad rng", path.display())))?,
        );
        Ok(t)
    }

    /// How the products run, for the log.
    fn precision(&self) -> &'static str {
        match self.cfg.precision {
            _ if self.engine.bf16() => "bf16 products",
            Precision::Bf16 => "f32 products (no AVX512-BF16 here)",
            Precision::F32 => "f32",
        }
    }

    /// One optimizer step over `accum` random micro-batches; returns (loss, grad norm, lr).
    fn step(&mut self, c: &Corpus) -> Result<(f64, f64, f64)> {
        let (ctx, b) = (self.cfg.ctx, self.cfg.batch);
        let (lo, hi) = c.train_range;
        let mut loss_sum = 0.0;
        let (mut inp, mut tgt) = (Vec::with_capacity(b * ctx), Vec::with_capacity(b * ctx));
        // Data parallelism: the windows are split into one shard per thread, each shard runs
        // its own forward and backward pass, and the gradients are summed in shard order (so
        // the result does not depend on timing). Small matrices and element-wise ops scale
        // far better this way than by splitting every op across threads.
        let shards = rayon::current_num_threads().clamp(1, b);
        let bounds: Vec<(usize, usize)> = (0..shards)
            .map(|i| (i * b / shards, (i + 1) * b / shards))
            .collect();
        let l2wrap = self.cfg.l2wrap;
        for micro in 0..self.cfg.accum {
            inp.clear();
            tgt.clear();
            for _ in 0..b {
                let span = (hi - lo - ctx) as u64;
                let s = lo + (self.rng.next_u64() % span) as usize;
                c.train.copy(s, s + ctx, &mut inp);
                c.train.copy(s + 1, s + ctx + 1, &mut tgt);
            }
            // The weights change once per step: their prepared forms too.
            let fresh = micro == 0;
            let p = &self.params;
            loss_sum += each!(&mut self.engine, r => {
                fused_step(r, p, &bounds, &inp, &tgt, ctx, l2wrap, fresh)?
            });
        }
        let inv = 1.0 / self.cfg.accum as f32;
        let (grads, sqs) = each!(&mut self.engine, r => shard_grads(&mut r.works, inv));
        let (out, grads) = self.update(grads, &sqs, loss_sum);
        each!(&mut self.engine, r => restore_grads(&mut r.works, grads));
        out
    }

    /// The optimizer's half of [`Trainer::step`]: from the summed gradients (scaled by
    /// `1/accum`) and their squares per tensor `sqs`, clips and updates every parameter in
    /// place; hands the gradient buffers back.
    #[allow(clippy::type_complexity)]
    fn update(
        &mut self,
        grads: Vec<Vec<f32>>,
        sqs: &[f64],
        loss_sum: f64,
    ) -> (Result<(f64, f64, f64)>, Vec<Vec<f32>>) {
        let loss = loss_sum / self.cfg.accum as f64;
        if !loss.is_finite() {
            return (Ok((loss, f64::NAN, 0.0)), grads);
        }
        let norm = sqs.iter().sum::<f64>().sqrt();
        if !norm.is_finite() {
            return (Ok((f64::NAN, norm, 0.0)), grads);
        }
        let clip = if norm > self.cfg.grad_clip {
            (self.cfg.grad_clip / (norm + 1e-6)) as f32
        } else {
            1.0
        };
        let lr = lr_at(
            self.step,
            self.cfg.steps,
            self.cfg.warmup,
            self.cfg.lr,
            self.cfg.lr_final(),
        );
        self.step += 1;
        let (step, adam) = (self.step, &self.adam);
        // Each parameter's update is independent: they run side by side on the pool, each in
        // place in the parameter's own storage.
        self.params
            .values_mut()
            .par_iter_mut()
            .zip(self.slots.par_iter_mut())
            .zip(grads.par_iter())
            .for_each(|((p, slot), g)| slot.update(p, g, clip, lr, step, adam));
        (Ok((loss, norm, lr)), grads)
    }
}

/// Tokens per piece of a shard in the hand-written pass.
const PIECE_TOKENS: usize = 192;

/// One shard's work areas and gradient buffers, kept from step to step.
/// (Work areas by shape: a shard that does not divide into whole pieces needs two.)
type ShardWork<W> = std::sync::Mutex<Option<(Vec<W>, Vec<Vec<f32>>)>>;

/// One micro-batch through the hand-written pass: each shard of windows runs on its own thread
/// with its own work area and gradient buffers; returns the mean loss and adds the gradients
/// into each shard's buffers. With `fresh` (a step's first micro-batch) it first remakes the
/// weights' forms for the products and zeroes the gradients.
#[allow(clippy::too_many_arguments)]
fn fused_step<P: Pass>(
    r: &mut Runner<P>,
    model: &Params,
    bounds: &[(usize, usize)],
    inp: &[u32],
    tgt: &[u32],
    ctx: usize,
    l2wrap: f64,
    fresh: bool,
) -> Result<f64> {
    let (f, works, prepared) = (&r.pass, &mut r.works, &mut r.prepared);
    works.resize_with(bounds.len(), Default::default);
    let rows = bounds.last().map_or(0, |b| b.1) * ctx;
    let scale = 1.0 / rows.max(1) as f32;
    // The shards share the parameters' slices.
    let params: Vec<&[f32]> = model.values().iter().map(Vec::as_slice).collect();
    if fresh {
        f.products().prepare(&params, prepared);
    }
    let pr = &*prepared;
    let mut slots: Vec<_> = works
        .iter_mut()
        .map(|w| w.get_mut().unwrap_or_else(|e| e.into_inner()))
        .collect();
    // About 192 tokens per piece: the recipe's two threads then keep their activations
    // (about 15 MB each) in the shared L3 cache.
    let piece = (PIECE_TOKENS / ctx.max(1)).max(1);
    let losses: Vec<Result<f64>> = bounds
        .par_iter()
        .zip(slots.par_iter_mut())
        .map(|(&(w0, w1), slot)| {
            let per = piece.min(w1 - w0).max(1);
            let (ws, g) = slot.get_or_insert_with(|| (Vec::new(), f.products().zero_grads()));
            // The shard's gradients add up over a step's micro-batches.
            if fresh {
                g.iter_mut().for_each(|v| v.fill(0.0));
            }
            // The shard's windows go through in pieces of `per`: smaller pieces keep both
            // threads' activations in the caches.
            let mut l = 0.0;
            for p0 in (w0..w1).step_by(per) {
                let p1 = (p0 + per).min(w1);
                let shape = (p1 - p0, ctx);
                let w = match ws.iter().position(|w| P::shape(w) == shape) {
                    Some(i) => &mut ws[i],
                    None => {
                        ws.push(f.work(shape.0, shape.1));
                        ws.last_mut().expect("just pushed")
                    }
                };
                let (r0, r1) = (p0 * ctx, p1 * ctx);
                l += f.accumulate(
                    &params,
                    pr,
                    &inp[r0..r1],
                    &tgt[r0..r1],
                    scale,
                    l2wrap as f32,
                    w,
                    g,
                )?;
            }
            Ok(l * scale as f64)
        })
        .collect();
    let mut loss = 0.0;
    for l in losses {
        loss += l?;
    }
    Ok(loss)
}

/// The step's gradients from the shards of the hand-written pass: the first shard's buffers
/// (moved out; [`restore_grads`] puts them back) with the others added, in shard order.
fn shard_grads<W>(works: &mut [ShardWork<W>], inv: f32) -> (Vec<Vec<f32>>, Vec<f64>) {
    let mut slots: Vec<_> = works
        .iter_mut()
        .filter_map(|w| w.get_mut().unwrap_or_else(|e| e.into_inner()).as_mut())
        .collect();
    let Some(first) = slots.first_mut() else {
        return (Vec::new(), Vec::new());
    };
    let mut sum = std::mem::take(&mut first.1);
    let rest: Vec<&Vec<Vec<f32>>> = slots[1..].iter().map(|s| &s.1).collect();
    let sqs = reduce_grads(&mut sum, &rest, inv);
    (sum, sqs)
}

/// Adds the other shards' gradients (`rest`, in order) into `sum`, scales it by `inv` and
/// returns each tensor's sum of squares, in one sweep on the pool. The squares are added in
/// tensor order by the caller, so the norm (and the clipping) do not depend on how the pool
/// split the work.
fn reduce_grads(sum: &mut [Vec<f32>], rest: &[&Vec<Vec<f32>>], inv: f32) -> Vec<f64> {
    sum.par_iter_mut()
        .enumerate()
        .map(|(i, acc)| {
            for g in rest {
                acc.iter_mut().zip(&g[i]).for_each(|(x, y)| *x += y);
            }
            // Eight partial sums (one running sum is a serial chain of f64 additions).
            let mut sq = [0.0f64; 8];
            let mut ch = acc.chunks_exact_mut(8);
            for c in &mut ch {
                for l in 0..8 {
                    c[l] *= inv;
                    sq[l] += (c[l] as f64) * (c[l] as f64);
                }
            }
            for x in ch.into_remainder() {
                *x *= inv;
                sq[0] += (*x as f64) * (*x as f64);
            }
            sq.iter().sum::<f64>()
        })
        .collect()
}

/// Gives the first shard its gradient buffers back (see [`shard_grads`]).
fn restore_grads<W>(works: &mut [ShardWork<W>], grads: Vec<Vec<f32>>) {
    if let Some(Some(first)) = works
        .first_mut()
        .map(|w| w.get_mut().unwrap_or_else(|e| e.into_inner()))
    {
        first.1 = grads;
    }
}

/// Writes the loss curve (training loss per logged step, validation loss where measured) as
/// an SVG.
pub fn plot(metrics: &[Metric], path: &Path) -> Result<()> {
    use plotters::prelude::*;
    if metrics.is_empty() {
        return Ok(());
    }
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (800, 500)).into_drawing_area();
        let perr = |e: &dyn std::fmt::Display| Error::Internal(format!("plot: {e}"));
        root.fill(&WHITE).map_err(|e| perr(&e))?;
        let max_step = metrics.last().map_or(1, |m| m.step).max(1);
        let losses = metrics
            .iter()
            .flat_map(|m| std::iter::once(m.train_loss).chain(m.val_loss))
            .filter(|x| x.is_finite());
        let (lo, hi) = losses.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| {
            (a.min(x), b.max(x))
        });
        let (lo, hi) = if lo < hi {
            (lo, hi)
        } else {
            (lo - 1.0, lo + 1.0)
        };
        let mut chart = ChartBuilder::on(&root)
            .caption("loss (nats per token)", ("sans-serif", 20))
            .margin(15)
            .x_label_area_size(35)
            .y_label_area_size(50)
            .build_cartesian_2d(0u64..max_step, (lo * 0.95)..(hi * 1.02))
            .map_err(|e| perr(&e))?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("loss")
            .draw()
            .map_err(|e| perr(&e))?;
        chart
            .draw_series(LineSeries::new(
                metrics.iter().map(|m| (m.step, m.train_loss)),
                &BLUE,
            ))
            .map_err(|e| perr(&e))?
            .label("train")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
        chart
            .draw_series(LineSeries::new(
                metrics
                    .iter()
                    .filter_map(|m| m.val_loss.map(|v| (m.step, v))),
                RED.stroke_width(2),
            ))
            .map_err(|e| perr(&e))?
            .label("validation")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
        chart
            .configure_series_labels()
            .background_style(WHITE)
            .border_style(BLACK)
            .draw()
            .map_err(|e| perr(&e))?;
        root.present().map_err(|e| perr(&e))?;
    }
    rwkv_core::checkpoint::write_atomic(path, |w| w.write_all(svg.as_bytes()))
}

/// What the run loop ([`run_loop`]) drives: `rwkv train`'s trainer and `rwkv tune`'s tuner.
pub(crate) trait Stepper {
    /// Optimizer steps done so far.
    fn done(&self) -> u64;
    /// One optimizer step: (loss, gradient norm before clipping, learning rate).
    fn step(&mut self) -> Result<(f64, f64, f64)>;
    /// The validation loss now.
    fn validate(&mut self) -> Result<f64>;
    /// Writes a checkpoint (atomically).
    fn save(&mut self) -> Result<()>;
    /// The resumable checkpoint's file (named when a loss goes non-finite).
    fn checkpoint(&self) -> PathBuf;
}

/// When the run loop validates, logs and saves, and how many tokens a step trains on.
pub(crate) struct Schedule {
    pub steps: u64,
    pub eval_every: u64,
    pub log_every: u64,
    pub save_every: u64,
    pub tokens_per_step: f64,
    /// Stop after this step as an interruption would.
    pub stop_at: Option<u64>,
}

/// How a run loop ended: the last validation loss and the median throughput of its logged
/// windows (tokens per second).
pub(crate) struct Outcome {
    pub val_loss: f64,
    pub tokens_per_s: f64,
}

/// The loop of a run in `dir` up to `sch.steps`: steps, validation at `eval_every` and at the
/// end, a metrics line (`metrics.jsonl`, kept up to the resumed step) and a progress line at
/// `log_every`, checkpoints and the loss plot at `save_every`, the end and `stop_at`.
pub(crate) fn run_loop(s: &mut dyn Stepper, sch: &Schedule, dir: &Path) -> Result<Outcome> {
    let metrics_path = dir.join("metrics.jsonl");
    let mut metrics = read_metrics(&metrics_path, s.done());
    let rewrite: String = metrics
        .iter()
        .map(|m| serde_json::to_string(m).unwrap_or_default() + "\n")
        .collect();
    rwkv_core::checkpoint::write_atomic(&metrics_path, |w| w.write_all(rewrite.as_bytes()))?;
    let mut log = std::fs::OpenOptions::new()
        .append(true)
        .open(&metrics_path)
        .map_err(|e| Error::io(&metrics_path, e))?;
    let tty = std::io::stderr().is_terminal();
    let run_start = Instant::now();
    let first_step = s.done();
    let mut win_secs = 0.0;
    let (mut win_loss, mut win_n) = (0.0, 0u64);
    let mut last_val = f64::NAN;
    while s.done() < sch.steps {
        let t0 = Instant::now();
        let (loss, norm, lr) = s.step()?;
        win_secs += t0.elapsed().as_secs_f64();
        if !loss.is_finite() {
            let ck = s.checkpoint();
            return Err(Error::bad(format!(
                "step {}: the loss is {loss} (gradient norm {norm}); stopping. The last good checkpoint is {} (step {})",
                s.done() + 1,
                ck.display(),
                Checkpoint::open(&ck)
                    .ok()
                    .and_then(|c| c.metadata().get("step").cloned())
                    .unwrap_or_else(|| "none".into())
            )));
        }
        win_loss += loss;
        win_n += 1;
        let step = s.done();
        let last = step == sch.steps;
        let val = if step.is_multiple_of(sch.eval_every) || last {
            let v = s.validate()?;
            last_val = v;
            Some(v)
        } else {
            None
        };
        if step.is_multiple_of(sch.log_every) || last || val.is_some() {
            let m = Metric {
                step,
                train_loss: win_loss / win_n as f64,
                lr,
                tokens_per_s: sch.tokens_per_step * win_n as f64 / win_secs.max(1e-9),
                val_loss: val,
                grad_norm: norm,
            };
            writeln!(log, "{}", serde_json::to_string(&m).unwrap_or_default())
                .map_err(|e| Error::io(&metrics_path, e))?;
            let done = (step - first_step) as f64;
            let eta = run_start.elapsed().as_secs_f64() / done.max(1.0) * (sch.steps - step) as f64;
            let line = format!(
                "step {step}/{} | loss {:.4} | lr {:.2e} | {:.0} tok/s | ETA {}{}",
                sch.steps,
                m.train_loss,
                lr,
                m.tokens_per_s,
                fmt_secs(eta),
                val.map(|v| format!(" | val {v:.4}")).unwrap_or_default()
            );
            if tty {
                eprint!("\r\x1b[2K{} {line}", bar(step, sch.steps));
                if val.is_some() {
                    eprintln!();
                }
            } else {
                eprintln!("{line}");
            }
            metrics.push(m);
            win_loss = 0.0;
            win_n = 0;
            // Throughput counts training steps only, not validation or checkpoints.
            win_secs = 0.0;
        }
        if step.is_multiple_of(sch.save_every) || last || sch.stop_at == Some(step) {
            s.save()?;
            plot(&metrics, &dir.join("loss.svg"))?;
        }
        if sch.stop_at == Some(step) {
            break;
        }
    }
    if tty {
        eprintln!();
    }
    if s.done() == first_step {
        // Resumed a run that had already reached its steps: nothing to do, still report.
        last_val = s.validate()?;
    }
    let trained = (s.done() - first_step) as f64 * sch.tokens_per_step;
    let mut tps: Vec<f64> = metrics
        .iter()
        .filter(|m| m.step > first_step)
        .map(|m| m.tokens_per_s)
        .collect();
    let tokens_per_s = if tps.is_empty() {
        trained / run_start.elapsed().as_secs_f64().max(1e-9)
    } else {
        tps.sort_by(|a, b| a.total_cmp(b));
        tps[tps.len() / 2]
    };
    Ok(Outcome {
        val_loss: last_val,
        tokens_per_s,
    })
}

fn read_metrics(path: &Path, upto: u64) -> Vec<Metric> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Metric>(l).ok())
        .filter(|m| m.step <= upto)
        .collect()
}

/// `rwkv train`'s trainer as the run loop sees it.
struct TrainRun<'a> {
    t: Trainer,
    corpus: &'a Corpus,
    dir: &'a RunDir,
}

impl Stepper for TrainRun<'_> {
    fn done(&self) -> u64 {
        self.t.step
    }
    fn step(&mut self) -> Result<(f64, f64, f64)> {
        self.t.step(self.corpus)
    }
    fn validate(&mut self) -> Result<f64> {
        let c = self.corpus;
        window_loss(&self.t.params, c.val(), c.val_range, self.t.cfg.ctx)
    }
    fn save(&mut self) -> Result<()> {
        self.t.save(self.dir)
    }
    fn checkpoint(&self) -> PathBuf {
        self.dir.state()
    }
}

/// Runs (or, with `resume`, continues) a training run; `stop_at` ends it early after that
/// step as an interruption would (the run can be resumed).
pub fn train(mut cfg: TrainConfig, resume: bool, stop_at: Option<u64>) -> Result<Summary> {
    cfg.check()?;
    cfg.lr_final = Some(cfg.lr_final());
    let dir = RunDir(cfg.out.clone());
    std::fs::create_dir_all(&dir.0).map_err(|e| Error::io(&dir.0, e))?;
    // Checkpoint writes a kill interrupted leave temporary files beside whole checkpoints.
    rwkv_core::checkpoint::remove_stale_temporaries(&dir.0);
    let vocab = vocab_for(&cfg.tokenizer)?;
    let corpus = corpus(&cfg, vocab)?;
    let t = if resume {
        if !dir.state().is_file() {
            return Err(Error::bad(format!(
                "resume: {} has no state.safetensors to resume from",
                dir.0.display()
            )));
        }
        Trainer::resume(cfg.clone(), vocab, &dir)?
    } else {
        Trainer::new(cfg.clone(), vocab)?
    };
    write_config(&dir.0, &cfg)?;
    eprintln!(
        "training {} · {} layers × {} · ctx {} · batch {} · {} steps · {} training tokens · {}",
        cfg.arch,
        cfg.layers,
        cfg.dim,
        cfg.ctx,
        cfg.batch,
        cfg.steps,
        corpus.train_range.1 - corpus.train_range.0,
        t.precision()
    );
    let sch = Schedule {
        steps: cfg.steps,
        eval_every: cfg.eval_every,
        log_every: cfg.log_every,
        save_every: cfg.save_every,
        tokens_per_step: (cfg.batch * cfg.ctx * cfg.accum) as f64,
        stop_at,
    };
    let mut run = TrainRun {
        t,
        corpus: &corpus,
        dir: &dir,
    };
    let out = run_loop(&mut run, &sch, &dir.0)?;
    Ok(Summary {
        val_loss: out.val_loss,
        tokens_per_s: out.tokens_per_s,
        model: dir.model(),
    })
}

/// Writes a run's resolved configuration as `config.toml` in `dir`.
pub(crate) fn write_config<T: Serialize>(dir: &Path, cfg: &T) -> Result<()> {
    let text = toml::to_string(cfg).map_err(|e| Error::Internal(e.to_string()))?;
    rwkv_core::checkpoint::write_atomic(&dir.join("config.toml"), |w| w.write_all(text.as_bytes()))
}
