//! The rrt coordinator: workers register and report load and exit statistics every ~500 ms;
//! the coordinator evicts silent workers, scores each by its predicted time to drain (pending
//! loop-steps from its exit statistics over its measured loop-step throughput) and streams the
//! resulting cluster view to routers. With a quality floor it also lowers the workers' default
//! exit threshold as a model saturates, and restores it as load falls.
//!
//! - [`registry`]: the plain state and the score; [`views`]: the published view and its deltas;
//!   [`adapt`]: load-adaptive exit thresholds;
//!   [`service`]: the gRPC service and the publisher; [`server`]: start-up and shutdown;
//!   [`config`]: flags.

#![forbid(unsafe_code)]

pub mod adapt;
pub mod config;
pub mod registry;
pub mod server;
pub mod service;
pub mod views;

pub use config::CoordinatorArgs;
pub use server::{start, RunningCoordinator};
