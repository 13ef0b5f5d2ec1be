//! Next-token choice from logits: repetition penalty, temperature, top-k, top-p, seeded sampling,
//! in the order Hugging Face `generate` applies them. Temperature 0 means greedy.
//!
//! The random draw of a token depends only on the seed and the token's position in the sequence
//! (a generator seeded from both), not on the draws before it: a request resumed elsewhere from
//! its prompt plus the tokens already generated continues with exactly the tokens it would have
//! drawn (the router's failover relies on this).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{ModelError, Result};

/// Per-request sampling settings.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy.
    pub temperature: f32,
    /// 0 = off.
    pub top_k: usize,
    /// 1 = off; must be in (0, 1].
    pub top_p: f32,
    /// 1 = off; > 1 discourages tokens already in the context.
    pub repetition_penalty: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// Rejects values that have no meaning, with a message naming the field.
    pub fn validate(&self) -> Result<()> {
        let t = self.temperature;
        if !t.is_finite() || t < 0.0 {
            return Err(ModelError::InvalidInput(format!(
                "temperature must be finite and >= 0, got {t}"
            )));
        }
        let p = self.top_p;
        if !(p > 0.0 && p <= 1.0) {
            return Err(ModelError::InvalidInput(format!(
                "top_p must be in (0, 1], got {p}"
            )));
        }
        let r = self.repetition_penalty;
        if !r.is_finite() || r <= 0.0 {
            return Err(ModelError::InvalidInput(format!(
                "repetition_penalty must be > 0, got {r}"
            )));
        }
        Ok(())
    }
}

/// A seeded sampler for one sequence.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
}

/// The generator of the draw at `position` (the length of the context before the token).
fn rng_at(seed: u64, position: usize) -> StdRng {
    // Golden-ratio stride: distinct positions of one seed never share a generator seed, and
    // `seed_from_u64` mixes the bits (PCG) before seeding ChaCha.
    StdRng::seed_from_u64(seed ^ (position as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Result<Self> {
        params.validate()?;
        Ok(Self { params })
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token from `logits`; `context` is the whole sequence so far, prompt
    /// included (the penalty reads it; its length keys the random draw).
    pub fn sample(&mut self, logits: &[f32], context: &[u32]) -> u32 {
        let mut logits = logits.to_vec();
        let penalty = self.params.repetition_penalty;
        if penalty != 1.0 {
            let mut seen = std::collections::HashSet::new();
            for &t in context {
                if seen.insert(t) {
                    if let Some(l) = logits.get_mut(t as usize) {
                        *l = if *l > 0.0 { *l / penalty } else { *l * penalty };
                    }
                }
            }
        }
        if self.params.temperature == 0.0 {
            return argmax(&logits);
        }
        let inv_t = 1.0 / self.params.temperature;
        let mut cand: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, l * inv_t))
            .collect();
        cand.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
        if self.params.top_k > 0 {
            cand.truncate(self.params.top_k.max(1));
        }
        let max = cand[0].1;
        let mut probs: Vec<f32> = cand.iter().map(|(_, l)| (l - max).exp()).collect();
        let sum: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= sum);
        if self.params.top_p < 1.0 {
            let mut acc = 0.0;
            let mut keep = probs.len();
            for (i, p) in probs.iter().enumerate() {
                acc += p;
                if acc >= self.params.top_p {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
            cand.truncate(keep);
        }
        let total: f32 = probs.iter().sum();
        let mut u = rng_at(self.params.seed, context.len()).random::<f32>() * total;
        for (i, p) in probs.iter().enumerate() {
            if u < *p {
                return cand[i].0;
            }
            u -= p;
        }
        cand[probs.len() - 1].0
    }
}

/// Index of the largest logit (the first, on ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_k: usize, top_p: f32, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature,
            top_k,
            top_p,
            repetition_penalty: 1.0,
            seed,
        }
    }

    #[test]
    fn greedy_picks_argmax_and_penalty_can_change_it() {
        let logits = [1.0, 3.0, 2.9];
        let mut s = Sampler::new(SamplingParams::default()).unwrap();
        assert_eq!(s.sample(&logits, &[]), 1);
        let mut s = Sampler::new(SamplingParams {
            repetition_penalty: 1.5,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(s.sample(&logits, &[1]), 2);
    }

    #[test]
    fn top_k_one_is_greedy_and_same_seed_repeats() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let mut s = Sampler::new(params(1.0, 1, 1.0, 3)).unwrap();
        assert_eq!(s.sample(&logits, &[]), argmax(&logits));
        let draw = |seed| {
            let mut s = Sampler::new(params(1.0, 0, 0.9, seed)).unwrap();
            (0..20)
                .map(|i| s.sample(&logits, &vec![0; i]))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
        let seven = draw(7);
        assert!(
            seven.iter().any(|&t| t != seven[0]),
            "positions draw differently: {seven:?}"
        );
    }

    #[test]
    fn a_draw_depends_on_its_position_not_on_the_draws_before() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let context: Vec<u32> = (0..30).collect();
        let mut first = Sampler::new(params(1.0, 0, 1.0, 11)).unwrap();
        let whole: Vec<u32> = (10..30)
            .map(|n| first.sample(&logits, &context[..n]))
            .collect();
        // A fresh sampler picking up at position 20 (a resumed request) draws the same tokens.
        let mut resumed = Sampler::new(params(1.0, 0, 1.0, 11)).unwrap();
        let tail: Vec<u32> = (20..30)
            .map(|n| resumed.sample(&logits, &context[..n]))
            .collect();
        assert_eq!(tail, whole[10..]);
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        // p = softmax([10, 0, 0, ...]): the first token holds > 99.9% of the mass.
        let mut logits = vec![0.0; 10];
        logits[4] = 10.0;
        let mut s = Sampler::new(params(1.0, 0, 0.5, 1)).unwrap();
        assert!((0..100).all(|_| s.sample(&logits, &[]) == 4));
    }

    #[test]
    fn invalid_params_are_rejected_with_the_field_name() {
        for (p, field) in [
            (params(f32::NAN, 0, 1.0, 0), "temperature"),
            (params(-1.0, 0, 1.0, 0), "temperature"),
            (params(1.0, 0, 0.0, 0), "top_p"),
            (params(1.0, 0, 1.5, 0), "top_p"),
        ] {
            let err = Sampler::new(p).unwrap_err().to_string();
            assert!(err.contains(field), "{err}");
        }
    }
}
