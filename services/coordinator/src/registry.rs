//! The worker registry: who is serving which model where, their latest load reports, their
//! exit statistics, and the score routers pick by. Plain state behind a `DashMap` (reports from
//! many workers update it concurrently); no I/O, so it is unit-tested with made-up clocks.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use rrt_proto::exits::{add_histogram, mean_exit_loop, rate_or_prior};
use rrt_proto::v1 as pb;

#[derive(Debug, Clone)]
pub struct WorkerEntry {
    pub address: String,
    pub model: String,
    pub loops: u32,
    pub max_sequences: u32,
    pub last_seen: Instant,
    pub report: pb::WorkerReport,
    /// Generated tokens by exit loop since registration.
    pub exit_histogram: Vec<u64>,
    /// Smoothed loop-steps per second (0 until measured).
    pub throughput: f64,
    /// The worker's prefix-cache horizon (see [`pb::WorkerReport`]), on this process's clock.
    pub cache_horizon: Option<Instant>,
}

impl WorkerEntry {
    /// Expected loops per generated token from this worker's exit statistics (full depth
    /// until it has any).
    pub fn expected_loops(&self) -> f64 {
        expected_loops(&self.exit_histogram, self.loops)
    }

    /// Pending loop-steps: tokens still to generate times expected loops, plus prompt tokens
    /// not yet run through every loop.
    pub fn pending_loop_steps(&self) -> f64 {
        self.report.pending_new_tokens as f64 * self.expected_loops()
            + self.report.pending_prompt_tokens as f64 * self.loops as f64
    }

    /// Predicted seconds to drain the pending loop-steps at the measured throughput.
    pub fn score(&self) -> f64 {
        self.pending_loop_steps() / rate_or_prior(self.throughput)
    }
}

/// The coordinator's clock: milliseconds since its first use in this process (a
/// [`Registry`] starts it). Views carry figures on it against `ClusterView.clock_ms`, so a
/// router turns them into its own instants whatever the two machines' wall clocks say.
pub fn clock_ms(at: Instant) -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    at.saturating_duration_since(epoch).as_millis() as u64
}

/// Expected loops per generated token: the histogram's mean exit loop, full depth until the
/// histogram has any tokens.
pub fn expected_loops(hist: &[u64], loops: u32) -> f64 {
    mean_exit_loop(hist).unwrap_or(loops.max(1) as f64)
}

#[derive(Debug)]
pub struct Registry {
    workers: DashMap<String, WorkerEntry>,
    evict_after: Duration,
    /// Reports applied since start (known workers' only).
    reports: AtomicU64,
}

impl Registry {
    pub fn new(evict_after: Duration) -> Self {
        clock_ms(Instant::now());
        Self {
            workers: DashMap::new(),
            evict_after,
            reports: AtomicU64::new(0),
        }
    }

    pub fn len(&self) -> usize {
        self.workers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.workers.is_empty()
    }

    /// Adds or replaces a worker (a re-registration starts its statistics afresh).
    pub fn register(&self, req: pb::RegisterRequest, now: Instant) {
        self.workers.insert(
            req.worker_id.clone(),
            WorkerEntry {
                address: req.address,
                model: req.model,
                loops: req.loops,
                max_sequences: req.max_sequences,
                last_seen: now,
                report: pb::WorkerReport {
                    worker_id: req.worker_id,
                    ..Default::default()
                },
                exit_histogram: Vec::new(),
                throughput: 0.0,
                cache_horizon: None,
            },
        );
    }

    /// Applies a report; `false` if the worker is unknown (it must register again).
    pub fn report(&self, report: pb::WorkerReport, now: Instant) -> bool {
        let Some(mut e) = self.workers.get_mut(&report.worker_id) else {
            return false;
        };
        add_histogram(&mut e.exit_histogram, &report.exit_histogram_delta);
        if report.loop_steps_per_second > 0.0 {
            e.throughput = if e.throughput > 0.0 {
                0.5 * e.throughput + 0.5 * report.loop_steps_per_second
            } else {
                report.loop_steps_per_second
            };
        }
        e.last_seen = now;
        e.cache_horizon = report
            .prefix_cache_horizon_seconds
            .filter(|s| s.is_finite() && *s >= 0.0)
            .map(|s| {
                now.checked_sub(Duration::from_secs_f64(s.min(1e7)))
                    .unwrap_or(now)
            });
        e.report = report;
        self.reports.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Reports applied since start.
    pub fn reports_taken(&self) -> u64 {
        self.reports.load(Ordering::Relaxed)
    }

    /// The model a worker serves, if it is registered.
    pub fn model_of(&self, id: &str) -> Option<String> {
        self.workers.get(id).map(|e| e.model.clone())
    }

    /// Removes workers silent for longer than the eviction age; returns their ids.
    pub fn evict(&self, now: Instant) -> Vec<String> {
        let stale: Vec<String> = self
            .workers
            .iter()
            .filter(|e| now.duration_since(e.last_seen) > self.evict_after)
            .map(|e| e.key().clone())
            .collect();
        for id in &stale {
            self.workers.remove(id);
        }
        stale
    }

    pub fn get(&self, id: &str) -> Option<WorkerEntry> {
        self.workers.get(id).map(|e| e.clone())
    }

    /// The cluster view routers receive, workers sorted by id.
    pub fn view(&self, now: Instant) -> pb::ClusterView {
        let mut workers: Vec<pb::WorkerView> = self
            .workers
            .iter()
            .map(|e| pb::WorkerView {
                worker_id: e.key().clone(),
                address: e.address.clone(),
                model: e.model.clone(),
                score: e.score(),
                queue_length: e.report.queue_length,
                running: e.report.running,
                loop_steps_per_second: e.throughput,
                expected_loops: e.expected_loops(),
                draining: e.report.draining,
                age_ms: now.duration_since(e.last_seen).as_millis() as u64,
                kv_usage: e.report.kv_blocks_used as f64 / e.report.kv_blocks_total.max(1) as f64,
                prefix_cache_hit_rate: e.report.prefix_cache_hit_tokens as f64
                    / e.report.prefix_cache_queried_tokens.max(1) as f64,
                prefix_cache_horizon_ms: e.cache_horizon.map(clock_ms),
            })
            .collect();
        workers.sort_by(|a, b| a.worker_id.cmp(&b.worker_id));
        pb::ClusterView {
            workers,
            model_expected_loops: self.model_expected_loops(),
            clock_ms: clock_ms(now),
            ..Default::default()
        }
    }

    /// Each model's load over its serving (not draining) workers: requests waiting, sequence
    /// slots, KV blocks held and in all, time to first token over their last intervals.
    pub fn model_loads(&self) -> HashMap<String, crate::adapt::ModelLoad> {
        let mut loads: HashMap<String, crate::adapt::ModelLoad> = HashMap::new();
        for e in self.workers.iter().filter(|e| !e.report.draining) {
            let l = loads.entry(e.model.clone()).or_default();
            l.waiting += e.report.queue_length as u64;
            l.slots += e.max_sequences.max(1) as u64;
            l.kv_used += e.report.kv_blocks_used;
            l.kv_total += e.report.kv_blocks_total;
            l.add_ttft(e.report.ttft_p90_seconds, e.report.ttft_samples);
        }
        loads
    }

    /// Expected loops per token per model, pooling its workers' exit histograms.
    pub fn model_expected_loops(&self) -> HashMap<String, f64> {
        let mut pooled: HashMap<String, (Vec<u64>, u32)> = HashMap::new();
        for e in self.workers.iter() {
            let (hist, loops) = pooled.entry(e.model.clone()).or_default();
            add_histogram(hist, &e.exit_histogram);
            *loops = (*loops).max(e.loops);
        }
        pooled
            .into_iter()
            .map(|(m, (h, l))| (m, expected_loops(&h, l)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(id: &str) -> pb::RegisterRequest {
        pb::RegisterRequest {
            worker_id: id.into(),
            address: format!("{id}:1"),
            model: "m".into(),
            loops: 4,
            max_sequences: 8,
            ..Default::default()
        }
    }

    fn report(id: &str, pending: u64, rate: f64, delta: Vec<u64>) -> pb::WorkerReport {
        pb::WorkerReport {
            worker_id: id.into(),
            pending_new_tokens: pending,
            loop_steps_per_second: rate,
            exit_histogram_delta: delta,
            ..Default::default()
        }
    }

    #[test]
    fn score_is_pending_loop_steps_over_throughput_from_exit_statistics() {
        let r = Registry::new(Duration::from_secs(2));
        let t = Instant::now();
        r.register(reg("a"), t);
        // No exits measured: full depth (4 loops) and the prior throughput.
        assert!(r.report(report("a", 100, 0.0, vec![]), t));
        let a = r.get("a").unwrap();
        assert_eq!(a.expected_loops(), 4.0);
        assert!((a.score() - 400.0 / rrt_proto::exits::PRIOR_LOOP_STEPS_PER_SECOND).abs() < 1e-9);
        // Half the tokens exit after loop 1, half after loop 3: 2 loops expected.
        assert!(r.report(report("a", 100, 200.0, vec![5, 0, 5, 0]), t));
        let a = r.get("a").unwrap();
        assert_eq!(a.expected_loops(), 2.0);
        assert!((a.score() - 100.0 * 2.0 / 200.0).abs() < 1e-9);
        // Throughput is smoothed.
        assert!(r.report(report("a", 100, 100.0, vec![]), t));
        assert!((r.get("a").unwrap().throughput - 150.0).abs() < 1e-9);
    }

    #[test]
    fn a_slower_worker_with_the_same_load_scores_worse() {
        let r = Registry::new(Duration::from_secs(2));
        let t = Instant::now();
        r.register(reg("fast"), t);
        r.register(reg("slow"), t);
        r.report(report("fast", 50, 400.0, vec![0, 10]), t);
        r.report(report("slow", 50, 100.0, vec![0, 10]), t);
        let v = r.view(t);
        assert!(v.workers[0].score < v.workers[1].score, "{v:?}");
        assert_eq!(v.model_expected_loops["m"], 2.0);
    }

    #[test]
    fn a_cache_horizon_is_carried_on_the_coordinators_clock() {
        let r = Registry::new(Duration::from_secs(2));
        let t = Instant::now() + Duration::from_secs(10);
        r.register(reg("a"), t);
        r.register(reg("b"), t);
        let mut rep = report("a", 0, 0.0, vec![]);
        rep.prefix_cache_horizon_seconds = Some(3.0);
        r.report(rep, t);
        r.report(report("b", 0, 0.0, vec![]), t);
        // Two seconds later the view says: a's horizon lies 5 s before the view's clock.
        let v = r.view(t + Duration::from_secs(2));
        let h = v.workers[0].prefix_cache_horizon_ms.unwrap();
        assert!((v.clock_ms - h).abs_diff(5000) <= 1, "{} {h}", v.clock_ms);
        assert_eq!(
            v.workers[1].prefix_cache_horizon_ms, None,
            "b evicted nothing"
        );
        // A figure that is not a duration is not believed.
        let mut rep = report("a", 0, 0.0, vec![]);
        rep.prefix_cache_horizon_seconds = Some(f64::NAN);
        r.report(rep, t);
        assert_eq!(r.view(t).workers[0].prefix_cache_horizon_ms, None);
    }

    #[test]
    fn silent_workers_are_evicted_and_unknown_reports_ask_to_register() {
        let r = Registry::new(Duration::from_secs(2));
        let t = Instant::now();
        r.register(reg("a"), t);
        r.register(reg("b"), t);
        r.report(report("b", 0, 0.0, vec![]), t + Duration::from_secs(2));
        assert_eq!(
            r.evict(t + Duration::from_millis(2500)),
            vec!["a".to_string()]
        );
        assert_eq!(r.len(), 1);
        assert!(!r.report(report("a", 0, 0.0, vec![]), t + Duration::from_secs(3)));
    }

    #[test]
    fn model_loads_pool_queues_slots_kv_and_time_to_first_token() {
        let r = Registry::new(Duration::from_secs(2));
        let t = Instant::now();
        r.register(reg("a"), t);
        r.register(reg("b"), t);
        let with = |id: &str, waiting: u32, used: u64, p90: f64, n: u32| pb::WorkerReport {
            queue_length: waiting,
            kv_blocks_used: used,
            kv_blocks_total: 100,
            ttft_p90_seconds: p90,
            ttft_samples: n,
            ..report(id, 0, 0.0, vec![])
        };
        r.report(with("a", 3, 50, 0.4, 10), t);
        r.report(with("b", 1, 30, 1.6, 30), t);
        let l = r.model_loads()["m"];
        assert_eq!(
            (l.waiting, l.slots, l.kv_used, l.kv_total),
            (4, 16, 80, 200)
        );
        assert_eq!(l.ttft_samples, 40);
        assert!((l.ttft_p90 - 1.3).abs() < 1e-9, "{l:?}");
        // A worker without first tokens this interval does not pull the figure down.
        r.report(with("a", 0, 0, 0.0, 0), t);
        let l = r.model_loads()["m"];
        assert_eq!(l.ttft_samples, 30);
        assert!((l.ttft_p90 - 1.6).abs() < 1e-9, "{l:?}");
    }
}
