//! The `rrt.v1.Coordinator` gRPC service over the [`Registry`], and the publisher task that
//! evicts silent workers and sends the cluster view to every watching router (whole each
//! interval, or as deltas through [`Views`]).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use metrics::{counter, gauge};
use prost::Message;
use rrt_proto::v1 as pb;
use rrt_service::Shutdown;
use tokio::sync::{broadcast, mpsc, watch};
use tokio_stream::wrappers::{ReceiverStream, WatchStream};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use crate::adapt::Adaptive;
use crate::registry::Registry;
use crate::views::Views;

pub struct CoordinatorService {
    pub registry: Arc<Registry>,
    /// The whole view, for routers that did not ask for deltas.
    pub view: watch::Receiver<pb::ClusterView>,
    pub views: Arc<Views>,
    pub adaptive: Arc<Adaptive>,
    pub report_ms: u32,
    pub shutdown: Shutdown,
}

/// Counts a view message sent to a router, by kind (whole, delta, placements), and its bytes.
fn count_sent(view: &pb::ClusterView) {
    let kind = match (view.delta, view.placements.is_empty()) {
        (false, _) => "whole",
        (true, true) => "delta",
        (true, false) => "placements",
    };
    counter!("rrt_coordinator_view_messages_total", "kind" => kind).increment(1);
    counter!("rrt_coordinator_view_bytes_total", "kind" => kind)
        .increment(view.encoded_len() as u64);
}

/// Sends one router its delta stream: the whole view, then each delta; the whole view again
/// when it fell behind. Ends when the router goes away or on shutdown.
async fn send_deltas(
    views: Arc<Views>,
    router_id: String,
    tx: mpsc::Sender<Result<pb::ClusterView, Status>>,
    shutdown: Shutdown,
) {
    let (mut whole, mut rx) = views.subscribe();
    loop {
        let version = whole.version;
        count_sent(&whole);
        if tx.send(Ok(whole)).await.is_err() {
            return;
        }
        // Deltas until this router falls behind.
        loop {
            let next = tokio::select! {
                d = rx.recv() => d,
                _ = shutdown.wait() => return,
            };
            match next {
                // Deltas the whole view already has (placement batches of its version are news).
                Ok(d)
                    if d.version < version || (d.version == version && d.placements.is_empty()) => {
                }
                // Its own placements.
                Ok(d)
                    if !router_id.is_empty()
                        && !d.placements.is_empty()
                        && d.placements.iter().all(|b| b.router_id == router_id) => {}
                Ok(d) => {
                    count_sent(&d);
                    if tx.send(Ok((*d).clone())).await.is_err() {
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::debug!(missed = n, "a router fell behind the view deltas");
                    counter!("rrt_coordinator_view_resyncs_total").increment(1);
                    break;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
        (whole, rx) = views.subscribe();
    }
}

type ViewStream = Pin<Box<dyn Stream<Item = Result<pb::ClusterView, Status>> + Send>>;

#[tonic::async_trait]
impl pb::coordinator_server::Coordinator for CoordinatorService {
    async fn register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let req = request.into_inner();
        if req.worker_id.is_empty() || req.address.is_empty() || req.model.is_empty() {
            return Err(Status::invalid_argument(
                "worker_id, address and model must be set",
            ));
        }
        if req.loops == 0 {
            return Err(Status::invalid_argument("loops must be at least 1"));
        }
        tracing::info!(worker = %req.worker_id, address = %req.address, model = %req.model, "worker registered");
        counter!("rrt_coordinator_registrations_total").increment(1);
        if let Some(why) = self.adaptive.learn(&req) {
            tracing::warn!(worker = %req.worker_id, model = %req.model, "load-adaptive exits are off for this model: {why}");
        }
        self.registry.register(req, Instant::now());
        Ok(Response::new(pb::RegisterResponse {
            report_interval_ms: self.report_ms,
        }))
    }

    async fn report(
        &self,
        request: Request<pb::WorkerReport>,
    ) -> Result<Response<pb::ReportResponse>, Status> {
        let report = request.into_inner();
        let model = self.registry.model_of(&report.worker_id);
        if let Some(model) = &model {
            for (i, n) in report.exit_histogram_delta.iter().enumerate() {
                counter!("rrt_coordinator_token_exits_total", "model" => model.clone(), "loop" => (i + 1).to_string())
                    .increment(*n);
            }
        }
        counter!("rrt_coordinator_reports_total").increment(1);
        let known = self.registry.report(report, Instant::now());
        let exit_threshold = model.and_then(|m| self.adaptive.threshold_for(&m));
        Ok(Response::new(pb::ReportResponse {
            known,
            exit_threshold,
        }))
    }

    async fn share_placements(
        &self,
        request: Request<pb::PlacementBatch>,
    ) -> Result<Response<pb::SharePlacementsResponse>, Status> {
        let batch = request.into_inner();
        if batch.router_id.is_empty() {
            return Err(Status::invalid_argument("router_id must be set"));
        }
        if batch.placements.iter().any(|p| p.worker_id.is_empty()) {
            return Err(Status::invalid_argument(
                "every placement needs its worker_id",
            ));
        }
        counter!("rrt_coordinator_placement_batches_total").increment(1);
        self.views.share(batch);
        Ok(Response::new(pb::SharePlacementsResponse {}))
    }

    type WatchClusterStream = ViewStream;

    async fn watch_cluster(
        &self,
        request: Request<pb::WatchClusterRequest>,
    ) -> Result<Response<ViewStream>, Status> {
        let request = request.into_inner();
        if request.deltas {
            let (tx, rx) = mpsc::channel(4);
            tokio::spawn(send_deltas(
                self.views.clone(),
                request.router_id,
                tx,
                self.shutdown.clone(),
            ));
            return Ok(Response::new(Box::pin(ReceiverStream::new(rx))));
        }
        let stream = WatchStream::new(self.view.clone()).map(|v| {
            count_sent(&v);
            Ok(v)
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

/// Every interval: evict silent workers, publish the view (whole and as a delta), update the
/// gauges. Ends on shutdown.
pub async fn publish(
    registry: Arc<Registry>,
    tx: watch::Sender<pb::ClusterView>,
    views: Arc<Views>,
    adaptive: Arc<Adaptive>,
    interval: Duration,
    shutdown: Shutdown,
) {
    let mut ticker = tokio::time::interval(interval);
    // Each model's latest 90th-percentile time to first token (kept through idle intervals).
    let mut ttft: HashMap<String, f64> = HashMap::new();
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.wait() => return,
        }
        let now = Instant::now();
        for id in registry.evict(now) {
            tracing::warn!(worker = %id, "worker evicted: no report");
            counter!("rrt_coordinator_evictions_total").increment(1);
        }
        let mut view = registry.view(now);
        gauge!("rrt_coordinator_workers").set(view.workers.len() as f64);
        for w in &view.workers {
            gauge!("rrt_coordinator_worker_score", "worker" => w.worker_id.clone()).set(w.score);
            gauge!("rrt_coordinator_worker_loop_steps_per_second", "worker" => w.worker_id.clone())
                .set(w.loop_steps_per_second);
        }
        for (model, loops) in &view.model_expected_loops {
            gauge!("rrt_coordinator_model_expected_loops", "model" => model.clone()).set(*loops);
        }
        let loads = registry.model_loads();
        for (model, l) in &loads {
            let latest = ttft.entry(model.clone()).or_insert(0.0);
            if l.ttft_samples > 0 {
                *latest = l.ttft_p90;
            }
            gauge!("rrt_coordinator_model_ttft_p90_seconds", "model" => model.clone()).set(*latest);
        }
        ttft.retain(|m, _| loads.contains_key(m));
        for a in adaptive.tick(&loads) {
            let model = a.model.clone();
            gauge!("rrt_coordinator_exit_threshold", "model" => model.clone())
                .set(a.threshold as f64);
            gauge!("rrt_coordinator_exit_load_pressure", "model" => model.clone()).set(a.pressure);
            if let Some(agree) = a.expected_agreement {
                gauge!("rrt_coordinator_exit_expected_agreement", "model" => model).set(agree);
            }
        }
        let delta = views.publish(view.clone());
        view.version = delta.version;
        gauge!("rrt_coordinator_view_publish_seconds").set(now.elapsed().as_secs_f64());
        tx.send_replace(view);
    }
}
