//! Time-parallel training of RWKV-7 and RWKV-4 from scratch on the CPU.
//!
//! - [`params`]: the parameters being trained (plain f32 vectors under the official names);
//! - [`v7`]: RWKV-7's forward and backward pass, written out by hand (its WKV scan in
//!   `v7/scan.rs`): where the RWKV-7 backward lives;
//! - [`graph`]: both generations as a candle autograd graph with fused ops — the reference the
//!   hand-written pass is tested against, and RWKV-4's engine;
//! - [`optim`]: AdamW and the schedule; [`run`]: the loop, checkpoints, resumption, metrics,
//!   the loss plot. Validation scores through `rwkv_core::eval`, as `rwkv eval` does.

mod common;
pub mod graph;
pub mod optim;
pub mod params;
pub mod run;
pub mod v7;

pub use graph::TrainModel;
pub use params::{Dims, Params};

pub use run::{train, Arch, Precision, TrainConfig};

/// Sets the worker threads for training (all cores when `None`): the kernels' pool, and the
/// settings candle reads. Call once, before any work.
pub fn set_threads(n: Option<usize>) -> rwkv_core::Result<()> {
    // candle's matrix products read the thread count from RAYON_NUM_THREADS on every call and,
    // when it is unset, count the physical cores by reading /proc/cpuinfo each time.
    let count = n.unwrap_or_else(|| {
        std::env::var("RAYON_NUM_THREADS")
            .ok()
            .and_then(|s| s.parse().ok())
            .filter(|&n: &usize| n > 0)
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
    });
    std::env::set_var("RAYON_NUM_THREADS", count.to_string());
    // The trainer parallelises over shards of the batch with rayon; candle's own pool for
    // element-wise ops would only spin against it.
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    rwkv_core::kernels::set_threads(n)
}
