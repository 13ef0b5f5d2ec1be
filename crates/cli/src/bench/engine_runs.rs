//! One measured configuration of `rrt bench engine`: the workload, a timed generation run
//! through a fresh engine, and a teacher-forced scoring run (perplexity with the same scheduler,
//! exit policy and trace), plus the synthetic exit traces.

use std::sync::mpsc::Receiver;
use std::time::Instant;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rrt_engine::{
    Engine, EngineConfig, EngineStats, Event, ExitPolicy, ExitTrace, GenParams, KvFill, Received,
    Request, Scheduler,
};
use rrt_model::Llama;
use rrt_proto::exits::mean_exit_loop;

/// Request ids of the scoring windows start here (generation requests count from 0), so one
/// trace can hold the exits of both.
pub const SCORE_ID_BASE: u64 = 1 << 32;

/// The generation requests and the scoring windows.
pub struct Workload {
    pub prompts: Vec<Vec<u32>>,
    pub outputs: Vec<usize>,
    /// `(context, continuation)` of each scoring window.
    pub scoring: Vec<(Vec<u32>, Vec<u32>)>,
}

/// Which exit trace a replaying run follows.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TraceFrom {
    None,
    /// The trace the oracle-recording run of the same model wrote.
    Oracle,
    /// Every token exits after loop 1 with this probability, else runs every loop.
    Synthetic(f64),
}

/// One row of the benchmark.
#[derive(Debug, Clone)]
pub struct Spec {
    pub name: String,
    pub scheduler: Scheduler,
    pub exit: ExitPolicy,
    pub fill: KvFill,
    pub trace: TraceFrom,
}

/// What one spec measured (throughput is the best round's).
#[derive(Debug, Clone)]
pub struct Run {
    pub name: String,
    pub tokens_per_s: f64,
    pub rounds: Vec<f64>,
    pub outputs: Vec<Vec<u32>>,
    /// Exits of the generation and scoring runs (what the oracle recorder wrote).
    pub trace: ExitTrace,
    /// Perplexity of the scoring windows' continuations under this configuration.
    pub perplexity: f64,
    /// The exit head's greedy choice at every scored position (teacher-forced), per window.
    pub forced_argmaxes: Vec<Vec<u32>>,
    /// Counters and phase times of the best round.
    pub stats: EngineStats,
}

impl Run {
    /// Folds in another round of the same spec: keeps the best throughput and its profile.
    pub fn add_round(&mut self, other: Run) {
        self.rounds.extend(other.rounds);
        if other.tokens_per_s > self.tokens_per_s {
            self.tokens_per_s = other.tokens_per_s;
            self.stats = other.stats;
        }
    }
}

fn engine(
    model: &Llama,
    spec: &Spec,
    concurrency: usize,
    max_rows: usize,
    trace: Option<&ExitTrace>,
) -> anyhow::Result<Engine> {
    let mut engine = Engine::new(
        model.clone(),
        EngineConfig {
            scheduler: spec.scheduler,
            max_batch_rows: max_rows,
            max_sequences: concurrency,
            kv_budget_bytes: 16 << 30,
            default_exit: spec.exit,
            kv_fill: spec.fill,
            // Every request's prompt is its own: nothing to reuse, nothing to skew the rows.
            prefix_cache: false,
            ..EngineConfig::default()
        },
    )?;
    if let Some(t) = trace {
        engine.set_trace(t.clone());
    }
    Ok(engine)
}

/// Drains one request's events: what it received, or the failure.
fn drain(rx: &Receiver<Event>, name: &str) -> anyhow::Result<Received> {
    Received::drain(rx).map_err(|e| anyhow::anyhow!("{name}: a request failed: {e}"))
}

/// Submits `(id, prompt, params)` requests (exit policy: the engine's default).
fn submit_all(
    engine: &mut Engine,
    requests: impl Iterator<Item = (u64, Vec<u32>, GenParams)>,
) -> Vec<Receiver<Event>> {
    requests
        .map(|(id, prompt, params)| {
            let (req, rx) = Request::with_channel(id, prompt, params, None);
            engine.submit(req);
            rx
        })
        .collect()
}

/// Runs `spec` on the workload: timed generation, then (when `score`) the scoring windows.
pub fn run(
    model: &Llama,
    w: &Workload,
    spec: &Spec,
    trace: Option<&ExitTrace>,
    (concurrency, max_rows): (usize, usize),
    score: bool,
) -> anyhow::Result<Run> {
    let mut gen = engine(model, spec, concurrency, max_rows, trace)?;
    let started = Instant::now();
    let requests = w.prompts.iter().zip(&w.outputs).enumerate();
    let requests = requests.map(|(i, (p, &n))| {
        let params = GenParams {
            max_new_tokens: n,
            ..GenParams::default()
        };
        (i as u64, p.clone(), params)
    });
    let rxs = submit_all(&mut gen, requests);
    gen.run_until_idle();
    let secs = started.elapsed().as_secs_f64();
    let outputs = rxs
        .iter()
        .map(|rx| drain(rx, &spec.name).map(|r| r.tokens))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let generated: usize = outputs.iter().map(Vec::len).sum();
    let tokens_per_s = generated as f64 / secs;
    let mut trace_out = gen.trace().clone();
    let mut forced_argmaxes = Vec::new();
    let perplexity = if score {
        let mut scorer = engine(model, spec, concurrency, max_rows, trace)?;
        let windows = w.scoring.iter().enumerate().map(|(i, (context, text))| {
            let params = GenParams {
                max_new_tokens: text.len(),
                forced: text.clone(),
                logprobs: true,
                ..GenParams::default()
            };
            (SCORE_ID_BASE + i as u64, context.clone(), params)
        });
        let rxs = submit_all(&mut scorer, windows);
        scorer.run_until_idle();
        let (mut nll, mut n) = (0f64, 0usize);
        for rx in &rxs {
            let got = drain(rx, &spec.name)?;
            forced_argmaxes.push(got.argmaxes);
            let logprobs = got.logprobs;
            nll -= logprobs.iter().map(|&l| l as f64).sum::<f64>();
            n += logprobs.len();
        }
        for (&(id, index), &depth) in scorer.trace().iter() {
            trace_out.insert(id, index, depth);
        }
        (nll / n.max(1) as f64).exp()
    } else {
        f64::NAN
    };
    let stats = gen.stats().clone();
    let scored = if score {
        format!(", perplexity {perplexity:.1}")
    } else {
        String::new()
    };
    eprintln!(
        "  {}: {tokens_per_s:.1} tokens/s, {:.2} loops/token{scored} ({secs:.0}s)",
        spec.name,
        mean_loops(&stats)
    );
    Ok(Run {
        name: spec.name.clone(),
        tokens_per_s,
        rounds: vec![tokens_per_s],
        outputs,
        trace: trace_out,
        perplexity,
        forced_argmaxes,
        stats,
    })
}

/// A trace in which every generated token (of the requests and of the scoring windows) exits
/// after loop 1 with probability `p` and otherwise runs all `loops`.
pub fn synthetic_trace(w: &Workload, p: f64, loops: usize, seed: u64) -> ExitTrace {
    let mut rng = StdRng::seed_from_u64(seed ^ p.to_bits());
    let mut trace = ExitTrace::default();
    let lengths = w
        .outputs
        .iter()
        .enumerate()
        .map(|(i, &n)| (i as u64, n))
        .chain(
            w.scoring
                .iter()
                .enumerate()
                .map(|(i, (_, t))| (SCORE_ID_BASE + i as u64, t.len())),
        );
    for (id, n) in lengths {
        for index in 0..n {
            let depth = if rng.random_bool(p) { 1 } else { loops };
            trace.insert(id, index, depth);
        }
    }
    trace
}

/// Mean loops per generated token of a run (0 without tokens).
pub fn mean_loops(stats: &EngineStats) -> f64 {
    mean_exit_loop(&stats.exit_histogram).unwrap_or(0.0)
}

/// Fraction of generated tokens equal to the reference at the same index.
pub fn agreement(a: &[Vec<u32>], reference: &[Vec<u32>]) -> f64 {
    let (mut same, mut total) = (0usize, 0usize);
    for (x, y) in a.iter().zip(reference) {
        same += x.iter().zip(y).filter(|(p, q)| p == q).count();
        total += y.len();
    }
    same as f64 / total.max(1) as f64
}
