//! Error type shared by the library and the `rwkv` binary.
//!
//! Errors fall into two classes that map to the exit codes of the CLI contract:
//! bad input from the user (a missing or corrupt file, a wrong shape, an out-of-range token id,
//! exit code 2) and internal failures (exit code 1).

use std::path::Path;

/// The library's error type. Every message is one line and names the file, tensor or field
/// that caused it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The input (a file, a tensor, a token id, a flag) is invalid.
    #[error("{0}")]
    BadInput(String),
    /// An I/O failure on a file the user named.
    #[error("{path}: {source}")]
    Io {
        /// The file involved.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// Something that should not happen with valid input.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// Builds a [`Error::BadInput`] from anything printable.
    pub fn bad(msg: impl Into<String>) -> Self {
        Error::BadInput(msg.into())
    }

    /// Wraps an I/O error with the path it happened on.
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.as_ref().display().to_string(),
            source,
        }
    }

    /// The process exit code for this error: 2 for bad input, 1 for internal errors.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::BadInput(_) | Error::Io { .. } => 2,
            Error::Internal(_) => 1,
        }
    }
}

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
