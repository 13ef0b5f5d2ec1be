//! Hand-written CPU kernels for the two places where candle's general ops lose: decode-sized
//! matmuls (candle runs an m=1 matmul on one core, so batch-1 decoding leaves the second core
//! idle, and packs the whole weight for every call, which dominates at tens of rows) and
//! attention over per-sequence KV caches of different lengths (one small op per sequence would
//! cost more in dispatch than in arithmetic). Each kernel has a test against a plain reference.
//!
//! Instruction sets are picked at run time ([`isa`]), so one binary runs everywhere: AVX-512 and
//! AVX2+FMA micro-kernels over pre-packed weights ([`packed`]), and plain loops for the baseline
//! target. Weights come in three formats: f32 ([`matmul`]), bf16 ([`bf16`]) and int8 blocks
//! ([`q8`]). Every path of every kernel is tested against an f64 reference on each instruction
//! set the host runs.

/// `match $rows { 1 => $f::<1>(args), 2 => $f::<2>(args), .. }`: a tile kernel instantiated for
/// each row count the callers pass (`$rows` must be one of the listed counts).
macro_rules! by_rows {
    ($rows:expr; $($r:literal),+; $f:ident $args:tt) => {
        match $rows {
            $($r => $f::<$r> $args,)+
            n => unreachable!("no tile of {n} rows"),
        }
    };
}

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
pub mod bf16;
pub mod gemm;
pub mod isa;
pub mod packed;
pub mod q8;

pub use isa::{Isa, Supported};
pub use packed::{PackedWeight, PANEL};

use std::ops::Range;

use rayon::prelude::*;

/// `e^x`, written so 16 of them vectorize: Cody-Waite range reduction to `r` in [-ln2/2, ln2/2],
/// a degree-6 polynomial, and the power of two put straight into the exponent bits. Relative
/// error about 2e-7; inputs are clamped to [-87, 88] (results ~1e-38 and ~1.6e38 there); NaN
/// stays NaN. No float-to-int conversion and no `f32::clamp` (both kept LLVM from vectorizing
/// it: SwiGLU ran one value at a time, ~4% of a decode step).
#[inline(always)]
pub fn exp_fast(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding 1.5 * 2^23 rounds to the nearest integer in plain float arithmetic, and leaves
    // that integer in the low bits of the sum's mantissa.
    const ROUND: f32 = 12_582_912.0;
    // Comparisons, not min/max: a NaN stays NaN; and not `f32::clamp`, which kept the loops
    // that call this from vectorizing.
    #[allow(clippy::manual_clamp)]
    let x = if x < -87.0 {
        -87.0
    } else if x > 88.0 {
        88.0
    } else {
        x
    };
    let t = x * LOG2E + ROUND;
    let n = t - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0 / 720.0;
    let p = p * r + 1.0 / 120.0;
    let p = p * r + 1.0 / 24.0;
    let p = p * r + 1.0 / 6.0;
    let p = p * r + 0.5;
    let p = p * r + 1.0;
    let p = p * r + 1.0;
    // n in [-126, 127]: 2^n from t's bits (t and ROUND share their exponent).
    let e = (t.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    p * f32::from_bits((e.wrapping_add(127) << 23) as u32)
}

/// SwiGLU over the fused gate|up projection: `gu` is `[rows, 2f]` (gate then up per row);
/// returns `silu(gate) * up`, `[rows, f]`, in one parallel pass.
pub fn swiglu(gu: &[f32], f: usize) -> Vec<f32> {
    let rows = gu.len() / (2 * f).max(1);
    let isa = Supported::best();
    let mut out = vec![0f32; rows * f];
    out.par_chunks_mut(f)
        .zip(gu.par_chunks(2 * f))
        .for_each(|(o, row)| {
            let (gate, up) = row.split_at(f);
            match isa.isa() {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: AVX-512F runs on this CPU (only detection makes a `Supported`).
                Isa::Avx512 | Isa::Avx512Vnni | Isa::Avx512Bf16 => unsafe {
                    swiglu_avx512(gate, up, o)
                },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: AVX2 and FMA run on this CPU (as above).
                Isa::Avx2 => unsafe { swiglu_avx2(gate, up, o) },
                _ => swiglu_row(gate, up, o),
            }
        });
    out
}

#[inline(always)]
fn swiglu_row(gate: &[f32], up: &[f32], o: &mut [f32]) {
    for ((o, &g), &u) in o.iter_mut().zip(gate).zip(up) {
        *o = g / (1.0 + exp_fast(-g)) * u;
    }
}

/// [`swiglu_row`] compiled for AVX-512F.
///
/// # Safety
/// The CPU supports AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn swiglu_avx512(gate: &[f32], up: &[f32], o: &mut [f32]) {
    swiglu_row(gate, up, o)
}

/// [`swiglu_row`] compiled for AVX2 with FMA.
///
/// # Safety
/// The CPU supports AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn swiglu_avx2(gate: &[f32], up: &[f32], o: &mut [f32]) {
    swiglu_row(gate, up, o)
}

/// `y += alpha * x`, element-wise.
#[inline(always)]
pub(crate) fn axpy<const FMA: bool>(alpha: f32, x: &[f32], y: &mut [f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi = if FMA {
            xi.mul_add(alpha, *yi)
        } else {
            *yi + alpha * xi
        };
    }
}

/// Rows of X per parallel task (a multiple of the micro-kernel's 6 rows).
const ROW_BLOCK: usize = 96;

/// The output buffer, shared by the tasks of one matmul.
struct OutPtr(*mut f32);
// SAFETY: every task writes a disjoint block of the output (its rows x its panels), and the
// buffer outlives the parallel section.
unsafe impl Sync for OutPtr {}

/// The instruction sets [`matmul_on`] has a path for (the AVX-512 extensions run the
/// AVX-512F one).
pub const F32_PATHS: [Isa; 3] = [Isa::Portable, Isa::Avx2, Isa::Avx512];

/// `y = x w^T` for `x` (`[m, k]`, row-major) and a packed weight (`[n, k]`): returns `[m, n]`.
/// Work is split over blocks of rows and of output panels, so one row (batch-1 decode) still
/// spreads the weight over every core.
pub fn matmul(x: &[f32], m: usize, w: &PackedWeight) -> Vec<f32> {
    matmul_on(Supported::best_of(&F32_PATHS), x, m, w)
}

/// [`matmul`] on a given instruction set of this CPU (tests and benchmarks compare them).
pub fn matmul_on(isa: Supported, x: &[f32], m: usize, w: &PackedWeight) -> Vec<f32> {
    assert_eq!(x.len(), m * w.k(), "x is not [m, k]");
    let block = |rows, cols, next, c| {
        let next = w.panels_data(next);
        // SAFETY: `isa` runs on this CPU (only detection makes a `Supported`); `x` is `[m, k]`
        // (asserted above) and `rows` lie within it; `c` has room for `[m, n]`; this task is
        // the only writer of block `rows` x `cols` (`par_blocks`).
        unsafe { matmul_block(isa, x, w, rows, cols, next, c) };
    };
    // SAFETY: every micro-kernel stores every valid column of its rows x panels block.
    unsafe { par_blocks(m, w.n(), block) }
}

/// `rows` cut into consecutive tiles of at most `mr` rows.
pub(crate) fn row_tiles(rows: Range<usize>, mr: usize) -> impl Iterator<Item = Range<usize>> {
    let end = rows.end;
    rows.step_by(mr).map(move |r| r..(r + mr).min(end))
}

/// How far ahead of the weight bytes a kernel reads it asks for their cache lines
/// (`prefetcht0`): a decode step streams every weight from memory once, and the hardware
/// prefetcher alone leaves the int8 and bf16 kernels well short of the memory bandwidth
/// (measured with `rrt bench matmul` on the LM head at one row: int8 ~2x faster with it; 4 KiB
/// ahead beat 0.5, 1, 2 and 8 KiB by ~10% for int8 and bf16 on a 2-core EPYC; f32 is at the
/// bandwidth either way).
pub(crate) const PREFETCH: usize = 4096;

/// Fewest rows a tile of the AVX512_BF16 and AVX512_VNNI kernels has before it prefetches
/// ([`PREFETCH`]). A one-row tile does little arithmetic per byte, and on Zen 4 the hardware
/// prefetcher alone streams it faster: `rrt bench matmul`, a decode step's matmuls at one row,
/// 2 threads, 4 interleaved runs: q8 2.61-3.12x f32 with the prefetches, 3.27-3.34x without;
/// bf16 1.65-1.96x with, 1.95-2.02x without; on one thread (what one core can pull) bf16 21-26
/// GB/s with, 28-31 without. At 8 and 32 rows the prefetches still win (bf16 1.75-2.10x with
/// vs 1.56-1.72x without at 8 rows).
pub(crate) const PREFETCH_FROM_ROWS: usize = 2;

/// The output of an `[m, n]` product computed in parallel blocks of rows x [`PANEL`]-column
/// panels: `block(rows, panels, next, c)` must write every element of `C[rows, panels]` (`c` is
/// `[m, n]`, row-major) and nothing else; `next` is the panel range this task computes next
/// (to prefetch). One row (batch-1 decode) still spreads the panels over every core.
///
/// # Safety
/// `block` writes every element of its block of `c` (the output is not zeroed) and no other.
pub(crate) unsafe fn par_blocks(
    m: usize,
    n: usize,
    block: impl Fn(Range<usize>, Range<usize>, Range<usize>, *mut f32) + Sync,
) -> Vec<f32> {
    // Every element is written exactly once below (each task owns its rows x panels, and every
    // block writes every valid column: the caller's promise), so the buffer is not zeroed first.
    let mut out: Vec<f32> = Vec::with_capacity(m * n);
    let panels = n.div_ceil(PANEL);
    // Enough column groups for both cores to stay busy on narrow weights; wide tiles otherwise.
    let group = if panels >= 16 * rayon::current_num_threads() {
        4
    } else {
        2
    };
    let groups = panels.div_ceil(group);
    let row_blocks = m.div_ceil(ROW_BLOCK);
    // Each task walks a run of consecutive groups so it can prefetch the next one's weights.
    let run = groups.div_ceil(4 * rayon::current_num_threads()).max(1);
    let runs = groups.div_ceil(run);
    let ptr = OutPtr(out.as_mut_ptr());
    (0..row_blocks * runs).into_par_iter().for_each(|t| {
        let (rb, run_index) = (t / runs, t % runs);
        let rows = rb * ROW_BLOCK..((rb + 1) * ROW_BLOCK).min(m);
        let ptr = &ptr;
        for g in run_index * run..((run_index + 1) * run).min(groups) {
            let cols = g * group..((g + 1) * group).min(panels);
            let next = cols.end..(cols.end + group).min(panels);
            block(rows.clone(), cols, next, ptr.0);
        }
    });
    // SAFETY: all m * n elements were initialised by the blocks above (the caller's promise).
    unsafe { out.set_len(m * n) };
    out
}

/// `C[rows, panels] = x[rows] W[panels]^T` with the instruction set's kernel.
///
/// # Safety
/// `isa` runs on this CPU; `x` is `[m, w.k()]` with `rows.end <= m`; `c` points to a buffer of
/// `[m, w.n()]` floats; no other thread writes this block of it.
unsafe fn matmul_block(
    isa: Supported,
    x: &[f32],
    w: &PackedWeight,
    rows: std::ops::Range<usize>,
    panels: std::ops::Range<usize>,
    next: &[f32],
    c: *mut f32,
) {
    match isa.isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX-512F runs here (`isa`); the shapes and the block are the caller's promise.
        Isa::Avx512 | Isa::Avx512Vnni | Isa::Avx512Bf16 => unsafe {
            avx512::matmul_block(x, w, rows, panels, next, c)
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX2 and FMA run here (`isa`); the rest is the caller's promise.
        Isa::Avx2 => unsafe { avx2::matmul_block(x, w, rows, panels, c) },
        // SAFETY: the caller's promise.
        _ => unsafe { generic_block::<false>(x, w, rows, panels, c) },
    }
}

/// The portable micro-kernel: one row against one panel at a time, 16 lanes of accumulators.
///
/// # Safety
/// `x` is `[m, w.k()]` with `rows.end <= m`; `c` points to `[m, w.n()]` floats; no other
/// thread writes block `rows` x `panels` of it.
#[inline(always)]
unsafe fn generic_block<const FMA: bool>(
    x: &[f32],
    w: &PackedWeight,
    rows: std::ops::Range<usize>,
    panels: std::ops::Range<usize>,
    c: *mut f32,
) {
    let (k, n) = (w.k(), w.n());
    for p in panels {
        let panel = w.panel(p);
        let valid = (n - p * PANEL).min(PANEL);
        for r in rows.clone() {
            let xr = &x[r * k..(r + 1) * k];
            let mut acc = [0f32; PANEL];
            for (kk, &xv) in xr.iter().enumerate() {
                axpy::<FMA>(xv, &panel[kk * PANEL..(kk + 1) * PANEL], &mut acc);
            }
            // SAFETY: row `r` < m and columns `p * PANEL .. + valid` <= n lie inside `c`, in
            // this task's block.
            unsafe { std::ptr::copy_nonoverlapping(acc.as_ptr(), c.add(r * n + p * PANEL), valid) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn reference(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
        let mut out = vec![0f32; m * n];
        for r in 0..m {
            for j in 0..n {
                out[r * n + j] = (0..k)
                    .map(|i| x[r * k + i] as f64 * w[j * k + i] as f64)
                    .sum::<f64>() as f32;
            }
        }
        out
    }

    /// The largest element-wise difference.
    pub(crate) fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max)
    }

    /// The engine checks batched decoding against one sequence at a time, so a row's result
    /// must not depend on the rows beside it (tile sizes, widened panels): `matmul(isa, x, m)`
    /// (a `[k]` -> `[n]` product) on every instruction set of `paths` the host runs, each of 40
    /// rows alone against the same row in batches of 2, 3, 5, 13 and 40.
    pub(crate) fn assert_rows_independent_of_the_batch(
        paths: &[Isa],
        (k, n): (usize, usize),
        matmul: impl Fn(Supported, &[f32], usize) -> Vec<f32>,
    ) {
        let x = pseudo_random(40 * k, 6);
        for &isa in Supported::all().iter().filter(|s| paths.contains(&s.isa())) {
            let alone: Vec<Vec<f32>> = (0..40)
                .map(|r| matmul(isa, &x[r * k..(r + 1) * k], 1))
                .collect();
            for m in [2, 3, 5, 13, 40] {
                let batch = matmul(isa, &x[..m * k], m);
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

    pub(crate) fn pseudo_random(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s as f32 / u32::MAX as f32) - 0.5
            })
            .collect()
    }

    #[test]
    fn exp_fast_matches_std_exp() {
        let mut worst = 0f32;
        for i in 0..=200_000 {
            let x = -87.0 + 175.0 * i as f32 / 200_000.0;
            let (got, want) = (exp_fast(x), x.exp());
            worst = worst.max(((got - want) / want).abs());
        }
        assert!(worst < 1e-6, "max relative error {worst}");
        assert_eq!(exp_fast(0.0), 1.0);
        assert!(exp_fast(-1000.0) < 1e-37);
        assert!(exp_fast(1000.0).is_finite());
        assert!(exp_fast(f32::NAN).is_nan());
    }

    #[test]
    fn swiglu_matches_formula() {
        let f = 5;
        let gu: Vec<f32> = (0..3 * 2 * f).map(|i| (i as f32 - 15.0) * 0.7).collect();
        let got = swiglu(&gu, f);
        for r in 0..3 {
            for j in 0..f {
                let (g, u) = (gu[r * 2 * f + j], gu[r * 2 * f + f + j]);
                let want = g / (1.0 + (-g).exp()) * u;
                assert!((got[r * f + j] - want).abs() <= 1e-5 * want.abs().max(1.0));
            }
        }
    }

    #[test]
    fn matmul_matches_an_f64_reference_on_every_instruction_set_here() {
        let shapes = [
            (1, 576, 1536),
            (3, 67, 101),
            (8, 576, 49),
            (1, 5, 1),
            (5, 1536, 576),
            (33, 576, 130),
            (64, 17, 257),
            (200, 40, 70),
        ];
        for &(m, k, n) in &shapes {
            let x = pseudo_random(m * k, 1);
            let w = pseudo_random(n * k, 2);
            let packed = PackedWeight::pack(&w, n, k);
            assert_eq!(packed.unpack(), w, "pack/unpack round trip");
            let want = reference(&x, m, k, &w, n);
            let paths = Supported::all()
                .iter()
                .filter(|s| F32_PATHS.contains(&s.isa()))
                .map(|&isa| (isa.isa().name(), matmul_on(isa, &x, m, &packed)))
                .chain([("dispatched", matmul(&x, m, &packed))]);
            for (path, got) in paths {
                let diff = max_diff(&got, &want);
                assert!(diff < 1e-4, "{path}: m={m} k={k} n={n}: max diff {diff}");
            }
        }
    }
}
