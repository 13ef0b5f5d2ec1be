//! What a client asks for and what it gets back.

use std::sync::mpsc::Sender;

use rrt_model::SamplingParams;

use crate::error::EngineError;
use crate::exit::ExitPolicy;

/// Generation settings of one request.
#[derive(Debug, Clone)]
pub struct GenParams {
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Token ids that end generation (EOS); not emitted.
    pub stop_tokens: Vec<u32>,
}

/// One generation request. Events go to `events`; dropping the receiver cancels the request.
#[derive(Debug)]
pub struct Request {
    pub id: u64,
    pub prompt: Vec<u32>,
    pub params: GenParams,
    /// Early-exit policy; `None` takes the engine's default.
    pub exit: Option<ExitPolicy>,
    pub events: Sender<Event>,
}

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Length,
    Stop,
}

/// What a request receives, in order: tokens, then exactly one `Finished` or `Failed`.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Token {
        token: u32,
        /// The loop (1-based) after which the token was produced.
        exit_loop: usize,
    },
    Finished {
        reason: FinishReason,
        generated: usize,
    },
    Failed(EngineError),
}
