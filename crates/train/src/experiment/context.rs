//! `rwkv experiment context`: does a longer training context help? RWKV-7s of one shape
//! trained on the same text with the same tokens seen, in windows of different lengths, then
//! scored on the validation text read as long segments with the state carried through each:
//! the mean loss at every position of a segment. The seed's claim: RWKV benefits from longer
//! context, so a model trained on longer windows should keep lowering its loss further into
//! a segment.

use super::plot::{lines, Series};
use super::write_json;
use rwkv_core::error::{Error, Result};
use rwkv_core::eval::nll;
use rwkv_core::model::{Logits, Model};
use serde::Serialize;
use std::path::Path;

/// One trained model's figures.
#[derive(Debug, Serialize)]
pub struct Curve {
    /// The training context.
    pub ctx: usize,
    /// Tokens it was trained on.
    pub tokens_seen: u64,
    /// Its validation loss in windows of its own context (what `rwkv train` reports).
    pub val_loss: f64,
    /// The first position of each bin of the segment (powers of two: 0, 1, 2, 4, 8, ...).
    pub bin_start: Vec<usize>,
    /// The mean loss of the positions in each bin, nats per token.
    pub loss: Vec<f64>,
}

/// What the experiment reports.
#[derive(Debug, Serialize)]
pub struct Report {
    /// Tokens per segment of the validation text.
    pub segment: usize,
    /// Segments scored.
    pub segments: usize,
    /// One curve per training context.
    pub curves: Vec<Curve>,
}

/// The bin of position `p`: 0 for position 0, `k + 1` for `2^k ≤ p < 2^(k+1)`.
fn bin(p: usize) -> usize {
    if p == 0 {
        0
    } else {
        (usize::BITS - p.leading_zeros()) as usize
    }
}

/// Scores `model` on `val` cut into segments of `segment` tokens, each from a fresh state
/// with the state carried through it: the mean loss per bin of positions.
pub fn curve(model: &Model, val: &[u32], segment: usize) -> Result<(Vec<usize>, Vec<f64>)> {
    let n = bin(segment - 1) + 1;
    let (mut sum, mut count) = (vec![0f64; n], vec![0usize; n]);
    let v = model.vocab_size();
    let segments = (val.len() - 1) / segment;
    if segments == 0 {
        return Err(Error::bad(format!(
            "the validation text has {} tokens, fewer than one segment of {segment} plus one",
            val.len()
        )));
    }
    for s in 0..segments {
        let toks = &val[s * segment..(s + 1) * segment + 1];
        let mut st = model.new_state();
        let lg = model.forward(&toks[..segment], &mut st, Logits::All)?;
        for p in 0..segment {
            let b = bin(p);
            sum[b] += nll(&lg[p * v..(p + 1) * v], toks[p + 1]);
            count[b] += 1;
        }
    }
    let starts = (0..n)
        .map(|b| if b == 0 { 0 } else { 1 << (b - 1) })
        .collect();
    let loss = sum
        .iter()
        .zip(&count)
        .map(|(s, &c)| s / c.max(1) as f64)
        .collect();
    Ok((starts, loss))
}

/// Writes `context.svg` and `context.json`.
pub fn report(r: &Report, out: &Path) -> Result<()> {
    let series: Vec<Series> = r
        .curves
        .iter()
        .map(|c| Series {
            name: format!("trained at context {}", c.ctx),
            // Each bin at the middle of its positions, on a log2 axis.
            points: c
                .bin_start
                .iter()
                .zip(&c.loss)
                .map(|(&b, &l)| (((2 * b).max(1) as f64).log2() - 0.5, l))
                .collect(),
        })
        .collect();
    lines(
        &out.join("context.svg"),
        "validation loss against position, state carried",
        "log2 position in the segment",
        "loss (nats per token)",
        &series,
    )?;
    write_json(&out.join("context.json"), r)
}
