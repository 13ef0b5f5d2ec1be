//! One step of sequence-wise batching (continuous, or static when admission waits for an empty
//! batch): every sequence's pending tokens — its last sampled token, or the next prompt chunk —
//! go through all loops in one forward.

use std::time::Instant;

use rrt_model::{BatchItem, Logits};

use crate::engine::Engine;
use crate::error::EngineError;

pub(crate) fn step(engine: &mut Engine) -> Result<usize, EngineError> {
    let started = Instant::now();
    let model = &engine.model;
    let loops = model.loops();
    let mut budget = engine.cfg.max_batch_rows;
    // Decode rows first (one each), then prompt chunks with what is left.
    let mut takes: Vec<usize> = vec![0; engine.running.len()];
    for (i, s) in engine.running.iter().enumerate() {
        if s.pending() == 1 && budget > 0 {
            takes[i] = 1;
            budget -= 1;
        }
    }
    for (i, s) in engine.running.iter().enumerate() {
        if s.pending() > 1 && budget > 0 {
            takes[i] = s.pending().min(budget);
            budget -= takes[i];
        }
    }
    let mut items = Vec::new();
    let mut wants_logits = Vec::new();
    for (i, s) in engine.running.iter_mut().enumerate() {
        let n = takes[i];
        if n == 0 {
            continue;
        }
        let last = s.computed + n == s.tokens.len();
        wants_logits.push((i, last));
        items.push(BatchItem {
            tokens: &s.tokens[s.computed..s.computed + n],
            offset: s.computed,
            cache: &mut s.cache,
            logits: if last { Logits::Last } else { Logits::None },
        });
    }
    if items.is_empty() {
        return Ok(0);
    }
    let forward_started = Instant::now();
    let logits = model.forward(&mut items)?;
    drop(items);
    let logits = logits.to_vec2::<f32>()?;
    let decide_started = Instant::now();
    engine.stats.time.gather += forward_started - started;
    engine.stats.time.block += decide_started - forward_started;
    engine.stats.head_rows += logits.len() as u64;
    let mut rows = logits.into_iter();
    for (i, last) in wants_logits {
        let s = &mut engine.running[i];
        s.computed += takes[i];
        if last {
            let row = rows.next().expect("one logits row per finishing item");
            if s.on_logits(&row, loops) {
                engine.stats.count_exit(loops);
            }
        }
    }
    let total: usize = takes.iter().sum();
    engine.stats.loop_rows += (total * loops) as u64;
    engine.stats.last_rows_per_depth = vec![total];
    engine.stats.time.decide += decide_started.elapsed();
    Ok(total)
}
