//! `rrt bench adaptive`: load-adaptive exits at overload, on simulated workers (learned exits
//! drawn from a model's measured threshold curve) behind the real coordinator and router. First
//! the cluster's capacity at the configured threshold is measured (closed loop, every slot
//! busy); then, each on a fresh cluster, requests arrive open-loop (Poisson) at `--overload`
//! times that capacity for `--seconds`: once with the threshold fixed, once with the
//! coordinator's quality floor. A share of the requests asks for quality FULL. Per run: time to
//! first token (all, adaptive, FULL), end-to-end latency, loops per token, the threshold in
//! force and the agreement with full depth its curve gives, and whether every FULL token ran
//! every loop.

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

#[derive(Args, Debug)]
pub struct AdaptiveBenchArgs {
    /// Simulated workers.
    #[arg(long, default_value_t = 8)]
    workers: usize,
    /// Sequences each worker runs at once.
    #[arg(long, default_value_t = 8)]
    max_sequences: usize,
    /// The model's threshold curves (an `exit-heads.json` with `curves`, and with several exits
    /// their `cascade`).
    #[arg(
        long,
        default_value = "deploy/models/smollm2-15x2-full/exit-heads.json"
    )]
    curve: PathBuf,
    /// The workers' configured learned-exit threshold.
    #[arg(long, default_value_t = 0.9)]
    threshold: f32,
    /// The coordinator's quality floor (agreement with full depth) in the adaptive run.
    #[arg(long, default_value_t = 0.9)]
    floor: f64,
    /// Arrival rate as a multiple of the measured capacity.
    #[arg(long, default_value_t = 2.0)]
    overload: f64,
    /// Seconds of overload.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Seconds of the closed-loop capacity measurement (long enough for several requests per
    /// slot to finish).
    #[arg(long, default_value_t = 8)]
    capacity_s: u64,
    /// Share of requests with quality FULL.
    #[arg(long, default_value_t = 0.2)]
    full_share: f64,
    /// New tokens per request.
    #[arg(long, default_value_t = 64)]
    max_tokens: u32,
    /// The model the workers simulate (its tokenizer and shape).
    #[arg(long, default_value = ".cache/models/smollm2-15x2-r0")]
    model: PathBuf,
    /// Cost model (`rrt bench sim` writes one; `default`: the built-in one).
    #[arg(long, default_value = ".cache/sim/cost.json")]
    cost: String,
    /// More coordinator flags for the adaptive run (e.g. `--adapt-queue=0.1`), comma-separated.
    #[arg(long, value_delimiter = ',')]
    coordinator_flags: Vec<String>,
    /// Requests each worker holds waiting beyond its running ones (more are refused with
    /// RESOURCE_EXHAUSTED): admission control, the bound on time to first token at overload.
    #[arg(long, default_value_t = 100_000)]
    max_waiting: usize,
    /// Bound on each run after the arrivals end (seconds).
    #[arg(long, default_value_t = 120)]
    drain_s: u64,
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    full: bool,
    ttft: f64,
    e2e: f64,
    tokens: usize,
    /// Decoded tokens (after the first) and their loops summed.
    decoded: usize,
    loops: usize,
    /// Decoded tokens of a FULL request that did not run every loop.
    short: usize,
}

#[derive(Debug, Clone)]
struct Figures {
    mode: &'static str,
    arrivals: usize,
    samples: Vec<Sample>,
    failed: usize,
    /// Of the failed, those refused at admission (RESOURCE_EXHAUSTED).
    refused: usize,
    wall: f64,
    /// Time-averaged over the overload: threshold in force and its agreement.
    mean_threshold: f64,
    min_threshold: f64,
    /// `None`: no adaptation ran (the configured threshold's agreement applies).
    mean_agreement: Option<f64>,
    /// Seconds from the end of the arrivals until the threshold was back (adaptive run).
    restored_after: Option<f64>,
}

fn quantile(mut v: Vec<f64>, q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * q).round() as usize]
}

fn gauge(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

async fn one(
    mut client: GenerationClient<tonic::transport::Channel>,
    i: usize,
    full: bool,
    max_tokens: u32,
    loops: u32,
) -> Result<Sample, String> {
    let req = pb::GenerateRequest {
        prompt: format!("Request {i}: explain in a few words why the sky is blue."),
        max_new_tokens: max_tokens,
        ignore_eos: true,
        quality: if full {
            pb::QualityTier::Full as i32
        } else {
            pb::QualityTier::Adaptive as i32
        },
        ..Default::default()
    };
    let start = Instant::now();
    let mut ttft = None;
    let mut s = Sample {
        full,
        ttft: 0.0,
        e2e: 0.0,
        tokens: 0,
        decoded: 0,
        loops: 0,
        short: 0,
    };
    let r = async {
        let mut stream = client.generate_stream(req).await?.into_inner();
        while let Some(m) = stream.message().await? {
            if let Some(t) = m.token() {
                ttft.get_or_insert_with(|| start.elapsed().as_secs_f64());
                if s.tokens > 0 {
                    s.decoded += 1;
                    s.loops += t.exit_loop as usize;
                    if full && t.exit_loop < loops {
                        s.short += 1;
                    }
                }
                s.tokens += 1;
            }
        }
        Ok::<(), tonic::Status>(())
    }
    .await;
    r.map_err(|e| format!("{:?}: {}", e.code(), e.message()))?;
    s.ttft = ttft.unwrap_or(f64::NAN);
    s.e2e = start.elapsed().as_secs_f64();
    Ok(s)
}

async fn cluster(args: &AdaptiveBenchArgs, floor: Option<f64>) -> anyhow::Result<LocalCluster> {
    let (model, cost, curve) = (
        args.model.display().to_string(),
        args.cost.clone(),
        args.curve.display().to_string(),
    );
    let (threshold, slots, waiting) = (args.threshold, args.max_sequences, args.max_waiting);
    let flags = move |i: usize| {
        vec![
            format!("--model={model}"),
            format!("--simulate={cost}"),
            "--exit=learned".into(),
            format!("--exit-threshold={threshold}"),
            format!("--exit-curve={curve}"),
            format!("--sim-seed={i}"),
            format!("--max-sequences={slots}"),
            format!("--max-waiting={waiting}"),
            "--report-ms=200".into(),
        ]
    };
    let mut coordinator_flags = vec!["--report-ms=200".to_string()];
    if let Some(f) = floor {
        coordinator_flags.push(format!("--exit-quality-floor={f}"));
        coordinator_flags.extend(args.coordinator_flags.iter().cloned());
    }
    let placement = Placement {
        routers: 1,
        coordinator_flags,
        ..Placement::default()
    };
    LocalCluster::start_with(flags, args.workers, &["--seed=1".into()], &placement).await
}

/// Requests per second the cluster completes with every slot busy, at the fixed threshold.
async fn capacity(args: &AdaptiveBenchArgs, loops: u32) -> anyhow::Result<f64> {
    let c = cluster(args, None).await?;
    let client = GenerationClient::connect(format!("http://{}", c.router.grpc_addr)).await?;
    let lanes = args.workers * args.max_sequences;
    let window = Duration::from_secs(args.capacity_s);
    let started = Instant::now();
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let first_error = Arc::new(std::sync::Mutex::new(None::<String>));
    let tasks: Vec<_> = (0..lanes)
        .map(|lane| {
            let (client, done, max) = (client.clone(), done.clone(), args.max_tokens);
            let first_error = first_error.clone();
            tokio::spawn(async move {
                let mut i = lane;
                while started.elapsed() < window {
                    match one(client.clone(), i, false, max, loops).await {
                        Ok(_) if started.elapsed() < window => {
                            done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        Ok(_) => {}
                        Err(e) => {
                            first_error
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .get_or_insert(e);
                        }
                    }
                    i += lanes;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await?;
    }
    c.stop().await?;
    let n = done.load(std::sync::atomic::Ordering::Relaxed);
    let first_error = first_error.lock().unwrap_or_else(|p| p.into_inner()).take();
    anyhow::ensure!(
        n > 0,
        "no request finished in the capacity window ({})",
        first_error.unwrap_or_else(|| "none failed: the cluster is too slow for the window".into())
    );
    Ok(n as f64 / window.as_secs_f64())
}

async fn overload_run(
    args: &AdaptiveBenchArgs,
    mode: &'static str,
    floor: Option<f64>,
    rate: f64,
    loops: u32,
) -> anyhow::Result<Figures> {
    let c = cluster(args, floor).await?;
    let client = GenerationClient::connect(format!("http://{}", c.router.grpc_addr)).await?;
    let metrics = rrt_service::metrics_http::handle();
    let results = Arc::new(Mutex::new(Vec::new()));
    let mut rng = StdRng::seed_from_u64(11);
    let started = Instant::now();
    let overload = Duration::from_secs(args.seconds);
    // The threshold in force, sampled while the run lasts.
    let trace = Arc::new(Mutex::new(Vec::<(f64, f64, f64)>::new()));
    let sampler = {
        let (trace, metrics) = (trace.clone(), metrics.clone());
        tokio::spawn(async move {
            loop {
                let text = metrics.render();
                if let (Some(t), Some(a)) = (
                    gauge(&text, "rrt_coordinator_exit_threshold"),
                    gauge(&text, "rrt_coordinator_exit_expected_agreement"),
                ) {
                    trace
                        .lock()
                        .await
                        .push((started.elapsed().as_secs_f64(), t, a));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let mut tasks = Vec::new();
    let mut at = 0.0f64;
    let mut i = 0;
    loop {
        // Poisson arrivals.
        at += -(1.0 - rng.random::<f64>()).ln() / rate;
        if at >= overload.as_secs_f64() {
            break;
        }
        let full = rng.random::<f64>() < args.full_share;
        let (client, results, max) = (client.clone(), results.clone(), args.max_tokens);
        let when = started + Duration::from_secs_f64(at);
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(when.into()).await;
            let r = one(client, i, full, max, loops).await;
            results.lock().await.push(r);
        }));
        i += 1;
    }
    let arrivals = tasks.len();
    let deadline = overload + Duration::from_secs(args.drain_s);
    for t in tasks {
        let left = deadline.saturating_sub(started.elapsed());
        if tokio::time::timeout(left, t).await.is_err() {
            break;
        }
    }
    let wall = started.elapsed().as_secs_f64();
    // The adaptive run: how long the threshold takes to come back once the load is gone.
    let mut restored_after = None;
    if floor.is_some() {
        let end = overload.as_secs_f64();
        let limit = Instant::now() + Duration::from_secs(30);
        while Instant::now() < limit {
            let t = gauge(&metrics.render(), "rrt_coordinator_exit_threshold");
            if t.is_some_and(|t| (t - args.threshold as f64).abs() < 1e-6) {
                restored_after = Some(started.elapsed().as_secs_f64() - end);
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    sampler.abort();
    c.stop().await?;
    let trace = trace.lock().await.clone();
    let during: Vec<&(f64, f64, f64)> = trace
        .iter()
        .filter(|(t, _, _)| *t <= overload.as_secs_f64())
        .collect();
    let n = during.len().max(1) as f64;
    let fixed = args.threshold as f64;
    let results = results.lock().await.clone();
    let samples: Vec<Sample> = results.iter().filter_map(|r| r.clone().ok()).collect();
    let refused = results
        .iter()
        .filter(|r| {
            r.as_ref()
                .is_err_and(|e| e.starts_with("ResourceExhausted"))
        })
        .count();
    Ok(Figures {
        mode,
        arrivals,
        refused,
        failed: arrivals - samples.len(),
        samples,
        wall,
        mean_threshold: if during.is_empty() {
            fixed
        } else {
            during.iter().map(|d| d.1).sum::<f64>() / n
        },
        min_threshold: during.iter().map(|d| d.1).fold(fixed, f64::min),
        mean_agreement: (!during.is_empty()).then(|| during.iter().map(|d| d.2).sum::<f64>() / n),
        restored_after,
    })
}

pub fn run(args: AdaptiveBenchArgs) -> anyhow::Result<()> {
    if args.cost != "default" && !std::path::Path::new(&args.cost).exists() {
        anyhow::bail!(
            "--cost {}: no such file (run `rrt bench sim` to fit one, or give --cost default)",
            args.cost
        );
    }
    let meta: rrt_model::recursive::exit_heads::ExitHeadsMeta = serde_json::from_str(
        &std::fs::read_to_string(&args.curve)
            .map_err(|e| anyhow::anyhow!("--curve {}: {e}", args.curve.display()))?,
    )
    .map_err(|e| anyhow::anyhow!("--curve {}: {e}", args.curve.display()))?;
    let curve = meta
        .curves
        .first()
        .ok_or_else(|| anyhow::anyhow!("--curve {}: no curves", args.curve.display()))?;
    let (shape, _) = rrt_worker::sim::shape_of(&args.model)
        .map_err(|e| anyhow::anyhow!("--model {}: {e}", args.model.display()))?;
    let loops = shape.loops as u32;
    anyhow::ensure!(
        meta.curves.iter().all(|c| (c.after_loop as u32) < loops),
        "--curve {}: it has exits after loops {:?}, but --model {} has {loops} loops",
        args.curve.display(),
        meta.curves.iter().map(|c| c.after_loop).collect::<Vec<_>>(),
        args.model.display()
    );
    let exits = rrt_worker::config::tradeoff_to_proto(&meta);
    // Every exit's agreement, as the coordinator reckons it.
    let fixed_agreement = exits.expected_agreement(args.threshold).unwrap_or(f64::NAN);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let cap = rt.block_on(capacity(&args, loops))?;
    let rate = cap * args.overload;
    println!(
        "rrt bench adaptive: {} simulated workers x {} slots ({} waiting at most), learned exits at {} ({} exit curve(s){} from {}: {}), cost model {}; capacity at the fixed threshold {:.1} requests/s ({} new tokens each); arrivals at {}x = {:.1}/s for {} s, {:.0}% asking for quality FULL",
        args.workers,
        args.max_sequences,
        args.max_waiting,
        args.threshold,
        exits.curves.len(),
        if exits.cascade.is_empty() {
            ""
        } else {
            " and their cascade"
        },
        args.curve.display(),
        curve.measured_on,
        args.cost,
        cap,
        args.max_tokens,
        args.overload,
        rate,
        args.seconds,
        100.0 * args.full_share
    );
    let fixed = rt.block_on(overload_run(&args, "fixed threshold", None, rate, loops))?;
    let adaptive = rt.block_on(overload_run(
        &args,
        "adaptive (floor)",
        Some(args.floor),
        rate,
        loops,
    ))?;
    println!(
        "| run | requests done / failed (refused) | p50 TTFT s | p99 TTFT s | p99 TTFT FULL s | p99 e2e s | tokens/s | loops per decoded token (adaptive tier) | threshold in force: mean / lowest | agreement with full depth (curve) | FULL tokens at full depth | back to {} after | vs fixed: p99 TTFT, p99 e2e |",
        args.threshold
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let p99 = |f: &Figures, sel: &dyn Fn(&Sample) -> bool, v: &dyn Fn(&Sample) -> f64| {
        quantile(f.samples.iter().filter(|s| sel(s)).map(v).collect(), 0.99)
    };
    for f in [&fixed, &adaptive] {
        let all = |_: &Sample| true;
        let (decoded, loops_sum) = f
            .samples
            .iter()
            .filter(|s| !s.full)
            .fold((0, 0), |(d, l), s| (d + s.decoded, l + s.loops));
        let full_decoded: usize = f.samples.iter().filter(|s| s.full).map(|s| s.decoded).sum();
        let full_short: usize = f.samples.iter().map(|s| s.short).sum();
        let tokens: usize = f.samples.iter().map(|s| s.tokens).sum();
        let vs = format!(
            "{:.2}x, {:.2}x",
            p99(f, &all, &|s| s.ttft) / p99(&fixed, &all, &|s| s.ttft),
            p99(f, &all, &|s| s.e2e) / p99(&fixed, &all, &|s| s.e2e)
        );
        println!(
            "| {} | {} / {} ({}) | {:.2} | {:.2} | {:.2} | {:.2} | {:.0} | {:.3} | {:.2} / {:.2} | {:.1}% | {:.1}% of {} | {} | {vs} |",
            f.mode,
            f.samples.len(),
            f.failed,
            f.refused,
            quantile(f.samples.iter().map(|s| s.ttft).collect(), 0.5),
            p99(f, &all, &|s| s.ttft),
            p99(f, &|s| s.full, &|s| s.ttft),
            p99(f, &all, &|s| s.e2e),
            tokens as f64 / f.wall,
            loops_sum as f64 / decoded.max(1) as f64,
            f.mean_threshold,
            f.min_threshold,
            100.0 * f.mean_agreement.unwrap_or(fixed_agreement),
            100.0 * (full_decoded - full_short) as f64 / full_decoded.max(1) as f64,
            full_decoded,
            f.restored_after
                .map_or("-".into(), |s| format!("{s:.1} s")),
        );
        eprintln!("{}: {} arrivals", f.mode, f.arrivals);
    }
    Ok(())
}
