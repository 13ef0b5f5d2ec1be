//! `rrt bench coordinator`: where one coordinator saturates. The real coordinator runs on a
//! runtime of its own with one thread (so its CPU is one core at most, and measured as its
//! threads'), `--workers` workers register, `--watchers` routers follow its view with deltas,
//! and clients on another runtime send reports as fast as `--concurrency` calls in flight
//! allow, each report changing its worker's load (so every view carries deltas). Per level:
//! reports a second taken, their latency, the coordinator's CPU per report and its share of
//! its one core, and the delta bytes the watchers received. The limit is the level where
//! reports a second stop growing while the coordinator's core is full; where its core is not
//! full the clients (on the same two cores) were the bound and the limit is above the figure.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use prost::Message;
use rrt_proto::v1 as pb;
use rrt_proto::v1::coordinator_client::CoordinatorClient;
use rrt_service::Shutdown;
use tonic::transport::Channel;

#[derive(Args, Debug)]
pub struct CoordinatorBenchArgs {
    /// Workers registered (each report names one of them in turn).
    #[arg(long, default_value_t = 1000)]
    workers: usize,
    /// Report calls in flight at once, one level per value.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,64")]
    concurrency: Vec<usize>,
    /// Seconds each level runs.
    #[arg(long, default_value_t = 4.0)]
    seconds: f64,
    /// Routers following the view (deltas), like router replicas.
    #[arg(long, default_value_t = 2)]
    watchers: usize,
    /// The coordinator's publish interval (its `--report-ms`).
    #[arg(long, default_value_t = 500)]
    report_ms: u64,
}

const COORDINATOR_THREADS: &str = "rrt-coord";

fn cpu() -> f64 {
    super::cpu_time::threads_cpu_time(COORDINATOR_THREADS).map_or(f64::NAN, |d| d.as_secs_f64())
}

fn report(worker: usize, n: u64) -> pb::WorkerReport {
    pb::WorkerReport {
        worker_id: format!("w{worker}"),
        queue_length: (n % 3) as u32,
        running: (n % 16) as u32,
        loop_steps_per_second: 800.0 + (n % 50) as f64,
        exit_histogram_delta: vec![n % 7, n % 5],
        mean_loops: 1.6,
        pending_new_tokens: n % 400,
        pending_prompt_tokens: n % 900,
        kv_blocks_used: n % 512,
        kv_blocks_cached: 100,
        kv_blocks_total: 512,
        prefix_cache_queried_tokens: n * 100,
        prefix_cache_hit_tokens: n * 60,
        ..Default::default()
    }
}

struct Level {
    concurrency: usize,
    reports_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    cpu_us_per_report: f64,
    core_share: f64,
    watcher_bytes_per_s: f64,
}

async fn level(
    clients: &[CoordinatorClient<Channel>],
    workers: usize,
    concurrency: usize,
    seconds: f64,
    watched: &Arc<AtomicU64>,
) -> anyhow::Result<Level> {
    let until = Instant::now() + Duration::from_secs_f64(seconds);
    let (cpu0, bytes0, started) = (cpu(), watched.load(Ordering::Relaxed), Instant::now());
    let mut tasks = Vec::new();
    for c in 0..concurrency {
        let mut client = clients[c % clients.len()].clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut n = c as u64;
            while Instant::now() < until {
                let t = Instant::now();
                let r = client
                    .report(report((n as usize) % workers, n))
                    .await?
                    .into_inner();
                anyhow::ensure!(
                    r.known,
                    "the coordinator forgot worker w{}",
                    n as usize % workers
                );
                latencies.push(t.elapsed().as_secs_f64());
                n += concurrency as u64;
            }
            Ok::<_, anyhow::Error>(latencies)
        }));
    }
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await??);
    }
    let wall = started.elapsed().as_secs_f64();
    let (cpu, bytes) = (cpu() - cpu0, watched.load(Ordering::Relaxed) - bytes0);
    latencies.sort_by(f64::total_cmp);
    let q = |p: f64| 1e3 * latencies[((latencies.len() - 1) as f64 * p).round() as usize];
    let n = latencies.len().max(1) as f64;
    Ok(Level {
        concurrency,
        reports_per_s: n / wall,
        p50_ms: q(0.5),
        p99_ms: q(0.99),
        cpu_us_per_report: 1e6 * cpu / n,
        core_share: cpu / wall,
        watcher_bytes_per_s: bytes as f64 / wall,
    })
}

pub fn run(args: CoordinatorBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.workers > 0, "--workers must be at least 1");
    anyhow::ensure!(
        args.concurrency.iter().all(|&c| c > 0),
        "--concurrency values must be at least 1"
    );
    let coordinator_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name(COORDINATOR_THREADS)
        .enable_all()
        .build()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("rrt-bench-clients")
        .enable_all()
        .build()?;
    let shutdown = Shutdown::new();
    let flags = [
        "--listen=127.0.0.1:0".to_string(),
        "--metrics-listen=127.0.0.1:0".into(),
        format!("--report-ms={}", args.report_ms),
        // Reports name each worker about every workers / rate seconds: keep them all alive.
        "--evict-ms=600000".into(),
    ];
    let cargs = super::router::parse(&flags)?;
    let coordinator = coordinator_rt.block_on(rrt_coordinator::start(cargs, shutdown.clone()))?;
    let url = format!("http://{}", coordinator.grpc_addr);
    println!(
        "rrt bench coordinator: {} workers registered, {} routers watching (deltas), views every {} ms; the coordinator on one thread, the clients on another; {} s a level",
        args.workers, args.watchers, args.report_ms, args.seconds
    );
    let levels = rt.block_on(async {
        let mut clients = Vec::new();
        for _ in 0..4 {
            clients.push(CoordinatorClient::connect(url.clone()).await?);
        }
        for w in 0..args.workers {
            clients[w % clients.len()]
                .clone()
                .register(pb::RegisterRequest {
                    worker_id: format!("w{w}"),
                    address: format!("127.0.0.1:{}", 10_000 + w),
                    model: "bench".into(),
                    loops: 2,
                    max_sequences: 16,
                    ..Default::default()
                })
                .await?;
        }
        let watched = Arc::new(AtomicU64::new(0));
        for i in 0..args.watchers {
            let mut client = clients[i % clients.len()].clone();
            let watched = watched.clone();
            let mut stream = client
                .watch_cluster(pb::WatchClusterRequest {
                    deltas: true,
                    router_id: format!("bench-router-{i}"),
                })
                .await?
                .into_inner();
            tokio::spawn(async move {
                while let Ok(Some(view)) = stream.message().await {
                    watched.fetch_add(view.encoded_len() as u64, Ordering::Relaxed);
                }
            });
        }
        let mut out = Vec::new();
        for &c in &args.concurrency {
            let l = level(&clients, args.workers, c, args.seconds, &watched).await?;
            eprintln!(
                "concurrency {c}: {:.0} reports/s, coordinator core {:.0}%",
                l.reports_per_s,
                100.0 * l.core_share
            );
            out.push(l);
        }
        Ok::<_, anyhow::Error>(out)
    })?;
    shutdown.trigger();
    println!("| reports in flight | reports/s taken | p50 ms | p99 ms | coordinator CPU us / report | its core busy | workers at a 500 ms report interval | view bytes/s to the watchers |");
    println!("|---|---|---|---|---|---|---|---|");
    for l in &levels {
        println!(
            "| {} | {:.0} | {:.2} | {:.2} | {:.1} | {:.0}% | {:.0} | {:.0} |",
            l.concurrency,
            l.reports_per_s,
            l.p50_ms,
            l.p99_ms,
            l.cpu_us_per_report,
            100.0 * l.core_share,
            l.reports_per_s * 0.5,
            l.watcher_bytes_per_s,
        );
    }
    if let Some(best) = levels
        .iter()
        .max_by(|a, b| a.reports_per_s.total_cmp(&b.reports_per_s))
    {
        println!(
            "\nMost taken: {:.0} reports/s ({} in flight) with the coordinator's one core {:.0}% busy{}",
            best.reports_per_s,
            best.concurrency,
            100.0 * best.core_share,
            if best.core_share < 0.9 {
                ": the clients, sharing the machine, were the bound; one core takes more"
            } else {
                ": its limit on one core"
            }
        );
    }
    Ok(())
}
