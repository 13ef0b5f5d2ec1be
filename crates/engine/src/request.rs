//! What a client asks for and what it gets back.

use std::sync::mpsc::{channel, Receiver};

use rrt_model::SamplingParams;

use crate::constraint::Constraint;
use crate::error::EngineError;
use crate::exit::ExitPolicy;

/// Generation settings of one request.
#[derive(Debug, Clone)]
pub struct GenParams {
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Token ids that end generation (EOS); not emitted.
    pub stop_tokens: Vec<u32>,
    /// Teacher forcing (scoring a known text): generated token `i` is `forced[i]` instead of a
    /// sample while there is one; exits and K/V behave as in generation.
    pub forced: Vec<u32>,
    /// Report each token's log-probability under the logits it was chosen from (the exit
    /// loop's head, before sampling settings) and their argmax: one pass over the vocabulary
    /// per token.
    pub logprobs: bool,
}

impl Default for GenParams {
    fn default() -> Self {
        Self {
            max_new_tokens: 16,
            sampling: SamplingParams::default(),
            stop_tokens: Vec::new(),
            forced: Vec::new(),
            logprobs: false,
        }
    }
}

/// One generation request. Events go to `events`; dropping the receiver cancels the request.
pub struct Request {
    pub id: u64,
    pub prompt: Vec<u32>,
    pub params: GenParams,
    /// Early-exit policy; `None` takes the engine's default.
    pub exit: Option<ExitPolicy>,
    /// Lower is served first and preempted last (vLLM's convention); 0 by default.
    pub priority: i32,
    /// What the generated tokens must follow (a grammar), if anything.
    pub constraint: Option<Box<dyn Constraint>>,
    pub events: Box<dyn EventSink>,
}

impl Request {
    /// A request whose events go to a new std channel, and the receiver to read them from
    /// (benchmarks, scoring, tests: everything that drives an engine synchronously).
    pub fn with_channel(
        id: u64,
        prompt: Vec<u32>,
        params: GenParams,
        exit: Option<ExitPolicy>,
    ) -> (Self, Receiver<Event>) {
        let (tx, rx) = channel();
        let events = Box::new(tx);
        let req = Self {
            id,
            prompt,
            params,
            exit,
            priority: 0,
            constraint: None,
            events,
        };
        (req, rx)
    }
}

/// Everything a request received, collected from its channel after it ended.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Received {
    pub tokens: Vec<u32>,
    /// The loop each token exited after.
    pub exit_loops: Vec<usize>,
    /// One per token when the request asked for logprobs.
    pub logprobs: Vec<f32>,
    /// The greedy choice behind each token, when the request asked for logprobs.
    pub argmaxes: Vec<u32>,
    pub finish: Option<FinishReason>,
    /// Prompt tokens the prefix cache held at admission.
    pub cached_tokens: Option<usize>,
}

impl Received {
    /// Drains the events waiting in `rx`; the request's failure, if it failed.
    pub fn drain(rx: &Receiver<Event>) -> Result<Self, EngineError> {
        let mut r = Self::default();
        for event in rx.try_iter() {
            match event {
                Event::Token {
                    token,
                    exit_loop,
                    logprob,
                    argmax,
                } => {
                    r.tokens.push(token);
                    r.exit_loops.push(exit_loop);
                    r.logprobs.extend(logprob);
                    r.argmaxes.extend(argmax);
                }
                Event::Admitted { cached_tokens } => r.cached_tokens = Some(cached_tokens),
                Event::Finished { reason, .. } => r.finish = Some(reason),
                Event::Failed(e) => return Err(e),
            }
        }
        Ok(r)
    }

    /// `(token, exit loop)` pairs.
    pub fn pairs(&self) -> Vec<(u32, usize)> {
        self.tokens
            .iter()
            .copied()
            .zip(self.exit_loops.iter().copied())
            .collect()
    }
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Request")
            .field("id", &self.id)
            .field("prompt_tokens", &self.prompt.len())
            .field("params", &self.params)
            .field("exit", &self.exit)
            .field("priority", &self.priority)
            .field("constrained", &self.constraint.is_some())
            .finish_non_exhaustive()
    }
}

/// Where a request's events go: a std channel (tests, benchmarks) or an async channel of a
/// server, without the engine knowing about async runtimes.
pub trait EventSink: Send {
    /// Delivers an event; `false` when the receiver is gone (the request is cancelled).
    fn send(&self, event: Event) -> bool;
    /// Whether the receiver is gone; checked every step, so cancelled requests leave the queue
    /// and free their KV without waiting for their next token.
    fn is_closed(&self) -> bool {
        false
    }
}

impl EventSink for std::sync::mpsc::Sender<Event> {
    fn send(&self, event: Event) -> bool {
        std::sync::mpsc::Sender::send(self, event).is_ok()
    }
}

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Length,
    Stop,
}

/// What a request receives, in order: `Admitted`, tokens, then exactly one `Finished` or
/// `Failed` (a request refused before it ran gets only `Failed`).
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The request left the waiting queue (the first time: a preempted request is not admitted
    /// again in its events): its prefill runs from the next step, minus `cached_tokens` prompt
    /// tokens found in the prefix cache.
    Admitted {
        cached_tokens: usize,
    },
    Token {
        token: u32,
        /// The loop (1-based) after which the token was produced.
        exit_loop: usize,
        /// Natural-log probability of the token ([`GenParams::logprobs`]).
        logprob: Option<f32>,
        /// The greedy choice of the same logits ([`GenParams::logprobs`]): under teacher
        /// forcing, whether the exit loop would have predicted the text.
        argmax: Option<u32>,
    },
    Finished {
        reason: FinishReason,
        generated: usize,
    },
    Failed(EngineError),
}
