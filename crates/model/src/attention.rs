//! Causal grouped-query attention over per-sequence KV caches, for a flattened batch: the rows of
//! one fused QKV projection belong to several sequences ([`AttnSegment`]s), each with its own
//! cache and position. RoPE is applied here, the new K/V rows are appended to each cache, and each
//! (sequence, KV head, query chunk) is one parallel task reading its cache in place: scores 16
//! positions at a time from the block-transposed K, softmax, then the weighted sum of V rows.

use std::ops::Range;

use rayon::prelude::*;

use crate::kernels::{axpy, exp_fast, Isa, Supported};
use crate::kv_cache::{LayerKv, KV_BLOCK};
use crate::rope::Rope;

/// The rows of one sequence in a flattened batch, for one layer.
pub struct AttnSegment<'a> {
    /// Rows of the batch that belong to this sequence (its new tokens, in order).
    pub rows: Range<usize>,
    /// Position of the first new token; the cache is cut back to this length first.
    pub start: usize,
    pub cache: &'a mut LayerKv,
}

/// Head geometry of a layer.
#[derive(Debug, Clone, Copy)]
pub struct AttnDims {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl AttnDims {
    fn group(&self) -> usize {
        self.heads / self.kv_heads
    }
    fn q_dim(&self) -> usize {
        self.heads * self.head_dim
    }
    fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }
}

/// Query rows per parallel task (long prefills are split so both cores share one sequence).
const QUERY_CHUNK: usize = 16;

struct Task {
    segment: usize,
    kv_head: usize,
    /// Batch rows of this task.
    rows: Range<usize>,
    /// Position of `rows.start`.
    pos0: usize,
}

/// Rotates Q and K of each segment's rows to their positions and appends K and V to the
/// segment's cache (cut back to `start` first). `qkv` is `[rows, q_dim + 2 * kv_dim]`. This is
/// attention's first half; on its own it fills the KV of tokens that skipped a layer (state
/// propagation for early-exited tokens).
pub fn append_kv(qkv: &mut [f32], segments: &mut [AttnSegment<'_>], dims: AttnDims, rope: &Rope) {
    let (q_dim, kv_dim) = (dims.q_dim(), dims.kv_dim());
    let width = q_dim + 2 * kv_dim;
    for seg in segments.iter_mut() {
        seg.cache.truncate(seg.start);
        for (i, row) in seg.rows.clone().enumerate() {
            let r = &mut qkv[row * width..(row + 1) * width];
            let (q, kv) = r.split_at_mut(q_dim);
            let (k, v) = kv.split_at_mut(kv_dim);
            rope.apply(q, seg.start + i);
            rope.apply(k, seg.start + i);
            seg.cache.push(k, v);
        }
    }
}

/// Attention for a flattened batch. `qkv` is `[rows, q_dim + 2 * kv_dim]` (Q | K | V per row) and
/// is rotated in place; returns the attention output `[rows, q_dim]`.
pub fn attention(
    qkv: &mut [f32],
    segments: &mut [AttnSegment<'_>],
    dims: AttnDims,
    rope: &Rope,
) -> Vec<f32> {
    attention_on(Supported::best(), qkv, segments, dims, rope)
}

/// [`attention`] on a given instruction set of this CPU (tests compare them).
pub fn attention_on(
    isa: Supported,
    qkv: &mut [f32],
    segments: &mut [AttnSegment<'_>],
    dims: AttnDims,
    rope: &Rope,
) -> Vec<f32> {
    let (q_dim, kv_dim) = (dims.q_dim(), dims.kv_dim());
    let width = q_dim + 2 * kv_dim;
    let total_rows = qkv.len() / width;
    append_kv(qkv, segments, dims, rope);
    let mut tasks = Vec::new();
    for (s, seg) in segments.iter().enumerate() {
        for kv_head in 0..dims.kv_heads {
            let mut r = seg.rows.start;
            while r < seg.rows.end {
                let end = (r + QUERY_CHUNK).min(seg.rows.end);
                tasks.push(Task {
                    segment: s,
                    kv_head,
                    rows: r..end,
                    pos0: seg.start + (r - seg.rows.start),
                });
                r = end;
            }
        }
    }
    let qkv = &*qkv;
    let caches: Vec<&LayerKv> = segments.iter().map(|s| &*s.cache).collect();
    let results: Vec<Vec<f32>> = tasks
        .par_iter()
        .map(|t| {
            let mut out = vec![0f32; t.rows.len() * dims.group() * dims.head_dim];
            run_task(isa, t, qkv, width, caches[t.segment], dims, &mut out);
            out
        })
        .collect();
    let d = dims.head_dim;
    let g = dims.group();
    let mut out = vec![0f32; total_rows * q_dim];
    for (t, res) in tasks.iter().zip(results) {
        for (ri, row) in t.rows.clone().enumerate() {
            for hg in 0..g {
                let h = t.kv_head * g + hg;
                out[row * q_dim + h * d..row * q_dim + (h + 1) * d]
                    .copy_from_slice(&res[(ri * g + hg) * d..(ri * g + hg + 1) * d]);
            }
        }
    }
    out
}

fn run_task(
    isa: Supported,
    t: &Task,
    qkv: &[f32],
    width: usize,
    cache: &LayerKv,
    dims: AttnDims,
    out: &mut [f32],
) {
    match isa.isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX-512F runs on this CPU (only detection makes a `Supported`).
        Isa::Avx512 | Isa::Avx512Vnni | Isa::Avx512Bf16 => unsafe {
            attend_avx512(t, qkv, width, cache, dims, out)
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX2 and FMA run on this CPU (as above).
        Isa::Avx2 => unsafe { attend_avx2(t, qkv, width, cache, dims, out) },
        _ => attend::<false>(t, qkv, width, cache, dims, out),
    }
}

/// [`attend`] compiled for AVX-512F.
///
/// # Safety
/// The CPU supports AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn attend_avx512(
    t: &Task,
    qkv: &[f32],
    width: usize,
    cache: &LayerKv,
    dims: AttnDims,
    out: &mut [f32],
) {
    attend::<true>(t, qkv, width, cache, dims, out)
}

/// [`attend`] compiled for AVX2 with FMA.
///
/// # Safety
/// The CPU supports AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_avx2(
    t: &Task,
    qkv: &[f32],
    width: usize,
    cache: &LayerKv,
    dims: AttnDims,
    out: &mut [f32],
) {
    attend::<true>(t, qkv, width, cache, dims, out)
}

/// Scores of 16 cached positions for one query head: `q . K[j]` for each lane `j`, computed as
/// 16-lane FMAs over the transposed K block.
#[inline(always)]
fn block_scores<const FMA: bool>(q: &[f32], k_block: &[f32]) -> [f32; KV_BLOCK] {
    let mut acc = [0f32; KV_BLOCK];
    for (&qd, kr) in q.iter().zip(k_block.chunks_exact(KV_BLOCK)) {
        for (a, &k) in acc.iter_mut().zip(kr) {
            *a = if FMA { qd.mul_add(k, *a) } else { *a + qd * k };
        }
    }
    acc
}

/// `o = inv * sum_j p_j V[j]` with the accumulator in registers (head size known at compile time).
#[inline(always)]
fn weighted_v<const FMA: bool, const D: usize>(
    probs: &[f32],
    inv: f32,
    cache: &LayerKv,
    kv_off: usize,
    o: &mut [f32],
) {
    let mut acc = [0f32; D];
    for (j, &p) in probs.iter().enumerate() {
        let v = cache.v_row(j, kv_off, D);
        for (a, &x) in acc.iter_mut().zip(v) {
            *a = if FMA { p.mul_add(x, *a) } else { *a + p * x };
        }
    }
    for (o, a) in o.iter_mut().zip(acc) {
        *o = a * inv;
    }
}

#[inline(always)]
fn attend<const FMA: bool>(
    t: &Task,
    qkv: &[f32],
    width: usize,
    cache: &LayerKv,
    dims: AttnDims,
    out: &mut [f32],
) {
    let d = dims.head_dim;
    let g = dims.group();
    let kv_off = t.kv_head * d;
    let scale = 1.0 / (d as f32).sqrt();
    let mut scores = Vec::with_capacity((t.pos0 + t.rows.len()).div_ceil(KV_BLOCK) * KV_BLOCK);
    for (ri, row) in t.rows.clone().enumerate() {
        let visible = t.pos0 + ri + 1;
        for hg in 0..g {
            let h = t.kv_head * g + hg;
            let q = &qkv[row * width + h * d..row * width + (h + 1) * d];
            scores.clear();
            for b in 0..visible.div_ceil(KV_BLOCK) {
                scores.extend_from_slice(&block_scores::<FMA>(q, cache.k_block(b, kv_off, d)));
            }
            let scores = &mut scores[..visible];
            let mut max = f32::NEG_INFINITY;
            for s in scores.iter_mut() {
                *s *= scale;
                max = max.max(*s);
            }
            for s in scores.iter_mut() {
                *s = exp_fast(*s - max);
            }
            let sum: f32 = scores.iter().sum();
            let inv = 1.0 / sum;
            let o = &mut out[(ri * g + hg) * d..(ri * g + hg + 1) * d];
            match d {
                16 => weighted_v::<FMA, 16>(scores, inv, cache, kv_off, o),
                32 => weighted_v::<FMA, 32>(scores, inv, cache, kv_off, o),
                64 => weighted_v::<FMA, 64>(scores, inv, cache, kv_off, o),
                128 => weighted_v::<FMA, 128>(scores, inv, cache, kv_off, o),
                _ => {
                    for (j, &p) in scores.iter().enumerate() {
                        axpy::<FMA>(p * inv, cache.v_row(j, kv_off, d), o);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::Supported;

    fn pseudo_random(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
            })
            .collect()
    }

    /// Causal GQA attention in f64 over a whole sequence: `qkv` rows are unrotated; RoPE
    /// (half-split) computed here from its definition. Returns `[positions, q_dim]`.
    fn reference(qkv: &[f32], dims: AttnDims, theta: f64) -> Vec<f64> {
        let (d, q_dim, kv_dim) = (dims.head_dim, dims.q_dim(), dims.kv_dim());
        let width = q_dim + 2 * kv_dim;
        let n = qkv.len() / width;
        let rotate = |x: &[f32], pos: usize| -> Vec<f64> {
            let mut out: Vec<f64> = x.iter().map(|&v| v as f64).collect();
            for head in out.chunks_exact_mut(d) {
                for i in 0..d / 2 {
                    let angle = pos as f64 * theta.powf(-2.0 * i as f64 / d as f64);
                    let (a, b) = (head[i], head[i + d / 2]);
                    head[i] = a * angle.cos() - b * angle.sin();
                    head[i + d / 2] = b * angle.cos() + a * angle.sin();
                }
            }
            out
        };
        let q: Vec<Vec<f64>> = (0..n)
            .map(|t| rotate(&qkv[t * width..t * width + q_dim], t))
            .collect();
        let k: Vec<Vec<f64>> = (0..n)
            .map(|t| rotate(&qkv[t * width + q_dim..t * width + q_dim + kv_dim], t))
            .collect();
        let v = |t: usize| &qkv[t * width + q_dim + kv_dim..(t + 1) * width];
        let mut out = vec![0f64; n * q_dim];
        for t in 0..n {
            for h in 0..dims.heads {
                let kvh = h / dims.group();
                let qh = &q[t][h * d..(h + 1) * d];
                let scores: Vec<f64> = (0..=t)
                    .map(|j| {
                        let kj = &k[j][kvh * d..(kvh + 1) * d];
                        qh.iter().zip(kj).map(|(a, b)| a * b).sum::<f64>() / (d as f64).sqrt()
                    })
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let z: f64 = e.iter().sum();
                for (j, p) in e.iter().enumerate() {
                    for i in 0..d {
                        out[t * q_dim + h * d + i] += p / z * v(j)[kvh * d + i] as f64;
                    }
                }
            }
        }
        out
    }

    /// Two sequences in one batch, each run as a prefill and then a few more rows against its
    /// cache (long enough to span several K blocks and query chunks), against the reference, on
    /// every instruction set this CPU runs and every head size with a path of its own.
    #[test]
    fn attention_matches_an_f64_reference_on_every_instruction_set_here() {
        let theta = 10_000.0;
        for head_dim in [16, 24, 64] {
            let dims = AttnDims {
                heads: 4,
                kv_heads: 2,
                head_dim,
            };
            let width = dims.q_dim() + 2 * dims.kv_dim();
            let rope = Rope::new(head_dim, theta, 128);
            // Sequence lengths and where each splits into prefill + continuation.
            let seqs = [(37usize, 20usize), (19, 16)];
            let texts: Vec<Vec<f32>> = seqs
                .iter()
                .enumerate()
                .map(|(i, &(n, _))| pseudo_random(n * width, (head_dim * 10 + i) as u64))
                .collect();
            let want: Vec<Vec<f64>> = texts.iter().map(|t| reference(t, dims, theta)).collect();
            for &isa in Supported::all() {
                let mut caches: Vec<LayerKv> =
                    seqs.iter().map(|_| LayerKv::new(dims.kv_dim())).collect();
                let mut worst = 0f64;
                for part in 0..2 {
                    let spans: Vec<Range<usize>> = seqs
                        .iter()
                        .map(|&(n, split)| if part == 0 { 0..split } else { split..n })
                        .collect();
                    let mut qkv: Vec<f32> = spans
                        .iter()
                        .zip(&texts)
                        .flat_map(|(s, t)| t[s.start * width..s.end * width].iter().copied())
                        .collect();
                    let mut row = 0;
                    let mut segments: Vec<AttnSegment<'_>> = spans
                        .iter()
                        .zip(caches.iter_mut())
                        .map(|(s, cache)| {
                            row += s.len();
                            AttnSegment {
                                rows: row - s.len()..row,
                                start: s.start,
                                cache,
                            }
                        })
                        .collect();
                    let got = attention_on(isa, &mut qkv, &mut segments, dims, &rope);
                    let mut row = 0;
                    for (s, w) in spans.iter().zip(&want) {
                        for t in s.clone() {
                            let g = &got[row * dims.q_dim()..(row + 1) * dims.q_dim()];
                            let r = &w[t * dims.q_dim()..(t + 1) * dims.q_dim()];
                            for (a, b) in g.iter().zip(r) {
                                worst = worst.max((*a as f64 - b).abs());
                            }
                            row += 1;
                        }
                    }
                }
                assert!(
                    worst < 1e-5,
                    "{} head_dim {head_dim}: max error {worst}",
                    isa.isa().name()
                );
            }
        }
    }
}
