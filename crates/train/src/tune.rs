//! `rwkv tune`: adapting a trained RWKV-7 to new data by state tuning (RWKV-PEFT's
//! `time_state`): every layer's initial WKV state is the only parameter, learnt through the
//! hand-written pass with every weight frozen (the backward pass computes the activations'
//! gradients but no weight gradient), with the schedule, clipping, metrics, atomic
//! checkpoints and exact resumption of `rwkv train`.
//!
//! The tuned state is written three ways: `state.safetensors` (this project's state file,
//! for `--state` everywhere), `time_state.pth` (RWKV-PEFT's layout: one
//! `blocks.{i}.att.time_state` `[H, N, N]` per layer, each head's matrix transposed against
//! the inference state, as RWKV-PEFT and ChatRWKV read it) and `tune.safetensors` (the state
//! with its optimizer moments, for `--resume`).
//!
//! Data: plain text (random windows of `ctx` tokens, every token trained on), or `.jsonl`
//! lines of `{"text": …}` or `{"messages": [{"role": …, "content": …}, …]}` (each line one
//! example starting from the tuned state; chat messages rendered in the RWKV chat format,
//! `User: …\n\nAssistant: …\n\n`, with the loss on the assistant's tokens only).

use crate::optim::{lr_at, AdamConfig, Slot};
use crate::params::Params;
use crate::pass::products::Prepared;
use crate::pass::{Pass, IGNORE};
use crate::run::{check_run, run_loop, write_config, Precision, Schedule, Stepper};
use crate::v7::{Fused7, Work};
use rayon::prelude::*;
use rwkv_core::checkpoint::{write_safetensors, Checkpoint, Generation, OutTensor};
use rwkv_core::error::{Error, Result};
use rwkv_core::init::Rng;
use rwkv_core::model::{Logits, Model, Slot as StateSlot, State};
use rwkv_core::tensor::{Layout, Matrix};
use rwkv_core::tokenizer::Tokenizer;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// What `rwkv tune` trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// The initial WKV state of every layer (RWKV-PEFT's `time_state`).
    State,
    /// Low-rank adapters on linear weights (RWKV-PEFT's `lora_A`, `lora_B`).
    Lora,
}

impl std::str::FromStr for Method {
    type Err = Error;
    fn from_str(s: &str) -> Result<Method> {
        match s {
            "state" => Ok(Method::State),
            "lora" => Ok(Method::Lora),
            _ => Err(Error::bad(format!(
                "unknown tuning method {s:?} (state, lora)"
            ))),
        }
    }
}

/// Everything that defines a tuning run; every field is also a `rwkv tune` flag.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct TuneConfig {
    /// The checkpoint to adapt (any RWKV-7 file the project reads; its weights stay frozen).
    pub model: PathBuf,
    /// Training data: plain text, or `.jsonl` of `{"text"}` or `{"messages"}` lines.
    pub data: PathBuf,
    /// Tokenizer spec (`world`, `bytes`, a file); default: the model's own.
    pub tokenizer: Option<String>,
    /// What is trained.
    pub method: Method,
    /// LoRA: the adapters' rank.
    pub rank: usize,
    /// LoRA: their alpha (the scale is `alpha / rank`, as RWKV-PEFT's and `--lora FILE:ALPHA`).
    pub alpha: f64,
    /// LoRA: the linear weights of every block that get an adapter (`att.key`, `ffn.value`, ...).
    pub targets: Vec<String>,
    /// Fraction of the data (its end: tokens of a text, lines of a jsonl) held out.
    pub val_fraction: f64,
    /// Separate validation data (same kinds as `data`).
    pub val_data: Option<PathBuf>,
    /// Tokens per training window (a jsonl example is cut to this).
    pub ctx: usize,
    /// Windows per optimizer step.
    pub batch: usize,
    /// Optimizer steps.
    pub steps: u64,
    /// Peak learning rate (default: 0.1 for a state, 1e-3 for LoRA).
    pub lr: Option<f64>,
    /// Learning rate at the last step (default `lr / 10`).
    pub lr_final: Option<f64>,
    /// Warm-up steps.
    pub warmup: u64,
    /// Largest global gradient norm.
    pub grad_clip: f64,
    /// L2Wrap factor.
    pub l2wrap: f64,
    /// Random seed (data order).
    pub seed: u64,
    /// Run directory.
    pub out: PathBuf,
    /// Steps between checkpoints.
    pub save_every: u64,
    /// Steps between validations (also at the last step).
    pub eval_every: u64,
    /// Steps between metric lines.
    pub log_every: u64,
    /// `bf16`: the products over the model's small `[in, out]` matrices (its decay, in-context
    /// rate, value and gate LoRAs) take bfloat16 inputs on CPUs with AVX512-BF16; `f32`. The
    /// frozen linear weights always run as stored.
    pub precision: Precision,
}

impl Default for TuneConfig {
    fn default() -> Self {
        TuneConfig {
            model: PathBuf::new(),
            data: PathBuf::new(),
            tokenizer: None,
            method: Method::State,
            rank: 16,
            alpha: 16.0,
            targets: LORA_TARGETS.iter().map(|t| t.to_string()).collect(),
            val_fraction: 0.1,
            val_data: None,
            ctx: 256,
            batch: 4,
            steps: 200,
            lr: None,
            lr_final: None,
            warmup: 10,
            grad_clip: 1.0,
            l2wrap: 1e-4,
            seed: 1337,
            out: PathBuf::from("runs/tune"),
            save_every: 100,
            eval_every: 50,
            log_every: 10,
            precision: Precision::Bf16,
        }
    }
}

impl TuneConfig {
    /// This configuration with the settings in `overrides` (an object of the same keys)
    /// replaced.
    pub fn with_overrides(&self, overrides: serde_json::Value) -> Result<TuneConfig> {
        crate::run::with_overrides(self, overrides)
    }

    fn check(&self) -> Result<()> {
        check_run(
            &[
                ("ctx", self.ctx as u64),
                ("batch", self.batch as u64),
                ("steps", self.steps),
                ("save-every", self.save_every),
                ("eval-every", self.eval_every),
                ("log-every", self.log_every),
            ],
            self.lr(),
            self.val_data.is_some(),
            self.val_fraction,
        )?;
        if self.data.as_os_str().is_empty() {
            return Err(Error::bad("data (the tuning text) is required"));
        }
        Ok(())
    }

    fn lr(&self) -> f64 {
        self.lr.unwrap_or(match self.method {
            Method::State => 0.1,
            Method::Lora => 1e-3,
        })
    }

    fn lr_final(&self) -> f64 {
        self.lr_final.unwrap_or(self.lr() / 10.0)
    }
}

/// One example: token ids and, for each position but the last, whether the next token is
/// trained on.
#[derive(Debug, Clone, PartialEq)]
struct Example {
    ids: Vec<u32>,
    trained: Vec<bool>,
}

/// Tuning or validation data.
#[derive(Debug)]
enum Data {
    /// One text: random windows of it.
    Stream(Vec<u32>),
    /// Separate examples, each from the tuned state.
    Examples(Vec<Example>),
}

/// A chat message's role as the RWKV chat format names it.
fn role_name(role: &str) -> Option<&'static str> {
    Some(match role {
        "system" => "System",
        "user" => "User",
        "assistant" => "Assistant",
        "tool" => "Tool",
        _ => return None,
    })
}

/// A message's text with its blank lines collapsed (a blank line ends a turn in the chat
/// format), as the server and `rwkv chat` render it.
fn one_turn(text: &str) -> String {
    let mut t = text.replace("\r\n", "\n").trim().to_string();
    while t.contains("\n\n") {
        t = t.replace("\n\n", "\n");
    }
    t
}

/// The example of one jsonl line (`line` numbers it in messages).
fn example_of(
    v: &serde_json::Value,
    tok: &dyn Tokenizer,
    what: &str,
    line: usize,
) -> Result<Example> {
    let bad = |m: String| Error::bad(format!("{what}:{line}: {m}"));
    let mut ids = Vec::new();
    let mut flags = Vec::new();
    let mut push = |text: &str, trained: bool| -> Result<()> {
        let t = tok.encode(text)?;
        flags.extend(std::iter::repeat_n(trained, t.len()));
        ids.extend(t);
        Ok(())
    };
    if let Some(text) = v.get("text") {
        let text = text
            .as_str()
            .ok_or_else(|| bad("\"text\" is not a string".into()))?;
        push(text, true)?;
    } else if let Some(msgs) = v.get("messages") {
        let msgs = msgs
            .as_array()
            .ok_or_else(|| bad("\"messages\" is not an array".into()))?;
        for (k, m) in msgs.iter().enumerate() {
            let role = m.get("role").and_then(|r| r.as_str()).unwrap_or("");
            let name = role_name(role)
                .ok_or_else(|| bad(format!("message {k}: unknown role {role:?}")))?;
            let content = m
                .get("content")
                .and_then(|c| c.as_str())
                .ok_or_else(|| bad(format!("message {k}: \"content\" is not a string")))?;
            let body = one_turn(content);
            if name == "Assistant" {
                push("Assistant:", false)?;
                push(&format!(" {body}\n\n"), true)?;
            } else {
                push(&format!("{name}: {body}\n\n"), false)?;
            }
        }
    } else {
        return Err(bad(
            "expected an object with \"text\" or \"messages\"".into()
        ));
    }
    // Position i predicts token i + 1: it is trained when that token is.
    let trained = flags.get(1..).unwrap_or(&[]).to_vec();
    Ok(Example { ids, trained })
}

/// Reads tuning data: a `.jsonl` file's examples, else the file as one text.
fn read_data(path: &Path, tok: &dyn Tokenizer) -> Result<Data> {
    let what = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        Error::bad(format!(
            "{what}: not UTF-8 text (at byte {})",
            e.utf8_error().valid_up_to()
        ))
    })?;
    if path.extension().is_none_or(|e| e != "jsonl") {
        return Ok(Data::Stream(tok.encode(&text)?));
    }
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| Error::bad(format!("{what}:{}: not valid JSON: {e}", i + 1)))?;
        out.push(example_of(&v, tok, &what, i + 1)?);
    }
    Ok(Data::Examples(out))
}

impl Data {
    /// Splits off the held-out end: the last `fraction` of a text's tokens or of the
    /// examples.
    fn split(self, fraction: f64) -> (Data, Data) {
        match self {
            Data::Stream(ids) => {
                let cut = rwkv_core::data::val_start(ids.len(), fraction);
                let val = ids[cut..].to_vec();
                let mut train = ids;
                train.truncate(cut);
                (Data::Stream(train), Data::Stream(val))
            }
            Data::Examples(mut ex) => {
                let n = ((ex.len() as f64 * fraction).ceil() as usize).min(ex.len());
                let val = ex.split_off(ex.len() - n);
                (Data::Examples(ex), Data::Examples(val))
            }
        }
    }

    /// Checks that there is something to learn from with windows of `ctx` tokens, dropping
    /// examples with no trained token inside their first window; `what` names the data.
    fn usable(self, ctx: usize, what: &str) -> Result<Data> {
        match self {
            Data::Stream(ids) if ids.len() > ctx => Ok(Data::Stream(ids)),
            Data::Stream(ids) => Err(Error::bad(format!(
                "{what}: {} tokens, fewer than one window of ctx {ctx} plus one",
                ids.len()
            ))),
            Data::Examples(ex) => {
                let kept: Vec<Example> = ex
                    .into_iter()
                    .filter(|e| e.trained.iter().take(ctx).any(|&t| t))
                    .collect();
                if kept.is_empty() {
                    return Err(Error::bad(format!(
                        "{what}: no usable examples (none has a trained token in its first {ctx})"
                    )));
                }
                Ok(Data::Examples(kept))
            }
        }
    }

    /// Appends one training window of `ctx` inputs and targets ([`IGNORE`] where not trained)
    /// drawn with `rng`.
    fn window(&self, ctx: usize, rng: &mut Rng, inp: &mut Vec<u32>, tgt: &mut Vec<u32>) {
        match self {
            Data::Stream(ids) => {
                let span = (ids.len() - ctx) as u64;
                let s = (rng.next_u64() % span) as usize;
                inp.extend_from_slice(&ids[s..s + ctx]);
                tgt.extend_from_slice(&ids[s + 1..s + ctx + 1]);
            }
            Data::Examples(ex) => {
                let e = &ex[(rng.next_u64() % ex.len() as u64) as usize];
                for i in 0..ctx {
                    match (e.ids.get(i), e.ids.get(i + 1)) {
                        (Some(&x), Some(&y)) => {
                            inp.push(x);
                            tgt.push(if e.trained[i] { y } else { IGNORE });
                        }
                        (Some(&x), None) => {
                            inp.push(x);
                            tgt.push(IGNORE);
                        }
                        _ => {
                            inp.push(0);
                            tgt.push(IGNORE);
                        }
                    }
                }
            }
        }
    }
}

/// The held-out loss with the state `start`, through the inference engine: a text in windows
/// of `ctx` tokens, each from `start` (what `rwkv eval --ctx --state` reports), or each
/// example's trained tokens (its first `ctx + 1` tokens) from `start`.
fn held_out_loss(model: &Model, val: &Data, ctx: usize, start: &State) -> Result<f64> {
    match val {
        Data::Stream(ids) => {
            Ok(rwkv_core::eval::score(model, ids, 0, Some(ctx), Some(start), &mut |_, _| {})?.loss)
        }
        Data::Examples(ex) => {
            let v = model.vocab_size();
            let (mut sum, mut n) = (0f64, 0usize);
            for e in ex {
                let len = e.ids.len().min(ctx + 1);
                if len < 2 {
                    continue;
                }
                let mut st = start.clone();
                let logits = model.forward(&e.ids[..len - 1], &mut st, Logits::All)?;
                for (i, row) in logits.chunks_exact(v).enumerate() {
                    if e.trained[i] {
                        sum += nll(row, e.ids[i + 1] as usize);
                        n += 1;
                    }
                }
            }
            Ok(sum / n.max(1) as f64)
        }
    }
}

/// `-log softmax(row)[target]`, in f64.
fn nll(row: &[f32], target: usize) -> f64 {
    let mx = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let s: f64 = row.iter().map(|&z| (z as f64 - mx).exp()).sum();
    s.ln() + mx - row[target] as f64
}

/// A tuned WKV state `[L, H, N, N]` (inference layout) as a [`State`] of `model` (the token
/// shifts at zero, as RWKV-PEFT's states start).
pub fn state_of(model: &Model, s0: &[f32]) -> State {
    let mut st = model.new_state();
    let l = model.info().n_layer;
    let per = s0.len() / l.max(1);
    for layer in 0..l {
        st.get_mut(layer, StateSlot::AttKv)
            .copy_from_slice(&s0[layer * per..(layer + 1) * per]);
    }
    st
}

/// The RWKV-PEFT `time_state` tensors of a tuned state: each head's matrix transposed.
fn time_state_tensors(s0: &[f32], l: usize, h: usize, n: usize) -> Vec<OutTensor<'static>> {
    let nn = n * n;
    (0..l)
        .map(|layer| {
            let mut t = vec![0f32; h * nn];
            for head in 0..h {
                let src = &s0[(layer * h + head) * nn..][..nn];
                let dst = &mut t[head * nn..][..nn];
                for i in 0..n {
                    for j in 0..n {
                        dst[j * n + i] = src[i * n + j];
                    }
                }
            }
            OutTensor::f32(format!("blocks.{layer}.att.time_state"), vec![h, n, n], &t)
        })
        .collect()
}

/// What a finished tuning run reports.
#[derive(Debug, Clone)]
pub struct TuneSummary {
    /// Held-out loss of the model as it was (from the zero state).
    pub val_before: f64,
    /// Held-out loss from the tuned state, or with the tuned adapters.
    pub val_after: f64,
    /// Median tuning throughput (tokens per second, padding included).
    pub tokens_per_s: f64,
    /// The files that hold the result: `state.safetensors` and RWKV-PEFT's `time_state.pth`,
    /// or RWKV-PEFT's `lora.pth`.
    pub files: Vec<PathBuf>,
}

/// One shard's work areas (by window count) and the frozen model's (small) gradient buffers.
type ShardWork = std::sync::Mutex<Option<(Vec<Work>, Vec<Vec<f32>>)>>;

/// One trained tensor and its optimizer state.
struct Trained {
    /// Its name in the files (`time_state`, `blocks.N.att.key.lora_A`, ...).
    name: String,
    shape: Vec<usize>,
    values: Vec<f32>,
    slot: Slot,
}

impl Trained {
    fn new(name: String, shape: Vec<usize>, values: Vec<f32>) -> Trained {
        let slot = Slot::new(&name, shape.len(), values.len());
        Trained {
            name,
            shape,
            values,
            slot,
        }
    }
}

/// The linear weights RWKV-PEFT puts adapters on by default (each block's).
pub const LORA_TARGETS: [&str; 6] = [
    "att.receptance",
    "att.key",
    "att.value",
    "att.output",
    "ffn.key",
    "ffn.value",
];

/// The tuner between steps.
struct Tuner {
    cfg: TuneConfig,
    params: Params,
    pass: Fused7,
    prepared: Prepared,
    /// State: one tensor, the initial state `[L, H, N, N]`. LoRA: `A` then `B` of each adapter.
    trained: Vec<Trained>,
    /// LoRA: the parameter index of each adapted weight, in the order of `trained`'s pairs.
    adapted: Vec<usize>,
    adam: AdamConfig,
    step: u64,
    rng: Rng,
    shards: Vec<ShardWork>,
}

/// Tokens per piece of a shard (as the trainer's).
const PIECE_TOKENS: usize = 192;

impl Tuner {
    fn new(cfg: TuneConfig, ck: &Checkpoint) -> Result<Tuner> {
        // The frozen linear weights are used as stored (memory-mapped; quantized files too):
        // never held in f32. (This also measured faster than bfloat16 packs of them: the
        // forward products run the inference kernels on the stored values.)
        let bf16 = cfg.precision == Precision::Bf16 && rwkv_core::cpu::has_avx512_bf16();
        let linear = |n: &str| {
            n != "emb.weight"
                && n.ends_with(".weight")
                && ck.get(n).is_some_and(|m| m.shape.len() == 2)
        };
        let params = Params::from_checkpoint_deferred(ck, linear)?;
        let mut pass = Fused7::new(&params)?;
        pass.products_mut().set_bf16(bf16);
        pass.products_mut().set_frozen(true);
        let mut rng = Rng::new(cfg.seed ^ 0x5eed_da7a);
        let d = params.schema().clone();
        let (mut trained, mut adapted) = (Vec::new(), Vec::new());
        match cfg.method {
            Method::State => {
                let shape = vec![d.n_layer, d.n_embd / d.head_size, d.head_size, d.head_size];
                let len = shape.iter().product();
                trained.push(Trained::new("time_state".into(), shape, vec![0.0; len]));
            }
            Method::Lora => {
                if cfg.rank == 0 {
                    return Err(Error::bad("rank must be at least 1"));
                }
                let scale = (cfg.alpha / cfg.rank as f64) as f32;
                for t in &cfg.targets {
                    if !params
                        .names()
                        .iter()
                        .any(|n| n == &format!("blocks.0.{t}.weight"))
                    {
                        return Err(Error::bad(format!(
                            "LoRA target {t} names no tensor (no blocks.0.{t}.weight in {})",
                            cfg.model.display()
                        )));
                    }
                }
                for layer in 0..d.n_layer {
                    for t in &cfg.targets {
                        let prefix = format!("blocks.{layer}.{t}");
                        let i = params.find(&format!("{prefix}.weight"))?;
                        let (n, k) = match params.shapes()[i][..] {
                            [n, k] => (n, k),
                            _ => {
                                return Err(Error::bad(format!("{prefix}.weight is not a matrix")))
                            }
                        };
                        pass.products_mut()
                            .set_adapter(i, cfg.rank, scale)
                            .map_err(|_| {
                                Error::bad(format!(
                                    "LoRA target {prefix}.weight is not a linear weight"
                                ))
                            })?;
                        // RWKV-PEFT's initialisation: A as nn.Linear's (kaiming-uniform,
                        // bound 1/√in), B zero, so that tuning starts from the model itself.
                        let bound = 1.0 / (k as f32).sqrt();
                        let av: Vec<f32> = (0..cfg.rank * k)
                            .map(|_| {
                                let u = (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
                                (2.0 * u - 1.0) * bound
                            })
                            .collect();
                        trained.push(Trained::new(
                            format!("{prefix}.lora_A"),
                            vec![cfg.rank, k],
                            av,
                        ));
                        trained.push(Trained::new(
                            format!("{prefix}.lora_B"),
                            vec![n, cfg.rank],
                            vec![0.0; n * cfg.rank],
                        ));
                        adapted.push(i);
                    }
                }
            }
        }
        let mut prepared = Prepared::default();
        let values: Vec<&[f32]> = params.values().iter().map(Vec::as_slice).collect();
        // The weights never change: their forms for the products are made once.
        pass.products().prepare(&values, &mut prepared);
        for (i, name) in params.names().iter().enumerate() {
            if !params.values()[i].is_empty() {
                continue;
            }
            let [n_out, n_in] = params.shapes()[i][..] else {
                return Err(Error::Internal(format!("{name} is not a matrix")));
            };
            let data = match ck.quantized_matrix(name, n_out, n_in)? {
                Some(q) => q,
                None => ck.float_tensor(name)?,
            };
            let w = Matrix {
                n_in,
                n_out,
                layout: Layout::OutIn,
                data,
            };
            pass.products().prepare_stored(i, w, &mut prepared)?;
        }
        Ok(Tuner {
            rng,
            cfg,
            params,
            pass,
            prepared,
            trained,
            adapted,
            adam: AdamConfig {
                beta1: 0.9,
                beta2: 0.99,
                eps: 1e-18,
                weight_decay: 0.0,
            },
            step: 0,
            shards: Vec::new(),
        })
    }

    /// The tuned initial state (empty for LoRA).
    fn s0(&self) -> &[f32] {
        match self.cfg.method {
            Method::State => &self.trained[0].values,
            Method::Lora => &[],
        }
    }

    /// One optimizer step over `batch` windows; returns (loss, gradient norm, lr).
    fn step(&mut self, data: &Data) -> Result<(f64, f64, f64)> {
        let (ctx, b) = (self.cfg.ctx, self.cfg.batch);
        let (mut inp, mut tgt) = (Vec::with_capacity(b * ctx), Vec::with_capacity(b * ctx));
        for _ in 0..b {
            data.window(ctx, &mut self.rng, &mut inp, &mut tgt);
        }
        for (j, &i) in self.adapted.iter().enumerate() {
            let (a, bm) = (&self.trained[2 * j].values, &self.trained[2 * j + 1].values);
            self.prepared.set_adapter(i, a, bm);
        }
        let rows = tgt.iter().filter(|&&t| t != IGNORE).count();
        let scale = 1.0 / rows.max(1) as f32;
        let n_shards = rayon::current_num_threads().clamp(1, b);
        self.shards.resize_with(n_shards, Default::default);
        let bounds: Vec<(usize, usize)> = (0..n_shards)
            .map(|i| (i * b / n_shards, (i + 1) * b / n_shards))
            .collect();
        let values: Vec<&[f32]> = self.params.values().iter().map(Vec::as_slice).collect();
        let state = self.cfg.method == Method::State;
        let s0 = match self.cfg.method {
            Method::State => self.trained[0].values.as_slice(),
            Method::Lora => &[],
        };
        let (pass, pr, l2) = (&self.pass, &self.prepared, self.cfg.l2wrap as f32);
        let piece = (PIECE_TOKENS / ctx).max(1);
        let mut slots: Vec<_> = self
            .shards
            .iter_mut()
            .map(|w| w.get_mut().unwrap_or_else(|e| e.into_inner()))
            .collect();
        let losses: Vec<Result<f64>> = bounds
            .par_iter()
            .zip(slots.par_iter_mut())
            .map(|(&(w0, w1), slot)| {
                let (ws, g) =
                    slot.get_or_insert_with(|| (Vec::new(), pass.products().zero_grads()));
                g.iter_mut().for_each(|v| v.fill(0.0));
                for w in ws.iter_mut() {
                    w.start_from(s0, state);
                }
                let mut l = 0.0;
                for p0 in (w0..w1).step_by(piece) {
                    let p1 = (p0 + piece).min(w1);
                    let shape = (p1 - p0, ctx);
                    let w = match ws.iter().position(|w| Fused7::shape(w) == shape) {
                        Some(i) => &mut ws[i],
                        None => {
                            let mut w = pass.work(shape.0, shape.1);
                            w.start_from(s0, state);
                            ws.push(w);
                            ws.last_mut().expect("just pushed")
                        }
                    };
                    let (r0, r1) = (p0 * ctx, p1 * ctx);
                    l +=
                        pass.accumulate(&values, pr, &inp[r0..r1], &tgt[r0..r1], scale, l2, w, g)?;
                }
                Ok(l * scale as f64)
            })
            .collect();
        let mut loss = 0.0;
        for l in losses {
            loss += l?;
        }
        // The trained tensors' gradients, summed over the shards in their order.
        let mut grads: Vec<Vec<f32>> = self
            .trained
            .iter()
            .map(|t| vec![0f32; t.values.len()])
            .collect();
        for (ws, g) in slots.iter().filter_map(|s| s.as_ref()) {
            if state {
                for w in ws {
                    add_to(&mut grads[0], w.state_grad());
                }
            }
            for (j, &i) in self.adapted.iter().enumerate() {
                let (da, db) = g[i].split_at(grads[2 * j].len());
                add_to(&mut grads[2 * j], da);
                add_to(&mut grads[2 * j + 1], db);
            }
        }
        drop(slots);
        if !loss.is_finite() {
            return Ok((loss, f64::NAN, 0.0));
        }
        let norm = grads
            .iter()
            .flatten()
            .map(|&x| (x as f64) * (x as f64))
            .sum::<f64>()
            .sqrt();
        let clip = if norm > self.cfg.grad_clip {
            (self.cfg.grad_clip / (norm + 1e-6)) as f32
        } else {
            1.0
        };
        let lr = lr_at(
            self.step,
            self.cfg.steps,
            self.cfg.warmup,
            self.cfg.lr(),
            self.cfg.lr_final(),
        );
        self.step += 1;
        let (step, adam) = (self.step, &self.adam);
        self.trained
            .par_iter_mut()
            .zip(grads.par_iter())
            .for_each(|(t, g)| t.slot.update(&mut t.values, g, clip, lr, step, adam));
        Ok((loss, norm, lr))
    }

    fn heads(&self) -> (usize, usize, usize) {
        let d = self.params.schema();
        (d.n_layer, d.n_embd / d.head_size, d.head_size)
    }

    /// The trained tensors under their names (the adapters as RWKV-PEFT saves them:
    /// `PREFIX.lora_A`, `PREFIX.lora_B`).
    fn trained_tensors(&self) -> Vec<OutTensor<'_>> {
        self.trained
            .iter()
            .map(|t| OutTensor::f32(t.name.clone(), t.shape.clone(), &t.values))
            .collect()
    }

    /// The model with the adapters folded in (for validation).
    fn merged_model(&self) -> Result<Model> {
        let mut ck = Checkpoint::open(&self.cfg.model)?;
        let lora = Checkpoint::from_tensors("the adapters being tuned", &self.trained_tensors())?;
        rwkv_core::checkpoint::lora::merge_lora(&mut ck, &lora, self.cfg.alpha as f32, false)?;
        Model::from_checkpoint(&ck, None)
    }

    /// The held-out loss now: from the tuned state, or of the model with the adapters.
    fn validate(&self, model: &Model, val: &Data) -> Result<f64> {
        match self.cfg.method {
            Method::State => held_out_loss(model, val, self.cfg.ctx, &state_of(model, self.s0())),
            Method::Lora => {
                let m = self.merged_model()?;
                held_out_loss(&m, val, self.cfg.ctx, &m.new_state())
            }
        }
    }

    /// Writes the tuned tensors (ours and RWKV-PEFT's files) and the resumable checkpoint.
    fn save(&self, dir: &Path, model: &Model) -> Result<()> {
        match self.cfg.method {
            Method::State => {
                let (l, h, n) = self.heads();
                state_of(model, self.s0()).save(dir.join("state.safetensors"))?;
                rwkv_core::checkpoint::write::write_pth(
                    &dir.join("time_state.pth"),
                    &time_state_tensors(self.s0(), l, h, n),
                )?;
            }
            Method::Lora => rwkv_core::checkpoint::write::write_pth(
                &dir.join("lora.pth"),
                &self.trained_tensors(),
            )?,
        }
        let mut all = self.trained_tensors();
        for t in &self.trained {
            all.push(OutTensor::f32(
                format!("adam.m.{}", t.name),
                t.shape.clone(),
                &t.slot.m,
            ));
            all.push(OutTensor::f32(
                format!("adam.v.{}", t.name),
                t.shape.clone(),
                &t.slot.v,
            ));
        }
        let mut meta = BTreeMap::new();
        meta.insert("step".into(), self.step.to_string());
        meta.insert("rng".into(), self.rng.state().to_string());
        meta.insert(
            "config".into(),
            toml::to_string(&self.cfg).map_err(|e| Error::Internal(e.to_string()))?,
        );
        write_safetensors(&dir.join("tune.safetensors"), &all, &meta)
    }

    /// Continues from `dir`'s checkpoint: the tensors, their moments, the step and the data
    /// order.
    fn resume(&mut self, dir: &Path) -> Result<()> {
        let path = dir.join("tune.safetensors");
        if !path.is_file() {
            return Err(Error::bad(format!(
                "resume: {} has no tune.safetensors to resume from",
                dir.display()
            )));
        }
        let ck = Checkpoint::open(&path)?;
        for t in &mut self.trained {
            for (name, out) in [
                (t.name.clone(), &mut t.values),
                (format!("adam.m.{}", t.name), &mut t.slot.m),
                (format!("adam.v.{}", t.name), &mut t.slot.v),
            ] {
                ck.expect_shape(&name, &t.shape)?;
                *out = ck.f32_vec(&name)?;
            }
        }
        let md = ck.metadata();
        let get = |k: &str| -> Result<u64> {
            md.get(k)
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| Error::bad(format!("{}: no {k} in the metadata", path.display())))
        };
        self.step = get("step")?;
        self.rng = Rng::from_state(get("rng")?);
        Ok(())
    }
}

/// `acc += x`.
fn add_to(acc: &mut [f32], x: &[f32]) {
    acc.iter_mut().zip(x).for_each(|(a, b)| *a += b);
}

/// Runs (or, with `resume`, continues) a tuning run; `stop_at` ends it after that step as an
/// interruption would. `tok` tokenizes the data (the model's tokenizer by default).
pub fn tune(
    cfg: TuneConfig,
    tok: &dyn Tokenizer,
    resume: bool,
    stop_at: Option<u64>,
) -> Result<TuneSummary> {
    cfg.check()?;
    let mut cfg = cfg;
    cfg.lr_final = Some(cfg.lr_final());
    cfg.lr = Some(cfg.lr());
    let ck = Checkpoint::open(&cfg.model)?;
    let info = rwkv_core::checkpoint::detect::detect(&ck)?;
    let what = cfg.model.display().to_string();
    if info.generation != Generation::V7 {
        return Err(Error::bad(format!(
            "{what}: tuning runs on RWKV-7 (the trainer's passes); this is RWKV {}",
            info.generation
        )));
    }
    if info.deep_embed > 0 {
        return Err(Error::bad(format!(
            "{what}: RWKV-7a's DeepEmbed is not in the trainer's passes; tuning runs on RWKV-7"
        )));
    }
    if tok.vocab_size() > info.vocab_size {
        return Err(Error::bad(format!(
            "tokenizer {} has {} tokens, more than the model's {}",
            tok.name(),
            tok.vocab_size(),
            info.vocab_size
        )));
    }
    let data = read_data(&cfg.data, tok)?;
    let (train, val) = match &cfg.val_data {
        Some(p) => (data, read_data(p, tok)?),
        None => data.split(cfg.val_fraction),
    };
    let dname = cfg.data.display().to_string();
    let train = train.usable(cfg.ctx, &dname)?;
    let vname = cfg
        .val_data
        .as_ref()
        .map_or(format!("{dname} (held out)"), |p| p.display().to_string());
    let val = val.usable(cfg.ctx, &vname)?;
    let dir = cfg.out.clone();
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    rwkv_core::checkpoint::remove_stale_temporaries(&dir);
    // Validation runs on the inference engine over the file as stored (memory-mapped).
    let model = Model::from_checkpoint(&ck, None)?;
    let mut t = Tuner::new(cfg.clone(), &ck)?;
    if resume {
        t.resume(&dir)?;
    }
    write_config(&dir, &cfg)?;
    let val_before = held_out_loss(&model, &val, cfg.ctx, &model.new_state())?;
    let method = match cfg.method {
        Method::State => "state tuning".to_string(),
        Method::Lora => format!(
            "LoRA tuning (rank {}, alpha {}, {})",
            cfg.rank,
            cfg.alpha,
            cfg.targets.join(" ")
        ),
    };
    eprintln!(
        "{method} {} · {} layers × {} · ctx {} · batch {} · {} steps · held-out loss {val_before:.4} before",
        what, info.n_layer, info.n_embd, cfg.ctx, cfg.batch, cfg.steps
    );
    let sch = Schedule {
        steps: cfg.steps,
        eval_every: cfg.eval_every,
        log_every: cfg.log_every,
        save_every: cfg.save_every,
        tokens_per_step: (cfg.batch * cfg.ctx) as f64,
        stop_at,
    };
    let mut run = TuneRun {
        t,
        train: &train,
        val: &val,
        model: &model,
        dir: &dir,
    };
    let out = run_loop(&mut run, &sch, &dir)?;
    if run.t.step == 0 {
        // Nothing was trained (and so nothing saved): the files still describe the run.
        run.save()?;
    }
    Ok(TuneSummary {
        val_before,
        val_after: out.val_loss,
        tokens_per_s: out.tokens_per_s,
        files: match cfg.method {
            Method::State => vec![dir.join("state.safetensors"), dir.join("time_state.pth")],
            Method::Lora => vec![dir.join("lora.pth")],
        },
    })
}

/// The tuner as the run loop sees it.
struct TuneRun<'a> {
    t: Tuner,
    train: &'a Data,
    val: &'a Data,
    model: &'a Model,
    dir: &'a Path,
}

impl Stepper for TuneRun<'_> {
    fn done(&self) -> u64 {
        self.t.step
    }
    fn step(&mut self) -> Result<(f64, f64, f64)> {
        self.t.step(self.train)
    }
    fn validate(&mut self) -> Result<f64> {
        self.t.validate(self.model, self.val)
    }
    fn save(&mut self) -> Result<()> {
        self.t.save(self.dir, self.model)
    }
    fn checkpoint(&self) -> PathBuf {
        self.dir.join("tune.safetensors")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(rel: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures")
            .join(rel)
    }

    /// Loss (mean over the trained targets) of the pass on the fixture model from `s0`, and
    /// the state's gradient; with `stored`, the linear weights run as stored (the f32 values
    /// of the others only).
    fn pass_loss(
        s0: &[f32],
        inp: &[u32],
        tgt: &[u32],
        ctx: usize,
        stored: bool,
    ) -> (f64, Vec<f32>) {
        let ck = Checkpoint::open(fixture("v7/model.safetensors")).unwrap();
        let linear = |n: &str| {
            n != "emb.weight" && n.ends_with(".weight") && ck.get(n).unwrap().shape.len() == 2
        };
        let params = if stored {
            Params::from_checkpoint_deferred(&ck, linear).unwrap()
        } else {
            Params::from_checkpoint_keys(&ck, |_| true).unwrap()
        };
        let mut pass = Fused7::new(&params).unwrap();
        pass.products_mut().set_bf16(false);
        pass.products_mut().set_frozen(true);
        let values: Vec<&[f32]> = params.values().iter().map(Vec::as_slice).collect();
        let mut pr = Prepared::default();
        pass.products().prepare(&values, &mut pr);
        for (i, name) in params.names().iter().enumerate() {
            if values[i].is_empty() {
                let [n_out, n_in] = params.shapes()[i][..] else {
                    panic!()
                };
                let w = Matrix {
                    n_in,
                    n_out,
                    layout: Layout::OutIn,
                    data: ck.float_tensor(name).unwrap(),
                };
                pass.products().prepare_stored(i, w, &mut pr).unwrap();
            }
        }
        let b = inp.len() / ctx;
        let mut w = pass.work(b, ctx);
        w.start_from(s0, true);
        let mut g = pass.products().zero_grads();
        let rows = tgt.iter().filter(|&&t| t != IGNORE).count();
        let scale = 1.0 / rows as f32;
        let l = pass
            .accumulate(&values, &pr, inp, tgt, scale, 0.0, &mut w, &mut g)
            .unwrap();
        (l * scale as f64, w.state_grad().to_vec())
    }

    /// The state's gradient against central differences of the inference engine's loss (an
    /// independent forward pass), at a random state, with some targets ignored.
    #[test]
    fn the_state_gradient_matches_finite_differences() {
        let model = Model::load(fixture("v7/model.safetensors")).unwrap();
        let (l, c, n) = (2, 128, 64);
        let len = l * c * n;
        let mut rng = Rng::new(7);
        let s0: Vec<f32> = (0..len)
            .map(|_| ((rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.6)
            .collect();
        let ctx = 20;
        let inp: Vec<u32> = (0..2 * ctx).map(|i| ((i * 37 + 11) % 300) as u32).collect();
        let mut tgt: Vec<u32> = (0..2 * ctx).map(|i| ((i * 53 + 5) % 300) as u32).collect();
        for t in tgt.iter_mut().step_by(3) {
            *t = IGNORE;
        }
        let (loss, grad) = pass_loss(&s0, &inp, &tgt, ctx, false);
        // The weights as stored (bf16, read in place and widened block by block) give the
        // same loss and gradient.
        let (sl, sg) = pass_loss(&s0, &inp, &tgt, ctx, true);
        assert!((sl - loss).abs() < 1e-5, "stored {sl} vs {loss}");
        let gmax = grad.iter().fold(0f32, |m, x| m.max(x.abs()));
        let gerr = grad
            .iter()
            .zip(&sg)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()))
            / gmax;
        assert!(
            gerr < 1e-4,
            "stored weights: gradient off by {gerr:e} of the largest"
        );
        // The same loss from the inference engine, window by window from the state.
        let engine_loss = |s: &[f32]| -> f64 {
            let st = state_of(&model, s);
            let (mut sum, mut k) = (0f64, 0usize);
            for (wi, win) in inp.chunks(ctx).enumerate() {
                let logits = model.forward(win, &mut st.clone(), Logits::All).unwrap();
                for (i, row) in logits.chunks_exact(300).enumerate() {
                    let t = tgt[wi * ctx + i];
                    if t != IGNORE {
                        sum += nll(row, t as usize);
                        k += 1;
                    }
                }
            }
            sum / k as f64
        };
        let base = engine_loss(&s0);
        assert!((base - loss).abs() < 1e-4, "engine {base} vs pass {loss}");
        // The largest gradients' coordinates and a few others.
        let mut idx: Vec<usize> = (0..len).collect();
        idx.sort_by(|&a, &b| grad[b].abs().total_cmp(&grad[a].abs()));
        let mut worst = 0f64;
        for &i in idx.iter().take(6).chain(&[1, 4097, len - 3]) {
            let h = 1e-2f32;
            let (mut up, mut dn) = (s0.clone(), s0.clone());
            up[i] += h;
            dn[i] -= h;
            let fd = (engine_loss(&up) - engine_loss(&dn)) / (2.0 * h as f64);
            let err = (fd - grad[i] as f64).abs() / (grad[idx[0]].abs() as f64);
            worst = worst.max(err);
            assert!(
                err < 2e-3,
                "state[{i}]: finite difference {fd}, gradient {}",
                grad[i]
            );
        }
        eprintln!(
            "largest gradient {:e}; worst error {worst:e} of it",
            grad[idx[0]]
        );
    }

    /// A test adapter: its weight's prefix and index, `A`, `B`, and the weight's `[n, k]`.
    type Adapted = (&'static str, usize, Vec<f32>, Vec<f32>, usize, usize);

    /// The adapters' gradients against central differences of the inference engine's loss on
    /// the model with the adapters merged (RWKV-PEFT's `W + B·A·alpha/r`), with `B` nonzero so
    /// that both factors have gradients.
    #[test]
    fn the_lora_gradients_match_finite_differences() {
        let ck = Checkpoint::open(fixture("v7/model.safetensors")).unwrap();
        let params = Params::from_checkpoint_keys(&ck, |_| true).unwrap();
        let mut pass = Fused7::new(&params).unwrap();
        pass.products_mut().set_bf16(false);
        pass.products_mut().set_frozen(true);
        let (r, alpha) = (4, 8.0f32);
        let mut rng = Rng::new(11);
        let mut rnd = |n: usize, s: f32| -> Vec<f32> {
            (0..n)
                .map(|_| ((rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * s)
                .collect()
        };
        let targets = [
            "blocks.0.att.key",
            "blocks.1.ffn.value",
            "blocks.1.att.output",
        ];
        let mut ab = Vec::new();
        for t in targets {
            let i = params.find(&format!("{t}.weight")).unwrap();
            let [n, k] = params.shapes()[i][..] else {
                panic!()
            };
            pass.products_mut()
                .set_adapter(i, r, alpha / r as f32)
                .unwrap();
            ab.push((t, i, rnd(r * k, 0.4), rnd(n * r, 0.4), n, k));
        }
        let values: Vec<&[f32]> = params.values().iter().map(Vec::as_slice).collect();
        let mut pr = Prepared::default();
        pass.products().prepare(&values, &mut pr);
        for (_, i, a, b, ..) in &ab {
            pr.set_adapter(*i, a, b);
        }
        let ctx = 16;
        let inp: Vec<u32> = (0..2 * ctx).map(|i| ((i * 41 + 3) % 300) as u32).collect();
        let tgt: Vec<u32> = (0..2 * ctx).map(|i| ((i * 29 + 7) % 300) as u32).collect();
        let mut w = pass.work(2, ctx);
        w.start_from(&[], false);
        let mut g = pass.products().zero_grads();
        let scale = 1.0 / tgt.len() as f32;
        let loss = pass
            .accumulate(&values, &pr, &inp, &tgt, scale, 0.0, &mut w, &mut g)
            .unwrap()
            * scale as f64;
        let engine_loss = |ab: &[Adapted]| -> f64 {
            let ts: Vec<OutTensor> = ab
                .iter()
                .flat_map(|(t, _, a, b, n, k)| {
                    [
                        OutTensor::f32(format!("{t}.lora_A"), vec![r, *k], a),
                        OutTensor::f32(format!("{t}.lora_B"), vec![*n, r], b),
                    ]
                })
                .collect();
            let lora = Checkpoint::from_tensors("lora", &ts).unwrap();
            let mut m = Checkpoint::open(fixture("v7/model.safetensors")).unwrap();
            rwkv_core::checkpoint::lora::merge_lora(&mut m, &lora, alpha, false).unwrap();
            let model = Model::from_checkpoint(&m, None).unwrap();
            let mut sum = 0f64;
            for (wi, win) in inp.chunks(ctx).enumerate() {
                let logits = model
                    .forward(win, &mut model.new_state(), Logits::All)
                    .unwrap();
                for (j, row) in logits.chunks_exact(300).enumerate() {
                    sum += nll(row, tgt[wi * ctx + j] as usize);
                }
            }
            sum / tgt.len() as f64
        };
        let base = engine_loss(&ab);
        assert!((base - loss).abs() < 1e-4, "engine {base} vs pass {loss}");
        let mut worst = 0f64;
        for t in 0..ab.len() {
            let i = ab[t].1;
            let na = ab[t].2.len();
            let gmax = g[i].iter().fold(0f32, |m, x| m.max(x.abs())) as f64;
            // The largest of dA and of dB, and one more of each.
            let top = |lo: usize, hi: usize| {
                (lo..hi)
                    .max_by(|&x, &y| g[i][x].abs().total_cmp(&g[i][y].abs()))
                    .unwrap()
            };
            for c in [top(0, na), top(na, g[i].len()), 5, na + 3] {
                let h = 1e-2f32;
                let (mut up, mut dn) = (ab.clone(), ab.clone());
                let bump = |v: &mut Vec<Adapted>, d: f32| {
                    if c < na {
                        v[t].2[c] += d
                    } else {
                        v[t].3[c - na] += d
                    }
                };
                bump(&mut up, h);
                bump(&mut dn, -h);
                let fd = (engine_loss(&up) - engine_loss(&dn)) / (2.0 * h as f64);
                let err = (fd - g[i][c] as f64).abs() / gmax;
                worst = worst.max(err);
                assert!(
                    err < 5e-3,
                    "{} [{c}]: finite difference {fd}, gradient {}",
                    ab[t].0,
                    g[i][c]
                );
            }
        }
        eprintln!("worst LoRA gradient error {worst:e} of each adapter's largest");
    }

    #[test]
    fn chat_lines_train_on_the_assistant_only() {
        let tok = rwkv_core::tokenizer::load("bytes").unwrap();
        let v: serde_json::Value = serde_json::from_str(
            r#"{"messages":[{"role":"user","content":"Hi\n\nthere"},{"role":"assistant","content":"Yo"}]}"#,
        )
        .unwrap();
        let e = example_of(&v, tok.as_ref(), "x.jsonl", 3).unwrap();
        let text = String::from_utf8(e.ids.iter().map(|&b| b as u8).collect()).unwrap();
        assert_eq!(text, "User: Hi\nthere\n\nAssistant: Yo\n\n");
        let trained: String = e
            .ids
            .iter()
            .skip(1)
            .zip(&e.trained)
            .filter(|(_, &t)| t)
            .map(|(&b, _)| b as u8 as char)
            .collect();
        assert_eq!(trained, " Yo\n\n");
        let bad: serde_json::Value =
            serde_json::from_str(r#"{"messages":[{"role":"bot","content":"x"}]}"#).unwrap();
        let e = example_of(&bad, tok.as_ref(), "x.jsonl", 3)
            .unwrap_err()
            .to_string();
        assert!(e.contains("x.jsonl:3") && e.contains("unknown role"), "{e}");
    }
}
