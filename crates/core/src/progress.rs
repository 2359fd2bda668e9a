//! Progress on a terminal: a bar and a compact duration, for long work (training, scoring).

/// A 20-character progress bar.
pub fn bar(done: u64, total: u64) -> String {
    let filled = (20 * done / total.max(1)).min(20) as usize;
    format!("[{}{}]", "#".repeat(filled), "-".repeat(20 - filled))
}

/// Seconds as `1h05m` or `4m07s`.
pub fn fmt_secs(s: f64) -> String {
    let s = s.max(0.0) as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, s / 60 % 60)
    } else {
        format!("{}m{:02}s", s / 60, s % 60)
    }
}
