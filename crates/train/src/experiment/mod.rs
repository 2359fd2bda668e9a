//! `rwkv experiment NAME`: the seed's claims about RWKV measured by the product itself, each
//! experiment writing a JSON of every figure and its plots into `--out`, and printing a
//! short table. `--quick` runs a reduced version in seconds (what the tests run).
//!
//! - [`gen_time`]: time per token and memory against the position, RWKV-7 against the
//!   Transformer baseline of the same blocks;
//! - [`decay`]: every layer's and head's time horizon, from the decay of any RWKV checkpoint;
//! - [`context`]: the loss against the position with the state carried, for models trained
//!   on windows of different lengths;
//! - [`recall`]: associative recall, RWKV-7 against the Transformer, with the queries after
//!   the pairs and also before them.

pub mod context;
pub mod decay;
pub mod gen_time;
pub mod plot;
pub mod recall;

use crate::run::{train, Arch, TrainConfig};
use rwkv_core::checkpoint::Generation;
use rwkv_core::error::{Error, Result};
use rwkv_core::model::Model;
use serde::Serialize;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The experiments, by name.
pub const NAMES: [&str; 4] = ["gen-time", "context", "decay", "recall"];

/// What an experiment runs on.
#[derive(Debug, Clone)]
pub struct ExperimentConfig {
    /// Which experiment ([`NAMES`]).
    pub name: String,
    /// The reduced version.
    pub quick: bool,
    /// Where its files go.
    pub out: PathBuf,
    /// Checkpoints to analyse (`decay`; default: the built-in model and one trained at a
    /// longer context).
    pub models: Vec<PathBuf>,
    /// The text models are trained and measured on.
    pub data: PathBuf,
    /// `gen-time`'s shape and length, instead of its defaults: blocks, width (heads of 64)
    /// and tokens per model.
    pub layers: Option<usize>,
    /// Width.
    pub dim: Option<usize>,
    /// Tokens per model.
    pub tokens: Option<usize>,
}

/// A model shape of the experiments.
#[derive(Debug, Clone, Serialize)]
pub struct Shape {
    /// Blocks.
    pub layers: usize,
    /// Width.
    pub dim: usize,
    /// Head size.
    pub head_size: usize,
    /// Vocabulary (256: bytes).
    pub vocab: usize,
}

/// Writes `v` as pretty JSON, atomically.
pub(crate) fn write_json(path: &Path, v: &impl Serialize) -> Result<()> {
    let s = serde_json::to_string_pretty(v).map_err(|e| Error::Internal(e.to_string()))?;
    rwkv_core::checkpoint::write_atomic(path, |w| w.write_all(s.as_bytes()))
}

/// One progress line on stderr: `what`, a bar, done/total and the time left.
pub(crate) fn progress(what: &str, done: usize, total: usize, start: Instant) {
    let el = start.elapsed().as_secs_f64();
    let left = el / done.max(1) as f64 * (total - done) as f64;
    eprint!(
        "\r{what}{} {done}/{total} | ETA {}   ",
        rwkv_core::progress::bar(done as u64, total as u64),
        rwkv_core::progress::fmt_secs(left)
    );
}

/// Runs the experiment `cfg.name`; returns the table it prints.
pub fn run(cfg: &ExperimentConfig) -> Result<String> {
    if !NAMES.contains(&cfg.name.as_str()) {
        return Err(Error::bad(format!(
            "unknown experiment {} (one of: {})",
            cfg.name,
            NAMES.join(", ")
        )));
    }
    std::fs::create_dir_all(&cfg.out).map_err(|e| Error::io(&cfg.out, e))?;
    let start = Instant::now();
    let table = match cfg.name.as_str() {
        "gen-time" => gen_time_table(cfg)?,
        "context" => context_table(cfg)?,
        "recall" => recall_table(cfg)?,
        _ => decay_table(cfg)?,
    };
    Ok(format!(
        "{table}(files in {}, {:.0} s)\n",
        cfg.out.display(),
        start.elapsed().as_secs_f64()
    ))
}

fn gen_time_table(cfg: &ExperimentConfig) -> Result<String> {
    // The 0.1B shape (L12 D768) would take about half an hour for the Transformer's 16,384
    // tokens on two cores (its KV cache reads grow to 0.6 GB per token); L6 D384 keeps the
    // run under ten minutes with the same contrast.
    let (shape, tokens, every) = if cfg.quick {
        (
            Shape {
                layers: 2,
                dim: 64,
                head_size: 32,
                vocab: 256,
            },
            512,
            64,
        )
    } else {
        (
            Shape {
                layers: 6,
                dim: 384,
                head_size: 64,
                vocab: 256,
            },
            16384,
            256,
        )
    };
    let shape = Shape {
        layers: cfg.layers.unwrap_or(shape.layers),
        dim: cfg.dim.unwrap_or(shape.dim),
        ..shape
    };
    let tokens = cfg.tokens.unwrap_or(tokens);
    if tokens == 0 || shape.layers == 0 || !shape.dim.is_multiple_of(shape.head_size) {
        return Err(Error::bad(format!(
            "gen-time needs at least one token and layer, and a width that heads of {} divide",
            shape.head_size
        )));
    }
    let r = gen_time::run(&shape, tokens, every, &cfg.out)?;
    let mut t = format!(
        "gen-time: {} layers, width {}, {} tokens each, bf16 weights\n",
        shape.layers, shape.dim, tokens
    );
    t += "model        params   block params   ms/token first → last   state/cache first → last\n";
    for run in &r.runs {
        let last = run.positions.len() - 1;
        t += &format!(
            "{:<12} {:>6.2} M  {:>8.2} M     {:>7.3} → {:>7.3}        {:>8.2} → {:>8.2} MiB\n",
            run.model,
            run.params as f64 / 1e6,
            run.block_params as f64 / 1e6,
            run.ms_per_token[0],
            run.ms_per_token[last],
            run.state_mb[0],
            run.state_mb[last]
        );
    }
    for (p, x) in &r.total_time_ratio {
        t += &format!("Transformer / RWKV-7 total time at {p} tokens: {x:.2}x\n");
    }
    for (p, x) in &r.per_token_ratio {
        t += &format!("Transformer / RWKV-7 time of token {p}: {x:.2}x\n");
    }
    Ok(t)
}

/// The models `decay` analyses by default, with their names: the built-in model (context 64)
/// and one trained on the same text at context 512 (made once under `out/ctx512`, reused
/// after).
fn default_decay_models(cfg: &ExperimentConfig) -> Result<Vec<(PathBuf, String)>> {
    let mut models = vec![(
        rwkv_core::default_model()?,
        "built-in model (context 64)".to_string(),
    )];
    let c = TrainConfig {
        data: cfg.data.clone(),
        ..TrainConfig::for_arch(Arch::V7)
    };
    // The recipe's model and tokens per step, in longer windows.
    let c = if cfg.quick {
        TrainConfig {
            ctx: 128,
            batch: 2,
            steps: 20,
            ..quick_shape(c)
        }
    } else {
        TrainConfig {
            ctx: 512,
            batch: 2,
            steps: 1500,
            ..c
        }
    };
    let model = trained(cfg, c, "ctx512")?;
    let ctx = if cfg.quick { 128 } else { 512 };
    models.push((model, format!("RWKV-7 trained at context {ctx}")));
    Ok(models)
}

/// A tiny model for the quick runs.
fn quick_shape(c: TrainConfig) -> TrainConfig {
    TrainConfig {
        layers: 2,
        dim: 32,
        head_size: 16,
        warmup: 2,
        ..c
    }
}

/// The model `c` trains, under `out/NAME` (`NAME-quick` for the quick runs): trained once,
/// reused by later runs of the experiments.
fn trained(cfg: &ExperimentConfig, c: TrainConfig, name: &str) -> Result<PathBuf> {
    let tag = if cfg.quick { "-quick" } else { "" };
    let dir = cfg.out.join(format!("{name}{tag}"));
    let model = dir.join("model.safetensors");
    // A run a kill interrupted is resumed; a finished one only validates.
    let resume = dir.join("state.safetensors").is_file();
    if !resume {
        eprintln!(
            "{}: training {} at context {} ({} steps of {} windows)",
            cfg.name,
            match c.arch {
                Arch::Gpt => "the Transformer",
                _ => "an RWKV-7",
            },
            c.ctx,
            c.steps,
            c.batch
        );
    }
    train(TrainConfig { out: dir, ..c }, resume, None)?;
    Ok(model)
}

fn context_table(cfg: &ExperimentConfig) -> Result<String> {
    // The same tokens per step (and so the same tokens seen) at every context, in at least
    // two windows (one shard per thread).
    let (ctxs, per_step, steps, segment) = if cfg.quick {
        ([16, 32, 64], 128, 30, 256)
    } else {
        ([64, 256, 1024], 2048, 750, 2048)
    };
    let toks = rwkv_core::data::load(&cfg.data, "bytes", &cfg.out)?;
    let from = rwkv_core::data::val_start(toks.len(), 0.1);
    let mut val = Vec::new();
    toks.copy(from, toks.len(), &mut val);
    if cfg.quick {
        val.truncate(16 * segment + 1);
    }
    let mut curves = Vec::new();
    for ctx in ctxs {
        let c = TrainConfig {
            data: cfg.data.clone(),
            ctx,
            batch: per_step / ctx,
            steps,
            ..TrainConfig::for_arch(Arch::V7)
        };
        let c = if cfg.quick { quick_shape(c) } else { c };
        let path = trained(cfg, c, &format!("ctx{ctx}"))?;
        let model = Model::load(&path)?;
        let val_loss =
            rwkv_core::eval::score(&model, &val, 0, Some(ctx), None, &mut |_, _| {})?.loss;
        let (bin_start, loss) = context::curve(&model, &val, segment)?;
        curves.push(context::Curve {
            ctx,
            tokens_seen: (per_step as u64) * steps,
            val_loss,
            bin_start,
            loss,
        });
    }
    let r = context::Report {
        segment,
        segments: (val.len() - 1) / segment,
        curves,
    };
    context::report(&r, &cfg.out)?;
    let mut t = format!(
        "context: loss by position in segments of {segment} tokens, state carried ({} segments)\n",
        r.segments
    );
    t += "trained at   tokens seen   val (own ctx)";
    let starts = &r.curves[0].bin_start;
    let shown: Vec<usize> = (0..starts.len())
        .filter(|&b| b >= 4 && b % 2 == 0)
        .collect();
    for &b in &shown {
        t += &format!("   @{:<5}", starts[b]);
    }
    t += "\n";
    for c in &r.curves {
        t += &format!(
            "{:>10}   {:>11}   {:>13.4}",
            c.ctx, c.tokens_seen, c.val_loss
        );
        for &b in &shown {
            t += &format!("   {:<6.3}", c.loss[b]);
        }
        t += "\n";
    }
    Ok(t)
}

fn recall_table(cfg: &ExperimentConfig) -> Result<String> {
    use recall::Order;
    let (pairs, train_n, test_n, ctx, steps): (&[usize], _, _, _, _) = if cfg.quick {
        (&[2, 4], 2000, 40, 64, 30)
    } else {
        (&[4, 8, 16, 32], 25_000, 400, 256, 1000)
    };
    let mut all = Vec::new();
    for order in [Order::After, Order::Before] {
        let tag = match order {
            Order::After => "after",
            Order::Before => "before",
        };
        let text = cfg.out.join(format!("recall-{tag}.txt"));
        let train_set = recall::examples(pairs, train_n, order, 1);
        let bytes: Vec<u8> = train_set
            .iter()
            .flat_map(|e| e.tokens.iter().copied())
            .collect();
        rwkv_core::checkpoint::write_atomic(&text, |w| w.write_all(&bytes))?;
        let tests = recall::examples(pairs, test_n, order, 2);
        for arch in [Arch::V7, Arch::Gpt] {
            let c = TrainConfig {
                data: text.clone(),
                ctx,
                batch: 4,
                steps,
                ..TrainConfig::for_arch(arch)
            };
            let c = if cfg.quick { quick_shape(c) } else { c };
            let name = if arch == Arch::Gpt {
                "transformer"
            } else {
                "rwkv7"
            };
            let path = trained(cfg, c, &format!("{name}-{tag}"))?;
            let model = Model::load(&path)?;
            let tok = rwkv_core::tokenizer::load("bytes")?;
            let val = rwkv_core::eval::score_file(
                &model,
                tok.as_ref(),
                Some("bytes"),
                &text,
                Some(ctx),
                Some(0.1),
                None,
                &mut |_, _| {},
            )?;
            all.push(recall::score(&model, name, order, val.loss, &tests)?);
        }
    }
    recall::report(&all, &cfg.out)?;
    let mut t = String::from("recall: accuracy of the value after each query (chance 0.1)\n");
    t += "model        queries   overall";
    for &n in pairs {
        t += &format!("   {n:>2} pairs");
    }
    t += "\n";
    for s in &all {
        t += &format!(
            "{:<12} {:<8}  {:>7.3}",
            s.model,
            match s.order {
                Order::After => "after",
                Order::Before => "before",
            },
            s.overall
        );
        for (_, a) in &s.by_pairs {
            t += &format!("   {a:>8.3}");
        }
        t += "\n";
    }
    Ok(t)
}

fn decay_table(cfg: &ExperimentConfig) -> Result<String> {
    let models = if cfg.models.is_empty() {
        default_decay_models(cfg)?
    } else {
        let name = |p: &PathBuf| match p.as_path() == Path::new(rwkv_core::DEFAULT_MODEL) {
            true => "built-in model".to_string(),
            false => p.display().to_string(),
        };
        cfg.models.iter().map(|p| (p.clone(), name(p))).collect()
    };
    let n = if cfg.quick { 256 } else { 4096 };
    let mut all = Vec::new();
    for (path, name) in &models {
        let model = Model::load(path)?;
        let what = path.display();
        let ids = match model.info().generation {
            Generation::Gpt => {
                return Err(Error::bad(format!(
                    "{what}: the Transformer has no decay to analyse (decay reads RWKV checkpoints)"
                )))
            }
            // A constant decay needs no text.
            Generation::V4 | Generation::V5_2 => Vec::new(),
            _ => {
                let tok = rwkv_core::tokenizer::for_model(model.info())
                    .map_err(|e| Error::bad(format!("{what}: {e}")))?;
                let text = std::fs::read(&cfg.data).map_err(|e| Error::io(&cfg.data, e))?;
                // The validation split's first tokens (text the models were not trained on).
                let text = String::from_utf8_lossy(&text[text.len() * 9 / 10..]).into_owned();
                let mut ids = tok.encode(&text)?;
                ids.truncate(n);
                ids
            }
        };
        all.push(
            decay::measure(&model, name, &ids).map_err(|e| Error::bad(format!("{what}: {e}")))?,
        );
    }
    decay::report(&all, &cfg.out)?;
    let mut t = String::from("decay: median horizon (tokens) per layer, 10th-90th percentile\n");
    for hz in &all {
        t += &format!("{} (RWKV {}):\n", hz.model, hz.generation);
        for (i, m) in hz.median.iter().enumerate() {
            t += &format!(
                "  layer {i:>2}  {m:>9.2}   ({:.2} - {:.2})\n",
                hz.p10[i], hz.p90[i]
            );
        }
        t += &format!(
            "  rank correlation of depth and horizon: {:.2}\n",
            hz.depth_correlation
        );
    }
    Ok(t)
}
