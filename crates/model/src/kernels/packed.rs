//! Weights packed once at load for the matmul kernel: `[n, k]` (Linear layout) becomes panels of
//! [`PANEL`] output columns, each stored k-major (`[panel][k][16]`), zero-padded past `n`. A step
//! along k then reads one contiguous 64-byte vector per panel, so the micro-kernel needs no
//! per-call packing (candle's gemm repacks the whole weight on every call, which dominates at the
//! tens of rows a decode step has) and no horizontal reductions.

/// Output columns per panel: one AVX-512 vector of f32.
pub const PANEL: usize = 16;

/// A weight matrix in panel layout.
#[derive(Debug, Clone)]
pub struct PackedWeight {
    n: usize,
    k: usize,
    data: Vec<f32>,
}

impl PackedWeight {
    /// Packs `w`, row-major `[n, k]`.
    pub fn pack(w: &[f32], n: usize, k: usize) -> Self {
        assert_eq!(w.len(), n * k, "weight is not [n, k]");
        let panels = n.div_ceil(PANEL);
        let mut data = vec![0f32; panels * k * PANEL];
        for (row, w_row) in w.chunks_exact(k.max(1)).enumerate().take(n) {
            let (p, c) = (row / PANEL, row % PANEL);
            let panel = &mut data[p * k * PANEL..(p + 1) * k * PANEL];
            for (kk, &v) in w_row.iter().enumerate() {
                panel[kk * PANEL + c] = v;
            }
        }
        Self { n, k, data }
    }

    /// Back to row-major `[n, k]`.
    pub fn unpack(&self) -> Vec<f32> {
        let (n, k) = (self.n, self.k);
        let mut w = vec![0f32; n * k];
        for row in 0..n {
            let (p, c) = (row / PANEL, row % PANEL);
            for kk in 0..k {
                w[row * k + kk] = self.data[p * k * PANEL + kk * PANEL + c];
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

    /// Panel `p`: `k * PANEL` floats.
    pub(crate) fn panel_ptr(&self, p: usize) -> *const f32 {
        self.data[p * self.k * PANEL..].as_ptr()
    }

    /// Panels `range`, contiguous.
    pub(crate) fn panels_data(&self, range: std::ops::Range<usize>) -> &[f32] {
        &self.data[range.start * self.k * PANEL..range.end * self.k * PANEL]
    }

    pub(crate) fn panel(&self, p: usize) -> &[f32] {
        &self.data[p * self.k * PANEL..(p + 1) * self.k * PANEL]
    }

    pub fn bytes(&self) -> usize {
        self.data.len() * std::mem::size_of::<f32>()
    }
}
