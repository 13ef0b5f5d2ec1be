//! A cluster in this process for the benchmarks that measure what a client sees: a
//! coordinator, workers and a router on loopback ports, each started with the flags its binary
//! takes, stopped (drained, its engines dropped) before the next one starts.

use std::time::{Duration, Instant};

use rrt_coordinator::RunningCoordinator;
use rrt_router::RunningRouter;
use rrt_service::Shutdown;
use rrt_worker::RunningWorker;

use super::router::parse;

pub(super) struct LocalCluster {
    shutdown: Shutdown,
    coordinator: RunningCoordinator,
    pub workers: Vec<RunningWorker>,
    pub router: RunningRouter,
}

impl LocalCluster {
    /// Starts `workers` workers with `worker_flags` (plus their ports, ids and the
    /// coordinator) and a router with the OpenAI API; returns once the router knows them all.
    pub async fn start(worker_flags: &[String], workers: usize) -> anyhow::Result<Self> {
        Self::start_with(|_| worker_flags.to_vec(), workers, &[]).await
    }

    /// As [`Self::start`], worker `i` with `worker_flags(i)` and the router with
    /// `router_flags` besides.
    pub async fn start_with(
        worker_flags: impl Fn(usize) -> Vec<String>,
        workers: usize,
        router_flags: &[String],
    ) -> anyhow::Result<Self> {
        let shutdown = Shutdown::new();
        let local = [
            "--listen=127.0.0.1:0".to_string(),
            "--metrics-listen=127.0.0.1:0".into(),
        ];
        let coordinator = rrt_coordinator::start(parse(&local)?, shutdown.clone()).await?;
        let url = format!("http://{}", coordinator.grpc_addr);
        let mut running = Vec::new();
        for i in 0..workers {
            let mut flags = local.to_vec();
            flags.extend([
                format!("--coordinator={url}"),
                format!("--worker-id=bench-{}", i + 1),
            ]);
            flags.extend(worker_flags(i));
            running.push(rrt_worker::start(parse(&flags)?, shutdown.clone()).await?);
        }
        let mut rflags = local.to_vec();
        rflags.push(format!("--coordinator={url}"));
        rflags.push("--http-listen=127.0.0.1:0".into());
        rflags.extend(router_flags.iter().cloned());
        let router = rrt_router::start(parse(&rflags)?, shutdown.clone()).await?;
        let started = Instant::now();
        while router.pool.len() < workers {
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(60),
                "the router found {} of {workers} workers",
                router.pool.len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Self {
            shutdown,
            coordinator,
            workers: running,
            router,
        })
    }

    /// The router's OpenAI API base, `http://ADDR/v1`.
    pub fn openai_base(&self) -> anyhow::Result<String> {
        let addr = self
            .router
            .http_addr
            .ok_or_else(|| anyhow::anyhow!("the router serves no HTTP"))?;
        Ok(format!("http://{addr}/v1"))
    }

    /// Drains every service and waits for it to end (so its engines and KV pools are freed).
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.trigger();
        self.router.task.await??;
        for w in self.workers {
            w.task.await??;
        }
        self.coordinator.task.await??;
        Ok(())
    }
}
