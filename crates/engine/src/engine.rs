//! The engine: admission under a KV budget, then one batch per [`Engine::step`] by the chosen
//! scheduler, then retiring what finished. Plain state, no threads or async inside: a worker
//! owns it on a compute thread.

use std::collections::VecDeque;

use rrt_model::{Llama, Sampler};

use crate::error::EngineError;
use crate::exit::{ExitKind, ExitPolicy, KvFill};
use crate::request::{Event, Request};
use crate::sequence::{Seq, Stage};
use crate::stats::EngineStats;
use crate::step::StepCtx;
use crate::trace::ExitTrace;

/// How decode batches are formed (see the crate docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheduler {
    Static,
    Csb,
    Cdb,
}

#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub scheduler: Scheduler,
    /// Rows (tokens) one step may run: decode rows first, prefill chunks fill the rest.
    pub max_batch_rows: usize,
    /// Sequences running at once.
    pub max_sequences: usize,
    /// KV cache bytes all running sequences may reserve (prompt + max new tokens, every loop).
    pub kv_budget_bytes: usize,
    /// Exit policy of requests that name none (depth-wise batching only).
    pub default_exit: ExitPolicy,
    /// How exited tokens' skipped K/V are filled.
    pub kv_fill: KvFill,
    /// Test knob: a failure injected into one forward step (fault-tolerance tests).
    pub fault: Option<InjectedFault>,
}

/// A failure [`Engine::step`] injects at step `at_step` (1-based), in place of its forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InjectedFault {
    pub at_step: u64,
    /// `true`: the step panics; `false`: its forward returns an error.
    pub panic: bool,
}

impl std::str::FromStr for InjectedFault {
    type Err = String;

    /// `error@N` or `panic@N`.
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("expected error@STEP or panic@STEP, got {s:?}");
        let (kind, step) = s.split_once('@').ok_or_else(bad)?;
        let at_step = step.parse().map_err(|_| bad())?;
        let panic = match kind {
            "error" => false,
            "panic" => true,
            _ => return Err(bad()),
        };
        Ok(Self { at_step, panic })
    }
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            scheduler: Scheduler::Cdb,
            max_batch_rows: 512,
            max_sequences: 64,
            kv_budget_bytes: 4 << 30,
            default_exit: ExitPolicy::NONE,
            kv_fill: KvFill::Propagate,
            fault: None,
        }
    }
}

pub struct Engine {
    model: Llama,
    cfg: EngineConfig,
    waiting: VecDeque<Request>,
    running: Vec<Seq>,
    kv_reserved: usize,
    /// Exit depths replayed by [`crate::ExitKind::Replay`] and written by
    /// [`crate::ExitKind::Oracle`].
    trace: ExitTrace,
    stats: EngineStats,
}

impl Engine {
    pub fn new(model: Llama, cfg: EngineConfig) -> Self {
        Self {
            model,
            cfg,
            waiting: VecDeque::new(),
            running: Vec::new(),
            kv_reserved: 0,
            trace: ExitTrace::default(),
            stats: EngineStats::default(),
        }
    }

    pub fn trace(&self) -> &ExitTrace {
        &self.trace
    }

    /// Sets the trace that [`crate::ExitKind::Replay`] requests follow.
    pub fn set_trace(&mut self, trace: ExitTrace) {
        self.trace = trace;
    }

    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    pub fn model(&self) -> &Llama {
        &self.model
    }

    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// Queues a request, or fails it at once (through its channel) if it can never run.
    pub fn submit(&mut self, req: Request) {
        match self.check(&req) {
            Ok(()) => self.waiting.push_back(req),
            Err(e) => {
                req.events.send(Event::Failed(e));
            }
        }
    }

    fn kv_needed(&self, req: &Request) -> usize {
        (req.prompt.len() + req.params.max_new_tokens) * self.model.cfg.kv_bytes_per_token()
    }

    fn check(&self, req: &Request) -> Result<(), EngineError> {
        if req.prompt.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        let context = self.model.cfg.max_position_embeddings;
        if req.prompt.len() + req.params.max_new_tokens > context {
            return Err(EngineError::TooLong {
                prompt: req.prompt.len(),
                max_new: req.params.max_new_tokens,
                context,
            });
        }
        let needed = self.kv_needed(req);
        if needed > self.cfg.kv_budget_bytes {
            return Err(EngineError::KvBudget {
                needed,
                budget: self.cfg.kv_budget_bytes,
            });
        }
        let exit = req.exit.unwrap_or(self.cfg.default_exit);
        if exit.kind == ExitKind::Learned && self.model.exit_heads.is_none() {
            return Err(EngineError::Invalid(
                "learned exits need a model with exit heads (train them with `rrt uptrain --train exit`)".into(),
            ));
        }
        if let Some(&bad) = req
            .prompt
            .iter()
            .chain(&req.params.forced)
            .find(|&&t| t as usize >= self.model.cfg.vocab_size)
        {
            return Err(EngineError::Invalid(format!(
                "token id {bad} is outside the vocabulary"
            )));
        }
        req.params
            .sampling
            .validate()
            .map_err(|e| EngineError::Invalid(e.to_string()))
    }

    /// Waiting plus running requests.
    pub fn pending(&self) -> usize {
        self.waiting.len() + self.running.len()
    }

    pub fn kv_reserved_bytes(&self) -> usize {
        self.kv_reserved
    }

    /// Requests waiting for admission.
    pub fn queue_len(&self) -> usize {
        self.waiting.len()
    }

    /// Sequences admitted and not finished.
    pub fn running_len(&self) -> usize {
        self.running.len()
    }

    /// Work not done yet: `(tokens still to generate, prompt tokens not yet run)` over waiting
    /// and running requests (generation counted to max tokens: an upper bound).
    pub fn pending_work(&self) -> (usize, usize) {
        let waiting = self.waiting.iter().fold((0, 0), |(g, p), r| {
            (g + r.params.max_new_tokens, p + r.prompt.len())
        });
        self.running.iter().fold(waiting, |(g, p), s| {
            (
                g + s.params.max_new_tokens.saturating_sub(s.generated()),
                p + s.prompt_len.saturating_sub(s.computed),
            )
        })
    }

    /// Drops waiting requests whose receiver is gone and marks running ones done (their KV is
    /// freed at the end of the step; the step runs nothing for them).
    fn drop_cancelled(&mut self) {
        let before = self.waiting.len();
        self.waiting.retain(|r| !r.events.is_closed());
        let mut cancelled = before - self.waiting.len();
        for s in self.running.iter_mut() {
            if !s.is_done() && s.events.is_closed() {
                s.mark_done();
                cancelled += 1;
            }
        }
        self.stats.cancelled += cancelled as u64;
    }

    /// Moves waiting requests into the running set while sequences and KV allow (static
    /// batching only admits into an empty batch).
    fn admit(&mut self) {
        if self.cfg.scheduler == Scheduler::Static && !self.running.is_empty() {
            return;
        }
        while self.running.len() < self.cfg.max_sequences {
            let Some(needed) = self.waiting.front().map(|r| self.kv_needed(r)) else {
                break;
            };
            if self.kv_reserved + needed > self.cfg.kv_budget_bytes {
                break;
            }
            let Some(req) = self.waiting.pop_front() else {
                break;
            };
            let sampler = match Sampler::new(req.params.sampling.clone()) {
                Ok(s) => s,
                Err(e) => {
                    req.events.send(Event::Failed(e.into()));
                    continue;
                }
            };
            self.kv_reserved += needed;
            req.events.send(Event::Admitted);
            self.running.push(Seq {
                id: req.id,
                exit: req.exit.unwrap_or(self.cfg.default_exit),
                events: req.events,
                sampler,
                cache: self.model.new_cache(),
                prompt_len: req.prompt.len(),
                tokens: req.prompt,
                params: req.params,
                computed: 0,
                reserved: needed,
                stage: Stage::Ready,
                fill: None,
            });
        }
    }

    /// Admits, runs one batch, and retires finished or cancelled sequences (freeing their KV).
    /// Returns the rows the batch ran.
    pub fn step(&mut self) -> usize {
        self.drop_cancelled();
        self.admit();
        self.stats.steps += 1;
        let mut ctx = StepCtx {
            model: &self.model,
            cfg: &self.cfg,
            running: &mut self.running,
            trace: &mut self.trace,
            stats: &mut self.stats,
        };
        let rows = match self.cfg.fault {
            Some(f) if f.at_step == ctx.stats.steps && f.panic => {
                panic!("injected fault: panic in step {}", f.at_step)
            }
            Some(f) if f.at_step == ctx.stats.steps => Err(EngineError::Model(format!(
                "injected fault: error in step {}",
                f.at_step
            ))),
            _ => match self.cfg.scheduler {
                Scheduler::Static | Scheduler::Csb => crate::csb::step(&mut ctx),
                Scheduler::Cdb => crate::cdb::step(&mut ctx),
            },
        };
        let rows = rows.unwrap_or_else(|e| {
            // A failed forward fails the running sequences (their caches may be half-written)
            // as the engine's fault, not theirs: they may run again elsewhere. The engine
            // itself keeps serving new requests.
            tracing::error!("engine step failed: {e}");
            self.stats.failed_steps += 1;
            let failed = EngineError::StepFailed(e.to_string());
            for s in self.running.iter_mut().filter(|s| !s.is_done()) {
                s.emit(Event::Failed(failed.clone()));
                s.mark_done();
            }
            0
        });
        self.retire();
        rows
    }

    /// Removes the sequences that are done and returns their KV reservations.
    fn retire(&mut self) {
        let before = self.running.len();
        let mut freed = 0;
        self.running.retain(|s| {
            if s.is_done() {
                freed += s.reserved;
            }
            !s.is_done()
        });
        self.kv_reserved -= freed;
        if before != self.running.len() {
            tracing::debug!(left = before - self.running.len(), "sequences retired");
        }
    }

    /// Steps until every request has finished.
    pub fn run_until_idle(&mut self) {
        while self.pending() > 0 {
            self.step();
        }
    }
}
