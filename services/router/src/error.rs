//! The router's error type, with its one mapping to gRPC status codes and, next to it, how each
//! error is counted in the metrics.

use std::borrow::Cow;

use rrt_service::validate::{self, Rejection};
use rrt_service::Refusal;
use tonic::Code;

#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error(transparent)]
    Rejected(#[from] Rejection),
    #[error("the router is at capacity ({0} requests in flight); retry later")]
    Overloaded(usize),
    #[error("no worker is available for model {0}")]
    NoWorker(String),
    #[error("the router is draining")]
    Draining,
    /// Every worker the request could run on failed or could not be reached.
    #[error(
        "no worker could run the request ({attempts} tried, {tokens} tokens sent); last: {last}"
    )]
    Lost {
        attempts: usize,
        tokens: usize,
        last: String,
    },
    /// A worker's own status, passed through (UNKNOWN, a broken stream, as UNAVAILABLE).
    #[error("{0}")]
    Worker(tonic::Status),
}

/// Whether a worker's status means the worker (or the way to it) failed, not the request: the
/// request may go on elsewhere. Everything a worker refuses on purpose (bad input, capacity,
/// deadline) is final.
pub fn worker_lost(s: &tonic::Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable | Code::Unknown | Code::Cancelled | Code::Aborted | Code::Internal
    )
}

impl From<Refusal> for RouterError {
    fn from(r: Refusal) -> Self {
        match r {
            Refusal::Full { capacity } => RouterError::Overloaded(capacity),
            Refusal::Draining => RouterError::Draining,
        }
    }
}

/// How a failed request shows in the metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Counted {
    /// Refused before any work: `rrt_router_requests_rejected_total{reason}`.
    Rejected(Cow<'static, str>),
    /// Failed after admission: `rrt_router_requests_total{outcome="error"}`.
    Failed,
}

impl RouterError {
    pub fn counted(&self) -> Counted {
        let reason = match self {
            RouterError::Rejected(r) => r.reason.into(),
            RouterError::Overloaded(_) => "overloaded".into(),
            RouterError::NoWorker(_) => "no_worker".into(),
            RouterError::Draining => "draining".into(),
            RouterError::Worker(s) if s.code() == Code::InvalidArgument => {
                validate::reason_of(s).into()
            }
            RouterError::Worker(s) if s.code() == Code::ResourceExhausted => {
                "worker_overloaded".into()
            }
            RouterError::Worker(_) | RouterError::Lost { .. } => return Counted::Failed,
        };
        Counted::Rejected(reason)
    }
}

impl From<RouterError> for tonic::Status {
    fn from(e: RouterError) -> Self {
        use tonic::Status;
        match e {
            RouterError::Rejected(r) => r.into(),
            RouterError::Overloaded(_) => Status::resource_exhausted(e.to_string()),
            RouterError::NoWorker(_) | RouterError::Draining | RouterError::Lost { .. } => {
                Status::unavailable(validate::bounded(e.to_string()))
            }
            RouterError::Worker(s) if s.code() == Code::Unknown => Status::unavailable(
                validate::bounded(format!("the worker's stream broke: {}", s.message())),
            ),
            RouterError::Worker(s) => s,
        }
    }
}
