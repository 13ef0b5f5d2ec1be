//! `rrt bench engine`: the serving comparison of the paper's throughput table, measured (not
//! simulated) in one run on one workload: the vanilla model under static and sequence-wise
//! batching, and the recursive model under static, sequence-wise and depth-wise batching, the
//! latter with no exit, with an oracle trace replayed, and with confidence exits at several
//! thresholds. Prints tokens/s, mean loops per token, the ideal bound, the ratios and the
//! agreement of each run's greedy tokens with full-depth greedy decoding.

use std::path::PathBuf;
use std::sync::mpsc::{channel, Receiver};
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rrt_engine::{
    Engine, EngineConfig, Event, ExitKind, ExitPolicy, ExitTrace, GenParams, Request, Scheduler,
};
use rrt_model::recursive::convert::Converter;
use rrt_model::recursive::mapping::Init;
use rrt_model::{Llama, SamplingParams};

use crate::bench::plot::{write_png, Series, ThresholdPlot};
use crate::convert::decompose_with_progress;
use crate::eval_text::EvalText;
use crate::model_args::ModelArgs;

#[derive(Args, Debug)]
pub struct EngineBenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    text: EvalText,
    /// Requests in the workload.
    #[arg(long, default_value_t = 256)]
    prompts: usize,
    #[arg(long, default_value_t = 32)]
    min_prompt: usize,
    #[arg(long, default_value_t = 128)]
    max_prompt: usize,
    #[arg(long, default_value_t = 64)]
    min_output: usize,
    #[arg(long, default_value_t = 128)]
    max_output: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Loops of the recursive model (K = N / loops).
    #[arg(long, default_value_t = 2)]
    loops: usize,
    /// Init of the shared layers.
    #[arg(long, default_value = "stepwise")]
    init: Init,
    /// LoRA ranks to benchmark (0 = the pure recursive model).
    #[arg(long, value_delimiter = ',', default_value = "0,64")]
    lora_ranks: Vec<usize>,
    /// Max-probability exit thresholds.
    #[arg(long, value_delimiter = ',', default_value = "0.9,0.7,0.5")]
    thresholds: Vec<f32>,
    /// Sequences batched at once.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Rows one step may run (prefill chunks fill what decode rows leave).
    #[arg(long, default_value_t = 256)]
    max_batch_rows: usize,
    /// Where the PNG of throughput and agreement against threshold goes.
    #[arg(long, default_value = ".cache/bench/engine-thresholds.png")]
    plot: PathBuf,
    /// TrueType font for the plot's text.
    #[arg(
        long,
        default_value = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
    )]
    font: PathBuf,
}

struct Workload {
    prompts: Vec<Vec<u32>>,
    outputs: Vec<usize>,
}

struct Run {
    name: String,
    tokens_per_s: f64,
    mean_loops: f64,
    outputs: Vec<Vec<u32>>,
    trace: ExitTrace,
}

fn run(
    model: &Llama,
    w: &Workload,
    args: &EngineBenchArgs,
    scheduler: Scheduler,
    exit: ExitPolicy,
    trace: Option<&ExitTrace>,
    name: String,
) -> anyhow::Result<Run> {
    let mut engine = Engine::new(
        model.clone(),
        EngineConfig {
            scheduler,
            max_batch_rows: args.max_batch_rows,
            max_sequences: args.concurrency,
            kv_budget_bytes: 16 << 30,
            default_exit: exit,
            ..EngineConfig::default()
        },
    );
    if let Some(t) = trace {
        engine.set_trace(t.clone());
    }
    let started = Instant::now();
    let rxs: Vec<Receiver<Event>> = w
        .prompts
        .iter()
        .zip(&w.outputs)
        .enumerate()
        .map(|(i, (p, &n))| {
            let (tx, rx) = channel();
            engine.submit(Request {
                id: i as u64,
                prompt: p.clone(),
                params: GenParams {
                    max_new_tokens: n,
                    sampling: SamplingParams::default(),
                    stop_tokens: vec![],
                },
                exit: None,
                events: Box::new(tx),
            });
            rx
        })
        .collect();
    engine.run_until_idle();
    let secs = started.elapsed().as_secs_f64();
    let mut outputs = Vec::with_capacity(rxs.len());
    for rx in &rxs {
        let mut toks = Vec::new();
        for ev in rx.try_iter() {
            match ev {
                Event::Token { token, .. } => toks.push(token),
                Event::Failed(e) => anyhow::bail!("{name}: a request failed: {e}"),
                Event::Finished { .. } => {}
            }
        }
        outputs.push(toks);
    }
    let generated: usize = outputs.iter().map(Vec::len).sum();
    let r = Run {
        name,
        tokens_per_s: generated as f64 / secs,
        mean_loops: engine.stats().mean_loops(),
        outputs,
        trace: engine.trace().clone(),
    };
    eprintln!(
        "  {}: {:.1} tokens/s, {:.2} loops/token ({secs:.0}s)",
        r.name, r.tokens_per_s, r.mean_loops
    );
    Ok(r)
}

/// Fraction of generated tokens equal to the reference at the same index.
fn agreement(a: &[Vec<u32>], reference: &[Vec<u32>]) -> f64 {
    let (mut same, mut total) = (0usize, 0usize);
    for (x, y) in a.iter().zip(reference) {
        same += x.iter().zip(y).filter(|(p, q)| p == q).count();
        total += y.len();
    }
    same as f64 / total.max(1) as f64
}

pub fn run_bench(args: EngineBenchArgs) -> anyhow::Result<()> {
    // Fail before the runs, not after them.
    std::fs::metadata(&args.font).with_context(|| {
        format!(
            "plot font {} (install fonts-dejavu-core: `make deps`, or pass --font)",
            args.font.display()
        )
    })?;
    let loaded = args.model.load()?;
    let src = &loaded.model;
    let ids = args
        .text
        .token_ids(&loaded.tokenizer)
        .context("workload text")?;
    let mut rng = StdRng::seed_from_u64(args.seed);
    anyhow::ensure!(
        ids.len() > args.max_prompt + 1,
        "the workload text is shorter than one prompt"
    );
    let w = Workload {
        prompts: (0..args.prompts)
            .map(|_| {
                let len = rng.random_range(args.min_prompt..=args.max_prompt);
                let at = rng.random_range(0..ids.len() - len);
                ids[at..at + len].to_vec()
            })
            .collect(),
        outputs: (0..args.prompts)
            .map(|_| rng.random_range(args.min_output..=args.max_output))
            .collect(),
    };
    let loops = args.loops;
    println!(
        "engine benchmark: {} prompts ({}-{} tokens), outputs {}-{} tokens, seed {}, concurrency {}, {} threads",
        args.prompts, args.min_prompt, args.max_prompt, args.min_output, args.max_output, args.seed, args.concurrency,
        rayon::current_num_threads()
    );
    let none = ExitPolicy::NONE;
    let v_static = run(
        src,
        &w,
        &args,
        Scheduler::Static,
        none,
        None,
        "vanilla 30 layers, static".into(),
    )?;
    let v_csb = run(
        src,
        &w,
        &args,
        Scheduler::Csb,
        none,
        None,
        "vanilla 30 layers, CSB".into(),
    )?;
    let k = src.layers.len() / loops;
    let mut plot = ThresholdPlot {
        title: format!(
            "SmolLM2-135M as {k} x {loops} ({}): CDB with max-probability exits, {} prompts",
            args.init, args.prompts
        ),
        throughput: vec![],
        throughput_refs: vec![
            ("vanilla static".into(), v_static.tokens_per_s),
            ("vanilla CSB".into(), v_csb.tokens_per_s),
        ],
        agreement: vec![],
        agreement_refs: vec![],
    };
    let mut converter = Converter::new(src, k, args.init, args.seed)?;
    for &rank in &args.lora_ranks {
        if rank > 0 {
            decompose_with_progress(&mut converter)?;
        }
        let rec = converter.build(rank, rank, false, "bench")?;
        let label = format!("{k} x {loops}, {}, LoRA r{rank}", args.init);
        let mut runs = vec![
            run(
                &rec,
                &w,
                &args,
                Scheduler::Static,
                none,
                None,
                format!("{label}: static"),
            )?,
            run(
                &rec,
                &w,
                &args,
                Scheduler::Csb,
                none,
                None,
                format!("{label}: CSB"),
            )?,
        ];
        runs.push(run(
            &rec,
            &w,
            &args,
            Scheduler::Cdb,
            none,
            None,
            format!("{label}: CDB, no exit"),
        )?);
        let oracle = run(
            &rec,
            &w,
            &args,
            Scheduler::Cdb,
            ExitPolicy {
                kind: ExitKind::Oracle,
                threshold: 0.0,
            },
            None,
            format!("{label}: CDB, oracle recording (exit head every loop)"),
        )?;
        let full_depth = oracle.outputs.clone();
        let trace = oracle.trace.clone();
        runs.push(oracle);
        runs.push(run(
            &rec,
            &w,
            &args,
            Scheduler::Cdb,
            ExitPolicy {
                kind: ExitKind::Replay,
                threshold: 0.0,
            },
            Some(&trace),
            format!("{label}: CDB, oracle exits (replay)"),
        )?);
        let first_threshold = runs.len();
        for &t in &args.thresholds {
            runs.push(run(
                &rec,
                &w,
                &args,
                Scheduler::Cdb,
                ExitPolicy {
                    kind: ExitKind::MaxProb,
                    threshold: t,
                },
                None,
                format!("{label}: CDB, max-prob >= {t}"),
            )?);
        }
        let csb = runs[1].tokens_per_s;
        println!(
            "\n{label} (oracle mean exit loop {:.2}; ideal CDB gain over CSB = loops / E[loops])",
            trace.mean_depth()
        );
        println!("| run | tokens/s | depth per token | ideal bound | vs vanilla static | vs vanilla CSB | vs recursive CSB | of ideal | agreement with full depth |");
        println!("|---|---|---|---|---|---|---|---|---|");
        for r in [&v_static, &v_csb] {
            println!(
                "| {} | {:.1} | {} | | {:.2} | {:.2} | {:.2} | | |",
                r.name,
                r.tokens_per_s,
                src.loops() * src.layers.len(),
                r.tokens_per_s / v_static.tokens_per_s,
                r.tokens_per_s / v_csb.tokens_per_s,
                r.tokens_per_s / csb,
            );
        }
        for r in &runs {
            let ideal = loops as f64 / r.mean_loops.max(1e-9);
            let gain = r.tokens_per_s / csb;
            println!(
                "| {} | {:.1} | {:.2} loops | {:.2} | {:.2} | {:.2} | {:.2} | {:.0}% | {:.1}% |",
                r.name,
                r.tokens_per_s,
                r.mean_loops,
                ideal,
                r.tokens_per_s / v_static.tokens_per_s,
                r.tokens_per_s / v_csb.tokens_per_s,
                gain,
                100.0 * gain / ideal,
                100.0 * agreement(&r.outputs, &full_depth)
            );
        }
        let swept = &runs[first_threshold..];
        plot.throughput.push(Series {
            label: format!("r{rank}: CDB, max-prob"),
            points: args
                .thresholds
                .iter()
                .zip(swept)
                .map(|(&t, r)| (t as f64, r.tokens_per_s))
                .collect(),
        });
        plot.agreement.push(Series {
            label: format!("r{rank}: CDB, max-prob"),
            points: args
                .thresholds
                .iter()
                .zip(swept)
                .map(|(&t, r)| (t as f64, 100.0 * agreement(&r.outputs, &full_depth)))
                .collect(),
        });
        plot.throughput_refs.extend([
            (format!("r{rank}: CSB"), runs[1].tokens_per_s),
            (format!("r{rank}: CDB oracle replay"), runs[4].tokens_per_s),
        ]);
        plot.agreement_refs.push((
            format!("r{rank}: CDB oracle replay"),
            100.0 * agreement(&runs[4].outputs, &full_depth),
        ));
    }
    let png = write_png(&plot, &args.plot, &args.font)?;
    println!("\nplot: {}", png.display());
    Ok(())
}
