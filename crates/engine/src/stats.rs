//! What the engine counts and times, for the worker's metrics and reports and the benchmarks.

use std::time::Duration;

/// Counters of the steps so far.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EngineStats {
    pub steps: u64,
    /// Steps whose forward failed (their running requests failed with `StepFailed`).
    pub failed_steps: u64,
    /// Rows x loops executed (one row through the shared block once = 1).
    pub loop_rows: u64,
    /// K/V-only rows written for the loops early exits skipped (state propagation).
    pub fill_rows: u64,
    /// Streamed tokens (a stop token that ends a sequence is not one).
    pub tokens: u64,
    /// Requests dropped because their receiver went away.
    pub cancelled: u64,
    /// Generated tokens by the loop (index + 1) they exited after.
    pub exit_histogram: Vec<u64>,
    /// Rows per loop depth in the last step.
    pub last_rows_per_depth: Vec<usize>,
    /// Rows the exit head (final norm + LM head) ran on, including the ones that sample.
    pub head_rows: u64,
    /// Of `loop_rows`, prompt rows (chunks of prompts, and recomputes after a preemption).
    pub prompt_rows: u64,
    /// Attention work: each row's KV length (positions it attends to), summed over rows and
    /// loops (CDB).
    pub attended: u64,
    /// Where the steps' time went.
    pub time: PhaseTimes,
}

/// Wall time of each phase of the steps so far (a profile at the cost of a clock read per
/// phase per step).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PhaseTimes {
    /// Forming the batch: planning units, embedding, gathering carried hidden states.
    pub gather: Duration,
    /// The shared block (CDB: once over every unit, K/V fill rows riding along; CSB and static:
    /// the whole forward, LM head included).
    pub block: Duration,
    /// The exit head on the rows that need logits (CDB).
    pub head: Duration,
    /// Exit decisions, sampling, streaming, K/V copies, carrying hidden states.
    pub decide: Duration,
}

impl PhaseTimes {
    pub fn total(&self) -> Duration {
        self.gather + self.block + self.head + self.decide
    }
}

impl EngineStats {
    /// Records one streamed token's exit loop (1-based).
    pub(crate) fn count_exit(&mut self, exit_loop: usize) {
        if self.exit_histogram.len() < exit_loop {
            self.exit_histogram.resize(exit_loop, 0);
        }
        self.exit_histogram[exit_loop - 1] += 1;
        self.tokens += 1;
    }
}
