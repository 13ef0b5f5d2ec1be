//! The coordinator's command line (every flag also reads an `RRT_COORDINATOR_*` variable).

use std::net::SocketAddr;

use clap::Args;

#[derive(Args, Debug, Clone)]
pub struct CoordinatorArgs {
    /// gRPC address of the Coordinator service.
    #[arg(long, env = "RRT_COORDINATOR_LISTEN", default_value = "0.0.0.0:50051")]
    pub listen: SocketAddr,
    /// Address of the Prometheus `/metrics` endpoint.
    #[arg(
        long,
        env = "RRT_COORDINATOR_METRICS_LISTEN",
        default_value = "0.0.0.0:9100"
    )]
    pub metrics_listen: SocketAddr,
    /// How often workers report, and how often routers get the cluster view (ms).
    #[arg(long, env = "RRT_COORDINATOR_REPORT_MS", default_value_t = 500)]
    pub report_ms: u64,
    /// A worker silent for this long is evicted (ms).
    #[arg(long, env = "RRT_COORDINATOR_EVICT_MS", default_value_t = 2000)]
    pub evict_ms: u64,
    /// Load-adaptive exits: as a model's workers saturate, lower their default exit threshold
    /// (learned exits only) down to the lowest one whose measured agreement with full depth is
    /// at least this (0..1, from the model's threshold curve), and restore it as load falls.
    /// Unset: thresholds stay as the workers configure them.
    #[arg(long, env = "RRT_COORDINATOR_EXIT_QUALITY_FLOOR")]
    pub exit_quality_floor: Option<f64>,
    /// Saturation by queue: requests waiting per sequence slot over the model's workers (a
    /// queue is where time to first token grows).
    #[arg(long, env = "RRT_COORDINATOR_ADAPT_QUEUE", default_value_t = 0.05)]
    pub adapt_queue: f64,
    /// Saturation by memory: KV blocks held over the pool, mean over the model's workers.
    #[arg(long, env = "RRT_COORDINATOR_ADAPT_KV", default_value_t = 0.9)]
    pub adapt_kv: f64,
    /// Saturation by latency: the workers' 90th-percentile time to first token over their last
    /// report intervals at this many seconds (your TTFT objective). Unset: not a signal.
    #[arg(long, env = "RRT_COORDINATOR_ADAPT_TTFT_S")]
    pub adapt_ttft_s: Option<f64>,
    /// Share of the way to the floor taken per saturated report interval.
    #[arg(long, env = "RRT_COORDINATOR_ADAPT_LOWER_STEP", default_value_t = 0.25)]
    pub adapt_lower_step: f64,
    /// Share of the way back taken per interval once load is below half of saturation.
    #[arg(
        long,
        env = "RRT_COORDINATOR_ADAPT_RESTORE_STEP",
        default_value_t = 0.1
    )]
    pub adapt_restore_step: f64,
    #[command(flatten)]
    pub tls: rrt_service::tls::TlsArgs,
}

impl CoordinatorArgs {
    pub fn check(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.report_ms > 0, "--report-ms must be at least 1");
        anyhow::ensure!(
            self.evict_ms > self.report_ms,
            "--evict-ms ({}) must be longer than --report-ms ({})",
            self.evict_ms,
            self.report_ms
        );
        if let Some(f) = self.exit_quality_floor {
            anyhow::ensure!(
                (0.0..=1.0).contains(&f),
                "--exit-quality-floor must be in [0, 1], got {f}"
            );
        }
        for (flag, v) in [
            ("--adapt-queue", self.adapt_queue),
            ("--adapt-kv", self.adapt_kv),
        ] {
            anyhow::ensure!(v.is_finite() && v > 0.0, "{flag} must be > 0, got {v}");
        }
        if let Some(v) = self.adapt_ttft_s {
            anyhow::ensure!(
                v.is_finite() && v > 0.0,
                "--adapt-ttft-s must be > 0 seconds, got {v}"
            );
        }
        for (flag, v) in [
            ("--adapt-lower-step", self.adapt_lower_step),
            ("--adapt-restore-step", self.adapt_restore_step),
        ] {
            anyhow::ensure!(v > 0.0 && v <= 1.0, "{flag} must be in (0, 1], got {v}");
        }
        Ok(())
    }

    pub fn adapt(&self) -> crate::adapt::AdaptConfig {
        crate::adapt::AdaptConfig {
            quality_floor: self.exit_quality_floor,
            queue_high: self.adapt_queue,
            kv_high: self.adapt_kv,
            ttft_high: self.adapt_ttft_s,
            lower_step: self.adapt_lower_step,
            restore_step: self.adapt_restore_step,
        }
    }
}
