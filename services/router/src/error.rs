//! The router's error type and its one mapping to gRPC status codes.

use rrt_service::validate::Rejection;

#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error(transparent)]
    Rejected(#[from] Rejection),
    #[error("the router is at capacity ({0} requests in flight); retry later")]
    Overloaded(usize),
    #[error("no worker is available for model {0:?}")]
    NoWorker(String),
    #[error("the router is draining")]
    Draining,
    /// A worker's own status, passed through.
    #[error("{0}")]
    Worker(tonic::Status),
}

impl From<RouterError> for tonic::Status {
    fn from(e: RouterError) -> Self {
        use tonic::Status;
        match e {
            RouterError::Rejected(r) => r.into(),
            RouterError::Overloaded(_) => Status::resource_exhausted(e.to_string()),
            RouterError::NoWorker(_) | RouterError::Draining => Status::unavailable(e.to_string()),
            RouterError::Worker(s) => s,
        }
    }
}
