//! The learned exit heads in training: a loop's adapter `x + (x V^T) U^T` in front of the
//! shared final norm and head (forward and backward), and its classifier
//! `sigmoid(w . rmsnorm(x) + b)` trained by binary cross-entropy on whether the adapted exit's
//! argmax equals the last loop's. The classifier reads a detached hidden state: it learns to
//! judge the representation, not to shape it.

use rayon::prelude::*;
use rrt_model::kernels::gemm::{gemm, MatMut, MatRef};

use crate::params::{ExitIds, Grads, Params};

/// The adapter's input and its low-rank intermediate, kept for the backward pass.
pub struct AdapterSaved {
    x: Vec<f32>,
    t: Vec<f32>,
}

/// `x + (x V^T) U^T` over `rows` rows.
pub fn adapter_forward(p: &Params, e: &ExitIds, x: &[f32], h: usize) -> (Vec<f32>, AdapterSaved) {
    let rows = x.len() / h;
    let r = e.rank;
    let mut t = vec![0f32; rows * r];
    gemm(
        MatMut::new(&mut t, rows, r),
        MatRef::new(x, rows, h),
        MatRef::new(p.get(e.down), r, h).t(),
        false,
    );
    let mut y = x.to_vec();
    gemm(
        MatMut::new(&mut y, rows, h),
        MatRef::new(&t, rows, r),
        MatRef::new(p.get(e.up), h, r).t(),
        true,
    );
    (y, AdapterSaved { x: x.to_vec(), t })
}

/// The gradient of the adapter's input given its output's; adds `U` and `V`'s gradients.
pub fn adapter_backward(
    p: &Params,
    e: &ExitIds,
    saved: &AdapterSaved,
    dy: &[f32],
    h: usize,
    grads: &mut Grads,
) -> Vec<f32> {
    let rows = dy.len() / h;
    let r = e.rank;
    let dyv = MatRef::new(dy, rows, h);
    if let Some(du) = grads.get_mut(e.up) {
        gemm(
            MatMut::new(du, h, r),
            dyv.t(),
            MatRef::new(&saved.t, rows, r),
            true,
        );
    }
    let mut dt = vec![0f32; rows * r];
    gemm(
        MatMut::new(&mut dt, rows, r),
        dyv,
        MatRef::new(p.get(e.up), h, r),
        false,
    );
    if let Some(dd) = grads.get_mut(e.down) {
        gemm(
            MatMut::new(dd, r, h),
            MatRef::new(&dt, rows, r).t(),
            MatRef::new(&saved.x, rows, h),
            true,
        );
    }
    let mut dx = dy.to_vec();
    gemm(
        MatMut::new(&mut dx, rows, h),
        MatRef::new(&dt, rows, r),
        MatRef::new(p.get(e.down), r, h),
        true,
    );
    dx
}

/// The classifier's probability for each row of `x` (`[rows, h]`) and the normalised rows it
/// read.
pub fn classify(p: &Params, e: &ExitIds, x: &[f32], h: usize, eps: f32) -> (Vec<f32>, Vec<f32>) {
    let (w, b) = (p.get(e.classifier), p.get(e.bias)[0]);
    let mut xn = vec![0f32; x.len()];
    let probs = xn
        .par_chunks_mut(h)
        .zip(x.par_chunks(h))
        .map(|(n, x)| {
            let r = 1.0 / (x.iter().map(|v| v * v).sum::<f32>() / h as f32 + eps).sqrt();
            n.iter_mut().zip(x).for_each(|(n, &x)| *n = x * r);
            let z: f32 = n.iter().zip(w).map(|(a, b)| a * b).sum::<f32>() + b;
            1.0 / (1.0 + (-z).exp())
        })
        .collect();
    (probs, xn)
}

/// Binary cross-entropy of `probs` against `agree`; adds `scale * weight` times its gradient
/// into the classifier's `w` and `b`. Returns the summed loss.
#[allow(clippy::too_many_arguments)]
pub fn classifier_backward(
    e: &ExitIds,
    probs: &[f32],
    agree: &[bool],
    xn: &[f32],
    h: usize,
    weight: f32,
    scale: f32,
    grads: &mut Grads,
) -> f64 {
    let mut loss = 0.0;
    let mut dw = vec![0f32; h];
    let mut db = 0f32;
    for ((&s, &a), x) in probs.iter().zip(agree).zip(xn.chunks(h)) {
        let a = a as u8 as f32;
        loss -= (a as f64) * (s.max(1e-7) as f64).ln()
            + (1.0 - a as f64) * ((1.0 - s).max(1e-7) as f64).ln();
        let g = (s - a) * weight * scale;
        dw.iter_mut().zip(x).for_each(|(d, &x)| *d += g * x);
        db += g;
    }
    if let Some(gw) = grads.get_mut(e.classifier) {
        gw.iter_mut().zip(&dw).for_each(|(g, d)| *g += d);
    }
    if let Some(gb) = grads.get_mut(e.bias) {
        gb[0] += db;
    }
    loss
}
