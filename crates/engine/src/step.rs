//! What a scheduler's step works on: the model, the settings, the running sequences, the exit
//! trace and the counters; not the whole [`crate::Engine`] (its queue and KV accounting stay
//! with admission).

use rrt_model::Llama;

use crate::engine::EngineConfig;
use crate::sequence::Seq;
use crate::stats::EngineStats;
use crate::trace::ExitTrace;

pub(crate) struct StepCtx<'a> {
    pub model: &'a Llama,
    pub cfg: &'a EngineConfig,
    pub running: &'a mut [Seq],
    pub trace: &'a mut ExitTrace,
    pub stats: &'a mut EngineStats,
}
