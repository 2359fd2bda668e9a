//! Time-parallel training of RWKV-7 and RWKV-4 from scratch on the CPU.

pub mod model;
pub mod ops;

pub use model::{Dims, TrainModel};
pub mod fused;
pub mod optim;
pub mod run;
mod scan;

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
