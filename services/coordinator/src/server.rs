//! Starting and stopping the coordinator.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use metrics::{describe_counter, describe_gauge};
use rrt_proto::v1 as pb;
use rrt_service::tls::{self, Side};
use rrt_service::{grpc, metrics_http, Shutdown};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::CoordinatorArgs;
use crate::registry::Registry;
use crate::service::{publish, CoordinatorService};

const SERVICE: &str = "rrt.v1.Coordinator";

pub struct RunningCoordinator {
    pub grpc_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub registry: Arc<Registry>,
    pub task: JoinHandle<anyhow::Result<()>>,
}

fn describe() {
    describe_gauge!(
        "rrt_coordinator_workers",
        "Workers registered and reporting."
    );
    describe_gauge!(
        "rrt_coordinator_worker_score",
        "Predicted seconds to drain each worker's pending loop-steps (lower is better)."
    );
    describe_gauge!(
        "rrt_coordinator_worker_loop_steps_per_second",
        "Each worker's smoothed measured loop-step throughput."
    );
    describe_gauge!(
        "rrt_coordinator_model_expected_loops",
        "Expected loops per generated token per model, from all its workers' exits."
    );
    describe_counter!(
        "rrt_coordinator_token_exits_total",
        "Generated tokens by model and exit loop, as workers reported them."
    );
    describe_counter!(
        "rrt_coordinator_registrations_total",
        "Worker registrations."
    );
    describe_counter!(
        "rrt_coordinator_evictions_total",
        "Workers evicted for missing reports."
    );
}

pub async fn start(
    args: CoordinatorArgs,
    shutdown: Shutdown,
) -> anyhow::Result<RunningCoordinator> {
    args.check()?;
    // The recorder first: descriptions given before it exists are lost.
    metrics_http::handle();
    describe();
    let tls = args.tls.start(&shutdown)?;
    let listener = TcpListener::bind(args.listen).await?;
    let grpc_addr = listener.local_addr()?;
    let metrics_addr =
        metrics_http::spawn(args.metrics_listen, tls.as_ref(), shutdown.clone()).await?;
    let interval = Duration::from_millis(args.report_ms);
    let registry = Arc::new(Registry::new(Duration::from_millis(args.evict_ms)));
    let (tx, rx) = watch::channel(pb::ClusterView::default());
    tokio::spawn(publish(registry.clone(), tx, interval, shutdown.clone()));

    let health = grpc::health(&[SERVICE]).await;
    let (v1, v1alpha) = grpc::reflection()?;
    let reporter = health.reporter.clone();
    let stop = async move {
        shutdown.wait().await;
        grpc::set_serving(&reporter, &[SERVICE], false).await;
    };
    let incoming = tls::incoming(listener, tls.as_ref(), Side::Internal)?;
    let server = tonic::transport::Server::builder()
        .add_service(health.service)
        .add_service(v1)
        .add_service(v1alpha)
        .add_service(
            pb::coordinator_server::CoordinatorServer::new(CoordinatorService {
                registry: registry.clone(),
                view: rx,
                report_ms: args.report_ms as u32,
            })
            // Registrations and reports are small: a larger message is not a worker's.
            .max_decoding_message_size(256 << 10),
        )
        .serve_with_incoming_shutdown(incoming, stop);
    grpc::set_serving(&health.reporter, &[SERVICE], true).await;
    tracing::info!(grpc = %grpc_addr, metrics = %metrics_addr, "coordinator serving");
    let task = tokio::spawn(async move {
        server.await?;
        tracing::info!("coordinator stopped");
        Ok(())
    });
    Ok(RunningCoordinator {
        grpc_addr,
        metrics_addr,
        registry,
        task,
    })
}
