//! `rrt bench scale` (`make scale-bench`): the routing policies on a cluster of simulated
//! workers (`rrt-worker --simulate`, the real worker around a simulated engine) behind the real
//! coordinator and router, in this process over loopback gRPC, each (size, policy) on a fresh
//! cluster (cold caches). The workload: multi-turn chat sessions (each turn resends the
//! conversation) under a few long system prompts, arriving in bursts; a share of the request
//! classes is hard (tokens one loop deeper); worker speeds differ (0.5x, 1x, 2x). Per policy:
//! time to first token (p50, p99), end-to-end latency (p99), goodput (requests a second that
//! met the time-to-first-token bound) and the prompt tokens served from the workers' prefix
//! caches (their own counts), with ratios to round-robin.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rrt_proto::v1 as pb;
use rrt_proto::v1::generation_client::GenerationClient;
use tokio::sync::Mutex;

use super::local_cluster::{LocalCluster, Placement};
use super::scale_plot;
use prost::Message;

#[derive(Args, Debug)]
pub struct ScaleBenchArgs {
    /// Cluster sizes (simulated workers).
    #[arg(long, value_delimiter = ',', default_value = "50,200")]
    workers: Vec<usize>,
    /// Router policies to compare (`--balance` values).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = super::POLICIES
    )]
    policies: Vec<String>,
    /// Chat sessions per run (each `--turns` requests).
    #[arg(long, default_value_t = 300)]
    sessions: usize,
    #[arg(long, default_value_t = 3)]
    turns: usize,
    /// A user's pause between a reply and the next turn (ms).
    #[arg(long, default_value_t = 0)]
    think_ms: u64,
    /// Distinct system prompts (sessions pick them unevenly: the first ones most).
    #[arg(long, default_value_t = 16)]
    system_prompts: usize,
    /// New tokens per turn.
    #[arg(long, default_value_t = 24)]
    max_tokens: u32,
    /// Sessions arrive in bursts of this many ...
    #[arg(long, default_value_t = 30)]
    burst: usize,
    /// ... every this many milliseconds.
    #[arg(long, default_value_t = 1000)]
    burst_every_ms: u64,
    /// Share of request classes whose tokens go one loop deeper.
    #[arg(long, default_value_t = 0.3)]
    hard_share: f64,
    /// Each simulated worker's KV blocks (16 positions each).
    #[arg(long, default_value_t = 512)]
    kv_blocks: usize,
    /// Time to first token a request must meet to count in goodput (ms).
    #[arg(long, default_value_t = 1000)]
    slo_ttft_ms: u64,
    /// The model the workers simulate (its tokenizer and shape).
    #[arg(long, default_value = ".cache/models/smollm2-15x2-r0")]
    model: PathBuf,
    /// Cost model (`rrt bench sim` writes one; `default`: the built-in one).
    #[arg(long, default_value = ".cache/sim/cost.json")]
    cost: String,
    /// Where the PNG of the runs goes (bars per cluster size: p99 TTFT, p99 latency, cached).
    #[arg(long, default_value = ".cache/bench/scale.png")]
    plot: PathBuf,
    /// TrueType font for the plot's text.
    #[arg(
        long,
        default_value = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
    )]
    font: PathBuf,
    /// More coordinator flags (e.g. `--report-ms=200`), comma-separated
    #[arg(long, value_delimiter = ',', allow_hyphen_values = true)]
    coordinator_flags: Vec<String>,
    /// More router flags (e.g. `--spill-s=0.2`), comma-separated.
    #[arg(long, value_delimiter = ',')]
    router_flags: Vec<String>,
    /// Bound on each run (seconds): requests not done by then count as failed.
    #[arg(long, default_value_t = 120)]
    timeout_s: u64,
    /// Policies also run behind two router replicas (each session's turns alternate between
    /// them; each router keeps its own index), comma-separated; empty: none.
    #[arg(long, value_delimiter = ',', default_value = "cache-aware,combined")]
    two_routers: Vec<String>,
    /// Real workers (the engine on `--model`, real prefix caches) instead of simulated ones:
    /// a few, on this machine's cores.
    #[arg(long)]
    real: bool,
    /// Each real worker's KV pool (MiB).
    #[arg(long, default_value_t = 256)]
    real_kv_mib: usize,
}

/// One request's outcome.
#[derive(Debug, Clone, Copy)]
struct Sample {
    ttft: f64,
    e2e: f64,
    prompt: u32,
    cached: u32,
    /// The turn of its session (0: the first).
    turn: usize,
}

/// One run's figures.
#[derive(Debug, Clone)]
struct Figures {
    workers: usize,
    policy: String,
    routers: usize,
    p50_ttft: f64,
    p99_ttft: f64,
    p99_e2e: f64,
    goodput: f64,
    hit_rate: f64,
    done: usize,
    failed: usize,
    wall: f64,
    /// The routers' threads' CPU per request done (ms), all replicas together.
    router_cpu_ms: f64,
    /// The coordinator's threads' CPU per report taken (µs), and reports a second.
    coordinator_cpu_us: f64,
    reports_per_s: f64,
    /// View bytes a second sent to the routers (deltas), and what whole views would have been.
    view_bytes_per_s: f64,
    whole_bytes_per_s: f64,
    /// Placement bytes a second passed between router replicas (none with one router).
    placement_bytes_per_s: f64,
    /// Prompt tokens cached by turn of the session (turn 0 can only hit its system prompt).
    hit_by_turn: Vec<f64>,
    /// KV blocks the workers' prefix caches evicted during the run.
    evictions: f64,
    /// The routers' decisions by reason (label, share), and their requests' prompt tokens
    /// found cached and predicted cached (shares of their prompt tokens).
    decisions: Vec<(String, f64, f64, f64)>,
}

/// The runtimes the router(s) and the coordinator run on, so their threads' CPU is theirs.
struct Runtimes {
    router: tokio::runtime::Runtime,
    coordinator: tokio::runtime::Runtime,
}

const ROUTER_THREADS: &str = "rrt-router";
const DECISIONS: &str = "rrt_router_decisions_total";
const EVICTIONS: &str = "rrt_worker_kv_evictions_total";
/// Prompt tokens of finished requests, cached and predicted cached, by policy and reason.
const TOKENS: [&str; 3] = [
    "rrt_router_prompt_tokens_total",
    "rrt_router_cached_prompt_tokens_total",
    "rrt_router_predicted_cached_prompt_tokens_total",
];
/// The decision reasons of generations (`rrt_router::balance::Reason` labels).
const REASONS: [&str; 8] = [
    "turn",
    "fewest",
    "load",
    "prefix_hit",
    "spill_load",
    "spill_kv",
    "no_prefix",
    "stale_view",
];
const COORDINATOR_THREADS: &str = "rrt-coord";

/// The sum of the counter `name` over its series in Prometheus text whose labels contain
/// `with` (`""`: all).
fn counter_sum(text: &str, name: &str, with: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|r| r.starts_with('{') || r.starts_with(' '))
                && l.contains(with)
        })
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

fn cpu(prefix: &str) -> f64 {
    super::cpu_time::threads_cpu_time(prefix).map_or(f64::NAN, |d| d.as_secs_f64())
}

fn quantile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * q).round() as usize]
}

fn system_prompt(i: usize) -> String {
    format!(
        "You are assistant number {i} of a support team. {}",
        format!("Rule {i}: answer briefly, cite the manual, never guess. ").repeat(12)
    )
}

/// Runs one session's turns on `client`; returns the samples (or the first failure).
async fn session(
    clients: Vec<GenerationClient<tonic::transport::Channel>>,
    system: String,
    id: usize,
    turns: usize,
    max_tokens: u32,
    think: Duration,
) -> Vec<Result<Sample, String>> {
    let mut messages = vec![pb::ChatMessage {
        role: "system".into(),
        content: system,
    }];
    let mut out = Vec::new();
    for t in 0..turns {
        if t > 0 {
            tokio::time::sleep(think).await;
        }
        messages.push(pb::ChatMessage {
            role: "user".into(),
            content: format!("Session {id}, question {t}: how do I reset the device?"),
        });
        // With router replicas each turn goes to the next one (the worst case for affinity
        // kept in each router's own index).
        let mut client = clients[(id + t) % clients.len()].clone();
        let req = pb::GenerateRequest {
            chat: true,
            messages: messages.clone(),
            max_new_tokens: max_tokens,
            ignore_eos: true,
            ..Default::default()
        };
        let start = Instant::now();
        let mut ttft = None;
        let mut text = String::new();
        let (mut prompt, mut cached) = (0, 0);
        let result = async {
            let mut stream = client.generate_stream(req).await?.into_inner();
            while let Some(m) = stream.message().await? {
                ttft.get_or_insert_with(|| start.elapsed().as_secs_f64());
                text.push_str(&m.text);
                if m.finish_reason != 0 {
                    (prompt, cached) = (m.prompt_tokens, m.cached_prompt_tokens);
                }
            }
            Ok::<(), tonic::Status>(())
        }
        .await;
        match result {
            Ok(()) => out.push(Ok(Sample {
                ttft: ttft.unwrap_or(f64::NAN),
                e2e: start.elapsed().as_secs_f64(),
                prompt,
                cached,
                turn: t,
            })),
            Err(s) => {
                out.push(Err(format!("{:?}: {}", s.code(), s.message())));
                return out;
            }
        }
        messages.push(pb::ChatMessage {
            role: "assistant".into(),
            content: text,
        });
    }
    out
}

async fn one_run(
    args: &ScaleBenchArgs,
    rts: &Runtimes,
    workers: usize,
    policy: &str,
    routers: usize,
) -> anyhow::Result<Figures> {
    let cost = args.cost.clone();
    let model = args.model.display().to_string();
    let (hard, blocks) = (args.hard_share, args.kv_blocks);
    let (real, kv_mib) = (args.real, args.real_kv_mib);
    let flags = move |i: usize| {
        if real {
            return vec![
                format!("--model={model}"),
                format!("--kv-budget-mib={kv_mib}"),
                "--max-sequences=8".into(),
                "--report-ms=200".into(),
            ];
        }
        let speed = ["1", "2", "0.5", "1"][i % 4];
        vec![
            format!("--model={model}"),
            format!("--simulate={cost}"),
            format!("--sim-speed={speed}"),
            format!("--sim-hard-share={hard}"),
            format!("--sim-kv-blocks={blocks}"),
            "--sim-exit-probs=0.5".into(),
            format!("--sim-seed={i}"),
            "--max-sequences=16".into(),
            "--report-ms=200".into(),
        ]
    };
    let mut router_flags = vec![format!("--balance={policy}"), "--seed=1".into()];
    router_flags.extend(args.router_flags.iter().cloned());
    let placement = Placement {
        routers,
        coordinator_flags: args.coordinator_flags.clone(),
        router_rt: Some(rts.router.handle().clone()),
        coordinator_rt: Some(rts.coordinator.handle().clone()),
    };
    let cluster = LocalCluster::start_with(flags, workers, &router_flags, &placement).await?;
    let mut clients = Vec::new();
    for r in std::iter::once(&cluster.router).chain(&cluster.replicas) {
        clients.push(GenerationClient::connect(format!("http://{}", r.grpc_addr)).await?);
    }
    let metrics = rrt_service::metrics_http::handle();
    let text = metrics.render();
    const VIEW_BYTES: &str = "rrt_coordinator_view_bytes_total";
    const PLACEMENTS: &str = "kind=\"placements\"";
    let reason = |r: &str| format!("policy=\"{}\",reason=\"{r}\"", policy.replace('-', "_"));
    let decisions0: Vec<f64> = REASONS
        .iter()
        .map(|r| counter_sum(&text, DECISIONS, &reason(r)))
        .collect();
    let tokens_of = |text: &str, r: &str| TOKENS.map(|name| counter_sum(text, name, &reason(r)));
    let tokens0: Vec<[f64; 3]> = REASONS.iter().map(|r| tokens_of(&text, r)).collect();
    let bytes0 = counter_sum(&text, VIEW_BYTES, "");
    let placement_bytes0 = counter_sum(&text, VIEW_BYTES, PLACEMENTS);
    let evictions0 = counter_sum(&text, EVICTIONS, "");
    let reports0 = cluster.coordinator.registry.reports_taken();
    let (router0, coordinator0) = (cpu(ROUTER_THREADS), cpu(COORDINATOR_THREADS));
    let results = Arc::new(Mutex::new(Vec::new()));
    let mut rng = StdRng::seed_from_u64(7);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for s in 0..args.sessions {
        // Uneven popularity: the first system prompts most often.
        let p = (rng.random::<f64>().powi(2) * args.system_prompts as f64) as usize;
        let at = Duration::from_millis((s / args.burst.max(1)) as u64 * args.burst_every_ms);
        let (clients, results) = (clients.clone(), results.clone());
        let (turns, max_tokens) = (args.turns, args.max_tokens);
        let think = Duration::from_millis(args.think_ms);
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until((started + at).into()).await;
            let out = session(clients, system_prompt(p), s, turns, max_tokens, think).await;
            results.lock().await.extend(out);
        }));
    }
    let deadline = Duration::from_secs(args.timeout_s);
    for t in tasks {
        let left = deadline.saturating_sub(started.elapsed());
        if tokio::time::timeout(left, t).await.is_err() {
            break;
        }
    }
    let wall = started.elapsed().as_secs_f64();
    let (router_cpu, coordinator_cpu) = (
        cpu(ROUTER_THREADS) - router0,
        cpu(COORDINATOR_THREADS) - coordinator0,
    );
    let reports = cluster.coordinator.registry.reports_taken() - reports0;
    let text = metrics.render();
    let placement_bytes = counter_sum(&text, VIEW_BYTES, PLACEMENTS) - placement_bytes0;
    let evictions = counter_sum(&text, EVICTIONS, "") - evictions0;
    let counts: Vec<f64> = REASONS
        .iter()
        .zip(&decisions0)
        .map(|(r, c0)| counter_sum(&text, DECISIONS, &reason(r)) - c0)
        .collect();
    let decided: f64 = counts.iter().sum::<f64>().max(1.0);
    let decisions = REASONS
        .iter()
        .zip(counts)
        .zip(&tokens0)
        .filter(|((_, c), _)| *c > 0.0)
        .map(|((r, c), t0)| {
            let t = tokens_of(&text, r);
            let prompt = (t[0] - t0[0]).max(1.0);
            let share = |k: usize| (t[k] - t0[k]) / prompt;
            (r.to_string(), c / decided, share(1), share(2))
        })
        .collect();
    let view_bytes = counter_sum(&text, VIEW_BYTES, "") - bytes0 - placement_bytes;
    let whole = cluster
        .coordinator
        .registry
        .view(Instant::now())
        .encoded_len() as f64;
    // Whole views go out every publish interval (the coordinator's default 500 ms) per router.
    let whole_bytes_per_s = whole * routers as f64 / 0.5;
    cluster.stop().await?;
    let results = results.lock().await.clone();
    let samples: Vec<Sample> = results
        .iter()
        .filter_map(|r| r.as_ref().ok().copied())
        .collect();
    let failed = args.sessions * args.turns - samples.len();
    let slo = args.slo_ttft_ms as f64 / 1e3;
    let mut ttft: Vec<f64> = samples.iter().map(|s| s.ttft).collect();
    let mut e2e: Vec<f64> = samples.iter().map(|s| s.e2e).collect();
    let (prompt, cached) = samples.iter().fold((0u64, 0u64), |(p, c), s| {
        (p + s.prompt as u64, c + s.cached as u64)
    });
    let hit_by_turn = (0..args.turns)
        .map(|t| {
            let (p, c) = samples
                .iter()
                .filter(|s| s.turn == t)
                .fold((0u64, 0u64), |(p, c), s| {
                    (p + s.prompt as u64, c + s.cached as u64)
                });
            c as f64 / p.max(1) as f64
        })
        .collect();
    Ok(Figures {
        workers,
        policy: policy.to_string(),
        routers,
        p50_ttft: quantile(&mut ttft, 0.5),
        p99_ttft: quantile(&mut ttft, 0.99),
        p99_e2e: quantile(&mut e2e, 0.99),
        goodput: samples.iter().filter(|s| s.ttft <= slo).count() as f64 / wall,
        hit_rate: cached as f64 / prompt.max(1) as f64,
        done: samples.len(),
        failed,
        wall,
        router_cpu_ms: 1e3 * router_cpu / samples.len().max(1) as f64,
        coordinator_cpu_us: 1e6 * coordinator_cpu / reports.max(1) as f64,
        reports_per_s: reports as f64 / wall,
        view_bytes_per_s: view_bytes / wall,
        placement_bytes_per_s: placement_bytes / wall,
        whole_bytes_per_s,
        hit_by_turn,
        evictions,
        decisions,
    })
}

pub fn run(args: ScaleBenchArgs) -> anyhow::Result<()> {
    if !args.real && args.cost != "default" && !std::path::Path::new(&args.cost).exists() {
        anyhow::bail!(
            "--cost {}: no such file (run `rrt bench sim` to fit one, or give --cost default)",
            args.cost
        );
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let rts = Runtimes {
        router: tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name(ROUTER_THREADS)
            .enable_all()
            .build()?,
        coordinator: tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name(COORDINATOR_THREADS)
            .enable_all()
            .build()?,
    };
    let workers_are = if args.real {
        format!(
            "real workers on {} ({} MiB of KV each, 8 sequences)",
            args.model.display(),
            args.real_kv_mib
        )
    } else {
        format!(
            "simulated workers: {:.0}% hard classes, speeds 0.5/1/2x, cost model {}",
            100.0 * args.hard_share,
            args.cost
        )
    };
    println!(
        "rrt bench scale: {} sessions x {} turns, {} system prompts, bursts of {} every {} ms, {} new tokens, {workers_are}",
        args.sessions,
        args.turns,
        args.system_prompts,
        args.burst,
        args.burst_every_ms,
        args.max_tokens,
    );
    let mut all = Vec::new();
    for &n in &args.workers {
        for policy in &args.policies {
            let f = rt.block_on(one_run(&args, &rts, n, policy, 1))?;
            eprintln!("{n} workers, {policy}: {f:?}");
            all.push(f);
        }
        for policy in &args.two_routers {
            let f = rt.block_on(one_run(&args, &rts, n, policy, 2))?;
            eprintln!("{n} workers, {policy}, two routers: {f:?}");
            all.push(f);
        }
    }
    println!("| workers | routers | policy | p50 TTFT s | p99 TTFT s | p99 e2e s | goodput req/s (TTFT <= {} ms) | prompt tokens cached | done / failed | wall s | vs round-robin: p99 TTFT, hit rate |", args.slo_ttft_ms);
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for f in &all {
        let rr = all
            .iter()
            .find(|g| g.workers == f.workers && g.policy == "round-robin" && g.routers == 1);
        let vs = rr.map_or(String::from("-"), |r| {
            format!(
                "{:.2}x, {:.2}x",
                f.p99_ttft / r.p99_ttft,
                f.hit_rate / r.hit_rate.max(1e-9)
            )
        });
        println!(
            "| {} | {} | {} | {:.3} | {:.3} | {:.3} | {:.1} | {:.1}% | {} / {} | {:.1} | {vs} |",
            f.workers,
            f.routers,
            f.policy,
            f.p50_ttft,
            f.p99_ttft,
            f.p99_e2e,
            f.goodput,
            100.0 * f.hit_rate,
            f.done,
            f.failed,
            f.wall,
        );
    }
    println!();
    println!("Cost of routing and coordination (CPU of the router and coordinator runtimes' threads; the simulated workers and clients share the machine):");
    println!("| workers | routers | policy | router CPU ms / request | requests/s one router core routes | coordinator CPU us / report | reports/s | reports/s one coordinator core takes | view bytes/s sent (deltas) | whole views would be | placements bytes/s | two routers: hit rate vs one |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for f in &all {
        let one = all
            .iter()
            .find(|g| g.workers == f.workers && g.policy == f.policy && g.routers == 1);
        let vs_one = match one {
            Some(o) if f.routers > 1 => format!("{:.2}x", f.hit_rate / o.hit_rate.max(1e-9)),
            _ => "-".into(),
        };
        println!(
            "| {} | {} | {} | {:.3} | {:.0} | {:.1} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {vs_one} |",
            f.workers,
            f.routers,
            f.policy,
            f.router_cpu_ms,
            1e3 / f.router_cpu_ms,
            f.coordinator_cpu_us,
            f.reports_per_s,
            1e6 / f.coordinator_cpu_us,
            f.view_bytes_per_s,
            f.whole_bytes_per_s,
            f.placement_bytes_per_s,
        );
    }
    println!();
    println!("Where the cache hits come from: prompt tokens cached by turn of the session (turn 1 can only hit its system prompt; later turns also their conversation so far), the KV blocks the workers' caches evicted, and the routers' decisions by reason (with the share of those requests' prompt tokens the workers found cached / the router predicted cached):");
    let turns: Vec<String> = (1..=args.turns).map(|t| format!("turn {t}")).collect();
    println!(
        "| workers | routers | policy | {} | blocks evicted | decisions |",
        turns.join(" | ")
    );
    println!("|---|---|---|{}---|---|", "---|".repeat(args.turns));
    for f in &all {
        let by_turn: Vec<String> = f
            .hit_by_turn
            .iter()
            .map(|h| format!("{:.1}%", 100.0 * h))
            .collect();
        let decisions: Vec<String> = f
            .decisions
            .iter()
            .map(|(r, share, hit, predicted)| {
                format!(
                    "{r} {:.0}% ({:.0}/{:.0}%)",
                    100.0 * share,
                    100.0 * hit,
                    100.0 * predicted
                )
            })
            .collect();
        println!(
            "| {} | {} | {} | {} | {:.0} | {} |",
            f.workers,
            f.routers,
            f.policy,
            by_turn.join(" | "),
            f.evictions,
            decisions.join(", ")
        );
    }
    let short = |p: &str| match p {
        "round-robin" => "RR".to_string(),
        "least-outstanding" => "LO".to_string(),
        "power-of-two" => "P2".to_string(),
        "depth-aware" => "depth".to_string(),
        "cache-aware" => "cache".to_string(),
        "combined" => "comb.".to_string(),
        other => other.to_string(),
    };
    let mut rows = Vec::new();
    for &n in &args.workers {
        let bars = all
            .iter()
            .filter(|f| f.workers == n)
            .map(|f| scale_plot::Bar {
                label: if f.routers > 1 {
                    format!("{} x{}", short(&f.policy), f.routers)
                } else {
                    short(&f.policy)
                },
                p99_ttft: f.p99_ttft,
                p99_e2e: f.p99_e2e,
                hit_rate: f.hit_rate,
            })
            .collect();
        rows.push(scale_plot::Row {
            title: format!(
                "{n} {} workers",
                if args.real { "real" } else { "simulated" }
            ),
            bars,
        });
    }
    let title = format!(
        "rrt bench scale: {} sessions x {} turns, {} system prompts, bursts of {} every {} ms (RR round-robin, LO least-outstanding, P2 power-of-two, comb. combined, x2 two routers)",
        args.sessions, args.turns, args.system_prompts, args.burst, args.burst_every_ms
    );
    let png = scale_plot::write_png(&title, &rows, &args.plot, &args.font)?;
    println!("\nplot: {}", png.display());
    Ok(())
}
