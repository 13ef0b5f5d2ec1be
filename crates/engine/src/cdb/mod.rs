//! One step of continuous depth-wise batching: the shared block runs once over every unit in
//! flight, whatever loop it is at. The step is [`plan`] (which units and fill rows run, as
//! data) -> [`block::gather`] -> [`block::run_block`] -> [`decide`] (one decision per unit,
//! one exit-head call) -> [`commit`]. A unit that leaves the block samples at once and its
//! sequence's next token enters loop 0 in the next step, so a slot never waits for slower
//! neighbours.

mod block;
mod commit;
mod decide;
mod plan;

use std::time::Instant;

use crate::error::EngineError;
use crate::step::StepCtx;
use plan::StepPlan;

/// Runs one step; returns the batch's rows.
pub(crate) fn step(ctx: &mut StepCtx<'_>) -> Result<usize, EngineError> {
    let StepCtx {
        model,
        cfg,
        running,
        kv,
        trace,
        stats,
    } = ctx;
    let started = Instant::now();
    let loops = model.loops();
    let plan = StepPlan::take(running, cfg.max_batch_rows, loops)?;
    let rows = plan.rows();
    stats.loop_rows += rows as u64;
    stats.fill_rows += plan.fills.rows() as u64;
    for u in &plan.units {
        let f = &u.flight;
        let s = &running[u.seq];
        if f.end() <= s.prompt_len.max(s.recompute_until) {
            stats.prompt_rows += f.len as u64;
        }
        stats.attended += (f.len * (f.start + f.len.div_ceil(2))) as u64;
    }
    stats.last_rows_per_depth = plan.rows_per_depth(loops);
    let x_in = block::gather(model, running, &plan)?;

    let block_started = Instant::now();
    stats.time.gather += block_started - started;
    let x = block::run_block(model, running, kv, &plan, x_in.as_ref())?;
    let decide_started = Instant::now();
    stats.time.block += decide_started - block_started;
    let (Some(x_in), Some(x)) = (x_in, x) else {
        return Ok(0);
    };

    let head_before = stats.time.head;
    let decisions = decide::decide(model, running, &plan, trace, (&x_in, &x))?;
    let outcomes = decide::settle(model, running, &plan, decisions, &x, (trace, stats))?;
    commit::commit(
        model,
        (cfg.kv_fill, kv),
        running,
        plan.units,
        outcomes,
        &x,
        (trace, stats),
    )?;
    // The exit head is timed inside; the rest is deciding, sampling and committing.
    stats.time.decide += decide_started
        .elapsed()
        .saturating_sub(stats.time.head - head_before);
    Ok(rows)
}
