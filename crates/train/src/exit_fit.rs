//! Closed-form fits of the exit heads. The adapters start from ridge regression from the hidden
//! state after an early loop to the last loop's (each target row rescaled to its input's RMS,
//! since the shared final norm only sees directions), truncated to the adapter's rank by SVD,
//! like the LoRA relaxation; distillation then trains from there instead of from the identity.
//! The classifiers end with a logistic regression (Newton's method on standardised features) on
//! the final adapters' agreement with the last loop: a few hundred gradient steps at the
//! adapters' learning rate barely move a classifier from zero.

use faer::linalg::solvers::Solve;
use faer::{Mat, Side};
use rrt_model::kernels::gemm::{gemm, MatMut, MatRef};
use rrt_model::recursive::svd::Factors;

use crate::error::{Result, TrainError};
use crate::loss::{heads, LossWeights};
use crate::model::{exits, Batch};
use crate::params::{Grads, TrainModel};

/// The sums one exit's regression needs: `X^T X` and `X^T (T - X)` over the rows seen.
struct Normal {
    xtx: Vec<f64>,
    xtr: Vec<f64>,
    rows: usize,
}

/// What a fit did, per exit: the share of the residual's energy the rank kept, the relative
/// error of the adapted rows against their targets before and after (on the fit rows), and the
/// exit's distillation loss from the last loop on the first fit batch with the adapter as it
/// was and as fitted. The fit is kept only if that loss falls (`kept`): on a model whose loops
/// were trained to exit, the hidden-state regression can be worse than the identity.
#[derive(Debug, Clone)]
pub struct FitReport {
    pub rows: usize,
    pub energy_kept: f64,
    pub error_before: f64,
    pub error_after: f64,
    pub distillation_before: f64,
    pub distillation_after: f64,
    pub kept: bool,
}

/// Fits every exit adapter of `model` on `batches`; `ridge` is relative to the mean diagonal
/// of `X^T X`. The classifiers are left as they are.
pub fn fit_adapters(
    model: &mut TrainModel,
    batches: impl Iterator<Item = Batch>,
    ridge: f64,
) -> Result<Vec<FitReport>> {
    let h = model.cfg.hidden_size;
    let n_exits = model.exits.len();
    let mut normals: Vec<Normal> = (0..n_exits)
        .map(|_| Normal {
            xtx: vec![0.0; h * h],
            xtr: vec![0.0; h * h],
            rows: 0,
        })
        .collect();
    let mut seen = Vec::new();
    let mut first = None;
    for batch in batches {
        if first.is_none() {
            first = Some(batch.clone());
        }
        let states = exits(model, &batch);
        let last = states.last().expect("a model has at least one loop");
        for (j, normal) in normals.iter_mut().enumerate() {
            let target = rescaled(last, &states[j], h);
            accumulate(normal, &states[j], &target, h);
        }
        if seen.len() < 4 {
            seen.push(states);
        }
    }
    let mut reports = Vec::with_capacity(n_exits);
    for (j, normal) in normals.iter().enumerate() {
        if normal.rows == 0 {
            return Err(TrainError::Input(
                "no rows to fit the exit adapters on".into(),
            ));
        }
        let m = solve(normal, h, ridge)?;
        let factors = Factors::new(&m, h, h)?;
        let e = &model.exits[j];
        let (down, up) = factors.lora(e.rank);
        let s = factors.singular_values();
        let total: f64 = s.iter().map(|&v| (v as f64).powi(2)).sum();
        let kept: f64 = s[..e.rank.min(s.len())]
            .iter()
            .map(|&v| (v as f64).powi(2))
            .sum();
        let (before, after) = errors(&seen, j, (&down, &up), e.rank, h);
        let (e_down, e_up) = (e.down.0, e.up.0);
        let check = first.as_ref().expect("rows were seen");
        let distillation_before = exit_distillation(model, check, j);
        let old_down = std::mem::replace(&mut model.params.list[e_down].value, down);
        let old_up = std::mem::replace(&mut model.params.list[e_up].value, up);
        let distillation_after = exit_distillation(model, check, j);
        let better = distillation_after < distillation_before;
        if !better {
            model.params.list[e_down].value = old_down;
            model.params.list[e_up].value = old_up;
        }
        reports.push(FitReport {
            rows: normal.rows,
            energy_kept: kept / total.max(f64::MIN_POSITIVE),
            error_before: before,
            error_after: after,
            distillation_before,
            distillation_after,
            kept: better,
        });
    }
    Ok(reports)
}

/// Exit `j`'s distillation loss from the last loop, per row, on `batch`.
fn exit_distillation(model: &TrainModel, batch: &Batch, j: usize) -> f64 {
    let only_self_kd = LossWeights {
        self_kd: 1.0,
        ..LossWeights::NONE
    };
    let sums = crate::model::eval_step(model, batch, only_self_kd);
    sums.self_kd[j] / sums.rows.max(1) as f64
}

/// The last loop's rows scaled to the RMS of the early loop's rows.
fn rescaled(last: &[f32], early: &[f32], h: usize) -> Vec<f32> {
    let rms = |r: &[f32]| (r.iter().map(|v| v * v).sum::<f32>() / h as f32).sqrt();
    last.chunks(h)
        .zip(early.chunks(h))
        .flat_map(|(t, x)| {
            let s = rms(x) / rms(t).max(1e-12);
            t.iter().map(move |v| v * s)
        })
        .collect()
}

fn accumulate(n: &mut Normal, x: &[f32], target: &[f32], h: usize) {
    let rows = x.len() / h;
    let r: Vec<f32> = target.iter().zip(x).map(|(t, x)| t - x).collect();
    let (mut xtx, mut xtr) = (vec![0f32; h * h], vec![0f32; h * h]);
    let xv = MatRef::new(x, rows, h);
    gemm(MatMut::new(&mut xtx, h, h), xv.t(), xv, false);
    gemm(
        MatMut::new(&mut xtr, h, h),
        xv.t(),
        MatRef::new(&r, rows, h),
        false,
    );
    n.xtx
        .iter_mut()
        .zip(&xtx)
        .for_each(|(a, &b)| *a += b as f64);
    n.xtr
        .iter_mut()
        .zip(&xtr)
        .for_each(|(a, &b)| *a += b as f64);
    n.rows += rows;
}

/// `M` (`[h, h]`, row-major, acting as `y = x + M x`) minimising
/// `|X M^T - R|^2 + lambda |M|^2`: `M^T = (X^T X + lambda I)^-1 X^T R`.
fn solve(n: &Normal, h: usize, ridge: f64) -> Result<Vec<f32>> {
    let mean_diag = (0..h).map(|i| n.xtx[i * h + i]).sum::<f64>() / h as f64;
    let lambda = ridge * mean_diag.max(f64::MIN_POSITIVE);
    let a = Mat::<f64>::from_fn(h, h, |i, j| {
        n.xtx[i * h + j] + if i == j { lambda } else { 0.0 }
    });
    let b = Mat::<f64>::from_fn(h, h, |i, j| n.xtr[i * h + j]);
    let llt = a
        .llt(Side::Lower)
        .map_err(|e| TrainError::Input(format!("exit adapter fit: {e:?}")))?;
    let mt = llt.solve(&b);
    // M[i][j] = M^T[j][i].
    Ok((0..h * h).map(|k| mt[(k % h, k / h)] as f32).collect())
}

/// Relative error `|adapter(x) - t| / |t - 0|` over the kept rows, with the identity and with
/// the fitted adapter.
fn errors(
    seen: &[Vec<Vec<f32>>],
    j: usize,
    (down, up): (&[f32], &[f32]),
    rank: usize,
    h: usize,
) -> (f64, f64) {
    let (mut before, mut after, mut norm) = (0.0, 0.0, 0.0);
    for states in seen {
        let x = &states[j];
        let t = rescaled(states.last().expect("loops"), x, h);
        let rows = x.len() / h;
        let mut mid = vec![0f32; rows * rank];
        gemm(
            MatMut::new(&mut mid, rows, rank),
            MatRef::new(x, rows, h),
            MatRef::new(down, rank, h).t(),
            false,
        );
        let mut y = x.clone();
        gemm(
            MatMut::new(&mut y, rows, h),
            MatRef::new(&mid, rows, rank),
            MatRef::new(up, h, rank).t(),
            true,
        );
        for ((&a, &b), &c) in x.iter().zip(&y).zip(&t) {
            before += ((a - c) as f64).powi(2);
            after += ((b - c) as f64).powi(2);
            norm += (c as f64).powi(2);
        }
    }
    let n = norm.max(f64::MIN_POSITIVE);
    ((before / n).sqrt(), (after / n).sqrt())
}

/// A classifier fit, per exit: the rows, the share of them whose adapted argmax agrees with the
/// last loop's, and the mean binary cross-entropy before and after (on the fit rows).
#[derive(Debug, Clone)]
pub struct ClassifierReport {
    pub rows: usize,
    pub agreement: f64,
    pub bce_before: f64,
    pub bce_after: f64,
}

/// Fits every exit classifier of `model` on `batches` by L2-regularised logistic regression
/// (`ridge` on the standardised weights) of "the adapted exit's argmax equals the last loop's"
/// on the classifier's input, the RMS-normalised hidden state.
pub fn fit_classifiers(
    model: &mut TrainModel,
    batches: impl Iterator<Item = Batch>,
    ridge: f64,
) -> Result<Vec<ClassifierReport>> {
    let h = model.cfg.hidden_size;
    let eps = model.cfg.rms_norm_eps as f32;
    let n_exits = model.exits.len();
    let mut features: Vec<Vec<f32>> = vec![Vec::new(); n_exits];
    let mut labels: Vec<Vec<bool>> = vec![Vec::new(); n_exits];
    let mut before = vec![0.0; n_exits];
    let none = LossWeights::NONE;
    for batch in batches {
        let states = exits(model, &batch);
        let mut no_grads = Grads(vec![Vec::new(); model.params.list.len()]);
        let (sums, _) = heads(
            model,
            &states,
            &batch.targets(),
            None,
            none,
            1.0,
            &mut no_grads,
        );
        for j in 0..n_exits {
            before[j] += sums.classifier_bce[j];
            labels[j].extend(sums.classifier_points[j].iter().map(|&(_, a)| a));
            features[j].extend(states[j].chunks(h).flat_map(|x| {
                let r = 1.0 / (x.iter().map(|v| v * v).sum::<f32>() / h as f32 + eps).sqrt();
                x.iter().map(move |v| v * r)
            }));
        }
    }
    let mut reports = Vec::with_capacity(n_exits);
    for j in 0..n_exits {
        let rows = labels[j].len();
        if rows == 0 {
            return Err(TrainError::Input(
                "no rows to fit the exit classifiers on".into(),
            ));
        }
        let (w, b, bce) = logistic(&features[j], &labels[j], h, ridge)?;
        let e = &model.exits[j];
        model.params.list[e.classifier.0].value = w;
        model.params.list[e.bias.0].value = vec![b];
        reports.push(ClassifierReport {
            rows,
            agreement: labels[j].iter().filter(|&&a| a).count() as f64 / rows as f64,
            bce_before: before[j] / rows as f64,
            bce_after: bce,
        });
    }
    Ok(reports)
}

/// Newton's method for `P(y) = sigmoid(w . x + b)` on standardised columns; returns the
/// weights and bias for the raw features and the final mean cross-entropy.
fn logistic(x: &[f32], y: &[bool], h: usize, ridge: f64) -> Result<(Vec<f32>, f32, f64)> {
    let n = y.len();
    let d = h + 1;
    let mut mean = vec![0f64; h];
    let mut sq = vec![0f64; h];
    for row in x.chunks(h) {
        for (k, &v) in row.iter().enumerate() {
            mean[k] += v as f64;
            sq[k] += (v as f64).powi(2);
        }
    }
    let std: Vec<f64> = (0..h)
        .map(|k| {
            mean[k] /= n as f64;
            (sq[k] / n as f64 - mean[k] * mean[k])
                .max(0.0)
                .sqrt()
                .max(1e-6)
        })
        .collect();
    // Standardised design matrix with a constant column.
    let z: Vec<f32> = x
        .chunks(h)
        .flat_map(|row| {
            row.iter()
                .enumerate()
                .map(|(k, &v)| ((v as f64 - mean[k]) / std[k]) as f32)
                .chain(std::iter::once(1.0))
                .collect::<Vec<_>>()
        })
        .collect();
    let mut theta = vec![0f64; d];
    for _ in 0..25 {
        let (probs, _) = predict(&z, y, &theta, d);
        // Gradient and Hessian: Z^T (p - y) + lambda theta, Z^T W Z + lambda I (bias unpenalised).
        let mut grad = vec![0f64; d];
        let mut weighted = vec![0f32; n * d];
        for (i, (row, &p)) in z.chunks(d).zip(&probs).enumerate() {
            let r = p - y[i] as u8 as f64;
            let s = (p * (1.0 - p)).max(1e-9).sqrt() as f32;
            for (k, &v) in row.iter().enumerate() {
                grad[k] += r * v as f64;
                weighted[i * d + k] = v * s;
            }
        }
        let mut hess = vec![0f32; d * d];
        let wz = MatRef::new(&weighted, n, d);
        gemm(MatMut::new(&mut hess, d, d), wz.t(), wz, false);
        let lambda = ridge * n as f64;
        let a = Mat::<f64>::from_fn(d, d, |i, k| {
            let reg = if i == k && i < h { lambda } else { 0.0 };
            hess[i * d + k] as f64 + reg + if i == k { 1e-9 * n as f64 } else { 0.0 }
        });
        let g = Mat::<f64>::from_fn(d, 1, |i, _| {
            grad[i] + if i < h { lambda * theta[i] } else { 0.0 }
        });
        let llt = a
            .llt(Side::Lower)
            .map_err(|e| TrainError::Input(format!("exit classifier fit: {e:?}")))?;
        let step = llt.solve(&g);
        let mut moved = 0f64;
        for (k, t) in theta.iter_mut().enumerate() {
            *t -= step[(k, 0)];
            moved = moved.max(step[(k, 0)].abs());
        }
        if moved < 1e-6 {
            break;
        }
    }
    let (_, last) = predict(&z, y, &theta, d);
    // Back to raw features: w_k = theta_k / std_k, b = theta_h - sum theta_k mean_k / std_k.
    let w: Vec<f32> = (0..h).map(|k| (theta[k] / std[k]) as f32).collect();
    let b = theta[h] - (0..h).map(|k| theta[k] * mean[k] / std[k]).sum::<f64>();
    Ok((w, b as f32, last))
}

/// Probabilities and mean binary cross-entropy of `theta` on the standardised rows `z`.
fn predict(z: &[f32], y: &[bool], theta: &[f64], d: usize) -> (Vec<f64>, f64) {
    let mut loss = 0.0;
    let probs: Vec<f64> = z
        .chunks(d)
        .zip(y)
        .map(|(row, &a)| {
            let t: f64 = row.iter().zip(theta).map(|(&v, &w)| v as f64 * w).sum();
            let p = 1.0 / (1.0 + (-t).exp());
            loss -= if a {
                p.max(1e-12).ln()
            } else {
                (1.0 - p).max(1e-12).ln()
            };
            p
        })
        .collect();
    (probs, loss / y.len() as f64)
}
