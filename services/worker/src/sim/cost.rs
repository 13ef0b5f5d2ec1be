//! The simulated engine's step time: a linear model of what one step of the real engine does
//! (rows through the shared block per loop, prompt rows, exit-head rows, attention over the KV
//! length), with a least-squares fit to measured steps of the real engine.

use serde::{Deserialize, Serialize};

/// What one step ran.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepShape {
    /// Rows through the shared block, summed over loops (a row through one loop = 1).
    pub loop_rows: f64,
    /// Of the step's rows, prompt tokens (they run every loop and need no head).
    pub prompt_rows: f64,
    /// Rows the exit head (norm + LM head) ran on.
    pub head_rows: f64,
    /// Attention work: each loop-row's KV length, summed (in thousands of tokens).
    pub kv_rows_k: f64,
}

impl StepShape {
    fn features(&self) -> [f64; 5] {
        [
            1.0,
            self.loop_rows,
            self.prompt_rows,
            self.head_rows,
            self.kv_rows_k,
        ]
    }
}

/// Seconds per step = base + per loop-row + per prompt row + per head row + per thousand
/// attended KV entries.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CostModel {
    pub base_s: f64,
    pub loop_row_s: f64,
    pub prompt_row_s: f64,
    pub head_row_s: f64,
    pub kv_k_s: f64,
}

impl Default for CostModel {
    /// A rough default of the bundled SmolLM2 15 x 2 at f32 on a 2-core AVX-512 machine (a fit
    /// replaces it: `CostModel::fit`).
    fn default() -> Self {
        Self {
            base_s: 0.004,
            loop_row_s: 0.0012,
            prompt_row_s: -0.0008,
            head_row_s: 0.0009,
            kv_k_s: 0.0002,
        }
    }
}

/// How well a fit predicts the steps it was fitted on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FitReport {
    pub samples: usize,
    /// Mean |predicted - measured| / measured.
    pub mean_abs_error: f64,
    /// The same over the summed time of all steps (what a throughput figure sees).
    pub total_error: f64,
}

impl CostModel {
    pub fn seconds(&self, s: &StepShape) -> f64 {
        let c = [
            self.base_s,
            self.loop_row_s,
            self.prompt_row_s,
            self.head_row_s,
            self.kv_k_s,
        ];
        let f = s.features();
        c.iter().zip(f).map(|(c, f)| c * f).sum::<f64>().max(0.0)
    }

    /// Least squares over `(shape, measured seconds)` (normal equations with a small ridge so
    /// a feature that never varies gets no weight); `None` without enough samples.
    pub fn fit(samples: &[(StepShape, f64)]) -> Option<(Self, FitReport)> {
        const N: usize = 5;
        if samples.len() < N {
            return None;
        }
        let mut a = [[0.0f64; N]; N];
        let mut b = [0.0f64; N];
        for (shape, t) in samples {
            let f = shape.features();
            for i in 0..N {
                b[i] += f[i] * t;
                for j in 0..N {
                    a[i][j] += f[i] * f[j];
                }
            }
        }
        for (i, row) in a.iter_mut().enumerate() {
            row[i] += 1e-9 * (1.0 + row[i]);
        }
        let c = solve(a, b)?;
        let model = Self {
            base_s: c[0],
            loop_row_s: c[1],
            prompt_row_s: c[2],
            head_row_s: c[3],
            kv_k_s: c[4],
        };
        let (mut err, mut predicted, mut measured) = (0.0, 0.0, 0.0);
        for (shape, t) in samples {
            let p = model.seconds(shape);
            err += (p - t).abs() / t.max(1e-9);
            predicted += p;
            measured += t;
        }
        let report = FitReport {
            samples: samples.len(),
            mean_abs_error: err / samples.len() as f64,
            total_error: (predicted - measured).abs() / measured.max(1e-9),
        };
        Some((model, report))
    }
}

/// Gaussian elimination with partial pivoting; `None` for a singular system.
fn solve<const N: usize>(mut a: [[f64; N]; N], mut b: [f64; N]) -> Option<[f64; N]> {
    for col in 0..N {
        let pivot = (col..N).max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))?;
        if a[pivot][col].abs() < 1e-300 {
            return None;
        }
        a.swap(col, pivot);
        b.swap(col, pivot);
        let pivot_row = a[col];
        for row in col + 1..N {
            let f = a[row][col] / pivot_row[col];
            for (x, p) in a[row][col..].iter_mut().zip(&pivot_row[col..]) {
                *x -= f * p;
            }
            b[row] -= f * b[col];
        }
    }
    let mut x = [0.0; N];
    for row in (0..N).rev() {
        let s: f64 = (row + 1..N).map(|k| a[row][k] * x[k]).sum();
        x[row] = (b[row] - s) / a[row][row];
    }
    Some(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fit_recovers_the_model_that_made_the_steps() {
        let truth = CostModel {
            base_s: 0.003,
            loop_row_s: 0.001,
            prompt_row_s: -0.0004,
            head_row_s: 0.0007,
            kv_k_s: 0.0001,
        };
        let mut samples = Vec::new();
        for i in 0..60u32 {
            let rows = (i % 13 + 1) as f64;
            let prompt = ((i * 7) % 5) as f64 * 10.0;
            let shape = StepShape {
                loop_rows: 2.0 * (rows + prompt) - (i % 3) as f64,
                prompt_rows: prompt,
                head_rows: rows * 1.5 + (i % 2) as f64,
                kv_rows_k: (rows * 2.0) * (100.0 + (i * 37 % 400) as f64) / 1000.0,
            };
            samples.push((shape, truth.seconds(&shape)));
        }
        let (fit, report) = CostModel::fit(&samples).unwrap();
        assert!(report.mean_abs_error < 1e-6, "{report:?}");
        assert!((fit.loop_row_s - truth.loop_row_s).abs() < 1e-7, "{fit:?}");
        assert!((fit.kv_k_s - truth.kv_k_s).abs() < 1e-7, "{fit:?}");
        assert!(CostModel::fit(&samples[..3]).is_none());
    }
}
