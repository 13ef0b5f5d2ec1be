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

use crate::adapt::Adaptive;
use crate::config::CoordinatorArgs;
use crate::registry::Registry;
use crate::service::{publish, CoordinatorService};
use crate::views::Views;

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
    describe_counter!("rrt_coordinator_reports_total", "Worker reports taken.");
    describe_counter!(
        "rrt_coordinator_view_messages_total",
        "Cluster-view messages sent to routers, by kind (whole, delta; placements: another router's prefix placements)."
    );
    describe_counter!(
        "rrt_coordinator_view_bytes_total",
        "Encoded bytes of the cluster-view messages sent to routers, by kind."
    );
    describe_counter!(
        "rrt_coordinator_view_resyncs_total",
        "Whole views sent again to routers that fell behind the deltas."
    );
    describe_counter!(
        "rrt_coordinator_placement_batches_total",
        "Routers' placement batches taken, to pass on to the other routers."
    );
    describe_gauge!(
        "rrt_coordinator_exit_threshold",
        "Load-adaptive exits: the default exit threshold handed to each model's workers (their configured one while load is low, down to the quality floor's as they saturate)."
    );
    describe_gauge!(
        "rrt_coordinator_exit_load_pressure",
        "Load-adaptive exits: each model's saturation (1 = requests waiting per slot, KV use or, with --adapt-ttft-s, time to first token at its high mark)."
    );
    describe_gauge!(
        "rrt_coordinator_model_ttft_p90_seconds",
        "Each model's 90th-percentile time to first token over its workers' last report intervals (weighted by their first tokens); an interval without first tokens keeps the previous value (0 before any)."
    );
    describe_gauge!(
        "rrt_coordinator_exit_expected_agreement",
        "Load-adaptive exits: agreement with full depth at the threshold in force, from the model's measured curve."
    );
    describe_gauge!(
        "rrt_coordinator_view_publish_seconds",
        "Time the latest publish took (evict, build the view, diff it)."
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
    let views = Arc::new(Views::default());
    let adaptive = Arc::new(Adaptive::new(args.adapt()));
    tokio::spawn(publish(
        registry.clone(),
        tx,
        views.clone(),
        adaptive.clone(),
        interval,
        shutdown.clone(),
    ));

    let health = grpc::health(&[SERVICE]).await;
    let (v1, v1alpha) = grpc::reflection()?;
    let reporter = health.reporter.clone();
    let service_shutdown = shutdown.clone();
    let stop = async move {
        shutdown.wait().await;
        grpc::set_serving(&reporter, &[SERVICE], false).await;
    };
    let incoming = tls::incoming(listener, tls.as_ref(), Side::Internal)?;
    let server = tonic::transport::Server::builder()
        .layer(grpc::over_limit_layer())
        .add_service(health.service)
        .add_service(v1)
        .add_service(v1alpha)
        .add_service(
            pb::coordinator_server::CoordinatorServer::new(CoordinatorService {
                registry: registry.clone(),
                view: rx,
                views,
                adaptive,
                report_ms: args.report_ms as u32,
                shutdown: service_shutdown,
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
