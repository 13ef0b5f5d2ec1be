//! What a scheduler's step works on: the model, the settings, the running sequences, their KV
//! pool, the exit trace and the counters; not the whole [`crate::Engine`] (its queue and the
//! prefix cache stay with admission). Also the one row planner both schedulers use.

use rrt_model::{KvPool, Llama};

use crate::engine::EngineConfig;
use crate::sequence::Seq;
use crate::stats::EngineStats;
use crate::trace::ExitTrace;

pub(crate) struct StepCtx<'a> {
    pub model: &'a Llama,
    pub cfg: &'a EngineConfig,
    pub running: &'a mut [Seq],
    /// The blocks the running sequences' tables point into.
    pub kv: &'a mut KvPool,
    pub trace: &'a mut ExitTrace,
    pub stats: &'a mut EngineStats,
}

/// Tokens each running sequence starts this step within `budget` rows: decode tokens first
/// (one row each), then prompt chunks with what is left; none for sequences `busy` says are
/// already in flight, done, or with nothing pending.
pub(crate) fn decode_first(
    running: &[Seq],
    busy: impl Fn(usize) -> bool,
    mut budget: usize,
) -> Vec<usize> {
    let mut takes = vec![0; running.len()];
    for decode in [true, false] {
        for (i, (take, s)) in takes.iter_mut().zip(running).enumerate() {
            let pending = s.pending();
            if busy(i) || s.is_done() || pending == 0 || (pending == 1) != decode || budget == 0 {
                continue;
            }
            *take = pending.min(budget);
            budget -= *take;
        }
    }
    takes
}
