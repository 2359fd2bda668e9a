//! RWKV ("Receptance Weighted Key Value") on the CPU: the engine of the `rwkv` toolkit.
//!
//! Runs the official BlinkDL checkpoints (`.pth` and `.safetensors`) of RWKV-4 to RWKV-7 in two
//! modes over the same weights: time-sequential (`step`, one token from a constant-size state) and
//! time-parallel (`forward`, a whole chunk with matrix-matrix products and only the WKV recurrence
//! scanned).
//!
//! The modules, each depending only on those before it:
//! - [`error`], [`cpu`] (which instruction sets the kernels may use);
//! - [`tensor`]: dtypes, weight data in every stored format, conversions, the matrix type;
//! - [`checkpoint`]: reading and writing `.pth` and `.safetensors` (no model math);
//! - [`kernels`]: the hot loops over [`tensor`] data (products, norms, WKV steps);
//! - [`schema`]: every generation's tensors (names, shapes, layouts, initialisation);
//! - [`model`]: the four generations, their state and constants; [`init`]: new checkpoints;
//! - [`tokenizer`], [`sample`], [`session`] (prompt, generate), [`chat`];
//! - [`data`] (token streams of text files), [`eval`], [`bench`], [`progress`].
//!
//! The trainer (`rwkv-train`), the server (`rwkv-server`) and the CLI (`rwkv`) are crates of
//! their own on top of this one.

#![warn(missing_docs)]

pub mod bench;
pub mod chat;
pub mod checkpoint;
pub mod cpu;
pub mod data;
pub mod error;
pub mod eval;
pub mod init;
pub mod kernels;
pub mod model;
pub mod progress;
pub mod sample;
pub mod schema;
pub mod session;
pub mod tensor;
pub mod tokenizer;

pub use error::{Error, Result};

/// The built-in model: a small byte-level RWKV-7 trained by `rwkv train` on the first 90% of
/// tiny Shakespeare (see the README for the command that reproduces it).
pub const DEFAULT_MODEL: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../assets/shakespeare-v7.safetensors"
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
            "no model given and the default model {} is missing",
            p.display()
        )))
    }
}
