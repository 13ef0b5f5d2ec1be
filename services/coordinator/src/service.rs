//! The `rrt.v1.Coordinator` gRPC service over the [`Registry`], and the publisher task that
//! evicts silent workers and sends the cluster view to every watching router.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use metrics::{counter, gauge};
use rrt_proto::v1 as pb;
use rrt_service::Shutdown;
use tokio::sync::watch;
use tokio_stream::wrappers::WatchStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use crate::registry::Registry;

pub struct CoordinatorService {
    pub registry: Arc<Registry>,
    pub view: watch::Receiver<pb::ClusterView>,
    pub report_ms: u32,
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
        let model = self.registry.get(&report.worker_id).map(|e| e.model);
        if let Some(model) = &model {
            for (i, n) in report.exit_histogram_delta.iter().enumerate() {
                counter!("rrt_coordinator_token_exits_total", "model" => model.clone(), "loop" => (i + 1).to_string())
                    .increment(*n);
            }
        }
        let known = self.registry.report(report, Instant::now());
        Ok(Response::new(pb::ReportResponse { known }))
    }

    type WatchClusterStream = ViewStream;

    async fn watch_cluster(
        &self,
        _request: Request<pb::WatchClusterRequest>,
    ) -> Result<Response<ViewStream>, Status> {
        let stream = WatchStream::new(self.view.clone()).map(Ok);
        Ok(Response::new(Box::pin(stream)))
    }
}

/// Every interval: evict silent workers, publish the view, update the gauges. Ends on shutdown.
pub async fn publish(
    registry: Arc<Registry>,
    tx: watch::Sender<pb::ClusterView>,
    interval: Duration,
    shutdown: Shutdown,
) {
    let mut ticker = tokio::time::interval(interval);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.wait() => return,
        }
        let now = Instant::now();
        for id in registry.evict(now) {
            tracing::warn!(worker = %id, "worker evicted: no report");
            counter!("rrt_coordinator_evictions_total").increment(1);
            gauge!("rrt_coordinator_worker_score", "worker" => id.clone()).set(f64::NAN);
        }
        let view = registry.view(now);
        gauge!("rrt_coordinator_workers").set(view.workers.len() as f64);
        for w in &view.workers {
            gauge!("rrt_coordinator_worker_score", "worker" => w.worker_id.clone()).set(w.score);
            gauge!("rrt_coordinator_worker_loop_steps_per_second", "worker" => w.worker_id.clone())
                .set(w.loop_steps_per_second);
        }
        for (model, loops) in &view.model_expected_loops {
            gauge!("rrt_coordinator_model_expected_loops", "model" => model.clone()).set(*loops);
        }
        tx.send_replace(view);
    }
}
