//! Plumbing every rrt service shares, so the services hold only their own logic: the shutdown
//! signal and drain ([`shutdown`]), the Prometheus `/metrics` endpoint ([`metrics_http`]), gRPC
//! health and server reflection ([`grpc`]), request deadlines ([`deadline`]) and log setup
//! ([`telemetry`]), request validation ([`validate`]), bounded admission with draining
//! ([`admission`]), TLS and mutual TLS from PEM files ([`tls`]) and the body of every service
//! binary's `main` ([`main_loop`]).

#![forbid(unsafe_code)]

pub mod admission;
pub mod deadline;
pub mod grpc;
pub mod main_loop;
pub mod metrics_http;
pub mod shutdown;
pub mod telemetry;
pub mod tls;
pub mod validate;

pub use admission::{Admission, Permit, Refusal};
pub use shutdown::Shutdown;
