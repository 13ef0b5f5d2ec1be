//! The choice of a worker per request (`--balance`). Policies:
//!
//! - `round-robin`: each worker in turn.
//! - `least-outstanding`: the fewest requests waiting and running, counted cluster-wide (the
//!   coordinator's view of every router's requests, plus this router's sent since the view).
//! - `power-of-two`: the lower predicted drain time of two random workers (the coordinator's
//!   score plus this router's work sent since the view).
//! - `depth-aware`: the lowest predicted load over all workers, each request's work being its
//!   tokens times the loops its class (system prompt, template) was seen to take ([`depth`]),
//!   not the worker's mean (this router's own in-flight work keeps it from herding).
//! - `cache-aware`: the worker that was sent the longest prefix of the request ([`prefix`]),
//!   while the work queued on it is within `--spill-s` of the least loaded worker's and its KV
//!   use under `--spill-kv`; otherwise a worker within `--spill-s` of the least loaded, the
//!   same one for the request's class in every router replica (rendezvous hashing), which
//!   becomes a holder of the prefix. A conversation's next turn takes its previous reply's
//!   work off the holder's queue for that test: the turn has ended, though a replica that did
//!   not send it still sees its work there until the holder's next report.
//! - `combined` (the default): `cache-aware` with `depth-aware` loads.
//!
//! (A first `combined` also charged each candidate the prefill of the prompt tokens it does not
//! hold, at the worker's measured loop-steps per second, and chose the alternative from two
//! random workers. On the simulated cluster it held requests on busy holders far too long: a
//! lightly loaded worker measures a low rate (its steps are mostly fixed cost), so a miss looked
//! seconds dearer than it is, and p99 time to first token was 3.7x round-robin's. Measured
//! in docs/scale.md.)
//!
//! With a stale coordinator view every policy but round-robin falls back to this router's own
//! least outstanding. Predicted prefix matches are corrected by what workers report: a prefix
//! last sent to a worker before its prefix-cache horizon (how long ago its most recently
//! evicted block was last used) counts as evicted there, and each finished request's cached
//! prompt tokens against the match predicted for it make a per-worker trust factor (a worker
//! whose cache turned over gets less credit for what it was sent).

pub mod depth;
pub mod prefix;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;
use rrt_proto::v1 as pb;

use crate::pool::{InFlight, Pool, Slot, ViewState};
pub use depth::DepthHistory;
pub use prefix::{Key, Match, PrefixIndex};

/// The routing policy (`--balance`).
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Balance {
    RoundRobin,
    LeastOutstanding,
    PowerOfTwo,
    DepthAware,
    CacheAware,
    Combined,
}

impl Balance {
    /// The metrics label.
    pub fn label(self) -> &'static str {
        match self {
            Balance::RoundRobin => "round_robin",
            Balance::LeastOutstanding => "least_outstanding",
            Balance::PowerOfTwo => "power_of_two",
            Balance::DepthAware => "depth_aware",
            Balance::CacheAware => "cache_aware",
            Balance::Combined => "combined",
        }
    }

    fn uses_depth(self) -> bool {
        matches!(self, Balance::DepthAware | Balance::Combined)
    }
}

/// Why a worker was chosen (a metrics label, with the policy).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Round robin's turn.
    Turn,
    /// The fewest outstanding requests.
    Fewest,
    /// The lower load of two random workers.
    Load,
    /// The worker holding the longest prefix of the request.
    PrefixHit,
    /// A worker held a prefix but was loaded: the request went where it finishes sooner.
    SpillLoad,
    /// A worker held a prefix but its KV blocks were nearly all in use.
    SpillKv,
    /// No worker was sent a prefix of the request.
    NoPrefix,
    /// The coordinator's view is stale: this router's own least outstanding.
    StaleView,
    /// A metadata call (tokenize, model info): not a generation.
    Metadata,
}

impl Reason {
    pub fn label(self) -> &'static str {
        match self {
            Reason::Turn => "turn",
            Reason::Fewest => "fewest",
            Reason::Load => "load",
            Reason::PrefixHit => "prefix_hit",
            Reason::SpillLoad => "spill_load",
            Reason::SpillKv => "spill_kv",
            Reason::NoPrefix => "no_prefix",
            Reason::StaleView => "stale_view",
            Reason::Metadata => "metadata",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub balance: Balance,
    /// Seconds of predicted load a worker holding the prefix may carry above the least loaded
    /// worker's before a request spills there.
    pub spill_s: f64,
    /// KV use (0..1) at which a worker holding the prefix stops taking more.
    pub spill_kv: f64,
    /// Blocks the prefix index keeps at most.
    pub index_blocks: usize,
    /// How long after a prefix was placed on a worker it counts as cached there in the work a
    /// request is predicted to bring (`--prefix-settle-ms`).
    pub settle: Duration,
    /// Whether a prefix sent to a worker before its reported cache horizon counts as evicted
    /// (`--prefix-horizon`).
    pub cache_horizon: bool,
    /// Request classes the depth history keeps at most.
    pub depth_classes: usize,
    /// Share this router's placements with the other routers through the coordinator (and
    /// learn theirs).
    pub share_placements: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            balance: Balance::Combined,
            spill_s: 0.1,
            spill_kv: 0.9,
            index_blocks: 262_144,
            settle: Duration::from_millis(500),
            cache_horizon: true,
            depth_classes: 4096,
            share_placements: true,
        }
    }
}

/// What a request is, for the choice.
#[derive(Debug, Clone, Copy)]
pub struct Ask<'a> {
    pub model: &'a str,
    /// Tokens to generate (`None`: a metadata call, not counted as routed).
    pub max_new_tokens: Option<u32>,
    pub key: &'a Key,
}

/// How a request was placed, kept with it until it finishes ([`Balancer::finished`]).
#[derive(Debug, Clone)]
pub struct Route {
    pub policy: Balance,
    pub reason: Reason,
    /// The chosen slot and its predicted share of the prompt already cached there.
    pub serial: u64,
    pub predicted_hit: f64,
    pub class: u64,
    /// The request's prefix blocks, touched on the worker when it finishes (empty for a
    /// metadata call).
    pub blocks: Vec<u64>,
}

#[derive(Debug)]
pub struct Balancer {
    pub settings: Settings,
    pub index: PrefixIndex,
    pub depth: DepthHistory,
    /// Per slot serial: reported over predicted cached prompt share, a moving average in 0..1.
    trust: Mutex<HashMap<u64, f64>>,
    turn: AtomicUsize,
    /// This router's id among its replicas (random per process).
    pub router_id: String,
    /// Placements not yet shared: (worker id, blocks new to it), bounded by [`OUTBOX_BLOCKS`].
    outbox: Mutex<(VecDeque<pb::Placement>, usize)>,
}

/// Placement blocks waiting to be shared at most (a coordinator that is down for a while loses
/// the oldest).
pub const OUTBOX_BLOCKS: usize = 1 << 16;
/// Blocks per shared batch at most (well under the coordinator's message limit).
pub const BATCH_BLOCKS: usize = 4096;

/// One candidate's figures for this request.
struct Option_<'a, T> {
    slot: &'a Arc<Slot<T>>,
    state: ViewState,
    /// Bytes of the request's prefix it was sent (trust-weighted), 0 when none.
    matched: f64,
    /// Of those, the bytes sent at least `settle` ago (likely in its cache by now).
    settled: f64,
    /// The same bytes without the trust factor, and when they were last sent there (index
    /// ticks).
    held: usize,
    last: u64,
}

impl Balancer {
    pub fn new(settings: Settings) -> Self {
        Self {
            index: PrefixIndex::new(settings.index_blocks),
            depth: DepthHistory::new(settings.depth_classes),
            settings,
            trust: Mutex::new(HashMap::new()),
            turn: AtomicUsize::new(0),
            router_id: format!("{:016x}", rand::random::<u64>()),
            outbox: Mutex::new((VecDeque::new(), 0)),
        }
    }

    /// Takes up to [`BATCH_BLOCKS`] of the placements waiting to be shared (oldest first).
    pub fn take_placements(&self) -> Vec<pb::Placement> {
        let mut outbox = self.outbox.lock().unwrap_or_else(|p| p.into_inner());
        let (mut n, mut k) = (0, 0);
        // At least one (a single request's blocks stay under the coordinator's message limit).
        while k < outbox.0.len() && (k == 0 || n + outbox.0[k].blocks.len() <= BATCH_BLOCKS) {
            n += outbox.0[k].blocks.len();
            k += 1;
        }
        outbox.1 -= n;
        outbox.0.drain(..k).collect()
    }

    fn queue_placement(&self, worker_id: &str, blocks: Vec<u64>) {
        let mut outbox = self.outbox.lock().unwrap_or_else(|p| p.into_inner());
        outbox.1 += blocks.len();
        outbox.0.push_back(pb::Placement {
            worker_id: worker_id.to_string(),
            blocks,
        });
        while outbox.1 > OUTBOX_BLOCKS {
            let Some(dropped) = outbox.0.pop_front() else {
                break;
            };
            outbox.1 -= dropped.blocks.len();
        }
    }

    /// Learns other routers' placements (batches from this router are skipped): each
    /// placement's blocks become held by its worker's slot here, as if sent from here.
    pub fn learn<T>(&self, pool: &Pool<T>, batches: &[pb::PlacementBatch]) -> usize {
        let mut learned = 0;
        for b in batches.iter().filter(|b| b.router_id != self.router_id) {
            for p in &b.placements {
                if let Some(serial) = pool.serial_of(&p.worker_id) {
                    self.index.insert(&p.blocks, serial);
                    learned += p.blocks.len();
                }
            }
        }
        learned
    }

    fn trust(&self, serial: u64) -> f64 {
        self.trust
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&serial)
            .copied()
            .unwrap_or(1.0)
    }

    /// Loops each token of the request is expected to take on a worker in state `s`.
    fn loops(&self, ask: &Ask, s: &ViewState) -> f64 {
        let worker = s.expected_loops.max(1.0);
        if self.settings.balance.uses_depth() {
            self.depth.predict(ask.key.class).unwrap_or(worker)
        } else {
            worker
        }
    }

    /// Predicted loop-steps of the request's generation on a worker in state `s`.
    fn work(&self, ask: &Ask, s: &ViewState) -> f64 {
        ask.max_new_tokens.unwrap_or(0) as f64 * self.loops(ask, s)
    }

    /// Predicted seconds until the request would be done generating on `o`.
    fn load<T>(&self, ask: &Ask, o: &Option_<T>) -> f64 {
        o.slot.load(&o.state, self.work(ask, &o.state))
    }

    /// Picks a worker for `ask` among those serving its model (not `exclude`d, not draining
    /// unless all are) and counts the request in flight there. `None`: no worker serves it.
    pub fn choose<T>(
        &self,
        pool: &Pool<T>,
        ask: &Ask,
        now: Instant,
        exclude: &[String],
        rng: &mut impl Rng,
    ) -> Option<(InFlight<T>, Route)> {
        let all = pool.serving(ask.model);
        if let Some((chosen, reason)) = self.quick(pool, ask, &all, now, exclude, rng) {
            return Some(self.place(ask, &chosen, reason, now));
        }
        let mut options: Vec<Option_<T>> = all
            .iter()
            .filter(|s| !exclude.contains(&s.id))
            .map(|slot| Option_ {
                state: slot.state(),
                slot,
                matched: 0.0,
                settled: 0.0,
                held: 0,
                last: 0,
            })
            .collect();
        if options.iter().any(|o| !o.state.draining) {
            options.retain(|o| !o.state.draining);
        }
        if options.is_empty() {
            return None;
        }
        let policy = self.settings.balance;
        let (i, reason) = if ask.max_new_tokens.is_none() {
            (
                self.turn.fetch_add(1, Ordering::Relaxed) % options.len(),
                Reason::Metadata,
            )
        } else if policy == Balance::RoundRobin {
            (
                self.turn.fetch_add(1, Ordering::Relaxed) % options.len(),
                Reason::Turn,
            )
        } else if !pool.is_fresh(now) {
            let i = least_by(&options, rng, |o| {
                o.slot.in_flight.load(Ordering::Relaxed) as f64
            });
            (i, Reason::StaleView)
        } else {
            match policy {
                Balance::LeastOutstanding => (
                    least_by(&options, rng, |o| o.slot.outstanding(&o.state) as f64),
                    Reason::Fewest,
                ),
                Balance::PowerOfTwo => (self.two_choices(ask, &options, rng), Reason::Load),
                Balance::DepthAware => {
                    (least_by(&options, rng, |o| self.load(ask, o)), Reason::Load)
                }
                Balance::CacheAware | Balance::Combined => self.by_prefix(ask, &mut options, now),
                Balance::RoundRobin => unreachable!("handled above"),
            }
        };
        Some(self.place(ask, &options[i], reason, now))
    }

    /// Round-robin (and metadata calls) and power-of-two need one or two workers' states, not
    /// every worker's: the next in turn that is usable, or two random ones with a fresh view.
    /// `None` where that does not settle it (another policy, a stale view, a drawn worker
    /// excluded or draining, every worker draining): the full choice decides.
    fn quick<'a, T>(
        &self,
        pool: &Pool<T>,
        ask: &Ask,
        all: &'a [Arc<Slot<T>>],
        now: Instant,
        exclude: &[String],
        rng: &mut impl Rng,
    ) -> Option<(Option_<'a, T>, Reason)> {
        let usable = |slot: &'a Arc<Slot<T>>| {
            if exclude.contains(&slot.id) {
                return None;
            }
            let state = slot.state();
            (!state.draining).then_some(Option_ {
                slot,
                state,
                matched: 0.0,
                settled: 0.0,
                held: 0,
                last: 0,
            })
        };
        let n = all.len();
        let policy = self.settings.balance;
        if n == 0 {
            None
        } else if ask.max_new_tokens.is_none() || policy == Balance::RoundRobin {
            let reason = match ask.max_new_tokens {
                None => Reason::Metadata,
                Some(_) => Reason::Turn,
            };
            let start = self.turn.fetch_add(1, Ordering::Relaxed);
            (0..n)
                .find_map(|k| usable(&all[(start + k) % n]))
                .map(|o| (o, reason))
        } else if policy == Balance::PowerOfTwo && pool.is_fresh(now) {
            let (a, b) = two_random(n, rng);
            let a = usable(&all[a])?;
            let chosen = match b {
                None => a,
                Some(b) => {
                    let b = usable(&all[b])?;
                    if self.load(ask, &b) < self.load(ask, &a) {
                        b
                    } else {
                        a
                    }
                }
            };
            Some((chosen, Reason::Load))
        } else {
            None
        }
    }

    /// Counts the request in flight on `chosen` and records what was sent there.
    fn place<T>(
        &self,
        ask: &Ask,
        chosen: &Option_<T>,
        reason: Reason,
        now: Instant,
    ) -> (InFlight<T>, Route) {
        let policy = self.settings.balance;
        // A prefix placed moments ago is not cached yet (its first request is still
        // prefilling it): it is predicted, and counted in the work, as a miss.
        let predicted_hit = if ask.key.bytes > 0 {
            (prefix_tokens(chosen.settled) / ask.key.tokens()).min(1.0)
        } else {
            0.0
        };
        // Its work as the worker's score will count it: the generation, and the prompt tokens
        // not cached there through every loop (the worker's mean loops standing in for the
        // model's depth), so the score's share of it comes off again once it finishes.
        let uncached = (ask.key.tokens() - prefix_tokens(chosen.settled)).max(0.0);
        let prompt_work = uncached * chosen.state.expected_loops.max(1.0);
        let work = (self.work(ask, &chosen.state) + prompt_work).round() as u64;
        let guard = InFlight::new(chosen.slot.clone(), work);
        if ask.max_new_tokens.is_some() {
            chosen.slot.routed.fetch_add(1, Ordering::Relaxed);
            // Every policy keeps the index, so switching policies starts from what was sent.
            let new = self
                .index
                .insert_at(&ask.key.blocks, chosen.slot.serial, now);
            if self.settings.share_placements && !new.is_empty() {
                self.queue_placement(&chosen.slot.id, new);
            }
        }
        let route = Route {
            policy,
            reason,
            serial: chosen.slot.serial,
            predicted_hit,
            class: ask.key.class,
            blocks: match ask.max_new_tokens {
                Some(_) => ask.key.blocks.clone(),
                None => Vec::new(),
            },
        };
        (guard, route)
    }

    /// The lower load of two distinct random options.
    fn two_choices<T>(&self, ask: &Ask, options: &[Option_<T>], rng: &mut impl Rng) -> usize {
        let (a, b) = two_random(options.len(), rng);
        match b {
            Some(b) if self.load(ask, &options[b]) < self.load(ask, &options[a]) => b,
            _ => a,
        }
    }

    /// Cache-aware and combined: affinity to the longest held prefix while its holder is not
    /// more loaded than the least loaded worker (plus `--spill-s`).
    fn by_prefix<T>(&self, ask: &Ask, options: &mut [Option_<T>], now: Instant) -> (usize, Reason) {
        // (`settle` zero: every placement counts at once.)
        let settled = match now.checked_sub(self.settings.settle) {
            Some(t) if !self.settings.settle.is_zero() => t,
            _ => now + Duration::from_secs(86_400),
        };
        // The few workers sent a prefix of it and still holding it by their cache horizons (a
        // slot gone from the pool matches nothing).
        let horizons: HashMap<u64, Instant> = if self.settings.cache_horizon {
            options
                .iter()
                .filter_map(|o| Some((o.slot.serial, o.state.cache_horizon?)))
                .collect()
        } else {
            HashMap::new()
        };
        let found: HashMap<u64, Match> = self
            .index
            .matches(
                &ask.key.blocks,
                settled,
                |_| true,
                |s| horizons.get(&s).copied(),
            )
            .into_iter()
            .map(|m| (m.serial, m))
            .collect();
        if !found.is_empty() {
            for o in options.iter_mut() {
                let Some(m) = found.get(&o.slot.serial) else {
                    continue;
                };
                let trust = self.trust(m.serial);
                o.held = ask.key.bytes_in(m.blocks);
                o.matched = o.held as f64 * trust;
                o.settled = ask.key.bytes_in(m.settled) as f64 * trust;
                o.last = m.last;
            }
        }
        // Affinity compares the work queued ahead of the request (its own work would differ
        // only by the workers' measured speeds, which an idle worker has not measured yet).
        let queued = |o: &Option_<T>| o.slot.load(&o.state, 0.0);
        let band = options.iter().map(queued).fold(f64::INFINITY, f64::min) + self.settings.spill_s;
        // The holder: the longest match; among workers sent as much of it (a popular system
        // prompt's several holders), one with room (queued within `--spill-s` of the least)
        // and, of those, the one sent it last (the likeliest to still have it cached: worker
        // caches evict the least recently used); then the more trusted, then the less loaded.
        let holder = (0..options.len())
            .filter(|&i| options[i].held > 0)
            .min_by(|&a, &b| {
                let (oa, ob) = (&options[a], &options[b]);
                let room = |o: &Option_<T>| queued(o) <= band;
                ob.held
                    .cmp(&oa.held)
                    .then(room(ob).cmp(&room(oa)))
                    .then(ob.last.cmp(&oa.last))
                    .then(ob.matched.total_cmp(&oa.matched))
                    .then(self.load(ask, oa).total_cmp(&self.load(ask, ob)))
            });
        // The alternative: among the others whose load is within `--spill-s` of the least,
        // the one the request's class hashes highest with (rendezvous hashing). Every router
        // replica with the same view so sends a new system prompt, and its spills, to the same
        // worker, without sharing its index.
        let others: Vec<usize> = (0..options.len()).filter(|&i| Some(i) != holder).collect();
        let alternative = (!others.is_empty()).then(|| {
            let loads: Vec<f64> = others
                .iter()
                .map(|&i| self.load(ask, &options[i]))
                .collect();
            let least = loads.iter().copied().fold(f64::INFINITY, f64::min);
            let band = least + self.settings.spill_s;
            (0..others.len())
                .filter(|&j| loads[j] <= band)
                .max_by_key(|&j| rendezvous(ask.key.class, &options[others[j]].slot.id))
                .map_or(others[0], |j| others[j])
        });
        // A conversation's next turn means its previous one has ended. Its reply's work may
        // still weigh on the holder in the coordinator's view until the holder's next report
        // (a replica that did not send that turn cannot know it ended; the one that did has
        // already taken it off): it comes off the holder's queue for the affinity test, in
        // every replica alike.
        let reply_tokens = ask.key.reply_bytes as f64 / prefix::BYTES_PER_TOKEN;
        let ended =
            |o: &Option_<T>| reply_tokens * self.loops(ask, &o.state) / o.slot.rate(&o.state);
        match (holder, alternative) {
            (None, Some(a)) => (a, Reason::NoPrefix),
            (None, None) => (0, Reason::NoPrefix),
            (Some(h), None) => (h, Reason::PrefixHit),
            (Some(h), Some(a)) => {
                if options[h].state.kv_usage >= self.settings.spill_kv {
                    (a, Reason::SpillKv)
                } else if (queued(&options[h]) - ended(&options[h])).max(0.0)
                    <= queued(&options[a]) + self.settings.spill_s
                {
                    (h, Reason::PrefixHit)
                } else {
                    (a, Reason::SpillLoad)
                }
            }
        }
    }

    /// A routed request finished: learn its class's depth and the worker's cache trust, and
    /// note when the worker last used its prefix.
    /// `mean_loops`: its tokens' mean exit loop (`None` without tokens); `prompt_tokens` and
    /// `cached_prompt_tokens` as the worker reported them.
    pub fn finished(
        &self,
        route: &Route,
        mean_loops: Option<f64>,
        prompt_tokens: u32,
        cached_prompt_tokens: u32,
    ) {
        if let Some(l) = mean_loops {
            self.depth.observe(route.class, l);
        }
        // The worker released the request's blocks now: its cache's horizon counts from here.
        self.index
            .touch(&route.blocks, route.serial, Instant::now());
        if route.predicted_hit > 0.1 && prompt_tokens > 0 {
            let seen = cached_prompt_tokens as f64 / prompt_tokens as f64;
            let ratio = (seen / route.predicted_hit).clamp(0.0, 1.0);
            let mut trust = self.trust.lock().unwrap_or_else(|p| p.into_inner());
            let t = trust.entry(route.serial).or_insert(1.0);
            *t = 0.8 * *t + 0.2 * ratio;
            if trust.len() > 4 * self.settings.depth_classes {
                trust.clear();
            }
        }
    }
}

/// The rendezvous weight of a request class on a worker: the same in every router process.
fn rendezvous(class: u64, worker_id: &str) -> u64 {
    prefix::hash_of(&[&class.to_le_bytes(), worker_id.as_bytes()])
}

/// Estimated prompt tokens in `bytes` (trust-weighted) bytes of a prefix.
fn prefix_tokens(bytes: f64) -> f64 {
    bytes / prefix::BYTES_PER_TOKEN
}

/// Two distinct random indices below `n` (the second `None` when `n` is 1).
fn two_random(n: usize, rng: &mut impl Rng) -> (usize, Option<usize>) {
    let a = rng.random_range(0..n);
    if n == 1 {
        return (a, None);
    }
    let mut b = rng.random_range(0..n - 1);
    if b >= a {
        b += 1;
    }
    (a, Some(b))
}

/// The index of the item of `items` with the lowest `f`, ties broken at random.
fn least_by<I>(items: &[I], rng: &mut impl Rng, f: impl Fn(&I) -> f64) -> usize {
    let values: Vec<f64> = items.iter().map(&f).collect();
    let least = values.iter().copied().fold(f64::INFINITY, f64::min);
    let ties: Vec<usize> = (0..values.len()).filter(|&i| values[i] <= least).collect();
    ties[rng.random_range(0..ties.len())]
}

#[cfg(test)]
mod tests;
