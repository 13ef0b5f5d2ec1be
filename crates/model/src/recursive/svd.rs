//! Truncated SVD of residual matrices for LoRA initialisation: `U, S, Vt = svd(W_l - W'_k)`,
//! `B = U[:, :r] * S[:r]`, `A = Vt[:r, :]` (no square-root split, scaling 1), so that at full
//! rank `W'_k + B A = W_l`. The decomposition is computed once (thin, by faer) and any rank is
//! cut from it.

use faer::Mat;

use crate::error::{ModelError, Result};

/// A thin SVD of an `[out, in]` matrix, kept whole so several ranks can be cut from it.
#[derive(Debug, Clone)]
pub struct Factors {
    out: usize,
    inp: usize,
    /// `[out, full]`, row-major.
    u: Vec<f32>,
    /// `[full]`, non-increasing.
    s: Vec<f32>,
    /// `[full, in]`, row-major.
    vt: Vec<f32>,
}

impl Factors {
    /// Decomposes `w` (`[out, in]`, row-major). Single-threaded: callers run several at once.
    pub fn new(w: &[f32], out: usize, inp: usize) -> Result<Self> {
        let m = Mat::<f32>::from_fn(out, inp, |i, j| w[i * inp + j]);
        let svd = m
            .thin_svd()
            .map_err(|e| ModelError::InvalidInput(format!("SVD did not converge: {e:?}")))?;
        let full = out.min(inp);
        let (u, v, s) = (svd.U(), svd.V(), svd.S().column_vector());
        let mut uu = vec![0f32; out * full];
        for i in 0..out {
            for j in 0..full {
                uu[i * full + j] = u[(i, j)];
            }
        }
        let mut vt = vec![0f32; full * inp];
        for j in 0..full {
            for i in 0..inp {
                vt[j * inp + i] = v[(i, j)];
            }
        }
        Ok(Self {
            out,
            inp,
            u: uu,
            s: (0..full).map(|i| s[i]).collect(),
            vt,
        })
    }

    /// The largest meaningful rank, `min(out, in)`.
    pub fn full_rank(&self) -> usize {
        self.s.len()
    }

    pub fn singular_values(&self) -> &[f32] {
        &self.s
    }

    /// `(A [r, in], B [out, r])` for rank `r` (clamped to full rank).
    pub fn lora(&self, rank: usize) -> (Vec<f32>, Vec<f32>) {
        let r = rank.min(self.full_rank());
        let full = self.full_rank();
        let a = self.vt[..r * self.inp].to_vec();
        let mut b = vec![0f32; self.out * r];
        for i in 0..self.out {
            for j in 0..r {
                b[i * r + j] = self.u[i * full + j] * self.s[j];
            }
        }
        (a, b)
    }

    pub fn shape(&self) -> (usize, usize) {
        (self.out, self.inp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matrix(out: usize, inp: usize) -> Vec<f32> {
        (0..out * inp)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0)
            .collect()
    }

    fn reconstruct(a: &[f32], b: &[f32], out: usize, inp: usize, r: usize) -> Vec<f32> {
        let mut w = vec![0f32; out * inp];
        for i in 0..out {
            for j in 0..inp {
                w[i * inp + j] = (0..r).map(|t| b[i * r + t] * a[t * inp + j]).sum();
            }
        }
        w
    }

    #[test]
    fn full_rank_reconstructs_and_truncation_error_is_the_dropped_spectrum() {
        for (out, inp) in [(12, 7), (7, 12)] {
            let w = matrix(out, inp);
            let f = Factors::new(&w, out, inp).unwrap();
            assert_eq!(f.full_rank(), 7);
            let (a, b) = f.lora(100);
            let back = reconstruct(&a, &b, out, inp, 7);
            let err = w
                .iter()
                .zip(&back)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            assert!(err < 1e-4, "full-rank reconstruction error {err}");
            // Frobenius error of the rank-3 cut equals the norm of the dropped singular values.
            let (a, b) = f.lora(3);
            let cut = reconstruct(&a, &b, out, inp, 3);
            let fro: f32 = w
                .iter()
                .zip(&cut)
                .map(|(x, y)| (x - y) * (x - y))
                .sum::<f32>()
                .sqrt();
            let dropped: f32 = f.singular_values()[3..]
                .iter()
                .map(|s| s * s)
                .sum::<f32>()
                .sqrt();
            assert!(
                (fro - dropped).abs() < 1e-3 * dropped.max(1.0),
                "{fro} vs {dropped}"
            );
            assert!(f.singular_values().windows(2).all(|s| s[0] >= s[1]));
        }
    }
}
