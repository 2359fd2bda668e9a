//! Counters and gauges shared by the HTTP handlers and the engine thread, rendered in the
//! Prometheus text exposition format by `GET /metrics`.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

/// The server's metrics. Plain atomics: readers tolerate a scrape that sees one counter
/// updated and its neighbour not yet.
#[derive(Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    /// Prompt tokens of admitted requests.
    pub prompt_tokens: AtomicU64,
    /// Prompt tokens whose state came from the cache.
    pub cached_prompt_tokens: AtomicU64,
    /// Generated tokens.
    pub completion_tokens: AtomicU64,
    /// Sequences in the running batch.
    pub batch_size: AtomicU64,
    /// Requests waiting for a batch slot.
    pub queue_length: AtomicU64,
    /// Engine steps (forward passes over the batch).
    pub steps: AtomicU64,
    /// Token rows processed by those steps (prompt chunks and generated tokens).
    pub rows: AtomicU64,
    /// Admitted requests that started from a cached prefix.
    pub cache_hits: AtomicU64,
    /// Admitted requests that found no cached prefix.
    pub cache_misses: AtomicU64,
    /// Entries in the prefix cache.
    pub cache_entries: AtomicU64,
    /// Bytes held by the prefix cache.
    pub cache_bytes: AtomicU64,
    /// Generations stopped because their client went away.
    pub cancelled: AtomicU64,
    /// Tokens sampled under a grammar.
    pub grammar_tokens: AtomicU64,
    /// Microseconds spent computing grammar masks and advancing grammars.
    pub grammar_micros: AtomicU64,
}

impl Metrics {
    /// Counts one answered request. `endpoint` is a route pattern (a bounded set of labels).
    pub fn request(&self, endpoint: &'static str, status: u16) {
        if let Ok(mut m) = self.requests.lock() {
            *m.entry((endpoint, status)).or_insert(0) += 1;
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "# HELP rwkv_requests_total HTTP requests answered, by endpoint and status.\n\
             # TYPE rwkv_requests_total counter"
        );
        if let Ok(m) = self.requests.lock() {
            for ((endpoint, status), n) in m.iter() {
                let _ = writeln!(
                    s,
                    "rwkv_requests_total{{endpoint=\"{endpoint}\",status=\"{status}\"}} {n}"
                );
            }
        }
        let rows: [(&str, &str, &str, &AtomicU64); 14] = [
            (
                "rwkv_prompt_tokens_total",
                "counter",
                "Prompt tokens of admitted requests.",
                &self.prompt_tokens,
            ),
            (
                "rwkv_cached_prompt_tokens_total",
                "counter",
                "Prompt tokens whose state came from the prefix cache.",
                &self.cached_prompt_tokens,
            ),
            (
                "rwkv_completion_tokens_total",
                "counter",
                "Generated tokens.",
                &self.completion_tokens,
            ),
            (
                "rwkv_batch_size",
                "gauge",
                "Sequences in the running batch.",
                &self.batch_size,
            ),
            (
                "rwkv_queue_length",
                "gauge",
                "Requests waiting for a batch slot.",
                &self.queue_length,
            ),
            (
                "rwkv_grammar_tokens_total",
                "counter",
                "Tokens sampled under a grammar (structured output).",
                &self.grammar_tokens,
            ),
            (
                "rwkv_grammar_microseconds_total",
                "counter",
                "Time spent computing grammar masks and advancing grammars.",
                &self.grammar_micros,
            ),
            (
                "rwkv_engine_steps_total",
                "counter",
                "Batched forward passes.",
                &self.steps,
            ),
            (
                "rwkv_engine_rows_total",
                "counter",
                "Token rows processed by the batched forward passes.",
                &self.rows,
            ),
            (
                "rwkv_cache_hits_total",
                "counter",
                "Requests that started from a cached prefix state.",
                &self.cache_hits,
            ),
            (
                "rwkv_cache_misses_total",
                "counter",
                "Requests that found no cached prefix state.",
                &self.cache_misses,
            ),
            (
                "rwkv_cache_entries",
                "gauge",
                "Entries in the prefix-state cache.",
                &self.cache_entries,
            ),
            (
                "rwkv_cache_bytes",
                "gauge",
                "Bytes held by the prefix-state cache.",
                &self.cache_bytes,
            ),
            (
                "rwkv_cancelled_total",
                "counter",
                "Generations stopped because the client disconnected.",
                &self.cancelled,
            ),
        ];
        for (name, kind, help, v) in rows {
            let _ = writeln!(
                s,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {}",
                v.load(Relaxed)
            );
        }
        s
    }
}
