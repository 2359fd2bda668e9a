//! Time-parallel training of RWKV-7 and RWKV-4 from scratch on the CPU.
//!
//! - [`params`]: the parameters being trained (plain f32 vectors under the official names);
//! - [`v7`] and [`v4`]: each generation's forward and backward pass, written out by hand (the
//!   WKV scans in `v7/scan.rs` and `v4/wkv.rs`): where each backward lives;
//! - [`pass`]: what the two passes share (matrix products, element-wise kernels, the
//!   [`pass::Pass`] the loop drives);
//! - `graph` (feature `graph`, tests only): both generations as a candle autograd graph with
//!   fused ops — the gradient oracle the hand-written passes are tested against;
//! - [`optim`]: AdamW and the schedule; [`run`]: the loop, checkpoints, resumption, metrics,
//!   the loss plot. Validation scores through `rwkv_core::eval`, as `rwkv eval` does;
//! - [`tune`]: state tuning of a trained RWKV-7 (the weights frozen, the initial WKV state
//!   learnt through the same pass).

mod common;
pub mod experiment;
pub mod gpt;
#[cfg(feature = "graph")]
pub mod graph;
pub mod optim;
pub mod params;
pub mod pass;
pub mod run;
pub mod tune;
pub mod v4;
pub mod v7;

#[cfg(feature = "graph")]
pub use graph::TrainModel;
pub use params::{Dims, Params};

pub use run::{train, Arch, Precision, TrainConfig};
pub use tune::{tune, Method, TuneConfig, TuneSummary};
