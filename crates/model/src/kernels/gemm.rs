//! General matrix products for the large shapes training runs (thousands of rows, any
//! transposition), through the `gemm` crate candle itself uses, behind bounds-checked views:
//! [`MatRef`] and [`MatMut`] describe a matrix inside a slice by rows, columns and strides, and
//! construction checks that every element lies inside the slice, so [`gemm`] is safe to call.

use std::ops::Range;

/// A read-only matrix inside a slice: element `(i, j)` is `data[offset + i * rs + j * cs]`.
#[derive(Debug, Clone, Copy)]
pub struct MatRef<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    offset: usize,
    rs: usize,
    cs: usize,
}

/// A writable matrix inside a slice (same addressing as [`MatRef`]).
#[derive(Debug)]
pub struct MatMut<'a> {
    data: &'a mut [f32],
    rows: usize,
    cols: usize,
    offset: usize,
    rs: usize,
    cs: usize,
}

/// Whether the last element of a `rows x cols` view at `offset` with strides `rs`, `cs` lies
/// inside a slice of `len`.
fn fits(len: usize, rows: usize, cols: usize, offset: usize, rs: usize, cs: usize) -> bool {
    rows == 0 || cols == 0 || offset + (rows - 1) * rs + (cols - 1) * cs < len
}

impl<'a> MatRef<'a> {
    /// `data` as a row-major `[rows, cols]` matrix.
    pub fn new(data: &'a [f32], rows: usize, cols: usize) -> Self {
        assert_eq!(data.len(), rows * cols, "not a [{rows}, {cols}] matrix");
        Self {
            data,
            rows,
            cols,
            offset: 0,
            rs: cols,
            cs: 1,
        }
    }

    /// Columns `range` of the row-major `[rows, width]` matrix `data`.
    pub fn cols_of(data: &'a [f32], rows: usize, width: usize, range: Range<usize>) -> Self {
        assert!(
            range.end <= width && data.len() == rows * width,
            "column range out of bounds"
        );
        Self {
            data,
            rows,
            cols: range.len(),
            offset: range.start,
            rs: width,
            cs: 1,
        }
    }

    /// The transpose (no copy).
    pub fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }
}

impl<'a> MatMut<'a> {
    /// The same view for a shorter borrow (to write through it more than once).
    pub fn reborrow(&mut self) -> MatMut<'_> {
        MatMut {
            data: self.data,
            rows: self.rows,
            cols: self.cols,
            offset: self.offset,
            rs: self.rs,
            cs: self.cs,
        }
    }

    /// `data` as a row-major `[rows, cols]` matrix.
    pub fn new(data: &'a mut [f32], rows: usize, cols: usize) -> Self {
        assert_eq!(data.len(), rows * cols, "not a [{rows}, {cols}] matrix");
        Self {
            data,
            rows,
            cols,
            offset: 0,
            rs: cols,
            cs: 1,
        }
    }

    /// Columns `range` of the row-major `[rows, width]` matrix `data`.
    pub fn cols_of(data: &'a mut [f32], rows: usize, width: usize, range: Range<usize>) -> Self {
        assert!(
            range.end <= width && data.len() == rows * width,
            "column range out of bounds"
        );
        Self {
            data,
            rows,
            cols: range.len(),
            offset: range.start,
            rs: width,
            cs: 1,
        }
    }
}

/// `c = a b` (`accumulate`: `c += a b`). Shapes are checked; the product runs on the rayon pool
/// when it is large enough to pay for the split.
pub fn gemm(c: MatMut<'_>, a: MatRef<'_>, b: MatRef<'_>, accumulate: bool) {
    product(c, a, b, accumulate, true)
}

/// [`gemm`] on the calling thread only (for products inside a parallel task).
pub fn gemm_serial(c: MatMut<'_>, a: MatRef<'_>, b: MatRef<'_>, accumulate: bool) {
    product(c, a, b, accumulate, false)
}

fn product(c: MatMut<'_>, a: MatRef<'_>, b: MatRef<'_>, accumulate: bool, parallel: bool) {
    assert_eq!(a.cols, b.rows, "inner dimensions differ");
    assert!(
        c.rows == a.rows && c.cols == b.cols,
        "output is [{}, {}], the product [{}, {}]",
        c.rows,
        c.cols,
        a.rows,
        b.cols
    );
    for (len, m) in [
        (c.data.len(), (c.rows, c.cols, c.offset, c.rs, c.cs)),
        (a.data.len(), (a.rows, a.cols, a.offset, a.rs, a.cs)),
        (b.data.len(), (b.rows, b.cols, b.offset, b.rs, b.cs)),
    ] {
        assert!(
            fits(len, m.0, m.1, m.2, m.3, m.4),
            "a view reaches past its slice"
        );
    }
    let (m, n, k) = (c.rows, c.cols, a.cols);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    c.data[c.offset + i * c.rs + j * c.cs] = 0.0;
                }
            }
        }
        return;
    }
    let threads = rayon::current_num_threads();
    let parallelism = if parallel && threads > 1 && m * n * k >= 1 << 18 {
        ::gemm::Parallelism::Rayon(threads)
    } else {
        ::gemm::Parallelism::None
    };
    let stride = |s: usize| s as isize;
    // SAFETY: every view was checked above to lie inside its slice (`fits`), the shapes agree,
    // `c` is borrowed mutably (no aliasing with `a` or `b`), and f32 is a supported type.
    unsafe {
        ::gemm::gemm(
            m,
            n,
            k,
            c.data.as_mut_ptr().add(c.offset),
            stride(c.cs),
            stride(c.rs),
            accumulate,
            a.data.as_ptr().add(a.offset),
            stride(a.cs),
            stride(a.rs),
            b.data.as_ptr().add(b.offset),
            stride(b.cs),
            stride(b.rs),
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        )
    }
}

impl<'a> MatRef<'a> {
    #[inline(always)]
    fn at(&self, i: usize, j: usize) -> f32 {
        self.data[self.offset + i * self.rs + j * self.cs]
    }

    /// Every element rounded to bf16 (and back to f32), row-major.
    fn rounded_bf16(&self) -> Vec<f32> {
        use crate::kernels::bf16::{from_bf16, to_bf16};
        (0..self.rows)
            .flat_map(|i| (0..self.cols).map(move |j| (i, j)))
            .map(|(i, j)| from_bf16(to_bf16(self.at(i, j))))
            .collect()
    }

    /// Row `i` from column `j0` on, when rows are contiguous (`cs == 1`).
    fn row_from(&self, i: usize, j0: usize) -> &'a [f32] {
        let start = self.offset + i * self.rs + j0;
        &self.data[start..start + self.cols - j0]
    }

    /// Column `j` from row `i0` on, when columns are contiguous (`rs == 1`).
    fn col_from(&self, j: usize, i0: usize) -> &'a [f32] {
        let start = self.offset + j * self.cs + i0;
        &self.data[start..start + self.rows - i0]
    }
}

/// `c = a b` (`accumulate`: `c += a b`) in mixed precision: `a` and `b` rounded to bf16, their
/// products summed in f32 (training's forward and gradient products; the master weights stay
/// f32). With AVX512_BF16 the operands are packed into the pair layout `vdpbf16ps` multiplies
/// and the product runs on [`crate::kernels::bf16`]'s tile kernel, in slices of [`K_BLOCK`]
/// along k (a tile's rows and a panel stay in L1 and L2 however long k is); elsewhere the
/// rounded operands go through the f32 [`gemm`] (the same numbers, no faster: the reference
/// this path is tested against).
pub fn gemm_bf16(c: MatMut<'_>, a: MatRef<'_>, b: MatRef<'_>, accumulate: bool) {
    if !PackedB::fast() {
        return gemm_bf16_reference(c, a, b, accumulate);
    }
    gemm_bf16_packed(c, a, &PackedB::new(b), accumulate)
}

/// Length of the slices of k a bf16 product runs in.
pub const K_BLOCK: usize = 1024;

/// The slices of `0..k` a bf16 product runs in.
fn k_slices(k: usize) -> impl Iterator<Item = Range<usize>> {
    (0..k)
        .step_by(K_BLOCK)
        .map(move |k0| k0..(k0 + K_BLOCK).min(k))
}

/// The right operand of [`gemm_bf16_packed`], packed once (a frozen weight used every step).
#[derive(Debug, Clone)]
pub struct PackedB {
    rows: usize,
    cols: usize,
    /// `(k range, b[range, :]^T in pair panels)`; empty without AVX512_BF16 (then `plain`).
    slices: Vec<(Range<usize>, crate::kernels::bf16::PackedBf16)>,
    /// `b` rounded to bf16, row-major (the reference path).
    plain: Vec<f32>,
}

impl PackedB {
    /// Whether this CPU runs the fast path (AVX512_BF16).
    pub fn fast() -> bool {
        use crate::kernels::bf16::PATHS;
        crate::kernels::Supported::best_of(&PATHS).isa() == crate::kernels::Isa::Avx512Bf16
    }

    pub fn new(b: MatRef<'_>) -> Self {
        use crate::kernels::bf16::PackedBf16;
        let (k, n) = (b.rows, b.cols);
        if !Self::fast() {
            return Self {
                rows: k,
                cols: n,
                slices: Vec::new(),
                plain: b.rounded_bf16(),
            };
        }
        let slices = k_slices(k)
            .map(|r| {
                let k0 = r.start;
                let w = if b.rs == 1 {
                    // b's columns are contiguous: the packed matrix's rows.
                    PackedBf16::pack_rows(n, r.len(), |col| b.col_from(col, k0))
                } else if b.cs == 1 {
                    PackedBf16::pack_cols(n, r.len(), |kk| b.row_from(k0 + kk, 0))
                } else {
                    PackedBf16::pack_with(n, r.len(), |col, kk| b.at(k0 + kk, col))
                };
                (r, w)
            })
            .collect();
        Self {
            rows: k,
            cols: n,
            slices,
            plain: Vec::new(),
        }
    }
}

/// The left operand of [`gemm_bf16_pp`], rounded to bf16 pairs once (an activation several
/// products read).
#[derive(Debug, Clone)]
pub struct PackedA {
    rows: usize,
    cols: usize,
    /// `(k range, rows of a[:, range] as bf16 pairs)`; empty without AVX512_BF16 (then `plain`).
    slices: Vec<(Range<usize>, Vec<u32>)>,
    /// `a` rounded to bf16, row-major (the reference path).
    plain: Vec<f32>,
}

impl PackedA {
    pub fn new(a: MatRef<'_>) -> Self {
        use crate::kernels::bf16::{bf16_pairs_cols, bf16_pairs_rows, bf16_pairs_with};
        let (m, k) = (a.rows, a.cols);
        if !PackedB::fast() {
            return Self {
                rows: m,
                cols: k,
                slices: Vec::new(),
                plain: a.rounded_bf16(),
            };
        }
        let slices = k_slices(k)
            .map(|r| {
                let k0 = r.start;
                let pairs = if a.cs == 1 {
                    bf16_pairs_rows(m, r.len(), |i| a.row_from(i, k0))
                } else if a.rs == 1 {
                    bf16_pairs_cols(m, r.len(), |kk| a.col_from(k0 + kk, 0))
                } else {
                    bf16_pairs_with(m, r.len(), |i, kk| a.at(i, k0 + kk))
                };
                (r, pairs)
            })
            .collect();
        Self {
            rows: m,
            cols: k,
            slices,
            plain: Vec::new(),
        }
    }
}

/// [`gemm_bf16`] with the right operand packed beforehand.
pub fn gemm_bf16_packed(c: MatMut<'_>, a: MatRef<'_>, b: &PackedB, accumulate: bool) {
    gemm_bf16_pp(c, &PackedA::new(a), b, accumulate)
}

/// [`gemm_bf16`] with both operands packed beforehand.
pub fn gemm_bf16_pp(c: MatMut<'_>, a: &PackedA, b: &PackedB, accumulate: bool) {
    use crate::kernels::bf16::{matmul_pairs, PATHS};
    assert_eq!(a.cols, b.rows, "inner dimensions differ");
    assert!(
        c.rows == a.rows && c.cols == b.cols,
        "output is [{}, {}], the product [{}, {}]",
        c.rows,
        c.cols,
        a.rows,
        b.cols
    );
    let (m, n, k) = (c.rows, c.cols, a.cols);
    if k == 0 {
        // An empty sum: c = 0 (or unchanged when accumulating).
        return gemm(
            c,
            MatRef::new(&[], m, 0),
            MatRef::new(&[], 0, n),
            accumulate,
        );
    }
    if b.slices.is_empty() || a.slices.is_empty() {
        // No AVX512_BF16: the rounded operands through the f32 product.
        return gemm(
            c,
            MatRef::new(&a.plain, m, k),
            MatRef::new(&b.plain, k, n),
            accumulate,
        );
    }
    if m == 0 || n == 0 {
        return;
    }
    let isa = crate::kernels::Supported::best_of(&PATHS);
    let mut c = c;
    for (i, ((ra, xb), (rb, w))) in a.slices.iter().zip(&b.slices).enumerate() {
        debug_assert_eq!(ra, rb);
        let out = matmul_pairs(isa, xb, m, w);
        store(c.reborrow(), &out, accumulate || i > 0);
    }
}

/// [`gemm_bf16`]'s numbers the plain way: both operands rounded to bf16, then [`gemm`].
pub fn gemm_bf16_reference(c: MatMut<'_>, a: MatRef<'_>, b: MatRef<'_>, accumulate: bool) {
    let (ar, br) = (a.rounded_bf16(), b.rounded_bf16());
    gemm(
        c,
        MatRef::new(&ar, a.rows, a.cols),
        MatRef::new(&br, b.rows, b.cols),
        accumulate,
    );
}

/// Writes (or adds) the row-major `[c.rows, c.cols]` `out` into `c`, rows in parallel.
fn store(c: MatMut<'_>, out: &[f32], accumulate: bool) {
    use rayon::prelude::*;
    let (n, rs, cs, offset) = (c.cols, c.rs, c.cs, c.offset);
    assert!(fits(c.data.len(), c.rows, c.cols, offset, rs, cs));
    if cs == 1 && rs >= n {
        // Each row of `c` is a contiguous run of `n`, rows `rs` apart.
        let data = &mut c.data[offset..];
        data.par_chunks_mut(rs)
            .zip(out.par_chunks(n))
            .for_each(|(row, src)| {
                let row = &mut row[..n];
                if accumulate {
                    row.iter_mut().zip(src).for_each(|(d, s)| *d += s);
                } else {
                    row.copy_from_slice(src);
                }
            });
        return;
    }
    for i in 0..c.rows {
        for j in 0..n {
            let d = &mut c.data[offset + i * rs + j * cs];
            let s = out[i * n + j];
            *d = if accumulate { *d + s } else { s };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f64> {
        let mut c = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k)
                    .map(|l| a[i * k + l] as f64 * b[l * n + j] as f64)
                    .sum();
            }
        }
        c
    }

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 1000) as f32 / 500.0 - 1.0
            })
            .collect()
    }

    fn transpose(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
        let mut t = vec![0f32; x.len()];
        for i in 0..rows {
            for j in 0..cols {
                t[j * rows + i] = x[i * cols + j];
            }
        }
        t
    }

    #[test]
    fn products_of_views_match_an_f64_reference() {
        let (m, k, n) = (67, 129, 45);
        let (a, b) = (values(m * k, 1), values(k * n, 2));
        let want = reference(&a, &b, m, k, n);
        let check = |c: &[f32], scale: f64| {
            let err = c
                .iter()
                .zip(&want)
                .map(|(x, y)| (*x as f64 - scale * y).abs())
                .fold(0f64, f64::max);
            assert!(err < 1e-3, "max error {err}");
        };
        let mut c = vec![0f32; m * n];
        gemm(
            MatMut::new(&mut c, m, n),
            MatRef::new(&a, m, k),
            MatRef::new(&b, k, n),
            false,
        );
        check(&c, 1.0);
        // Transposed operands: a = (a^T)^T, b = (b^T)^T; then accumulate a second time.
        let (at, bt) = (transpose(&a, m, k), transpose(&b, k, n));
        let (va, vb) = (MatRef::new(&at, k, m).t(), MatRef::new(&bt, n, k).t());
        gemm(MatMut::new(&mut c, m, n), va, vb, true);
        check(&c, 2.0);
        // A column block of a wider output.
        let mut wide = vec![7f32; m * (n + 10)];
        gemm(
            MatMut::cols_of(&mut wide, m, n + 10, 5..5 + n),
            MatRef::new(&a, m, k),
            MatRef::new(&b, k, n),
            false,
        );
        let block: Vec<f32> = wide
            .chunks(n + 10)
            .flat_map(|r| r[5..5 + n].to_vec())
            .collect();
        check(&block, 1.0);
        assert!(wide
            .chunks(n + 10)
            .all(|r| r[..5].iter().chain(&r[5 + n..]).all(|&x| x == 7.0)));
    }

    #[test]
    #[should_panic(expected = "inner dimensions differ")]
    fn mismatched_shapes_are_refused() {
        let (a, b) = (vec![0f32; 6], vec![0f32; 6]);
        let mut c = vec![0f32; 4];
        gemm(
            MatMut::new(&mut c, 2, 2),
            MatRef::new(&a, 2, 3),
            MatRef::new(&b, 2, 3),
            false,
        );
    }

    #[test]
    fn bf16_products_of_views_match_the_rounded_reference_and_stay_near_f32() {
        use crate::kernels::bf16::{from_bf16, to_bf16};
        // Training's shapes in miniature: odd k (a padded pair), more than one panel and row
        // block, k over several slices of K_BLOCK, transposed and column-range views, with and
        // without accumulation.
        for &(m, k, n) in &[
            (67, 129, 45),
            (200, 64, 33),
            (5, 1, 17),
            (130, 577, 96),
            (37, 2500, 40),
        ] {
            let (a, b) = (values(m * k, 3), values(k * n, 4));
            let round =
                |x: &[f32]| -> Vec<f32> { x.iter().map(|&v| from_bf16(to_bf16(v))).collect() };
            let rounded = reference(&round(&a), &round(&b), m, k, n);
            let exact = reference(&a, &b, m, k, n);
            let max_err = |c: &[f32], want: &[f64], scale: f64| {
                c.iter()
                    .zip(want)
                    .map(|(x, y)| (*x as f64 - scale * y).abs())
                    .fold(0f64, f64::max)
            };
            let (at, bt) = (transpose(&a, m, k), transpose(&b, k, n));
            for path in [
                gemm_bf16 as fn(MatMut<'_>, MatRef<'_>, MatRef<'_>, bool),
                gemm_bf16_reference,
            ] {
                let mut c = vec![0f32; m * n];
                path(
                    MatMut::new(&mut c, m, n),
                    MatRef::new(&a, m, k),
                    MatRef::new(&b, k, n),
                    false,
                );
                // The rounded operands' exact product, summed in f32.
                assert!(
                    max_err(&c, &rounded, 1.0) < 1e-4 * k as f64,
                    "m={m} k={k} n={n}"
                );
                // bf16 rounding itself: within 2^-8 of each operand's size per term.
                assert!(max_err(&c, &exact, 1.0) < k as f64 / 128.0);
                path(
                    MatMut::new(&mut c, m, n),
                    MatRef::new(&at, k, m).t(),
                    MatRef::new(&bt, n, k).t(),
                    true,
                );
                assert!(
                    max_err(&c, &rounded, 2.0) < 2e-4 * k as f64,
                    "transposed, accumulated"
                );
                // Into columns 3..3+n of a wider output, the other columns untouched.
                let w = n + 5;
                let mut wide = vec![7f32; m * w];
                path(
                    MatMut::cols_of(&mut wide, m, w, 3..3 + n),
                    MatRef::new(&a, m, k),
                    MatRef::new(&b, k, n),
                    false,
                );
                for i in 0..m {
                    assert!(wide[i * w..i * w + 3].iter().all(|&x| x == 7.0));
                    assert!(wide[i * w + 3 + n..(i + 1) * w].iter().all(|&x| x == 7.0));
                    for j in 0..n {
                        assert!(
                            (wide[i * w + 3 + j] as f64 - rounded[i * n + j]).abs()
                                < 1e-4 * k as f64
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn operands_packed_once_give_the_products_of_packing_each_time() {
        let (m, k, n) = (45, 2100, 70);
        let (a, b) = (values(m * k, 5), values(k * n, 6));
        let at = transpose(&a, m, k);
        for view in [MatRef::new(&a, m, k), MatRef::new(&at, k, m).t()] {
            let (pa, pb) = (PackedA::new(view), PackedB::new(MatRef::new(&b, k, n)));
            let mut once = vec![0f32; m * n];
            gemm_bf16(
                MatMut::new(&mut once, m, n),
                view,
                MatRef::new(&b, k, n),
                false,
            );
            let mut packed = vec![1f32; m * n];
            gemm_bf16_pp(MatMut::new(&mut packed, m, n), &pa, &pb, false);
            assert_eq!(once, packed);
            gemm_bf16_packed(MatMut::new(&mut packed, m, n), view, &pb, true);
            let doubled: Vec<f32> = once.iter().map(|x| 2.0 * x).collect();
            let err = packed
                .iter()
                .zip(&doubled)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            assert!(err < 1e-3, "{err}");
        }
    }
}
