//! The simulated KV pool: a fixed number of blocks, held by running sequences or kept as a
//! prefix cache of full prompt blocks (keyed by the hash chain of their tokens, as the real
//! engine keys them), evicted least recently used when blocks are needed, the deepest block of
//! a released sequence before its parents (as the real pool does: a shared prefix's first
//! blocks outlive the conversations that extended it).

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};

/// Chained hashes of the full `block`-token blocks of `tokens`.
pub fn block_hashes(tokens: &[u32], block: usize) -> Vec<u64> {
    let mut prev = 0u64;
    tokens
        .chunks_exact(block.max(1))
        .map(|chunk| {
            let mut h = std::hash::DefaultHasher::new();
            prev.hash(&mut h);
            chunk.hash(&mut h);
            prev = h.finish();
            prev
        })
        .collect()
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    /// Running sequences using the block.
    pins: u32,
    tick: u64,
    /// When it was last released (the engine's clock, seconds).
    released: f64,
}

#[derive(Debug)]
pub struct BlockCache {
    total: usize,
    /// Blocks held by running sequences for what they computed (not in the cache).
    held: usize,
    entries: HashMap<u64, Entry>,
    /// Unpinned cached blocks by last use (eviction order).
    lru: BTreeMap<u64, u64>,
    tick: u64,
    pub evictions: u64,
    /// When the most recently evicted block had been released.
    evicted_release: Option<f64>,
}

impl BlockCache {
    pub fn new(total: usize) -> Self {
        Self {
            total,
            held: 0,
            entries: HashMap::new(),
            lru: BTreeMap::new(),
            tick: 0,
            evictions: 0,
            evicted_release: None,
        }
    }

    pub fn total(&self) -> usize {
        self.total
    }

    /// Blocks held by sequences (their own and the cached ones they use).
    pub fn used(&self) -> usize {
        self.held + self.entries.len() - self.lru.len()
    }

    pub fn cached(&self) -> usize {
        self.entries.len()
    }

    pub fn evictable(&self) -> usize {
        self.lru.len()
    }

    /// Blocks neither held nor cached.
    pub fn free(&self) -> usize {
        self.total.saturating_sub(self.held + self.entries.len())
    }

    /// How many leading blocks of `hashes` are cached.
    pub fn lookup(&self, hashes: &[u64]) -> usize {
        hashes
            .iter()
            .take_while(|h| self.entries.contains_key(h))
            .count()
    }

    /// Whether `n` more blocks can be had (free, or by evicting unpinned cached ones) while
    /// `pinning` leading blocks of a lookup are pinned first (they stop being evictable).
    pub fn can_take(&self, n: usize, pinning: &[u64]) -> bool {
        let unpinned_hits = pinning
            .iter()
            .filter(|h| self.entries.get(h).is_some_and(|e| e.pins == 0))
            .count();
        self.free() + self.lru.len() - unpinned_hits >= n
    }

    /// Pins cached blocks for a sequence that uses them.
    pub fn pin(&mut self, hashes: &[u64]) {
        for h in hashes {
            if let Some(e) = self.entries.get_mut(h) {
                if e.pins == 0 {
                    self.lru.remove(&e.tick);
                }
                e.pins += 1;
            }
        }
    }

    /// Takes `n` blocks for a sequence's own tokens, evicting least recently used cached blocks
    /// as needed; `false` (nothing taken) when there are not enough.
    pub fn take(&mut self, n: usize) -> bool {
        if self.free() + self.lru.len() < n {
            return false;
        }
        while self.free() < n {
            let Some((_, h)) = self.lru.pop_first() else {
                return false;
            };
            if let Some(e) = self.entries.remove(&h) {
                self.evicted_release = Some(e.released);
            }
            self.evictions += 1;
        }
        self.held += n;
        true
    }

    /// How long before `now` the most recently evicted block had been released: every block
    /// released since is still cached (`None`: nothing evicted yet).
    pub fn horizon(&self, now: f64) -> Option<f64> {
        self.evicted_release.map(|t| (now - t).max(0.0))
    }

    /// A sequence is done at `now`: its `own` blocks go back, its pinned blocks are unpinned,
    /// and its full prompt blocks (`prompt`, of which the first `pinned` were cache hits) are
    /// cached, as far as free blocks allow. They become evictable deepest first.
    pub fn release(&mut self, own: usize, pinned: &[u64], prompt: &[u64], now: f64) {
        self.held = self.held.saturating_sub(own);
        // The computed prompt blocks move from the sequence's own into the cache (the leading
        // ones, while there is room).
        let mut table: Vec<u64> = pinned.to_vec();
        for h in &prompt[pinned.len().min(prompt.len())..] {
            if self.entries.contains_key(h) {
                continue;
            }
            if self.free() == 0 {
                break;
            }
            self.entries.insert(
                *h,
                Entry {
                    pins: 1,
                    tick: 0,
                    released: now,
                },
            );
            table.push(*h);
        }
        for h in table.iter().rev() {
            if let Some(e) = self.entries.get_mut(h) {
                e.pins = e.pins.saturating_sub(1);
                if e.pins == 0 {
                    self.tick += 1;
                    e.tick = self.tick;
                    e.released = now;
                    self.lru.insert(e.tick, *h);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn released_prompts_are_found_again_and_evicted_deepest_first() {
        let mut c = BlockCache::new(8);
        let a: Vec<u32> = (0..64).collect();
        let ha = block_hashes(&a, 16);
        assert_eq!(ha.len(), 4);
        assert_eq!(c.lookup(&ha), 0);
        assert!(c.take(5));
        assert_eq!((c.used(), c.free()), (5, 3));
        c.release(5, &[], &ha, 1.0);
        assert_eq!((c.used(), c.cached(), c.free()), (0, 4, 4));
        assert_eq!(c.lookup(&ha), 4);
        // A sequence pins the hits: they cannot be evicted under it.
        c.pin(&ha);
        assert_eq!(c.used(), 4);
        assert!(!c.can_take(5, &[]));
        assert!(c.take(4));
        assert_eq!(c.free(), 0);
        c.release(4, &ha, &ha, 2.0);
        assert_eq!((c.used(), c.evictable()), (0, 4));
        assert_eq!(c.horizon(3.0), None, "nothing evicted yet");
        // Someone else needs six blocks: the two least recently used cached ones go, the
        // deepest first (as the real pool evicts), so the prompt's first half is still found.
        assert!(c.take(6));
        assert_eq!(c.evictions, 2);
        assert_eq!(c.lookup(&ha), 2, "the deepest blocks went first");
        assert_eq!(c.horizon(3.5), Some(1.5), "released at 2.0, evicted by 3.5");
    }

    #[test]
    fn hashes_name_whole_prefixes() {
        let a: Vec<u32> = (0..48).collect();
        let mut b = a.clone();
        b[20] = 999;
        let (ha, hb) = (block_hashes(&a, 16), block_hashes(&b, 16));
        assert_eq!(ha[0], hb[0]);
        assert_ne!(ha[1], hb[1]);
        assert_ne!(
            ha[2], hb[2],
            "a later block differs once an earlier one does"
        );
    }
}
