//! A simulated engine: the real engine's requests, events and load figures without its
//! compute, so one process can run hundreds of workers behind the real router and coordinator.
//! Each step admits waiting requests while sequences and KV blocks allow (prompt blocks found
//! in the [`cache::BlockCache`] are hits and are not prefilled), runs every unit in flight
//! through one loop as the real engine's depth-wise batching does (a prompt chunk through
//! every loop, a decoded token until the exit loop drawn for it), and takes the time the
//! [`cost::CostModel`] gives for that step's shape (sleeping it, or advancing a virtual clock in
//! tests). Tokens are random ids; what is modelled is when they come and how deep they go.

pub mod cache;
pub mod cost;

use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rrt_engine::{EngineStats, Event, ExitKind, ExitPolicy, FinishReason, KvCounters, Request};
use rrt_model::kv::PoolStats;
use rrt_model::{ModelShape, Tokenizer};

use crate::actor::Snapshot;
use crate::backend::Backend;
use cache::{block_hashes, BlockCache};
pub use cost::{CostModel, StepShape};

/// The shape and tokenizer of the model directory `dir`, read once per process: hundreds of
/// simulated workers in one process share one tokenizer.
pub fn shape_of(dir: &Path) -> rrt_model::Result<(ModelShape, Arc<Tokenizer>)> {
    type Shapes = Mutex<HashMap<PathBuf, (ModelShape, Arc<Tokenizer>)>>;
    static SHAPES: OnceLock<Shapes> = OnceLock::new();
    let shapes = SHAPES.get_or_init(Default::default);
    if let Some(found) = shapes.lock().unwrap_or_else(|p| p.into_inner()).get(dir) {
        return Ok(found.clone());
    }
    let (shape, tokenizer) = rrt_model::load_shape(dir)?;
    let entry = (shape, Arc::new(tokenizer));
    shapes
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(dir.to_path_buf(), entry.clone());
    Ok(entry)
}

/// How a step's time passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Clock {
    /// The engine thread sleeps the modelled time (serving).
    Real,
    /// The time is only added up (tests).
    Virtual,
}

#[derive(Debug, Clone)]
pub struct SimConfig {
    pub cost: CostModel,
    /// Loops of the modelled recursive model.
    pub loops: usize,
    /// Tokens per KV block.
    pub block_tokens: usize,
    pub kv_blocks: usize,
    pub max_sequences: usize,
    /// Prompt rows one step runs at most (chunked prefill).
    pub prefill_chunk: usize,
    /// Probability that a token exits after loop `i + 1` (the rest exit after the last), when
    /// the model has no threshold curves.
    pub exit_probs: Vec<f64>,
    /// The model's measured exit trade-off (per threshold: each exit's rate, or the exits
    /// together): with it a token leaves at each exit with
    /// [`rrt_proto::exits::ExitTradeoff::exit_chances`] at its policy's threshold (so moving
    /// the default threshold moves the depths, as on a real worker), and a policy of `None`
    /// runs every loop.
    pub exits: rrt_proto::exits::ExitTradeoff,
    /// The exit policy of requests that name none; its threshold follows
    /// [`Backend::set_default_threshold`].
    pub default_exit: ExitPolicy,
    /// Share of request classes (by the hash of their first prompt block) whose tokens go one
    /// loop deeper than the distribution says: "hard" prompts.
    pub hard_share: f64,
    /// Speed relative to the cost model (2.0: steps take half the time).
    pub speed: f64,
    pub seed: u64,
    pub clock: Clock,
    /// Random token ids are drawn below this.
    pub vocab: u32,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            cost: CostModel::default(),
            loops: 2,
            block_tokens: 16,
            kv_blocks: 4096,
            max_sequences: 64,
            prefill_chunk: 256,
            exit_probs: vec![0.5],
            exits: Default::default(),
            default_exit: ExitPolicy::NONE,
            hard_share: 0.0,
            speed: 1.0,
            seed: 0,
            clock: Clock::Real,
            vocab: 49_152,
        }
    }
}

struct Seq {
    req: Request,
    /// Chained hashes of the prompt's full blocks.
    blocks: Vec<u64>,
    /// Leading blocks found in the cache (pinned while the sequence runs).
    hits: usize,
    /// Blocks taken for its own tokens.
    own: usize,
    prompt_left: usize,
    kv_len: usize,
    generated: usize,
    /// Extra loops per token (hard class).
    deeper: usize,
    /// Whether it was admitted once (a preempted sequence is not announced again).
    admitted: bool,
    /// The unit in the block: its rows (a prompt chunk, or the one token being decoded),
    /// loops it has run, loops it runs in all (0: none in flight).
    unit_len: usize,
    unit_loops: usize,
    unit_depth: usize,
    done: bool,
}

impl Seq {
    fn new(req: Request, block_tokens: usize, hard_share: f64) -> Self {
        let blocks = block_hashes(&req.prompt, block_tokens);
        let class = {
            let mut h = std::hash::DefaultHasher::new();
            req.prompt[..req.prompt.len().min(block_tokens)].hash(&mut h);
            h.finish()
        };
        let hard = (class % 10_000) as f64 / 10_000.0 < hard_share;
        Self {
            prompt_left: req.prompt.len(),
            req,
            blocks,
            hits: 0,
            own: 0,
            kv_len: 0,
            generated: 0,
            deeper: hard as usize,
            admitted: false,
            unit_len: 0,
            unit_loops: 0,
            unit_depth: 0,
            done: false,
        }
    }

    /// Blocks for `tokens` tokens of KV.
    fn blocks_for(tokens: usize, block: usize) -> usize {
        tokens.div_ceil(block.max(1))
    }

    /// Tokens its KV covers once computed: the prompt and what was generated (a preempted
    /// sequence recomputes both).
    fn context(&self) -> usize {
        self.req.prompt.len() + self.generated
    }

    /// Hashes of the full prompt blocks whose KV it has computed (what a cache can keep).
    fn computed_blocks(&self, block: usize) -> &[u64] {
        &self.blocks[..(self.kv_len / block.max(1)).min(self.blocks.len())]
    }
}

pub struct SimEngine {
    cfg: SimConfig,
    waiting: VecDeque<Seq>,
    running: Vec<Seq>,
    cache: BlockCache,
    stats: EngineStats,
    counters: KvCounters,
    rng: StdRng,
    /// Modelled seconds of every step so far.
    pub elapsed: f64,
    started: Instant,
}

impl SimEngine {
    pub fn new(cfg: SimConfig) -> Self {
        Self {
            cache: BlockCache::new(cfg.kv_blocks),
            rng: StdRng::seed_from_u64(cfg.seed),
            cfg,
            waiting: VecDeque::new(),
            running: Vec::new(),
            stats: EngineStats::default(),
            counters: KvCounters::default(),
            elapsed: 0.0,
            started: Instant::now(),
        }
    }

    /// The engine's clock in seconds: wall time when steps sleep, modelled time in tests.
    fn now(&self) -> f64 {
        match self.cfg.clock {
            Clock::Real => self.started.elapsed().as_secs_f64(),
            Clock::Virtual => self.elapsed,
        }
    }

    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    pub fn kv_counters(&self) -> KvCounters {
        self.counters
    }

    /// The loop a token exits after.
    fn draw_exit(&mut self, seq: &Seq) -> usize {
        let loops = self.cfg.loops.max(1);
        if !self.cfg.exits.is_empty() {
            let policy = seq.req.exit.unwrap_or(self.cfg.default_exit);
            if policy.kind == ExitKind::None {
                return loops;
            }
            let chances = self.cfg.exits.exit_chances(policy.threshold, loops);
            for (i, chance) in chances.enumerate() {
                if self.rng.random::<f64>() < chance {
                    return (i + 1 + seq.deeper).min(loops);
                }
            }
            return loops;
        }
        if seq
            .req
            .exit
            .as_ref()
            .is_some_and(|e| e.kind == ExitKind::None)
        {
            return loops;
        }
        let u: f64 = self.rng.random();
        let mut acc = 0.0;
        let mut depth = loops;
        for (i, p) in self.cfg.exit_probs.iter().enumerate().take(loops - 1) {
            acc += p;
            if u < acc {
                depth = i + 1;
                break;
            }
        }
        (depth + seq.deeper).min(loops)
    }

    fn drop_cancelled(&mut self) {
        let before = self.waiting.len();
        self.waiting.retain(|s| !s.req.events.is_closed());
        let mut cancelled = before - self.waiting.len();
        for s in self.running.iter_mut() {
            if !s.done && s.req.events.is_closed() {
                s.done = true;
                cancelled += 1;
            }
        }
        self.stats.cancelled += cancelled as u64;
    }

    /// Admits waiting requests in order while a sequence slot and the blocks for the prompt
    /// they must compute (plus the first token) are there.
    fn admit(&mut self) {
        let bt = self.cfg.block_tokens;
        while self.running.len() < self.cfg.max_sequences {
            let Some(seq) = self.waiting.front() else {
                break;
            };
            let hits = self.cache.lookup(&seq.blocks);
            let need = Seq::blocks_for(seq.context() + 1, bt).saturating_sub(hits);
            if !self.cache.can_take(need, &seq.blocks[..hits]) {
                break;
            }
            let Some(mut seq) = self.waiting.pop_front() else {
                break;
            };
            self.cache.pin(&seq.blocks[..hits]);
            if !self.cache.take(need) {
                // can_take said yes: only a bookkeeping bug gets here; keep the request.
                let now = self.now();
                self.cache.release(0, &seq.blocks[..hits], &[], now);
                self.waiting.push_front(seq);
                break;
            }
            let cached = hits * bt;
            seq.hits = hits;
            seq.own = need;
            seq.kv_len = cached;
            seq.prompt_left = seq.context() - cached;
            self.counters.queried_tokens += seq.context() as u64;
            self.counters.hit_tokens += cached as u64;
            self.counters.prefill_tokens += seq.prompt_left as u64;
            let first = !std::mem::replace(&mut seq.admitted, true);
            if first
                && !seq.req.events.send(Event::Admitted {
                    cached_tokens: cached,
                })
            {
                // The receiver is gone: cancelled (its blocks go back at the next retire).
                seq.done = true;
                self.stats.cancelled += 1;
            }
            self.running.push(seq);
        }
    }

    /// Done sequences give their blocks back; the prompt blocks they computed stay cached.
    fn retire(&mut self) {
        let (now, bt) = (self.now(), self.cfg.block_tokens);
        let cache = &mut self.cache;
        self.running.retain(|s| {
            if s.done {
                cache.release(s.own, &s.blocks[..s.hits], s.computed_blocks(bt), now);
            }
            !s.done
        });
    }

    /// Gives every running sequence about to decode the block its next token needs, oldest
    /// first; when the pool runs out, the latest admitted running sequence gives its blocks
    /// back (its computed prompt blocks cached) and waits at the front of the queue to be
    /// recomputed, prompt and generated tokens, as the real engine preempts.
    fn make_room(&mut self) {
        let bt = self.cfg.block_tokens;
        let now = self.now();
        let mut i = 0;
        while i < self.running.len() {
            let s = &self.running[i];
            let need = if s.done || s.prompt_left > 0 || s.unit_depth > 0 {
                0
            } else {
                Seq::blocks_for(s.kv_len + 1, bt).saturating_sub(s.hits + s.own)
            };
            if need == 0 || self.cache.take(need) {
                self.running[i].own += need;
                i += 1;
                continue;
            }
            // The latest admitted sequence still running makes room (this one, last).
            let Some(v) = (i..self.running.len())
                .rev()
                .find(|&v| !self.running[v].done)
            else {
                break;
            };
            let mut victim = self.running.remove(v);
            self.cache.release(
                victim.own,
                &victim.blocks[..victim.hits],
                victim.computed_blocks(bt),
                now,
            );
            (victim.hits, victim.own, victim.kv_len) = (0, 0, 0);
            (victim.unit_len, victim.unit_loops, victim.unit_depth) = (0, 0, 0);
            victim.prompt_left = victim.context();
            self.counters.preemptions += 1;
            self.waiting.push_front(victim);
            // Then the same sequence tries again (or, if it was the victim, the next one).
        }
    }

    /// One step of depth-wise batching, as the real engine's CDB scheduler runs it: every
    /// unit in flight (a prompt chunk, or one token being decoded) goes through the shared
    /// block once, at whatever loop it is. A prompt chunk runs every loop; a decoded token
    /// leaves after the loop drawn for it and its sequence's next token enters the next step.
    /// Returns the step's shape.
    fn run_batch(&mut self) -> StepShape {
        let (loops, bt) = (self.cfg.loops.max(1), self.cfg.block_tokens);
        let mut shape = StepShape::default();
        let mut running = std::mem::take(&mut self.running);
        // Units already in flight first (decode rows come first in the real engine too), then
        // new prompt chunks while the step has rows left.
        let mut rows_left = self.cfg.prefill_chunk.max(1);
        let mut ran = vec![false; running.len()];
        for pass in 0..2 {
            for (i, seq) in running.iter_mut().enumerate() {
                let starting = seq.unit_depth == 0;
                if seq.done || ran[i] || starting != (pass == 1) {
                    continue;
                }
                if starting {
                    if seq.prompt_left > 0 {
                        let take = seq.prompt_left.min(rows_left);
                        if take == 0 {
                            continue;
                        }
                        (seq.unit_len, seq.unit_depth) = (take, loops);
                    } else {
                        // Its KV block is there ([`Self::make_room`]).
                        if Seq::blocks_for(seq.kv_len + 1, bt) > seq.hits + seq.own {
                            continue;
                        }
                        let depth = self.draw_exit(seq);
                        (seq.unit_len, seq.unit_depth) = (1, depth);
                    }
                    seq.unit_loops = 0;
                }
                ran[i] = true;
                let len = seq.unit_len;
                rows_left = rows_left.saturating_sub(len);
                shape.loop_rows += len as f64;
                if seq.prompt_left > 0 {
                    shape.prompt_rows += len as f64;
                }
                shape.kv_rows_k += len as f64 * (seq.kv_len + len.div_ceil(2)) as f64 / 1e3;
                seq.unit_loops += 1;
                if seq.unit_loops < seq.unit_depth {
                    // The exit head (or classifier) looks at a decoded token after each loop.
                    if seq.prompt_left == 0 {
                        shape.head_rows += 1.0;
                    }
                    continue;
                }
                // The unit leaves the block.
                let depth = seq.unit_depth;
                seq.unit_depth = 0;
                shape.head_rows += 1.0;
                if seq.prompt_left > 0 {
                    seq.prompt_left -= len;
                    seq.kv_len += len;
                    if seq.prompt_left > 0 {
                        continue;
                    }
                } else {
                    seq.kv_len += 1;
                }
                self.emit(seq, depth);
            }
        }
        self.running = running;
        shape
    }

    /// Streams a sequence's next token (exited after `depth` loops); finishes it at its
    /// max_new_tokens, cancels it when the receiver is gone.
    fn emit(&mut self, seq: &mut Seq, depth: usize) {
        let token = self.rng.random_range(256..self.cfg.vocab.max(257));
        seq.generated += 1;
        if self.stats.exit_histogram.len() < depth {
            self.stats.exit_histogram.resize(depth, 0);
        }
        self.stats.exit_histogram[depth - 1] += 1;
        self.stats.tokens += 1;
        let sent = seq.req.events.send(Event::Token {
            token,
            exit_loop: depth,
            logprob: None,
            argmax: None,
        });
        if !sent {
            seq.done = true;
            self.stats.cancelled += 1;
        } else if seq.generated >= seq.req.params.max_new_tokens {
            seq.req.events.send(Event::Finished {
                reason: FinishReason::Length,
                generated: seq.generated,
            });
            seq.done = true;
        }
    }

    /// Tokens left to generate and prompt tokens not yet run, over waiting and running.
    pub fn pending_work(&self) -> (usize, usize) {
        let all = self.waiting.iter().chain(self.running.iter());
        all.filter(|s| !s.done).fold((0, 0), |(n, p), s| {
            (
                n + s.req.params.max_new_tokens.saturating_sub(s.generated),
                p + s.prompt_left,
            )
        })
    }
}

impl Backend for SimEngine {
    fn submit(&mut self, req: Request) {
        // A request must be able to finish alone, so running out of blocks only ever delays
        // (the real engine's check).
        let (bt, total) = (self.cfg.block_tokens, self.cache.total());
        let needed = Seq::blocks_for(req.prompt.len() + req.params.max_new_tokens, bt);
        if needed > total {
            req.events
                .send(Event::Failed(rrt_engine::EngineError::Invalid(format!(
                "prompt of {} tokens plus {} new tokens needs {needed} KV blocks of {bt} tokens; \
                 the simulated worker's whole pool is {total}",
                req.prompt.len(),
                req.params.max_new_tokens
            ))));
            return;
        }
        let seq = Seq::new(req, self.cfg.block_tokens, self.cfg.hard_share);
        self.waiting.push_back(seq);
    }

    fn step(&mut self) -> usize {
        self.drop_cancelled();
        self.retire();
        self.admit();
        self.make_room();
        self.stats.steps += 1;
        let shape = self.run_batch();
        self.stats.loop_rows += shape.loop_rows as u64;
        self.stats.head_rows += shape.head_rows as u64;
        let seconds = self.cfg.cost.seconds(&shape) / self.cfg.speed.max(1e-6);
        self.elapsed += seconds;
        if self.cfg.clock == Clock::Real && seconds > 0.0 {
            std::thread::sleep(Duration::from_secs_f64(seconds));
        }
        self.retire();
        shape.loop_rows as usize
    }

    fn pending(&self) -> usize {
        self.waiting.len() + self.running.len()
    }

    fn failed_steps(&self) -> u64 {
        0
    }

    fn set_default_threshold(&mut self, threshold: f32) {
        if !threshold.is_nan() {
            self.cfg.default_exit.threshold = threshold.clamp(0.0, 1.0);
        }
    }

    fn snapshot(&self, busy_seconds: f64) -> Snapshot {
        let (pending_new_tokens, pending_prompt_tokens) = self.pending_work();
        Snapshot {
            queue_length: self.waiting.len(),
            running: self.running.len(),
            kv_bytes_used: 0,
            kv_bytes_budget: 0,
            kv_blocks: PoolStats {
                total: self.cache.total(),
                used: self.cache.used(),
                cached: self.cache.cached(),
                evictable: self.cache.evictable(),
                evictions: self.cache.evictions,
                horizon: self.cache.horizon(self.now()).map(Duration::from_secs_f64),
            },
            kv_counters: self.counters,
            pending_new_tokens,
            pending_prompt_tokens,
            stats: self.stats.clone(),
            masks: Default::default(),
            busy_seconds,
        }
    }
}

#[cfg(test)]
mod tests;
