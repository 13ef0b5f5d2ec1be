//! The x86 tiles of the bf16 kernel: AVX2 and AVX-512F (pairs widened to f32 with a shift and
//! a mask), AVX512_BF16 (`vdpbf16ps`), and the AVX2 panel widening for many rows.

use std::arch::x86_64::*;

use super::PANEL;

/// Rows per AVX2 tile: 4 rows x 16 columns = 8 accumulators, with 4 widened weight vectors
/// and 2 broadcasts: 14 of the 16 registers.
pub const MR: usize = 4;

/// `tile` (<= [`MR`]) rows of `x` (stride `k`) times one panel, into `c` (stride `ldc`),
/// `valid` columns.
///
/// # Safety
/// AVX2 and FMA run here; `x` holds `tile` rows of `k`; `panel` is one panel of
/// `k.div_ceil(2)` pairs; `c` has `tile` rows of `ldc` with `valid` columns from it.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn tile_avx2(
    x: &[f32],
    tile: usize,
    k: usize,
    panel: &[u16],
    c: *mut f32,
    ldc: usize,
    valid: usize,
) {
    // SAFETY: the caller's promise, for the same tile size.
    unsafe { by_rows!(tile; 1, 2, 3, 4; tile_n(x, k, panel, c, ldc, valid)) }
}

#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_n<const R: usize>(
    x: &[f32],
    k: usize,
    panel: &[u16],
    c: *mut f32,
    ldc: usize,
    valid: usize,
) {
    assert!(x.len() >= R * k && panel.len() >= k.div_ceil(2) * PANEL * 2);
    let hi = _mm256_set1_epi32(0xFFFF_0000u32 as i32);
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    let full = k / 2;
    let wp = panel.as_ptr();
    // One pair of k (`$j`) for every row: `$x0[r]`, `$x1[r]` are row r's two values.
    macro_rules! step {
        ($j:expr, $x0:expr, $x1:expr) => {{
            let j: usize = $j;
            // SAFETY: pair j < k.div_ceil(2): 32 u16 inside the panel (asserted above).
            let (v0, v1) = unsafe {
                _mm_prefetch::<_MM_HINT_T0>(
                    (wp.add(j * 32) as *const i8).wrapping_add(crate::kernels::PREFETCH),
                );
                (
                    _mm256_loadu_si256(wp.add(j * 32) as *const __m256i),
                    _mm256_loadu_si256(wp.add(j * 32 + 16) as *const __m256i),
                )
            };
            let w00 = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(v0));
            let w01 = _mm256_castsi256_ps(_mm256_and_si256(v0, hi));
            let w10 = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(v1));
            let w11 = _mm256_castsi256_ps(_mm256_and_si256(v1, hi));
            let (x0, x1): ([f32; R], [f32; R]) = ($x0, $x1);
            for r in 0..R {
                let (b0, b1) = (_mm256_set1_ps(x0[r]), _mm256_set1_ps(x1[r]));
                acc[r][0] = _mm256_fmadd_ps(b1, w01, _mm256_fmadd_ps(b0, w00, acc[r][0]));
                acc[r][1] = _mm256_fmadd_ps(b1, w11, _mm256_fmadd_ps(b0, w10, acc[r][1]));
            }
        }};
    }
    let xp = x.as_ptr();
    // Row r's values k and k + 1 (raw reads, as indexing bounds-checks every step).
    let at = |r: usize, kk: usize| {
        debug_assert!(r < R && kk + 1 < k);
        // SAFETY: r < R and kk + 1 < k (the loop below): inside `x` (asserted above).
        unsafe { (*xp.add(r * k + kk), *xp.add(r * k + kk + 1)) }
    };
    for j in 0..full {
        step!(
            j,
            std::array::from_fn(|r| at(r, 2 * j).0),
            std::array::from_fn(|r| at(r, 2 * j).1)
        );
    }
    if k % 2 == 1 {
        // The last pair holds one weight and a zero.
        step!(full, std::array::from_fn(|r| x[r * k + k - 1]), [0.0; R]);
    }
    for (r, a) in acc.iter().enumerate() {
        // SAFETY: row r < R of `c` has `valid` columns (the caller's promise).
        unsafe { crate::kernels::avx2::store_row(a, c.add(r * ldc), valid) };
    }
}

/// Panel `panel` (pairs) widened to f32, k-major: `out[kk * 16 + c]`.
///
/// # Safety
/// AVX2 runs here; `panel` holds `k.div_ceil(2)` pairs; `out` holds `k * 16` floats.
#[target_feature(enable = "avx2")]
pub unsafe fn widen_avx2(panel: &[u16], k: usize, out: &mut [f32]) {
    assert!(panel.len() >= k.div_ceil(2) * PANEL * 2 && out.len() >= k * PANEL);
    let hi = _mm256_set1_epi32(0xFFFF_0000u32 as i32);
    let (wp, op) = (panel.as_ptr(), out.as_mut_ptr());
    for j in 0..k / 2 {
        // SAFETY: pair j < k / 2: 32 u16 in the panel, rows 2j and 2j + 1 of `out` (asserted
        // above).
        unsafe {
            let v0 = _mm256_loadu_si256(wp.add(j * 32) as *const __m256i);
            let v1 = _mm256_loadu_si256(wp.add(j * 32 + 16) as *const __m256i);
            let even = op.add(2 * j * PANEL);
            _mm256_storeu_ps(even, _mm256_castsi256_ps(_mm256_slli_epi32::<16>(v0)));
            _mm256_storeu_ps(
                even.add(8),
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(v1)),
            );
            _mm256_storeu_ps(
                even.add(PANEL),
                _mm256_castsi256_ps(_mm256_and_si256(v0, hi)),
            );
            _mm256_storeu_ps(
                even.add(PANEL + 8),
                _mm256_castsi256_ps(_mm256_and_si256(v1, hi)),
            );
        }
    }
    if k % 2 == 1 {
        let j = k / 2;
        for c in 0..PANEL {
            out[(k - 1) * PANEL + c] = super::from_bf16(panel[j * 32 + 2 * c]);
        }
    }
}

/// Rows per AVX-512 tile: each loaded weight vector serves every row of the tile.
pub const MR512: usize = 4;

/// Rows per AVX512_BF16 tile: 8 rows x 2 sums = 16 `vdpbf16ps` chains in flight (its latency
/// is ~6 cycles), every weight vector used by 8 rows.
pub const MR_DP: usize = 8;

/// `tile` (<= [`MR512`]) rows of `x` (stride `k`) times one panel with AVX-512F (weights
/// widened to f32; even and odd k summed apart, then added), into `c` (stride `ldc`),
/// `valid` columns.
///
/// # Safety
/// AVX-512F runs here; `x` holds `tile` rows of `k`; `panel` is one panel for `k`; `c` has
/// `tile` rows of `ldc` with `valid` columns from it.
#[target_feature(enable = "avx512f")]
pub unsafe fn tile_avx512(
    x: &[f32],
    tile: usize,
    k: usize,
    panel: &[u16],
    c: *mut f32,
    ldc: usize,
    valid: usize,
) {
    // SAFETY: the caller's promise, for the same tile size.
    unsafe { by_rows!(tile; 1, 2, 3, 4; tile_f(x, k, panel, c, ldc, valid)) }
}

#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn tile_f<const R: usize>(
    x: &[f32],
    k: usize,
    panel: &[u16],
    c: *mut f32,
    ldc: usize,
    valid: usize,
) {
    assert!(x.len() >= R * k && panel.len() >= k.div_ceil(2) * PANEL * 2);
    let hi = _mm512_set1_epi32(0xFFFF_0000u32 as i32);
    let (mut a0, mut a1) = ([_mm512_setzero_ps(); R], [_mm512_setzero_ps(); R]);
    for j in 0..k.div_ceil(2) {
        // SAFETY: pair j: 32 u16 inside the panel (asserted above); a prefetch never
        // faults.
        let v = unsafe {
            let at = panel.as_ptr().add(j * 32);
            _mm_prefetch::<_MM_HINT_T0>((at as *const i8).wrapping_add(crate::kernels::PREFETCH));
            _mm512_loadu_si512(at as *const _)
        };
        let w0 = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(v));
        let w1 = _mm512_castsi512_ps(_mm512_and_si512(v, hi));
        for r in 0..R {
            let x0 = x[r * k + 2 * j];
            let x1 = if 2 * j + 1 < k {
                x[r * k + 2 * j + 1]
            } else {
                0.0
            };
            a0[r] = _mm512_fmadd_ps(_mm512_set1_ps(x0), w0, a0[r]);
            a1[r] = _mm512_fmadd_ps(_mm512_set1_ps(x1), w1, a1[r]);
        }
    }
    for r in 0..R {
        // SAFETY: AVX-512F runs here; row r of `c` has `valid` columns (the caller's
        // promise).
        unsafe {
            crate::kernels::avx512::store16(_mm512_add_ps(a0[r], a1[r]), c.add(r * ldc), valid)
        };
    }
}

/// Rows `rows` (<= [`MR_DP`]; bf16 pairs, `pairs` a row) of `x` times a run of `panels`
/// consecutive panels with AVX512_BF16's `vdpbf16ps` (even and odd pairs summed apart, then
/// added), into `c` (stride `ldc`; panel p at column `p * 16`), `last_valid` columns of the
/// last panel.
///
/// # Safety
/// AVX-512F and AVX512_BF16 run here; `x` holds rows `rows` of `pairs` pairs; `data` holds
/// `panels` panels of `pairs` pairs; `c` has `rows.len()` rows of `ldc` with the panels'
/// valid columns.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bf16")]
pub unsafe fn tile_dpbf16(
    x: &[u32],
    pairs: usize,
    rows: std::ops::Range<usize>,
    data: &[u16],
    panels: usize,
    c: *mut f32,
    ldc: usize,
    last_valid: usize,
) {
    let row0 = rows.start;
    // SAFETY: the caller's promise, for the same tile size.
    unsafe {
        by_rows!(rows.len(); 1, 2, 3, 4, 5, 6, 7, 8;
            tile_dp(x, pairs, row0, data, panels, c, ldc, last_valid))
    }
}

#[inline]
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn tile_dp<const R: usize>(
    x: &[u32],
    pairs: usize,
    row0: usize,
    data: &[u16],
    panels: usize,
    c: *mut f32,
    ldc: usize,
    last_valid: usize,
) {
    assert!(x.len() >= (row0 + R) * pairs && data.len() >= panels * pairs * PANEL * 2);
    // SAFETY: AVX-512F and AVX512_BF16 run here (the caller's promise); pair j of panel p is
    // 64 bytes inside `data` and pair j of rows row0..row0 + R lies inside `x` (asserted
    // above); row r of `c` has the panels' valid columns; a prefetch never faults.
    unsafe {
        let xr: [*const u32; R] = std::array::from_fn(|r| x.as_ptr().add((row0 + r) * pairs));
        let mut wp = data.as_ptr();
        for p in 0..panels {
            let (mut a0, mut a1) = ([_mm512_setzero_ps(); R], [_mm512_setzero_ps(); R]);
            let mut j = 0;
            while j + 1 < pairs {
                let at = wp.add(j * 32);
                if R >= crate::kernels::PREFETCH_FROM_ROWS {
                    let pf = (at as *const i8).wrapping_add(crate::kernels::PREFETCH);
                    _mm_prefetch::<_MM_HINT_T0>(pf);
                    _mm_prefetch::<_MM_HINT_T0>(pf.wrapping_add(64));
                }
                let v0 = to_bh(_mm512_loadu_si512(at as *const _));
                let v1 = to_bh(_mm512_loadu_si512(at.add(32) as *const _));
                for r in 0..R {
                    let b0 = to_bh(_mm512_set1_epi32(*xr[r].add(j) as i32));
                    let b1 = to_bh(_mm512_set1_epi32(*xr[r].add(j + 1) as i32));
                    a0[r] = _mm512_dpbf16_ps(a0[r], v0, b0);
                    a1[r] = _mm512_dpbf16_ps(a1[r], v1, b1);
                }
                j += 2;
            }
            if j < pairs {
                let v = to_bh(_mm512_loadu_si512(wp.add(j * 32) as *const _));
                for r in 0..R {
                    let b = to_bh(_mm512_set1_epi32(*xr[r].add(j) as i32));
                    a0[r] = _mm512_dpbf16_ps(a0[r], v, b);
                }
            }
            let valid = if p + 1 == panels { last_valid } else { PANEL };
            for r in 0..R {
                let sum = _mm512_add_ps(a0[r], a1[r]);
                crate::kernels::avx512::store16(sum, c.add(r * ldc + p * PANEL), valid);
            }
            wp = wp.add(pairs * PANEL * 2);
        }
    }
}

#[inline]
#[target_feature(enable = "avx512f,avx512bf16")]
fn to_bh(v: __m512i) -> __m512bh {
    // SAFETY: both are 512-bit vectors; bf16 pairs reinterpreted as they are.
    unsafe { std::mem::transmute::<__m512i, __m512bh>(v) }
}
