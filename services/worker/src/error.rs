//! The worker's error type and its one mapping to gRPC status codes.

use rrt_engine::EngineError;
use rrt_service::validate::Rejection;
use rrt_service::Refusal;

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
    #[error(transparent)]
    Constraint(#[from] rrt_constrain::ConstraintError),
}

impl From<Refusal> for WorkerError {
    fn from(r: Refusal) -> Self {
        match r {
            Refusal::Full { capacity } => WorkerError::Overloaded(capacity),
            Refusal::Draining => WorkerError::Draining,
        }
    }
}

impl WorkerError {
    /// The metric label of a request refused with this error
    /// (`rrt_worker_requests_rejected_total{reason}`); bounded.
    pub fn reason(&self) -> &'static str {
        match self {
            WorkerError::Rejected(r) => r.reason,
            WorkerError::Overloaded(_) => "overloaded",
            WorkerError::Draining => "draining",
            WorkerError::EngineGone => "engine_gone",
            WorkerError::Deadline => "deadline",
            WorkerError::Engine(e) => match e {
                EngineError::EmptyPrompt => "empty_prompt",
                EngineError::TooLong { .. } => "prompt_too_long",
                EngineError::KvBudget { .. } => "over_kv_budget",
                EngineError::Invalid(_) => "invalid",
                EngineError::Model(_) => "model",
                EngineError::StepFailed(_) => "step_failed",
            },
            WorkerError::Tokenizer(_) => "tokenizer",
            WorkerError::Constraint(rrt_constrain::ConstraintError::Invalid { .. }) => {
                "bad_constraint"
            }
            WorkerError::Constraint(rrt_constrain::ConstraintError::Setup(_)) => "constraint_setup",
        }
    }
}

impl From<WorkerError> for tonic::Status {
    fn from(e: WorkerError) -> Self {
        use tonic::Status;
        let reason = e.reason();
        match e {
            WorkerError::Rejected(r) => r.into(),
            WorkerError::Overloaded(_) => Status::resource_exhausted(e.to_string()),
            // The worker's failure, not the request's: retryable, and the router resumes it.
            WorkerError::Draining
            | WorkerError::EngineGone
            | WorkerError::Engine(EngineError::StepFailed(_)) => Status::unavailable(e.to_string()),
            WorkerError::Deadline => Status::deadline_exceeded(e.to_string()),
            WorkerError::Engine(EngineError::Model(_))
            | WorkerError::Tokenizer(_)
            | WorkerError::Constraint(rrt_constrain::ConstraintError::Setup(_)) => {
                Status::internal(e.to_string())
            }
            WorkerError::Constraint(_) => Rejection::new(reason, e.to_string()).into(),
            // The engine's other errors are the request's fault: INVALID_ARGUMENT.
            WorkerError::Engine(_) => Rejection::new(reason, e.to_string()).into(),
        }
    }
}
