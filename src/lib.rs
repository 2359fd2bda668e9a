//! RWKV ("Receptance Weighted Key Value") inference in Rust.
//!
//! Runs the official BlinkDL checkpoints (`.pth` and `.safetensors`) of RWKV-4 to RWKV-7 in two
//! modes over the same weights: time-sequential (`step`, one token from a constant-size state) and
//! time-parallel (`forward`, a whole chunk with matrix-matrix products and only the WKV recurrence
//! scanned).

#![warn(missing_docs)]

pub mod bench;
pub mod checkpoint;
pub mod cpu;
pub mod error;
pub mod eval;
pub mod init;
pub mod kernels;
pub mod model;
pub mod sample;
pub mod server;
pub mod session;
pub mod tensor;
pub mod tokenizer;
pub mod train;

pub use error::{Error, Result};

/// The built-in model: a small byte-level RWKV-7 trained by `rwkv train` on the first 90% of
/// tiny Shakespeare (see the README for the command that reproduces it).
pub const DEFAULT_MODEL: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/assets/shakespeare-v7.safetensors"
);

/// The model to use when none is given: `$RWKV_MODEL`, else [`DEFAULT_MODEL`].
pub fn default_model() -> Result<std::path::PathBuf> {
    let p = std::env::var_os("RWKV_MODEL")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| DEFAULT_MODEL.into());
    if p.is_file() {
        Ok(p)
    } else {
        Err(Error::bad(format!(
            "no --model given and the default model {} is missing",
            p.display()
        )))
    }
}
