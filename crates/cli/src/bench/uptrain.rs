//! `rrt bench uptrain`: the trainer at f32 and at bf16 on the same model, data and steps, side
//! by side in one process: the two runs take turns step by step (so both see the same spells
//! of this VM's speed), each with its own teacher computing its batches' top-k as it goes.
//! Prints tokens/s and the ratio, the time of each part of a step (teacher, data, forward,
//! heads, backward, optimizer), and how far the bf16 run's objective strays from the f32
//! run's over the steps, and the held-out loss curve of both runs' weights scored the same way
//! (f32 products, the same windows, every `--eval-every` steps); writes both curves as CSV.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use rrt_train::trainer::{StepParts, StepRecord, Trainer};
use rrt_train::uptrain::{self, Event, Options};
use rrt_train::{LossWeights, Precision};

#[derive(Args, Debug)]
pub struct UptrainBenchArgs {
    /// The converted model to train (`make bench-uptrain` converts SmolLM2 to 15 x 2, LoRA
    /// r128).
    #[arg(long, default_value = ".cache/models/smollm2-15x2-r128")]
    model: PathBuf,
    #[arg(long, default_value = ".cache/data/kjv-train.txt")]
    data: PathBuf,
    /// Parameter groups, as `rrt uptrain --train`.
    #[arg(long, default_value = "all")]
    train: String,
    /// Optimizer steps of each run.
    #[arg(long, default_value_t = 100)]
    steps: u64,
    #[arg(long, default_value_t = 256)]
    seq_len: usize,
    #[arg(long, default_value_t = 2)]
    batch_seqs: usize,
    #[arg(long, default_value_t = 1)]
    accum: usize,
    #[arg(long, default_value_t = 2e-4)]
    lr: f32,
    /// Distillation weight (0: no teacher in the step).
    #[arg(long, default_value_t = 0.9)]
    kd_weight: f32,
    /// Every this many steps (and before the first) both runs' weights are scored the same
    /// way: f32 products on the same held-out windows (0: only after the run).
    #[arg(long, default_value_t = 10)]
    eval_every: u64,
    /// Where the curves' CSV goes.
    #[arg(long, default_value = ".cache/bench/uptrain.csv")]
    out: PathBuf,
}

fn options(a: &UptrainBenchArgs, precision: Precision, dir: &std::path::Path) -> Options {
    Options {
        model: a.model.clone(),
        data: vec![a.data.clone()],
        out: dir.join(precision.to_string()),
        teacher: None,
        train: a.train.clone(),
        adapter_rank: 64,
        exit_fit_windows: 0,
        exit_fit_ridge: 1e-3,
        classifier_fit_windows: 0,
        eval_data: None,
        eval_windows: 8,
        seq_len: a.seq_len,
        batch_seqs: a.batch_seqs,
        accum: a.accum,
        steps: a.steps,
        lr: a.lr,
        warmup: (a.steps / 10).max(1),
        lr_floor: 0.1,
        clip: 1.0,
        weight_decay: 0.0,
        seed: 0,
        loss: LossWeights {
            ce: 1.0 - a.kd_weight,
            kd: a.kd_weight,
            temperature: 1.0,
            exit_weight: 0.1,
            self_kd: 0.1,
            classifier: 1.0,
        },
        top_k: 32,
        // A fresh cache per run: each run's teacher computes its own batches.
        teacher_cache: dir.join(format!("teacher-{precision}")),
        eval_every: u64::MAX,
        checkpoint_every: u64::MAX,
        resume: false,
        precision,
    }
}

/// Mean of each part over steps 2.. (the first warms the allocator and the caches).
fn mean_parts(records: &[StepRecord]) -> StepParts {
    let rest = &records[1.min(records.len())..];
    let n = rest.len().max(1) as f64;
    let mut p = StepParts::default();
    for r in rest {
        p.teacher += r.parts.teacher / n;
        p.data += r.parts.data / n;
        p.forward += r.parts.forward / n;
        p.heads += r.parts.heads / n;
        p.backward += r.parts.backward / n;
        p.optimizer += r.parts.optimizer / n;
    }
    p
}

/// Tokens/s over steps 2.. (total tokens over total seconds).
fn tokens_per_s(records: &[StepRecord]) -> f64 {
    let rest = &records[1.min(records.len())..];
    let tokens: f64 = rest.iter().map(|r| r.tokens_per_s * r.seconds).sum();
    tokens / rest.iter().map(|r| r.seconds).sum::<f64>()
}

/// Both runs' weights scored the same way: f32 products on the same held-out windows (an
/// objective measured with bf16 products carries the rounding of the logits themselves).
/// Per run, the perplexity after each loop.
fn score(runs: &mut [(Precision, Trainer, Vec<StepRecord>)], step: u64) -> (u64, [Vec<f64>; 2]) {
    let mut ppl = [Vec::new(), Vec::new()];
    for (i, (precision, trainer, _)) in runs.iter_mut().enumerate().take(2) {
        trainer.model.precision = Precision::F32;
        ppl[i] = trainer.evaluate().perplexity;
        trainer.model.precision = *precision;
    }
    eprintln!(
        "step {step}: held-out cross-entropy after the last loop (f32 scoring): f32 run {:.4}, bf16 run {:.4}",
        last_ce(&ppl[0]),
        last_ce(&ppl[1])
    );
    (step, ppl)
}

/// Cross-entropy (nats) after the last loop, from the perplexity per loop.
fn last_ce(perplexity: &[f64]) -> f64 {
    perplexity.last().copied().unwrap_or(f64::NAN).ln()
}

pub fn run(a: UptrainBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(a.steps >= 2, "--steps: at least 2");
    rrt_model::runtime::keep_freed_memory();
    // The runs' outputs and teacher caches, fresh each time (nothing is reused between runs).
    let dir = a.out.with_extension("work");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let quiet = |e: Event<'_>| {
        if let Event::Line(l) = e {
            eprintln!("{l}");
        }
    };
    let mut runs = Vec::new();
    for precision in [Precision::F32, Precision::Bf16] {
        eprintln!("preparing the {precision} run");
        let p = uptrain::prepare(&options(&a, precision, &dir), &quiet)?;
        runs.push((precision, p.trainer, Vec::<StepRecord>::new()));
    }
    let work = rrt_train::roofline::Work::of(&runs[0].1.model, a.seq_len);
    eprintln!(
        "{} steps of {} tokens each, f32 and bf16 taking turns; {:.2} GFLOP of matmuls a token ({:.0}% projections, {:.0}% shared-weight gradients, {:.0}% LoRA, {:.0}% attention, {:.0}% heads)",
        a.steps,
        a.seq_len * a.batch_seqs * a.accum,
        2.0 * work.total() / 1e9,
        100.0 * work.projections / work.total(),
        100.0 * work.shared_grads / work.total(),
        100.0 * work.lora / work.total(),
        100.0 * work.attention / work.total(),
        100.0 * work.heads / work.total(),
    );
    // The held-out loss curve: both runs' weights scored with f32 products on the same windows
    // (an objective measured with bf16 products carries the rounding of the logits themselves).
    let mut heldout: Vec<(u64, [Vec<f64>; 2])> = Vec::new();
    if a.eval_every > 0 {
        heldout.push(score(&mut runs, 0));
    }
    for step in 1..=a.steps {
        for (precision, trainer, records) in &mut runs {
            let r = trainer
                .step()
                .with_context(|| format!("the {precision} run, step {step}"))?;
            records.push(r);
        }
        if a.eval_every > 0 && (step % a.eval_every == 0 || step == a.steps) {
            heldout.push(score(&mut runs, step));
        }
        if step % 10 == 0 || step == a.steps {
            let (f, b) = (&runs[0].2, &runs[1].2);
            eprintln!(
                "step {step}: objective f32 {:.4} bf16 {:.4}; tokens/s so far f32 {:.1} bf16 {:.1}",
                f.last().map_or(0.0, |r| r.objective),
                b.last().map_or(0.0, |r| r.objective),
                tokens_per_s(f),
                tokens_per_s(b)
            );
        }
    }
    if heldout.last().is_none_or(|(step, _)| *step != a.steps) {
        heldout.push(score(&mut runs, a.steps));
    }
    let scored = heldout.last().map(|(_, p)| p.clone()).unwrap_or_default();
    let (f, b) = (&runs[0].2, &runs[1].2);
    let diffs: Vec<f64> = f
        .iter()
        .zip(b)
        .map(|(x, y)| (y.objective - x.objective).abs() / x.objective)
        .collect();
    let mean_diff = diffs.iter().sum::<f64>() / diffs.len() as f64;
    let max_diff = diffs.iter().copied().fold(0.0, f64::max);
    let last10: f64 = {
        let tail = &diffs[diffs.len().saturating_sub(10)..];
        tail.iter().sum::<f64>() / tail.len() as f64
    };
    // The curves as a reader sees them: each step's objective averaged with the 9 before it
    // (single steps differ by the batch's luck once the two runs' weights have moved apart).
    let smooth = |r: &[StepRecord]| -> Vec<f64> {
        (0..r.len())
            .map(|i| {
                let w = &r[i.saturating_sub(9)..=i];
                w.iter().map(|x| x.objective).sum::<f64>() / w.len() as f64
            })
            .collect()
    };
    let (sf, sb) = (smooth(f), smooth(b));
    let smooth_diffs: Vec<f64> = sf.iter().zip(&sb).map(|(x, y)| (y - x).abs() / x).collect();
    let smooth_max = smooth_diffs.iter().copied().fold(0.0, f64::max);
    let smooth_mean = smooth_diffs.iter().sum::<f64>() / smooth_diffs.len() as f64;
    let (tf, tb) = (tokens_per_s(f), tokens_per_s(b));
    println!(
        "\n| precision | tokens/s | vs f32 | teacher s | data s | forward s | heads s | backward s | optimizer s | step s |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for (name, records, tps) in [("f32", f, tf), ("bf16", b, tb)] {
        let p = mean_parts(records);
        let step = p.teacher + p.data + p.forward + p.heads + p.backward + p.optimizer;
        println!(
            "| {name} | {tps:.1} | {:.2}x | {:.2} | {:.3} | {:.2} | {:.2} | {:.2} | {:.3} | {step:.2} |",
            tps / tf,
            p.teacher,
            p.data,
            p.forward,
            p.heads,
            p.backward,
            p.optimizer
        );
    }
    println!(
        "\nobjective, bf16 against f32 over the {} steps: mean relative difference {:.2}%, largest {:.2}%, last 10 steps {:.2}%",
        a.steps,
        100.0 * mean_diff,
        100.0 * max_diff,
        100.0 * last10
    );
    println!(
        "the curves averaged over 10 steps: mean relative difference {:.2}%, largest {:.2}%; bf16 - f32 at the end {:+.2}%",
        100.0 * smooth_mean,
        100.0 * smooth_max,
        100.0 * (sb.last().copied().unwrap_or(0.0) / sf.last().copied().unwrap_or(1.0) - 1.0)
    );
    let per_loop = |p: &[f64]| {
        p.iter()
            .map(|x| format!("{x:.2}"))
            .collect::<Vec<_>>()
            .join(" / ")
    };
    println!(
        "held-out perplexity per loop after the run, both scored with f32 products: f32 run {}, bf16 run {} (last loop {:+.2}%)",
        per_loop(&scored[0]),
        per_loop(&scored[1]),
        100.0 * (scored[1].last().copied().unwrap_or(0.0) / scored[0].last().copied().unwrap_or(1.0) - 1.0)
    );
    if heldout.len() > 1 {
        println!("\n| step | held-out cross-entropy, f32 run | bf16 run | bf16 vs f32 |");
        println!("|---|---|---|---|");
        for (step, [f, b]) in &heldout {
            let (f, b) = (last_ce(f), last_ce(b));
            println!(
                "| {step} | {f:.4} | {b:.4} | {:+.2}% |",
                100.0 * (b / f - 1.0)
            );
        }
        let diffs: Vec<f64> = heldout[1..]
            .iter()
            .map(|(_, [f, b])| (last_ce(b) - last_ce(f)).abs() / last_ce(f))
            .collect();
        println!(
            "held-out loss curve (f32 scoring, steps {}..{}): bf16 against f32 mean relative difference {:.2}%, largest {:.2}%",
            heldout[1].0,
            a.steps,
            100.0 * diffs.iter().sum::<f64>() / diffs.len() as f64,
            100.0 * diffs.iter().copied().fold(0.0, f64::max)
        );
    }
    println!(
        "CPU: {}",
        rrt_model::kernels::Supported::all()
            .iter()
            .map(|s| s.isa().name())
            .collect::<Vec<_>>()
            .join(", ")
    );
    if let Some(parent) = a.out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let mut csv =
        String::from("step,objective_f32,objective_bf16,tokens_per_s_f32,tokens_per_s_bf16\n");
    for (x, y) in f.iter().zip(b) {
        csv += &format!(
            "{},{:.5},{:.5},{:.2},{:.2}\n",
            x.step, x.objective, y.objective, x.tokens_per_s, y.tokens_per_s
        );
    }
    std::fs::write(&a.out, csv).with_context(|| format!("writing {}", a.out.display()))?;
    println!("curves: {}", a.out.display());
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
