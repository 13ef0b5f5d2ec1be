//! bf16 weights (`--dtype bf16`): half the bytes of f32 for the weight stream that bounds
//! decoding, f32 activations and f32 accumulation. Weights are packed once at load into panels
//! of [`PANEL`] output columns holding k in pairs (`[panel][k / 2][16][2]`, k padded to even
//! with zeros): the pair layout AVX512_BF16's `vdpbf16ps` multiplies, and one the widening paths
//! read with a shift (the even k) and a mask (the odd k) per 32-bit lane, without shuffles.
//!
//! Paths, fastest first: AVX512_BF16 (`vdpbf16ps`; activations rounded to bf16, products
//! summed in f32), AVX-512F and AVX2+FMA (weights widened to f32, f32 FMA), portable. Each is
//! tested against an f64 reference on every instruction set the host runs.

use std::ops::Range;

use super::isa::{Isa, Supported};
use super::{par_blocks, PANEL};

/// A `[n, k]` weight in bf16 pair panels.
#[derive(Debug, Clone)]
pub struct PackedBf16 {
    n: usize,
    k: usize,
    data: Vec<u16>,
}

/// bf16 bits of `v`, rounded to nearest even (NaN stays NaN).
pub fn to_bf16(v: f32) -> u16 {
    half::bf16::from_f32(v).to_bits()
}

/// The f32 of bf16 bits.
#[inline(always)]
pub fn from_bf16(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

impl PackedBf16 {
    /// Packs `w`, row-major `[n, k]` f32, rounding each weight to bf16.
    pub fn pack(w: &[f32], n: usize, k: usize) -> Self {
        assert_eq!(w.len(), n * k, "weight is not [n, k]");
        Self::pack_bits(n, k, |row, kk| to_bf16(w[row * k + kk]))
    }

    /// Packs bf16 bits `bits`, row-major `[n, k]` (a bf16 checkpoint's tensor, as stored).
    pub fn from_bits(bits: &[u16], n: usize, k: usize) -> Self {
        assert_eq!(bits.len(), n * k, "weight is not [n, k]");
        Self::pack_bits(n, k, |row, kk| bits[row * k + kk])
    }

    fn pack_bits(n: usize, k: usize, at: impl Fn(usize, usize) -> u16) -> Self {
        let pairs = k.div_ceil(2);
        let panel_len = pairs * PANEL * 2;
        let mut data = vec![0u16; n.div_ceil(PANEL) * panel_len];
        for row in 0..n {
            let (p, c) = (row / PANEL, row % PANEL);
            let panel = &mut data[p * panel_len..(p + 1) * panel_len];
            for kk in 0..k {
                panel[(kk / 2) * PANEL * 2 + c * 2 + kk % 2] = at(row, kk);
            }
        }
        Self { n, k, data }
    }

    /// Back to row-major `[n, k]` f32 (exactly the bf16 values).
    pub fn unpack(&self) -> Vec<f32> {
        let (n, k) = (self.n, self.k);
        let panel_len = self.panel_len();
        let mut w = vec![0f32; n * k];
        for row in 0..n {
            let (p, c) = (row / PANEL, row % PANEL);
            for kk in 0..k {
                w[row * k + kk] =
                    from_bf16(self.data[p * panel_len + (kk / 2) * PANEL * 2 + c * 2 + kk % 2]);
            }
        }
        w
    }

    pub fn n(&self) -> usize {
        self.n
    }

    pub fn k(&self) -> usize {
        self.k
    }

    pub fn panels(&self) -> usize {
        self.n.div_ceil(PANEL)
    }

    fn pairs(&self) -> usize {
        self.k.div_ceil(2)
    }

    fn panel_len(&self) -> usize {
        self.pairs() * PANEL * 2
    }

    /// Panel `p`: `k / 2` pairs x 16 columns x 2.
    fn panel(&self, p: usize) -> &[u16] {
        &self.data[p * self.panel_len()..(p + 1) * self.panel_len()]
    }

    /// Bytes the weight occupies.
    pub fn bytes(&self) -> usize {
        self.data.len() * 2
    }
}

/// The instruction sets [`matmul_bf16_on`] has a path for.
pub const PATHS: [Isa; 4] = [Isa::Portable, Isa::Avx2, Isa::Avx512, Isa::Avx512Bf16];

/// `y = x w^T` for `x` (`[m, k]` f32) and a bf16 weight (`[n, k]`): `[m, n]` f32.
pub fn matmul_bf16(x: &[f32], m: usize, w: &PackedBf16) -> Vec<f32> {
    matmul_bf16_on(Supported::best_of(&PATHS), x, m, w)
}

/// [`matmul_bf16`] on a given instruction set of this CPU (one of [`PATHS`]; others fall back to
/// the best path they include).
pub fn matmul_bf16_on(isa: Supported, x: &[f32], m: usize, w: &PackedBf16) -> Vec<f32> {
    assert_eq!(x.len(), m * w.k(), "x is not [m, k]");
    // AVX512_BF16 multiplies bf16 by bf16: the rows are rounded once, as pairs.
    let xb: Vec<u32> = if isa.isa() == Isa::Avx512Bf16 {
        bf16_pairs(x, m, w.k())
    } else {
        Vec::new()
    };
    let block = |rows: Range<usize>, panels: Range<usize>, _next, c: *mut f32| {
        for p in panels {
            // SAFETY: `isa` runs here; rows < m and panel p < w.panels(); `c` is `[m, n]` and
            // this task alone writes these rows of panel p (`par_blocks`).
            unsafe { panel_rows(isa, x, &xb, w, rows.clone(), p, c) };
        }
    };
    // SAFETY: `panel_rows` stores every valid column of its rows of its panel.
    unsafe { par_blocks(m, w.n(), block) }
}

/// `x` rounded to bf16, each row as `k / 2` (padded) little-endian pairs `lo = x[2j]`,
/// `hi = x[2j + 1]`.
fn bf16_pairs(x: &[f32], m: usize, k: usize) -> Vec<u32> {
    let pairs = k.div_ceil(2);
    let mut out = vec![0u32; m * pairs];
    for r in 0..m {
        for j in 0..pairs {
            let lo = to_bf16(x[r * k + 2 * j]) as u32;
            let hi = if 2 * j + 1 < k {
                to_bf16(x[r * k + 2 * j + 1]) as u32
            } else {
                0
            };
            out[r * pairs + j] = lo | (hi << 16);
        }
    }
    out
}

/// Rows `rows` of panel `p` on `isa`.
///
/// # Safety
/// `isa` runs on this CPU; `x` is `[m, k]` (and `xb` its [`bf16_pairs`] on AVX512_BF16) with
/// `rows.end <= m`; `p < w.panels()`; `c` is `[m, w.n()]`; no other thread writes these rows
/// of the panel.
unsafe fn panel_rows(
    isa: Supported,
    x: &[f32],
    xb: &[u32],
    w: &PackedBf16,
    rows: Range<usize>,
    p: usize,
    c: *mut f32,
) {
    let valid = (w.n() - p * PANEL).min(PANEL);
    let panel = w.panel(p);
    let (k, n) = (w.k(), w.n());
    match isa.isa() {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Bf16 => {
            let pairs = w.pairs();
            let mut r = rows.start;
            while r < rows.end {
                let tile = (rows.end - r).min(x86::MR512);
                let xr = &xb[r * pairs..(r + tile) * pairs];
                // SAFETY: AVX512_BF16 runs here; rows r..r + tile and the panel's valid columns
                // lie in `c`.
                unsafe { x86::tile_dpbf16(xr, tile, panel, c.add(r * n + p * PANEL), n, valid) };
                r += tile;
            }
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 | Isa::Avx512Vnni => {
            let mut r = rows.start;
            while r < rows.end {
                let tile = (rows.end - r).min(x86::MR512);
                let xr = &x[r * k..(r + tile) * k];
                // SAFETY: AVX-512F runs here; rows r..r + tile and the panel's valid columns
                // lie in `c`.
                unsafe { x86::tile_avx512(xr, tile, k, panel, c.add(r * n + p * PANEL), n, valid) };
                r += tile;
            }
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 if rows.len() >= WIDEN_ROWS => {
            // Enough rows to amortise widening the panel once: then it is the f32 kernel's
            // (the same products, summed in the same order, as the bf16 tile below).
            WIDE.with_borrow_mut(|wide| {
                wide.resize(k * PANEL, 0.0);
                // SAFETY: AVX2 runs here; `wide` holds k x 16 floats.
                unsafe { x86::widen_avx2(panel, k, wide) };
                // SAFETY: AVX2 and FMA run here; rows < m; the panel's valid columns of these
                // rows lie in `c` (this function's promise).
                unsafe { super::avx2::panel_rows(x, k, wide, rows, c.add(p * PANEL), n, valid) };
            });
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => {
            let mut r = rows.start;
            while r < rows.end {
                let tile = (rows.end - r).min(x86::MR);
                let xr = &x[r * k..(r + tile) * k];
                // SAFETY: AVX2 and FMA run here; rows r..r + tile and the panel's valid
                // columns lie in `c`.
                unsafe { x86::tile_avx2(xr, tile, k, panel, c.add(r * n + p * PANEL), n, valid) };
                r += tile;
            }
        }
        _ => {
            for r in rows {
                let out = portable_row(&x[r * k..(r + 1) * k], panel);
                // SAFETY: row r and the panel's valid columns lie in `c`.
                unsafe {
                    std::ptr::copy_nonoverlapping(out.as_ptr(), c.add(r * n + p * PANEL), valid)
                };
            }
        }
    }
}

/// Rows from which the AVX2 path widens a panel to f32 once instead of widening every step for
/// each tile of rows (measured with `rrt bench matmul`: the widened panel's extra write and read
/// cost more than they save below this).
const WIDEN_ROWS: usize = 12;

std::thread_local! {
    /// A panel widened to f32 (k x 16), reused by each thread.
    static WIDE: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// One row of x times one panel, in plain Rust.
fn portable_row(x: &[f32], panel: &[u16]) -> [f32; PANEL] {
    let mut acc = [0f32; PANEL];
    for (kk, &xv) in x.iter().enumerate() {
        let step = &panel[(kk / 2) * PANEL * 2..(kk / 2 + 1) * PANEL * 2];
        for (c, a) in acc.iter_mut().enumerate() {
            *a += xv * from_bf16(step[c * 2 + kk % 2]);
        }
    }
    acc
}

#[cfg(target_arch = "x86_64")]
mod x86 {
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
        unsafe {
            match tile {
                1 => tile_n::<1>(x, k, panel, c, ldc, valid),
                2 => tile_n::<2>(x, k, panel, c, ldc, valid),
                3 => tile_n::<3>(x, k, panel, c, ldc, valid),
                4 => tile_n::<4>(x, k, panel, c, ldc, valid),
                _ => unreachable!("tiles are 1..=MR rows"),
            }
        }
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
        unsafe {
            match tile {
                1 => tile_f::<1>(x, k, panel, c, ldc, valid),
                2 => tile_f::<2>(x, k, panel, c, ldc, valid),
                3 => tile_f::<3>(x, k, panel, c, ldc, valid),
                4 => tile_f::<4>(x, k, panel, c, ldc, valid),
                _ => unreachable!("tiles are 1..=MR512 rows"),
            }
        }
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
                _mm_prefetch::<_MM_HINT_T0>(
                    (at as *const i8).wrapping_add(crate::kernels::PREFETCH),
                );
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

    /// `tile` (<= [`MR512`]) rows (bf16 pairs, stride `x.len() / tile`) times one panel with
    /// AVX512_BF16's `vdpbf16ps` (even and odd pairs summed apart, then added), into `c`
    /// (stride `ldc`), `valid` columns.
    ///
    /// # Safety
    /// AVX-512F and AVX512_BF16 run here; `x` holds `tile` rows of the panel's pairs; `c` has
    /// `tile` rows of `ldc` with `valid` columns from it.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn tile_dpbf16(
        x: &[u32],
        tile: usize,
        panel: &[u16],
        c: *mut f32,
        ldc: usize,
        valid: usize,
    ) {
        // SAFETY: the caller's promise, for the same tile size.
        unsafe {
            match tile {
                1 => tile_dp::<1>(x, panel, c, ldc, valid),
                2 => tile_dp::<2>(x, panel, c, ldc, valid),
                3 => tile_dp::<3>(x, panel, c, ldc, valid),
                4 => tile_dp::<4>(x, panel, c, ldc, valid),
                _ => unreachable!("tiles are 1..=MR512 rows"),
            }
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn tile_dp<const R: usize>(
        x: &[u32],
        panel: &[u16],
        c: *mut f32,
        ldc: usize,
        valid: usize,
    ) {
        let pairs = x.len() / R;
        assert!(x.len() == R * pairs && panel.len() >= pairs * PANEL * 2);
        let (mut a0, mut a1) = ([_mm512_setzero_ps(); R], [_mm512_setzero_ps(); R]);
        let mut j = 0;
        while j + 1 < pairs {
            // SAFETY: pairs j and j + 1 lie inside the panel (asserted above); a prefetch
            // never faults.
            let (v0, v1) = unsafe {
                let at = panel.as_ptr().add(j * 32) as *const i8;
                _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(crate::kernels::PREFETCH));
                _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(crate::kernels::PREFETCH + 64));
                (
                    _mm512_loadu_si512(panel.as_ptr().add(j * 32) as *const _),
                    _mm512_loadu_si512(panel.as_ptr().add(j * 32 + 32) as *const _),
                )
            };
            for r in 0..R {
                let b0 = _mm512_set1_epi32(x[r * pairs + j] as i32);
                let b1 = _mm512_set1_epi32(x[r * pairs + j + 1] as i32);
                a0[r] = _mm512_dpbf16_ps(a0[r], to_bh(v0), to_bh(b0));
                a1[r] = _mm512_dpbf16_ps(a1[r], to_bh(v1), to_bh(b1));
            }
            j += 2;
        }
        if j < pairs {
            // SAFETY: pair j lies inside the panel.
            let v = unsafe { _mm512_loadu_si512(panel.as_ptr().add(j * 32) as *const _) };
            for r in 0..R {
                let b = _mm512_set1_epi32(x[r * pairs + j] as i32);
                a0[r] = _mm512_dpbf16_ps(a0[r], to_bh(v), to_bh(b));
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

    #[inline]
    #[target_feature(enable = "avx512f,avx512bf16")]
    fn to_bh(v: __m512i) -> __m512bh {
        // SAFETY: both are 512-bit vectors; bf16 pairs reinterpreted as they are.
        unsafe { std::mem::transmute::<__m512i, __m512bh>(v) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::tests::{max_diff, pseudo_random, reference};

    #[test]
    fn bf16_rounding_is_to_nearest_even() {
        assert_eq!(from_bf16(to_bf16(1.0)), 1.0);
        assert_eq!(from_bf16(to_bf16(-2.5)), -2.5);
        // 1 + 2^-8 is halfway between two bf16 values: ties go to the even one (1.0).
        assert_eq!(from_bf16(to_bf16(1.0 + 1.0 / 256.0)), 1.0);
        assert!((from_bf16(to_bf16(0.1)) - 0.1).abs() < 0.1 / 128.0);
    }

    #[test]
    fn bf16_matmul_matches_an_f64_reference_on_every_instruction_set_here() {
        let shapes = [
            (1, 576, 1536),
            (3, 67, 101),
            (8, 576, 49),
            (1, 5, 1),
            (5, 1535, 576),
            (33, 576, 130),
            (64, 17, 257),
        ];
        for &(m, k, n) in &shapes {
            let x = pseudo_random(m * k, 1);
            let w = pseudo_random(n * k, 2);
            let packed = PackedBf16::pack(&w, n, k);
            let wq = packed.unpack();
            assert!(wq
                .iter()
                .zip(&w)
                .all(|(a, b)| (a - b).abs() <= b.abs() / 128.0));
            // Against the bf16 weights exactly: every path but AVX512_BF16 multiplies f32
            // activations; that one rounds them to bf16 too (8 bits of mantissa).
            let exact = reference(&x, m, k, &wq, n);
            let xq: Vec<f32> = x.iter().map(|&v| from_bf16(to_bf16(v))).collect();
            let rounded = reference(&xq, m, k, &wq, n);
            let paths = Supported::all()
                .iter()
                .filter(|s| PATHS.contains(&s.isa()))
                .map(|&isa| (isa.isa(), matmul_bf16_on(isa, &x, m, &packed)))
                .chain([(
                    Supported::best_of(&PATHS).isa(),
                    matmul_bf16(&x, m, &packed),
                )]);
            for (isa, got) in paths {
                let want = if isa == Isa::Avx512Bf16 {
                    &rounded
                } else {
                    &exact
                };
                let diff = max_diff(&got, want);
                assert!(
                    diff < 1e-4,
                    "{}: m={m} k={k} n={n}: max diff {diff}",
                    isa.name()
                );
            }
        }
    }

    #[test]
    fn a_row_gives_the_same_bits_alone_and_in_any_batch() {
        // The engine checks batched decoding against one sequence at a time: a row's result
        // must not depend on the rows beside it (tile sizes, widened panels).
        let (k, n) = (577, 70);
        let w = pseudo_random(n * k, 5);
        let packed = PackedBf16::pack(&w, n, k);
        for &isa in Supported::all().iter().filter(|s| PATHS.contains(&s.isa())) {
            let x = pseudo_random(40 * k, 6);
            let alone: Vec<Vec<f32>> = (0..40)
                .map(|r| matmul_bf16_on(isa, &x[r * k..(r + 1) * k], 1, &packed))
                .collect();
            for m in [2, 3, 5, 13, 40] {
                let batch = matmul_bf16_on(isa, &x[..m * k], m, &packed);
                for (r, alone) in alone.iter().enumerate().take(m) {
                    assert_eq!(
                        alone[..],
                        batch[r * n..(r + 1) * n],
                        "{} row {r} of {m}",
                        isa.isa().name()
                    );
                }
            }
        }
    }
}
