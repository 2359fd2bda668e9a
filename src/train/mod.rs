//! Time-parallel training of RWKV-7 and RWKV-4 from scratch on the CPU.

pub mod model;
pub mod ops;

pub use model::{Dims, TrainModel};
pub mod data;
pub mod fused;
pub mod optim;
pub mod run;
mod scan;

pub use run::{train, TrainConfig};
