//! The body every service binary's `main` shares: logs, the shutdown signal, start-up, one
//! line naming the bound ports on stdout (tests and scripts read it; ignored if stdout is
//! gone), then serving until drained.

use std::future::Future;
use std::io::Write;

use tokio::task::JoinHandle;

use crate::{telemetry, Shutdown};

/// A started service: the ports line (`grpc=... metrics=...`) and the task that ends when it
/// has drained.
pub type Started = (String, JoinHandle<anyhow::Result<()>>);

/// Runs the service `start` starts, as process `name`, until SIGTERM or SIGINT has drained it.
pub async fn run<F, Fut>(name: &str, start: F) -> anyhow::Result<()>
where
    F: FnOnce(Shutdown) -> Fut,
    Fut: Future<Output = anyhow::Result<Started>>,
{
    telemetry::init();
    let shutdown = Shutdown::new();
    shutdown.on_signals();
    let (ports, task) = start(shutdown).await?;
    let _ = writeln!(std::io::stdout(), "{name} {ports}");
    task.await?
}
