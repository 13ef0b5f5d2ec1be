//! The decide half of a depth-wise step: one [`Decision`] per unit from what is known without
//! logits (last loop, prompt chunk, or a policy that needs no exit head), then one exit-head
//! call for the units a policy reads and the leaving units that sample, which turns every
//! decision into an [`Outcome`].

use std::time::Instant;

use candle_core::Tensor;
use rayon::prelude::*;
use rrt_model::Llama;

use super::plan::{StepPlan, Unit};
use crate::error::EngineError;
use crate::exit::{cosine, Signals, Verdict};
use crate::sequence::Seq;
use crate::stats::EngineStats;
use crate::trace::ExitTrace;

/// What a unit does after this step's pass, as far as it is known before the exit head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Decision {
    /// Runs its next loop in a later step.
    Continue,
    /// Leaves early: its policy is confident after `after` loops.
    Exit { after: usize },
    /// Ran the last loop.
    Finish,
    /// Its policy reads the exit head's logits to decide.
    NeedsHead,
}

/// What a unit does, decided.
pub(super) enum Outcome {
    Continue,
    /// Leaves the block after `after` loops; `logits` (of its last row) when it samples.
    Leave {
        after: usize,
        logits: Option<Vec<f32>>,
    },
}

/// What a policy reads of one row: its hidden state before and after the pass.
struct RowSignals<'a> {
    model: &'a Llama,
    row: usize,
    /// Loops the row has run after this pass.
    after: usize,
    x_in: &'a Tensor,
    x: &'a Tensor,
}

impl RowSignals<'_> {
    fn row_of(&self, t: &Tensor) -> Result<Vec<f32>, EngineError> {
        Ok(t.narrow(0, self.row, 1)?.flatten_all()?.to_vec1::<f32>()?)
    }
}

impl Signals<EngineError> for RowSignals<'_> {
    fn cosine(&self) -> Result<f32, EngineError> {
        Ok(cosine(&self.row_of(self.x_in)?, &self.row_of(self.x)?))
    }

    fn exit_probability(&self) -> Result<Option<f32>, EngineError> {
        Ok(self
            .model
            .exit_probability(self.after, &self.row_of(self.x)?))
    }
}

/// The decision of each unit of `plan` (in unit order) after the pass `x_in` -> `x`.
pub(super) fn decide(
    model: &Llama,
    running: &[Seq],
    plan: &StepPlan,
    trace: &ExitTrace,
    (x_in, x): (&Tensor, &Tensor),
) -> Result<Vec<Decision>, EngineError> {
    let loops = model.loops();
    plan.units
        .iter()
        .map(|u| {
            let s = &running[u.seq];
            let after = u.flight.loops_done + 1;
            if after == loops {
                return Ok(Decision::Finish);
            }
            // Prompt chunks never exit: their K/V is needed at every loop.
            let Some(index) = s.generated_index(&u.flight) else {
                return Ok(Decision::Continue);
            };
            let signals = RowSignals {
                model,
                row: u.last_row(),
                after,
                x_in,
                x,
            };
            Ok(
                match s.exit.verdict(trace, (s.id, index), after, &signals)? {
                    Verdict::Stay => Decision::Continue,
                    Verdict::Leave => Decision::Exit { after },
                    Verdict::ReadHead => Decision::NeedsHead,
                },
            )
        })
        .collect()
}

/// Runs the exit head once for every unit that needs logits and settles each decision.
pub(super) fn settle(
    model: &Llama,
    running: &[Seq],
    plan: &StepPlan,
    decisions: Vec<Decision>,
    x: &Tensor,
    (trace, stats): (&mut ExitTrace, &mut EngineStats),
) -> Result<Vec<Outcome>, EngineError> {
    let units = &plan.units;
    let wants: Vec<bool> = units
        .iter()
        .zip(&decisions)
        .map(|(u, d)| match d {
            Decision::NeedsHead => true,
            Decision::Exit { .. } | Decision::Finish => running[u.seq].samples_after(&u.flight),
            Decision::Continue => false,
        })
        .collect();
    let logits = head(model, x, units, &wants, stats)?;
    // Policies read their rows' logits on the compute pool (a softmax over the vocabulary each).
    let policies: Vec<_> = units.iter().map(|u| running[u.seq].exit).collect();
    let exits: Vec<bool> = (&decisions, &logits, &policies)
        .into_par_iter()
        .map(|(d, l, p)| *d == Decision::NeedsHead && l.as_deref().is_some_and(|l| p.exits_on(l)))
        .collect();
    let settled = units.iter().zip(decisions).zip(logits).zip(exits);
    Ok(settled
        .map(|(((u, d), logits), exit)| {
            let after = u.flight.loops_done + 1;
            // A constrained token leaves early only on a token its grammar allows.
            let allowed = || {
                let s = &running[u.seq];
                match (&s.constraint, &logits) {
                    (Some(c), Some(l)) if s.samples_after(&u.flight) => {
                        c.allows_exit(rrt_model::sampling::argmax(l))
                    }
                    _ => true,
                }
            };
            match d {
                Decision::Continue => Outcome::Continue,
                Decision::Exit { after } if allowed() => Outcome::Leave { after, logits },
                Decision::Exit { .. } => Outcome::Continue,
                Decision::Finish => Outcome::Leave { after, logits },
                Decision::NeedsHead if exit && allowed() => Outcome::Leave { after, logits },
                Decision::NeedsHead => {
                    let s = &running[u.seq];
                    if let (Some(index), Some(l)) = (s.generated_index(&u.flight), &logits) {
                        s.exit.observe(trace, (s.id, index), l);
                    }
                    Outcome::Continue
                }
            }
        })
        .collect())
}

/// Rows that leave before the last loop go through that loop's exit adapter (when the model
/// has learned exit heads) before the shared final norm and head.
fn adapt_early_exits(
    model: &Llama,
    units: &[Unit],
    wants: &[bool],
    picked: Tensor,
) -> Result<Tensor, EngineError> {
    if model.exit_heads.is_none() {
        return Ok(picked);
    }
    let afters = units
        .iter()
        .zip(wants)
        .filter(|(_, &w)| w)
        .map(|(u, _)| u.flight.loops_done + 1);
    let rows: Vec<Tensor> = afters
        .enumerate()
        .map(|(i, after)| model.exit_input(after, &picked.narrow(0, i, 1)?))
        .collect::<Result<_, _>>()?;
    Ok(Tensor::cat(&rows, 0)?)
}

/// Exit-head logits of the last row of each unit that `wants` them (`None` for the others);
/// one call, so the head's weight is read once per step. Timed and counted.
fn head(
    model: &Llama,
    x: &Tensor,
    units: &[Unit],
    wants: &[bool],
    stats: &mut EngineStats,
) -> Result<Vec<Option<Vec<f32>>>, EngineError> {
    let rows: Vec<u32> = units
        .iter()
        .zip(wants)
        .filter(|(_, &w)| w)
        .map(|(u, _)| u.last_row() as u32)
        .collect();
    if rows.is_empty() {
        return Ok(vec![None; units.len()]);
    }
    let started = Instant::now();
    let picked = x.index_select(&Tensor::new(rows.as_slice(), x.device())?, 0)?;
    let picked = adapt_early_exits(model, units, wants, picked)?;
    let mut logits = model.logits(&picked)?.to_vec2::<f32>()?.into_iter();
    stats.head_rows += rows.len() as u64;
    stats.time.head += started.elapsed();
    Ok(wants
        .iter()
        .map(|&w| if w { logits.next() } else { None })
        .collect())
}
