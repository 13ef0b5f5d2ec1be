//! The AVX-512 micro-kernel of [`super::matmul`]: a tile of up to [`MR`] rows of X times up to
//! [`NR`] weight panels (64 output columns), held in 24 accumulators. Each step along k loads one
//! vector per panel and broadcasts one X value per row: 10 loads feed 24 FMAs.

use std::arch::x86_64::*;
use std::ops::Range;

use super::packed::{PackedWeight, PANEL};

/// Rows of X per tile.
pub const MR: usize = 6;
/// Panels per tile.
pub const NR: usize = 4;

/// Computes `C[rows, panels]` (columns `panels.start * 16 ..`, clipped to `w.n()`), prefetching
/// `next` (the weight panels the caller computes next) into L2 while it works, so the weight
/// stream from memory overlaps the arithmetic instead of stalling the first row tile.
///
/// # Safety
/// The CPU must support AVX-512F; `x` is `[m, k]` with `rows.end <= m`; `c` is `[m, ldc]` with
/// `ldc == w.n()`; no other thread writes this block of C.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn matmul_block(
    x: &[f32],
    w: &PackedWeight,
    rows: Range<usize>,
    panels: Range<usize>,
    next: &[f32],
    c: *mut f32,
) {
    let k = w.k();
    let n = w.n();
    let mut p = panels.start;
    while p < panels.end {
        let nr = (panels.end - p).min(NR);
        let cols_valid = n - p * PANEL; // may exceed nr * PANEL
        let mut r = rows.start;
        let mut tile_index = 0;
        while r < rows.end {
            let mr = (rows.end - r).min(MR);
            // This tile prefetches its share of `next`: one 64-byte line per step along k.
            let pf_start =
                ((p - panels.start) / NR * rows.len().div_ceil(MR) + tile_index) * k * PANEL;
            let pf = next.get(pf_start..).unwrap_or(&[]);
            tile_index += 1;
            // SAFETY: row `r` < m and panel `p` < w.panels() (the caller's ranges), so the
            // pointers stay inside `x`, `c` and the packed weight.
            let (xp, cp, wp) = unsafe {
                (
                    x.as_ptr().add(r * k),
                    c.add(r * n + p * PANEL),
                    w.panel_ptr(p),
                )
            };
            macro_rules! dispatch {
                ($($a:literal $b:literal),*) => {
                    match (mr, nr) {
                        // SAFETY: a tile of `mr` <= rows left x `nr` <= panels left, inside the
                        // caller's block; AVX-512F runs here (the caller's promise).
                        $(($a, $b) => unsafe { tile::<$a, $b>(xp, k, wp, cp, n, cols_valid, pf) },)*
                        _ => unreachable!("tile sizes are 1..=MR x 1..=NR"),
                    }
                };
            }
            dispatch!(1 1, 1 2, 1 3, 1 4, 2 1, 2 2, 2 3, 2 4, 3 1, 3 2, 3 3, 3 4,
                      4 1, 4 2, 4 3, 4 4, 5 1, 5 2, 5 3, 5 4, 6 1, 6 2, 6 3, 6 4);
            r += mr;
        }
        p += nr;
    }
}

/// One `R` x `P` tile: `R` rows of X (stride `k`) times `P` panels from `w`, stored to `c`
/// (stride `ldc`), columns clipped to `cols_valid`; prefetches one line of `prefetch` per step.
///
/// # Safety
/// The CPU supports AVX-512F; `x` holds `R` rows of `k` floats; `w` holds `P` panels of
/// `k * PANEL` floats; `c` has `R` rows of `ldc` floats with room for `min(cols_valid, P *
/// PANEL)` columns each; no other thread writes them.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn tile<const R: usize, const P: usize>(
    x: *const f32,
    k: usize,
    w: *const f32,
    c: *mut f32,
    ldc: usize,
    cols_valid: usize,
    prefetch: &[f32],
) {
    let panel_stride = k * PANEL;
    let mut acc = [[_mm512_setzero_ps(); P]; R];
    let pf_steps = (prefetch.len() / PANEL).min(k);
    for kk in 0..k {
        if kk < pf_steps {
            // SAFETY: `kk * PANEL` < `prefetch.len()` (pf_steps); a prefetch never faults.
            unsafe { _mm_prefetch::<_MM_HINT_T1>(prefetch.as_ptr().add(kk * PANEL) as *const i8) };
        }
        let mut wv = [_mm512_setzero_ps(); P];
        for (b, v) in wv.iter_mut().enumerate() {
            // SAFETY: panel `b` < P, step `kk` < k: 16 floats inside `w`.
            *v = unsafe { _mm512_loadu_ps(w.add(b * panel_stride + kk * PANEL)) };
        }
        for (a, row) in acc.iter_mut().enumerate() {
            // SAFETY: row `a` < R, column `kk` < k: inside `x`.
            let xv = _mm512_set1_ps(unsafe { *x.add(a * k + kk) });
            for (b, v) in row.iter_mut().enumerate() {
                *v = _mm512_fmadd_ps(xv, wv[b], *v);
            }
        }
    }
    for (a, row) in acc.iter().enumerate() {
        for (b, v) in row.iter().enumerate() {
            let col = b * PANEL;
            if col >= cols_valid {
                break;
            }
            // SAFETY: row `a` < R; columns `col..` up to `cols_valid` are inside `c`'s row
            // (the caller's promise); the masked store writes only those.
            unsafe { store16(*v, c.add(a * ldc + col), cols_valid - col) };
        }
    }
}

/// Stores the first `valid` (<= 16) of 16 lanes to `c`.
///
/// # Safety
/// AVX-512F runs here; `c` has room for `valid` floats (masked lanes are not written).
#[inline]
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn store16(v: __m512, c: *mut f32, valid: usize) {
    let mask: __mmask16 = if valid >= PANEL {
        0xFFFF
    } else {
        ((1u32 << valid) - 1) as u16
    };
    // SAFETY: the caller's promise.
    unsafe { _mm512_mask_storeu_ps(c, mask, v) };
}
