//! rrt's engine: the loop-stage pipeline a worker runs. Requests are admitted by the KV blocks
//! they need now (paged KV, prefix caching, preemption by recompute: [`Engine`], `kv`),
//! prefilled in chunks, and decoded by one of three schedulers that share everything else, for
//! honest comparison:
//! - [`Scheduler::Static`]: a batch runs until all its sequences finish;
//! - [`Scheduler::Csb`]: continuous sequence-wise batching (join and leave at token boundaries,
//!   every token runs all loops in one step);
//! - [`Scheduler::Cdb`]: continuous depth-wise batching (one step runs the shared block once over
//!   rows at different loop depths; a row that finishes its last loop frees its slot at once).
//!
//! The engine is synchronous: [`Engine::step`] runs one batch; a worker drives it on its own
//! thread. Tokens go back through each request's channel; a dropped receiver cancels the request
//! and frees its KV at the next step.

//!
//! Module map: [`Engine`] (admission, room for the next tokens, the step loop, retiring) · `kv`
//! (the block pool, the prefix cache and what may be shared) · `csb` and `cdb` (the
//! schedulers' steps; CDB as plan -> gather -> run block -> decide -> commit) · `sequence` (a
//! running request's state) · [`ExitPolicy`] and [`ExitTrace`] (early exit) · [`EngineStats`] ·
//! [`generate_with_exits`] (the sequential reference the batched paths are tested against).

#![forbid(unsafe_code)]

mod cdb;
mod constraint;
mod csb;
mod engine;
mod error;
mod exit;
mod kv;
mod reference;
mod request;
mod sequence;
mod stats;
mod step;
mod trace;

pub use constraint::{Constraint, MaskCounts, MaskStats};
pub use engine::{check_context, check_exit, Engine, EngineConfig, InjectedFault, Scheduler};
pub use error::EngineError;
pub use exit::{confidence, cosine, ExitKind, ExitPolicy, KvFill};
pub use kv::KvCounters;
pub use reference::generate_with_exits;
pub use request::{Event, EventSink, FinishReason, GenParams, Received, Request};
pub use stats::{EngineStats, PhaseTimes};
pub use trace::{oracle_depth, ExitTrace, TraceKey};
