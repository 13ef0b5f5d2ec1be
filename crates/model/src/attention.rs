//! Causal grouped-query attention over per-sequence KV caches, for a flattened batch: the rows of
//! one fused QKV projection belong to several sequences ([`AttnSegment`]s), each with its own
//! cache and position. RoPE is applied here, the new K/V rows are appended to each cache, and each
//! (sequence, KV head, query chunk) is one parallel task reading its cache in place: scores 16
//! positions at a time from the block-transposed K, softmax, then the weighted sum of V rows.

use std::ops::Range;

use rayon::prelude::*;

use crate::kernels::{axpy, exp_fast, has_avx2_fma, has_avx512};
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
            run_task(t, qkv, width, caches[t.segment], dims, &mut out);
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

fn run_task(t: &Task, qkv: &[f32], width: usize, cache: &LayerKv, dims: AttnDims, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx512() {
            // SAFETY: AVX-512F was detected at run time.
            return unsafe { attend_avx512(t, qkv, width, cache, dims, out) };
        }
        if has_avx2_fma() {
            // SAFETY: AVX2 and FMA were detected at run time.
            return unsafe { attend_avx2(t, qkv, width, cache, dims, out) };
        }
    }
    attend::<false>(t, qkv, width, cache, dims, out)
}

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
