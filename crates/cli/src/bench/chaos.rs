//! `rrt bench chaos` (`make chaos`): nothing lost when a worker dies. A coordinator and a
//! router run in this process, the workers as `rrt-worker` processes. One run without faults
//! records every request's output; then each faulted run sends the same requests (greedy and
//! seeded-sampled, mixed) at the same concurrency and `kill -9`s one worker at a random moment,
//! and a fresh worker replaces it afterwards. Prints one row per run: failed requests, outputs
//! that differ from the fault-free run, resumes and the generated tokens sent again.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rrt_proto::v1 as pb;
use rrt_proto::v1::generation_client::GenerationClient;
use rrt_service::Shutdown;
use tokio::sync::Semaphore;
use tonic::transport::Channel;

use super::router::parse;

#[derive(Args, Debug)]
pub struct ChaosArgs {
    /// Model the workers serve (default: the converted 15 x 2 model of `make models`).
    #[arg(long, default_value = ".cache/models/smollm2-15x2-r0")]
    model: PathBuf,
    /// Worker processes.
    #[arg(long, default_value_t = 3)]
    workers: usize,
    /// Streaming requests per run.
    #[arg(long, default_value_t = 200)]
    requests: usize,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Faulted runs (one kill each, each with its own seed).
    #[arg(long, default_value_t = 5)]
    runs: u64,
    /// Generated tokens per request are drawn from 16..=this.
    #[arg(long, default_value_t = 48)]
    max_new_tokens: u32,
    /// Seed of the first faulted run (the next ones count up).
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

pub fn run(args: ChaosArgs) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(chaos(args))
}

/// A worker process; killed when dropped.
pub(super) struct Worker {
    child: Child,
    grpc: String,
}

impl Worker {
    fn start(model: &std::path::Path, coordinator: &str) -> anyhow::Result<Self> {
        Self::start_with(model, coordinator, &[])
    }

    /// A worker serving `model`, registered with `coordinator`, with `extra` flags.
    pub(super) fn start_with(
        model: &std::path::Path,
        coordinator: &str,
        extra: &[String],
    ) -> anyhow::Result<Self> {
        let exe = std::env::current_exe()?;
        let bin = exe.with_file_name("rrt-worker");
        anyhow::ensure!(
            bin.exists(),
            "{}: missing (build it: `make build`)",
            bin.display()
        );
        let mut child = Command::new(&bin)
            .args(["--listen=127.0.0.1:0", "--metrics-listen=127.0.0.1:0"])
            .arg(format!("--model={}", model.display()))
            .arg(format!("--coordinator={coordinator}"))
            .args(["--report-ms=200", "--model-name=chaos"])
            .args(extra)
            .env("RUST_LOG", "error")
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().context("worker stdout")?).read_line(&mut line)?;
        let grpc = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("grpc="))
            .with_context(|| format!("the worker did not start: {line:?}"))?
            .to_string();
        Ok(Self { child, grpc })
    }
}

impl Worker {
    /// The process id (for its RSS).
    pub(super) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The gRPC address it printed (`grpc=ADDR`).
    pub(super) fn grpc(&self) -> &str {
        &self.grpc
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One request of the workload: greedy or seeded-sampled, by index.
fn request(i: usize, max_new_tokens: u32) -> pb::GenerateRequest {
    let mut draw = StdRng::seed_from_u64(i as u64);
    pb::GenerateRequest {
        prompt: format!(
            "Question {i}: what did the {} say to the sea?",
            ["king", "sailor", "child", "prophet"][i % 4]
        ),
        max_new_tokens: draw.random_range(16..=max_new_tokens.max(16)),
        sampling: (i % 2 == 1).then_some(pb::SamplingParameters {
            temperature: 0.8,
            top_p: 0.95,
            seed: Some(i as u64),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// What the client saw of one request: its tokens, or why it failed.
type Outcome = Result<Vec<u32>, String>;

async fn one(mut client: GenerationClient<Channel>, req: pb::GenerateRequest) -> Outcome {
    let mut stream = client
        .generate_stream(req)
        .await
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
        .into_inner();
    let mut ids = Vec::new();
    while let Some(m) = stream
        .message()
        .await
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
    {
        if let Some(t) = m.token() {
            if m.index as usize != ids.len() {
                return Err(format!("index {} after {} tokens", m.index, ids.len()));
            }
            ids.push(t.id);
        }
    }
    Ok(ids)
}

/// Runs the workload; `kill_at`: when to kill which worker. Returns outcomes and wall time.
async fn workload(
    client: &GenerationClient<Channel>,
    args: &ChaosArgs,
    kill_at: Option<(Duration, &mut Worker)>,
) -> (Vec<Outcome>, Duration) {
    let started = Instant::now();
    let gate = Arc::new(Semaphore::new(args.concurrency));
    let tasks: Vec<_> = (0..args.requests)
        .map(|i| {
            let (gate, client) = (gate.clone(), client.clone());
            let req = request(i, args.max_new_tokens);
            tokio::spawn(async move {
                let _permit = gate.acquire_owned().await;
                one(client, req).await
            })
        })
        .collect();
    if let Some((after, worker)) = kill_at {
        tokio::time::sleep(after).await;
        let _ = worker.child.kill();
        let _ = worker.child.wait();
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap_or_else(|e| Err(format!("task: {e}"))));
    }
    (out, started.elapsed())
}

async fn chaos(args: ChaosArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.model.join("config.json").exists(),
        "{}: no model (run `make models`)",
        args.model.display()
    );
    anyhow::ensure!(args.workers >= 2, "--workers must be at least 2 (one dies)");
    let shutdown = Shutdown::new();
    let local = [
        "--listen=127.0.0.1:0".to_string(),
        "--metrics-listen=127.0.0.1:0".into(),
    ];
    let mut cflags = local.to_vec();
    cflags.extend(["--report-ms=200".into(), "--evict-ms=1500".into()]);
    let coordinator = rrt_coordinator::start(parse(&cflags)?, shutdown.clone()).await?;
    let url = format!("http://{}", coordinator.grpc_addr);
    let mut workers = (0..args.workers)
        .map(|_| Worker::start(&args.model, &url))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut rflags = local.to_vec();
    rflags.extend([
        format!("--coordinator={url}"),
        format!("--max-concurrent={}", args.requests),
        "--keepalive-ms=500".into(),
    ]);
    rflags.push("--http-listen=off".into());
    let router = rrt_router::start(parse(&rflags)?, shutdown.clone()).await?;
    let wait_for = |n: usize| {
        let pool = router.pool.clone();
        async move {
            let started = Instant::now();
            while pool.slots().len() != n {
                anyhow::ensure!(
                    started.elapsed() < Duration::from_secs(60),
                    "the router does not see {n} workers"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Ok(())
        }
    };
    wait_for(args.workers).await?;
    let client = GenerationClient::connect(format!("http://{}", router.grpc_addr)).await?;
    println!(
        "chaos: {} streaming requests (greedy and seeded-sampled, 16-{} tokens) at concurrency {} on {} worker processes, model {}",
        args.requests, args.max_new_tokens, args.concurrency, args.workers, args.model.display()
    );
    let (reference, clean) = workload(&client, &args, None).await;
    let failed: Vec<&String> = reference.iter().filter_map(|o| o.as_ref().err()).collect();
    anyhow::ensure!(failed.is_empty(), "the fault-free run failed: {failed:?}");
    let tokens: usize = reference.iter().flatten().map(Vec::len).sum();
    println!(
        "fault-free run: {tokens} tokens in {:.1} s",
        clean.as_secs_f64()
    );
    let metric = |name: &'static str| {
        let addr = router.metrics_addr;
        async move { scrape(addr, name).await }
    };
    println!("| run | seed | requests | killed after | failed | differ from fault-free | resumes | tokens re-prefilled | wall s |");
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut totals = (0, 0, 0.0, 0.0);
    for run in 0..args.runs {
        let seed = args.seed + run;
        let mut draw = StdRng::seed_from_u64(seed);
        let victim = draw.random_range(0..workers.len());
        // Somewhere in the first 70% of a fault-free run's time.
        let after = clean.mul_f64(draw.random_range(0.05..0.7));
        let (resumes, resent) = (
            metric("rrt_router_resumes_total").await?,
            metric("rrt_router_resumed_tokens_total").await?,
        );
        let (outcomes, took) = workload(&client, &args, Some((after, &mut workers[victim]))).await;
        let failed = outcomes.iter().filter(|o| o.is_err()).count();
        let differ = outcomes
            .iter()
            .zip(&reference)
            .filter(|(o, r)| o.is_ok() && o != r)
            .count();
        let resumes = metric("rrt_router_resumes_total").await? - resumes;
        let resent = metric("rrt_router_resumed_tokens_total").await? - resent;
        println!(
            "| {} | {seed} | {} | {:.1} s | {failed} | {differ} | {resumes} | {resent} | {:.1} |",
            run + 1,
            args.requests,
            after.as_secs_f64(),
            took.as_secs_f64()
        );
        if let Some(e) = outcomes.iter().find_map(|o| o.as_ref().err()) {
            println!("  first failure: {e}");
        }
        totals = (
            totals.0 + failed,
            totals.1 + differ,
            totals.2 + resumes,
            totals.3 + resent,
        );
        // The killed worker is replaced; wait for the cluster to be whole again.
        workers[victim] = Worker::start(&args.model, &url)?;
        wait_for(args.workers).await?;
    }
    println!(
        "total: {} requests, {} kills, {} failed, {} differ, {} resumes, {} tokens re-prefilled",
        args.requests as u64 * args.runs,
        args.runs,
        totals.0,
        totals.1,
        totals.2,
        totals.3
    );
    shutdown.trigger();
    anyhow::ensure!(
        totals.0 == 0 && totals.1 == 0,
        "requests were lost or changed by the faults"
    );
    Ok(())
}

/// The sum of every series of `name` on the metrics endpoint `addr`.
pub(super) async fn scrape(addr: std::net::SocketAddr, name: &str) -> anyhow::Result<f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .await?;
    let mut body = String::new();
    s.read_to_string(&mut body).await?;
    Ok(body
        .lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}
