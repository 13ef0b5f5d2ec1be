//! An rrt worker: the depth-wise batching engine of one model behind the internal
//! `rrt.v1.Worker` gRPC service.
//!
//! - [`config`]: flags and environment, checked into the engine's settings;
//! - [`actor`]: the engine on its own thread behind a bounded command channel;
//! - [`backend`]: what that thread drives: the real engine or [`sim`], a simulated one (step
//!   times from a cost model, a prefix cache of blocks, exits drawn per request);
//! - [`exits`]: exit policies between their gRPC and engine forms, quality tiers;
//! - [`constrain`]: constrained requests (the model's grammar compiler, one matcher each);
//! - [`service`]: the gRPC service (validation, tokenization, limits, admission);
//! - [`relay`]: one request's engine events as stream messages (text, stops, deadline);
//! - [`stop`]: stop sequences on the generated text;
//! - [`reporter`]: registration with the coordinator and periodic load reports;
//! - [`metrics`]: Prometheus series; [`server`]: start-up and SIGTERM drain.

#![forbid(unsafe_code)]

pub mod actor;
pub mod backend;
pub mod config;
pub mod constrain;
pub mod error;
pub mod exits;
pub mod metrics;
pub mod relay;
pub mod reporter;
pub mod server;
pub mod service;
pub mod sim;
pub mod stop;
pub mod ttft;

pub use config::WorkerArgs;
pub use server::{start, RunningWorker};
