//! `rwkv experiment decay`: each layer's and head's effective time horizon, the number of
//! tokens over which a channel's state falls to `1/e`: `−1/ln w` for the decay factor `w`.
//! RWKV-4 and RWKV-5.2 decay by a constant per channel; RWKV-6 and RWKV-7 by a factor of
//! every token, measured here over a text (the median over its tokens and the head's
//! channels). The seed's claim: lower layers look at local information, higher layers keep
//! long horizons.

use super::plot::{heatmap, lines, Series};
use super::write_json;
use rwkv_core::error::Result;
use rwkv_core::model::Model;
use serde::Serialize;
use std::path::Path;

/// The longest horizon reported (a factor of 1 keeps the state for ever).
const MAX_HORIZON: f64 = 1e7;

/// One model's horizons.
#[derive(Debug, Serialize)]
pub struct Horizons {
    /// What the model is (its file, or the built-in model).
    pub model: String,
    /// Its generation.
    pub generation: String,
    /// Tokens of text the decay was measured over (0: a constant decay).
    pub tokens: usize,
    /// Per layer: the median horizon over its channels (and tokens).
    pub median: Vec<f64>,
    /// Per layer: the 10th and 90th percentiles.
    pub p10: Vec<f64>,
    /// The 90th percentile.
    pub p90: Vec<f64>,
    /// Per layer and head: the median horizon (`[layers][heads]`).
    pub heads: Vec<Vec<f64>>,
    /// Spearman's rank correlation of the layer index with its median horizon (1: every
    /// layer looks further than the one below).
    pub depth_correlation: f64,
}

/// The `q`-quantile of `v` (sorted in place).
fn quantile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let k = ((v.len() - 1) as f64 * q).round() as usize;
    let (_, x, _) = v.select_nth_unstable_by(k, |a, b| a.total_cmp(b));
    *x
}

fn horizon(w: f32) -> f64 {
    let w = (w as f64).clamp(1e-30, 1.0);
    if w >= 1.0 {
        return MAX_HORIZON;
    }
    (-1.0 / w.ln()).min(MAX_HORIZON)
}

/// Spearman's rank correlation of `0..n` with `v`.
fn rank_correlation(v: &[f64]) -> f64 {
    let n = v.len();
    if n < 2 {
        return f64::NAN;
    }
    let mut idx: Vec<usize> = (0..n).collect();
    idx.sort_by(|&a, &b| v[a].total_cmp(&v[b]));
    let mut rank = vec![0f64; n];
    for (r, &i) in idx.iter().enumerate() {
        rank[i] = r as f64;
    }
    let d2: f64 = rank
        .iter()
        .enumerate()
        .map(|(i, r)| (i as f64 - r).powi(2))
        .sum();
    1.0 - 6.0 * d2 / (n as f64 * (n as f64 * n as f64 - 1.0))
}

/// Measures `model`'s horizons over `tokens` (used only by the data-dependent decays).
pub fn measure(model: &Model, what: &str, tokens: &[u32]) -> Result<Horizons> {
    let info = model.info();
    let factors = model.decay_factors(tokens)?;
    let c = info.n_embd;
    let (h, n) = (info.n_head.max(1), c / info.n_head.max(1));
    let mut out = Horizons {
        model: what.into(),
        generation: info.generation.name().into(),
        tokens: if factors.first().is_some_and(|f| f.len() > c) {
            tokens.len()
        } else {
            0
        },
        median: Vec::new(),
        p10: Vec::new(),
        p90: Vec::new(),
        heads: Vec::new(),
        depth_correlation: f64::NAN,
    };
    for layer in &factors {
        let mut all: Vec<f64> = layer.iter().map(|&w| horizon(w)).collect();
        let heads = (0..h)
            .map(|hh| {
                let mut v: Vec<f64> = layer
                    .chunks(c)
                    .flat_map(|row| row[hh * n..(hh + 1) * n].iter().map(|&w| horizon(w)))
                    .collect();
                quantile(&mut v, 0.5)
            })
            .collect();
        out.heads.push(heads);
        out.median.push(quantile(&mut all, 0.5));
        out.p10.push(quantile(&mut all, 0.1));
        out.p90.push(quantile(&mut all, 0.9));
    }
    out.depth_correlation = rank_correlation(&out.median);
    Ok(out)
}

/// Writes each model's heatmap (`decay-K.svg`), the per-layer curves of all of them
/// (`decay-layers.svg`) and `decay.json`.
pub fn report(all: &[Horizons], out: &Path) -> Result<()> {
    for (k, hz) in all.iter().enumerate() {
        heatmap(
            &out.join(format!("decay-{k}.svg")),
            &format!("median horizon (tokens) by layer and head: {}", hz.model),
            "layer",
            "head",
            &hz.heads,
        )?;
    }
    let series: Vec<Series> = all
        .iter()
        .map(|hz| Series {
            name: format!("{} (median)", hz.model),
            points: hz
                .median
                .iter()
                .enumerate()
                .map(|(i, &m)| (i as f64, m.max(1e-3).log10()))
                .collect(),
        })
        .collect();
    lines(
        &out.join("decay-layers.svg"),
        "median time horizon by layer",
        "layer",
        "log10 tokens",
        &series,
    )?;
    write_json(&out.join("decay.json"), &all)
}
