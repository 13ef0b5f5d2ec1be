//! The model crate's one error type. Every error that comes from a file names the file and the
//! field or tensor at fault, so a user can fix the input without reading a backtrace.

use std::path::PathBuf;

/// Errors from loading, tokenizing and running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: cannot read: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error("{path}: unsupported architecture `{arch}` (supported: {supported})")]
    UnsupportedArchitecture {
        path: PathBuf,
        arch: String,
        supported: &'static str,
    },
    #[error("{path}: tensor `{name}` not found")]
    MissingTensor { path: PathBuf, name: String },
    #[error("{path}: tensor `{name}` has shape {actual:?}, expected {expected:?}")]
    ShapeMismatch {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },
    #[error("{path}: tensor `{name}` has unsupported dtype {dtype}")]
    UnsupportedDtype {
        path: PathBuf,
        name: String,
        dtype: String,
    },
    #[error("{path}: not a valid safetensors file: {message}")]
    Safetensors { path: PathBuf, message: String },
    #[error("{path}: not a valid GGUF file: {message}")]
    Gguf { path: PathBuf, message: String },
    #[error("{path}: GGUF metadata `{key}`: {message}")]
    GgufMetadata {
        path: PathBuf,
        key: String,
        message: String,
    },
    #[error("{path}: tokenizer: {message}")]
    Tokenizer { path: PathBuf, message: String },
    #[error("chat template: {0}")]
    ChatTemplate(String),
    #[error("invalid input: {0}")]
    InvalidInput(String),
    #[error("tensor computation failed: {0}")]
    Candle(#[from] candle_core::Error),
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;

impl ModelError {
    pub(crate) fn config(path: impl Into<PathBuf>, message: impl std::fmt::Display) -> Self {
        ModelError::Config {
            path: path.into(),
            message: message.to_string(),
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ModelError::Io {
            path: path.into(),
            err: source,
        }
    }
}
