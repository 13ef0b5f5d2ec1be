//! The engine's error type: what a request is told when it cannot be served.

use rrt_model::ModelError;

#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum EngineError {
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error(
        "prompt of {prompt} tokens plus {max_new} new tokens exceeds the context of {context}"
    )]
    TooLong {
        prompt: usize,
        max_new: usize,
        context: usize,
    },
    #[error(
        "prompt of {prompt} tokens plus {max_new} new tokens needs {needed} bytes of KV cache; \
         the worker's whole KV pool is {budget} bytes"
    )]
    KvBudget {
        prompt: usize,
        max_new: usize,
        needed: usize,
        budget: usize,
    },
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("model failure: {0}")]
    Model(String),
    /// A forward step failed under the request (not the request's fault: it may run again).
    #[error("the engine failed a step: {0}")]
    StepFailed(String),
}

impl From<ModelError> for EngineError {
    fn from(e: ModelError) -> Self {
        match e {
            ModelError::InvalidInput(m) => EngineError::Invalid(m),
            other => EngineError::Model(other.to_string()),
        }
    }
}

impl From<candle_core::Error> for EngineError {
    fn from(e: candle_core::Error) -> Self {
        EngineError::Model(e.to_string())
    }
}
