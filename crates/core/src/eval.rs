//! `rwkv eval`: how well a model predicts a text, in parallel mode.

use crate::error::{Error, Result};
use crate::model::{BatchItem, Logits, Model, Scratch, State};
use crate::tokenizer::Tokenizer;
use serde::Serialize;
use std::path::Path;

/// Scores of a model on a text.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Score {
    /// Mean loss, nats per predicted token.
    pub loss: f64,
    /// `e^loss`.
    pub perplexity: f64,
    /// Total loss in bits over the bytes of the predicted tokens.
    pub bits_per_byte: f64,
    /// Number of predicted tokens.
    pub tokens: usize,
}

/// `-log softmax(logits)[target]` in f64.
pub fn nll(logits: &[f32], target: u32) -> f64 {
    let mx = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let s: f64 = logits.iter().map(|&z| (z as f64 - mx).exp()).sum();
    s.ln() + mx - logits[target as usize] as f64
}

/// Windows `(start, len)` over `n` tokens: each predicts tokens `start+1 ..= start+len` from
/// `start .. start+len`, so that every token but the first is predicted exactly once.
pub(crate) fn windows(n: usize, ctx: usize) -> Vec<(usize, usize)> {
    let mut w = Vec::new();
    let mut s = 0;
    while s + 1 < n {
        let len = (n - 1 - s).min(ctx);
        w.push((s, len));
        s += len;
    }
    w
}

/// Scores the text file `path` (tokenized by `tok`; `tokenizer_spec` names it for the token
/// cache, as `rwkv train --tokenizer` does), or only its last `val_fraction` (the split
/// `rwkv train` validates on). See [`score`] for `ctx`, `start` and `progress`.
#[allow(clippy::too_many_arguments)]
pub fn score_file(
    model: &Model,
    tok: &dyn Tokenizer,
    tokenizer_spec: Option<&str>,
    path: &Path,
    ctx: Option<usize>,
    val_fraction: Option<f64>,
    start: Option<&State>,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Score> {
    let spec = match tokenizer_spec {
        Some(s) => s,
        None if tok.name() == "bytes" => "bytes",
        None => "world",
    };
    let toks = crate::data::load(path, spec, &std::env::temp_dir())?;
    let mut ids = Vec::with_capacity(toks.len());
    toks.copy(0, toks.len(), &mut ids);
    let from = match val_fraction {
        Some(f) if f > 0.0 && f <= 1.0 => crate::data::val_start(ids.len(), f),
        Some(f) => return Err(Error::bad(format!("val-fraction {f} is not in (0, 1]"))),
        None => 0,
    };
    let ids = &ids[from..];
    let bytes = tok.decode_bytes(ids.get(1..).unwrap_or(&[]))?.len();
    score(model, ids, bytes, ctx, start, progress)
}

/// Scores `tokens` (whose text is `text_bytes` long). With `ctx`, the text is cut into windows
/// of `ctx` tokens, each scored from a fresh state (how a model of context `ctx` is measured);
/// without it, one pass carries the state through the whole text (how an RNN is used).
/// Every window (or the one pass) starts from `start` (a tuned initial state, say), else from
/// the zero state. `progress` is called with the number of tokens done so far.
pub fn score(
    model: &Model,
    tokens: &[u32],
    text_bytes: usize,
    ctx: Option<usize>,
    start: Option<&State>,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Score> {
    if let Some(s) = start {
        s.check_compatible(model.info())?;
    }
    let fresh = || start.cloned().unwrap_or_else(|| model.new_state());
    if tokens.len() < 2 {
        return Err(Error::bad(
            "the text has fewer than two tokens: nothing to score",
        ));
    }
    let v = model.vocab_size();
    if let Some(&t) = tokens.iter().find(|&&t| t as usize >= v) {
        return Err(Error::bad(format!(
            "token id {t} is outside the model's vocabulary of {v}"
        )));
    }
    let mut total = 0.0f64;
    let mut count = 0usize;
    match ctx {
        Some(0) => return Err(Error::bad("ctx must be at least 1")),
        Some(ctx) => {
            let ws = windows(tokens.len(), ctx);
            let mut scratch = Scratch::default();
            // Several windows per call: one batched pass shares the weight reads. Up to 16,
            // and no more than 64 M logits at once (256 MB: four windows of 256 tokens of a
            // 65,536-token vocabulary).
            let group_len = (64 << 20) / (ctx * v).max(1);
            for group in ws.chunks(group_len.clamp(1, 16)) {
                let mut states: Vec<_> = group.iter().map(|_| fresh()).collect();
                let mut items: Vec<BatchItem> = group
                    .iter()
                    .zip(states.iter_mut())
                    .map(|(&(s, len), st)| BatchItem {
                        tokens: &tokens[s..s + len],
                        state: st,
                        logits: Logits::All,
                    })
                    .collect();
                let outs = model.forward_batch(&mut items, &mut scratch);
                for (&(s, len), out) in group.iter().zip(outs) {
                    let out = out?;
                    for i in 0..len {
                        total += nll(&out[i * v..(i + 1) * v], tokens[s + i + 1]);
                    }
                    count += len;
                }
                progress(count, tokens.len() - 1);
            }
        }
        None => {
            let mut st = fresh();
            const CHUNK: usize = 256;
            let n = tokens.len() - 1;
            let mut s = 0;
            while s < n {
                let len = (n - s).min(CHUNK);
                let out = model.forward(&tokens[s..s + len], &mut st, Logits::All)?;
                for i in 0..len {
                    total += nll(&out[i * v..(i + 1) * v], tokens[s + i + 1]);
                }
                count += len;
                s += len;
                progress(count, n);
            }
        }
    }
    let loss = total / count as f64;
    // The first token is context, not predicted: its bytes are left out of the byte count.
    let bytes = text_bytes.max(1) as f64;
    Ok(Score {
        loss,
        perplexity: loss.exp(),
        bits_per_byte: total / std::f64::consts::LN_2 / bytes,
        tokens: count,
    })
}

#[cfg(test)]
mod tests {
    use super::windows;

    #[test]
    fn windows_predict_every_token_once() {
        let w = windows(10, 4);
        assert_eq!(w, vec![(0, 4), (4, 4), (8, 1)]);
        assert_eq!(w.iter().map(|x| x.1).sum::<usize>(), 9);
        assert!(windows(1, 4).is_empty());
    }
}
