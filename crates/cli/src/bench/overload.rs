//! `rrt bench overload`: what a burst of ten times the capacity does. A coordinator and a
//! router run in this process, one worker as an `rrt-worker` process. Each burst fires all its
//! streaming requests at once, either at the router (capacity `--max-concurrent`) or straight
//! at the worker (capacity `--max-sequences` + `--max-waiting`), and measures how long each
//! refused request waited for its RESOURCE_EXHAUSTED, whether every admitted request completed,
//! and the resident memory of the worker process and of this process (router, coordinator and
//! the client) before, at the peak of and after each burst.

use std::time::{Duration, Instant};

use clap::Args;
use rrt_proto::v1 as pb;
use rrt_proto::v1::generation_client::GenerationClient;
use rrt_proto::v1::worker_client::WorkerClient;
use rrt_service::Shutdown;
use tokio::sync::watch;
use tonic::Code;

use super::chaos::Worker;
use super::router::parse;

#[derive(Args, Debug)]
pub struct OverloadArgs {
    /// Model the worker serves (default: the converted 15 x 2 model of `make models`).
    #[arg(long, default_value = ".cache/models/smollm2-15x2-r0")]
    model: std::path::PathBuf,
    /// Capacity of the router and of the worker (running + waiting requests).
    #[arg(long, default_value_t = 16)]
    capacity: usize,
    /// A burst is this many times the capacity.
    #[arg(long, default_value_t = 10)]
    factor: usize,
    /// Bursts per target (memory must not grow from one to the next).
    #[arg(long, default_value_t = 3)]
    bursts: usize,
    /// Tokens each request generates.
    #[arg(long, default_value_t = 32)]
    max_new_tokens: u32,
}

pub fn run(args: OverloadArgs) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(overload(args))
}

/// Resident set of process `pid` (or this one), in MiB.
fn rss_mib(pid: Option<u32>) -> f64 {
    let path = match pid {
        Some(p) => format!("/proc/{p}/status"),
        None => "/proc/self/status".into(),
    };
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// What happened to one request of a burst.
enum Outcome {
    Completed,
    /// RESOURCE_EXHAUSTED, after this long.
    Refused(Duration),
    Failed(String),
}

fn request(i: usize, max_new_tokens: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        prompt: format!("Burst request {i}: tell me about the sea."),
        max_new_tokens,
        ..Default::default()
    }
}

async fn drain<S>(mut stream: tonic::Streaming<S>) -> Result<(), tonic::Status> {
    while stream.message().await?.is_some() {}
    Ok(())
}

/// Fires `n` requests at once at the router or the worker; the outcomes.
async fn burst(target: &Target, n: usize, max_new_tokens: u32) -> Vec<Outcome> {
    let (go, ready) = watch::channel(false);
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let target = target.clone();
            let mut ready = ready.clone();
            let req = request(i, max_new_tokens);
            tokio::spawn(async move {
                let _ = ready.wait_for(|go| *go).await;
                let sent = Instant::now();
                let opened = match target {
                    Target::Router(mut c) => c
                        .generate_stream(req)
                        .await
                        .map(|r| tokio::spawn(drain(r.into_inner()))),
                    Target::Worker(mut c) => c
                        .generate(req)
                        .await
                        .map(|r| tokio::spawn(drain(r.into_inner()))),
                };
                match opened {
                    Err(s) if s.code() == Code::ResourceExhausted => {
                        Outcome::Refused(sent.elapsed())
                    }
                    Err(s) => Outcome::Failed(format!("{:?}: {}", s.code(), s.message())),
                    Ok(rest) => match rest.await {
                        Ok(Ok(())) => Outcome::Completed,
                        Ok(Err(s)) => Outcome::Failed(format!("{:?}: {}", s.code(), s.message())),
                        Err(e) => Outcome::Failed(e.to_string()),
                    },
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let _ = go.send(true);
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap_or_else(|e| Outcome::Failed(e.to_string())));
    }
    out
}

#[derive(Clone)]
enum Target {
    Router(GenerationClient<tonic::transport::Channel>),
    Worker(WorkerClient<tonic::transport::Channel>),
}

fn quantile(sorted: &[Duration], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i].as_secs_f64() * 1e3
}

async fn overload(args: OverloadArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.model.join("config.json").exists(),
        "{}: no model (run `make models`)",
        args.model.display()
    );
    anyhow::ensure!(args.capacity >= 2, "--capacity must be at least 2");
    let shutdown = Shutdown::new();
    let local = [
        "--listen=127.0.0.1:0".to_string(),
        "--metrics-listen=127.0.0.1:0".into(),
    ];
    let mut cflags = local.to_vec();
    cflags.push("--report-ms=200".into());
    let coordinator = rrt_coordinator::start(parse(&cflags)?, shutdown.clone()).await?;
    let url = format!("http://{}", coordinator.grpc_addr);
    let running = args.capacity / 2;
    let worker = Worker::start_with(
        &args.model,
        &url,
        &[
            format!("--max-sequences={running}"),
            format!("--max-waiting={}", args.capacity - running),
        ],
    )?;
    let mut rflags = local.to_vec();
    rflags.extend([
        format!("--coordinator={url}"),
        format!("--max-concurrent={}", args.capacity),
    ]);
    rflags.push("--http-listen=off".into());
    let router = rrt_router::start(parse(&rflags)?, shutdown.clone()).await?;
    let started = Instant::now();
    while router.pool.slots().is_empty() {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(60),
            "no worker joined"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let to_router = GenerationClient::connect(format!("http://{}", router.grpc_addr)).await?;
    let to_worker = WorkerClient::connect(format!("http://{}", worker.grpc())).await?;
    // Warm both paths (first requests allocate the KV cache and the kernels' buffers).
    for target in [
        Target::Router(to_router.clone()),
        Target::Worker(to_worker.clone()),
    ] {
        burst(&target, 1, args.max_new_tokens).await;
    }
    let n = args.capacity * args.factor;
    println!(
        "overload: bursts of {n} streaming requests ({}x capacity {}; {} tokens each) fired at once; worker {} running + {} waiting; model {}",
        args.factor,
        args.capacity,
        args.max_new_tokens,
        running,
        args.capacity - running,
        args.model.display()
    );
    println!("| target | burst | sent | completed | refused | failed | refusal ms p50 / p99 / max | worker RSS MiB before / peak / after | router process RSS MiB before / peak / after | burst s |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let mut worst_refusal = Duration::ZERO;
    let mut failures = 0;
    for (name, target) in [
        ("router", Target::Router(to_router)),
        ("worker", Target::Worker(to_worker)),
    ] {
        for b in 1..=args.bursts {
            let before = (rss_mib(Some(worker.pid())), rss_mib(None));
            let (stop, mut stopped) = watch::channel(false);
            let pid = worker.pid();
            let sampler = tokio::spawn(async move {
                let mut peak = (0f64, 0f64);
                loop {
                    peak.0 = peak.0.max(rss_mib(Some(pid)));
                    peak.1 = peak.1.max(rss_mib(None));
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                        _ = stopped.changed() => return peak,
                    }
                }
            });
            let t0 = Instant::now();
            let outcomes = burst(&target, n, args.max_new_tokens).await;
            let took = t0.elapsed();
            let _ = stop.send(true);
            let peak = sampler.await?;
            let after = (rss_mib(Some(worker.pid())), rss_mib(None));
            let mut refused: Vec<Duration> = outcomes
                .iter()
                .filter_map(|o| match o {
                    Outcome::Refused(d) => Some(*d),
                    _ => None,
                })
                .collect();
            refused.sort();
            let completed = outcomes
                .iter()
                .filter(|o| matches!(o, Outcome::Completed))
                .count();
            let failed: Vec<&String> = outcomes
                .iter()
                .filter_map(|o| match o {
                    Outcome::Failed(e) => Some(e),
                    _ => None,
                })
                .collect();
            failures += failed.len();
            worst_refusal = worst_refusal.max(refused.last().copied().unwrap_or_default());
            println!(
                "| {name} | {b} | {n} | {completed} | {} | {} | {:.1} / {:.1} / {:.1} | {:.0} / {:.0} / {:.0} | {:.0} / {:.0} / {:.0} | {:.1} |",
                refused.len(),
                failed.len(),
                quantile(&refused, 0.5),
                quantile(&refused, 0.99),
                quantile(&refused, 1.0),
                before.0,
                peak.0,
                after.0,
                before.1,
                peak.1,
                after.1,
                took.as_secs_f64()
            );
            if let Some(e) = failed.first() {
                println!("  first failure: {e}");
            }
        }
    }
    println!(
        "slowest refusal: {:.1} ms; failed requests: {failures}",
        worst_refusal.as_secs_f64() * 1e3
    );
    shutdown.trigger();
    drop(worker);
    anyhow::ensure!(failures == 0, "admitted requests failed");
    Ok(())
}
