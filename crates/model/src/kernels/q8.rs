//! int8 weights (`--dtype q8`): a quarter of the f32 weight stream. Weights are quantized at load
//! symmetrically in blocks of [`QBLOCK`] = 32 along k with one f32 scale per block and output
//! column (the block of llama.cpp's Q8_0, so GGUF Q8_0 tensors load as they are: 1.125 bytes per
//! weight); each row of activations is quantized the same way per call. A block's 32 products
//! sum exactly in int32, and the scaled block sums accumulate in f32.
//!
//! Layout: panels of [`PANEL`] output columns, k in pairs inside each block
//! (`[panel][block][16 pairs][16 columns][2]`), so a pair of int16-widened weights per column
//! meets a broadcast pair of activations in one `vpmaddwd` lane (AVX2, AVX-512BW): no
//! horizontal sums. AVX512_VNNI permutes two pair steps into quads (`vpermw`) and multiplies
//! them by activations offset to unsigned bytes with `vpdpbusd` (64 products an instruction),
//! subtracting the offset's share after. All paths sum each block exactly in int32 and scale
//! it the same way; each is tested against an f64 reference of the dequantized operands on
//! every instruction set the host runs (the VNNI arithmetic also step for step in plain Rust).

use std::ops::Range;

use super::isa::{Isa, Supported};
use super::{par_blocks, PANEL};

/// Weights per quantization block (along k).
pub const QBLOCK: usize = 32;
const PAIRS: usize = QBLOCK / 2;
const QUADS: usize = QBLOCK / 4;
/// Bytes of one panel's block: 16 pairs x 16 columns x 2.
const BLOCK_BYTES: usize = QBLOCK * PANEL;

/// A `[n, k]` weight as int8 blocks with f32 scales.
#[derive(Debug, Clone)]
pub struct PackedQ8 {
    n: usize,
    k: usize,
    data: Vec<i8>,
    /// `[panel][block][16]`: column c of block b is `scale * q`.
    scales: Vec<f32>,
}

/// Symmetric int8 quantization of one block: returns the scale and hands `put` each value's
/// index and its quantized value (`|q| <= 127`, an integer in an f32). Written so the compiler
/// vectorizes it: activations are quantized on every call.
#[inline(always)]
fn quantize_block_with(v: &[f32], mut put: impl FnMut(usize, f32)) -> f32 {
    // The largest magnitude, in 8 lanes (an exact maximum: the order does not matter).
    let mut lanes = [0f32; 8];
    let mut chunks = v.chunks_exact(8);
    for c in &mut chunks {
        for (l, &x) in lanes.iter_mut().zip(c) {
            *l = l.max(x.abs());
        }
    }
    for &x in chunks.remainder() {
        lanes[0] = lanes[0].max(x.abs());
    }
    let amax = lanes.iter().fold(0f32, |a, &b| a.max(b));
    if amax == 0.0 || !amax.is_finite() {
        (0..v.len()).for_each(|i| put(i, 0.0));
        return if amax.is_finite() { 0.0 } else { f32::NAN };
    }
    let scale = amax / 127.0;
    let inv = 127.0 / amax;
    // Adding and subtracting 1.5 * 2^23 rounds to nearest (ties to even) in plain float
    // arithmetic, which vectorizes (f32::round is a libm call); |x * inv| <= 127 here.
    const ROUND: f32 = 12_582_912.0;
    for (i, &x) in v.iter().enumerate() {
        put(i, (((x * inv) + ROUND) - ROUND).clamp(-127.0, 127.0));
    }
    scale
}

/// [`quantize_block_with`] into int8 values.
fn quantize_block(v: &[f32], q: &mut [i8]) -> f32 {
    let q = &mut q[..v.len()];
    quantize_block_with(v, |i, x| q[i] = x as i8)
}

impl PackedQ8 {
    /// Quantizes `w`, row-major `[n, k]` f32.
    pub fn quantize(w: &[f32], n: usize, k: usize) -> Self {
        assert_eq!(w.len(), n * k, "weight is not [n, k]");
        let blocks = k.div_ceil(QBLOCK);
        let mut scales = vec![0f32; n * blocks];
        let mut q = vec![0i8; n * blocks * QBLOCK];
        for row in 0..n {
            for b in 0..blocks {
                let src = &w[row * k + b * QBLOCK..row * k + ((b + 1) * QBLOCK).min(k)];
                let dst = &mut q[(row * blocks + b) * QBLOCK..][..src.len()];
                scales[row * blocks + b] = quantize_block(src, dst);
            }
        }
        Self::from_blocks(n, k, &scales, &q)
    }

    /// Packs quantized blocks as they are: `scales` is `[n, blocks]`, `q` is `[n, blocks, 32]`
    /// (row-major, blocks along k, the tail of the last block zero): a GGUF Q8_0 tensor's
    /// contents.
    pub fn from_blocks(n: usize, k: usize, scales: &[f32], q: &[i8]) -> Self {
        let blocks = k.div_ceil(QBLOCK);
        assert_eq!(scales.len(), n * blocks, "scales are not [n, blocks]");
        assert_eq!(
            q.len(),
            n * blocks * QBLOCK,
            "values are not [n, blocks, 32]"
        );
        let panels = n.div_ceil(PANEL);
        let mut data = vec![0i8; panels * blocks * BLOCK_BYTES];
        let mut packed_scales = vec![0f32; panels * blocks * PANEL];
        for row in 0..n {
            let (p, c) = (row / PANEL, row % PANEL);
            for b in 0..blocks {
                let base = (p * blocks + b) * BLOCK_BYTES;
                for i in 0..QBLOCK {
                    if b * QBLOCK + i < k {
                        data[base + (i / 2) * PANEL * 2 + c * 2 + i % 2] =
                            q[(row * blocks + b) * QBLOCK + i];
                    }
                }
                packed_scales[(p * blocks + b) * PANEL + c] = scales[row * blocks + b];
            }
        }
        Self {
            n,
            k,
            data,
            scales: packed_scales,
        }
    }

    /// Back to row-major `[n, k]` f32: `scale * q` of every weight.
    pub fn dequantize(&self) -> Vec<f32> {
        let (n, k, blocks) = (self.n, self.k, self.blocks());
        let mut w = vec![0f32; n * k];
        for row in 0..n {
            let (p, c) = (row / PANEL, row % PANEL);
            for kk in 0..k {
                let (b, i) = (kk / QBLOCK, kk % QBLOCK);
                let q =
                    self.data[(p * blocks + b) * BLOCK_BYTES + (i / 2) * PANEL * 2 + c * 2 + i % 2];
                w[row * k + kk] = self.scales[(p * blocks + b) * PANEL + c] * q as f32;
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

    fn blocks(&self) -> usize {
        self.k.div_ceil(QBLOCK)
    }

    /// Panel `p`'s values (`blocks x 512` bytes) and scales (`blocks x 16`).
    fn panel(&self, p: usize) -> (&[i8], &[f32]) {
        let b = self.blocks();
        (
            &self.data[p * b * BLOCK_BYTES..(p + 1) * b * BLOCK_BYTES],
            &self.scales[p * b * PANEL..(p + 1) * b * PANEL],
        )
    }

    /// Bytes the weight occupies (values and scales).
    pub fn bytes(&self) -> usize {
        self.data.len() + self.scales.len() * 4
    }
}

/// Rows of activations quantized per block like the weights: each row's values as int16 pairs
/// (`lo = x[2j]`, `hi = x[2j + 1]` in one i32, ready to broadcast) and one scale per block.
pub struct QuantizedRows {
    blocks: usize,
    pairs: Vec<i32>,
    scales: Vec<f32>,
}

impl QuantizedRows {
    /// Quantizes `x` (`[m, k]`).
    pub fn new(x: &[f32], m: usize, k: usize) -> Self {
        assert_eq!(x.len(), m * k, "x is not [m, k]");
        let blocks = k.div_ceil(QBLOCK);
        let mut pairs = vec![0i32; m * blocks * PAIRS];
        let mut scales = vec![0f32; m * blocks];
        // Each i32 holds two consecutive int16 values, low half first: the pairs are the
        // int16 values in order, read two at a time.
        // SAFETY: i32 storage reinterpreted as twice as many i16 (alignment 4 >= 2, no padding,
        // every bit pattern valid); `pairs` is not used otherwise while `values` lives.
        let values = unsafe {
            std::slice::from_raw_parts_mut(pairs.as_mut_ptr() as *mut i16, pairs.len() * 2)
        };
        for r in 0..m {
            for b in 0..blocks {
                let src = &x[r * k + b * QBLOCK..r * k + ((b + 1) * QBLOCK).min(k)];
                let dst = &mut values[(r * blocks + b) * QBLOCK..][..src.len()];
                scales[r * blocks + b] = quantize_block_with(src, |i, v| dst[i] = v as i16);
            }
        }
        if cfg!(target_endian = "big") {
            // The kernels read a pair as (low = first, high = second).
            pairs.iter_mut().for_each(|p| *p = p.rotate_left(16));
        }
        Self {
            blocks,
            pairs,
            scales,
        }
    }

    /// Every row's values as unsigned bytes `q + 128`, four consecutive values to a u32 (first
    /// in the low byte): the operand AVX512_VNNI's `vpdpbusd` takes as unsigned (`[m, blocks,
    /// 8]`).
    fn offset_quads(&self) -> Vec<u32> {
        let byte = |v: i32| ((v as i16 as i32) + 128) as u32;
        self.pairs
            .chunks_exact(2)
            .map(|p| byte(p[0]) | byte(p[0] >> 16) << 8 | byte(p[1]) << 16 | byte(p[1] >> 16) << 24)
            .collect()
    }

    /// Row `r`: its pairs (`blocks x 16`) and scales.
    fn row(&self, r: usize) -> (&[i32], &[f32]) {
        let b = self.blocks;
        (
            &self.pairs[r * b * PAIRS..(r + 1) * b * PAIRS],
            &self.scales[r * b..(r + 1) * b],
        )
    }

    /// The dequantized rows (`[m, blocks * 32]`, zero past k): what the kernels multiply.
    #[cfg(test)]
    fn dequantize(&self) -> Vec<f32> {
        let m = self.scales.len() / self.blocks.max(1);
        let mut out = Vec::with_capacity(m * self.blocks * QBLOCK);
        for r in 0..m {
            let (pairs, scales) = self.row(r);
            for (j, &p) in pairs.iter().enumerate() {
                let s = scales[j / PAIRS];
                out.push(s * (p as i16) as f32);
                out.push(s * ((p >> 16) as i16) as f32);
            }
        }
        out
    }
}

/// The instruction sets [`matmul_q8_on`] has a path for.
pub const PATHS: [Isa; 4] = [Isa::Portable, Isa::Avx2, Isa::Avx512, Isa::Avx512Vnni];

/// `y = x w^T` for `x` (`[m, k]` f32, quantized per row inside) and an int8 weight (`[n, k]`):
/// `[m, n]` f32.
pub fn matmul_q8(x: &[f32], m: usize, w: &PackedQ8) -> Vec<f32> {
    matmul_q8_on(Supported::best_of(&PATHS), x, m, w)
}

/// [`matmul_q8`] on a given instruction set of this CPU (one of [`PATHS`]).
pub fn matmul_q8_on(isa: Supported, x: &[f32], m: usize, w: &PackedQ8) -> Vec<f32> {
    let xq = QuantizedRows::new(x, m, w.k());
    let quads = if isa.isa() == Isa::Avx512Vnni {
        xq.offset_quads()
    } else {
        Vec::new()
    };
    let block = |rows: Range<usize>, panels: Range<usize>, _next, c: *mut f32| {
        for p in panels {
            // SAFETY: `isa` runs here; rows < m and p < panels; `quads` is `xq`'s on VNNI;
            // `c` is `[m, n]`, and this task alone writes these rows of panel p (`par_blocks`).
            unsafe { panel_rows(isa, &xq, &quads, w, rows.clone(), p, c) };
        }
    };
    // SAFETY: `panel_rows` stores every valid column of its rows of its panel.
    unsafe { par_blocks(m, w.n(), block) }
}

/// Rows `rows` of panel `p` on `isa`.
///
/// # Safety
/// `isa` runs on this CPU; `xq` holds at least `rows.end` rows of `w.k()` (and `quads` their
/// [`QuantizedRows::offset_quads`] on AVX512_VNNI); `p` is a panel of `w`; `c` is
/// `[m, w.n()]`; no other thread writes these rows of the panel.
unsafe fn panel_rows(
    isa: Supported,
    xq: &QuantizedRows,
    quads: &[u32],
    w: &PackedQ8,
    rows: Range<usize>,
    p: usize,
    c: *mut f32,
) {
    let n = w.n();
    let valid = (n - p * PANEL).min(PANEL);
    let (values, scales) = w.panel(p);
    match isa.isa() {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni => {
            let per_row = xq.blocks * QUADS;
            let mut r = rows.start;
            while r < rows.end {
                let tile = (rows.end - r).min(x86::MR);
                let xs: [(&[u32], &[f32]); x86::MR] = std::array::from_fn(|i| {
                    let row = r + i.min(tile - 1);
                    (&quads[row * per_row..(row + 1) * per_row], xq.row(row).1)
                });
                // SAFETY: AVX-512F+BW and VNNI run here; rows r..r + tile of the panel's valid
                // columns lie in `c`.
                unsafe {
                    x86::tile_vnni(
                        &xs[..tile],
                        values,
                        scales,
                        c.add(r * n + p * PANEL),
                        n,
                        valid,
                    )
                };
                r += tile;
            }
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 | Isa::Avx512Bf16 => {
            let mut r = rows.start;
            while r < rows.end {
                let tile = (rows.end - r).min(x86::MR);
                let xs: [(&[i32], &[f32]); x86::MR] =
                    std::array::from_fn(|i| xq.row(r + i.min(tile - 1)));
                // SAFETY: AVX-512F+BW run here; rows r..r + tile of the panel's valid columns
                // lie in `c`.
                unsafe {
                    x86::tile_avx512(
                        &xs[..tile],
                        values,
                        scales,
                        c.add(r * n + p * PANEL),
                        n,
                        valid,
                    )
                };
                r += tile;
            }
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => {
            let mut r = rows.start;
            while r < rows.end {
                let tile = (rows.end - r).min(x86::MR);
                let xs: [(&[i32], &[f32]); x86::MR] =
                    std::array::from_fn(|i| xq.row(r + i.min(tile - 1)));
                // SAFETY: AVX2 and FMA run here; rows r..r + tile of the panel's valid columns
                // lie in `c`.
                unsafe {
                    x86::tile_avx2(
                        &xs[..tile],
                        values,
                        scales,
                        c.add(r * n + p * PANEL),
                        n,
                        valid,
                    )
                };
                r += tile;
            }
        }
        _ => {
            for r in rows {
                let (xp, xs) = xq.row(r);
                let out = portable_row(xp, xs, values, scales);
                // SAFETY: row r's valid columns of the panel lie in `c`.
                unsafe {
                    std::ptr::copy_nonoverlapping(out.as_ptr(), c.add(r * n + p * PANEL), valid)
                };
            }
        }
    }
}

/// One quantized row times one panel, in plain Rust.
fn portable_row(xp: &[i32], xs: &[f32], values: &[i8], scales: &[f32]) -> [f32; PANEL] {
    let mut acc = [0f32; PANEL];
    for (b, &sx) in xs.iter().enumerate() {
        let mut dots = [0i32; PANEL];
        for j in 0..PAIRS {
            let pair = xp[b * PAIRS + j];
            let (x0, x1) = ((pair as i16) as i32, ((pair >> 16) as i16) as i32);
            let w = &values[b * BLOCK_BYTES + j * PANEL * 2..][..PANEL * 2];
            for (c, d) in dots.iter_mut().enumerate() {
                *d += x0 * w[2 * c] as i32 + x1 * w[2 * c + 1] as i32;
            }
        }
        for (c, a) in acc.iter_mut().enumerate() {
            *a += dots[c] as f32 * (scales[b * PANEL + c] * sx);
        }
    }
    acc
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{BLOCK_BYTES, PAIRS, PANEL, QUADS};

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
        unsafe {
            match xs.len() {
                1 => tile_n::<1>(xs, values, scales, c, ldc, valid),
                2 => tile_n::<2>(xs, values, scales, c, ldc, valid),
                3 => tile_n::<3>(xs, values, scales, c, ldc, valid),
                4 => tile_n::<4>(xs, values, scales, c, ldc, valid),
                _ => unreachable!("tiles are 1..=MR rows"),
            }
        }
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
        // Raw row pointers: indexing the slices in the loop reloads and bounds-checks them
        // every step (measured: a third of the kernel's time).
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
        unsafe {
            match xs.len() {
                1 => tile_bw::<1>(xs, values, scales, c, ldc, valid),
                2 => tile_bw::<2>(xs, values, scales, c, ldc, valid),
                3 => tile_bw::<3>(xs, values, scales, c, ldc, valid),
                4 => tile_bw::<4>(xs, values, scales, c, ldc, valid),
                _ => unreachable!("tiles are 1..=MR rows"),
            }
        }
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

    /// Quantized rows as offset quads (`xs[r].0`: [`super::QuantizedRows::offset_quads`]) times
    /// one panel with AVX512_VNNI's `vpdpbusd` (64 products an instruction): `sum((x + 128) w)
    /// - 128 sum(w)` is the block's exact int32 sum, the same as the other paths'; the second
    /// term is one more `vpdpbusd` a step for the whole tile.
    ///
    /// # Safety
    /// AVX-512F, AVX-512BW and AVX512_VNNI run here; every row has 8 quads and a scale per
    /// block of the panel; `c` has `xs.len()` rows of `ldc` with `valid` columns from it.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn tile_vnni(
        xs: &[(&[u32], &[f32])],
        values: &[i8],
        scales: &[f32],
        c: *mut f32,
        ldc: usize,
        valid: usize,
    ) {
        // SAFETY: the caller's promise, for the same tile size.
        unsafe {
            match xs.len() {
                1 => tile_dpbusd::<1>(xs, values, scales, c, ldc, valid),
                2 => tile_dpbusd::<2>(xs, values, scales, c, ldc, valid),
                3 => tile_dpbusd::<3>(xs, values, scales, c, ldc, valid),
                4 => tile_dpbusd::<4>(xs, values, scales, c, ldc, valid),
                _ => unreachable!("tiles are 1..=MR rows"),
            }
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn tile_dpbusd<const R: usize>(
        xs: &[(&[u32], &[f32])],
        values: &[i8],
        scales: &[f32],
        c: *mut f32,
        ldc: usize,
        valid: usize,
    ) {
        let blocks = scales.len() / PANEL;
        assert!(xs.len() >= R && values.len() >= blocks * BLOCK_BYTES);
        for (xq, xsc) in xs.iter().take(R) {
            assert!(xq.len() >= blocks * QUADS && xsc.len() >= blocks);
        }
        // SAFETY: AVX-512F/BW and VNNI run here (the caller's promise); block b, quad q is 64
        // bytes inside `values`, block b's 16 scales lie inside `scales`, and quad q and scale
        // b of block b inside every row (asserted above); `QUAD_PERM` is 32 u16; row r of `c`
        // has `valid` columns; a prefetch never faults.
        unsafe {
            let perm = _mm512_loadu_si512(QUAD_PERM.as_ptr() as *const _);
            let offset = _mm512_set1_epi8(-128); // 0x80: 128 as the unsigned operand
            let mut acc = [_mm512_setzero_ps(); R];
            for b in 0..blocks {
                let mut dots = [_mm512_setzero_si512(); R];
                let mut bias = _mm512_setzero_si512();
                for q in 0..QUADS {
                    let at = values.as_ptr().add(b * BLOCK_BYTES + q * 64);
                    _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(crate::kernels::PREFETCH));
                    let w = _mm512_permutexvar_epi16(perm, _mm512_loadu_si512(at as *const _));
                    bias = _mm512_dpbusd_epi32(bias, offset, w);
                    for (r, d) in dots.iter_mut().enumerate() {
                        let xb = _mm512_set1_epi32(*xs[r].0.get_unchecked(b * QUADS + q) as i32);
                        *d = _mm512_dpbusd_epi32(*d, xb, w);
                    }
                }
                for d in dots.iter_mut() {
                    *d = _mm512_sub_epi32(*d, bias);
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::tests::{max_diff, pseudo_random, reference};

    #[test]
    fn blocks_round_trip_within_half_a_step() {
        let (n, k) = (37, 70);
        let w = pseudo_random(n * k, 3);
        let q = PackedQ8::quantize(&w, n, k);
        let back = q.dequantize();
        for row in 0..n {
            for b in 0..k.div_ceil(QBLOCK) {
                let block = &w[row * k + b * QBLOCK..row * k + ((b + 1) * QBLOCK).min(k)];
                let step = block.iter().fold(0f32, |a, x| a.max(x.abs())) / 127.0;
                for (i, &v) in block.iter().enumerate() {
                    let got = back[row * k + b * QBLOCK + i];
                    assert!((got - v).abs() <= step * 0.5 + 1e-7, "{got} vs {v}");
                }
            }
        }
        assert_eq!(q.bytes(), 3 * 3 * 512 + 3 * 3 * 16 * 4);
        // An all-zero block has scale 0 and stays zero.
        let z = PackedQ8::quantize(&[0.0; 64], 2, 32);
        assert!(z.dequantize().iter().all(|&v| v == 0.0));
    }

    #[test]
    fn q8_matmul_matches_an_f64_reference_on_every_instruction_set_here() {
        let shapes = [
            (1, 576, 1536),
            (3, 67, 101),
            (8, 576, 49),
            (1, 5, 1),
            (5, 1536, 576),
            (33, 576, 130),
            (64, 17, 257),
        ];
        for &(m, k, n) in &shapes {
            let x = pseudo_random(m * k, 1);
            let w = pseudo_random(n * k, 2);
            let packed = PackedQ8::quantize(&w, n, k);
            // The kernels' arithmetic is exact on the dequantized operands (int32 block sums),
            // up to f32 rounding of the scaled sums.
            let kp = k.div_ceil(QBLOCK) * QBLOCK;
            let xq = QuantizedRows::new(&x, m, k).dequantize();
            let wq: Vec<f32> = packed
                .dequantize()
                .chunks(k)
                .flat_map(|row| row.iter().copied().chain(std::iter::repeat_n(0.0, kp - k)))
                .collect();
            let want = reference(&xq, m, kp, &wq, n);
            let f32_want = reference(&x, m, k, &w, n);
            let scale = f32_want.iter().fold(0f32, |a, v| a.max(v.abs()));
            let paths = Supported::all()
                .iter()
                .filter(|s| PATHS.contains(&s.isa()))
                .map(|&isa| (isa.isa().name(), matmul_q8_on(isa, &x, m, &packed)))
                .chain([("dispatched", matmul_q8(&x, m, &packed))]);
            for (path, got) in paths {
                let diff = max_diff(&got, &want);
                assert!(
                    diff < 1e-4 * scale.max(1.0),
                    "{path}: m={m} k={k} n={n}: max diff {diff}"
                );
                // And close to the f32 product: int8 steps of both operands.
                let err = max_diff(&got, &f32_want);
                assert!(
                    err < 0.02 * scale.max(0.1),
                    "{path}: m={m} k={k} n={n}: error {err} of {scale}"
                );
            }
        }
    }

    /// What the AVX512_VNNI tile computes, step for step in plain Rust (this CPU may lack
    /// VNNI): `vpermw` of two pair steps into column quads, `vpdpbusd` of the offset
    /// activations, minus the bias; it must give the pair paths' exact block sums.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_vnni_quads_give_the_pair_paths_block_sums() {
        let (n, k) = (16, 96);
        let packed = PackedQ8::quantize(&pseudo_random(n * k, 7), n, k);
        let xq = QuantizedRows::new(&pseudo_random(k, 8), 1, k);
        let quads = xq.offset_quads();
        let (values, _) = packed.panel(0);
        let (pairs, _) = xq.row(0);
        let at = |i: usize| values[i] as i32;
        for b in 0..k / QBLOCK {
            let mut want = [0i32; PANEL];
            for j in 0..PAIRS {
                let p = pairs[b * PAIRS + j];
                let (x0, x1) = ((p as i16) as i32, ((p >> 16) as i16) as i32);
                for (c, s) in want.iter_mut().enumerate() {
                    let base = b * BLOCK_BYTES + j * 32 + 2 * c;
                    *s += x0 * at(base) + x1 * at(base + 1);
                }
            }
            let (mut got, mut bias) = ([0i32; PANEL], [0i32; PANEL]);
            for q in 0..QUADS {
                let src = &values[b * BLOCK_BYTES + q * 64..][..64];
                // vpermw: word i of the result is word QUAD_PERM[i] of the source.
                let mut w = [0i8; 64];
                for (i, &from) in x86::QUAD_PERM.iter().enumerate() {
                    w[2 * i] = src[2 * from as usize];
                    w[2 * i + 1] = src[2 * from as usize + 1];
                }
                let xb = quads[b * QUADS + q].to_le_bytes();
                for c in 0..PANEL {
                    for t in 0..4 {
                        got[c] += xb[t] as i32 * w[4 * c + t] as i32;
                        bias[c] += 128 * w[4 * c + t] as i32;
                    }
                }
            }
            for c in 0..PANEL {
                assert_eq!(got[c] - bias[c], want[c], "block {b} column {c}");
            }
        }
    }

    #[test]
    fn a_row_gives_the_same_bits_alone_and_in_any_batch() {
        // The engine checks batched decoding against one sequence at a time: a row's result
        // must not depend on the rows beside it (tile sizes, widened panels).
        let (k, n) = (577, 70);
        let w = pseudo_random(n * k, 5);
        let packed = PackedQ8::quantize(&w, n, k);
        for &isa in Supported::all().iter().filter(|s| PATHS.contains(&s.isa())) {
            let x = pseudo_random(40 * k, 6);
            let alone: Vec<Vec<f32>> = (0..40)
                .map(|r| matmul_q8_on(isa, &x[r * k..(r + 1) * k], 1, &packed))
                .collect();
            for m in [2, 3, 5, 13, 40] {
                let batch = matmul_q8_on(isa, &x[..m * k], m, &packed);
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
