//! Keeps the router's pool current: follows the coordinator's cluster view as deltas (the whole
//! view first; a coordinator that sends whole views each time works too; reconnecting with a
//! pause when it is unreachable; the pool keeps its last workers and the router falls back to
//! least-outstanding once the view is stale) and looks up statically configured workers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rrt_proto::v1 as pb;
use rrt_proto::v1::coordinator_client::CoordinatorClient;
use rrt_proto::v1::worker_client::WorkerClient;
use rrt_service::tls::{self, Tls};
use rrt_service::Shutdown;

use crate::balance::Balancer;
use crate::pool::Pool;
use crate::service::Client;

const RETRY: Duration = Duration::from_millis(500);

/// A worker's channel, connected on first use. HTTP/2 PINGs every `keepalive` (idle or not)
/// and a connection that leaves one unanswered for two intervals is closed: the streams on a
/// killed or frozen (SIGSTOP) worker then end with an error and fail over.
fn lazy_client(url: &str, keepalive: Duration, tls: Option<&Tls>) -> Option<Client> {
    let endpoint = tls::endpoint(url, tls)
        .map_err(|e| tracing::error!("worker {url}: {e:#}"))
        .ok()?;
    let endpoint = endpoint
        .connect_timeout(Duration::from_secs(2))
        .http2_keep_alive_interval(keepalive)
        .keep_alive_timeout(2 * keepalive)
        .keep_alive_while_idle(true);
    Some(WorkerClient::new(tls::connect_lazy(&endpoint, tls)))
}

/// How often the router sends its new placements to the coordinator.
const SHARE_EVERY: Duration = Duration::from_millis(100);

/// Sends this router's placements to the coordinator every [`SHARE_EVERY`] while connected
/// (never returns; dropped with the connection). A batch the coordinator refuses is lost:
/// placements are hints, and the next ones follow.
async fn share_placements(
    mut client: CoordinatorClient<tonic::transport::Channel>,
    balancer: Arc<Balancer>,
) {
    let mut ticker = tokio::time::interval(SHARE_EVERY);
    loop {
        ticker.tick().await;
        loop {
            let placements = balancer.take_placements();
            if placements.is_empty() {
                break;
            }
            let blocks: usize = placements.iter().map(|p| p.blocks.len()).sum();
            let batch = pb::PlacementBatch {
                router_id: balancer.router_id.clone(),
                placements,
            };
            match client.share_placements(batch).await {
                Ok(_) => {
                    metrics::counter!("rrt_router_placements_shared_total", "outcome" => "sent")
                        .increment(blocks as u64)
                }
                Err(e) => {
                    tracing::debug!("sharing placements failed: {e}");
                    metrics::counter!("rrt_router_placements_shared_total", "outcome" => "lost")
                        .increment(blocks as u64);
                    break;
                }
            }
        }
    }
}

/// Follows the coordinator until shutdown.
pub async fn follow_coordinator(
    pool: Arc<Pool<Client>>,
    balancer: Arc<Balancer>,
    url: String,
    static_workers: Vec<String>,
    keepalive: Duration,
    tls: Option<Tls>,
    shutdown: Shutdown,
) {
    let run = async {
        loop {
            let endpoint = match tls::endpoint(&url, tls.as_ref()) {
                Ok(e) => e.connect_timeout(Duration::from_secs(2)),
                Err(e) => {
                    tracing::error!("bad coordinator URL {url:?}: {e:#}");
                    return;
                }
            };
            match tls::connect(&endpoint, tls.as_ref()).await {
                Ok(channel) => {
                    let mut client = CoordinatorClient::new(channel);
                    match client
                        .watch_cluster(pb::WatchClusterRequest {
                            deltas: true,
                            router_id: balancer.router_id.clone(),
                        })
                        .await
                    {
                        Ok(resp) => {
                            tracing::info!("following the coordinator's cluster view");
                            let mut stream = resp.into_inner();
                            let follow = async {
                                while let Ok(Some(view)) = stream.message().await {
                                    pool.apply_view(
                                        &view,
                                        Instant::now(),
                                        |w| {
                                            lazy_client(
                                                &tls::url(&w.address, tls.as_ref()),
                                                keepalive,
                                                tls.as_ref(),
                                            )
                                        },
                                        |addr| static_workers.iter().any(|s| s == addr),
                                    );
                                    let learned = balancer.learn(&pool, &view.placements);
                                    metrics::counter!("rrt_router_placements_learned_total")
                                        .increment(learned as u64);
                                    metrics::gauge!("rrt_router_workers").set(pool.len() as f64);
                                }
                            };
                            if balancer.settings.share_placements {
                                tokio::select! {
                                    _ = follow => {}
                                    _ = share_placements(client.clone(), balancer.clone()) => {}
                                }
                            } else {
                                follow.await;
                            }
                            tracing::warn!("lost the coordinator; using the last view");
                        }
                        Err(e) => tracing::debug!("watch failed: {e}"),
                    }
                }
                Err(e) => tracing::debug!("coordinator unreachable: {e}"),
            }
            tokio::time::sleep(RETRY).await;
        }
    };
    tokio::select! {
        _ = run => {}
        _ = shutdown.wait() => {}
    }
}

/// Asks each `--worker` URL for its id and model until it answers, then adds it to the pool.
pub async fn add_static_worker(
    pool: Arc<Pool<Client>>,
    url: String,
    keepalive: Duration,
    tls: Option<Tls>,
    shutdown: Shutdown,
) {
    let Some(client) = lazy_client(&url, keepalive, tls.as_ref()) else {
        tracing::error!("bad worker URL {url:?}");
        return;
    };
    loop {
        let mut c = client.clone();
        match c.info(pb::WorkerInfoRequest {}).await {
            Ok(info) => {
                let info = info.into_inner();
                let model = info.model.map(|m| m.model).unwrap_or_default();
                tracing::info!(worker = %info.worker_id, %url, %model, "static worker added");
                pool.add_static(info.worker_id, url, model, client);
                return;
            }
            Err(e) => tracing::debug!("worker {url} not answering yet: {e}"),
        }
        tokio::select! {
            _ = tokio::time::sleep(RETRY) => {}
            _ = shutdown.wait() => return,
        }
    }
}
