//! One-sequence generation: chunked prefill, then token-by-token decode with sampling, streaming
//! each token to a callback. The simple reference that batched engines are tested against.

use std::time::{Duration, Instant};

use crate::decoder::{BatchItem, Llama, Logits};
use crate::error::{ModelError, Result};
use crate::sampling::{Sampler, SamplingParams};

/// Prompt tokens per prefill forward (bounds activation memory for long prompts).
pub const PREFILL_CHUNK: usize = 512;

#[derive(Debug, Clone)]
pub struct GenerateParams {
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Token ids that end generation (not emitted).
    pub stop_tokens: Vec<u32>,
}

impl GenerateParams {
    /// Greedy decoding of exactly `max_new_tokens` tokens (no stop tokens).
    pub fn greedy(max_new_tokens: usize) -> Self {
        Self {
            max_new_tokens,
            sampling: SamplingParams::default(),
            stop_tokens: Vec::new(),
        }
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Length,
    Eos,
    /// The callback asked to stop.
    Stopped,
}

#[derive(Debug, Clone)]
pub struct Generation {
    pub tokens: Vec<u32>,
    pub finish: FinishReason,
    pub prefill_time: Duration,
    pub decode_time: Duration,
}

/// The `max_new_tokens` greedy tokens after `prompt` (the one-sequence reference of tests).
pub fn greedy(model: &Llama, prompt: &[u32], max_new_tokens: usize) -> Result<Vec<u32>> {
    let params = GenerateParams::greedy(max_new_tokens);
    Ok(generate(model, prompt, &params, |_| Ok(true))?.tokens)
}

/// Generates after `prompt`; `on_token` gets each new token and returns `false` to stop.
pub fn generate(
    model: &Llama,
    prompt: &[u32],
    params: &GenerateParams,
    mut on_token: impl FnMut(u32) -> Result<bool>,
) -> Result<Generation> {
    if prompt.is_empty() {
        return Err(ModelError::InvalidInput("the prompt has no tokens".into()));
    }
    let context = model.cfg.max_position_embeddings;
    if prompt.len() >= context {
        return Err(ModelError::InvalidInput(format!(
            "the prompt has {} tokens; the context holds {context}",
            prompt.len()
        )));
    }
    let mut sampler = Sampler::new(params.sampling.clone())?;
    let mut cache = model.new_cache();
    let mut kv = model.new_kv_pool();
    let started = Instant::now();
    let mut logits = None;
    for (i, chunk) in prompt.chunks(PREFILL_CHUNK).enumerate() {
        let last = (i + 1) * PREFILL_CHUNK >= prompt.len();
        let out = model.forward(
            &mut kv,
            &mut [BatchItem {
                tokens: chunk,
                offset: i * PREFILL_CHUNK,
                cache: &mut cache,
                logits: if last { Logits::Last } else { Logits::None },
            }],
        )?;
        if last {
            logits = Some(out);
        }
    }
    let prefill_time = started.elapsed();
    let started = Instant::now();
    let mut context_ids = prompt.to_vec();
    let mut tokens = Vec::new();
    let mut finish = FinishReason::Length;
    let max_new = params.max_new_tokens.min(context - prompt.len());
    while tokens.len() < max_new {
        let row = logits
            .take()
            .ok_or_else(|| ModelError::InvalidInput("no logits".into()))?
            .squeeze(0)?
            .to_vec1::<f32>()?;
        let next = sampler.sample(&row, &context_ids);
        if params.stop_tokens.contains(&next) {
            finish = FinishReason::Eos;
            break;
        }
        tokens.push(next);
        context_ids.push(next);
        if !on_token(next)? {
            finish = FinishReason::Stopped;
            break;
        }
        if tokens.len() == max_new {
            break;
        }
        logits = Some(model.forward(
            &mut kv,
            &mut [BatchItem {
                tokens: &[next],
                offset: context_ids.len() - 1,
                cache: &mut cache,
                logits: Logits::Last,
            }],
        )?);
    }
    Ok(Generation {
        tokens,
        finish,
        prefill_time,
        decode_time: started.elapsed(),
    })
}
