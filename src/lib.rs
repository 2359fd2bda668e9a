//! RWKV ("Receptance Weighted Key Value") inference in Rust.
//!
//! Runs the official BlinkDL checkpoints (`.pth` and `.safetensors`) of RWKV-4 to RWKV-7 in two
//! modes over the same weights: time-sequential (`step`, one token from a constant-size state) and
//! time-parallel (`forward`, a whole chunk with matrix-matrix products and only the WKV recurrence
//! scanned).

#![warn(missing_docs)]

pub mod bench;
pub mod checkpoint;
pub mod error;
pub mod init;
pub mod kernels;
pub mod model;
pub mod sample;
pub mod server;
pub mod session;
pub mod tokenizer;
pub mod train;

pub use error::{Error, Result};
