//! `rrt-router`: the public Generation API of an rrt cluster.

#![forbid(unsafe_code)]

use clap::Parser;

/// rrt router: the public Generation API, balancing over workers.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    args: rrt_router::RouterArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Cli::parse().args;
    rrt_service::main_loop::run("rrt-router", |shutdown| async move {
        let r = rrt_router::start(args, shutdown).await?;
        let mut ports = format!("grpc={} metrics={}", r.grpc_addr, r.metrics_addr);
        if let Some(http) = r.http_addr {
            ports.push_str(&format!(" http={http}"));
        }
        Ok((ports, r.task))
    })
    .await
}
