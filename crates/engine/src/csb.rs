//! One step of sequence-wise batching (continuous, or static when admission waits for an empty
//! batch): every sequence's pending tokens (its last sampled token, or the next prompt chunk)
//! go through all loops in one forward. Plan (tokens per sequence), forward, commit.

use std::time::Instant;

use rrt_model::{BatchItem, Logits};

use crate::error::EngineError;
use crate::sequence::Seq;
use crate::stats::EngineStats;
use crate::step::{decode_first, StepCtx};

/// Advances each sequence by the tokens it ran; those that sample take their logits row (one
/// per sampling sequence, in running order) and stream the next token.
fn commit(
    running: &mut [Seq],
    takes: &[usize],
    samples: &[bool],
    logits: &[Vec<f32>],
    loops: usize,
    stats: &mut EngineStats,
) {
    let mut rows = logits.iter();
    for ((s, &n), &last) in running.iter_mut().zip(takes).zip(samples) {
        s.computed += n;
        if !last {
            continue;
        }
        if let Some(row) = rows.next() {
            let emitted = s.on_logits(row, loops, loops);
            for _ in 0..(emitted.sampled as usize + emitted.forced) {
                stats.count_exit(loops);
            }
        }
    }
}

/// Runs one step; returns the batch's rows.
pub(crate) fn step(ctx: &mut StepCtx<'_>) -> Result<usize, EngineError> {
    let started = Instant::now();
    let loops = ctx.model.loops();
    let takes = decode_first(ctx.running, |_| false, ctx.cfg.max_batch_rows);
    let total: usize = takes.iter().sum();
    if total == 0 {
        return Ok(0);
    }
    // Only a sequence's last chunk has logits (it samples).
    let samples: Vec<bool> = ctx
        .running
        .iter()
        .zip(&takes)
        .map(|(s, &n)| n > 0 && s.computed + n == s.tokens.len())
        .collect();
    let mut items: Vec<BatchItem<'_>> = ctx
        .running
        .iter_mut()
        .zip(&takes)
        .zip(&samples)
        .filter(|((_, &n), _)| n > 0)
        .map(|((s, &n), &last)| BatchItem {
            tokens: &s.tokens[s.computed..s.computed + n],
            offset: s.computed,
            cache: &mut s.kv,
            logits: if last { Logits::Last } else { Logits::None },
        })
        .collect();
    let forward_started = Instant::now();
    let logits = ctx.model.forward(ctx.kv, &mut items)?;
    drop(items);
    let logits = logits.to_vec2::<f32>()?;
    let decide_started = Instant::now();
    let stats = &mut *ctx.stats;
    stats.time.gather += forward_started - started;
    stats.time.block += decide_started - forward_started;
    stats.head_rows += logits.len() as u64;
    commit(ctx.running, &takes, &samples, &logits, loops, stats);
    stats.loop_rows += (total * loops) as u64;
    stats.last_rows_per_depth = vec![total];
    stats.time.decide += decide_started.elapsed();
    Ok(total)
}
