//! The commit half of a depth-wise step: each unit's [`Outcome`] applied to its sequence. A
//! continuing unit goes back to its sequence with its hidden states; a leaving one advances the
//! sequence, samples and streams the next token when it is the sequence's newest, and leaves
//! the K/V of the loops it skipped to be filled (state propagation, by the next step) or copies
//! the exit loop's (KV copy).

use candle_core::Tensor;
use rrt_model::{KvPool, Llama};

use super::decide::Outcome;
use super::plan::Unit;
use crate::error::EngineError;
use crate::exit::KvFill;
use crate::sequence::{Flight, PendingFill, Seq, Stage};
use crate::stats::EngineStats;
use crate::trace::ExitTrace;

/// Applies each unit's outcome; `x` is the block's output rows.
pub(super) fn commit(
    model: &Llama,
    (kv_fill, kv): (KvFill, &mut KvPool),
    running: &mut [Seq],
    units: Vec<Unit>,
    outcomes: Vec<Outcome>,
    x: &Tensor,
    (trace, stats): (&mut ExitTrace, &mut EngineStats),
) -> Result<(), EngineError> {
    for (unit, outcome) in units.into_iter().zip(outcomes) {
        let s = &mut running[unit.seq];
        let hidden = x.narrow(0, unit.rows.start, unit.rows.len())?;
        match outcome {
            Outcome::Continue => {
                if !s.is_done() {
                    s.stage = Stage::Carried(Flight {
                        loops_done: unit.flight.loops_done + 1,
                        hidden: Some(hidden),
                        ..unit.flight
                    });
                }
            }
            Outcome::Leave { after, logits } => {
                let loops = model.loops();
                leave(
                    s,
                    &unit.flight,
                    (after, loops),
                    logits.as_deref(),
                    (trace, stats),
                );
                if after < model.loops() && !s.is_done() {
                    s.exited_from = s.exited_from.min(unit.flight.start);
                    skipped_kv(model, (kv_fill, kv), s, &unit.flight, after, hidden)?;
                }
            }
        }
    }
    Ok(())
}

/// The unit's tokens are in the cache (at the loops it ran); with `logits`, the next token is
/// sampled and streamed.
fn leave(
    s: &mut Seq,
    unit: &Flight,
    (after, loops): (usize, usize),
    logits: Option<&[f32]>,
    (trace, stats): (&mut ExitTrace, &mut EngineStats),
) {
    s.computed = unit.end();
    let Some(logits) = logits else { return };
    if let Some(index) = s.generated_index(unit) {
        s.exit.close(trace, (s.id, index), logits);
    }
    // The exit histogram counts streamed tokens (not a stop token); forced ones run every loop.
    let emitted = s.on_logits(logits, after, loops);
    if emitted.sampled {
        stats.count_exit(after);
    }
    for _ in 0..emitted.forced {
        stats.count_exit(loops);
    }
}

/// The K/V of loops `after..` that an early exit skipped, needed since the sequence goes on.
fn skipped_kv(
    model: &Llama,
    (kv_fill, kv): (KvFill, &mut KvPool),
    s: &mut Seq,
    unit: &Flight,
    after: usize,
    hidden: Tensor,
) -> Result<(), EngineError> {
    match kv_fill {
        KvFill::Propagate => {
            s.fill = Some(PendingFill {
                hidden,
                position: unit.start,
                done: after,
            });
            Ok(())
        }
        KvFill::Copy => copy_skipped(model, kv, s, unit.start, after),
    }
}

/// KV copy: the loops `done..` at `position` reuse the K/V of the exit loop.
fn copy_skipped(
    model: &Llama,
    kv: &mut KvPool,
    s: &Seq,
    position: usize,
    done: usize,
) -> Result<(), EngineError> {
    let (block, loops) = (model.block_layers(), model.loops());
    for k in 0..block {
        let (kk, vv) = kv.read(&s.kv, (done - 1) * block + k, position)?;
        for j in done..loops {
            kv.write(&s.kv, j * block + k, position, &kk, &vv)?;
        }
    }
    Ok(())
}
