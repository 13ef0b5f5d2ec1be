//! `rrt-router`: the public Generation API of an rrt cluster.

use std::io::Write;

use clap::Parser;
use rrt_router::RouterArgs;
use rrt_service::{telemetry, Shutdown};

#[derive(Parser)]
#[command(
    version,
    about = "rrt router: the public Generation API, balancing over workers"
)]
struct Cli {
    #[command(flatten)]
    args: RouterArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    telemetry::init();
    let cli = Cli::parse();
    let shutdown = Shutdown::new();
    shutdown.on_signals();
    let r = rrt_router::start(cli.args, shutdown).await?;
    let _ = writeln!(
        std::io::stdout(),
        "rrt-router grpc={} metrics={}",
        r.grpc_addr,
        r.metrics_addr
    );
    r.task.await?
}
