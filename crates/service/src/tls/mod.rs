//! TLS on every port of the cluster, from PEM files (a Kubernetes Secret mounted in every pod):
//! each service presents `--tls-cert`/`--tls-key` on its gRPC and metrics ports and, as a client
//! of the other services, verifies their certificates against `--tls-ca` and presents its own
//! (mutual TLS). Internal gRPC ports (workers, coordinator) refuse clients without a certificate
//! that CA signed; the router's public port and every metrics port ask for none (API callers
//! authenticate with bearer tokens; probes and Prometheus verify the server only).
//!
//! The files are re-read every `--tls-reload-ms` and, when they changed and form a valid set, the
//! next handshakes (accepted and made) use them: a rotated Secret takes effect without a restart,
//! open connections keep their session, and a half-written or broken set is refused with a log
//! line and a metric while the previous one stays in use.
//!
//! This module owns the flags and the loaded material; [`material`] turns PEM into rustls
//! configurations, [`incoming`] accepts connections (TLS or not) for tonic and axum, and
//! [`connector`] makes the client side's connections.

mod connector;
mod incoming;
mod material;

use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use tonic::transport::{Channel, Endpoint};

pub use incoming::{incoming, Conn, Incoming, Side};
use material::{Configs, Files};

use crate::Shutdown;

/// The TLS flags every service takes (env `RRT_TLS_*`).
#[derive(Args, Debug, Clone)]
pub struct TlsArgs {
    /// PEM certificate chain this service presents on its ports and to its peers.
    #[arg(long, env = "RRT_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `--tls-cert`.
    #[arg(long, env = "RRT_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA of the cluster: peers' certificates are verified against it, and clients of an
    /// internal port must present a certificate it signed.
    #[arg(long, env = "RRT_TLS_CA", requires = "tls_cert")]
    pub tls_ca: Option<PathBuf>,
    /// The name peers' certificates must carry, instead of the host of their URL (workers
    /// addressed by pod IP: give their certificates a DNS name and name it here).
    #[arg(long, env = "RRT_TLS_SERVER_NAME")]
    pub tls_server_name: Option<String>,
    /// How often the certificate, key and CA files are re-read (a rotated Secret applies
    /// without a restart); 0 reads them once.
    #[arg(long, env = "RRT_TLS_RELOAD_MS", default_value_t = 10_000)]
    pub tls_reload_ms: u64,
    /// Serve the metrics / readiness port in plaintext even with `--tls-cert` (for probes and
    /// scrapers that are not set up for HTTPS); gRPC ports stay TLS.
    #[arg(long, env = "RRT_METRICS_PLAINTEXT")]
    pub metrics_plaintext: bool,
}

impl Default for TlsArgs {
    fn default() -> Self {
        Self {
            tls_cert: None,
            tls_key: None,
            tls_ca: None,
            tls_server_name: None,
            tls_reload_ms: 10_000,
            metrics_plaintext: false,
        }
    }
}

/// Loaded TLS material, shared by every clone; `None` from [`TlsArgs::load`] means plaintext.
#[derive(Clone)]
pub struct Tls {
    inner: Arc<Inner>,
}

struct Inner {
    args: TlsArgs,
    /// The configurations handshakes use now.
    current: RwLock<Arc<Configs>>,
    /// The file contents last read (applied or refused), to act on changes only.
    seen: Mutex<Files>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("cert", &self.inner.args.tls_cert)
            .finish_non_exhaustive()
    }
}

impl TlsArgs {
    /// Reads and checks the files (errors name the flag and the file); `None` without
    /// `--tls-cert`.
    pub fn load(&self) -> anyhow::Result<Option<Tls>> {
        if self.tls_cert.is_none() {
            return Ok(None);
        }
        let files = Files::read(self)?;
        let configs = material::build(&files)?;
        Ok(Some(Tls {
            inner: Arc::new(Inner {
                args: self.clone(),
                current: RwLock::new(Arc::new(configs)),
                seen: Mutex::new(files),
            }),
        }))
    }
}

impl TlsArgs {
    /// [`TlsArgs::load`], and the files re-read every `--tls-reload-ms` until `shutdown`.
    pub fn start(&self, shutdown: &Shutdown) -> anyhow::Result<Option<Tls>> {
        let tls = self.load()?;
        crate::metrics_http::handle();
        metrics::describe_counter!(
            "rrt_tls_reloads_total",
            "Changed TLS files: applied, or refused (they did not load; the previous set stays)."
        );
        metrics::describe_counter!(
            "rrt_tls_handshake_failures_total",
            "Incoming TLS handshakes that failed or timed out."
        );
        if let Some(t) = &tls {
            t.spawn_reloader(shutdown.clone());
        }
        Ok(tls)
    }
}

/// What a reload did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reload {
    /// The files are as last read.
    Unchanged,
    /// New files, now in use.
    Applied,
}

impl Tls {
    fn configs(&self) -> Arc<Configs> {
        self.inner
            .current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The server configuration handshakes on a `side` port use now.
    pub fn server_config(&self, side: Side) -> Arc<rustls::ServerConfig> {
        let c = self.configs();
        match side {
            Side::Internal => c.internal.clone(),
            Side::Public => c.public.clone(),
            Side::Http => c.http.clone(),
        }
    }

    /// The client configuration connections to peers use now.
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        self.configs().client.clone()
    }

    /// What the metrics port serves: this, or plaintext with `--metrics-plaintext`.
    pub fn for_metrics(&self) -> Option<&Tls> {
        (!self.inner.args.metrics_plaintext).then_some(self)
    }

    /// The name peers' certificates must carry, when it is not their URL's host.
    pub fn server_name(&self) -> Option<&str> {
        self.inner.args.tls_server_name.as_deref()
    }

    /// Re-reads the files and applies them when they changed. A set that does not load (a
    /// missing file, bad PEM, a key that does not match) is an error and changes nothing;
    /// the same broken contents are reported once, an unreadable file at every poll.
    pub fn reload(&self) -> anyhow::Result<Reload> {
        let files = Files::read(&self.inner.args)?;
        let mut seen = self.inner.seen.lock().unwrap_or_else(|p| p.into_inner());
        if *seen == files {
            return Ok(Reload::Unchanged);
        }
        let built = material::build(&files);
        *seen = files;
        let configs = built?;
        *self
            .inner
            .current
            .write()
            .unwrap_or_else(|p| p.into_inner()) = Arc::new(configs);
        Ok(Reload::Applied)
    }

    /// Re-reads the files every `--tls-reload-ms` until `shutdown` (nothing when it is 0).
    /// Counted in `rrt_tls_reloads_total{outcome="applied"|"refused"}`.
    pub fn spawn_reloader(&self, shutdown: Shutdown) {
        if self.inner.args.tls_reload_ms == 0 {
            return;
        }
        let every = Duration::from_millis(self.inner.args.tls_reload_ms);
        let tls = self.clone();
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(every);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticker.tick().await;
            loop {
                tokio::select! {
                    _ = ticker.tick() => {}
                    _ = shutdown.wait() => return,
                }
                let t = tls.clone();
                let outcome = tokio::task::spawn_blocking(move || t.reload()).await;
                match outcome {
                    Ok(Ok(Reload::Unchanged)) => {}
                    Ok(Ok(Reload::Applied)) => {
                        tracing::info!("TLS files changed: new handshakes use them");
                        metrics::counter!("rrt_tls_reloads_total", "outcome" => "applied")
                            .increment(1);
                    }
                    Ok(Err(e)) => {
                        tracing::warn!("TLS files changed but do not load (still using the previous ones): {e:#}");
                        metrics::counter!("rrt_tls_reloads_total", "outcome" => "refused")
                            .increment(1);
                    }
                    Err(e) => tracing::error!("TLS reload task: {e}"),
                }
            }
        });
    }
}

/// The URL of a peer at `address` (`host:port`), in the scheme `tls` calls for.
pub fn url(address: &str, tls: Option<&Tls>) -> String {
    let scheme = if tls.is_some() { "https" } else { "http" };
    format!("{scheme}://{address}")
}

/// An endpoint for a peer's `url`; connect it with [`connect`] or [`connect_lazy`], which make
/// the TLS connection when `tls` is given (`https://` and `http://` are then the same).
pub fn endpoint(url: &str, tls: Option<&Tls>) -> anyhow::Result<Endpoint> {
    let url = match (tls, url.strip_prefix("https://")) {
        (Some(_), Some(rest)) => format!("http://{rest}"),
        (None, Some(_)) => anyhow::bail!("{url}: an https URL needs --tls-cert and --tls-ca"),
        _ => url.to_string(),
    };
    Endpoint::from_shared(url.clone()).with_context(|| format!("URL {url:?}"))
}

/// A channel to `endpoint` that connects on first use (and reconnects), over TLS with the
/// material current at each connection when `tls` is given.
pub fn connect_lazy(endpoint: &Endpoint, tls: Option<&Tls>) -> Channel {
    match tls {
        Some(t) => endpoint.connect_with_connector_lazy(connector::Connector::new(t.clone())),
        None => endpoint.connect_lazy(),
    }
}

/// A channel to `endpoint`, connected now.
pub async fn connect(
    endpoint: &Endpoint,
    tls: Option<&Tls>,
) -> Result<Channel, tonic::transport::Error> {
    match tls {
        Some(t) => {
            endpoint
                .connect_with_connector(connector::Connector::new(t.clone()))
                .await
        }
        None => endpoint.connect().await,
    }
}
