//! Causal grouped-query attention over per-sequence KV caches, for a flattened batch: the rows of
//! one fused QKV projection belong to several sequences ([`AttnSegment`]s), each with its own
//! cache and position. RoPE is applied here, the new K/V rows are appended to each cache, and each
//! (sequence, KV head, query chunk) is one parallel task reading its cache in place.

use std::ops::Range;

use rayon::prelude::*;

use crate::kernels::{axpy, dot, has_avx2_fma};
use crate::kv_cache::LayerKv;
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
    let fma = has_avx2_fma();
    let results: Vec<Vec<f32>> = tasks
        .par_iter()
        .map(|t| {
            let mut out = vec![0f32; t.rows.len() * dims.group() * dims.head_dim];
            run_task(fma, t, qkv, width, caches[t.segment], dims, &mut out);
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
    fma: bool,
    t: &Task,
    qkv: &[f32],
    width: usize,
    cache: &LayerKv,
    dims: AttnDims,
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if fma {
        // SAFETY: AVX2 and FMA were detected at run time.
        unsafe { attend_avx2(t, qkv, width, cache, dims, out) };
        return;
    }
    let _ = fma;
    attend::<false>(t, qkv, width, cache, dims, out)
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
    let kv_row = dims.kv_dim();
    let kv_off = t.kv_head * d;
    let scale = 1.0 / (d as f32).sqrt();
    let mut scores = Vec::with_capacity(t.pos0 + t.rows.len());
    for (ri, row) in t.rows.clone().enumerate() {
        let visible = t.pos0 + ri + 1;
        for hg in 0..g {
            let h = t.kv_head * g + hg;
            let q = &qkv[row * width + h * d..row * width + (h + 1) * d];
            scores.clear();
            let mut max = f32::NEG_INFINITY;
            for j in 0..visible {
                let k = &cache.k[j * kv_row + kv_off..j * kv_row + kv_off + d];
                let s = dot::<FMA>(q, k) * scale;
                max = max.max(s);
                scores.push(s);
            }
            let mut sum = 0f32;
            for s in scores.iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
            let inv = 1.0 / sum;
            let o = &mut out[(ri * g + hg) * d..(ri * g + hg + 1) * d];
            for (j, &p) in scores.iter().enumerate() {
                let v = &cache.v[j * kv_row + kv_off..j * kv_row + kv_off + d];
                axpy::<FMA>(p * inv, v, o);
            }
        }
    }
}
