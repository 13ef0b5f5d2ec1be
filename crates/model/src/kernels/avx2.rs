//! The AVX2+FMA micro-kernel of [`super::matmul`]: a tile of up to [`MR`] rows of X times one
//! weight panel (16 output columns, two 8-lane vectors), in 12 accumulators. Each step along k
//! loads the panel's two vectors once for every row of the tile.

use std::arch::x86_64::*;
use std::ops::Range;

use super::packed::{PackedWeight, PANEL};

/// Rows of X per tile: 6 rows x 2 vectors = 12 accumulators, 2 weight vectors and a broadcast
/// (15 of the 16 registers).
pub const MR: usize = 6;

/// Computes `C[rows, panels]` (columns clipped to `w.n()`).
///
/// # Safety
/// The CPU supports AVX2 and FMA; `x` is `[m, k]` with `rows.end <= m`; `c` is `[m, w.n()]`;
/// no other thread writes this block of C.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn matmul_block(
    x: &[f32],
    w: &PackedWeight,
    rows: Range<usize>,
    panels: Range<usize>,
    c: *mut f32,
) {
    let n = w.n();
    for p in panels {
        let valid = (n - p * PANEL).min(PANEL);
        // SAFETY: the caller's promise, for panel p (its columns start at p * 16).
        unsafe {
            panel_rows(
                x,
                w.k(),
                w.panel(p),
                rows.clone(),
                c.add(p * PANEL),
                n,
                valid,
            )
        };
    }
}

/// Rows `rows` of `x` (`[m, k]`) times one f32 panel (`k * 16`, k-major) into `c` (row r at
/// `c + r * ldc`), `valid` columns; also the bf16 kernel's path once it has widened a panel.
///
/// # Safety
/// AVX2 and FMA run here; `rows.end <= m`; every row r of `rows` has `valid` columns at
/// `c + r * ldc` that no other thread writes.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn panel_rows(
    x: &[f32],
    k: usize,
    panel: &[f32],
    rows: Range<usize>,
    c: *mut f32,
    ldc: usize,
    valid: usize,
) {
    for t in super::row_tiles(rows, MR) {
        let xr = &x[t.start * k..t.end * k];
        // SAFETY: rows t < m and their `valid` columns lie inside `c` (the caller's promise);
        // AVX2 and FMA run here.
        unsafe {
            let cp = c.add(t.start * ldc);
            by_rows!(t.len(); 1, 2, 3, 4, 5, 6; tile_n(xr, k, panel, cp, ldc, valid))
        }
    }
}

/// `R` rows of `x` (stride `k`) times one panel (`k * 16` floats) into `c` (stride `ldc`),
/// `valid` columns.
///
/// # Safety
/// AVX2 and FMA run here; `c` has `R` rows of `ldc` floats with `valid` columns from it.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_n<const R: usize>(
    x: &[f32],
    k: usize,
    panel: &[f32],
    c: *mut f32,
    ldc: usize,
    valid: usize,
) {
    assert!(x.len() >= R * k && panel.len() >= k * PANEL);
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    let (wp, xp) = (panel.as_ptr(), x.as_ptr());
    for kk in 0..k {
        // SAFETY: step kk < k: 16 floats inside the panel (asserted above).
        let (w0, w1) = unsafe {
            _mm_prefetch::<_MM_HINT_T0>(
                (wp.add(kk * PANEL) as *const i8).wrapping_add(super::PREFETCH),
            );
            (
                _mm256_loadu_ps(wp.add(kk * PANEL)),
                _mm256_loadu_ps(wp.add(kk * PANEL + 8)),
            )
        };
        for (r, a) in acc.iter_mut().enumerate() {
            // SAFETY: r < R and kk < k: inside `x` (asserted above); a raw read, as indexing
            // bounds-checks every step.
            let b = _mm256_set1_ps(unsafe { *xp.add(r * k + kk) });
            a[0] = _mm256_fmadd_ps(b, w0, a[0]);
            a[1] = _mm256_fmadd_ps(b, w1, a[1]);
        }
    }
    for (r, a) in acc.iter().enumerate() {
        // SAFETY: row r of `c` has `valid` columns (the caller's promise).
        unsafe { store_row(a, c.add(r * ldc), valid) };
    }
}

/// Stores the first `valid` (<= 16) of a row's two 8-lane accumulators to `c`.
///
/// # Safety
/// AVX runs here; `c` has room for `valid` floats.
#[inline]
#[target_feature(enable = "avx")]
pub(super) unsafe fn store_row(a: &[__m256; 2], c: *mut f32, valid: usize) {
    let mut out = [0f32; PANEL];
    // SAFETY: `out` holds 16 floats.
    unsafe {
        _mm256_storeu_ps(out.as_mut_ptr(), a[0]);
        _mm256_storeu_ps(out.as_mut_ptr().add(8), a[1]);
    }
    // SAFETY: the caller's promise; `valid` <= 16 floats of `out`.
    unsafe { std::ptr::copy_nonoverlapping(out.as_ptr(), c, valid.min(PANEL)) };
}
