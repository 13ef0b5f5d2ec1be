//! One step of continuous depth-wise batching: the shared block runs once over every unit in
//! flight, whatever loop it is at. Units are ordered by loop so each loop's rows are one
//! contiguous [`RowGroup`] (own LoRA, own KV layer); the shared projections run once for all.
//! After the block, each unit either goes on to its next loop, exits early (its exit policy is
//! confident; the K/V of the loops it skips are filled), or finishes its last loop; a token that
//! leaves samples at once and the sequence's next token enters at loop 0 in the next step, so a
//! slot never waits for slower neighbours.

use std::collections::HashMap;

use candle_core::Tensor;
use rrt_model::attention::AttnSegment;
use rrt_model::sampling::argmax;
use rrt_model::{Llama, RowGroup};

use crate::engine::{Engine, EngineStats};
use crate::error::EngineError;
use crate::exit::{confidence, cosine, oracle_depth, ExitKind, ExitTrace, KvFill};
use crate::sequence::{Flight, Seq};

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
    let mut batch: Vec<&mut Seq> = running.iter_mut().filter(|s| s.flight.is_some()).collect();
    if batch.is_empty() {
        return Ok(0);
    }
    batch.sort_by_key(|s| flight(s).next_loop);

    // Inputs: carried hidden states, or embeddings for units entering loop 0.
    let mut parts = Vec::with_capacity(batch.len());
    for s in batch.iter() {
        let f = flight(s);
        parts.push(match &f.hidden {
            Some(h) => h.clone(),
            None => model.embed(&s.tokens[f.start..f.start + f.len])?,
        });
    }
    let x_in = Tensor::cat(&parts, 0)?;
    let mut groups: Vec<(usize, std::ops::Range<usize>)> = Vec::new();
    let mut row = 0;
    for s in batch.iter() {
        let f = flight(s);
        match groups.last_mut() {
            Some((l, rows)) if *l == f.next_loop => rows.end += f.len,
            _ => groups.push((f.next_loop, row..row + f.len)),
        }
        row += f.len;
    }
    let rows = row;
    stats.loop_rows += rows as u64;
    stats.last_rows_per_depth = (0..loops)
        .map(|l| {
            groups
                .iter()
                .filter(|(g, _)| *g == l)
                .map(|(_, r)| r.len())
                .sum()
        })
        .collect();

    let mut x = x_in.clone();
    for k in 0..block {
        let row_groups: Vec<RowGroup> = groups
            .iter()
            .map(|(l, rows)| RowGroup {
                rows: rows.clone(),
                unrolled: l * block + k,
            })
            .collect();
        let mut row = 0;
        let mut segments: Vec<AttnSegment<'_>> = batch
            .iter_mut()
            .map(|s| {
                let f = s.flight.as_ref().expect("in flight");
                let (start, len, layer) = (f.start, f.len, f.next_loop * block + k);
                let seg = AttnSegment {
                    rows: row..row + len,
                    start,
                    cache: &mut s.cache.layers[layer],
                };
                row += len;
                seg
            })
            .collect();
        x = model.layer_forward(&row_groups, &x, &mut segments)?;
    }
    after_block(model, cfg.kv_fill, &mut batch, &x_in, &x, trace, stats)?;
    Ok(rows)
}

fn flight(s: &Seq) -> &Flight {
    s.flight.as_ref().expect("in flight")
}

/// What happens to a unit after this step's pass through the block.
enum Outcome {
    /// Goes on to its next loop.
    Continue,
    /// Leaves the block: after its last loop, or early (exit policy); samples if it is the
    /// sequence's newest token.
    Leave,
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
    // Logits are needed for every unit that finished its last loop, and after intermediate
    // loops for generated tokens whose policy reads the exit head.
    let needs_logits: Vec<usize> = (0..batch.len())
        .filter(|&i| {
            let s = &batch[i];
            let f = flight(s);
            f.next_loop == loops
                || (s.generated_index(f.start, f.len).is_some() && s.exit.needs_logits())
        })
        .collect();
    let mut logits = head(model, x, &needs_logits, &last_rows)?;
    let mut outcome = Vec::with_capacity(batch.len());
    for (i, s) in batch.iter_mut().enumerate() {
        let f = s.flight.as_ref().expect("in flight");
        let done = f.next_loop;
        if done == loops {
            outcome.push(Outcome::Leave);
            continue;
        }
        let Some(index) = s.generated_index(f.start, f.len) else {
            outcome.push(Outcome::Continue);
            continue;
        };
        let r = last_rows[i];
        let exit = match s.exit.kind {
            ExitKind::None | ExitKind::Oracle => false,
            ExitKind::Replay => trace.get(s.id, index) == Some(done),
            ExitKind::Cosine => {
                let a = x_in.narrow(0, r, 1)?.flatten_all()?.to_vec1::<f32>()?;
                let b = x.narrow(0, r, 1)?.flatten_all()?.to_vec1::<f32>()?;
                cosine(&a, &b) >= s.exit.threshold
            }
            ExitKind::MaxProb => confidence(&logits[&i]).0 >= s.exit.threshold,
            ExitKind::Margin => confidence(&logits[&i]).1 >= s.exit.threshold,
        };
        if s.exit.kind == ExitKind::Oracle {
            let a = argmax(&logits[&i]);
            s.flight.as_mut().expect("in flight").argmaxes.push(a);
        }
        outcome.push(if exit {
            Outcome::Leave
        } else {
            Outcome::Continue
        });
    }
    // Early exits whose policy did not compute logits get them now.
    let missing: Vec<usize> = (0..batch.len())
        .filter(|i| matches!(outcome[*i], Outcome::Leave) && !logits.contains_key(i))
        .collect();
    logits.extend(head(model, x, &missing, &last_rows)?);

    let mut fills = Vec::new();
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
                if done < loops {
                    fills.push(Fill {
                        unit: i,
                        row: unit.start,
                        position: f.start,
                        done,
                    });
                }
                s.computed = f.start + f.len;
                let row_logits = &logits[&i];
                if let (Some(index), ExitKind::Oracle) =
                    (s.generated_index(f.start, f.len), s.exit.kind)
                {
                    let mut argmaxes = f.argmaxes;
                    argmaxes.push(argmax(row_logits));
                    trace.insert(s.id, index, oracle_depth(&argmaxes));
                }
                // A prompt chunk that is not the last samples nothing.
                if s.computed == s.tokens.len() {
                    s.on_logits(row_logits, done);
                    stats.count_exit(done);
                }
            }
        }
    }
    fill_skipped(model, kv_fill, batch, x, &fills)?;
    Ok(())
}

/// Exit-head logits of the given units' last rows, by unit index.
fn head(
    model: &Llama,
    x: &Tensor,
    units: &[usize],
    last_rows: &[usize],
) -> Result<HashMap<usize, Vec<f32>>, EngineError> {
    if units.is_empty() {
        return Ok(HashMap::new());
    }
    let idx: Vec<u32> = units.iter().map(|&i| last_rows[i] as u32).collect();
    let rows = x.index_select(&Tensor::new(idx.as_slice(), x.device())?, 0)?;
    let logits = model.logits(&rows)?.to_vec2::<f32>()?;
    Ok(units.iter().copied().zip(logits).collect())
}

/// A token that left before the last loop: the K/V of loops `done..` at `position` are missing.
struct Fill {
    /// Index in the step's batch.
    unit: usize,
    /// Its row in the block output (the exit hidden state).
    row: usize,
    position: usize,
    done: usize,
}

/// Fills the K/V every early-exited token of this step skipped. Propagation projects all exit
/// hidden states through each shared layer's K/V projection in one call per layer (rows grouped
/// by the unrolled layer they fill); copy reuses the exit loop's K/V.
fn fill_skipped(
    model: &Llama,
    mode: KvFill,
    batch: &mut [&mut Seq],
    x: &Tensor,
    fills: &[Fill],
) -> Result<(), EngineError> {
    if fills.is_empty() {
        return Ok(());
    }
    let (block, loops) = (model.block_layers(), model.loops());
    match mode {
        KvFill::Copy => {
            for fill in fills {
                let s = &mut batch[fill.unit];
                for k in 0..block {
                    let src = &s.cache.layers[(fill.done - 1) * block + k];
                    let (kk, vv) = (src.k_at(fill.position), src.v_at(fill.position).to_vec());
                    for j in fill.done..loops {
                        let dst = &mut s.cache.layers[j * block + k];
                        dst.truncate(fill.position);
                        dst.push(&kk, &vv);
                    }
                }
            }
        }
        KvFill::Propagate => {
            // One row per (exited token, skipped loop), token-major.
            let mut rows = Vec::new();
            for (e, fill) in fills.iter().enumerate() {
                for j in fill.done..loops {
                    rows.push((e, j));
                }
            }
            let idx: Vec<u32> = rows.iter().map(|&(e, _)| fills[e].row as u32).collect();
            let h = x.index_select(&Tensor::new(idx.as_slice(), x.device())?, 0)?;
            let mut by_unit: HashMap<usize, usize> = HashMap::new();
            for (e, fill) in fills.iter().enumerate() {
                by_unit.insert(fill.unit, e);
            }
            for k in 0..block {
                let groups: Vec<RowGroup> = rows
                    .iter()
                    .enumerate()
                    .map(|(r, &(_, j))| RowGroup {
                        rows: r..r + 1,
                        unrolled: j * block + k,
                    })
                    .collect();
                // Segments in row order: each exited sequence lends its layers j*K + k, j >= done.
                // Fills were recorded in batch order, so walking the batch lines segments up
                // with the rows.
                let mut segments = Vec::with_capacity(rows.len());
                let mut row = 0;
                for (u, s) in batch.iter_mut().enumerate() {
                    let Some(&e) = by_unit.get(&u) else { continue };
                    let fill = &fills[e];
                    for cache in s
                        .cache
                        .layers
                        .iter_mut()
                        .skip(fill.done * block + k)
                        .step_by(block)
                    {
                        segments.push(AttnSegment {
                            rows: row..row + 1,
                            start: fill.position,
                            cache,
                        });
                        row += 1;
                    }
                }
                model.fill_kv(&h, &groups, &mut segments)?;
            }
        }
    }
    Ok(())
}
