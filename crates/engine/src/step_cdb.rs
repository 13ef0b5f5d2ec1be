//! One step of continuous depth-wise batching: the shared block runs once over every unit in
//! flight, whatever loop it is at. Units are ordered by loop so each loop's rows are one
//! contiguous [`RowGroup`] (own LoRA, own KV layer); the shared projections run once for all.
//! A unit that completes its last loop samples its token and the sequence's next token enters at
//! loop 0 in the next step, so a slot never waits for slower neighbours.

use candle_core::Tensor;
use rrt_model::attention::AttnSegment;
use rrt_model::RowGroup;

use crate::engine::Engine;
use crate::error::EngineError;
use crate::sequence::Flight;

pub(crate) fn step(engine: &mut Engine) -> Result<usize, EngineError> {
    let model = &engine.model;
    let (block, loops) = (model.block_layers(), model.loops());
    // Units already in flight keep their rows; new units (next token or prompt chunk) fill the
    // remaining row budget, decode tokens before prompt chunks.
    let mut budget = engine.cfg.max_batch_rows;
    for s in engine.running.iter() {
        if let Some(f) = &s.flight {
            budget = budget.saturating_sub(f.len);
        }
    }
    for pass_decode in [true, false] {
        for s in engine.running.iter_mut() {
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
            });
        }
    }
    let mut batch: Vec<_> = engine
        .running
        .iter_mut()
        .filter(|s| s.flight.is_some())
        .collect();
    if batch.is_empty() {
        return Ok(0);
    }
    batch.sort_by_key(|s| s.flight.as_ref().map_or(0, |f| f.next_loop));

    // Inputs: carried hidden states, or embeddings for units entering loop 0.
    let mut parts = Vec::with_capacity(batch.len());
    for s in batch.iter() {
        let f = s.flight.as_ref().expect("filtered");
        parts.push(match &f.hidden {
            Some(h) => h.clone(),
            None => model.embed(&s.tokens[f.start..f.start + f.len])?,
        });
    }
    let mut x = Tensor::cat(&parts, 0)?;
    let mut groups: Vec<(usize, std::ops::Range<usize>)> = Vec::new();
    let mut row = 0;
    for s in batch.iter() {
        let f = s.flight.as_ref().expect("filtered");
        match groups.last_mut() {
            Some((l, rows)) if *l == f.next_loop => rows.end += f.len,
            _ => groups.push((f.next_loop, row..row + f.len)),
        }
        row += f.len;
    }
    let rows = row;

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
                let f = s.flight.as_ref().expect("filtered");
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

    // Every unit advanced one loop; those past the last loop produce their token.
    let mut row = 0;
    let mut exits = Vec::new();
    for (i, s) in batch.iter_mut().enumerate() {
        let f = s.flight.as_mut().expect("filtered");
        let unit_rows = row..row + f.len;
        row += f.len;
        f.next_loop += 1;
        if f.next_loop < loops {
            f.hidden = Some(x.narrow(0, unit_rows.start, unit_rows.len())?);
        } else {
            exits.push((i, unit_rows.end - 1));
        }
    }
    if !exits.is_empty() {
        let idx: Vec<u32> = exits.iter().map(|&(_, r)| r as u32).collect();
        let last_rows = x.index_select(&Tensor::new(idx.as_slice(), x.device())?, 0)?;
        let logits = model.logits(&last_rows)?.to_vec2::<f32>()?;
        for ((i, _), row) in exits.into_iter().zip(logits) {
            let s = &mut batch[i];
            let f = s.flight.take().expect("in flight");
            s.computed = f.start + f.len;
            // A prompt chunk that is not the last samples nothing.
            if s.computed == s.tokens.len() {
                s.on_logits(&row, loops);
            }
        }
    }
    Ok(rows)
}
