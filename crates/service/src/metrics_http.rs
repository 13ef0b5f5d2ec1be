//! The Prometheus endpoint: one recorder per process (the `metrics` facade is global), rendered
//! at `GET /metrics` on each service's own metrics port. Services running in one process (the
//! all-in-one server, tests) share the recorder; their metric names differ by service prefix and
//! worker metrics carry a `worker` label, so nothing collides.

use std::net::SocketAddr;
use std::sync::OnceLock;

use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;

use crate::tls::{self, Side, Tls};
use crate::Shutdown;

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process's Prometheus recorder, installed on first use.
pub fn handle() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets(&[
                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                ])
                .expect("static bucket list is non-empty")
                .build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed; /metrics may be empty");
            }
            handle
        })
        .clone()
}

/// Serves `/metrics`, `/healthz` (the process answers) and `/ready` (its services are SERVING:
/// 200, else 503) on `listener` (HTTPS with `tls`) until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    tls: Option<&Tls>,
    shutdown: Shutdown,
) -> std::io::Result<()> {
    let incoming = tls::incoming(listener, tls, Side::Http)?;
    let handle = handle();
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let h = handle.clone();
                async move {
                    // Histograms and summaries are aggregated lazily: keep memory bounded.
                    h.run_upkeep();
                    h.render()
                }
            }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/ready",
            get(|| async {
                match crate::grpc::readiness() {
                    Ok(()) => (axum::http::StatusCode::OK, "SERVING".to_string()),
                    Err(why) => (axum::http::StatusCode::SERVICE_UNAVAILABLE, why),
                }
            }),
        );
    axum::serve(incoming, app)
        .with_graceful_shutdown(async move { shutdown.wait().await })
        .await
}

/// Binds `addr` and serves `/metrics` in the background (HTTPS with `tls` unless it says
/// `--metrics-plaintext`; a server certificate only: probes and Prometheus verify it against the
/// CA); returns the bound address.
pub async fn spawn(
    addr: SocketAddr,
    tls: Option<&Tls>,
    shutdown: Shutdown,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let tls = tls.and_then(Tls::for_metrics).cloned();
    tokio::spawn(async move {
        if let Err(e) = serve(listener, tls.as_ref(), shutdown).await {
            tracing::error!("metrics endpoint failed: {e}");
        }
    });
    Ok(local)
}
