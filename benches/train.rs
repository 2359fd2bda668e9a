//! Training benchmark on one thread: the matrix products of one shard of the tiny-Shakespeare
//! recipe (6 windows of 64 tokens, width 128, LoRA rank 32, vocabulary 256) through the f32
//! and bfloat16 product kernels and the `gemm` crate, in GFLOP/s, then the whole hand-written
//! RWKV-7 and RWKV-4 forward and backward passes of that shard in both precisions, in
//! milliseconds and tokens per second.
//!
//! ```sh
//! cargo bench --bench train
//! TRAIN_BENCH=pass cargo bench --bench train     # the whole pass only (to profile it)
//! ```

use rwkv::checkpoint::Generation;
use rwkv::init::{init_tensors, InitSpec, Rng};
use rwkv::kernels::sgemm::{gemm, gemm_bf16, gemm_crate};
use rwkv::train::pass::products::Prepared;
use rwkv::train::pass::Pass;
use rwkv::train::v4::Fused4;
use rwkv::train::v7::Fused7;
use rwkv::train::Params;
use std::time::Instant;

fn rnd(n: usize, seed: u64) -> Vec<f32> {
    let mut r = Rng::new(seed);
    (0..n).map(|_| r.uniform() as f32 - 0.5).collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

type Product =
    fn(usize, usize, usize, &mut [f32], bool, &[f32], (usize, usize), &[f32], (usize, usize));

fn main() {
    let (rows, c, f, r, v) = (384, 128, 512, 32, 256);
    // (what, m, n, k, A transposed, B transposed, accumulate), as the training pass calls them
    // (the forward pass multiplies by `[in, out]` transposes made once per step).
    let shapes: &[(&str, usize, usize, usize, bool, bool, bool)] = &[
        ("x·Wᵀ      C→C", rows, c, c, false, false, false),
        ("x·Wᵀ      C→4C", rows, f, c, false, false, false),
        ("x·Wᵀ      4C→C", rows, c, f, false, false, true),
        ("x·Wᵀ      C→V", rows, v, c, false, false, false),
        ("x·A       C→r", rows, r, c, false, false, false),
        ("x·A       r→C", rows, c, r, false, false, true),
        ("dy·W      C→C", rows, c, c, false, false, false),
        ("dy·W      4C→C", rows, c, f, false, false, false),
        ("dyᵀ·x     C×C", c, c, rows, true, false, true),
        ("dyᵀ·x     4C×C", f, c, rows, true, false, true),
        ("dyᵀ·x     C×4C", c, f, rows, true, false, true),
        ("xᵀ·dy     C×r", c, r, rows, true, false, true),
        ("dy·Aᵀ     r→C", rows, c, r, false, true, false),
    ];
    // `TRAIN_BENCH=pass` runs only the whole pass (to profile it).
    let only_pass = std::env::var("TRAIN_BENCH").is_ok_and(|v| v == "pass");
    if !only_pass {
        println!(
            "product (m×n×k)                 sgemm GFLOP/s   bf16 GFLOP/s   gemm crate GFLOP/s"
        );
    }
    for &(what, m, n, k, ta, tb, acc) in shapes.iter().filter(|_| !only_pass) {
        let a = rnd(m * k, 1);
        let b = rnd(k * n, 2);
        let mut out = vec![0f32; m * n];
        let sa = if ta { (1, m) } else { (k, 1) };
        let sb = if tb { (1, k) } else { (n, 1) };
        let flop = 2.0 * (m * n * k) as f64;
        let reps = (2e8 / flop).ceil() as usize;
        let mut res = [0f64; 3];
        let prods = [gemm as Product, gemm_bf16 as Product, gemm_crate as Product];
        for (g, prod) in res.iter_mut().zip(prods) {
            let mut ts = Vec::new();
            for _ in 0..7 {
                let t = Instant::now();
                for _ in 0..reps {
                    prod(m, n, k, &mut out, acc, &a, sa, &b, sb);
                }
                ts.push(t.elapsed().as_secs_f64() / reps as f64);
            }
            *g = flop / median(ts) / 1e9;
        }
        println!(
            "{what:<15} {m:>4}×{n:>3}×{k:>3} {:>14.1} {:>14.1} {:>20.1}",
            res[0], res[1], res[2]
        );
        std::hint::black_box(&out);
    }

    // The whole pass over one shard of the recipe, for each trained generation.
    for arch in [Generation::V7, Generation::V4] {
        let spec = InitSpec {
            arch,
            n_layer: 4,
            n_embd: c,
            vocab: v,
            head_size: 32,
            positions: 0,
            seed: 1,
        };
        // Random values everywhere (the initial zero projections would make parts of it
        // trivial).
        let mut ts = init_tensors(&spec).unwrap();
        for (i, t) in ts.iter_mut().enumerate() {
            t.2 = rnd(t.2.len(), 10 + i as u64)
                .iter()
                .map(|x| x * 0.2)
                .collect();
        }
        let params = Params::from_tensors(ts).unwrap();
        for bf16 in [false, true] {
            if bf16 && !rwkv::cpu::has_avx512_bf16() {
                println!("(no bfloat16 products on this CPU)");
                continue;
            }
            let ms = match arch {
                Generation::V4 => {
                    time_pass(Fused4::new(&params).unwrap(), &params, bf16, only_pass)
                }
                _ => time_pass(Fused7::new(&params).unwrap(), &params, bf16, only_pass),
            };
            let (bs, t) = SHARD;
            println!(
                "{arch:?} forward + backward ({}), 4 layers × 128, {bs} windows × {t} tokens, \
                 one thread: {ms:.2} ms ({:.0} tokens/s)",
                if bf16 { "bf16 products" } else { "f32" },
                (bs * t) as f64 / ms * 1e3
            );
        }
    }
}

/// Windows and tokens per window of one shard of the recipe.
const SHARD: (usize, usize) = (6, 64);

/// The median time in milliseconds of one shard through `pass` with the parameters `params`.
fn time_pass<P: Pass>(mut pass: P, params: &Params, bf16: bool, only_pass: bool) -> f64 {
    let (bs, t) = SHARD;
    let p: Vec<&[f32]> = params.values().iter().map(|v| v.as_slice()).collect();
    let mut rng = Rng::new(5);
    let toks: Vec<u32> = (0..bs * t).map(|_| (rng.next_u64() % 256) as u32).collect();
    let tgts: Vec<u32> = (0..bs * t).map(|_| (rng.next_u64() % 256) as u32).collect();
    pass.products_mut().set_bf16(bf16);
    let mut pr = Prepared::default();
    pass.products().prepare(&p, &mut pr);
    // In pieces of `TRAIN_BENCH_PIECE` windows (as the trainer runs a shard; default 3).
    let per: usize = std::env::var("TRAIN_BENCH_PIECE")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&p| p > 0 && bs % p == 0)
        .unwrap_or(3);
    let mut work = pass.work(per, t);
    let mut g = pass.products().zero_grads();
    let mut times = Vec::new();
    for _ in 0..if only_pass { 300 } else { 30 } {
        let s = Instant::now();
        for w0 in (0..bs).step_by(per) {
            let r = w0 * t..(w0 + per) * t;
            let (x, y) = (&toks[r.clone()], &tgts[r]);
            pass.accumulate(&p, &pr, x, y, 1.0 / 768.0, 1e-4, &mut work, &mut g)
                .unwrap();
        }
        times.push(s.elapsed().as_secs_f64());
    }
    median(times) * 1e3
}
