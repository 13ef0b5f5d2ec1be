//! `rrt uptrain`: trains a converted model (its LoRA and norms, all of it, or only the exit
//! heads) by distillation from its source model with the early-exit loss, and writes a model
//! directory every command loads. The run itself is `rrt_train::uptrain`; this module parses
//! the flags, shows the run's events as a progress bar (loss, tokens/s, share of the matmul
//! roofline, ETA) or log lines, turns Ctrl-C and SIGTERM into the run's stop flag (a checkpoint
//! `--resume` continues from), and draws the curves' PNG.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use rrt_train::uptrain::{self, Event, Options};
use rrt_train::{LossWeights, Precision, TrainError};

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
    /// Precision of the matrix products: f32, or bf16 operands with f32 accumulation (master
    /// weights and optimizer state stay f32; twice the multiply-adds per instruction on
    /// AVX512_BF16 CPUs, no faster elsewhere).
    #[arg(long, default_value_t = Precision::F32)]
    dtype: Precision,
    /// Quiet: no progress bar (tests, logs).
    #[arg(long)]
    quiet: bool,
}

impl UptrainArgs {
    fn options(&self) -> Options {
        Options {
            model: self.model.clone(),
            data: self.data.clone(),
            out: self.out.clone(),
            teacher: self.teacher.clone(),
            train: self.train.clone(),
            adapter_rank: self.adapter_rank,
            exit_fit_windows: self.exit_fit_windows,
            exit_fit_ridge: self.exit_fit_ridge,
            classifier_fit_windows: self.classifier_fit_windows,
            eval_data: self.eval_data.clone(),
            eval_windows: self.eval_windows,
            seq_len: self.seq_len,
            batch_seqs: self.batch_seqs,
            accum: self.accum,
            steps: self.steps,
            lr: self.lr,
            warmup: self.warmup,
            lr_floor: self.lr_floor,
            clip: self.clip,
            weight_decay: self.weight_decay,
            seed: self.seed,
            loss: LossWeights {
                ce: self.ce_weight,
                kd: self.kd_weight,
                temperature: self.temperature,
                exit_weight: self.exit_weight,
                self_kd: self.self_kd_weight,
                classifier: self.classifier_weight,
            },
            top_k: self.top_k,
            teacher_cache: self.teacher_cache.clone(),
            eval_every: self.eval_every,
            checkpoint_every: self.checkpoint_every,
            resume: self.resume,
            precision: self.dtype,
        }
    }
}

pub fn run(args: UptrainArgs) -> anyhow::Result<()> {
    rrt_model::runtime::keep_freed_memory();
    let stop = interrupted();
    let view = View::new(args.quiet, &args.out, &args.font);
    let result = uptrain::run(&args.options(), &|e| view.show(e), &stop);
    view.done();
    // A finished run and an interrupted one (which saved the model so far) both get the plot.
    if matches!(result, Ok(_) | Err(TrainError::Interrupted { .. })) {
        let png = args.out.join("curves.png");
        let (train, eval) = (args.out.join("train.csv"), args.out.join("eval.csv"));
        match uptrain_plot::write(&train, &eval, &png, &args.font) {
            Ok(()) => eprintln!("curves: {}", png.display()),
            Err(e) => eprintln!("warning: no plot ({e:#})"),
        }
    }
    result?;
    eprintln!("model written to {}", args.out.display());
    Ok(())
}

/// A run's events on the terminal: a progress bar per phase, or lines when quiet.
struct View {
    quiet: bool,
    bar: RefCell<ProgressBar>,
    /// Where the curves are redrawn every [`PLOT_EVERY`] steps (the run's directory) and the
    /// font, so a long background run's plot stays current.
    plot: (PathBuf, PathBuf),
}

/// Optimizer steps between redraws of `curves.png` during a run.
const PLOT_EVERY: u64 = 50;

impl View {
    fn new(quiet: bool, out: &Path, font: &Path) -> Self {
        Self {
            quiet,
            bar: RefCell::new(ProgressBar::hidden()),
            plot: (out.to_path_buf(), font.to_path_buf()),
        }
    }

    /// Draws `curves.png` from the run's CSVs as they are now.
    fn redraw(&self) {
        let out = &self.plot.0;
        let (train, eval) = (out.join("train.csv"), out.join("eval.csv"));
        if let Err(e) = uptrain_plot::write(&train, &eval, &out.join("curves.png"), &self.plot.1) {
            self.show(Event::Line(format!(
                "warning: curves.png not redrawn ({e:#})"
            )));
        }
    }

    fn bar(&self, len: u64, what: &str) -> ProgressBar {
        if self.quiet {
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

    fn show(&self, e: Event<'_>) {
        match e {
            Event::Line(line) => {
                let bar = self.bar.borrow();
                if bar.is_hidden() {
                    eprintln!("{line}");
                } else {
                    bar.println(line);
                }
            }
            Event::Phase { what, total } => *self.bar.borrow_mut() = self.bar(total, &what),
            Event::Advance(done) => self.bar.borrow().set_position(done),
            Event::PhaseDone => self.done(),
            Event::Training { step, steps } => {
                let bar = self.bar(steps, "uptrain");
                bar.set_position(step);
                *self.bar.borrow_mut() = bar;
            }
            Event::Step {
                record: r,
                roofline,
            } => {
                let bar = self.bar.borrow();
                bar.set_message(format!(
                    "loss {:.3} | {:.0} tok/s | {:.0}% of roofline",
                    r.objective,
                    r.tokens_per_s,
                    100.0 * roofline
                ));
                bar.set_position(r.step);
                drop(bar);
                if r.step % PLOT_EVERY == 0 {
                    self.redraw();
                }
                if self.quiet && r.step % 10 == 0 {
                    let p = &r.parts;
                    eprintln!(
                        "step {}: objective {:.4}, {:.0} tokens/s ({:.0}% of the matmul roofline); s by part: teacher {:.2}, data {:.2}, forward {:.2}, heads {:.2}, backward {:.2}, optimizer {:.2}",
                        r.step,
                        r.objective,
                        r.tokens_per_s,
                        100.0 * roofline,
                        p.teacher,
                        p.data,
                        p.forward,
                        p.heads,
                        p.backward,
                        p.optimizer
                    );
                }
            }
        }
    }

    fn done(&self) {
        let bar = std::mem::replace(&mut *self.bar.borrow_mut(), ProgressBar::hidden());
        bar.finish_and_clear();
    }
}

/// Ctrl-C or SIGTERM, as a flag the run checks between steps.
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
