//! One request's state from submission to its end: its tokens, KV block table and sampler,
//! where it stands ([`Stage`]: ready for its next unit, a unit carried between loops, or done),
//! the K/V an early exit left to write, and what the prefix cache may keep of it.

use candle_core::Tensor;
use rrt_model::{Sampler, SeqCache};

use crate::constraint::Constrained;
use crate::error::EngineError;
use crate::exit::ExitPolicy;
use crate::request::{Event, EventSink, FinishReason, GenParams, Request};

/// Tokens of a sequence running through the shared block: a prompt chunk or one generated
/// token (a *unit*), and how far it has come.
pub(crate) struct Flight {
    /// Position of the unit's first token.
    pub start: usize,
    pub len: usize,
    /// Loops run so far (also the 0-based loop the unit runs next).
    pub loops_done: usize,
    /// Hidden states after those loops (`None` before the first).
    pub hidden: Option<Tensor>,
}

impl Flight {
    /// A unit of `len` tokens from `start`, entering loop 0.
    pub fn enter(start: usize, len: usize) -> Self {
        Self {
            start,
            len,
            loops_done: 0,
            hidden: None,
        }
    }

    pub fn end(&self) -> usize {
        self.start + self.len
    }
}

/// The K/V of the loops an early exit skipped (state propagation), written by the next step's
/// block pass.
pub(crate) struct PendingFill {
    /// The exit hidden state `[1, hidden]`.
    pub hidden: Tensor,
    pub position: usize,
    /// Loops run before the exit; loops `done..` at `position` are missing.
    pub done: usize,
}

/// Where a sequence stands between steps.
pub(crate) enum Stage {
    /// Its next unit (a prompt chunk, or the last sampled token) has not started.
    Ready,
    /// A unit carried to its next loop (depth-wise batching).
    Carried(Flight),
    /// Finished, failed or cancelled: removed, and its KV freed, after the step.
    Done,
}

/// What [`Seq::on_logits`] streamed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Emitted {
    /// The sampled token (not a stop token).
    pub sampled: bool,
    /// Tokens the constraint forced after it.
    pub forced: usize,
}

pub(crate) struct Seq {
    pub id: u64,
    pub exit: ExitPolicy,
    /// It named no exit policy: it takes the server's default, and the default's threshold as
    /// it changes under load ([`crate::Engine::set_default_threshold`]).
    pub follows_default: bool,
    /// Its grammar, if it has one: masks the logits it samples from.
    pub constraint: Option<Constrained>,
    /// Tokens its grammar forced before anything was sampled (already in `tokens`) and whether
    /// the grammar is complete after them: streamed once, at its first admission.
    pub opening: Option<(Vec<u32>, bool)>,
    pub events: Box<dyn EventSink>,
    pub params: GenParams,
    pub sampler: Sampler,
    /// Its KV blocks (empty while waiting).
    pub kv: SeqCache,
    /// Prompt then generated tokens.
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    /// Tokens whose K/V are in the cache (at every loop, or filled by the next step).
    pub computed: usize,
    pub stage: Stage,
    pub fill: Option<PendingFill>,
    /// Lower is served first and preempted last.
    pub priority: i32,
    /// Submission order (ties of priority: earlier first).
    pub arrival: u64,
    /// Prompt tokens found in the prefix cache at its first admission (`None` before it).
    pub cached_tokens: Option<usize>,
    /// The first position whose K/V an early exit made (skipped loops filled or copied): from
    /// there on the cache depends on exit decisions, not only on tokens, so it is never shared.
    pub exited_from: usize,
    /// After a preemption, positions before this are recomputed as a prompt (full depth).
    pub recompute_until: usize,
    /// Times a request behind it was admitted while it did not fit (bounded, so a large
    /// request is not passed over forever).
    pub passed_over: usize,
}

impl Seq {
    /// A waiting sequence for `req`, with its sampler.
    pub fn new(
        req: Request,
        sampler: Sampler,
        exit: ExitPolicy,
        arrival: u64,
        constraint: Option<Constrained>,
    ) -> Self {
        Self {
            id: req.id,
            exit,
            follows_default: req.exit.is_none(),
            constraint,
            opening: None,
            events: req.events,
            sampler,
            kv: SeqCache::default(),
            prompt_len: req.prompt.len(),
            tokens: req.prompt,
            params: req.params,
            computed: 0,
            stage: Stage::Ready,
            fill: None,
            priority: req.priority,
            arrival,
            cached_tokens: None,
            exited_from: usize::MAX,
            recompute_until: 0,
            passed_over: 0,
        }
    }

    /// Positions whose K/V depend on the tokens alone (computed, at full depth): what the
    /// prefix cache may keep.
    pub fn cacheable(&self) -> usize {
        self.computed.min(self.exited_from)
    }

    /// Back to waiting after its blocks were taken: everything is recomputed from its tokens
    /// (the ones generated so far run as a prompt, at full depth).
    pub fn preempted(&mut self) {
        self.computed = 0;
        self.stage = Stage::Ready;
        self.fill = None;
        self.exited_from = usize::MAX;
        self.recompute_until = self.recompute_until.max(self.tokens.len() - 1);
    }

    pub fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    /// Tokens not yet run through the model (a prompt chunk, or the last sampled token).
    pub fn pending(&self) -> usize {
        self.tokens.len() - self.computed
    }

    pub fn is_done(&self) -> bool {
        matches!(self.stage, Stage::Done)
    }

    pub fn mark_done(&mut self) {
        self.stage = Stage::Done;
    }

    /// For a unit of one generated token: that token's index among the generated ones (the
    /// key of exit traces). `None` for prompt tokens and tokens recomputed after a preemption.
    pub fn generated_index(&self, unit: &Flight) -> Option<usize> {
        (unit.len == 1 && unit.start >= self.prompt_len.max(self.recompute_until))
            .then(|| unit.start - self.prompt_len)
    }

    /// Whether `unit` ends at the sequence's newest token, so leaving the block samples the
    /// next one (a prompt chunk that is not the last samples nothing).
    pub fn samples_after(&self, unit: &Flight) -> bool {
        unit.end() == self.tokens.len()
    }

    /// Sends `event`; a closed receiver (client gone) marks the sequence done.
    pub fn emit(&mut self, event: Event) {
        if !self.events.send(event) {
            self.mark_done();
        }
    }

    /// Samples the next token from the logits of the sequence's last token and streams it, or
    /// finishes the sequence. Returns how many tokens were emitted: the sampled one (a stop
    /// token is not) and, for a constrained sequence, the tokens its grammar forces after it
    /// (streamed at once with `exit_loop` = `loops`: they run every loop as one chunk next).
    pub fn on_logits(&mut self, logits: &[f32], exit_loop: usize, loops: usize) -> Emitted {
        let next = match (self.params.forced.get(self.generated()), &self.constraint) {
            (Some(&forced), _) => forced,
            (None, None) => self.sampler.sample(logits, &self.tokens),
            (None, Some(c)) => match c.apply(logits) {
                Ok(masked) => self.sampler.sample(&masked, &self.tokens),
                Err(e) => {
                    self.fail_constraint(e);
                    return Emitted::default();
                }
            },
        };
        if self.params.stop_tokens.contains(&next) {
            self.finish(FinishReason::Stop);
            return Emitted::default();
        }
        let logprob = self.params.logprobs.then(|| log_softmax_at(logits, next));
        let argmax = self
            .params
            .logprobs
            .then(|| rrt_model::sampling::argmax(logits));
        self.tokens.push(next);
        self.emit(Event::Token {
            token: next,
            exit_loop,
            logprob,
            argmax,
        });
        let room = self.params.max_new_tokens.saturating_sub(self.generated());
        let (complete, forced) = match self.constraint.as_ref().map(|c| c.commit(next, room)) {
            None => (false, Vec::new()),
            Some(Ok(step)) => step,
            Some(Err(e)) => {
                self.fail_constraint(e);
                return Emitted {
                    sampled: true,
                    forced: 0,
                };
            }
        };
        let mut emitted = Emitted {
            sampled: true,
            forced: 0,
        };
        for t in forced {
            if self.params.stop_tokens.contains(&t) || self.is_done() {
                break;
            }
            self.tokens.push(t);
            self.emit(Event::Token {
                token: t,
                exit_loop: loops,
                logprob: None,
                argmax: None,
            });
            emitted.forced += 1;
        }
        if self.is_done() {
            return emitted;
        }
        if complete {
            // The grammar is satisfied and allows nothing more: a natural end.
            self.finish(FinishReason::Stop);
        } else if self.generated() >= self.params.max_new_tokens {
            self.finish(FinishReason::Length);
        }
        emitted
    }

    /// Streams the tokens its grammar forced from the start (at its first admission), as having
    /// run every loop; finishes it when the grammar is complete after them. Returns how many.
    pub fn stream_opening(&mut self, loops: usize) -> usize {
        let Some((forced, complete)) = self.opening.take() else {
            return 0;
        };
        for &t in &forced {
            self.emit(Event::Token {
                token: t,
                exit_loop: loops,
                logprob: None,
                argmax: None,
            });
        }
        if complete && !self.is_done() {
            self.finish(FinishReason::Stop);
        }
        forced.len()
    }

    /// Ends the sequence because its constraint failed (a grammar error, or no token allowed).
    fn fail_constraint(&mut self, reason: String) {
        self.emit(Event::Failed(EngineError::Invalid(format!(
            "the output constraint failed: {reason}"
        ))));
        self.mark_done();
    }

    pub fn finish(&mut self, reason: FinishReason) {
        let generated = self.generated();
        self.emit(Event::Finished { reason, generated });
        self.mark_done();
    }
}

/// `log softmax(logits)[token]`.
pub(crate) fn log_softmax_at(logits: &[f32], token: u32) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| ((l - max) as f64).exp()).sum();
    logits
        .get(token as usize)
        .map_or(f32::NEG_INFINITY, |&l| ((l - max) as f64 - sum.ln()) as f32)
}

#[cfg(test)]
mod tests {
    use super::log_softmax_at;

    #[test]
    fn log_softmax_of_one_token() {
        let l = [1.0f32, 2.0, 3.0];
        let z: f32 = l.iter().map(|x| x.exp()).sum();
        assert!((log_softmax_at(&l, 2) - (3f32.exp() / z).ln()).abs() < 1e-6);
        assert!((log_softmax_at(&[5.0; 4], 0) - 0.25f32.ln()).abs() < 1e-6);
        assert_eq!(log_softmax_at(&l, 7), f32::NEG_INFINITY);
    }
}
