//! Causal grouped-query attention over packed training sequences (`seqs` sequences of `t`
//! positions each, rows in sequence order), forward and backward. RoPE is applied here
//! (positions restart at 0 in every sequence); the softmax probabilities are kept for the
//! backward pass. Each (sequence, head) is two or three small matrix products run as one
//! parallel task; in the backward pass a task owns a KV head with all its query heads, so the
//! K and V gradients it sums are its own.

use rayon::prelude::*;
use rrt_model::kernels::gemm::{gemm_serial, MatMut, MatRef};
use rrt_model::rope::Rope;

/// Head geometry.
#[derive(Debug, Clone, Copy)]
pub struct Dims {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl Dims {
    pub fn q_dim(&self) -> usize {
        self.heads * self.head_dim
    }
    pub fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }
    /// Q | K | V per row.
    pub fn qkv_dim(&self) -> usize {
        self.q_dim() + 2 * self.kv_dim()
    }
    fn group(&self) -> usize {
        self.heads / self.kv_heads
    }
}

/// What the backward pass needs.
pub struct Saved {
    /// Rotated Q `[rows, q_dim]`, rotated K and V `[rows, kv_dim]`.
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    /// Softmax probabilities, `[seqs][heads][t][t]` (zero above the diagonal).
    p: Vec<f32>,
}

/// Splits `qkv` (`[rows, qkv_dim]`) into rotated Q, rotated K, and V.
fn split_rotate(qkv: &[f32], dims: Dims, t: usize, rope: &Rope) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (qd, kvd, w) = (dims.q_dim(), dims.kv_dim(), dims.qkv_dim());
    let rows = qkv.len() / w;
    let (mut q, mut k, mut v) = (
        vec![0f32; rows * qd],
        vec![0f32; rows * kvd],
        vec![0f32; rows * kvd],
    );
    q.par_chunks_mut(qd)
        .zip(k.par_chunks_mut(kvd))
        .zip(v.par_chunks_mut(kvd))
        .zip(qkv.par_chunks(w))
        .enumerate()
        .for_each(|(row, (((q, k), v), src))| {
            q.copy_from_slice(&src[..qd]);
            k.copy_from_slice(&src[qd..qd + kvd]);
            v.copy_from_slice(&src[qd + kvd..]);
            rope.apply(q, row % t);
            rope.apply(k, row % t);
        });
    (q, k, v)
}

/// Attention of `qkv` (`[seqs * t, qkv_dim]`, unrotated); returns the output `[rows, q_dim]`
/// and what the backward pass needs.
pub fn forward(qkv: &[f32], dims: Dims, t: usize, rope: &Rope) -> (Vec<f32>, Saved) {
    let (q, k, v) = split_rotate(qkv, dims, t, rope);
    let (qd, kvd, d) = (dims.q_dim(), dims.kv_dim(), dims.head_dim);
    let seqs = q.len() / (t * qd);
    let scale = 1.0 / (d as f32).sqrt();
    let mut p = vec![0f32; seqs * dims.heads * t * t];
    let mut out = vec![0f32; q.len()];
    // One task per (sequence, head): scores, causal softmax, weighted sum of V.
    let outs: Vec<Vec<f32>> = p
        .par_chunks_mut(t * t)
        .enumerate()
        .map(|(task, p)| {
            let (s, h) = (task / dims.heads, task % dims.heads);
            let g = h / dims.group();
            let qs = &q[s * t * qd..(s + 1) * t * qd];
            let (ks, vs) = (
                &k[s * t * kvd..(s + 1) * t * kvd],
                &v[s * t * kvd..(s + 1) * t * kvd],
            );
            let qh = MatRef::cols_of(qs, t, qd, h * d..(h + 1) * d);
            let kh = MatRef::cols_of(ks, t, kvd, g * d..(g + 1) * d);
            gemm_serial(MatMut::new(p, t, t), qh, kh.t(), false);
            for (i, row) in p.chunks_mut(t).enumerate() {
                softmax_causal(&mut row[..=i], scale);
                row[i + 1..].fill(0.0);
            }
            let mut o = vec![0f32; t * d];
            let vh = MatRef::cols_of(vs, t, kvd, g * d..(g + 1) * d);
            gemm_serial(MatMut::new(&mut o, t, d), MatRef::new(p, t, t), vh, false);
            o
        })
        .collect();
    for (task, o) in outs.iter().enumerate() {
        let (s, h) = (task / dims.heads, task % dims.heads);
        for (i, row) in o.chunks(d).enumerate() {
            let at = (s * t + i) * qd + h * d;
            out[at..at + d].copy_from_slice(row);
        }
    }
    (out, Saved { q, k, v, p })
}

/// `row = softmax(row * scale)` in place.
fn softmax_causal(row: &mut [f32], scale: f32) {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x * scale));
    let mut sum = 0f32;
    for x in row.iter_mut() {
        *x = (*x * scale - max).exp();
        sum += *x;
    }
    let inv = 1.0 / sum;
    row.iter_mut().for_each(|x| *x *= inv);
}

/// One (sequence, KV head)'s gradients: dQ of each of its query heads, dK, dV (`[t, d]` each).
type GroupGrads = (Vec<Vec<f32>>, Vec<f32>, Vec<f32>);

/// The gradient of `qkv` given the output's gradient `dout` (`[rows, q_dim]`).
pub fn backward(saved: &Saved, dout: &[f32], dims: Dims, t: usize, rope: &Rope) -> Vec<f32> {
    let (qd, kvd, d, w) = (dims.q_dim(), dims.kv_dim(), dims.head_dim, dims.qkv_dim());
    let rows = saved.q.len() / qd;
    let seqs = rows / t;
    let scale = 1.0 / (d as f32).sqrt();
    // One task per (sequence, KV head): its query heads' dQ, and the group's dK and dV.
    let parts: Vec<GroupGrads> = (0..seqs * dims.kv_heads)
        .into_par_iter()
        .map(|task| {
            let (s, g) = (task / dims.kv_heads, task % dims.kv_heads);
            let span = |width: usize| s * t * width..(s + 1) * t * width;
            let (qs, dos) = (&saved.q[span(qd)], &dout[span(qd)]);
            let (ks, vs) = (&saved.k[span(kvd)], &saved.v[span(kvd)]);
            let kh = MatRef::cols_of(ks, t, kvd, g * d..(g + 1) * d);
            let vh = MatRef::cols_of(vs, t, kvd, g * d..(g + 1) * d);
            let (mut dk, mut dv) = (vec![0f32; t * d], vec![0f32; t * d]);
            let mut dqs = Vec::with_capacity(dims.group());
            let mut ds = vec![0f32; t * t];
            for h in g * dims.group()..(g + 1) * dims.group() {
                let p = &saved.p[(s * dims.heads + h) * t * t..][..t * t];
                let doh = MatRef::cols_of(dos, t, qd, h * d..(h + 1) * d);
                // dV += P^T dO; dP = dO V^T
                gemm_serial(
                    MatMut::new(&mut dv, t, d),
                    MatRef::new(p, t, t).t(),
                    doh,
                    true,
                );
                gemm_serial(MatMut::new(&mut ds, t, t), doh, vh.t(), false);
                // dS = P * (dP - rowsum(dP * P)), times the score scale.
                for (dsr, pr) in ds.chunks_mut(t).zip(p.chunks(t)) {
                    let dot: f32 = dsr.iter().zip(pr).map(|(a, b)| a * b).sum();
                    for (x, &pv) in dsr.iter_mut().zip(pr) {
                        *x = pv * (*x - dot) * scale;
                    }
                }
                // dQ = dS K; dK += dS^T Q
                let mut dq = vec![0f32; t * d];
                gemm_serial(
                    MatMut::new(&mut dq, t, d),
                    MatRef::new(&ds, t, t),
                    kh,
                    false,
                );
                let qh = MatRef::cols_of(qs, t, qd, h * d..(h + 1) * d);
                gemm_serial(
                    MatMut::new(&mut dk, t, d),
                    MatRef::new(&ds, t, t).t(),
                    qh,
                    true,
                );
                dqs.push(dq);
            }
            (dqs, dk, dv)
        })
        .collect();
    let mut dqkv = vec![0f32; rows * w];
    for (task, (dqs, dk, dv)) in parts.into_iter().enumerate() {
        let (s, g) = (task / dims.kv_heads, task % dims.kv_heads);
        for i in 0..t {
            let row = &mut dqkv[(s * t + i) * w..(s * t + i + 1) * w];
            for (j, dq) in dqs.iter().enumerate() {
                let h = g * dims.group() + j;
                row[h * d..(h + 1) * d].copy_from_slice(&dq[i * d..(i + 1) * d]);
            }
            row[qd + g * d..qd + (g + 1) * d].copy_from_slice(&dk[i * d..(i + 1) * d]);
            row[qd + kvd + g * d..qd + kvd + (g + 1) * d].copy_from_slice(&dv[i * d..(i + 1) * d]);
        }
    }
    // Undo the rotations of Q and K.
    dqkv.par_chunks_mut(w).enumerate().for_each(|(row, r)| {
        let (q, kv) = r.split_at_mut(qd);
        rope.apply_inverse(q, row % t);
        rope.apply_inverse(&mut kv[..kvd], row % t);
    });
    dqkv
}
