//! A cluster in this process for the benchmarks that measure what a client sees: a
//! coordinator, workers and a router on loopback ports, each started with the flags its binary
//! takes, stopped (drained, its engines dropped) before the next one starts.

use std::future::Future;
use std::time::{Duration, Instant};

use rrt_coordinator::RunningCoordinator;
use rrt_router::RunningRouter;
use rrt_service::Shutdown;
use rrt_worker::RunningWorker;
use tokio::runtime::Handle;

use super::router::parse;

/// How many routers, and the runtimes the coordinator and routers run on (`None`: the
/// caller's; a runtime of their own lets a benchmark read their threads' CPU time).
#[derive(Default)]
pub(super) struct Placement {
    pub routers: usize,
    /// More coordinator flags.
    pub coordinator_flags: Vec<String>,
    pub router_rt: Option<Handle>,
    pub coordinator_rt: Option<Handle>,
}

/// Runs `f` on `rt` (its tasks then spawn there), or here.
async fn on<F>(rt: Option<&Handle>, f: F) -> anyhow::Result<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    Ok(match rt {
        Some(rt) => rt.spawn(f).await?,
        None => f.await,
    })
}

pub(super) struct LocalCluster {
    shutdown: Shutdown,
    pub coordinator: RunningCoordinator,
    pub workers: Vec<RunningWorker>,
    pub router: RunningRouter,
    /// Router replicas beyond the first (the same flags, their own state).
    pub replicas: Vec<RunningRouter>,
}

impl LocalCluster {
    /// Starts `workers` workers with `worker_flags` (plus their ports, ids and the
    /// coordinator) and a router with the OpenAI API; returns once the router knows them all.
    pub async fn start(worker_flags: &[String], workers: usize) -> anyhow::Result<Self> {
        Self::start_with(
            |_| worker_flags.to_vec(),
            workers,
            &[],
            &Placement::default(),
        )
        .await
    }

    /// As [`Self::start`], worker `i` with `worker_flags(i)`, the routers with
    /// `router_flags` besides, placed as `placement` says.
    pub async fn start_with(
        worker_flags: impl Fn(usize) -> Vec<String>,
        workers: usize,
        router_flags: &[String],
        placement: &Placement,
    ) -> anyhow::Result<Self> {
        let shutdown = Shutdown::new();
        let local = [
            "--listen=127.0.0.1:0".to_string(),
            "--metrics-listen=127.0.0.1:0".into(),
        ];
        let mut cflags = local.to_vec();
        cflags.extend(placement.coordinator_flags.iter().cloned());
        let coordinator = on(
            placement.coordinator_rt.as_ref(),
            rrt_coordinator::start(parse(&cflags)?, shutdown.clone()),
        )
        .await??;
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
        let mut started_routers = Vec::new();
        for _ in 0..placement.routers.max(1) {
            let start = rrt_router::start(parse(&rflags)?, shutdown.clone());
            started_routers.push(on(placement.router_rt.as_ref(), start).await??);
        }
        let started = Instant::now();
        for router in &started_routers {
            while router.pool.len() < workers {
                anyhow::ensure!(
                    started.elapsed() < Duration::from_secs(60),
                    "the router found {} of {workers} workers",
                    router.pool.len()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let router = started_routers.remove(0);
        Ok(Self {
            shutdown,
            coordinator,
            workers: running,
            router,
            replicas: started_routers,
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
        for r in self.replicas {
            r.task.await??;
        }
        for w in self.workers {
            w.task.await??;
        }
        self.coordinator.task.await??;
        Ok(())
    }
}
