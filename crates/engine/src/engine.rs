//! The engine: admission by the KV blocks a request needs now (its prompt, less what the prefix
//! cache holds), then per [`Engine::step`]: room for every running sequence's next tokens
//! (preempting the least important when the pool runs out), one batch by the chosen scheduler,
//! sealing what was computed into the prefix cache, and retiring what finished. Plain state,
//! no async inside: a worker owns it on a compute thread (constrained requests' masks are
//! computed on one helper thread, [`crate::constraint`]).

use std::collections::VecDeque;
use std::sync::Arc;

use rrt_model::kv::{KvDtype, PoolStats};
use rrt_model::{Llama, Sampler};

use crate::constraint::{MaskCounts, MaskStats, MaskThread};
use crate::error::EngineError;
use crate::exit::{ExitKind, ExitPolicy, KvFill};
use crate::kv::{KvCounters, KvMemory};
use crate::request::{Event, Request};
use crate::sequence::Seq;
use crate::stats::EngineStats;
use crate::step::StepCtx;
use crate::trace::ExitTrace;

/// Admissions of requests behind a waiting one that does not fit, after which admission waits
/// for it (no request that fits waits behind one that does not, but none starves either).
const MAX_PASSED_OVER: usize = 64;

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
    /// Bytes of the KV block pool (every running sequence, every layer and loop).
    pub kv_budget_bytes: usize,
    /// Positions per KV block (a multiple of 16).
    pub kv_block_tokens: usize,
    pub kv_dtype: KvDtype,
    /// Reuse full KV blocks of earlier requests with the same token prefix.
    pub prefix_cache: bool,
    /// What the served model is (its name or path): part of every cached block's key.
    pub model_id: String,
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
            kv_block_tokens: rrt_model::kv::DEFAULT_BLOCK_TOKENS,
            kv_dtype: KvDtype::F32,
            prefix_cache: true,
            model_id: String::new(),
            default_exit: ExitPolicy::NONE,
            kv_fill: KvFill::Propagate,
            fault: None,
        }
    }
}

/// Whether a prompt of `prompt` tokens plus `max_new` new ones fits a context of `context`
/// (the engine checks it at submission; a server checks it before queueing, with the same words).
pub fn check_context(prompt: usize, max_new: usize, context: usize) -> Result<(), EngineError> {
    if prompt + max_new > context {
        return Err(EngineError::TooLong {
            prompt,
            max_new,
            context,
        });
    }
    Ok(())
}

/// Whether `scheduler` can honour an exit policy of `kind`: only depth-wise batching lets a
/// token leave early (the others run every token through every loop, so a policy would be
/// silently ignored).
pub fn check_exit(scheduler: Scheduler, kind: ExitKind) -> Result<(), EngineError> {
    if kind != ExitKind::None && scheduler != Scheduler::Cdb {
        return Err(EngineError::Invalid(format!(
            "an exit policy ({kind:?}) needs depth-wise batching (the cdb scheduler); the \
             {scheduler:?} scheduler runs every token through every loop"
        )));
    }
    Ok(())
}

pub struct Engine {
    model: Llama,
    cfg: EngineConfig,
    /// In order of service: priority, then arrival (preempted sequences keep theirs).
    waiting: VecDeque<Seq>,
    running: Vec<Seq>,
    kv: KvMemory,
    arrivals: u64,
    /// Exit depths replayed by [`crate::ExitKind::Replay`] and written by
    /// [`crate::ExitKind::Oracle`].
    trace: ExitTrace,
    stats: EngineStats,
    /// Computes constrained requests' masks (started with the first one).
    masks: Option<MaskThread>,
    mask_stats: Arc<MaskStats>,
}

impl Engine {
    /// An engine, or what is wrong with its settings (a KV budget that holds no block, a block
    /// size the kernels cannot read, an exit policy its scheduler ignores).
    pub fn new(model: Llama, cfg: EngineConfig) -> Result<Self, EngineError> {
        check_exit(cfg.scheduler, cfg.default_exit.kind)?;
        if cfg.max_sequences == 0 || cfg.max_batch_rows == 0 {
            return Err(EngineError::Invalid(
                "max sequences and max batch rows must be at least 1".into(),
            ));
        }
        Ok(Self {
            kv: KvMemory::new(&model, &cfg)?,
            model,
            cfg,
            waiting: VecDeque::new(),
            running: Vec::new(),
            arrivals: 0,
            trace: ExitTrace::default(),
            stats: EngineStats::default(),
            masks: None,
            mask_stats: Arc::default(),
        })
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

    /// The mask thread's counters (constrained decoding).
    pub fn mask_counts(&self) -> MaskCounts {
        self.mask_stats.counts()
    }

    fn mask_thread(&mut self) -> Result<&MaskThread, EngineError> {
        let t = match self.masks.take() {
            Some(t) => t,
            None => MaskThread::start(self.mask_stats.clone())
                .map_err(|e| EngineError::Model(format!("starting the mask thread: {e}")))?,
        };
        Ok(self.masks.insert(t))
    }

    /// Moves the default exit policy's threshold (load-adaptive exits): requests that named no
    /// policy, waiting and running, decide their next exits by it; requests that named one keep
    /// theirs. Clamped to [0, 1].
    pub fn set_default_threshold(&mut self, threshold: f32) {
        let t = if threshold.is_nan() {
            return;
        } else {
            threshold.clamp(0.0, 1.0)
        };
        self.cfg.default_exit.threshold = t;
        for s in self.waiting.iter_mut().chain(self.running.iter_mut()) {
            if s.follows_default {
                s.exit.threshold = t;
            }
        }
    }

    /// Queues a request, or fails it at once (through its channel) if it can never run.
    pub fn submit(&mut self, mut req: Request) {
        let checked = self.check(&req).and_then(|exit| {
            let sampler = Sampler::new(req.params.sampling.clone())?;
            Ok((exit, sampler))
        });
        let room = req.params.max_new_tokens;
        let checked = checked.and_then(|(exit, sampler)| {
            let constrained = match req.constraint.take() {
                Some(c) => Some(self.mask_thread()?.constrain(c, room).map_err(|e| {
                    EngineError::Invalid(format!("the output constraint failed: {e}"))
                })?),
                None => None,
            };
            Ok((exit, sampler, constrained))
        });
        match checked {
            Ok((exit, sampler, constrained)) => {
                self.arrivals += 1;
                let (constrained, forced, complete) = match constrained {
                    Some((c, f, done)) => (Some(c), f, done),
                    None => (None, Vec::new(), false),
                };
                let mut seq = Seq::new(req, sampler, exit, self.arrivals, constrained);
                // Tokens the grammar forces from the start are part of what the first prefill
                // computes; they are streamed at admission.
                seq.tokens.extend_from_slice(&forced);
                seq.opening = Some((forced, complete));
                self.enqueue(seq);
            }
            Err(e) => {
                req.events.send(Event::Failed(e));
            }
        }
    }

    /// Puts `seq` in the waiting queue at its place in the order of service.
    fn enqueue(&mut self, seq: Seq) {
        let key = (seq.priority, seq.arrival);
        let at = self
            .waiting
            .partition_point(|w| (w.priority, w.arrival) <= key);
        self.waiting.insert(at, seq);
    }

    /// What is wrong with a request that can never run; its exit policy otherwise.
    fn check(&self, req: &Request) -> Result<ExitPolicy, EngineError> {
        if req.prompt.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        check_context(
            req.prompt.len(),
            req.params.max_new_tokens,
            self.model.cfg.max_position_embeddings,
        )?;
        // A request must be able to finish alone, so running out of blocks only ever delays.
        let positions = req.prompt.len() + req.params.max_new_tokens;
        if positions > self.kv.capacity_tokens() {
            let layout = self.kv.layout();
            return Err(EngineError::KvBudget {
                prompt: req.prompt.len(),
                max_new: req.params.max_new_tokens,
                needed: layout.blocks_for(positions) * layout.block_bytes(),
                budget: self.kv.budget_bytes(),
            });
        }
        let exit = req.exit.unwrap_or(self.cfg.default_exit);
        check_exit(self.cfg.scheduler, exit.kind)?;
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
            .map_err(|e| EngineError::Invalid(e.to_string()))?;
        Ok(exit)
    }

    /// Waiting plus running requests.
    pub fn pending(&self) -> usize {
        self.waiting.len() + self.running.len()
    }

    /// Bytes of the KV blocks running sequences hold.
    pub fn kv_used_bytes(&self) -> usize {
        self.kv.used_bytes()
    }

    /// Bytes of the whole KV pool.
    pub fn kv_budget_bytes(&self) -> usize {
        self.kv.budget_bytes()
    }

    /// The KV pool's blocks: total, held, cached, evictable.
    pub fn kv_blocks(&self) -> PoolStats {
        self.kv.stats()
    }

    /// Prefix-cache lookups and hits, prompt tokens computed, preemptions.
    pub fn kv_counters(&self) -> KvCounters {
        self.kv.counters
    }

    /// Ids of the waiting requests, in order of service (preempted ones among them).
    pub fn waiting_ids(&self) -> Vec<u64> {
        self.waiting.iter().map(|s| s.id).collect()
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
        self.waiting
            .iter()
            .chain(&self.running)
            .fold((0, 0), |(g, p), s| {
                let prompt = s.prompt_len.max(s.recompute_until);
                (
                    g + s.params.max_new_tokens.saturating_sub(s.generated()),
                    p + prompt.saturating_sub(s.computed),
                )
            })
    }

    /// Drops waiting requests whose receiver is gone and marks running ones done (their KV is
    /// freed at the end of the step; the step runs nothing for them).
    fn drop_cancelled(&mut self) {
        let before = self.waiting.len();
        self.waiting.retain(|s| !s.events.is_closed());
        let mut cancelled = before - self.waiting.len();
        for s in self.running.iter_mut() {
            if !s.is_done() && s.events.is_closed() {
                s.mark_done();
                cancelled += 1;
            }
        }
        self.stats.cancelled += cancelled as u64;
    }

    /// Moves waiting sequences into the running set, in order of service, while sequences and
    /// blocks allow: each takes its cached prefix and blocks for its tokens now, not for its
    /// worst case. One that does not fit is passed over by later ones that do, up to
    /// [`MAX_PASSED_OVER`] times; one whose prefix a running sequence is computing waits for
    /// it to be cached. Static batching only admits into an empty batch.
    fn admit(&mut self) {
        if self.cfg.scheduler == Scheduler::Static && !self.running.is_empty() {
            return;
        }
        let mut i = 0;
        while i < self.waiting.len() && self.running.len() < self.cfg.max_sequences {
            let adm = self.kv.plan_admission(&self.waiting[i]);
            if self.cfg.scheduler != Scheduler::Static
                && self
                    .kv
                    .prefix_in_flight(&self.waiting[i], adm.hit_blocks(), &self.running)
            {
                i += 1;
                continue;
            }
            // A hundredth of the pool stays free for the running sequences' next blocks (as
            // vLLM's watermark), so an admission does not force a preemption a step later.
            let watermark = if self.running.is_empty() {
                0
            } else {
                self.kv.total_blocks() / 100
            };
            if adm.takes + watermark > self.kv.available() {
                if self.waiting[i].passed_over >= MAX_PASSED_OVER {
                    break;
                }
                i += 1;
                continue;
            }
            let Some(mut seq) = self.waiting.remove(i) else {
                break;
            };
            // Everything before `i` did not fit and is passed over by this one.
            for w in self.waiting.range_mut(..i) {
                w.passed_over += 1;
            }
            if let Err(e) = self.kv.admit(&mut seq, adm) {
                seq.emit(Event::Failed(e));
                continue;
            }
            if seq.cached_tokens.is_none() {
                let cached_tokens = seq.computed;
                seq.cached_tokens = Some(cached_tokens);
                seq.emit(Event::Admitted { cached_tokens });
                let loops = self.model.loops();
                for _ in 0..seq.stream_opening(loops) {
                    self.stats.count_exit(loops);
                }
            }
            self.running.push(seq);
        }
    }

    /// Gives every running sequence blocks for its tokens, most important first; when the pool
    /// runs out, the least important running sequence (highest priority value, latest
    /// arrival) gives its blocks back and waits to be recomputed from its tokens (its sealed
    /// prefix likely still cached), as vLLM preempts.
    fn make_room(&mut self) {
        let mut order: Vec<usize> = (0..self.running.len()).collect();
        order.sort_by_key(|&i| (self.running[i].priority, self.running[i].arrival));
        let mut preempted = vec![false; self.running.len()];
        for (rank, &i) in order.iter().enumerate() {
            if preempted[i] || self.running[i].is_done() {
                continue;
            }
            while !self.kv.grow(&mut self.running[i]) {
                let victim = order[rank..]
                    .iter()
                    .rev()
                    .copied()
                    .find(|&v| !preempted[v] && !self.running[v].is_done());
                let Some(v) = victim else { break };
                preempted[v] = true;
                self.kv.release(&mut self.running[v]);
                self.kv.counters.preemptions += 1;
                if v == i {
                    break;
                }
            }
        }
        if preempted.iter().any(|&p| p) {
            let running = std::mem::take(&mut self.running);
            for (mut s, p) in running.into_iter().zip(preempted) {
                if p {
                    tracing::debug!(id = s.id, tokens = s.tokens.len(), "preempted");
                    s.preempted();
                    self.enqueue(s);
                } else {
                    self.running.push(s);
                }
            }
        }
    }

    /// Admits, makes room, runs one batch, seals what was computed, and retires finished or
    /// cancelled sequences (freeing their KV). Returns the rows the batch ran.
    pub fn step(&mut self) -> usize {
        self.drop_cancelled();
        // Cancelled sequences give their blocks back before anything is admitted or grown.
        self.retire();
        self.admit();
        self.make_room();
        self.stats.steps += 1;
        let mut ctx = StepCtx {
            model: &self.model,
            cfg: &self.cfg,
            running: &mut self.running,
            kv: self.kv.pool(),
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
            // A failed forward fails the running sequences (their caches may be half-written,
            // so nothing of them is sealed) as the engine's fault, not theirs: they may run
            // again elsewhere. The engine itself keeps serving new requests.
            tracing::error!("engine step failed: {e}");
            self.stats.failed_steps += 1;
            let failed = EngineError::StepFailed(e.to_string());
            for s in self.running.iter_mut() {
                self.kv.pool().release(&mut s.kv);
                if !s.is_done() {
                    s.emit(Event::Failed(failed.clone()));
                    s.mark_done();
                }
            }
            0
        });
        for s in self.running.iter_mut() {
            self.kv.seal(s);
        }
        self.retire();
        rows
    }

    /// Removes the sequences that are done and gives their blocks back.
    fn retire(&mut self) {
        let before = self.running.len();
        let kv = &mut self.kv;
        self.running.retain_mut(|s| {
            if s.is_done() {
                kv.release(s);
            }
            !s.is_done()
        });
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
