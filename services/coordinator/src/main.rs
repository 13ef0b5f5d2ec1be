//! `rrt-coordinator`: the cluster's worker registry and load scores.

#![forbid(unsafe_code)]

use clap::Parser;

/// rrt coordinator: worker registry, exit statistics, load scores.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    args: rrt_coordinator::CoordinatorArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Cli::parse().args;
    rrt_service::main_loop::run("rrt-coordinator", |shutdown| async move {
        let c = rrt_coordinator::start(args, shutdown).await?;
        Ok((
            format!("grpc={} metrics={}", c.grpc_addr, c.metrics_addr),
            c.task,
        ))
    })
    .await
}
