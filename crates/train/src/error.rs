//! The trainer's error type: bad input (files, flags, models) named clearly, model and I/O
//! failures with the file they concern.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("{0}")]
    Input(String),
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error(transparent)]
    Model(#[from] rrt_model::ModelError),
    #[error("tensor: {0}")]
    Tensor(#[from] candle_core::Error),
    /// The run's stop flag was set (Ctrl-C, SIGTERM) after step `step`; its checkpoint is
    /// written.
    #[error("interrupted at step {step}: checkpoint written; --resume continues")]
    Interrupted { step: u64 },
}

impl TrainError {
    pub fn file(path: impl Into<PathBuf>, message: impl std::fmt::Display) -> Self {
        TrainError::File {
            path: path.into(),
            message: message.to_string(),
        }
    }
}

pub type Result<T> = std::result::Result<T, TrainError>;
