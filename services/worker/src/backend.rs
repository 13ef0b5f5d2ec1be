//! What the engine thread drives: the real engine, or the simulated one of [`crate::sim`]
//! (the same requests, events, load figures and reports, with step times from a cost model
//! instead of compute). The actor and everything above it see only this trait.

use rrt_engine::{Engine, Request};

use crate::actor::Snapshot;

pub trait Backend: Send + 'static {
    /// Queues a request.
    fn submit(&mut self, req: Request);
    /// Runs one step: admits, computes (or simulates) one batch, streams its tokens; returns
    /// the rows it ran.
    fn step(&mut self) -> usize;
    /// Requests waiting or running.
    fn pending(&self) -> usize;
    /// Steps whose forward failed, so far.
    fn failed_steps(&self) -> u64;
    /// The load and counters to publish, with `busy_seconds` spent stepping.
    fn snapshot(&self, busy_seconds: f64) -> Snapshot;
    /// The default exit policy's threshold from now on (load-adaptive exits): requests that
    /// named no policy follow it, running ones included.
    fn set_default_threshold(&mut self, threshold: f32);
}

impl Backend for Engine {
    fn submit(&mut self, req: Request) {
        Engine::submit(self, req)
    }

    fn step(&mut self) -> usize {
        // On a rayon worker the step's parallel sections start without a cross-thread wake-up
        // (the engine thread's waiting stays off the pool, so several engines never starve it).
        rrt_model::runtime::on_compute_pool(|| Engine::step(self))
    }

    fn pending(&self) -> usize {
        Engine::pending(self)
    }

    fn failed_steps(&self) -> u64 {
        self.stats().failed_steps
    }

    fn set_default_threshold(&mut self, threshold: f32) {
        Engine::set_default_threshold(self, threshold)
    }

    fn snapshot(&self, busy_seconds: f64) -> Snapshot {
        let (pending_new_tokens, pending_prompt_tokens) = self.pending_work();
        Snapshot {
            queue_length: self.queue_len(),
            running: self.running_len(),
            kv_bytes_used: self.kv_used_bytes(),
            kv_bytes_budget: self.kv_budget_bytes(),
            kv_blocks: self.kv_blocks(),
            kv_counters: self.kv_counters(),
            pending_new_tokens,
            pending_prompt_tokens,
            stats: self.stats().clone(),
            masks: self.mask_counts(),
            busy_seconds,
        }
    }
}
