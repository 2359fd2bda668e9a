//! `rwkv experiment recall`: a synthetic associative-recall task (multi-query associative
//! recall, as in the Zoology / MQAR studies of linear attention): a list of key–value pairs,
//! then every key again as a query, each to be answered with its value. RWKV-7 and the
//! Transformer baseline of the same shape are trained on the same examples and budget, and
//! scored on held-out examples by how often their most likely next token after a query is the
//! value: against the number of pairs and the distance from a pair to its query.
//!
//! Two orders: the queries after the pairs, as usual, and the queries' keys also listed
//! *before* the pairs, so that a model that reads the question first can keep only what it
//! will be asked. The seed's limitations: a fixed-size state recalls precise details over
//! long contexts less well than attention, and is more sensitive to how a prompt is ordered.

use super::plot::{lines, Series};
use super::write_json;
use rwkv_core::error::Result;
use rwkv_core::init::Rng;
use rwkv_core::model::{Logits, Model};
use serde::Serialize;
use std::path::Path;

/// The keys (52 letters) and values (10 digits), as bytes.
const KEYS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
const VALUES: &[u8] = b"0123456789";
/// Between the pairs and the queries, after the leading queries, and at the end.
const QUERIES: u8 = b'|';
const PAIRS: u8 = b'?';
const END: u8 = b'\n';

/// Where the queries come.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Order {
    /// `k v k v … | k v k v …`.
    After,
    /// `k k … ? k v k v … | k v k v …`: the queried keys first.
    Before,
}

/// One example and its answers: `(position of the value token, the value, its distance from
/// the pair)`.
pub struct Example {
    /// Its bytes.
    pub tokens: Vec<u8>,
    /// The answers to score.
    pub answers: Vec<(usize, u8, usize)>,
    /// Its number of pairs.
    pub pairs: usize,
}

/// An example of `n` pairs (distinct keys) in `order`.
pub fn example(n: usize, order: Order, rng: &mut Rng) -> Example {
    let pick = |rng: &mut Rng, m: usize| (rng.next_u64() % m as u64) as usize;
    let mut keys: Vec<u8> = KEYS.to_vec();
    for i in 0..n {
        let j = i + pick(rng, keys.len() - i);
        keys.swap(i, j);
    }
    let keys = &keys[..n];
    let values: Vec<u8> = (0..n).map(|_| VALUES[pick(rng, VALUES.len())]).collect();
    let mut ask: Vec<usize> = (0..n).collect();
    for i in 0..n {
        let j = i + pick(rng, n - i);
        ask.swap(i, j);
    }
    let mut tokens = Vec::with_capacity(5 * n + 3);
    if order == Order::Before {
        tokens.extend(ask.iter().map(|&i| keys[i]));
        tokens.push(PAIRS);
    }
    let mut at = vec![0; n];
    for i in 0..n {
        tokens.push(keys[i]);
        at[i] = tokens.len();
        tokens.push(values[i]);
    }
    tokens.push(QUERIES);
    let mut answers = Vec::with_capacity(n);
    for &i in &ask {
        tokens.push(keys[i]);
        answers.push((tokens.len(), values[i], tokens.len() - at[i]));
        tokens.push(values[i]);
    }
    tokens.push(END);
    Example {
        tokens,
        answers,
        pairs: n,
    }
}

/// `count` examples, their numbers of pairs cycling through `pairs`.
pub fn examples(pairs: &[usize], count: usize, order: Order, seed: u64) -> Vec<Example> {
    let mut rng = Rng::new(seed);
    (0..count)
        .map(|i| example(pairs[i % pairs.len()], order, &mut rng))
        .collect()
}

/// One model's accuracies on one order.
#[derive(Debug, Serialize)]
pub struct Scores {
    /// `rwkv7` or `transformer`.
    pub model: String,
    /// The order of the queries.
    pub order: Order,
    /// Its final training loss on the task's text (nats per token).
    pub val_loss: f64,
    /// Accuracy by number of pairs: `(pairs, accuracy)`.
    pub by_pairs: Vec<(usize, f64)>,
    /// Accuracy by distance from the pair to its query, in bins of powers of two: `(first
    /// distance of the bin, accuracy, answers in it)`.
    pub by_distance: Vec<(usize, f64, usize)>,
    /// Accuracy over every answer.
    pub overall: f64,
}

/// Scores `model` on `tests`, each from a fresh state.
pub fn score(
    model: &Model,
    name: &str,
    order: Order,
    val_loss: f64,
    tests: &[Example],
) -> Result<Scores> {
    let v = model.vocab_size();
    let mut pairs: Vec<(usize, usize, usize)> = Vec::new();
    let mut dist: Vec<(usize, usize)> = Vec::new();
    let (mut right, mut all) = (0usize, 0usize);
    for ex in tests {
        let toks: Vec<u32> = ex.tokens.iter().map(|&b| b as u32).collect();
        let mut st = model.new_state();
        let lg = model.forward(&toks, &mut st, Logits::All)?;
        for &(pos, value, d) in &ex.answers {
            let row = &lg[(pos - 1) * v..pos * v];
            let best = (0..v)
                .max_by(|&a, &b| row[a].total_cmp(&row[b]))
                .unwrap_or(0);
            let ok = best == value as usize;
            let b = (usize::BITS - d.leading_zeros()) as usize;
            if dist.len() <= b {
                dist.resize(b + 1, (0, 0));
            }
            dist[b].0 += ok as usize;
            dist[b].1 += 1;
            match pairs.iter_mut().find(|p| p.0 == ex.pairs) {
                Some(p) => {
                    p.1 += ok as usize;
                    p.2 += 1;
                }
                None => pairs.push((ex.pairs, ok as usize, 1)),
            }
            right += ok as usize;
            all += 1;
        }
    }
    pairs.sort();
    Ok(Scores {
        model: name.into(),
        order,
        val_loss,
        by_pairs: pairs
            .iter()
            .map(|&(n, r, a)| (n, r as f64 / a as f64))
            .collect(),
        by_distance: dist
            .iter()
            .enumerate()
            .filter(|(_, c)| c.1 > 0)
            .map(|(b, &(r, a))| (1 << (b - 1), r as f64 / a as f64, a))
            .collect(),
        overall: right as f64 / all.max(1) as f64,
    })
}

/// Writes `recall-pairs.svg`, `recall-distance.svg` and `recall.json`.
pub fn report(all: &[Scores], out: &Path) -> Result<()> {
    let name = |s: &Scores| {
        let m = if s.model == "rwkv7" {
            "RWKV-7"
        } else {
            "Transformer"
        };
        let o = match s.order {
            Order::After => "queries after",
            Order::Before => "queries also before",
        };
        format!("{m}, {o}")
    };
    let by_pairs: Vec<Series> = all
        .iter()
        .map(|s| Series {
            name: name(s),
            points: s.by_pairs.iter().map(|&(n, a)| (n as f64, a)).collect(),
        })
        .collect();
    lines(
        &out.join("recall-pairs.svg"),
        "associative recall: accuracy against the number of pairs",
        "pairs",
        "accuracy",
        &by_pairs,
    )?;
    let by_dist: Vec<Series> = all
        .iter()
        .map(|s| Series {
            name: name(s),
            points: s
                .by_distance
                .iter()
                .map(|&(d, a, _)| ((d as f64).log2(), a))
                .collect(),
        })
        .collect();
    lines(
        &out.join("recall-distance.svg"),
        "associative recall: accuracy against the distance from pair to query",
        "log2 distance (tokens)",
        "accuracy",
        &by_dist,
    )?;
    write_json(&out.join("recall.json"), &all)
}
