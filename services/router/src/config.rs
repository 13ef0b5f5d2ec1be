//! The router's command line (every flag also reads an `RRT_ROUTER_*` variable).

use std::net::SocketAddr;

use clap::Args;

#[derive(Args, Debug, Clone)]
pub struct RouterArgs {
    /// gRPC address of the public Generation service.
    #[arg(long, env = "RRT_ROUTER_LISTEN", default_value = "0.0.0.0:50050")]
    pub listen: SocketAddr,
    /// Address of the OpenAI-compatible HTTP API (`/v1/completions`, `/v1/chat/completions`,
    /// `/v1/models`, `/health`); `off` to serve gRPC only.
    #[arg(long, env = "RRT_ROUTER_HTTP_LISTEN", default_value = "0.0.0.0:8080")]
    pub http_listen: HttpListen,
    /// Address of the Prometheus `/metrics` endpoint.
    #[arg(
        long,
        env = "RRT_ROUTER_METRICS_LISTEN",
        default_value = "0.0.0.0:9102"
    )]
    pub metrics_listen: SocketAddr,
    /// Coordinator URL (`http://host:port`) to watch for workers and their scores.
    #[arg(long, env = "RRT_COORDINATOR")]
    pub coordinator: Option<String>,
    /// Worker URLs used besides (or without) the coordinator, comma-separated.
    #[arg(long = "worker", env = "RRT_ROUTER_WORKERS", value_delimiter = ',')]
    pub workers: Vec<String>,
    /// Requests in flight through this router at most; more get RESOURCE_EXHAUSTED.
    #[arg(long, env = "RRT_ROUTER_MAX_CONCURRENT", default_value_t = 512)]
    pub max_concurrent: usize,
    /// Largest max_new_tokens a request may ask for.
    #[arg(long, env = "RRT_ROUTER_MAX_NEW_TOKENS", default_value_t = 1024)]
    pub max_new_tokens: u32,
    /// Deadline of requests that carry none (seconds).
    #[arg(long, env = "RRT_ROUTER_REQUEST_TIMEOUT_S", default_value_t = 300)]
    pub request_timeout_s: u64,
    /// A coordinator view older than this is stale: pick by least outstanding instead (ms).
    #[arg(long, env = "RRT_ROUTER_STALE_MS", default_value_t = 2000)]
    pub stale_ms: u64,
    /// Seconds in-flight requests get to finish after SIGTERM.
    #[arg(long, env = "RRT_ROUTER_DRAIN_S", default_value_t = 30)]
    pub drain_s: u64,
    /// Workers one request may run on: the first, then each one a stream fails over to when its
    /// worker dies, stalls or cannot be reached (the request resumes after the tokens sent).
    #[arg(long, env = "RRT_ROUTER_MAX_ATTEMPTS", default_value_t = 3)]
    pub max_attempts: usize,
    /// HTTP/2 PING interval on worker connections (ms); a worker that leaves two unanswered
    /// (killed, frozen, cut off) counts as lost and its streams fail over.
    #[arg(long, env = "RRT_ROUTER_KEEPALIVE_MS", default_value_t = 1000)]
    pub keepalive_ms: u64,
    /// File of API tokens (one per line): callers must send `authorization: Bearer <token>`
    /// (UNAUTHENTICATED otherwise). Without tokens the API is open.
    #[arg(long, env = "RRT_ROUTER_API_TOKEN_FILE")]
    pub api_token_file: Option<std::path::PathBuf>,
    /// API tokens, comma-separated (e.g. from a Secret as an environment variable).
    #[arg(
        long = "api-token",
        alias = "api-key",
        env = "RRT_ROUTER_API_TOKENS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub api_tokens: Vec<String>,
    /// How to pick a worker per request: round-robin, least-outstanding (cluster-wide),
    /// power-of-two (the lower predicted drain time of two random workers), depth-aware
    /// (power-of-two with each request's loops predicted from its class), cache-aware (the
    /// worker sent the longest prefix of the prompt, unless more loaded than the least loaded),
    /// combined (cache-aware with depth-aware loads; docs/routing.md).
    #[arg(
        long,
        env = "RRT_ROUTER_BALANCE",
        value_enum,
        default_value = "combined"
    )]
    pub balance: crate::balance::Balance,
    /// Seconds of predicted load a worker holding a request's prefix may carry above the least
    /// loaded worker's before the request spills there (cache-aware, combined).
    #[arg(long, env = "RRT_ROUTER_SPILL_S", default_value_t = 0.1)]
    pub spill_s: f64,
    /// KV use (0..1) at which a worker holding a prefix takes no more requests for it.
    #[arg(long, env = "RRT_ROUTER_SPILL_KV", default_value_t = 0.9)]
    pub spill_kv: f64,
    /// Milliseconds after a prefix is sent to a worker before the router counts it as cached
    /// there in a request's predicted work (the first request's prefill is still computing
    /// it; a second request sent meanwhile computes it again). The worker still holds the
    /// prefix for affinity.
    #[arg(long, env = "RRT_ROUTER_PREFIX_SETTLE_MS", default_value_t = 500)]
    pub prefix_settle_ms: u64,
    /// Trust the prefix-cache horizons workers report (how long ago their caches' most
    /// recently evicted block was last used): a prefix last sent to a worker before its horizon
    /// counts as evicted there, for affinity and for the predicted work (`false`: a prefix
    /// counts as held until the index forgets it).
    #[arg(
        long,
        env = "RRT_ROUTER_PREFIX_HORIZON",
        default_value_t = true,
        action = clap::ArgAction::Set
    )]
    pub prefix_horizon: bool,
    /// Prompt-prefix blocks (64 bytes each) the router remembers at most; the least recently
    /// used quarter goes when full (about 80 bytes each).
    #[arg(
        long,
        env = "RRT_ROUTER_PREFIX_INDEX_BLOCKS",
        default_value_t = 262_144
    )]
    pub prefix_index_blocks: usize,
    /// Share this router's placements (prompt-prefix blocks sent to workers) with the other
    /// router replicas through the coordinator, and route on theirs: replicas then keep one
    /// another's affinity (`false`: each routes on what it sent itself).
    #[arg(
        long,
        env = "RRT_ROUTER_SHARE_PLACEMENTS",
        default_value_t = true,
        action = clap::ArgAction::Set
    )]
    pub share_placements: bool,
    /// Seed of the worker choices' random draws (default: from the OS; set it to make a test's
    /// routing reproducible).
    #[arg(long, env = "RRT_ROUTER_SEED")]
    pub seed: Option<u64>,
    #[command(flatten)]
    pub tls: rrt_service::tls::TlsArgs,
}

/// Where the HTTP API listens, or `off`.
#[derive(Debug, Clone, Copy)]
pub struct HttpListen(pub Option<SocketAddr>);

impl std::str::FromStr for HttpListen {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s == "off" {
            return Ok(Self(None));
        }
        s.parse()
            .map(|a| Self(Some(a)))
            .map_err(|e| format!("{s:?}: {e} (an address, or off)"))
    }
}

impl RouterArgs {
    /// The balancer's settings from the flags.
    pub fn balance_settings(&self) -> crate::balance::Settings {
        crate::balance::Settings {
            balance: self.balance,
            spill_s: self.spill_s,
            spill_kv: self.spill_kv,
            index_blocks: self.prefix_index_blocks,
            settle: std::time::Duration::from_millis(self.prefix_settle_ms),
            cache_horizon: self.prefix_horizon,
            share_placements: self.share_placements && self.coordinator.is_some(),
            ..Default::default()
        }
    }

    pub fn check(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.coordinator.is_some() || !self.workers.is_empty(),
            "give --coordinator or at least one --worker"
        );
        anyhow::ensure!(
            self.max_concurrent > 0,
            "--max-concurrent must be at least 1"
        );
        anyhow::ensure!(
            self.max_new_tokens > 0,
            "--max-new-tokens must be at least 1"
        );
        anyhow::ensure!(self.max_attempts > 0, "--max-attempts must be at least 1");
        anyhow::ensure!(
            self.spill_s.is_finite() && self.spill_s >= 0.0,
            "--spill-s must be a number of seconds >= 0"
        );
        anyhow::ensure!(
            (0.0..=1.0).contains(&self.spill_kv),
            "--spill-kv must be within 0..1"
        );
        anyhow::ensure!(self.keepalive_ms > 0, "--keepalive-ms must be at least 1");
        anyhow::ensure!(
            self.request_timeout_s > 0,
            "--request-timeout-s must be at least 1"
        );
        Ok(())
    }
}
