//! `rrt bench router`: the router's overhead. One in-process cluster (coordinator, one worker,
//! router) serves the same streaming workload twice per round, straight to the worker's
//! `Worker.Generate` and through the router's `Generation.GenerateStream`, alternating; prints
//! tokens/s of each and the ratio (target >= 0.95).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, Parser};
use rrt_proto::v1 as pb;
use rrt_proto::v1::generation_client::GenerationClient;
use rrt_proto::v1::worker_client::WorkerClient;
use rrt_service::Shutdown;
use tonic::transport::Channel;

#[derive(Args, Debug)]
pub struct RouterBenchArgs {
    /// Model the worker serves (default: the converted 15 x 2 model of `make models`).
    #[arg(long, default_value = ".cache/models/smollm2-15x2-r0")]
    model: PathBuf,
    /// Prompts are lines of this file.
    #[arg(long, default_value = ".cache/data/kjv-heldout.txt")]
    data: PathBuf,
    /// Requests per run.
    #[arg(long, default_value_t = 96)]
    requests: usize,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    #[arg(long, default_value_t = 32)]
    max_new_tokens: u32,
    /// Rounds of (direct, router); the best run of each is compared.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

#[derive(Parser)]
struct Flags<T: Args> {
    #[command(flatten)]
    args: T,
}

/// A service's flags parsed as its binary would.
pub(super) fn parse<T: Args>(flags: &[String]) -> anyhow::Result<T> {
    Ok(Flags::<T>::try_parse_from(
        std::iter::once("bench").chain(flags.iter().map(String::as_str)),
    )?
    .args)
}

pub fn run(args: RouterBenchArgs) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(bench(args))
}

#[derive(Clone, Copy)]
enum Path {
    Direct,
    Router,
}

async fn bench(args: RouterBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.model.exists(),
        "{}: no model (run `make models`)",
        args.model.display()
    );
    let text = std::fs::read_to_string(&args.data).with_context(|| {
        format!(
            "{}: cannot read prompts (run `make data`)",
            args.data.display()
        )
    })?;
    let prompts: Vec<String> = text
        .lines()
        .filter(|l| l.len() > 40)
        .take(args.requests)
        .map(String::from)
        .collect();
    anyhow::ensure!(!prompts.is_empty(), "no prompts in {}", args.data.display());

    let shutdown = Shutdown::new();
    let local = [
        "--listen=127.0.0.1:0".to_string(),
        "--metrics-listen=127.0.0.1:0".into(),
    ];
    let coordinator = rrt_coordinator::start(parse(&local)?, shutdown.clone()).await?;
    let url = format!("http://{}", coordinator.grpc_addr);
    let mut wflags = local.to_vec();
    wflags.extend([
        format!("--model={}", args.model.display()),
        format!("--coordinator={url}"),
        format!("--max-sequences={}", args.concurrency),
        "--worker-id=bench".into(),
    ]);
    let worker = rrt_worker::start(parse(&wflags)?, shutdown.clone()).await?;
    let mut rflags = local.to_vec();
    rflags.push(format!("--coordinator={url}"));
    rflags.push("--http-listen=off".into());
    let router = rrt_router::start(parse(&rflags)?, shutdown.clone()).await?;
    let started = Instant::now();
    while router.pool.slots().is_empty() {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(20),
            "the router found no worker"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let direct = WorkerClient::connect(format!("http://{}", worker.grpc_addr)).await?;
    let routed = GenerationClient::connect(format!("http://{}", router.grpc_addr)).await?;
    println!(
        "router overhead: {} streaming requests x {} tokens, {} in flight, model {}",
        prompts.len(),
        args.max_new_tokens,
        args.concurrency,
        args.model.display()
    );
    // Warm-up (first-touch allocations, connections).
    workload(
        &prompts[..prompts.len().min(8)],
        &args,
        Path::Direct,
        &direct,
        &routed,
    )
    .await?;
    let (mut best_direct, mut best_router) = (0.0f64, 0.0f64);
    for round in 0..args.rounds {
        let d = workload(&prompts, &args, Path::Direct, &direct, &routed).await?;
        let r = workload(&prompts, &args, Path::Router, &direct, &routed).await?;
        println!("  round {}: straight to the worker {d:.1} tokens/s, through the router {r:.1} tokens/s ({:.3})", round + 1, r / d);
        best_direct = best_direct.max(d);
        best_router = best_router.max(r);
    }
    println!("| path | tokens/s (best of {}) | ratio |", args.rounds);
    println!("|---|---|---|");
    println!("| straight to the worker | {best_direct:.1} | 1.000 |");
    println!(
        "| through the router | {best_router:.1} | {:.3} |",
        best_router / best_direct
    );
    shutdown.trigger();
    Ok(())
}

/// Runs every prompt with `concurrency` in flight; returns generated tokens per second.
async fn workload(
    prompts: &[String],
    args: &RouterBenchArgs,
    path: Path,
    direct: &WorkerClient<Channel>,
    routed: &GenerationClient<Channel>,
) -> anyhow::Result<f64> {
    let started = Instant::now();
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let prompts = std::sync::Arc::new(prompts.to_vec());
    let tasks: Vec<_> = (0..args.concurrency)
        .map(|_| {
            let (next, prompts) = (next.clone(), prompts.clone());
            let (mut direct, mut routed) = (direct.clone(), routed.clone());
            let max_new_tokens = args.max_new_tokens;
            tokio::spawn(async move {
                let mut tokens = 0usize;
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(prompt) = prompts.get(i) else { break };
                    let req = pb::GenerateRequest {
                        prompt: prompt.clone(),
                        max_new_tokens,
                        ..Default::default()
                    };
                    let mut stream = match path {
                        Path::Direct => direct.generate(req).await?.into_inner(),
                        Path::Router => routed.generate_stream(req).await?.into_inner(),
                    };
                    while let Some(m) = stream.message().await? {
                        tokens += m.token().is_some() as usize;
                    }
                }
                Ok::<usize, tonic::Status>(tokens)
            })
        })
        .collect();
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}
