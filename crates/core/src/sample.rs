//! Token sampling with the semantics of the rwkv package (`PIPELINE.sample_logits` and the
//! penalties of `PIPELINE.generate`): softmax, top-p cutoff (ties with the cutoff kept), top-k,
//! temperature applied to the filtered probabilities, presence/frequency penalties with decay,
//! and banned tokens.

use crate::error::{Error, Result};

/// Sampling parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplerConfig {
    /// Temperature; 0 means greedy (argmax).
    pub temperature: f32,
    /// Nucleus mass in [0, 1]; 0 keeps only the most likely token(s).
    pub top_p: f32,
    /// Keep at most this many tokens; 0 disables.
    pub top_k: usize,
    /// Subtracted from the logit of every token generated so far (`alpha_presence`).
    pub presence_penalty: f32,
    /// Subtracted per (decayed) occurrence of a generated token (`alpha_frequency`).
    pub frequency_penalty: f32,
    /// Factor applied to all occurrence counts after each generated token (`alpha_decay`).
    pub penalty_decay: f32,
    /// Token ids that are never sampled.
    pub banned: Vec<u32>,
    /// Seed of the random generator; `None` seeds from the clock and process entropy.
    pub seed: Option<u64>,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 0.85,
            top_k: 0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            penalty_decay: 0.996,
            banned: Vec::new(),
            seed: None,
        }
    }
}

/// Reusable buffers for [`distribution`], so repeated calls allocate nothing.
#[derive(Debug, Default, Clone)]
pub struct SampleScratch {
    /// Sort keys ([`sort_key`]) of all ids, grouped by probability bucket, most likely bucket
    /// first; the buckets the top-p walk reached are sorted, so the support is a prefix.
    keys: Vec<u64>,
    /// Per-bucket counts, then the end offset of each bucket in `keys`.
    buckets: Vec<u32>,
    /// Probabilities of the support while `out` is being rewritten.
    vals: Vec<f32>,
}

impl SampleScratch {
    /// Buffers sized for a vocabulary of `vocab` tokens up front, so that not even the first
    /// calls with a growing support allocate.
    pub fn with_capacity(vocab: usize) -> Self {
        SampleScratch {
            keys: Vec::with_capacity(vocab),
            buckets: Vec::new(),
            vals: Vec::with_capacity(vocab),
        }
    }
}

/// Buckets group probabilities by their top bits (exponent and 4 mantissa bits, a relative
/// width of 1/16): for non-negative floats the bit pattern orders like the value.
const BUCKET_SHIFT: u32 = 19;
/// Probabilities are at most 1.0, so no bucket lies above that of 1.0.
const N_BUCKETS: usize = (0x3F80_0000 >> BUCKET_SHIFT) + 1;

fn bucket(p: f32) -> usize {
    ((p.to_bits() >> BUCKET_SHIFT) as usize).min(N_BUCKETS - 1)
}

/// Orders by probability, then by id ascending, when sorted in descending order.
fn sort_key(p: f32, id: usize) -> u64 {
    (u64::from(p.to_bits()) << 32) | u64::from(u32::MAX - id as u32)
}

fn key_prob(k: u64) -> f32 {
    f32::from_bits((k >> 32) as u32)
}

fn key_id(k: u64) -> u32 {
    u32::MAX - k as u32
}

/// Errors unless `temperature` and `top_p` are settings [`distribution`] can use.
pub fn check_filter(temperature: f32, top_p: f32) -> Result<()> {
    if !(temperature.is_finite() && temperature >= 0.0) {
        return Err(Error::bad(format!(
            "temperature must be a finite number >= 0, got {temperature}"
        )));
    }
    if !(0.0..=1.0).contains(&top_p) {
        return Err(Error::bad(format!(
            "top_p must be between 0 and 1, got {top_p}"
        )));
    }
    Ok(())
}

/// The reference's filtered, renormalised distribution (the fixtures' `probs`), written into
/// `out` (resized to `logits.len()`); `scratch` holds reusable index buffers so repeated calls
/// allocate nothing.
pub fn distribution(
    logits: &[f32],
    temperature: f32,
    top_p: f32,
    top_k: usize,
    out: &mut Vec<f32>,
    scratch: &mut SampleScratch,
) {
    filter(logits, temperature, top_p, top_k, out, scratch);
}

/// Computes [`distribution`] and returns the support size; the support's sort keys are
/// `scratch.keys[..n]`, most likely first.
fn filter(
    logits: &[f32],
    temperature: f32,
    top_p: f32,
    top_k: usize,
    out: &mut Vec<f32>,
    scratch: &mut SampleScratch,
) -> usize {
    let (temperature, top_p) = if temperature == 0.0 {
        (1.0, 0.0)
    } else {
        (temperature, top_p)
    };
    out.clear();
    out.resize(logits.len(), 0.0);
    if logits.is_empty() {
        return 0;
    }
    softmax_into(logits, out);

    let mut n = top_p_support(out, top_p, scratch);
    if top_k > 0 && top_k < out.len() && top_k < n {
        n = top_k;
    }
    let support = &scratch.keys[..n];

    scratch.vals.clear();
    scratch.vals.extend(support.iter().map(|&k| key_prob(k)));
    if temperature != 1.0 {
        // numpy raises the float32 array to a float32 power computed from the Python float.
        let e = (1.0f64 / f64::from(temperature)) as f32;
        for v in &mut scratch.vals {
            *v = v.powf(e);
        }
    }
    let mut sum = scratch.vals.iter().map(|&v| f64::from(v)).sum::<f64>() as f32;
    if !(sum > 0.0 && sum.is_finite()) {
        // A tiny temperature underflowed (or a huge one overflowed) every power, where the
        // reference would produce NaN; powers relative to the largest are the same
        // distribution and stay representable.
        let e = (1.0f64 / f64::from(temperature)) as f32;
        let top = key_prob(support[0]);
        for (v, &k) in scratch.vals.iter_mut().zip(support) {
            *v = (key_prob(k) / top).powf(e);
        }
        sum = scratch.vals.iter().map(|&v| f64::from(v)).sum::<f64>() as f32;
    }
    out.fill(0.0);
    for (&k, &v) in support.iter().zip(&scratch.vals) {
        out[key_id(k) as usize] = v / sum;
    }
    n
}

/// Float32 softmax as torch computes it on the CPU: `exp(x - max)`, summed in 8 vector lanes
/// (AVX2 `reduce_all`, sequentially below 8 elements), then scaled by the reciprocal of the sum.
/// The summation order matters: with `top_p = 1` the reference keeps everything only if the
/// cumulative sum reaches exactly 1, which depends on the last bits of the probabilities.
/// NaN logits count as `-inf`; if no logit is finite the result is uniform over the largest.
fn softmax_into(logits: &[f32], out: &mut [f32]) {
    let max = max_ignoring_nan(logits);
    if max.is_infinite() {
        // All -inf (everything banned) or some +inf: share the mass among the largest.
        let mut count = 0usize;
        for (o, &x) in out.iter_mut().zip(logits) {
            let top = x == max;
            *o = if top { 1.0 } else { 0.0 };
            count += usize::from(top);
        }
        if count == 0 {
            // Every logit is NaN: nothing to prefer.
            out.fill(1.0);
            count = out.len();
        }
        let inv = 1.0 / count as f32;
        out.iter_mut().for_each(|o| *o *= inv);
        return;
    }
    for (o, &x) in out.iter_mut().zip(logits) {
        // `!(x > -inf)` also catches NaN.
        *o = if x > f32::NEG_INFINITY {
            (x - max).exp()
        } else {
            0.0
        };
    }
    let inv = 1.0 / torch_sum(out);
    out.iter_mut().for_each(|o| *o *= inv);
}

/// The largest value, NaN ignored (`-inf` if none); eight independent lanes so that the loop
/// vectorizes.
fn max_ignoring_nan(v: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let mut chunks = v.chunks_exact(8);
    for c in &mut chunks {
        for (m, &x) in lanes.iter_mut().zip(c) {
            *m = if x > *m { x } else { *m };
        }
    }
    chunks
        .remainder()
        .iter()
        .chain(&lanes)
        .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m })
}

/// Sum in torch's `vec::reduce_all` order for 8-lane float vectors: lane `i` accumulates the
/// elements `i, i + 8, …`, then the lanes are combined as `(l0+l4 + l2+l6) + (l1+l5 + l3+l7)`.
fn torch_sum(v: &[f32]) -> f32 {
    if v.len() < 8 {
        return v.iter().fold(0.0, |s, &x| s + x);
    }
    let mut acc = [0.0f32; 8];
    let mut chunks = v.chunks_exact(8);
    for c in &mut chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += x;
        }
    }
    for (a, &x) in acc.iter_mut().zip(chunks.remainder()) {
        *a += x;
    }
    let a: [f32; 4] = std::array::from_fn(|i| acc[i] + acc[i + 4]);
    let b = [a[0] + a[2], a[1] + a[3]];
    b[0] + b[1]
}

/// The top-p support of `probs` (not empty): leaves the support's sort keys, most likely first
/// (ties by ascending id), at the front of `scratch.keys` and returns its size.
///
/// The reference sorts all probabilities, but only the head of that order matters: the ids are
/// distributed into buckets by probability (a counting sort), and buckets are sorted one at a
/// time, most likely first, only until the cumulative sum (the same sequential f32 sum over the
/// same descending order) reaches `top_p`. Buckets that the sum provably never reaches are not
/// even distributed.
fn top_p_support(probs: &[f32], top_p: f32, scratch: &mut SampleScratch) -> usize {
    let SampleScratch { keys, buckets, .. } = scratch;
    let nb = N_BUCKETS;
    histogram(probs, buckets);

    // The lowest bucket the walk can reach: below it, the mass already guaranteed above (each
    // bucket counted at its lower bound, less the worst-case rounding of a sequential f32 sum
    // of that many terms) is at least `top_p`.
    let mut floor = 0;
    let mut mass = 0.0f64;
    let mut count = 0.0f64;
    for b in (0..nb).rev() {
        let c = f64::from(buckets[b]);
        if c == 0.0 {
            continue;
        }
        count += c;
        mass += c * f64::from(f32::from_bits((b as u32) << BUCKET_SHIFT));
        if mass * (1.0 - count * f64::from(f32::EPSILON)) >= f64::from(top_p) {
            floor = b;
            break;
        }
    }

    loop {
        let n = distribute(probs, floor, buckets, keys);
        let mut cum = 0.0f32;
        let mut hit = None;
        let mut start = 0usize;
        for b in (floor..nb).rev() {
            let end = buckets[b] as usize;
            if end == start {
                continue;
            }
            let run = &mut keys[start..end];
            run.sort_unstable_by(|x, y| y.cmp(x));
            for (j, &k) in run.iter().enumerate() {
                cum += key_prob(k);
                if cum >= top_p {
                    hit = Some(start + j);
                    break;
                }
            }
            if hit.is_some() {
                break;
            }
            start = end;
        }
        if hit.is_none() && floor > 0 {
            // Cannot happen given the bound above; stay exact regardless.
            floor = 0;
            histogram(probs, buckets);
            continue;
        }
        // numpy's argmax over an all-false mask is 0: the cutoff is then the largest
        // probability.
        let first = hit.unwrap_or(0);
        let cutoff = key_prob(keys[first]);
        // Everything tied with the cutoff is kept; ties share a bucket, so they follow in order.
        let mut end = first + 1;
        while end < n && key_prob(keys[end]) >= cutoff {
            end += 1;
        }
        return end;
    }
}

/// Counts the probabilities per bucket into `buckets` (resized to [`N_BUCKETS`]).
fn histogram(probs: &[f32], buckets: &mut Vec<u32>) {
    let nb = N_BUCKETS;
    // Four interleaved histograms: when many probabilities share a bucket, a single counter
    // would chain every increment through a store-to-load dependency.
    buckets.clear();
    buckets.resize(4 * nb, 0);
    let mut quads = probs.chunks_exact(4);
    for q in &mut quads {
        for (j, &p) in q.iter().enumerate() {
            buckets[j * nb + bucket(p)] += 1;
        }
    }
    for &p in quads.remainder() {
        buckets[bucket(p)] += 1;
    }
    for b in 0..nb {
        buckets[b] += buckets[nb + b] + buckets[2 * nb + b] + buckets[3 * nb + b];
    }
    buckets.truncate(nb);
}

/// Counting-sort scatter of the ids whose bucket is at least `floor` into `keys`, the most
/// likely bucket first. `buckets` holds the counts on entry and each bucket's end offset on
/// return. Returns the number of keys written.
fn distribute(probs: &[f32], floor: usize, buckets: &mut [u32], keys: &mut Vec<u64>) -> usize {
    let mut total = 0u32;
    for b in buckets[floor..].iter_mut().rev() {
        let count = *b;
        *b = total;
        total += count;
    }
    let n = total as usize;
    keys.clear();
    keys.resize(n, 0);
    for (i, &p) in probs.iter().enumerate() {
        let b = bucket(p);
        if b >= floor {
            let slot = &mut buckets[b];
            keys[*slot as usize] = sort_key(p, i);
            *slot += 1;
        }
    }
    n
}

/// The reference's occurrence weight of a token from its bytes: 0 if its decoded text
/// (decode_text_strict) is a substring of " \t0123456789", else 1.
pub fn penalty_weight(token_bytes: &[u8]) -> f32 {
    // The haystack is ASCII, so a byte-level match implies the token decodes to that text, and
    // bytes that are not valid UTF-8 (decoded as U+FFFD) can never match.
    const SPACE_DIGITS: &[u8] = b" \t0123456789";
    let found = token_bytes.is_empty()
        || SPACE_DIGITS
            .windows(token_bytes.len())
            .any(|w| w == token_bytes);
    if found {
        0.0
    } else {
        1.0
    }
}

/// Draws tokens from logits with penalties and bans; owns its buffers and random generator.
#[derive(Debug, Clone)]
pub struct Sampler {
    cfg: SamplerConfig,
    seed: u64,
    rng: Xoshiro256,
    /// Decayed occurrence count per token id.
    counts: Vec<f32>,
    /// Whether a token has occurred (it is penalised even when its count is 0).
    seen: Vec<bool>,
    /// The ids with `seen` set, so decay and penalties cost O(touched), not O(vocab).
    touched: Vec<u32>,
    probs: Vec<f32>,
    scratch: SampleScratch,
}

impl Sampler {
    /// Validates the configuration for a model with `vocab` tokens and builds the sampler.
    pub fn new(cfg: SamplerConfig, vocab: usize) -> Result<Self> {
        check_filter(cfg.temperature, cfg.top_p)?;
        for (field, v) in [
            ("presence_penalty", cfg.presence_penalty),
            ("frequency_penalty", cfg.frequency_penalty),
            ("penalty_decay", cfg.penalty_decay),
        ] {
            if !v.is_finite() {
                return Err(Error::bad(format!("{field} must be finite, got {v}")));
            }
        }
        if let Some(&id) = cfg.banned.iter().find(|&&id| id as usize >= vocab) {
            return Err(Error::bad(format!(
                "banned token id {id} is out of range for vocab size {vocab}"
            )));
        }
        let seed = cfg.seed.unwrap_or_else(entropy_seed);
        Ok(Self {
            seed,
            rng: Xoshiro256::new(seed),
            counts: vec![0.0; vocab],
            seen: vec![false; vocab],
            touched: Vec::with_capacity(vocab),
            probs: Vec::with_capacity(vocab),
            scratch: SampleScratch::with_capacity(vocab),
            cfg,
        })
    }

    /// The configuration this sampler was built with.
    pub fn config(&self) -> &SamplerConfig {
        &self.cfg
    }

    /// The seed in use (the configured one, or the one drawn from entropy), for reproducing a
    /// run.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Applies bans and penalties to `logits` in place, then draws a token. Allocation-free
    /// after the first call.
    pub fn sample(&mut self, logits: &mut [f32]) -> u32 {
        for &id in &self.cfg.banned {
            if let Some(l) = logits.get_mut(id as usize) {
                *l = f32::NEG_INFINITY;
            }
        }
        for &id in &self.touched {
            if let Some(l) = logits.get_mut(id as usize) {
                *l -= self.cfg.presence_penalty
                    + self.counts[id as usize] * self.cfg.frequency_penalty;
            }
        }
        if self.cfg.temperature == 0.0 {
            return argmax(logits);
        }
        let n = filter(
            logits,
            self.cfg.temperature,
            self.cfg.top_p,
            self.cfg.top_k,
            &mut self.probs,
            &mut self.scratch,
        );
        let support = &self.scratch.keys[..n];
        let prob = |k: u64| f64::from(self.probs[key_id(k) as usize]);
        let total: f64 = support.iter().map(|&k| prob(k)).sum();
        let mut target = self.rng.next_f64() * total;
        for &k in support {
            target -= prob(k);
            if target < 0.0 {
                return key_id(k);
            }
        }
        // Rounding left a sliver at the end: it belongs to the least likely survivor.
        support.last().map_or(0, |&k| key_id(k))
    }

    /// Records a generated token for the penalties (decay all counts, then add `weight`).
    pub fn accept(&mut self, token: u32, weight: f32) {
        for &id in &self.touched {
            self.counts[id as usize] *= self.cfg.penalty_decay;
        }
        let i = token as usize;
        if i >= self.counts.len() {
            // Only for ids beyond the vocab given to `new`; grows once.
            self.counts.resize(i + 1, 0.0);
            self.seen.resize(i + 1, false);
        }
        if self.seen[i] {
            self.counts[i] += weight;
        } else {
            self.seen[i] = true;
            self.counts[i] = weight;
            self.touched.push(token);
        }
    }

    /// Clears the penalty counts (new conversation).
    pub fn reset(&mut self) {
        for &id in &self.touched {
            self.counts[id as usize] = 0.0;
            self.seen[id as usize] = false;
        }
        self.touched.clear();
    }
}

/// Index of the largest logit, lowest index on ties; NaN never wins.
/// Index of the largest logit (the first on ties): greedy decoding.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &v) in logits.iter().enumerate() {
        if v > best_v {
            best = i;
            best_v = v;
        }
    }
    best as u32
}

/// A seed from the clock and the per-process random keys of the standard library's hasher.
fn entropy_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    h.write_u128(now);
    h.write_u32(std::process::id());
    h.finish()
}

/// xoshiro256** seeded through splitmix64: small, fast, and reproducible across platforms.
#[derive(Debug, Clone)]
struct Xoshiro256 {
    s: [u64; 4],
}

impl Xoshiro256 {
    fn new(seed: u64) -> Self {
        let mut x = seed;
        let mut next = || {
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        Self {
            s: [next(), next(), next(), next()],
        }
    }

    fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1) with 53 random bits.
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xoshiro_reference_values() {
        // splitmix64(0) outputs, the usual seeding check.
        let mut x = 0u64;
        let mut sm = || {
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        assert_eq!(sm(), 0xe220_a839_7b1d_cdaf);
        let mut r = Xoshiro256::new(1);
        let a = r.next_u64();
        let b = r.next_u64();
        assert_ne!(a, b);
        assert!((0.0..1.0).contains(&r.next_f64()));
    }

    #[test]
    fn bucket_search_equals_full_sort() {
        // A long-tailed distribution where top_p needs many buckets.
        let logits: Vec<f32> = (0..5000).map(|i| -((i % 977) as f32) * 0.01).collect();
        let mut out = Vec::new();
        let mut scratch = SampleScratch::default();
        for &top_p in &[0.0f32, 0.3, 0.85, 0.99, 1.0] {
            filter(&logits, 1.0, top_p, 0, &mut out, &mut scratch);
            let mut probs = vec![0.0; logits.len()];
            softmax_into(&logits, &mut probs);
            let mut idx: Vec<usize> = (0..probs.len()).collect();
            idx.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
            let mut cum = 0.0f32;
            let mut cutoff = probs[idx[0]];
            for &i in &idx {
                cum += probs[i];
                if cum >= top_p {
                    cutoff = probs[i];
                    break;
                }
            }
            for (i, &p) in probs.iter().enumerate() {
                assert_eq!(out[i] > 0.0, p >= cutoff, "top_p {top_p} id {i}");
            }
        }
    }
}
