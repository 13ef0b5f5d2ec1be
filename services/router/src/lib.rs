//! The rrt router: the cluster's public `rrt.v1.Generation` API. It validates requests against
//! its limits, admits them under a concurrency bound (RESOURCE_EXHAUSTED beyond it), picks a
//! worker by power of two choices on the coordinator's drain-time score (least outstanding when
//! the coordinator is unreachable), forwards deadlines and cancellation, and relays tokens.
//!
//! - [`pool`]: the worker view and the choice; [`watcher`]: keeping it current;
//! - [`service`]: the gRPC service; [`relay`]: a request's token stream, for both RPCs;
//! - [`server`]: start-up and drain; [`config`]: flags; [`error`]: status codes and metric labels;
//! - [`auth`]: bearer tokens on the public API;
//! - [`openai`]: the OpenAI-compatible HTTP API on the same path as the gRPC one.

#![forbid(unsafe_code)]

pub mod auth;
pub mod config;
pub mod error;
pub mod metrics;
pub mod openai;
pub mod pool;
pub mod relay;
pub mod server;
pub mod service;
pub mod watcher;

pub use config::RouterArgs;
pub use server::{start, RunningRouter};
