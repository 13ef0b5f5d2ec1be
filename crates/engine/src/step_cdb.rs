//! One step of continuous depth-wise batching: the shared block runs once over every unit in
//! flight, whatever loop it is at. Units are ordered by loop so each loop's rows are one
//! contiguous [`RowGroup`] (own LoRA, own KV layer); the shared projections run once for all.
//! After the block, each unit either goes on to its next loop, exits early (its exit policy is
//! confident; the K/V of the loops it skips are filled), or finishes its last loop; a token that
//! leaves samples at once and the sequence's next token enters at loop 0 in the next step, so a
//! slot never waits for slower neighbours.

use std::collections::HashMap;
use std::ops::Range;
use std::time::Instant;

use candle_core::Tensor;
use rayon::prelude::*;
use rrt_model::attention::AttnSegment;
use rrt_model::sampling::argmax;
use rrt_model::{FillRows, Llama, RowGroup};

use crate::engine::{Engine, EngineStats};
use crate::error::EngineError;
use crate::exit::{confidence, cosine, oracle_depth, ExitKind, ExitTrace, KvFill};
use crate::sequence::{Flight, PendingFill, Seq};

pub(crate) fn step(engine: &mut Engine) -> Result<usize, EngineError> {
    let Engine {
        model,
        cfg,
        running,
        trace,
        stats,
        ..
    } = engine;
    let model = &*model;
    let started = Instant::now();
    let (block, loops) = (model.block_layers(), model.loops());
    // Units already in flight keep their rows; new units (next token or prompt chunk) fill the
    // remaining row budget, decode tokens before prompt chunks.
    let mut budget = cfg.max_batch_rows;
    for s in running.iter() {
        if let Some(f) = &s.flight {
            budget = budget.saturating_sub(f.len);
        }
    }
    for pass_decode in [true, false] {
        for s in running.iter_mut() {
            let pending = s.pending();
            if s.flight.is_some() || pending == 0 || budget == 0 || (pending == 1) != pass_decode {
                continue;
            }
            let len = pending.min(budget);
            budget -= len;
            s.flight = Some(Flight {
                start: s.computed,
                len,
                next_loop: 0,
                hidden: None,
                argmaxes: Vec::new(),
            });
        }
    }
    // The batch in loop order (stable: arrival order within a loop).
    let mut order: Vec<usize> = (0..running.len())
        .filter(|&i| running[i].flight.is_some())
        .collect();
    order.sort_by_key(|&i| flight(&running[i]).next_loop);
    let fills = FillPlan::new(running, loops)?;
    if order.is_empty() {
        fills.write_alone(model, running)?;
        stats.time.block += started.elapsed();
        return Ok(0);
    }

    // Inputs: one embedding call for all units entering loop 0, carried hidden states for the
    // rest.
    let entering: Vec<u32> = order
        .iter()
        .map(|&i| &running[i])
        .filter(|s| flight(s).hidden.is_none())
        .flat_map(|s| {
            let f = flight(s);
            s.tokens[f.start..f.start + f.len].iter().copied()
        })
        .collect();
    let mut parts = Vec::with_capacity(order.len() + 1);
    if !entering.is_empty() {
        parts.push(model.embed(&entering)?);
    }
    parts.extend(
        order
            .iter()
            .filter_map(|&i| flight(&running[i]).hidden.clone()),
    );
    let x_in = Tensor::cat(&parts, 0)?;
    let mut groups: Vec<(usize, Range<usize>)> = Vec::new();
    // Per running sequence: its unit's place in the batch and its rows.
    let mut unit_rows: Vec<Option<(usize, Range<usize>)>> = vec![None; running.len()];
    let mut row = 0;
    for (place, &i) in order.iter().enumerate() {
        let f = flight(&running[i]);
        match groups.last_mut() {
            Some((l, rows)) if *l == f.next_loop => rows.end += f.len,
            _ => groups.push((f.next_loop, row..row + f.len)),
        }
        unit_rows[i] = Some((place, row..row + f.len));
        row += f.len;
    }
    let rows = row;
    stats.loop_rows += rows as u64;
    stats.fill_rows += fills.rows.len() as u64;
    stats.last_rows_per_depth = (0..loops)
        .map(|l| {
            groups
                .iter()
                .filter(|(g, _)| *g == l)
                .map(|(_, r)| r.len())
                .sum()
        })
        .collect();

    let block_started = Instant::now();
    stats.time.gather += block_started - started;
    let mut x = x_in.clone();
    for k in 0..block {
        let row_groups: Vec<RowGroup> = groups
            .iter()
            .map(|(l, rows)| RowGroup {
                rows: rows.clone(),
                unrolled: l * block + k,
            })
            .collect();
        let fill_groups = fills.groups(block, k);
        // Each sequence lends its cache layer for its unit's loop, and the layers its pending
        // fill skipped; split borrows of one sequence's layers, walked in running order.
        let mut unit_segments: Vec<Option<AttnSegment<'_>>> =
            (0..order.len()).map(|_| None).collect();
        let mut fill_segments = Vec::with_capacity(fills.rows.len());
        for (s, unit) in running.iter_mut().zip(&unit_rows) {
            let unit_loop = s.flight.as_ref().map(|f| (f.next_loop, f.start));
            let fill = s.fill.as_ref().map(|f| (f.done, f.position));
            // Shared layer k at loop j is unrolled layer j * block + k.
            for (j, cache) in s.cache.layers.iter_mut().skip(k).step_by(block).enumerate() {
                match (unit, unit_loop, fill) {
                    (Some((place, rows)), Some((l, start)), _) if l == j => {
                        unit_segments[*place] = Some(AttnSegment {
                            rows: rows.clone(),
                            start,
                            cache,
                        });
                    }
                    (_, _, Some((done, position))) if j >= done => {
                        let r = fill_segments.len();
                        fill_segments.push(AttnSegment {
                            rows: r..r + 1,
                            start: position,
                            cache,
                        });
                    }
                    _ => {}
                }
            }
        }
        let mut segments: Vec<AttnSegment<'_>> = unit_segments
            .into_iter()
            .map(|s| s.expect("every unit has its layer"))
            .collect();
        let fill = fills.h.as_ref().map(|h| FillRows {
            h,
            groups: &fill_groups,
            segments: &mut fill_segments,
        });
        x = model.layer_forward_filling(&row_groups, &x, &mut segments, fill)?;
    }
    for s in running.iter_mut() {
        s.fill = None;
    }
    let decide_started = Instant::now();
    stats.time.block += decide_started - block_started;
    let mut slots: Vec<Option<&mut Seq>> = running.iter_mut().map(Some).collect();
    let mut batch: Vec<&mut Seq> = order
        .iter()
        .map(|&i| slots[i].take().expect("each unit once"))
        .collect();
    let head_before = stats.time.head;
    after_block(model, cfg.kv_fill, &mut batch, &x_in, &x, trace, stats)?;
    // The exit head is timed inside; the rest of the step is deciding and sampling.
    stats.time.decide += decide_started
        .elapsed()
        .saturating_sub(stats.time.head - head_before);
    Ok(rows)
}

/// The K/V rows early exits of the previous step left to write (state propagation): one row
/// per (exited token, skipped loop), in running order then loop order, written by this step's
/// block pass alongside its own rows.
struct FillPlan {
    /// `(running index, loop)` per row.
    rows: Vec<(usize, usize)>,
    /// The exit hidden state of each row.
    h: Option<Tensor>,
}

impl FillPlan {
    fn new(running: &[Seq], loops: usize) -> Result<Self, EngineError> {
        let mut rows = Vec::new();
        let mut parts = Vec::new();
        for (i, s) in running.iter().enumerate() {
            if let Some(f) = &s.fill {
                for j in f.done..loops {
                    rows.push((i, j));
                    parts.push(f.hidden.clone());
                }
            }
        }
        let h = if parts.is_empty() {
            None
        } else {
            Some(Tensor::cat(&parts, 0)?)
        };
        Ok(Self { rows, h })
    }

    /// Row groups of shared layer `k`: consecutive rows at the same loop share a group.
    fn groups(&self, block: usize, k: usize) -> Vec<RowGroup> {
        let mut groups: Vec<RowGroup> = Vec::new();
        for (r, &(_, j)) in self.rows.iter().enumerate() {
            let unrolled = j * block + k;
            match groups.last_mut() {
                Some(g) if g.unrolled == unrolled => g.rows.end += 1,
                _ => groups.push(RowGroup {
                    rows: r..r + 1,
                    unrolled,
                }),
            }
        }
        groups
    }

    /// Writes the fills without a batch to ride along (a step with no units in flight).
    fn write_alone(&self, model: &Llama, running: &mut [Seq]) -> Result<(), EngineError> {
        let Some(h) = &self.h else { return Ok(()) };
        let block = model.block_layers();
        for k in 0..block {
            let mut segments = Vec::with_capacity(self.rows.len());
            for s in running.iter_mut() {
                let Some(fill) = &s.fill else { continue };
                let (done, position) = (fill.done, fill.position);
                for cache in s
                    .cache
                    .layers
                    .iter_mut()
                    .skip(done * block + k)
                    .step_by(block)
                {
                    let r = segments.len();
                    segments.push(AttnSegment {
                        rows: r..r + 1,
                        start: position,
                        cache,
                    });
                }
            }
            model.fill_kv(h, &self.groups(block, k), &mut segments)?;
        }
        for s in running.iter_mut() {
            s.fill = None;
        }
        Ok(())
    }
}

fn flight(s: &Seq) -> &Flight {
    s.flight.as_ref().expect("in flight")
}

/// What happens to a unit after this step's pass through the block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Goes on to its next loop.
    Continue,
    /// Leaves the block: after its last loop, or early (exit policy); samples if it is the
    /// sequence's newest token.
    Leave,
}

impl Outcome {
    fn exit_if(exit: bool) -> Self {
        if exit {
            Outcome::Leave
        } else {
            Outcome::Continue
        }
    }
}

/// Decides, for every unit, whether it continues, exits early or finished its last loop; fills
/// the skipped K/V of early exits; samples the tokens of those that leave.
fn after_block(
    model: &Llama,
    kv_fill: KvFill,
    batch: &mut [&mut Seq],
    x_in: &Tensor,
    x: &Tensor,
    trace: &mut ExitTrace,
    stats: &mut EngineStats,
) -> Result<(), EngineError> {
    let loops = model.loops();
    // Each unit's last row (the one whose logits matter) and its loop count after this step.
    let mut last_rows = Vec::with_capacity(batch.len());
    let mut row = 0;
    for s in batch.iter_mut() {
        let f = s.flight.as_mut().expect("in flight");
        f.next_loop += 1;
        row += f.len;
        last_rows.push(row - 1);
    }
    // Decide what can be decided without the exit head: last loops leave, prompt chunks go on,
    // replay, cosine and no-exit policies decide alone. The rest read the head's logits.
    let mut outcome: Vec<Option<Outcome>> = Vec::with_capacity(batch.len());
    for (i, s) in batch.iter().enumerate() {
        let f = flight(s);
        let done = f.next_loop;
        let decided = if done == loops {
            Some(Outcome::Leave)
        } else if let Some(index) = s.generated_index(f.start, f.len) {
            let r = last_rows[i];
            match s.exit.kind {
                ExitKind::None => Some(Outcome::Continue),
                ExitKind::Replay => Some(Outcome::exit_if(trace.get(s.id, index) == Some(done))),
                ExitKind::Cosine => {
                    let a = x_in.narrow(0, r, 1)?.flatten_all()?.to_vec1::<f32>()?;
                    let b = x.narrow(0, r, 1)?.flatten_all()?.to_vec1::<f32>()?;
                    Some(Outcome::exit_if(cosine(&a, &b) >= s.exit.threshold))
                }
                ExitKind::MaxProb | ExitKind::Margin | ExitKind::Oracle => None,
            }
        } else {
            Some(Outcome::Continue)
        };
        outcome.push(decided);
    }
    // One exit-head call per step (its weight is read once, not once per purpose): the units a
    // policy must read, and the leaving units that sample (the last chunk of a prompt, or a
    // generated token; a prompt chunk that is not the last samples nothing).
    let needs_logits: Vec<usize> = (0..batch.len())
        .filter(|&i| match outcome[i] {
            None => true,
            Some(Outcome::Leave) => {
                let f = flight(batch[i]);
                f.start + f.len == batch[i].tokens.len()
            }
            Some(Outcome::Continue) => false,
        })
        .collect();
    let logits = head(model, x, &needs_logits, &last_rows, stats)?;
    // Confidence reads a softmax over the whole vocabulary per row: on the compute pool, not
    // one row after another on the engine thread.
    let kinds: Vec<ExitKind> = batch.iter().map(|s| s.exit.kind).collect();
    let confidences: HashMap<usize, (f32, f32)> = needs_logits
        .par_iter()
        .filter(|&&i| {
            outcome[i].is_none() && matches!(kinds[i], ExitKind::MaxProb | ExitKind::Margin)
        })
        .map(|&i| (i, confidence(&logits[&i])))
        .collect();
    let outcome: Vec<Outcome> = outcome
        .into_iter()
        .enumerate()
        .map(|(i, decided)| {
            if let Some(o) = decided {
                return o;
            }
            let s = &mut batch[i];
            let row = &logits[&i];
            let threshold = s.exit.threshold;
            match s.exit.kind {
                ExitKind::MaxProb => Outcome::exit_if(confidences[&i].0 >= threshold),
                ExitKind::Margin => Outcome::exit_if(confidences[&i].1 >= threshold),
                _ => {
                    // The oracle records the argmax and runs on to full depth.
                    let f = s.flight.as_mut().expect("in flight");
                    f.argmaxes.push(argmax(row));
                    Outcome::Continue
                }
            }
        })
        .collect();

    let mut copies = Vec::new();
    let mut row = 0;
    for (i, s) in batch.iter_mut().enumerate() {
        let f = s.flight.as_mut().expect("in flight");
        let unit = row..row + f.len;
        row += f.len;
        match outcome[i] {
            Outcome::Continue => f.hidden = Some(x.narrow(0, unit.start, unit.len())?),
            Outcome::Leave => {
                let f = s.flight.take().expect("in flight");
                let done = f.next_loop;
                s.computed = f.start + f.len;
                // A prompt chunk that is not the last samples nothing (and has no logits).
                if s.computed == s.tokens.len() {
                    let row_logits = &logits[&i];
                    if let (Some(index), ExitKind::Oracle) =
                        (s.generated_index(f.start, f.len), s.exit.kind)
                    {
                        let mut argmaxes = f.argmaxes;
                        argmaxes.push(argmax(row_logits));
                        trace.insert(s.id, index, oracle_depth(&argmaxes));
                    }
                    // The exit histogram counts streamed tokens (not a stop token).
                    if s.on_logits(row_logits, done) {
                        stats.count_exit(done);
                    }
                }
                // The loops an early exit skipped need K/V only if the sequence goes on.
                if done < loops && !s.done {
                    match kv_fill {
                        KvFill::Propagate => {
                            s.fill = Some(PendingFill {
                                hidden: x.narrow(0, unit.start, 1)?,
                                position: f.start,
                                done,
                            })
                        }
                        KvFill::Copy => copies.push((i, f.start, done)),
                    }
                }
            }
        }
    }
    for (i, position, done) in copies {
        copy_skipped(model.block_layers(), loops, batch[i], position, done);
    }
    Ok(())
}

/// Exit-head logits of the given units' last rows, by unit index (timed and counted).
fn head(
    model: &Llama,
    x: &Tensor,
    units: &[usize],
    last_rows: &[usize],
    stats: &mut EngineStats,
) -> Result<HashMap<usize, Vec<f32>>, EngineError> {
    if units.is_empty() {
        return Ok(HashMap::new());
    }
    let started = Instant::now();
    let idx: Vec<u32> = units.iter().map(|&i| last_rows[i] as u32).collect();
    let rows = x.index_select(&Tensor::new(idx.as_slice(), x.device())?, 0)?;
    let logits = model.logits(&rows)?.to_vec2::<f32>()?;
    stats.head_rows += units.len() as u64;
    stats.time.head += started.elapsed();
    Ok(units.iter().copied().zip(logits).collect())
}

/// KV copy: the loops `done..` at `position` reuse the K/V of the exit loop.
fn copy_skipped(block: usize, loops: usize, s: &mut Seq, position: usize, done: usize) {
    for k in 0..block {
        let src = &s.cache.layers[(done - 1) * block + k];
        let (kk, vv) = (src.k_at(position), src.v_at(position).to_vec());
        for j in done..loops {
            let dst = &mut s.cache.layers[j * block + k];
            dst.truncate(position);
            dst.push(&kk, &vv);
        }
    }
}
