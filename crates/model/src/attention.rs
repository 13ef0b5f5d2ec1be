//! Causal grouped-query attention over paged KV, for a flattened batch: the rows of one fused
//! QKV projection belong to several sequences ([`AttnSegment`]s), each with its own block table
//! and position. RoPE is applied here, the new K/V rows are written into each sequence's blocks
//! of the [`KvPool`], and each (sequence, KV head, query chunk) is one parallel task reading the
//! blocks in place through the table: scores 16 positions at a time from the tile-transposed K,
//! softmax, then the weighted sum of V rows, block by block. f32 and bf16 KV share the kernel
//! (bf16 is widened once per row loaded, for every query head of the KV head).

use std::ops::Range;

use rayon::prelude::*;

use crate::error::Result;
use crate::kernels::{exp_fast, Isa, Supported};
use crate::kv::store::{KvData, KvElem, LayerView, Regions};
use crate::kv::{KvLayout, KvPool, SeqCache, KV_TILE};
use crate::rope::Rope;

/// The rows of one sequence in a flattened batch, for one layer.
pub struct AttnSegment<'a> {
    /// Rows of the batch that belong to this sequence (its new tokens, in order).
    pub rows: Range<usize>,
    /// Position of the first new token: the rows are written at `start..` and see the cached
    /// positions before them.
    pub start: usize,
    /// The sequence's block table (its blocks must cover `start + rows.len()` positions).
    pub cache: &'a SeqCache,
    /// The unrolled layer.
    pub layer: usize,
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

/// Rotates Q and K of each segment's rows to their positions and writes K and V into the
/// segment's blocks at `start..` (which must be the sequence's own: a shared or sealed block
/// is refused). `qkv` is `[rows, q_dim + 2 * kv_dim]`. This is attention's first half; on its
/// own it fills the KV of tokens that skipped a layer (state propagation for early-exited
/// tokens).
pub fn append_kv(
    kv: &mut KvPool,
    qkv: &mut [f32],
    segments: &[AttnSegment<'_>],
    dims: AttnDims,
    rope: &Rope,
) -> Result<()> {
    let (q_dim, kv_dim) = (dims.q_dim(), dims.kv_dim());
    let width = q_dim + 2 * kv_dim;
    for seg in segments {
        for (i, row) in seg.rows.clone().enumerate() {
            let r = &mut qkv[row * width..(row + 1) * width];
            let (q, kv_row) = r.split_at_mut(q_dim);
            let (k, v) = kv_row.split_at_mut(kv_dim);
            rope.apply(q, seg.start + i);
            rope.apply(k, seg.start + i);
            kv.write(seg.cache, seg.layer, seg.start + i, k, v)?;
        }
    }
    Ok(())
}

/// Asks the CPU to bring the K and V the segments will read into its caches.
pub(crate) fn prefetch_kv(kv: &KvPool, segments: &[AttnSegment<'_>]) {
    let layout = kv.layout();
    for s in segments {
        let positions = s.start + s.rows.len();
        match kv.data() {
            KvData::F32(r) => view(r, None, layout, s).prefetch(positions),
            KvData::Bf16(r) => view(r, None, layout, s).prefetch(positions),
            KvData::Int8(r, scales) => view(r, Some(scales), layout, s).prefetch(positions),
        }
    }
}

fn view<'a, T: KvElem>(
    r: &'a Regions<T>,
    scales: Option<&'a Regions<f32>>,
    layout: KvLayout,
    s: &AttnSegment<'a>,
) -> LayerView<'a, T> {
    LayerView::new(r, scales, layout, s.layer, s.cache.blocks())
}

/// Attention for a flattened batch. `qkv` is `[rows, q_dim + 2 * kv_dim]` (Q | K | V per row) and
/// is rotated in place; returns the attention output `[rows, q_dim]`.
pub fn attention(
    kv: &mut KvPool,
    qkv: &mut [f32],
    segments: &[AttnSegment<'_>],
    dims: AttnDims,
    rope: &Rope,
) -> Result<Vec<f32>> {
    attention_on(Supported::best(), kv, qkv, segments, dims, rope)
}

/// [`attention`] on a given instruction set of this CPU (tests compare them).
pub fn attention_on(
    isa: Supported,
    kv: &mut KvPool,
    qkv: &mut [f32],
    segments: &[AttnSegment<'_>],
    dims: AttnDims,
    rope: &Rope,
) -> Result<Vec<f32>> {
    let (q_dim, kv_dim) = (dims.q_dim(), dims.kv_dim());
    let width = q_dim + 2 * kv_dim;
    let total_rows = qkv.len() / width;
    append_kv(kv, qkv, segments, dims, rope)?;
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
    let layout = kv.layout();
    let results = match kv.data() {
        KvData::F32(r) => run_tasks(isa, &tasks, qkv, width, (r, None), layout, segments, dims),
        KvData::Bf16(r) => run_tasks(isa, &tasks, qkv, width, (r, None), layout, segments, dims),
        KvData::Int8(r, scales) => run_tasks(
            isa,
            &tasks,
            qkv,
            width,
            (r, Some(scales)),
            layout,
            segments,
            dims,
        ),
    };
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
    Ok(out)
}

/// Every task on the compute pool, each reading its segment's blocks in place.
#[allow(clippy::too_many_arguments)]
fn run_tasks<T: KvElem>(
    isa: Supported,
    tasks: &[Task],
    qkv: &[f32],
    width: usize,
    (regions, scales): (&Regions<T>, Option<&Regions<f32>>),
    layout: KvLayout,
    segments: &[AttnSegment<'_>],
    dims: AttnDims,
) -> Vec<Vec<f32>> {
    let views: Vec<LayerView<'_, T>> = segments
        .iter()
        .map(|s| view(regions, scales, layout, s))
        .collect();
    tasks
        .par_iter()
        .map(|t| {
            let mut out = vec![0f32; t.rows.len() * dims.group() * dims.head_dim];
            run_task(isa, t, qkv, width, &views[t.segment], dims, &mut out);
            out
        })
        .collect()
}

fn run_task<T: KvElem>(
    isa: Supported,
    t: &Task,
    qkv: &[f32],
    width: usize,
    cache: &LayerView<'_, T>,
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
        _ => attend::<false, T>(t, qkv, width, cache, dims, out),
    }
}

/// [`attend`] compiled for AVX-512F.
///
/// # Safety
/// The CPU supports AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn attend_avx512<T: KvElem>(
    t: &Task,
    qkv: &[f32],
    width: usize,
    cache: &LayerView<'_, T>,
    dims: AttnDims,
    out: &mut [f32],
) {
    attend::<true, T>(t, qkv, width, cache, dims, out)
}

/// [`attend`] compiled for AVX2 with FMA.
///
/// # Safety
/// The CPU supports AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_avx2<T: KvElem>(
    t: &Task,
    qkv: &[f32],
    width: usize,
    cache: &LayerView<'_, T>,
    dims: AttnDims,
    out: &mut [f32],
) {
    attend::<true, T>(t, qkv, width, cache, dims, out)
}

/// Query heads of one KV head's group attended together: they share every K and V load, and
/// their sums are independent dependency chains (one head at a time waited on the latency of
/// one chain of FMAs: measured ~14% of a batch-32 decode step).
const HEADS_AT_ONCE: usize = 4;

/// Scores of 16 cached positions for `H` query heads: `q_h . K[j]` for each lane `j`, as
/// 16-lane FMAs over the transposed K tile, even and odd features summed apart (two chains a
/// head), then added.
#[inline(always)]
fn block_scores<const FMA: bool, const H: usize, T: KvElem>(
    q: &[&[f32]; H],
    k_tile: &[T],
) -> [[f32; KV_TILE]; H] {
    let d = k_tile.len() / KV_TILE;
    assert!(
        q.iter().all(|q| q.len() >= d),
        "a query shorter than the K tile"
    );
    let mut even = [[0f32; KV_TILE]; H];
    let mut odd = [[0f32; KV_TILE]; H];
    let fma = |a: &mut [f32; KV_TILE], qd: f32, k: &[f32; KV_TILE]| {
        for (a, &k) in a.iter_mut().zip(k) {
            *a = if FMA { qd.mul_add(k, *a) } else { *a + qd * k };
        }
    };
    // A K row is widened to f32 once for all `H` heads (a bf16 cache widened it per head).
    let widen = |kr: &[T]| -> [f32; KV_TILE] { std::array::from_fn(|i| kr[i].load()) };
    // Every index read below is `2j`, `2j + 1` with `j < d / 2` (one pair of K rows per `j`)
    // or `d - 1`: below `d`, which no query is shorter than (asserted). A checked index here
    // cost a compare and branch per FMA.
    let at = |h: usize, i: usize| {
        debug_assert!(i < d);
        // SAFETY: `i < d <= q[h].len()`, as said above.
        unsafe { *q[h].get_unchecked(i) }
    };
    let mut pairs = k_tile.chunks_exact(2 * KV_TILE);
    // h indexes the queries and both accumulator arrays alike.
    #[allow(clippy::needless_range_loop)]
    for (j, kr) in (&mut pairs).enumerate() {
        let (k0, k1) = kr.split_at(KV_TILE);
        let (k0, k1) = (widen(k0), widen(k1));
        for h in 0..H {
            fma(&mut even[h], at(h, 2 * j), &k0);
            fma(&mut odd[h], at(h, 2 * j + 1), &k1);
        }
    }
    let last = pairs.remainder();
    if !last.is_empty() {
        let last = widen(last);
        for (h, even) in even.iter_mut().enumerate() {
            fma(even, at(h, d - 1), &last);
        }
    }
    for h in 0..H {
        for (e, o) in even[h].iter_mut().zip(odd[h]) {
            *e += o;
        }
    }
    even
}

/// `s_j <- exp((s_j - max s) * scale)` (the softmax numerators of scores `s`), returning their
/// sum. Max and sum run lane-wise over 16 lanes, so both reductions vectorize (a plain float
/// `max`/`sum` fold does not: its order is fixed).
#[inline(always)]
fn softmax_in_place(s: &mut [f32], scale: f32) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; KV_TILE];
    let mut chunks = s.chunks_exact(KV_TILE);
    for c in &mut chunks {
        for (m, &x) in lanes.iter_mut().zip(c) {
            *m = if x > *m { x } else { *m };
        }
    }
    let max = chunks
        .remainder()
        .iter()
        .chain(&lanes)
        .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m });
    let mut sums = [0f32; KV_TILE];
    let mut chunks = s.chunks_exact_mut(KV_TILE);
    for c in &mut chunks {
        for (a, x) in sums.iter_mut().zip(c) {
            *x = exp_fast((*x - max) * scale);
            *a += *x;
        }
    }
    let mut sum: f32 = sums.iter().sum();
    for x in chunks.into_remainder() {
        *x = exp_fast((*x - max) * scale);
        sum += *x;
    }
    sum
}

/// `o_h = inv_h * sum_j p_hj V[j]` for `H` heads with the accumulators in registers (head size
/// known at compile time): each V row is loaded once for every head, block by block.
#[inline(always)]
fn weighted_v<const FMA: bool, const H: usize, const D: usize, T: KvElem>(
    probs: &[&[f32]; H],
    inv: &[f32; H],
    cache: &LayerView<'_, T>,
    kv_off: usize,
    o: &mut [f32],
) {
    let mut acc = [[0f32; D]; H];
    let (bt, row) = (cache.block_tokens(), cache.row());
    let visible = probs[0].len();
    for b in 0..visible.div_ceil(bt) {
        let rows = cache.v_block(b);
        let first = b * bt;
        // j indexes the block's V rows and every head's probabilities alike.
        #[allow(clippy::needless_range_loop)]
        for j in first..visible.min(first + bt) {
            let at = (j - first) * row + kv_off;
            let v = &rows[at..at + D];
            // Widened to f32 once for all `H` heads.
            let v: [f32; D] = std::array::from_fn(|i| v[i].load());
            for h in 0..H {
                let p = probs[h][j];
                for (a, &x) in acc[h].iter_mut().zip(&v) {
                    *a = if FMA { p.mul_add(x, *a) } else { *a + p * x };
                }
            }
        }
    }
    for (h, acc) in acc.iter().enumerate() {
        for (o, a) in o[h * D..(h + 1) * D].iter_mut().zip(acc) {
            *o = a * inv[h];
        }
    }
}

/// [`weighted_v`] for a head size without a path of its own.
fn weighted_v_any<const FMA: bool, T: KvElem>(
    probs: &[&[f32]],
    inv: &[f32],
    cache: &LayerView<'_, T>,
    kv_off: usize,
    d: usize,
    o: &mut [f32],
) {
    o.fill(0.0);
    let (bt, row) = (cache.block_tokens(), cache.row());
    for (h, probs) in probs.iter().enumerate() {
        let o = &mut o[h * d..(h + 1) * d];
        for (j, &p) in probs.iter().enumerate() {
            let at = (j % bt) * row + kv_off;
            let v = &cache.v_block(j / bt)[at..at + d];
            let w = p * inv[h];
            for (o, &x) in o.iter_mut().zip(v) {
                *o = if FMA {
                    w.mul_add(x.load(), *o)
                } else {
                    *o + w * x.load()
                };
            }
        }
    }
}

#[inline(always)]
fn attend<const FMA: bool, T: KvElem>(
    t: &Task,
    qkv: &[f32],
    width: usize,
    cache: &LayerView<'_, T>,
    dims: AttnDims,
    out: &mut [f32],
) {
    let g = dims.group();
    let mut scores = Vec::new();
    for (ri, row) in t.rows.clone().enumerate() {
        let visible = t.pos0 + ri + 1;
        let mut h0 = 0;
        while h0 < g {
            let heads = (g - h0).min(HEADS_AT_ONCE);
            let at = HeadsAt {
                row,
                first: h0,
                visible,
            };
            let o = &mut out[(ri * g + h0) * dims.head_dim..(ri * g + h0 + heads) * dims.head_dim];
            match heads {
                1 => attend_heads::<FMA, 1, T>(t, at, qkv, width, cache, dims, &mut scores, o),
                2 => attend_heads::<FMA, 2, T>(t, at, qkv, width, cache, dims, &mut scores, o),
                3 => attend_heads::<FMA, 3, T>(t, at, qkv, width, cache, dims, &mut scores, o),
                _ => attend_heads::<FMA, 4, T>(t, at, qkv, width, cache, dims, &mut scores, o),
            }
            h0 += heads;
        }
    }
}

/// Which query heads of which row [`attend_heads`] takes.
#[derive(Clone, Copy)]
struct HeadsAt {
    /// Batch row.
    row: usize,
    /// First head, within the task's group.
    first: usize,
    /// Cached positions the row sees (causal).
    visible: usize,
}

/// Attention of heads `at.first..at.first + H` of the task's group for one row, into `o`
/// (`[H, head_dim]`); `scores` is scratch.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn attend_heads<const FMA: bool, const H: usize, T: KvElem>(
    t: &Task,
    at: HeadsAt,
    qkv: &[f32],
    width: usize,
    cache: &LayerView<'_, T>,
    dims: AttnDims,
    scores: &mut Vec<f32>,
    o: &mut [f32],
) {
    let d = dims.head_dim;
    let kv_off = t.kv_head * d;
    let scale = 1.0 / (d as f32).sqrt();
    let q: [&[f32]; H] = std::array::from_fn(|i| {
        let h = t.kv_head * dims.group() + at.first + i;
        &qkv[at.row * width + h * d..at.row * width + (h + 1) * d]
    });
    let tiles = at.visible.div_ceil(KV_TILE);
    let stride = tiles * KV_TILE;
    scores.clear();
    scores.resize(H * stride, 0.0);
    for b in 0..tiles {
        let mut s = block_scores::<FMA, H, T>(&q, cache.k_tile(b, kv_off, d));
        if T::SCALED {
            // One scale per position: the scores of the scaled K.
            let ks = cache.k_scales(b, kv_off);
            for s in s.iter_mut() {
                for (x, &k) in s.iter_mut().zip(ks) {
                    *x *= k;
                }
            }
        }
        for (h, s) in s.iter().enumerate() {
            scores[h * stride + b * KV_TILE..h * stride + (b + 1) * KV_TILE].copy_from_slice(s);
        }
    }
    let mut inv = [0f32; H];
    for (h, inv) in inv.iter_mut().enumerate() {
        *inv = 1.0 / softmax_in_place(&mut scores[h * stride..h * stride + at.visible], scale);
    }
    if T::SCALED {
        // One scale per position: each weight takes its V row's, so the sum reads raw V.
        let bt = cache.block_tokens();
        for h in 0..H {
            let p = &mut scores[h * stride..h * stride + at.visible];
            for (b, p) in p.chunks_mut(bt).enumerate() {
                for (x, &v) in p.iter_mut().zip(cache.v_scales(b, kv_off)) {
                    *x *= v;
                }
            }
        }
    }
    let probs: [&[f32]; H] = std::array::from_fn(|h| &scores[h * stride..h * stride + at.visible]);
    match d {
        16 => weighted_v::<FMA, H, 16, T>(&probs, &inv, cache, kv_off, o),
        32 => weighted_v::<FMA, H, 32, T>(&probs, &inv, cache, kv_off, o),
        64 => weighted_v::<FMA, H, 64, T>(&probs, &inv, cache, kv_off, o),
        128 => weighted_v::<FMA, H, 128, T>(&probs, &inv, cache, kv_off, o),
        _ => weighted_v_any::<FMA, T>(&probs, &inv, cache, kv_off, d, o),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::Supported;
    use crate::kv::KvDtype;

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
    /// cache (long enough to span several blocks and query chunks), against the reference, on
    /// every instruction set this CPU runs, every head size with a path of its own, GQA groups
    /// of 1, 2, 3 and 5 query heads, blocks of 16 and 32 positions handed out out of order (so
    /// a sequence's blocks are scattered and interleaved with the other's), f32, bf16 and int8
    /// KV (int8 with a scale per position and KV head).
    #[test]
    fn paged_attention_matches_an_f64_reference_on_every_instruction_set_here() {
        let theta = 10_000.0;
        // Query heads per KV head: 2, 1, 3 (one group of heads attended together) and 5 (a
        // group of 4 and one of 1).
        let shapes = [
            (4, 2, 16),
            (4, 2, 24),
            (4, 2, 64),
            (3, 3, 16),
            (6, 2, 64),
            (10, 2, 32),
        ];
        for (heads, kv_heads, head_dim) in shapes {
            let dims = AttnDims {
                heads,
                kv_heads,
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
            for (block_tokens, dtype, bound) in [
                (16, KvDtype::F32, 1e-5),
                (32, KvDtype::F32, 1e-5),
                (16, KvDtype::Bf16, 2e-2),
                (16, KvDtype::Int8, 1e-2),
                (32, KvDtype::Int8, 1e-2),
            ] {
                // A scale per position and KV head, as models lay it out.
                let layout = KvLayout::new(2, dims.kv_dim(), block_tokens, dtype)
                    .and_then(|l| l.with_scale_group(head_dim))
                    .unwrap();
                for &isa in Supported::all() {
                    let mut pool = KvPool::new(layout, 8).unwrap();
                    // A decoy takes the first block, then the sequences take theirs in turns,
                    // so each table is scattered and interleaved with the other's.
                    let mut decoy = SeqCache::default();
                    pool.reserve(&mut decoy, block_tokens).unwrap();
                    let mut caches: Vec<SeqCache> =
                        seqs.iter().map(|_| SeqCache::default()).collect();
                    for p in (0..40).step_by(block_tokens) {
                        for (c, &(n, _)) in caches.iter_mut().zip(&seqs) {
                            pool.reserve(c, n.min(p + block_tokens)).unwrap();
                        }
                    }
                    assert!(caches[0].blocks().windows(2).all(|w| w[1] > w[0] + 1));
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
                        // Layer 1 of the pool, so the layer offset is exercised too.
                        let segments: Vec<AttnSegment<'_>> = spans
                            .iter()
                            .zip(&caches)
                            .map(|(s, cache)| {
                                row += s.len();
                                AttnSegment {
                                    rows: row - s.len()..row,
                                    start: s.start,
                                    cache,
                                    layer: 1,
                                }
                            })
                            .collect();
                        let got =
                            attention_on(isa, &mut pool, &mut qkv, &segments, dims, &rope).unwrap();
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
                        worst < bound,
                        "{} head_dim {head_dim}, blocks of {block_tokens}, {dtype} KV: max error {worst}",
                        isa.isa().name()
                    );
                }
            }
        }
    }

    /// The write path refuses a block another sequence shares or the prefix cache sealed,
    /// and leaves its contents alone.
    #[test]
    fn a_shared_or_sealed_block_is_never_written() {
        let dims = AttnDims {
            heads: 2,
            kv_heads: 1,
            head_dim: 16,
        };
        let width = dims.q_dim() + 2 * dims.kv_dim();
        let rope = Rope::new(16, 10_000.0, 64);
        let layout = KvLayout::new(1, dims.kv_dim(), 16, KvDtype::F32).unwrap();
        let mut pool = KvPool::new(layout, 4).unwrap();
        let tokens: Vec<u32> = (0..16).collect();
        let mut a = SeqCache::default();
        pool.reserve(&mut a, 16).unwrap();
        let mut qkv = pseudo_random(16 * width, 1);
        fn seg(cache: &SeqCache, start: usize, rows: Range<usize>) -> AttnSegment<'_> {
            AttnSegment {
                rows,
                start,
                cache,
                layer: 0,
            }
        }
        append_kv(&mut pool, &mut qkv, &[seg(&a, 0, 0..16)], dims, &rope).unwrap();
        let before = pool.read(&a, 0, 3).unwrap();
        let root = 7;
        pool.seal(root, &mut a, &tokens, 16);
        let mut again = pseudo_random(width, 2);
        let err = append_kv(&mut pool, &mut again, &[seg(&a, 3, 0..1)], dims, &rope).unwrap_err();
        assert!(err.to_string().contains("sealed"), "{err}");
        assert_eq!(pool.read(&a, 0, 3).unwrap(), before);
        // A second sequence adopting the block shares it: neither may write it.
        let mut b = SeqCache::default();
        let hit = pool.lookup(root, &tokens, 1);
        assert_eq!(hit.blocks, a.blocks());
        pool.adopt(&mut b, hit).unwrap();
        assert_eq!(pool.refs(a.blocks()[0]), 2);
        let err = append_kv(&mut pool, &mut again, &[seg(&b, 0, 0..1)], dims, &rope).unwrap_err();
        assert!(err.to_string().contains("shared"), "{err}");
        assert_eq!(pool.read(&b, 0, 3).unwrap(), before);
    }
}
