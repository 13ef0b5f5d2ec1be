//! `rrt-coordinator`: the cluster's worker registry and load scores.

use std::io::Write;

use clap::Parser;
use rrt_coordinator::CoordinatorArgs;
use rrt_service::{telemetry, Shutdown};

#[derive(Parser)]
#[command(
    version,
    about = "rrt coordinator: worker registry, exit statistics, load scores"
)]
struct Cli {
    #[command(flatten)]
    args: CoordinatorArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    telemetry::init();
    let cli = Cli::parse();
    let shutdown = Shutdown::new();
    shutdown.on_signals();
    let c = rrt_coordinator::start(cli.args, shutdown).await?;
    let _ = writeln!(
        std::io::stdout(),
        "rrt-coordinator grpc={} metrics={}",
        c.grpc_addr,
        c.metrics_addr
    );
    c.task.await?
}
