//! `rrt bench router`: the router's overhead. One in-process cluster (coordinator, one worker,
//! router) serves the same greedy streaming workload three times per round, in turn: straight to
//! the worker's `Worker.Generate`, through the router's gRPC `Generation.GenerateStream`, and
//! through the router's OpenAI HTTP API (`POST /v1/completions` with `stream: true`, server-sent
//! events over pooled HTTP/1.1 connections, tokens counted from the final usage chunk); prints
//! tokens/s of each and the ratios (targets: router gRPC >= 0.95x straight, HTTP >= 0.95x gRPC).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::{Args, Parser};
use rrt_proto::v1 as pb;
use rrt_proto::v1::generation_client::GenerationClient;
use rrt_proto::v1::worker_client::WorkerClient;
use tonic::transport::Channel;

use super::local_cluster::LocalCluster;
use super::openai_client::{http_client, stream, HttpClient};

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
    /// Rounds of (direct, router gRPC, router HTTP); the best run of each is compared.
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
    Http,
}

/// The clients of the three paths.
#[derive(Clone)]
struct Clients {
    direct: WorkerClient<Channel>,
    routed: GenerationClient<Channel>,
    http: HttpClient,
    /// `http://ADDR/v1/completions` of the router.
    completions: String,
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

    let cluster = LocalCluster::start(
        &[
            format!("--model={}", args.model.display()),
            format!("--max-sequences={}", args.concurrency),
        ],
        1,
    )
    .await?;
    let worker = &cluster.workers[0];
    let clients = Clients {
        direct: WorkerClient::connect(format!("http://{}", worker.grpc_addr)).await?,
        routed: GenerationClient::connect(format!("http://{}", cluster.router.grpc_addr)).await?,
        http: http_client(),
        completions: format!("{}/completions", cluster.openai_base()?),
    };
    println!(
        "router overhead: {} streaming requests x {} tokens, {} in flight, model {}",
        prompts.len(),
        args.max_new_tokens,
        args.concurrency,
        args.model.display()
    );
    // Warm-up (first-touch allocations, connections), every path.
    let warm = &prompts[..prompts.len().min(8)];
    for path in [Path::Direct, Path::Router, Path::Http] {
        workload(warm, &args, path, &clients).await?;
    }
    let mut best = [0.0f64; 3];
    for round in 0..args.rounds {
        let d = workload(&prompts, &args, Path::Direct, &clients).await?;
        let r = workload(&prompts, &args, Path::Router, &clients).await?;
        let h = workload(&prompts, &args, Path::Http, &clients).await?;
        println!(
            "  round {}: straight to the worker {d:.1} tokens/s, router gRPC {r:.1} ({:.3}), router HTTP {h:.1} ({:.3} of gRPC)",
            round + 1,
            r / d,
            h / r
        );
        for (b, v) in best.iter_mut().zip([d, r, h]) {
            *b = b.max(v);
        }
    }
    let [d, r, h] = best;
    println!(
        "| path | tokens/s (best of {}) | vs straight | vs router gRPC |",
        args.rounds
    );
    println!("|---|---|---|---|");
    println!("| straight to the worker (gRPC) | {d:.1} | 1.000 | |");
    println!(
        "| through the router, gRPC | {r:.1} | {:.3} | 1.000 |",
        r / d
    );
    println!(
        "| through the router, OpenAI HTTP (SSE) | {h:.1} | {:.3} | {:.3} |",
        h / d,
        h / r
    );
    cluster.stop().await
}

/// Runs every prompt with `concurrency` in flight; returns generated tokens per second.
async fn workload(
    prompts: &[String],
    args: &RouterBenchArgs,
    path: Path,
    clients: &Clients,
) -> anyhow::Result<f64> {
    let started = Instant::now();
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let prompts = std::sync::Arc::new(prompts.to_vec());
    let tasks: Vec<_> = (0..args.concurrency)
        .map(|_| {
            let (next, prompts) = (next.clone(), prompts.clone());
            let mut clients = clients.clone();
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
                        Path::Direct => clients.direct.generate(req).await?.into_inner(),
                        Path::Router => clients.routed.generate_stream(req).await?.into_inner(),
                        Path::Http => {
                            tokens += sse_completion(&clients, prompt, max_new_tokens).await?;
                            continue;
                        }
                    };
                    while let Some(m) = stream.message().await? {
                        tokens += m.token().is_some() as usize;
                    }
                }
                anyhow::Ok(tokens)
            })
        })
        .collect();
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

/// One streamed `POST /v1/completions` (greedy, as the gRPC requests), read to the end;
/// returns the generated tokens the final usage chunk reports.
async fn sse_completion(clients: &Clients, prompt: &str, max_tokens: u32) -> anyhow::Result<usize> {
    let body = serde_json::json!({
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    let got = stream(&clients.http, &clients.completions, &body, true).await?;
    Ok(got.completion_tokens as usize)
}
