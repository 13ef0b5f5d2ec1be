//! The exit heads and the losses: after every loop, the hidden state goes through the final
//! norm and the LM head; each loop's logits get the cross-entropy of the next token and the
//! distillation loss against the teacher (forward KL at a temperature, over the teacher's
//! top-k plus one bucket for the rest of the vocabulary), weighted 1 for the last loop and
//! `exit_weight` for the others, which also learn from the last loop's (detached) distribution
//! (the early-exit loss). Rows are processed in chunks so the logits never exist for the whole
//! batch at once; each chunk's gradients go straight back through the head.

use rayon::prelude::*;
use rrt_model::kernels::gemm::{MatMut, MatRef};

use crate::precision::matmul;
use rrt_model::kernels::exp_fast;
use rrt_model::kernels::gemm::gemm_bf16_packed;

use crate::exit_head;
use crate::norm;
use crate::params::{Grads, TrainModel};

/// How the losses are weighted.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LossWeights {
    /// Cross-entropy of the next token.
    pub ce: f32,
    /// Distillation from the teacher.
    pub kd: f32,
    /// Softmax temperature of the distillation.
    pub temperature: f32,
    /// Weight of every loop but the last (the last has 1).
    pub exit_weight: f32,
    /// Distillation from the detached last loop to each earlier loop.
    pub self_kd: f32,
    /// Binary cross-entropy of the exit classifiers (models with exit heads).
    #[serde(default = "one")]
    pub classifier: f32,
}

impl LossWeights {
    /// Every term off (temperature 1): the start of a weighting that measures one term.
    pub const NONE: LossWeights = LossWeights {
        ce: 0.0,
        kd: 0.0,
        temperature: 1.0,
        exit_weight: 0.0,
        self_kd: 0.0,
        classifier: 0.0,
    };
}

fn one() -> f32 {
    1.0
}

impl Default for LossWeights {
    fn default() -> Self {
        Self {
            ce: 0.1,
            kd: 0.9,
            temperature: 1.0,
            exit_weight: 0.1,
            self_kd: 0.1,
            classifier: 1.0,
        }
    }
}

/// The teacher's view of each position: its top-k logits and the log-sum-exp of all its logits
/// divided by the temperature (so its probabilities at that temperature follow).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TeacherTopK {
    pub k: usize,
    /// `[rows, k]`.
    pub ids: Vec<u32>,
    /// `[rows, k]`.
    pub logits: Vec<f32>,
    /// `[rows]`.
    pub lse: Vec<f32>,
}

/// Loss sums of a batch, per loop (divide by `rows` for means).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LossSums {
    pub rows: usize,
    pub ce: Vec<f64>,
    pub kd: Vec<f64>,
    pub self_kd: Vec<f64>,
    /// Rows whose argmax equals the last loop's.
    pub agree_with_last: Vec<usize>,
    /// The weighted objective (what the gradients are of), before the `scale`.
    pub objective: f64,
    /// Exit classifiers: binary cross-entropy sums, and every row's (probability, agreement).
    pub classifier_bce: Vec<f64>,
    pub classifier_points: Vec<Vec<(f32, bool)>>,
}

impl LossSums {
    fn new(loops: usize) -> Self {
        Self {
            rows: 0,
            ce: vec![0.0; loops],
            kd: vec![0.0; loops],
            self_kd: vec![0.0; loops],
            agree_with_last: vec![0; loops],
            objective: 0.0,
            classifier_bce: vec![0.0; loops],
            classifier_points: vec![Vec::new(); loops],
        }
    }

    pub fn add(&mut self, o: &LossSums) {
        if self.ce.len() < o.ce.len() {
            *self = LossSums::new(o.ce.len());
        }
        self.rows += o.rows;
        self.objective += o.objective;
        for j in 0..o.ce.len() {
            self.ce[j] += o.ce[j];
            self.kd[j] += o.kd[j];
            self.self_kd[j] += o.self_kd[j];
            self.agree_with_last[j] += o.agree_with_last[j];
            self.classifier_bce[j] += o.classifier_bce[j];
            self.classifier_points[j].extend_from_slice(&o.classifier_points[j]);
        }
    }
}

/// Rows per chunk of the head (the logits of a chunk for every loop are in memory at once).
const CHUNK: usize = 64;

/// The exit heads over `exits` (one `[rows, hidden]` per loop), the losses against `targets`
/// (next token per row) and `teacher`, and their gradients: returns the sums and the gradient
/// of each exit's hidden state, scaled by `scale`; the final norm's gradient goes into `grads`.
pub fn heads(
    model: &TrainModel,
    exits: &[Vec<f32>],
    targets: &[u32],
    teacher: Option<&TeacherTopK>,
    w: LossWeights,
    scale: f32,
    grads: &mut Grads,
) -> (LossSums, Vec<Vec<f32>>) {
    let h = model.cfg.hidden_size;
    let loops = exits.len();
    let rows = targets.len();
    let mut sums = LossSums::new(loops);
    let mut dexits: Vec<Vec<f32>> = (0..loops).map(|_| vec![0f32; rows * h]).collect();
    for start in (0..rows).step_by(CHUNK) {
        let end = (start + CHUNK).min(rows);
        let chunk: Vec<&[f32]> = exits.iter().map(|x| &x[start * h..end * h]).collect();
        let chunk_teacher = teacher.map(|t| Rows {
            k: t.k,
            ids: &t.ids[start * t.k..end * t.k],
            logits: &t.logits[start * t.k..end * t.k],
            lse: &t.lse[start..end],
        });
        let part = head_chunk(
            model,
            &chunk,
            &targets[start..end],
            chunk_teacher,
            w,
            scale,
            grads,
        );
        for (d, dx) in dexits.iter_mut().zip(part.1) {
            d[start * h..end * h].copy_from_slice(&dx);
        }
        sums.add(&part.0);
    }
    (sums, dexits)
}

/// One chunk of rows through every loop's exit head (adapter, final norm, LM head), its losses,
/// the exit classifiers, and the gradients back to each loop's hidden state.
fn head_chunk(
    model: &TrainModel,
    xs: &[&[f32]],
    targets: &[u32],
    teacher: Option<Rows<'_>>,
    w: LossWeights,
    scale: f32,
    grads: &mut Grads,
) -> (LossSums, Vec<Vec<f32>>) {
    let (h, v) = (model.cfg.hidden_size, model.cfg.vocab_size);
    let (loops, c) = (xs.len(), targets.len());
    let eps = model.cfg.rms_norm_eps as f32;
    let p = &model.params;
    let (gf, head) = (p.get(model.final_norm), p.get(model.head()));
    let packed = crate::precision::packed_head(model);
    let mut saved = Vec::with_capacity(loops);
    let mut logits = Vec::with_capacity(loops);
    for (j, x) in xs.iter().enumerate() {
        let (input, adapter) = match model.exits.get(j).filter(|_| j + 1 < loops) {
            Some(e) => {
                let (y, s) = exit_head::adapter_forward(p, e, x, h);
                (y, Some(s))
            }
            None => (x.to_vec(), None),
        };
        let (n, r) = norm::forward(&input, gf, eps);
        let mut z = vec![0f32; c * v];
        match packed {
            Some(pk) => gemm_bf16_packed(
                MatMut::new(&mut z, c, v),
                MatRef::new(&n, c, h),
                &pk.transposed,
                false,
            ),
            None => matmul(
                model.precision,
                MatMut::new(&mut z, c, v),
                MatRef::new(&n, c, h),
                MatRef::new(head, v, h).t(),
                false,
            ),
        }
        saved.push((input, n, r, adapter));
        logits.push(z);
    }
    let argmaxes: Vec<Vec<usize>> = logits
        .iter()
        .map(|z| z.par_chunks(v).map(argmax).collect())
        .collect();
    let mut sums = losses(&mut logits, targets, teacher, w, scale, v);
    let mut dxs = Vec::with_capacity(loops);
    for (j, (dz, (input, n, r, adapter))) in logits.iter().zip(&saved).enumerate() {
        let mut dn = vec![0f32; c * h];
        match packed {
            Some(pk) => gemm_bf16_packed(
                MatMut::new(&mut dn, c, h),
                MatRef::new(dz, c, v),
                &pk.plain,
                false,
            ),
            None => matmul(
                model.precision,
                MatMut::new(&mut dn, c, h),
                MatRef::new(dz, c, v),
                MatRef::new(head, v, h),
                false,
            ),
        }
        if let Some(dhead) = grads.get_mut(model.head()) {
            matmul(
                model.precision,
                MatMut::new(dhead, v, h),
                MatRef::new(dz, c, v).t(),
                MatRef::new(n, c, h),
                true,
            );
        }
        let mut dx = norm::backward(input, r, gf, &dn, grads.get_mut(model.final_norm));
        if let (Some(e), Some(a)) = (model.exits.get(j), adapter) {
            dx = exit_head::adapter_backward(p, e, a, &dx, h, grads);
            // The classifier learns whether this loop's (adapted) argmax is the last loop's.
            let agree: Vec<bool> = argmaxes[j]
                .iter()
                .zip(&argmaxes[loops - 1])
                .map(|(a, b)| a == b)
                .collect();
            let (probs, xn) = exit_head::classify(p, e, xs[j], h, eps);
            let bce = exit_head::classifier_backward(
                e,
                &probs,
                &agree,
                &xn,
                h,
                w.classifier,
                scale,
                grads,
            );
            sums.classifier_bce[j] += bce;
            sums.objective += w.classifier as f64 * bce;
            sums.classifier_points[j].extend(probs.into_iter().zip(agree));
        }
        dxs.push(dx);
    }
    (sums, dxs)
}

/// A chunk's teacher rows.
#[derive(Clone, Copy)]
struct Rows<'a> {
    k: usize,
    ids: &'a [u32],
    logits: &'a [f32],
    lse: &'a [f32],
}

/// The losses of one chunk; turns each loop's logits (`[c, v]`, loop-major) into their
/// gradients in place.
fn losses(
    logits: &mut [Vec<f32>],
    targets: &[u32],
    teacher: Option<Rows<'_>>,
    w: LossWeights,
    scale: f32,
    v: usize,
) -> LossSums {
    let loops = logits.len();
    // Row-major views: row i of every loop, so one task sees a row across the loops.
    let mut per_row: Vec<Vec<&mut [f32]>> = (0..targets.len())
        .map(|_| Vec::with_capacity(loops))
        .collect();
    for z in logits.iter_mut() {
        for (i, row) in z.chunks_mut(v).enumerate() {
            per_row[i].push(row);
        }
    }
    per_row
        .par_iter_mut()
        .enumerate()
        .map(|(i, zs)| {
            let t = teacher.map(|t| TeacherRow {
                ids: &t.ids[i * t.k..(i + 1) * t.k],
                logits: &t.logits[i * t.k..(i + 1) * t.k],
                lse: t.lse[i],
            });
            row_losses(zs, targets[i], t, w, scale)
        })
        .collect::<Vec<_>>()
        .iter()
        .fold(LossSums::new(loops), |mut a, b| {
            a.add(b);
            a
        })
}

struct TeacherRow<'a> {
    ids: &'a [u32],
    logits: &'a [f32],
    lse: f32,
}

/// Softmax of `z / temperature`: probabilities and `log sum exp(z / temperature)`.
fn softmax(z: &[f32], temperature: f32) -> (Vec<f32>, f64) {
    let inv = 1.0 / temperature;
    let max = z.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) * inv;
    let mut p: Vec<f32> = z.iter().map(|&x| exp_fast(x * inv - max)).collect();
    let sum: f64 = p.iter().map(|&x| x as f64).sum();
    let norm = (1.0 / sum) as f32;
    p.iter_mut().for_each(|x| *x *= norm);
    (p, max as f64 + sum.ln())
}

fn argmax(z: &[f32]) -> usize {
    z.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &x)| {
            if x > bv {
                (i, x)
            } else {
                (bi, bv)
            }
        })
        .0
}

/// One row across every loop (`zs[j]`: loop j's logits, replaced by their gradient).
fn row_losses(
    zs: &mut [&mut [f32]],
    target: u32,
    teacher: Option<TeacherRow<'_>>,
    w: LossWeights,
    scale: f32,
) -> LossSums {
    let loops = zs.len();
    let mut s = LossSums::new(loops);
    s.rows = 1;
    let last = loops - 1;
    let last_argmax = argmax(zs[last]);
    let (p_last, lse_last) = softmax(zs[last], 1.0);
    // log p of the last loop, so the early loops' KL needs no logarithm per entry.
    let log_p_last: Vec<f32> = zs[last]
        .iter()
        .map(|&z| (z as f64 - lse_last) as f32)
        .collect();
    for (j, z) in zs.iter_mut().enumerate() {
        let z = &mut **z;
        s.agree_with_last[j] = (argmax(z) == last_argmax) as usize;
        let weight = if j == last { 1.0 } else { w.exit_weight };
        let (q, lse) = softmax(z, 1.0);
        // Distillation first: its gradient vector becomes the row's (one allocation fewer).
        let mut grad = match &teacher {
            Some(t) => {
                let at_t = (w.temperature != 1.0).then(|| softmax(z, w.temperature).0);
                let (kd, mut dkd) = distill_from(at_t.as_deref().unwrap_or(&q), t, w.temperature);
                s.kd[j] = kd;
                let c = if w.kd != 0.0 { weight * w.kd } else { 0.0 };
                dkd.iter_mut().for_each(|d| *d *= c);
                dkd
            }
            None => vec![0f32; z.len()],
        };
        // Cross-entropy: q - onehot(target).
        s.ce[j] = lse - z[target as usize] as f64;
        if w.ce != 0.0 {
            let c = weight * w.ce;
            grad.iter_mut().zip(&q).for_each(|(g, &q)| *g += c * q);
            grad[target as usize] -= c;
        }
        if j != last {
            // KL(p_last || q_j) with the last loop's distribution held fixed.
            // log q = z - lse (log-softmax), exact where q itself underflows.
            s.self_kd[j] = p_last
                .iter()
                .zip(&log_p_last)
                .zip(z.iter())
                .map(|((&p, &lp), &zz)| p as f64 * (lp as f64 - (zz as f64 - lse)))
                .sum();
            if w.self_kd != 0.0 {
                grad.iter_mut()
                    .zip(q.iter().zip(&p_last))
                    .for_each(|(g, (&q, &p))| *g += w.self_kd * (q - p));
            }
        }
        let wsum = weight as f64
            * (w.ce as f64 * s.ce[j]
                + if teacher.is_some() {
                    w.kd as f64 * s.kd[j]
                } else {
                    0.0
                })
            + if j != last {
                w.self_kd as f64 * s.self_kd[j]
            } else {
                0.0
            };
        s.objective += wsum;
        z.iter_mut().zip(&grad).for_each(|(z, &g)| *z = g * scale);
    }
    s
}

/// Forward KL from the teacher to the student at `temperature`, over the teacher's top-k and
/// one bucket for the rest of the vocabulary (`temperature^2`-scaled, as is usual); returns
/// the loss and its gradient with respect to the student's logits `z`.
#[cfg(test)]
fn distill(z: &[f32], t: &TeacherRow<'_>, temperature: f32) -> (f64, Vec<f32>) {
    distill_from(&softmax(z, temperature).0, t, temperature)
}

/// [`distill`] given the student's softmax `q` at `temperature`.
fn distill_from(q: &[f32], t: &TeacherRow<'_>, temperature: f32) -> (f64, Vec<f32>) {
    let tau = temperature as f64;
    let p: Vec<f64> = t
        .logits
        .iter()
        .map(|&l| (l as f64 / tau - t.lse as f64).exp())
        .collect();
    let p_top: f64 = p.iter().sum();
    let p_rest = (1.0 - p_top).max(0.0);
    let q_top: f64 = t.ids.iter().map(|&i| q[i as usize] as f64).sum();
    let q_rest = (q.iter().map(|&x| x as f64).sum::<f64>() - q_top).max(1e-30);
    let mut loss = 0.0;
    for (&i, &pi) in t.ids.iter().zip(&p) {
        if pi > 0.0 {
            loss += pi * (pi.ln() - (q[i as usize] as f64).max(1e-30).ln());
        }
    }
    if p_rest > 0.0 {
        loss += p_rest * (p_rest.ln() - q_rest.ln());
    }
    // d/dz = tau * (q_m S - p_m) on the top-k and tau * q_m (S - p_rest / q_rest) elsewhere,
    // with S = p_top + p_rest the teacher's total mass (1 unless its log-sum-exp was taken at
    // another temperature).
    let total = p_top + p_rest;
    let rest_factor = (total - p_rest / q_rest) as f32;
    let tau32 = temperature;
    let mut grad: Vec<f32> = q.iter().map(|&qm| tau32 * qm * rest_factor).collect();
    for (&i, &pi) in t.ids.iter().zip(&p) {
        grad[i as usize] = tau32 * (q[i as usize] * total as f32 - pi as f32);
    }
    (tau * tau * loss, grad)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fd(f: impl Fn(&[f32]) -> f64, z: &[f32], m: usize) -> f64 {
        let eps = 1e-3f32;
        let (mut a, mut b) = (z.to_vec(), z.to_vec());
        a[m] += eps;
        b[m] -= eps;
        (f(&a) - f(&b)) / (2.0 * eps as f64)
    }

    #[test]
    fn distillation_gradient_matches_finite_differences() {
        let v = 12;
        let z: Vec<f32> = (0..v).map(|i| ((i * 7 % 5) as f32 - 2.0) * 0.7).collect();
        let teacher: Vec<f32> = (0..v).map(|i| ((i * 3 % 7) as f32 - 3.0) * 0.9).collect();
        for tau in [1.0f32, 2.0] {
            let mut order: Vec<usize> = (0..v).collect();
            order.sort_by(|&a, &b| teacher[b].total_cmp(&teacher[a]));
            let k = 4;
            let ids: Vec<u32> = order[..k].iter().map(|&i| i as u32).collect();
            let logits: Vec<f32> = order[..k].iter().map(|&i| teacher[i]).collect();
            let max = teacher[order[0]] / tau;
            let lse = max
                + teacher
                    .iter()
                    .map(|&l| (l / tau - max).exp())
                    .sum::<f32>()
                    .ln();
            let t = TeacherRow {
                ids: &ids,
                logits: &logits,
                lse,
            };
            let (_, grad) = distill(&z, &t, tau);
            for (m, g) in grad.iter().enumerate() {
                let want = fd(|z| distill(z, &t, tau).0, &z, m);
                assert!(
                    (*g as f64 - want).abs() < 1e-3,
                    "tau {tau} m {m}: {g} vs {want}"
                );
            }
        }
    }

    #[test]
    fn the_early_exit_distillation_holds_the_last_loop_fixed() {
        let z0: Vec<f32> = vec![0.5, -1.0, 2.0, 0.0];
        let z1: Vec<f32> = vec![1.5, 0.3, -0.2, 0.9];
        let (q0, _) = softmax(&z0, 1.0);
        let (p1, _) = softmax(&z1, 1.0);
        let w = LossWeights {
            self_kd: 1.0,
            ..LossWeights::NONE
        };
        let (mut a, mut b) = (z0.clone(), z1.clone());
        let mut zs: Vec<&mut [f32]> = vec![&mut a, &mut b];
        let s = row_losses(&mut zs, 0, None, w, 0.5);
        let kl: f64 = p1
            .iter()
            .zip(&q0)
            .map(|(&p, &q)| p as f64 * (p as f64 / q as f64).ln())
            .sum();
        assert!((s.self_kd[0] - kl).abs() < 1e-6 && (s.objective - kl).abs() < 1e-6);
        for m in 0..4 {
            assert!((a[m] - 0.5 * (q0[m] - p1[m])).abs() < 1e-6, "loop 0, {m}");
            assert_eq!(b[m], 0.0, "no gradient reaches the last loop");
        }
    }
}
