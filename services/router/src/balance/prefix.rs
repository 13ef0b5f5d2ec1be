//! What this router sent where: an approximate index of prompt prefixes. A request's text (a
//! plain prompt, or every chat message with its role, in order) is cut into blocks of
//! [`BLOCK_BYTES`] and each block hashed together with the blocks before it, so a block's hash
//! names the whole prefix up to it. A chat message's last block ends with the message (shorter
//! when the message's length is not a multiple of the block), so a conversation's blocks cover
//! each of its messages exactly: a short first question still tells its conversation's worker
//! from the others that were only sent the same system prompt. The index maps such hashes to
//! the workers the prefix was sent to (the few most recent), which is what a worker's prefix
//! cache most likely still holds.
//! It is bounded: past its capacity the least recently used quarter of the entries goes.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Mutex;
use std::time::Instant;

use rrt_proto::v1 as pb;

/// Bytes per block: about 16 tokens of English text (~4 bytes a token), a worker's KV block.
pub const BLOCK_BYTES: usize = 64;
/// Bytes per token assumed when turning matched bytes into prompt tokens saved.
pub const BYTES_PER_TOKEN: f64 = 4.0;
/// Workers remembered per block (the most recent).
const HOLDERS: usize = 8;

/// A request's prefix blocks and class.
#[derive(Debug, Clone, Default)]
pub struct Key {
    /// Chained hashes of the blocks of the request's text.
    pub blocks: Vec<u64>,
    /// Where each block ends in the text (bytes).
    pub ends: Vec<usize>,
    /// Bytes of the reply the conversation's previous turn generated (the last assistant
    /// message before the last user message), 0 for a first turn.
    pub reply_bytes: usize,
    /// The text's length in bytes.
    pub bytes: usize,
    /// The request's class for depth prediction: its system message when it has one, else its
    /// first block (a template, a task prefix).
    pub class: u64,
}

pub(crate) fn hash_of(parts: &[&[u8]]) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    for p in parts {
        p.hash(&mut h);
    }
    h.finish()
}

impl Key {
    /// The key of the text a worker will see for `req`: every chat message (role and content,
    /// in order: a conversation's later turns extend its earlier ones), or the prompt.
    pub fn of_request(req: &pb::GenerateRequest) -> Self {
        if req.messages.is_empty() {
            let mut text = Vec::new();
            if req.chat {
                text.extend_from_slice(b"user\x1f");
                text.extend_from_slice(req.prompt.as_bytes());
                text.push(0x1e);
            } else {
                text.extend_from_slice(req.prompt.as_bytes());
            }
            return Self::of_text(&text);
        }
        let system = req
            .messages
            .iter()
            .find(|m| m.role == "system")
            .map(|m| hash_of(&[m.content.as_bytes()]));
        let mut key = Self::default();
        let mut prev = 0u64;
        let mut message = Vec::new();
        for m in &req.messages {
            message.clear();
            message.extend_from_slice(m.role.as_bytes());
            message.push(0x1f);
            message.extend_from_slice(m.content.as_bytes());
            message.push(0x1e);
            for chunk in message.chunks(BLOCK_BYTES) {
                prev = hash_of(&[&prev.to_le_bytes(), chunk]);
                key.bytes += chunk.len();
                key.blocks.push(prev);
                key.ends.push(key.bytes);
            }
        }
        key.class = system.unwrap_or_else(|| key.blocks[0]);
        let last_user = req.messages.iter().rposition(|m| m.role == "user");
        key.reply_bytes = req.messages[..last_user.unwrap_or(0)]
            .iter()
            .rev()
            .take_while(|m| m.role != "user")
            .find(|m| m.role == "assistant")
            .map_or(0, |m| m.content.len());
        key
    }

    /// The key of a plain text: its full blocks (a longer text may continue the last one).
    pub fn of_text(text: &[u8]) -> Self {
        let mut blocks = Vec::with_capacity(text.len() / BLOCK_BYTES);
        let mut prev = 0u64;
        for chunk in text.chunks_exact(BLOCK_BYTES) {
            prev = hash_of(&[&prev.to_le_bytes(), chunk]);
            blocks.push(prev);
        }
        let ends = (1..=blocks.len()).map(|i| i * BLOCK_BYTES).collect();
        let class = blocks.first().copied().unwrap_or_else(|| hash_of(&[text]));
        Self {
            blocks,
            ends,
            reply_bytes: 0,
            bytes: text.len(),
            class,
        }
    }

    /// Prompt tokens (estimated) of the whole text.
    pub fn tokens(&self) -> f64 {
        self.bytes as f64 / BYTES_PER_TOKEN
    }

    /// Bytes of the text in its first `blocks` blocks.
    pub fn bytes_in(&self, blocks: usize) -> usize {
        blocks.checked_sub(1).map_or(0, |i| self.ends[i])
    }
}

#[derive(Debug, Default)]
struct Entry {
    /// At most [`HOLDERS`].
    holders: Vec<Holder>,
    last: u64,
}

#[derive(Debug, Clone, Copy)]
struct Holder {
    serial: u64,
    /// The index's tick of its latest use.
    tick: u64,
    /// When the block was first sent (or learned to be sent) to it: until its request's
    /// prefill is done the worker's cache does not hold it yet.
    placed: Instant,
    /// When it was last used there (sent, or its request finished and the worker released
    /// it): before the worker's cache horizon, it has been evicted.
    sent: Instant,
}

/// A worker's match of a request's blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Match {
    pub serial: u64,
    /// Leading blocks it was sent.
    pub blocks: usize,
    /// Of those, the leading blocks sent before the `settled` time [`PrefixIndex::matches`]
    /// was given (older placements, whose prefill is likely done).
    pub settled: usize,
    /// When its deepest matched block was last sent to it, in the index's ticks (larger is
    /// later): the likelier a worker's LRU cache still holds it.
    pub last: u64,
}

#[derive(Debug, Default)]
struct State {
    map: HashMap<u64, Entry>,
    tick: u64,
}

#[derive(Debug)]
pub struct PrefixIndex {
    state: Mutex<State>,
    capacity: usize,
}

/// Drops the least recently used quarter of `map`'s entries (`last` gives an entry's tick):
/// amortised, a sweep every quarter-capacity insertions keeps a map at most `capacity`.
pub(crate) fn sweep_oldest<V>(map: &mut HashMap<u64, V>, last: impl Fn(&V) -> u64) {
    let mut ticks: Vec<u64> = map.values().map(&last).collect();
    if ticks.is_empty() {
        return;
    }
    let cut = ticks.len() / 4;
    let (_, &mut cutoff, _) = ticks.select_nth_unstable(cut);
    map.retain(|_, v| last(v) > cutoff);
}

impl PrefixIndex {
    pub fn new(capacity: usize) -> Self {
        Self {
            state: Mutex::new(State::default()),
            capacity: capacity.max(4),
        }
    }

    /// Blocks held.
    pub fn len(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// For each worker `live` accepts that was sent a prefix of `blocks`: the number of leading
    /// blocks it was sent (longest first). A worker that holds block `i` was sent blocks
    /// `0..=i` (the hashes chain), so it counts from its deepest block even where a popular
    /// shared prefix's first blocks have since forgotten it among their [`HOLDERS`] (a
    /// conversation placed on a worker stays found by its own blocks). A block last sent to a
    /// worker before its cache `horizon` does not count: the worker has evicted it (its
    /// parents, sent with every request that extends them, may well still be there).
    pub fn matches(
        &self,
        blocks: &[u64],
        settled: Instant,
        live: impl Fn(u64) -> bool,
        horizon: impl Fn(u64) -> Option<Instant>,
    ) -> Vec<Match> {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut found: Vec<Match> = Vec::new();
        let kept = |h: &Holder| live(h.serial) && horizon(h.serial).is_none_or(|t| h.sent >= t);
        for (i, h) in blocks.iter().enumerate() {
            let Some(e) = st.map.get(h) else { break };
            for h in e.holders.iter().filter(|h| kept(h)) {
                let settled = if h.placed <= settled { i + 1 } else { 0 };
                match found.iter_mut().find(|f| f.serial == h.serial) {
                    Some(f) => {
                        f.blocks = i + 1;
                        f.settled = f.settled.max(settled);
                        f.last = h.tick;
                    }
                    None => found.push(Match {
                        serial: h.serial,
                        blocks: i + 1,
                        settled,
                        last: h.tick,
                    }),
                }
            }
        }
        found.sort_by_key(|f| std::cmp::Reverse(f.blocks));
        found
    }

    /// A request with `blocks` finished on worker `serial` at `at`: the worker released them
    /// then, which is what its cache's least-recently-used order (and horizon) counts from.
    /// Blocks the index no longer holds for it stay forgotten.
    pub fn touch(&self, blocks: &[u64], serial: u64, at: Instant) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        for h in blocks {
            let Some(e) = st.map.get_mut(h) else { continue };
            if let Some(h) = e.holders.iter_mut().find(|h| h.serial == serial) {
                h.sent = h.sent.max(at);
            }
        }
    }

    /// Records that `blocks` (a request's) were sent to the worker `serial` now; returns
    /// the ones new to it.
    pub fn insert(&self, blocks: &[u64], serial: u64) -> Vec<u64> {
        self.insert_at(blocks, serial, Instant::now())
    }

    /// [`Self::insert`], sent at `placed`.
    pub fn insert_at(&self, blocks: &[u64], serial: u64, placed: Instant) -> Vec<u64> {
        let mut new = Vec::new();
        if blocks.is_empty() {
            return new;
        }
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.tick += 1;
        let tick = st.tick;
        for h in blocks {
            let e = st.map.entry(*h).or_default();
            e.last = tick;
            match e.holders.iter_mut().find(|h| h.serial == serial) {
                Some(h) => {
                    h.tick = tick;
                    h.sent = h.sent.max(placed);
                }
                None => {
                    new.push(*h);
                    if e.holders.len() >= HOLDERS {
                        let oldest = (0..e.holders.len())
                            .min_by_key(|&i| e.holders[i].tick)
                            .unwrap_or(0);
                        e.holders.swap_remove(oldest);
                    }
                    e.holders.push(Holder {
                        serial,
                        tick,
                        placed,
                        sent: placed,
                    });
                }
            }
        }
        if st.map.len() > self.capacity {
            sweep_oldest(&mut st.map, |e| e.last);
        }
        new
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (worker, leading blocks sent) for every worker `live` accepts, settled or not.
    fn held(idx: &PrefixIndex, blocks: &[u64], live: impl Fn(u64) -> bool) -> Vec<(u64, usize)> {
        let later = Instant::now() + std::time::Duration::from_secs(3600);
        let m = idx.matches(blocks, later, live, |_| None);
        assert!(m.iter().all(|m| m.settled == m.blocks), "{m:?}");
        m.iter().map(|m| (m.serial, m.blocks)).collect()
    }

    #[test]
    fn a_prefix_placed_moments_ago_is_held_but_not_yet_settled() {
        let idx = PrefixIndex::new(1000);
        let system = Key::of_text(&text(&[("s", 256)]));
        let conversation = Key::of_text(&text(&[("s", 256), ("q", 128)]));
        idx.insert(&system.blocks, 1);
        let between = Instant::now();
        std::thread::sleep(std::time::Duration::from_millis(2));
        idx.insert(&conversation.blocks, 1);
        idx.insert(&conversation.blocks, 2);
        let m = idx.matches(&conversation.blocks, between, |_| true, |_| None);
        // Worker 1 had the system prompt before; its conversation's blocks and worker 2's
        // whole prefix are newer (worker 2's the most recent).
        let got: Vec<(u64, usize, usize)> =
            m.iter().map(|m| (m.serial, m.blocks, m.settled)).collect();
        assert_eq!(got, vec![(1, 6, 4), (2, 6, 0)]);
        assert!(m[1].last > m[0].last, "{m:?}");
    }

    fn text(parts: &[(&str, usize)]) -> Vec<u8> {
        parts
            .iter()
            .flat_map(|(s, n)| s.as_bytes().repeat(*n))
            .collect()
    }

    #[test]
    fn keys_share_blocks_exactly_as_far_as_texts_share_prefixes() {
        let a = Key::of_text(&text(&[("a", 200), ("x", 100)]));
        let b = Key::of_text(&text(&[("a", 200), ("y", 100)]));
        assert_eq!(a.blocks.len(), 300 / BLOCK_BYTES);
        // 200 shared bytes: three whole shared blocks, the fourth (192..256) differs.
        let shared = a.blocks.iter().zip(&b.blocks).take_while(|(x, y)| x == y);
        assert_eq!(shared.count(), 3);
        assert_eq!(a.class, b.class);
    }

    #[test]
    fn chat_keys_cover_every_message_and_class_by_system_prompt() {
        let msg = |role: &str, content: &str| pb::ChatMessage {
            role: role.into(),
            content: content.into(),
        };
        let sys = "You are a helpful assistant. ".repeat(10);
        let turn1 = pb::GenerateRequest {
            chat: true,
            messages: vec![
                msg("system", &sys),
                msg("user", &"first question ".repeat(8)),
            ],
            ..Default::default()
        };
        let mut turn2 = turn1.clone();
        turn2
            .messages
            .push(msg("assistant", &"an answer ".repeat(8)));
        turn2.messages.push(msg("user", "more"));
        let (k1, k2) = (Key::of_request(&turn1), Key::of_request(&turn2));
        assert!(k2.blocks.starts_with(&k1.blocks), "turn 2 extends turn 1");
        assert_eq!(
            (k1.reply_bytes, k2.reply_bytes),
            (0, "an answer ".len() * 8)
        );
        assert!(k2.blocks.len() > k1.blocks.len());
        assert_eq!(k1.class, k2.class);
        // Another user's question under the same system prompt: same class, shared prefix
        // exactly as far as the system message (its last block ends with it).
        let mut other = turn1.clone();
        other.messages[1].content = "something else entirely ".repeat(8);
        let k3 = Key::of_request(&other);
        assert_eq!(k3.class, k1.class);
        let shared = k1.blocks.iter().zip(&k3.blocks).take_while(|(x, y)| x == y);
        let system_bytes = b"system\x1f".len() + sys.len() + 1;
        let system_blocks = system_bytes.div_ceil(BLOCK_BYTES);
        assert_eq!(shared.count(), system_blocks);
        assert_eq!(k1.bytes_in(system_blocks), system_bytes);
        assert_eq!(k1.bytes_in(k1.blocks.len()), k1.bytes);
        assert_eq!(k1.bytes_in(0), 0);
        // A question shorter than a block still gets a block of its own: its conversation's
        // key is longer than the system prompt's by it.
        other.messages[1].content = "hi?".into();
        let short = Key::of_request(&other);
        assert_eq!(short.blocks.len(), system_blocks + 1);
        other.messages[1].content = "yo?".into();
        assert_ne!(
            Key::of_request(&other).blocks[system_blocks],
            short.blocks[system_blocks]
        );
        // The first message alone does not make the key (sglang #26263).
        assert_ne!(k2.blocks, k1.blocks);
    }

    #[test]
    fn a_conversation_stays_found_when_its_shared_prefix_forgot_the_worker() {
        let idx = PrefixIndex::new(1000);
        let conversation = Key::of_text(&text(&[("s", 256), ("q", 256)]));
        idx.insert(&conversation.blocks, 1);
        // More workers than a block keeps are sent the same system prompt since.
        for s in 2..(HOLDERS as u64 + 4) {
            let other = Key::of_text(&text(&[("s", 256), ("x", s as usize)]));
            idx.insert(&other.blocks, s);
        }
        let m = held(&idx, &conversation.blocks, |_| true);
        assert_eq!(m[0], (1, 8), "{m:?}");
        // The system prompt's blocks keep only the most recent holders.
        assert_eq!(m.len(), HOLDERS + 1);
        assert!(m[1..].iter().all(|&(s, n)| s > 3 && n == 4), "{m:?}");
    }

    #[test]
    fn matches_are_the_longest_prefix_each_worker_was_sent() {
        let idx = PrefixIndex::new(1000);
        let long = Key::of_text(&text(&[("s", 256), ("q", 256)]));
        let short = Key::of_text(&text(&[("s", 256), ("r", 256)]));
        idx.insert(&long.blocks, 1);
        idx.insert(&short.blocks, 2);
        let m = held(&idx, &long.blocks, |_| true);
        assert_eq!(m, vec![(1, 8), (2, 4)]);
        // A dead worker's entries do not match.
        assert_eq!(held(&idx, &long.blocks, |s| s != 1), vec![(2, 4)]);
        let unrelated = Key::of_text(&text(&[("z", 512)]));
        assert!(held(&idx, &unrelated.blocks, |_| true).is_empty());
    }

    #[test]
    fn the_index_stays_bounded_and_keeps_what_was_used_last() {
        let idx = PrefixIndex::new(100);
        let hot = Key::of_text(&text(&[("h", 640)]));
        for i in 0..200 {
            let k = Key::of_text(format!("{i:0>64}").as_bytes());
            idx.insert(&k.blocks, 1);
            idx.insert(&hot.blocks, 2);
            assert!(idx.len() <= 100, "{}", idx.len());
        }
        assert_eq!(held(&idx, &hot.blocks, |_| true), vec![(2, 10)]);
    }

    #[test]
    fn blocks_sent_before_a_workers_cache_horizon_are_not_held_there() {
        let idx = PrefixIndex::new(1000);
        let system = Key::of_text(&text(&[("s", 256)]));
        let old = Key::of_text(&text(&[("s", 256), ("a", 256)]));
        let t0 = Instant::now();
        let later = t0 + std::time::Duration::from_secs(3600);
        idx.insert_at(&old.blocks, 1, t0);
        idx.insert_at(&old.blocks, 2, t0);
        // Worker 1 is sent the system prompt again later (another conversation).
        let t1 = t0 + std::time::Duration::from_secs(10);
        idx.insert_at(&system.blocks, 1, t1);
        // Both workers' caches have evicted what was last used before t0 + 5 s: worker 1
        // still holds the system prompt (sent again since), not the old conversation; worker
        // 2 holds nothing of it; a worker that evicted nothing holds all it was sent.
        let horizon = |s: u64| (s != 3).then_some(t0 + std::time::Duration::from_secs(5));
        let got: Vec<(u64, usize)> = idx
            .matches(&old.blocks, later, |_| true, horizon)
            .iter()
            .map(|m| (m.serial, m.blocks))
            .collect();
        assert_eq!(got, vec![(1, 4)]);
        idx.insert_at(&old.blocks, 3, t0);
        let got: Vec<(u64, usize)> = idx
            .matches(&old.blocks, later, |_| true, horizon)
            .iter()
            .map(|m| (m.serial, m.blocks))
            .collect();
        assert_eq!(got, vec![(3, 8), (1, 4)]);
        // Worker 2's request finished after the horizon: it released the blocks then, so they
        // are still cached.
        idx.touch(&old.blocks, 2, t0 + std::time::Duration::from_secs(6));
        let got: Vec<(u64, usize)> = idx
            .matches(&old.blocks, later, |_| true, horizon)
            .iter()
            .map(|m| (m.serial, m.blocks))
            .collect();
        assert_eq!(got, vec![(2, 8), (3, 8), (1, 4)]);
    }

    #[test]
    fn a_block_remembers_its_most_recent_holders() {
        let idx = PrefixIndex::new(100);
        let k = Key::of_text(&text(&[("a", 64)]));
        for s in 0..(HOLDERS as u64 + 3) {
            idx.insert(&k.blocks, s);
        }
        let m = held(&idx, &k.blocks, |_| true);
        assert_eq!(m.len(), HOLDERS);
        assert!(m.iter().all(|(s, _)| *s >= 3));
    }
}
