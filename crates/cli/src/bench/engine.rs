//! `rrt bench engine`: the serving comparison of the paper's throughput table, measured (not
//! simulated) in one run on one workload: the vanilla model under static and sequence-wise
//! batching, and the recursive model under static, sequence-wise and depth-wise batching, the
//! latter with no exit, with an oracle trace replayed (both K/V fill modes), with synthetic
//! traces (a given share of tokens exits after loop 1: what the engine makes of a known exit
//! distribution), and with confidence exits at several thresholds. Prints tokens/s, mean loops
//! per token, the ideal bound (loops / E[loops] over generated tokens) and a compute bound
//! (matmul MACs per token of CSB over this run's: prompt rows that cannot exit, exit heads and
//! K/V fill rows counted), the ratios, quality (agreement of greedy tokens with full depth;
//! perplexity of held-out text scored through the same engine configuration) and where the
//! time goes (the engine's phase times). `--repeats` runs every row that many times in
//! interleaved rounds and keeps the best, against the VM's drift.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rrt_engine::{ExitKind, ExitPolicy, ExitTrace, KvFill, Scheduler};
use rrt_model::recursive::convert::Converter;
use rrt_model::recursive::mapping::Init;
use rrt_model::{Fused, Llama, WeightDtype};

use crate::bench::engine_dtypes::{run_table, DtypeTable};
use crate::bench::engine_runs::{
    agreement, mean_loops, run, synthetic_trace, Run, Spec, TraceFrom, Workload,
};
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
    /// LoRA ranks to benchmark (0 = the pure recursive model), converted from --model.
    #[arg(long, value_delimiter = ',', default_value = "0,64")]
    lora_ranks: Vec<usize>,
    /// Recursive model directories to benchmark instead (e.g. uptrained ones); --model is their
    /// vanilla reference.
    #[arg(long, value_delimiter = ',')]
    recursive: Vec<PathBuf>,
    /// Max-probability exit thresholds.
    #[arg(long, value_delimiter = ',', default_value = "0.9,0.7,0.5")]
    thresholds: Vec<f32>,
    /// Learned-exit thresholds (models with exit heads).
    #[arg(long, value_delimiter = ',', default_value = "0.5,0.7,0.9,0.95")]
    learned: Vec<f32>,
    /// Synthetic traces: shares of tokens that exit after loop 1 (`--synthetic` alone: none).
    #[arg(long, value_delimiter = ',', num_args = 0.., default_value = "0.5,0.9")]
    synthetic: Vec<f64>,
    /// Rounds: every row runs this many times, interleaved; the best is kept.
    #[arg(long, default_value_t = 1)]
    repeats: usize,
    /// Held-out windows scored (teacher-forced) for each row's perplexity.
    #[arg(long, default_value_t = 32)]
    score_windows: usize,
    /// Context tokens of each scoring window (prefilled, not scored).
    #[arg(long, default_value_t = 32)]
    score_context: usize,
    /// Scored tokens of each window (generated positions, so exits apply).
    #[arg(long, default_value_t = 96)]
    score_tokens: usize,
    /// Sequences batched at once.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Rows one step may run (prefill chunks fill what decode rows leave).
    #[arg(long, default_value_t = 256)]
    max_batch_rows: usize,
    /// Weight dtypes to compare side by side instead of the full table: the main rows (vanilla
    /// static and CSB; the first recursive model's CSB, CDB without exits and CDB with each
    /// --synthetic share) at each dtype, repacked from the f32 weights, in interleaved rounds.
    #[arg(long, value_delimiter = ',')]
    dtypes: Vec<WeightDtype>,
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

fn replay(kind: ExitKind) -> ExitPolicy {
    ExitPolicy {
        kind,
        threshold: 0.0,
    }
}

/// The rows of one recursive model, in the order they run (the oracle recording before the
/// replays of its trace), and the indices of the max-probability and the learned-exit rows.
fn recursive_specs(
    label: &str,
    args: &EngineBenchArgs,
    learned: bool,
) -> (Vec<Spec>, usize, usize) {
    let spec = |name: &str, scheduler, exit, fill, trace| Spec {
        name: format!("{label}: {name}"),
        scheduler,
        exit,
        fill,
        trace,
    };
    let (none, prop) = (ExitPolicy::NONE, KvFill::Propagate);
    let mut specs = vec![
        spec("static", Scheduler::Static, none, prop, TraceFrom::None),
        spec("CSB", Scheduler::Csb, none, prop, TraceFrom::None),
        spec("CDB, no exit", Scheduler::Cdb, none, prop, TraceFrom::None),
        spec(
            "CDB, oracle recording (exit head every loop)",
            Scheduler::Cdb,
            replay(ExitKind::Oracle),
            prop,
            TraceFrom::None,
        ),
        spec(
            "CDB, oracle exits (replay)",
            Scheduler::Cdb,
            replay(ExitKind::Replay),
            prop,
            TraceFrom::Oracle,
        ),
        spec(
            "CDB, oracle exits (replay), KV copy",
            Scheduler::Cdb,
            replay(ExitKind::Replay),
            KvFill::Copy,
            TraceFrom::Oracle,
        ),
    ];
    for &p in &args.synthetic {
        specs.push(spec(
            &format!("CDB, synthetic: {:.0}% exit after loop 1", 100.0 * p),
            Scheduler::Cdb,
            replay(ExitKind::Replay),
            prop,
            TraceFrom::Synthetic(p),
        ));
    }
    let first_threshold = specs.len();
    for &t in &args.thresholds {
        specs.push(spec(
            &format!("CDB, max-prob >= {t}"),
            Scheduler::Cdb,
            ExitPolicy {
                kind: ExitKind::MaxProb,
                threshold: t,
            },
            prop,
            TraceFrom::None,
        ));
    }
    let first_learned = specs.len();
    if learned {
        for &t in &args.learned {
            specs.push(spec(
                &format!("CDB, learned exit >= {t}"),
                Scheduler::Cdb,
                ExitPolicy {
                    kind: ExitKind::Learned,
                    threshold: t,
                },
                prop,
                TraceFrom::None,
            ));
        }
    }
    (specs, first_threshold, first_learned)
}

/// Runs `specs` on `model` in `args.repeats` interleaved rounds (best throughput kept; outputs,
/// traces and perplexity from the first round), together with `extra` rows on other models
/// (the vanilla references, measured again beside each model so drift hits every row of a
/// table alike; scored only when `score_extra`).
fn rounds(
    model: &Llama,
    specs: &[Spec],
    extra: &mut [(&Llama, Spec, Option<Run>)],
    score_extra: bool,
    w: &Workload,
    args: &EngineBenchArgs,
) -> anyhow::Result<Vec<Run>> {
    let limits = (args.concurrency, args.max_batch_rows);
    let mut runs: Vec<Option<Run>> = vec![None; specs.len()];
    let oracle_at = specs.iter().position(|s| s.exit.kind == ExitKind::Oracle);
    for round in 0..args.repeats.max(1) {
        eprintln!("round {}/{}", round + 1, args.repeats.max(1));
        for (m, spec, slot) in extra.iter_mut() {
            let r = run(m, w, spec, None, limits, score_extra && slot.is_none())?;
            match slot {
                Some(best) => best.add_round(r),
                None => *slot = Some(r),
            }
        }
        for (i, spec) in specs.iter().enumerate() {
            let trace: Option<ExitTrace> = match spec.trace {
                TraceFrom::None => None,
                TraceFrom::Oracle => {
                    let at = oracle_at.context("a replay row needs the oracle row before it")?;
                    Some(
                        runs[at]
                            .as_ref()
                            .context("oracle not run yet")?
                            .trace
                            .clone(),
                    )
                }
                TraceFrom::Synthetic(p) => Some(synthetic_trace(w, p, model.loops(), args.seed)),
            };
            let r = run(model, w, spec, trace.as_ref(), limits, round == 0)?;
            match &mut runs[i] {
                Some(best) => best.add_round(r),
                slot => *slot = Some(r),
            }
        }
    }
    Ok(runs
        .into_iter()
        .map(|r| r.expect("every row ran"))
        .collect())
}

/// The recursive models to measure: converted from `src` at each LoRA rank, or the given
/// directories. `(short label, label, model)` each.
fn candidates(
    args: &EngineBenchArgs,
    src: &Llama,
    k: usize,
) -> anyhow::Result<Vec<(String, String, Llama)>> {
    if !args.recursive.is_empty() {
        return args
            .recursive
            .iter()
            .map(|dir| {
                let m = rrt_model::load(dir, args.model.dtype)
                    .with_context(|| format!("loading --recursive {}", dir.display()))?
                    .model;
                anyhow::ensure!(
                    m.recursion.is_some(),
                    "{}: not a recursive model",
                    dir.display()
                );
                let short = dir
                    .file_name()
                    .map_or_else(|| "model".into(), |n| n.to_string_lossy().into_owned());
                let heads = if m.exit_heads.is_some() {
                    ", exit heads"
                } else {
                    ""
                };
                let label = format!("{short} ({} x {}{heads})", m.block_layers(), m.loops());
                Ok((short, label, m))
            })
            .collect();
    }
    let mut converter = Converter::new(src, k, args.init, args.seed)?;
    let mut out = Vec::new();
    for &rank in &args.lora_ranks {
        if rank > 0 {
            decompose_with_progress(&mut converter)?;
        }
        let mut rec = converter.build(rank, rank, false, "bench")?;
        rec.set_weight_dtype(args.model.dtype)?;
        let label = format!("{k} x {}, {}, LoRA r{rank}", args.loops, args.init);
        out.push((format!("r{rank}"), label, rec));
    }
    Ok(out)
}

fn workload(args: &EngineBenchArgs, ids: &[u32]) -> anyhow::Result<Workload> {
    let mut rng = StdRng::seed_from_u64(args.seed);
    anyhow::ensure!(
        ids.len() > args.max_prompt + 1,
        "the workload text is shorter than one prompt"
    );
    let window = args.score_context + args.score_tokens;
    anyhow::ensure!(
        args.score_context >= 1 && args.score_tokens >= 1,
        "--score-context and --score-tokens must be at least 1"
    );
    anyhow::ensure!(
        ids.len() >= window * args.score_windows,
        "the workload text has {} tokens, fewer than {} scoring windows of {window}",
        ids.len(),
        args.score_windows
    );
    Ok(Workload {
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
        scoring: ids
            .chunks_exact(window)
            .take(args.score_windows)
            .map(|c| {
                let (context, text) = c.split_at(args.score_context);
                (context.to_vec(), text.to_vec())
            })
            .collect(),
    })
}

pub fn run_bench(args: EngineBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.dtypes.is_empty() || args.model.dtype == WeightDtype::F32,
        "--dtypes repacks every dtype from the f32 weights: leave --dtype at f32"
    );
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
    let w = workload(&args, &ids)?;
    let loops = args.loops;
    println!(
        "engine benchmark: weights {} ({} kernel), {} prompts ({}-{} tokens), outputs {}-{} tokens, seed {}, concurrency {}, {} threads, {} round(s); perplexity: {} held-out windows, {} context + {} scored tokens",
        args.model.dtype, args.model.dtype.cpu_note().0, args.prompts, args.min_prompt, args.max_prompt, args.min_output, args.max_output, args.seed, args.concurrency,
        rayon::current_num_threads(), args.repeats.max(1), w.scoring.len(), args.score_context, args.score_tokens
    );
    let vanilla = |name: &str, scheduler| Spec {
        name: format!("vanilla {} layers, {name}", src.layers.len()),
        scheduler,
        exit: ExitPolicy::NONE,
        fill: KvFill::Propagate,
        trace: TraceFrom::None,
    };
    // Perplexity of the vanilla rows, scored in the first model's rounds.
    let mut vanilla_ppl: Option<[f64; 2]> = None;
    let k = src.layers.len() / loops;
    let model_name = loaded
        .path
        .file_stem()
        .map_or_else(|| "model".into(), |s| s.to_string_lossy().into_owned());
    let mut plot = ThresholdPlot {
        title: format!(
            "{model_name} as {k} x {loops} ({}): CDB with max-probability exits, {} prompts",
            args.init, args.prompts
        ),
        throughput: vec![],
        throughput_refs: vec![],
        agreement: vec![],
        agreement_refs: vec![],
    };
    let models = candidates(&args, src, k)?;
    if !args.dtypes.is_empty() {
        let (_, label, rec) = models.first().context("no recursive model to compare")?;
        let table = DtypeTable {
            dtypes: &args.dtypes,
            vanilla: src,
            recursive: (label, rec),
            synthetic: &args.synthetic,
            seed: args.seed,
            repeats: args.repeats,
            limits: (args.concurrency, args.max_batch_rows),
        };
        return run_table(&table, &w);
    }
    for (short, label, rec) in &models {
        let (specs, first_threshold, first_learned) =
            recursive_specs(label, &args, rec.exit_heads.is_some());
        let mut extra = vec![
            (src, vanilla("static", Scheduler::Static), None),
            (src, vanilla("CSB", Scheduler::Csb), None),
        ];
        let runs = rounds(rec, &specs, &mut extra, vanilla_ppl.is_none(), &w, &args)?;
        let [mut v_static, mut v_csb] = [0, 1].map(|i| extra[i].2.take().expect("ran"));
        match vanilla_ppl {
            None => vanilla_ppl = Some([v_static.perplexity, v_csb.perplexity]),
            Some([a, b]) => (v_static.perplexity, v_csb.perplexity) = (a, b),
        }
        let (v_static, v_csb) = (&v_static, &v_csb);
        let prompt_tokens: usize = w.prompts.iter().map(Vec::len).sum();
        let generated: usize = w.outputs.iter().sum();
        report(
            label,
            &runs,
            [v_static, v_csb],
            (rec.loops(), src.layers.len(), Macs::of(rec)),
            (prompt_tokens, generated),
        );
        let full_depth = &runs[3].outputs;
        let mut sweep = |kind: &str, thresholds: &[f32], from: usize| {
            let swept = &runs[from..from + thresholds.len()];
            let points = |f: &dyn Fn(&Run) -> f64| -> Vec<(f64, f64)> {
                thresholds
                    .iter()
                    .zip(swept)
                    .map(|(&t, r)| (t as f64, f(r)))
                    .collect()
            };
            plot.throughput.push(Series {
                label: format!("{short}: CDB, {kind}"),
                points: points(&|r| r.tokens_per_s),
            });
            plot.agreement.push(Series {
                label: format!("{short}: CDB, {kind}"),
                points: points(&|r| 100.0 * agreement(&r.outputs, full_depth)),
            });
        };
        sweep("max-prob", &args.thresholds, first_threshold);
        if rec.exit_heads.is_some() {
            sweep("learned", &args.learned, first_learned);
        }
        plot.throughput_refs.extend([
            (format!("{short}: CSB"), runs[1].tokens_per_s),
            (format!("{short}: CDB oracle replay"), runs[4].tokens_per_s),
            (format!("{short} rounds: vanilla CSB"), v_csb.tokens_per_s),
        ]);
        plot.agreement_refs.push((
            format!("{short}: CDB oracle replay"),
            100.0 * agreement(&runs[4].outputs, full_depth),
        ));
    }
    let png = write_png(&plot, &args.plot, &args.font)?;
    println!("\nplot: {}", png.display());
    Ok(())
}

/// Multiply-accumulates of the matmuls a row costs (attention scores over the context are left
/// out: a few percent at these lengths), from the model's shapes: the compute-bound view of
/// what exits can save on a CPU.
#[derive(Debug, Clone, Copy)]
struct Macs {
    /// One row through the shared block once (every layer of one loop, LoRA included).
    loop_row: f64,
    /// One row through the final norm + LM head.
    head_row: f64,
    /// One state-propagation row: it rides in the fused Q|K|V projection of every layer of one
    /// loop (its Q is computed and dropped).
    fill_row: f64,
}

impl Macs {
    fn of(model: &Llama) -> Self {
        let c = &model.cfg;
        let (h, q, kv, f) = (
            c.hidden_size as f64,
            c.q_dim() as f64,
            c.kv_dim() as f64,
            c.intermediate_size as f64,
        );
        let block = model.block_layers() as f64;
        let loops = model.loops() as f64;
        let layer = h * (q + 2.0 * kv) + q * h + 3.0 * h * f;
        // LoRA: a row costs each delta's parameters (in x r + r x out), averaged over loops;
        // fill rows only the Q|K|V deltas'.
        let (lora, lora_qkv) = model.recursion.as_ref().map_or((0.0, 0.0), |r| {
            let all: usize = r.lora.iter().map(|l| l.params()).sum();
            let qkv: usize = r
                .lora
                .iter()
                .flat_map(|l| Fused::Qkv.parts().iter().filter_map(|&p| l.get(p)))
                .map(|p| p.params())
                .sum();
            (all as f64 / loops, qkv as f64 / loops)
        });
        Self {
            loop_row: block * layer + lora,
            head_row: h * c.vocab_size as f64,
            fill_row: block * h * (q + 2.0 * kv) + lora_qkv,
        }
    }

    /// Per generated token, from a run's counters.
    fn per_token(&self, r: &Run) -> f64 {
        let s = &r.stats;
        (s.loop_rows as f64 * self.loop_row
            + s.head_rows as f64 * self.head_row
            + s.fill_rows as f64 * self.fill_row)
            / s.tokens.max(1) as f64
    }
}

/// Prints one model's tables: throughput and quality, then where the time goes.
fn report(
    label: &str,
    runs: &[Run],
    [v_static, v_csb]: [&Run; 2],
    (loops, layers, macs): (usize, usize, Macs),
    (prompt_tokens, generated): (usize, usize),
) {
    let csb = runs[1].tokens_per_s;
    let csb_macs = macs.per_token(&runs[1]);
    // Full depth: free-running outputs of the oracle recording, teacher-forced argmaxes of the
    // plain depth-wise run.
    let (full_depth, forced_full) = (&runs[3].outputs, &runs[2].forced_argmaxes);
    let oracle_depth = runs[3].trace.mean_depth();
    println!(
        "\n{label} (oracle mean exit loop {oracle_depth:.2}; ideal CDB gain over CSB = loops / E[loops]; compute bound = CSB's matmul MACs per token / the run's, prompts, exit heads and K/V fill rows counted)"
    );
    println!("| run | tokens/s | rounds | depth per token | ideal bound | vs vanilla static | vs vanilla CSB | vs recursive CSB | of ideal | compute bound | of compute bound | agreement with full depth: teacher-forced / free-running | perplexity |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let rounds = |r: &Run| {
        r.rounds
            .iter()
            .map(|t| format!("{t:.0}"))
            .collect::<Vec<_>>()
            .join(" / ")
    };
    for r in [v_static, v_csb] {
        println!(
            "| {} | {:.1} | {} | {layers} layers | | {:.2} | {:.2} | {:.2} | | | | | {:.1} |",
            r.name,
            r.tokens_per_s,
            rounds(r),
            r.tokens_per_s / v_static.tokens_per_s,
            r.tokens_per_s / v_csb.tokens_per_s,
            r.tokens_per_s / csb,
            r.perplexity,
        );
    }
    for r in runs {
        let ideal = loops as f64 / mean_loops(&r.stats).max(1e-9);
        let gain = r.tokens_per_s / csb;
        let bound = csb_macs / macs.per_token(r).max(1e-9);
        println!(
            "| {} | {:.1} | {} | {:.2} loops | {:.2} | {:.2} | {:.2} | {:.2} | {:.0}% | {:.2} | {:.0}% | {:.1}% / {:.1}% | {:.1} |",
            r.name,
            r.tokens_per_s,
            rounds(r),
            mean_loops(&r.stats),
            ideal,
            r.tokens_per_s / v_static.tokens_per_s,
            r.tokens_per_s / v_csb.tokens_per_s,
            gain,
            100.0 * gain / ideal,
            bound,
            100.0 * gain / bound,
            100.0 * agreement(&r.forced_argmaxes, forced_full),
            100.0 * agreement(&r.outputs, full_depth),
            r.perplexity,
        );
    }
    // Prompt tokens run every loop (their K/V is needed at every depth); only generated tokens
    // can exit, and each still needs its head row (and K/V fill rows for the loops it skips).
    // The best case: every generated token exits after loop 1, exit decisions free.
    let (p, g, l) = (prompt_tokens as f64, generated as f64, loops as f64);
    let (b, hd, fl) = (macs.loop_row, macs.head_row, macs.fill_row);
    let full = l * b;
    let decode = (full + hd) / (b + hd + (l - 1.0) * fl);
    let workload = ((p + g) * full + g * hd) / (p * full + g * (b + hd + (l - 1.0) * fl));
    let infinite = ((p + g) * full + g * hd) / (p * full + g * hd);
    let vs = csb / v_static.tokens_per_s;
    println!(
        "bounds vs vanilla static, every generated token exiting after loop 1 (compute-bound, exit decisions free; recursive CSB / vanilla static = {vs:.2}): decode only {:.2}; with this workload's prompts at full depth ({p:.0} prompt + {g:.0} generated tokens) {:.2}; same total depth cut into infinitely many loops {:.2} (paper: 2.66)",
        decode * vs,
        workload * vs,
        infinite * vs,
    );
    println!("\nwhere the time goes ({label}; ms per generated token, best round; CSB/static: the head is inside the block's forward)");
    println!("| run | total | gather | block | exit head | decide + sample | head rows/token | loop rows/token | fill rows/token |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in [v_static, v_csb].into_iter().chain(runs) {
        let s = &r.stats;
        let n = s.tokens.max(1) as f64;
        let ms = |d: std::time::Duration| 1e3 * d.as_secs_f64() / n;
        println!(
            "| {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
            r.name,
            ms(s.time.total()),
            ms(s.time.gather),
            ms(s.time.block),
            ms(s.time.head),
            ms(s.time.decide),
            s.head_rows as f64 / n,
            s.loop_rows as f64 / n,
            s.fill_rows as f64 / n,
        );
    }
}
