//! `rrt-worker`: serves one model's depth-wise batching engine over gRPC.

use std::io::Write;

use clap::Parser;
use rrt_service::{telemetry, Shutdown};
use rrt_worker::WorkerArgs;

#[derive(Parser)]
#[command(
    version,
    about = "rrt worker: the depth-wise batching engine behind gRPC"
)]
struct Cli {
    #[command(flatten)]
    args: WorkerArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    telemetry::init();
    let cli = Cli::parse();
    let shutdown = Shutdown::new();
    shutdown.on_signals();
    let worker = rrt_worker::start(cli.args, shutdown).await?;
    // One line tests and scripts can read for the bound ports (ignored if stdout is gone).
    let _ = writeln!(
        std::io::stdout(),
        "rrt-worker {} grpc={} metrics={}",
        worker.id,
        worker.grpc_addr,
        worker.metrics_addr
    );
    worker.task.await?
}
