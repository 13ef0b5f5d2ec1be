//! What routers receive: the cluster view as last published, versioned, and the deltas between
//! versions. Each interval the publisher diffs the registry's view against the published one
//! (figures compared at their resolution, so a score drifting by a hair is not news), keeps the
//! result and broadcasts the delta; a router that asked for deltas gets the whole view once, then
//! the deltas, and the whole view again if it fell behind the broadcast buffer. Routers'
//! placements (prefix blocks sent to workers) go out to the others at once the same way. Plain state
//! behind one mutex (held for the diff, which is O(workers) per interval, never per report).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use rrt_proto::v1 as pb;
use tokio::sync::broadcast;

use crate::registry::clock_ms;

/// Messages (deltas and placement batches) kept for routers that read slowly; one further
/// behind gets the whole view again. It bounds the memory the coordinator holds for them.
const BUFFER: usize = 256;

#[derive(Debug, Default)]
struct Published {
    version: u64,
    workers: BTreeMap<String, pb::WorkerView>,
    model_expected_loops: HashMap<String, f64>,
}

impl Published {
    fn whole(&self) -> pb::ClusterView {
        pb::ClusterView {
            workers: self.workers.values().cloned().collect(),
            model_expected_loops: self.model_expected_loops.clone(),
            delta: false,
            version: self.version,
            clock_ms: clock_ms(Instant::now()),
            ..Default::default()
        }
    }
}

#[derive(Debug)]
pub struct Views {
    state: Mutex<Published>,
    deltas: broadcast::Sender<Arc<pb::ClusterView>>,
}

impl Default for Views {
    fn default() -> Self {
        Self {
            state: Mutex::new(Published::default()),
            deltas: broadcast::channel(BUFFER).0,
        }
    }
}

/// Whether `a` and `b` differ by more than `abs`, or `rel` of the larger.
fn differs(a: f64, b: f64, rel: f64, abs: f64) -> bool {
    (a - b).abs() > abs.max(rel * a.abs().max(b.abs()))
}

/// Whether a router would route differently on `new` than on `old`: counts exactly, figures
/// at a resolution finer than the routers' decisions (a score within 10 ms or 5%, against a
/// spill margin of 100 ms; KV use and hit rate within 1 point; a cache horizon within 250 ms
/// or a tenth of its age at `clock_ms`). `age_ms` is not news: a worker in the view has
/// reported within the eviction age.
pub fn changed(old: &pb::WorkerView, new: &pb::WorkerView, clock_ms: u64) -> bool {
    let horizon = match (old.prefix_cache_horizon_ms, new.prefix_cache_horizon_ms) {
        (Some(a), Some(b)) => {
            let age = clock_ms.saturating_sub(a.min(b)) as f64;
            differs(a as f64, b as f64, 0.0, (0.1 * age).max(250.0))
        }
        (a, b) => a.is_some() != b.is_some(),
    };
    horizon
        || old.address != new.address
        || old.model != new.model
        || old.queue_length != new.queue_length
        || old.running != new.running
        || old.draining != new.draining
        || differs(old.score, new.score, 0.05, 0.01)
        || differs(
            old.loop_steps_per_second,
            new.loop_steps_per_second,
            0.05,
            1.0,
        )
        || differs(old.expected_loops, new.expected_loops, 0.0, 0.01)
        || differs(old.kv_usage, new.kv_usage, 0.0, 0.01)
        || differs(
            old.prefix_cache_hit_rate,
            new.prefix_cache_hit_rate,
            0.0,
            0.01,
        )
}

impl Views {
    fn lock(&self) -> std::sync::MutexGuard<'_, Published> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Passes a router's placements on to every delta subscriber at once, as a delta of the
    /// current version with no worker changes (applying it changes only routers' indexes).
    pub fn share(&self, batch: pb::PlacementBatch) {
        let st = self.lock();
        let _ = self.deltas.send(Arc::new(pb::ClusterView {
            delta: true,
            version: st.version,
            placements: vec![batch],
            clock_ms: clock_ms(Instant::now()),
            ..Default::default()
        }));
    }

    /// Publishes `view` (the registry's, whole): returns the delta sent to delta subscribers.
    pub fn publish(&self, view: pb::ClusterView) -> Arc<pb::ClusterView> {
        let mut st = self.lock();
        let mut delta = pb::ClusterView {
            delta: true,
            clock_ms: view.clock_ms,
            ..Default::default()
        };
        let mut seen = std::collections::HashSet::with_capacity(view.workers.len());
        for w in view.workers {
            seen.insert(w.worker_id.clone());
            match st.workers.get(&w.worker_id) {
                Some(old) if !changed(old, &w, view.clock_ms) => {}
                _ => {
                    delta.workers.push(w.clone());
                    st.workers.insert(w.worker_id.clone(), w);
                }
            }
        }
        let removed: Vec<String> = st
            .workers
            .keys()
            .filter(|id| !seen.contains(*id))
            .cloned()
            .collect();
        for id in &removed {
            st.workers.remove(id);
        }
        delta.removed_workers = removed;
        for (model, loops) in view.model_expected_loops {
            let old = st.model_expected_loops.get(&model).copied();
            if old.is_none_or(|o| differs(o, loops, 0.0, 0.005)) {
                delta.model_expected_loops.insert(model.clone(), loops);
                st.model_expected_loops.insert(model, loops);
            }
        }
        st.version += 1;
        delta.version = st.version;
        let delta = Arc::new(delta);
        // Sent under the lock, so a subscriber's whole view and its first delta line up.
        let _ = self.deltas.send(delta.clone());
        delta
    }

    /// The whole view as published, and a receiver of the deltas after it.
    pub fn subscribe(&self) -> (pb::ClusterView, broadcast::Receiver<Arc<pb::ClusterView>>) {
        let st = self.lock();
        (st.whole(), self.deltas.subscribe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(id: &str, score: f64, queue: u32) -> pb::WorkerView {
        pb::WorkerView {
            worker_id: id.into(),
            address: format!("{id}:1"),
            model: "m".into(),
            score,
            queue_length: queue,
            expected_loops: 2.0,
            ..Default::default()
        }
    }

    fn view(workers: Vec<pb::WorkerView>) -> pb::ClusterView {
        pb::ClusterView {
            workers,
            ..Default::default()
        }
    }

    /// Applies `delta` to `base` as a router does.
    fn apply(base: &mut BTreeMap<String, pb::WorkerView>, delta: &pb::ClusterView) {
        for id in &delta.removed_workers {
            base.remove(id);
        }
        for w in &delta.workers {
            base.insert(w.worker_id.clone(), w.clone());
        }
    }

    #[test]
    fn deltas_carry_only_changes_and_rebuild_the_published_view() {
        let views = Views::default();
        let d = views.publish(view(vec![w("a", 1.0, 0), w("b", 2.0, 0), w("c", 0.0, 0)]));
        assert_eq!(d.workers.len(), 3);
        let (whole, mut rx) = views.subscribe();
        assert_eq!(whole.version, 1);
        let mut mirror: BTreeMap<String, pb::WorkerView> = whole
            .workers
            .iter()
            .map(|w| (w.worker_id.clone(), w.clone()))
            .collect();
        // A hair of drift is not news; a queue change is; c is gone; d is new.
        let d = views.publish(view(vec![w("a", 1.005, 0), w("b", 2.0, 3), w("d", 0.0, 0)]));
        let ids: Vec<&str> = d.workers.iter().map(|w| w.worker_id.as_str()).collect();
        assert_eq!(ids, ["b", "d"]);
        assert_eq!(d.removed_workers, ["c"]);
        assert_eq!(d.version, 2);
        // Nothing changed: an empty heartbeat.
        let d = views.publish(view(vec![w("a", 1.005, 0), w("b", 2.0, 3), w("d", 0.0, 0)]));
        assert!(d.workers.is_empty() && d.removed_workers.is_empty());
        // Drift accumulates against what was sent, and is sent once it matters.
        let d = views.publish(view(vec![w("a", 1.1, 0), w("b", 2.0, 3), w("d", 0.0, 0)]));
        assert_eq!(d.workers.len(), 1);
        for _ in 0..3 {
            apply(&mut mirror, &rx.try_recv().unwrap());
        }
        let (whole, _) = views.subscribe();
        assert_eq!(whole.version, 4);
        assert_eq!(mirror.values().cloned().collect::<Vec<_>>(), whole.workers);
    }

    #[test]
    fn a_cache_horizon_is_news_when_it_moves_by_a_tenth_of_its_age() {
        let at = |h: Option<u64>| pb::WorkerView {
            prefix_cache_horizon_ms: h,
            ..w("a", 1.0, 0)
        };
        // 60 s old: a move of 2 s is not news, one of 10 s is.
        assert!(!changed(&at(Some(40_000)), &at(Some(42_000)), 100_000));
        assert!(changed(&at(Some(40_000)), &at(Some(50_000)), 100_000));
        // 1 s old: a quarter second is the resolution.
        assert!(changed(&at(Some(99_000)), &at(Some(99_400)), 100_000));
        assert!(!changed(&at(Some(99_000)), &at(Some(99_100)), 100_000));
        // The first eviction is news.
        assert!(changed(&at(None), &at(Some(1)), 100_000));
        assert!(!changed(&at(None), &at(None), 100_000));
    }

    #[test]
    fn placements_go_out_at_once_without_changing_the_version() {
        let views = Views::default();
        views.publish(view(vec![w("a", 0.0, 0)]));
        let (whole, mut rx) = views.subscribe();
        let batch = pb::PlacementBatch {
            router_id: "r1".into(),
            placements: vec![pb::Placement {
                worker_id: "a".into(),
                blocks: vec![7, 8],
            }],
        };
        views.share(batch.clone());
        let d = rx.try_recv().unwrap();
        assert_eq!((d.version, d.delta), (whole.version, true));
        assert_eq!(d.placements, vec![batch]);
        assert!(d.workers.is_empty() && d.removed_workers.is_empty());
        assert!(views
            .publish(view(vec![w("a", 0.0, 0)]))
            .placements
            .is_empty());
    }

    #[test]
    fn a_router_that_falls_behind_the_buffer_is_told_so() {
        let views = Views::default();
        let (_, mut rx) = views.subscribe();
        for i in 0..(BUFFER + 5) {
            views.publish(view(vec![w("a", i as f64, 0)]));
        }
        assert!(matches!(
            rx.try_recv(),
            Err(broadcast::error::TryRecvError::Lagged(_))
        ));
    }
}
