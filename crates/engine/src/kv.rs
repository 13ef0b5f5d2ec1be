//! The engine's KV memory: one pool of blocks sized by the budget, the prefix cache over it,
//! and the counters the worker exports. It knows blocks and sequences' tokens, not scheduling:
//! the engine asks what a waiting sequence would take ([`KvMemory::plan_admission`]), gives
//! it those blocks ([`KvMemory::admit`]), grows running sequences ([`KvMemory::grow`]), seals
//! what they computed ([`KvMemory::seal`]) and takes their blocks back ([`KvMemory::release`]).
//!
//! What is shared: a block is sealed (cached, read-only) only when all its positions were
//! computed from the tokens alone at full depth: prompt tokens, and generated tokens that ran
//! every loop, before the sequence's first early exit ([`Seq::cacheable`]). Blocks at or after
//! an early exit hold K/V that state propagation or KV copy made, which depend on the exit
//! decisions: they stay private. The chain's root names the model, its weight dtype, the KV
//! dtype and the block size, so every other input to the numbers is in the key.

use rrt_model::kv::{root_hash, KvLayout, KvPool, PoolStats, PrefixHit};
use rrt_model::Llama;

use crate::engine::EngineConfig;
use crate::error::EngineError;
use crate::sequence::Seq;

/// Counters of KV reuse since the engine started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KvCounters {
    /// Prompt tokens looked up in the prefix cache (each admission, recomputes included).
    pub queried_tokens: u64,
    /// Of those, tokens found (their K/V not computed again).
    pub hit_tokens: u64,
    /// Prompt tokens computed (admissions' tokens not found in the cache).
    pub prefill_tokens: u64,
    /// Running sequences that gave their blocks back to make room.
    pub preemptions: u64,
}

/// What admitting a waiting sequence would take.
pub(crate) struct Admission {
    hit: PrefixHit,
    /// Blocks it takes out of what is available (new ones plus evictable cached hits).
    pub takes: usize,
}

impl Admission {
    /// Cached blocks it starts from.
    pub fn hit_blocks(&self) -> usize {
        self.hit.len()
    }
}

pub(crate) struct KvMemory {
    pool: KvPool,
    root: u64,
    prefix_cache: bool,
    pub counters: KvCounters,
}

impl KvMemory {
    pub fn new(model: &Llama, cfg: &EngineConfig) -> Result<Self, EngineError> {
        let layout = model.kv_layout(cfg.kv_block_tokens, cfg.kv_dtype)?;
        let blocks = cfg.kv_budget_bytes / layout.block_bytes();
        if blocks == 0 {
            return Err(EngineError::Invalid(format!(
                "a KV budget of {} bytes holds no block: one block of {} positions is {} bytes \
                 ({} bytes a position at {} KV)",
                cfg.kv_budget_bytes,
                layout.block_tokens,
                layout.block_bytes(),
                layout.bytes_per_token(),
                layout.dtype
            )));
        }
        let identity = format!(
            "model={} weights={} kv={} block={}",
            cfg.model_id,
            model.lm_head.dtype(),
            cfg.kv_dtype,
            cfg.kv_block_tokens
        );
        Ok(Self {
            pool: KvPool::new(layout, blocks)?,
            root: root_hash(&identity),
            prefix_cache: cfg.prefix_cache,
            counters: KvCounters::default(),
        })
    }

    pub fn layout(&self) -> KvLayout {
        self.pool.layout()
    }

    pub fn pool(&mut self) -> &mut KvPool {
        &mut self.pool
    }

    pub fn stats(&self) -> PoolStats {
        self.pool.stats()
    }

    /// Blocks in the pool.
    pub fn total_blocks(&self) -> usize {
        self.pool.total()
    }

    /// Bytes of the blocks sequences hold.
    pub fn used_bytes(&self) -> usize {
        self.pool.stats().used * self.layout().block_bytes()
    }

    pub fn budget_bytes(&self) -> usize {
        self.pool.total() * self.layout().block_bytes()
    }

    /// Positions the whole pool holds.
    pub fn capacity_tokens(&self) -> usize {
        self.pool.total() * self.layout().block_tokens
    }

    /// The cached prefix `seq` would start from and the blocks it would take. At least its
    /// last token is computed (its logits sample the next one), so a prompt found whole still
    /// runs its last block.
    pub fn plan_admission(&self, seq: &Seq) -> Admission {
        let bt = self.layout().block_tokens;
        let n = seq.tokens.len();
        let hit = if self.prefix_cache {
            self.pool.lookup(self.root, &seq.tokens, (n - 1) / bt)
        } else {
            PrefixHit::default()
        };
        let revived = hit
            .blocks
            .iter()
            .filter(|&&b| self.pool.refs(b) == 0)
            .count();
        Admission {
            takes: self.layout().blocks_for(n) - hit.len() + revived,
            hit,
        }
    }

    /// Whether a running sequence is computing full blocks of `w`'s prefix beyond the
    /// `hit` blocks found cached: admitting `w` before they are sealed (at the end of the step
    /// that computes them) would compute them twice. A burst of requests with one system
    /// prompt then computes it once, the others waiting a step or two for it (SGLang's
    /// cache-aware scheduling does the same by ordering its queue).
    pub fn prefix_in_flight(&self, w: &Seq, hit: usize, running: &[Seq]) -> bool {
        if !self.prefix_cache {
            return false;
        }
        let bt = self.layout().block_tokens;
        let most = (w.tokens.len() - 1) / bt;
        running.iter().filter(|r| !r.is_done()).any(|r| {
            // The blocks `r` computes as a prompt (every loop: cacheable).
            let limit = most.min(r.prompt_len.max(r.recompute_until) / bt);
            if limit <= hit || r.computed >= limit * bt {
                return false;
            }
            let common = w
                .tokens
                .chunks_exact(bt)
                .zip(r.tokens.chunks_exact(bt))
                .take(limit)
                .take_while(|(a, b)| a == b)
                .count();
            common > hit && r.computed < common * bt
        })
    }

    /// Blocks available now (free and evictable).
    pub fn available(&self) -> usize {
        self.pool.available()
    }

    /// Gives `seq` the cached prefix of `adm` and blocks for the rest of its tokens; `seq`
    /// then needs its tokens from the first uncached one computed.
    pub fn admit(&mut self, seq: &mut Seq, adm: Admission) -> Result<(), EngineError> {
        let hit_tokens = adm.hit.len() * self.layout().block_tokens;
        self.pool.adopt(&mut seq.kv, adm.hit)?;
        if let Err(e) = self.pool.reserve(&mut seq.kv, seq.tokens.len()) {
            self.pool.release(&mut seq.kv);
            return Err(e.into());
        }
        seq.computed = hit_tokens;
        let c = &mut self.counters;
        c.queried_tokens += seq.tokens.len() as u64;
        c.hit_tokens += hit_tokens as u64;
        c.prefill_tokens += (seq.tokens.len() - hit_tokens) as u64;
        Ok(())
    }

    /// Grows `seq`'s table to hold all its tokens; `false` when the pool cannot (what it got
    /// stays with it).
    pub fn grow(&mut self, seq: &mut Seq) -> bool {
        self.pool.reserve(&mut seq.kv, seq.tokens.len()).is_ok()
    }

    /// Seals `seq`'s full blocks that depend on tokens alone (prefix caching on).
    pub fn seal(&mut self, seq: &mut Seq) {
        if self.prefix_cache {
            let upto = seq.cacheable();
            self.pool.seal(self.root, &mut seq.kv, &seq.tokens, upto);
        }
    }

    /// Seals what `seq` computed and gives its blocks back.
    pub fn release(&mut self, seq: &mut Seq) {
        self.seal(seq);
        self.pool.release(&mut seq.kv);
    }
}
