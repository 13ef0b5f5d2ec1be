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
use crate::kernels::exp_fast;

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
        logits.iter_mut().for_each(|l| *l *= inv_t);
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let u = rng_at(self.params.seed, context.len()).random::<f32>();
        if self.params.top_k > 0 {
            // The k best, best first, then the nucleus among them.
            let k = self.params.top_k.min(logits.len());
            let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
            let desc = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]);
            if k < idx.len() {
                idx.select_nth_unstable_by(k - 1, desc);
                idx.truncate(k);
            }
            idx.sort_unstable_by(desc);
            let weights: Vec<f32> = idx
                .iter()
                .map(|&i| (logits[i as usize] - max).exp())
                .collect();
            let sum: f32 = weights.iter().sum();
            return pick(&idx, &weights, self.params.top_p * sum, u);
        }
        // Unnormalised probabilities of the whole vocabulary, vectorized.
        let weights: Vec<f32> = logits.iter().map(|&l| exp_fast(l - max)).collect();
        let sum: f32 = weights.iter().sum();
        if self.params.top_p >= 1.0 {
            let mut x = u * sum;
            for (i, &w) in weights.iter().enumerate() {
                if x < w {
                    return i as u32;
                }
                x -= w;
            }
            return argmax(&logits);
        }
        // The nucleus: the fewest best tokens whose mass reaches top_p. A token whose
        // probability is under (1 - top_p) / vocab cannot be in it (every token at or below it
        // holds less than 1 - top_p together, so the tokens above it already reach top_p):
        // only the others are sorted.
        let floor = (1.0 - self.params.top_p) / weights.len() as f32 * sum;
        let mut idx: Vec<u32> = (0..weights.len() as u32)
            .filter(|&i| weights[i as usize] >= floor)
            .collect();
        idx.sort_unstable_by(|a, b| logits[*b as usize].total_cmp(&logits[*a as usize]));
        let kept: Vec<f32> = idx.iter().map(|&i| weights[i as usize]).collect();
        pick(&idx, &kept, self.params.top_p * sum, u)
    }
}

/// Of candidates `idx` (best first) with unnormalised probabilities `weights`, keeps the
/// fewest whose mass reaches `mass`, and draws one of them with `u` in [0, 1).
fn pick(idx: &[u32], weights: &[f32], mass: f32, u: f32) -> u32 {
    let mut acc = 0.0;
    let mut keep = idx.len();
    for (i, w) in weights.iter().enumerate() {
        acc += w;
        if acc >= mass {
            keep = i + 1;
            break;
        }
    }
    let total: f32 = weights[..keep].iter().sum();
    let mut x = u * total;
    for (i, w) in weights[..keep].iter().enumerate() {
        if x < *w {
            return idx[i];
        }
        x -= w;
    }
    idx[keep - 1]
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

    /// The sampler as first written: every candidate sorted, softmax, cut, draw.
    fn sort_everything(p: &SamplingParams, logits: &[f32], position: usize) -> u32 {
        let mut cand: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, l / p.temperature))
            .collect();
        cand.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
        if p.top_k > 0 {
            cand.truncate(p.top_k);
        }
        let max = cand[0].1;
        let mut probs: Vec<f32> = cand.iter().map(|(_, l)| (l - max).exp()).collect();
        let sum: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= sum);
        let mut keep = probs.len();
        let mut acc = 0.0;
        for (i, x) in probs.iter().enumerate() {
            acc += x;
            if acc >= p.top_p {
                keep = i + 1;
                break;
            }
        }
        let total: f32 = probs[..keep].iter().sum();
        let mut u = rng_at(p.seed, position).random::<f32>() * total;
        for (i, x) in probs[..keep].iter().enumerate() {
            if u < *x {
                return cand[i].0;
            }
            u -= x;
        }
        cand[keep - 1].0
    }

    #[test]
    fn the_nucleus_without_a_full_sort_draws_what_sorting_everything_draws() {
        let vocab = 5000;
        let shapes: Vec<Vec<f32>> = vec![
            // Peaked, flat, and a long tail.
            (0..vocab)
                .map(|i| -((i as f32) * 0.01) + (i as f32 * 1.3).sin())
                .collect(),
            (0..vocab).map(|i| (i as f32 * 0.37).sin() * 0.05).collect(),
            (0..vocab)
                .map(|i| if i % 97 == 0 { 8.0 } else { (i as f32).cos() })
                .collect(),
        ];
        for logits in &shapes {
            for (top_k, top_p) in [(0, 0.95), (0, 0.5), (40, 0.9), (0, 1.0), (7, 1.0)] {
                let p = params(0.8, top_k, top_p, 0);
                let (mut same, mut nucleus) = (0, std::collections::HashSet::new());
                let n = 400;
                for seed in 0..n {
                    let p = SamplingParams { seed, ..p };
                    let want = sort_everything(&p, logits, 3);
                    let got = Sampler::new(p).unwrap().sample(logits, &[0, 0, 0]);
                    nucleus.insert(want);
                    if top_p < 1.0 || top_k > 0 {
                        // Sorted walks: the same draw (a token of the same logit where several
                        // tie) but where float sums round apart.
                        same += (logits[got as usize] == logits[want as usize]) as usize;
                    } else {
                        // No cut: a draw walks the vocabulary in index order (the same
                        // distribution, other tokens per seed); it must be a real candidate.
                        same += ((got as usize) < vocab) as usize;
                    }
                }
                assert!(
                    same >= n as usize - 2,
                    "top_k {top_k} top_p {top_p}: {same} of {n}"
                );
                assert!(nucleus.len() > 1 || top_p <= 0.5);
            }
        }
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
