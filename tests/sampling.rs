//! Sampling tests against the rwkv package fixtures (tests/fixtures/sampling/cases.json).

use rwkv::sample::{distribution, penalty_weight, SampleScratch, Sampler, SamplerConfig};
use serde_json::Value;

const CASES: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/sampling/cases.json"
);

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn support(probs: &[f32]) -> Vec<usize> {
    (0..probs.len()).filter(|&i| probs[i] > 0.0).collect()
}

fn cfg(temperature: f32, top_p: f32, top_k: usize, seed: u64) -> SamplerConfig {
    SamplerConfig {
        temperature,
        top_p,
        top_k,
        seed: Some(seed),
        ..SamplerConfig::default()
    }
}

/// Deterministic pseudo-random logits.
fn random_logits(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale
        })
        .collect()
}

#[test]
fn fixture_distributions() {
    let text = std::fs::read_to_string(CASES).unwrap();
    let cases: Value = serde_json::from_str(&text).unwrap();
    let cases = cases["cases"].as_array().unwrap();
    assert!(!cases.is_empty());
    let mut out = Vec::new();
    let mut scratch = SampleScratch::default();
    for (n, case) in cases.iter().enumerate() {
        let logits = floats(&case["logits"]);
        let expected = floats(&case["probs"]);
        let want_support: Vec<usize> = case["support"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect();
        let temperature = case["temperature"].as_f64().unwrap() as f32;
        let top_p = case["top_p"].as_f64().unwrap() as f32;
        let top_k = case["top_k"].as_u64().unwrap() as usize;
        distribution(&logits, temperature, top_p, top_k, &mut out, &mut scratch);
        assert_eq!(out.len(), logits.len());
        let got_support = support(&out);
        let sum: f32 = out.iter().sum();
        assert!((sum - 1.0).abs() < 1e-5, "case {n}: sum {sum}");
        if case["top_k_boundary_tie"].as_bool().unwrap() {
            // Which of the tied tokens numpy keeps is unspecified: check the size, and that
            // only tokens at least as likely as the k-th largest are kept.
            assert_eq!(got_support.len(), want_support.len(), "case {n}");
            let mut sorted = logits.clone();
            sorted.sort_by(|a, b| b.total_cmp(a));
            let kth = sorted[top_k - 1];
            assert!(got_support.iter().all(|&i| logits[i] >= kth), "case {n}");
        } else {
            assert_eq!(got_support, want_support, "case {n}");
            for (i, (&g, &e)) in out.iter().zip(&expected).enumerate() {
                assert!((g - e).abs() <= 1e-6, "case {n} id {i}: got {g}, want {e}");
            }
        }
    }
}

/// The reference algorithm written plainly (full sort), to check the banded search on large
/// vocabularies.
fn naive_support(logits: &[f32], top_p: f32, top_k: usize) -> Vec<usize> {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = logits.iter().map(|&x| (x - max).exp()).collect();
    // torch's 8-lane summation order (see sample.rs), which decides the top_p = 1 edge.
    let mut lanes = [0.0f32; 8];
    for (i, &x) in e.iter().enumerate() {
        lanes[i % 8] += x;
    }
    let sum = ((lanes[0] + lanes[4]) + (lanes[2] + lanes[6]))
        + ((lanes[1] + lanes[5]) + (lanes[3] + lanes[7]));
    let inv = 1.0 / sum;
    let probs: Vec<f32> = e.iter().map(|&x| x * inv).collect();
    let mut idx: Vec<usize> = (0..probs.len()).collect();
    idx.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
    let mut cum = 0.0f32;
    let mut cutoff = probs[idx[0]];
    for &i in &idx {
        cum += probs[i];
        if cum >= top_p {
            cutoff = probs[i];
            break;
        }
    }
    let mut keep: Vec<usize> = idx
        .iter()
        .copied()
        .filter(|&i| probs[i] >= cutoff)
        .collect();
    if top_k > 0 && top_k < keep.len() {
        keep.truncate(top_k);
    }
    keep.sort_unstable();
    keep
}

#[test]
fn large_vocab_matches_full_sort() {
    let mut out = Vec::new();
    let mut scratch = SampleScratch::default();
    for (seed, scale) in [(1u64, 2.0f32), (2, 8.0), (3, 20.0), (4, 0.5)] {
        let logits = random_logits(65536, seed, scale);
        for &(top_p, top_k) in &[
            (0.85f32, 0usize),
            (0.5, 0),
            (0.0, 0),
            (0.99, 0),
            (1.0, 0),
            (0.9, 40),
        ] {
            distribution(&logits, 1.0, top_p, top_k, &mut out, &mut scratch);
            assert_eq!(
                support(&out),
                naive_support(&logits, top_p, top_k),
                "seed {seed} top_p {top_p} top_k {top_k}"
            );
        }
    }
}

#[test]
fn greedy_at_temperature_zero() {
    let mut s = Sampler::new(cfg(0.0, 0.85, 0, 1), 6).unwrap();
    let mut logits = vec![0.1, 2.0, -1.0, 2.0, 1.9, f32::NAN];
    for _ in 0..10 {
        assert_eq!(s.sample(&mut logits.clone()), 1);
    }
    logits[4] = 3.0;
    assert_eq!(s.sample(&mut logits), 4);
    // The distribution at temperature 0 is the argmax, ties shared.
    let mut out = Vec::new();
    distribution(
        &[1.0, 5.0, 5.0, 0.0],
        0.0,
        0.85,
        0,
        &mut out,
        &mut SampleScratch::default(),
    );
    assert_eq!(out, vec![0.0, 0.5, 0.5, 0.0]);
}

#[test]
fn seeded_sampling_is_reproducible() {
    let logits = random_logits(1000, 7, 3.0);
    let draw = |seed: u64| -> Vec<u32> {
        let mut s = Sampler::new(cfg(1.0, 1.0, 0, seed), 1000).unwrap();
        (0..200).map(|_| s.sample(&mut logits.clone())).collect()
    };
    assert_eq!(draw(42), draw(42));
    let flat = vec![0.0f32; 1000];
    let draw_flat = |seed: u64| -> Vec<u32> {
        let mut s = Sampler::new(cfg(1.0, 1.0, 0, seed), 1000).unwrap();
        assert_eq!(s.seed(), seed);
        (0..50).map(|_| s.sample(&mut flat.clone())).collect()
    };
    assert_eq!(draw_flat(1), draw_flat(1));
    assert_ne!(draw_flat(1), draw_flat(2));
    // Unseeded samplers pick different seeds.
    let a = Sampler::new(SamplerConfig::default(), 10).unwrap().seed();
    let b = Sampler::new(SamplerConfig::default(), 10).unwrap().seed();
    assert_ne!(a, b);
}

#[test]
fn draws_follow_the_distribution() {
    let logits = vec![1.0f32, 0.5, 0.0, -0.5, 2.0, -3.0, 0.2, 1.5];
    for &(temperature, top_p, top_k) in &[(1.0f32, 1.0f32, 0usize), (0.7, 0.9, 0), (1.3, 1.0, 4)] {
        let mut want = Vec::new();
        distribution(
            &logits,
            temperature,
            top_p,
            top_k,
            &mut want,
            &mut SampleScratch::default(),
        );
        let mut s = Sampler::new(cfg(temperature, top_p, top_k, 123), logits.len()).unwrap();
        let n = 20_000;
        let mut counts = vec![0usize; logits.len()];
        for _ in 0..n {
            counts[s.sample(&mut logits.clone()) as usize] += 1;
        }
        for (i, (&c, &p)) in counts.iter().zip(&want).enumerate() {
            let f = c as f32 / n as f32;
            assert!((f - p).abs() < 0.02, "T {temperature} id {i}: {f} vs {p}");
            if p == 0.0 {
                assert_eq!(c, 0, "id {i} is outside the support");
            }
        }
    }
}

#[test]
fn penalties_decay_and_reset() {
    let (presence, frequency, decay) = (0.5f32, 0.25f32, 0.9f32);
    let mut s = Sampler::new(
        SamplerConfig {
            temperature: 0.0,
            presence_penalty: presence,
            frequency_penalty: frequency,
            penalty_decay: decay,
            seed: Some(0),
            ..SamplerConfig::default()
        },
        8,
    )
    .unwrap();
    s.accept(3, 1.0);
    s.accept(3, 1.0);
    s.accept(5, 0.0);
    let mut logits = vec![0.0f32; 8];
    assert_eq!(s.sample(&mut logits), 0);
    let count3 = (1.0 * decay + 1.0) * decay;
    let want3 = -(presence + count3 * frequency);
    assert!((logits[3] - want3).abs() < 1e-6, "{} vs {want3}", logits[3]);
    // A zero-weight token still pays the presence penalty.
    assert!((logits[5] + presence).abs() < 1e-6, "{}", logits[5]);
    for i in [0, 1, 2, 4, 6, 7] {
        assert_eq!(logits[i], 0.0);
    }
    // A repeated token loses against a fresh one.
    let mut logits = vec![0.0f32; 8];
    logits[3] = 0.5;
    assert_eq!(s.sample(&mut logits), 0);
    s.reset();
    let mut logits = vec![0.0f32; 8];
    logits[3] = 0.5;
    assert_eq!(s.sample(&mut logits), 3);
    assert_eq!(logits[3], 0.5);
}

#[test]
fn penalty_weights() {
    for t in [&b" "[..], b"\t", b"0", b"9", b"12", b" \t0", b""] {
        assert_eq!(penalty_weight(t), 0.0, "{t:?}");
    }
    for t in [
        &b"a"[..],
        b" a",
        b"0 ",
        b"  ",
        b"\n",
        b"\xff",
        "é".as_bytes(),
    ] {
        assert_eq!(penalty_weight(t), 1.0, "{t:?}");
    }
}

#[test]
fn banned_tokens_are_never_sampled() {
    let mut logits = vec![0.0f32; 50];
    logits[7] = 10.0;
    logits[8] = 9.0;
    let mut c = cfg(1.0, 1.0, 0, 5);
    c.banned = vec![7, 8];
    let mut s = Sampler::new(c, 50).unwrap();
    for _ in 0..2000 {
        let t = s.sample(&mut logits.clone());
        assert!(t != 7 && t != 8);
    }
    let mut c = cfg(0.0, 1.0, 0, 5);
    c.banned = vec![7];
    let mut s = Sampler::new(c, 50).unwrap();
    assert_eq!(s.sample(&mut logits.clone()), 8);
}

#[test]
fn bad_configs_are_rejected() {
    let bad = [
        (cfg(-0.1, 0.85, 0, 0), "temperature"),
        (cfg(f32::NAN, 0.85, 0, 0), "temperature"),
        (cfg(f32::INFINITY, 0.85, 0, 0), "temperature"),
        (cfg(1.0, 1.5, 0, 0), "top_p"),
        (cfg(1.0, -0.1, 0, 0), "top_p"),
        (cfg(1.0, f32::NAN, 0, 0), "top_p"),
        (
            SamplerConfig {
                banned: vec![3, 100],
                ..SamplerConfig::default()
            },
            "100",
        ),
        (
            SamplerConfig {
                frequency_penalty: f32::NAN,
                ..SamplerConfig::default()
            },
            "frequency_penalty",
        ),
    ];
    for (c, needle) in bad {
        let err = Sampler::new(c, 100).expect_err(needle);
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains(needle), "{err}");
    }
    assert!(Sampler::new(cfg(0.0, 0.0, 0, 0), 100).is_ok());
    assert!(Sampler::new(cfg(2.0, 1.0, 5, 0), 100).is_ok());
    let d = SamplerConfig::default();
    assert_eq!((d.temperature, d.top_p, d.top_k), (1.0, 0.85, 0));
    assert_eq!(d.penalty_decay, 0.996);
    assert!(d.banned.is_empty() && d.seed.is_none());
}

#[test]
fn degenerate_logits_do_not_panic() {
    let mut out = Vec::new();
    let mut scratch = SampleScratch::default();
    distribution(&[], 1.0, 0.85, 0, &mut out, &mut scratch);
    assert!(out.is_empty());
    distribution(
        &[f32::NEG_INFINITY; 4],
        1.0,
        0.85,
        0,
        &mut out,
        &mut scratch,
    );
    assert_eq!(out, vec![0.25; 4]);
    distribution(
        &[0.0, f32::INFINITY, 1.0],
        1.0,
        0.85,
        0,
        &mut out,
        &mut scratch,
    );
    assert_eq!(out, vec![0.0, 1.0, 0.0]);
    distribution(&[f32::NAN, 1.0], 1.0, 0.85, 0, &mut out, &mut scratch);
    assert_eq!(out, vec![0.0, 1.0]);
    // A tiny temperature underflows every power; the result is still a distribution.
    distribution(&[0.0, 0.1, 5.0], 0.001, 1.0, 0, &mut out, &mut scratch);
    assert!(out.iter().all(|p| p.is_finite()));
    assert_eq!(out[2], 1.0);
    let mut s = Sampler::new(cfg(1.0, 0.85, 0, 0), 3).unwrap();
    assert!(s.sample(&mut []) == 0);
    assert!(s.sample(&mut [f32::NAN; 3]) < 3);
}

#[test]
fn sampling_a_large_vocab_is_fast() {
    let logits = random_logits(65536, 11, 10.0);
    let mut s = Sampler::new(cfg(1.0, 0.85, 0, 9), 65536).unwrap();
    let mut buf = logits.clone();
    let start = std::time::Instant::now();
    for i in 0..200 {
        buf.copy_from_slice(&logits);
        let t = s.sample(&mut buf);
        s.accept(t, 1.0);
        assert!((t as usize) < 65536, "step {i}");
    }
    let per = start.elapsed().as_secs_f64() / 200.0;
    eprintln!("sample(65536): {:.1} us per token", per * 1e6);
    assert!(per < 0.05, "{per} s per token");
}
