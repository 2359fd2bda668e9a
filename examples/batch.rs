//! Batched inference with [`Model::forward_batch`]: several independent sequences, each with
//! its own state and its own number of new tokens, advanced by one pass whose linear layers
//! are matrix-matrix products over all of them.
//!
//! Also a benchmark: generating `GEN` tokens for each of `N` sequences, batched versus one
//! sequence at a time.
//!
//! ```sh
//! cargo run --release --example batch -- [MODEL] [N=8] [GEN=64]
//! ```

use rwkv::model::{BatchItem, Logits, Model, Scratch};
use rwkv::sample::argmax;
use std::time::Instant;

fn main() -> rwkv::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let path = args.get(1).cloned().unwrap_or_else(|| {
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/v7/model.safetensors"
        )
        .into()
    });
    let n: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(8);
    let gen: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(64);
    let model = Model::load(&path)?;
    let v = model.vocab_size() as u32;
    // Different prompts of different lengths: a ragged first step.
    let prompts: Vec<Vec<u32>> = (0..n)
        .map(|i| {
            (0..(3 + 5 * i as u32))
                .map(|j| (j * 31 + i as u32 * 7) % v)
                .collect()
        })
        .collect();

    // Batched: one forward_batch call per step advances every sequence. The first step reads
    // the prompts; the decode time counts the steps after it.
    let t = Instant::now();
    let mut decode_start = None;
    let mut states: Vec<_> = (0..n).map(|_| model.new_state()).collect();
    let mut next: Vec<Vec<u32>> = prompts.clone();
    let mut scratch = Scratch::default();
    let mut batched_out = vec![Vec::new(); n];
    for step in 0..gen {
        if step == 1 {
            decode_start = Some(Instant::now());
        }
        let mut items: Vec<BatchItem> = states
            .iter_mut()
            .zip(&next)
            .map(|(state, toks)| BatchItem {
                tokens: toks,
                state,
                logits: Logits::Last,
            })
            .collect();
        let results = model.forward_batch(&mut items, &mut scratch);
        for (i, r) in results.into_iter().enumerate() {
            let tok = argmax(&r?);
            batched_out[i].push(tok);
            next[i] = vec![tok];
        }
    }
    let batched = t.elapsed().as_secs_f64();
    let batched_decode = decode_start.map_or(0.0, |d| d.elapsed().as_secs_f64());

    // One at a time: the same work, sequence by sequence.
    let t = Instant::now();
    let mut single_decode = 0.0;
    let mut single_out = vec![Vec::new(); n];
    for (i, p) in prompts.iter().enumerate() {
        let mut st = model.new_state();
        let mut logits = model.forward(p, &mut st, Logits::Last)?;
        let d = Instant::now();
        for _ in 0..gen {
            let tok = argmax(&logits);
            single_out[i].push(tok);
            logits = model.step(tok, &mut st)?;
        }
        single_decode += d.elapsed().as_secs_f64();
    }
    let single = t.elapsed().as_secs_f64();

    assert_eq!(
        batched_out, single_out,
        "batched and sequential generation must agree"
    );
    let toks = (n * gen) as f64;
    println!("model {path}: {n} sequences x {gen} tokens (greedy, identical outputs)");
    println!("  batched        {:8.1} tokens/s", toks / batched);
    println!("  one at a time  {:8.1} tokens/s", toks / single);
    println!("  speed-up       {:8.2}x", single / batched);
    // Decode only (prompts excluded): the steady state of a server with N streams.
    let dec_toks = (n * (gen - 1).max(1)) as f64;
    if batched_decode > 0.0 {
        println!(
            "  decode only: batched {:.1} tokens/s, one at a time {:.1} tokens/s ({:.2}x)",
            dec_toks / batched_decode,
            (n * gen) as f64 / single_decode,
            (dec_toks / batched_decode) / ((n * gen) as f64 / single_decode)
        );
    }
    Ok(())
}
