//! RMSNorm forward and backward over rows: `y = x * r * g` with `r = 1 / sqrt(mean(x^2) + eps)`.

use rayon::prelude::*;

/// Normalises each row of `x` (`[rows, h]`) with weight `g`; returns `y` and each row's `r`.
pub fn forward(x: &[f32], g: &[f32], eps: f32) -> (Vec<f32>, Vec<f32>) {
    let h = g.len();
    let rows = x.len() / h;
    let mut y = vec![0f32; x.len()];
    let mut r = vec![0f32; rows];
    y.par_chunks_mut(h)
        .zip(r.par_iter_mut())
        .zip(x.par_chunks(h))
        .for_each(|((y, r), x)| {
            let ms = x.iter().map(|v| v * v).sum::<f32>() / h as f32;
            *r = 1.0 / (ms + eps).sqrt();
            for ((y, &x), &g) in y.iter_mut().zip(x).zip(g) {
                *y = x * *r * g;
            }
        });
    (y, r)
}

/// The gradient of `x` given `dy`; adds the weight's gradient into `dg` when asked.
pub fn backward(x: &[f32], r: &[f32], g: &[f32], dy: &[f32], dg: Option<&mut [f32]>) -> Vec<f32> {
    let h = g.len();
    let mut dx = vec![0f32; x.len()];
    dx.par_chunks_mut(h)
        .zip(x.par_chunks(h))
        .zip(dy.par_chunks(h))
        .zip(r.par_iter())
        .for_each(|(((dx, x), dy), &r)| {
            // z = dy * g; dx = r z - x r^3 (z . x) / h
            let zx: f32 = dy.iter().zip(g).zip(x).map(|((d, g), x)| d * g * x).sum();
            let c = r * r * r * zx / h as f32;
            for (((dx, &d), &g), &x) in dx.iter_mut().zip(dy).zip(g).zip(x) {
                *dx = r * d * g - c * x;
            }
        });
    if let Some(dg) = dg {
        let partial = x
            .par_chunks(h * 64)
            .zip(dy.par_chunks(h * 64))
            .zip(r.par_chunks(64))
            .map(|((x, dy), r)| {
                let mut acc = vec![0f32; h];
                for ((x, dy), &r) in x.chunks(h).zip(dy.chunks(h)).zip(r) {
                    for ((a, &x), &d) in acc.iter_mut().zip(x).zip(dy) {
                        *a += d * x * r;
                    }
                }
                acc
            })
            .collect::<Vec<_>>();
        // Summed in a fixed order, so a run repeats bit for bit.
        for p in partial {
            dg.iter_mut().zip(p).for_each(|(d, p)| *d += p);
        }
    }
    dx
}
