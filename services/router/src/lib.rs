//! The rrt router: the cluster's public `rrt.v1.Generation` API. It validates requests against
//! its limits, admits them under a concurrency bound (RESOURCE_EXHAUSTED beyond it), picks a
//! worker by the `--balance` policy (by default cache affinity on prompt prefixes with
//! depth-aware loads from the coordinator's view; this router's own least outstanding when the
//! view is stale), forwards deadlines and cancellation, and relays tokens.
//!
//! - [`pool`]: the worker view; [`balance`]: the choice; [`watcher`]: keeping the view current;
//! - [`service`]: the gRPC service; [`relay`]: a request's token stream, for both RPCs;
//! - [`server`]: start-up and drain; [`config`]: flags; [`error`]: status codes and metric labels;
//! - [`auth`]: bearer tokens on the public API;
//! - [`openai`]: the OpenAI-compatible HTTP API on the same path as the gRPC one.

#![forbid(unsafe_code)]

pub mod auth;
pub mod balance;
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
