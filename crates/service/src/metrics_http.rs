//! The Prometheus endpoint: one recorder per process (the `metrics` facade is global), rendered
//! at `GET /metrics` on each service's own metrics port. Services running in one process (the
//! all-in-one server, tests) share the recorder; their metric names differ by service prefix and
//! worker metrics carry a `worker` label, so nothing collides.

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use metrics_util::MetricKindMask;
use tokio::net::TcpListener;

use crate::tls::{self, Side, Tls};
use crate::Shutdown;

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Gauges not set for this long leave `/metrics` (an evicted worker's series, a model no longer
/// served), so series cardinality follows what is live. Every gauge that stays meaningful is set
/// at least every [`GAUGE_REFRESH`].
pub const GAUGE_IDLE: Duration = Duration::from_secs(120);
/// How often the services set the gauges nothing else updates (weights, idle in-flight counts).
pub const GAUGE_REFRESH: Duration = Duration::from_secs(15);

/// The recorder's settings: latency buckets, and gauges dropped after `gauge_idle` unset.
fn builder(gauge_idle: Duration) -> PrometheusBuilder {
    PrometheusBuilder::new()
        .set_buckets(&[
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
        ])
        .expect("static bucket list is non-empty")
        .idle_timeout(MetricKindMask::GAUGE, Some(gauge_idle))
}

/// The process's Prometheus recorder, installed on first use.
pub fn handle() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let recorder = builder(GAUGE_IDLE).build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed; /metrics may be empty");
            }
            handle
        })
        .clone()
}

/// Calls `set` (which sets gauges) now and every [`GAUGE_REFRESH`] until `shutdown`.
pub fn refresh_gauges(shutdown: Shutdown, set: impl Fn() + Send + 'static) {
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(GAUGE_REFRESH);
        loop {
            tokio::select! {
                _ = ticker.tick() => set(),
                _ = shutdown.wait() => return,
            }
        }
    });
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gauge_left_unset_leaves_the_page_and_one_kept_set_stays() {
        let recorder = builder(Duration::from_millis(200)).build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            metrics::gauge!("t_score", "worker" => "gone").set(1.0);
            metrics::gauge!("t_score", "worker" => "live").set(2.0);
            metrics::counter!("t_total").increment(1);
        });
        assert!(handle.render().contains("worker=\"gone\""));
        std::thread::sleep(Duration::from_millis(150));
        metrics::with_local_recorder(&recorder, || {
            metrics::gauge!("t_score", "worker" => "live").set(2.0);
        });
        std::thread::sleep(Duration::from_millis(150));
        let page = handle.render();
        assert!(!page.contains("worker=\"gone\""), "{page}");
        assert!(page.contains("worker=\"live\""), "{page}");
        // Counters stay.
        assert!(page.contains("t_total 1"), "{page}");
    }
}
