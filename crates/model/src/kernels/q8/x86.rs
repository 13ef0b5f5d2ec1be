//! The x86 tiles of the int8 kernel: AVX2 and AVX-512BW (`vpmaddwd` on int16-widened pairs),
//! AVX512_VNNI (`vpdpbusd` on column quads). Each tile takes up to [`MR`] quantized rows against
//! one panel and sums every block exactly in int32 before scaling it into the f32 sums.

use std::arch::x86_64::*;

use super::{VnniRows, BLOCK_BYTES, PAIRS, PANEL, QUADS};

/// Rows per AVX2 tile: the int32 block sums (2 vectors a row) stay in registers; the f32
/// sums are touched once per block (6 rows measured no faster).
pub const MR: usize = 4;

/// Quantized rows `xs` (<= [`MR`]) times one panel into `c` (stride `ldc`), `valid` columns.
///
/// # Safety
/// AVX2 and FMA run here; every row has as many blocks as the panel; `c` has `xs.len()`
/// rows of `ldc` with `valid` columns from it.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn tile_avx2(
    xs: &[(&[i32], &[f32])],
    values: &[i8],
    scales: &[f32],
    c: *mut f32,
    ldc: usize,
    valid: usize,
) {
    // SAFETY: the caller's promise, for the same tile size.
    unsafe { by_rows!(xs.len(); 1, 2, 3, 4; tile_n(xs, values, scales, c, ldc, valid)) }
}

#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_n<const R: usize>(
    xs: &[(&[i32], &[f32])],
    values: &[i8],
    scales: &[f32],
    c: *mut f32,
    ldc: usize,
    valid: usize,
) {
    let blocks = scales.len() / PANEL;
    assert!(values.len() >= blocks * BLOCK_BYTES);
    for (xp, xsc) in xs.iter().take(R) {
        assert!(xp.len() >= blocks * PAIRS && xsc.len() >= blocks);
    }
    // Raw row pointers: indexing the slices in the loop reloaded and bounds-checked them every
    // step (found with `perf annotate`).
    let xp: [*const i32; R] = std::array::from_fn(|r| xs[r].0.as_ptr());
    let xsc: [*const f32; R] = std::array::from_fn(|r| xs[r].1.as_ptr());
    let (wp, sp) = (values.as_ptr(), scales.as_ptr());
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    for b in 0..blocks {
        let mut dots = [[_mm256_setzero_si256(); 2]; R];
        for j in 0..PAIRS {
            // SAFETY: block b, pair j: 32 bytes inside `values`, and pair j of block b of
            // every row (asserted above). Each half is widened straight from memory
            // (`vpmovsxbw ymm, m128`); the prefetch never faults.
            unsafe {
                let at = wp.add(b * BLOCK_BYTES + j * 32);
                if j % 2 == 0 {
                    _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(crate::kernels::PREFETCH));
                }
                let lo = _mm256_cvtepi8_epi16(_mm_loadu_si128(at as *const __m128i));
                let hi = _mm256_cvtepi8_epi16(_mm_loadu_si128(at.add(16) as *const __m128i));
                for r in 0..R {
                    let xb = _mm256_set1_epi32(*xp[r].add(b * PAIRS + j));
                    dots[r][0] = _mm256_add_epi32(dots[r][0], _mm256_madd_epi16(lo, xb));
                    dots[r][1] = _mm256_add_epi32(dots[r][1], _mm256_madd_epi16(hi, xb));
                }
            }
        }
        // SAFETY: block b's 16 scales lie inside `scales`, block b of every row's scales
        // (asserted above).
        unsafe {
            let (s0, s1) = (
                _mm256_loadu_ps(sp.add(b * PANEL)),
                _mm256_loadu_ps(sp.add(b * PANEL + 8)),
            );
            for r in 0..R {
                let sx = _mm256_set1_ps(*xsc[r].add(b));
                acc[r][0] = _mm256_fmadd_ps(
                    _mm256_cvtepi32_ps(dots[r][0]),
                    _mm256_mul_ps(s0, sx),
                    acc[r][0],
                );
                acc[r][1] = _mm256_fmadd_ps(
                    _mm256_cvtepi32_ps(dots[r][1]),
                    _mm256_mul_ps(s1, sx),
                    acc[r][1],
                );
            }
        }
    }
    for (r, a) in acc.iter().enumerate() {
        // SAFETY: row r of `c` has `valid` columns (the caller's promise).
        unsafe { crate::kernels::avx2::store_row(a, c.add(r * ldc), valid) };
    }
}

/// Quantized rows `xs` (<= [`MR`]) times one panel with AVX-512BW (`vpmaddwd`), into `c`
/// (stride `ldc`), `valid` columns: each widened weight vector serves every row of the
/// tile.
///
/// # Safety
/// AVX-512F and AVX-512BW run here; every row has as many blocks as the panel; `c` has
/// `xs.len()` rows of `ldc` with `valid` columns from it.
#[target_feature(enable = "avx512f,avx512bw")]
pub unsafe fn tile_avx512(
    xs: &[(&[i32], &[f32])],
    values: &[i8],
    scales: &[f32],
    c: *mut f32,
    ldc: usize,
    valid: usize,
) {
    // SAFETY: the caller's promise, for the same tile size.
    unsafe { by_rows!(xs.len(); 1, 2, 3, 4; tile_bw(xs, values, scales, c, ldc, valid)) }
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn tile_bw<const R: usize>(
    xs: &[(&[i32], &[f32])],
    values: &[i8],
    scales: &[f32],
    c: *mut f32,
    ldc: usize,
    valid: usize,
) {
    let blocks = scales.len() / PANEL;
    assert!(xs.len() >= R && values.len() >= blocks * BLOCK_BYTES);
    for (xp, xsc) in xs.iter().take(R) {
        assert!(xp.len() >= blocks * PAIRS && xsc.len() >= blocks);
    }
    // SAFETY: AVX-512F/BW run here (the caller's promise); block b, pair j is 32 bytes
    // inside `values`, block b's 16 scales lie inside `scales`, and pair j and scale b of
    // block b inside every row (asserted above); row r of `c` has `valid` columns; a
    // prefetch never faults.
    unsafe {
        let mut acc = [_mm512_setzero_ps(); R];
        for b in 0..blocks {
            let mut dots = [_mm512_setzero_si512(); R];
            for j in 0..PAIRS {
                let at = values.as_ptr().add(b * BLOCK_BYTES + j * 32);
                if j % 2 == 0 {
                    _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(crate::kernels::PREFETCH));
                }
                let w = _mm512_cvtepi8_epi16(_mm256_loadu_si256(at as *const __m256i));
                for (r, d) in dots.iter_mut().enumerate() {
                    let xb = _mm512_set1_epi32(*xs[r].0.get_unchecked(b * PAIRS + j));
                    *d = _mm512_add_epi32(*d, _mm512_madd_epi16(w, xb));
                }
            }
            scale_blocks(&mut acc, &dots, scales.as_ptr().add(b * PANEL), |r| {
                *xs[r].1.get_unchecked(b)
            });
        }
        for (r, a) in acc.iter().enumerate() {
            crate::kernels::avx512::store16(*a, c.add(r * ldc), valid);
        }
    }
}

/// `acc[r] += dots[r] * (scales * sx(r))`: a block's int32 sums into the f32 sums (the same
/// operations as the AVX2 tile, lane for lane).
///
/// # Safety
/// AVX-512F runs here; `scales` points to 16 floats.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn scale_blocks<const R: usize>(
    acc: &mut [__m512; R],
    dots: &[__m512i; R],
    scales: *const f32,
    sx: impl Fn(usize) -> f32,
) {
    // SAFETY: the caller's promise.
    let s = unsafe { _mm512_loadu_ps(scales) };
    for (r, a) in acc.iter_mut().enumerate() {
        let s = _mm512_mul_ps(s, _mm512_set1_ps(sx(r)));
        *a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dots[r]), s, *a);
    }
}

/// `vpermw` indices that turn two consecutive pair steps of a block (64 bytes: 16 columns x
/// (k, k + 1), then 16 columns x (k + 2, k + 3)) into 16 columns x (k .. k + 3): word 2c is
/// column c's first pair, word 2c + 1 its second.
pub const QUAD_PERM: [u16; 32] = {
    let mut idx = [0u16; 32];
    let mut c = 0;
    while c < 16 {
        idx[2 * c] = c as u16;
        idx[2 * c + 1] = 16 + c as u16;
        c += 1;
    }
    idx
};

/// Rows per AVX512_VNNI tile: 4 rows x 2 int32 sums and 4 f32 sums in registers (8 rows
/// spilled them: measured 2x slower at 32 rows).
pub const MR_VNNI: usize = 4;

/// Rows `row0..row0 + R` of `x` (R <= [`MR_VNNI`]) times a run of `panels` consecutive panels
/// (their values and scales one after the other) with AVX512_VNNI's `vpdpbusd` (64 products
/// an instruction): the weights go in as unsigned `w + 128` (an XOR of their sign bits), so
/// `sum((w + 128) x) - 128 sum(x)` is each block's exact int32 sum, the same as the other
/// paths'. Writes `c` (stride `ldc`; panel p at column `p * 16`), `last_valid` columns of the
/// last panel.
///
/// # Safety
/// AVX-512F, AVX-512BW and AVX512_VNNI run here; `x` holds rows `row0..row0 + rows`; the
/// panels have `x`'s blocks; `c` has `rows` rows of `ldc` with the panels' valid columns.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub unsafe fn tile_vnni(
    x: &VnniRows<'_>,
    rows: std::ops::Range<usize>,
    values: &[i8],
    scales: &[f32],
    panels: usize,
    c: *mut f32,
    ldc: usize,
    last_valid: usize,
) {
    let row0 = rows.start;
    // SAFETY: the caller's promise, for the same tile size.
    unsafe {
        by_rows!(rows.len(); 1, 2, 3, 4;
            tile_dpbusd(x, row0, values, scales, panels, c, ldc, last_valid))
    }
}

#[inline]
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn tile_dpbusd<const R: usize>(
    x: &VnniRows<'_>,
    row0: usize,
    values: &[i8],
    scales: &[f32],
    panels: usize,
    c: *mut f32,
    ldc: usize,
    last_valid: usize,
) {
    let blocks = x.blocks;
    assert!(
        values.len() >= panels * blocks * BLOCK_BYTES && scales.len() >= panels * blocks * PANEL
    );
    assert!(
        x.quads.len() >= (row0 + R) * blocks * QUADS
            && x.offsets.len() >= (row0 + R) * blocks
            && x.scales.len() >= (row0 + R) * blocks
    );
    // SAFETY: AVX-512F/BW and VNNI run here (the caller's promise); panel p, block b, quad q
    // is 64 bytes inside `values` and its 16 scales inside `scales`, and rows row0..row0 + R
    // have `blocks` blocks of quads, offsets and scales (asserted above); `QUAD_PERM` is 32
    // u16; row r of `c` has the panels' valid columns; a prefetch never faults.
    unsafe {
        let perm = _mm512_loadu_si512(QUAD_PERM.as_ptr() as *const _);
        let flip = _mm512_set1_epi8(-128); // 0x80: w ^ 0x80 is w + 128 as an unsigned byte
        let xq: [*const u32; R] =
            std::array::from_fn(|r| x.quads.as_ptr().add((row0 + r) * blocks * QUADS));
        let xo: [*const i32; R] =
            std::array::from_fn(|r| x.offsets.as_ptr().add((row0 + r) * blocks));
        let xs: [*const f32; R] =
            std::array::from_fn(|r| x.scales.as_ptr().add((row0 + r) * blocks));
        let (mut wp, mut sp) = (values.as_ptr(), scales.as_ptr());
        for p in 0..panels {
            let mut acc = [_mm512_setzero_ps(); R];
            for b in 0..blocks {
                // Even and odd quads sum apart: two dependency chains a row.
                let mut dots = [[_mm512_setzero_si512(); 2]; R];
                for q in 0..QUADS {
                    let at = wp.add(q * 64);
                    if R >= crate::kernels::PREFETCH_FROM_ROWS {
                        _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(crate::kernels::PREFETCH));
                    }
                    let w = _mm512_permutexvar_epi16(perm, _mm512_loadu_si512(at as *const _));
                    let w = _mm512_xor_si512(w, flip);
                    for r in 0..R {
                        let xb = _mm512_set1_epi32(*xq[r].add(b * QUADS + q) as i32);
                        dots[r][q % 2] = _mm512_dpbusd_epi32(dots[r][q % 2], w, xb);
                    }
                }
                let sums: [__m512i; R] = std::array::from_fn(|r| {
                    let d = _mm512_add_epi32(dots[r][0], dots[r][1]);
                    _mm512_sub_epi32(d, _mm512_set1_epi32(*xo[r].add(b)))
                });
                scale_blocks(&mut acc, &sums, sp, |r| *xs[r].add(b));
                wp = wp.add(BLOCK_BYTES);
                sp = sp.add(PANEL);
            }
            let valid = if p + 1 == panels { last_valid } else { PANEL };
            for (r, a) in acc.iter().enumerate() {
                crate::kernels::avx512::store16(*a, c.add(r * ldc + p * PANEL), valid);
            }
        }
    }
}
