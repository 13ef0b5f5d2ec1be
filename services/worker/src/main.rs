//! `rrt-worker`: serves one model's depth-wise batching engine over gRPC.

#![forbid(unsafe_code)]

use clap::Parser;

/// rrt worker: the depth-wise batching engine behind gRPC.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    args: rrt_worker::WorkerArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Cli::parse().args;
    rrt_service::main_loop::run("rrt-worker", |shutdown| async move {
        let w = rrt_worker::start(args, shutdown).await?;
        let ports = format!("{} grpc={} metrics={}", w.id, w.grpc_addr, w.metrics_addr);
        Ok((ports, w.task))
    })
    .await
}
