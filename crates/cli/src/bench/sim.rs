//! `rrt bench sim`: calibrates the simulated worker's cost model against the real engine and
//! checks the simulation against it, in one run. Two workloads of the same kind but different
//! seeds (chat-like requests: prompts of 16-384 tokens, a quarter sharing a 128-token prefix,
//! 8-96 new tokens, max-probability exits) run closed-loop on the real engine; every step's
//! shape (rows per loop, prompt rows, exit-head rows, attended KV) and wall time are recorded.
//! The cost model is fitted on workload A and judged on workload B (per-step and total-time
//! error); then the simulated engine, with that cost model and the exit distribution the real
//! engine showed, runs workload B and its modelled time, steps and tokens/s stand beside the
//! real ones. The fitted model is written as JSON for `rrt-worker --simulate <file>`.

use std::path::PathBuf;
use std::sync::mpsc::Receiver;
use std::time::Instant;

use clap::Args;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rrt_engine::{
    Engine, EngineConfig, EngineStats, Event, ExitKind, ExitPolicy, GenParams, Request, Scheduler,
};
use rrt_model::WeightDtype;
use rrt_worker::backend::Backend;
use rrt_worker::sim::{Clock, CostModel, SimConfig, SimEngine, StepShape};

#[derive(Args, Debug)]
pub struct SimBenchArgs {
    /// The recursive model the simulated workers stand for.
    #[arg(long, default_value = ".cache/models/smollm2-15x2-r0")]
    model: PathBuf,
    #[arg(long, default_value_t = WeightDtype::F32)]
    dtype: WeightDtype,
    /// Requests per workload.
    #[arg(long, default_value_t = 48)]
    requests: usize,
    /// Requests in flight (the engine's max sequences).
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Max-probability exit threshold of the requests.
    #[arg(long, default_value_t = 0.7)]
    threshold: f32,
    /// Where the fitted cost model goes.
    #[arg(long, default_value = ".cache/sim/cost.json")]
    out: PathBuf,
}

/// One request of a workload: prompt tokens and new tokens.
#[derive(Clone)]
struct Job {
    prompt: Vec<u32>,
    max_new: usize,
}

fn workload(seed: u64, n: usize, vocab: u32) -> Vec<Job> {
    let mut rng = StdRng::seed_from_u64(seed);
    let shared: Vec<u32> = (0..128).map(|_| rng.random_range(1000..vocab)).collect();
    (0..n)
        .map(|_| {
            let len = rng.random_range(16..=384);
            let mut prompt: Vec<u32> = if rng.random_bool(0.25) {
                shared.clone()
            } else {
                Vec::new()
            };
            while prompt.len() < len {
                prompt.push(rng.random_range(1000..vocab));
            }
            Job {
                prompt,
                max_new: rng.random_range(8..=96),
            }
        })
        .collect()
}

/// What a closed-loop run gave: per-step (shape, seconds), total seconds, tokens, the exit
/// histogram.
struct Run {
    steps: Vec<(StepShape, f64)>,
    seconds: f64,
    tokens: u64,
    exits: Vec<u64>,
}

fn shape_between(a: &EngineStats, b: &EngineStats) -> StepShape {
    StepShape {
        loop_rows: (b.loop_rows + b.fill_rows - a.loop_rows - a.fill_rows) as f64,
        prompt_rows: (b.prompt_rows - a.prompt_rows) as f64,
        head_rows: (b.head_rows - a.head_rows) as f64,
        kv_rows_k: (b.attended - a.attended) as f64 / 1e3,
    }
}

/// Runs `jobs` keeping `concurrency` in flight; `step` runs one step and returns its shape
/// and seconds.
fn closed_loop<B: Backend>(
    engine: &mut B,
    jobs: &[Job],
    concurrency: usize,
    exit: ExitPolicy,
    mut step: impl FnMut(&mut B) -> (StepShape, f64),
) -> anyhow::Result<Run> {
    let mut next = 0;
    let mut live: Vec<Receiver<Event>> = Vec::new();
    let mut run = Run {
        steps: Vec::new(),
        seconds: 0.0,
        tokens: 0,
        exits: Vec::new(),
    };
    loop {
        while live.len() < concurrency && next < jobs.len() {
            let (mut req, rx) = Request::with_channel(
                next as u64,
                jobs[next].prompt.clone(),
                GenParams {
                    max_new_tokens: jobs[next].max_new,
                    ..GenParams::default()
                },
                Some(exit),
            );
            req.params.sampling.temperature = 0.0;
            engine.submit(req);
            live.push(rx);
            next += 1;
        }
        if live.is_empty() {
            break;
        }
        let (shape, seconds) = step(engine);
        run.steps.push((shape, seconds));
        run.seconds += seconds;
        let mut ended = vec![false; live.len()];
        for (i, rx) in live.iter().enumerate() {
            for ev in rx.try_iter() {
                match ev {
                    Event::Token { exit_loop, .. } => {
                        run.tokens += 1;
                        if run.exits.len() < exit_loop {
                            run.exits.resize(exit_loop, 0);
                        }
                        run.exits[exit_loop - 1] += 1;
                    }
                    Event::Finished { .. } => ended[i] = true,
                    Event::Failed(e) => anyhow::bail!("a request failed: {e}"),
                    Event::Admitted { .. } => {}
                }
            }
        }
        let mut i = 0;
        live.retain(|_| {
            i += 1;
            !ended[i - 1]
        });
    }
    Ok(run)
}

pub fn run(args: SimBenchArgs) -> anyhow::Result<()> {
    let loaded = rrt_model::load(&args.model, args.dtype)
        .map_err(|e| anyhow::anyhow!("{}: {e}", args.model.display()))?;
    let model = loaded.model;
    let (loops, vocab) = (model.loops(), model.cfg.vocab_size as u32);
    let cfg = EngineConfig {
        scheduler: Scheduler::Cdb,
        max_sequences: args.concurrency,
        model_id: args.model.display().to_string(),
        ..EngineConfig::default()
    };
    let exit = ExitPolicy {
        kind: ExitKind::MaxProb,
        threshold: args.threshold,
    };
    let real = |seed: u64| -> anyhow::Result<Run> {
        let mut engine = Engine::new(model.clone(), cfg.clone())?;
        let jobs = workload(seed, args.requests, vocab);
        closed_loop(&mut engine, &jobs, args.concurrency, exit, |e| {
            let before = e.stats().clone();
            let t = Instant::now();
            Backend::step(e);
            let seconds = t.elapsed().as_secs_f64();
            (shape_between(&before, e.stats()), seconds)
        })
    };
    println!(
        "rrt bench sim: {} ({loops} loops, {}), {} requests per workload, {} in flight, max-prob exits at {}",
        args.model.display(),
        args.dtype,
        args.requests,
        args.concurrency,
        args.threshold
    );
    let a = real(1)?;
    let b = real(2)?;
    let (cost, fit) = CostModel::fit(&a.steps)
        .ok_or_else(|| anyhow::anyhow!("too few steps to fit ({})", a.steps.len()))?;
    let held_out = held_out_error(&cost, &b.steps);
    println!(
        "cost model (fitted on workload A, {} steps): base {:.2} ms, per loop-row {:.3} ms, per prompt row {:+.3} ms, per head row {:.3} ms, per 1k attended KV {:.4} ms",
        fit.samples,
        cost.base_s * 1e3,
        cost.loop_row_s * 1e3,
        cost.prompt_row_s * 1e3,
        cost.head_row_s * 1e3,
        cost.kv_k_s * 1e3
    );
    println!("| workload | steps | mean per-step error | total time: predicted / measured |");
    println!("|---|---|---|---|");
    println!(
        "| A (fit) | {} | {:.1}% | {:.2} / {:.2} s ({:.3}x) |",
        a.steps.len(),
        100.0 * fit.mean_abs_error,
        predicted(&cost, &a.steps),
        a.seconds,
        predicted(&cost, &a.steps) / a.seconds
    );
    println!(
        "| B (held out) | {} | {:.1}% | {:.2} / {:.2} s ({:.3}x) |",
        b.steps.len(),
        100.0 * held_out,
        predicted(&cost, &b.steps),
        b.seconds,
        predicted(&cost, &b.steps) / b.seconds
    );

    // The simulated engine on workload B, with the fitted costs and B's exit distribution.
    let total: u64 = b.exits.iter().sum();
    let exit_probs: Vec<f64> = b.exits[..b.exits.len().saturating_sub(1)]
        .iter()
        .map(|&n| n as f64 / total.max(1) as f64)
        .collect();
    let mut sim = SimEngine::new(SimConfig {
        cost,
        loops,
        block_tokens: cfg.kv_block_tokens,
        max_sequences: args.concurrency,
        prefill_chunk: cfg.max_batch_rows,
        exit_probs,
        clock: Clock::Virtual,
        vocab,
        ..SimConfig::default()
    });
    let jobs = workload(2, args.requests, vocab);
    let s = closed_loop(&mut sim, &jobs, args.concurrency, exit, |e| {
        let before = e.elapsed;
        Backend::step(e);
        (StepShape::default(), e.elapsed - before)
    })?;
    let mean = |h: &[u64]| {
        let n: u64 = h.iter().sum();
        h.iter()
            .enumerate()
            .map(|(i, &c)| (i + 1) as f64 * c as f64)
            .sum::<f64>()
            / n.max(1) as f64
    };
    println!("| workload B | steps | tokens | seconds | tokens/s | mean exit loop |");
    println!("|---|---|---|---|---|---|");
    for (name, r) in [("real engine", &b), ("simulated", &s)] {
        println!(
            "| {name} | {} | {} | {:.2} | {:.1} | {:.3} |",
            r.steps.len(),
            r.tokens,
            r.seconds,
            r.tokens as f64 / r.seconds,
            mean(&r.exits)
        );
    }
    println!(
        "simulated / real: time {:.3}x, steps {:.3}x",
        s.seconds / b.seconds,
        s.steps.len() as f64 / b.steps.len() as f64
    );
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&cost)?)?;
    println!(
        "cost model written to {} (rrt-worker --simulate {0})",
        args.out.display()
    );
    Ok(())
}

fn predicted(cost: &CostModel, steps: &[(StepShape, f64)]) -> f64 {
    steps.iter().map(|(s, _)| cost.seconds(s)).sum()
}

/// Mean |predicted - measured| / measured per step.
fn held_out_error(cost: &CostModel, steps: &[(StepShape, f64)]) -> f64 {
    steps
        .iter()
        .map(|(s, t)| (cost.seconds(s) - t).abs() / t.max(1e-9))
        .sum::<f64>()
        / steps.len().max(1) as f64
}
