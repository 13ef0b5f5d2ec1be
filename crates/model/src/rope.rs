//! Rotary position embeddings, Hugging Face (half-split) convention, computed in f32 the way
//! `transformers` does so logits match it closely.

/// Precomputed cos/sin tables, `[position][head_dim / 2]`.
#[derive(Debug, Clone)]
pub struct Rope {
    half: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
    max_positions: usize,
}

impl Rope {
    pub fn new(head_dim: usize, theta: f64, max_positions: usize) -> Self {
        let half = head_dim / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| 1.0 / (theta as f32).powf((2 * i) as f32 / head_dim as f32))
            .collect();
        let mut cos = Vec::with_capacity(max_positions * half);
        let mut sin = Vec::with_capacity(max_positions * half);
        for p in 0..max_positions {
            for &f in &inv_freq {
                let angle = p as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        Self {
            half,
            cos,
            sin,
            max_positions,
        }
    }

    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    /// Rotates back each `head_dim` chunk of `x` from `position` (the transpose of
    /// [`Rope::apply`]: what the gradient of a rotated vector goes through).
    pub fn apply_inverse(&self, x: &mut [f32], position: usize) {
        let h = self.half;
        let cos = &self.cos[position * h..(position + 1) * h];
        let sin = &self.sin[position * h..(position + 1) * h];
        for head in x.chunks_exact_mut(2 * h) {
            let (a, b) = head.split_at_mut(h);
            for i in 0..h {
                let (x1, x2) = (a[i], b[i]);
                a[i] = x1 * cos[i] + x2 * sin[i];
                b[i] = x2 * cos[i] - x1 * sin[i];
            }
        }
    }

    /// Rotates each `head_dim` chunk of `x` (one token's heads) to `position`.
    pub fn apply(&self, x: &mut [f32], position: usize) {
        let h = self.half;
        let cos = &self.cos[position * h..(position + 1) * h];
        let sin = &self.sin[position * h..(position + 1) * h];
        for head in x.chunks_exact_mut(2 * h) {
            let (a, b) = head.split_at_mut(h);
            for i in 0..h {
                let (x1, x2) = (a[i], b[i]);
                a[i] = x1 * cos[i] - x2 * sin[i];
                b[i] = x2 * cos[i] + x1 * sin[i];
            }
        }
    }
}
