//! AVX-512 register-tiled `C = X W^T` for few rows: 4 rows of X against 4 rows of W at a time,
//! 16 accumulators of 16 lanes along k, with no packing (the weight is read in its Linear layout,
//! which is already contiguous along k). The W tile stays in L1 while every X tile streams from L2.

use std::arch::x86_64::*;
use std::ops::Range;

/// Computes `C[r, j]` for all rows `r < m` and columns `j in cols`.
///
/// # Safety
/// The CPU must support AVX-512F; `x` is `[m, k]`, `w` is `[n, k]` with `cols.end <= n`, and `c`
/// is `[m, ldc]` with `cols.end <= ldc`; no other thread writes `C[.., cols]`.
#[target_feature(enable = "avx512f")]
pub unsafe fn gemm_nt_cols(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[f32],
    cols: Range<usize>,
    c: *mut f32,
    ldc: usize,
) {
    // Blocks of X rows bound the working set (X block + this task's W columns) to L2.
    for r0 in (0..m).step_by(ROW_BLOCK) {
        let r1 = (r0 + ROW_BLOCK).min(m);
        let mut j = cols.start;
        while j < cols.end {
            let nr = (cols.end - j).min(4);
            let wp = w.as_ptr().add(j * k);
            let mut r = r0;
            while r < r1 {
                let mr = (r1 - r).min(4);
                let xp = x.as_ptr().add(r * k);
                let cp = c.add(r * ldc + j);
                macro_rules! dispatch {
                    ($($a:literal $b:literal),*) => {
                        match (mr, nr) {
                            $(($a, $b) => tile::<$a, $b>(xp, k, wp, cp, ldc),)*
                            _ => unreachable!("tile sizes are 1..=4"),
                        }
                    };
                }
                dispatch!(1 1, 1 2, 1 3, 1 4, 2 1, 2 2, 2 3, 2 4, 3 1, 3 2, 3 3, 3 4, 4 1, 4 2, 4 3, 4 4);
                r += mr;
            }
            j += nr;
        }
    }
}

/// Rows of X per block (64 rows x 1536 floats = 384 KiB, well inside a 2 MiB L2).
const ROW_BLOCK: usize = 64;

#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn tile<const MR: usize, const NR: usize>(
    x: *const f32,
    k: usize,
    w: *const f32,
    c: *mut f32,
    ldc: usize,
) {
    let mut acc = [[_mm512_setzero_ps(); NR]; MR];
    let full = k / 16;
    for kk in 0..full {
        let off = kk * 16;
        let mut wv = [_mm512_setzero_ps(); NR];
        for (b, v) in wv.iter_mut().enumerate() {
            *v = _mm512_loadu_ps(w.add(b * k + off));
        }
        for (a, row) in acc.iter_mut().enumerate() {
            let xv = _mm512_loadu_ps(x.add(a * k + off));
            for (b, v) in row.iter_mut().enumerate() {
                *v = _mm512_fmadd_ps(xv, wv[b], *v);
            }
        }
    }
    let rem = k % 16;
    if rem != 0 {
        let off = full * 16;
        let mask: __mmask16 = ((1u32 << rem) - 1) as u16;
        let mut wv = [_mm512_setzero_ps(); NR];
        for (b, v) in wv.iter_mut().enumerate() {
            *v = _mm512_maskz_loadu_ps(mask, w.add(b * k + off));
        }
        for (a, row) in acc.iter_mut().enumerate() {
            let xv = _mm512_maskz_loadu_ps(mask, x.add(a * k + off));
            for (b, v) in row.iter_mut().enumerate() {
                *v = _mm512_fmadd_ps(xv, wv[b], *v);
            }
        }
    }
    for (a, row) in acc.iter().enumerate() {
        for (b, v) in row.iter().enumerate() {
            *c.add(a * ldc + b) = _mm512_reduce_add_ps(*v);
        }
    }
}
