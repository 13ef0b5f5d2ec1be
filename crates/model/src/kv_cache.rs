//! Per-sequence KV caches. Each sequence owns one [`LayerKv`] per unrolled layer.
//!
//! K is stored in blocks of [`KV_BLOCK`] positions, transposed within the block
//! (`[block][kv_head][head_dim][16]`), so attention scores for 16 positions are 16-lane FMAs with
//! no horizontal sums. V is position-major (`[position][kv_head][head_dim]`), the layout the
//! weighted sum reads. Appending writes one slot; truncating (rolling back) is free.

/// Positions per K block (one AVX-512 vector of scores).
pub const KV_BLOCK: usize = 16;

/// K and V of one layer of one sequence.
#[derive(Debug, Clone, Default)]
pub struct LayerKv {
    pub(crate) k: Vec<f32>,
    pub(crate) v: Vec<f32>,
    /// Floats per position (`kv_heads * head_dim`).
    pub(crate) row: usize,
    len: usize,
}

impl LayerKv {
    pub fn new(row: usize) -> Self {
        Self {
            k: Vec::new(),
            v: Vec::new(),
            row,
            len: 0,
        }
    }

    /// Cached positions.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Drops positions `len..`.
    pub fn truncate(&mut self, len: usize) {
        if len < self.len {
            self.len = len;
            self.k
                .truncate(len.div_ceil(KV_BLOCK) * KV_BLOCK * self.row);
            self.v.truncate(len * self.row);
        }
    }

    /// Appends one position; `k` and `v` are `[kv_heads * head_dim]` (head-major).
    pub fn push(&mut self, k: &[f32], v: &[f32]) {
        let slot = self.len % KV_BLOCK;
        if slot == 0 {
            self.k.resize(self.k.len() + KV_BLOCK * self.row, 0.0);
        }
        let block = &mut self.k[(self.len / KV_BLOCK) * KV_BLOCK * self.row..];
        for (i, &x) in k.iter().enumerate() {
            block[i * KV_BLOCK + slot] = x;
        }
        self.v.extend_from_slice(v);
        self.len += 1;
    }

    /// K block `b` of a KV head: `[head_dim][16]`, starting at feature `head_offset`.
    pub(crate) fn k_block(&self, b: usize, head_offset: usize, head_dim: usize) -> &[f32] {
        let start = (b * self.row + head_offset) * KV_BLOCK;
        &self.k[start..start + head_dim * KV_BLOCK]
    }

    /// V of position `j`, features `head_offset..head_offset + head_dim`.
    pub(crate) fn v_row(&self, j: usize, head_offset: usize, head_dim: usize) -> &[f32] {
        let start = j * self.row + head_offset;
        &self.v[start..start + head_dim]
    }

    /// K of position `j` as a plain vector (for tests and copies).
    pub fn k_at(&self, j: usize) -> Vec<f32> {
        let base = (j / KV_BLOCK) * KV_BLOCK * self.row;
        (0..self.row)
            .map(|i| self.k[base + i * KV_BLOCK + j % KV_BLOCK])
            .collect()
    }

    /// V of position `j`.
    pub fn v_at(&self, j: usize) -> &[f32] {
        &self.v[j * self.row..(j + 1) * self.row]
    }

    /// Asks the CPU to bring this cache's K and V into its caches (`prefetcht1`: L2), so the
    /// attention that reads them next does not wait on memory line by line.
    pub(crate) fn prefetch(&self) {
        #[cfg(target_arch = "x86_64")]
        for data in [&self.k, &self.v] {
            for line in data.chunks(16) {
                // SAFETY: prefetching is a hint and never faults; the address is inside `data`.
                unsafe {
                    std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(
                        line.as_ptr() as *const i8,
                    )
                };
            }
        }
    }

    /// Bytes held (K's last block counted whole).
    pub fn bytes(&self) -> usize {
        (self.k.len() + self.v.len()) * std::mem::size_of::<f32>()
    }
}

/// The KV cache of one sequence: one [`LayerKv`] per unrolled layer.
#[derive(Debug, Clone)]
pub struct SeqCache {
    pub layers: Vec<LayerKv>,
}

impl SeqCache {
    pub fn new(num_layers: usize, kv_row: usize) -> Self {
        Self {
            layers: (0..num_layers).map(|_| LayerKv::new(kv_row)).collect(),
        }
    }

    /// Positions cached in the first layer (all layers agree for a plain decoder).
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, LayerKv::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn truncate(&mut self, len: usize) {
        self.layers.iter_mut().for_each(|l| l.truncate(len));
    }

    pub fn bytes(&self) -> usize {
        self.layers.iter().map(LayerKv::bytes).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_read_back_and_truncate_across_blocks() {
        let row = 6;
        let mut kv = LayerKv::new(row);
        let pos = |j: usize| -> Vec<f32> { (0..row).map(|i| (j * 10 + i) as f32).collect() };
        for j in 0..40 {
            kv.push(&pos(j), &pos(j + 1000));
        }
        assert_eq!(kv.len(), 40);
        for j in [0, 15, 16, 39] {
            assert_eq!(kv.k_at(j), pos(j));
            assert_eq!(kv.v_at(j), pos(j + 1000).as_slice());
        }
        kv.truncate(17);
        assert_eq!(kv.len(), 17);
        kv.push(&pos(77), &pos(77));
        assert_eq!(kv.k_at(17), pos(77));
        assert_eq!(kv.k_at(16), pos(16));
        assert_eq!(kv.bytes(), (2 * KV_BLOCK * row + 18 * row) * 4);
    }
}
