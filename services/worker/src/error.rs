//! The worker's error type and its one mapping to gRPC status codes.

use rrt_engine::EngineError;
use rrt_service::validate::Rejection;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Rejected(#[from] Rejection),
    #[error("the worker is at capacity ({0} requests in flight); retry later or elsewhere")]
    Overloaded(usize),
    #[error("the worker is draining")]
    Draining,
    #[error("the engine stopped")]
    EngineGone,
    #[error("the request ran past its deadline")]
    Deadline,
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
}

impl From<WorkerError> for tonic::Status {
    fn from(e: WorkerError) -> Self {
        use tonic::Status;
        match e {
            WorkerError::Rejected(r) => r.into(),
            WorkerError::Overloaded(_) => Status::resource_exhausted(e.to_string()),
            WorkerError::Draining | WorkerError::EngineGone => Status::unavailable(e.to_string()),
            WorkerError::Deadline => Status::deadline_exceeded(e.to_string()),
            WorkerError::Engine(ref inner) => match inner {
                EngineError::EmptyPrompt => Rejection::new("empty_prompt", e.to_string()).into(),
                EngineError::TooLong { .. } => {
                    Rejection::new("prompt_too_long", e.to_string()).into()
                }
                EngineError::KvBudget { .. } => {
                    Rejection::new("over_kv_budget", e.to_string()).into()
                }
                EngineError::Invalid(_) => Rejection::new("invalid", e.to_string()).into(),
                EngineError::Model(_) => Status::internal(e.to_string()),
            },
            WorkerError::Tokenizer(_) => Status::internal(e.to_string()),
        }
    }
}
