//! The matrix-product work of one optimizer step (forward, input gradients, the weight
//! gradients of the groups that train, attention, every loop's head), and the machine's
//! measured product speed: what a step's time is judged against.

use std::time::Instant;

use rrt_model::kernels::gemm::{gemm, MatMut, MatRef};

use crate::params::TrainModel;
use crate::precision::{matmul, Precision};
use crate::trainer::Settings;

/// Multiply-adds per token, by part (one loop's layers, LoRA, attention, heads).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Work {
    /// The shared weights' forward and input-gradient products.
    pub projections: f64,
    /// Weight gradients of the shared weights (0 when they are frozen).
    pub shared_grads: f64,
    /// LoRA forward, input and weight gradients.
    pub lora: f64,
    /// Attention scores and weighted sums, and their gradients.
    pub attention: f64,
    /// Every loop's head and its input gradient.
    pub heads: f64,
}

impl Work {
    pub fn total(&self) -> f64 {
        self.projections + self.shared_grads + self.lora + self.attention + self.heads
    }

    /// Multiply-adds per token of `model` as it is set to train, at `seq_len` positions.
    pub fn of(m: &TrainModel, seq_len: usize) -> Self {
        let c = &m.cfg;
        let (h, f, qd, kvd) = (
            c.hidden_size as f64,
            c.intermediate_size as f64,
            c.q_dim() as f64,
            c.kv_dim() as f64,
        );
        let layer = h * (qd + 2.0 * kvd) + qd * h + 3.0 * h * f;
        // Gradients flow back through the model unless only the exit heads train.
        let backward = m.layers_train();
        let passes = if backward { 2.0 } else { 1.0 };
        let mut w = Work::default();
        for u in &m.unrolled {
            let lora: f64 = u
                .lora
                .iter()
                .flatten()
                .map(|l| (m.params.get(l.a).len() + m.params.get(l.b).len()) as f64)
                .sum();
            w.projections += passes * layer;
            w.lora += passes * lora;
            if m.params.trainable(m.shared[u.shared].fused[0]) {
                w.shared_grads += layer;
            }
            if u.lora.iter().flatten().any(|l| m.params.trainable(l.a)) {
                w.lora += lora;
            }
            // Causal attention: scores and weighted sum (then their four gradients).
            w.attention += passes * 3.0 * (seq_len as f64 / 2.0) * qd;
        }
        // Every loop's head: logits, and the gradient of its input where the loss reaches back
        // (all loops, or with only exit heads training the loops that have one).
        let head_grads = if backward { m.loops() } else { m.loops() - 1 };
        w.heads = (m.loops() + head_grads) as f64 * h * c.vocab_size as f64;
        w
    }
}

/// A step's product work and the machine's product speed.
#[derive(Debug, Clone, Copy)]
pub struct Roofline {
    pub work: Work,
    pub flops_per_step: f64,
    /// Measured FLOP/s of a `[1024, hidden] x [hidden, intermediate]` product at the run's
    /// precision.
    pub peak: f64,
}

impl Roofline {
    pub fn measure(m: &TrainModel, s: &Settings) -> Self {
        let work = Work::of(m, s.seq_len);
        let rows = (s.batch_seqs * s.seq_len * s.accum) as f64;
        Self {
            work,
            flops_per_step: 2.0 * work.total() * rows,
            peak: peak(s.precision, m.cfg.hidden_size, m.cfg.intermediate_size),
        }
    }
}

/// Best of five timings of a `[1024, h] x [h, f]` product at `precision`, in FLOP/s.
pub fn peak(precision: Precision, h: usize, f: usize) -> f64 {
    let (m, a, b) = (1024, vec![0.5f32; 1024 * h], vec![0.25f32; h * f]);
    let mut c = vec![0f32; m * f];
    (0..5)
        .map(|_| {
            let t = Instant::now();
            match precision {
                Precision::F32 => gemm(
                    MatMut::new(&mut c, m, f),
                    MatRef::new(&a, m, h),
                    MatRef::new(&b, h, f),
                    false,
                ),
                Precision::Bf16 => matmul(
                    precision,
                    MatMut::new(&mut c, m, f),
                    MatRef::new(&a, m, h),
                    MatRef::new(&b, h, f),
                    false,
                ),
            }
            2.0 * (m * h * f) as f64 / t.elapsed().as_secs_f64()
        })
        .fold(0.0, f64::max)
}
