//! Registration with the coordinator and the periodic load report (also the heartbeat). A
//! report the coordinator does not recognise (it restarted) or a failed call leads to a fresh
//! registration, so workers rejoin a restarted coordinator on their own.

use std::sync::Arc;
use std::time::Duration;

use rrt_proto::exits::mean_exit_loop;
use rrt_proto::v1 as pb;
use rrt_proto::v1::coordinator_client::CoordinatorClient;
use rrt_service::Shutdown;
use tonic::transport::Channel;

use crate::actor::Snapshot;
use crate::metrics as m;
use crate::service::Shared;

/// Loop-step throughput over an interval, measured on busy engine time.
#[derive(Default)]
struct Throughput {
    last: Option<Snapshot>,
    rate: f64,
}

impl Throughput {
    fn update(&mut self, now: &Snapshot) -> f64 {
        if let Some(prev) = &self.last {
            let busy = now.busy_seconds - prev.busy_seconds;
            if busy > 0.01 {
                self.rate = (now.stats.loop_rows - prev.stats.loop_rows) as f64 / busy;
            }
        }
        self.last = Some(now.clone());
        self.rate
    }
}

/// The default exit threshold in force on the engine: the coordinator's, while it sends one
/// (load-adaptive exits), the configured one otherwise, and back to it when the coordinator
/// cannot be reached (quality is the safe side).
struct AdaptiveThreshold {
    /// The default policy's name (a label) and threshold.
    policy: &'static str,
    threshold: f32,
    /// `None` when the default policy is none: nothing to move.
    configured: Option<f32>,
    in_force: Option<f32>,
}

impl AdaptiveThreshold {
    fn new(shared: &Shared) -> Self {
        let exit = shared.default_exit.unwrap_or_default();
        let policy = pb::ExitPolicy::try_from(exit.policy).unwrap_or(pb::ExitPolicy::None);
        let configured = (!matches!(policy, pb::ExitPolicy::None | pb::ExitPolicy::Unspecified))
            .then_some(exit.threshold);
        Self {
            policy: match policy {
                pb::ExitPolicy::Unspecified | pb::ExitPolicy::None => "none",
                pb::ExitPolicy::MaxProb => "max-prob",
                pb::ExitPolicy::Margin => "margin",
                pb::ExitPolicy::Cosine => "cosine",
                pb::ExitPolicy::Learned => "learned",
            },
            threshold: exit.threshold,
            configured,
            in_force: configured,
        }
    }

    /// The threshold in force, as a gauge.
    fn export(&self, worker: &str) {
        m::exit_threshold(worker, self.policy, self.in_force.unwrap_or(self.threshold));
    }

    /// Applies the coordinator's threshold (`None`: back to the configured one).
    async fn follow(&mut self, shared: &Shared, from_coordinator: Option<f32>) {
        let Some(configured) = self.configured else {
            return;
        };
        let want = from_coordinator
            .filter(|t| t.is_finite())
            .map_or(configured, |t| t.clamp(0.0, 1.0));
        if self.in_force == Some(want) {
            return;
        }
        if shared.engine.set_default_threshold(want).await {
            tracing::info!(threshold = want, configured, "default exit threshold moved");
            self.in_force = Some(want);
        }
    }
}

/// Mirrors the engine into metrics every `interval` and, with a coordinator, reports to it.
pub(crate) async fn run(
    shared: Arc<Shared>,
    coordinator: Option<String>,
    tls: Option<rrt_service::tls::Tls>,
    address: String,
    interval: Duration,
    shutdown: Shutdown,
) {
    let mut client = match &coordinator {
        Some(url) => match rrt_service::tls::endpoint(url, tls.as_ref()) {
            Ok(e) => Some(CoordinatorClient::new(rrt_service::tls::connect_lazy(
                &e.connect_timeout(Duration::from_secs(2))
                    .timeout(Duration::from_secs(2)),
                tls.as_ref(),
            ))),
            Err(e) => {
                tracing::error!("bad coordinator URL {url:?}: {e}; running standalone");
                None
            }
        },
        None => None,
    };
    let mut registered = false;
    let mut throughput = Throughput::default();
    let mut previous_hist: Vec<u64> = Vec::new();
    let mut adaptive = AdaptiveThreshold::new(&shared);
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.wait(), if !shutdown.is_triggered() => {}
        }
        let snap = shared.engine.snapshot();
        let rate = throughput.update(&snap);
        m::engine(&shared.id, &snap, rate);
        adaptive.export(&shared.id);
        let Some(client) = client.as_mut() else {
            continue;
        };
        if !registered {
            registered = register(client, &shared, &address).await;
            if !registered {
                continue;
            }
        }
        let hist = &snap.stats.exit_histogram;
        let delta: Vec<u64> = hist
            .iter()
            .enumerate()
            .map(|(i, n)| n - previous_hist.get(i).copied().unwrap_or(0))
            .collect();
        let (ttft_p90_seconds, ttft_samples) = shared.ttft.take_p90();
        let report = pb::WorkerReport {
            worker_id: shared.id.clone(),
            queue_length: snap.queue_length as u32,
            running: snap.running as u32,
            kv_bytes_used: snap.kv_bytes_used as u64,
            kv_bytes_budget: snap.kv_bytes_budget as u64,
            loop_steps_per_second: rate,
            exit_histogram_delta: delta,
            mean_loops: mean_exit_loop(&snap.stats.exit_histogram).unwrap_or(0.0),
            pending_new_tokens: snap.pending_new_tokens as u64,
            pending_prompt_tokens: snap.pending_prompt_tokens as u64,
            draining: shared.admission.is_draining(),
            kv_blocks_used: snap.kv_blocks.used as u64,
            kv_blocks_cached: snap.kv_blocks.cached as u64,
            kv_blocks_total: snap.kv_blocks.total as u64,
            prefix_cache_queried_tokens: snap.kv_counters.queried_tokens,
            prefix_cache_hit_tokens: snap.kv_counters.hit_tokens,
            preemptions: snap.kv_counters.preemptions,
            ttft_p90_seconds,
            ttft_samples,
            prefix_cache_horizon_seconds: snap.kv_blocks.horizon.map(|d| d.as_secs_f64()),
        };
        match client.report(report).await {
            Ok(r) if r.get_ref().known => {
                previous_hist = hist.clone();
                adaptive.follow(&shared, r.get_ref().exit_threshold).await;
            }
            Ok(_) => {
                tracing::info!("the coordinator does not know this worker: registering again");
                adaptive.follow(&shared, None).await;
                registered = false;
                // A new coordinator starts its statistics from the next report.
                previous_hist = hist.clone();
            }
            Err(e) => {
                tracing::debug!("report failed: {e}");
                adaptive.follow(&shared, None).await;
                registered = false;
            }
        }
    }
}

async fn register(client: &mut CoordinatorClient<Channel>, shared: &Shared, address: &str) -> bool {
    let model = &shared.model;
    let req = pb::RegisterRequest {
        worker_id: shared.id.clone(),
        address: address.to_string(),
        model: model.model.clone(),
        loops: model.loops,
        max_sequences: shared.max_sequences as u32,
        default_exit: shared.default_exit,
        exit_curves: shared.exits.curves.clone(),
        exit_cascade: shared.exits.cascade.clone(),
    };
    match client.register(req).await {
        Ok(_) => {
            tracing::info!(worker = %shared.id, "registered with the coordinator");
            true
        }
        Err(e) => {
            tracing::debug!("registration failed: {e}");
            false
        }
    }
}
