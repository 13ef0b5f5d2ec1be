//! int8 weights (`--dtype q8`): a quarter of the f32 weight stream. Weights are quantized at load
//! symmetrically in blocks of [`QBLOCK`] = 32 along k with one f32 scale per block and output
//! column (the block of llama.cpp's Q8_0, so GGUF Q8_0 tensors load as they are: 1.125 bytes per
//! weight); each row of activations is quantized the same way per call. A block's 32 products
//! sum exactly in int32, and the scaled block sums accumulate in f32.
//!
//! Layout: panels of [`PANEL`] output columns, k in pairs inside each block
//! (`[panel][block][16 pairs][16 columns][2]`), so a pair of int16-widened weights per column
//! meets a broadcast pair of activations in one `vpmaddwd` lane (AVX2, AVX-512BW): no
//! horizontal sums. AVX512_VNNI permutes two pair steps into quads (`vpermw`), flips them to
//! unsigned bytes `w + 128` and multiplies them by the activations with `vpdpbusd` (64
//! products an instruction), subtracting `128 * sum(x)` of each block after. All paths sum
//! each block exactly in int32 and scale it the same way; each is tested against an f64
//! reference of the dequantized operands on every instruction set the host runs (the VNNI
//! arithmetic also step for step in plain Rust).

use std::ops::Range;

use super::isa::{Isa, Supported};
use super::{par_blocks, row_tiles, PANEL};

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

    /// Panels `ps`' values and scales, one after the other.
    fn panels(&self, ps: Range<usize>) -> (&[i8], &[f32]) {
        let b = self.blocks();
        (
            &self.data[ps.start * b * BLOCK_BYTES..ps.end * b * BLOCK_BYTES],
            &self.scales[ps.start * b * PANEL..ps.end * b * PANEL],
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

/// Quantized rows for AVX512_VNNI ([`QuantizedRows::signed_quads`]): `vpdpbusd` multiplies
/// unsigned by signed bytes, so the weights go in as `w + 128` (one XOR of their sign bits)
/// and `128 * sum(x)` of each block comes off the block's sum after.
pub(crate) struct VnniRows<'a> {
    blocks: usize,
    /// `[m, blocks, 8]`: four signed values to a u32.
    quads: Vec<u32>,
    /// `[m, blocks]`: `128 * sum(x)` of each block.
    offsets: Vec<i32>,
    /// `[m, blocks]`: the rows' scales (the [`QuantizedRows`]').
    scales: &'a [f32],
}

impl QuantizedRows {
    /// Quantizes `x` (`[m, k]`).
    pub fn new(x: &[f32], m: usize, k: usize) -> Self {
        assert_eq!(x.len(), m * k, "x is not [m, k]");
        let blocks = k.div_ceil(QBLOCK);
        let mut values = vec![0i16; m * blocks * QBLOCK];
        let mut scales = vec![0f32; m * blocks];
        for r in 0..m {
            for b in 0..blocks {
                let src = &x[r * k + b * QBLOCK..r * k + ((b + 1) * QBLOCK).min(k)];
                let dst = &mut values[(r * blocks + b) * QBLOCK..][..src.len()];
                scales[r * blocks + b] = quantize_block_with(src, |i, v| dst[i] = v as i16);
            }
        }
        let pairs = values
            .chunks_exact(2)
            .map(|p| (p[0] as u16 as u32 | (p[1] as u16 as u32) << 16) as i32)
            .collect();
        Self {
            blocks,
            pairs,
            scales,
        }
    }

    /// The rows as AVX512_VNNI's `vpdpbusd` takes them: values as signed bytes, four
    /// consecutive values to a u32 (first in the low byte), and `128 * sum` of each block.
    fn signed_quads(&self) -> VnniRows<'_> {
        let byte = |v: i32| (v as i16 as i8 as u8) as u32;
        let quads = self
            .pairs
            .chunks_exact(2)
            .map(|p| byte(p[0]) | byte(p[0] >> 16) << 8 | byte(p[1]) << 16 | byte(p[1] >> 16) << 24)
            .collect();
        let offsets = self
            .pairs
            .chunks_exact(PAIRS)
            .map(|block| {
                128 * block
                    .iter()
                    .map(|&p| (p as i16) as i32 + ((p >> 16) as i16) as i32)
                    .sum::<i32>()
            })
            .collect();
        VnniRows {
            blocks: self.blocks,
            quads,
            offsets,
            scales: &self.scales,
        }
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
    let vnni = (isa.isa() == Isa::Avx512Vnni).then(|| xq.signed_quads());
    let block = |rows: Range<usize>, panels: Range<usize>, _next, c: *mut f32| {
        // SAFETY: `isa` runs here; rows < m and panels < w's panels; `vnni` is `xq`'s on
        // VNNI; `c` is `[m, n]`, and this task alone writes these rows of these panels
        // (`par_blocks`).
        unsafe { panel_rows(isa, &xq, vnni.as_ref(), w, rows, panels, c) };
    };
    // SAFETY: `panel_rows` stores every valid column of its rows of its panel.
    unsafe { par_blocks(m, w.n(), block) }
}

/// Rows `rows` of panels `panels` on `isa`.
///
/// # Safety
/// `isa` runs on this CPU; `xq` holds at least `rows.end` rows of `w.k()` (and `vnni` their
/// [`QuantizedRows::signed_quads`] on AVX512_VNNI); `panels` are panels of `w`; `c` is
/// `[m, w.n()]`; no other thread writes these rows of these panels.
unsafe fn panel_rows(
    isa: Supported,
    xq: &QuantizedRows,
    vnni: Option<&VnniRows<'_>>,
    w: &PackedQ8,
    rows: Range<usize>,
    panels: Range<usize>,
    c: *mut f32,
) {
    let n = w.n();
    let valid = |p: usize| (n - p * PANEL).min(PANEL);
    match (isa.isa(), vnni) {
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx512Vnni, Some(vnni)) => {
            let (values, scales) = w.panels(panels.clone());
            for t in row_tiles(rows, x86::MR_VNNI) {
                // SAFETY: AVX-512F+BW and VNNI run here; `vnni` holds rows t; the panels'
                // valid columns of rows t lie in `c`.
                unsafe {
                    let out = c.add(t.start * n + panels.start * PANEL);
                    let last = valid(panels.end - 1);
                    x86::tile_vnni(vnni, t, values, scales, panels.len(), out, n, last)
                }
            }
        }
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx2 | Isa::Avx512 | Isa::Avx512Vnni | Isa::Avx512Bf16, _) => {
            // The same int16 pairs: AVX2 in two 8-lane halves, AVX-512BW in one vector.
            type Tile = unsafe fn(&[(&[i32], &[f32])], &[i8], &[f32], *mut f32, usize, usize);
            let tile: Tile = if isa.isa() == Isa::Avx2 {
                x86::tile_avx2
            } else {
                x86::tile_avx512
            };
            for t in row_tiles(rows, x86::MR) {
                let xs: [(&[i32], &[f32]); x86::MR] =
                    std::array::from_fn(|i| xq.row((t.start + i).min(t.end - 1)));
                for p in panels.clone() {
                    let (values, scales) = w.panel(p);
                    // SAFETY: `isa` (AVX2+FMA, or AVX-512F+BW) runs here and `tile` is its
                    // kernel; rows t of the panel's valid columns lie in `c`.
                    unsafe {
                        let out = c.add(t.start * n + p * PANEL);
                        tile(&xs[..t.len()], values, scales, out, n, valid(p))
                    }
                }
            }
        }
        _ => {
            for p in panels {
                let (values, scales) = w.panel(p);
                for r in rows.clone() {
                    let (xp, xs) = xq.row(r);
                    let out = portable_row(xp, xs, values, scales);
                    // SAFETY: row r's valid columns of the panel lie in `c`.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            out.as_ptr(),
                            c.add(r * n + p * PANEL),
                            valid(p),
                        )
                    };
                }
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
mod x86;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::tests::{
        assert_rows_independent_of_the_batch, max_diff, pseudo_random, reference,
    };

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
            let mut simd: Option<(&str, Vec<f32>)> = None;
            for (path, got) in paths {
                let diff = max_diff(&got, &want);
                assert!(
                    diff < 1e-4 * scale.max(1.0),
                    "{path}: m={m} k={k} n={n}: max diff {diff}"
                );
                // The SIMD paths sum each block exactly and scale it with the same fused
                // multiply-add: the same bits on every instruction set (a model's output does
                // not depend on the CPU it runs on).
                if path != "portable" {
                    match &simd {
                        None => simd = Some((path, got.clone())),
                        Some((first, bits)) => assert!(
                            bits.iter()
                                .zip(&got)
                                .all(|(a, b)| a.to_bits() == b.to_bits()),
                            "{path} and {first} differ: m={m} k={k} n={n}"
                        ),
                    }
                }
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
        let vnni = xq.signed_quads();
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
            let mut got = [0i32; PANEL];
            for q in 0..QUADS {
                let src = &values[b * BLOCK_BYTES + q * 64..][..64];
                // vpermw: word i of the result is word QUAD_PERM[i] of the source.
                let mut w = [0i8; 64];
                for (i, &from) in x86::QUAD_PERM.iter().enumerate() {
                    w[2 * i] = src[2 * from as usize];
                    w[2 * i + 1] = src[2 * from as usize + 1];
                }
                // vpxord with 0x80 bytes: the weights as unsigned `w + 128`.
                let wu = w.map(|v| (v as u8 ^ 0x80) as i32);
                let xb = vnni.quads[b * QUADS + q]
                    .to_le_bytes()
                    .map(|v| v as i8 as i32);
                for c in 0..PANEL {
                    for t in 0..4 {
                        got[c] += wu[4 * c + t] * xb[t];
                    }
                }
            }
            for c in 0..PANEL {
                assert_eq!(got[c] - vnni.offsets[b], want[c], "block {b} column {c}");
            }
        }
    }

    #[test]
    fn a_row_gives_the_same_bits_alone_and_in_any_batch() {
        let (k, n) = (577, 70);
        let packed = PackedQ8::quantize(&pseudo_random(n * k, 5), n, k);
        assert_rows_independent_of_the_batch(&PATHS, (k, n), |isa, x, m| {
            matmul_q8_on(isa, x, m, &packed)
        });
    }
}
