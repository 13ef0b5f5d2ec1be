//! Starting and stopping the router.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::SeedableRng;
use rrt_proto::v1 as pb;
use rrt_service::tls::{self, Side};
use rrt_service::{grpc, metrics_http, Admission, Shutdown};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::config::RouterArgs;
use crate::pool::Pool;
use crate::service::{Client, Inner, RouterService};

const SERVICE: &str = "rrt.v1.Generation";

/// Largest request message the public API decodes (a prompt of a few hundred thousand
/// characters); larger ones are refused before they are read whole.
pub const MAX_REQUEST_BYTES: usize = 1 << 20;

pub struct RunningRouter {
    pub grpc_addr: SocketAddr,
    /// The OpenAI-compatible HTTP API (`--http-listen`), unless off.
    pub http_addr: Option<SocketAddr>,
    pub metrics_addr: SocketAddr,
    pub pool: Arc<Pool<Client>>,
    pub task: JoinHandle<anyhow::Result<()>>,
}

pub async fn start(args: RouterArgs, shutdown: Shutdown) -> anyhow::Result<RunningRouter> {
    args.check()?;
    let tls = args.tls.start(&shutdown)?;
    let tokens = crate::auth::ApiTokens::load(args.api_token_file.as_deref(), &args.api_tokens)?;
    // The recorder first: descriptions given before it exists are lost.
    metrics_http::handle();
    crate::metrics::describe();
    let listener = TcpListener::bind(args.listen).await?;
    let grpc_addr = listener.local_addr()?;
    let metrics_addr =
        metrics_http::spawn(args.metrics_listen, tls.as_ref(), shutdown.clone()).await?;
    let pool = Arc::new(Pool::new(Duration::from_millis(args.stale_ms)));
    let keepalive = Duration::from_millis(args.keepalive_ms);
    for url in &args.workers {
        tokio::spawn(crate::watcher::add_static_worker(
            pool.clone(),
            url.clone(),
            keepalive,
            tls.clone(),
            shutdown.clone(),
        ));
    }
    let balancer = Arc::new(crate::balance::Balancer::new(args.balance_settings()));
    if let Some(url) = &args.coordinator {
        tokio::spawn(crate::watcher::follow_coordinator(
            pool.clone(),
            balancer.clone(),
            url.clone(),
            args.workers.clone(),
            keepalive,
            tls.clone(),
            shutdown.clone(),
        ));
    }
    let inner = Arc::new(Inner {
        pool: pool.clone(),
        balancer,
        admission: Admission::new(args.max_concurrent),
        max_new_tokens: args.max_new_tokens,
        default_timeout: Duration::from_secs(args.request_timeout_s),
        max_attempts: args.max_attempts,
        rng: Mutex::new(match args.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        }),
    });
    {
        // Gauges that requests update, kept fresh while idle (idle gauges leave /metrics).
        let inner = inner.clone();
        metrics_http::refresh_gauges(shutdown.clone(), move || {
            inner.in_flight_gauge();
            metrics::gauge!("rrt_router_prefix_index_blocks")
                .set(inner.balancer.index.len() as f64);
            metrics::gauge!("rrt_router_workers").set(inner.pool.len() as f64);
        });
    }
    let http_addr = match args.http_listen.0 {
        Some(addr) => {
            let listener = TcpListener::bind(addr).await?;
            let local = listener.local_addr()?;
            let (tls, inner, tokens, shutdown) =
                (tls.clone(), inner.clone(), tokens.clone(), shutdown.clone());
            tokio::spawn(async move {
                if let Err(e) =
                    crate::openai::serve(listener, tls.as_ref(), inner, tokens, shutdown).await
                {
                    tracing::error!("the HTTP API failed: {e}");
                }
            });
            Some(local)
        }
        None => None,
    };
    let health = grpc::health(&[SERVICE]).await;
    let (v1, v1alpha) = grpc::reflection()?;
    let drain = {
        let inner = inner.clone();
        let reporter = health.reporter.clone();
        let deadline = Duration::from_secs(args.drain_s);
        async move {
            shutdown.wait().await;
            inner.admission.stop_admitting();
            grpc::set_serving(&reporter, &[SERVICE], false).await;
            if !inner.admission.drain(deadline).await {
                tracing::warn!("drain deadline passed with requests in flight");
            }
        }
    };
    // The public port: TLS without a client certificate (callers present bearer tokens).
    let incoming = tls::incoming(listener, tls.as_ref(), Side::Public)?;
    let server = tonic::transport::Server::builder()
        .layer(grpc::over_limit_layer())
        .add_service(health.service)
        .add_service(v1)
        .add_service(v1alpha)
        .add_service(tonic::service::interceptor::InterceptedService::new(
            pb::generation_server::GenerationServer::new(RouterService { inner })
                .max_decoding_message_size(MAX_REQUEST_BYTES),
            move |req| match &tokens {
                Some(t) => t.check(req),
                None => Ok(req),
            },
        ))
        .serve_with_incoming_shutdown(incoming, drain);
    grpc::set_serving(&health.reporter, &[SERVICE], true).await;
    tracing::info!(grpc = %grpc_addr, http = ?http_addr, metrics = %metrics_addr, "router serving");
    let task = tokio::spawn(async move {
        server.await?;
        tracing::info!("router stopped");
        Ok(())
    });
    Ok(RunningRouter {
        grpc_addr,
        http_addr,
        metrics_addr,
        pool,
        task,
    })
}
