//! Perplexity of a model on a token stream: non-overlapping windows, each scored from scratch
//! (every token after the first of a window is predicted from the tokens before it in the window).

use candle_core::{Tensor, D};

use crate::decoder::{BatchItem, Llama, Logits};
use crate::error::{ModelError, Result};
use crate::kv::{KvDtype, KvPool, DEFAULT_BLOCK_TOKENS};

#[derive(Debug, Clone, Copy)]
pub struct PerplexityReport {
    /// Tokens predicted (scored).
    pub scored: usize,
    /// Mean negative log-likelihood, nats per token.
    pub nll: f64,
}

impl PerplexityReport {
    pub fn perplexity(&self) -> f64 {
        self.nll.exp()
    }
}

/// Sum of `-log p(target)` over rows of `logits [n, vocab]`.
pub fn nll_sum(logits: &Tensor, targets: &[u32]) -> Result<f64> {
    let logp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let idx = Tensor::new(targets, logits.device())?.unsqueeze(1)?;
    let picked = logp.gather(&idx, 1)?.to_dtype(candle_core::DType::F64)?;
    Ok(-picked.sum_all()?.to_scalar::<f64>()?)
}

/// Scores `ids` in windows of `window` tokens (the model's final output).
pub fn perplexity(model: &Llama, ids: &[u32], window: usize) -> Result<PerplexityReport> {
    let mut per_loop = perplexity_per_loop(model, ids, window, false, KvDtype::F32)?;
    Ok(per_loop.pop().expect("at least the final loop"))
}

/// Scores `ids` with an exit head after every loop of a recursive model (final norm + LM head
/// on each loop's hidden state): one report per loop, the last is the model's output. With
/// `every_loop` false, only the final one. K and V are held as `kv` (attention reads every
/// position from the KV pool, its own row's included, so the dtype applies throughout).
pub fn perplexity_per_loop(
    model: &Llama,
    ids: &[u32],
    window: usize,
    every_loop: bool,
    kv: KvDtype,
) -> Result<Vec<PerplexityReport>> {
    if window < 2 || ids.len() < 2 {
        return Err(ModelError::InvalidInput(format!(
            "need at least 2 tokens and a window >= 2 (got {} tokens, window {window})",
            ids.len()
        )));
    }
    let mut totals: Vec<f64> = Vec::new();
    let mut scored = 0;
    let layout = model.kv_layout(DEFAULT_BLOCK_TOKENS, kv)?;
    for chunk in ids.chunks(window).filter(|c| c.len() >= 2) {
        let mut cache = model.new_cache();
        let mut pool = KvPool::growable(layout);
        let per_loop = model.forward_loops(
            &mut pool,
            &mut [BatchItem {
                tokens: &chunk[..chunk.len() - 1],
                offset: 0,
                cache: &mut cache,
                logits: Logits::All,
            }],
            every_loop,
        )?;
        totals.resize(per_loop.len(), 0.0);
        for (t, logits) in totals.iter_mut().zip(&per_loop) {
            *t += nll_sum(logits, &chunk[1..])?;
        }
        scored += chunk.len() - 1;
    }
    Ok(totals
        .into_iter()
        .map(|t| PerplexityReport {
            scored,
            nll: t / scored as f64,
        })
        .collect())
}
