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
        Ok(())
    }
}
