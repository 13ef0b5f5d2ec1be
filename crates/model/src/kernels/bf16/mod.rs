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

use rayon::prelude::*;

use super::isa::{Isa, Supported};
use super::{par_blocks, row_tiles, PANEL};

/// A `[n, k]` weight in bf16 pair panels.
#[derive(Debug, Clone)]
pub struct PackedBf16 {
    n: usize,
    k: usize,
    data: Vec<u16>,
}

/// bf16 bits of `v`, rounded to nearest even (NaN stays NaN, quieted): the same bits as
/// `half::bf16::from_f32`, without branches, so loops of it vectorize (activations are
/// converted on every call).
#[inline(always)]
pub fn to_bf16(v: f32) -> u16 {
    let b = v.to_bits();
    // Adding 0x7fff plus the kept part's lowest bit rounds to nearest, ties to even.
    let rounded = (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16;
    let nan = ((b >> 16) | 0x40) as u16;
    if b & 0x7fff_ffff > 0x7f80_0000 {
        nan
    } else {
        rounded
    }
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

    /// Packs the `[n, k]` matrix whose element `(row, kk)` is `at(row, kk)`, rounding to bf16,
    /// a panel per task (reads in the order `kk`, then the panel's 16 rows).
    pub(crate) fn pack_with(n: usize, k: usize, at: impl Fn(usize, usize) -> f32 + Sync) -> Self {
        let pairs = k.div_ceil(2);
        let panel_len = pairs * PANEL * 2;
        let mut data = vec![0u16; n.div_ceil(PANEL) * panel_len];
        data.par_chunks_mut(panel_len)
            .enumerate()
            .for_each(|(p, panel)| {
                let cols = (n - p * PANEL).min(PANEL);
                for kk in 0..k {
                    let base = (kk / 2) * PANEL * 2 + kk % 2;
                    for c in 0..cols {
                        panel[base + c * 2] = to_bf16(at(p * PANEL + c, kk));
                    }
                }
            });
        Self { n, k, data }
    }

    /// Packs the `[n, k]` matrix whose row `r` is `row(r)` (at least `k` long; the first `k`
    /// taken): rows read in order, a panel per task.
    pub(crate) fn pack_rows<'a>(
        n: usize,
        k: usize,
        row: impl Fn(usize) -> &'a [f32] + Sync,
    ) -> Self {
        let pairs = k.div_ceil(2);
        let panel_len = pairs * PANEL * 2;
        let mut data = vec![0u16; n.div_ceil(PANEL) * panel_len];
        data.par_chunks_mut(panel_len)
            .enumerate()
            .for_each(|(p, panel)| {
                for c in 0..(n - p * PANEL).min(PANEL) {
                    let r = &row(p * PANEL + c)[..k];
                    for (j, two) in r.chunks(2).enumerate() {
                        let at = j * PANEL * 2 + c * 2;
                        panel[at] = to_bf16(two[0]);
                        if let Some(&hi) = two.get(1) {
                            panel[at + 1] = to_bf16(hi);
                        }
                    }
                }
            });
        Self { n, k, data }
    }

    /// Packs the `[n, k]` matrix whose column `kk` is `col(kk)` (at least `n` long): a task per
    /// run of 16 panels, reading 256 consecutive values of each column (a long stride between
    /// columns would otherwise cost a page walk per 16 values).
    pub(crate) fn pack_cols<'a>(
        n: usize,
        k: usize,
        col: impl Fn(usize) -> &'a [f32] + Sync,
    ) -> Self {
        const GROUP: usize = 16;
        let pairs = k.div_ceil(2);
        let panel_len = pairs * PANEL * 2;
        let mut data = vec![0u16; n.div_ceil(PANEL) * panel_len];
        data.par_chunks_mut(GROUP * panel_len)
            .enumerate()
            .for_each(|(g, panels)| {
                let first = g * GROUP * PANEL;
                let cols = first..(first + GROUP * PANEL).min(n);
                for kk in 0..k {
                    let src = &col(kk)[cols.clone()];
                    let base = (kk / 2) * PANEL * 2 + kk % 2;
                    for (p, chunk) in src.chunks(PANEL).enumerate() {
                        let panel = &mut panels[p * panel_len..(p + 1) * panel_len];
                        for (c, &v) in chunk.iter().enumerate() {
                            panel[base + c * 2] = to_bf16(v);
                        }
                    }
                }
            });
        Self { n, k, data }
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
        #[cfg(target_arch = "x86_64")]
        if isa.isa() == Isa::Avx512Bf16 {
            // SAFETY: AVX512_BF16 runs here; `xb` holds rows < m; the panels are w's; `c` is
            // `[m, n]` and this task alone writes these rows of these panels (`par_blocks`).
            unsafe { dp_rows(&xb, w, rows, panels, c) };
            return;
        }
        for p in panels {
            // SAFETY: `isa` runs here; rows < m and panel p < w.panels(); `c` is `[m, n]` and
            // this task alone writes these rows of panel p (`par_blocks`).
            unsafe { panel_rows(isa, x, w, rows.clone(), p, c) };
        }
    };
    // SAFETY: `panel_rows` stores every valid column of its rows of its panel.
    unsafe { par_blocks(m, w.n(), block) }
}

/// `[m, w.n()]` = rows of bf16 pairs `xb` ([`bf16_pairs`] layout, `w.k()` wide) times `w^T`,
/// with AVX512_BF16 (`isa` must be it).
pub(crate) fn matmul_pairs(isa: Supported, xb: &[u32], m: usize, w: &PackedBf16) -> Vec<f32> {
    assert_eq!(isa.isa(), Isa::Avx512Bf16, "vdpbf16ps needs AVX512_BF16");
    assert!(xb.len() >= m * w.pairs(), "x is not [m, k / 2] pairs");
    let block = |rows: Range<usize>, panels: Range<usize>, _next, c: *mut f32| {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX512_BF16 runs here (`isa` says so, asserted); `xb` holds rows < m; the
        // panels are w's; `c` is `[m, n]` and this task alone writes these rows of these panels.
        unsafe {
            dp_rows(xb, w, rows, panels, c)
        };
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (rows, panels, c);
    };
    // SAFETY: `dp_rows` stores every valid column of its rows of its panels.
    unsafe { par_blocks(m, w.n(), block) }
}

/// The `[m, k]` matrix whose element `(i, kk)` is `at(i, kk)`, rounded to bf16 as rows of
/// [`bf16_pairs`], 16 rows per task (reads in the order pair, then the 16 rows).
pub(crate) fn bf16_pairs_with(
    m: usize,
    k: usize,
    at: impl Fn(usize, usize) -> f32 + Sync,
) -> Vec<u32> {
    let pairs = k.div_ceil(2);
    let mut out = vec![0u32; m * pairs];
    out.par_chunks_mut(16 * pairs)
        .enumerate()
        .for_each(|(b, block)| {
            let rows = block.len() / pairs.max(1);
            for j in 0..pairs {
                for r in 0..rows {
                    let i = b * 16 + r;
                    let lo = to_bf16(at(i, 2 * j)) as u32;
                    let hi = if 2 * j + 1 < k {
                        (to_bf16(at(i, 2 * j + 1)) as u32) << 16
                    } else {
                        0
                    };
                    block[r * pairs + j] = lo | hi;
                }
            }
        });
    out
}

/// [`bf16_pairs`] of the `[m, k]` matrix whose row `i` is `row(i)` (the first `k` taken).
pub(crate) fn bf16_pairs_rows<'a>(
    m: usize,
    k: usize,
    row: impl Fn(usize) -> &'a [f32] + Sync,
) -> Vec<u32> {
    let pairs = k.div_ceil(2);
    let mut out = vec![0u32; m * pairs];
    out.par_chunks_mut(pairs.max(1) * 16)
        .enumerate()
        .for_each(|(b, block)| {
            for (r, o) in block.chunks_exact_mut(pairs.max(1)).enumerate() {
                let x = &row(b * 16 + r)[..k];
                for (o, two) in o.iter_mut().zip(x.chunks(2)) {
                    let hi = two.get(1).map_or(0, |&h| (to_bf16(h) as u32) << 16);
                    *o = to_bf16(two[0]) as u32 | hi;
                }
            }
        });
    out
}

/// [`bf16_pairs`] of the `[m, k]` matrix whose column `kk` is `col(kk)` (at least `m` long):
/// 64 rows per task, each pair of columns read together.
pub(crate) fn bf16_pairs_cols<'a>(
    m: usize,
    k: usize,
    col: impl Fn(usize) -> &'a [f32] + Sync,
) -> Vec<u32> {
    let pairs = k.div_ceil(2);
    let mut out = vec![0u32; m * pairs];
    const ROWS: usize = 64;
    out.par_chunks_mut(pairs.max(1) * ROWS)
        .enumerate()
        .for_each(|(b, block)| {
            let rows = b * ROWS..(b * ROWS + block.len() / pairs.max(1));
            for j in 0..pairs {
                let lo = &col(2 * j)[rows.clone()];
                if 2 * j + 1 < k {
                    let hi = &col(2 * j + 1)[rows.clone()];
                    for (r, (&l, &h)) in lo.iter().zip(hi).enumerate() {
                        block[r * pairs + j] = to_bf16(l) as u32 | (to_bf16(h) as u32) << 16;
                    }
                } else {
                    for (r, &l) in lo.iter().enumerate() {
                        block[r * pairs + j] = to_bf16(l) as u32;
                    }
                }
            }
        });
    out
}

/// `x` rounded to bf16, each row as `k / 2` (padded) little-endian pairs `lo = x[2j]`,
/// `hi = x[2j + 1]`.
fn bf16_pairs(x: &[f32], m: usize, k: usize) -> Vec<u32> {
    let pairs = k.div_ceil(2);
    let mut out = vec![0u32; m * pairs];
    for (row, out) in x.chunks_exact(k).zip(out.chunks_exact_mut(pairs)).take(m) {
        let mut two = row.chunks_exact(2);
        for (o, v) in out.iter_mut().zip(&mut two) {
            *o = to_bf16(v[0]) as u32 | (to_bf16(v[1]) as u32) << 16;
        }
        if let [last] = two.remainder() {
            out[pairs - 1] = to_bf16(*last) as u32;
        }
    }
    out
}

/// Rows `rows` of panels `panels` with AVX512_BF16, a run of panels a tile.
///
/// # Safety
/// AVX-512F and AVX512_BF16 run on this CPU; `xb` holds at least `rows.end` rows of
/// [`bf16_pairs`]; `panels` are w's; `c` is `[m, w.n()]`; no other thread writes these rows
/// of these panels.
#[cfg(target_arch = "x86_64")]
unsafe fn dp_rows(
    xb: &[u32],
    w: &PackedBf16,
    rows: Range<usize>,
    panels: Range<usize>,
    c: *mut f32,
) {
    let n = w.n();
    let data = &w.data[panels.start * w.panel_len()..panels.end * w.panel_len()];
    let last = (n - (panels.end - 1) * PANEL).min(PANEL);
    for t in row_tiles(rows, x86::MR_DP) {
        // SAFETY: AVX512_BF16 runs here; rows t of the panels' valid columns lie in `c`.
        unsafe {
            let out = c.add(t.start * n + panels.start * PANEL);
            x86::tile_dpbf16(xb, w.pairs(), t, data, panels.len(), out, n, last)
        }
    }
}

/// Rows `rows` of panel `p` on `isa`.
///
/// # Safety
/// `isa` runs on this CPU; `x` is `[m, k]` with `rows.end <= m`; `p < w.panels()`; `c` is
/// `[m, w.n()]`; no other thread writes these rows of the panel.
unsafe fn panel_rows(
    isa: Supported,
    x: &[f32],
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
        Isa::Avx2 | Isa::Avx512 | Isa::Avx512Vnni | Isa::Avx512Bf16 => {
            // Pairs widened to f32: AVX2 in 8-lane halves, AVX-512F in one vector.
            type Tile = unsafe fn(&[f32], usize, usize, &[u16], *mut f32, usize, usize);
            let (tile, mr): (Tile, usize) = if isa.isa() == Isa::Avx2 {
                (x86::tile_avx2, x86::MR)
            } else {
                (x86::tile_avx512, x86::MR512)
            };
            for t in row_tiles(rows, mr) {
                let xr = &x[t.start * k..t.end * k];
                // SAFETY: `isa` (AVX2+FMA, or AVX-512F) runs here and `tile` is its kernel;
                // rows t and the panel's valid columns lie in `c`.
                unsafe {
                    let out = c.add(t.start * n + p * PANEL);
                    tile(xr, t.len(), k, panel, out, n, valid)
                }
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
mod x86;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::tests::{
        assert_rows_independent_of_the_batch, max_diff, pseudo_random, reference,
    };

    #[test]
    fn bf16_rounding_is_to_nearest_even() {
        assert_eq!(from_bf16(to_bf16(1.0)), 1.0);
        assert_eq!(from_bf16(to_bf16(-2.5)), -2.5);
        // 1 + 2^-8 is halfway between two bf16 values: ties go to the even one (1.0).
        assert_eq!(from_bf16(to_bf16(1.0 + 1.0 / 256.0)), 1.0);
        assert!((from_bf16(to_bf16(0.1)) - 0.1).abs() < 0.1 / 128.0);
        // The same bits as the half crate's conversion, on every class of value.
        let specials = [
            0.0,
            -0.0,
            f32::MIN_POSITIVE,
            1e-40,
            -1e-40,
            f32::MAX,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::from_bits(0x7f80_0001),
            f32::from_bits(0xff81_2345),
            f32::from_bits(0x3f80_8000),
            f32::from_bits(0x3f81_8000),
            f32::from_bits(0x7f7f_ffff),
        ];
        let mut s = 0x9e37_79b9u32;
        let randoms = (0..100_000).map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            f32::from_bits(s)
        });
        for v in specials.into_iter().chain(randoms) {
            assert_eq!(
                to_bf16(v),
                half::bf16::from_f32(v).to_bits(),
                "{v:e} ({:#x})",
                v.to_bits()
            );
        }
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
        let (k, n) = (577, 70);
        let packed = PackedBf16::pack(&pseudo_random(n * k, 5), n, k);
        assert_rows_independent_of_the_batch(&PATHS, (k, n), |isa, x, m| {
            matmul_bf16_on(isa, x, m, &packed)
        });
    }
}
