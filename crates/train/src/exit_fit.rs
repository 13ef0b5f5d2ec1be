//! A closed-form start for the exit adapters: ridge regression from the hidden state after an
//! early loop to the last loop's (each target row rescaled to its input's RMS, since the shared
//! final norm only sees directions), truncated to the adapter's rank by SVD, like the LoRA
//! relaxation. Distillation then trains from there instead of from the identity, which on a
//! frozen model is where most of an adapter's gain comes from.

use faer::linalg::solvers::Solve;
use faer::{Mat, Side};
use rrt_model::kernels::gemm::{gemm, MatMut, MatRef};
use rrt_model::recursive::svd::Factors;

use crate::error::{Result, TrainError};
use crate::model::{exits, Batch};
use crate::params::TrainModel;

/// The sums one exit's regression needs: `X^T X` and `X^T (T - X)` over the rows seen.
struct Normal {
    xtx: Vec<f64>,
    xtr: Vec<f64>,
    rows: usize,
}

/// What a fit did, per exit: the share of the residual's energy the rank kept, and the
/// relative error of the adapted rows against their targets before and after (on the fit rows).
#[derive(Debug, Clone)]
pub struct FitReport {
    pub rows: usize,
    pub energy_kept: f64,
    pub error_before: f64,
    pub error_after: f64,
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
    for batch in batches {
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
        model.params.list[e.down.0].value = down;
        model.params.list[e.up.0].value = up;
        reports.push(FitReport {
            rows: normal.rows,
            energy_kept: kept / total.max(f64::MIN_POSITIVE),
            error_before: before,
            error_after: after,
        });
    }
    Ok(reports)
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
