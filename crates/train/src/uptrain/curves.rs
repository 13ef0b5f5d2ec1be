//! The training loop of a run and the curves it leaves: `train.csv` (a row per optimizer step:
//! objective, per-loop losses, gradient norm, tokens/s and where the step's time went) and
//! `eval.csv` (a row per held-out evaluation: per-loop perplexity, distillation, agreement with
//! the last loop). A resumed run keeps the rows up to its checkpoint.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use super::{stopped, Event, Options};
use crate::error::{Result, TrainError};
use crate::roofline::Roofline;
use crate::trainer::{EvalRecord, StepRecord, Trainer};

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
    let p = &r.parts;
    v.extend(
        [p.data, p.forward, p.heads, p.backward, p.optimizer]
            .iter()
            .map(|s| format!("{s:.3}")),
    );
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
fn open_csv(path: &Path, header: &str, step: u64) -> Result<File> {
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
    let mut f = File::create(path).map_err(|e| TrainError::file(path, e))?;
    f.write_all(header.as_bytes())
        .and_then(|_| f.write_all(kept.as_bytes()))
        .map_err(|e| TrainError::file(path, e))?;
    Ok(f)
}

fn append(f: &mut File, path: &Path, row: &str) -> Result<()> {
    f.write_all(row.as_bytes())
        .map_err(|e| TrainError::file(path, e))
}

fn per_loop_line(what: &str, values: &[f64], fmt: impl Fn(f64) -> String) -> String {
    format!(
        "{what} {:?}",
        values.iter().map(|&v| fmt(v)).collect::<Vec<_>>()
    )
}

/// Steps until `o.steps` (or `stop`), evaluating and checkpointing as asked; returns the two
/// CSV paths.
pub(super) fn train_loop(
    trainer: &mut Trainer,
    o: &Options,
    roof: &Roofline,
    report: &dyn Fn(Event<'_>),
    stop: &AtomicBool,
) -> Result<(PathBuf, PathBuf)> {
    let loops = trainer.model.loops();
    let per_loop = |name: &str| {
        (1..=loops)
            .map(|j| format!("{name}_loop{j}"))
            .collect::<Vec<_>>()
            .join(",")
    };
    let step0 = trainer.position.step;
    let (train_path, eval_path) = (o.out.join("train.csv"), o.out.join("eval.csv"));
    let mut steps_csv = open_csv(
        &train_path,
        &format!(
            "step,tokens,lr,objective,{},{},grad_norm,tokens_per_s,data_s,forward_s,heads_s,backward_s,optimizer_s\n",
            per_loop("ce"),
            per_loop("kd")
        ),
        step0,
    )?;
    let mut eval_csv = open_csv(
        &eval_path,
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
        append(&mut eval_csv, &eval_path, &eval_row(&e, 0))?;
        report(Event::Line(per_loop_line(
            "step 0: held-out perplexity per loop",
            &e.perplexity,
            |p| format!("{p:.2}"),
        )));
    }
    report(Event::Training {
        step: step0,
        steps: o.steps,
    });
    while trainer.position.step < o.steps {
        let r = trainer.step()?;
        append(&mut steps_csv, &train_path, &step_row(&r))?;
        let share = roof.flops_per_step / r.seconds / roof.peak;
        report(Event::Step {
            record: &r,
            roofline: share,
        });
        let last = r.step == o.steps;
        if r.step % o.eval_every.max(1) == 0 || last {
            let e = trainer.evaluate();
            append(&mut eval_csv, &eval_path, &eval_row(&e, r.tokens))?;
            report(Event::Line(format!(
                "step {}: {}, {}",
                r.step,
                per_loop_line("held-out perplexity per loop", &e.perplexity, |p| format!(
                    "{p:.2}"
                )),
                per_loop_line("agreement with the last loop", &e.agreement, |a| format!(
                    "{:.1}%",
                    100.0 * a
                ))
            )));
        }
        let interrupted = stopped(stop);
        if r.step % o.checkpoint_every.max(1) == 0 || last || interrupted {
            trainer.checkpoint()?;
        }
        if interrupted {
            return Err(TrainError::Interrupted { step: r.step });
        }
    }
    Ok((train_path, eval_path))
}
