//! `rwkv experiment` end to end in its quick form: every file it promises, figures that say
//! what the seed claims can be read from them, and one-line errors on bad input.

mod common;
use common::tmpdir;
use std::path::Path;

use common::{rwkv_bad as bad, rwkv_ok as ok};

/// The arguments of `rwkv experiment NAME --quick --out DIR` and `extra`.
fn quick<'a>(name: &'a str, dir: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec![
        "experiment",
        name,
        "--quick",
        "--out",
        dir.to_str().unwrap(),
    ];
    a.extend_from_slice(extra);
    a
}

const DATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/data/tinyshakespeare.txt");

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn is_svg(path: &Path) {
    let s = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(s.starts_with("<svg"), "{}", path.display());
}

#[test]
fn gen_time_measures_both_models_and_their_memory() {
    let d = tmpdir("exp-gen-time");
    let out = ok(&quick("gen-time", &d, &["--tokens", "512"]));
    assert!(
        out.contains("rwkv7") && out.contains("transformer"),
        "{out}"
    );
    let r = json(&d.join("gen-time.json"));
    let runs = r["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2);
    let (rwkv, gpt) = (&runs[0], &runs[1]);
    assert_eq!(rwkv["positions"].as_array().unwrap().last().unwrap(), 512);
    // RWKV's state does not grow; the Transformer's cache grows with every token.
    let mb = |r: &serde_json::Value| -> Vec<f64> {
        r["state_mb"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect()
    };
    let (a, b) = (mb(rwkv), mb(gpt));
    assert!(a.iter().all(|&x| x == a[0]), "{a:?}");
    assert!(b.windows(2).all(|w| w[1] > w[0]), "{b:?}");
    // The blocks have the same matrices, 12·C² each (RWKV-7 adds its LoRAs and vectors:
    // 31% more at this tiny width, 12% at the default one).
    let bp = |r: &serde_json::Value| r["block_params"].as_f64().unwrap();
    let matrices = (2 * 12 * 64 * 64) as f64;
    assert!(bp(gpt) >= matrices && bp(rwkv) >= matrices);
    assert!(bp(rwkv) / bp(gpt) < 1.35, "{} vs {}", bp(rwkv), bp(gpt));
    for f in [
        "gen-time.svg",
        "gen-time-per-token.svg",
        "gen-time-memory.svg",
    ] {
        is_svg(&d.join(f));
    }
}

#[test]
fn decay_gives_every_layer_and_head_a_horizon() {
    let d = tmpdir("exp-decay");
    let model = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/assets/shakespeare-v7.safetensors"
    );
    let out = ok(&quick("decay", &d, &["--model", model, "--data", DATA]));
    assert!(out.contains("layer  3"), "{out}");
    let r = json(&d.join("decay.json"));
    let m = &r[0];
    assert_eq!(m["generation"], "v7");
    assert_eq!(m["tokens"], 256);
    let heads = m["heads"].as_array().unwrap();
    assert_eq!(heads.len(), 4);
    assert_eq!(heads[0].as_array().unwrap().len(), 4);
    for h in heads.iter().flat_map(|l| l.as_array().unwrap()) {
        let h = h.as_f64().unwrap();
        assert!(h.is_finite() && h > 0.0, "{h}");
    }
    is_svg(&d.join("decay-0.svg"));
    is_svg(&d.join("decay-layers.svg"));
    // A static-decay generation needs no text: RWKV-4's fixture.
    let v4 = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/v4/model.pth");
    ok(&quick("decay", &d, &["--model", v4]));
    assert_eq!(json(&d.join("decay.json"))[0]["tokens"], 0);
}

#[test]
fn context_trains_at_three_contexts_and_scores_every_position() {
    let d = tmpdir("exp-context");
    let out = ok(&quick("context", &d, &["--data", DATA]));
    assert!(out.contains("trained at"), "{out}");
    let r = json(&d.join("context.json"));
    let curves = r["curves"].as_array().unwrap();
    let ctxs: Vec<u64> = curves.iter().map(|c| c["ctx"].as_u64().unwrap()).collect();
    assert_eq!(ctxs, [16, 32, 64]);
    // The same tokens seen by each.
    assert!(curves
        .iter()
        .all(|c| c["tokens_seen"] == curves[0]["tokens_seen"]));
    for c in curves {
        let loss = c["loss"].as_array().unwrap();
        // Positions 0, 1, 2-3, ..., 128-255 of segments of 256.
        assert_eq!(loss.len(), 9);
        assert!(loss.iter().all(|l| l.as_f64().unwrap().is_finite()));
    }
    is_svg(&d.join("context.svg"));
    // The models are reused by a second run (no training: under a few seconds).
    let t = std::time::Instant::now();
    ok(&quick("context", &d, &["--data", DATA]));
    assert!(t.elapsed().as_secs() < 30);
}

#[test]
fn recall_scores_both_models_in_both_orders() {
    let d = tmpdir("exp-recall");
    let out = ok(&quick("recall", &d, &[]));
    assert!(out.contains("transformer  before"), "{out}");
    let r = json(&d.join("recall.json"));
    let runs = r.as_array().unwrap();
    assert_eq!(runs.len(), 4);
    for s in runs {
        let pairs: Vec<u64> = s["by_pairs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p[0].as_u64().unwrap())
            .collect();
        assert_eq!(pairs, [2, 4]);
        let acc = s["overall"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&acc));
    }
    // The task's text: pairs, then the same keys as queries with their values.
    let text = std::fs::read_to_string(d.join("recall-after.txt")).unwrap();
    let line = text.lines().next().unwrap();
    let (pairs, queries) = line.split_once('|').unwrap();
    let mut a: Vec<_> = pairs.as_bytes().chunks(2).collect();
    let mut b: Vec<_> = queries.as_bytes().chunks(2).collect();
    a.sort();
    b.sort();
    assert_eq!(a, b, "{line}");
    is_svg(&d.join("recall-pairs.svg"));
    is_svg(&d.join("recall-distance.svg"));
}

#[test]
fn bad_experiments_give_one_clear_error() {
    let d = tmpdir("exp-bad");
    let e = bad(&["experiment", "nonsense", "--out", d.to_str().unwrap()]);
    let short = d.join("short.txt");
    std::fs::write(&short, "too short for a window").unwrap();
    let e2 = bad(&quick("context", &d, &["--data", short.to_str().unwrap()]));
    assert!(e2.contains("fewer than one window"), "{e2}");
    assert!(
        e.contains("unknown experiment nonsense") && e.contains("gen-time"),
        "{e}"
    );
    let gpt = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/gpt/model.safetensors"
    );
    let e3 = bad(&quick("gen-time", &d, &["--dim", "48"]));
    assert!(e3.contains("a width that heads of 32 divide"), "{e3}");
    let e = bad(&quick("decay", &d, &["--model", gpt]));
    assert!(e.contains("the Transformer has no decay to analyse"), "{e}");
}
