//! `rrt uptrain`: trains a converted model (its LoRA and norms, all of it, or only the exit
//! heads) by distillation from its source model with the early-exit loss, and writes a model
//! directory every command loads. Progress bar with loss, tokens/s and ETA; the curves as CSV
//! and a PNG; checkpoints every so many steps and on Ctrl-C; `--resume` continues exactly.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use rrt_model::kernels::gemm::{gemm, MatMut, MatRef};
use rrt_train::data::{Corpus, Split};
use rrt_train::optim::{AdamWConfig, Schedule};
use rrt_train::teacher::{CacheKey, TeacherCache};
use rrt_train::trainer::{Data, EvalRecord, Settings, StepRecord, Trainer};
use rrt_train::{Groups, LossWeights, TrainModel};

use crate::uptrain_plot;

#[derive(Args, Debug)]
pub struct UptrainArgs {
    /// The converted model to train (a directory from `rrt convert`).
    #[arg(long)]
    model: PathBuf,
    /// Training text files.
    #[arg(long, num_args = 1.., required = true)]
    data: Vec<PathBuf>,
    /// Where the trained model (and the curves and checkpoints) go.
    #[arg(long)]
    out: PathBuf,
    /// The teacher (default: the source the model was converted from).
    #[arg(long)]
    teacher: Option<PathBuf>,
    /// Parameter groups: `lora,norms`, `all` (shared weights, LoRA, norms), `norms`, `lora`,
    /// `exit` (only the exit adapters and classifiers; the model stays frozen), or a mix.
    #[arg(long, default_value = "lora,norms")]
    train: String,
    /// Rank of new exit adapters (added when the model has none and `exit` trains).
    #[arg(long, default_value_t = 64)]
    adapter_rank: usize,
    /// Training windows new exit adapters are first fitted on in closed form (ridge regression
    /// to the last loop, truncated by SVD); 0 starts them at the identity.
    #[arg(long, default_value_t = 32)]
    exit_fit_windows: usize,
    /// Ridge of that fit, relative to the mean diagonal of the inputs' Gram matrix.
    #[arg(long, default_value_t = 1e-3)]
    exit_fit_ridge: f64,
    /// Training windows the exit classifiers are fitted on by logistic regression after
    /// training (on the final adapters); 0 keeps what gradient descent reached.
    #[arg(long, default_value_t = 32)]
    classifier_fit_windows: usize,
    /// Weight of the exit classifiers' loss.
    #[arg(long, default_value_t = 1.0)]
    classifier_weight: f32,
    /// Held-out text (default: every so many windows of the training text are held out).
    #[arg(long)]
    eval_data: Option<PathBuf>,
    /// Sequences of the held-out evaluation.
    #[arg(long, default_value_t = 16)]
    eval_windows: usize,
    #[arg(long, default_value_t = 256)]
    seq_len: usize,
    /// Sequences per micro-batch.
    #[arg(long, default_value_t = 4)]
    batch_seqs: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 4)]
    accum: usize,
    /// Optimizer steps.
    #[arg(long, default_value_t = 200)]
    steps: u64,
    /// Peak learning rate.
    #[arg(long, default_value_t = 2e-4)]
    lr: f32,
    #[arg(long, default_value_t = 20)]
    warmup: u64,
    /// The learning rate at the end, as a fraction of the peak.
    #[arg(long, default_value_t = 0.1)]
    lr_floor: f32,
    /// Gradient-norm clipping (0: off).
    #[arg(long, default_value_t = 1.0)]
    clip: f64,
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value_t = 0.1)]
    ce_weight: f32,
    /// Distillation weight (0: no teacher).
    #[arg(long, default_value_t = 0.9)]
    kd_weight: f32,
    #[arg(long, default_value_t = 1.0)]
    temperature: f32,
    /// Weight of the loops before the last (the early-exit loss; the last has 1).
    #[arg(long, default_value_t = 0.1)]
    exit_weight: f32,
    /// Distillation from the detached last loop into each earlier one.
    #[arg(long, default_value_t = 0.1)]
    self_kd_weight: f32,
    /// Teacher logits kept per position.
    #[arg(long, default_value_t = 32)]
    top_k: usize,
    /// Where teacher outputs are cached.
    #[arg(long, default_value = ".cache/teacher")]
    teacher_cache: PathBuf,
    #[arg(long, default_value_t = 25)]
    eval_every: u64,
    #[arg(long, default_value_t = 25)]
    checkpoint_every: u64,
    /// Continue from the checkpoint in --out.
    #[arg(long)]
    resume: bool,
    /// TrueType font of the plot.
    #[arg(
        long,
        default_value = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
    )]
    font: PathBuf,
    /// Quiet: no progress bar (tests, logs).
    #[arg(long)]
    quiet: bool,
}

fn groups(spec: &str) -> anyhow::Result<Groups> {
    let mut g = Groups::default();
    for part in spec.split(',').map(str::trim) {
        match part {
            "all" => {
                g.shared = true;
                g.lora = true;
                g.norms = true;
            }
            "lora" => g.lora = true,
            "norms" => g.norms = true,
            "shared" => g.shared = true,
            "exit" => g.exits = true,
            other => anyhow::bail!("--train: unknown group {other:?} (use lora,norms | all | exit | norms | lora | shared)"),
        }
    }
    Ok(g)
}

pub fn run(args: UptrainArgs) -> anyhow::Result<()> {
    let groups = groups(&args.train)?;
    let student = rrt_model::load(&args.model, rrt_model::WeightDtype::F32)
        .with_context(|| format!("loading --model {}", args.model.display()))?;
    let meta = student.model.recursion.as_ref().map(|r| r.meta.clone());
    if meta.is_none() && groups.lora {
        anyhow::bail!("{}: not a recursive model, so it has no LoRA to train (convert it with `rrt convert`, or use --train all)", args.model.display());
    }
    let mut model = TrainModel::from_llama(&student.model)?;
    let fresh_exits = groups.exits && model.exits.is_empty();
    if fresh_exits {
        if model.loops() < 2 {
            anyhow::bail!(
                "{}: exit heads need a recursive model with at least 2 loops",
                args.model.display()
            );
        }
        model.add_exit_heads(args.adapter_rank, args.seed);
    }
    model.set_trainable(groups)?;
    let settings = Settings {
        seq_len: args.seq_len,
        batch_seqs: args.batch_seqs,
        accum: args.accum,
        steps: args.steps,
        schedule: Schedule {
            peak: args.lr,
            warmup: args.warmup,
            total: args.steps,
            floor: args.lr_floor,
        },
        clip: args.clip,
        adam: AdamWConfig {
            weight_decay: args.weight_decay,
            ..AdamWConfig::default()
        },
        seed: args.seed,
        loss: LossWeights {
            ce: args.ce_weight,
            kd: args.kd_weight,
            temperature: args.temperature,
            exit_weight: args.exit_weight,
            self_kd: args.self_kd_weight,
            classifier: args.classifier_weight,
        },
        top_k: args.top_k,
        groups: args.train.clone(),
    };
    let data = load_data(&args, &student.tokenizer)?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let mut trainer = Trainer::new(model, settings, data, args.out.clone())?;
    if fresh_exits && !args.resume && args.exit_fit_windows > 0 {
        fit_exits(&mut trainer, &args)?;
    }
    if args.resume {
        trainer.resume()?;
        eprintln!(
            "resumed at step {} ({} tokens)",
            trainer.position.step, trainer.position.tokens
        );
    }
    attach_teacher(
        &mut trainer,
        &args,
        &student.tokenizer,
        meta.as_ref().map(|m| m.source.as_str()),
    )?;
    let roof = Roofline::measure(&trainer);
    eprintln!(
        "training {} of {} parameters; {:.1} GFLOP of matmuls per step; matmul peak {:.1} GFLOP/s (gemm, measured now)",
        trainer.model.params.trainable_count(),
        trainer.model.params.list.iter().map(|p| p.value.len()).sum::<usize>(),
        roof.flops_per_step / 1e9,
        roof.peak / 1e9
    );
    train_loop(&mut trainer, &args, &roof)?;
    if groups.exits && args.classifier_fit_windows > 0 {
        fit_classifiers(&mut trainer, &args)?;
    }
    finish(&trainer, &student.tokenizer, &args)
}

/// The closed-form start of new exit adapters, reported per exit.
fn fit_exits(trainer: &mut Trainer, args: &UptrainArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let reports = trainer.fit_exit_adapters(args.exit_fit_windows, args.exit_fit_ridge)?;
    for (j, r) in reports.iter().enumerate() {
        eprintln!(
            "exit adapter after loop {}: fitted on {} rows in {:.0} s, rank {} keeps {:.1}% of the map's energy; error against the last loop {:.3} -> {:.3}; distillation {:.3} -> {:.3}: {}",
            j + 1,
            r.rows,
            started.elapsed().as_secs_f64(),
            args.adapter_rank,
            100.0 * r.energy_kept,
            r.error_before,
            r.error_after,
            r.distillation_before,
            r.distillation_after,
            if r.kept { "kept" } else { "worse, the identity kept" }
        );
    }
    Ok(())
}

/// The closing logistic-regression fit of the exit classifiers, reported per exit.
fn fit_classifiers(trainer: &mut Trainer, args: &UptrainArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let reports = trainer.fit_exit_classifiers(args.classifier_fit_windows, 1e-4)?;
    for (j, r) in reports.iter().enumerate() {
        eprintln!(
            "exit classifier after loop {}: fitted on {} rows in {:.0} s ({:.1}% agree with the last loop); cross-entropy {:.3} -> {:.3}",
            j + 1,
            r.rows,
            started.elapsed().as_secs_f64(),
            100.0 * r.agreement,
            r.bce_before,
            r.bce_after
        );
    }
    Ok(())
}

/// The corpus and its split (the teacher's view is added once the run's windows are known).
fn load_data(args: &UptrainArgs, tokenizer: &rrt_model::Tokenizer) -> anyhow::Result<Data> {
    let train = Corpus::read(&args.data, tokenizer)?;
    let eval = args
        .eval_data
        .as_ref()
        .map(|p| Corpus::read(std::slice::from_ref(p), tokenizer))
        .transpose()?;
    let split = Split::new(
        train.windows(args.seq_len),
        args.eval_windows,
        eval.is_none(),
    )?;
    Ok(Data {
        train,
        split,
        train_teacher: None,
        eval: eval.map(|e| (e, None)),
        eval_windows: args.eval_windows,
    })
}

/// Runs the teacher over every window the run will read that its cache lacks, and hands the
/// caches to the trainer.
fn attach_teacher(
    trainer: &mut Trainer,
    args: &UptrainArgs,
    tokenizer: &rrt_model::Tokenizer,
    source: Option<&str>,
) -> anyhow::Result<()> {
    if args.kd_weight == 0.0 {
        return Ok(());
    }
    let teacher_path = match (&args.teacher, source) {
        (Some(p), _) => p.clone(),
        (None, Some(s)) => PathBuf::from(s),
        (None, None) => {
            anyhow::bail!("--teacher: the model records no source to distill from; name one")
        }
    };
    let teacher = rrt_model::load(&teacher_path, rrt_model::WeightDtype::F32)
        .with_context(|| format!("loading the teacher {}", teacher_path.display()))?;
    check_same_vocabulary(tokenizer, &teacher.tokenizer, &teacher_path)?;
    let teacher_model = TrainModel::from_llama(&teacher.model)?;
    let fill = |corpus: &Corpus, needed: &[usize], what: &str| -> anyhow::Result<TeacherCache> {
        let key = CacheKey {
            teacher: teacher_path.clone(),
            corpus: corpus.fingerprint(),
            t: args.seq_len,
            k: args.top_k,
            temperature: args.temperature,
        };
        let mut cache = TeacherCache::open(&args.teacher_cache, &key, corpus.windows(args.seq_len));
        let todo = cache.missing(needed).len();
        let bar = bar(
            args.quiet,
            todo as u64,
            &format!("teacher top-{} of {what}", args.top_k),
        );
        let computed = cache.fill(
            &teacher_model,
            corpus,
            needed,
            args.batch_seqs,
            &|done, _| bar.set_position(done as u64),
        )?;
        bar.finish_and_clear();
        eprintln!(
            "teacher top-{} of {what}: {computed} sequences computed, {} from the cache",
            args.top_k,
            needed.len().min(cache.windows) - computed.min(needed.len())
        );
        Ok(cache)
    };
    let planned = trainer.planned_windows();
    let eval_windows = trainer.eval_windows();
    let train_teacher = match &trainer.data.eval {
        Some(_) => fill(&trainer.data.train, &planned, "the training text")?,
        None => {
            let all: Vec<usize> = planned.iter().chain(&eval_windows).copied().collect();
            fill(&trainer.data.train, &all, "the training text")?
        }
    };
    trainer.data.train_teacher = Some(train_teacher);
    if let Some((corpus, _)) = &trainer.data.eval {
        let cache = fill(corpus, &eval_windows, "the held-out text")?;
        if let Some((_, t)) = &mut trainer.data.eval {
            *t = Some(cache);
        }
    }
    Ok(())
}

/// Distillation needs the teacher to speak the student's vocabulary.
fn check_same_vocabulary(
    student: &rrt_model::Tokenizer,
    teacher: &rrt_model::Tokenizer,
    path: &Path,
) -> anyhow::Result<()> {
    let probe = "The LORD is my shepherd; 1234 caf\u{e9} \u{1F600}\n  def f(x): return x";
    let (a, b) = (student.encode(probe)?, teacher.encode(probe)?);
    if student.vocab_size() != teacher.vocab_size() || a != b {
        anyhow::bail!(
            "{}: the teacher's tokenizer differs from the model's ({} vs {} tokens in the vocabulary); distillation needs the same one",
            path.display(),
            teacher.vocab_size(),
            student.vocab_size()
        );
    }
    Ok(())
}

fn bar(quiet: bool, len: u64, what: &str) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:30}] {pos}/{len} {elapsed_precise} ETA {eta_precise}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message(what.to_string());
    bar
}

/// The matrix-product work of one optimizer step and the machine's measured product speed.
pub struct Roofline {
    pub flops_per_step: f64,
    pub peak: f64,
}

impl Roofline {
    fn measure(trainer: &Trainer) -> Self {
        let m = &trainer.model;
        let c = &m.cfg;
        let s = &trainer.settings;
        let rows = (s.batch_seqs * s.seq_len * s.accum) as f64;
        let (h, f, qd, kvd) = (
            c.hidden_size as f64,
            c.intermediate_size as f64,
            c.q_dim() as f64,
            c.kv_dim() as f64,
        );
        let layer = h * (qd + 2.0 * kvd) + qd * h + 3.0 * h * f;
        // Gradients flow back through the model unless only the exit heads train.
        let backward = m.layers_train();
        let passes = if backward { 2.0 } else { 1.0 };
        let mut macs = 0.0;
        for u in &m.unrolled {
            let lora: f64 = u
                .lora
                .iter()
                .flatten()
                .map(|l| {
                    let (a, b) = (m.params.get(l.a).len(), m.params.get(l.b).len());
                    (a + b) as f64
                })
                .sum();
            // Forward (and input gradients) of the projections and LoRA.
            macs += passes * (layer + lora);
            if m.params.trainable(m.shared[u.shared].fused[0]) {
                macs += layer;
            }
            if u.lora.iter().flatten().any(|l| m.params.trainable(l.a)) {
                macs += lora;
            }
            // Causal attention: scores and weighted sum (then their four gradients).
            macs += passes * 3.0 * (s.seq_len as f64 / 2.0) * qd;
        }
        // Every loop's head: logits, and the gradient of its input where the loss reaches back
        // (all loops, or with only exit heads training the loops that have one).
        let head_grads = if backward { m.loops() } else { m.loops() - 1 };
        macs += (m.loops() + head_grads) as f64 * h * c.vocab_size as f64;
        Self {
            flops_per_step: 2.0 * macs * rows,
            peak: gemm_peak(c.hidden_size, c.intermediate_size),
        }
    }
}

/// Best of five timings of a `[1024, h] x [h, f]` product, in FLOP/s.
fn gemm_peak(h: usize, f: usize) -> f64 {
    let (m, a, b) = (1024, vec![0.5f32; 1024 * h], vec![0.25f32; h * f]);
    let mut c = vec![0f32; m * f];
    (0..5)
        .map(|_| {
            let t = Instant::now();
            gemm(
                MatMut::new(&mut c, m, f),
                MatRef::new(&a, m, h),
                MatRef::new(&b, h, f),
                false,
            );
            2.0 * (m * h * f) as f64 / t.elapsed().as_secs_f64()
        })
        .fold(0.0, f64::max)
}

/// Ctrl-C or SIGTERM, as a flag the loop checks between steps.
fn interrupted() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    let set = flag.clone();
    std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async {
            let shutdown = rrt_service::Shutdown::new();
            shutdown.on_signals();
            shutdown.wait().await;
        });
        set.store(true, Ordering::Relaxed);
    });
    flag
}

fn csv_line(values: impl IntoIterator<Item = String>) -> String {
    values.into_iter().collect::<Vec<_>>().join(",") + "\n"
}

fn step_row(r: &StepRecord) -> String {
    let mut v = vec![
        r.step.to_string(),
        r.tokens.to_string(),
        format!("{:.3e}", r.lr),
        format!("{:.5}", r.objective),
    ];
    v.extend(r.ce.iter().chain(&r.kd).map(|x| format!("{x:.5}")));
    v.extend([
        format!("{:.4}", r.grad_norm),
        format!("{:.1}", r.tokens_per_s),
    ]);
    csv_line(v)
}

fn eval_row(r: &EvalRecord, tokens: u64) -> String {
    let mut v = vec![r.step.to_string(), tokens.to_string()];
    v.extend(
        r.perplexity
            .iter()
            .chain(&r.kd)
            .chain(&r.agreement)
            .map(|x| format!("{x:.5}")),
    );
    csv_line(v)
}

/// Opens a CSV for appending; a fresh run (or a resumed one) keeps only rows up to `step`.
fn open_csv(path: &Path, header: &str, step: u64) -> anyhow::Result<File> {
    let kept: String = std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .skip(1)
        .filter(|l| {
            l.split(',')
                .next()
                .and_then(|s| s.parse::<u64>().ok())
                .is_some_and(|s| s <= step)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    let mut f = File::create(path).with_context(|| format!("writing {}", path.display()))?;
    f.write_all(header.as_bytes())?;
    f.write_all(kept.as_bytes())?;
    Ok(f)
}

fn train_loop(trainer: &mut Trainer, args: &UptrainArgs, roof: &Roofline) -> anyhow::Result<()> {
    let loops = trainer.model.loops();
    let per_loop = |name: &str| {
        (1..=loops)
            .map(|j| format!("{name}_loop{j}"))
            .collect::<Vec<_>>()
            .join(",")
    };
    let step0 = trainer.position.step;
    let mut steps_csv = open_csv(
        &args.out.join("train.csv"),
        &format!(
            "step,tokens,lr,objective,{},{},grad_norm,tokens_per_s\n",
            per_loop("ce"),
            per_loop("kd")
        ),
        step0,
    )?;
    let mut eval_csv = open_csv(
        &args.out.join("eval.csv"),
        &format!(
            "step,tokens,{},{},{}\n",
            per_loop("perplexity"),
            per_loop("kd"),
            per_loop("agreement")
        ),
        step0,
    )?;
    if step0 == 0 {
        let e = trainer.evaluate();
        eval_csv.write_all(eval_row(&e, 0).as_bytes())?;
        eprintln!(
            "step 0: held-out perplexity per loop {:?}",
            e.perplexity
                .iter()
                .map(|p| format!("{p:.2}"))
                .collect::<Vec<_>>()
        );
    }
    let stop = interrupted();
    let bar = bar(args.quiet, args.steps, "uptrain");
    bar.set_position(step0);
    while trainer.position.step < args.steps {
        let r = trainer.step()?;
        steps_csv.write_all(step_row(&r).as_bytes())?;
        let share = roof.flops_per_step / r.seconds / roof.peak;
        bar.set_message(format!(
            "loss {:.3} | {:.0} tok/s | {:.0}% of roofline",
            r.objective,
            r.tokens_per_s,
            100.0 * share
        ));
        bar.set_position(r.step);
        if args.quiet && r.step % 10 == 0 {
            eprintln!(
                "step {}: objective {:.4}, {:.0} tokens/s ({:.0}% of the matmul roofline)",
                r.step,
                r.objective,
                r.tokens_per_s,
                100.0 * share
            );
        }
        let last = r.step == args.steps;
        if r.step % args.eval_every.max(1) == 0 || last {
            let e = trainer.evaluate();
            eval_csv.write_all(eval_row(&e, r.tokens).as_bytes())?;
            bar.println(format!(
                "step {}: held-out perplexity per loop {:?}, agreement with the last loop {:?}",
                r.step,
                e.perplexity
                    .iter()
                    .map(|p| format!("{p:.2}"))
                    .collect::<Vec<_>>(),
                e.agreement
                    .iter()
                    .map(|a| format!("{:.1}%", 100.0 * a))
                    .collect::<Vec<_>>()
            ));
        }
        let interrupted = stop.load(Ordering::Relaxed);
        if r.step % args.checkpoint_every.max(1) == 0 || last || interrupted {
            trainer.checkpoint()?;
        }
        if interrupted {
            bar.abandon_with_message(format!(
                "interrupted at step {}: checkpoint written; --resume continues",
                r.step
            ));
            anyhow::bail!("interrupted");
        }
    }
    bar.finish_and_clear();
    Ok(())
}

/// The learned exits' trade-off on held-out text: per loop and threshold, the share of tokens
/// that would exit and the per-token agreement with the last loop it keeps.
fn report_exit_curve(e: &EvalRecord) {
    for (j, curve) in e.exit_curve.iter().enumerate() {
        if curve.is_empty() {
            continue;
        }
        eprintln!("learned exit after loop {} (held-out): threshold -> exit rate, agreement of exiting tokens, overall agreement", j + 1);
        for p in curve {
            eprintln!(
                "  {:.2} -> {:5.1}% exit, {:5.1}% agree, {:5.1}% overall",
                p.threshold,
                100.0 * p.exit_rate,
                100.0 * p.exit_agreement,
                100.0 * p.overall_agreement
            );
        }
    }
}

fn finish(
    trainer: &Trainer,
    tokenizer: &rrt_model::Tokenizer,
    args: &UptrainArgs,
) -> anyhow::Result<()> {
    let llama = trainer.model.to_llama()?;
    rrt_model::recursive::save::save(&llama, tokenizer, &args.out)?;
    let e = trainer.evaluate();
    let trained = format!(
        "rrt uptrain --train {} on {} for {} steps ({} tokens); held-out agreement of each loop's adapted exit with the last loop: {:?}",
        args.train,
        args.data.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(" "),
        trainer.position.step,
        trainer.position.tokens,
        e.agreement.iter().map(|a| format!("{:.1}%", 100.0 * a)).collect::<Vec<_>>()
    );
    if let Some(heads) = trainer.model.to_exit_heads(trained)? {
        heads.save(&args.out)?;
        report_exit_curve(&e);
    }
    let png = args.out.join("curves.png");
    match uptrain_plot::write(
        &args.out.join("train.csv"),
        &args.out.join("eval.csv"),
        &png,
        &args.font,
    ) {
        Ok(()) => eprintln!("curves: {}", png.display()),
        Err(e) => eprintln!("warning: no plot ({e:#})"),
    }
    eprintln!("model written to {}", args.out.display());
    Ok(())
}
