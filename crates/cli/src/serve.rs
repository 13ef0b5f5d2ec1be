//! `rrt serve`: the whole cluster in one process for one machine — a coordinator, N workers
//! sharing the model file, and the router on the public port — with one Prometheus endpoint
//! (the services share the process's recorder; worker series carry a `worker` label).

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser};
use rrt_service::{telemetry, Shutdown};

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Model: a Hugging Face directory (e.g. from `rrt convert`) or a GGUF file.
    #[arg(long, env = "RRT_MODEL", default_value = crate::model_args::DEFAULT_MODEL)]
    model: PathBuf,
    /// Model name clients ask for (default: the file or directory name).
    #[arg(long)]
    model_name: Option<String>,
    /// How the weights are held (f32, bf16, q8, f16; see `rrt-worker --help`).
    #[arg(long, env = "RRT_DTYPE", default_value_t = rrt_model::WeightDtype::F32)]
    dtype: rrt_model::WeightDtype,
    /// Workers (engines) to run, each on its own thread with its own KV cache.
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// The public Generation API.
    #[arg(long, env = "RRT_LISTEN", default_value = "127.0.0.1:50050")]
    listen: SocketAddr,
    /// The OpenAI-compatible HTTP API (`/v1/completions`, `/v1/chat/completions`); `off` for none.
    #[arg(long, env = "RRT_HTTP_LISTEN", default_value = "127.0.0.1:8080")]
    http_listen: String,
    /// Prometheus `/metrics` of every service.
    #[arg(long, env = "RRT_METRICS_LISTEN", default_value = "127.0.0.1:9100")]
    metrics_listen: SocketAddr,
    /// Each worker's KV pool, MiB (see `rrt-worker --help`).
    #[arg(long, env = "RRT_WORKER_KV_BUDGET_MIB", default_value_t = 2048)]
    kv_budget_mib: usize,
    /// How K and V are held: f32, bf16 (half the bytes a token) or int8 (0.27x f32's bytes).
    #[arg(long, env = "RRT_WORKER_KV_DTYPE", default_value_t = rrt_model::KvDtype::F32)]
    kv_dtype: rrt_model::KvDtype,
    /// Reuse the KV of earlier requests' common prefixes (shared system prompts, conversation
    /// history): on or off.
    #[arg(long, env = "RRT_WORKER_PREFIX_CACHE", value_enum, default_value_t = rrt_worker::config::OnOff::On)]
    prefix_cache: rrt_worker::config::OnOff,
    /// Extra worker flags, e.g. `--worker-flags=--exit=max-prob,--exit-threshold=0.9`.
    #[arg(long, value_delimiter = ',', allow_hyphen_values = true)]
    worker_flags: Vec<String>,
}

#[derive(Parser)]
struct Flags<T: Args> {
    #[command(flatten)]
    args: T,
}

fn parse<T: Args>(flags: Vec<String>) -> anyhow::Result<T> {
    Ok(Flags::<T>::try_parse_from(std::iter::once("rrt".to_string()).chain(flags))?.args)
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    telemetry::init();
    anyhow::ensure!(args.workers >= 1, "--workers must be at least 1");
    anyhow::ensure!(
        args.model.exists(),
        "{}: no such model (run `make model`, or pass --model PATH)",
        args.model.display()
    );
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(serve(args))
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let shutdown = Shutdown::new();
    shutdown.on_signals();
    let coordinator = rrt_coordinator::start(
        parse(vec![
            "--listen=127.0.0.1:0".into(),
            format!("--metrics-listen={}", args.metrics_listen),
        ])?,
        shutdown.clone(),
    )
    .await?;
    let url = format!("http://{}", coordinator.grpc_addr);
    let mut workers = Vec::new();
    for i in 0..args.workers {
        let mut flags = vec![
            "--listen=127.0.0.1:0".to_string(),
            "--metrics-listen=127.0.0.1:0".into(),
            format!("--model={}", args.model.display()),
            format!("--dtype={}", args.dtype),
            format!("--kv-budget-mib={}", args.kv_budget_mib),
            format!("--kv-dtype={}", args.kv_dtype),
            format!("--prefix-cache={}", args.prefix_cache),
            format!("--coordinator={url}"),
            format!("--worker-id=worker-{}", i + 1),
        ];
        if let Some(name) = &args.model_name {
            flags.push(format!("--model-name={name}"));
        }
        flags.extend(args.worker_flags.iter().cloned());
        workers.push(rrt_worker::start(parse(flags)?, shutdown.clone()).await?);
    }
    let router = rrt_router::start(
        parse(vec![
            format!("--listen={}", args.listen),
            format!("--http-listen={}", args.http_listen),
            "--metrics-listen=127.0.0.1:0".into(),
            format!("--coordinator={url}"),
        ])?,
        shutdown.clone(),
    )
    .await?;
    let http = router
        .http_addr
        .map_or_else(|| "off".to_string(), |a| format!("http://{a}/v1"));
    println!(
        "rrt serve: Generation API on {} ({} worker(s)), OpenAI API on {http}, metrics on http://{}/metrics; Ctrl-C stops",
        router.grpc_addr,
        workers.len(),
        coordinator.metrics_addr
    );
    router.task.await??;
    for w in workers {
        w.task.await??;
    }
    coordinator.task.await??;
    Ok(())
}
