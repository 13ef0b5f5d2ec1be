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
}
