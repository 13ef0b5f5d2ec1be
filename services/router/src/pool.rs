//! The router's view of the workers and the choice of one per request. With a fresh coordinator
//! view: power of two choices on the coordinator's score (predicted seconds to drain) plus this
//! router's own correction for requests it sent since that view. Without one (coordinator
//! unreachable, view stale): least outstanding requests from this router. Plain state behind
//! locks, unit-tested without a network.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use rand::Rng;
use rrt_proto::exits::PRIOR_LOOP_STEPS_PER_SECOND;
use rrt_proto::v1 as pb;

/// One worker as the router sees it. `T` is the client handle (a gRPC client in the service,
/// `()` in unit tests).
#[derive(Debug)]
pub struct Slot<T> {
    pub id: String,
    pub address: String,
    pub model: String,
    pub client: T,
    /// Requests this router has in flight on the worker.
    pub in_flight: AtomicUsize,
    /// Requests routed to the worker in total.
    pub routed: AtomicU64,
    state: Mutex<ViewState>,
}

#[derive(Debug, Clone, Default)]
struct ViewState {
    score: f64,
    expected_loops: f64,
    loop_steps_per_second: f64,
    draining: bool,
    /// `in_flight` when the score was computed: requests sent after it are not in the score.
    in_flight_at_view: usize,
}

impl<T> Slot<T> {
    fn new(id: String, address: String, model: String, client: T) -> Self {
        Self {
            id,
            address,
            model,
            client,
            in_flight: AtomicUsize::new(0),
            routed: AtomicU64::new(0),
            state: Mutex::new(ViewState::default()),
        }
    }

    fn state(&self) -> ViewState {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Predicted seconds until one more request would be done here: the coordinator's score
    /// (the worker's pending work over its measured speed), plus the requests this router sent
    /// since that view and the new one itself, at that speed. Counting the new request makes an
    /// idle slow worker lose to a fast one that has a little work.
    fn effective_score(&self, request_tokens: f64) -> f64 {
        let s = self.state();
        let since = self
            .in_flight
            .load(Ordering::Relaxed)
            .saturating_sub(s.in_flight_at_view);
        let rate = if s.loop_steps_per_second > 0.0 {
            s.loop_steps_per_second
        } else {
            PRIOR_LOOP_STEPS_PER_SECOND
        };
        s.score + (since + 1) as f64 * request_tokens * s.expected_loops.max(1.0) / rate
    }
}

/// Decrements the worker's in-flight count when the request ends.
pub struct InFlight<T> {
    pub slot: Arc<Slot<T>>,
}

impl<T> Drop for InFlight<T> {
    fn drop(&mut self) {
        self.slot.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How a worker was chosen (a metrics label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    PowerOfTwo,
    LeastOutstanding,
}

impl Policy {
    pub fn label(self) -> &'static str {
        match self {
            Policy::PowerOfTwo => "p2c_score",
            Policy::LeastOutstanding => "least_outstanding",
        }
    }
}

#[derive(Debug)]
pub struct Pool<T> {
    slots: RwLock<HashMap<String, Arc<Slot<T>>>>,
    view_at: Mutex<Option<Instant>>,
    stale_after: Duration,
    /// Smoothed max_new_tokens of routed requests (the cost of one more request).
    request_tokens: Mutex<f64>,
}

impl<T> Pool<T> {
    pub fn new(stale_after: Duration) -> Self {
        Self {
            slots: RwLock::new(HashMap::new()),
            view_at: Mutex::new(None),
            stale_after,
            request_tokens: Mutex::new(64.0),
        }
    }

    pub fn slots(&self) -> Vec<Arc<Slot<T>>> {
        let mut v: Vec<_> = self
            .slots
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    /// Models served by at least one known worker.
    pub fn models(&self) -> Vec<String> {
        let mut m: Vec<String> = self.slots().iter().map(|s| s.model.clone()).collect();
        m.sort();
        m.dedup();
        m
    }

    /// Adds a worker known without the coordinator (a `--worker` flag), unless present.
    pub fn add_static(&self, id: String, address: String, model: String, client: T) {
        let mut slots = self.slots.write().unwrap_or_else(|p| p.into_inner());
        slots
            .entry(id.clone())
            .or_insert_with(|| Arc::new(Slot::new(id, address, model, client)));
    }

    /// Applies a coordinator view: workers in it are added or updated (`connect` makes the
    /// client of a new one), workers missing from it (evicted) are dropped unless `keep` says
    /// they were configured statically.
    pub fn apply_view(
        &self,
        view: &pb::ClusterView,
        now: Instant,
        connect: impl Fn(&pb::WorkerView) -> Option<T>,
        keep: impl Fn(&str) -> bool,
    ) {
        let mut slots = self.slots.write().unwrap_or_else(|p| p.into_inner());
        slots.retain(|id, s| keep(&s.address) || view.workers.iter().any(|w| &w.worker_id == id));
        for w in &view.workers {
            let slot = match slots.get(&w.worker_id) {
                Some(s) if s.address == w.address && s.model == w.model => s.clone(),
                _ => {
                    let Some(client) = connect(w) else { continue };
                    let s = Arc::new(Slot::new(
                        w.worker_id.clone(),
                        w.address.clone(),
                        w.model.clone(),
                        client,
                    ));
                    slots.insert(w.worker_id.clone(), s.clone());
                    s
                }
            };
            *slot.state.lock().unwrap_or_else(|p| p.into_inner()) = ViewState {
                score: w.score,
                expected_loops: w.expected_loops,
                loop_steps_per_second: w.loop_steps_per_second,
                draining: w.draining,
                in_flight_at_view: slot.in_flight.load(Ordering::Relaxed),
            };
        }
        *self.view_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(now);
    }

    /// When the latest coordinator view arrived (`None` before the first).
    pub fn view_at(&self) -> Option<Instant> {
        *self.view_at.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the coordinator view is recent enough to pick by its scores.
    pub fn is_fresh(&self, now: Instant) -> bool {
        self.view_at()
            .is_some_and(|t| now.duration_since(t) <= self.stale_after)
    }

    /// Picks a worker for `model` and counts the request in flight on it; `None` if no worker
    /// serves the model. `max_new_tokens` is the size of a generation (`None`: a metadata call
    /// such as Tokenize, which is not counted as routed). `exclude` skips workers that
    /// failed this request.
    pub fn pick(
        &self,
        model: &str,
        max_new_tokens: Option<u32>,
        now: Instant,
        exclude: &[String],
        rng: &mut impl Rng,
    ) -> Option<(InFlight<T>, Policy)> {
        let request_tokens = {
            let mut t = self
                .request_tokens
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if let Some(n) = max_new_tokens {
                *t = 0.9 * *t + 0.1 * n as f64;
            }
            *t
        };
        let all: Vec<Arc<Slot<T>>> = self
            .slots()
            .into_iter()
            .filter(|s| s.model == model && !exclude.contains(&s.id))
            .collect();
        let serving: Vec<Arc<Slot<T>>> = all
            .iter()
            .filter(|s| !s.state().draining)
            .cloned()
            .collect();
        let candidates = if serving.is_empty() { all } else { serving };
        if candidates.is_empty() {
            return None;
        }
        let (chosen, policy) = if self.is_fresh(now) {
            let a = rng.random_range(0..candidates.len());
            let chosen = if candidates.len() == 1 {
                &candidates[a]
            } else {
                let mut b = rng.random_range(0..candidates.len() - 1);
                if b >= a {
                    b += 1;
                }
                let (sa, sb) = (
                    candidates[a].effective_score(request_tokens),
                    candidates[b].effective_score(request_tokens),
                );
                if sb < sa {
                    &candidates[b]
                } else {
                    &candidates[a]
                }
            };
            (chosen.clone(), Policy::PowerOfTwo)
        } else {
            let least = candidates
                .iter()
                .map(|s| s.in_flight.load(Ordering::Relaxed))
                .min()
                .unwrap_or(0);
            let ties: Vec<&Arc<Slot<T>>> = candidates
                .iter()
                .filter(|s| s.in_flight.load(Ordering::Relaxed) == least)
                .collect();
            (
                ties[rng.random_range(0..ties.len())].clone(),
                Policy::LeastOutstanding,
            )
        };
        chosen.in_flight.fetch_add(1, Ordering::Relaxed);
        if max_new_tokens.is_some() {
            chosen.routed.fetch_add(1, Ordering::Relaxed);
        }
        Some((InFlight { slot: chosen }, policy))
    }
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    use super::*;

    fn view(scores: &[(&str, f64)]) -> pb::ClusterView {
        pb::ClusterView {
            workers: scores
                .iter()
                .map(|(id, score)| pb::WorkerView {
                    worker_id: id.to_string(),
                    address: format!("{id}:1"),
                    model: "m".into(),
                    score: *score,
                    expected_loops: 2.0,
                    loop_steps_per_second: 100.0,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn power_of_two_prefers_the_lower_score_and_corrects_for_its_own_requests() {
        let pool: Pool<()> = Pool::new(Duration::from_secs(2));
        let t = Instant::now();
        pool.apply_view(&view(&[("a", 0.0), ("b", 5.0)]), t, |_| Some(()), |_| false);
        let mut rng = StdRng::seed_from_u64(1);
        let mut held = Vec::new();
        let mut order = String::new();
        for _ in 0..10 {
            let (g, policy) = pool.pick("m", Some(64), t, &[], &mut rng).unwrap();
            assert_eq!(policy, Policy::PowerOfTwo);
            order.push_str(&g.slot.id);
            held.push(g);
        }
        // a starts 5 s ahead; each request adds 64 x 2 / 100 = 1.28 s to its worker's score
        // (request size is smoothed from 64, so it stays 64): a takes four, then they alternate.
        assert_eq!(order, "aaaababababa"[..10].to_string());
        drop(held);
        assert!(pool
            .slots()
            .iter()
            .all(|s| s.in_flight.load(Ordering::Relaxed) == 0));
    }

    #[test]
    fn an_idle_slow_worker_loses_to_a_faster_one_with_a_little_work() {
        let pool: Pool<()> = Pool::new(Duration::from_secs(2));
        let t = Instant::now();
        let mut v = view(&[("fast", 0.5), ("slow", 0.0)]);
        v.workers[0].loop_steps_per_second = 1000.0;
        v.workers[1].loop_steps_per_second = 100.0;
        pool.apply_view(&v, t, |_| Some(()), |_| false);
        let mut rng = StdRng::seed_from_u64(3);
        // 64 tokens x 2 loops: 0.128 s more on the fast worker, 1.28 s on the slow one.
        for _ in 0..4 {
            let (g, _) = pool.pick("m", Some(64), t, &[], &mut rng).unwrap();
            assert_eq!(g.slot.id, "fast");
        }
    }

    #[test]
    fn a_stale_view_falls_back_to_least_outstanding_and_unknown_models_get_none() {
        let pool: Pool<()> = Pool::new(Duration::from_secs(2));
        let t = Instant::now();
        pool.apply_view(
            &view(&[("a", 0.0), ("b", 100.0)]),
            t,
            |_| Some(()),
            |_| false,
        );
        let later = t + Duration::from_secs(3);
        let mut rng = StdRng::seed_from_u64(2);
        let (g1, p) = pool.pick("m", Some(8), later, &[], &mut rng).unwrap();
        assert_eq!(p, Policy::LeastOutstanding);
        let (g2, _) = pool.pick("m", Some(8), later, &[], &mut rng).unwrap();
        assert_ne!(g1.slot.id, g2.slot.id, "least outstanding alternates");
        assert!(pool.pick("other", Some(8), later, &[], &mut rng).is_none());
        let (g3, _) = pool
            .pick("m", Some(8), later, &["a".into()], &mut rng)
            .unwrap();
        assert_eq!(g3.slot.id, "b");
    }

    #[test]
    fn evicted_workers_leave_the_pool_unless_static() {
        let pool: Pool<()> = Pool::new(Duration::from_secs(2));
        let t = Instant::now();
        pool.apply_view(&view(&[("a", 0.0), ("b", 0.0)]), t, |_| Some(()), |_| false);
        pool.apply_view(&view(&[("b", 0.0)]), t, |_| Some(()), |addr| addr == "a:1");
        assert_eq!(pool.slots().len(), 2);
        pool.apply_view(&view(&[("b", 0.0)]), t, |_| Some(()), |_| false);
        assert_eq!(pool.slots().len(), 1);
    }
}
