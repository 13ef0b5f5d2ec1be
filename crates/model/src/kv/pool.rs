//! Blocks as a resource: a pool of [`KvLayout`] blocks over one [`KvStore`], each with a
//! reference count, and the prefix cache over them (vLLM's block pool, read for its shape).
//!
//! - A sequence's [`SeqCache`] is its block table. [`KvPool::reserve`] takes blocks as it grows
//!   (unreferenced uncached blocks first, most recently freed first so their pages are warm;
//!   then the least recently used cached block, evicted); [`KvPool::release`] gives them back.
//! - A full block can be *sealed* ([`KvPool::seal`]): keyed by the hash chain of its tokens
//!   ([`super::hash`]) and findable by [`KvPool::lookup`]; another sequence with the same prefix
//!   takes it with [`KvPool::adopt`] (reference counted) instead of computing it. Released
//!   sealed blocks stay cached until their memory is needed, evicted least recently used first,
//!   the deepest block of a released table before its parents.
//! - A sealed or shared block is never written: [`KvPool::write`] refuses (an error, not a
//!   silent change of another sequence's context).
//! - Lookups compare tokens and the exact parent block, not only hashes, so a hash collision
//!   (or one crafted by a client) can never hand one request another's context.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use super::hash::block_hash;
use super::store::{KvData, KvStore};
use super::{BlockId, KvLayout};
use crate::error::{ModelError, Result};

/// A block's identity across reuse: its id and how many times the id was handed out.
type Link = (BlockId, u32);

/// One sequence's KV: its block table, positions written, and the hash chain of its sealed
/// prefix. Owned by the sequence, backed by a [`KvPool`]; give the blocks back with
/// [`KvPool::release`] (dropping the table leaks them until the pool is dropped).
#[derive(Debug, Default)]
pub struct SeqCache {
    blocks: Vec<BlockId>,
    len: usize,
    /// Hashes of blocks `0..hashes.len()` (sealed, or adopted from the prefix cache).
    hashes: Vec<u64>,
    /// The cached block each of those stands for (itself, or the equal block cached first).
    links: Vec<Link>,
}

impl SeqCache {
    /// Positions written by [`crate::Llama::forward`] (or adopted from the prefix cache).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn blocks(&self) -> &[BlockId] {
        &self.blocks
    }

    pub(crate) fn set_len(&mut self, len: usize) {
        self.len = len;
    }
}

/// The longest cached prefix of some tokens: blocks to [`KvPool::adopt`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PrefixHit {
    pub blocks: Vec<BlockId>,
    hashes: Vec<u64>,
    links: Vec<Link>,
}

impl PrefixHit {
    /// Blocks found.
    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }
}

/// A sealed block findable by its hash.
#[derive(Debug)]
struct Cached {
    block: BlockId,
    parent: Option<Link>,
    tokens: Box<[u32]>,
}

/// Counts of a pool's blocks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    pub total: usize,
    /// Held by at least one sequence.
    pub used: usize,
    /// In the prefix cache (used or not).
    pub cached: usize,
    /// Cached blocks no sequence holds: kept until their memory is needed.
    pub evictable: usize,
    /// Cached blocks evicted to make room, since the pool was made.
    pub evictions: u64,
    /// How long ago the most recently evicted block was released (last used): the cache's
    /// horizon. Eviction goes least recently used first, so every cached block released since
    /// is still cached, and a prefix last used before it is gone. `None`: nothing evicted yet.
    pub horizon: Option<Duration>,
}

/// A pool of KV blocks; see the module docs.
#[derive(Debug)]
pub struct KvPool {
    store: KvStore,
    growable: bool,
    refs: Vec<u32>,
    generation: Vec<u32>,
    /// The hash of a sealed block (immutable from then on).
    sealed: Vec<Option<u64>>,
    cached: HashMap<u64, Cached>,
    /// Unreferenced, uncached blocks, the most recently freed last.
    free: Vec<BlockId>,
    /// Unreferenced cached blocks by release tick, with their release time: the first is
    /// evicted first.
    evictable: BTreeMap<u64, (BlockId, Instant)>,
    evict_tick: Vec<Option<u64>>,
    tick: u64,
    evictions: u64,
    /// When the most recently evicted block had been released.
    evicted_release: Option<Instant>,
}

impl KvPool {
    /// A pool of `blocks` blocks (at most 2^32), allocated at once (zero pages: memory is taken
    /// as blocks are first written).
    pub fn new(layout: KvLayout, blocks: usize) -> Result<Self> {
        if blocks == 0 || blocks > BlockId::MAX as usize {
            return Err(ModelError::InvalidInput(format!(
                "a KV pool of {blocks} blocks: it needs at least one block of {} bytes (and at \
                 most 2^32 blocks)",
                layout.block_bytes()
            )));
        }
        let mut pool = Self::empty(layout, false);
        // Zeroed at once (calloc: fresh pages stay unmapped until written), not grown, which
        // would write every byte of the pool up front.
        pool.store = KvStore::new(layout, blocks);
        pool.add_blocks(blocks);
        Ok(pool)
    }

    /// A pool that grows when it runs out (one sequence's forward, tests, scoring: whatever has
    /// no budget to keep).
    pub fn growable(layout: KvLayout) -> Self {
        Self::empty(layout, true)
    }

    fn empty(layout: KvLayout, growable: bool) -> Self {
        Self {
            store: KvStore::new(layout, 0),
            growable,
            refs: Vec::new(),
            generation: Vec::new(),
            sealed: Vec::new(),
            cached: HashMap::new(),
            free: Vec::new(),
            evictable: BTreeMap::new(),
            evict_tick: Vec::new(),
            tick: 0,
            evictions: 0,
            evicted_release: None,
        }
    }

    /// Adds `n` blocks to the allocator's books (the store holds them, or grows to).
    fn add_blocks(&mut self, n: usize) {
        let old = self.refs.len();
        self.store.grow(old + n);
        self.refs.resize(old + n, 0);
        self.generation.resize(old + n, 0);
        self.sealed.resize(old + n, None);
        self.evict_tick.resize(old + n, None);
        // Popped from the end: the lowest ids first.
        self.free.extend((old..old + n).rev().map(|b| b as BlockId));
    }

    pub fn layout(&self) -> KvLayout {
        self.store.layout
    }

    pub(crate) fn data(&self) -> &KvData {
        &self.store.data
    }

    pub fn stats(&self) -> PoolStats {
        PoolStats {
            total: self.store.blocks(),
            used: self.refs.iter().filter(|&&r| r > 0).count(),
            cached: self.cached.len(),
            evictable: self.evictable.len(),
            evictions: self.evictions,
            horizon: self.evicted_release.map(|t| t.elapsed()),
        }
    }

    /// Blocks a sequence could take now without waiting: free ones plus evictable cached ones
    /// (unbounded for a growable pool).
    pub fn available(&self) -> usize {
        if self.growable {
            usize::MAX / 2
        } else {
            self.free.len() + self.evictable.len()
        }
    }

    /// Blocks in the pool.
    pub fn total(&self) -> usize {
        self.store.blocks()
    }

    /// References held on block `b` (tests and invariants).
    pub fn refs(&self, b: BlockId) -> u32 {
        self.refs[b as usize]
    }

    /// One block, referenced once; `None` when the pool has nothing to give.
    fn allocate(&mut self) -> Option<BlockId> {
        if self.free.is_empty() && self.evictable.is_empty() && self.growable {
            self.add_blocks(self.store.blocks().max(4));
        }
        let b = match self.free.pop() {
            Some(b) => b,
            None => {
                let (_, (b, released)) = self.evictable.pop_first()?;
                self.evicted_release = Some(released);
                self.evict_tick[b as usize] = None;
                let hash = self.sealed[b as usize].take();
                if let Some(h) = hash {
                    if self.cached.get(&h).is_some_and(|c| c.block == b) {
                        self.cached.remove(&h);
                    }
                }
                self.generation[b as usize] = self.generation[b as usize].wrapping_add(1);
                self.evictions += 1;
                b
            }
        };
        self.refs[b as usize] = 1;
        Some(b)
    }

    /// Grows `seq`'s table to hold `positions` positions. On failure the table keeps the blocks
    /// it got (release or retry later).
    pub fn reserve(&mut self, seq: &mut SeqCache, positions: usize) -> Result<()> {
        let layout = self.layout();
        while seq.blocks.len() * layout.block_tokens < positions {
            let Some(b) = self.allocate() else {
                return Err(ModelError::InvalidInput(format!(
                    "the KV pool is out of blocks: {} positions need {} blocks of {} bytes, the \
                     sequence holds {} and the pool of {} has none free",
                    positions,
                    layout.blocks_for(positions),
                    layout.block_bytes(),
                    seq.blocks.len(),
                    self.total()
                )));
            };
            seq.blocks.push(b);
        }
        Ok(())
    }

    /// Gives back every block of `seq` and empties it. Cached blocks stay findable until
    /// evicted (the table's last block is evicted first).
    pub fn release(&mut self, seq: &mut SeqCache) {
        let now = Instant::now();
        for &b in seq.blocks.iter().rev() {
            let i = b as usize;
            self.refs[i] -= 1;
            if self.refs[i] > 0 {
                continue;
            }
            let mapped =
                self.sealed[i].is_some_and(|h| self.cached.get(&h).is_some_and(|c| c.block == b));
            if mapped {
                self.evictable.insert(self.tick, (b, now));
                self.evict_tick[i] = Some(self.tick);
                self.tick += 1;
            } else {
                if self.sealed[i].take().is_some() {
                    self.generation[i] = self.generation[i].wrapping_add(1);
                }
                self.free.push(b);
            }
        }
        *seq = SeqCache::default();
    }

    /// The longest run of cached blocks that begins `tokens`, at most `max_blocks` of them,
    /// chained from `root` (what [`super::root_hash`] gave for this model). Takes nothing.
    pub fn lookup(&self, root: u64, tokens: &[u32], max_blocks: usize) -> PrefixHit {
        let bt = self.layout().block_tokens;
        let mut hit = PrefixHit::default();
        let mut parent_hash = root;
        let mut parent: Option<Link> = None;
        for chunk in tokens.chunks_exact(bt).take(max_blocks) {
            let h = block_hash(parent_hash, chunk);
            match self.cached.get(&h) {
                Some(c) if c.parent == parent && *c.tokens == *chunk => {
                    let link = (c.block, self.generation[c.block as usize]);
                    hit.blocks.push(c.block);
                    hit.hashes.push(h);
                    hit.links.push(link);
                    parent = Some(link);
                    parent_hash = h;
                }
                _ => break,
            }
        }
        hit
    }

    /// Makes the blocks of `hit` the start of the empty `seq` (shared: each referenced once
    /// more, none written by it).
    pub fn adopt(&mut self, seq: &mut SeqCache, hit: PrefixHit) -> Result<()> {
        if !seq.blocks.is_empty() {
            return Err(ModelError::InvalidInput(
                "a cached prefix can only start an empty sequence".into(),
            ));
        }
        for &b in &hit.blocks {
            let i = b as usize;
            if let Some(t) = self.evict_tick[i].take() {
                self.evictable.remove(&t);
            }
            self.refs[i] += 1;
        }
        seq.len = hit.blocks.len() * self.layout().block_tokens;
        seq.blocks = hit.blocks;
        seq.hashes = hit.hashes;
        seq.links = hit.links;
        Ok(())
    }

    /// Seals `seq`'s full blocks over its first `positions` positions, whose contents are
    /// `tokens` (the caller vouches that those K/V depend on nothing but the tokens and the
    /// root), chained from `root`; they become findable and are never written again. A block
    /// equal to one already cached stays out of the cache (the cached one stands for it).
    pub fn seal(&mut self, root: u64, seq: &mut SeqCache, tokens: &[u32], positions: usize) {
        let bt = self.layout().block_tokens;
        let full = (positions.min(tokens.len()) / bt).min(seq.blocks.len());
        for i in seq.hashes.len()..full {
            let chunk = &tokens[i * bt..(i + 1) * bt];
            let parent_hash = seq.hashes.last().copied().unwrap_or(root);
            let parent = seq.links.last().copied();
            let h = block_hash(parent_hash, chunk);
            let b = seq.blocks[i];
            let link = match self.cached.get(&h) {
                Some(c) if c.parent == parent && *c.tokens == *chunk => {
                    (c.block, self.generation[c.block as usize])
                }
                // The same hash for other contents: leave this block and the rest uncached.
                Some(_) => return,
                None => {
                    self.cached.insert(
                        h,
                        Cached {
                            block: b,
                            parent,
                            tokens: chunk.into(),
                        },
                    );
                    (b, self.generation[b as usize])
                }
            };
            self.sealed[b as usize] = Some(h);
            seq.hashes.push(h);
            seq.links.push(link);
        }
    }

    /// Writes K and V of position `pos` of `layer` into `seq`'s block, which must be its own
    /// (referenced once) and not sealed.
    pub fn write(
        &mut self,
        seq: &SeqCache,
        layer: usize,
        pos: usize,
        k: &[f32],
        v: &[f32],
    ) -> Result<()> {
        let bt = self.layout().block_tokens;
        let b = self.writable_block(seq, pos)?;
        self.store.write(layer, b, pos % bt, k, v);
        Ok(())
    }

    /// The block of `pos` in `seq`, if the sequence may write it.
    fn writable_block(&self, seq: &SeqCache, pos: usize) -> Result<BlockId> {
        let b = self.block_of(seq, pos)?;
        let i = b as usize;
        if self.refs[i] != 1 {
            return Err(ModelError::InvalidInput(format!(
                "refused to write position {pos} into KV block {b}: it is shared by {} sequences",
                self.refs[i]
            )));
        }
        if self.sealed[i].is_some() {
            return Err(ModelError::InvalidInput(format!(
                "refused to write position {pos} into KV block {b}: it is sealed in the prefix \
                 cache"
            )));
        }
        Ok(b)
    }

    /// The block of `seq` that holds position `pos`.
    fn block_of(&self, seq: &SeqCache, pos: usize) -> Result<BlockId> {
        let bt = self.layout().block_tokens;
        seq.blocks.get(pos / bt).copied().ok_or_else(|| {
            ModelError::InvalidInput(format!(
                "no KV block for position {pos}: the sequence holds {} blocks of {bt} (reserve \
                 before the forward)",
                seq.blocks.len()
            ))
        })
    }

    /// K and V of position `pos` of `layer` in `seq`, as f32.
    pub fn read(&self, seq: &SeqCache, layer: usize, pos: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        let b = self.block_of(seq, pos)?;
        Ok(self.store.read(layer, b, pos % self.layout().block_tokens))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::KvDtype;

    /// Resident bytes of this process (Linux).
    fn rss() -> Option<usize> {
        let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
        let pages: usize = statm.split_whitespace().nth(1)?.parse().ok()?;
        Some(pages * 4096)
    }

    #[test]
    fn a_large_pool_takes_memory_only_as_blocks_are_written() {
        let layout = KvLayout::new(30, 192, 16, KvDtype::F32).unwrap();
        let blocks = (4usize << 30) / layout.block_bytes();
        let Some(before) = rss() else { return };
        let mut pool = KvPool::new(layout, blocks).unwrap();
        let after = rss().unwrap();
        assert!(
            after.saturating_sub(before) < 512 << 20,
            "a 4 GiB pool made the process {} MiB bigger before any block was used",
            (after - before) >> 20
        );
        let mut seq = SeqCache::default();
        pool.reserve(&mut seq, 16).unwrap();
        pool.write(&seq, 0, 3, &[1.0; 192], &[2.0; 192]).unwrap();
        assert_eq!(pool.read(&seq, 0, 3).unwrap().1, vec![2.0; 192]);
    }

    #[test]
    fn int8_positions_read_back_within_half_a_step_of_their_head_s_scale() {
        // Three KV heads of 8 features; the middle one all zeros, the last one large.
        let layout = KvLayout::new(2, 24, 16, KvDtype::Int8)
            .and_then(|l| l.with_scale_group(8))
            .unwrap();
        assert!(layout.with_scale_group(7).is_err());
        let mut pool = KvPool::growable(layout);
        let mut seq = SeqCache::default();
        pool.reserve(&mut seq, 40).unwrap();
        let row = |p: usize, sign: f32| -> Vec<f32> {
            (0..24)
                .map(|i| match i / 8 {
                    0 => sign * (i as f32 - 3.5) * 0.01 * (p + 1) as f32,
                    1 => 0.0,
                    _ => sign * 100.0 * (i as f32).sin(),
                })
                .collect()
        };
        for p in [0, 17, 39] {
            pool.write(&seq, 1, p, &row(p, 1.0), &row(p, -1.0)).unwrap();
        }
        for p in [0, 17, 39] {
            let (k, v) = pool.read(&seq, 1, p).unwrap();
            for (got, want) in [(k, row(p, 1.0)), (v, row(p, -1.0))] {
                for (g, w) in got.chunks(8).zip(want.chunks(8)) {
                    let step = w.iter().fold(0f32, |m, x| m.max(x.abs())) / 127.0;
                    for (a, b) in g.iter().zip(w) {
                        assert!(
                            (a - b).abs() <= 0.5 * step + 1e-6,
                            "position {p}: {a} vs {b}"
                        );
                    }
                }
            }
            // The zero head stays zero.
            assert!(pool.read(&seq, 1, p).unwrap().0[8..16]
                .iter()
                .all(|&x| x == 0.0));
        }
        // Layer 0 was not written.
        assert_eq!(pool.read(&seq, 0, 17).unwrap().0, vec![0.0; 24]);
    }

    #[test]
    fn released_cached_blocks_are_evicted_deepest_first_and_only_when_needed() {
        let layout = KvLayout::new(1, 16, 16, KvDtype::F32).unwrap();
        let mut pool = KvPool::new(layout, 4).unwrap();
        let tokens: Vec<u32> = (0..48).collect();
        let mut a = SeqCache::default();
        pool.reserve(&mut a, 48).unwrap();
        pool.seal(1, &mut a, &tokens, 48);
        let ids = a.blocks().to_vec();
        pool.release(&mut a);
        let s = pool.stats();
        assert_eq!((s.used, s.cached, s.evictable), (0, 3, 3));
        assert_eq!(s.horizon, None, "nothing evicted yet");
        let released = std::time::Instant::now();
        std::thread::sleep(std::time::Duration::from_millis(20));
        // One free block is taken first; then the deepest cached block of the released table.
        let mut b = SeqCache::default();
        pool.reserve(&mut b, 32).unwrap();
        assert!(!b.blocks().contains(&ids[0]) && !b.blocks().contains(&ids[1]));
        assert_eq!(pool.stats().evictions, 1);
        // The horizon: how long ago the evicted block was released.
        let horizon = pool.stats().horizon.expect("a block was evicted");
        assert!(horizon >= Duration::from_millis(20), "{horizon:?}");
        assert!(
            horizon <= released.elapsed() + Duration::from_millis(20),
            "{horizon:?}"
        );
        // The first two blocks are still found; the third is gone.
        assert_eq!(pool.lookup(1, &tokens, 3).blocks, ids[..2]);
        // Under another root (another model, dtype or block size) nothing is found.
        assert!(pool.lookup(2, &tokens, 3).is_empty());
    }
}
