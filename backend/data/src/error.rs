//! The crate's error type.

use std::path::PathBuf;

/// Errors from reading, writing or interpreting story data.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// An I/O error on a file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A malformed pickle stream.
    #[error("pickle: {0}")]
    Pickle(String),
    /// A malformed .npy file.
    #[error("npy: {0}")]
    Npy(String),
    /// Malformed JSON.
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
    /// Input that is well-formed but does not make sense.
    #[error("{0}")]
    Invalid(String),
    /// PNG encoding failed.
    #[error("image: {0}")]
    Image(#[from] image::ImageError),
}

impl DataError {
    /// Wrap an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> DataError {
        DataError::Io {
            path: path.into(),
            source,
        }
    }
}

/// Result with [`DataError`].
pub type Result<T> = std::result::Result<T, DataError>;
