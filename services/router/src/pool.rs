//! The router's view of the workers: one slot per worker with the coordinator's latest figures
//! for it and this router's own requests in flight there, grouped by model. The grouping is
//! rebuilt when the membership changes (a coordinator view that adds or drops a worker, a
//! static worker found), so a request reads its model's list without cloning or sorting the
//! pool. The choice of a worker is [`crate::balance`]'s. Plain state behind locks, unit-tested
//! without a network.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use rrt_proto::exits::rate_or_prior;
use rrt_proto::v1 as pb;

/// Slot serials: a worker that leaves and comes back (or moves) gets a new slot, and what the
/// router remembered about the old one (cached prefixes) no longer matches.
static SERIAL: AtomicU64 = AtomicU64::new(1);

/// One worker as the router sees it. `T` is the client handle (a gRPC client in the service,
/// `()` in unit tests).
#[derive(Debug)]
pub struct Slot<T> {
    pub id: String,
    pub address: String,
    pub model: String,
    pub client: T,
    /// Unique over the process's life ([`SERIAL`]).
    pub serial: u64,
    /// Requests this router has in flight on the worker.
    pub in_flight: AtomicUsize,
    /// Their predicted loop-steps (tokens to generate x expected loops).
    pub work_in_flight: AtomicU64,
    /// Requests routed to the worker in total.
    pub routed: AtomicU64,
    state: Mutex<ViewState>,
}

/// The coordinator's figures for a worker, and this router's in-flight counts when they came.
#[derive(Debug, Clone, Default)]
pub struct ViewState {
    /// Predicted seconds to drain the worker's pending work (the coordinator's score).
    pub score: f64,
    pub expected_loops: f64,
    pub loop_steps_per_second: f64,
    pub draining: bool,
    /// Requests waiting and running on the worker, from every router.
    pub outstanding: u32,
    /// KV blocks held over the pool, 0..1.
    pub kv_usage: f64,
    /// The worker's prefix-cache hit rate since it started, 0..1.
    pub prefix_cache_hit_rate: f64,
    /// The worker's prefix-cache horizon: a prefix last sent there before it has been evicted
    /// (`None`: nothing evicted yet).
    pub cache_horizon: Option<Instant>,
    /// `in_flight` and `work_in_flight` when the view came: what was sent after is not in it.
    in_flight_at_view: usize,
    work_at_view: u64,
}

impl<T> Slot<T> {
    fn new(id: String, address: String, model: String, client: T) -> Self {
        Self {
            id,
            address,
            model,
            client,
            serial: SERIAL.fetch_add(1, Ordering::Relaxed),
            in_flight: AtomicUsize::new(0),
            work_in_flight: AtomicU64::new(0),
            routed: AtomicU64::new(0),
            state: Mutex::new(ViewState::default()),
        }
    }

    pub fn state(&self) -> ViewState {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Loop-steps per second: measured, or the prior before the worker has measured any.
    pub fn rate(&self, s: &ViewState) -> f64 {
        rate_or_prior(s.loop_steps_per_second)
    }

    /// Requests this router sent since the view.
    pub fn sent_since_view(&self, s: &ViewState) -> usize {
        self.in_flight
            .load(Ordering::Relaxed)
            .saturating_sub(s.in_flight_at_view)
    }

    /// Predicted seconds until `work` more loop-steps would be done here: the coordinator's
    /// score (the worker's pending work over its measured speed), corrected by this router's
    /// own requests since that view (work sent since adds; work of its requests that finished
    /// since comes off, down to an idle worker), plus the new request itself, at that speed.
    /// Counting the new request makes an idle slow worker lose to a fast one that has a little
    /// work; taking finished requests off keeps a worker that just served a request from
    /// looking busy until the next view.
    pub fn load(&self, s: &ViewState, work: f64) -> f64 {
        let rate = self.rate(s);
        let delta = self.work_in_flight.load(Ordering::Relaxed) as f64 - s.work_at_view as f64;
        (s.score + delta / rate).max(0.0) + work / rate
    }

    /// Requests outstanding on the worker from every router: the view's count plus what this
    /// router sent since.
    pub fn outstanding(&self, s: &ViewState) -> usize {
        s.outstanding as usize + self.sent_since_view(s)
    }
}

/// A request's place on a worker: counted in flight (and its predicted work) until dropped.
pub struct InFlight<T> {
    pub slot: Arc<Slot<T>>,
    work: u64,
}

impl<T> InFlight<T> {
    /// Counts a request of `work` predicted loop-steps in flight on `slot`.
    pub fn new(slot: Arc<Slot<T>>, work: u64) -> Self {
        slot.in_flight.fetch_add(1, Ordering::Relaxed);
        slot.work_in_flight.fetch_add(work, Ordering::Relaxed);
        Self { slot, work }
    }
}

impl<T> Drop for InFlight<T> {
    fn drop(&mut self) {
        self.slot.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.slot
            .work_in_flight
            .fetch_sub(self.work, Ordering::Relaxed);
    }
}

/// The slots grouped by model, each list in id order; rebuilt on membership changes.
#[derive(Debug)]
struct Groups<T> {
    by_model: HashMap<String, Arc<Vec<Arc<Slot<T>>>>>,
    models: Arc<Vec<String>>,
    all: usize,
}

impl<T> Default for Groups<T> {
    fn default() -> Self {
        Self {
            by_model: HashMap::new(),
            models: Arc::new(Vec::new()),
            all: 0,
        }
    }
}

#[derive(Debug)]
pub struct Pool<T> {
    slots: RwLock<HashMap<String, Arc<Slot<T>>>>,
    groups: RwLock<Groups<T>>,
    view_at: Mutex<Option<Instant>>,
    stale_after: Duration,
}

impl<T> Pool<T> {
    pub fn new(stale_after: Duration) -> Self {
        Self {
            slots: RwLock::new(HashMap::new()),
            groups: RwLock::new(Groups::default()),
            view_at: Mutex::new(None),
            stale_after,
        }
    }

    /// Every slot, in id order.
    pub fn slots(&self) -> Vec<Arc<Slot<T>>> {
        let g = self.groups.read().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<_> = g
            .by_model
            .values()
            .flat_map(|l| l.iter().cloned())
            .collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    /// Workers known.
    pub fn len(&self) -> usize {
        self.groups.read().unwrap_or_else(|p| p.into_inner()).all
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The workers serving `model`, in id order (shared, not copied).
    pub fn serving(&self, model: &str) -> Arc<Vec<Arc<Slot<T>>>> {
        self.groups
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .by_model
            .get(model)
            .cloned()
            .unwrap_or_default()
    }

    /// Models served by at least one known worker, sorted.
    pub fn models(&self) -> Arc<Vec<String>> {
        self.groups
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .models
            .clone()
    }

    fn regroup(&self, slots: &HashMap<String, Arc<Slot<T>>>) {
        let mut by_model: HashMap<String, Vec<Arc<Slot<T>>>> = HashMap::new();
        for s in slots.values() {
            by_model.entry(s.model.clone()).or_default().push(s.clone());
        }
        let mut models: Vec<String> = by_model.keys().cloned().collect();
        models.sort();
        let by_model = by_model
            .into_iter()
            .map(|(m, mut l)| {
                l.sort_by(|a, b| a.id.cmp(&b.id));
                (m, Arc::new(l))
            })
            .collect();
        *self.groups.write().unwrap_or_else(|p| p.into_inner()) = Groups {
            by_model,
            models: Arc::new(models),
            all: slots.len(),
        };
    }

    /// The slot serial of worker `id`, if known.
    pub fn serial_of(&self, id: &str) -> Option<u64> {
        self.slots
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .map(|s| s.serial)
    }

    /// Adds a worker known without the coordinator (a `--worker` flag), unless present.
    pub fn add_static(&self, id: String, address: String, model: String, client: T) {
        let mut slots = self.slots.write().unwrap_or_else(|p| p.into_inner());
        if slots.contains_key(&id) {
            return;
        }
        slots.insert(id.clone(), Arc::new(Slot::new(id, address, model, client)));
        self.regroup(&slots);
    }

    /// Applies a coordinator view: workers in it are added or updated (`connect` makes the
    /// client of a new one); workers missing from a whole view, or named removed by a delta
    /// (evicted), are dropped unless `keep` says they were configured statically.
    pub fn apply_view(
        &self,
        view: &pb::ClusterView,
        now: Instant,
        connect: impl Fn(&pb::WorkerView) -> Option<T>,
        keep: impl Fn(&str) -> bool,
    ) {
        let mut slots = self.slots.write().unwrap_or_else(|p| p.into_inner());
        let before = slots.len();
        if view.delta {
            for id in &view.removed_workers {
                if slots.get(id).is_some_and(|s| !keep(&s.address)) {
                    slots.remove(id);
                }
            }
        } else {
            let in_view: std::collections::HashSet<&str> =
                view.workers.iter().map(|w| w.worker_id.as_str()).collect();
            slots.retain(|id, s| keep(&s.address) || in_view.contains(id.as_str()));
        }
        let mut changed = slots.len() != before;
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
                    changed = true;
                    s
                }
            };
            *slot.state.lock().unwrap_or_else(|p| p.into_inner()) = ViewState {
                score: w.score,
                expected_loops: w.expected_loops,
                loop_steps_per_second: w.loop_steps_per_second,
                draining: w.draining,
                outstanding: w.queue_length + w.running,
                kv_usage: w.kv_usage,
                prefix_cache_hit_rate: w.prefix_cache_hit_rate,
                // On the coordinator's clock: so long before the message was sent, which is
                // about when it came.
                cache_horizon: w.prefix_cache_horizon_ms.and_then(|h| {
                    now.checked_sub(Duration::from_millis(view.clock_ms.saturating_sub(h)))
                }),
                in_flight_at_view: slot.in_flight.load(Ordering::Relaxed),
                work_at_view: slot.work_in_flight.load(Ordering::Relaxed),
            };
        }
        if changed {
            self.regroup(&slots);
        }
        *self.view_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(now);
    }

    /// When the latest coordinator view arrived (`None` before the first).
    pub fn view_at(&self) -> Option<Instant> {
        *self.view_at.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the coordinator view is recent enough to pick by its figures.
    pub fn is_fresh(&self, now: Instant) -> bool {
        self.view_at()
            .is_some_and(|t| now.duration_since(t) <= self.stale_after)
    }
}

/// A view of workers `(id, score)` serving model `m`, each with 2 expected loops at 100
/// loop-steps a second (unit tests).
#[cfg(test)]
pub(crate) fn test_view(scores: &[(&str, f64)]) -> pb::ClusterView {
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

#[cfg(test)]
mod tests {
    use super::test_view as view;
    use super::*;

    #[test]
    fn evicted_workers_leave_the_pool_unless_static() {
        let pool: Pool<()> = Pool::new(Duration::from_secs(2));
        let t = Instant::now();
        pool.apply_view(&view(&[("a", 0.0), ("b", 0.0)]), t, |_| Some(()), |_| false);
        pool.apply_view(&view(&[("b", 0.0)]), t, |_| Some(()), |addr| addr == "a:1");
        assert_eq!(pool.slots().len(), 2);
        pool.apply_view(&view(&[("b", 0.0)]), t, |_| Some(()), |_| false);
        assert_eq!(pool.slots().len(), 1);
        assert_eq!(pool.serving("m").len(), 1);
        assert_eq!(*pool.models(), vec!["m".to_string()]);
    }

    #[test]
    fn deltas_update_and_remove_only_the_workers_they_name() {
        let pool: Pool<()> = Pool::new(Duration::from_secs(2));
        let t = Instant::now();
        pool.apply_view(&view(&[("a", 1.0), ("b", 2.0)]), t, |_| Some(()), |_| false);
        let b = pool.serving("m")[1].serial;
        // A delta naming c (new) and a (changed): b stays as it was.
        let mut d = view(&[("a", 5.0), ("c", 0.0)]);
        d.delta = true;
        pool.apply_view(&d, t, |_| Some(()), |_| false);
        let ids: Vec<(String, f64)> = pool
            .serving("m")
            .iter()
            .map(|s| (s.id.clone(), s.state().score))
            .collect();
        assert_eq!(
            ids,
            [("a".into(), 5.0), ("b".into(), 2.0), ("c".into(), 0.0)]
        );
        assert_eq!(pool.serving("m")[1].serial, b);
        // An empty delta is a heartbeat: the view is fresh again, nothing else changes.
        let later = t + Duration::from_secs(3);
        assert!(!pool.is_fresh(later));
        let beat = pb::ClusterView {
            delta: true,
            ..Default::default()
        };
        pool.apply_view(&beat, later, |_| Some(()), |_| false);
        assert!(pool.is_fresh(later));
        assert_eq!(pool.len(), 3);
        // A removal, except of a static worker.
        let gone = pb::ClusterView {
            delta: true,
            removed_workers: vec!["a".into(), "c".into()],
            ..Default::default()
        };
        pool.apply_view(&gone, later, |_| Some(()), |addr| addr == "c:1");
        let ids: Vec<String> = pool.serving("m").iter().map(|s| s.id.clone()).collect();
        assert_eq!(ids, ["b", "c"]);
    }

    #[test]
    fn groups_follow_membership_and_a_moved_worker_is_a_new_slot() {
        let pool: Pool<()> = Pool::new(Duration::from_secs(2));
        let t = Instant::now();
        let mut v = view(&[("a", 0.0), ("b", 0.0)]);
        v.workers[1].model = "other".into();
        pool.apply_view(&v, t, |_| Some(()), |_| false);
        assert_eq!(*pool.models(), vec!["m".to_string(), "other".to_string()]);
        let a = pool.serving("m")[0].serial;
        v.workers[0].address = "a:2".into();
        pool.apply_view(&v, t, |_| Some(()), |_| false);
        let moved = pool.serving("m")[0].clone();
        assert_eq!(moved.address, "a:2");
        assert_ne!(moved.serial, a);
        pool.add_static("c".into(), "c:1".into(), "m".into(), ());
        assert_eq!(pool.serving("m").len(), 2);
        assert_eq!(pool.len(), 3);
    }

    #[test]
    fn in_flight_work_is_counted_until_dropped_and_loads_include_it() {
        let pool: Pool<()> = Pool::new(Duration::from_secs(2));
        let t = Instant::now();
        pool.apply_view(&view(&[("a", 1.0)]), t, |_| Some(()), |_| false);
        let a = pool.serving("m")[0].clone();
        let s = a.state();
        assert!((a.load(&s, 0.0) - 1.0).abs() < 1e-9);
        let g = InFlight::new(a.clone(), 200);
        // 200 loop-steps at 100 a second: 2 s more than the view's score.
        assert!((a.load(&s, 0.0) - 3.0).abs() < 1e-9);
        assert_eq!(a.outstanding(&s), 1);
        drop(g);
        assert_eq!(a.in_flight.load(Ordering::Relaxed), 0);
        assert_eq!(a.work_in_flight.load(Ordering::Relaxed), 0);
        // A request in flight when the view came finishes: its work comes off the score (not
        // below an idle worker's).
        let g = InFlight::new(a.clone(), 50);
        pool.apply_view(&view(&[("a", 1.0)]), t, |_| Some(()), |_| false);
        let s = a.state();
        assert!((a.load(&s, 0.0) - 1.0).abs() < 1e-9);
        drop(g);
        assert!((a.load(&s, 0.0) - 0.5).abs() < 1e-9);
        let g = InFlight::new(a.clone(), 500);
        pool.apply_view(&view(&[("a", 1.0)]), t, |_| Some(()), |_| false);
        let s = a.state();
        drop(g);
        assert_eq!(a.load(&s, 0.0), 0.0);
    }
}
