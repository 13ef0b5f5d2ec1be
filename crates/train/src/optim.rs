//! The optimizer: AdamW (decoupled weight decay, none on norm weights), global gradient-norm
//! clipping, and the learning-rate schedule (linear warmup, then cosine decay to a floor).

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::params::{Grads, Params};

/// AdamW settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        // Mixture-of-Recursions' uptraining settings.
        Self {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// AdamW's state: first and second moments per trainable tensor, and the step count.
#[derive(Debug, Clone)]
pub struct AdamW {
    pub cfg: AdamWConfig,
    pub m: Vec<Vec<f32>>,
    pub v: Vec<Vec<f32>>,
    pub step: u64,
}

impl AdamW {
    pub fn new(cfg: AdamWConfig, params: &Params) -> Self {
        let zeros = || {
            params
                .list
                .iter()
                .map(|p| {
                    if p.trainable {
                        vec![0f32; p.value.len()]
                    } else {
                        Vec::new()
                    }
                })
                .collect()
        };
        Self {
            cfg,
            m: zeros(),
            v: zeros(),
            step: 0,
        }
    }

    /// One update of every trainable tensor with learning rate `lr`.
    pub fn update(&mut self, params: &mut Params, grads: &Grads, lr: f32) {
        self.step += 1;
        let c = self.cfg;
        let bias1 = 1.0 - c.beta1.powi(self.step as i32);
        let bias2 = 1.0 - c.beta2.powi(self.step as i32);
        for (((p, g), m), v) in params
            .list
            .iter_mut()
            .zip(&grads.0)
            .zip(&mut self.m)
            .zip(&mut self.v)
        {
            if !p.trainable || g.is_empty() {
                continue;
            }
            // No decay on norm weights (vectors).
            let decay = if p.shape.len() > 1 {
                c.weight_decay
            } else {
                0.0
            };
            p.value
                .par_iter_mut()
                .zip(g.par_iter())
                .zip(m.par_iter_mut())
                .zip(v.par_iter_mut())
                .for_each(|(((x, &g), m), v)| {
                    *m = c.beta1 * *m + (1.0 - c.beta1) * g;
                    *v = c.beta2 * *v + (1.0 - c.beta2) * g * g;
                    let update = (*m / bias1) / ((*v / bias2).sqrt() + c.eps);
                    *x -= lr * (update + decay * *x);
                });
        }
    }
}

/// The global L2 norm of the gradients.
pub fn grad_norm(grads: &Grads) -> f64 {
    grads
        .0
        .iter()
        .map(|g| g.par_iter().map(|&x| x as f64 * x as f64).sum::<f64>())
        .sum::<f64>()
        .sqrt()
}

/// Scales the gradients down to norm `max` when above it; returns the norm before.
pub fn clip(grads: &mut Grads, max: f64) -> f64 {
    let norm = grad_norm(grads);
    if max > 0.0 && norm > max {
        let s = (max / norm) as f32;
        for g in &mut grads.0 {
            g.par_iter_mut().for_each(|x| *x *= s);
        }
    }
    norm
}

/// Linear warmup to `peak` over `warmup` steps, then cosine decay to `peak * floor` at `total`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    pub peak: f32,
    pub warmup: u64,
    pub total: u64,
    pub floor: f32,
}

impl Schedule {
    /// The learning rate of optimizer step `step` (0-based).
    pub fn lr(&self, step: u64) -> f32 {
        if step < self.warmup {
            return self.peak * (step + 1) as f32 / self.warmup as f32;
        }
        let span = self.total.saturating_sub(self.warmup).max(1);
        let progress = ((step - self.warmup) as f32 / span as f32).min(1.0);
        let cosine = 0.5 * (1.0 + (std::f32::consts::PI * progress).cos());
        self.peak * (self.floor + (1.0 - self.floor) * cosine)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays_to_its_floor() {
        let s = Schedule {
            peak: 1.0,
            warmup: 10,
            total: 110,
            floor: 0.1,
        };
        assert!((s.lr(0) - 0.1).abs() < 1e-6);
        assert!((s.lr(9) - 1.0).abs() < 1e-6);
        assert!((s.lr(10) - 1.0).abs() < 1e-6);
        assert!((s.lr(60) - 0.55).abs() < 1e-4);
        assert!((s.lr(110) - 0.1).abs() < 1e-6);
        assert!((s.lr(500) - 0.1).abs() < 1e-6);
    }

    #[test]
    fn adamw_moves_against_the_gradient_and_clipping_bounds_the_norm() {
        let mut params = Params::default();
        let id = params.add("w".into(), vec![1, 2], vec![1.0, -1.0]);
        params.list[id.0].trainable = true;
        let mut grads = Grads::zeros(&params);
        grads.0[0] = vec![3.0, -4.0];
        assert!((clip(&mut grads, 1.0) - 5.0).abs() < 1e-9);
        assert!((grad_norm(&grads) - 1.0).abs() < 1e-6);
        let mut opt = AdamW::new(AdamWConfig::default(), &params);
        opt.update(&mut params, &grads, 0.1);
        // The first Adam step moves each weight by lr against its gradient's sign.
        assert!((params.list[0].value[0] - 0.9).abs() < 1e-5);
        assert!((params.list[0].value[1] + 0.9).abs() < 1e-5);
    }
}
