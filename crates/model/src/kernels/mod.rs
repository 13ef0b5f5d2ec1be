//! Hand-written CPU kernels for the two places where candle's general ops lose: decode-sized
//! matmuls (candle runs an m=1 matmul on one core, so batch-1 decoding leaves the second core
//! idle, and packs the whole weight for every call, which dominates at tens of rows) and
//! attention over per-sequence KV caches of different lengths (one small op per sequence would
//! cost more in dispatch than in arithmetic). Each kernel has a test against a plain reference.
//!
//! Instruction sets are picked at run time, so one binary runs everywhere: an AVX-512
//! register-tiled kernel ([`avx512`]) where the CPU has it, else generic loops instantiated once
//! with AVX2+FMA and once for the baseline target.

#[cfg(target_arch = "x86_64")]
mod avx512;

/// Largest row count for which [`matmul_nt`] beats candle's gemm on this CPU (`rrt bench
/// matmul` measures both): the AVX-512 kernel up to 1024 rows, the generic one up to 8.
pub fn matmul_nt_max_rows() -> usize {
    if has_avx512() {
        1024
    } else {
        8
    }
}

use rayon::prelude::*;

/// Whether the CPU has AVX-512F (checked once).
pub(crate) fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static DETECTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *DETECTED.get_or_init(|| std::arch::is_x86_feature_detected!("avx512f"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether the CPU has AVX2 and FMA (checked once).
pub(crate) fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static DETECTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *DETECTED.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Dot product with 16 independent accumulators so the compiler can keep them in vector lanes.
#[inline(always)]
pub(crate) fn dot<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
    const L: usize = 16;
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; L];
    let chunks = n / L;
    for c in 0..chunks {
        let (ca, cb) = (&a[c * L..c * L + L], &b[c * L..c * L + L]);
        for j in 0..L {
            acc[j] = if FMA {
                ca[j].mul_add(cb[j], acc[j])
            } else {
                acc[j] + ca[j] * cb[j]
            };
        }
    }
    let mut tail = 0f32;
    for j in chunks * L..n {
        tail += a[j] * b[j];
    }
    let mut s = 0f32;
    for v in acc {
        s += v;
    }
    s + tail
}

/// `y += alpha * x`, element-wise.
#[inline(always)]
pub(crate) fn axpy<const FMA: bool>(alpha: f32, x: &[f32], y: &mut [f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi = if FMA {
            xi.mul_add(alpha, *yi)
        } else {
            *yi + alpha * xi
        };
    }
}

/// Output rows of `w` per parallel task in [`matmul_small`].
const ROWS_PER_TASK: usize = 32;

#[inline(always)]
fn matmul_rows<const FMA: bool>(x: &[f32], m: usize, k: usize, w_chunk: &[f32], out_t: &mut [f32]) {
    for (j, w_row) in w_chunk.chunks_exact(k).enumerate() {
        for r in 0..m {
            out_t[j * m + r] = dot::<FMA>(w_row, &x[r * k..(r + 1) * k]);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn matmul_rows_avx2(x: &[f32], m: usize, k: usize, w_chunk: &[f32], out_t: &mut [f32]) {
    matmul_rows::<true>(x, m, k, w_chunk, out_t)
}

/// `y = x w^T` for `x` (`[m, k]`) and a weight `w` in Linear layout (`[n, k]`), split over
/// output columns so every core streams its share of the weight. Returns `[m, n]`.
pub fn matmul_nt(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
    assert_eq!(x.len(), m * k, "x is not [m, k]");
    assert_eq!(w.len(), n * k, "w is not [n, k]");
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        return matmul_nt_avx512(x, m, k, w, n);
    }
    matmul_nt_generic(x, m, k, w, n)
}

/// Output columns per parallel task of the AVX-512 path (a multiple of the 4-column tile).
const COLS_PER_TASK: usize = 64;

#[cfg(target_arch = "x86_64")]
fn matmul_nt_avx512(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
    struct Out(*mut f32);
    // SAFETY: tasks write disjoint column ranges of the output.
    unsafe impl Sync for Out {}
    let mut out = vec![0f32; m * n];
    let ptr = Out(out.as_mut_ptr());
    let tasks = n.div_ceil(COLS_PER_TASK);
    (0..tasks).into_par_iter().for_each(|t| {
        let cols = t * COLS_PER_TASK..((t + 1) * COLS_PER_TASK).min(n);
        let ptr = &ptr;
        // SAFETY: AVX-512F was detected; shapes were checked above; column ranges are disjoint.
        unsafe { avx512::gemm_nt_cols(x, m, k, w, cols, ptr.0, n) };
    });
    out
}

/// The AVX2/baseline path: one dot product per (row, column), tasks over column blocks.
pub fn matmul_nt_generic(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
    let mut out_t = vec![0f32; n * m];
    let avx2 = has_avx2_fma();
    out_t
        .par_chunks_mut(ROWS_PER_TASK * m)
        .zip(w.par_chunks(ROWS_PER_TASK * k))
        .for_each(|(out_chunk, w_chunk)| {
            #[cfg(target_arch = "x86_64")]
            if avx2 {
                // SAFETY: the CPU supports AVX2 and FMA (checked at run time above).
                unsafe { matmul_rows_avx2(x, m, k, w_chunk, out_chunk) };
                return;
            }
            let _ = avx2;
            matmul_rows::<false>(x, m, k, w_chunk, out_chunk)
        });
    if m == 1 {
        return out_t;
    }
    let mut out = vec![0f32; m * n];
    for j in 0..n {
        for r in 0..m {
            out[r * n + j] = out_t[j * m + r];
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
        let mut out = vec![0f32; m * n];
        for r in 0..m {
            for j in 0..n {
                out[r * n + j] = (0..k)
                    .map(|i| x[r * k + i] as f64 * w[j * k + i] as f64)
                    .sum::<f64>() as f32;
            }
        }
        out
    }

    fn pseudo_random(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s as f32 / u32::MAX as f32) - 0.5
            })
            .collect()
    }

    #[test]
    fn few_row_matmul_matches_reference_for_odd_shapes() {
        let shapes = [
            (1, 576, 1536),
            (3, 67, 101),
            (8, 576, 49),
            (1, 5, 1),
            (5, 1536, 576),
            (33, 576, 130),
            (64, 17, 257),
        ];
        for &(m, k, n) in &shapes {
            let x = pseudo_random(m * k, 1);
            let w = pseudo_random(n * k, 2);
            let want = reference(&x, m, k, &w, n);
            for (path, got) in [
                ("dispatched", matmul_nt(&x, m, k, &w, n)),
                ("generic", matmul_nt_generic(&x, m, k, &w, n)),
            ] {
                let diff = got
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(diff < 1e-4, "{path}: m={m} k={k} n={n}: max diff {diff}");
            }
        }
    }

    #[test]
    fn dot_plain_and_fma_agree_with_tail() {
        let a = pseudo_random(103, 3);
        let b = pseudo_random(103, 4);
        let want: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!((dot::<false>(&a, &b) - want).abs() < 1e-4);
        assert!((dot::<true>(&a, &b) - want).abs() < 1e-4);
    }
}
