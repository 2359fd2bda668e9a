//! `rwkv bench`: prompt and generation speed, bytes read per token against the machine's own
//! measured read bandwidth, and memory — including the seed's claims of constant memory and
//! linear time over long generations.

use crate::model::{Logits, Model};
use crate::sample::argmax;
use crate::Result;
use serde::Serialize;
use std::time::Instant;

/// Results of one benchmark run.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Weight format of the matrices.
    pub format: String,
    /// Worker threads.
    pub threads: usize,
    /// Prompt length.
    pub prompt_tokens: usize,
    /// Prompt processing speed (time-parallel mode), median of the runs.
    pub prompt_tokens_per_s: f64,
    /// Generated tokens per run.
    pub gen_tokens: usize,
    /// Generation speed (time-sequential mode), median of the runs.
    pub gen_tokens_per_s: f64,
    /// Weight bytes read per generated token.
    pub bytes_per_token: usize,
    /// Read bandwidth of this machine measured with the same threads, GB/s.
    pub bandwidth_gbps: f64,
    /// `bytes_per_token × gen_tokens_per_s`, GB/s.
    pub achieved_gbps: f64,
    /// `achieved_gbps / bandwidth_gbps`.
    pub bandwidth_fraction: f64,
    /// Peak resident memory of the process, MiB.
    pub peak_rss_mb: f64,
    /// For long runs: milliseconds per token in consecutive windows.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ms_per_token_windows: Vec<f64>,
    /// For long runs: resident memory (MiB) at the end of each window.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rss_mb_windows: Vec<f64>,
    /// Tokens per window in the two lists above.
    pub window: usize,
}

fn proc_status_kb(key: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with(key)).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<f64>().ok())
            })
        })
        .unwrap_or(0.0)
}

/// Current resident memory, MiB (Linux; 0 elsewhere).
pub fn rss_mb() -> f64 {
    proc_status_kb("VmRSS:") / 1024.0
}

/// Peak resident memory, MiB (Linux; 0 elsewhere).
pub fn peak_rss_mb() -> f64 {
    proc_status_kb("VmHWM:") / 1024.0
}

/// Measures read bandwidth: every thread of the pool sums its share of a buffer much larger
/// than the caches; the best of a few passes, in GB/s.
pub fn measure_bandwidth() -> f64 {
    use rayon::prelude::*;
    let n = 64 << 20; // 64 Mi u64 = 512 MiB
    let buf: Vec<u64> = (0..n as u64).collect();
    let mut best = 0f64;
    for _ in 0..4 {
        let t = Instant::now();
        let s: u64 = buf
            .par_chunks(1 << 16)
            .map(|c| c.iter().fold(0u64, |a, &x| a.wrapping_add(x)))
            .reduce(|| 0, |a, b| a.wrapping_add(b));
        let dt = t.elapsed().as_secs_f64();
        std::hint::black_box(s);
        best = best.max((n * 8) as f64 / dt / 1e9);
    }
    best
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        0.0
    } else {
        v[v.len() / 2]
    }
}

/// Runs the benchmark: `runs` repetitions of a `prompt`-token prompt and `gen` generated
/// tokens (greedy, so the run is deterministic); runs longer than 2,000 tokens also record
/// time and memory per window of tokens.
pub fn run(model: &Model, prompt: usize, gen: usize, runs: usize) -> Result<BenchReport> {
    let v = model.vocab_size() as u32;
    let prompt_toks: Vec<u32> = (0..prompt as u32).map(|i| (i * 7919 + 13) % v).collect();
    let mut prompt_speeds = Vec::new();
    let mut gen_speeds = Vec::new();
    let window = if gen >= 2000 { 1000 } else { 0 };
    let mut ms_windows = Vec::new();
    let mut rss_windows = Vec::new();
    let mut logits = vec![0f32; model.vocab_size()];
    // One warm-up pass so page faults of the weights are not timed.
    {
        let mut st = model.new_state();
        model.forward(&prompt_toks[..prompt.min(16)], &mut st, Logits::Last)?;
        model.step_into(1, &mut st, &mut logits)?;
    }
    for run in 0..runs.max(1) {
        let mut st = model.new_state();
        let mut tok = 1u32;
        if prompt > 0 {
            let t = Instant::now();
            let out = model.forward(&prompt_toks, &mut st, Logits::Last)?;
            prompt_speeds.push(prompt as f64 / t.elapsed().as_secs_f64());
            logits.copy_from_slice(&out);
            tok = argmax(&logits);
        }
        let t = Instant::now();
        let mut tw = Instant::now();
        for i in 0..gen {
            model.step_into(tok, &mut st, &mut logits)?;
            tok = argmax(&logits);
            if window > 0 && run == 0 && (i + 1) % window == 0 {
                ms_windows.push(tw.elapsed().as_secs_f64() * 1e3 / window as f64);
                rss_windows.push(rss_mb());
                tw = Instant::now();
            }
        }
        if gen > 0 {
            gen_speeds.push(gen as f64 / t.elapsed().as_secs_f64());
        }
    }
    // Peak RSS before the bandwidth probe, whose buffer is not the model's.
    let peak = peak_rss_mb();
    let bw = measure_bandwidth();
    let gen_tps = median(gen_speeds);
    let bpt = model.bytes_per_token();
    let achieved = bpt as f64 * gen_tps / 1e9;
    Ok(BenchReport {
        format: model.weight_format(),
        threads: rayon::current_num_threads(),
        prompt_tokens: prompt,
        prompt_tokens_per_s: median(prompt_speeds),
        gen_tokens: gen,
        gen_tokens_per_s: gen_tps,
        bytes_per_token: bpt,
        bandwidth_gbps: bw,
        achieved_gbps: achieved,
        bandwidth_fraction: if bw > 0.0 { achieved / bw } else { 0.0 },
        peak_rss_mb: peak,
        ms_per_token_windows: ms_windows,
        rss_mb_windows: rss_windows,
        window,
    })
}

impl std::fmt::Display for BenchReport {
    /// The report as `rwkv bench` prints it (after the model line).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "format      {}   threads {}   simd {}",
            self.format,
            self.threads,
            crate::cpu::simd_level()
        )?;
        writeln!(
            f,
            "prompt      {} tokens: {:.1} tokens/s",
            self.prompt_tokens, self.prompt_tokens_per_s
        )?;
        writeln!(
            f,
            "generation  {} tokens: {:.1} tokens/s",
            self.gen_tokens, self.gen_tokens_per_s
        )?;
        writeln!(
            f,
            "bandwidth   {:.1} MB/token, {:.2} GB/s achieved of {:.2} GB/s measured ({:.0}%)",
            self.bytes_per_token as f64 / 1e6,
            self.achieved_gbps,
            self.bandwidth_gbps,
            self.bandwidth_fraction * 100.0
        )?;
        writeln!(f, "peak RSS    {:.1} MiB", self.peak_rss_mb)?;
        if !self.ms_per_token_windows.is_empty() {
            writeln!(f, "per {} tokens: ms/token, RSS MiB", self.window)?;
            for (i, (ms, rss)) in self
                .ms_per_token_windows
                .iter()
                .zip(&self.rss_mb_windows)
                .enumerate()
            {
                writeln!(f, "  {:>6}  {:.3}  {:.1}", (i + 1) * self.window, ms, rss)?;
            }
        }
        Ok(())
    }
}
