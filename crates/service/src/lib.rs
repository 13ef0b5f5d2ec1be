//! Plumbing every rrt service shares, so the services hold only their own logic: the shutdown
//! signal and drain ([`shutdown`]), the Prometheus `/metrics` endpoint ([`metrics_http`]), gRPC
//! health and server reflection ([`grpc`]), request deadlines ([`deadline`]) and log setup
//! ([`telemetry`]) and request validation ([`validate`]).

pub mod deadline;
pub mod grpc;
pub mod metrics_http;
pub mod shutdown;
pub mod telemetry;
pub mod validate;

pub use shutdown::Shutdown;
