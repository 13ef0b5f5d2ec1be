//! An uptraining run from start to finish, as a library: load the converted model, choose what
//! trains, read the text, fill the teacher's cache, run the loop (held-out evaluations, CSV
//! curves, checkpoints, a stop flag checked between steps), fit the exit classifiers, and save a
//! model directory every command loads. `rrt uptrain` parses flags into [`Options`] and shows
//! [`Event`]s as a progress bar; a test or another front end drives the same run.

mod curves;
mod teacher;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use serde::Serialize;

use crate::data::{Corpus, Split};
use crate::error::{Result, TrainError};
use crate::optim::{AdamWConfig, Schedule};
use crate::roofline::Roofline;
use crate::trainer::{Data, EvalRecord, Settings, StepRecord, Trainer};
use crate::{Groups, LossWeights, Precision, TrainModel};

/// Everything a run needs (the flags of `rrt uptrain`).
#[derive(Debug, Clone, Serialize)]
pub struct Options {
    pub model: PathBuf,
    pub data: Vec<PathBuf>,
    pub out: PathBuf,
    pub teacher: Option<PathBuf>,
    /// `lora,norms`, `all`, `norms`, `lora`, `shared`, `exit`, or a mix.
    pub train: String,
    pub adapter_rank: usize,
    pub exit_fit_windows: usize,
    pub exit_fit_ridge: f64,
    pub classifier_fit_windows: usize,
    pub eval_data: Option<PathBuf>,
    pub eval_windows: usize,
    pub seq_len: usize,
    pub batch_seqs: usize,
    pub accum: usize,
    pub steps: u64,
    pub lr: f32,
    pub warmup: u64,
    pub lr_floor: f32,
    pub clip: f64,
    pub weight_decay: f32,
    pub seed: u64,
    pub loss: LossWeights,
    pub top_k: usize,
    pub teacher_cache: PathBuf,
    pub eval_every: u64,
    pub checkpoint_every: u64,
    pub resume: bool,
    pub precision: Precision,
}

/// What a run reports as it goes.
#[derive(Debug)]
pub enum Event<'a> {
    /// A line for the log.
    Line(String),
    /// A long phase starts (`total` units).
    Phase {
        what: String,
        total: u64,
    },
    /// The current phase has done `done` units.
    Advance(u64),
    PhaseDone,
    /// The training loop starts at `step` of `steps`.
    Training {
        step: u64,
        steps: u64,
    },
    /// An optimizer step finished; `roofline` is the share of the matmul roofline it reached.
    Step {
        record: &'a StepRecord,
        roofline: f64,
    },
}

/// What a finished run wrote.
#[derive(Debug, Clone)]
pub struct Finished {
    pub out: PathBuf,
    pub steps: u64,
    pub tokens: u64,
    pub last_eval: EvalRecord,
    /// `train.csv` and `eval.csv` in `out`.
    pub train_csv: PathBuf,
    pub eval_csv: PathBuf,
}

/// The groups `spec` names; `all` is every group the model has (no LoRA on a model converted
/// without it).
pub fn groups(spec: &str, model: &TrainModel) -> Result<Groups> {
    let has_lora = model
        .unrolled
        .iter()
        .any(|u| u.lora.iter().any(Option::is_some));
    let mut g = Groups::default();
    for part in spec.split(',').map(str::trim) {
        match part {
            "all" => {
                g.shared = true;
                g.lora |= has_lora;
                g.norms = true;
            }
            "lora" => g.lora = true,
            "norms" => g.norms = true,
            "shared" => g.shared = true,
            "exit" => g.exits = true,
            other => {
                return Err(TrainError::Input(format!(
                    "--train: unknown group {other:?} (use lora,norms | all | exit | norms | lora | shared)"
                )))
            }
        }
    }
    Ok(g)
}

fn settings(o: &Options) -> Settings {
    Settings {
        seq_len: o.seq_len,
        batch_seqs: o.batch_seqs,
        accum: o.accum,
        steps: o.steps,
        schedule: Schedule {
            peak: o.lr,
            warmup: o.warmup,
            total: o.steps,
            floor: o.lr_floor,
        },
        clip: o.clip,
        adam: AdamWConfig {
            weight_decay: o.weight_decay,
            ..AdamWConfig::default()
        },
        seed: o.seed,
        loss: o.loss,
        top_k: o.top_k,
        groups: o.train.clone(),
        precision: o.precision,
    }
}

/// A run ready to step: the trainer (model, data, teacher attached, resumed if asked) and what
/// the rest of the run needs.
pub struct Prepared {
    pub trainer: Trainer,
    pub tokenizer: rrt_model::Tokenizer,
    pub groups: Groups,
}

/// Everything before the first step: load the model, choose what trains, read the text, fit new
/// exit adapters, resume, attach the teacher.
pub fn prepare(o: &Options, report: &dyn Fn(Event<'_>)) -> Result<Prepared> {
    let student = rrt_model::load(&o.model, rrt_model::WeightDtype::F32)
        .map_err(|e| TrainError::Input(format!("loading --model {}: {e}", o.model.display())))?;
    let meta = student.model.recursion.as_ref().map(|r| r.meta.clone());
    let mut model = TrainModel::from_llama(&student.model)?;
    let groups = groups(&o.train, &model)?;
    if meta.is_none() && groups.lora {
        return Err(TrainError::Input(format!(
            "{}: not a recursive model, so it has no LoRA to train (convert it with `rrt convert`, or use --train all)",
            o.model.display()
        )));
    }
    let fresh_exits = groups.exits && model.exits.is_empty();
    if fresh_exits {
        if model.loops() < 2 {
            return Err(TrainError::Input(format!(
                "{}: exit heads need a recursive model with at least 2 loops",
                o.model.display()
            )));
        }
        model.add_exit_heads(o.adapter_rank, o.seed);
    }
    model.set_trainable(groups)?;
    let data = load_data(o, &student.tokenizer)?;
    for (path, tokens) in &data.1 {
        report(Event::Line(format!(
            "training text {}: {tokens} tokens ({:.1}% of the mix)",
            path.display(),
            100.0 * *tokens as f64 / data.0.train.tokens.len().max(1) as f64
        )));
    }
    std::fs::create_dir_all(&o.out).map_err(|e| TrainError::file(&o.out, e))?;
    let mut trainer = Trainer::new(model, settings(o), data.0, o.out.clone())?;
    if fresh_exits && !o.resume && o.exit_fit_windows > 0 {
        fit_exits(&mut trainer, o, report)?;
    }
    if o.resume {
        let planned = crate::checkpoint::planned_steps(&o.out);
        trainer.resume()?;
        report(Event::Line(format!(
            "resumed at step {} ({} tokens)",
            trainer.position.step, trainer.position.tokens
        )));
        if let Some(p) = planned.filter(|&p| p != o.steps) {
            report(Event::Line(format!(
                "the run was planned for {p} steps, now {}: the learning-rate schedule is stretched from here",
                o.steps
            )));
        }
    }
    teacher::attach(
        &mut trainer,
        o,
        &student.tokenizer,
        meta.as_ref().map(|m| m.source.as_str()),
        report,
    )?;
    Ok(Prepared {
        trainer,
        tokenizer: student.tokenizer,
        groups,
    })
}

/// Runs the whole uptraining; returns when the steps are done, or with an error when `stop`
/// was set (after writing a checkpoint `resume` continues from).
pub fn run(o: &Options, report: &dyn Fn(Event<'_>), stop: &AtomicBool) -> Result<Finished> {
    let Prepared {
        mut trainer,
        tokenizer,
        groups,
    } = prepare(o, report)?;
    let first_step = trainer.position.step;
    let roof = Roofline::measure(&trainer.model, &trainer.settings);
    report(Event::Line(format!(
        "training {} of {} parameters at {}; {:.1} GFLOP of matmuls per step; matmul peak {:.1} GFLOP/s ({}, measured now)",
        trainer.model.params.trainable_count(),
        trainer.model.params.list.iter().map(|p| p.value.len()).sum::<usize>(),
        o.precision,
        roof.flops_per_step / 1e9,
        roof.peak / 1e9,
        o.precision
    )));
    let looped = curves::train_loop(&mut trainer, o, &roof, report, stop);
    if trainer.data.teacher.is_some() {
        let read =
            trainer.position.step.saturating_sub(first_step) as usize * o.accum * o.batch_seqs;
        report(Event::Line(format!(
            "teacher top-{} of the training text: {} sequences computed during the run, {} from the cache",
            o.top_k,
            trainer.teacher_computed,
            read.saturating_sub(trainer.teacher_computed)
        )));
    }
    let (train_csv, eval_csv) = match looped {
        Ok(paths) => paths,
        Err(TrainError::Interrupted { step }) => {
            // A stopped run still leaves a model every command loads (as trained so far),
            // beside the checkpoint a resumed run continues from.
            finish(&trainer, &tokenizer, o, report)?;
            report(Event::Line(format!(
                "the model as trained to step {step} is written to {}",
                o.out.display()
            )));
            return Err(TrainError::Interrupted { step });
        }
        Err(e) => return Err(e),
    };
    if groups.exits && o.classifier_fit_windows > 0 {
        fit_classifiers(&mut trainer, o, report)?;
    }
    let last_eval = finish(&trainer, &tokenizer, o, report)?;
    Ok(Finished {
        out: o.out.clone(),
        steps: trainer.position.step,
        tokens: trainer.position.tokens,
        last_eval,
        train_csv,
        eval_csv,
    })
}

/// The corpus and its split (the teacher's view is added once the run's windows are known),
/// and the tokens each file gave.
fn load_data(
    o: &Options,
    tokenizer: &rrt_model::Tokenizer,
) -> Result<(Data, Vec<(PathBuf, usize)>)> {
    if o.data.is_empty() {
        return Err(TrainError::Input(
            "no training data: give --data FILE".into(),
        ));
    }
    // Each file read alone (its share of the mix), then the streams joined in order: the same
    // tokens as reading them together.
    let (mut shares, mut train) = (
        Vec::new(),
        Corpus {
            tokens: Vec::new(),
            files: o.data.clone(),
        },
    );
    for p in &o.data {
        let c = Corpus::read(std::slice::from_ref(p), tokenizer)?;
        shares.push((p.clone(), c.tokens.len()));
        train.tokens.extend(c.tokens);
    }
    let eval = o
        .eval_data
        .as_ref()
        .map(|p| Corpus::read(std::slice::from_ref(p), tokenizer))
        .transpose()?;
    let split = Split::new(train.windows(o.seq_len), o.eval_windows, eval.is_none())?;
    Ok((
        Data {
            train,
            split,
            train_teacher: None,
            eval: eval.map(|e| (e, None)),
            eval_windows: o.eval_windows,
            teacher: None,
        },
        shares,
    ))
}

/// The closed-form start of new exit adapters, reported per exit.
fn fit_exits(trainer: &mut Trainer, o: &Options, report: &dyn Fn(Event<'_>)) -> Result<()> {
    let started = Instant::now();
    let reports = trainer.fit_exit_adapters(o.exit_fit_windows, o.exit_fit_ridge)?;
    for (j, r) in reports.iter().enumerate() {
        report(Event::Line(format!(
            "exit adapter after loop {}: fitted on {} rows in {:.0} s, rank {} keeps {:.1}% of the map's energy; error against the last loop {:.3} -> {:.3}; distillation {:.3} -> {:.3}: {}",
            j + 1,
            r.rows,
            started.elapsed().as_secs_f64(),
            o.adapter_rank,
            100.0 * r.energy_kept,
            r.error_before,
            r.error_after,
            r.distillation_before,
            r.distillation_after,
            if r.kept { "kept" } else { "worse, the identity kept" }
        )));
    }
    Ok(())
}

/// The closing logistic-regression fit of the exit classifiers, reported per exit.
fn fit_classifiers(trainer: &mut Trainer, o: &Options, report: &dyn Fn(Event<'_>)) -> Result<()> {
    let started = Instant::now();
    let reports = trainer.fit_exit_classifiers(o.classifier_fit_windows, 1e-4)?;
    for (j, r) in reports.iter().enumerate() {
        report(Event::Line(format!(
            "exit classifier after loop {}: fitted on {} rows in {:.0} s ({:.1}% agree with the last loop); cross-entropy {:.3} -> {:.3}",
            j + 1,
            r.rows,
            started.elapsed().as_secs_f64(),
            100.0 * r.agreement,
            r.bce_before,
            r.bce_after
        )));
    }
    Ok(())
}

/// The learned exits' trade-off on held-out text: per loop and threshold, the share of tokens
/// that would exit and the per-token agreement with the last loop it keeps.
fn exit_curve_lines(e: &EvalRecord) -> Vec<String> {
    let mut lines = Vec::new();
    for (j, curve) in e.exit_curve.iter().enumerate() {
        if curve.is_empty() {
            continue;
        }
        lines.push(format!("learned exit after loop {} (held-out): threshold -> exit rate, agreement of exiting tokens, overall agreement", j + 1));
        for p in curve {
            lines.push(format!(
                "  {:.2} -> {:5.1}% exit, {:5.1}% agree, {:5.1}% overall",
                p.threshold,
                100.0 * p.exit_rate,
                100.0 * p.exit_agreement,
                100.0 * p.overall_agreement
            ));
        }
    }
    if !e.cascade.is_empty() {
        lines.push(
            "the exits together, a token leaving at the first it passes (held-out): threshold -> share leaving at each exit, agreement, loops a token".into(),
        );
        for p in &e.cascade {
            let shares: Vec<String> = p.exit_share[..p.exit_share.len() - 1]
                .iter()
                .map(|x| format!("{:.1}%", 100.0 * x))
                .collect();
            lines.push(format!(
                "  {:.2} -> {}, {:5.1}% agree, {:.2} loops",
                p.threshold,
                shares.join(" / "),
                100.0 * p.agreement,
                p.mean_loops
            ));
        }
    }
    lines
}

/// Saves the trained model (and its exit heads) into `out`; returns the closing evaluation.
fn finish(
    trainer: &Trainer,
    tokenizer: &rrt_model::Tokenizer,
    o: &Options,
    report: &dyn Fn(Event<'_>),
) -> Result<EvalRecord> {
    let llama = trainer.model.to_llama()?;
    rrt_model::recursive::save::save(&llama, tokenizer, &o.out)?;
    let e = trainer.evaluate();
    let trained = format!(
        "rrt uptrain --train {} on {} for {} steps ({} tokens); held-out agreement of each loop's adapted exit with the last loop: {:?}",
        o.train,
        o.data.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(" "),
        trainer.position.step,
        trainer.position.tokens,
        e.agreement.iter().map(|a| format!("{:.1}%", 100.0 * a)).collect::<Vec<_>>()
    );
    if let Some(mut heads) = trainer.model.to_exit_heads(trained)? {
        let measured_on = format!(
            "{} ({} windows of {} tokens, teacher-forced)",
            o.eval_data
                .as_ref()
                .map_or("the held-out split".to_string(), |p| p
                    .display()
                    .to_string()),
            o.eval_windows,
            o.seq_len
        );
        heads.meta.curves = e
            .exit_curve
            .iter()
            .enumerate()
            .filter(|(_, points)| !points.is_empty())
            .map(|(j, points)| rrt_model::recursive::exit_heads::ExitCurve {
                after_loop: j + 1,
                measured_on: measured_on.clone(),
                points: points.clone(),
            })
            .collect();
        heads.meta.cascade = e.cascade.clone();
        heads.save(&o.out)?;
        for line in exit_curve_lines(&e) {
            report(Event::Line(line));
        }
    }
    Ok(e)
}

/// Whether `stop` is set (Ctrl-C or SIGTERM in the CLI).
fn stopped(stop: &AtomicBool) -> bool {
    stop.load(Ordering::Relaxed)
}
